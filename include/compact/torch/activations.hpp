// compact/torch/activations.hpp: ReLU and Dropout modules that keep a 1-bit mask for backward
// (ActNN / GACT, compress/mask.hpp) instead of a tensor of values; GELU and SiLU modules that keep their
// input through an activation store (8-bit codes by default) instead of the input itself.
//
// torch's ReLU keeps its output for backward: when a compact::torch::Linear reads that output, the
// output stays alive and the Linear's compression saves nothing. compact::torch::ReLU keeps one bit per
// value, (numel + 7) / 8 bytes, so the activation between two compressed layers is freed after forward:
//
//   auto h = relu(fc1(x));      // keeps Z1 and a mask: h is not kept by anyone
//   auto y = fc2(h);            // keeps Z2
//
// Dropout(p) keeps the same mask; its noise is keyed by (seed, id, call count), so a run repeats bit for
// bit. Both accept any shape, float or double, on the CPU (a non-contiguous input is copied once); in
// eval mode Dropout is the identity, and without grad neither keeps anything. Errors throw compact::error.
//
// GELU (torch's exact, erf form) and SiLU compute the output as torch does, and keep the input encoded
// with StoredActivationOptions' scheme: quantized(8) keeps 8.125 bits per value (4x less than float),
// unbiased, so dX = dY f'(x^) has the error of f' at a rounding of x; full_precision() keeps x itself
// and backward equals torch's. Noise keyed by (seed, id, call count), as Dropout's.
#pragma once

#include "compact/backend/cpu/cpu.hpp"
#include "compact/backend/store_scheme.hpp"
#include "compact/compress/mask.hpp"
#include "compact/core/config.hpp"
#include "compact/core/error.hpp"
#include "compact/torch/detail/encoded.hpp"
#include "compact/torch/detail/tensor.hpp"

#include <torch/csrc/autograd/functions/utils.h>
#include <torch/torch.h>

#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

COMPACT_NAMESPACE_BEGIN
namespace torch {
namespace detail {

/// Backward of a masked ReLU or Dropout: dX = dY * scale where the mask is set, 0 elsewhere.
struct MaskBackward : ::torch::autograd::Node, reports_saved {
    ::at::Tensor mask; // uint8, (numel + 7) / 8
    double scale = 1.0;
    const char* what = "compact::torch::ReLUBackward";

    std::string name() const override { return what; }
    std::vector<::at::Tensor> saved_tensors() const override
    {
        return mask.defined() ? std::vector<::at::Tensor>{mask} : std::vector<::at::Tensor>{};
    }
    void release_variables() override { mask.reset(); }

    ::torch::autograd::variable_list apply(::torch::autograd::variable_list&& grads) override
    {
        COMPACT_REQUIRE(mask.defined(), what, "the mask was freed by an earlier backward (retain_graph=true keeps it)");
        const ::at::Tensor& dy_in = grads.at(0);
        if (!dy_in.defined() || !should_compute_output(0)) return {::at::Tensor()};
        const ::at::Tensor dy = dy_in.contiguous();
        ::at::Tensor dx = ::at::empty_like(dy, ::at::MemoryFormat::Contiguous);
        const auto ctx = cpu_context();
        const index_t n = dy.numel();
        if (dy.scalar_type() == ::at::kDouble)
            cpu::template apply_mask<double>(ctx, mask.data_ptr<std::uint8_t>(), scale, {dy.data_ptr<double>(), 1, n},
                                             {dx.data_ptr<double>(), 1, n});
        else
            cpu::template apply_mask<float>(ctx, mask.data_ptr<std::uint8_t>(), scale, {dy.data_ptr<float>(), 1, n},
                                            {dx.data_ptr<float>(), 1, n});
        return {dx};
    }
};

template <class T>
::at::Tensor masked(const ::at::Tensor& input, const char* where, double p, const noise_key* key, const char* node_name)
{
    const ::at::Tensor x = input.contiguous();
    ::at::Tensor y = ::at::empty_like(x, ::at::MemoryFormat::Contiguous).set_requires_grad(false);
    const bool record = ::torch::GradMode::is_enabled() && input.requires_grad();
    const index_t n = x.numel();
    ::at::Tensor mask = ::at::empty({static_cast<int64_t>(mask_bytes(1, n))}, ::at::kByte);
    const auto ctx = cpu_context();
    const const_matrix_view<T> xv(x.template data_ptr<T>(), 1, n);
    const matrix_view<T> yv(y.template data_ptr<T>(), 1, n);
    const mask_span span{mask.data_ptr<std::uint8_t>(), static_cast<std::size_t>(mask.numel())};
    if (n > 0) {
        if (key) dropout_forward<cpu, T>(ctx, p, *key, xv, yv, span);
        else relu_forward<cpu, T>(ctx, xv, yv, span);
    }
    (void)where;
    if (!record) return y;
    auto node = std::shared_ptr<MaskBackward>(new MaskBackward(), ::torch::autograd::deleteNode);
    node->mask = mask;
    node->scale = key ? 1.0 / (1.0 - p) : 1.0;
    node->what = node_name;
    node->set_next_edges(::torch::autograd::collect_next_edges(input));
    ::torch::autograd::set_history(y, node);
    return y;
}

inline void check_activation_input(const ::at::Tensor& input, const char* where)
{
    COMPACT_REQUIRE(input.defined(), where, "input is undefined");
    COMPACT_REQUIRE(input.device().is_cpu(), where, "input is on ", input.device(), ": these modules run on the CPU");
    COMPACT_REQUIRE(input.scalar_type() == ::at::kFloat || input.scalar_type() == ::at::kDouble, where,
                    "input has dtype ", input.scalar_type(), ": float or double expected");
}

enum class smooth_kind { gelu, silu };

/// f'(x) of GELU (erf form) or SiLU.
template <class T>
T smooth_derivative(smooth_kind kind, T x)
{
    if (kind == smooth_kind::gelu) {
        const T cdf = T(0.5) * (T(1) + std::erf(x * T(0.70710678118654752440)));
        const T pdf = std::exp(T(-0.5) * x * x) * T(0.39894228040143267794);
        return cdf + x * pdf;
    }
    const T s = T(1) / (T(1) + std::exp(-x));
    return s * (T(1) + x * (T(1) - s));
}

/// Backward of GELU or SiLU from the encoded input: dX = dY f'(x^).
struct SmoothBackward : ::torch::autograd::Node, reports_saved {
    encoded_tensor input;
    smooth_kind kind = smooth_kind::gelu;
    const char* what = "compact::torch::GELUBackward";

