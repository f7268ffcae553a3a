// tests/test_checkpoint.cpp: the checkpoint container (compact/io/checkpoint.hpp) and linear_layer
// checkpoints (compact/io/linear_layer_checkpoint.hpp).
//
// - the container: CRC-64 known answers, round trips of every dtype and rank, the documented byte
//   layout, the writer's refusals, atomic replacement (also when the writer is killed mid-write);
// - resume: 100 updates straight against 40, save, load into fresh layers, 60 more: bit-identical
//   weights, moments and counters for every moment policy, with keep_projection off and on, across
//   epoch boundaries (T = 7) and with the save exactly on one (T = 40), for float and double;
// - rejection: bad magic, newer version, truncation at every byte, a flipped bit at every byte,
//   checksum, trailing bytes, missing sections, dtype, shape and configuration mismatches, impossible
//   counters: each a compact::error saying which, with the target layers unchanged.
#include <compact/compact.hpp>
#include <compact/io/checkpoint.hpp>
#include <compact/io/linear_layer_checkpoint.hpp>

#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <limits>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include <csignal>
#include <poll.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

namespace {

using compact::index_t;
using compact::in_features;
using compact::out_features;
namespace fs = std::filesystem;

// ----------------------------------------------------------------------------------- small helpers

/// A fresh directory for one test case, removed with everything in it afterwards.
struct scratch_dir {
    fs::path path;
    scratch_dir()
    {
        std::string pattern = (fs::temp_directory_path() / "compact-test-checkpoint-XXXXXX").string();
        REQUIRE(::mkdtemp(pattern.data()) != nullptr);
        path = pattern;
    }
    ~scratch_dir()
    {
        std::error_code ignored;
        fs::remove_all(path, ignored);
    }
    std::string file(const char* name) const { return (path / name).string(); }
    /// Names of the entries in the directory.
    std::vector<std::string> entries() const
    {
        std::vector<std::string> out;
        for (const auto& e : fs::directory_iterator(path)) out.push_back(e.path().filename().string());
        return out;
    }
};

std::vector<unsigned char> file_bytes(const std::string& path)
{
    std::ifstream in(path, std::ios::binary);
    return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

void write_bytes(const std::string& path, const unsigned char* data, std::size_t size)
{
    // A new file each time: ext4 flushes a file truncated and rewritten in place (auto_da_alloc),
    // which would make the loops below over every byte offset take seconds.
    std::error_code ignored;
    fs::remove(path, ignored);
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size));
    REQUIRE(out.good());
}

/// The message of the compact::error that f() raises; fails the test if it raises none.
std::string error_of(const std::function<void()>& f)
{
    try {
        f();
    } catch (const compact::error& e) {
        return e.what();
    }
    FAIL("no compact::error was raised");
    return {};
}

