// compact/backend/cuda/device_buffer.cuh: owning device memory for the convenience wrappers.
//
// device_buffer<T> is cuda::buffer<T>: the storage linear_layer (nn/linear_layer.hpp) allocates once,
// in its constructor, through assign(count, value), and reads through data() and size(). It is a
// plain cudaMalloc allocation (256-byte aligned), move-only, freed in the destructor. assign() is a
// set-up call: it allocates, fills on the legacy default stream and waits for the fill, so the memory
// is ready for any stream afterwards. The hot path (forward, backward, step) never calls it.
//
// copy_to_device / copy_to_host move `count` elements between host and device memory (for
// initialisation, checkpoints and tests). Both have finished when they return, but neither waits for
// kernels on a non-blocking stream: synchronise the stream that last touched the memory first.
#pragma once

#include "compact/backend/cuda/error.cuh"
#include "compact/core/config.hpp"
#include "compact/core/error.hpp"

#include <cuda_runtime.h>

#include <cstddef>
#include <cstring>
#include <utility>

COMPACT_NAMESPACE_BEGIN
namespace detail {

template <class T>
__global__ void fill_elements_kernel(T* out, std::size_t count, T value)
{
    for (std::size_t k = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; k < count;
         k += static_cast<std::size_t>(gridDim.x) * blockDim.x)
        out[k] = value;
}

/// Blocks for `count` elements at 256 threads each, capped so that a grid-stride loop takes the rest.
inline unsigned grid_for(std::size_t count) noexcept
{
    const std::size_t blocks = (count + 255) / 256;
    return static_cast<unsigned>(blocks < 65535 ? (blocks > 0 ? blocks : 1) : 65535);
}

template <class T>
bool all_zero_bytes(const T& value) noexcept
{
    unsigned char bytes[sizeof(T)];
    std::memcpy(bytes, &value, sizeof(T));
    for (unsigned char b : bytes)
        if (b != 0) return false;
    return true;
}

} // namespace detail

template <class T>
class device_buffer {
public:
    using value_type = T;

    device_buffer() noexcept = default;
    /// `count` elements, each `value`.
    device_buffer(std::size_t count, const T& value) { assign(count, value); }
    device_buffer(const device_buffer&) = delete;
    device_buffer& operator=(const device_buffer&) = delete;
    device_buffer(device_buffer&& other) noexcept
        : data_(std::exchange(other.data_, nullptr)), size_(std::exchange(other.size_, 0))
    {
    }
    device_buffer& operator=(device_buffer&& other) noexcept
    {
        if (this != &other) {
            release();
            data_ = std::exchange(other.data_, nullptr);
            size_ = std::exchange(other.size_, 0);
        }
        return *this;
    }
    ~device_buffer() { release(); }

    /// Device pointer to the first element (null when empty).
    T* data() noexcept { return data_; }
    const T* data() const noexcept { return data_; }
    std::size_t size() const noexcept { return size_; }
    bool empty() const noexcept { return size_ == 0; }

    /// Resizes to `count` elements (reallocating only when the size changes) and sets each to `value`;
    /// like std::vector::assign. Synchronous: the elements hold `value` when it returns.
    void assign(std::size_t count, const T& value)
    {
        constexpr const char* where = "device_buffer::assign";
        if (count != size_) {
            release();
            if (count > 0) {
                void* p = nullptr;
                COMPACT_CUDA_CHECK(cudaMalloc(&p, count * sizeof(T)), where);
                data_ = static_cast<T*>(p);
                size_ = count;
            }
        }
        if (count == 0) return;
        if (detail::all_zero_bytes(value)) {
            COMPACT_CUDA_CHECK(cudaMemsetAsync(data_, 0, count * sizeof(T), cudaStream_t{}), where);
        } else {
            detail::fill_elements_kernel<T><<<detail::grid_for(count), 256, 0, cudaStream_t{}>>>(data_, count, value);
            detail::check_launch(cudaStream_t{}, where);
        }
        COMPACT_CUDA_CHECK(cudaStreamSynchronize(cudaStream_t{}), where);
    }

private:
    void release() noexcept
    {
        if (data_) cudaFree(data_); // a failure here (a dead context) cannot be reported from a destructor
        data_ = nullptr;
        size_ = 0;
    }

    T* data_ = nullptr;
    std::size_t size_ = 0;
};

/// Copies `count` elements from host memory to device memory; they are there when it returns.
template <class T>
void copy_to_device(T* device, const T* host, std::size_t count)
{
    if (count == 0) return;
    COMPACT_CUDA_CHECK(cudaMemcpy(device, host, count * sizeof(T), cudaMemcpyHostToDevice), "copy_to_device");
    // From pageable memory cudaMemcpy may return before the DMA lands; kernels on a non-blocking
    // stream would not wait for it.
    COMPACT_CUDA_CHECK(cudaStreamSynchronize(cudaStream_t{}), "copy_to_device");
}

/// Copies `count` elements from device memory to host memory; they are there when it returns.
template <class T>
void copy_to_host(T* host, const T* device, std::size_t count)
{
    if (count == 0) return;
    COMPACT_CUDA_CHECK(cudaMemcpy(host, device, count * sizeof(T), cudaMemcpyDeviceToHost), "copy_to_host");
}

COMPACT_NAMESPACE_END
