// tests/test_linear_layer.cpp: the owning wrapper linear_layer<Scalar, Policy, Backend, State>
// (compact/nn/linear_layer.hpp): it trains, it is exactly the caller-memory API driven by hand,
// gradient accumulation, determinism (run to run and across thread counts), resampling epochs, the
// memory queries and its errors.
//
// The generic bodies are templates over a `config` (backend, scalar, moment type) and run on both
// backends through backend_under_test.hpp: this file on the CPU, tests/cuda/test_cuda_linear_layer.cu
// (which includes it with COMPACT_TEST_CUDA) on CUDA. They keep inputs and float64 references on the
// host and give the library only memory of the backend under test (dev.upload, device arrays,
// dev.workspace); a layer's own buffers (weight(), bias(), gradient(), moments) are the backend's
// memory too and are read and written through dev.read / dev.write. The cases about the CPU backend
// itself (thread counts, explicit compact::cpu layers with master weights) sit under
// #if !COMPACT_TEST_CUDA_BUILD.
#include "test_support.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

using compact::in_features;
using compact::index_t;
using compact::out_features;

using namespace compact_test;

#if !COMPACT_TEST_CUDA_BUILD
// Properties of the CPU backend only (its thread count).
#define COMPACT_CPU_TEST_CONFIGS config<compact::cpu, float, float>, config<compact::cpu, double, double>
#endif

/// A synthetic regression: X (rows, n) ~ U(-1, 1), targets T = X W*^T + b* + noise (rows, m), loss
/// mean((Y - T)^2) over all rows * m values, so dY = 2 (Y - T) / (rows m) for every row of the batch.
template <class Scalar>
struct regression {
    index_t rows, n, m;
    std::vector<Scalar> x, target;

    regression(index_t rows_, index_t n_, index_t m_, std::uint64_t seed) : rows(rows_), n(n_), m(m_)
    {
        std::mt19937_64 rng(seed);
        x = uniform<Scalar>(rng, rows * n, -1, 1);
        const double scale = 1.0 / std::sqrt(static_cast<double>(n));
        const auto w = uniform<double>(rng, m * n, -scale, scale);
        const auto b = uniform<double>(rng, m, -0.5, 0.5);
        const auto noise = uniform<double>(rng, rows * m, -0.01, 0.01);
        target.resize(static_cast<std::size_t>(rows * m));
        for (index_t i = 0; i < rows; ++i)
            for (index_t o = 0; o < m; ++o) {
                double y = b[static_cast<std::size_t>(o)] + noise[static_cast<std::size_t>(i * m + o)];
                for (index_t j = 0; j < n; ++j)
                    y += static_cast<double>(x[static_cast<std::size_t>(i * n + j)]) * w[static_cast<std::size_t>(o * n + j)];
                target[static_cast<std::size_t>(i * m + o)] = static_cast<Scalar>(y);
            }
    }

    /// Rows [r0, r0 + count) of X in host memory: for the CPU-only cases that drive the caller-memory
    /// API on host vectors (device_regression::inputs is the backend's copy).
    compact::const_matrix_view<Scalar> inputs(index_t r0, index_t count) const
    {
        return compact::const_matrix_view<Scalar>(x.data() + r0 * n, count, n);
    }

    /// dY for rows [r0, r0 + y.rows) of the batch, from their outputs y; returns their summed loss.
    double gradient(index_t r0, compact::const_matrix_view<Scalar> y, std::vector<Scalar>& dy) const
    {
        const auto scale = static_cast<Scalar>(2.0 / static_cast<double>(rows * m));
        dy.resize(static_cast<std::size_t>(y.rows * m));
        double loss = 0;
        for (index_t i = 0; i < y.rows; ++i)
            for (index_t o = 0; o < m; ++o) {
                const Scalar r = y(i, o) - target[static_cast<std::size_t>((r0 + i) * m + o)];
                dy[static_cast<std::size_t>(i * m + o)] = scale * r;
                loss += static_cast<double>(r) * static_cast<double>(r) / static_cast<double>(rows * m);
            }
        return loss;
    }
};

/// `count` zeros of T in Backend's memory.
template <class T, class Backend>
device_array<Backend, T> zeros(const device<Backend>&, index_t count)
{
    return device_array<Backend, T>(static_cast<std::size_t>(count));
}

/// A regression problem with its X copied to the backend's memory once (the targets stay on the host,
/// where the loss and dY are computed).
template <class Backend, class Scalar>
struct device_regression {
    const regression<Scalar>& host;
    device_array<Backend, Scalar> x;

    device_regression(const device<Backend>& dev, const regression<Scalar>& problem) : host(problem), x(dev.upload(problem.x)) {}

    /// Rows [r0, r0 + count) of X in the backend's memory (pointer arithmetic only, no access).
    compact::const_matrix_view<Scalar> inputs(index_t r0, index_t count) const
    {
        REQUIRE(static_cast<std::size_t>((r0 + count) * host.n) <= x.size());
        return compact::const_matrix_view<Scalar>(x.data() + r0 * host.n, count, host.n);
    }
};

/// One update of `layer` on the whole batch split into `micro` equal micro-batches; returns the loss.
/// ctx is dev.ctx(), except in the CPU-only thread-count case (dev's copies only wait for dev's stream,
/// which on the CPU is nothing).
template <class Layer, class Backend, class Scalar>
double train_step(Layer& layer, const device<Backend>& dev, const typename Layer::context& ctx,
                  const device_regression<Backend, Scalar>& problem, const compact::adamw_params& h, index_t micro = 1)
{
    const regression<Scalar>& p = problem.host;
    const index_t count = p.rows / micro;
    auto y_d = zeros<Scalar>(dev, count * p.m);
    auto dy_d = zeros<Scalar>(dev, count * p.m);
    auto dx_d = zeros<Scalar>(dev, count * p.n);
    std::vector<Scalar> dy;
    double loss = 0;
    for (index_t k = 0; k < micro; ++k) {
        layer.forward(ctx, problem.inputs(k * count, count), y_d.view(count, p.m));
        // download waits for the stream, so the previous backward has finished reading dY as well.
        const auto y = dev.download(y_d);
        loss += p.gradient(k * count, cview_of(y, count, p.m), dy);
        dev.upload_to(dy_d, dy);
        layer.backward(ctx, dy_d.cview(count, p.m), dx_d.view(count, p.n));
    }
    layer.step(ctx, h);
    dev.synchronize(); // y_d, dy_d and dx_d go out of scope
    return loss;
}

/// W and b ~ U(-1/sqrt(n), 1/sqrt(n)), drawn on the host (W row by row, then b) and written to the
/// layer's buffers.
template <class Backend, class Layer>
void initialise(const device<Backend>& dev, Layer& layer, std::uint64_t seed)
{
    using scalar = typename Layer::layer_type::scalar_type;
    std::mt19937_64 rng(seed);
    const double scale = 1.0 / std::sqrt(static_cast<double>(layer.in()));
    std::uniform_real_distribution<double> d(-scale, scale);
    std::vector<scalar> w(static_cast<std::size_t>(layer.out() * layer.in()));
    for (auto& value : w) value = static_cast<scalar>(d(rng));
    dev.write(layer.weight(), w);
    if (scalar* b = layer.bias()) { // a null test only: b is the backend's memory
        std::vector<scalar> bias(static_cast<std::size_t>(layer.out()));
        for (auto& value : bias) value = static_cast<scalar>(d(rng));
        dev.write(compact::make_view(b, 1, layer.out()), bias);
    }
}

/// Everything a layer's training state holds that the public interface shows.
template <class Scalar, class State>
struct snapshot {
    std::vector<Scalar> weight, bias, gradient, bias_gradient;
    std::vector<State> m, v, bias_m, bias_v;
    std::uint64_t step = 0, epoch = 0, bias_step = 0, updates = 0;
    bool pending = false;

    /// The layer's buffers, read from the backend's memory through dev.
    template <class Backend, class Layer>
    snapshot(const device<Backend>& dev, const Layer& layer)
        : weight(dev.read(layer.weight())),
          gradient(dev.read(layer.gradient())),
          m(dev.read(layer.first_moment())),
          v(dev.read(layer.second_moment())),
          step(layer.counters().step),
          epoch(layer.counters().epoch),
          bias_step(layer.bias_counters().step),
          updates(layer.updates()),
          pending(layer.gradient_pending())
    {
        if (const Scalar* b = layer.bias()) { // a null test only: b is the backend's memory
            const auto out = static_cast<std::size_t>(layer.out());
            bias = dev.read(b, out);
            bias_gradient = dev.read(layer.bias_gradient(), out);
            bias_m = dev.read(layer.bias_first_moment(), out);
            bias_v = dev.read(layer.bias_second_moment(), out);
        }
    }

    bool operator==(const snapshot& o) const
    {
        return bit_equal(weight, o.weight) && bit_equal(bias, o.bias) && bit_equal(gradient, o.gradient) &&
               bit_equal(bias_gradient, o.bias_gradient) && bit_equal(m, o.m) && bit_equal(v, o.v) &&
               bit_equal(bias_m, o.bias_m) && bit_equal(bias_v, o.bias_v) && step == o.step && epoch == o.epoch &&
               bias_step == o.bias_step && updates == o.updates && pending == o.pending;
    }
};

compact::adamw_params hyper(double lr = 1e-2, double alpha = 1.0, double weight_decay = 0.01)
{
    compact::adamw_params h;
    h.lr = lr;
    h.alpha = alpha;
    h.weight_decay = weight_decay;
    return h;
}

/// Transformers-style AdamW in float64 (SPEC section 3): W <- W - eta_t N, then W <- W - lr wd W.
struct reference_adamw {
    std::vector<double> m, v;
    std::uint64_t t = 0;
    explicit reference_adamw(std::size_t size) : m(size, 0.0), v(size, 0.0) {}

