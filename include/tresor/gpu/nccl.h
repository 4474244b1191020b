// tresor/gpu/nccl.h — collectives over GPU memory for data-parallel training on GPUs (issue 9,
// docs/training.md §5): NCCL, one rank per GPU. The ranks find each other through any CPU
// Collective (the TCP one between the processes of a Slurm step): rank 0 draws NCCL's unique id
// and broadcasts it — NCCL's own recommended bootstrap ("ncclGetUniqueId … broadcast to all
// ranks", NCCL's documentation, "Creating a communicator").
//
// NCCL's reductions are not added in rank order as the CPU backends' are: their order is fixed by
// NCCL's algorithm for a given topology and size (the same on every rank and from run to run on
// the same machine), so GPU and CPU data parallelism agree to float rounding, not bit for bit.
#pragma once

#include <array>
#include <chrono>
#include <cstddef>
#include <functional>
#include <memory>
#include <string>

#include "tresor/error.h"
#include "tresor/train/collective.h"

namespace tresor::gpu {

class DeviceCollective {
 public:
  virtual ~DeviceCollective() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual int device() const = 0;
  /// True when the collective works on host memory (a test's stand-in on the emulated backend);
  /// false for NCCL, which needs CUDA device memory. The trainer refuses a mismatch.
  virtual bool host_memory() const = 0;
  /// Sums `count` floats at `d_data` (this rank's GPU's memory) over the ranks, in place, queued on
  /// `stream` (a cudaStream_t; nullptr: the default stream). Every rank makes the same calls in
  /// the same order. kUnavailable names NCCL's error.
  [[nodiscard]] virtual Result<void> all_reduce_sum(float* d_data, size_t count, void* stream) = 0;
  /// `root`'s `count` floats at `d_data` to every rank.
  [[nodiscard]] virtual Result<void> broadcast(float* d_data, size_t count, int root, void* stream) = 0;
  /// Waits until the work queued on `stream` (the collectives above included) is done, watching
  /// for a failure elsewhere meanwhile: a collective whose peer died or whose network failed never
  /// finishes, and a plain stream synchronisation would wait for ever. NCCL: polls the stream and
  /// ncclCommGetAsyncError; on an asynchronous error, or when the work has not finished within the
  /// communicator's timeout, aborts the communicator (every later call fails) and returns
  /// kUnavailable saying which.
  [[nodiscard]] virtual Result<void> wait(void* stream) = 0;
};

/// An NCCL operation in progress as one look at it reports (ncclCommGetAsyncError on a
/// non-blocking communicator, and the stream of a queued collective): still running, finished, or
/// failed with NCCL's or CUDA's text.
struct NcclProgress {
  enum class State { kRunning, kDone, kFailed };
  State state = State::kRunning;
  std::string error;
};
/// The clock and the pause of await_nccl: steady time in seconds and a sleep. Real by default; the
/// tests' fake advances its own time instead of sleeping.
struct NcclWaiting {
  std::function<double()> now;
  std::function<void(std::chrono::microseconds)> pause;
  [[nodiscard]] static NcclWaiting real();
};
/// Looks at an operation with `poll` until it reports done ({}), with pauses from 20 µs doubling
/// to 5 ms between looks. On failure (poll's own error included), or when `timeout_s` has passed
/// without an answer, calls `give_up` once (NCCL: ncclCommAbort, which frees the communicator and
/// ends its kernels) and returns kUnavailable naming `what`: "nccl: <what> failed on rank R: …" or
/// "nccl: <what> did not finish within T s on rank R (…); the communicator was aborted".
[[nodiscard]] Result<void> await_nccl(const std::function<Result<NcclProgress>()>& poll, double timeout_s, const std::string& what, int rank,
                                      const std::function<void()>& give_up, const NcclWaiting& waiting = NcclWaiting::real());

/// NCCL's unique id (128 bytes) from rank 0 to every rank of `bootstrap`: rank 0 passes its id,
/// the others receive it into theirs (byte by byte as floats 0..255, which the CPU collectives
/// carry exactly).
[[nodiscard]] Result<void> share_unique_id(tresor::train::Collective& bootstrap, std::array<std::byte, 128>& id);

/// Whether this build has NCCL.
bool nccl_built();

/// One rank per GPU over the ranks of `bootstrap`, this rank on CUDA device `device` (Slurm:
/// SLURM_LOCALID). kUnavailable when the build has no NCCL, no such device exists, or NCCL fails
/// (its error named); every rank must call it. `timeout_s` bounds the communicator's creation (a
/// rank that never joins: NCCL's non-blocking creation, watched by await_nccl and aborted) and
/// each wait() (a training step's gradient all-reduce).
[[nodiscard]] Result<std::unique_ptr<DeviceCollective>> connect_nccl(tresor::train::Collective& bootstrap, int device, double timeout_s = 600);

}  // namespace tresor::gpu
