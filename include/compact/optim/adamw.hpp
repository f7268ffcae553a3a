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
// The update uses the P of the epoch the gradient was computed under: step takes the layer_gradient that
// backward wrote (compress/compressor.hpp), which records it, and the projection_source that owns P
// (kept or regenerated: the same bits), and checks that the source is the one the optimizer was built
// for.
//
// Parameters that are not compressed (biases, norms, embeddings) use adamw::step: the same equations
// with full-shape moments and alpha = 1. Moments have their own type `State`: by default float for float
// and 16-bit weights and double for double weights (default_state_t), never below the weights'
// precision. Hyper-parameters are a plain struct passed to every step, so schedules are just
// a different struct per step.
//
// Master weights. Both steps take an optional `master` (the shape of W, in State): a higher-precision
// copy of the weights that the caller keeps beside bf16/fp16 (or float) W. With one, the update above
// is applied to the master in State precision and W is then rewritten as the master rounded to Scalar,
// so updates smaller than half an ulp of W accumulate in the master instead of rounding away. The
// caller initialises the master from W once (axpby) and keeps it for the run; W is never read then.
// An empty master (the default) is the plain update of W, bit for bit as without the argument.
//
// Loss scaling and non-finite gradients (fp16 training; optim/loss_scaler.hpp). adamw_params::grad_scale
// multiplies G, in State precision, before the moment update: pass 1 / the loss scale, and the moments
// see the unscaled gradient without a pass over G (a power-of-two scale unscales exactly). A
// nonfinite_check finds NaN or infinite gradients with one synchronisation for any number of tensors,
// and step_if_finite is a step that first checks its gradient: when it holds a NaN or an infinity it
// returns false and changes nothing (W, M, V, the master and the counters keep their bits), as
// mixed-precision trainers skip a step whose gradient overflowed.
#pragma once

#include "compact/backend/backend.hpp"
#include "compact/compress/compressor.hpp"
#include "compact/compress/projection_source.hpp"
#include "compact/core/config.hpp"
#include "compact/core/error.hpp"
#include "compact/core/matrix_view.hpp"
#include "compact/core/shape.hpp"
#include "compact/core/workspace.hpp"
#include "compact/random/projection.hpp"

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>

COMPACT_NAMESPACE_BEGIN

struct adamw_params {
    double lr = 1e-3;
    double beta1 = 0.9;
    double beta2 = 0.999;
    double eps = 1e-6;          ///< added outside the square root
    double weight_decay = 0.0;  ///< decoupled: W <- W - lr wd W after the update
    double alpha = 1.0;         ///< subspace scale (0.25 for the paper's pretraining); plain AdamW and the
                                ///< identity projection (rank::full) ignore it
    double grad_scale = 1.0;    ///< G is multiplied by it (rounded to State) before the moments: 1 / the
                                ///< loss scale under loss scaling; 1 is the plain update, bit for bit
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

/// The default type of optimizer state for weights of type Scalar: double for double, float otherwise.
template <class Scalar>
using default_state_t = std::conditional_t<std::is_same_v<Scalar, double>, double, float>;

namespace detail {

inline adam_coefficients adam_step_coefficients(const adamw_params& h, std::uint64_t t, double alpha,
                                                const char* where)
{
    COMPACT_REQUIRE(h.lr >= 0 && std::isfinite(h.lr), where, "lr=", h.lr, " must be finite and non-negative");
    COMPACT_REQUIRE(h.beta1 >= 0 && h.beta1 < 1, where, "beta1=", h.beta1, " must be in [0, 1)");
    COMPACT_REQUIRE(h.beta2 >= 0 && h.beta2 < 1, where, "beta2=", h.beta2, " must be in [0, 1)");
    COMPACT_REQUIRE(h.eps > 0 && std::isfinite(h.eps), where, "eps=", h.eps, " must be finite and positive");
    COMPACT_REQUIRE(t >= 1, where, "the step counter wrapped around to 0");
    COMPACT_REQUIRE(h.weight_decay >= 0 && std::isfinite(h.weight_decay) && h.lr * h.weight_decay <= 1, where,
                    "weight_decay=", h.weight_decay,
                    " must be non-negative with lr * weight_decay <= 1 (lr=", h.lr, ")");
    COMPACT_REQUIRE(alpha > 0 && std::isfinite(alpha), where, "alpha=", alpha, " must be finite and positive");
    COMPACT_REQUIRE(h.grad_scale > 0 && std::isfinite(h.grad_scale), where, "grad_scale=", h.grad_scale,
                    " must be finite and positive");
    const double td = static_cast<double>(t);
    adam_coefficients k;
    k.beta1 = h.beta1;
    k.beta2 = h.beta2;
    k.eps = h.eps;
    k.step_size = h.lr * std::sqrt(1.0 - std::pow(h.beta2, td)) / (1.0 - std::pow(h.beta1, td)) * alpha;
    k.decay = 1.0 - h.lr * h.weight_decay;
    k.grad_scale = h.grad_scale;
    return k;
}

/// A master copy is either empty (none) or exactly W's shape.
template <class S>
void check_master(const matrix_view<S>& master, index_t rows, index_t cols, const char* where)
{
    COMPACT_REQUIRE(absent(master) || master.data != nullptr, where, "master is null but has shape ",
                    shape_string(master), " (pass an empty view for no master weights)");
    check_optional_shape(master, rows, cols, where, "master (the master copy of W)");
}

template <class S>
bool has_master(const matrix_view<S>& master) noexcept
{
    return master.data != nullptr;
}

} // namespace detail

/// Whether gradients hold a NaN or an infinity, for any number of tensors with one synchronisation:
///
///   check.reset(ctx);                         // flag = 0 (launched)
///   check.add(ctx, g1); check.add(ctx, db1);  // launched, nothing waits
///   if (check.found(ctx)) ...                 // reads the flag: the one synchronisation on CUDA
///
/// Owns its flag: one std::uint32_t of the backend's memory, allocated by the constructor (never by a
/// check). Cost: one read of each tensor added, plus the wait for the stream in found().
template <class Backend>
class nonfinite_check {
public:
    using context = typename Backend::context;

