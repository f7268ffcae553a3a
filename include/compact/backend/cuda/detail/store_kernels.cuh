// compact/backend/cuda/detail/store_kernels.cuh: the kernels behind cuda::quantize / dequantize and the 1-bit masks.
//
// They write the very bytes the CPU backend writes (backend/store_scheme.hpp for the format,
// backend/cpu/detail/quantize.hpp for the CPU's kernels), for float and double exactly and for __half and
// __nv_bfloat16 as the CPU's float encoding of their values converted to float.
//
// quantize: one thread block per group (G values, or 4 G values averaged into G means). Each thread loads
//   quads of four consecutive values (one 8-, 16- or 32-byte vector load when the view is dense and
//   16-byte aligned; row by row through ld otherwise), converts them to float into a shared buffer of the
//   group's coded values (average: each thread averages one run of four into one mean), and keeps the
//   least and greatest; cub::BlockReduce combines them. Then each thread codes one unit of whole output
//   bytes (4 codes, 8 at 1 bit: one Philox call per 4 codes) and stores it with one 1-, 2- or 4-byte
//   store, so no two threads write one byte and no atomics are needed.
// dequantize: one block per group that meets the range, one thread per quad of output values.
// masks: one thread per mask byte, i.e. 8 consecutive values.
// full: cudaMemcpyAsync / cudaMemcpy2DAsync on the stream.
// Masks keep or zero values as the CPU does; for 16-bit T a kept value is x times the scale in float,
// rounded once to T.
//
// Bit-exactness with the CPU:
// - nvcc contracts a * b + c into one FMA in device code where the host compiler rounds twice, so
//   scheme.hpp's stochastic_code / restored_value, which the kernels call, round every operation
//   separately on the device (mul_rn / add_rn). Do not compile with --use_fast_math or -ftz=true:
//   flushing subnormals changes codes.
// - lo and hi of a group are those of the CPU's loop: the least (greatest) value, among equal values (a
//   zero and a negative zero) the first in the CPU's order of visits (tie_rank). The block reduction
//   orders (value, rank) pairs, which makes it commutative and associative, so any reduction tree gives
//   that answer. A group with a value (mean) that is not finite gets lo = hi = nonfinite_group_bound()
//   instead, a constant, so its codes are 0 as on the CPU (store_scheme.hpp); the reduction carries
//   that as a flag, OR-ed, so it too is independent of the tree.
//
// Cost: per value, quantize reads sizeof(T) bytes and writes b / 8 bytes plus 8 / G bytes of metadata;
// dequantize reads b / 8 and writes sizeof(T); a mask kernel reads and writes sizeof(T) and writes or
// reads 1 / 8 byte. The kernels are meant to be memory bound; quantize and dropout also spend one Philox
// call (about 100 instructions) per 4 values, which may make them issue bound for 16-bit T.
#pragma once

#include "compact/backend/cuda/error.cuh"
#include "compact/backend/cuda/scalar.cuh"
#include "compact/backend/store_scheme.hpp"
#include "compact/core/config.hpp"
#include "compact/core/error.hpp"
#include "compact/core/matrix_view.hpp"
#include "compact/random/philox.hpp"

#include <cub/block/block_reduce.cuh>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

