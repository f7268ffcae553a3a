// Tests of the CUDA backend's quantized stores and masks (compact/backend/cuda/detail/store_kernels.cuh): the GPU
// must write the very bytes the CPU backend writes (backend/cpu/detail/quantize.hpp, the reference here).
//
// The host cases run everywhere: they check the launch arithmetic, and run the kernels' per-thread
// steps (COMPACT_HD, so nvcc builds them for the host too) thread by thread, in a reduction order unlike
// the CPU's, against the CPU kernels, on odd shapes, padded views and adversarial values (NaN, infinities,
// zeros of both signs, constant groups). The device cases compare the GPU's output with the CPU's and
// skip without a GPU.
#include <compact/backend/cpu/detail/quantize.hpp>
#include <compact/cuda.cuh>

#include <doctest/doctest.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

using compact::index_t;
using compact::noise_key;
using compact::store_kind;
using compact::store_scheme;
namespace cd = compact::detail;
namespace cs = compact::detail::cuda_store;
namespace cpu_ref = compact::detail::cpu_store;
using backend = compact::cuda;

namespace {

bool has_device() { return backend::device_available(); }

/// The CPU kernels' parallel_for, run on this thread.
struct serial_for {
    template <class F>
    void operator()(index_t parts, F&& f) const
    {
        for (index_t p = 0; p < parts; ++p) f(p);
    }
};

template <class T>
bool same_bits(const T& a, const T& b)
{
    return std::memcmp(static_cast<const void*>(&a), static_cast<const void*>(&b), sizeof(T)) == 0;
}

template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b)
{
    return a.size() == b.size() &&
           (a.empty() || std::memcmp(static_cast<const void*>(a.data()), static_cast<const void*>(b.data()),
                                     a.size() * sizeof(T)) == 0);
}

const store_scheme schemes[] = {
    store_scheme::full_precision(), store_scheme::quantized(1, 8),   store_scheme::quantized(2, 8),
    store_scheme::quantized(4, 8),  store_scheme::quantized(8, 8),   store_scheme::quantized(1, 128),
    store_scheme::quantized(2, 128), store_scheme::quantized(4, 128), store_scheme::quantized(8, 128),
    store_scheme::quantized(1, 256), store_scheme::quantized(2, 256), store_scheme::quantized(4, 256),
    store_scheme::quantized(8, 256), store_scheme::quantized(4, 2048), store_scheme::quantized(2, 200),
    store_scheme::average(8),        store_scheme::average(128),      store_scheme::average(2048),
};

/// Where a (rows, cols) tensor lies in its storage: element (i, j) at offset + i ld + j.
struct layout {
    index_t rows, cols, ld, offset;
    std::size_t storage() const { return static_cast<std::size_t>(offset + rows * ld); }
};

/// Dense and 16-byte aligned, dense one element off (no vector accesses), and padded rows.
std::vector<layout> layouts_of(index_t rows, index_t cols)
{
    return {{rows, cols, cols, 0}, {rows, cols, cols, 1}, {rows, cols, cols + 3, 0}};
}

std::string describe(const store_scheme& s, const layout& l, int data)
{
    return compact::to_string(s) + " (" + std::to_string(l.rows) + ", " + std::to_string(l.cols) +
           ") ld=" + std::to_string(l.ld) + " offset=" + std::to_string(l.offset) + " data=" + std::to_string(data);
}

/// Test values for `n` storage elements. data 0: uniform in [-2, 2); 1: ReLU-like (>= 0, zeros of both
/// signs, so the least value ties between 0 and -0); 2: the negation of 1 (ties at the greatest);
/// 3: adversarial (NaN, also first in groups, infinities, subnormals, constant runs, values that
/// round to float differently).
template <class T>
std::vector<T> test_values(std::size_t n, std::uint64_t seed, int data)
{
    std::vector<double> v(n);
    std::uint64_t s = seed * 0x9E3779B97F4A7C15ull + 12345;
    auto next = [&s] {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        return s >> 11;
    };
    const double nan = std::numeric_limits<double>::quiet_NaN(), inf = std::numeric_limits<double>::infinity();
    for (std::size_t k = 0; k < n; ++k) {
        const double u = static_cast<double>(next()) * 0x1p-53 * 4.0 - 2.0;
        switch (data) {
        case 0: v[k] = u; break;
        case 1:
        case 2: {
            const auto r = next() % 4;
            const double x = r == 0 ? 0.0 : (r == 1 ? -0.0 : std::abs(u));
            v[k] = data == 1 ? x : -x;
            break;
        }
        default: {
            const auto r = next() % 16;
            if (k % 8 == 0 && next() % 5 == 0) v[k] = nan; // NaN first in a group of 8 (and of larger groups)
            else if (r == 0) v[k] = nan;
            else if (r == 1) v[k] = inf;
            else if (r == 2) v[k] = -inf;
            else if (r == 3) v[k] = 1e-40;               // subnormal in float
            else if (r == 4) v[k] = 1.0 + 0x1p-30;        // rounds to 1 in float
            else if (r == 5) v[k] = k > 0 ? v[k - 1] : 0.5; // constant runs
            else if (r == 6) v[k] = -0.0;
            else if (r == 7) v[k] = 0.0;
            else v[k] = u;
        }
        }
    }
    std::vector<T> out(n);
    for (std::size_t k = 0; k < n; ++k) out[k] = cd::from_double<T>(v[k]);
    return out;
}

