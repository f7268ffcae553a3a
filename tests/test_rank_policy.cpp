// Tests for compact/core/rank_policy.hpp: rank::ratio, rank::fixed, rank::full, rank::budget, the
// is_rank_policy trait and resolve_rank (SPEC section 4).
#include "reference.hpp"

#include <compact/backend/cpu/cpu.hpp>
#include <compact/core/rank_policy.hpp>
#include <compact/compress/projection_source.hpp>

#include <doctest/doctest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using compact_test::contains;
using compact_test::error_message_of;

using compact::index_t;
using compact::layer_info;
using compact::rank::budget;
using compact::rank::budget_layer;

// --- user-defined policies for the trait checks ------------------------------------------------

struct user_policy { // meets the requirement
    index_t rank(const layer_info& l) const { return std::max<index_t>(1, l.in / 3); }
};
struct user_policy_int { // any integral return type is accepted
    int rank(const layer_info&) const { return 2; }
};
struct user_identity_policy { // forces P = I but returns a smaller rank: resolve_rank must refuse it
    static constexpr bool identity_projection = true;
    index_t rank(const layer_info& l) const { return l.in - 1; }
};
struct no_rank_member {
    index_t r = 3;
};
struct non_const_rank {
    index_t rank(const layer_info&) { return 1; }
};
struct floating_rank {
    double rank(const layer_info&) const { return 1.0; }
};
struct wrong_argument {
    index_t rank(index_t n) const { return n; }
};
struct not_copyable {
    not_copyable() = default;
    not_copyable(const not_copyable&) = delete;
    index_t rank(const layer_info&) const { return 1; }
};
struct returns_zero {
    index_t rank(const layer_info&) const { return 0; }
};

static_assert(compact::is_rank_policy<user_policy>);
static_assert(compact::is_rank_policy<user_policy_int>);
static_assert(compact::is_rank_policy<user_identity_policy>);
static_assert(compact::is_rank_policy<compact::rank::ratio<1, 4>>);
static_assert(compact::is_rank_policy<compact::rank::fixed>);
// rank::fixed has no default rank: an r must always be given (rank::fixed{r}).
static_assert(!std::is_default_constructible_v<compact::rank::fixed>);
static_assert(compact::is_rank_policy<compact::rank::full>);
static_assert(compact::is_rank_policy<budget>);
static_assert(!compact::is_rank_policy<no_rank_member>);
static_assert(!compact::is_rank_policy<non_const_rank>);
static_assert(!compact::is_rank_policy<floating_rank>);
static_assert(!compact::is_rank_policy<wrong_argument>);
static_assert(!compact::is_rank_policy<not_copyable>);
static_assert(!compact::is_rank_policy<int>);

static_assert(compact::forces_identity_projection<compact::rank::full>);
static_assert(compact::forces_identity_projection<user_identity_policy>);
static_assert(!compact::forces_identity_projection<compact::rank::ratio<1, 2>>);
static_assert(!compact::forces_identity_projection<compact::rank::fixed>);
static_assert(!compact::forces_identity_projection<budget>);
static_assert(!compact::forces_identity_projection<user_policy>);

template <class Policy>
index_t resolve(const Policy& p, index_t in, index_t out = 8, std::uint64_t id = 0)
{
    return compact::resolve_rank(p, layer_info{in, out, id}, "test");
}

/// round(n Num / Den) computed in double (halves round up), at least 1.
index_t expected_ratio(index_t n, int num, int den)
{
    const double x = static_cast<double>(n) * num / den;
    return std::max<index_t>(1, static_cast<index_t>(std::floor(x + 0.5)));
}

template <int Num, int Den>
void check_ratio_range()
{
    const compact::rank::ratio<Num, Den> policy;
    bool all = true;
    index_t first_bad = -1;
    for (index_t n = 1; n <= 5000; ++n) {
        const bool ok = policy.rank({n, 1, 0}) == expected_ratio(n, Num, Den);
        if (!ok && first_bad < 0) first_bad = n;
        all = all && ok;
    }
    CAPTURE(Num);
    CAPTURE(Den);
    CAPTURE(first_bad);
    CHECK(all);
}

double cost(const budget_layer& l) { return static_cast<double>(l.tokens) * static_cast<double>(l.value_bytes); }
double weight(const budget_layer& l) { return l.weight > 0 ? l.weight : static_cast<double>(l.in + 1); }

