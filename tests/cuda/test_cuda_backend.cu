// Tests of the CUDA backend's primitives on a device (compact/backend/cuda/): each is compared with a
// float64 host reference, or with the CPU backend's expressions bit for bit. Every case needs a GPU and
// is skipped without one, so that the whole binary then reports as skipped (exit 77). The host-side
// checks that run everywhere are in test_cuda_host.cu.
#include <compact/cuda.cuh>

#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

using compact::index_t;
using compact::op;
using compact::projection_spec;
using compact::distribution;
namespace cd = compact::detail;
using backend = compact::cuda;

namespace {

bool has_device() { return backend::device_available(); }

template <class T>
bool same_bits(const T& a, const T& b)
{
    return std::memcmp(&a, &b, sizeof(T)) == 0;
}

/// Deterministic values in [-1, 1), rounded to T.
template <class T>
std::vector<T> random_values(std::size_t count, std::uint64_t seed)
{
    std::vector<T> v(count);
    std::uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
    for (auto& x : v) {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        x = cd::from_double<T>(static_cast<double>(s >> 11) * 0x1p-52 - 1.0);
    }
    return v;
}

template <class T>
compact::device_buffer<T> upload(const std::vector<T>& host)
{
    compact::device_buffer<T> d(host.size(), T{});
    compact::copy_to_device(d.data(), host.data(), host.size());
    return d;
}

template <class T>
std::vector<T> download(const compact::device_buffer<T>& d)
{
    std::vector<T> host(d.size());
    compact::copy_to_host(host.data(), d.data(), d.size());
    return host;
}

/// Unit roundoff of the storage type.
template <class T>
double unit_roundoff()
{
    if constexpr (std::is_same_v<T, double>) return 0x1p-53;
    else if constexpr (std::is_same_v<T, float>) return 0x1p-24;
    else if constexpr (std::is_same_v<T, __half>) return 0x1p-11;
    else return 0x1p-8;
}

struct device_fixture {
    compact::owned_cuda_context owner;
    const backend::context& ctx() const { return owner.get(); }
};

} // namespace

TEST_CASE_TEMPLATE("gemm matches a float64 reference for every transposition" * doctest::skip(!has_device()), T,
                   float, double, __half, __nv_bfloat16)
{
    device_fixture f;
    const index_t m = 37, n = 29, k = 45, pad = 3;
    for (op ta : {op::none, op::transpose})
        for (op tb : {op::none, op::transpose})
            for (double beta : {0.0, 0.5}) {
                CAPTURE(static_cast<int>(ta));
                CAPTURE(static_cast<int>(tb));
                CAPTURE(beta);
                const index_t ar = ta == op::none ? m : k, ac = ta == op::none ? k : m;
                const index_t br = tb == op::none ? k : n, bc = tb == op::none ? n : k;
                const index_t lda = ac + pad, ldb = bc + pad, ldc = n + pad;
                const auto ha = random_values<T>(static_cast<std::size_t>(ar * lda), 1);
                const auto hb = random_values<T>(static_cast<std::size_t>(br * ldb), 2);
                auto hc = random_values<T>(static_cast<std::size_t>(m * ldc), 3);
                if (beta == 0) // beta == 0 must not read C
                    for (auto& x : hc) x = cd::from_double<T>(std::numeric_limits<double>::quiet_NaN());
                auto da = upload(ha), db = upload(hb), dc = upload(hc);
                const T alpha = cd::from_double<T>(1.5);
                backend::gemm<T>(f.ctx(), ta, tb, alpha, {da.data(), ar, ac, lda}, {db.data(), br, bc, ldb},
                                 cd::from_double<T>(beta), {dc.data(), m, n, ldc});
                f.owner.synchronize();
                const auto out = download(dc);
                for (index_t i = 0; i < m; ++i)
                    for (index_t j = 0; j < n; ++j) {
                        double ref = 0, mag = 0;
                        for (index_t p = 0; p < k; ++p) {
                            const double x = cd::to_double(ta == op::none ? ha[i * lda + p] : ha[p * lda + i]);
                            const double y = cd::to_double(tb == op::none ? hb[p * ldb + j] : hb[j * ldb + p]);
                            ref += x * y;
                            mag += std::abs(x * y);
                        }
                        ref *= 1.5;
                        mag *= 1.5;
                        if (beta != 0) {
                            ref += beta * cd::to_double(hc[i * ldc + j]);
                            mag += std::abs(beta * cd::to_double(hc[i * ldc + j]));
                        }
                        // Accumulation in float (double for double), then one rounding to T.
                        const double accum = std::is_same_v<T, double> ? 0x1p-53 : 0x1p-24;
                        const double tol = unit_roundoff<T>() * std::abs(ref) + 2.0 * k * accum * mag + 1e-300;
                        const double got = cd::to_double(out[i * ldc + j]);
                        CAPTURE(i);
                        CAPTURE(j);
                        REQUIRE(std::abs(got - ref) <= tol);
                    }
                // The padding between rows of C is left alone.
                for (index_t i = 0; i < m; ++i)
                    for (index_t j = n; j < ldc; ++j)
                        if (beta != 0) REQUIRE(same_bits(out[i * ldc + j], hc[i * ldc + j]));
            }
}

