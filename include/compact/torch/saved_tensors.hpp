// compact/torch/saved_tensors.hpp: every tensor autograd saves for backward, compressed through compact's
// activation stores (SPEC section 5) while a scope is open; the bits per tensor fixed or picked by GACT's
// allocator.
//
//   compact::torch::SavedTensors saves(compact::torch::SavedTensorsOptions(compact::store_scheme::quantized(4)));
//   torch::Tensor loss;
//   {
//       auto scope = saves.scope(step);     // this thread's saved tensors go through the stores
//       loss = model->forward(x);           // GELU keeps int4 codes of its input, softmax of its output, ...
//   }
//   loss.backward();                        // each is decoded when its node's backward runs, then freed
//
// How: torch::autograd::SavedVariableHooks are the mechanism under torch's save_on_cpu and
// saved_tensors_hooks. libtorch gives them to every SavedVariable created while the autograd engine's
// get_default_saved_variable_hooks() returns some; its own engine returns none (Python's engine returns
// Python's). The first scope installs, once per process, an engine that is torch's own in every other
// respect and returns compact's hooks while a scope is open on the calling thread. A process where
// Python's engine is installed (a Python extension) is refused with an error: use Python's
// torch.autograd.graph.saved_tensors_hooks there.
//
// What is compressed: floating-point (float, double) CPU tensors with at least min_numel values that
// autograd created (non-leaf). Leaves (parameters, the input batch) stay referenced as they are: the
// caller holds them anyway, so a copy would add memory rather than save it. Integer tensors (indices,
// masks) and small tensors are kept too. A tensor saved by several nodes (h in h * h) is encoded once.
// compact's own modules (Linear, ReLU, Dropout, GELU, SiLU) keep their compressed records themselves
// and are not affected.
//
// Slots: the i-th distinct tensor encoded under a scope is slot i; a slot keeps its settings (scheme and
// noise variant) from step to step, so a bit allocator can give each its own width (GACT):
//
//   compact::bit_allocator alloc(compact::allocation_options{2.0}, compact::sensitivity_method::gact,
//                                compact::allocation_schedule::every(500));
//   saves.register_with(alloc);             // after one forward under a scope: every slot, by size
//   alloc.update(step, [&](compact::gradient_probe& probe) {
//       model->zero_grad();
//       { auto s = saves.scope(step); loss = model->forward(x); }
//       loss.backward();
//       compact::torch::add_gradients(probe, model->parameters());
//   });
//
// The noise of slot i is keyed by (seed, this object's id, i, step, variant): a rerun under the same
// step encodes every other slot identically, as the allocator's probes need, and a run repeats bit for
// bit. Errors throw compact::error naming the function and the argument.
#pragma once

#include "compact/backend/cpu/cpu.hpp"
#include "compact/backend/store_scheme.hpp"
#include "compact/compress/activation_store.hpp"
#include "compact/compress/sensitivity.hpp"
#include "compact/core/config.hpp"
#include "compact/core/error.hpp"
#include "compact/torch/detail/encoded.hpp"
#include "compact/torch/detail/tensor.hpp"

#include <torch/csrc/autograd/engine.h>
#include <torch/csrc/autograd/saved_variable_hooks.h>
#include <torch/torch.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

COMPACT_NAMESPACE_BEGIN
namespace torch {

struct SavedTensorsOptions {
    SavedTensorsOptions(store_scheme scheme = store_scheme::quantized(8)) // NOLINT(google-explicit-constructor)
        : scheme_(scheme)
    {
    }
    /// The scheme every slot starts with (a bit allocator may change each).
    TORCH_ARG(store_scheme, scheme);
    /// Tensors with fewer values are kept as they are.
    TORCH_ARG(int64_t, min_numel) = 1024;
    /// The run's seed (the rounding noise).
    TORCH_ARG(std::uint64_t, seed) = 0;
};

namespace detail {

/// The state a SavedTensors object shares with the hooks of the graphs it packed (a graph may outlive it).
struct saved_tensors_state {
    struct slot {
        store_settings settings;
        int64_t numel = 0;
        ::at::ScalarType dtype = ::at::kFloat;
    };
    SavedTensorsOptions options;
    std::uint64_t id = 0;
    std::mutex mutex;         // slots: scopes on several threads may add to them
    std::deque<slot> slots;   // a deque: the allocator keeps references to the settings
    std::atomic<std::size_t> live_bytes{0};
    std::atomic<std::size_t> live_original_bytes{0};
};

/// One saved tensor: the tensor itself (kept as is), or its encoding.
struct saved_packet {
    ::at::Tensor original;  // kept as is
    encoded_tensor encoded; // or encoded
    std::shared_ptr<saved_tensors_state> owner;
    std::size_t original_bytes = 0;

