// Tests of the WTA-CRS compressor (compact/compress/wta_crs.hpp, SPEC section 10) in compressed_linear,
// input_group and linear_layer on the CPU backend (tests/cuda/test_cuda_compressors.cu compares the CUDA
// backend with it).
//
// Tolerances against the float64 reference, relative Frobenius error: float 1e-5, double 1e-12. k = N must
// give G exactly: to the tolerance against float64, and bit for bit against the backend's own dY^T X.
// Unbiasedness is tested statistically: the mean of K = 4000 estimates (steps 0 .. K-1, i.e. independent
// draws) against the exact G, element by element, as z = (mean - G) / (sd / sqrt(K)) with the sample
// standard deviation sd of each element; |z| < 5 for all m n = 15 elements (a family-wise false alarm
// rate below 1e-5 for normal means: 15 x 5.7e-7). A 5% bias is shown to fail the same bound (measured:
// max |z| = 1.74, and 21 for the 5% bias).
#include "reference.hpp"
#include "test_support.hpp"

#include <compact/backend/cpu/cpu.hpp>
#include <compact/compress/wta_crs.hpp>
#include <compact/io/linear_layer_checkpoint.hpp>
#include <compact/nn/compressed_linear.hpp>
#include <compact/nn/linear_layer.hpp>

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include <unistd.h>

using compact::index_t;
using compact_test::contains;
using compact_test::dmatrix;
using compact_test::error_message_of;
using compact_test::host_matrix;
using compact_test::print_errors;

namespace {

template <class T>
constexpr double tolerance = sizeof(T) == 4 ? 1e-5 : 1e-12;

template <class T>
using wlayer = compact::compressed_linear<T, compact::wta_crs, compact::cpu>;

using bytes = compact::cpu::buffer<std::byte>;

/// The norm state of a bound compressor (CPU memory): acc_rows, then acc.
template <class C>
std::pair<std::uint64_t, std::vector<double>> read_state(const std::byte* state, index_t rows)
{
    using A = typename C::norm_type;
    std::uint64_t acc_rows = 0;
    std::memcpy(&acc_rows, state, sizeof acc_rows);
    std::vector<double> acc(static_cast<std::size_t>(rows));
    for (std::size_t i = 0; i < acc.size(); ++i) {
        A v;
        std::memcpy(&v, state + C::state_header + i * sizeof(A), sizeof v);
        acc[i] = static_cast<double>(v);
    }
    return {acc_rows, acc};
}

std::string temp_path(const char* name)
{
    return (std::filesystem::temp_directory_path() /
            ("compact-test-wta-crs-" + std::to_string(::getpid()) + "-" + name))
        .string();
}

/// X with rows of very different norms (every sixth 30 times larger), so that p is far from uniform and
/// winners appear.
template <class T>
host_matrix<T> uneven_rows(std::mt19937_64& rng, index_t rows, index_t cols, index_t pad = 0)
{
    host_matrix<T> x(rows, cols, pad);
    x.randomize(rng);
    for (index_t i = 0; i < rows; ++i) {
        const double s = i % 6 == 0 ? 30.0 : compact_test::uniform(rng, 0.1, 1.5);
        for (index_t j = 0; j < cols; ++j) x(i, j) = static_cast<T>(s * static_cast<double>(x(i, j)));
    }
    return x;
}

} // namespace

