// Tests of VeLoRA's compressor (compact/compress/velora.hpp, SPEC section 9) in compressed_linear,
// input_group and linear_layer on the CPU backend (tests/cuda/test_cuda_compressors.cu compares the CUDA
// backend with it).
//
// Tolerances against the float64 reference, relative Frobenius error: float 1e-5, double 1e-12 (as
// test_compressed_linear.cpp: a few hundred roundings of unit-size values). The reference computes v, the
// coefficients and G = scale dY^T X^ from X and dY in float64 by the definitions.
#include "reference.hpp"
#include "test_support.hpp"

#include <compact/backend/cpu/cpu.hpp>
#include <compact/compress/velora.hpp>
#include <compact/io/linear_layer_checkpoint.hpp>
#include <compact/nn/compressed_linear.hpp>
#include <compact/nn/linear_layer.hpp>

#include <doctest/doctest.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
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
using vlayer = compact::compressed_linear<T, compact::velora, compact::cpu>;

using bytes = compact::cpu::buffer<std::byte>;

/// The float64 reference: v = normalised mean sub-token of x (N, n) split into g groups.
std::vector<double> reference_direction(const dmatrix& x, index_t g)
{
    const index_t s = x.cols / g;
    std::vector<double> v(static_cast<std::size_t>(s), 0.0);
    for (index_t i = 0; i < x.rows; ++i)
        for (index_t j = 0; j < x.cols; ++j) v[static_cast<std::size_t>(j % s)] += x(i, j);
    double norm = 0;
    for (double e : v) norm += e * e;
    for (double& e : v) e /= std::sqrt(norm);
    return v;
}

/// X^ (N, n): each sub-token replaced by <x_{i,g}, v> v.
dmatrix reference_reconstruction(const dmatrix& x, const std::vector<double>& v)
{
    const auto s = static_cast<index_t>(v.size());
    dmatrix r(x.rows, x.cols);
    for (index_t i = 0; i < x.rows; ++i)
        for (index_t g0 = 0; g0 < x.cols; g0 += s) {
            double c = 0;
            for (index_t t = 0; t < s; ++t) c += x(i, g0 + t) * v[static_cast<std::size_t>(t)];
            for (index_t t = 0; t < s; ++t) r(i, g0 + t) = c * v[static_cast<std::size_t>(t)];
        }
    return r;
}

dmatrix scaled(dmatrix a, double s)
{
    for (double& e : a.data) e *= s;
    return a;
}

template <class T>
std::vector<double> read_direction(const compact::velora_compressor<T, compact::cpu>& c)
{
    const auto v = c.direction();
    return std::vector<double>(v.data, v.data + v.cols);
}

std::string temp_path(const char* name)
{
    return (std::filesystem::temp_directory_path() /
            ("compact-test-velora-" + std::to_string(::getpid()) + "-" + name))
        .string();
}

} // namespace