    /// scale multiplies eta_t: 1 for plain AdamW, alpha for the subspace equations with P = I.
    void step(const compact::adamw_params& h, std::vector<double>& w, const std::vector<double>& g, double scale = 1.0)
    {
        ++t;
        const double td = static_cast<double>(t);
        const double eta = scale * h.lr * std::sqrt(1 - std::pow(h.beta2, td)) / (1 - std::pow(h.beta1, td));
        for (std::size_t i = 0; i < w.size(); ++i) {
            m[i] = h.beta1 * m[i] + (1 - h.beta1) * g[i];
            v[i] = h.beta2 * v[i] + (1 - h.beta2) * g[i] * g[i];
            w[i] -= eta * m[i] / (std::sqrt(v[i]) + h.eps);
            w[i] -= h.lr * h.weight_decay * w[i];
        }
    }
};

/// The exact gradients of the whole batch from its dY (rows, m), in float64: G = dY^T X (m, n) and
/// db = the column sums of dY (m).
template <class Scalar>
void exact_gradients(const regression<Scalar>& problem, const std::vector<Scalar>& dy, std::vector<double>& g,
                     std::vector<double>& db)
{
    const index_t rows = problem.rows, n = problem.n, m = problem.m;
    g.assign(static_cast<std::size_t>(m * n), 0.0);
    db.assign(static_cast<std::size_t>(m), 0.0);
    for (index_t i = 0; i < rows; ++i)
        for (index_t o = 0; o < m; ++o) {
            const double d = static_cast<double>(dy[static_cast<std::size_t>(i * m + o)]);
            db[static_cast<std::size_t>(o)] += d;
            for (index_t j = 0; j < n; ++j)
                g[static_cast<std::size_t>(o * n + j)] +=
                    d * static_cast<double>(problem.x[static_cast<std::size_t>(i * n + j)]);
        }
}

/// forward and backward of the whole batch (dX skipped); returns the batch's dY (host).
template <class Layer, class Backend, class Scalar>
std::vector<Scalar> forward_backward(Layer& layer, const device<Backend>& dev,
                                     const device_regression<Backend, Scalar>& problem)
{
    const regression<Scalar>& p = problem.host;
    auto y_d = zeros<Scalar>(dev, p.rows * p.m);
    std::vector<Scalar> dy;
    layer.forward(dev.ctx(), problem.inputs(0, p.rows), y_d.view(p.rows, p.m));
    const auto y = dev.download(y_d);
    p.gradient(0, cview_of(y, p.rows, p.m), dy);
    const auto dy_d = dev.upload(dy);
    layer.backward(dev.ctx(), dy_d.cview(p.rows, p.m), compact::matrix_view<Scalar>{});
    dev.synchronize(); // y_d and dy_d go out of scope
    return dy;
}

} // namespace

// ========================================================================================= training

TEST_CASE_TEMPLATE("linear_layer with rank::ratio<1, 4> reduces the loss of a regression" COMPACT_TEST_ON_DEVICE, Cfg,
                   COMPACT_TEST_CONFIGS)
{
    using Backend = typename Cfg::backend;
    using Scalar = typename Cfg::scalar;
    using State = typename Cfg::state;
    compact_test::device<Backend> dev;
    const regression<Scalar> problem(128, 64, 16, 0x7e57);
    const device_regression<Backend, Scalar> problem_d(dev, problem);

    compact::linear_options options;
    options.seed = 42;
    options.layer = 3;
    options.max_rows = problem.rows;
    options.resample.gap = 10;
    compact::linear_layer<Scalar, compact::rank::ratio<1, 4>, Backend, State> layer(
        in_features{problem.n}, out_features{problem.m}, options);
    REQUIRE(layer.rank() == 16);
    initialise(dev, layer, 1);

    // The paper's pretraining setting: alpha = 0.25, a new P every 10 updates. The loss falls steadily
    // (to about 5% of its start here); the checks leave a factor of 2.
    const auto h = hyper(2e-2, 0.25, 0.0);
    const double first = train_step(layer, dev, dev.ctx(), problem_d, h);
    double middle = first, last = first;
    for (int s = 1; s < 150; ++s) {
        last = train_step(layer, dev, dev.ctx(), problem_d, h);
        if (s == 75) middle = last;
    }
    CAPTURE(first);
    CAPTURE(middle);
    CAPTURE(last);
    CHECK(std::isfinite(last));
    CHECK(last < 0.1 * first);
    CHECK(last < 0.75 * middle); // still improving after several resamplings of P
    CHECK(layer.updates() == 150);
    CHECK(layer.epoch() == 15);
}

namespace {

/// Trains a linear_layer and, side by side, the caller-memory API driven by hand (compressed_linear,
/// subspace_adamw for W, adamw for b, epoch = resample.epoch(update)); both must be bit-identical. Both
/// run on the backend under test, the hand-driven one on device copies of W, b, the moments and the
/// activations; dY and the float64 reference are computed on the host.
template <class Cfg, class Policy>
void layer_equals_caller_memory_api(int steps)
{
    using Backend = typename Cfg::backend;
    using Scalar = typename Cfg::scalar;
    using State = typename Cfg::state;
    compact_test::device<Backend> dev;
    const auto& ctx = dev.ctx();
    const regression<Scalar> problem(48, 40, 12, 0x1d);
    const device_regression<Backend, Scalar> problem_d(dev, problem);
    const index_t rows = problem.rows, n = problem.n, m = problem.m;

    compact::linear_options options;
    options.seed = 0xabcdef;
    options.layer = 9;
    options.max_rows = rows;
    options.resample.gap = 5;
    options.moments = compact::moment_policy::transfer;
    compact::linear_layer<Scalar, Policy, Backend, State> layer(in_features{n}, out_features{m}, options);
    initialise(dev, layer, 2);

    // Built with the layer's resampling, so that forward(..., step = update) compresses under
    // options.resample.epoch(update).
    using manual_type = compact::compressed_linear<Scalar, Policy, Backend>;
    const manual_type manual(in_features{n}, out_features{m}, options.seed, options.layer, Policy{}, options.dist,
                             options.resample);
    const compact::subspace_adamw<Scalar, Backend, State> optimizer(out_features{m}, manual.projection(),
                                                                    options.moments);
    const index_t r = manual.rank();
    REQUIRE(r == layer.rank());
    auto w = dev.read(layer.weight());
    auto b = dev.read(layer.bias(), static_cast<std::size_t>(m));
    std::vector<Scalar> dy;
    // The hand-driven path's memory on the backend: W, b, Y, Z, dY, dX, G_sub, db, the moments (zero).
    auto w_d = dev.upload(w);
    auto b_d = dev.upload(b);
    auto y_d = zeros<Scalar>(dev, rows * m), z_d = zeros<Scalar>(dev, rows * r), dy_d = zeros<Scalar>(dev, rows * m);
    auto dx_d = zeros<Scalar>(dev, rows * n), g_sub_d = zeros<Scalar>(dev, m * r), db_d = zeros<Scalar>(dev, m);
    auto wm_d = zeros<State>(dev, m * r), wv_d = zeros<State>(dev, m * r);
    auto bm_d = zeros<State>(dev, m), bv_d = zeros<State>(dev, m);
    REQUIRE(manual.saved_bytes(rows) == z_d.size() * sizeof(Scalar));
    auto saved = compact::bind_saved<typename manual_type::saved_type>(z_d.data(), manual.saved_bytes(rows));
    compact::layer_gradient<Scalar> grads{g_sub_d.view(m, r), db_d.view(1, m)};
    compact::adam_counters w_counters, b_counters;
    auto ws = dev.workspace(std::max(manual.workspace_bytes(rows), optimizer.workspace_bytes()));

    // The float64 reference for the identity: a plain linear layer + AdamW (decay on the bias too).
    auto w_ref = to_double(w);
    auto b_ref = to_double(b);
    reference_adamw w_state(w_ref.size()), b_state(b_ref.size());

    const auto h = hyper(1e-2, 1.0, 0.1);
    std::vector<Scalar> dy_layer;
    auto y_layer_d = zeros<Scalar>(dev, rows * m), dy_layer_d = zeros<Scalar>(dev, rows * m);
    auto dx_layer_d = zeros<Scalar>(dev, rows * n);
    for (int s = 0; s < steps; ++s) {
        const auto update = static_cast<std::uint64_t>(s);
        const std::uint64_t epoch = options.resample.epoch(update);
        CHECK(layer.epoch() == epoch);

        layer.forward(ctx, problem_d.inputs(0, rows), y_layer_d.view(rows, m));
        const auto y_layer = dev.download(y_layer_d); // waits for the stream: nothing reads dY now
        problem.gradient(0, cview_of(y_layer, rows, m), dy_layer);
        dev.upload_to(dy_layer_d, dy_layer);
        layer.backward(ctx, dy_layer_d.cview(rows, m), dx_layer_d.view(rows, n));
        const auto g_layer = dev.read(layer.gradient());
        const auto dx_layer = dev.download(dx_layer_d);
        CHECK(layer.gradients().written);
        CHECK(layer.gradients().epoch == epoch);
        layer.step(ctx, h);
        CHECK_FALSE(layer.gradients().written);

        manual.forward(ctx, problem_d.inputs(0, rows), w_d.cview(m, n), b_d.cview(1, m), y_d.view(rows, m), saved,
                       update, ws.get());
        CHECK(saved.epoch == epoch);
        const auto y = dev.download(y_d);
        problem.gradient(0, cview_of(y, rows, m), dy);
        dev.upload_to(dy_d, dy);
        manual.backward(ctx, dy_d.cview(rows, m), w_d.cview(m, n), saved, dx_d.view(rows, n), grads, ws.get());
        CHECK(grads.epoch == epoch);
        CHECK(bit_equal(y, y_layer));
        CHECK(bit_equal(dev.download(dx_d), dx_layer));
        CHECK(bit_equal(dev.download(g_sub_d), g_layer));
        optimizer.step(ctx, h, manual.projection(), w_d.view(m, n), grads, wm_d.view(m, r), wv_d.view(m, r),
                       w_counters, ws.get());
        compact::adamw<Backend>::step(ctx, h, b_d.view(1, m), db_d.cview(1, m), bm_d.view(1, m), bv_d.view(1, m),
                                      b_counters);

        if (compact::forces_identity_projection<Policy>) {
            // G = dY^T X, db = sum of dY's rows, in float64 from the layer's own dY.
            std::vector<double> g_ref(static_cast<std::size_t>(m * n), 0.0), db_ref(static_cast<std::size_t>(m), 0.0);
            for (index_t i = 0; i < rows; ++i)
                for (index_t o = 0; o < m; ++o) {
                    const double d = static_cast<double>(dy[static_cast<std::size_t>(i * m + o)]);
                    db_ref[static_cast<std::size_t>(o)] += d;
                    for (index_t j = 0; j < n; ++j)
                        g_ref[static_cast<std::size_t>(o * n + j)] +=
                            d * static_cast<double>(problem.x[static_cast<std::size_t>(i * n + j)]);
                }
            w_state.step(h, w_ref, g_ref);
            b_state.step(h, b_ref, db_ref);
        }
    }
    w = dev.download(w_d);
    b = dev.download(b_d);
    CHECK(layer.updates() == static_cast<std::uint64_t>(steps));
    CHECK(bit_equal(dev.read(layer.weight()), w));
    CHECK(bit_equal(dev.read(layer.bias(), static_cast<std::size_t>(m)), b));
    CHECK(bit_equal(dev.read(layer.first_moment()), dev.download(wm_d)));
    CHECK(bit_equal(dev.read(layer.second_moment()), dev.download(wv_d)));
    CHECK(layer.counters().step == w_counters.step);
    CHECK(layer.counters().epoch == w_counters.epoch);
    CHECK(bit_equal(dev.read(layer.bias_first_moment(), static_cast<std::size_t>(m)), dev.download(bm_d)));
    CHECK(bit_equal(dev.read(layer.bias_second_moment(), static_cast<std::size_t>(m)), dev.download(bv_d)));
    CHECK(layer.bias_counters().step == b_counters.step);

    if (compact::forces_identity_projection<Policy>) {
        // The layer follows plain float64 AdamW to rounding only, but its own dY feeds the reference
        // each step, so this measures the optimizer path: float <= 1e-4, double <= 1e-10.
        const double tol = is_float<Scalar> ? 1e-4 : 1e-10;
        CHECK_RELATIVE(relative_error(w, w_ref), tol);
        CHECK_RELATIVE(relative_error(b, b_ref), tol);
    }
}

} // namespace

