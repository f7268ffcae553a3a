// compact/cuda.cuh: the CUDA umbrella: the backend-free library (compact/core.hpp, whose top lists the
// folders in order) and the CUDA backend, for nvcc translation units; no Eigen.
//
//   #include <compact/cuda.cuh>
//   compact::owned_cuda_context owner;
//   compact::linear_layer<float, compact::rank::ratio<1, 4>, compact::cuda> layer(
//       compact::in_features{in}, compact::out_features{out}, options);
//
// Link compact::cuda (CMake), which brings the CUDA runtime and cuBLAS. Checkpoints (io/) work for CUDA
// layers too: they copy through the backend's copy_to_host / copy_from_host.
#pragma once

#include "compact/core.hpp"
#include "compact/backend/cuda/error.cuh"
#include "compact/backend/cuda/scalar.cuh"
#include "compact/backend/cuda/device_buffer.cuh"
#include "compact/backend/cuda/cuda.cuh"
#include "compact/backend/cuda/owned_context.cuh"
