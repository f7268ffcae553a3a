// tests/test_optim.cpp: plain AdamW and subspace AdamW (compact/optim/adamw.hpp) against float64
// references of SPEC section 3 written here, the identity check of the whole compressed layer, the
// moment policies at an epoch change, master weights, argument validation and the memory queries.
//
// One body, two backends: every test body runs on the backend under test of backend_under_test.hpp,
// the CPU in this .cpp's own build and CUDA in tests/cuda/test_cuda_optim.cu, which includes this file
// (skipped, exit 77, without a device). Inputs and float64 references stay on the host; what the
// library reads and writes goes through compact_test::device (upload, workspace, download). On CUDA
// float GEMMs round differently (FMA, another summation order), so a library result is compared with
// a host computation within a tolerance; two library runs on the same backend (a kept P against a
// regenerated one, a run against a rerun) are compared bit for bit.
#include "backend_under_test.hpp"
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
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

using compact::index_t;
using compact::out_features;

using namespace compact_test;

/// P (n, r) of `spec` in float64, element by element from compact::projection_element.
std::vector<double> reference_projection(const compact::projection_spec& spec)
{
    std::vector<double> p(static_cast<std::size_t>(spec.n * spec.r));
    for (index_t i = 0; i < spec.n; ++i)
        for (index_t j = 0; j < spec.r; ++j) p[static_cast<std::size_t>(i * spec.r + j)] = compact::projection_element(spec, i, j);
    return p;
}

// ------------------------------------------------------------------------- the float64 references

/// Transformers-style Adam moments (SPEC section 3) in float64:
///   t <- t + 1; M <- b1 M + (1 - b1) G; V <- b2 V + (1 - b2) G^2; N = M / (sqrt(V) + eps)
/// update() returns eta_t = lr sqrt(1 - b2^t) / (1 - b1^t) and leaves N in `direction`.
struct reference_adam {
    std::vector<double> m, v, direction;
    std::uint64_t t = 0;

    explicit reference_adam(std::size_t size) : m(size, 0.0), v(size, 0.0), direction(size, 0.0) {}

    double update(const compact::adamw_params& h, const std::vector<double>& g)
    {
        ++t;
        for (std::size_t i = 0; i < m.size(); ++i) {
            m[i] = h.beta1 * m[i] + (1 - h.beta1) * g[i];
            v[i] = h.beta2 * v[i] + (1 - h.beta2) * g[i] * g[i];
            direction[i] = m[i] / (std::sqrt(v[i]) + h.eps);
        }
        const double td = static_cast<double>(t);
        return h.lr * std::sqrt(1 - std::pow(h.beta2, td)) / (1 - std::pow(h.beta1, td));
    }
};

/// Plain AdamW: W <- W - eta_t N, then W <- W - lr wd W.
void reference_adamw_step(const compact::adamw_params& h, std::vector<double>& w, const std::vector<double>& g,
                          reference_adam& state)
{
    const double eta = state.update(h, g);
    for (std::size_t i = 0; i < w.size(); ++i) {
        w[i] -= eta * state.direction[i];
        w[i] -= h.lr * h.weight_decay * w[i];
    }
}

/// Subspace AdamW: moments (m, r) from G_sub, W (m, n) <- W - eta_t alpha N P^T, then W <- W - lr wd W.
void reference_subspace_step(const compact::adamw_params& h, std::vector<double>& w, const std::vector<double>& g_sub,
                             const std::vector<double>& p, index_t m, index_t n, index_t r, reference_adam& state)
{
    const double eta = state.update(h, g_sub);
    for (index_t i = 0; i < m; ++i)
        for (index_t j = 0; j < n; ++j) {
            double s = 0;
            for (index_t k = 0; k < r; ++k)
                s += state.direction[static_cast<std::size_t>(i * r + k)] * p[static_cast<std::size_t>(j * r + k)];
            double& x = w[static_cast<std::size_t>(i * n + j)];
            x -= eta * h.alpha * s;
            x -= h.lr * h.weight_decay * x;
        }
}

/// G_sub as a backward records it for the optimizer: written, under `epoch`. For the cases that call
/// subspace_adamw::step without a backward. The optimizer only reads grads.weight, so the view of a
/// const buffer never leads to a write.
template <class T>
compact::layer_gradient<T> recorded(compact::const_matrix_view<T> g, std::uint64_t epoch)
{
    compact::layer_gradient<T> grads{compact::matrix_view<T>(const_cast<T*>(g.data), g.rows, g.cols, g.ld)};
    grads.epoch = epoch;
    grads.written = true;
    return grads;
}

compact::adamw_params default_hyper()
{
    compact::adamw_params h;
    h.lr = 1e-2;
    h.beta1 = 0.9;
    h.beta2 = 0.999;
    h.eps = 1e-6;
    h.weight_decay = 0.1;
    h.alpha = 1.0;
    return h;
}

} // namespace

// ===================================================================================== plain AdamW

TEST_CASE_TEMPLATE("adamw::step equals a float64 transformers-style AdamW over 20 steps" COMPACT_TEST_ON_DEVICE, Cfg,
                   COMPACT_TEST_CONFIGS)
{
    using Backend = typename Cfg::backend;
    using Scalar = typename Cfg::scalar;
    using State = typename Cfg::state;
    compact_test::device<Backend> dev;
    const auto& ctx = dev.ctx();
    constexpr index_t rows = 13, cols = 37, size = rows * cols;
    // Relative (2-norm) error after 20 steps: a few roundings per step in the working precision
    // (float: u = 6e-8; double: u = 1e-16), with a wide margin.
    const double tol = is_float<Scalar> ? 2e-6 : 1e-13;

    std::mt19937_64 rng(0x0a11);
    auto w = uniform<Scalar>(rng, size, -1, 1);
    std::vector<State> m(size, State(0)), v(size, State(0));
    auto w_d = dev.upload(w);
    auto m_d = dev.upload(m);
    auto v_d = dev.upload(v);
    device_array<Backend, Scalar> g_d(static_cast<std::size_t>(size));
    compact::adam_counters counters;
    auto w_ref = to_double(w);
    const auto w_start = w_ref;
    reference_adam ref(static_cast<std::size_t>(size));

    auto h = default_hyper();
    for (int s = 0; s < 20; ++s) {
        h.lr = 2e-2 * (1.0 - s / 40.0); // a schedule: hyper-parameters are a plain struct per step
        auto g = uniform<Scalar>(rng, size, -1, 1);
        // Gradient scales 1, 1e-2 and 1e-6 per column: for the last, sqrt(V) is comparable to eps, so
        // putting eps inside the root or forgetting a bias correction shows up as a large error.
        for (index_t i = 0; i < rows; ++i)
            for (index_t j = 0; j < cols; ++j)
                g[static_cast<std::size_t>(i * cols + j)] *= static_cast<Scalar>(j % 3 == 0 ? 1.0 : j % 3 == 1 ? 1e-2 : 1e-6);
        dev.upload_to(g_d, g);
        compact::adamw<Backend>::step(ctx, h, w_d.view(rows, cols), g_d.cview(rows, cols), m_d.view(rows, cols),
                                      v_d.view(rows, cols), counters);
        reference_adamw_step(h, w_ref, to_double(g), ref);
        CHECK(counters.step == static_cast<std::uint64_t>(s + 1));
    }
    w = dev.download(w_d);
    m = dev.download(m_d);
    v = dev.download(v_d);
    CHECK_RELATIVE(relative_error(w, w_ref), tol);
    CHECK_RELATIVE(relative_error(m, ref.m), tol);
    CHECK_RELATIVE(relative_error(v, ref.v), tol);
    // The change of W, not only W (dominated by its start value), matches: each step rounds W once
    // more in the working precision, so relative to the change the error is about 20 u |W| / |dW|.
    std::vector<double> change(w_ref.size()), change_ref(w_ref.size());
    for (std::size_t k = 0; k < w_ref.size(); ++k) {
        change[k] = static_cast<double>(w[k]) - w_start[k];
        change_ref[k] = w_ref[k] - w_start[k];
    }
    CHECK_RELATIVE(relative_error(change, change_ref), (is_float<Scalar> ? 2e-5 : 1e-12));
}

TEST_CASE_TEMPLATE("adamw::step on strided views equals the dense run and leaves the padding alone"
                   COMPACT_TEST_ON_DEVICE,
                   Cfg, COMPACT_TEST_CONFIGS)
{
    using Backend = typename Cfg::backend;
    using Scalar = typename Cfg::scalar;
    using State = typename Cfg::state;
    compact_test::device<Backend> dev;
    const auto& ctx = dev.ctx();
    constexpr index_t rows = 5, cols = 7, ld = 11;
    std::mt19937_64 rng(0x5d);
    auto w_dense = uniform<Scalar>(rng, rows * cols, -1, 1);
    auto g_dense = uniform<Scalar>(rng, rows * cols, -1, 1);
    std::vector<State> m_dense(rows * cols, State(0)), v_dense(rows * cols, State(0));
    const Scalar pad = static_cast<Scalar>(12345.0);
    std::vector<Scalar> w_pad(rows * ld, pad), g_pad(rows * ld, pad);
    std::vector<State> m_pad(rows * ld, State(pad)), v_pad(rows * ld, State(pad));
    for (index_t i = 0; i < rows; ++i)
        for (index_t j = 0; j < cols; ++j) {
            w_pad[static_cast<std::size_t>(i * ld + j)] = w_dense[static_cast<std::size_t>(i * cols + j)];
            g_pad[static_cast<std::size_t>(i * ld + j)] = g_dense[static_cast<std::size_t>(i * cols + j)];
            m_pad[static_cast<std::size_t>(i * ld + j)] = State(0);
            v_pad[static_cast<std::size_t>(i * ld + j)] = State(0);
        }
    auto w_dense_d = dev.upload(w_dense);
    const auto g_dense_d = dev.upload(g_dense);
    auto m_dense_d = dev.upload(m_dense);
    auto v_dense_d = dev.upload(v_dense);
    auto w_pad_d = dev.upload(w_pad);
    const auto g_pad_d = dev.upload(g_pad);
    auto m_pad_d = dev.upload(m_pad);
    auto v_pad_d = dev.upload(v_pad);
    compact::adam_counters c_dense, c_pad;
    const auto h = default_hyper();
    for (int s = 0; s < 3; ++s) {
        compact::adamw<Backend>::step(ctx, h, w_dense_d.view(rows, cols), g_dense_d.cview(rows, cols),
                                      m_dense_d.view(rows, cols), v_dense_d.view(rows, cols), c_dense);
        compact::adamw<Backend>::step(ctx, h, compact::matrix_view<Scalar>(w_pad_d.data(), rows, cols, ld),
                                      compact::const_matrix_view<Scalar>(g_pad_d.data(), rows, cols, ld),
                                      compact::matrix_view<State>(m_pad_d.data(), rows, cols, ld),
                                      compact::matrix_view<State>(v_pad_d.data(), rows, cols, ld), c_pad);
    }
    w_dense = dev.download(w_dense_d);
    m_dense = dev.download(m_dense_d);
    v_dense = dev.download(v_dense_d);
    w_pad = dev.download(w_pad_d);
    m_pad = dev.download(m_pad_d);
    v_pad = dev.download(v_pad_d);
    bool same = true, padding_kept = true;
    for (index_t i = 0; i < rows; ++i)
        for (index_t j = 0; j < ld; ++j) {
            const auto p = static_cast<std::size_t>(i * ld + j);
            if (j < cols) {
                const auto d = static_cast<std::size_t>(i * cols + j);
                same = same && w_pad[p] == w_dense[d] && m_pad[p] == m_dense[d] && v_pad[p] == v_dense[d];
            } else {
                padding_kept = padding_kept && w_pad[p] == pad && m_pad[p] == State(pad) && v_pad[p] == State(pad);
            }
        }
    CHECK(same);
    CHECK(padding_kept);
}

// ================================================================================= subspace AdamW