COMPACT_NAMESPACE_BEGIN
namespace detail {
namespace cuda_store {

// ------------------------------------------------------------------------------ launch arithmetic

/// Tensor values one group covers: G (quantized) or 4 G (average).
constexpr index_t values_per_group(const store_scheme& s) noexcept
{
    return s.kind == store_kind::average ? s.group * average_run : s.group;
}

/// Quads of four values in a full group: the work items of its block (a quad is a run of the average).
constexpr index_t quads_per_group(const store_scheme& s) noexcept { return values_per_group(s) / 4; }

inline constexpr unsigned min_group_threads = 32;
inline constexpr unsigned max_group_threads = 256;

/// Threads of a group's block: the least power of two >= its quads, within [32, 256], so that a
/// block of a small group keeps no idle warps (an SM holds at most 32 blocks).
constexpr unsigned group_threads(const store_scheme& s) noexcept
{
    unsigned t = min_group_threads;
    while (t < max_group_threads && static_cast<index_t>(t) < quads_per_group(s)) t *= 2;
    return t;
}

/// Dynamic shared memory of a quantize block: the group's coded values (or means) in float.
constexpr std::size_t group_shared_bytes(const store_scheme& s) noexcept
{
    return static_cast<std::size_t>(s.group) * sizeof(float);
}

/// Blocks for `groups` groups: one each, up to the grid limit (blocks then loop over groups).
constexpr unsigned group_grid(index_t groups) noexcept
{
    return static_cast<unsigned>(groups < 1 ? 1 : (groups > INT_MAX ? INT_MAX : groups));
}

inline constexpr unsigned mask_threads = 256;

/// Blocks for a grid-stride loop over `bytes` mask bytes, one per thread.
constexpr unsigned mask_grid(index_t bytes) noexcept
{
    const index_t blocks = (bytes + mask_threads - 1) / mask_threads;
    return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > 65535 ? 65535 : blocks));
}

/// Codes one thread packs: 4 (one Philox call), or 8 at 1 bit so that they fill a byte.
COMPACT_HD constexpr int unit_codes(int bits) noexcept { return bits == 1 ? 8 : 4; }
/// Bytes those codes fill: 1, 1, 2 or 4 at 1, 2, 4 or 8 bits.
COMPACT_HD constexpr int unit_bytes(int bits) noexcept { return unit_codes(bits) * bits / 8; }

template <class T>
inline constexpr bool is_storage_type = std::is_same_v<T, float> || std::is_same_v<T, double> ||
                                        std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>;

/// Whether a view's values can be moved with vector accesses: dense and 16-byte aligned, so that a
/// quad (octet) of values that starts at a flat index divisible by 4 (8) is aligned to its size.
template <class T>
bool vector_ok(const matrix_view<T>& v) noexcept
{
    return v.contiguous() && reinterpret_cast<std::uintptr_t>(v.data) % 16 == 0;
}

// ------------------------------------------------------------------------- per-thread building blocks
// COMPACT_HD so that the host tests can run them, thread by thread, against the CPU backend.

COMPACT_HD constexpr index_t min_of(index_t a, index_t b) noexcept { return a < b ? a : b; }
COMPACT_HD constexpr index_t max_of(index_t a, index_t b) noexcept { return a > b ? a : b; }

/// out = the N values at p with 8- or 16-byte loads; p is aligned to min(N sizeof(T), 16) bytes.
template <class T, int N>
COMPACT_HD void load_vector(const T* p, T (&out)[N])
{
    constexpr std::size_t bytes = N * sizeof(T);
    static_assert(bytes == 8 || bytes % 16 == 0, "vector accesses move 8 bytes or a multiple of 16");
#if defined(__CUDA_ARCH__)
    if constexpr (bytes == 8) {
        const uint2 w = *reinterpret_cast<const uint2*>(p);
        memcpy(static_cast<void*>(out), &w, 8);
    } else {
        for (std::size_t k = 0; k < bytes / 16; ++k) {
            const uint4 w = reinterpret_cast<const uint4*>(p)[k];
            memcpy(reinterpret_cast<unsigned char*>(static_cast<void*>(out)) + 16 * k, &w, 16);
        }
    }
#else
    std::memcpy(static_cast<void*>(out), static_cast<const void*>(p), bytes);
#endif
}

template <class T, int N>
COMPACT_HD void store_vector(const T (&in)[N], T* p)
{
    constexpr std::size_t bytes = N * sizeof(T);
    static_assert(bytes == 8 || bytes % 16 == 0, "vector accesses move 8 bytes or a multiple of 16");
#if defined(__CUDA_ARCH__)
    if constexpr (bytes == 8) {
        uint2 w;
        memcpy(&w, static_cast<const void*>(in), 8);
        *reinterpret_cast<uint2*>(p) = w;
    } else {
        for (std::size_t k = 0; k < bytes / 16; ++k) {
            uint4 w;
            memcpy(&w, reinterpret_cast<const unsigned char*>(static_cast<const void*>(in)) + 16 * k, 16);
            reinterpret_cast<uint4*>(p)[k] = w;
        }
    }
#else
    std::memcpy(static_cast<void*>(p), static_cast<const void*>(in), bytes);
#endif
}

