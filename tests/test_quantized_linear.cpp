// Tests of the linear layer with the `quantized` policy: X kept in an activation store, the full-shape
// weight gradient dY^T X^, plain AdamW (compressed_linear / linear_layer with compact::quantized).
//
// Tolerances against the float64 reference, relative Frobenius error: float 1e-5, double 1e-12 (the
// argument of test_compressed_linear.cpp). Y, dX and db must be exact to that tolerance whatever the
// scheme; G is compared with dY^T X^ for the X^ the store restores, and with dY^T X for the full scheme.
#include "reference.hpp"
#include "test_support.hpp"

#include <compact/backend/cpu/cpu.hpp>
#include <compact/compress/activation_store.hpp>
#include <compact/nn/compressed_linear.hpp>
#include <compact/nn/linear_layer.hpp>

#include <doctest/doctest.h>

#include <cstddef>
#include <cstdint>
#include <vector>

using compact::index_t;
using compact::store_scheme;
using compact_test::contains;
using compact_test::dmatrix;
using compact_test::error_message_of;
using compact_test::host_matrix;

namespace {

template <class T>
constexpr double tolerance = sizeof(T) == 4 ? 1e-5 : 1e-12;

template <class T>
using qlayer = compact::compressed_linear<T, compact::quantized, compact::cpu>;

struct aligned_bytes {
    explicit aligned_bytes(std::size_t n) : words(n / 8 + 2) {}
    std::byte* data() { return reinterpret_cast<std::byte*>(words.data()); }
    std::size_t size() const { return (words.size() - 1) * 8; }
    std::vector<std::uint64_t> words;
};

std::vector<double> column_sums(const dmatrix& a)
{
    std::vector<double> s(static_cast<std::size_t>(a.cols), 0.0);
    for (index_t i = 0; i < a.rows; ++i)
        for (index_t j = 0; j < a.cols; ++j) s[static_cast<std::size_t>(j)] += a(i, j);
    return s;
}

} // namespace

TEST_CASE_TEMPLATE("quantized layer: Y, dX and db exact, G = dY^T X^ for every scheme, odd shapes and padding", T,
                   float, double)
{
    auto rng = compact_test::make_rng(404);
    const store_scheme schemes[] = {store_scheme::full_precision(), store_scheme::quantized(8, 64),
                                    store_scheme::quantized(2, 128), store_scheme::quantized(1, 256),
                                    store_scheme::average(32)};
    struct shape {
        index_t rows, in, out, pad;
    };
    for (const shape s : {shape{37, 29, 11, 0}, shape{37, 29, 11, 2}, shape{1, 8, 3, 1}, shape{300, 64, 40, 0}})
        for (const store_scheme& sc : schemes) {
            CAPTURE(compact::to_string(sc));
            CAPTURE(s.rows);
            CAPTURE(s.pad);
            const qlayer<T> layer(s.in, s.out, 9, 3, compact::quantized{sc});
            CHECK(layer.rank() == s.in);
            CHECK(layer.saved_bytes(s.rows) == compact::stored_bytes<T>(sc, s.rows * s.in));
            host_matrix<T> x(s.rows, s.in, s.pad), w(s.out, s.in, s.pad), dy(s.rows, s.out, s.pad);
            x.randomize(rng);
            w.randomize(rng);
            dy.randomize(rng);
            std::vector<T> b(static_cast<std::size_t>(s.out)), db(b.size());
            compact_test::random_fill(b, rng);
            host_matrix<T> y(s.rows, s.out, s.pad), dx(s.rows, s.in, s.pad), g(s.out, s.in, s.pad);
            aligned_bytes bytes(layer.saved_bytes(s.rows));
            compact::saved_tensor saved{bytes.data(), bytes.size()};
            layer.forward({}, x.cview(), w.cview(), b.data(), y.view(), saved, 5);
            // A workspace of 7 rows: backward restores X^ in slices and accumulates G over them.
            std::vector<std::byte> ws(layer.workspace_bytes(7));
            layer.backward({}, dy.cview(), w.cview(), saved, dx.view(), g.view(), db.data(), {ws.data(), ws.size()});

            const dmatrix xd = x.to_double(), wd = w.to_double(), dyd = dy.to_double();
            dmatrix yref = compact_test::matmul(xd, compact_test::transpose(wd));
            for (index_t i = 0; i < s.rows; ++i)
                for (index_t j = 0; j < s.out; ++j) yref(i, j) += static_cast<double>(b[static_cast<std::size_t>(j)]);
            CHECK(compact_test::rel_error(y.to_double(), yref) < tolerance<T>);
            CHECK(compact_test::rel_error(dx.to_double(), compact_test::matmul(dyd, wd)) < tolerance<T>);
            CHECK(compact_test::rel_error(std::vector<double>(db.begin(), db.end()), column_sums(dyd)) < tolerance<T>);

            host_matrix<T> x_hat(s.rows, s.in);
            layer.store().restore({}, saved, x_hat.view());
            const dmatrix gref = compact_test::matmul(compact_test::transpose(dyd), x_hat.to_double());
            CHECK(compact_test::rel_error(g.to_double(), gref) < tolerance<T>);
            if (sc.kind == compact::store_kind::full)
                CHECK(compact_test::rel_error(g.to_double(), compact_test::matmul(compact_test::transpose(dyd), xd)) <
                      tolerance<T>);
            CHECK(y.padding_intact());
            CHECK(dx.padding_intact());
            CHECK(g.padding_intact());

            // Accumulate: a second backward adds the same G again.
            layer.backward({}, dy.cview(), w.cview(), saved, {}, g.view(), nullptr, {ws.data(), ws.size()},
                           compact::write_mode::accumulate);
            dmatrix twice = gref;
            for (double& v : twice.data) v *= 2;
            CHECK(compact_test::rel_error(g.to_double(), twice) < tolerance<T>);
        }
}

