// compact/backend/store_scheme.hpp: how a quantized activation store encodes a tensor (SPEC section 5).
//
// A tensor of `count` values is read in row-major order (row by row, ignoring any padding of its view)
// and encoded by one of three schemes:
//
//   full       the values themselves (the 32-bit rung of the bit-allocation ladder; exact);
//   quantized  GACT/ActNN group quantization with stochastic rounding at b in {1, 2, 4, 8} bits:
//              contiguous groups of G values, per group lo = min and hi = max (float; range = hi - lo),
//              B = 2^b - 1, q = floor((x - lo) B / range + u), u ~ U[0, 1) from the counter-based
//              generator; x^ = lo + q range / B (x^ = hi exactly for q = B). Unbiased, per-value
//              variance <= range^2 / (4 B^2);
//   average    ALAM's average quantization: each run of 4 consecutive values becomes its mean (a short
//              last run: the mean of what is there), the means are 2-bit quantized as above in groups
//              of G means, and the restored tensor repeats each mean over its run. 0.5 bit per value
//              plus metadata (0.625 at G = 128); biased (block averaging is a fixed projection).
//
// Byte layout of an encoded tensor (what saved_bytes() counts and the backends write):
//   quantized, average: [groups x {float lo, float hi}] [codes, bit-packed] ; codes are packed
//                       little-endian within bytes (value k of a byte at bits k b .. k b + b - 1), in
//                       value order, so that a group of G (a multiple of 8) codes starts on a byte;
//   full:               [count x Scalar].
// The stochastic-rounding noise of value (or mean) k is a pure function of (noise key, k), so encoding
// is reproducible and independent of thread count and device.
//
// Values that are not finite. A quantized group that holds a NaN or an infinity among its values (for
// average quantization: among its means) is written as lo = hi = NaN (the quiet NaN 0x7FC00000, on
// every backend) with all its codes 0, and restores as NaN for every value it covers (its G values, or
// the 4 G values of its G means), so that a trainer's check for non-finite values sees it; the other
// groups are encoded as if the bad value were not there. Groups of finite values are unaffected by
// this rule. What counts is the value as float: a double beyond float's range becomes an infinity, and
// a mean is taken in float, so a run of finite values whose sum overflows has an infinite mean.
// (A group of finite values whose range hi - lo overflows float, with values of both signs near float's
// limit, is encoded as usual, but its step (hi - lo) / B is infinite, so that its values other than hi
// restore as NaN or infinity.) The scheme full keeps every value as it is, NaN and infinities included.
#pragma once

#include "compact/core/config.hpp"
#include "compact/core/error.hpp"
#include "compact/core/matrix_view.hpp"
#include "compact/random/philox.hpp"

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

COMPACT_NAMESPACE_BEGIN

enum class store_kind : std::uint8_t {
    full,      ///< the values themselves
    quantized, ///< group quantization with stochastic rounding, 1/2/4/8 bits
    average,   ///< ALAM: means of 4 values, 2-bit quantized
};

/// One encoding of a saved tensor. Build with the named constructors; check_scheme validates.
struct store_scheme {
    store_kind kind = store_kind::full;
    int bits = 0;      ///< quantized: 1, 2, 4 or 8; average: 2 (the width of the codes of the means); full: 0
    index_t group = 0; ///< quantized: values per group; average: means per group; full: 0

    static constexpr store_scheme full_precision() noexcept { return {store_kind::full, 0, 0}; }
    /// b-bit group quantization; GACT uses G = 256, ALAM 128.
    static constexpr store_scheme quantized(int bits, index_t group = 256) noexcept
    {
        return {store_kind::quantized, bits, group};
    }
    /// ALAM's average quantization: 2-bit codes of the means of 4 values, G means per group.
    static constexpr store_scheme average(index_t group = 128) noexcept { return {store_kind::average, 2, group}; }

    /// True when E[restored] = the input (full and quantized); average quantization is biased.
    constexpr bool unbiased() const noexcept { return kind != store_kind::average; }
};

inline bool operator==(const store_scheme& a, const store_scheme& b) noexcept
{
    return a.kind == b.kind && a.bits == b.bits && a.group == b.group;
}
inline bool operator!=(const store_scheme& a, const store_scheme& b) noexcept { return !(a == b); }

