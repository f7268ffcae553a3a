// compact/nn/input_projection.hpp: the compressor Z = X P of SPEC section 2.
//
// An input_projection is one seeded projection P (n, r): it turns a layer input X (N, n) into the
// compressed activation Z = X P (N, r), which is all a compressed layer keeps for its backward pass,
// and expands a subspace gradient back to full shape. Several layers that read the same X (attention
// q, k, v; MLP gate and up) share one input_projection and one Z: see input_group in
// nn/compressed_linear.hpp.
//
// It is a small value type (shape, distribution, seed, layer id); P itself is regenerated into the
// caller's workspace whenever it is needed and never kept.
#pragma once

#include "compact/backend/backend.hpp"
#include "compact/core/config.hpp"
#include "compact/core/error.hpp"
#include "compact/core/matrix_view.hpp"
#include "compact/core/projection.hpp"
#include "compact/core/rank_policy.hpp"
#include "compact/core/workspace.hpp"

#include <cstddef>
#include <cstdint>

COMPACT_NAMESPACE_BEGIN

template <class Scalar, class Backend>
class input_projection {
    COMPACT_CHECK_BACKEND(Backend);

public:
    using scalar_type = Scalar;
    using backend_type = Backend;
    using context = typename Backend::context;

    input_projection() = default;

    /// P is (in, rank); `seed` is the run's seed and `layer` this projection's unique id.
    input_projection(index_t in, index_t rank, distribution dist, std::uint64_t seed, std::uint64_t layer)
        : in_(in), rank_(rank), dist_(dist), seed_(seed), layer_(layer)
    {
        detail::check_projection(spec(0), "input_projection");
    }

    /// Rank from a policy, for a layer (or group) described by `info` (info.id becomes the layer id).
    template <class Policy>
    static input_projection from_policy(const layer_info& info, const Policy& policy, std::uint64_t seed,
                                        distribution dist = distribution::gaussian)
    {
        const index_t r = resolve_rank(policy, info, "input_projection::from_policy");
        return input_projection(info.in, r, forces_identity_projection<Policy> ? distribution::identity : dist, seed,
                                info.id);
    }

    index_t in() const noexcept { return in_; }
    index_t rank() const noexcept { return rank_; }
    distribution dist() const noexcept { return dist_; }
    std::uint64_t seed() const noexcept { return seed_; }
    std::uint64_t layer() const noexcept { return layer_; }
    bool is_identity() const noexcept { return dist_ == distribution::identity; }

    /// The full description of P for a given epoch (see resampling::epoch).
    projection_spec spec(std::uint64_t epoch) const noexcept { return {in_, rank_, dist_, {seed_, layer_, epoch}}; }

    /// Bytes of Z for N rows: what is saved for backward instead of X's N * n * sizeof(Scalar).
    std::size_t saved_bytes(index_t rows) const noexcept
    {
        return static_cast<std::size_t>(rows) * static_cast<std::size_t>(rank_) * sizeof(Scalar);
    }

    /// Workspace for compress() and expand(): room for P (none for the identity).
    std::size_t workspace_bytes() const noexcept
    {
        return is_identity() ? 0 : detail::buffer_bytes<Scalar>(in_ * rank_) + detail::workspace_slack;
    }

    /// Bytes for generate(): P itself, for every distribution (the identity included).
    std::size_t projection_bytes() const noexcept
    {
        return detail::buffer_bytes<Scalar>(in_ * rank_) + detail::workspace_slack;
    }

    /// Validates compress()'s arguments without touching memory; `where` names the caller.
    void check_compress(const_matrix_view<Scalar> x, std::uint64_t epoch, const_matrix_view<Scalar> z,
                        const workspace& ws, const char* where) const
    {
        detail::check_view(x, where, "X");
        COMPACT_REQUIRE(x.cols == in_, where, "X is ", shape_string(x), " but the projection expects (N, ", in_, ")");
        detail::check_shape(z, x.rows, rank_, where, "Z");
        detail::check_projection(spec(epoch), where);
        detail::workspace_carver(ws, workspace_bytes(), where);
    }