template <class T>
compact::const_matrix_view<T> view_in(const std::vector<T>& storage, const layout& l)
{
    return {storage.data() + l.offset, l.rows, l.cols, l.ld};
}
template <class T>
compact::matrix_view<T> view_in(std::vector<T>& storage, const layout& l)
{
    return {storage.data() + l.offset, l.rows, l.cols, l.ld};
}

template <class T>
std::vector<float> to_float_storage(const std::vector<T>& x)
{
    std::vector<float> f(x.size());
    for (std::size_t k = 0; k < x.size(); ++k) f[k] = cs::to_float(x[k]);
    return f;
}

template <class T>
constexpr bool is_16bit = std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>;

/// The CPU backend's encoding of x; 16-bit T: that of its values converted to float (full: the raw T).
template <class T>
std::vector<std::byte> cpu_encoding(const store_scheme& s, const noise_key& key, const std::vector<T>& storage,
                                    const layout& l)
{
    const index_t count = l.rows * l.cols;
    std::vector<std::byte> out(compact::stored_bytes<T>(s, count));
    if constexpr (is_16bit<T>) {
        if (s.kind == store_kind::full) {
            auto* o = reinterpret_cast<T*>(out.data());
            for (index_t i = 0; i < l.rows; ++i)
                for (index_t j = 0; j < l.cols; ++j)
                    o[i * l.cols + j] = storage[static_cast<std::size_t>(l.offset + i * l.ld + j)];
        } else {
            const std::vector<float> f = to_float_storage(storage);
            cpu_ref::quantize(serial_for{}, s, key, view_in(f, l), out.data());
        }
    } else {
        cpu_ref::quantize(serial_for{}, s, key, view_in(storage, l), out.data());
    }
    return out;
}

/// The CPU backend's decoding of values [first, first + rows cols) into a dense (rows, cols); 16-bit T:
/// its float decoding rounded to T (full: the raw T).
template <class T>
std::vector<T> cpu_decoding(const store_scheme& s, const std::vector<std::byte>& in, index_t count, index_t first,
                            index_t rows, index_t cols)
{
    std::vector<T> out(static_cast<std::size_t>(rows * cols));
    if constexpr (is_16bit<T>) {
        if (s.kind == store_kind::full) {
            std::memcpy(static_cast<void*>(out.data()), in.data() + static_cast<std::size_t>(first) * sizeof(T),
                        out.size() * sizeof(T));
        } else {
            std::vector<float> f(out.size());
            cpu_ref::dequantize(serial_for{}, s, in.data(), count, first, compact::make_view(f.data(), rows, cols));
            for (std::size_t k = 0; k < f.size(); ++k) out[k] = cd::from_compute<T>(f[k]);
        }
    } else {
        cpu_ref::dequantize(serial_for{}, s, in.data(), count, first, compact::make_view(out.data(), rows, cols));
    }
    return out;
}

/// quantize_kernel's steps on the host, thread by thread, with its tree-shaped block reduction.
template <class T>
std::vector<std::byte> host_quantize(const store_scheme& s, const noise_key& key, compact::const_matrix_view<T> x,
                                     bool vector)
{
    const index_t count = x.rows * x.cols;
    std::vector<std::byte> out(compact::stored_bytes<T>(s, count));
    if (s.kind == store_kind::full) {
        auto* o = reinterpret_cast<T*>(out.data());
        for (index_t i = 0; i < x.rows; ++i)
            for (index_t j = 0; j < x.cols; ++j) o[i * x.cols + j] = x(i, j);
        return out;
    }
    auto* meta = reinterpret_cast<float*>(out.data());
    auto* codes = reinterpret_cast<std::uint8_t*>(out.data() + cd::meta_bytes(s, count));
    const unsigned threads = cs::group_threads(s);
    const cd::noise_stream ns = cd::make_noise_stream(key);
    std::vector<float> buf(static_cast<std::size_t>(s.group)); // the kernel's shared buffer, exactly
    for (index_t g = 0; g < cd::group_count(s, count); ++g) {
        const cs::group_extent e = cs::extent_of(s, count, g);
        std::vector<cs::extremes> m(threads, cs::no_extremes());
        for (unsigned t = 0; t < threads; ++t)
            for (index_t it = t; it < cs::load_items(s, e); it += threads)
                m[t] = cs::combine(m[t], s.kind == store_kind::average ? cs::load_run(x, e, it, vector, buf.data())
                                                                       : cs::load_quad(x, e, it, vector, buf.data()));
        for (unsigned stride = threads / 2; stride > 0; stride /= 2)
            for (unsigned t = 0; t < stride; ++t) m[t] = cs::combine(m[t + stride], m[t]);
        const cs::group_range r = cs::finish(m[0]);
        meta[2 * g] = r.lo;
        meta[2 * g + 1] = r.hi;
        const cs::group_coding c = cs::coding_of(s, ns, e, g, r);
        const index_t units = (e.coded + cs::unit_codes(s.bits) - 1) / cs::unit_codes(s.bits);
        for (index_t u = units - 1; u >= 0; --u) cs::encode_unit(buf.data(), u, c, codes + g * (s.group * s.bits / 8));
    }
    return out;
}

