// tests/distributed/test_data_parallel.cpp: data-parallel training over MPI (SPEC section 11), run by
// ctest under mpiexec with 1, 2 and 4 ranks. Every rank runs every test case in the same order (they
// are collective); a rank that fails a check leaves the others in a collective, where the
// communicator's timeout turns the hang into an error.
//
// The model: X (N, 64) -> fc1 (r = n/4) -> ReLU -> fc2 (r = n/4) -> logits (N, 8) -> softmax cross
// entropy, on fresh batches from a random teacher. Each step has a global batch of 64 rows; rank k
// trains on rows [k N/R, (k+1) N/R) with its loss the mean over its rows, and the gradients are
// all-reduced to their mean.
//
// What is checked, with the tolerances:
//   * ordered reduction: R ranks equal one process that accumulates the same R micro-batches in rank
//     order (loss scaled by 1/N over the global batch), bit for bit (R = 1, 2, 4 are powers of two, so
//     the 1/R scaling is exact);
//   * against one process on the whole global batch in one micro-batch (summation order differs):
//     relative difference of the weights after 8 steps below 1e-5 (float) and 1e-13 (double); measured 4e-8 and 1e-7 (float, R = 2 and 4), 1e-16 (double); the
//     measured value is printed with COMPACT_TEST_PRINT_ERRORS=1;
//   * weights bit-identical on every rank (check_parameters), with the ordered and the native reduction;
//   * the same run twice gives the same bits;
//   * bytes per step exactly sizeof(T) (m1 r1 + m2 r2 + m1 + m2), and the uncompressed count;
//   * a layout mismatch (seed, rank, shape) raises the same error on every rank;
//   * a checkpoint written by rank 0 resumes bit-exactly on every rank.
#define DOCTEST_CONFIG_IMPLEMENT
#include <compact/compact.hpp>
#include <compact/distributed.hpp>

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

namespace {

using compact::index_t;

constexpr index_t features = 64, hidden = 96, classes = 8, global_rows = 64;
constexpr std::uint64_t seed = 77;

compact::mpi_communicator* world = nullptr; // set by main

bool print_errors() { return std::getenv("COMPACT_TEST_PRINT_ERRORS") != nullptr; }

template <class T, class Policy = compact::rank::ratio<1, 4>>
struct model {
    using layer = compact::linear_layer<T, Policy, compact::cpu>;
    layer fc1, fc2;

    explicit model(index_t rows, std::uint64_t fc1_seed = seed, index_t width = hidden)
        : fc1(compact::in_features{features}, compact::out_features{width}, options(rows, fc1_seed, 1)),
          fc2(compact::in_features{width}, compact::out_features{classes}, options(rows, seed, 2))
    {
        compact::fill_uniform(fc1.weight(), -0.125, 0.125, seed, 10);
        compact::fill_uniform(compact::make_view(fc1.bias(), 1, fc1.out()), -0.125, 0.125, seed, 11);
        compact::fill_uniform(fc2.weight(), -0.1, 0.1, seed, 12);
        compact::fill_uniform(compact::make_view(fc2.bias(), 1, fc2.out()), -0.1, 0.1, seed, 13);
    }

