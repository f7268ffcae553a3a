// compact/nn/compressed_linear.hpp: the compressed linear layer of SPEC section 2.
//
// Shapes (row-major, the PyTorch/llm.c layout): weight W (m, n) = (out, in), input X (N, n), output
// Y = X W^T + b (N, m). Forward computes Y exactly and keeps only Z = X P (N, r). Backward computes
//   dX    = dY W           (N, n)   exact: the backward pass through the network is unchanged;
//   G_sub = dY^T Z         (m, r)   the weight gradient in the subspace, = G P with G = dY^T X;
//   db    = sum_rows dY    (m)      exact.
// Costs in multiply-adds, for one step: forward N n m + N n r, backward N m n + m N r (against 3 N n m
// uncompressed); saved bytes N r sizeof(Scalar) instead of N n sizeof(Scalar).
//
// Memory is the caller's: the layer holds only its shape and its projection (a few words). Buffers are
// passed as views, workspace as a `workspace`, and every size is answered by a query.
//
// Input groups: layers that read one X share one projection and one Z (input_group below): the group
// compresses X once, each member computes its own Y and G_sub from the shared Z, and their dX add up.
//
// The compressor is the Policy parameter. A rank policy (core/rank_policy.hpp) gives the random
// projection above. The `quantized` policy (compress/activation_store.hpp) keeps X in an activation
// store instead (group quantization or ALAM's average quantization, SPEC section 5): forward saves the
// encoded X, backward restores it a slice of rows at a time into the workspace and computes the
// full-shape G = dY^T X^ (m, n); rank() is then n and projection() the identity, so the optimizer is
// plain AdamW. Y, dX and db are computed by the same code for both.
#pragma once

#include "compact/backend/backend.hpp"
#include "compact/compress/activation_store.hpp"
#include "compact/core/config.hpp"
#include "compact/core/error.hpp"
#include "compact/core/matrix_view.hpp"
#include "compact/core/projection.hpp"
#include "compact/core/rank_policy.hpp"
#include "compact/core/workspace.hpp"
#include "compact/nn/input_projection.hpp"

#include <cstddef>
#include <cstdint>
#include <numeric>
#include <type_traits>
#include <vector>

COMPACT_NAMESPACE_BEGIN

/// Whether an output buffer is overwritten or added to (gradient accumulation over micro-batches).
enum class write_mode : unsigned char { overwrite, accumulate };

namespace detail {
template <class Policy>
inline constexpr bool is_compressor_policy = is_rank_policy<Policy> || std::is_same_v<Policy, quantized>;
}

template <class Scalar, class Policy, class Backend>
class compressed_linear {
    static_assert(detail::is_compressor_policy<Policy>,
                  "compact: the policy of a compressed_linear is a rank policy (random projection, see "
                  "compact/core/rank_policy.hpp) or compact::quantized (an activation store)");
    COMPACT_CHECK_BACKEND(Backend);

public:
    using scalar_type = Scalar;
    using policy_type = Policy;
    using backend_type = Backend;
    using context = typename Backend::context;
    using projection_type = input_projection<Scalar, Backend>;
    using store_type = activation_store<Scalar, Backend>;
    /// True when X is kept in an activation store rather than projected.
    static constexpr bool stores_input = std::is_same_v<Policy, quantized>;

    /// A layer with its own compressor: P with r = policy.rank({in, out, layer}), or a store keyed by
    /// (seed, layer) with the policy's scheme.
    compressed_linear(index_t in, index_t out, std::uint64_t seed, std::uint64_t layer, Policy policy = {},
                      distribution dist = distribution::gaussian)
        : out_(out), projection_(make_projection(in, out, seed, layer, policy, dist))
    {
        COMPACT_REQUIRE(out >= 1, "compressed_linear", "out=", out, " must be positive");
        if constexpr (stores_input) store_ = store_type(policy.scheme, seed, layer);
    }

    /// A layer that reads the input of an existing projection (a member of an input group).
    compressed_linear(index_t out, const projection_type& shared) : out_(out), projection_(shared)
    {
        static_assert(!stores_input, "compact: input groups share a projection; a quantized layer has none");
        COMPACT_REQUIRE(out >= 1, "compressed_linear", "out=", out, " must be positive");
    }

