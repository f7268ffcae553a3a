// Host-side tests of what nvcc compiles for the CUDA backend: the 16-bit conversions, the shared
// COMPACT_HD random and projection code (which must give the g++-built library's committed values),
// and error reporting. They need no GPU; the device cases are in test_cuda_backend.cu. The one exception,
// a CUDA layer's checkpoint round trip, compiles everywhere and runs only with a device (skipped otherwise).
#include <compact/cuda.cuh>
#include <compact/io/checkpoint.hpp>
#include <compact/io/linear_layer_checkpoint.hpp>

#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

using compact::index_t;
using compact::op;
using compact::projection_spec;
using compact::distribution;
namespace cd = compact::detail;
using backend = compact::cuda;

// The algorithms compile against the cuda backend for every storage type and moment type it takes
// (device code included: explicit instantiation builds every member and every kernel it launches).
template class compact::linear_layer<float, compact::rank::ratio<1, 4>, compact::cuda>;
template class compact::linear_layer<double, compact::rank::ratio<1, 4>, compact::cuda>;
template class compact::linear_layer<__half, compact::rank::fixed, compact::cuda>;
template class compact::linear_layer<__nv_bfloat16, compact::rank::full, compact::cuda, double>;
// bf16 weights with float moments: with options.master_weights, the float master paths of both steps.
template class compact::linear_layer<__nv_bfloat16, compact::rank::ratio<1, 4>, compact::cuda, float>;

namespace {

template <class T>
std::uint32_t bits_of(T x)
{
    std::uint16_t b = 0;
    static_assert(sizeof(T) == 2);
    std::memcpy(&b, &x, 2);
    return b;
}

template <class T>
T from_bits(std::uint16_t b)
{
    T x;
    std::memcpy(static_cast<void*>(&x), &b, 2);
    return x;
}

} // namespace


TEST_CASE("the cuda backend meets the interface")
{
    static_assert(compact::is_backend<backend>);
    CHECK(std::string(backend::name) == "cuda");
    compact::device_buffer<float> empty;
    CHECK(empty.size() == 0);
    CHECK(empty.data() == nullptr);
}

TEST_CASE_TEMPLATE("16-bit conversions round-trip every finite value", T, __half, __nv_bfloat16)
{
    int checked = 0;
    for (std::uint32_t b = 0; b < 0x10000u; ++b) {
        const T x = from_bits<T>(static_cast<std::uint16_t>(b));
        const double d = cd::to_double(x);
        if (std::isnan(d)) continue;
        CAPTURE(b);
        REQUIRE(bits_of(cd::from_double<T>(d)) == b);
        REQUIRE(bits_of(cd::from_compute<T>(cd::to_compute(x))) == b);
        ++checked;
    }
    CHECK(checked > 60000);
}

TEST_CASE_TEMPLATE("16-bit conversions round to nearest, ties to even, in one rounding", T, __half, __nv_bfloat16)
{
    // ulp of 1: 2^-10 for half, 2^-7 for bfloat16.
    const double u = std::is_same_v<T, __half> ? 0x1p-10 : 0x1p-7;
    auto to = [](double x) { return cd::to_double(cd::from_double<T>(x)); };
    CHECK(to(1.0 + u / 2) == 1.0);               // tie: to the even neighbour below
    CHECK(to(1.0 + 3 * u / 2) == 1.0 + 2 * u);   // tie: to the even neighbour above
    CHECK(to(1.0 + u / 2 + 0x1p-40) == 1.0 + u); // just above the tie: through float it would be a tie
    CHECK(to(-(1.0 + u / 2 + 0x1p-40)) == -(1.0 + u));
    CHECK(to(1.0 + u / 2 - 0x1p-40) == 1.0);
    CHECK(to(0.0) == 0.0);
    CHECK(std::isinf(to(1e300)));
}

TEST_CASE("Philox4x32-10 compiled by nvcc (host side) gives the known answers")
{
    auto run = [](compact::philox_counter c, compact::philox_key k) { return compact::philox4x32(c, k); };
    const auto a = run({{0, 0, 0, 0}}, {{0, 0}});
    CHECK(a.w[0] == 0x6627e8d5u);
    CHECK(a.w[1] == 0xe169c58du);
    CHECK(a.w[2] == 0xbc57ac4cu);
    CHECK(a.w[3] == 0x9b00dbd8u);
    const auto b = run({{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}}, {{0xffffffffu, 0xffffffffu}});
    CHECK(b.w[0] == 0x408f276du);
    CHECK(b.w[3] == 0x6d5451fdu);
    const auto c = run({{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}}, {{0xa4093822u, 0x299f31d0u}});
    CHECK(c.w[0] == 0xd16cfe09u);
    CHECK(c.w[1] == 0x94fdccebu);
    CHECK(c.w[2] == 0x5001e420u);
    CHECK(c.w[3] == 0x24126ea1u);
}

