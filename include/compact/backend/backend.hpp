// compact/backend/backend.hpp: what a backend must provide, and the types its primitives share.
//
// The algorithms (compress/, optim/, nn/, io/) are written once against this interface; a backend is a tag type with
// static member functions, and adding one (backend/cuda/, ...) adds a folder and edits no algorithm.
//
//   struct my_backend {
//     static constexpr const char* name;
//     struct context;                               // stream, handles, thread count: passed to every call
//     template <class T> using buffer;              // owning storage for the convenience wrappers
//
//     // C (M, N) = alpha op(A) op(B) + beta C; beta == 0 never reads C (it may hold NaN). alpha and
//     // beta arrive in double, so a small optimizer step survives 16-bit storage types; the backend
//     // rounds them once to its compute type.
//     template <class T> static void gemm(const context&, op ta, op tb, double alpha,
//                                         const_matrix_view<T> A, const_matrix_view<T> B, double beta,
//                                         matrix_view<T> C);
//     // out(i, j) = P(row0 + i, col0 + j) of `spec`, rounded to T (random/projection.hpp).
//     template <class T> static void generate_projection(const context&, const projection_spec& spec,
//                                                        index_t row0, index_t col0, matrix_view<T> out);
//     // out[j] = sum_i A(i, j) + beta out[j] (sums in row order: deterministic); out holds A.cols.
//     template <class T> static void column_sums(const context&, const_matrix_view<T> A, T beta, T* out);
//     // Y(i, j) += b[j]
//     template <class T> static void add_row_vector(const context&, const T* b, matrix_view<T> Y);
//     // Y(i, j) = value
//     template <class T> static void fill(const context&, matrix_view<T> y, T value);
//     // Y = alpha X + beta Y, elementwise (beta == 0 never reads Y); X and Y may have different types.
//     template <class X, class Y> static void axpby(const context&, double alpha, const_matrix_view<X> x,
//                                                   double beta, matrix_view<Y> y);
//     // M, V updated with g as in adam_coefficients; then, elementwise,
//     //   adam_direction: D = M / (sqrt(V) + eps)
//     //   adamw_update:   W = decay (W - step_size D)          (D not stored)
//     // g is widened to S before use. adamw_update's G defaults to W and is never deduced (so that
//     // adamw_update<W, S> with a mutable view for g still converts it); a different G updates weights
//     // kept in another precision than their gradient (an fp32 master beside bf16 weights and
//     // gradients: W = S = float, G = bf16) without an (m, n) conversion buffer.
//     template <class G, class S, class D> static void adam_direction(const context&,
//         const adam_coefficients&, const_matrix_view<G> g, matrix_view<S> m, matrix_view<S> v,
//         matrix_view<D> direction);
//     template <class W, class S, class G = W> static void adamw_update(const context&,
//         const adam_coefficients&, const_matrix_view<non_deduced_t<G>> g, matrix_view<S> m,
//         matrix_view<S> v, matrix_view<W> w);
//     // (Both multiply g, widened to S, by grad_scale rounded to S before the moment update.)
//
//     // Sets *flag to 1 when x holds a NaN or an infinity, and leaves it alone otherwise (it never
//     // clears it). flag is one std::uint32_t in the backend's memory, so several tensors can be
//     // checked into one flag (zero it with fill on a (1, 1) view) and the host reads it once, with
//     // copy_to_host: on CUDA the kernel writes the flag on the stream and nothing synchronises
//     // until that read. Cost: one read of x.
//     template <class T> static void flag_nonfinite(const context&, const_matrix_view<T> x,
//                                                   std::uint32_t* flag);
//     // Row reductions and gathers for the compressors (compress/velora.hpp, compress/wta_crs.hpp):
//     //   row_sq_norms: out[i] = sum_j x(i, j)^2 + beta out[i], summed in A (beta == 0 never reads out;
//     //                 out holds x.rows values of A, in the backend's memory). The order of the sum is
//     //                 fixed by x's shape (deterministic), not necessarily the same on every backend.
//     //   gather_rows:  out(k, j) = x(rows[k], j) weights[k] (weights null: an exact copy), computed in the
//     //                 common type of T and W and rounded once to T. rows and weights hold out.rows values
//     //                 in the backend's memory; every rows[k] lies in [0, x.rows); out must not overlap x.
//     template <class T, class A> static void row_sq_norms(const context&, const_matrix_view<T> x, A beta,
//                                                          A* out);
//     template <class T, class W> static void gather_rows(const context&, const_matrix_view<T> x,
//                                                         const index_t* rows, const W* weights,
//                                                         matrix_view<T> out);
//     // Copies count elements between the backend's memory and the host; synchronous (the copy has
//     // landed when it returns: on CUDA it waits for the context's stream).
//     template <class T> static void copy_to_host(const context&, const T* src, T* host, std::size_t count);
//     template <class T> static void copy_from_host(const context&, const T* host, T* dst, std::size_t count);
//
//     // Activation stores (backend/store_scheme.hpp fixes the bytes): encode x (row-major order, any ld) into
//     // out (stored_bytes<T>(s, count) bytes, aligned for float and T); decode flat values
//     // [first, first + out.rows out.cols) of an encoding of `count` values into out.
//     template <class T> static void quantize(const context&, const store_scheme& s, const noise_key&,
//                                             const_matrix_view<T> x, std::byte* out);
//     template <class T> static void dequantize(const context&, const store_scheme& s, const std::byte* in,
//                                               index_t count, index_t first, matrix_view<T> out);
//     // 1-bit masks (value k at bit k % 8 of byte k / 8; outputs may alias inputs):
//     //   relu_mask:    y = max(x, 0), bit = x > 0
//     //   dropout_mask: bit = noise u_k >= p, y = bit ? x / (1 - p) : 0
//     //   apply_mask:   dx = bit ? dy scale : 0
//     template <class T> static void relu_mask(const context&, const_matrix_view<T> x, matrix_view<T> y,
//                                              std::uint8_t* mask);
//     template <class T> static void dropout_mask(const context&, double p, const noise_key&,
//                                                 const_matrix_view<T> x, matrix_view<T> y, std::uint8_t* mask);
//     template <class T> static void apply_mask(const context&, const std::uint8_t* mask, double scale,
//                                               const_matrix_view<T> dy, matrix_view<T> dx);
//   };
//
// Every primitive may assume its arguments were validated by the algorithm that calls it (shapes agree,
// data non-null when non-empty); it must produce bit-identical results for the same inputs regardless
// of its thread count.
#pragma once

