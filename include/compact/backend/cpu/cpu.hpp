// compact/backend/cpu/cpu.hpp: the CPU backend (Eigen kernels, OpenMP threads).
//
// GEMMs run Eigen's packed, vectorised general_matrix_matrix_product kernel directly (the routine behind
// Eigen's own products and its BLAS), one call per fixed part of the output, with packing buffers
// from a per-thread pool (allocated on a thread's first, or first larger, GEMM; never in steady state). The parts depend on the
// shape only, never on the thread count, and each part runs single-threaded, so every result is
// bit-identical for 1, 2 or any number of threads. Elementwise primitives are plain loops the compiler
// vectorises. Build with OpenMP (the compact::compact CMake target does when it is found) for threads;
// without it every call runs on the calling thread.
#pragma once

#include "compact/backend/backend.hpp"
#include "compact/core/config.hpp"
#include "compact/core/error.hpp"
#include "compact/core/matrix_view.hpp"
#include "compact/random/projection.hpp"

#include "compact/backend/cpu/detail/eigen_core.hpp"
#include "compact/backend/cpu/detail/quantize.hpp"
#include "compact/backend/store_scheme.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <memory>
#include <new>
#include <vector>

#if COMPACT_HAS_OPENMP
#include <omp.h>
#endif

COMPACT_NAMESPACE_BEGIN

namespace detail {

/// std::allocator with 64-byte alignment, so owning buffers start on a cache line.
template <class T>
struct aligned_allocator {
    using value_type = T;
    static constexpr std::align_val_t alignment{64};
    aligned_allocator() noexcept = default;
    template <class U>
    aligned_allocator(const aligned_allocator<U>&) noexcept
    {
    }
    T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), alignment)); }
    void deallocate(T* p, std::size_t) noexcept { ::operator delete(p, alignment); }
    template <class U>
    bool operator==(const aligned_allocator<U>&) const noexcept
    {
        return true;
    }
    template <class U>
    bool operator!=(const aligned_allocator<U>&) const noexcept
    {
        return false;
    }
};

/// Eigen's GEMM blocking with packing buffers from a per-thread pool, so that a GEMM allocates only
/// the first time a thread sees a larger blocking, never in steady state.
template <class T>
class pooled_blocking : public Eigen::internal::level3_blocking<T, T> {
public:
    pooled_blocking(Eigen::Index rows, Eigen::Index cols, Eigen::Index depth)
    {
        this->m_mc = rows;
        this->m_nc = cols;
        this->m_kc = depth;
        Eigen::internal::computeProductBlockingSizes<T, T, 1>(this->m_kc, this->m_mc, this->m_nc, Eigen::Index{1});
        this->m_blockA = reserve(pool().a, this->m_mc * this->m_kc);
        this->m_blockB = reserve(pool().b, this->m_kc * this->m_nc);
    }

private:
    using storage = std::vector<T, aligned_allocator<T>>;
    struct buffers {
        storage a, b;
    };
    static buffers& pool()
    {
        thread_local buffers p;
        return p;
    }
    static T* reserve(storage& s, Eigen::Index count)
    {
        if (s.size() < static_cast<std::size_t>(count)) s.resize(static_cast<std::size_t>(count));
        return s.data();
    }
};

} // namespace detail

struct cpu {
    static constexpr const char* name = "cpu";

    /// threads: how many OpenMP threads a call may use; 0 means omp_get_max_threads().
    struct context {
        int threads = 0;
    };

    template <class T>
    using buffer = std::vector<T, detail::aligned_allocator<T>>;

    /// The most threads a context may ask for: beyond it the OpenMP runtime fails (or crashes) creating them.
    static constexpr int max_threads = 1024;

    /// The threads a call uses: ctx.threads, or OpenMP's default for 0. A count outside [0, max_threads]
    /// is an error (every primitive checks it before touching memory).
    static int thread_count(const context& ctx)
    {
        COMPACT_REQUIRE(ctx.threads >= 0 && ctx.threads <= max_threads, "cpu::context", "threads=", ctx.threads,
                        " must be in [0, ", max_threads, "] (0: OpenMP's default)");
#if COMPACT_HAS_OPENMP
        return ctx.threads > 0 ? ctx.threads : omp_get_max_threads();
#else
        (void)ctx;
        return 1;
#endif
    }

