// compact/compress/bit_allocation.hpp: per-tensor bit widths under an average-bit budget (SPEC section 5).
//
// Tensor l holds D_l values per step and has sensitivity C_l (compress/sensitivity.hpp estimates it):
// at b bits its compression adds about C_l / (2^b - 1)^2 to the gradient variance (GACT's model). The
// allocation minimises the total
//
//     sum_l C_l / (2^{b_l} - 1)^2    subject to    sum_l bits(b_l) D_l <= b_avg sum_l D_l
//
// over the ladder full -> 8 -> 4 -> 2 -> 1 -> average quantization. `bits` is what a rung is charged in
// the budget (nominal_bits: the scalar width for full, b for b-bit codes, 0.5 for average
// quantization; metadata is not charged). The variance model of the average-quantization rung is that
// of a 1.5-bit quantizer (SPEC section 5 counts that step as 1.5 bits): ALAM's finding that averaging
// four values before a 2-bit code loses less than 1-bit codes do. Full precision adds no variance.
//
// Method: greedy descent (GACT's), then local improvement. Descent: starting with every tensor at full
// precision, the step down the ladder with the least added variance per budget bit saved is taken
// until the budget holds; a step that lowers the variance model while saving bits (1 bit -> average
// under the default model) is always taken. With few tensors the last steps can leave much of the
// budget unused (three tensors of similar size at a 1-bit budget all end at average quantization, 0.5
// bit) or take the wrong tensor down. Improvement: while some move lowers the model's total within the
// budget, the best is taken: one tensor up to any higher rung (spending leftover budget), or that
// together with another tensor one rung down (an exchange). Each move lowers the total, so it ends;
// cost per round O(L^2 R) for L tensors and R rungs. It follows the model: a small tensor may return
// to full precision when the leftover budget pays for it. Tested against exhaustive search on small
// instances. The continuous optimum b_l = b_avg + 1/2 (log2(C_l / D_l) - mean over values of log2(C / D))
// (continuous_bits) is what the result follows, to within a ladder step.
#pragma once

#include "compact/backend/store_scheme.hpp"
#include "compact/core/config.hpp"
#include "compact/core/error.hpp"

#include <cmath>
#include <cstddef>
#include <limits>
#include <vector>

COMPACT_NAMESPACE_BEGIN

struct allocation_options {
    double average_bits = 4;       ///< b_avg: budget in bits per value over all tensors
    index_t group = 256;           ///< group of the quantized rungs (GACT 256, ALAM 128)
    bool average_rung = true;      ///< allow average quantization below 1 bit
    index_t average_group = 128;   ///< group (in means) of the average rung
    double average_model_bits = 1.5; ///< the variance model's bit width for the average rung
    double full_bits = 32;         ///< budget charge of full precision (8 sizeof(Scalar))
};

/// One rung: the scheme, its budget charge and its variance factor 1 / (2^b - 1)^2 (0 for full).
struct ladder_rung {
    store_scheme scheme;
    double budget_bits;
    double variance;
};

/// The ladder, top (full precision) first.
inline std::vector<ladder_rung> allocation_ladder(const allocation_options& o)
{
    auto factor = [](double b) { return 1.0 / ((std::exp2(b) - 1) * (std::exp2(b) - 1)); };
    std::vector<ladder_rung> ladder = {{store_scheme::full_precision(), o.full_bits, 0.0}};
    for (int b : {8, 4, 2, 1})
        ladder.push_back({store_scheme::quantized(b, o.group), static_cast<double>(b), factor(b)});
    if (o.average_rung)
        ladder.push_back({store_scheme::average(o.average_group), 0.5, factor(o.average_model_bits)});
    return ladder;
}

/// The continuous optimum of the allocation problem (no ladder, no bounds): the check of SPEC section 5.
inline std::vector<double> continuous_bits(const std::vector<double>& sensitivity, const std::vector<index_t>& values,
                                           double average_bits)
{
    double total = 0, weighted = 0;
    for (std::size_t l = 0; l < values.size(); ++l) {
        const double d = static_cast<double>(values[l]);
        total += d;
        weighted += d * std::log2(sensitivity[l] / d);
    }
    std::vector<double> bits(values.size());
    for (std::size_t l = 0; l < values.size(); ++l) {
        const double d = static_cast<double>(values[l]);
        bits[l] = average_bits + 0.5 * (std::log2(sensitivity[l] / d) - weighted / total);
    }
    return bits;
}

/// The result: a rung and a scheme per tensor, the bits charged on average, the variance model's total.
struct bit_allocation {
    std::vector<std::size_t> rung;
    std::vector<store_scheme> schemes;
    double average_bits = 0;
    double variance = 0;
};