TEST_CASE("generate_projection gives the CPU's P: bit for bit in float, every distribution" *
          doctest::skip(!has_device()))
{
    device_fixture f;
    const projection_spec specs[] = {
        {200, 50, distribution::gaussian, {0xfeedfacecafebeefull, 12, 5}},
        {64, 16, distribution::gaussian, {0x0123456789abcdefull, 3, 0}},
        {50, 10, distribution::rademacher, {7, 0xffffffffull, 0xffffffffull}},
        {33, 33, distribution::identity, {1, 2, 3}},
    };
    for (const auto& spec : specs) {
        CAPTURE(compact::to_string(spec.dist));
        struct block {
            index_t row0, col0, rows, cols;
        };
        // The whole matrix, and blocks that start and end inside a quad of columns.
        for (const block b : {block{0, 0, spec.n, spec.r}, block{3, 5, spec.n - 7, spec.r - 6}, block{1, 2, 1, 1}}) {
            const index_t ld = b.cols + 1;
            compact::device_buffer<float> d(static_cast<std::size_t>(b.rows * ld), -7.0f);
            backend::generate_projection<float>(f.ctx(), spec, b.row0, b.col0, {d.data(), b.rows, b.cols, ld});
            compact::device_buffer<double> dd(static_cast<std::size_t>(b.rows * b.cols), 0.0);
            backend::generate_projection<double>(f.ctx(), spec, b.row0, b.col0, {dd.data(), b.rows, b.cols});
            f.owner.synchronize();
            const auto out = download(d);
            const auto outd = download(dd);
            for (index_t i = 0; i < b.rows; ++i) {
                for (index_t j = 0; j < b.cols; ++j) {
                    const double ref = compact::projection_element(spec, b.row0 + i, b.col0 + j);
                    CAPTURE(i);
                    CAPTURE(j);
                    REQUIRE(out[i * ld + j] == static_cast<float>(ref));
                    // nvcc contracts a*b+c into FMA in device code (unless built with -fmad=false), so
                    // a double P may differ from the host's in its last bits; rounded to float it agrees.
                    REQUIRE(std::abs(outd[i * b.cols + j] - ref) <= 0x1p-48 * std::abs(ref));
                }
                REQUIRE(out[i * ld + b.cols] == -7.0f); // the padding is untouched
            }
        }
    }
}

