// compact/backend/cuda/cuda.cuh: the CUDA backend (cuBLAS GEMMs, elementwise kernels).
//
// `compact::cuda` meets compact/backend/backend.hpp. Every primitive takes an explicit context (the
// stream to launch on and the cuBLAS handle), launches, checks the launch and returns without
// synchronising, so a training step can be captured in a CUDA graph; none allocates. Views passed to
// it hold device pointers. Storage types: float, double, __half and __nv_bfloat16 (the 16-bit types
// compute in float: compute_t in scalar.cuh).
//
// - gemm: cublasGemmEx with CUBLAS_COMPUTE_32F for float, __half and __nv_bfloat16 storage (no TF32),
//   cublasDgemm for double. Row-major C (M, N) is column-major C^T, and C^T = op(B)^T op(A)^T, so the
//   operands are passed to cuBLAS swapped. Dimensions and leading dimensions must be below 2^31.
// - generate_projection: one thread per (row, quad of columns), through the very functions the CPU
//   uses (detail::gaussian_quad / rademacher_quad of core/projection.hpp), then rounded to T. nvcc
//   contracts a*b+c into FMA in device code by default where the host compiler does not, so a double
//   P can differ from the CPU's in its last bits; rounded to float (or narrower) it agrees bit for bit
//   except in the rare case where the double value lies within those bits of a rounding midpoint.
//   Compile with nvcc -fmad=false for the host's double arithmetic exactly (slower kernels throughout).
// - column_sums: one thread per column summing rows in order (deterministic, no atomics).
// - add_row_vector, fill, axpby, adam_direction, adamw_update: one thread per element, evaluating the
//   CPU backend's expressions in its order with each operation rounded separately (no FMA).
// - quantize, dequantize, relu_mask, dropout_mask, apply_mask: the kernels of quantize.cuh (one block per
//   group, one thread per mask byte), writing the CPU backend's bytes; scheme full is a device copy.
//
// Cost: the elementwise kernels are memory bound (one read and one write per element and operand);
// gemm runs at cuBLAS speed.
#pragma once

#include "compact/backend/backend.hpp"
#include "compact/backend/cuda/device_buffer.cuh"
#include "compact/backend/cuda/error.cuh"
#include "compact/backend/cuda/quantize.cuh"
#include "compact/backend/cuda/scalar.cuh"
#include "compact/compress/scheme.hpp"
#include "compact/core/config.hpp"
#include "compact/core/error.hpp"
#include "compact/core/matrix_view.hpp"
#include "compact/core/projection.hpp"

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

template <class T>
__global__ void column_sums_kernel(const_matrix_view<T> a, compute_t<T> beta, T* out)
{
    using C = compute_t<T>;
    for (index_t j = cuda_thread(); j < a.cols; j += cuda_stride()) {
        C acc = C(0);
        for (index_t i = 0; i < a.rows; ++i) acc = add(acc, to_compute(a(i, j)));
        out[j] = from_compute<T>(beta == C(0) ? acc : add(acc, mul(beta, to_compute(out[j]))));
    }
}

template <class T>
__global__ void add_row_vector_kernel(const T* b, matrix_view<T> y)
{
    const index_t total = y.rows * y.cols;
    for (index_t k = cuda_thread(); k < total; k += cuda_stride()) {
        const index_t i = k / y.cols, j = k - i * y.cols;
        y(i, j) = from_compute<T>(add(to_compute(y(i, j)), to_compute(b[j])));
    }
}

template <class T>
__global__ void fill_kernel(matrix_view<T> y, T value)
{
    const index_t total = y.rows * y.cols;
    for (index_t k = cuda_thread(); k < total; k += cuda_stride()) {
        const index_t i = k / y.cols, j = k - i * y.cols;
        y(i, j) = value;
    }
}

template <class X, class Y, class C>
__global__ void axpby_kernel(C alpha, const_matrix_view<X> x, C beta, bool read_y, matrix_view<Y> y)
{
    const index_t total = y.rows * y.cols;
    for (index_t k = cuda_thread(); k < total; k += cuda_stride()) {
        const index_t i = k / y.cols, j = k - i * y.cols;
        const C ax = mul(alpha, static_cast<C>(to_compute(x(i, j))));
        y(i, j) = from_compute<Y>(read_y ? add(ax, mul(beta, static_cast<C>(to_compute(y(i, j))))) : ax);
    }
}

/// C = beta C, where beta == 0 writes zeros without reading C.
template <class T>
__global__ void scale_kernel(matrix_view<T> c, compute_t<T> beta)
{
    using C = compute_t<T>;
    const index_t total = c.rows * c.cols;
    for (index_t k = cuda_thread(); k < total; k += cuda_stride()) {
        const index_t i = k / c.cols, j = k - i * c.cols;
        c(i, j) = from_compute<T>(beta == C(0) ? C(0) : mul(beta, to_compute(c(i, j))));
    }
}

