// compact/compress/wta_crs.hpp: WTA-CRS, winner-take-all column-row sampling, as a compressor (SPEC
// section 10; Liu et al., "Winner-Take-All Column Row Sampling for Memory Efficient Adaptation of
// Language Model", NeurIPS 2023, arXiv 2305.15265; a model of compress/compressor.hpp).
//
//   compact::linear_layer<float, compact::wta_crs, compact::cpu> fc(
//       compact::in_features{n}, compact::out_features{m}, options, compact::wta_crs{/*ratio*/ 0.3});
//
// The weight gradient G = dY^T X = sum_i dY_i^T X_i (m, n) is a sum over the N rows. Forward keeps k of
// them and backward forms the unbiased estimate G^ = sum_kept w_i dY_i^T X_i:
//   - k = max(minimal_k, ceil(ratio N)) (ratio N within 1e-9 of an integer counts as that integer); k = 0
//     (ratio = 0 with minimal_k = 0) and k > N are errors;
//   - p_i = |X_i| |dY_i| / sum_j |X_j| |dY_j| (the paper's Eq. 3 column-row probabilities), with |dY_i|
//     from the previous backward of the same layer: the compressor's state (below). Uniform |dY_i| on the
//     first step, when the previous backward had another row count, or when its norms are all zero or not
//     finite. Rows whose previous |dY_i| is below 1e-3 of the mean get 1e-3 of the mean (norm_floor), so
//     that every row with X_i != 0 can be drawn and the estimate stays unbiased whatever the current dY
//     (the reference code adds 1e-8 to every product instead). If every product is zero or one is not
//     finite, p is uniform;
//   - winners (Eq. 5-6): sort p descending (ties by row), S_j the sum of the j largest, R_j = 1 - S_j (as
//     a sum of the rest); k_d = the j in [0, k] minimising R_j / (k - j), the j = k term being 0 when
//     R_k = 0 and excluded otherwise, ties to the larger j. So no winners when 1/k is below every score,
//     and k = N keeps every row with weight 1: G^ = G exactly (same rows, same order, one GEMM);
//   - the other k_s = k - k_d rows are drawn with replacement from q_i = p_i / R_{k_d} over the rest,
//     each draw t from a Philox4x32-10 uniform keyed by (seed, layer id, step mod 2^32, t), and weighted
//     w_i = R_{k_d} / (k_s p_i); winners have w_i = 1. The k kept rows are stored sorted by row index.
//   Then E[G^] = G over the draws (tested statistically in tests/test_wta_crs.cpp).
//
// Saved: the k kept rows of X, each multiplied by its weight (k, n) Scalar, then their row indices (k)
// int64: k n sizeof(Scalar) + 8 k bytes (rounded up to 64) instead of N n sizeof(Scalar), e.g. 30% of
// X's bytes plus 8 B per kept row at ratio 0.3. The gradient is full-shape (subspace = false): compressed_
// adamw runs plain AdamW.
//
// State (compressor.hpp; state_bytes(max_rows) = 64 + max_rows sizeof(norm_type), rounded up to 64):
//   acc_rows  u64              the rows of the backward(s) accumulated below (0: none since the last compress)
//   acc       (max_rows) norm_type   sum over this saved activation's backward calls of |dY_i|^2
// weight_gradient adds its |dY_i|^2 to acc and sets acc_rows = N (device ops, no synchronisation); compress
// reads acc_rows and acc (when acc_rows == N) for its probabilities, then zeroes both. In an input group
// every member's backward sees its own dY slice (N, m_k) and adds its squared row norms, so acc holds the
// squared row norms of the group's whole dY = [dY_1 ... dY_K] (N, sum m_k), which is what p needs. Forward
// calls without a backward in between (several micro-batches forwarded before their backwards) see a
// zeroed acc: uniform |dY|, still unbiased. bind_state zeroes everything (the first step is uniform).
// norm_type is double for Scalar = double and float otherwise.
//
// Costs for N rows, m outputs, n inputs, k kept: compress N n (row norms) + k n (gather) on the
// backend, and on the host O(N log N) (the sort) + O(k_s log N) (the draws), from the N row norms and
// N previous dY norms copied to the host: two synchronous copies of about 4 N bytes (8 N for double)
// each, and two copies of k indices and weights back; so compress synchronises the stream twice per call
// (the sampling decision is sequential and data dependent). weight_gradient: N m (norms) + k m (gather)
// + k m n multiply-adds (the GEMM), no synchronisation. Workspace: max(k m Scalar, N + k norm_type)
// bytes, rounded. Host scratch: about 40 max_rows bytes, allocated by bind_state and shared by copies
// (so copies must not compress concurrently). Deterministic given X, the state, the seed, the layer id
// and the step.
#pragma once

