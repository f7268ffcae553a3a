// bench/cuda_step.cu: one training step of a bf16 linear layer on the GPU, compressed against uncompressed.
//
// For X (N, n), W (m, n), b (m), dY (N, m) in __nv_bfloat16 (fp32 accumulation in every GEMM, fp32 AdamW
// moments), through the compact::cuda backend, it times one step of
//   uncompressed, library: compressed_linear<bf16, rank::full, cuda> forward (Y = X W^T + b, Z = X, a copy),
//                backward (dX = dY W, G = dY^T Z, db) and subspace_adamw::step, which for P = I is the
//                plain fused AdamW update of W (m, n moments), plus adamw::step on b;
//   uncompressed, cuBLAS: the same step written by hand: three cublasGemmEx calls (bf16 operands,
//                CUBLAS_COMPUTE_32F) for Y, dX and G, the backend's bias kernels (add_row_vector,
//                column_sums) and adamw<cuda>::step on W and b;
//   compressed:  compressed_linear<bf16, rank::fixed, cuda> forward (Y and Z = X P), backward (dX,
//                G_sub = dY^T Z, db) and subspace_adamw::step (m, r moments, W -= ... D P^T), with a
//                Gaussian P regenerated in forward and again in the optimizer (SPEC section 1), at
//                r = n/2, n/4, n/8.
// It prints the time ratio compressed / uncompressed next to the cost model of README "Why it saves
// memory", (2 + r (n + m) / (n m)) / 3, and next to the full multiply-add model that also counts the
// optimizer's m r n, with the bytes saved for backward (N r instead of N n values) and the optimizer state.
// The shapes: N in {8192, 32768}, n = m in {1024, 4096, 8192}. The target, judged on the row
// N = 32768, n = m = 4096, r = n/4: ratio against the library's uncompressed step at most 0.92.
//
// Checks, per shape and before any timing (the program exits 1 and times nothing when one fails):
//   * Y and dX of the uncompressed library step against float64 on sampled rows (bf16 tolerance);
//   * the hand-written cuBLAS step's Y, dX, G and W after one update against the library's (same
//     products and the same AdamW kernel: equal up to bf16 rounding);
//   * every compressed step's Y and dX against the uncompressed ones, and its G_sub against G P with
//     P from cuda::generate_projection (two roundings apart);
//   * after timing, every variant's W and the last Y finite.
//
// Timing: every buffer and workspace is allocated before the clock starts. Per shape, after warm-up
// rounds, the variants run in rounds, in order and then reversed (A B C, C B A, ...), each step timed
// with CUDA events (forward, backward and optimizer separately). Each round starts behind a short
// device-side delay kernel, so that the host has queued the whole round before the GPU reaches it and
// launch latency stays out of the GPU times (the host's enqueue time per step is reported on its own).
// Ratios are medians over rounds of compressed / uncompressed from the same round.
//
// Kernels: generate_projection (n, n/4), adam_direction (m, n/4), adamw_update (m, n), column_sums and
// add_row_vector on (N, m), and the identity's Z = X copy (axpby) are timed alone, with the bytes they
// must move (counted from their signatures), against a cudaMemcpyAsync device-to-device copy moving
// as many bytes (read + written); target: the projection and Adam kernels at >= 70% of the copy's rate.
//
//   cuda_step [--smoke] [--runs K] [--warmup W] [--shapes LIST] [--no-bias] [--markdown FILE]
//             [--check-target]
//
// Exit status: 0 when every check passes; 1 when a check fails or the library throws; 2 for a bad
// command line; 3 with --check-target when the target is missed; 77 (skipped) without a CUDA device
// or on one older than compute capability 8.0 (bf16 GEMMs). See bench/README.md.

#include "bench_common.hpp"

#include <compact/cuda.cuh>

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdarg>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <exception>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using compact::index_t;
using compact_bench::check_table;
using compact_bench::median;
using compact_bench::minimum;
using compact_bench::paired_ratio;
using compact_bench::percentile;
using compact_bench::sample_rows;
using compact_bench::today;
using bf16 = __nv_bfloat16;
using backend = compact::cuda;
using context = compact::cuda::context;
template <class T>
using dbuf = compact::device_buffer<T>;
template <class T>
using view = compact::matrix_view<T>;
template <class T>
using cview = compact::const_matrix_view<T>;

constexpr int skip_status = 77;
constexpr std::uint64_t seed = 2024;
constexpr std::uint64_t epoch = 0; // T = 0: one P for the whole run

/// The AdamW hyper-parameters of every variant (as bench/linear_step.cpp); timing does not depend on them.
compact::adamw_params make_hyper()
{
    compact::adamw_params h;
    h.lr = 1e-3;
    h.weight_decay = 0.01;
    h.alpha = 1.0;
    return h;
}
const compact::adamw_params hyper = make_hyper();

// ------------------------------------------------------------------------------------- command line

struct shape {
    index_t rows = 0; // N
    index_t in = 0;   // n
    index_t out = 0;  // m
};

struct options {
    std::vector<shape> shapes;
    int runs = 30;   // timed rounds per shape (the medians need at least 20)
    int warmup = 3;  // untimed rounds first
    bool bias = true;
    bool smoke = false;
    bool check_target = false;
    std::string markdown;
};

void usage(std::FILE* to)
{
    std::fprintf(to,
                 "usage: cuda_step [--smoke] [--runs K] [--warmup W] [--shapes LIST] [--no-bias] [--markdown FILE]\n"
                 "                 [--check-target]\n"
                 "  --shapes: comma-separated NxN_in or NxN_inxM (m = n when omitted); default\n"
                 "            8192x1024,8192x4096,8192x8192,32768x1024,32768x4096,32768x8192\n"
                 "  --runs: timed rounds per shape (default 30; at least 20 for the medians the targets use)\n"
                 "  --warmup: untimed rounds first (default 3)\n"
                 "  --no-bias: no b, no db (drops the bias kernels from every variant)\n"
                 "  --smoke: N=256, n=m=128, 3 rounds, 1 warm-up; the checks are the real ones\n"
                 "  --markdown FILE: also write the report to FILE\n"
                 "  --check-target: exit 3 when N=32768, n=m=4096, r=n/4 misses ratio <= 0.92\n");
}

long long parse_integer(const std::string& text, long long low, const std::string& what)
{
    char* end = nullptr;
    const long long v = std::strtoll(text.c_str(), &end, 10);
    if (text.empty() || *end != '\0' || v < low)
        throw std::invalid_argument(what + " needs an integer >= " + std::to_string(low) + ", got '" + text + "'");
    return v;
}

std::vector<shape> parse_shapes(const std::string& list)
{
    std::vector<shape> shapes;
    std::size_t start = 0;
    while (start <= list.size()) {
        const std::size_t comma = std::min(list.find(',', start), list.size());
        const std::string item = list.substr(start, comma - start);
        std::vector<std::string> fields;
        std::size_t f = 0;
        while (f <= item.size()) {
            const std::size_t x = std::min(item.find('x', f), item.size());
            fields.push_back(item.substr(f, x - f));
            f = x + 1;
        }
        if (fields.size() != 2 && fields.size() != 3)
            throw std::invalid_argument("--shapes item '" + item + "' is not NxN_in or NxN_inxM");
        shape s;
        s.rows = parse_integer(fields[0], 1, "--shapes N");
        s.in = parse_integer(fields[1], 8, "--shapes n"); // n/8 >= 1
        s.out = fields.size() == 3 ? parse_integer(fields[2], 1, "--shapes m") : s.in;
        shapes.push_back(s);
        start = comma + 1;
    }
    return shapes;
}