// The loops below run over all N with a test, not up to n, so that they unroll and v stays in registers.

/// v[c] = flat value f + c of x (row-major order) for c in [c0, c1) within [0, N). vector: x is
/// vector_ok and f is divisible by N; a whole N then moves in vector loads.
template <int N, class T>
COMPACT_HD void read_values(const_matrix_view<T> x, index_t f, int c0, int c1, bool vector, T (&v)[N])
{
    if (vector && c0 == 0 && c1 == N) {
        load_vector(x.data + f, v);
        return;
    }
    if (x.contiguous()) {
        for (int c = 0; c < N; ++c)
            if (c >= c0 && c < c1) v[c] = x.data[f + c];
        return;
    }
    index_t i = (f + c0) / x.cols, j = f + c0 - i * x.cols;
    for (int c = 0; c < N; ++c)
        if (c >= c0 && c < c1) {
            v[c] = x.data[i * x.ld + j];
            if (++j == x.cols) {
                j = 0;
                ++i;
            }
        }
}

/// Flat value f + c of y = v[c] for c in [c0, c1); as read_values.
template <int N, class T>
COMPACT_HD void write_values(const T (&v)[N], index_t f, int c0, int c1, bool vector, matrix_view<T> y)
{
    if (vector && c0 == 0 && c1 == N) {
        store_vector(v, y.data + f);
        return;
    }
    if (y.contiguous()) {
        for (int c = 0; c < N; ++c)
            if (c >= c0 && c < c1) y.data[f + c] = v[c];
        return;
    }
    index_t i = (f + c0) / y.cols, j = f + c0 - i * y.cols;
    for (int c = 0; c < N; ++c)
        if (c >= c0 && c < c1) {
            y.data[i * y.ld + j] = v[c];
            if (++j == y.cols) {
                j = 0;
                ++i;
            }
        }
}

template <class T>
COMPACT_HD float to_float(T x)
{
    return static_cast<float>(to_compute(x)); // double: one rounding, to nearest, as the CPU's cast
}

/// cpu_store::encode_group visits a group's first len / 16 * 16 values in 16 interleaved lanes (value
/// k in lane k % 16), the lanes in order, then the rest one by one, and keeps the first of equal
/// extremes. The rank of value k in that order (value 0 first), for len coded values.
inline constexpr index_t cpu_extreme_lanes = 16;
COMPACT_HD inline int tie_rank(index_t k, index_t len)
{
    const index_t whole = len / cpu_extreme_lanes * cpu_extreme_lanes;
    return static_cast<int>(k < whole ? (k % cpu_extreme_lanes) * (whole / cpu_extreme_lanes) + k / cpu_extreme_lanes
                                      : k);
}

/// The least and greatest finite values seen, with their tie_rank (-1: none seen yet), and whether a
/// value that is not finite was seen.
struct extremes {
    float lo, hi;
    int at_lo, at_hi;
    bool nonfinite;
};

COMPACT_HD inline extremes no_extremes() { return {0.0f, 0.0f, -1, -1, false}; }

/// The least (greatest) of two, the lower rank among equal values: a total order of (value, rank),
/// so that the combination is commutative and associative; nonfinite is OR-ed.
COMPACT_HD inline extremes combine(const extremes& a, const extremes& b)
{
    extremes r = a.at_lo < 0 ? b : a;
    if (a.at_lo >= 0 && b.at_lo >= 0) {
        if (b.lo < a.lo || (!(a.lo < b.lo) && b.at_lo < a.at_lo)) {
            r.lo = b.lo;
            r.at_lo = b.at_lo;
        }
        if (b.hi > a.hi || (!(a.hi > b.hi) && b.at_hi < a.at_hi)) {
            r.hi = b.hi;
            r.at_hi = b.at_hi;
        }
    }
    r.nonfinite = a.nonfinite || b.nonfinite;
    return r;
}