TEST_CASE_TEMPLATE("wta_crs: k = N keeps every row with weight 1, so G is exact", T, float, double)
{
    auto rng = compact_test::make_rng(1001);
    constexpr index_t n = 10, m = 4, rows = 9;
    for (const index_t pad : {index_t{0}, index_t{2}}) {
        CAPTURE(pad);
        wlayer<T> fc(compact::in_features{n}, compact::out_features{m}, 3, 21, compact::wta_crs{1.0});
        CHECK(fc.compressor().kept_rows(rows) == rows);
        bytes state(fc.state_bytes(rows)), saved_memory(fc.saved_bytes(rows)), ws(fc.workspace_bytes(rows));
        fc.bind_state({}, state.data(), state.size());
        auto saved = compact::bind_saved<typename wlayer<T>::saved_type>(saved_memory.data(), saved_memory.size());
        host_matrix<T> w(m, n), y(rows, m), dx(rows, n);
        w.randomize(rng);
        for (std::uint64_t step = 0; step < 3; ++step) { // uniform p first, then p from the stored norms
            CAPTURE(step);
            const host_matrix<T> x = uneven_rows<T>(rng, rows, n, pad);
            host_matrix<T> dy(rows, m, pad);
            dy.randomize(rng);
            std::vector<T> g(static_cast<std::size_t>(m * n)), db(m);
            fc.forward({}, x.cview(), w.cview(), {}, y.view(), saved, step, {ws.data(), ws.size()});
            CHECK(saved.kept == rows);
            CHECK(fc.compressor().last_winners() == rows);
            compact::layer_gradient<T> grads{compact::make_view(g.data(), m, n), {db.data(), 1, m}};
            fc.backward({}, dy.cview(), w.cview(), saved, dx.view(), grads, {ws.data(), ws.size()});
            const dmatrix g_exact = compact_test::matmul(compact_test::transpose(dy.to_double()), x.to_double());
            CHECK_RELATIVE(compact_test::rel_error(compact_test::to_double(compact::const_matrix_view<T>(g.data(), m, n)), g_exact),
                           tolerance<T>);
            std::vector<T> direct(g.size());
            compact::cpu::gemm<T>({}, compact::op::transpose, compact::op::none, 1.0, dy.cview(), x.cview(), 0.0,
                                  compact::make_view(direct.data(), m, n));
            CHECK(compact_test::bit_equal(g, direct));
            CHECK_RELATIVE(compact_test::rel_error(dx.to_double(), compact_test::matmul(dy.to_double(), w.to_double())),
                           tolerance<T>);
        }
    }
}

TEST_CASE_TEMPLATE("wta_crs: the estimate is unbiased over independent draws", T, float, double)
{
    auto rng = compact_test::make_rng(1002);
    constexpr index_t n = 5, m = 3, rows = 12;
    constexpr int draws = 4000;
    wlayer<T> fc(compact::in_features{n}, compact::out_features{m}, 77, 5, compact::wta_crs{0.25});
    const index_t k = fc.compressor().kept_rows(rows);
    CHECK(k == 3);
    bytes state(fc.state_bytes(rows)), saved_memory(fc.saved_bytes(rows)), ws(fc.workspace_bytes(rows));
    CHECK(fc.saved_bytes(rows) == compact::detail::align_up(static_cast<std::size_t>(k * n) * sizeof(T)) + 8 * k);
    fc.bind_state({}, state.data(), state.size());
    auto saved = compact::bind_saved<typename wlayer<T>::saved_type>(saved_memory.data(), saved_memory.size());
    const host_matrix<T> x = uneven_rows<T>(rng, rows, n);
    host_matrix<T> dy(rows, m), w(m, n), y(rows, m);
    dy.randomize(rng);
    w.randomize(rng);
    const dmatrix g_exact = compact_test::matmul(compact_test::transpose(dy.to_double()), x.to_double());
    std::vector<double> sum(static_cast<std::size_t>(m * n), 0.0), sum_sq(sum.size(), 0.0);
    std::vector<T> g(sum.size());
    index_t winners_seen = 0, sampled_seen = 0;
    for (int step = 0; step < draws; ++step) {
        fc.forward({}, x.cview(), w.cview(), {}, y.view(), saved, static_cast<std::uint64_t>(step), {ws.data(), ws.size()});
        winners_seen = std::max(winners_seen, fc.compressor().last_winners());
        sampled_seen = std::max(sampled_seen, k - fc.compressor().last_winners());
        compact::layer_gradient<T> grads{compact::make_view(g.data(), m, n), {}};
        fc.backward({}, dy.cview(), w.cview(), saved, {}, grads, {ws.data(), ws.size()});
        for (std::size_t e = 0; e < g.size(); ++e) {
            sum[e] += static_cast<double>(g[e]);
            sum_sq[e] += static_cast<double>(g[e]) * static_cast<double>(g[e]);
        }
    }
    CHECK(winners_seen >= 1); // the two large rows win
    CHECK(sampled_seen >= 1); // and the rest is sampled
    double max_z = 0, max_z_biased = 0; // the latter for 1.05 x the mean
    for (std::size_t e = 0; e < g.size(); ++e) {
        const double mean = sum[e] / draws;
        const double var = std::max(0.0, (sum_sq[e] / draws - mean * mean) * draws / (draws - 1));
        const double se = std::sqrt(var / draws) + 1e-12 * std::abs(g_exact.data[e]) + 1e-300;
        max_z = std::max(max_z, std::abs(mean - g_exact.data[e]) / se);
        max_z_biased = std::max(max_z_biased, std::abs(1.05 * mean - g_exact.data[e]) / se);
    }
    INFO("max |z| = ", max_z, ", for a 5% bias ", max_z_biased);
    if (print_errors()) MESSAGE("max |z| = ", max_z, ", for a 5% bias ", max_z_biased);
    CHECK(max_z < 5.0);
    CHECK(max_z_biased > 5.0);
}

