// tresor/slurm/ranks.h — a Slurm step's task layout as its environment gives it: which rank this
// task is, how many there are, on how many nodes, and the step's id. Read by the trainer (its
// data-parallel ranks, docs/training.md §5) and by the agent (the rank it claims for the step's
// roster, docs/protocol.md §13).
#pragma once

#include <functional>
#include <optional>
#include <string>

#include "tresor/error.h"

namespace tresor::slurm {

/// The data-parallel layout of this process from Slurm's environment: SLURM_PROCID (the rank),
/// SLURM_NTASKS (the ranks), SLURM_LOCALID (the rank on its node, which picks the GPU),
/// SLURM_NNODES, SLURM_JOB_ID and SLURM_STEP_ID (the run id). nullopt outside a Slurm step, for a
/// step of one task and for the batch script (no SLURM_STEP_ID, or the batch step's 4294967294)
/// and salloc's interactive step (4294967293): one task, though SLURM_NTASKS there is the
/// allocation's; kInvalidArgument names a variable that is malformed or inconsistent.
struct SlurmRanks {
  int rank = 0, size = 1, local_rank = 0, nodes = 1;
  std::string run_id;  // "JOB.STEP"
};
using GetEnv = std::function<const char*(const char*)>;
[[nodiscard]] Result<std::optional<SlurmRanks>> ranks_from_slurm(const GetEnv& getenv);

}  // namespace tresor::slurm
