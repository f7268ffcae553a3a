// compact/compress/mask.hpp: 1-bit masks for ReLU and dropout (ActNN / GACT).
//
// ReLU and dropout need only one bit per value for their backward pass: whether the value passed.
// These functions compute the forward output and pack that bit (value k of the tensor, in row-major
// order, at bit k % 8 of byte k / 8), so a trainer keeps (N n + 7) / 8 bytes instead of N n values:
//
//   std::vector<std::uint8_t> mask(compact::mask_bytes(N, n));
//   compact::relu_forward<compact::cpu>(ctx, h, h, mask);          // H = max(H, 0) in place
//   compact::relu_backward<compact::cpu>(ctx, mask, dh, dh);       // dH = dH where H > 0, else 0
//
// Dropout keeps value k when the counter-based noise u_k of `key` is >= p and scales it by 1 / (1 - p):
// the same key gives the same mask on every run and thread count. Outputs may alias inputs.
#pragma once

#include "compact/backend/backend.hpp"
#include "compact/backend/store_scheme.hpp"
#include "compact/core/config.hpp"
#include "compact/core/error.hpp"
#include "compact/core/matrix_view.hpp"

#include <cstddef>
#include <cstdint>

COMPACT_NAMESPACE_BEGIN

/// Bytes of the 1-bit mask of a (rows, cols) tensor.
constexpr std::size_t mask_bytes(index_t rows, index_t cols) noexcept
{
    return (static_cast<std::size_t>(rows) * static_cast<std::size_t>(cols) + 7) / 8;
}

/// Caller memory for a mask.
struct mask_span {
    std::uint8_t* data = nullptr;
    std::size_t bytes = 0;
};

namespace detail {

template <class T>
void check_mask_io(const_matrix_view<T> in, const_matrix_view<T> out, std::size_t mask_capacity, const char* where,
                   const char* in_name, const char* out_name)
{
    check_view(in, where, in_name);
    check_shape(out, in.rows, in.cols, where, out_name);
    COMPACT_REQUIRE(mask_capacity >= mask_bytes(in.rows, in.cols), where, "mask holds ", mask_capacity,
                    " bytes but ", shape_string(in), " needs ", mask_bytes(in.rows, in.cols));
}

inline void check_drop_probability(double p, const char* where)
{
    COMPACT_REQUIRE(p >= 0.0 && p < 1.0, where, "drop probability p=", p, " must be in [0, 1)");
}

} // namespace detail

/// y = max(x, 0) and the mask of x > 0. x, y: (N, n); mask: mask_bytes(N, n).
template <class Backend, class T>
void relu_forward(const typename Backend::context& ctx, const_matrix_view<T> x, matrix_view<T> y, mask_span mask)
{
    detail::check_mask_io<T>(x, y, mask.data ? mask.bytes : 0, "relu_forward", "x", "y");
    Backend::template relu_mask<T>(ctx, x, y, mask.data);
}

/// dx = dy where the mask is set, 0 elsewhere. dy, dx: (N, n).
template <class Backend, class T>
void relu_backward(const typename Backend::context& ctx, const std::uint8_t* mask, const_matrix_view<T> dy,
                   matrix_view<T> dx)
{
    detail::check_mask_io<T>(dy, dx, mask ? mask_bytes(dy.rows, dy.cols) : 0, "relu_backward", "dy", "dx");
    Backend::template apply_mask<T>(ctx, mask, 1.0, dy, dx);
}

/// Inverted dropout with drop probability p in [0, 1): y = x / (1 - p) where kept, 0 elsewhere.
template <class Backend, class T>
void dropout_forward(const typename Backend::context& ctx, double p, const noise_key& key, const_matrix_view<T> x,
                     matrix_view<T> y, mask_span mask)
{
    detail::check_drop_probability(p, "dropout_forward");
    detail::check_noise_key(key, "dropout_forward");
    detail::check_mask_io<T>(x, y, mask.data ? mask.bytes : 0, "dropout_forward", "x", "y");
    Backend::template dropout_mask<T>(ctx, p, key, x, y, mask.data);
}

/// dx = dy / (1 - p) where the mask is set, 0 elsewhere.
template <class Backend, class T>
void dropout_backward(const typename Backend::context& ctx, const std::uint8_t* mask, double p,
                      const_matrix_view<T> dy, matrix_view<T> dx)
{
    detail::check_drop_probability(p, "dropout_backward");
    detail::check_mask_io<T>(dy, dx, mask ? mask_bytes(dy.rows, dy.cols) : 0, "dropout_backward", "dy", "dx");
    Backend::template apply_mask<T>(ctx, mask, 1.0 / (1.0 - p), dy, dx);
}

COMPACT_NAMESPACE_END
