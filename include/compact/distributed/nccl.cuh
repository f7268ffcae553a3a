// compact/distributed/nccl.cuh: the NCCL model of the communicator concept (distributed/communicator.hpp),
// for data_parallel<Scalar, nccl_communicator, compact::cuda>. Needs nvcc and nccl.h (NCCL >= 2.14: a
// non-blocking communicator; PyTorch's CUDA wheels and the CUDA toolkit's NCCL ship both).
//
//   ncclUniqueId id = compact::nccl_communicator::unique_id();     // on rank 0 ...
//   MPI_Bcast(&id, sizeof id, MPI_BYTE, 0, MPI_COMM_WORLD);         // ... shared out of band
//   compact::nccl_communicator comm(id, rank, ranks, device);       // collective over the ranks
//   data_parallel<float, compact::nccl_communicator, compact::cuda> dp(comm);
//
// start_all_reduce enqueues ncclAllReduce (in place, ncclSum, or ncclAvg for the mean) on the
// communicator's own stream after an event recorded on ctx.stream, so the reduction waits for the
// kernels that wrote the gradients and runs beside the backward kernels queued behind them; wait() makes
// ctx.stream wait for it (stream-ordered: no host synchronisation on the success path besides the poll).
// Every rank receives the same bits (each element is reduced once and broadcast) and a fixed topology
// gives the same bits run after run; the order of additions is NCCL's (reduction::native only).
//
// Failures: the communicator is created non-blocking (ncclConfig_t::blocking = 0), so that its creation
// and every reduction can be polled with a deadline: test() reads ncclCommGetAsyncError and the
// reduction's completion event; wait() raises compact::error when options.timeout passes or NCCL reports
// an asynchronous error, and abort() calls ncclCommAbort (which unblocks the GPU kernels) before
// std::abort (ending a multi-process job is the launcher's: run it under mpiexec or torchrun).
//
// Host buffers (the library's own uint64 agreement checks) are staged through a device buffer of the
// communicator and copied back before all_reduce returns.
#pragma once

#include "compact/core/config.hpp"
#include "compact/core/error.hpp"
#include "compact/distributed/communicator.hpp"

#include <cuda_runtime.h>
#include <nccl.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <utility>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#if !defined(NCCL_VERSION_CODE) || NCCL_VERSION_CODE < 21400
#error "compact/distributed/nccl.cuh needs NCCL 2.14 or newer (non-blocking communicators)"
#endif

COMPACT_NAMESPACE_BEGIN

namespace detail {

inline void check_nccl(ncclResult_t code, const char* where, const char* call)
{
    if (code == ncclSuccess || code == ncclInProgress) return;
    COMPACT_FAIL(where, call, " failed with NCCL error ", static_cast<int>(code), ": ", ncclGetErrorString(code));
}

inline void check_cuda_call(cudaError_t code, const char* where, const char* call)
{
    if (code == cudaSuccess) return;
    COMPACT_FAIL(where, call, " failed with CUDA error ", static_cast<int>(code), ": ", cudaGetErrorString(code));
}

template <class T>
ncclDataType_t nccl_datatype()
{
    if constexpr (std::is_same_v<T, float>) return ncclFloat32;
    else if constexpr (std::is_same_v<T, double>) return ncclFloat64;
    else if constexpr (std::is_same_v<T, std::uint64_t>) return ncclUint64;
#if defined(__CUDACC__)
    else if constexpr (std::is_same_v<T, __half>) return ncclFloat16;
    else if constexpr (std::is_same_v<T, __nv_bfloat16>) return ncclBfloat16;
#endif
    else static_assert(sizeof(T) == 0, "compact::nccl_communicator reduces float, double, __half, __nv_bfloat16 and uint64");
}

} // namespace detail

class nccl_communicator {
public:
    struct request {
        request() = default;
        request(const request&) = delete;
        request& operator=(const request&) = delete;
        request(request&& o) noexcept
            : done(std::exchange(o.done, nullptr)), caller(o.caller), pending(o.pending), count(o.count)
        {
        }
        request& operator=(request&& o) noexcept
        {
            std::swap(done, o.done);
            caller = o.caller;
            pending = o.pending;
            count = o.count;
            return *this;
        }
        ~request()
        {
            if (done) cudaEventDestroy(done);
        }

        cudaEvent_t done = nullptr; ///< recorded on the communicator's stream after the reduction
        cudaStream_t caller = nullptr;
        bool pending = false;
        std::size_t count = 0;
    };