TEST_CASE_TEMPLATE("wta_crs: kept rows are X's rows times their weights, winners weigh 1; draws are keyed by the step",
                   T, float, double)
{
    auto rng = compact_test::make_rng(1003);
    constexpr index_t n = 6, m = 2, rows = 20;
    wlayer<T> fc(compact::in_features{n}, compact::out_features{m}, 5, 6, compact::wta_crs{0.3, 2});
    const index_t k = fc.compressor().kept_rows(rows);
    CHECK(k == 6);
    CHECK(fc.compressor().kept_rows(10) == 3); // 0.3 * 10 is 3, not 4, despite its rounding
    CHECK(fc.compressor().kept_rows(3) == 2);  // minimal_k
    bytes state(fc.state_bytes(rows)), m1(fc.saved_bytes(rows)), m2(fc.saved_bytes(rows)), ws(fc.workspace_bytes(rows));
    fc.bind_state({}, state.data(), state.size());
    const host_matrix<T> x = uneven_rows<T>(rng, rows, n);
    host_matrix<T> w(m, n), y(rows, m);
    auto s1 = compact::bind_saved<typename wlayer<T>::saved_type>(m1.data(), m1.size());
    auto s2 = compact::bind_saved<typename wlayer<T>::saved_type>(m2.data(), m2.size());
    fc.forward({}, x.cview(), w.cview(), {}, y.view(), s1, 7, {ws.data(), ws.size()});
    const index_t winners = fc.compressor().last_winners();
    const auto kept = fc.compressor().kept_x(s1);
    const index_t* idx = fc.compressor().kept_indices(s1);
    index_t unit_weights = 0;
    for (index_t t = 0; t < k; ++t) {
        REQUIRE(idx[t] >= 0);
        REQUIRE(idx[t] < rows);
        if (t > 0) CHECK(idx[t - 1] <= idx[t]);
        const double wt = static_cast<double>(kept(t, 0)) / static_cast<double>(x(idx[t], 0));
        CHECK(wt > 0);
        for (index_t j = 0; j < n; ++j)
            CHECK(static_cast<double>(kept(t, j)) == doctest::Approx(wt * static_cast<double>(x(idx[t], j))).epsilon(1e-5));
        if (wt == 1.0) ++unit_weights;
    }
    CHECK(unit_weights >= winners);
    // The same state, X and step give the same bytes; the state is consumed by a compress, so reset it.
    fc.bind_state({}, state.data(), state.size());
    fc.forward({}, x.cview(), w.cview(), {}, y.view(), s2, 7, {ws.data(), ws.size()});
    CHECK(std::memcmp(m1.data(), m2.data(), fc.saved_bytes(rows)) == 0);
    bool differs = false;
    for (std::uint64_t step = 8; step < 16 && !differs; ++step) {
        fc.bind_state({}, state.data(), state.size());
        fc.forward({}, x.cview(), w.cview(), {}, y.view(), s2, step, {ws.data(), ws.size()});
        differs = std::memcmp(m1.data(), m2.data(), fc.saved_bytes(rows)) != 0;
    }
    CHECK(differs);
}

