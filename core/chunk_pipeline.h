// ChunkPipeline: the worker side of the streaming writer and reader. The caller fills slots in
// order (reading its source) and submits each; workers seal or open slots concurrently; the
// caller waits for slots in the same order and writes them out. Copying in and out on the
// caller's thread overlaps with the cryptography on the workers, and memory stays at the slots.
// Private to core/.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <deque>
#include <functional>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include "tresor/crypto.h"
#include "tresor/error.h"

namespace tresor::sealed::detail {

class ChunkPipeline {
 public:
  /// job(slot, cipher) does the work of one slot with the calling worker's cipher. With
  /// `workers` == 0 submit() runs the job at once on the caller's thread.
  using Job = std::function<Result<void>(size_t slot, crypto::AesGcm& cipher)>;
  ChunkPipeline(std::vector<crypto::AesGcm> ciphers, unsigned workers, size_t slots, Job job);
  ~ChunkPipeline();
  ChunkPipeline(const ChunkPipeline&) = delete;
  ChunkPipeline& operator=(const ChunkPipeline&) = delete;

  /// Queues `slot` for its job. The slot must not be queued already.
  void submit(size_t slot);
  /// Waits until `slot`'s job has run and returns its result. The slot is idle afterwards.
  [[nodiscard]] Result<void> wait(size_t slot);
  /// Waits for every queued slot (used before buffers go away on an error path).
  void drain();
  /// The cipher of the caller's thread (for inline jobs and diagnosis).
  crypto::AesGcm& caller_cipher() { return ciphers_.back(); }

 private:
  enum State : int { kIdle = 0, kQueued = 1, kDone = 2 };
  void worker_loop(size_t worker);

  std::vector<crypto::AesGcm> ciphers_;  // one per worker, plus one for the caller
  Job job_;
  std::vector<std::atomic<int>> state_;
  std::vector<std::optional<Error>> result_;
  std::mutex mu_;
  std::condition_variable work_cv_;
  std::condition_variable done_cv_;
  std::deque<size_t> queue_;
  std::atomic<size_t> queued_{0};  // queue_.size(), readable without the lock for spinning
  bool stop_ = false;
  std::vector<std::jthread> workers_;
};

}  // namespace tresor::sealed::detail
