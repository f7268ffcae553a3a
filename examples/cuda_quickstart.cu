// cuda_quickstart: the core loop of examples/quickstart.cpp on a GPU, through compact::cuda.
//
//   X (N, 256) -> fc1 -> H (N, 512) -> ReLU -> fc2 -> logits (N, 10) -> softmax cross-entropy
//
// Labels come from a fixed random "teacher" network, as in quickstart (here sampled on the host and
// copied to the device each step). The model is trained twice from the same initial weights on the
// same batches: rank::full (P = I, exactly uncompressed AdamW) and rank::ratio<1, 4> (r = n/4, the
// paper's pretraining recipe: lr 1e-2, alpha = 0.25, a new P every 50 updates). ReLU and the loss are
// three small kernels of this file; everything else is compact::linear_layer on the cuda backend, whose
// forward, backward and step launch on the context's stream and never allocate or synchronise.
//
// Usage: cuda_quickstart [--steps S] [--smoke]. Exits 77 (skipped) when no CUDA device is present.
#include <compact/cuda.cuh>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <type_traits>
#include <vector>

namespace {

constexpr compact::index_t features = 256;
constexpr compact::index_t hidden = 512;
constexpr compact::index_t classes = 10;
constexpr compact::index_t teacher_hidden = 8;

__global__ void relu_kernel(float* h, compact::index_t count)
{
    const compact::index_t k = blockIdx.x * static_cast<compact::index_t>(blockDim.x) + threadIdx.x;
    if (k < count && h[k] < 0.0f) h[k] = 0.0f;
}

// dH = dH where H > 0, else 0.
__global__ void relu_backward_kernel(const float* h, float* dh, compact::index_t count)
{
    const compact::index_t k = blockIdx.x * static_cast<compact::index_t>(blockDim.x) + threadIdx.x;
    if (k < count && !(h[k] > 0.0f)) dh[k] = 0.0f;
}

// One thread per row: loss[i] = -log softmax(logits_i)[label_i]; dlogits_i = (softmax - onehot) / N.
__global__ void cross_entropy_kernel(const float* logits, const int* label, float* dlogits, float* loss,
                                     compact::index_t rows)
{
    const compact::index_t i = blockIdx.x * static_cast<compact::index_t>(blockDim.x) + threadIdx.x;
    if (i >= rows) return;
    const float* z = logits + i * classes;
    float top = z[0];
    for (int c = 1; c < classes; ++c) top = fmaxf(top, z[c]);
    float sum = 0.0f;
    for (int c = 0; c < classes; ++c) sum += expf(z[c] - top);
    loss[i] = logf(sum) - (z[label[i]] - top);
    const float scale = 1.0f / static_cast<float>(rows);
    for (int c = 0; c < classes; ++c)
        dlogits[i * classes + c] = (expf(z[c] - top) / sum - (c == label[i] ? 1.0f : 0.0f)) * scale;
}

unsigned blocks(compact::index_t count) { return static_cast<unsigned>((count + 255) / 256); }

// X ~ U[-1, 1), label ~ softmax(relu(X T1^T) T2^T), on the host.
struct teacher {
    std::uint64_t seed;
    std::vector<float> t1, t2; // (8, 256), (10, 8)

    explicit teacher(std::uint64_t s)
        : seed(s), t1(static_cast<std::size_t>(teacher_hidden * features)),
          t2(static_cast<std::size_t>(classes * teacher_hidden))
    {
        const double b1 = std::sqrt(3.0 / static_cast<double>(features));
        compact::fill_uniform(compact::make_view(t1.data(), teacher_hidden, features), -b1, b1, seed, 1);
        compact::fill_uniform(compact::make_view(t2.data(), classes, teacher_hidden), -3.0, 3.0, seed, 2);
    }