bool has(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

template <class T>
bool bit_equal(const std::vector<T>& a, const std::vector<T>& b)
{
    return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

template <class T>
std::vector<T> copy_of(compact::const_matrix_view<T> v)
{
    std::vector<T> out;
    for (index_t i = 0; i < v.rows; ++i) out.insert(out.end(), v.row(i), v.row(i) + v.cols);
    return out;
}

template <class T>
std::vector<T> copy_of(const T* p, index_t count)
{
    return p ? std::vector<T>(p, p + count) : std::vector<T>{};
}

// --------------------------------------------------------------------------------- training helpers

/// Everything of a linear_layer's training state the public interface shows, compared bit for bit.
template <class Layer>
struct snapshot {
    using scalar = typename Layer::layer_type::scalar_type;
    using state = std::remove_reference_t<decltype(*std::declval<Layer&>().first_moment().data)>;
    std::vector<scalar> weight, bias;
    std::vector<state> m, v, bias_m, bias_v, master, master_bias;
    compact::adam_counters counters{}, bias_counters{};
    std::uint64_t updates = 0;

    explicit snapshot(const Layer& layer)
        : weight(copy_of<scalar>(layer.weight())),
          bias(copy_of<scalar>(layer.bias(), layer.out())),
          m(copy_of<state>(layer.first_moment())),
          v(copy_of<state>(layer.second_moment())),
          bias_m(copy_of<state>(layer.bias_first_moment(), layer.out())),
          bias_v(copy_of<state>(layer.bias_second_moment(), layer.out())),
          master(copy_of<state>(layer.master_weight())),
          master_bias(copy_of<state>(layer.master_bias(), layer.out())),
          counters(layer.counters()),
          bias_counters(layer.bias_counters()),
          updates(layer.updates())
    {
    }

    bool operator==(const snapshot& o) const
    {
        return bit_equal(weight, o.weight) && bit_equal(bias, o.bias) && bit_equal(m, o.m) && bit_equal(v, o.v) &&
               bit_equal(bias_m, o.bias_m) && bit_equal(bias_v, o.bias_v) && bit_equal(master, o.master) &&
               bit_equal(master_bias, o.master_bias) && counters.step == o.counters.step &&
               counters.epoch == o.counters.epoch && bias_counters.step == o.bias_counters.step &&
               bias_counters.epoch == o.bias_counters.epoch && updates == o.updates;
    }
    bool operator!=(const snapshot& o) const { return !(*this == o); }
};

template <class Layer>
snapshot<Layer> snap(const Layer& layer)
{
    return snapshot<Layer>(layer);
}

/// A regression against a fixed teacher (W*, b*) with a fresh batch X_s ~ U(-1, 1) for every update s,
/// so resumed runs must also pick up the data stream where it stopped.
template <class Scalar>
struct teacher_problem {
    index_t rows, n, m;
    std::vector<double> w, b;

    teacher_problem(index_t rows_, index_t n_, index_t m_) : rows(rows_), n(n_), m(m_)
    {
        std::mt19937_64 rng(0x7eac);
        std::uniform_real_distribution<double> d(-1, 1);
        for (index_t i = 0; i < m * n; ++i) w.push_back(d(rng) / std::sqrt(static_cast<double>(n)));
        for (index_t i = 0; i < m; ++i) b.push_back(0.5 * d(rng));
    }

    void batch(std::uint64_t step, std::vector<Scalar>& x, std::vector<Scalar>& target) const
    {
        std::mt19937_64 rng(0x5eed0000 + step);
        std::uniform_real_distribution<double> d(-1, 1);
        x.resize(static_cast<std::size_t>(rows * n));
        target.resize(static_cast<std::size_t>(rows * m));
        for (auto& v : x) v = static_cast<Scalar>(d(rng));
        for (index_t i = 0; i < rows; ++i)
            for (index_t o = 0; o < m; ++o) {
                double y = b[static_cast<std::size_t>(o)];
                for (index_t j = 0; j < n; ++j)
                    y += static_cast<double>(x[static_cast<std::size_t>(i * n + j)]) *
                         w[static_cast<std::size_t>(o * n + j)];
                target[static_cast<std::size_t>(i * m + o)] = static_cast<Scalar>(y);
            }
    }
};

compact::adamw_params hyper()
{
    compact::adamw_params h;
    h.lr = 1e-2;
    h.alpha = 0.25;
    h.weight_decay = 0.01;
    return h;
}

/// Updates [first, last) of `layer` on `problem`, each from two micro-batches (mean squared error).
template <class Layer, class Scalar>
void train(Layer& layer, const teacher_problem<Scalar>& problem, std::uint64_t first, std::uint64_t last)
{
    const typename Layer::context ctx{};
    const index_t half = problem.rows / 2, n = problem.n, m = problem.m;
    std::vector<Scalar> x, target, y(static_cast<std::size_t>(half * m)), dy(y.size());
    std::vector<Scalar> dx(static_cast<std::size_t>(half * n));
    const auto scale = static_cast<Scalar>(2.0 / static_cast<double>(problem.rows * m));
    for (std::uint64_t s = first; s < last; ++s) {
        problem.batch(s, x, target);
        for (index_t k = 0; k < 2; ++k) {
            layer.forward(ctx, compact::const_matrix_view<Scalar>(x.data() + k * half * n, half, n),
                          compact::make_view(y.data(), half, m));
            for (index_t i = 0; i < half * m; ++i)
                dy[static_cast<std::size_t>(i)] =
                    scale * (y[static_cast<std::size_t>(i)] - target[static_cast<std::size_t>(k * half * m + i)]);
            layer.backward(ctx, compact::const_matrix_view<Scalar>(dy.data(), half, m),
                           compact::make_view(dx.data(), half, n));
        }
        layer.step(ctx, hyper());
    }
}

template <class Layer>
void initialise(Layer& layer, std::uint64_t seed)
{
    using scalar = typename Layer::layer_type::scalar_type;
    std::mt19937_64 rng(seed);
    std::uniform_real_distribution<double> d(-0.3, 0.3);
    auto w = layer.weight();
    for (index_t i = 0; i < w.rows; ++i)
        for (index_t j = 0; j < w.cols; ++j) w(i, j) = static_cast<scalar>(d(rng));
    if (auto* b = layer.bias())
        for (index_t o = 0; o < layer.out(); ++o) b[o] = static_cast<scalar>(d(rng));
}

compact::linear_options options_for(compact::moment_policy policy, bool keep_projection, std::uint64_t gap,
                                    index_t max_rows)
{
    compact::linear_options o;
    o.seed = 0x5eed5eed5eedull;
    o.layer = 7;
    o.max_rows = max_rows;
    o.resample.gap = gap;
    o.moments = policy;
    o.keep_projection = keep_projection;
    return o;
}

template <class Scalar, class State>
using ratio_layer = compact::linear_layer<Scalar, compact::rank::ratio<1, 4>, compact::cpu, State>;

template <class Scalar, class State>
struct config {
    using scalar = Scalar;
    using state = State;
};

} // namespace

// ========================================================================================= container

TEST_CASE("crc64 is CRC-64/XZ: known answers, and it continues over pieces")
{
    const char* check = "123456789";
    CHECK(compact::crc64(0, check, 9) == 0x995DC9BBDF1939FAull);
    CHECK(compact::crc64(0, check, 0) == 0);
    for (std::size_t split = 0; split <= 9; ++split)
        CHECK(compact::crc64(compact::crc64(0, check, split), check + split, 9 - split) == 0x995DC9BBDF1939FAull);
    // The slicing-by-8 loop against the bytewise definition, at every length and alignment up to 40.
    std::vector<unsigned char> data(48);
    for (std::size_t i = 0; i < data.size(); ++i) data[i] = static_cast<unsigned char>(i * 37 + 11);
    for (std::size_t start = 0; start < 8; ++start)
        for (std::size_t len = 0; len <= 40; ++len) {
            std::uint64_t c = ~std::uint64_t{0};
            for (std::size_t i = start; i < start + len; ++i) {
                c ^= data[i];
                for (int bit = 0; bit < 8; ++bit) c = (c & 1) ? (c >> 1) ^ 0xC96C5795D7870F42ull : c >> 1;
            }
            CHECK(compact::crc64(0, data.data() + start, len) == ~c);
        }
}

TEST_CASE("checkpoint_writer and checkpoint_reader round-trip every dtype and rank")
{
    const std::vector<std::uint8_t> u8{1, 2, 255};
    const std::vector<std::int8_t> i8{-128, 0, 127};
    const std::vector<std::uint16_t> u16{0, 65535};
    const std::vector<std::int16_t> i16{-32768, 5};
    const std::vector<std::uint32_t> u32{0xdeadbeefu};
    const std::vector<std::int32_t> i32{-1, 2, -3, 4, -5, 6};
    const std::vector<std::int64_t> i64{-(std::int64_t{1} << 62)};
    const std::vector<float> f32{1.5f, -0.0f, std::numeric_limits<float>::infinity(), std::nanf("0x123")};
    std::vector<double> f64(2 * 3 * 4 * 5);
    for (std::size_t i = 0; i < f64.size(); ++i)
        f64[i] = std::ldexp(static_cast<double>(i) + 0.1, static_cast<int>(i) - 60);
    // A (3, 2) block of a (3, 5) matrix: the writer packs it densely.
    const std::vector<float> strided{1, 2, 90, 91, 92, 3, 4, 93, 94, 95, 5, 6, 96, 97, 98};

    compact::checkpoint_writer w;
    w.add("u8", u8.data(), {3});
    w.add("i8", i8.data(), {3, 1});
    w.add("u16", u16.data(), {2});
    w.add("i16", i16.data(), {1, 2});
    w.add("u32", u32.data(), {1});
    w.add("i32", i32.data(), {2, 3});
    w.add_scalar<std::uint64_t>("scalar/u64", 0xfedcba9876543210ull);
    w.add("i64", i64.data(), {1, 1, 1, 1, 1, 1, 1, 1});
    w.add("f32", f32.data(), {4});
    w.add("f64", f64.data(), {2, 3, 4, 5});
    w.add("empty", static_cast<const float*>(nullptr), {0, 7});
    w.add("strided", compact::const_matrix_view<float>(strided.data(), 3, 2, 5));
    w.add("a name with spaces and ~!@#", u8.data(), {1});
    CHECK(w.section_count() == 13);

    const auto bytes = w.bytes();
    CHECK(bytes.size() == w.file_bytes());
    const compact::checkpoint_reader r(bytes);
    CHECK(r.version() == compact::checkpoint_format_version);
    REQUIRE(r.sections().size() == 13);
    CHECK(r.sections()[0].name == "u8"); // file order is insertion order
    for (const auto& s : r.sections()) CHECK(s.offset % 8 == 0);

    auto read_all = [&](const char* name, auto type_tag, const std::vector<std::uint64_t>& shape) {
        using T = decltype(type_tag);
        const auto& s = r.expect<T>(name, shape);
        std::vector<T> out(static_cast<std::size_t>(s.count));
        r.copy(s, out.data(), s.count);
        return out;
    };
    CHECK(read_all("u8", std::uint8_t{}, {3}) == u8);
    CHECK(read_all("i8", std::int8_t{}, {3, 1}) == i8);
    CHECK(read_all("u16", std::uint16_t{}, {2}) == u16);
    CHECK(read_all("i16", std::int16_t{}, {1, 2}) == i16);
    CHECK(read_all("u32", std::uint32_t{}, {1}) == u32);
    CHECK(read_all("i32", std::int32_t{}, {2, 3}) == i32);
    CHECK(r.scalar<std::uint64_t>("scalar/u64") == 0xfedcba9876543210ull);
    CHECK(read_all("i64", std::int64_t{}, {1, 1, 1, 1, 1, 1, 1, 1}) == i64);
    CHECK(bit_equal(read_all("f32", float{}, {4}), f32)); // -0, inf and the NaN payload survive
    CHECK(bit_equal(read_all("f64", double{}, {2, 3, 4, 5}), f64));
    CHECK(read_all("empty", float{}, {0, 7}).empty());
    std::vector<float> dense(6, 0.0f), padded(3 * 4, -1.0f);
    r.read("strided", compact::make_view(dense.data(), 3, 2));
    CHECK(dense == std::vector<float>{1, 2, 3, 4, 5, 6});
    r.read("strided", compact::matrix_view<float>(padded.data(), 3, 2, 4)); // the destination's ld too
    CHECK(padded == std::vector<float>{1, 2, -1, -1, 3, 4, -1, -1, 5, 6, -1, -1});
    CHECK(r.contains("a name with spaces and ~!@#"));
    CHECK_FALSE(r.contains("U8"));

    // Typed access says what is wrong, naming the section.
    CHECK(has(error_of([&] { r.find("nope"); }), "missing section 'nope'"));
    const auto dtype_error = error_of([&] { r.expect<double>("f32", {4}); });
    CHECK(has(dtype_error, "dtype mismatch"));
    CHECK(has(dtype_error, "'f32' holds f32 values but f64 are required"));
    const auto shape_error = error_of([&] { r.expect<std::int32_t>("i32", {3, 2}); });
    CHECK(has(shape_error, "shape mismatch"));
    CHECK(has(shape_error, "'i32' is (2, 3) but (3, 2) is required"));
    CHECK(has(error_of([&] { r.scalar<std::uint64_t>("u32"); }), "dtype mismatch"));
    CHECK(has(error_of([&] { r.scalar<std::int32_t>("i32"); }), "shape mismatch"));
    CHECK(has(error_of([&] { r.read("f32", compact::make_view(dense.data(), 2, 2)); }), "shape mismatch"));

    // The empty checkpoint is valid too.
    CHECK(compact::checkpoint_reader(compact::checkpoint_writer{}.bytes()).sections().empty());
}

TEST_CASE("the checkpoint byte layout is the documented one")
{
    compact::checkpoint_writer w;
    const std::vector<float> values{1.0f, 2.0f, 3.0f};
    w.add("abc", values.data(), {3});
    const auto b = w.bytes();
    // header 40 + section: 16 + 8 (one extent) + 8 (name "abc" padded) + 16 (12 payload bytes padded) + 8
    REQUIRE(b.size() == 40 + 16 + 8 + 8 + 16 + 8);
    auto u64 = [&](std::size_t at) {
        std::uint64_t v = 0;
        for (int i = 7; i >= 0; --i) v = v << 8 | b[at + static_cast<std::size_t>(i)];
        return v;
    };
    const unsigned char magic[8] = {0x89, 'C', 'K', 'P', '\r', '\n', 0x1a, '\n'};
    CHECK(std::memcmp(b.data(), magic, 8) == 0);
    CHECK((u64(8) & 0xffffffffu) == 1);  // version
    CHECK((u64(8) >> 32) == 0);          // reserved
    CHECK(u64(16) == 1);                 // sections
    CHECK(u64(24) == b.size());          // file bytes
    CHECK(u64(32) == compact::crc64(0, b.data(), 32));
    CHECK(u64(40) == 12);                // payload bytes
    CHECK(b[48] == 3);                   // name length (u16, low byte)
    CHECK(b[49] == 0);
    CHECK(b[50] == 9);                   // dtype f32
    CHECK(b[51] == 1);                   // rank
    CHECK(u64(56) == 3);                 // extent
    CHECK(std::memcmp(b.data() + 64, "abc\0\0\0\0\0", 8) == 0);
    float f[3];
    std::memcpy(f, b.data() + 72, 12);
    CHECK((f[0] == 1.0f && f[1] == 2.0f && f[2] == 3.0f));
    CHECK((b[84] | b[85] | b[86] | b[87]) == 0); // padding
    CHECK(u64(88) == compact::crc64(0, b.data() + 40, 48));
}

TEST_CASE("checkpoint_writer refuses what it cannot write faithfully")
{
    compact::checkpoint_writer w;
    const float x = 1.0f;
    w.add_scalar("x", x);
    CHECK(has(error_of([&] { w.add_scalar("x", 2.0); }), "'x' was added twice"));
    CHECK(has(error_of([&] { w.add_scalar("", x); }), "printable ASCII"));
    CHECK(has(error_of([&] { w.add_scalar("tab\there", x); }), "printable ASCII"));
    CHECK(has(error_of([&] { w.add_scalar(std::string(256, 'a'), x); }), "printable ASCII"));
    CHECK(has(error_of([&] { w.add("rank9", &x, {1, 1, 1, 1, 1, 1, 1, 1, 1}); }), "at most 8"));
    CHECK(has(error_of([&] { w.add("null", static_cast<const float*>(nullptr), {2}); }), "data is null"));
    CHECK(has(error_of([&] { w.add("huge", &x, {std::uint64_t{1} << 40, std::uint64_t{1} << 40}); }), "too large"));
    w.add_scalar(std::string(255, 'a'), x); // the longest name
    CHECK(w.section_count() == 2);          // the refused ones left nothing behind
    CHECK(compact::checkpoint_reader(w.bytes()).sections().size() == 2);
}

TEST_CASE("checkpoint_writer::write replaces the file atomically and cleans up after failures")
{
    scratch_dir dir;
    const auto path = dir.file("run.ckpt");
    compact::checkpoint_writer a, b;
    a.add_scalar<std::uint64_t>("which", 1);
    b.add_scalar<std::uint64_t>("which", 2);
    b.add_scalar<std::uint64_t>("more", 3);

    a.write(path);
    CHECK(compact::checkpoint_reader::read_file(path).scalar<std::uint64_t>("which") == 1);
    b.write(path);
    CHECK(file_bytes(path) == b.bytes());
    CHECK(compact::checkpoint_reader::read_file(path).scalar<std::uint64_t>("which") == 2);
    CHECK(dir.entries() == std::vector<std::string>{"run.ckpt"}); // no temporary file left behind

    // A file name relative to the working directory works too (its directory is ".").
    {
        const auto here = fs::current_path();
        fs::current_path(dir.path);
        a.write("relative.ckpt");
        fs::current_path(here);
        CHECK(file_bytes(dir.file("relative.ckpt")) == a.bytes());
        fs::remove(dir.file("relative.ckpt"));
    }

    // No such directory: nothing is created.
    const auto missing = dir.file("no/such/dir/run.ckpt");
    const auto e1 = error_of([&] { a.write(missing); });
    CHECK(has(e1, missing));
    CHECK(has(e1, "cannot create the temporary file"));
    // The target is a directory: rename fails, the temporary file is removed, the directory stays.
    fs::create_directory(dir.file("taken"));
    const auto e2 = error_of([&] { a.write(dir.file("taken")); });
    CHECK(has(e2, "renaming the temporary file over the checkpoint failed"));
    CHECK(has(e2, "previous checkpoint, if any, is unchanged"));
    CHECK(fs::is_directory(dir.file("taken")));
    CHECK(dir.entries().size() == 2);
    CHECK(file_bytes(path) == b.bytes());

    CHECK(has(error_of([&] { compact::checkpoint_reader::read_file(dir.file("absent")); }), "cannot open"));
    CHECK(has(error_of([&] { compact::checkpoint_reader::read_file(dir.file("taken")); }), "cannot read"));
}

TEST_CASE("a writer killed at any moment leaves the previous checkpoint or the new one, never a mix")
{
    scratch_dir dir;
    const auto path = dir.file("run.ckpt");
    // 4 MiB sections; the kills are spread over twice the time one write takes (fsync included), so
    // they land before, during and after the rename.
    std::vector<float> big(std::size_t{1} << 20);
    compact::checkpoint_writer old_one, new_one;
    for (std::size_t i = 0; i < big.size(); ++i) big[i] = static_cast<float>(i);
    old_one.add("values", big.data(), {big.size()});
    for (auto& v : big) v = -v;
    new_one.add("values", big.data(), {big.size()});
    const auto start = std::chrono::steady_clock::now();
    old_one.write(path);
    const auto one_write = std::chrono::steady_clock::now() - start;
    const auto old_bytes = old_one.bytes(), new_bytes = new_one.bytes();

    int saw_old = 0, saw_new = 0;
    for (int trial = 0; trial < 6; ++trial) {
        const pid_t child = ::fork();
        REQUIRE(child >= 0);
        if (child == 0) {
            for (;;) {
                try {
                    new_one.write(path);
                    old_one.write(path);
                } catch (...) {
                    ::_exit(1);
                }
            }
        }
        std::this_thread::sleep_for(one_write * (trial + 1) / 3);
        ::kill(child, SIGKILL);
        int status = 0;
        ::waitpid(child, &status, 0);
        CHECK(WIFSIGNALED(status));
        const auto now = file_bytes(path);
        const bool is_old = now == old_bytes, is_new = now == new_bytes;
        CHECK((is_old || is_new));
        saw_old += is_old;
        saw_new += is_new;
        CHECK_NOTHROW(compact::checkpoint_reader::read_file(path));
    }
    CHECK(saw_old + saw_new == 6);
    // A killed writer may leave its temporary file (run.ckpt.tmp.<pid>.<n>); it never replaces run.ckpt.
    for (const auto& name : dir.entries()) CHECK((name == "run.ckpt" || name.rfind("run.ckpt.tmp.", 0) == 0));
}

// ------------------------------------------------------------- files that are not what they claim to be

namespace {

/// The temporary file name the header documents for target file name `name`, the name cut to `keep` bytes.
std::string documented_temporary(const std::string& name, std::size_t keep)
{
    char hash[17];
    std::snprintf(hash, sizeof hash, "%016llx",
                  static_cast<unsigned long long>(compact::crc64(0, name.data(), name.size())));
    return name.substr(0, keep) + ".tmp." + hash;
}

/// Runs f() in a child process for at most `seconds` (and, outside AddressSanitizer builds, with at most
/// 1 GiB more address space than the test has, so that reading without bound fails instead of exhausting
/// the machine): "compact::error: <message>", "other exception: ...", "no error" or "timed out".
std::string outcome_in_child(const std::function<void()>& f, int seconds)
{
    int fds[2];
    REQUIRE(::pipe(fds) == 0);
    const pid_t child = ::fork();
    REQUIRE(child >= 0);
    if (child == 0) {
        ::close(fds[0]);
#if !defined(__SANITIZE_ADDRESS__)
        long pages = 0;
        if (std::FILE* statm = std::fopen("/proc/self/statm", "r")) {
            if (std::fscanf(statm, "%ld", &pages) != 1) pages = 0;
            std::fclose(statm);
        }
        if (pages > 0) {
            const ::rlim_t limit = static_cast<::rlim_t>(pages) * static_cast<::rlim_t>(::sysconf(_SC_PAGESIZE)) +
                                   (::rlim_t{1} << 30);
            const ::rlimit r{limit, limit};
            ::setrlimit(RLIMIT_AS, &r);
        }
#endif
        std::string out;
        try {
            f();
            out = "no error";
        } catch (const compact::error& e) {
            out = std::string("compact::error: ") + e.what();
        } catch (const std::exception& e) {
            out = std::string("other exception: ") + e.what();
        }
        for (std::size_t at = 0; at < out.size();) {
            const ::ssize_t n = ::write(fds[1], out.data() + at, out.size() - at);
            if (n <= 0) break;
            at += static_cast<std::size_t>(n);
        }
        ::_exit(0);
    }
    ::close(fds[1]);
    std::string out;
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(seconds);
    bool done = false;
    while (!done) {
        const auto now = std::chrono::steady_clock::now();
        const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - now);
        if (left.count() <= 0) break;
        ::pollfd p{fds[0], POLLIN, 0};
        if (::poll(&p, 1, static_cast<int>(left.count())) <= 0) continue;
        char buffer[4096];
        const ::ssize_t n = ::read(fds[0], buffer, sizeof buffer);
        if (n > 0) out.append(buffer, static_cast<std::size_t>(n));
        else done = n == 0 || errno != EINTR;
    }
    ::close(fds[0]);
    if (!done) {
        ::kill(child, SIGKILL);
        out = "timed out after " + std::to_string(seconds) + " s";
    }
    int status = 0;
    ::waitpid(child, &status, 0);
    return out;
}

} // namespace

