// torch_fashion_mnist: a libtorch MLP (784-1024-1024-10) on Fashion-MNIST, trained twice on the same
// data from the same initial weights: with torch::nn::Linear, torch::relu and torch::optim::AdamW, then
// with compact::torch::Linear, compact::torch::ReLU (1-bit masks) and compact::torch::SubspaceAdamW. The
// two hidden layers keep Z = X P at r = n/4 (a new P every 50 optimizer updates: --resample T); the output
// layer keeps its input at 8 bits (as many bytes as Z at r = n/4) and trains on its exact gradient
// (--head project: projected like the others). Prints, for each model, the test accuracy, the time per
// training step, and the bytes the autograd graph keeps for backward (found by walking the graph:
// compact::torch::saved_for_backward).
//
// Data: Debian's dataset-fashion-mnist (/usr/share/datasets/fashion-mnist, gzip'd IDX files, read with
// `gzip -dc`), or --data DIR. --smoke: a few steps on random data when the files are absent (CTest).
// --validation: train on the first 50,000 training images and report the accuracy on the last 10,000
// instead of the test set (for choosing settings without looking at the test set).
//
// Usage: torch_fashion_mnist [--epochs E] [--batch N] [--threads T] [--seed S] [--resample T]
//                            [--lr-compressed X] [--alpha A] [--moments keep|reset|transfer]
//                            [--head int8|project] [--validation] [--data DIR] [--smoke]
// (--lr-compressed, --alpha: the projected weights' learning rate and subspace scale, default the paper's
// 1e-2 and 0.25; --moments: what their Adam moments do when P changes, default reset. --seed: the initial
// weights and the order of the batches, the same for both models.)
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

// --head int8 (default): the output layer keeps its input at 8 bits (1 byte a value, as many bytes as Z at
// r = n/4 in float) and so trains on its exact gradient; the CompAct paper too projects only the layers
// inside a model's attention and MLP blocks, not its head.
using int8_head = ct::Linear<compact::quantized>;
const compact::quantized int8_input{compact::store_scheme::quantized(8, 256)};

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