TEST_CASE_TEMPLATE("subspace_adamw::step equals the float64 subspace equations (alpha = 0.25)" COMPACT_TEST_ON_DEVICE,
                   Cfg, COMPACT_TEST_CONFIGS)
{
    using Backend = typename Cfg::backend;
    using Scalar = typename Cfg::scalar;
    using State = typename Cfg::state;
    compact_test::device<Backend> dev;
    const auto& ctx = dev.ctx();
    constexpr index_t m = 20, n = 48, r = 12;
    constexpr std::uint64_t epoch = 2;
    // Relative (2-norm) error after 8 steps. Float: P is rounded to float and N P^T sums r = 12 terms,
    // each step adds a few ulp of W (u = 6e-8); double: the same at u = 1e-16. Wide margin.
    const double tol = is_float<Scalar> ? 2e-6 : 1e-13;

    for (auto dist : {compact::distribution::gaussian, compact::distribution::rademacher}) {
        CAPTURE(compact::to_string(dist));
        const compact::projection_source<Scalar, Backend> projection(n, r, dist, 0x5eedULL, 7);
        const compact::subspace_adamw<Scalar, Backend, State> optimizer(out_features{m}, projection);
        const auto p = reference_projection(projection.spec(epoch));

        std::mt19937_64 rng(0x5ab);
        auto w = uniform<Scalar>(rng, m * n, -1, 1);
        std::vector<State> mm(m * r, State(0)), vv(m * r, State(0));
        auto w_d = dev.upload(w);
        auto mm_d = dev.upload(mm);
        auto vv_d = dev.upload(vv);
        device_array<Backend, Scalar> g_d(static_cast<std::size_t>(m * r));
        compact::adam_counters counters;
        auto ws = dev.workspace(optimizer.workspace_bytes());
        auto w_ref = to_double(w);
        reference_adam ref(static_cast<std::size_t>(m * r));

        auto h = default_hyper();
        h.alpha = 0.25;
        h.weight_decay = 0.05;
        for (int s = 0; s < 8; ++s) {
            const auto g = uniform<Scalar>(rng, m * r, -1, 1);
            dev.upload_to(g_d, g);
            optimizer.step(ctx, h, projection, w_d.view(m, n), recorded(g_d.cview(m, r), epoch), mm_d.view(m, r),
                           vv_d.view(m, r), counters, ws.get());
            reference_subspace_step(h, w_ref, to_double(g), p, m, n, r, ref);
            CHECK(counters.step == static_cast<std::uint64_t>(s + 1));
            CHECK(counters.epoch == epoch);
        }
        w = dev.download(w_d);
        mm = dev.download(mm_d);
        vv = dev.download(vv_d);
        CHECK_RELATIVE(relative_error(w, w_ref), tol);
        CHECK_RELATIVE(relative_error(mm, ref.m), tol);
        CHECK_RELATIVE(relative_error(vv, ref.v), tol);
    }
}

TEST_CASE_TEMPLATE("subspace_adamw::step with P from the backend's generate_projection in double"
                   COMPACT_TEST_ON_DEVICE,
                   Cfg, COMPACT_TEST_CONFIGS)
{
    // The same equations, with the float64 P generated by the backend under test (its
    // generate_projection<double>) instead of element by element.
    using Backend = typename Cfg::backend;
    using Scalar = typename Cfg::scalar;
    using State = typename Cfg::state;
    compact_test::device<Backend> dev;
    const auto& ctx = dev.ctx();
    constexpr index_t m = 9, n = 30, r = 7;
    const double tol = is_float<Scalar> ? 2e-6 : 1e-13; // as in the test above

    const compact::projection_source<Scalar, Backend> projection(n, r, compact::distribution::gaussian, 99, 3);
    const compact::subspace_adamw<Scalar, Backend, State> optimizer(out_features{m}, projection);
    device_array<Backend, double> p_d(static_cast<std::size_t>(n * r));
    Backend::template generate_projection<double>(ctx, projection.spec(0), 0, 0, p_d.view(n, r));
    const std::vector<double> p = dev.download(p_d);

    std::mt19937_64 rng(0x9e7);
    auto w = uniform<Scalar>(rng, m * n, -1, 1);
    std::vector<State> mm(m * r, State(0)), vv(m * r, State(0));
    auto w_d = dev.upload(w);
    auto mm_d = dev.upload(mm);
    auto vv_d = dev.upload(vv);
    device_array<Backend, Scalar> g_d(static_cast<std::size_t>(m * r));
    compact::adam_counters counters;
    auto ws = dev.workspace(optimizer.workspace_bytes());
    auto w_ref = to_double(w);
    reference_adam ref(static_cast<std::size_t>(m * r));
    auto h = default_hyper();
    h.alpha = 0.25;
    for (int s = 0; s < 5; ++s) {
        const auto g = uniform<Scalar>(rng, m * r, -1, 1);
        dev.upload_to(g_d, g);
        optimizer.step(ctx, h, projection, w_d.view(m, n), recorded(g_d.cview(m, r), 0), mm_d.view(m, r),
                       vv_d.view(m, r), counters, ws.get());
        reference_subspace_step(h, w_ref, to_double(g), p, m, n, r, ref);
    }
    w = dev.download(w_d);
    mm = dev.download(mm_d);
    CHECK_RELATIVE(relative_error(w, w_ref), tol);
    CHECK_RELATIVE(relative_error(mm, ref.m), tol);
}

TEST_CASE_TEMPLATE("subspace_adamw::step with a P the caller keeps equals regenerating it, bit for bit"
                   COMPACT_TEST_ON_DEVICE,
                   Cfg, COMPACT_TEST_CONFIGS)
{
    using Backend = typename Cfg::backend;
    using Scalar = typename Cfg::scalar;
    using State = typename Cfg::state;
    compact_test::device<Backend> dev;
    const auto& ctx = dev.ctx();
    constexpr index_t m = 10, n = 36, r = 9;
    const compact::resampling resample{2};
    const compact::projection_source<Scalar, Backend> projection(n, r, compact::distribution::gaussian, 8, 4);
    const compact::subspace_adamw<Scalar, Backend, State> optimizer(out_features{m}, projection,
                                                                    compact::moment_policy::transfer);

    std::mt19937_64 rng(0x4e7);
    auto w = uniform<Scalar>(rng, m * n, -1, 1);
    auto w_kept = w;
    std::vector<State> mm(m * r, State(0)), vv(m * r, State(0)), mm_kept(m * r, State(0)), vv_kept(m * r, State(0));
    auto w_d = dev.upload(w);
    auto w_kept_d = dev.upload(w_kept);
    auto mm_d = dev.upload(mm);
    auto vv_d = dev.upload(vv);
    auto mm_kept_d = dev.upload(mm_kept);
    auto vv_kept_d = dev.upload(vv_kept);
    device_array<Backend, Scalar> g_d(static_cast<std::size_t>(m * r));
    compact::adam_counters counters, counters_kept;
    auto ws = dev.workspace(optimizer.workspace_bytes());
    // A copy of the source that keeps P in the backend's memory (p_d): handed to the library only, never
    // read here. It regenerates P there when the epoch moves on.
    device_array<Backend, Scalar> p_d(static_cast<std::size_t>(n * r));
    compact::projection_source<Scalar, Backend> kept = projection;
    REQUIRE_FALSE(kept.keeps());
    kept.keep(p_d.view(n, r));
    REQUIRE(kept.keeps());
    CHECK(kept.same_projection(projection));
    CHECK(kept.workspace_bytes() == 0);
    const auto h = default_hyper();
    for (std::uint64_t update = 0; update < 5; ++update) {
        const auto epoch = resample.epoch(update);
        const auto g = uniform<Scalar>(rng, m * r, -1, 1);
        dev.upload_to(g_d, g);
        optimizer.step(ctx, h, projection, w_d.view(m, n), recorded(g_d.cview(m, r), epoch), mm_d.view(m, r),
                       vv_d.view(m, r), counters, ws.get());
        optimizer.step(ctx, h, kept, w_kept_d.view(m, n), recorded(g_d.cview(m, r), epoch), mm_kept_d.view(m, r),
                       vv_kept_d.view(m, r), counters_kept, ws.get());
    }
    w = dev.download(w_d);
    w_kept = dev.download(w_kept_d);
    mm = dev.download(mm_d);
    mm_kept = dev.download(mm_kept_d);
    vv = dev.download(vv_d);
    vv_kept = dev.download(vv_kept_d);
    CHECK(bit_equal(w, w_kept));
    CHECK(bit_equal(mm, mm_kept));
    CHECK(bit_equal(vv, vv_kept));
    CHECK(counters.step == counters_kept.step);
    CHECK(counters.epoch == counters_kept.epoch);
    // The kept storage holds P of the last epoch the steps used.
    device_array<Backend, Scalar> p_last_d(static_cast<std::size_t>(n * r));
    projection.generate(ctx, resample.epoch(4), p_last_d.view(n, r));
    CHECK(bit_equal(dev.download(p_d), dev.download(p_last_d)));
}

TEST_CASE_TEMPLATE("subspace_adamw::step applies the P of the epoch backward recorded in the gradient"
                   COMPACT_TEST_ON_DEVICE,
                   Cfg, COMPACT_TEST_CONFIGS)
{
    // A gradient that compressed_linear::backward recorded under epoch e (resampling{1}: epoch = step)
    // updates W through P of epoch e: bit for bit what the same G_sub recorded by hand under e gives
    // (the former step(..., epoch = e)), the float64 equations with P(e), and not the update under e + 1.
    using Backend = typename Cfg::backend;
    using Scalar = typename Cfg::scalar;
    using State = typename Cfg::state;
    using layer_type = compact::compressed_linear<Scalar, compact::rank::fixed, Backend>;
    compact_test::device<Backend> dev;
    const auto& ctx = dev.ctx();
    constexpr index_t rows = 16, m = 7, n = 24, r = 6;
    const double tol = is_float<Scalar> ? 2e-6 : 1e-13; // one step of the test above

    const layer_type layer(compact::in_features{n}, out_features{m}, 0x5eed, 4, compact::rank::fixed{r},
                           compact::distribution::gaussian, compact::resampling{1});
    const compact::subspace_adamw<Scalar, Backend, State> optimizer(out_features{m}, layer.projection());
    std::mt19937_64 rng(0xe90c);
    const auto x = uniform<Scalar>(rng, rows * n, -1, 1);
    const auto dy = uniform<Scalar>(rng, rows * m, -1, 1);
    const auto w = uniform<Scalar>(rng, m * n, -1, 1);
    const auto x_d = dev.upload(x), dy_d = dev.upload(dy), w_d = dev.upload(w);
    device_array<Backend, Scalar> y_d(static_cast<std::size_t>(rows * m)), z_d(static_cast<std::size_t>(rows * r)),
        g_d(static_cast<std::size_t>(m * r));
    REQUIRE(layer.saved_bytes(rows) == z_d.size() * sizeof(Scalar));
    auto saved = compact::bind_saved<typename layer_type::saved_type>(z_d.data(), layer.saved_bytes(rows));
    compact::layer_gradient<Scalar> grads{g_d.view(m, r)};
    auto ws = dev.workspace(std::max(layer.workspace_bytes(rows), optimizer.workspace_bytes()));
    auto h = default_hyper();
    h.alpha = 0.25;
    const std::vector<State> zero(static_cast<std::size_t>(m * r), State(0));

    for (std::uint64_t e : {std::uint64_t{0}, std::uint64_t{3}}) {
        CAPTURE(e);
        layer.forward(ctx, x_d.cview(rows, n), w_d.cview(m, n), {}, y_d.view(rows, m), saved, e, ws.get());
        layer.backward(ctx, dy_d.cview(rows, m), w_d.cview(m, n), saved, {}, grads, ws.get());
        CHECK(saved.epoch == e);
        CHECK(grads.written);
        CHECK(grads.epoch == e);
        const auto g = dev.download(g_d);

        auto w_backward = dev.upload(w), w_by_hand = dev.upload(w), w_next = dev.upload(w);
        auto m_backward = dev.upload(zero), v_backward = dev.upload(zero), m_by_hand = dev.upload(zero),
             v_by_hand = dev.upload(zero), m_next = dev.upload(zero), v_next = dev.upload(zero);
        compact::adam_counters c_backward, c_by_hand, c_next;
        optimizer.step(ctx, h, layer.projection(), w_backward.view(m, n), grads, m_backward.view(m, r),
                       v_backward.view(m, r), c_backward, ws.get());
        optimizer.step(ctx, h, layer.projection(), w_by_hand.view(m, n), recorded(g_d.cview(m, r), e),
                       m_by_hand.view(m, r), v_by_hand.view(m, r), c_by_hand, ws.get());
        optimizer.step(ctx, h, layer.projection(), w_next.view(m, n), recorded(g_d.cview(m, r), e + 1),
                       m_next.view(m, r), v_next.view(m, r), c_next, ws.get());
        CHECK(c_backward.epoch == e);
        CHECK(c_next.epoch == e + 1);
        const auto updated = dev.download(w_backward);
        CHECK(bit_equal(updated, dev.download(w_by_hand)));
        CHECK(bit_equal(dev.download(m_backward), dev.download(m_by_hand)));
        CHECK_FALSE(bit_equal(updated, dev.download(w_next)));

        auto w_ref = to_double(w);
        reference_adam ref(static_cast<std::size_t>(m * r));
        reference_subspace_step(h, w_ref, to_double(g), reference_projection(layer.projection().spec(e)), m, n, r, ref);
        CHECK_RELATIVE(relative_error(updated, w_ref), tol);
        dev.synchronize(); // the steps have finished before their buffers are freed
    }
}

