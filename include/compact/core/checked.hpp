// compact/core/checked.hpp: size arithmetic on user numbers that cannot wrap.
//
// Every byte or element count the library computes from caller-supplied extents goes through these, so
// that a shape such as (2^32, 2^32) is an error naming the function, never a small buffer followed by an
// out-of-bounds write.
#pragma once

#include "compact/core/config.hpp"
#include "compact/core/error.hpp"

#include <cstddef>
#include <cstdint>
#include <limits>

COMPACT_NAMESPACE_BEGIN
namespace detail {

/// a * b for non-negative a and b, or an error when the product does not fit in int64.
inline std::int64_t checked_mul(std::int64_t a, std::int64_t b, const char* where)
{
    COMPACT_REQUIRE(a >= 0 && b >= 0, where, "sizes ", a, " and ", b, " must be non-negative");
    COMPACT_REQUIRE(a == 0 || b <= std::numeric_limits<std::int64_t>::max() / a, where, "the size ", a, " x ", b,
                    " overflows a 64-bit count");
    return a * b;
}

/// a * b * bytes as a byte count, or an error when it does not fit in size_t (and int64).
inline std::size_t checked_mul_size(std::int64_t a, std::int64_t b, std::size_t bytes, const char* where)
{
    const std::int64_t n = checked_mul(a, b, where);
    COMPACT_REQUIRE(bytes == 0 || static_cast<std::uint64_t>(n) <=
                                      static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()) / bytes,
                    where, "the size ", a, " x ", b, " x ", bytes, " bytes overflows a 64-bit count");
    return static_cast<std::size_t>(n) * bytes;
}

/// a + b for byte counts, or an error when the sum wraps.
inline std::size_t checked_add(std::size_t a, std::size_t b, const char* where)
{
    COMPACT_REQUIRE(b <= std::numeric_limits<std::size_t>::max() - a, where, "the byte count ", a, " + ", b,
                    " overflows");
    return a + b;
}

} // namespace detail
/// rows * cols * bytes as a byte count, or compact::error naming `where` when it overflows: for sizes
/// computed from user numbers in code built on the library (a compressor's saved_bytes, say).
inline std::size_t checked_bytes(std::int64_t rows, std::int64_t cols, std::size_t bytes, const char* where)
{
    return detail::checked_mul_size(rows, cols, bytes, where);
}

COMPACT_NAMESPACE_END
