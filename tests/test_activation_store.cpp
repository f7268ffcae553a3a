// Tests of the quantized activation stores and the 1-bit masks (compress/activation_store.hpp,
// compress/mask.hpp, backend/store_scheme.hpp), against float64 references and statistical bounds.
#include "reference.hpp"
#include "test_support.hpp"

#include <compact/backend/cpu/cpu.hpp>
#include <compact/compress/activation_store.hpp>
#include <compact/compress/mask.hpp>

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

using compact::index_t;
using compact::store_scheme;
using compact_test::cview_of;
using compact_test::print_errors;
using compact_test::view_of;

namespace {

template <class T>
using store = compact::activation_store<T, compact::cpu>;

/// Owns the bytes of one saved tensor, aligned for any scalar.
struct saved_buffer {
    explicit saved_buffer(std::size_t bytes) : words((bytes + 7) / 8 + 1) { tensor = {data(), bytes}; }
    std::byte* data() { return reinterpret_cast<std::byte*>(words.data()); }
    std::vector<std::uint64_t> words;
    compact::saved_tensor tensor;
};

template <class T>
std::vector<T> round_trip(const store<T>& s, const compact::cpu::context& ctx, const std::vector<T>& x, index_t rows,
                          index_t cols, std::uint64_t step)
{
    saved_buffer b(s.saved_bytes(rows, cols));
    s.compress(ctx, cview_of(x, rows, cols), step, b.tensor);
    std::vector<T> out(x.size(), T(-7));
    s.restore(ctx, b.tensor, view_of(out, rows, cols));
    return out;
}

const std::vector<int> widths = {1, 2, 4, 8};

} // namespace

TEST_CASE("bytes and bits per value of every scheme, metadata included")
{
    const index_t n = 1 << 20;
    CHECK(compact::bits_per_value<float>(store_scheme::full_precision(), n) == 32.0);
    CHECK(compact::bits_per_value<double>(store_scheme::full_precision(), n) == 64.0);
    for (int b : widths) {
        // b bits of code plus two floats per 256 values.
        CHECK(compact::bits_per_value<float>(store_scheme::quantized(b, 256), n) == doctest::Approx(b + 0.25));
        CHECK(compact::bits_per_value<float>(store_scheme::quantized(b, 128), n) == doctest::Approx(b + 0.5));
    }
    // ALAM: 2 bits per mean of 4 values, two floats per 128 means.
    CHECK(compact::bits_per_value<float>(store_scheme::average(128), n) == doctest::Approx(0.625));
    // Odd sizes round up to whole groups of metadata and whole bytes of codes.
    CHECK(compact::stored_bytes<float>(store_scheme::quantized(4, 256), 257) == 2 * 8 + 129);
    CHECK(compact::stored_bytes<float>(store_scheme::average(128), 13) == 8 + 1); // 4 means, 1 group
    CHECK(compact::nominal_bits<float>(store_scheme::average()) == 0.5);
    CHECK(store_scheme::quantized(1).unbiased());
    CHECK(!store_scheme::average().unbiased());
}

TEST_CASE("pack and unpack round-trip every width at every length up to 67")
{
    std::mt19937_64 rng(11);
    for (int b : widths)
        for (index_t len = 1; len <= 67; ++len) {
            std::vector<std::uint8_t> q(static_cast<std::size_t>(len)), back(q.size());
            for (auto& c : q) c = static_cast<std::uint8_t>(rng() & ((1u << b) - 1));
            std::vector<std::uint8_t> packed(static_cast<std::size_t>((len * b + 7) / 8) + 1, 0xEE);
            compact::detail::cpu_store::pack_codes(b, q.data(), len, packed.data());
            CHECK(packed.back() == 0xEE); // nothing written past the last byte
            compact::detail::cpu_store::unpack_codes(b, packed.data(), len, back.data());
            CHECK(q == back);
        }
}