// ============================================================================= the identity check

namespace {

/// Trains Y = X W^T + b on an MSE regression for `steps` updates, once through compressed_linear with
/// rank::full (P = I) + subspace_adamw for W + adamw for b, once through a plain float64 linear layer +
/// AdamW written here, and returns the relative errors of the final W and b.
template <class Cfg>
void identity_training_matches_plain_adamw(double tol)
{
    using Backend = typename Cfg::backend;
    using Scalar = typename Cfg::scalar;
    using State = typename Cfg::state;
    compact_test::device<Backend> dev;
    const auto& ctx = dev.ctx();
    constexpr index_t rows = 64, n = 24, m = 10;
    constexpr int steps = 50;

    std::mt19937_64 rng(0x1de7);
    const auto x = uniform<Scalar>(rng, rows * n, -1, 1);
    const auto w_true = uniform<double>(rng, m * n, -0.5, 0.5);
    const auto b_true = uniform<double>(rng, m, -1, 1);
    const auto noise = uniform<double>(rng, rows * m, -0.1, 0.1);
    std::vector<Scalar> target(rows * m);
    for (index_t i = 0; i < rows; ++i)
        for (index_t o = 0; o < m; ++o) {
            double y = b_true[static_cast<std::size_t>(o)] + noise[static_cast<std::size_t>(i * m + o)];
            for (index_t j = 0; j < n; ++j)
                y += static_cast<double>(x[static_cast<std::size_t>(i * n + j)]) * w_true[static_cast<std::size_t>(o * n + j)];
            target[static_cast<std::size_t>(i * m + o)] = static_cast<Scalar>(y);
        }
    auto w = uniform<Scalar>(rng, m * n, -0.2, 0.2);
    std::vector<Scalar> b(m, Scalar(0));

    auto h = default_hyper();
    h.lr = 1e-2;
    h.weight_decay = 0.1;
    h.alpha = 1.0;

    // The library: caller-memory API, P = I, every buffer in the backend's memory.
    using layer_type = compact::compressed_linear<Scalar, compact::rank::full, Backend>;
    const layer_type layer(compact::in_features{n}, out_features{m}, 0x5eed, 1);
    REQUIRE(layer.rank() == n);
    REQUIRE(layer.projection().is_identity());
    const compact::subspace_adamw<Scalar, Backend, State> optimizer(out_features{m}, layer.projection());
    std::vector<Scalar> y(rows * m), dy(rows * m);
    std::vector<State> wm(m * n, State(0)), wv(m * n, State(0)), bm(m, State(0)), bv(m, State(0));
    const auto x_d = dev.upload(x);
    auto w_d = dev.upload(w);
    auto b_d = dev.upload(b);
    auto wm_d = dev.upload(wm);
    auto wv_d = dev.upload(wv);
    auto bm_d = dev.upload(bm);
    auto bv_d = dev.upload(bv);
    device_array<Backend, Scalar> y_d(static_cast<std::size_t>(rows * m)), z_d(static_cast<std::size_t>(rows * n)),
        dy_d(static_cast<std::size_t>(rows * m)), g_sub_d(static_cast<std::size_t>(m * n)),
        db_d(static_cast<std::size_t>(m));
    REQUIRE(layer.saved_bytes(rows) == z_d.size() * sizeof(Scalar));
    auto saved = compact::bind_saved<typename layer_type::saved_type>(z_d.data(), layer.saved_bytes(rows));
    compact::layer_gradient<Scalar> grads{g_sub_d.view(m, n), db_d.view(1, m)};
    compact::adam_counters w_counters, b_counters;
    auto ws = dev.workspace(std::max(layer.workspace_bytes(rows), optimizer.workspace_bytes()));

    // The reference: a plain float64 linear layer + AdamW (the decay applies to the bias too).
    auto w_ref = to_double(w);
    auto b_ref = to_double(b);
    const auto x_ref = to_double(x);
    const auto t_ref = to_double(target);
    reference_adam w_state(static_cast<std::size_t>(m * n)), b_state(static_cast<std::size_t>(m));
    const double loss_scale = 2.0 / static_cast<double>(rows * m); // d/dY of mean((Y - T)^2)
    double first_loss = 0, last_loss = 0;

    for (int s = 0; s < steps; ++s) {
        layer.forward(ctx, x_d.cview(rows, n), w_d.cview(m, n), b_d.cview(1, m), y_d.view(rows, m), saved, 0,
                      ws.get());
        y = dev.download(y_d); // waits for the stream: nothing queued reads dy_d any more
        for (std::size_t k = 0; k < dy.size(); ++k) dy[k] = static_cast<Scalar>(loss_scale) * (y[k] - target[k]);
        dev.upload_to(dy_d, dy);
        layer.backward(ctx, dy_d.cview(rows, m), w_d.cview(m, n), saved, compact::matrix_view<Scalar>{}, grads,
                       ws.get());
        CHECK(grads.written);
        CHECK(grads.epoch == 0);
        optimizer.step(ctx, h, layer.projection(), w_d.view(m, n), grads, wm_d.view(m, n), wv_d.view(m, n),
                       w_counters, ws.get());
        compact::adamw<Backend>::step(ctx, h, b_d.view(1, m), db_d.cview(1, m), bm_d.view(1, m), bv_d.view(1, m),
                                      b_counters);

        std::vector<double> g_ref(static_cast<std::size_t>(m * n), 0.0), db_ref(static_cast<std::size_t>(m), 0.0);
        double loss = 0;
        for (index_t i = 0; i < rows; ++i)
            for (index_t o = 0; o < m; ++o) {
                double yy = b_ref[static_cast<std::size_t>(o)];
                for (index_t j = 0; j < n; ++j)
                    yy += x_ref[static_cast<std::size_t>(i * n + j)] * w_ref[static_cast<std::size_t>(o * n + j)];
                const double r = yy - t_ref[static_cast<std::size_t>(i * m + o)];
                loss += r * r / static_cast<double>(rows * m);
                const double d = loss_scale * r;
                db_ref[static_cast<std::size_t>(o)] += d;
                for (index_t j = 0; j < n; ++j) g_ref[static_cast<std::size_t>(o * n + j)] += d * x_ref[static_cast<std::size_t>(i * n + j)];
            }
        if (s == 0) first_loss = loss;
        last_loss = loss;
        reference_adamw_step(h, w_ref, g_ref, w_state);
        reference_adamw_step(h, b_ref, db_ref, b_state);
    }
    w = dev.download(w_d);
    b = dev.download(b_d);
    CHECK(w_counters.step == static_cast<std::uint64_t>(steps));
    CHECK(b_counters.step == static_cast<std::uint64_t>(steps));
    CHECK(last_loss < 0.5 * first_loss); // the problem is not trivial: training moved the weights
    CHECK_RELATIVE(relative_error(w, w_ref), tol);
    CHECK_RELATIVE(relative_error(b, b_ref), tol);
}

} // namespace

TEST_CASE("identity projection: compressed_linear (rank::full) + subspace_adamw trains exactly like a float64 "
          "linear layer + AdamW, 50 steps" COMPACT_TEST_ON_DEVICE)
{
    // Relative (2-norm) error of the final W and b: float <= 1e-4, double <= 1e-10 (SPEC section 3,
    // "identity check": equal to plain AdamW up to the working precision's rounding).
    SUBCASE("float, State = float")
    {
        identity_training_matches_plain_adamw<config<backend_under_test, float, float>>(1e-4);
    }
    SUBCASE("double, State = double")
    {
        identity_training_matches_plain_adamw<config<backend_under_test, double, double>>(1e-10);
    }
}

// ================================================================================ moment policies

TEST_CASE_TEMPLATE("moment policies at an epoch change: reset, transfer, keep" COMPACT_TEST_ON_DEVICE, Cfg,
                   COMPACT_TEST_CONFIGS)
{
    using Backend = typename Cfg::backend;
    using Scalar = typename Cfg::scalar;
    using State = typename Cfg::state;
    compact_test::device<Backend> dev;
    const auto& ctx = dev.ctx();
    constexpr index_t m = 12, n = 32, r = 8;
    const compact::resampling resample{3}; // T = 3: updates 0..2 use epoch 0, update 3 uses epoch 1
    // Relative (2-norm) errors of one step against float64. Float: the transfer product M P_old^T P_new
    // sums n = 32 and r = 8 terms of float-rounded P (u = 6e-8 each), the rest a few roundings;
    // double: the same at u = 1e-16. Wide margins.
    const double tol_moments = is_float<Scalar> ? 1e-5 : 1e-13;
    const double tol_weights = is_float<Scalar> ? 2e-6 : 1e-13;

    const compact::projection_source<Scalar, Backend> projection(n, r, compact::distribution::gaussian, 0xfeed, 11);
    const auto p_old = reference_projection(projection.spec(0));
    const auto p_new = reference_projection(projection.spec(1));

    for (auto policy : {compact::moment_policy::reset, compact::moment_policy::transfer, compact::moment_policy::keep}) {
        CAPTURE(compact::to_string(policy));
        const compact::subspace_adamw<Scalar, Backend, State> optimizer(out_features{m}, projection, policy);
        CHECK(optimizer.policy() == policy);
        std::mt19937_64 rng(0x90c);
        auto w = uniform<Scalar>(rng, m * n, -1, 1);
        std::vector<State> mm(m * r, State(0)), vv(m * r, State(0));
        auto w_d = dev.upload(w);
        auto mm_d = dev.upload(mm);
        auto vv_d = dev.upload(vv);
        device_array<Backend, Scalar> g_d(static_cast<std::size_t>(m * r));
        compact::adam_counters counters;
        auto ws = dev.workspace(optimizer.workspace_bytes());
        auto h = default_hyper();
        h.alpha = 0.25;

        for (std::uint64_t update = 0; update < 3; ++update) {
            const auto g = uniform<Scalar>(rng, m * r, -1, 1);
            dev.upload_to(g_d, g);
            optimizer.step(ctx, h, projection, w_d.view(m, n), recorded(g_d.cview(m, r), resample.epoch(update)),
                           mm_d.view(m, r), vv_d.view(m, r), counters, ws.get());
            CHECK(counters.epoch == resample.epoch(update));
            CHECK(counters.step == update + 1); // no policy acts while the epoch stays the same
        }
        REQUIRE(resample.epoch(3) == 1);

        const auto m_old = dev.download(mm_d);
        const auto v_old = dev.download(vv_d);
        const auto w_old = dev.download(w_d);
        const auto counters_old = counters;
        const auto g = uniform<Scalar>(rng, m * r, -1, 1);
        dev.upload_to(g_d, g);
        optimizer.step(ctx, h, projection, w_d.view(m, n), recorded(g_d.cview(m, r), resample.epoch(3)),
                       mm_d.view(m, r), vv_d.view(m, r), counters, ws.get());
        CHECK(counters.epoch == 1);
        mm = dev.download(mm_d);
        vv = dev.download(vv_d);
        w = dev.download(w_d);

        // The float64 state right before the moment update of the new step, per policy.
        reference_adam ref(static_cast<std::size_t>(m * r));
        ref.m = to_double(m_old);
        ref.v = to_double(v_old);
        ref.t = counters_old.step;
        switch (policy) {
        case compact::moment_policy::reset:
            std::fill(ref.m.begin(), ref.m.end(), 0.0);
            std::fill(ref.v.begin(), ref.v.end(), 0.0);
            ref.t = 0;
            CHECK(counters.step == 1);
            break;
        case compact::moment_policy::transfer: {
            // M <- M_old P_old^T P_new
            std::vector<double> q(static_cast<std::size_t>(r * r), 0.0);
            for (index_t a = 0; a < r; ++a)
                for (index_t c = 0; c < r; ++c)
                    for (index_t k = 0; k < n; ++k)
                        q[static_cast<std::size_t>(a * r + c)] +=
                            p_old[static_cast<std::size_t>(k * r + a)] * p_new[static_cast<std::size_t>(k * r + c)];
            const auto m0 = ref.m;
            for (index_t i = 0; i < m; ++i)
                for (index_t c = 0; c < r; ++c) {
                    double s = 0;
                    for (index_t a = 0; a < r; ++a)
                        s += m0[static_cast<std::size_t>(i * r + a)] * q[static_cast<std::size_t>(a * r + c)];
                    ref.m[static_cast<std::size_t>(i * r + c)] = s;
                }
            CHECK(counters.step == counters_old.step + 1);
            break;
        }
        case compact::moment_policy::keep: CHECK(counters.step == counters_old.step + 1); break;
        }
        auto w_ref = to_double(w_old);
        reference_subspace_step(h, w_ref, to_double(g), p_new, m, n, r, ref);
        CHECK_RELATIVE(relative_error(mm, ref.m), tol_moments);
        CHECK_RELATIVE(relative_error(vv, ref.v), tol_moments);
        CHECK_RELATIVE(relative_error(w, w_ref), tol_weights);

        if (policy == compact::moment_policy::reset) {
            // M = (1 - b1) G_sub and V = (1 - b2) G_sub^2 exactly as the first step of a fresh run.
            std::vector<double> m_first(static_cast<std::size_t>(m * r));
            for (std::size_t k = 0; k < m_first.size(); ++k) m_first[k] = (1 - h.beta1) * static_cast<double>(g[k]);
            CHECK_RELATIVE(relative_error(mm, m_first), tol_moments);
        }
        if (policy == compact::moment_policy::keep) {
            // The moments do not see the change at all: bit-identical to the same step without it.
            auto m_same_d = dev.upload(m_old);
            auto v_same_d = dev.upload(v_old);
            auto w_same_d = dev.upload(w_old);
            auto c_same = counters_old;
            optimizer.step(ctx, h, projection, w_same_d.view(m, n), recorded(g_d.cview(m, r), 0),
                           m_same_d.view(m, r), v_same_d.view(m, r), c_same, ws.get());
            const auto m_same = dev.download(m_same_d);
            const auto v_same = dev.download(v_same_d);
            const auto w_same = dev.download(w_same_d);
            CHECK(bit_equal(m_same, mm));
            CHECK(bit_equal(v_same, vv));
            CHECK(c_same.step == counters.step);
            CHECK_FALSE(bit_equal(w_same, w)); // but W is updated through a different P
        }

        // The following update of the same epoch applies no policy again.
        const auto g2 = uniform<Scalar>(rng, m * r, -1, 1);
        dev.upload_to(g_d, g2);
        const auto step_before = counters.step;
        optimizer.step(ctx, h, projection, w_d.view(m, n), recorded(g_d.cview(m, r), resample.epoch(4)),
                       mm_d.view(m, r), vv_d.view(m, r), counters, ws.get());
        CHECK(counters.step == step_before + 1);
        CHECK(counters.epoch == 1);
        dev.synchronize(); // the step has finished before its buffers are freed
    }
}

