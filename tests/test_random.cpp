// Tests for compact/random/: Philox4x32-10, the uniform-to-normal conversion, fill_uniform.
//
// The generator is deterministic, so every "statistical" check below is a fixed computation on fixed
// inputs; its bound is nevertheless derived from the standard error of the statistic, so that a correct
// generator fails it with negligible probability (the probability is stated next to each bound) and a
// wrong one (bad scaling, a biased conversion) fails it by a wide margin.
#include "reference.hpp"

#include <compact/random/projection.hpp>
#include <compact/random/normal.hpp>
#include <compact/random/philox.hpp>
#include <compact/random/uniform.hpp>

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

using compact::index_t;

struct philox_vector {
    std::uint32_t counter[4];
    std::uint32_t key[2];
    std::uint32_t expected[4];
};

// Random123's kat_vectors for philox4x32_R(10, ctr, key), as quoted in SPEC section 1.
constexpr philox_vector philox_known_answers[] = {
    {{0x00000000u, 0x00000000u, 0x00000000u, 0x00000000u},
     {0x00000000u, 0x00000000u},
     {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}},
    {{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu},
     {0xffffffffu, 0xffffffffu},
     {0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}},
    {{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u},
     {0xa4093822u, 0x299f31d0u},
     {0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}},
};

} // namespace

TEST_CASE("philox4x32-10 matches Random123's known-answer vectors")
{
    for (const auto& v : philox_known_answers) {
        const compact::philox_counter ctr{{v.counter[0], v.counter[1], v.counter[2], v.counter[3]}};
        const compact::philox_key key{{v.key[0], v.key[1]}};
        const compact::philox_counter out = compact::philox4x32(ctr, key);
        CAPTURE(v.counter[0]);
        for (int c = 0; c < 4; ++c) CHECK(out.w[c] == v.expected[c]);
    }
}

TEST_CASE("philox4x32-10 is a pure function of (counter, key)")
{
    const compact::philox_key key{{0x12345678u, 0x9abcdef0u}};
    const compact::philox_counter ctr{{1u, 2u, 3u, 4u}};
    const auto a = compact::philox4x32(ctr, key);
    const auto b = compact::philox4x32(ctr, key);
    for (int c = 0; c < 4; ++c) CHECK(a.w[c] == b.w[c]);
    // Changing any one counter or key word changes the output (a bijection for a fixed key, and the
    // key enters every round).
    for (int w = 0; w < 4; ++w) {
        compact::philox_counter other = ctr;
        other.w[w] ^= 1u;
        const auto d = compact::philox4x32(other, key);
        CHECK((d.w[0] != a.w[0] || d.w[1] != a.w[1] || d.w[2] != a.w[2] || d.w[3] != a.w[3]));
    }
    for (int w = 0; w < 2; ++w) {
        compact::philox_key other = key;
        other.w[w] ^= 1u;
        const auto d = compact::philox4x32(ctr, other);
        CHECK((d.w[0] != a.w[0] || d.w[1] != a.w[1] || d.w[2] != a.w[2] || d.w[3] != a.w[3]));
    }
}

TEST_CASE("uniform_open01 maps every 32-bit word into the open interval (0, 1)")
{
    const double lowest = compact::uniform_open01(0u);
    const double highest = compact::uniform_open01(0xffffffffu);
    CHECK(lowest > 0.0);
    CHECK(highest < 1.0);
    // (x + 0.5) 2^-32 is exact in double for every 32-bit x.
    CHECK(lowest == 0x1p-33);
    CHECK(highest == 1.0 - 0x1p-33);
    CHECK(compact::uniform_open01(0x80000000u) == 0.5 + 0x1p-33);
    CHECK(std::isfinite(std::log(lowest)));
    CHECK(std::isfinite(std::log(1.0 - highest)));
    // Strictly increasing in the word.
    for (std::uint32_t x : {0u, 1u, 12345u, 0x7fffffffu, 0xfffffffeu})
        CHECK(compact::uniform_open01(x) < compact::uniform_open01(x + 1u));
}

