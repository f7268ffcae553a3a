// custom_rank_policy: choosing each layer's rank r, with a policy of your own and with rank::budget.
//
// A rank policy is any copyable type with
//
//     compact::index_t rank(const compact::layer_info& layer) const;   // r in [1, layer.in]
//
// where layer_info carries the layer's (or input group's) input features n, output features m and the id
// you gave it. compressed_linear, input_group and linear_layer take the policy as a template parameter
// and ask it once, at construction. This example
//   1. writes per_layer_ranks, a table of ranks keyed by layer id with a default ratio for the rest,
//      and builds the linear layers of one transformer block with it (q, k and v share their input, so
//      they form one input_group with one P and one saved Z);
//   2. lets rank::budget choose the ranks of the same layers under a byte budget for saved activations,
//      and uses the budget itself as the policy;
//   3. shows that a policy answering 0 or more than n is reported as compact::error, never clamped.
//
// Usage: custom_rank_policy [--smoke]   (the example is quick; --smoke runs the same thing)
#include <compact/compact.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <functional>
#include <map>
#include <utility>
#include <vector>

namespace {

using compact::index_t;

// Ranks from a table keyed by layer id; other layers get round(n * default_ratio), at least 1.
// The table is not checked here: the library validates every answer against the layer's n.
struct per_layer_ranks {
    std::map<std::uint64_t, index_t> table;
    double default_ratio = 0.25;

    index_t rank(const compact::layer_info& layer) const
    {
        const auto it = table.find(layer.id);
        if (it != table.end()) return it->second;
        return std::max<index_t>(1, std::llround(static_cast<double>(layer.in) * default_ratio));
    }
};
static_assert(compact::is_rank_policy<per_layer_ranks>);
static_assert(compact::is_rank_policy<compact::rank::budget>); // the budget is a policy too

// The linear layers of one transformer block, model width 512, MLP width 2048.
struct block_layer {
    std::uint64_t id;
    const char* name;
    index_t in;
    std::vector<index_t> outs; // several outputs: an input group sharing one P and one Z
};
const std::vector<block_layer> block = {
    {1, "attn.qkv", 512, {512, 512, 512}},
    {2, "attn.out", 512, {512}},
    {3, "mlp.up", 512, {2048}},
    {4, "mlp.down", 2048, {512}},
};

constexpr index_t tokens = 4096; // rows of X per step: 8 sequences of 512 tokens
constexpr std::uint64_t seed = 7;
using scalar = float;
constexpr std::size_t kib = 1024;

// Bytes an uncompressed layer keeps for backward: its whole input X (N, n).
std::size_t uncompressed_bytes(index_t in) { return static_cast<std::size_t>(tokens * in) * sizeof(scalar); }

void print_header()
{
    std::printf("  %-3s %-9s %-16s %5s %16s %14s %8s\n", "id", "layer", "shape (n -> m)", "r", "saved bytes", "uncompressed",
                "kappa");
}

// One row per layer or group: its rank, the bytes of Z for `tokens` rows, X's bytes, and the relative
// variance (n + 1) / r of its Gaussian weight-gradient estimate.
template <class Layer>
void print_row(const block_layer& l, const Layer& layer)
{
    char shape[32];
    index_t out = 0;
    for (index_t m : l.outs) out += m;
    std::snprintf(shape, sizeof shape, "%lld -> %lld%s", static_cast<long long>(l.in), static_cast<long long>(out),
                  l.outs.size() > 1 ? " (x3)" : "");
    std::printf("  %-3llu %-9s %-16s %5lld %12zu KiB %10zu KiB %8.2f\n", static_cast<unsigned long long>(l.id),
                l.name, shape, static_cast<long long>(layer.rank()), layer.saved_bytes(tokens) / kib,
                uncompressed_bytes(l.in) / kib,
                compact::variance_factor(compact::distribution::gaussian, l.in, layer.rank()));
}

// Builds every layer of the block with `policy` and prints its row; returns the total saved bytes.
// A single-output layer is a compressed_linear; q, k, v are an input_group whose members share Z.
template <class Policy>
std::size_t build_block(const Policy& policy)
{
    using layer_type = compact::compressed_linear<scalar, Policy, compact::cpu>;
    using group_type = compact::input_group<scalar, Policy, compact::cpu>;
    std::size_t saved = 0, uncompressed = 0;
    print_header();
    for (const block_layer& l : block) {
        if (l.outs.size() > 1) {
            const group_type group(compact::in_features{l.in}, l.outs, seed, l.id, policy);
            print_row(l, group);
            saved += group.saved_bytes(tokens);
        } else {
            const layer_type layer(compact::in_features{l.in}, compact::out_features{l.outs.front()}, seed, l.id,
                                   policy);
            print_row(l, layer);
            saved += layer.saved_bytes(tokens);
        }
        uncompressed += uncompressed_bytes(l.in);
    }
    std::printf("  total saved: %zu KiB of %zu KiB (%.1f%%)\n", saved / kib, uncompressed / kib,
                100.0 * static_cast<double>(saved) / static_cast<double>(uncompressed));
    return saved;
}

// One forward and backward of a layer built with the custom policy, on caller-owned buffers sized by
// the layer's queries: the weight gradient comes back as G_sub (m, r), not G (m, n).
void run_one_layer(const per_layer_ranks& policy)
{
    const compact::cpu::context ctx{};
    const index_t rows = 64, n = 2048, m = 512;
    const compact::compressed_linear<scalar, per_layer_ranks, compact::cpu> down(
        compact::in_features{n}, compact::out_features{m}, seed, 4, policy);
    const index_t r = down.rank();
    compact::row_major_matrix<scalar> x(rows, n), w(m, n), y(rows, m), dx(rows, n), g_sub(m, r);
    std::vector<scalar> z(static_cast<std::size_t>(rows * r)); // what forward keeps: Z (rows, r)
    auto saved = compact::bind_saved<decltype(down)::saved_type>(z.data(), down.saved_bytes(rows));
    std::vector<std::byte> ws(down.workspace_bytes(rows));
    compact::fill_uniform(compact::view(x), -1.0, 1.0, seed, 1);
    compact::fill_uniform(compact::view(w), -0.02, 0.02, seed, 2);

    down.forward(ctx, compact::view(x), compact::view(w), {}, compact::view(y), saved, /*step=*/0,
                 {ws.data(), ws.size()}); // no bias
    // dY = Y: the gradient of 0.5 |Y|^2. No bias, so no bias gradient.
    compact::layer_gradient<scalar> grads{compact::view(g_sub)};
    down.backward(ctx, compact::view(y), compact::view(w), saved, compact::view(dx), grads, {ws.data(), ws.size()});
    std::printf("  mlp.down, one step on %lld rows: saved Z (%lld, %lld) instead of X (%lld, %lld); weight gradient "
                "G_sub (%lld, %lld), %zu KiB instead of G's %zu KiB\n",
                static_cast<long long>(rows), static_cast<long long>(rows), static_cast<long long>(r),
                static_cast<long long>(rows), static_cast<long long>(n), static_cast<long long>(m),
                static_cast<long long>(r), static_cast<std::size_t>(m * r) * sizeof(scalar) / kib,
                static_cast<std::size_t>(m * n) * sizeof(scalar) / kib);
}

// The budget chooses r for each projection to minimise sum_l (n_l + 1) / r_l (the summed variance of
// the gradient estimates) while keeping sum_l tokens * r_l * sizeof(scalar) within the budget.
compact::rank::budget make_budget(double share_of_uncompressed)
{
    std::vector<compact::rank::budget_layer> layers;
    std::size_t uncompressed = 0;
    for (const block_layer& l : block) {
        compact::rank::budget_layer b;
        b.id = l.id;
        b.in = l.in;
        b.tokens = tokens;
        b.value_bytes = sizeof(scalar);
        layers.push_back(b); // weight 0: a_l = n + 1, the Gaussian kappa's numerator
        uncompressed += uncompressed_bytes(l.in);
    }
    const auto bytes = static_cast<std::size_t>(share_of_uncompressed * static_cast<double>(uncompressed));
    return compact::rank::budget(layers, bytes);
}

// Policies that answer an invalid rank for some layer.
void show_errors()
{
    const std::pair<const char*, std::function<void()>> cases[] = {
        {"rank 0",
         [] {
             const per_layer_ranks zero{{{5, 0}}, 0.25};
             compact::compressed_linear<scalar, per_layer_ranks, compact::cpu> layer(
                 compact::in_features{512}, compact::out_features{512}, seed, 5, zero);
         }},
        {"rank above n",
         [] {
             const per_layer_ranks too_big{{{6, 1024}}, 0.25};
             compact::compressed_linear<scalar, per_layer_ranks, compact::cpu> layer(
                 compact::in_features{512}, compact::out_features{512}, seed, 6, too_big);
         }},
        {"a layer the budget does not know",
         [] {
             const compact::rank::budget budget = make_budget(0.25);
             compact::compressed_linear<scalar, compact::rank::budget, compact::cpu> layer(
                 compact::in_features{512}, compact::out_features{512}, seed, 9, budget);
         }},
    };
    for (const auto& [what, build] : cases) {
        try {
            build();
            std::printf("  %s: accepted (unexpected)\n", what);
        } catch (const compact::error& e) {
            std::printf("  %s: compact::error: %s\n", what, e.what());
        }
    }
}

} // namespace

