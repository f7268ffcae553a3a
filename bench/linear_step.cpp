// bench/linear_step.cpp: one training step of a compressed linear layer against the uncompressed one.
//
// For X (N, n), W (m, n), dY (N, m) in float, through the CPU backend with a fixed thread count, it times
//   uncompressed: Y = X W^T, dX = dY W, G = dY^T X, adamw::step on W (m, n moments);
//   compressed:   compressed_linear forward (Y and Z = X P), backward (dX and G_sub = dY^T Z),
//                 subspace_adamw::step (m, r moments; W -= ... N P^T)
// for r = n (the identity projection: the uncompressed step through the compressed code path) and a
// gaussian P with r = n/2, n/4, n/8. It prints the measured time ratio next to the multiply-add model
// of SPEC section 2,
//   (2 N n m + N r (n + m) + m r n) / (3 N n m),
// and the bytes saved for backward (N r instead of N n values) beside it.
//
// Correctness is checked first, and the program exits non-zero when a check fails:
//   * the uncompressed step's Y, dX and G against a float64 reference;
//   * with the identity projection, Y, dX and W after one step from the same state equal the
//     uncompressed step's to a relative error of 1e-5;
//   * for every gaussian r, G_sub equals (dY^T X) P in float64, with P from cpu::generate_projection, and
//     the step with P kept equals the regenerating one bit for bit.
//
// Timing: every buffer is allocated before the clock starts. Per r, after two warm-up rounds, the variants
// (uncompressed; compressed; compressed with P kept, i.e. kept by the layer's projection_source through
// projection().keep, generated once and reused by forward and step)
// run in rounds, in order and then reversed (A B C, C B A, ...), so that noise from a shared machine hits
// all of them; the ratio is the median over rounds of compressed / uncompressed from the same round. Each
// step is timed whole and by phase (forward, backward, optimizer); P's generation is timed on its own (the
// default compressed step generates P twice: in forward and in the optimizer).
//
//   linear_step [--rows N] [--in n] [--out m] [--threads t] [--reps k] [--seconds s] [--warmup w]
//               [--smoke] [--check-target]
//
// Exit status: 0 when the checks pass; 1 when a check fails (or the library throws); 2 for a bad command
// line; 3 with --check-target when the r = n/4 target (ratio <= 0.90 and <= 1.05 x model) is missed.
// See bench/README.md for how to read the output.

#include <compact/compact.hpp>

#include "bench_support.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <exception>
#include <fstream>
#include <functional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace {

using compact::cpu;
using compact::index_t;
using compact::op;
using namespace compact_bench;

// ------------------------------------------------------------------------------------- command line

struct options {
    index_t rows = 4096; // N
    index_t in = 1024;   // n
    index_t out = 1024;  // m
    int threads = 2;
    int reps = 0;          // 0: enough for `seconds` per configuration, at least 5
    double seconds = 1.0;  // target time per configuration when reps == 0
    int warmup = 2;
    bool smoke = false;
    bool check_target = false;
};

void usage(std::FILE* to, const char* argv0)
{
    std::fprintf(to, "usage: %s [--rows N] [--in n] [--out m] [--threads t] [--reps k] [--seconds s] [--warmup w]\n"
                 "          [--smoke] [--check-target]\n"
                 "  defaults: N=4096 n=1024 m=1024, 2 threads, reps for ~1 s per configuration (at least 5),\n"
                 "  2 warm-up rounds (at least 1). --smoke: N=256 n=m=128, 2 reps, 1 warm-up (checks still run).\n"
                 "  --check-target: exit 3 if r = n/4 misses ratio <= 0.90 or ratio <= 1.05 x model.\n",
                 argv0);
}