TEST_CASE_TEMPLATE("column_sums matches a float64 reference and is bit-reproducible, for awkward shapes" *
                       doctest::skip(!has_device()),
                   T, float, double, __half, __nv_bfloat16)
{
    // The kernel sums in compute_t (float for the 16-bit types) in an order fixed by the shape, not the
    // rows' order, so the bound is the one for any summation order: with u_c the compute type's unit
    // roundoff and u the storage type's, |got - ref| <= u |ref| + (rows + 1) u_c sum_i |A(i, j)| (the
    // extra term covers beta out[j]). That is 2^-24 (rows + 1) relative to sum |A| for float, half and
    // bf16 storage (plus 2^-11 or 2^-8 of |ref| for the final rounding) and 2^-53 (rows + 1) for double.
    device_fixture f;
    struct shape {
        index_t rows, cols, ld;
    };
    const shape shapes[] = {
        {300, 77, 80},     // odd column count, ld > cols
        {1, 50, 50},       // one row
        {513, 1, 1},       // one column
        {1, 1, 1},         // one element
        {1031, 33, 40},    // rows not a multiple of the row slices, a partial column group
        {2049, 1030, 1030}, // several blocks of the widest tiles' neighbours
        {4099, 4096, 4104}, // a bias-gradient shape: 16-byte loads, narrow tiles
        {0, 9, 9},         // no rows: out = beta out
    };
    const double accum = std::is_same_v<T, double> ? 0x1p-53 : 0x1p-24;
    for (const shape sh : shapes) {
        CAPTURE(sh.rows);
        CAPTURE(sh.cols);
        CAPTURE(sh.ld);
        // A starts one element into its buffer, so its rows are not 16-byte aligned (scalar loads); the
        // same values copied to the start of a buffer are (16-byte loads where ld allows): the sums must
        // not change by a bit between the two paths.
        const auto ha = random_values<T>(static_cast<std::size_t>(sh.rows * sh.ld + 1), 4);
        const auto hout = random_values<T>(static_cast<std::size_t>(sh.cols), 5);
        auto da = upload(ha);
        compact::device_buffer<T> aligned(ha.size(), T{});
        compact::copy_to_device(aligned.data(), ha.data() + 1, ha.size() - 1);
        const compact::const_matrix_view<T> a(da.data() + 1, sh.rows, sh.cols, sh.ld);
        const compact::const_matrix_view<T> a_aligned(aligned.data(), sh.rows, sh.cols, sh.ld);
        for (double beta : {0.0, 0.5}) {
            CAPTURE(beta);
            auto run = [&](compact::const_matrix_view<T> view) {
                auto initial = hout;
                if (beta == 0) // beta == 0 must not read out
                    for (auto& x : initial) x = cd::from_double<T>(std::numeric_limits<double>::quiet_NaN());
                auto dout = upload(initial);
                backend::column_sums<T>(f.ctx(), view, cd::from_double<T>(beta), dout.data());
                f.owner.synchronize();
                return download(dout);
            };
            const auto out = run(a);
            for (index_t j = 0; j < sh.cols; ++j) {
                double ref = 0, mag = 0;
                for (index_t i = 0; i < sh.rows; ++i) {
                    const double x = cd::to_double(ha[static_cast<std::size_t>(1 + i * sh.ld + j)]);
                    ref += x;
                    mag += std::abs(x);
                }
                if (beta != 0) {
                    ref += beta * cd::to_double(hout[j]);
                    mag += std::abs(beta * cd::to_double(hout[j]));
                }
                const double tol = unit_roundoff<T>() * std::abs(ref) + static_cast<double>(sh.rows + 1) * accum * mag;
                CAPTURE(j);
                REQUIRE(std::abs(cd::to_double(out[j]) - ref) <= tol);
            }
            // Deterministic: a second run gives the same bits, and so does the other load path.
            const auto again = run(a);
            CHECK(std::memcmp(out.data(), again.data(), out.size() * sizeof(T)) == 0);
            const auto other_path = run(a_aligned);
            CHECK(std::memcmp(out.data(), other_path.data(), out.size() * sizeof(T)) == 0);
        }
    }
}

TEST_CASE("fill, add_row_vector and axpby" * doctest::skip(!has_device()))
{
    device_fixture f;
    const index_t rows = 19, cols = 23, ld = 25;
    const auto hx = random_values<float>(static_cast<std::size_t>(rows * ld), 6);
    const auto hy = random_values<float>(static_cast<std::size_t>(rows * ld), 7);
    const auto hb = random_values<float>(static_cast<std::size_t>(cols), 8);
    auto dx = upload(hx), dy = upload(hy);
    auto db = upload(hb);
    const compact::matrix_view<float> y(dy.data(), rows, cols, ld);

    backend::add_row_vector<float>(f.ctx(), db.data(), y);
    f.owner.synchronize();
    auto out = download(dy);
    for (index_t i = 0; i < rows; ++i)
        for (index_t j = 0; j < ld; ++j)
            REQUIRE(out[i * ld + j] == (j < cols ? hy[i * ld + j] + hb[j] : hy[i * ld + j]));

    backend::axpby<float, float>(f.ctx(), 0.25, {dx.data(), rows, cols, ld}, -2.0, y);
    f.owner.synchronize();
    const auto before = out;
    out = download(dy);
    for (index_t i = 0; i < rows; ++i)
        for (index_t j = 0; j < cols; ++j)
            REQUIRE(out[i * ld + j] == 0.25f * hx[i * ld + j] + -2.0f * before[i * ld + j]);

    // axpby into __half with beta == 0 never reads Y (NaN there stays unread).
    compact::device_buffer<__half> dh(static_cast<std::size_t>(rows * cols), __double2half(NAN));
    backend::axpby<float, __half>(f.ctx(), 2.0, {dx.data(), rows, cols, ld}, 0.0, {dh.data(), rows, cols});
    f.owner.synchronize();
    const auto outh = download(dh);
    for (index_t i = 0; i < rows; ++i)
        for (index_t j = 0; j < cols; ++j)
            REQUIRE(cd::to_double(outh[i * cols + j]) == cd::to_double(cd::from_double<__half>(2.0 * hx[i * ld + j])));

    backend::fill<float>(f.ctx(), y, 3.5f);
    f.owner.synchronize();
    out = download(dy);
    for (index_t i = 0; i < rows; ++i)
        for (index_t j = 0; j < cols; ++j) REQUIRE(out[i * ld + j] == 3.5f);

    compact::device_buffer<std::byte> bytes(5, std::byte{7});
    std::byte hbytes[5];
    compact::copy_to_host(hbytes, bytes.data(), 5);
    for (auto b : hbytes) CHECK(b == std::byte{7});
}

