// compact/torch/linear.hpp: compact::torch::Linear, a torch::nn::Module whose backward keeps a
// compressed input (SPEC sections 2 and 8) instead of the input itself.
//
//   compact::torch::Linear<compact::rank::ratio<1, 4>> fc(compact::torch::LinearOptions(784, 256));
//   auto y = fc(x);               // x (..., 784): Y = x W^T + b exactly; keeps Z = x P (N, 196) only
//   y.sum().backward();           // x.grad exact, bias.grad exact, weight.grad = G_sub (256, 196)
//
// Parameters are registered in torch's layout: weight (out, in), bias (out), initialised like
// torch::nn::Linear. The Policy template argument is any compressor of compress/compressor.hpp: a rank
// policy (the seeded random projection), compact::quantized (an activation store) or a user's.
//
// weight.grad. Backward writes the compressor's weight gradient into weight.grad: for a subspace
// compressor (a rank policy) that is G_sub = dY^T Z = G P, shape (out, r), not (out, in): the full
// gradient is never formed. A second backward before the optimizer step adds to it (micro-batches); the
// micro-batches of one update must use one P (they do, since P changes only when the optimizer steps).
// compact::torch::SubspaceAdamW (torch/optimizer.hpp) knows how to apply it; with rank::full (P = I)
// weight.grad is the exact gradient and any torch optimizer works. weight has no autograd edge, so
// torch::autograd::grad(..., {weight}) does not see it; use weight.grad.
//
// Inputs: any leading batch dimensions; strided inputs whose rows are evenly spaced (a slice, a
// permuted batch dimension) are read in place, anything else (a transposed matrix) is copied once.
// Under torch::NoGradGuard, or in eval() mode, nothing is kept (in eval mode dX still flows, from W).
//
// Layer ids: P is keyed by (seed, layer id, epoch). A layer whose options give no id takes a fresh one,
// unique in the process, so no two layers share a P; the id, the seed and the update counter are the
// module's buffer `compact_key` (saved and restored by torch::save / torch::load with the parameters), so
// a resumed model regenerates the same P.
//
// CUDA tensors: with COMPACT_TORCH_CUDA defined (the translation unit compiled by nvcc, torch built with
// CUDA), a Linear whose weight and input are on a CUDA device compresses and computes G through
// compact::cuda on ATen's current stream and cuBLAS handle; Y, dX and db are torch's, as on the CPU. The
// optimizer's P comes from the host (kept or generated there) and is copied at every step. Without the
// macro a CUDA tensor is an error that says so.
//
// Errors: a wrong dtype, device or shape throws compact::error (a std::runtime_error) naming the function
// (compact::torch::Linear::forward), the argument and the shapes, like the rest of compact.
#pragma once

#include "compact/backend/cpu/cpu.hpp"
#include "compact/compress/compressor.hpp"
#include "compact/compress/random_projection.hpp"
#include "compact/compress/store_compressor.hpp"
#include "compact/core/config.hpp"
#include "compact/core/error.hpp"
#include "compact/core/rank_policy.hpp"
#include "compact/core/workspace.hpp"
#include "compact/nn/compressed_linear.hpp"
#include "compact/random/projection.hpp"
#include "compact/torch/detail/tensor.hpp"

#include <torch/csrc/autograd/functions/utils.h>
#include <torch/torch.h>

#ifdef COMPACT_TORCH_CUDA
#include "compact/backend/cuda/cuda.cuh"

#include <ATen/cuda/CUDAContext.h>
#endif

#include <cmath>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