TEST_CASE_TEMPLATE("codes on the quantization grid round-trip exactly, for every width, odd shapes and padded views", T,
                   float, double)
{
    // Values lo + q (hi - lo) / B with each group holding both ends: every code is exact, whatever the noise.
    compact::cpu::context ctx;
    std::mt19937_64 rng(3);
    for (int b : widths)
        for (index_t group : {8, 128, 256})
            for (auto [rows, cols] : {std::pair<index_t, index_t>{37, 53}, {1, 1}, {5, 8}, {64, 64}}) {
                const int levels = (1 << b) - 1;
                const index_t count = rows * cols, ld = cols + 3;
                std::vector<T> x(static_cast<std::size_t>(rows * ld), T(99)); // padded view
                std::vector<T> flat(static_cast<std::size_t>(count));
                for (index_t k = 0; k < count; ++k) {
                    int q = static_cast<int>(rng() % static_cast<unsigned>(levels + 1));
                    if (k % group == 0) q = 0;
                    if (k % group == 1) q = levels;
                    flat[static_cast<std::size_t>(k)] = static_cast<T>(-2.0 + 0.5 * q); // step 0.5: exact
                }
                for (index_t i = 0; i < rows; ++i)
                    for (index_t j = 0; j < cols; ++j) x[static_cast<std::size_t>(i * ld + j)] = flat[static_cast<std::size_t>(i * cols + j)];
                store<T> s(store_scheme::quantized(b, group), 5, 9);
                saved_buffer buf(s.saved_bytes(rows, cols));
                s.compress(ctx, compact::const_matrix_view<T>(x.data(), rows, cols, ld), 1, buf.tensor);
                std::vector<T> out(static_cast<std::size_t>(rows * ld), T(-1));
                s.restore(ctx, buf.tensor, compact::matrix_view<T>(out.data(), rows, cols, ld));
                bool exact = true, padding_kept = true;
                for (index_t i = 0; i < rows; ++i)
                    for (index_t j = 0; j < ld; ++j) {
                        const T got = out[static_cast<std::size_t>(i * ld + j)];
                        if (j < cols) exact = exact && got == x[static_cast<std::size_t>(i * ld + j)];
                        else padding_kept = padding_kept && got == T(-1);
                    }
                INFO("bits=", b, " group=", group, " shape=(", rows, ", ", cols, ")");
                CHECK(exact);
                CHECK(padding_kept);
            }
}

TEST_CASE("1-bit quantization of two-valued data (a ReLU mask, a binary input) is lossless")
{
    compact::cpu::context ctx;
    std::mt19937_64 rng(5);
    const index_t rows = 33, cols = 91;
    std::vector<float> x(static_cast<std::size_t>(rows * cols));
    for (auto& v : x) v = (rng() & 1) ? 0.3f : -1.7f;
    store<float> s(store_scheme::quantized(1, 128), 1, 2);
    for (std::uint64_t step = 0; step < 20; ++step) CHECK(round_trip(s, ctx, x, rows, cols, step) == x);
}

TEST_CASE("8-bit error is at most one level, range / 255, on random data")
{
    compact::cpu::context ctx;
    std::mt19937_64 rng(8);
    const index_t rows = 40, cols = 300, group = 256;
    std::vector<float> x = compact_test::uniform<float>(rng, rows * cols, -3.0, 5.0);
    for (std::size_t k = 0; k < x.size(); k += 97) x[k] *= 40.0f; // groups of very different ranges
    store<float> s(store_scheme::quantized(8, group), 1, 2);
    const std::vector<float> out = round_trip(s, ctx, x, rows, cols, 3);
    double worst = 0;
    for (index_t g = 0; g * group < rows * cols; ++g) {
        const auto first = x.begin() + g * group, last = x.begin() + std::min(rows * cols, (g + 1) * group);
        const double range = double(*std::max_element(first, last)) - double(*std::min_element(first, last));
        for (auto it = first; it != last; ++it) {
            const std::size_t k = static_cast<std::size_t>(it - x.begin());
            worst = std::max(worst, std::abs(double(out[k]) - double(x[k])) / (range / 255.0));
        }
    }
    CHECK_RELATIVE(worst, 1.0 + 1e-4); // float rounding of lo + q step
}

TEST_CASE("stochastic rounding is unbiased, with variance within range^2 / (4 B^2), at every width")
{
    // K independent encodings (steps) of one tensor. For value k the restored mean has standard deviation
    // sigma_k = step sqrt(p_k (1 - p_k) / K), where p_k is its fractional position between two levels.
    // Each value is checked at 6 sigma (two-sided p ~ 2e-9 per value, ~5e-6 over all values here), and the
    // sum of the standardised errors at 5 sigma. A negative control shifts by a tenth of a level and
    // must fail the same test.
    compact::cpu::context ctx;
    std::mt19937_64 rng(21);
    const index_t rows = 8, cols = 256, count = rows * cols;
    const int K = 1500;
    const std::vector<double> xd = [&] {
        std::vector<double> v(static_cast<std::size_t>(count));
        for (auto& e : v) e = static_cast<double>(static_cast<float>(compact_test::uniform<double>(rng, 1, -1, 2)[0]));
        return v;
    }();
    const std::vector<float> x(xd.begin(), xd.end());
    for (int b : widths) {
        store<float> s(store_scheme::quantized(b, 256), 77, 4);
        std::vector<double> sum(static_cast<std::size_t>(count)), sum_sq(static_cast<std::size_t>(count));
        for (int step = 0; step < K; ++step) {
            const std::vector<float> out = round_trip(s, ctx, x, rows, cols, static_cast<std::uint64_t>(step));
            for (std::size_t k = 0; k < out.size(); ++k) {
                sum[k] += out[k];
                sum_sq[k] += double(out[k]) * double(out[k]);
            }
        }
        const double levels = (1 << b) - 1;
        double z_sum = 0, z_shifted = 0, worst_z = 0, var_ratio_worst = 0;
        index_t random_values = 0;
        for (index_t g = 0; g < rows; ++g) {
            const auto first = xd.begin() + g * cols, last = first + cols;
            const double lo = *std::min_element(first, last), hi = *std::max_element(first, last);
            const double step = (hi - lo) / levels;
            for (index_t j = 0; j < cols; ++j) {
                const std::size_t k = static_cast<std::size_t>(g * cols + j);
                const double t = (xd[k] - lo) / step, p = t - std::floor(t);
                const double mean = sum[k] / K, var = sum_sq[k] / K - mean * mean;
                var_ratio_worst = std::max(var_ratio_worst, var / (step * step / 4));
                if (p < 1e-3 || p > 1 - 1e-3) continue; // on a level: no randomness to test
                const double sigma = step * std::sqrt(p * (1 - p) / K);
                const double z = (mean - xd[k]) / sigma;
                worst_z = std::max(worst_z, std::abs(z));
                z_sum += z;
                z_shifted += (mean + 0.1 * step - xd[k]) / sigma;
                ++random_values;
            }
        }
        INFO("bits=", b);
        CHECK(worst_z < 6.0);
        CHECK(std::abs(z_sum / std::sqrt(double(random_values))) < 5.0);
        CHECK(std::abs(z_shifted / std::sqrt(double(random_values))) > 5.0); // the test can fail
        CHECK_RELATIVE(var_ratio_worst, 1.0 + 0.2); // p(1-p) <= 1/4, plus sampling error of K = 1500
    }
}

