// compact/torch/optimizer.hpp: compact::torch::SubspaceAdamW, a torch::optim::Optimizer that trains
// compact::torch::Linear weights in their projection subspace (SPEC section 3) and every other parameter
// with plain AdamW, in one optimizer.
//
//   compact::torch::SubspaceAdamW opt(model->parameters(), compact::torch::SubspaceAdamWOptions(1e-2).alpha(0.25));
//   for (...) { opt.zero_grad(); loss(model(x)).backward(); opt.step(); }
//
// For a compressed weight W (m, n) with weight.grad = G_sub (m, r) (torch/linear.hpp), moments M and V
// are (m, r), and the update goes back through P^T with the P the forward used:
//   M <- b1 M + (1 - b1) G_sub        V <- b2 V + (1 - b2) G_sub^2        t <- t + 1
//   default (compact, SPEC 3):   W <- (1 - lr wd) (W - lr sqrt(1 - b2^t) / (1 - b1^t) alpha (M / (sqrt(V) + eps)) P^T)
//   torch_compatible(true):      W <- (1 - lr wd) W - lr / (1 - b1^t) alpha (M / (sqrt(V) / sqrt(1 - b2^t) + eps)) P^T
// Every other parameter (biases, norms, embeddings, a rank::full weight whose P = I) takes the same rule
// with alpha = 1 and P = I; in torch_compatible mode that is torch::optim::AdamW's step, operation for
// operation (eps added after dividing by sqrt(1 - b2^t), decay applied before the update), so it gives
// torch::optim::AdamW's bits. Each step advances the update counter of the layers it updated, which sets
// the epoch (P) of their next forward.
//
// Parameter groups carry their own SubspaceAdamWOptions (lr, betas, eps, weight_decay, alpha, ...);
// LR schedulers (torch::optim::StepLR) work through get_lr / set_lr. zero_grad is torch's. Gradient
// accumulation: several backwards before one step add into weight.grad, and must share P (they do: P
// changes only at a step). State (t, epoch, M, V per parameter; each group's options) is saved and
// loaded by torch::save(optimizer, path) / torch::load(optimizer, path), bit for bit; save the model
// (its compact_key buffers hold the layer ids and update counters) with it.
//
// Moments are kept in the parameter's dtype (float or double). Errors throw compact::error naming
// compact::torch::SubspaceAdamW::step, the parameter and the shapes.
#pragma once

#include "compact/core/config.hpp"
#include "compact/core/error.hpp"
#include "compact/optim/adamw.hpp"
#include "compact/torch/detail/tensor.hpp"

#include <torch/torch.h>

#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

COMPACT_NAMESPACE_BEGIN
namespace torch {

struct SubspaceAdamWOptions : public ::torch::optim::OptimizerCloneableOptions<SubspaceAdamWOptions> {
    SubspaceAdamWOptions(double lr = 1e-3) : lr_(lr) {} // NOLINT(google-explicit-constructor): as torch's
    TORCH_ARG(double, lr) = 1e-3;
    typedef std::tuple<double, double> betas_t;
    TORCH_ARG(betas_t, betas) = std::make_tuple(0.9, 0.999);
    /// compact's default 1e-6 (SPEC 3); torch::optim::AdamW's is 1e-8.
    TORCH_ARG(double, eps) = 1e-6;
    /// Decoupled; compact's default 0 (torch::optim::AdamW's is 1e-2).
    TORCH_ARG(double, weight_decay) = 0.0;
    /// The subspace scale of compressed weights (0.25 for the paper's pretraining); others ignore it.
    TORCH_ARG(double, alpha) = 1.0;
    /// true: torch::optim::AdamW's arithmetic (see the top of this header).
    TORCH_ARG(bool, torch_compatible) = false;
    /// What the moments of a compressed weight do when P is resampled (keep, reset or transfer).
    TORCH_ARG(compact::moment_policy, moments) = compact::moment_policy::keep;

public:
    double get_lr() const override { return lr(); }
    void set_lr(const double lr) override { this->lr(lr); }

