// tests/backend_under_test.hpp: one test body, every backend.
//
// The generic test bodies (test_optim.cpp, test_compressed_linear.cpp, test_linear_layer.cpp) are
// templates over a configuration whose backend B they run on. A .cpp build runs them on the CPU
// backend; tests/cuda/test_cuda_<name>.cu defines COMPACT_TEST_CUDA and includes the same .cpp, which
// runs them on the CUDA backend, skipped (exit 77) without a device. A body keeps its inputs and its
// float64 references on the host and hands the library memory B's primitives can use:
//
//   compact_test::device<B> dev;                 // B's context: dev.ctx() (a stream + cuBLAS handle
//                                                // owned for the test on CUDA)
//   auto w_d = dev.upload(w);                    // device_array<B, T>: a copy of a host vector
//   auto x_d = dev.upload(x_host_matrix);        // device_matrix<B, T>: shape, ld and padding kept
//   ... library calls with w_d.view(rows, cols), x_d.cview(), dev.workspace(bytes) ...
//   w = dev.download(w_d);                       // waits for dev's stream, then copies back
//   dev.read(view)                               // any (device) view, e.g. a layer's weight()
//
// On the CPU backend the "device" copy is separate host storage, not the host vector itself, so a
// body that forgets an upload or a download fails on the CPU too, not only on a GPU.
//
//   COMPACT_TEST_CONFIGS   the configurations of the backend under test: (float, float) and
//                          (double, double), as config<Backend, Scalar, State>
//   COMPACT_TEST_ON_DEVICE decorator for every generic test case: skips it when the backend under
//                          test has no device (never on the CPU)
//   COMPACT_TEST_CUDA      defined in a CUDA build; CPU-only cases (thread counts, the CPU backend
//                          as a reference) sit under #if !COMPACT_TEST_CUDA_BUILD
#pragma once

#if defined(COMPACT_TEST_CUDA)
#include <compact/cuda.cuh>
#else
#include <compact/compact.hpp>
#endif

#include <compact/core/matrix_view.hpp>
#include <compact/core/workspace.hpp>

#include "reference.hpp"

#include <doctest/doctest.h>

#include <algorithm>
#include <cstddef>
#include <type_traits>
#include <vector>