// ===================================================================================== validation

TEST_CASE_TEMPLATE("subspace_adamw::step rejects bad hyper-parameters, shapes and workspace, and changes nothing "
                   "when it throws" COMPACT_TEST_ON_DEVICE,
                   Cfg, COMPACT_TEST_CONFIGS)
{
    using Backend = typename Cfg::backend;
    using Scalar = typename Cfg::scalar;
    using State = typename Cfg::state;
    using doctest::Contains;
    compact_test::device<Backend> dev;
    const auto& ctx = dev.ctx();
    constexpr index_t m = 6, n = 20, r = 5;
    const compact::projection_source<Scalar, Backend> projection(n, r, compact::distribution::gaussian, 1, 2);
    const compact::subspace_adamw<Scalar, Backend, State> optimizer(out_features{m}, projection,
                                                                    compact::moment_policy::transfer);

    // Buffers one row and one column larger than needed, so every wrong-shaped view stays in bounds.
    std::mt19937_64 rng(0xbad);
    const auto w = uniform<Scalar>(rng, (m + 1) * (n + 1), -1, 1);
    const auto g = uniform<Scalar>(rng, (m + 1) * (r + 1), -1, 1);
    const std::vector<State> mm((m + 1) * (r + 1), State(0)), vv((m + 1) * (r + 1), State(0));
    auto w_d = dev.upload(w);
    const auto g_d = dev.upload(g);
    auto mm_d = dev.upload(mm);
    auto vv_d = dev.upload(vv);
    compact::adam_counters counters;
    auto ws = dev.workspace(optimizer.workspace_bytes());
    const auto good = default_hyper();
    auto step = [&](const compact::adamw_params& h, compact::matrix_view<Scalar> wv, compact::const_matrix_view<Scalar> gv,
                    compact::matrix_view<State> mv, compact::matrix_view<State> vv_, std::uint64_t epoch,
                    compact::workspace space) {
        optimizer.step(ctx, h, projection, wv, recorded(gv, epoch), mv, vv_, counters, space);
    };
    auto W = [&] { return w_d.view(m, n); };
    auto G = [&] { return g_d.cview(m, r); };
    auto M = [&] { return mm_d.view(m, r); };
    auto V = [&] { return vv_d.view(m, r); };

    // Two valid steps (with an epoch change) so that the state is not trivially zero.
    step(good, W(), G(), M(), V(), 0, ws.get());
    step(good, W(), G(), M(), V(), 1, ws.get());
    const auto w0 = dev.download(w_d), g0 = dev.download(g_d);
    const auto m0 = dev.download(mm_d), v0 = dev.download(vv_d);
    const auto c0 = counters;
    CHECK(bit_equal(g0, g)); // G is only read
    auto unchanged = [&] {
        return bit_equal(dev.download(w_d), w0) && bit_equal(dev.download(g_d), g0) &&
               bit_equal(dev.download(mm_d), m0) && bit_equal(dev.download(vv_d), v0) && counters.step == c0.step &&
               counters.epoch == c0.epoch;
    };

    SUBCASE("hyper-parameters")
    {
        auto h = good;
        h.lr = -0.5;
        CHECK_THROWS_WITH_AS(step(h, W(), G(), M(), V(), 2, ws.get()), Contains("lr=-0.5"), compact::error);
        CHECK(unchanged());
        h = good;
        h.beta1 = 1.0;
        CHECK_THROWS_WITH_AS(step(h, W(), G(), M(), V(), 2, ws.get()), Contains("beta1=1 "), compact::error);
        CHECK(unchanged());
        h.beta1 = 1.5;
        CHECK_THROWS_WITH_AS(step(h, W(), G(), M(), V(), 2, ws.get()), Contains("beta1=1.5"), compact::error);
        CHECK(unchanged());
        h = good;
        h.eps = 0.0;
        CHECK_THROWS_WITH_AS(step(h, W(), G(), M(), V(), 2, ws.get()), Contains("eps=0 "), compact::error);
        CHECK(unchanged());
        h.eps = -1e-8;
        CHECK_THROWS_WITH_AS(step(h, W(), G(), M(), V(), 2, ws.get()), Contains("eps=-1e-08"), compact::error);
        CHECK(unchanged());
        h = good;
        h.beta2 = 1.0;
        CHECK_THROWS_WITH_AS(step(h, W(), G(), M(), V(), 2, ws.get()), Contains("beta2=1 "), compact::error);
        CHECK(unchanged());
        h = good;
        h.alpha = 0.0;
        CHECK_THROWS_WITH_AS(step(h, W(), G(), M(), V(), 2, ws.get()), Contains("alpha=0"), compact::error);
        CHECK(unchanged());
        h = good;
        h.lr = std::nan("");
        CHECK_THROWS_AS(step(h, W(), G(), M(), V(), 2, ws.get()), compact::error);
        CHECK(unchanged());
        // Every hyper-parameter must be finite: +Inf is refused, naming the parameter.
        const double inf = std::numeric_limits<double>::infinity();
        h = good;
        h.lr = inf;
        CHECK_THROWS_WITH_AS(step(h, W(), G(), M(), V(), 2, ws.get()),
                             Contains("subspace_adamw::step: lr=inf must be finite"), compact::error);
        CHECK(unchanged());
        h = good;
        h.eps = inf;
        CHECK_THROWS_WITH_AS(step(h, W(), G(), M(), V(), 2, ws.get()),
                             Contains("subspace_adamw::step: eps=inf must be finite"), compact::error);
        CHECK(unchanged());
        h = good;
        h.alpha = inf;
        CHECK_THROWS_WITH_AS(step(h, W(), G(), M(), V(), 2, ws.get()),
                             Contains("subspace_adamw::step: alpha=inf must be finite"), compact::error);
        CHECK(unchanged());
        h = good;
        h.weight_decay = inf;
        CHECK_THROWS_WITH_AS(step(h, W(), G(), M(), V(), 2, ws.get()),
                             Contains("subspace_adamw::step: weight_decay=inf must be non-negative"), compact::error);
        CHECK(unchanged());
    }
    SUBCASE("shapes")
    {
        CHECK_THROWS_WITH_AS(step(good, w_d.view(m, n + 1), G(), M(), V(), 2, ws.get()),
                             Contains("subspace_adamw::step: W is (6, 21)"), compact::error);
        CHECK(unchanged());
        CHECK_THROWS_WITH_AS(step(good, w_d.view(m + 1, n), G(), M(), V(), 2, ws.get()),
                             Contains("subspace_adamw::step: W is (7, 20)"), compact::error);
        CHECK(unchanged());
        CHECK_THROWS_WITH_AS(step(good, W(), g_d.cview(m, r + 1), M(), V(), 2, ws.get()),
                             Contains("subspace_adamw::step: G_sub (grads.weight) is (6, 6)"), compact::error);
        CHECK(unchanged());
        CHECK_THROWS_WITH_AS(step(good, W(), G(), mm_d.view(m + 1, r), V(), 2, ws.get()),
                             Contains("subspace_adamw::step: M is (7, 5)"), compact::error);
        CHECK(unchanged());
        CHECK_THROWS_WITH_AS(step(good, W(), G(), M(), vv_d.view(m, r - 1), 2, ws.get()),
                             Contains("subspace_adamw::step: V is (6, 4)"), compact::error);
        CHECK(unchanged());
        // A view whose ld is smaller than its cols is malformed, whatever its shape claims.
        CHECK_THROWS_WITH_AS(
            step(good, W(), G(), compact::matrix_view<State>(mm_d.data(), m, r, r - 1), V(), 2, ws.get()),
            Contains("M has ld=4"), compact::error);
        CHECK(unchanged());
        CHECK_THROWS_WITH_AS(step(good, compact::matrix_view<Scalar>(nullptr, m, n), G(), M(), V(), 2, ws.get()),
                             Contains("W is null"), compact::error);
        CHECK(unchanged());
        // A kept P of the wrong shape: the source refuses the storage, so no step can see it.
        auto p_d = dev.upload(std::vector<Scalar>((n + 1) * (r + 1), Scalar(0.5)));
        compact::projection_source<Scalar, Backend> kept = projection;
        CHECK_THROWS_WITH_AS(kept.keep(p_d.view(n, r + 1)), Contains("projection_source::keep: storage is (20, 6)"),
                             compact::error);
        CHECK_FALSE(kept.keeps());
        CHECK(unchanged());
        CHECK_THROWS_WITH_AS(kept.keep(p_d.view(n + 1, r)), Contains("projection_source::keep: storage is (21, 5)"),
                             compact::error);
        CHECK_FALSE(kept.keeps());
        CHECK(unchanged());
        // M and V in overlapping memory: the same view, and V starting one row into M.
        CHECK_THROWS_WITH_AS(step(good, W(), G(), M(), mm_d.view(m, r), 2, ws.get()),
                             Contains("subspace_adamw::step: M (6, 5) overlaps V (6, 5)"), compact::error);
        CHECK(unchanged());
        CHECK_THROWS_WITH_AS(step(good, W(), G(), M(), compact::matrix_view<State>(mm_d.data() + r, m, r), 2, ws.get()),
                             Contains("subspace_adamw::step: M (6, 5) overlaps V (6, 5)"), compact::error);
        CHECK(unchanged());
    }
    SUBCASE("a gradient no backward wrote, and a projection source of another layer")
    {
        auto unwritten = recorded(G(), 2);
        unwritten.written = false;
        CHECK_THROWS_WITH_AS(optimizer.step(ctx, good, projection, W(), unwritten, M(), V(), counters, ws.get()),
                             Contains("subspace_adamw::step: the gradient was not written by a backward"),
                             compact::error);
        CHECK(unchanged());
        CHECK_THROWS_WITH_AS(optimizer.step(ctx, good, projection, W(), compact::layer_gradient<Scalar>{}, M(), V(),
                                            counters, ws.get()),
                             Contains("the gradient was not written by a backward"), compact::error);
        CHECK(unchanged());
        // The optimizer was built for layer 2; the same shape, seed and distribution for layer 3 is another P.
        const compact::projection_source<Scalar, Backend> other_layer(n, r, compact::distribution::gaussian, 1, 3);
        CHECK_THROWS_WITH_AS(
            optimizer.step(ctx, good, other_layer, W(), recorded(G(), 2), M(), V(), counters, ws.get()),
            Contains("subspace_adamw::step: the projection source (n=20, r=5, layer 3) is not the one this optimizer "
                     "was built for (n=20, r=5, layer 2)"),
            compact::error);
        CHECK(unchanged());
        // Likewise another seed, another distribution and another rank.
        using source = compact::projection_source<Scalar, Backend>;
        for (const auto& other : {source(n, r, compact::distribution::gaussian, 9, 2),
                                  source(n, r, compact::distribution::rademacher, 1, 2),
                                  source(n, r - 1, compact::distribution::gaussian, 1, 2)}) {
            CHECK_THROWS_WITH_AS(optimizer.step(ctx, good, other, W(), recorded(G(), 2), M(), V(), counters, ws.get()),
                                 Contains("is not the one this optimizer was built for"), compact::error);
            CHECK(unchanged());
        }
    }
    SUBCASE("workspace and epoch")
    {
        auto small = ws.get();
        small.bytes -= 1;
        CHECK_THROWS_WITH_AS(step(good, W(), G(), M(), V(), 2, small), Contains("subspace_adamw::step: workspace"),
                             compact::error);
        CHECK(unchanged());
        CHECK_THROWS_WITH_AS(step(good, W(), G(), M(), V(), 2, compact::workspace{nullptr, ws.bytes.size()}),
                             Contains("workspace is null"), compact::error);
        CHECK(unchanged());
        CHECK_THROWS_WITH_AS(step(good, W(), G(), M(), V(), std::uint64_t{1} << 32, ws.get()), Contains("epoch"),
                             compact::error);
        CHECK(unchanged());
    }
    SUBCASE("a valid call after the failures behaves as if they never happened")
    {
        auto w1_d = dev.upload(w0);
        const auto g1_d = dev.upload(g0);
        auto m1_d = dev.upload(m0), v1_d = dev.upload(v0);
        auto c1 = c0;
        CHECK_THROWS_AS(step(good, W(), G(), M(), V(), 2, compact::workspace{}), compact::error);
        step(good, W(), G(), M(), V(), 2, ws.get());
        optimizer.step(ctx, good, projection, w1_d.view(m, n), recorded(g1_d.cview(m, r), 2), m1_d.view(m, r),
                       v1_d.view(m, r), c1, ws.get());
        CHECK(bit_equal(dev.download(w_d), dev.download(w1_d)));
        CHECK(bit_equal(dev.download(mm_d), dev.download(m1_d)));
        CHECK(counters.step == c1.step);
    }
    CHECK_THROWS_WITH_AS((compact::subspace_adamw<Scalar, Backend, State>(out_features{0}, projection)),
                         Contains("out=0"),
                         compact::error);
}

