// compact/torch/saved_bytes.hpp: what a graph keeps for backward, found by walking it from the loss.
//
//   auto loss = ...;                                    // before loss.backward()
//   compact::torch::saved_report r = compact::torch::saved_for_backward(loss);
//   r.activation_bytes;                                 // bytes of tensors kept that are not parameters
//
// Each node reachable from loss.grad_fn() is asked what it keeps: compact's own nodes (Linear, ReLU,
// Dropout) say so; torch's generated nodes are read through their SavedVariables for the kinds a dense
// network uses (addmm, mm, relu, threshold, gelu, silu, dropout, mul, log_softmax, nll_loss), and any
// other node kind is listed in `unknown` (its bytes, if any, are not counted; the report says it is
// incomplete). Tensors encoded under a compact::torch::SavedTensors scope count as their encodings' bytes.
// Storages are counted once however many nodes keep them; the parameters (the variables of
// the graph's AccumulateGrad nodes) are counted apart, in parameter_bytes, since they are not activations.
#pragma once

#include "compact/core/config.hpp"
#include "compact/torch/detail/tensor.hpp"

#include <torch/csrc/autograd/functions/accumulate_grad.h>
#include <torch/csrc/autograd/generated/Functions.h>
#include <torch/torch.h>

#include <cstddef>
#include <memory>
#include <set>
#include <string>
#include <unordered_set>
#include <vector>

COMPACT_NAMESPACE_BEGIN
namespace torch {

struct saved_report {
    std::size_t activation_bytes = 0; ///< storages kept for backward that are not parameters
    std::size_t parameter_bytes = 0;  ///< parameters that nodes keep a reference to (no extra memory)
    std::size_t nodes = 0;            ///< nodes walked
    std::vector<std::string> unknown; ///< node kinds this walk cannot read (empty: the count is complete)
};

namespace detail {

inline void add_saved(const ::torch::autograd::SavedVariable& v, const std::shared_ptr<::torch::autograd::Node>& node,
                      std::vector<::at::Tensor>& out)
{
    try {
        ::at::Tensor t = v.unpack(node);
        if (t.defined()) out.push_back(t);
    } catch (const std::exception&) {
        // freed by a backward already: nothing kept
    }
}

/// The tensors a node keeps, or false for a node kind this walk does not know.
inline bool node_saved(const std::shared_ptr<::torch::autograd::Node>& node, std::vector<::at::Tensor>& out)
{
    namespace g = ::torch::autograd::generated;
    ::torch::autograd::Node* n = node.get();
    if (const auto* ours = dynamic_cast<const reports_saved*>(n)) {
        for (auto& t : ours->saved_tensors()) out.push_back(t);
        return true;
    }
    if (auto* f = dynamic_cast<g::AddmmBackward0*>(n)) return add_saved(f->mat1_, node, out), add_saved(f->mat2_, node, out), true;
    if (auto* f = dynamic_cast<g::MmBackward0*>(n)) return add_saved(f->self_, node, out), add_saved(f->mat2_, node, out), true;
    if (auto* f = dynamic_cast<g::ReluBackward0*>(n)) return add_saved(f->result_, node, out), true;
    if (auto* f = dynamic_cast<g::ThresholdBackward0*>(n)) return add_saved(f->self_, node, out), true;
    if (auto* f = dynamic_cast<g::GeluBackward0*>(n)) return add_saved(f->self_, node, out), true;
    if (auto* f = dynamic_cast<g::SiluBackward0*>(n)) return add_saved(f->self_, node, out), true;
    if (auto* f = dynamic_cast<g::NativeDropoutBackward0*>(n)) return add_saved(f->result1_, node, out), true;
    if (auto* f = dynamic_cast<g::MulBackward0*>(n)) return add_saved(f->self_, node, out), add_saved(f->other_, node, out), true;
    if (auto* f = dynamic_cast<g::LogSoftmaxBackward0*>(n)) return add_saved(f->result_, node, out), true;
    if (auto* f = dynamic_cast<g::NllLossBackward0*>(n))
        return add_saved(f->self_, node, out), add_saved(f->target_, node, out), add_saved(f->weight_, node, out),
               add_saved(f->total_weight_, node, out), true;
    // Nodes that keep no tensor (shapes and scalars only).
    if (dynamic_cast<g::TBackward0*>(n) || dynamic_cast<g::ViewBackward0*>(n) ||
        dynamic_cast<g::ReshapeAliasBackward0*>(n) || dynamic_cast<g::AddBackward0*>(n) ||
        dynamic_cast<g::MeanBackward0*>(n) || dynamic_cast<g::SumBackward0*>(n) ||
        dynamic_cast<g::MulBackward1*>(n) || dynamic_cast<g::DivBackward1*>(n) ||
        dynamic_cast<g::UnsafeViewBackward0*>(n) || dynamic_cast<g::ExpandBackward0*>(n) ||
        dynamic_cast<g::SqueezeBackward0*>(n) || dynamic_cast<g::UnsqueezeBackward0*>(n) ||
        dynamic_cast<g::PermuteBackward0*>(n) || dynamic_cast<g::TransposeBackward0*>(n) ||
        dynamic_cast<g::SubBackward0*>(n) || dynamic_cast<g::NegBackward0*>(n) ||
        dynamic_cast<g::CloneBackward0*>(n) || dynamic_cast<g::SliceBackward0*>(n))
        return true;
    return false;
}

} // namespace detail

/// Walks the graph behind `output` (before its backward) and counts what it keeps for backward.
inline saved_report saved_for_backward(const ::at::Tensor& output)
{
    saved_report report;
    const auto root = output.grad_fn();
    if (!root) return report;
    // Tensors compact's saved-tensor scope encoded unpack as their encodings during the walk.
    struct walking {
        walking() { detail::walking_graph() = true; }
        ~walking() { detail::walking_graph() = false; }
    } walk;
    std::vector<std::shared_ptr<::torch::autograd::Node>> stack{root};
    std::unordered_set<const ::torch::autograd::Node*> seen{root.get()};
    std::vector<::at::Tensor> kept;
    std::set<const void*> parameters;
    std::set<std::string> unknown;
    while (!stack.empty()) {
        auto node = std::move(stack.back());
        stack.pop_back();
        ++report.nodes;
        if (auto* acc = dynamic_cast<::torch::autograd::AccumulateGrad*>(node.get())) {
            if (acc->variable.defined()) parameters.insert(acc->variable.storage().data());
        } else if (!detail::node_saved(node, kept)) {
            unknown.insert(node->name());
        }
        for (const auto& edge : node->next_edges())
            if (edge.function && seen.insert(edge.function.get()).second) stack.push_back(edge.function);
    }
    std::set<const void*> counted;
    for (const auto& t : kept) {
        const void* data = t.storage().data();
        if (!counted.insert(data).second) continue;
        if (parameters.count(data)) report.parameter_bytes += t.storage().nbytes();
        else report.activation_bytes += t.storage().nbytes();
    }
    report.unknown.assign(unknown.begin(), unknown.end());
    return report;
}

} // namespace torch
COMPACT_NAMESPACE_END