    saved_packet() = default;
    saved_packet(const saved_packet&) = delete;
    saved_packet& operator=(const saved_packet&) = delete;
    ~saved_packet()
    {
        if (owner && encoded.defined()) {
            owner->live_bytes -= static_cast<std::size_t>(encoded.bytes.numel());
            owner->live_original_bytes -= original_bytes;
        }
    }
};

/// The open scope of this thread: the state it packs into, its step, and the tensors packed so far.
struct saved_scope {
    std::shared_ptr<saved_tensors_state> state;
    std::uint64_t step = 0;
    std::size_t next_slot = 0;
    // The tensors encoded in this scope, so that one saved by several nodes is encoded once. The weak
    // reference keeps the TensorImpl's address from being reused by another tensor (not its storage).
    struct seen {
        c10::weak_intrusive_ptr<c10::TensorImpl> impl;
        int64_t version = 0;
        std::weak_ptr<saved_packet> packet;
    };
    std::unordered_map<const c10::TensorImpl*, seen> packed;

    std::shared_ptr<saved_packet> pack(const ::at::Tensor& x)
    {
        auto p = std::make_shared<saved_packet>();
        const SavedTensorsOptions& o = state->options;
        const bool floating = x.scalar_type() == ::at::kFloat || x.scalar_type() == ::at::kDouble;
        if (x.is_leaf() || !floating || !x.device().is_cpu() || x.numel() < o.min_numel() || x.is_sparse()) {
            p->original = x;
            return p;
        }
        const c10::TensorImpl* impl = x.unsafeGetTensorImpl();
        if (const auto it = packed.find(impl); it != packed.end() && it->second.version == x._version())
            if (auto q = it->second.packet.lock()) return q;
        store_settings settings;
        std::size_t slot = 0;
        {
            std::lock_guard<std::mutex> lock(state->mutex);
            slot = next_slot++;
            if (slot == state->slots.size())
                state->slots.push_back(saved_tensors_state::slot{store_settings{o.scheme(), 0}, x.numel(), x.scalar_type()});
            settings = state->slots[slot].settings;
        }
        // A distinct noise stream per (object, slot).
        const std::uint64_t tensor = state->id * 0x9E3779B97F4A7C15ull + slot;
        p->encoded = encode(x, settings, o.seed(), tensor, step);
        p->original_bytes = static_cast<std::size_t>(x.numel()) * x.element_size();
        p->owner = state;
        state->live_bytes += static_cast<std::size_t>(p->encoded.bytes.numel());
        state->live_original_bytes += p->original_bytes;
        packed.insert_or_assign(impl, seen{c10::weak_intrusive_ptr<c10::TensorImpl>(x.getIntrusivePtr()),
                                           x._version(), p});
        return p;
    }
};

inline saved_scope*& current_scope()
{
    thread_local saved_scope* scope = nullptr;
    return scope;
}

struct store_hooks : ::torch::autograd::SavedVariableHooks {
    explicit store_hooks(saved_scope* s) : scope(s) {}
    void call_pack_hook(const ::at::Tensor& x) override
    {
        packet = scope->pack(x);
        scope = nullptr;
    }
    ::at::Tensor call_unpack_hook() override
    {
        const saved_packet& p = *packet;
        if (!p.encoded.defined()) return p.original;
        if (walking_graph()) return p.encoded.bytes.view(::at::kFloat);
        return decode(p.encoded);
    }
    saved_scope* scope;
    std::shared_ptr<saved_packet> packet;
};

/// torch's autograd engine, but with compact's hooks for the SavedVariables created under a scope.
struct hooks_engine : ::torch::autograd::Engine {
    std::unique_ptr<::torch::autograd::SavedVariableHooks> get_default_saved_variable_hooks() override
    {
        saved_scope* s = current_scope();
        if (!s) return nullptr;
        return std::make_unique<store_hooks>(s);
    }
};

inline ::torch::autograd::Engine& hooks_engine_instance()
{
    // Never destroyed: autograd may run from other static destructors (as torch's own engines, it lives
    // for the whole process).
    static hooks_engine* engine = new hooks_engine();
    return *engine;
}

/// Makes hooks_engine the default engine, once; refuses where another engine than torch's own is set.
inline void install_hooks_engine()
{
    static std::once_flag once;
    std::call_once(once, [] {
        namespace ag = ::torch::autograd;
        COMPACT_REQUIRE(&ag::Engine::get_default_engine() == &ag::Engine::get_base_engine(),
                        "compact::torch::SavedTensors",
                        "another autograd engine than libtorch's own is installed (Python's?): compact's "
                        "saved-tensor scope works in C++ programs; in Python use "
                        "torch.autograd.graph.saved_tensors_hooks");
        ag::set_default_engine_stub(&hooks_engine_instance);
    });
    COMPACT_REQUIRE(&::torch::autograd::Engine::get_default_engine() == &hooks_engine_instance(),
                    "compact::torch::SavedTensors", "the default autograd engine was replaced after compact installed its own");
}

} // namespace detail

/// Compresses what autograd saves while one of its scopes is open (see the top of this file).
class SavedTensors {
public:
    explicit SavedTensors(const SavedTensorsOptions& options = {}) : state_(std::make_shared<detail::saved_tensors_state>())
    {
        compact::detail::check_scheme(options.scheme(), "compact::torch::SavedTensors");
        COMPACT_REQUIRE(options.min_numel() >= 1, "compact::torch::SavedTensors", "min_numel=", options.min_numel(),
                        " must be at least 1");
        state_->options = options;
        state_->id = detail::next_layer_id();
        detail::install_hooks_engine();
    }

