// compact/backend/cpu/eigen.hpp: adapters between Eigen matrices and compact's matrix_view.
//
// view(m) makes a matrix_view of a row-major Eigen matrix (or block of one) without copying;
// as_eigen(v) makes an Eigen::Map of a view, for checks and for callers that compute in Eigen.
#pragma once

#include "compact/core/config.hpp"
#include "compact/core/matrix_view.hpp"

#include "compact/backend/cpu/detail/eigen_core.hpp"

#include <type_traits>

COMPACT_NAMESPACE_BEGIN

template <class T>
using row_major_matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

template <class T>
using eigen_map = Eigen::Map<std::conditional_t<std::is_const_v<T>, const row_major_matrix<std::remove_const_t<T>>,
                                                row_major_matrix<T>>,
                             Eigen::Unaligned, Eigen::OuterStride<>>;

/// A view of a row-major, inner-contiguous Eigen dense object (Matrix, Map, Block, Ref).
template <class Derived>
auto view(Eigen::DenseBase<Derived>& m)
{
    static_assert(Derived::IsRowMajor || Derived::ColsAtCompileTime == 1,
                  "compact::view needs a row-major Eigen object (Eigen::RowMajor)");
    using T = typename Derived::Scalar;
    auto& d = m.derived();
    return matrix_view<T>(d.data(), d.rows(), d.cols(), d.outerStride());
}

template <class Derived>
auto view(const Eigen::DenseBase<Derived>& m)
{
    static_assert(Derived::IsRowMajor || Derived::ColsAtCompileTime == 1,
                  "compact::view needs a row-major Eigen object (Eigen::RowMajor)");
    using T = typename Derived::Scalar;
    const auto& d = m.derived();
    return const_matrix_view<T>(d.data(), d.rows(), d.cols(), d.outerStride());
}

/// An Eigen::Map over a view (no copy).
template <class T>
eigen_map<T> as_eigen(matrix_view<T> v)
{
    return eigen_map<T>(v.data, v.rows, v.cols, Eigen::OuterStride<>(v.ld));
}

COMPACT_NAMESPACE_END
