// torch_fashion_mnist: a libtorch MLP (784-1024-1024-10) on Fashion-MNIST, trained twice on the same
// data: with torch::nn::Linear, torch::relu and torch::optim::AdamW, then with compact::torch::Linear
// (r = n/4, a new P every 50 optimizer updates: --resample T), compact::torch::ReLU (1-bit masks) and
// compact::torch::SubspaceAdamW. Prints, for each, the test accuracy, the time per training step, and the
// bytes the autograd graph keeps for backward (found by walking the graph:
// compact::torch::saved_for_backward).
//
// Data: Debian's dataset-fashion-mnist (/usr/share/datasets/fashion-mnist, gzip'd IDX files, read with
// `gzip -dc`), or --data DIR. --smoke: a few steps on random data when the files are absent (CTest).
//
// Usage: torch_fashion_mnist [--epochs E] [--batch N] [--threads T] [--resample T] [--lr-compressed X]
//                            [--alpha A] [--data DIR] [--smoke]
// (--lr-compressed, --alpha: the compressed weights' learning rate and subspace scale; default the
// paper's 1e-2 and 0.25.)
#include <compact/torch.hpp>

#include <torch/torch.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace ct = compact::torch;

namespace {

// Optimizer updates between two projections of a compressed layer (--resample).
std::uint64_t resample_gap = 50;

struct split {
    torch::Tensor images; // (count, 784) float in [0, 1]
    torch::Tensor labels; // (count) int64
};

std::vector<unsigned char> gunzip(const std::string& path)
{
    std::FILE* f = popen(("gzip -dc '" + path + "' 2>/dev/null").c_str(), "r");
    if (!f) throw std::runtime_error("cannot run gzip on " + path);
    std::vector<unsigned char> bytes;
    unsigned char buffer[1 << 16];
    for (std::size_t got; (got = std::fread(buffer, 1, sizeof buffer, f)) > 0;) bytes.insert(bytes.end(), buffer, buffer + got);
    if (pclose(f) != 0 || bytes.size() < 16) throw std::runtime_error("cannot read " + path);
    return bytes;
}

split load(const std::string& dir, const std::string& prefix)
{
    const auto images = gunzip(dir + "/" + prefix + "-images-idx3-ubyte.gz");
    const auto labels = gunzip(dir + "/" + prefix + "-labels-idx1-ubyte.gz");
    const int64_t count = static_cast<int64_t>(labels.size() - 8);
    if (images.size() != static_cast<std::size_t>(16 + count * 784)) throw std::runtime_error("bad IDX files in " + dir);
    split s;
    s.images = torch::from_blob(const_cast<unsigned char*>(images.data()) + 16, {count, 784}, torch::kUInt8)
                   .to(torch::kFloat)
                   .div_(255.0);
    s.labels = torch::from_blob(const_cast<unsigned char*>(labels.data()) + 8, {count}, torch::kUInt8).to(torch::kInt64);
    return s;
}

// The two models differ only in their layer types.
template <class Linear, class ReLU>
struct Mlp : torch::nn::Module {
    Mlp() : fc1(make<Linear>(784, 1024)), fc2(make<Linear>(1024, 1024)), fc3(make<Linear>(1024, 10))
    {
        register_module("fc1", fc1), register_module("fc2", fc2), register_module("fc3", fc3);
    }
    template <class L>
    static L make(int64_t n, int64_t m)
    {
        if constexpr (std::is_same_v<L, torch::nn::Linear>) return L(torch::nn::LinearOptions(n, m));
        else return L(ct::LinearOptions(n, m).seed(42).resample_gap(resample_gap));
    }
    torch::Tensor forward(torch::Tensor x)
    {
        x = relu(fc1(x));
        x = relu(fc2(x));
        return torch::log_softmax(fc3(x), 1);
    }
    Linear fc1, fc2, fc3;
    ReLU relu;
};

struct torch_relu {
    torch::Tensor operator()(const torch::Tensor& x) const { return torch::relu(x); }
};

struct result {
    double accuracy = 0, step_ms = 0;
    std::size_t saved = 0;
    bool complete = true;
};

template <class Model, class Optimizer>
result train(Model& model, Optimizer& opt, const split& train_set, const split& test_set, int epochs, int64_t batch,
             int64_t max_steps)
{
    result r;
    const int64_t count = train_set.images.size(0);
    double seconds = 0;
    int64_t steps = 0;
    for (int epoch = 0; epoch < epochs && steps < max_steps; ++epoch) {
        torch::manual_seed(1000 + epoch); // the same batches for both models
        const auto order = torch::randperm(count);
        for (int64_t start = 0; start + batch <= count && steps < max_steps; start += batch, ++steps) {
            const auto index = order.narrow(0, start, batch);
            const auto x = train_set.images.index_select(0, index), y = train_set.labels.index_select(0, index);
            const auto t0 = std::chrono::steady_clock::now();
            opt.zero_grad();
            auto loss = torch::nll_loss(model.forward(x), y);
            if (steps == 0) {
                const auto report = ct::saved_for_backward(loss);
                r.saved = report.activation_bytes;
                r.complete = report.unknown.empty();
            }
            loss.backward();
            opt.step();
            seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        }
    }
    r.step_ms = 1e3 * seconds / static_cast<double>(std::max<int64_t>(steps, 1));
    torch::NoGradGuard guard;
    model.eval();
    const auto predicted = model.forward(test_set.images).argmax(1);
    r.accuracy = 100.0 * predicted.eq(test_set.labels).sum().template item<double>() / static_cast<double>(test_set.labels.size(0));
    model.train();
    return r;
}

} // namespace

