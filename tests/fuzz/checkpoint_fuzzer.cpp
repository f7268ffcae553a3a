// tests/fuzz/checkpoint_fuzzer.cpp: libFuzzer target for the checkpoint loader (compact/io/checkpoint.hpp,
// compact/io/linear_layer_checkpoint.hpp), and, built with COMPACT_CHECKPOINT_FUZZ_CORPUS, the program
// that writes its seed corpus of valid checkpoints.
//
// Every input is tried twice: as it is, and with its checksums recomputed wherever the layout lets us
// find them, so that mutations get past the checksums into the section and layer validation. For each
// the properties are:
//   - checkpoint_reader either accepts the bytes or raises compact::error: no crash, no sanitizer
//     report, no other exception (an uncaught std::bad_alloc from trusting a size is a finding);
//   - what it accepts is canonical: writing its sections again gives back exactly the input;
//   - load_state into layers built like the corpus's either fails with compact::error and leaves the
//     layer bit-for-bit unchanged, or succeeds, and then save_state writes back the same sections.
#include <compact/compact.hpp>
#include <compact/io/checkpoint.hpp>
#include <compact/io/linear_layer_checkpoint.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

namespace {

// The layers of the corpus: every input is loaded into fresh ones of these.
using layer_a = compact::linear_layer<float, compact::rank::ratio<1, 4>, compact::cpu, float>;
using layer_b = compact::linear_layer<double, compact::rank::fixed, compact::cpu, double>;
// A store layer: its scheme is compressor state that loading sets (store_kind, store_bits, store_group).
using layer_c = compact::linear_layer<float, compact::quantized, compact::cpu, float>;

compact::linear_options options_a()
{
    compact::linear_options o;
    o.seed = 42;
    o.layer = 1;
    o.max_rows = 4;
    o.resample.gap = 3;
    o.moments = compact::moment_policy::transfer;
    return o;
}

compact::linear_options options_b()
{
    compact::linear_options o;
    o.seed = 42;
    o.layer = 2;
    o.max_rows = 4;
    o.bias = false;
    o.keep_projection = true;
    o.moments = compact::moment_policy::reset;
    return o;
}

compact::linear_options options_c()
{
    compact::linear_options o;
    o.seed = 42;
    o.layer = 3;
    o.max_rows = 4;
    o.master_weights = true;
    return o;
}

layer_a make_a() { return layer_a(compact::in_features{8}, compact::out_features{4}, options_a()); }
layer_b make_b()
{
    return layer_b(compact::in_features{6}, compact::out_features{3}, options_b(), compact::rank::fixed{2});
}
layer_c make_c()
{
    return layer_c(compact::in_features{5}, compact::out_features{3}, options_c(),
                   compact::quantized{compact::store_scheme::quantized(2, 8)});
}

[[noreturn]] void finding(const char* what)
{
    std::fprintf(stderr, "checkpoint_fuzzer: %s\n", what);
    std::abort();
}

/// The writer's encoding of every section of `r`, in file order.
compact::checkpoint_writer reencode(const compact::checkpoint_reader& r)
{
    compact::checkpoint_writer w;
    for (const auto& s : r.sections()) {
        auto add = [&](auto tag) {
            using T = decltype(tag);
            std::vector<T> values(static_cast<std::size_t>(s.count));
            r.copy(s, values.data(), s.count);
            w.add(s.name, values.data(), s.shape);
        };
        switch (s.type) {
        case compact::dtype::u8: add(std::uint8_t{}); break;
        case compact::dtype::i8: add(std::int8_t{}); break;
        case compact::dtype::u16: add(std::uint16_t{}); break;
        case compact::dtype::i16: add(std::int16_t{}); break;
        case compact::dtype::u32: add(std::uint32_t{}); break;
        case compact::dtype::i32: add(std::int32_t{}); break;
        case compact::dtype::u64: add(std::uint64_t{}); break;
        case compact::dtype::i64: add(std::int64_t{}); break;
        case compact::dtype::f32: add(float{}); break;
        case compact::dtype::f64: add(double{}); break;
        }
    }
    return w;
}

/// The layer's whole state as bytes, to compare before and after a failed load.
template <class Layer>
std::vector<unsigned char> state_bytes(const Layer& l)
{
    compact::checkpoint_writer w;
    compact::save_state(w, "s", l);
    return w.bytes();
}

/// load_state into a fresh layer under `prefix`: unchanged on failure, same sections on success.
template <class Layer>
void try_load(const compact::checkpoint_reader& r, const std::string& prefix, Layer layer,
              compact::weight_storage weights = compact::weight_storage::checkpoint)
{
    const auto before = state_bytes(layer);
    try {
        compact::load_state(r, prefix, layer, weights);
    } catch (const compact::error&) {
        if (state_bytes(layer) != before) finding("a failed load_state changed the layer");
        return;
    }
    compact::checkpoint_writer w;
    compact::save_state(w, prefix, layer, weights);
    const compact::checkpoint_reader saved(w.bytes());
    for (const auto& s : saved.sections()) {
        const auto& original = r.find(s.name);
        if (original.type != s.type || original.shape != s.shape ||
            std::memcmp(r.bytes().data() + original.offset, saved.bytes().data() + s.offset,
                        static_cast<std::size_t>(s.bytes)) != 0)
            finding("save_state after load_state differs from the loaded section");
    }
}

[[maybe_unused]] void check(std::vector<unsigned char> bytes)
{
    const auto input = bytes;
    try {
        const compact::checkpoint_reader r(std::move(bytes));
        if (reencode(r).bytes() != input) finding("an accepted checkpoint is not what the writer writes");
        for (const char* prefix : {"layers/0", "layers/1", "layers/2"}) {
            try_load(r, prefix, make_a());
            try_load(r, prefix, make_b());
            try_load(r, prefix, make_c());
        }
        try_load(r, "s", make_a(), compact::weight_storage::caller);
    } catch (const compact::error&) {
        // rejected: fine
    }
}

/// Recomputes the header's and every section's checksum where the layout lets us find them.
[[maybe_unused]] void fix_checksums(std::vector<unsigned char>& b)
{
    auto get64 = [&](std::size_t at) {
        std::uint64_t v;
        std::memcpy(&v, b.data() + at, 8);
        return v;
    };
    auto put64 = [&](std::size_t at, std::uint64_t v) { std::memcpy(b.data() + at, &v, 8); };
    if (b.size() < 40) return;
    put64(32, compact::crc64(0, b.data(), 32));
    const std::uint64_t count = get64(16);
    std::uint64_t at = 40;
    for (std::uint64_t k = 0; k < count && b.size() - at >= 16; ++k) {
        const std::uint64_t left = b.size() - at;
        const std::uint64_t payload = get64(static_cast<std::size_t>(at));
        std::uint16_t name_bytes;
        std::memcpy(&name_bytes, b.data() + at + 8, 2);
        const std::uint64_t rank = b[static_cast<std::size_t>(at + 11)];
        const std::uint64_t head = 16 + 8 * rank + (static_cast<std::uint64_t>(name_bytes) + 7) / 8 * 8;
        if (head > left || payload > left - head || (payload + 7) / 8 * 8 + 8 > left - head) return;
        const std::uint64_t body = head + (payload + 7) / 8 * 8;
        put64(static_cast<std::size_t>(at + body), compact::crc64(0, b.data() + at, static_cast<std::size_t>(body)));
        at += body + 8;
    }
}

} // namespace

