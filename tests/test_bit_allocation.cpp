// Tests of the bit allocation, the sensitivity estimates and their controller (compress/bit_allocation.hpp,
// compress/sensitivity.hpp, io/allocation_checkpoint.hpp; SPEC section 5).
#include "reference.hpp"
#include "test_support.hpp"

#include <compact/backend/cpu/cpu.hpp>
#include <compact/compress/bit_allocation.hpp>
#include <compact/compress/sensitivity.hpp>
#include <compact/io/allocation_checkpoint.hpp>
#include <compact/nn/linear_layer.hpp>
#include <compact/random/uniform.hpp>

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

using compact::index_t;
using compact::store_scheme;
using compact_test::contains;
using compact_test::error_message_of;

namespace {

double charged_bits(const compact::bit_allocation& a, const std::vector<index_t>& values)
{
    double bits = 0, total = 0;
    for (std::size_t l = 0; l < values.size(); ++l) {
        bits += compact::nominal_bits<float>(a.schemes[l]) * static_cast<double>(values[l]);
        total += static_cast<double>(values[l]);
    }
    return bits / total;
}

} // namespace

TEST_CASE("the allocation respects the budget and the ladder, on random instances")
{
    auto rng = compact_test::make_rng(1);
    for (int trial = 0; trial < 200; ++trial) {
        const std::size_t L = 1 + rng() % 12;
        std::vector<double> c(L);
        std::vector<index_t> d(L);
        for (std::size_t l = 0; l < L; ++l) {
            c[l] = std::exp2(compact_test::uniform(rng, -20, 20));
            d[l] = static_cast<index_t>(1 + rng() % 100000);
        }
        compact::allocation_options o;
        o.average_rung = trial % 2 == 0;
        o.average_bits = compact_test::uniform(rng, o.average_rung ? 0.5 : 1.0, 10.0);
        const compact::bit_allocation a = compact::allocate_bits(c, d, o);
        CAPTURE(trial);
        CHECK(a.average_bits <= o.average_bits * (1 + 1e-9));
        CHECK(charged_bits(a, d) == doctest::Approx(a.average_bits));
        for (const store_scheme& s : a.schemes)
            CHECK((s.kind != compact::store_kind::average || o.average_rung));
    }
}

TEST_CASE("more sensitive tensors get at least as many bits (equal sizes)")
{
    auto rng = compact_test::make_rng(2);
    for (int trial = 0; trial < 100; ++trial) {
        const std::size_t L = 2 + rng() % 10;
        std::vector<double> c(L);
        for (double& v : c) v = std::exp2(compact_test::uniform(rng, -15, 15));
        const std::vector<index_t> d(L, 4096);
        compact::allocation_options o;
        o.average_rung = false;
        o.average_bits = compact_test::uniform(rng, 1, 8);
        const compact::bit_allocation a = compact::allocate_bits(c, d, o);
        for (std::size_t i = 0; i < L; ++i)
            for (std::size_t j = 0; j < L; ++j)
                if (c[i] > c[j]) CHECK(a.rung[i] <= a.rung[j]); // rung 0 is the top
    }
}

TEST_CASE("the allocation follows the continuous optimum to within one ladder step")
{
    // Synthetic sensitivities C_l = D_l 4^{k_l} with spread exponents: the continuous optimum is
    // b_l = b_avg + (k_l - mean k) (weighted by D). The allocated rung must lie within one rung of the two
    // rungs that bracket b_l (clamped to the ladder's top). A b_l below the ladder's bottom is no target:
    // the budget such a tensor cannot give up goes to the others, and the improvement may spend leftover
    // budget on it (its 1-bit codes are the model's largest variance per bit), so those tensors are not
    // checked. The improvement may also lift a small tensor further when that lowers the model's total
    // (the continuous solution approximates 1/(2^b - 1)^2 by 4^-b); at most 1% of tensors may sit higher.
    const std::vector<double> ladder_bits = {32, 8, 4, 2, 1};
    auto rng = compact_test::make_rng(3);
    int checked = 0, higher = 0;
    for (int trial = 0; trial < 300; ++trial) {
        const std::size_t L = 4 + rng() % 20;
        std::vector<double> c(L);
        std::vector<index_t> d(L);
        for (std::size_t l = 0; l < L; ++l) {
            d[l] = static_cast<index_t>(1000 + rng() % 50000);
            c[l] = static_cast<double>(d[l]) * std::pow(4.0, compact_test::uniform(rng, -3, 3));
        }
        compact::allocation_options o;
        o.average_rung = false;
        o.average_bits = compact_test::uniform(rng, 1.5, 6);
        const compact::bit_allocation a = compact::allocate_bits(c, d, o);
        const std::vector<double> b = compact::continuous_bits(c, d, o.average_bits);
        for (std::size_t l = 0; l < L; ++l) {
            if (b[l] < 1.0) continue;
            const double target = std::min(b[l], 32.0);
            std::size_t upper = 0; // the lowest rung with bits >= target
            while (upper + 1 < ladder_bits.size() && ladder_bits[upper + 1] >= target) ++upper;
            const std::size_t lower = ladder_bits[upper] == target ? upper : std::min(upper + 1, ladder_bits.size() - 1);
            CAPTURE(trial);
            CAPTURE(b[l]);
            higher += a.rung[l] + 1 < upper ? 1 : 0;
            CHECK(a.rung[l] <= lower + 1);
            ++checked;
        }
    }
    CHECK(checked > 1000);
    MESSAGE(higher, " of ", checked, " tensors more than one rung above the continuous optimum");
    CHECK(higher * 100 <= checked);
}