TEST_CASE("quantized layer with the int2 store: G is an unbiased estimate of dY^T X over steps")
{
    // G(step) = dY^T X^(step) with E[X^] = X, so the mean over K steps converges to dY^T X like
    // 1/sqrt(K). The squared error of the mean sums the variances of 768 elements, so it concentrates
    // near its prediction (the per-step spread / K; relative fluctuation ~ sqrt(2 / 768) = 5%): checked
    // at 1.5x the predicted value, and a 5% bias must exceed that bound (negative control).
    auto rng = compact_test::make_rng(99);
    const index_t rows = 64, in = 48, out = 16;
    const qlayer<double> layer(in, out, 1, 2, compact::quantized{store_scheme::quantized(2, 64)});
    host_matrix<double> x(rows, in), w(out, in), dy(rows, out), y(rows, out), g(out, in);
    x.randomize(rng);
    w.randomize(rng);
    dy.randomize(rng);
    const dmatrix want = compact_test::matmul(compact_test::transpose(dy.to_double()), x.to_double());
    aligned_bytes bytes(layer.saved_bytes(rows));
    compact::saved_tensor saved{bytes.data(), bytes.size()};
    std::vector<std::byte> ws(layer.workspace_bytes(rows));
    const int K = 400;
    dmatrix mean(out, in);
    double spread = 0;
    for (int step = 0; step < K; ++step) {
        layer.forward({}, x.cview(), w.cview(), nullptr, y.view(), saved, static_cast<std::uint64_t>(step));
        layer.backward({}, dy.cview(), w.cview(), saved, {}, g.view(), nullptr, {ws.data(), ws.size()});
        const dmatrix gd = g.to_double();
        for (std::size_t k = 0; k < mean.data.size(); ++k) {
            mean.data[k] += gd.data[k] / K;
            spread += (gd.data[k] - want.data[k]) * (gd.data[k] - want.data[k]) / K;
        }
    }
    const double predicted = std::sqrt(spread / K) / compact_test::frobenius(want); // standard error, relative
    const double error = compact_test::rel_error(mean, want);
    CHECK(error < 1.5 * predicted);
    dmatrix biased = want;
    for (double& v : biased.data) v *= 1.05;
    CHECK(compact_test::rel_error(mean, biased) > 1.5 * predicted);
}

TEST_CASE("linear_layer<quantized> with the full scheme trains bit-identically to rank::full")
{
    // Both keep X exactly (Z = X I, or X itself), compute G = dY^T X in one GEMM (N <= 1024 rows) and run
    // plain AdamW: 20 steps must agree bit for bit.
    const index_t rows = 50, in = 24, out = 12;
    compact::linear_options options;
    options.seed = 3;
    options.layer = 1;
    options.max_rows = rows;
    compact::linear_layer<float, compact::quantized, compact::cpu> a(in, out, options,
                                                                     compact::quantized{store_scheme::full_precision()});
    compact::linear_layer<float, compact::rank::full, compact::cpu> b(in, out, options);
    auto rng = compact_test::make_rng(5);
    host_matrix<float> w0(out, in);
    w0.randomize(rng, -0.3, 0.3);
    for (index_t i = 0; i < out; ++i)
        for (index_t j = 0; j < in; ++j) a.weight()(i, j) = b.weight()(i, j) = w0(i, j);
    compact::adamw_params hyper;
    hyper.lr = 1e-2;
    host_matrix<float> x(rows, in), dy(rows, out), ya(rows, out), yb(rows, out), dxa(rows, in), dxb(rows, in);
    for (int step = 0; step < 20; ++step) {
        x.randomize(rng);
        dy.randomize(rng);
        a.forward({}, x.cview(), ya.view());
        b.forward({}, x.cview(), yb.view());
        a.backward({}, dy.cview(), dxa.view());
        b.backward({}, dy.cview(), dxb.view());
        a.step({}, hyper);
        b.step({}, hyper);
    }
    CHECK(compact_test::bit_equal(compact_test::copy_of<float>(a.weight()), compact_test::copy_of<float>(b.weight())));
    CHECK(compact_test::bit_equal(dxa.data, dxb.data));
    CHECK(a.saved_bytes(rows) == b.saved_bytes(rows));
}

