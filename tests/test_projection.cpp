// Tests for compact/random/projection.hpp and the backend's generate_projection: the seeded random
// projection P (n, r) of SPEC section 1.
//
// Every generation test is written once for a (scalar, backend) configuration; add a CUDA backend to
// `projection_configs` and the same bodies check it. Statistical checks state their bound and its
// derivation next to the CHECK.
#include "reference.hpp"

#include <compact/backend/cpu/cpu.hpp>
#include <compact/random/projection.hpp>
#include <compact/compress/projection_source.hpp>

#include <doctest/doctest.h>

#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

using compact_test::contains;
using compact_test::error_message_of;

using compact::distribution;
using compact::index_t;
using compact::projection_spec;
using backend = compact::cpu;

template <class Scalar, class Backend>
struct config {
    using scalar = Scalar;
    using backend_type = Backend;
};

#define projection_configs config<float, backend>, config<double, backend>

/// P(row0 .. row0 + rows, col0 .. col0 + cols) of `spec`, generated into a padded matrix.
template <class T, class Backend = backend>
compact_test::host_matrix<T> generate(const projection_spec& spec, index_t row0, index_t col0, index_t rows,
                                      index_t cols, typename Backend::context ctx = {}, index_t pad = 3)
{
    compact_test::host_matrix<T> p(rows, cols, pad);
    Backend::template generate_projection<T>(ctx, spec, row0, col0, p.view());
    return p;
}

template <class T>
compact_test::host_matrix<T> generate_full(const projection_spec& spec, typename backend::context ctx = {})
{
    return generate<T>(spec, 0, 0, spec.n, spec.r, ctx);
}

template <class T>
bool bit_identical(const compact_test::host_matrix<T>& a, const compact_test::host_matrix<T>& b)
{
    if (a.rows != b.rows || a.cols != b.cols) return false;
    for (index_t i = 0; i < a.rows; ++i)
        if (std::memcmp(&a.data[static_cast<std::size_t>(i * a.ld)], &b.data[static_cast<std::size_t>(i * b.ld)],
                        static_cast<std::size_t>(a.cols) * sizeof(T)) != 0)
            return false;
    return true;
}

/// Distance in units in the last place between two finite values of the same sign class.
template <class T>
std::int64_t ulp_distance(T a, T b)
{
    using bits_t = std::conditional_t<sizeof(T) == 4, std::int32_t, std::int64_t>;
    bits_t ia, ib;
    std::memcpy(&ia, &a, sizeof(T));
    std::memcpy(&ib, &b, sizeof(T));
    // Map the sign-magnitude encoding onto a monotone integer line.
    const auto ordered = [](bits_t v) -> std::int64_t {
        return v < 0 ? static_cast<std::int64_t>(std::numeric_limits<bits_t>::min()) - static_cast<std::int64_t>(v)
                     : static_cast<std::int64_t>(v);
    };
    const std::int64_t d = ordered(ia) - ordered(ib);
    return d < 0 ? -d : d;
}

} // namespace

// ------------------------------------------------------------------------------------------------
// Committed test vectors: pin the generation scheme (key/counter layout, Box-Muller, scaling,
// rounding). Computed once with this library (CPU backend, glibc libm) and printed with %a. Another
// backend must reproduce them: bit-exactly for rademacher, and within 2 ulp for gaussian (SPEC section 1:
// "the bar is at most 2 ulp apart", because log/sin/cos may differ between libms).
// ------------------------------------------------------------------------------------------------

