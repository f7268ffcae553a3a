// compact/backend/cuda/detail/kernels.cuh: the kernels behind the CUDA backend's GEMM scaling, P's
// generation, column sums and the elementwise optimizer primitives (see backend/cuda/cuda.cuh for what
// each computes and how it is launched). Internal: include compact/cuda.cuh instead.
#pragma once

#include "compact/backend/backend.hpp"
#include "compact/backend/cuda/error.cuh"
#include "compact/backend/cuda/scalar.cuh"
#include "compact/core/config.hpp"
#include "compact/core/error.hpp"
#include "compact/core/matrix_view.hpp"
#include "compact/random/projection.hpp"

#include <cub/warp/warp_reduce.cuh>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstddef>
#include <cstdint>
#include <type_traits>

COMPACT_NAMESPACE_BEGIN
namespace detail {

constexpr unsigned cuda_block = 256;

/// Blocks for a grid-stride loop over `count` items.
inline unsigned cuda_grid(index_t count) noexcept
{
    const index_t blocks = (count + cuda_block - 1) / cuda_block;
    return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > 65535 ? 65535 : blocks));
}

/// The grid of the elementwise kernels: x over blocks of cuda_block columns, y over rows, so that a
/// thread finds its (i, j) without a division (a 64-bit division per element costs more issue slots than
/// the element's bytes take to move), and a warp reads consecutive columns of one row. About 2^16 blocks
/// at most (65535 in y); the kernels stride over both dimensions (for_each_element).
inline dim3 element_grid(index_t rows, index_t cols) noexcept
{
    index_t bx = (cols + cuda_block - 1) / cuda_block;
    bx = bx < 1 ? 1 : (bx > 65535 ? 65535 : bx);
    index_t by = (index_t{1} << 16) / bx;
    by = by > rows ? rows : by;
    by = by < 1 ? 1 : (by > 65535 ? 65535 : by);
    return dim3(static_cast<unsigned>(bx), static_cast<unsigned>(by));
}

/// f(i, j) for every element of a (rows, cols) matrix, on a grid from element_grid.
template <class F>
__device__ inline void for_each_element(index_t rows, index_t cols, F&& f)
{
    const index_t j0 = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x;
    const index_t j_stride = static_cast<index_t>(gridDim.x) * blockDim.x;
    for (index_t i = blockIdx.y; i < rows; i += gridDim.y)
        for (index_t j = j0; j < cols; j += j_stride) f(i, j);
}

__device__ inline index_t cuda_thread() { return blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; }
__device__ inline index_t cuda_stride() { return static_cast<index_t>(gridDim.x) * blockDim.x; }

template <class T>
__global__ void projection_kernel(projection_stream stream, distribution dist, index_t row0, index_t col0,
                                  index_t first_quad, index_t quads, matrix_view<T> out)
{
    const index_t total = out.rows * quads;
    for (index_t k = cuda_thread(); k < total; k += cuda_stride()) {
        const index_t i = k / quads, q = first_quad + (k - (k / quads) * quads);
        const index_t gi = row0 + i;
        double v[4];
        if (dist == distribution::gaussian) gaussian_quad(stream, gi, q, v);
        else if (dist == distribution::rademacher) rademacher_quad(stream, gi, q, v);
        else
            for (int c = 0; c < 4; ++c) v[c] = (4 * q + c == gi) ? 1.0 : 0.0;
        for (int c = 0; c < 4; ++c) {
            const index_t j = 4 * q + c - col0;
            if (j >= 0 && j < out.cols) out(i, j) = from_double<T>(v[c]);
        }
    }
}

// column_sums: out[j] = sum_i A(i, j) (+ beta out[j]) for A (rows, cols), without atomics or workspace.
//
// Bytes moved: rows cols sizeof(T) read once, cols sizeof(T) written (and read too when beta != 0);
// for the bias gradient of dY (32768, 4096) bf16 that is 256 MiB, about 85 us at an H100's 3.35 TB/s,
// while one thread per column (4096 threads, each walking a column 2 bytes wide) reaches a small
// fraction of it. Without workspace a column's sum cannot be split across blocks, so the parallelism
// comes from narrow column tiles and many row slices per tile:
//
// - A thread owns a column group of V = 16 / sizeof(T) adjacent columns (8 for bf16 and half, 4 for
//   float, 2 for double), read with one 16-byte load per row when A's rows are 16-byte aligned.
// - A block (256 threads, 8 warps) owns a tile of `Lanes` groups. In each warp, lanes
//   [g * 32 / Lanes, (g + 1) * 32 / Lanes) serve group g, so one warp load reads 32 / Lanes rows of
//   Lanes * 16 contiguous bytes: whole 32-byte sectors for Lanes >= 2. The block's 256 / Lanes row
//   slices each sum rows slice, slice + slices, ... in order, in compute_t (fp32 for 16-bit storage).
// - The slices of a group are combined in a fixed order: cub::WarpReduce over the 32 / Lanes lanes of a
//   warp (a shuffle tree fixed by its width), then the 8 warp sums in warp order through shared memory.
//   The order therefore depends on (rows, cols) only: a rerun gives the same bits, and the 16-byte and
//   scalar load paths (alignment) give the same sums.
// - column_sums_lanes picks the widest tile that still gives column_sums_min_blocks blocks, down to
//   32-byte tiles. dY (32768, 4096) bf16 gets 16-column tiles: 256 blocks, about two per SM of an
//   H100's 132 (eight blocks of 256 threads fit on an SM, so all are resident at once), each thread
//   keeping 4 loads of 16 bytes in flight: about 32 KiB per SM, what Little's law asks for at
//   3.35 TB/s and about 1 us of latency (3.35e12 * 1e-6 / 132 = 25 KiB). Only a matrix narrower than
//   about 132 groups (1056 bf16 columns) leaves SMs idle, and is then a small read anyway.
constexpr unsigned column_sums_threads = 256;
constexpr index_t column_sums_min_blocks = 264; // two per SM of a 132-SM H100; a constant, not the device's

