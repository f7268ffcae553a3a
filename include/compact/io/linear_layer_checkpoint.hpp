// compact/io/linear_layer_checkpoint.hpp: save and restore a linear_layer's training state, bit-exactly.
//
// What a run needs to continue exactly where it stopped (SPEC section 6), as sections of a checkpoint
// (io/checkpoint.hpp) named "<prefix>/<field>":
//
//   field            dtype    shape     what
//   in, out, rank    u64      ()        n, m, r
//   distribution     u64      ()        P's distribution (core/projection.hpp: 0 gaussian, 1 rademacher,
//                                       2 identity)
//   seed, layer_id   u64      ()        P's key, with the epoch below (SPEC section 1)
//   moment_policy    u64      ()        0 keep, 1 reset, 2 transfer
//   resample_gap     u64      ()        T (0: one P for the whole run)
//   keep_projection  u64      ()        0 or 1
//   has_bias         u64      ()        0 or 1
//   updates          u64      ()        completed updates: P's epoch is updates / T
//   weight_step      u64      ()        t of W's subspace AdamW
//   weight_epoch     u64      ()        the epoch of P that W's moments belong to
//   bias_step        u64      ()        t of b's AdamW
//   bias_epoch       u64      ()        (unused by plain AdamW; kept so the counters round-trip)
//   weight           Scalar   (m, n)    W               } absent with weight_storage::caller
//   bias             Scalar   (m)       b (with bias)   }
//   weight_m         State    (m, r)    M of W
//   weight_v         State    (m, r)    V of W
//   bias_m, bias_v   State    (m)       M, V of b (with bias)
//   master_weight    State    (m, n)    } the master copies of W and b, for layers with master weights
//   master_bias      State    (m)       } whose master holds the state (master_valid()); b's with bias
//   store_kind       u64      ()        } for layers with the quantized policy only: the store's scheme
//   store_bits       u64      ()        } (compress/scheme.hpp: kind 0 full, 1 quantized, 2 average), so
//   store_group      u64      ()        } a resumed run encodes X as the saved one did; loading sets it
//
// The enum codes are part of the format: they never change meaning. P is not stored: it is regenerated
// from (seed, layer_id, epoch), which is what makes the restored moments belong to the right subspace.
//
//   compact::save_checkpoint("run.ckpt", fc1, fc2);   // atomic; sections "layers/0/...", "layers/1/..."
//   compact::load_checkpoint("run.ckpt", fc1, fc2);   // all validated, then all copied
//
// or, to put other state in the same file, the writer and reader directly:
//
//   compact::checkpoint_writer w;
//   compact::save_state(w, "fc1", fc1);
//   w.add("embedding", embedding_view);               // the caller's own parameters
//   w.write(path);
//   auto r = compact::checkpoint_reader::read_file(path);
//   compact::check_state(r, "fc1", fc1);              // throws, touching nothing, on any mismatch
//   r.expect<float>("embedding", {rows, cols});       // std::uint64_t extents
//   compact::load_state(r, "fc1", fc1);               // cannot fail after the checks above
//   r.read("embedding", embedding_view);
//
// Loading demands that the layer was built like the saved one: same shape, rank, scalar and moment
// types, distribution, seed, layer id, moment policy, resampling gap, keep_projection and bias, so that
// training continues bit-for-bit as if it had never stopped (with the same thread count: SPEC
// section 6). max_rows (the largest micro-batch) may differ. A mismatch is a compact::error naming the
// section and both values, raised before the layer is touched.
//
// State is saved between steps: save_state refuses a layer holding a gradient that no step has used
// yet. Loading discards any pending gradient or saved activation of the target layer.
//
// Master weights (linear_options::master_weights) are saved whatever the weight_storage, as they are
// the training state the caller cannot rebuild from W. A layer with master weights loading a
// checkpoint without them (saved before its first step, from a layer without master weights, or by an
// older version) takes its master from the loaded W and b at its next step: training continues, from
// the rounded weights. A checkpoint with master sections is refused by a layer without master weights,
// which would drop them silently; build it with master_weights = true to continue that run.
//
// Backends: the layer's buffers are read and written in place, so this works for backends whose memory
// the host can address: the CPU backend, and any backend that declares
// `static constexpr bool host_memory = true;`.
#pragma once

