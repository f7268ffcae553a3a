// compact/compress/random_projection.hpp: CompAct's seeded random projection as a compressor
// (SPEC sections 1-2, a model of compress/compressor.hpp).
//
// Forward keeps Z = X P (N, r) instead of X (N, n); backward forms the subspace weight gradient
// G_sub = dY^T Z (m, r) = G P, and the optimizer (optim/subspace_adamw.hpp) applies its update through
// P^T. P (n, r) comes from the compressor's projection_source, whose rank a rank policy chose; its epoch
// is step / T with T the resampling gap (compressor_setup::resample), so every micro-batch of one update
// uses one P and a new P is drawn every T updates.
//
// Costs for N rows: compress N n r multiply-adds (plus generating P unless it is kept), weight_gradient
// m N r; saved N r sizeof(Scalar) bytes instead of N n. With rank::full (P = I, r = n) Z is a copy of X
// and the gradient is exact: the uncompressed layer through the same code.
#pragma once

#include "compact/backend/backend.hpp"
#include "compact/compress/compressor.hpp"
#include "compact/compress/projection_source.hpp"
#include "compact/core/checked.hpp"
#include "compact/core/config.hpp"
#include "compact/core/error.hpp"
#include "compact/core/matrix_view.hpp"
#include "compact/core/rank_policy.hpp"
#include "compact/core/shape.hpp"
#include "compact/core/workspace.hpp"
#include "compact/random/projection.hpp"

#include <cstddef>
#include <cstdint>
#include <vector>

COMPACT_NAMESPACE_BEGIN

template <class Scalar, class Backend, class RankPolicy>
class random_projection {
    COMPACT_CHECK_RANK_POLICY(RankPolicy);
    COMPACT_CHECK_BACKEND(Backend);

public:
    using scalar_type = Scalar;
    using backend_type = Backend;
    using context = typename Backend::context;
    using saved_type = saved_activation;
    using source_type = projection_source<Scalar, Backend>;
    static constexpr const char* name = "random_projection";
    static constexpr bool subspace = true;

    /// r = policy.rank({in, out, layer}); P keyed by (seed, layer, step / resample.gap).
    explicit random_projection(const compressor_setup& setup, const RankPolicy& policy = RankPolicy{})
        : source_(source_type::from_policy(layer_info{setup.in, setup.out, setup.layer}, policy, setup.seed,
                                           setup.dist, setup.where)),
          resample_(setup.resample)
    {
    }

    /// A compressor over an existing projection (for example one shared by an input group).
    explicit random_projection(source_type source, resampling resample = {})
        : source_(std::move(source)), resample_(resample)
    {
    }

    index_t in() const noexcept { return source_.in(); }
    index_t rank() const noexcept { return source_.rank(); }
    index_t gradient_cols() const noexcept { return source_.rank(); }
    resampling resample() const noexcept { return resample_; }
    const source_type& projection() const noexcept { return source_; }
    /// Mutable, to keep P in caller memory (projection_source::keep).
    source_type& projection() noexcept { return source_; }

    /// The epoch of P after `step` completed updates.
    std::uint64_t epoch(std::uint64_t step) const noexcept { return resample_.epoch(step); }

    /// Bytes of Z for N rows: N r sizeof(Scalar), against X's N n sizeof(Scalar).
    std::size_t saved_bytes(index_t rows) const
    {
        return detail::checked_mul_size(rows, source_.rank(), sizeof(Scalar), "random_projection::saved_bytes");
    }
    /// Workspace for compress (P, unless kept or the identity); weight_gradient needs none.
    std::size_t workspace_bytes(index_t = 0) const noexcept { return source_.workspace_bytes(); }

    /// Z (N, r) of a saved activation this compressor wrote.
    const_matrix_view<Scalar> z(const saved_type& saved) const noexcept
    {
        return {reinterpret_cast<const Scalar*>(saved.data), saved.rows, source_.rank()};
    }

    /// Z = X P with P of epoch(step) into saved. X: (N, n).
    void compress(const context& ctx, const_matrix_view<Scalar> x, std::uint64_t step, saved_type& saved,
                  workspace ws) const
    {
        constexpr const char* where = "random_projection::compress";
        detail::check_view(x, where, "X");
        COMPACT_REQUIRE(x.cols == in(), where, "X is ", shape_string(x), " but the projection expects (N, ", in(), ")");
        const std::uint64_t e = epoch(step);
        source_.check_epoch(e, where);
        check_saved_memory<Scalar>(saved, saved_bytes(x.rows), where);
        detail::workspace_carver carve(ws, workspace_bytes(), where);
        matrix_view<Scalar> z(reinterpret_cast<Scalar*>(saved.data), x.rows, rank());
        source_.compress_checked(ctx, x, e, z, carve);
        saved.filled = true;
        saved.rows = x.rows;
        saved.layer = source_.layer();
        saved.epoch = e;
    }

    /// G_sub (m, r) = (or +=) dY^T Z. dY: (N, m).
    void weight_gradient(const context& ctx, const_matrix_view<Scalar> dy, const saved_type& saved,
                         matrix_view<Scalar> g, write_mode mode, workspace = {}) const
    {
        constexpr const char* where = "random_projection::weight_gradient";
        detail::check_view(dy, where, "dY");
        check_saved(saved, dy.rows, source_.layer(), where);
        detail::check_shape(g, dy.cols, rank(), where, "G_sub");
        const double beta = mode == write_mode::accumulate ? 1.0 : 0.0;
        if (dy.rows == 0) {
            if (beta == 0.0) Backend::template fill<Scalar>(ctx, g, Scalar(0));
            return;
        }
        Backend::template gemm<Scalar>(ctx, op::transpose, op::none, 1.0, dy, z(saved), beta, g);
    }

    /// Configuration a checkpoint records and a loading layer must match.
    std::vector<compressor_field> checkpoint_fields() const
    {
        return {{"distribution", static_cast<std::uint64_t>(source_.dist()), false}};
    }
    void load_checkpoint_fields(const std::vector<compressor_field>&, const char*) {}

private:
    source_type source_;
    resampling resample_{};
};

COMPACT_NAMESPACE_END