TEST_CASE("the allocation is close to the exact optimum of the ladder problem")
{
    // Exhaustive search over every assignment of rungs to up to 6 tensors (6^6 assignments) gives the
    // optimum of the variance model under the budget; the greedy result must fit the budget and stay
    // within a small factor of it on most instances.
    auto rng = compact_test::make_rng(11);
    std::vector<double> ratios;
    for (int trial = 0; trial < 200; ++trial) {
        const std::size_t L = 2 + rng() % 5;
        std::vector<double> c(L);
        std::vector<index_t> d(L);
        for (std::size_t l = 0; l < L; ++l) {
            d[l] = static_cast<index_t>(100 + rng() % 5000);
            c[l] = static_cast<double>(d[l]) * std::pow(4.0, compact_test::uniform(rng, -3, 3));
        }
        compact::allocation_options o;
        o.average_rung = trial % 2 == 0;
        o.average_bits = compact_test::uniform(rng, o.average_rung ? 0.5 : 1.0, 6);
        const auto ladder = compact::allocation_ladder(o);
        double total = 0;
        for (index_t v : d) total += static_cast<double>(v);
        double best = std::numeric_limits<double>::infinity();
        std::vector<std::size_t> pick(L, 0);
        for (;;) {
            double bits = 0, variance = 0;
            for (std::size_t l = 0; l < L; ++l) {
                bits += ladder[pick[l]].budget_bits * static_cast<double>(d[l]);
                variance += c[l] * ladder[pick[l]].variance;
            }
            if (bits <= o.average_bits * total * (1 + 1e-12)) best = std::min(best, variance);
            std::size_t k = 0;
            while (k < L && ++pick[k] == ladder.size()) pick[k++] = 0;
            if (k == L) break;
        }
        const compact::bit_allocation a = compact::allocate_bits(c, d, o);
        CAPTURE(trial);
        CHECK(charged_bits(a, d) <= o.average_bits * (1 + 1e-9));
        REQUIRE(std::isfinite(best));
        CHECK(a.variance >= best * (1 - 1e-12));
        const double ratio = best > 0 ? a.variance / best : (a.variance == 0 ? 1.0 : 1e9);
        ratios.push_back(ratio);
    }
    std::sort(ratios.begin(), ratios.end());
    const double median = ratios[ratios.size() / 2], p95 = ratios[ratios.size() * 95 / 100], worst = ratios.back();
    MESSAGE("variance over the exact optimum: median ", median, ", 95th percentile ", p95, ", largest ", worst);
    CHECK(median < 1.01);
    // Observed with this seed: median 1, 95th percentile 1.57, largest 2.82 (greedy on a knapsack with
    // two to six items; the descent alone, without the improvement, reaches 3.8).
    CHECK(p95 < 1.7);
    CHECK(worst < 3.0);
}

TEST_CASE("three tensors of similar size at a 1-bit budget use the budget (ALAM's setting)")
{
    // The descent alone takes all three to average quantization (0.5 bit); the fill spends the rest.
    const std::vector<index_t> d = {100352, 131072, 131072};
    const std::vector<double> c = {3.0, 1.0, 2.0};
    compact::allocation_options o;
    o.average_bits = 1;
    o.group = 128;
    const auto a = compact::allocate_bits(c, d, o);
    CHECK(charged_bits(a, d) <= 1.0);
    CHECK(charged_bits(a, d) > 0.9);
    CHECK(a.schemes[0] == store_scheme::quantized(2, 128));
    CHECK(a.schemes[1].kind == compact::store_kind::average);
    CHECK(a.schemes[2].kind == compact::store_kind::average);
}