    static compact::linear_options options(index_t rows, std::uint64_t s, std::uint64_t id)
    {
        compact::linear_options o;
        o.seed = s;
        o.layer = id;
        o.max_rows = rows;
        o.resample.gap = 3; // new projections during the test, so epochs change under data parallelism
        return o;
    }
};

// Batch `step` of the global batch: X (64, 64) uniform, labels from a fixed random teacher.
template <class T>
void global_batch(int step, std::vector<T>& x, std::vector<int>& label)
{
    x.assign(static_cast<std::size_t>(global_rows * features), T(0));
    compact::fill_uniform(compact::make_view(x.data(), global_rows, features), -1.0, 1.0, seed, 1000 + 2 * static_cast<std::uint64_t>(step));
    std::vector<T> teacher(static_cast<std::size_t>(classes * features));
    compact::fill_uniform(compact::make_view(teacher.data(), classes, features), -1.0, 1.0, seed, 5);
    label.assign(static_cast<std::size_t>(global_rows), 0);
    for (index_t i = 0; i < global_rows; ++i) {
        int best = 0;
        T top = T(-1e30);
        for (int c = 0; c < classes; ++c) {
            T z = 0;
            for (index_t j = 0; j < features; ++j)
                z += teacher[static_cast<std::size_t>(c * features + j)] * x[static_cast<std::size_t>(i * features + j)];
            if (z > top) top = z, best = c;
        }
        label[static_cast<std::size_t>(i)] = best;
    }
}

struct micro_batches {
    std::vector<index_t> first_rows; // in the global batch, in the order they are accumulated
    index_t rows = 0;
    double scale = 0; // dlogits = (p - onehot) * scale: 1 over the rows the loss averages
};

// This rank's share of R ranks: one micro-batch, its loss the mean over its own rows.
micro_batches shard(int rank, int ranks)
{
    const index_t rows = global_rows / ranks;
    return {{rank * rows}, rows, 1.0 / static_cast<double>(rows)};
}
// One process doing the work of R ranks: R micro-batches accumulated in rank order, loss the global mean.
micro_batches accumulate(int ranks)
{
    micro_batches b{{}, global_rows / ranks, 1.0 / static_cast<double>(global_rows)};
    for (int k = 0; k < ranks; ++k) b.first_rows.push_back(k * b.rows);
    return b;
}

// `steps` optimizer steps from step `first`, the gradients all-reduced through `dp`; returns the mean
// training loss of the last step over this process's rows.
template <class T, class DP, class M>
double train(const compact::cpu::context& ctx, DP& dp, M& m, std::size_t g1, std::size_t g2, int first, int steps,
             const micro_batches& mb)
{
    std::vector<T> x;
    std::vector<int> label;
    std::vector<T> h(static_cast<std::size_t>(mb.rows * m.fc1.out())), dh(h.size());
    std::vector<T> logits(static_cast<std::size_t>(mb.rows * classes)), dlogits(logits.size());
    const auto hv = compact::make_view(h.data(), mb.rows, m.fc1.out());
    const auto dhv = compact::make_view(dh.data(), mb.rows, m.fc1.out());
    const auto lv = compact::make_view(logits.data(), mb.rows, classes);
    const auto dlv = compact::make_view(dlogits.data(), mb.rows, classes);
    compact::adamw_params hyper;
    hyper.lr = 1e-2;
    hyper.alpha = 0.25;
    hyper.weight_decay = 0.01;
    double loss = 0;
    for (int step = first; step < first + steps; ++step) {
        global_batch(step, x, label);
        loss = 0;
        for (std::size_t k = 0; k < mb.first_rows.size(); ++k) {
            const index_t row0 = mb.first_rows[k];
            m.fc1.forward(ctx, compact::const_matrix_view<T>(x.data() + row0 * features, mb.rows, features), hv);
            for (auto& v : h) v = std::max(v, T(0));
            m.fc2.forward(ctx, hv, lv);
            for (index_t i = 0; i < mb.rows; ++i) {
                T top = lv(i, 0);
                for (index_t j = 1; j < classes; ++j) top = std::max(top, lv(i, j));
                double sum = 0;
                for (index_t j = 0; j < classes; ++j) sum += std::exp(static_cast<double>(lv(i, j) - top));
                const int y = label[static_cast<std::size_t>(row0 + i)];
                loss += std::log(sum) - static_cast<double>(lv(i, y) - top);
                for (index_t j = 0; j < classes; ++j)
                    dlv(i, j) = static_cast<T>((std::exp(static_cast<double>(lv(i, j) - top)) / sum - (j == y ? 1.0 : 0.0)) *
                                               mb.scale);
            }
            const bool last = k + 1 == mb.first_rows.size();
            m.fc2.backward(ctx, dlv, dhv);
            if (last) dp.ready(ctx, g2); // fc2's bucket reduces while fc1's backward runs
            for (std::size_t i = 0; i < h.size(); ++i)
                if (h[i] <= T(0)) dh[i] = T(0);
            m.fc1.backward(ctx, dhv, {});
            if (last) dp.ready(ctx, g1);
        }
        dp.finish(ctx);
        m.fc1.step(ctx, hyper);
        m.fc2.step(ctx, hyper);
        loss /= static_cast<double>(mb.rows * static_cast<index_t>(mb.first_rows.size()));
    }
    return loss;
}

template <class T, class M>
std::vector<T> parameters(const M& m)
{
    std::vector<T> p;
    const auto add = [&](const T* d, index_t n) { p.insert(p.end(), d, d + n); };
    add(m.fc1.weight().data, m.fc1.weight().size());
    add(m.fc1.bias(), m.fc1.out());
    add(m.fc2.weight().data, m.fc2.weight().size());
    add(m.fc2.bias(), m.fc2.out());
    return p;
}

double relative_difference(const std::vector<double>& a, const std::vector<double>& b)
{
    double d = 0, n = 0;
    for (std::size_t i = 0; i < a.size(); ++i) {
        d += (a[i] - b[i]) * (a[i] - b[i]);
        n += b[i] * b[i];
    }
    return std::sqrt(d / n);
}

template <class T>
std::vector<double> widen(const std::vector<T>& v)
{
    return {v.begin(), v.end()};
}

// Every rank's value of `mine`, gathered through the communicator.
std::vector<std::uint64_t> gather(std::uint64_t mine)
{
    std::vector<std::uint64_t> all(static_cast<std::size_t>(world->size()), 0);
    all[static_cast<std::size_t>(world->rank())] = mine;
    world->all_reduce(compact::cpu::context{1}, all.data(), all.size(), compact::reduce_op::sum);
    return all;
}

std::uint64_t hash_text(const std::string& s)
{
    compact::detail::fnv1a h;
    h.text(s.c_str());
    return h.digest();
}

template <class T>
std::uint64_t hash_values(const std::vector<T>& v)
{
    compact::detail::fnv1a h;
    h.bytes(v.data(), v.size() * sizeof(T));
    return h.digest();
}

constexpr int steps = 8;

} // namespace