    index_t in() const noexcept { return projection_.in(); }
    index_t out() const noexcept { return out_; }
    /// Columns of the weight gradient this layer produces: r for a projection, n for a store.
    index_t rank() const noexcept { return projection_.rank(); }
    /// The projection (the identity (n, n) for a store: the optimizer then runs plain AdamW).
    const projection_type& projection() const noexcept { return projection_; }
    /// The activation store (meaningful when stores_input), and the settings a bit allocator adjusts.
    const store_type& store() const noexcept { return store_; }
    store_settings& settings() noexcept { return store_.settings(); }

    /// Bytes kept between forward and backward for N rows (Z, or the encoded X).
    std::size_t saved_bytes(index_t rows) const noexcept
    {
        if constexpr (stores_input) return store_.saved_bytes(rows, in());
        else return projection_.saved_bytes(rows);
    }
    /// Workspace for forward() with Z and expand_gradient(); for a store, for backward() with up to
    /// `rows` rows (it restores X^ in slices of at most max_restore_rows rows; any workspace of at least
    /// one row's bytes works, a larger one means fewer, larger GEMMs).
    std::size_t workspace_bytes(index_t rows = max_restore_rows) const noexcept
    {
        if constexpr (stores_input)
            return detail::buffer_bytes<Scalar>(std::max<index_t>(1, std::min(rows, max_restore_rows)) * in()) +
                   detail::workspace_slack;
        else return projection_.workspace_bytes();
    }

    /// The largest slice of X^ a store-backed backward restores at once.
    static constexpr index_t max_restore_rows = 1024;

    /// Y = X W^T + b (b may be null), exactly. X: (N, n), W: (m, n), b: (m), Y: (N, m).
    void forward(const context& ctx, const_matrix_view<Scalar> x, const_matrix_view<Scalar> w, const Scalar* b,
                 matrix_view<Scalar> y) const
    {
        check_forward(x, w, y, "compressed_linear::forward");
        output(ctx, x, w, b, y);
    }

    /// Y as above and Z = X P (N, r) for backward, with P of `epoch`. Needs workspace_bytes().
    void forward(const context& ctx, const_matrix_view<Scalar> x, const_matrix_view<Scalar> w, const Scalar* b,
                 matrix_view<Scalar> y, matrix_view<Scalar> z, std::uint64_t epoch, workspace ws) const
    {
        constexpr const char* where = "compressed_linear::forward";
        check_forward(x, w, y, where);
        projection_.check_compress(x, epoch, z, ws, where);
        output(ctx, x, w, b, y);
        projection_.compress(ctx, x, epoch, z, ws);
    }

    /// Y as above and Z = X P with a P (n, r) the caller keeps (see input_projection::generate).
    void forward(const context& ctx, const_matrix_view<Scalar> x, const_matrix_view<Scalar> w, const Scalar* b,
                 matrix_view<Scalar> y, matrix_view<Scalar> z, const_matrix_view<Scalar> p) const
    {
        constexpr const char* where = "compressed_linear::forward";
        check_forward(x, w, y, where);
        projection_.check_compress(x, p, z, where);
        output(ctx, x, w, b, y);
        projection_.compress(ctx, x, p, z);
    }

    /// Y as above and X encoded into `saved` by the layer's store, with the noise of `step` (for example
    /// the update count). For the `quantized` policy.
    void forward(const context& ctx, const_matrix_view<Scalar> x, const_matrix_view<Scalar> w, const Scalar* b,
                 matrix_view<Scalar> y, saved_tensor& saved, std::uint64_t step) const
    {
        static_assert(stores_input, "compact: this forward keeps X in an activation store: use compact::quantized");
        constexpr const char* where = "compressed_linear::forward";
        check_forward(x, w, y, where);
        store_.check_compress(x, step, saved, where);
        output(ctx, x, w, b, y);
        store_.compress(ctx, x, step, saved);
    }

    /// dX = dY W, G_sub = dY^T Z, db = column sums of dY.
    /// dY: (N, m); W: (m, n); Z: (N, r) from forward; dX: (N, n), or a default-constructed view ({}) to
    /// skip it; G_sub: (m, r);
    /// db: (m) or null to skip. `grads` applies to G_sub and db, `input_grad` to dX (accumulate dX when
    /// several layers read the same X).
    void backward(const context& ctx, const_matrix_view<Scalar> dy, const_matrix_view<Scalar> w,
                  const_matrix_view<Scalar> z, matrix_view<Scalar> dx, matrix_view<Scalar> g_sub, Scalar* db,
                  write_mode grads = write_mode::overwrite, write_mode input_grad = write_mode::overwrite) const
    {
        constexpr const char* where = "compressed_linear::backward";
        const bool skip_dx = check_backward(dy, w, dx, g_sub, where);
        detail::check_shape(z, dy.rows, rank(), where, "Z");
        exact_backward(ctx, dy, w, skip_dx, dx, db, grads, input_grad);
        Backend::template gemm<Scalar>(ctx, op::transpose, op::none, 1.0, dy, z,
                                       grads == write_mode::accumulate ? 1.0 : 0.0, g_sub);
    }