/// dequantize_kernel's steps on the host.
template <class T>
void host_dequantize(const store_scheme& s, const std::vector<std::byte>& in, index_t count, index_t first,
                     compact::matrix_view<T> out, bool vector)
{
    const index_t len = out.rows * out.cols;
    if (s.kind == store_kind::full) {
        const auto* src = reinterpret_cast<const T*>(in.data()) + first;
        for (index_t k = 0; k < len; ++k) out(k / out.cols, k % out.cols) = src[k];
        return;
    }
    const auto* meta = reinterpret_cast<const float*>(in.data());
    const auto* codes = reinterpret_cast<const std::uint8_t*>(in.data() + cd::meta_bytes(s, count));
    const index_t per = cs::values_per_group(s);
    for (index_t g = first / per; g < (first + len - 1) / per + 1; ++g) {
        const cs::quad_span span = cs::output_quads(s, count, first, len, g);
        for (index_t qo = span.qb - 1; qo >= span.qa; --qo)
            cs::decode_quad(s, meta, codes, count, first, g, qo, vector, out);
    }
}

template <cs::mask_mode Mode, class T>
void host_mask(compact::const_matrix_view<T> x, compact::matrix_view<T> y,
               const cs::mask_constants<cd::compute_t<T>>& k, const std::uint8_t* mask_in, std::uint8_t* mask_out)
{
    const index_t count = x.rows * x.cols;
    for (index_t b = (count + 7) / 8 - 1; b >= 0; --b)
        cs::mask_octet<Mode>(x, cs::vector_ok(x), y, cs::vector_ok(y), count, b, k, mask_in, mask_out);
}

const noise_key test_key{0xfeedfacecafebeefull, 0x123456789ull, 77, 2};

} // namespace

// ---------------------------------------------------------------------------------------- host cases

TEST_CASE("launch arithmetic: threads, shared memory, grids and code units")
{
    CHECK(cs::group_threads(store_scheme::quantized(4, 8)) == 32);
    CHECK(cs::group_threads(store_scheme::quantized(4, 128)) == 32);
    CHECK(cs::group_threads(store_scheme::quantized(4, 256)) == 64);
    CHECK(cs::group_threads(store_scheme::quantized(4, 200)) == 64);
    CHECK(cs::group_threads(store_scheme::quantized(4, 512)) == 128);
    CHECK(cs::group_threads(store_scheme::quantized(4, 1024)) == 256);
    CHECK(cs::group_threads(store_scheme::quantized(4, 2048)) == 256);
    CHECK(cs::group_threads(store_scheme::average(8)) == 32);
    CHECK(cs::group_threads(store_scheme::average(128)) == 128);
    CHECK(cs::group_threads(store_scheme::average(2048)) == 256);
    CHECK(cs::group_shared_bytes(store_scheme::quantized(8, 2048)) == 8192);
    CHECK(cs::group_shared_bytes(store_scheme::average(128)) == 512);
    CHECK(cs::group_grid(1) == 1);
    CHECK(cs::group_grid(index_t{1} << 40) == static_cast<unsigned>(INT_MAX));
    CHECK(cs::mask_grid(1) == 1);
    CHECK(cs::mask_grid(257) == 2);
    CHECK(cs::mask_grid(index_t{1} << 40) == 65535);
    CHECK(cs::unit_codes(1) == 8);
    CHECK(cs::unit_bytes(1) == 1);
    CHECK(cs::unit_bytes(2) == 1);
    CHECK(cs::unit_bytes(4) == 2);
    CHECK(cs::unit_bytes(8) == 4);
    for (int bits : {1, 2, 4, 8})
        for (index_t group = 8; group <= cd::max_store_group; group += 8) {
            const store_scheme s = store_scheme::quantized(bits, group);
            // A group's codes are whole units, so every unit store is aligned to its width.
            CHECK((group * bits / 8) % cs::unit_bytes(bits) == 0);
            CHECK(cs::group_threads(s) >= 32);
            CHECK(cs::group_threads(s) <= 256);
            for (index_t coded : {index_t{1}, group / 2 + 1, group - 1, group}) {
                // The load step and the code step stay inside the group's shared buffer.
                const cs::group_extent e{0, coded, coded};
                CHECK(4 * cs::load_items(s, e) <= group);
                const index_t units = (coded + cs::unit_codes(bits) - 1) / cs::unit_codes(bits);
                CHECK(units * cs::unit_codes(bits) <= group);
                const cs::group_extent a{0, 4 * coded, coded};
                CHECK(cs::load_items(store_scheme::average(group), a) <= group);
            }
        }
}