TEST_CASE("average quantization takes the least sensitive tensors below 1 bit, leaving bits for the sensitive ones")
{
    // Eight tensors, one very sensitive: at b_avg = 1 without the average rung everything sits at 1 bit;
    // with it, the insensitive ones drop to 0.5 and the sensitive one rises.
    std::vector<double> c = {1e6, 1, 1, 1, 1, 1, 1, 1};
    const std::vector<index_t> d(8, 1000);
    compact::allocation_options o;
    o.average_bits = 1;
    o.average_rung = false;
    const auto without = compact::allocate_bits(c, d, o);
    o.average_rung = true;
    const auto with = compact::allocate_bits(c, d, o);
    for (const auto& s : without.schemes) CHECK(s == store_scheme::quantized(1, 256));
    CHECK(with.schemes[0].bits >= 4);
    for (std::size_t l = 1; l < 8; ++l) CHECK(with.schemes[l].kind == compact::store_kind::average);
    CHECK(with.variance < without.variance);
    CHECK(with.average_bits <= 1.0);
}

TEST_CASE("allocation errors name the argument")
{
    compact::allocation_options o;
    CHECK(contains(error_message_of([&] { compact::allocate_bits({}, {}, o); }), "no tensors"));
    CHECK(contains(error_message_of([&] { compact::allocate_bits({1, 2}, {10}, o); }), "2 sensitivities for 1 tensors"));
    CHECK(contains(error_message_of([&] { compact::allocate_bits({-1}, {10}, o); }), "tensor 0 has sensitivity -1"));
    CHECK(contains(error_message_of([&] { compact::allocate_bits({1}, {0}, o); }), "tensor 0 has 0 values"));
    o.average_bits = 0.25;
    CHECK(contains(error_message_of([&] { compact::allocate_bits({1}, {10}, o); }),
                   "average_bits=0.25 must be in [0.5, 32]"));
    o.average_bits = 4;
    o.group = 12;
    CHECK(contains(error_message_of([&] { compact::allocate_bits({1}, {10}, o); }), "group=12"));
}

TEST_CASE("GradNormVar never exceeds GACT's estimate on the same probes; a streamed third probe gives the same bits")
{
    auto rng = compact_test::make_rng(4);
    for (int trial = 0; trial < 200; ++trial) {
        const int tensors = 1 + static_cast<int>(rng() % 6);
        compact::gradient_probe gact[3] = {compact::gradient_probe(compact::sensitivity_method::gact),
                                           compact::gradient_probe(compact::sensitivity_method::gact),
                                           compact::gradient_probe(compact::sensitivity_method::gact)};
        compact::gradient_probe norm[3] = {compact::gradient_probe(compact::sensitivity_method::grad_norm_var),
                                           compact::gradient_probe(compact::sensitivity_method::grad_norm_var),
                                           compact::gradient_probe(compact::sensitivity_method::grad_norm_var)};
        std::vector<std::vector<float>> base, third;
        for (int t = 0; t < tensors; ++t) base.push_back(compact_test::uniform<float>(rng, 1 + rng() % 50, -1, 1));
        for (int k = 0; k < 3; ++k)
            for (int t = 0; t < tensors; ++t) {
                std::vector<float> g = base[static_cast<std::size_t>(t)];
                for (float& v : g) v += static_cast<float>(compact_test::uniform(rng, -0.1, 0.1));
                gact[k].add(g.data(), g.size());
                norm[k].add(compact::const_matrix_view<float>(g.data(), 1, static_cast<index_t>(g.size())));
                if (k == 2) third.push_back(g);
            }
        const double a = compact::probe_sensitivity(gact[0], gact[1], gact[2]);
        const double b = compact::probe_sensitivity(norm[0], norm[1], norm[2]);
        CHECK(b <= a * (1 + 1e-12));
        // The controller keeps two probes and compares the third as it arrives: the same sums, in order.
        auto gact_streamed = compact::gradient_probe::compared_with(gact[0], gact[1]);
        auto norm_streamed = compact::gradient_probe::compared_with(norm[0], norm[1]);
        for (const auto& g : third) {
            gact_streamed.add(g.data(), g.size());
            norm_streamed.add(compact::const_matrix_view<float>(g.data(), 1, static_cast<index_t>(g.size())));
        }
        CHECK(gact_streamed.data().empty());
        CHECK(compact::probe_sensitivity_streamed(gact[0], gact[1], gact_streamed) == a);
        CHECK(compact::probe_sensitivity_streamed(norm[0], norm[1], norm_streamed) == b);
        // A rerun that adds more (or fewer) values than the stored probes is refused.
        gact_streamed.add(third[0].data(), 1);
        CHECK(contains(error_message_of([&] { compact::probe_sensitivity_streamed(gact[0], gact[1], gact_streamed); }),
                       "the three probes differ in size"));
        CHECK(norm[0].data().size() == static_cast<std::size_t>(tensors)); // a number per tensor, not a gradient
    }
}