TEST_CASE("box_muller follows its documented formula")
{
    // z0 = sqrt(-2 log u1) cos(2 pi u2), z1 = sqrt(-2 log u1) sin(2 pi u2), u = (x + 0.5) 2^-32.
    // Recomputed here with long double; relative agreement 1e-13 (a few ulp of double through log,
    // sqrt, cos, sin, far below any change of formula).
    const std::uint32_t words[][2] = {{0u, 0u}, {0xffffffffu, 0xffffffffu}, {0x12345678u, 0x9abcdef0u},
                                      {0x80000000u, 0x40000000u}, {7u, 0xc0000000u}};
    const long double two_pi = 6.283185307179586476925286766559L;
    for (const auto& w : words) {
        double z0 = 0, z1 = 0;
        compact::box_muller(w[0], w[1], z0, z1);
        const long double u1 = (static_cast<long double>(w[0]) + 0.5L) / 4294967296.0L;
        const long double u2 = (static_cast<long double>(w[1]) + 0.5L) / 4294967296.0L;
        const long double rho = std::sqrt(-2.0L * std::log(u1));
        const double e0 = static_cast<double>(rho * std::cos(two_pi * u2));
        const double e1 = static_cast<double>(rho * std::sin(two_pi * u2));
        const double scale = static_cast<double>(rho);
        CAPTURE(w[0]);
        CAPTURE(w[1]);
        CHECK(std::abs(z0 - e0) <= 1e-13 * scale);
        CHECK(std::abs(z1 - e1) <= 1e-13 * scale);
    }
}

TEST_CASE("box_muller on Philox words is standard normal (1e6 samples)")
{
    // 250,000 Philox calls -> 500,000 word pairs -> 1,000,000 normals.
    constexpr std::int64_t calls = 250000;
    constexpr double count = 4.0 * calls;
    const compact::philox_key key{{0xdeadbeefu, 0x01234567u}};
    double sum = 0, sum_sq = 0, cross = 0, max_abs = 0;
    std::int64_t tail = 0;
    for (std::int64_t k = 0; k < calls; ++k) {
        const auto x = compact::philox4x32({{static_cast<std::uint32_t>(k), 0u, 0u, 0u}}, key);
        double z[4];
        compact::box_muller(x.w[0], x.w[1], z[0], z[1]);
        compact::box_muller(x.w[2], x.w[3], z[2], z[3]);
        for (double v : z) {
            sum += v;
            sum_sq += v * v;
            max_abs = std::max(max_abs, std::abs(v));
            if (std::abs(v) > 1.959963984540054) ++tail;
        }
        cross += z[0] * z[1] + z[2] * z[3];
    }
    const double mean = sum / count;
    const double variance = (sum_sq - count * mean * mean) / (count - 1);
    const double tail_fraction = static_cast<double>(tail) / count;
    const double correlation = cross / (count / 2);
    // Bounds are 5 standard errors of each statistic for i.i.d. N(0, 1) samples (two-sided false-failure
    // probability 5.7e-7 each):
    //   mean:       SE = 1/sqrt(1e6) = 1.0e-3                      -> |mean| < 5.0e-3
    //   variance:   SE = sqrt(2/(1e6 - 1)) = 1.414e-3              -> |var - 1| < 7.07e-3
    //   E[z0 z1]:   SE = 1/sqrt(5e5) = 1.414e-3 (pairs)            -> |corr| < 7.07e-3
    //   P(|z|>1.96) = 0.05: SE = sqrt(0.05 * 0.95 / 1e6) = 2.18e-4 -> |frac - 0.05| < 1.09e-3
    CHECK(std::abs(mean) < 5.0e-3);
    CHECK(std::abs(variance - 1.0) < 7.07e-3);
    CHECK(std::abs(correlation) < 7.07e-3);
    CHECK(std::abs(tail_fraction - 0.05) < 1.09e-3);
    // The documented largest magnitude: sqrt(-2 log 2^-33) ~ 6.76.
    CHECK(max_abs <= std::sqrt(-2.0 * std::log(0x1p-33)));
}