TEST_CASE("the block reduction's lo and hi are the CPU's, zeros' signs and NaN included, in any order")
{
    for (int data = 0; data < 4; ++data)
        for (index_t len : {1, 2, 7, 8, 15, 16, 17, 33, 100, 128, 255, 256, 1000, 2048}) {
            const std::vector<float> v =
                test_values<float>(static_cast<std::size_t>(len), 5 + static_cast<std::uint64_t>(len), data);
            float meta[2];
            std::vector<std::uint8_t> codes(static_cast<std::size_t>(len));
            cpu_ref::encode_group(v.data(), len, 0, 8, cd::make_noise_stream(test_key), meta, codes.data());
            // Forward, backward and tree orders of the (value, rank) combination.
            cs::extremes forward = cs::no_extremes(), backward = cs::no_extremes();
            std::vector<cs::extremes> tree(static_cast<std::size_t>(len));
            for (index_t k = 0; k < len; ++k) {
                const auto at = static_cast<std::size_t>(k);
                forward = cs::include(forward, v[at], cs::tie_rank(k, len));
                const auto back = static_cast<std::size_t>(len - 1 - k);
                backward = cs::include(backward, v[back], cs::tie_rank(len - 1 - k, len));
                tree[at] = cs::include(cs::no_extremes(), v[at], cs::tie_rank(k, len));
            }
            for (std::size_t width = 1; width < tree.size(); width *= 2)
                for (std::size_t k = 0; k + width < tree.size(); k += 2 * width)
                    tree[k] = cs::combine(tree[k + width], tree[k]);
            for (const cs::extremes& e : {forward, backward, tree[0]}) {
                const cs::group_range r = cs::finish(e);
                CAPTURE(data);
                CAPTURE(len);
                CHECK(same_bits(r.lo, meta[0]));
                CHECK(same_bits(r.hi, meta[1]));
            }
        }
}

TEST_CASE_TEMPLATE("the quantize steps write the CPU's bytes: every scheme, odd shapes, padded views", T, float,
                   double, __half, __nv_bfloat16)
{
    for (auto [rows, cols] : {std::pair<index_t, index_t>{37, 53}, {1, 1}, {1, 7}, {3, 5}, {130, 67}})
        for (const layout& l : layouts_of(rows, cols))
            for (int data = 0; data < 4; ++data) {
                const auto x = test_values<T>(l.storage(), static_cast<std::uint64_t>(rows * 1000 + cols), data);
                for (const store_scheme& s : schemes) {
                    CAPTURE(describe(s, l, data));
                    const auto expected = cpu_encoding(s, test_key, x, l);
                    const auto view = view_in(x, l);
                    CHECK(same_bits(host_quantize(s, test_key, view, cs::vector_ok(view)), expected));
                    if (l.offset == 0 && l.ld == l.cols) // the scalar path on a dense view too
                        CHECK(same_bits(host_quantize(s, test_key, view, false), expected));
                }
            }
}

namespace {

/// x with the flat values `at` (row-major in l) set to `bad`.
template <class T>
std::vector<T> with_bad_value(std::vector<T> x, const layout& l, index_t at, double bad)
{
    x[static_cast<std::size_t>(l.offset + at / l.cols * l.ld + at % l.cols)] = cd::from_double<T>(bad);
    return x;
}

template <class T>
bool is_nan(const T& x)
{
    return std::isnan(static_cast<double>(cd::to_compute(x)));
}

/// Whether a dense decoding `got` of a whole tensor is NaN exactly in [first, last) and has the bits of
/// `expected` elsewhere (NaN's bits may differ between devices).
template <class T>
bool nan_exactly_in(const std::vector<T>& got, const std::vector<T>& expected, index_t first, index_t last)
{
    bool ok = got.size() == expected.size();
    for (index_t k = 0; ok && k < static_cast<index_t>(got.size()); ++k) {
        const auto at = static_cast<std::size_t>(k);
        ok = k >= first && k < last ? is_nan(got[at]) : same_bits(got[at], expected[at]);
    }
    return ok;
}

const double bad_values[] = {std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::infinity(),
                             -std::numeric_limits<double>::infinity()};

} // namespace

TEST_CASE_TEMPLATE("the quantize steps mark a group with a NaN or an infinity as the CPU does: NaN lo and hi, codes 0",
                   T, float, double, __half, __nv_bfloat16)
{
    const index_t rows = 37, cols = 53, count = rows * cols;
    for (const layout& l : layouts_of(rows, cols)) {
        const auto clean = test_values<T>(l.storage(), 9, 0);
        for (const store_scheme& s : schemes)
            for (double bad : bad_values)
                for (index_t at : {index_t{0}, index_t{100}, count - 1}) {
                    CAPTURE(describe(s, l, 0));
                    CAPTURE(bad);
                    CAPTURE(at);
                    const auto x = with_bad_value(clean, l, at, bad);
                    const auto expected = cpu_encoding(s, test_key, x, l);
                    const auto view = view_in(x, l);
                    CHECK(same_bits(host_quantize(s, test_key, view, cs::vector_ok(view)), expected));
                    std::vector<T> out(static_cast<std::size_t>(count));
                    host_dequantize(s, expected, count, 0, compact::make_view(out.data(), rows, cols), false);
                    if (s.kind == store_kind::full) {
                        CHECK(same_bits(out, cpu_decoding<T>(s, expected, count, 0, rows, cols)));
                        continue;
                    }
                    const index_t per = cs::values_per_group(s), g = at / per;
                    const std::uint32_t nan_bits = 0x7FC00000u;
                    float nan_bound;
                    std::memcpy(&nan_bound, &nan_bits, sizeof nan_bound);
                    const auto* meta = reinterpret_cast<const float*>(expected.data());
                    CHECK(same_bits(meta[2 * g], nan_bound));
                    CHECK(same_bits(meta[2 * g + 1], nan_bound));
                    CHECK(nan_exactly_in(out, cpu_decoding<T>(s, cpu_encoding(s, test_key, clean, l), count, 0, rows,
                                                              cols),
                                         g * per, std::min(count, (g + 1) * per)));
                }
    }
}