TEST_CASE_TEMPLATE("linear_layer is the caller-memory API driven by hand, bit for bit" COMPACT_TEST_ON_DEVICE, Cfg,
                   COMPACT_TEST_CONFIGS)
{
    SUBCASE("rank::full (identity projection), also against float64 plain AdamW")
    {
        layer_equals_caller_memory_api<Cfg, compact::rank::full>(20);
    }
    SUBCASE("rank::ratio<1, 4> (gaussian projection, epochs of 5 updates, transfer)")
    {
        layer_equals_caller_memory_api<Cfg, compact::rank::ratio<1, 4>>(12);
    }
}

#if !COMPACT_TEST_CUDA_BUILD
// Names the CPU backend (the CUDA build runs the generic case above with its own double config).
TEST_CASE("linear_layer<double, rank::full, cpu, double> equals the identity result of compressed_linear + "
          "subspace_adamw, bit for bit")
{
    layer_equals_caller_memory_api<config<compact::cpu, double, double>, compact::rank::full>(30);
}
#endif

namespace {

template <class Cfg, class Policy>
void kept_projection_equals_regenerated()
{
    using Backend = typename Cfg::backend;
    using Scalar = typename Cfg::scalar;
    using State = typename Cfg::state;
    compact_test::device<Backend> dev;
    const regression<Scalar> problem(32, 40, 12, 0x4ee9);
    const device_regression<Backend, Scalar> problem_d(dev, problem);
    compact::linear_options options;
    options.seed = 5;
    options.layer = 21;
    options.max_rows = problem.rows;
    options.resample.gap = 3;
    options.moments = compact::moment_policy::transfer;
    using Layer = compact::linear_layer<Scalar, Policy, Backend, State>;
    Layer regenerate(in_features{problem.n}, out_features{problem.m}, options);
    options.keep_projection = true;
    Layer kept(in_features{problem.n}, out_features{problem.m}, options);
    CHECK(regenerate.projection_bytes() == 0);
    CHECK(kept.projection_bytes() <= static_cast<std::size_t>(problem.n * kept.rank()) * sizeof(Scalar));
    if (!compact::forces_identity_projection<Policy>)
        CHECK(kept.projection_bytes() == static_cast<std::size_t>(problem.n * kept.rank()) * sizeof(Scalar));
    initialise(dev, regenerate, 8);
    initialise(dev, kept, 8);
    const auto h = hyper(1e-2, 0.25, 0.1);
    for (int s = 0; s < 10; ++s) {
        const double a = train_step(regenerate, dev, dev.ctx(), problem_d, h, 2);
        const double b = train_step(kept, dev, dev.ctx(), problem_d, h, 2);
        CHECK(a == b);
    }
    CHECK(kept.epoch() == 3);
    CHECK(snapshot<Scalar, State>(dev, kept) == snapshot<Scalar, State>(dev, regenerate));
}

} // namespace

TEST_CASE_TEMPLATE("options.keep_projection trains bit-identically to regenerating P" COMPACT_TEST_ON_DEVICE, Cfg,
                   COMPACT_TEST_CONFIGS)
{
    SUBCASE("rank::ratio<1, 4>") { kept_projection_equals_regenerated<Cfg, compact::rank::ratio<1, 4>>(); }
    SUBCASE("rank::full") { kept_projection_equals_regenerated<Cfg, compact::rank::full>(); }
}

// ========================================================================== gradient accumulation

TEST_CASE_TEMPLATE("k micro-batches then one step equals one batch of the same rows then one step"
                   COMPACT_TEST_ON_DEVICE,
                   Cfg, COMPACT_TEST_CONFIGS)
{
    using Backend = typename Cfg::backend;
    using Scalar = typename Cfg::scalar;
    using State = typename Cfg::state;
    compact_test::device<Backend> dev;
    constexpr index_t micro = 4;
    const regression<Scalar> problem(64, 48, 20, 0xacc);
    const device_regression<Backend, Scalar> problem_d(dev, problem);
    // Relative (2-norm) error of W and b after 3 updates: the two runs sum G_sub and db in different
    // orders (float: u = 6e-8; double: u = 1e-16), and Adam's normalisation keeps that relative.
    const double tol = is_float<Scalar> ? 1e-5 : 1e-12;

    compact::linear_options options;
    options.seed = 77;
    options.layer = 5;
    options.resample.gap = 2; // the third update uses a new P
    options.max_rows = problem.rows;
    compact::linear_layer<Scalar, compact::rank::ratio<1, 4>, Backend, State> whole(
        in_features{problem.n}, out_features{problem.m}, options);
    options.max_rows = problem.rows / micro;
    compact::linear_layer<Scalar, compact::rank::ratio<1, 4>, Backend, State> split(
        in_features{problem.n}, out_features{problem.m}, options);
    initialise(dev, whole, 3);
    initialise(dev, split, 3);

    const auto h = hyper(1e-2, 0.25, 0.1);
    for (int s = 0; s < 3; ++s) {
        // Each micro-batch's dY carries the loss scale of the whole batch, 2 / (rows m), so the summed
        // gradient is the whole batch's.
        const double loss_whole = train_step(whole, dev, dev.ctx(), problem_d, h, 1);
        const double loss_split = train_step(split, dev, dev.ctx(), problem_d, h, micro);
        CHECK(loss_split == doctest::Approx(loss_whole).epsilon(is_float<Scalar> ? 1e-5 : 1e-12));
    }
    const snapshot<Scalar, State> a(dev, whole), b(dev, split);
    CHECK_RELATIVE(relative_error(b.weight, to_double(a.weight)), tol);
    CHECK_RELATIVE(relative_error(b.bias, to_double(a.bias)), tol);
    CHECK_RELATIVE(relative_error(b.m, to_double(a.m)), tol);
    CHECK(a.step == b.step);
    CHECK(a.epoch == b.epoch);
    CHECK(whole.epoch() == 1);
}

// =================================================================================== determinism

namespace {

/// The shapes of a determinism run: rows of X, n, m, and the rank.
struct determinism_shape {
    index_t rows, n, m, r;
};

#if !COMPACT_TEST_CUDA_BUILD
// Large enough that every GEMM is split into parts (C's longer side >= 256 gives >= 2 parts: Y
// (256, 576), Z (256, 60), dX (256, 64), G_sub (576, 60) and the update of W (576, 64)) and the
// elementwise moment update covers two parts (m r = 34560 > 32768 values).
constexpr determinism_shape split_shape{256, 64, 576, 60};
#endif
// Smaller (the GEMMs over the 256 rows still split), for the longer run-to-run check.
constexpr determinism_shape medium_shape{256, 64, 48, 16};

/// ctx: dev.ctx(), or on the CPU a context with a given thread count.
template <class Cfg>
snapshot<typename Cfg::scalar, typename Cfg::state>
train_for_determinism(const compact_test::device<typename Cfg::backend>& dev, const typename Cfg::backend::context& ctx,
                      determinism_shape shape, int steps)
{
    using Backend = typename Cfg::backend;
    using Scalar = typename Cfg::scalar;
    using State = typename Cfg::state;
    const regression<Scalar> problem(shape.rows, shape.n, shape.m, 0xde7);
    const device_regression<Backend, Scalar> problem_d(dev, problem);
    compact::linear_options options;
    options.seed = 2024;
    options.layer = 1;
    options.max_rows = problem.rows;
    options.resample.gap = 5;
    // The transfer policy runs every kernel keep and reset run, plus the re-sketch GEMMs.
    options.moments = compact::moment_policy::transfer;
    compact::linear_layer<Scalar, compact::rank::fixed, Backend, State> layer(in_features{problem.n},
                                                                              out_features{problem.m}, options,
                                                                              compact::rank::fixed{shape.r});
    initialise(dev, layer, 4);
    const auto h = hyper(1e-3, 0.25, 0.01);
    for (int s = 0; s < steps; ++s) train_step(layer, dev, ctx, problem_d, h);
    // Leave one more gradient accumulated, so the snapshot covers forward and backward too.
    auto y_d = zeros<Scalar>(dev, problem.rows * problem.m);
    std::vector<Scalar> dy;
    layer.forward(ctx, problem_d.inputs(0, problem.rows), y_d.view(problem.rows, problem.m));
    const auto y = dev.download(y_d);
    problem.gradient(0, cview_of(y, problem.rows, problem.m), dy);
    const auto dy_d = dev.upload(dy);
    layer.backward(ctx, dy_d.cview(problem.rows, problem.m), compact::matrix_view<Scalar>{});
    return snapshot<Scalar, State>(dev, layer);
}

} // namespace