TEST_CASE("average quantization restores the block means: exactly on its grid, and in expectation otherwise")
{
    compact::cpu::context ctx;
    std::mt19937_64 rng(4);
    SUBCASE("means on the 2-bit grid are restored exactly, repeated over their 4 values; a short last run too")
    {
        const index_t rows = 3, cols = 43; // 129 values: 32 runs of 4 and a run of 1
        std::vector<float> x(static_cast<std::size_t>(rows * cols));
        // Means 0, 1, 2 or 3 (each group of 8 means holds 0 and 3): values mean +- d, summing to 4 mean.
        for (index_t run = 0; run * 4 < rows * cols; ++run) {
            float mean = static_cast<float>(rng() % 4);
            if (run % 8 == 0) mean = 0;
            if (run % 8 == 1) mean = 3;
            const float d = static_cast<float>(rng() % 4) * 0.25f;
            const float v[4] = {mean + d, mean - d, mean + 2 * d, mean - 2 * d};
            for (index_t c = 0; c < 4 && run * 4 + c < rows * cols; ++c)
                x[static_cast<std::size_t>(run * 4 + c)] = (run * 4 + 4 > rows * cols) ? mean : v[c];
        }
        store<float> s(store_scheme::average(8), 3, 3);
        const std::vector<float> out = round_trip(s, ctx, x, rows, cols, 0);
        for (index_t k = 0; k < rows * cols; ++k) {
            const index_t run = k / 4, n = std::min<index_t>(4, rows * cols - 4 * run);
            double mean = 0;
            for (index_t c = 0; c < n; ++c) mean += x[static_cast<std::size_t>(4 * run + c)];
            CHECK(out[static_cast<std::size_t>(k)] == doctest::Approx(mean / double(n)).epsilon(1e-6));
        }
    }
    SUBCASE("random data: the mean over many steps converges to the block means (5 sigma)")
    {
        const index_t rows = 4, cols = 130, count = rows * cols;
        const std::vector<float> x = compact_test::uniform<float>(rng, count, -1, 1);
        store<float> s(store_scheme::average(128), 3, 3);
        const int K = 1000;
        std::vector<double> sum(static_cast<std::size_t>(count));
        for (int step = 0; step < K; ++step) {
            const auto out = round_trip(s, ctx, x, rows, cols, static_cast<std::uint64_t>(step));
            for (std::size_t k = 0; k < out.size(); ++k) sum[k] += out[k];
        }
        double worst = 0;
        for (index_t k = 0; k < count; ++k) {
            const index_t run = k / 4, n = std::min<index_t>(4, count - 4 * run);
            double mean = 0;
            for (index_t c = 0; c < n; ++c) mean += x[static_cast<std::size_t>(4 * run + c)];
            mean /= double(n);
            // Means lie in [-1, 1]: a 2-bit level is at most 2/3, so sigma <= (1/3) / sqrt(K).
            worst = std::max(worst, std::abs(sum[static_cast<std::size_t>(k)] / K - mean) / ((1.0 / 3) / std::sqrt(K)));
        }
        CHECK(worst < 5.0);
    }
}