#include "compact/backend/backend.hpp"
#include "compact/compress/compressor.hpp"
#include "compact/core/checked.hpp"
#include "compact/core/config.hpp"
#include "compact/core/error.hpp"
#include "compact/core/matrix_view.hpp"
#include "compact/core/shape.hpp"
#include "compact/core/workspace.hpp"
#include "compact/random/philox.hpp"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <type_traits>
#include <vector>

COMPACT_NAMESPACE_BEGIN

template <class Scalar, class Backend>
class wta_crs_compressor;

/// The Policy of a layer whose weight gradient is estimated from k sampled rows (WTA-CRS).
struct wta_crs {
    double ratio = 0.3;    ///< k = max(minimal_k, ceil(ratio N)); the paper's WTA-CRS@0.3 (it also runs 0.1)
    index_t minimal_k = 1; ///< the reference code's default is 10 (and clamps k to N, which we refuse)

    template <class Scalar, class Backend>
    using compressor = wta_crs_compressor<Scalar, Backend>;
};

namespace detail {

/// The rows WTA-CRS keeps and their weights, in ascending row order.
struct wta_crs_selection {
    std::vector<index_t> rows;
    std::vector<double> weights;
    index_t winners = 0; ///< k_d
};

/// Host scratch for the sampling decision, reused from call to call.
struct wta_crs_scratch {
    std::vector<double> x_norms, dy_norms, p, cumulative;
    std::vector<index_t> order, rows_sorted;
    std::vector<double> weights_sorted;
    std::vector<std::byte> state;
    wta_crs_selection selection;