TEST_CASE_TEMPLATE("adam_direction and adamw_update follow SPEC section 3" * doctest::skip(!has_device()), W, float,
                   __half)
{
    device_fixture f;
    const index_t rows = 21, cols = 33;
    const std::size_t count = static_cast<std::size_t>(rows * cols);
    const auto hg = random_values<W>(count, 9);
    const auto hw = random_values<W>(count, 10);
    auto hm = random_values<float>(count, 11);
    auto hv = random_values<float>(count, 12);
    for (auto& x : hv) x = x * x; // V >= 0
    compact::adam_coefficients k;
    k.beta1 = 0.8;
    k.beta2 = 0.99;
    k.eps = 1e-6;
    k.step_size = 0.01;
    k.decay = 1 - 0.01 * 0.1;

    auto dg = upload(hg), dw = upload(hw);
    auto dm = upload(hm), dv = upload(hv);
    compact::device_buffer<W> dd(count, W{});
    backend::adam_direction<W, float, W>(f.ctx(), k, {dg.data(), rows, cols}, {dm.data(), rows, cols},
                                         {dv.data(), rows, cols}, {dd.data(), rows, cols});
    backend::adamw_update<W, float>(f.ctx(), k, {dg.data(), rows, cols}, {dm.data(), rows, cols},
                                    {dv.data(), rows, cols}, {dw.data(), rows, cols});
    f.owner.synchronize();
    const auto m = download(dm), v = download(dv);
    const auto d = download(dd), w = download(dw);
    // cpu::adam_rows' expressions in float (the moments' and, for float or __half weights, the update's
    // compute type), each operation rounded once: the kernels must give these bits exactly. Then a
    // float64 evaluation of SPEC section 3 bounds the whole.
    const float b1 = static_cast<float>(k.beta1), b2 = static_cast<float>(k.beta2), eps = static_cast<float>(k.eps);
    const float c1 = static_cast<float>(1.0 - k.beta1), c2 = static_cast<float>(1.0 - k.beta2);
    const float step = static_cast<float>(k.step_size), decay = static_cast<float>(k.decay);
    for (std::size_t e = 0; e < count; ++e) {
        CAPTURE(e);
        const float gf = cd::to_compute(hg[e]);
        float mf = hm[e], vf = hv[e];
        mf = b1 * mf + c1 * gf;
        vf = b2 * vf + c2 * gf * gf;
        const W d1f = cd::from_compute<W>(mf / (std::sqrt(vf) + eps));
        mf = b1 * mf + c1 * gf;
        vf = b2 * vf + c2 * gf * gf;
        const W wf = cd::from_compute<W>(decay * (cd::to_compute(hw[e]) - step * (mf / (std::sqrt(vf) + eps))));
        REQUIRE(m[e] == mf);
        REQUIRE(v[e] == vf);
        REQUIRE(same_bits(d[e], d1f));
        REQUIRE(same_bits(w[e], wf));

        const double g = cd::to_double(hg[e]);
        double rm = hm[e], rv = hv[e];
        for (int twice = 0; twice < 2; ++twice) {
            rm = k.beta1 * rm + (1 - k.beta1) * g;
            rv = k.beta2 * rv + (1 - k.beta2) * g * g;
        }
        const double rw = k.decay * (cd::to_double(hw[e]) - k.step_size * rm / (std::sqrt(rv) + k.eps));
        REQUIRE(std::abs(m[e] - rm) <= 1e-6);
        REQUIRE(std::abs(v[e] - rv) <= 1e-6 * rv + 1e-12);
        // M's float error (<= 1e-6 absolute) and V's (relative) pass through the division into W.
        const double root = std::sqrt(rv) + k.eps;
        const double through = k.step_size * (1e-6 + 1e-6 * std::abs(rm)) / root;
        REQUIRE(std::abs(cd::to_double(w[e]) - rw) <= 2 * unit_roundoff<W>() * std::abs(rw) + 1e-6 + through);
    }
}