/// e with value x of rank `at`; a NaN or an infinity only marks e (the group's range is then unused).
COMPACT_HD inline extremes include(const extremes& e, float x, int at)
{
    if (nonfinite_probe(x) != 0.0f) {
        extremes r = e;
        r.nonfinite = true;
        return r;
    }
    return combine(e, {x, x, at, at, false});
}

struct combine_extremes {
    COMPACT_HD extremes operator()(const extremes& a, const extremes& b) const { return combine(a, b); }
};

/// The group's {lo, hi}: the CPU's, given the combination of all its values.
struct group_range {
    float lo, hi;
};
COMPACT_HD inline group_range finish(const extremes& all)
{
    return all.nonfinite ? group_range{nonfinite_group_bound(), nonfinite_group_bound()}
                         : group_range{all.lo, all.hi};
}

/// Where group g lies: tensor values [first, first + values), coding `coded` values (or means).
struct group_extent {
    index_t first, values, coded;
};

COMPACT_HD inline group_extent extent_of(const store_scheme& s, index_t count, index_t g)
{
    const index_t per = s.kind == store_kind::average ? s.group * average_run : s.group;
    const index_t first = g * per, values = min_of(count, first + per) - first;
    return {first, values, s.kind == store_kind::average ? (values + average_run - 1) / average_run : values};
}

/// Load step of quantization, quad q of group e: its values, as float, to buf[4 q, 4 q + 4) (0 past
/// the group's end); returns their extremes.
template <class T>
COMPACT_HD extremes load_quad(const_matrix_view<T> x, const group_extent& e, index_t q, bool vector, float* buf)
{
    const index_t k0 = 4 * q;
    const int n = static_cast<int>(min_of(4, e.values - k0));
    T raw[4]{};
    read_values(x, e.first + k0, 0, n, vector, raw);
    float v[4];
    extremes m = no_extremes();
    for (int c = 0; c < 4; ++c) {
        v[c] = c < n ? to_float(raw[c]) : 0.0f;
        if (c < n) m = include(m, v[c], tie_rank(k0 + c, e.coded));
    }
    store_vector(v, buf + k0);
    return m;
}

/// Load step of average quantization, mean r of group e: the mean of its run (cpu_store::quantize's
/// expressions, in its order) to buf[r] (0 for r >= e.coded); returns its extremes.
template <class T>
COMPACT_HD extremes load_run(const_matrix_view<T> x, const group_extent& e, index_t r, bool vector, float* buf)
{
    if (r >= e.coded) {
        buf[r] = 0.0f;
        return no_extremes();
    }
    const index_t k0 = average_run * r;
    const int n = static_cast<int>(min_of(average_run, e.values - k0));
    T raw[4]{};
    read_values(x, e.first + k0, 0, n, vector, raw);
    float mean;
    if (n == 4) {
        mean = mul(add(add(add(to_float(raw[0]), to_float(raw[1])), to_float(raw[2])), to_float(raw[3])), 0.25f);
    } else {
        float sum = 0.0f;
        for (int c = 0; c < 4; ++c)
            if (c < n) sum = add(sum, to_float(raw[c]));
        mean = div(sum, static_cast<float>(n));
    }
    buf[r] = mean;
    return include(no_extremes(), mean, tie_rank(r, e.coded));
}

/// Load items of a group: quads (quantized) or means (average), up to a whole quad of coded values.
COMPACT_HD inline index_t load_items(const store_scheme& s, const group_extent& e)
{
    const index_t quads = (e.coded + 3) / 4;
    return s.kind == store_kind::average ? 4 * quads : quads;
}

/// What coding a group needs once its range is known.
struct group_coding {
    noise_stream noise;
    index_t block0; ///< Philox block of the group's first coded value
    index_t coded;
    float lo, hi, inv_step, levels;
    int bits;
};

