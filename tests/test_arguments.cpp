// Tests of argument validation across the public API: the defects an adversarial review found, each a
// case here that fails on the code before its fix.
//   - cpu::context with a thread count the OpenMP runtime cannot give (it used to crash inside libgomp);
//   - cpu::gemm, public and called by trainers, checked nothing (a null A crashed, C with ld < cols was
//     accepted, C overlapping A was computed in place);
//   - out-of-range enums (distribution(7), moment_policy(9)) were accepted;
//   - rank::budget cast an infinite weight to an integer; fill_uniform accepted low > high;
//   - a quantized layer's forward with a negative row count asked for ~2^61 bytes before validating X;
//   - sizes computed from user numbers wrapped (saved_bytes(2^63 - 1)).
#include "test_support.hpp"

#include <compact/compact.hpp>

#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

using compact::in_features;
using compact::index_t;
using compact::out_features;
using cpu = compact::cpu;

constexpr double inf = std::numeric_limits<double>::infinity();

TEST_CASE("cpu::context: a thread count outside [0, max_threads] is an error, before any write")
{
    std::vector<float> a(16, 1.0f), c(16, 7.0f);
    const compact::const_matrix_view<float> av(a.data(), 4, 4);
    const compact::matrix_view<float> cv(c.data(), 4, 4);
    for (int threads : {-1, cpu::max_threads + 1, 100000}) {
        CHECK_THROWS_WITH_AS(cpu::gemm<float>(cpu::context{threads}, compact::op::none, compact::op::none, 1.0, av, av,
                                              0.0, cv),
                             doctest::Contains("cpu::context: threads="), compact::error);
        CHECK_THROWS_AS(cpu::fill<float>(cpu::context{threads}, cv, 0.0f), compact::error);
        CHECK(c[0] == 7.0f);
    }
    CHECK_NOTHROW(cpu::fill<float>(cpu::context{0}, cv, 1.0f));
    CHECK_NOTHROW(cpu::fill<float>(cpu::context{cpu::max_threads}, cv, 2.0f));
    CHECK(c[5] == 2.0f);
}

TEST_CASE("cpu::gemm validates its views")
{
    const cpu::context ctx{1};
    std::vector<float> a(12, 1.0f), b(12, 1.0f), c(9, 0.0f);
    const compact::const_matrix_view<float> av(a.data(), 3, 4), bv(b.data(), 4, 3);
    const compact::matrix_view<float> cv(c.data(), 3, 3);
    CHECK_NOTHROW(cpu::gemm<float>(ctx, compact::op::none, compact::op::none, 1.0, av, bv, 0.0, cv));
    CHECK(c[0] == 4.0f);
    CHECK_THROWS_WITH_AS(cpu::gemm<float>(ctx, compact::op::none, compact::op::none, 1.0,
                                          compact::const_matrix_view<float>(nullptr, 3, 4), bv, 0.0, cv),
                         doctest::Contains("cpu::gemm: A is null"), compact::error);
    CHECK_THROWS_WITH_AS(cpu::gemm<float>(ctx, compact::op::none, compact::op::none, 1.0, av, bv, 0.0,
                                          compact::matrix_view<float>(c.data(), 3, 3, 2)),
                         doctest::Contains("cpu::gemm: C has ld=2 smaller than its cols=3"), compact::error);
    CHECK_THROWS_WITH_AS(cpu::gemm<float>(ctx, compact::op::none, compact::op::none, 1.0, av, av, 0.0, cv),
                         doctest::Contains("do not agree"), compact::error);
    // C over A: the product would read what it has written.
    std::vector<float> square(16, 1.0f);
    const compact::matrix_view<float> s(square.data(), 4, 4);
    CHECK_THROWS_WITH_AS(cpu::gemm<float>(ctx, compact::op::none, compact::op::none, 1.0, s, s, 0.0, s),
                         doctest::Contains("overlaps"), compact::error);
    CHECK(square[0] == 1.0f);
}

