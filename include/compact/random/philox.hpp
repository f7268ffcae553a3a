// compact/random/philox.hpp: the Philox4x32-10 counter-based generator (Salmon et al., SC'11).
//
// philox4x32(counter, key) is a keyed bijection of 128-bit counters: any element of a random matrix
// can be produced independently from its coordinates, so serial CPU loops, OpenMP threads and CUDA
// threads all produce the same numbers. Checked against Random123's published known-answer vectors
// (tests/test_random.cpp).
#pragma once

#include "compact/core/config.hpp"

#include <cstdint>

COMPACT_NAMESPACE_BEGIN

struct philox_counter {
    std::uint32_t w[4];
};
struct philox_key {
    std::uint32_t w[2];
};

namespace detail {

inline constexpr std::uint32_t philox_m0 = 0xD2511F53u;
inline constexpr std::uint32_t philox_m1 = 0xCD9E8D57u;
inline constexpr std::uint32_t philox_w0 = 0x9E3779B9u; // golden ratio
inline constexpr std::uint32_t philox_w1 = 0xBB67AE85u; // sqrt(3) - 1

COMPACT_HD inline void mulhilo32(std::uint32_t a, std::uint32_t b, std::uint32_t& hi, std::uint32_t& lo)
{
    const std::uint64_t product = static_cast<std::uint64_t>(a) * b;
    hi = static_cast<std::uint32_t>(product >> 32);
    lo = static_cast<std::uint32_t>(product);
}

COMPACT_HD inline void philox_round(std::uint32_t (&x)[4], const std::uint32_t (&k)[2])
{
    std::uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(philox_m0, x[0], hi0, lo0);
    mulhilo32(philox_m1, x[2], hi1, lo1);
    const std::uint32_t y0 = hi1 ^ x[1] ^ k[0];
    const std::uint32_t y2 = hi0 ^ x[3] ^ k[1];
    x[0] = y0;
    x[1] = lo1;
    x[2] = y2;
    x[3] = lo0;
}

} // namespace detail

/// Philox4x32 with 10 rounds: four 32-bit outputs from a 128-bit counter and a 64-bit key.
COMPACT_HD inline philox_counter philox4x32(philox_counter counter, philox_key key)
{
    std::uint32_t x[4] = {counter.w[0], counter.w[1], counter.w[2], counter.w[3]};
    std::uint32_t k[2] = {key.w[0], key.w[1]};
    for (int round = 0; round < 10; ++round) {
        if (round > 0) {
            k[0] += detail::philox_w0;
            k[1] += detail::philox_w1;
        }
        detail::philox_round(x, k);
    }
    return {{x[0], x[1], x[2], x[3]}};
}

COMPACT_NAMESPACE_END