TEST_CASE("read_file refuses devices, pipes and directories at once, before reading any byte")
{
    scratch_dir dir;
    for (const char* device : {"/dev/zero", "/dev/urandom"}) {
        CAPTURE(device);
        if (!fs::exists(device)) continue;
        const auto outcome = outcome_in_child([&] { compact::checkpoint_reader::read_file(device); }, 10);
        CAPTURE(outcome);
        CHECK(has(outcome, "compact::error: checkpoint_reader::read_file: '" + std::string(device) +
                               "': cannot read: it is a character device, not a regular file"));
    }
    // A FIFO with no writer: opening it for reading must not wait for one.
    const auto fifo = dir.file("fifo");
    REQUIRE(::mkfifo(fifo.c_str(), 0600) == 0);
    const auto outcome = outcome_in_child([&] { compact::checkpoint_reader::read_file(fifo); }, 10);
    CAPTURE(outcome);
    CHECK(has(outcome, "compact::error: checkpoint_reader::read_file: '" + fifo +
                           "': cannot read: it is a pipe (FIFO), not a regular file"));
    const auto e = error_of([&] { compact::checkpoint_reader::read_file(dir.path.string()); });
    CHECK(has(e, "cannot read: it is a directory, not a regular file"));
}

TEST_CASE("read_file checks the header first and reads no more than it declares")
{
    scratch_dir dir;
    compact::checkpoint_writer w;
    w.add_scalar<std::uint64_t>("step", 7);
    const auto image = w.bytes();
    constexpr std::uint64_t huge = std::uint64_t{64} << 30; // sparse: no disk space is used
    auto sparse = [&](const std::string& path, const std::vector<unsigned char>& start) {
        write_bytes(path, start.data(), start.size());
        return ::truncate(path.c_str(), static_cast<::off_t>(huge)) == 0;
    };

    // 64 GiB that are not a checkpoint: refused from the magic.
    const auto zeros = dir.file("zeros");
    if (sparse(zeros, {})) {
        const auto outcome = outcome_in_child([&] { compact::checkpoint_reader::read_file(zeros); }, 10);
        CAPTURE(outcome);
        CHECK(has(outcome, "compact::error: checkpoint_reader: '" + zeros + "': not a compact checkpoint"));
    } else {
        MESSAGE("the temporary directory's file system cannot hold a 64 GiB sparse file; skipped");
    }
    // A valid checkpoint followed by 64 GiB: refused from the declared size, before any allocation.
    const auto padded = dir.file("padded.ckpt");
    if (sparse(padded, image)) {
        const auto outcome = outcome_in_child([&] { compact::checkpoint_reader::read_file(padded); }, 10);
        CAPTURE(outcome);
        CHECK(has(outcome, "compact::error: checkpoint_reader: '" + padded + "': corrupt: the file has " +
                               std::to_string(huge) + " bytes but its header declares " +
                               std::to_string(image.size()) + " (trailing bytes after the last section)"));
    }

    // A header that declares 2^62 bytes (checksum recomputed) on a 40-byte file: truncated, no allocation.
    std::vector<unsigned char> header(image.begin(), image.begin() + 40);
    const std::uint64_t declared = std::uint64_t{1} << 62;
    std::memcpy(header.data() + 24, &declared, 8);
    const std::uint64_t crc = compact::crc64(0, header.data(), 32);
    std::memcpy(header.data() + 32, &crc, 8);
    const auto lying = dir.file("lying.ckpt");
    write_bytes(lying, header.data(), header.size());
    const auto outcome = outcome_in_child([&] { compact::checkpoint_reader::read_file(lying); }, 10);
    CAPTURE(outcome);
    CHECK(has(outcome, "compact::error: checkpoint_reader: '" + lying + "': truncated: the file has 40 bytes but "
                       "its header declares 4611686018427387904"));
    // A checkpoint cut short inside its section; then the whole one reads.
    const auto cut = dir.file("cut.ckpt");
    write_bytes(cut, image.data(), image.size() - 8);
    CHECK(has(error_of([&] { compact::checkpoint_reader::read_file(cut); }),
              "truncated: the file has " + std::to_string(image.size() - 8) + " bytes but its header declares " +
                  std::to_string(image.size())));
    write_bytes(cut, image.data(), image.size());
    CHECK(compact::checkpoint_reader::read_file(cut).scalar<std::uint64_t>("step") == 7);
}