TEST_CASE_TEMPLATE("30 training steps twice give bit-identical weights, moments and counters" COMPACT_TEST_ON_DEVICE,
                   Cfg, COMPACT_TEST_CONFIGS)
{
    compact_test::device<typename Cfg::backend> dev;
    const auto first = train_for_determinism<Cfg>(dev, dev.ctx(), medium_shape, 30);
    const auto second = train_for_determinism<Cfg>(dev, dev.ctx(), medium_shape, 30);
    CHECK(first.updates == 30);
    CHECK(first.epoch == 5);
    CHECK(first.step == 30);
    CHECK(first == second);
}

#if !COMPACT_TEST_CUDA_BUILD
// The CPU backend's thread count (its dev only does the host copies, which there are plain copies).
TEST_CASE_TEMPLATE("cpu::context{1} and cpu::context{2} give bit-identical training", Cfg, COMPACT_CPU_TEST_CONFIGS)
{
    compact_test::device<compact::cpu> dev;
    // 12 updates cross two epoch boundaries (T = 5).
    const auto one = train_for_determinism<Cfg>(dev, compact::cpu::context{1}, split_shape, 12);
    const auto two = train_for_determinism<Cfg>(dev, compact::cpu::context{2}, split_shape, 12);
    CHECK(one.epoch == 2);
    CHECK(one == two);
}
#endif

// ======================================================================================== epochs

TEST_CASE_TEMPLATE("resampling: epoch() = updates() / 5 and P changes exactly at epoch boundaries"
                   COMPACT_TEST_ON_DEVICE,
                   Cfg, COMPACT_TEST_CONFIGS)
{
    using Backend = typename Cfg::backend;
    using Scalar = typename Cfg::scalar;
    using State = typename Cfg::state;
    compact_test::device<Backend> dev;
    const auto& ctx = dev.ctx();
    constexpr index_t rows = 16, n = 32, m = 8;
    // Relative (2-norm) error of G_sub = dY^T X P against float64 (sums of 16 and 32 terms; float
    // u = 6e-8, double u = 1e-16), with a wide margin.
    const double tol = is_float<Scalar> ? 1e-5 : 1e-13;

    compact::linear_options options;
    options.seed = 31337;
    options.layer = 12;
    options.max_rows = rows;
    options.resample.gap = 5;
    compact::linear_layer<Scalar, compact::rank::ratio<1, 4>, Backend, State> layer(in_features{n}, out_features{m},
                                                                                    options);
    initialise(dev, layer, 5);
    const index_t r = layer.rank();

    std::mt19937_64 rng(0xe90c);
    const auto x = uniform<Scalar>(rng, rows * n, -1, 1);
    const auto dy = uniform<Scalar>(rng, rows * m, -1, 1);
    const auto x_d = dev.upload(x);
    const auto dy_d = dev.upload(dy);
    auto y_d = zeros<Scalar>(dev, rows * m);
    std::vector<std::vector<Scalar>> gradients;
    const auto h = hyper();
    for (std::uint64_t u = 0; u < 15; ++u) {
        CHECK(layer.updates() == u);
        CHECK(layer.epoch() == u / 5);
        layer.forward(ctx, x_d.cview(rows, n), y_d.view(rows, m));
        layer.backward(ctx, dy_d.cview(rows, m), compact::matrix_view<Scalar>{});
        gradients.push_back(dev.read(layer.gradient()));

        // G_sub = dY^T (X P) with P of this epoch, in float64 from compact::projection_element.
        const auto spec = layer.layer().projection().spec(u / 5);
        CHECK(spec.key.epoch == u / 5);
        std::vector<double> z(static_cast<std::size_t>(rows * r), 0.0), g_ref(static_cast<std::size_t>(m * r), 0.0);
        for (index_t i = 0; i < rows; ++i)
            for (index_t k = 0; k < r; ++k)
                for (index_t j = 0; j < n; ++j)
                    z[static_cast<std::size_t>(i * r + k)] +=
                        static_cast<double>(x[static_cast<std::size_t>(i * n + j)]) * compact::projection_element(spec, j, k);
        for (index_t o = 0; o < m; ++o)
            for (index_t k = 0; k < r; ++k)
                for (index_t i = 0; i < rows; ++i)
                    g_ref[static_cast<std::size_t>(o * r + k)] +=
                        static_cast<double>(dy[static_cast<std::size_t>(i * m + o)]) * z[static_cast<std::size_t>(i * r + k)];
        CHECK_RELATIVE(relative_error(gradients.back(), g_ref), tol);

        layer.step(ctx, h);
        CHECK(layer.counters().epoch == u / 5);
    }
    CHECK(layer.updates() == 15);
    CHECK(layer.epoch() == 3);
    for (std::size_t a = 0; a < gradients.size(); ++a)
        for (std::size_t b = a + 1; b < gradients.size(); ++b) {
            CAPTURE(a);
            CAPTURE(b);
            if (a / 5 == b / 5) CHECK(bit_equal(gradients[a], gradients[b]));
            else CHECK(relative_error(gradients[a], to_double(gradients[b])) > 0.1);
        }
}

// ============================================================ ownership, state type, hyper-parameters

namespace {
using ratio_layer = compact::linear_layer<float, compact::rank::ratio<1, 4>, backend_under_test>;
using full_double_layer = compact::linear_layer<double, compact::rank::full, backend_under_test>;
using store_layer = compact::linear_layer<float, compact::quantized, backend_under_test>;
} // namespace

// A layer owns its buffers and what forward saved points into them: it moves, it does not copy.
static_assert(!std::is_copy_constructible_v<ratio_layer>);
static_assert(!std::is_copy_assignable_v<ratio_layer>);
static_assert(std::is_move_constructible_v<ratio_layer>);
static_assert(std::is_nothrow_move_constructible_v<ratio_layer>);
static_assert(std::is_nothrow_move_assignable_v<ratio_layer>);
static_assert(!std::is_copy_constructible_v<full_double_layer>);
static_assert(std::is_nothrow_move_constructible_v<full_double_layer>);
static_assert(!std::is_copy_constructible_v<store_layer>);
static_assert(std::is_nothrow_move_constructible_v<store_layer>);

// The default State is default_state_t<Scalar>: double moments for double weights, float for float.
static_assert(std::is_same_v<decltype(std::declval<compact::linear_layer<double, compact::rank::ratio<1, 4>,
                                                                         backend_under_test>&>()
                                          .first_moment()),
                             compact::matrix_view<double>>);
static_assert(std::is_same_v<decltype(std::declval<full_double_layer&>().bias_second_moment()), double*>);
static_assert(std::is_same_v<decltype(std::declval<ratio_layer&>().first_moment()), compact::matrix_view<float>>);

namespace {

/// Moves a layer between its forward and its backward (by construction, then by assignment into a
/// layer of its own) and checks that the moved-to layer finishes the update bit for bit as an unmoved
/// twin does.
template <class Cfg, class Policy>
void moved_layer_equals_unmoved(bool keep_projection)
{
    using Backend = typename Cfg::backend;
    using Scalar = typename Cfg::scalar;
    using State = typename Cfg::state;
    using Layer = compact::linear_layer<Scalar, Policy, Backend, State>;
    compact_test::device<Backend> dev;
    const auto& ctx = dev.ctx();
    const regression<Scalar> problem(32, 40, 12, 0x30e);
    const device_regression<Backend, Scalar> problem_d(dev, problem);
    const index_t rows = problem.rows, n = problem.n, m = problem.m;
    compact::linear_options options;
    options.seed = 6;
    options.layer = 13;
    options.max_rows = rows;
    options.resample.gap = 2;
    options.moments = compact::moment_policy::transfer;
    options.keep_projection = keep_projection;
    Layer twin(in_features{n}, out_features{m}, options);
    Layer moving(in_features{n}, out_features{m}, options);
    initialise(dev, twin, 9);
    initialise(dev, moving, 9);
    const auto h = hyper(1e-2, 0.25, 0.1);
    // Three updates first (an epoch change among them), so that the move carries moments and counters.
    for (int s = 0; s < 3; ++s)
        CHECK(train_step(twin, dev, ctx, problem_d, h) == train_step(moving, dev, ctx, problem_d, h));

    auto y_twin_d = zeros<Scalar>(dev, rows * m), y_moved_d = zeros<Scalar>(dev, rows * m);
    auto dx_twin_d = zeros<Scalar>(dev, rows * n), dx_moved_d = zeros<Scalar>(dev, rows * n);
    std::vector<Scalar> dy;
    auto update = [&](Layer& unmoved, Layer& moved) {
        const auto y = dev.download(y_twin_d);
        CHECK(bit_equal(dev.download(y_moved_d), y));
        problem.gradient(0, cview_of(y, rows, m), dy);
        const auto dy_d = dev.upload(dy);
        unmoved.backward(ctx, dy_d.cview(rows, m), dx_twin_d.view(rows, n));
        moved.backward(ctx, dy_d.cview(rows, m), dx_moved_d.view(rows, n));
        CHECK(moved.gradient_pending());
        CHECK(moved.gradients().written);
        CHECK(bit_equal(dev.download(dx_moved_d), dev.download(dx_twin_d)));
        unmoved.step(ctx, h);
        moved.step(ctx, h);
        dev.synchronize(); // dy_d goes out of scope
    };

    // By construction.
    twin.forward(ctx, problem_d.inputs(0, rows), y_twin_d.view(rows, m));
    moving.forward(ctx, problem_d.inputs(0, rows), y_moved_d.view(rows, m));
    Layer moved(std::move(moving));
    update(twin, moved);
    CHECK(moved.updates() == 4);
    CHECK(snapshot<Scalar, State>(dev, moved) == snapshot<Scalar, State>(dev, twin));

    // By assignment, into a layer with buffers of its own (which it releases).
    Layer assigned(in_features{n}, out_features{m}, options);
    twin.forward(ctx, problem_d.inputs(0, rows), y_twin_d.view(rows, m));
    moved.forward(ctx, problem_d.inputs(0, rows), y_moved_d.view(rows, m));
    assigned = std::move(moved);
    update(twin, assigned);
    CHECK(assigned.updates() == 5);
    CHECK(snapshot<Scalar, State>(dev, assigned) == snapshot<Scalar, State>(dev, twin));

    // And it trains on (into the next epoch) as the twin does.
    for (int s = 0; s < 2; ++s)
        CHECK(train_step(twin, dev, ctx, problem_d, h) == train_step(assigned, dev, ctx, problem_d, h));
    CHECK(assigned.epoch() == 3);
    CHECK(snapshot<Scalar, State>(dev, assigned) == snapshot<Scalar, State>(dev, twin));
}

} // namespace

