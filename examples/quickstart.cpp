// quickstart: train the same small MLP twice, uncompressed and with compressed activations.
//
// The model, written out by hand around two compact::linear_layer:
//
//   X (N, 256) -> fc1 -> H (N, 512) -> ReLU -> fc2 -> logits (N, 10) -> softmax cross-entropy
//
// It learns from a random "teacher" network: inputs X are U[-1, 1) (compact::fill_uniform) and each
// label is drawn from softmax(teacher(X)), teacher(X) = relu(X T1^T) T2^T. Every batch is fresh data
// from its own random stream, so everything is deterministic, nothing is memorised, and the teacher's
// own loss on held-out data is the floor any model can reach.
//
// The model is trained twice, from the same initial weights on the same batches:
//   rank::full        r = n with P = I: exactly the uncompressed layer and plain AdamW;
//   rank::ratio<1,4>  r = n/4: each layer keeps Z = X P (N, r) for backward instead of its input
//                     X (N, n), and AdamW runs in that r-dimensional subspace (SPEC sections 2-3).
// A table then compares loss, accuracy, the bytes saved for backward, optimizer state and time.
//
// Hyper-parameters. Uncompressed: AdamW at lr 1e-3. Compressed: the paper's pretraining recipe (CompAct,
// arXiv 2410.15352) unchanged: lr 1e-2, subspace scale alpha = 0.25, a new P every T = 50 updates. The
// weight update lr * alpha * N P^T has entries about as large as plain AdamW's at lr * alpha = 2.5e-3,
// but follows only a random quarter of the gradient's directions for T updates at a time. Here the
// compressed run's final loss hardly moves for lr anywhere in [5e-3, 4e-2]; what limits it is how many
// subspaces it has visited. Biases are not compressed and get plain AdamW at lr (alpha only scales
// subspace updates).
//
// What to expect with the defaults: the compressed run ends within about 8% of the uncompressed loss
// (both above the teacher's floor) while keeping only a quarter of the activations and a quarter of
// the optimizer state. It needs more steps for the same loss; the gap closes slowly with --steps (the
// paper trains for 10^4 steps and more). On a CPU it is not faster here: it regenerates the Gaussian
// P (n, r) in every forward and every step, and fc2 has only m = 10 outputs, so compressing its input
// (N r (n + m) multiply-adds) costs more than the layer itself (N n m). linear_options::keep_projection
// keeps P for its epoch instead (n r more values per layer) and removes most of the first cost. What
// compression saves is memory.
//
// Usage: quickstart [--steps S] [--threads T] [--save PATH] [--resume PATH] [--smoke]
//   --steps S    optimizer steps per run (default 600)
//   --save PATH  at the end, checkpoint each run's layers (weights, moments, counters, projection keys)
//                to PATH.full and PATH.ratio-1-4
//   --resume PATH  start each run from PATH.full / PATH.ratio-1-4 and train S more steps: the result
//                equals one uninterrupted run of all the steps, bit for bit
//   --threads T  CPU threads (default 0: all OpenMP threads)
//   --smoke      20 steps on batches of 64 rows, on one thread unless --threads says otherwise (CI runs
//                tests side by side, and spinning OpenMP threads on a busy machine can be slow)
#include <compact/compact.hpp>

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

constexpr compact::index_t features = 256;
constexpr compact::index_t hidden = 512;
constexpr compact::index_t classes = 10;
constexpr compact::index_t teacher_hidden = 8;

using matrix = compact::row_major_matrix<float>;
using clock_type = std::chrono::steady_clock;

struct settings {
    int steps = 600;
    int threads = 0;
    compact::index_t batch = 256;
    compact::index_t held_out = 4096;
    int report_every = 100;
    std::uint64_t seed = 2024;
    std::string save;   // --save PATH: checkpoint each run's layers at the end, to PATH.<policy>
    std::string resume; // --resume PATH: continue each run from PATH.<policy>
};

