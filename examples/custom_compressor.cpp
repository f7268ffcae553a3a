// custom_compressor: a compressor of your own, in one header's worth of code, trained by linear_layer.
//
// A compressor (compact/compress/compressor.hpp) decides what a linear layer keeps of its input X (N, n)
// for backward and how it turns that into the weight gradient. The layer computes Y, dX and db itself
// and asks the compressor for nothing else, so a new method from the literature is one type. This one
// keeps a strided sample of X's rows:
//
//   strided_rows<S>: forward keeps rows o, o + S, o + 2S, ... of X (about N / S rows), with the offset o
//   drawn uniformly from [0, S) per update (Philox, keyed by seed, layer id and update count); backward
//   forms G^ = S dY_o^T X_o (m, n) from the same rows of dY. Every row of X is in exactly one of the S
//   samples, so the mean of G^ over o is exactly G = dY^T X: the estimate is unbiased, at 1/S of the
//   saved bytes. (WTA-CRS samples rows by importance instead; this is its uniform baseline.)
//
// It uses only backend primitives (axpby to copy the rows, gemm, fill), so it runs on every backend, and
// its full-shape gradient trains with plain AdamW (subspace = false). The program
//   1. checks the compressor against the concept (compile time) and its unbiasedness exactly: the mean of
//      G^ over the S offsets equals dY^T X in double to 1e-12;
//   2. trains a two-layer regression with the first layer's input compressed this way and uncompressed,
//      from the same start, and prints both losses;
//   3. saves and restores the compressed layer through a checkpoint (the stride is a configuration field
//      that a loading layer must match).
// It exits non-zero if a check fails, so it doubles as a test (CTest runs it with --smoke).
//
// Usage: custom_compressor [--smoke]
#include <compact/compact.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

// ------------------------------------------------------------------------------ the compressor

template <class Scalar, class Backend>
class strided_rows_compressor;

/// The layer Policy: keep every stride-th row.
struct strided_rows {
    compact::index_t stride = 4;

    template <class Scalar, class Backend>
    using compressor = strided_rows_compressor<Scalar, Backend>;
};

template <class Scalar, class Backend>
class strided_rows_compressor {
public:
    using scalar_type = Scalar;
    using backend_type = Backend;
    using context = typename Backend::context;
    using index_t = compact::index_t;
    struct saved_type : compact::saved_activation {
        index_t offset = 0; // o: the first kept row
    };
    static constexpr const char* name = "strided_rows";
    static constexpr bool subspace = false;

    strided_rows_compressor(const compact::compressor_setup& setup, const strided_rows& policy)
        : in_(setup.in), stride_(policy.stride), seed_(setup.seed), layer_(setup.layer)
    {
        COMPACT_REQUIRE(setup.in >= 1, setup.where, "in=", setup.in, " must be positive");
        COMPACT_REQUIRE(policy.stride >= 1 && policy.stride <= 4096, setup.where, "strided_rows stride=", policy.stride,
                        " must be in [1, 4096]");
    }

    index_t in() const noexcept { return in_; }
    index_t gradient_cols() const noexcept { return in_; }
    index_t stride() const noexcept { return stride_; }

    /// Rows kept of N, for any offset: at most ceil(N / S).
    static index_t kept_rows(index_t rows, index_t stride, index_t offset) noexcept
    {
        return rows > offset ? (rows - offset + stride - 1) / stride : 0;
    }
    std::size_t saved_bytes(index_t rows) const
    {
        return compact::checked_bytes(kept_rows(rows, stride_, 0), in_, sizeof(Scalar),
                                                 "strided_rows::saved_bytes");
    }
    std::size_t workspace_bytes(index_t) const noexcept { return 0; }

    /// The offset of update `step`: uniform in [0, S), the same for every rerun of the step.
    index_t offset(std::uint64_t step) const noexcept
    {
        const compact::philox_counter c = compact::philox4x32(
            {{static_cast<std::uint32_t>(step), static_cast<std::uint32_t>(step >> 32),
              static_cast<std::uint32_t>(layer_), 0x57A1DEu}},
            {{static_cast<std::uint32_t>(seed_), static_cast<std::uint32_t>(seed_ >> 32)}});
        return static_cast<index_t>(c.w[0] % static_cast<std::uint32_t>(stride_));
    }