COMPACT_HD inline group_coding coding_of(const store_scheme& s, const noise_stream& ns, const group_extent& e,
                                         index_t g, group_range r)
{
    const float levels = static_cast<float>((1 << s.bits) - 1);
    const float range = r.hi - r.lo;
    return {ns, g * s.group / 4, e.coded, r.lo, r.hi, range > 0.0f ? div(levels, range) : 0.0f, levels, s.bits};
}

/// Bytes of a group's codes: (coded b + 7) / 8.
COMPACT_HD inline index_t group_code_bytes(const group_coding& c) { return (c.coded * c.bits + 7) / 8; }

/// Code step: codes [u C, u C + C) of a group (C = unit_codes) from buf, packed little-endian and
/// stored at codes + u unit_bytes; codes past the group's end are 0, and bytes past its codes are not
/// written.
COMPACT_HD inline void encode_unit(const float* buf, index_t u, const group_coding& c, std::uint8_t* codes)
{
    const int quads = unit_codes(c.bits) / 4;
    std::uint32_t acc = 0;
    for (int h = 0; h < quads; ++h) {
        const index_t q = u * quads + h; // quad of codes in the group
        if (4 * q >= c.coded) break;
        float v[4];
        load_vector(buf + 4 * q, v);
        const philox_counter w = noise_words(c.noise, c.block0 + q);
        for (int k = 0; k < 4; ++k)
            if (4 * q + k < c.coded)
                acc |= stochastic_code(v[k], c.lo, c.hi, c.inv_step, noise_uniform(w.w[k]), c.levels)
                       << (c.bits * (4 * h + k));
    }
    const int width = unit_bytes(c.bits);
    const index_t at = u * width;
    const int n = static_cast<int>(min_of(width, group_code_bytes(c) - at));
#if defined(__CUDA_ARCH__)
    if (n == width) { // aligned: the codes start 4-byte aligned and a group's bytes are a multiple of width
        if (width == 4) *reinterpret_cast<std::uint32_t*>(codes + at) = acc;
        else if (width == 2) *reinterpret_cast<std::uint16_t*>(codes + at) = static_cast<std::uint16_t>(acc);
        else codes[at] = static_cast<std::uint8_t>(acc);
        return;
    }
#endif
    for (int b = 0; b < n; ++b) codes[at + b] = static_cast<std::uint8_t>(acc >> (8 * b));
}

/// Code k of a group's packed codes.
COMPACT_HD inline std::uint32_t code_at(const std::uint8_t* codes, index_t k, int bits)
{
    const index_t bit = k * bits;
    return (static_cast<std::uint32_t>(codes[bit >> 3]) >> (bit & 7)) & ((1u << bits) - 1u);
}

/// Decode step: those of output values [4 qo, 4 qo + 4) that lie in group g, where output value o
/// (row-major in out) is tensor value first + o; `meta` and `codes` are the encoding's. vector: out
/// is vector_ok (a whole quad is then one vector store).
template <class T>
COMPACT_HD void decode_quad(const store_scheme& s, const float* meta, const std::uint8_t* codes, index_t count,
                            index_t first, index_t g, index_t qo, bool vector, matrix_view<T> out)
{
    const group_extent e = extent_of(s, count, g);
    const index_t last = first + out.rows * out.cols;
    const index_t o0 = max_of(4 * qo, max_of(e.first, first) - first);
    const index_t o1 = min_of(4 * qo + 4, min_of(e.first + e.values, last) - first);
    if (o0 >= o1) return;
    const float lo = meta[2 * g], hi = meta[2 * g + 1];
    const float levels = static_cast<float>((1 << s.bits) - 1), step = div(hi - lo, levels);
    const std::uint8_t* group_codes = codes + g * (s.group * s.bits / 8);
    const int c0 = static_cast<int>(o0 - 4 * qo), c1 = static_cast<int>(o1 - 4 * qo);
    T v[4]{};
    for (int c = 0; c < 4; ++c)
        if (c >= c0 && c < c1) {
            const index_t k = first + 4 * qo + c - e.first; // value k of the group
            const index_t code = s.kind == store_kind::average ? k / average_run : k;
            v[c] = from_compute<T>(
                restored_value(static_cast<float>(code_at(group_codes, code, s.bits)), lo, hi, step, levels));
        }
    write_values(v, 4 * qo, c0, c1, vector, out);
}