TEST_CASE_TEMPLATE("velora: v is the normalised first-batch mean; C and G = scale dY^T X^ match float64, strided "
                   "views included",
                   T, float, double)
{
    auto rng = compact_test::make_rng(901);
    constexpr index_t n = 24, groups = 4, m = 5, rows = 7;
    const double scale = 0.75;
    for (const index_t pad : {index_t{0}, index_t{3}}) {
        CAPTURE(pad);
        vlayer<T> fc(compact::in_features{n}, compact::out_features{m}, 11, 3, compact::velora{groups, scale});
        CHECK(vlayer<T>::has_state);
        CHECK(fc.state_bytes(rows) == compact::detail::align_up(sizeof(T) * (n / groups)));
        CHECK(fc.saved_bytes(rows) == static_cast<std::size_t>(rows * groups) * sizeof(T));
        bytes state(fc.state_bytes(rows)), saved_memory(fc.saved_bytes(rows)), ws(fc.workspace_bytes(rows));
        fc.bind_state({}, state.data(), state.size());
        CHECK_FALSE(fc.compressor().direction().data == nullptr);

        host_matrix<T> x(rows, n, pad), w(m, n), dy(rows, m, pad), y(rows, m), dx(rows, n);
        x.randomize(rng, -0.5, 1.0); // a mean sub-token away from zero
        w.randomize(rng);
        dy.randomize(rng);
        std::vector<T> b(m, T(0.25)), db(m), g_store(static_cast<std::size_t>(m * (n + pad)));
        compact::matrix_view<T> g(g_store.data(), m, n, n + pad);
        auto saved = compact::bind_saved<typename vlayer<T>::saved_type>(saved_memory.data(), saved_memory.size());
        fc.forward({}, x.cview(), w.cview(), {b.data(), 1, m}, y.view(), saved, 4, {ws.data(), ws.size()});
        compact::layer_gradient<T> grads{g, {db.data(), 1, m}};
        fc.backward({}, dy.cview(), w.cview(), saved, dx.view(), grads, {ws.data(), ws.size()});

        const dmatrix xd = x.to_double(), dyd = dy.to_double();
        const auto v_ref = reference_direction(xd, groups);
        CHECK_RELATIVE(compact_test::rel_error(read_direction(fc.compressor()), v_ref), tolerance<T>);
        // The coefficients: (N, G) row-major in the saved memory.
        dmatrix c_ref(rows, groups), c_got(rows, groups);
        const auto c = fc.compressor().coefficients(saved);
        for (index_t i = 0; i < rows; ++i)
            for (index_t k = 0; k < groups; ++k) {
                for (index_t t = 0; t < n / groups; ++t) c_ref(i, k) += xd(i, k * (n / groups) + t) * v_ref[static_cast<std::size_t>(t)];
                c_got(i, k) = static_cast<double>(c(i, k));
            }
        CHECK_RELATIVE(compact_test::rel_error(c_got, c_ref), tolerance<T>);
        const dmatrix g_ref = scaled(compact_test::matmul(compact_test::transpose(dyd), reference_reconstruction(xd, v_ref)), scale);
        CHECK_RELATIVE(compact_test::rel_error(compact_test::to_double(compact::const_matrix_view<T>(g)), g_ref), tolerance<T>);
        // Y and dX do not depend on the compressor.
        dmatrix y_ref = compact_test::matmul(xd, compact_test::transpose(w.to_double()));
        for (index_t i = 0; i < rows; ++i)
            for (index_t j = 0; j < m; ++j) y_ref(i, j) += 0.25;
        CHECK_RELATIVE(compact_test::rel_error(y.to_double(), y_ref), tolerance<T>);
        CHECK_RELATIVE(compact_test::rel_error(dx.to_double(), compact_test::matmul(dyd, w.to_double())), tolerance<T>);
        CHECK(x.padding_intact());
        for (index_t i = 0; i < m; ++i)
            for (index_t j = n; j < n + pad; ++j) CHECK(g_store[static_cast<std::size_t>(i * (n + pad) + j)] == T(0));

        // Accumulating a second batch: v stays the first batch's; G adds the second's estimate.
        const std::vector<double> v_first = read_direction(fc.compressor());
        host_matrix<T> x2(rows, n, pad), dy2(rows, m);
        x2.randomize(rng, -1.0, 0.2);
        dy2.randomize(rng);
        fc.forward({}, x2.cview(), w.cview(), {b.data(), 1, m}, y.view(), saved, 4, {ws.data(), ws.size()});
        fc.backward({}, dy2.cview(), w.cview(), saved, {}, grads, {ws.data(), ws.size()}, compact::write_mode::accumulate);
        CHECK(compact_test::bit_equal(read_direction(fc.compressor()), v_first));
        dmatrix g2_ref = scaled(compact_test::matmul(compact_test::transpose(dy2.to_double()),
                                                     reference_reconstruction(x2.to_double(), v_ref)),
                                scale);
        for (std::size_t k = 0; k < g2_ref.data.size(); ++k) g2_ref.data[k] += g_ref.data[k];
        CHECK_RELATIVE(compact_test::rel_error(compact_test::to_double(compact::const_matrix_view<T>(g)), g2_ref), tolerance<T>);
    }
}

