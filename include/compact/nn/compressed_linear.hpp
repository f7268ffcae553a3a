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
#pragma once

#include "compact/backend/backend.hpp"
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
#include <vector>

COMPACT_NAMESPACE_BEGIN

/// Whether an output buffer is overwritten or added to (gradient accumulation over micro-batches).
enum class write_mode : unsigned char { overwrite, accumulate };

template <class Scalar, class RankPolicy, class Backend>
class compressed_linear {
    COMPACT_CHECK_RANK_POLICY(RankPolicy);
    COMPACT_CHECK_BACKEND(Backend);

public:
    using scalar_type = Scalar;
    using policy_type = RankPolicy;
    using backend_type = Backend;
    using context = typename Backend::context;
    using projection_type = input_projection<Scalar, Backend>;

    /// A layer with its own projection: r = policy.rank({in, out, layer}).
    compressed_linear(index_t in, index_t out, std::uint64_t seed, std::uint64_t layer, RankPolicy policy = {},
                      distribution dist = distribution::gaussian)
        : out_(out), projection_(projection_type::from_policy(layer_info{in, out, layer}, policy, seed, dist))
    {
    }

    /// A layer that reads the input of an existing projection (a member of an input group).
    compressed_linear(index_t out, const projection_type& shared) : out_(out), projection_(shared)
    {
        COMPACT_REQUIRE(out >= 1, "compressed_linear", "out=", out, " must be positive");
    }

    index_t in() const noexcept { return projection_.in(); }
    index_t out() const noexcept { return out_; }
    index_t rank() const noexcept { return projection_.rank(); }
    const projection_type& projection() const noexcept { return projection_; }

    /// Bytes kept between forward and backward for N rows (Z).
    std::size_t saved_bytes(index_t rows) const noexcept { return projection_.saved_bytes(rows); }
    /// Workspace for forward() with Z, and for expand_gradient().
    std::size_t workspace_bytes() const noexcept { return projection_.workspace_bytes(); }

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
        detail::check_view(dy, where, "dY");
        COMPACT_REQUIRE(dy.cols == out_, where, "dY is ", shape_string(dy), " but the layer expects (N, ", out_, ")");
        detail::check_shape(w, out_, in(), where, "W");
        detail::check_shape(z, dy.rows, rank(), where, "Z");
        detail::check_shape(g_sub, out_, rank(), where, "G_sub");
        const bool skip_dx = dx.data == nullptr && dx.rows == 0 && dx.cols == 0;
        if (!skip_dx) detail::check_shape(dx, dy.rows, in(), where, "dX");
        const double beta = grads == write_mode::accumulate ? 1.0 : 0.0;
        if (!skip_dx)
            Backend::template gemm<Scalar>(ctx, op::none, op::none, 1.0, dy, w,
                          input_grad == write_mode::accumulate ? 1.0 : 0.0, dx);
        Backend::template gemm<Scalar>(ctx, op::transpose, op::none, 1.0, dy, z, beta, g_sub);
        if (db) Backend::template column_sums<Scalar>(ctx, dy, static_cast<Scalar>(beta), db);
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
    void check_forward(const_matrix_view<Scalar> x, const_matrix_view<Scalar> w, const_matrix_view<Scalar> y,
                       const char* where) const
    {
        detail::check_view(x, where, "X");
        COMPACT_REQUIRE(x.cols == in(), where, "X is ", shape_string(x), " but the layer expects (N, ", in(), ")");
        detail::check_shape(w, out_, in(), where, "W");
        detail::check_shape(y, x.rows, out_, where, "Y");
    }

    void output(const context& ctx, const_matrix_view<Scalar> x, const_matrix_view<Scalar> w, const Scalar* b,
                matrix_view<Scalar> y) const
    {
        Backend::template gemm<Scalar>(ctx, op::none, op::transpose, 1.0, x, w, 0.0, y);
        if (b) Backend::template add_row_vector<Scalar>(ctx, b, y);
    }

    index_t out_;
    projection_type projection_;
};

/// Layers that read the same input X and share one P and one Z (SPEC section 2, "input groups").
/// The rank comes from policy.rank({n, sum of the members' m, group id}).
template <class Scalar, class RankPolicy, class Backend>
class input_group {
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