    void compress(const context& ctx, compact::const_matrix_view<Scalar> x, std::uint64_t step, saved_type& saved,
                  compact::workspace) const
    {
        constexpr const char* where = "strided_rows::compress";
        compact::validate_view(x, where, "X");
        COMPACT_REQUIRE(x.cols == in_, where, "X is ", compact::shape_string(x), " but (N, ", in_, ") is required");
        compact::check_saved_memory<Scalar>(saved, saved_bytes(x.rows), where);
        const index_t o = offset(step);
        const index_t kept = kept_rows(x.rows, stride_, o);
        if (kept > 0)
            Backend::template axpby<Scalar, Scalar>(ctx, 1.0, sample(x, o, kept),
                                                    0.0, {reinterpret_cast<Scalar*>(saved.data), kept, in_});
        saved.filled = true;
        saved.rows = x.rows;
        saved.layer = layer_;
        saved.epoch = step;
        saved.offset = o;
    }

    void weight_gradient(const context& ctx, compact::const_matrix_view<Scalar> dy, const saved_type& saved,
                         compact::matrix_view<Scalar> g, compact::write_mode mode, compact::workspace) const
    {
        constexpr const char* where = "strided_rows::weight_gradient";
        compact::validate_view(dy, where, "dY");
        compact::check_saved(saved, dy.rows, layer_, where);
        compact::validate_shape(g, dy.cols, in_, where, "G");
        COMPACT_REQUIRE(saved.offset >= 0 && saved.offset < stride_, where, "saved offset ", saved.offset,
                        " is not below the stride ", stride_);
        const bool accumulate = mode == compact::write_mode::accumulate;
        const index_t kept = kept_rows(dy.rows, stride_, saved.offset);
        if (kept == 0) {
            if (!accumulate) Backend::template fill<Scalar>(ctx, g, Scalar(0));
            return;
        }
        const compact::const_matrix_view<Scalar> x_kept(reinterpret_cast<const Scalar*>(saved.data), kept, in_);
        Backend::template gemm<Scalar>(ctx, compact::op::transpose, compact::op::none, static_cast<double>(stride_),
                                       sample(dy, saved.offset, kept), x_kept, accumulate ? 1.0 : 0.0, g);
    }

    std::vector<compact::compressor_field> checkpoint_fields() const
    {
        return {{"stride", static_cast<std::uint64_t>(stride_), false}};
    }
    void load_checkpoint_fields(const std::vector<compact::compressor_field>&, const char*) {}

private:
    /// Rows o, o + S, ... of v as a strided view (no copy).
    template <class T>
    compact::const_matrix_view<T> sample(compact::const_matrix_view<T> v, index_t o, index_t kept) const noexcept
    {
        return {v.data + o * v.ld, kept, v.cols, v.ld * stride_};
    }

    index_t in_;
    index_t stride_;
    std::uint64_t seed_;
    std::uint64_t layer_;
};

static_assert(compact::is_compressor<strided_rows_compressor<float, compact::cpu>>,
              "strided_rows_compressor must meet the compressor concept");

// ------------------------------------------------------------------------------------ the program