TEST_CASE("the quantize steps write the CPU's bytes on a large tensor")
{
    const layout l{1000, 4097, 4097, 0};
    const auto x = test_values<float>(l.storage(), 4, 0);
    for (const store_scheme& s : {store_scheme::quantized(4, 256), store_scheme::average(128)}) {
        CAPTURE(compact::to_string(s));
        CHECK(same_bits(host_quantize(s, test_key, view_in(x, l), true), cpu_encoding(s, test_key, x, l)));
    }
}

TEST_CASE_TEMPLATE("the dequantize steps give the CPU's values bit for bit, whole and partial ranges", T, float,
                   double, __half, __nv_bfloat16)
{
    const index_t rows = 37, cols = 53, count = rows * cols;
    const layout source{rows, cols, cols, 0};
    for (int data : {0, 3}) {
        const auto x = test_values<T>(source.storage(), 17, data);
        for (const store_scheme& s : schemes) {
            const auto bytes = cpu_encoding(s, test_key, x, source);
            // (first, out rows, out cols): the whole tensor, row slices, odd and quad-aligned ranges,
            // the last value alone.
            const index_t ranges[][3] = {{0, rows, cols},      {5 * cols, 7, cols}, {1, 1, 101},  {4, 3, 33},
                                         {1234, 1, count - 1234}, {count - 1, 1, 1}, {255, 17, 3}, {8, 5, 1}};
            for (const auto& r : ranges) {
                const index_t first = r[0], out_rows = r[1], out_cols = r[2];
                const auto expected = cpu_decoding<T>(s, bytes, count, first, out_rows, out_cols);
                for (const layout& l : layouts_of(out_rows, out_cols)) {
                    CAPTURE(describe(s, l, data));
                    CAPTURE(first);
                    std::vector<T> out(l.storage(), cd::from_double<T>(99.0));
                    const auto view = view_in(out, l);
                    host_dequantize(s, bytes, count, first, view, cs::vector_ok(view));
                    std::vector<T> got(static_cast<std::size_t>(out_rows * out_cols));
                    for (index_t i = 0; i < out_rows; ++i)
                        for (index_t j = 0; j < out_cols; ++j)
                            got[static_cast<std::size_t>(i * out_cols + j)] = view(i, j);
                    CHECK(same_bits(got, expected));
                    // Padding is left alone.
                    for (index_t i = 0; i < out_rows; ++i)
                        for (index_t j = out_cols; j < l.ld; ++j)
                            CHECK(same_bits(view.data[i * l.ld + j], cd::from_double<T>(99.0)));
                }
            }
        }
    }
}

TEST_CASE_TEMPLATE("the mask steps give the CPU's bits and values: odd counts, padded views, in place", T, float,
                   double, __half, __nv_bfloat16)
{
    using C = cd::compute_t<T>;
    const double p = 0.3;
    for (auto [rows, cols] : {std::pair<index_t, index_t>{37, 53}, {1, 1}, {3, 5}, {16, 8}})
        for (const layout& lx : layouts_of(rows, cols))
            for (int data : {0, 3}) {
                CAPTURE(describe(store_scheme::full_precision(), lx, data));
                const index_t count = rows * cols;
                const auto x = test_values<T>(lx.storage(), 23, data);
                // The CPU backend on the float values (T itself for float and double), then rounded to T.
                using R = std::conditional_t<is_16bit<T>, float, T>;
                std::vector<R> xr(x.size());
                for (std::size_t k = 0; k < x.size(); ++k) xr[k] = static_cast<R>(cd::to_compute(x[k]));
                const layout dense{rows, cols, cols, 0};
                const std::size_t bytes = compact::mask_bytes(rows, cols);
                auto rounded = [&](const std::vector<R>& y) {
                    std::vector<T> t(y.size());
                    for (std::size_t k = 0; k < y.size(); ++k) t[k] = cd::from_compute<T>(cd::to_compute(y[k]));
                    return t;
                };
                std::vector<R> relu_y(dense.storage()), drop_y(dense.storage()), back(dense.storage());
                std::vector<std::uint8_t> relu_m(bytes), drop_m(bytes);
                cpu_ref::relu_mask<R>(serial_for{}, view_in(xr, lx), view_in(relu_y, dense), relu_m.data());
                cpu_ref::dropout_mask<R>(serial_for{}, p, test_key, view_in(xr, lx), view_in(drop_y, dense),
                                         drop_m.data());
                cpu_ref::apply_mask<R>(serial_for{}, drop_m.data(), 1.0 / (1.0 - p), view_in(xr, lx),
                                       view_in(back, dense));

                for (int mode = 0; mode < 3; ++mode) {
                    CAPTURE(mode);
                    // Out of place into a dense view, and in place in x's own layout.
                    for (bool in_place : {false, true}) {
                        std::vector<T> y = in_place ? x : std::vector<T>(dense.storage());
                        const layout ly = in_place ? lx : dense;
                        const auto yv = view_in(y, ly);
                        const compact::const_matrix_view<T> xv =
                            in_place ? compact::const_matrix_view<T>(yv) : view_in(x, lx);
                        std::vector<std::uint8_t> mask(bytes, 0xEE);
                        if (mode == 0) {
                            host_mask<cs::mask_mode::relu>(xv, yv, {C(1), 0.0f, {}}, nullptr, mask.data());
                        } else if (mode == 1) {
                            host_mask<cs::mask_mode::dropout>(xv, yv,
                                                              {static_cast<C>(1.0 / (1.0 - p)), static_cast<float>(p),
                                                               cd::make_noise_stream(test_key)},
                                                              nullptr, mask.data());
                        } else {
                            mask = drop_m;
                            host_mask<cs::mask_mode::apply>(xv, yv, {static_cast<C>(1.0 / (1.0 - p)), 0.0f, {}},
                                                            mask.data(), nullptr);
                        }
                        std::vector<T> got(static_cast<std::size_t>(count));
                        for (index_t i = 0; i < rows; ++i)
                            for (index_t j = 0; j < cols; ++j) got[static_cast<std::size_t>(i * cols + j)] = yv(i, j);
                        CHECK(same_bits(got, rounded(mode == 0 ? relu_y : (mode == 1 ? drop_y : back))));
                        CHECK(mask == (mode == 0 ? relu_m : drop_m));
                    }
                }
            }
}