TEST_CASE_TEMPLATE("a linear_layer moved between forward and backward finishes the update bit for bit as an "
                   "unmoved twin" COMPACT_TEST_ON_DEVICE,
                   Cfg, COMPACT_TEST_CONFIGS)
{
    SUBCASE("rank::ratio<1, 4>") { moved_layer_equals_unmoved<Cfg, compact::rank::ratio<1, 4>>(false); }
    SUBCASE("rank::ratio<1, 4>, keep_projection") { moved_layer_equals_unmoved<Cfg, compact::rank::ratio<1, 4>>(true); }
    SUBCASE("rank::full") { moved_layer_equals_unmoved<Cfg, compact::rank::full>(false); }
}

TEST_CASE("linear_layer<double, rank::full> with the default State (double) follows float64 AdamW to 1e-12"
          COMPACT_TEST_ON_DEVICE)
{
    // With double moments the whole update is double arithmetic: W, b and M stay within a few roundings
    // (u = 1e-16) of float64 AdamW fed the layer's own dY. Float moments (the former default) would be
    // off by about 1e-7.
    using Backend = backend_under_test;
    using Layer = compact::linear_layer<double, compact::rank::full, Backend>;
    static_assert(std::is_same_v<Layer::optimizer_type, compact::compressed_adamw<Layer::compressor_type, double>>);
    compact_test::device<Backend> dev;
    const regression<double> problem(48, 40, 12, 0x1d);
    const device_regression<Backend, double> problem_d(dev, problem);
    const index_t m = problem.m;
    compact::linear_options options;
    options.seed = 0xd0b1e;
    options.layer = 3;
    options.max_rows = problem.rows;
    Layer layer(in_features{problem.n}, out_features{m}, options);
    initialise(dev, layer, 14);
    auto w_ref = to_double(dev.read(layer.weight()));
    auto b_ref = to_double(dev.read(layer.bias(), static_cast<std::size_t>(m)));
    reference_adamw w_state(w_ref.size()), b_state(b_ref.size());
    const auto h = hyper(1e-2, 1.0, 0.1);
    std::vector<double> g_ref, db_ref;
    for (int s = 0; s < 5; ++s) {
        const auto dy = forward_backward(layer, dev, problem_d);
        layer.step(dev.ctx(), h);
        exact_gradients(problem, dy, g_ref, db_ref);
        w_state.step(h, w_ref, g_ref);
        b_state.step(h, b_ref, db_ref);
    }
    CHECK(layer.updates() == 5);
    CHECK_RELATIVE(relative_error(dev.read(layer.weight()), w_ref), 1e-12);
    CHECK_RELATIVE(relative_error(dev.read(layer.bias(), static_cast<std::size_t>(m)), b_ref), 1e-12);
    CHECK_RELATIVE(relative_error(dev.read(layer.first_moment()), w_state.m), 1e-12);
    CHECK_RELATIVE(relative_error(dev.read(layer.bias_first_moment(), static_cast<std::size_t>(m)), b_state.m), 1e-12);
}

TEST_CASE_TEMPLATE("step(ctx, h, bias_h): W with h, the bias plain AdamW with bias_h (weight_decay 0: no decay)"
                   COMPACT_TEST_ON_DEVICE,
                   Cfg, COMPACT_TEST_CONFIGS)
{
    using Backend = typename Cfg::backend;
    using Scalar = typename Cfg::scalar;
    using State = typename Cfg::state;
    using Layer = compact::linear_layer<Scalar, compact::rank::ratio<1, 4>, Backend, State>;
    compact_test::device<Backend> dev;
    const auto& ctx = dev.ctx();
    const regression<Scalar> problem(32, 40, 12, 0xb1a5);
    const device_regression<Backend, Scalar> problem_d(dev, problem);
    const index_t m = problem.m;
    compact::linear_options options;
    options.seed = 17;
    options.layer = 6;
    options.max_rows = problem.rows;
    options.resample.gap = 2;
    Layer layer(in_features{problem.n}, out_features{m}, options);
    Layer twin(in_features{problem.n}, out_features{m}, options);
    initialise(dev, layer, 15);
    initialise(dev, twin, 15);
    const auto h = hyper(1e-2, 0.25, 0.1);
    auto bias_h = h;
    bias_h.weight_decay = 0.0;

    // The caller's copy of b and its moments, updated by adamw::step with bias_h from the layer's db.
    auto b_d = dev.upload(dev.read(layer.bias(), static_cast<std::size_t>(m)));
    auto bm_d = zeros<State>(dev, m), bv_d = zeros<State>(dev, m), db_d = zeros<Scalar>(dev, m);
    compact::adam_counters b_counters;
    for (int s = 0; s < 4; ++s) {
        forward_backward(layer, dev, problem_d);
        dev.upload_to(db_d, dev.read(layer.bias_gradient(), static_cast<std::size_t>(m)));
        layer.step(ctx, h, bias_h);
        compact::adamw<Backend>::step(ctx, bias_h, b_d.view(1, m), db_d.cview(1, m), bm_d.view(1, m), bv_d.view(1, m),
                                      b_counters);
        CHECK(bit_equal(dev.read(layer.bias(), static_cast<std::size_t>(m)), dev.download(b_d)));
        if (s == 0) {
            // The same first gradient under step(ctx, h): W identical, the bias decayed.
            forward_backward(twin, dev, problem_d);
            twin.step(ctx, h);
            CHECK(bit_equal(dev.read(twin.weight()), dev.read(layer.weight())));
            CHECK(bit_equal(dev.read(twin.first_moment()), dev.read(layer.first_moment())));
            CHECK(bit_equal(dev.read(twin.bias_first_moment(), static_cast<std::size_t>(m)),
                            dev.read(layer.bias_first_moment(), static_cast<std::size_t>(m))));
            CHECK_FALSE(bit_equal(dev.read(twin.bias(), static_cast<std::size_t>(m)),
                                  dev.read(layer.bias(), static_cast<std::size_t>(m))));
        }
    }
    CHECK(bit_equal(dev.read(layer.bias_first_moment(), static_cast<std::size_t>(m)), dev.download(bm_d)));
    CHECK(bit_equal(dev.read(layer.bias_second_moment(), static_cast<std::size_t>(m)), dev.download(bv_d)));
    CHECK(layer.bias_counters().step == b_counters.step);
    CHECK(layer.counters().step == 4);
    // step(ctx, h) is step(ctx, h, h): bad bias hyper-parameters are refused as W's are.
    forward_backward(layer, dev, problem_d);
    auto bad = bias_h;
    bad.eps = std::numeric_limits<double>::infinity();
    // Refused before W changes: a retry after fixing bias_h applies W's update once, not twice.
    const auto w_before = dev.read(layer.weight());
    CHECK_THROWS_WITH_AS(layer.step(ctx, h, bad), doctest::Contains("linear_layer::step (bias): eps=inf must be finite"),
                         compact::error);
    CHECK(bit_equal(dev.read(layer.weight()), w_before));
    CHECK(layer.counters().step == 4);
    CHECK(layer.gradient_pending());
}

TEST_CASE_TEMPLATE("rank::full trains exactly like uncompressed AdamW for alpha != 1 (alpha scales subspace steps "
                   "only)" COMPACT_TEST_ON_DEVICE,
                   Cfg, COMPACT_TEST_CONFIGS)
{
    // alpha scales a step taken in a subspace; rank::full (P = I) is no subspace, so its W follows plain
    // AdamW whatever alpha says, as its bias does.
    using Backend = typename Cfg::backend;
    using Scalar = typename Cfg::scalar;
    using State = typename Cfg::state;
    compact_test::device<Backend> dev;
    const regression<Scalar> problem(48, 40, 12, 0xa1fa);
    const device_regression<Backend, Scalar> problem_d(dev, problem);
    const index_t m = problem.m;
    const double tol = is_float<Scalar> ? 1e-4 : 1e-10; // as in the identity checks above
    compact::linear_options options;
    options.seed = 21;
    options.layer = 8;
    options.max_rows = problem.rows;
    options.resample.gap = 3; // epochs change; the identity does not
    compact::linear_layer<Scalar, compact::rank::full, Backend, State> layer(in_features{problem.n}, out_features{m},
                                                                             options);
    initialise(dev, layer, 16);
    const auto w_start = to_double(dev.read(layer.weight()));
    auto w_ref = w_start, w_scaled = w_start;
    auto b_ref = to_double(dev.read(layer.bias(), static_cast<std::size_t>(m)));
    reference_adamw w_state(w_ref.size()), w_scaled_state(w_ref.size()), b_state(b_ref.size());
    const auto h = hyper(1e-2, 0.5, 0.1);
    std::vector<double> g_ref, db_ref;
    for (int s = 0; s < 20; ++s) {
        const auto dy = forward_backward(layer, dev, problem_d);
        layer.step(dev.ctx(), h);
        exact_gradients(problem, dy, g_ref, db_ref);
        w_state.step(h, w_ref, g_ref);
        w_scaled_state.step(h, w_scaled, g_ref, h.alpha);
        b_state.step(h, b_ref, db_ref);
    }
    const auto w = dev.read(layer.weight());
    CHECK_RELATIVE(relative_error(w, w_ref), tol);
    CHECK_RELATIVE(relative_error(dev.read(layer.bias(), static_cast<std::size_t>(m)), b_ref), tol);
    // Negative control: applying alpha would have made the change of W about half as large.
    std::vector<double> change(w.size()), change_scaled(w.size());
    for (std::size_t k = 0; k < w.size(); ++k) {
        change[k] = static_cast<double>(w[k]) - w_start[k];
        change_scaled[k] = w_scaled[k] - w_start[k];
    }
    CHECK(relative_error(change, change_scaled) > 0.2);
}