TEST_CASE("average quantization with a value count not a multiple of 4 restores the short last run as its own mean")
{
    // 13, 14 and 15 values: three runs of 4 and a last run of 1, 2 or 3 values whose mean is nonzero and
    // differs from its neighbours'. The run means 0, 3, 1 and 2 lie on the 2-bit grid of their group
    // (lo 0, hi 3), so every restored value is its run's mean.
    compact::cpu::context ctx;
    for (index_t count : {13, 14, 15}) {
        CAPTURE(count);
        std::vector<float> x = {0.5f, -0.5f, 1.0f, -1.0f, 3.5f, 2.5f, 3.25f, 2.75f, 1.5f, 0.5f, 0.0f, 2.0f};
        const std::vector<float> tail = count == 13 ? std::vector<float>{2.0f}
                                        : count == 14 ? std::vector<float>{1.5f, 2.5f}
                                                      : std::vector<float>{1.25f, 2.0f, 2.75f};
        x.insert(x.end(), tail.begin(), tail.end());
        REQUIRE(static_cast<index_t>(x.size()) == count);
        store<float> s(store_scheme::average(8), 3, 3);
        for (std::uint64_t step = 0; step < 4; ++step) {
            const std::vector<float> out = round_trip(s, ctx, x, 1, count, step);
            for (index_t k = 0; k < count; ++k) {
                const double want = k < 12 ? std::vector<double>{0, 3, 1}[static_cast<std::size_t>(k / 4)] : 2.0;
                CAPTURE(k);
                CHECK(out[static_cast<std::size_t>(k)] == doctest::Approx(want).epsilon(1e-6));
            }
        }
    }
}

TEST_CASE("restore_rows with a huge row0, and a saved tensor whose record was tampered, are errors")
{
    compact::cpu::context ctx;
    const index_t rows = 4, cols = 10;
    std::vector<float> x(static_cast<std::size_t>(rows * cols), 0.25f);
    x[3] = -1.0f;
    for (store_scheme sc : {store_scheme::quantized(4, 8), store_scheme::average(8)}) {
        CAPTURE(compact::to_string(sc));
        store<float> s(sc, 1, 1);
        saved_buffer b(s.saved_bytes(rows, cols));
        s.compress(ctx, cview_of(x, rows, cols), 0, b.tensor);
        std::vector<float> out(static_cast<std::size_t>(rows * cols), -3.0f);
        // row0 + rows would overflow: rejected by the bounds check, not wrapped into range.
        for (index_t row0 : {std::numeric_limits<index_t>::max(), std::numeric_limits<index_t>::max() - 1,
                             index_t{rows + 1}, index_t{-1}, std::numeric_limits<index_t>::min()})
            for (index_t n : {index_t{1}, index_t{0}}) {
                CAPTURE(row0);
                CAPTURE(n);
                CHECK(compact_test::contains(compact_test::error_message_of([&] {
                                                 s.restore_rows(ctx, b.tensor, row0, view_of(out, n, cols));
                                             }),
                                             "at row"));
            }
        // A record whose scheme was changed to group 0 (plain memory the caller can alter): an error, not a
        // division by zero.
        compact::saved_tensor tampered = b.tensor;
        tampered.scheme.group = 0;
        CHECK(compact_test::contains(compact_test::error_message_of([&] {
                                         s.restore(ctx, tampered, view_of(out, rows, cols));
                                     }),
                                     "group=0"));
        CHECK(compact_test::contains(compact_test::error_message_of([&] {
                                         s.restore_rows(ctx, tampered, 1, view_of(out, 2, cols));
                                     }),
                                     "group=0"));
        tampered.scheme = b.tensor.scheme;
        tampered.rows = -1;
        CHECK(compact_test::contains(compact_test::error_message_of([&] {
                                         s.restore(ctx, tampered, view_of(out, rows, cols));
                                     }),
                                     "negative extents"));
        CHECK(std::all_of(out.begin(), out.end(), [](float v) { return v == -3.0f; }));
        // The untouched record still restores.
        s.restore(ctx, b.tensor, view_of(out, rows, cols));
        const bool average = sc.kind == compact::store_kind::average; // run 0's mean is -0.0625
        CHECK(out[0] == (average ? doctest::Approx(-0.0625) : doctest::Approx(0.25)));
        CHECK(out[3] == (average ? doctest::Approx(-0.0625) : doctest::Approx(-1.0)));
    }
}

TEST_CASE("restore_rows gives the same values as a whole restore, slice by slice")
{
    compact::cpu::context ctx;
    std::mt19937_64 rng(6);
    const index_t rows = 29, cols = 37;
    const std::vector<float> x = compact_test::uniform<float>(rng, rows * cols, -1, 1);
    for (store_scheme sc : {store_scheme::quantized(4, 64), store_scheme::average(16), store_scheme::full_precision()}) {
        store<float> s(sc, 1, 1);
        saved_buffer b(s.saved_bytes(rows, cols));
        s.compress(ctx, cview_of(x, rows, cols), 0, b.tensor);
        std::vector<float> whole(x.size());
        s.restore(ctx, b.tensor, view_of(whole, rows, cols));
        std::vector<float> sliced(x.size());
        for (index_t r0 = 0; r0 < rows; r0 += 6) {
            const index_t n = std::min<index_t>(6, rows - r0);
            s.restore_rows(ctx, b.tensor, r0, compact::matrix_view<float>(sliced.data() + r0 * cols, n, cols));
        }
        CHECK(compact_test::bit_equal(whole, sliced));
        if (sc.kind == compact::store_kind::full) CHECK(whole == x);
    }
}

