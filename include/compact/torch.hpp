// compact/torch.hpp: the libtorch integration (include/compact/torch/), an optional umbrella: the rest of
// compact never includes torch. Link the consumer with libtorch (find_package(Torch), target `torch`).
//
//   #include <compact/torch.hpp>
//   compact::torch::Linear<compact::rank::ratio<1, 4>> fc(compact::torch::LinearOptions(784, 256));
//   compact::torch::ReLU relu;                             // 1-bit mask instead of the output
//   compact::torch::SubspaceAdamW opt(model->parameters(), compact::torch::SubspaceAdamWOptions(1e-2).alpha(0.25));
//   compact::torch::GELU gelu;                             // 8-bit codes of its input
//   compact::torch::SavedTensors saves;                    // every other saved tensor: saves.scope(step)
//   compact::torch::saved_for_backward(loss).activation_bytes;   // what the graph keeps
#pragma once

#include "compact/torch/activations.hpp"
#include "compact/torch/linear.hpp"
#include "compact/torch/optimizer.hpp"
#include "compact/torch/saved_bytes.hpp"
#include "compact/torch/saved_tensors.hpp"
