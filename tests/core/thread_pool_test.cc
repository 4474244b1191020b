// ThreadPool: every index of every loop runs exactly once, on any thread count, including loops
// issued back to back with short-lived callables (a thread still leaving one loop must never run
// an index of the next). Run under TSan by scripts/test.
#include <gtest/gtest.h>

#include <atomic>
#include <memory>
#include <vector>

#include "tresor/thread_pool.h"

namespace tresor {
namespace {

TEST(ThreadPool, EveryIndexRunsExactlyOncePerLoop) {
  for (unsigned threads : {1u, 2u, 3u, 8u}) {
    ThreadPool pool(threads);
    EXPECT_EQ(pool.size(), threads);
    for (size_t n : {size_t{0}, size_t{1}, size_t{2}, size_t{7}, size_t{64}, size_t{1000}}) {
      for (int round = 0; round < 50; ++round) {
        // A fresh counter array per loop, destroyed right after it: stale accesses show up as
        // wrong counts here and as use-after-free under ASan.
        auto counts = std::make_unique<std::atomic<int>[]>(n + 1);
        pool.parallel_for(n, [&](size_t i) { counts[i].fetch_add(1, std::memory_order_relaxed); });
        for (size_t i = 0; i < n; ++i) ASSERT_EQ(counts[i].load(), 1) << "threads " << threads << " n " << n << " i " << i;
        ASSERT_EQ(counts[n].load(), 0);
      }
    }
  }
}

TEST(ThreadPool, UsesMoreThanTheCallingThread) {
  ThreadPool pool(2);
  std::atomic<int> others{0};
  const auto self = std::this_thread::get_id();
  for (int round = 0; round < 200; ++round) {
    pool.parallel_for(2, [&](size_t) {
      if (std::this_thread::get_id() != self) others.fetch_add(1);
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    });
  }
  EXPECT_GT(others.load(), 0) << "the workers never ran an index";
}

TEST(ThreadPool, ResolveZeroMeansAllCores) {
  EXPECT_GE(ThreadPool::resolve(0), 1u);
  EXPECT_EQ(ThreadPool::resolve(5), 5u);
}

}  // namespace
}  // namespace tresor