    std::string name() const override { return what; }
    std::vector<::at::Tensor> saved_tensors() const override
    {
        return input.defined() ? std::vector<::at::Tensor>{input.bytes} : std::vector<::at::Tensor>{};
    }
    void release_variables() override { input = encoded_tensor{}; }

    ::torch::autograd::variable_list apply(::torch::autograd::variable_list&& grads) override
    {
        COMPACT_REQUIRE(input.defined(), what, "the input was freed by an earlier backward (retain_graph=true keeps it)");
        const ::at::Tensor& dy_in = grads.at(0);
        if (!dy_in.defined() || !should_compute_output(0)) return {::at::Tensor()};
        const ::at::Tensor dy = dy_in.contiguous();
        ::at::Tensor dx = decode(input); // x^, overwritten by dX
        const int64_t n = dx.numel();
        auto run = [&](auto zero) {
            using T = decltype(zero);
            T* xd = dx.data_ptr<T>();
            const T* g = dy.data_ptr<T>();
            ::at::parallel_for(0, n, 4096, [&](int64_t i0, int64_t i1) {
                for (int64_t i = i0; i < i1; ++i) xd[i] = g[i] * smooth_derivative<T>(kind, xd[i]);
            });
        };
        if (dx.scalar_type() == ::at::kDouble) run(double{});
        else run(float{});
        return {dx};
    }
};

} // namespace detail

/// max(x, 0), keeping a 1-bit mask for backward.
class ReLUImpl : public ::torch::nn::Cloneable<ReLUImpl> {
public:
    ReLUImpl() = default;
    void reset() override {}
    ::at::Tensor forward(const ::at::Tensor& input)
    {
        constexpr const char* where = "compact::torch::ReLU::forward";
        detail::check_activation_input(input, where);
        if (input.scalar_type() == ::at::kDouble)
            return detail::masked<double>(input, where, 0.0, nullptr, "compact::torch::ReLUBackward");
        return detail::masked<float>(input, where, 0.0, nullptr, "compact::torch::ReLUBackward");
    }
    void pretty_print(std::ostream& stream) const override { stream << "compact::torch::ReLU(1-bit mask)"; }
};
/// The module holder (TORCH_MODULE names ::torch unqualified, which this namespace shadows).
class ReLU : public ::torch::nn::ModuleHolder<ReLUImpl> {
public:
    using ::torch::nn::ModuleHolder<ReLUImpl>::ModuleHolder;
    using Impl = ReLUImpl;
};

struct DropoutOptions {
    DropoutOptions(double p = 0.5) : p_(p) {} // NOLINT(google-explicit-constructor): as torch's
    TORCH_ARG(double, p) = 0.5;
    TORCH_ARG(std::uint64_t, seed) = 0;
    /// The noise stream's id; -1 (default) takes a fresh process-unique id.
    TORCH_ARG(int64_t, id) = -1;
};

/// Inverted dropout keeping a 1-bit mask; the identity in eval mode.
class DropoutImpl : public ::torch::nn::Cloneable<DropoutImpl> {
public:
    explicit DropoutImpl(const DropoutOptions& options_ = {}) : options(options_)
    {
        COMPACT_REQUIRE(options.p() >= 0 && options.p() < 1, "compact::torch::Dropout", "p=", options.p(),
                        " must be in [0, 1)");
        id_ = options.id() >= 0 ? static_cast<std::uint64_t>(options.id()) : detail::next_layer_id();
        calls = register_buffer("calls", ::torch::zeros({1}, ::torch::kInt64));
    }
    void reset() override {}
    ::at::Tensor forward(const ::at::Tensor& input)
    {
        constexpr const char* where = "compact::torch::Dropout::forward";
        detail::check_activation_input(input, where);
        if (!is_training() || options.p() == 0) return input;
        const std::uint64_t call = static_cast<std::uint64_t>(calls[0].item<int64_t>());
        calls.add_(1);
        const noise_key key{options.seed(), id_, call % (std::uint64_t{1} << 32), 0};
        if (input.scalar_type() == ::at::kDouble)
            return detail::masked<double>(input, where, options.p(), &key, "compact::torch::DropoutBackward");
        return detail::masked<float>(input, where, options.p(), &key, "compact::torch::DropoutBackward");
    }
    void pretty_print(std::ostream& stream) const override
    {
        stream << "compact::torch::Dropout(p=" << options.p() << ", 1-bit mask)";
    }

