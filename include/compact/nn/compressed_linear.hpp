// compact/nn/compressed_linear.hpp: a linear layer whose backward keeps a compressed input (SPEC
// sections 2 and 8).
//
// Shapes (row-major, the PyTorch/llm.c layout): weight W (m, n) = (out, in), input X (N, n), bias b
// (1, m), output Y = X W^T + b (N, m). Forward computes Y exactly and has the layer's compressor keep
// what it keeps of X; backward computes
//   dX = dY W             (N, n)   exact: the backward pass through the network is unchanged;
//   G  = the compressor's weight gradient: G_sub = dY^T Z (m, r) for the random projection, the full
//        (m, n) dY^T X^ for an activation store;
//   db = sum_rows dY      (1, m)   exact.
// Y, dX and db never depend on the compressor; everything else is the compressor's (compress/
// compressor.hpp), so a new compressor is a new header, not an edit here.
//
// Memory is the caller's: the layer holds its shape and its compressor (a few words). Buffers are views,
// what forward keeps is a saved_type over caller memory (saved_bytes(N) bytes), workspace a `workspace`,
// and gradients a layer_gradient, which records the epoch forward's compression used: the optimizer
// then applies the same P, and accumulating micro-batches compressed under different epochs is an
// error.
//
//   compact::compressed_linear<float, compact::rank::ratio<1, 4>, compact::cpu> fc(
//       compact::in_features{n}, compact::out_features{m}, seed, /*layer id*/ 1);
//   auto saved = compact::bind_saved<decltype(fc)::saved_type>(bytes, fc.saved_bytes(N));
//   fc.forward(ctx, X, W, b, Y, saved, step, ws);          // step: completed updates
//   compact::layer_gradient<float> grads{G_sub, db};
//   fc.backward(ctx, dY, W, saved, dX, grads, ws);
//
// Input groups: layers that read one X share one compressor and one saved activation (input_group
// below): the group compresses X once, each member computes its own Y and gradient from the shared
// saved activation, and their dX add up.
//
// Aliasing: outputs must not overlap inputs (Y and X or W; dX and dY or W; G and dY); overlaps are
// rejected with an error.
#pragma once

#include "compact/backend/backend.hpp"
#include "compact/compress/compressor.hpp"
#include "compact/compress/random_projection.hpp"
#include "compact/core/config.hpp"
#include "compact/core/error.hpp"
#include "compact/core/matrix_view.hpp"
#include "compact/core/rank_policy.hpp"
#include "compact/core/shape.hpp"
#include "compact/core/workspace.hpp"
#include "compact/random/projection.hpp"

#include <cstddef>
#include <cstdint>
#include <numeric>
#include <utility>
#include <vector>

COMPACT_NAMESPACE_BEGIN

template <class Scalar, class Policy, class Backend>
class compressed_linear {
public:
    using scalar_type = Scalar;
    using policy_type = Policy;
    using backend_type = Backend;
    using context = typename Backend::context;
    using compressor_type = compressor_t<Scalar, Backend, Policy>;
    using saved_type = typename compressor_type::saved_type;
    using gradient_type = layer_gradient<Scalar>;
    COMPACT_CHECK_COMPRESSOR(compressor_type);
    COMPACT_CHECK_BACKEND(Backend);
    /// True when the gradient is (m, r) in the subspace of the compressor's projection.
    static constexpr bool subspace = compressor_type::subspace;

    /// A layer with its own compressor, built from `policy` for (in, out) and keyed by (seed, layer).
    /// dist and resample are for compressors that draw a projection (a rank policy's).
    compressed_linear(in_features in, out_features out, std::uint64_t seed, std::uint64_t layer,
                      const Policy& policy = Policy{}, distribution dist = distribution::gaussian,
                      resampling resample = {})
        : compressed_linear(in, out, seed, layer, policy, dist, resample, "compressed_linear")
    {
    }

    /// The same, with `where` naming the caller's function in errors (linear_layer passes its own name).
    compressed_linear(in_features in, out_features out, std::uint64_t seed, std::uint64_t layer, const Policy& policy,
                      distribution dist, resampling resample, const char* where)
        : out_(checked_out(out.value, where)),
          compressor_(make_setup(in.value, out.value, seed, layer, dist, resample, where), policy)
    {
    }

    /// A layer around an existing compressor (a member of an input group, or one built by the caller).
    compressed_linear(out_features out, compressor_type compressor)
        : out_(checked_out(out.value, "compressed_linear")), compressor_(std::move(compressor))
    {
    }

