// compact/torch/detail/encoded.hpp: a torch tensor encoded by a compact activation store, and back.
// Internal to torch/ (the saved-tensor scope and the GELU / SiLU modules keep their inputs this way).
#pragma once

#include "compact/backend/cpu/cpu.hpp"
#include "compact/backend/store_scheme.hpp"
#include "compact/compress/activation_store.hpp"
#include "compact/core/config.hpp"
#include "compact/torch/detail/tensor.hpp"

#include <torch/torch.h>

#include <cstdint>
#include <vector>

COMPACT_NAMESPACE_BEGIN
namespace torch {
namespace detail {

/// A float or double CPU tensor's encoding: the bytes (uint8, padded to whole floats, so that a graph
/// walk can view them as a float tensor) and the store's record, with what decoding needs.
struct encoded_tensor {
    ::at::Tensor bytes;
    compact::saved_tensor record;
    std::vector<int64_t> sizes;
    ::at::ScalarType dtype = ::at::kFloat;
    std::uint64_t seed = 0;

    bool defined() const noexcept { return bytes.defined(); }
};

/// Encodes x (float or double, on the CPU; made contiguous here if it is not) as a (numel / last
/// dimension, last dimension) matrix with the store keyed by (seed, tensor, step, settings.variant).
inline encoded_tensor encode(const ::at::Tensor& input, const store_settings& settings, std::uint64_t seed,
                             std::uint64_t tensor, std::uint64_t step)
{
    const ::at::Tensor x = input.contiguous();
    encoded_tensor e;
    e.sizes = x.sizes().vec();
    e.dtype = x.scalar_type();
    e.seed = seed;
    const int64_t cols = x.dim() == 0 ? 1 : x.size(-1);
    const int64_t rows = cols == 0 ? 0 : x.numel() / cols;
    auto run = [&](auto zero) {
        using T = decltype(zero);
        activation_store<T, cpu> store(settings.scheme, seed, tensor);
        store.settings().variant = settings.variant;
        const std::size_t need = store.saved_bytes(rows, cols);
        const auto padded = static_cast<int64_t>((need + sizeof(float) - 1) / sizeof(float) * sizeof(float));
        e.bytes = ::at::empty({padded}, ::at::kByte);
        e.record = compact::saved_tensor(reinterpret_cast<std::byte*>(e.bytes.data_ptr<std::uint8_t>()), need);
        store.compress(cpu_context(), const_matrix_view<T>(x.data_ptr<T>(), rows, cols), step, e.record);
    };
    if (e.dtype == ::at::kDouble) run(double{});
    else run(float{});
    return e;
}

/// The approximation of the encoded tensor: a new contiguous tensor of its sizes and dtype.
inline ::at::Tensor decode(const encoded_tensor& e)
{
    ::at::Tensor out = ::at::empty(e.sizes, ::at::TensorOptions().dtype(e.dtype));
    auto run = [&](auto zero) {
        using T = decltype(zero);
        const activation_store<T, cpu> store(e.record.scheme, e.seed, e.record.layer);
        store.restore(cpu_context(), e.record, matrix_view<T>(out.data_ptr<T>(), e.record.rows, e.record.cols));
    };
    if (e.dtype == ::at::kDouble) run(double{});
    else run(float{});
    return out;
}

} // namespace detail
} // namespace torch
COMPACT_NAMESPACE_END