TEST_CASE("out-of-range enums are refused")
{
    compact::linear_options o;
    o.max_rows = 4;
    o.dist = static_cast<compact::distribution>(7);
    CHECK_THROWS_WITH_AS((compact::linear_layer<float, compact::rank::ratio<1, 2>, cpu>(in_features{8}, out_features{4}, o)),
                         doctest::Contains("options.dist=7"), compact::error);
    o.dist = compact::distribution::gaussian;
    o.moments = static_cast<compact::moment_policy>(9);
    CHECK_THROWS_WITH_AS((compact::linear_layer<float, compact::rank::ratio<1, 2>, cpu>(in_features{8}, out_features{4}, o)),
                         doctest::Contains("options.moments=9"), compact::error);
    using source = compact::projection_source<float, cpu>;
    CHECK_THROWS_WITH_AS(source(8, 4, static_cast<compact::distribution>(7), 1, 2),
                         doctest::Contains("distribution 7"), compact::error);
    const source p(8, 4, compact::distribution::gaussian, 1, 2);
    using optimizer = compact::subspace_adamw<float, cpu>;
    CHECK_THROWS_WITH_AS(optimizer(out_features{4}, p, static_cast<compact::moment_policy>(9)),
                         doctest::Contains("moment_policy 9"), compact::error);
}

TEST_CASE("rank::budget refuses an infinite or NaN weight; fill_uniform an empty or infinite interval")
{
    for (double w : {inf, std::nan("")}) {
        compact::rank::budget_layer l;
        l.id = 1;
        l.in = 64;
        l.tokens = 16;
        l.weight = w;
        CHECK_THROWS_WITH_AS(compact::rank::budget({l}, 16 * 4 * 16), doctest::Contains("must be finite"),
                             compact::error);
    }
    std::vector<float> out(8, 3.0f);
    const compact::matrix_view<float> v(out.data(), 2, 4);
    CHECK_THROWS_WITH_AS(compact::fill_uniform(v, 1.0, -1.0, 1, 0), doctest::Contains("non-empty finite interval"),
                         compact::error);
    CHECK_THROWS_AS(compact::fill_uniform(v, 0.5, 0.5, 1, 0), compact::error);
    CHECK_THROWS_AS(compact::fill_uniform(v, -inf, 1.0, 1, 0), compact::error);
    CHECK(out[0] == 3.0f);
}

TEST_CASE("a quantized layer's forward with a negative row count fails on X, allocating nothing")
{
    compact::linear_options o;
    o.max_rows = 4;
    compact::linear_layer<float, compact::quantized, cpu> layer(in_features{8}, out_features{4}, o);
    std::vector<float> x(32, 1.0f), y(16, 5.0f);
    CHECK_THROWS_WITH_AS(layer.forward(cpu::context{1}, compact::const_matrix_view<float>(x.data(), -3, 8),
                                       compact::matrix_view<float>(y.data(), 4, 4)),
                         doctest::Contains("negative extents"), compact::error);
    CHECK(y[0] == 5.0f);
    CHECK_THROWS_WITH_AS(layer.backward(cpu::context{1}, compact::const_matrix_view<float>(y.data(), 4, 4), {}),
                         doctest::Contains("without a preceding forward"), compact::error);
}

TEST_CASE("sizes from user numbers do not wrap")
{
    const compact::compressed_linear<float, compact::rank::ratio<1, 4>, cpu> fc(in_features{1024}, out_features{8}, 1, 1);
    CHECK_THROWS_WITH_AS(fc.saved_bytes(std::numeric_limits<index_t>::max()), doctest::Contains("overflows"),
                         compact::error);
    const compact::compressed_linear<float, compact::quantized, cpu> q(in_features{1024}, out_features{8}, 1, 2);
    CHECK_THROWS_WITH_AS(q.saved_bytes(std::numeric_limits<index_t>::max()), doctest::Contains("overflows"),
                         compact::error);
    compact::linear_options o;
    o.max_rows = 1;
    CHECK_THROWS_WITH_AS((compact::linear_layer<float, compact::rank::full, cpu>(in_features{4294967293},
                                                                                 out_features{index_t{1} << 40}, o)),
                         doctest::Contains("overflows"), compact::error);
}

} // namespace