// ========================================================================= memory and errors

TEST_CASE_TEMPLATE("linear_layer memory queries" COMPACT_TEST_ON_DEVICE, Cfg, COMPACT_TEST_CONFIGS)
{
    using Backend = typename Cfg::backend;
    using Scalar = typename Cfg::scalar;
    using State = typename Cfg::state;
    constexpr index_t n = 50, m = 30;
    compact::linear_options options;
    options.max_rows = 100;
    compact::linear_layer<Scalar, compact::rank::ratio<1, 4>, Backend, State> layer(in_features{n}, out_features{m},
                                                                                    options);
    const index_t r = layer.rank();
    CHECK(r == 13); // round(50 / 4)
    for (index_t rows : {index_t{0}, index_t{1}, index_t{37}, index_t{100}})
        CHECK(layer.saved_bytes(rows) == static_cast<std::size_t>(rows * r) * sizeof(Scalar));
    CHECK(layer.saved_bytes(100) < static_cast<std::size_t>(100 * n) * sizeof(Scalar));
    // Moments of W (m, r) and of b (m).
    CHECK(layer.state_bytes() == static_cast<std::size_t>(2 * m * r + 2 * m) * sizeof(State));

    options.bias = false;
    compact::linear_layer<Scalar, compact::rank::ratio<1, 4>, Backend, State> no_bias(in_features{n}, out_features{m},
                                                                                      options);
    CHECK(no_bias.bias() == nullptr); // pointer tests only
    CHECK(no_bias.bias_gradient() == nullptr);
    CHECK(no_bias.state_bytes() == static_cast<std::size_t>(2 * m * r) * sizeof(State));

    compact::linear_layer<Scalar, compact::rank::full, Backend, State> full(in_features{n}, out_features{m}, options);
    CHECK(full.rank() == n);
    CHECK(full.saved_bytes(100) == static_cast<std::size_t>(100 * n) * sizeof(Scalar));
}

TEST_CASE_TEMPLATE("linear_layer errors name the problem" COMPACT_TEST_ON_DEVICE, Cfg, COMPACT_TEST_CONFIGS)
{
    using Backend = typename Cfg::backend;
    using Scalar = typename Cfg::scalar;
    using State = typename Cfg::state;
    using Layer = compact::linear_layer<Scalar, compact::rank::ratio<1, 4>, Backend, State>;
    using doctest::Contains;
    compact_test::device<Backend> dev;
    const auto& ctx = dev.ctx();
    constexpr index_t n = 16, m = 6, max_rows = 8;
    compact::linear_options options;
    options.max_rows = max_rows;
    options.seed = 3;

    std::mt19937_64 rng(0xe7);
    const auto x = uniform<Scalar>(rng, (max_rows + 1) * n, -1, 1);
    const auto dy = uniform<Scalar>(rng, (max_rows + 1) * m, -1, 1);
    const auto x_d = dev.upload(x);
    const auto dy_d = dev.upload(dy);
    // Room for the widest wrong shape below (Y (8, 7), dX (8, 17)), so that every view is in bounds.
    auto y_d = zeros<Scalar>(dev, (max_rows + 1) * (m + 1));
    auto dx_d = zeros<Scalar>(dev, (max_rows + 1) * (n + 1));

    options.max_rows = 0;
    CHECK_THROWS_WITH_AS(Layer(in_features{n}, out_features{m}, options), Contains("max_rows=0"), compact::error);
    options.max_rows = max_rows;
    Layer layer(in_features{n}, out_features{m}, options);
    initialise(dev, layer, 6);

    CHECK_THROWS_WITH_AS(layer.forward(ctx, x_d.cview(max_rows + 1, n), y_d.view(max_rows + 1, m)),
                         Contains("linear_layer::forward: X has 9 rows but the layer was built for max_rows=8"),
                         compact::error);
    CHECK_THROWS_WITH_AS(layer.backward(ctx, dy_d.cview(max_rows, m), dx_d.view(max_rows, n)),
                         Contains("linear_layer::backward: called without a preceding forward"), compact::error);
    CHECK_THROWS_WITH_AS(layer.step(ctx, hyper()), Contains("linear_layer::step: no gradient since the last step"),
                         compact::error);
    CHECK_THROWS_WITH_AS(layer.forward(ctx, x_d.cview(max_rows, n - 1), y_d.view(max_rows, m)), Contains("X is (8, 15)"),
                         compact::error);
    CHECK_THROWS_WITH_AS(layer.forward(ctx, x_d.cview(max_rows, n), y_d.view(max_rows, m + 1)), Contains("Y is (8, 7)"),
                         compact::error);

    layer.forward(ctx, x_d.cview(max_rows, n), y_d.view(max_rows, m));
    CHECK_THROWS_WITH_AS(layer.backward(ctx, dy_d.cview(max_rows - 1, m), dx_d.view(max_rows - 1, n)),
                         Contains("dY is (7, 6) but (8, 6) is required"), compact::error);
    CHECK_THROWS_WITH_AS(layer.backward(ctx, dy_d.cview(max_rows, m), dx_d.view(max_rows, n + 1)),
                         Contains("dX is (8, 17)"), compact::error);
    CHECK(layer.updates() == 0);
    // The failed calls changed nothing: the saved forward still pairs with a correct backward.
    layer.backward(ctx, dy_d.cview(max_rows, m), dx_d.view(max_rows, n));
    CHECK_THROWS_WITH_AS(layer.backward(ctx, dy_d.cview(max_rows, m), dx_d.view(max_rows, n)),
                         Contains("without a preceding forward"), compact::error);

    // A step with bad hyper-parameters throws and leaves everything as it was; a good one then runs.
    const snapshot<Scalar, State> before(dev, layer);
    auto bad = hyper();
    bad.lr = -1;
    CHECK_THROWS_WITH_AS(layer.step(ctx, bad), Contains("lr=-1"), compact::error);
    CHECK(snapshot<Scalar, State>(dev, layer) == before);
    layer.step(ctx, hyper());
    CHECK(layer.updates() == 1);
    CHECK_THROWS_WITH_AS(layer.step(ctx, hyper()), Contains("no gradient"), compact::error);
    CHECK(layer.updates() == 1);
}

// =================================================================================== master weights

#if !COMPACT_TEST_CUDA_BUILD
// These cases name compact::cpu layers (float weights with double moments and masters, beside a double
// reference layer), so they are the CPU backend's: there a layer's buffers are host memory, which the
// helpers below read and write directly.

namespace {

/// W and b in +-[0.5, 1), where half an ulp of float is 2^-25 = 3.0e-8.
template <class Layer>
void initialise_large(Layer& layer, std::uint64_t seed)
{
    using scalar = typename Layer::layer_type::scalar_type;
    std::mt19937_64 rng(seed);
    std::uniform_real_distribution<double> d(0.5, 1.0);
    std::bernoulli_distribution negative(0.5);
    auto draw = [&] { return static_cast<scalar>(negative(rng) ? -d(rng) : d(rng)); };
    auto w = layer.weight();
    for (index_t i = 0; i < w.rows; ++i)
        for (index_t j = 0; j < w.cols; ++j) w(i, j) = draw();
    for (index_t o = 0; o < layer.out(); ++o) layer.bias()[o] = draw();
}

template <class T>
std::vector<double> change_from(const std::vector<T>& w, const std::vector<double>& start)
{
    std::vector<double> d(start.size());
    for (std::size_t i = 0; i < d.size(); ++i) d[i] = static_cast<double>(w[i]) - start[i];
    return d;
}

template <class Policy>
void master_weights_track_float64(double lr)
{
    using compact::cpu;
    compact_test::device<cpu> dev;
    const cpu::context& ctx = dev.ctx();
    const regression<float> problem(32, 64, 12, 0x3a57);
    regression<double> problem_ref(32, 64, 12, 0x3a57);
    problem_ref.x = to_double(problem.x); // the float problem's very values
    problem_ref.target = to_double(problem.target);
    const device_regression<cpu, float> problem_d(dev, problem);
    const device_regression<cpu, double> problem_ref_d(dev, problem_ref);
    compact::linear_options options;
    options.seed = 11;
    options.layer = 4;
    options.max_rows = problem.rows;
    options.resample.gap = 0; // one P: W drifts steadily, step after step
    compact::linear_layer<float, Policy, cpu, double> plain(in_features{problem.n}, out_features{problem.m}, options);
    compact::linear_layer<double, Policy, cpu, double> reference(in_features{problem.n}, out_features{problem.m},
                                                                 options);
    options.master_weights = true;
    compact::linear_layer<float, Policy, cpu, double> master(in_features{problem.n}, out_features{problem.m}, options);
    initialise_large(plain, 8);
    initialise_large(master, 8);
    initialise_large(reference, 8); // the same values, rounded to float above
    for (index_t i = 0; i < problem.m * problem.n; ++i)
        reference.weight().data[i] = static_cast<double>(master.weight().data[i]);
    for (index_t o = 0; o < problem.m; ++o) reference.bias()[o] = static_cast<double>(master.bias()[o]);
    const auto w_start = to_double(copy_of<float>(master.weight()));
    const std::vector<double> b_start(master.bias(), master.bias() + problem.m);

    const auto h = hyper(lr, 1.0, 0.1);
    for (int s = 0; s < 1000; ++s) {
        train_step(plain, dev, ctx, problem_d, h);
        train_step(master, dev, ctx, problem_d, h);
        train_step(reference, dev, ctx, problem_ref_d, h);
    }
    const auto change_ref = change_from(copy_of<double>(reference.weight()), w_start);
    const std::vector<double> b_ref(reference.bias(), reference.bias() + problem.m);
    const auto b_change_ref = change_from(b_ref, b_start);
    // The float layer's gradients differ from float64's by float rounding (about 1e-7 relative), which
    // AdamW's normalised direction passes on; the master accumulates them in double: the change of W
    // (about 1000 lr) matches float64 to 1e-4.
    CHECK_RELATIVE(relative_error(change_from(copy_of<double>(master.master_weight()), w_start), change_ref), 1e-4);
    CHECK_RELATIVE(relative_error(change_from(std::vector<double>(master.master_bias(), master.master_bias() + problem.m),
                                              b_start),
                                  b_change_ref),
                   1e-4);
    // W is the master rounded: its change is right to half an ulp (3e-8) against about 1000 lr.
    CHECK_RELATIVE(relative_error(change_from(copy_of<float>(master.weight()), w_start), change_ref), 0.05);
    // Negative control: float weights alone lose (nearly) every update.
    const double plain_error = relative_error(change_from(copy_of<float>(plain.weight()), w_start), change_ref);
    INFO("float weights without a master: relative error of the change ", plain_error);
    if (print_errors()) MESSAGE("float weights without a master: relative error of the change ", plain_error);
    CHECK(plain_error > 0.5);
}

} // namespace

