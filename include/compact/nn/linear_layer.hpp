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
// The compressor is the Policy's (compress/compressor.hpp): a rank policy's random projection, an
// activation store (compact::quantized: the full (m, n) gradient and plain AdamW), or one of the caller's.
// The layer calls it only through the concept. A compressor whose saved bytes can grow between steps (a
// bit allocator raising a store's bits through compressor().settings()) makes the next forward regrow
// the saved buffer: the one allocation outside the constructor.
//
// Compressor state (compress/compressor.hpp: VeLoRA's direction, WTA-CRS's row norms): the layer owns
// compressor_state_bytes() = compressor().state_bytes(options.max_rows) bytes of it, allocated and bound in
// the constructor (initialised on the default context, which the constructor then waits for, as it waits
// for its other buffers' initial values); reset_compressor_state(ctx) re-initialises it. Checkpoints save
// and restore its bytes. Compressors without state get none (0 bytes).
//
// Non-finite gradients (options.skip_nonfinite, for fp16 training with optim/loss_scaler.hpp): step()
// first checks G and db (one synchronisation on CUDA); when either holds a NaN or an infinity the step
// is skipped as mixed-precision trainers skip it: W, b, the moments, the masters and every counter
// keep their bits, updates() does not advance (so P's epoch does not either), the gradient is
// discarded, skipped_steps() counts it and step() returns false. The next backward and step then
// proceed exactly as if the skipped step had never been taken. A trainer with several layers should
// rather check them all at once (check_gradients into one nonfinite_check) and skip them together.
// adamw_params::grad_scale (1 / the loss scale) unscales the gradients inside the optimizer.
//
// Ownership: a layer owns its buffers and what it saved points into them, so it is move-only.
#pragma once

#include "compact/core/config.hpp"
#include "compact/core/error.hpp"
#include "compact/core/matrix_view.hpp"
#include "compact/compress/compressor.hpp"
#include "compact/core/checked.hpp"
#include "compact/core/shape.hpp"
#include "compact/core/workspace.hpp"
#include "compact/nn/compressed_linear.hpp"
#include "compact/optim/adamw.hpp"
#include "compact/random/projection.hpp"

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <optional>

COMPACT_NAMESPACE_BEGIN

struct linear_options {
    std::uint64_t seed = 0;                        ///< the run's seed
    std::uint64_t layer = 0;                       ///< unique id of this layer's compressor
    bool bias = true;
    index_t max_rows = 0;                          ///< largest N passed to forward (sizes the saved buffer); required
    distribution dist = distribution::gaussian;    ///< ignored when the policy forces the identity
    resampling resample{};                         ///< T: updates between new projections (0: never)
    moment_policy moments = moment_policy::keep;   ///< what the optimizer does when P changes
    /// Keep P (n, r) for as long as its epoch lasts instead of regenerating it in every forward and
    /// step. Costs n r values of memory (independent of N); off by default, as in SPEC section 1.
    /// Ignored for the identity projection, which needs no P, and for compressors without a projection.
    bool keep_projection = false;
    /// Keep State copies of W and b that the optimizer updates (W, b = their rounding to Scalar). Costs
    /// (m n + m) sizeof(State) bytes of state; off by default. Pointless but harmless for Scalar = State.
    bool master_weights = false;
    /// Check the gradients before each step and skip a step whose weight or bias gradient holds a NaN
    /// or an infinity (step() returns false). Costs one read of G and db and one synchronisation per
    /// step on CUDA; off by default.
    bool skip_nonfinite = false;
};

template <class Scalar, class Policy, class Backend, class State = default_state_t<Scalar>>
class linear_layer {
public:
    using layer_type = compressed_linear<Scalar, Policy, Backend>;
    using compressor_type = typename layer_type::compressor_type;
    using saved_type = typename layer_type::saved_type;
    using optimizer_type = compressed_adamw<compressor_type, State>;
    using context = typename Backend::context;
    template <class T>
    using buffer = typename Backend::template buffer<T>;