TEST_CASE("a stale temporary file of the target, left by a killed writer, is taken over by the next write")
{
    scratch_dir dir;
    const auto path = dir.file("run.ckpt");
    const auto tmp = documented_temporary("run.ckpt", std::string::npos);
    compact::checkpoint_writer w;
    w.add_scalar<std::uint64_t>("step", 3);

    // What a writer killed mid-write leaves: the temporary, partly written, larger than the new file.
    const std::vector<unsigned char> garbage(1 << 16, 0xab);
    write_bytes(dir.file(tmp.c_str()), garbage.data(), garbage.size());
    w.write(path);
    CHECK(dir.entries() == std::vector<std::string>{"run.ckpt"});
    CHECK(file_bytes(path) == w.bytes());

    // Writers killed at random moments: at most the one temporary is ever left, and the next write takes it.
    compact::checkpoint_writer big;
    std::vector<float> values(std::size_t{1} << 18, 0.5f);
    big.add("values", values.data(), {values.size()});
    for (int trial = 0; trial < 12; ++trial) {
        const pid_t child = ::fork();
        REQUIRE(child >= 0);
        if (child == 0) {
            for (;;) {
                try {
                    big.write(path);
                } catch (...) {
                    ::_exit(1);
                }
            }
        }
        std::this_thread::sleep_for(std::chrono::microseconds(500 + 700 * trial));
        ::kill(child, SIGKILL);
        int status = 0;
        ::waitpid(child, &status, 0);
        CHECK(WIFSIGNALED(status));
        for (const auto& name : dir.entries()) CHECK((name == "run.ckpt" || name == tmp));
    }
    w.write(path);
    CHECK(dir.entries() == std::vector<std::string>{"run.ckpt"});
    CHECK(compact::checkpoint_reader::read_file(path).scalar<std::uint64_t>("step") == 3);

    // A symbolic link at the temporary name is not written through.
    const auto victim = dir.file("victim");
    write_bytes(victim, garbage.data(), 8);
    fs::create_symlink(victim, dir.file(tmp.c_str()));
    const auto e = error_of([&] { w.write(path); });
    CHECK(has(e, "cannot create the temporary file '" + dir.file(tmp.c_str()) + "'"));
    CHECK(file_bytes(victim) == std::vector<unsigned char>(garbage.begin(), garbage.begin() + 8));
    CHECK(compact::checkpoint_reader::read_file(path).scalar<std::uint64_t>("step") == 3);
}

TEST_CASE("concurrent writers of one target take turns: the file is always one whole checkpoint")
{
    scratch_dir dir;
    const auto path = dir.file("run.ckpt");
    compact::checkpoint_writer a, b;
    std::vector<double> values(std::size_t{1} << 14, 1.0);
    a.add("values", values.data(), {values.size()});
    for (auto& v : values) v = -2.0;
    b.add("values", values.data(), {values.size()});
    std::atomic<int> failures{0};
    auto writes = [&](const compact::checkpoint_writer& w) {
        for (int i = 0; i < 20; ++i) {
            try {
                w.write(path);
            } catch (...) {
                ++failures;
            }
        }
    };
    std::thread first(writes, std::cref(a)), second(writes, std::cref(b));
    first.join();
    second.join();
    CHECK(failures == 0);
    const auto now = file_bytes(path);
    CHECK((now == a.bytes() || now == b.bytes()));
    CHECK(dir.entries() == std::vector<std::string>{"run.ckpt"});
}

TEST_CASE("a file name of 255 bytes, the longest Linux allows, is written: its temporary name fits too")
{
    scratch_dir dir;
    compact::checkpoint_writer w;
    w.add_scalar<std::uint64_t>("step", 11);
    const std::string ascii = std::string(251, 'c') + ".ckp";
    std::string utf8 = "x";
    for (int i = 0; i < 127; ++i) utf8 += "\xc3\xa9"; // U+00E9; a cut at byte 234 would split one
    REQUIRE(ascii.size() == 255);
    REQUIRE(utf8.size() == 255);
    const std::vector<std::pair<std::string, std::size_t>> names{{ascii, 234}, {utf8, 233}};
    for (const auto& [name, keep] : names) {
        const auto path = (dir.path / name).string();
        w.write(path);
        CHECK(compact::checkpoint_reader::read_file(path).scalar<std::uint64_t>("step") == 11);
        // The documented temporary name: the file name cut to fit NAME_MAX, whole characters only.
        const auto tmp = documented_temporary(name, keep);
        CHECK(tmp.size() <= 255);
        write_bytes((dir.path / tmp).string(), reinterpret_cast<const unsigned char*>("stale"), 5);
        w.write(path);
        CHECK(!fs::exists(dir.path / tmp));
        CHECK(file_bytes(path) == w.bytes());
        fs::remove(path);
        CHECK(dir.entries().empty());
    }
}

// ============================================================================================ resume