namespace compact_test {

#if defined(COMPACT_TEST_CUDA)
using backend_under_test = compact::cuda;
#define COMPACT_TEST_CUDA_BUILD 1
#else
using backend_under_test = compact::cpu;
#define COMPACT_TEST_CUDA_BUILD 0
#endif

template <class Backend, class Scalar, class State>
struct config {
    using backend = Backend;
    using scalar = Scalar;
    using state = State;
};

#define COMPACT_TEST_CONFIGS                                                                               \
    ::compact_test::config<::compact_test::backend_under_test, float, float>,                              \
        ::compact_test::config<::compact_test::backend_under_test, double, double>

template <class Backend>
struct backend_traits;

#if !defined(COMPACT_TEST_CUDA)
/// The CPU: the default context, and std::vector storage distinct from the body's host vectors.
template <>
struct backend_traits<compact::cpu> {
    struct owner {
        compact::cpu::context context{};
        const compact::cpu::context& get() const noexcept { return context; }
        void synchronize() const noexcept {}
    };
    template <class T>
    using storage = std::vector<T>;
    template <class T>
    static storage<T> allocate(std::size_t count)
    {
        return storage<T>(count);
    }
    template <class T>
    static void copy_in(T* device, const T* host, std::size_t count)
    {
        std::copy(host, host + count, device);
    }
    template <class T>
    static void copy_out(T* host, const T* device, std::size_t count)
    {
        std::copy(device, device + count, host);
    }
    static bool available() noexcept { return true; }
};
#else
/// CUDA: an owned non-blocking stream and cuBLAS handle, device_buffer storage, synchronous copies.
template <>
struct backend_traits<compact::cuda> {
    using owner = compact::owned_cuda_context;
    template <class T>
    using storage = compact::device_buffer<T>;
    template <class T>
    static storage<T> allocate(std::size_t count)
    {
        return storage<T>(count, T{});
    }
    template <class T>
    static void copy_in(T* device, const T* host, std::size_t count)
    {
        compact::copy_to_device(device, host, count);
    }
    template <class T>
    static void copy_out(T* host, const T* device, std::size_t count)
    {
        compact::copy_to_host(host, device, count);
    }
    static bool available() noexcept { return compact::cuda::device_available(); }
};
#endif

/// Whether the backend under test can run here (a CUDA build without a device skips its cases).
inline bool backend_available() { return backend_traits<backend_under_test>::available(); }

#define COMPACT_TEST_ON_DEVICE *doctest::skip(!::compact_test::backend_available())

/// A precondition of these helpers, reported only when it fails (so it adds nothing to the assertion
/// count of a passing run).
#define COMPACT_TEST_EXPECT(condition)                                                                     \
    do {                                                                                                   \
        if (!(condition)) FAIL("backend_under_test.hpp: " #condition);                                     \
    } while (false)

/// `count` elements of T in the backend's memory.
template <class Backend, class T>
class device_array {
public:
    device_array() = default;
    explicit device_array(std::size_t count) : storage_(backend_traits<Backend>::template allocate<T>(count)) {}

    T* data() noexcept { return storage_.data(); }
    const T* data() const noexcept { return storage_.data(); }
    std::size_t size() const noexcept { return storage_.size(); }

    /// The first rows * cols elements as a dense (rows, cols) view.
    compact::matrix_view<T> view(index_t rows, index_t cols)
    {
        COMPACT_TEST_EXPECT(static_cast<std::size_t>(rows * cols) <= size());
        return compact::make_view(data(), rows, cols);
    }
    compact::const_matrix_view<T> cview(index_t rows, index_t cols) const
    {
        COMPACT_TEST_EXPECT(static_cast<std::size_t>(rows * cols) <= size());
        return compact::const_matrix_view<T>(data(), rows, cols);
    }

private:
    typename backend_traits<Backend>::template storage<T> storage_;
};

/// A (rows, cols) matrix with leading dimension ld in the backend's memory, padding included.
template <class Backend, class T>
struct device_matrix {
    index_t rows = 0, cols = 0, ld = 0;
    device_array<Backend, T> storage;

    device_matrix() = default;
    device_matrix(index_t r, index_t c, index_t l) : rows(r), cols(c), ld(l), storage(static_cast<std::size_t>(r * l)) {}

    compact::matrix_view<T> view() { return {storage.data(), rows, cols, ld}; }
    compact::const_matrix_view<T> cview() const { return {storage.data(), rows, cols, ld}; }
};

/// A test's context on `Backend` and the copies between its memory and the host.
template <class Backend>
class device {
public:
    using context = typename Backend::context;

    const context& ctx() const noexcept { return owner_.get(); }
    /// Waits for everything launched on ctx()'s stream.
    void synchronize() const { owner_.synchronize(); }

    template <class T>
    device_array<Backend, T> upload(const std::vector<T>& host) const
    {
        device_array<Backend, T> d(host.size());
        backend_traits<Backend>::copy_in(d.data(), host.data(), host.size());
        return d;
    }

    /// A copy of `host`, its padding (NaN) included, so that padding_intact() still tells after download.
    template <class T>
    device_matrix<Backend, T> upload(const host_matrix<T>& host) const
    {
        device_matrix<Backend, T> d(host.rows, host.cols, host.ld);
        backend_traits<Backend>::copy_in(d.storage.data(), host.data.data(), host.data.size());
        return d;
    }

    /// Overwrites an existing device copy with `host` (same size), after the stream's pending work.
    template <class T>
    void upload_to(device_array<Backend, T>& d, const std::vector<T>& host) const
    {
        COMPACT_TEST_EXPECT(d.size() == host.size());
        synchronize(); // kernels still reading the old contents
        backend_traits<Backend>::copy_in(d.data(), host.data(), host.size());
    }
    template <class T>
    void upload_to(device_matrix<Backend, T>& d, const host_matrix<T>& host) const
    {
        COMPACT_TEST_EXPECT(d.rows == host.rows && d.cols == host.cols && d.ld == host.ld);
        synchronize();
        backend_traits<Backend>::copy_in(d.storage.data(), host.data.data(), host.data.size());
    }

    template <class T>
    std::vector<T> download(const device_array<Backend, T>& d) const
    {
        synchronize();
        std::vector<T> host(d.size());
        backend_traits<Backend>::copy_out(host.data(), d.data(), d.size());
        return host;
    }

    template <class T>
    host_matrix<T> download(const device_matrix<Backend, T>& d) const
    {
        synchronize();
        host_matrix<T> host(d.rows, d.cols, d.ld - d.cols);
        backend_traits<Backend>::copy_out(host.data.data(), d.storage.data(), host.data.size());
        return host;
    }

    /// The elements of any view of the backend's memory, dense row-major (rows * cols values).
    template <class T>
    std::vector<std::remove_const_t<T>> read(compact::matrix_view<T> v) const
    {
        synchronize();
        std::vector<std::remove_const_t<T>> host(static_cast<std::size_t>(v.rows * v.cols));
        for (index_t i = 0; i < v.rows; ++i)
            backend_traits<Backend>::copy_out(host.data() + i * v.cols, v.data + i * v.ld,
                                              static_cast<std::size_t>(v.cols));
        return host;
    }

    /// `count` elements at a device pointer (a layer's bias, say).
    template <class T>
    std::vector<T> read(const T* p, std::size_t count) const
    {
        synchronize();
        std::vector<T> host(count);
        backend_traits<Backend>::copy_out(host.data(), p, count);
        return host;
    }

    /// Writes dense row-major `host` (rows * cols values) into a view of the backend's memory.
    template <class T>
    void write(compact::matrix_view<T> v, const std::vector<T>& host) const
    {
        COMPACT_TEST_EXPECT(host.size() == static_cast<std::size_t>(v.rows * v.cols));
        synchronize();
        for (index_t i = 0; i < v.rows; ++i)
            backend_traits<Backend>::copy_in(v.data + i * v.ld, host.data() + i * v.cols,
                                             static_cast<std::size_t>(v.cols));
    }

    /// Caller-owned workspace of `bytes` bytes in the backend's memory.
    struct workspace_memory {
        device_array<Backend, unsigned char> bytes;
        compact::workspace get() { return {bytes.data(), bytes.size()}; }
    };
    workspace_memory workspace(std::size_t bytes) const { return {device_array<Backend, unsigned char>(bytes)}; }

private:
    typename backend_traits<Backend>::owner owner_;
};

} // namespace compact_test
