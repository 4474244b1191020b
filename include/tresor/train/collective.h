// tresor/train/collective.h — the collectives data-parallel training needs (issue 9,
// docs/training.md §5), behind one interface: NCCL on GPUs (to come), and two CPU backends — ranks
// as threads of one process sharing memory, and ranks as processes on one machine over TCP on
// 127.0.0.1, or across machines over TLS with a roster of attested link keys — so that multi-rank
// semantics are tested on machines without GPUs.
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "tresor/crypto.h"
#include "tresor/error.h"
#include "tresor/roster.h"
#include "tresor/slurm/ranks.h"

namespace tresor::train {

class Collective {
 public:
  virtual ~Collective() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  /// Every rank's `data` becomes the element-wise sum over ranks, added in rank order (0, 1, …),
  /// so the result is the same on every rank and does not depend on timing. All ranks must call
  /// it with the same length and type (kInvalidArgument on every rank otherwise).
  [[nodiscard]] virtual Result<void> all_reduce_sum(std::span<float> data) = 0;
  [[nodiscard]] virtual Result<void> all_reduce_sum(std::span<double> data) = 0;
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

/// The gradient all-reduce overlapped with the backward pass (docs/training.md §5). The flat
/// gradient is cut into buckets of `bucket_elements`; as the backward pass reports parameter arrays
/// final (UNet::backward_into's `ready`), each bucket whose elements are all final is queued, and a
/// communication thread all-reduces the queue in order while the backward pass goes on. finish()
/// queues what is left, waits, and returns the first error. Buckets complete in the same order on
/// every rank because every rank runs the same backward pass; the collective must not be used by
/// anyone else between the first ready() and finish().
class OverlappedAllReduce {
 public:
  OverlappedAllReduce(Collective& collective, std::span<float> grads, size_t bucket_elements);
  ~OverlappedAllReduce();
  OverlappedAllReduce(const OverlappedAllReduce&) = delete;
  OverlappedAllReduce& operator=(const OverlappedAllReduce&) = delete;
  /// grads[offset, offset + count) is final (kept out of range by clamping; an element reported
  /// twice counts once).
  void ready(size_t offset, size_t count);
  [[nodiscard]] Result<void> finish();
  /// How many buckets were queued before finish() (those that overlapped the backward pass).
  size_t buckets_queued_early() const { return early_; }
  size_t buckets() const { return pending_.size(); }

 private:
  struct State;
  Collective& c_;
  std::span<float> grads_;
  size_t bucket_;
  std::vector<size_t> pending_;   // per bucket: elements not yet final
  std::vector<bool> done_;        // per element: reported
  size_t early_ = 0;
  std::unique_ptr<State> state_;
};

/// Where the ranks of one run find each other (docs/training.md §5). Rank 0 listens on an
/// ephemeral port of 127.0.0.1 and writes the port and a fresh 32-byte random token to
/// `directory`/tresor-dp-`run_id`.json (mode 0600, written whole then renamed into place); the
/// other ranks read it, connect and present the token. The file is removed once every rank has
/// joined. The directory must be private to the job's user: whoever can read the token can join.
struct Rendezvous {
  int rank = 0, size = 1;
  std::string directory;
  std::string run_id = "local";        // distinguishes runs sharing the directory (Slurm: job.step)
  int join_timeout_ms = 120'000;       // how long ranks wait for each other to appear
  int io_timeout_ms = 30 * 60'000;     // how long a collective call waits for a silent peer
  /// A peer whose machine is gone (a VM destroyed, a node lost) sends no FIN: TCP keepalive asks
  /// after a link has been idle this long, then 3 times keepalive_s / 3 apart (at least 1 s), and
  /// the call fails naming the peer — within about twice this, instead of io_timeout_ms. A live
  /// peer that only computes for long answers the probes from its kernel: no false alarm.
  int keepalive_s = 30;
  /// Ranks across machines (docs/training.md §5.3): with a roster, no rendezvous file is used;
  /// rank 0 listens on the roster's lead address, and every connection is TLS 1.3 in which both
  /// ends prove the link key the roster lists for their rank. `link_key` is this rank's Ed25519
  /// private key; both must be given together, and `size`/`run_id` must match the roster's.
  std::shared_ptr<const Roster> roster;
  std::shared_ptr<const crypto::Key> link_key;
};

// The step roster and link keys (Roster, parse_roster, roster_text, link_key_text,
// parse_link_key) are in tresor/roster.h: the broker hands rosters out too.
using tresor::link_key_text;
using tresor::parse_link_key;
using tresor::parse_roster;
using tresor::Roster;
using tresor::roster_text;

/// The ranks as processes on one machine over TCP on 127.0.0.1 (the CPU backend of several
/// processes). Every rank sends its buffers to rank 0, which adds them in rank order and sends the
/// result back: the same sums as SharedMemoryGroup, bit for bit. kInvalidArgument for a bad rank,
/// size, directory or run id; kIo when the others do not appear in time (naming the missing ranks
/// or the rendezvous file), when a peer closes its connection or stays silent past io_timeout_ms,
/// and when a rank presents a wrong token (rank 0 reports it and keeps waiting for the real one).
/// With a roster the ranks may be on several machines: the same protocol inside TLS 1.3 links,
/// kAuth when a peer's key is not the one listed for its rank (rank 0 refuses the connection,
/// names it and keeps waiting; a joining rank stops), and kInvalidArgument when the rendezvous and
/// the roster disagree.
[[nodiscard]] Result<std::unique_ptr<Collective>> connect_tcp(const Rendezvous& rendezvous);

// Slurm's rank variables (SLURM_PROCID, SLURM_NTASKS, …) are read by tresor/slurm/ranks.h.
using slurm::GetEnv;
using slurm::SlurmRanks;
using slurm::ranks_from_slurm;

}  // namespace tresor::train