#include "compact/backend/cpu/cpu.hpp"
#include "compact/core/config.hpp"
#include "compact/compress/scheme.hpp"
#include "compact/core/error.hpp"
#include "compact/core/matrix_view.hpp"
#include "compact/io/checkpoint.hpp"
#include "compact/nn/linear_layer.hpp"
#include "compact/optim/adamw.hpp"

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

COMPACT_NAMESPACE_BEGIN

/// Whether save_state/load_state store a layer's W and b, or the caller stores them elsewhere (then
/// the checkpoint holds only the optimizer state, counters and configuration).
enum class weight_storage : unsigned char {
    checkpoint, ///< W and b are sections of the checkpoint (default)
    caller,     ///< the caller saves and restores W and b itself
};

namespace detail {

template <class B, class = void>
struct declares_host_memory : std::false_type {};
template <class B>
struct declares_host_memory<B, std::void_t<decltype(B::host_memory)>> : std::bool_constant<B::host_memory> {};

template <class Backend>
inline constexpr bool host_addressable_backend = std::is_same_v<Backend, cpu> || declares_host_memory<Backend>::value;

inline std::string layer_section(std::string_view prefix, const char* field)
{
    return std::string(prefix) + "/" + field;
}

/// The configuration fields, in file order, with the layer's values.
template <class Scalar, class Policy, class Backend, class State>
std::vector<std::pair<const char*, std::uint64_t>> layer_config(const linear_layer<Scalar, Policy, Backend, State>& l)
{
    const linear_options& o = l.options();
    return {{"in", static_cast<std::uint64_t>(l.in())},
            {"out", static_cast<std::uint64_t>(l.out())},
            {"rank", static_cast<std::uint64_t>(l.rank())},
            {"distribution", static_cast<std::uint64_t>(l.layer().projection().dist())},
            {"seed", o.seed},
            {"layer_id", o.layer},
            {"moment_policy", static_cast<std::uint64_t>(o.moments)},
            {"resample_gap", o.resample.gap},
            {"keep_projection", o.keep_projection ? 1u : 0u},
            {"has_bias", o.bias ? 1u : 0u}};
}

/// Every field save_state may write.
inline constexpr const char* layer_fields[] = {
    "in",          "out",         "rank",      "distribution", "seed",      "layer_id",     "moment_policy",
    "resample_gap", "keep_projection", "has_bias", "updates",      "weight_step", "weight_epoch", "bias_step",
    "bias_epoch",  "weight",      "weight_m",  "weight_v",     "bias_m",    "bias_v",      "store_kind",
    "store_bits",  "store_group", "master_weight", "master_bias"};

inline void check_prefix(std::string_view prefix, const char* where)
{
    // The longest field name is 15 characters, plus the slash.
    COMPACT_REQUIRE(!prefix.empty() && prefix.size() + 16 <= checkpoint_max_name && printable_name(prefix), where,
                    "prefix '", prefix, "' must be 1 to ", checkpoint_max_name - 16, " printable ASCII characters");
}

/// A layer's validated state in a reader: its tensor sections (null where not needed) and counters.
struct layer_tensor_sections {
    const checkpoint_section *weight = nullptr, *bias = nullptr, *weight_m = nullptr, *weight_v = nullptr,
                             *bias_m = nullptr, *bias_v = nullptr, *master_weight = nullptr,
                             *master_bias = nullptr;
    std::uint64_t updates = 0;
    adam_counters weight_counters{}, bias_counters{};
    store_scheme scheme{}; ///< the store's scheme, for layers with the quantized policy
};

template <class Scalar, class Policy, class Backend, class State>
layer_tensor_sections validate_layer_state(const checkpoint_reader& r, std::string_view prefix,
                                           const linear_layer<Scalar, Policy, Backend, State>& layer,
                                           weight_storage weights)
{
    constexpr const char* where = "load_state";
    check_prefix(prefix, where);
    auto name = [&](const char* field) { return layer_section(prefix, field); };
    const auto m = static_cast<std::uint64_t>(layer.out()), n = static_cast<std::uint64_t>(layer.in()),
               rk = static_cast<std::uint64_t>(layer.rank());
    const bool bias = layer.options().bias;

    // has_bias decides which tensors exist; their dtype and shape then say most plainly what differs
    // (n, m, r, Scalar, State); the other fields follow.
    const auto check_field = [&](const char* field, std::uint64_t value) {
        const std::uint64_t saved = r.scalar<std::uint64_t>(name(field));
        COMPACT_REQUIRE(saved == value, where, "'", r.source(), "': section '", name(field), "' is ", saved,
                        " in the checkpoint but ", value, " in the layer: it was saved from a differently "
                        "configured layer");
    };
    check_field("has_bias", bias ? 1 : 0);
    layer_tensor_sections t;
    if (weights == weight_storage::checkpoint) {
        t.weight = &r.expect<Scalar>(name("weight"), {m, n});
        if (bias) t.bias = &r.expect<Scalar>(name("bias"), {m});
    }
    t.weight_m = &r.expect<State>(name("weight_m"), {m, rk});
    t.weight_v = &r.expect<State>(name("weight_v"), {m, rk});
    if (bias) {
        t.bias_m = &r.expect<State>(name("bias_m"), {m});
        t.bias_v = &r.expect<State>(name("bias_v"), {m});
    }
    if (r.contains(name("master_weight"))) {
        COMPACT_REQUIRE(layer.options().master_weights, where, "'", r.source(), "': section '", name("master_weight"),
                        "' holds master weights but the layer was built without options.master_weights (loading "
                        "would drop them)");
        t.master_weight = &r.expect<State>(name("master_weight"), {m, n});
        if (bias) t.master_bias = &r.expect<State>(name("master_bias"), {m});
    }

    for (const auto& [field, value] : layer_config(layer)) check_field(field, value);

    t.updates = r.scalar<std::uint64_t>(name("updates"));
    t.weight_counters = {r.scalar<std::uint64_t>(name("weight_step")), r.scalar<std::uint64_t>(name("weight_epoch"))};
    t.bias_counters = {r.scalar<std::uint64_t>(name("bias_step")), r.scalar<std::uint64_t>(name("bias_epoch"))};
    const std::uint64_t epoch = layer.options().resample.epoch(t.updates);
    COMPACT_REQUIRE(epoch < static_cast<std::uint64_t>(max_counter_word), where, "'", r.source(), "': section '",
                    name("updates"), "' is ", t.updates, ", epoch ", epoch, " (at most 2^32 - 1)");
    COMPACT_REQUIRE(t.weight_counters.step <= t.updates && t.bias_counters.step <= t.updates &&
                        t.weight_counters.epoch <= epoch,
                    where, "'", r.source(), "': counters under '", prefix, "' are inconsistent: weight_step=",
                    t.weight_counters.step, ", weight_epoch=", t.weight_counters.epoch, ", bias_step=",
                    t.bias_counters.step, " cannot follow updates=", t.updates, " (epoch ", epoch, ")");
    if constexpr (linear_layer<Scalar, Policy, Backend, State>::stores_input) {
        const auto kind = r.scalar<std::uint64_t>(name("store_kind")), bits = r.scalar<std::uint64_t>(name("store_bits")),
                   group = r.scalar<std::uint64_t>(name("store_group"));
        COMPACT_REQUIRE(kind <= 2 && bits <= 8 && group <= static_cast<std::uint64_t>(max_store_group), where, "'",
                        r.source(), "': the store scheme under '", prefix, "' (kind ", kind, ", bits ", bits,
                        ", group ", group, ") is not one compact writes");
        t.scheme = {static_cast<store_kind>(kind), static_cast<int>(bits), static_cast<index_t>(group)};
        check_scheme(t.scheme, where);
    }
    return t;
}

} // namespace detail