    /// Runs f(0) ... f(parts - 1), spread over the context's threads; f must not throw.
    template <class F>
    static void parallel_for(const context& ctx, index_t parts, F&& f)
    {
        const int threads = thread_count(ctx);
#if COMPACT_HAS_OPENMP
        if (threads > 1 && parts > 1) {
            COMPACT_PRAGMA(omp parallel for num_threads(threads) schedule(static))
            for (index_t p = 0; p < parts; ++p) f(p);
            return;
        }
#else
        (void)threads;
#endif
        for (index_t p = 0; p < parts; ++p) f(p);
    }

    /// parallel_for bound to a context, for the kernels in backend/cpu/detail/quantize.hpp.
    struct bound_parallel_for {
        const context& ctx;
        template <class F>
        void operator()(index_t parts, F&& f) const
        {
            parallel_for(ctx, parts, f);
        }
    };
    static bound_parallel_for parallel_for_in(const context& ctx) noexcept { return {ctx}; }

    // ---------------------------------------------------------------------------------------- GEMM

    template <class T>
    static void gemm(const context& ctx, op ta, op tb, double alpha_d, const_matrix_view<T> a,
                     const_matrix_view<T> b, double beta_d, matrix_view<T> c)
    {
        // gemm is public (trainers call it for their own products): it validates like the layers do.
        constexpr const char* where = "cpu::gemm";
        thread_count(ctx);
        detail::check_view(a, where, "A");
        detail::check_view(b, where, "B");
        detail::check_view(c, where, "C");
        detail::check_no_overlap(c, "C", a, "A", where);
        detail::check_no_overlap(c, "C", b, "B", where);
        const T alpha = static_cast<T>(alpha_d), beta = static_cast<T>(beta_d);
        const index_t m = c.rows, n = c.cols;
        detail::check_gemm_shapes<T>(ta, tb, a, b, c, where);
        if (m == 0 || n == 0) return;
        // Splitting the longer side of C keeps each part's product large enough for the packed kernel.
        const bool split_rows = m >= n;
        const index_t extent = split_rows ? m : n;
        const index_t parts = std::clamp<index_t>(extent / 128, 1, 8);
        const index_t step = (extent + parts - 1) / parts;
        parallel_for(ctx, parts, [&](index_t p) {
            const index_t begin = p * step, count = std::min(step, extent - begin);
            if (count <= 0) return;
            if (split_rows) {
                auto a_part = ta == op::none ? a.block(begin, 0, count, a.cols) : a.block(0, begin, a.rows, count);
                gemm_serial(ta, tb, alpha, a_part, b, beta, c.block(begin, 0, count, n));
            } else {
                auto b_part = tb == op::none ? b.block(0, begin, b.rows, count) : b.block(begin, 0, count, b.cols);
                gemm_serial(ta, tb, alpha, a, b_part, beta, c.block(0, begin, m, count));
            }
        });
    }

    // ---------------------------------------------------------------------------------- projection

    template <class T>
    static void generate_projection(const context& ctx, const projection_spec& spec, index_t row0, index_t col0,
                                    matrix_view<T> out)
    {
        if (out.empty()) return;
        const auto stream = detail::make_projection_stream(spec);
        // Quads that lie wholly inside the block are written by a tight loop the compiler vectorises;
        // the (at most two) partial quads at the edges go through projection_quad. Both evaluate the
        // same expressions, so an element's value does not depend on the block it is generated in.
        const index_t first_quad = col0 / 4, last_quad = (col0 + out.cols - 1) / 4;
        const index_t inner_begin = (col0 + 3) / 4, inner_end = (col0 + out.cols) / 4;
        parallel_for(ctx, row_parts(out.rows, out.cols), [&](index_t p) {
            const auto [begin, end] = row_range(p, out.rows, out.cols);
            for (index_t i = begin; i < end; ++i) {
                T* row = out.row(i);
                const index_t gi = row0 + i;
                if (spec.dist == distribution::identity) {
                    std::fill(row, row + out.cols, T(0));
                    const index_t diag = gi - col0;
                    if (diag >= 0 && diag < out.cols) row[diag] = T(1);
                    continue;
                }
                T* inner = row + (4 * inner_begin - col0);
                auto whole_quads = [&](auto quad) { // one loop per distribution, so each vectorises
                    for (index_t q = inner_begin; q < inner_end; ++q) {
                        double v[4];
                        quad(stream, gi, q, v);
                        T* o = inner + 4 * (q - inner_begin);
                        o[0] = static_cast<T>(v[0]), o[1] = static_cast<T>(v[1]);
                        o[2] = static_cast<T>(v[2]), o[3] = static_cast<T>(v[3]);
                    }
                };
                if (spec.dist == distribution::gaussian)
                    whole_quads([](const auto& s, index_t r, index_t q, double(&v)[4]) { detail::gaussian_quad(s, r, q, v); });
                else
                    whole_quads([](const auto& s, index_t r, index_t q, double(&v)[4]) { detail::rademacher_quad(s, r, q, v); });
                for (index_t q = first_quad; q <= last_quad; ++q) {
                    if (q >= inner_begin && q < inner_end) continue;
                    double v[4];
                    projection_quad(spec, gi, q, v);
                    for (int c = 0; c < 4; ++c) {
                        const index_t j = 4 * q + c - col0;
                        if (j >= 0 && j < out.cols) row[j] = static_cast<T>(v[c]);
                    }
                }
            }
        });
    }