TEST_CASE("the new primitives check their arguments and return without touching CUDA when empty")
{
    const backend::context ctx{}; // never used: every call below returns or throws first
    const compact::const_matrix_view<float> cempty{};
    const compact::matrix_view<float> empty{};
    CHECK_NOTHROW(backend::quantize<float>(ctx, store_scheme::quantized(4), test_key, cempty, nullptr));
    CHECK_NOTHROW(backend::quantize<float>(ctx, store_scheme::full_precision(), test_key, cempty, nullptr));
    CHECK_NOTHROW(backend::dequantize<float>(ctx, store_scheme::average(), nullptr, 0, 0, empty));
    CHECK_NOTHROW(backend::relu_mask<float>(ctx, cempty, empty, nullptr));
    CHECK_NOTHROW(backend::dropout_mask<float>(ctx, 0.5, test_key, cempty, empty, nullptr));
    CHECK_NOTHROW(backend::apply_mask<float>(ctx, nullptr, 2.0, cempty, empty));
    float dummy[8] = {};
    const compact::const_matrix_view<float> x(dummy, 2, 3);
    const auto message_of = [](auto&& f) {
        try {
            f();
        } catch (const compact::error& e) {
            return std::string(e.what());
        }
        return std::string("no exception");
    };
    const std::string bad_bits = message_of([&] {
        backend::quantize<float>(ctx, {store_kind::quantized, 3, 128}, test_key, x,
                                 reinterpret_cast<std::byte*>(dummy));
    });
    CHECK(bad_bits.find("cuda::quantize") != std::string::npos);
    CHECK(bad_bits.find("bits=3") != std::string::npos);
    const std::string bad_range = message_of([&] {
        backend::dequantize<float>(ctx, store_scheme::quantized(8), reinterpret_cast<std::byte*>(dummy), 6, 4,
                                   {dummy, 1, 3});
    });
    CHECK(bad_range.find("cuda::dequantize") != std::string::npos);
    CHECK(bad_range.find("[4, 7)") != std::string::npos);
    const std::string bad_shape =
        message_of([&] { backend::relu_mask<float>(ctx, x, {dummy, 3, 2}, reinterpret_cast<std::uint8_t*>(dummy)); });
    CHECK(bad_shape.find("cuda::relu_mask") != std::string::npos);
    CHECK(bad_shape.find("(2, 3)") != std::string::npos);
    const std::string misaligned = message_of([&] {
        backend::quantize<float>(ctx, store_scheme::quantized(8), test_key, x, reinterpret_cast<std::byte*>(dummy) + 1);
    });
    CHECK(misaligned.find("aligned") != std::string::npos);
}

// -------------------------------------------------------------------------------------- device cases

namespace {

template <class T>
compact::device_buffer<T> upload(const std::vector<T>& host)
{
    compact::device_buffer<T> d(host.size(), T{});
    compact::copy_to_device(d.data(), host.data(), host.size());
    return d;
}

template <class T>
std::vector<T> download(const compact::device_buffer<T>& d)
{
    std::vector<T> host(d.size());
    compact::copy_to_host(host.data(), d.data(), d.size());
    return host;
}

struct device_fixture {
    compact::owned_cuda_context owner;
    const backend::context& ctx() const { return owner.get(); }
};

constexpr std::size_t guard_bytes = 64;
constexpr std::byte guard{0xA5};

} // namespace