namespace {

using compact::index_t;
using cpu = compact::cpu;

int failures = 0;

std::size_t at(index_t i) { return static_cast<std::size_t>(i); }
template <class T>
compact::const_matrix_view<T> cview(const std::vector<T>& v, index_t rows, index_t cols)
{
    return {v.data(), rows, cols};
}
template <class T>
compact::matrix_view<T> view(std::vector<T>& v, index_t rows, index_t cols)
{
    return {v.data(), rows, cols};
}

void check(bool ok, const char* what)
{
    std::printf("  %-68s %s\n", what, ok ? "ok" : "FAILED");
    if (!ok) ++failures;
}

/// The mean of G^ over every offset equals dY^T X: unbiasedness, exactly.
void check_unbiased()
{
    const index_t rows = 103, n = 24, m = 9, stride = 5; // N not a multiple of S
    std::vector<double> x(at(rows * n)), dy(at(rows * m));
    compact::fill_uniform(view(x, rows, n), -1.0, 1.0, 11, 0);
    compact::fill_uniform(view(dy, rows, m), -1.0, 1.0, 11, 1);

    compact::compressor_setup setup;
    setup.in = n;
    setup.out = m;
    setup.seed = 3;
    setup.layer = 7;
    const strided_rows_compressor<double, cpu> c(setup, strided_rows{stride});
    const cpu::context ctx{1};
    std::vector<double> mean(at(m * n), 0.0), g(mean.size());
    std::vector<double> bytes(c.saved_bytes(rows) / sizeof(double) + 1);
    std::vector<bool> seen(at(stride), false);
    using saved_type = strided_rows_compressor<double, cpu>::saved_type;
    for (std::uint64_t step = 0; std::count(seen.begin(), seen.end(), true) < stride; ++step) {
        const index_t o = c.offset(step);
        if (seen[at(o)]) continue;
        seen[at(o)] = true;
        auto saved = compact::bind_saved<saved_type>(bytes.data(), bytes.size() * sizeof(double));
        c.compress(ctx, cview(x, rows, n), step, saved, {});
        c.weight_gradient(ctx, cview(dy, rows, m), saved, view(g, m, n), compact::write_mode::overwrite, {});
        for (std::size_t k = 0; k < g.size(); ++k) mean[k] += g[k] / static_cast<double>(stride);
    }
    double err = 0, norm = 0;
    for (index_t i = 0; i < m; ++i)
        for (index_t j = 0; j < n; ++j) {
            double exact = 0;
            for (index_t r = 0; r < rows; ++r) exact += dy[at(r * m + i)] * x[at(r * n + j)];
            err = std::max(err, std::abs(mean[at(i * n + j)] - exact));
            norm = std::max(norm, std::abs(exact));
        }
    std::printf("  mean over the %lld offsets vs dY^T X: max relative error %.2e\n", static_cast<long long>(stride),
                err / norm);
    check(err <= 1e-12 * norm, "unbiased: mean of G^ over all offsets equals dY^T X (1e-12)");
}

/// y = tanh(x A) b on synthetic data; a two-layer model with the first layer's input compressed.
template <class Policy>
double train(const Policy& policy, int steps, std::vector<double>* losses)
{
    const index_t rows = 256, n = 32, hidden = 48;
    const cpu::context ctx{1};
    compact::linear_options o1, o2;
    o1.max_rows = o2.max_rows = rows;
    o1.seed = o2.seed = 5;
    o1.layer = 1;
    o2.layer = 2;
    compact::linear_layer<double, Policy, cpu> fc1(compact::in_features{n}, compact::out_features{hidden}, o1, policy);
    compact::linear_layer<double, compact::rank::full, cpu> fc2(compact::in_features{hidden}, compact::out_features{1},
                                                                o2);
    compact::fill_uniform(fc1.weight(), -0.3, 0.3, 21, 0);
    compact::fill_uniform(fc2.weight(), -0.3, 0.3, 21, 1);

    std::vector<double> a(at(n)), x(at(rows * n)), target(at(rows));
    compact::fill_uniform(view(a, 1, n), -1.0, 1.0, 9, 0);
    std::vector<double> h(at(rows * hidden)), act(h.size()), y(at(rows)), dy(y.size()), dact(h.size());
    compact::adamw_params hyper;
    hyper.lr = 1e-2;
    double loss = 0;
    for (int step = 0; step < steps; ++step) {
        compact::fill_uniform(view(x, rows, n), -1.0, 1.0, 10, static_cast<std::uint64_t>(step));
        for (index_t r = 0; r < rows; ++r) {
            double s = 0;
            for (index_t j = 0; j < n; ++j) s += x[at(r * n + j)] * a[at(j)];
            target[at(r)] = std::tanh(s);
        }
        fc1.forward(ctx, cview(x, rows, n), view(h, rows, hidden));
        for (std::size_t k = 0; k < h.size(); ++k) act[k] = std::tanh(h[k]);
        fc2.forward(ctx, cview(act, rows, hidden), view(y, rows, 1));
        loss = 0;
        for (std::size_t k = 0; k < y.size(); ++k) {
            const double d = y[k] - target[k];
            loss += d * d / static_cast<double>(rows);
            dy[k] = 2 * d / static_cast<double>(rows);
        }
        fc2.backward(ctx, cview(dy, rows, 1), view(dact, rows, hidden));
        for (std::size_t k = 0; k < h.size(); ++k) dact[k] *= 1 - act[k] * act[k];
        fc1.backward(ctx, cview(dact, rows, hidden), {});
        fc1.step(ctx, hyper);
        fc2.step(ctx, hyper);
        if (losses) losses->push_back(loss);
    }
    return loss;
}

void check_checkpoint()
{
    const cpu::context ctx{1};
    compact::linear_options o;
    o.max_rows = 16;
    o.layer = 3;
    compact::linear_layer<float, strided_rows, cpu> saved(compact::in_features{8}, compact::out_features{4}, o,
                                                          strided_rows{2});
    compact::fill_uniform(saved.weight(), -1.0, 1.0, 1, 0);
    std::vector<float> x(16 * 8, 0.5f), y(16 * 4), dy(16 * 4, 0.25f);
    saved.forward(ctx, cview(x, 16, 8), view(y, 16, 4));
    saved.backward(ctx, cview(dy, 16, 4), {});
    saved.step(ctx, compact::adamw_params{});
    const std::string path = "custom_compressor.ckpt";
    compact::save_checkpoint(path, saved);

    compact::linear_layer<float, strided_rows, cpu> same(compact::in_features{8}, compact::out_features{4}, o,
                                                         strided_rows{2});
    compact::load_checkpoint(path, same);
    check(std::equal(saved.weight().data, saved.weight().data + 32, same.weight().data) &&
              same.updates() == saved.updates(),
          "checkpoint: weights and counters restored");
    compact::linear_layer<float, strided_rows, cpu> other(compact::in_features{8}, compact::out_features{4}, o,
                                                          strided_rows{3});
    bool refused = false;
    try {
        compact::load_checkpoint(path, other);
    } catch (const compact::error& e) {
        refused = std::strstr(e.what(), "stride") != nullptr;
    }
    check(refused, "checkpoint: a layer with another stride is refused, naming 'stride'");
    compact::linear_layer<float, compact::rank::full, cpu> dense(compact::in_features{8}, compact::out_features{4}, o);
    refused = false;
    try {
        compact::load_checkpoint(path, dense);
    } catch (const compact::error& e) {
        refused = std::strstr(e.what(), "strided_rows") != nullptr;
    }
    check(refused, "checkpoint: a layer with another compressor is refused, naming it");
    std::remove(path.c_str());
}

} // namespace

int main(int argc, char** argv)
{
    const bool smoke = argc > 1 && std::strcmp(argv[1], "--smoke") == 0;
    try {
        std::printf("strided_rows: a user-written compressor (keeps 1/S of X's rows, unbiased)\n");
        check_unbiased();
        const int steps = smoke ? 60 : 300;
        std::vector<double> full_losses, sampled_losses;
        const double full = train(compact::rank::full{}, steps, &full_losses);
        const double sampled = train(strided_rows{4}, steps, &sampled_losses);
        std::printf("  after %d steps: loss %.5f uncompressed, %.5f keeping 1/4 of the rows (first %.5f)\n", steps,
                    full, sampled, sampled_losses.front());
        check(sampled < 0.5 * sampled_losses.front(), "training with strided_rows<4> at least halves the loss");
        check(sampled < 3 * full + 1e-3, "and ends within 3x of the uncompressed loss");
        check_checkpoint();
    } catch (const std::exception& e) {
        std::fprintf(stderr, "custom_compressor: %s\n", e.what());
        return 1;
    }
    std::printf("%s\n", failures == 0 ? "all checks passed" : "some checks FAILED");
    return failures == 0 ? 0 : 1;
}