    void sample(std::uint64_t index, compact::index_t rows, std::vector<float>& x, std::vector<int>& label) const
    {
        std::vector<float> u(static_cast<std::size_t>(rows));
        x.resize(static_cast<std::size_t>(rows * features));
        label.resize(static_cast<std::size_t>(rows));
        compact::fill_uniform(compact::make_view(x.data(), rows, features), -1.0, 1.0, seed, 1000 + 2 * index);
        compact::fill_uniform(compact::make_view(u.data(), rows, compact::index_t{1}), 0.0, 1.0, seed,
                              1000 + 2 * index + 1);
        for (compact::index_t i = 0; i < rows; ++i) {
            double h[teacher_hidden], p[classes], top = -1e300, sum = 0;
            for (compact::index_t t = 0; t < teacher_hidden; ++t) {
                double a = 0;
                for (compact::index_t f = 0; f < features; ++f)
                    a += static_cast<double>(x[i * features + f]) * t1[t * features + f];
                h[t] = a > 0 ? a : 0;
            }
            for (compact::index_t c = 0; c < classes; ++c) {
                p[c] = 0;
                for (compact::index_t t = 0; t < teacher_hidden; ++t) p[c] += h[t] * t2[c * teacher_hidden + t];
                top = p[c] > top ? p[c] : top;
            }
            for (double& v : p) sum += (v = std::exp(v - top));
            int c = 0;
            double cdf = p[0] / sum;
            while (c + 1 < classes && u[i] >= cdf) cdf += p[++c] / sum;
            label[i] = c;
        }
    }
};

template <class Layer>
void init_uniform(Layer& layer, std::uint64_t seed, std::uint64_t stream)
{
    // PyTorch's default: U(-1/sqrt(n), 1/sqrt(n)) for W and b, generated on the host and copied.
    const double bound = 1.0 / std::sqrt(static_cast<double>(layer.in()));
    std::vector<float> w(static_cast<std::size_t>(layer.out() * layer.in())), b(static_cast<std::size_t>(layer.out()));
    compact::fill_uniform(compact::make_view(w.data(), layer.out(), layer.in()), -bound, bound, seed, stream);
    compact::fill_uniform(compact::make_view(b.data(), compact::index_t{1}, layer.out()), -bound, bound, seed,
                          stream + 1);
    compact::copy_to_device(layer.weight().data, w.data(), w.size());
    compact::copy_to_device(layer.bias(), b.data(), b.size());
}

template <class Policy>
double train(const char* name, int steps, compact::index_t batch, const teacher& data,
             const compact::owned_cuda_context& owner)
{
    constexpr bool compressed = !std::is_same_v<Policy, compact::rank::full>;
    const compact::cuda::context& ctx = owner.get();
    compact::device_buffer<float> x(static_cast<std::size_t>(batch * features), 0.0f);       // (N, 256)
    compact::device_buffer<float> h(static_cast<std::size_t>(batch * hidden), 0.0f);         // (N, 512)
    compact::device_buffer<float> dh(static_cast<std::size_t>(batch * hidden), 0.0f);        // (N, 512)
    compact::device_buffer<float> logits(static_cast<std::size_t>(batch * classes), 0.0f);   // (N, 10)
    compact::device_buffer<float> dlogits(static_cast<std::size_t>(batch * classes), 0.0f);  // (N, 10)
    compact::device_buffer<float> loss(static_cast<std::size_t>(batch), 0.0f);               // (N)
    compact::device_buffer<int> label(static_cast<std::size_t>(batch), 0);                   // (N)

    compact::linear_options options;
    options.seed = 2024;
    options.max_rows = batch;
    options.resample.gap = 50;
    options.layer = 1;
    compact::linear_layer<float, Policy, compact::cuda> fc1(compact::in_features{features},
                                                            compact::out_features{hidden}, options);
    options.layer = 2;
    compact::linear_layer<float, Policy, compact::cuda> fc2(compact::in_features{hidden},
                                                            compact::out_features{classes}, options);
    init_uniform(fc1, options.seed, 10);
    init_uniform(fc2, options.seed, 12);
    compact::adamw_params hyper;
    hyper.lr = compressed ? 1e-2 : 1e-3;
    hyper.alpha = compressed ? 0.25 : 1.0;

    std::vector<float> hx, hloss(static_cast<std::size_t>(batch));
    std::vector<int> hlabel;
    double last = 0;
    for (int step = 0; step < steps; ++step) {
        data.sample(static_cast<std::uint64_t>(step + 1), batch, hx, hlabel);
        owner.synchronize(); // the previous step has finished reading x and label
        compact::copy_to_device(x.data(), hx.data(), hx.size());
        compact::copy_to_device(label.data(), hlabel.data(), hlabel.size());

        fc1.forward(ctx, {x.data(), batch, features}, {h.data(), batch, hidden}); // keeps Z1 = X P1
        relu_kernel<<<blocks(batch * hidden), 256, 0, ctx.stream>>>(h.data(), batch * hidden);
        fc2.forward(ctx, {h.data(), batch, hidden}, {logits.data(), batch, classes}); // keeps Z2 = H P2
        cross_entropy_kernel<<<blocks(batch), 256, 0, ctx.stream>>>(logits.data(), label.data(), dlogits.data(),
                                                                    loss.data(), batch);
        fc2.backward(ctx, {dlogits.data(), batch, classes}, {dh.data(), batch, hidden});
        relu_backward_kernel<<<blocks(batch * hidden), 256, 0, ctx.stream>>>(h.data(), dh.data(), batch * hidden);
        fc1.backward(ctx, {dh.data(), batch, hidden}, {});
        fc1.step(ctx, hyper);
        fc2.step(ctx, hyper);
        COMPACT_CUDA_CHECK(cudaGetLastError(), "cuda_quickstart");

        if (step % 100 == 0 || step + 1 == steps) {
            owner.synchronize();
            compact::copy_to_host(hloss.data(), loss.data(), hloss.size());
            double sum = 0;
            for (float l : hloss) sum += l;
            last = sum / static_cast<double>(batch);
            std::printf("%-16s step %4d  loss %.4f\n", name, step, last);
        }
    }
    std::printf("%-16s r1=%lld r2=%lld  saved activations %zu bytes, optimizer state %zu bytes\n", name,
                static_cast<long long>(fc1.rank()), static_cast<long long>(fc2.rank()),
                fc1.saved_bytes(batch) + fc2.saved_bytes(batch), fc1.state_bytes() + fc2.state_bytes());
    return last;
}

} // namespace

int main(int argc, char** argv)
{
    int steps = 600;
    compact::index_t batch = 256;
    for (int i = 1; i < argc; ++i) {
        if (std::strcmp(argv[i], "--smoke") == 0) steps = 20, batch = 64;
        else if (std::strcmp(argv[i], "--steps") == 0 && i + 1 < argc) steps = std::atoi(argv[++i]);
        else {
            std::fprintf(stderr, "usage: cuda_quickstart [--steps S] [--smoke]\n");
            return 2;
        }
    }
    if (!compact::cuda::device_available()) {
        std::printf("cuda_quickstart: no CUDA device, skipped\n");
        return 77;
    }
    try {
        const compact::owned_cuda_context owner;
        const teacher data(2024);
        const double full = train<compact::rank::full>("full", steps, batch, data, owner);
        const double quarter = train<compact::rank::ratio<1, 4>>("ratio<1,4>", steps, batch, data, owner);
        std::printf("final loss: full %.4f, r = n/4 %.4f (%.1f%% apart)\n", full, quarter,
                    100.0 * (quarter - full) / full);
        return std::isfinite(full) && std::isfinite(quarter) ? 0 : 1;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "cuda_quickstart: %s\n", e.what());
        return 1;
    }
}
