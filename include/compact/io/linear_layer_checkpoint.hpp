// compact/io/linear_layer_checkpoint.hpp: save and restore a linear_layer's training state, bit-exactly.
//
// What a run needs to continue exactly where it stopped (SPEC section 6), as sections of a checkpoint
// (io/checkpoint.hpp) named "<prefix>/<field>":
//
//   field            dtype    shape     what
//   compressor       u8       (k)       the compressor's name (compress/compressor.hpp), e.g.
//                                       "random_projection" or "activation_store"
//   in, out, rank    u64      ()        n, m and the gradient's columns (r, or n for a full-shape one)
//   seed, layer_id   u64      ()        the compressor's key, with the epoch below (SPEC section 1)
//   moment_policy    u64      ()        0 keep, 1 reset, 2 transfer
//   resample_gap     u64      ()        T (0: one P for the whole run)
//   keep_projection  u64      ()        0 or 1
//   has_bias         u64      ()        0 or 1
//   updates          u64      ()        completed updates: P's epoch is updates / T
//   weight_step      u64      ()        t of W's (subspace) AdamW
//   weight_epoch     u64      ()        the epoch of P that W's moments belong to
//   bias_step        u64      ()        t of b's AdamW
//   bias_epoch       u64      ()        (unused by plain AdamW; kept so the counters round-trip)
//   weight           Scalar   (m, n)    W               } absent with weight_storage::caller
//   bias             Scalar   (m)       b (with bias)   }
//   weight_m         State    (m, rank) M of W
//   weight_v         State    (m, rank) V of W
//   bias_m, bias_v   State    (m)       M, V of b (with bias)
//   master_weight    State    (m, n)    } the master copies of W and b, for layers with master weights
//   master_bias      State    (m)       } whose master holds the state (master_valid()); b's with bias
//   <field>          u64      ()        each of the compressor's checkpoint_fields(): configuration
//                                       (the random projection's "distribution": 0 gaussian,
//                                       1 rademacher, 2 identity) that must match, and state (a store's
//                                       "store_kind", "store_bits", "store_group") that loading sets
//   comp_state       u8       (bytes)   the compressor's persistent state (compress/compressor.hpp:
//                                       VeLoRA's v, WTA-CRS's row norms), its bytes verbatim; absent for
//                                       a compressor without state. Its size must match the loading
//                                       layer's compressor_state_bytes() (for WTA-CRS, which keeps a norm
//                                       per row, build the loading layer with the same max_rows)
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
// Loading demands that the layer was built like the saved one: same compressor, shape, rank, scalar and
// moment types, compressor configuration, seed, layer id, moment policy, resampling gap, keep_projection
// and bias, so that
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
// Loaded values are checked before anything is written: moments and weights finite, V non-negative, and
// counters a run can reach.
//
// Backends: any. The layer's buffers are copied through the backend's copy_to_host / copy_from_host
// primitives (backend/backend.hpp) on the given context, so a CUDA layer saves and loads like a CPU one.
#pragma once

#include "compact/compress/compressor.hpp"
#include "compact/core/config.hpp"
#include "compact/core/error.hpp"
#include "compact/core/matrix_view.hpp"
#include "compact/io/checkpoint.hpp"
#include "compact/nn/linear_layer.hpp"
#include "compact/optim/adamw.hpp"

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
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

inline std::string layer_section(std::string_view prefix, const char* field)
{
    return std::string(prefix) + "/" + field;
}

/// The layer-level configuration fields, in file order, with the layer's values.
template <class Scalar, class Policy, class Backend, class State>
std::vector<std::pair<const char*, std::uint64_t>> layer_config(const linear_layer<Scalar, Policy, Backend, State>& l)
{
    const linear_options& o = l.options();
    return {{"in", static_cast<std::uint64_t>(l.in())},
            {"out", static_cast<std::uint64_t>(l.out())},
            {"rank", static_cast<std::uint64_t>(l.rank())},
            {"seed", o.seed},
            {"layer_id", o.layer},
            {"moment_policy", static_cast<std::uint64_t>(o.moments)},
            {"resample_gap", o.resample.gap},
            {"keep_projection", o.keep_projection ? 1u : 0u},
            {"has_bias", o.bias ? 1u : 0u}};
}

