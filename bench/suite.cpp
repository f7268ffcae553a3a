// bench/suite.cpp: the CPU benchmark suite: one training step of a linear layer, compressed against
// uncompressed, over a grid of shapes and ranks, with the multiply-add model of SPEC section 2 beside
// every measured ratio.
//
// For every layer shape (N tokens, n inputs, m outputs), in float through the cpu backend:
//   uncompressed:  Y = X W^T, dX = dY W, G = dY^T X (three cpu::gemm calls) and adamw::step (m, n moments);
//   compressed:    compressed_linear<float, rank::fixed, cpu> forward (Y and Z = X P), backward (dX and
//                  G_sub = dY^T Z) and subspace_adamw::step ((m, r) moments, W -= ... N P^T), with P
//                  regenerated in forward and again in the optimizer (SPEC section 1: P is never kept),
// at r in {n/2, n/4, n/8, 8}. The full grid is N in {1024, 4096, 16384} times the square layers n = m in
// {256, 1024, 4096} and the LLaMA-like MLP layers 1024 -> 2736 and 2736 -> 1024.
//
// Per shape, before anything is timed, every variant runs one step from the same state and is checked:
//   * the uncompressed Y, dX and G against float64 on sampled rows;
//   * every compressed Y and dX against the uncompressed ones (the same products: expected equal);
//   * every G_sub against (dY^T X) P in float64 on sampled rows of G, with P from cpu::generate_projection;
//   * every compressed update W1 - W0 against the SPEC section 3 equations in float64 on those rows (from
//     the layer's G_sub, which the previous check covers).
// Then, after a warm-up, the uncompressed step and the compressed steps of every rank run in rounds,
// in order and reversed on alternate rounds; each ratio is the median over rounds of compressed /
// uncompressed from the same round, so a slowdown of the shared machine that lasts a round cancels out.
// Forward, backward and optimizer are timed inside each step. P's generation is timed alone, and at
// r = n/4 every product and elementwise pass of the step is timed alone too (the GEMM breakdown), which
// is what the target analysis uses to name the slow part when the step misses its model.
//
//   suite [--threads t] [--seconds s] [--shapes LIST] [--quick] [--smoke] [--peer CSV | --peer-command C]
//         [--csv PATH] [--markdown PATH] [--busy-limit c] [--time-limit s] [--wait-quiet s] [--list]
//
// Before each shape it can wait for the shared machine to go quiet, run PyTorch's peer on the same shape
// (--peer-command), and a shape measured while other jobs were busy is measured again at the end.
//
// Exit status: 0 when every check passes; 1 when a check fails (nothing is timed then) or the library
// throws; 2 for a bad command line. See bench/README.md ("suite") for the columns.

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
#include <map>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace {

using compact::cpu;
using compact::index_t;
using compact::op;
using namespace compact_bench;

const compact::adamw_params hyper{1e-3, 0.9, 0.999, 1e-6, 0.01, 1.0};

// ------------------------------------------------------------------------------------- command line

struct options {
    int threads = 2;
    double seconds = 10.0;   // timed seconds per shape (rounds are added until this is reached)
    int min_reps = 3;        // timed rounds at least, whatever the shape
    int max_reps = 200;      // and at most
    int warmup = 1;          // untimed rounds after the checks
    bool smoke = false;
    bool quick = false;
    bool list = false;       // print the shapes that would run, comma-separated, and exit
    std::vector<std::string> shape_filters; // "NxNinxM" items, '*' for any field
    std::string peer_path, peer_command, csv_path, markdown_path;
    double busy_limit = 0.5;  // CPUs kept busy by other jobs above which a shape is measured again at the end
    double time_limit = 840;  // seconds: no repeat measurement starts that would end after this
    double wait_quiet = 0;    // seconds to wait at most, before each shape, for other jobs to go below busy_limit
};

void usage(std::FILE* to, const char* argv0)
{
    std::fprintf(to,
                 "usage: %s [--threads t] [--seconds s] [--shapes LIST] [--quick] [--smoke] [--peer CSV | --peer-command C]\n"
                 "          [--csv PATH] [--markdown PATH] [--busy-limit c] [--time-limit s] [--wait-quiet s] [--list]\n"
                 "  --threads t      OpenMP threads of every backend call (default 2)\n"
                 "  --seconds s      timed seconds per shape, at least 3 rounds and at most 200 (default 10)\n"
                 "  --shapes LIST    comma-separated NxNinxM shapes, '*' for any field, e.g. 4096x1024x*,*x256x256\n"
                 "  --quick          N=4096 only, 3 s per shape\n"
                 "  --smoke          two tiny shapes, 2 rounds: the checks are real, the timings are not\n"
                 "  --peer CSV       PyTorch's figures from bench/pytorch_peer.py, shown beside ours\n"
                 "  --peer-command C run C --shapes <shape> (bench/pytorch_peer.py) right before each shape and\n"
                 "                   read its CSV instead\n"
                 "  --csv PATH       one row per (shape, r); --markdown PATH: the report (also on stdout)\n"
                 "  --busy-limit c   measure a shape again at the end when other jobs kept more than c CPUs\n"
                 "                   busy while it ran, and keep the quieter run (default 0.5)\n"
                 "  --time-limit s   start no such repeat that would end after s seconds (default 840)\n"
                 "  --wait-quiet s   before each shape, wait up to s seconds for 2 s in which other jobs keep\n"
                 "                   at most --busy-limit CPUs busy (default 0: no wait)\n"
                 "  --list           print the shapes the other options select, comma-separated, and exit\n",
                 argv0);
}

double parse_number(const std::string& name, const char* text, double low)
{
    char* end = nullptr;
    const double v = std::strtod(text, &end);
    if (*end != '\0' || !(v >= low)) throw std::invalid_argument(name + " needs a number >= " + std::to_string(low));
    return v;
}

std::vector<std::string> split(const std::string& s, char sep)
{
    std::vector<std::string> out;
    std::string item;
    std::istringstream in(s);
    while (std::getline(in, item, sep)) out.push_back(item);
    if (!s.empty() && s.back() == sep) out.emplace_back();
    return out;
}

bool parse(int argc, char** argv, options& o)
{
    bool seconds_set = false;
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        auto value = [&]() -> const char* {
            if (i + 1 >= argc) throw std::invalid_argument(a + " needs a value");
            return argv[++i];
        };
        if (a == "--threads") o.threads = static_cast<int>(parse_number(a, value(), 1));
        else if (a == "--seconds") o.seconds = parse_number(a, value(), 0), seconds_set = true;
        else if (a == "--shapes") {
            for (const auto& item : split(value(), ',')) {
                const auto fields = split(item, 'x');
                if (fields.size() != 3)
                    throw std::invalid_argument("--shapes item '" + item + "' is not NxNinxM (use * for any field)");
                for (const auto& f : fields)
                    if (f != "*" && (f.empty() || f.find_first_not_of("0123456789") != std::string::npos))
                        throw std::invalid_argument("--shapes item '" + item + "' has a field that is neither a "
                                                    "number nor *");
                o.shape_filters.push_back(item);
            }
        } else if (a == "--quick") o.quick = true;
        else if (a == "--smoke") o.smoke = true;
        else if (a == "--list") o.list = true;
        else if (a == "--peer") o.peer_path = value();
        else if (a == "--peer-command") o.peer_command = value();
        else if (a == "--csv") o.csv_path = value();
        else if (a == "--markdown") o.markdown_path = value();
        else if (a == "--busy-limit") o.busy_limit = parse_number(a, value(), 0);
        else if (a == "--time-limit") o.time_limit = parse_number(a, value(), 0);
        else if (a == "--wait-quiet") o.wait_quiet = parse_number(a, value(), 0);
        else if (a == "--help" || a == "-h") {
            usage(stdout, argv[0]);
            return false;
        } else throw std::invalid_argument("unknown argument " + a);
    }
    if (o.smoke) {
        o.min_reps = 2;
        o.max_reps = 2;
        o.busy_limit = 1e9; // a smoke run is never repeated
    } else if (o.quick && !seconds_set) o.seconds = 3.0;
    return true;
}

// ------------------------------------------------------------------------------------------ shapes

/// One linear layer: X (N, n), W (m, n), Y (N, m).
struct layer_shape {
    index_t rows, in, out; // N, n, m
    std::string id() const { return std::to_string(rows) + "x" + std::to_string(in) + "x" + std::to_string(out); }
    std::string layer() const { return std::to_string(in) + " -> " + std::to_string(out); }
};

