// compact/compress/projection_source.hpp: the one owner of a layer's projection P (SPEC sections 1-2).
//
// A projection_source describes one seeded projection P (n, r): its shape, distribution, seed and layer
// id. P of an epoch is a pure function of that description (random/projection.hpp); the source is the
// only place in the library that turns it into numbers, for every user of P: the compressor's forward
// (Z = X P), the subspace optimizer's update (W -= ... N P^T), the moment transfer at an epoch change and
// the full-shape gradient estimate G_sub P^T.
//
// P is either regenerated into the caller's workspace whenever it is needed (the default: no memory
// between uses, SPEC section 1) or kept: keep(storage) hands the source (n, r) of caller memory that then
// holds P of the last epoch asked for, regenerated only when the epoch moves on. Kept or regenerated, P
// has the same bits. A copy of a source describes the same P but never shares the kept storage (two
// owners of one cache could each believe it holds their epoch): copies regenerate.
//
// The identity (r = n, P = I) needs no numbers: compress copies X, expand copies G_sub, and the
// optimizer runs plain AdamW; workspace_bytes() is 0 for it.
#pragma once

#include "compact/backend/backend.hpp"
#include "compact/core/checked.hpp"
#include "compact/core/config.hpp"
#include "compact/core/error.hpp"
#include "compact/core/matrix_view.hpp"
#include "compact/core/rank_policy.hpp"
#include "compact/core/workspace.hpp"
#include "compact/random/projection.hpp"

#include <cstddef>
#include <cstdint>

COMPACT_NAMESPACE_BEGIN

template <class Scalar, class Backend>
class projection_source {
    COMPACT_CHECK_BACKEND(Backend);

public:
    using scalar_type = Scalar;
    using backend_type = Backend;
    using context = typename Backend::context;

    projection_source() = default;

    /// P is (in, rank); `seed` is the run's seed and `layer` this projection's unique id.
    projection_source(index_t in, index_t rank, distribution dist, std::uint64_t seed, std::uint64_t layer,
                      const char* where = "projection_source")
        : in_(in), rank_(rank), dist_(dist), seed_(seed), layer_(layer)
    {
        detail::check_projection(spec(0), where);
    }

    /// Rank from a policy, for a layer (or input group) described by `info` (info.id becomes the layer
    /// id). A policy that forces the identity gets distribution::identity whatever `dist` says.
    /// `where` names the caller's function in errors.
    template <class Policy>
    static projection_source from_policy(const layer_info& info, const Policy& policy, std::uint64_t seed,
                                         distribution dist = distribution::gaussian,
                                         const char* where = "projection_source::from_policy")
    {
        const index_t r = resolve_rank(policy, info, where);
        return projection_source(info.in, r, forces_identity_projection<Policy> ? distribution::identity : dist, seed,
                                 info.id, where);
    }

    projection_source(const projection_source& other) noexcept
        : in_(other.in_), rank_(other.rank_), dist_(other.dist_), seed_(other.seed_), layer_(other.layer_)
    {
    }
    projection_source& operator=(const projection_source& other) noexcept
    {
        if (this != &other) *this = projection_source(other);
        return *this;
    }
    projection_source(projection_source&&) noexcept = default;
    projection_source& operator=(projection_source&&) noexcept = default;

    index_t in() const noexcept { return in_; }
    index_t rank() const noexcept { return rank_; }
    distribution dist() const noexcept { return dist_; }
    std::uint64_t seed() const noexcept { return seed_; }
    std::uint64_t layer() const noexcept { return layer_; }
    bool is_identity() const noexcept { return dist_ == distribution::identity; }

    /// The full description of P for an epoch (see resampling::epoch).
    projection_spec spec(std::uint64_t epoch) const noexcept { return {in_, rank_, dist_, {seed_, layer_, epoch}}; }

    /// True when both describe the same P for every epoch.
    bool same_projection(const projection_source& other) const noexcept
    {
        return in_ == other.in_ && rank_ == other.rank_ && dist_ == other.dist_ && seed_ == other.seed_ &&
               layer_ == other.layer_;
    }

    /// Keeps P in `storage` (n, r) of caller memory (on the backend's device) from now on; it must
    /// outlive its use here. An empty view goes back to regenerating. Ignored for the identity.
    void keep(matrix_view<Scalar> storage)
    {
        constexpr const char* where = "projection_source::keep";
        if (!storage.empty()) detail::check_shape(storage, in_, rank_, where, "storage");
        kept_ = is_identity() ? matrix_view<Scalar>{} : storage;
        kept_valid_ = false;
    }
    bool keeps() const noexcept { return kept_.data != nullptr; }
    /// Forgets which epoch the kept P holds (after its memory was overwritten, e.g. by a restore).
    void invalidate() noexcept { kept_valid_ = false; }

    /// Workspace for get() (and for compress() and expand()): P, unless it is kept or the identity.
    std::size_t workspace_bytes() const noexcept
    {
        return is_identity() || keeps() ? 0 : detail::buffer_bytes<Scalar>(in_ * rank_) + detail::workspace_slack;
    }