COMPACT_NAMESPACE_BEGIN
namespace torch {

/// Options of a compact::torch::Linear. in_features and out_features as in torch::nn::LinearOptions.
struct LinearOptions {
    LinearOptions(int64_t in_features, int64_t out_features) : in_features_(in_features), out_features_(out_features) {}
    TORCH_ARG(int64_t, in_features);
    TORCH_ARG(int64_t, out_features);
    TORCH_ARG(bool, bias) = true;
    /// The run's seed: with the layer id and the epoch it keys P.
    TORCH_ARG(std::uint64_t, seed) = 0;
    /// The layer's id; -1 (default) takes a fresh process-unique id.
    TORCH_ARG(int64_t, layer) = -1;
    /// P's distribution (gaussian, rademacher); rank::full forces the identity.
    TORCH_ARG(compact::distribution, dist) = compact::distribution::gaussian;
    /// T: a new P every T optimizer updates (0: one P for the whole run).
    TORCH_ARG(std::uint64_t, resample_gap) = 0;
    /// Keep P (in, r) for its epoch instead of regenerating it at every forward and optimizer step:
    /// in * r values of memory per layer (a quarter of W at r = n/4) for less time per step.
    TORCH_ARG(bool, keep_projection) = true;
};

namespace detail {

template <class Policy>
class linear_state;

#ifdef COMPACT_TORCH_CUDA
/// compact's CUDA context on ATen's current stream and cuBLAS handle (ATen binds the handle to the stream).
inline compact::cuda::context aten_cuda_context()
{
    return {::at::cuda::getCurrentCUDAStream().stream(), ::at::cuda::getCurrentCUDABlasHandle()};
}
#endif

/// The backward of one Linear call: keeps the compressor's saved activation (Z for a projection) and a
/// reference to W (a parameter: no copy).
template <class Policy>
struct LinearBackward : ::torch::autograd::Node, reports_saved {
    std::shared_ptr<linear_state<Policy>> state;
    ::torch::autograd::SavedVariable weight;
    ::at::Tensor kept;                       // the saved activation's bytes, or undefined (eval mode)
    saved_activation record_base{};          // (copied into the typed record in apply)
    std::vector<std::byte> record;           // the compressor's saved_type, bytes (it is trivially copyable)
    std::vector<int64_t> input_sizes;
    ::at::ScalarType dtype = ::at::kFloat;
    bool has_bias = false;

    std::string name() const override { return "compact::torch::LinearBackward"; }
    std::vector<::at::Tensor> saved_tensors() const override
    {
        return kept.defined() ? std::vector<::at::Tensor>{kept} : std::vector<::at::Tensor>{};
    }
    void release_variables() override
    {
        weight.reset_data();
        kept.reset();
    }
    ::torch::autograd::variable_list apply(::torch::autograd::variable_list&& grads) override;
};

/// The module's shared state: its compressors (one per dtype), its key buffer, and what the optimizer
/// asks of the weight (compressed_weight).
template <class Policy>
class linear_state : public compressed_weight, public std::enable_shared_from_this<linear_state<Policy>> {
public:
    template <class T>
    using layer_type = compressed_linear<T, Policy, torch_cpu>;
#ifdef COMPACT_TORCH_CUDA
    template <class T>
    using cuda_layer_type = compressed_linear<T, Policy, compact::cuda>;

    /// The CUDA layer for dtype T (its P regenerated on the device when needed), rebuilt like layer().
    template <class T>
    const cuda_layer_type<T>& cuda_layer()
    {
        auto& slot = cuda_slot_of<T>();
        const std::uint64_t s = key_seed(), id = key_layer();
        const int k = std::is_same_v<T, double> ? 1 : 0;
        if (!slot || cuda_seeds_[k] != s || cuda_layers_[k] != id) {
            slot.emplace(in_features{in_}, out_features{out_}, s, id, policy_, dist_, resample_,
                         "compact::torch::Linear");
            cuda_seeds_[k] = s;
            cuda_layers_[k] = id;
        }
        return *slot;
    }
#endif

    linear_state(const LinearOptions& o, const Policy& policy, ::at::Tensor key, ::at::Tensor weight)
        : in_(o.in_features()), out_(o.out_features()), policy_(policy), dist_(o.dist()),
          resample_{o.resample_gap()}, keep_(o.keep_projection()), key_(std::move(key)), weight_(std::move(weight))
    {
        // Built once here so that a bad rank is reported by the constructor.
        (void)layer<float>();
    }

    std::uint64_t seed() const { return static_cast<std::uint64_t>(key_[0].item<int64_t>()); }
    std::uint64_t layer_id() const { return static_cast<std::uint64_t>(key_[1].item<int64_t>()); }
    std::uint64_t updates() const override { return static_cast<std::uint64_t>(key_[2].item<int64_t>()); }
    void set_updates(std::uint64_t u) override
    {
        ::torch::NoGradGuard guard;
        key_[2].fill_(static_cast<int64_t>(u));
    }

