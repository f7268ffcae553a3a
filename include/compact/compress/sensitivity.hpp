// compact/compress/sensitivity.hpp: sensitivity estimates and the adaptive bit-allocation controller
// (GACT, ALAM; SPEC section 5).
//
// The sensitivity C_l of saved tensor l is how much its compression moves the weight gradient. GACT
// measures it with three extra forward+backward passes on one batch in which only tensor l changes:
// 1-bit codes with noise variant 0 (g0), 1-bit codes with variant 1 (g1), and 8-bit codes (g2), and
// takes
//     C_l = max(|g0 - g1|^2, 2 max(|g0 - g2|^2, |g1 - g2|^2))
// over the flat gradient of every parameter (sensitivity_method::gact: memory of two gradients, in
// double: the third probe is compared value by value as it arrives instead of being kept).
// ALAM's GradNormVar applies the same formula to the vector of per-parameter-tensor gradient norms
// (sensitivity_method::grad_norm_var: a few numbers per probe). Since | |a| - |b| | <= |a - b| tensor
// by tensor, GradNormVar never exceeds GACT's estimate on the same probes.
//
// The controller, bit_allocator, owns nothing of the model. The trainer registers each store with its
// settings and values per step, and calls update(step, rerun) every step; when the schedule says so it
// estimates every sensitivity and writes a new allocation into the registered settings:
//
//   compact::bit_allocator alloc(options, compact::sensitivity_method::gact,
//                                compact::allocation_schedule::every(1000));
//   alloc.add(fc1.compressor().settings(), batch * 784);   // D_l: values the tensor holds per step
//   alloc.add(fc2.compressor().settings(), batch * 1024);
//   ...
//   alloc.update(step, [&](compact::gradient_probe& probe) {
//       forward_and_backward(batch);                 // same batch, no optimizer step
//       probe.add(fc1.gradient());                   // every parameter gradient, same order each time
//       probe.add(fc2.gradient());
//   });
//
// The rerun must reproduce the same computation apart from the stores' settings: the same batch, no
// step, and the same noise for the other tensors (linear_layer keys its noise by the update count, so
// reruns within one step encode identically).
#pragma once

#include "compact/compress/activation_store.hpp"
#include "compact/compress/bit_allocation.hpp"
#include "compact/backend/store_scheme.hpp"
#include "compact/core/config.hpp"
#include "compact/core/error.hpp"
#include "compact/core/matrix_view.hpp"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <vector>

COMPACT_NAMESPACE_BEGIN

enum class sensitivity_method : std::uint8_t {
    gact,          ///< GACT: differences of the flat gradient
    grad_norm_var, ///< ALAM: differences of the per-parameter-tensor gradient norms
};

/// One probe's gradient, as the method needs it: the trainer's rerun calls add() for every parameter
/// gradient (host memory), in the same order on every call. A probe built against two earlier probes
/// (compared_with) keeps nothing: it accumulates its squared distances to them value by value.
class gradient_probe {
public:
    explicit gradient_probe(sensitivity_method method) : method_(method) {}

    /// A probe that stores nothing and sums |this - a|^2 and |this - b|^2 as values arrive; a and b must
    /// outlive it and hold the same method's values.
    static gradient_probe compared_with(const gradient_probe& a, const gradient_probe& b)
    {
        COMPACT_REQUIRE(a.method_ == b.method_ && a.data_.size() == b.data_.size() && !a.streamed() &&
                            !b.streamed(),
                        "gradient_probe::compared_with", "the two stored probes differ (", a.data_.size(), " and ",
                        b.data_.size(), " values)");
        gradient_probe p(a.method_);
        p.a_ = &a;
        p.b_ = &b;
        return p;
    }

    /// Room for `count` values (the size of an earlier probe), so that a large flat gradient is not
    /// copied while it grows.
    void reserve(std::size_t count)
    {
        if (!streamed()) data_.reserve(count);
    }

    template <class T>
    void add(const T* values, std::size_t count)
    {
        COMPACT_REQUIRE(count == 0 || values != nullptr, "gradient_probe::add", "values is null but count=", count);
        if (method_ == sensitivity_method::gact) {
            for (std::size_t k = 0; k < count; ++k) put(static_cast<double>(values[k]));
        } else {
            double sum = 0;
            for (std::size_t k = 0; k < count; ++k) sum += static_cast<double>(values[k]) * static_cast<double>(values[k]);
            put(std::sqrt(sum));
        }
        ++tensors_;
    }

    /// A (rows, cols) gradient such as linear_layer::gradient().
    template <class T>
    void add(const_matrix_view<T> g)
    {
        detail::check_view(g, "gradient_probe::add", "g");
        if (method_ == sensitivity_method::gact) {
            for (index_t i = 0; i < g.rows; ++i) add_values(g.row(i), static_cast<std::size_t>(g.cols));
            ++tensors_;
        } else {
            double sum = 0;
            for (index_t i = 0; i < g.rows; ++i)
                for (index_t j = 0; j < g.cols; ++j) sum += static_cast<double>(g(i, j)) * static_cast<double>(g(i, j));
            put(std::sqrt(sum));
            ++tensors_;
        }
    }