    DropoutOptions options;
    ::at::Tensor calls; ///< int64 (1): forwards so far (the noise step), saved with the model

private:
    std::uint64_t id_ = 0;
};
/// The module holder (TORCH_MODULE names ::torch unqualified, which this namespace shadows).
class Dropout : public ::torch::nn::ModuleHolder<DropoutImpl> {
public:
    using ::torch::nn::ModuleHolder<DropoutImpl>::ModuleHolder;
    using Impl = DropoutImpl;
};

/// Options of GELU and SiLU: how their input is kept.
struct StoredActivationOptions {
    StoredActivationOptions(store_scheme scheme = store_scheme::quantized(8)) // NOLINT(google-explicit-constructor)
        : scheme_(scheme)
    {
    }
    TORCH_ARG(store_scheme, scheme);
    TORCH_ARG(std::uint64_t, seed) = 0;
    /// The noise stream's id; -1 (default) takes a fresh process-unique id.
    TORCH_ARG(int64_t, id) = -1;
};

/// GELU or SiLU keeping its input through an activation store (GELUImpl, SiLUImpl below).
template <detail::smooth_kind Kind>
class StoredActivationImpl : public ::torch::nn::Cloneable<StoredActivationImpl<Kind>> {
public:
    explicit StoredActivationImpl(const StoredActivationOptions& options_ = {}) : options(options_)
    {
        compact::detail::check_scheme(options.scheme(),
                             Kind == detail::smooth_kind::gelu ? "compact::torch::GELU" : "compact::torch::SiLU");
        id_ = options.id() >= 0 ? static_cast<std::uint64_t>(options.id()) : detail::next_layer_id();
        calls = this->register_buffer("calls", ::torch::zeros({1}, ::torch::kInt64));
    }
    void reset() override {}
    ::at::Tensor forward(const ::at::Tensor& input)
    {
        detail::check_activation_input(input, where());
        ::at::Tensor y;
        {
            ::torch::NoGradGuard no_grad;
            y = Kind == detail::smooth_kind::gelu ? ::at::gelu(input) : ::at::silu(input);
        }
        if (!::torch::GradMode::is_enabled() || !input.requires_grad()) return y;
        const auto call = static_cast<std::uint64_t>(calls[0].item<int64_t>());
        calls.add_(1);
        auto node = std::shared_ptr<detail::SmoothBackward>(new detail::SmoothBackward(), ::torch::autograd::deleteNode);
        node->input = detail::encode(input, store_settings{options.scheme(), 0}, options.seed(), id_,
                                     call % (std::uint64_t{1} << 32));
        node->kind = Kind;
        node->what = Kind == detail::smooth_kind::gelu ? "compact::torch::GELUBackward" : "compact::torch::SiLUBackward";
        node->set_next_edges(::torch::autograd::collect_next_edges(input));
        ::torch::autograd::set_history(y, node);
        return y;
    }
    void pretty_print(std::ostream& stream) const override
    {
        stream << (Kind == detail::smooth_kind::gelu ? "compact::torch::GELU(" : "compact::torch::SiLU(")
               << to_string(options.scheme()) << " input)";
    }

    StoredActivationOptions options;
    ::at::Tensor calls; ///< int64 (1): recorded forwards so far (the noise step), saved with the model

private:
    static const char* where()
    {
        return Kind == detail::smooth_kind::gelu ? "compact::torch::GELU::forward" : "compact::torch::SiLU::forward";
    }
    std::uint64_t id_ = 0;
};

using GELUImpl = StoredActivationImpl<detail::smooth_kind::gelu>;
using SiLUImpl = StoredActivationImpl<detail::smooth_kind::silu>;
/// The module holders (TORCH_MODULE names ::torch unqualified, which this namespace shadows).
class GELU : public ::torch::nn::ModuleHolder<GELUImpl> {
public:
    using ::torch::nn::ModuleHolder<GELUImpl>::ModuleHolder;
    using Impl = GELUImpl;
};
class SiLU : public ::torch::nn::ModuleHolder<SiLUImpl> {
public:
    using ::torch::nn::ModuleHolder<SiLUImpl>::ModuleHolder;
    using Impl = SiLUImpl;
};

} // namespace torch
COMPACT_NAMESPACE_END