/// Quads of output values that group g contributes to: [qa, qb).
struct quad_span {
    index_t qa, qb;
};
COMPACT_HD inline quad_span output_quads(const store_scheme& s, index_t count, index_t first, index_t len, index_t g)
{
    const group_extent e = extent_of(s, count, g);
    const index_t o0 = max_of(e.first, first) - first, o1 = min_of(e.first + e.values, first + len) - first;
    return {o0 / 4, (o1 + 3) / 4};
}

enum class mask_mode { relu, dropout, apply };

/// The per-launch constants of a mask kernel.
template <class C>
struct mask_constants {
    C scale;          ///< kept values are multiplied by it (1 for ReLU)
    float threshold;  ///< dropout: value k is kept when its noise is >= threshold
    noise_stream noise;
};

/// Mask step for mask byte b (values [8 b, 8 b + 8) of count): relu and dropout decide the bits from x
/// and the noise, y = bit ? x scale : 0 and mask[b] = the bits; apply reads the bits from mask[b]
/// instead. x and y may be the same memory (each value is read before it is written).
template <mask_mode Mode, class T>
COMPACT_HD void mask_octet(const_matrix_view<T> x, bool vector_x, matrix_view<T> y, bool vector_y, index_t count,
                           index_t b, const mask_constants<compute_t<T>>& k, const std::uint8_t* mask_in,
                           std::uint8_t* mask_out)
{
    using C = compute_t<T>;
    const index_t f = 8 * b;
    const int n = static_cast<int>(min_of(8, count - f));
    T v[8]{};
    read_values(x, f, 0, n, vector_x, v);
    unsigned bits = 0;
    if constexpr (Mode == mask_mode::relu) {
        for (int c = 0; c < 8; ++c)
            if (c < n) bits |= (to_compute(v[c]) > C(0) ? 1u : 0u) << c;
    } else if constexpr (Mode == mask_mode::dropout) {
        for (int h = 0; h < 2; ++h)
            if (4 * h < n) {
                const philox_counter w = noise_words(k.noise, 2 * b + h);
                for (int c = 0; c < 4; ++c)
                    if (4 * h + c < n) bits |= (noise_uniform(w.w[c]) >= k.threshold ? 1u : 0u) << (4 * h + c);
            }
    } else {
        bits = mask_in[b];
    }
    T out[8]{};
    for (int c = 0; c < 8; ++c) out[c] = from_compute<T>((bits >> c) & 1u ? mul(to_compute(v[c]), k.scale) : C(0));
    write_values(out, f, 0, n, vector_y, y);
    if constexpr (Mode != mask_mode::apply) mask_out[b] = static_cast<std::uint8_t>(bits);
}

// ------------------------------------------------------------------------------------------ kernels

template <class T, unsigned Threads>
__global__ void __launch_bounds__(Threads)
    quantize_kernel(const_matrix_view<T> x, store_scheme s, noise_stream ns, bool vector, index_t count,
                    index_t groups, float* meta, std::uint8_t* codes)
{
    using block_reduce = cub::BlockReduce<extremes, static_cast<int>(Threads)>;
    __shared__ typename block_reduce::TempStorage scratch;
    __shared__ group_range range;
    extern __shared__ float4 compact_store_shared[]; // (s.group) floats: the group's coded values
    float* buf = reinterpret_cast<float*>(compact_store_shared);
    const index_t tid = threadIdx.x;
    for (index_t g = blockIdx.x; g < groups; g += gridDim.x) {
        const group_extent e = extent_of(s, count, g);
        const index_t items = load_items(s, e);
        extremes m = no_extremes();
        for (index_t it = tid; it < items; it += Threads)
            m = combine(m, s.kind == store_kind::average ? load_run(x, e, it, vector, buf)
                                                         : load_quad(x, e, it, vector, buf));
        const extremes all = block_reduce(scratch).Reduce(m, combine_extremes{});
        if (tid == 0) { // the reduction's result is valid in thread 0
            range = finish(all);
            meta[2 * g] = range.lo;
            meta[2 * g + 1] = range.hi;
        }
        __syncthreads();
        const group_coding c = coding_of(s, ns, e, g, range);
        const index_t units = (e.coded + unit_codes(s.bits) - 1) / unit_codes(s.bits);
        std::uint8_t* group_codes = codes + g * (s.group * s.bits / 8);
        for (index_t u = tid; u < units; u += Threads) encode_unit(buf, u, c, group_codes);
        __syncthreads(); // buf, range and scratch are reused by the next group
    }
}

