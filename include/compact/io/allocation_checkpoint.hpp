// compact/io/allocation_checkpoint.hpp: save and restore a bit allocation (SPEC section 6: a checkpoint
// holds the quantizer allocations).
//
// Sections "<prefix>/<field>" of a checkpoint (io/checkpoint.hpp), L = registered tensors:
//
//   field          dtype  shape  what
//   method         u64    ()     0 gact, 1 grad_norm_var
//   values         u64    (L)    D_l, values per step
//   sensitivity    f64    (L)    C_l
//   kind           u64    (L)    store_kind: 0 full, 1 quantized, 2 average
//   bits, group    u64    (L)    the scheme's parameters
//
// Loading checks that the allocator was built like the saved one (same method, same tensors with the
// same sizes) and that every scheme is valid, before anything changes; then the stores' settings get
// the saved schemes, so training resumes with the allocation it had.
#pragma once

#include "compact/backend/store_scheme.hpp"
#include "compact/compress/sensitivity.hpp"
#include "compact/core/config.hpp"
#include "compact/core/error.hpp"
#include "compact/io/checkpoint.hpp"

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

COMPACT_NAMESPACE_BEGIN

inline void save_allocation(checkpoint_writer& w, std::string_view prefix, const bit_allocator& a)
{
    const std::string p(prefix);
    const std::uint64_t L = a.size();
    std::vector<std::uint64_t> values, kind, bits, group;
    const std::vector<store_scheme> schemes = a.schemes();
    for (std::size_t l = 0; l < a.size(); ++l) {
        const store_scheme& s = schemes[l];
        values.push_back(static_cast<std::uint64_t>(a.values()[l]));
        kind.push_back(static_cast<std::uint64_t>(s.kind));
        bits.push_back(static_cast<std::uint64_t>(s.bits));
        group.push_back(static_cast<std::uint64_t>(s.group));
    }
    w.add_scalar(p + "/method", static_cast<std::uint64_t>(a.method()));
    w.add(p + "/values", values.data(), {L});
    w.add(p + "/sensitivity", a.sensitivities().data(), {L});
    w.add(p + "/kind", kind.data(), {L});
    w.add(p + "/bits", bits.data(), {L});
    w.add(p + "/group", group.data(), {L});
}

namespace detail {

struct saved_allocation {
    std::vector<double> sensitivity;
    std::vector<store_scheme> schemes;
};

inline saved_allocation read_allocation(const checkpoint_reader& r, std::string_view prefix, const bit_allocator& a)
{
    constexpr const char* where = "load_allocation";
    const std::string p(prefix);
    const std::uint64_t L = a.size();
    const auto method = r.scalar<std::uint64_t>(p + "/method");
    COMPACT_REQUIRE(method == static_cast<std::uint64_t>(a.method()), where, "section '", p,
                    "/method' holds method ", method, " but the allocator uses ", static_cast<int>(a.method()));
    auto vector_of = [&](const std::string& name, auto tag) {
        using T = decltype(tag);
        std::vector<T> v(static_cast<std::size_t>(L));
        r.copy(r.expect<T>(name, {L}), v.data(), L);
        return v;
    };
    const auto values = vector_of(p + "/values", std::uint64_t{});
    for (std::size_t l = 0; l < values.size(); ++l)
        COMPACT_REQUIRE(values[l] == static_cast<std::uint64_t>(a.values()[l]), where, "section '", p,
                        "/values': tensor ", l, " held ", values[l], " values but the allocator's holds ",
                        a.values()[l]);
    saved_allocation out;
    out.sensitivity = vector_of(p + "/sensitivity", double{});
    const auto kind = vector_of(p + "/kind", std::uint64_t{}), bits = vector_of(p + "/bits", std::uint64_t{}),
               group = vector_of(p + "/group", std::uint64_t{});
    for (std::size_t l = 0; l < values.size(); ++l) {
        COMPACT_REQUIRE(kind[l] <= 2 && bits[l] <= 8 && group[l] <= static_cast<std::uint64_t>(max_store_group), where,
                        "section '", p, "': tensor ", l, " has an invalid scheme (kind ", kind[l], ", bits ", bits[l],
                        ", group ", group[l], ")");
        const store_scheme s{static_cast<store_kind>(kind[l]), static_cast<int>(bits[l]), static_cast<index_t>(group[l])};
        check_scheme(s, where);
        out.schemes.push_back(s);
    }
    return out;
}

} // namespace detail

/// Throws, changing nothing, unless `prefix` holds an allocation `a` can load.
inline void check_allocation(const checkpoint_reader& r, std::string_view prefix, const bit_allocator& a)
{
    detail::read_allocation(r, prefix, a);
}

/// Loads the saved sensitivities and schemes into `a` and its stores' settings.
inline void load_allocation(const checkpoint_reader& r, std::string_view prefix, bit_allocator& a)
{
    const detail::saved_allocation s = detail::read_allocation(r, prefix, a);
    a.restore(s.sensitivity, s.schemes);
}

COMPACT_NAMESPACE_END