TEST_CASE("linear_layer<quantized>: bytes follow the scheme, set_scheme regrows the buffer, training reduces the loss")
{
    const index_t rows = 128, in = 64, out = 8;
    compact::linear_options options;
    options.seed = 11;
    options.max_rows = rows;
    compact::linear_layer<float, compact::quantized, compact::cpu> layer(in, out, options,
                                                                         compact::quantized{store_scheme::average()});
    CHECK(layer.saved_bytes(rows) == compact::stored_bytes<float>(store_scheme::average(), rows * in));
    CHECK(layer.state_bytes() == 2 * sizeof(float) * static_cast<std::size_t>(out * in + out)); // full AdamW
    // A linear teacher: the int4 layer must fit it (the loss falls by 10x).
    auto rng = compact_test::make_rng(8);
    host_matrix<float> teacher(out, in), x(rows, in), y(rows, out), dy(rows, out);
    teacher.randomize(rng);
    layer.set_scheme(store_scheme::quantized(4));
    CHECK(layer.saved_bytes(rows) == compact::stored_bytes<float>(store_scheme::quantized(4), rows * in));
    compact::adamw_params hyper;
    hyper.lr = 2e-2;
    double first = 0, last = 0;
    for (int step = 0; step < 150; ++step) {
        x.randomize(rng);
        const dmatrix target = compact_test::matmul(x.to_double(), compact_test::transpose(teacher.to_double()));
        layer.forward({}, x.cview(), y.view());
        double loss = 0;
        for (index_t i = 0; i < rows; ++i)
            for (index_t j = 0; j < out; ++j) {
                const double d = y(i, j) - target(i, j);
                dy(i, j) = static_cast<float>(d / rows);
                loss += d * d / rows;
            }
        if (step == 0) first = loss;
        last = loss;
        layer.backward({}, dy.cview(), {});
        layer.step({}, hyper);
    }
    CHECK(last < first / 10);
}

TEST_CASE("quantized layer errors name the argument")
{
    const qlayer<float> layer(10, 4, 1, 1, compact::quantized{store_scheme::quantized(4, 8)});
    host_matrix<float> x(6, 10), w(4, 10), y(6, 4), dy(5, 4), g(4, 10);
    aligned_bytes bytes(layer.saved_bytes(6));
    compact::saved_tensor saved{bytes.data(), layer.saved_bytes(6) - 1};
    CHECK(contains(error_message_of([&] { layer.forward({}, x.cview(), w.cview(), nullptr, y.view(), saved, 0); }),
                   "compressed_linear::forward: saved tensor holds"));
    CHECK(y(0, 0) == 0.0f); // nothing written
    saved.capacity = bytes.size();
    std::vector<std::byte> ws(layer.workspace_bytes(6));
    CHECK(contains(error_message_of([&] {
                       layer.backward({}, dy.cview(), w.cview(), saved, {}, g.view(), nullptr, {ws.data(), ws.size()});
                   }),
                   "holds nothing"));
    layer.forward({}, x.cview(), w.cview(), nullptr, y.view(), saved, 0);
    CHECK(contains(error_message_of([&] {
                       layer.backward({}, dy.cview(), w.cview(), saved, {}, g.view(), nullptr, {ws.data(), ws.size()});
                   }),
                   "dY is (5, 4) but the saved X has 6 rows"));
    host_matrix<float> dy6(6, 4);
    CHECK(contains(error_message_of([&] {
                       layer.backward({}, dy6.cview(), w.cview(), saved, {}, g.view(), nullptr, {ws.data(), 16});
                   }),
                   "workspace holds 16 bytes but one row of X (10 values) needs"));
    const qlayer<float> other(10, 4, 1, 2, compact::quantized{store_scheme::quantized(4, 8)});
    CHECK(contains(error_message_of([&] {
                       other.backward({}, dy6.cview(), w.cview(), saved, {}, g.view(), nullptr, {ws.data(), ws.size()});
                   }),
                   "not by this one"));
    CHECK(contains(error_message_of([&] { qlayer<float>(10, 4, 1, 1, compact::quantized{store_scheme::quantized(6)}); }),
                   "bits=6"));
}