/// The continuous optimum of  min sum_l a_l / r_l  s.t.  sum_l c_l r_l = B, 1 <= r_l <= n_l, found here
/// independently of the library: r_l = clamp(mu sqrt(a_l / c_l), 1, n_l) (the KKT conditions), with mu
/// bisected on a log scale.
std::vector<double> continuous_optimum(const std::vector<budget_layer>& layers, double bytes)
{
    auto ranks_at = [&](double mu) {
        std::vector<double> r;
        for (const auto& l : layers)
            r.push_back(std::clamp(mu * std::sqrt(weight(l) / cost(l)), 1.0, static_cast<double>(l.in)));
        return r;
    };
    auto bytes_at = [&](double mu) {
        const auto r = ranks_at(mu);
        double s = 0;
        for (std::size_t k = 0; k < r.size(); ++k) s += cost(layers[k]) * r[k];
        return s;
    };
    double lo = 1e-12, hi = 1e12;
    for (int it = 0; it < 400; ++it) {
        const double mid = std::sqrt(lo * hi);
        (bytes_at(mid) <= bytes ? lo : hi) = mid;
    }
    return ranks_at(lo);
}

double variance_of(const std::vector<budget_layer>& layers, const std::vector<double>& r)
{
    double v = 0;
    for (std::size_t k = 0; k < layers.size(); ++k) v += weight(layers[k]) / r[k];
    return v;
}

std::size_t min_bytes(const std::vector<budget_layer>& layers)
{
    std::size_t s = 0;
    for (const auto& l : layers) s += static_cast<std::size_t>(cost(l));
    return s;
}

std::size_t max_bytes(const std::vector<budget_layer>& layers)
{
    std::size_t s = 0;
    for (const auto& l : layers) s += static_cast<std::size_t>(cost(l)) * static_cast<std::size_t>(l.in);
    return s;
}

/// Properties every budget allocation must have, whatever the inputs.
void check_budget_invariants(const std::vector<budget_layer>& layers, std::size_t bytes, const budget& b)
{
    REQUIRE(b.entries().size() == layers.size());
    CHECK(b.byte_budget() == bytes);
    std::size_t used = 0;
    double variance = 0;
    for (std::size_t k = 0; k < layers.size(); ++k) {
        const auto& e = b.entries()[k];
        CHECK(e.layer.id == layers[k].id);
        CHECK(e.r >= 1);
        CHECK(e.r <= layers[k].in);
        // The rank policy interface returns the same ranks.
        CHECK(b.rank({layers[k].in, 1, layers[k].id}) == e.r);
        used += static_cast<std::size_t>(cost(layers[k])) * static_cast<std::size_t>(e.r);
        variance += weight(layers[k]) / static_cast<double>(e.r);
    }
    CHECK(used == b.saved_bytes());
    CHECK(used <= bytes);
    CHECK(b.variance() == doctest::Approx(variance).epsilon(1e-12));
    // Nothing is left on the table: no layer below full rank could take one more rank within the budget.
    for (std::size_t k = 0; k < layers.size(); ++k) {
        const auto& e = b.entries()[k];
        if (e.r < layers[k].in) CHECK(used + static_cast<std::size_t>(cost(layers[k])) > bytes);
    }
}

/// Checks an allocation against the continuous optimum r* (SPEC section 4: r_l ~ sqrt(a_l / c_l)) and for
/// local optimality:
/// - the objective lies between the continuous lower bound and that of the feasible floor(r*);
/// - no single rank moved from one layer to another (within the budget) lowers the objective.
/// (Closeness of each r_l to r*_l is not checked: the integer optimum itself can sit more than one rank
/// away from r*_l when costs or weights differ, and the budget is free to find it.)
void check_against_continuous(const std::vector<budget_layer>& layers, std::size_t bytes, const budget& b)
{
    const auto rstar = continuous_optimum(layers, static_cast<double>(bytes));
    std::vector<double> floors;
    for (std::size_t k = 0; k < layers.size(); ++k) floors.push_back(std::max(1.0, std::floor(rstar[k] + 1e-9)));
    const double lower = variance_of(layers, rstar);
    CHECK(b.variance() >= lower * (1 - 1e-12));
    CHECK(b.variance() <= variance_of(layers, floors) * (1 + 1e-12));

    double used = 0;
    for (std::size_t k = 0; k < layers.size(); ++k) used += cost(layers[k]) * static_cast<double>(b.entries()[k].r);
    for (std::size_t down = 0; down < layers.size(); ++down)
        for (std::size_t up = 0; up < layers.size(); ++up) {
            const double rd = static_cast<double>(b.entries()[down].r), ru = static_cast<double>(b.entries()[up].r);
            if (up == down || rd <= 1 || ru >= static_cast<double>(layers[up].in)) continue;
            if (used - cost(layers[down]) + cost(layers[up]) > static_cast<double>(bytes)) continue;
            const double change = weight(layers[down]) * (1 / (rd - 1) - 1 / rd) - weight(layers[up]) * (1 / ru - 1 / (ru + 1));
            CAPTURE(down);
            CAPTURE(up);
            CHECK(change >= -1e-12 * b.variance());
        }
}

