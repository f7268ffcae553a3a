// compact/compact.hpp: the CPU umbrella: the backend-free library (compact/core.hpp, whose top lists the
// folders in order) and the Eigen/OpenMP backend with its Eigen adapters.
//
//   #include <compact/compact.hpp>
//   compact::linear_layer<float, compact::rank::ratio<1, 4>, compact::cpu> fc(
//       compact::in_features{784}, compact::out_features{1024}, options);
#pragma once

#include "compact/core.hpp"
#include "compact/backend/cpu/cpu.hpp"
#include "compact/backend/cpu/eigen.hpp"