    /// The layer for dtype T, rebuilt when the key buffer names another seed or id (after torch::load).
    template <class T>
    const layer_type<T>& layer()
    {
        auto& slot = slot_of<T>();
        const std::uint64_t s = key_seed(), id = key_layer();
        if (!slot || built_seed_<T>() != s || built_layer_<T>() != id) {
            slot.emplace(in_features{in_}, out_features{out_}, s, id, policy_, dist_, resample_,
                         "compact::torch::Linear");
            built_seed_<T>() = s;
            built_layer_<T>() = id;
            if constexpr (layer_type<T>::subspace) {
                auto& source = slot->compressor().projection();
                if (keep_ && !source.is_identity()) {
                    ::at::Tensor& kept = kept_of<T>();
                    kept = ::at::empty({in_, source.rank()}, ::at::TensorOptions().dtype(::c10::CppTypeToScalarType<T>::value));
                    source.keep(matrix_view<T>(kept.template data_ptr<T>(), in_, source.rank()));
                }
            }
        }
        return *slot;
    }

    bool subspace() const override { return layer_type<float>::subspace; }
    bool identity() const override
    {
        if constexpr (layer_type<float>::subspace) return float_->projection().is_identity();
        else return false;
    }
    int64_t rank() const override { return float_ ? float_->rank() : in_; }
    ::at::Tensor projection(std::uint64_t epoch, ::at::ScalarType dtype) const override
    {
        if constexpr (layer_type<float>::subspace) {
            auto* self = const_cast<linear_state*>(this);
            const auto ctx = cpu_context();
            if (keep_ && (dtype == ::at::kDouble || dtype == ::at::kFloat)) {
                // The kept P, brought to this epoch (regenerated only when the epoch changed).
                ::compact::detail::workspace_carver none(workspace{}, 0, "compact::torch::Linear::projection");
                if (dtype == ::at::kDouble) (void)self->template layer<double>().projection().get(ctx, epoch, none);
                else (void)self->template layer<float>().projection().get(ctx, epoch, none);
                const ::at::Tensor& kept = dtype == ::at::kDouble ? self->kept_double_ : self->kept_float_;
                if (kept.defined()) return kept.to(weight_.device());
            }
            ::at::Tensor p = ::at::empty({in_, rank()}, ::at::TensorOptions().dtype(dtype));
            if (dtype == ::at::kDouble)
                self->template layer<double>().projection().generate(ctx, epoch, matrix_view<double>(p.data_ptr<double>(), in_, rank()));
            else
                self->template layer<float>().projection().generate(ctx, epoch, matrix_view<float>(p.data_ptr<float>(), in_, rank()));
            return p.to(weight_.device());
        } else {
            (void)epoch, (void)dtype;
            COMPACT_REQUIRE(false, "compact::torch::Linear::projection", "the layer's compressor is not a subspace one");
            return {};
        }
    }
    std::string describe() const override
    {
        return "compact::torch::Linear(" + std::to_string(in_) + " -> " + std::to_string(out_) + ", r=" +
               std::to_string(rank()) + ", layer " + std::to_string(key_layer()) + ")";
    }

    index_t in() const { return in_; }
    index_t out() const { return out_; }

private:
    std::uint64_t key_seed() const { return seed(); }
    std::uint64_t key_layer() const { return layer_id(); }
    template <class T>
    std::optional<layer_type<T>>& slot_of()
    {
        if constexpr (std::is_same_v<T, double>) return double_;
        else return float_;
    }
    template <class T>
    ::at::Tensor& kept_of()
    {
        if constexpr (std::is_same_v<T, double>) return kept_double_;
        else return kept_float_;
    }
    template <class T>
    std::uint64_t& built_seed_() { return std::is_same_v<T, double> ? seeds_[1] : seeds_[0]; }
    template <class T>
    std::uint64_t& built_layer_() { return std::is_same_v<T, double> ? layers_[1] : layers_[0]; }