/// The layer-level fields save_state may write (the compressor's come on top).
inline constexpr const char* layer_fields[] = {
    "compressor",  "in",           "out",       "rank",      "seed",         "layer_id",     "moment_policy",
    "resample_gap", "keep_projection", "has_bias", "updates", "weight_step", "weight_epoch", "bias_step",
    "bias_epoch",  "weight",       "bias",      "weight_m",  "weight_v",     "bias_m",       "bias_v",
    "master_weight", "master_bias", "comp_state"};

/// The compressor's fields, when it declares any.
template <class C>
std::vector<compressor_field> compressor_fields(const C& c)
{
    if constexpr (has_checkpoint_fields<C>::value) return c.checkpoint_fields();
    else return (void)c, std::vector<compressor_field>{};
}

inline void check_prefix(std::string_view prefix, const char* where)
{
    // The longest layer field name is 15 characters, plus the slash; compressor fields are checked as
    // they are added.
    COMPACT_REQUIRE(!prefix.empty() && prefix.size() + 16 <= checkpoint_max_name && printable_name(prefix), where,
                    "prefix '", prefix, "' must be 1 to ", checkpoint_max_name - 16, " printable ASCII characters");
}

/// A tensor of the backend's memory staged in host memory.
template <class T>
using host_values = std::vector<T>;

/// Checks that every value of a loaded tensor is finite (and, for V, not negative).
template <class T>
void check_values(const host_values<T>& values, const checkpoint_reader& r, const std::string& name,
                  bool non_negative, const char* where)
{
    for (std::size_t i = 0; i < values.size(); ++i) {
        const double x = static_cast<double>(values[i]);
        COMPACT_REQUIRE(std::isfinite(x) && (!non_negative || x >= 0), where, "'", r.source(), "': section '", name,
                        "' holds ", x, " at element ", i, non_negative ? "; it must be finite and non-negative" : "; it must be finite");
    }
}

template <class T>
host_values<T> read_values(const checkpoint_reader& r, const checkpoint_section& s, std::uint64_t count,
                           bool non_negative, const char* where)
{
    host_values<T> values(static_cast<std::size_t>(count));
    r.copy(s, values.data(), count);
    check_values(values, r, s.name, non_negative, where);
    return values;
}

/// A layer's validated state, read from a checkpoint into host memory.
template <class Scalar, class State>
struct layer_state {
    host_values<Scalar> weight, bias;
    host_values<State> weight_m, weight_v, bias_m, bias_v, master_weight, master_bias;
    host_values<std::uint8_t> compressor_state; ///< the compressor's state bytes (empty without state)
    bool has_weight = false, has_master = false;
    std::uint64_t updates = 0;
    adam_counters weight_counters{}, bias_counters{};
    std::vector<compressor_field> restored; ///< the compressor's state fields, validated
};

