// tests/test_optim.cpp: plain AdamW and subspace AdamW (compact/optim/adamw.hpp) against float64
// references of SPEC section 3 written here, the identity check of the whole compressed layer, the
// moment policies at an epoch change, argument validation and the memory queries.
//
// Every test body is a template over a `config` (backend, scalar, moment type); a CUDA backend joins
// by adding its configs to COMPACT_TEST_CONFIGS (its bodies then need device copies of the buffers).
#include "test_support.hpp"

#include <compact/compact.hpp>

#include <doctest/doctest.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using compact::index_t;

using namespace compact_test;


/// Caller-owned workspace memory.
struct workspace_buffer {
    std::vector<unsigned char> bytes;
    explicit workspace_buffer(std::size_t size) : bytes(size) {}
    compact::workspace get() { return {bytes.data(), bytes.size()}; }
};

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

TEST_CASE_TEMPLATE("adamw::step equals a float64 transformers-style AdamW over 20 steps", Cfg, COMPACT_TEST_CONFIGS)
{
    using Backend = typename Cfg::backend;
    using Scalar = typename Cfg::scalar;
    using State = typename Cfg::state;
    const typename Backend::context ctx{};
    constexpr index_t rows = 13, cols = 37, size = rows * cols;
    // Relative (2-norm) error after 20 steps: a few roundings per step in the working precision
    // (float: u = 6e-8; double: u = 1e-16), with a wide margin.
    const double tol = is_float<Scalar> ? 2e-6 : 1e-13;

    std::mt19937_64 rng(0x0a11);
    auto w = uniform<Scalar>(rng, size, -1, 1);
    std::vector<State> m(size, State(0)), v(size, State(0));
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
        compact::adamw<Backend>::step(ctx, h, view_of(w, rows, cols), cview_of(g, rows, cols), view_of(m, rows, cols),
                                      view_of(v, rows, cols), counters);
        reference_adamw_step(h, w_ref, to_double(g), ref);
        CHECK(counters.step == static_cast<std::uint64_t>(s + 1));
    }
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

