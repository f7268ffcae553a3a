// Tests for compact/core/memory_tracker.hpp: per-category live and peak bytes, the total's peak and its
// make-up, and tracking_allocator under standard containers.
#include "reference.hpp"

#include <compact/core/memory_tracker.hpp>

#include <doctest/doctest.h>

#include <cstddef>
#include <cstdint>
#include <map>
#include <thread>
#include <vector>

namespace {

using compact::memory_category;
using compact::memory_tracker;
using compact::tracking_allocator;
using compact_test::contains;
using compact_test::error_message_of;

template <class T>
using tracked = std::vector<T, tracking_allocator<T>>;

TEST_CASE("memory_tracker: live bytes, per-category peaks and the total's peak with its make-up")
{
    memory_tracker t;
    t.allocate(memory_category::weights, 100);
    t.allocate(memory_category::saved, 400);
    t.release(memory_category::saved, 400); // forward's saved tensors freed by backward
    t.allocate(memory_category::scratch, 300);
    CHECK(t.current(memory_category::weights) == 100);
    CHECK(t.current(memory_category::saved) == 0);
    CHECK(t.peak(memory_category::saved) == 400);
    CHECK(t.current_total() == 400);
    CHECK(t.peak_total() == 500);
    const auto at = t.at_peak();
    CHECK(at[compact::index(memory_category::weights)] == 100);
    CHECK(at[compact::index(memory_category::saved)] == 400);
    CHECK(at[compact::index(memory_category::scratch)] == 0);
    std::size_t sum = 0;
    for (std::size_t bytes : at) sum += bytes;
    CHECK(sum == t.peak_total());

    t.reset_peaks();
    CHECK(t.peak_total() == 400);
    CHECK(t.peak(memory_category::saved) == 0);
    CHECK(t.at_peak()[compact::index(memory_category::scratch)] == 300);
}

TEST_CASE("memory_tracker: releasing more than is live names the category and the counts")
{
    memory_tracker t;
    t.allocate(memory_category::gradients, 64);
    const std::string message = error_message_of([&] { t.release(memory_category::gradients, 65); });
    CHECK(contains(message, "memory_tracker::release"));
    CHECK(contains(message, "gradients"));
    CHECK(contains(message, "65"));
    CHECK(contains(message, "64"));
    CHECK(t.current(memory_category::gradients) == 64); // nothing changed
    CHECK(contains(error_message_of([&] { t.allocate(static_cast<memory_category>(9), 1); }), "not a memory_category"));
}

TEST_CASE("tracking_allocator: containers count exactly what they hold, aligned to 64 bytes, and give it back")
{
    memory_tracker t;
    {
        tracked<float> w(1000, 0.0f, {t, memory_category::weights});
        tracked<double> m(10, 0.0, {t, memory_category::optimizer_state});
        CHECK(reinterpret_cast<std::uintptr_t>(w.data()) % 64 == 0);
        CHECK(reinterpret_cast<std::uintptr_t>(m.data()) % 64 == 0);
        CHECK(t.current(memory_category::weights) == 4000);
        CHECK(t.current(memory_category::optimizer_state) == 80);
        tracked<float> copy = w; // the copy counts under the same tracker and category
        CHECK(t.current(memory_category::weights) == 8000);
        tracked<float> moved = std::move(copy);
        CHECK(t.current(memory_category::weights) == 8000);
        w.clear();
        w.shrink_to_fit();
        CHECK(t.current(memory_category::weights) == 4000);
    }
    CHECK(t.current_total() == 0);
    CHECK(t.peak_total() == 8080);

    // Rebinding (as node containers do) keeps tracker and category.
    std::map<int, int, std::less<int>, tracking_allocator<std::pair<const int, int>>> nodes(
        tracking_allocator<std::pair<const int, int>>(t, memory_category::other));
    nodes[1] = 2;
    CHECK(t.current(memory_category::other) > 0);
    nodes.clear();
    CHECK(t.current(memory_category::other) == 0);

    const tracking_allocator<float> a(t, memory_category::saved), b(t, memory_category::scratch);
    CHECK(a != b);
    CHECK(a == tracking_allocator<double>(a));
}

TEST_CASE("memory_tracker: concurrent allocations from several threads add up exactly")
{
    memory_tracker t;
    std::vector<std::thread> threads;
    for (int k = 0; k < 4; ++k)
        threads.emplace_back([&] {
            for (int i = 0; i < 1000; ++i) {
                t.allocate(memory_category::scratch, 16);
                t.release(memory_category::scratch, 8);
            }
        });
    for (auto& th : threads) th.join();
    CHECK(t.current(memory_category::scratch) == 4 * 1000 * 8);
    CHECK(t.peak_total() >= 4 * 1000 * 8);
    CHECK(t.peak_total() <= 4 * 1000 * 8 + 4 * 8);
}

} // namespace
