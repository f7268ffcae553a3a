// data_parallel: train an MLP with compressed activations on R MPI ranks, all-reducing only the subspace
// gradients G_sub (m, r) and the biases (SPEC section 11).
//
//   mpiexec -n 2 build/release/examples/data_parallel            (add --oversubscribe for more ranks
//   mpiexec -n 4 --oversubscribe build/release/examples/data_parallel       than cores)
//
// The model: X (N, 256) -> fc1 -> ReLU -> fc2 -> ReLU -> fc3 -> logits (N, 10) -> softmax cross
// entropy, hidden width 512, every layer at r = n/4 (compact::rank::ratio<1, 4>). Labels come from a
// fixed random linear teacher. Each step has a global batch of --batch rows; rank k trains on its
// N/R rows (its loss the mean over them), data_parallel all-reduces the mean gradients, and every rank
// takes the same AdamW step. Every rank draws the same P from the shared seed and layer ids, so what
// crosses the network per step is sum_l m_l r_l + biases values instead of sum_l m_l n_l + biases: about
// a quarter here.
//
// The program prints the bytes all-reduced per step against uncompressed data parallelism, the time per
// step, and the final loss; then rank 0 trains the same model alone on the same global batches (the R
// shards as R accumulated micro-batches) and compares: with the default ordered reduction and R a
// power of two the weights are bit-identical.
//
// Usage: data_parallel [--steps S] [--batch N] [--threads T] [--native] [--no-reference] [--smoke]
//   --steps S       optimizer steps (default 200)
//   --batch N       global batch rows per step, a multiple of 8 R (default 256)
//   --threads T     CPU threads per rank (default 1)
//   --native        MPI_Iallreduce instead of the ordered reduction (same bits on every rank, but the
//                   1-process comparison is then only up to summation order)
//   --no-reference  skip the 1-process run (for timing)
//   --smoke         10 steps of 64 rows
#include <compact/compact.hpp>
#include <compact/distributed.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <vector>