template <class Scalar, class Policy, class Backend, class State>
layer_state<Scalar, State> read_layer_state(const checkpoint_reader& r, std::string_view prefix,
                                            const linear_layer<Scalar, Policy, Backend, State>& layer,
                                            weight_storage weights)
{
    using layer_type = linear_layer<Scalar, Policy, Backend, State>;
    using compressor_type = typename layer_type::compressor_type;
    constexpr const char* where = "load_state";
    check_prefix(prefix, where);
    auto name = [&](const char* field) { return layer_section(prefix, field); };
    const auto m = static_cast<std::uint64_t>(layer.out()), n = static_cast<std::uint64_t>(layer.in()),
               rk = static_cast<std::uint64_t>(layer.rank());
    const bool bias = layer.options().bias;

    // The compressor first: another compressor's state would fail later checks less plainly.
    const std::string expected_name = compressor_type::name;
    const checkpoint_section& saved_name = r.find(name("compressor"));
    COMPACT_REQUIRE(saved_name.type == dtype::u8 && saved_name.shape.size() == 1 && saved_name.count <= 256, where,
                    "'", r.source(), "': section '", name("compressor"), "' is not a compressor name");
    std::string got(static_cast<std::size_t>(saved_name.count), '\0');
    r.copy(saved_name, reinterpret_cast<std::uint8_t*>(got.data()), saved_name.count);
    COMPACT_REQUIRE(got == expected_name, where, "'", r.source(), "': the layer under '", prefix, "' was saved with the ",
                    "compressor '", got, "' but this layer's compressor is '", expected_name, "'");

    // has_bias decides which tensors exist; their dtype and shape then say most plainly what differs
    // (n, m, r, Scalar, State); the other fields follow.
    const auto check_field = [&](const char* field, std::uint64_t value) {
        const std::uint64_t saved = r.scalar<std::uint64_t>(name(field));
        COMPACT_REQUIRE(saved == value, where, "'", r.source(), "': section '", name(field), "' is ", saved,
                        " in the checkpoint but ", value, " in the layer: it was saved from a differently "
                        "configured layer");
    };
    check_field("has_bias", bias ? 1 : 0);
    layer_state<Scalar, State> t;
    if (weights == weight_storage::checkpoint) {
        t.has_weight = true;
        t.weight = read_values<Scalar>(r, r.expect<Scalar>(name("weight"), {m, n}), m * n, false, where);
        if (bias) t.bias = read_values<Scalar>(r, r.expect<Scalar>(name("bias"), {m}), m, false, where);
    }
    t.weight_m = read_values<State>(r, r.expect<State>(name("weight_m"), {m, rk}), m * rk, false, where);
    t.weight_v = read_values<State>(r, r.expect<State>(name("weight_v"), {m, rk}), m * rk, true, where);
    if (bias) {
        t.bias_m = read_values<State>(r, r.expect<State>(name("bias_m"), {m}), m, false, where);
        t.bias_v = read_values<State>(r, r.expect<State>(name("bias_v"), {m}), m, true, where);
    }
    if (r.contains(name("master_weight"))) {
        COMPACT_REQUIRE(layer.options().master_weights, where, "'", r.source(), "': section '", name("master_weight"),
                        "' holds master weights but the layer was built without options.master_weights (loading "
                        "would drop them)");
        t.has_master = true;
        t.master_weight = read_values<State>(r, r.expect<State>(name("master_weight"), {m, n}), m * n, false, where);
        if (bias) t.master_bias = read_values<State>(r, r.expect<State>(name("master_bias"), {m}), m, false, where);
    }

    const auto state_bytes = static_cast<std::uint64_t>(layer.compressor_state_bytes());
    if (state_bytes > 0) {
        const checkpoint_section& st = r.find(name("comp_state"));
        COMPACT_REQUIRE(st.type == dtype::u8 && st.shape.size() == 1 && st.count == state_bytes, where, "'",
                        r.source(), "': section '", name("comp_state"), "' holds ", st.count,
                        " bytes of compressor state but the layer's compressor keeps ", state_bytes,
                        " (for a state sized by max_rows, build the layer with the saved one's max_rows)");
        t.compressor_state.resize(static_cast<std::size_t>(state_bytes));
        r.copy(st, t.compressor_state.data(), state_bytes);
    } else {
        COMPACT_REQUIRE(!r.contains(name("comp_state")), where, "'", r.source(), "': section '", name("comp_state"),
                        "' holds compressor state but the layer's compressor keeps none");
    }

    for (const auto& [field, value] : layer_config(layer)) check_field(field, value);
    compressor_type probe = layer.compressor(); // state fields are validated on a copy
    for (const compressor_field& f : compressor_fields(layer.compressor())) {
        if (!f.restored) check_field(f.name, f.value);
        else t.restored.push_back({f.name, r.scalar<std::uint64_t>(name(f.name)), true});
    }
    if constexpr (has_checkpoint_fields<compressor_type>::value) {
        if (!t.restored.empty()) {
            const std::string context = "load_state ('" + std::string(prefix) + "')";
            probe.load_checkpoint_fields(t.restored, context.c_str());
        }
    }

    t.updates = r.scalar<std::uint64_t>(name("updates"));
    t.weight_counters = {r.scalar<std::uint64_t>(name("weight_step")), r.scalar<std::uint64_t>(name("weight_epoch"))};
    t.bias_counters = {r.scalar<std::uint64_t>(name("bias_step")), r.scalar<std::uint64_t>(name("bias_epoch"))};
    const std::uint64_t epoch = layer.options().resample.epoch(t.updates);
    COMPACT_REQUIRE(t.updates < (std::uint64_t{1} << 63), where, "'", r.source(), "': section '", name("updates"),
                    "' is ", t.updates, ", more updates than any run makes");
    COMPACT_REQUIRE(epoch < static_cast<std::uint64_t>(max_counter_word), where, "'", r.source(), "': section '",
                    name("updates"), "' is ", t.updates, ", epoch ", epoch, " (at most 2^32 - 1)");
    COMPACT_REQUIRE(t.weight_counters.step <= t.updates && t.bias_counters.step <= t.updates &&
                        t.weight_counters.epoch <= epoch,
                    where, "'", r.source(), "': counters under '", prefix, "' are inconsistent: weight_step=",
                    t.weight_counters.step, ", weight_epoch=", t.weight_counters.epoch, ", bias_step=",
                    t.bias_counters.step, " cannot follow updates=", t.updates, " (epoch ", epoch, ")");
    return t;
}

