// tresor/thread_pool.h — a fixed pool of worker threads for data-parallel loops.
#pragma once

#include <atomic>
#include <cstdint>
#include <condition_variable>
#include <cstddef>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace tresor {

/// ThreadPool runs parallel_for loops on `threads` threads (the caller counts as one of them).
/// One loop at a time; parallel_for blocks until every index has run. Not re-entrant.
/// Idle workers spin briefly before sleeping, so that back-to-back loops (one per batch of
/// chunks) do not pay a futex wake-up each: that cost is tens of microseconds per loop.
class ThreadPool {
 public:
  /// threads == 0 means std::thread::hardware_concurrency().
  explicit ThreadPool(unsigned threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  unsigned size() const { return size_; }
  /// Calls fn(i) for every i in [0, n), spread over the pool. fn must not throw.
  void parallel_for(size_t n, const std::function<void(size_t)>& fn);

  /// Resolves a user thread count (0 = all cores) to a positive number.
  static unsigned resolve(unsigned threads);

 private:
  void worker_loop();
  void run_indices(uint32_t generation);

  unsigned size_;
  std::vector<std::jthread> workers_;
  std::mutex mu_;
  std::condition_variable work_cv_;
  std::condition_variable done_cv_;
  const std::function<void(size_t)>* fn_ = nullptr;
  // generation (32 bits) | loop size (16 bits) | next index (16 bits). A thread claims an index
  // only by a compare-exchange on the whole ticket, within the loop it joined and below that
  // loop's size, so a thread still leaving one loop never takes an index of the next.
  std::atomic<uint64_t> ticket_{0};
  std::atomic<size_t> finished_{0};
  std::atomic<uint32_t> generation_{0};
  std::atomic<bool> stop_{false};
};

}  // namespace tresor