    nonfinite_check() : flag_(1, std::uint32_t{0}) {}

    /// Clears the flag, on the context's stream.
    void reset(const context& ctx) { Backend::template fill<std::uint32_t>(ctx, {flag_.data(), 1, 1}, 0u); }

    /// Flags x (any shape and ld; the backend's memory) when it holds a NaN or an infinity.
    template <class T>
    void add(const context& ctx, matrix_view<T> x)
    {
        detail::check_view(x, "nonfinite_check::add", "x");
        Backend::template flag_nonfinite<std::remove_const_t<T>>(ctx, const_matrix_view<std::remove_const_t<T>>(x),
                                                                 flag_.data());
    }

    /// Whether anything added since reset() held a NaN or an infinity. Waits for the stream.
    bool found(const context& ctx) const
    {
        std::uint32_t host = 0;
        Backend::template copy_to_host<std::uint32_t>(ctx, flag_.data(), &host, 1);
        return host != 0;
    }

    /// reset, add each view, found: true when every view is finite.
    template <class... Views>
    bool all_finite(const context& ctx, Views... views)
    {
        reset(ctx);
        (add(ctx, views), ...);
        return !found(ctx);
    }

    /// The flag itself (one std::uint32_t in the backend's memory), for Backend::flag_nonfinite.
    std::uint32_t* flag() noexcept { return flag_.data(); }

private:
    typename Backend::template buffer<std::uint32_t> flag_;
};

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
        detail::check_no_overlap(m, "M", v, "V", where);
        detail::check_no_overlap(w, "W", m, "M", where);
        detail::check_no_overlap(w, "W", v, "V", where);
        const auto k = detail::adam_step_coefficients(h, counters.step + 1, 1.0, where);
        ++counters.step;
        if (detail::has_master(master)) {
            Backend::template adamw_update<S, S, W>(ctx, k, g, m, v, master);
            Backend::template axpby<S, W>(ctx, 1.0, master, 0.0, w);
        } else {
            Backend::template adamw_update<W, S>(ctx, k, g, m, v, w);
        }
    }

    /// step, unless G holds a NaN or an infinity: then nothing changes (W, M, V, master and counters
    /// keep their bits) and it returns false. h and G's shape are validated first either way. Cost:
    /// one read of G and one synchronisation (check.found) more than step.
    template <class W, class S>
    static bool step_if_finite(const typename Backend::context& ctx, const adamw_params& h,
                               nonfinite_check<Backend>& check, matrix_view<W> w, const_matrix_view<W> g,
                               matrix_view<S> m, matrix_view<S> v, adam_counters& counters,
                               matrix_view<S> master = {})
    {
        constexpr const char* where = "adamw::step_if_finite";
        detail::check_view(w, where, "W");
        detail::check_shape(g, w.rows, w.cols, where, "G");
        detail::adam_step_coefficients(h, counters.step + 1, 1.0, where);
        if (!check.all_finite(ctx, g)) return false;
        step(ctx, h, w, g, m, v, counters, master);
        return true;
    }

    /// Bytes of M and V for a (rows, cols) parameter.
    template <class S = float>
    static constexpr std::size_t state_bytes(index_t rows, index_t cols) noexcept
    {
        return 2 * static_cast<std::size_t>(rows) * static_cast<std::size_t>(cols) * sizeof(S);
    }
};