TEST_CASE("linear_layer<float, ratio<1, 4>, cuda>: forward is X W^T + b, and a step changes W" *
          doctest::skip(!has_device()))
{
    device_fixture f;
    const index_t n = 64, m = 48, rows = 32;
    compact::linear_options options;
    options.seed = 42;
    options.layer = 1;
    options.max_rows = rows;
    compact::linear_layer<float, compact::rank::ratio<1, 4>, backend> layer(compact::in_features{n},
                                                                     compact::out_features{m}, options);
    CHECK(layer.rank() == 16);
    const auto hw = random_values<float>(static_cast<std::size_t>(m * n), 13);
    const auto hb = random_values<float>(static_cast<std::size_t>(m), 14);
    const auto hx = random_values<float>(static_cast<std::size_t>(rows * n), 15);
    compact::copy_to_device(layer.weight().data, hw.data(), hw.size());
    compact::copy_to_device(layer.bias(), hb.data(), hb.size());
    auto dx = upload(hx);
    compact::device_buffer<float> dy(static_cast<std::size_t>(rows * m), 0.0f);
    compact::device_buffer<float> ddx(static_cast<std::size_t>(rows * n), 0.0f);
    layer.forward(f.ctx(), {dx.data(), rows, n}, {dy.data(), rows, m});
    f.owner.synchronize();
    const auto y = download(dy);
    for (index_t i = 0; i < rows; ++i)
        for (index_t j = 0; j < m; ++j) {
            double ref = hb[j], mag = std::abs(hb[j]);
            for (index_t p = 0; p < n; ++p) {
                ref += static_cast<double>(hx[i * n + p]) * hw[j * n + p];
                mag += std::abs(static_cast<double>(hx[i * n + p]) * hw[j * n + p]);
            }
            REQUIRE(std::abs(y[i * m + j] - ref) <= 1e-5 * mag);
        }
    layer.backward(f.ctx(), {dy.data(), rows, m}, {ddx.data(), rows, n});
    layer.step(f.ctx(), {});
    f.owner.synchronize();
    std::vector<float> w_after(hw.size());
    compact::copy_to_host(w_after.data(), layer.weight().data, w_after.size());
    CHECK(std::memcmp(w_after.data(), hw.data(), hw.size() * sizeof(float)) != 0);
    CHECK(layer.updates() == 1);
}

TEST_CASE("linear_layer<float, rank::full, cuda>: one step is plain AdamW on the exact gradient" *
          doctest::skip(!has_device()))
{
    device_fixture f;
    const index_t n = 40, m = 24, rows = 16;
    compact::linear_options options;
    options.seed = 7;
    options.layer = 3;
    options.max_rows = rows;
    compact::linear_layer<float, compact::rank::full, backend> layer(compact::in_features{n}, compact::out_features{m},
                                                               options);
    REQUIRE(layer.rank() == n);
    const auto hw = random_values<float>(static_cast<std::size_t>(m * n), 16);
    const auto hb = random_values<float>(static_cast<std::size_t>(m), 17);
    const auto hx = random_values<float>(static_cast<std::size_t>(rows * n), 18);
    const auto hdy = random_values<float>(static_cast<std::size_t>(rows * m), 19);
    compact::copy_to_device(layer.weight().data, hw.data(), hw.size());
    compact::copy_to_device(layer.bias(), hb.data(), hb.size());
    auto dx = upload(hx), ddy = upload(hdy);
    compact::device_buffer<float> dy_out(static_cast<std::size_t>(rows * m), 0.0f);
    layer.forward(f.ctx(), {dx.data(), rows, n}, {dy_out.data(), rows, m});
    layer.backward(f.ctx(), {ddy.data(), rows, m}, {});
    // The gradients the step will use: checked against float64, then the reference step starts from them
    // (AdamW's first step is m / (sqrt(v) + eps) = sign(g) for |g| >> eps, so near-zero entries would
    // amplify float rounding in g beyond any useful bound on W).
    f.owner.synchronize();
    std::vector<float> g_sub(static_cast<std::size_t>(m * n)), g_b(static_cast<std::size_t>(m));
    compact::copy_to_host(g_sub.data(), layer.gradient().data, g_sub.size());
    compact::copy_to_host(g_b.data(), layer.bias_gradient(), g_b.size());
    compact::adamw_params hyper;
    hyper.lr = 1e-2;
    hyper.weight_decay = 0.1;
    layer.step(f.ctx(), hyper);
    f.owner.synchronize();
    std::vector<float> w(hw.size()), b(hb.size());
    compact::copy_to_host(w.data(), layer.weight().data, w.size());
    compact::copy_to_host(b.data(), layer.bias(), b.size());

    // SPEC section 3 at t = 1 with zero moments, in float64, for W (gradient dY^T X) and b (sum of dY).
    const double b1 = hyper.beta1, b2 = hyper.beta2;
    const double eta = hyper.lr * std::sqrt(1 - b2) / (1 - b1), decay = 1 - hyper.lr * hyper.weight_decay;
    auto adamw = [&](double w0, double g) {
        const double mm = (1 - b1) * g, vv = (1 - b2) * g * g;
        return decay * (w0 - eta * mm / (std::sqrt(vv) + hyper.eps));
    };
    for (index_t i = 0; i < m; ++i) {
        double db = 0;
        for (index_t r = 0; r < rows; ++r) db += hdy[r * m + i];
        CHECK(std::abs(g_b[i] - db) <= 1e-5);
        CHECK(std::abs(b[i] - adamw(hb[i], g_b[i])) <= 1e-6);
        for (index_t j = 0; j < n; ++j) {
            double g = 0;
            for (index_t r = 0; r < rows; ++r) g += static_cast<double>(hdy[r * m + i]) * hx[r * n + j];
            CAPTURE(i);
            CAPTURE(j);
            REQUIRE(std::abs(g_sub[i * n + j] - g) <= 1e-5); // rank::full: G_sub is G itself
            REQUIRE(std::abs(w[i * n + j] - adamw(hw[i * n + j], g_sub[i * n + j])) <= 1e-6);
        }
    }
}

