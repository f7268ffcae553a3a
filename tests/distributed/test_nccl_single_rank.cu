// tests/distributed/test_nccl_single_rank.cu: a 1-rank NCCL data-parallel run of a CUDA linear layer
// equals the same training without data parallelism, bit for bit (the mean over one rank is the
// gradient itself). Skipped (exit 77) without a GPU. Built where nccl.h and libnccl are found.
#include <compact/cuda.cuh>
#include <compact/distributed/communicator.hpp>
#include <compact/distributed/data_parallel.hpp>
#include <compact/distributed/nccl.cuh>

#include <cstdio>
#include <memory>
#include <vector>

namespace {

using layer = compact::linear_layer<float, compact::rank::ratio<1, 4>, compact::cuda>;
constexpr compact::index_t n = 64, m = 32, rows = 16;

std::vector<float> train(const compact::cuda::context& ctx, compact::nccl_communicator* comm)
{
    compact::linear_options o;
    o.seed = 5;
    o.layer = 1;
    o.max_rows = rows;
    layer fc(compact::in_features{n}, compact::out_features{m}, o);
    std::vector<float> w0(static_cast<std::size_t>(m * n));
    compact::fill_uniform(compact::make_view(w0.data(), m, n), -0.1, 0.1, 5, 1);
    compact::cuda::copy_from_host(ctx, w0.data(), fc.weight().data, w0.size());
    std::vector<float> host_x(static_cast<std::size_t>(rows * n)), host_dy(static_cast<std::size_t>(rows * m));
    for (std::size_t i = 0; i < host_x.size(); ++i) host_x[i] = static_cast<float>((i * 37) % 101) / 101.0f - 0.5f;
    for (std::size_t i = 0; i < host_dy.size(); ++i) host_dy[i] = static_cast<float>((i * 53) % 89) / 89.0f - 0.5f;
    compact::device_buffer<float> x, y, dy;
    x.assign(host_x.size(), 0.0f);
    y.assign(host_dy.size(), 0.0f);
    dy.assign(host_dy.size(), 0.0f);
    compact::cuda::copy_from_host(ctx, host_x.data(), x.data(), host_x.size());
    compact::cuda::copy_from_host(ctx, host_dy.data(), dy.data(), host_dy.size());
    std::unique_ptr<compact::data_parallel<float, compact::nccl_communicator, compact::cuda>> dp;
    std::size_t group = 0;
    if (comm) {
        dp = std::make_unique<compact::data_parallel<float, compact::nccl_communicator, compact::cuda>>(*comm);
        group = dp->add(fc);
        dp->check_layout(ctx);
    }
    for (int step = 0; step < 3; ++step) {
        fc.forward(ctx, compact::make_view<const float>(x.data(), rows, n), compact::make_view(y.data(), rows, m));
        fc.backward(ctx, compact::make_view<const float>(dy.data(), rows, m), {});
        if (dp) {
            dp->ready(ctx, group);
            dp->finish(ctx);
        }
        fc.step(ctx, compact::adamw_params{});
    }
    std::vector<float> w(static_cast<std::size_t>(m * n));
    compact::cuda::copy_to_host(ctx, fc.weight().data, w.data(), w.size());
    cudaStreamSynchronize(ctx.stream);
    return w;
}

} // namespace

int main()
{
    if (!compact::cuda::device_available()) {
        std::printf("no CUDA device: skipped\n");
        return 77;
    }
    try {
        compact::owned_cuda_context owner;
        auto comm = compact::nccl_communicator::single(0, [] {
            compact::communicator_options o;
            o.algorithm = compact::reduction::native;
            return o;
        }());
        const std::vector<float> plain = train(owner.get(), nullptr), nccl = train(owner.get(), &comm);
        if (plain != nccl) {
            std::printf("FAIL: the 1-rank NCCL run differs from the plain run\n");
            return 1;
        }
        std::printf("1-rank NCCL run equals the plain run bit for bit (%zu weights)\n", plain.size());
        return 0;
    } catch (const std::exception& e) {
        std::printf("FAIL: %s\n", e.what());
        return 1;
    }
}