    /// The same for the overload that takes a kept P.
    void check_compress(const_matrix_view<Scalar> x, const_matrix_view<Scalar> p, const_matrix_view<Scalar> z,
                        const char* where) const
    {
        detail::check_view(x, where, "X");
        COMPACT_REQUIRE(x.cols == in_, where, "X is ", shape_string(x), " but the projection expects (N, ", in_, ")");
        detail::check_shape(p, in_, rank_, where, "P");
        detail::check_shape(z, x.rows, rank_, where, "Z");
    }

    /// Z = X P. X: (N, n), Z: (N, r), both row-major. Cost: N n r multiply-adds plus generating P.
    void compress(const context& ctx, const_matrix_view<Scalar> x, std::uint64_t epoch, matrix_view<Scalar> z,
                  workspace ws) const
    {
        constexpr const char* where = "input_projection::compress";
        check_compress(x, epoch, z, ws, where);
        if (is_identity()) {
            Backend::template axpby<Scalar, Scalar>(ctx, 1.0, x, 0.0, z);
            return;
        }
        auto p = generate_into(ctx, epoch, ws, where);
        Backend::template gemm<Scalar>(ctx, op::none, op::none, 1.0, x, p, 0.0, z);
    }

    /// Z = X P with P (n, r) supplied by the caller, who generated it with generate() for the current
    /// epoch and keeps it (trading n r values of memory for not regenerating it).
    void compress(const context& ctx, const_matrix_view<Scalar> x, const_matrix_view<Scalar> p,
                  matrix_view<Scalar> z) const
    {
        check_compress(x, p, z, "input_projection::compress");
        Backend::template gemm<Scalar>(ctx, op::none, op::none, 1.0, x, p, 0.0, z);
    }

    /// G_hat = G_sub P^T (m, n): the unbiased full-shape estimate of the weight gradient, for callers that
    /// keep their own optimizer. G_sub: (m, r). Cost: m r n multiply-adds plus generating P.
    void expand(const context& ctx, const_matrix_view<Scalar> g_sub, std::uint64_t epoch, matrix_view<Scalar> g_hat,
                workspace ws) const
    {
        constexpr const char* where = "input_projection::expand";
        detail::check_view(g_sub, where, "G_sub");
        COMPACT_REQUIRE(g_sub.cols == rank_, where, "G_sub is ", shape_string(g_sub), " but (m, r=", rank_,
                        ") is required");
        detail::check_shape(g_hat, g_sub.rows, in_, where, "G_hat");
        detail::check_projection(spec(epoch), where);
        detail::workspace_carver(ws, workspace_bytes(), where);
        if (is_identity()) {
            Backend::template axpby<Scalar, Scalar>(ctx, 1.0, g_sub, 0.0, g_hat);
            return;
        }
        auto p = generate_into(ctx, epoch, ws, where);
        Backend::template gemm<Scalar>(ctx, op::none, op::transpose, 1.0, g_sub, p, 0.0, g_hat);
    }

    /// Generates P (n, r) for `epoch` into the front of `ws` (projection_bytes()) and returns it, for
    /// callers that keep P for an epoch (compress and forward overloads taking P).
    matrix_view<Scalar> generate(const context& ctx, std::uint64_t epoch, workspace ws) const
    {
        constexpr const char* where = "input_projection::generate";
        detail::check_projection(spec(epoch), where);
        detail::workspace_carver(ws, projection_bytes(), where);
        return generate_into(ctx, epoch, ws, where);
    }

private:
    /// P into `ws`, whose size the caller has checked.
    matrix_view<Scalar> generate_into(const context& ctx, std::uint64_t epoch, workspace ws, const char* where) const
    {
        detail::workspace_carver carve(ws, projection_bytes(), where);
        matrix_view<Scalar> p(carve.take<Scalar>(in_ * rank_), in_, rank_);
        Backend::template generate_projection<Scalar>(ctx, spec(epoch), 0, 0, p);
        return p;
    }

    index_t in_ = 0;
    index_t rank_ = 0;
    distribution dist_ = distribution::gaussian;
    std::uint64_t seed_ = 0;
    std::uint64_t layer_ = 0;
};

COMPACT_NAMESPACE_END
