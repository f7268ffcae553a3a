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
