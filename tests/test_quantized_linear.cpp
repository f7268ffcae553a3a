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
#include <compact/compress/store_compressor.hpp>
#include <compact/nn/compressed_linear.hpp>
#include <compact/nn/linear_layer.hpp>

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <iterator>
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
            const qlayer<T> layer(compact::in_features{s.in}, compact::out_features{s.out}, 9, 3,
                                  compact::quantized{sc});
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
            auto saved = compact::bind_saved<typename qlayer<T>::saved_type>(bytes.data(), bytes.size());
            // A workspace of 7 rows: backward restores X^ in slices and accumulates G over them.
            std::vector<std::byte> ws(layer.workspace_bytes(7));
            layer.forward({}, x.cview(), w.cview(), compact::const_matrix_view<T>(b.data(), 1, s.out), y.view(), saved,
                          5, {ws.data(), ws.size()});
            compact::layer_gradient<T> grads{g.view(), compact::matrix_view<T>(db.data(), 1, s.out)};
            layer.backward({}, dy.cview(), w.cview(), saved, dx.view(), grads, {ws.data(), ws.size()});
            CHECK(grads.written);
            CHECK(grads.epoch == 5);

            const dmatrix xd = x.to_double(), wd = w.to_double(), dyd = dy.to_double();
            dmatrix yref = compact_test::matmul(xd, compact_test::transpose(wd));
            for (index_t i = 0; i < s.rows; ++i)
                for (index_t j = 0; j < s.out; ++j) yref(i, j) += static_cast<double>(b[static_cast<std::size_t>(j)]);
            CHECK(compact_test::rel_error(y.to_double(), yref) < tolerance<T>);
            CHECK(compact_test::rel_error(dx.to_double(), compact_test::matmul(dyd, wd)) < tolerance<T>);
            CHECK(compact_test::rel_error(std::vector<double>(db.begin(), db.end()), column_sums(dyd)) < tolerance<T>);

            host_matrix<T> x_hat(s.rows, s.in);
            layer.compressor().store().restore({}, saved, x_hat.view());
            const dmatrix gref = compact_test::matmul(compact_test::transpose(dyd), x_hat.to_double());
            CHECK(compact_test::rel_error(g.to_double(), gref) < tolerance<T>);
            if (sc.kind == compact::store_kind::full)
                CHECK(compact_test::rel_error(g.to_double(), compact_test::matmul(compact_test::transpose(dyd), xd)) <
                      tolerance<T>);
            CHECK(y.padding_intact());
            CHECK(dx.padding_intact());
            CHECK(g.padding_intact());

            // Accumulate: a second backward adds the same G again.
            grads.bias = {};
            layer.backward({}, dy.cview(), w.cview(), saved, {}, grads, {ws.data(), ws.size()},
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
    const qlayer<double> layer(compact::in_features{in}, compact::out_features{out}, 1, 2,
                               compact::quantized{store_scheme::quantized(2, 64)});
    host_matrix<double> x(rows, in), w(out, in), dy(rows, out), y(rows, out), g(out, in);
    x.randomize(rng);
    w.randomize(rng);
    dy.randomize(rng);
    const dmatrix want = compact_test::matmul(compact_test::transpose(dy.to_double()), x.to_double());
    aligned_bytes bytes(layer.saved_bytes(rows));
    auto saved = compact::bind_saved<qlayer<double>::saved_type>(bytes.data(), bytes.size());
    std::vector<std::byte> ws(layer.workspace_bytes(rows));
    compact::layer_gradient<double> grads{g.view()};
    const int K = 400;
    dmatrix mean(out, in);
    double spread = 0;
    for (int step = 0; step < K; ++step) {
        layer.forward({}, x.cview(), w.cview(), {}, y.view(), saved, static_cast<std::uint64_t>(step),
                      {ws.data(), ws.size()});
        layer.backward({}, dy.cview(), w.cview(), saved, {}, grads, {ws.data(), ws.size()});
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
    using q_layer = compact::linear_layer<float, compact::quantized, compact::cpu>;
    q_layer a(compact::in_features{in}, compact::out_features{out}, options,
              compact::quantized{store_scheme::full_precision()});
    compact::linear_layer<float, compact::rank::full, compact::cpu> b(compact::in_features{in},
                                                                      compact::out_features{out}, options);
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
    compact::linear_layer<float, compact::quantized, compact::cpu> layer(compact::in_features{in},
                                                                         compact::out_features{out}, options,
                                                                         compact::quantized{store_scheme::average()});
    CHECK(layer.saved_bytes(rows) == compact::stored_bytes<float>(store_scheme::average(), rows * in));
    CHECK(layer.state_bytes() == 2 * sizeof(float) * static_cast<std::size_t>(out * in + out)); // full AdamW
    // A linear teacher: the int4 layer must fit it (the loss falls by 10x).
    auto rng = compact_test::make_rng(8);
    host_matrix<float> teacher(out, in), x(rows, in), y(rows, out), dy(rows, out);
    teacher.randomize(rng);
    layer.compressor().set_scheme(store_scheme::quantized(4));
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
    const qlayer<float> layer(compact::in_features{10}, compact::out_features{4}, 1, 1,
                              compact::quantized{store_scheme::quantized(4, 8)});
    host_matrix<float> x(6, 10), w(4, 10), y(6, 4), dy(5, 4), g(4, 10);
    aligned_bytes bytes(layer.saved_bytes(6));
    auto saved = compact::bind_saved<qlayer<float>::saved_type>(bytes.data(), layer.saved_bytes(6) - 1);
    std::vector<std::byte> ws(layer.workspace_bytes(6));
    const compact::workspace w6{ws.data(), ws.size()};
    CHECK(contains(error_message_of([&] { layer.forward({}, x.cview(), w.cview(), {}, y.view(), saved, 0, w6); }),
                   "store_compressor::compress: saved tensor holds"));
    CHECK(y(0, 0) == 0.0f); // nothing written
    saved.capacity = bytes.size();
    compact::layer_gradient<float> grads{g.view()};
    CHECK(contains(error_message_of([&] { layer.backward({}, dy.cview(), w.cview(), saved, {}, grads, w6); }),
                   "holds nothing"));
    layer.forward({}, x.cview(), w.cview(), {}, y.view(), saved, 0, w6);
    CHECK(contains(error_message_of([&] { layer.backward({}, dy.cview(), w.cview(), saved, {}, grads, w6); }),
                   "dY has 5 rows but the saved activation holds 6"));
    host_matrix<float> dy6(6, 4);
    CHECK(contains(error_message_of([&] {
                       layer.backward({}, dy6.cview(), w.cview(), saved, {}, grads, {ws.data(), 16});
                   }),
                   "workspace holds 16 bytes but one row of X (10 values) needs"));
    const qlayer<float> other(compact::in_features{10}, compact::out_features{4}, 1, 2,
                              compact::quantized{store_scheme::quantized(4, 8)});
    CHECK(contains(error_message_of([&] { other.backward({}, dy6.cview(), w.cview(), saved, {}, grads, w6); }),
                   "not by this one"));
    CHECK(!grads.written);
    CHECK(contains(error_message_of([&] {
                       qlayer<float>(compact::in_features{10}, compact::out_features{4}, 1, 1,
                                     compact::quantized{store_scheme::quantized(6)});
                   }),
                   "bits=6"));
}

TEST_CASE("quantized layer: N = 0 is a no-op for the store compressor")
{
    // compress with no rows writes no byte (a saved activation of 0 bytes will do) and records an
    // empty tensor; backward then writes G = 0 and db = 0 (overwrite) or leaves them (accumulate).
    const index_t in = 10, out = 4;
    const qlayer<float> layer(compact::in_features{in}, compact::out_features{out}, 1, 1,
                              compact::quantized{store_scheme::quantized(4, 8)});
    CHECK(layer.saved_bytes(0) == 0);
    const compact::const_matrix_view<float> x(nullptr, 0, in), dy(nullptr, 0, out);
    host_matrix<float> w(out, in), g(out, in);
    auto rng = compact_test::make_rng(12);
    w.randomize(rng);
    const compact::matrix_view<float> y(nullptr, 0, out), dx(nullptr, 0, in);

    // Directly on the compressor: no bytes at all, and a sentinel byte next to them stays.
    compact::saved_tensor none{};
    layer.compressor().compress({}, x, 3, none, {});
    CHECK(none.filled);
    CHECK(none.rows == 0);
    CHECK(none.cols == in);
    CHECK(none.epoch == 3);
    std::byte sentinel[8];
    std::fill(std::begin(sentinel), std::end(sentinel), std::byte{0x5A});
    auto saved = compact::bind_saved<qlayer<float>::saved_type>(sentinel, 0);
    std::vector<std::byte> ws(layer.workspace_bytes(0));
    layer.forward({}, x, w.cview(), {}, y, saved, 7, {ws.data(), ws.size()});
    CHECK(saved.filled);
    CHECK(saved.rows == 0);
    CHECK(std::all_of(std::begin(sentinel), std::end(sentinel), [](std::byte b) { return b == std::byte{0x5A}; }));

    for (index_t i = 0; i < out; ++i)
        for (index_t j = 0; j < in; ++j) g(i, j) = 5.0f;
    std::vector<float> db(static_cast<std::size_t>(out), 5.0f);
    compact::layer_gradient<float> grads{g.view(), compact::matrix_view<float>(db.data(), 1, out)};
    // No workspace is needed for no rows.
    layer.backward({}, dy, w.cview(), saved, dx, grads, {}, compact::write_mode::accumulate);
    CHECK(std::all_of(g.data.begin(), g.data.end(), [](float v) { return v == 5.0f; }));
    CHECK(std::all_of(db.begin(), db.end(), [](float v) { return v == 5.0f; }));
    CHECK(grads.epoch == 7);
    layer.backward({}, dy, w.cview(), saved, dx, grads, {});
    CHECK(std::all_of(g.data.begin(), g.data.end(), [](float v) { return v == 0.0f; }));
    CHECK(std::all_of(db.begin(), db.end(), [](float v) { return v == 0.0f; }));
    CHECK(grads.written);
}

TEST_CASE("quantized layer: a workspace of exactly workspace_bytes(1) is accepted, one byte less is refused "
          "before dX is written")
{
    const index_t rows = 9, in = 13, out = 5;
    const qlayer<float> layer(compact::in_features{in}, compact::out_features{out}, 1, 1,
                              compact::quantized{store_scheme::quantized(8, 64)});
    auto rng = compact_test::make_rng(31);
    host_matrix<float> x(rows, in), w(out, in), dy(rows, out), y(rows, out);
    x.randomize(rng);
    w.randomize(rng);
    dy.randomize(rng);
    aligned_bytes bytes(layer.saved_bytes(rows));
    auto saved = compact::bind_saved<qlayer<float>::saved_type>(bytes.data(), bytes.size());
    std::vector<std::byte> big(layer.workspace_bytes(rows));
    layer.forward({}, x.cview(), w.cview(), {}, y.view(), saved, 2, {big.data(), big.size()});
    host_matrix<float> x_hat(rows, in);
    layer.compressor().store().restore({}, saved, x_hat.view());
    const dmatrix gref = compact_test::matmul(compact_test::transpose(dy.to_double()), x_hat.to_double());
    const dmatrix dxref = compact_test::matmul(dy.to_double(), w.to_double());

    const std::size_t one_row = layer.workspace_bytes(1);
    CHECK(one_row >= static_cast<std::size_t>(in) * sizeof(float));
    CHECK(one_row < layer.workspace_bytes(rows));
    // The buffer is over-allocated so that the workspace can start at any byte offset.
    std::vector<std::byte> memory(one_row + 64);
    for (std::size_t offset : {std::size_t{0}, std::size_t{1}, std::size_t{7}, std::size_t{63}}) {
        CAPTURE(offset);
        const compact::workspace exact{memory.data() + offset, one_row};
        const compact::workspace short_one{memory.data() + offset, one_row - 1};

        host_matrix<float> dx(rows, in), g(out, in);
        for (float& v : dx.data) v = -9.0f;
        for (float& v : g.data) v = -9.0f;
        std::vector<float> db(static_cast<std::size_t>(out), -9.0f);
        compact::layer_gradient<float> grads{g.view(), compact::matrix_view<float>(db.data(), 1, out)};
        CHECK(contains(error_message_of([&] {
                           layer.backward({}, dy.cview(), w.cview(), saved, dx.view(), grads, short_one);
                       }),
                       "workspace holds"));
        CHECK(std::all_of(dx.data.begin(), dx.data.end(), [](float v) { return v == -9.0f; }));
        CHECK(std::all_of(g.data.begin(), g.data.end(), [](float v) { return v == -9.0f; }));
        CHECK(std::all_of(db.begin(), db.end(), [](float v) { return v == -9.0f; }));
        CHECK(!grads.written);

        layer.backward({}, dy.cview(), w.cview(), saved, dx.view(), grads, exact); // one row at a time
        CHECK(grads.written);
        CHECK(compact_test::rel_error(g.to_double(), gref) < tolerance<float>);
        CHECK(compact_test::rel_error(dx.to_double(), dxref) < tolerance<float>);
    }
}

// A workspace between two aligned sizes (workspace_bytes(1) + 16, say) must pick a slice whose aligned
// buffer fits: "any workspace of at least one row's bytes works".
TEST_CASE("quantized layer: every workspace size from workspace_bytes(1) up is accepted")
{
    const index_t rows = 9, in = 10, out = 4;
    const qlayer<float> layer(compact::in_features{in}, compact::out_features{out}, 1, 1,
                              compact::quantized{store_scheme::quantized(8, 64)});
    auto rng = compact_test::make_rng(32);
    host_matrix<float> x(rows, in), w(out, in), dy(rows, out), y(rows, out), g(out, in);
    x.randomize(rng);
    w.randomize(rng);
    dy.randomize(rng);
    aligned_bytes bytes(layer.saved_bytes(rows));
    auto saved = compact::bind_saved<qlayer<float>::saved_type>(bytes.data(), bytes.size());
    std::vector<std::byte> memory(layer.workspace_bytes(rows) + 64);
    layer.forward({}, x.cview(), w.cview(), {}, y.view(), saved, 2, {memory.data(), memory.size()});
    host_matrix<float> x_hat(rows, in);
    layer.compressor().store().restore({}, saved, x_hat.view());
    const dmatrix gref = compact_test::matmul(compact_test::transpose(dy.to_double()), x_hat.to_double());
    int refused = 0;
    for (std::size_t size = layer.workspace_bytes(1); size <= layer.workspace_bytes(rows); ++size) {
        compact::layer_gradient<float> grads{g.view()};
        try {
            layer.backward({}, dy.cview(), w.cview(), saved, {}, grads, {memory.data() + size % 64, size});
            if (compact_test::rel_error(g.to_double(), gref) >= tolerance<float>) ++refused;
        } catch (const compact::error&) {
            ++refused;
        }
    }
    CHECK(refused == 0);
}