/// The exact integer optimum by enumeration, for a few small layers.
double brute_force_variance(const std::vector<budget_layer>& layers, std::size_t bytes)
{
    double best = std::numeric_limits<double>::infinity();
    std::vector<index_t> r(layers.size(), 1);
    for (;;) {
        double used = 0, v = 0;
        for (std::size_t k = 0; k < layers.size(); ++k) {
            used += cost(layers[k]) * static_cast<double>(r[k]);
            v += weight(layers[k]) / static_cast<double>(r[k]);
        }
        if (used <= static_cast<double>(bytes)) best = std::min(best, v);
        std::size_t k = 0;
        while (k < layers.size() && r[k] == layers[k].in) r[k++] = 1;
        if (k == layers.size()) return best;
        ++r[k];
    }
}

} // namespace

// ------------------------------------------------------------------------------------------------

TEST_CASE("rank::ratio rounds n Num / Den to the nearest integer, at least 1")
{
    const compact::rank::ratio<1, 4> quarter;
    CHECK(quarter.rank({64, 64, 0}) == 16);
    CHECK(quarter.rank({6, 1, 0}) == 2);  // 1.5 rounds up
    CHECK(quarter.rank({10, 1, 0}) == 3); // 2.5 rounds up
    CHECK(quarter.rank({9, 1, 0}) == 2);  // 2.25 rounds down
    CHECK(quarter.rank({1, 1, 0}) == 1);  // 0.25 -> at least 1
    CHECK(quarter.rank({2, 1, 0}) == 1);  // 0.5 -> 1
    CHECK(compact::rank::ratio<1, 8>{}.rank({3, 1, 0}) == 1);
    CHECK(compact::rank::ratio<1, 8>{}.rank({4096, 1, 0}) == 512);
    CHECK(compact::rank::ratio<1, 2>{}.rank({7, 1, 0}) == 4);
    CHECK(compact::rank::ratio<1, 1>{}.rank({5, 1, 0}) == 5);
    CHECK(compact::rank::ratio<3, 8>{}.rank({10, 1, 0}) == 4); // 3.75
    check_ratio_range<1, 2>();
    check_ratio_range<1, 3>();
    check_ratio_range<2, 3>();
    check_ratio_range<1, 4>();
    check_ratio_range<1, 8>();
    check_ratio_range<3, 8>();
    check_ratio_range<5, 7>();
    check_ratio_range<1, 1>();
    // Through resolve_rank the result is always valid.
    for (index_t n = 1; n <= 300; ++n) CHECK(resolve(compact::rank::ratio<1, 8>{}, n) >= 1);
}

TEST_CASE("rank::fixed returns its rank for every layer and is validated per layer")
{
    const compact::rank::fixed eight{8};
    CHECK(eight.rank({64, 3, 1}) == 8);
    CHECK(eight.rank({8, 100, 2}) == 8);
    CHECK(resolve(eight, 8) == 8);
    CHECK(resolve(eight, 4096) == 8);
    CHECK_THROWS_WITH_AS(resolve(eight, 7), doctest::Contains("r=8"), compact::error);
    // No default r = 0 any more: rank::fixed{} does not compile (static_assert above); r = 0 is rejected.
    CHECK_THROWS_AS(resolve(compact::rank::fixed{0}, 16), compact::error);
    CHECK_THROWS_AS(resolve(compact::rank::fixed{-1}, 16), compact::error);
}