    void reserve(std::size_t rows, std::size_t state_bytes)
    {
        x_norms.reserve(rows), dy_norms.reserve(rows), p.reserve(rows), cumulative.reserve(rows + 1);
        order.reserve(rows), rows_sorted.reserve(rows), weights_sorted.reserve(rows);
        selection.rows.reserve(rows), selection.weights.reserve(rows);
        state.reserve(state_bytes);
    }
};

/// The scratch with a staging buffer for the backend's norm type.
template <class A>
struct wta_crs_host : wta_crs_scratch {
    std::vector<A> staged; ///< N norms of X, then k weights
};

/// A uniform double in [0, 1) with 53 random bits: draw t of (seed, layer, step).
inline double wta_crs_uniform(std::uint64_t seed, std::uint64_t layer, std::uint64_t step, std::uint64_t t) noexcept
{
    constexpr std::uint32_t salt = 0x77C2A5E1u; // keeps these keys apart from projection and noise keys
    const philox_counter c = philox4x32({{static_cast<std::uint32_t>(t), static_cast<std::uint32_t>(step),
                                          static_cast<std::uint32_t>(layer), static_cast<std::uint32_t>(layer >> 32)}},
                                        {{static_cast<std::uint32_t>(seed) ^ salt, static_cast<std::uint32_t>(seed >> 32)}});
    const std::uint64_t bits = (static_cast<std::uint64_t>(c.w[0] >> 5) << 26) | (c.w[1] >> 6);
    return static_cast<double>(bits) * 0x1p-53;
}

/// The sampling decision of SPEC section 10 on the host. x_sq: N squared row norms of X; dy_sq: N
/// squared row norms of the previous dY, or empty for uniform. Writes s.selection.
inline void wta_crs_select(wta_crs_scratch& s, const double* x_sq, const double* dy_sq, index_t n, index_t k,
                           std::uint64_t seed, std::uint64_t layer, std::uint64_t step, double norm_floor)
{
    const auto N = static_cast<std::size_t>(n);
    auto& p = s.p;
    p.assign(N, 1.0);
    bool dy_usable = dy_sq != nullptr;
    double dy_mean = 0;
    if (dy_usable) {
        for (std::size_t i = 0; i < N; ++i) dy_mean += std::sqrt(dy_sq[i]);
        dy_mean /= static_cast<double>(n);
        dy_usable = std::isfinite(dy_mean) && dy_mean > 0;
    }
    double total = 0;
    for (std::size_t i = 0; i < N; ++i) {
        const double d = dy_usable ? std::max(std::sqrt(dy_sq[i]), norm_floor * dy_mean) : 1.0;
        p[i] = std::sqrt(x_sq[i]) * d;
        total += p[i];
    }
    if (!(std::isfinite(total) && total > 0)) std::fill(p.begin(), p.end(), 1.0), total = static_cast<double>(n);
    for (double& v : p) v /= total;

    // Winners: the j in [0, k] minimising R_j / (k - j), R_j the mass outside the j largest.
    auto& order = s.order;
    order.resize(N);
    std::iota(order.begin(), order.end(), index_t{0});
    std::stable_sort(order.begin(), order.end(), [&](index_t a, index_t b) { return p[static_cast<std::size_t>(a)] > p[static_cast<std::size_t>(b)]; });
    auto& rest = s.cumulative; // rest[j] = sum of p over order[j..N), summed from the small end
    rest.assign(N + 1, 0.0);
    for (std::size_t j = N; j-- > 0;) rest[j] = rest[j + 1] + p[static_cast<std::size_t>(order[j])];
    index_t kd = 0;
    double best = std::numeric_limits<double>::infinity();
    for (index_t j = 0; j <= k; ++j) {
        const double r = rest[static_cast<std::size_t>(j)];
        const double score = j < k ? r / static_cast<double>(k - j) : (r == 0 ? 0.0 : std::numeric_limits<double>::infinity());
        if (score <= best) best = score, kd = j;
    }

    auto& sel = s.selection;
    sel.rows.clear();
    sel.weights.clear();
    sel.winners = kd;
    for (index_t j = 0; j < kd; ++j) sel.rows.push_back(order[static_cast<std::size_t>(j)]), sel.weights.push_back(1.0);
    const index_t ks = k - kd;
    if (ks > 0) {
        // The CDF of q over the remaining rows, in ascending row order.
        const double mass = rest[static_cast<std::size_t>(kd)];
        std::vector<index_t>& remaining = order; // reuse: order[kd..N) sorted by row
        std::sort(remaining.begin() + kd, remaining.end());
        auto& cdf = s.x_norms; // x_sq may alias s.x_norms: it is no longer read
        cdf.resize(N - static_cast<std::size_t>(kd));
        double acc = 0;
        for (std::size_t t = 0; t < cdf.size(); ++t) cdf[t] = acc += p[static_cast<std::size_t>(remaining[static_cast<std::size_t>(kd) + t])];
        for (index_t t = 0; t < ks; ++t) {
            const double target = wta_crs_uniform(seed, layer, step, static_cast<std::uint64_t>(t)) * acc;
            auto it = std::upper_bound(cdf.begin(), cdf.end(), target);
            if (it == cdf.end()) it = std::lower_bound(cdf.begin(), cdf.end(), acc); // rounding at the top end
            const index_t row = remaining[static_cast<std::size_t>(kd) + static_cast<std::size_t>(it - cdf.begin())];
            sel.rows.push_back(row);
            sel.weights.push_back(mass / (static_cast<double>(ks) * p[static_cast<std::size_t>(row)]));
        }
    }
    // Ascending row order (winners and draws together): k = N then keeps X's own order.
    auto& perm = s.order;
    perm.resize(sel.rows.size());
    std::iota(perm.begin(), perm.end(), index_t{0});
    std::stable_sort(perm.begin(), perm.end(), [&](index_t a, index_t b) {
        return sel.rows[static_cast<std::size_t>(a)] < sel.rows[static_cast<std::size_t>(b)];
    });
    s.rows_sorted.resize(sel.rows.size());
    s.weights_sorted.resize(sel.rows.size());
    for (std::size_t t = 0; t < perm.size(); ++t) {
        s.rows_sorted[t] = sel.rows[static_cast<std::size_t>(perm[t])];
        s.weights_sorted[t] = sel.weights[static_cast<std::size_t>(perm[t])];
    }
    sel.rows.swap(s.rows_sorted);
    sel.weights.swap(s.weights_sorted);
}

} // namespace detail

template <class Scalar, class Backend>
class wta_crs_compressor {
    COMPACT_CHECK_BACKEND(Backend);

public:
    using scalar_type = Scalar;
    using backend_type = Backend;
    using context = typename Backend::context;
    /// The type the row norms are kept and summed in.
    using norm_type = std::conditional_t<std::is_same_v<Scalar, double>, double, float>;
    struct saved_type : saved_activation {
        index_t kept = 0; ///< k
    };
    static constexpr const char* name = "wta_crs";
    static constexpr bool subspace = false;
    /// Previous |dY_i| below this fraction of their mean are raised to it (see the top of this header).
    static constexpr double norm_floor = 1e-3;
    /// Bytes before acc in the state: acc_rows and padding.
    static constexpr std::size_t state_header = 64;