namespace {

/// A two-layer model with quantized stores on a fixed batch, for the controller tests.
struct tiny_model {
    static constexpr index_t rows = 64, in = 32, hidden = 48, out = 4;
    using layer = compact::linear_layer<float, compact::quantized, compact::cpu>;

    tiny_model()
        : fc1(compact::in_features{in}, compact::out_features{hidden}, opts(1)),
          fc2(compact::in_features{hidden}, compact::out_features{out}, opts(2))
    {
        auto rng = compact_test::make_rng(10);
        compact_test::random_fill(x, rng);
        compact_test::random_fill(target, rng);
        compact::fill_uniform(fc1.weight(), -0.2, 0.2, 1, 1);
        compact::fill_uniform(fc2.weight(), -0.2, 0.2, 1, 2);
    }

    static compact::linear_options opts(std::uint64_t id)
    {
        compact::linear_options o;
        o.seed = 77;
        o.layer = id;
        o.max_rows = rows;
        return o;
    }

    /// Forward and backward of a squared loss on the fixed batch; the gradients go to the probe.
    void run(compact::gradient_probe& probe)
    {
        compact::cpu::context ctx;
        fc1.forward(ctx, compact::const_matrix_view<float>(x.data(), rows, in), compact::make_view(h.data(), rows, hidden));
        for (float& v : h) v = std::tanh(v);
        h_act = h;
        fc2.forward(ctx, compact::const_matrix_view<float>(h.data(), rows, hidden), compact::make_view(y.data(), rows, out));
        for (std::size_t k = 0; k < y.size(); ++k) dy[k] = (y[k] - target[k]) / float(rows);
        fc2.backward(ctx, compact::const_matrix_view<float>(dy.data(), rows, out), compact::make_view(dh.data(), rows, hidden));
        for (std::size_t k = 0; k < dh.size(); ++k) dh[k] *= 1 - h_act[k] * h_act[k];
        fc1.backward(ctx, compact::const_matrix_view<float>(dh.data(), rows, hidden), {});
        probe.add(fc1.gradient());
        probe.add(fc1.bias_gradient(), static_cast<std::size_t>(hidden));
        probe.add(fc2.gradient());
        probe.add(fc2.bias_gradient(), static_cast<std::size_t>(out));
        fc1.discard_gradient(); // a probe never reaches the optimizer
        fc2.discard_gradient();
    }

    layer fc1, fc2;
    std::vector<float> x = std::vector<float>(rows * in), target = std::vector<float>(rows * out);
    std::vector<float> h = std::vector<float>(rows * hidden), h_act = h, dh = h;
    std::vector<float> y = std::vector<float>(rows * out), dy = y;
};

} // namespace

TEST_CASE("the controller estimates both methods on the same probes, allocates, and restores the probed settings")
{
    tiny_model m;
    compact::allocation_options o;
    o.average_bits = 3;
    o.group = 64;
    compact::bit_allocator gact(o, compact::sensitivity_method::gact, compact::allocation_schedule::every(100));
    compact::bit_allocator norm(o, compact::sensitivity_method::grad_norm_var, compact::allocation_schedule::every(100));
    for (auto* a : {&gact, &norm}) {
        a->add(m.fc1.compressor().settings(), tiny_model::rows * tiny_model::in);
        a->add(m.fc2.compressor().settings(), tiny_model::rows * tiny_model::hidden);
    }
    m.fc1.compressor().set_scheme(store_scheme::quantized(4, 64));
    m.fc2.compressor().set_scheme(store_scheme::quantized(2, 64));
    auto rerun = [&](compact::gradient_probe& p) { m.run(p); };
    gact.estimate(rerun);
    norm.estimate(rerun);
    CHECK(m.fc1.compressor().scheme() == store_scheme::quantized(4, 64)); // probes leave the settings as they were
    CHECK(m.fc2.compressor().scheme() == store_scheme::quantized(2, 64));
    CHECK(m.fc1.compressor().settings().variant == 0);
    for (std::size_t l = 0; l < 2; ++l) {
        CHECK(gact.sensitivities()[l] > 0);
        CHECK(norm.sensitivities()[l] <= gact.sensitivities()[l] * (1 + 1e-12));
    }
    // Deterministic: a second estimate gives the same numbers.
    const auto first = gact.sensitivities();
    gact.estimate(rerun);
    CHECK(first == gact.sensitivities());

    const compact::bit_allocation a = gact.allocate();
    CHECK(a.average_bits <= 3.0);
    CHECK(m.fc1.compressor().scheme() == a.schemes[0]);
    CHECK(m.fc2.compressor().scheme() == a.schemes[1]);
    CHECK(gact.schemes() == a.schemes);

    // The layer trains with the allocated schemes (the saved buffer regrows if needed).
    compact::gradient_probe p(compact::sensitivity_method::gact);
    m.run(p);
    CHECK(m.fc1.saved_bytes(tiny_model::rows) == compact::stored_bytes<float>(a.schemes[0], tiny_model::rows * tiny_model::in));
}