/// Columns per 16-byte load.
template <class T>
constexpr int column_sums_vector = static_cast<int>(16 / sizeof(T));

/// Column groups per block (a power of two from 1 to 32) for `groups` column groups: the widest tile
/// leaving column_sums_min_blocks blocks, but not narrower than 2 groups (one 32-byte sector per row)
/// unless a single group is all there is.
inline unsigned column_sums_lanes(index_t groups) noexcept
{
    unsigned lanes = 32;
    while (lanes > 1) {
        const auto half = static_cast<index_t>(lanes / 2);
        const index_t blocks = (groups + lanes - 1) / static_cast<index_t>(lanes);
        if (half >= groups || (lanes > 2 && blocks < column_sums_min_blocks)) lanes /= 2;
        else break;
    }
    return lanes;
}

/// V sums of one column group.
template <class C, int V>
struct column_partial {
    C v[V];
};

template <class C, int V>
struct column_partial_sum {
    __device__ column_partial<C, V> operator()(const column_partial<C, V>& x, const column_partial<C, V>& y) const
    {
        column_partial<C, V> s;
#pragma unroll
        for (int k = 0; k < V; ++k) s.v[k] = add(x.v[k], y.v[k]);
        return s;
    }
};

/// One 16-byte load of V values of T.
template <class T>
struct alignas(16) column_pack {
    T v[column_sums_vector<T>];
};

template <class T, unsigned Lanes>
__global__ void __launch_bounds__(column_sums_threads)
    column_sums_kernel(const_matrix_view<T> a, compute_t<T> beta, T* out, bool vector_loads)
{
    using C = compute_t<T>;
    constexpr int V = column_sums_vector<T>;
    constexpr unsigned warps = column_sums_threads / 32;
    constexpr unsigned per_warp = 32 / Lanes;                 // row slices of a group in one warp
    constexpr index_t slices = static_cast<index_t>(warps * per_warp); // row slices of a group in the block
    using partial = column_partial<C, V>;
    using warp_reduce = cub::WarpReduce<partial, static_cast<int>(per_warp)>;
    __shared__ typename warp_reduce::TempStorage reduce_storage[warps * Lanes]; // one per logical warp
    __shared__ partial warp_sums[warps][Lanes];

    const unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const unsigned group = lane / per_warp; // within the tile
    const index_t slice = static_cast<index_t>(warp * per_warp + lane % per_warp);
    const index_t c0 = (static_cast<index_t>(blockIdx.x) * Lanes + group) * V;

    partial acc;
#pragma unroll
    for (int k = 0; k < V; ++k) acc.v[k] = C(0);
    if (c0 < a.cols) {
        const T* base = a.data + c0;
        if (vector_loads && c0 + V <= a.cols) {
            auto accumulate = [&](const column_pack<T>& p) {
#pragma unroll
                for (int k = 0; k < V; ++k) acc.v[k] = add(acc.v[k], to_compute(p.v[k]));
            };
            // Four loads in flight per thread; the additions stay in row order.
            index_t i = slice;
            for (; i + 3 * slices < a.rows; i += 4 * slices) {
                const column_pack<T> p0 = *reinterpret_cast<const column_pack<T>*>(base + i * a.ld);
                const column_pack<T> p1 = *reinterpret_cast<const column_pack<T>*>(base + (i + slices) * a.ld);
                const column_pack<T> p2 = *reinterpret_cast<const column_pack<T>*>(base + (i + 2 * slices) * a.ld);
                const column_pack<T> p3 = *reinterpret_cast<const column_pack<T>*>(base + (i + 3 * slices) * a.ld);
                accumulate(p0);
                accumulate(p1);
                accumulate(p2);
                accumulate(p3);
            }
            for (; i < a.rows; i += slices) accumulate(*reinterpret_cast<const column_pack<T>*>(base + i * a.ld));
        } else {
            const index_t width = a.cols - c0 < V ? a.cols - c0 : V;
            for (index_t i = slice; i < a.rows; i += slices) {
                const T* row = base + i * a.ld;
#pragma unroll
                for (int k = 0; k < V; ++k)
                    if (k < width) acc.v[k] = add(acc.v[k], to_compute(row[k]));
            }
        }
    }

    partial warp_sum = acc;
    if constexpr (per_warp > 1)
        warp_sum = warp_reduce(reduce_storage[warp * Lanes + group]).Reduce(acc, column_partial_sum<C, V>{});
    if (lane % per_warp == 0) warp_sums[warp][group] = warp_sum; // lane 0 of each logical warp holds it
    __syncthreads();
    if (threadIdx.x < Lanes * V) {
        const unsigned g = threadIdx.x / V, k = threadIdx.x % V;
        const index_t j = (static_cast<index_t>(blockIdx.x) * Lanes + g) * V + k;
        if (j < a.cols) {
            C total = warp_sums[0][g].v[k];
            for (unsigned w = 1; w < warps; ++w) total = add(total, warp_sums[w][g].v[k]);
            out[j] = from_compute<T>(beta == C(0) ? total : add(total, mul(beta, to_compute(out[j]))));
        }
    }
}

