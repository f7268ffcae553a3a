// compact/nn/linear_layer.hpp: an owning, trainable compressed linear layer for quick use.
//
// linear_layer bundles what a trainer needs for one compressed layer: the weight W (m, n) and bias (m),
// the saved Z (max_rows, r), the subspace gradient G_sub (m, r) and db (m), the subspace-AdamW moments
// (m, r) and the bias's AdamW moments (m), the update counter that selects P's epoch, and one
// workspace. It allocates once, in the constructor, through Backend::buffer; forward, backward and step
// never allocate. Everything it does is done by the caller-memory API (compressed_linear,
// subspace_adamw, adamw), which is what to use for custom memory planning.
//
//   layer.forward(ctx, X, Y);     // Y = X W^T + b, keeps Z = X P
//   layer.backward(ctx, dY, dX);  // dX = dY W (pass an empty view to skip); G_sub, db accumulate
//   layer.step(ctx, hyper);       // subspace AdamW on W, AdamW on b; zero the gradients
//
// Micro-batches: call forward/backward once per micro-batch (each backward right after its forward, as
// Z holds one micro-batch) and step once; gradients accumulate in between.
//
// Master weights (options.master_weights): the layer also owns State copies of W and b (fp32 beside
// bf16 weights, say) that step() updates, W and b then being their rounding to Scalar, so that updates
// below half an ulp of W are not lost (optim/adamw.hpp). Initialise W and b as usual: the master takes
// them at the first step. After changing W or b between steps, call sync_master() (or the change is
// overwritten by the next step's rounding of the master). Checkpoints save and restore the master.
//
// With the `quantized` policy (compress/activation_store.hpp) the layer keeps X encoded instead of Z,
// its gradient is the full (m, n) G = dY^T X^ and its optimizer plain AdamW; the rounding noise of a
// forward is keyed by the update count, so a rerun of the same step encodes identically (what
// sensitivity probes rely on). Changing the scheme (set_scheme, or a bit allocator through settings())
// resizes the saved buffer at the next forward if it grew: the one allocation outside the constructor.
#pragma once

#include "compact/core/config.hpp"
#include "compact/core/error.hpp"
#include "compact/core/matrix_view.hpp"
#include "compact/core/projection.hpp"
#include "compact/core/workspace.hpp"
#include "compact/nn/compressed_linear.hpp"
#include "compact/optim/adamw.hpp"

#include <algorithm>
#include <cstddef>
#include <cstdint>

COMPACT_NAMESPACE_BEGIN

struct linear_options {
    std::uint64_t seed = 0;                        ///< the run's seed
    std::uint64_t layer = 0;                       ///< unique id of this layer's projection
    bool bias = true;
    index_t max_rows = 0;                          ///< largest N passed to forward (sizes Z); required
    distribution dist = distribution::gaussian;    ///< ignored when the policy forces the identity
    resampling resample{};                         ///< T: updates between new projections (0: never)
    moment_policy moments = moment_policy::keep;   ///< what the optimizer does when P changes
    /// Keep P (n, r) for as long as its epoch lasts instead of regenerating it in every forward and
    /// step. Costs n r values of memory (independent of N); off by default, as in SPEC section 1.
    /// Ignored for the identity projection, which needs no P.
    bool keep_projection = false;
    /// Keep State copies of W and b that the optimizer updates (W, b = their rounding to Scalar). Costs
    /// (m n + m) sizeof(State) bytes of state; off by default. Pointless but harmless for Scalar = State.
    bool master_weights = false;
};

template <class Scalar, class Policy, class Backend, class State = float>
class linear_layer {
public:
    using layer_type = compressed_linear<Scalar, Policy, Backend>;
    using optimizer_type = subspace_adamw<Scalar, Backend, State>;
    using context = typename Backend::context;
    template <class T>
    using buffer = typename Backend::template buffer<T>;

    /// True for the `quantized` policy (X kept in an activation store).
    static constexpr bool stores_input = layer_type::stores_input;