#define COMPACT_CHECK_HOST_BACKEND(B)                                                                      \
    static_assert(::compact::detail::host_addressable_backend<B>,                                          \
                  "compact: checkpoints of a linear_layer need host-addressable buffers (the cpu backend, or "  \
                  "a backend declaring `static constexpr bool host_memory = true`)")

/// Adds `layer`'s state under "<prefix>/..." to `w` (the table above). The layer must be between steps.
/// Its checks (prefix, no pending gradient, no name already in w) come first; w then only grows.
template <class Scalar, class Policy, class Backend, class State>
void save_state(checkpoint_writer& w, std::string_view prefix,
                const linear_layer<Scalar, Policy, Backend, State>& layer,
                weight_storage weights = weight_storage::checkpoint)
{
    COMPACT_CHECK_HOST_BACKEND(Backend);
    constexpr const char* where = "save_state";
    detail::check_prefix(prefix, where);
    COMPACT_REQUIRE(!layer.gradient_pending(), where, "layer '", prefix,
                    "' holds a gradient that no step has used; save before backward or after step");
    auto name = [&](const char* field) { return detail::layer_section(prefix, field); };
    const index_t m = layer.out();
    for (const char* field : detail::layer_fields)
        COMPACT_REQUIRE(!w.contains(name(field)), where, "section '", name(field), "' was already added");

    for (const auto& [field, value] : detail::layer_config(layer)) w.add_scalar<std::uint64_t>(name(field), value);
    w.add_scalar<std::uint64_t>(name("updates"), layer.updates());
    w.add_scalar<std::uint64_t>(name("weight_step"), layer.counters().step);
    w.add_scalar<std::uint64_t>(name("weight_epoch"), layer.counters().epoch);
    w.add_scalar<std::uint64_t>(name("bias_step"), layer.bias_counters().step);
    w.add_scalar<std::uint64_t>(name("bias_epoch"), layer.bias_counters().epoch);
    if (weights == weight_storage::checkpoint) {
        w.add(name("weight"), layer.weight());
        if (layer.bias()) w.add(name("bias"), layer.bias(), {static_cast<std::uint64_t>(m)});
    }
    w.add(name("weight_m"), layer.first_moment());
    w.add(name("weight_v"), layer.second_moment());
    if (layer.bias()) {
        w.add(name("bias_m"), layer.bias_first_moment(), {static_cast<std::uint64_t>(m)});
        w.add(name("bias_v"), layer.bias_second_moment(), {static_cast<std::uint64_t>(m)});
    }
    // Before its first step a layer's master is not yet taken from W: the loaded layer then takes it
    // from the loaded W, exactly as this one will.
    if (layer.master_valid()) {
        w.add(name("master_weight"), layer.master_weight());
        if (layer.bias()) w.add(name("master_bias"), layer.master_bias(), {static_cast<std::uint64_t>(m)});
    }
    if constexpr (linear_layer<Scalar, Policy, Backend, State>::stores_input) {
        w.add_scalar<std::uint64_t>(name("store_kind"), static_cast<std::uint64_t>(layer.scheme().kind));
        w.add_scalar<std::uint64_t>(name("store_bits"), static_cast<std::uint64_t>(layer.scheme().bits));
        w.add_scalar<std::uint64_t>(name("store_group"), static_cast<std::uint64_t>(layer.scheme().group));
    }
}

