// Tests for compact/nn/compressed_linear.hpp and compact/compress/projection_source.hpp (SPEC section 2).
//
// Every numeric check compares with a float64 reference computed here with naive loops
// (tests/reference.hpp) on fresh random inputs, by the relative Frobenius error
// ||result - reference||_F / ||reference||_F, with tolerance
//   float:  1e-5  (sums of at most a few hundred products, each rounded at 2^-24 ~ 6e-8: the error
//                  grows like sqrt(length) * 6e-8 ~ 1e-6 in practice, 1e-5 leaves a 10x margin)
//   double: 1e-12 (same argument with 2^-53 ~ 1.1e-16)
// The reference P is the library's documented P (projection_element) rounded to the scalar type, i.e.
// exactly the matrix the layer multiplies by; P's own generation is tested in test_projection.cpp.
//
// One body, two backends: each generic body runs for every configuration in COMPACT_TEST_CONFIGS of the
// backend under test (tests/backend_under_test.hpp): the CPU backend in this .cpp build, the CUDA
// backend in tests/cuda/test_cuda_compressed_linear.cu, which includes this file (its cases skip
// without a GPU). Inputs and float64 references stay on the host; what the library reads and writes is
// uploaded to the backend's memory (padding included), and outputs are downloaded before any check.
// On CUDA the float GEMMs are cuBLAS's (CUBLAS_COMPUTE_32F, in its own summation order, which may
// change with the operands' leading dimensions) and device code contracts a*b+c into FMAs, so a result
// is compared with a host computation within the tolerances above, and bit for bit only with another run
// of the library on the same backend with the same layouts, or where it is exact (the identity's
// copies). Only the thread-count runs (cpu::context{threads}) are CPU-only.
#include "backend_under_test.hpp"

#include <compact/random/projection.hpp>
#include <compact/core/rank_policy.hpp>
#include <compact/nn/compressed_linear.hpp>
#include <compact/compress/projection_source.hpp>

#include <doctest/doctest.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

using compact_test::contains;
using compact_test::error_message_of;

using compact::distribution;
using compact::index_t;
using compact::write_mode;
using compact_test::dmatrix;
using compact_test::host_matrix;

template <class T>
constexpr double tolerance = sizeof(T) == 4 ? 1e-5 : 1e-12;

/// The layer's P for `epoch` in float64, after rounding to T (what the layer multiplies by).
template <class T>
dmatrix reference_projection(const compact::projection_spec& spec)
{
    dmatrix p(spec.n, spec.r);
    for (index_t i = 0; i < spec.n; ++i)
        for (index_t j = 0; j < spec.r; ++j)
            p(i, j) = static_cast<double>(static_cast<T>(compact::projection_element(spec, i, j)));
    return p;
}

/// Y = X W^T + b in float64.
dmatrix reference_forward(const dmatrix& x, const dmatrix& w, const std::vector<double>* b)
{
    dmatrix y = compact_test::matmul(x, compact_test::transpose(w));
    if (b)
        for (index_t i = 0; i < y.rows; ++i)
            for (index_t j = 0; j < y.cols; ++j) y(i, j) += (*b)[static_cast<std::size_t>(j)];
    return y;
}

std::vector<double> column_sums(const dmatrix& a)
{
    std::vector<double> s(static_cast<std::size_t>(a.cols), 0.0);
    for (index_t i = 0; i < a.rows; ++i)
        for (index_t j = 0; j < a.cols; ++j) s[static_cast<std::size_t>(j)] += a(i, j);
    return s;
}

template <class T>
std::vector<double> to_double(const std::vector<T>& v)
{
    return std::vector<double>(v.begin(), v.end());
}

template <class T>
bool bit_identical(const host_matrix<T>& a, const host_matrix<T>& b)
{
    if (a.rows != b.rows || a.cols != b.cols) return false;
    for (index_t i = 0; i < a.rows; ++i)
        for (index_t j = 0; j < a.cols; ++j) {
            const T x = a(i, j), y = b(i, j);
            if (std::memcmp(&x, &y, sizeof(T)) != 0) return false;
        }
    return true;
}