bool parse(int argc, char** argv, options& o)
{
    bool rows_set = false, in_set = false, out_set = false, reps_set = false, warmup_set = false;
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        auto value = [&](long long low) -> long long {
            if (i + 1 >= argc) throw std::invalid_argument(a + " needs a value");
            char* end = nullptr;
            const long long v = std::strtoll(argv[++i], &end, 10);
            if (*end != '\0' || v < low) throw std::invalid_argument(a + " needs an integer >= " + std::to_string(low));
            return v;
        };
        if (a == "--rows") o.rows = value(1), rows_set = true;
        else if (a == "--in") o.in = value(8), in_set = true;
        else if (a == "--out") o.out = value(1), out_set = true;
        else if (a == "--threads") o.threads = static_cast<int>(value(1));
        else if (a == "--reps") o.reps = static_cast<int>(value(1)), reps_set = true;
        else if (a == "--warmup") o.warmup = static_cast<int>(value(1)), warmup_set = true;
        else if (a == "--seconds") {
            if (i + 1 >= argc) throw std::invalid_argument("--seconds needs a value");
            char* end = nullptr;
            o.seconds = std::strtod(argv[++i], &end);
            if (*end != '\0' || !(o.seconds > 0)) throw std::invalid_argument("--seconds needs a positive number");
        } else if (a == "--smoke") o.smoke = true;
        else if (a == "--check-target") o.check_target = true;
        else if (a == "--help" || a == "-h") {
            usage(stdout, argv[0]);
            return false;
        } else throw std::invalid_argument("unknown argument " + a);
    }
    if (o.smoke) {
        if (!rows_set) o.rows = 256;
        if (!in_set) o.in = 128;
        if (!out_set) o.out = 128;
        if (!reps_set) o.reps = 2;
        if (!warmup_set) o.warmup = 1;
    }
    return true;
}

// ------------------------------------------------------------------------------------------ helpers

std::string bytes_string(double b)
{
    char s[32];
    if (b >= 1024.0 * 1024.0) std::snprintf(s, sizeof s, "%.2f MiB", b / (1024.0 * 1024.0));
    else if (b >= 1024.0) std::snprintf(s, sizeof s, "%.1f KiB", b / 1024.0);
    else std::snprintf(s, sizeof s, "%.0f B", b);
    return s;
}

/// CPU seconds spent by the whole machine (from /proc/stat, Linux; negative elsewhere) and by this process
/// (std::clock counts all its threads): their difference over a stretch of wall time is how many CPUs other
/// jobs kept busy meanwhile, the noise that a shared machine adds to the timings.
struct cpu_usage {
    double machine = -1, self = 0;
    static cpu_usage now()
    {
        cpu_usage u;
        u.self = static_cast<double>(std::clock()) / CLOCKS_PER_SEC;
        std::ifstream f("/proc/stat");
        std::string label;
        double user = 0, nice = 0, system = 0, idle = 0, iowait = 0, irq = 0, softirq = 0, steal = 0;
        if (f >> label >> user >> nice >> system >> idle >> iowait >> irq >> softirq >> steal && label == "cpu")
            u.machine = (user + nice + system + irq + softirq + steal) / 100.0; // USER_HZ is 100 on Linux
        return u;
    }
};

/// The 1-minute load average before the run (Linux), to judge how shared the machine was.
std::string load_average()
{
    std::ifstream f("/proc/loadavg");
    std::string one;
    return f >> one ? one : "unknown";
}

std::string compiler()
{
#if defined(__clang__)
    return __VERSION__; // "Clang x.y.z ..." or similar
#elif defined(__GNUC__)
    return std::string("g++ ") + __VERSION__;
#elif defined(_MSC_VER)
    return "MSVC " + std::to_string(_MSC_FULL_VER);
#else
    return "unknown";
#endif
}

std::string vector_isa()
{
    std::string s;
#if defined(__AVX512F__)
    s += "AVX-512F ";
#endif
#if defined(__AVX2__)
    s += "AVX2 ";
#endif
#if defined(__FMA__)
    s += "FMA ";
#endif
#if defined(__ARM_NEON)
    s += "NEON ";
#endif
    if (s.empty()) s = "baseline ";
    s += "(Eigen packet: " + std::to_string(Eigen::internal::packet_traits<float>::size) + " floats)";
    return s;
}

