// compact/distributed/data_parallel.hpp: data-parallel training that all-reduces the subspace gradients
// (SPEC section 11).
//
// Every rank builds the same model from the same seed and layer ids, so every rank regenerates the same
// projections P: the ranks need to agree only on the subspace gradients G_sub (m, r), the bias gradients
// and the gradients of parameters that are not compressed, n/r times fewer bytes than the full (m, n)
// weight gradients of ordinary data parallelism. After the all-reduce every rank applies the identical
// optimizer step, so weights that start bit-identical stay bit-identical.
//
//   compact::data_parallel<float, compact::mpi_communicator, compact::cpu> dp(comm);
//   const auto g2 = dp.add(fc2), g1 = dp.add(fc1);   // in the order backward finishes them: last first
//   dp.check_layout(ctx);                            // collective: every rank has the same model
//   for (step) {
//       ... forward on this rank's micro-batch ...
//       fc2.backward(ctx, dY, dH);  dp.ready(ctx, g2);   // fc2's bucket starts reducing (MPI_Iallreduce
//       fc1.backward(ctx, dH, {});  dp.ready(ctx, g1);   // or the ordered all-to-all) during fc1's backward
//       dp.finish(ctx);                                  // waits; G_sub, db hold the mean over the ranks
//       fc1.step(ctx, hyper);  fc2.step(ctx, hyper);
//   }
//
// Buckets. The registered gradients, in registration order, are packed into buckets of at most
// options.bucket_bytes (a larger gradient gets a bucket of its own); a bucket is reduced with one call
// as soon as every gradient in it is ready(), so that its communication overlaps the backward of the
// layers before it. finish() packs and reduces whatever was not marked ready, waits for every bucket
// in order and copies the means back into the layers' gradient buffers. Memory: one bucket buffer per
// bucket, bytes_per_step() in all, allocated once at the first step; nothing is allocated per step.
//
// Bytes per step: bytes_per_step() = sizeof(Scalar) (sum_l m_l r_l + sum biases + sum other parameters),
// the payload of the all-reduces; a ring moves 2 (R - 1)/R of it per rank. uncompressed_bytes_per_step()
// is what ordinary data parallelism sends for the same model, with m_l n_l for every compressed layer.
//
// Agreement: check_layout() (collective, once before the first step; finish() calls it if the caller has
// not) all-reduces a few 64-bit fingerprints per rank, of the shapes, of the projection keys (seed, layer
// ids, distribution, resampling gap, moment policy), of the compressors (name, rank, checkpoint fields)
// and of the bucket options. On a mismatch every rank raises the same compact::error, which names what
// differs and which ranks agree with which, instead of hanging in a reduction of mismatched sizes.
// check_parameters() does the same for the parameters' bits (weights and biases), for tests and after a
// resume.
//
// Determinism: with reduction::ordered, an R-rank step equals one process that accumulates the same R
// micro-batches in rank order (gradients summed, then times 1/R, which is exact for R a power of two),
// bit for bit; with either reduction, the same run gives the same bits again.
//
// Backend: packing and unpacking use Backend::axpby on ctx, so a CUDA model (device gradients, a
// stream-ordered communicator such as nccl_communicator) works the same way as the CPU one.
#pragma once

#include "compact/core/config.hpp"
#include "compact/core/error.hpp"
#include "compact/core/matrix_view.hpp"
#include "compact/compress/compressor.hpp"
#include "compact/distributed/communicator.hpp"
#include "compact/nn/linear_layer.hpp"

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

COMPACT_NAMESPACE_BEGIN

struct data_parallel_options {
    /// Most bytes per bucket; a gradient larger than this gets a bucket of its own. Smaller buckets
    /// start reducing earlier in backward; larger ones pay the per-message latency fewer times.
    std::size_t bucket_bytes = std::size_t(4) << 20;
    /// mean (default: every rank's loss is the mean over its own micro-batch) or sum.
    reduce_op op = reduce_op::mean;
    /// Start a bucket's reduction when its last gradient is ready(); off: everything waits for finish().
    bool overlap = true;
};

/// What the last finish() moved.
struct data_parallel_traffic {
    std::size_t bytes = 0;      ///< payload all-reduced (bytes_per_step())
    std::size_t reductions = 0; ///< all-reduce calls (buckets)
    double wait_seconds = 0;    ///< time finish() spent waiting for reductions
};

template <class Scalar, class Communicator, class Backend>
class data_parallel {
public:
    using context = typename Backend::context;
    using request = typename Communicator::request;
    template <class T>
    using buffer = typename Backend::template buffer<T>;

    explicit data_parallel(Communicator& comm, const data_parallel_options& options = {})
        : comm_(&comm), options_(options)
    {
        COMPACT_REQUIRE(options.bucket_bytes >= sizeof(Scalar), "data_parallel", "options.bucket_bytes=",
                        options.bucket_bytes, " cannot hold one value");
    }