namespace {

template <class T>
struct pinned_element {
    index_t i, j;
    T value;
};

// Spec A: gaussian, float, n = 64, r = 16, seed 0x0123456789abcdef, layer 3, epoch 0.
const projection_spec pinned_spec_a{64, 16, distribution::gaussian, {0x0123456789abcdefull, 3, 0}};
const pinned_element<float> pinned_values_a[] = {
    {0, 0, -0x1.52d77p-2f},    // -0.330899954
    {0, 1, -0x1.7db83ep-5f},   // -0.0465966426
    {0, 2, 0x1.7f9bcp-2f},     // 0.374617577
    {0, 3, 0x1.1051eap-3f},    // 0.132968739
    {1, 0, 0x1.177e9ap-2f},    // 0.272943884
    {5, 7, -0x1.ccfecap-3f},   // -0.225095347
    {31, 12, 0x1.fb954ap-4f},  // 0.12392167
    {63, 15, 0x1.0d147cp-2f},  // 0.262773454
};

// Spec B: gaussian, double, n = 300, r = 75, seed 2024, layer 2^32 + 17 (high word in the key),
// epoch 41.
const projection_spec pinned_spec_b{300, 75, distribution::gaussian, {2024, (std::uint64_t{1} << 32) | 17u, 41}};
const pinned_element<double> pinned_values_b[] = {
    {0, 0, -0x1.4dbc08ad53055p-9},     // -0.00254619223
    {0, 3, 0x1.fa630fe81f163p-4},      // 0.123629629
    {1, 1, 0x1.4ceaa69ab1cd1p-4},      // 0.0812784679
    {7, 64, -0x1.02691c45df9edp-5},    // -0.0315442612
    {150, 37, 0x1.6a89607e585fep-6},   // 0.0221274798
    {200, 5, -0x1.c88aa38268558p-3},   // -0.222920682
    {299, 74, -0x1.4e0172e6de2d8p-4},  // -0.0815443505
};

// Spec C: rademacher, float, n = 50, r = 10, seed 7, layer 2^32 - 1, epoch 2^32 - 1 (the largest).
// +-1/sqrt(10) = +-0x1.43d136p-2f.
const projection_spec pinned_spec_c{50, 10, distribution::rademacher, {7, 0xffffffffull, 0xffffffffull}};
const pinned_element<float> pinned_values_c[] = {
    {0, 0, 0x1.43d136p-2f},   {0, 1, -0x1.43d136p-2f}, {0, 4, 0x1.43d136p-2f},  {0, 9, -0x1.43d136p-2f},
    {1, 7, 0x1.43d136p-2f},   {17, 9, -0x1.43d136p-2f}, {33, 3, 0x1.43d136p-2f}, {49, 8, 0x1.43d136p-2f},
};

template <class T, std::size_t K>
void check_pinned(const projection_spec& spec, const pinned_element<T> (&values)[K], std::int64_t max_ulp)
{
    const auto full = generate_full<T>(spec);
    for (const auto& e : values) {
        CAPTURE(e.i);
        CAPTURE(e.j);
        // From the full matrix, from a 1x1 block at the element, and from the scalar reference.
        const auto single = generate<T>(spec, e.i, e.j, 1, 1);
        const T scalar = static_cast<T>(compact::projection_element(spec, e.i, e.j));
        CHECK(ulp_distance(full(e.i, e.j), e.value) <= max_ulp);
        CHECK(ulp_distance(single(0, 0), e.value) <= max_ulp);
        CHECK(ulp_distance(scalar, e.value) <= max_ulp);
        // On the reference platform (x86-64, glibc) the values are exact; elsewhere only the bar above is
        // required, so a difference is a warning.
        WARN(full(e.i, e.j) == e.value);
    }
}

} // namespace

TEST_CASE("committed projection test vectors")
{
    SUBCASE("A: gaussian float") { check_pinned(pinned_spec_a, pinned_values_a, 2); }
    SUBCASE("B: gaussian double") { check_pinned(pinned_spec_b, pinned_values_b, 2); }
    SUBCASE("C: rademacher float") { check_pinned(pinned_spec_c, pinned_values_c, 0); }
}

// ------------------------------------------------------------------------------------------------