TEST_CASE("encodings are reproducible, independent of the thread count, and change with the step and variant")
{
    std::mt19937_64 rng(7);
    const index_t rows = 300, cols = 500; // several thread parts
    const std::vector<float> x = compact_test::uniform<float>(rng, rows * cols, -1, 1);
    for (store_scheme sc : {store_scheme::quantized(2), store_scheme::average()}) {
        store<float> s(sc, 42, 7);
        auto bytes_of = [&](int threads, std::uint64_t step) {
            saved_buffer b(s.saved_bytes(rows, cols));
            s.compress(compact::cpu::context{threads}, cview_of(x, rows, cols), step, b.tensor);
            return b.words;
        };
        CHECK(bytes_of(1, 3) == bytes_of(2, 3));
        CHECK(bytes_of(2, 3) == bytes_of(2, 3));
        CHECK(bytes_of(2, 3) != bytes_of(2, 4));
        const auto base = bytes_of(2, 3);
        s.settings().variant = 1;
        CHECK(bytes_of(2, 3) != base);
    }
}

namespace {

/// The bytes of one encoding of x (rows, cols) at step 5, and its restored values.
template <class T>
struct encoding {
    std::vector<std::byte> bytes;
    std::vector<T> restored;
};

template <class T>
encoding<T> encode(const store<T>& s, const compact::cpu::context& ctx, const std::vector<T>& x, index_t rows,
                   index_t cols)
{
    const std::size_t n = s.saved_bytes(rows, cols);
    saved_buffer b(n);
    s.compress(ctx, cview_of(x, rows, cols), 5, b.tensor);
    encoding<T> e{std::vector<std::byte>(b.data(), b.data() + n), std::vector<T>(x.size(), T(-7))};
    s.restore(ctx, b.tensor, view_of(e.restored, rows, cols));
    return e;
}

/// Tensor values one group of s covers: G, or 4 G for average quantization.
index_t values_per_group(const store_scheme& s)
{
    return s.kind == compact::store_kind::average ? s.group * compact::detail::average_run : s.group;
}

/// The encoding `clean` of a tensor of `count` values with group g marked as not finite
/// (store_scheme.hpp): its lo and hi the quiet NaN 0x7FC00000, its codes 0; every other byte kept.
std::vector<std::byte> with_group_marked(std::vector<std::byte> clean, const store_scheme& s, index_t count,
                                         index_t g)
{
    const std::uint32_t nan_bits = 0x7FC00000u;
    std::memcpy(clean.data() + 8 * g, &nan_bits, 4);
    std::memcpy(clean.data() + 8 * g + 4, &nan_bits, 4);
    const std::size_t codes = compact::detail::meta_bytes(s, count);
    const std::size_t per_group = static_cast<std::size_t>(s.group * s.bits / 8);
    const std::size_t first = codes + static_cast<std::size_t>(g) * per_group;
    const std::size_t last = std::min(first + per_group, clean.size());
    std::fill(clean.begin() + static_cast<std::ptrdiff_t>(first), clean.begin() + static_cast<std::ptrdiff_t>(last),
              std::byte{0});
    return clean;
}

/// Whether `got` is `clean` with the values [first, last) NaN: NaN there, the same bits elsewhere.
template <class T>
bool nan_exactly_in(const std::vector<T>& got, const std::vector<T>& clean, index_t first, index_t last)
{
    bool ok = got.size() == clean.size();
    for (index_t k = 0; ok && k < static_cast<index_t>(got.size()); ++k) {
        const auto at = static_cast<std::size_t>(k);
        ok = k >= first && k < last ? std::isnan(got[at]) : std::memcmp(&got[at], &clean[at], sizeof(T)) == 0;
    }
    return ok;
}

std::vector<store_scheme> marked_schemes()
{
    std::vector<store_scheme> v;
    for (int b : widths)
        for (index_t group : {8, 128, 256}) v.push_back(store_scheme::quantized(b, group));
    v.push_back(store_scheme::average(8));
    v.push_back(store_scheme::average(128));
    return v;
}

} // namespace