    linear_layer(index_t in, index_t out, const linear_options& options, Policy policy = {})
        : options_(options),
          layer_(in, out, options.seed, options.layer, policy, options.dist),
          optimizer_(out, layer_.projection(), options.moments)
    {
        COMPACT_REQUIRE(options.max_rows >= 1, "linear_layer", "options.max_rows=", options.max_rows,
                        " must be at least 1 (it sizes the saved activation)");
        const index_t r = layer_.rank();
        weight_.assign(static_cast<std::size_t>(out * in), Scalar(0));
        if constexpr (stores_input) saved_.assign(layer_.saved_bytes(options.max_rows), std::byte{0});
        else z_.assign(static_cast<std::size_t>(options.max_rows * r), Scalar(0));
        g_sub_.assign(static_cast<std::size_t>(out * r), Scalar(0));
        m_.assign(static_cast<std::size_t>(out * r), State(0));
        v_.assign(static_cast<std::size_t>(out * r), State(0));
        if (options.bias) {
            bias_.assign(static_cast<std::size_t>(out), Scalar(0));
            db_.assign(static_cast<std::size_t>(out), Scalar(0));
            bias_m_.assign(static_cast<std::size_t>(out), State(0));
            bias_v_.assign(static_cast<std::size_t>(out), State(0));
        }
        if (keeps_projection()) projection_.assign(static_cast<std::size_t>(in * r), Scalar(0));
        if (options.master_weights) {
            master_weight_.assign(static_cast<std::size_t>(out * in), State(0));
            if (options.bias) master_bias_.assign(static_cast<std::size_t>(out), State(0));
        }
        workspace_.assign(std::max(layer_.workspace_bytes(options.max_rows),
                                   optimizer_.workspace_bytes(options.master_weights)),
                          std::byte{0});
    }

    index_t in() const noexcept { return layer_.in(); }
    index_t out() const noexcept { return layer_.out(); }
    index_t rank() const noexcept { return layer_.rank(); }
    /// The options the layer was built with (checkpoints compare them with a saved state).
    const linear_options& options() const noexcept { return options_; }
    const layer_type& layer() const noexcept { return layer_; }
    /// The activation store's scheme and noise variant, for a bit allocator (stores_input only).
    store_settings& settings() noexcept { return layer_.settings(); }
    const store_scheme& scheme() const noexcept { return layer_.store().scheme(); }
    template <bool Stores = stores_input> // a template, so explicit instantiations of other layers compile
    void set_scheme(const store_scheme& s)
    {
        static_assert(Stores, "compact: set_scheme is for layers with the quantized policy");
        detail::check_scheme(s, "linear_layer::set_scheme");
        layer_.settings().scheme = s;
    }
    const optimizer_type& optimizer() const noexcept { return optimizer_; }

    /// The weight W (m, n) and bias (m, or null without bias), for initialisation and inspection.
    matrix_view<Scalar> weight() noexcept { return {weight_.data(), out(), in()}; }
    const_matrix_view<Scalar> weight() const noexcept { return {weight_.data(), out(), in()}; }
    Scalar* bias() noexcept { return options_.bias ? bias_.data() : nullptr; }
    const Scalar* bias() const noexcept { return options_.bias ? bias_.data() : nullptr; }
    /// The accumulated subspace gradient G_sub (m, r) and bias gradient since the last step.
    const_matrix_view<Scalar> gradient() const noexcept { return {g_sub_.data(), out(), rank()}; }
    const Scalar* bias_gradient() const noexcept { return options_.bias ? db_.data() : nullptr; }

    /// Moments and counters, for checkpoints and tests: M and V (m, r) of W with their counters, and the
    /// bias's M and V (m, or null without bias) with theirs.
    matrix_view<State> first_moment() noexcept { return {m_.data(), out(), rank()}; }
    matrix_view<State> second_moment() noexcept { return {v_.data(), out(), rank()}; }
    const_matrix_view<State> first_moment() const noexcept { return {m_.data(), out(), rank()}; }
    const_matrix_view<State> second_moment() const noexcept { return {v_.data(), out(), rank()}; }
    const adam_counters& counters() const noexcept { return counters_; }
    State* bias_first_moment() noexcept { return options_.bias ? bias_m_.data() : nullptr; }
    State* bias_second_moment() noexcept { return options_.bias ? bias_v_.data() : nullptr; }
    const State* bias_first_moment() const noexcept { return options_.bias ? bias_m_.data() : nullptr; }
    const State* bias_second_moment() const noexcept { return options_.bias ? bias_v_.data() : nullptr; }
    const adam_counters& bias_counters() const noexcept { return bias_counters_; }
    /// The master copies of W (m, n) and b (m) with options.master_weights: empty view / null otherwise
    /// (and null without bias). They hold the training state once master_valid(); before that they are
    /// overwritten from W and b by the next step or sync_master().
    matrix_view<State> master_weight() noexcept
    {
        return options_.master_weights ? matrix_view<State>(master_weight_.data(), out(), in()) : matrix_view<State>{};
    }
    const_matrix_view<State> master_weight() const noexcept
    {
        return options_.master_weights ? const_matrix_view<State>(master_weight_.data(), out(), in())
                                       : const_matrix_view<State>{};
    }
    State* master_bias() noexcept { return options_.master_weights && options_.bias ? master_bias_.data() : nullptr; }
    const State* master_bias() const noexcept
    {
        return options_.master_weights && options_.bias ? master_bias_.data() : nullptr;
    }
    /// True when the master copies hold the weights (after a step, sync_master() or loading a checkpoint
    /// that has them); false without master weights.
    bool master_valid() const noexcept { return master_valid_; }