// fill_uniform streams: every random tensor of the program has its own.
constexpr std::uint64_t teacher_stream = 1; // and 2
constexpr std::uint64_t init_stream = 10;   // 10..13: fc1 W, b, fc2 W, b
constexpr std::uint64_t data_stream(std::uint64_t batch_index) { return 1000 + 2 * batch_index; } // and + 1

struct score {
    double loss = 0;     // mean cross-entropy
    double accuracy = 0; // fraction of rows whose largest logit is the label
};

struct batch {
    matrix x;               // (N, 256)
    std::vector<int> label; // (N), in [0, classes)
};

// The data: X ~ U[-1, 1), label ~ softmax(relu(X T1^T) T2^T) with fixed random T1 (8, 256), T2 (10, 8).
class teacher {
public:
    teacher(std::uint64_t seed, const compact::cpu::context& ctx)
        : seed_(seed), ctx_(ctx), t1_(teacher_hidden, features), t2_(classes, teacher_hidden)
    {
        // The hidden units get unit variance and the logits a spread of a few units: labels are
        // mostly, not always, the teacher's top class.
        const double b1 = std::sqrt(3.0 / static_cast<double>(features));
        compact::fill_uniform(compact::view(t1_), -b1, b1, seed, teacher_stream);
        compact::fill_uniform(compact::view(t2_), -logit_scale, logit_scale, seed, teacher_stream + 1);
    }

    // Batch `index` (0 is the held-out set) with out.x.rows() rows.
    void sample(std::uint64_t index, batch& out) const
    {
        const auto start = clock_type::now();
        const compact::index_t rows = out.x.rows();
        matrix u(rows, 1);
        compact::fill_uniform(compact::view(out.x), -1.0, 1.0, seed_, data_stream(index));
        compact::fill_uniform(compact::view(u), 0.0, 1.0, seed_, data_stream(index) + 1);
        const matrix p = probabilities(out.x);
        out.label.resize(static_cast<std::size_t>(rows));
        for (compact::index_t i = 0; i < rows; ++i) { // inverse CDF
            int c = 0;
            float cdf = p(i, 0);
            while (c + 1 < classes && u(i, 0) >= cdf) cdf += p(i, ++c);
            out.label[static_cast<std::size_t>(i)] = c;
        }
        seconds_ += std::chrono::duration<double>(clock_type::now() - start).count();
    }

    // The teacher's own loss and accuracy on `b`: what a perfect student would score.
    score evaluate(const batch& b) const
    {
        const matrix p = probabilities(b.x);
        const double scale = 1.0 / static_cast<double>(b.x.rows());
        score out;
        for (compact::index_t i = 0; i < b.x.rows(); ++i) {
            const int y = b.label[static_cast<std::size_t>(i)];
            out.loss -= std::log(static_cast<double>(p(i, y))) * scale;
            if (p(i, y) == p.row(i).maxCoeff()) out.accuracy += scale;
        }
        return out;
    }

    // Time spent generating data, to leave it out of the training time.
    double seconds() const { return seconds_; }

private:
    static constexpr double logit_scale = 3.0;

    // softmax(relu(X T1^T) T2^T), (rows, classes); the products use compact's CPU GEMM.
    matrix probabilities(const matrix& x) const
    {
        using compact::op;
        matrix h(x.rows(), teacher_hidden), p(x.rows(), classes);
        compact::cpu::gemm<float>(ctx_, op::none, op::transpose, 1.0f, compact::view(x), compact::view(t1_), 0.0f,
                           compact::view(h));
        h = h.cwiseMax(0.0f);
        compact::cpu::gemm<float>(ctx_, op::none, op::transpose, 1.0f, compact::view(h), compact::view(t2_), 0.0f,
                           compact::view(p));
        for (Eigen::Index i = 0; i < p.rows(); ++i) {
            p.row(i) = (p.row(i).array() - p.row(i).maxCoeff()).exp();
            p.row(i) /= p.row(i).sum();
        }
        return p;
    }