template <class T>
__global__ void dequantize_kernel(store_scheme s, const float* meta, const std::uint8_t* codes, index_t count,
                                  index_t first, index_t g0, index_t g1, bool vector, matrix_view<T> out)
{
    const index_t len = out.rows * out.cols;
    for (index_t g = g0 + blockIdx.x; g < g1; g += gridDim.x) {
        const quad_span span = output_quads(s, count, first, len, g);
        for (index_t qo = span.qa + threadIdx.x; qo < span.qb; qo += blockDim.x)
            decode_quad(s, meta, codes, count, first, g, qo, vector, out);
    }
}

template <mask_mode Mode, class T>
__global__ void mask_kernel(const_matrix_view<T> x, bool vector_x, matrix_view<T> y, bool vector_y,
                            mask_constants<compute_t<T>> k, const std::uint8_t* mask_in, std::uint8_t* mask_out)
{
    const index_t count = x.rows * x.cols, bytes = (count + 7) / 8;
    const index_t stride = static_cast<index_t>(gridDim.x) * blockDim.x;
    for (index_t b = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; b < bytes; b += stride)
        mask_octet<Mode>(x, vector_x, y, vector_y, count, b, k, mask_in, mask_out);
}

// ------------------------------------------------------------------------------------------ launches

/// Copies count values of T between device buffers: dense, or rows of a padded view.
template <class T>
void copy_rows(const T* src, index_t src_ld, T* dst, index_t dst_ld, index_t rows, index_t cols,
               cudaStream_t stream, const char* where)
{
    const std::size_t row_bytes = static_cast<std::size_t>(cols) * sizeof(T);
    if ((src_ld == cols && dst_ld == cols) || rows <= 1) {
        COMPACT_CUDA_CHECK(cudaMemcpyAsync(dst, src, row_bytes * static_cast<std::size_t>(rows),
                                           cudaMemcpyDeviceToDevice, stream),
                           where);
    } else {
        COMPACT_CUDA_CHECK(cudaMemcpy2DAsync(dst, static_cast<std::size_t>(dst_ld) * sizeof(T), src,
                                             static_cast<std::size_t>(src_ld) * sizeof(T), row_bytes,
                                             static_cast<std::size_t>(rows), cudaMemcpyDeviceToDevice, stream),
                           where);
    }
    check_launch(stream, where); // COMPACT_DEBUG_SYNC waits here as after a kernel
}

template <class T, unsigned Threads>
void launch_quantize(const const_matrix_view<T>& x, const store_scheme& s, const noise_stream& ns, index_t groups,
                     float* meta, std::uint8_t* codes, cudaStream_t stream)
{
    quantize_kernel<T, Threads><<<group_grid(groups), Threads, group_shared_bytes(s), stream>>>(
        x, s, ns, vector_ok(x), x.rows * x.cols, groups, meta, codes);
}

