// compact/distributed/communicator.hpp: the communicator concept of data-parallel training (SPEC
// section 11), and what its models share. No MPI or NCCL here: this header compiles everywhere.
//
// A communicator reduces a contiguous buffer across the ranks of a group, in place:
//
//   struct my_communicator {
//       using request = ...;                       // a pending reduction; default-constructible, reused:
//                                                  // it keeps its scratch memory between reductions
//       int rank() const;                          // this process's index in [0, size())
//       int size() const;                          // R
//       // Starts data[0, count) <- the sum or the mean over the ranks of their data[0, count). The
//       // buffer belongs to the reduction until test() returns true or wait() returns. `ctx` is the
//       // backend's context: its stream orders the reduction after the kernels that wrote data (NCCL);
//       // a host communicator (MPI) ignores it and needs host memory.
//       template <class Context, class T>
//       void start_all_reduce(const Context& ctx, T* data, std::size_t count, reduce_op op, request& r);
//       bool test(request& r);                     // advances r; true once it has completed
//       void wait(request& r);                     // completes r, or raises compact::error after the
//                                                  // communicator's timeout (a dead or diverged rank)
//       template <class Context, class T>          // start_all_reduce and wait; any memory the model
//       void all_reduce(const Context&, T* data, std::size_t count, reduce_op op); // takes (host too)
//       [[noreturn]] void abort(int code) noexcept; // ends every rank of the group (after an error)
//   };
//
// Types: float and double everywhere; the NCCL model adds __half and __nv_bfloat16; std::uint64_t
// (sum only, exact) for the library's own agreement checks. Models: mpi_communicator
// (distributed/mpi.hpp, any MPI-3 library), nccl_communicator (distributed/nccl.cuh) and
// self_communicator below (one rank, no library: for the 1-rank reference and for code that must also
// run without MPI).
//
// Determinism and agreement. Every model guarantees that all ranks receive the same bits (so weights
// that start equal stay bit-identical) and that the same run gives the same bits again. How the R
// contributions are added is the model's reduction (reduction below): `ordered` adds them in rank order,
// ((g_0 + g_1) + g_2) + ..., whatever the library underneath, which is exactly what one process gets by
// accumulating the R micro-batches in order; `native` leaves the order to MPI_Allreduce / ncclAllReduce.
//
// Failures. A rank that dies, hangs or throws before a collective would otherwise leave the others
// waiting forever. Every wait in compact's distributed code polls with a deadline (options.timeout) and
// raises compact::error naming the operation when it passes; the caller then calls abort(), which ends
// the whole group (MPI_Abort, ncclCommAbort). The library never exits by itself.
#pragma once

#include "compact/core/config.hpp"
#include "compact/core/error.hpp"

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

COMPACT_NAMESPACE_BEGIN

/// What an all-reduce computes: the elementwise sum, or the sum times 1/R.
enum class reduce_op : std::uint8_t { sum, mean };

/// How a communicator adds the ranks' contributions.
enum class reduction : std::uint8_t {
    /// In rank order, ((g_0 + g_1) + g_2) + ..., whatever the library underneath: each rank receives its
    /// 1/R slice of every other rank's buffer, adds the R slices in rank order and sends the result back
    /// to all (an all-to-all and an all-gather: 2 (R - 1)/R of the bytes per rank, as a ring). The result
    /// equals one process accumulating the R micro-batches in that order, bit for bit. Default.
    ordered,
    /// The library's own all-reduce (MPI_Iallreduce, ncclAllReduce): usually one message fewer, the
    /// order its algorithm picks (deterministic for a fixed R and library, but not rank order).
    native,
};

inline const char* reduce_op_name(reduce_op op) noexcept { return op == reduce_op::sum ? "sum" : "mean"; }

/// Options shared by the communicator models.
struct communicator_options {
    /// How long any wait may take before it raises compact::error (a rank has died or diverged).
    /// Generous by default: the first collective also waits for the slowest rank's start-up.
    std::chrono::milliseconds timeout{std::chrono::minutes(5)};
    reduction algorithm = reduction::ordered;
};

namespace detail {

/// FNV-1a, 64-bit: the layout and parameter fingerprints. Not cryptographic; it detects accidental
/// disagreement (a different shape, seed or rank), which is its only job.
class fnv1a {
public:
    void bytes(const void* data, std::size_t count) noexcept
    {
        const auto* p = static_cast<const unsigned char*>(data);
        for (std::size_t i = 0; i < count; ++i) {
            h_ ^= p[i];
            h_ *= 0x100000001b3ull;
        }
    }
    template <class T, class = std::enable_if_t<std::is_arithmetic_v<T> || std::is_enum_v<T>>>
    void value(T v) noexcept
    {
        bytes(&v, sizeof v);
    }
    void text(const char* s) noexcept
    {
        const std::size_t n = s ? std::strlen(s) : 0;
        value(static_cast<std::uint64_t>(n));
        bytes(s, n);
    }
    std::uint64_t digest() const noexcept { return h_; }

private:
    std::uint64_t h_ = 0xcbf29ce484222325ull;
};

/// Polls `done()` until it returns true or `timeout` passes; returns false on timeout. It spins for the
/// first ~50 us (a reduction that is about to finish), then yields, then sleeps 50 us between polls so
/// that R oversubscribed ranks on few cores leave the CPU to the rank that computes.
template <class Done>
bool poll_until(Done&& done, std::chrono::milliseconds timeout)
{
    using clock = std::chrono::steady_clock;
    const auto start = clock::now();
    const auto deadline = start + timeout;
    for (std::uint64_t i = 0;; ++i) {
        if (done()) return true;
        if (i < 64) continue;
        const auto now = clock::now();
        if (now >= deadline) return false;
        if (now - start < std::chrono::microseconds(50)) continue;
        if (now - start < std::chrono::milliseconds(1))
            std::this_thread::yield();
        else
            std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
}

} // namespace detail

/// The one-rank communicator: every reduction is the identity (the mean of one buffer is itself). For the
/// 1-rank reference of a data-parallel run, and for programs that must run without MPI.
class self_communicator {
public:
    struct request {
        bool pending = false;
    };

    int rank() const noexcept { return 0; }
    int size() const noexcept { return 1; }

    template <class Context, class T>
    void start_all_reduce(const Context&, T* data, std::size_t count, reduce_op, request& r)
    {
        COMPACT_REQUIRE(count == 0 || data != nullptr, "self_communicator::start_all_reduce", "data is null but count=",
                        count);
        COMPACT_REQUIRE(!r.pending, "self_communicator::start_all_reduce", "the request is still pending");
        r.pending = true;
    }
    bool test(request& r) noexcept
    {
        r.pending = false;
        return true;
    }
    void wait(request& r) noexcept { r.pending = false; }
    template <class Context, class T>
    void all_reduce(const Context&, T* data, std::size_t count, reduce_op)
    {
        COMPACT_REQUIRE(count == 0 || data != nullptr, "self_communicator::all_reduce", "data is null but count=", count);
    }
    [[noreturn]] void abort(int) noexcept { std::abort(); }
};

COMPACT_NAMESPACE_END
