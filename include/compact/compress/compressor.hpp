// compact/compress/compressor.hpp: the compressor concept (SPEC section 8), the extension point of
// compressed layers.
//
// A compressor turns a linear layer's input X (N, n) into what backward keeps, and what backward keeps
// into the weight gradient. The layer (nn/compressed_linear.hpp) computes Y, dX and db itself, the same
// for every compressor; it asks its compressor only for the following, checked at compile time by
// COMPACT_CHECK_COMPRESSOR with a message naming what is missing:
//
//   struct my_compressor {
//       using scalar_type  = Scalar;
//       using backend_type = Backend;
//       using saved_type   = ...;                       // derived from compact::saved_activation
//       static constexpr const char* name = "...";     // recorded in checkpoints, checked on load
//       static constexpr bool subspace = ...;          // true: the gradient is (m, r) in the subspace of
//                                                      // projection(); false: the full (m, n) gradient
//       index_t in() const;                            // n
//       index_t gradient_cols() const;                 // r (subspace) or n
//       std::size_t saved_bytes(index_t rows) const;   // bytes kept for N rows
//       std::size_t workspace_bytes(index_t rows) const;
//       // Encodes X into saved (validating everything before writing anything). `step` counts the
//       // completed optimizer updates; the compressor derives its key from it (the projection's epoch
//       // step / T, a store's noise step) and records it in saved.epoch.
//       void compress(const context&, const_matrix_view<Scalar> x, std::uint64_t step,
//                     saved_type& saved, workspace ws) const;
//       // G (m, gradient_cols) = (or +=) the weight gradient from dY (N, m) and saved.
//       void weight_gradient(const context&, const_matrix_view<Scalar> dy, const saved_type& saved,
//                            matrix_view<Scalar> g, write_mode mode, workspace ws) const;
//       // subspace compressors only: the projection the optimizer applies (compress/projection_source.hpp)
//       const projection_source<Scalar, Backend>& projection() const;
//       // optional, for checkpoints: configuration fields that must match on load, and state fields that
//       // loading sets (validated first; see compressor_field)
//       std::vector<compressor_field> checkpoint_fields() const;
//       void load_checkpoint_fields(const std::vector<compressor_field>& fields, const char* where);
//       // optional, for compressors with persistent state (see "Persistent state" below)
//       std::size_t state_bytes(index_t max_rows) const;
//       void bind_state(const context&, void* data, std::size_t bytes);
//   };
//
// Determinism: compress must be a pure function of (X, step, the compressor's configuration and its
// persistent state, if any); every model must treat N = 0 as a no-op. saved_activation records the rows,
// the compressor's id and the epoch forward used, so backward and the optimizer use what forward used by
// construction, and a caller who mixes them up gets an error.
//
// Persistent state (optional; compact::has_compressor_state<C> tells whether C has it). Some compressors
// keep values from one step to the next: VeLoRA's direction v (compress/velora.hpp), WTA-CRS's row norms
// of dY (compress/wta_crs.hpp). Like everything else in the library, that state lives in caller memory on
// the backend's device:
//   - state_bytes(max_rows): the bytes of state for layers whose forward sees at most max_rows rows (it
//     may not depend on max_rows); the memory must be aligned to compressor_state_alignment;
//   - bind_state(ctx, data, bytes): points the compressor at that memory and initialises it on ctx's
//     stream (backend fills, no synchronisation); binding again re-initialises. compress() and
//     weight_gradient() stay const: they read and write the state through the bound pointer.
//   - copies of a compressor share the binding (they hold the same pointer): an input group's members,
//     which hold copies of the group's compressor made at construction, are bound by the group's own
//     bind_state (nn/compressed_linear.hpp), which binds the group's compressor and every member's copy.
//   - a stateful compressor used before bind_state raises compact::error; the state's bytes are opaque
//     to the caller, who saves and restores them verbatim (io/linear_layer_checkpoint.hpp does, through
//     the backend's copy_to_host / copy_from_host), together with checkpoint_fields().
// compressor_state_bytes(c, max_rows) and bind_compressor_state(c, ctx, data, bytes) below work for any
// compressor: 0 bytes and a no-op for one without state.
//
// A layer's Policy template argument names its compressor: a rank policy (core/rank_policy.hpp) means
// the seeded random projection (compress/random_projection.hpp); any other Policy says which compressor
// it means with a member template `template <class Scalar, class Backend> using compressor = ...;`, and
// that compressor is built as `C(const compressor_setup&, const Policy&)`. compact::quantized
// (compress/store_compressor.hpp) is one; examples/custom_compressor.cpp writes another in one header.
#pragma once