TEST_CASE_TEMPLATE("100 updates straight equal 40, save, load into fresh layers, 60 more: bit for bit", Cfg,
                   config<float, float>, config<double, double>, config<float, double>)
{
    using Scalar = typename Cfg::scalar;
    using State = typename Cfg::state;
    using layer_type = ratio_layer<Scalar, State>;
    scratch_dir dir;
    const teacher_problem<Scalar> problem(16, 24, 10); // r = 6; micro-batches of 8 rows

    using compact::moment_policy;
    for (const auto policy : {moment_policy::keep, moment_policy::reset, moment_policy::transfer})
        for (const bool keep_projection : {false, true})
            for (const std::uint64_t gap : {std::uint64_t{7}, std::uint64_t{40}}) {
                CAPTURE(compact::to_string(policy));
                CAPTURE(keep_projection);
                CAPTURE(gap); // 7: epochs 5 and 6 meet at update 42; 40: the save lands on the boundary
                const auto options = options_for(policy, keep_projection, gap, problem.rows / 2);

                layer_type straight(in_features{problem.n}, out_features{problem.m}, options);
                initialise(straight, 1);
                train(straight, problem, 0, 100);

                const auto path = dir.file("resume.ckpt");
                {
                    layer_type first(in_features{problem.n}, out_features{problem.m}, options);
                    initialise(first, 1);
                    train(first, problem, 0, 40);
                    compact::save_checkpoint(path, first);
                } // the first process ends here

                layer_type resumed(in_features{problem.n}, out_features{problem.m}, options);
                initialise(resumed, 99); // different weights, and a gradient pending: all replaced
                train(resumed, problem, 500, 503);
                const typename layer_type::context ctx{};
                std::vector<Scalar> x, target, y(8 * 10), dx(8 * 24);
                problem.batch(0, x, target);
                const compact::const_matrix_view<Scalar> x8(x.data(), 8, 24), y8(y.data(), 8, 10);
                resumed.forward(ctx, x8, compact::make_view(y.data(), 8, 10));
                resumed.backward(ctx, y8, compact::make_view(dx.data(), 8, 24));
                REQUIRE(resumed.gradient_pending());

                compact::load_checkpoint(path, resumed);
                CHECK_FALSE(resumed.gradient_pending());
                CHECK(resumed.updates() == 40);
                CHECK(resumed.epoch() == 40 / gap);
                train(resumed, problem, 40, 100);

                CHECK(snap(resumed) == snap(straight));
                CHECK(resumed.epoch() == straight.epoch());
            }
}

TEST_CASE("the resume test is sensitive: restoring all but the counters (as the paper's code does) diverges")
{
    using layer_type = ratio_layer<float, float>;
    scratch_dir dir;
    const teacher_problem<float> problem(16, 24, 10);
    const auto options = options_for(compact::moment_policy::transfer, false, 7, 8);
    layer_type straight(in_features{problem.n}, out_features{problem.m}, options),
        resumed(in_features{problem.n}, out_features{problem.m}, options);
    initialise(straight, 1);
    train(straight, problem, 0, 40);
    compact::save_checkpoint(dir.file("a.ckpt"), straight);
    train(straight, problem, 40, 100);

    compact::load_checkpoint(dir.file("a.ckpt"), resumed);
    resumed.restore_counters(0, {}, {}); // what losing t, the epoch and the update count amounts to
    train(resumed, problem, 40, 100);
    CHECK(snap(resumed) != snap(straight));
    CHECK(snap(resumed).weight != snap(straight).weight);
}

TEST_CASE("rank::full, rademacher and no-bias layers resume bit for bit; several layers share one file")
{
    scratch_dir dir;
    const teacher_problem<double> problem(12, 16, 6);
    auto o1 = options_for(compact::moment_policy::transfer, true, 9, 6);
    o1.dist = compact::distribution::rademacher;
    auto o2 = options_for(compact::moment_policy::keep, false, 0, 6);
    o2.bias = false;
    o2.layer = 8;
    auto o3 = options_for(compact::moment_policy::reset, false, 5, 6);
    o3.layer = 9;
    using full_layer = compact::linear_layer<double, compact::rank::full, compact::cpu, float>;
    using fixed_layer = compact::linear_layer<double, compact::rank::fixed, compact::cpu, double>;

    auto make = [&](auto& a, auto& b, auto& c) {
        initialise(a, 1);
        initialise(b, 2);
        initialise(c, 3);
    };
    ratio_layer<double, double> a(in_features{16}, out_features{6}, o1), a2(in_features{16}, out_features{6}, o1);
    full_layer b(in_features{16}, out_features{6}, o2), b2(in_features{16}, out_features{6}, o2);
    fixed_layer c(in_features{16}, out_features{6}, o3, compact::rank::fixed(3)),
        c2(in_features{16}, out_features{6}, o3, compact::rank::fixed(3));
    make(a, b, c);
    train(a, problem, 0, 30);
    train(b, problem, 0, 30);
    train(c, problem, 0, 30);
    make(a2, b2, c2);
    train(a2, problem, 0, 13);
    train(b2, problem, 0, 13);
    train(c2, problem, 0, 13);
    compact::save_checkpoint(dir.file("three.ckpt"), a2, b2, c2);

    ratio_layer<double, double> a3(in_features{16}, out_features{6}, o1);
    full_layer b3(in_features{16}, out_features{6}, o2);
    fixed_layer c3(in_features{16}, out_features{6}, o3, compact::rank::fixed(3));
    compact::load_checkpoint(dir.file("three.ckpt"), a3, b3, c3);
    train(a3, problem, 13, 30);
    train(b3, problem, 13, 30);
    train(c3, problem, 13, 30);
    CHECK(snap(a3) == snap(a));
    CHECK(snap(b3) == snap(b));
    CHECK(snap(c3) == snap(c));
}

TEST_CASE("save_state / load_state put layers and the caller's own tensors in one file; weights can stay with "
          "the caller")
{
    using layer_type = ratio_layer<float, float>;
    scratch_dir dir;
    const teacher_problem<float> problem(16, 24, 10);
    const auto options = options_for(compact::moment_policy::keep, false, 7, 8);
    layer_type layer(in_features{24}, out_features{10}, options);
    initialise(layer, 1);
    train(layer, problem, 0, 12);
    const std::vector<float> embedding{1, 2, 3, 4, 5, 6};

    compact::checkpoint_writer w;
    compact::save_state(w, "encoder/fc", layer, compact::weight_storage::caller);
    w.add("embedding", compact::const_matrix_view<float>(embedding.data(), 2, 3));
    w.add_scalar<std::uint64_t>("data/position", 12 * 16);
    CHECK_FALSE(w.contains("encoder/fc/weight"));
    CHECK(w.contains("encoder/fc/weight_m"));
    CHECK(has(error_of([&] { compact::save_state(w, "encoder/fc", layer); }),
              "'encoder/fc/compressor' was already added"));
    w.write(dir.file("mixed.ckpt"));

    layer_type other(in_features{24}, out_features{10}, options);
    initialise(other, 2);
    const auto weights_before = snap(other).weight;
    const auto r = compact::checkpoint_reader::read_file(dir.file("mixed.ckpt"));
    compact::check_state(r, "encoder/fc", other, compact::weight_storage::caller);
    std::vector<float> restored(6);
    r.read("embedding", compact::make_view(restored.data(), 2, 3));
    CHECK(r.scalar<std::uint64_t>("data/position") == 192);
    // Asking for the weights that are not there is a missing section, and changes nothing.
    CHECK(has(error_of([&] { compact::load_state(r, "encoder/fc", other); }), "missing section 'encoder/fc/weight'"));
    CHECK(snap(other).updates == 0);
    compact::load_state(r, "encoder/fc", other, compact::weight_storage::caller);
    CHECK(restored == embedding);
    CHECK(snap(other).weight == weights_before); // the caller's to restore
    CHECK(bit_equal(snap(other).m, snap(layer).m));
    CHECK(other.updates() == 12);

    // A layer in the middle of accumulating a gradient is not saved: the gradient would be lost.
    const typename layer_type::context ctx{};
    std::vector<float> x(8 * 24, 0.5f), y(8 * 10), dx(8 * 24);
    layer.forward(ctx, compact::const_matrix_view<float>(x.data(), 8, 24), compact::make_view(y.data(), 8, 10));
    layer.backward(ctx, compact::const_matrix_view<float>(y.data(), 8, 10), compact::make_view(dx.data(), 8, 24));
    compact::checkpoint_writer w2;
    CHECK(has(error_of([&] { compact::save_state(w2, "fc", layer); }), "holds a gradient that no step has used"));
    CHECK(w2.section_count() == 0);
    CHECK(has(error_of([&] { compact::save_state(w2, "", layer); }), "prefix"));
}

// ========================================================================================= rejection

namespace {

/// A small trained layer, its checkpoint file, and a differently trained target with the same
/// configuration whose state every rejected load must leave as it was.
struct rejection_fixture {
    using layer_type = ratio_layer<float, float>;
    scratch_dir dir;
    teacher_problem<float> problem{8, 8, 4};
    compact::linear_options options = options_for(compact::moment_policy::transfer, false, 3, 4);
    layer_type saved{in_features{8}, out_features{4}, options}, target{in_features{8}, out_features{4}, options};
    std::string path = dir.file("small.ckpt");
    std::vector<unsigned char> bytes;

    rejection_fixture()
    {
        initialise(saved, 1);
        train(saved, problem, 0, 5);
        compact::save_checkpoint(path, saved);
        bytes = file_bytes(path);
        initialise(target, 2);
        train(target, problem, 0, 2);
    }