TEST_CASE_TEMPLATE("a NaN or an infinity restores its whole group as NaN; the other groups keep their bytes and values",
                   T, float, double)
{
    // One bad value in an otherwise finite tensor of 1179 values (a partial last group in every scheme),
    // first, inside and last in a group, in group 0 and in the last, partial group. Each encoding is
    // compared with that of the tensor without the bad value: the bad value's group is marked (NaN
    // metadata, codes 0) and restores as NaN, every other byte and restored value is the same.
    compact::cpu::context ctx{2};
    std::mt19937_64 rng(31);
    const index_t rows = 9, cols = 131, count = rows * cols;
    const std::vector<T> clean = compact_test::uniform<T>(rng, count, -2, 3);
    const T bad_values[] = {std::numeric_limits<T>::quiet_NaN(), std::numeric_limits<T>::infinity(),
                            -std::numeric_limits<T>::infinity()};
    for (const store_scheme& sc : marked_schemes()) {
        store<T> s(sc, 3, 4);
        const encoding<T> ref = encode(s, ctx, clean, rows, cols);
        const index_t per = values_per_group(sc);
        const index_t last_group = (count - 1) / per;
        for (const T bad : bad_values)
            for (index_t at : {index_t{0}, index_t{5}, per - 1, per, per + per / 2 + 1, 2 * per - 1,
                               last_group * per, count - 1}) {
                if (at >= count) continue;
                std::vector<T> x = clean;
                x[static_cast<std::size_t>(at)] = bad;
                const encoding<T> got = encode(s, ctx, x, rows, cols);
                const index_t g = at / per;
                INFO(compact::to_string(sc), " bad=", static_cast<double>(bad), " at=", at, " group=", g);
                CHECK(got.bytes == with_group_marked(ref.bytes, sc, count, g));
                CHECK(nan_exactly_in(got.restored, ref.restored, g * per, std::min(count, (g + 1) * per)));
            }
    }
}

TEST_CASE("a NaN in the last, partial group marks only that group, down to a group of one value or one short run")
{
    compact::cpu::context ctx;
    std::mt19937_64 rng(32);
    const float nan = std::numeric_limits<float>::quiet_NaN();
    // (scheme, count): a last group of 44 values, of 1 value; a last group of 3 means whose last run holds
    // 2 values (the NaN in it), of 1 mean of 1 value.
    const std::pair<store_scheme, index_t> cases[] = {{store_scheme::quantized(4, 256), 300},
                                                      {store_scheme::quantized(1, 128), 257},
                                                      {store_scheme::average(128), 522},
                                                      {store_scheme::average(8), 65}};
    for (const auto& [sc, count] : cases) {
        CAPTURE(compact::to_string(sc));
        store<float> s(sc, 8, 9);
        const std::vector<float> clean = compact_test::uniform<float>(rng, count, -1, 1);
        const encoding<float> ref = encode(s, ctx, clean, 1, count);
        const index_t per = values_per_group(sc), g = (count - 1) / per;
        for (index_t at : {count - 1, g * per}) {
            CAPTURE(at);
            std::vector<float> x = clean;
            x[static_cast<std::size_t>(at)] = nan;
            const encoding<float> got = encode(s, ctx, x, 1, count);
            CHECK(got.bytes == with_group_marked(ref.bytes, sc, count, g));
            CHECK(nan_exactly_in(got.restored, ref.restored, g * per, count));
        }
    }
}

TEST_CASE("a group with several values that are not finite, or only such values, restores as NaN too")
{
    compact::cpu::context ctx;
    const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
    // +Inf and -Inf in one run of 4 average to NaN; +Inf and -Inf in one group give an infinite range.
    const std::vector<std::vector<float>> groups = {
        {inf, -inf, 1, 2, 3, 4, 5, 6},         {1, 2, inf, 4, 5, -inf, 7, 8}, {nan, nan, nan, nan, nan, nan, nan, nan},
        {inf, inf, inf, inf, inf, inf, inf, inf}, {-0.0f, nan, 0.0f, inf, -1, 1, nan, -inf}};
    for (const store_scheme& sc : {store_scheme::quantized(1, 8), store_scheme::quantized(8, 8),
                                   store_scheme::average(8)}) {
        CAPTURE(compact::to_string(sc));
        store<float> s(sc, 1, 2);
        for (const auto& group : groups) {
            // The bad group, then a finite group that must come back as if alone.
            std::vector<float> x = group;
            x.resize(static_cast<std::size_t>(values_per_group(sc)), 0.5f);
            for (int k = 0; k < 8; ++k) x.push_back(0.25f * static_cast<float>(k));
            const index_t count = static_cast<index_t>(x.size());
            std::vector<float> finite = x;
            std::fill(finite.begin(), finite.begin() + values_per_group(sc), 0.0f);
            const encoding<float> got = encode(s, ctx, x, 1, count), ref = encode(s, ctx, finite, 1, count);
            CHECK(got.bytes == with_group_marked(ref.bytes, sc, count, 0));
            CHECK(nan_exactly_in(got.restored, ref.restored, 0, values_per_group(sc)));
        }
    }
}

