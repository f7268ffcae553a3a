// resume_training: stop a run, save it, resume it in fresh objects, and land on exactly the same weights.
//
// A two-layer model, two compact::linear_layer with compressed activations (rank n/4, a new projection P
// every T = 15 updates, Flora-style moment transfer when P changes):
//
//   X (N, 64) -> fc1 -> H (N, 128) -> ReLU -> fc2 -> Y (N, 16),  loss mean((Y - Y*)^2),  Y* = X T^T
//
// is trained three times on the same batches (batch s is a pure function of the seed and s):
//   1. straight through, updates 0 .. 100;
//   2. updates 0 .. 40, then compact::save_checkpoint(path, fc1, fc2) and the "process" ends;
//   3. new layers, built with the same options (their own weights are random and get replaced),
//      compact::load_checkpoint(path, fc1, fc2), then updates 40 .. 100.
// Run 3 ends bit-identical to run 1: weights, biases, moments and counters. That needs what the
// checkpoint holds beyond the tensors: the seed and layer ids (P is never stored, it is regenerated from
// them), the update count (which selects P's epoch: here the save falls inside epoch 2 and the resumed
// run crosses into epoch 3 at update 45) and the optimizer's step and epoch counters.
//
// The checkpoint is written atomically (a temporary file, fsync, rename): killing the program while it
// saves leaves the previous checkpoint intact. Loading validates the whole file, and that the layers
// were built like the saved ones, before it changes anything.
//
// Usage: resume_training [--smoke] [--keep FILE]
//   --smoke      the same run (it takes well under a second); for CI
//   --keep FILE  write the checkpoint to FILE and leave it there (default: a temporary file, removed)
#include <compact/compact.hpp>
#include <compact/io/linear_layer_checkpoint.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <filesystem>
#include <string>
#include <vector>

#include <unistd.h>

namespace {

constexpr compact::index_t batch = 64, features = 64, hidden = 128, outputs = 16;
constexpr std::uint64_t seed = 2024;
constexpr std::uint64_t total_updates = 100, save_at = 40;

using layer = compact::linear_layer<float, compact::rank::ratio<1, 4>, compact::cpu>;

compact::linear_options options_for(std::uint64_t layer_id, compact::index_t max_rows)
{
    compact::linear_options o;
    o.seed = seed;
    o.layer = layer_id;
    o.max_rows = max_rows;
    o.resample.gap = 15;
    o.moments = compact::moment_policy::transfer;
    return o;
}

// The model and its activation buffers. `init_stream` picks the initial weights.
struct model {
    layer fc1{compact::in_features{features}, compact::out_features{hidden}, options_for(1, batch)};
    layer fc2{compact::in_features{hidden}, compact::out_features{outputs}, options_for(2, batch)};
    std::vector<float> h = std::vector<float>(batch * hidden);   // (N, 128) ReLU output
    std::vector<float> y = std::vector<float>(batch * outputs);  // (N, 16)
    std::vector<float> dh = std::vector<float>(batch * hidden);  // (N, 128)

