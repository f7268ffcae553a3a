// A consumer of the installed compact::cuda target. It runs without a GPU: it instantiates a layer's
// type and checks host-side facts; with a device it also builds the layer and runs one training step.
#include <compact/cuda.cuh>

#include <cstdio>
#include <vector>

int main()
{
    using layer = compact::linear_layer<float, compact::rank::ratio<1, 4>, compact::cuda>;
    static_assert(compact::is_backend<compact::cuda>);
    if (!compact::cuda::device_available()) {
        std::printf("compact %s (%s): no device, host checks only: ok\n", COMPACT_VERSION_STRING,
                    compact::cuda::name);
        return 0;
    }
    const compact::owned_cuda_context owner;
    compact::linear_options options;
    options.seed = 1;
    options.max_rows = 8;
    layer l(compact::in_features{64}, compact::out_features{32}, options);
    compact::device_buffer<float> x(8 * 64, 0.5f), y(8 * 32, 0.0f), dy(8 * 32, 1.0f);
    l.forward(owner.get(), {x.data(), 8, 64}, {y.data(), 8, 32});
    l.backward(owner.get(), {dy.data(), 8, 32}, {});
    l.step(owner.get(), compact::adamw_params{});
    owner.synchronize();
    const bool ok = l.rank() == 16 && l.updates() == 1;
    std::printf("compact %s (%s): rank %lld: %s\n", COMPACT_VERSION_STRING, compact::cuda::name,
                static_cast<long long>(l.rank()), ok ? "ok" : "FAILED");
    return ok ? 0 : 1;
}
