// compact/optim/loss_scaler.hpp: dynamic loss scaling for fp16 training (host-side bookkeeping only).
//
// fp16 gradients underflow below 2^-24; multiplying the loss gradient by a large scale S keeps them
// representable, and the optimizer divides S out again. S is adapted: it halves (backoff) on a step
// whose gradients overflowed to infinity or NaN, and doubles (growth) after growth_interval clean
// steps in a row, within [min_scale, max_scale]; PyTorch's GradScaler and Apex's dynamic scaler
// follow the same rule. With the defaults every scale is a power of two, so scaling and unscaling are
// exact: a run with loss scaling gives the bits of a run without it while nothing overflows or
// underflows.
//
// One training step with linear_layer (options.skip_nonfinite on each layer, or a nonfinite_check of
// all of them at once so that the layers skip together):
//
//   compact::loss_scaler scaler;                          // scale() = 2^16
//   ...forward; dY of the loss, multiplied by scaler.scale() (axpby(ctx, scaler.scale(), dY, 0, dY))
//   ...backward through every layer (dX, G_sub and db all carry the factor scale())
//   check.reset(ctx); fc1.check_gradients(ctx, check); fc2.check_gradients(ctx, check);
//   const bool overflow = check.found(ctx);               // one synchronisation for all layers
//   hyper.grad_scale = scaler.unscale();                  // the optimizer divides S out, in State
//   if (overflow) { fc1.discard_gradient(); fc2.discard_gradient(); }
//   else { fc1.step(ctx, hyper); fc2.step(ctx, hyper); }
//   scaler.update(overflow);                              // back off or count a clean step
//
// The unscaling happens in the optimizer (adamw_params::grad_scale multiplies G in State precision
// before the moment update), so no pass over the gradients is needed. Gradients checked or clipped
// by the caller's own code are still scaled: divide their norms by scale().
//
// Checkpoints: state() and restore() expose the whole state (the scale, the clean-step count and the
// number of skipped steps); options are the caller's.
#pragma once

#include "compact/core/config.hpp"
#include "compact/core/error.hpp"

#include <cmath>
#include <cstdint>

COMPACT_NAMESPACE_BEGIN

struct loss_scaler_options {
    double init_scale = 65536.0;          ///< 2^16
    double growth_factor = 2.0;           ///< scale *= growth_factor after growth_interval clean steps
    double backoff_factor = 0.5;          ///< scale *= backoff_factor after a non-finite step
    std::uint64_t growth_interval = 2000; ///< clean steps in a row before a growth
    double min_scale = 1.0;               ///< the scale never backs off below this
    double max_scale = 16777216.0;        ///< 2^24: the scale never grows above this
};

/// Everything a loss_scaler changes; save it with the model, restore it to resume bit for bit.
struct loss_scaler_state {
    double scale = 65536.0;
    std::uint64_t clean_steps = 0;   ///< clean steps since the last growth or backoff
    std::uint64_t skipped_steps = 0; ///< non-finite steps since the start
};

class loss_scaler {
public:
    explicit loss_scaler(const loss_scaler_options& options = {}) : options_(checked(options))
    {
        state_.scale = options.init_scale;
    }

    /// The factor to multiply the loss gradient (dY of the loss) by.
    double scale() const noexcept { return state_.scale; }
    /// 1 / scale(): the factor that restores the gradients, as adamw_params::grad_scale.
    double unscale() const noexcept { return 1.0 / state_.scale; }

    /// After each step: found_nonfinite (the step was skipped) backs the scale off, to no less than
    /// min_scale, and restarts the clean count; otherwise one more clean step, and after
    /// growth_interval of them the scale grows, to no more than max_scale.
    void update(bool found_nonfinite) noexcept
    {
        if (found_nonfinite) {
            state_.scale = std::fmax(state_.scale * options_.backoff_factor, options_.min_scale);
            state_.clean_steps = 0;
            ++state_.skipped_steps;
            return;
        }
        if (++state_.clean_steps >= options_.growth_interval) {
            state_.scale = std::fmin(state_.scale * options_.growth_factor, options_.max_scale);
            state_.clean_steps = 0;
        }
    }

    const loss_scaler_options& options() const noexcept { return options_; }
    const loss_scaler_state& state() const noexcept { return state_; }

    /// Resumes from a saved state: its scale must lie in [min_scale, max_scale], its clean count below
    /// growth_interval.
    void restore(const loss_scaler_state& state)
    {
        COMPACT_REQUIRE(std::isfinite(state.scale) && state.scale >= options_.min_scale &&
                            state.scale <= options_.max_scale,
                        "loss_scaler::restore", "scale=", state.scale, " is not in [", options_.min_scale, ", ",
                        options_.max_scale, "]");
        COMPACT_REQUIRE(state.clean_steps < options_.growth_interval, "loss_scaler::restore",
                        "clean_steps=", state.clean_steps, " must be below growth_interval=", options_.growth_interval);
        state_ = state;
    }

private:
    static const loss_scaler_options& checked(const loss_scaler_options& o)
    {
        constexpr const char* where = "loss_scaler";
        COMPACT_REQUIRE(std::isfinite(o.min_scale) && std::isfinite(o.max_scale) && o.min_scale > 0 &&
                            o.min_scale <= o.max_scale,
                        where, "min_scale=", o.min_scale, " and max_scale=", o.max_scale,
                        " must be finite with 0 < min_scale <= max_scale");
        COMPACT_REQUIRE(o.init_scale >= o.min_scale && o.init_scale <= o.max_scale, where, "init_scale=",
                        o.init_scale, " is not in [min_scale, max_scale] = [", o.min_scale, ", ", o.max_scale, "]");
        COMPACT_REQUIRE(std::isfinite(o.growth_factor) && o.growth_factor >= 1, where, "growth_factor=",
                        o.growth_factor, " must be finite and at least 1");
        COMPACT_REQUIRE(o.backoff_factor > 0 && o.backoff_factor < 1, where, "backoff_factor=", o.backoff_factor,
                        " must be in (0, 1)");
        COMPACT_REQUIRE(o.growth_interval >= 1, where, "growth_interval must be at least 1");
        return o;
    }

    loss_scaler_options options_;
    loss_scaler_state state_;
};

COMPACT_NAMESPACE_END