#include "compact/backend/backend.hpp"
#include "compact/core/config.hpp"
#include "compact/core/error.hpp"
#include "compact/core/matrix_view.hpp"
#include "compact/core/rank_policy.hpp"
#include "compact/core/shape.hpp"
#include "compact/core/workspace.hpp"
#include "compact/random/projection.hpp"

#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

COMPACT_NAMESPACE_BEGIN

/// What a layer tells the compressor it builds.
struct compressor_setup {
    index_t in = 0;                             ///< n: the layer's (or input group's) input features
    index_t out = 0;                            ///< m: output features (an input group's sum)
    std::uint64_t seed = 0;                     ///< the run's seed
    std::uint64_t layer = 0;                    ///< the caller's unique id for this compressor
    distribution dist = distribution::gaussian; ///< for compressors that draw a projection
    resampling resample{};                      ///< for them too: a new projection every T updates
    const char* where = "compressor";           ///< the user's function, for error messages
};

/// Caller memory for what forward keeps, and the record of what compress() wrote into it. A
/// compressor's saved_type derives from this (and may add its own record).
struct saved_activation {
    std::byte* data = nullptr; ///< at least saved_bytes(N) bytes, aligned for the scalar and for float
    std::size_t capacity = 0;  ///< bytes at data

    // Written by compress(); read by weight_gradient().
    bool filled = false;     ///< false until a compress() wrote it
    index_t rows = 0;        ///< N
    std::uint64_t layer = 0; ///< the id of the compressor that wrote it
    std::uint64_t epoch = 0; ///< the epoch (projection) or step (noise) it was written under
};

/// A saved_type over caller memory: `bind_saved<typename C::saved_type>(bytes, size)`.
template <class Saved>
Saved bind_saved(void* data, std::size_t bytes) noexcept
{
    Saved s{};
    s.data = static_cast<std::byte*>(data);
    s.capacity = bytes;
    return s;
}

/// One unsigned configuration or state value of a compressor, for checkpoints. Configuration fields
/// (restored = false) must equal the loading layer's; state fields (restored = true) are set by loading.
struct compressor_field {
    const char* name = "";
    std::uint64_t value = 0;
    bool restored = false;
};

/// The gradients of one linear layer, in caller memory, and the epoch of the compression they were
/// computed under. backward writes them; the optimizer reads them and uses that epoch's projection, so
/// an update is always made with the P forward used.
template <class T>
struct layer_gradient {
    matrix_view<T> weight{};  ///< (m, r) for a subspace compressor, (m, n) otherwise
    matrix_view<T> bias{};    ///< (1, m), or empty for a layer without bias
    std::uint64_t epoch = 0;  ///< written by backward
    bool written = false;     ///< set by backward; the optimizer refuses a gradient no backward wrote
};