    void serialize(::torch::serialize::OutputArchive& archive) const override
    {
        archive.write("lr", ::c10::IValue(lr()));
        archive.write("beta1", ::c10::IValue(std::get<0>(betas())));
        archive.write("beta2", ::c10::IValue(std::get<1>(betas())));
        archive.write("eps", ::c10::IValue(eps()));
        archive.write("weight_decay", ::c10::IValue(weight_decay()));
        archive.write("alpha", ::c10::IValue(alpha()));
        archive.write("torch_compatible", ::c10::IValue(torch_compatible()));
        archive.write("moments", ::c10::IValue(static_cast<int64_t>(moments())));
    }
    void serialize(::torch::serialize::InputArchive& archive) override
    {
        ::c10::IValue v;
        archive.read("lr", v), lr(v.toDouble());
        double b1 = 0, b2 = 0;
        archive.read("beta1", v), b1 = v.toDouble();
        archive.read("beta2", v), b2 = v.toDouble();
        betas(std::make_tuple(b1, b2));
        archive.read("eps", v), eps(v.toDouble());
        archive.read("weight_decay", v), weight_decay(v.toDouble());
        archive.read("alpha", v), alpha(v.toDouble());
        archive.read("torch_compatible", v), torch_compatible(v.toBool());
        archive.read("moments", v), moments(static_cast<compact::moment_policy>(v.toInt()));
    }
};

struct SubspaceAdamWParamState : public ::torch::optim::OptimizerCloneableParamState<SubspaceAdamWParamState> {
    TORCH_ARG(int64_t, step) = 0;
    /// The epoch of the P the moments were accumulated under (compressed weights).
    TORCH_ARG(int64_t, epoch) = 0;
    TORCH_ARG(::at::Tensor, exp_avg);    ///< M: (m, r) for a compressed weight, the parameter's shape otherwise
    TORCH_ARG(::at::Tensor, exp_avg_sq); ///< V: likewise

public:

    void serialize(::torch::serialize::OutputArchive& archive) const override
    {
        archive.write("step", ::c10::IValue(step()));
        archive.write("epoch", ::c10::IValue(epoch()));
        archive.write("exp_avg", exp_avg());
        archive.write("exp_avg_sq", exp_avg_sq());
    }
    void serialize(::torch::serialize::InputArchive& archive) override
    {
        ::c10::IValue v;
        archive.read("step", v), step(v.toInt());
        archive.read("epoch", v), epoch(v.toInt());
        ::at::Tensor m, s;
        archive.read("exp_avg", m), exp_avg(m);
        archive.read("exp_avg_sq", s), exp_avg_sq(s);
    }
};

class SubspaceAdamW : public ::torch::optim::Optimizer {
public:
    explicit SubspaceAdamW(std::vector<::torch::optim::OptimizerParamGroup> param_groups,
                           SubspaceAdamWOptions defaults = {})
        : Optimizer(std::move(param_groups), std::make_unique<SubspaceAdamWOptions>(defaults))
    {
        check_options(defaults, "defaults");
        for (auto& g : param_groups_) check_options(static_cast<const SubspaceAdamWOptions&>(g.options()), "a group");
    }
    explicit SubspaceAdamW(std::vector<::at::Tensor> params, SubspaceAdamWOptions defaults = {})
        : SubspaceAdamW({::torch::optim::OptimizerParamGroup(std::move(params))}, std::move(defaults))
    {
    }

    ::at::Tensor step(LossClosure closure = nullptr) override
    {
        ::torch::NoGradGuard no_grad;
        ::at::Tensor loss;
        if (closure) {
            ::at::AutoGradMode enable_grad(true);
            loss = closure();
        }
        for (auto& group : param_groups_) {
            const auto& o = static_cast<const SubspaceAdamWOptions&>(group.options());
            check_options(o, "a group");
            for (auto& p : group.params()) {
                if (!p.grad().defined()) continue;
                update(p, o);
            }
        }
        return loss;
    }

    /// Every group's options and every parameter's state, by position (group g, parameter i).
    void save(::torch::serialize::OutputArchive& archive) const override
    {
        archive.write("compact_subspace_adamw", ::c10::IValue(int64_t{1}));
        archive.write("groups", ::c10::IValue(static_cast<int64_t>(param_groups_.size())));
        for (std::size_t g = 0; g < param_groups_.size(); ++g) {
            const auto& group = param_groups_[g];
            ::torch::serialize::OutputArchive options_archive(archive.compilation_unit());
            group.options().serialize(options_archive);
            archive.write("group/" + std::to_string(g) + "/options", options_archive);
            archive.write("group/" + std::to_string(g) + "/params", ::c10::IValue(static_cast<int64_t>(group.params().size())));
            for (std::size_t i = 0; i < group.params().size(); ++i) {
                const auto it = state_.find(key(group.params()[i]));
                if (it == state_.end()) continue;
                ::torch::serialize::OutputArchive state_archive(archive.compilation_unit());
                it->second->serialize(state_archive);
                archive.write("group/" + std::to_string(g) + "/state/" + std::to_string(i), state_archive);
            }
        }
    }