TEST_CASE("schedules: every K steps, and step 0 plus 10% of training")
{
    const auto every = compact::allocation_schedule::every(1000);
    CHECK(every.due(0));
    CHECK(!every.due(1));
    CHECK(every.due(2000));
    const auto alam = compact::allocation_schedule::start_and_fraction(5000);
    CHECK(alam.due(0));
    CHECK(alam.due(500));
    CHECK(!alam.due(1000));
    CHECK(!alam.due(499));
    CHECK(contains(error_message_of([] { compact::allocation_schedule::every(0); }), "interval k=0"));
    CHECK(contains(error_message_of([] { compact::allocation_schedule::start_and_fraction(10, 1.5); }),
                   "fraction=1.5 must be in (0, 1)"));

    tiny_model m;
    compact::allocation_options o;
    o.average_bits = 2;
    o.group = 64;
    compact::bit_allocator alloc(o, compact::sensitivity_method::grad_norm_var, alam);
    alloc.add(m.fc1.compressor().settings(), tiny_model::rows * tiny_model::in);
    alloc.add(m.fc2.compressor().settings(), tiny_model::rows * tiny_model::hidden);
    int reruns = 0;
    auto rerun = [&](compact::gradient_probe& p) {
        ++reruns;
        m.run(p);
    };
    CHECK(alloc.update(0, rerun));
    CHECK(reruns == 6); // three probes per tensor
    CHECK(!alloc.update(1, rerun));
    CHECK(reruns == 6);
}

TEST_CASE("an allocation survives a checkpoint; a mismatched allocator is refused before anything changes")
{
    tiny_model m;
    compact::allocation_options o;
    o.average_bits = 3;
    o.group = 64;
    compact::bit_allocator a(o, compact::sensitivity_method::gact, compact::allocation_schedule::every(10));
    a.add(m.fc1.compressor().settings(), tiny_model::rows * tiny_model::in);
    a.add(m.fc2.compressor().settings(), tiny_model::rows * tiny_model::hidden);
    a.update(0, [&](compact::gradient_probe& p) { m.run(p); });
    compact::checkpoint_writer w;
    compact::save_allocation(w, "alloc", a);
    const compact::checkpoint_reader r(w.bytes());

    tiny_model fresh;
    compact::bit_allocator b(o, compact::sensitivity_method::gact, compact::allocation_schedule::every(10));
    b.add(fresh.fc1.compressor().settings(), tiny_model::rows * tiny_model::in);
    b.add(fresh.fc2.compressor().settings(), tiny_model::rows * tiny_model::hidden);
    compact::load_allocation(r, "alloc", b);
    CHECK(b.sensitivities() == a.sensitivities());
    CHECK(b.schemes() == a.schemes());
    CHECK(fresh.fc1.compressor().scheme() == m.fc1.compressor().scheme());

    tiny_model other;
    compact::bit_allocator c(o, compact::sensitivity_method::grad_norm_var, compact::allocation_schedule::every(10));
    c.add(other.fc1.compressor().settings(), tiny_model::rows * tiny_model::in);
    c.add(other.fc2.compressor().settings(), tiny_model::rows * tiny_model::hidden);
    const auto before = c.schemes();
    CHECK(contains(error_message_of([&] { compact::load_allocation(r, "alloc", c); }), "holds method 0"));
    compact::bit_allocator d(o, compact::sensitivity_method::gact, compact::allocation_schedule::every(10));
    d.add(other.fc1.compressor().settings(), tiny_model::rows * tiny_model::in);
    d.add(other.fc2.compressor().settings(), 7);
    CHECK(contains(error_message_of([&] { compact::load_allocation(r, "alloc", d); }), "tensor 1 held 3072 values"));
    CHECK(c.schemes() == before);
}