namespace detail {

template <class C, class = void>
struct has_compressor_types : std::false_type {};
template <class C>
struct has_compressor_types<C, std::void_t<typename C::scalar_type, typename C::backend_type, typename C::saved_type,
                                           decltype(C::subspace), decltype(C::name)>> : std::true_type {};

template <class C, class = void>
struct has_compressor_queries : std::false_type {};
template <class C>
struct has_compressor_queries<
    C, std::void_t<decltype(std::declval<const C&>().in()), decltype(std::declval<const C&>().gradient_cols()),
                   decltype(std::declval<const C&>().saved_bytes(index_t{})),
                   decltype(std::declval<const C&>().workspace_bytes(index_t{}))>> : std::true_type {};

template <class C, class = void>
struct has_compress : std::false_type {};
template <class C>
struct has_compress<C, std::void_t<decltype(std::declval<const C&>().compress(
                           std::declval<const typename C::backend_type::context&>(),
                           std::declval<const_matrix_view<typename C::scalar_type>>(), std::uint64_t{},
                           std::declval<typename C::saved_type&>(), workspace{}))>> : std::true_type {};

template <class C, class = void>
struct has_weight_gradient : std::false_type {};
template <class C>
struct has_weight_gradient<C, std::void_t<decltype(std::declval<const C&>().weight_gradient(
                                  std::declval<const typename C::backend_type::context&>(),
                                  std::declval<const_matrix_view<typename C::scalar_type>>(),
                                  std::declval<const typename C::saved_type&>(),
                                  std::declval<matrix_view<typename C::scalar_type>>(), write_mode{}, workspace{}))>>
    : std::true_type {};

template <class C, class = void>
struct has_projection : std::false_type {};
template <class C>
struct has_projection<C, std::void_t<decltype(std::declval<const C&>().projection())>> : std::true_type {};

template <class C, class = void>
struct has_checkpoint_fields : std::false_type {};
template <class C>
struct has_checkpoint_fields<C, std::void_t<decltype(std::declval<const C&>().checkpoint_fields()),
                                            decltype(std::declval<C&>().load_checkpoint_fields(
                                                std::declval<const std::vector<compressor_field>&>(), ""))>>
    : std::true_type {};

template <class C, class = void>
struct has_state_members : std::false_type {};
template <class C>
struct has_state_members<C, std::void_t<typename C::backend_type,
                                        decltype(std::declval<const C&>().state_bytes(index_t{})),
                                        decltype(std::declval<C&>().bind_state(
                                            std::declval<const typename C::backend_type::context&>(),
                                            static_cast<void*>(nullptr), std::size_t{}))>>
    : std::true_type {};

template <class C, bool = has_compressor_types<C>::value>
struct saved_type_ok : std::false_type {};
template <class C>
struct saved_type_ok<C, true> : std::is_base_of<saved_activation, typename C::saved_type> {};

template <class C, bool = has_compressor_types<C>::value>
struct declares_subspace : std::false_type {};
template <class C>
struct declares_subspace<C, true> : std::bool_constant<C::subspace> {};

template <class C, bool = has_compressor_types<C>::value>
struct has_compressor_calls : std::false_type {};
template <class C>
struct has_compressor_calls<C, true> : std::bool_constant<has_compress<C>::value && has_weight_gradient<C>::value> {};

} // namespace detail

/// True when C meets the compressor concept above.
template <class C>
inline constexpr bool is_compressor =
    detail::has_compressor_types<C>::value && detail::saved_type_ok<C>::value &&
    detail::has_compressor_queries<C>::value && detail::has_compressor_calls<C>::value &&
    (!detail::declares_subspace<C>::value || detail::has_projection<C>::value) && std::is_copy_constructible_v<C>;

/// True when the compressor C keeps persistent state in caller memory (state_bytes and bind_state above).
template <class C>
inline constexpr bool has_compressor_state = detail::has_state_members<C>::value;

/// The alignment compressor state memory must have (Backend::buffer and cudaMalloc give more).
inline constexpr std::size_t compressor_state_alignment = 16;

/// Bytes of persistent state of `c` for at most max_rows rows per forward: 0 without state.
template <class C>
std::size_t compressor_state_bytes(const C& c, index_t max_rows)
{
    if constexpr (has_compressor_state<C>) return c.state_bytes(max_rows);
    else return (void)c, (void)max_rows, std::size_t{0};
}

/// Binds `c` to `bytes` of state memory at `data` and initialises it on ctx's stream; a no-op for a
/// compressor without state (then data may be null).
template <class C, class Context>
void bind_compressor_state(C& c, const Context& ctx, void* data, std::size_t bytes)
{
    if constexpr (has_compressor_state<C>) c.bind_state(ctx, data, bytes);
    else (void)c, (void)ctx, (void)data, (void)bytes;
}

/// The checks a stateful compressor's bind_state makes of the memory it is given: `need` bytes, aligned.
inline void check_state_memory(const void* data, std::size_t bytes, std::size_t need, const char* where)
{
    COMPACT_REQUIRE(bytes >= need && (need == 0 || data != nullptr), where, "the state memory holds ", bytes,
                    " bytes at ", data, " but ", need, " are needed (ask state_bytes(max_rows))");
    COMPACT_REQUIRE(reinterpret_cast<std::uintptr_t>(data) % compressor_state_alignment == 0, where,
                    "the state memory ", data, " must be aligned to ", compressor_state_alignment, " bytes");
}