/// AdamW in the subspace of one layer's projection. Holds no buffers: M and V (m, r) and the counters
/// are passed to every step, with the projection_source that owns P.
template <class Scalar, class Backend, class State = default_state_t<Scalar>>
class subspace_adamw {
public:
    using context = typename Backend::context;
    using source_type = projection_source<Scalar, Backend>;

    subspace_adamw(out_features out, const source_type& projection, moment_policy policy = moment_policy::keep)
        : out_(out.value), projection_(projection), policy_(policy)
    {
        COMPACT_REQUIRE(out.value >= 1, "subspace_adamw", "out=", out.value, " must be positive");
        COMPACT_REQUIRE(static_cast<unsigned>(policy) <= static_cast<unsigned>(moment_policy::transfer),
                        "subspace_adamw", "moment_policy ", static_cast<unsigned>(policy),
                        " is not keep, reset or transfer");
    }

    moment_policy policy() const noexcept { return policy_; }
    /// The projection this optimizer was built for (its definition; a kept copy is the step's source).
    const source_type& projection() const noexcept { return projection_; }

    /// Bytes of M and V: 2 m r sizeof(State).
    std::size_t state_bytes() const noexcept
    {
        return 2 * static_cast<std::size_t>(out_) * static_cast<std::size_t>(projection_.rank()) * sizeof(State);
    }

    /// Workspace for step(): P (counted even when the step's source keeps it: an upper bound) and the
    /// update direction, plus P_old, P_new, P_old^T P_new and M P for the transfer policy; none for the
    /// identity, which is plain AdamW in place. with_master: for steps given a master copy of W, whose
    /// direction (m, r) and P (n, r) are also needed in State.
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

