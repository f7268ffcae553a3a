// compact/backend/cuda/owned_context.cuh: an owning stream + cuBLAS handle, for examples and quick use.
//
//   compact::owned_cuda_context owner;              // creates a non-blocking stream and a handle
//   layer.forward(owner.get(), x, y);               // cuda::context{stream, handle}
//   owner.synchronize();                            // waits for the stream
//
// Libraries that already own a stream and a handle build compact::cuda::context from them directly.
#pragma once

#include "compact/backend/cuda/cuda.cuh"
#include "compact/backend/cuda/error.cuh"
#include "compact/core/config.hpp"

#include <cublas_v2.h>
#include <cuda_runtime.h>

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

private:
    cuda::context ctx_{};
};

COMPACT_NAMESPACE_END
