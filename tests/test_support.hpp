// tests/test_support.hpp: helpers shared by the optimizer and layer tests: random vectors, float64
// relative errors and views of std::vector. The configurations the test bodies are templated over, and
// the backend they run on, come from backend_under_test.hpp.
#pragma once

#include "backend_under_test.hpp"

#include <compact/core/matrix_view.hpp>

#include <doctest/doctest.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <random>
#include <type_traits>
#include <vector>

namespace compact_test {

using compact::index_t;

template <class T>
constexpr bool is_float = std::is_same_v<T, float>;

// ----------------------------------------------------------------------------------- small helpers

template <class T>
std::vector<T> uniform(std::mt19937_64& rng, index_t count, double low, double high)
{
    std::uniform_real_distribution<double> d(low, high);
    std::vector<T> v(static_cast<std::size_t>(count));
    for (auto& x : v) x = static_cast<T>(d(rng));
    return v;
}

template <class T>
std::vector<double> to_double(const std::vector<T>& v)
{
    return std::vector<double>(v.begin(), v.end());
}

/// ||got - want||_2 / ||want||_2 over the first want.size() elements, in float64.
template <class T>
double relative_error(const std::vector<T>& got, const std::vector<double>& want)
{
    REQUIRE(got.size() >= want.size());
    double diff = 0, norm = 0;
    for (std::size_t i = 0; i < want.size(); ++i) {
        const double d = static_cast<double>(got[i]) - want[i];
        diff += d * d;
        norm += want[i] * want[i];
    }
    return std::sqrt(diff) / std::sqrt(norm);
}

/// Set COMPACT_TEST_PRINT_ERRORS=1 to print every measured error next to its tolerance.
bool print_errors()
{
    static const bool on = std::getenv("COMPACT_TEST_PRINT_ERRORS") != nullptr;
    return on;
}

/// CHECK(error <= tol), reporting the measured error on failure (and always, on request).
#define CHECK_RELATIVE(error_expression, tolerance)                                                        \
    do {                                                                                                   \
        const double measured_error_ = (error_expression);                                                 \
        const double tolerance_ = (tolerance);                                                             \
        INFO(#error_expression " = ", measured_error_, " (tolerance ", tolerance_, ")");                   \
        if (print_errors()) MESSAGE(#error_expression " = ", measured_error_, " (tolerance ", tolerance_, ")"); \
        CHECK(measured_error_ <= tolerance_);                                                              \
    } while (false)

template <class T>
bool bit_equal(const std::vector<T>& a, const std::vector<T>& b)
{
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

template <class T>
compact::matrix_view<T> view_of(std::vector<T>& v, index_t rows, index_t cols)
{
    return compact::make_view(v.data(), rows, cols);
}

template <class T>
compact::const_matrix_view<T> cview_of(const std::vector<T>& v, index_t rows, index_t cols)
{
    return compact::const_matrix_view<T>(v.data(), rows, cols);
}

template <class T>
std::vector<T> copy_of(compact::const_matrix_view<T> v)
{
    std::vector<T> out;
    for (index_t i = 0; i < v.rows; ++i) out.insert(out.end(), v.row(i), v.row(i) + v.cols);
    return out;
}

} // namespace compact_test
