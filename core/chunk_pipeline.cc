#include "chunk_pipeline.h"

#include "spin.h"

namespace tresor::sealed::detail {

using tresor::detail::spin_until;

ChunkPipeline::ChunkPipeline(std::vector<crypto::AesGcm> ciphers, unsigned workers, size_t slots, Job job)
    : ciphers_(std::move(ciphers)), job_(std::move(job)), state_(slots), result_(slots) {
  for (auto& s : state_) s.store(kIdle, std::memory_order_relaxed);
  for (unsigned w = 0; w < workers; ++w) workers_.emplace_back([this, w] { worker_loop(w); });
}

ChunkPipeline::~ChunkPipeline() {
  {
    std::lock_guard lock(mu_);
    stop_ = true;
  }
  work_cv_.notify_all();
  workers_.clear();  // joins; queued jobs are dropped (their slots are never waited for)
}

void ChunkPipeline::submit(size_t slot) {
  if (workers_.empty()) {
    auto r = job_(slot, caller_cipher());
    result_[slot] = r ? std::nullopt : std::optional<Error>(r.error());
    state_[slot].store(kDone, std::memory_order_release);
    return;
  }
  state_[slot].store(kQueued, std::memory_order_relaxed);
  {
    std::lock_guard lock(mu_);
    queue_.push_back(slot);
    queued_.store(queue_.size(), std::memory_order_release);
  }
  work_cv_.notify_one();
}

Result<void> ChunkPipeline::wait(size_t slot) {
  auto done = [&] { return state_[slot].load(std::memory_order_acquire) == kDone; };
  if (!spin_until(done)) {
    std::unique_lock lock(mu_);
    done_cv_.wait(lock, done);
  }
  state_[slot].store(kIdle, std::memory_order_relaxed);
  if (result_[slot]) {
    Error e = std::move(*result_[slot]);
    result_[slot].reset();
    return std::unexpected(std::move(e));
  }
  return {};
}

void ChunkPipeline::drain() {
  for (size_t s = 0; s < state_.size(); ++s) {
    if (state_[s].load(std::memory_order_acquire) == kQueued) (void)wait(s);
  }
}

void ChunkPipeline::worker_loop(size_t worker) {
  for (;;) {
    size_t slot = 0;
    {
      auto has_work = [&] { return stop_ || !queue_.empty(); };
      if (!spin_until([&] { return queued_.load(std::memory_order_acquire) > 0; })) {
        std::unique_lock lock(mu_);
        work_cv_.wait(lock, has_work);
      }
      std::lock_guard lock(mu_);
      if (stop_) return;
      if (queue_.empty()) continue;  // another worker took it
      slot = queue_.front();
      queue_.pop_front();
      queued_.store(queue_.size(), std::memory_order_release);
    }
    auto r = job_(slot, ciphers_[worker]);
    result_[slot] = r ? std::nullopt : std::optional<Error>(r.error());
    {
      // Under the lock, so that a waiter between its check and its sleep cannot miss the wake-up.
      std::lock_guard lock(mu_);
      state_[slot].store(kDone, std::memory_order_release);
    }
    done_cv_.notify_all();
  }
}

}  // namespace tresor::sealed::detail