bool matches(const layer_shape& s, const std::string& filter)
{
    const auto f = split(filter, 'x');
    const index_t v[3] = {s.rows, s.in, s.out};
    for (int k = 0; k < 3; ++k)
        if (f[static_cast<std::size_t>(k)] != "*" && std::stoll(f[static_cast<std::size_t>(k)]) != v[k]) return false;
    return true;
}

/// The grid, grouped by layer (the report has one table per layer) and by N inside a layer.
std::vector<layer_shape> suite_shapes(const options& o)
{
    std::vector<layer_shape> all;
    if (o.smoke) {
        all = {{256, 128, 128}, {192, 96, 160}};
    } else {
        const index_t layers[5][2] = {{256, 256}, {1024, 1024}, {4096, 4096}, {1024, 2736}, {2736, 1024}};
        const std::vector<index_t> rows =
            o.quick ? std::vector<index_t>{4096} : std::vector<index_t>{1024, 4096, 16384};
        for (const auto& l : layers)
            for (index_t N : rows) {
                if (o.quick && l[0] == 4096) continue; // the quick subset skips the 4096-wide layer
                all.push_back({N, l[0], l[1]});
            }
    }
    if (o.shape_filters.empty()) return all;
    std::vector<layer_shape> picked;
    for (const auto& s : all)
        for (const auto& f : o.shape_filters)
            if (matches(s, f)) {
                picked.push_back(s);
                break;
            }
    if (picked.empty()) throw std::invalid_argument("--shapes matches none of the suite's shapes");
    return picked;
}

/// r in {n/2, n/4, n/8, 8}, largest first, without repeats (a narrow layer's n/8 can be 8).
std::vector<std::pair<index_t, std::string>> suite_ranks(index_t n)
{
    std::vector<std::pair<index_t, std::string>> ranks;
    const std::pair<index_t, std::string> all[4] = {{n / 2, "n/2"}, {n / 4, "n/4"}, {n / 8, "n/8"}, {8, "8"}};
    for (const auto& r : all) {
        if (r.first < 1 || r.first > n) continue;
        if (std::none_of(ranks.begin(), ranks.end(), [&](const auto& q) { return q.first == r.first; }))
            ranks.push_back(r);
    }
    return ranks;
}

// ------------------------------------------------------------------------------------------ helpers

double as_double(index_t v) { return static_cast<double>(v); }
std::size_t count_of(index_t rows, index_t cols) { return static_cast<std::size_t>(rows * cols); }

std::string format(const char* fmt, double v)
{
    char s[64];
    std::snprintf(s, sizeof s, fmt, v);
    return s;
}

std::string bytes_string(double b)
{
    if (b >= 1024.0 * 1024.0) return format("%.1f MiB", b / (1024.0 * 1024.0));
    if (b >= 1024.0) return format("%.1f KiB", b / 1024.0);
    return format("%.0f B", b);
}

/// The 1-minute load average (Linux), negative when unknown.
double load_average()
{
    std::ifstream f("/proc/loadavg");
    double one = -1;
    return f >> one ? one : -1;
}

/// CPU seconds used by the whole machine (/proc/stat; negative where absent) and by this process: over a
/// stretch of wall time their difference is how many CPUs other jobs kept busy, the noise of a shared machine.
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
    /// Other jobs' CPUs between a and b over `wall` seconds; negative when unknown or too short to tell.
    static double others(const cpu_usage& a, const cpu_usage& b, double wall)
    {
        if (a.machine < 0 || b.machine < 0 || wall < 0.5) return -1; // /proc/stat counts 10 ms ticks
        return std::max(0.0, (b.machine - a.machine) - (b.self - a.self)) / wall;
    }
};

/// Waits up to `limit` seconds for a 2-second stretch in which other jobs keep at most `busy` CPUs busy, so
/// that a shape starts when the shared machine is quiet if it becomes so; returns the seconds waited.
double wait_for_quiet(double limit, double busy)
{
    const auto start = clock_type::now();
    while (limit > 0) {
        const auto u0 = cpu_usage::now();
        const auto t0 = clock_type::now();
        std::this_thread::sleep_for(std::chrono::seconds(2));
        const double others = cpu_usage::others(u0, cpu_usage::now(), seconds_between(t0, clock_type::now()));
        if (others < 0 || others <= busy || seconds_between(start, clock_type::now()) >= limit) break;
    }
    return seconds_between(start, clock_type::now());
}

std::string compiler()
{
#if defined(__clang__)
    return __VERSION__;
#elif defined(__GNUC__)
    return std::string("g++ ") + __VERSION__;
#else
    return "unknown";
#endif
}

// ------------------------------------------------------------------------------------------ problem

/// The data every variant of one shape starts from: X (N, n), W0 (m, n), dY (N, m), U[-1, 1) for X and dY
/// and PyTorch's default initialisation range for W.
struct problem {
    layer_shape shape;
    buffer<float> x, w0, dy;

    explicit problem(const layer_shape& s)
        : shape(s), x(count_of(s.rows, s.in)), w0(count_of(s.out, s.in)), dy(count_of(s.rows, s.out))
    {
        const double bound = 1.0 / std::sqrt(as_double(s.in));
        compact::fill_uniform(view_of(x, s.rows, s.in), -1.0, 1.0, 2026, 1);
        compact::fill_uniform(view_of(w0, s.out, s.in), -bound, bound, 2026, 2);
        compact::fill_uniform(view_of(dy, s.rows, s.out), -1.0, 1.0, 2026, 3);
    }
    compact::const_matrix_view<float> xv() const { return view_of(x, shape.rows, shape.in); }
    compact::const_matrix_view<float> w0v() const { return view_of(w0, shape.out, shape.in); }
    compact::const_matrix_view<float> dyv() const { return view_of(dy, shape.rows, shape.out); }
};

/// Outputs a step overwrites: Y (N, m) and dX (N, n). The compressed variants share one pair (they run one
/// after another), the uncompressed step has its own so that the checks can compare them.
struct step_outputs {
    buffer<float> y, dx;
    explicit step_outputs(const layer_shape& s) : y(count_of(s.rows, s.out)), dx(count_of(s.rows, s.in)) {}
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

/// A plain linear layer with AdamW: what the compressed one is measured against.
class uncompressed_step {
public:
    uncompressed_step(const problem& p, step_outputs& out)
        : p_(p), out_(out), w_(p.w0), g_(count_of(p.shape.out, p.shape.in)), m_(g_.size()), v_(g_.size())
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
        const auto x = p_.xv(), dy = p_.dyv();
        const auto t0 = clock_type::now();
        cpu::gemm<float>(ctx, op::none, op::transpose, 1.0, x, w(), 0.0, y()); // Y = X W^T
        const auto t1 = clock_type::now();
        cpu::gemm<float>(ctx, op::none, op::none, 1.0, dy, w(), 0.0, dx());    // dX = dY W
        cpu::gemm<float>(ctx, op::transpose, op::none, 1.0, dy, x, 0.0, g());  // G = dY^T X
        const auto t2 = clock_type::now();
        compact::adamw<cpu>::step<float, float>(ctx, hyper, w(), g(), m(), v(), counters_);
        const auto t3 = clock_type::now();
        return {seconds_between(t0, t1), seconds_between(t1, t2), seconds_between(t2, t3), seconds_between(t0, t3)};
    }

    compact::matrix_view<float> w() { return view_of(w_, p_.shape.out, p_.shape.in); }
    compact::matrix_view<float> g() { return view_of(g_, p_.shape.out, p_.shape.in); }
    compact::matrix_view<float> m() { return view_of(m_, p_.shape.out, p_.shape.in); }
    compact::matrix_view<float> v() { return view_of(v_, p_.shape.out, p_.shape.in); }
    compact::matrix_view<float> y() { return view_of(out_.y, p_.shape.rows, p_.shape.out); }
    compact::matrix_view<float> dx() { return view_of(out_.dx, p_.shape.rows, p_.shape.in); }
    compact::adam_counters& counters() { return counters_; }

private:
    const problem& p_;
    step_outputs& out_;
    buffer<float> w_; // (m, n)
    buffer<float> g_; // (m, n)
    buffer<float> m_; // (m, n) first moment
    buffer<float> v_; // (m, n) second moment
    compact::adam_counters counters_;
};

/// The compressed layer and its optimizer at one rank, P regenerated in forward and in the step.
class compressed_step {
public:
    using layer_type = compact::compressed_linear<float, compact::rank::fixed, cpu>;
    using optimizer_type = compact::subspace_adamw<float, cpu, float>;
    static constexpr std::uint64_t epoch = 0; // one P for the whole run (T = 0: the layer's default)
    static constexpr std::uint64_t step = 0;  // the completed updates passed to forward (any gives epoch 0)