    index_t in() const noexcept { return compressor_.in(); }
    index_t out() const noexcept { return out_; }
    /// Columns of the weight gradient: r for a subspace compressor, n otherwise.
    index_t rank() const noexcept { return compressor_.gradient_cols(); }
    const compressor_type& compressor() const noexcept { return compressor_; }
    compressor_type& compressor() noexcept { return compressor_; }
    /// The projection the optimizer applies (subspace compressors only).
    template <bool S = subspace>
    decltype(auto) projection() const noexcept
    {
        static_assert(S, "compact: projection() is for subspace compressors (a rank policy's random projection)");
        return compressor_.projection();
    }

    /// Bytes kept between forward and backward for N rows.
    std::size_t saved_bytes(index_t rows) const { return compressor_.saved_bytes(rows); }
    /// Workspace for forward and backward with up to `rows` rows.
    std::size_t workspace_bytes(index_t rows) const { return compressor_.workspace_bytes(rows); }

    /// True when the compressor keeps persistent state (compress/compressor.hpp): bind it before forward.
    static constexpr bool has_state = has_compressor_state<compressor_type>;
    /// Bytes of the compressor's persistent state for forwards of at most max_rows rows (0 without).
    std::size_t state_bytes(index_t max_rows) const { return compressor_state_bytes(compressor_, max_rows); }
    /// Binds the compressor to `bytes` of state memory on the backend's device (aligned to
    /// compressor_state_alignment) and initialises it on ctx's stream; the layer does not own it. A no-op
    /// without state.
    void bind_state(const context& ctx, void* data, std::size_t bytes)
    {
        bind_compressor_state(compressor_, ctx, data, bytes);
    }

    /// Y = X W^T + b exactly, keeping nothing (inference). X: (N, n), W: (m, n), b: (1, m) or empty,
    /// Y: (N, m).
    void forward(const context& ctx, const_matrix_view<Scalar> x, const_matrix_view<Scalar> w,
                 const_matrix_view<Scalar> b, matrix_view<Scalar> y) const
    {
        check_forward(x, w, b, y, "compressed_linear::forward");
        output(ctx, x, w, b, y);
    }

    /// Y as above, and X compressed into `saved` for backward under `step` (the completed optimizer
    /// updates: the projection's epoch is derived from it). Needs workspace_bytes(N).
    void forward(const context& ctx, const_matrix_view<Scalar> x, const_matrix_view<Scalar> w,
                 const_matrix_view<Scalar> b, matrix_view<Scalar> y, saved_type& saved, std::uint64_t step,
                 workspace ws) const
    {
        constexpr const char* where = "compressed_linear::forward";
        check_forward(x, w, b, y, where);
        const matrix_view<const std::byte> kept(saved.data, 1, static_cast<index_t>(saved.capacity));
        detail::check_no_overlap(y, "Y", kept, "the saved activation", where);
        detail::check_no_overlap(x, "X", kept, "the saved activation", where);
        detail::check_no_overlap(w, "W", kept, "the saved activation", where);
        detail::check_no_overlap(b, "b", kept, "the saved activation", where);
        compressor_.compress(ctx, x, step, saved, ws); // validates everything before it writes
        output(ctx, x, w, b, y);
    }

