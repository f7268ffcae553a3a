// compact/distributed/mpi.hpp: the MPI model of the communicator concept (distributed/communicator.hpp).
//
// Any MPI-3 library (non-blocking collectives); tested with Open MPI 4.1. Buffers are host memory: with
// the CUDA backend use nccl_communicator (distributed/nccl.cuh).
//
//   compact::mpi_session mpi(argc, argv);                 // MPI_Init_thread .. MPI_Finalize, if not done
//   compact::mpi_communicator comm(MPI_COMM_WORLD);       // duplicates the communicator
//   comm.start_all_reduce(ctx, g, count, compact::reduce_op::mean, request);
//   ... (backward of earlier layers; comm.test(request) lets MPI progress) ...
//   comm.wait(request);                                   // or compact::error after options.timeout
//
// The communicator duplicates the caller's MPI_Comm, so its messages can never match the caller's own,
// and sets MPI_ERRORS_RETURN on the duplicate, so an MPI failure is a compact::error carrying MPI's
// message instead of the default abort.
//
// Reductions (communicator_options::algorithm):
//   ordered (default): MPI_Ialltoallv of the 1/R slices, the R slices of this rank's slice added in rank
//     order, MPI_Iallgatherv of the sums. Bit-identical on every rank by construction (each element is
//     added by one rank and copied to the others), the same on every MPI library, and equal to one
//     process accumulating the R micro-batches in rank order. Any trivially copyable T with + and *.
//     Scratch: count sizeof(T) / R bytes, kept in the request.
//   native: MPI_Iallreduce (float, double, std::uint64_t). Open MPI's algorithms give every rank the same
//     bits; the MPI standard only recommends it.
// Cost per rank (alpha-beta, SPEC section 11): 2 (R - 1)/R B bytes either way; the ordered reduction's
// all-to-all sends R - 1 messages where a ring sends one per step, so for B below ~R alpha/beta (tens of
// kilobytes at R = 64) native is faster, above it they move the same bytes. Counts are passed as int
// bytes, so one reduction holds at most 2^31 - 1 bytes (data_parallel's buckets are far smaller).
//
// Timeouts: wait() polls MPI_Test with a deadline (options.timeout) and raises compact::error naming the
// reduction, this rank and the timeout when it passes: another rank has died, hung, or called a different
// collective. The reduction is then abandoned; call abort() (MPI_Abort on the group) to end the job.
#pragma once

#include "compact/core/config.hpp"
#include "compact/core/error.hpp"
#include "compact/distributed/communicator.hpp"

// compact uses MPI's C API only; the deprecated C++ bindings would only add warnings and a library.
#if !defined(OMPI_SKIP_MPICXX)
#define OMPI_SKIP_MPICXX 1
#endif
#if !defined(MPICH_SKIP_MPICXX)
#define MPICH_SKIP_MPICXX 1
#endif
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <deque>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

COMPACT_NAMESPACE_BEGIN

namespace detail {

inline void check_mpi(int code, const char* where, const char* call)
{
    if (code == MPI_SUCCESS) return;
    char text[MPI_MAX_ERROR_STRING] = {};
    int length = 0;
    MPI_Error_string(code, text, &length);
    COMPACT_FAIL(where, call, " failed with MPI error ", code, ": ", std::string(text, static_cast<std::size_t>(length)));
}

template <class T>
MPI_Datatype mpi_datatype()
{
    if constexpr (std::is_same_v<T, float>)
        return MPI_FLOAT;
    else if constexpr (std::is_same_v<T, double>)
        return MPI_DOUBLE;
    else if constexpr (std::is_same_v<T, std::uint64_t>)
        return MPI_UINT64_T;
    else
        static_assert(sizeof(T) == 0, "compact::mpi_communicator: the native reduction supports float, double and "
                                      "std::uint64_t; use reduction::ordered for other types");
}

template <class T>
const char* scalar_name() noexcept
{
    if constexpr (std::is_same_v<T, float>) return "float";
    if constexpr (std::is_same_v<T, double>) return "double";
    if constexpr (std::is_same_v<T, std::uint64_t>) return "uint64";
    return "scalar";
}

} // namespace detail

