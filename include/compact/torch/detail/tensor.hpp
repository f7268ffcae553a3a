// compact/torch/detail/tensor.hpp: torch tensors as compact views, the checks that name the argument,
// and the registry that lets the optimizer find what a compressed weight needs. Internal to torch/.
#pragma once

#include "compact/backend/cpu/cpu.hpp"
#include "compact/core/config.hpp"
#include "compact/core/error.hpp"
#include "compact/core/matrix_view.hpp"

#include <torch/torch.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

COMPACT_NAMESPACE_BEGIN
namespace torch {
namespace detail {

inline std::string sizes_string(const ::at::Tensor& t)
{
    if (!t.defined()) return "(undefined)";
    std::string s = "(";
    for (int64_t d = 0; d < t.dim(); ++d) s += (d ? ", " : "") + std::to_string(t.size(d));
    return s + ")";
}

/// The CPU backend's context on torch's intra-op threads, so compact and torch compare on the same threads.
inline cpu::context cpu_context() { return cpu::context{static_cast<int>(::at::get_num_threads())}; }

/// Requires a CPU tensor of the weight's dtype (float or double: what compact's CPU backend computes in).
inline void check_tensor(const ::at::Tensor& t, const ::at::Tensor& like, const char* where, const char* name)
{
    COMPACT_REQUIRE(t.defined(), where, name, " is undefined");
    COMPACT_REQUIRE(t.scalar_type() == like.scalar_type(), where, name, " has dtype ", t.scalar_type(),
                    " but the layer's weight has ", like.scalar_type(), " (convert one of them with .to())");
    COMPACT_REQUIRE(t.device() == like.device(), where, name, " is on ", t.device(), " but the layer's weight is on ",
                    like.device());
#ifndef COMPACT_TORCH_CUDA
    COMPACT_REQUIRE(t.device().is_cpu(), where, name, " is on ", t.device(),
                    ": this build of compact::torch runs on the CPU (define COMPACT_TORCH_CUDA for CUDA tensors)");
#endif
    COMPACT_REQUIRE(t.scalar_type() == ::at::kFloat || t.scalar_type() == ::at::kDouble, where, name, " has dtype ",
                    t.scalar_type(), ": compact::torch computes in float or double");
}

/// compact's CPU backend with torch's BLAS for its products: the compressor's X P and dY^T Z run on the
/// library torch's own matrix products use (OpenBLAS, MKL), on torch's intra-op threads, so that compact
/// and nn::Linear compare like with like. Everything else (projections, stores, masks) is compact::cpu's.
struct torch_cpu : compact::cpu {
    static constexpr const char* name = "torch-cpu";