/// Checks the concept one requirement at a time, so that the first failing static_assert names what is
/// missing.
#define COMPACT_CHECK_COMPRESSOR(C)                                                                        \
    static_assert(::compact::detail::has_compressor_types<C>::value,                                       \
                  "compact: a compressor needs the member types scalar_type, backend_type and saved_type, "  \
                  "and static members `name` and `subspace` (see compact/compress/compressor.hpp)");         \
    static_assert(::compact::detail::saved_type_ok<C>::value,                                              \
                  "compact: a compressor's saved_type must derive from compact::saved_activation");          \
    static_assert(::compact::detail::has_compressor_queries<C>::value,                                     \
                  "compact: a compressor needs const members in(), gradient_cols(), "                        \
                  "saved_bytes(index_t) and workspace_bytes(index_t)");                                      \
    static_assert(::compact::detail::has_compressor_calls<C>::value,                                       \
                  "compact: a compressor needs const members compress(ctx, X, epoch, saved&, workspace) "    \
                  "and weight_gradient(ctx, dY, saved, G, write_mode, workspace)");                          \
    static_assert(!::compact::detail::declares_subspace<C>::value || ::compact::detail::has_projection<C>::value, \
                  "compact: a subspace compressor needs a const member projection() returning its "          \
                  "projection_source");                                                                      \
    static_assert(std::is_copy_constructible_v<C>, "compact: a compressor must be copyable (it is a small value)")

namespace detail {

template <class Policy, class = void>
struct policy_names_compressor : std::false_type {};
template <class Policy>
struct policy_names_compressor<Policy, std::void_t<typename Policy::template compressor<float, void>>>
    : std::true_type {};

template <class Scalar, class Backend, class Policy, bool RankPolicy = is_rank_policy<Policy>>
struct compressor_of {
    static_assert(policy_names_compressor<Policy>::value,
                  "compact: a layer's Policy is a rank policy (compact/core/rank_policy.hpp) or names a "
                  "compressor with `template <class Scalar, class Backend> using compressor = ...;` (see "
                  "compact/compress/compressor.hpp)");
    using type = typename Policy::template compressor<Scalar, Backend>;
};

} // namespace detail

// The random projection; defined in compress/random_projection.hpp.
template <class Scalar, class Backend, class RankPolicy>
class random_projection;

namespace detail {
template <class Scalar, class Backend, class Policy>
struct compressor_of<Scalar, Backend, Policy, true> {
    using type = random_projection<Scalar, Backend, Policy>;
};
} // namespace detail

/// The compressor a layer with this Policy uses.
template <class Scalar, class Backend, class Policy>
using compressor_t = typename detail::compressor_of<Scalar, Backend, Policy>::type;

/// The checks every compressor's weight_gradient makes of what forward saved: written, by this
/// compressor (`layer`), for `rows` rows.
inline void check_saved(const saved_activation& saved, index_t rows, std::uint64_t layer, const char* where)
{
    COMPACT_REQUIRE(saved.filled, where, "the saved activation holds nothing: run forward with it first");
    COMPACT_REQUIRE(saved.layer == layer, where, "the saved activation was written by compressor ", saved.layer,
                    ", not by this one (", layer, ")");
    COMPACT_REQUIRE(saved.rows == rows, where, "dY has ", rows, " rows but the saved activation holds ", saved.rows);
}

/// The check every compressor's compress makes first: the saved activation's memory holds `bytes`,
/// aligned for T and float.
template <class T>
void check_saved_memory(const saved_activation& saved, std::size_t bytes, const char* where)
{
    COMPACT_REQUIRE(saved.capacity >= bytes && (bytes == 0 || saved.data != nullptr), where, "the saved activation holds ",
                    saved.capacity, " bytes at ", static_cast<const void*>(saved.data), " but ", bytes,
                    " are needed (ask saved_bytes)");
    constexpr std::size_t alignment = alignof(T) > alignof(float) ? alignof(T) : alignof(float);
    COMPACT_REQUIRE(reinterpret_cast<std::uintptr_t>(saved.data) % alignment == 0, where, "the saved activation's data ",
                    static_cast<const void*>(saved.data), " must be aligned to ", alignment, " bytes");
}


COMPACT_NAMESPACE_END