    void load(::torch::serialize::InputArchive& archive) override
    {
        constexpr const char* where = "compact::torch::SubspaceAdamW::load";
        ::c10::IValue v;
        COMPACT_REQUIRE(archive.try_read("compact_subspace_adamw", v), where,
                        "the archive was not written by compact::torch::SubspaceAdamW::save");
        archive.read("groups", v);
        COMPACT_REQUIRE(v.toInt() == static_cast<int64_t>(param_groups_.size()), where, "the archive holds ",
                        v.toInt(), " parameter groups but this optimizer has ", param_groups_.size());
        for (std::size_t g = 0; g < param_groups_.size(); ++g) {
            auto& group = param_groups_[g];
            archive.read("group/" + std::to_string(g) + "/params", v);
            COMPACT_REQUIRE(v.toInt() == static_cast<int64_t>(group.params().size()), where, "group ", g, " holds ",
                            v.toInt(), " parameters in the archive but ", group.params().size(), " here");
            ::torch::serialize::InputArchive options_archive;
            archive.read("group/" + std::to_string(g) + "/options", options_archive);
            group.options().serialize(options_archive);
            for (std::size_t i = 0; i < group.params().size(); ++i) {
                const auto& p = group.params()[i];
                ::torch::serialize::InputArchive state_archive;
                if (!archive.try_read("group/" + std::to_string(g) + "/state/" + std::to_string(i), state_archive)) {
                    state_.erase(key(p));
                    continue;
                }
                auto s = std::make_unique<SubspaceAdamWParamState>();
                s->serialize(state_archive);
                const auto expected = moment_shape(p);
                COMPACT_REQUIRE(s->exp_avg().sizes() == ::at::IntArrayRef(expected), where, "the moments of group ",
                                g, " parameter ", i, " are ", detail::sizes_string(s->exp_avg()), " but the parameter ",
                                "needs ", detail::sizes_string(::at::empty(expected)));
                s->exp_avg(s->exp_avg().to(p.device()));
                s->exp_avg_sq(s->exp_avg_sq().to(p.device()));
                state_[key(p)] = std::move(s);
            }
        }
    }

private:
    static std::string key(const ::at::Tensor& p) { return ::c10::guts::to_string(p.unsafeGetTensorImpl()); }

    static std::vector<int64_t> moment_shape(const ::at::Tensor& p)
    {
        if (const auto cw = detail::find_weight(p); cw && cw->subspace()) return {p.size(0), cw->rank()};
        return p.sizes().vec();
    }

    static void check_options(const SubspaceAdamWOptions& o, const char* which)
    {
        constexpr const char* where = "compact::torch::SubspaceAdamW";
        COMPACT_REQUIRE(o.lr() >= 0 && std::isfinite(o.lr()), where, which, ": lr=", o.lr(), " must be finite and >= 0");
        const double b1 = std::get<0>(o.betas()), b2 = std::get<1>(o.betas());
        COMPACT_REQUIRE(b1 >= 0 && b1 < 1 && b2 >= 0 && b2 < 1, where, which, ": betas=(", b1, ", ", b2,
                        ") must be in [0, 1)");
        COMPACT_REQUIRE(o.eps() > 0 && std::isfinite(o.eps()), where, which, ": eps=", o.eps(), " must be positive");
        COMPACT_REQUIRE(o.weight_decay() >= 0 && std::isfinite(o.weight_decay()), where, which,
                        ": weight_decay=", o.weight_decay(), " must be finite and >= 0");
        COMPACT_REQUIRE(o.alpha() > 0 && std::isfinite(o.alpha()), where, which, ": alpha=", o.alpha(),
                        " must be positive");
    }

