// bench/bench_support.hpp: what the CPU benchmarks share on top of bench_common.hpp: machine facts and
// the float64 row references their checks use. Not part of the library.
#pragma once

#include "bench_common.hpp"

#include <compact/backend/cpu/cpu.hpp>
#include <compact/core/matrix_view.hpp>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <ctime>
#include <fstream>
#include <string>
#include <vector>

namespace compact_bench {

using clock_type = std::chrono::steady_clock;

template <class T>
using buffer = compact::cpu::buffer<T>;

inline double seconds_between(clock_type::time_point a, clock_type::time_point b)
{
    return std::chrono::duration<double>(b - a).count();
}

/// The CPU's model name from /proc/cpuinfo (Linux), or "unknown".
inline std::string cpu_model()
{
    std::ifstream f("/proc/cpuinfo");
    std::string line;
    while (std::getline(f, line))
        if (line.rfind("model name", 0) == 0) {
            const auto colon = line.find(':');
            if (colon != std::string::npos) return line.substr(line.find_first_not_of(" \t", colon + 1));
        }
    return "unknown";
}

template <class T>
compact::matrix_view<T> view_of(buffer<T>& b, index_t rows, index_t cols)
{
    return compact::make_view(b.data(), rows, cols);
}
template <class T>
compact::const_matrix_view<T> view_of(const buffer<T>& b, index_t rows, index_t cols)
{
    return compact::make_view(b.data(), rows, cols);
}

/// Float64 rows of the products the checks need.
struct reference {
    /// Row i of a b^T; a (R, k), b (C, k).
    static std::vector<double> row_abt(compact::const_matrix_view<float> a, compact::const_matrix_view<float> b,
                                       index_t i)
    {
        std::vector<double> out(static_cast<std::size_t>(b.rows));
        for (index_t j = 0; j < b.rows; ++j) {
            double s = 0;
            for (index_t k = 0; k < a.cols; ++k) s += static_cast<double>(a(i, k)) * static_cast<double>(b(j, k));
            out[static_cast<std::size_t>(j)] = s;
        }
        return out;
    }
    /// Row i of a b; a (R, k), b (k, C).
    static std::vector<double> row_ab(compact::const_matrix_view<float> a, compact::const_matrix_view<float> b,
                                      index_t i)
    {
        std::vector<double> out(static_cast<std::size_t>(b.cols), 0.0);
        for (index_t k = 0; k < a.cols; ++k) {
            const double s = static_cast<double>(a(i, k));
            for (index_t j = 0; j < b.cols; ++j) out[static_cast<std::size_t>(j)] += s * static_cast<double>(b(k, j));
        }
        return out;
    }
    /// Row i of a^T b; a (k, R), b (k, C).
    static std::vector<double> row_atb(compact::const_matrix_view<float> a, compact::const_matrix_view<float> b,
                                       index_t i)
    {
        std::vector<double> out(static_cast<std::size_t>(b.cols), 0.0);
        for (index_t k = 0; k < a.rows; ++k) {
            const double s = static_cast<double>(a(k, i));
            for (index_t j = 0; j < b.cols; ++j) out[static_cast<std::size_t>(j)] += s * static_cast<double>(b(k, j));
        }
        return out;
    }
    /// v b for a row vector v (k) and b (k, C).
    static std::vector<double> vec_b(const std::vector<double>& v, compact::const_matrix_view<float> b)
    {
        std::vector<double> out(static_cast<std::size_t>(b.cols), 0.0);
        for (index_t k = 0; k < b.rows; ++k)
            for (index_t j = 0; j < b.cols; ++j)
                out[static_cast<std::size_t>(j)] += v[static_cast<std::size_t>(k)] * static_cast<double>(b(k, j));
        return out;
    }
    /// v b^T for a row vector v (k) and b (C, k).
    static std::vector<double> vec_bt(const std::vector<double>& v, compact::const_matrix_view<float> b)
    {
        std::vector<double> out(static_cast<std::size_t>(b.rows), 0.0);
        for (index_t j = 0; j < b.rows; ++j) {
            double s = 0;
            for (index_t k = 0; k < b.cols; ++k) s += v[static_cast<std::size_t>(k)] * static_cast<double>(b(j, k));
            out[static_cast<std::size_t>(j)] = s;
        }
        return out;
    }
};

} // namespace compact_bench