/// A short name: "full", "int4/g256", "aq/g128".
inline std::string to_string(const store_scheme& s)
{
    switch (s.kind) {
    case store_kind::full: return "full";
    case store_kind::quantized: return "int" + std::to_string(s.bits) + "/g" + std::to_string(s.group);
    case store_kind::average: return "aq/g" + std::to_string(s.group);
    }
    return "unknown";
}

/// Identifies the noise of one encoding: the run's seed, the tensor's id, the step (for example the
/// optimizer update count) and a variant (0 in training; sensitivity probes use others).
struct noise_key {
    std::uint64_t seed = 0;
    std::uint64_t tensor = 0;
    std::uint64_t step = 0;   ///< below 2^32
    std::uint32_t variant = 0;
};

namespace detail {

inline constexpr index_t max_store_group = 2048;
inline constexpr index_t average_run = 4; ///< values averaged into one mean

/// Throws unless `s` is one of the schemes above with valid parameters.
inline void check_scheme(const store_scheme& s, const char* where)
{
    switch (s.kind) {
    case store_kind::full:
        COMPACT_REQUIRE(s.bits == 0 && s.group == 0, where, "scheme full takes no bits or group, got bits=", s.bits,
                        " group=", s.group);
        return;
    case store_kind::quantized:
        COMPACT_REQUIRE(s.bits == 1 || s.bits == 2 || s.bits == 4 || s.bits == 8, where, "scheme bits=", s.bits,
                        " must be 1, 2, 4 or 8");
        break;
    case store_kind::average:
        COMPACT_REQUIRE(s.bits == 2, where, "average quantization uses 2-bit codes, got bits=", s.bits);
        break;
    default: COMPACT_FAIL(where, "scheme kind ", static_cast<int>(s.kind), " is not full, quantized or average");
    }
    COMPACT_REQUIRE(s.group >= 8 && s.group <= max_store_group && s.group % 8 == 0, where, "scheme group=", s.group,
                    " must be a multiple of 8 in [8, ", max_store_group, "]");
}

/// Values (quantized) or means (average) that are coded; 0 for full.
constexpr index_t coded_count(const store_scheme& s, index_t count) noexcept
{
    return s.kind == store_kind::average ? (count + average_run - 1) / average_run : count;
}

constexpr index_t group_count(const store_scheme& s, index_t count) noexcept
{
    return s.kind == store_kind::full ? 0 : (coded_count(s, count) + s.group - 1) / s.group;
}

/// Bytes of the metadata block (two floats per group); the codes follow it.
constexpr std::size_t meta_bytes(const store_scheme& s, index_t count) noexcept
{
    return static_cast<std::size_t>(group_count(s, count)) * 2 * sizeof(float);
}

constexpr std::size_t code_bytes(const store_scheme& s, index_t count) noexcept
{
    return s.kind == store_kind::full
               ? 0
               : (static_cast<std::size_t>(coded_count(s, count)) * static_cast<std::size_t>(s.bits) + 7) / 8;
}

/// The Philox key and the constant counter words of one encoding's noise.
struct noise_stream {
    philox_key key;
    std::uint32_t step;
    std::uint32_t tensor;
};

COMPACT_HD inline noise_stream make_noise_stream(const noise_key& k)
{
    constexpr std::uint32_t salt = 0x51A7E5EDu; // keeps these keys apart from projection and init keys
    return {{{static_cast<std::uint32_t>(k.seed) ^ salt ^ (k.variant * 0x9E3779B9u),
              static_cast<std::uint32_t>(k.seed >> 32) ^ static_cast<std::uint32_t>(k.tensor >> 32)}},
            static_cast<std::uint32_t>(k.step),
            static_cast<std::uint32_t>(k.tensor)};
}

/// The four noise words of coded values 4 jb .. 4 jb + 3.
COMPACT_HD inline philox_counter noise_words(const noise_stream& s, index_t jb)
{
    const auto block = static_cast<std::uint64_t>(jb);
    return philox4x32({{static_cast<std::uint32_t>(block), static_cast<std::uint32_t>(block >> 32), s.step, s.tensor}},
                      s.key);
}

/// A noise word as u in [0, 1), exactly representable in float (24 bits).
COMPACT_HD inline float noise_uniform(std::uint32_t word) { return static_cast<float>(word >> 8) * 0x1p-24f; }

/// Float products and sums rounded one by one: nvcc would otherwise fuse a * b + c into one FMA and
/// the device would write other bytes than the host. (Host builds for x86-64 without -mfma never fuse;
/// a host build with FMA and GCC's default -ffp-contract=fast may, which only matters for comparing
/// bytes across devices.)
COMPACT_HD inline float mul_rn(float a, float b)
{
#ifdef __CUDA_ARCH__
    return __fmul_rn(a, b);
#else
    return a * b;
#endif
}
COMPACT_HD inline float add_rn(float a, float b)
{
#ifdef __CUDA_ARCH__
    return __fadd_rn(a, b);
#else
    return a + b;
#endif
}

/// The stochastic-rounding code of x in a group [lo, hi] with `levels` = B and inv_step = B / (hi - lo),
/// as a float holding an integer in [0, B] (branch-free, so loops over it vectorise). x = lo and x = hi
/// give 0 and B exactly, so two-valued data survives even a 1-bit code unchanged.
COMPACT_HD inline float stochastic_level(float x, float lo, float hi, float inv_step, float u, float levels)
{
    float t = add_rn(mul_rn(x - lo, inv_step), u);
    t = t > 0.0f ? t : 0.0f; // also maps NaN to 0
    t = t < levels ? t : levels;
    const float q = static_cast<float>(static_cast<int>(t)); // floor, as t >= 0
    // x = hi gives B whatever rounding did to (hi - lo) inv_step; written as arithmetic, not a branch,
    // because GCC keeps a branch here and then vectorises nothing.
    const float top = x >= hi ? 1.0f : 0.0f;
    return q + top * (levels - q);
}

/// stochastic_level as an integer code.
COMPACT_HD inline std::uint32_t stochastic_code(float x, float lo, float hi, float inv_step, float u, float levels)
{
    return static_cast<std::uint32_t>(stochastic_level(x, lo, hi, inv_step, u, levels));
}

/// The value of code q in a group [lo, hi]: lo + q (hi - lo) / B, and exactly hi for q = B.
COMPACT_HD inline float restored_value(float q, float lo, float hi, float step, float levels)
{
    return q >= levels ? hi : add_rn(lo, mul_rn(q, step));
}

/// 0 for a finite x; NaN for NaN and the infinities (branch-free, so loops over it vectorise).
COMPACT_HD inline float nonfinite_probe(float x) { return x - x; }

/// lo and hi of a group that holds a value that is not finite: the quiet NaN 0x7FC00000, the same bits
/// on every backend. With them every code is 0 (stochastic_level maps NaN to 0 and x >= NaN is false)
/// and restored_value gives NaN for any code.
COMPACT_HD inline float nonfinite_group_bound()
{
#ifdef __CUDA_ARCH__
    return __int_as_float(0x7FC00000);
#else
    constexpr std::uint32_t bits = 0x7FC00000u;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
#endif
}

/// levels / range, or 0 for a constant group (every code is 0 and x^ = lo exactly).
COMPACT_HD inline float inverse_step(float range, float levels) { return range > 0.0f ? levels / range : 0.0f; }

inline void check_noise_key(const noise_key& key, const char* where)
{
    COMPACT_REQUIRE(key.step < (std::uint64_t{1} << 32), where, "noise step ", key.step, " must be below 2^32");
}

} // namespace detail

/// Bytes an encoding of `count` values of Scalar takes (metadata included).
template <class Scalar>
std::size_t stored_bytes(const store_scheme& s, index_t count) noexcept
{
    if (s.kind == store_kind::full) return static_cast<std::size_t>(count) * sizeof(Scalar);
    return detail::meta_bytes(s, count) + detail::code_bytes(s, count);
}

/// Bits per value of an encoding, metadata included (for example 4.25 for int4/g256 on large tensors).
template <class Scalar>
double bits_per_value(const store_scheme& s, index_t count) noexcept
{
    return count > 0 ? 8.0 * static_cast<double>(stored_bytes<Scalar>(s, count)) / static_cast<double>(count) : 0.0;
}

/// The nominal bits per value a scheme is charged in a bit budget (SPEC section 5): b for quantized,
/// 0.5 for average quantization, the scalar's width for full. Metadata is not charged.
template <class Scalar>
constexpr double nominal_bits(const store_scheme& s) noexcept
{
    return s.kind == store_kind::full      ? 8.0 * sizeof(Scalar)
           : s.kind == store_kind::average ? static_cast<double>(s.bits) / static_cast<double>(detail::average_run)
                                           : static_cast<double>(s.bits);
}

COMPACT_NAMESPACE_END