TEST_CASE_TEMPLATE("any block of P equals the same region of the full P, bit for bit", C, projection_configs)
{
    using T = typename C::scalar;
    struct shape {
        index_t n, r;
        distribution dist;
    };
    const shape shapes[] = {{37, 23, distribution::gaussian}, {37, 23, distribution::rademacher},
                            {29, 29, distribution::identity}, {64, 16, distribution::gaussian},
                            {5, 1, distribution::gaussian},   {130, 7, distribution::rademacher}};
    auto rng = compact_test::make_rng(1);
    for (const auto& s : shapes) {
        const projection_spec spec{s.n, s.r, s.dist, {0xfeedfacecafebeefull, 12, 5}};
        CAPTURE(s.n);
        CAPTURE(s.r);
        CAPTURE(std::string(compact::to_string(s.dist)));
        const auto full = generate_full<T>(spec);
        CHECK(full.padding_intact());

        // Every element is the documented scalar reference rounded once to T.
        bool matches_reference = true;
        for (index_t i = 0; i < s.n; ++i)
            for (index_t j = 0; j < s.r; ++j)
                matches_reference =
                    matches_reference && full(i, j) == static_cast<T>(compact::projection_element(spec, i, j));
        CHECK(matches_reference);

        // Hand-picked blocks (odd offsets, partial quads at both ends, single rows/columns, the last
        // element) and random ones.
        std::vector<std::array<index_t, 4>> blocks = {{0, 0, s.n, s.r},
                                                      {s.n - 1, s.r - 1, 1, 1},
                                                      {0, s.r - 1, s.n, 1},
                                                      {s.n - 1, 0, 1, s.r}};
        if (s.r >= 4 && s.n >= 12) {
            blocks.push_back({3, 1, 9, s.r - 2});
            blocks.push_back({11, 3, s.n - 11, 1});
            blocks.push_back({2, s.r / 2, s.n / 2, s.r - s.r / 2});
        }
        for (int k = 0; k < 20; ++k) {
            const auto r0 = static_cast<index_t>(rng() % static_cast<std::uint64_t>(s.n));
            const auto c0 = static_cast<index_t>(rng() % static_cast<std::uint64_t>(s.r));
            const auto nr = 1 + static_cast<index_t>(rng() % static_cast<std::uint64_t>(s.n - r0));
            const auto nc = 1 + static_cast<index_t>(rng() % static_cast<std::uint64_t>(s.r - c0));
            blocks.push_back({r0, c0, nr, nc});
        }
        for (const auto& b : blocks) {
            const auto part = generate<T>(spec, b[0], b[1], b[2], b[3], {}, 5);
            bool same = true;
            for (index_t i = 0; i < b[2]; ++i)
                for (index_t j = 0; j < b[3]; ++j)
                    same = same && std::memcmp(&part.data[static_cast<std::size_t>(i * part.ld + j)],
                                               &full.data[static_cast<std::size_t>((b[0] + i) * full.ld + b[1] + j)],
                                               sizeof(T)) == 0;
            CAPTURE(b[0]);
            CAPTURE(b[1]);
            CAPTURE(b[2]);
            CAPTURE(b[3]);
            CHECK(same);
            CHECK(part.padding_intact());
        }
    }
}

TEST_CASE_TEMPLATE("generation is deterministic across runs and thread counts", C, projection_configs)
{
    using T = typename C::scalar;
    // 1000 rows of 300 columns: the CPU backend splits generation into several parts (about 32K elements
    // each), so two threads really divide the work.
    for (distribution d : {distribution::gaussian, distribution::rademacher}) {
        const projection_spec spec{1000, 300, d, {99, 4, 17}};
        const auto first = generate_full<T>(spec, backend::context{1});
        const auto again = generate_full<T>(spec, backend::context{1});
        const auto two = generate_full<T>(spec, backend::context{2});
        const auto three = generate_full<T>(spec, backend::context{3});
        const auto deflt = generate_full<T>(spec, backend::context{});
        CAPTURE(std::string(compact::to_string(d)));
        CHECK(bit_identical(first, again));
        CHECK(bit_identical(first, two));
        CHECK(bit_identical(first, three));
        CHECK(bit_identical(first, deflt));
    }
}