TEST_CASE_TEMPLATE("adamw::step rejects bad hyper-parameters and shapes, and changes nothing when it throws"
                   COMPACT_TEST_ON_DEVICE,
                   Cfg, COMPACT_TEST_CONFIGS)
{
    using Backend = typename Cfg::backend;
    using Scalar = typename Cfg::scalar;
    using State = typename Cfg::state;
    using doctest::Contains;
    compact_test::device<Backend> dev;
    const auto& ctx = dev.ctx();
    constexpr index_t rows = 4, cols = 9;
    std::mt19937_64 rng(0xadd);
    const auto w = uniform<Scalar>(rng, (rows + 1) * (cols + 1), -1, 1);
    const auto g = uniform<Scalar>(rng, (rows + 1) * (cols + 1), -1, 1);
    const std::vector<State> mm((rows + 1) * (cols + 1), State(0)), vv((rows + 1) * (cols + 1), State(0));
    auto w_d = dev.upload(w);
    const auto g_d = dev.upload(g);
    auto mm_d = dev.upload(mm);
    auto vv_d = dev.upload(vv);
    compact::adam_counters counters;
    const auto good = default_hyper();
    auto step = [&](const compact::adamw_params& h, compact::const_matrix_view<Scalar> gv, compact::matrix_view<State> mv,
                    compact::matrix_view<State> vv_) {
        compact::adamw<Backend>::step(ctx, h, w_d.view(rows, cols), gv, mv, vv_, counters);
    };
    step(good, g_d.cview(rows, cols), mm_d.view(rows, cols), vv_d.view(rows, cols));
    const auto w0 = dev.download(w_d);
    const auto m0 = dev.download(mm_d), v0 = dev.download(vv_d);
    const auto c0 = counters;
    auto unchanged = [&] {
        return bit_equal(dev.download(w_d), w0) && bit_equal(dev.download(mm_d), m0) &&
               bit_equal(dev.download(vv_d), v0) && counters.step == c0.step && counters.epoch == c0.epoch;
    };
    auto G = [&] { return g_d.cview(rows, cols); };
    auto M = [&] { return mm_d.view(rows, cols); };
    auto V = [&] { return vv_d.view(rows, cols); };

    auto h = good;
    h.lr = -1e-3;
    CHECK_THROWS_WITH_AS(step(h, G(), M(), V()), Contains("adamw::step: lr=-0.001 must be finite and non-negative"),
                         compact::error);
    CHECK(unchanged());
    h = good;
    h.beta1 = 1.0;
    CHECK_THROWS_WITH_AS(step(h, G(), M(), V()), Contains("beta1=1 "), compact::error);
    CHECK(unchanged());
    h = good;
    h.eps = 0.0;
    CHECK_THROWS_WITH_AS(step(h, G(), M(), V()), Contains("eps=0 "), compact::error);
    CHECK(unchanged());
    // +Inf is refused, naming the parameter.
    const double inf = std::numeric_limits<double>::infinity();
    h = good;
    h.lr = inf;
    CHECK_THROWS_WITH_AS(step(h, G(), M(), V()), Contains("adamw::step: lr=inf must be finite"), compact::error);
    CHECK(unchanged());
    h = good;
    h.eps = inf;
    CHECK_THROWS_WITH_AS(step(h, G(), M(), V()), Contains("adamw::step: eps=inf must be finite"), compact::error);
    CHECK(unchanged());
    h = good;
    h.weight_decay = inf;
    CHECK_THROWS_WITH_AS(step(h, G(), M(), V()), Contains("adamw::step: weight_decay=inf must be non-negative"),
                         compact::error);
    CHECK(unchanged());
    // M and V in overlapping memory.
    CHECK_THROWS_WITH_AS(step(good, G(), M(), mm_d.view(rows, cols)),
                         Contains("adamw::step: M (4, 9) overlaps V (4, 9)"), compact::error);
    CHECK(unchanged());
    CHECK_THROWS_WITH_AS(step(good, g_d.cview(rows, cols + 1), M(), V()), Contains("adamw::step: G is (4, 10)"),
                         compact::error);
    CHECK(unchanged());
    CHECK_THROWS_WITH_AS(step(good, G(), mm_d.view(rows + 1, cols), V()), Contains("adamw::step: M is (5, 9)"),
                         compact::error);
    CHECK(unchanged());
    CHECK_THROWS_WITH_AS(step(good, G(), M(), vv_d.view(rows, cols - 1)), Contains("adamw::step: V is (4, 8)"),
                         compact::error);
    CHECK(unchanged());
}

// ================================================================================= memory queries

TEST_CASE_TEMPLATE("state_bytes and workspace_bytes" COMPACT_TEST_ON_DEVICE, Cfg, COMPACT_TEST_CONFIGS)
{
    using Backend = typename Cfg::backend;
    using Scalar = typename Cfg::scalar;
    using State = typename Cfg::state;
    compact_test::device<Backend> dev;
    const auto& ctx = dev.ctx();
    constexpr index_t m = 40, n = 64, r = 16;
    const compact::projection_source<Scalar, Backend> projection(n, r, compact::distribution::gaussian, 5, 6);
    const compact::subspace_adamw<Scalar, Backend, State> keep(out_features{m}, projection,
                                                               compact::moment_policy::keep);
    const compact::subspace_adamw<Scalar, Backend, State> reset(out_features{m}, projection,
                                                               compact::moment_policy::reset);
    const compact::subspace_adamw<Scalar, Backend, State> transfer(out_features{m}, projection,
                                                               compact::moment_policy::transfer);

    CHECK(keep.state_bytes() == static_cast<std::size_t>(2 * m * r) * sizeof(State));
    CHECK(transfer.state_bytes() == keep.state_bytes());
    // Moments by default in default_state_t: double for double weights, float otherwise; in double on
    // request.
    static_assert(std::is_same_v<compact::default_state_t<Scalar>, Scalar>); // Scalar is float or double here
    static_assert(std::is_same_v<compact::default_state_t<double>, double>);
    static_assert(std::is_same_v<compact::default_state_t<float>, float>);
    CHECK(compact::subspace_adamw<Scalar, Backend>(out_features{m}, projection).state_bytes() ==
          static_cast<std::size_t>(2 * m * r) * sizeof(Scalar));
    CHECK(compact::subspace_adamw<Scalar, Backend, double>(out_features{m}, projection).state_bytes() ==
          static_cast<std::size_t>(2 * m * r) * sizeof(double));
    CHECK(compact::adamw<Backend>::template state_bytes<State>(3, 7) == 2 * 21 * sizeof(State));

    CHECK(keep.workspace_bytes() > 0);
    CHECK(reset.workspace_bytes() == keep.workspace_bytes());
    // Transfer needs P_old, P_new (n, r), P_old^T P_new (r, r) and M Q (m, r) on top.
    CHECK(transfer.workspace_bytes() >=
          keep.workspace_bytes() + static_cast<std::size_t>(2 * n * r + r * r + m * r) * sizeof(State));

    // Exactly workspace_bytes() at any alignment is enough, for every policy (an epoch change included).
    for (const auto* optimizer : {&keep, &reset, &transfer}) {
        CAPTURE(compact::to_string(optimizer->policy()));
        const std::size_t bytes = optimizer->workspace_bytes();
        for (std::size_t offset : {std::size_t{0}, std::size_t{1}, std::size_t{8}, std::size_t{63}}) {
            auto memory = dev.workspace(bytes + offset);
            const compact::workspace space{memory.bytes.data() + offset, bytes};
            auto w_d = dev.upload(std::vector<Scalar>(m * n, Scalar(0.5)));
            const auto g_d = dev.upload(std::vector<Scalar>(m * r, Scalar(0.25)));
            auto mm_d = dev.upload(std::vector<State>(m * r, State(0)));
            auto vv_d = dev.upload(std::vector<State>(m * r, State(0)));
            compact::adam_counters counters;
            const auto h = default_hyper();
            optimizer->step(ctx, h, projection, w_d.view(m, n), recorded(g_d.cview(m, r), 0), mm_d.view(m, r),
                            vv_d.view(m, r), counters, space);
            optimizer->step(ctx, h, projection, w_d.view(m, n), recorded(g_d.cview(m, r), 1), mm_d.view(m, r),
                            vv_d.view(m, r), counters, space);
            CHECK(counters.epoch == 1);
            dev.synchronize(); // the steps have finished before their buffers are freed
        }
    }

    // The identity projection needs no room for P.
    const compact::projection_source<Scalar, Backend> identity(n, n, compact::distribution::identity, 5, 6);
    const compact::subspace_adamw<Scalar, Backend, State> identity_optimizer(out_features{m}, identity);
    const compact::subspace_adamw<Scalar, Backend, State> gaussian_full(
        out_features{m}, compact::projection_source<Scalar, Backend>(n, n, compact::distribution::gaussian, 5, 6));
    CHECK(identity_optimizer.workspace_bytes() < gaussian_full.workspace_bytes());
}

TEST_CASE("subspace_adamw with the identity ignores epoch changes under every moment policy" COMPACT_TEST_ON_DEVICE)
{
    // P = I never changes, so resampling must not reset or transfer its moments: every policy has to
    // give plain AdamW, bit for bit, across epoch boundaries.
    using compact::index_t;
    using Backend = backend_under_test;
    compact_test::device<Backend> dev;
    const auto& ctx = dev.ctx();
    const index_t m = 6, n = 5;
    const compact::projection_source<double, Backend> identity(n, n, compact::distribution::identity, 3, 4);
    compact::adamw_params h;
    h.lr = 1e-2;
    h.weight_decay = 0.1;
    std::vector<double> g(m * n);
    for (std::size_t i = 0; i < g.size(); ++i) g[i] = std::sin(0.7 * static_cast<double>(i) + 0.3);
    const auto g_d = dev.upload(g);
    for (auto policy : {compact::moment_policy::keep, compact::moment_policy::reset, compact::moment_policy::transfer}) {
        CAPTURE(std::string(compact::to_string(policy)));
        const compact::subspace_adamw<double, Backend, double> opt(out_features{m}, identity, policy);
        const std::vector<double> w_start(m * n, 0.5), zero(m * n, 0.0);
        auto w_d = dev.upload(w_start), w_plain_d = dev.upload(w_start);
        auto mo_d = dev.upload(zero), vo_d = dev.upload(zero), mp_d = dev.upload(zero), vp_d = dev.upload(zero);
        auto ws = dev.workspace(opt.workspace_bytes());
        compact::adam_counters c{}, cp{};
        for (std::uint64_t update = 0; update < 7; ++update) {
            opt.step(ctx, h, identity, w_d.view(m, n), recorded(g_d.cview(m, n), compact::resampling{2}.epoch(update)),
                     mo_d.view(m, n), vo_d.view(m, n), c, ws.get());
            compact::adamw<Backend>::step(ctx, h, w_plain_d.view(m, n), g_d.cview(m, n), mp_d.view(m, n),
                                          vp_d.view(m, n), cp);
        }
        CHECK(c.step == 7);
        CHECK(dev.download(w_d) == dev.download(w_plain_d));
        CHECK(dev.download(mo_d) == dev.download(mp_d));
    }
}

