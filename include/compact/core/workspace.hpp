// compact/core/workspace.hpp: caller-owned scratch memory.
//
// Operations that need temporary storage say how much through a `*_workspace_bytes` query and take a
// `workspace` (pointer + size) that the caller allocated, on the right device, once. The library
// carves it into aligned sub-buffers and never allocates on the hot path.
#pragma once

#include "compact/core/config.hpp"
#include "compact/core/error.hpp"

#include <cstddef>
#include <cstdint>

COMPACT_NAMESPACE_BEGIN

/// Every sub-buffer carved from a workspace starts on this boundary (a cache line, and enough for
/// any vector load on the CPU and for 128-bit loads on a GPU).
inline constexpr std::size_t workspace_alignment = 64;

struct workspace {
    void* data = nullptr;
    std::size_t bytes = 0;
};

namespace detail {

constexpr std::size_t align_up(std::size_t bytes) noexcept
{
    return (bytes + workspace_alignment - 1) / workspace_alignment * workspace_alignment;
}

/// Bytes for `count` elements of T, padded so the next sub-buffer stays aligned.
template <class T>
constexpr std::size_t buffer_bytes(std::int64_t count) noexcept
{
    return align_up(static_cast<std::size_t>(count) * sizeof(T));
}

/// Hands out aligned pieces of a workspace in order; fails with a clear error if it is too small.
class workspace_carver {
public:
    workspace_carver(workspace ws, std::size_t required, const char* where) : ws_(ws)
    {
        COMPACT_REQUIRE(ws.bytes >= required, where, "workspace holds ", ws.bytes, " bytes but ", required,
                        " are required (ask the matching *_workspace_bytes query)");
        COMPACT_REQUIRE(required == 0 || ws.data != nullptr, where, "workspace is null but ", required,
                        " bytes are required");
        // An unaligned base is tolerated by skipping to the next boundary, which the query budgets for.
        const auto base = reinterpret_cast<std::uintptr_t>(ws.data);
        offset_ = (workspace_alignment - base % workspace_alignment) % workspace_alignment;
    }

    template <class T>
    T* take(std::int64_t count)
    {
        auto* p = reinterpret_cast<T*>(static_cast<unsigned char*>(ws_.data) + offset_);
        offset_ += buffer_bytes<T>(count);
        return p;
    }

private:
    workspace ws_;
    std::size_t offset_ = 0;
};

/// The extra bytes a query adds so that an arbitrarily aligned workspace still fits.
inline constexpr std::size_t workspace_slack = workspace_alignment;

} // namespace detail

COMPACT_NAMESPACE_END