/// MPI_Init_thread at construction and MPI_Finalize at destruction, each only when MPI is not already
/// (or no longer) initialised, so that a program or test owns MPI's lifetime with one object.
class mpi_session {
public:
    mpi_session(int& argc, char**& argv, int required = MPI_THREAD_FUNNELED)
    {
        int initialized = 0;
        MPI_Initialized(&initialized);
        if (initialized) return;
        int provided = 0;
        detail::check_mpi(MPI_Init_thread(&argc, &argv, required, &provided), "mpi_session", "MPI_Init_thread");
        owner_ = true;
    }
    mpi_session(const mpi_session&) = delete;
    mpi_session& operator=(const mpi_session&) = delete;
    ~mpi_session()
    {
        int finalized = 0;
        MPI_Finalized(&finalized);
        if (owner_ && !finalized) MPI_Finalize();
    }

private:
    bool owner_ = false;
};

class mpi_communicator {
public:
    /// A pending reduction. Reuse one request per buffer: it keeps its scratch memory, so that steady
    /// state allocates nothing. A pending request must stay where it is (the communicator refers to it).
    struct request {
        request() = default;
        request(request&&) noexcept = default;
        request& operator=(request&&) noexcept = default;
        request(const request&) = delete;
        request& operator=(const request&) = delete;

        bool pending() const noexcept { return stage_ != 0; }

    private:
        friend class mpi_communicator;
        MPI_Request handle_ = MPI_REQUEST_NULL;
        int stage_ = 0;          // 0 idle; 1 all-to-all (ordered) or all-reduce (native); 2 all-gather (ordered)
        unsigned char* data_ = nullptr;
        std::size_t count_ = 0, element_ = 0;
        reduce_op op_ = reduce_op::sum;
        reduction algorithm_ = reduction::ordered;
        const char* type_ = "";
        void (*combine_)(request&, int ranks, int rank) = nullptr;
        std::vector<unsigned char> scratch_;             // ordered: R slices of this rank's part
        std::vector<int> counts_, displs_, slice_counts_, slice_displs_; // bytes, per rank
    };