/// Copies `count` values from backend memory into the writer as a section.
template <class Backend, class T>
void add_tensor(checkpoint_writer& w, const typename Backend::context& ctx, const std::string& name, const T* data,
                const std::vector<std::uint64_t>& shape, std::uint64_t count)
{
    host_values<T> staged(static_cast<std::size_t>(count));
    Backend::copy_to_host(ctx, data, staged.data(), staged.size());
    w.add(name, staged.data(), shape);
}

template <class Backend, class T>
void store_tensor(const typename Backend::context& ctx, const host_values<T>& values, T* data)
{
    Backend::copy_from_host(ctx, values.data(), data, values.size());
}

} // namespace detail

/// Adds `layer`'s state under "<prefix>/..." to `w` (the table above). The layer must be between steps.
/// Its checks (prefix, no pending gradient, no name already in w) come first; w then only grows.
/// `ctx` is the context the layer's buffers are copied to the host on.
template <class Scalar, class Policy, class Backend, class State>
void save_state(checkpoint_writer& w, std::string_view prefix,
                const linear_layer<Scalar, Policy, Backend, State>& layer,
                weight_storage weights = weight_storage::checkpoint, const typename Backend::context& ctx = {})
{
    using compressor_type = typename linear_layer<Scalar, Policy, Backend, State>::compressor_type;
    constexpr const char* where = "save_state";
    detail::check_prefix(prefix, where);
    COMPACT_REQUIRE(!layer.gradient_pending(), where, "layer '", prefix,
                    "' holds a gradient that no step has used; save before backward or after step");
    auto name = [&](const char* field) { return detail::layer_section(prefix, field); };
    const auto m = static_cast<std::uint64_t>(layer.out()), n = static_cast<std::uint64_t>(layer.in()),
               rk = static_cast<std::uint64_t>(layer.rank());
    const std::vector<compressor_field> fields = detail::compressor_fields(layer.compressor());
    for (const char* field : detail::layer_fields)
        COMPACT_REQUIRE(!w.contains(name(field)), where, "section '", name(field), "' was already added");
    for (const compressor_field& f : fields) {
        for (const char* field : detail::layer_fields)
            COMPACT_REQUIRE(std::strcmp(field, f.name) != 0, where, "the compressor's field '", f.name,
                            "' has the name of a layer field");
        COMPACT_REQUIRE(!w.contains(name(f.name)) && std::string(prefix).size() + 1 + std::strlen(f.name) <= detail::checkpoint_max_name,
                        where, "section '", name(f.name), "' was already added or is too long");
    }

    const std::string compressor_name = compressor_type::name;
    w.add(name("compressor"), reinterpret_cast<const std::uint8_t*>(compressor_name.data()),
          {static_cast<std::uint64_t>(compressor_name.size())});
    for (const auto& [field, value] : detail::layer_config(layer)) w.add_scalar<std::uint64_t>(name(field), value);
    for (const compressor_field& f : fields) w.add_scalar<std::uint64_t>(name(f.name), f.value);
    w.add_scalar<std::uint64_t>(name("updates"), layer.updates());
    w.add_scalar<std::uint64_t>(name("weight_step"), layer.counters().step);
    w.add_scalar<std::uint64_t>(name("weight_epoch"), layer.counters().epoch);
    w.add_scalar<std::uint64_t>(name("bias_step"), layer.bias_counters().step);
    w.add_scalar<std::uint64_t>(name("bias_epoch"), layer.bias_counters().epoch);
    if (weights == weight_storage::checkpoint) {
        detail::add_tensor<Backend>(w, ctx, name("weight"), layer.weight().data, {m, n}, m * n);
        if (layer.bias()) detail::add_tensor<Backend>(w, ctx, name("bias"), layer.bias(), {m}, m);
    }
    detail::add_tensor<Backend>(w, ctx, name("weight_m"), layer.first_moment().data, {m, rk}, m * rk);
    detail::add_tensor<Backend>(w, ctx, name("weight_v"), layer.second_moment().data, {m, rk}, m * rk);
    if (layer.bias()) {
        detail::add_tensor<Backend>(w, ctx, name("bias_m"), layer.bias_first_moment(), {m}, m);
        detail::add_tensor<Backend>(w, ctx, name("bias_v"), layer.bias_second_moment(), {m}, m);
    }
    // Before its first step a layer's master is not yet taken from W: the loaded layer then takes it
    // from the loaded W, exactly as this one will.
    if (layer.master_valid()) {
        detail::add_tensor<Backend>(w, ctx, name("master_weight"), layer.master_weight().data, {m, n}, m * n);
        if (layer.bias()) detail::add_tensor<Backend>(w, ctx, name("master_bias"), layer.master_bias(), {m}, m);
    }
    if (const std::size_t bytes = layer.compressor_state_bytes(); bytes > 0)
        detail::add_tensor<Backend>(w, ctx, name("comp_state"),
                                    reinterpret_cast<const std::uint8_t*>(layer.compressor_state()),
                                    {static_cast<std::uint64_t>(bytes)}, static_cast<std::uint64_t>(bytes));
}

