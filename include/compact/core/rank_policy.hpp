// compact/core/rank_policy.hpp: how a layer's shape becomes its projection rank r (SPEC section 4).
//
// A rank policy is any copyable type with the member
//
//     index_t rank(const compact::layer_info& layer) const;   // returns r in [1, layer.in]
//
// and, optionally, `static constexpr bool identity_projection = true;` to force P = I (then the rank must
// be layer.in). The library checks the requirement at compile time (is_rank_policy) and the returned
// rank at run time: 0, negative or above n is an error, never clamped.
//
// Provided: rank::ratio<Num, Den> (r = round(n Num / Den), at least 1: the paper's pretraining),
// rank::fixed (an absolute r: the paper's fine-tuning), rank::full (r = n with the identity projection:
// the uncompressed baseline through the same code path) and rank::budget (ranks for a set of layers that
// meet a byte budget for saved activations at the least total variance).
#pragma once

#include "compact/core/config.hpp"
#include "compact/core/error.hpp"
#include "compact/core/matrix_view.hpp"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

COMPACT_NAMESPACE_BEGIN

/// What a rank policy is told about a layer (or an input group: all layers reading one X).
struct layer_info {
    index_t in = 0;        ///< n: input features, rows of P
    index_t out = 0;       ///< m: output features (the sum over an input group's members)
    std::uint64_t id = 0;  ///< the caller's layer id, as in projection_key::layer
};

namespace detail {

template <class P, class = void>
struct has_rank_member : std::false_type {};
template <class P>
struct has_rank_member<P, std::void_t<decltype(std::declval<const P&>().rank(std::declval<const layer_info&>()))>>
    : std::is_integral<decltype(std::declval<const P&>().rank(std::declval<const layer_info&>()))> {};

template <class P, class = void>
struct policy_forces_identity : std::false_type {};
template <class P>
struct policy_forces_identity<P, std::void_t<decltype(P::identity_projection)>>
    : std::bool_constant<P::identity_projection> {};

} // namespace detail

/// True when P meets the rank-policy requirement above.
template <class P>
inline constexpr bool is_rank_policy = detail::has_rank_member<P>::value && std::is_copy_constructible_v<P>;

/// True when P asks for the identity projection.
template <class P>
inline constexpr bool forces_identity_projection = detail::policy_forces_identity<P>::value;

#define COMPACT_CHECK_RANK_POLICY(P)                                                                       \
    static_assert(::compact::is_rank_policy<P>,                                                           \
                  "compact: a rank policy must be copyable and have a const member "                       \
                  "`index_t rank(const compact::layer_info&) const` returning an integer "                 \
                  "(see compact/core/rank_policy.hpp)")

/// Asks `policy` for the rank of `layer` and validates it. `where` names the caller for errors.
template <class Policy>
index_t resolve_rank(const Policy& policy, const layer_info& layer, const char* where)
{
    COMPACT_CHECK_RANK_POLICY(Policy);
    COMPACT_REQUIRE(layer.in >= 1 && layer.out >= 1, where, "layer shape (out=", layer.out, ", in=", layer.in,
                    ") must be positive");
    const auto r = static_cast<index_t>(policy.rank(layer));
    COMPACT_REQUIRE(r >= 1 && r <= layer.in, where, "rank policy returned r=", r, " for layer ", layer.id,
                    " with n=", layer.in, "; it must be in [1, n]");
    COMPACT_REQUIRE(!forces_identity_projection<Policy> || r == layer.in, where,
                    "a policy with the identity projection must return r == n=", layer.in, ", got ", r);
    return r;
}