    /// Duplicates `comm` (collective over it).
    explicit mpi_communicator(MPI_Comm comm = MPI_COMM_WORLD, const communicator_options& options = {})
        : options_(options)
    {
        constexpr const char* where = "mpi_communicator";
        COMPACT_REQUIRE(options.timeout.count() > 0, where, "options.timeout=", options.timeout.count(),
                        " ms must be positive");
        int initialized = 0;
        MPI_Initialized(&initialized);
        COMPACT_REQUIRE(initialized, where, "MPI is not initialised (construct a compact::mpi_session first)");
        detail::check_mpi(MPI_Comm_dup(comm, &comm_), where, "MPI_Comm_dup");
        detail::check_mpi(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN), where, "MPI_Comm_set_errhandler");
        detail::check_mpi(MPI_Comm_dup(comm_, &gather_comm_), where, "MPI_Comm_dup");
        MPI_Comm_rank(comm_, &rank_);
        MPI_Comm_size(comm_, &size_);
    }
    mpi_communicator(const mpi_communicator&) = delete;
    mpi_communicator& operator=(const mpi_communicator&) = delete;
    mpi_communicator(mpi_communicator&& other) noexcept
        : options_(other.options_), comm_(std::exchange(other.comm_, MPI_COMM_NULL)),
          gather_comm_(std::exchange(other.gather_comm_, MPI_COMM_NULL)), queue_(std::move(other.queue_)),
          rank_(other.rank_), size_(other.size_)
    {
    }
    ~mpi_communicator()
    {
        int finalized = 0;
        MPI_Finalized(&finalized);
        if (finalized) return;
        if (gather_comm_ != MPI_COMM_NULL) MPI_Comm_free(&gather_comm_);
        if (comm_ != MPI_COMM_NULL) MPI_Comm_free(&comm_);
    }

    int rank() const noexcept { return rank_; }
    int size() const noexcept { return size_; }
    const communicator_options& options() const noexcept { return options_; }
    /// The duplicated communicator, for the caller's own messages beside compact's.
    MPI_Comm native_handle() const noexcept { return comm_; }

    /// Starts the in-place all-reduce of data[0, count) (host memory); see the header comment.
    template <class Context, class T>
    void start_all_reduce(const Context&, T* data, std::size_t count, reduce_op op, request& r)
    {
        static_assert(std::is_trivially_copyable_v<T>, "compact::mpi_communicator reduces trivially copyable types");
        constexpr const char* where = "mpi_communicator::start_all_reduce";
        COMPACT_REQUIRE(!r.pending(), where, "the request is still pending (wait for it first)");
        COMPACT_REQUIRE(count == 0 || data != nullptr, where, "data is null but count=", count);
        COMPACT_REQUIRE(count <= static_cast<std::size_t>(INT_MAX) / sizeof(T), where, "count=", count, " ",
                        detail::scalar_name<T>(), " values exceed one reduction's limit of 2^31 - 1 bytes");
        r.data_ = reinterpret_cast<unsigned char*>(data);
        r.count_ = count;
        r.element_ = sizeof(T);
        r.op_ = op;
        r.algorithm_ = options_.algorithm;
        r.type_ = detail::scalar_name<T>();
        if (count == 0 || size_ == 1) return; // nothing to exchange; the mean of one buffer is itself
        if (options_.algorithm == reduction::native) {
            if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double> || std::is_same_v<T, std::uint64_t>) {
                r.combine_ = &scale_mean<T>;
                detail::check_mpi(MPI_Iallreduce(MPI_IN_PLACE, data, static_cast<int>(count), detail::mpi_datatype<T>(),
                                                 MPI_SUM, comm_, &r.handle_),
                                  where, "MPI_Iallreduce");
                r.stage_ = 1;
                return;
            } else {
                COMPACT_FAIL(where, "the native reduction supports float, double and uint64, not this ",
                             sizeof(T), "-byte type; use reduction::ordered");
            }
        }
        r.combine_ = &add_slices<T>;
        const int ranks = size_;
        r.counts_.resize(static_cast<std::size_t>(ranks));
        r.displs_.resize(static_cast<std::size_t>(ranks));
        r.slice_counts_.resize(static_cast<std::size_t>(ranks));
        r.slice_displs_.resize(static_cast<std::size_t>(ranks));
        const std::size_t chunk = (count + static_cast<std::size_t>(ranks) - 1) / static_cast<std::size_t>(ranks);
        for (int j = 0; j < ranks; ++j) {
            const auto [lo, hi] = part(count, chunk, j);
            r.counts_[static_cast<std::size_t>(j)] = static_cast<int>((hi - lo) * sizeof(T));
            r.displs_[static_cast<std::size_t>(j)] = static_cast<int>(lo * sizeof(T));
        }
        const int mine = r.counts_[static_cast<std::size_t>(rank_)];
        r.scratch_.resize(static_cast<std::size_t>(mine) * static_cast<std::size_t>(ranks));
        for (int i = 0; i < ranks; ++i) {
            r.slice_counts_[static_cast<std::size_t>(i)] = mine;
            r.slice_displs_[static_cast<std::size_t>(i)] = i * mine;
        }
        detail::check_mpi(MPI_Ialltoallv(data, r.counts_.data(), r.displs_.data(), MPI_BYTE, r.scratch_.data(),
                                         r.slice_counts_.data(), r.slice_displs_.data(), MPI_BYTE, comm_, &r.handle_),
                          where, "MPI_Ialltoallv");
        r.stage_ = 1;
        queue_.push_back(&r);
    }

    /// Advances `r` without blocking (MPI progresses inside MPI_Test); true once it has completed.
    bool test(request& r)
    {
        constexpr const char* where = "mpi_communicator::test";
        advance_queue();
        if (r.stage_ == 0) return true;
        if (r.stage_ == 1 && r.algorithm_ == reduction::ordered) return false; // queued behind another
        int done = 0;
        detail::check_mpi(MPI_Test(&r.handle_, &done, MPI_STATUS_IGNORE), where, "MPI_Test");
        if (!done) return false;
        if (r.stage_ == 1) r.combine_(r, size_, rank_); // native: the mean's scaling
        r.stage_ = 0;
        return true;
    }

    /// Completes `r`, or raises compact::error when options().timeout passes first.
    void wait(request& r)
    {
        if (detail::poll_until([&] { return test(r); }, options_.timeout)) return;
        COMPACT_FAIL("mpi_communicator::wait", "the ", r.algorithm_ == reduction::ordered ? "ordered" : "native", " ",
                     reduce_op_name(r.op_), " all-reduce of ", r.count_, " ", r.type_, " values did not complete within ",
                     options_.timeout.count(), " ms on rank ", rank_, " of ", size_,
                     ": another rank has died, hung or called a different collective; call abort() to end the job");
    }

    /// start_all_reduce and wait.
    template <class Context, class T>
    void all_reduce(const Context& ctx, T* data, std::size_t count, reduce_op op)
    {
        request r;
        start_all_reduce(ctx, data, count, op, r);
        wait(r);
    }

    /// Waits (with the timeout) until every rank has arrived.
    void barrier()
    {
        MPI_Request handle = MPI_REQUEST_NULL;
        detail::check_mpi(MPI_Ibarrier(comm_, &handle), "mpi_communicator::barrier", "MPI_Ibarrier");
        const bool done = detail::poll_until(
            [&] {
                int flag = 0;
                detail::check_mpi(MPI_Test(&handle, &flag, MPI_STATUS_IGNORE), "mpi_communicator::barrier", "MPI_Test");
                return flag != 0;
            },
            options_.timeout);
        COMPACT_REQUIRE(done, "mpi_communicator::barrier", "not every rank arrived within ", options_.timeout.count(),
                        " ms (rank ", rank_, " of ", size_, "): another rank has died or hung; call abort()");
    }

    /// Ends every process of the group (MPI_Abort): the way out after a timeout or an error on one rank.
    [[noreturn]] void abort(int code) noexcept
    {
        MPI_Abort(comm_ != MPI_COMM_NULL ? comm_ : MPI_COMM_WORLD, code);
        std::abort();
    }