    index_t in_, out_;
    Policy policy_;
    distribution dist_;
    resampling resample_;
    bool keep_;
    ::at::Tensor kept_float_, kept_double_; // P (n, r) for its epoch, when kept
    ::at::Tensor key_;    // int64 (3): seed, layer id, completed updates (bit patterns of the uint64s)
    ::at::Tensor weight_; // the parameter (same TensorImpl for the module's life)
    std::optional<layer_type<float>> float_;
    std::optional<layer_type<double>> double_;
    std::uint64_t seeds_[2] = {0, 0};
    std::uint64_t layers_[2] = {0, 0};
#ifdef COMPACT_TORCH_CUDA
    template <class T>
    std::optional<cuda_layer_type<T>>& cuda_slot_of()
    {
        if constexpr (std::is_same_v<T, double>) return cuda_double_;
        else return cuda_float_;
    }
    std::optional<cuda_layer_type<float>> cuda_float_;
    std::optional<cuda_layer_type<double>> cuda_double_;
    std::uint64_t cuda_seeds_[2] = {0, 0};
    std::uint64_t cuda_layers_[2] = {0, 0};
#endif
};

/// The weight gradient of one backward, by `fc` (the CPU or the CUDA layer) on its context, into weight.grad.
template <class Policy, class T, class Layer, class Context>
void weight_gradient(LinearBackward<Policy>& node, const Layer& fc, const Context& ctx, ::at::Tensor& w,
                     const ::at::Tensor& dy2)
{
    constexpr const char* where = "compact::torch::Linear (backward)";
    auto& st = *node.state;
    const int64_t m = st.out();
    const int64_t rows = dy2.size(0);
    ::at::Tensor dy_keep;
    const const_matrix_view<T> dy = rows_view<T>(dy2, dy_keep);
    using saved_type = typename Layer::saved_type;
    COMPACT_REQUIRE(node.record.size() == sizeof(saved_type), where, "the saved record (", node.record.size(),
                    " bytes) was written by a layer of another backend (", sizeof(saved_type), " expected)");
    // weight.grad: accumulate onto it when a backward of this update wrote it, else start afresh.
    ::at::Tensor& wg = w.mutable_grad();
    const int64_t r = fc.rank();
    saved_type saved{};
    std::memcpy(static_cast<void*>(&saved), node.record.data(), sizeof(saved_type));
    write_mode mode = write_mode::overwrite;
    ::at::Tensor g;
    if (wg.defined()) {
        COMPACT_REQUIRE(wg.dim() == 2 && wg.size(0) == m && wg.size(1) == r && wg.scalar_type() == w.scalar_type(),
                        where, "weight.grad is ", sizes_string(wg), " of ", wg.scalar_type(), " but the layer's ",
                        "gradient is (", m, ", ", r, ") of ", w.scalar_type());
        const bool consumed = st.grad_version_after_step >= 0 &&
                              static_cast<int64_t>(wg._version()) == st.grad_version_after_step;
        COMPACT_REQUIRE(!consumed || st.grad_epoch == saved.epoch, where,
                        "weight.grad still holds the gradient of epoch ", st.grad_epoch,
                        " that the optimizer applied; call zero_grad() after step() before this backward (epoch ",
                        saved.epoch, ")");
        g = wg.is_contiguous() ? wg : wg.contiguous();
        mode = write_mode::accumulate;
    } else {
        g = ::at::empty({m, r}, w.options());
    }
    ::at::Tensor ws = ::at::empty({static_cast<int64_t>(fc.workspace_bytes(rows))},
                                  ::at::TensorOptions().dtype(::at::kByte).device(dy2.device()));
    saved.data = static_cast<std::byte*>(node.kept.data_ptr());
    fc.compressor().weight_gradient(ctx, dy, saved, matrix_view<T>(g.template data_ptr<T>(), m, r), mode,
                                    {ws.data_ptr(), static_cast<std::size_t>(ws.numel())});
    if (!wg.defined() || !wg.is_same(g)) wg = g;
    st.grad_written = true;
    st.grad_epoch = saved.epoch;
    st.grad_version_after_step = -1;
}

template <class Policy, class T>
::torch::autograd::variable_list linear_backward(LinearBackward<Policy>& node, ::at::Tensor dy_in)
{
    auto& st = *node.state;
    ::at::Tensor w = node.weight.unpack();
    const int64_t m = st.out();
    const int64_t rows = m == 0 ? 0 : dy_in.numel() / m;
    const ::at::Tensor dy2 = dy_in.reshape({rows, m});

    // dX = dY W and db = column sums of dY are exact and do not depend on the compressor: torch computes
    // them (its BLAS, as nn::Linear's backward); the compressor computes the weight gradient.
    ::at::Tensor dx = node.should_compute_output(0) ? dy2.mm(w) : ::at::Tensor();
    ::at::Tensor db = node.has_bias && node.should_compute_output(1) ? dy2.sum(0) : ::at::Tensor();
    if (node.kept.defined()) {
        if (dy2.is_cuda()) {
#ifdef COMPACT_TORCH_CUDA
            weight_gradient<Policy, T>(node, st.template cuda_layer<T>(), aten_cuda_context(), w, dy2);
#endif
        } else {
            weight_gradient<Policy, T>(node, st.template layer<T>(), cpu_context(), w, dy2);
        }
    }
    if (dx.defined()) dx = dx.view(node.input_sizes);
    return {dx, db};
}

template <class Policy>
::torch::autograd::variable_list LinearBackward<Policy>::apply(::torch::autograd::variable_list&& grads)
{
    COMPACT_REQUIRE(weight.unpack().defined(), "compact::torch::Linear (backward)",
                    "the saved tensors were freed by an earlier backward (pass retain_graph=true to backward twice)");
    const ::at::Tensor& dy = grads.at(0);
    if (!dy.defined()) return {::at::Tensor(), ::at::Tensor()};
    const ::at::Tensor dyc = dy.scalar_type() == dtype ? dy : dy.to(dtype);
    if (dtype == ::at::kDouble) return linear_backward<Policy, double>(*this, dyc);
    return linear_backward<Policy, float>(*this, dyc);
}

} // namespace detail

/// The module (use it through the holder Linear<Policy> below, like torch::nn::Linear).
template <class Policy = rank::ratio<1, 4>>
class LinearImpl : public ::torch::nn::Module {
public:
    using policy_type = Policy;