TEST_CASE("rank::full is r = n with the identity projection")
{
    const compact::rank::full full;
    CHECK(full.rank({1, 1, 0}) == 1);
    CHECK(full.rank({777, 5, 0}) == 777);
    CHECK(resolve(full, 123) == 123);
    // from_policy turns the distribution into the identity whatever was asked for.
    using proj = compact::projection_source<float, compact::cpu>;
    const auto p = proj::from_policy({40, 10, 5}, full, 1, compact::distribution::rademacher);
    CHECK(p.is_identity());
    CHECK(p.rank() == 40);
    CHECK(p.layer() == 5);
    const auto q = proj::from_policy({40, 10, 6}, compact::rank::ratio<1, 4>{}, 1, compact::distribution::rademacher);
    CHECK(q.dist() == compact::distribution::rademacher);
    CHECK(q.rank() == 10);
    CHECK(q.layer() == 6);
}

TEST_CASE("resolve_rank rejects invalid ranks and shapes with compact::error")
{
    std::string m = error_message_of([] { resolve(returns_zero{}, 10, 4, 42); });
    CHECK_MESSAGE(contains(m, "test: "), m);
    CHECK_MESSAGE(contains(m, "r=0"), m);
    CHECK_MESSAGE(contains(m, "42"), m); // the layer id
    m = error_message_of([] { resolve(compact::rank::fixed{11}, 10); });
    CHECK_MESSAGE(contains(m, "r=11"), m);
    CHECK_MESSAGE(contains(m, "n=10"), m);
    m = error_message_of([] { resolve(user_identity_policy{}, 10); });
    CHECK_MESSAGE(contains(m, "identity"), m);
    m = error_message_of([] { resolve(compact::rank::ratio<1, 2>{}, 0); });
    CHECK_MESSAGE(contains(m, "in=0"), m);
    m = error_message_of([] { resolve(compact::rank::ratio<1, 2>{}, 10, 0); });
    CHECK_MESSAGE(contains(m, "out=0"), m);
    // A user policy goes through the same path.
    CHECK(resolve(user_policy{}, 30) == 10);
    CHECK(resolve(user_policy{}, 2) == 1);
    CHECK(resolve(user_policy_int{}, 2) == 2);
    CHECK_THROWS_AS(resolve(user_policy_int{}, 1), compact::error);
}

// ------------------------------------------------------------------------------------------------ budget

TEST_CASE("rank::budget respects the budget and gives equal layers equal ranks")
{
    // Four identical layers: n = 512, 1024 tokens of 4 bytes, so c = 4096 bytes per rank.
    std::vector<budget_layer> layers;
    for (std::uint64_t id = 0; id < 4; ++id) layers.push_back({id, 512, 1024, 0.0, 4});
    // A budget that is a multiple of 4 c: every layer gets exactly budget / (4 c).
    const std::size_t c = 4096;
    for (std::size_t r : {1, 2, 37, 128, 511, 512}) {
        const budget b(layers, 4 * c * r);
        check_budget_invariants(layers, 4 * c * r, b);
        for (const auto& e : b.entries()) CHECK(e.r == static_cast<index_t>(r));
    }
    // Any other budget: ranks differ by at most one (the remainder cannot be split further).
    for (std::size_t extra : {std::size_t{1}, c, 2 * c + 5, 3 * c, 4 * c - 1}) {
        const std::size_t bytes = 4 * c * 100 + extra;
        const budget b(layers, bytes);
        check_budget_invariants(layers, bytes, b);
        index_t lo = std::numeric_limits<index_t>::max(), hi = 0;
        for (const auto& e : b.entries()) lo = std::min(lo, e.r), hi = std::max(hi, e.r);
        CHECK(hi - lo <= 1);
        CHECK(lo == 100);
        CHECK(b.saved_bytes() == 4 * c * 100 + (extra / c) * c);
    }
    // Weight 0 stands for n + 1, the gaussian kappa numerator.
    const budget b(layers, 4 * c * 10);
    for (const auto& e : b.entries()) CHECK(e.layer.weight == 513.0);
}