/// False when the program should exit 0 at once (--help).
bool parse(int argc, char** argv, options& o)
{
    bool runs_set = false, warmup_set = false, shapes_set = false;
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        auto value = [&]() -> std::string {
            if (i + 1 >= argc) throw std::invalid_argument(a + " needs a value");
            return argv[++i];
        };
        if (a == "--runs") o.runs = static_cast<int>(parse_integer(value(), 1, a)), runs_set = true;
        else if (a == "--warmup") o.warmup = static_cast<int>(parse_integer(value(), 1, a)), warmup_set = true;
        else if (a == "--shapes") o.shapes = parse_shapes(value()), shapes_set = true;
        else if (a == "--markdown") o.markdown = value();
        else if (a == "--no-bias") o.bias = false;
        else if (a == "--smoke") o.smoke = true;
        else if (a == "--check-target") o.check_target = true;
        else if (a == "--help" || a == "-h") {
            usage(stdout);
            return false;
        } else throw std::invalid_argument("unknown argument " + a);
    }
    if (!shapes_set) {
        if (o.smoke) o.shapes = {{256, 128, 128}};
        else
            for (index_t rows : {index_t{8192}, index_t{32768}})
                for (index_t in : {index_t{1024}, index_t{4096}, index_t{8192}}) o.shapes.push_back({rows, in, in});
    }
    if (o.smoke) {
        if (!runs_set) o.runs = 3;
        if (!warmup_set) o.warmup = 1;
    }
    return true;
}

// ------------------------------------------------------------------------------------------- report

/// The Markdown report: printed as it grows (so a long run shows progress) and kept for --markdown.
class report {
public:
    __attribute__((format(printf, 2, 3))) void add(const char* format, ...)
    {
        char small[1024];
        va_list args;
        va_start(args, format);
        const int length = std::vsnprintf(small, sizeof small, format, args);
        va_end(args);
        if (length < 0) return;
        std::string line;
        if (static_cast<std::size_t>(length) < sizeof small) {
            line = small;
        } else {
            line.resize(static_cast<std::size_t>(length) + 1);
            va_start(args, format);
            std::vsnprintf(&line[0], line.size(), format, args);
            va_end(args);
            line.resize(static_cast<std::size_t>(length));
        }
        std::fputs(line.c_str(), stdout);
        std::fflush(stdout);
        text_ += line;
    }
    const std::string& text() const noexcept { return text_; }

private:
    std::string text_;
};

std::string bytes_string(double b)
{
    char s[32];
    if (b >= 1024.0 * 1024.0 * 1024.0) std::snprintf(s, sizeof s, "%.2f GiB", b / (1024.0 * 1024.0 * 1024.0));
    else if (b >= 1024.0 * 1024.0) std::snprintf(s, sizeof s, "%.1f MiB", b / (1024.0 * 1024.0));
    else if (b >= 1024.0) std::snprintf(s, sizeof s, "%.1f KiB", b / 1024.0);
    else std::snprintf(s, sizeof s, "%.0f B", b);
    return s;
}

std::string version_string(int v) // CUDA's 1000 major + 10 minor
{
    return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
}

// ------------------------------------------------------------------------------------- device helpers

unsigned grid_for(std::size_t count, unsigned cap = 4096)
{
    const std::size_t blocks = (count + 255) / 256;
    return static_cast<unsigned>(std::max<std::size_t>(1, std::min<std::size_t>(blocks, cap)));
}

