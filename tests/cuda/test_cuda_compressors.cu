// tests/cuda/test_cuda_compressors.cu: VeLoRA (compress/velora.hpp) and WTA-CRS (compress/wta_crs.hpp) on the
// CUDA backend, and the backend primitives they added (row_sq_norms, gather_rows). The CUDA targets do
// not link Eigen, so the CPU backend's results are reproduced here by float64 host references of the
// same definitions (tests/test_velora.cpp and tests/test_wta_crs.cpp check the CPU backend against the
// same references), and WTA-CRS's sampling decision by the very host function both backends call
// (detail::wta_crs_select) on float64 norms. The device cases skip without a GPU; the host cases (the
// concept, the state extension, compilation of every member and kernel for float, double and 16-bit
// storage) run everywhere.
//
// Tolerances, relative Frobenius error: float 1e-5, double 1e-12; gather_rows and the kept row indices
// are compared exactly.
#include <compact/cuda.cuh>
#include <compact/io/linear_layer_checkpoint.hpp>

#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <memory>
#include <type_traits>
#include <string>
#include <vector>

#include <unistd.h>

using compact::index_t;
using backend = compact::cuda;

// Every member and every kernel they launch, for the storage types the CUDA backend takes.
template class compact::linear_layer<float, compact::velora, compact::cuda>;
template class compact::linear_layer<double, compact::velora, compact::cuda>;
template class compact::linear_layer<__half, compact::velora, compact::cuda, float>;
template class compact::linear_layer<float, compact::wta_crs, compact::cuda>;
template class compact::linear_layer<double, compact::wta_crs, compact::cuda>;
template class compact::linear_layer<__nv_bfloat16, compact::wta_crs, compact::cuda, float>;
template class compact::input_group<float, compact::velora, compact::cuda>;
template class compact::input_group<float, compact::wta_crs, compact::cuda>;

