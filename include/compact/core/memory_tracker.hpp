// compact/core/memory_tracker.hpp: exact peak memory by category, for trainers and owning wrappers.
//
// Peak resident memory (VmHWM) says how much a process touched, not what it was for. A trainer that
// allocates through tracking_allocator, each buffer under the category it belongs to, learns from its
// memory_tracker the bytes live in each category now, each category's own peak, the peak of the total,
// and how that total peak was made up:
//
//   compact::memory_tracker tracker;
//   using tracked = std::vector<float, compact::tracking_allocator<float>>;
//   tracked w(m * n, 0.0f, {tracker, compact::memory_category::weights});
//   tracked saved(saved_bytes / sizeof(float), 0.0f, {tracker, compact::memory_category::saved});
//   ...
//   tracker.peak_total();                                  // bytes at the worst moment
//   tracker.at_peak()[compact::index(memory_category::saved)]; // what backward's inputs took then
//
// Counts are of the bytes requested (the allocator's 64-byte alignment may add up to 63 per buffer,
// which is not counted). The tracker is thread-safe (one mutex; allocation is never on compact's hot
// path) and must outlive every allocator that points at it. Nothing here allocates by itself.
#pragma once

#include "compact/core/config.hpp"
#include "compact/core/error.hpp"

#include <array>
#include <cstddef>
#include <mutex>
#include <new>

COMPACT_NAMESPACE_BEGIN

/// What a buffer is for. The first six are the parts of a training step's memory; `other` is the rest.
enum class memory_category : unsigned {
    weights,          ///< parameters (and master copies)
    gradients,        ///< parameter gradients, full-shape or subspace
    optimizer_state,  ///< AdamW moments
    saved,            ///< kept by forward for backward (activations, compressed or not, masks)
    compressor_state, ///< kept by compressors between steps (VeLoRA's direction, WTA-CRS's norms)
    scratch,          ///< reused within a step: workspaces, buffers that backward overwrites
    other,
};

inline constexpr std::size_t memory_category_count = 7;

/// The category's position in at_peak() and the other arrays.
constexpr std::size_t index(memory_category c) noexcept { return static_cast<std::size_t>(c); }

/// "weights", "gradients", "optimizer state", "saved for backward", "compressor state", "scratch", "other".
constexpr const char* to_string(memory_category c) noexcept
{
    switch (c) {
    case memory_category::weights: return "weights";
    case memory_category::gradients: return "gradients";
    case memory_category::optimizer_state: return "optimizer state";
    case memory_category::saved: return "saved for backward";
    case memory_category::compressor_state: return "compressor state";
    case memory_category::scratch: return "scratch";
    case memory_category::other: return "other";
    }
    return "unknown";
}

/// Bytes live per category, each category's peak, the total's peak and its make-up at that moment.
class memory_tracker {
public:
    using counts = std::array<std::size_t, memory_category_count>;

    memory_tracker() = default;
    memory_tracker(const memory_tracker&) = delete;
    memory_tracker& operator=(const memory_tracker&) = delete;

    /// Records `bytes` more live in `c`.
    void allocate(memory_category c, std::size_t bytes)
    {
        const std::size_t k = checked_index(c, "memory_tracker::allocate");
        std::lock_guard<std::mutex> lock(mutex_);
        current_[k] += bytes;
        total_ += bytes;
        if (current_[k] > peak_[k]) peak_[k] = current_[k];
        if (total_ > peak_total_) peak_total_ = total_, at_peak_ = current_;
    }

    /// Records `bytes` of `c` freed; more than is live in `c` is an error (a buffer freed twice, or
    /// under another category than it was allocated in).
    void release(memory_category c, std::size_t bytes)
    {
        const std::size_t k = checked_index(c, "memory_tracker::release");
        std::lock_guard<std::mutex> lock(mutex_);
        COMPACT_REQUIRE(bytes <= current_[k], "memory_tracker::release", "releasing ", bytes, " bytes of ",
                        to_string(c), " but only ", current_[k], " are live");
        current_[k] -= bytes;
        total_ -= bytes;
    }

    std::size_t current(memory_category c) const { return read(current_, c); }
    std::size_t peak(memory_category c) const { return read(peak_, c); }
    std::size_t current_total() const
    {
        std::lock_guard<std::mutex> lock(mutex_);
        return total_;
    }
    std::size_t peak_total() const
    {
        std::lock_guard<std::mutex> lock(mutex_);
        return peak_total_;
    }
    /// Each category's live bytes at the moment the total peaked (they sum to peak_total()).
    counts at_peak() const
    {
        std::lock_guard<std::mutex> lock(mutex_);
        return at_peak_;
    }

    /// Starts measuring peaks afresh from what is live now (for example after setting up, before training).
    void reset_peaks()
    {
        std::lock_guard<std::mutex> lock(mutex_);
        peak_ = current_;
        peak_total_ = total_;
        at_peak_ = current_;
    }

private:
    static std::size_t checked_index(memory_category c, const char* where)
    {
        const std::size_t k = index(c);
        COMPACT_REQUIRE(k < memory_category_count, where, "category ", k, " is not a memory_category");
        return k;
    }
    std::size_t read(const counts& values, memory_category c) const
    {
        const std::size_t k = checked_index(c, "memory_tracker");
        std::lock_guard<std::mutex> lock(mutex_);
        return values[k];
    }

    mutable std::mutex mutex_;
    counts current_{}, peak_{}, at_peak_{};
    std::size_t total_ = 0, peak_total_ = 0;
};

/// A standard allocator (64-byte aligned, as the CPU backend's buffers) that counts what it holds in a
/// memory_tracker under one category. Containers copy it with the tracker and category; two compare
/// equal when they count into the same tracker and category (memory from one may be freed by the other).
template <class T>
class tracking_allocator {
public:
    using value_type = T;
    static constexpr std::align_val_t alignment{64};

    tracking_allocator(memory_tracker& tracker, memory_category category) noexcept
        : tracker_(&tracker), category_(category)
    {
    }
    template <class U>
    tracking_allocator(const tracking_allocator<U>& other) noexcept : tracker_(&other.tracker()), category_(other.category())
    {
    }

    T* allocate(std::size_t n)
    {
        COMPACT_REQUIRE(n <= static_cast<std::size_t>(-1) / sizeof(T), "tracking_allocator::allocate", n,
                        " elements of ", sizeof(T), " bytes overflow size_t");
        T* p = static_cast<T*>(::operator new(n * sizeof(T), alignment));
        try {
            tracker_->allocate(category_, n * sizeof(T));
        } catch (...) {
            ::operator delete(p, alignment);
            throw;
        }
        return p;
    }
    void deallocate(T* p, std::size_t n) noexcept
    {
        // release() throws only for bytes that were never counted, which allocate() rules out.
        try {
            tracker_->release(category_, n * sizeof(T));
        } catch (...) {
        }
        ::operator delete(p, alignment);
    }

    memory_tracker& tracker() const noexcept { return *tracker_; }
    memory_category category() const noexcept { return category_; }

    template <class U>
    bool operator==(const tracking_allocator<U>& other) const noexcept
    {
        return tracker_ == &other.tracker() && category_ == other.category();
    }
    template <class U>
    bool operator!=(const tracking_allocator<U>& other) const noexcept
    {
        return !(*this == other);
    }

private:
    memory_tracker* tracker_;
    memory_category category_;
};

COMPACT_NAMESPACE_END
