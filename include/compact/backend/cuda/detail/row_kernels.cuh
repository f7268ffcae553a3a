// compact/backend/cuda/detail/row_kernels.cuh: the kernels behind the CUDA backend's row_sq_norms and
// gather_rows (see backend/cuda/cuda.cuh), used by the compressors of compress/velora.hpp and
// compress/wta_crs.hpp. Internal: include compact/cuda.cuh instead.
#pragma once

#include "compact/backend/cuda/scalar.cuh"
#include "compact/core/config.hpp"
#include "compact/core/matrix_view.hpp"

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

COMPACT_NAMESPACE_BEGIN
namespace detail {

/// Warps per block of row_sq_norms_kernel (one warp per row).
constexpr unsigned row_norm_warps = 8;

/// Blocks for `rows` rows, one warp each; the kernel strides over the rest.
inline unsigned row_norm_grid(index_t rows) noexcept
{
    const index_t blocks = (rows + row_norm_warps - 1) / row_norm_warps;
    return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > 65535 ? 65535 : blocks));
}

/// out[i] = sum_j x(i, j)^2 + beta out[i], in A. One warp per row: lane l sums columns l, l + 32, ...
/// in order, then a butterfly of shuffles adds the 32 partial sums in a fixed order: deterministic,
/// no atomics, no shared memory. beta == 0 never reads out.
template <class T, class A>
__global__ void __launch_bounds__(row_norm_warps * 32) row_sq_norms_kernel(const_matrix_view<T> x, A beta, A* out)
{
    const unsigned lane = threadIdx.x % 32u;
    const index_t warp = blockIdx.x * static_cast<index_t>(row_norm_warps) + threadIdx.x / 32u;
    const index_t warps = static_cast<index_t>(gridDim.x) * row_norm_warps;
    for (index_t i = warp; i < x.rows; i += warps) {
        const T* row = x.row(i);
        A sum = A(0);
        for (index_t j = lane; j < x.cols; j += 32) {
            const A v = static_cast<A>(to_compute(row[j]));
            sum = add(sum, mul(v, v));
        }
        for (int offset = 16; offset > 0; offset /= 2) sum = add(sum, __shfl_xor_sync(0xFFFFFFFFu, sum, offset));
        if (lane == 0) out[i] = beta == A(0) ? sum : add(sum, mul(beta, out[i]));
    }
}

/// out(k, j) = x(rows[k], j) weights[k] in C (weights null: a copy), on an element_grid.
template <class T, class W, class C>
__global__ void gather_rows_kernel(const_matrix_view<T> x, const index_t* rows, const W* weights, matrix_view<T> out)
{
    const index_t j0 = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x;
    const index_t j_stride = static_cast<index_t>(gridDim.x) * blockDim.x;
    for (index_t k = blockIdx.y; k < out.rows; k += gridDim.y) {
        const T* src = x.row(rows[k]);
        T* dst = out.row(k);
        if (weights == nullptr) {
            for (index_t j = j0; j < out.cols; j += j_stride) dst[j] = src[j];
        } else {
            const C w = static_cast<C>(weights[k]);
            for (index_t j = j0; j < out.cols; j += j_stride)
                dst[j] = from_compute<T>(mul(static_cast<C>(to_compute(src[j])), w));
        }
    }
}

} // namespace detail
COMPACT_NAMESPACE_END