    /// While alive, the SavedVariables this thread creates go through the stores, with `step`'s noise.
    /// Scopes nest (the inner one wins until it closes); a scope belongs to the thread that opened it.
    class Scope {
    public:
        Scope(const Scope&) = delete;
        Scope& operator=(const Scope&) = delete;
        Scope(Scope&& other) noexcept : scope_(std::move(other.scope_)), previous_(other.previous_)
        {
            other.previous_ = nullptr;
        }
        ~Scope()
        {
            if (scope_) detail::current_scope() = previous_;
        }

    private:
        friend class SavedTensors;
        Scope(const std::shared_ptr<detail::saved_tensors_state>& state, std::uint64_t step)
            : scope_(std::make_unique<detail::saved_scope>())
        {
            compact::detail::check_noise_key({state->options.seed(), 0, step, 0}, "compact::torch::SavedTensors::scope");
            scope_->state = state;
            scope_->step = step;
            previous_ = detail::current_scope();
            detail::current_scope() = scope_.get();
        }
        std::unique_ptr<detail::saved_scope> scope_;
        detail::saved_scope* previous_ = nullptr;
    };

    /// Opens a scope on this thread; `step` keys the noise (the update count; below 2^32).
    [[nodiscard]] Scope scope(std::uint64_t step) { return Scope(state_, step); }

    /// Distinct tensors encoded under one scope so far (the largest count over the scopes opened).
    std::size_t slots() const
    {
        std::lock_guard<std::mutex> lock(state_->mutex);
        return state_->slots.size();
    }
    /// Slot i's scheme and noise variant, which a bit allocator adjusts.
    store_settings& settings(std::size_t i)
    {
        std::lock_guard<std::mutex> lock(state_->mutex);
        COMPACT_REQUIRE(i < state_->slots.size(), "compact::torch::SavedTensors::settings", "slot ", i, " of ",
                        state_->slots.size());
        return state_->slots[i].settings;
    }
    /// Values slot i held when first seen.
    int64_t numel(std::size_t i) const
    {
        std::lock_guard<std::mutex> lock(state_->mutex);
        COMPACT_REQUIRE(i < state_->slots.size(), "compact::torch::SavedTensors::numel", "slot ", i, " of ",
                        state_->slots.size());
        return state_->slots[i].numel;
    }
    /// Registers every slot (settings and size) with a bit allocator; call once, after a forward under a
    /// scope has seen every slot.
    void register_with(bit_allocator& allocator)
    {
        std::lock_guard<std::mutex> lock(state_->mutex);
        COMPACT_REQUIRE(!state_->slots.empty(), "compact::torch::SavedTensors::register_with",
                        "no slot yet: run one forward under a scope first");
        for (auto& s : state_->slots) allocator.add(s.settings, s.numel);
    }

    /// Bytes of encodings alive now (graphs not yet run backward), and the bytes of the tensors they
    /// stand for.
    std::size_t live_bytes() const noexcept { return state_->live_bytes.load(); }
    std::size_t live_original_bytes() const noexcept { return state_->live_original_bytes.load(); }
    const SavedTensorsOptions& options() const noexcept { return state_->options; }

private:
    std::shared_ptr<detail::saved_tensors_state> state_;
};

/// Adds every parameter's gradient to a sensitivity probe, in order (the rerun of a bit allocator's
/// probe; see compress/sensitivity.hpp). A parameter without a gradient adds nothing, on every probe alike.
inline void add_gradients(gradient_probe& probe, const std::vector<::at::Tensor>& parameters)
{
    for (const auto& p : parameters) {
        const ::at::Tensor g = p.grad();
        if (!g.defined()) continue;
        const ::at::Tensor c = g.to(::at::kCPU).contiguous();
        COMPACT_REQUIRE(c.scalar_type() == ::at::kFloat || c.scalar_type() == ::at::kDouble,
                        "compact::torch::add_gradients", "a gradient has dtype ", c.scalar_type(),
                        ": float or double expected");
        if (c.scalar_type() == ::at::kDouble) probe.add(c.data_ptr<double>(), static_cast<std::size_t>(c.numel()));
        else probe.add(c.data_ptr<float>(), static_cast<std::size_t>(c.numel()));
    }
}

} // namespace torch
COMPACT_NAMESPACE_END