    data_parallel(const data_parallel&) = delete;
    data_parallel& operator=(const data_parallel&) = delete;

    Communicator& communicator() noexcept { return *comm_; }
    const data_parallel_options& options() const noexcept { return options_; }

    /// Registers a linear layer's gradients: G_sub (m, r), or G (m, n) for a full-shape compressor, and
    /// db (m) when it has a bias. Returns the group id for ready(). Register in the order backward
    /// finishes the layers (the last layer first), before the first step; the layer must stay where it
    /// is (its gradient buffers are referenced, not copied).
    template <class Policy, class State>
    std::size_t add(linear_layer<Scalar, Policy, Backend, State>& layer, std::string name = {})
    {
        using compressor_type = typename linear_layer<Scalar, Policy, Backend, State>::compressor_type;
        check_open("data_parallel::add");
        if (name.empty()) name = "linear layer " + std::to_string(layer.options().layer);
        const linear_options& o = layer.options();
        const layer_gradient<Scalar>& g = layer.gradients();
        entry e;
        e.name = name;
        e.compressed = compressor_type::subspace;
        e.in = layer.in();
        e.weight_gradient = g.weight;
        e.bias_gradient = g.bias;
        e.weight = layer.weight();
        e.bias = layer.bias_view();
        detail::fnv1a keys, compressor;
        keys.value(o.seed);
        keys.value(o.layer);
        keys.value(o.dist);
        keys.value(o.resample.gap);
        keys.value(o.moments);
        keys.value(o.master_weights);
        compressor.text(compressor_type::name);
        compressor.value(static_cast<std::uint64_t>(layer.rank()));
        if constexpr (detail::has_checkpoint_fields<compressor_type>::value)
            for (const compressor_field& f : layer.compressor().checkpoint_fields()) {
                compressor.text(f.name);
                compressor.value(f.value);
            }
        e.keys = keys.digest();
        e.compressor = compressor.digest();
        return push(std::move(e));
    }

    /// Registers an ordinary parameter's gradient (an embedding, a norm's gain): reduced in full.
    /// `parameter`, when given, is included in check_parameters().
    std::size_t add(std::string name, matrix_view<Scalar> gradient, const_matrix_view<Scalar> parameter = {})
    {
        constexpr const char* where = "data_parallel::add";
        check_open(where);
        detail::check_view(gradient, where, "gradient");
        detail::check_optional_shape(parameter, gradient.rows, gradient.cols, where, "parameter");
        entry e;
        e.name = std::move(name);
        e.in = gradient.cols;
        e.weight_gradient = gradient;
        e.weight = parameter;
        return push(std::move(e));
    }

    /// Registered groups (layers and parameters).
    std::size_t groups() const noexcept { return entries_.size(); }

    /// Bytes all-reduced per step: sizeof(Scalar) (sum_l m_l r_l + biases + other parameters).
    std::size_t bytes_per_step() const noexcept { return values(false) * sizeof(Scalar); }
    /// The bytes ordinary data parallelism all-reduces for the same model: m_l n_l per compressed layer.
    std::size_t uncompressed_bytes_per_step() const noexcept { return values(true) * sizeof(Scalar); }
    /// Buckets, hence all-reduce calls per step; plans them, which ends registration.
    std::size_t buckets()
    {
        plan(); // registration ends here
        return buckets_.size();
    }

    /// Collective: raises the same compact::error on every rank unless every rank registered the same
    /// layout (see the header comment). Once, before the first step; finish() calls it if needed.
    void check_layout(const context& ctx)
    {
        constexpr const char* where = "data_parallel::check_layout";
        plan();
        detail::fnv1a shapes, keys, compressors, options;
        for (const entry& e : entries_) {
            shapes.value(static_cast<std::uint64_t>(e.weight_gradient.rows));
            shapes.value(static_cast<std::uint64_t>(e.weight_gradient.cols));
            shapes.value(static_cast<std::uint64_t>(e.in));
            shapes.value(static_cast<std::uint64_t>(e.bias_gradient.cols));
            shapes.value(e.compressed);
            keys.value(e.keys);
            compressors.value(e.compressor);
        }
        shapes.value(static_cast<std::uint64_t>(sizeof(Scalar)));
        options.value(static_cast<std::uint64_t>(options_.bucket_bytes));
        options.value(options_.op);
        options.value(static_cast<std::uint64_t>(buckets_.size()));
        const std::uint64_t mine[fields] = {static_cast<std::uint64_t>(entries_.size()), values(false), shapes.digest(),
                                            keys.digest(), compressors.digest(), options.digest()};
        const std::vector<std::uint64_t> all = gather(ctx, mine, fields);
        static constexpr const char* what[fields] = {
            "the number of registered layers and parameters",
            "the number of values to reduce",
            "the shapes (m, n, r, bias) of the registered gradients",
            "the projection keys (seed, layer ids, distribution, resampling gap, moment policy)",
            "the compressors (name, rank, configuration)",
            "the data_parallel options (bucket bytes, reduce op)"};
        std::string differences;
        for (int f = 0; f < fields; ++f) {
            std::map<std::uint64_t, std::vector<int>> by_value;
            for (int r = 0; r < comm_->size(); ++r)
                by_value[all[static_cast<std::size_t>(r * fields + f)]].push_back(r);
            if (by_value.size() == 1) continue;
            differences += "\n  " + std::string(what[f]) + " differ:";
            for (const auto& [value, ranks] : by_value) {
                differences += " ranks";
                for (int r : ranks) differences += " " + std::to_string(r);
                differences += f < 2 ? " have " + std::to_string(value) + ";" : " agree;";
            }
        }
        COMPACT_REQUIRE(differences.empty(), where, "the ", comm_->size(), " ranks do not have the same model:",
                        differences,
                        "\n  every rank must register the same layers in the same order, built with the same seed, "
                        "layer ids, ranks and compressors");
        layout_checked_ = true;
    }