__host__ __device__ inline std::uint64_t mix64(std::uint64_t x) // splitmix64's finaliser
{
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

/// out[k] = scale * u, u uniform in [-1, 1) from a hash of (stream, k): fresh, non-zero data.
__global__ void fill_uniform_kernel(bf16* out, std::size_t count, std::uint64_t stream, float scale)
{
    for (std::size_t k = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; k < count;
         k += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
        const std::uint64_t h = mix64(stream * 0x9e3779b97f4a7c15ull + k);
        const float u = static_cast<float>(h >> 40) * (1.0f / 16777216.0f); // 24 bits: [0, 1)
        out[k] = __float2bfloat16_rn(scale * (2.0f * u - 1.0f));
    }
}

/// Spins for `ns` nanoseconds of the GPU's global timer (capped by the SM cycle counter, in case the
/// timer does not tick), so that the host can queue a whole round behind it.
__global__ void delay_kernel(unsigned long long ns)
{
    unsigned long long start = 0, now = 0;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    const long long c0 = clock64();
    const long long cycle_cap = 4 * static_cast<long long>(ns); // 2 ns or more at any clock below 2 GHz
    do {
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    } while (now - start < ns && clock64() - c0 < cycle_cap);
}

/// sums[0] += sum_k (a_k - b_k)^2 and sums[1] += sum_k (b_k - base_k)^2 (base_k = 0 without base), in
/// double: the relative error of a against b, or of a's update against b's when base is the common
/// starting point.
__global__ void difference_kernel(const bf16* a, const bf16* b, const bf16* base, std::size_t count, double* sums)
{
    double diff = 0, ref = 0;
    for (std::size_t k = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; k < count;
         k += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
        const double x = static_cast<double>(__bfloat162float(a[k]));
        const double y = static_cast<double>(__bfloat162float(b[k]));
        const double y0 = base ? static_cast<double>(__bfloat162float(base[k])) : 0.0;
        diff += (x - y) * (x - y);
        ref += (y - y0) * (y - y0);
    }
    for (int offset = 16; offset > 0; offset /= 2) {
        diff += __shfl_down_sync(0xffffffffu, diff, offset);
        ref += __shfl_down_sync(0xffffffffu, ref, offset);
    }
    if ((threadIdx.x & 31u) == 0) {
        atomicAdd(&sums[0], diff);
        atomicAdd(&sums[1], ref);
    }
}

__global__ void non_finite_kernel(const bf16* a, std::size_t count, unsigned long long* bad)
{
    for (std::size_t k = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; k < count;
         k += static_cast<std::size_t>(gridDim.x) * blockDim.x)
        if (!(fabsf(__bfloat162float(a[k])) <= 3.402823466e+38f)) atomicAdd(bad, 1ull); // NaN compares false
}

void check_launch(const char* where) { COMPACT_CUDA_CHECK(cudaGetLastError(), where); }

void fill_uniform(const context& ctx, bf16* out, std::size_t count, std::uint64_t stream, double scale)
{
    fill_uniform_kernel<<<grid_for(count), 256, 0, ctx.stream>>>(out, count, stream, static_cast<float>(scale));
    check_launch("fill_uniform");
}

/// Scratch for the device-side reductions of the checks.
struct check_scratch {
    dbuf<double> sums{2, 0.0};
    dbuf<unsigned long long> bad{1, 0ull};
};

/// ||a - b|| / ||b - base|| over `count` elements (base may be null), computed on the device.
double relative_difference(const compact::owned_cuda_context& owner, check_scratch& s, const bf16* a, const bf16* b,
                           std::size_t count, const bf16* base = nullptr)
{
    const context& ctx = owner.get();
    COMPACT_CUDA_CHECK(cudaMemsetAsync(s.sums.data(), 0, 2 * sizeof(double), ctx.stream), "relative_difference");
    difference_kernel<<<grid_for(count, 1024), 256, 0, ctx.stream>>>(a, b, base, count, s.sums.data());
    check_launch("relative_difference");
    owner.synchronize();
    double h[2] = {0, 0};
    compact::copy_to_host(h, s.sums.data(), 2);
    return h[1] > 0 ? std::sqrt(h[0] / h[1]) : std::sqrt(h[0]);
}

unsigned long long count_non_finite(const compact::owned_cuda_context& owner, check_scratch& s, const bf16* a,
                                    std::size_t count)
{
    const context& ctx = owner.get();
    COMPACT_CUDA_CHECK(cudaMemsetAsync(s.bad.data(), 0, sizeof(unsigned long long), ctx.stream), "count_non_finite");
    non_finite_kernel<<<grid_for(count, 1024), 256, 0, ctx.stream>>>(a, count, s.bad.data());
    check_launch("count_non_finite");
    owner.synchronize();
    unsigned long long bad = 0;
    compact::copy_to_host(&bad, s.bad.data(), 1);
    return bad;
}

void copy_device(const context& ctx, void* to, const void* from, std::size_t bytes)
{
    COMPACT_CUDA_CHECK(cudaMemcpyAsync(to, from, bytes, cudaMemcpyDeviceToDevice, ctx.stream), "copy_device");
}

std::size_t count_of(index_t rows, index_t cols) { return static_cast<std::size_t>(rows) * static_cast<std::size_t>(cols); }

/// CUDA events, created once and destroyed with the set.
class event_set {
public:
    explicit event_set(std::size_t count) : events_(count, nullptr)
    {
        for (auto& e : events_) COMPACT_CUDA_CHECK(cudaEventCreate(&e), "event_set");
    }
    event_set(const event_set&) = delete;
    event_set& operator=(const event_set&) = delete;
    ~event_set()
    {
        for (auto e : events_)
            if (e) cudaEventDestroy(e);
    }
    void record(std::size_t k, cudaStream_t stream) { COMPACT_CUDA_CHECK(cudaEventRecord(events_[k], stream), "cudaEventRecord"); }
    /// Whether the work before event k has finished (without waiting).
    bool done(std::size_t k) const
    {
        const cudaError_t status = cudaEventQuery(events_[k]);
        if (status == cudaErrorNotReady) return false;
        COMPACT_CUDA_CHECK(status, "cudaEventQuery");
        return true;
    }
    /// Milliseconds from event a to event b (both recorded and complete).
    double ms(std::size_t a, std::size_t b) const
    {
        float t = 0;
        COMPACT_CUDA_CHECK(cudaEventElapsedTime(&t, events_[a], events_[b]), "cudaEventElapsedTime");
        return static_cast<double>(t);
    }

private:
    std::vector<cudaEvent_t> events_;
};

// ------------------------------------------------------------------------------------------ problem

/// The buffers every variant of one shape shares. Variants run one after another on one stream, so
/// they share their outputs and the saved activation too; each keeps its own weights and moments.
struct problem {
    index_t rows, in, out; // N, n, m
    bool bias;
    dbuf<bf16> x;      // (N, n) input
    dbuf<bf16> dy;     // (N, m) output gradient
    dbuf<bf16> w0;     // (m, n) initial weights, copied into every variant
    dbuf<bf16> b0;     // (m) initial bias (empty without bias)
    dbuf<bf16> y;      // (N, m) output
    dbuf<bf16> dx;     // (N, n) input gradient
    dbuf<bf16> z;      // (N, n): Z = X P (N, r) in its first N r values; the identity's Z = X fills it
    dbuf<bf16> g;      // (m, n): G_sub (m, r) in its first m r values, or the full G
    dbuf<bf16> db;     // (m) bias gradient (empty without bias)
    dbuf<std::byte> ws; // workspace: the largest any variant asks for (P and the update direction)

    problem(const shape& s, bool with_bias, std::size_t workspace_bytes, const compact::owned_cuda_context& owner)
        : rows(s.rows), in(s.in), out(s.out), bias(with_bias),
          x(count_of(rows, in), bf16{}), dy(count_of(rows, out), bf16{}), w0(count_of(out, in), bf16{}),
          y(count_of(rows, out), bf16{}), dx(count_of(rows, in), bf16{}), z(count_of(rows, in), bf16{}),
          g(count_of(out, in), bf16{}), ws(std::max<std::size_t>(workspace_bytes, 1), std::byte{0})
    {
        const context& ctx = owner.get();
        // PyTorch's default initialisation scale for W and b, O(1) inputs, and an output gradient of the
        // size a mean loss over N rows gives.
        const double bound = 1.0 / std::sqrt(static_cast<double>(in));
        fill_uniform(ctx, x.data(), x.size(), 1, 1.0);
        fill_uniform(ctx, dy.data(), dy.size(), 2, 1.0 / static_cast<double>(rows));
        fill_uniform(ctx, w0.data(), w0.size(), 3, bound);
        if (bias) {
            b0.assign(static_cast<std::size_t>(out), bf16{});
            db.assign(static_cast<std::size_t>(out), bf16{});
            fill_uniform(ctx, b0.data(), b0.size(), 4, bound);
        }
        owner.synchronize();
    }

    cview<bf16> xv() const { return {x.data(), rows, in}; }
    cview<bf16> dyv() const { return {dy.data(), rows, out}; }
    view<bf16> yv() { return {y.data(), rows, out}; }
    view<bf16> dxv() { return {dx.data(), rows, in}; }
    view<bf16> zv(index_t r) { return {z.data(), rows, r}; }
    view<bf16> gv(index_t r) { return {g.data(), out, r}; }
    compact::workspace wsv() { return {ws.data(), ws.size()}; }
};

// ------------------------------------------------------------------------------------------- variants

/// One way of doing the training step; forward, backward and optimize only launch on ctx's stream.
class step_variant {
public:
    step_variant(problem& p, std::string name, index_t r, index_t state_cols)
        : p_(p), name_(std::move(name)), r_(r), w_(count_of(p.out, p.in), bf16{}),
          m_(count_of(p.out, state_cols), 0.0f), v_(count_of(p.out, state_cols), 0.0f)
    {
        if (p.bias) {
            b_.assign(static_cast<std::size_t>(p.out), bf16{});
            bm_.assign(static_cast<std::size_t>(p.out), 0.0f);
            bv_.assign(static_cast<std::size_t>(p.out), 0.0f);
        }
    }
    step_variant(const step_variant&) = delete;
    step_variant& operator=(const step_variant&) = delete;
    virtual ~step_variant() = default;

    virtual void forward(const context& ctx) = 0;
    virtual void backward(const context& ctx) = 0;
    virtual void optimize(const context& ctx) = 0;
    /// Bytes kept from forward for backward, and bytes of optimizer state (W's and b's moments).
    virtual std::size_t saved_bytes() const = 0;
    std::size_t state_bytes() const
    {
        return (m_.size() + v_.size() + bm_.size() + bv_.size()) * sizeof(float);
    }

    const std::string& name() const noexcept { return name_; }
    index_t rank() const noexcept { return r_; }
    const bf16* weight_data() const noexcept { return w_.data(); }

    /// Back to W0, b0, zero moments and counters (after the checks, before the timing).
    void reset(const compact::owned_cuda_context& owner)
    {
        const context& ctx = owner.get();
        copy_device(ctx, w_.data(), p_.w0.data(), w_.size() * sizeof(bf16));
        if (p_.bias) copy_device(ctx, b_.data(), p_.b0.data(), b_.size() * sizeof(bf16));
        for (dbuf<float>* s : {&m_, &v_, &bm_, &bv_})
            if (!s->empty()) COMPACT_CUDA_CHECK(cudaMemsetAsync(s->data(), 0, s->size() * sizeof(float), ctx.stream), "reset");
        counters_ = {};
        bias_counters_ = {};
        owner.synchronize();
    }

protected:
    view<bf16> w() { return {w_.data(), p_.out, p_.in}; }
    const bf16* b() const { return p_.bias ? b_.data() : nullptr; }
    view<float> mv(index_t cols) { return {m_.data(), p_.out, cols}; }
    view<float> vv(index_t cols) { return {v_.data(), p_.out, cols}; }

    /// Plain AdamW on b from db, as linear_layer::step does.
    void bias_step(const context& ctx)
    {
        if (!p_.bias) return;
        compact::adamw<backend>::step<bf16, float>(ctx, hyper, view<bf16>(b_.data(), 1, p_.out),
                                                   cview<bf16>(p_.db.data(), 1, p_.out),
                                                   view<float>(bm_.data(), 1, p_.out),
                                                   view<float>(bv_.data(), 1, p_.out), bias_counters_);
    }

    problem& p_;
    std::string name_;
    index_t r_;
    dbuf<bf16> w_, b_;            // (m, n), (m)
    dbuf<float> m_, v_, bm_, bv_; // (m, r) or (m, n); (m)
    compact::adam_counters counters_{}, bias_counters_{};
};

/// The library's step: compressed_linear + subspace_adamw (+ adamw on b). Policy rank::full is the
/// uncompressed layer through the same code (P = I: Z = X is a copy and the update is plain AdamW).
template <class Policy>
class library_step final : public step_variant {
public:
    using layer_type = compact::compressed_linear<bf16, Policy, backend>;
    using optimizer_type = compact::subspace_adamw<bf16, backend, float>;

    library_step(problem& p, std::string name, Policy policy)
        : library_step(p, std::move(name),
                       layer_type(compact::in_features{p.in}, compact::out_features{p.out}, seed, /*layer=*/1, policy))
    {
    }

    static std::size_t workspace_bytes(const shape& s, Policy policy)
    {
        const layer_type layer(compact::in_features{s.in}, compact::out_features{s.out}, seed, 1, policy);
        const optimizer_type opt(compact::out_features{s.out}, layer.projection());
        return std::max(layer.workspace_bytes(s.rows), opt.workspace_bytes());
    }

    const layer_type& layer() const noexcept { return layer_; }

    void forward(const context& ctx) override
    {
        // Z (N, r) is kept in the first N r values of the problem's Z buffer.
        saved_ = compact::bind_saved<typename layer_type::saved_type>(p_.z.data(), p_.z.size() * sizeof(bf16));
        const cview<bf16> bias = p_.bias ? cview<bf16>(b(), 1, p_.out) : cview<bf16>{};
        layer_.forward(ctx, p_.xv(), w(), bias, p_.yv(), saved_, step, p_.wsv());
    }
    void backward(const context& ctx) override
    {
        grads_.weight = p_.gv(r_);
        grads_.bias = p_.bias ? view<bf16>(p_.db.data(), 1, p_.out) : view<bf16>{};
        layer_.backward(ctx, p_.dyv(), w(), saved_, p_.dxv(), grads_, p_.wsv());
    }
    void optimize(const context& ctx) override
    {
        opt_.step(ctx, hyper, layer_.projection(), w(), grads_, mv(r_), vv(r_), counters_, p_.wsv());
        bias_step(ctx);
    }
    std::size_t saved_bytes() const override { return layer_.saved_bytes(p_.rows); }

private:
    library_step(problem& p, std::string name, const layer_type& layer)
        : step_variant(p, std::move(name), layer.rank(), layer.rank()), layer_(layer),
          opt_(compact::out_features{p.out}, layer_.projection())
    {
    }

    // T = 0 (the layer's default resampling): forward is passed step 0 and every step uses P of epoch 0.
    static constexpr std::uint64_t step = 0;

    layer_type layer_;
    optimizer_type opt_;
    typename layer_type::saved_type saved_{}; // what forward kept (Z in the problem's Z buffer)
    compact::layer_gradient<bf16> grads_{};   // G_sub (or G) and db in the problem's buffers, with their epoch
};

/// The uncompressed step written by hand: three cublasGemmEx calls (bf16 operands and output, fp32
/// compute), the backend's bias kernels and adamw<cuda>::step on the full gradient. Nothing is copied
/// for backward: X itself is what it keeps.
class cublas_step final : public step_variant {
public:
    explicit cublas_step(problem& p) : step_variant(p, "uncompressed, cuBLAS", p.in, p.in) {}

    void forward(const context& ctx) override
    {
        // Row-major (R, C) is column-major (C, R): Y^T (m, N) = W (m, n) X^T (n, N).
        gemm(ctx, CUBLAS_OP_T, CUBLAS_OP_N, p_.out, p_.rows, p_.in, w_.data(), p_.in, p_.x.data(), p_.in, p_.y.data(),
             p_.out);
        if (p_.bias) backend::add_row_vector<bf16>(ctx, b(), p_.yv());
    }
    void backward(const context& ctx) override
    {
        // dX^T (n, N) = W^T (n, m) dY^T (m, N)
        gemm(ctx, CUBLAS_OP_N, CUBLAS_OP_N, p_.in, p_.rows, p_.out, w_.data(), p_.in, p_.dy.data(), p_.out,
             p_.dx.data(), p_.in);
        if (p_.bias) backend::column_sums<bf16>(ctx, p_.dyv(), __float2bfloat16(0.0f), p_.db.data());
        // G^T (n, m) = X^T (n, N) dY (N, m)
        gemm(ctx, CUBLAS_OP_N, CUBLAS_OP_T, p_.in, p_.out, p_.rows, p_.x.data(), p_.in, p_.dy.data(), p_.out,
             p_.g.data(), p_.in);
    }
    void optimize(const context& ctx) override
    {
        compact::adamw<backend>::step<bf16, float>(ctx, hyper, w(), p_.gv(p_.in), mv(p_.in), vv(p_.in), counters_);
        bias_step(ctx);
    }
    std::size_t saved_bytes() const override { return count_of(p_.rows, p_.in) * sizeof(bf16); }

private:
    /// Column-major C (rows, cols) = op(A) op(B), k the inner dimension; bf16 in and out, fp32 compute.
    static void gemm(const context& ctx, cublasOperation_t ta, cublasOperation_t tb, index_t rows, index_t cols,
                     index_t k, const bf16* a, index_t lda, const bf16* b, index_t ldb, bf16* c, index_t ldc)
    {
        const float one = 1.0f, zero = 0.0f;
        COMPACT_CUBLAS_CHECK(cublasGemmEx(ctx.handle, ta, tb, static_cast<int>(rows), static_cast<int>(cols),
                                          static_cast<int>(k), &one, a, CUDA_R_16BF, static_cast<int>(lda), b,
                                          CUDA_R_16BF, static_cast<int>(ldb), &zero, c, CUDA_R_16BF,
                                          static_cast<int>(ldc), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                             "cublas_step::gemm");
    }
};

// ------------------------------------------------------------------------------------------- checks

std::vector<float> to_host_floats(const bf16* device, std::size_t count)
{
    std::vector<bf16> h(count);
    compact::copy_to_host(h.data(), device, count);
    std::vector<float> f(count);
    for (std::size_t k = 0; k < count; ++k) f[k] = __bfloat162float(h[k]);
    return f;
}

/// Y and dX of the uncompressed library step (already run) against float64 on sampled rows.
void check_against_float64(problem& p, check_table& log)
{
    const index_t n = p.in, m = p.out;
    const std::vector<float> w = to_host_floats(p.w0.data(), p.w0.size()); // (m, n)
    const std::vector<float> b = p.bias ? to_host_floats(p.b0.data(), p.b0.size()) : std::vector<float>{};
    double y_num = 0, y_den = 0, dx_num = 0, dx_den = 0;
    for (index_t i : sample_rows(p.rows, 8)) {
        const std::vector<float> x = to_host_floats(p.x.data() + i * n, static_cast<std::size_t>(n));
        const std::vector<float> dy = to_host_floats(p.dy.data() + i * m, static_cast<std::size_t>(m));
        const std::vector<float> y = to_host_floats(p.y.data() + i * m, static_cast<std::size_t>(m));
        const std::vector<float> dx = to_host_floats(p.dx.data() + i * n, static_cast<std::size_t>(n));
        for (index_t j = 0; j < m; ++j) { // Y(i, j) = sum_k X(i, k) W(j, k) + b(j)
            double s = p.bias ? static_cast<double>(b[static_cast<std::size_t>(j)]) : 0.0;
            for (index_t k = 0; k < n; ++k)
                s += static_cast<double>(x[static_cast<std::size_t>(k)]) *
                     static_cast<double>(w[static_cast<std::size_t>(j * n + k)]);
            const double d = static_cast<double>(y[static_cast<std::size_t>(j)]) - s;
            y_num += d * d;
            y_den += s * s;
        }
        std::vector<double> ref(static_cast<std::size_t>(n), 0.0); // dX(i, :) = sum_j dY(i, j) W(j, :)
        for (index_t j = 0; j < m; ++j) {
            const double s = static_cast<double>(dy[static_cast<std::size_t>(j)]);
            for (index_t k = 0; k < n; ++k)
                ref[static_cast<std::size_t>(k)] += s * static_cast<double>(w[static_cast<std::size_t>(j * n + k)]);
        }
        for (index_t k = 0; k < n; ++k) {
            const double d = static_cast<double>(dx[static_cast<std::size_t>(k)]) - ref[static_cast<std::size_t>(k)];
            dx_num += d * d;
            dx_den += ref[static_cast<std::size_t>(k)] * ref[static_cast<std::size_t>(k)];
        }
    }
    // bf16 output: each value rounded once to 8 significant bits (relative 2^-8 at most).
    log.add("uncompressed (library) Y = X W^T + b vs float64, 8 rows", std::sqrt(y_num / y_den), 1e-2);
    log.add("uncompressed (library) dX = dY W vs float64, 8 rows", std::sqrt(dx_num / dx_den), 1e-2);
}

/// Runs one step of every variant from the same state and compares them; resets them afterwards.
void run_checks(const compact::owned_cuda_context& owner, problem& p, library_step<compact::rank::full>& full,
                cublas_step& hand, std::vector<std::unique_ptr<library_step<compact::rank::fixed>>>& compressed,
                check_table& log)
{
    const context& ctx = owner.get();
    check_scratch scratch;
    const std::size_t ny = count_of(p.rows, p.out), nx = count_of(p.rows, p.in), nw = count_of(p.out, p.in);
    dbuf<bf16> y_ref(ny, bf16{}), dx_ref(nx, bf16{}), g_ref(nw, bf16{}), w_ref(nw, bf16{});

    full.reset(owner);
    full.forward(ctx);
    full.backward(ctx);
    owner.synchronize();
    check_against_float64(p, log);
    copy_device(ctx, y_ref.data(), p.y.data(), ny * sizeof(bf16));
    copy_device(ctx, dx_ref.data(), p.dx.data(), nx * sizeof(bf16));
    copy_device(ctx, g_ref.data(), p.g.data(), nw * sizeof(bf16));
    full.optimize(ctx);
    copy_device(ctx, w_ref.data(), full.weight_data(), nw * sizeof(bf16));
    owner.synchronize();

    // The same products and the same AdamW kernel: equal up to the GEMMs' choice of algorithm.
    hand.reset(owner);
    hand.forward(ctx);
    hand.backward(ctx);
    log.add("uncompressed cuBLAS vs library: Y", relative_difference(owner, scratch, p.y.data(), y_ref.data(), ny), 1e-2);
    log.add("uncompressed cuBLAS vs library: dX", relative_difference(owner, scratch, p.dx.data(), dx_ref.data(), nx), 1e-2);
    log.add("uncompressed cuBLAS vs library: G", relative_difference(owner, scratch, p.g.data(), g_ref.data(), nw), 1e-2);
    hand.optimize(ctx);
    log.add("uncompressed cuBLAS vs library: update W1 - W0",
            relative_difference(owner, scratch, hand.weight_data(), w_ref.data(), nw, p.w0.data()), 1e-2);

    const index_t n = p.in, m = p.out;
    dbuf<bf16> p_buf(count_of(n, n / 2), bf16{}), gp(count_of(m, n / 2), bf16{});
    for (auto& c : compressed) {
        const index_t r = c->rank();
        const std::string name = "compressed r = " + std::to_string(r) + ": ";
        c->reset(owner);
        c->forward(ctx);
        c->backward(ctx);
        log.add(name + "Y vs uncompressed", relative_difference(owner, scratch, p.y.data(), y_ref.data(), ny), 1e-2);
        log.add(name + "dX vs uncompressed", relative_difference(owner, scratch, p.dx.data(), dx_ref.data(), nx), 1e-2);
        // G_sub = dY^T (X P) against (dY^T X) P: the same product rounded to bf16 at different points.
        const view<bf16> pv(p_buf.data(), n, r), gpv(gp.data(), m, r);
        backend::generate_projection<bf16>(ctx, c->layer().projection().spec(epoch), 0, 0, pv);
        backend::gemm<bf16>(ctx, compact::op::none, compact::op::none, 1.0, cview<bf16>(g_ref.data(), m, n), pv, 0.0,
                            gpv);
        log.add(name + "G_sub vs G P", relative_difference(owner, scratch, p.g.data(), gp.data(), count_of(m, r)), 2e-2);
        c->optimize(ctx);
        owner.synchronize();
        log.add(name + "W after one step: non-finite values",
                static_cast<double>(count_non_finite(owner, scratch, c->weight_data(), nw)), 0);
    }

    full.reset(owner);
    hand.reset(owner);
    for (auto& c : compressed) c->reset(owner);
}

// ------------------------------------------------------------------------------------------- timing

struct phase_samples {
    std::vector<double> total, forward, backward, optimizer, host; // ms; host: enqueue time, us
};

/// Warm-up, then `runs` rounds of every variant, in order on even rounds and reversed on odd ones. Each
/// round waits behind a delay kernel long enough for the host to queue it whole (twice the previous
/// round's enqueue time), so the events time the GPU's work, not the launches.
std::vector<phase_samples> time_variants(const options& o, const compact::owned_cuda_context& owner,
                                         const std::vector<step_variant*>& variants, double& delay_ms,
                                         int& uncovered)
{
    const context& ctx = owner.get();
    const std::size_t count = variants.size();
    const std::size_t delay_end = 4 * count;
    event_set events(4 * count + 1);
    std::vector<phase_samples> samples(count);
    double delay_ns = 20e6;
    for (int round = 0; round < o.warmup + o.runs; ++round) {
        const double round_delay_ns = delay_ns;
        delay_kernel<<<1, 1, 0, ctx.stream>>>(static_cast<unsigned long long>(round_delay_ns));
        check_launch("delay_kernel");
        events.record(delay_end, ctx.stream);
        std::vector<double> host(count, 0.0);
        const auto round_start = std::chrono::steady_clock::now();
        for (std::size_t k = 0; k < count; ++k) {
            const std::size_t j = round % 2 == 0 ? k : count - 1 - k;
            step_variant& v = *variants[j];
            const auto t0 = std::chrono::steady_clock::now();
            events.record(4 * j, ctx.stream);
            v.forward(ctx);
            events.record(4 * j + 1, ctx.stream);
            v.backward(ctx);
            events.record(4 * j + 2, ctx.stream);
            v.optimize(ctx);
            events.record(4 * j + 3, ctx.stream);
            host[j] = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
        }
        const double enqueue_ns =
            std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - round_start).count();
        // Already past the delay: the GPU may have waited for launches inside this round.
        const bool ran_out = events.done(delay_end);
        owner.synchronize();
        check_launch("time_variants");
        delay_ns = std::clamp(2.0 * enqueue_ns + 1e5, 2e5, 2e8);
        if (round < o.warmup) continue;
        delay_ms = std::max(delay_ms, round_delay_ns * 1e-6);
        if (ran_out) ++uncovered;
        for (std::size_t j = 0; j < count; ++j) {
            samples[j].forward.push_back(events.ms(4 * j, 4 * j + 1));
            samples[j].backward.push_back(events.ms(4 * j + 1, 4 * j + 2));
            samples[j].optimizer.push_back(events.ms(4 * j + 2, 4 * j + 3));
            samples[j].total.push_back(events.ms(4 * j, 4 * j + 3));
            samples[j].host.push_back(host[j]);
        }
    }
    return samples;
}

/// README's floor (2 + r (n + m) / (n m)) / 3, and the full multiply-add model with the optimizer's m r n.
double model_floor(index_t r, index_t n, index_t m)
{
    const double rd = static_cast<double>(r), nd = static_cast<double>(n), md = static_cast<double>(m);
    return (2.0 + rd * (nd + md) / (nd * md)) / 3.0;
}
double model_full(index_t rows, index_t r, index_t n, index_t m)
{
    const double Nd = static_cast<double>(rows), rd = static_cast<double>(r), nd = static_cast<double>(n),
                 md = static_cast<double>(m);
    return (2 * Nd * nd * md + Nd * rd * (nd + md) + md * rd * nd) / (3 * Nd * nd * md);
}

// ------------------------------------------------------------------------------------------ kernels

struct kernel_row {
    std::string what;
    double bytes = 0;   // bytes the kernel must move (read + written)
    double us = 0;      // median
    double copy_us = 0; // median of the copy moving as many bytes
    bool judged = false; // the >= 70% target applies
};

/// Times `launch` and a device-to-device copy of bytes / 2 (so that it too reads and writes `bytes`),
/// alternately, after warm-up; medians. Each pair waits behind a short delay kernel, so that both are
/// queued before the GPU reaches the first event: the kernel's time then holds no launch latency, as
/// the copy's (queued behind the kernel) never did.
template <class Launch>
kernel_row time_kernel(const options& o, const compact::owned_cuda_context& owner, std::string what, double bytes,
                       bool judged, dbuf<std::byte>& copy_from, dbuf<std::byte>& copy_to, Launch&& launch)
{
    const context& ctx = owner.get();
    const auto copy_bytes = static_cast<std::size_t>(bytes / 2);
    event_set events(4);
    std::vector<double> kernel, copy;
    const int runs = std::max(o.runs, 20);
    constexpr unsigned long long queue_delay_ns = 50000; // far above the two launches' enqueue time
    for (int i = 0; i < 2 + runs; ++i) {
        delay_kernel<<<1, 1, 0, ctx.stream>>>(queue_delay_ns);
        check_launch("delay_kernel");
        events.record(0, ctx.stream);
        launch(ctx);
        events.record(1, ctx.stream);
        copy_device(ctx, copy_to.data(), copy_from.data(), std::min(copy_bytes, copy_from.size()));
        events.record(2, ctx.stream);
        owner.synchronize();
        if (i < 2) continue;
        kernel.push_back(1e3 * events.ms(0, 1));
        copy.push_back(1e3 * events.ms(1, 2));
    }
    return {std::move(what), bytes, median(kernel), median(copy), judged};
}

void time_kernels(const options& o, const compact::owned_cuda_context& owner, problem& p, bool adam_and_projection,
                  std::vector<kernel_row>& rows)
{
    const index_t N = p.rows, n = p.in, m = p.out, r = std::max<index_t>(1, n / 4);
    const double nm = static_cast<double>(count_of(m, n)), mr = static_cast<double>(count_of(m, r));
    const double Nm = static_cast<double>(count_of(N, m)), Nn = static_cast<double>(count_of(N, n));
    const double bf = sizeof(bf16), fl = sizeof(float);
    // Per element: adamw_update reads g, m, v, w and writes m, v, w; adam_direction reads g, m, v and
    // writes m, v and the direction.
    const double adamw_bytes = nm * (bf + 2 * fl + bf + 2 * fl + bf);
    const double direction_bytes = mr * (bf + 2 * fl + 2 * fl + bf);
    double largest = std::max({2 * Nn * bf, Nm * bf + static_cast<double>(m) * bf, 2 * Nm * bf});
    if (adam_and_projection) largest = std::max({largest, adamw_bytes, direction_bytes});
    dbuf<std::byte> from(static_cast<std::size_t>(largest / 2) + 1, std::byte{1}), to(from.size(), std::byte{0});

    const std::string nm_s = "(" + std::to_string(m) + ", " + std::to_string(n) + ")";
    const std::string nr_s = "(" + std::to_string(n) + ", " + std::to_string(r) + ")";
    const std::string mr_s = "(" + std::to_string(m) + ", " + std::to_string(r) + ")";
    const std::string Nm_s = "(" + std::to_string(N) + ", " + std::to_string(m) + ")";
    const std::string Nn_s = "(" + std::to_string(N) + ", " + std::to_string(n) + ")";
    if (adam_and_projection) {
        const compact::projection_source<bf16, backend> projection(n, r, compact::distribution::gaussian, seed, 1);
        dbuf<bf16> pbuf(count_of(n, r), bf16{}), direction(count_of(m, r), bf16{}), w(count_of(m, n), bf16{});
        dbuf<float> mom(count_of(m, n), 0.0f), var(count_of(m, n), 0.0f);
        copy_device(owner.get(), w.data(), p.w0.data(), w.size() * sizeof(bf16));
        fill_uniform(owner.get(), p.g.data(), count_of(m, n), 5, 1e-3);
        owner.synchronize();
        compact::adam_coefficients k;
        k.step_size = 1e-3;
        k.decay = 1.0 - 1e-5;
        const view<bf16> pv(pbuf.data(), n, r);
        rows.push_back(time_kernel(o, owner, "generate_projection<bf16> P " + nr_s + ", gaussian",
                                   static_cast<double>(count_of(n, r)) * bf, true, from, to, [&](const context& ctx) {
                                       backend::generate_projection<bf16>(ctx, projection.spec(epoch), 0, 0, pv);
                                   }));
        rows.push_back(time_kernel(o, owner, "adam_direction<bf16, float, bf16> " + mr_s, direction_bytes, true, from,
                                   to, [&](const context& ctx) {
                                       backend::adam_direction<bf16, float, bf16>(
                                           ctx, k, cview<bf16>(p.g.data(), m, r), view<float>(mom.data(), m, r),
                                           view<float>(var.data(), m, r), view<bf16>(direction.data(), m, r));
                                   }));
        rows.push_back(time_kernel(o, owner, "adamw_update<bf16, float> " + nm_s, adamw_bytes, true, from, to,
                                   [&](const context& ctx) {
                                       backend::adamw_update<bf16, float>(
                                           ctx, k, cview<bf16>(p.g.data(), m, n), view<float>(mom.data(), m, n),
                                           view<float>(var.data(), m, n), view<bf16>(w.data(), m, n));
                                   }));
    }
    if (p.bias) {
        rows.push_back(time_kernel(o, owner, "column_sums<bf16> (db) of dY " + Nm_s, Nm * bf + static_cast<double>(m) * bf,
                                   false, from, to, [&](const context& ctx) {
                                       backend::column_sums<bf16>(ctx, p.dyv(), __float2bfloat16(0.0f), p.db.data());
                                   }));
        rows.push_back(time_kernel(o, owner, "add_row_vector<bf16> (+ b) on Y " + Nm_s,
                                   2 * Nm * bf + static_cast<double>(m) * bf, false, from, to,
                                   [&](const context& ctx) { backend::add_row_vector<bf16>(ctx, p.b0.data(), p.yv()); }));
    }
    {
        // P generation at (N, n/4), into Z's memory: the step's P (n, n/4) is at most 32 MiB, inside the
        // L2 of an H100 or H200, so this is the row that measures the kernel against device memory.
        const compact::projection_source<bf16, backend> tall(N, r, compact::distribution::gaussian, seed, 2);
        rows.push_back(time_kernel(o, owner,
                                   "generate_projection<bf16> P (" + std::to_string(N) + ", " + std::to_string(r) +
                                       "), gaussian, into Z's memory",
                                   static_cast<double>(count_of(N, r)) * bf, true, from, to, [&](const context& ctx) {
                                       backend::generate_projection<bf16>(ctx, tall.spec(epoch), 0, 0, p.zv(r));
                                   }));
    }
    rows.push_back(time_kernel(o, owner, "axpby<bf16, bf16> Z = X (identity) " + Nn_s, 2 * Nn * bf, false, from, to,
                               [&](const context& ctx) {
                                   backend::axpby<bf16, bf16>(ctx, 1.0, p.xv(), 0.0, p.zv(n));
                               }));
}

// ------------------------------------------------------------------------------------------- a shape

struct target_result {
    bool judged = false;
    bool met = false;
};

bool run_shape(const options& o, const compact::owned_cuda_context& owner, const shape& s, report& out, std::vector<kernel_row>& kernels, std::vector<index_t>& kernel_widths,
               target_result& target)
{
    const index_t N = s.rows, n = s.in, m = s.out;
    const index_t ranks[3] = {std::max<index_t>(1, n / 2), std::max<index_t>(1, n / 4), std::max<index_t>(1, n / 8)};
    const char* labels[3] = {"n/2", "n/4", "n/8"};
    out.add("\n### N = %lld, n = %lld, m = %lld\n\n", static_cast<long long>(N), static_cast<long long>(n),
            static_cast<long long>(m));

    // Everything this shape needs, estimated before allocating: shared buffers, five copies of W and b,
    // full-shape moments twice, (m, r) moments per rank, the checks' references and the kernels' scratch.
    const double bf = sizeof(bf16), fl = sizeof(float);
    const double Nn = static_cast<double>(count_of(N, n)), Nm = static_cast<double>(count_of(N, m)),
                 mn = static_cast<double>(count_of(m, n));
    const double need = bf * (Nn * 3 + Nm * 2 + mn * 2) + 5 * bf * mn + 4 * fl * mn +
                        2 * fl * static_cast<double>(m) * static_cast<double>(ranks[0] + ranks[1] + ranks[2]) +
                        bf * (Nm + Nn + 2 * mn) + 11 * mn + 2 * fl * mn;
    std::size_t free_bytes = 0, total_bytes = 0;
    COMPACT_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes), "cudaMemGetInfo");
    if (need > 0.9 * static_cast<double>(free_bytes)) {
        out.add("skipped: needs about %s of device memory, %s free\n", bytes_string(need).c_str(),
                bytes_string(static_cast<double>(free_bytes)).c_str());
        return true;
    }

    std::size_t ws_bytes = library_step<compact::rank::full>::workspace_bytes(s, compact::rank::full{});
    for (index_t r : ranks)
        ws_bytes = std::max(ws_bytes, library_step<compact::rank::fixed>::workspace_bytes(s, compact::rank::fixed{r}));
    problem p(s, o.bias, ws_bytes, owner);

    library_step<compact::rank::full> full(p, "uncompressed, library (rank::full)", compact::rank::full{});
    cublas_step hand(p);
    std::vector<std::unique_ptr<library_step<compact::rank::fixed>>> compressed;
    for (int k = 0; k < 3; ++k)
        compressed.push_back(std::make_unique<library_step<compact::rank::fixed>>(
            p, std::string("compressed r = ") + labels[k], compact::rank::fixed{ranks[k]}));

    check_table log;
    run_checks(owner, p, full, hand, compressed, log);
    out.add("correctness, before timing (relative Frobenius errors, bf16 storage):\n\n");
    out.add("| check | error | tolerance | result |\n|---|---|---|---|\n");
    for (const std::string& line : log.rows) out.add("%s\n", line.c_str());
    if (!log.ok) {
        out.add("\ncuda_step: CORRECTNESS CHECK FAILED for this shape; no timings reported\n");
        return false;
    }

    std::vector<step_variant*> variants{&full, &hand};
    for (auto& c : compressed) variants.push_back(c.get());
    double delay_ms = 0;
    int uncovered = 0;
    const std::vector<phase_samples> t = time_variants(o, owner, variants, delay_ms, uncovered);

    check_scratch scratch;
    std::size_t bad = 0;
    for (step_variant* v : variants) bad += count_non_finite(owner, scratch, v->weight_data(), count_of(m, n));
    bad += count_non_finite(owner, scratch, p.y.data(), count_of(N, m));
    if (bad != 0) {
        out.add("\ncuda_step: %zu non-finite values in W or Y after timing; no timings reported\n", bad);
        return false;
    }

    const phase_samples& base = t[0];
    const phase_samples& hand_t = t[1];
    out.add("\nstep time, forward + backward + optimizer (ms over %zu interleaved rounds after %d warm-up; each round "
            "queued behind a delay kernel of at most %.2f ms, which ran out before the host had queued the round "
            "in %d of them); every W and the last Y finite after timing:\n\n",
            base.total.size(), o.warmup, delay_ms, uncovered);
    out.add("| variant | r | median | min | p90 | forward / backward / optimizer (median) | ratio vs library "
            "uncompressed (paired median; min / min) | ratio vs cuBLAS | model (2 + r(n+m)/(nm))/3 | model with m r n | "
            "saved for backward | optimizer state | host enqueue us | target |\n");
    out.add("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for (std::size_t j = 0; j < variants.size(); ++j) {
        const step_variant& v = *variants[j];
        const phase_samples& x = t[j];
        const bool is_compressed = j >= 2;
        const double ratio = paired_ratio(x.total, base.total), ratio_hand = paired_ratio(x.total, hand_t.total);
        char ratio_cell[64], hand_cell[32], model_cell[32] = "1", full_model_cell[32] = "1", target_cell[64] = "";
        std::snprintf(ratio_cell, sizeof ratio_cell, "%.3f; %.3f", ratio, minimum(x.total) / minimum(base.total));
        std::snprintf(hand_cell, sizeof hand_cell, "%.3f", ratio_hand);
        if (is_compressed) {
            std::snprintf(model_cell, sizeof model_cell, "%.3f", model_floor(v.rank(), n, m));
            std::snprintf(full_model_cell, sizeof full_model_cell, "%.3f", model_full(N, v.rank(), n, m));
        }
        if (is_compressed && N == 32768 && n == 4096 && m == 4096 && v.rank() == n / 4) {
            target.judged = !o.smoke;
            target.met = ratio <= 0.92;
            std::snprintf(target_cell, sizeof target_cell, "<= 0.92: %s", target.met ? "met" : "MISSED");
        }
        const double saved = static_cast<double>(v.saved_bytes());
        const double full_saved = static_cast<double>(count_of(N, n)) * bf;
        out.add("| %s | %lld | %.3f | %.3f | %.3f | %.3f / %.3f / %.3f | %s | %s | %s | %s | %s (%.0fx less than X; saves %s) | %s | %.0f | %s |\n",
                v.name().c_str(), static_cast<long long>(v.rank()), median(x.total), minimum(x.total),
                percentile(x.total, 0.9), median(x.forward), median(x.backward), median(x.optimizer), ratio_cell,
                hand_cell, model_cell, full_model_cell, bytes_string(saved).c_str(), full_saved / saved,
                bytes_string(full_saved - saved).c_str(), bytes_string(static_cast<double>(v.state_bytes())).c_str(), median(x.host), target_cell);
    }
    const double flop = 2.0 * 3.0 * static_cast<double>(N) * static_cast<double>(n) * static_cast<double>(m);
    out.add("\nuncompressed step: %.1f GFLOP (2 x 3 N n m); cuBLAS step %.3f ms = %.0f TFLOP/s, library %.3f ms = "
            "%.0f TFLOP/s (whole step, optimizer and bias included). Saved bytes per step: X (N n bf16) %s, Z at "
            "n/4 %s.\n",
            flop * 1e-9, median(hand_t.total), flop / (median(hand_t.total) * 1e-3) * 1e-12, median(base.total),
            flop / (median(base.total) * 1e-3) * 1e-12, bytes_string(static_cast<double>(count_of(N, n)) * bf).c_str(),
            bytes_string(static_cast<double>(count_of(N, ranks[1])) * bf).c_str());

    const bool adam_and_projection = std::find(kernel_widths.begin(), kernel_widths.end(), n) == kernel_widths.end();
    if (adam_and_projection) kernel_widths.push_back(n);
    time_kernels(o, owner, p, adam_and_projection, kernels);
    return true;
}