private:
    // Every rank must start its non-blocking collectives on a communicator in the same order. The ordered
    // reduction's second phase (the all-gather) therefore runs on a communicator of its own, and is
    // started strictly in the order the first phases were: a rank whose later reduction finished its
    // all-to-all first still waits for the earlier one.
    void advance_queue()
    {
        constexpr const char* where = "mpi_communicator::test";
        while (!queue_.empty()) {
            request& q = *queue_.front();
            int done = 0;
            detail::check_mpi(MPI_Test(&q.handle_, &done, MPI_STATUS_IGNORE), where, "MPI_Test");
            if (!done) return;
            q.combine_(q, size_, rank_);
            detail::check_mpi(MPI_Iallgatherv(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, q.data_, q.counts_.data(),
                                              q.displs_.data(), MPI_BYTE, gather_comm_, &q.handle_),
                              where, "MPI_Iallgatherv");
            q.stage_ = 2;
            queue_.pop_front();
        }
    }

    static std::pair<std::size_t, std::size_t> part(std::size_t count, std::size_t chunk, int j) noexcept
    {
        const std::size_t lo = std::min(count, chunk * static_cast<std::size_t>(j));
        return {lo, std::min(count, lo + chunk)};
    }

    // ordered: this rank's part of the result from the R slices, added in rank order.
    template <class T>
    static void add_slices(request& r, int ranks, int rank)
    {
        const auto bytes = static_cast<std::size_t>(r.counts_[static_cast<std::size_t>(rank)]);
        const std::size_t n = bytes / sizeof(T);
        T* out = reinterpret_cast<T*>(r.data_ + r.displs_[static_cast<std::size_t>(rank)]);
        const T* slices = reinterpret_cast<const T*>(r.scratch_.data());
        for (std::size_t k = 0; k < n; ++k) out[k] = slices[k];
        for (int i = 1; i < ranks; ++i) {
            const T* s = slices + static_cast<std::size_t>(i) * n;
            for (std::size_t k = 0; k < n; ++k) out[k] = static_cast<T>(out[k] + s[k]);
        }
        if (r.op_ == reduce_op::mean) scale(out, n, ranks);
    }

    template <class T>
    static void scale_mean(request& r, int ranks, int)
    {
        if (r.op_ == reduce_op::mean) scale(reinterpret_cast<T*>(r.data_), r.count_, ranks);
    }

    template <class T>
    static void scale(T* x, std::size_t n, int ranks)
    {
        if constexpr (std::is_floating_point_v<T>) {
            const T inv = T(1) / static_cast<T>(ranks);
            for (std::size_t k = 0; k < n; ++k) x[k] *= inv;
        } else {
            for (std::size_t k = 0; k < n; ++k) x[k] = static_cast<T>(x[k] / static_cast<T>(ranks));
        }
    }

    communicator_options options_;
    MPI_Comm comm_ = MPI_COMM_NULL;        // the all-to-alls, native all-reduces and barriers
    MPI_Comm gather_comm_ = MPI_COMM_NULL; // the ordered reduction's all-gathers
    std::deque<request*> queue_;           // ordered reductions in their all-to-all, in start order
    int rank_ = 0, size_ = 1;
};

COMPACT_NAMESPACE_END