    explicit LinearImpl(const LinearOptions& options_, const Policy& policy = Policy{}) : options(options_)
    {
        constexpr const char* where = "compact::torch::Linear";
        COMPACT_REQUIRE(options.in_features() >= 1, where, "in_features=", options.in_features(), " must be positive");
        COMPACT_REQUIRE(options.out_features() >= 1, where, "out_features=", options.out_features(),
                        " must be positive");
        weight = register_parameter("weight", ::torch::empty({options.out_features(), options.in_features()}));
        if (options.bias()) bias = register_parameter("bias", ::torch::empty({options.out_features()}));
        const std::uint64_t id =
            options.layer() >= 0 ? static_cast<std::uint64_t>(options.layer()) : detail::next_layer_id();
        compact_key = register_buffer(
            "compact_key", ::torch::tensor({static_cast<int64_t>(options.seed()), static_cast<int64_t>(id), int64_t{0}},
                                           ::torch::kInt64));
        state_ = std::make_shared<detail::linear_state<Policy>>(options, policy, compact_key, weight);
        detail::register_weight(weight, state_);
        reset_parameters();
    }

    /// torch::nn::Linear's initialisation: U(-1/sqrt(in), 1/sqrt(in)) for weight and bias.
    void reset_parameters()
    {
        ::torch::NoGradGuard guard;
        ::torch::nn::init::kaiming_uniform_(weight, std::sqrt(5.0));
        if (bias.defined()) {
            const double bound = 1.0 / std::sqrt(static_cast<double>(options.in_features()));
            ::torch::nn::init::uniform_(bias, -bound, bound);
        }
    }

    /// Y = input W^T + b, input (..., in_features) -> (..., out_features).
    ::at::Tensor forward(const ::at::Tensor& input)
    {
        constexpr const char* where = "compact::torch::Linear::forward";
        detail::check_tensor(input, weight, where, "input");
        COMPACT_REQUIRE(input.dim() >= 1 && input.size(-1) == options.in_features(), where, "input is ",
                        detail::sizes_string(input), " but the layer expects (..., ", options.in_features(), ")");
        if (bias.defined()) detail::check_tensor(bias, weight, where, "bias");
        if (weight.scalar_type() == ::at::kDouble) return run<double>(input);
        return run<float>(input);
    }

    /// Bytes one forward of N rows keeps for backward (the compressor's saved_bytes).
    std::size_t saved_bytes(int64_t rows)
    {
        return weight.scalar_type() == ::at::kDouble ? state_->template layer<double>().saved_bytes(rows)
                                                     : state_->template layer<float>().saved_bytes(rows);
    }
    /// Columns of weight.grad: r for a subspace compressor, in_features otherwise.
    int64_t rank() const { return state_->rank(); }
    /// P (in, r) of the current epoch (subspace compressors), in the weight's dtype.
    ::at::Tensor projection() const
    {
        return state_->projection(resampling{options.resample_gap()}.epoch(state_->updates()), weight.scalar_type());
    }
    std::uint64_t layer_id() const { return state_->layer_id(); }
    std::uint64_t updates() const { return state_->updates(); }

    void pretty_print(std::ostream& stream) const override { stream << state_->describe(); }