TEST_CASE_TEMPLATE("wta_crs: bad arguments and unbound state are errors naming the argument; N = 0 is a no-op", T,
                   float, double)
{
    const std::string zero = error_message_of([] {
        wlayer<T>(compact::in_features{8}, compact::out_features{2}, 0, 0, compact::wta_crs{0.0, 0});
    });
    CHECK(contains(zero, "ratio=0"));
    CHECK(contains(zero, "minimal_k=0"));
    CHECK(contains(zero, "k = 0"));
    CHECK(contains(error_message_of([] {
                       wlayer<T>(compact::in_features{8}, compact::out_features{2}, 0, 0, compact::wta_crs{1.5});
                   }),
                   "ratio=1.5"));
    CHECK(contains(error_message_of([] {
                       wlayer<T>(compact::in_features{8}, compact::out_features{2}, 0, 0, compact::wta_crs{0.5, -1});
                   }),
                   "minimal_k=-1"));

    constexpr index_t n = 8, m = 2, rows = 5;
    wlayer<T> fc(compact::in_features{n}, compact::out_features{m}, 0, 3, compact::wta_crs{0.5, 8});
    const std::string too_many = error_message_of([&] { (void)fc.saved_bytes(rows); });
    CHECK(contains(too_many, "minimal_k=8"));
    CHECK(contains(too_many, "N=5"));
    CHECK(contains(too_many, "exceeds"));
    compact::linear_options o;
    o.max_rows = rows;
    CHECK(contains(error_message_of([&] {
                       compact::linear_layer<T, compact::wta_crs, compact::cpu>(compact::in_features{n},
                                                                                compact::out_features{m}, o,
                                                                                compact::wta_crs{0.5, 8});
                   }),
                   "minimal_k=8"));

    wlayer<T> ok(compact::in_features{n}, compact::out_features{m}, 0, 3, compact::wta_crs{0.5});
    bytes saved_memory(ok.saved_bytes(rows)), ws(ok.workspace_bytes(rows));
    auto saved = compact::bind_saved<typename wlayer<T>::saved_type>(saved_memory.data(), saved_memory.size());
    host_matrix<T> x(rows, n), w(m, n), y(rows, m);
    x.fill(T(1));
    const std::string unbound = error_message_of(
        [&] { ok.forward({}, x.cview(), w.cview(), {}, y.view(), saved, 0, {ws.data(), ws.size()}); });
    CHECK(contains(unbound, "wta_crs::compress"));
    CHECK(contains(unbound, "not bound"));
    using A = typename wlayer<T>::compressor_type::norm_type;
    bytes state(wlayer<T>::compressor_type::state_header + (rows - 1) * sizeof(A)); // for max_rows = 4 exactly
    ok.bind_state({}, state.data(), state.size());
    CHECK(ok.compressor().state_rows() == rows - 1);
    CHECK(contains(error_message_of(
                       [&] { ok.forward({}, x.cview(), w.cview(), {}, y.view(), saved, 0, {ws.data(), ws.size()}); }),
                   "max_rows=4"));

    // N = 0: nothing saved, the state untouched, G overwritten with zeros.
    bytes state5(ok.state_bytes(rows));
    ok.bind_state({}, state5.data(), state5.size());
    const std::uint64_t marker = 3;
    std::memcpy(state5.data(), &marker, sizeof marker);
    ok.forward({}, x.cview().row_block(0, 0), w.cview(), {}, y.view().row_block(0, 0), saved, 0, {ws.data(), ws.size()});
    std::vector<T> g(static_cast<std::size_t>(m * n), T(5));
    compact::layer_gradient<T> grads{compact::make_view(g.data(), m, n), {}};
    ok.backward({}, y.cview().row_block(0, 0), w.cview(), saved, {}, grads, {ws.data(), ws.size()});
    for (T e : g) CHECK(e == T(0));
    CHECK(read_state<typename wlayer<T>::compressor_type>(state5.data(), rows).first == marker);
}

TEST_CASE_TEMPLATE("wta_crs: an input group of two members accumulates the group's dY norms", T, float, double)
{
    auto rng = compact_test::make_rng(1004);
    using group_t = compact::input_group<T, compact::wta_crs, compact::cpu>;
    using compressor_t = typename group_t::compressor_type;
    constexpr index_t n = 7, rows = 8;
    const std::vector<index_t> outs{3, 4};
    group_t group(compact::in_features{n}, outs, 9, 50, compact::wta_crs{1.0});
    bytes state(group.state_bytes(rows)), saved_memory(group.saved_bytes(rows)), ws(group.workspace_bytes(rows));
    group.bind_state({}, state.data(), state.size());
    const host_matrix<T> x = uneven_rows<T>(rng, rows, n);
    auto saved = compact::bind_saved<typename group_t::saved_type>(saved_memory.data(), saved_memory.size());
    group.compress({}, x.cview(), 0, saved, {ws.data(), ws.size()});
    std::vector<double> norms(rows, 0.0);
    for (std::size_t k = 0; k < outs.size(); ++k) {
        CAPTURE(k);
        const index_t m = outs[k];
        host_matrix<T> w(m, n), dy(rows, m);
        w.randomize(rng);
        dy.randomize(rng);
        for (index_t i = 0; i < rows; ++i)
            for (index_t j = 0; j < m; ++j) norms[static_cast<std::size_t>(i)] += static_cast<double>(dy(i, j)) * static_cast<double>(dy(i, j));
        std::vector<T> g(static_cast<std::size_t>(m * n));
        compact::layer_gradient<T> grads{compact::make_view(g.data(), m, n), {}};
        group.layer(k).backward({}, dy.cview(), w.cview(), saved, {}, grads, {ws.data(), ws.size()});
        CHECK_RELATIVE(compact_test::rel_error(compact_test::to_double(compact::const_matrix_view<T>(g.data(), m, n)),
                                               compact_test::matmul(compact_test::transpose(dy.to_double()), x.to_double())),
                       tolerance<T>);
    }
    const auto [acc_rows, acc] = read_state<compressor_t>(state.data(), rows);
    CHECK(acc_rows == static_cast<std::uint64_t>(rows));
    CHECK_RELATIVE(compact_test::rel_error(acc, norms), tolerance<T>);
    // The next compress consumes them.
    group.compress({}, x.cview(), 1, saved, {ws.data(), ws.size()});
    const auto [after_rows, after] = read_state<compressor_t>(state.data(), rows);
    CHECK(after_rows == 0);
    for (double e : after) CHECK(e == 0.0);
}