    std::uint64_t seed_;
    compact::cpu::context ctx_;
    matrix t1_, t2_;
    mutable double seconds_ = 0;
};

// PyTorch's nn.Linear initialisation: W and b uniform in [-1/sqrt(in), 1/sqrt(in)).
template <class Layer>
void init_uniform(Layer& layer, std::uint64_t seed, std::uint64_t stream)
{
    const double bound = 1.0 / std::sqrt(static_cast<double>(layer.in()));
    compact::fill_uniform(layer.weight(), -bound, bound, seed, stream);
    compact::fill_uniform(compact::make_view(layer.bias(), 1, layer.out()), -bound, bound, seed, stream + 1);
}

// In place: H = max(H, 0).
void relu(compact::matrix_view<float> h)
{
    for (compact::index_t i = 0; i < h.rows; ++i)
        for (compact::index_t j = 0; j < h.cols; ++j) h(i, j) = std::max(h(i, j), 0.0f);
}

// dH = dH * (H > 0), with H the ReLU's output.
void relu_backward(compact::const_matrix_view<float> h, compact::matrix_view<float> dh)
{
    for (compact::index_t i = 0; i < h.rows; ++i)
        for (compact::index_t j = 0; j < h.cols; ++j)
            if (h(i, j) <= 0.0f) dh(i, j) = 0.0f;
}

// Softmax cross-entropy of logits (N, 10) against labels (N), averaged over rows. Writes dlogits
// (N, 10), the gradient of that mean, unless it is an empty view.
score cross_entropy(compact::const_matrix_view<float> logits, const std::vector<int>& label,
                    compact::matrix_view<float> dlogits)
{
    score out;
    const double scale = 1.0 / static_cast<double>(logits.rows);
    for (compact::index_t i = 0; i < logits.rows; ++i) {
        const float* z = logits.row(i);
        const float top = *std::max_element(z, z + logits.cols);
        double sum = 0;
        for (compact::index_t j = 0; j < logits.cols; ++j) sum += std::exp(static_cast<double>(z[j] - top));
        const int y = label[static_cast<std::size_t>(i)];
        out.loss += (std::log(sum) - static_cast<double>(z[y] - top)) * scale;
        if (z[y] == top) out.accuracy += scale;
        if (dlogits.empty()) continue;
        for (compact::index_t j = 0; j < logits.cols; ++j) {
            const double p = std::exp(static_cast<double>(z[j] - top)) / sum;
            dlogits(i, j) = static_cast<float>((p - (j == y ? 1.0 : 0.0)) * scale);
        }
    }
    return out;
}

// Inference keeps no activations, so it calls the layers' plain forward (no Z) via layer().
template <class Layer>
score evaluate(const compact::cpu::context& ctx, const Layer& fc1, const Layer& fc2, const batch& data)
{
    matrix h(data.x.rows(), hidden), logits(data.x.rows(), classes);
    fc1.layer().forward(ctx, compact::view(data.x), fc1.weight(), compact::make_view(fc1.bias(), 1, hidden),
                        compact::view(h));
    relu(compact::view(h));
    fc2.layer().forward(ctx, compact::view(h), fc2.weight(), compact::make_view(fc2.bias(), 1, classes),
                        compact::view(logits));
    return cross_entropy(compact::view(logits), data.label, {});
}

// Prints a progress line every `every` steps, with the mean batch loss since the last one.
class progress {
public:
    progress(const char* name, int every, int steps) : name_(name), every_(every), steps_(steps) {}
    void add(int step, const score& s)
    {
        loss_ += s.loss;
        accuracy_ += s.accuracy;
        if (++count_ < every_ && step + 1 < steps_) return;
        std::printf("  %-12s step %4d  train loss %.4f  accuracy %5.1f%%\n", name_, step + 1, loss_ / count_,
                    100.0 * accuracy_ / count_);
        last_loss_ = loss_ / count_;
        loss_ = accuracy_ = 0;
        count_ = 0;
    }
    // Mean batch loss since the previous line, at the end: the final training loss.
    double last_loss() const { return last_loss_; }

private:
    const char* name_;
    int every_, steps_;
    int count_ = 0;
    double loss_ = 0, accuracy_ = 0, last_loss_ = 0;
};