    /// For the `quantized` policy: dX = dY W, G = dY^T X^ (m, n) with X^ restored from `saved` a slice of
    /// rows at a time into `ws` (see workspace_bytes), db = column sums of dY. Arguments as above.
    void backward(const context& ctx, const_matrix_view<Scalar> dy, const_matrix_view<Scalar> w,
                  const saved_tensor& saved, matrix_view<Scalar> dx, matrix_view<Scalar> g, Scalar* db, workspace ws,
                  write_mode grads = write_mode::overwrite, write_mode input_grad = write_mode::overwrite) const
    {
        static_assert(stores_input, "compact: this backward restores X from an activation store: use compact::quantized");
        constexpr const char* where = "compressed_linear::backward";
        const bool skip_dx = check_backward(dy, w, dx, g, where);
        store_.check_restore(saved, 0, dy.rows, in(), where);
        COMPACT_REQUIRE(saved.rows == dy.rows, where, "dY is ", shape_string(dy), " but the saved X has ", saved.rows,
                        " rows");
        const std::size_t row_bytes = detail::buffer_bytes<Scalar>(in());
        COMPACT_REQUIRE(ws.bytes >= row_bytes + detail::workspace_slack && ws.data != nullptr, where, "workspace holds ",
                        ws.bytes, " bytes but one row of X (", in(), " values) needs ",
                        row_bytes + detail::workspace_slack, " (ask workspace_bytes)");
        exact_backward(ctx, dy, w, skip_dx, dx, db, grads, input_grad);
        const index_t slice = std::min<index_t>(
            {dy.rows, max_restore_rows,
             static_cast<index_t>((ws.bytes - detail::workspace_slack) / (static_cast<std::size_t>(in()) * sizeof(Scalar)))});
        detail::workspace_carver carve(ws, detail::buffer_bytes<Scalar>(slice * in()) + detail::workspace_slack, where);
        Scalar* x_hat = carve.take<Scalar>(slice * in());
        for (index_t r0 = 0; r0 < dy.rows; r0 += slice) {
            const index_t n = std::min(slice, dy.rows - r0);
            matrix_view<Scalar> part(x_hat, n, in());
            store_.restore_rows(ctx, saved, r0, part);
            const double beta = (r0 > 0 || grads == write_mode::accumulate) ? 1.0 : 0.0;
            Backend::template gemm<Scalar>(ctx, op::transpose, op::none, 1.0,
                                           const_matrix_view<Scalar>(dy.data + r0 * dy.ld, n, dy.cols, dy.ld), part,
                                           beta, g);
        }
    }

    /// G_hat = G_sub P^T (m, n), the unbiased full-shape gradient estimate (SPEC section 2).
    void expand_gradient(const context& ctx, const_matrix_view<Scalar> g_sub, std::uint64_t epoch,
                         matrix_view<Scalar> g_hat, workspace ws) const
    {
        constexpr const char* where = "compressed_linear::expand_gradient";
        detail::check_shape(g_sub, out_, rank(), where, "G_sub");
        detail::check_shape(g_hat, out_, in(), where, "G_hat");
        projection_.expand(ctx, g_sub, epoch, g_hat, ws);
    }

private:
    static projection_type make_projection(index_t in, index_t out, std::uint64_t seed, std::uint64_t layer,
                                           const Policy& policy, distribution dist)
    {
        if constexpr (stores_input) {
            (void)out, (void)policy, (void)dist;
            COMPACT_REQUIRE(in >= 1, "compressed_linear", "in=", in, " must be positive");
            return projection_type(in, in, distribution::identity, seed, layer);
        } else {
            return projection_type::from_policy(layer_info{in, out, layer}, policy, seed, dist);
        }
    }

    void check_forward(const_matrix_view<Scalar> x, const_matrix_view<Scalar> w, const_matrix_view<Scalar> y,
                       const char* where) const
    {
        detail::check_view(x, where, "X");
        COMPACT_REQUIRE(x.cols == in(), where, "X is ", shape_string(x), " but the layer expects (N, ", in(), ")");
        detail::check_shape(w, out_, in(), where, "W");
        detail::check_shape(y, x.rows, out_, where, "Y");
    }