TEST_CASE_TEMPLATE("distinct seeds, layers or epochs give different projections", C, projection_configs)
{
    using T = typename C::scalar;
    const projection_spec base{96, 24, distribution::gaussian, {0x1111222233334444ull, 5, 7}};
    const auto p = generate_full<T>(base);
    auto equal_fraction = [&](projection_spec other) {
        const auto q = generate_full<T>(other);
        index_t same = 0;
        for (index_t i = 0; i < base.n; ++i)
            for (index_t j = 0; j < base.r; ++j) same += p(i, j) == q(i, j) ? 1 : 0;
        return static_cast<double>(same) / static_cast<double>(base.n * base.r);
    };
    auto with = [&](std::uint64_t seed, std::uint64_t layer, std::uint64_t epoch) {
        projection_spec s = base;
        s.key = {seed, layer, epoch};
        return s;
    };
    const auto seed = base.key.seed;
    CHECK(equal_fraction(base) == 1.0);
    // Continuous values: two independent gaussian matrices share essentially no element (in float a
    // coincidence has probability ~1e-7 per element); allow 1%.
    CHECK(equal_fraction(with(seed, 6, 7)) < 0.01);                                   // next layer
    CHECK(equal_fraction(with(seed, 5, 8)) < 0.01);                                   // next epoch
    CHECK(equal_fraction(with(seed + 1, 5, 7)) < 0.01);                               // next seed
    CHECK(equal_fraction(with(seed, 5 + (std::uint64_t{1} << 32), 7)) < 0.01);        // layer high word
    CHECK(equal_fraction(with(seed + (std::uint64_t{1} << 32), 5, 7)) < 0.01);        // seed high word
    // The official code keys layer l with seed + l, so (seed, layer 6) and (seed + 1, layer 5) collide
    // there; here they must not.
    const auto a = generate_full<T>(with(seed, 6, 7));
    const auto b = generate_full<T>(with(seed + 1, 5, 7));
    CHECK_FALSE(bit_identical(a, b));
    // Epoch and layer are different counter words: (layer 5, epoch 7) vs (layer 7, epoch 5).
    CHECK(equal_fraction(with(seed, 7, 5)) < 0.01);
}

TEST_CASE_TEMPLATE("gaussian entries are N(0, 1/r)", C, projection_configs)
{
    using T = typename C::scalar;
    const projection_spec spec{1024, 256, distribution::gaussian, {31337, 2, 0}};
    const auto p = generate_full<T>(spec);
    const double r = static_cast<double>(spec.r);
    const double count = static_cast<double>(spec.n * spec.r); // M = 262144
    double sum = 0, sum_sq = 0, by_lane_sq[4] = {0, 0, 0, 0};
    for (index_t i = 0; i < spec.n; ++i)
        for (index_t j = 0; j < spec.r; ++j) {
            const double z = std::sqrt(r) * static_cast<double>(p(i, j)); // should be N(0, 1)
            sum += z;
            sum_sq += z * z;
            by_lane_sq[j % 4] += z * z;
        }
    // z = sqrt(r) P_ij is N(0, 1): mean SE 1/sqrt(M) = 1.95e-3; z^2 has mean 1 and variance 2, so the
    // mean of z^2 has SE sqrt(2/M) = 2.76e-3. Bounds at 5 SE (false-failure probability 5.7e-7 each):
    // |mean| < 9.8e-3, |r E[P^2] - 1| < 1.39e-2. Per Philox lane (j mod 4: cos and sin outputs of the
    // two Box-Muller pairs) M/4 samples: SE 5.52e-3, bound 2.77e-2. A 1/r scaling instead of 1/sqrt(r)
    // would give r E[P^2] = 1/r.
    CHECK(std::abs(sum / count) < 9.8e-3);
    CHECK(std::abs(sum_sq / count - 1.0) < 1.39e-2);
    for (int lane = 0; lane < 4; ++lane) {
        CAPTURE(lane);
        CHECK(std::abs(by_lane_sq[lane] / (count / 4) - 1.0) < 2.77e-2);
    }
}

TEST_CASE_TEMPLATE("rademacher entries are exactly +-1/sqrt(r), balanced", C, projection_configs)
{
    using T = typename C::scalar;
    const projection_spec spec{777, 99, distribution::rademacher, {5, 6, 7}};
    const auto p = generate_full<T>(spec);
    const T plus = static_cast<T>(1.0 / std::sqrt(99.0));
    index_t positive = 0;
    bool exact = true;
    for (index_t i = 0; i < spec.n; ++i)
        for (index_t j = 0; j < spec.r; ++j) {
            exact = exact && (p(i, j) == plus || p(i, j) == -plus);
            positive += p(i, j) > 0 ? 1 : 0;
        }
    CHECK(exact);
    // Fraction of +: 1/2 with SE 0.5/sqrt(M), M = 76923 -> 1.80e-3; 5 SE bound 9.0e-3.
    const double count = static_cast<double>(spec.n * spec.r);
    CHECK(std::abs(static_cast<double>(positive) / count - 0.5) < 9.0e-3);
}