template <class T>
__global__ void add_row_vector_kernel(const T* b, matrix_view<T> y)
{
    for_each_element(y.rows, y.cols,
                     [&](index_t i, index_t j) { y(i, j) = from_compute<T>(add(to_compute(y(i, j)), to_compute(b[j]))); });
}

template <class T>
__global__ void fill_kernel(matrix_view<T> y, T value)
{
    for_each_element(y.rows, y.cols, [&](index_t i, index_t j) { y(i, j) = value; });
}

template <class X, class Y, class C>
__global__ void axpby_kernel(C alpha, const_matrix_view<X> x, C beta, bool read_y, matrix_view<Y> y)
{
    for_each_element(y.rows, y.cols, [&](index_t i, index_t j) {
        const C ax = mul(alpha, static_cast<C>(to_compute(x(i, j))));
        y(i, j) = from_compute<Y>(read_y ? add(ax, mul(beta, static_cast<C>(to_compute(y(i, j))))) : ax);
    });
}

/// C = beta C, where beta == 0 writes zeros without reading C.
template <class T>
__global__ void scale_kernel(matrix_view<T> c, compute_t<T> beta)
{
    using C = compute_t<T>;
    for_each_element(c.rows, c.cols, [&](index_t i, index_t j) {
        c(i, j) = from_compute<T>(beta == C(0) ? C(0) : mul(beta, to_compute(c(i, j))));
    });
}

/// *flag = 1 when x holds a NaN or an infinity (never cleared here). Each thread ORs its elements, the
/// block combines them with __syncthreads_or and one thread stores: no atomics (every writer stores
/// the same 1), no synchronisation with the host.
template <class T>
__global__ void flag_nonfinite_kernel(const_matrix_view<T> x, std::uint32_t* flag)
{
    int bad = 0;
    for_each_element(x.rows, x.cols, [&](index_t i, index_t j) { bad |= isfinite(to_compute(x(i, j))) ? 0 : 1; });
    if (__syncthreads_or(bad) && threadIdx.x == 0 && threadIdx.y == 0) *flag = 1u;
}

/// The per-kernel constants of an Adam update, rounded to the moments' compute type on the host.
template <class S>
struct adam_constants {
    S b1, b2, eps, c1, c2;
    S grad_scale; ///< multiplies g (in S's compute type) before the moments
};

/// M, V updated from G; then either D = M / (sqrt(V) + eps) (Update false) or
/// W = decay (W - step D) (Update true), as cpu::adam_direction / cpu::adamw_update.
template <bool Update, class G, class S, class Out, class C>
__global__ void adam_kernel(adam_constants<compute_t<S>> k, C step, C decay, const_matrix_view<G> g,
                            matrix_view<S> m, matrix_view<S> v, matrix_view<Out> out)
{
    using SC = compute_t<S>;
    for_each_element(g.rows, g.cols, [&](index_t i, index_t j) {
        const SC gj = mul(static_cast<SC>(to_compute(g(i, j))), k.grad_scale);
        const S mj = from_compute<S>(add(mul(k.b1, to_compute(m(i, j))), mul(k.c1, gj)));
        const S vj = from_compute<S>(add(mul(k.b2, to_compute(v(i, j))), mul(mul(k.c2, gj), gj)));
        m(i, j) = mj;
        v(i, j) = vj;
        const S update = from_compute<S>(div(to_compute(mj), add(sqrt_rn(to_compute(vj)), k.eps)));
        if constexpr (Update) {
            const C x = static_cast<C>(to_compute(out(i, j)));
            out(i, j) = from_compute<Out>(mul(decay, add(x, -mul(step, static_cast<C>(to_compute(update))))));
        } else {
            out(i, j) = from_compute<Out>(to_compute(update));
        }
    });
}

template <class T>
constexpr cudaDataType_t cuda_data_type() noexcept
{
    if constexpr (std::is_same_v<T, float>) return CUDA_R_32F;
    else if constexpr (std::is_same_v<T, __half>) return CUDA_R_16F;
    else return CUDA_R_16BF;
}

inline bool fits_int(index_t x) noexcept { return x >= 0 && x <= INT_MAX; }

} // namespace detail

COMPACT_NAMESPACE_END