TEST_CASE_TEMPLATE("wta_crs in linear_layer: plain AdamW trains it; a checkpoint resumes bit for bit", T, float, double)
{
    using layer_t = compact::linear_layer<T, compact::wta_crs, compact::cpu>;
    auto rng = compact_test::make_rng(1005);
    constexpr index_t n = 9, m = 4, rows = 10;
    compact::linear_options o;
    o.seed = 12;
    o.layer = 4;
    o.max_rows = rows;
    const compact::wta_crs policy{0.4};
    layer_t a(compact::in_features{n}, compact::out_features{m}, o, policy);
    CHECK(a.rank() == n);
    CHECK(a.compressor_state_bytes() == a.compressor().state_bytes(rows));
    for (index_t i = 0; i < m; ++i)
        for (index_t j = 0; j < n; ++j) a.weight()(i, j) = static_cast<T>(compact_test::uniform(rng));
    compact::adamw_params h;
    h.lr = 1e-2;
    h.weight_decay = 0.01;
    auto train = [&](layer_t& l, std::uint64_t seed) {
        auto r = compact_test::make_rng(seed);
        const host_matrix<T> x = uneven_rows<T>(r, rows, n);
        host_matrix<T> dy(rows, m), y(rows, m);
        dy.randomize(r);
        l.forward({}, x.cview(), y.view());
        l.backward({}, dy.cview(), {});
        return l.step({}, h);
    };
    const std::vector<T> w0 = compact_test::copy_of(compact::const_matrix_view<T>(a.weight()));
    REQUIRE(train(a, 200));
    REQUIRE(train(a, 201));
    CHECK_FALSE(compact_test::bit_equal(w0, compact_test::copy_of(compact::const_matrix_view<T>(a.weight()))));
    const std::string path = temp_path(sizeof(T) == 4 ? "f.ckpt" : "d.ckpt");
    compact::save_checkpoint(path, a);
    REQUIRE(train(a, 202));
    REQUIRE(train(a, 203));

    layer_t b(compact::in_features{n}, compact::out_features{m}, o, policy);
    compact::load_checkpoint(path, b);
    REQUIRE(train(b, 202));
    REQUIRE(train(b, 203));
    CHECK(compact_test::bit_equal(compact_test::copy_of(compact::const_matrix_view<T>(a.weight())),
                                  compact_test::copy_of(compact::const_matrix_view<T>(b.weight()))));
    CHECK(compact_test::bit_equal(compact_test::copy_of(compact::const_matrix_view<T>(a.second_moment())),
                                  compact_test::copy_of(compact::const_matrix_view<T>(b.second_moment()))));
    CHECK(std::memcmp(a.compressor_state(), b.compressor_state(), a.compressor_state_bytes()) == 0);

    // The configuration and the state's size must match, named.
    layer_t other(compact::in_features{n}, compact::out_features{m}, o, compact::wta_crs{0.5});
    CHECK(contains(error_message_of([&] { compact::load_checkpoint(path, other); }), "wta_ratio"));
    compact::linear_options bigger = o;
    bigger.max_rows = rows + 20;
    layer_t wide(compact::in_features{n}, compact::out_features{m}, bigger, policy);
    CHECK(contains(error_message_of([&] { compact::load_checkpoint(path, wide); }), "comp_state"));
    std::filesystem::remove(path);
}
