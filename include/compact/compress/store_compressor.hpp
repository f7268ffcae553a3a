// compact/compress/store_compressor.hpp: a linear layer's input kept in an activation store, as a
// compressor (SPEC sections 5 and 8: GACT's group quantization, ALAM's average quantization).
//
//   compact::linear_layer<float, compact::quantized, compact::cpu> fc(
//       compact::in_features{784}, compact::out_features{1024}, options,
//       compact::quantized{compact::store_scheme::average()});
//
// Forward encodes X (N, n) with the store's scheme; backward restores X^ a slice of rows at a time into
// the workspace and forms the full-shape gradient G = dY^T X^ (m, n), so the optimizer is plain AdamW.
// The rounding noise is keyed by (seed, layer id, step) with step the update count (mod 2^32): a rerun
// of one step encodes identically, which the bit allocator's sensitivity probes rely on. The scheme is
// state: a bit allocator changes it through settings() between steps, and checkpoints restore it.
#pragma once

#include "compact/backend/backend.hpp"
#include "compact/backend/store_scheme.hpp"
#include "compact/compress/activation_store.hpp"
#include "compact/compress/compressor.hpp"
#include "compact/core/config.hpp"
#include "compact/core/error.hpp"
#include "compact/core/matrix_view.hpp"
#include "compact/core/shape.hpp"
#include "compact/core/workspace.hpp"

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

COMPACT_NAMESPACE_BEGIN

template <class Scalar, class Backend>
class store_compressor;

/// The Policy of a layer whose input is kept in an activation store with `scheme`.
struct quantized {
    store_scheme scheme = store_scheme::quantized(4, 256);

    template <class Scalar, class Backend>
    using compressor = store_compressor<Scalar, Backend>;
};

template <class Scalar, class Backend>
class store_compressor {
    COMPACT_CHECK_BACKEND(Backend);

public:
    using scalar_type = Scalar;
    using backend_type = Backend;
    using context = typename Backend::context;
    using saved_type = saved_tensor;
    using store_type = activation_store<Scalar, Backend>;
    static constexpr const char* name = "activation_store";
    static constexpr bool subspace = false;

    /// The largest slice of X^ that weight_gradient restores at once.
    static constexpr index_t max_restore_rows = 1024;

    store_compressor(const compressor_setup& setup, const quantized& policy)
        : in_(setup.in), store_(checked_scheme(policy.scheme, setup.where), setup.seed, setup.layer)
    {
        COMPACT_REQUIRE(setup.in >= 1, setup.where, "in=", setup.in, " must be positive");
    }

    index_t in() const noexcept { return in_; }
    index_t gradient_cols() const noexcept { return in_; }
    const store_type& store() const noexcept { return store_; }
    /// The scheme and noise variant, for a bit allocator (compress/sensitivity.hpp); validated at every
    /// compress.
    store_settings& settings() noexcept { return store_.settings(); }
    const store_scheme& scheme() const noexcept { return store_.scheme(); }
    void set_scheme(const store_scheme& s) { store_.set_scheme(s); }

    /// Bytes of the encoded X for N rows, metadata included, with the current scheme.
    std::size_t saved_bytes(index_t rows) const { return store_.saved_bytes(rows, in_); }

    /// Workspace for weight_gradient with up to `rows` rows: one slice of X^ of at most max_restore_rows
    /// rows. Any workspace of at least one row's bytes works; a larger one means fewer, larger GEMMs.
    std::size_t workspace_bytes(index_t rows = max_restore_rows) const
    {
        const index_t slice = std::max<index_t>(1, std::min(rows, max_restore_rows));
        return detail::align_up(detail::checked_mul_size(slice, in_, sizeof(Scalar), "store_compressor::workspace_bytes")) +
               detail::workspace_slack;
    }

    /// Encodes X (N, n) into saved with the noise of `step`.
    void compress(const context& ctx, const_matrix_view<Scalar> x, std::uint64_t step, saved_type& saved,
                  workspace = {}) const
    {
        constexpr const char* where = "store_compressor::compress";
        detail::check_view(x, where, "X");
        COMPACT_REQUIRE(x.cols == in_, where, "X is ", shape_string(x), " but the store expects (N, ", in_, ")");
        const std::uint64_t noise_step = step & 0xFFFFFFFFu;
        if (x.rows == 0) { // nothing to encode: record an empty tensor
            detail::check_scheme(store_.scheme(), where);
            saved.filled = true;
            saved.rows = 0;
            saved.cols = in_;
            saved.scheme = store_.scheme();
            saved.layer = store_.tensor();
            saved.epoch = noise_step;
            return;
        }
        store_.check_compress(x, noise_step, saved, where);
        store_.compress(ctx, x, noise_step, saved);
    }

