// compact/backend/cuda/cuda.cuh: the CUDA backend (cuBLAS GEMMs, elementwise kernels).
//
// `compact::cuda` meets compact/backend/backend.hpp. Every primitive takes an explicit context (the
// stream to launch on and the cuBLAS handle), launches, checks the launch and returns without
// synchronising, so a training step can be captured in a CUDA graph; none allocates. Views passed to
// it hold device pointers. Storage types: float, double, __half and __nv_bfloat16 (the 16-bit types
// compute in float: compute_t in scalar.cuh).
//
// - gemm: cublasGemmEx with CUBLAS_COMPUTE_32F for float, __half and __nv_bfloat16 storage, cublasDgemm
//   for double. Float operands are not rounded to TF32 under the handle's default math mode; a handle
//   the caller set to CUBLAS_TF32_TENSOR_OP_MATH makes float products TF32 here too (the caller's
//   choice: gemm never changes the handle's math mode). Row-major C (M, N) is column-major C^T, and
//   C^T = op(B)^T op(A)^T, so the operands are passed to cuBLAS swapped. Dimensions and leading
//   dimensions must be below 2^31.
// - generate_projection: one thread per (row, quad of columns), through the very functions the CPU
//   uses (detail::gaussian_quad / rademacher_quad of random/projection.hpp), then rounded to T. nvcc
//   contracts a*b+c into FMA in device code by default where the host compiler does not, so a double
//   P can differ from the CPU's in its last bits; rounded to float (or narrower) it agrees bit for bit
//   except in the rare case where the double value lies within those bits of a rounding midpoint.
//   Compile with nvcc -fmad=false for the host's double arithmetic exactly (slower kernels throughout).
// - column_sums: one block per tile of columns, the block's 256 threads summing strided row slices of
//   it in fp32 (compute_t) with 16-byte loads, then a fixed-order reduction (cub::WarpReduce inside a
//   warp, shared memory across warps): deterministic, no atomics, no workspace, and narrow tiles so that
//   a bias gradient of a few thousand columns still puts blocks on every SM (see column_sums_kernel).
// - add_row_vector, fill, axpby, adam_direction, adamw_update: one thread per element on a 2-D grid
//   (columns in x, rows in y: no index division), evaluating the CPU backend's expressions in its
//   order with each operation rounded separately (no FMA).
// - flag_nonfinite: the same grid, striding; a block that saw a NaN or an infinity stores 1 into the
//   caller's device flag (no atomics, no synchronisation: the caller reads the flag once).
// - row_sq_norms: one warp per row, each lane summing a strided slice of the row in A, then a fixed
//   butterfly of shuffles (row_kernels.cuh): deterministic, no atomics; not the CPU's summation order.
// - gather_rows: the element grid over the output, one multiply in the common compute type (the CPU's
//   expression, so the same bits for float and double).
// - quantize, dequantize, relu_mask, dropout_mask, apply_mask: the kernels of quantize.cuh (one block per
//   group, one thread per mask byte), writing the CPU backend's bytes; scheme full is a device copy.
//
// Cost: the elementwise kernels are memory bound (one read and one write per element and operand);
// gemm runs at cuBLAS speed.
#pragma once

#include "compact/backend/backend.hpp"
#include "compact/backend/cuda/device_buffer.cuh"
#include "compact/backend/cuda/error.cuh"
#include "compact/backend/cuda/detail/kernels.cuh"
#include "compact/backend/cuda/detail/row_kernels.cuh"
#include "compact/backend/cuda/detail/store_kernels.cuh"
#include "compact/backend/cuda/scalar.cuh"
#include "compact/backend/store_scheme.hpp"
#include "compact/core/config.hpp"
#include "compact/core/error.hpp"
#include "compact/core/matrix_view.hpp"
#include "compact/random/projection.hpp"

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstddef>
#include <cstdint>
#include <type_traits>