    explicit model(std::uint64_t init_stream)
    {
        for (layer* l : {&fc1, &fc2}) {
            const double bound = 1.0 / std::sqrt(static_cast<double>(l->in()));
            compact::fill_uniform(l->weight(), -bound, bound, seed, init_stream++);
            compact::fill_uniform(compact::make_view(l->bias(), 1, l->out()), -bound, bound, seed, init_stream++);
        }
    }
};

// Updates [first, last) of `m`; returns the loss of the last one.
double train(model& m, const std::vector<float>& teacher, std::uint64_t first, std::uint64_t last)
{
    const compact::cpu::context ctx{};
    compact::adamw_params h;
    h.lr = 1e-2;
    h.alpha = 0.25;
    h.weight_decay = 0.01;
    std::vector<float> x(batch * features), target(batch * outputs), dy(batch * outputs);
    double loss = 0;
    for (std::uint64_t s = first; s < last; ++s) {
        compact::fill_uniform(compact::make_view(x.data(), batch, features), -1.0, 1.0, seed, 1000 + s);
        compact::cpu::gemm<float>(ctx, compact::op::none, compact::op::transpose, 1.0f,
                                  compact::make_view(x.data(), batch, features), // target = X T^T
                                  compact::make_view(teacher.data(), outputs, features), 0.0f,
                                  compact::make_view(target.data(), batch, outputs));

        const auto x_view = compact::make_view(x.data(), batch, features);
        const auto h_view = compact::make_view(m.h.data(), batch, hidden);
        m.fc1.forward(ctx, x_view, h_view);
        for (auto& v : m.h) v = std::max(v, 0.0f);
        m.fc2.forward(ctx, h_view, compact::make_view(m.y.data(), batch, outputs));
        loss = 0;
        const float scale = 2.0f / static_cast<float>(batch * outputs);
        for (std::size_t i = 0; i < dy.size(); ++i) {
            const float r = m.y[i] - target[i];
            loss += static_cast<double>(r) * static_cast<double>(r) / static_cast<double>(dy.size());
            dy[i] = scale * r;
        }
        m.fc2.backward(ctx, compact::make_view(dy.data(), batch, outputs),
                       compact::make_view(m.dh.data(), batch, hidden));
        for (std::size_t i = 0; i < m.dh.size(); ++i)
            if (m.h[i] <= 0.0f) m.dh[i] = 0.0f;
        m.fc1.backward(ctx, compact::make_view(m.dh.data(), batch, hidden), {}); // dX not needed
        m.fc1.step(ctx, h);
        m.fc2.step(ctx, h);
    }
    return loss;
}

template <class T>
bool same_bits(compact::const_matrix_view<T> a, compact::const_matrix_view<T> b)
{
    return a.rows == b.rows && a.cols == b.cols &&
           std::memcmp(a.data, b.data, static_cast<std::size_t>(a.size()) * sizeof(T)) == 0;
}

bool same_state(const layer& a, const layer& b)
{
    const auto m = a.out();
    return same_bits(a.weight(), b.weight()) && same_bits<float>({a.bias(), 1, m}, {b.bias(), 1, m}) &&
           same_bits(a.first_moment(), b.first_moment()) && same_bits(a.second_moment(), b.second_moment()) &&
           same_bits<float>({a.bias_first_moment(), 1, m}, {b.bias_first_moment(), 1, m}) &&
           same_bits<float>({a.bias_second_moment(), 1, m}, {b.bias_second_moment(), 1, m}) &&
           a.updates() == b.updates() && a.counters().step == b.counters().step &&
           a.counters().epoch == b.counters().epoch && a.bias_counters().step == b.bias_counters().step;
}

} // namespace

int main(int argc, char** argv)
{
    std::string keep;
    for (int i = 1; i < argc; ++i) {
        const std::string arg = argv[i];
        if (arg == "--smoke") continue; // the run is already short
        if (arg == "--keep" && i + 1 < argc) {
            keep = argv[++i];
            continue;
        }
        std::fprintf(stderr, "usage: %s [--smoke] [--keep FILE]\n", argv[0]);
        return 2;
    }
    const std::string path =
        !keep.empty() ? keep
                      : (std::filesystem::temp_directory_path() /
                         ("compact-resume-" + std::to_string(static_cast<long long>(::getpid())) + ".ckpt"))
                            .string();
    try {
        std::vector<float> teacher(outputs * features);
        compact::fill_uniform(compact::make_view(teacher.data(), outputs, features), -0.25, 0.25, seed, 1);

        model straight(10);
        const double first_loss = train(straight, teacher, 0, 1);
        const double straight_loss = train(straight, teacher, 1, total_updates);

        {
            model first(10);
            train(first, teacher, 0, save_at);
            compact::save_checkpoint(path, first.fc1, first.fc2);
            std::printf("saved after %llu updates (epoch %llu of P) to %s\n",
                        static_cast<unsigned long long>(first.fc1.updates()),
                        static_cast<unsigned long long>(first.fc1.epoch()), path.c_str());
        }

        model resumed(20); // other initial weights: the checkpoint replaces them
        compact::load_checkpoint(path, resumed.fc1, resumed.fc2);
        std::printf("resumed at update %llu in new layers\n", static_cast<unsigned long long>(resumed.fc1.updates()));
        const double resumed_loss = train(resumed, teacher, save_at, total_updates);
        if (keep.empty()) std::filesystem::remove(path);

        const bool identical = same_state(straight.fc1, resumed.fc1) && same_state(straight.fc2, resumed.fc2);
        std::printf("loss: %.5f at the first update, %.5f after %llu straight, %.5f after %llu resumed\n", first_loss,
                    straight_loss, static_cast<unsigned long long>(total_updates), resumed_loss,
                    static_cast<unsigned long long>(total_updates));
        std::printf("final weights, biases, moments and counters bit-identical to the uninterrupted run: %s\n",
                    identical ? "yes" : "NO");
        return identical ? 0 : 1;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "resume_training: %s\n", e.what());
        if (keep.empty()) std::remove(path.c_str());
        return 1;
    }
}