/// Checks that "<prefix>/..." of `r` is a complete state that `layer` can take (see the top of this
/// header); raises compact::error naming the section otherwise. Changes nothing.
template <class Scalar, class Policy, class Backend, class State>
void check_state(const checkpoint_reader& r, std::string_view prefix,
                 const linear_layer<Scalar, Policy, Backend, State>& layer,
                 weight_storage weights = weight_storage::checkpoint)
{
    detail::read_layer_state(r, prefix, layer, weights);
}

/// Restores `layer` from "<prefix>/..." of `r`: every check first, then the copies, so on any error the
/// layer is unchanged. Afterwards the layer continues as the saved one would have.
template <class Scalar, class Policy, class Backend, class State>
void load_state(const checkpoint_reader& r, std::string_view prefix,
                linear_layer<Scalar, Policy, Backend, State>& layer,
                weight_storage weights = weight_storage::checkpoint, const typename Backend::context& ctx = {})
{
    const auto t = detail::read_layer_state(r, prefix, layer, weights);
    if (t.has_weight) detail::store_tensor<Backend>(ctx, t.weight, layer.weight().data);
    if (!t.bias.empty()) detail::store_tensor<Backend>(ctx, t.bias, layer.bias());
    detail::store_tensor<Backend>(ctx, t.weight_m, layer.first_moment().data);
    detail::store_tensor<Backend>(ctx, t.weight_v, layer.second_moment().data);
    if (!t.bias_m.empty()) detail::store_tensor<Backend>(ctx, t.bias_m, layer.bias_first_moment());
    if (!t.bias_v.empty()) detail::store_tensor<Backend>(ctx, t.bias_v, layer.bias_second_moment());
    if (t.has_master) {
        detail::store_tensor<Backend>(ctx, t.master_weight, layer.master_weight().data);
        if (!t.master_bias.empty()) detail::store_tensor<Backend>(ctx, t.master_bias, layer.master_bias());
    }
    if (!t.compressor_state.empty())
        detail::store_tensor<Backend>(ctx, t.compressor_state, reinterpret_cast<std::uint8_t*>(layer.compressor_state()));
    if constexpr (detail::has_checkpoint_fields<typename linear_layer<Scalar, Policy, Backend, State>::compressor_type>::value) {
        if (!t.restored.empty()) layer.compressor().load_checkpoint_fields(t.restored, "load_state");
    }
    layer.restore_counters(t.updates, t.weight_counters, t.bias_counters, t.has_master);
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
