// bench/quantize.cpp: the activation stores' cost: bits per value and CPU encode / decode throughput.
//
// For one float tensor X (N, n) it prints, per scheme (int1/2/4/8 at groups 128 and 256, ALAM's average
// quantization at 128 means, full precision), the bytes of the encoding and its bits per value with
// metadata, then the time to encode X (activation_store::compress) and to decode it
// (activation_store::restore) as GB/s of float input / output, against std::memcpy of X's bytes in the
// same run (a copy reads and writes 4 bytes per value; an encode reads 4 and writes b/8; a decode reads
// b/8 and writes 4, so a memcpy-speed encode + decode would take about 1x the copy time: the ratio
// column is (encode + decode) / memcpy).
//
// Then one training step (forward + backward + AdamW) of a linear_layer (N, n) -> m with the quantized
// policy, per scheme, against the uncompressed layer (rank::full) in the same run, steps interleaved:
// what keeping X at b bits costs in time, beside what it saves in bytes.
//
// Checks first (exit 1 on failure): the encoding's size is stored_bytes; every restored value of a
// b-bit scheme lies within one level of its input; average quantization restores the block means to
// within one 2-bit level of the means.
//
//   quantize [--rows N] [--cols n] [--out m] [--threads t] [--reps k] [--smoke]
#include <compact/backend/cpu/cpu.hpp>
#include <compact/compress/activation_store.hpp>
#include <compact/compress/store_compressor.hpp>
#include <compact/nn/linear_layer.hpp>
#include <compact/random/uniform.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

namespace {

using compact::cpu;
using compact::index_t;
using compact::store_scheme;
using clock_type = std::chrono::steady_clock;

struct options {
    index_t rows = 16384;
    index_t cols = 1024;
    index_t out = 1024;
    int threads = 2;
    int reps = 15;
    bool smoke = false;
};

double seconds_since(clock_type::time_point t0)
{
    return std::chrono::duration<double>(clock_type::now() - t0).count();
}

double median(std::vector<double> v)
{
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
}

[[noreturn]] void fail(const std::string& what)
{
    std::fprintf(stderr, "quantize: check failed: %s\n", what.c_str());
    std::exit(1);
}

/// Every restored value within `levels` quantization steps of its input (per group, in float64).
void check_round_trip(const std::vector<float>& x, const std::vector<float>& back, const store_scheme& s)
{
    const index_t count = static_cast<index_t>(x.size());
    if (s.kind == compact::store_kind::full) {
        if (std::memcmp(x.data(), back.data(), x.size() * sizeof(float)) != 0) fail("full scheme is not exact");
        return;
    }
    const index_t run = s.kind == compact::store_kind::average ? 4 : 1, per = s.group * run;
    const double levels = (1 << s.bits) - 1;
    for (index_t g = 0; g * per < count; ++g) {
        const index_t first = g * per, last = std::min(count, first + per);
        // The coded values of the group: the values, or their block means.
        std::vector<double> coded;
        for (index_t k = first; k < last; k += run) {
            double sum = 0;
            const index_t end = std::min(last, k + run);
            for (index_t j = k; j < end; ++j) sum += x[static_cast<std::size_t>(j)];
            coded.push_back(sum / static_cast<double>(end - k));
        }
        const auto [lo, hi] = std::minmax_element(coded.begin(), coded.end());
        const double step = (*hi - *lo) / levels;
        for (index_t k = first; k < last; ++k) {
            const double want = coded[static_cast<std::size_t>((k - first) / run)];
            if (std::abs(double(back[static_cast<std::size_t>(k)]) - want) > step * (1 + 1e-4) + 1e-6)
                fail(compact::to_string(s) + ": value " + std::to_string(k) + " is more than one level off");
        }
    }
}

/// Step time of the quantized layer per scheme over the uncompressed layer (rank::full), interleaved.
void layer_steps(const options& o, const cpu::context& ctx, const cpu::buffer<float>& x_data)
{
    const index_t rows = std::min<index_t>(o.rows, 4096), n = o.cols, m = o.out;
    compact::linear_options lo;
    lo.seed = 5;
    lo.max_rows = rows;
    compact::adamw_params hyper;
    cpu::buffer<float> y(static_cast<std::size_t>(rows * m)), dy(y.size()), dx(static_cast<std::size_t>(rows * n));
    compact::fill_uniform(compact::make_view(dy.data(), rows, m), -1e-3, 1e-3, 2, 2);
    const compact::const_matrix_view<float> xv(x_data.data(), rows, n), dyv(dy.data(), rows, m);
    const compact::matrix_view<float> yv(y.data(), rows, m), dxv(dx.data(), rows, n);
    compact::linear_layer<float, compact::rank::full, cpu> base(compact::in_features{n}, compact::out_features{m}, lo);
    auto step = [&](auto& layer) {
        const auto t0 = clock_type::now();
        layer.forward(ctx, xv, yv);
        layer.backward(ctx, dyv, dxv);
        layer.step(ctx, hyper);
        return seconds_since(t0);
    };
    std::printf("\n## One training step of a (%lld x %lld) -> %lld float layer, quantized X vs uncompressed\n\n",
                static_cast<long long>(rows), static_cast<long long>(n), static_cast<long long>(m));
    std::printf("| scheme | saved for backward | step ratio to uncompressed (median of %d paired) |\n|---|---|---|\n",
                o.reps);
    for (const store_scheme& s : {store_scheme::quantized(8, 256), store_scheme::quantized(4, 256),
                                  store_scheme::quantized(2, 256), store_scheme::average(128)}) {
        compact::linear_layer<float, compact::quantized, cpu> q(compact::in_features{n}, compact::out_features{m}, lo,
                                                                compact::quantized{s});
        step(base), step(q); // warm-up
        std::vector<double> ratio;
        for (int r = 0; r < o.reps; ++r) {
            const double tb = step(base), tq = step(q);
            ratio.push_back(tq / tb);
        }
        std::printf("| %s | %.1f -> %.1f MiB | %.3f |\n", compact::to_string(s).c_str(),
                    static_cast<double>(base.saved_bytes(rows)) / (1 << 20),
                    static_cast<double>(q.saved_bytes(rows)) / (1 << 20), median(ratio));
    }
}

} // namespace