    // --------------------------------------------------------------------------------- elementwise

    template <class T>
    static void column_sums(const context& ctx, const_matrix_view<T> a, T beta, T* out)
    {
        if (a.cols == 0) return;
        // Columns are split, rows are summed in order: the result does not depend on the split.
        constexpr index_t width = 256;
        const index_t parts = (a.cols + width - 1) / width;
        parallel_for(ctx, parts, [&](index_t p) {
            const index_t c0 = p * width, nc = std::min(width, a.cols - c0);
            T acc[width];
            for (index_t j = 0; j < nc; ++j) acc[j] = T(0);
            for (index_t i = 0; i < a.rows; ++i) {
                const T* row = a.row(i) + c0;
                for (index_t j = 0; j < nc; ++j) acc[j] += row[j];
            }
            for (index_t j = 0; j < nc; ++j) out[c0 + j] = beta == T(0) ? acc[j] : acc[j] + beta * out[c0 + j];
        });
    }

    template <class T>
    static void add_row_vector(const context& ctx, const T* b, matrix_view<T> y)
    {
        parallel_for(ctx, row_parts(y.rows, y.cols), [&](index_t p) {
            const auto [begin, end] = row_range(p, y.rows, y.cols);
            for (index_t i = begin; i < end; ++i) {
                T* COMPACT_RESTRICT row = y.row(i);
                for (index_t j = 0; j < y.cols; ++j) row[j] += b[j];
            }
        });
    }

    template <class T>
    static void fill(const context& ctx, matrix_view<T> y, T value)
    {
        parallel_for(ctx, row_parts(y.rows, y.cols), [&](index_t p) {
            const auto [begin, end] = row_range(p, y.rows, y.cols);
            for (index_t i = begin; i < end; ++i) std::fill(y.row(i), y.row(i) + y.cols, value);
        });
    }

    template <class X, class Y>
    static void axpby(const context& ctx, double alpha, const_matrix_view<X> x, double beta, matrix_view<Y> y)
    {
        using C = std::common_type_t<X, Y>;
        const C a = static_cast<C>(alpha), bt = static_cast<C>(beta);
        parallel_for(ctx, row_parts(y.rows, y.cols), [&](index_t p) {
            const auto [begin, end] = row_range(p, y.rows, y.cols);
            for (index_t i = begin; i < end; ++i) {
                const X* COMPACT_RESTRICT xr = x.row(i);
                Y* COMPACT_RESTRICT yr = y.row(i);
                if (beta == 0)
                    for (index_t j = 0; j < y.cols; ++j) yr[j] = static_cast<Y>(a * static_cast<C>(xr[j]));
                else
                    for (index_t j = 0; j < y.cols; ++j)
                        yr[j] = static_cast<Y>(a * static_cast<C>(xr[j]) + bt * static_cast<C>(yr[j]));
            }
        });
    }

    template <class G, class S, class D>
    static void adam_direction(const context& ctx, const adam_coefficients& k, const_matrix_view<G> g,
                               matrix_view<S> m, matrix_view<S> v, matrix_view<D> direction)
    {
        adam_rows(ctx, k, g, m, v, [&](index_t i, index_t j, S update) { direction(i, j) = static_cast<D>(update); });
    }

    template <class W, class S, class G = W>
    static void adamw_update(const context& ctx, const adam_coefficients& k, const_matrix_view<non_deduced_t<G>> g,
                             matrix_view<S> m, matrix_view<S> v, matrix_view<W> w)
    {
        using C = std::common_type_t<W, S>;
        const C step = static_cast<C>(k.step_size), decay = static_cast<C>(k.decay);
        adam_rows(ctx, k, g, m, v, [&](index_t i, index_t j, S update) {
            W& x = w(i, j);
            x = static_cast<W>(decay * (static_cast<C>(x) - step * static_cast<C>(update)));
        });
    }

