// compact/optim/adamw.hpp: AdamW in the projection subspace (SPEC section 3), and plain AdamW.
//
// Per step, with G_sub (m, r) the subspace gradient of the current P:
//   t <- t + 1
//   M <- b1 M + (1 - b1) G_sub            V <- b2 V + (1 - b2) G_sub^2         (M, V: (m, r))
//   eta_t = lr sqrt(1 - b2^t) / (1 - b1^t)
//   W <- (1 - lr wd) (W - eta_t alpha (M / (sqrt(V) + eps)) P^T)              (one GEMM, beta = 1 - lr wd)
// which is transformers-style AdamW (eps outside the root, decoupled decay applied after the update)
// acting on the subspace. When the epoch changes, the moments written under the old P meet gradients
// of the new one; moment_policy says what happens: keep them (the paper, GaLore), reset them (and t),
// or transfer M <- M P_old^T P_new (Flora's re-sketch; V is kept).
//
// Parameters that are not compressed (biases, norms, embeddings) use adamw::step: the same equations
// with full-shape moments and alpha = 1. Moments have their own type `State` (float by default, whatever
// the weights' type). Hyper-parameters are a plain struct passed to every step, so schedules are just
// a different struct per step.
//
// Master weights. Both steps take an optional `master` (the shape of W, in State): a higher-precision
// copy of the weights that the caller keeps beside bf16/fp16 (or float) W. With one, the update above
// is applied to the master in State precision and W is then rewritten as the master rounded to Scalar,
// so updates smaller than half an ulp of W accumulate in the master instead of rounding away. The
// caller initialises the master from W once (axpby) and keeps it for the run; W is never read then.
// An empty master (the default) is the plain update of W, bit for bit as without the argument.
#pragma once

#include "compact/backend/backend.hpp"
#include "compact/core/config.hpp"
#include "compact/core/error.hpp"
#include "compact/core/matrix_view.hpp"
#include "compact/core/projection.hpp"
#include "compact/core/workspace.hpp"
#include "compact/nn/input_projection.hpp"

#include <cmath>
#include <cstddef>
#include <cstdint>

COMPACT_NAMESPACE_BEGIN

struct adamw_params {
    double lr = 1e-3;
    double beta1 = 0.9;
    double beta2 = 0.999;
    double eps = 1e-6;          ///< added outside the square root
    double weight_decay = 0.0;  ///< decoupled: W <- W - lr wd W after the update
    double alpha = 1.0;         ///< subspace scale (0.25 for the paper's pretraining); plain AdamW ignores it
};

enum class moment_policy : unsigned char {
    keep,     ///< moments carry over to the new P unchanged (default)
    reset,    ///< zero M and V and restart t
    transfer, ///< M <- M P_old^T P_new; V kept
};

inline const char* to_string(moment_policy p) noexcept
{
    switch (p) {
    case moment_policy::keep: return "keep";
    case moment_policy::reset: return "reset";
    case moment_policy::transfer: return "transfer";
    }
    return "unknown";
}

/// The scalar part of an optimizer state: the step count t and the epoch of P the moments were
/// accumulated under. The caller stores it next to the moment buffers (and checkpoints it with them).
struct adam_counters {
    std::uint64_t step = 0;
    std::uint64_t epoch = 0;
};

namespace detail {

inline adam_coefficients adam_step_coefficients(const adamw_params& h, std::uint64_t t, double alpha,
                                                const char* where)
{
    COMPACT_REQUIRE(h.lr >= 0, where, "lr=", h.lr, " must be non-negative");
    COMPACT_REQUIRE(h.beta1 >= 0 && h.beta1 < 1, where, "beta1=", h.beta1, " must be in [0, 1)");
    COMPACT_REQUIRE(h.beta2 >= 0 && h.beta2 < 1, where, "beta2=", h.beta2, " must be in [0, 1)");
    COMPACT_REQUIRE(h.eps > 0, where, "eps=", h.eps, " must be positive");
    COMPACT_REQUIRE(h.weight_decay >= 0 && h.lr * h.weight_decay <= 1, where, "weight_decay=", h.weight_decay,
                    " must be non-negative with lr * weight_decay <= 1 (lr=", h.lr, ")");
    COMPACT_REQUIRE(alpha > 0, where, "alpha=", alpha, " must be positive");
    const double td = static_cast<double>(t);
    adam_coefficients k;
    k.beta1 = h.beta1;
    k.beta2 = h.beta2;
    k.eps = h.eps;
    k.step_size = h.lr * std::sqrt(1.0 - std::pow(h.beta2, td)) / (1.0 - std::pow(h.beta1, td)) * alpha;
    k.decay = 1.0 - h.lr * h.weight_decay;
    return k;
}

/// A master copy is either empty (none) or exactly W's shape.
template <class S>
void check_master(const matrix_view<S>& master, index_t rows, index_t cols, const char* where)
{
    if (master.rows == 0 && master.cols == 0 && master.data == nullptr) return;
    COMPACT_REQUIRE(master.data != nullptr, where, "master is null but has shape ", shape_string(master),
                    " (pass an empty view for no master weights)");
    check_shape(master, rows, cols, where, "master (the master copy of W)");
}

template <class S>
bool has_master(const matrix_view<S>& master) noexcept
{
    return master.data != nullptr;
}

} // namespace detail

