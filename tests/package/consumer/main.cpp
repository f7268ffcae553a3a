// A consumer of the installed / vendored package: one compressed layer, one training step, checked.
#include <compact/compact.hpp>

#include <cstdio>
#include <vector>

int main()
{
    using layer = compact::linear_layer<float, compact::rank::ratio<1, 4>, compact::cpu>;
    compact::linear_options options;
    options.seed = 1;
    options.max_rows = 8;
    layer l(compact::in_features{64}, compact::out_features{32}, options);
    compact::fill_uniform(l.weight(), -0.1, 0.1, 1, 0);

    std::vector<float> x(8 * 64, 0.5f), y(8 * 32), dy(8 * 32, 1.0f);
    const compact::cpu::context ctx{1};
    l.forward(ctx, compact::make_view<const float>(x.data(), 8, 64), compact::make_view(y.data(), 8, 32));
    l.backward(ctx, compact::make_view<const float>(dy.data(), 8, 32), {});
    l.step(ctx, compact::adamw_params{});
    const bool ok = l.rank() == 16 && l.saved_bytes(8) == 8 * 16 * sizeof(float) && l.updates() == 1;
    std::printf("compact %s: rank %lld, saved %zu bytes: %s\n", COMPACT_VERSION_STRING,
                static_cast<long long>(l.rank()), l.saved_bytes(8), ok ? "ok" : "FAILED");
    return ok ? 0 : 1;
}