    wta_crs_compressor(const compressor_setup& setup, const wta_crs& policy)
        : in_(setup.in), out_(setup.out), ratio_(policy.ratio), minimal_k_(policy.minimal_k), seed_(setup.seed),
          layer_(setup.layer), scratch_(std::make_shared<detail::wta_crs_host<norm_type>>())
    {
        COMPACT_REQUIRE(setup.in >= 1, setup.where, "in=", setup.in, " must be positive");
        COMPACT_REQUIRE(std::isfinite(policy.ratio) && policy.ratio >= 0 && policy.ratio <= 1, setup.where,
                        "wta_crs ratio=", policy.ratio, " must be in [0, 1]");
        COMPACT_REQUIRE(policy.minimal_k >= 0, setup.where, "wta_crs minimal_k=", policy.minimal_k, " must not be negative");
        COMPACT_REQUIRE(policy.ratio > 0 || policy.minimal_k > 0, setup.where, "wta_crs ratio=", policy.ratio,
                        " with minimal_k=", policy.minimal_k, " keeps k = 0 rows: raise ratio or minimal_k");
    }

    index_t in() const noexcept { return in_; }
    index_t gradient_cols() const noexcept { return in_; }
    double ratio() const noexcept { return ratio_; }
    index_t minimal_k() const noexcept { return minimal_k_; }

    /// k for N rows: max(minimal_k, ceil(ratio N)), 0 for N = 0 (not checked against N).
    index_t kept_rows(index_t rows) const noexcept
    {
        if (rows <= 0) return 0;
        const double x = ratio_ * static_cast<double>(rows);
        const double f = std::floor(x);
        const auto k = static_cast<index_t>(x - f <= 1e-9 * std::max(1.0, x) ? f : f + 1);
        return std::max(minimal_k_, k);
    }

    /// Bytes for N rows: k n sizeof(Scalar) (rounded up to 64) + 8 k. Errors when k > N.
    std::size_t saved_bytes(index_t rows) const
    {
        const index_t k = checked_kept(rows, "wta_crs::saved_bytes");
        return detail::align_up(detail::checked_mul_size(k, in_, sizeof(Scalar), "wta_crs::saved_bytes")) +
               static_cast<std::size_t>(k) * sizeof(index_t);
    }

    /// Workspace for compress and weight_gradient with up to `rows` rows.
    std::size_t workspace_bytes(index_t rows) const
    {
        const index_t n = std::max<index_t>(rows, 0);
        const index_t k = std::min(kept_rows(n), n);
        const std::size_t fwd = detail::buffer_bytes<norm_type>(n) + detail::buffer_bytes<norm_type>(k);
        const std::size_t bwd = detail::align_up(detail::checked_mul_size(k, out_, sizeof(Scalar), "wta_crs::workspace_bytes"));
        return std::max(fwd, bwd) + detail::workspace_slack;
    }

    /// Bytes of the norm state for forwards of at most max_rows rows.
    std::size_t state_bytes(index_t max_rows) const
    {
        COMPACT_REQUIRE(max_rows >= 0, "wta_crs::state_bytes", "max_rows=", max_rows, " must not be negative");
        return state_header + detail::align_up(detail::checked_mul_size(max_rows, 1, sizeof(norm_type), "wta_crs::state_bytes"));
    }

    /// Binds the norm state to caller memory (state_bytes(max_rows) bytes on the backend's device) and
    /// zeroes it on ctx's stream; max_rows is taken from `bytes`.
    void bind_state(const context& ctx, void* data, std::size_t bytes)
    {
        check_state_memory(data, bytes, state_header, "wta_crs::bind_state");
        state_ = static_cast<std::byte*>(data);
        capacity_ = static_cast<index_t>((bytes - state_header) / sizeof(norm_type));
        Backend::template fill<std::uint64_t>(ctx, {acc_rows_ptr(), 1, 1}, std::uint64_t{0});
        if (capacity_ > 0) Backend::template fill<norm_type>(ctx, {acc_ptr(), 1, capacity_}, norm_type(0));
        const auto cap = static_cast<std::size_t>(capacity_);
        scratch_->reserve(cap, state_header + cap * sizeof(norm_type));
        scratch_->staged.reserve(cap);
    }
    bool state_bound() const noexcept { return state_ != nullptr; }
    /// The most rows the bound state holds norms for.
    index_t state_rows() const noexcept { return capacity_; }

