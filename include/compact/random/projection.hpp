// compact/random/projection.hpp: the seeded random projection P of SPEC section 1.
//
// P is an (n, r) matrix that is never stored: it is a pure function of a projection_spec
// (shape, distribution, key), so any element, or any block, can be regenerated at any time on any
// device. The generation scheme, fixed here for every backend:
//
//   key     = (seed_lo, seed_hi ^ layer_hi)                     (Philox key words)
//   counter = (j, i, epoch, layer_lo)                           (Philox counter words)
//   philox4x32(counter, key) -> 4 words -> P(i, 4j .. 4j+3)
//
// where i is the row of P and j the block of four columns. For a fixed seed the map
// (layer, epoch, i, j) -> (key, counter) is injective, so no two layers or epochs of a run ever share a
// random number (layer ids are 64-bit; epochs, rows and column blocks must be below 2^32, which every
// entry point checks). Values:
//   gaussian:   Box-Muller on word pairs (0,1) and (2,3) (random/normal.hpp), times 1/sqrt(r);
//   rademacher: (word & 1 ? +1 : -1) / sqrt(r);
//   identity:   P = I, only for r = n (the uncompressed baseline through the same code path).
// E[P P^T] = I for all three.
#pragma once

#include "compact/core/config.hpp"
#include "compact/core/error.hpp"
#include "compact/core/matrix_view.hpp"
#include "compact/random/normal.hpp"
#include "compact/random/philox.hpp"

#include <cmath>
#include <cstdint>

COMPACT_NAMESPACE_BEGIN

enum class distribution : std::uint8_t {
    gaussian,   ///< N(0, 1/r) entries (CompAct's choice)
    rademacher, ///< +-1/sqrt(r) entries: cheaper to generate, slightly lower variance
    identity,   ///< P = I with r = n: no compression, exact gradients
};

inline const char* to_string(distribution d) noexcept
{
    switch (d) {
    case distribution::gaussian: return "gaussian";
    case distribution::rademacher: return "rademacher";
    case distribution::identity: return "identity";
    }
    return "unknown";
}

/// Identifies one projection matrix of a run.
struct projection_key {
    std::uint64_t seed = 0;  ///< the run's seed, shared by every layer and every data-parallel worker
    std::uint64_t layer = 0; ///< caller-assigned id, unique per projection (an input group shares one)
    std::uint64_t epoch = 0; ///< update / T (see resampling); below 2^32
};

inline bool operator==(const projection_key& a, const projection_key& b) noexcept
{
    return a.seed == b.seed && a.layer == b.layer && a.epoch == b.epoch;
}
inline bool operator!=(const projection_key& a, const projection_key& b) noexcept { return !(a == b); }

/// When P is resampled: epoch = update / gap, or never (gap == 0).
struct resampling {
    std::uint64_t gap = 0; ///< T of SPEC section 1: updates between resamplings; 0 keeps one P forever

    constexpr std::uint64_t epoch(std::uint64_t update) const noexcept { return gap == 0 ? 0 : update / gap; }
};

/// Everything that determines P: its shape, its distribution and its key.
struct projection_spec {
    index_t n = 0; ///< rows of P: the layer's input features
    index_t r = 0; ///< columns of P: the rank
    distribution dist = distribution::gaussian;
    projection_key key{};
};

/// Relative variance, per column, of the weight-gradient estimate G_sub P^T (SPEC section 1):
/// (n+1)/r for gaussian, (n-1)/r for rademacher, 0 for identity.
inline double variance_factor(distribution d, index_t n, index_t r) noexcept
{
    switch (d) {
    case distribution::gaussian: return static_cast<double>(n + 1) / static_cast<double>(r);
    case distribution::rademacher: return static_cast<double>(n - 1) / static_cast<double>(r);
    case distribution::identity: return 0.0;
    }
    return 0.0;
}

