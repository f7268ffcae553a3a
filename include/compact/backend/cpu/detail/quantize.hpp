// compact/backend/cpu/detail/quantize.hpp: the CPU kernels behind cpu::quantize / dequantize and the 1-bit masks.
//
// Encodings follow backend/store_scheme.hpp exactly. A tensor is processed group by group: a group's values
// are gathered (in row-major order, across row ends) into a float buffer, encoded, and written to the
// group's fixed place in the output; decoding is the reverse. Groups are independent, so the work is
// split over threads by a shape-only partition and every result is identical for any thread count.
// Loops over a group are branch-free so the compiler vectorises them (the Philox noise included).
#pragma once

#include "compact/backend/store_scheme.hpp"
#include "compact/core/config.hpp"
#include "compact/core/matrix_view.hpp"
#include "compact/random/philox.hpp"

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>

COMPACT_NAMESPACE_BEGIN

namespace detail {
namespace cpu_store {

/// Calls f(pointer, length, offset) for the row segments that hold flat values [first, first + len) of a
/// row-major view; offset counts from `first`.
template <class V, class F>
void for_segments(V x, index_t first, index_t len, F&& f)
{
    index_t i = first / x.cols, j = first % x.cols, done = 0;
    while (done < len) {
        const index_t take = std::min(len - done, x.cols - j);
        f(x.row(i) + j, take, done);
        done += take;
        ++i;
        j = 0;
    }
}

template <class T>
void gather(const_matrix_view<T> x, index_t first, index_t len, float* COMPACT_RESTRICT out)
{
    for_segments(x, first, len, [&](const T* COMPACT_RESTRICT p, index_t n, index_t at) {
        for (index_t k = 0; k < n; ++k) out[at + k] = static_cast<float>(p[k]);
    });
}

template <class T>
void scatter(const float* COMPACT_RESTRICT in, index_t first, index_t len, matrix_view<T> x)
{
    for_segments(x, first, len, [&](T* COMPACT_RESTRICT p, index_t n, index_t at) {
        for (index_t k = 0; k < n; ++k) p[k] = static_cast<T>(in[at + k]);
    });
}

/// Packs len codes of Bits bits (Bits in {1, 2, 4, 8}) into (len Bits + 7) / 8 bytes.
template <int Bits>
void pack(const std::uint8_t* COMPACT_RESTRICT q, index_t len, std::uint8_t* COMPACT_RESTRICT out)
{
    constexpr index_t per = 8 / Bits;
    const index_t full = len / per;
    for (index_t b = 0; b < full; ++b) {
        unsigned acc = 0;
        for (index_t k = 0; k < per; ++k) acc |= static_cast<unsigned>(q[b * per + k]) << (k * Bits);
        out[b] = static_cast<std::uint8_t>(acc);
    }
    if (full * per < len) {
        unsigned acc = 0;
        for (index_t k = 0; full * per + k < len; ++k) acc |= static_cast<unsigned>(q[full * per + k]) << (k * Bits);
        out[full] = static_cast<std::uint8_t>(acc);
    }
}

template <int Bits>
void unpack(const std::uint8_t* COMPACT_RESTRICT in, index_t len, std::uint8_t* COMPACT_RESTRICT q)
{
    // Byte by byte with a fixed inner loop: the shape GCC vectorises.
    constexpr int per = 8 / Bits;
    constexpr unsigned mask = (1u << Bits) - 1u;
    const index_t full = len / per;
    for (index_t b = 0; b < full; ++b) {
        const unsigned byte = in[b];
        for (int k = 0; k < per; ++k) q[b * per + k] = static_cast<std::uint8_t>((byte >> (k * Bits)) & mask);
    }
    for (index_t k = full * per; k < len; ++k)
        q[k] = static_cast<std::uint8_t>((static_cast<unsigned>(in[full]) >> ((k - full * per) * Bits)) & mask);
}

inline void pack_codes(int bits, const std::uint8_t* q, index_t len, std::uint8_t* out)
{
    switch (bits) {
    case 1: pack<1>(q, len, out); break;
    case 2: pack<2>(q, len, out); break;
    case 4: pack<4>(q, len, out); break;
    default: pack<8>(q, len, out); break;
    }
}

inline void unpack_codes(int bits, const std::uint8_t* in, index_t len, std::uint8_t* q)
{
    switch (bits) {
    case 1: unpack<1>(in, len, q); break;
    case 2: unpack<2>(in, len, q); break;
    case 4: unpack<4>(in, len, q); break;
    default: unpack<8>(in, len, q); break;
    }
}

/// Encodes one group: v (len coded values, the first with global index `first`, a multiple of 4) to its
/// metadata {lo, hi} and its packed codes; {NaN, NaN} and codes 0 when a value is not finite.
inline void encode_group(const float* COMPACT_RESTRICT v, index_t len, index_t first, int bits, const noise_stream& ns,
                         float* COMPACT_RESTRICT meta, std::uint8_t* COMPACT_RESTRICT codes)
{
    // Min and max in 16 independent lanes, so the loop vectorises without reassociating a reduction.
    constexpr index_t lanes = 16;
    float lo_lane[lanes], hi_lane[lanes];
    for (index_t j = 0; j < lanes; ++j) lo_lane[j] = hi_lane[j] = v[0];
    const index_t whole = len / lanes * lanes;
    for (index_t k = 0; k < whole; k += lanes)
        for (index_t j = 0; j < lanes; ++j) {
            lo_lane[j] = v[k + j] < lo_lane[j] ? v[k + j] : lo_lane[j];
            hi_lane[j] = v[k + j] > hi_lane[j] ? v[k + j] : hi_lane[j];
        }
    float lo = v[0], hi = v[0];
    for (index_t j = 0; j < lanes; ++j) {
        lo = lo_lane[j] < lo ? lo_lane[j] : lo;
        hi = hi_lane[j] > hi ? hi_lane[j] : hi;
    }
    for (index_t k = whole; k < len; ++k) {
        lo = v[k] < lo ? v[k] : lo;
        hi = v[k] > hi ? v[k] : hi;
    }
    const float levels = static_cast<float>((1 << bits) - 1);
    const float inv = inverse_step(hi - lo, levels);

    float u[max_store_group];
    const index_t blocks = (len + 3) / 4, block0 = first / 4;
    for (index_t b = 0; b < blocks; ++b) {
        const philox_counter w = noise_words(ns, block0 + b);
        u[4 * b + 0] = noise_uniform(w.w[0]);
        u[4 * b + 1] = noise_uniform(w.w[1]);
        u[4 * b + 2] = noise_uniform(w.w[2]);
        u[4 * b + 3] = noise_uniform(w.w[3]);
    }
    // The check for values that are not finite rides along in the code loop, an integer OR that
    // vectorises (min and max skip a NaN that is not the first value, so they cannot tell; a float sum
    // of probes in 16 more lanes spills registers and cost 17% of encode throughput).
    std::uint8_t q[max_store_group];
    unsigned nonfinite = 0;
    for (index_t k = 0; k < len; ++k) {
        q[k] = static_cast<std::uint8_t>(static_cast<int>(stochastic_level(v[k], lo, hi, inv, u[k], levels)));
        nonfinite |= nonfinite_probe(v[k]) != 0.0f ? 1u : 0u;
    }
    if (nonfinite != 0) { // store_scheme.hpp: lo = hi = NaN and codes 0, so the group restores as NaN
        lo = hi = nonfinite_group_bound();
        std::fill(q, q + len, std::uint8_t{0});
    }
    pack_codes(bits, q, len, codes);
    meta[0] = lo;
    meta[1] = hi;
}

/// Decodes one group; a group marked as not finite (lo = hi = NaN) gives NaN for every value, from the
/// arithmetic alone.
inline void decode_group(const float* COMPACT_RESTRICT meta, const std::uint8_t* COMPACT_RESTRICT codes, index_t len,
                         int bits, float* COMPACT_RESTRICT v)
{
    std::uint8_t q[max_store_group];
    unpack_codes(bits, codes, len, q);
    const float lo = meta[0], hi = meta[1], levels = static_cast<float>((1 << bits) - 1);
    const float step = (hi - lo) / levels;
    for (index_t k = 0; k < len; ++k) v[k] = restored_value(static_cast<float>(q[k]), lo, hi, step, levels);
}

/// Values of the tensor that group g covers: [first, first + len).
struct group_span {
    index_t first, len;
};

inline group_span values_of_group(const store_scheme& s, index_t count, index_t g) noexcept
{
    const index_t per = s.kind == store_kind::average ? s.group * average_run : s.group;
    return {g * per, std::min(count, (g + 1) * per) - g * per};
}

/// Groups per thread part: about 32K values, so a part amortises the thread hand-off.
inline index_t groups_per_part(const store_scheme& s) noexcept
{
    const index_t per = s.kind == store_kind::average ? s.group * average_run : s.group;
    return std::max<index_t>(1, 32768 / per);
}

template <class T, class ParallelFor>
void quantize(ParallelFor&& parallel_for, const store_scheme& s, const noise_key& key, const_matrix_view<T> x,
              std::byte* out)
{
    const index_t count = x.rows * x.cols;
    if (count == 0) return;
    if (s.kind == store_kind::full) {
        T* o = reinterpret_cast<T*>(out);
        for_segments(x, 0, count, [&](const T* p, index_t n, index_t at) { std::memcpy(o + at, p, sizeof(T) * n); });
        return;
    }
    const noise_stream ns = make_noise_stream(key);
    float* meta = reinterpret_cast<float*>(out);
    std::uint8_t* codes = reinterpret_cast<std::uint8_t*>(out + meta_bytes(s, count));
    const index_t groups = group_count(s, count), per_part = groups_per_part(s);
    parallel_for((groups + per_part - 1) / per_part, [&](index_t part) {
        float v[max_store_group * average_run];
        for (index_t g = part * per_part; g < std::min(groups, (part + 1) * per_part); ++g) {
            const group_span span = values_of_group(s, count, g);
            gather(x, span.first, span.len, v);
            index_t coded = span.len;
            if (s.kind == store_kind::average) {
                coded = (span.len + average_run - 1) / average_run;
                for (index_t k = 0; k < span.len / average_run; ++k)
                    v[k] = (v[4 * k] + v[4 * k + 1] + v[4 * k + 2] + v[4 * k + 3]) * 0.25f;
                if (span.len % average_run != 0) {
                    const index_t tail = span.len / average_run, n = span.len % average_run;
                    float sum = 0.0f;
                    for (index_t k = 0; k < n; ++k) sum += v[4 * tail + k];
                    v[tail] = sum / static_cast<float>(n);
                }
            }
            encode_group(v, coded, g * s.group, s.bits, ns, meta + 2 * g,
                         codes + static_cast<std::size_t>(g) * static_cast<std::size_t>(s.group * s.bits / 8));
        }
    });
}

/// Decodes values [first, first + out.rows * out.cols) of an encoding of `count` values into out.
template <class T, class ParallelFor>
void dequantize(ParallelFor&& parallel_for, const store_scheme& s, const std::byte* in, index_t count, index_t first,
                matrix_view<T> out)
{
    const index_t len = out.rows * out.cols;
    if (len == 0) return;
    if (s.kind == store_kind::full) {
        const T* src = reinterpret_cast<const T*>(in) + first;
        for_segments(out, 0, len, [&](T* p, index_t n, index_t at) { std::memcpy(p, src + at, sizeof(T) * n); });
        return;
    }
    const float* meta = reinterpret_cast<const float*>(in);
    const std::uint8_t* codes = reinterpret_cast<const std::uint8_t*>(in + meta_bytes(s, count));
    const index_t per = s.kind == store_kind::average ? s.group * average_run : s.group;
    const index_t g0 = first / per, g1 = (first + len - 1) / per + 1, per_part = groups_per_part(s);
    parallel_for((g1 - g0 + per_part - 1) / per_part, [&](index_t part) {
        float v[max_store_group * average_run];
        for (index_t g = g0 + part * per_part; g < std::min(g1, g0 + (part + 1) * per_part); ++g) {
            const group_span span = values_of_group(s, count, g);
            const index_t coded = s.kind == store_kind::average ? (span.len + average_run - 1) / average_run : span.len;
            decode_group(meta + 2 * g,
                         codes + static_cast<std::size_t>(g) * static_cast<std::size_t>(s.group * s.bits / 8), coded,
                         s.bits, v);
            if (s.kind == store_kind::average)
                for (index_t k = span.len - 1; k >= 0; --k) v[k] = v[k / average_run];
            // The part of this group inside [first, first + len).
            const index_t lo = std::max(first, span.first), hi = std::min(first + len, span.first + span.len);
            scatter(v + (lo - span.first), lo - first, hi - lo, out);
        }
    });
}

/// Runs f(first, len) over parts of [0, count) that start on whole mask bytes.
template <class ParallelFor, class F>
void for_mask_parts(ParallelFor&& parallel_for, index_t count, F&& f)
{
    constexpr index_t per_part = 32768; // a multiple of 8
    parallel_for((count + per_part - 1) / per_part,
                 [&](index_t part) { f(part * per_part, std::min(count, (part + 1) * per_part) - part * per_part); });
}

/// y = bit ? x * scale : 0 with the mask bits of each part from decide(first, len, bits) (one byte per
/// value, 0 or 1); packs the bits into mask. y may alias x.
template <class T, class ParallelFor, class Decide>
void masked_copy(ParallelFor&& parallel_for, const_matrix_view<T> x, matrix_view<T> y, double scale,
                 std::uint8_t* mask, Decide&& decide)
{
    const index_t count = x.rows * x.cols;
    const T s = static_cast<T>(scale);
    for_mask_parts(parallel_for, count, [&](index_t first, index_t len) {
        std::uint8_t bits[32768];
        decide(first, len, bits);
        // x and y have one shape, so y's row segments are x's: read each value right before writing it.
        for_segments(y, first, len, [&](T* p, index_t n, index_t at) {
            const T* src = x.row((first + at) / x.cols) + (first + at) % x.cols;
            for (index_t k = 0; k < n; ++k) p[k] = bits[at + k] ? static_cast<T>(src[k] * s) : T(0);
        });
        pack<1>(bits, len, mask + first / 8);
    });
}

/// ReLU: y = max(x, 0), bit = x > 0 (NaN gives 0).
template <class T, class ParallelFor>
void relu_mask(ParallelFor&& parallel_for, const_matrix_view<T> x, matrix_view<T> y, std::uint8_t* mask)
{
    masked_copy(parallel_for, x, y, 1.0, mask, [&](index_t first, index_t len, std::uint8_t* bits) {
        for_segments(x, first, len, [&](const T* p, index_t n, index_t at) {
            for (index_t k = 0; k < n; ++k) bits[at + k] = p[k] > T(0) ? 1 : 0;
        });
    });
}

/// Dropout with drop probability p: value k is kept when its noise u_k >= p; kept values are scaled by
/// 1 / (1 - p).
template <class T, class ParallelFor>
void dropout_mask(ParallelFor&& parallel_for, double p, const noise_key& key, const_matrix_view<T> x,
                  matrix_view<T> y, std::uint8_t* mask)
{
    const noise_stream ns = make_noise_stream(key);
    const float threshold = static_cast<float>(p);
    masked_copy(parallel_for, x, y, 1.0 / (1.0 - p), mask, [&](index_t first, index_t len, std::uint8_t* bits) {
        // first is a multiple of 8, so the noise blocks of four line up with the part.
        for (index_t b = 0; b < (len + 3) / 4; ++b) {
            const philox_counter w = noise_words(ns, first / 4 + b);
            for (int c = 0; c < 4; ++c)
                if (4 * b + c < len) bits[4 * b + c] = noise_uniform(w.w[c]) >= threshold ? 1 : 0;
        }
    });
}

/// dx = mask ? dy * scale : 0 (dx may alias dy).
template <class T, class ParallelFor>
void apply_mask(ParallelFor&& parallel_for, const std::uint8_t* mask, double scale, const_matrix_view<T> dy,
                matrix_view<T> dx)
{
    const index_t count = dy.rows * dy.cols;
    const T s = static_cast<T>(scale);
    for_mask_parts(parallel_for, count, [&](index_t first, index_t len) {
        std::uint8_t bits[32768];
        unpack<1>(mask + first / 8, len, bits);
        for_segments(dx, first, len, [&](T* p, index_t n, index_t at) {
            const T* src = dy.row((first + at) / dy.cols) + (first + at) % dy.cols;
            for (index_t k = 0; k < n; ++k) p[k] = bits[at + k] ? static_cast<T>(src[k] * s) : T(0);
        });
    });
}

} // namespace cpu_store
} // namespace detail

COMPACT_NAMESPACE_END