TEST_CASE_TEMPLATE("subspace_adamw with the identity ignores alpha: adamw::step bit for bit for alpha = 0.25, and "
                   "alpha is still validated" COMPACT_TEST_ON_DEVICE,
                   Cfg, COMPACT_TEST_CONFIGS)
{
    // alpha scales a step taken in a subspace; P = I is no subspace, so rank::full is plain AdamW for every
    // alpha (which must still be finite and positive).
    using Backend = typename Cfg::backend;
    using Scalar = typename Cfg::scalar;
    using State = typename Cfg::state;
    using doctest::Contains;
    compact_test::device<Backend> dev;
    const auto& ctx = dev.ctx();
    constexpr index_t m = 6, n = 9;
    const compact::projection_source<Scalar, Backend> identity(n, n, compact::distribution::identity, 3, 4);
    const compact::subspace_adamw<Scalar, Backend, State> optimizer(out_features{m}, identity);
    std::mt19937_64 rng(0xa1fa);
    const auto w_start = uniform<Scalar>(rng, m * n, -1, 1);
    const std::vector<State> zero(static_cast<std::size_t>(m * n), State(0));
    auto w_d = dev.upload(w_start), w_plain_d = dev.upload(w_start);
    auto mo_d = dev.upload(zero), vo_d = dev.upload(zero), mp_d = dev.upload(zero), vp_d = dev.upload(zero);
    device_array<Backend, Scalar> g_d(static_cast<std::size_t>(m * n));
    compact::adam_counters c, cp;
    auto h = default_hyper();
    h.alpha = 0.25;
    for (int s = 0; s < 10; ++s) {
        dev.upload_to(g_d, uniform<Scalar>(rng, m * n, -1, 1));
        optimizer.step(ctx, h, identity, w_d.view(m, n), recorded(g_d.cview(m, n), 0), mo_d.view(m, n),
                       vo_d.view(m, n), c, {});
        compact::adamw<Backend>::step(ctx, h, w_plain_d.view(m, n), g_d.cview(m, n), mp_d.view(m, n), vp_d.view(m, n),
                                      cp);
    }
    const auto w = dev.download(w_d);
    CHECK(bit_equal(w, dev.download(w_plain_d)));
    CHECK(bit_equal(dev.download(mo_d), dev.download(mp_d)));
    CHECK(bit_equal(dev.download(vo_d), dev.download(vp_d)));
    CHECK(c.step == cp.step);
    CHECK_FALSE(bit_equal(w, w_start));

    auto step = [&](const compact::adamw_params& bad) {
        optimizer.step(ctx, bad, identity, w_d.view(m, n), recorded(g_d.cview(m, n), 0), mo_d.view(m, n),
                       vo_d.view(m, n), c, {});
    };
    auto bad = h;
    bad.alpha = 0.0;
    CHECK_THROWS_WITH_AS(step(bad), Contains("subspace_adamw::step: alpha=0 must be finite and positive"),
                         compact::error);
    bad.alpha = std::numeric_limits<double>::infinity();
    CHECK_THROWS_WITH_AS(step(bad), Contains("subspace_adamw::step: alpha=inf must be finite and positive"),
                         compact::error);
    CHECK(bit_equal(dev.download(w_d), w));
    CHECK(c.step == 10);
}

// ================================================================================= master weights

namespace {

/// Gradients with a steady part per element (so the weights drift in one direction, step after step)
/// and noise: g = base + noise, base in [0.2, 1) times a random sign, noise in [-0.2, 0.2).
std::vector<float> drifting_gradient(std::mt19937_64& rng, const std::vector<float>& base)
{
    auto g = uniform<float>(rng, static_cast<index_t>(base.size()), -0.2, 0.2);
    for (std::size_t i = 0; i < g.size(); ++i) g[i] += base[i];
    return g;
}

std::vector<float> drift_base(std::mt19937_64& rng, index_t count)
{
    auto base = uniform<float>(rng, count, 0.2, 1.0);
    for (auto& b : base)
        if (std::uniform_int_distribution<int>(0, 1)(rng) == 1) b = -b;
    return base;
}

/// W - W_start in float64.
template <class T>
std::vector<double> change_from(const std::vector<T>& w, const std::vector<double>& start)
{
    std::vector<double> d(start.size());
    for (std::size_t i = 0; i < d.size(); ++i) d[i] = static_cast<double>(w[i]) - start[i];
    return d;
}

} // namespace

// Float weights and gradients, double moments and master (not one of COMPACT_TEST_CONFIGS: these
// cases name their types and run on the backend under test). W's rounding from the master is one
// conversion of each value, the same on every backend, so it is checked bit for bit.
//
// lr = 5e-9 with weights in [0.5, 1), where half an ulp of float is 2^-25 = 3.0e-8: Adam's step
// |eta_t M / (sqrt(V) + eps)| is at most about 3.2 lr = 1.6e-8 (transformers-style bias correction), so
// every update of a float W is rounded away, while the master accumulates them: 2000 steps move it by
// about 1e-5 (170 float ulps).
TEST_CASE("adamw::step with a double master beside float weights tracks float64 where float alone stalls"
          COMPACT_TEST_ON_DEVICE)
{
    using Backend = backend_under_test;
    compact_test::device<Backend> dev;
    const auto& ctx = dev.ctx();
    constexpr index_t rows = 7, cols = 19, size = rows * cols;
    constexpr int steps = 2000;
    std::mt19937_64 rng(0xa57e);
    const auto w_start = uniform<float>(rng, size, 0.5, 1.0);
    const auto base = drift_base(rng, size);
    auto h = default_hyper();
    h.lr = 5e-9;
    h.weight_decay = 0.1;

    auto w_d = dev.upload(w_start), w_plain_d = dev.upload(w_start);
    auto master_d = dev.upload(std::vector<double>(w_start.begin(), w_start.end())); // the caller's initialisation
    const std::vector<double> zero(size, 0.0);
    auto m_d = dev.upload(zero), v_d = dev.upload(zero), m_plain_d = dev.upload(zero), v_plain_d = dev.upload(zero);
    device_array<Backend, float> g_d(static_cast<std::size_t>(size));
    compact::adam_counters counters, counters_plain;
    const auto start = to_double(w_start);
    auto w_ref = start;
    reference_adam ref(static_cast<std::size_t>(size));
    for (int s = 0; s < steps; ++s) {
        const auto g = drifting_gradient(rng, base);
        dev.upload_to(g_d, g);
        compact::adamw<Backend>::step(ctx, h, w_d.view(rows, cols), g_d.cview(rows, cols), m_d.view(rows, cols),
                                      v_d.view(rows, cols), counters, master_d.view(rows, cols));
        compact::adamw<Backend>::step(ctx, h, w_plain_d.view(rows, cols), g_d.cview(rows, cols),
                                      m_plain_d.view(rows, cols), v_plain_d.view(rows, cols), counters_plain);
        reference_adamw_step(h, w_ref, to_double(g), ref);
    }
    const auto w = dev.download(w_d), w_plain = dev.download(w_plain_d);
    const auto master = dev.download(master_d);
    const auto m = dev.download(m_d), v = dev.download(v_d), m_plain = dev.download(m_plain_d),
               v_plain = dev.download(v_plain_d);
    const auto change_ref = change_from(w_ref, start);
    // The master: double arithmetic, so the change (about 1e-5) is off by a few roundings of W per
    // step, 2000 * 1.1e-16 at most: 2e-8 relative, far inside the stated 1e-6.
    CHECK_RELATIVE(relative_error(change_from(master, start), change_ref), 1e-6);
    // W is the master rounded to float, bit for bit, so within half an ulp (2^-24 relative) of float64.
    bool rounded = true, within_half_ulp = true;
    for (std::size_t i = 0; i < w.size(); ++i) {
        rounded = rounded && w[i] == static_cast<float>(master[i]);
        within_half_ulp = within_half_ulp && std::abs(static_cast<double>(w[i]) - w_ref[i]) <= 0x1p-24 * std::abs(w_ref[i]);
    }
    CHECK(rounded);
    CHECK(within_half_ulp);
    // Half an ulp (<= 3e-8) against changes of about 1e-5: the float W's change is right to 1%.
    CHECK_RELATIVE(relative_error(change_from(w, start), change_ref), 0.01);
    // Negative control: without a master the float weights never move.
    CHECK(bit_equal(w_plain, w_start));
    CHECK(relative_error(change_from(w_plain, start), change_ref) == 1.0);
    // The moments do not depend on the master.
    CHECK(bit_equal(m, m_plain));
    CHECK(bit_equal(v, v_plain));
}

// The same for the subspace update: float W (m, n), double moments (m, r) and master; the reference
// uses P rounded to float, the P the forward pass used and the step widens. lr = 2e-9 keeps
// |eta_t alpha (N P^T)_ij| below 3e-8 (|N| <= 3.2, |P_ij| about 1/sqrt(r), r terms).
TEST_CASE("subspace_adamw::step with a double master beside float weights tracks float64 where float alone stalls"
          COMPACT_TEST_ON_DEVICE)
{
    using Backend = backend_under_test;
    compact_test::device<Backend> dev;
    const auto& ctx = dev.ctx();
    constexpr index_t m = 8, n = 24, r = 6;
    constexpr int steps = 2000;
    constexpr std::uint64_t epoch = 3;
    const compact::projection_source<float, Backend> projection(n, r, compact::distribution::gaussian, 0x3a57e5, 9);
    const compact::subspace_adamw<float, Backend, double> optimizer(out_features{m}, projection);
    std::vector<double> p_ref = reference_projection(projection.spec(epoch));
    for (auto& x : p_ref) x = static_cast<double>(static_cast<float>(x));

    std::mt19937_64 rng(0x5ab5);
    const auto w_start = uniform<float>(rng, m * n, 0.5, 1.0);
    const auto base = drift_base(rng, m * r);
    auto h = default_hyper();
    h.lr = 2e-9;
    h.alpha = 1.0;
    h.weight_decay = 0.1;

    auto w_d = dev.upload(w_start), w_plain_d = dev.upload(w_start), w_kept_d = dev.upload(w_start);
    const std::vector<double> master_start(w_start.begin(), w_start.end()), zero(m * r, 0.0);
    auto master_d = dev.upload(master_start), master_kept_d = dev.upload(master_start);
    auto mm_d = dev.upload(zero), vv_d = dev.upload(zero), mm_plain_d = dev.upload(zero), vv_plain_d = dev.upload(zero),
         mm_kept_d = dev.upload(zero), vv_kept_d = dev.upload(zero);
    device_array<Backend, float> g_d(static_cast<std::size_t>(m * r));
    compact::adam_counters counters, counters_plain, counters_kept;
    auto ws = dev.workspace(optimizer.workspace_bytes(true));
    auto ws_plain = dev.workspace(optimizer.workspace_bytes());
    device_array<Backend, float> p_kept_d(static_cast<std::size_t>(n * r));
    compact::projection_source<float, Backend> kept = projection; // the same P, kept in p_kept_d
    kept.keep(p_kept_d.view(n, r));
    const auto start = to_double(w_start);
    auto w_ref = start;
    reference_adam ref(static_cast<std::size_t>(m * r));
    for (int s = 0; s < steps; ++s) {
        const auto g = drifting_gradient(rng, base);
        dev.upload_to(g_d, g);
        optimizer.step(ctx, h, projection, w_d.view(m, n), recorded(g_d.cview(m, r), epoch), mm_d.view(m, r),
                       vv_d.view(m, r), counters, ws.get(), master_d.view(m, n));
        optimizer.step(ctx, h, kept, w_kept_d.view(m, n), recorded(g_d.cview(m, r), epoch), mm_kept_d.view(m, r),
                       vv_kept_d.view(m, r), counters_kept, ws.get(), master_kept_d.view(m, n));
        optimizer.step(ctx, h, projection, w_plain_d.view(m, n), recorded(g_d.cview(m, r), epoch),
                       mm_plain_d.view(m, r), vv_plain_d.view(m, r), counters_plain, ws_plain.get());
        reference_subspace_step(h, w_ref, to_double(g), p_ref, m, n, r, ref);
    }
    const auto w = dev.download(w_d), w_plain = dev.download(w_plain_d), w_kept = dev.download(w_kept_d);
    const auto master = dev.download(master_d), master_kept = dev.download(master_kept_d);
    const auto mm = dev.download(mm_d), mm_plain = dev.download(mm_plain_d);
    const auto change_ref = change_from(w_ref, start);
    CHECK_RELATIVE(relative_error(change_from(master, start), change_ref), 1e-6);
    bool rounded = true;
    for (std::size_t i = 0; i < w.size(); ++i) rounded = rounded && w[i] == static_cast<float>(master[i]);
    CHECK(rounded);
    CHECK_RELATIVE(relative_error(change_from(w, start), change_ref), 0.02);
    // A kept P (float, widened) and a regenerated one give the same bits.
    CHECK(bit_equal(master, master_kept));
    CHECK(bit_equal(w, w_kept));
    // Negative control: the float weights alone do not move.
    CHECK(bit_equal(w_plain, w_start));
    CHECK(relative_error(change_from(w_plain, start), change_ref) == 1.0);
    CHECK(bit_equal(mm, mm_plain));
}