template <class T>
void quantize(cudaStream_t stream, const store_scheme& s, const noise_key& key, const_matrix_view<T> x,
              std::byte* out)
{
    static_assert(is_storage_type<T>, "cuda::quantize supports float, double, __half and __nv_bfloat16");
    constexpr const char* where = "cuda::quantize";
    check_scheme(s, where);
    check_noise_key(key, where);
    const index_t count = x.rows * x.cols;
    if (count == 0) return;
    COMPACT_REQUIRE(out != nullptr && reinterpret_cast<std::uintptr_t>(out) % alignof(float) == 0, where,
                    "out ", static_cast<const void*>(out), " must be non-null and aligned to ", alignof(float),
                    " bytes");
    if (s.kind == store_kind::full) {
        copy_rows(x.data, x.ld, reinterpret_cast<T*>(out), x.cols, x.rows, x.cols, stream, where);
        return;
    }
    float* meta = reinterpret_cast<float*>(out);                                // (groups, 2)
    auto* codes = reinterpret_cast<std::uint8_t*>(out + meta_bytes(s, count)); // code_bytes(s, count)
    const index_t groups = group_count(s, count);
    const noise_stream ns = make_noise_stream(key);
    switch (group_threads(s)) {
    case 32: launch_quantize<T, 32>(x, s, ns, groups, meta, codes, stream); break;
    case 64: launch_quantize<T, 64>(x, s, ns, groups, meta, codes, stream); break;
    case 128: launch_quantize<T, 128>(x, s, ns, groups, meta, codes, stream); break;
    default: launch_quantize<T, 256>(x, s, ns, groups, meta, codes, stream); break;
    }
    check_launch(stream, where);
}

template <class T>
void dequantize(cudaStream_t stream, const store_scheme& s, const std::byte* in, index_t count, index_t first,
                matrix_view<T> out)
{
    static_assert(is_storage_type<T>, "cuda::dequantize supports float, double, __half and __nv_bfloat16");
    constexpr const char* where = "cuda::dequantize";
    check_scheme(s, where);
    const index_t len = out.rows * out.cols;
    COMPACT_REQUIRE(first >= 0 && len >= 0 && first + len <= count, where, "values [", first, ", ", first + len,
                    ") of out ", shape_string(out), " are not within the ", count, " encoded values");
    if (len == 0) return;
    COMPACT_REQUIRE(in != nullptr && reinterpret_cast<std::uintptr_t>(in) % alignof(float) == 0, where, "in ",
                    static_cast<const void*>(in), " must be non-null and aligned to ", alignof(float), " bytes");
    if (s.kind == store_kind::full) {
        copy_rows(reinterpret_cast<const T*>(in) + first, out.cols, out.data, out.ld, out.rows, out.cols, stream,
                  where);
        return;
    }
    const auto* meta = reinterpret_cast<const float*>(in);
    const auto* codes = reinterpret_cast<const std::uint8_t*>(in + meta_bytes(s, count));
    const index_t per = values_per_group(s), g0 = first / per, g1 = (first + len - 1) / per + 1;
    // A quad of out that straddles two groups is written value by value, half by each block.
    dequantize_kernel<T><<<group_grid(g1 - g0), group_threads(s), 0, stream>>>(s, meta, codes, count, first, g0,
                                                                                g1, vector_ok(out), out);
    check_launch(stream, where);
}

template <mask_mode Mode, class T>
void launch_mask(cudaStream_t stream, const_matrix_view<T> x, matrix_view<T> y,
                 const mask_constants<compute_t<T>>& k, const std::uint8_t* mask_in, std::uint8_t* mask_out,
                 const char* where)
{
    static_assert(is_storage_type<T>, "the cuda masks support float, double, __half and __nv_bfloat16");
    COMPACT_REQUIRE(x.rows == y.rows && x.cols == y.cols, where, "input ", shape_string(x), " and output ",
                    shape_string(y), " differ in shape");
    const index_t count = x.rows * x.cols;
    if (count == 0) return;
    mask_kernel<Mode, T><<<mask_grid((count + 7) / 8), mask_threads, 0, stream>>>(x, vector_ok(x), y, vector_ok(y),
                                                                                  k, mask_in, mask_out);
    check_launch(stream, where);
}

} // namespace cuda_store
} // namespace detail
COMPACT_NAMESPACE_END