TEST_CASE_TEMPLATE("identity is exactly I, in every block", C, projection_configs)
{
    using T = typename C::scalar;
    const projection_spec spec{45, 45, distribution::identity, {123, 4, 5}};
    const auto p = generate_full<T>(spec);
    bool exact = true;
    for (index_t i = 0; i < spec.n; ++i)
        for (index_t j = 0; j < spec.r; ++j) exact = exact && p(i, j) == (i == j ? T(1) : T(0));
    CHECK(exact);
    CHECK(p.padding_intact());
    for (auto b : {std::array<index_t, 4>{3, 7, 20, 11}, {10, 2, 9, 30}, {44, 44, 1, 1}, {0, 44, 45, 1}}) {
        const auto part = generate<T>(spec, b[0], b[1], b[2], b[3]);
        bool ok = true;
        for (index_t i = 0; i < b[2]; ++i)
            for (index_t j = 0; j < b[3]; ++j) ok = ok && part(i, j) == (b[0] + i == b[1] + j ? T(1) : T(0));
        CHECK(ok);
    }
    // The key does not matter for the identity.
    projection_spec other = spec;
    other.key = {9, 9, 9};
    CHECK(bit_identical(p, generate_full<T>(other)));
}

TEST_CASE_TEMPLATE("E[P P^T] = I over epochs", C, projection_configs)
{
    using T = typename C::scalar;
    constexpr index_t n = 24, r = 6;
    constexpr int epochs = 4000;
    for (distribution d : {distribution::gaussian, distribution::rademacher}) {
        CAPTURE(std::string(compact::to_string(d)));
        compact_test::dmatrix mean(n, n);
        for (int e = 0; e < epochs; ++e) {
            const projection_spec spec{n, r, d, {777, 3, static_cast<std::uint64_t>(e)}};
            const auto p = generate_full<T>(spec).to_double();
            const auto ppt = compact_test::matmul(p, compact_test::transpose(p));
            for (std::size_t k = 0; k < mean.data.size(); ++k) mean.data[k] += ppt.data[k] / epochs;
        }
        // D = mean - I. Gaussian: Var(D_ii) = 2/(rK), Var(D_ij) = 1/(rK), so E||D||_F^2 = n(n+1)/(rK).
        // Rademacher: D_ii = 0 exactly (sum of r terms 1/r), Var(D_ij) = 1/(rK), E||D||^2 = n(n-1)/(rK).
        // ||D||_F^2 is a sum of ~n^2/2 nearly independent squared normals: its relative standard deviation
        // is sqrt(8n + 4n(n-1))/(n(n+1)) = 0.082 (gaussian), 2/sqrt(n(n-1)) = 0.085 (rademacher) for
        // n = 24. The window [0.5, 1.6] x expected is more than 6 standard deviations wide on each side.
        // A wrongly scaled P (c P) gives E[P P^T] = c^2 I, i.e. ||D||^2 ~ n (c^2 - 1)^2, far outside.
        double sq = 0, diag = 0;
        for (index_t i = 0; i < n; ++i)
            for (index_t j = 0; j < n; ++j) {
                const double dij = mean(i, j) - (i == j ? 1.0 : 0.0);
                sq += dij * dij;
                if (i == j) diag = std::max(diag, std::abs(dij));
            }
        const double expected = d == distribution::gaussian ? double(n * (n + 1)) / (r * epochs)
                                                            : double(n * (n - 1)) / (r * epochs);
        CHECK(sq > 0.5 * expected);
        CHECK(sq < 1.6 * expected);
        if (d == distribution::rademacher) CHECK(diag < 1e-5); // only float rounding of (1/sqrt r)^2
        // Negative control: the same statistic for 1.05 P (a 5% scaling error) fails the window.
        double scaled = 0;
        for (index_t i = 0; i < n; ++i)
            for (index_t j = 0; j < n; ++j) {
                const double dij = 1.05 * 1.05 * mean(i, j) - (i == j ? 1.0 : 0.0);
                scaled += dij * dij;
            }
        CHECK(scaled > 1.6 * expected);
    }
}