TEST_CASE("a double beyond float's range counts as an infinity; the scheme full keeps NaN and infinities as they are")
{
    compact::cpu::context ctx;
    std::mt19937_64 rng(33);
    const index_t count = 40;
    const std::vector<double> clean = compact_test::uniform<double>(rng, count, -1, 1);
    for (const double big : {1e300, -1e300}) {
        store<double> s(store_scheme::quantized(4, 8), 1, 2);
        std::vector<double> x = clean;
        x[11] = big;
        const encoding<double> got = encode(s, ctx, x, 1, count), ref = encode(s, ctx, clean, 1, count);
        CHECK(got.bytes == with_group_marked(ref.bytes, s.scheme(), count, 1));
        CHECK(nan_exactly_in(got.restored, ref.restored, 8, 16));
    }
    const double nan = std::numeric_limits<double>::quiet_NaN(), inf = std::numeric_limits<double>::infinity();
    std::vector<double> x = clean;
    x[0] = nan;
    x[7] = inf;
    x[8] = -inf;
    x[39] = -nan;
    store<double> full(store_scheme::full_precision(), 1, 2);
    CHECK(compact_test::bit_equal(encode(full, ctx, x, 4, 10).restored, x));
}

TEST_CASE("ReLU and dropout masks: one bit per value, exact outputs and gradients, in place")
{
    compact::cpu::context ctx{2};
    std::mt19937_64 rng(9);
    const index_t rows = 70, cols = 1001; // 70070 values: several parts, a partial last byte
    const std::vector<float> x = compact_test::uniform<float>(rng, rows * cols, -1, 1);
    const std::vector<float> dy = compact_test::uniform<float>(rng, rows * cols, -1, 1);
    std::vector<std::uint8_t> mask(compact::mask_bytes(rows, cols));
    CHECK(mask.size() == (70070 + 7) / 8);

    std::vector<float> y = x; // in place
    compact::relu_forward<compact::cpu, float>(ctx, cview_of(y, rows, cols), view_of(y, rows, cols),
                                               {mask.data(), mask.size()});
    std::vector<float> dx = dy;
    compact::relu_backward<compact::cpu, float>(ctx, mask.data(), cview_of(dx, rows, cols), view_of(dx, rows, cols));
    bool ok = true;
    for (std::size_t k = 0; k < x.size(); ++k) {
        ok = ok && y[k] == (x[k] > 0 ? x[k] : 0.0f);
        ok = ok && dx[k] == (x[k] > 0 ? dy[k] : 0.0f);
    }
    CHECK(ok);

    const double p = 0.3;
    const compact::noise_key key{5, 6, 7, 0};
    std::vector<float> yd(x.size());
    compact::dropout_forward<compact::cpu, float>(ctx, p, key, cview_of(x, rows, cols), view_of(yd, rows, cols),
                                                  {mask.data(), mask.size()});
    std::vector<float> dxd(x.size());
    compact::dropout_backward<compact::cpu, float>(ctx, mask.data(), p, cview_of(dy, rows, cols),
                                                   view_of(dxd, rows, cols));
    index_t kept = 0;
    ok = true;
    const float scale = static_cast<float>(1.0 / (1.0 - p));
    for (std::size_t k = 0; k < x.size(); ++k) {
        const bool keep = (mask[k / 8] >> (k % 8)) & 1;
        kept += keep;
        ok = ok && yd[k] == (keep ? x[k] * scale : 0.0f) && dxd[k] == (keep ? dy[k] * scale : 0.0f);
    }
    CHECK(ok);
    // Kept fraction 0.7 with sd sqrt(0.21 / 70070) = 0.0017: 5 sigma.
    CHECK(std::abs(double(kept) / double(x.size()) - (1 - p)) < 5 * std::sqrt(p * (1 - p) / double(x.size())));
    // Same key, other thread count: same mask.
    std::vector<std::uint8_t> mask1(mask.size());
    compact::dropout_forward<compact::cpu, float>(compact::cpu::context{1}, p, key, cview_of(x, rows, cols),
                                                  view_of(yd, rows, cols), {mask1.data(), mask1.size()});
    CHECK(mask1 == mask);
}

TEST_CASE("the ReLU mask sets a bit only for x > 0: +0.0, -0.0 and NaN give 0 and a zero output")
{
    compact::cpu::context ctx;
    const float nan = std::numeric_limits<float>::quiet_NaN();
    const float inf = std::numeric_limits<float>::infinity();
    const std::vector<float> x = {0.0f, -0.0f, nan, -nan, 1.0f, -1.0f, std::numeric_limits<float>::denorm_min(),
                                  -std::numeric_limits<float>::denorm_min(), inf, -inf, 0.0f, nan};
    const index_t count = static_cast<index_t>(x.size());
    std::vector<std::uint8_t> mask(compact::mask_bytes(1, count), 0xFF);
    std::vector<float> y(x.size(), 7.0f);
    compact::relu_forward<compact::cpu, float>(ctx, cview_of(x, 1, count), view_of(y, 1, count),
                                               {mask.data(), mask.size()});
    const std::vector<float> dy(x.size(), 2.0f);
    std::vector<float> dx(x.size(), 7.0f);
    compact::relu_backward<compact::cpu, float>(ctx, mask.data(), cview_of(dy, 1, count), view_of(dx, 1, count));
    for (std::size_t k = 0; k < x.size(); ++k) {
        CAPTURE(k);
        const bool positive = x[k] > 0; // false for +0, -0 and NaN
        const bool bit = (mask[k / 8] >> (k % 8)) & 1;
        CHECK(bit == positive);
        if (positive) CHECK(y[k] == x[k]);
        else CHECK(y[k] == 0.0f);
        CHECK(!std::isnan(y[k]));
        CHECK(dx[k] == (positive ? 2.0f : 0.0f));
    }
    CHECK(((mask[0] >> 4) & 1) == 1); // 1.0
    CHECK(((mask[0] >> 6) & 1) == 1); // the smallest positive denormal
    CHECK(((mask[1] >> 0) & 1) == 1); // +inf
}