    /// Sets the master copies to W and b (widened exactly), for after the caller has changed W or b
    /// between steps; the first step does it by itself. Without master weights it does nothing.
    void sync_master(const context& ctx)
    {
        if (!options_.master_weights) return;
        Backend::template axpby<Scalar, State>(ctx, 1.0, weight(), 0.0, master_weight());
        if (options_.bias)
            Backend::template axpby<Scalar, State>(ctx, 1.0, const_matrix_view<Scalar>(bias_.data(), 1, out()), 0.0,
                                                   matrix_view<State>(master_bias_.data(), 1, out()));
        master_valid_ = true;
    }

    /// True between a backward and the step that consumes its gradient (a checkpoint is taken after
    /// step(), so that no accumulated gradient is lost).
    bool gradient_pending() const noexcept { return has_gradient_; }

    /// Drops the gradient accumulated since the last step (for example after a sensitivity probe's
    /// backward pass, which must not reach the optimizer); the next backward overwrites.
    void discard_gradient() noexcept { has_gradient_ = false; }

    /// Sets the counters of a restored state, for checkpoint loading: the completed updates (which select
    /// P's epoch) and the counters of W's and b's moments. Write the weights and moments through the
    /// accessors above first; this discards any accumulated gradient and saved activation, and drops the
    /// kept projection so the next forward regenerates P for the restored epoch. The counters must be
    /// ones a run can reach: weight.step, bias.step <= updates and weight.epoch <= the epoch of updates.
    /// master_restored: the master copies were written too (master weights only); otherwise the next
    /// step takes them from the restored W and b.
    void restore_counters(std::uint64_t updates, const adam_counters& weight, const adam_counters& bias,
                          bool master_restored = false)
    {
        constexpr const char* where = "linear_layer::restore_counters";
        COMPACT_REQUIRE(!master_restored || options_.master_weights, where,
                        "master_restored is set but the layer was built without options.master_weights");
        const std::uint64_t current = options_.resample.epoch(updates);
        COMPACT_REQUIRE(current < static_cast<std::uint64_t>(detail::max_counter_word), where, "updates=", updates,
                        " gives epoch ", current, ", which must be below 2^32");
        COMPACT_REQUIRE(weight.step <= updates && bias.step <= updates && weight.epoch <= current, where,
                        "counters (weight step=", weight.step, " epoch=", weight.epoch, ", bias step=", bias.step,
                        ") cannot follow ", updates, " updates (epoch ", current, ")");
        updates_ = updates;
        counters_ = weight;
        bias_counters_ = bias;
        has_gradient_ = false;
        rows_ = -1;
        projection_valid_ = false;
        master_valid_ = master_restored;
    }

    /// Completed optimizer updates, and the epoch of P that forward uses now.
    std::uint64_t updates() const noexcept { return updates_; }
    std::uint64_t epoch() const noexcept { return options_.resample.epoch(updates_); }

    /// Bytes kept between forward and backward for N rows (with the current scheme for a store).
    std::size_t saved_bytes(index_t rows) const noexcept { return layer_.saved_bytes(rows); }
    /// Bytes of the kept projection (0 unless options.keep_projection).
    std::size_t projection_bytes() const noexcept { return projection_.size() * sizeof(Scalar); }
    /// Bytes of optimizer state: moments of W and b, and their master copies with master weights.
    std::size_t state_bytes() const noexcept
    {
        return optimizer_.state_bytes() + (options_.bias ? adamw<Backend>::template state_bytes<State>(1, out()) : 0) +
               (master_weight_.size() + master_bias_.size()) * sizeof(State);
    }