COMPACT_NAMESPACE_BEGIN
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
        const index_t k = detail::check_gemm_shapes<T>(ta, tb, a, b, c, where);
        COMPACT_REQUIRE(detail::fits_int(m) && detail::fits_int(n) && detail::fits_int(k) &&
                            detail::fits_int(a.ld) && detail::fits_int(b.ld) && detail::fits_int(c.ld),
                        where, "A ", shape_string(a), ", B ", shape_string(b), ", C ", shape_string(c),
                        ": cuBLAS needs every extent and leading dimension below 2^31");
        if (m == 0 || n == 0) return;
        using C = detail::compute_t<T>;
        // Rounded once, from double, to the compute type: a small step scale survives 16-bit storage.
        const C alpha_c = static_cast<C>(alpha), beta_c = static_cast<C>(beta);
        if (k == 0 || alpha_c == C(0)) {
            detail::scale_kernel<T><<<detail::element_grid(c.rows, c.cols), detail::cuda_block, 0, ctx.stream>>>(c, beta_c);
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

    /// out[j] = sum_i A(i, j) + beta out[j] (beta == 0 never reads out); out holds A.cols device
    /// elements. Sums in compute_t in an order fixed by A's shape (detail::column_sums_kernel): bit-
    /// reproducible, but not the CPU backend's row order. One pass over A; no workspace, no atomics.
    template <class T>
    static void column_sums(const context& ctx, const_matrix_view<T> a, T beta, T* out)
    {
        if (a.cols == 0) return;
        constexpr int v = detail::column_sums_vector<T>;
        const index_t groups = (a.cols + v - 1) / v;
        const unsigned lanes = detail::column_sums_lanes(groups);
        const index_t blocks = (groups + lanes - 1) / static_cast<index_t>(lanes);
        COMPACT_REQUIRE(blocks <= INT_MAX, "cuda::column_sums", "A ", shape_string(a), " has too many columns");
        // Alignment picks 16-byte or scalar loads of the same values; the sums do not depend on it.
        const bool vector_loads = reinterpret_cast<std::uintptr_t>(a.data) % 16 == 0 &&
                                  (a.rows <= 1 || (a.ld * static_cast<index_t>(sizeof(T))) % 16 == 0);
        const auto grid = static_cast<unsigned>(blocks);
        const auto beta_c = detail::to_compute(beta);
        switch (lanes) {
        case 32: launch_column_sums<T, 32>(ctx, grid, a, beta_c, out, vector_loads); break;
        case 16: launch_column_sums<T, 16>(ctx, grid, a, beta_c, out, vector_loads); break;
        case 8: launch_column_sums<T, 8>(ctx, grid, a, beta_c, out, vector_loads); break;
        case 4: launch_column_sums<T, 4>(ctx, grid, a, beta_c, out, vector_loads); break;
        case 2: launch_column_sums<T, 2>(ctx, grid, a, beta_c, out, vector_loads); break;
        default: launch_column_sums<T, 1>(ctx, grid, a, beta_c, out, vector_loads); break;
        }
        detail::check_launch(ctx.stream, "cuda::column_sums");
    }

    /// Y(i, j) += b[j]
    template <class T>
    static void add_row_vector(const context& ctx, const T* b, matrix_view<T> y)
    {
        if (y.empty()) return;
        detail::add_row_vector_kernel<T><<<detail::element_grid(y.rows, y.cols), detail::cuda_block, 0, ctx.stream>>>(b, y);
        detail::check_launch(ctx.stream, "cuda::add_row_vector");
    }

    /// Y(i, j) = value
    template <class T>
    static void fill(const context& ctx, matrix_view<T> y, T value)
    {
        if (y.empty()) return;
        detail::fill_kernel<T><<<detail::element_grid(y.rows, y.cols), detail::cuda_block, 0, ctx.stream>>>(y, value);
        detail::check_launch(ctx.stream, "cuda::fill");
    }

    /// Y = alpha X + beta Y, elementwise; beta == 0 never reads Y.
    template <class X, class Y>
    static void axpby(const context& ctx, double alpha, const_matrix_view<X> x, double beta, matrix_view<Y> y)
    {
        if (y.empty()) return;
        using C = detail::common_compute_t<X, Y>;
        detail::axpby_kernel<X, Y, C><<<detail::element_grid(y.rows, y.cols), detail::cuda_block, 0, ctx.stream>>>(
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
        detail::adam_kernel<false, G, S, D, C><<<detail::element_grid(g.rows, g.cols), detail::cuda_block, 0, ctx.stream>>>(
            constants<S>(k), C(0), C(0), g, m, v, direction);
        detail::check_launch(ctx.stream, "cuda::adam_direction");
    }

    /// M, V updated with g; W = decay (W - step_size M / (sqrt(V) + eps)). G may differ from W (bf16
    /// gradients into a float master copy of the weights).
    template <class W, class S, class G = W>
    static void adamw_update(const context& ctx, const adam_coefficients& k, const_matrix_view<non_deduced_t<G>> g,
                             matrix_view<S> m, matrix_view<S> v, matrix_view<W> w)
    {
        if (g.empty()) return;
        using C = detail::common_compute_t<W, S>;
        detail::adam_kernel<true, G, S, W, C><<<detail::element_grid(g.rows, g.cols), detail::cuda_block, 0, ctx.stream>>>(
            constants<S>(k), static_cast<C>(k.step_size), static_cast<C>(k.decay), g, m, v, w);
        detail::check_launch(ctx.stream, "cuda::adamw_update");
    }

    /// *flag = 1 when x holds a NaN or an infinity, else *flag is left alone; flag is one device
    /// std::uint32_t. Launches and returns: the caller zeroes the flag (fill), flags any number of
    /// tensors into it, and reads it once (copy_to_host, the one synchronisation).
    template <class T>
    static void flag_nonfinite(const context& ctx, const_matrix_view<T> x, std::uint32_t* flag)
    {
        if (x.empty()) return;
        detail::flag_nonfinite_kernel<T><<<detail::element_grid(x.rows, x.cols), detail::cuda_block, 0, ctx.stream>>>(
            x, flag);
        detail::check_launch(ctx.stream, "cuda::flag_nonfinite");
    }

    // ------------------------------------------------------------------------ row reductions, gathers

    /// out[i] = sum_j x(i, j)^2 + beta out[i] in A (float or double); out holds x.rows device values of
    /// A; beta == 0 never reads out.
    template <class T, class A>
    static void row_sq_norms(const context& ctx, const_matrix_view<T> x, A beta, A* out)
    {
        static_assert(std::is_same_v<A, float> || std::is_same_v<A, double>, "cuda::row_sq_norms sums in float or double");
        if (x.rows == 0) return;
        detail::row_sq_norms_kernel<T, A>
            <<<detail::row_norm_grid(x.rows), detail::row_norm_warps * 32, 0, ctx.stream>>>(x, beta, out);
        detail::check_launch(ctx.stream, "cuda::row_sq_norms");
    }

    /// out(k, j) = x(rows[k], j) weights[k] (weights null: a copy); rows and weights are device arrays
    /// of out.rows values.
    template <class T, class W>
    static void gather_rows(const context& ctx, const_matrix_view<T> x, const index_t* rows, const W* weights,
                            matrix_view<T> out)
    {
        if (out.empty()) return;
        using C = std::common_type_t<detail::compute_t<T>, detail::compute_t<W>>;
        detail::gather_rows_kernel<T, W, C>
            <<<detail::element_grid(out.rows, out.cols), detail::cuda_block, 0, ctx.stream>>>(x, rows, weights, out);
        detail::check_launch(ctx.stream, "cuda::gather_rows");
    }

    // ------------------------------------------------------------------- quantized stores and masks
    // The kernels are in backend/cuda/detail/store_kernels.cuh; they write the bytes the CPU backend writes.

    /// Encodes x (rows, cols) into out: stored_bytes<T>(s, rows * cols) device bytes, 4-byte aligned,
    /// in backend/store_scheme.hpp's format, with the noise of `key`. __half / __nv_bfloat16 values are
    /// quantized as float (scheme full copies them as they are).
    /// Copies `count` elements from device memory to host memory, and back, on the context's stream
    /// (checkpoints). Synchronous: the copy has landed when it returns, so the host may read or reuse
    /// its buffer; for saving and loading state, never on the training step's path.
    template <class T>
    static void copy_to_host(const context& ctx, const T* src, T* host, std::size_t count)
    {
        if (count == 0) return;
        COMPACT_CUDA_CHECK(cudaMemcpyAsync(host, src, count * sizeof(T), cudaMemcpyDeviceToHost, ctx.stream),
                           "cuda::copy_to_host");
        COMPACT_CUDA_CHECK(cudaStreamSynchronize(ctx.stream), "cuda::copy_to_host");
    }
    template <class T>
    static void copy_from_host(const context& ctx, const T* host, T* dst, std::size_t count)
    {
        if (count == 0) return;
        COMPACT_CUDA_CHECK(cudaMemcpyAsync(dst, host, count * sizeof(T), cudaMemcpyHostToDevice, ctx.stream),
                           "cuda::copy_from_host");
        COMPACT_CUDA_CHECK(cudaStreamSynchronize(ctx.stream), "cuda::copy_from_host");
    }

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
    template <class T, unsigned Lanes>
    static void launch_column_sums(const context& ctx, unsigned grid, const_matrix_view<T> a, detail::compute_t<T> beta,
                                   T* out, bool vector_loads)
    {
        detail::column_sums_kernel<T, Lanes><<<grid, detail::column_sums_threads, 0, ctx.stream>>>(a, beta, out,
                                                                                                   vector_loads);
    }

    template <class S>
    static detail::adam_constants<detail::compute_t<S>> constants(const adam_coefficients& k) noexcept
    {
        using SC = detail::compute_t<S>;
        // Rounded to S first, as cpu::adam_rows does (static_cast<S>), then widened for the kernel.
        auto r = [](double x) { return static_cast<SC>(detail::to_compute(detail::from_double<S>(x))); };
        return {r(k.beta1), r(k.beta2), r(k.eps), r(1.0 - k.beta1), r(1.0 - k.beta2), r(k.grad_scale)};
    }
};

COMPACT_CHECK_BACKEND(cuda);

COMPACT_NAMESPACE_END