    /// *flag = 1 when x holds a NaN or an infinity; otherwise *flag is left as it is. Each part ORs its
    /// rows without an early exit (so the loop vectorises); the parts meet in one relaxed atomic.
    template <class T>
    static void flag_nonfinite(const context& ctx, const_matrix_view<T> x, std::uint32_t* flag)
    {
        if (x.empty()) return;
        constexpr T largest = std::numeric_limits<T>::max();
        std::atomic<bool> found{false};
        parallel_for(ctx, row_parts(x.rows, x.cols), [&](index_t p) {
            const auto [begin, end] = row_range(p, x.rows, x.cols);
            unsigned bad = 0;
            for (index_t i = begin; i < end; ++i) {
                const T* COMPACT_RESTRICT row = x.row(i);
                // |x| <= max is false exactly for NaN and +-inf.
                for (index_t j = 0; j < x.cols; ++j) bad |= std::abs(row[j]) <= largest ? 0u : 1u;
            }
            if (bad != 0) found.store(true, std::memory_order_relaxed);
        });
        if (found.load(std::memory_order_relaxed)) *flag = 1;
    }

    // ------------------------------------------------------------------------ row reductions, gathers

    /// out[i] = sum_j x(i, j)^2 (in A, j in order) + beta out[i]; beta == 0 never reads out.
    template <class T, class A>
    static void row_sq_norms(const context& ctx, const_matrix_view<T> x, A beta, A* out)
    {
        if (x.rows == 0) return;
        parallel_for(ctx, row_parts(x.rows, x.cols), [&](index_t p) {
            const auto [begin, end] = row_range(p, x.rows, x.cols);
            for (index_t i = begin; i < end; ++i) {
                const T* COMPACT_RESTRICT row = x.row(i);
                A sum = A(0);
                for (index_t j = 0; j < x.cols; ++j) {
                    const A v = static_cast<A>(row[j]);
                    sum += v * v;
                }
                out[i] = beta == A(0) ? sum : sum + beta * out[i];
            }
        });
    }

    /// out(k, j) = x(rows[k], j) weights[k] (weights null: a copy).
    template <class T, class W>
    static void gather_rows(const context& ctx, const_matrix_view<T> x, const index_t* rows, const W* weights,
                            matrix_view<T> out)
    {
        using C = std::common_type_t<T, W>;
        parallel_for(ctx, row_parts(out.rows, out.cols), [&](index_t p) {
            const auto [begin, end] = row_range(p, out.rows, out.cols);
            for (index_t k = begin; k < end; ++k) {
                const T* COMPACT_RESTRICT src = x.row(rows[k]);
                T* COMPACT_RESTRICT dst = out.row(k);
                if (weights == nullptr) {
                    std::copy(src, src + out.cols, dst);
                } else {
                    const C w = static_cast<C>(weights[k]);
                    for (index_t j = 0; j < out.cols; ++j) dst[j] = static_cast<T>(static_cast<C>(src[j]) * w);
                }
            }
        });
    }

    // ------------------------------------------------------------------- quantized stores and masks

    /// Copies `count` elements from backend memory to host memory, and back (checkpoints). On the CPU
    /// both are host memory: a plain copy.
    template <class T>
    static void copy_to_host(const context&, const T* src, T* host, std::size_t count)
    {
        if (count > 0) std::copy(src, src + count, host);
    }
    template <class T>
    static void copy_from_host(const context&, const T* host, T* dst, std::size_t count)
    {
        if (count > 0) std::copy(host, host + count, dst);
    }

    template <class T>
    static void quantize(const context& ctx, const store_scheme& s, const noise_key& key, const_matrix_view<T> x,
                         std::byte* out)
    {
        detail::cpu_store::quantize(parallel_for_in(ctx), s, key, x, out);
    }

    template <class T>
    static void dequantize(const context& ctx, const store_scheme& s, const std::byte* in, index_t count,
                           index_t first, matrix_view<T> out)
    {
        detail::cpu_store::dequantize(parallel_for_in(ctx), s, in, count, first, out);
    }

    template <class T>
    static void relu_mask(const context& ctx, const_matrix_view<T> x, matrix_view<T> y, std::uint8_t* mask)
    {
        detail::cpu_store::relu_mask(parallel_for_in(ctx), x, y, mask);
    }