TEST_CASE_TEMPLATE("data_parallel: R ranks equal one process accumulating the same global batch", T, float, double)
{
    const compact::cpu::context ctx{1};
    const int ranks = world->size(), rank = world->rank();
    compact::data_parallel_options options;
    options.bucket_bytes = 2048; // several buckets, so that ready() starts reductions during backward

    model<T> dist(global_rows / ranks);
    compact::data_parallel<T, compact::mpi_communicator, compact::cpu> dp(*world, options);
    const auto g2 = dp.add(dist.fc2, "fc2"), g1 = dp.add(dist.fc1, "fc1");
    dp.check_layout(ctx);
    CHECK(dp.buckets() > 1);
    train<T>(ctx, dp, dist, g1, g2, 0, steps, shard(rank, ranks));
    dp.check_parameters(ctx); // bit-identical on every rank, or the same error on every rank
    const std::vector<T> got = parameters<T>(dist);

    // The same global batches on one process, R micro-batches accumulated in rank order: bit for bit.
    compact::self_communicator self;
    model<T> ref(global_rows / ranks);
    compact::data_parallel<T, compact::self_communicator, compact::cpu> dp_ref(self, options);
    const auto r2 = dp_ref.add(ref.fc2), r1 = dp_ref.add(ref.fc1);
    train<T>(ctx, dp_ref, ref, r1, r2, 0, steps, accumulate(ranks));
    const std::vector<T> want = parameters<T>(ref);
    CHECK(got == want);

    // One process on the whole global batch at once: the same up to summation order.
    model<T> whole(global_rows);
    compact::data_parallel<T, compact::self_communicator, compact::cpu> dp_whole(self, options);
    const auto w2 = dp_whole.add(whole.fc2), w1 = dp_whole.add(whole.fc1);
    train<T>(ctx, dp_whole, whole, w1, w2, 0, steps, accumulate(1));
    const double diff = relative_difference(widen(got), widen(parameters<T>(whole)));
    const double tolerance = std::is_same_v<T, float> ? 1e-5 : 1e-13;
    if (print_errors() && rank == 0)
        std::printf("[%d ranks, %s] relative difference of the weights after %d steps, R ranks vs one process on the "
                    "whole batch: %.3g (tolerance %.0g)\n",
                    ranks, std::is_same_v<T, float> ? "float" : "double", steps, diff, tolerance);
    CHECK(diff < tolerance);
}

