// compact/random/uniform.hpp: reproducible uniform initialisation from the counter-based generator.
//
// fill_uniform(view, low, high, seed, stream) writes U[low, high) values that depend only on
// (seed, stream, i, j): the same on every run and every thread count. Its Philox key is salted, so these
// numbers are independent of every projection matrix drawn from the same seed.
#pragma once

#include "compact/core/config.hpp"
#include "compact/core/error.hpp"
#include "compact/core/matrix_view.hpp"
#include "compact/random/normal.hpp"
#include "compact/random/philox.hpp"

#include <cmath>
#include <cstdint>

COMPACT_NAMESPACE_BEGIN

/// Host-side fill of a (rows, cols) view with U[low, high) values keyed by (seed, stream).
template <class T>
void fill_uniform(matrix_view<T> out, double low, double high, std::uint64_t seed, std::uint64_t stream)
{
    detail::check_view(out, "fill_uniform", "out");
    COMPACT_REQUIRE(std::isfinite(low) && std::isfinite(high) && low < high, "fill_uniform", "[low, high) = [", low,
                    ", ", high, ") must be a non-empty finite interval");
    constexpr std::uint32_t salt = 0x5EED1417u; // keeps these keys apart from projection keys
    const philox_key key{{static_cast<std::uint32_t>(seed) ^ salt, static_cast<std::uint32_t>(seed >> 32)}};
    for (index_t i = 0; i < out.rows; ++i)
        for (index_t q = 0; q < (out.cols + 3) / 4; ++q) {
            const philox_counter x = philox4x32({{static_cast<std::uint32_t>(q), static_cast<std::uint32_t>(i),
                                                  static_cast<std::uint32_t>(stream),
                                                  static_cast<std::uint32_t>(stream >> 32)}},
                                                key);
            for (index_t c = 0; c < 4 && 4 * q + c < out.cols; ++c) {
                T value = static_cast<T>(low + (high - low) * (static_cast<double>(x.w[c]) * 0x1p-32));
                // Rounding to a narrower T can reach `high`; keep the interval half-open.
                if (!(value < static_cast<T>(high))) value = std::nextafter(static_cast<T>(high), static_cast<T>(low));
                out(i, 4 * q + c) = value;
            }
        }
}

COMPACT_NAMESPACE_END