TEST_CASE_TEMPLATE("velora: exact when every sub-token lies on one direction", T, float, double)
{
    auto rng = compact_test::make_rng(902);
    constexpr index_t n = 32, groups = 8, s = n / groups, m = 6, rows = 9;
    std::vector<double> u(s);
    for (double& e : u) e = compact_test::uniform(rng);
    host_matrix<T> x(rows, n), dy(rows, m), w(m, n), y(rows, m);
    for (index_t i = 0; i < rows; ++i)
        for (index_t k = 0; k < groups; ++k) {
            const double c = compact_test::uniform(rng, -0.5, 2.0); // mean > 0: v = u / |u|
            for (index_t t = 0; t < s; ++t) x(i, k * s + t) = static_cast<T>(c * u[static_cast<std::size_t>(t)]);
        }
    dy.randomize(rng);
    w.randomize(rng);
    vlayer<T> fc(compact::in_features{n}, compact::out_features{m}, 1, 2, compact::velora{groups});
    bytes state(fc.state_bytes(rows)), saved_memory(fc.saved_bytes(rows)), ws(fc.workspace_bytes(rows));
    fc.bind_state({}, state.data(), state.size());
    auto saved = compact::bind_saved<typename vlayer<T>::saved_type>(saved_memory.data(), saved_memory.size());
    std::vector<T> g(static_cast<std::size_t>(m * n));
    fc.forward({}, x.cview(), w.cview(), {}, y.view(), saved, 0, {ws.data(), ws.size()});
    compact::layer_gradient<T> grads{compact::make_view(g.data(), m, n), {}};
    fc.backward({}, dy.cview(), w.cview(), saved, {}, grads, {ws.data(), ws.size()});
    const dmatrix g_exact = compact_test::matmul(compact_test::transpose(dy.to_double()), x.to_double());
    CHECK_RELATIVE(compact_test::rel_error(compact_test::to_double(compact::const_matrix_view<T>(g.data(), m, n)), g_exact),
                   tolerance<T>);
    double norm = 0;
    for (double e : u) norm += e * e;
    std::vector<double> v_ref(u);
    for (double& e : v_ref) e /= std::sqrt(norm);
    CHECK_RELATIVE(compact_test::rel_error(read_direction(fc.compressor()), v_ref), tolerance<T>);
}

TEST_CASE_TEMPLATE("velora: bad arguments and unbound state are errors naming the argument; N = 0 is a no-op", T,
                   float, double)
{
    const std::string e1 = error_message_of([] {
        vlayer<T>(compact::in_features{24}, compact::out_features{4}, 0, 0, compact::velora{5});
    });
    CHECK(contains(e1, "groups=5"));
    CHECK(contains(e1, "in=24"));
    CHECK(contains(e1, "compressed_linear"));
    CHECK(contains(error_message_of([] {
                       vlayer<T>(compact::in_features{24}, compact::out_features{4}, 0, 0, compact::velora{0});
                   }),
                   "groups=0"));
    CHECK(contains(error_message_of([] {
                       vlayer<T>(compact::in_features{24}, compact::out_features{4}, 0, 0, compact::velora{4, -1.0});
                   }),
                   "scale=-1"));

    constexpr index_t n = 12, m = 3, rows = 4;
    vlayer<T> fc(compact::in_features{n}, compact::out_features{m}, 0, 7, compact::velora{3});
    bytes saved_memory(fc.saved_bytes(rows)), ws(fc.workspace_bytes(rows));
    auto saved = compact::bind_saved<typename vlayer<T>::saved_type>(saved_memory.data(), saved_memory.size());
    std::vector<T> x(static_cast<std::size_t>(rows * n), T(1)), w(static_cast<std::size_t>(m * n), T(1)),
        y(static_cast<std::size_t>(rows * m));
    const std::string unbound = error_message_of([&] {
        fc.forward({}, compact::const_matrix_view<T>(x.data(), rows, n), compact::const_matrix_view<T>(w.data(), m, n), {},
                   compact::make_view(y.data(), rows, m), saved, 0, {ws.data(), ws.size()});
    });
    CHECK(contains(unbound, "velora::compress"));
    CHECK(contains(unbound, "not bound"));
    bytes state(fc.state_bytes(rows));
    CHECK(contains(error_message_of([&] { fc.bind_state({}, state.data(), state.size() - 1); }), "state memory holds"));
    bytes larger(state.size() + 16);
    CHECK(contains(error_message_of([&] { fc.bind_state({}, larger.data() + 1, state.size()); }), "aligned"));
    fc.bind_state({}, state.data(), state.size());

    // N = 0: nothing saved, v untouched (still to be initialised), G overwritten with zeros.
    fc.forward({}, compact::const_matrix_view<T>(x.data(), 0, n), compact::const_matrix_view<T>(w.data(), m, n), {},
               compact::make_view(y.data(), 0, m), saved, 0, {ws.data(), ws.size()});
    std::vector<T> g(static_cast<std::size_t>(m * n), T(5));
    compact::layer_gradient<T> grads{compact::make_view(g.data(), m, n), {}};
    std::vector<T> dy;
    fc.backward({}, compact::const_matrix_view<T>(dy.data(), 0, m), compact::const_matrix_view<T>(w.data(), m, n), saved,
                {}, grads, {ws.data(), ws.size()});
    for (T e : g) CHECK(e == T(0));
    for (double e : read_direction(fc.compressor())) CHECK(e == 0.0);
}