    linear_layer(in_features in, out_features out, const linear_options& options, const Policy& policy = Policy{})
        : options_(checked_options(in.value, out.value, options)),
          layer_(in, out, options.seed, options.layer, policy, options.dist, options.resample, "linear_layer"),
          optimizer_(out, layer_.compressor(), options.moments)
    {
        constexpr const char* where = "linear_layer";
        const index_t r = layer_.rank();
        const auto count = [&](index_t rows, index_t cols) {
            return static_cast<std::size_t>(detail::checked_mul(rows, cols, where));
        };
        weight_.assign(count(out.value, in.value), Scalar(0));
        saved_memory_.assign(layer_.saved_bytes(options.max_rows), std::byte{0});
        g_.assign(count(out.value, r), Scalar(0));
        m_.assign(count(out.value, r), State(0));
        v_.assign(count(out.value, r), State(0));
        if (options.bias) {
            bias_.assign(count(1, out.value), Scalar(0));
            db_.assign(count(1, out.value), Scalar(0));
            bias_m_.assign(count(1, out.value), State(0));
            bias_v_.assign(count(1, out.value), State(0));
        }
        if constexpr (layer_type::subspace) {
            if (options.keep_projection && !layer_.projection().is_identity()) {
                projection_.assign(count(in.value, r), Scalar(0));
                layer_.compressor().projection().keep({projection_.data(), in.value, r});
            }
        }
        if (options.master_weights) {
            master_weight_.assign(count(out.value, in.value), State(0));
            if (options.bias) master_bias_.assign(count(1, out.value), State(0));
        }
        workspace_.assign(std::max(layer_.workspace_bytes(options.max_rows),
                                   optimizer_.workspace_bytes(options.master_weights)),
                          std::byte{0});
        grads_.weight = {g_.data(), out.value, r};
        if (options.bias) grads_.bias = {db_.data(), 1, out.value};
        if (options.skip_nonfinite) check_.emplace();
        if constexpr (layer_type::has_state) {
            compressor_state_.assign(layer_.state_bytes(options.max_rows), std::byte{0});
            const context ctx{};
            reset_compressor_state(ctx);
            if (!compressor_state_.empty()) { // wait for the initialisation (a synchronous one-byte copy)
                std::byte first{};
                Backend::copy_to_host(ctx, compressor_state_.data(), &first, 1);
            }
        }
    }

    // What forward saved points into this layer's own buffers: a copy would share them.
    linear_layer(const linear_layer&) = delete;
    linear_layer& operator=(const linear_layer&) = delete;
    linear_layer(linear_layer&&) noexcept = default;
    linear_layer& operator=(linear_layer&&) noexcept = default;

    index_t in() const noexcept { return layer_.in(); }
    index_t out() const noexcept { return layer_.out(); }
    index_t rank() const noexcept { return layer_.rank(); }
    /// The options the layer was built with (checkpoints compare them with a saved state).
    const linear_options& options() const noexcept { return options_; }
    const layer_type& layer() const noexcept { return layer_; }
    /// The compressor, for its own settings (a store's scheme for a bit allocator, say).
    const compressor_type& compressor() const noexcept { return layer_.compressor(); }
    compressor_type& compressor() noexcept { return layer_.compressor(); }
    const optimizer_type& optimizer() const noexcept { return optimizer_; }

    /// The weight W (m, n) and bias (m, or null without bias), for initialisation and inspection.
    matrix_view<Scalar> weight() noexcept { return {weight_.data(), out(), in()}; }
    const_matrix_view<Scalar> weight() const noexcept { return {weight_.data(), out(), in()}; }
    Scalar* bias() noexcept { return options_.bias ? bias_.data() : nullptr; }
    const Scalar* bias() const noexcept { return options_.bias ? bias_.data() : nullptr; }
    /// The bias as the (1, m) view compressed_linear takes, or an empty view without bias.
    const_matrix_view<Scalar> bias_view() const noexcept
    {
        return options_.bias ? const_matrix_view<Scalar>(bias_.data(), 1, out()) : const_matrix_view<Scalar>{};
    }
    /// The accumulated weight gradient since the last step: G_sub (m, r), or G (m, n) for a full-shape
    /// compressor; and the bias gradient (m, or null without bias).
    const_matrix_view<Scalar> gradient() const noexcept { return {g_.data(), out(), rank()}; }
    /// Both gradients with the epoch they were computed under.
    const layer_gradient<Scalar>& gradients() const noexcept { return grads_; }
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

    /// The compressor's persistent state (compress/compressor.hpp), in the backend's memory: its bytes
    /// (0 for a compressor without state) and where they are, for checkpoints.
    std::size_t compressor_state_bytes() const noexcept { return compressor_state_.size(); }
    std::byte* compressor_state() noexcept { return compressor_state_.data(); }
    const std::byte* compressor_state() const noexcept { return compressor_state_.data(); }
    /// Re-initialises the compressor's state on ctx's stream (as a new layer's), e.g. to restart it. A
    /// no-op without state.
    void reset_compressor_state(const context& ctx)
    {
        if constexpr (layer_type::has_state)
            layer_.bind_state(ctx, compressor_state_.data(), compressor_state_.size());
        else (void)ctx;
    }

