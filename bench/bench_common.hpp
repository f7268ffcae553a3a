// bench/bench_common.hpp: what every benchmark shares, CPU or CUDA: timing statistics, the date, the
// sampled rows of the float64 checks and the table of check results. Includes no backend (no Eigen),
// so .cu programs use it too. Not part of the library.
#pragma once

#include <compact/core/matrix_view.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdio>
#include <ctime>
#include <string>
#include <vector>

namespace compact_bench {

using compact::index_t;

inline double median(std::vector<double> v)
{
    if (v.empty()) return 0;
    std::sort(v.begin(), v.end());
    const std::size_t h = v.size() / 2;
    return v.size() % 2 ? v[h] : 0.5 * (v[h - 1] + v[h]);
}

inline double minimum(const std::vector<double>& v) { return v.empty() ? 0 : *std::min_element(v.begin(), v.end()); }

/// Nearest-rank percentile, q in (0, 1].
inline double percentile(std::vector<double> v, double q)
{
    if (v.empty()) return 0;
    std::sort(v.begin(), v.end());
    const auto rank = static_cast<std::size_t>(std::ceil(q * static_cast<double>(v.size())));
    return v[std::min(v.size(), std::max<std::size_t>(rank, 1)) - 1];
}

/// Median over rounds of a[i] / b[i]: both steps of a round ran back to back, so a slowdown that lasts
/// longer than a round (another job on the machine) cancels out of the ratio.
inline double paired_ratio(const std::vector<double>& a, const std::vector<double>& b)
{
    std::vector<double> r;
    for (std::size_t i = 0; i < std::min(a.size(), b.size()); ++i) r.push_back(a[i] / b[i]);
    return median(r);
}

inline std::string today()
{
    const std::time_t now = std::time(nullptr);
    char s[64];
    std::strftime(s, sizeof s, "%Y-%m-%d %H:%M:%S %Z", std::localtime(&now));
    return s;
}

/// `count` rows spread evenly over [0, total), first and last included (all of them when
/// total <= count), for sampled checks.
inline std::vector<index_t> sample_rows(index_t total, index_t count)
{
    std::vector<index_t> rows;
    if (total <= count) {
        for (index_t i = 0; i < total; ++i) rows.push_back(i);
        return rows;
    }
    for (index_t k = 0; k < count; ++k) rows.push_back(k * (total - 1) / (count - 1));
    return rows;
}

/// Checks as Markdown table rows: what, error, tolerance, pass or FAIL.
struct check_table {
    bool ok = true;
    std::vector<std::string> rows;
    void add(const std::string& what, double error, double tolerance)
    {
        const bool pass = std::isfinite(error) && error <= tolerance;
        ok = ok && pass;
        char s[320];
        std::snprintf(s, sizeof s, "| %s | %.2e | %.0e | %s |", what.c_str(), error, tolerance, pass ? "pass" : "FAIL");
        rows.emplace_back(s);
    }
};

} // namespace compact_bench