TEST_CASE("data_parallel: the native reduction keeps the ranks bit-identical and is reproducible")
{
    const compact::cpu::context ctx{1};
    compact::communicator_options co;
    co.algorithm = compact::reduction::native;
    compact::mpi_communicator native(MPI_COMM_WORLD, co);
    std::vector<float> first;
    for (int run = 0; run < 2; ++run) {
        model<float> m(global_rows / native.size());
        compact::data_parallel<float, compact::mpi_communicator, compact::cpu> dp(native);
        const auto g2 = dp.add(m.fc2), g1 = dp.add(m.fc1);
        train<float>(ctx, dp, m, g1, g2, 0, steps, shard(native.rank(), native.size()));
        dp.check_parameters(ctx);
        if (run == 0)
            first = parameters<float>(m);
        else
            CHECK(parameters<float>(m) == first);
    }
}

TEST_CASE("data_parallel: bytes per step are sum m r sizeof(T) plus the biases")
{
    model<float> m(global_rows / world->size());
    compact::data_parallel<float, compact::mpi_communicator, compact::cpu> dp(*world);
    dp.add(m.fc2);
    dp.add(m.fc1);
    std::vector<float> gain(static_cast<std::size_t>(hidden)), dgain(gain.size());
    dp.add("gain", compact::make_view(dgain.data(), 1, hidden), compact::make_view<const float>(gain.data(), 1, hidden));
    const index_t r1 = features / 4, r2 = hidden / 4;
    CHECK(m.fc1.rank() == r1);
    CHECK(m.fc2.rank() == r2);
    CHECK(dp.bytes_per_step() == sizeof(float) * static_cast<std::size_t>(hidden * r1 + classes * r2 + hidden + classes + hidden));
    CHECK(dp.uncompressed_bytes_per_step() ==
          sizeof(float) * static_cast<std::size_t>(hidden * features + classes * hidden + hidden + classes + hidden));
    const compact::cpu::context ctx{1};
    dp.check_layout(ctx);
    CHECK(dp.buckets() == 1);
}

TEST_CASE("data_parallel: a layout mismatch raises the same error on every rank")
{
    const compact::cpu::context ctx{1};
    const int ranks = world->size(), last = ranks - 1;
    const auto expect = [&](auto& m, const char* what, bool mismatch) {
        compact::data_parallel<float, compact::mpi_communicator, compact::cpu> dp(*world);
        dp.add(m.fc2);
        dp.add(m.fc1);
        std::string message;
        try {
            dp.check_layout(ctx);
        } catch (const compact::error& e) {
            message = e.what();
        }
        if (!mismatch) {
            CHECK(message.empty());
            return;
        }
        INFO(message);
        CHECK(message.find("data_parallel::check_layout") != std::string::npos);
        CHECK(message.find(what) != std::string::npos);
        const auto all = gather(hash_text(message));
        CHECK(std::all_of(all.begin(), all.end(), [&](std::uint64_t h) { return h == all[0]; }));
    };
    SUBCASE("seed")
    {
        model<float> m(8, world->rank() == last ? seed + 1 : seed);
        expect(m, "projection keys", ranks > 1);
    }
    SUBCASE("shape")
    {
        model<float> m(8, seed, world->rank() == last ? hidden + 4 : hidden);
        expect(m, "shapes", ranks > 1);
    }
    SUBCASE("rank")
    {
        if (world->rank() == last) {
            model<float, compact::rank::ratio<1, 2>> m(8);
            expect(m, "compressors", ranks > 1);
        } else {
            model<float> m(8);
            expect(m, "compressors", ranks > 1);
        }
    }
}