TEST_CASE("subspace_adamw with the identity and a master is adamw::step with that master, bit for bit"
          COMPACT_TEST_ON_DEVICE)
{
    using Backend = backend_under_test;
    compact_test::device<Backend> dev;
    const auto& ctx = dev.ctx();
    constexpr index_t m = 5, n = 11;
    const compact::projection_source<float, Backend> identity(n, n, compact::distribution::identity, 1, 2);
    const compact::subspace_adamw<float, Backend, double> optimizer(out_features{m}, identity);
    CHECK(optimizer.workspace_bytes(true) == 0);
    std::mt19937_64 rng(0x1de);
    const auto w_start = uniform<float>(rng, m * n, -1, 1);
    auto w_d = dev.upload(w_start), w_plain_d = dev.upload(w_start);
    const std::vector<double> master_start(w_start.begin(), w_start.end()), zero(m * n, 0.0);
    auto master_d = dev.upload(master_start), master_plain_d = dev.upload(master_start);
    auto mo_d = dev.upload(zero), vo_d = dev.upload(zero), mp_d = dev.upload(zero), vp_d = dev.upload(zero);
    device_array<Backend, float> g_d(static_cast<std::size_t>(m * n));
    compact::adam_counters c, cp;
    auto h = default_hyper();
    h.lr = 1e-7;
    for (int s = 0; s < 50; ++s) {
        dev.upload_to(g_d, uniform<float>(rng, m * n, -1, 1));
        optimizer.step(ctx, h, identity, w_d.view(m, n), recorded(g_d.cview(m, n), static_cast<std::uint64_t>(s / 7)),
                       mo_d.view(m, n), vo_d.view(m, n), c, {}, master_d.view(m, n));
        compact::adamw<Backend>::step(ctx, h, w_plain_d.view(m, n), g_d.cview(m, n), mp_d.view(m, n), vp_d.view(m, n),
                                      cp, master_plain_d.view(m, n));
    }
    const auto w = dev.download(w_d);
    CHECK(bit_equal(dev.download(master_d), dev.download(master_plain_d)));
    CHECK(bit_equal(w, dev.download(w_plain_d)));
    CHECK(bit_equal(dev.download(mo_d), dev.download(mp_d)));
    CHECK(!bit_equal(w, w_start));
}

TEST_CASE("master weights: wrong shapes, a null master and a workspace sized without it are refused, "
          "changing nothing" COMPACT_TEST_ON_DEVICE)
{
    using Backend = backend_under_test;
    using doctest::Contains;
    compact_test::device<Backend> dev;
    const auto& ctx = dev.ctx();
    constexpr index_t m = 4, n = 10, r = 3;
    const compact::projection_source<float, Backend> projection(n, r, compact::distribution::gaussian, 4, 5);
    const compact::subspace_adamw<float, Backend, double> optimizer(out_features{m}, projection);
    std::mt19937_64 rng(0xe11);
    const auto w0 = uniform<float>(rng, (m + 1) * (n + 1), -1, 1);
    const auto g = uniform<float>(rng, (m + 1) * (n + 1), -1, 1);
    const std::vector<double> zero((m + 1) * (n + 1), 0.0), master0((m + 1) * (n + 1), 0.25);
    auto w_d = dev.upload(w0);
    const auto g_d = dev.upload(g);
    auto mm_d = dev.upload(zero), vv_d = dev.upload(zero), master_d = dev.upload(master0);
    compact::adam_counters counters;
    auto ws = dev.workspace(optimizer.workspace_bytes(true));
    const auto h = default_hyper();
    auto unchanged = [&] {
        return bit_equal(dev.download(w_d), w0) && bit_equal(dev.download(master_d), master0) && counters.step == 0;
    };

    auto sub = [&](compact::matrix_view<double> mv, compact::workspace space) {
        optimizer.step(ctx, h, projection, w_d.view(m, n), recorded(g_d.cview(m, r), 0), mm_d.view(m, r),
                       vv_d.view(m, r), counters, space, mv);
    };
    CHECK(optimizer.workspace_bytes(true) > optimizer.workspace_bytes());
    CHECK(optimizer.workspace_bytes(true) >=
          optimizer.workspace_bytes() + static_cast<std::size_t>(m * r + n * r) * sizeof(double) -
              static_cast<std::size_t>(m * r) * sizeof(float));
    CHECK_THROWS_WITH_AS(sub(master_d.view(m, n + 1), ws.get()),
                         Contains("subspace_adamw::step: master (the master copy of W) is (4, 11) but (4, 10)"),
                         compact::error);
    CHECK(unchanged());
    CHECK_THROWS_WITH_AS(sub(master_d.view(m + 1, n), ws.get()), Contains("master (the master copy of W) is (5, 10)"),
                         compact::error);
    CHECK(unchanged());
    CHECK_THROWS_WITH_AS(sub(compact::matrix_view<double>(nullptr, m, n), ws.get()),
                         Contains("subspace_adamw::step: master is null but has shape (4, 10)"), compact::error);
    CHECK(unchanged());
    auto small = dev.workspace(optimizer.workspace_bytes());
    CHECK_THROWS_WITH_AS(sub(master_d.view(m, n), small.get()), Contains("subspace_adamw::step: workspace holds"),
                         compact::error);
    CHECK(unchanged());

    auto plain = [&](compact::matrix_view<double> mv) {
        compact::adamw<Backend>::step(ctx, h, w_d.view(m, n), g_d.cview(m, n), mm_d.view(m, n), vv_d.view(m, n),
                                      counters, mv);
    };
    CHECK_THROWS_WITH_AS(plain(master_d.view(m, n - 1)),
                         Contains("adamw::step: master (the master copy of W) is (4, 9)"), compact::error);
    CHECK(unchanged());
    CHECK_THROWS_WITH_AS(plain(compact::matrix_view<double>(nullptr, 1, 1)), Contains("adamw::step: master is null"),
                         compact::error);
    CHECK(unchanged());
    // The right shapes go through.
    CHECK_NOTHROW(sub(master_d.view(m, n), ws.get()));
    CHECK(counters.step == 1);
    dev.synchronize(); // the step has finished before its buffers are freed
}

// ==================================================== non-finite gradients, grad_scale, loss scaling

namespace {

using doctest::Contains;

/// A (rows, cols) view of a device array's first rows * ld elements with leading dimension ld.
template <class Backend, class T>
compact::matrix_view<T> strided(device_array<Backend, T>& a, index_t rows, index_t cols, index_t ld)
{
    return compact::matrix_view<T>(a.data(), rows, cols, ld);
}

} // namespace

TEST_CASE_TEMPLATE("flag_nonfinite and nonfinite_check: NaN and infinities anywhere, one flag for several tensors"
                   COMPACT_TEST_ON_DEVICE,
                   Cfg, COMPACT_TEST_CONFIGS)
{
    using Backend = typename Cfg::backend;
    using Scalar = typename Cfg::scalar;
    compact_test::device<Backend> dev;
    const auto& ctx = dev.ctx();
    // Several row parts on the CPU (rows * cols > 32768) and several blocks on CUDA; padding of NaN in the
    // leading dimension must not be read.
    constexpr index_t rows = 300, cols = 131, ld = 140;
    std::mt19937_64 rng(0xf1a6);
    auto x = uniform<Scalar>(rng, rows * ld, -1, 1);
    for (index_t i = 0; i < rows; ++i)
        for (index_t j = cols; j < ld; ++j) x[static_cast<std::size_t>(i * ld + j)] = std::numeric_limits<Scalar>::quiet_NaN();
    // The largest finite values and subnormals are finite.
    x[0] = std::numeric_limits<Scalar>::max();
    x[1] = -std::numeric_limits<Scalar>::max();
    x[2] = std::numeric_limits<Scalar>::denorm_min();
    auto x_d = dev.upload(x);
    compact::nonfinite_check<Backend> check;
    CHECK(check.all_finite(ctx, strided(x_d, rows, cols, ld)));

    const Scalar bad[] = {std::numeric_limits<Scalar>::quiet_NaN(), std::numeric_limits<Scalar>::infinity(),
                          -std::numeric_limits<Scalar>::infinity()};
    const index_t places[][2] = {{0, 0}, {rows - 1, cols - 1}, {157, 64}};
    for (const Scalar value : bad)
        for (const auto& at : places) {
            CAPTURE(static_cast<double>(value));
            CAPTURE(at[0]);
            CAPTURE(at[1]);
            auto y = x;
            y[static_cast<std::size_t>(at[0] * ld + at[1])] = value;
            dev.upload_to(x_d, y);
            CHECK_FALSE(check.all_finite(ctx, strided(x_d, rows, cols, ld)));
            // The primitive itself: sets the flag, never clears it.
            device_array<Backend, std::uint32_t> flag(1);
            compact::matrix_view<const Scalar> cx(x_d.data(), rows, cols, ld);
            Backend::template flag_nonfinite<Scalar>(ctx, cx, flag.data());
            CHECK(dev.download(flag)[0] == 1u);
            Backend::template flag_nonfinite<Scalar>(ctx, compact::matrix_view<const Scalar>(x_d.data(), 1, 0, ld),
                                                     flag.data());
            CHECK(dev.download(flag)[0] == 1u);
        }

    // One flag for several tensors: a finite one after a non-finite one does not clear it; reset does.
    auto finite_d = dev.upload(x);
    auto y = x;
    y[5] = std::numeric_limits<Scalar>::infinity();
    auto bad_d = dev.upload(y);
    check.reset(ctx);
    check.add(ctx, strided(bad_d, rows, cols, ld));
    check.add(ctx, strided(finite_d, rows, cols, ld));
    CHECK(check.found(ctx));
    check.reset(ctx);
    check.add(ctx, strided(finite_d, rows, cols, ld));
    check.add(ctx, strided(finite_d, 1, 7, 7));
    CHECK_FALSE(check.found(ctx));
    CHECK_FALSE(check.all_finite(ctx, strided(finite_d, rows, cols, ld), strided(bad_d, rows, cols, ld)));
    CHECK(check.all_finite(ctx)); // nothing added: nothing found
}