    void update(::at::Tensor& p, const SubspaceAdamWOptions& o)
    {
        constexpr const char* where = "compact::torch::SubspaceAdamW::step";
        const auto cw = detail::find_weight(p);
        const bool subspace = cw && cw->subspace() && !cw->identity();
        const ::at::Tensor& grad = p.grad();
        const auto expected = moment_shape(p);
        COMPACT_REQUIRE(grad.sizes() == ::at::IntArrayRef(expected), where, "the gradient of parameter ",
                        detail::sizes_string(p), (cw ? " (" + cw->describe() + ")" : std::string()), " is ",
                        detail::sizes_string(grad), " but ", detail::sizes_string(::at::empty(expected)),
                        " was expected");
        COMPACT_REQUIRE(!grad.is_sparse(), where, "sparse gradients are not supported");
        COMPACT_REQUIRE(p.is_floating_point(), where, "parameter ", detail::sizes_string(p), " has dtype ",
                        p.scalar_type(), ", not a floating type");
        std::uint64_t epoch = 0;
        if (cw && cw->subspace()) {
            COMPACT_REQUIRE(cw->grad_written, where, "weight.grad of ", cw->describe(),
                            " was not written by a backward of that layer");
            epoch = cw->grad_epoch;
        }

        auto& slot = state_[key(p)];
        if (!slot) {
            auto s = std::make_unique<SubspaceAdamWParamState>();
            s->exp_avg(::at::zeros(expected, p.options()));
            s->exp_avg_sq(::at::zeros(expected, p.options()));
            s->epoch(static_cast<int64_t>(epoch));
            slot = std::move(s);
        }
        auto& s = static_cast<SubspaceAdamWParamState&>(*slot);
        ::at::Tensor& m = s.exp_avg();
        ::at::Tensor& v = s.exp_avg_sq();
        const double b1 = std::get<0>(o.betas()), b2 = std::get<1>(o.betas());
        const double lr = o.lr(), wd = o.weight_decay();
        COMPACT_REQUIRE(lr * wd <= 1, where, "lr * weight_decay = ", lr * wd, " must be at most 1");

        if (subspace && s.step() > 0 && static_cast<std::uint64_t>(s.epoch()) != epoch) {
            switch (o.moments()) {
            case moment_policy::keep: break;
            case moment_policy::reset:
                m.zero_(), v.zero_(), s.step(0);
                break;
            case moment_policy::transfer: {
                const ::at::Tensor p_old = cw->projection(static_cast<std::uint64_t>(s.epoch()), m.scalar_type());
                const ::at::Tensor p_new = cw->projection(epoch, m.scalar_type());
                m.copy_(m.mm(p_old.t().mm(p_new)));
                break;
            }
            }
        }
        s.epoch(static_cast<int64_t>(epoch));
        s.step(s.step() + 1);
        const double t = static_cast<double>(s.step());
        const double bc1 = 1.0 - std::pow(b1, t), bc2 = 1.0 - std::pow(b2, t);
        const double alpha = subspace ? o.alpha() : 1.0;

        if (o.torch_compatible()) {
            // torch::optim::AdamW's operations, in its order.
            if (wd != 0) p.mul_(1 - lr * wd);
            m.mul_(b1).add_(grad, 1 - b1);
            v.mul_(b2).addcmul_(grad, grad, 1 - b2);
            const ::at::Tensor denom = (v.sqrt() / std::sqrt(bc2)).add_(o.eps());
            const double step_size = lr / bc1 * alpha;
            if (!subspace) p.addcdiv_(m, denom, -step_size);
            else p.addmm_(m / denom, cw->projection(epoch, p.scalar_type()).t(), 1.0, -step_size);
        } else {
            // SPEC section 3: eps outside the root, bias corrections folded into the step, decay after.
            m.mul_(b1).add_(grad, 1 - b1);
            v.mul_(b2).addcmul_(grad, grad, 1 - b2);
            const double step_size = lr * std::sqrt(bc2) / bc1 * alpha;
            const double decay = 1 - lr * wd;
            const ::at::Tensor direction = m / (v.sqrt().add_(o.eps()));
            if (!subspace) {
                p.add_(direction, -step_size);
                if (decay != 1) p.mul_(decay);
            } else {
                p.addmm_(direction, cw->projection(epoch, p.scalar_type()).t(), decay, -decay * step_size);
            }
        }
        if (cw) {
            cw->set_updates(cw->updates() + 1);
            cw->grad_version_after_step = static_cast<int64_t>(grad._version());
        }
    }
};

} // namespace torch
COMPACT_NAMESPACE_END
