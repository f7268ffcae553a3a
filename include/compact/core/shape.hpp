// compact/core/shape.hpp: a linear layer's two dimensions, named so that they cannot be swapped.
//
// A weight W is (m, n) = (out, in) (SPEC's layout), while most code, torch's nn::Linear included, takes
// (in, out). Every constructor of a compact layer takes both as distinct types, so writing them in the
// wrong order is a compile error, not a transposed layer:
//
//   compact::linear_layer<float, compact::rank::ratio<1, 4>, compact::cpu> fc(
//       compact::in_features{784}, compact::out_features{1024}, options);
#pragma once

#include "compact/core/config.hpp"
#include "compact/core/matrix_view.hpp"

COMPACT_NAMESPACE_BEGIN

/// n: the features a layer reads (the columns of W and of X).
struct in_features {
    index_t value = 0;
    constexpr explicit in_features(index_t n) noexcept : value(n) {}
};

/// m: the features a layer writes (the rows of W, the columns of Y).
struct out_features {
    index_t value = 0;
    constexpr explicit out_features(index_t m) noexcept : value(m) {}
};

/// Whether an output buffer is overwritten or added to (gradient accumulation over micro-batches,
/// dX of several layers that read one X).
enum class write_mode : unsigned char { overwrite, accumulate };

COMPACT_NAMESPACE_END