int main(int argc, char** argv)
{
    int epochs = 2, threads = 0;
    int64_t batch = 256, max_steps = INT64_MAX;
    double lr_compressed = 1e-2, alpha = 0.25; // the paper's, for the compressed weights
    bool smoke = false;
    std::string data = "/usr/share/datasets/fashion-mnist";
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        auto next = [&] {
            if (i + 1 >= argc) throw std::runtime_error(a + " needs a value");
            return std::string(argv[++i]);
        };
        if (a == "--epochs") epochs = std::stoi(next());
        else if (a == "--batch") batch = std::stoll(next());
        else if (a == "--threads") threads = std::stoi(next());
        else if (a == "--data") data = next();
        else if (a == "--resample") resample_gap = std::stoull(next());
        else if (a == "--lr-compressed") lr_compressed = std::stod(next());
        else if (a == "--alpha") alpha = std::stod(next());
        else if (a == "--smoke") smoke = true;
        else {
            std::fprintf(stderr, "usage: %s [--epochs E] [--batch N] [--threads T] [--resample T] [--lr-compressed X] [--alpha A] "
                                 "[--data DIR] [--smoke]\n", argv[0]);
            return 2;
        }
    }
    if (threads > 0) torch::set_num_threads(threads);
    split train_set, test_set;
    try {
        train_set = load(data, "train");
        test_set = load(data, "t10k");
    } catch (const std::exception& e) {
        if (!smoke) {
            std::fprintf(stderr, "torch_fashion_mnist: %s (install dataset-fashion-mnist or pass --data)\n", e.what());
            return 1;
        }
        torch::manual_seed(0);
        train_set = {torch::rand({4 * batch, 784}), torch::randint(10, {4 * batch})};
        test_set = {torch::rand({batch, 784}), torch::randint(10, {batch})};
    }
    if (smoke) {
        epochs = 1, max_steps = 4;
        test_set = {test_set.images.narrow(0, 0, 1000 < test_set.images.size(0) ? 1000 : test_set.images.size(0)),
                    test_set.labels.narrow(0, 0, 1000 < test_set.labels.size(0) ? 1000 : test_set.labels.size(0))};
    }
    std::printf("torch_fashion_mnist: %lld training images, batch %lld, %d epoch(s), %d thread(s)\n",
                static_cast<long long>(train_set.images.size(0)), static_cast<long long>(batch), epochs,
                torch::get_num_threads());

    torch::manual_seed(7);
    Mlp<torch::nn::Linear, torch_relu> reference;
    torch::optim::AdamW reference_opt(reference.parameters(), torch::optim::AdamWOptions(1e-3).weight_decay(0));
    const result a = train(reference, reference_opt, train_set, test_set, epochs, batch, max_steps);

    torch::manual_seed(7);
    Mlp<ct::Linear<compact::rank::ratio<1, 4>>, ct::ReLU> compressed;
    // Compressed weights: the paper's lr 1e-2 with the subspace scale alpha 0.25; biases: lr 1e-3.
    std::vector<torch::optim::OptimizerParamGroup> groups;
    groups.emplace_back(std::vector<torch::Tensor>{compressed.fc1->weight, compressed.fc2->weight, compressed.fc3->weight},
                        std::make_unique<ct::SubspaceAdamWOptions>(ct::SubspaceAdamWOptions(lr_compressed).alpha(alpha)));
    groups.emplace_back(std::vector<torch::Tensor>{compressed.fc1->bias, compressed.fc2->bias, compressed.fc3->bias},
                        std::make_unique<ct::SubspaceAdamWOptions>(ct::SubspaceAdamWOptions(1e-3)));
    ct::SubspaceAdamW compressed_opt(std::move(groups));
    const result b = train(compressed, compressed_opt, train_set, test_set, epochs, batch, max_steps);

    std::printf("\n| model | test accuracy | step time | saved for backward |\n|---|---|---|---|\n");
    std::printf("| nn::Linear + AdamW | %.2f%% | %.2f ms | %zu bytes%s |\n", a.accuracy, a.step_ms, a.saved,
                a.complete ? "" : " (incomplete)");
    std::printf("| compact r = n/4 + masks + SubspaceAdamW | %.2f%% | %.2f ms | %zu bytes%s |\n", b.accuracy, b.step_ms,
                b.saved, b.complete ? "" : " (incomplete)");
    std::printf("\nratios compact / nn::Linear: saved bytes %.3f, step time %.3f; accuracy %+.2f points\n",
                double(b.saved) / double(a.saved), b.step_ms / a.step_ms, b.accuracy - a.accuracy);
    return 0;
}