int main(int argc, char** argv)
try {
    options o;
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        auto next = [&]() -> long {
            if (i + 1 >= argc) {
                std::fprintf(stderr, "quantize: %s needs a value\n", a.c_str());
                std::exit(2);
            }
            return std::strtol(argv[++i], nullptr, 10);
        };
        if (a == "--rows") o.rows = next();
        else if (a == "--cols") o.cols = next();
        else if (a == "--out") o.out = next();
        else if (a == "--threads") o.threads = static_cast<int>(next());
        else if (a == "--reps") o.reps = static_cast<int>(next());
        else if (a == "--smoke") o.smoke = true;
        else {
            std::fprintf(stderr, "usage: %s [--rows N] [--cols n] [--out m] [--threads t] [--reps k] [--smoke]\n", argv[0]);
            return 2;
        }
    }
    if (o.smoke) o.rows = 64, o.cols = 300, o.out = 40, o.reps = 2;
    if (o.rows < 1 || o.cols < 1 || o.out < 1 || o.reps < 1 || o.threads < 1) {
        std::fprintf(stderr, "quantize: --rows, --cols, --out, --reps and --threads must be positive\n");
        return 2;
    }

    const cpu::context ctx{o.threads};
    const index_t count = o.rows * o.cols;
    cpu::buffer<float> x(static_cast<std::size_t>(count)), back(x.size()), copy(x.size());
    compact::fill_uniform(compact::make_view(x.data(), o.rows, o.cols), -2.0, 3.0, 1, 1);
    const double input_gb = static_cast<double>(count) * sizeof(float) / 1e9;

    std::vector<double> memcpy_times;
    for (int r = 0; r < o.reps + 1; ++r) {
        const auto t0 = clock_type::now();
        std::memcpy(copy.data(), x.data(), x.size() * sizeof(float));
        if (r > 0) memcpy_times.push_back(seconds_since(t0));
    }
    const double copy_s = median(memcpy_times);

    std::printf("# Activation stores on the CPU: %lld x %lld float (%.1f MiB), %d threads%s\n\n",
                static_cast<long long>(o.rows), static_cast<long long>(o.cols),
                static_cast<double>(count) * 4 / (1 << 20), o.threads, o.smoke ? " (SMOKE RUN: timings meaningless)" : "");
    std::printf("memcpy of X: %.3f ms = %.1f GB/s (median of %d)\n\n", 1e3 * copy_s, input_gb / copy_s, o.reps);
    std::printf("| scheme | unbiased | bytes | bits/value | compression | encode GB/s | decode GB/s | (encode+decode) / memcpy |\n");
    std::printf("|---|---|---|---|---|---|---|---|\n");

    const store_scheme schemes[] = {store_scheme::full_precision(), store_scheme::quantized(8, 256),
                                    store_scheme::quantized(4, 256), store_scheme::quantized(2, 256),
                                    store_scheme::quantized(1, 256), store_scheme::quantized(8, 128),
                                    store_scheme::quantized(4, 128), store_scheme::quantized(2, 128),
                                    store_scheme::quantized(1, 128), store_scheme::average(128)};
    for (const store_scheme& s : schemes) {
        compact::activation_store<float, cpu> store(s, 7, 1);
        const std::size_t bytes = store.saved_bytes(o.rows, o.cols);
        if (bytes != compact::stored_bytes<float>(s, count)) fail("saved_bytes disagrees with stored_bytes");
        cpu::buffer<std::byte> mem(bytes);
        compact::saved_tensor saved{mem.data(), mem.size()};
        const compact::const_matrix_view<float> xv(x.data(), o.rows, o.cols);
        const compact::matrix_view<float> bv(back.data(), o.rows, o.cols);
        store.compress(ctx, xv, 0, saved);
        store.restore(ctx, saved, bv);
        check_round_trip(std::vector<float>(x.begin(), x.end()), std::vector<float>(back.begin(), back.end()), s);

        std::vector<double> enc, dec;
        for (int r = 0; r < o.reps; ++r) {
            auto t0 = clock_type::now();
            store.compress(ctx, xv, static_cast<std::uint64_t>(r), saved);
            enc.push_back(seconds_since(t0));
            t0 = clock_type::now();
            store.restore(ctx, saved, bv);
            dec.push_back(seconds_since(t0));
        }
        const double e = median(enc), d = median(dec);
        const double bits = compact::bits_per_value<float>(s, count);
        std::printf("| %s | %s | %zu | %.3f | %.1fx | %.1f | %.1f | %.2f |\n", compact::to_string(s).c_str(),
                    s.unbiased() ? "yes" : "no", bytes, bits, 32.0 / bits, input_gb / e, input_gb / d, (e + d) / copy_s);
    }
    layer_steps(o, ctx, x);
    return 0;
} catch (const std::exception& e) {
    std::fprintf(stderr, "quantize: %s\n", e.what());
    return 1;
}
