#include "tresor/thread_pool.h"

#include <algorithm>

#include "spin.h"

namespace tresor {
namespace {

using detail::spin_until;
constexpr size_t kMaxLoop = 0xffff;

}  // namespace

unsigned ThreadPool::resolve(unsigned threads) {
  if (threads != 0) return threads;
  const unsigned hc = std::thread::hardware_concurrency();
  return hc == 0 ? 1 : hc;
}

ThreadPool::ThreadPool(unsigned threads) : size_(resolve(threads)) {
  for (unsigned i = 1; i < size_; ++i) workers_.emplace_back([this] { worker_loop(); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard lock(mu_);
    stop_ = true;
  }
  work_cv_.notify_all();
  workers_.clear();  // joins
}

void ThreadPool::run_indices(uint32_t generation) {
  for (;;) {
    uint64_t t = ticket_.load(std::memory_order_acquire);
    size_t i = 0;
    size_t n = 0;
    for (;;) {
      if ((t >> 32) != generation) return;  // that loop is over
      i = static_cast<size_t>(t & 0xffffu);
      n = static_cast<size_t>((t >> 16) & 0xffffu);
      if (i >= n) return;  // every index of this loop is taken
      if (ticket_.compare_exchange_weak(t, t + 1, std::memory_order_acq_rel, std::memory_order_acquire)) break;
    }
    (*fn_)(i);
    // After this increment the loop may end and the next one rewrite fn_ and n_: use the local n.
    if (finished_.fetch_add(1, std::memory_order_acq_rel) + 1 == n) {
      std::lock_guard lock(mu_);
      done_cv_.notify_all();
    }
  }
}

void ThreadPool::worker_loop() {
  uint32_t seen = 0;
  for (;;) {
    auto has_work = [&] { return stop_.load(std::memory_order_acquire) || generation_.load(std::memory_order_acquire) != seen; };
    if (!spin_until(has_work)) {
      std::unique_lock lock(mu_);
      work_cv_.wait(lock, has_work);
    }
    if (stop_.load(std::memory_order_acquire)) return;
    seen = generation_.load(std::memory_order_acquire);
    run_indices(seen);
  }
}

void ThreadPool::parallel_for(size_t n, const std::function<void(size_t)>& fn) {
  if (n == 0) return;
  if (n > kMaxLoop) {
    // Indices live in 16 bits of the ticket; split larger loops.
    for (size_t base = 0; base < n; base += kMaxLoop) {
      const size_t count = std::min<size_t>(kMaxLoop, n - base);
      parallel_for(count, [&](size_t i) { fn(base + i); });
    }
    return;
  }
  if (size_ == 1 || n == 1) {
    for (size_t i = 0; i < n; ++i) fn(i);
    return;
  }
  uint32_t gen = 0;
  {
    std::lock_guard lock(mu_);
    fn_ = &fn;
    finished_.store(0, std::memory_order_relaxed);
    gen = generation_.load(std::memory_order_relaxed) + 1;
    ticket_.store((uint64_t{gen} << 32) | (uint64_t{n} << 16), std::memory_order_release);
    generation_.store(gen, std::memory_order_release);
  }
  work_cv_.notify_all();
  run_indices(gen);
  auto all_done = [&] { return finished_.load(std::memory_order_acquire) == n; };
  if (!spin_until(all_done)) {
    std::unique_lock lock(mu_);
    done_cv_.wait(lock, all_done);
  }
}

}  // namespace tresor