TEST_CASE("rank::budget gives more rank to a layer with larger weight")
{
    // Same shape and cost, weights 4 : 1 -> continuous optimum r1 / r2 = sqrt(4) = 2.
    const std::vector<budget_layer> layers = {{1, 4096, 2048, 4.0, 2}, {2, 4096, 2048, 1.0, 2}};
    const std::size_t c = 4096;
    const std::size_t bytes = c * 300;
    const budget b(layers, bytes);
    check_budget_invariants(layers, bytes, b);
    const index_t r1 = b.rank({4096, 1, 1}), r2 = b.rank({4096, 1, 2});
    CHECK(r1 > r2);
    CHECK(r1 + r2 == 300);
    CHECK(r1 == 200); // 300 * 2/3
    CHECK(r2 == 100);
    // Larger n with the default weight n + 1 also gets more rank.
    const std::vector<budget_layer> by_n = {{1, 4096, 512, 0.0, 4}, {2, 1024, 512, 0.0, 4}};
    const budget bn(by_n, 2048 * 400);
    CHECK(bn.rank({4096, 1, 1}) > bn.rank({1024, 1, 2}));
    // A layer with more tokens (a costlier rank) gets less rank: r ~ sqrt(a / c).
    const std::vector<budget_layer> by_tokens = {{1, 2048, 4096, 1.0, 4}, {2, 2048, 1024, 1.0, 4}};
    const budget bt(by_tokens, 4096 * 4 * 300);
    CHECK(bt.rank({2048, 1, 1}) < bt.rank({2048, 1, 2}));
}

TEST_CASE("rank::budget matches the continuous optimum within rounding (synthetic inputs)")
{
    auto rng = compact_test::make_rng(20241015);
    auto pick = [&](index_t lo, index_t hi) { return lo + static_cast<index_t>(rng() % static_cast<std::uint64_t>(hi - lo + 1)); };

    SUBCASE("equal per-rank costs: the exact integer optimum (enumeration of small problems)")
    {
        // With one cost per rank for every layer, greedy marginal allocation plus single-rank moves is
        // optimal for the separable convex objective. (Unequal costs make it a knapsack problem; there
        // the checks below ask for local optimality only.)
        for (int trial = 0; trial < 300; ++trial) {
            std::vector<budget_layer> layers;
            const int count = 2 + static_cast<int>(rng() % 2);
            const index_t tokens = pick(1, 9);
            for (int k = 0; k < count; ++k)
                layers.push_back({static_cast<std::uint64_t>(k), pick(1, 12), tokens,
                                  std::exp(compact_test::uniform(rng, -2.0, 2.0)), 1});
            const auto lo = min_bytes(layers), hi = max_bytes(layers);
            const auto bytes = lo + static_cast<std::size_t>(compact_test::uniform(rng, 0.0, 1.0) * static_cast<double>(hi - lo));
            const budget b(layers, bytes);
            CAPTURE(trial);
            check_budget_invariants(layers, bytes, b);
            CHECK(b.variance() == doctest::Approx(brute_force_variance(layers, bytes)).epsilon(1e-12));
        }
    }
    SUBCASE("equal per-rank cost, default weights")
    {
        // Same tokens and value_bytes for every layer (the common case: one micro-batch, one dtype), the
        // default weights n + 1 and n from 16 to 4096.
        for (int trial = 0; trial < 200; ++trial) {
            std::vector<budget_layer> layers;
            const int count = 2 + static_cast<int>(rng() % 9);
            for (int k = 0; k < count; ++k)
                layers.push_back({static_cast<std::uint64_t>(k), pick(16, 4096), 512, 0.0, 2});
            const double f = compact_test::uniform(rng, 0.0, 1.0);
            const auto lo = min_bytes(layers), hi = max_bytes(layers);
            const auto bytes = lo + static_cast<std::size_t>(f * f * static_cast<double>(hi - lo));
            const budget b(layers, bytes);
            CAPTURE(trial);
            check_budget_invariants(layers, bytes, b);
            check_against_continuous(layers, bytes, b);
        }
    }
    SUBCASE("random costs, weights and value sizes")
    {
        for (int trial = 0; trial < 300; ++trial) {
            std::vector<budget_layer> layers;
            const int count = 1 + static_cast<int>(rng() % 12);
            for (int k = 0; k < count; ++k) {
                const double a = (rng() % 4 == 0) ? 0.0 : std::exp(compact_test::uniform(rng, -3.0, 3.0));
                layers.push_back({static_cast<std::uint64_t>(1000 + 7 * k), pick(1, 3000), pick(1, 8192), a,
                                  static_cast<std::size_t>(std::array<int, 3>{1, 2, 4}[rng() % 3])});
            }
            const double f = compact_test::uniform(rng, 0.0, 1.0);
            const auto lo = min_bytes(layers), hi = max_bytes(layers);
            const auto bytes = lo + static_cast<std::size_t>(f * f * f * static_cast<double>(hi - lo));
            const budget b(layers, bytes);
            CAPTURE(trial);
            check_budget_invariants(layers, bytes, b);
            check_against_continuous(layers, bytes, b);
        }
    }
}

