// tresor/thread_pool.h — a fixed pool of worker threads for data-parallel loops.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace tresor {

/// ThreadPool runs parallel_for loops on `threads` threads (the caller counts as one of them).
/// One loop at a time; parallel_for blocks until every index has run. Not re-entrant.
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
  void run_indices();

  unsigned size_;
  std::vector<std::jthread> workers_;
  std::mutex mu_;
  std::condition_variable work_cv_;
  std::condition_variable done_cv_;
  const std::function<void(size_t)>* fn_ = nullptr;
  size_t n_ = 0;
  size_t next_ = 0;
  size_t finished_ = 0;
  unsigned generation_ = 0;
  bool stop_ = false;
};

}  // namespace tresor