TEST_CASE("check_projection rejects invalid specs, naming the argument")
{
    using compact::detail::check_projection;
    auto message = [](projection_spec s) { return error_message_of([&] { check_projection(s, "test"); }); };
    const compact::projection_key key{1, 2, 3};

    CHECK_NOTHROW(check_projection({10, 10, distribution::gaussian, key}, "test"));
    CHECK_NOTHROW(check_projection({10, 1, distribution::rademacher, key}, "test"));
    CHECK_NOTHROW(check_projection({10, 10, distribution::identity, key}, "test"));
    CHECK_NOTHROW(check_projection({10, 3, distribution::gaussian, {1, 2, 0xffffffffull}}, "test"));

    std::string m = message({10, 0, distribution::gaussian, key});
    CHECK_MESSAGE(contains(m, "rank r=0"), m);
    CHECK_MESSAGE(contains(m, "test: "), m);
    m = message({10, -3, distribution::gaussian, key});
    CHECK_MESSAGE(contains(m, "rank r=-3"), m);
    m = message({10, 11, distribution::gaussian, key});
    CHECK_MESSAGE(contains(m, "rank r=11"), m);
    CHECK_MESSAGE(contains(m, "n=10"), m);
    m = message({0, 0, distribution::gaussian, key});
    CHECK_MESSAGE(contains(m, "input size n=0"), m);
    m = message({10, 5, distribution::identity, key});
    CHECK_MESSAGE(contains(m, "identity"), m);
    m = message({10, 3, distribution::gaussian, {1, 2, std::uint64_t{1} << 32}});
    CHECK_MESSAGE(contains(m, "epoch"), m);
    CHECK_MESSAGE(contains(m, "2^32"), m);
    m = message({index_t{1} << 32, 3, distribution::gaussian, key});
    CHECK_MESSAGE(contains(m, "input size n="), m);

    // The same checks through the public projection_source.
    using proj = compact::projection_source<float, backend>;
    CHECK_THROWS_WITH_AS(proj(10, 0, distribution::gaussian, 1, 2), doctest::Contains("rank r=0"), compact::error);
    CHECK_THROWS_WITH_AS(proj(10, 11, distribution::gaussian, 1, 2), doctest::Contains("rank r=11"), compact::error);
    CHECK_THROWS_WITH_AS(proj(10, 9, distribution::identity, 1, 2), doctest::Contains("identity"), compact::error);
    CHECK_THROWS_WITH_AS(proj(0, 1, distribution::gaussian, 1, 2), doctest::Contains("n=0"), compact::error);
    const proj p(10, 3, distribution::gaussian, 1, 2);
    std::vector<float> out(p.projection_bytes() / sizeof(float));
    const auto out_view = compact::make_view(out.data(), 10, 3);
    CHECK_NOTHROW(p.generate({}, 0xffffffffull, out_view));
    CHECK_THROWS_WITH_AS(p.generate({}, std::uint64_t{1} << 32, out_view), doctest::Contains("epoch"),
                         compact::error);
}

TEST_CASE("variance_factor")
{
    CHECK(compact::variance_factor(distribution::gaussian, 64, 16) == doctest::Approx(65.0 / 16.0).epsilon(1e-15));
    CHECK(compact::variance_factor(distribution::rademacher, 64, 16) == doctest::Approx(63.0 / 16.0).epsilon(1e-15));
    CHECK(compact::variance_factor(distribution::identity, 64, 64) == 0.0);
    CHECK(compact::variance_factor(distribution::gaussian, 1, 1) == 2.0);
    CHECK(compact::variance_factor(distribution::rademacher, 1, 1) == 0.0);
    CHECK(compact::variance_factor(distribution::gaussian, 4096, 512) == 4097.0 / 512.0);
}

TEST_CASE("resampling maps updates to epochs")
{
    CHECK(compact::resampling{0}.epoch(0) == 0);
    CHECK(compact::resampling{0}.epoch(123456789) == 0);
    CHECK(compact::resampling{1}.epoch(17) == 17);
    CHECK(compact::resampling{50}.epoch(49) == 0);
    CHECK(compact::resampling{50}.epoch(50) == 1);
    CHECK(compact::resampling{50}.epoch(199) == 3);
}