TEST_CASE_TEMPLATE("quantize writes the CPU's bytes: every scheme, odd shapes, padded views" *
                       doctest::skip(!has_device()),
                   T, float, double, __half, __nv_bfloat16)
{
    device_fixture f;
    for (auto [rows, cols] : {std::pair<index_t, index_t>{37, 53}, {1, 1}, {3, 5}, {1000, 4097}})
        for (const layout& l : layouts_of(rows, cols))
            for (int data : {0, 3}) {
                if (rows == 1000 && data != 0) continue;
                const auto x = test_values<T>(l.storage(), static_cast<std::uint64_t>(rows + cols), data);
                const auto dx = upload(x);
                const compact::const_matrix_view<T> view(dx.data() + l.offset, l.rows, l.cols, l.ld);
                for (const store_scheme& s : schemes) {
                    CAPTURE(describe(s, l, data));
                    const auto expected = cpu_encoding(s, test_key, x, l);
                    // Guard bytes after the encoding must survive.
                    compact::device_buffer<std::byte> out(expected.size() + guard_bytes, guard);
                    backend::quantize<T>(f.ctx(), s, test_key, view, out.data());
                    f.owner.synchronize();
                    auto got = download(out);
                    for (std::size_t k = expected.size(); k < got.size(); ++k) REQUIRE(got[k] == guard);
                    got.resize(expected.size());
                    CHECK(same_bits(got, expected));
                }
            }
}

TEST_CASE_TEMPLATE("dequantize gives the CPU's values bit for bit, whole and partial ranges" *
                       doctest::skip(!has_device()),
                   T, float, double, __half, __nv_bfloat16)
{
    device_fixture f;
    for (auto [rows, cols] : {std::pair<index_t, index_t>{37, 53}, {1000, 4097}}) {
        const index_t count = rows * cols;
        const layout source{rows, cols, cols, 0};
        const auto x = test_values<T>(source.storage(), 31, 0);
        for (const store_scheme& s : schemes) {
            const auto bytes = cpu_encoding(s, test_key, x, source);
            const auto din = upload(bytes);
            const index_t ranges[][3] = {{0, rows, cols},  {5 * cols, 7, cols}, {1, 1, 101},       {4, 3, 33},
                                         {1234, 1, count - 1234}, {count - 1, 1, 1}, {255, 17, 3}, {8, 5, 1}};
            for (const auto& r : ranges) {
                const index_t first = r[0], out_rows = r[1], out_cols = r[2];
                const auto expected = cpu_decoding<T>(s, bytes, count, first, out_rows, out_cols);
                for (const layout& l : layouts_of(out_rows, out_cols)) {
                    CAPTURE(describe(s, l, 0));
                    CAPTURE(first);
                    const T fill = cd::from_double<T>(99.0);
                    compact::device_buffer<T> out(l.storage() + guard_bytes, fill);
                    const compact::matrix_view<T> view(out.data() + l.offset, out_rows, out_cols, l.ld);
                    backend::dequantize<T>(f.ctx(), s, din.data(), count, first, view);
                    f.owner.synchronize();
                    const auto host = download(out);
                    std::vector<T> got(expected.size());
                    for (index_t i = 0; i < out_rows; ++i)
                        for (index_t j = 0; j < out_cols; ++j)
                            got[static_cast<std::size_t>(i * out_cols + j)] =
                                host[static_cast<std::size_t>(l.offset + i * l.ld + j)];
                    CHECK(same_bits(got, expected));
                    // Everything else (padding, the element before an offset view, the guard) is left alone.
                    std::size_t untouched = 0;
                    for (const T& v : host) untouched += same_bits(v, fill) ? 1 : 0;
                    CHECK(untouched >= host.size() - expected.size());
                }
            }
        }
    }
}

