// compact/core/matrix_view.hpp: the non-owning matrix type every public function takes.
//
// A matrix_view<T> is (data, rows, cols, ld): row-major, element (i, j) at data[i * ld + j], with
// ld >= cols. Indices are 64-bit. A view never owns, allocates or frees; const-ness of the elements is
// part of T (matrix_view<const float> is the read-only view, and a matrix_view<float> converts to it).
// A view with rows == 0 or cols == 0 is empty and may have data == nullptr.
#pragma once

#include "compact/core/config.hpp"
#include "compact/core/error.hpp"

#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>

COMPACT_NAMESPACE_BEGIN

using index_t = std::int64_t;

template <class T>
struct matrix_view {
    T* data = nullptr;
    index_t rows = 0;
    index_t cols = 0;
    index_t ld = 0; // leading dimension: distance in elements between the starts of two rows

    constexpr matrix_view() = default;
    COMPACT_HD constexpr matrix_view(T* d, index_t r, index_t c, index_t leading) noexcept
        : data(d), rows(r), cols(c), ld(leading)
    {
    }
    /// A dense view: ld == cols.
    COMPACT_HD constexpr matrix_view(T* d, index_t r, index_t c) noexcept : data(d), rows(r), cols(c), ld(c) {}

    /// matrix_view<T> converts to matrix_view<const T>.
    template <class U, class = std::enable_if_t<std::is_same_v<const U, T> && !std::is_same_v<U, T>>>
    COMPACT_HD constexpr matrix_view(const matrix_view<U>& other) noexcept
        : data(other.data), rows(other.rows), cols(other.cols), ld(other.ld)
    {
    }

    COMPACT_HD constexpr T& operator()(index_t i, index_t j) const noexcept { return data[i * ld + j]; }
    COMPACT_HD constexpr T* row(index_t i) const noexcept { return data + i * ld; }
    COMPACT_HD constexpr bool empty() const noexcept { return rows == 0 || cols == 0; }
    COMPACT_HD constexpr index_t size() const noexcept { return rows * cols; }
    COMPACT_HD constexpr bool contiguous() const noexcept { return ld == cols || rows <= 1; }

    /// Rows [r0, r0 + count) and all columns.
    COMPACT_HD constexpr matrix_view row_block(index_t r0, index_t count) const noexcept
    {
        return {data + r0 * ld, count, cols, ld};
    }
    /// The block of `nr` rows and `nc` columns starting at (r0, c0).
    COMPACT_HD constexpr matrix_view block(index_t r0, index_t c0, index_t nr, index_t nc) const noexcept
    {
        return {data + r0 * ld + c0, nr, nc, ld};
    }
};

template <class T>
using const_matrix_view = matrix_view<const T>;

/// A dense (rows, cols) view of `data`.
template <class T>
constexpr matrix_view<T> make_view(T* data, index_t rows, index_t cols) noexcept
{
    return {data, rows, cols, cols};
}

/// "(rows, cols)" or "(rows, cols, ld=...)" for error messages.
template <class T>
std::string shape_string(const matrix_view<T>& v)
{
    std::string s = "(" + std::to_string(v.rows) + ", " + std::to_string(v.cols);
    if (v.ld != v.cols) s += ", ld=" + std::to_string(v.ld);
    return s + ")";
}

namespace detail {

/// Validates a view's own invariants: non-negative sizes, ld >= cols, data present when non-empty.
template <class T>
void check_view(const matrix_view<T>& v, const char* where, const char* name)
{
    COMPACT_REQUIRE(v.rows >= 0 && v.cols >= 0, where, name, " has negative extents ", shape_string(v));
    COMPACT_REQUIRE(v.ld >= v.cols, where, name, " has ld=", v.ld, " smaller than its cols=", v.cols);
    COMPACT_REQUIRE(v.empty() || v.data != nullptr, where, name, " is null but has shape ", shape_string(v));
}

/// check_view plus an exact expected shape.
template <class T>
void check_shape(const matrix_view<T>& v, index_t rows, index_t cols, const char* where, const char* name)
{
    check_view(v, where, name);
    COMPACT_REQUIRE(v.rows == rows && v.cols == cols, where, name, " is ", shape_string(v), " but (", rows, ", ",
                    cols, ") is required");
}

/// The bytes a view spans, [first, last): empty views span nothing.
template <class T>
std::pair<const unsigned char*, const unsigned char*> byte_span(const matrix_view<T>& v) noexcept
{
    if (v.empty() || v.data == nullptr) return {nullptr, nullptr};
    const auto* first = reinterpret_cast<const unsigned char*>(v.data);
    return {first, first + ((v.rows - 1) * v.ld + v.cols) * static_cast<index_t>(sizeof(T))};
}

/// True when two views share a byte (their spans overlap).
template <class A, class B>
bool overlaps(const matrix_view<A>& a, const matrix_view<B>& b) noexcept
{
    const auto sa = byte_span(a), sb = byte_span(b);
    return sa.first != nullptr && sb.first != nullptr && sa.first < sb.second && sb.first < sa.second;
}

/// Rejects an output that overlaps an input: the operation would read what it has already written.
template <class A, class B>
void check_no_overlap(const matrix_view<A>& out, const char* out_name, const matrix_view<B>& in, const char* in_name,
                      const char* where)
{
    COMPACT_REQUIRE(!overlaps(out, in), where, out_name, " ", shape_string(out), " overlaps ", in_name, " ",
                    shape_string(in), " in memory; in-place use is not supported here");
}

/// True for the default-constructed view ({}) that an optional argument passes to mean "none".
template <class T>
constexpr bool absent(const matrix_view<T>& v) noexcept
{
    return v.data == nullptr && v.rows == 0 && v.cols == 0;
}

/// An optional view argument: absent ({}), or exactly (rows, cols). Returns whether it is present.
template <class T>
bool check_optional_shape(const matrix_view<T>& v, index_t rows, index_t cols, const char* where, const char* name)
{
    if (absent(v)) return false;
    check_shape(v, rows, cols, where, name);
    return true;
}

/// A plain pointer argument that must hold `count` elements.
template <class T>
void check_pointer(const T* p, index_t count, const char* where, const char* name)
{
    COMPACT_REQUIRE(count == 0 || p != nullptr, where, name, " is null but must hold ", count, " elements");
}

} // namespace detail

/// The checks every public function makes of a view argument, for code written against the library's
/// extension points (a compressor, say): a view's own invariants, and an exact shape. Both raise
/// compact::error naming `where` and `name`.
template <class T>
void validate_view(const matrix_view<T>& v, const char* where, const char* name)
{
    detail::check_view(v, where, name);
}
template <class T>
void validate_shape(const matrix_view<T>& v, index_t rows, index_t cols, const char* where, const char* name)
{
    detail::check_shape(v, rows, cols, where, name);
}

COMPACT_NAMESPACE_END