TEST_CASE_TEMPLATE("projection_source::generate equals the backend's generate_projection", C, projection_configs)
{
    using T = typename C::scalar;
    using proj = compact::projection_source<T, typename C::backend_type>;
    const proj p(53, 13, distribution::gaussian, 0xabcdef, 77);
    CHECK(p.spec(9).n == 53);
    CHECK(p.spec(9).r == 13);
    CHECK(p.spec(9).key == compact::projection_key{0xabcdef, 77, 9});
    // projection_bytes() is exactly P's (n, r) values, no slack; a padded output (ld > cols) must do.
    CHECK(p.projection_bytes() == 53 * 13 * sizeof(T));
    compact_test::host_matrix<T> out(53, 13, 2);
    const auto view = out.view();
    p.generate({}, 9, view);
    REQUIRE(view.rows == 53);
    REQUIRE(view.cols == 13);
    const auto expected = generate_full<T>(p.spec(9));
    bool same = true;
    for (index_t i = 0; i < 53; ++i)
        for (index_t j = 0; j < 13; ++j) same = same && view(i, j) == expected(i, j);
    CHECK(same);
    CHECK(out.padding_intact());
    // The identity needs no workspace for compress() and expand().
    const proj id(8, 8, distribution::identity, 1, 1);
    CHECK(id.workspace_bytes() == 0);
    CHECK(id.is_identity());
}

TEST_CASE_TEMPLATE("projection_source::compress and expand stay inside the workspace they are given", C,
                   projection_configs)
{
    using T = typename C::scalar;
    using proj = compact::projection_source<T, typename C::backend_type>;
    // compress() and expand() generate P into the workspace of workspace_bytes() (0 for the identity);
    // given exactly that much they must either produce the right result without writing past it or
    // refuse with compact::error, for every distribution, the identity included (a caller sizes the
    // workspace without knowing the distribution). The storage behind the workspace is larger than the
    // workspace and starts misaligned, so that a violation is reported here rather than as memory
    // corruption: the bytes past the workspace hold a marker that must survive.
    constexpr unsigned char marker = 0xa5;
    for (distribution d : {distribution::gaussian, distribution::rademacher, distribution::identity}) {
        CAPTURE(std::string(compact::to_string(d)));
        const proj p(8, d == distribution::identity ? 8 : 3, d, 1, 1);
        std::vector<unsigned char> storage(8 * 8 * sizeof(T) + 4 * compact::workspace_alignment, marker);
        const compact::workspace ws{storage.data() + 1, p.workspace_bytes()};
        auto rng = compact_test::make_rng(6100);
        compact_test::host_matrix<T> x(5, 8), z(5, p.rank()), g_sub(4, p.rank()), g_hat(4, 8);
        x.randomize(rng);
        g_sub.randomize(rng);
        bool refused = false, inside = true, correct = false;
        try {
            p.compress({}, x.cview(), 0, z.view(), ws);
            p.expand({}, g_sub.cview(), 0, g_hat.view(), ws);
            for (std::size_t k = 1 + ws.bytes; k < storage.size(); ++k) inside = inside && storage[k] == marker;
            inside = inside && storage[0] == marker;
            const auto expected = generate_full<T>(p.spec(0)).to_double();
            const auto zx = compact_test::matmul(x.to_double(), expected);
            const auto gx = compact_test::matmul(g_sub.to_double(), compact_test::transpose(expected));
            correct = compact_test::rel_error(z.to_double(), zx) < (sizeof(T) == 4 ? 1e-5 : 1e-12) &&
                      compact_test::rel_error(g_hat.to_double(), gx) < (sizeof(T) == 4 ? 1e-5 : 1e-12);
        } catch (const compact::error&) {
            refused = true;
        }
        CHECK_MESSAGE((refused || (inside && correct)),
                      "compress/expand wrote outside the workspace of workspace_bytes() = " << ws.bytes);
    }
}