namespace {

using compact::index_t;
using policy = compact::rank::ratio<1, 4>;
using layer = compact::linear_layer<float, policy, compact::cpu>;

constexpr index_t features = 256, hidden = 512, classes = 10, block = 8;
constexpr std::uint64_t seed = 2024;

struct settings {
    int steps = 200;
    index_t batch = 256;
    int threads = 1;
    bool native = false, reference = true;
};

struct mlp {
    layer fc1, fc2, fc3;
    explicit mlp(index_t rows)
        : fc1(compact::in_features{features}, compact::out_features{hidden}, options(rows, 1)),
          fc2(compact::in_features{hidden}, compact::out_features{hidden}, options(rows, 2)),
          fc3(compact::in_features{hidden}, compact::out_features{classes}, options(rows, 3))
    {
        std::uint64_t stream = 10;
        for (layer* l : {&fc1, &fc2, &fc3}) { // PyTorch's nn.Linear initialisation, identical on every rank
            const double bound = 1.0 / std::sqrt(static_cast<double>(l->in()));
            compact::fill_uniform(l->weight(), -bound, bound, seed, stream++);
            compact::fill_uniform(compact::make_view(l->bias(), 1, l->out()), -bound, bound, seed, stream++);
        }
    }
    static compact::linear_options options(index_t rows, std::uint64_t id)
    {
        compact::linear_options o;
        o.seed = seed; // the shared seed: every rank regenerates the same P
        o.layer = id;
        o.max_rows = rows;
        o.resample.gap = 50;
        o.keep_projection = true; // P (n, r) kept for its epoch: its cost does not shrink with the rows per rank
        return o;
    }
};

// Rows [row0, row0 + x.rows) of step `step`'s global batch: blocks of 8 rows, each from its own random
// stream, so a rank generates only its own rows and every split of the batch sees the same data.
void sample(int step, index_t row0, index_t global, compact::matrix_view<float> x, std::vector<int>& label,
            const std::vector<float>& teacher)
{
    for (index_t b = 0; b < x.rows / block; ++b) {
        const auto stream = 1000 + static_cast<std::uint64_t>(step) * static_cast<std::uint64_t>(global / block) +
                            static_cast<std::uint64_t>(row0 / block + b);
        compact::fill_uniform(x.row_block(b * block, block), -1.0, 1.0, seed, stream);
    }
    label.resize(static_cast<std::size_t>(x.rows));
    for (index_t i = 0; i < x.rows; ++i) {
        float top = -1e30f;
        for (int c = 0; c < classes; ++c) {
            float z = 0;
            for (index_t j = 0; j < features; ++j) z += teacher[static_cast<std::size_t>(c * features + j)] * x(i, j);
            if (z > top) top = z, label[static_cast<std::size_t>(i)] = c;
        }
    }
}

void relu(compact::matrix_view<float> h)
{
    for (index_t i = 0; i < h.size(); ++i) h.data[i] = std::max(h.data[i], 0.0f);
}
void relu_backward(compact::const_matrix_view<float> h, compact::matrix_view<float> dh)
{
    for (index_t i = 0; i < h.size(); ++i)
        if (h.data[i] <= 0.0f) dh.data[i] = 0.0f;
}

// Summed cross-entropy of the rows; dlogits = (softmax - onehot) * scale.
double cross_entropy(compact::const_matrix_view<float> logits, const std::vector<int>& label, double scale,
                     compact::matrix_view<float> dlogits)
{
    double loss = 0;
    for (index_t i = 0; i < logits.rows; ++i) {
        const float* z = logits.row(i);
        const float top = *std::max_element(z, z + classes);
        double sum = 0;
        for (index_t j = 0; j < classes; ++j) sum += std::exp(static_cast<double>(z[j] - top));
        const int y = label[static_cast<std::size_t>(i)];
        loss += std::log(sum) - static_cast<double>(z[y] - top);
        for (index_t j = 0; j < classes; ++j)
            dlogits(i, j) = static_cast<float>((std::exp(static_cast<double>(z[j] - top)) / sum - (j == y ? 1.0 : 0.0)) * scale);
    }
    return loss;
}

struct result {
    double loss = 0;          // mean over the global batch of the last step
    double seconds_per_step = 0;
};

// Trains `m` through `comm`: this process handles `shards` consecutive shards of rows/shard rows each,
// starting at shard `first_shard`, accumulated in order (1 shard per rank; R shards for the 1-process run).
template <class Communicator>
result train(Communicator& comm, mlp& m, const settings& s, int shards, int first_shard)
{
    const compact::cpu::context ctx{s.threads};
    const index_t rows = s.batch / (comm.size() * shards);
    std::vector<float> teacher(static_cast<std::size_t>(classes * features));
    compact::fill_uniform(compact::make_view(teacher.data(), classes, features), -1.0, 1.0, seed, 1);
    std::vector<float> x(static_cast<std::size_t>(rows * features)), h1(static_cast<std::size_t>(rows * hidden)),
        h2(h1.size()), dh1(h1.size()), dh2(h1.size()), logits(static_cast<std::size_t>(rows * classes)),
        dlogits(logits.size());
    const auto X = compact::make_view(x.data(), rows, features);                                 // (N/R, 256)
    const auto H1 = compact::make_view(h1.data(), rows, hidden), H2 = compact::make_view(h2.data(), rows, hidden);
    const auto dH1 = compact::make_view(dh1.data(), rows, hidden), dH2 = compact::make_view(dh2.data(), rows, hidden);
    const auto L = compact::make_view(logits.data(), rows, classes), dL = compact::make_view(dlogits.data(), rows, classes);
    std::vector<int> label;

    // [snippet]
    compact::data_parallel<float, Communicator, compact::cpu> dp(comm);
    const auto g3 = dp.add(m.fc3, "fc3"), g2 = dp.add(m.fc2, "fc2"), g1 = dp.add(m.fc1, "fc1"); // backward order
    dp.check_layout(ctx); // every rank: same shapes, seed, layer ids, ranks, compressors
    compact::adamw_params hyper;
    hyper.lr = 1e-2;
    hyper.alpha = 0.25;
    result out;
    const auto start = std::chrono::steady_clock::now();
    for (int step = 0; step < s.steps; ++step) {
        double loss = 0;
        for (int k = 0; k < shards; ++k) {
            const bool last = k + 1 == shards;
            const index_t row0 = (comm.rank() * shards + first_shard + k) * rows;
            sample(step, row0, s.batch, X, label, teacher);
            m.fc1.forward(ctx, X, H1);
            relu(H1);
            m.fc2.forward(ctx, H1, H2);
            relu(H2);
            m.fc3.forward(ctx, H2, L);
            loss += cross_entropy(L, label, 1.0 / static_cast<double>(rows * shards), dL);
            m.fc3.backward(ctx, dL, dH2);
            if (last) dp.ready(ctx, g3); // fc3's G_sub and bias start reducing during fc2's backward
            relu_backward(H2, dH2);
            m.fc2.backward(ctx, dH2, dH1);
            if (last) dp.ready(ctx, g2);
            relu_backward(H1, dH1);
            m.fc1.backward(ctx, dH1, {});
            if (last) dp.ready(ctx, g1);
        }
        dp.finish(ctx); // G_sub and db now hold the mean over the ranks
        for (layer* l : {&m.fc1, &m.fc2, &m.fc3}) l->step(ctx, hyper);
        if (step + 1 == s.steps) {
            comm.all_reduce(ctx, &loss, 1, compact::reduce_op::sum);
            out.loss = loss / static_cast<double>(s.batch);
        }
    }
    // [/snippet]
    out.seconds_per_step = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() / s.steps;
    return out;
}

std::vector<float> weights(const mlp& m)
{
    std::vector<float> w;
    for (const layer* l : {&m.fc1, &m.fc2, &m.fc3}) {
        w.insert(w.end(), l->weight().data, l->weight().data + l->weight().size());
        w.insert(w.end(), l->bias(), l->bias() + l->out());
    }
    return w;
}

int usage(const char* program)
{
    std::fprintf(stderr, "usage: %s [--steps S] [--batch N] [--threads T] [--native] [--no-reference] [--smoke]\n",
                 program);
    return 2;
}

} // namespace

