// compact/distributed/checkpoint.hpp: checkpoints under data parallelism: one rank writes, every rank
// resumes bit-exactly.
//
//   compact::save_checkpoint(comm, ctx, "run.ckpt", fc1, fc2);  // rank 0 writes; collective
//   compact::load_checkpoint(comm, ctx, "run.ckpt", fc1, fc2);  // every rank reads; collective
//
// The ranks hold bit-identical layers (data_parallel keeps them so), so rank 0's state is everyone's.
// save: rank 0 writes the file with compact::save_checkpoint (atomic: a temporary file renamed), then
// one small all-reduce tells every rank whether it succeeded; when it did not, every rank raises the
// same compact::error carrying rank 0's message. When save returns on any rank, the file is complete.
// load: every rank reads the file (a shared file system, or a copy per node), then the ranks compare a
// fingerprint of what they loaded (weights, biases, moments, master copies and counters); a rank that
// failed to read, or read something else, makes every rank raise the same error. Each wait has the
// communicator's timeout.
#pragma once

#include "compact/core/config.hpp"
#include "compact/core/error.hpp"
#include "compact/distributed/communicator.hpp"
#include "compact/io/linear_layer_checkpoint.hpp"
#include "compact/nn/linear_layer.hpp"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

COMPACT_NAMESPACE_BEGIN
namespace detail {

template <class Backend, class T>
void fingerprint_values(fnv1a& h, const typename Backend::context& ctx, const T* data, std::size_t count)
{
    h.value(static_cast<std::uint64_t>(count));
    if (count == 0 || data == nullptr) return;
    std::vector<T> host(count);
    Backend::copy_to_host(ctx, data, host.data(), count);
    h.bytes(host.data(), count * sizeof(T));
}

/// The bits a resumed rank must agree on: parameters, moments, master copies and counters.
template <class Scalar, class Policy, class Backend, class State>
void fingerprint_state(fnv1a& h, const typename Backend::context& ctx,
                       const linear_layer<Scalar, Policy, Backend, State>& layer)
{
    const auto m = static_cast<std::size_t>(layer.out());
    const auto mn = static_cast<std::size_t>(layer.weight().size());
    const auto mr = static_cast<std::size_t>(layer.first_moment().size());
    fingerprint_values<Backend>(h, ctx, layer.weight().data, mn);
    fingerprint_values<Backend>(h, ctx, layer.bias(), layer.bias() ? m : 0);
    fingerprint_values<Backend>(h, ctx, layer.first_moment().data, mr);
    fingerprint_values<Backend>(h, ctx, layer.second_moment().data, mr);
    fingerprint_values<Backend>(h, ctx, layer.bias_first_moment(), layer.bias_first_moment() ? m : 0);
    fingerprint_values<Backend>(h, ctx, layer.bias_second_moment(), layer.bias_second_moment() ? m : 0);
    fingerprint_values<Backend>(h, ctx, layer.master_weight().data, static_cast<std::size_t>(layer.master_weight().size()));
    fingerprint_values<Backend>(h, ctx, layer.master_bias(), layer.master_bias() ? m : 0);
    h.value(layer.updates());
    h.value(layer.counters().step);
    h.value(layer.counters().epoch);
    h.value(layer.bias_counters().step);
    h.value(layer.bias_counters().epoch);
}

/// Collective: every rank learns whether any rank failed, and the first failing rank's message. Raises
/// the same compact::error on every rank then; returns normally when no rank failed.
template <class Communicator, class Context>
void agree_on_success(Communicator& comm, const Context& ctx, const std::string* failure, const char* where,
                      const char* what)
{
    const auto ranks = static_cast<std::size_t>(comm.size());
    std::vector<std::uint64_t> failed(ranks, 0);
    failed[static_cast<std::size_t>(comm.rank())] = failure ? 1 : 0;
    comm.all_reduce(ctx, failed.data(), failed.size(), reduce_op::sum);
    std::size_t first = ranks;
    for (std::size_t r = 0; r < ranks && first == ranks; ++r)
        if (failed[r]) first = r;
    if (first == ranks) return;
    // The first failing rank's message, 8 bytes per value (the others add zeros).
    constexpr std::size_t words = 64;
    std::vector<std::uint64_t> text(words, 0);
    if (static_cast<std::size_t>(comm.rank()) == first)
        std::memcpy(text.data(), failure->data(), std::min(failure->size(), words * 8 - 1));
    comm.all_reduce(ctx, text.data(), text.size(), reduce_op::sum);
    std::string message(words * 8, '\0');
    std::memcpy(&message[0], text.data(), words * 8);
    message.resize(std::strlen(message.c_str()));
    COMPACT_FAIL(where, what, " failed on rank ", first, ": ", message);
}

template <class Context, class... Layers>
std::uint64_t state_fingerprint(const Context& ctx, const Layers&... layers)
{
    fnv1a h;
    (fingerprint_state(h, ctx, layers), ...);
    return h.digest();
}

} // namespace detail

/// Rank 0 saves `layers` to `path`; every rank returns once the file is complete, or raises the same
/// compact::error when rank 0 could not write it. Collective over `comm`.
template <class Communicator, class Context, class... Layers>
void save_checkpoint(Communicator& comm, const Context& ctx, const std::string& path, const Layers&... layers)
{
    static_assert(sizeof...(Layers) > 0, "compact::save_checkpoint: no layers given");
    std::string failure;
    bool failed = false;
    if (comm.rank() == 0) {
        try {
            save_checkpoint(path, layers...);
        } catch (const std::exception& e) {
            failure = e.what();
            failed = true;
        }
    }
    detail::agree_on_success(comm, ctx, failed ? &failure : nullptr, "save_checkpoint", "writing the checkpoint");
}

/// Every rank restores `layers` from `path` (written by either save_checkpoint) and the ranks check that
/// they restored the same bits. Raises the same compact::error on every rank when a rank could not read
/// the file or read a different state. Collective over `comm`.
template <class Communicator, class Context, class... Layers>
void load_checkpoint(Communicator& comm, const Context& ctx, const std::string& path, Layers&... layers)
{
    static_assert(sizeof...(Layers) > 0, "compact::load_checkpoint: no layers given");
    std::string failure;
    bool failed = false;
    try {
        load_checkpoint(path, layers...);
    } catch (const std::exception& e) {
        failure = e.what();
        failed = true;
    }
    detail::agree_on_success(comm, ctx, failed ? &failure : nullptr, "load_checkpoint", "reading the checkpoint");
    const auto ranks = static_cast<std::size_t>(comm.size());
    std::vector<std::uint64_t> prints(ranks, 0);
    prints[static_cast<std::size_t>(comm.rank())] = detail::state_fingerprint(ctx, layers...);
    comm.all_reduce(ctx, prints.data(), prints.size(), reduce_op::sum);
    for (std::size_t r = 1; r < ranks; ++r)
        COMPACT_REQUIRE(prints[r] == prints[0], "load_checkpoint", "'", path, "': rank ", r,
                        " restored a state other than rank 0's (fingerprints ", prints[r], " and ", prints[0],
                        "): the ranks read different files");
}

COMPACT_NAMESPACE_END