int main(int argc, char** argv)
{
    for (int i = 1; i < argc; ++i)
        if (std::strcmp(argv[i], "--smoke") != 0) {
            std::fprintf(stderr, "usage: %s [--smoke]\n", argv[0]);
            return 2;
        }

    try {
        std::printf("1. per_layer_ranks: q, k, v share one Z and get r = 256; mlp.down gets r = 256 = n/8; "
                    "the rest r = n/4.\n   %lld rows per step, float activations.\n",
                    static_cast<long long>(tokens));
        const per_layer_ranks policy{{{1, 256}, {4, 256}}, 0.25};
        build_block(policy);
        run_one_layer(policy);

        std::printf("\n2. rank::budget: saved activations within 25%% of the uncompressed bytes.\n");
        const compact::rank::budget budget = make_budget(0.25);
        std::printf("   budget %zu KiB: chose", budget.byte_budget() / kib);
        for (const auto& e : budget.entries())
            std::printf(" r=%lld (id %llu)", static_cast<long long>(e.r), static_cast<unsigned long long>(e.layer.id));
        std::printf(", using %zu KiB; sum of (n+1)/r = %.2f\n", budget.saved_bytes() / kib, budget.variance());
        build_block(budget); // the budget is itself the rank policy of these layers

        std::printf("\n3. Invalid ranks are errors, never clamped:\n");
        show_errors();
        return 0;
    } catch (const compact::error& e) {
        std::fprintf(stderr, "compact error: %s\n", e.what());
        return 1;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
}