TEST_CASE("linear_layer<float, ratio<1, 4>, cuda>: keeping P changes no bit of the training" *
          doctest::skip(!has_device()))
{
    device_fixture f;
    const index_t n = 48, m = 20, rows = 12;
    const auto hw = random_values<float>(static_cast<std::size_t>(m * n), 20);
    const auto hx = random_values<float>(static_cast<std::size_t>(rows * n), 21);
    const auto hdy = random_values<float>(static_cast<std::size_t>(rows * m), 22);
    auto dx = upload(hx), ddy = upload(hdy);
    compact::device_buffer<float> y(static_cast<std::size_t>(rows * m), 0.0f);
    std::vector<float> result[2];
    for (int keep = 0; keep < 2; ++keep) {
        compact::linear_options options;
        options.seed = 99;
        options.layer = 4;
        options.max_rows = rows;
        options.resample.gap = 2; // three epochs of P in five steps
        options.keep_projection = keep == 1;
        compact::linear_layer<float, compact::rank::ratio<1, 4>, backend> layer(compact::in_features{n},
                                                                         compact::out_features{m}, options);
        compact::copy_to_device(layer.weight().data, hw.data(), hw.size());
        for (int step = 0; step < 5; ++step) {
            layer.forward(f.ctx(), {dx.data(), rows, n}, {y.data(), rows, m});
            layer.backward(f.ctx(), {ddy.data(), rows, m}, {});
            layer.step(f.ctx(), {});
        }
        f.owner.synchronize();
        result[keep].resize(hw.size());
        compact::copy_to_host(result[keep].data(), layer.weight().data, hw.size());
    }
    CHECK(std::memcmp(result[0].data(), result[1].data(), hw.size() * sizeof(float)) == 0);
    CHECK(std::memcmp(result[0].data(), hw.data(), hw.size() * sizeof(float)) != 0);
}

namespace {

using bf16 = __nv_bfloat16;

/// Gradients with a steady part per element (base, +-[0.2, 1)) and noise in [-0.2, 0.2), in bf16.
std::vector<bf16> drifting_gradient(const std::vector<double>& base, std::uint64_t step)
{
    const auto noise = random_values<double>(base.size(), 1000 + step);
    std::vector<bf16> g(base.size());
    for (std::size_t i = 0; i < g.size(); ++i) g[i] = cd::from_double<bf16>(base[i] + 0.2 * noise[i]);
    return g;
}

std::vector<double> drift_base(std::size_t count, std::uint64_t seed)
{
    auto base = random_values<double>(count, seed);
    for (auto& b : base) b = (b < 0 ? -1.0 : 1.0) * (0.2 + 0.8 * std::abs(b));
    return base;
}

/// Weights in +-[0.5, 1), rounded to bf16: half an ulp there is 2^-9 = 2.0e-3.
std::vector<bf16> large_weights(std::size_t count, std::uint64_t seed)
{
    auto w = random_values<double>(count, seed);
    std::vector<bf16> out(count);
    for (std::size_t i = 0; i < count; ++i) out[i] = cd::from_double<bf16>((w[i] < 0 ? -1.0 : 1.0) * (0.5 + 0.5 * std::abs(w[i])));
    return out;
}

/// ||got - start - (want - start)||_2 / ||want - start||_2.
template <class T>
double change_error(const std::vector<T>& got, const std::vector<double>& want, const std::vector<bf16>& start)
{
    double diff = 0, norm = 0;
    for (std::size_t i = 0; i < want.size(); ++i) {
        const double s = cd::to_double(start[i]);
        const double d = (cd::to_double(got[i]) - s) - (want[i] - s);
        diff += d * d;
        norm += (want[i] - s) * (want[i] - s);
    }
    return std::sqrt(diff) / std::sqrt(norm);
}

/// Transformers-style AdamW moments in float64; returns eta_t and leaves M / (sqrt(V) + eps) in `direction`.
struct reference_adam {
    std::vector<double> m, v, direction;
    std::uint64_t t = 0;
    explicit reference_adam(std::size_t size) : m(size, 0.0), v(size, 0.0), direction(size, 0.0) {}
    double update(const compact::adamw_params& h, const std::vector<bf16>& g)
    {
        ++t;
        for (std::size_t i = 0; i < m.size(); ++i) {
            const double gi = cd::to_double(g[i]);
            m[i] = h.beta1 * m[i] + (1 - h.beta1) * gi;
            v[i] = h.beta2 * v[i] + (1 - h.beta2) * gi * gi;
            direction[i] = m[i] / (std::sqrt(v[i]) + h.eps);
        }
        const double td = static_cast<double>(t);
        return h.lr * std::sqrt(1 - std::pow(h.beta2, td)) / (1 - std::pow(h.beta1, td));
    }
};

} // namespace