TEST_CASE_TEMPLATE("velora: an input group of two members shares v and one saved activation", T, float, double)
{
    auto rng = compact_test::make_rng(903);
    constexpr index_t n = 16, groups = 4, rows = 6;
    const std::vector<index_t> outs{3, 5};
    compact::input_group<T, compact::velora, compact::cpu> group(compact::in_features{n}, outs, 5, 40,
                                                                  compact::velora{groups, 2.0});
    CHECK(group.saved_bytes(rows) == static_cast<std::size_t>(rows * groups) * sizeof(T));
    bytes state(group.state_bytes(rows)), saved_memory(group.saved_bytes(rows)), ws(group.workspace_bytes(rows));
    CHECK(contains(error_message_of([&] {
                       host_matrix<T> x(rows, n);
                       auto saved = compact::bind_saved<compact::saved_activation>(saved_memory.data(), saved_memory.size());
                       group.compress({}, x.cview(), 0, saved, {ws.data(), ws.size()});
                   }),
                   "not bound"));
    group.bind_state({}, state.data(), state.size());
    host_matrix<T> x(rows, n);
    x.randomize(rng, -0.3, 1.0);
    auto saved = compact::bind_saved<compact::saved_activation>(saved_memory.data(), saved_memory.size());
    group.compress({}, x.cview(), 2, saved, {ws.data(), ws.size()});
    const auto v_ref = reference_direction(x.to_double(), groups);
    const dmatrix x_hat = reference_reconstruction(x.to_double(), v_ref);
    for (std::size_t k = 0; k < outs.size(); ++k) {
        CAPTURE(k);
        const index_t m = outs[k];
        CHECK(group.layer(k).compressor().direction().data == group.compressor().direction().data);
        host_matrix<T> w(m, n), dy(rows, m);
        w.randomize(rng);
        dy.randomize(rng);
        std::vector<T> g(static_cast<std::size_t>(m * n));
        compact::layer_gradient<T> grads{compact::make_view(g.data(), m, n), {}};
        group.layer(k).backward({}, dy.cview(), w.cview(), saved, {}, grads, {ws.data(), ws.size()});
        const dmatrix g_ref = scaled(compact_test::matmul(compact_test::transpose(dy.to_double()), x_hat), 2.0);
        CHECK_RELATIVE(compact_test::rel_error(compact_test::to_double(compact::const_matrix_view<T>(g.data(), m, n)), g_ref),
                       tolerance<T>);
    }
}