    /// Collective: raises the same compact::error on every rank unless the registered parameters (the
    /// layers' weights and biases, and the parameters given to add) are bit-identical on every rank.
    void check_parameters(const context& ctx)
    {
        const std::uint64_t mine[1] = {fingerprint(ctx)};
        const std::vector<std::uint64_t> all = gather(ctx, mine, 1);
        std::string listing;
        bool same = true;
        for (int r = 0; r < comm_->size(); ++r) {
            same = same && all[static_cast<std::size_t>(r)] == all[0];
            listing += " " + std::to_string(r) + ":" + std::to_string(all[static_cast<std::size_t>(r)]);
        }
        COMPACT_REQUIRE(same, "data_parallel::check_parameters", "the parameters differ across the ", comm_->size(),
                        " ranks (fingerprint per rank:", listing, ")");
    }

    /// A 64-bit fingerprint of this rank's registered parameters' bits (copied to the host first).
    std::uint64_t fingerprint(const context& ctx) const
    {
        detail::fnv1a h;
        std::vector<Scalar> row;
        const auto add_view = [&](const_matrix_view<Scalar> v) {
            row.resize(static_cast<std::size_t>(v.cols));
            for (index_t i = 0; i < v.rows; ++i) {
                Backend::copy_to_host(ctx, v.row(i), row.data(), row.size());
                h.bytes(row.data(), row.size() * sizeof(Scalar));
            }
        };
        for (const entry& e : entries_) {
            add_view(e.weight);
            add_view(e.bias);
        }
        return h.digest();
    }

    /// The gradients of `group` (an id from add) are final for this step: they are packed into their
    /// bucket now, and the bucket's reduction starts once all of its gradients are in (options.overlap).
    void ready(const context& ctx, std::size_t group)
    {
        constexpr const char* where = "data_parallel::ready";
        COMPACT_REQUIRE(group < entries_.size(), where, "group ", group, " is not registered (", entries_.size(),
                        " groups)");
        if (!layout_checked_) check_layout(ctx);
        entry& e = entries_[group];
        COMPACT_REQUIRE(!e.ready, where, "'", e.name, "' is already ready this step");
        pack(ctx, e);
        progress();
    }

    /// Packs whatever was not marked ready, waits for every bucket and writes the reduced gradients back
    /// into the registered buffers. Raises compact::error (from the communicator) when a reduction does
    /// not complete within its timeout.
    void finish(const context& ctx)
    {
        if (!layout_checked_) check_layout(ctx);
        for (entry& e : entries_)
            if (!e.ready) pack(ctx, e);
        const auto start = std::chrono::steady_clock::now();
        for (bucket& b : buckets_) {
            if (!b.started) start_bucket(ctx, b);
            comm_->wait(b.pending);
        }
        last_.wait_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        last_.bytes = bytes_per_step();
        last_.reductions = buckets_.size();
        for (entry& e : entries_) {
            unpack(ctx, e.weight_gradient, e.weight_at);
            unpack(ctx, e.bias_gradient, e.bias_at);
            e.ready = false;
        }
        for (bucket& b : buckets_) {
            b.waiting = b.members;
            b.started = false;
        }
    }

    /// What the last finish() reduced.
    const data_parallel_traffic& last_step() const noexcept { return last_; }

private:
    static constexpr int fields = 6;

