// compact/compress/velora.hpp: VeLoRA's rank-1 sub-token compression as a compressor (SPEC section 9,
// Miles et al., "VeLoRA: Memory Efficient Training using Rank-1 Sub-Token Projections", NeurIPS 2024,
// arXiv 2405.17991; a model of compress/compressor.hpp).
//
//   compact::linear_layer<float, compact::velora, compact::cpu> fc(
//       compact::in_features{n}, compact::out_features{m}, options, compact::velora{/*groups*/ 32});
//
// Each row x_i of X (N, n) is split into G sub-tokens x_{i,g} of length s = n / G (G must divide n). One
// unit vector v (s) is shared by every sub-token of the layer (the paper's default; per-group vectors are
// its variant). Forward keeps the coefficients
//   c_{i,g} = <x_{i,g}, v>                     (N, G) row-major, the paper's compression z = x v (Eq. 2)
// and backward reconstructs x^_{i,g} = c_{i,g} v (Eq. 3) and forms the full gradient
//   G = scale dY^T X^                          (m, n)
// without materialising X^: H = dY^T C (m, G), then G[:, g s : (g + 1) s] = scale H[:, g] v^T. The
// gradient is full-shape (subspace = false): compressed_adamw runs plain AdamW. The estimate is biased:
// it keeps the component of each sub-token along v only (exact when every sub-token is a multiple of v).
// `scale` is the paper's velora_scale (default 1).
//
// v is persistent state (compressor.hpp): s values of Scalar in caller memory, state_bytes() whatever
// max_rows. bind_state zeroes it; the first compress with N >= 1 initialises it from that batch
// ("batch_average_once"): v = the mean of all N G sub-tokens, normalised to |v| = 1 (v = 1/sqrt(s) in
// every entry if that mean is zero; a non-finite mean is an error and leaves v unset). After that v never
// changes, so every saved activation is decoded with the v it was encoded with. A zero v means "not yet
// initialised": each compressor object checks that once (one synchronous read of v, s values) and then
// remembers it, so copies that share the binding agree on v. Checkpoints save v's bytes; loading them
// makes the next compress check again.
//
// Costs for N rows, m outputs: compress N n multiply-adds (a GEMM on the (N G, s) view of X), plus once
// per run a column sum of X and a synchronous round trip of s values to normalise v on the host;
// weight_gradient N m G + m n multiply-adds. Saved: N G sizeof(Scalar) bytes instead of N n (s times
// fewer: 4 bytes per row and group in float, e.g. 128 B instead of 16 KiB per row at n = 4096, G = 32).
// Workspace: max(out G, min(N, max_chunk_rows) n) values of Scalar (the second for a strided X only,
// which compress copies a chunk of rows at a time). Deterministic: compress and weight_gradient are pure
// functions of their inputs and v; `step` is recorded, not used.
#pragma once

#include "compact/backend/backend.hpp"
#include "compact/compress/compressor.hpp"
#include "compact/core/checked.hpp"
#include "compact/core/config.hpp"
#include "compact/core/error.hpp"
#include "compact/core/matrix_view.hpp"
#include "compact/core/shape.hpp"
#include "compact/core/workspace.hpp"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

COMPACT_NAMESPACE_BEGIN

template <class Scalar, class Backend>
class velora_compressor;

/// The Policy of a layer whose input is kept as VeLoRA's rank-1 sub-token coefficients.
struct velora {
    index_t groups = 32; ///< G: sub-tokens per row (the paper's num_groups); must divide n
    double scale = 1;    ///< the paper's velora_scale: G is multiplied by it; finite and positive

    template <class Scalar, class Backend>
    using compressor = velora_compressor<Scalar, Backend>;
};

namespace detail {

/// A storage scalar to double and back on the host (16-bit device types convert through float).
template <class T>
double host_to_double(T x)
{
    if constexpr (std::is_floating_point_v<T>) return static_cast<double>(x);
    else return static_cast<double>(static_cast<float>(x));
}
template <class T>
T host_from_double(double x)
{
    if constexpr (std::is_floating_point_v<T>) return static_cast<T>(x);
    else return T(static_cast<float>(x));
}

inline std::uint64_t double_bits(double x) noexcept
{
    std::uint64_t b = 0;
    std::memcpy(&b, &x, sizeof b);
    return b;
}

} // namespace detail