    /// G (m, n) = (or +=) dY^T X^, X^ restored from saved a slice of rows at a time into ws.
    void weight_gradient(const context& ctx, const_matrix_view<Scalar> dy, const saved_type& saved,
                         matrix_view<Scalar> g, write_mode mode, workspace ws) const
    {
        constexpr const char* where = "store_compressor::weight_gradient";
        detail::check_view(dy, where, "dY");
        check_saved(saved, dy.rows, store_.tensor(), where);
        detail::check_shape(g, dy.cols, in_, where, "G");
        const bool accumulate = mode == write_mode::accumulate;
        if (dy.rows == 0) {
            if (!accumulate) Backend::template fill<Scalar>(ctx, g, Scalar(0));
            return;
        }
        store_.check_restore(saved, 0, dy.rows, in_, where);
        const std::size_t one_row = workspace_bytes(1);
        COMPACT_REQUIRE(ws.bytes >= one_row && ws.data != nullptr, where, "workspace holds ", ws.bytes,
                        " bytes but one row of X (", in_, " values) needs ", one_row, " (ask workspace_bytes)");
        // Rows that fit after aligning the base; at least one, as checked above.
        // Whole aligned sub-buffers only: the slice taken below is rounded up to the alignment.
        const std::size_t usable =
            (ws.bytes - detail::workspace_slack) / workspace_alignment * workspace_alignment;
        const index_t slice = std::min<index_t>(
            {dy.rows, max_restore_rows, static_cast<index_t>(usable / (static_cast<std::size_t>(in_) * sizeof(Scalar)))});
        detail::workspace_carver carve(ws, detail::buffer_bytes<Scalar>(slice * in_) + detail::workspace_slack, where);
        Scalar* x_hat = carve.take<Scalar>(slice * in_);
        for (index_t r0 = 0; r0 < dy.rows; r0 += slice) {
            const index_t n = std::min(slice, dy.rows - r0);
            matrix_view<Scalar> part(x_hat, n, in_);
            store_.restore_rows(ctx, saved, r0, part);
            const double beta = (r0 > 0 || accumulate) ? 1.0 : 0.0;
            Backend::template gemm<Scalar>(ctx, op::transpose, op::none, 1.0, dy.row_block(r0, n), part, beta, g);
        }
    }

    /// The scheme is state that a checkpoint restores (a resumed run encodes as the saved one did).
    std::vector<compressor_field> checkpoint_fields() const
    {
        const store_scheme& s = store_.scheme();
        return {{"store_kind", static_cast<std::uint64_t>(s.kind), true},
                {"store_bits", static_cast<std::uint64_t>(s.bits), true},
                {"store_group", static_cast<std::uint64_t>(s.group), true}};
    }

    void load_checkpoint_fields(const std::vector<compressor_field>& fields, const char* where)
    {
        std::uint64_t kind = 0, bits = 0, group = 0;
        for (const auto& f : fields) {
            const std::string field = f.name;
            if (field == "store_kind") kind = f.value;
            else if (field == "store_bits") bits = f.value;
            else if (field == "store_group") group = f.value;
        }
        COMPACT_REQUIRE(kind <= 2 && bits <= 8 && group <= static_cast<std::uint64_t>(detail::max_store_group), where,
                        "the store scheme (kind ", kind, ", bits ", bits, ", group ", group,
                        ") is not one compact writes");
        const store_scheme s{static_cast<store_kind>(kind), static_cast<int>(bits), static_cast<index_t>(group)};
        detail::check_scheme(s, where);
        store_.set_scheme(s);
    }

private:
    static const store_scheme& checked_scheme(const store_scheme& s, const char* where)
    {
        detail::check_scheme(s, where); // in the caller's name, before the store checks it again
        return s;
    }

    index_t in_ = 0;
    store_type store_{};
};

COMPACT_NAMESPACE_END