// bf16 weights with half an ulp of 2e-3 in +-[0.5, 1), and AdamW steps of at most about 3.2 lr (times
// |N P^T|, about 1, for the subspace): at lr = 1e-4 bf16 weights alone stall, while a float master
// accumulates 600 steps (a change of about 0.06, 16 bf16 ulps) to float precision.
TEST_CASE("adamw and subspace_adamw with a float master beside bf16 weights track float64; bf16 alone stalls" *
          doctest::skip(!has_device()))
{
    device_fixture f;
    compact::adamw_params h;
    h.lr = 1e-4;
    h.weight_decay = 0.1;
    constexpr int steps = 600;

    SUBCASE("adamw::step (the identity path)")
    {
        const index_t rows = 16, cols = 40;
        const std::size_t count = static_cast<std::size_t>(rows * cols);
        const auto w_start = large_weights(count, 30);
        const auto base = drift_base(count, 31);
        std::vector<float> master_start(count);
        for (std::size_t i = 0; i < count; ++i) master_start[i] = cd::to_compute(w_start[i]);
        auto dw = upload(w_start), dw_plain = upload(w_start);
        auto dmaster = upload(master_start);
        compact::device_buffer<float> dm(count, 0.0f), dv(count, 0.0f), dm_plain(count, 0.0f), dv_plain(count, 0.0f);
        compact::adam_counters c, c_plain;
        std::vector<double> w_ref(count);
        for (std::size_t i = 0; i < count; ++i) w_ref[i] = cd::to_double(w_start[i]);
        reference_adam ref(count);
        for (int s = 0; s < steps; ++s) {
            const auto g = drifting_gradient(base, static_cast<std::uint64_t>(s));
            auto dg = upload(g);
            compact::adamw<backend>::step(f.ctx(), h, compact::matrix_view<bf16>(dw.data(), rows, cols),
                                          compact::const_matrix_view<bf16>(dg.data(), rows, cols),
                                          compact::matrix_view<float>(dm.data(), rows, cols),
                                          compact::matrix_view<float>(dv.data(), rows, cols), c,
                                          compact::matrix_view<float>(dmaster.data(), rows, cols));
            compact::adamw<backend>::step(f.ctx(), h, compact::matrix_view<bf16>(dw_plain.data(), rows, cols),
                                          compact::const_matrix_view<bf16>(dg.data(), rows, cols),
                                          compact::matrix_view<float>(dm_plain.data(), rows, cols),
                                          compact::matrix_view<float>(dv_plain.data(), rows, cols), c_plain);
            f.owner.synchronize(); // dg goes out of scope
            const double eta = ref.update(h, g);
            for (std::size_t i = 0; i < count; ++i) {
                w_ref[i] -= eta * ref.direction[i];
                w_ref[i] -= h.lr * h.weight_decay * w_ref[i];
            }
        }
        const auto w = download(dw), w_plain = download(dw_plain);
        const auto master = download(dmaster);
        // Float master: per step a rounding of the master (at most 3e-8 against a step of about 1e-4)
        // and float moments (1e-7 relative): 3e-4 even if every rounding went the same way; 1e-3 stated.
        const double master_error = change_error(master, w_ref, w_start);
        CAPTURE(master_error);
        CHECK(master_error <= 1e-3);
        bool rounded = true;
        for (std::size_t i = 0; i < count; ++i) rounded = rounded && same_bits(w[i], cd::from_double<bf16>(master[i]));
        CHECK(rounded);
        // W is the master rounded to bf16: within half an ulp (2e-3, 1.1e-3 rms) against a change of about
        // 0.06: about 2% rms; 10% stated.
        CHECK(change_error(w, w_ref, w_start) <= 0.1);
        // Negative control: the bf16 weights alone do not move.
        CHECK(std::memcmp(w_plain.data(), w_start.data(), count * sizeof(bf16)) == 0);
    }

    SUBCASE("subspace_adamw::step (gaussian P, r = 16)")
    {
        const index_t m = 16, n = 64, r = 16;
        const std::uint64_t epoch = 2;
        const compact::projection_source<bf16, backend> projection(n, r, distribution::gaussian, 0xb16, 5);
        const compact::subspace_adamw<bf16, backend, float> optimizer(compact::out_features{m}, projection);
        // The P the forward pass uses: generated in bf16 (one rounding from double), widened by the step.
        std::vector<double> p(static_cast<std::size_t>(n * r));
        for (index_t i = 0; i < n; ++i)
            for (index_t j = 0; j < r; ++j)
                p[static_cast<std::size_t>(i * r + j)] =
                    cd::to_double(cd::from_double<bf16>(compact::projection_element(projection.spec(epoch), i, j)));
        const std::size_t count = static_cast<std::size_t>(m * n), small = static_cast<std::size_t>(m * r);
        const auto w_start = large_weights(count, 40);
        const auto base = drift_base(small, 41);
        std::vector<float> master_start(count);
        for (std::size_t i = 0; i < count; ++i) master_start[i] = cd::to_compute(w_start[i]);
        auto dw = upload(w_start), dw_plain = upload(w_start);
        auto dmaster = upload(master_start);
        compact::device_buffer<float> dm(small, 0.0f), dv(small, 0.0f), dm_plain(small, 0.0f), dv_plain(small, 0.0f);
        compact::device_buffer<std::byte> ws(optimizer.workspace_bytes(true), std::byte{0});
        compact::device_buffer<std::byte> ws_plain(optimizer.workspace_bytes(), std::byte{0});
        compact::adam_counters c, c_plain;
        std::vector<double> w_ref(count);
        for (std::size_t i = 0; i < count; ++i) w_ref[i] = cd::to_double(w_start[i]);
        reference_adam ref(small);
        for (int s = 0; s < steps; ++s) {
            const auto g = drifting_gradient(base, static_cast<std::uint64_t>(s));
            auto dg = upload(g);
            // No backward here: the gradient of `epoch` is recorded by hand.
            compact::layer_gradient<bf16> grads{{dg.data(), m, r}};
            grads.epoch = epoch;
            grads.written = true;
            optimizer.step(f.ctx(), h, projection, {dw.data(), m, n}, grads, {dm.data(), m, r}, {dv.data(), m, r}, c,
                           {ws.data(), ws.size()}, {dmaster.data(), m, n});
            optimizer.step(f.ctx(), h, projection, {dw_plain.data(), m, n}, grads, {dm_plain.data(), m, r},
                           {dv_plain.data(), m, r}, c_plain, {ws_plain.data(), ws_plain.size()});
            f.owner.synchronize();
            const double eta = ref.update(h, g);
            for (index_t i = 0; i < m; ++i)
                for (index_t j = 0; j < n; ++j) {
                    double sum = 0;
                    for (index_t k = 0; k < r; ++k)
                        sum += ref.direction[static_cast<std::size_t>(i * r + k)] * p[static_cast<std::size_t>(j * r + k)];
                    double& x = w_ref[static_cast<std::size_t>(i * n + j)];
                    x -= eta * h.alpha * sum;
                    x -= h.lr * h.weight_decay * x;
                }
        }
        const auto w = download(dw), w_plain = download(dw_plain);
        const auto master = download(dmaster);
        const double master_error = change_error(master, w_ref, w_start);
        CAPTURE(master_error);
        CHECK(master_error <= 1e-3);
        bool rounded = true;
        for (std::size_t i = 0; i < count; ++i) rounded = rounded && same_bits(w[i], cd::from_double<bf16>(master[i]));
        CHECK(rounded);
        CHECK(change_error(w, w_ref, w_start) <= 0.1);
        // Negative control: |eta (N P^T)_ij| is about lr |N(0, 1)|, far below half an ulp, so bf16 alone loses
        // (nearly) all of it.
        const double plain_error = change_error(w_plain, w_ref, w_start);
        CAPTURE(plain_error);
        CHECK(plain_error > 0.5);
    }
}