int main(int argc, char** argv)
{
    compact::mpi_session mpi(argc, argv);
    settings s;
    for (int i = 1; i < argc; ++i) {
        const bool has_value = i + 1 < argc;
        if (std::strcmp(argv[i], "--smoke") == 0) {
            s.steps = 10;
            s.batch = 64;
        } else if (std::strcmp(argv[i], "--steps") == 0 && has_value) {
            s.steps = std::atoi(argv[++i]);
        } else if (std::strcmp(argv[i], "--batch") == 0 && has_value) {
            s.batch = std::atoi(argv[++i]);
        } else if (std::strcmp(argv[i], "--threads") == 0 && has_value) {
            s.threads = std::atoi(argv[++i]);
        } else if (std::strcmp(argv[i], "--native") == 0) {
            s.native = true;
        } else if (std::strcmp(argv[i], "--no-reference") == 0) {
            s.reference = false;
        } else {
            return usage(argv[0]);
        }
    }
    compact::communicator_options options;
    options.algorithm = s.native ? compact::reduction::native : compact::reduction::ordered;
    compact::mpi_communicator comm(MPI_COMM_WORLD, options);
    const int ranks = comm.size();
    if (s.steps < 1 || s.threads < 1 || s.batch < block * ranks || s.batch % (block * ranks) != 0) {
        if (comm.rank() == 0) std::fprintf(stderr, "--batch must be a positive multiple of 8 R = %lld\n", static_cast<long long>(block * ranks));
        return usage(argv[0]);
    }
    try {
        mlp m(s.batch / ranks);
        const result run = train(comm, m, s, 1, 0);
        compact::data_parallel<float, compact::mpi_communicator, compact::cpu> probe(comm);
        probe.add(m.fc3);
        probe.add(m.fc2);
        probe.add(m.fc1);
        probe.check_parameters(compact::cpu::context{s.threads}); // bit-identical on every rank, or an error
        if (comm.rank() == 0) {
            const double sent = static_cast<double>(probe.bytes_per_step()),
                         full = static_cast<double>(probe.uncompressed_bytes_per_step());
            std::printf("%d ranks x %d threads, global batch %lld, %d steps, r = n/4, %s reduction\n", ranks, s.threads,
                        static_cast<long long>(s.batch), s.steps, s.native ? "native" : "ordered");
            std::printf("bytes all-reduced per step: %.0f (uncompressed data parallelism: %.0f), ratio %.4f\n", sent,
                        full, sent / full);
            std::printf("per rank and step, ring all-reduce: %.0f bytes moved (uncompressed: %.0f)\n",
                        2.0 * (ranks - 1) / ranks * sent, 2.0 * (ranks - 1) / ranks * full);
            std::printf("time per step: %.3f ms\n", 1e3 * run.seconds_per_step);
            std::printf("final loss (%d ranks): %.6f\n", ranks, run.loss);
        }
        if (s.reference && comm.rank() == 0) {
            // One process, the same global batches: the R shards as R accumulated micro-batches.
            compact::self_communicator self;
            mlp alone(s.batch / ranks);
            const result ref = train(self, alone, s, ranks, 0);
            const std::vector<float> a = weights(m), b = weights(alone);
            double diff = 0, norm = 0;
            for (std::size_t i = 0; i < a.size(); ++i) {
                diff += (static_cast<double>(a[i]) - b[i]) * (static_cast<double>(a[i]) - b[i]);
                norm += static_cast<double>(b[i]) * b[i];
            }
            std::printf("final loss (1 process, same global batch): %.6f; weights %s (relative difference %.3g)\n",
                        ref.loss, a == b ? "bit-identical" : "differ", std::sqrt(diff / norm));
        }
        comm.barrier();
        return 0;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "rank %d: %s\n", comm.rank(), e.what());
        comm.abort(1);
    }
}