    /// Y (N, m) = X (N, n) W^T + b; keeps Z = X P for backward. N <= max_rows.
    void forward(const context& ctx, const_matrix_view<Scalar> x, matrix_view<Scalar> y)
    {
        COMPACT_REQUIRE(x.rows <= options_.max_rows, "linear_layer::forward", "X has ", x.rows,
                        " rows but the layer was built for max_rows=", options_.max_rows);
        if constexpr (stores_input) {
            const std::size_t need = layer_.saved_bytes(x.rows);
            if (saved_.size() < need) {
                rows_ = -1; // the previous forward's encoding goes with the old buffer
                saved_tensor_ = {};
                saved_.assign(need, std::byte{0});
            }
            saved_tensor_.data = saved_.data();
            saved_tensor_.capacity = saved_.size();
            layer_.forward(ctx, x, weight(), bias(), y, saved_tensor_, noise_step());
        } else {
            matrix_view<Scalar> z(z_.data(), x.rows, rank());
            if (keeps_projection())
                layer_.forward(ctx, x, weight(), bias(), y, z, kept_projection(ctx));
            else
                layer_.forward(ctx, x, weight(), bias(), y, z, epoch(), ws());
        }
        rows_ = x.rows;
    }

    /// dX (N, n) = dY W, or skipped when dx is empty; G_sub and db accumulate until step().
    void backward(const context& ctx, const_matrix_view<Scalar> dy, matrix_view<Scalar> dx)
    {
        COMPACT_REQUIRE(rows_ >= 0, "linear_layer::backward", "called without a preceding forward");
        COMPACT_REQUIRE(dy.rows == rows_, "linear_layer::backward", "dY is ", shape_string(dy),
                        " but the last forward saved ", rows_, " rows");
        const write_mode mode = has_gradient_ ? write_mode::accumulate : write_mode::overwrite;
        Scalar* db = options_.bias ? db_.data() : nullptr;
        if constexpr (stores_input) {
            layer_.backward(ctx, dy, weight(), saved_tensor_, dx, {g_sub_.data(), out(), rank()}, db, ws(), mode);
        } else {
            const_matrix_view<Scalar> z(z_.data(), rows_, rank());
            layer_.backward(ctx, dy, weight(), z, dx, {g_sub_.data(), out(), rank()}, db, mode);
        }
        has_gradient_ = true;
        rows_ = -1;
    }

    /// One optimizer update from the accumulated gradients; the next forward may use a new P.
    void step(const context& ctx, const adamw_params& h)
    {
        COMPACT_REQUIRE(has_gradient_, "linear_layer::step", "no gradient since the last step");
        if (options_.master_weights && !master_valid_) sync_master(ctx);
        optimizer_.step(ctx, h, weight(), gradient(), first_moment(), second_moment(), counters_, epoch(), ws(),
                        keeps_projection() ? kept_projection(ctx) : const_matrix_view<Scalar>{}, master_weight());
        if (options_.bias)
            adamw<Backend>::step(ctx, h, matrix_view<Scalar>(bias_.data(), 1, out()),
                                 const_matrix_view<Scalar>(db_.data(), 1, out()),
                                 matrix_view<State>(bias_m_.data(), 1, out()),
                                 matrix_view<State>(bias_v_.data(), 1, out()), bias_counters_,
                                 options_.master_weights ? matrix_view<State>(master_bias_.data(), 1, out())
                                                         : matrix_view<State>{});
        has_gradient_ = false;
        ++updates_;
    }

private:
    workspace ws() noexcept { return {workspace_.data(), workspace_.size()}; }

    /// The noise stream of a store's encoding: the update count, wrapped to the 32 bits the noise
    /// counter holds.
    std::uint64_t noise_step() const noexcept { return updates_ & 0xFFFFFFFFu; }

    /// The identity is never kept: its Z is a copy of X and its update needs no P.
    bool keeps_projection() const noexcept { return options_.keep_projection && !layer_.projection().is_identity(); }

    /// The kept P of the current epoch, regenerated when the epoch has moved on.
    const_matrix_view<Scalar> kept_projection(const context& ctx)
    {
        matrix_view<Scalar> p(projection_.data(), in(), rank());
        if (!projection_valid_ || projection_epoch_ != epoch()) {
            Backend::template generate_projection<Scalar>(ctx, layer_.projection().spec(epoch()), 0, 0, p);
            projection_epoch_ = epoch();
            projection_valid_ = true;
        }
        return p;
    }

    linear_options options_;
    layer_type layer_;
    optimizer_type optimizer_;
    buffer<Scalar> weight_, bias_, z_, g_sub_, db_, projection_;
    buffer<State> m_, v_, bias_m_, bias_v_;
    buffer<State> master_weight_, master_bias_; // (m, n) and (m), with options.master_weights only
    buffer<std::byte> workspace_, saved_;
    saved_tensor saved_tensor_{};
    adam_counters counters_{}, bias_counters_{};
    std::uint64_t updates_ = 0;
    index_t rows_ = -1;
    bool has_gradient_ = false;
    std::uint64_t projection_epoch_ = 0;
    bool projection_valid_ = false;
    bool master_valid_ = false;
};

COMPACT_NAMESPACE_END