// The committed vectors of tests/test_projection.cpp (computed by the g++-built library): the same
// COMPACT_HD code compiled by nvcc's host pass must give the same values.
TEST_CASE("projection_element compiled by nvcc (host side) equals the committed test vectors")
{
    const projection_spec a{64, 16, distribution::gaussian, {0x0123456789abcdefull, 3, 0}};
    const struct {
        index_t i, j;
        float value;
    } va[] = {{0, 0, -0x1.52d77p-2f}, {0, 1, -0x1.7db83ep-5f}, {0, 2, 0x1.7f9bcp-2f},  {0, 3, 0x1.1051eap-3f},
              {1, 0, 0x1.177e9ap-2f}, {5, 7, -0x1.ccfecap-3f}, {31, 12, 0x1.fb954ap-4f}, {63, 15, 0x1.0d147cp-2f}};
    for (const auto& e : va) CHECK(static_cast<float>(compact::projection_element(a, e.i, e.j)) == e.value);

    const projection_spec b{300, 75, distribution::gaussian, {2024, (std::uint64_t{1} << 32) | 17u, 41}};
    const struct {
        index_t i, j;
        double value;
    } vb[] = {{0, 0, -0x1.4dbc08ad53055p-9},  {0, 3, 0x1.fa630fe81f163p-4},   {1, 1, 0x1.4ceaa69ab1cd1p-4},
              {7, 64, -0x1.02691c45df9edp-5}, {150, 37, 0x1.6a89607e585fep-6}, {200, 5, -0x1.c88aa38268558p-3},
              {299, 74, -0x1.4e0172e6de2d8p-4}};
    for (const auto& e : vb) CHECK(compact::projection_element(b, e.i, e.j) == e.value);

    const projection_spec c{50, 10, distribution::rademacher, {7, 0xffffffffull, 0xffffffffull}};
    const float s = 0x1.43d136p-2f;
    const struct {
        index_t i, j;
        float value;
    } vc[] = {{0, 0, s}, {0, 1, -s}, {0, 4, s}, {0, 9, -s}, {1, 7, s}, {17, 9, -s}, {33, 3, s}, {49, 8, s}};
    for (const auto& e : vc) CHECK(static_cast<float>(compact::projection_element(c, e.i, e.j)) == e.value);
}

TEST_CASE("CUDA and cuBLAS failures raise compact::error naming the function and the code")
{
    try {
        COMPACT_CUDA_CHECK(cudaErrorInvalidValue, "test_where");
        FAIL("no exception");
    } catch (const compact::error& e) {
        const std::string what = e.what();
        CHECK(what.find("test_where") != std::string::npos);
        CHECK(what.find("cudaErrorInvalidValue") != std::string::npos);
        CHECK(what.find("(1)") != std::string::npos);
    }
    try {
        COMPACT_CUBLAS_CHECK(CUBLAS_STATUS_INVALID_VALUE, "cublas_where");
        FAIL("no exception");
    } catch (const compact::error& e) {
        const std::string what = e.what();
        CHECK(what.find("cublas_where") != std::string::npos);
        CHECK(what.find("CUBLAS_STATUS_INVALID_VALUE") != std::string::npos);
    }
}


TEST_CASE("cuda::gemm rejects shapes that do not agree, and extents cuBLAS cannot take, before any CUDA call")
{
    const backend::context ctx{}; // never used: the checks come first
    float dummy = 0;
    const compact::const_matrix_view<float> a(&dummy, 4, 3), b(&dummy, 5, 2);
    const compact::matrix_view<float> c(&dummy, 4, 2);
    try {
        backend::gemm<float>(ctx, op::none, op::none, 1.0f, a, b, 0.0f, c);
        FAIL("no exception");
    } catch (const compact::error& e) {
        const std::string what = e.what();
        CHECK(what.find("cuda::gemm") != std::string::npos);
        CHECK(what.find("(4, 3)") != std::string::npos);
        CHECK(what.find("(5, 2)") != std::string::npos);
    }
    const compact::const_matrix_view<float> wide(&dummy, 4, 3, index_t{1} << 31);
    const compact::const_matrix_view<float> b3(&dummy, 3, 2);
    CHECK_THROWS_AS(backend::gemm<float>(ctx, op::none, op::none, 1.0f, wide, b3, 0.0f, c), compact::error);
}