template <class Scalar, class Backend>
class velora_compressor {
    COMPACT_CHECK_BACKEND(Backend);

public:
    using scalar_type = Scalar;
    using backend_type = Backend;
    using context = typename Backend::context;
    using saved_type = saved_activation;
    static constexpr const char* name = "velora";
    static constexpr bool subspace = false;

    /// Rows of a strided X that compress copies into the workspace at once.
    static constexpr index_t max_chunk_rows = 256;

    velora_compressor(const compressor_setup& setup, const velora& policy)
        : in_(setup.in), out_(setup.out), groups_(policy.groups), scale_(policy.scale), layer_(setup.layer)
    {
        COMPACT_REQUIRE(setup.in >= 1 && setup.out >= 0, setup.where, "in=", setup.in, " must be positive");
        COMPACT_REQUIRE(policy.groups >= 1 && setup.in % policy.groups == 0, setup.where, "velora groups=",
                        policy.groups, " must divide in=", setup.in, " (X is (N, ", setup.in,
                        "), split into groups sub-tokens of in / groups values)");
        COMPACT_REQUIRE(std::isfinite(policy.scale) && policy.scale > 0, setup.where, "velora scale=", policy.scale,
                        " must be finite and positive");
    }

    index_t in() const noexcept { return in_; }
    index_t gradient_cols() const noexcept { return in_; }
    /// G, s = n / G and the gradient's scale.
    index_t groups() const noexcept { return groups_; }
    index_t sub_token() const noexcept { return in_ / groups_; }
    double scale() const noexcept { return scale_; }

    /// Bytes of the coefficients for N rows: N G sizeof(Scalar), against N n for X.
    std::size_t saved_bytes(index_t rows) const
    {
        return detail::checked_mul_size(rows, groups_, sizeof(Scalar), "velora::saved_bytes");
    }

    /// Workspace for compress and weight_gradient with up to `rows` rows: H (out, G) for the gradient, or
    /// a chunk of a strided X for compress, whichever is larger.
    std::size_t workspace_bytes(index_t rows) const
    {
        const index_t chunk = std::min(std::max<index_t>(rows, 0), max_chunk_rows);
        const std::size_t copy = detail::checked_mul_size(chunk, in_, sizeof(Scalar), "velora::workspace_bytes");
        const std::size_t h = detail::checked_mul_size(out_, groups_, sizeof(Scalar), "velora::workspace_bytes");
        return detail::align_up(std::max(copy, h)) + detail::workspace_slack;
    }

    /// Bytes of v (s values of Scalar), whatever max_rows.
    std::size_t state_bytes(index_t = 0) const noexcept
    {
        return detail::align_up(static_cast<std::size_t>(sub_token()) * sizeof(Scalar));
    }

    /// Binds v to caller memory (state_bytes() bytes on the backend's device, aligned to
    /// compressor_state_alignment) and zeroes it on ctx's stream: the next compress initialises it.
    void bind_state(const context& ctx, void* data, std::size_t bytes)
    {
        check_state_memory(data, bytes, state_bytes(), "velora::bind_state");
        v_ = static_cast<Scalar*>(data);
        Backend::template fill<Scalar>(ctx, {v_, 1, sub_token()}, Scalar(0));
        ready_ = false;
    }
    bool state_bound() const noexcept { return v_ != nullptr; }

    /// v (1, s) in the backend's memory (zero until the first compress initialises it).
    const_matrix_view<Scalar> direction() const
    {
        require_state("velora::direction");
        return {v_, 1, sub_token()};
    }

    /// C (N, G) of a saved activation this compressor wrote.
    const_matrix_view<Scalar> coefficients(const saved_type& saved) const noexcept
    {
        return {reinterpret_cast<const Scalar*>(saved.data), saved.rows, groups_};
    }