    /// dX = dY W, the compressor's weight gradient into grads.weight, db = column sums of dY into
    /// grads.bias (when not empty). dY: (N, m); dX: (N, n), or an empty view ({}) to skip it;
    /// grads.weight: (m, rank()); grads.bias: (1, m) or empty. `grads_mode` applies to the weight and
    /// bias gradients (accumulate over micro-batches), `input_mode` to dX (accumulate when several layers
    /// read one X). Records in grads the epoch forward compressed under; accumulating onto a gradient of
    /// another epoch is an error. Needs workspace_bytes(N).
    void backward(const context& ctx, const_matrix_view<Scalar> dy, const_matrix_view<Scalar> w, const saved_type& saved,
                  matrix_view<Scalar> dx, gradient_type& grads, workspace ws,
                  write_mode grads_mode = write_mode::overwrite, write_mode input_mode = write_mode::overwrite) const
    {
        constexpr const char* where = "compressed_linear::backward";
        detail::check_view(dy, where, "dY");
        COMPACT_REQUIRE(dy.cols == out_, where, "dY is ", shape_string(dy), " but the layer expects (N, ", out_, ")");
        detail::check_shape(w, out_, in(), where, "W");
        detail::check_shape(grads.weight, out_, rank(), where, subspace ? "G_sub (grads.weight)" : "G (grads.weight)");
        const bool has_db = detail::check_optional_shape(grads.bias, 1, out_, where, "db (grads.bias)");
        const bool skip_dx = detail::absent(dx);
        if (!skip_dx) {
            detail::check_shape(dx, dy.rows, in(), where, "dX");
            detail::check_no_overlap(dx, "dX", dy, "dY", where);
            detail::check_no_overlap(dx, "dX", w, "W", where);
            detail::check_no_overlap(dx, "dX", grads.weight, "G", where);
        }
        detail::check_no_overlap(grads.weight, "G", dy, "dY", where);
        detail::check_no_overlap(grads.weight, "G", w, "W", where);
        if (has_db) detail::check_no_overlap(grads.bias, "db", dy, "dY", where);
        const bool accumulate = grads_mode == write_mode::accumulate;
        COMPACT_REQUIRE(saved.filled, where, "the saved activation holds nothing: run forward with it first");
        const matrix_view<const std::byte> kept(saved.data, 1, static_cast<index_t>(saved.capacity));
        detail::check_no_overlap(grads.weight, "G", kept, "the saved activation", where);
        if (has_db) {
            detail::check_no_overlap(grads.bias, "db", w, "W", where);
            if (!skip_dx) detail::check_no_overlap(grads.bias, "db", dx, "dX", where);
        }
        COMPACT_REQUIRE(!accumulate || !grads.written || grads.epoch == saved.epoch, where,
                        "accumulating a gradient of epoch ", saved.epoch, " onto one of epoch ", grads.epoch,
                        ": all micro-batches of one update must be compressed under one step");

        compressor_.weight_gradient(ctx, dy, saved, grads.weight, grads_mode, ws); // validates saved first
        if (has_db)
            Backend::template column_sums<Scalar>(ctx, dy, static_cast<Scalar>(accumulate ? 1 : 0), grads.bias.data);
        if (!skip_dx && dy.rows > 0)
            Backend::template gemm<Scalar>(ctx, op::none, op::none, 1.0, dy, w,
                                           input_mode == write_mode::accumulate ? 1.0 : 0.0, dx);
        else if (!skip_dx && input_mode == write_mode::overwrite)
            Backend::template fill<Scalar>(ctx, dx, Scalar(0));
        grads.epoch = saved.epoch;
        grads.written = true;
    }

    /// G_hat = G_sub P^T (m, n), the unbiased full-shape gradient estimate (SPEC section 2), with the P of
    /// the epoch the gradient was computed under. Subspace compressors only; needs
    /// projection().workspace_bytes().
    template <bool S = subspace>
    void expand_gradient(const context& ctx, const gradient_type& grads, matrix_view<Scalar> g_hat, workspace ws) const
    {
        static_assert(S, "compact: expand_gradient is for subspace compressors");
        constexpr const char* where = "compressed_linear::expand_gradient";
        COMPACT_REQUIRE(grads.written, where, "the gradient was not written by a backward");
        detail::check_shape(grads.weight, out_, rank(), where, "G_sub (grads.weight)");
        detail::check_shape(g_hat, out_, in(), where, "G_hat");
        compressor_.projection().expand(ctx, grads.weight, grads.epoch, g_hat, ws);
    }

private:
    static index_t checked_out(index_t out, const char* where)
    {
        COMPACT_REQUIRE(out >= 1, where, "out=", out, " must be positive");
        return out;
    }

    static compressor_setup make_setup(index_t in, index_t out, std::uint64_t seed, std::uint64_t layer,
                                       distribution dist, resampling resample, const char* where)
    {
        COMPACT_REQUIRE(in >= 1, where, "in=", in, " must be positive");
        checked_out(out, where);
        return {in, out, seed, layer, dist, resample, where};
    }

    void check_forward(const_matrix_view<Scalar> x, const_matrix_view<Scalar> w, const_matrix_view<Scalar> b,
                       const_matrix_view<Scalar> y, const char* where) const
    {
        detail::check_view(x, where, "X");
        COMPACT_REQUIRE(x.cols == in(), where, "X is ", shape_string(x), " but the layer expects (N, ", in(), ")");
        detail::check_shape(w, out_, in(), where, "W");
        detail::check_optional_shape(b, 1, out_, where, "b");
        detail::check_shape(y, x.rows, out_, where, "Y");
        detail::check_no_overlap(y, "Y", x, "X", where);
        detail::check_no_overlap(y, "Y", w, "W", where);
        detail::check_no_overlap(y, "Y", b, "b", where);
    }