    /// One update of W (m, n) from grads.weight = G_sub (m, r), under the projection of the epoch backward
    /// recorded in grads. `p` owns P: the source this optimizer was built for (or a copy of it that keeps
    /// P). M, V: (m, r) moments in State; counters: their step and epoch (updated here). master: empty,
    /// or the State copy of W (m, n) to update instead, W becoming master rounded to Scalar; the workspace
    /// is then workspace_bytes(true). The direction and the GEMM are computed in State with the P the
    /// forward used (in Scalar, widened exactly to State), so a kept P and a regenerated one give the
    /// same bits. grads.bias is not used (a bias trains with adamw::step).
    /// Cost: m r n multiply-adds (the projection back), plus elementwise work on m r and m n values.
    void step(const context& ctx, const adamw_params& h, const source_type& p, matrix_view<Scalar> w,
              const layer_gradient<Scalar>& grads, matrix_view<State> m, matrix_view<State> v, adam_counters& counters,
              workspace ws, matrix_view<State> master = {}) const
    {
        constexpr const char* where = "subspace_adamw::step";
        const index_t n = projection_.in(), r = projection_.rank();
        COMPACT_REQUIRE(p.same_projection(projection_), where, "the projection source (n=", p.in(), ", r=", p.rank(),
                        ", layer ", p.layer(), ") is not the one this optimizer was built for (n=", n, ", r=", r,
                        ", layer ", projection_.layer(), ")");
        COMPACT_REQUIRE(grads.written, where, "the gradient was not written by a backward since it was made");
        const_matrix_view<Scalar> g_sub = grads.weight;
        detail::check_shape(w, out_, n, where, "W");
        detail::check_shape(g_sub, out_, r, where, "G_sub (grads.weight)");
        detail::check_shape(m, out_, r, where, "M");
        detail::check_shape(v, out_, r, where, "V");
        detail::check_master(master, out_, n, where);
        detail::check_no_overlap(m, "M", v, "V", where);
        detail::check_no_overlap(w, "W", g_sub, "G_sub", where);
        detail::check_no_overlap(w, "W", m, "M", where);
        detail::check_no_overlap(w, "W", v, "V", where);
        const std::uint64_t epoch = grads.epoch;
        const bool with_master = detail::has_master(master);
        p.check_epoch(epoch, where);
        detail::workspace_carver carve(ws, workspace_bytes(with_master), where);
        // alpha scales a step taken in a subspace; the identity is no subspace, so rank::full trains exactly
        // like plain AdamW whatever alpha says (alpha is still validated).
        detail::adam_step_coefficients(h, counters.step + 1, h.alpha, where); // validates before any write
        const double alpha = projection_.is_identity() ? 1.0 : h.alpha;

        // The identity never changes, so an epoch boundary means nothing to its moments.
        if (counters.step > 0 && counters.epoch != epoch && !projection_.is_identity())
            change_epoch(ctx, p, m, v, counters, epoch, carve);
        counters.epoch = epoch;
        ++counters.step;
        const auto coefficients = detail::adam_step_coefficients(h, counters.step, alpha, where);

        const double scale = -coefficients.decay * coefficients.step_size;
        if (projection_.is_identity()) {
            // P = I: exactly plain AdamW, through the same fused kernel.
            if (with_master) Backend::template adamw_update<State, State, Scalar>(ctx, coefficients, g_sub, m, v, master);
            else Backend::template adamw_update<Scalar, State>(ctx, coefficients, g_sub, m, v, w);
        } else if (with_master) {
            matrix_view<State> direction(carve.take<State>(out_ * r), out_, r);
            Backend::template adam_direction<Scalar, State, State>(ctx, coefficients, g_sub, m, v, direction);
            const const_matrix_view<Scalar> pv = p.get(ctx, epoch, carve);
            matrix_view<State> p_state(carve.take<State>(n * r), n, r);
            Backend::template axpby<Scalar, State>(ctx, 1.0, pv, 0.0, p_state);
            Backend::template gemm<State>(ctx, op::none, op::transpose, scale, direction, p_state, coefficients.decay,
                                          master);
        } else {
            matrix_view<Scalar> direction(carve.take<Scalar>(out_ * r), out_, r);
            Backend::template adam_direction<Scalar, State, Scalar>(ctx, coefficients, g_sub, m, v, direction);
            const const_matrix_view<Scalar> pv = p.get(ctx, epoch, carve);
            Backend::template gemm<Scalar>(ctx, op::none, op::transpose, scale, direction, pv, coefficients.decay, w);
        }
        if (with_master) Backend::template axpby<State, Scalar>(ctx, 1.0, master, 0.0, w);
    }

    /// step, unless G_sub (grads.weight) holds a NaN or an infinity: then nothing changes (W, M, V,
    /// master and counters keep their bits) and it returns false. h and the gradient are validated
    /// first either way. Cost: one read of G_sub and one synchronisation more than step.
    bool step_if_finite(const context& ctx, const adamw_params& h, nonfinite_check<Backend>& check,
                        const source_type& p, matrix_view<Scalar> w, const layer_gradient<Scalar>& grads,
                        matrix_view<State> m, matrix_view<State> v, adam_counters& counters, workspace ws,
                        matrix_view<State> master = {}) const
    {
        constexpr const char* where = "subspace_adamw::step_if_finite";
        COMPACT_REQUIRE(grads.written, where, "the gradient was not written by a backward since it was made");
        detail::check_shape(grads.weight, out_, projection_.rank(), where, "G_sub (grads.weight)");
        detail::adam_step_coefficients(h, counters.step + 1, h.alpha, where);
        if (!check.all_finite(ctx, grads.weight)) return false;
        step(ctx, h, p, w, grads, m, v, counters, ws, master);
        return true;
    }

private:
    void change_epoch(const context& ctx, const source_type& p, matrix_view<State> m, matrix_view<State> v,
                      adam_counters& counters, std::uint64_t epoch, detail::workspace_carver& carve) const
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
            p.generate(ctx, counters.epoch, p_old);
            p.generate(ctx, epoch, p_new);
            Backend::template gemm<State>(ctx, op::transpose, op::none, 1.0, p_old, p_new, 0.0, q);
            Backend::template gemm<State>(ctx, op::none, op::none, 1.0, m, q, 0.0, moved);
            Backend::template axpby<State, State>(ctx, 1.0, moved, 0.0, m);
            return;
        }
        }
    }

    index_t out_;
    source_type projection_;
    moment_policy policy_;
};