/// The per-kernel constants of an Adam update, rounded to the moments' compute type on the host.
template <class S>
struct adam_constants {
    S b1, b2, eps, c1, c2;
};

/// M, V updated from G; then either D = M / (sqrt(V) + eps) (Update false) or
/// W = decay (W - step D) (Update true), as cpu::adam_direction / cpu::adamw_update.
template <bool Update, class G, class S, class Out, class C>
__global__ void adam_kernel(adam_constants<compute_t<S>> k, C step, C decay, const_matrix_view<G> g,
                            matrix_view<S> m, matrix_view<S> v, matrix_view<Out> out)
{
    using SC = compute_t<S>;
    const index_t total = g.rows * g.cols;
    for (index_t e = cuda_thread(); e < total; e += cuda_stride()) {
        const index_t i = e / g.cols, j = e - i * g.cols;
        const SC gj = static_cast<SC>(to_compute(g(i, j)));
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
    }
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

struct cuda {
    static constexpr const char* name = "cuda";

    /// The stream every call launches on and the cuBLAS handle its GEMMs use (gemm sets the handle's
    /// stream to `stream` when it is another one). Both are owned by the caller (see
    /// backend/cuda/owned_context.cuh). For CUDA-graph capture, give the handle its own workspace
    /// (cublasSetWorkspace, after cublasSetStream) so cuBLAS allocates nothing while capturing.
    struct context {
        cudaStream_t stream = nullptr;
        cublasHandle_t handle = nullptr;
    };

    template <class T>
    using buffer = device_buffer<T>;

    /// Whether a CUDA device can be used by this process (false, never an error, without a driver).
    static bool device_available() noexcept
    {
        int count = 0;
        if (cudaGetDeviceCount(&count) != cudaSuccess) {
            (void)cudaGetLastError(); // clear the sticky "no device" error
            return false;
        }
        return count > 0;
    }

    // ---------------------------------------------------------------------------------------- GEMM

    /// C (M, N) = alpha op(A) op(B) + beta C; beta == 0 never reads C.
    template <class T>
    static void gemm(const context& ctx, op ta, op tb, double alpha, const_matrix_view<T> a, const_matrix_view<T> b,
                     double beta, matrix_view<T> c)
    {
        constexpr const char* where = "cuda::gemm";
        static_assert(std::is_same_v<T, float> || std::is_same_v<T, double> || std::is_same_v<T, __half> ||
                          std::is_same_v<T, __nv_bfloat16>,
                      "cuda::gemm supports float, double, __half and __nv_bfloat16");
        const index_t m = c.rows, n = c.cols;
        const index_t k = ta == op::none ? a.cols : a.rows;
        COMPACT_REQUIRE((ta == op::none ? a.rows : a.cols) == m && (tb == op::none ? b.rows : b.cols) == k &&
                            (tb == op::none ? b.cols : b.rows) == n,
                        where, "op(A) ", shape_string(a), ", op(B) ", shape_string(b), " and C ", shape_string(c),
                        " do not agree");
        COMPACT_REQUIRE(detail::fits_int(m) && detail::fits_int(n) && detail::fits_int(k) &&
                            detail::fits_int(a.ld) && detail::fits_int(b.ld) && detail::fits_int(c.ld),
                        where, "A ", shape_string(a), ", B ", shape_string(b), ", C ", shape_string(c),
                        ": cuBLAS needs every extent and leading dimension below 2^31");
        if (m == 0 || n == 0) return;
        using C = detail::compute_t<T>;
        // Rounded once, from double, to the compute type: a small step scale survives 16-bit storage.
        const C alpha_c = static_cast<C>(alpha), beta_c = static_cast<C>(beta);
        if (k == 0 || alpha_c == C(0)) {
            detail::scale_kernel<T><<<detail::cuda_grid(c.size()), detail::cuda_block, 0, ctx.stream>>>(c, beta_c);
            detail::check_launch(ctx.stream, where);
            return;
        }
        // Column-major view: C^T (n, m), ld c.ld = op(B)^T (n, k) op(A)^T (k, m); a row-major operand
        // that is not transposed is its own transpose read column-major, so it goes in as OP_N.
        const cublasOperation_t ob = tb == op::none ? CUBLAS_OP_N : CUBLAS_OP_T;
        const cublasOperation_t oa = ta == op::none ? CUBLAS_OP_N : CUBLAS_OP_T;
        // ld of an operand is at least 1 for cuBLAS even when its view has one column.
        const int lda = static_cast<int>(a.ld > 0 ? a.ld : 1), ldb = static_cast<int>(b.ld > 0 ? b.ld : 1);
        const int ldc = static_cast<int>(c.ld > 0 ? c.ld : 1);
        // cublasSetStream also drops a workspace set by cublasSetWorkspace, so only when it changes.
        cudaStream_t handle_stream = nullptr;
        COMPACT_CUBLAS_CHECK(cublasGetStream(ctx.handle, &handle_stream), where);
        if (handle_stream != ctx.stream) COMPACT_CUBLAS_CHECK(cublasSetStream(ctx.handle, ctx.stream), where);
        if constexpr (std::is_same_v<T, double>) {
            COMPACT_CUBLAS_CHECK(cublasDgemm(ctx.handle, ob, oa, static_cast<int>(n), static_cast<int>(m),
                                             static_cast<int>(k), &alpha_c, b.data, ldb, a.data, lda, &beta_c,
                                             c.data, ldc),
                                 where);
        } else {
            const float alpha_f = alpha_c, beta_f = beta_c;
            constexpr cudaDataType_t type = detail::cuda_data_type<T>();
            COMPACT_CUBLAS_CHECK(cublasGemmEx(ctx.handle, ob, oa, static_cast<int>(n), static_cast<int>(m),
                                              static_cast<int>(k), &alpha_f, b.data, type, ldb, a.data, type, lda,
                                              &beta_f, c.data, type, ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                                 where);
        }
    }

    // ---------------------------------------------------------------------------------- projection

    /// out(i, j) = P(row0 + i, col0 + j) of `spec`, rounded to T; out is device memory.
    template <class T>
    static void generate_projection(const context& ctx, const projection_spec& spec, index_t row0, index_t col0,
                                    matrix_view<T> out)
    {
        if (out.empty()) return;
        const index_t first_quad = col0 / 4, last_quad = (col0 + out.cols - 1) / 4;
        const index_t quads = last_quad - first_quad + 1;
        detail::projection_kernel<T><<<detail::cuda_grid(out.rows * quads), detail::cuda_block, 0, ctx.stream>>>(
            detail::make_projection_stream(spec), spec.dist, row0, col0, first_quad, quads, out);
        detail::check_launch(ctx.stream, "cuda::generate_projection");
    }

    // --------------------------------------------------------------------------------- elementwise

    /// out[j] = sum_i A(i, j) + beta out[j], rows summed in order; out holds A.cols device elements.
    template <class T>
    static void column_sums(const context& ctx, const_matrix_view<T> a, T beta, T* out)
    {
        if (a.cols == 0) return;
        detail::column_sums_kernel<T><<<detail::cuda_grid(a.cols), detail::cuda_block, 0, ctx.stream>>>(
            a, detail::to_compute(beta), out);
        detail::check_launch(ctx.stream, "cuda::column_sums");
    }

    /// Y(i, j) += b[j]
    template <class T>
    static void add_row_vector(const context& ctx, const T* b, matrix_view<T> y)
    {
        if (y.empty()) return;
        detail::add_row_vector_kernel<T><<<detail::cuda_grid(y.size()), detail::cuda_block, 0, ctx.stream>>>(b, y);
        detail::check_launch(ctx.stream, "cuda::add_row_vector");
    }

    /// Y(i, j) = value
    template <class T>
    static void fill(const context& ctx, matrix_view<T> y, T value)
    {
        if (y.empty()) return;
        detail::fill_kernel<T><<<detail::cuda_grid(y.size()), detail::cuda_block, 0, ctx.stream>>>(y, value);
        detail::check_launch(ctx.stream, "cuda::fill");
    }

    /// Y = alpha X + beta Y, elementwise; beta == 0 never reads Y.
    template <class X, class Y>
    static void axpby(const context& ctx, double alpha, const_matrix_view<X> x, double beta, matrix_view<Y> y)
    {
        if (y.empty()) return;
        using C = detail::common_compute_t<X, Y>;
        detail::axpby_kernel<X, Y, C><<<detail::cuda_grid(y.size()), detail::cuda_block, 0, ctx.stream>>>(
            static_cast<C>(alpha), x, static_cast<C>(beta), beta != 0, y);
        detail::check_launch(ctx.stream, "cuda::axpby");
    }

    /// M, V updated with g (adam_coefficients); direction = M / (sqrt(V) + eps).
    template <class G, class S, class D>
    static void adam_direction(const context& ctx, const adam_coefficients& k, const_matrix_view<G> g,
                               matrix_view<S> m, matrix_view<S> v, matrix_view<D> direction)
    {
        if (g.empty()) return;
        using C = detail::compute_t<D>;
        detail::adam_kernel<false, G, S, D, C><<<detail::cuda_grid(g.size()), detail::cuda_block, 0, ctx.stream>>>(
            constants<S>(k), C(0), C(0), g, m, v, direction);
        detail::check_launch(ctx.stream, "cuda::adam_direction");
    }

    /// M, V updated with g; W = decay (W - step_size M / (sqrt(V) + eps)).
    template <class W, class S>
    static void adamw_update(const context& ctx, const adam_coefficients& k, const_matrix_view<W> g,
                             matrix_view<S> m, matrix_view<S> v, matrix_view<W> w)
    {
        if (g.empty()) return;
        using C = detail::common_compute_t<W, S>;
        detail::adam_kernel<true, W, S, W, C><<<detail::cuda_grid(g.size()), detail::cuda_block, 0, ctx.stream>>>(
            constants<S>(k), static_cast<C>(k.step_size), static_cast<C>(k.decay), g, m, v, w);
        detail::check_launch(ctx.stream, "cuda::adamw_update");
    }

    // ------------------------------------------------------------------- quantized stores and masks
    // The kernels are in backend/cuda/quantize.cuh; they write the bytes the CPU backend writes.

    /// Encodes x (rows, cols) into out: stored_bytes<T>(s, rows * cols) device bytes, 4-byte aligned,
    /// in compress/scheme.hpp's format, with the noise of `key`. __half / __nv_bfloat16 values are
    /// quantized as float (scheme full copies them as they are).
    template <class T>
    static void quantize(const context& ctx, const store_scheme& s, const noise_key& key, const_matrix_view<T> x,
                         std::byte* out)
    {
        detail::cuda_store::quantize(ctx.stream, s, key, x, out);
    }

    /// Decodes values [first, first + out.rows * out.cols) of the encoding `in` of `count` values into
    /// out (row-major order across out's rows).
    template <class T>
    static void dequantize(const context& ctx, const store_scheme& s, const std::byte* in, index_t count,
                           index_t first, matrix_view<T> out)
    {
        detail::cuda_store::dequantize(ctx.stream, s, in, count, first, out);
    }

    /// y = max(x, 0) and mask bit k = x_k > 0 (NaN gives 0); mask holds (rows cols + 7) / 8 device
    /// bytes. y may be x.
    template <class T>
    static void relu_mask(const context& ctx, const_matrix_view<T> x, matrix_view<T> y, std::uint8_t* mask)
    {
        using C = detail::compute_t<T>;
        detail::cuda_store::launch_mask<detail::cuda_store::mask_mode::relu, T>(ctx.stream, x, y, {C(1), 0.0f, {}},
                                                                                nullptr, mask, "cuda::relu_mask");
    }

    /// Dropout: value k is kept (bit 1, y = x / (1 - p)) when its noise of `key` is >= p, else y = 0.
    template <class T>
    static void dropout_mask(const context& ctx, double p, const noise_key& key, const_matrix_view<T> x,
                             matrix_view<T> y, std::uint8_t* mask)
    {
        using C = detail::compute_t<T>;
        const detail::cuda_store::mask_constants<C> k{static_cast<C>(1.0 / (1.0 - p)), static_cast<float>(p),
                                                      detail::make_noise_stream(key)};
        detail::cuda_store::launch_mask<detail::cuda_store::mask_mode::dropout, T>(ctx.stream, x, y, k, nullptr,
                                                                                   mask, "cuda::dropout_mask");
    }

    /// dx = mask bit ? dy scale : 0 (dx may be dy).
    template <class T>
    static void apply_mask(const context& ctx, const std::uint8_t* mask, double scale, const_matrix_view<T> dy,
                           matrix_view<T> dx)
    {
        using C = detail::compute_t<T>;
        detail::cuda_store::launch_mask<detail::cuda_store::mask_mode::apply, T>(
            ctx.stream, dy, dx, {static_cast<C>(scale), 0.0f, {}}, mask, nullptr, "cuda::apply_mask");
    }

private:
    template <class S>
    static detail::adam_constants<detail::compute_t<S>> constants(const adam_coefficients& k) noexcept
    {
        using SC = detail::compute_t<S>;
        // Rounded to S first, as cpu::adam_rows does (static_cast<S>), then widened for the kernel.
        auto r = [](double x) { return static_cast<SC>(detail::to_compute(detail::from_double<S>(x))); };
        return {r(k.beta1), r(k.beta2), r(k.eps), r(1.0 - k.beta1), r(1.0 - k.beta2)};
    }
};

COMPACT_CHECK_BACKEND(cuda);

COMPACT_NAMESPACE_END