    /// Bytes of P itself, (n, r) values, for keep().
    std::size_t projection_bytes() const noexcept
    {
        return detail::checked_mul_size(in_, rank_, sizeof(Scalar), "projection_source::projection_bytes");
    }

    /// P (n, r) of `epoch`: the kept copy, regenerated first when it holds another epoch, or generated
    /// into the next workspace_bytes() of `carve`. Empty for the identity. The caller has checked the
    /// epoch (check_epoch) and sized the workspace.
    const_matrix_view<Scalar> get(const context& ctx, std::uint64_t epoch, detail::workspace_carver& carve) const
    {
        if (is_identity()) return {};
        if (keeps()) {
            if (!kept_valid_ || kept_epoch_ != epoch) {
                generate(ctx, epoch, kept_);
                kept_epoch_ = epoch;
                kept_valid_ = true;
            }
            return kept_;
        }
        matrix_view<Scalar> p(carve.take<Scalar>(in_ * rank_), in_, rank_);
        generate(ctx, epoch, p);
        return p;
    }

    /// P of `epoch` rounded to T into out (n, r): the single place where P's values are produced.
    template <class T>
    void generate(const context& ctx, std::uint64_t epoch, matrix_view<T> out) const
    {
        constexpr const char* where = "projection_source::generate";
        check_epoch(epoch, where);
        detail::check_shape(out, in_, rank_, where, "P");
        Backend::template generate_projection<T>(ctx, spec(epoch), 0, 0, out);
    }

    /// Validates an epoch: below 2^32, the counter word P's generator has for it.
    void check_epoch(std::uint64_t epoch, const char* where) const { detail::check_projection(spec(epoch), where); }

    /// Z = X P. X: (N, n), Z: (N, r), both row-major. Cost: N n r multiply-adds, plus generating P unless
    /// it is kept. Needs workspace_bytes().
    void compress(const context& ctx, const_matrix_view<Scalar> x, std::uint64_t epoch, matrix_view<Scalar> z,
                  workspace ws) const
    {
        constexpr const char* where = "projection_source::compress";
        check_compress(x, epoch, z, ws, where);
        detail::workspace_carver carve(ws, workspace_bytes(), where);
        compress_checked(ctx, x, epoch, z, carve);
    }

    /// The checks compress() makes, for callers that validate everything before writing anything.
    void check_compress(const_matrix_view<Scalar> x, std::uint64_t epoch, const_matrix_view<Scalar> z,
                        const workspace& ws, const char* where) const
    {
        detail::check_view(x, where, "X");
        COMPACT_REQUIRE(x.cols == in_, where, "X is ", shape_string(x), " but the projection expects (N, ", in_, ")");
        detail::check_shape(z, x.rows, rank_, where, "Z");
        check_epoch(epoch, where);
        detail::workspace_carver(ws, workspace_bytes(), where);
    }

    /// compress() after its checks.
    void compress_checked(const context& ctx, const_matrix_view<Scalar> x, std::uint64_t epoch, matrix_view<Scalar> z,
                          detail::workspace_carver& carve) const
    {
        if (x.rows == 0) return;
        if (is_identity()) {
            Backend::template axpby<Scalar, Scalar>(ctx, 1.0, x, 0.0, z);
            return;
        }
        const auto p = get(ctx, epoch, carve);
        Backend::template gemm<Scalar>(ctx, op::none, op::none, 1.0, x, p, 0.0, z);
    }

    /// G_hat = G_sub P^T (m, n): the unbiased full-shape estimate of the weight gradient, for callers
    /// that keep their own optimizer. G_sub: (m, r). Cost: m r n multiply-adds plus generating P.
    void expand(const context& ctx, const_matrix_view<Scalar> g_sub, std::uint64_t epoch, matrix_view<Scalar> g_hat,
                workspace ws) const
    {
        constexpr const char* where = "projection_source::expand";
        detail::check_view(g_sub, where, "G_sub");
        COMPACT_REQUIRE(g_sub.cols == rank_, where, "G_sub is ", shape_string(g_sub), " but (m, r=", rank_,
                        ") is required");
        detail::check_shape(g_hat, g_sub.rows, in_, where, "G_hat");
        check_epoch(epoch, where);
        detail::workspace_carver carve(ws, workspace_bytes(), where);
        if (g_sub.rows == 0) return;
        if (is_identity()) {
            Backend::template axpby<Scalar, Scalar>(ctx, 1.0, g_sub, 0.0, g_hat);
            return;
        }
        const auto p = get(ctx, epoch, carve);
        Backend::template gemm<Scalar>(ctx, op::none, op::transpose, 1.0, g_sub, p, 0.0, g_hat);
    }

private:
    index_t in_ = 0;
    index_t rank_ = 0;
    distribution dist_ = distribution::gaussian;
    std::uint64_t seed_ = 0;
    std::uint64_t layer_ = 0;
    matrix_view<Scalar> kept_{};
    mutable std::uint64_t kept_epoch_ = 0;
    mutable bool kept_valid_ = false;
};

COMPACT_NAMESPACE_END
