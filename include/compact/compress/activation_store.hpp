// compact/compress/activation_store.hpp: a saved-activation store (SPEC section 5).
//
// A trainer keeps tensors from forward for backward: a linear layer's input, a GELU or SiLU input,
// attention probabilities, a norm's input. An activation_store compresses such a tensor in forward into
// caller memory and hands back its approximation in backward:
//
//   compact::activation_store<float, compact::cpu> store(compact::store_scheme::quantized(4), seed, id);
//   std::vector<std::byte> bytes(store.saved_bytes(N, n));      // once, outside the step
//   compact::saved_tensor saved{bytes.data(), bytes.size()};
//   store.compress(ctx, x, step, saved);                          // forward: x (N, n) -> 4.25 bits/value
//   store.restore(ctx, saved, x_hat);                             // backward: x_hat (N, n)
//
// The scheme (backend/store_scheme.hpp) decides bytes and error: full keeps the values, quantized(b) is
// unbiased with variance <= range^2 / (4 (2^b - 1)^2) per value, average() is ALAM's biased 0.5-bit
// scheme. Its noise is keyed by (seed, tensor id, step, variant), so a run is reproducible bit for bit
// and independent of the thread count. A store is a small value (scheme, seed, id); the bytes are the
// caller's, and a saved_tensor records what was written into them, so restoring with the wrong store or
// before anything was compressed is an error, never garbage.
#pragma once

#include "compact/backend/backend.hpp"
#include "compact/backend/store_scheme.hpp"
#include "compact/compress/compressor.hpp"
#include "compact/core/checked.hpp"
#include "compact/core/config.hpp"
#include "compact/core/error.hpp"
#include "compact/core/matrix_view.hpp"

#include <algorithm>
#include <cstddef>
#include <cstdint>

COMPACT_NAMESPACE_BEGIN

/// Caller memory for one compressed tensor, and a record of what compress() wrote into it: the common
/// record of compress/compressor.hpp (rows, the writing store's tensor id as `layer`, the noise step as
/// `epoch`) plus the columns and the scheme.
struct saved_tensor : saved_activation {
    saved_tensor() = default;
    /// `bytes` of caller memory at `memory`: at least saved_bytes(), aligned for float and the scalar.
    saved_tensor(std::byte* memory, std::size_t bytes) noexcept
    {
        data = memory;
        capacity = bytes;
    }

    // Written by activation_store::compress; read by restore.
    index_t cols = 0;
    store_scheme scheme{};
};

/// What a bit allocator may change in a store between steps: its scheme, and the noise variant (0 in
/// training; sensitivity probes draw other variants).
struct store_settings {
    store_scheme scheme{};
    std::uint32_t variant = 0;
};

template <class Scalar, class Backend>
class activation_store {
    COMPACT_CHECK_BACKEND(Backend);

public:
    using scalar_type = Scalar;
    using context = typename Backend::context;

    activation_store() = default;

    /// `seed`: the run's seed; `tensor`: this tensor's unique id (it keys the rounding noise).
    activation_store(store_scheme scheme, std::uint64_t seed, std::uint64_t tensor)
        : settings_{scheme, 0}, seed_(seed), tensor_(tensor)
    {
        detail::check_scheme(scheme, "activation_store");
    }

    const store_scheme& scheme() const noexcept { return settings_.scheme; }
    void set_scheme(const store_scheme& s)
    {
        detail::check_scheme(s, "activation_store::set_scheme");
        settings_.scheme = s;
    }
    /// The settings a bit allocator adjusts (see compress/sensitivity.hpp); validated at every compress.
    store_settings& settings() noexcept { return settings_; }
    const store_settings& settings() const noexcept { return settings_; }
    std::uint64_t seed() const noexcept { return seed_; }
    std::uint64_t tensor() const noexcept { return tensor_; }
    bool unbiased() const noexcept { return settings_.scheme.unbiased(); }

    /// Bytes compress() writes for a (rows, cols) tensor, metadata included.
    std::size_t saved_bytes(index_t rows, index_t cols) const
    {
        const index_t count = detail::checked_mul(rows, cols, "activation_store::saved_bytes");
        return stored_bytes<Scalar>(settings_.scheme, count);
    }