TEST_CASE_TEMPLATE("step_if_finite: a NaN or an infinity in G changes nothing, and the next step is the one that "
                   "never saw it, bit for bit" COMPACT_TEST_ON_DEVICE,
                   Cfg, COMPACT_TEST_CONFIGS)
{
    using Backend = typename Cfg::backend;
    using Scalar = typename Cfg::scalar;
    using State = typename Cfg::state;
    compact_test::device<Backend> dev;
    const auto& ctx = dev.ctx();
    constexpr index_t m = 12, n = 40, r = 10;
    const compact::projection_source<Scalar, Backend> projection(n, r, compact::distribution::gaussian, 0xbadULL, 3);
    const compact::subspace_adamw<Scalar, Backend, State> optimizer(out_features{m}, projection);
    compact::nonfinite_check<Backend> check;
    auto ws = dev.workspace(optimizer.workspace_bytes(true));
    const auto h = default_hyper();

    std::mt19937_64 rng(0x51c);
    const auto w0 = uniform<Scalar>(rng, m * n, -1, 1);
    std::vector<std::vector<Scalar>> g_sub, g_full;
    for (int s = 0; s < 4; ++s) {
        g_sub.push_back(uniform<Scalar>(rng, m * r, -1, 1));
        g_full.push_back(uniform<Scalar>(rng, m * n, -1, 1));
    }
    const Scalar bad[] = {std::numeric_limits<Scalar>::quiet_NaN(), std::numeric_limits<Scalar>::infinity(),
                          -std::numeric_limits<Scalar>::infinity()};
    std::vector<State> master0(w0.begin(), w0.end());

    // A run that steps on gradients 0..3 (the reference) and one that meets a non-finite gradient before
    // each of steps 1 and 3; each run: plain AdamW with a master on W (m, n), subspace AdamW on a copy.
    struct run {
        device_array<Backend, Scalar> w, w_sub;
        device_array<Backend, State> m, v, m_sub, v_sub, master;
        compact::adam_counters c, c_sub;
    };
    auto start = [&] {
        const std::vector<State> zeros_full(static_cast<std::size_t>(m * n), State(0)), zeros_sub(static_cast<std::size_t>(m * r), State(0));
        return run{dev.upload(w0), dev.upload(w0), dev.upload(zeros_full), dev.upload(zeros_full), dev.upload(zeros_sub),
                   dev.upload(zeros_sub), dev.upload(master0), {}, {}};
    };
    run ref = start(), skip = start();
    auto g_d = dev.upload(g_full[0]);
    auto gs_d = dev.upload(g_sub[0]);
    auto step = [&](run& x, const std::vector<Scalar>& g, const std::vector<Scalar>& gs) {
        dev.upload_to(g_d, g);
        dev.upload_to(gs_d, gs);
        const bool full = compact::adamw<Backend>::step_if_finite(ctx, h, check, x.w.view(m, n), g_d.cview(m, n),
                                                                  x.m.view(m, n), x.v.view(m, n), x.c,
                                                                  x.master.view(m, n));
        const bool sub = optimizer.step_if_finite(ctx, h, check, projection, x.w_sub.view(m, n),
                                                  recorded(gs_d.cview(m, r), 0), x.m_sub.view(m, r),
                                                  x.v_sub.view(m, r), x.c_sub, ws.get());
        CHECK(full == sub);
        return full;
    };
    auto state_of = [&](run& x) {
        std::vector<double> all;
        auto put = [&](const auto& v) { all.insert(all.end(), v.begin(), v.end()); };
        put(dev.download(x.w));
        put(dev.download(x.w_sub));
        put(dev.download(x.m));
        put(dev.download(x.v));
        put(dev.download(x.m_sub));
        put(dev.download(x.v_sub));
        put(dev.download(x.master));
        all.push_back(static_cast<double>(x.c.step));
        all.push_back(static_cast<double>(x.c_sub.step));
        return all;
    };

    for (int s = 0; s < 4; ++s) CHECK(step(ref, g_full[static_cast<std::size_t>(s)], g_sub[static_cast<std::size_t>(s)]));
    int bad_index = 0;
    for (int s = 0; s < 4; ++s) {
        if (s % 2 == 1) {
            // One non-finite value in G (at a step-dependent place), the other gradient finite: both
            // optimizers see one of them non-finite in turn.
            const auto before = state_of(skip);
            auto g = g_full[static_cast<std::size_t>(s)];
            auto gs = g_sub[static_cast<std::size_t>(s)];
            const Scalar value = bad[bad_index++ % 3];
            g[static_cast<std::size_t>(7 * s)] = value;
            gs[static_cast<std::size_t>(5 * s)] = value;
            CHECK_FALSE(step(skip, g, gs));
            const auto after = state_of(skip);
            CHECK(bit_equal(before, after));
        }
        CHECK(step(skip, g_full[static_cast<std::size_t>(s)], g_sub[static_cast<std::size_t>(s)]));
    }
    CHECK(skip.c.step == 4);
    CHECK(bit_equal(state_of(ref), state_of(skip)));

    // Bad hyper-parameters are reported even for a gradient that would be skipped.
    auto hb = h;
    hb.lr = -1;
    std::vector<Scalar> g = g_full[0];
    g[0] = bad[0];
    dev.upload_to(g_d, g);
    CHECK_THROWS_WITH_AS(compact::adamw<Backend>::step_if_finite(ctx, hb, check, skip.w.view(m, n), g_d.cview(m, n),
                                                                 skip.m.view(m, n), skip.v.view(m, n), skip.c),
                         Contains("lr=-1"), compact::error);
}

TEST_CASE_TEMPLATE("grad_scale: G scaled by 2^k with grad_scale 2^-k steps bit for bit as G with grad_scale 1"
                   COMPACT_TEST_ON_DEVICE,
                   Cfg, COMPACT_TEST_CONFIGS)
{
    using Backend = typename Cfg::backend;
    using Scalar = typename Cfg::scalar;
    using State = typename Cfg::state;
    compact_test::device<Backend> dev;
    const auto& ctx = dev.ctx();
    constexpr index_t m = 9, n = 33, r = 8;
    const compact::projection_source<Scalar, Backend> projection(n, r, compact::distribution::gaussian, 0x5ca1eULL, 4);
    const compact::subspace_adamw<Scalar, Backend, State> optimizer(out_features{m}, projection);
    auto ws = dev.workspace(optimizer.workspace_bytes());
    std::mt19937_64 rng(0x6ca1e);
    const auto w0 = uniform<Scalar>(rng, m * n, -1, 1);
    const std::vector<State> zeros_full(static_cast<std::size_t>(m * n), State(0)), zeros_sub(static_cast<std::size_t>(m * r), State(0));

    // scale = 0: the plain run; else G multiplied by 2^scale (exact) and grad_scale = 2^-scale.
    auto train = [&](int scale) {
        auto w = dev.upload(w0), w_sub = dev.upload(w0);
        auto mm = dev.upload(zeros_full), vv = dev.upload(zeros_full), m_sub = dev.upload(zeros_sub),
             v_sub = dev.upload(zeros_sub);
        compact::adam_counters c, c_sub;
        std::mt19937_64 g_rng(0x9);
        auto h = default_hyper();
        h.grad_scale = std::ldexp(1.0, -scale);
        auto g_d = dev.upload(std::vector<Scalar>(static_cast<std::size_t>(m * n)));
        auto gs_d = dev.upload(std::vector<Scalar>(static_cast<std::size_t>(m * r)));
        for (int s = 0; s < 5; ++s) {
            auto g = uniform<Scalar>(g_rng, m * n, -1e-3, 1e-3);
            auto gs = uniform<Scalar>(g_rng, m * r, -1e-3, 1e-3);
            for (auto& x : g) x = static_cast<Scalar>(std::ldexp(static_cast<double>(x), scale));
            for (auto& x : gs) x = static_cast<Scalar>(std::ldexp(static_cast<double>(x), scale));
            dev.upload_to(g_d, g);
            dev.upload_to(gs_d, gs);
            compact::adamw<Backend>::step(ctx, h, w.view(m, n), g_d.cview(m, n), mm.view(m, n), vv.view(m, n), c);
            optimizer.step(ctx, h, projection, w_sub.view(m, n), recorded(gs_d.cview(m, r), 0), m_sub.view(m, r),
                           v_sub.view(m, r), c_sub, ws.get());
        }
        std::vector<double> all;
        auto put = [&](const auto& v) { all.insert(all.end(), v.begin(), v.end()); };
        put(dev.download(w));
        put(dev.download(w_sub));
        put(dev.download(mm));
        put(dev.download(vv));
        put(dev.download(m_sub));
        put(dev.download(v_sub));
        return all;
    };
    const auto plain = train(0);
    CHECK(bit_equal(plain, train(16)));
    CHECK(bit_equal(plain, train(-8)));
    // A scale that is no power of two unscales to rounding (one rounding of G in State, one of 1/s).
    const auto other = [&] {
        auto w = dev.upload(w0);
        auto mm = dev.upload(zeros_full), vv = dev.upload(zeros_full);
        compact::adam_counters c;
        auto h = default_hyper();
        h.grad_scale = 1.0 / 3.0;
        std::mt19937_64 g_rng(0x9);
        auto g = uniform<Scalar>(g_rng, m * n, -1e-3, 1e-3);
        for (auto& x : g) x = static_cast<Scalar>(3.0 * static_cast<double>(x));
        auto g_d = dev.upload(g);
        compact::adamw<Backend>::step(ctx, h, w.view(m, n), g_d.cview(m, n), mm.view(m, n), vv.view(m, n), c);
        return to_double(dev.download(mm));
    }();
    const auto reference_m = [&] {
        auto w = dev.upload(w0);
        auto mm = dev.upload(zeros_full), vv = dev.upload(zeros_full);
        compact::adam_counters c;
        std::mt19937_64 g_rng(0x9);
        auto g_d = dev.upload(uniform<Scalar>(g_rng, m * n, -1e-3, 1e-3));
        compact::adamw<Backend>::step(ctx, default_hyper(), w.view(m, n), g_d.cview(m, n), mm.view(m, n), vv.view(m, n), c);
        return to_double(dev.download(mm));
    }();
    CHECK_RELATIVE(relative_error(other, reference_m), (is_float<Scalar> ? 1e-6 : 1e-14));

    auto h = default_hyper();
    for (const double bad : {0.0, -1.0, std::numeric_limits<double>::infinity(), std::numeric_limits<double>::quiet_NaN()}) {
        h.grad_scale = bad;
        auto w = dev.upload(w0);
        auto mm = dev.upload(zeros_full), vv = dev.upload(zeros_full);
        compact::adam_counters c;
        CHECK_THROWS_WITH_AS(compact::adamw<Backend>::step(ctx, h, w.view(m, n), w.cview(m, n), mm.view(m, n),
                                                           vv.view(m, n), c),
                             Contains("grad_scale="), compact::error);
        CHECK(c.step == 0);
    }
}

TEST_CASE("loss_scaler: growth every growth_interval clean steps, backoff on a non-finite step, bounds, restore")
{
    compact::loss_scaler_options o;
    o.growth_interval = 3;
    o.init_scale = 1024;
    o.min_scale = 256;
    o.max_scale = 4096;
    compact::loss_scaler scaler(o);
    CHECK(scaler.scale() == 1024);
    CHECK(scaler.unscale() == 1.0 / 1024);
    // (found_nonfinite, scale after the update)
    const std::pair<bool, double> sequence[] = {
        {false, 1024}, {false, 1024}, {false, 2048}, // growth after 3 clean steps
        {false, 2048}, {true, 1024},                 // backoff restarts the count
        {false, 1024}, {false, 1024}, {false, 2048}, {false, 2048}, {false, 2048}, {false, 4096},
        {false, 4096}, {false, 4096}, {false, 4096}, // max_scale
        {true, 2048},  {true, 1024},  {true, 512},  {true, 256}, {true, 256}, // min_scale
        {false, 256},  {false, 256},  {false, 512},
    };
    std::uint64_t skipped = 0;
    for (const auto& step : sequence) {
        scaler.update(step.first);
        skipped += step.first ? 1 : 0;
        CHECK(scaler.scale() == step.second);
        CHECK(scaler.state().skipped_steps == skipped);
        CHECK(scaler.unscale() * scaler.scale() == 1.0);
    }
    // A restored state resumes the sequence.
    compact::loss_scaler a(o), b(o);
    a.update(false);
    a.update(false);
    b.restore(a.state());
    a.update(false);
    b.update(false);
    CHECK(a.scale() == 2048);
    CHECK(b.scale() == 2048);
    CHECK(b.state().clean_steps == 0);

    compact::loss_scaler defaults;
    CHECK(defaults.scale() == 65536.0);
    CHECK(defaults.options().growth_interval == 2000);
    for (int s = 0; s < 1999; ++s) defaults.update(false);
    CHECK(defaults.scale() == 65536.0);
    defaults.update(false);
    CHECK(defaults.scale() == 131072.0);
    defaults.update(true);
    CHECK(defaults.scale() == 65536.0);

    compact::loss_scaler_state bad_state;
    bad_state.scale = 8192;
    CHECK_THROWS_WITH_AS(b.restore(bad_state), Contains("scale=8192"), compact::error);
    bad_state.scale = 1024;
    bad_state.clean_steps = 3;
    CHECK_THROWS_WITH_AS(b.restore(bad_state), Contains("clean_steps=3"), compact::error);
    auto bad = o;
    bad.init_scale = 100;
    CHECK_THROWS_WITH_AS(compact::loss_scaler{bad}, Contains("init_scale=100"), compact::error);
    bad = o;
    bad.backoff_factor = 1;
    CHECK_THROWS_WITH_AS(compact::loss_scaler{bad}, Contains("backoff_factor=1"), compact::error);
    bad = o;
    bad.growth_interval = 0;
    CHECK_THROWS_WITH_AS(compact::loss_scaler{bad}, Contains("growth_interval"), compact::error);
}