    /// A fresh id for a new communicator: call on one rank and send it to the others.
    static ncclUniqueId unique_id()
    {
        ncclUniqueId id;
        detail::check_nccl(ncclGetUniqueId(&id), "nccl_communicator::unique_id", "ncclGetUniqueId");
        return id;
    }

    /// Joins communicator `id` as `rank` of `ranks` on CUDA device `device` (collective; bounded by
    /// options.timeout: a rank that never joins makes the others raise compact::error).
    nccl_communicator(const ncclUniqueId& id, int rank, int ranks, int device, const communicator_options& options = {})
        : options_(options), rank_(rank), size_(ranks), device_(device)
    {
        constexpr const char* where = "nccl_communicator";
        COMPACT_REQUIRE(ranks >= 1 && rank >= 0 && rank < ranks, where, "rank=", rank, " is not in [0, ranks=", ranks, ")");
        COMPACT_REQUIRE(options.algorithm == reduction::native, where,
                        "NCCL reduces in its own order: options.algorithm must be reduction::native");
        detail::check_cuda_call(cudaSetDevice(device), where, "cudaSetDevice");
        detail::check_cuda_call(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), where, "cudaStreamCreate");
        ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
        config.blocking = 0;
        detail::check_nccl(ncclCommInitRankConfig(&comm_, ranks, id, rank, &config), where, "ncclCommInitRankConfig");
        settle(where, "ncclCommInitRankConfig");
    }

    /// The one-rank communicator on `device` (for the 1-rank NCCL run that must equal a plain run).
    static nccl_communicator single(int device, const communicator_options& options = {})
    {
        return nccl_communicator(unique_id(), 0, 1, device, options);
    }

    nccl_communicator(const nccl_communicator&) = delete;
    nccl_communicator& operator=(const nccl_communicator&) = delete;
    nccl_communicator(nccl_communicator&& o) noexcept
        : options_(o.options_), comm_(std::exchange(o.comm_, nullptr)), stream_(std::exchange(o.stream_, nullptr)),
          ready_(std::exchange(o.ready_, nullptr)), staging_(std::exchange(o.staging_, nullptr)),
          staging_bytes_(std::exchange(o.staging_bytes_, 0)), rank_(o.rank_), size_(o.size_), device_(o.device_)
    {
    }
    ~nccl_communicator()
    {
        if (comm_) {
            ncclCommFinalize(comm_);
            const auto start = std::chrono::steady_clock::now();
            ncclResult_t state = ncclInProgress;
            while (ncclCommGetAsyncError(comm_, &state) == ncclSuccess && state == ncclInProgress &&
                   std::chrono::steady_clock::now() - start < options_.timeout) {
            }
            if (state == ncclSuccess)
                ncclCommDestroy(comm_);
            else
                ncclCommAbort(comm_);
        }
        if (ready_) cudaEventDestroy(ready_);
        if (staging_) cudaFree(staging_);
        if (stream_) cudaStreamDestroy(stream_);
    }

    int rank() const noexcept { return rank_; }
    int size() const noexcept { return size_; }
    ncclComm_t native_handle() const noexcept { return comm_; }
    cudaStream_t stream() const noexcept { return stream_; }

    /// Enqueues the in-place all-reduce of data[0, count) (device memory) after ctx.stream's work.
    template <class Context, class T>
    void start_all_reduce(const Context& ctx, T* data, std::size_t count, reduce_op op, request& r)
    {
        constexpr const char* where = "nccl_communicator::start_all_reduce";
        COMPACT_REQUIRE(!r.pending, where, "the request is still pending (wait for it first)");
        COMPACT_REQUIRE(count == 0 || data != nullptr, where, "data is null but count=", count);
        if (!ready_) detail::check_cuda_call(cudaEventCreateWithFlags(&ready_, cudaEventDisableTiming), where, "cudaEventCreate");
        if (!r.done) detail::check_cuda_call(cudaEventCreateWithFlags(&r.done, cudaEventDisableTiming), where, "cudaEventCreate");
        detail::check_cuda_call(cudaEventRecord(ready_, ctx.stream), where, "cudaEventRecord");
        detail::check_cuda_call(cudaStreamWaitEvent(stream_, ready_, 0), where, "cudaStreamWaitEvent");
        if (count > 0) {
            detail::check_nccl(ncclAllReduce(data, data, count, detail::nccl_datatype<T>(),
                                             op == reduce_op::mean ? ncclAvg : ncclSum, comm_, stream_),
                               where, "ncclAllReduce");
            settle(where, "ncclAllReduce");
        }
        detail::check_cuda_call(cudaEventRecord(r.done, stream_), where, "cudaEventRecord");
        r.caller = ctx.stream;
        r.count = count;
        r.pending = true;
    }

    /// True once the reduction has completed on the device (then ctx.stream is made to wait for it).
    bool test(request& r)
    {
        constexpr const char* where = "nccl_communicator::test";
        if (!r.pending) return true;
        ncclResult_t state = ncclSuccess;
        detail::check_nccl(ncclCommGetAsyncError(comm_, &state), where, "ncclCommGetAsyncError");
        detail::check_nccl(state, where, "a reduction (asynchronous error)");
        const cudaError_t e = cudaEventQuery(r.done);
        if (e == cudaErrorNotReady) return false;
        detail::check_cuda_call(e, where, "cudaEventQuery");
        detail::check_cuda_call(cudaStreamWaitEvent(r.caller, r.done, 0), where, "cudaStreamWaitEvent");
        r.pending = false;
        return true;
    }

    void wait(request& r)
    {
        if (detail::poll_until([&] { return test(r); }, options_.timeout)) return;
        COMPACT_FAIL("nccl_communicator::wait", "the all-reduce of ", r.count, " values did not complete within ",
                     options_.timeout.count(), " ms on rank ", rank_, " of ", size_,
                     ": another rank has died or hung; call abort()");
    }

    /// start_all_reduce and wait; `data` may be host memory (staged through a device buffer).
    template <class Context, class T>
    void all_reduce(const Context& ctx, T* data, std::size_t count, reduce_op op)
    {
        constexpr const char* where = "nccl_communicator::all_reduce";
        cudaPointerAttributes attributes{};
        detail::check_cuda_call(cudaPointerGetAttributes(&attributes, data), where, "cudaPointerGetAttributes");
        request r;
        if (attributes.type == cudaMemoryTypeDevice || attributes.type == cudaMemoryTypeManaged || count == 0) {
            start_all_reduce(ctx, data, count, op, r);
            wait(r);
        } else {
            const std::size_t bytes = count * sizeof(T);
            if (staging_bytes_ < bytes) {
                if (staging_) cudaFree(staging_);
                staging_ = nullptr;
                detail::check_cuda_call(cudaMalloc(&staging_, bytes), where, "cudaMalloc");
                staging_bytes_ = bytes;
            }
            T* device = static_cast<T*>(staging_);
            detail::check_cuda_call(cudaMemcpyAsync(device, data, bytes, cudaMemcpyHostToDevice, ctx.stream), where,
                                    "cudaMemcpyAsync");
            start_all_reduce(ctx, device, count, op, r);
            wait(r);
            detail::check_cuda_call(cudaMemcpyAsync(data, device, bytes, cudaMemcpyDeviceToHost, ctx.stream), where,
                                    "cudaMemcpyAsync");
            detail::check_cuda_call(cudaStreamSynchronize(ctx.stream), where, "cudaStreamSynchronize");
        }
    }

    [[noreturn]] void abort(int) noexcept
    {
        if (comm_) ncclCommAbort(comm_);
        comm_ = nullptr;
        std::abort();
    }

private:
    // A non-blocking communicator returns ncclInProgress from calls that are still being set up: poll
    // until they are, with the deadline.
    void settle(const char* where, const char* call)
    {
        ncclResult_t state = ncclInProgress;
        const bool done = detail::poll_until(
            [&] {
                detail::check_nccl(ncclCommGetAsyncError(comm_, &state), where, "ncclCommGetAsyncError");
                return state != ncclInProgress;
            },
            options_.timeout);
        COMPACT_REQUIRE(done, where, call, " did not complete within ", options_.timeout.count(), " ms on rank ", rank_,
                        " of ", size_, ": another rank has not joined or has died");
        detail::check_nccl(state, where, call);
    }

    communicator_options options_;
    ncclComm_t comm_ = nullptr;
    cudaStream_t stream_ = nullptr;
    cudaEvent_t ready_ = nullptr;
    void* staging_ = nullptr;
    std::size_t staging_bytes_ = 0;
    int rank_ = 0, size_ = 1, device_ = 0;
};

COMPACT_NAMESPACE_END