TEST_CASE_TEMPLATE("masks give the CPU's bits and values: odd counts, padded views, in place" *
                       doctest::skip(!has_device()),
                   T, float, double, __half, __nv_bfloat16)
{
    device_fixture f;
    const double p = 0.3;
    using R = std::conditional_t<is_16bit<T>, float, T>;
    for (auto [rows, cols] : {std::pair<index_t, index_t>{37, 53}, {1, 1}, {3, 5}, {1000, 4097}})
        for (const layout& lx : layouts_of(rows, cols)) {
            CAPTURE(describe(store_scheme::full_precision(), lx, 3));
            const index_t count = rows * cols;
            const std::size_t bytes = compact::mask_bytes(rows, cols);
            const auto x = test_values<T>(lx.storage(), 41, 3);
            std::vector<R> xr(x.size());
            for (std::size_t k = 0; k < x.size(); ++k) xr[k] = static_cast<R>(cd::to_compute(x[k]));
            const layout dense{rows, cols, cols, 0};
            std::vector<R> relu_y(dense.storage()), drop_y(dense.storage()), back(dense.storage());
            std::vector<std::uint8_t> relu_m(bytes), drop_m(bytes);
            cpu_ref::relu_mask<R>(serial_for{}, view_in(xr, lx), view_in(relu_y, dense), relu_m.data());
            cpu_ref::dropout_mask<R>(serial_for{}, p, test_key, view_in(xr, lx), view_in(drop_y, dense), drop_m.data());
            cpu_ref::apply_mask<R>(serial_for{}, drop_m.data(), 1.0 / (1.0 - p), view_in(xr, lx), view_in(back, dense));
            auto rounded = [](const std::vector<R>& y) {
                std::vector<T> t(y.size());
                for (std::size_t k = 0; k < y.size(); ++k) t[k] = cd::from_compute<T>(cd::to_compute(y[k]));
                return t;
            };
            for (int mode = 0; mode < 3; ++mode)
                for (bool in_place : {false, true}) {
                    CAPTURE(mode);
                    CAPTURE(in_place);
                    auto dx = upload(x);
                    compact::device_buffer<T> dy(dense.storage(), T{});
                    const layout ly = in_place ? lx : dense;
                    const compact::matrix_view<T> yv(in_place ? dx.data() + lx.offset : dy.data(), rows, cols, ly.ld);
                    const compact::const_matrix_view<T> xv(dx.data() + lx.offset, rows, cols, lx.ld);
                    auto dmask = upload(std::vector<std::uint8_t>(bytes + guard_bytes, 0xEE));
                    if (mode == 0) backend::relu_mask<T>(f.ctx(), xv, yv, dmask.data());
                    else if (mode == 1) backend::dropout_mask<T>(f.ctx(), p, test_key, xv, yv, dmask.data());
                    else {
                        compact::copy_to_device(dmask.data(), drop_m.data(), bytes);
                        backend::apply_mask<T>(f.ctx(), dmask.data(), 1.0 / (1.0 - p), xv, yv);
                    }
                    f.owner.synchronize();
                    const auto host_y = in_place ? download(dx) : download(dy);
                    std::vector<T> got(static_cast<std::size_t>(count));
                    for (index_t i = 0; i < rows; ++i)
                        for (index_t j = 0; j < cols; ++j)
                            got[static_cast<std::size_t>(i * cols + j)] =
                                host_y[static_cast<std::size_t>((in_place ? lx.offset : 0) + i * ly.ld + j)];
                    CHECK(same_bits(got, rounded(mode == 0 ? relu_y : (mode == 1 ? drop_y : back))));
                    const auto mask = download(dmask);
                    const std::vector<std::uint8_t> head(mask.begin(),
                                                         mask.begin() + static_cast<std::ptrdiff_t>(bytes));
                    CHECK(head == (mode == 0 ? relu_m : drop_m));
                    for (std::size_t k = bytes; k < mask.size(); ++k) REQUIRE(mask[k] == 0xEE);
                }
        }
}

TEST_CASE("a GPU encoding decodes on the GPU to the CPU's round trip" * doctest::skip(!has_device()))
{
    device_fixture f;
    const index_t rows = 129, cols = 77, count = rows * cols;
    const layout l{rows, cols, cols + 1, 0};
    const auto x = test_values<float>(l.storage(), 7, 0);
    const auto dx = upload(x);
    for (const store_scheme& s : schemes) {
        CAPTURE(compact::to_string(s));
        compact::device_buffer<std::byte> enc(compact::stored_bytes<float>(s, count), std::byte{0});
        compact::device_buffer<float> out(static_cast<std::size_t>(count), 0.0f);
        backend::quantize<float>(f.ctx(), s, test_key, {dx.data(), rows, cols, l.ld}, enc.data());
        backend::dequantize<float>(f.ctx(), s, enc.data(), count, 0, {out.data(), rows, cols});
        f.owner.synchronize();
        const auto bytes = cpu_encoding(s, test_key, x, l);
        CHECK(same_bits(download(out), cpu_decoding<float>(s, bytes, count, 0, rows, cols)));
    }
}

TEST_CASE_TEMPLATE("a group with a NaN or an infinity: the GPU writes the CPU's bytes and restores the group as NaN" *
                       doctest::skip(!has_device()),
                   T, float, double, __half, __nv_bfloat16)
{
    device_fixture f;
    const index_t rows = 37, cols = 53, count = rows * cols;
    for (const layout& l : layouts_of(rows, cols)) {
        const auto clean = test_values<T>(l.storage(), 9, 0);
        for (const store_scheme& s : schemes)
            for (double bad : bad_values)
                for (index_t at : {index_t{0}, index_t{100}, count - 1}) {
                    CAPTURE(describe(s, l, 0));
                    CAPTURE(bad);
                    CAPTURE(at);
                    const auto x = with_bad_value(clean, l, at, bad);
                    const auto dx = upload(x);
                    const auto expected = cpu_encoding(s, test_key, x, l);
                    compact::device_buffer<std::byte> enc(expected.size(), std::byte{0});
                    compact::device_buffer<T> out(static_cast<std::size_t>(count), T{});
                    backend::quantize<T>(f.ctx(), s, test_key, {dx.data() + l.offset, rows, cols, l.ld}, enc.data());
                    backend::dequantize<T>(f.ctx(), s, enc.data(), count, 0, {out.data(), rows, cols});
                    f.owner.synchronize();
                    CHECK(same_bits(download(enc), expected));
                    const auto restored = download(out);
                    if (s.kind == store_kind::full) {
                        CHECK(same_bits(restored, cpu_decoding<T>(s, expected, count, 0, rows, cols)));
                        continue;
                    }
                    // The bad value's group is NaN; every other value is the CPU's decoding of the tensor
                    // without the bad value.
                    const index_t per = cs::values_per_group(s), g = at / per;
                    CHECK(nan_exactly_in(restored,
                                         cpu_decoding<T>(s, cpu_encoding(s, test_key, clean, l), count, 0, rows, cols),
                                         g * per, std::min(count, (g + 1) * per)));
                }
    }
}