/// The optimizer of a compressed layer's weight, whatever its compressor: subspace AdamW through the
/// compressor's projection when the compressor is a subspace one, plain AdamW on the full (m, n)
/// gradient otherwise (an activation store, a custom full-shape compressor). The one place where the
/// concept's `subspace` flag picks an update rule.
template <class Compressor, class State = default_state_t<typename Compressor::scalar_type>>
class compressed_adamw {
public:
    using scalar_type = typename Compressor::scalar_type;
    using backend_type = typename Compressor::backend_type;
    using context = typename backend_type::context;

    compressed_adamw(out_features out, const Compressor& compressor, moment_policy policy = moment_policy::keep)
        : impl_(make(out, compressor, policy)), out_(out.value), cols_(compressor.gradient_cols()), policy_(policy)
    {
    }

    moment_policy policy() const noexcept { return policy_; }

    /// Bytes of M and V: 2 m cols sizeof(State), cols = r or n.
    std::size_t state_bytes() const noexcept { return 2 * static_cast<std::size_t>(out_ * cols_) * sizeof(State); }
    /// Workspace for step() (see subspace_adamw::workspace_bytes; plain AdamW needs none).
    std::size_t workspace_bytes(bool with_master = false) const noexcept
    {
        if constexpr (Compressor::subspace) return impl_.workspace_bytes(with_master);
        else return (void)with_master, 0;
    }

    /// One update of W (m, n) from grads.weight; arguments as in subspace_adamw::step.
    void step(const context& ctx, const adamw_params& h, const Compressor& compressor, matrix_view<scalar_type> w,
              const layer_gradient<scalar_type>& grads, matrix_view<State> m, matrix_view<State> v,
              adam_counters& counters, workspace ws, matrix_view<State> master = {}) const
    {
        if constexpr (Compressor::subspace) {
            impl_.step(ctx, h, compressor.projection(), w, grads, m, v, counters, ws, master);
        } else {
            (void)compressor, (void)ws;
            COMPACT_REQUIRE(grads.written, "adamw::step", "the gradient was not written by a backward since it was made");
            adamw<backend_type>::step(ctx, h, w, const_matrix_view<scalar_type>(grads.weight), m, v, counters, master);
        }
    }

    /// step, unless grads.weight holds a NaN or an infinity: then nothing changes and it returns false
    /// (see subspace_adamw::step_if_finite).
    bool step_if_finite(const context& ctx, const adamw_params& h, nonfinite_check<backend_type>& check,
                        const Compressor& compressor, matrix_view<scalar_type> w,
                        const layer_gradient<scalar_type>& grads, matrix_view<State> m, matrix_view<State> v,
                        adam_counters& counters, workspace ws, matrix_view<State> master = {}) const
    {
        constexpr const char* where = "compressed_adamw::step_if_finite";
        COMPACT_REQUIRE(grads.written, where, "the gradient was not written by a backward since it was made");
        detail::check_shape(grads.weight, out_, cols_, where, "grads.weight");
        detail::adam_step_coefficients(h, counters.step + 1, Compressor::subspace ? h.alpha : 1.0, where);
        if (!check.all_finite(ctx, grads.weight)) return false;
        step(ctx, h, compressor, w, grads, m, v, counters, ws, master);
        return true;
    }

private:
    struct none {};
    using impl_type = std::conditional_t<Compressor::subspace, subspace_adamw<scalar_type, backend_type, State>, none>;

    static impl_type make(out_features out, const Compressor& compressor, moment_policy policy)
    {
        if constexpr (Compressor::subspace) return impl_type(out, compressor.projection(), policy);
        else return (void)out, (void)compressor, (void)policy, none{};
    }

    impl_type impl_;
    index_t out_;
    index_t cols_;
    moment_policy policy_;
};

COMPACT_NAMESPACE_END