    sensitivity_method method() const noexcept { return method_; }
    /// The flat gradient (gact) or the norms (grad_norm_var); empty for a compared_with probe.
    const std::vector<double>& data() const noexcept { return data_; }
    std::size_t tensors() const noexcept { return tensors_; }
    /// Values added so far.
    std::size_t size() const noexcept { return streamed() ? compared_ : data_.size(); }
    bool streamed() const noexcept { return a_ != nullptr; }
    /// A compared_with probe's |this - a|^2 and |this - b|^2 (summed in value order, as
    /// probe_sensitivity sums them); NaN when more values arrived than a and b hold.
    double distance_to_a() const noexcept { return distance_a_; }
    double distance_to_b() const noexcept { return distance_b_; }

private:
    template <class T>
    void add_values(const T* p, std::size_t n)
    {
        for (std::size_t k = 0; k < n; ++k) put(static_cast<double>(p[k]));
    }

    void put(double x)
    {
        if (!streamed()) {
            data_.push_back(x);
            return;
        }
        if (compared_ < a_->data_.size()) {
            const double da = a_->data_[compared_] - x, db = b_->data_[compared_] - x;
            distance_a_ += da * da;
            distance_b_ += db * db;
        } else {
            distance_a_ = distance_b_ = std::numeric_limits<double>::quiet_NaN();
        }
        ++compared_;
    }

    sensitivity_method method_;
    std::vector<double> data_;
    std::size_t tensors_ = 0;
    const gradient_probe* a_ = nullptr; // compared_with: the stored probes
    const gradient_probe* b_ = nullptr;
    std::size_t compared_ = 0;
    double distance_a_ = 0, distance_b_ = 0;
};

/// max(|g0 - g1|^2, 2 max(|g0 - g2|^2, |g1 - g2|^2)) of three probes of one tensor.
inline double probe_sensitivity(const gradient_probe& g0, const gradient_probe& g1, const gradient_probe& g2)
{
    constexpr const char* where = "probe_sensitivity";
    COMPACT_REQUIRE(g0.data().size() == g1.data().size() && g0.data().size() == g2.data().size() &&
                        g0.tensors() == g1.tensors() && g0.tensors() == g2.tensors(),
                    where, "the three probes differ in size (", g0.data().size(), ", ", g1.data().size(), ", ",
                    g2.data().size(), " values): the rerun must add the same gradients in the same order");
    COMPACT_REQUIRE(g0.tensors() > 0, where, "the rerun added no gradient to the probe");
    auto distance = [](const std::vector<double>& a, const std::vector<double>& b) {
        double s = 0;
        for (std::size_t k = 0; k < a.size(); ++k) s += (a[k] - b[k]) * (a[k] - b[k]);
        return s;
    };
    const double d01 = distance(g0.data(), g1.data()), d02 = distance(g0.data(), g2.data()),
                 d12 = distance(g1.data(), g2.data());
    return std::max(d01, 2 * std::max(d02, d12));
}

/// The same from two stored probes and a third compared with them as it arrived
/// (gradient_probe::compared_with(g0, g1)): bit for bit the value of probe_sensitivity(g0, g1, g2).
inline double probe_sensitivity_streamed(const gradient_probe& g0, const gradient_probe& g1, const gradient_probe& g2)
{
    constexpr const char* where = "probe_sensitivity_streamed";
    COMPACT_REQUIRE(g2.streamed() && g0.data().size() == g1.data().size() && g2.size() == g0.data().size() &&
                        g0.tensors() == g1.tensors() && g0.tensors() == g2.tensors(),
                    where, "the three probes differ in size (", g0.data().size(), ", ", g1.data().size(), ", ",
                    g2.size(), " values): the rerun must add the same gradients in the same order");
    COMPACT_REQUIRE(g0.tensors() > 0, where, "the rerun added no gradient to the probe");
    double d01 = 0;
    for (std::size_t k = 0; k < g0.data().size(); ++k)
        d01 += (g0.data()[k] - g1.data()[k]) * (g0.data()[k] - g1.data()[k]);
    return std::max(d01, 2 * std::max(g2.distance_to_a(), g2.distance_to_b()));
}

/// When the controller re-estimates: at step 0 and then every `interval` steps (GACT: 1000), or at
/// step 0 and at a fraction of the planned steps (ALAM: 10%).
struct allocation_schedule {
    std::uint64_t interval = 0; ///< > 0: steps 0, interval, 2 interval, ...
    std::uint64_t second = 0;   ///< interval == 0: steps 0 and `second`

    static allocation_schedule every(std::uint64_t k)
    {
        COMPACT_REQUIRE(k >= 1, "allocation_schedule::every", "interval k=", k, " must be at least 1");
        return {k, 0};
    }
    static allocation_schedule start_and_fraction(std::uint64_t total_steps, double fraction = 0.1)
    {
        COMPACT_REQUIRE(fraction > 0 && fraction < 1, "allocation_schedule::start_and_fraction", "fraction=",
                        fraction, " must be in (0, 1)");
        return {0, static_cast<std::uint64_t>(std::floor(fraction * static_cast<double>(total_steps)))};
    }
    bool due(std::uint64_t step) const noexcept
    {
        return interval > 0 ? step % interval == 0 : (step == 0 || step == second);
    }
};

