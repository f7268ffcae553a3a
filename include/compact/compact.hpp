// compact/compact.hpp: the CPU umbrella: core, the Eigen/OpenMP backend, layers and optimizers.
//
//   #include <compact/compact.hpp>
//   using layer = compact::compressed_linear<float, compact::rank::ratio<1, 4>, compact::cpu>;
//
// Headers by role:
//   core/      matrix_view, error, workspace, projection (P's definition), rank_policy
//   random/    Philox4x32-10, the uniform-to-normal conversion, uniform initialisation
//   backend/   the backend interface (backend.hpp); cpu/ (Eigen kernels, OpenMP), cpu/eigen.hpp adapters
//   compress/  activation stores (group and average quantization), 1-bit masks, bit allocation
//   nn/        input_projection (Z = X P), compressed_linear and input_group, linear_layer (owning)
//   optim/     subspace AdamW and plain AdamW
//   io/        checkpoints: a versioned, checksummed section file; linear_layer and allocation save/load
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
#include "compact/backend/cpu/cpu.hpp"
#include "compact/backend/cpu/eigen.hpp"
#include "compact/compress/scheme.hpp"
#include "compact/compress/activation_store.hpp"
#include "compact/compress/mask.hpp"
#include "compact/compress/bit_allocation.hpp"
#include "compact/compress/sensitivity.hpp"
#include "compact/nn/input_projection.hpp"
#include "compact/nn/compressed_linear.hpp"
#include "compact/nn/linear_layer.hpp"
#include "compact/optim/adamw.hpp"
#include "compact/io/checkpoint.hpp"
#include "compact/io/linear_layer_checkpoint.hpp"
#include "compact/io/allocation_checkpoint.hpp"