TEST_CASE_TEMPLATE("velora in linear_layer: plain AdamW on the full gradient; a checkpoint resumes bit for bit", T,
                   float, double)
{
    using layer_t = compact::linear_layer<T, compact::velora, compact::cpu>;
    auto rng = compact_test::make_rng(904);
    constexpr index_t n = 16, m = 4, rows = 5;
    compact::linear_options o;
    o.seed = 3;
    o.layer = 9;
    o.max_rows = rows;
    const compact::velora policy{4, 1.5};
    layer_t a(compact::in_features{n}, compact::out_features{m}, o, policy);
    CHECK(a.rank() == n);
    CHECK(a.compressor_state_bytes() == compact::detail::align_up(sizeof(T) * 4));
    for (index_t i = 0; i < m; ++i)
        for (index_t j = 0; j < n; ++j) a.weight()(i, j) = static_cast<T>(compact_test::uniform(rng));
    compact::adamw_params h;
    h.lr = 1e-2;
    auto batch = [&](std::uint64_t seed) {
        auto r = compact_test::make_rng(seed);
        host_matrix<T> x(rows, n), dy(rows, m);
        x.randomize(r, -0.2, 1.0);
        dy.randomize(r);
        return std::pair{x, dy};
    };
    auto train = [&](layer_t& l, std::uint64_t seed) {
        auto [x, dy] = batch(seed);
        host_matrix<T> y(rows, m);
        l.forward({}, x.cview(), y.view());
        l.backward({}, dy.cview(), {});
        return l.step({}, h);
    };

    // One step is plain AdamW on G = scale dY^T X^: t = 1 gives W - lr sqrt(1 - b2) / (1 - b1) M / (sqrt(V) + eps).
    {
        const std::vector<T> w0 = compact_test::copy_of(compact::const_matrix_view<T>(a.weight()));
        auto [x, dy] = batch(100);
        host_matrix<T> y(rows, m);
        a.forward({}, x.cview(), y.view());
        a.backward({}, dy.cview(), {});
        const std::vector<T> g = compact_test::copy_of(a.gradient());
        const dmatrix g_ref = scaled(compact_test::matmul(compact_test::transpose(dy.to_double()),
                                                          reference_reconstruction(x.to_double(), reference_direction(x.to_double(), 4))),
                                     1.5);
        CHECK_RELATIVE(compact_test::rel_error(compact_test::to_double(a.gradient()), g_ref), tolerance<T>);
        REQUIRE(a.step({}, h));
        std::vector<double> w_ref(w0.size());
        for (std::size_t k = 0; k < w0.size(); ++k) {
            const double gk = static_cast<double>(g[k]);
            const double mk = (1 - h.beta1) * gk, vk = (1 - h.beta2) * gk * gk;
            w_ref[k] = static_cast<double>(w0[k]) - h.lr * std::sqrt(1 - h.beta2) / (1 - h.beta1) * mk / (std::sqrt(vk) + h.eps);
        }
        CHECK_RELATIVE(compact_test::relative_error(compact_test::copy_of(compact::const_matrix_view<T>(a.weight())), w_ref),
                       tolerance<T>);
    }
    train(a, 101);
    const std::string path = temp_path(sizeof(T) == 4 ? "f.ckpt" : "d.ckpt");
    compact::save_checkpoint(path, a);
    REQUIRE(train(a, 102));
    REQUIRE(train(a, 103));

    layer_t b(compact::in_features{n}, compact::out_features{m}, o, policy);
    compact::load_checkpoint(path, b);
    CHECK(compact_test::bit_equal(read_direction(b.compressor()), read_direction(a.compressor())));
    REQUIRE(train(b, 102));
    REQUIRE(train(b, 103));
    CHECK(compact_test::bit_equal(compact_test::copy_of(compact::const_matrix_view<T>(a.weight())),
                                  compact_test::copy_of(compact::const_matrix_view<T>(b.weight()))));
    CHECK(compact_test::bit_equal(compact_test::copy_of(compact::const_matrix_view<T>(a.first_moment())),
                                  compact_test::copy_of(compact::const_matrix_view<T>(b.first_moment()))));

    // Another G is a configuration mismatch, named.
    layer_t other(compact::in_features{n}, compact::out_features{m}, o, compact::velora{2, 1.5});
    CHECK(contains(error_message_of([&] { compact::load_checkpoint(path, other); }), "velora_groups"));
    // A new layer that loads a checkpoint saved before v existed initialises it from its own first batch.
    layer_t fresh(compact::in_features{n}, compact::out_features{m}, o, policy), c(compact::in_features{n}, compact::out_features{m}, o, policy);
    compact::save_checkpoint(path, fresh);
    compact::load_checkpoint(path, c);
    auto [x, dy] = batch(105);
    host_matrix<T> y(rows, m);
    c.forward({}, x.cview(), y.view());
    CHECK_RELATIVE(compact_test::rel_error(read_direction(c.compressor()), reference_direction(x.to_double(), 4)), tolerance<T>);
    std::filesystem::remove(path);
}