    struct entry {
        std::string name;
        bool compressed = false;
        index_t in = 0; // n, for the uncompressed byte count
        matrix_view<Scalar> weight_gradient{}, bias_gradient{};
        const_matrix_view<Scalar> weight{}, bias{};
        std::uint64_t keys = 0, compressor = 0;
        // where the gradients sit in the buckets: (bucket, offset in values)
        std::pair<std::size_t, std::size_t> weight_at{}, bias_at{};
        bool ready = false;
    };

    struct bucket {
        buffer<Scalar> values;
        std::size_t members = 0, waiting = 0; // tensors in the bucket, and those not yet packed this step
        bool started = false;
        request pending{};
    };

    void check_open(const char* where) const
    {
        COMPACT_REQUIRE(!planned_, where, "the buckets are already planned (the first step or check_layout has run); "
                                          "register every gradient before");
    }

    std::size_t push(entry e)
    {
        entries_.push_back(std::move(e));
        return entries_.size() - 1;
    }

    std::uint64_t values(bool uncompressed) const noexcept
    {
        std::uint64_t n = 0;
        for (const entry& e : entries_) {
            const auto cols = uncompressed && e.compressed ? e.in : e.weight_gradient.cols;
            n += static_cast<std::uint64_t>(e.weight_gradient.rows) * static_cast<std::uint64_t>(cols) +
                 static_cast<std::uint64_t>(e.bias_gradient.size());
        }
        return n;
    }

    void plan()
    {
        if (planned_) return;
        planned_ = true;
        const std::size_t cap = std::max<std::size_t>(1, options_.bucket_bytes / sizeof(Scalar));
        std::vector<std::size_t> sizes;
        const auto place = [&](index_t count, std::pair<std::size_t, std::size_t>& at) {
            if (count == 0) return;
            const auto n = static_cast<std::size_t>(count);
            if (sizes.empty() || (sizes.back() > 0 && sizes.back() + n > cap)) sizes.push_back(0);
            at = {sizes.size() - 1, sizes.back()};
            sizes.back() += n;
        };
        for (entry& e : entries_) {
            place(e.weight_gradient.size(), e.weight_at);
            place(e.bias_gradient.size(), e.bias_at);
        }
        buckets_.resize(sizes.size());
        for (std::size_t b = 0; b < sizes.size(); ++b) buckets_[b].values.assign(sizes[b], Scalar(0));
        for (const entry& e : entries_) {
            if (!e.weight_gradient.empty()) ++buckets_[e.weight_at.first].members;
            if (!e.bias_gradient.empty()) ++buckets_[e.bias_at.first].members;
        }
        for (bucket& b : buckets_) b.waiting = b.members;
    }

    matrix_view<Scalar> slot(const matrix_view<Scalar>& g, const std::pair<std::size_t, std::size_t>& at)
    {
        return {buckets_[at.first].values.data() + at.second, g.rows, g.cols};
    }

    void pack(const context& ctx, entry& e)
    {
        const auto one = [&](const matrix_view<Scalar>& g, const std::pair<std::size_t, std::size_t>& at) {
            if (g.empty()) return;
            Backend::template axpby<Scalar, Scalar>(ctx, 1.0, g, 0.0, slot(g, at));
            bucket& b = buckets_[at.first];
            if (--b.waiting == 0 && options_.overlap) start_bucket(ctx, b);
        };
        one(e.weight_gradient, e.weight_at);
        one(e.bias_gradient, e.bias_at);
        e.ready = true;
    }

    void unpack(const context& ctx, const matrix_view<Scalar>& g, const std::pair<std::size_t, std::size_t>& at)
    {
        if (g.empty()) return;
        Backend::template axpby<Scalar, Scalar>(ctx, 1.0, slot(g, at), 0.0, g);
    }

    void start_bucket(const context& ctx, bucket& b)
    {
        comm_->start_all_reduce(ctx, b.values.data(), b.values.size(), options_.op, b.pending);
        b.started = true;
    }

    void progress()
    {
        for (bucket& b : buckets_)
            if (b.started) comm_->test(b.pending);
    }

    // Every rank's `count` values, rank after rank: an all-reduce (sum) where each rank fills its slot.
    std::vector<std::uint64_t> gather(const context& ctx, const std::uint64_t* mine, int count)
    {
        const auto ranks = static_cast<std::size_t>(comm_->size());
        const auto n = static_cast<std::size_t>(count);
        std::vector<std::uint64_t> all(ranks * n, 0);
        std::copy(mine, mine + n, all.begin() + static_cast<std::ptrdiff_t>(static_cast<std::size_t>(comm_->rank()) * n));
        comm_->all_reduce(ctx, all.data(), all.size(), reduce_op::sum); // host memory: every model takes it
        return all;
    }

    Communicator* comm_;
    data_parallel_options options_;
    std::vector<entry> entries_;
    std::vector<bucket> buckets_;
    data_parallel_traffic last_{};
    bool planned_ = false, layout_checked_ = false;
};

COMPACT_NAMESPACE_END