    /// C (M, N) = alpha op(A) op(B) + beta C, as compact::cpu::gemm (beta == 0 never reads C).
    template <class T>
    static void gemm(const context& ctx, op ta, op tb, double alpha, const_matrix_view<T> a, const_matrix_view<T> b,
                     double beta, matrix_view<T> c)
    {
        constexpr const char* where = "compact::torch::detail::torch_cpu::gemm";
        (void)ctx; // torch's threads: the context is compact::cpu's, made from them (cpu_context)
        compact::detail::check_view(a, where, "A");
        compact::detail::check_view(b, where, "B");
        compact::detail::check_view(c, where, "C");
        compact::detail::check_no_overlap(c, "C", a, "A", where);
        compact::detail::check_no_overlap(c, "C", b, "B", where);
        const index_t m = c.rows, n = c.cols;
        const index_t k = compact::detail::check_gemm_shapes<T>(ta, tb, a, b, c, where);
        if (m == 0 || n == 0) return;
        const auto dtype = ::c10::CppTypeToScalarType<T>::value;
        auto wrap = [&](const auto& v) {
            return ::at::from_blob(const_cast<T*>(v.data), {v.rows, v.cols}, {std::max<index_t>(v.ld, 1), 1},
                                   ::at::TensorOptions().dtype(dtype));
        };
        ::at::Tensor ta_ = wrap(a), tb_ = wrap(b), tc = wrap(c);
        if (ta == op::transpose) ta_ = ta_.t();
        if (tb == op::transpose) tb_ = tb_.t();
        if (k == 0) {
            // An empty sum: C = beta C (beta == 0 writes zeros).
            if (beta == 0) tc.zero_();
            else tc.mul_(beta);
            return;
        }
        // addmm ignores C when beta == 0 (no NaN from it propagates), as compact's contract says.
        ::at::NoGradGuard no_grad;
        tc.addmm_(ta_, tb_, beta, alpha);
    }
};

/// A (rows, cols) row-major view of t without copying when its strides allow (unit column stride, rows
/// at a common distance: any contiguous tensor, a row slice, the leading dimensions of a strided batch);
/// otherwise `keep` receives a contiguous copy and the view is of that. cols: the last dimension.
template <class T>
matrix_view<T> rows_view(const ::at::Tensor& t, ::at::Tensor& keep)
{
    const int64_t cols = t.dim() == 0 ? 1 : t.size(-1);
    const int64_t rows = cols == 0 ? 0 : t.numel() / cols;
    bool viewable = t.dim() <= 1 || t.stride(-1) == 1 || cols == 1;
    int64_t ld = cols;
    if (viewable && t.dim() >= 2) {
        ld = t.size(-2) == 1 ? cols : t.stride(-2);
        // The leading dimensions collapse into one row index of stride ld.
        int64_t expected = ld * t.size(-2);
        for (int64_t d = t.dim() - 3; d >= 0 && viewable; --d) {
            if (t.size(d) != 1 && t.stride(d) != expected) viewable = false;
            expected *= t.size(d);
        }
        if (ld < cols) viewable = false;
    }
    if (cols == 1 && t.dim() >= 2 && viewable) {
        // A single column: rows are ld apart only if the strides say so; be conservative.
        viewable = t.is_contiguous();
        ld = 1;
    }
    const ::at::Tensor& source = viewable ? t : (keep = t.contiguous());
    if (!viewable) ld = cols;
    return {const_cast<T*>(source.template data_ptr<T>()), rows, cols, ld};
}

/// What SubspaceAdamW needs of a compressed weight: its projection and the layer's update counter. The
/// Linear module that owns the weight registers one; the optimizer finds it from the weight tensor.
class compressed_weight {
public:
    virtual ~compressed_weight() = default;
    virtual bool subspace() const = 0;      ///< the gradient is G_sub (m, r)
    virtual bool identity() const = 0;      ///< P = I (rank::full): the plain AdamW path
    virtual int64_t rank() const = 0;       ///< gradient columns: r, or n
    virtual std::uint64_t updates() const = 0;
    virtual void set_updates(std::uint64_t) = 0;
    /// P (n, r) of `epoch`, in dtype, on the weight's device.
    virtual ::at::Tensor projection(std::uint64_t epoch, ::at::ScalarType dtype) const = 0;
    virtual std::string describe() const = 0;

    // The gradient record, written by backward, read and cleared by the optimizer.
    bool grad_written = false;
    std::uint64_t grad_epoch = 0;
    int64_t grad_version_after_step = -1; ///< weight.grad's version when the last step consumed it
};

struct weight_registry {
    std::mutex mutex;
    std::unordered_map<const c10::TensorImpl*, std::weak_ptr<compressed_weight>> map;
};

inline weight_registry& registry()
{
    static weight_registry r;
    return r;
}

inline void register_weight(const ::at::Tensor& w, const std::shared_ptr<compressed_weight>& info)
{
    auto& r = registry();
    std::lock_guard<std::mutex> lock(r.mutex);
    for (auto it = r.map.begin(); it != r.map.end();) it = it->second.expired() ? r.map.erase(it) : std::next(it);
    r.map[w.unsafeGetTensorImpl()] = info;
}

/// The compressed-weight record of w, or null for an ordinary parameter.
inline std::shared_ptr<compressed_weight> find_weight(const ::at::Tensor& w)
{
    auto& r = registry();
    std::lock_guard<std::mutex> lock(r.mutex);
    const auto it = r.map.find(w.unsafeGetTensorImpl());
    return it == r.map.end() ? nullptr : it->second.lock();
}

/// Layer ids for layers whose options name none: unique in the process, counting from 2^32 so that they
/// never meet the small ids users number their layers with.
inline std::uint64_t next_layer_id()
{
    static std::atomic<std::uint64_t> next{std::uint64_t{1} << 32};
    return next.fetch_add(1);
}

/// Set while torch/saved_bytes.hpp walks a graph: a saved tensor compact encoded (torch/saved_tensors.hpp)
/// then unpacks as its encoding (a float tensor over its bytes), so that the walk counts what is kept
/// rather than a decoded copy.
inline bool& walking_graph()
{
    thread_local bool walking = false;
    return walking;
}

/// A node of ours reports what it keeps for backward (the graph walk in torch/saved_bytes.hpp asks).
struct reports_saved {
    virtual ~reports_saved() = default;
    virtual std::vector<::at::Tensor> saved_tensors() const = 0;
};

} // namespace detail
} // namespace torch
COMPACT_NAMESPACE_END