    /// The kept rows (k, n), each times its weight, and their row indices (k) of a saved activation.
    const_matrix_view<Scalar> kept_x(const saved_type& saved) const noexcept
    {
        return {reinterpret_cast<const Scalar*>(saved.data), saved.kept, in_};
    }
    const index_t* kept_indices(const saved_type& saved) const noexcept
    {
        return reinterpret_cast<const index_t*>(saved.data + index_offset(saved.kept));
    }

    /// Samples k rows of X (N, n) and keeps them, weighted, with their indices.
    void compress(const context& ctx, const_matrix_view<Scalar> x, std::uint64_t step, saved_type& saved,
                  workspace ws) const
    {
        constexpr const char* where = "wta_crs::compress";
        detail::check_view(x, where, "X");
        COMPACT_REQUIRE(x.cols == in_, where, "X is ", shape_string(x), " but the compressor expects (N, ", in_, ")");
        require_state(x.rows, where);
        const index_t n = x.rows;
        const index_t k = checked_kept(n, where);
        check_saved_memory<aligned_type>(saved, saved_bytes(n), where);
        detail::workspace_carver carve(
            ws, detail::buffer_bytes<norm_type>(n) + detail::buffer_bytes<norm_type>(k) + detail::workspace_slack, where);
        saved.filled = false;
        if (n > 0) {
            norm_type* x_norms = carve.take<norm_type>(n);
            norm_type* weights = carve.take<norm_type>(k);
            Backend::template row_sq_norms<Scalar, norm_type>(ctx, x, norm_type(0), x_norms);

            auto& s = *scratch_;
            // The previous backward's norms: acc_rows and acc[0, N) in one synchronous copy.
            s.state.resize(state_header + static_cast<std::size_t>(n) * sizeof(norm_type));
            Backend::copy_to_host(ctx, state_, s.state.data(), s.state.size());
            std::uint64_t acc_rows = 0;
            std::memcpy(&acc_rows, s.state.data(), sizeof acc_rows);
            const bool have_dy = acc_rows == static_cast<std::uint64_t>(n);
            s.dy_norms.resize(have_dy ? static_cast<std::size_t>(n) : 0);
            for (std::size_t i = 0; i < s.dy_norms.size(); ++i) {
                norm_type v;
                std::memcpy(&v, s.state.data() + state_header + i * sizeof(norm_type), sizeof v);
                s.dy_norms[i] = static_cast<double>(v);
            }
            // This compress consumes them: the next backward accumulates from zero.
            Backend::template fill<std::uint64_t>(ctx, {acc_rows_ptr(), 1, 1}, std::uint64_t{0});
            Backend::template fill<norm_type>(ctx, {acc_ptr(), 1, capacity_}, norm_type(0));

            std::vector<norm_type>& host_norms = s.staged;
            host_norms.resize(static_cast<std::size_t>(n));
            Backend::copy_to_host(ctx, x_norms, host_norms.data(), static_cast<std::size_t>(n));
            s.x_norms.resize(static_cast<std::size_t>(n));
            for (std::size_t i = 0; i < s.x_norms.size(); ++i) s.x_norms[i] = static_cast<double>(host_norms[i]);

            detail::wta_crs_select(s, s.x_norms.data(), have_dy ? s.dy_norms.data() : nullptr, n, k, seed_, layer_,
                                   step & 0xFFFFFFFFu, norm_floor);
            host_norms.resize(static_cast<std::size_t>(k));
            for (std::size_t t = 0; t < host_norms.size(); ++t) host_norms[t] = static_cast<norm_type>(s.selection.weights[t]);
            index_t* indices = reinterpret_cast<index_t*>(saved.data + index_offset(k));
            Backend::copy_from_host(ctx, s.selection.rows.data(), indices, static_cast<std::size_t>(k));
            Backend::copy_from_host(ctx, host_norms.data(), weights, static_cast<std::size_t>(k));
            Backend::template gather_rows<Scalar, norm_type>(ctx, x, indices, weights,
                                                             matrix_view<Scalar>(reinterpret_cast<Scalar*>(saved.data), k, in_));
            last_winners_ = s.selection.winners;
        }
        saved.filled = true;
        saved.rows = n;
        saved.kept = k;
        saved.layer = layer_;
        saved.epoch = step;
    }

