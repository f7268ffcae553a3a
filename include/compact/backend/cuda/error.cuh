// compact/backend/cuda/error.cuh: turning CUDA and cuBLAS failures into compact::error.
//
//   COMPACT_CUDA_CHECK(cudaMemcpyAsync(...), "cuda::copy");      // a runtime call
//   COMPACT_CUBLAS_CHECK(cublasGemmEx(...), "cuda::gemm");       // a cuBLAS call
//   detail::check_launch(stream, "cuda::fill");                  // right after a kernel launch
//
// The message names the function, the failing call and its code, e.g.
//   "cuda::gemm: cublasGemmEx(...) failed with CUBLAS_STATUS_INVALID_VALUE (7): an invalid value ...".
// Define COMPACT_DEBUG_SYNC to synchronise the stream after every launch, so that an asynchronous
// fault is reported by the launch that caused it (slow; for debugging only).
#pragma once

#include "compact/core/config.hpp"
#include "compact/core/error.hpp"

#include <cublas_v2.h>
#include <cuda_runtime.h>

COMPACT_NAMESPACE_BEGIN
namespace detail {

[[noreturn]] inline void raise_cuda(cudaError_t code, const char* where, const char* call)
{
    raise(concat(where, ": ", call, " failed with ", cudaGetErrorName(code), " (", static_cast<int>(code),
                 "): ", cudaGetErrorString(code)));
}

[[noreturn]] inline void raise_cublas(cublasStatus_t code, const char* where, const char* call)
{
    raise(concat(where, ": ", call, " failed with ", cublasGetStatusName(code), " (", static_cast<int>(code),
                 "): ", cublasGetStatusString(code)));
}

/// Checks the last launch on `stream` (and, with COMPACT_DEBUG_SYNC, waits for it to finish).
inline void check_launch(cudaStream_t stream, const char* where)
{
    const cudaError_t code = cudaGetLastError();
    if (code != cudaSuccess) raise_cuda(code, where, "kernel launch");
#if defined(COMPACT_DEBUG_SYNC)
    const cudaError_t sync = cudaStreamSynchronize(stream);
    if (sync != cudaSuccess) raise_cuda(sync, where, "kernel execution (COMPACT_DEBUG_SYNC)");
#else
    (void)stream;
#endif
}

} // namespace detail
COMPACT_NAMESPACE_END

/// Evaluates a CUDA runtime call; on failure raises compact::error naming `where`, the call and its code.
#define COMPACT_CUDA_CHECK(call, where)                                                                    \
    do {                                                                                                   \
        const cudaError_t compact_cuda_status_ = (call);                                                   \
        if (compact_cuda_status_ != cudaSuccess) ::compact::detail::raise_cuda(compact_cuda_status_, where, #call); \
    } while (false)

/// Evaluates a cuBLAS call; on failure raises compact::error naming `where`, the call and its status.
#define COMPACT_CUBLAS_CHECK(call, where)                                                                  \
    do {                                                                                                   \
        const cublasStatus_t compact_cublas_status_ = (call);                                              \
        if (compact_cublas_status_ != CUBLAS_STATUS_SUCCESS)                                               \
            ::compact::detail::raise_cublas(compact_cublas_status_, where, #call);                         \
    } while (false)