TEST_CASE("linear_layer with master_weights trains float weights at a learning rate where float alone stalls")
{
    // lr such that AdamW's step (at most about 3.2 lr, times |N P^T| for the subspace) stays below half
    // an ulp of weights in [0.5, 1).
    SUBCASE("rank::full (identity path)") { master_weights_track_float64<compact::rank::full>(5e-9); }
    SUBCASE("rank::ratio<1, 4> (subspace path)") { master_weights_track_float64<compact::rank::ratio<1, 4>>(1e-9); }
}

TEST_CASE("linear_layer with master_weights is the caller-memory API with a master, bit for bit")
{
    using compact::cpu;
    compact_test::device<cpu> dev;
    const cpu::context& ctx = dev.ctx();
    const regression<float> problem(24, 40, 10, 0x1e);
    const device_regression<cpu, float> problem_d(dev, problem);
    const index_t rows = problem.rows, n = problem.n, m = problem.m;
    compact::linear_options options;
    options.seed = 0xfeed;
    options.layer = 2;
    options.max_rows = rows;
    options.resample.gap = 4;
    options.moments = compact::moment_policy::transfer;
    options.master_weights = true;
    using Policy = compact::rank::ratio<1, 4>;
    compact::linear_layer<float, Policy, cpu, double> layer(in_features{n}, out_features{m}, options);
    initialise(dev, layer, 3);
    CHECK_FALSE(layer.master_valid());

    using manual_type = compact::compressed_linear<float, Policy, cpu>;
    const manual_type manual(in_features{n}, out_features{m}, options.seed, options.layer, Policy{}, options.dist,
                             options.resample);
    const compact::subspace_adamw<float, cpu, double> optimizer(out_features{m}, manual.projection(), options.moments);
    const index_t r = manual.rank();
    auto w = copy_of<float>(layer.weight());
    std::vector<float> b(layer.bias(), layer.bias() + m);
    std::vector<double> master(w.begin(), w.end()), master_b(b.begin(), b.end());
    std::vector<float> y(rows * m), z(rows * r), dy, g_sub(m * r), db(m);
    std::vector<double> wm(m * r, 0.0), wv(m * r, 0.0), bm(m, 0.0), bv(m, 0.0);
    REQUIRE(manual.saved_bytes(rows) == z.size() * sizeof(float));
    auto saved = compact::bind_saved<typename manual_type::saved_type>(z.data(), manual.saved_bytes(rows));
    compact::layer_gradient<float> grads{view_of(g_sub, m, r), view_of(db, 1, m)};
    compact::adam_counters w_counters, b_counters;
    std::vector<unsigned char> ws(std::max(manual.workspace_bytes(rows), optimizer.workspace_bytes(true)));
    const auto h = hyper(1e-3, 0.5, 0.1);
    for (int s = 0; s < 10; ++s) {
        const std::uint64_t epoch = options.resample.epoch(static_cast<std::uint64_t>(s));
        train_step(layer, dev, ctx, problem_d, h);
        manual.forward(ctx, problem.inputs(0, rows), cview_of(w, m, n), cview_of(b, 1, m), view_of(y, rows, m), saved,
                       static_cast<std::uint64_t>(s), {ws.data(), ws.size()});
        problem.gradient(0, cview_of(y, rows, m), dy);
        manual.backward(ctx, cview_of(dy, rows, m), cview_of(w, m, n), saved, {}, grads, {ws.data(), ws.size()});
        CHECK(grads.epoch == epoch);
        optimizer.step(ctx, h, manual.projection(), view_of(w, m, n), grads, view_of(wm, m, r), view_of(wv, m, r),
                       w_counters, {ws.data(), ws.size()}, view_of(master, m, n));
        compact::adamw<cpu>::step(ctx, h, view_of(b, 1, m), cview_of(db, 1, m), view_of(bm, 1, m), view_of(bv, 1, m),
                                  b_counters, view_of(master_b, 1, m));
        CHECK(layer.master_valid());
    }
    CHECK(bit_equal(copy_of<float>(layer.weight()), w));
    CHECK(bit_equal(copy_of<double>(layer.master_weight()), master));
    CHECK(bit_equal(std::vector<double>(layer.master_bias(), layer.master_bias() + m), master_b));
    CHECK(bit_equal(std::vector<float>(layer.bias(), layer.bias() + m), b));
    CHECK(bit_equal(copy_of<double>(layer.first_moment()), wm));
}

TEST_CASE("linear_layer master weights: taken from W at the first step, sync_master after changing W, memory")
{
    using compact::cpu;
    using Layer = compact::linear_layer<float, compact::rank::ratio<1, 4>, cpu, double>;
    using doctest::Contains;
    compact_test::device<cpu> dev;
    const cpu::context& ctx = dev.ctx();
    const regression<float> problem(16, 32, 8, 0x51);
    const device_regression<cpu, float> problem_d(dev, problem);
    compact::linear_options options;
    options.max_rows = problem.rows;
    Layer plain(in_features{problem.n}, out_features{problem.m}, options);
    options.master_weights = true;
    Layer layer(in_features{problem.n}, out_features{problem.m}, options);
    const index_t m = problem.m, n = problem.n, r = layer.rank();

    // Memory: the master copies of W (m, n) and b (m) in State.
    CHECK(layer.state_bytes() == plain.state_bytes() + static_cast<std::size_t>(m * n + m) * sizeof(double));
    CHECK(plain.state_bytes() == static_cast<std::size_t>(2 * m * r + 2 * m) * sizeof(double));
    CHECK(plain.master_weight().empty());
    CHECK(plain.master_weight().data == nullptr);
    CHECK(plain.master_bias() == nullptr);
    CHECK_FALSE(plain.master_valid());
    plain.sync_master(ctx); // nothing to do
    CHECK_FALSE(plain.master_valid());
    CHECK_THROWS_WITH_AS(plain.restore_counters(0, {}, {}, true),
                         Contains("linear_layer::restore_counters: master_restored is set but the layer was built "
                                  "without options.master_weights"),
                         compact::error);
    options.bias = false;
    Layer no_bias(in_features{problem.n}, out_features{problem.m}, options);
    CHECK(no_bias.master_bias() == nullptr);
    CHECK(no_bias.master_weight().rows == m);
    CHECK(no_bias.state_bytes() == static_cast<std::size_t>(2 * m * r + m * n) * sizeof(double));

    // The master follows whatever W holds at the first step.
    initialise(dev, layer, 12);
    CHECK_FALSE(layer.master_valid());
    const auto h = hyper(1e-3, 1.0, 0.0);
    train_step(layer, dev, ctx, problem_d, h);
    CHECK(layer.master_valid());
    auto widened_equals_w = [&] {
        const auto w = copy_of<float>(layer.weight());
        const auto master = copy_of<double>(layer.master_weight());
        bool same = true;
        for (std::size_t i = 0; i < w.size(); ++i) same = same && master[i] == static_cast<double>(w[i]);
        return same;
    };
    CHECK_FALSE(widened_equals_w()); // lr 1e-3 moved the master by more than float's rounding keeps
    // A change of W between steps is overwritten by the next step, unless sync_master() follows it.
    layer.weight()(0, 0) = 2.0f;
    train_step(layer, dev, ctx, problem_d, h);
    CHECK(std::abs(layer.weight()(0, 0) - 2.0f) > 0.5f);
    layer.weight()(0, 0) = 2.0f;
    layer.sync_master(ctx);
    CHECK(widened_equals_w());
    train_step(layer, dev, ctx, problem_d, h);
    CHECK(std::abs(layer.weight()(0, 0) - 2.0f) < 0.01f);
}
#endif // !COMPACT_TEST_CUDA_BUILD

#if !COMPACT_TEST_CUDA_BUILD
// Errors name the function the user called: a linear_layer's constructor, not the compressor it builds.
TEST_CASE("linear_layer constructor errors name linear_layer")
{
    compact::linear_options o;
    o.max_rows = 4;
    struct too_big {
        index_t rank(const compact::layer_info& l) const { return l.in + 1; }
    };
    CHECK_THROWS_WITH_AS((compact::linear_layer<float, too_big, compact::cpu>(in_features{8}, out_features{4}, o)),
                         doctest::Contains("linear_layer: rank policy returned r=9"), compact::error);
    CHECK_THROWS_WITH_AS(
        (compact::linear_layer<float, compact::rank::fixed, compact::cpu>(in_features{8}, out_features{4}, o,
                                                                           compact::rank::fixed{0})),
        doctest::Contains("linear_layer: rank policy returned r=0"), compact::error);
    CHECK_THROWS_WITH_AS((compact::linear_layer<float, compact::quantized, compact::cpu>(
                             in_features{8}, out_features{4}, o, compact::quantized{compact::store_scheme::quantized(3)})),
                         doctest::Contains("linear_layer: scheme bits=3"), compact::error);
    CHECK_THROWS_WITH_AS((compact::linear_layer<float, compact::rank::full, compact::cpu>(in_features{0}, out_features{4}, o)),
                         doctest::Contains("linear_layer: in=0"), compact::error);
    // A shape whose weight would not fit in 64 bits is refused before anything is allocated.
    CHECK_THROWS_WITH_AS((compact::linear_layer<float, compact::rank::full, compact::cpu>(
                             in_features{index_t{1} << 40}, out_features{index_t{1} << 40}, o)),
                         doctest::Contains("overflows"), compact::error);
}
#endif

// ================================================== non-finite gradients and loss scaling

