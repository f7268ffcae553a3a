// tests/reference.hpp: float64 reference helpers shared by the unit tests.
//
// Everything here is deliberately naive (plain loops in double, no library code): the tests compare
// the library against it. Matrices are row-major.
//
//   compact_test::dmatrix        a dense (rows, cols) float64 matrix
//   compact_test::host_matrix<T> a (rows, cols) matrix of T with a leading dimension ld >= cols; the
//                                padding is NaN, so reading it poisons results and writing it is caught
//                                by padding_intact()
//   matmul, transpose, frobenius, rel_error, to_double, random_fill, make_rng
#pragma once

#include <compact/core/error.hpp>
#include <compact/core/matrix_view.hpp>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

namespace compact_test {

using index_t = std::int64_t;

/// A dense row-major float64 matrix.
struct dmatrix {
    index_t rows = 0;
    index_t cols = 0;
    std::vector<double> data;

    dmatrix() = default;
    dmatrix(index_t r, index_t c) : rows(r), cols(c), data(static_cast<std::size_t>(r * c), 0.0) {}

    double& operator()(index_t i, index_t j) { return data[static_cast<std::size_t>(i * cols + j)]; }
    double operator()(index_t i, index_t j) const { return data[static_cast<std::size_t>(i * cols + j)]; }
};

/// A (rows, cols) (or (m, n) / (k, n)) product A B in float64, naive triple loop.
inline dmatrix matmul(const dmatrix& a, const dmatrix& b)
{
    dmatrix c(a.rows, b.cols);
    for (index_t i = 0; i < a.rows; ++i)
        for (index_t k = 0; k < a.cols; ++k) {
            const double aik = a(i, k);
            for (index_t j = 0; j < b.cols; ++j) c(i, j) += aik * b(k, j);
        }
    return c;
}

inline dmatrix transpose(const dmatrix& a)
{
    dmatrix t(a.cols, a.rows);
    for (index_t i = 0; i < a.rows; ++i)
        for (index_t j = 0; j < a.cols; ++j) t(j, i) = a(i, j);
    return t;
}

inline double frobenius(const dmatrix& a)
{
    double s = 0;
    for (double v : a.data) s += v * v;
    return std::sqrt(s);
}

/// ||a - b||_F / ||b||_F, with b the reference (||a||_F when b is zero). Shapes must agree; a shape
/// mismatch returns +infinity so that any tolerance check fails.
inline double rel_error(const dmatrix& a, const dmatrix& b)
{
    if (a.rows != b.rows || a.cols != b.cols) return std::numeric_limits<double>::infinity();
    double diff = 0, ref = 0;
    for (std::size_t k = 0; k < a.data.size(); ++k) {
        const double d = a.data[k] - b.data[k];
        diff += d * d;
        ref += b.data[k] * b.data[k];
    }
    return ref > 0 ? std::sqrt(diff / ref) : std::sqrt(diff);
}

/// Same for flat vectors (e.g. a bias gradient).
inline double rel_error(const std::vector<double>& a, const std::vector<double>& b)
{
    if (a.size() != b.size()) return std::numeric_limits<double>::infinity();
    double diff = 0, ref = 0;
    for (std::size_t k = 0; k < a.size(); ++k) {
        diff += (a[k] - b[k]) * (a[k] - b[k]);
        ref += b[k] * b[k];
    }
    return ref > 0 ? std::sqrt(diff / ref) : std::sqrt(diff);
}

/// A view's elements converted to float64.
template <class T>
dmatrix to_double(compact::matrix_view<T> v)
{
    dmatrix d(v.rows, v.cols);
    for (index_t i = 0; i < v.rows; ++i)
        for (index_t j = 0; j < v.cols; ++j) d(i, j) = static_cast<double>(v(i, j));
    return d;
}

/// A seeded 64-bit Mersenne Twister: every test draws its inputs from one, so failures reproduce.
inline std::mt19937_64 make_rng(std::uint64_t seed) { return std::mt19937_64(seed); }

/// U[lo, hi) from the top 53 bits of one draw (portable, unlike std::uniform_real_distribution).
inline double uniform(std::mt19937_64& rng, double lo = -1.0, double hi = 1.0)
{
    return lo + (hi - lo) * (static_cast<double>(rng() >> 11) * 0x1p-53);
}

template <class T>
void random_fill(T* p, std::size_t count, std::mt19937_64& rng, double lo = -1.0, double hi = 1.0)
{
    for (std::size_t k = 0; k < count; ++k) p[k] = static_cast<T>(uniform(rng, lo, hi));
}

template <class T>
void random_fill(std::vector<T>& v, std::mt19937_64& rng, double lo = -1.0, double hi = 1.0)
{
    random_fill(v.data(), v.size(), rng, lo, hi);
}

/// An owning (rows, cols) row-major matrix of T with leading dimension ld >= cols. Padding elements
/// (columns cols .. ld-1) hold NaN and must stay NaN.
template <class T>
struct host_matrix {
    index_t rows = 0;
    index_t cols = 0;
    index_t ld = 0;
    std::vector<T> data;

    host_matrix() = default;
    host_matrix(index_t r, index_t c, index_t pad = 0)
        : rows(r), cols(c), ld(c + pad),
          data(static_cast<std::size_t>(r * (c + pad)), std::numeric_limits<T>::quiet_NaN())
    {
        for (index_t i = 0; i < rows; ++i)
            for (index_t j = 0; j < cols; ++j) (*this)(i, j) = T(0);
    }

    T& operator()(index_t i, index_t j) { return data[static_cast<std::size_t>(i * ld + j)]; }
    T operator()(index_t i, index_t j) const { return data[static_cast<std::size_t>(i * ld + j)]; }

    compact::matrix_view<T> view() { return {data.data(), rows, cols, ld}; }
    compact::matrix_view<const T> view() const { return {data.data(), rows, cols, ld}; }
    compact::matrix_view<const T> cview() const { return {data.data(), rows, cols, ld}; }

    /// Fills the (rows, cols) part with U[lo, hi) values; padding keeps its NaN.
    void randomize(std::mt19937_64& rng, double lo = -1.0, double hi = 1.0)
    {
        for (index_t i = 0; i < rows; ++i)
            for (index_t j = 0; j < cols; ++j) (*this)(i, j) = static_cast<T>(uniform(rng, lo, hi));
    }

    void fill(T value)
    {
        for (index_t i = 0; i < rows; ++i)
            for (index_t j = 0; j < cols; ++j) (*this)(i, j) = value;
    }

    dmatrix to_double() const { return compact_test::to_double(cview()); }

    /// True when every padding element is still NaN (nothing wrote past cols).
    bool padding_intact() const
    {
        for (index_t i = 0; i < rows; ++i)
            for (index_t j = cols; j < ld; ++j)
                if (!std::isnan((*this)(i, j))) return false;
        return true;
    }
};

/// What `f` throws as compact::error, or a marker string when it throws something else or nothing.
inline std::string error_message_of(const std::function<void()>& f)
{
    try {
        f();
    } catch (const compact::error& e) {
        return e.what();
    } catch (...) {
        return "<an exception that is not compact::error>";
    }
    return "<no exception>";
}

/// True when `part` occurs in `s`.
inline bool contains(const std::string& s, const char* part) { return s.find(part) != std::string::npos; }

} // namespace compact_test