namespace detail {

inline constexpr std::int64_t max_counter_word = std::int64_t{1} << 32;

/// Validates a spec; every entry point that generates P calls this first.
inline void check_projection(const projection_spec& p, const char* where)
{
    COMPACT_REQUIRE(static_cast<unsigned>(p.dist) <= static_cast<unsigned>(distribution::identity), where,
                    "distribution ", static_cast<unsigned>(p.dist), " is not gaussian, rademacher or identity");
    COMPACT_REQUIRE(p.n >= 1 && p.n < max_counter_word, where, "projection input size n=", p.n,
                    " must be in [1, 2^32)");
    COMPACT_REQUIRE(p.r >= 1 && p.r <= p.n, where, "projection rank r=", p.r, " must be in [1, n=", p.n, "]");
    COMPACT_REQUIRE(p.dist != distribution::identity || p.r == p.n, where, "identity projection needs r == n, got (",
                    p.n, ", ", p.r, ")");
    COMPACT_REQUIRE(p.key.epoch < static_cast<std::uint64_t>(max_counter_word), where, "projection epoch ",
                    p.key.epoch, " must be below 2^32");
}

COMPACT_HD inline philox_key projection_philox_key(const projection_key& k)
{
    return {{static_cast<std::uint32_t>(k.seed), static_cast<std::uint32_t>(k.seed >> 32) ^
                                                     static_cast<std::uint32_t>(k.layer >> 32)}};
}

/// The per-matrix constants of the generation scheme, computed once per fill.
struct projection_stream {
    philox_key key;
    std::uint32_t epoch;
    std::uint32_t layer;
    double scale; // 1 / sqrt(r)
};

COMPACT_HD inline projection_stream make_projection_stream(const projection_spec& p)
{
    return {projection_philox_key(p.key), static_cast<std::uint32_t>(p.key.epoch),
            static_cast<std::uint32_t>(p.key.layer), 1.0 / std::sqrt(static_cast<double>(p.r))};
}

COMPACT_HD inline philox_counter projection_words(const projection_stream& s, index_t i, index_t jb)
{
    return philox4x32({{static_cast<std::uint32_t>(jb), static_cast<std::uint32_t>(i), s.epoch, s.layer}}, s.key);
}

/// Gaussian P(i, 4 jb .. 4 jb + 3), before rounding. Straight-line code: loops over jb vectorise.
COMPACT_HD inline void gaussian_quad(const projection_stream& s, index_t i, index_t jb, double (&out)[4])
{
    const philox_counter x = projection_words(s, i, jb);
    double z0, z1, z2, z3;
    box_muller(x.w[0], x.w[1], z0, z1);
    box_muller(x.w[2], x.w[3], z2, z3);
    out[0] = z0 * s.scale;
    out[1] = z1 * s.scale;
    out[2] = z2 * s.scale;
    out[3] = z3 * s.scale;
}

/// Rademacher P(i, 4 jb .. 4 jb + 3): the low bit of each word picks the sign.
COMPACT_HD inline void rademacher_quad(const projection_stream& s, index_t i, index_t jb, double (&out)[4])
{
    const philox_counter x = projection_words(s, i, jb);
    for (int c = 0; c < 4; ++c) out[c] = (x.w[c] & 1u) ? s.scale : -s.scale;
}

} // namespace detail

/// The four values P(i, 4*jb .. 4*jb+3) in double, before the final rounding to the storage type.
/// Columns at or past r are generated too (and must be ignored by the caller): this keeps the value of
/// an element independent of the width of the block it is generated in.
COMPACT_HD inline void projection_quad(const projection_spec& p, index_t i, index_t jb, double (&out)[4])
{
    if (p.dist == distribution::identity) {
        for (int c = 0; c < 4; ++c) out[c] = (4 * jb + c == i) ? 1.0 : 0.0;
    } else if (p.dist == distribution::rademacher) {
        detail::rademacher_quad(detail::make_projection_stream(p), i, jb, out);
    } else {
        detail::gaussian_quad(detail::make_projection_stream(p), i, jb, out);
    }
}

/// One element P(i, j), for tests and reference code (generates its whole quad).
COMPACT_HD inline double projection_element(const projection_spec& p, index_t i, index_t j)
{
    double q[4];
    projection_quad(p, i, j / 4, q);
    return q[j % 4];
}

COMPACT_NAMESPACE_END