    /// Loads `image` (written to a file) into target; returns the error; checks that target is unchanged.
    std::string reject(const std::vector<unsigned char>& image)
    {
        const auto before = snap(target);
        const auto bad = dir.file("bad.ckpt");
        write_bytes(bad, image.data(), image.size());
        const auto message = error_of([&] { compact::load_checkpoint(bad, target); });
        CHECK(snap(target) == before);
        CHECK(has(message, bad)); // every load error names the file
        return message;
    }

    /// The checkpoint re-encoded (so every checksum holds) with the u64 scalar section `name` set to
    /// `value`, or without it.
    std::vector<unsigned char> with_scalar(const std::string& name, std::optional<std::uint64_t> value) const
    {
        return rewritten(name, [&](compact::checkpoint_writer& w, const compact::checkpoint_reader&,
                                   const compact::checkpoint_section& s) {
            if (value) w.add_scalar<std::uint64_t>(s.name, *value);
        });
    }

    /// The checkpoint re-encoded with element `at` of the f32 section `name` set to `value`.
    std::vector<unsigned char> with_value(const std::string& name, std::size_t at, float value) const
    {
        return rewritten(name, [&](compact::checkpoint_writer& w, const compact::checkpoint_reader& r,
                                   const compact::checkpoint_section& s) {
            REQUIRE(s.type == compact::dtype::f32);
            std::vector<float> v(static_cast<std::size_t>(s.count));
            r.copy(s, v.data(), s.count);
            REQUIRE(at < v.size());
            v[at] = value;
            w.add(s.name, v.data(), s.shape);
        });
    }

    /// The checkpoint re-encoded section by section, `edit` writing (or dropping) the section `name`.
    template <class Edit>
    std::vector<unsigned char> rewritten(const std::string& name, Edit edit) const
    {
        const compact::checkpoint_reader r(bytes);
        compact::checkpoint_writer w;
        bool found = false;
        for (const auto& s : r.sections()) {
            const unsigned char* p = r.bytes().data() + s.offset;
            if (s.name == name) {
                found = true;
                edit(w, r, s);
            } else if (s.type == compact::dtype::u64) {
                std::vector<std::uint64_t> v(static_cast<std::size_t>(s.count));
                std::memcpy(v.data(), p, static_cast<std::size_t>(s.bytes));
                w.add(s.name, v.data(), s.shape);
            } else if (s.type == compact::dtype::u8) { // the compressor's name
                std::vector<std::uint8_t> v(static_cast<std::size_t>(s.count));
                std::memcpy(v.data(), p, static_cast<std::size_t>(s.bytes));
                w.add(s.name, v.data(), s.shape);
            } else {
                REQUIRE(s.type == compact::dtype::f32);
                std::vector<float> v(static_cast<std::size_t>(s.count));
                std::memcpy(v.data(), p, static_cast<std::size_t>(s.bytes));
                w.add(s.name, v.data(), s.shape);
            }
        }
        REQUIRE(found);
        return w.bytes();
    }
};

} // namespace

TEST_CASE("the small checkpoint loads into the target, which then equals the saved layer")
{
    rejection_fixture f;
    CHECK(f.bytes.size() < 2048);
    // count, compressor name, configuration (the distribution included), counters, tensors
    const compact::checkpoint_reader r(f.bytes);
    CHECK(r.sections().size() == 1 + 1 + 10 + 5 + 6);
    const auto& name = r.expect<std::uint8_t>("layers/0/compressor", {17});
    std::string text(17, '\0');
    r.copy(name, reinterpret_cast<std::uint8_t*>(text.data()), 17);
    CHECK(text == "random_projection");
    CHECK(r.scalar<std::uint64_t>("layers/0/distribution") == 0);
    CHECK_FALSE(r.contains("layers/0/store_kind"));
    CHECK(snap(f.target) != snap(f.saved));
    compact::load_checkpoint(f.path, f.target);
    CHECK(snap(f.target) == snap(f.saved));
}

TEST_CASE("a file that is not a checkpoint, or from a newer format, is rejected as such")
{
    rejection_fixture f;
    auto image = f.bytes;
    image[1] = 'X';
    CHECK(has(f.reject(image), "not a compact checkpoint"));
    const std::string text = "layers/0/weight = 1 2 3\n";
    CHECK(has(f.reject({text.begin(), text.end()}), "not a compact checkpoint"));
    // The magic catches newline conversion (LF -> CR LF) and 7-bit transfers.
    image = f.bytes;
    image.insert(image.begin() + 7, '\r');
    CHECK(has(f.reject(image), "not a compact checkpoint"));
    image = f.bytes;
    image[0] &= 0x7f;
    CHECK(has(f.reject(image), "not a compact checkpoint"));

    image = f.bytes;
    image[8] = 2;
    CHECK(has(f.reject(image), "newer format version 2: this build of compact reads versions 1 to 1"));
    image[8] = 0;
    image[11] = 0x80;
    CHECK(has(f.reject(image), "newer format version 2147483648"));
}

TEST_CASE("a checkpoint truncated at every byte offset is rejected as truncated, and changes nothing")
{
    rejection_fixture f;
    const auto before = snap(f.target);
    const auto bad = f.dir.file("truncated.ckpt");
    int rejected = 0;
    for (std::size_t size = 0; size < f.bytes.size(); ++size) {
        CAPTURE(size);
        write_bytes(bad, f.bytes.data(), size);
        const auto message = error_of([&] { compact::load_checkpoint(bad, f.target); });
        CHECK(has(message, "truncated"));
        CHECK(has(message, bad));
        rejected += has(message, "truncated");
    }
    CHECK(rejected == static_cast<int>(f.bytes.size()));
    CHECK(snap(f.target) == before);
    // The whole file still loads.
    write_bytes(bad, f.bytes.data(), f.bytes.size());
    compact::load_checkpoint(bad, f.target);
    CHECK(snap(f.target) == snap(f.saved));
}

TEST_CASE("a flipped bit anywhere is rejected: checksums name the header or the section")
{
    rejection_fixture f;
    const compact::checkpoint_reader valid(f.bytes);
    const auto& weight_m = valid.find("layers/0/weight_m");

    auto image = f.bytes;
    image[static_cast<std::size_t>(weight_m.offset) + 5] ^= 0x10;
    auto message = f.reject(image);
    CHECK(has(message, "checksum mismatch in section #"));
    CHECK(has(message, "'layers/0/weight_m'"));
    image = f.bytes;
    image[20] ^= 0x01; // the section count
    CHECK(has(f.reject(image), "checksum mismatch in the header"));
    image = f.bytes;
    image[image.size() - 1] ^= 0x80; // the last section's stored checksum
    CHECK(has(f.reject(image), "checksum mismatch in section #"));

    // Every byte, every bit position in turn: never accepted, always one of the documented classes.
    const auto before = snap(f.target);
    for (std::size_t at = 0; at < f.bytes.size(); ++at) {
        image = f.bytes;
        image[at] ^= static_cast<unsigned char>(1u << (at % 8));
        CAPTURE(at);
        std::string what;
        try {
            const compact::checkpoint_reader r(image);
            compact::load_state(r, "layers/0", f.target);
        } catch (const compact::error& e) {
            what = e.what();
        }
        REQUIRE_FALSE(what.empty());
        CHECK((has(what, "not a compact checkpoint") || has(what, "newer format version") || has(what, "truncated") ||
               has(what, "checksum mismatch") || has(what, "corrupt")));
    }
    CHECK(snap(f.target) == before);
}

TEST_CASE("trailing bytes, missing sections and inconsistent counters are rejected")
{
    rejection_fixture f;
    auto image = f.bytes;
    image.push_back(0);
    CHECK(has(f.reject(image), "trailing bytes"));

    // A file holding one section fewer (re-encoded: checksums hold) lacks it, and says which.
    CHECK(has(f.reject(f.with_scalar("layers/0/updates", std::nullopt)), "missing section 'layers/0/updates'"));
    CHECK(has(f.reject(f.with_scalar("layers/count", std::nullopt)), "missing section 'layers/count'"));
    CHECK(has(f.reject(f.with_scalar("layers/count", 2)), "holds 2 layers but 1 were given"));
    CHECK(has(f.reject(f.with_scalar("layers/0/weight_step", 6)), "counters under 'layers/0' are inconsistent"));
    CHECK(has(f.reject(f.with_scalar("layers/0/bias_step", 6)), "inconsistent"));
    CHECK(has(f.reject(f.with_scalar("layers/0/weight_epoch", 2)), "inconsistent")); // 5 updates, T = 3: epoch 1
    CHECK(has(f.reject(f.with_scalar("layers/0/updates", std::uint64_t{3} << 32)), "at most 2^32 - 1"));
    // The same counters through restore_counters directly.
    CHECK(has(error_of([&] { f.target.restore_counters(5, {6, 0}, {}); }), "cannot follow 5 updates"));
    // Counters a run does reach load fine: fewer updates than saved, reset-like t.
    const auto fewer = f.with_scalar("layers/0/updates", 100);
    write_bytes(f.dir.file("ok.ckpt"), fewer.data(), fewer.size());
    compact::load_checkpoint(f.dir.file("ok.ckpt"), f.target);
    CHECK(f.target.updates() == 100);
}