    /// C (N, G) = <x_{i,g}, v> into saved; initialises v from X first if it is not yet. X: (N, n).
    void compress(const context& ctx, const_matrix_view<Scalar> x, std::uint64_t step, saved_type& saved,
                  workspace ws) const
    {
        constexpr const char* where = "velora::compress";
        detail::check_view(x, where, "X");
        COMPACT_REQUIRE(x.cols == in_, where, "X is ", shape_string(x), " but the compressor expects (N, ", in_, ")");
        require_state(where);
        check_saved_memory<Scalar>(saved, saved_bytes(x.rows), where);
        const bool strided = !x.contiguous();
        const std::size_t need =
            strided ? detail::buffer_bytes<Scalar>(std::min(x.rows, max_chunk_rows) * in_) + detail::workspace_slack : 0;
        detail::workspace_carver carve(ws, need, where);
        Scalar* chunk_memory = strided ? carve.take<Scalar>(std::min(x.rows, max_chunk_rows) * in_) : nullptr;
        if (x.rows > 0) {
            if (!initialised(ctx)) initialise(ctx, x, chunk_memory, where);
            const index_t s = sub_token();
            const const_matrix_view<Scalar> v_column(v_, s, 1);
            Scalar* c = reinterpret_cast<Scalar*>(saved.data);
            for_each_chunk(ctx, x, chunk_memory, [&](index_t r0, const_matrix_view<Scalar> sub) {
                Backend::template gemm<Scalar>(ctx, op::none, op::none, 1.0, sub, v_column, 0.0,
                                               matrix_view<Scalar>(c + r0 * groups_, sub.rows, 1));
            });
        }
        saved.filled = true;
        saved.rows = x.rows;
        saved.layer = layer_;
        saved.epoch = step;
    }

    /// G (m, n) = (or +=) scale dY^T X^ with X^_{i,g} = c_{i,g} v. dY: (N, m); needs out G values of
    /// workspace (m <= the out the compressor was built for).
    void weight_gradient(const context& ctx, const_matrix_view<Scalar> dy, const saved_type& saved,
                         matrix_view<Scalar> g, write_mode mode, workspace ws) const
    {
        constexpr const char* where = "velora::weight_gradient";
        detail::check_view(dy, where, "dY");
        check_saved(saved, dy.rows, layer_, where);
        detail::check_shape(g, dy.cols, in_, where, "G");
        require_state(where);
        const double beta = mode == write_mode::accumulate ? 1.0 : 0.0;
        if (dy.rows == 0) {
            if (beta == 0.0) Backend::template fill<Scalar>(ctx, g, Scalar(0));
            return;
        }
        const index_t m = dy.cols, s = sub_token();
        detail::workspace_carver carve(ws, detail::buffer_bytes<Scalar>(m * groups_) + detail::workspace_slack, where);
        Scalar* h = carve.take<Scalar>(m * groups_);
        Backend::template gemm<Scalar>(ctx, op::transpose, op::none, 1.0, dy, coefficients(saved), 0.0,
                                       matrix_view<Scalar>(h, m, groups_));
        const const_matrix_view<Scalar> v_row(v_, 1, s);
        if (g.contiguous()) { // (m G, 1) (1, s) -> the (m G, s) view of G: one rank-1 product
            Backend::template gemm<Scalar>(ctx, op::none, op::none, scale_, const_matrix_view<Scalar>(h, m * groups_, 1),
                                           v_row, beta, matrix_view<Scalar>(g.data, m * groups_, s));
        } else {
            for (index_t k = 0; k < groups_; ++k)
                Backend::template gemm<Scalar>(ctx, op::none, op::none, scale_,
                                               const_matrix_view<Scalar>(h + k, m, 1, groups_), v_row, beta,
                                               g.block(0, k * s, m, s));
        }
    }