namespace rank {

/// r = round(n * Num / Den), at least 1. Num/Den in (0, 1].
template <int Num, int Den>
struct ratio {
    static_assert(Num > 0 && Den > 0 && Num <= Den, "compact::rank::ratio<Num, Den> needs 0 < Num <= Den");
    index_t rank(const layer_info& layer) const noexcept
    {
        return std::max<index_t>(1, (layer.in * Num + Den / 2) / Den);
    }
};

/// An absolute rank, the same for every layer (must not exceed any layer's n). There is no default: a
/// layer with rank::fixed must be given one (`rank::fixed{8}`), so forgetting it does not compile.
struct fixed {
    index_t r;
    constexpr explicit fixed(index_t rank_value) noexcept : r(rank_value) {}
    index_t rank(const layer_info&) const noexcept { return r; }
};

/// r = n with P = I: exactly the uncompressed layer, through the compressed code path.
struct full {
    static constexpr bool identity_projection = true;
    index_t rank(const layer_info& layer) const noexcept { return layer.in; }
};

/// One projection (a layer or an input group) taking part in a budget.
struct budget_layer {
    std::uint64_t id = 0;       ///< as in layer_info::id
    index_t in = 0;             ///< n
    index_t tokens = 0;         ///< N: rows of X per step (micro-batches that are alive together, summed)
    double weight = 0.0;        ///< a_l of the variance model; 0 means n + 1 (the gaussian kappa numerator)
    std::size_t value_bytes = 4;///< sizeof the saved scalar
};

/// Ranks that keep the saved activations within `byte_budget` while minimising sum_l a_l / r_l.
///
/// Saving Z costs c_l = tokens * value_bytes per unit of rank, so the continuous optimum is
/// r_l = mu * sqrt(a_l / c_l), clamped to [1, n_l] (water-filling on mu); it is rounded down, the
/// remaining bytes go, one rank at a time, to the layer whose variance drops most per byte, and single
/// ranks move between layers while that lowers the objective. With equal per-rank costs (one token
/// count and dtype for all layers, the common case) the result is the exact integer optimum; with
/// unequal costs the problem is a knapsack and the result is optimal under single-rank moves.
/// (SPEC section 4 writes r_l ~ sqrt(a_l / n_l), the same rule with a cost proportional to n_l.)
class budget {
public:
    struct entry {
        budget_layer layer;
        index_t r;
    };

    budget(std::vector<budget_layer> layers, std::size_t byte_budget) : budget_(byte_budget)
    {
        constexpr const char* where = "rank::budget";
        COMPACT_REQUIRE(!layers.empty(), where, "no layers given");
        double minimum = 0, maximum = 0;
        for (auto& l : layers) {
            COMPACT_REQUIRE(l.in >= 1 && l.tokens >= 1 && l.value_bytes >= 1, where, "layer ", l.id,
                            " has n=", l.in, ", tokens=", l.tokens, ", value_bytes=", l.value_bytes,
                            "; all must be positive");
            COMPACT_REQUIRE(l.weight >= 0 && std::isfinite(l.weight), where, "layer ", l.id, " has weight ", l.weight,
                            "; it must be finite and non-negative");
            if (l.weight == 0) l.weight = static_cast<double>(l.in + 1);
            for (auto& e : entries_)
                COMPACT_REQUIRE(e.layer.id != l.id, where, "layer id ", l.id, " appears twice");
            minimum += cost(l);
            maximum += cost(l) * static_cast<double>(l.in);
            entries_.push_back({l, 1});
        }
        const double b = static_cast<double>(byte_budget);
        COMPACT_REQUIRE(minimum <= b, where, "byte budget ", byte_budget, " is below the ",
                        static_cast<std::size_t>(minimum), " bytes that rank 1 for every layer needs");
        if (maximum <= b) {
            for (auto& e : entries_) e.r = e.layer.in;
            return;
        }
        // Water-filling: bytes(mu) is increasing in mu; bisect for bytes(mu) = b.
        auto continuous = [](const budget_layer& l, double mu) {
            return std::clamp(mu * std::sqrt(l.weight / cost(l)), 1.0, static_cast<double>(l.in));
        };
        auto bytes_at = [&](double mu) {
            double s = 0;
            for (auto& e : entries_) s += cost(e.layer) * continuous(e.layer, mu);
            return s;
        };
        double lo = 0, hi = 1;
        while (bytes_at(hi) < b) hi *= 2;
        for (int it = 0; it < 200; ++it) {
            const double mid = 0.5 * (lo + hi);
            (bytes_at(mid) <= b ? lo : hi) = mid;
        }
        double used = 0;
        for (auto& e : entries_) {
            e.r = static_cast<index_t>(std::floor(continuous(e.layer, lo)));
            used += cost(e.layer) * static_cast<double>(e.r);
        }
        // Rounding: greedily buy the largest variance reduction per byte that still fits, then move
        // single ranks between layers while that lowers the variance (a move can free bytes for more
        // purchases). Each move strictly lowers the objective, so the loop ends.
        for (;;) {
            fill_greedily(used, b);
            if (!move_one_rank(used, b)) break;
        }
    }