namespace {

/// The layer's gradient buffers as writable views, to plant a NaN or an infinity in them (the layer
/// only shows them const; they are the backend's memory).
template <class Layer>
auto writable_gradient(const Layer& layer)
{
    using scalar = typename Layer::layer_type::scalar_type;
    const auto g = layer.gradient();
    return compact::matrix_view<scalar>(const_cast<scalar*>(g.data), g.rows, g.cols);
}
template <class Layer>
auto writable_bias_gradient(const Layer& layer)
{
    using scalar = typename Layer::layer_type::scalar_type;
    return compact::matrix_view<scalar>(const_cast<scalar*>(layer.bias_gradient()), 1, layer.out());
}

/// forward and backward of the whole batch with dY multiplied by dy_scale (a power of two: exact), then
/// step; returns what step returned.
template <class Layer, class Backend, class Scalar>
bool scaled_train_step(Layer& layer, const device<Backend>& dev, const device_regression<Backend, Scalar>& problem,
                       const compact::adamw_params& h, double dy_scale)
{
    const regression<Scalar>& p = problem.host;
    auto y_d = zeros<Scalar>(dev, p.rows * p.m);
    std::vector<Scalar> dy;
    layer.forward(dev.ctx(), problem.inputs(0, p.rows), y_d.view(p.rows, p.m));
    p.gradient(0, cview_of(dev.download(y_d), p.rows, p.m), dy);
    for (auto& d : dy) d = static_cast<Scalar>(static_cast<double>(d) * dy_scale);
    const auto dy_d = dev.upload(dy);
    layer.backward(dev.ctx(), dy_d.cview(p.rows, p.m), compact::matrix_view<Scalar>{});
    const bool applied = layer.step(dev.ctx(), h);
    dev.synchronize(); // y_d and dy_d go out of scope
    return applied;
}

/// A snapshot without the gradient buffers (which a skipped step leaves holding the discarded gradient).
template <class Scalar, class State>
snapshot<Scalar, State> without_gradients(snapshot<Scalar, State> s)
{
    s.gradient.clear();
    s.bias_gradient.clear();
    return s;
}

} // namespace

TEST_CASE_TEMPLATE("skip_nonfinite: a NaN or an infinity in G or db skips the step, changes nothing, and the next "
                   "step is the one that never saw it, bit for bit" COMPACT_TEST_ON_DEVICE,
                   Cfg, COMPACT_TEST_CONFIGS)
{
    using Backend = typename Cfg::backend;
    using Scalar = typename Cfg::scalar;
    using State = typename Cfg::state;
    using layer_type = compact::linear_layer<Scalar, compact::rank::ratio<1, 4>, Backend, State>;
    compact_test::device<Backend> dev;
    const regression<Scalar> problem(64, 32, 12, 0x5c1);
    const device_regression<Backend, Scalar> problem_d(dev, problem);
    compact::linear_options options;
    options.seed = 99;
    options.layer = 2;
    options.max_rows = problem.rows;
    options.resample.gap = 2; // a skipped step counted as an update would change P's epoch
    options.master_weights = true;
    options.skip_nonfinite = true;
    layer_type skipping(in_features{problem.n}, out_features{problem.m}, options);
    options.skip_nonfinite = false;
    layer_type reference(in_features{problem.n}, out_features{problem.m}, options);
    initialise(dev, skipping, 6);
    initialise(dev, reference, 6);
    const auto h = hyper(1e-2, 0.25, 0.01);

    const Scalar nan = std::numeric_limits<Scalar>::quiet_NaN(), inf = std::numeric_limits<Scalar>::infinity();
    // (where, value): 0 plants it in G, 1 in db, 2 in dY (which reaches both).
    const std::pair<int, Scalar> faults[] = {{0, nan}, {1, inf}, {0, -inf}, {2, nan}, {1, nan}};
    int skipped = 0;
    for (int s = 0; s < 12; ++s) {
        if (s % 2 == 1 && skipped < 5) {
            const int where = faults[skipped].first;
            const Scalar value = faults[skipped].second;
            CAPTURE(where);
            CAPTURE(static_cast<double>(value));
            const auto before = without_gradients(snapshot<Scalar, State>(dev, skipping));
            const auto master_before = dev.read(skipping.master_weight());
            if (where == 2) {
                REQUIRE_FALSE(scaled_train_step(skipping, dev, problem_d, h, static_cast<double>(value)));
            } else {
                std::vector<Scalar> dy;
                auto y_d = zeros<Scalar>(dev, problem.rows * problem.m);
                skipping.forward(dev.ctx(), problem_d.inputs(0, problem.rows), y_d.view(problem.rows, problem.m));
                problem.gradient(0, cview_of(dev.download(y_d), problem.rows, problem.m), dy);
                const auto dy_d = dev.upload(dy);
                skipping.backward(dev.ctx(), dy_d.cview(problem.rows, problem.m), compact::matrix_view<Scalar>{});
                const auto target = where == 0 ? writable_gradient(skipping) : writable_bias_gradient(skipping);
                auto values = dev.read(target);
                values[values.size() / 2] = value;
                dev.write(target, values);
                REQUIRE_FALSE(skipping.step(dev.ctx(), h));
                dev.synchronize();
            }
            ++skipped;
            CHECK(skipping.skipped_steps() == static_cast<std::uint64_t>(skipped));
            CHECK_FALSE(skipping.gradient_pending());
            CHECK(without_gradients(snapshot<Scalar, State>(dev, skipping)) == before);
            CHECK(bit_equal(dev.read(skipping.master_weight()), master_before));
        }
        CHECK(scaled_train_step(skipping, dev, problem_d, h, 1.0));
        CHECK(scaled_train_step(reference, dev, problem_d, h, 1.0));
    }
    CHECK(skipped == 5);
    CHECK(skipping.updates() == 12);
    CHECK(reference.skipped_steps() == 0);
    CHECK(snapshot<Scalar, State>(dev, skipping) == snapshot<Scalar, State>(dev, reference));
    CHECK(bit_equal(dev.read(skipping.master_weight()), dev.read(reference.master_weight())));

    // Several layers checked together with one nonfinite_check (the loss-scaling loop of loss_scaler.hpp).
    compact::nonfinite_check<Backend> check;
    auto y_d = zeros<Scalar>(dev, problem.rows * problem.m);
    std::vector<Scalar> dy;
    for (layer_type* l : {&skipping, &reference}) {
        l->forward(dev.ctx(), problem_d.inputs(0, problem.rows), y_d.view(problem.rows, problem.m));
        problem.gradient(0, cview_of(dev.download(y_d), problem.rows, problem.m), dy);
        const auto dy_d = dev.upload(dy);
        l->backward(dev.ctx(), dy_d.cview(problem.rows, problem.m), compact::matrix_view<Scalar>{});
        dev.synchronize();
    }
    check.reset(dev.ctx());
    skipping.check_gradients(dev.ctx(), check);
    reference.check_gradients(dev.ctx(), check);
    CHECK_FALSE(check.found(dev.ctx()));
    const auto target = writable_bias_gradient(reference);
    auto values = dev.read(target);
    values[0] = inf;
    dev.write(target, values);
    check.reset(dev.ctx());
    skipping.check_gradients(dev.ctx(), check);
    reference.check_gradients(dev.ctx(), check);
    CHECK(check.found(dev.ctx()));
}

TEST_CASE_TEMPLATE("loss scaling: dY times loss_scaler::scale() with grad_scale = unscale() trains bit for bit as "
                   "without it" COMPACT_TEST_ON_DEVICE,
                   Cfg, COMPACT_TEST_CONFIGS)
{
    using Backend = typename Cfg::backend;
    using Scalar = typename Cfg::scalar;
    using State = typename Cfg::state;
    using layer_type = compact::linear_layer<Scalar, compact::rank::ratio<1, 4>, Backend, State>;
    compact_test::device<Backend> dev;
    const regression<Scalar> problem(64, 32, 12, 0x1055);
    const device_regression<Backend, Scalar> problem_d(dev, problem);
    compact::linear_options options;
    options.seed = 7;
    options.layer = 1;
    options.max_rows = problem.rows;
    options.resample.gap = 3;
    options.skip_nonfinite = true;
    layer_type scaled(in_features{problem.n}, out_features{problem.m}, options);
    layer_type plain(in_features{problem.n}, out_features{problem.m}, options);
    initialise(dev, scaled, 8);
    initialise(dev, plain, 8);

    compact::loss_scaler_options o;
    o.growth_interval = 4; // the scale changes during the run: 2^16, 2^17, 2^18
    compact::loss_scaler scaler(o);
    auto h = hyper(1e-2, 0.25, 0.01);
    for (int s = 0; s < 10; ++s) {
        auto hs = h;
        hs.grad_scale = scaler.unscale();
        const double scale = scaler.scale();
        const bool applied = scaled_train_step(scaled, dev, problem_d, hs, scale);
        CHECK(applied);
        scaler.update(!applied);
        CHECK(scaled_train_step(plain, dev, problem_d, h, 1.0));
    }
    CHECK(scaler.scale() == 262144.0);
    const snapshot<Scalar, State> a(dev, scaled), b(dev, plain);
    // The gradients (left from the last step) carry its scale, 2^18, exactly; everything else is equal.
    std::vector<Scalar> unscaled = a.gradient, unscaled_bias = a.bias_gradient;
    for (auto& x : unscaled) x = static_cast<Scalar>(static_cast<double>(x) / 262144.0);
    for (auto& x : unscaled_bias) x = static_cast<Scalar>(static_cast<double>(x) / 262144.0);
    CHECK(bit_equal(unscaled, b.gradient));
    CHECK(bit_equal(unscaled_bias, b.bias_gradient));
    CHECK(without_gradients(a) == without_gradients(b));

    // A gradient that overflowed (dY scaled to infinity): the step is skipped and the scaler backs off.
    auto hs = h;
    hs.grad_scale = 1e-300;
    const bool applied = scaled_train_step(scaled, dev, problem_d, hs, std::numeric_limits<double>::infinity());
    CHECK_FALSE(applied);
    scaler.update(!applied);
    CHECK(scaler.scale() == 131072.0);
    CHECK(without_gradients(snapshot<Scalar, State>(dev, scaled)) == without_gradients(a));
}