/// Checks that "<prefix>/..." of `r` is a complete state that `layer` can take (see the top of this
/// header); raises compact::error naming the section otherwise. Changes nothing.
template <class Scalar, class Policy, class Backend, class State>
void check_state(const checkpoint_reader& r, std::string_view prefix,
                 const linear_layer<Scalar, Policy, Backend, State>& layer,
                 weight_storage weights = weight_storage::checkpoint)
{
    COMPACT_CHECK_HOST_BACKEND(Backend);
    detail::validate_layer_state(r, prefix, layer, weights);
}

/// Restores `layer` from "<prefix>/..." of `r`: check_state first, then the copies, so on any error the
/// layer is unchanged. Afterwards the layer continues as the saved one would have.
template <class Scalar, class Policy, class Backend, class State>
void load_state(const checkpoint_reader& r, std::string_view prefix,
                linear_layer<Scalar, Policy, Backend, State>& layer,
                weight_storage weights = weight_storage::checkpoint)
{
    COMPACT_CHECK_HOST_BACKEND(Backend);
    const detail::layer_tensor_sections t = detail::validate_layer_state(r, prefix, layer, weights);
    const auto m = static_cast<std::uint64_t>(layer.out());
    const std::uint64_t mr = m * static_cast<std::uint64_t>(layer.rank());
    if (t.weight) r.copy(*t.weight, layer.weight().data, m * static_cast<std::uint64_t>(layer.in()));
    if (t.bias) r.copy(*t.bias, layer.bias(), m);
    r.copy(*t.weight_m, layer.first_moment().data, mr);
    r.copy(*t.weight_v, layer.second_moment().data, mr);
    if (t.bias_m) r.copy(*t.bias_m, layer.bias_first_moment(), m);
    if (t.bias_v) r.copy(*t.bias_v, layer.bias_second_moment(), m);
    if (t.master_weight) r.copy(*t.master_weight, layer.master_weight().data, m * static_cast<std::uint64_t>(layer.in()));
    if (t.master_bias) r.copy(*t.master_bias, layer.master_bias(), m);
    if constexpr (linear_layer<Scalar, Policy, Backend, State>::stores_input) layer.set_scheme(t.scheme);
    layer.restore_counters(t.updates, t.weight_counters, t.bias_counters, t.master_weight != nullptr);
}