    template <class T>
    static void dropout_mask(const context& ctx, double p, const noise_key& key, const_matrix_view<T> x,
                             matrix_view<T> y, std::uint8_t* mask)
    {
        detail::cpu_store::dropout_mask(parallel_for_in(ctx), p, key, x, y, mask);
    }

    template <class T>
    static void apply_mask(const context& ctx, const std::uint8_t* mask, double scale, const_matrix_view<T> dy,
                           matrix_view<T> dx)
    {
        detail::cpu_store::apply_mask(parallel_for_in(ctx), mask, scale, dy, dx);
    }

private:
    /// Rows per elementwise part: about 32K elements, so a part amortises the thread hand-off.
    static index_t rows_per_part(index_t cols) noexcept { return std::max<index_t>(1, 32768 / std::max<index_t>(1, cols)); }
    static index_t row_parts(index_t rows, index_t cols) noexcept
    {
        const index_t per = rows_per_part(cols);
        return (rows + per - 1) / per;
    }
    struct range {
        index_t begin, end;
    };
    static range row_range(index_t part, index_t rows, index_t cols) noexcept
    {
        const index_t per = rows_per_part(cols);
        return {part * per, std::min(rows, (part + 1) * per)};
    }

    /// The moment update shared by adam_direction and adamw_update; `emit(i, j, M/(sqrt(V)+eps))`.
    template <class G, class S, class Emit>
    static void adam_rows(const context& ctx, const adam_coefficients& k, const_matrix_view<G> g, matrix_view<S> m,
                          matrix_view<S> v, Emit&& emit)
    {
        const S b1 = static_cast<S>(k.beta1), b2 = static_cast<S>(k.beta2), eps = static_cast<S>(k.eps);
        const S c1 = static_cast<S>(1.0 - k.beta1), c2 = static_cast<S>(1.0 - k.beta2);
        const S scale = static_cast<S>(k.grad_scale);
        parallel_for(ctx, row_parts(g.rows, g.cols), [&](index_t p) {
            const auto [begin, end] = row_range(p, g.rows, g.cols);
            for (index_t i = begin; i < end; ++i) {
                const G* COMPACT_RESTRICT gr = g.row(i);
                S* COMPACT_RESTRICT mr = m.row(i);
                S* COMPACT_RESTRICT vr = v.row(i);
                for (index_t j = 0; j < g.cols; ++j) {
                    const S gj = static_cast<S>(gr[j]) * scale;
                    mr[j] = b1 * mr[j] + c1 * gj;
                    vr[j] = b2 * vr[j] + c2 * gj * gj;
                    emit(i, j, mr[j] / (std::sqrt(vr[j]) + eps));
                }
            }
        });
    }

    /// C = alpha op(A) op(B) + beta C on the calling thread, through Eigen's packed GEMM kernel.
    template <class T>
    static void gemm_serial(op ta, op tb, T alpha, const_matrix_view<T> a, const_matrix_view<T> b, T beta,
                            matrix_view<T> c)
    {
        const index_t m = c.rows, n = c.cols;
        const index_t k = ta == op::none ? a.cols : a.rows;
        if (beta == T(0)) {
            for (index_t i = 0; i < m; ++i) std::fill(c.row(i), c.row(i) + n, T(0));
        } else if (beta != T(1)) {
            for (index_t i = 0; i < m; ++i)
                for (index_t j = 0; j < n; ++j) c(i, j) *= beta;
        }
        if (k == 0 || alpha == T(0)) return;
        // Row-major C (m, n) is column-major C^T (n, m) with the same ld, and C^T = op(B)^T op(A)^T. A
        // row-major operand that is not transposed reads as column-major after the transposition.
        using namespace Eigen;
        using Eigen::internal::general_matrix_matrix_product;
        detail::pooled_blocking<T> blocking(n, m, k);
        auto run = [&](auto lhs_order, auto rhs_order) {
            general_matrix_matrix_product<Index, T, decltype(lhs_order)::value, false, T, decltype(rhs_order)::value,
                                          false, ColMajor, 1>::run(n, m, k, b.data, b.ld, a.data, a.ld, c.data, 1,
                                                                   c.ld, alpha, blocking);
        };
        using col = std::integral_constant<int, ColMajor>;
        using row = std::integral_constant<int, RowMajor>;
        if (tb == op::none) {
            if (ta == op::none) run(col{}, col{});
            else run(col{}, row{});
        } else {
            if (ta == op::none) run(row{}, col{});
            else run(row{}, row{});
        }
    }
};

COMPACT_NAMESPACE_END