TEST_CASE("every primitive returns without touching CUDA when its output is empty")
{
    const backend::context ctx{};
    const compact::matrix_view<float> empty{};
    const compact::const_matrix_view<float> cempty{};
    const projection_spec spec{8, 2, distribution::gaussian, {1, 2, 3}};
    CHECK_NOTHROW(backend::gemm<float>(ctx, op::none, op::none, 1.0f, compact::const_matrix_view<float>(nullptr, 0, 5),
                                       compact::const_matrix_view<float>(nullptr, 5, 3), 0.0f,
                                       compact::matrix_view<float>(nullptr, 0, 3)));
    CHECK_NOTHROW(backend::generate_projection<float>(ctx, spec, 0, 0, empty));
    CHECK_NOTHROW(backend::column_sums<float>(ctx, cempty, 0.0f, nullptr));
    CHECK_NOTHROW(backend::add_row_vector<float>(ctx, nullptr, empty));
    CHECK_NOTHROW(backend::fill<float>(ctx, empty, 1.0f));
    CHECK_NOTHROW((backend::axpby<float, __half>(ctx, 1.0, cempty, 0.0, {})));
    CHECK_NOTHROW((backend::adam_direction<float, float, float>(ctx, {}, cempty, empty, empty, empty)));
    CHECK_NOTHROW((backend::adamw_update<float, float>(ctx, {}, cempty, empty, empty, empty)));
    compact::device_buffer<float> none;
    CHECK_NOTHROW(none.assign(0, 1.0f));
    CHECK(none.size() == 0);
    CHECK_NOTHROW((void)backend::device_available());
}

TEST_CASE("column_sums' tiles: narrow enough to fill an H100 for a bias gradient, whole sectors per row")
{
    // (groups of 16 bytes) -> column groups per block.
    auto blocks = [](index_t groups) {
        const auto lanes = static_cast<index_t>(cd::column_sums_lanes(groups));
        return (groups + lanes - 1) / lanes;
    };
    // dY (32768, 4096) bf16: 512 groups of 8 columns, 2 per block: 256 blocks for 132 SMs.
    CHECK(cd::column_sums_vector<__nv_bfloat16> == 8);
    CHECK(cd::column_sums_lanes(4096 / 8) == 2);
    CHECK(blocks(4096 / 8) == 256);
    // A float bias of 4096: 1024 groups of 4; 4 per block would give 256 blocks, below two per SM, so
    // 2 per block: 512 blocks. 16384 float columns: 4096 groups, 8 per block (128-byte rows), 512 blocks.
    CHECK(cd::column_sums_lanes(4096 / 4) == 2);
    CHECK(cd::column_sums_lanes(16384 / 4) == 8);
    // Very wide matrices keep 512-byte rows per warp load; a tile never drops below one 32-byte
    // sector per row unless there is a single group.
    CHECK(cd::column_sums_lanes(index_t{1} << 20) == 32);
    CHECK(cd::column_sums_lanes(3) == 2);
    CHECK(cd::column_sums_lanes(2) == 2);
    CHECK(cd::column_sums_lanes(1) == 1);
    for (index_t groups = 1; groups < 5000; ++groups) {
        const unsigned lanes = cd::column_sums_lanes(groups);
        CAPTURE(groups);
        REQUIRE((lanes >= 1 && lanes <= 32 && (lanes & (lanes - 1)) == 0));
        // Widest tile with enough blocks: the next wider one would fall below the target.
        if (lanes < 32 && lanes >= 2 && static_cast<index_t>(lanes) < groups)
            REQUIRE((groups + 2 * lanes - 1) / (2 * lanes) < cd::column_sums_min_blocks);
    }
}

namespace {

using cuda_layer = compact::linear_layer<float, compact::rank::ratio<1, 4>, compact::cuda>;

/// A CUDA buffer of `count` values, read back to the host.
template <class T>
std::vector<T> host_copy(const backend::context& ctx, const T* device, std::size_t count)
{
    std::vector<T> out(count);
    backend::copy_to_host(ctx, device, out.data(), count);
    return out;
}

/// One update of `layer` from a deterministic batch: forward, backward (dY = Y), step.
void train_step(const backend::context& ctx, cuda_layer& layer, std::uint64_t step)
{
    const index_t rows = 8, n = layer.in(), m = layer.out();
    std::vector<float> x(static_cast<std::size_t>(rows * n));
    compact::fill_uniform(compact::make_view(x.data(), rows, n), -1.0, 1.0, 11, 100 + step);
    compact::device_buffer<float> x_device(x.size(), 0.0f), y(static_cast<std::size_t>(rows * m), 0.0f);
    backend::copy_from_host(ctx, x.data(), x_device.data(), x.size());
    layer.forward(ctx, compact::const_matrix_view<float>(x_device.data(), rows, n),
                  compact::make_view(y.data(), rows, m));
    layer.backward(ctx, compact::const_matrix_view<float>(y.data(), rows, m), {});
    compact::adamw_params h;
    h.lr = 1e-2;
    layer.step(ctx, h);
}

std::vector<unsigned char> state_of(const backend::context& ctx, const cuda_layer& layer)
{
    compact::checkpoint_writer w;
    compact::save_state(w, "fc", layer, compact::weight_storage::checkpoint, ctx);
    return w.bytes();
}

} // namespace