    LinearOptions options;
    ::at::Tensor weight;      ///< (out_features, in_features)
    ::at::Tensor bias;        ///< (out_features), or undefined
    ::at::Tensor compact_key; ///< int64 (3): seed, layer id, completed optimizer updates

private:
    template <class T>
    ::at::Tensor run(const ::at::Tensor& input)
    {
        constexpr const char* where = "compact::torch::Linear::forward";
        const int64_t m = options.out_features();
        const bool grad_mode = ::torch::GradMode::is_enabled();
        const bool need_weight = grad_mode && is_training() && weight.requires_grad();
        const bool need_bias = grad_mode && bias.defined() && bias.requires_grad();
        const bool need_input = grad_mode && input.requires_grad();

        ::at::Tensor x_keep;
        const const_matrix_view<T> x = detail::rows_view<T>(input, x_keep);
        std::vector<int64_t> out_sizes = input.sizes().vec();
        out_sizes.back() = m;
        ::at::Tensor y = ::at::empty({x.rows, m}, weight.options().requires_grad(false));

        // The compressor's saved activation, on the input's device, by the CPU or the CUDA layer.
        ::at::Tensor kept;
        std::vector<std::byte> record;
        auto compress = [&](const auto& fc, const auto& ctx) {
            using saved_type = typename std::decay_t<decltype(fc)>::saved_type;
            static_assert(std::is_trivially_copyable_v<saved_type>,
                          "compact::torch: a saved_type must be trivially copyable");
            const auto bytes = ::at::TensorOptions().dtype(::at::kByte).device(input.device());
            kept = ::at::empty({static_cast<int64_t>(fc.saved_bytes(x.rows))}, bytes);
            saved_type saved = bind_saved<saved_type>(kept.data_ptr(), static_cast<std::size_t>(kept.numel()));
            ::at::Tensor ws = ::at::empty({static_cast<int64_t>(fc.workspace_bytes(x.rows))}, bytes);
            fc.compressor().compress(ctx, x, state_->updates(), saved,
                                     {ws.data_ptr(), static_cast<std::size_t>(ws.numel())});
            record.resize(sizeof(saved_type));
            std::memcpy(record.data(), static_cast<const void*>(&saved), sizeof(saved_type));
        };
        if (need_weight) {
            if (input.is_cuda()) {
#ifdef COMPACT_TORCH_CUDA
                compress(state_->template cuda_layer<T>(), detail::aten_cuda_context());
#endif
            } else {
                compress(state_->template layer<T>(), detail::cpu_context());
            }
        }
        // Y = X W^T + b exactly, by torch (its BLAS, as nn::Linear): it does not depend on the compressor.
        {
            ::torch::NoGradGuard guard;
            const std::vector<int64_t> flat{x.rows, options.in_features()};
            const ::at::Tensor x2 = input.reshape(flat);
            if (bias.defined()) ::at::addmm_out(y, bias, x2, weight.t());
            else ::at::mm_out(y, x2, weight.t());
        }
        y = y.view(out_sizes);
        if (!(need_weight || need_bias || need_input)) return y;

        auto node = std::shared_ptr<detail::LinearBackward<Policy>>(new detail::LinearBackward<Policy>(),
                                                                     ::torch::autograd::deleteNode);
        node->state = state_;
        node->weight = ::torch::autograd::SavedVariable(weight, false);
        node->kept = kept;
        node->record = std::move(record);
        node->input_sizes = input.sizes().vec();
        node->dtype = weight.scalar_type();
        node->has_bias = bias.defined();
        const ::at::Tensor no_input = need_input ? input : ::at::Tensor();
        const ::at::Tensor no_bias = need_bias ? bias : ::at::Tensor();
        node->set_next_edges(::torch::autograd::collect_next_edges(no_input, no_bias));
        ::torch::autograd::set_history(y, node);
        (void)where;
        return y;
    }

    std::shared_ptr<detail::linear_state<Policy>> state_;
};

/// The module holder, as torch::nn::Linear is for LinearImpl: `Linear<rank::ratio<1, 4>> fc(LinearOptions(n, m));`
template <class Policy = rank::ratio<1, 4>>
class Linear : public ::torch::nn::ModuleHolder<LinearImpl<Policy>> {
public:
    using ::torch::nn::ModuleHolder<LinearImpl<Policy>>::ModuleHolder;
    using Impl = LinearImpl<Policy>;
};

} // namespace torch
COMPACT_NAMESPACE_END