struct run_result {
    const char* policy;
    compact::index_t rank1, rank2;
    double train_loss;
    score held_out;
    std::size_t saved_bytes; // linear-layer inputs kept for backward, per step
    std::size_t state_bytes; // optimizer moments
    double seconds;          // training, data generation excluded
};

// One training run; the two runs differ only in Policy (and the hyper-parameters that follow from it).
template <class Policy>
run_result train(const char* name, const char* tag, const settings& s, const teacher& data, const batch& held_out)
{
    constexpr bool compressed = !compact::forces_identity_projection<Policy>;
    const compact::cpu::context ctx{s.threads};
    batch b{matrix(s.batch, features), {}};
    matrix h_store(s.batch, hidden), dh_store(s.batch, hidden);
    matrix logits_store(s.batch, classes), dlogits_store(s.batch, classes);
    const auto h = compact::view(h_store), dh = compact::view(dh_store);                     // (N, 512)
    const auto logits = compact::view(logits_store), dlogits = compact::view(dlogits_store); // (N, 10)
    progress log(name, s.report_every, s.steps);
    const auto start = clock_type::now();
    const double data_seconds = data.seconds();

    // [snippet]
    // Policy: compact::rank::ratio<1, 4> (r = n/4), or compact::rank::full (P = I: uncompressed).
    compact::linear_options options;
    options.seed = s.seed;      // P is regenerated from (seed, layer id, epoch), never stored
    options.max_rows = s.batch; // sizes the saved Z (N, r)
    options.resample.gap = 50;  // T: a new P every 50 updates
    options.layer = 1;
    compact::linear_layer<float, Policy, compact::cpu> fc1(compact::in_features{features},
                                                           compact::out_features{hidden}, options);
    options.layer = 2;
    compact::linear_layer<float, Policy, compact::cpu> fc2(compact::in_features{hidden},
                                                           compact::out_features{classes}, options);
    init_uniform(fc1, s.seed, init_stream);
    init_uniform(fc2, s.seed, init_stream + 2);
    compact::adamw_params hyper;
    hyper.lr = compressed ? 1e-2 : 1e-3;
    hyper.alpha = compressed ? 0.25 : 1.0; // subspace scale: W -= lr alpha N P^T
    if (!s.resume.empty()) compact::load_checkpoint(s.resume + "." + tag, fc1, fc2); // weights, moments, counters
    const int first = static_cast<int>(fc1.updates());

    for (int step = first; step < first + s.steps; ++step) {
        data.sample(step + 1, b);                   // X (N, 256), labels (N)
        fc1.forward(ctx, compact::view(b.x), h);    // H = X W1^T + b1; keeps Z1 = X P1 (N, r1)
        relu(h);
        fc2.forward(ctx, h, logits);                // keeps Z2 = H P2 (N, r2)
        log.add(step - first, cross_entropy(logits, b.label, dlogits));
        fc2.backward(ctx, dlogits, dh);             // dH = dY W2 exactly; G2 = dY^T Z2 (10, r2)
        relu_backward(h, dh);
        fc1.backward(ctx, dh, {});                  // empty dX: the input needs no gradient
        fc1.step(ctx, hyper);                       // AdamW on W in the subspace, on b in full
        fc2.step(ctx, hyper);
    }
    // [/snippet]
    if (!s.save.empty()) compact::save_checkpoint(s.save + "." + tag, fc1, fc2);

    const double seconds =
        std::chrono::duration<double>(clock_type::now() - start).count() - (data.seconds() - data_seconds);
    return {name,
            fc1.rank(),
            fc2.rank(),
            log.last_loss(),
            evaluate(ctx, fc1, fc2, held_out),
            fc1.saved_bytes(s.batch) + fc2.saved_bytes(s.batch),
            fc1.state_bytes() + fc2.state_bytes(),
            seconds};
}