namespace {

bool has_device() { return backend::device_available(); }

template <class T>
constexpr double tolerance = sizeof(T) == 4 ? 1e-5 : 1e-12;

template <class T>
std::vector<T> random_values(std::size_t count, std::uint64_t seed, double lo = -1.0, double hi = 1.0)
{
    std::vector<T> v(count);
    std::uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
    for (auto& x : v) {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        x = static_cast<T>(lo + (hi - lo) * (static_cast<double>(s >> 11) * 0x1p-53));
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
std::vector<T> download(const T* device, std::size_t count)
{
    std::vector<T> host(count);
    compact::copy_to_host(host.data(), device, count);
    return host;
}

template <class T, class U>
double rel_error(const std::vector<T>& got, const std::vector<U>& want)
{
    double diff = 0, norm = 0;
    for (std::size_t i = 0; i < want.size(); ++i) {
        const double d = static_cast<double>(got[i]) - static_cast<double>(want[i]);
        diff += d * d;
        norm += static_cast<double>(want[i]) * static_cast<double>(want[i]);
    }
    return std::sqrt(diff / norm);
}

/// Rows whose norms differ a lot, so that WTA-CRS finds winners.
template <class T>
std::vector<T> uneven_rows(index_t rows, index_t cols, std::uint64_t seed)
{
    auto v = random_values<T>(static_cast<std::size_t>(rows * cols), seed);
    for (index_t i = 0; i < rows; i += 6)
        for (index_t j = 0; j < cols; ++j) v[static_cast<std::size_t>(i * cols + j)] *= T(30);
    return v;
}

/// Forward and backward of compressed_linear<T, Policy, B> on (x, w, dy) at steps 0 and 1 (the second
/// sees the state the first left); returns G of step 1, and step 0's saved bytes in *first_saved.
template <class B, class T, class Policy>
std::vector<T> gradient_on(const Policy& policy, index_t n, index_t m, index_t rows, const std::vector<T>& x,
                           const std::vector<T>& w, const std::vector<T>& dy, std::vector<std::byte>* first_saved)
{
    compact::compressed_linear<T, Policy, B> fc(compact::in_features{n}, compact::out_features{m}, 7, 3, policy);
    typename B::template buffer<std::byte> state(fc.state_bytes(rows), std::byte{0}),
        saved_memory(fc.saved_bytes(rows), std::byte{0}), ws(fc.workspace_bytes(rows), std::byte{0});
    typename B::template buffer<T> xd(x.size(), T{}), wd(w.size(), T{}), dyd(dy.size(), T{}),
        y(static_cast<std::size_t>(rows * m), T{}), g(static_cast<std::size_t>(m * n), T{});
    compact::owned_cuda_context owner;
    const typename B::context ctx = owner.get();
    B::copy_from_host(ctx, x.data(), xd.data(), x.size());
    B::copy_from_host(ctx, w.data(), wd.data(), w.size());
    B::copy_from_host(ctx, dy.data(), dyd.data(), dy.size());
    fc.bind_state(ctx, state.data(), state.size());
    auto saved = compact::bind_saved<typename decltype(fc)::saved_type>(saved_memory.data(), saved_memory.size());
    for (std::uint64_t step = 0; step < 2; ++step) {
        fc.forward(ctx, {xd.data(), rows, n}, {wd.data(), m, n}, {}, {y.data(), rows, m}, saved, step,
                   {ws.data(), ws.size()});
        if (step == 0 && first_saved) {
            first_saved->resize(fc.saved_bytes(rows));
            B::copy_to_host(ctx, saved_memory.data(), first_saved->data(), first_saved->size());
        }
        compact::layer_gradient<T> grads{{g.data(), m, n}, {}};
        fc.backward(ctx, {dyd.data(), rows, m}, {wd.data(), m, n}, saved, {}, grads, {ws.data(), ws.size()});
    }
    std::vector<T> out(g.size());
    B::copy_to_host(ctx, g.data(), out.data(), out.size());
    return out;
}

} // namespace

TEST_CASE("velora and wta_crs meet the compressor concept with state on the cuda backend")
{
    using v = compact::velora_compressor<float, backend>;
    using c = compact::wta_crs_compressor<float, backend>;
    static_assert(compact::is_compressor<v> && compact::is_compressor<c>);
    static_assert(compact::has_compressor_state<v> && compact::has_compressor_state<c>);
    static_assert(!compact::has_compressor_state<compact::random_projection<float, backend, compact::rank::fixed>>);
    static_assert(!v::subspace && !c::subspace);
    const compact::compressor_setup setup{64, 8, 1, 2};
    const v vc(setup, compact::velora{16});
    const c cc(setup, compact::wta_crs{0.25});
    CHECK(vc.saved_bytes(10) == 10 * 16 * sizeof(float));
    CHECK(cc.saved_bytes(10) == compact::detail::align_up(3 * 64 * sizeof(float)) + 3 * 8);
    CHECK(vc.state_bytes(10) == compact::detail::align_up(4 * sizeof(float)));
    CHECK(cc.state_bytes(10) == 64 + compact::detail::align_up(10 * sizeof(float)));
    CHECK(compact::compressor_state_bytes(compact::random_projection<float, backend, compact::rank::fixed>(
                                              setup, compact::rank::fixed{4}),
                                          10) == 0);
}

TEST_CASE_TEMPLATE("row_sq_norms and gather_rows match float64 references" * doctest::skip(!has_device()), T, float,
                   double)
{
    constexpr index_t rows = 37, cols = 300;
    const auto x = random_values<T>(static_cast<std::size_t>(rows * cols), 31);
    compact::owned_cuda_context owner;
    auto xd = upload(x);
    compact::device_buffer<T> norms(rows, T(1));
    backend::row_sq_norms<T, T>(owner.get(), {xd.data(), rows, cols}, T(0.5), norms.data());
    std::vector<double> want(rows);
    for (index_t i = 0; i < rows; ++i) {
        double s = 0.5;
        for (index_t j = 0; j < cols; ++j) s += static_cast<double>(x[i * cols + j]) * static_cast<double>(x[i * cols + j]);
        want[static_cast<std::size_t>(i)] = s;
    }
    owner.synchronize();
    CHECK(rel_error(download(norms.data(), rows), want) <= tolerance<T>);

    const std::vector<index_t> idx{3, 0, 36, 3, 17};
    const std::vector<T> weights{T(1), T(0.5), T(-2), T(3.25), T(1e-3)};
    auto idx_d = upload(idx);
    auto w_d = upload(weights);
    compact::device_buffer<T> out(5 * cols, T{}), copy(5 * cols, T{});
    backend::gather_rows<T, T>(owner.get(), {xd.data(), rows, cols}, idx_d.data(), w_d.data(), {out.data(), 5, cols});
    backend::gather_rows<T, T>(owner.get(), {xd.data(), rows, cols}, idx_d.data(), static_cast<const T*>(nullptr),
                               {copy.data(), 5, cols});
    std::vector<T> want_out(5 * cols), want_copy(5 * cols);
    for (std::size_t k = 0; k < idx.size(); ++k)
        for (index_t j = 0; j < cols; ++j) {
            want_copy[k * cols + j] = x[static_cast<std::size_t>(idx[k] * cols + j)];
            want_out[k * cols + j] = want_copy[k * cols + j] * weights[k]; // one rounding, as the kernel
        }
    owner.synchronize();
    CHECK(download(out.data(), out.size()) == want_out);
    CHECK(download(copy.data(), copy.size()) == want_copy);
}

TEST_CASE_TEMPLATE("velora on cuda: v, and G = scale dY^T X^, match float64" * doctest::skip(!has_device()), T, float,
                   double)
{
    constexpr index_t n = 64, m = 24, rows = 50, groups = 8, s = n / groups;
    const auto x = random_values<T>(static_cast<std::size_t>(rows * n), 1, -0.3, 1.0);
    const auto w = random_values<T>(static_cast<std::size_t>(m * n), 2);
    const auto dy = random_values<T>(static_cast<std::size_t>(rows * m), 3);
    const auto g = gradient_on<compact::cuda>(compact::velora{groups, 0.5}, n, m, rows, x, w, dy, nullptr);
    std::vector<double> v(s, 0.0);
    for (index_t i = 0; i < rows * groups; ++i)
        for (index_t t = 0; t < s; ++t) v[static_cast<std::size_t>(t)] += static_cast<double>(x[static_cast<std::size_t>(i * s + t)]);
    double norm = 0;
    for (double e : v) norm += e * e;
    for (double& e : v) e /= std::sqrt(norm);
    std::vector<double> x_hat(x.size());
    for (index_t i = 0; i < rows * groups; ++i) {
        double c = 0;
        for (index_t t = 0; t < s; ++t) c += static_cast<double>(x[static_cast<std::size_t>(i * s + t)]) * v[static_cast<std::size_t>(t)];
        for (index_t t = 0; t < s; ++t) x_hat[static_cast<std::size_t>(i * s + t)] = c * v[static_cast<std::size_t>(t)];
    }
    std::vector<double> want(static_cast<std::size_t>(m * n), 0.0);
    for (index_t i = 0; i < rows; ++i)
        for (index_t a = 0; a < m; ++a)
            for (index_t j = 0; j < n; ++j)
                want[static_cast<std::size_t>(a * n + j)] += 0.5 * static_cast<double>(dy[static_cast<std::size_t>(i * m + a)]) * x_hat[static_cast<std::size_t>(i * n + j)];
    CHECK(rel_error(g, want) <= tolerance<T>);
}

TEST_CASE_TEMPLATE("wta_crs on cuda: the host's sampling decision and G = sum_kept w dY^T X" * doctest::skip(!has_device()),
                   T, float, double)
{
    constexpr index_t n = 40, m = 12, rows = 60;
    const auto x = uneven_rows<T>(rows, n, 4);
    const auto w = random_values<T>(static_cast<std::size_t>(m * n), 5);
    const auto dy = random_values<T>(static_cast<std::size_t>(rows * m), 6);
    auto sq_norms = [](const std::vector<T>& a, index_t r, index_t c) {
        std::vector<double> out(static_cast<std::size_t>(r), 0.0);
        for (index_t i = 0; i < r; ++i)
            for (index_t j = 0; j < c; ++j) out[static_cast<std::size_t>(i)] += static_cast<double>(a[static_cast<std::size_t>(i * c + j)]) * static_cast<double>(a[static_cast<std::size_t>(i * c + j)]);
        return out;
    };
    for (const double ratio : {1.0, 0.3}) {
        CAPTURE(ratio);
        std::vector<std::byte> saved;
        const compact::wta_crs policy{ratio};
        const auto g = gradient_on<compact::cuda>(policy, n, m, rows, x, w, dy, &saved);
        const index_t k = compact::wta_crs_compressor<T, compact::cuda>({n, m}, policy).kept_rows(rows);
        // Step 0 (in `saved`): uniform dY norms; step 1 (G): the norms of step 0's dY.
        compact::detail::wta_crs_scratch s0, s1;
        auto x_sq = sq_norms(x, rows, n);
        compact::detail::wta_crs_select(s0, x_sq.data(), nullptr, rows, k, 7, 3, 0, 1e-3);
        std::vector<index_t> got(static_cast<std::size_t>(k));
        std::memcpy(got.data(), saved.data() + compact::detail::align_up(static_cast<std::size_t>(k * n) * sizeof(T)),
                    got.size() * sizeof(index_t));
        CHECK(got == s0.selection.rows);
        x_sq = sq_norms(x, rows, n);
        const auto dy_sq = sq_norms(dy, rows, m);
        compact::detail::wta_crs_select(s1, x_sq.data(), dy_sq.data(), rows, k, 7, 3, 1, 1e-3);
        std::vector<double> want(static_cast<std::size_t>(m * n), 0.0);
        for (std::size_t t = 0; t < s1.selection.rows.size(); ++t) {
            const index_t i = s1.selection.rows[t];
            for (index_t a = 0; a < m; ++a)
                for (index_t j = 0; j < n; ++j)
                    want[static_cast<std::size_t>(a * n + j)] += s1.selection.weights[t] * static_cast<double>(dy[static_cast<std::size_t>(i * m + a)]) * static_cast<double>(x[static_cast<std::size_t>(i * n + j)]);
        }
        CHECK(rel_error(g, want) <= tolerance<T>);
    }
}

TEST_CASE("a cuda linear_layer with wta_crs resumes from a checkpoint bit for bit" * doctest::skip(!has_device()))
{
    using layer_t = compact::linear_layer<float, compact::wta_crs, compact::cuda>;
    constexpr index_t n = 32, m = 8, rows = 24;
    compact::owned_cuda_context owner;
    const auto& ctx = owner.get();
    compact::linear_options o;
    o.seed = 2;
    o.layer = 6;
    o.max_rows = rows;
    layer_t a(compact::in_features{n}, compact::out_features{m}, o, compact::wta_crs{0.4});
    const auto w0 = random_values<float>(static_cast<std::size_t>(m * n), 9);
    compact::copy_to_device(a.weight().data, w0.data(), w0.size());
    compact::adamw_params h;
    h.lr = 1e-2;
    auto train = [&](layer_t& l, std::uint64_t seed) {
        auto x = upload(uneven_rows<float>(rows, n, seed));
        auto dy = upload(random_values<float>(static_cast<std::size_t>(rows * m), seed + 1000));
        compact::device_buffer<float> y(static_cast<std::size_t>(rows * m), 0.0f);
        l.forward(ctx, {x.data(), rows, n}, {y.data(), rows, m});
        l.backward(ctx, {dy.data(), rows, m}, {});
        l.step(ctx, h);
        owner.synchronize();
    };
    train(a, 1);
    train(a, 2);
    const std::string path =
        (std::filesystem::temp_directory_path() / ("compact-cuda-wta-" + std::to_string(::getpid()) + ".ckpt")).string();
    {
        compact::checkpoint_writer wr;
        compact::save_state(wr, "fc", a, compact::weight_storage::checkpoint, ctx);
        wr.write(path);
    }
    train(a, 3);
    train(a, 4);
    layer_t b(compact::in_features{n}, compact::out_features{m}, o, compact::wta_crs{0.4});
    compact::load_state(compact::checkpoint_reader::read_file(path), "fc", b, compact::weight_storage::checkpoint, ctx);
    train(b, 3);
    train(b, 4);
    CHECK(download(a.weight().data, static_cast<std::size_t>(m * n)) == download(b.weight().data, static_cast<std::size_t>(m * n)));
    std::filesystem::remove(path);
}