// ------------------------------------------------------------------------------------------ device

#if defined(__CUDA_ARCH_LIST__)
#define COMPACT_BENCH_STRING2(...) #__VA_ARGS__
#define COMPACT_BENCH_STRING(...) COMPACT_BENCH_STRING2(__VA_ARGS__)
constexpr const char* built_for = "compute capabilities " COMPACT_BENCH_STRING(__CUDA_ARCH_LIST__) " (x10)";
#else
constexpr const char* built_for = "the architectures of CMAKE_CUDA_ARCHITECTURES";
#endif

std::string device_summary(const cudaDeviceProp& prop, int device, cublasHandle_t handle, double& peak_gbs)
{
    int driver = 0, runtime = 0, cublas = 0, sm_khz = 0, mem_khz = 0;
    cudaDriverGetVersion(&driver);
    cudaRuntimeGetVersion(&runtime);
    cublasGetVersion(handle, &cublas);
    // cudaDeviceProp lost its clock fields in CUDA 13; the attributes remain (peak clocks, kHz).
    if (cudaDeviceGetAttribute(&sm_khz, cudaDevAttrClockRate, device) != cudaSuccess) sm_khz = 0;
    if (cudaDeviceGetAttribute(&mem_khz, cudaDevAttrMemoryClockRate, device) != cudaSuccess) mem_khz = 0;
    (void)cudaGetLastError();
    // DDR: two transfers per memory clock over the whole bus.
    peak_gbs = 2.0 * static_cast<double>(mem_khz) * 1e3 * static_cast<double>(prop.memoryBusWidth) / 8.0 * 1e-9;
    char s[1024];
    std::snprintf(s, sizeof s,
                  "- device: %s (compute capability %d.%d, %d SMs, %s memory, L2 %s); peak SM clock %.0f MHz, memory "
                  "clock %.0f MHz x %d-bit bus = %.0f GB/s theoretical\n"
                  "- driver API %s, runtime %s, cuBLAS %d.%d.%d; built with nvcc %d.%d for %s\n",
                  prop.name, prop.major, prop.minor, prop.multiProcessorCount,
                  bytes_string(static_cast<double>(prop.totalGlobalMem)).c_str(),
                  bytes_string(static_cast<double>(prop.l2CacheSize)).c_str(), sm_khz * 1e-3, mem_khz * 1e-3,
                  prop.memoryBusWidth, peak_gbs, version_string(driver).c_str(), version_string(runtime).c_str(),
                  cublas / 10000, (cublas / 100) % 100, cublas % 100, __CUDACC_VER_MAJOR__, __CUDACC_VER_MINOR__,
                  built_for);
    return s;
}

} // namespace