namespace detail {

inline void check_allocation_input(const std::vector<double>& sensitivity, const std::vector<index_t>& values,
                                   const allocation_options& o, const char* where)
{
    COMPACT_REQUIRE(!values.empty(), where, "no tensors to allocate bits to");
    COMPACT_REQUIRE(sensitivity.size() == values.size(), where, sensitivity.size(), " sensitivities for ",
                    values.size(), " tensors");
    for (std::size_t l = 0; l < values.size(); ++l) {
        COMPACT_REQUIRE(values[l] >= 1, where, "tensor ", l, " has ", values[l], " values; it needs at least 1");
        COMPACT_REQUIRE(sensitivity[l] >= 0 && std::isfinite(sensitivity[l]), where, "tensor ", l, " has sensitivity ",
                        sensitivity[l], "; it must be finite and >= 0");
    }
    check_scheme(store_scheme::quantized(1, o.group), where);
    if (o.average_rung) check_scheme(store_scheme::average(o.average_group), where);
    const double floor_bits = o.average_rung ? 0.5 : 1.0;
    COMPACT_REQUIRE(o.average_bits >= floor_bits && o.average_bits <= o.full_bits, where, "average_bits=",
                    o.average_bits, " must be in [", floor_bits, ", ", o.full_bits, "] (the ladder's bottom and top)");
}

} // namespace detail

/// Allocates a rung of the ladder to every tensor (see the top of this file).
inline bit_allocation allocate_bits(const std::vector<double>& sensitivity, const std::vector<index_t>& values,
                                    const allocation_options& options)
{
    constexpr const char* where = "allocate_bits";
    detail::check_allocation_input(sensitivity, values, options, where);
    const std::vector<ladder_rung> ladder = allocation_ladder(options);
    const std::size_t L = values.size(), bottom = ladder.size() - 1;
    double total_values = 0;
    for (index_t d : values) total_values += static_cast<double>(d);
    const double budget = options.average_bits * total_values;

    std::vector<std::size_t> rung(L, 0);
    double charged = options.full_bits * total_values;
    // The added variance per bit saved of moving tensor l from rung a to rung b.
    auto rate = [&](std::size_t l, std::size_t a, std::size_t b) {
        const double dv = sensitivity[l] * (ladder[b].variance - ladder[a].variance);
        const double db = (ladder[a].budget_bits - ladder[b].budget_bits) * static_cast<double>(values[l]);
        return dv / db;
    };
    // Descent: cheapest step down until the budget holds, and every step that lowers the model anyway.
    for (;;) {
        std::size_t best = L;
        double best_rate = std::numeric_limits<double>::infinity();
        for (std::size_t l = 0; l < L; ++l) {
            if (rung[l] == bottom) continue;
            const double r = rate(l, rung[l], rung[l] + 1);
            if (r < best_rate) best_rate = r, best = l;
        }
        if (best == L) break;
        if (charged <= budget * (1 + 1e-12) && best_rate > 0) break;
        charged -= (ladder[rung[best]].budget_bits - ladder[rung[best] + 1].budget_bits) *
                   static_cast<double>(values[best]);
        ++rung[best];
    }
    // The budget range was checked, so the descent always ends within it. Then local improvement: the
    // move that lowers the model's total the most while the budget holds, either one tensor to a higher
    // rung (the fill) or one tensor one rung down to pay for another's rise (an exchange).
    auto move_bits = [&](std::size_t l, std::size_t to) {
        return (ladder[to].budget_bits - ladder[rung[l]].budget_bits) * static_cast<double>(values[l]);
    };
    auto move_gain = [&](std::size_t l, std::size_t to) {
        return sensitivity[l] * (ladder[rung[l]].variance - ladder[to].variance);
    };
    const double limit = budget * (1 + 1e-12);
    for (std::size_t round = 0; round < 64 * L * ladder.size(); ++round) {
        double best_gain = 0;
        std::size_t up = L, up_to = 0, down = L;
        for (std::size_t l = 0; l < L; ++l)
            for (std::size_t to = 0; to < rung[l]; ++to) {
                const double gain = move_gain(l, to), bits = move_bits(l, to);
                if (gain <= 0) continue;
                if (charged + bits <= limit && gain > best_gain) best_gain = gain, up = l, up_to = to, down = L;
                for (std::size_t k = 0; k < L; ++k) {
                    if (k == l || rung[k] == bottom) continue;
                    const double pair_gain = gain + move_gain(k, rung[k] + 1);
                    if (charged + bits + move_bits(k, rung[k] + 1) <= limit && pair_gain > best_gain * (1 + 1e-12))
                        best_gain = pair_gain, up = l, up_to = to, down = k;
                }
            }
        if (up == L) break;
        charged += move_bits(up, up_to);
        rung[up] = up_to;
        if (down != L) {
            charged += move_bits(down, rung[down] + 1);
            ++rung[down];
        }
    }
    bit_allocation out;
    out.rung = rung;
    out.average_bits = charged / total_values;
    for (std::size_t l = 0; l < L; ++l) {
        out.schemes.push_back(ladder[rung[l]].scheme);
        out.variance += sensitivity[l] * ladder[rung[l]].variance;
    }
    return out;
}

COMPACT_NAMESPACE_END
