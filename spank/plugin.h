// spank/plugin.h — state shared by the plugin's files: the administrator's configuration and the
// user's options as the option callbacks saw them. One plugin instance per process.
#pragma once

extern "C" {
#include <slurm/spank.h>
}

#include <string>

#include "tresor/slurm/job.h"

namespace tresor::spank {

struct State {
  tresor::slurm::PluginConfig config;
  tresor::slurm::JobOptions options;
  std::vector<std::string> recipient_args;  // as given (RECIPIENT or @FILE), read on the submit side
  bool config_ok = false;
};
State& state();

/// Submit side (sbatch, salloc: allocator context; srun: local context): check the options,
/// sign the manifest, put it into the job's environment. 0 or -1 (the submission fails).
int submit(spank_t sp);
/// Remote side (slurmstepd, task_init as the job's user): exec tresor-run with the job's argv
/// and environment. Returns only on failure (-1).
int exec_runner(spank_t sp);
/// Remote side, as root before the task drops privileges (task_init_privileged): starts the
/// job's evidence server — a root process holding the sim secure processor's key, which the job's
/// user must not read — on a socket whose other end the runner inherits (TRESOR_EVIDENCE_FD).
int start_evidence_server(spank_t sp);
/// Remote side, as root (task_init_privileged), for a libvirt-backend task: starts the job's VM
/// keeper (`tresor-run --vm-keeper`, runner/keeper.h), which starts the VM with libvirt's
/// privileges while the task runs as the job's user; the runner inherits the other end of its
/// socket (TRESOR_VM_FD). Only the node's configuration and the task's Slurm variables and
/// manifest reach it: nothing else of the user's environment goes into a root process.
int start_vm_keeper(spank_t sp);
/// slurmd's epilog (as root): removes what a killed runner left of the job's sandbox on the host
/// (its empty mount point /tmp/tresor-job-<job id>-*). Never fails the job: 0.
int cleanup_after_job(spank_t sp);

}  // namespace tresor::spank