#include "compact/core/config.hpp"
#include "compact/core/matrix_view.hpp"
#include "compact/random/projection.hpp"

#include <type_traits>

COMPACT_NAMESPACE_BEGIN

/// T, in a context where a template argument is not deduced (std::type_identity_t of C++20).
template <class T>
struct non_deduced {
    using type = T;
};
template <class T>
using non_deduced_t = typename non_deduced<T>::type;

/// Operand transposition for gemm.
enum class op : unsigned char { none, transpose };

namespace detail {
/// The check every backend's gemm makes: op(A) (M, K), op(B) (K, N) and C (M, N) agree. Returns K.
template <class T>
index_t check_gemm_shapes(op ta, op tb, const matrix_view<const T>& a, const matrix_view<const T>& b,
                          const matrix_view<T>& c, const char* where)
{
    const index_t k = ta == op::none ? a.cols : a.rows;
    COMPACT_REQUIRE((ta == op::none ? a.rows : a.cols) == c.rows && (tb == op::none ? b.rows : b.cols) == k &&
                        (tb == op::none ? b.cols : b.rows) == c.cols,
                    where, "op(A) ", shape_string(a), ", op(B) ", shape_string(b), " and C ", shape_string(c),
                    " do not agree");
    return k;
}
} // namespace detail

/// The per-step scalars of one (subspace) AdamW update, computed once on the host.
struct adam_coefficients {
    double beta1 = 0.9;
    double beta2 = 0.999;
    double eps = 1e-6;
    double step_size = 0; ///< eta_t * alpha, with eta_t = lr sqrt(1 - beta2^t) / (1 - beta1^t)
    double decay = 1;     ///< 1 - lr * weight_decay
    double grad_scale = 1; ///< g is multiplied by it (rounded to the moments' type) before the moments
};

namespace detail {
template <class B, class = void>
struct has_backend_basics : std::false_type {};
template <class B>
struct has_backend_basics<B, std::void_t<typename B::context, decltype(B::name)>> : std::true_type {};
} // namespace detail

/// Compile-time check of the parts of the interface that do not depend on the scalar type.
template <class B>
inline constexpr bool is_backend = detail::has_backend_basics<B>::value;

#define COMPACT_CHECK_BACKEND(B)                                                                           \
    static_assert(::compact::is_backend<B>,                                                               \
                  "compact: a backend needs a nested `context` type and a static `name` "                  \
                  "(see compact/backend/backend.hpp)")

COMPACT_NAMESPACE_END