    /// Configuration a loading layer must match (G, the scale's bits), and "velora_v": whether this
    /// object has seen v initialised (1) or not (0); loading it makes the next compress look at the
    /// restored v again.
    std::vector<compressor_field> checkpoint_fields() const
    {
        return {{"velora_groups", static_cast<std::uint64_t>(groups_), false},
                {"velora_scale", detail::double_bits(scale_), false},
                {"velora_v", ready_ ? 1u : 0u, true}};
    }
    void load_checkpoint_fields(const std::vector<compressor_field>& fields, const char* where)
    {
        for (const auto& f : fields)
            if (std::string(f.name) == "velora_v")
                COMPACT_REQUIRE(f.value <= 1, where, "velora_v=", f.value, " must be 0 or 1");
        ready_ = false; // v came from the checkpoint's state bytes: look at it at the next compress
    }

private:
    void require_state(const char* where) const
    {
        COMPACT_REQUIRE(v_ != nullptr, where, "the compressor's state (v, ", sub_token(),
                        " values) is not bound: call bind_state(ctx, data, state_bytes(max_rows)) first (linear_layer "
                        "and input_group::bind_state do it)");
    }

    /// Whether v holds a direction; reads it once per object (a zero v is uninitialised).
    bool initialised(const context& ctx) const
    {
        if (ready_) return true;
        std::vector<Scalar> v(static_cast<std::size_t>(sub_token()));
        Backend::copy_to_host(ctx, v_, v.data(), v.size());
        ready_ = std::any_of(v.begin(), v.end(), [](Scalar e) { return detail::host_to_double(e) != 0.0; });
        return ready_;
    }

    /// f(r0, sub) for chunks of X's rows, sub being the (rows G, s) sub-token view of rows [r0, r0 + rows):
    /// all of X at once when it is contiguous, else chunks copied into `chunk_memory`.
    template <class F>
    void for_each_chunk(const context& ctx, const_matrix_view<Scalar> x, Scalar* chunk_memory, F&& f) const
    {
        const index_t s = sub_token();
        if (x.contiguous()) {
            f(index_t{0}, const_matrix_view<Scalar>(x.data, x.rows * groups_, s));
            return;
        }
        for (index_t r0 = 0; r0 < x.rows; r0 += max_chunk_rows) {
            const index_t rows = std::min(max_chunk_rows, x.rows - r0);
            Backend::template axpby<Scalar, Scalar>(ctx, 1.0, x.row_block(r0, rows), 0.0,
                                                    matrix_view<Scalar>(chunk_memory, rows, in_));
            f(r0, const_matrix_view<Scalar>(chunk_memory, rows * groups_, s));
        }
    }

    /// v = the normalised mean of X's sub-tokens (SPEC section 9, batch_average_once): the column sums
    /// of the (N G, s) view on the backend, normalised in double on the host.
    void initialise(const context& ctx, const_matrix_view<Scalar> x, Scalar* chunk_memory, const char* where) const
    {
        const index_t s = sub_token();
        bool first = true;
        for_each_chunk(ctx, x, chunk_memory, [&](index_t, const_matrix_view<Scalar> sub) {
            Backend::template column_sums<Scalar>(ctx, sub, first ? Scalar(0) : Scalar(1), v_);
            first = false;
        });
        std::vector<Scalar> v(static_cast<std::size_t>(s));
        Backend::copy_to_host(ctx, v_, v.data(), v.size());
        double norm = 0;
        for (Scalar e : v) norm += detail::host_to_double(e) * detail::host_to_double(e);
        norm = std::sqrt(norm);
        if (!std::isfinite(norm)) {
            Backend::template fill<Scalar>(ctx, {v_, 1, s}, Scalar(0));
            COMPACT_REQUIRE(false, where, "the first batch X ", shape_string(x),
                            " holds a non-finite value: v (its normalised mean sub-token) cannot be initialised");
        }
        for (Scalar& e : v)
            e = detail::host_from_double<Scalar>(norm > 0 ? detail::host_to_double(e) / norm
                                                          : 1.0 / std::sqrt(static_cast<double>(s)));
        Backend::copy_from_host(ctx, v.data(), v_, v.size());
        ready_ = true;
    }

    index_t in_ = 0;
    index_t out_ = 0;
    index_t groups_ = 1;
    double scale_ = 1;
    std::uint64_t layer_ = 0;
    Scalar* v_ = nullptr;        // (s) in the caller's state memory; shared by copies
    mutable bool ready_ = false; // this object has seen v initialised (a cache of "v != 0")
};

COMPACT_NAMESPACE_END