    /// Validates the arguments both backward overloads share; returns whether dX is skipped.
    bool check_backward(const_matrix_view<Scalar> dy, const_matrix_view<Scalar> w, const_matrix_view<Scalar> dx,
                        const_matrix_view<Scalar> g, const char* where) const
    {
        detail::check_view(dy, where, "dY");
        COMPACT_REQUIRE(dy.cols == out_, where, "dY is ", shape_string(dy), " but the layer expects (N, ", out_, ")");
        detail::check_shape(w, out_, in(), where, "W");
        detail::check_shape(g, out_, rank(), where, stores_input ? "G" : "G_sub");
        const bool skip_dx = dx.data == nullptr && dx.rows == 0 && dx.cols == 0;
        if (!skip_dx) detail::check_shape(dx, dy.rows, in(), where, "dX");
        return skip_dx;
    }

    /// The exact parts of backward: dX = dY W and db = column sums of dY.
    void exact_backward(const context& ctx, const_matrix_view<Scalar> dy, const_matrix_view<Scalar> w, bool skip_dx,
                        matrix_view<Scalar> dx, Scalar* db, write_mode grads, write_mode input_grad) const
    {
        if (!skip_dx)
            Backend::template gemm<Scalar>(ctx, op::none, op::none, 1.0, dy, w,
                                           input_grad == write_mode::accumulate ? 1.0 : 0.0, dx);
        if (db)
            Backend::template column_sums<Scalar>(ctx, dy, static_cast<Scalar>(grads == write_mode::accumulate ? 1 : 0),
                                                  db);
    }

    void output(const context& ctx, const_matrix_view<Scalar> x, const_matrix_view<Scalar> w, const Scalar* b,
                matrix_view<Scalar> y) const
    {
        Backend::template gemm<Scalar>(ctx, op::none, op::transpose, 1.0, x, w, 0.0, y);
        if (b) Backend::template add_row_vector<Scalar>(ctx, b, y);
    }

    index_t out_;
    projection_type projection_;
    store_type store_{};
};

/// Layers that read the same input X and share one P and one Z (SPEC section 2, "input groups").
/// The rank comes from policy.rank({n, sum of the members' m, group id}).
template <class Scalar, class RankPolicy, class Backend>
class input_group {
    COMPACT_CHECK_RANK_POLICY(RankPolicy);

public:
    using layer_type = compressed_linear<Scalar, RankPolicy, Backend>;
    using projection_type = typename layer_type::projection_type;
    using context = typename Backend::context;

    input_group(index_t in, const std::vector<index_t>& outs, std::uint64_t seed, std::uint64_t group_id,
                RankPolicy policy = {}, distribution dist = distribution::gaussian)
        : projection_(projection_type::from_policy(layer_info{in, total_out(outs), group_id}, policy, seed, dist))
    {
        for (index_t m : outs) layers_.emplace_back(m, projection_);
    }

    const projection_type& projection() const noexcept { return projection_; }
    const layer_type& layer(std::size_t k) const { return layers_.at(k); }
    std::size_t size() const noexcept { return layers_.size(); }
    index_t rank() const noexcept { return projection_.rank(); }

    /// Bytes kept for backward for N rows: one Z for the whole group.
    std::size_t saved_bytes(index_t rows) const noexcept { return projection_.saved_bytes(rows); }
    std::size_t workspace_bytes() const noexcept { return projection_.workspace_bytes(); }

    /// Z = X P once for all members; then call layer(k).forward(ctx, X, W_k, b_k, Y_k) for each member.
    void compress(const context& ctx, const_matrix_view<Scalar> x, std::uint64_t epoch, matrix_view<Scalar> z,
                  workspace ws) const
    {
        projection_.compress(ctx, x, epoch, z, ws);
    }

private:
    static index_t total_out(const std::vector<index_t>& outs)
    {
        COMPACT_REQUIRE(!outs.empty(), "input_group", "outs is empty: a group needs at least one member layer");
        for (index_t m : outs) COMPACT_REQUIRE(m >= 1, "input_group", "member out=", m, " must be positive");
        return std::accumulate(outs.begin(), outs.end(), index_t{0});
    }

    projection_type projection_;
    std::vector<layer_type> layers_;
};

COMPACT_NAMESPACE_END