    compressed_step(const problem& p, step_outputs& out, index_t rank)
        : p_(p), out_(out),
          layer_(compact::in_features{p.shape.in}, compact::out_features{p.shape.out}, /*seed=*/42, /*layer=*/7,
                 compact::rank::fixed{rank}),
          opt_(compact::out_features{p.shape.out}, layer_.projection()), r_(layer_.rank()), w_(p.w0),
          z_(count_of(p.shape.rows, r_)), g_sub_(count_of(p.shape.out, r_)), m_(g_sub_.size()), v_(g_sub_.size()),
          ws_(std::max(layer_.workspace_bytes(p.shape.rows), opt_.workspace_bytes()))
    {
        grads_.weight = g_sub(); // no bias
        reset();
    }

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
        const auto x = p_.xv(), dy = p_.dyv();
        const compact::workspace ws{ws_.data(), ws_.size()};
        // Z = X P is kept in z_ (N r floats: exactly saved_bytes(N)).
        auto saved = compact::bind_saved<layer_type::saved_type>(z_.data(), z_.size() * sizeof(float));
        const auto t0 = clock_type::now();
        layer_.forward(ctx, x, w(), {}, y(), saved, step, ws);
        const auto t1 = clock_type::now();
        layer_.backward(ctx, dy, w(), saved, dx(), grads_, ws);
        const auto t2 = clock_type::now();
        opt_.step(ctx, hyper, layer_.projection(), w(), grads_, m(), v(), counters_, ws);
        const auto t3 = clock_type::now();
        return {seconds_between(t0, t1), seconds_between(t1, t2), seconds_between(t2, t3), seconds_between(t0, t3)};
    }

    compact::projection_spec spec() const { return layer_.projection().spec(epoch); }
    index_t rank() const { return r_; }
    std::size_t saved_bytes() const { return layer_.saved_bytes(p_.shape.rows); }
    compact::matrix_view<float> w() { return view_of(w_, p_.shape.out, p_.shape.in); }
    compact::matrix_view<float> z() { return view_of(z_, p_.shape.rows, r_); }
    compact::matrix_view<float> g_sub() { return view_of(g_sub_, p_.shape.out, r_); }
    compact::matrix_view<float> m() { return view_of(m_, p_.shape.out, r_); }
    compact::matrix_view<float> v() { return view_of(v_, p_.shape.out, r_); }
    compact::matrix_view<float> y() { return view_of(out_.y, p_.shape.rows, p_.shape.out); }
    compact::matrix_view<float> dx() { return view_of(out_.dx, p_.shape.rows, p_.shape.in); }

private:
    const problem& p_;
    step_outputs& out_;
    layer_type layer_;
    optimizer_type opt_;
    index_t r_;
    buffer<float> w_;          // (m, n)
    buffer<float> z_;          // (N, r) saved for backward
    buffer<float> g_sub_;      // (m, r)
    buffer<float> m_;          // (m, r) first moment
    buffer<float> v_;          // (m, r) second moment
    buffer<unsigned char> ws_; // P (n, r) and the update direction (m, r)
    compact::layer_gradient<float> grads_{}; // G_sub (m, r) in g_sub_, with the epoch backward recorded
    compact::adam_counters counters_;
};

// ------------------------------------------------------------------------------------------ checks

/// Every check of one kind, over all shapes and ranks: the report lists the worst error of each kind.
struct check_log {
    struct kind {
        std::string what;
        double tolerance = 0, worst = 0;
        std::string worst_where;
        int passed = 0, failed = 0;
    };
    std::vector<kind> kinds;
    bool ok = true;

    void add(const std::string& what, double tolerance, double error, const std::string& where)
    {
        auto it = std::find_if(kinds.begin(), kinds.end(), [&](const kind& k) { return k.what == what; });
        if (it == kinds.end()) {
            kinds.push_back({what, tolerance, -1, "", 0, 0});
            it = kinds.end() - 1;
        }
        const bool pass = std::isfinite(error) && error <= tolerance;
        (pass ? it->passed : it->failed) += 1;
        ok = ok && pass;
        if (!std::isfinite(error) || error > it->worst) {
            it->worst = error;
            it->worst_where = where;
        }
        if (!pass)
            std::fprintf(stderr, "suite: CHECK FAILED: %s at %s: %.3e > %.0e\n", what.c_str(), where.c_str(), error,
                         tolerance);
    }
};

/// ||a - b|| / ||b|| (Frobenius), in double.
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