TEST_CASE("data_parallel: a checkpoint written by rank 0 resumes bit-exactly on every rank")
{
    const compact::cpu::context ctx{1};
    const int ranks = world->size(), rank = world->rank();
    const std::string path = "data_parallel_" + std::to_string(ranks) + ".ckpt";
    const auto run = [&](model<float>& m, int first, int count) {
        compact::data_parallel<float, compact::mpi_communicator, compact::cpu> dp(*world);
        const auto g2 = dp.add(m.fc2), g1 = dp.add(m.fc1);
        train<float>(ctx, dp, m, g1, g2, first, count, shard(rank, ranks));
    };
    model<float> a(global_rows / ranks);
    run(a, 0, 4);
    compact::save_checkpoint(*world, ctx, path, a.fc1, a.fc2);
    run(a, 4, 4);

    model<float> b(global_rows / ranks);
    compact::fill_uniform(b.fc1.weight(), -1.0, 1.0, seed, 99); // overwritten by the load
    compact::load_checkpoint(*world, ctx, path, b.fc1, b.fc2);
    CHECK(b.fc1.updates() == 4);
    run(b, 4, 4);
    CHECK(parameters<float>(b) == parameters<float>(a));
    const auto all = gather(hash_values(parameters<float>(b)));
    CHECK(std::all_of(all.begin(), all.end(), [&](std::uint64_t h) { return h == all[0]; }));

    // A file rank 0 cannot write: the same error on every rank.
    std::string message;
    try {
        compact::save_checkpoint(*world, ctx, "/nonexistent-directory/x.ckpt", a.fc1, a.fc2);
    } catch (const compact::error& e) {
        message = e.what();
    }
    CHECK(message.find("save_checkpoint: writing the checkpoint failed on rank 0") != std::string::npos);
    const auto texts = gather(hash_text(message));
    CHECK(std::all_of(texts.begin(), texts.end(), [&](std::uint64_t h) { return h == texts[0]; }));
    world->barrier();
    if (rank == 0) std::remove(path.c_str());
}

int main(int argc, char** argv)
{
    compact::mpi_session mpi(argc, argv);
    int status = 0;
    {
        compact::communicator_options options;
        options.timeout = std::chrono::seconds(60); // a failed check on one rank ends in an error, not a hang
        compact::mpi_communicator comm(MPI_COMM_WORLD, options);
        world = &comm;
        doctest::Context context(argc, argv);
        if (comm.rank() != 0) context.setOption("out", "/dev/null"); // one report, from rank 0
        try {
            status = context.run();
        } catch (const std::exception& e) {
            std::fprintf(stderr, "rank %d: %s\n", comm.rank(), e.what());
            comm.abort(1);
        }
        // A failure on any rank fails the run.
        std::uint64_t failed = status != 0 ? 1 : 0;
        comm.all_reduce(compact::cpu::context{1}, &failed, 1, compact::reduce_op::sum);
        if (failed != 0 && status == 0) {
            std::fprintf(stderr, "rank %d: another rank failed\n", comm.rank());
            status = 1;
        }
        world = nullptr;
    }
    return status;
}