TEST_CASE("loaded values are checked: NaN or infinite weights and moments, negative V, impossible updates")
{
    // Each image is re-encoded, so every checksum holds: the values themselves are refused.
    rejection_fixture f;
    const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
    auto message = f.reject(f.with_value("layers/0/weight_v", 0, -1.0f));
    CHECK(has(message, "section 'layers/0/weight_v' holds -1 at element 0; it must be finite and non-negative"));
    CHECK(has(f.reject(f.with_value("layers/0/bias_v", 3, -1e-30f)), "section 'layers/0/bias_v' holds"));
    message = f.reject(f.with_value("layers/0/weight", 5, nan));
    CHECK(has(message, "section 'layers/0/weight' holds"));
    CHECK(has(message, "at element 5; it must be finite"));
    CHECK(has(f.reject(f.with_value("layers/0/bias", 1, nan)), "section 'layers/0/bias' holds"));
    CHECK(has(f.reject(f.with_value("layers/0/weight_m", 7, inf)), "section 'layers/0/weight_m' holds inf"));
    CHECK(has(f.reject(f.with_value("layers/0/weight_v", 2, nan)), "section 'layers/0/weight_v' holds"));
    CHECK(has(f.reject(f.with_value("layers/0/bias_m", 0, -inf)), "section 'layers/0/bias_m' holds -inf"));
    CHECK(has(f.reject(f.with_scalar("layers/0/updates", ~std::uint64_t{0})),
              "section 'layers/0/updates' is 18446744073709551615, more updates than any run makes"));
    CHECK(has(f.reject(f.with_scalar("layers/0/updates", std::uint64_t{1} << 63)), "more updates than any run makes"));
    // V = 0 (and -0) and negative M are values a run reaches: they load.
    const auto zero = f.with_value("layers/0/weight_v", 0, -0.0f);
    write_bytes(f.dir.file("zero.ckpt"), zero.data(), zero.size());
    compact::load_checkpoint(f.dir.file("zero.ckpt"), f.target);
    CHECK(f.target.second_moment()(0, 0) == 0.0f);
    const auto negative_m = f.with_value("layers/0/weight_m", 0, -2.0f);
    write_bytes(f.dir.file("m.ckpt"), negative_m.data(), negative_m.size());
    compact::load_checkpoint(f.dir.file("m.ckpt"), f.target);
    CHECK(f.target.first_moment()(0, 0) == -2.0f);
}

TEST_CASE("dtype, shape and configuration mismatches are rejected, naming the section, before any change")
{
    rejection_fixture f;
    auto expect_rejected = [&](auto& layer, const std::string& part) {
        const auto before = snap(layer);
        const auto message = error_of([&] { compact::load_checkpoint(f.path, layer); });
        CHECK(has(message, part));
        CHECK(snap(layer) == before);
        return message;
    };
    const auto o = f.options;

    ratio_layer<double, float> wider_scalar(in_features{8}, out_features{4}, o);
    CHECK(has(expect_rejected(wider_scalar, "dtype mismatch"),
              "'layers/0/weight' holds f32 values but f64 are required"));
    ratio_layer<float, double> wider_state(in_features{8}, out_features{4}, o);
    CHECK(has(expect_rejected(wider_state, "dtype mismatch"), "'layers/0/weight_m'"));
    ratio_layer<float, float> more_inputs(in_features{12}, out_features{4}, o);
    CHECK(has(expect_rejected(more_inputs, "shape mismatch"), "'layers/0/weight' is (4, 8) but (4, 12) is required"));
    ratio_layer<float, float> more_outputs(in_features{8}, out_features{5}, o);
    CHECK(has(expect_rejected(more_outputs, "shape mismatch"), "(5, 8)"));
    using fixed_layer = compact::linear_layer<float, compact::rank::fixed, compact::cpu, float>;
    fixed_layer other_rank(in_features{8}, out_features{4}, o, compact::rank::fixed(3));
    CHECK(has(expect_rejected(other_rank, "shape mismatch"), "'layers/0/weight_m' is (4, 2) but (4, 3) is required"));

    auto changed = [&](auto edit) {
        auto c = o;
        edit(c);
        return c;
    };
    ratio_layer<float, float> seed(in_features{8}, out_features{4}, changed([](auto& c) { c.seed += 1; }));
    CHECK(has(expect_rejected(seed, "section 'layers/0/seed' is "), "in the checkpoint but"));
    ratio_layer<float, float> id(in_features{8}, out_features{4}, changed([](auto& c) { c.layer = 70; }));
    CHECK(has(expect_rejected(id, "'layers/0/layer_id' is 7 in the checkpoint but 70 in the layer"), "differently"));
    ratio_layer<float, float> policy(in_features{8}, out_features{4},
                                     changed([](auto& c) { c.moments = compact::moment_policy::keep; }));
    expect_rejected(policy, "'layers/0/moment_policy' is 2 in the checkpoint but 0 in the layer");
    ratio_layer<float, float> gap(in_features{8}, out_features{4}, changed([](auto& c) { c.resample.gap = 4; }));
    expect_rejected(gap, "'layers/0/resample_gap' is 3 in the checkpoint but 4");
    ratio_layer<float, float> keep(in_features{8}, out_features{4}, changed([](auto& c) { c.keep_projection = true; }));
    expect_rejected(keep, "'layers/0/keep_projection' is 0 in the checkpoint but 1");
    ratio_layer<float, float> no_bias(in_features{8}, out_features{4}, changed([](auto& c) { c.bias = false; }));
    expect_rejected(no_bias, "'layers/0/has_bias' is 1 in the checkpoint but 0");
    ratio_layer<float, float> dist(in_features{8}, out_features{4},
                                   changed([](auto& c) { c.dist = compact::distribution::rademacher; }));
    expect_rejected(dist, "'layers/0/distribution' is 0 in the checkpoint but 1");
    // max_rows only sizes the saved activation: it may differ.
    ratio_layer<float, float> rows(in_features{8}, out_features{4}, changed([](auto& c) { c.max_rows = 100; }));
    compact::load_checkpoint(f.path, rows);
    CHECK(snap(rows) == snap(f.saved));

    // With several layers, one bad layer means no layer changes.
    const auto two = f.dir.file("two.ckpt");
    compact::save_checkpoint(two, f.saved, f.saved);
    ratio_layer<float, float> first(in_features{8}, out_features{4}, o);
    const auto first_before = snap(first);
    CHECK(has(error_of([&] { compact::load_checkpoint(two, first, seed); }), "'layers/1/seed'"));
    CHECK(snap(first) == first_before);
    CHECK(snap(seed).updates == 0);
}

TEST_CASE("a layer with a quantized store resumes bit for bit, scheme included; a corrupt scheme is refused")
{
    // The stochastic rounding noise is keyed by the update count, which the checkpoint restores; the
    // scheme (here changed mid-run, as a bit allocator would) comes back from the checkpoint too.
    scratch_dir dir;
    const teacher_problem<float> problem(16, 24, 10);
    const auto options = options_for(compact::moment_policy::keep, false, 0, problem.rows / 2);
    using q_layer = compact::linear_layer<float, compact::quantized, compact::cpu>;
    const compact::quantized start{compact::store_scheme::quantized(2, 64)};
    const compact::store_scheme later = compact::store_scheme::average(32);

    q_layer straight(in_features{problem.n}, out_features{problem.m}, options, start);
    initialise(straight, 1);
    train(straight, problem, 0, 20);
    straight.compressor().set_scheme(later);
    train(straight, problem, 20, 50);

    q_layer first(in_features{problem.n}, out_features{problem.m}, options, start);
    initialise(first, 1);
    train(first, problem, 0, 20);
    first.compressor().set_scheme(later);
    train(first, problem, 20, 30);
    compact::save_checkpoint(dir.file("q.ckpt"), first);

    q_layer resumed(in_features{problem.n}, out_features{problem.m}, options, start); // built with the starting scheme
    compact::load_checkpoint(dir.file("q.ckpt"), resumed);
    CHECK(resumed.compressor().scheme() == later);
    train(resumed, problem, 30, 50);
    CHECK(snap(resumed) == snap(straight));

    compact::checkpoint_writer w;
    compact::save_state(w, "q", first);
    auto bytes = w.bytes();
    const compact::checkpoint_reader good(bytes);
    CHECK(good.scalar<std::uint64_t>("q/store_bits") == 2);
    CHECK(good.scalar<std::uint64_t>("q/store_kind") == 2);
    CHECK(good.scalar<std::uint64_t>("q/store_group") == 32);
    CHECK_FALSE(good.contains("q/distribution")); // the random projection's field, not the store's
    const auto& name = good.expect<std::uint8_t>("q/compressor", {16});
    std::string text(16, '\0');
    good.copy(name, reinterpret_cast<std::uint8_t*>(text.data()), 16);
    CHECK(text == "activation_store");
    // A scheme compact never writes (3 bits), with valid checksums: rejected before the layer changes.
    compact::checkpoint_writer bad;
    bad.add("q/compressor", reinterpret_cast<const std::uint8_t*>(text.data()), {16});
    for (const char* field : {"in", "out", "rank", "seed", "layer_id", "moment_policy", "resample_gap",
                              "keep_projection", "has_bias", "updates", "weight_step", "weight_epoch", "bias_step",
                              "bias_epoch", "store_kind", "store_group"})
        bad.add_scalar<std::uint64_t>(std::string("q/") + field, good.scalar<std::uint64_t>(std::string("q/") + field));
    bad.add_scalar<std::uint64_t>("q/store_bits", 3);
    for (const char* field : {"weight", "weight_m", "weight_v"}) {
        const auto& s = good.expect<float>(std::string("q/") + field, good.find(std::string("q/") + field).shape);
        std::vector<float> v(static_cast<std::size_t>(s.count));
        good.copy(s, v.data(), s.count);
        bad.add(std::string("q/") + field, v.data(), s.shape);
    }
    for (const char* field : {"bias", "bias_m", "bias_v"}) {
        const auto& s = good.expect<float>(std::string("q/") + field, good.find(std::string("q/") + field).shape);
        std::vector<float> v(static_cast<std::size_t>(s.count));
        good.copy(s, v.data(), s.count);
        bad.add(std::string("q/") + field, v.data(), s.shape);
    }
    const compact::checkpoint_reader corrupt(bad.bytes());
    q_layer target(in_features{problem.n}, out_features{problem.m}, options, start);
    const std::string message = error_of([&] { compact::load_state(corrupt, "q", target); });
    CHECK(has(message, "average quantization uses 2-bit codes, got bits=3"));
    CHECK(target.compressor().scheme() == start.scheme);
    CHECK(target.updates() == 0);
}