template <class T>
bool bit_identical(const std::vector<T>& a, const std::vector<T>& b)
{
    return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

/// Two library results of the same computation into outputs of different leading dimensions. The CPU
/// backend's sums do not depend on ld: bit for bit. cuBLAS may pick another kernel (another summation
/// order) for another ld or alignment: there they agree to the tolerance. (Outputs of the same layout
/// are compared with bit_identical on every backend.)
template <class T>
bool same_result_any_ld(const host_matrix<T>& a, const host_matrix<T>& b)
{
#if COMPACT_TEST_CUDA_BUILD
    return compact_test::rel_error(a.to_double(), b.to_double()) < tolerance<T>;
#else
    return bit_identical(a, b);
#endif
}

/// A fresh (zero, NaN-padded) host matrix with the shape and leading dimension of `a`.
template <class T>
host_matrix<T> same_layout(const host_matrix<T>& a)
{
    return host_matrix<T>(a.rows, a.cols, a.ld - a.cols);
}

/// Checks that `f` throws compact::error whose message contains every fragment.
#define CHECK_COMPACT_ERROR(call, ...)                                                                     \
    do {                                                                                                   \
        const std::string message_ = error_message_of([&] { call; });                                     \
        for (const char* fragment_ : {__VA_ARGS__})                                                        \
            CHECK_MESSAGE(message_.find(fragment_) != std::string::npos,                                  \
                          "`" #call "` -> \"" << message_ << "\" lacks \"" << std::string(fragment_) << "\"");          \
    } while (false)

struct shape {
    index_t rows; // N
    index_t in;   // n
    index_t out;  // m
    index_t rank; // r
    index_t pad;  // extra columns of ld on every operand (0: dense); operands use pad, pad+1, ...
};

/// Backend memory for what a forward keeps: at least `bytes` bytes, as Scalars (so aligned for the
/// scalar and for float), zero-filled.
template <class T, class B>
compact_test::device_array<B, T> saved_storage(const compact_test::device<B>& dev, std::size_t bytes)
{
    return dev.upload(std::vector<T>((bytes + sizeof(T) - 1) / sizeof(T)));
}

/// A layer's (or group's) saved_type over `storage`, sized for `rows` rows.
template <class Layer, class B, class T>
typename Layer::saved_type bind_saved(const Layer& layer, compact_test::device_array<B, T>& storage, index_t rows)
{
    COMPACT_TEST_EXPECT(storage.size() * sizeof(T) >= layer.saved_bytes(rows));
    return compact::bind_saved<typename Layer::saved_type>(storage.data(), layer.saved_bytes(rows));
}

/// Z (N, r) of a saved activation, downloaded (dense: Z is the first N r Scalars of the saved bytes).
template <class B, class Compressor>
host_matrix<typename Compressor::scalar_type> read_z(const compact_test::device<B>& dev, const Compressor& c,
                                                     const typename Compressor::saved_type& saved)
{
    using T = typename Compressor::scalar_type;
    const compact::const_matrix_view<T> z = c.z(saved);
    host_matrix<T> h(z.rows, z.cols);
    const std::vector<T> dense = dev.read(z);
    h.data = dense;
    return h;
}

/// All host buffers of one forward + backward, with random inputs, and (after run_layer) the results of
/// running the layer, downloaded. Z is dense (no padding): it is the front of the saved bytes.
template <class T>
struct problem {
    shape s;
    host_matrix<T> x, w, y, z, dy, dx, g_sub;
    std::vector<T> b, db;

    problem(const shape& sh, std::mt19937_64& rng)
        : s(sh), x(sh.rows, sh.in, sh.pad), w(sh.out, sh.in, sh.pad ? sh.pad + 1 : 0),
          y(sh.rows, sh.out, sh.pad ? sh.pad + 2 : 0), z(sh.rows, sh.rank),
          dy(sh.rows, sh.out, sh.pad ? sh.pad + 4 : 0), dx(sh.rows, sh.in, sh.pad ? sh.pad + 5 : 0),
          g_sub(sh.out, sh.rank, sh.pad ? sh.pad + 6 : 0), b(static_cast<std::size_t>(sh.out)),
          db(static_cast<std::size_t>(sh.out))
    {
        x.randomize(rng);
        w.randomize(rng, -0.5, 0.5);
        dy.randomize(rng);
        compact_test::random_fill(b, rng);
    }

    bool outputs_padding_intact() const
    {
        return y.padding_intact() && z.padding_intact() && dx.padding_intact() && g_sub.padding_intact();
    }
};

/// A problem's buffers in the backend's memory (same shapes, leading dimensions and NaN padding), and
/// the memory forward saves into.
template <class B, class T>
struct device_problem {
    compact_test::device_matrix<B, T> x, w, y, dy, dx, g_sub;
    compact_test::device_array<B, T> b, db, saved;

    device_problem(const compact_test::device<B>& dev, const problem<T>& p)
        : x(dev.upload(p.x)), w(dev.upload(p.w)), y(dev.upload(p.y)), dy(dev.upload(p.dy)), dx(dev.upload(p.dx)),
          g_sub(dev.upload(p.g_sub)), b(dev.upload(p.b)), db(dev.upload(p.db)),
          saved(saved_storage<T>(dev, static_cast<std::size_t>(p.z.rows * p.z.cols) * sizeof(T)))
    {
    }

    compact::const_matrix_view<T> bias() const { return b.cview(1, static_cast<index_t>(b.size())); }
    compact::layer_gradient<T> gradients() { return {g_sub.view(), db.view(1, static_cast<index_t>(db.size()))}; }

    /// Copies Y, Z, dX, G_sub and db back into `p` (after waiting for dev's stream).
    template <class Layer>
    void download_outputs(const compact_test::device<B>& dev, const Layer& layer,
                          const typename Layer::saved_type& kept, problem<T>& p) const
    {
        p.y = dev.download(y);
        p.z = read_z(dev, layer.compressor(), kept);
        p.dx = dev.download(dx);
        p.g_sub = dev.download(g_sub);
        p.db = dev.download(db);
    }
};

/// Uploads `p`, runs forward (Z with P of the layer's epoch for `step`) and backward on `ctx`, and
/// downloads the outputs into `p`. `ctx` is dev.ctx() except for the CPU thread-count runs. Returns the
/// gradients' record (their epoch).
template <class B, class T, class Layer>
compact::layer_gradient<T> run_layer(const compact_test::device<B>& dev, const Layer& layer, problem<T>& p,
                                     std::uint64_t step, const typename Layer::context& ctx)
{
    device_problem<B, T> d(dev, p);
    auto ws = dev.workspace(layer.workspace_bytes(p.s.rows));
    auto saved = bind_saved(layer, d.saved, p.s.rows);
    layer.forward(ctx, d.x.cview(), d.w.cview(), d.bias(), d.y.view(), saved, step, ws.get());
    compact::layer_gradient<T> grads = d.gradients();
    layer.backward(ctx, d.dy.cview(), d.w.cview(), saved, d.dx.view(), grads, ws.get());
    d.download_outputs(dev, layer, saved, p);
    return {{}, {}, grads.epoch, grads.written};
}

template <class B, class T, class Layer>
compact::layer_gradient<T> run_layer(const compact_test::device<B>& dev, const Layer& layer, problem<T>& p,
                                     std::uint64_t step)
{
    return run_layer(dev, layer, p, step, dev.ctx());
}

/// The gradient record of a backward under `epoch`, over G_sub (for expand_gradient with an arbitrary
/// G_sub).
template <class T>
compact::layer_gradient<T> gradient_of_epoch(compact::matrix_view<T> g_sub, std::uint64_t epoch)
{
    compact::layer_gradient<T> g{g_sub};
    g.epoch = epoch;
    g.written = true;
    return g;
}

} // namespace

// ------------------------------------------------------------------------------------------------ numerics

TEST_CASE_TEMPLATE("forward and backward match the float64 reference" COMPACT_TEST_ON_DEVICE, C, COMPACT_TEST_CONFIGS)
{
    using T = typename C::scalar;
    using B = typename C::backend;
    using layer_t = compact::compressed_linear<T, compact::rank::fixed, B>;
    compact_test::device<B> dev;
    const auto& ctx = dev.ctx();
    // Odd sizes, N = 1, r = 1, r = n, and every operand padded (ld > cols) in the padded variants.
    const shape shapes[] = {{33, 17, 9, 5, 0},   {33, 17, 9, 5, 1},   {1, 40, 13, 10, 0},   {1, 40, 13, 10, 3},
                            {64, 64, 64, 32, 0}, {129, 31, 47, 31, 2}, {7, 5, 3, 1, 1},      {200, 96, 130, 12, 0},
                            {200, 96, 130, 12, 5}, {2, 1, 1, 1, 1}};
    auto rng = compact_test::make_rng(7001);
    for (distribution dist : {distribution::gaussian, distribution::rademacher}) {
        for (const auto& s : shapes) {
            CAPTURE(std::string(compact::to_string(dist)));
            CAPTURE(s.rows);
            CAPTURE(s.in);
            CAPTURE(s.out);
            CAPTURE(s.rank);
            CAPTURE(s.pad);
            // Resampling every update: the epoch is the step forward is given.
            const std::uint64_t epoch = rng() % 1000;
            const layer_t layer(compact::in_features{s.in}, compact::out_features{s.out}, 0x5eed, 11,
                                compact::rank::fixed{s.rank}, dist, compact::resampling{1});
            REQUIRE(layer.rank() == s.rank);
            CHECK(layer.saved_bytes(s.rows) == static_cast<std::size_t>(s.rows * s.rank) * sizeof(T));
            problem<T> p(s, rng);
            const auto record = run_layer(dev, layer, p, epoch);
            CHECK(record.written);
            CHECK(record.epoch == epoch);

            const dmatrix x = p.x.to_double(), w = p.w.to_double(), dy = p.dy.to_double();
            const auto b = to_double(p.b);
            const dmatrix proj = reference_projection<T>(layer.projection().spec(epoch));
            const dmatrix g = compact_test::matmul(compact_test::transpose(dy), x); // G = dY^T X (m, n)

            CHECK(compact_test::rel_error(p.y.to_double(), reference_forward(x, w, &b)) < tolerance<T>);
            CHECK(compact_test::rel_error(p.z.to_double(), compact_test::matmul(x, proj)) < tolerance<T>);
            CHECK(compact_test::rel_error(p.dx.to_double(), compact_test::matmul(dy, w)) < tolerance<T>);
            CHECK(compact_test::rel_error(p.g_sub.to_double(), compact_test::matmul(g, proj)) < tolerance<T>);
            CHECK(compact_test::rel_error(to_double(p.db), column_sums(dy)) < tolerance<T>);
            CHECK(p.outputs_padding_intact());

            const auto x_d = dev.upload(p.x);
            const auto w_d = dev.upload(p.w);
            const auto b_d = dev.upload(p.b);
            const auto b_view = b_d.cview(1, s.out);

            // Forward without bias and without saving (inference).
            auto y2_d = dev.upload(host_matrix<T>(s.rows, s.out, s.pad));
            layer.forward(ctx, x_d.cview(), w_d.cview(), {}, y2_d.view());
            const host_matrix<T> y2 = dev.download(y2_d);
            CHECK(compact_test::rel_error(y2.to_double(), reference_forward(x, w, nullptr)) < tolerance<T>);
            CHECK(y2.padding_intact());

            // Forward with a P the caller keeps (projection_source::keep on a copy of the layer): the
            // same Y and Z, bit for bit (Y into outputs of other leading dimensions: see
            // same_result_any_ld), with no workspace. A padded kept P (ld > cols) gives Z = X P too.
            {
                layer_t keeping = layer; // a copy of the layer regenerates P until told to keep it
                REQUIRE_FALSE(keeping.compressor().projection().keeps());
                auto kept_d = dev.upload(std::vector<T>(static_cast<std::size_t>(s.in * s.rank)));
                keeping.compressor().projection().keep(kept_d.view(s.in, s.rank));
                CHECK(keeping.workspace_bytes(s.rows) == 0);
                auto y3_d = dev.upload(host_matrix<T>(s.rows, s.out, s.pad));
                auto saved3_d = saved_storage<T>(dev, keeping.saved_bytes(s.rows));
                auto saved3 = bind_saved(keeping, saved3_d, s.rows);
                keeping.forward(ctx, x_d.cview(), w_d.cview(), b_view, y3_d.view(), saved3, epoch,
                                compact::workspace{});
                const host_matrix<T> y3 = dev.download(y3_d), z3 = read_z(dev, keeping.compressor(), saved3);
                CHECK(same_result_any_ld(y3, p.y));
                CHECK(same_result_any_ld(z3, p.z));
                // Into outputs laid out as run_layer's: bit for bit on every backend.
                auto y5_d = dev.upload(same_layout(p.y));
                auto saved5_d = saved_storage<T>(dev, keeping.saved_bytes(s.rows));
                auto saved5 = bind_saved(keeping, saved5_d, s.rows);
                keeping.forward(ctx, x_d.cview(), w_d.cview(), b_view, y5_d.view(), saved5, epoch,
                                compact::workspace{});
                CHECK(bit_identical(dev.download(y5_d), p.y));
                CHECK(bit_identical(read_z(dev, keeping.compressor(), saved5), p.z));

                // The kept storage holds P of the epoch: what generate() writes into caller memory.
                auto generated_d = dev.upload(std::vector<T>(static_cast<std::size_t>(s.in * s.rank)));
                layer.projection().generate(ctx, epoch, generated_d.view(s.in, s.rank));
                CHECK(bit_identical(dev.download(kept_d), dev.download(generated_d)));

                auto padded_p_d = dev.upload(host_matrix<T>(s.in, s.rank, 3));
                auto padded_source = layer.projection(); // a copy: keeps nothing until told to
                padded_source.keep(padded_p_d.view());
                auto z4_d = dev.upload(host_matrix<T>(s.rows, s.rank, s.pad));
                padded_source.compress(ctx, x_d.cview(), epoch, z4_d.view(), compact::workspace{});
                const host_matrix<T> z4 = dev.download(z4_d);
                CHECK(compact_test::rel_error(z4.to_double(), compact_test::matmul(x, proj)) < tolerance<T>);
                CHECK(y3.padding_intact());
                CHECK(z3.padding_intact());
                CHECK(z4.padding_intact());
                CHECK(dev.download(padded_p_d).padding_intact());
            }

            // expand_gradient: G_hat = G_sub P^T for an arbitrary G_sub (m, r) recorded under `epoch`.
            host_matrix<T> g_sub(s.out, s.rank, s.pad);
            g_sub.randomize(rng);
            auto g_sub_d = dev.upload(g_sub);
            auto g_hat_d = dev.upload(host_matrix<T>(s.out, s.in, s.pad + 1));
            auto ws = dev.workspace(layer.projection().workspace_bytes());
            layer.expand_gradient(ctx, gradient_of_epoch(g_sub_d.view(), epoch), g_hat_d.view(), ws.get());
            const host_matrix<T> g_hat = dev.download(g_hat_d);
            CHECK(compact_test::rel_error(g_hat.to_double(),
                                          compact_test::matmul(g_sub.to_double(), compact_test::transpose(proj))) <
                  tolerance<T>);
            CHECK(g_hat.padding_intact());
        }
    }
}

TEST_CASE_TEMPLATE("a layer is built from named in_features and out_features" COMPACT_TEST_ON_DEVICE, C,
                   COMPACT_TEST_CONFIGS)
{
    using T = typename C::scalar;
    using B = typename C::backend;
    using layer_t = compact::compressed_linear<T, compact::rank::ratio<1, 2>, B>;
    // (in_features, out_features) is the only order (out_features first does not compile); in and out
    // land where they belong whatever their sizes.
    static_assert(!std::is_constructible_v<layer_t, compact::out_features, compact::in_features, std::uint64_t,
                                           std::uint64_t>);
    static_assert(!std::is_constructible_v<layer_t, index_t, index_t, std::uint64_t, std::uint64_t>);
    compact_test::device<B> dev;
    const auto& ctx = dev.ctx();
    auto rng = compact_test::make_rng(7009);
    constexpr index_t N = 4, n = 10, m = 3;
    const layer_t layer(compact::in_features{n}, compact::out_features{m}, 1, 2);
    CHECK(layer.in() == n);
    CHECK(layer.out() == m);
    CHECK(layer.rank() == 5);
    CHECK(layer.projection().in() == n);
    host_matrix<T> x(N, n), w(m, n);
    x.randomize(rng);
    w.randomize(rng);
    const auto x_d = dev.upload(x);
    const auto w_d = dev.upload(w);
    auto y_d = dev.upload(host_matrix<T>(N, m));
    layer.forward(ctx, x_d.cview(), w_d.cview(), {}, y_d.view());
    CHECK(compact_test::rel_error(dev.download(y_d).to_double(), reference_forward(x.to_double(), w.to_double(),
                                                                                   nullptr)) < tolerance<T>);
    // W is (out, in): its transpose is another layer's.
    const auto wt_d = dev.upload(host_matrix<T>(n, m));
    CHECK_COMPACT_ERROR(layer.forward(ctx, x_d.cview(), wt_d.cview(), {}, y_d.view()), ": W is", "(3, 10)");
}

TEST_CASE_TEMPLATE("backward skips dX and db when asked, and handles N = 0" COMPACT_TEST_ON_DEVICE, C,
                   COMPACT_TEST_CONFIGS)
{
    using T = typename C::scalar;
    using B = typename C::backend;
    using layer_t = compact::compressed_linear<T, compact::rank::fixed, B>;
    compact_test::device<B> dev;
    const auto& ctx = dev.ctx();
    auto rng = compact_test::make_rng(7002);
    const shape s{21, 14, 6, 4, 0};
    const layer_t layer(compact::in_features{s.in}, compact::out_features{s.out}, 1, 2, compact::rank::fixed{s.rank});
    problem<T> p(s, rng);
    run_layer(dev, layer, p, 0);
    const host_matrix<T> g_full = p.g_sub;
    const auto x_d = dev.upload(p.x);
    const auto dy_d = dev.upload(p.dy);
    const auto w_d = dev.upload(p.w);
    const auto b_d = dev.upload(p.b);
    auto ws = dev.workspace(layer.workspace_bytes(s.rows));
    // The saved activation of run_layer's forward, again: forward is deterministic (the same Z, bit for bit).
    auto saved_d = saved_storage<T>(dev, layer.saved_bytes(s.rows));
    auto saved = bind_saved(layer, saved_d, s.rows);
    {
        auto y_d = dev.upload(host_matrix<T>(s.rows, s.out));
        layer.forward(ctx, x_d.cview(), w_d.cview(), b_d.cview(1, s.out), y_d.view(), saved, 0, ws.get());
        CHECK(bit_identical(read_z(dev, layer.compressor(), saved), p.z));
    }
    // Skip dX (empty view) and db (empty bias view): G_sub is the same (the same GEMM, in the same layout).
    p.g_sub.fill(T(-3));
    {
        auto g_d = dev.upload(p.g_sub);
        compact::layer_gradient<T> grads{g_d.view(), {}};
        layer.backward(ctx, dy_d.cview(), w_d.cview(), saved, {}, grads, ws.get());
        CHECK(grads.written);
        p.g_sub = dev.download(g_d);
    }
    CHECK(bit_identical(p.g_sub, g_full));

    // N = 0: forward is a no-op (with no saved memory at all: saved_bytes(0) = 0); overwrite gives zero
    // gradients, accumulate leaves them unchanged.
    const auto x0 = dev.upload(host_matrix<T>(0, s.in));
    auto y0 = dev.upload(host_matrix<T>(0, s.out));
    const auto dy0 = dev.upload(host_matrix<T>(0, s.out));
    auto dx0 = dev.upload(host_matrix<T>(0, s.in));
    CHECK(layer.saved_bytes(0) == 0);
    auto saved0 = compact::bind_saved<typename layer_t::saved_type>(nullptr, 0);
    layer.forward(ctx, x0.cview(), w_d.cview(), b_d.cview(1, s.out), y0.view(), saved0, 0, ws.get());
    CHECK(saved0.filled);
    CHECK(saved0.rows == 0);
    layer.forward(ctx, x0.cview(), w_d.cview(), b_d.cview(1, s.out), y0.view()); // inference: a no-op too
    host_matrix<T> g(s.out, s.rank);
    std::vector<T> db(static_cast<std::size_t>(s.out), T(5));
    g.fill(T(7));
    auto g_d = dev.upload(g);
    auto db_d = dev.upload(db);
    compact::layer_gradient<T> grads{g_d.view(), db_d.view(1, s.out)};
    layer.backward(ctx, dy0.cview(), w_d.cview(), saved0, dx0.view(), grads, ws.get(), write_mode::accumulate);
    g = dev.download(g_d);
    db = dev.download(db_d);
    bool unchanged = true;
    for (index_t i = 0; i < s.out; ++i)
        for (index_t j = 0; j < s.rank; ++j) unchanged = unchanged && g(i, j) == T(7);
    for (T v : db) unchanged = unchanged && v == T(5);
    CHECK(unchanged);
    layer.backward(ctx, dy0.cview(), w_d.cview(), saved0, dx0.view(), grads, ws.get());
    g = dev.download(g_d);
    db = dev.download(db_d);
    bool zero = true;
    for (index_t i = 0; i < s.out; ++i)
        for (index_t j = 0; j < s.rank; ++j) zero = zero && g(i, j) == T(0);
    for (T v : db) zero = zero && v == T(0);
    CHECK(zero);
    CHECK(grads.written);
    CHECK(grads.epoch == 0);
}

TEST_CASE_TEMPLATE("N = 0 is a no-op for the identity and for an input group, and zeroes an overwritten gradient"
                       COMPACT_TEST_ON_DEVICE,
                   C, COMPACT_TEST_CONFIGS)
{
    using T = typename C::scalar;
    using B = typename C::backend;
    using full_t = compact::compressed_linear<T, compact::rank::full, B>;
    using group_t = compact::input_group<T, compact::rank::fixed, B>;
    compact_test::device<B> dev;
    const auto& ctx = dev.ctx();
    constexpr index_t n = 9, m = 4;
    const auto x0 = dev.upload(host_matrix<T>(0, n));
    const auto dy0 = dev.upload(host_matrix<T>(0, m));
    auto y0 = dev.upload(host_matrix<T>(0, m));
    auto dx0 = dev.upload(host_matrix<T>(0, n));
    const auto w_d = dev.upload(host_matrix<T>(m, n));
    const auto b_d = dev.upload(std::vector<T>(static_cast<std::size_t>(m), T(1)));

    // Fills G and db with `value`, runs backward with N = 0 in `mode` and says whether they all hold `expected`.
    auto check_backward = [&](const auto& layer, auto& saved, index_t cols, write_mode mode, T expected) {
        host_matrix<T> g(m, cols);
        g.fill(T(7));
        auto g_d = dev.upload(g);
        auto db_d = dev.upload(std::vector<T>(static_cast<std::size_t>(m), T(7)));
        compact::layer_gradient<T> grads{g_d.view(), db_d.view(1, m)};
        auto ws = dev.workspace(layer.workspace_bytes(0));
        layer.backward(ctx, dy0.cview(), w_d.cview(), saved, dx0.view(), grads, ws.get(), mode);
        const host_matrix<T> g_h = dev.download(g_d);
        bool all = grads.written;
        for (index_t i = 0; i < m; ++i)
            for (index_t j = 0; j < cols; ++j) all = all && g_h(i, j) == expected;
        for (T v : dev.download(db_d)) all = all && v == expected;
        return all;
    };

    {
        const full_t layer(compact::in_features{n}, compact::out_features{m}, 1, 2);
        CHECK(layer.saved_bytes(0) == 0);
        auto saved = compact::bind_saved<typename full_t::saved_type>(nullptr, 0);
        layer.forward(ctx, x0.cview(), w_d.cview(), b_d.cview(1, m), y0.view(), saved, 3, compact::workspace{});
        CHECK(saved.filled);
        CHECK(saved.rows == 0);
        CHECK(check_backward(layer, saved, n, write_mode::overwrite, T(0)));
        CHECK(check_backward(layer, saved, n, write_mode::accumulate, T(7)));
    }
    {
        const group_t group(compact::in_features{n}, {m, 2}, 1, 3, compact::rank::fixed{3});
        auto saved = compact::bind_saved<typename group_t::saved_type>(nullptr, group.saved_bytes(0));
        auto ws = dev.workspace(group.workspace_bytes(0));
        group.compress(ctx, x0.cview(), 0, saved, ws.get());
        CHECK(saved.filled);
        CHECK(saved.rows == 0);
        group.layer(0).forward(ctx, x0.cview(), w_d.cview(), b_d.cview(1, m), y0.view());
        CHECK(check_backward(group.layer(0), saved, 3, write_mode::overwrite, T(0)));
        CHECK(check_backward(group.layer(0), saved, 3, write_mode::accumulate, T(7)));
    }
}

TEST_CASE_TEMPLATE("accumulate mode: k micro-batches equal one batch of the same rows" COMPACT_TEST_ON_DEVICE, C,
                   COMPACT_TEST_CONFIGS)
{
    using T = typename C::scalar;
    using B = typename C::backend;
    using layer_t = compact::compressed_linear<T, compact::rank::ratio<1, 4>, B>;
    compact_test::device<B> dev;
    const auto& ctx = dev.ctx();
    auto rng = compact_test::make_rng(7003);
    constexpr index_t n = 45, m = 23;
    const layer_t layer(compact::in_features{n}, compact::out_features{m}, 99, 3, {}, distribution::gaussian,
                        compact::resampling{1});
    const index_t r = layer.rank();
    REQUIRE(r == 11); // round(45 / 4)
    const std::uint64_t epoch = 4; // = the step, resampling every update
    const index_t sizes[] = {10, 1, 22, 7}; // k = 4 micro-batches, 40 rows
    const index_t total = 40;

    host_matrix<T> x(total, n), w(m, n), dy(total, m);
    x.randomize(rng);
    w.randomize(rng);
    dy.randomize(rng);
    const auto x_d = dev.upload(x);
    const auto w_d = dev.upload(w);
    const auto dy_d = dev.upload(dy);
    auto ws = dev.workspace(layer.workspace_bytes(total));
    const compact::workspace wsp = ws.get();

    // One batch.
    auto y_all = dev.upload(host_matrix<T>(total, m));
    auto saved_all_d = saved_storage<T>(dev, layer.saved_bytes(total));
    auto saved_all = bind_saved(layer, saved_all_d, total);
    auto g_all_d = dev.upload(host_matrix<T>(m, r));
    auto db_all_d = dev.upload(std::vector<T>(m));
    compact::layer_gradient<T> grads_all{g_all_d.view(), db_all_d.view(1, m)};
    layer.forward(ctx, x_d.cview(), w_d.cview(), {}, y_all.view(), saved_all, epoch, wsp);
    layer.backward(ctx, dy_d.cview(), w_d.cview(), saved_all, {}, grads_all, wsp);

    // k micro-batches with one P: G_sub and db accumulate (overwrite for the first micro-batch); the
    // first micro-batch also adds its dX onto a start value (input_grad = accumulate).
    host_matrix<T> dx_acc(sizes[0], n, 1);
    dx_acc.randomize(rng);
    const dmatrix dx_start = dx_acc.to_double();
    auto g_acc_d = dev.upload(host_matrix<T>(m, r, 2));
    auto dx_acc_d = dev.upload(dx_acc);
    auto db_acc_d = dev.upload(std::vector<T>(m));
    compact::layer_gradient<T> grads_acc{g_acc_d.view(), db_acc_d.view(1, m)};
    index_t row0 = 0;
    for (std::size_t k = 0; k < 4; ++k) {
        const index_t rows = sizes[k];
        auto y = dev.upload(host_matrix<T>(rows, m));
        auto saved_d = saved_storage<T>(dev, layer.saved_bytes(rows));
        auto saved = bind_saved(layer, saved_d, rows);
        layer.forward(ctx, x_d.cview().row_block(row0, rows), w_d.cview(), {}, y.view(), saved, epoch, wsp);
        if (k == 0)
            layer.backward(ctx, dy_d.cview().row_block(row0, rows), w_d.cview(), saved, dx_acc_d.view(), grads_acc,
                           wsp, write_mode::overwrite, write_mode::accumulate);
        else
            layer.backward(ctx, dy_d.cview().row_block(row0, rows), w_d.cview(), saved, {}, grads_acc, wsp,
                           write_mode::accumulate);
        row0 += rows;
    }
    CHECK(grads_acc.epoch == epoch);
    const host_matrix<T> g_all = dev.download(g_all_d), g_acc = dev.download(g_acc_d);
    const std::vector<T> db_all = dev.download(db_all_d), db_acc = dev.download(db_acc_d);
    dx_acc = dev.download(dx_acc_d);
    CHECK(row0 == total);
    CHECK(compact_test::rel_error(g_acc.to_double(), g_all.to_double()) < tolerance<T>);
    CHECK(compact_test::rel_error(to_double(db_acc), to_double(db_all)) < tolerance<T>);
    CHECK(g_acc.padding_intact());

    // Against float64 too: sum over all rows of dY^T X P.
    const dmatrix proj = reference_projection<T>(layer.projection().spec(epoch));
    const dmatrix g = compact_test::matmul(compact_test::transpose(dy.to_double()), x.to_double());
    CHECK(compact_test::rel_error(g_acc.to_double(), compact_test::matmul(g, proj)) < tolerance<T>);

    // dX accumulate: start + dY_0 W.
    dmatrix expected_dx = compact_test::matmul(
        compact_test::to_double(dy.cview().row_block(0, sizes[0])), w.to_double());
    for (std::size_t k = 0; k < expected_dx.data.size(); ++k) expected_dx.data[k] += dx_start.data[k];
    CHECK(compact_test::rel_error(dx_acc.to_double(), expected_dx) < tolerance<T>);
    CHECK(dx_acc.padding_intact());
}

TEST_CASE_TEMPLATE("a gradient accumulates only micro-batches of one epoch" COMPACT_TEST_ON_DEVICE, C,
                   COMPACT_TEST_CONFIGS)
{
    using T = typename C::scalar;
    using B = typename C::backend;
    using layer_t = compact::compressed_linear<T, compact::rank::fixed, B>;
    compact_test::device<B> dev;
    const auto& ctx = dev.ctx();
    auto rng = compact_test::make_rng(7010);
    constexpr index_t N = 6, n = 10, m = 5, r = 3;
    // A new P every 2 updates: steps 4 and 5 share epoch 2, step 6 is epoch 3.
    const layer_t layer(compact::in_features{n}, compact::out_features{m}, 7, 8, compact::rank::fixed{r},
                        distribution::gaussian, compact::resampling{2});
    host_matrix<T> x(N, n), w(m, n), dy(N, m);
    x.randomize(rng);
    w.randomize(rng);
    dy.randomize(rng);
    const auto x_d = dev.upload(x);
    const auto w_d = dev.upload(w);
    const auto dy_d = dev.upload(dy);
    auto y_d = dev.upload(host_matrix<T>(N, m));
    auto ws = dev.workspace(layer.workspace_bytes(N));
    auto g_d = dev.upload(host_matrix<T>(m, r));
    auto db_d = dev.upload(std::vector<T>(m));
    compact::layer_gradient<T> grads{g_d.view(), db_d.view(1, m)};
    auto forward = [&](std::uint64_t step, auto& storage) {
        auto saved = bind_saved(layer, storage, N);
        layer.forward(ctx, x_d.cview(), w_d.cview(), {}, y_d.view(), saved, step, ws.get());
        return saved;
    };
    auto mem4 = saved_storage<T>(dev, layer.saved_bytes(N)), mem5 = saved_storage<T>(dev, layer.saved_bytes(N)),
         mem6 = saved_storage<T>(dev, layer.saved_bytes(N));
    const auto saved4 = forward(4, mem4), saved5 = forward(5, mem5), saved6 = forward(6, mem6);
    CHECK(saved4.epoch == 2);
    CHECK(saved5.epoch == 2);
    CHECK(saved6.epoch == 3);

    layer.backward(ctx, dy_d.cview(), w_d.cview(), saved4, {}, grads, ws.get());
    CHECK(grads.epoch == 2);
    // Step 5 is the same epoch: it accumulates.
    CHECK_NOTHROW(layer.backward(ctx, dy_d.cview(), w_d.cview(), saved5, {}, grads, ws.get(), write_mode::accumulate));
    const host_matrix<T> g_before = dev.download(g_d);
    const std::vector<T> db_before = dev.download(db_d);
    // Step 6 compressed under another P: adding its gradient is an error, and nothing is written.
    CHECK_COMPACT_ERROR(
        layer.backward(ctx, dy_d.cview(), w_d.cview(), saved6, {}, grads, ws.get(), write_mode::accumulate), "epoch",
        "compressed_linear::backward");
    CHECK(bit_identical(dev.download(g_d), g_before));
    CHECK(bit_identical(dev.download(db_d), db_before));
    CHECK(grads.epoch == 2);
    // Overwriting starts a new gradient of the new epoch; a fresh (unwritten) gradient accepts any.
    CHECK_NOTHROW(layer.backward(ctx, dy_d.cview(), w_d.cview(), saved6, {}, grads, ws.get()));
    CHECK(grads.epoch == 3);
    compact::layer_gradient<T> fresh{g_d.view(), db_d.view(1, m)};
    CHECK_NOTHROW(layer.backward(ctx, dy_d.cview(), w_d.cview(), saved4, {}, fresh, ws.get(), write_mode::accumulate));
    CHECK(fresh.epoch == 2);
}

// ------------------------------------------------------------------------------------------------ unbiasedness

TEST_CASE_TEMPLATE("G_hat = G_sub P^T is an unbiased estimate of G with relative variance kappa" COMPACT_TEST_ON_DEVICE,
                   C, COMPACT_TEST_CONFIGS)
{
    using T = typename C::scalar;
    using B = typename C::backend;
    using layer_t = compact::compressed_linear<T, compact::rank::fixed, B>;
    constexpr index_t N = 48, n = 32, m = 24, r = 8;
    constexpr int epochs = 2000; // K
    compact_test::device<B> dev;
    const auto& ctx = dev.ctx();
    auto rng = compact_test::make_rng(7004);

    for (distribution dist : {distribution::gaussian, distribution::rademacher}) {
        CAPTURE(std::string(compact::to_string(dist)));
        // Resampling every update: step e is epoch e.
        const layer_t layer(compact::in_features{n}, compact::out_features{m}, 0xabcdef, 21, compact::rank::fixed{r},
                            dist, compact::resampling{1});
        host_matrix<T> x(N, n), w(m, n), dy(N, m);
        x.randomize(rng);
        w.randomize(rng);
        dy.randomize(rng);
        const auto x_d = dev.upload(x);
        const auto w_d = dev.upload(w);
        const auto dy_d = dev.upload(dy);
        auto y_d = dev.upload(host_matrix<T>(N, m));
        auto saved_d = saved_storage<T>(dev, layer.saved_bytes(N));
        auto saved = bind_saved(layer, saved_d, N);
        auto g_sub_d = dev.upload(host_matrix<T>(m, r));
        compact::layer_gradient<T> grads{g_sub_d.view()};
        auto g_hat_d = dev.upload(host_matrix<T>(m, n));
        auto ws = dev.workspace(layer.workspace_bytes(N));
        const compact::workspace wsp = ws.get();

        const dmatrix g = compact_test::matmul(compact_test::transpose(dy.to_double()), x.to_double()); // (m, n)
        const double g_sq = compact_test::frobenius(g) * compact_test::frobenius(g);
        const double kappa = compact::variance_factor(dist, n, r);

        dmatrix mean(m, n);
        double spread = 0; // mean over epochs of ||G_hat - G||_F^2
        for (int e = 0; e < epochs; ++e) {
            layer.forward(ctx, x_d.cview(), w_d.cview(), {}, y_d.view(), saved, static_cast<std::uint64_t>(e), wsp);
            layer.backward(ctx, dy_d.cview(), w_d.cview(), saved, {}, grads, wsp);
            layer.expand_gradient(ctx, grads, g_hat_d.view(), wsp); // with P of grads.epoch = e
            const dmatrix gh = dev.download(g_hat_d).to_double();
            double sq = 0;
            for (std::size_t k = 0; k < mean.data.size(); ++k) {
                mean.data[k] += gh.data[k] / epochs;
                sq += (gh.data[k] - g.data[k]) * (gh.data[k] - g.data[k]);
            }
            spread += sq / epochs;
        }

        // Bound. G_hat - G = G (P P^T - I). With A = P P^T, E[A] = I and, for gaussian P (entries
        // N(0, 1/r)), Cov(A_ij, A_lk) = (d_il d_jk + d_ik d_jl) / r, so E||G_hat - G||_F^2 = ((n+1)/r) ||G||_F^2
        // = kappa ||G||^2 (SPEC section 1); for rademacher A_ii = 1 exactly, which removes the i = j terms:
        // kappa = (n-1)/r. The mean of K independent epochs then has E||mean - G||^2 = kappa ||G||^2 / K.
        // Its relative standard deviation (a quadratic form in an approximately normal vector, by the CLT
        // over K = 2000) is sqrt(2 tr(S^2)) / tr(S) with S the covariance above, which works out to
        //   sd = sqrt(2 ((n+2)/e + 1)) / (n+1),   e = ||G||_F^4 / ||G G^T||_F^2 (effective rank of G),
        // computed below (about 0.1 here). The window [0.3, 3] x expected is then at least 7 sd wide on
        // each side: a correct estimator fails it with negligible probability. A wrong scaling of P by c
        // scales G_hat by c^2: with 1/r instead of 1/sqrt(r) the mean converges to G / r, an error of
        // (1 - 1/r)^2 ||G||^2 = 0.77 ||G||^2 against a bound of 3 kappa/K ||G||^2 = 0.006 ||G||^2. The
        // negative control below applies a milder error (c^2 = sqrt(2)) and must fail the same bound.
        const dmatrix ggt = compact_test::matmul(g, compact_test::transpose(g));
        const double ggt_sq = compact_test::frobenius(ggt) * compact_test::frobenius(ggt);
        const double erank = g_sq * g_sq / ggt_sq;
        const double sd = std::sqrt(2.0 * ((n + 2) / erank + 1.0)) / (n + 1);
        CAPTURE(erank);
        CAPTURE(sd);
        REQUIRE(sd < 0.1); // the window below is then more than 7 sd from 1 on both sides

        const double expected = kappa * g_sq / epochs;
        double err = 0, err_control = 0;
        const double c = std::sqrt(2.0);
        for (std::size_t k = 0; k < mean.data.size(); ++k) {
            err += (mean.data[k] - g.data[k]) * (mean.data[k] - g.data[k]);
            err_control += (c * mean.data[k] - g.data[k]) * (c * mean.data[k] - g.data[k]);
        }
        CAPTURE(err / expected);
        CHECK(err < 3.0 * expected);
        CHECK(err > 0.3 * expected);
        // Negative control: sqrt(2) G_hat is biased and must fail the bound (by a factor of about 30).
        CHECK_FALSE(err_control < 3.0 * expected);

        // The variance itself: the mean over epochs of ||G_hat - G||^2 / ||G||^2 estimates kappa. Per
        // epoch that ratio has a relative sd of a few times `sd` (its distribution is not normal for one
        // epoch); over K = 2000 epochs the SE is below 3 * 0.1 / sqrt(2000) = 0.7%. The bound 3% is
        // > 4 SE, yet tighter than the 6.5% that separates (n+1)/r from (n-1)/r at n = 32: this checks
        // variance_factor against the estimator, per distribution.
        CAPTURE(spread / g_sq);
        CAPTURE(kappa);
        CHECK(std::abs(spread / (kappa * g_sq) - 1.0) < 0.03);
    }
}

// ------------------------------------------------------------------------------------------------ groups

namespace {

/// A user rank policy: a third of the (summed) output width, capped at n.
struct third_of_out {
    index_t rank(const compact::layer_info& l) const { return std::min(l.in, std::max<index_t>(1, l.out / 3)); }
};

} // namespace

TEST_CASE_TEMPLATE("input_group shares one P and one Z among its members" COMPACT_TEST_ON_DEVICE, C,
                   COMPACT_TEST_CONFIGS)
{
    using T = typename C::scalar;
    using B = typename C::backend;
    using group_t = compact::input_group<T, third_of_out, B>;
    compact_test::device<B> dev;
    const auto& ctx = dev.ctx();
    auto rng = compact_test::make_rng(7005);
    constexpr index_t N = 37, n = 20;
    const std::vector<index_t> outs = {5, 7, 3};
    const std::uint64_t group_id = 0x100000009ull, epoch = 6; // = the step, resampling every update
    const group_t group(compact::in_features{n}, outs, 0x5eed, group_id, third_of_out{}, distribution::gaussian,
                        compact::resampling{1});
    REQUIRE(group.size() == 3);
    CHECK(group.rank() == 5); // (5 + 7 + 3) / 3: the policy sees the summed output width
    CHECK(group.projection().layer() == group_id);
    const index_t r = group.rank();
    CHECK(group.saved_bytes(N) == static_cast<std::size_t>(N * r) * sizeof(T)); // one Z for the group
    for (std::size_t k = 0; k < 3; ++k) {
        CHECK(group.layer(k).out() == outs[k]);
        CHECK(group.layer(k).in() == n);
        CHECK(group.layer(k).rank() == r);
        CHECK(group.layer(k).projection().spec(epoch).key == group.projection().spec(epoch).key);
    }
    CHECK_THROWS(group.layer(3));

    host_matrix<T> x(N, n, 2);
    x.randomize(rng);
    const auto x_d = dev.upload(x);
    auto saved_d = saved_storage<T>(dev, group.saved_bytes(N));
    auto saved = bind_saved(group, saved_d, N);
    auto dx_d = dev.upload(host_matrix<T>(N, n, 3));
    auto ws = dev.workspace(group.workspace_bytes(N));
    group.compress(ctx, x_d.cview(), epoch, saved, ws.get());
    const host_matrix<T> z = read_z(dev, group.compressor(), saved);

    // The same Z as a standalone projection with the group's key (bit for bit into the same layout).
    const compact::projection_source<T, B> alone(n, r, distribution::gaussian, 0x5eed, group_id);
    auto z_alone_d = dev.upload(host_matrix<T>(N, r));
    alone.compress(ctx, x_d.cview(), epoch, z_alone_d.view(), ws.get());
    CHECK(same_result_any_ld(z, dev.download(z_alone_d)));
    auto z_alone_same_d = dev.upload(same_layout(z));
    alone.compress(ctx, x_d.cview(), epoch, z_alone_same_d.view(), ws.get());
    CHECK(bit_identical(z, dev.download(z_alone_same_d)));

    const dmatrix xd = x.to_double();
    const dmatrix proj = reference_projection<T>(group.projection().spec(epoch));
    CHECK(compact_test::rel_error(z.to_double(), compact_test::matmul(xd, proj)) < tolerance<T>);
    dmatrix dx_expected(N, n);
    for (std::size_t k = 0; k < 3; ++k) {
        CAPTURE(k);
        const index_t m = outs[k];
        host_matrix<T> w(m, n, 1), dy(N, m, 2);
        std::vector<T> b(static_cast<std::size_t>(m));
        w.randomize(rng);
        dy.randomize(rng);
        compact_test::random_fill(b, rng);
        const auto w_d = dev.upload(w);
        const auto dy_d = dev.upload(dy);
        const auto b_d = dev.upload(b);
        auto y_d = dev.upload(host_matrix<T>(N, m));
        auto g_sub_d = dev.upload(host_matrix<T>(m, r, 1));
        auto db_d = dev.upload(std::vector<T>(static_cast<std::size_t>(m)));
        compact::layer_gradient<T> grads{g_sub_d.view(), db_d.view(1, m)};
        const auto& layer = group.layer(k);
        layer.forward(ctx, x_d.cview(), w_d.cview(), b_d.cview(1, m), y_d.view());
        // dX of the group is the sum over members: overwrite for the first, accumulate for the rest.
        layer.backward(ctx, dy_d.cview(), w_d.cview(), saved, dx_d.view(), grads, ws.get(), write_mode::overwrite,
                       k == 0 ? write_mode::overwrite : write_mode::accumulate);
        CHECK(grads.epoch == epoch);
        const host_matrix<T> y = dev.download(y_d), g_sub = dev.download(g_sub_d);
        const std::vector<T> db = dev.download(db_d);
        const auto bd = to_double(b);
        const dmatrix dyd = dy.to_double(), wd = w.to_double();
        CHECK(compact_test::rel_error(y.to_double(), reference_forward(xd, wd, &bd)) < tolerance<T>);
        const dmatrix g = compact_test::matmul(compact_test::transpose(dyd), xd);
        CHECK(compact_test::rel_error(g_sub.to_double(), compact_test::matmul(g, proj)) < tolerance<T>);
        CHECK(compact_test::rel_error(to_double(db), column_sums(dyd)) < tolerance<T>);
        const dmatrix dxk = compact_test::matmul(dyd, wd);
        for (std::size_t q = 0; q < dxk.data.size(); ++q) dx_expected.data[q] += dxk.data[q];
    }
    const host_matrix<T> dx = dev.download(dx_d);
    CHECK(compact_test::rel_error(dx.to_double(), dx_expected) < tolerance<T>);
    CHECK(dx.padding_intact());
    CHECK(z.padding_intact());
}

// ------------------------------------------------------------------------------------------------ identity

TEST_CASE_TEMPLATE("rank::full trains exactly: Z = X and G_sub = G" COMPACT_TEST_ON_DEVICE, C, COMPACT_TEST_CONFIGS)
{
    using T = typename C::scalar;
    using B = typename C::backend;
    using layer_t = compact::compressed_linear<T, compact::rank::full, B>;
    compact_test::device<B> dev;
    const auto& ctx = dev.ctx();
    auto rng = compact_test::make_rng(7006);
    const shape s{29, 19, 11, 19, 2};
    // The policy overrides the distribution; resampling every update, so any step is an epoch.
    const layer_t layer(compact::in_features{s.in}, compact::out_features{s.out}, 5, 6, {}, distribution::gaussian,
                        compact::resampling{1});
    REQUIRE(layer.rank() == s.in);
    CHECK(layer.projection().is_identity());
    CHECK(layer.workspace_bytes(s.rows) == 0);
    problem<T> p(s, rng);
    device_problem<B, T> d(dev, p);
    auto saved = bind_saved(layer, d.saved, s.rows);
    // No workspace needed (an empty compact::workspace is accepted); any epoch.
    layer.forward(ctx, d.x.cview(), d.w.cview(), d.bias(), d.y.view(), saved, 123456, compact::workspace{});
    compact::layer_gradient<T> grads = d.gradients();
    layer.backward(ctx, d.dy.cview(), d.w.cview(), saved, d.dx.view(), grads, compact::workspace{});
    d.download_outputs(dev, layer, saved, p);
    CHECK(bit_identical(p.z, p.x)); // Z = X I, exactly
    const dmatrix g = compact_test::matmul(compact_test::transpose(p.dy.to_double()), p.x.to_double());
    CHECK(compact_test::rel_error(p.g_sub.to_double(), g) < tolerance<T>);
    auto g_hat_d = dev.upload(host_matrix<T>(s.out, s.in, 1));
    layer.expand_gradient(ctx, gradient_of_epoch(d.g_sub.view(), 7), g_hat_d.view(), compact::workspace{});
    const host_matrix<T> g_hat = dev.download(g_hat_d);
    CHECK(bit_identical(g_hat, p.g_sub)); // G_hat = G_sub I, exactly
    CHECK(p.outputs_padding_intact());
}

// ------------------------------------------------------------------------------------------------ determinism

TEST_CASE_TEMPLATE("forward and backward are bit-identical across runs and, on the CPU, thread counts"
                       COMPACT_TEST_ON_DEVICE,
                   C, COMPACT_TEST_CONFIGS)
{
    using T = typename C::scalar;
    using B = typename C::backend;
    using layer_t = compact::compressed_linear<T, compact::rank::ratio<1, 4>, B>;
    using context = typename B::context;
    compact_test::device<B> dev;
    // Big enough that the CPU backend splits every GEMM and the generation of P into several parts.
    const shape s{700, 300, 260, 75, 0};
    const layer_t layer(compact::in_features{s.in}, compact::out_features{s.out}, 2024, 8, {}, distribution::gaussian,
                        compact::resampling{1}); // step 3 is epoch 3
    REQUIRE(layer.rank() == s.rank);
    auto rng = compact_test::make_rng(7007);
    const problem<T> inputs(s, rng);
    // Every run uses dev for its copies; on the CPU, `ctx` may be another thread count.
    auto run = [&](const context& ctx) {
        problem<T> p = inputs;
        const auto record = run_layer(dev, layer, p, 3, ctx);
        auto g_sub_d = dev.upload(p.g_sub);
        auto g_hat_d = dev.upload(host_matrix<T>(s.out, s.in));
        auto ws = dev.workspace(layer.workspace_bytes(s.rows));
        layer.expand_gradient(ctx, gradient_of_epoch(g_sub_d.view(), record.epoch), g_hat_d.view(), ws.get());
        return std::make_pair(p, dev.download(g_hat_d));
    };
    // A run and a rerun on the backend under test (the same calls, the same layouts).
    std::vector<context> contexts = {dev.ctx(), dev.ctx()};
#if !COMPACT_TEST_CUDA_BUILD
    // The CPU backend: 1, 1, 2 and 2 threads too.
    for (int threads : {1, 1, 2, 2}) contexts.push_back(compact::cpu::context{threads});
#endif
    const auto [one, one_hat] = run(contexts[0]);
    for (std::size_t k = 1; k < contexts.size(); ++k) {
        CAPTURE(k);
        const auto [other, other_hat] = run(contexts[k]);
        CHECK(bit_identical(one.y, other.y));
        CHECK(bit_identical(one.z, other.z));
        CHECK(bit_identical(one.dx, other.dx));
        CHECK(bit_identical(one.g_sub, other.g_sub));
        CHECK(bit_identical(one.db, other.db));
        CHECK(bit_identical(one_hat, other_hat));
    }
}

// ------------------------------------------------------------------------------------------------ bad input

namespace {

/// Valid buffers for a small layer in the backend's memory, with outputs set to a sentinel so that a
/// rejected call can be checked not to have written anything. The host copies (`*_h`) hold the values;
/// reset() uploads the sentinel and untouched() downloads the outputs.
template <class B, class T>
struct bad_input_fixture {
    using matrix = compact_test::device_matrix<B, T>;
    using array = compact_test::device_array<B, T>;
    static constexpr index_t N = 6, n = 12, m = 7, r = 5;
    static constexpr T sentinel = T(1234.5);
    compact_test::device<B> dev; // first: created before and destroyed after the buffers below
    host_matrix<T> y_h{N, m}, z_h{N, r}, dx_h{N, n}, g_sub_h{m, r}, g_hat_h{m, n};
    std::vector<T> db_h = std::vector<T>(m);
    std::vector<T> saved_h = std::vector<T>(static_cast<std::size_t>((N + 1) * r + 1));
    matrix x, w, dy;
    matrix p, p2; // storage for P (n, r) kept by the caller (for a layer, for a standalone source)
    matrix y = dev.upload(y_h), z = dev.upload(z_h), dx = dev.upload(dx_h), g_sub = dev.upload(g_sub_h),
           g_hat = dev.upload(g_hat_h);
    array b = dev.upload(std::vector<T>(m, T(0.5)));
    array db = dev.upload(db_h);
    array saved_memory = dev.upload(saved_h);            // what forward keeps: room for N + 1 rows
    array storage = dev.upload(std::vector<T>(4096, T(0))); // backs deliberately misshapen views

    bad_input_fixture()
    {
        auto rng = compact_test::make_rng(7008);
        host_matrix<T> x_h(N, n), w_h(m, n), dy_h(N, m);
        x_h.randomize(rng);
        w_h.randomize(rng);
        dy_h.randomize(rng);
        x = dev.upload(x_h);
        w = dev.upload(w_h);
        dy = dev.upload(dy_h);
        p = dev.upload(host_matrix<T>(n, r));
        p2 = dev.upload(host_matrix<T>(n, r));
        reset();
    }
    void reset()
    {
        for (auto* o : {&y_h, &z_h, &dx_h, &g_sub_h, &g_hat_h}) o->fill(sentinel);
        std::fill(db_h.begin(), db_h.end(), sentinel);
        std::fill(saved_h.begin(), saved_h.end(), sentinel);
        dev.upload_to(y, y_h);
        dev.upload_to(z, z_h);
        dev.upload_to(dx, dx_h);
        dev.upload_to(g_sub, g_sub_h);
        dev.upload_to(g_hat, g_hat_h);
        dev.upload_to(db, db_h);
        dev.upload_to(saved_memory, saved_h);
    }
    /// Downloads every output (after waiting for dev's stream) and checks it still holds the sentinel.
    bool untouched() const
    {
        for (const matrix* o : {&y, &z, &dx, &g_sub, &g_hat}) {
            const host_matrix<T> h = dev.download(*o);
            for (index_t i = 0; i < h.rows; ++i)
                for (index_t j = 0; j < h.cols; ++j)
                    if (h(i, j) != sentinel) return false;
        }
        for (const array* a : {&db, &saved_memory})
            for (T v : dev.download(*a))
                if (v != sentinel) return false;
        return true;
    }
    /// A view of `rows` x `cols` with leading dimension ld, over `storage` (or null).
    compact::matrix_view<T> make(index_t rows, index_t cols, index_t ld = -1, bool null = false)
    {
        return {null ? nullptr : storage.data(), rows, cols, ld < 0 ? cols : ld};
    }
    /// A saved activation over saved_memory, `offset` bytes in, of `bytes` bytes.
    compact::saved_activation saved(std::size_t offset, std::size_t bytes)
    {
        return compact::bind_saved<compact::saved_activation>(
            reinterpret_cast<unsigned char*>(saved_memory.data()) + offset, bytes);
    }
};

} // namespace

// Every rejected call must (1) throw compact::error, (2) name the offending argument in the message and
// (3) leave every output untouched ("every public entry point validates its arguments before it touches
// memory", core/error.hpp).
#define CHECK_REJECTED(call, ...)                                                                          \
    do {                                                                                                   \
        f.reset();                                                                                         \
        CHECK_COMPACT_ERROR(call, __VA_ARGS__);                                                            \
        CHECK_MESSAGE(f.untouched(), "`" #call "` wrote to an output before rejecting its arguments");      \
    } while (false)

TEST_CASE_TEMPLATE("every entry point rejects bad arguments, naming them" COMPACT_TEST_ON_DEVICE, C,
                   COMPACT_TEST_CONFIGS)
{
    using T = typename C::scalar;
    using B = typename C::backend;
    using layer_t = compact::compressed_linear<T, compact::rank::fixed, B>;
    using saved_t = typename layer_t::saved_type;
    using F = bad_input_fixture<B, T>;
    constexpr index_t N = F::N, n = F::n, m = F::m, r = F::r;
    F f;
    const layer_t layer(compact::in_features{n}, compact::out_features{m}, 1, 2, compact::rank::fixed{r});
    const auto& proj = layer.projection();
    const std::size_t saved_bytes = layer.saved_bytes(N);
    auto ws_storage = f.dev.workspace(layer.workspace_bytes(N));
    const compact::workspace ws = ws_storage.get();
    const compact::workspace small_ws{ws.data, ws.bytes - 1};
    const compact::workspace null_ws{nullptr, ws.bytes};
    const auto& ctx = f.dev.ctx();
    const auto b = f.b.cview(1, m);
    // A copy of the layer and a copy of its projection that keep P in the caller's memory.
    layer_t keeping = layer;
    keeping.compressor().projection().keep(f.p.view());
    auto kept_source = proj;
    kept_source.keep(f.p2.view());
    saved_t saved = f.saved(0, saved_bytes);
    compact::layer_gradient<T> grads{f.g_sub.view(), f.db.view(1, m)};

    // Sanity: the valid calls go through.
    CHECK_NOTHROW(layer.forward(ctx, f.x.cview(), f.w.cview(), b, f.y.view(), saved, 0, ws));
    CHECK_NOTHROW(layer.backward(ctx, f.dy.cview(), f.w.cview(), saved, f.dx.view(), grads, ws));
    CHECK_NOTHROW(layer.expand_gradient(ctx, grads, f.g_hat.view(), ws));
    CHECK_NOTHROW(keeping.forward(ctx, f.x.cview(), f.w.cview(), b, f.y.view(), saved, 0, compact::workspace{}));
    CHECK_NOTHROW(kept_source.compress(ctx, f.x.cview(), 0, f.z.view(), compact::workspace{}));

    SUBCASE("projection_source::compress")
    {
        CHECK_REJECTED(proj.compress(ctx, f.make(N, n + 1), 0, f.z.view(), ws), ": X is", "(N, 12)");
        CHECK_REJECTED(proj.compress(ctx, f.make(N, n, n, true), 0, f.z.view(), ws), ": X is null");
        CHECK_REJECTED(proj.compress(ctx, f.make(N, n, n - 1), 0, f.z.view(), ws), ": X has ld=");
        CHECK_REJECTED(proj.compress(ctx, f.make(-1, n), 0, f.z.view(), ws), ": X has negative");
        CHECK_REJECTED(proj.compress(ctx, f.x.cview(), 0, {f.z.storage.data(), N, r + 1}, ws), ": Z is");
        CHECK_REJECTED(proj.compress(ctx, f.x.cview(), 0, {f.z.storage.data(), N + 1, r}, ws), ": Z is");
        CHECK_REJECTED(proj.compress(ctx, f.x.cview(), 0, {nullptr, N, r}, ws), ": Z is null");
        CHECK_REJECTED(proj.compress(ctx, f.x.cview(), 0, {f.z.storage.data(), N, r, r - 1}, ws), ": Z has ld=");
        CHECK_REJECTED(proj.compress(ctx, f.x.cview(), 0, f.z.view(), small_ws), ": workspace holds");
        CHECK_REJECTED(proj.compress(ctx, f.x.cview(), 0, f.z.view(), null_ws), ": workspace is null");
        CHECK_REJECTED(proj.compress(ctx, f.x.cview(), std::uint64_t{1} << 32, f.z.view(), ws), "epoch");
    }
    SUBCASE("projection_source::expand and compressed_linear::expand_gradient")
    {
        for (int via_layer = 0; via_layer < 2; ++via_layer) {
            CAPTURE(via_layer);
            auto expand = [&](compact::matrix_view<T> g, compact::matrix_view<T> h, compact::workspace w) {
                if (via_layer) layer.expand_gradient(ctx, gradient_of_epoch(g, 0), h, w);
                else proj.expand(ctx, g, 0, h, w);
            };
            // The layer names G_sub as the gradient's weight.
            const std::string g_name = via_layer ? ": G_sub (grads.weight)" : ": G_sub";
            const std::string g_is = g_name + " is", g_null = g_name + " is null", g_ld = g_name + " has ld=";
            CHECK_REJECTED(expand(f.make(m, r + 1), f.g_hat.view(), ws), g_is.c_str());
            CHECK_REJECTED(expand(f.make(m, r, r, true), f.g_hat.view(), ws), g_null.c_str());
            CHECK_REJECTED(expand(f.make(m, r, r - 1), f.g_hat.view(), ws), g_ld.c_str());
            CHECK_REJECTED(expand(f.g_sub.view(), {f.g_hat.storage.data(), m, n + 1}, ws), ": G_hat is");
            CHECK_REJECTED(expand(f.g_sub.view(), {f.g_hat.storage.data(), m + 1, n}, ws), ": G_hat is");
            CHECK_REJECTED(expand(f.g_sub.view(), {nullptr, m, n}, ws), ": G_hat is null");
            CHECK_REJECTED(expand(f.g_sub.view(), {f.g_hat.storage.data(), m, n, n - 1}, ws), ": G_hat has ld=");
            CHECK_REJECTED(expand(f.g_sub.view(), f.g_hat.view(), small_ws), ": workspace holds");
            CHECK_REJECTED(expand(f.g_sub.view(), f.g_hat.view(), null_ws), ": workspace is null");
        }
        // The layer knows m: a G_sub of m + 1 rows is not this layer's gradient.
        auto g_big = f.dev.upload(host_matrix<T>(m + 1, r));
        auto h_big = f.dev.upload(host_matrix<T>(m + 1, n));
        CHECK_REJECTED(layer.expand_gradient(ctx, gradient_of_epoch(g_big.view(), 0), h_big.view(), ws),
                       ": G_sub (grads.weight) is");
        // Nor is a gradient no backward wrote (it has no epoch).
        const compact::layer_gradient<T> unwritten{f.g_sub.view()};
        CHECK_REJECTED(layer.expand_gradient(ctx, unwritten, f.g_hat.view(), ws), "not written by a backward");
    }
    SUBCASE("compressed_linear::forward without saving")
    {
        auto fwd = [&](compact::matrix_view<const T> x, compact::matrix_view<const T> w, compact::matrix_view<T> y) {
            layer.forward(ctx, x, w, b, y);
        };
        CHECK_REJECTED(fwd(f.make(N, n - 1), f.w.cview(), f.y.view()), ": X is");
        CHECK_REJECTED(fwd(f.make(N, n, n, true), f.w.cview(), f.y.view()), ": X is null");
        CHECK_REJECTED(fwd(f.make(N, n, n - 1), f.w.cview(), f.y.view()), ": X has ld=");
        CHECK_REJECTED(fwd(f.x.cview(), f.make(m + 1, n), f.y.view()), ": W is");
        CHECK_REJECTED(fwd(f.x.cview(), f.make(m, n + 1), f.y.view()), ": W is");
        CHECK_REJECTED(fwd(f.x.cview(), f.make(m, n, n, true), f.y.view()), ": W is null");
        CHECK_REJECTED(fwd(f.x.cview(), f.make(m, n, n - 1), f.y.view()), ": W has ld=");
        CHECK_REJECTED(fwd(f.x.cview(), f.w.cview(), {f.y.storage.data(), N, m + 1}), ": Y is");
        CHECK_REJECTED(fwd(f.x.cview(), f.w.cview(), {f.y.storage.data(), N - 1, m}), ": Y is");
        CHECK_REJECTED(fwd(f.x.cview(), f.w.cview(), {nullptr, N, m}), ": Y is null");
        CHECK_REJECTED(fwd(f.x.cview(), f.w.cview(), {f.y.storage.data(), N, m, m - 1}), ": Y has ld=");
        // The bias is (1, m) or empty.
        CHECK_REJECTED(layer.forward(ctx, f.x.cview(), f.w.cview(), f.make(1, m + 1), f.y.view()), ": b is");
        CHECK_REJECTED(layer.forward(ctx, f.x.cview(), f.w.cview(), f.make(1, m, m, true), f.y.view()), ": b is null");
        // Y may not overlap an input (in-place use).
        CHECK_REJECTED(fwd(f.make(N, n), f.w.cview(), f.make(N, m)), ": Y", "overlaps X");
        CHECK_REJECTED(fwd(f.x.cview(), f.make(m, n), f.make(N, m)), ": Y", "overlaps W");
        CHECK_REJECTED(layer.forward(ctx, f.x.cview(), f.w.cview(), f.make(1, m), f.make(N, m)), ": Y", "overlaps b");
    }
    SUBCASE("compressed_linear::forward with a saved activation")
    {
        auto fwd = [&](compact::matrix_view<const T> x, compact::matrix_view<const T> w, compact::matrix_view<T> y,
                       saved_t sv, compact::workspace wsp) { layer.forward(ctx, x, w, b, y, sv, 0, wsp); };
        CHECK_REJECTED(fwd(f.make(N, n - 1), f.w.cview(), f.y.view(), saved, ws), ": X is");
        CHECK_REJECTED(fwd(f.make(N, n, n, true), f.w.cview(), f.y.view(), saved, ws), ": X is null");
        CHECK_REJECTED(fwd(f.x.cview(), f.make(m, n + 1), f.y.view(), saved, ws), ": W is");
        CHECK_REJECTED(fwd(f.x.cview(), f.w.cview(), {f.y.storage.data(), N, m + 1}, saved, ws), ": Y is");
        // The saved memory (Z's N r values) must be large enough, present and aligned.
        CHECK_REJECTED(fwd(f.x.cview(), f.w.cview(), f.y.view(), f.saved(0, saved_bytes - 1), ws),
                       ": the saved activation holds", "are needed");
        CHECK_REJECTED(fwd(f.x.cview(), f.w.cview(), f.y.view(), compact::bind_saved<saved_t>(nullptr, saved_bytes), ws),
                       ": the saved activation holds");
        CHECK_REJECTED(fwd(f.x.cview(), f.w.cview(), f.y.view(), f.saved(1, saved_bytes), ws), "must be aligned");
        CHECK_REJECTED(fwd(f.x.cview(), f.w.cview(), f.y.view(), saved, small_ws), ": workspace holds");
        CHECK_REJECTED(fwd(f.x.cview(), f.w.cview(), f.y.view(), saved, null_ws), ": workspace is null");
        // In-place use: Y over X, and the saved memory over Y or X.
        CHECK_REJECTED(fwd(f.make(N, n), f.w.cview(), f.make(N, m), saved, ws), ": Y", "overlaps X");
        CHECK_REJECTED(fwd(f.x.cview(), f.w.cview(), f.y.view(),
                           compact::bind_saved<saved_t>(f.y.storage.data(), saved_bytes), ws),
                       ": Y", "overlaps the saved activation");
        CHECK_REJECTED(fwd(f.make(N, n), f.w.cview(), f.y.view(), compact::bind_saved<saved_t>(f.storage.data(), saved_bytes),
                           ws),
                       ": X", "overlaps the saved activation");
        // The step's epoch must be below 2^32 (resampling every update: epoch = step).
        const layer_t every(compact::in_features{n}, compact::out_features{m}, 1, 2, compact::rank::fixed{r},
                            distribution::gaussian, compact::resampling{1});
        CHECK_REJECTED(every.forward(ctx, f.x.cview(), f.w.cview(), b, f.y.view(), saved, std::uint64_t{1} << 32, ws),
                       "epoch");
    }
    SUBCASE("projection_source::compress with a kept P")
    {
        auto cmp = [&](compact::matrix_view<const T> x, compact::matrix_view<T> z) {
            kept_source.compress(ctx, x, 0, z, compact::workspace{});
        };
        CHECK_REJECTED(cmp(f.make(N, n + 1), f.z.view()), ": X is");
        CHECK_REJECTED(cmp(f.make(N, n, n, true), f.z.view()), ": X is null");
        CHECK_REJECTED(cmp(f.make(N, n, n - 1), f.z.view()), ": X has ld=");
        CHECK_REJECTED(cmp(f.x.cview(), {f.z.storage.data(), N, r + 1}), ": Z is");
        CHECK_REJECTED(cmp(f.x.cview(), {f.z.storage.data(), N + 1, r}), ": Z is");
        CHECK_REJECTED(cmp(f.x.cview(), {nullptr, N, r}), ": Z is null");
        CHECK_REJECTED(cmp(f.x.cview(), {f.z.storage.data(), N, r, r - 1}), ": Z has ld=");
        // The storage for P is checked when it is handed over; a rejected one is not kept.
        auto source = proj;
        CHECK_REJECTED(source.keep(f.make(n, r + 1)), ": storage is");
        CHECK_REJECTED(source.keep(f.make(n + 1, r)), ": storage is");
        CHECK_REJECTED(source.keep(f.make(n, r, r, true)), ": storage is null");
        CHECK_REJECTED(source.keep(f.make(n, r, r - 1)), ": storage has ld=");
        CHECK_FALSE(source.keeps());
    }
    SUBCASE("compressed_linear::forward with a kept P")
    {
        auto fwd = [&](compact::matrix_view<const T> x, compact::matrix_view<const T> w, compact::matrix_view<T> y,
                       saved_t sv) { keeping.forward(ctx, x, w, b, y, sv, 0, compact::workspace{}); };
        CHECK_REJECTED(fwd(f.make(N, n - 1), f.w.cview(), f.y.view(), saved), ": X is");
        CHECK_REJECTED(fwd(f.x.cview(), f.make(m, n + 1), f.y.view(), saved), ": W is");
        CHECK_REJECTED(fwd(f.x.cview(), f.w.cview(), {f.y.storage.data(), N, m + 1}, saved), ": Y is");
        CHECK_REJECTED(fwd(f.x.cview(), f.w.cview(), f.y.view(), f.saved(0, saved_bytes - 1)),
                       ": the saved activation holds");
        CHECK_REJECTED(fwd(f.x.cview(), f.w.cview(), f.y.view(), compact::bind_saved<saved_t>(nullptr, saved_bytes)),
                       ": the saved activation holds");
        auto& kept = keeping.compressor().projection();
        CHECK_REJECTED(kept.keep(f.make(n, r + 1)), ": storage is");
        CHECK_REJECTED(kept.keep(f.make(n + 1, r)), ": storage is");
        CHECK_REJECTED(kept.keep(f.make(n, r, r, true)), ": storage is null");
        CHECK_REJECTED(kept.keep(f.make(n, r, r - 1)), ": storage has ld=");
        CHECK(kept.keeps()); // still the storage it had
    }
    SUBCASE("compressed_linear::backward")
    {
        auto bwd = [&](compact::matrix_view<const T> dy, compact::matrix_view<const T> w, const saved_t& sv,
                       compact::matrix_view<T> dx, compact::matrix_view<T> g) {
            compact::layer_gradient<T> gr{g, f.db.view(1, m)};
            layer.backward(ctx, dy, w, sv, dx, gr, ws);
        };
        const auto dy = f.dy.cview();
        const auto w = f.w.cview();
        CHECK_REJECTED(bwd(f.make(N, m + 1), w, saved, f.dx.view(), f.g_sub.view()), ": dY is");
        CHECK_REJECTED(bwd(f.make(N, m, m, true), w, saved, f.dx.view(), f.g_sub.view()), ": dY is null");
        CHECK_REJECTED(bwd(f.make(N, m, m - 1), w, saved, f.dx.view(), f.g_sub.view()), ": dY has ld=");
        CHECK_REJECTED(bwd(dy, f.make(m, n - 1), saved, f.dx.view(), f.g_sub.view()), ": W is");
        CHECK_REJECTED(bwd(dy, f.make(m, n, n, true), saved, f.dx.view(), f.g_sub.view()), ": W is null");
        CHECK_REJECTED(bwd(dy, f.make(m, n, n - 1), saved, f.dx.view(), f.g_sub.view()), ": W has ld=");
        // The saved activation must be what this layer's forward wrote for these N rows.
        {
            auto x_big = f.make(N + 1, n); // zeros; Y (N + 1, m) further into the same storage
            const compact::matrix_view<T> y_big{f.storage.data() + 2048, N + 1, m};
            saved_t saved_big = f.saved(0, layer.saved_bytes(N + 1));
            layer.forward(ctx, x_big, w, b, y_big, saved_big, 0, ws);
            CHECK_REJECTED(bwd(dy, w, saved_big, f.dx.view(), f.g_sub.view()), "dY has 6 rows",
                           "the saved activation holds 7");
        }
        {
            const layer_t other(compact::in_features{n}, compact::out_features{m}, 1, 3, compact::rank::fixed{r});
            saved_t saved_other = f.saved(0, saved_bytes);
            other.forward(ctx, f.x.cview(), w, b, f.y.view(), saved_other, 0, ws);
            CHECK_REJECTED(bwd(dy, w, saved_other, f.dx.view(), f.g_sub.view()), "written by compressor 3");
        }
        CHECK_REJECTED(bwd(dy, w, f.saved(0, saved_bytes), f.dx.view(), f.g_sub.view()), "holds nothing");
        {
            // Accumulating onto a gradient of another epoch (resampling every update: step 1 is epoch 1).
            const layer_t every(compact::in_features{n}, compact::out_features{m}, 1, 2, compact::rank::fixed{r},
                                distribution::gaussian, compact::resampling{1});
            saved_t saved1 = f.saved(0, saved_bytes);
            every.forward(ctx, f.x.cview(), w, b, f.y.view(), saved1, 1, ws);
            compact::layer_gradient<T> of_epoch0 = gradient_of_epoch(f.g_sub.view(), 0);
            of_epoch0.bias = f.db.view(1, m);
            CHECK_REJECTED(every.backward(ctx, dy, w, saved1, f.dx.view(), of_epoch0, ws, write_mode::accumulate),
                           "epoch 1", "epoch 0");
        }
        CHECK_REJECTED(bwd(dy, w, saved, {f.dx.storage.data(), N, n + 1}, f.g_sub.view()), ": dX is");
        CHECK_REJECTED(bwd(dy, w, saved, {f.dx.storage.data(), N - 1, n}, f.g_sub.view()), ": dX is");
        CHECK_REJECTED(bwd(dy, w, saved, {nullptr, N, n}, f.g_sub.view()), ": dX is null");
        CHECK_REJECTED(bwd(dy, w, saved, {f.dx.storage.data(), N, n, n - 1}, f.g_sub.view()), ": dX has ld=");
        CHECK_REJECTED(bwd(dy, w, saved, f.dx.view(), {f.g_sub.storage.data(), m, r + 1}), ": G_sub (grads.weight) is");
        CHECK_REJECTED(bwd(dy, w, saved, f.dx.view(), {f.g_sub.storage.data(), m + 1, r}), ": G_sub (grads.weight) is");
        CHECK_REJECTED(bwd(dy, w, saved, f.dx.view(), {nullptr, m, r}), ": G_sub (grads.weight) is null");
        CHECK_REJECTED(bwd(dy, w, saved, f.dx.view(), {f.g_sub.storage.data(), m, r, r - 1}),
                       ": G_sub (grads.weight) has ld=");
        // The bias gradient is (1, m) or empty.
        {
            compact::layer_gradient<T> bad_db{f.g_sub.view(), {f.db.data(), 1, m - 1}};
            CHECK_REJECTED(layer.backward(ctx, dy, w, saved, f.dx.view(), bad_db, ws), ": db (grads.bias) is");
            compact::layer_gradient<T> null_db{f.g_sub.view(), {nullptr, 1, m}};
            CHECK_REJECTED(layer.backward(ctx, dy, w, saved, f.dx.view(), null_db, ws), ": db (grads.bias) is null");
        }
        // In-place use: dX over dY (dX == dY), W or G; G over dY or W; db over dY.
        CHECK_REJECTED(bwd(f.make(N, m), w, saved, f.make(N, n), f.g_sub.view()), ": dX", "overlaps dY");
        CHECK_REJECTED(bwd(dy, f.make(m, n), saved, f.make(N, n), f.g_sub.view()), ": dX", "overlaps W");
        CHECK_REJECTED(bwd(dy, w, saved, f.make(N, n), f.make(m, r)), ": dX", "overlaps G");
        CHECK_REJECTED(bwd(f.make(N, m), w, saved, f.dx.view(), f.make(m, r)), ": G", "overlaps dY");
        CHECK_REJECTED(bwd(dy, f.make(m, n), saved, f.dx.view(), f.make(m, r)), ": G", "overlaps W");
        {
            compact::layer_gradient<T> db_over_dy{f.g_sub.view(), f.make(1, m)};
            CHECK_REJECTED(layer.backward(ctx, f.make(N, m), w, saved, f.dx.view(), db_over_dy, ws), ": db",
                           "overlaps dY");
        }
    }
    SUBCASE("constructors")
    {
        using group_t = compact::input_group<T, compact::rank::fixed, B>;
        using compact::in_features;
        using compact::out_features;
        CHECK_COMPACT_ERROR(layer_t(in_features{0}, out_features{m}, 1, 2, compact::rank::fixed{1}), "in=0");
        CHECK_COMPACT_ERROR(layer_t(in_features{n}, out_features{0}, 1, 2, compact::rank::fixed{1}), "out=0");
        CHECK_COMPACT_ERROR(layer_t(in_features{n}, out_features{m}, 1, 2, compact::rank::fixed{n + 1}), "r=13");
        CHECK_COMPACT_ERROR(layer_t(in_features{n}, out_features{m}, 1, 2, compact::rank::fixed{0}), "r=0");
        CHECK_COMPACT_ERROR(layer_t(out_features{0}, layer.compressor()), "out=0");
        CHECK_COMPACT_ERROR(group_t(in_features{n}, {}, 1, 2, compact::rank::fixed{r}), "out");
        CHECK_COMPACT_ERROR(group_t(in_features{n}, {4, 0, 3}, 1, 2, compact::rank::fixed{r}), "out=0");
        CHECK_COMPACT_ERROR(group_t(in_features{n}, {4, -2, 3}, 1, 2, compact::rank::fixed{r}), "out=-2");
        CHECK_COMPACT_ERROR(group_t(in_features{0}, {4, 3}, 1, 2, compact::rank::fixed{r}), "in=0");
        CHECK_COMPACT_ERROR(group_t(in_features{n}, {4, 3}, 1, 2, compact::rank::fixed{n + 1}), "r=13");
        CHECK_NOTHROW(group_t(in_features{n}, {4, 3}, 1, 2, compact::rank::fixed{r}));
    }
}
