// compact/cuda.cuh: the whole library for nvcc translation units, with the CUDA backend and no Eigen.
//
//   #include <compact/cuda.cuh>
//   compact::owned_cuda_context owner;
//   compact::linear_layer<float, compact::rank::ratio<1, 4>, compact::cuda> layer(in, out, options);
//
// Link compact::cuda (CMake), which brings the CUDA runtime and cuBLAS. The CPU backend and its Eigen
// adapters are in compact/compact.hpp; checkpoints (io/) are host-side and not included here.
#pragma once

#include "compact/core/config.hpp"
#include "compact/core/error.hpp"
#include "compact/core/matrix_view.hpp"
#include "compact/core/projection.hpp"
#include "compact/core/rank_policy.hpp"
#include "compact/core/workspace.hpp"
#include "compact/random/normal.hpp"
#include "compact/random/philox.hpp"
#include "compact/random/uniform.hpp"
#include "compact/backend/backend.hpp"
#include "compact/backend/cuda/error.cuh"
#include "compact/backend/cuda/scalar.cuh"
#include "compact/backend/cuda/device_buffer.cuh"
#include "compact/backend/cuda/cuda.cuh"
#include "compact/backend/cuda/owned_context.cuh"
#include "compact/compress/scheme.hpp"
#include "compact/compress/activation_store.hpp"
#include "compact/compress/mask.hpp"
#include "compact/compress/bit_allocation.hpp"
#include "compact/compress/sensitivity.hpp"
#include "compact/nn/input_projection.hpp"
#include "compact/nn/compressed_linear.hpp"
#include "compact/nn/linear_layer.hpp"
#include "compact/optim/adamw.hpp"