TEST_CASE("a checkpoint is refused by a layer with another compressor, naming both, before any change")
{
    scratch_dir dir;
    const teacher_problem<float> problem(16, 24, 10);
    const auto options = options_for(compact::moment_policy::keep, false, 0, problem.rows / 2);
    using q_layer = compact::linear_layer<float, compact::quantized, compact::cpu>;
    using full_layer = compact::linear_layer<float, compact::rank::full, compact::cpu>;
    // The same shapes, rank (n), scalar and moment types: only the compressor differs.
    q_layer quantized(in_features{problem.n}, out_features{problem.m}, options,
                      compact::quantized{compact::store_scheme::quantized(4, 64)});
    full_layer full(in_features{problem.n}, out_features{problem.m}, options);
    REQUIRE(quantized.rank() == full.rank());
    initialise(quantized, 1);
    initialise(full, 2);
    train(quantized, problem, 0, 3);
    train(full, problem, 0, 2);
    compact::save_checkpoint(dir.file("q.ckpt"), quantized);
    compact::save_checkpoint(dir.file("full.ckpt"), full);

    const auto full_before = snap(full);
    const std::string message = error_of([&] { compact::load_checkpoint(dir.file("q.ckpt"), full); });
    CHECK(has(message, "'layers/0' was saved with the compressor 'activation_store' but this layer's compressor is "
                       "'random_projection'"));
    CHECK(has(message, dir.file("q.ckpt")));
    CHECK(snap(full) == full_before);

    const auto quantized_before = snap(quantized);
    const auto scheme = quantized.compressor().scheme();
    CHECK(has(error_of([&] { compact::load_checkpoint(dir.file("full.ckpt"), quantized); }),
              "saved with the compressor 'random_projection' but this layer's compressor is 'activation_store'"));
    CHECK(snap(quantized) == quantized_before);
    CHECK(quantized.compressor().scheme() == scheme);
}

// ==================================================================================== master weights

TEST_CASE("a layer with master weights resumes bit for bit, master copies included")
{
    using layer_type = ratio_layer<float, double>;
    scratch_dir dir;
    const teacher_problem<float> problem(16, 24, 10);
    using compact::moment_policy;
    for (const auto policy : {moment_policy::keep, moment_policy::transfer})
        for (const bool keep_projection : {false, true}) {
            CAPTURE(compact::to_string(policy));
            CAPTURE(keep_projection);
            auto options = options_for(policy, keep_projection, 7, problem.rows / 2);
            options.master_weights = true;
            layer_type straight(in_features{problem.n}, out_features{problem.m}, options);
            initialise(straight, 1);
            train(straight, problem, 0, 100);

            const auto path = dir.file("master.ckpt");
            {
                layer_type first(in_features{problem.n}, out_features{problem.m}, options);
                initialise(first, 1);
                train(first, problem, 0, 40);
                compact::save_checkpoint(path, first);
                const auto r = compact::checkpoint_reader::read_file(path);
                CHECK(r.contains("layers/0/master_weight"));
                CHECK(r.contains("layers/0/master_bias"));
            }
            layer_type resumed(in_features{problem.n}, out_features{problem.m}, options);
            initialise(resumed, 99);
            train(resumed, problem, 500, 503); // a master of its own, replaced by the loaded one
            compact::load_checkpoint(path, resumed);
            CHECK(resumed.master_valid());
            train(resumed, problem, 40, 100);
            CHECK(snap(resumed) == snap(straight));
        }
}

TEST_CASE("master weights and older checkpoints: missing master taken from W, extra master refused, "
          "saved before the first step")
{
    scratch_dir dir;
    const teacher_problem<float> problem(16, 24, 10);
    auto plain_options = options_for(compact::moment_policy::keep, false, 7, 8);
    auto master_options = plain_options;
    master_options.master_weights = true;
    using layer_type = ratio_layer<float, double>;

    SUBCASE("a checkpoint without master sections loads into a layer with master weights")
    {
        layer_type plain(in_features{problem.n}, out_features{problem.m}, plain_options);
        initialise(plain, 1);
        train(plain, problem, 0, 20);
        compact::save_checkpoint(dir.file("plain.ckpt"), plain);
        CHECK_FALSE(compact::checkpoint_reader::read_file(dir.file("plain.ckpt")).contains("layers/0/master_weight"));

        layer_type lazy(in_features{problem.n}, out_features{problem.m}, master_options),
            explicit_sync(in_features{problem.n}, out_features{problem.m}, master_options);
        initialise(lazy, 5);
        train(lazy, problem, 0, 3);
        compact::load_checkpoint(dir.file("plain.ckpt"), lazy);
        compact::load_checkpoint(dir.file("plain.ckpt"), explicit_sync);
        CHECK_FALSE(lazy.master_valid()); // its own master is stale: the next step takes W and b
        explicit_sync.sync_master({});
        CHECK(explicit_sync.master_valid());
        const auto w = copy_of<float>(explicit_sync.weight());
        const auto master = copy_of<double>(explicit_sync.master_weight());
        bool widened = true;
        for (std::size_t i = 0; i < w.size(); ++i) widened = widened && master[i] == static_cast<double>(w[i]);
        CHECK(widened);
        train(lazy, problem, 20, 30);
        train(explicit_sync, problem, 20, 30);
        CHECK(lazy.master_valid());
        CHECK(snap(lazy) == snap(explicit_sync));
    }
    SUBCASE("a checkpoint with master sections is refused by a layer without master weights")
    {
        layer_type with_master(in_features{problem.n}, out_features{problem.m}, master_options);
        initialise(with_master, 1);
        train(with_master, problem, 0, 5);
        compact::save_checkpoint(dir.file("master.ckpt"), with_master);
        layer_type plain(in_features{problem.n}, out_features{problem.m}, plain_options);
        initialise(plain, 2);
        const auto before = snap(plain);
        const std::string message = error_of([&] { compact::load_checkpoint(dir.file("master.ckpt"), plain); });
        CHECK(has(message, "section 'layers/0/master_weight' holds master weights but the layer was built without "
                           "options.master_weights"));
        CHECK(snap(plain) == before);
    }
    SUBCASE("saved before its first step, a layer with master weights writes none and resumes bit for bit")
    {
        layer_type straight(in_features{problem.n}, out_features{problem.m}, master_options),
            saved(in_features{problem.n}, out_features{problem.m}, master_options),
            resumed(in_features{problem.n}, out_features{problem.m}, master_options);
        initialise(straight, 3);
        initialise(saved, 3);
        train(straight, problem, 0, 15);
        CHECK_FALSE(saved.master_valid());
        compact::save_checkpoint(dir.file("early.ckpt"), saved);
        CHECK_FALSE(compact::checkpoint_reader::read_file(dir.file("early.ckpt")).contains("layers/0/master_weight"));
        compact::load_checkpoint(dir.file("early.ckpt"), resumed);
        train(resumed, problem, 0, 15);
        CHECK(snap(resumed) == snap(straight));
    }
    SUBCASE("with weight_storage::caller the master copies are still saved")
    {
        layer_type layer(in_features{problem.n}, out_features{problem.m}, master_options);
        initialise(layer, 4);
        train(layer, problem, 0, 2);
        compact::checkpoint_writer w;
        compact::save_state(w, "x", layer, compact::weight_storage::caller);
        const compact::checkpoint_reader r(w.bytes());
        CHECK_FALSE(r.contains("x/weight"));
        CHECK(r.contains("x/master_weight"));
        CHECK(r.contains("x/master_bias"));
        layer_type target(in_features{problem.n}, out_features{problem.m}, master_options);
        compact::load_state(r, "x", target, compact::weight_storage::caller);
        CHECK(target.master_valid());
        CHECK(bit_equal(copy_of<double>(target.master_weight()), copy_of<double>(layer.master_weight())));
    }
}