    /// G (m, n) = (or +=) sum_kept w_i dY_i^T X_i; adds |dY_i|^2 to the norm state. dY: (N, m).
    void weight_gradient(const context& ctx, const_matrix_view<Scalar> dy, const saved_type& saved,
                         matrix_view<Scalar> g, write_mode mode, workspace ws) const
    {
        constexpr const char* where = "wta_crs::weight_gradient";
        detail::check_view(dy, where, "dY");
        check_saved(saved, dy.rows, layer_, where);
        detail::check_shape(g, dy.cols, in_, where, "G");
        require_state(dy.rows, where);
        COMPACT_REQUIRE(saved.kept == kept_rows(dy.rows), where, "the saved activation keeps ", saved.kept,
                        " rows but this compressor keeps ", kept_rows(dy.rows), " of ", dy.rows);
        const bool accumulate = mode == write_mode::accumulate;
        if (dy.rows == 0) {
            if (!accumulate) Backend::template fill<Scalar>(ctx, g, Scalar(0));
            return;
        }
        const index_t k = saved.kept, m = dy.cols;
        detail::workspace_carver carve(ws, detail::buffer_bytes<Scalar>(k * m) + detail::workspace_slack, where);
        Scalar* dy_kept = carve.take<Scalar>(k * m);
        Backend::template row_sq_norms<Scalar, norm_type>(ctx, dy, norm_type(1), acc_ptr());
        Backend::template fill<std::uint64_t>(ctx, {acc_rows_ptr(), 1, 1}, static_cast<std::uint64_t>(dy.rows));
        Backend::template gather_rows<Scalar, norm_type>(ctx, dy, kept_indices(saved), nullptr,
                                                         matrix_view<Scalar>(dy_kept, k, m));
        Backend::template gemm<Scalar>(ctx, op::transpose, op::none, 1.0, const_matrix_view<Scalar>(dy_kept, k, m),
                                       kept_x(saved), accumulate ? 1.0 : 0.0, g);
    }

    /// k_d of the last compress of this object (for tests and diagnostics).
    index_t last_winners() const noexcept { return last_winners_; }

    /// Configuration a loading layer must match: the ratio's bits and minimal_k.
    std::vector<compressor_field> checkpoint_fields() const
    {
        std::uint64_t bits = 0;
        std::memcpy(&bits, &ratio_, sizeof bits);
        return {{"wta_ratio", bits, false}, {"wta_minimal_k", static_cast<std::uint64_t>(minimal_k_), false}};
    }
    void load_checkpoint_fields(const std::vector<compressor_field>&, const char*) {}

private:
    // Saved memory must be aligned for both the rows and the int64 indices behind them.
    using aligned_type = std::conditional_t<(alignof(Scalar) > alignof(index_t)), Scalar, index_t>;

    index_t checked_kept(index_t rows, const char* where) const
    {
        const index_t k = kept_rows(rows);
        COMPACT_REQUIRE(k <= rows, where, "k = max(minimal_k=", minimal_k_, ", ceil(ratio=", ratio_, " * N)) = ", k,
                        " exceeds N=", rows, " rows of X (", rows, ", ", in_, ")");
        return k;
    }

    std::size_t index_offset(index_t k) const noexcept
    {
        return detail::align_up(static_cast<std::size_t>(k) * static_cast<std::size_t>(in_) * sizeof(Scalar));
    }

    void require_state(index_t rows, const char* where) const
    {
        COMPACT_REQUIRE(state_ != nullptr, where, "the compressor's state (the previous dY row norms) is not bound: call "
                        "bind_state(ctx, data, state_bytes(max_rows)) first (linear_layer and input_group::bind_state "
                        "do it)");
        COMPACT_REQUIRE(rows <= capacity_, where, "N=", rows, " rows but the state was bound for max_rows=", capacity_);
    }

    std::uint64_t* acc_rows_ptr() const noexcept { return reinterpret_cast<std::uint64_t*>(state_); }
    norm_type* acc_ptr() const noexcept { return reinterpret_cast<norm_type*>(state_ + state_header); }

    index_t in_ = 0;
    index_t out_ = 0;
    double ratio_ = 0.3;
    index_t minimal_k_ = 1;
    std::uint64_t seed_ = 0;
    std::uint64_t layer_ = 0;
    std::byte* state_ = nullptr; // the caller's state memory, shared by copies
    index_t capacity_ = 0;
    std::shared_ptr<detail::wta_crs_host<norm_type>> scratch_;
    mutable index_t last_winners_ = 0;
};

COMPACT_NAMESPACE_END
