// compact/backend/cuda/owned_context.cuh: an owning stream + cuBLAS handle, for examples and quick use.
//
//   compact::owned_cuda_context owner;              // a non-blocking stream, a handle bound to it and
//                                                   // a 32 MiB cuBLAS workspace (graph-capture safe)
//   layer.forward(owner.get(), x, y);               // cuda::context{stream, handle}
//   owner.synchronize();                            // waits for the stream
//
// Libraries that already own a stream and a handle build compact::cuda::context from them directly.
#pragma once

#include "compact/backend/cuda/cuda.cuh"
#include "compact/backend/cuda/device_buffer.cuh"
#include "compact/backend/cuda/error.cuh"
#include "compact/core/config.hpp"

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstddef>

COMPACT_NAMESPACE_BEGIN

class owned_cuda_context {
public:
    owned_cuda_context()
    {
        constexpr const char* where = "owned_cuda_context";
        COMPACT_CUDA_CHECK(cudaStreamCreateWithFlags(&ctx_.stream, cudaStreamNonBlocking), where);
        const cublasStatus_t status = cublasCreate(&ctx_.handle);
        if (status != CUBLAS_STATUS_SUCCESS) {
            cudaStreamDestroy(ctx_.stream);
            detail::raise_cublas(status, where, "cublasCreate(&handle)");
        }
        try {
            // The workspace is bound to the handle's current stream, so the stream is set first.
            COMPACT_CUBLAS_CHECK(cublasSetStream(ctx_.handle, ctx_.stream), where);
            cublas_workspace_.assign(cublas_workspace_bytes, std::byte{0});
            COMPACT_CUBLAS_CHECK(cublasSetWorkspace(ctx_.handle, cublas_workspace_.data(), cublas_workspace_.size()),
                                 where);
        } catch (...) {
            cublasDestroy(ctx_.handle);
            cudaStreamDestroy(ctx_.stream);
            throw;
        }
    }
    owned_cuda_context(const owned_cuda_context&) = delete;
    owned_cuda_context& operator=(const owned_cuda_context&) = delete;
    ~owned_cuda_context()
    {
        cublasDestroy(ctx_.handle);
        cudaStreamDestroy(ctx_.stream);
    }

    const cuda::context& get() const noexcept { return ctx_; }
    /// Waits until everything launched on the stream has finished; raises a pending device error.
    void synchronize() const { COMPACT_CUDA_CHECK(cudaStreamSynchronize(ctx_.stream), "owned_cuda_context::synchronize"); }

    /// cuBLAS's recommendation for Hopper; enough for earlier GPUs too.
    static constexpr std::size_t cublas_workspace_bytes = std::size_t{32} << 20;

private:
    cuda::context ctx_{};
    device_buffer<std::byte> cublas_workspace_; // freed after ~owned_cuda_context destroyed the handle
};

COMPACT_NAMESPACE_END