int main(int argc, char** argv)
{
    options o;
    try {
        if (!parse(argc, argv, o)) return 0;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "cuda_step: %s\n", e.what());
        usage(stderr);
        return 2;
    }
    if (!backend::device_available()) {
        std::printf("cuda_step: no CUDA device, skipped\n");
        return skip_status;
    }
    try {
        int device = 0;
        COMPACT_CUDA_CHECK(cudaGetDevice(&device), "cudaGetDevice");
        cudaDeviceProp prop{};
        COMPACT_CUDA_CHECK(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties");
        if (prop.major < 8) {
            std::printf("cuda_step: %s has compute capability %d.%d; bf16 GEMMs need 8.0 or newer, skipped\n",
                        prop.name, prop.major, prop.minor);
            return skip_status;
        }
        const compact::owned_cuda_context owner;
        report out;
        double peak_gbs = 0;
        out.add("## cuda_step: compressed vs uncompressed linear training step on the GPU (bf16)\n\n");
        out.add("%s", device_summary(prop, device, owner.get().handle, peak_gbs).c_str());
        out.add("- step: __nv_bfloat16 X, W, b, Y, dY, dX, Z, G; fp32 accumulation (CUBLAS_COMPUTE_32F, no TF32); "
                "fp32 AdamW moments; bias %s; AdamW lr %g, betas (%g, %g), eps %g, weight decay %g, alpha %g; "
                "T = 0 (one P), Gaussian P regenerated in forward and in the optimizer\n",
                o.bias ? "on" : "off", hyper.lr, hyper.beta1, hyper.beta2, hyper.eps, hyper.weight_decay, hyper.alpha);
        out.add("- timing: CUDA events, %d warm-up rounds then %d timed rounds per shape, variants interleaved "
                "(A B C, C B A, ...)\n",
                o.warmup, o.runs);
        out.add("- date: %s%s\n", today().c_str(),
                o.smoke ? "; SMOKE RUN (tiny shape, timings meaningless)" : "");

        bool ok = true;
        target_result target;
        std::vector<kernel_row> kernels;
        std::vector<index_t> kernel_widths;
        for (const shape& s : o.shapes) {
            std::fprintf(stderr, "cuda_step: N=%lld n=%lld m=%lld\n", static_cast<long long>(s.rows),
                         static_cast<long long>(s.in), static_cast<long long>(s.out));
            ok = run_shape(o, owner, s, out, kernels, kernel_widths, target) && ok;
        }

        if (!kernels.empty()) {
            out.add("\n### kernels alone (median of %d launches after 2 warm-up, each followed by a device-to-device "
                    "cudaMemcpyAsync moving as many bytes)\n\n",
                    std::max(o.runs, 20));
            out.add("| kernel | bytes read + written | us | GB/s | copy GB/s | of the copy | of theoretical peak | "
                    "target >= 70%% of the copy |\n|---|---|---|---|---|---|---|---|\n");
            for (const kernel_row& k : kernels) {
                const double gbs = k.bytes / (k.us * 1e-6) * 1e-9, copy_gbs = k.bytes / (k.copy_us * 1e-6) * 1e-9;
                const bool in_l2 = k.bytes < 2.0 * static_cast<double>(prop.l2CacheSize);
                // A row inside twice the L2 measures the cache for the kernel and the copy alike: not judged.
                const char* verdict = !k.judged ? "-"
                                      : o.smoke ? "not judged (smoke)"
                                      : in_l2   ? "not judged (L2)"
                                                : (gbs >= 0.7 * copy_gbs ? "met" : "MISSED");
                out.add("| %s | %s%s | %.1f | %.0f | %.0f | %.0f%% | %.0f%% | %s |\n", k.what.c_str(),
                        bytes_string(k.bytes).c_str(), in_l2 ? " (fits in L2)" : "", k.us, gbs, copy_gbs,
                        100.0 * gbs / copy_gbs, peak_gbs > 0 ? 100.0 * gbs / peak_gbs : 0.0, verdict);
            }
            out.add("\nBytes are counted from the kernels' signatures: adamw_update reads G (bf16), M, V (fp32) and W "
                    "(bf16) and writes M, V and W; adam_direction reads G, M, V and writes M, V and the direction "
                    "(bf16); generate_projection only writes P. Rows that fit in twice the L2 measure the cache, not "
                    "device memory, and are not judged.\n");
        }

        if (target.judged)
            out.add("\ntarget: at N = 32768, n = m = 4096, r = n/4 the step ratio against the library's uncompressed "
                    "step is at most 0.92: %s\n",
                    target.met ? "met" : "MISSED");
        else
            out.add("\ntarget (N = 32768, n = m = 4096, r = n/4: ratio <= 0.92): not judged (%s)\n",
                    o.smoke ? "smoke run" : "shape not run");

        if (!o.markdown.empty()) {
            std::FILE* f = std::fopen(o.markdown.c_str(), "w");
            if (!f || std::fputs(out.text().c_str(), f) < 0) {
                if (f) std::fclose(f);
                std::fprintf(stderr, "cuda_step: cannot write --markdown %s\n", o.markdown.c_str());
                return 1;
            }
            std::fclose(f);
        }
        if (!ok) return 1;
        if (o.check_target && target.judged && !target.met) return 3;
        return 0;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "cuda_step: %s\n", e.what());
        return 1;
    }
}