TEST_CASE("bad input names the argument and writes nothing")
{
    using compact_test::contains;
    using compact_test::error_message_of;
    compact::cpu::context ctx;
    const index_t rows = 4, cols = 10;
    std::vector<float> x(static_cast<std::size_t>(rows * cols), 1.0f);

    CHECK(contains(error_message_of([] { store<float>(store_scheme::quantized(3), 0, 0); }),
                   "bits=3 must be 1, 2, 4 or 8"));
    CHECK(contains(error_message_of([] { store<float>(store_scheme::quantized(4, 100), 0, 0); }),
                   "group=100 must be a multiple of 8"));
    CHECK(contains(error_message_of([] { store<float>(store_scheme::quantized(4, 4096), 0, 0); }), "group=4096"));
    CHECK(contains(error_message_of([] { store<float>(store_scheme{compact::store_kind::full, 8, 0}, 0, 0); }),
                   "scheme full takes no bits"));

    store<float> s(store_scheme::quantized(4, 8), 1, 1);
    saved_buffer b(s.saved_bytes(rows, cols));
    CHECK(contains(error_message_of([&] { s.compress(ctx, compact::const_matrix_view<float>(x.data(), 0, cols), 0, b.tensor); }),
                   "empty tensor"));
    compact::saved_tensor small{b.data(), s.saved_bytes(rows, cols) - 1};
    CHECK(contains(error_message_of([&] { s.compress(ctx, cview_of(x, rows, cols), 0, small); }),
                   "but X (4, 10) as int4/g8 needs"));
    CHECK(!small.filled);
    compact::saved_tensor misaligned{b.data() + 1, s.saved_bytes(rows, cols)};
    CHECK(contains(error_message_of([&] { s.compress(ctx, cview_of(x, rows, cols), 0, misaligned); }), "aligned"));
    s.settings().scheme = store_scheme::quantized(5, 8); // set directly, bypassing set_scheme
    CHECK(contains(error_message_of([&] { s.compress(ctx, cview_of(x, rows, cols), 0, b.tensor); }), "bits=5"));
    s.set_scheme(store_scheme::quantized(4, 8));

    std::vector<float> out(x.size(), -3.0f);
    CHECK(contains(error_message_of([&] { s.restore(ctx, b.tensor, view_of(out, rows, cols)); }), "holds nothing"));
    s.compress(ctx, cview_of(x, rows, cols), 0, b.tensor);
    store<float> other(store_scheme::quantized(4, 8), 1, 2);
    CHECK(contains(error_message_of([&] { other.restore(ctx, b.tensor, view_of(out, rows, cols)); }),
                   "written by the store of tensor 1, not by this one (tensor 2)"));
    CHECK(contains(error_message_of([&] { s.restore(ctx, b.tensor, view_of(out, rows, cols + 1)); }),
                   "out is (4, 11) at row 0 but the saved tensor is (4, 10)"));
    CHECK(contains(error_message_of([&] { s.restore_rows(ctx, b.tensor, 2, view_of(out, 3, cols)); }), "at row 2"));
    CHECK(contains(error_message_of([&] { s.compress(ctx, cview_of(x, rows, cols), std::uint64_t{1} << 32, b.tensor); }),
                   "noise step 4294967296 must be below 2^32"));
    CHECK(std::all_of(out.begin(), out.end(), [](float v) { return v == -3.0f; }));

    std::vector<std::uint8_t> mask(compact::mask_bytes(rows, cols) - 1);
    CHECK(contains(error_message_of([&] {
                       compact::relu_forward<compact::cpu, float>(ctx, cview_of(x, rows, cols), view_of(out, rows, cols),
                                                                  {mask.data(), mask.size()});
                   }),
                   "mask holds 4 bytes but (4, 10) needs 5"));
    CHECK(contains(error_message_of([&] {
                       compact::dropout_forward<compact::cpu, float>(ctx, 1.0, {}, cview_of(x, rows, cols),
                                                                     view_of(out, rows, cols), {mask.data(), 5});
                   }),
                   "drop probability p=1 must be in [0, 1)"));
    CHECK(contains(error_message_of([&] {
                       compact::relu_backward<compact::cpu, float>(ctx, nullptr, cview_of(x, rows, cols),
                                                                   view_of(out, rows, cols));
                   }),
                   "mask holds 0 bytes"));
}