/// ||got - ref|| / ||ref|| over rows of a matrix; ref[k] is the float64 reference of got's row rows[k].
double rows_error(compact::const_matrix_view<float> got, const std::vector<index_t>& rows,
                  const std::vector<std::vector<double>>& ref)
{
    double num = 0, den = 0;
    for (std::size_t k = 0; k < rows.size(); ++k)
        for (index_t j = 0; j < got.cols; ++j) {
            const double r = ref[k][static_cast<std::size_t>(j)];
            const double d = static_cast<double>(got(rows[k], j)) - r;
            num += d * d;
            den += r * r;
        }
    return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

/// Up to `count` rows of [0, total), evenly spread, first and last included.

/// One step of every variant from the initial state, checked against the uncompressed step and float64.
void check_shape(const cpu::context& ctx, const problem& prob, uncompressed_step& base,
                 std::vector<std::unique_ptr<compressed_step>>& comps, check_log& log)
{
    const layer_shape& s = prob.shape;
    const index_t N = s.rows, n = s.in, m = s.out;
    const auto x = prob.xv(), dy = prob.dyv(), w0 = prob.w0v();
    // Sampled rows: token rows of Y and dX (n m multiply-adds in double each), feature rows of G (N n each).
    const std::vector<index_t> token_rows = sample_rows(N, 16);
    const std::vector<index_t> feature_rows = sample_rows(m, N * n > (index_t{1} << 24) ? 6 : 16);

    base.run(ctx);
    std::vector<std::vector<double>> y_ref, dx_ref, g_ref;
    for (index_t i : token_rows) {
        y_ref.push_back(reference::row_abt(x, w0, i));
        dx_ref.push_back(reference::row_ab(dy, w0, i));
    }
    for (index_t i : feature_rows) g_ref.push_back(reference::row_atb(dy, x, i));
    log.add("uncompressed Y = X W^T vs float64 (sampled rows)", 1e-5, rows_error(base.y(), token_rows, y_ref), s.id());
    log.add("uncompressed dX = dY W vs float64 (sampled rows)", 1e-5, rows_error(base.dx(), token_rows, dx_ref),
            s.id());
    log.add("uncompressed G = dY^T X vs float64 (sampled rows)", 1e-5, rows_error(base.g(), feature_rows, g_ref),
            s.id());

    // The subspace AdamW update after one step from zero moments (SPEC section 3, t = 1), in float64.
    const double step_size = hyper.lr * std::sqrt(1.0 - hyper.beta2) / (1.0 - hyper.beta1) * hyper.alpha;
    const double decay = 1.0 - hyper.lr * hyper.weight_decay;

    buffer<float> p_buf;
    buffer<float> delta(count_of(m, n)); // (m, n) W1 - W0, filled on the sampled rows only
    auto dv = view_of(delta, m, n);
    for (auto& c : comps) {
        c->run(ctx);
        const index_t r = c->rank();
        const std::string where = s.id() + " r=" + std::to_string(r);
        log.add("compressed Y vs uncompressed Y (whole matrix)", 1e-6, relative_error(c->y(), base.y()), where);
        log.add("compressed dX vs uncompressed dX (whole matrix)", 1e-6, relative_error(c->dx(), base.dx()), where);

        p_buf.assign(count_of(n, r), 0.0f);
        const auto p = view_of(p_buf, n, r);
        cpu::generate_projection<float>(ctx, c->spec(), 0, 0, p);
        std::vector<std::vector<double>> g_sub_ref, update_ref;
        for (std::size_t k = 0; k < feature_rows.size(); ++k) {
            const index_t i = feature_rows[k];
            std::vector<double> g_sub = reference::vec_b(g_ref[k], p); // (dY^T X) P, row i
            // At t = 1 the direction is close to sign(G_sub), which jumps at 0: it is computed from the
            // layer's own G_sub (checked against float64 below), so that an entry within float
            // rounding of 0 cannot flip its sign between the two and fail a correct optimizer.
            std::vector<double> direction(g_sub.size());
            for (std::size_t j = 0; j < g_sub.size(); ++j) {
                const double gj = static_cast<double>(c->g_sub()(i, static_cast<index_t>(j)));
                const double mj = (1.0 - hyper.beta1) * gj;
                const double vj = (1.0 - hyper.beta2) * gj * gj;
                direction[j] = mj / (std::sqrt(vj) + hyper.eps);
            }
            std::vector<double> update = reference::vec_bt(direction, p); // direction P^T (n)
            for (index_t j = 0; j < n; ++j) {
                const double w = static_cast<double>(w0(i, j));
                update[static_cast<std::size_t>(j)] = decay * (w - step_size * update[static_cast<std::size_t>(j)]) - w;
            }
            g_sub_ref.push_back(std::move(g_sub));
            update_ref.push_back(std::move(update));
        }
        log.add("G_sub = dY^T Z vs (dY^T X) P in float64 (sampled rows)", 1e-4,
                rows_error(c->g_sub(), feature_rows, g_sub_ref), where);
        // The update is about lr per element, far below W: it is compared on its own scale.
        for (index_t i : feature_rows)
            for (index_t j = 0; j < n; ++j) dv(i, j) = c->w()(i, j) - w0(i, j);
        log.add("compressed update W1 - W0 vs SPEC section 3 in float64 (sampled rows)", 1e-4,
                rows_error(dv, feature_rows, update_ref), where);
    }
}

// ------------------------------------------------------------------------------------------ PyTorch

/// PyTorch's figures for one shape, from bench/pytorch_peer.py's CSV (times in ms, sizes in bytes).
struct peer_row {
    double forward = 0, backward = 0, optimizer = 0, step = 0, step_min = 0, busy = -1;
    double saved = 0, saved_activations = 0, saved_parameters = 0;
    int threads = 0, reps = 0;
};

/// Rows of bench/pytorch_peer.py's CSV by shape id; `source` names the input in errors.
std::map<std::string, peer_row> parse_peer(std::istream& in, const std::string& source)
{
    std::map<std::string, peer_row> rows;
    std::string line;
    if (!std::getline(in, line)) throw std::runtime_error(source + ": no CSV header");
    const auto header = split(line, ',');
    auto column = [&](const std::string& name) {
        const auto it = std::find(header.begin(), header.end(), name);
        if (it == header.end()) throw std::runtime_error(source + ": no column '" + name + "'");
        return static_cast<std::size_t>(it - header.begin());
    };
    const std::size_t c_shape = column("shape"), c_threads = column("threads"), c_reps = column("reps"),
                      c_fwd = column("forward_ms"), c_bwd = column("backward_ms"), c_opt = column("optimizer_ms"),
                      c_step = column("step_ms"), c_min = column("step_min_ms"), c_busy = column("busy_cpus"),
                      c_saved = column("saved_bytes"), c_act = column("saved_activation_bytes"),
                      c_par = column("saved_parameter_bytes");
    while (std::getline(in, line)) {
        if (line.empty()) continue;
        const auto v = split(line, ',');
        if (v.size() != header.size()) throw std::runtime_error(source + ": row '" + line + "' is ragged");
        auto num = [&](std::size_t c) { return std::strtod(v[c].c_str(), nullptr); };
        peer_row p;
        p.threads = static_cast<int>(num(c_threads));
        p.reps = static_cast<int>(num(c_reps));
        p.forward = num(c_fwd), p.backward = num(c_bwd), p.optimizer = num(c_opt), p.step = num(c_step);
        p.step_min = num(c_min), p.busy = num(c_busy);
        p.saved = num(c_saved), p.saved_activations = num(c_act), p.saved_parameters = num(c_par);
        rows[v[c_shape]] = p;
    }
    return rows;
}

std::map<std::string, peer_row> read_peer(const std::string& path)
{
    if (path.empty()) return {};
    std::ifstream f(path);
    if (!f) throw std::runtime_error("--peer " + path + ": cannot open");
    return parse_peer(f, "--peer " + path);
}

/// Runs `command --shapes ID` (bench/pytorch_peer.py and its options) and reads the CSV it prints: PyTorch
/// measured right before our own run of the same shape, so that both see the shared machine alike.
peer_row run_peer(const std::string& command, const layer_shape& s, int threads)
{
    const std::string full = command + " --shapes " + s.id();
    std::FILE* pipe = popen(full.c_str(), "r");
    if (!pipe) throw std::runtime_error("--peer-command: cannot run '" + full + "'");
    std::string text;
    char chunk[4096];
    for (std::size_t got; (got = std::fread(chunk, 1, sizeof chunk, pipe)) > 0;) text.append(chunk, got);
    const int status = pclose(pipe);
    if (status != 0)
        throw std::runtime_error("--peer-command: '" + full + "' failed (status " + std::to_string(status) + ")");
    std::istringstream in(text);
    const auto rows = parse_peer(in, "--peer-command output");
    const auto it = rows.find(s.id());
    if (it == rows.end()) throw std::runtime_error("--peer-command: no row for " + s.id() + " in its output");
    if (it->second.threads != threads)
        throw std::runtime_error("--peer-command: PyTorch ran " + s.id() + " on " + std::to_string(it->second.threads) +
                                 " threads, ours on " + std::to_string(threads));
    return it->second;
}

// ------------------------------------------------------------------------------------------ timing

/// The time of every product and elementwise pass of both steps, alone, at one rank (r = n/4).
struct gemm_item {
    std::string name;   // what it computes
    std::string shape;  // "M x N x K" of the product, or the elementwise extent
    double macs = 0;    // multiply-adds; 0 for elementwise passes
    double seconds = 0; // median
};

struct rank_result {
    index_t r = 0;
    std::string label;
    phase_samples comp;
    double generation = 0; // median seconds of one cpu::generate_projection of P (n, r)
    std::size_t saved = 0; // layer.saved_bytes(N)
};

struct group_result {
    layer_shape shape{};
    phase_samples base;
    std::vector<rank_result> ranks;
    std::vector<gemm_item> gemms; // at r = n/4 (the target rank)
    index_t gemm_rank = 0;
    int warmup = 0, reps = 0;
    double busy = -1, wall = 0, load_before = -1, load_after = -1;
    double waited = 0;          // seconds spent waiting for a quiet machine before the shape
    bool has_peer = false;      // PyTorch's figures for the same shape, when given
    peer_row peer;
    bool repeated = false;      // measured a second time because other jobs were busy
    bool second_kept = false;   // the second run was the quieter one
    double other_busy = -1;     // when repeated: other jobs' CPUs in the run that was not kept
};

/// Runs `items` in rounds (in order, then reversed) and returns each one's median time.
std::vector<double> time_items(const std::vector<std::function<void()>>& items, int reps)
{
    std::vector<std::vector<double>> t(items.size());
    for (int i = 0; i < reps; ++i)
        for (std::size_t k = 0; k < items.size(); ++k) {
            const std::size_t j = i % 2 == 0 ? k : items.size() - 1 - k;
            const auto t0 = clock_type::now();
            items[j]();
            t[j].push_back(seconds_between(t0, clock_type::now()));
        }
    std::vector<double> med;
    for (auto& v : t) med.push_back(median(v));
    return med;
}

std::string mnk(index_t a, index_t b, index_t c)
{
    return std::to_string(a) + " x " + std::to_string(b) + " x " + std::to_string(c);
}

/// Each GEMM and elementwise pass of the two steps alone, plus Y and Z from one GEMM over [W^T P] (a fusion
/// the library does not do; measured to show what it would save).
std::vector<gemm_item> gemm_breakdown(const cpu::context& ctx, const problem& prob, uncompressed_step& base,
                                      compressed_step& comp, int reps, check_log& log)
{
    const layer_shape& s = prob.shape;
    const index_t N = s.rows, n = s.in, m = s.out, r = comp.rank();
    const auto x = prob.xv(), dy = prob.dyv();
    buffer<float> p_buf(count_of(n, r));     // (n, r)
    buffer<float> direction(count_of(m, r)); // (m, r)
    buffer<float> wp(count_of(m + r, n));    // (m + r, n): W on top of P^T
    buffer<float> yz(count_of(N, m + r));    // (N, m + r): [Y Z]
    const auto p = view_of(p_buf, n, r);
    cpu::generate_projection<float>(ctx, comp.spec(), 0, 0, p);
    std::copy(prob.w0.begin(), prob.w0.end(), wp.begin());
    for (index_t j = 0; j < r; ++j)
        for (index_t i = 0; i < n; ++i) wp[count_of(m + j, n) + static_cast<std::size_t>(i)] = p(i, j);
    compact::adam_coefficients k;
    k.beta1 = hyper.beta1;
    k.beta2 = hyper.beta2;
    k.eps = hyper.eps;
    k.step_size = hyper.lr;
    k.decay = 1.0 - hyper.lr * hyper.weight_decay;
    const auto yzv = view_of(yz, N, m + r);

    std::vector<gemm_item> items = {
        {"uncompressed Y = X W^T", mnk(N, m, n), as_double(N * m * n)},
        {"uncompressed dX = dY W", mnk(N, n, m), as_double(N * n * m)},
        {"uncompressed G = dY^T X", mnk(m, n, N), as_double(m * n * N)},
        {"uncompressed AdamW update (elementwise)", std::to_string(m) + " x " + std::to_string(n), 0},
        {"Z = X P", mnk(N, r, n), as_double(N * r * n)},
        {"G_sub = dY^T Z", mnk(m, r, N), as_double(m * r * N)},
        {"Adam direction M / (sqrt V + eps) (elementwise)", std::to_string(m) + " x " + std::to_string(r), 0},
        {"W = decay W - s D P^T", mnk(m, n, r), as_double(m * n * r)},
        {"P generation (cpu::generate_projection)", std::to_string(n) + " x " + std::to_string(r), 0},
        {"[Y Z] = X [W^T P] (one GEMM; not in the library)", mnk(N, m + r, n), as_double(N * (m + r) * n)},
    };
    // The elementwise passes and the update GEMM write to W and the moments: their values drift over the
    // rounds, which changes nothing in the time of the same operations on the same shapes.
    const std::vector<std::function<void()>> work = {
        [&] { cpu::gemm<float>(ctx, op::none, op::transpose, 1.0, x, base.w(), 0.0, base.y()); },
        [&] { cpu::gemm<float>(ctx, op::none, op::none, 1.0, dy, base.w(), 0.0, base.dx()); },
        [&] { cpu::gemm<float>(ctx, op::transpose, op::none, 1.0, dy, x, 0.0, base.g()); },
        [&] { cpu::adamw_update<float, float>(ctx, k, base.g(), base.m(), base.v(), base.w()); },
        [&] { cpu::gemm<float>(ctx, op::none, op::none, 1.0, x, p, 0.0, comp.z()); },
        [&] { cpu::gemm<float>(ctx, op::transpose, op::none, 1.0, dy, comp.z(), 0.0, comp.g_sub()); },
        [&] {
            cpu::adam_direction<float, float, float>(ctx, k, comp.g_sub(), comp.m(), comp.v(),
                                                     view_of(direction, m, r));
        },
        [&] {
            cpu::gemm<float>(ctx, op::none, op::transpose, -k.decay * k.step_size, view_of(direction, m, r), p,
                             k.decay, comp.w());
        },
        [&] { cpu::generate_projection<float>(ctx, comp.spec(), 0, 0, p); },
        [&] { cpu::gemm<float>(ctx, op::none, op::transpose, 1.0, x, view_of(wp, m + r, n), 0.0, yzv); },
    };
    // The fused product must give the same Y and Z as the two GEMMs before its time means anything.
    base.reset();
    work[0]();
    work[4]();
    work[9]();
    const std::string where = s.id() + " r=" + std::to_string(r);
    log.add("[Y Z] from one GEMM vs Y and Z from two (breakdown only)", 1e-5,
            std::max(relative_error(yzv.block(0, 0, N, m), base.y()), relative_error(yzv.block(0, m, N, r), comp.z())),
            where);
    const auto t = time_items(work, reps);
    for (std::size_t i = 0; i < items.size(); ++i) items[i].seconds = t[i];
    return items;
}

group_result run_group(const options& o, const cpu::context& ctx, const layer_shape& s,
                       const std::map<std::string, peer_row>& peer_file, check_log& log)
{
    group_result res;
    res.shape = s;
    res.waited = wait_for_quiet(o.wait_quiet, o.busy_limit);
    if (!o.peer_command.empty()) {
        res.peer = run_peer(o.peer_command, s, o.threads);
        res.has_peer = true;
    } else if (const auto it = peer_file.find(s.id()); it != peer_file.end()) {
        res.peer = it->second;
        res.has_peer = true;
    }
    const problem prob(s);
    step_outputs base_out(s), comp_out(s);
    uncompressed_step base(prob, base_out);
    std::vector<std::unique_ptr<compressed_step>> comps;
    const auto ranks = suite_ranks(s.in);
    for (const auto& r : ranks) comps.push_back(std::make_unique<compressed_step>(prob, comp_out, r.first));

    check_shape(ctx, prob, base, comps, log);
    if (!log.ok) return res;
    base.reset();
    for (auto& c : comps) c->reset();

    std::vector<std::function<step_time()>> steps{[&] { return base.run(ctx); }};
    for (auto& c : comps) steps.emplace_back([&c, &ctx] { return c->run(ctx); });

    res.load_before = load_average();
    const auto u0 = cpu_usage::now();
    const auto w0 = clock_type::now();
    double round = 0;
    for (int i = 0; i < o.warmup; ++i) {
        round = 0;
        for (auto& st : steps) round += st().total;
    }
    res.warmup = o.warmup;
    res.reps = static_cast<int>(std::clamp(std::ceil(o.seconds / std::max(round, 1e-9)),
                                           static_cast<double>(o.min_reps), static_cast<double>(o.max_reps)));
    std::vector<phase_samples> samples(steps.size());
    for (int i = 0; i < res.reps; ++i)
        for (std::size_t k = 0; k < steps.size(); ++k) {
            const std::size_t j = i % 2 == 0 ? k : steps.size() - 1 - k;
            samples[j].add(steps[j]());
        }
    const double timed_wall = seconds_between(w0, clock_type::now());
    res.busy = cpu_usage::others(u0, cpu_usage::now(), timed_wall);

    res.base = std::move(samples[0]);
    buffer<float> p_buf;
    for (std::size_t k = 0; k < comps.size(); ++k) {
        rank_result rr;
        rr.r = comps[k]->rank();
        rr.label = ranks[k].second;
        rr.comp = std::move(samples[k + 1]);
        rr.saved = comps[k]->saved_bytes();
        p_buf.assign(count_of(s.in, rr.r), 0.0f);
        std::vector<double> gen;
        for (int i = 0; i < std::max(5, std::min(res.reps, 50)); ++i) {
            const auto t0 = clock_type::now();
            cpu::generate_projection<float>(ctx, comps[k]->spec(), 0, 0, view_of(p_buf, s.in, rr.r));
            gen.push_back(seconds_between(t0, clock_type::now()));
        }
        rr.generation = median(gen);
        res.ranks.push_back(std::move(rr));
    }

    // The breakdown at the target rank n/4 (the rank closest to it when n/4 is not in the list).
    std::size_t target = 0;
    for (std::size_t k = 0; k < ranks.size(); ++k)
        if (std::llabs(ranks[k].first - s.in / 4) < std::llabs(ranks[target].first - s.in / 4)) target = k;
    res.gemm_rank = comps[target]->rank();
    res.gemms = gemm_breakdown(ctx, prob, base, *comps[target], std::clamp(res.reps, 3, 30), log);
    res.load_after = load_average();
    res.wall = seconds_between(w0, clock_type::now());
    return res;
}

// ------------------------------------------------------------------------------------------ report

/// Multiply-add counts of SPEC section 2 for one shape and rank.
struct model {
    double forward, backward, step; // compressed / uncompressed, per phase and for the whole step
    model(const layer_shape& s, index_t r)
    {
        const double N = as_double(s.rows), n = as_double(s.in), m = as_double(s.out), rd = as_double(r);
        forward = (N * n * m + N * n * rd) / (N * n * m);
        backward = (N * m * n + m * N * rd) / (2 * N * n * m);
        step = (2 * N * n * m + N * rd * (n + m) + m * rd * n) / (3 * N * n * m);
    }
};

struct rank_figures {
    double forward, backward, optimizer, step, step_minmin, t_base, t_comp, gen_share;
};

rank_figures figures(const group_result& g, const rank_result& rr)
{
    rank_figures f;
    f.forward = paired_ratio(rr.comp.forward, g.base.forward);
    f.backward = paired_ratio(rr.comp.backward, g.base.backward);
    f.optimizer = paired_ratio(rr.comp.optimizer, g.base.optimizer);
    f.step = paired_ratio(rr.comp.total, g.base.total);
    f.step_minmin = minimum(rr.comp.total) / minimum(g.base.total);
    f.t_base = median(g.base.total);
    f.t_comp = median(rr.comp.total);
    f.gen_share = 2 * rr.generation / f.t_comp; // generated in forward and again in the optimizer
    return f;
}

const gemm_item* find_item(const group_result& g, const std::string& prefix)
{
    for (const auto& it : g.gemms)
        if (it.name.rfind(prefix, 0) == 0) return &it;
    return nullptr;
}

double rate(const gemm_item* it) { return it && it->seconds > 0 ? 2 * it->macs / it->seconds * 1e-9 : 0; }
double ms_of(const gemm_item* it) { return it ? 1e3 * it->seconds : 0; }

std::string busy_string(double b) { return b < 0 ? "-" : format("%.2f", b); }

double input_bytes(const layer_shape& s) { return as_double(s.rows) * as_double(s.in) * sizeof(float); }

const rank_result* target_rank(const group_result& g)
{
    for (const auto& rr : g.ranks)
        if (rr.r == g.gemm_rank) return &rr;
    return nullptr;
}

/// One table per layer (n -> m): rows N, then r.
void write_layer_tables(std::ostream& out, const std::vector<group_result>& groups)
{
    std::vector<layer_shape> layers;
    for (const auto& g : groups)
        if (std::none_of(layers.begin(), layers.end(),
                         [&](const layer_shape& l) { return l.in == g.shape.in && l.out == g.shape.out; }))
            layers.push_back(g.shape);
    for (const auto& layer : layers) {
        out << "\n### layer " << layer.layer() << " (W " << layer.out << " x " << layer.in << ")\n\n";
        for (const auto& g : groups) {
            if (g.shape.layer() != layer.layer()) continue;
            const double macs = 3 * as_double(g.shape.rows) * as_double(g.shape.in) * as_double(g.shape.out);
            const double tb = median(g.base.total);
            out << "- N=" << g.shape.rows << ": uncompressed step " << format("%.2f", 1e3 * tb) << " ms ("
                << format("%.0f", 2 * macs / tb * 1e-9) << " GFLOP/s)";
            if (g.has_peer)
                out << ", PyTorch's " << format("%.2f", g.peer.step) << " ms ("
                    << format("%.0f", 2 * macs / (g.peer.step * 1e-3) * 1e-9) << " GFLOP/s; " << g.peer.reps
                    << " steps; other jobs " << busy_string(g.peer.busy) << " CPUs)";
            out << "; ours " << g.reps << " rounds after " << g.warmup << " warm-up, other jobs " << busy_string(g.busy)
                << " CPUs, load average " << format("%.2f", g.load_before) << " -> " << format("%.2f", g.load_after);
            if (g.waited >= 3) out << "; waited " << format("%.0f", g.waited) << " s for a quieter machine first";
            if (g.repeated)
                out << "; measured a second time at the end, the " << (g.second_kept ? "second" : "first")
                    << " run kept (the other: " << busy_string(g.other_busy) << " CPUs)";
            out << "\n";
        }
        out << "\n| N | r | step ms: uncompressed -> compressed | forward ratio (model) | backward ratio (model) | "
               "optimizer ratio | step ratio (min / min) | step model | ratio / model | saved for backward: ours (Z) "
               "/ uncompressed X / PyTorch's | P generation ms, 2 per step (share of step) | compressed step / "
               "PyTorch's step (min / min) |\n";
        out << "|---|---|---|---|---|---|---|---|---|---|---|---|\n";
        for (const auto& g : groups) {
            if (g.shape.layer() != layer.layer()) continue;
            for (const auto& rr : g.ranks) {
                const model md(g.shape, rr.r);
                const auto f = figures(g, rr);
                std::string peer_saved = "-", peer_ratio = "-";
                if (g.has_peer) {
                    peer_saved = bytes_string(g.peer.saved_activations);
                    peer_ratio = format("%.3f", f.t_comp / (g.peer.step * 1e-3)) + " (" +
                                 format("%.3f", minimum(rr.comp.total) / (g.peer.step_min * 1e-3)) + ")";
                }
                out << "| " << g.shape.rows << " | " << rr.r << " = " << rr.label << " | "
                    << format("%.2f", 1e3 * f.t_base) << " -> " << format("%.2f", 1e3 * f.t_comp) << " | "
                    << format("%.3f", f.forward) << " (" << format("%.3f", md.forward) << ") | "
                    << format("%.3f", f.backward) << " (" << format("%.3f", md.backward) << ") | "
                    << format("%.2f", f.optimizer) << " | " << format("%.3f", f.step) << " ("
                    << format("%.3f", f.step_minmin) << ") | " << format("%.3f", md.step) << " | "
                    << format("%.3f", f.step / md.step) << " | " << bytes_string(static_cast<double>(rr.saved))
                    << " / " << bytes_string(input_bytes(g.shape)) << " / " << peer_saved << " | "
                    << format("%.3f", 1e3 * rr.generation) << " (" << format("%.1f%%", 100 * f.gen_share) << ") | "
                    << peer_ratio << " |\n";
            }
        }
    }
}

/// The GEMM breakdown: every product's rate and every elementwise pass's time, at the target rank.
void write_breakdown(std::ostream& out, const std::vector<group_result>& groups)
{
    out << "\n### every product and pass alone, at r = n/4 (GFLOP/s = 2 x multiply-adds / median time; "
           "elementwise passes in ms)\n\n";
    out << "| shape N x n -> m | r | Y = X W^T | dX = dY W | G = dY^T X | Z = X P | G_sub = dY^T Z | "
           "W = decay W - s D P^T | AdamW m x n (ms) | Adam direction m x r (ms) | P generation (ms) | "
           "Y, Z: two GEMMs -> one over [W^T P] (ms) |\n";
    out << "|---|---|---|---|---|---|---|---|---|---|---|---|\n";
    for (const auto& g : groups) {
        const auto y = find_item(g, "uncompressed Y"), z = find_item(g, "Z = X P"), fused = find_item(g, "[Y Z]");
        out << "| " << g.shape.rows << " x " << g.shape.layer() << " | " << g.gemm_rank << " | "
            << format("%.0f", rate(y)) << " | " << format("%.0f", rate(find_item(g, "uncompressed dX"))) << " | "
            << format("%.0f", rate(find_item(g, "uncompressed G"))) << " | " << format("%.0f", rate(z)) << " | "
            << format("%.0f", rate(find_item(g, "G_sub"))) << " | " << format("%.0f", rate(find_item(g, "W = decay")))
            << " | " << format("%.3f", ms_of(find_item(g, "uncompressed AdamW"))) << " | "
            << format("%.3f", ms_of(find_item(g, "Adam direction"))) << " | "
            << format("%.3f", ms_of(find_item(g, "P generation"))) << " | "
            << format("%.2f", ms_of(y) + ms_of(z)) << " -> " << format("%.2f", ms_of(fused)) << " |\n";
    }
}

/// The two targets at r = n/4, judged on the measured figures, with the reason for every miss.
void write_targets(std::ostream& out, const options& o, const std::vector<group_result>& groups)
{
    out << "\n### targets at r = n/4\n\n";
    if (o.smoke) {
        out << "Not judged in a smoke run (tiny shapes; the timings mean nothing).\n";
        return;
    }
    out << "**1. Within 5% of the multiply-add model for N >= 4096** (step ratio / model <= 1.05). Where it is "
           "missed, the excess over the model is split by phase: the model gives each phase of the compressed "
           "step the time its multiply-adds take at the uncompressed step's own rate (3 N n m per uncompressed "
           "step, its optimizer included), so the phases' excesses add up to the step's.\n\n";
    int judged = 0, met = 0;
    for (const auto& g : groups) {
        const rank_result* rr = target_rank(g);
        if (!rr || g.shape.rows < 4096) continue;
        const model md(g.shape, rr->r);
        const auto f = figures(g, *rr);
        const double q = f.step / md.step;
        ++judged;
        const bool ok = q <= 1.05;
        met += ok;
        out << "- " << g.shape.rows << " x " << g.shape.layer() << ", r = " << rr->r << ": ratio "
            << format("%.3f", f.step) << ", model " << format("%.3f", md.step) << ", ratio / model "
            << format("%.3f", q) << ": " << (ok ? "met" : "**MISSED**");
        if (ok) {
            out << "\n";
            continue;
        }
        const double N = as_double(g.shape.rows), n = as_double(g.shape.in), m = as_double(g.shape.out),
                     r = as_double(rr->r);
        const double per_mac = f.t_base / (3 * N * n * m); // seconds per multiply-add in the uncompressed step
        const double excess[3] = {median(rr->comp.forward) - (N * n * m + N * n * r) * per_mac,
                                  median(rr->comp.backward) - (N * m * n + m * N * r) * per_mac,
                                  median(rr->comp.optimizer) - m * r * n * per_mac};
        const char* names[3] = {"forward", "backward", "optimizer"};
        const int worst = static_cast<int>(std::max_element(excess, excess + 3) - excess);
        out << ". Excess over the model: forward " << format("%+.2f", 1e3 * excess[0]) << " ms, backward "
            << format("%+.2f", 1e3 * excess[1]) << " ms, optimizer " << format("%+.2f", 1e3 * excess[2])
            << " ms, of a " << format("%.2f", 1e3 * f.t_comp) << " ms step; the " << names[worst]
            << " phase is the slow one. ";
        const auto y = find_item(g, "uncompressed Y"), dx = find_item(g, "uncompressed dX"),
                   gg = find_item(g, "uncompressed G"), z = find_item(g, "Z = X P"), gs = find_item(g, "G_sub"),
                   upd = find_item(g, "W = decay"), dir = find_item(g, "Adam direction"),
                   gen = find_item(g, "P generation"), fused = find_item(g, "[Y Z]"),
                   adam = find_item(g, "uncompressed AdamW");
        // The phase's parts timed alone (the breakdown) against the phase inside the step: when the step's
        // phase takes much longer than its parts, the time is lost between the kernels, not in them.
        const double alone[3] = {ms_of(y) + ms_of(z) + ms_of(gen), ms_of(dx) + ms_of(gs),
                                 ms_of(gen) + ms_of(dir) + ms_of(upd)};
        const double in_step[3] = {1e3 * median(rr->comp.forward), 1e3 * median(rr->comp.backward),
                                   1e3 * median(rr->comp.optimizer)};
        out << "In the step the " << names[worst] << " takes " << format("%.2f", in_step[worst])
            << " ms; its parts alone add up to " << format("%.2f", alone[worst]) << " ms (";
        if (worst == 0)
            out << "Y = X W^T at " << format("%.0f", rate(y)) << " GFLOP/s, Z = X P (" << z->shape << ") at "
                << format("%.0f", rate(z)) << ", P's generation " << format("%.3f", ms_of(gen)) << " ms";
        else if (worst == 1)
            out << "dX = dY W at " << format("%.0f", rate(dx)) << " GFLOP/s, G_sub = dY^T Z (" << gs->shape
                << ", a thin output reduced over N) at " << format("%.0f", rate(gs)) << " against "
                << format("%.0f", rate(gg)) << " for G = dY^T X";
        else
            out << "P's generation " << format("%.3f", ms_of(gen)) << " ms, the Adam direction "
                << format("%.3f", ms_of(dir)) << " ms, the update W = decay W - s D P^T (" << upd->shape << ") at "
                << format("%.0f", rate(upd)) << " GFLOP/s; the uncompressed AdamW pass, which the model does not "
                << "count either, " << format("%.3f", ms_of(adam)) << " ms";
        out << "). ";
        if (in_step[worst] > 1.1 * alone[worst])
            out << "The excess is between the kernels rather than in them: other jobs kept " << busy_string(g.busy)
                << " CPUs busy while this shape ran, and a 2-thread parallel region whose second core is taken "
                << "waits a scheduler slice. What would close it: measuring on a quiet machine (`bash "
                << "bench/run_suite.sh --shapes " << g.shape.id() << " --append`); in the library, fewer parallel "
                << "regions per step (the compressed step has about twice as many as the uncompressed one).\n";
        else if (worst == 0)
            out << "What would close it: " << (rate(z) < 0.9 * rate(y) ? "a faster GEMM for Z's narrow output; " : "")
                << "computing Y and Z in one GEMM over [W^T P] took " << format("%.2f", ms_of(fused))
                << " ms here against " << format("%.2f", ms_of(y) + ms_of(z)) << " ms for the two"
                << (ms_of(fused) < 0.95 * (ms_of(y) + ms_of(z)) ? " (worth a change to compressed_linear::forward)."
                                                                 : ", so that fusion would not.")
                << "\n";
        else if (worst == 1)
            out << "What would close it: a cpu::gemm split for thin outputs (it splits only the output's longer "
                   "side, here m, so every part streams all N rows of dY and Z), e.g. over N with a fixed-order "
                   "sum of the parts, which keeps results independent of the thread count.\n";
        else
            out << "What would close it: keeping P for the epoch (projection_source::keep) removes both "
                   "generations; the update GEMM is bounded by one read and write of W, which the model's m r n "
                   "multiply-adds do not count.\n";
    }
    out << "\n" << met << " of " << judged << " shapes with N >= 4096 meet it.\n";

    if (std::none_of(groups.begin(), groups.end(), [](const group_result& g) { return g.has_peer; })) return;
    out << "\n**2. Our compressed step faster than PyTorch's uncompressed step** (nn.Linear without bias, "
           "forward + backward + torch.optim.AdamW, the same shapes and thread count). Where it is missed, our "
           "uncompressed step and each phase are set against PyTorch's.\n\n";
    judged = met = 0;
    for (const auto& g : groups) {
        const rank_result* rr = target_rank(g);
        if (!rr || !g.has_peer) continue;
        const auto f = figures(g, *rr);
        const double tp = g.peer.step * 1e-3, q = f.t_comp / tp;
        ++judged;
        const bool ok = q < 1;
        met += ok;
        out << "- " << g.shape.rows << " x " << g.shape.layer() << ", r = " << rr->r << ": ours "
            << format("%.2f", 1e3 * f.t_comp) << " ms, PyTorch's " << format("%.2f", 1e3 * tp) << " ms: "
            << format("%.3f", q) << " (fastest steps: " << format("%.3f", minimum(rr->comp.total) / (g.peer.step_min * 1e-3))
            << "), " << (ok ? "met" : "**MISSED**");
        if (ok) {
            out << "\n";
            continue;
        }
        const double N = as_double(g.shape.rows), n = as_double(g.shape.in), m = as_double(g.shape.out);
        const double ours[3] = {median(g.base.forward), median(g.base.backward), median(g.base.optimizer)};
        const double theirs[3] = {g.peer.forward * 1e-3, g.peer.backward * 1e-3, g.peer.optimizer * 1e-3};
        const double comp[3] = {median(rr->comp.forward), median(rr->comp.backward), median(rr->comp.optimizer)};
        const char* names[3] = {"forward", "backward", "optimizer"};
        double gap[3];
        for (int i = 0; i < 3; ++i) gap[i] = comp[i] - theirs[i];
        const int worst = static_cast<int>(std::max_element(gap, gap + 3) - gap);
        out << ". Our uncompressed step is " << format("%.3f", f.t_base / tp) << "x PyTorch's. Forward: ours "
            << format("%.0f", 2 * N * n * m / ours[0] * 1e-9) << " GFLOP/s uncompressed, PyTorch's "
            << format("%.0f", 2 * N * n * m / theirs[0] * 1e-9) << "; backward: ours "
            << format("%.0f", 4 * N * n * m / ours[1] * 1e-9) << ", PyTorch's "
            << format("%.0f", 4 * N * n * m / theirs[1] * 1e-9) << "; optimizer: ours "
            << format("%.3f", 1e3 * ours[2]) << " ms uncompressed, " << format("%.3f", 1e3 * comp[2])
            << " ms compressed, PyTorch's " << format("%.3f", 1e3 * theirs[2]) << " ms. The largest gap is the "
            << names[worst] << " (" << format("%+.3f", 1e3 * gap[worst]) << " ms). ";
        const model md(g.shape, rr->r);
        if (md.step >= 1) {
            // The arithmetic itself: at this shape r = n/4 costs more multiply-adds than it saves.
            out << "The multiply-add model itself puts the compressed step above the uncompressed one here ("
                << format("%.3f", md.step) << "; measured " << format("%.3f", f.step) << "): Z = X P costs r / m = "
                << format("%.2f", as_double(rr->r) / m) << " of the forward GEMM, and the optimizer's m r n "
                << "multiply-adds are spread over only N = " << g.shape.rows << " tokens.";
            for (const auto& other : g.ranks)
                if (other.r < rr->r && model(g.shape, other.r).step < 1) {
                    out << " What would close it: a smaller rank or more tokens per step; at r = " << other.r
                        << " (" << other.label << ") the model is " << format("%.3f", model(g.shape, other.r).step)
                        << " and our compressed step takes " << format("%.3f", median(other.comp.total) / tp)
                        << " of PyTorch's.";
                    break;
                }
            out << "\n";
        } else if (f.step / md.step > 1.05)
            out << "Our compressed step is " << format("%.3f", f.step / md.step) << "x its model: the fixed costs "
                << "of the compressed step (P's generation, the extra elementwise pass, more parallel regions per "
                << "step; other jobs kept " << busy_string(g.busy) << " CPUs busy) outweigh its savings here. What "
                << "would close it: keeping P for the epoch and fusing the Adam direction into the update.\n";
        else
            out << "Compression pays off as the model says, but PyTorch's GEMMs are faster than Eigen's kernel at "
                << "this shape. What would close it: a faster GEMM in cpu::gemm (an optimised BLAS sgemm for "
                << "large products).\n";
    }
    out << "\n" << met << " of " << judged << " shapes meet it at r = n/4.\n";
}

void write_checks(std::ostream& out, const check_log& log)
{
    out << "\n### checks, before any timing (relative Frobenius errors; worst over every shape and rank)\n\n";
    out << "| check | worst error | at | tolerance | passed |\n|---|---|---|---|---|\n";
    for (const auto& k : log.kinds)
        out << "| " << k.what << " | " << format("%.2e", k.worst) << " | " << k.worst_where << " | "
            << format("%.0e", k.tolerance) << " | " << k.passed << " of " << k.passed + k.failed << " |\n";
}

void write_csv(const std::string& path, const options& o, const std::vector<group_result>& groups)
{
    std::ofstream f(path);
    if (!f) throw std::runtime_error("--csv " + path + ": cannot write");
    f << "shape,N,n,m,r,r_label,r_over_n,threads,warmup,reps,busy_cpus,"
         "uncompressed_forward_ms,uncompressed_backward_ms,uncompressed_optimizer_ms,uncompressed_step_ms,"
         "compressed_forward_ms,compressed_backward_ms,compressed_optimizer_ms,compressed_step_ms,"
         "forward_ratio,backward_ratio,optimizer_ratio,step_ratio,step_ratio_min_over_min,"
         "forward_model,backward_model,step_model,ratio_over_model,"
         "saved_bytes_uncompressed,saved_bytes_compressed,p_generation_ms,p_generation_share,"
         "peer_step_ms,peer_saved_activation_bytes,compressed_over_peer\n";
    for (const auto& g : groups) {
        for (const auto& rr : g.ranks) {
            const model md(g.shape, rr.r);
            const auto fg = figures(g, rr);
            char line[1024];
            std::snprintf(line, sizeof line,
                          "%s,%lld,%lld,%lld,%lld,%s,%.6g,%d,%d,%d,%.3f,%.4f,%.4f,%.4f,%.4f,%.4f,%.4f,%.4f,%.4f,"
                          "%.5f,%.5f,%.5f,%.5f,%.5f,%.5f,%.5f,%.5f,%.5f,%.0f,%.0f,%.5f,%.5f",
                          g.shape.id().c_str(), static_cast<long long>(g.shape.rows),
                          static_cast<long long>(g.shape.in), static_cast<long long>(g.shape.out),
                          static_cast<long long>(rr.r), rr.label.c_str(), as_double(rr.r) / as_double(g.shape.in),
                          o.threads, g.warmup, g.reps, g.busy, 1e3 * median(g.base.forward),
                          1e3 * median(g.base.backward), 1e3 * median(g.base.optimizer), 1e3 * fg.t_base,
                          1e3 * median(rr.comp.forward), 1e3 * median(rr.comp.backward),
                          1e3 * median(rr.comp.optimizer), 1e3 * fg.t_comp, fg.forward, fg.backward, fg.optimizer,
                          fg.step, fg.step_minmin, md.forward, md.backward, md.step, fg.step / md.step,
                          input_bytes(g.shape), static_cast<double>(rr.saved), 1e3 * rr.generation, fg.gen_share);
            f << line;
            if (g.has_peer)
                f << format(",%.4f", g.peer.step) << format(",%.0f", g.peer.saved_activations)
                  << format(",%.5f", fg.t_comp / (g.peer.step * 1e-3)) << "\n";
            else
                f << ",,,\n";
        }
    }
}

} // namespace

