// compact/core.hpp: everything in compact that names no backend, for both umbrellas and for code that
// is written against the backend concept.
//
// The folders, in the order a reader learns the library and the only order in which they include each
// other (a header includes only its own folder and the folders above it in this list; a test checks):
//   core/      config, errors, matrix_view, workspace, checked sizes, named shapes, rank policies, the
//              memory tracker
//   random/    Philox4x32-10, the uniform-to-normal conversion, uniform initialisation, and P's
//              definition (random/projection.hpp): the one function both backends call for P
//   backend/   the backend concept (backend.hpp) and the stores' byte format (store_scheme.hpp) that its
//              primitives implement; cpu/ and cuda/ are its models, each with internals in detail/
//   compress/  the compressor concept (compressor.hpp) and its models: the seeded random projection
//              (random_projection.hpp, owning P through projection_source.hpp), activation stores
//              (store_compressor.hpp), VeLoRA (velora.hpp) and WTA-CRS (wta_crs.hpp); 1-bit masks, bit
//              allocation, sensitivity
//   optim/     AdamW, subspace AdamW, the optimizer of a compressed layer's weight, and loss scaling
//   nn/        compressed_linear and input_group (caller memory), linear_layer (owning)
//   io/        checkpoints: a versioned, checksummed section file; linear_layer and allocation save/load
// Two optional folders come after them, each with its own umbrella, and nothing here includes them:
//   distributed/  data parallelism over MPI and NCCL (compact/distributed.hpp; needs MPI or NCCL)
//   torch/        the libtorch integration: Linear, masks, SubspaceAdamW (compact/torch.hpp; needs libtorch)
#pragma once

#include "compact/core/config.hpp"
#include "compact/core/error.hpp"
#include "compact/core/matrix_view.hpp"
#include "compact/core/checked.hpp"
#include "compact/core/shape.hpp"
#include "compact/core/workspace.hpp"
#include "compact/core/rank_policy.hpp"
#include "compact/core/memory_tracker.hpp"
#include "compact/random/philox.hpp"
#include "compact/random/normal.hpp"
#include "compact/random/uniform.hpp"
#include "compact/random/projection.hpp"
#include "compact/backend/backend.hpp"
#include "compact/backend/store_scheme.hpp"
#include "compact/compress/compressor.hpp"
#include "compact/compress/projection_source.hpp"
#include "compact/compress/random_projection.hpp"
#include "compact/compress/activation_store.hpp"
#include "compact/compress/store_compressor.hpp"
#include "compact/compress/velora.hpp"
#include "compact/compress/wta_crs.hpp"
#include "compact/compress/mask.hpp"
#include "compact/compress/bit_allocation.hpp"
#include "compact/compress/sensitivity.hpp"
#include "compact/optim/adamw.hpp"
#include "compact/optim/loss_scaler.hpp"
#include "compact/nn/compressed_linear.hpp"
#include "compact/nn/linear_layer.hpp"
#include "compact/io/checkpoint.hpp"
#include "compact/io/linear_layer_checkpoint.hpp"
#include "compact/io/allocation_checkpoint.hpp"