#if defined(COMPACT_CHECKPOINT_FUZZ_CORPUS)

#include <filesystem>

// checkpoint_fuzz_corpus DIR: writes the seed corpus, valid checkpoints of the layers above and of
// every dtype, to DIR (created if missing).
int main(int argc, char** argv)
{
    if (argc != 2) {
        std::fprintf(stderr, "usage: %s DIR\n", argv[0]);
        return 2;
    }
    const std::filesystem::path dir = argv[1];
    std::filesystem::create_directories(dir);
    auto path = [&](const char* name) { return (dir / name).string(); };

    // Layers with recognisable, non-trivial state reached the ordinary way (forward, backward, step).
    layer_a a = make_a();
    layer_b b = make_b();
    layer_c c = make_c();
    const compact::cpu::context ctx{};
    auto train = [&](auto& l, int steps) {
        using T = typename std::remove_reference_t<decltype(l)>::layer_type::scalar_type;
        compact::fill_uniform(l.weight(), -0.5, 0.5, 7, l.options().layer);
        std::vector<T> x(static_cast<std::size_t>(4 * l.in())), y(static_cast<std::size_t>(4 * l.out()));
        for (int s = 0; s < steps; ++s) {
            const auto stream = 100 + static_cast<std::uint64_t>(s);
            compact::fill_uniform(compact::make_view(x.data(), 4, l.in()), -1.0, 1.0, 7, stream);
            l.forward(ctx, compact::make_view(x.data(), 4, l.in()), compact::make_view(y.data(), 4, l.out()));
            l.backward(ctx, compact::make_view(y.data(), 4, l.out()), {});
            l.step(ctx, compact::adamw_params{});
        }
    };
    train(a, 5);
    train(b, 2);
    train(c, 3);
    c.compressor().set_scheme(compact::store_scheme::average(8)); // as a bit allocator would
    compact::save_checkpoint(path("a.ckpt"), a);
    compact::save_checkpoint(path("b.ckpt"), b);
    compact::save_checkpoint(path("c.ckpt"), c);
    compact::save_checkpoint(path("ab.ckpt"), a, b);
    compact::save_checkpoint(path("abc.ckpt"), a, b, c);
    compact::save_checkpoint(path("fresh_b.ckpt"), make_b());
    {
        compact::checkpoint_writer w;
        compact::save_state(w, "s", a, compact::weight_storage::caller);
        w.write(path("caller.ckpt"));
    }
    {
        compact::checkpoint_writer w;
        const std::uint8_t u8[3] = {1, 2, 3};
        const std::int16_t i16[2] = {-2, 2};
        const std::int32_t i32[6] = {-1, 2, -3, 4, -5, 6};
        const double f64[4] = {0.5, -1.0, 1e300, 0.0};
        w.add("u8", u8, {3});
        w.add_scalar<std::int8_t>("i8", -1);
        w.add("i16", i16, {2, 1});
        w.add_scalar<std::uint16_t>("u16", 9);
        w.add("i32", i32, {1, 2, 3});
        w.add_scalar<std::uint32_t>("u32", 7);
        w.add_scalar<std::int64_t>("i64", -7);
        w.add_scalar<std::uint64_t>("layers/count", 1);
        w.add_scalar<float>("f32", 1.5f);
        w.add("f64", f64, {2, 2});
        w.add("empty", static_cast<const float*>(nullptr), {0, 3});
        w.write(path("dtypes.ckpt"));
    }
    compact::checkpoint_writer{}.write(path("empty.ckpt"));
    return 0;
}

#else

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size)
{
    std::vector<unsigned char> bytes(data, data + size);
    check(bytes);
    fix_checksums(bytes);
    check(std::move(bytes));
    return 0;
}

#endif