    index_t rank(const layer_info& layer) const
    {
        for (auto& e : entries_)
            if (e.layer.id == layer.id) {
                COMPACT_REQUIRE(e.layer.in == layer.in, "rank::budget::rank", "layer ", layer.id, " has n=",
                                layer.in, " but was budgeted with n=", e.layer.in);
                return e.r;
            }
        COMPACT_FAIL("rank::budget::rank", "layer id ", layer.id, " was not part of the budget");
    }

    const std::vector<entry>& entries() const noexcept { return entries_; }
    std::size_t byte_budget() const noexcept { return budget_; }

    /// Saved bytes per step at the chosen ranks (never above byte_budget()).
    std::size_t saved_bytes() const noexcept
    {
        std::size_t s = 0;
        for (auto& e : entries_) s += static_cast<std::size_t>(cost(e.layer)) * static_cast<std::size_t>(e.r);
        return s;
    }

    /// The objective sum_l a_l / r_l at the chosen ranks.
    double variance() const noexcept
    {
        double v = 0;
        for (auto& e : entries_) v += e.layer.weight / static_cast<double>(e.r);
        return v;
    }

private:
    static double gain_up(const entry& e) noexcept // variance removed by one more rank
    {
        const double rr = static_cast<double>(e.r);
        return e.layer.weight * (1.0 / rr - 1.0 / (rr + 1.0));
    }
    static double loss_down(const entry& e) noexcept // variance added by one rank less
    {
        const double rr = static_cast<double>(e.r);
        return e.layer.weight * (1.0 / (rr - 1.0) - 1.0 / rr);
    }

    void fill_greedily(double& used, double b)
    {
        for (;;) {
            entry* best = nullptr;
            double best_gain = 0;
            for (auto& e : entries_) {
                if (e.r >= e.layer.in || used + cost(e.layer) > b) continue;
                const double gain = gain_up(e) / cost(e.layer);
                if (gain > best_gain) best_gain = gain, best = &e;
            }
            if (!best) return;
            ++best->r;
            used += cost(best->layer);
        }
    }

    bool move_one_rank(double& used, double b)
    {
        entry* from = nullptr;
        entry* to = nullptr;
        double best = 0;
        for (auto& down : entries_) {
            if (down.r <= 1) continue;
            for (auto& up : entries_) {
                if (&up == &down || up.r >= up.layer.in) continue;
                if (used - cost(down.layer) + cost(up.layer) > b) continue;
                const double change = loss_down(down) - gain_up(up);
                if (change < best - 1e-12 * variance()) best = change, from = &down, to = &up;
            }
        }
        if (!from) return false;
        --from->r;
        ++to->r;
        used += cost(to->layer) - cost(from->layer);
        return true;
    }

    static double cost(const budget_layer& l) noexcept
    {
        return static_cast<double>(l.tokens) * static_cast<double>(l.value_bytes);
    }

    std::vector<entry> entries_;
    std::size_t budget_ = 0;
};

} // namespace rank

COMPACT_NAMESPACE_END