    /// True between a backward and the step that consumes its gradient (a checkpoint is taken after
    /// step(), so that no accumulated gradient is lost).
    bool gradient_pending() const noexcept { return grads_.written; }

    /// Drops the gradient accumulated since the last step (for example after a sensitivity probe's
    /// backward pass, which must not reach the optimizer); the next backward overwrites.
    void discard_gradient() noexcept { grads_.written = false; }

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
        grads_.written = false;
        rows_ = -1;
        saved_ = {};
        master_valid_ = master_restored;
    }

    /// Completed optimizer updates, and the epoch of the resampling schedule (options.resample) now: the
    /// epoch of P for a random projection.
    std::uint64_t updates() const noexcept { return updates_; }
    std::uint64_t epoch() const noexcept { return options_.resample.epoch(updates_); }

    /// Bytes kept between forward and backward for N rows (with a store's current scheme).
    std::size_t saved_bytes(index_t rows) const { return layer_.saved_bytes(rows); }
    /// Bytes of the kept projection (0 unless options.keep_projection).
    std::size_t projection_bytes() const noexcept { return projection_.size() * sizeof(Scalar); }
    /// Bytes of optimizer state: moments of W and b, and their master copies with master weights.
    std::size_t state_bytes() const noexcept
    {
        return optimizer_.state_bytes() + (options_.bias ? adamw<Backend>::template state_bytes<State>(1, out()) : 0) +
               (master_weight_.size() + master_bias_.size()) * sizeof(State);
    }

    /// Y (N, m) = X (N, n) W^T + b; keeps what the compressor keeps of X for backward. N <= max_rows.
    void forward(const context& ctx, const_matrix_view<Scalar> x, matrix_view<Scalar> y)
    {
        constexpr const char* where = "linear_layer::forward";
        // The shapes are checked here, so that errors name the function the caller called.
        detail::check_view(x, where, "X");
        COMPACT_REQUIRE(x.cols == in(), where, "X is ", shape_string(x), " but the layer expects (N, ", in(), ")");
        COMPACT_REQUIRE(x.rows <= options_.max_rows, where, "X has ", x.rows,
                        " rows but the layer was built for max_rows=", options_.max_rows);
        detail::check_shape(y, x.rows, out(), where, "Y");
        rows_ = -1; // until this forward has saved
        saved_ = {};
        const std::size_t need = layer_.saved_bytes(std::max<index_t>(x.rows, 0));
        if (saved_memory_.size() < need) saved_memory_.assign(need, std::byte{0});
        saved_ = bind_saved<saved_type>(saved_memory_.data(), saved_memory_.size());
        layer_.forward(ctx, x, weight(), bias_view(), y, saved_, updates_, ws());
        rows_ = x.rows;
    }

    /// dX (N, n) = dY W, or skipped when dx is empty; the gradients accumulate until step().
    void backward(const context& ctx, const_matrix_view<Scalar> dy, matrix_view<Scalar> dx)
    {
        constexpr const char* where = "linear_layer::backward";
        COMPACT_REQUIRE(rows_ >= 0, where, "called without a preceding forward");
        detail::check_view(dy, where, "dY");
        COMPACT_REQUIRE(dy.rows == rows_ && dy.cols == out(), where, "dY is ", shape_string(dy), " but (", rows_, ", ",
                        out(), ") is required (the rows of the last forward)");
        detail::check_optional_shape(dx, rows_, in(), where, "dX");
        const write_mode mode = grads_.written ? write_mode::accumulate : write_mode::overwrite;
        layer_.backward(ctx, dy, weight(), saved_, dx, grads_, ws(), mode);
        rows_ = -1;
    }

    /// Adds G and db to a caller's check (launched only; no synchronisation), so that a trainer checks
    /// all its layers' gradients with one check.found() and skips them together (discard_gradient).
    void check_gradients(const context& ctx, nonfinite_check<Backend>& check) const
    {
        COMPACT_REQUIRE(grads_.written, "linear_layer::check_gradients", "no gradient since the last step");
        check.add(ctx, const_matrix_view<Scalar>(g_.data(), out(), rank()));
        if (options_.bias) check.add(ctx, const_matrix_view<Scalar>(db_.data(), 1, out()));
    }

    /// Steps skipped for a non-finite gradient (options.skip_nonfinite) since construction; not part of
    /// the training state (checkpoints do not save it).
    std::uint64_t skipped_steps() const noexcept { return skipped_; }

    /// One optimizer update from the accumulated gradients, with `h` for W and for b; the next forward
    /// may use a new P. Returns true, or false when options.skip_nonfinite found a NaN or an infinity in
    /// the gradients and skipped the step (nothing changed; the gradient is discarded).
    bool step(const context& ctx, const adamw_params& h) { return step(ctx, h, h); }

    /// The same with the bias's own hyper-parameters (commonly weight_decay = 0; alpha is not used).
    bool step(const context& ctx, const adamw_params& h, const adamw_params& bias_h)
    {
        COMPACT_REQUIRE(grads_.written, "linear_layer::step", "no gradient since the last step");
        // Both hyper-parameter sets are validated before W changes, so a bad bias_h cannot leave W updated
        // and the gradient pending (a retry would apply W's update twice).
        detail::adam_step_coefficients(h, counters_.step + 1, h.alpha, "linear_layer::step (weight)");
        if (options_.bias) detail::adam_step_coefficients(bias_h, bias_counters_.step + 1, 1.0, "linear_layer::step (bias)");
        if (check_) {
            check_->reset(ctx);
            check_gradients(ctx, *check_);
            if (check_->found(ctx)) {
                discard_gradient();
                ++skipped_;
                return false;
            }
        }
        if (options_.master_weights && !master_valid_) sync_master(ctx);
        optimizer_.step(ctx, h, layer_.compressor(), weight(), grads_, first_moment(), second_moment(), counters_,
                        ws(), master_weight());
        if (options_.bias)
            adamw<Backend>::step(ctx, bias_h, matrix_view<Scalar>(bias_.data(), 1, out()),
                                 const_matrix_view<Scalar>(db_.data(), 1, out()),
                                 matrix_view<State>(bias_m_.data(), 1, out()),
                                 matrix_view<State>(bias_v_.data(), 1, out()), bias_counters_,
                                 options_.master_weights ? matrix_view<State>(master_bias_.data(), 1, out())
                                                         : matrix_view<State>{});
        grads_.written = false;
        ++updates_;
        return true;
    }

    /// Workspace bytes the layer holds: enough for forward, backward and step at max_rows.
    std::size_t workspace_bytes() const noexcept { return workspace_.size(); }