// save_state / load_state take any backend: a CUDA layer's buffers go through copy_to_host /
// copy_from_host on the given context. This compiles without a device and runs with one.
TEST_CASE("a CUDA linear_layer<float> saves and loads its state bit for bit, and resumes identically" *
          doctest::skip(!backend::device_available()))
{
    const compact::owned_cuda_context owned;
    const backend::context& ctx = owned.get();
    compact::linear_options o;
    o.seed = 5;
    o.layer = 2;
    o.max_rows = 8;
    o.resample.gap = 3;
    o.moments = compact::moment_policy::transfer;
    cuda_layer a(compact::in_features{16}, compact::out_features{6}, o);
    cuda_layer b(compact::in_features{16}, compact::out_features{6}, o);
    std::vector<float> w0(16 * 6), b0(6);
    compact::fill_uniform(compact::make_view(w0.data(), 6, 16), -0.3, 0.3, 1, 1);
    compact::fill_uniform(compact::make_view(b0.data(), 1, 6), -0.3, 0.3, 1, 2);
    backend::copy_from_host(ctx, w0.data(), a.weight().data, w0.size());
    backend::copy_from_host(ctx, b0.data(), a.bias(), b0.size());
    for (std::uint64_t s = 0; s < 5; ++s) train_step(ctx, a, s); // across an epoch boundary (T = 3)
    train_step(ctx, b, 40);                                        // b: other state, all replaced

    const std::vector<unsigned char> saved = state_of(ctx, a);
    const compact::checkpoint_reader r(saved);
    CHECK(r.scalar<std::uint64_t>("fc/updates") == 5);
    CHECK(r.contains("fc/compressor"));
    compact::load_state(r, "fc", b, compact::weight_storage::checkpoint, ctx);
    CHECK(b.updates() == 5);
    CHECK(b.epoch() == a.epoch());
    CHECK(b.counters().step == a.counters().step);
    CHECK(b.counters().epoch == a.counters().epoch);
    CHECK(b.bias_counters().step == a.bias_counters().step);
    const std::size_t mn = 6 * 16, mr = static_cast<std::size_t>(6 * a.rank());
    CHECK(host_copy(ctx, b.weight().data, mn) == host_copy(ctx, a.weight().data, mn));
    CHECK(host_copy(ctx, b.bias(), 6) == host_copy(ctx, a.bias(), 6));
    CHECK(host_copy(ctx, b.first_moment().data, mr) == host_copy(ctx, a.first_moment().data, mr));
    CHECK(host_copy(ctx, b.second_moment().data, mr) == host_copy(ctx, a.second_moment().data, mr));
    CHECK(host_copy(ctx, b.bias_first_moment(), 6) == host_copy(ctx, a.bias_first_moment(), 6));
    CHECK(host_copy(ctx, b.bias_second_moment(), 6) == host_copy(ctx, a.bias_second_moment(), 6));
    CHECK(state_of(ctx, b) == saved);

    // Both continue with the same batches: the same state, bit for bit.
    for (std::uint64_t s = 5; s < 8; ++s) {
        train_step(ctx, a, s);
        train_step(ctx, b, s);
    }
    CHECK(state_of(ctx, b) == state_of(ctx, a));

    // The checkpoint of a layer with another compressor is refused; the CUDA layer is unchanged.
    const compact::linear_layer<float, compact::quantized, compact::cuda> q(compact::in_features{16},
                                                                            compact::out_features{6}, o);
    compact::checkpoint_writer qw;
    compact::save_state(qw, "fc", q, compact::weight_storage::checkpoint, ctx);
    const compact::checkpoint_reader qr(qw.bytes());
    const auto before = state_of(ctx, b);
    try {
        compact::load_state(qr, "fc", b, compact::weight_storage::checkpoint, ctx);
        FAIL("no exception");
    } catch (const compact::error& e) {
        CHECK(std::string(e.what()).find("compressor 'activation_store'") != std::string::npos);
    }
    CHECK(state_of(ctx, b) == before);
}