TEST_CASE_TEMPLATE("fill_uniform: range, determinism and keying", T, float, double)
{
    constexpr index_t rows = 257, cols = 131; // odd sizes: the last quad of each row is partial
    compact_test::host_matrix<T> a(rows, cols), b(rows, cols), padded(rows, cols, 5);
    const double low = -0.75, high = 2.5;
    compact::fill_uniform(a.view(), low, high, 42, 7);
    compact::fill_uniform(b.view(), low, high, 42, 7);
    compact::fill_uniform(padded.view(), low, high, 42, 7);
    CHECK(padded.padding_intact());

    double sum = 0;
    bool in_range = true, identical = true, same_padded = true;
    for (index_t i = 0; i < rows; ++i)
        for (index_t j = 0; j < cols; ++j) {
            const T v = a(i, j);
            in_range = in_range && v >= T(low) && v < T(high);
            identical = identical && v == b(i, j);
            same_padded = same_padded && v == padded(i, j);
            sum += static_cast<double>(v);
        }
    CHECK(in_range);
    CHECK(identical);
    CHECK(same_padded);
    // Mean of U[low, high): (low + high)/2 with SE (high - low)/sqrt(12 * count); 5 SE bound
    // (false-failure probability 5.7e-7).
    const double count = static_cast<double>(rows * cols);
    const double se = (high - low) / std::sqrt(12.0 * count);
    CHECK(std::abs(sum / count - 0.5 * (low + high)) < 5 * se);

    // An element depends only on (seed, stream, i, j): a smaller view holds the same leading block.
    compact_test::host_matrix<T> small(5, 7);
    compact::fill_uniform(small.view(), low, high, 42, 7);
    bool same_block = true;
    for (index_t i = 0; i < 5; ++i)
        for (index_t j = 0; j < 7; ++j) same_block = same_block && small(i, j) == a(i, j);
    CHECK(same_block);

    // Another seed, or another stream (including one differing only in its high 32 bits), changes
    // (almost) every element: count equal elements; with 2^32 possible words a few coincide at most
    // after rounding to float.
    auto equal_count = [&](std::uint64_t seed, std::uint64_t stream) {
        compact_test::host_matrix<T> c(rows, cols);
        compact::fill_uniform(c.view(), low, high, seed, stream);
        index_t same = 0;
        for (index_t i = 0; i < rows; ++i)
            for (index_t j = 0; j < cols; ++j) same += c(i, j) == a(i, j) ? 1 : 0;
        return same;
    };
    CHECK(equal_count(43, 7) < 10);
    CHECK(equal_count(42, 8) < 10);
    CHECK(equal_count(42, 7 + (std::uint64_t{1} << 32)) < 10);
    CHECK(equal_count(42 + (std::uint64_t{1} << 32), 7) < 10);
    CHECK(equal_count(42, 7) == rows * cols);
}

TEST_CASE("fill_uniform is keyed apart from the projection of the same seed")
{
    // With low = 0, high = 1 a double output is exactly word * 2^-32, so the word can be read back.
    // Without the salt, stream 0 would reproduce the words of the projection (seed, layer 0, epoch 0).
    constexpr std::uint64_t seed = 0x0123456789abcdefull;
    compact_test::host_matrix<double> u(3, 8);
    compact::fill_uniform(u.view(), 0.0, 1.0, seed, 0);
    const compact::projection_key pkey{seed, 0, 0};
    const auto key = compact::detail::projection_philox_key(pkey);
    index_t same = 0;
    for (index_t i = 0; i < 3; ++i)
        for (index_t q = 0; q < 2; ++q) {
            const auto w = compact::philox4x32(
                {{static_cast<std::uint32_t>(q), static_cast<std::uint32_t>(i), 0u, 0u}}, key);
            for (int c = 0; c < 4; ++c) {
                const double word = u(i, 4 * q + c) * 0x1p32;
                CHECK(word == std::floor(word)); // the read-back is exact
                same += static_cast<std::uint32_t>(word) == w.w[c] ? 1 : 0;
            }
        }
    CHECK(same == 0);
}

TEST_CASE("fill_uniform<float> never returns `high`")
{
    // fill_uniform documents U[low, high). It computes low + (high - low) * word * 2^-32 in double and
    // rounds once to T; for T = float and [0, 1) a word >= 2^32 - 128 gives a double >= 1 - 2^-25,
    // which rounds to 1.0f == high. Seed 635711, stream 0 has such a word at element (2, 1) (found by
    // searching Philox outputs; checked below), so a correct implementation must still stay below high.
    constexpr std::uint64_t seed = 635711;
    const compact::philox_key key{{static_cast<std::uint32_t>(seed) ^ 0x5EED1417u, 0u}};
    const auto w = compact::philox4x32({{0u, 2u, 0u, 0u}}, key);
    REQUIRE(w.w[1] >= 0xffffff80u); // the word behind element (2, 1) is one of the 128 largest

    compact_test::host_matrix<double> wide(8, 8);
    compact::fill_uniform(wide.view(), 0.0, 1.0, seed, 0);
    REQUIRE(wide(2, 1) == static_cast<double>(w.w[1]) * 0x1p-32); // same element, same word

    compact_test::host_matrix<float> narrow(8, 8);
    compact::fill_uniform(narrow.view(), 0.0, 1.0, seed, 0);
    CHECK(narrow(2, 1) < 1.0f);
    CHECK(narrow(2, 1) >= 0.0f);
}

TEST_CASE("fill_uniform validates its view")
{
    std::vector<float> storage(16);
    CHECK_THROWS_AS(compact::fill_uniform(compact::matrix_view<float>(storage.data(), 2, 8, 4), 0.0, 1.0, 1, 0),
                    compact::error);
    CHECK_THROWS_AS(compact::fill_uniform(compact::matrix_view<float>(nullptr, 2, 8, 8), 0.0, 1.0, 1, 0),
                    compact::error);
    // An empty view is fine and writes nothing.
    CHECK_NOTHROW(compact::fill_uniform(compact::matrix_view<float>(nullptr, 0, 8, 8), 0.0, 1.0, 1, 0));
}