std::string with_share(std::size_t bytes, std::size_t baseline)
{
    char text[48];
    std::snprintf(text, sizeof text, "%.0f KiB (%.0f%%)", static_cast<double>(bytes) / 1024.0,
                  100.0 * static_cast<double>(bytes) / static_cast<double>(baseline));
    return text;
}

void print_table(const settings& s, const score& floor, const std::vector<run_result>& runs)
{
    std::printf("\n%d steps of %lld rows. Held-out set: %lld rows, on which the teacher itself scores loss %.4f, "
                "accuracy %.1f%%.\nSaved activations: the linear layers' inputs kept for backward (X or Z), per "
                "step.\n\n",
                s.steps, static_cast<long long>(s.batch), static_cast<long long>(s.held_out), floor.loss,
                100.0 * floor.accuracy);
    std::printf("%-12s %-9s %-10s %-13s %-13s %-18s %-18s %s\n", "policy", "ranks", "train loss", "held-out loss",
                "held-out acc", "saved activations", "optimizer state", "time");
    const run_result& base = runs.front();
    for (const run_result& r : runs) {
        const std::string ranks = std::to_string(r.rank1) + ", " + std::to_string(r.rank2);
        std::printf("%-12s %-9s %-10.4f %-13.4f %-13.1f %-18s %-18s %.2f s\n", r.policy, ranks.c_str(), r.train_loss,
                    r.held_out.loss, 100.0 * r.held_out.accuracy, with_share(r.saved_bytes, base.saved_bytes).c_str(),
                    with_share(r.state_bytes, base.state_bytes).c_str(), r.seconds);
    }
}

int usage(const char* program)
{
    std::fprintf(stderr, "usage: %s [--steps S] [--threads T] [--save PATH] [--resume PATH] [--smoke]\n", program);
    return 2;
}

} // namespace

int main(int argc, char** argv)
{
    settings s;
    bool smoke = false, threads_given = false;
    for (int i = 1; i < argc; ++i) {
        const bool has_value = i + 1 < argc;
        if (std::strcmp(argv[i], "--smoke") == 0) {
            smoke = true;
            s.steps = 20;
            s.batch = 64;
            s.held_out = 256;
            s.report_every = 10;
        } else if (std::strcmp(argv[i], "--steps") == 0 && has_value) {
            s.steps = std::atoi(argv[++i]);
        } else if (std::strcmp(argv[i], "--save") == 0 && has_value) {
            s.save = argv[++i];
        } else if (std::strcmp(argv[i], "--resume") == 0 && has_value) {
            s.resume = argv[++i];
        } else if (std::strcmp(argv[i], "--threads") == 0 && has_value) {
            s.threads = std::atoi(argv[++i]);
            threads_given = true;
        } else {
            return usage(argv[0]);
        }
    }
    if (s.steps < 1 || s.threads < 0) return usage(argv[0]);
    if (smoke && !threads_given) s.threads = 1;

    try {
        const teacher data(s.seed, compact::cpu::context{s.threads});
        batch held_out{matrix(s.held_out, features), {}};
        data.sample(0, held_out);

        std::vector<run_result> runs;
        runs.push_back(train<compact::rank::full>("full", "full", s, data, held_out));
        runs.push_back(train<compact::rank::ratio<1, 4>>("ratio<1,4>", "ratio-1-4", s, data, held_out));
        print_table(s, data.evaluate(held_out), runs);
        return 0;
    } catch (const compact::error& e) {
        std::fprintf(stderr, "compact error: %s\n", e.what());
        return 1;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
}
