// tresor/train/collective.h — the collectives data-parallel training needs (issue 9,
// docs/training.md §5), behind one interface: NCCL on GPUs (to come), and a CPU backend in which
// the ranks are threads of one process sharing memory, so that multi-rank semantics are tested on
// machines without GPUs.
#pragma once

#include <memory>
#include <span>

#include "tresor/error.h"

namespace tresor::train {

class Collective {
 public:
  virtual ~Collective() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  /// Every rank's `data` becomes the element-wise sum over ranks, added in rank order (0, 1, …),
  /// so the result is the same on every rank and does not depend on timing. All ranks must call
  /// it with the same length (kInvalidArgument on every rank otherwise).
  [[nodiscard]] virtual Result<void> all_reduce_sum(std::span<float> data) = 0;
  /// Every rank's `data` becomes `root`'s.
  [[nodiscard]] virtual Result<void> broadcast(std::span<float> data, int root) = 0;
};

/// A group of `size` ranks in one process (one thread per rank). member(r) may be called once per
/// rank (kInvalidArgument otherwise, or for a rank outside the group); each member must be used
/// from its own thread, and all members must make the same calls in the same order (like any
/// collective library).
class SharedMemoryGroup {
 public:
  [[nodiscard]] static Result<std::shared_ptr<SharedMemoryGroup>> create(int size);
  [[nodiscard]] virtual Result<std::unique_ptr<Collective>> member(int rank) = 0;
  virtual ~SharedMemoryGroup() = default;
};

}  // namespace tresor::train