TEST_CASE_TEMPLATE("adamw::step on strided views equals the dense run and leaves the padding alone", Cfg,
                   COMPACT_TEST_CONFIGS)
{
    using Backend = typename Cfg::backend;
    using Scalar = typename Cfg::scalar;
    using State = typename Cfg::state;
    const typename Backend::context ctx{};
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
    compact::adam_counters c_dense, c_pad;
    const auto h = default_hyper();
    for (int s = 0; s < 3; ++s) {
        compact::adamw<Backend>::step(ctx, h, view_of(w_dense, rows, cols), cview_of(g_dense, rows, cols),
                                      view_of(m_dense, rows, cols), view_of(v_dense, rows, cols), c_dense);
        compact::adamw<Backend>::step(ctx, h, compact::matrix_view<Scalar>(w_pad.data(), rows, cols, ld),
                                      compact::const_matrix_view<Scalar>(g_pad.data(), rows, cols, ld),
                                      compact::matrix_view<State>(m_pad.data(), rows, cols, ld),
                                      compact::matrix_view<State>(v_pad.data(), rows, cols, ld), c_pad);
    }
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

TEST_CASE_TEMPLATE("subspace_adamw::step equals the float64 subspace equations (alpha = 0.25)", Cfg,
                   COMPACT_TEST_CONFIGS)
{
    using Backend = typename Cfg::backend;
    using Scalar = typename Cfg::scalar;
    using State = typename Cfg::state;
    const typename Backend::context ctx{};
    constexpr index_t m = 20, n = 48, r = 12;
    constexpr std::uint64_t epoch = 2;
    // Relative (2-norm) error after 8 steps. Float: P is rounded to float and N P^T sums r = 12 terms,
    // each step adds a few ulp of W (u = 6e-8); double: the same at u = 1e-16. Wide margin.
    const double tol = is_float<Scalar> ? 2e-6 : 1e-13;

    for (auto dist : {compact::distribution::gaussian, compact::distribution::rademacher}) {
        CAPTURE(compact::to_string(dist));
        const compact::input_projection<Scalar, Backend> projection(n, r, dist, 0x5eedULL, 7);
        const compact::subspace_adamw<Scalar, Backend, State> optimizer(m, projection);
        const auto p = reference_projection(projection.spec(epoch));

        std::mt19937_64 rng(0x5ab);
        auto w = uniform<Scalar>(rng, m * n, -1, 1);
        std::vector<State> mm(m * r, State(0)), vv(m * r, State(0));
        compact::adam_counters counters;
        workspace_buffer ws(optimizer.workspace_bytes());
        auto w_ref = to_double(w);
        reference_adam ref(static_cast<std::size_t>(m * r));

        auto h = default_hyper();
        h.alpha = 0.25;
        h.weight_decay = 0.05;
        for (int s = 0; s < 8; ++s) {
            const auto g = uniform<Scalar>(rng, m * r, -1, 1);
            optimizer.step(ctx, h, view_of(w, m, n), cview_of(g, m, r), view_of(mm, m, r), view_of(vv, m, r), counters,
                           epoch, ws.get());
            reference_subspace_step(h, w_ref, to_double(g), p, m, n, r, ref);
            CHECK(counters.step == static_cast<std::uint64_t>(s + 1));
            CHECK(counters.epoch == epoch);
        }
        CHECK_RELATIVE(relative_error(w, w_ref), tol);
        CHECK_RELATIVE(relative_error(mm, ref.m), tol);
        CHECK_RELATIVE(relative_error(vv, ref.v), tol);
    }
}

TEST_CASE_TEMPLATE("subspace_adamw::step with P from cpu::generate_projection in double", Cfg, COMPACT_TEST_CONFIGS)
{
    // The same equations, with the float64 P generated by the CPU backend instead of element by element.
    using Backend = typename Cfg::backend;
    using Scalar = typename Cfg::scalar;
    using State = typename Cfg::state;
    const typename Backend::context ctx{};
    constexpr index_t m = 9, n = 30, r = 7;
    const double tol = is_float<Scalar> ? 2e-6 : 1e-13; // as in the test above

    const compact::input_projection<Scalar, Backend> projection(n, r, compact::distribution::gaussian, 99, 3);
    const compact::subspace_adamw<Scalar, Backend, State> optimizer(m, projection);
    std::vector<double> p(n * r);
    compact::cpu::generate_projection<double>(compact::cpu::context{}, projection.spec(0), 0, 0, view_of(p, n, r));

    std::mt19937_64 rng(0x9e7);
    auto w = uniform<Scalar>(rng, m * n, -1, 1);
    std::vector<State> mm(m * r, State(0)), vv(m * r, State(0));
    compact::adam_counters counters;
    workspace_buffer ws(optimizer.workspace_bytes());
    auto w_ref = to_double(w);
    reference_adam ref(static_cast<std::size_t>(m * r));
    auto h = default_hyper();
    h.alpha = 0.25;
    for (int s = 0; s < 5; ++s) {
        const auto g = uniform<Scalar>(rng, m * r, -1, 1);
        optimizer.step(ctx, h, view_of(w, m, n), cview_of(g, m, r), view_of(mm, m, r), view_of(vv, m, r), counters, 0,
                       ws.get());
        reference_subspace_step(h, w_ref, to_double(g), p, m, n, r, ref);
    }
    CHECK_RELATIVE(relative_error(w, w_ref), tol);
    CHECK_RELATIVE(relative_error(mm, ref.m), tol);
}

TEST_CASE_TEMPLATE("subspace_adamw::step with a P the caller keeps equals regenerating it, bit for bit", Cfg,
                   COMPACT_TEST_CONFIGS)
{
    using Backend = typename Cfg::backend;
    using Scalar = typename Cfg::scalar;
    using State = typename Cfg::state;
    const typename Backend::context ctx{};
    constexpr index_t m = 10, n = 36, r = 9;
    const compact::resampling resample{2};
    const compact::input_projection<Scalar, Backend> projection(n, r, compact::distribution::gaussian, 8, 4);
    const compact::subspace_adamw<Scalar, Backend, State> optimizer(m, projection, compact::moment_policy::transfer);

    std::mt19937_64 rng(0x4e7);
    auto w = uniform<Scalar>(rng, m * n, -1, 1);
    auto w_kept = w;
    std::vector<State> mm(m * r, State(0)), vv(m * r, State(0)), mm_kept(m * r, State(0)), vv_kept(m * r, State(0));
    compact::adam_counters counters, counters_kept;
    workspace_buffer ws(optimizer.workspace_bytes()), p_space(projection.workspace_bytes());
    const auto h = default_hyper();
    for (std::uint64_t update = 0; update < 5; ++update) {
        const auto epoch = resample.epoch(update);
        const auto g = uniform<Scalar>(rng, m * r, -1, 1);
        const compact::const_matrix_view<Scalar> p = projection.generate(ctx, epoch, p_space.get());
        optimizer.step(ctx, h, view_of(w, m, n), cview_of(g, m, r), view_of(mm, m, r), view_of(vv, m, r), counters, epoch,
                       ws.get());
        optimizer.step(ctx, h, view_of(w_kept, m, n), cview_of(g, m, r), view_of(mm_kept, m, r), view_of(vv_kept, m, r),
                       counters_kept, epoch, ws.get(), p);
    }
    CHECK(bit_equal(w, w_kept));
    CHECK(bit_equal(mm, mm_kept));
    CHECK(bit_equal(vv, vv_kept));
    CHECK(counters.step == counters_kept.step);
    CHECK(counters.epoch == counters_kept.epoch);
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
    const typename Backend::context ctx{};
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

    // The library: caller-memory API, P = I.
    const compact::compressed_linear<Scalar, compact::rank::full, Backend> layer(n, m, 0x5eed, 1);
    REQUIRE(layer.rank() == n);
    REQUIRE(layer.projection().is_identity());
    const compact::subspace_adamw<Scalar, Backend, State> optimizer(m, layer.projection());
    std::vector<Scalar> y(rows * m), z(rows * n), dy(rows * m), g_sub(m * n), db(m);
    std::vector<State> wm(m * n, State(0)), wv(m * n, State(0)), bm(m, State(0)), bv(m, State(0));
    compact::adam_counters w_counters, b_counters;
    workspace_buffer ws(std::max(layer.workspace_bytes(), optimizer.workspace_bytes()));

    // The reference: a plain float64 linear layer + AdamW (the decay applies to the bias too).
    auto w_ref = to_double(w);
    auto b_ref = to_double(b);
    const auto x_ref = to_double(x);
    const auto t_ref = to_double(target);
    reference_adam w_state(static_cast<std::size_t>(m * n)), b_state(static_cast<std::size_t>(m));
    const double loss_scale = 2.0 / static_cast<double>(rows * m); // d/dY of mean((Y - T)^2)
    double first_loss = 0, last_loss = 0;

    for (int s = 0; s < steps; ++s) {
        layer.forward(ctx, cview_of(x, rows, n), cview_of(w, m, n), b.data(), view_of(y, rows, m), view_of(z, rows, n),
                      0, ws.get());
        for (std::size_t k = 0; k < dy.size(); ++k) dy[k] = static_cast<Scalar>(loss_scale) * (y[k] - target[k]);
        layer.backward(ctx, cview_of(dy, rows, m), cview_of(w, m, n), cview_of(z, rows, n), compact::matrix_view<Scalar>{},
                       view_of(g_sub, m, n), db.data());
        optimizer.step(ctx, h, view_of(w, m, n), cview_of(g_sub, m, n), view_of(wm, m, n), view_of(wv, m, n), w_counters,
                       0, ws.get());
        compact::adamw<Backend>::step(ctx, h, view_of(b, 1, m), cview_of(db, 1, m), view_of(bm, 1, m), view_of(bv, 1, m),
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
    CHECK(w_counters.step == static_cast<std::uint64_t>(steps));
    CHECK(b_counters.step == static_cast<std::uint64_t>(steps));
    CHECK(last_loss < 0.5 * first_loss); // the problem is not trivial: training moved the weights
    CHECK_RELATIVE(relative_error(w, w_ref), tol);
    CHECK_RELATIVE(relative_error(b, b_ref), tol);
}

} // namespace

TEST_CASE("identity projection: compressed_linear (rank::full) + subspace_adamw trains exactly like a float64 "
          "linear layer + AdamW, 50 steps")
{
    // Relative (2-norm) error of the final W and b: float <= 1e-4, double <= 1e-10 (SPEC section 3,
    // "identity check": equal to plain AdamW up to the working precision's rounding).
    SUBCASE("float, State = float") { identity_training_matches_plain_adamw<config<compact::cpu, float, float>>(1e-4); }
    SUBCASE("double, State = double")
    {
        identity_training_matches_plain_adamw<config<compact::cpu, double, double>>(1e-10);
    }
}

// ================================================================================ moment policies

TEST_CASE_TEMPLATE("moment policies at an epoch change: reset, transfer, keep", Cfg, COMPACT_TEST_CONFIGS)
{
    using Backend = typename Cfg::backend;
    using Scalar = typename Cfg::scalar;
    using State = typename Cfg::state;
    const typename Backend::context ctx{};
    constexpr index_t m = 12, n = 32, r = 8;
    const compact::resampling resample{3}; // T = 3: updates 0..2 use epoch 0, update 3 uses epoch 1
    // Relative (2-norm) errors of one step against float64. Float: the transfer product M P_old^T P_new
    // sums n = 32 and r = 8 terms of float-rounded P (u = 6e-8 each), the rest a few roundings;
    // double: the same at u = 1e-16. Wide margins.
    const double tol_moments = is_float<Scalar> ? 1e-5 : 1e-13;
    const double tol_weights = is_float<Scalar> ? 2e-6 : 1e-13;

    const compact::input_projection<Scalar, Backend> projection(n, r, compact::distribution::gaussian, 0xfeed, 11);
    const auto p_old = reference_projection(projection.spec(0));
    const auto p_new = reference_projection(projection.spec(1));

    for (auto policy : {compact::moment_policy::reset, compact::moment_policy::transfer, compact::moment_policy::keep}) {
        CAPTURE(compact::to_string(policy));
        const compact::subspace_adamw<Scalar, Backend, State> optimizer(m, projection, policy);
        CHECK(optimizer.policy() == policy);
        std::mt19937_64 rng(0x90c);
        auto w = uniform<Scalar>(rng, m * n, -1, 1);
        std::vector<State> mm(m * r, State(0)), vv(m * r, State(0));
        compact::adam_counters counters;
        workspace_buffer ws(optimizer.workspace_bytes());
        auto h = default_hyper();
        h.alpha = 0.25;

        for (std::uint64_t update = 0; update < 3; ++update) {
            const auto g = uniform<Scalar>(rng, m * r, -1, 1);
            optimizer.step(ctx, h, view_of(w, m, n), cview_of(g, m, r), view_of(mm, m, r), view_of(vv, m, r), counters,
                           resample.epoch(update), ws.get());
            CHECK(counters.epoch == resample.epoch(update));
            CHECK(counters.step == update + 1); // no policy acts while the epoch stays the same
        }
        REQUIRE(resample.epoch(3) == 1);

        const auto m_old = mm;
        const auto v_old = vv;
        const auto w_old = w;
        const auto counters_old = counters;
        const auto g = uniform<Scalar>(rng, m * r, -1, 1);
        optimizer.step(ctx, h, view_of(w, m, n), cview_of(g, m, r), view_of(mm, m, r), view_of(vv, m, r), counters,
                       resample.epoch(3), ws.get());
        CHECK(counters.epoch == 1);

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
            auto m_same = m_old;
            auto v_same = v_old;
            auto w_same = w_old;
            auto c_same = counters_old;
            optimizer.step(ctx, h, view_of(w_same, m, n), cview_of(g, m, r), view_of(m_same, m, r),
                           view_of(v_same, m, r), c_same, 0, ws.get());
            CHECK(bit_equal(m_same, mm));
            CHECK(bit_equal(v_same, vv));
            CHECK(c_same.step == counters.step);
            CHECK_FALSE(bit_equal(w_same, w)); // but W is updated through a different P
        }

        // The following update of the same epoch applies no policy again.
        const auto g2 = uniform<Scalar>(rng, m * r, -1, 1);
        const auto step_before = counters.step;
        optimizer.step(ctx, h, view_of(w, m, n), cview_of(g2, m, r), view_of(mm, m, r), view_of(vv, m, r), counters,
                       resample.epoch(4), ws.get());
        CHECK(counters.step == step_before + 1);
        CHECK(counters.epoch == 1);
    }
}

// ===================================================================================== validation

TEST_CASE_TEMPLATE("subspace_adamw::step rejects bad hyper-parameters, shapes and workspace, and changes nothing "
                   "when it throws",
                   Cfg, COMPACT_TEST_CONFIGS)
{
    using Backend = typename Cfg::backend;
    using Scalar = typename Cfg::scalar;
    using State = typename Cfg::state;
    using doctest::Contains;
    const typename Backend::context ctx{};
    constexpr index_t m = 6, n = 20, r = 5;
    const compact::input_projection<Scalar, Backend> projection(n, r, compact::distribution::gaussian, 1, 2);
    const compact::subspace_adamw<Scalar, Backend, State> optimizer(m, projection, compact::moment_policy::transfer);

    // Buffers one row and one column larger than needed, so every wrong-shaped view stays in bounds.
    std::mt19937_64 rng(0xbad);
    auto w = uniform<Scalar>(rng, (m + 1) * (n + 1), -1, 1);
    auto g = uniform<Scalar>(rng, (m + 1) * (r + 1), -1, 1);
    std::vector<State> mm((m + 1) * (r + 1), State(0)), vv((m + 1) * (r + 1), State(0));
    compact::adam_counters counters;
    workspace_buffer ws(optimizer.workspace_bytes());
    const auto good = default_hyper();
    auto step = [&](const compact::adamw_params& h, compact::matrix_view<Scalar> wv, compact::const_matrix_view<Scalar> gv,
                    compact::matrix_view<State> mv, compact::matrix_view<State> vv_, std::uint64_t epoch,
                    compact::workspace space) { optimizer.step(ctx, h, wv, gv, mv, vv_, counters, epoch, space); };
    auto W = [&] { return view_of(w, m, n); };
    auto G = [&] { return cview_of(g, m, r); };
    auto M = [&] { return view_of(mm, m, r); };
    auto V = [&] { return view_of(vv, m, r); };

    // Two valid steps (with an epoch change) so that the state is not trivially zero.
    step(good, W(), G(), M(), V(), 0, ws.get());
    step(good, W(), G(), M(), V(), 1, ws.get());
    const auto w0 = w, g0 = g;
    const auto m0 = mm, v0 = vv;
    const auto c0 = counters;
    auto unchanged = [&] {
        return bit_equal(w, w0) && bit_equal(g, g0) && bit_equal(mm, m0) && bit_equal(vv, v0) && counters.step == c0.step &&
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
    }
    SUBCASE("shapes")
    {
        CHECK_THROWS_WITH_AS(step(good, view_of(w, m, n + 1), G(), M(), V(), 2, ws.get()),
                             Contains("subspace_adamw::step: W is (6, 21)"), compact::error);
        CHECK(unchanged());
        CHECK_THROWS_WITH_AS(step(good, view_of(w, m + 1, n), G(), M(), V(), 2, ws.get()),
                             Contains("subspace_adamw::step: W is (7, 20)"), compact::error);
        CHECK(unchanged());
        CHECK_THROWS_WITH_AS(step(good, W(), cview_of(g, m, r + 1), M(), V(), 2, ws.get()),
                             Contains("subspace_adamw::step: G_sub is (6, 6)"), compact::error);
        CHECK(unchanged());
        CHECK_THROWS_WITH_AS(step(good, W(), G(), view_of(mm, m + 1, r), V(), 2, ws.get()),
                             Contains("subspace_adamw::step: M is (7, 5)"), compact::error);
        CHECK(unchanged());
        CHECK_THROWS_WITH_AS(step(good, W(), G(), M(), view_of(vv, m, r - 1), 2, ws.get()),
                             Contains("subspace_adamw::step: V is (6, 4)"), compact::error);
        CHECK(unchanged());
        // A view whose ld is smaller than its cols is malformed, whatever its shape claims.
        CHECK_THROWS_WITH_AS(step(good, W(), G(), compact::matrix_view<State>(mm.data(), m, r, r - 1), V(), 2, ws.get()),
                             Contains("M has ld=4"), compact::error);
        CHECK(unchanged());
        CHECK_THROWS_WITH_AS(step(good, compact::matrix_view<Scalar>(nullptr, m, n), G(), M(), V(), 2, ws.get()),
                             Contains("W is null"), compact::error);
        CHECK(unchanged());
        // A kept P of the wrong shape.
        std::vector<Scalar> p((n + 1) * (r + 1), Scalar(0.5));
        CHECK_THROWS_WITH_AS(optimizer.step(ctx, good, W(), G(), M(), V(), counters, 2, ws.get(), cview_of(p, n, r + 1)),
                             Contains("subspace_adamw::step: P is (20, 6)"), compact::error);
        CHECK(unchanged());
        CHECK_THROWS_WITH_AS(optimizer.step(ctx, good, W(), G(), M(), V(), counters, 2, ws.get(), cview_of(p, n + 1, r)),
                             Contains("subspace_adamw::step: P is (21, 5)"), compact::error);
        CHECK(unchanged());
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
        auto w1 = w0;
        auto m1 = m0, v1 = v0;
        auto c1 = c0;
        CHECK_THROWS_AS(step(good, W(), G(), M(), V(), 2, compact::workspace{}), compact::error);
        step(good, W(), G(), M(), V(), 2, ws.get());
        optimizer.step(ctx, good, view_of(w1, m, n), cview_of(g0, m, r), view_of(m1, m, r), view_of(v1, m, r), c1, 2,
                       ws.get());
        CHECK(bit_equal(w, w1));
        CHECK(bit_equal(mm, m1));
        CHECK(counters.step == c1.step);
    }
    CHECK_THROWS_WITH_AS((compact::subspace_adamw<Scalar, Backend, State>(0, projection)), Contains("out=0"),
                         compact::error);
}

TEST_CASE_TEMPLATE("adamw::step rejects bad hyper-parameters and shapes, and changes nothing when it throws", Cfg,
                   COMPACT_TEST_CONFIGS)
{
    using Backend = typename Cfg::backend;
    using Scalar = typename Cfg::scalar;
    using State = typename Cfg::state;
    using doctest::Contains;
    const typename Backend::context ctx{};
    constexpr index_t rows = 4, cols = 9;
    std::mt19937_64 rng(0xadd);
    auto w = uniform<Scalar>(rng, (rows + 1) * (cols + 1), -1, 1);
    auto g = uniform<Scalar>(rng, (rows + 1) * (cols + 1), -1, 1);
    std::vector<State> mm((rows + 1) * (cols + 1), State(0)), vv((rows + 1) * (cols + 1), State(0));
    compact::adam_counters counters;
    const auto good = default_hyper();
    auto step = [&](const compact::adamw_params& h, compact::const_matrix_view<Scalar> gv, compact::matrix_view<State> mv,
                    compact::matrix_view<State> vv_) {
        compact::adamw<Backend>::step(ctx, h, view_of(w, rows, cols), gv, mv, vv_, counters);
    };
    step(good, cview_of(g, rows, cols), view_of(mm, rows, cols), view_of(vv, rows, cols));
    const auto w0 = w;
    const auto m0 = mm, v0 = vv;
    const auto c0 = counters;
    auto unchanged = [&] {
        return bit_equal(w, w0) && bit_equal(mm, m0) && bit_equal(vv, v0) && counters.step == c0.step &&
               counters.epoch == c0.epoch;
    };
    auto G = [&] { return cview_of(g, rows, cols); };
    auto M = [&] { return view_of(mm, rows, cols); };
    auto V = [&] { return view_of(vv, rows, cols); };

    auto h = good;
    h.lr = -1e-3;
    CHECK_THROWS_WITH_AS(step(h, G(), M(), V()), Contains("adamw::step: lr=-0.001 must be non-negative"),
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
    CHECK_THROWS_WITH_AS(step(good, cview_of(g, rows, cols + 1), M(), V()), Contains("adamw::step: G is (4, 10)"),
                         compact::error);
    CHECK(unchanged());
    CHECK_THROWS_WITH_AS(step(good, G(), view_of(mm, rows + 1, cols), V()), Contains("adamw::step: M is (5, 9)"),
                         compact::error);
    CHECK(unchanged());
    CHECK_THROWS_WITH_AS(step(good, G(), M(), view_of(vv, rows, cols - 1)), Contains("adamw::step: V is (4, 8)"),
                         compact::error);
    CHECK(unchanged());
}

// ================================================================================= memory queries

TEST_CASE_TEMPLATE("state_bytes and workspace_bytes", Cfg, COMPACT_TEST_CONFIGS)
{
    using Backend = typename Cfg::backend;
    using Scalar = typename Cfg::scalar;
    using State = typename Cfg::state;
    const typename Backend::context ctx{};
    constexpr index_t m = 40, n = 64, r = 16;
    const compact::input_projection<Scalar, Backend> projection(n, r, compact::distribution::gaussian, 5, 6);
    const compact::subspace_adamw<Scalar, Backend, State> keep(m, projection, compact::moment_policy::keep);
    const compact::subspace_adamw<Scalar, Backend, State> reset(m, projection, compact::moment_policy::reset);
    const compact::subspace_adamw<Scalar, Backend, State> transfer(m, projection, compact::moment_policy::transfer);

    CHECK(keep.state_bytes() == static_cast<std::size_t>(2 * m * r) * sizeof(State));
    CHECK(transfer.state_bytes() == keep.state_bytes());
    // Moments in float by default, whatever the weights' type; in double on request.
    CHECK(compact::subspace_adamw<Scalar, Backend>(m, projection).state_bytes() ==
          static_cast<std::size_t>(2 * m * r) * sizeof(float));
    CHECK(compact::subspace_adamw<Scalar, Backend, double>(m, projection).state_bytes() ==
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
            std::vector<unsigned char> memory(bytes + offset);
            const compact::workspace space{memory.data() + offset, bytes};
            std::vector<Scalar> w(m * n, Scalar(0.5)), g(m * r, Scalar(0.25));
            std::vector<State> mm(m * r, State(0)), vv(m * r, State(0));
            compact::adam_counters counters;
            const auto h = default_hyper();
            optimizer->step(ctx, h, view_of(w, m, n), cview_of(g, m, r), view_of(mm, m, r), view_of(vv, m, r), counters, 0,
                            space);
            optimizer->step(ctx, h, view_of(w, m, n), cview_of(g, m, r), view_of(mm, m, r), view_of(vv, m, r), counters, 1,
                            space);
            CHECK(counters.epoch == 1);
        }
    }

    // The identity projection needs no room for P.
    const compact::input_projection<Scalar, Backend> identity(n, n, compact::distribution::identity, 5, 6);
    const compact::subspace_adamw<Scalar, Backend, State> identity_optimizer(m, identity);
    const compact::subspace_adamw<Scalar, Backend, State> gaussian_full(
        m, compact::input_projection<Scalar, Backend>(n, n, compact::distribution::gaussian, 5, 6));
    CHECK(identity_optimizer.workspace_bytes() < gaussian_full.workspace_bytes());
}

TEST_CASE("subspace_adamw with the identity ignores epoch changes under every moment policy")
{
    // P = I never changes, so resampling must not reset or transfer its moments: every policy has to
    // give plain AdamW, bit for bit, across epoch boundaries.
    using compact::index_t;
    const index_t m = 6, n = 5;
    const compact::input_projection<double, compact::cpu> identity(n, n, compact::distribution::identity, 3, 4);
    compact::adamw_params h;
    h.lr = 1e-2;
    h.weight_decay = 0.1;
    std::vector<double> g(m * n);
    for (std::size_t i = 0; i < g.size(); ++i) g[i] = std::sin(0.7 * static_cast<double>(i) + 0.3);
    for (auto policy : {compact::moment_policy::keep, compact::moment_policy::reset, compact::moment_policy::transfer}) {
        CAPTURE(std::string(compact::to_string(policy)));
        const compact::subspace_adamw<double, compact::cpu, double> opt(m, identity, policy);
        std::vector<double> w(m * n, 0.5), w_plain(m * n, 0.5), mo(m * n), vo(m * n), mp(m * n), vp(m * n);
        std::vector<unsigned char> ws(opt.workspace_bytes());
        compact::adam_counters c{}, cp{};
        for (std::uint64_t update = 0; update < 7; ++update) {
            opt.step({}, h, compact::make_view(w.data(), m, n), compact::make_view<const double>(g.data(), m, n),
                     compact::make_view(mo.data(), m, n), compact::make_view(vo.data(), m, n), c,
                     compact::resampling{2}.epoch(update), {ws.data(), ws.size()});
            compact::adamw<compact::cpu>::step({}, h, compact::make_view(w_plain.data(), m, n),
                                              compact::make_view<const double>(g.data(), m, n),
                                              compact::make_view(mp.data(), m, n), compact::make_view(vp.data(), m, n), cp);
        }
        CHECK(c.step == 7);
        CHECK(w == w_plain);
        CHECK(mo == mp);
    }
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

// Scalar = float weights and gradients, State = double moments and master. lr = 5e-9 with weights in
// [0.5, 1), where half an ulp of float is 2^-25 = 3.0e-8: Adam's step |eta_t M / (sqrt(V) + eps)| is
// at most about 3.2 lr = 1.6e-8 (transformers-style bias correction), so every update of a float W is
// rounded away, while the master accumulates them: 2000 steps move it by about 1e-5 (170 float ulps).
TEST_CASE("adamw::step with a double master beside float weights tracks float64 where float alone stalls")
{
    using Backend = compact::cpu;
    const Backend::context ctx{};
    constexpr index_t rows = 7, cols = 19, size = rows * cols;
    constexpr int steps = 2000;
    std::mt19937_64 rng(0xa57e);
    const auto w_start = uniform<float>(rng, size, 0.5, 1.0);
    const auto base = drift_base(rng, size);
    auto h = default_hyper();
    h.lr = 5e-9;
    h.weight_decay = 0.1;

    auto w = w_start, w_plain = w_start;
    std::vector<double> master(w_start.begin(), w_start.end()); // the caller's initialisation
    std::vector<double> m(size, 0.0), v(size, 0.0), m_plain(size, 0.0), v_plain(size, 0.0);
    compact::adam_counters counters, counters_plain;
    const auto start = to_double(w_start);
    auto w_ref = start;
    reference_adam ref(static_cast<std::size_t>(size));
    for (int s = 0; s < steps; ++s) {
        const auto g = drifting_gradient(rng, base);
        compact::adamw<Backend>::step(ctx, h, view_of(w, rows, cols), cview_of(g, rows, cols), view_of(m, rows, cols),
                                      view_of(v, rows, cols), counters, view_of(master, rows, cols));
        compact::adamw<Backend>::step(ctx, h, view_of(w_plain, rows, cols), cview_of(g, rows, cols),
                                      view_of(m_plain, rows, cols), view_of(v_plain, rows, cols), counters_plain);
        reference_adamw_step(h, w_ref, to_double(g), ref);
    }
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
TEST_CASE("subspace_adamw::step with a double master beside float weights tracks float64 where float alone stalls")
{
    using Backend = compact::cpu;
    const Backend::context ctx{};
    constexpr index_t m = 8, n = 24, r = 6;
    constexpr int steps = 2000;
    constexpr std::uint64_t epoch = 3;
    const compact::input_projection<float, Backend> projection(n, r, compact::distribution::gaussian, 0x3a57e5, 9);
    const compact::subspace_adamw<float, Backend, double> optimizer(m, projection);
    std::vector<double> p_ref = reference_projection(projection.spec(epoch));
    for (auto& x : p_ref) x = static_cast<double>(static_cast<float>(x));

    std::mt19937_64 rng(0x5ab5);
    const auto w_start = uniform<float>(rng, m * n, 0.5, 1.0);
    const auto base = drift_base(rng, m * r);
    auto h = default_hyper();
    h.lr = 2e-9;
    h.alpha = 1.0;
    h.weight_decay = 0.1;

    auto w = w_start, w_plain = w_start, w_kept = w_start;
    std::vector<double> master(w_start.begin(), w_start.end()), master_kept = master;
    std::vector<double> mm(m * r, 0.0), vv(m * r, 0.0), mm_plain = mm, vv_plain = vv, mm_kept = mm, vv_kept = vv;
    compact::adam_counters counters, counters_plain, counters_kept;
    workspace_buffer ws(optimizer.workspace_bytes(true)), ws_plain(optimizer.workspace_bytes());
    std::vector<float> p_kept(n * r);
    Backend::generate_projection<float>(ctx, projection.spec(epoch), 0, 0, view_of(p_kept, n, r));
    const auto start = to_double(w_start);
    auto w_ref = start;
    reference_adam ref(static_cast<std::size_t>(m * r));
    for (int s = 0; s < steps; ++s) {
        const auto g = drifting_gradient(rng, base);
        optimizer.step(ctx, h, view_of(w, m, n), cview_of(g, m, r), view_of(mm, m, r), view_of(vv, m, r), counters, epoch,
                       ws.get(), {}, view_of(master, m, n));
        optimizer.step(ctx, h, view_of(w_kept, m, n), cview_of(g, m, r), view_of(mm_kept, m, r), view_of(vv_kept, m, r),
                       counters_kept, epoch, ws.get(), cview_of(p_kept, n, r), view_of(master_kept, m, n));
        optimizer.step(ctx, h, view_of(w_plain, m, n), cview_of(g, m, r), view_of(mm_plain, m, r),
                       view_of(vv_plain, m, r), counters_plain, epoch, ws_plain.get());
        reference_subspace_step(h, w_ref, to_double(g), p_ref, m, n, r, ref);
    }
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

TEST_CASE("subspace_adamw with the identity and a master is adamw::step with that master, bit for bit")
{
    using Backend = compact::cpu;
    const Backend::context ctx{};
    constexpr index_t m = 5, n = 11;
    const compact::input_projection<float, Backend> identity(n, n, compact::distribution::identity, 1, 2);
    const compact::subspace_adamw<float, Backend, double> optimizer(m, identity);
    CHECK(optimizer.workspace_bytes(true) == 0);
    std::mt19937_64 rng(0x1de);
    const auto w_start = uniform<float>(rng, m * n, -1, 1);
    auto w = w_start, w_plain = w_start;
    std::vector<double> master(w_start.begin(), w_start.end()), master_plain = master;
    std::vector<double> mo(m * n, 0.0), vo = mo, mp = mo, vp = mo;
    compact::adam_counters c, cp;
    auto h = default_hyper();
    h.lr = 1e-7;
    for (int s = 0; s < 50; ++s) {
        const auto g = uniform<float>(rng, m * n, -1, 1);
        optimizer.step(ctx, h, view_of(w, m, n), cview_of(g, m, n), view_of(mo, m, n), view_of(vo, m, n), c,
                       static_cast<std::uint64_t>(s / 7), {}, {}, view_of(master, m, n));
        compact::adamw<Backend>::step(ctx, h, view_of(w_plain, m, n), cview_of(g, m, n), view_of(mp, m, n),
                                      view_of(vp, m, n), cp, view_of(master_plain, m, n));
    }
    CHECK(bit_equal(master, master_plain));
    CHECK(bit_equal(w, w_plain));
    CHECK(bit_equal(mo, mp));
    CHECK(!bit_equal(w, w_start));
}

TEST_CASE("master weights: wrong shapes, a null master and a workspace sized without it are refused, "
          "changing nothing")
{
    using Backend = compact::cpu;
    using doctest::Contains;
    const Backend::context ctx{};
    constexpr index_t m = 4, n = 10, r = 3;
    const compact::input_projection<float, Backend> projection(n, r, compact::distribution::gaussian, 4, 5);
    const compact::subspace_adamw<float, Backend, double> optimizer(m, projection);
    std::mt19937_64 rng(0xe11);
    auto w = uniform<float>(rng, (m + 1) * (n + 1), -1, 1);
    const auto g = uniform<float>(rng, (m + 1) * (n + 1), -1, 1);
    std::vector<double> mm((m + 1) * (n + 1), 0.0), vv = mm, master((m + 1) * (n + 1), 0.25);
    compact::adam_counters counters;
    workspace_buffer ws(optimizer.workspace_bytes(true));
    const auto h = default_hyper();
    const auto w0 = w;
    const auto master0 = master;
    auto unchanged = [&] { return bit_equal(w, w0) && bit_equal(master, master0) && counters.step == 0; };

    auto sub = [&](compact::matrix_view<double> mv, compact::workspace space) {
        optimizer.step(ctx, h, view_of(w, m, n), cview_of(g, m, r), view_of(mm, m, r), view_of(vv, m, r), counters, 0,
                       space, {}, mv);
    };
    CHECK(optimizer.workspace_bytes(true) > optimizer.workspace_bytes());
    CHECK(optimizer.workspace_bytes(true) >=
          optimizer.workspace_bytes() + static_cast<std::size_t>(m * r + n * r) * sizeof(double) -
              static_cast<std::size_t>(m * r) * sizeof(float));
    CHECK_THROWS_WITH_AS(sub(view_of(master, m, n + 1), ws.get()),
                         Contains("subspace_adamw::step: master (the master copy of W) is (4, 11) but (4, 10)"),
                         compact::error);
    CHECK(unchanged());
    CHECK_THROWS_WITH_AS(sub(view_of(master, m + 1, n), ws.get()), Contains("master (the master copy of W) is (5, 10)"),
                         compact::error);
    CHECK(unchanged());
    CHECK_THROWS_WITH_AS(sub(compact::matrix_view<double>(nullptr, m, n), ws.get()),
                         Contains("subspace_adamw::step: master is null but has shape (4, 10)"), compact::error);
    CHECK(unchanged());
    std::vector<unsigned char> small(optimizer.workspace_bytes());
    CHECK_THROWS_WITH_AS(sub(view_of(master, m, n), compact::workspace{small.data(), small.size()}),
                         Contains("subspace_adamw::step: workspace holds"), compact::error);
    CHECK(unchanged());

    auto plain = [&](compact::matrix_view<double> mv) {
        compact::adamw<Backend>::step(ctx, h, view_of(w, m, n), cview_of(g, m, n), view_of(mm, m, n), view_of(vv, m, n),
                                      counters, mv);
    };
    CHECK_THROWS_WITH_AS(plain(view_of(master, m, n - 1)), Contains("adamw::step: master (the master copy of W) is (4, 9)"),
                         compact::error);
    CHECK(unchanged());
    CHECK_THROWS_WITH_AS(plain(compact::matrix_view<double>(nullptr, 1, 1)), Contains("adamw::step: master is null"),
                         compact::error);
    CHECK(unchanged());
    // The right shapes go through.
    CHECK_NOTHROW(sub(view_of(master, m, n), ws.get()));
    CHECK(counters.step == 1);
}