/// Plain AdamW for uncompressed parameters: W (rows, cols), G, M, V of the same shape.
template <class Backend>
struct adamw {
    /// One update of W from G. master: empty, or the State copy of W (rows, cols) that the update is
    /// applied to, W then becoming master rounded to W's type (see the top of this header).
    template <class W, class S>
    static void step(const typename Backend::context& ctx, const adamw_params& h, matrix_view<W> w,
                     const_matrix_view<W> g, matrix_view<S> m, matrix_view<S> v, adam_counters& counters,
                     matrix_view<S> master = {})
    {
        constexpr const char* where = "adamw::step";
        detail::check_view(w, where, "W");
        detail::check_shape(g, w.rows, w.cols, where, "G");
        detail::check_shape(m, w.rows, w.cols, where, "M");
        detail::check_shape(v, w.rows, w.cols, where, "V");
        detail::check_master(master, w.rows, w.cols, where);
        const auto k = detail::adam_step_coefficients(h, counters.step + 1, 1.0, where);
        ++counters.step;
        if (detail::has_master(master)) {
            Backend::template adamw_update<S, S, W>(ctx, k, g, m, v, master);
            Backend::template axpby<S, W>(ctx, 1.0, master, 0.0, w);
        } else {
            Backend::template adamw_update<W, S>(ctx, k, g, m, v, w);
        }
    }

    /// Bytes of M and V for a (rows, cols) parameter.
    template <class S = float>
    static constexpr std::size_t state_bytes(index_t rows, index_t cols) noexcept
    {
        return 2 * static_cast<std::size_t>(rows) * static_cast<std::size_t>(cols) * sizeof(S);
    }
};

/// AdamW in the subspace of one layer's projection. Holds no buffers: M and V (m, r) and the counters
/// are passed to every step.
template <class Scalar, class Backend, class State = float>
class subspace_adamw {
public:
    using context = typename Backend::context;
    using projection_type = input_projection<Scalar, Backend>;

    subspace_adamw(index_t out, const projection_type& projection, moment_policy policy = moment_policy::keep)
        : out_(out), projection_(projection), policy_(policy)
    {
        COMPACT_REQUIRE(out >= 1, "subspace_adamw", "out=", out, " must be positive");
    }

    moment_policy policy() const noexcept { return policy_; }
    const projection_type& projection() const noexcept { return projection_; }

    /// Bytes of M and V: 2 m r sizeof(State).
    std::size_t state_bytes() const noexcept
    {
        return 2 * static_cast<std::size_t>(out_) * static_cast<std::size_t>(projection_.rank()) * sizeof(State);
    }

    /// Workspace for step(): P and the update direction, plus P_old, P_new, P_old^T P_new and M P for the
    /// transfer policy; none for the identity, which is plain AdamW in place. with_master: for steps
    /// given a master copy of W, whose direction (m, r) and P (n, r) are also needed in State.
    std::size_t workspace_bytes(bool with_master = false) const noexcept
    {
        if (projection_.is_identity()) return 0; // plain AdamW in place
        const index_t n = projection_.in(), r = projection_.rank();
        std::size_t bytes = detail::workspace_slack + detail::buffer_bytes<Scalar>(n * r);
        if (with_master) bytes += detail::buffer_bytes<State>(out_ * r) + detail::buffer_bytes<State>(n * r);
        else bytes += detail::buffer_bytes<Scalar>(out_ * r);
        if (policy_ == moment_policy::transfer)
            bytes += 2 * detail::buffer_bytes<State>(n * r) + detail::buffer_bytes<State>(r * r) +
                     detail::buffer_bytes<State>(out_ * r);
        return bytes;
    }