TEST_CASE("rank::budget edge budgets")
{
    const std::vector<budget_layer> layers = {{1, 64, 100, 0.0, 4}, {2, 32, 50, 2.0, 2}, {3, 16, 10, 0.0, 1}};
    const std::size_t minimum = 100 * 4 + 50 * 2 + 10 * 1;         // 510: rank 1 everywhere
    const std::size_t maximum = 400 * 64 + 100 * 32 + 10 * 16;     // every layer at full rank

    // Exactly the rank-1 cost: all ones. One byte less: an error that names the budget.
    const budget ones(layers, minimum);
    for (const auto& e : ones.entries()) CHECK(e.r == 1);
    CHECK(ones.saved_bytes() == minimum);
    CHECK_THROWS_WITH_AS(budget(layers, minimum - 1), doctest::Contains("byte budget"), compact::error);
    CHECK_THROWS_AS(budget(layers, 0), compact::error);

    // A huge budget, or exactly the full-rank cost: every layer at full rank.
    for (std::size_t bytes : {maximum, maximum + 1, std::size_t{1} << 50}) {
        const budget all(layers, bytes);
        for (const auto& e : all.entries()) CHECK(e.r == e.layer.in);
        CHECK(all.saved_bytes() == maximum);
    }
    // One byte short of full rank: some layer drops below full rank.
    const budget almost(layers, maximum - 1);
    check_budget_invariants(layers, maximum - 1, almost);
    CHECK(almost.saved_bytes() < maximum);
}

TEST_CASE("rank::budget rejects bad layer sets and unknown layers")
{
    const std::vector<budget_layer> dup = {{1, 64, 100, 0.0, 4}, {2, 64, 100, 0.0, 4}, {1, 32, 100, 0.0, 4}};
    CHECK_THROWS_WITH_AS(budget(dup, 1 << 20), doctest::Contains("twice"), compact::error);
    CHECK_THROWS_AS(budget({}, 1 << 20), compact::error);
    CHECK_THROWS_AS(budget({{1, 0, 100, 0.0, 4}}, 1 << 20), compact::error);   // n = 0
    CHECK_THROWS_AS(budget({{1, 64, 0, 0.0, 4}}, 1 << 20), compact::error);    // no tokens
    CHECK_THROWS_AS(budget({{1, 64, 100, 0.0, 0}}, 1 << 20), compact::error);  // zero-byte values
    CHECK_THROWS_WITH_AS(budget({{1, 64, 100, -1.0, 4}}, 1 << 20),
                         doctest::Contains("has weight -1; it must be finite and non-negative"), compact::error);

    const budget b({{10, 64, 100, 0.0, 4}, {20, 128, 100, 0.0, 4}}, 100 * 4 * 50);
    CHECK_NOTHROW(b.rank({64, 1, 10}));
    std::string m = error_message_of([&] { (void)b.rank({64, 1, 30}); });
    CHECK_MESSAGE(contains(m, "30"), m);
    CHECK_MESSAGE(contains(m, "not part of the budget"), m);
    m = error_message_of([&] { (void)b.rank({65, 1, 10}); });
    CHECK_MESSAGE(contains(m, "n=65"), m);
    // Through resolve_rank and from_policy, as a layer would use it.
    CHECK(compact::resolve_rank(b, {128, 7, 20}, "test") == b.entries()[1].r);
    CHECK_THROWS_AS(compact::resolve_rank(b, {128, 7, 21}, "test"), compact::error);
    using proj = compact::projection_source<double, compact::cpu>;
    const auto p = proj::from_policy({64, 9, 10}, b, 3);
    CHECK(p.rank() == b.entries()[0].r);
}