private:
    workspace ws() noexcept { return {workspace_.data(), workspace_.size()}; }

    static const linear_options& checked_options(index_t in, index_t out, const linear_options& options)
    {
        constexpr const char* where = "linear_layer";
        COMPACT_REQUIRE(in >= 1 && out >= 1, where, "in=", in, " and out=", out, " must be positive");
        COMPACT_REQUIRE(options.max_rows >= 1, where, "options.max_rows=", options.max_rows,
                        " must be at least 1 (it sizes the saved activation)");
        COMPACT_REQUIRE(static_cast<unsigned>(options.moments) <= static_cast<unsigned>(moment_policy::transfer), where,
                        "options.moments=", static_cast<unsigned>(options.moments), " is not keep, reset or transfer");
        COMPACT_REQUIRE(static_cast<unsigned>(options.dist) <= static_cast<unsigned>(distribution::identity), where,
                        "options.dist=", static_cast<unsigned>(options.dist),
                        " is not gaussian, rademacher or identity");
        // Every buffer's size, before any is allocated (the weights are the largest of m n, m r, n r).
        detail::checked_mul_size(out, in, sizeof(Scalar) > sizeof(State) ? sizeof(Scalar) : sizeof(State), where);
        return options;
    }

    linear_options options_;
    layer_type layer_;
    optimizer_type optimizer_;
    buffer<Scalar> weight_, bias_, g_, db_, projection_;
    buffer<State> m_, v_, bias_m_, bias_v_;
    buffer<State> master_weight_, master_bias_; // (m, n) and (m), with options.master_weights only
    buffer<std::byte> workspace_, saved_memory_;
    buffer<std::byte> compressor_state_; // compressor().state_bytes(max_rows), bound to the compressor
    saved_type saved_{};
    layer_gradient<Scalar> grads_{};
    adam_counters counters_{}, bias_counters_{};
    std::optional<nonfinite_check<Backend>> check_; // with options.skip_nonfinite
    std::uint64_t updates_ = 0, skipped_ = 0;
    index_t rows_ = -1;
    bool master_valid_ = false;
};

/// Workspace for a caller-memory layer and its optimizer together: forward and backward with up to
/// `rows` rows, and step (with or without a master copy of W).
template <class Scalar, class Policy, class Backend, class State>
std::size_t training_workspace_bytes(const compressed_linear<Scalar, Policy, Backend>& layer,
                                     const compressed_adamw<typename compressed_linear<Scalar, Policy, Backend>::compressor_type, State>& optimizer,
                                     index_t rows, bool with_master = false)
{
    return std::max(layer.workspace_bytes(rows), optimizer.workspace_bytes(with_master));
}

COMPACT_NAMESPACE_END