/// ||a - b|| / ||b|| (Frobenius), accumulated in double.
double relative_error(compact::const_matrix_view<float> a, compact::const_matrix_view<float> b)
{
    double num = 0, den = 0;
    for (index_t i = 0; i < a.rows; ++i)
        for (index_t j = 0; j < a.cols; ++j) {
            const double d = static_cast<double>(a(i, j)) - static_cast<double>(b(i, j));
            num += d * d;
            den += static_cast<double>(b(i, j)) * static_cast<double>(b(i, j));
        }
    return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

/// Float64 references, one row of a product at a time: the checks use a sample of rows, which catches
/// any transposition or indexing error at a fraction of the cost of the full products.
template <class RowRef>
double sampled_error(compact::const_matrix_view<float> got, const std::vector<index_t>& rows, RowRef&& ref_row)
{
    double num = 0, den = 0;
    for (index_t i : rows) {
        const std::vector<double> ref = ref_row(i);
        for (index_t j = 0; j < got.cols; ++j) {
            const double d = static_cast<double>(got(i, j)) - ref[static_cast<std::size_t>(j)];
            num += d * d;
            den += ref[static_cast<std::size_t>(j)] * ref[static_cast<std::size_t>(j)];
        }
    }
    return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

/// Up to `count` rows of [0, total), evenly spread, first and last included.

// ------------------------------------------------------------------------------------------- steps

/// The data every configuration starts from: X (N, n), W0 (m, n), dY (N, m).
struct problem {
    index_t rows, in, out;
    buffer<float> x, w0, dy;

    problem(index_t n_rows, index_t n_in, index_t n_out)
        : rows(n_rows), in(n_in), out(n_out), x(static_cast<std::size_t>(n_rows * n_in)),
          w0(static_cast<std::size_t>(n_out * n_in)), dy(static_cast<std::size_t>(n_rows * n_out))
    {
        const double bound = 1.0 / std::sqrt(static_cast<double>(n_in)); // PyTorch's default init range
        compact::fill_uniform(view_of(x, rows, in), -1.0, 1.0, 2024, 1);
        compact::fill_uniform(view_of(w0, out, in), -bound, bound, 2024, 2);
        compact::fill_uniform(view_of(dy, rows, out), -1.0, 1.0, 2024, 3);
    }
    compact::const_matrix_view<float> xv() const { return compact::make_view(x.data(), rows, in); }
    compact::const_matrix_view<float> dyv() const { return compact::make_view(dy.data(), rows, out); }
};

/// Wall time of one step, whole and by phase (seconds).
struct step_time {
    double forward = 0, backward = 0, optimizer = 0, total = 0;
};

struct phase_samples {
    std::vector<double> forward, backward, optimizer, total;
    void add(const step_time& t)
    {
        forward.push_back(t.forward);
        backward.push_back(t.backward);
        optimizer.push_back(t.optimizer);
        total.push_back(t.total);
    }
};

const compact::adamw_params hyper{1e-3, 0.9, 0.999, 1e-6, 0.01, 1.0};

/// The uncompressed step through the backend's primitives: what a plain linear layer with AdamW does.
class uncompressed_step {
public:
    explicit uncompressed_step(const problem& p)
        : p_(p), w_(p.w0), y_(size(p.rows, p.out)), dx_(size(p.rows, p.in)), g_(size(p.out, p.in)),
          m_(size(p.out, p.in)), v_(size(p.out, p.in))
    {
        reset();
    }

    void reset()
    {
        std::copy(p_.w0.begin(), p_.w0.end(), w_.begin());
        std::fill(m_.begin(), m_.end(), 0.0f);
        std::fill(v_.begin(), v_.end(), 0.0f);
        counters_ = {};
    }

    step_time run(const cpu::context& ctx)
    {
        const index_t N = p_.rows, n = p_.in, m = p_.out;
        const auto x = p_.xv(), dy = p_.dyv();
        const auto t0 = clock_type::now();
        cpu::gemm<float>(ctx, op::none, op::transpose, 1.0f, x, w(), 0.0f, view_of(y_, N, m)); // Y = X W^T
        const auto t1 = clock_type::now();
        cpu::gemm<float>(ctx, op::none, op::none, 1.0f, dy, w(), 0.0f, view_of(dx_, N, n));    // dX = dY W
        cpu::gemm<float>(ctx, op::transpose, op::none, 1.0f, dy, x, 0.0f, view_of(g_, m, n));  // G = dY^T X
        const auto t2 = clock_type::now();
        compact::adamw<cpu>::step<float, float>(ctx, hyper, view_of(w_, m, n), view_of(g_, m, n),
                                                view_of(m_, m, n), view_of(v_, m, n), counters_);
        const auto t3 = clock_type::now();
        return {seconds_between(t0, t1), seconds_between(t1, t2), seconds_between(t2, t3), seconds_between(t0, t3)};
    }

    compact::matrix_view<float> w() { return view_of(w_, p_.out, p_.in); }
    compact::matrix_view<float> y() { return view_of(y_, p_.rows, p_.out); }
    compact::matrix_view<float> dx() { return view_of(dx_, p_.rows, p_.in); }
    compact::matrix_view<float> g() { return view_of(g_, p_.out, p_.in); }
    std::size_t saved_bytes() const { return static_cast<std::size_t>(p_.rows * p_.in) * sizeof(float); }
    std::size_t state_bytes() const { return compact::adamw<cpu>::state_bytes<float>(p_.out, p_.in); }

private:
    static std::size_t size(index_t r, index_t c) { return static_cast<std::size_t>(r * c); }

    const problem& p_;
    buffer<float> w_;  // (m, n)
    buffer<float> y_;  // (N, m)
    buffer<float> dx_; // (N, n)
    buffer<float> g_;  // (m, n)
    buffer<float> m_;  // (m, n) first moment
    buffer<float> v_;  // (m, n) second moment
    compact::adam_counters counters_;
};

/// The compressed step: compressed_linear forward/backward and subspace_adamw, all memory preallocated.
/// By default P is regenerated in forward and again in the optimizer step, as SPEC section 1 has it;
/// with keep_projection the layer's projection_source keeps P (projection().keep) in memory of this step
/// (T = 0: one P for the whole run), so forward and step generate it once and then reuse it.
template <class Policy>
class compressed_step {
public:
    using layer_type = compact::compressed_linear<float, Policy, cpu>;
    using optimizer_type = compact::subspace_adamw<float, cpu, float>;

    compressed_step(const problem& p, Policy policy, bool keep_projection = false)
        : p_(p), layer_(compact::in_features{p.in}, compact::out_features{p.out}, /*seed=*/42, /*layer=*/7, policy),
          opt_(compact::out_features{p.out}, layer_.projection()), r_(layer_.rank()), w_(p.w0),
          y_(size(p.rows, p.out)), z_(size(p.rows, r_)), dx_(size(p.rows, p.in)), g_sub_(size(p.out, r_)),
          m_(size(p.out, r_)), v_(size(p.out, r_)),
          ws_(std::max(layer_.workspace_bytes(p.rows), opt_.workspace_bytes()))
    {
        if (keep_projection && !layer_.projection().is_identity()) {
            p_kept_.resize(size(p.in, r_));
            layer_.compressor().projection().keep(view_of(p_kept_, p.in, r_));
        }
        grads_ = compact::layer_gradient<float>{view_of(g_sub_, p.out, r_)}; // no bias
        reset();
    }

    // The layer's projection source points into p_kept_: a copy would not keep P, a moved-from one would.
    compressed_step(const compressed_step&) = delete;
    compressed_step& operator=(const compressed_step&) = delete;
    compressed_step(compressed_step&&) = default;

    void reset()
    {
        std::copy(p_.w0.begin(), p_.w0.end(), w_.begin());
        std::fill(m_.begin(), m_.end(), 0.0f);
        std::fill(v_.begin(), v_.end(), 0.0f);
        counters_ = {};
        grads_.written = false;
    }

    step_time run(const cpu::context& ctx)
    {
        const index_t N = p_.rows, n = p_.in, m = p_.out;
        const auto x = p_.xv(), dy = p_.dyv();
        const compact::workspace ws{ws_.data(), ws_.size()};
        auto saved = compact::bind_saved<typename layer_type::saved_type>(z_.data(), z_.size() * sizeof(float));
        const auto t0 = clock_type::now();
        layer_.forward(ctx, x, w(), {}, view_of(y_, N, m), saved, step, ws); // Z = X P into z_
        const auto t1 = clock_type::now();
        layer_.backward(ctx, dy, w(), saved, view_of(dx_, N, n), grads_, ws);
        const auto t2 = clock_type::now();
        opt_.step(ctx, hyper, layer_.projection(), view_of(w_, m, n), grads_, view_of(m_, m, r_), view_of(v_, m, r_),
                  counters_, ws);
        const auto t3 = clock_type::now();
        return {seconds_between(t0, t1), seconds_between(t1, t2), seconds_between(t2, t3), seconds_between(t0, t3)};
    }

    /// Generates P alone (what forward and the optimizer each do once per step).
    double time_generation(const cpu::context& ctx)
    {
        if (layer_.projection().is_identity()) return 0;
        if (p_gen_.empty()) p_gen_.resize(size(p_.in, r_)); // allocated before the clock starts
        const auto out = view_of(p_gen_, p_.in, r_);
        const auto t0 = clock_type::now();
        layer_.projection().generate(ctx, epoch, out);
        return seconds_between(t0, clock_type::now());
    }

    const layer_type& layer() const { return layer_; }
    index_t rank() const { return r_; }
    bool kept() const { return !p_kept_.empty(); }
    compact::matrix_view<float> w() { return view_of(w_, p_.out, p_.in); }
    compact::matrix_view<float> y() { return view_of(y_, p_.rows, p_.out); }
    compact::matrix_view<float> dx() { return view_of(dx_, p_.rows, p_.in); }
    compact::matrix_view<float> g_sub() { return view_of(g_sub_, p_.out, r_); }
    std::size_t saved_bytes() const { return layer_.saved_bytes(p_.rows); }
    std::size_t state_bytes() const { return opt_.state_bytes(); }

private:
    static std::size_t size(index_t r, index_t c) { return static_cast<std::size_t>(r * c); }
    // T = 0 (no resampling, the layer's default): every step uses P of epoch 0; forward is passed step 0.
    static constexpr std::uint64_t step = 0;
    static constexpr std::uint64_t epoch = 0;

    const problem& p_;
    layer_type layer_;
    optimizer_type opt_;
    index_t r_;
    buffer<float> w_;         // (m, n)
    buffer<float> y_;         // (N, m)
    buffer<float> z_;         // (N, r) saved for backward
    buffer<float> dx_;        // (N, n)
    buffer<float> g_sub_;     // (m, r)
    buffer<float> m_;         // (m, r) first moment
    buffer<float> v_;         // (m, r) second moment
    buffer<unsigned char> ws_; // P (n, r) and the update direction (m, r)
    buffer<float> p_kept_;    // (n, r) when P is kept (the layer's projection source holds it), else empty
    buffer<float> p_gen_;     // (n, r) for time_generation
    compact::layer_gradient<float> grads_{}; // G_sub (m, r) in g_sub_, with the epoch backward recorded
    compact::adam_counters counters_;
};

// ---------------------------------------------------------------------------------------- timings

struct row_result {
    std::string label;
    index_t r = 0;
    bool identity = false;
    phase_samples base, comp, kept; // kept: empty for the identity row
    double generation = 0;          // median seconds to generate P once
    double other_cpus = -1;         // CPUs kept busy by other jobs while the row ran (negative: unknown
                                    // or a row too short to tell)
    std::size_t base_saved = 0, comp_saved = 0, base_state = 0, comp_state = 0;
};

/// Warm-up, then `reps` rounds of every step in `steps`, in order on even rounds and in reverse on odd
/// ones (A B C, C B A, ...), so that drift and noise on a shared machine hit every variant alike.
std::vector<phase_samples> interleave(const options& o, const std::vector<std::function<step_time()>>& steps)
{
    double round = 0;
    for (int i = 0; i < o.warmup; ++i) {
        round = 0;
        for (auto& s : steps) round += s().total;
    }
    const int reps = o.reps > 0 ? o.reps : static_cast<int>(std::clamp(std::ceil(o.seconds / round), 5.0, 10000.0));
    std::vector<phase_samples> samples(steps.size());
    for (int i = 0; i < reps; ++i)
        for (std::size_t k = 0; k < steps.size(); ++k) {
            const std::size_t j = i % 2 == 0 ? k : steps.size() - 1 - k;
            samples[j].add(steps[j]());
        }
    return samples;
}

template <class Policy>
row_result time_row(const options& o, const cpu::context& ctx, uncompressed_step& base,
                    compressed_step<Policy>& comp, compressed_step<Policy>* kept, const std::string& label)
{
    row_result res;
    res.label = label;
    res.r = comp.rank();
    res.identity = comp.layer().projection().is_identity();
    res.base_saved = base.saved_bytes();
    res.comp_saved = comp.saved_bytes();
    res.base_state = base.state_bytes();
    res.comp_state = comp.state_bytes();

    std::vector<std::function<step_time()>> steps{[&] { return base.run(ctx); }, [&] { return comp.run(ctx); }};
    if (kept) steps.emplace_back([&] { return kept->run(ctx); });
    const auto u0 = cpu_usage::now();
    const auto t0 = clock_type::now();
    auto samples = interleave(o, steps);
    const double wall = seconds_between(t0, clock_type::now());
    const auto u1 = cpu_usage::now();
    if (u0.machine >= 0 && u1.machine >= 0 && wall >= 0.5) // /proc/stat counts in 10 ms ticks
        res.other_cpus = std::max(0.0, (u1.machine - u0.machine) - (u1.self - u0.self)) / wall;
    res.base = std::move(samples[0]);
    res.comp = std::move(samples[1]);
    if (kept) res.kept = std::move(samples[2]);

    std::vector<double> gen;
    for (std::size_t i = 0; i < std::max<std::size_t>(res.comp.total.size(), 5); ++i)
        gen.push_back(comp.time_generation(ctx));
    res.generation = median(gen);
    return res;
}

double model_ratio(const row_result& row, index_t N, index_t n, index_t m)
{
    if (row.identity) return 1.0; // same three GEMMs; Z = X is a copy and the update needs no P^T
    const double Nd = static_cast<double>(N), nd = static_cast<double>(n), md = static_cast<double>(m),
                 rd = static_cast<double>(row.r);
    return (2 * Nd * nd * md + Nd * rd * (nd + md) + md * rd * nd) / (3 * Nd * nd * md);
}

} // namespace

int main(int argc, char** argv)
{
    options o;
    try {
        if (!parse(argc, argv, o)) return 0;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "linear_step: %s\n", e.what());
        usage(stderr, argv[0]);
        return 2;
    }
    const index_t N = o.rows, n = o.in, m = o.out;
    const cpu::context ctx{o.threads};

    try {
        std::printf("## linear_step: compressed vs uncompressed linear training step (SPEC section 2)\n\n");
        std::printf("- shape: N=%lld, n=%lld, m=%lld, float, bias off, AdamW (lr %g, wd %g), T = 0 (one P)\n",
                    static_cast<long long>(N), static_cast<long long>(n), static_cast<long long>(m), hyper.lr,
                    hyper.weight_decay);
        std::printf("- threads: %d (cpu::context), OpenMP %s; machine: %s, %u logical CPUs, load average %s\n",
                    o.threads, COMPACT_HAS_OPENMP ? "on" : "off (single-threaded)", cpu_model().c_str(),
                    std::thread::hardware_concurrency(), load_average().c_str());
        std::printf("- compiler: %s; Eigen %d.%d.%d; vector ISA: %s\n", compiler().c_str(), EIGEN_WORLD_VERSION,
                    EIGEN_MAJOR_VERSION, EIGEN_MINOR_VERSION, vector_isa().c_str());
        std::printf("- date: %s%s\n\n", today().c_str(), o.smoke ? "; SMOKE RUN (small shape, timings meaningless)" : "");

        const problem prob(N, n, m);
        uncompressed_step base(prob);
        compressed_step<compact::rank::full> identity(prob, {});
        const index_t ranks[3] = {n / 2, n / 4, n / 8};
        const char* labels[3] = {"n/2", "n/4", "n/8"};
        // One compressed step per rank that regenerates P (the default) and one that keeps it.
        std::vector<compressed_step<compact::rank::fixed>> gaussian, kept;
        gaussian.reserve(3);
        kept.reserve(3);
        for (index_t r : ranks) {
            gaussian.emplace_back(prob, compact::rank::fixed{r});
            kept.emplace_back(prob, compact::rank::fixed{r}, /*keep_projection=*/true);
        }

        // Correctness, before any timing, from the initial state.
        check_table checks;
        {
            base.run(ctx);
            // Rows of the (N, *) results and of the (m, *) gradients checked against float64.
            const std::vector<index_t> token_rows = sample_rows(N, 48), feature_rows = sample_rows(m, 48);
            const auto x = prob.xv(), dy = prob.dyv();
            const auto w0 = compact::make_view(static_cast<const float*>(prob.w0.data()), m, n);
            checks.add("uncompressed Y = X W^T vs float64",
                       sampled_error(base.y(), token_rows, [&](index_t i) { return reference::row_abt(x, w0, i); }),
                       1e-5);
            checks.add("uncompressed dX = dY W vs float64",
                       sampled_error(base.dx(), token_rows, [&](index_t i) { return reference::row_ab(dy, w0, i); }),
                       1e-5);
            std::vector<std::vector<double>> g_rows; // rows feature_rows of G = dY^T X, float64
            for (index_t i : feature_rows) g_rows.push_back(reference::row_atb(dy, x, i));
            auto g_row = [&](index_t i) {
                return g_rows[static_cast<std::size_t>(std::find(feature_rows.begin(), feature_rows.end(), i) -
                                                       feature_rows.begin())];
            };
            checks.add("uncompressed G = dY^T X vs float64", sampled_error(base.g(), feature_rows, g_row), 1e-5);

            identity.run(ctx);
            checks.add("identity (r = n) vs uncompressed: Y", relative_error(identity.y(), base.y()), 1e-5);
            checks.add("identity (r = n) vs uncompressed: dX", relative_error(identity.dx(), base.dx()), 1e-5);
            checks.add("identity (r = n) vs uncompressed: W after one step", relative_error(identity.w(), base.w()),
                       1e-5);
            // The update W1 - W0 is ~lr per element, far below W's size: compare it on its own scale too.
            {
                double num = 0, den = 0;
                for (index_t i = 0; i < m; ++i)
                    for (index_t j = 0; j < n; ++j) {
                        const double sb = static_cast<double>(base.w()(i, j)) - static_cast<double>(w0(i, j));
                        const double si = static_cast<double>(identity.w()(i, j)) - static_cast<double>(w0(i, j));
                        num += (si - sb) * (si - sb);
                        den += sb * sb;
                    }
                checks.add("identity (r = n) vs uncompressed: update W1 - W0", std::sqrt(num / den), 1e-4);
            }

            buffer<float> p_buf;
            for (std::size_t k = 0; k < gaussian.size(); ++k) {
                auto& c = gaussian[k];
                c.run(ctx);
                kept[k].run(ctx);
                const index_t r = c.rank();
                p_buf.assign(static_cast<std::size_t>(n * r), 0.0f);
                const auto p = view_of(p_buf, n, r);
                cpu::generate_projection<float>(ctx, c.layer().projection().spec(0), 0, 0, p);
                const std::string name = "gaussian r = " + std::to_string(r) + ": ";
                checks.add(name + "G_sub vs (dY^T X) P in float64",
                           sampled_error(c.g_sub(), feature_rows,
                                         [&](index_t i) { return reference::vec_b(g_row(i), p); }),
                           1e-4);
                checks.add(name + "P kept vs regenerated: W after one step", relative_error(kept[k].w(), c.w()), 0);
            }
            base.reset();
            identity.reset();
            for (auto& c : gaussian) c.reset();
            for (auto& c : kept) c.reset();
        }
        std::printf("### correctness (checked before timing; relative Frobenius errors)\n\n");
        std::printf("| check | error | tolerance | result |\n|---|---|---|---|\n");
        for (auto& line : checks.rows) std::printf("%s\n", line.c_str());
        std::printf("\n");
        if (!checks.ok) {
            std::printf("linear_step: CORRECTNESS CHECK FAILED; no timings reported\n");
            return 1;
        }

        std::vector<row_result> rows;
        rows.push_back(time_row<compact::rank::full>(o, ctx, base, identity, nullptr, "n (identity)"));
        for (std::size_t k = 0; k < gaussian.size(); ++k)
            rows.push_back(time_row(o, ctx, base, gaussian[k], &kept[k], labels[k]));

        const double Nd = static_cast<double>(N), nd = static_cast<double>(n), md = static_cast<double>(m);
        std::printf("### step time: forward + backward + optimizer (ms; median of %zu interleaved steps, %d "
                    "warm-up)\n\n",
                    rows.back().comp.total.size(), o.warmup);
        std::printf("| r | uncompressed (median / min) | compressed (median / min) | ratio (paired median / min over min) | model | "
                    "ratio / model | P kept: ms / ratio / ratio over model | saved for backward X -> Z | optimizer state M, V | P "
                    "generation ms, x2 per step (share) | other jobs (CPUs busy) |\n");
        std::printf("|---|---|---|---|---|---|---|---|---|---|---|\n");
        bool target_met = false;
        double target_ratio = 0, target_model = 0;
        for (auto& row : rows) {
            const double tb = median(row.base.total), tc = median(row.comp.total);
            const double ratio = paired_ratio(row.comp.total, row.base.total), model = model_ratio(row, N, n, m);
            char kept_cell[64] = "-", gen[64] = "-";
            if (!row.kept.total.empty()) {
                const double kr = paired_ratio(row.kept.total, row.base.total);
                std::snprintf(kept_cell, sizeof kept_cell, "%.2f / %.3f / %.3f", 1e3 * median(row.kept.total), kr,
                              kr / model);
            }
            char other[32] = "-";
            if (row.other_cpus >= 0) std::snprintf(other, sizeof other, "%.2f", row.other_cpus);
            if (!row.identity)
                std::snprintf(gen, sizeof gen, "%.2f (%.1f%%)", 1e3 * row.generation, 100 * 2 * row.generation / tc);
            std::printf("| %lld = %s | %.2f / %.2f | %.2f / %.2f | %.3f / %.3f | %.3f | %.3f | %s | %s -> %s (%.0fx) | "
                        "%s -> %s | %s | %s |\n",
                        static_cast<long long>(row.r), row.label.c_str(), 1e3 * tb, 1e3 * minimum(row.base.total),
                        1e3 * tc, 1e3 * minimum(row.comp.total), ratio,
                        minimum(row.comp.total) / minimum(row.base.total), model, ratio / model, kept_cell,
                        bytes_string(static_cast<double>(row.base_saved)).c_str(),
                        bytes_string(static_cast<double>(row.comp_saved)).c_str(),
                        static_cast<double>(row.base_saved) / static_cast<double>(row.comp_saved),
                        bytes_string(static_cast<double>(row.base_state)).c_str(),
                        bytes_string(static_cast<double>(row.comp_state)).c_str(), gen, other);
            if (row.label == "n/4") {
                target_ratio = ratio;
                target_model = model;
                target_met = ratio <= 0.90 && ratio <= 1.05 * model;
            }
        }
        std::vector<double> all_base;
        for (auto& row : rows) all_base.insert(all_base.end(), row.base.total.begin(), row.base.total.end());
        const double step_gflop = 2.0 * 3.0 * Nd * nd * md * 1e-9;
        std::printf("\nmodel = (2 N n m + N r (n + m) + m r n) / (3 N n m) (identity row: 1, the same three GEMMs). "
                    "uncompressed step: %.2f GFLOP (2 x 3 N n m) in %.2f ms (median over all rows) = %.1f GFLOP/s, "
                    "%.1f per thread (best step %.1f GFLOP/s)\n",
                    step_gflop, 1e3 * median(all_base), step_gflop / median(all_base),
                    step_gflop / median(all_base) / o.threads, step_gflop / minimum(all_base));

        std::printf("\n### phases (median ms; GFLOP/s = 2 x the model's multiply-adds of the phase / its time)\n\n");
        std::printf("| r | path | forward | backward | optimizer | step | GFLOP/s forward / backward / optimizer |\n");
        std::printf("|---|---|---|---|---|---|---|\n");
        for (auto& row : rows) {
            const double rd = static_cast<double>(row.r), rp = row.identity ? 0 : rd; // rp: r of the P products
            const double base_f[3] = {Nd * nd * md, 2 * Nd * nd * md, 0};
            const double comp_f[3] = {Nd * nd * md + Nd * nd * rp, Nd * md * nd + md * Nd * rd, md * rp * nd};
            auto print = [&](const char* path, const phase_samples& ph, const double (&f)[3]) {
                if (ph.total.empty()) return;
                const double t[3] = {median(ph.forward), median(ph.backward), median(ph.optimizer)};
                std::string gf;
                for (int i = 0; i < 3; ++i) {
                    char cell[32] = "-";
                    if (f[i] > 0) std::snprintf(cell, sizeof cell, "%.0f", 2 * f[i] * 1e-9 / t[i]);
                    gf += (i ? " / " : "") + std::string(cell);
                }
                std::printf("| %lld = %s | %s | %.2f | %.2f | %.2f | %.2f | %s |\n", static_cast<long long>(row.r),
                            row.label.c_str(), path, 1e3 * t[0], 1e3 * t[1], 1e3 * t[2], 1e3 * median(ph.total),
                            gf.c_str());
            };
            print("uncompressed", row.base, base_f);
            print("compressed", row.comp, comp_f);
            print("compressed, P kept", row.kept, comp_f);
        }

        std::printf("\ntarget: at r = n/4 the measured ratio is at most 0.90 and at most 1.05 x the model: "
                    "%.3f vs model %.3f (x%.3f): %s\n",
                    target_ratio, target_model, target_ratio / target_model,
                    o.smoke ? "not judged in a smoke run" : (target_met ? "met" : "MISSED"));
        if (o.check_target && !o.smoke && !target_met) return 3;
        return 0;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "linear_step: %s\n", e.what());
        return 1;
    }
}