    void output(const context& ctx, const_matrix_view<Scalar> x, const_matrix_view<Scalar> w,
                const_matrix_view<Scalar> b, matrix_view<Scalar> y) const
    {
        if (x.rows == 0) return;
        Backend::template gemm<Scalar>(ctx, op::none, op::transpose, 1.0, x, w, 0.0, y);
        if (!b.empty()) Backend::template add_row_vector<Scalar>(ctx, b.data, y);
    }

    index_t out_;
    compressor_type compressor_;
};

/// Layers that read the same input X and share one compressor and one saved activation (SPEC section
/// 2, "input groups"). The compressor is built for (n, sum of the members' m) with the group's id, so a
/// rank policy sees the whole group.
template <class Scalar, class Policy, class Backend>
class input_group {
public:
    using layer_type = compressed_linear<Scalar, Policy, Backend>;
    using compressor_type = typename layer_type::compressor_type;
    using saved_type = typename layer_type::saved_type;
    using context = typename Backend::context;

    input_group(in_features in, const std::vector<index_t>& outs, std::uint64_t seed, std::uint64_t group_id,
                const Policy& policy = Policy{}, distribution dist = distribution::gaussian, resampling resample = {})
        : compressor_(setup(in.value, outs, seed, group_id, dist, resample), policy)
    {
        for (index_t m : outs) layers_.emplace_back(out_features{m}, compressor_);
    }

    const compressor_type& compressor() const noexcept { return compressor_; }
    /// The shared projection (subspace compressors only).
    template <bool S = compressor_type::subspace>
    decltype(auto) projection() const noexcept
    {
        static_assert(S, "compact: projection() is for subspace compressors (a rank policy's random projection)");
        return compressor_.projection();
    }
    const layer_type& layer(std::size_t k) const { return layers_.at(k); }
    std::size_t size() const noexcept { return layers_.size(); }
    index_t in() const noexcept { return compressor_.in(); }
    index_t rank() const noexcept { return compressor_.gradient_cols(); }

    /// Bytes kept for backward for N rows: one saved activation for the whole group.
    std::size_t saved_bytes(index_t rows) const { return compressor_.saved_bytes(rows); }
    std::size_t workspace_bytes(index_t rows) const { return compressor_.workspace_bytes(rows); }

    /// True when the compressor keeps persistent state: bind it (bind_state) before compress.
    static constexpr bool has_state = has_compressor_state<compressor_type>;
    /// Bytes of the group's compressor state for forwards of at most max_rows rows (0 without state):
    /// one state for the whole group, which its members share.
    std::size_t state_bytes(index_t max_rows) const { return compressor_state_bytes(compressor_, max_rows); }
    /// Binds the group's compressor and every member layer's copy of it to the same `bytes` of state
    /// memory at `data` (backend memory, aligned to compressor_state_alignment, owned by the caller) and
    /// initialises it on ctx's stream. A no-op without state. Bind before the first compress; binding
    /// again re-initialises the state.
    void bind_state(const context& ctx, void* data, std::size_t bytes)
    {
        bind_compressor_state(compressor_, ctx, data, bytes);
        // Each member re-initialises the same memory to the same values (a few fills): cheap, and it
        // leaves every copy's own record of the binding as the group's.
        for (layer_type& l : layers_) l.bind_state(ctx, data, bytes);
    }

    /// Compresses X once for all members; then call layer(k).forward(ctx, X, W_k, b_k, Y_k) (the
    /// inference overload) for each member, and layer(k).backward with this saved activation.
    void compress(const context& ctx, const_matrix_view<Scalar> x, std::uint64_t step, saved_type& saved,
                  workspace ws) const
    {
        compressor_.compress(ctx, x, step, saved, ws);
    }

private:
    static compressor_setup setup(index_t in, const std::vector<index_t>& outs, std::uint64_t seed, std::uint64_t id,
                                  distribution dist, resampling resample)
    {
        COMPACT_REQUIRE(!outs.empty(), "input_group", "outs is empty: a group needs at least one member layer");
        index_t total = 0;
        for (index_t m : outs) {
            COMPACT_REQUIRE(m >= 1, "input_group", "member out=", m, " must be positive");
            total += m;
        }
        COMPACT_REQUIRE(in >= 1, "input_group", "in=", in, " must be positive");
        return {in, total, seed, id, dist, resample, "input_group"};
    }

    compressor_type compressor_;
    std::vector<layer_type> layers_;
};

COMPACT_NAMESPACE_END