namespace detail {

inline std::string checkpoint_layer_prefix(std::size_t i) { return "layers/" + std::to_string(i); }

} // namespace detail

/// Saves the state of `layers` (in this order, as "layers/0", "layers/1", ...) to `path` atomically.
template <class... Layers>
void save_checkpoint(const std::string& path, const Layers&... layers)
{
    static_assert(sizeof...(Layers) > 0, "compact::save_checkpoint: no layers given");
    checkpoint_writer w;
    w.add_scalar<std::uint64_t>("layers/count", sizeof...(Layers));
    std::size_t i = 0;
    (save_state(w, detail::checkpoint_layer_prefix(i++), layers), ...);
    w.write(path);
}

/// Restores `layers` from a file written by save_checkpoint with the same layers in the same order.
/// Reads and validates the whole file and every layer's state before it changes any layer.
template <class... Layers>
void load_checkpoint(const std::string& path, Layers&... layers)
{
    static_assert(sizeof...(Layers) > 0, "compact::load_checkpoint: no layers given");
    const checkpoint_reader r = checkpoint_reader::read_file(path);
    const auto saved = r.scalar<std::uint64_t>("layers/count");
    COMPACT_REQUIRE(saved == sizeof...(Layers), "load_checkpoint", "'", path, "': holds ", saved, " layers but ",
                    sizeof...(Layers), " were given");
    std::size_t i = 0;
    (check_state(r, detail::checkpoint_layer_prefix(i++), layers), ...);
    i = 0;
    (load_state(r, detail::checkpoint_layer_prefix(i++), layers), ...);
}

COMPACT_NAMESPACE_END