    /// One update of W (m, n) from G_sub (m, r), computed under the projection of `epoch`.
    /// M, V: (m, r) moments in State; counters: their step and epoch (updated here).
    /// p: P (n, r) of `epoch` if the caller keeps it, or empty to regenerate it in the workspace.
    /// master: empty, or the State copy of W (m, n) to update instead, W becoming master rounded to
    /// Scalar; the workspace is then workspace_bytes(true). The direction and the GEMM are computed in
    /// State with the P the forward used (generated or kept in Scalar, widened exactly to State), so a
    /// kept P and a regenerated one still give the same bits.
    /// Cost: m r n multiply-adds (the projection back), plus elementwise work on m r and m n values.
    void step(const context& ctx, const adamw_params& h, matrix_view<Scalar> w, const_matrix_view<Scalar> g_sub,
              matrix_view<State> m, matrix_view<State> v, adam_counters& counters, std::uint64_t epoch,
              workspace ws, const_matrix_view<Scalar> p = {}, matrix_view<State> master = {}) const
    {
        constexpr const char* where = "subspace_adamw::step";
        const index_t n = projection_.in(), r = projection_.rank();
        detail::check_shape(w, out_, n, where, "W");
        detail::check_shape(g_sub, out_, r, where, "G_sub");
        detail::check_shape(m, out_, r, where, "M");
        detail::check_shape(v, out_, r, where, "V");
        detail::check_master(master, out_, n, where);
        const bool with_master = detail::has_master(master);
        detail::check_projection(projection_.spec(epoch), where);
        detail::workspace_carver carve(ws, workspace_bytes(with_master), where);
        detail::adam_step_coefficients(h, counters.step + 1, h.alpha, where); // validates before any write

        const bool generate = !projection_.is_identity() && p.empty();
        if (!p.empty()) detail::check_shape(p, n, r, where, "P");
        matrix_view<Scalar> direction, p_buffer;
        matrix_view<State> direction_state, p_state;
        if (!projection_.is_identity()) {
            if (with_master) direction_state = matrix_view<State>(carve.take<State>(out_ * r), out_, r);
            else direction = matrix_view<Scalar>(carve.take<Scalar>(out_ * r), out_, r);
            p_buffer = matrix_view<Scalar>(carve.take<Scalar>(n * r), n, r);
            if (with_master) p_state = matrix_view<State>(carve.take<State>(n * r), n, r);
        }

        // The identity never changes, so an epoch boundary means nothing to its moments.
        if (counters.step > 0 && counters.epoch != epoch && !projection_.is_identity())
            change_epoch(ctx, m, v, counters, epoch, carve);
        counters.epoch = epoch;
        ++counters.step;
        const auto coefficients = detail::adam_step_coefficients(h, counters.step, h.alpha, where);

        const double scale = -coefficients.decay * coefficients.step_size;
        if (projection_.is_identity()) {
            // P = I: exactly plain AdamW, through the same fused kernel.
            if (with_master) Backend::template adamw_update<State, State, Scalar>(ctx, coefficients, g_sub, m, v, master);
            else Backend::template adamw_update<Scalar, State>(ctx, coefficients, g_sub, m, v, w);
        } else if (with_master) {
            Backend::template adam_direction<Scalar, State, State>(ctx, coefficients, g_sub, m, v, direction_state);
            if (generate) {
                Backend::template generate_projection<Scalar>(ctx, projection_.spec(epoch), 0, 0, p_buffer);
                p = p_buffer;
            }
            Backend::template axpby<Scalar, State>(ctx, 1.0, p, 0.0, p_state);
            Backend::template gemm<State>(ctx, op::none, op::transpose, scale, direction_state, p_state,
                                          coefficients.decay, master);
        } else {
            Backend::template adam_direction<Scalar, State, Scalar>(ctx, coefficients, g_sub, m, v, direction);
            if (generate) {
                Backend::template generate_projection<Scalar>(ctx, projection_.spec(epoch), 0, 0, p_buffer);
                p = p_buffer;
            }
            Backend::template gemm<Scalar>(ctx, op::none, op::transpose, scale, direction, p, coefficients.decay, w);
        }
        if (with_master) Backend::template axpby<State, Scalar>(ctx, 1.0, master, 0.0, w);
    }

private:
    void change_epoch(const context& ctx, matrix_view<State> m, matrix_view<State> v, adam_counters& counters,
                      std::uint64_t epoch, detail::workspace_carver& carve) const
    {
        switch (policy_) {
        case moment_policy::keep: return;
        case moment_policy::reset:
            Backend::template fill<State>(ctx, m, State(0));
            Backend::template fill<State>(ctx, v, State(0));
            counters.step = 0;
            return;
        case moment_policy::transfer: {
            const index_t n = projection_.in(), r = projection_.rank();
            matrix_view<State> p_old(carve.take<State>(n * r), n, r);
            matrix_view<State> p_new(carve.take<State>(n * r), n, r);
            matrix_view<State> q(carve.take<State>(r * r), r, r);
            matrix_view<State> moved(carve.take<State>(out_ * r), out_, r);
            Backend::template generate_projection<State>(ctx, projection_.spec(counters.epoch), 0, 0, p_old);
            Backend::template generate_projection<State>(ctx, projection_.spec(epoch), 0, 0, p_new);
            Backend::template gemm<State>(ctx, op::transpose, op::none, 1.0, p_old, p_new, 0.0, q);
            Backend::template gemm<State>(ctx, op::none, op::none, 1.0, m, q, 0.0, moved);
            Backend::template axpby<State, State>(ctx, 1.0, moved, 0.0, m);
            return;
        }
        }
    }

    index_t out_;
    projection_type projection_;
    moment_policy policy_;
};

COMPACT_NAMESPACE_END