class bit_allocator {
public:
    bit_allocator(const allocation_options& options, sensitivity_method method, allocation_schedule schedule)
        : options_(options), method_(method), schedule_(schedule)
    {
        allocation_ladder(options); // validates the groups
        detail::check_scheme(store_scheme::quantized(1, options.group), "bit_allocator");
    }

    /// Registers a tensor: its store's settings (kept by reference: they must outlive the allocator)
    /// and the values it holds per step. Returns its index.
    std::size_t add(store_settings& settings, index_t values)
    {
        COMPACT_REQUIRE(values >= 1, "bit_allocator::add", "values=", values, " must be at least 1");
        settings_.push_back(&settings);
        values_.push_back(values);
        sensitivity_.push_back(1.0);
        return settings_.size() - 1;
    }

    std::size_t size() const noexcept { return settings_.size(); }
    const std::vector<index_t>& values() const noexcept { return values_; }
    const std::vector<double>& sensitivities() const noexcept { return sensitivity_; }
    const allocation_options& options() const noexcept { return options_; }
    sensitivity_method method() const noexcept { return method_; }
    /// When update() re-estimates (a trainer may prepare memory for the probes at those steps).
    const allocation_schedule& schedule() const noexcept { return schedule_; }
    /// The schemes the registered stores hold now.
    std::vector<store_scheme> schemes() const
    {
        std::vector<store_scheme> s;
        for (const store_settings* p : settings_) s.push_back(p->scheme);
        return s;
    }

    /// Re-estimates and re-allocates when the schedule says so; returns whether it did.
    template <class Rerun>
    bool update(std::uint64_t step, Rerun&& rerun)
    {
        if (!schedule_.due(step)) return false;
        estimate(rerun);
        allocate();
        return true;
    }

    /// Three probes per tensor (3 L reruns); the stores' settings are left as they were.
    template <class Rerun>
    void estimate(Rerun&& rerun)
    {
        COMPACT_REQUIRE(!settings_.empty(), "bit_allocator::estimate", "no tensors registered (call add first)");
        for (std::size_t l = 0; l < settings_.size(); ++l) {
            store_settings& s = *settings_[l];
            const store_settings kept = s;
            auto probe = [&](store_scheme scheme, std::uint32_t variant, gradient_probe g) {
                s.scheme = scheme;
                s.variant = variant;
                g.reserve(probe_values_);
                rerun(g);
                probe_values_ = g.size();
                return g;
            };
            try {
                const gradient_probe g0 = probe(store_scheme::quantized(1, options_.group), 0, gradient_probe(method_));
                const gradient_probe g1 = probe(store_scheme::quantized(1, options_.group), 1, gradient_probe(method_));
                // The 8-bit probe is compared with the two others as it arrives: two gradients kept, not three.
                const gradient_probe g2 = probe(store_scheme::quantized(8, options_.group), 0,
                                                gradient_probe::compared_with(g0, g1));
                const double c = probe_sensitivity_streamed(g0, g1, g2);
                // A diverging probe makes the tensor as sensitive as the model can express.
                sensitivity_[l] = std::isfinite(c) ? c : max_sensitivity;
            } catch (...) {
                s = kept;
                throw;
            }
            s = kept;
        }
    }

    /// Allocates from the current sensitivities and writes the schemes into the registered settings.
    bit_allocation allocate()
    {
        bit_allocation a = allocate_bits(sensitivity_, values_, options_);
        for (std::size_t l = 0; l < settings_.size(); ++l) settings_[l]->scheme = a.schemes[l];
        return a;
    }

    /// Restores sensitivities and schemes (from a checkpoint): validated in full before anything changes.
    void restore(const std::vector<double>& sensitivity, const std::vector<store_scheme>& schemes)
    {
        constexpr const char* where = "bit_allocator::restore";
        COMPACT_REQUIRE(sensitivity.size() == settings_.size() && schemes.size() == settings_.size(), where,
                        sensitivity.size(), " sensitivities and ", schemes.size(), " schemes for ", settings_.size(),
                        " registered tensors");
        for (std::size_t l = 0; l < schemes.size(); ++l) {
            detail::check_scheme(schemes[l], where);
            COMPACT_REQUIRE(sensitivity[l] >= 0 && std::isfinite(sensitivity[l]), where, "tensor ", l,
                            " has sensitivity ", sensitivity[l]);
        }
        sensitivity_ = sensitivity;
        for (std::size_t l = 0; l < schemes.size(); ++l) settings_[l]->scheme = schemes[l];
    }

    static constexpr double max_sensitivity = 1e30;

private:
    allocation_options options_;
    sensitivity_method method_;
    allocation_schedule schedule_;
    std::vector<store_settings*> settings_;
    std::vector<index_t> values_;
    std::vector<double> sensitivity_;
    std::size_t probe_values_ = 0; // values of the last probe, to size the next
};

COMPACT_NAMESPACE_END