// The two models differ only in their layer types: Hidden for fc1 and fc2, Head for fc3.
template <class Hidden, class Head, class ReLU>
struct Mlp : torch::nn::Module {
    Mlp() : fc1(make<Hidden>(784, 1024)), fc2(make<Hidden>(1024, 1024)), fc3(make<Head>(1024, 10))
    {
        register_module("fc1", fc1), register_module("fc2", fc2), register_module("fc3", fc3);
    }
    template <class L>
    static L make(int64_t n, int64_t m)
    {
        if constexpr (std::is_same_v<L, torch::nn::Linear>) return L(torch::nn::LinearOptions(n, m));
        else if constexpr (std::is_same_v<L, int8_head>) return L(ct::LinearOptions(n, m), int8_input);
        else return L(ct::LinearOptions(n, m).seed(42).resample_gap(resample_gap));
    }
    torch::Tensor forward(torch::Tensor x)
    {
        x = relu(fc1(x));
        x = relu(fc2(x));
        return torch::log_softmax(fc3(x), 1);
    }
    Hidden fc1, fc2;
    Head fc3;
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
             int64_t max_steps, std::uint64_t seed)
{
    result r;
    const int64_t count = train_set.images.size(0);
    double seconds = 0;
    int64_t steps = 0;
    for (int epoch = 0; epoch < epochs && steps < max_steps; ++epoch) {
        torch::manual_seed(1000 * seed + epoch); // the same batches for both models
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

int run(int argc, char** argv)
{
    int epochs = 10, threads = 0;
    int64_t batch = 256, max_steps = INT64_MAX;
    double lr_compressed = 1e-2, alpha = 0.25; // the paper's, for the compressed weights
    std::uint64_t seed = 7;
    bool smoke = false, validation = false, head_int8 = true;
    compact::moment_policy moments = compact::moment_policy::reset; // chosen on the validation split
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
        else if (a == "--seed") seed = std::stoull(next());
        else if (a == "--validation") validation = true;
        else if (a == "--head") {
            const std::string h = next();
            if (h != "int8" && h != "project") throw std::runtime_error("--head is '" + h + "'; expected int8 or project");
            head_int8 = h == "int8";
        } else if (a == "--moments") {
            const std::string m = next();
            if (m == "keep") moments = compact::moment_policy::keep;
            else if (m == "reset") moments = compact::moment_policy::reset;
            else if (m == "transfer") moments = compact::moment_policy::transfer;
            else throw std::runtime_error("--moments is '" + m + "'; expected keep, reset or transfer");
        } else if (a == "--smoke") smoke = true;
        else {
            std::fprintf(stderr, "usage: %s [--epochs E] [--batch N] [--threads T] [--seed S] [--resample T] "
                                 "[--lr-compressed X] [--alpha A] [--moments keep|reset|transfer] [--head int8|project] "
                                 "[--validation] [--data DIR] [--smoke]\n", argv[0]);
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
    if (validation) { // tune on the last 10,000 training images; the test set stays unseen
        const int64_t held = std::min<int64_t>(10000, train_set.images.size(0) / 6);
        const int64_t kept = train_set.images.size(0) - held;
        test_set = {train_set.images.narrow(0, kept, held), train_set.labels.narrow(0, kept, held)};
        train_set = {train_set.images.narrow(0, 0, kept), train_set.labels.narrow(0, 0, kept)};
    }
    if (epochs < 1) throw std::runtime_error("--epochs is " + std::to_string(epochs) + "; expected at least 1");
    if (batch < 1 || batch > train_set.images.size(0))
        throw std::runtime_error("--batch is " + std::to_string(batch) + "; expected 1 to the " +
                                 std::to_string(train_set.images.size(0)) + " training images");
    if (smoke) {
        epochs = 1, max_steps = 4;
        test_set = {test_set.images.narrow(0, 0, 1000 < test_set.images.size(0) ? 1000 : test_set.images.size(0)),
                    test_set.labels.narrow(0, 0, 1000 < test_set.labels.size(0) ? 1000 : test_set.labels.size(0))};
    }
    std::printf("torch_fashion_mnist: %lld training images, batch %lld, %d epoch(s), %d thread(s), seed %llu, "
                "head %s, moments %s\n",
                static_cast<long long>(train_set.images.size(0)), static_cast<long long>(batch), epochs,
                torch::get_num_threads(), static_cast<unsigned long long>(seed), head_int8 ? "int8" : "project",
                compact::to_string(moments));

    torch::manual_seed(seed);
    Mlp<torch::nn::Linear, torch::nn::Linear, torch_relu> reference;
    torch::optim::AdamW reference_opt(reference.parameters(), torch::optim::AdamWOptions(1e-3).weight_decay(0));
    const result a = train(reference, reference_opt, train_set, test_set, epochs, batch, max_steps, seed);

    // Projected weights: the paper's lr 1e-2 with the subspace scale alpha 0.25; every parameter trained on
    // its exact gradient (biases, an int8 head) takes the reference's lr 1e-3.
    const auto run_compressed = [&](auto& model) {
        std::vector<torch::Tensor> projected{model.fc1->weight, model.fc2->weight};
        std::vector<torch::Tensor> exact{model.fc1->bias, model.fc2->bias, model.fc3->bias};
        (head_int8 ? exact : projected).push_back(model.fc3->weight);
        std::vector<torch::optim::OptimizerParamGroup> groups;
        groups.emplace_back(projected, std::make_unique<ct::SubspaceAdamWOptions>(
                                           ct::SubspaceAdamWOptions(lr_compressed).alpha(alpha).moments(moments)));
        groups.emplace_back(exact, std::make_unique<ct::SubspaceAdamWOptions>(ct::SubspaceAdamWOptions(1e-3)));
        ct::SubspaceAdamW opt(std::move(groups));
        return train(model, opt, train_set, test_set, epochs, batch, max_steps, seed);
    };
    using hidden = ct::Linear<compact::rank::ratio<1, 4>>;
    torch::manual_seed(seed);
    result b;
    if (head_int8) {
        Mlp<hidden, int8_head, ct::ReLU> compressed;
        b = run_compressed(compressed);
    } else {
        Mlp<hidden, hidden, ct::ReLU> compressed;
        b = run_compressed(compressed);
    }

    std::printf("\n| model | %s accuracy | step time | saved for backward |\n|---|---|---|---|\n",
                validation ? "validation" : "test");
    std::printf("| nn::Linear + AdamW | %.2f%% | %.2f ms | %zu bytes%s |\n", a.accuracy, a.step_ms, a.saved,
                a.complete ? "" : " (incomplete)");
    std::printf("| compact r = n/4%s + masks + SubspaceAdamW | %.2f%% | %.2f ms | %zu bytes%s |\n",
                head_int8 ? ", int8 head" : "", b.accuracy, b.step_ms, b.saved, b.complete ? "" : " (incomplete)");
    std::printf("\nratios compact / nn::Linear: saved bytes %.3f, step time %.3f; accuracy %+.2f points\n",
                double(b.saved) / double(a.saved), b.step_ms / a.step_ms, b.accuracy - a.accuracy);
    return 0;
}

int main(int argc, char** argv)
{
    try {
        return run(argc, argv);
    } catch (const std::exception& e) { // a bad option value, or compact's own errors
        std::fprintf(stderr, "torch_fashion_mnist: %s\n", e.what());
        return 1;
    }
}