    /// Encodes x (rows, cols) into out.data; `step` selects fresh noise (for example the update count).
    void compress(const context& ctx, const_matrix_view<Scalar> x, std::uint64_t step, saved_tensor& out) const
    {
        check_compress(x, step, out, "activation_store::compress");
        Backend::template quantize<Scalar>(ctx, settings_.scheme, {seed_, tensor_, step, settings_.variant}, x,
                                           out.data);
        out.filled = true;
        out.rows = x.rows;
        out.cols = x.cols;
        out.scheme = settings_.scheme;
        out.layer = tensor_;
        out.epoch = step;
    }

    /// The checks compress() makes, for callers that validate everything before writing anything.
    void check_compress(const_matrix_view<Scalar> x, std::uint64_t step, const saved_tensor& out,
                        const char* where) const
    {
        detail::check_scheme(settings_.scheme, where);
        detail::check_view(x, where, "X");
        COMPACT_REQUIRE(!x.empty(), where, "X is ", shape_string(x), ": an empty tensor cannot be stored");
        detail::check_noise_key({seed_, tensor_, step, settings_.variant}, where);
        const std::size_t bytes = saved_bytes(x.rows, x.cols);
        COMPACT_REQUIRE(out.capacity >= bytes && out.data != nullptr, where, "saved tensor holds ", out.capacity,
                        " bytes at ", static_cast<const void*>(out.data), " but X ", shape_string(x), " as ",
                        to_string(settings_.scheme), " needs ", bytes);
        COMPACT_REQUIRE(reinterpret_cast<std::uintptr_t>(out.data) % alignment == 0, where, "saved tensor data ",
                        static_cast<const void*>(out.data), " must be aligned to ", alignment, " bytes");
    }

    /// The checks restore_rows() makes.
    void check_restore(const saved_tensor& in, index_t row0, index_t rows, index_t cols, const char* where) const
    {
        COMPACT_REQUIRE(in.filled, where, "the saved tensor holds nothing: compress into it first");
        COMPACT_REQUIRE(in.layer == tensor_, where, "the saved tensor was written by the store of tensor ",
                        in.layer, ", not by this one (tensor ", tensor_, ")");
        // A saved tensor is plain memory a caller can alter: its record is validated again before use.
        detail::check_scheme(in.scheme, where);
        COMPACT_REQUIRE(in.rows >= 0 && in.cols >= 0, where, "the saved tensor's record has negative extents (",
                        in.rows, ", ", in.cols, ")");
        const index_t count = detail::checked_mul(in.rows, in.cols, where);
        COMPACT_REQUIRE(in.data != nullptr && in.capacity >= stored_bytes<Scalar>(in.scheme, count), where,
                        "the saved tensor's memory (", in.capacity, " bytes) no longer holds its ",
                        to_string(in.scheme), " encoding of (", in.rows, ", ", in.cols, ")");
        COMPACT_REQUIRE(cols == in.cols && row0 >= 0 && rows >= 0 && row0 <= in.rows && rows <= in.rows - row0, where,
                        "out is (", rows, ", ", cols, ") at row ", row0, " but the saved tensor is (", in.rows, ", ", in.cols, ")");
    }

    /// Writes the approximation of the whole tensor held by `in` into out (rows, cols).
    void restore(const context& ctx, const saved_tensor& in, matrix_view<Scalar> out) const
    {
        restore_rows(ctx, in, 0, out);
    }

    /// Writes rows [row0, row0 + out.rows) of the approximation into out (out.rows, cols): backward can
    /// expand a tensor a slice at a time into a small workspace.
    void restore_rows(const context& ctx, const saved_tensor& in, index_t row0, matrix_view<Scalar> out) const
    {
        constexpr const char* where = "activation_store::restore";
        detail::check_view(out, where, "out");
        check_restore(in, row0, out.rows, out.cols, where);
        Backend::template dequantize<Scalar>(ctx, in.scheme, in.data, in.rows * in.cols, row0 * in.cols, out);
    }

    /// Alignment compress() requires of saved_tensor::data.
    static constexpr std::size_t alignment = std::max(alignof(float), alignof(Scalar));

private:
    store_settings settings_{};
    std::uint64_t seed_ = 0;
    std::uint64_t tensor_ = 0;
};

COMPACT_NAMESPACE_END