int main(int argc, char** argv)
{
    options o;
    std::vector<layer_shape> shapes;
    try {
        if (!parse(argc, argv, o)) return 0;
        shapes = suite_shapes(o);
        if (o.list) {
            for (std::size_t i = 0; i < shapes.size(); ++i) std::printf("%s%s", i ? "," : "", shapes[i].id().c_str());
            std::printf("\n");
            return 0;
        }
    } catch (const std::exception& e) {
        std::fprintf(stderr, "suite: %s\n", e.what());
        usage(stderr, argv[0]);
        return 2;
    }
    const cpu::context ctx{o.threads};
    const auto start = clock_type::now();
    try {
        const auto peer = read_peer(o.peer_path);
        for (const auto& [id, p] : peer)
            if (p.threads != o.threads)
                std::fprintf(stderr, "suite: warning: PyTorch's %s ran on %d threads, ours on %d\n", id.c_str(),
                             p.threads, o.threads);
        check_log log;
        std::vector<group_result> groups;
        for (const auto& s : shapes) {
            std::fprintf(stderr, "suite: %s ...\n", s.id().c_str());
            groups.push_back(run_group(o, ctx, s, peer, log));
            if (!log.ok) {
                std::fprintf(stderr, "\nsuite: CORRECTNESS CHECK FAILED at %s; nothing is reported\n", s.id().c_str());
                std::ostringstream out;
                write_checks(out, log);
                std::fputs(out.str().c_str(), stdout);
                return 1;
            }
            const auto& g = groups.back();
            std::fprintf(stderr, "suite: %s: waited %.0f s, %d rounds, %.1f s, other jobs %s CPUs\n",
                         s.id().c_str(), g.waited, g.reps, g.wall, busy_string(g.busy).c_str());
        }
        // Shapes measured while other jobs were busy are measured once more at the end, time permitting,
        // and the quieter run is kept.
        for (auto& g : groups) {
            if (g.busy <= o.busy_limit) continue;
            const double elapsed = seconds_between(start, clock_type::now());
            if (elapsed + g.wall > o.time_limit) {
                std::fprintf(stderr, "suite: %s was measured with %.2f other CPUs busy; no time left to repeat it\n",
                             g.shape.id().c_str(), g.busy);
                continue;
            }
            std::fprintf(stderr, "suite: %s again (other jobs %.2f CPUs the first time) ...\n",
                         g.shape.id().c_str(), g.busy);
            auto again = run_group(o, ctx, g.shape, peer, log);
            if (!log.ok) return 1;
            std::fprintf(stderr, "suite: %s again: other jobs %s CPUs\n", g.shape.id().c_str(),
                         busy_string(again.busy).c_str());
            const double first = g.busy;
            const bool second_kept = again.busy >= 0 && again.busy < g.busy;
            if (second_kept) g = std::move(again);
            g.repeated = true;
            g.second_kept = second_kept;
            g.other_busy = second_kept ? first : again.busy;
        }
        const double wall = seconds_between(start, clock_type::now());

        std::ostringstream out;
        const char* wait_policy = std::getenv("OMP_WAIT_POLICY");
        out << "## suite: compressed vs uncompressed linear training step on the CPU (SPEC section 2)\n\n";
        out << "- " << o.threads << " threads (cpu::context), OpenMP " << (COMPACT_HAS_OPENMP ? "on" : "off")
            << ", OMP_WAIT_POLICY=" << (wait_policy ? wait_policy : "(unset)") << "; CPU: " << cpu_model() << ", "
            << std::thread::hardware_concurrency() << " logical CPUs\n";
        out << "- " << compiler() << "; Eigen " << EIGEN_WORLD_VERSION << "." << EIGEN_MAJOR_VERSION << "."
            << EIGEN_MINOR_VERSION << " (packet of " << Eigen::internal::packet_traits<float>::size << " floats)\n";
        out << "- float, bias off; AdamW lr " << hyper.lr << ", betas (" << hyper.beta1 << ", " << hyper.beta2
            << "), eps " << hyper.eps << ", weight decay " << hyper.weight_decay << ", alpha " << hyper.alpha
            << "; gaussian P regenerated in forward and in the optimizer (T = 0)\n";
        out << "- finished " << today() << "; " << shapes.size() << " shapes in " << format("%.0f", wall) << " s"
            << (o.smoke ? "; SMOKE RUN: tiny shapes, the timings mean nothing" : "") << "\n";
        out << "- ratios: median over rounds of compressed / uncompressed from the same round (each round runs the "
               "uncompressed step and every rank's compressed step back to back, alternately forward and reversed); "
               "model: multiply-adds of SPEC section 2 (forward (N n m + N n r) / N n m, backward (N n m + N m r) / "
               "2 N n m, step (2 N n m + N r (n + m) + m r n) / 3 N n m; the optimizer has no model ratio: the "
               "uncompressed one does no multiply-adds)\n";
        write_checks(out, log);
        write_targets(out, o, groups);
        write_layer_tables(out, groups);
        write_breakdown(out, groups);

        std::fputs(out.str().c_str(), stdout);
        if (!o.markdown_path.empty()) {
            std::ofstream f(o.markdown_path);
            if (!(f << out.str())) throw std::runtime_error("--markdown " + o.markdown_path + ": cannot write");
        }
        if (!o.csv_path.empty()) write_csv(o.csv_path, o, groups);
        return 0;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "suite: %s\n", e.what());
        return 1;
    }
}