TEST_CASE_TEMPLATE("projection_source: a kept P gives the bits of a regenerated one; copies do not keep", C,
                   projection_configs)
{
    using T = typename C::scalar;
    using proj = compact::projection_source<T, typename C::backend_type>;
    constexpr index_t N = 19, n = 37, m = 11, r = 9;
    auto rng = compact_test::make_rng(6200);
    compact_test::host_matrix<T> x(N, n, 1), g_sub(m, r, 2);
    x.randomize(rng);
    g_sub.randomize(rng);

    for (distribution d : {distribution::gaussian, distribution::rademacher}) {
        CAPTURE(std::string(compact::to_string(d)));
        const proj regen(n, r, d, 0x5eed, 4);
        proj keeper(n, r, d, 0x5eed, 4);
        CHECK_FALSE(keeper.keeps());
        CHECK(keeper.workspace_bytes() > 0);
        compact_test::host_matrix<T> kept(n, r, 3); // padded storage (ld > cols) must do
        keeper.keep(kept.view());
        CHECK(keeper.keeps());
        CHECK(keeper.workspace_bytes() == 0); // P is in the caller's storage
        CHECK(keeper.same_projection(regen));

        std::vector<unsigned char> ws_storage(regen.workspace_bytes());
        const compact::workspace ws{ws_storage.data(), ws_storage.size()};
        // Epochs 3, 3 (the kept P reused), 8 (regenerated into the storage), and 3 again.
        for (std::uint64_t epoch : {3u, 3u, 8u, 3u}) {
            CAPTURE(epoch);
            compact_test::host_matrix<T> z_regen(N, r), z_kept(N, r, 1), h_regen(m, n), h_kept(m, n);
            regen.compress({}, x.cview(), epoch, z_regen.view(), ws);
            keeper.compress({}, x.cview(), epoch, z_kept.view(), compact::workspace{});
            regen.expand({}, g_sub.cview(), epoch, h_regen.view(), ws);
            keeper.expand({}, g_sub.cview(), epoch, h_kept.view(), compact::workspace{});
            CHECK(bit_identical(z_regen, z_kept));
            CHECK(bit_identical(h_regen, h_kept));
            CHECK(z_kept.padding_intact());
            // The storage holds P of the epoch last asked for.
            CHECK(bit_identical(kept, generate_full<T>(regen.spec(epoch))));
            CHECK(kept.padding_intact());
        }

        // After the storage was overwritten, invalidate() makes the source regenerate it.
        kept.fill(T(0));
        keeper.invalidate();
        compact_test::host_matrix<T> z_regen(N, r), z_kept(N, r);
        regen.compress({}, x.cview(), 3, z_regen.view(), ws);
        keeper.compress({}, x.cview(), 3, z_kept.view(), compact::workspace{});
        CHECK(bit_identical(z_regen, z_kept));
        CHECK(bit_identical(kept, generate_full<T>(regen.spec(3))));

        // A copy describes the same P but does not share the storage: it regenerates (and needs a
        // workspace for it), and its results are the same bits.
        const proj copy = keeper;
        CHECK_FALSE(copy.keeps());
        CHECK(copy.same_projection(keeper));
        CHECK(copy.workspace_bytes() == regen.workspace_bytes());
        proj assigned(n, 1, d, 1, 1);
        assigned = keeper;
        CHECK_FALSE(assigned.keeps());
        CHECK(assigned.same_projection(keeper));
        kept.fill(T(0));
        keeper.invalidate();
        compact_test::host_matrix<T> z_copy(N, r);
        copy.compress({}, x.cview(), 8, z_copy.view(), ws);
        regen.compress({}, x.cview(), 8, z_regen.view(), ws);
        CHECK(bit_identical(z_copy, z_regen));
        bool storage_untouched = true; // the copy did not write into the keeper's storage
        for (index_t i = 0; i < n; ++i)
            for (index_t j = 0; j < r; ++j) storage_untouched = storage_untouched && kept(i, j) == T(0);
        CHECK(storage_untouched);
        // Nor does the copy's workspace-less compress succeed: it does not keep.
        CHECK_THROWS_WITH_AS(copy.compress({}, x.cview(), 8, z_copy.view(), compact::workspace{}),
                             doctest::Contains("workspace"), compact::error);
        // A moved-to source keeps on (move transfers the storage).
        proj moved = std::move(keeper);
        CHECK(moved.keeps());

        // An empty view goes back to regenerating.
        moved.keep({});
        CHECK_FALSE(moved.keeps());
        CHECK(moved.workspace_bytes() == regen.workspace_bytes());

        // keep() checks the storage's shape.
        compact_test::host_matrix<T> wrong(n, r + 1);
        CHECK_THROWS_WITH_AS(moved.keep(wrong.view()), doctest::Contains("storage"), compact::error);
        CHECK_THROWS_WITH_AS(moved.keep(compact::matrix_view<T>(nullptr, n, r)), doctest::Contains("storage is null"),
                             compact::error);
        CHECK_FALSE(moved.keeps());
    }

    // The identity keeps nothing (it needs no numbers).
    proj id(8, 8, distribution::identity, 1, 1);
    compact_test::host_matrix<T> id_storage(8, 8);
    id.keep(id_storage.view());
    CHECK_FALSE(id.keeps());
    CHECK(id.workspace_bytes() == 0);
}
