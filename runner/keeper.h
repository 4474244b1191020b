// runner/keeper.h — the VM keeper: the one part of a libvirt job that needs libvirt's privileges
// (docs/admin-guide.md §9.1, "who starts the VM").
//
// Starting a domain on qemu:///system is as good as root, so the job's user never gets that
// right. The plugin's task_init_privileged (root, before the task drops privileges) starts
// `tresor-run --vm-keeper FD` with the node's configuration and the allocation; the runner, as
// the job's user, holds the other end of FD (TRESOR_VM_FD). A runner that is itself allowed to
// use libvirt (root, `tresor bench launch`, tests) forks its own keeper.
//
// What crosses FD (a SOCK_SEQPACKET pair, one message each):
//   keeper → runner   "ok <create ms> <domain>" with the connected control channel attached
//                     (SCM_RIGHTS), or "error <why>" (then the keeper has cleaned up and exits)
//   runner → keeper   "console"  → the last 8 KiB of the VM's serial console
//                     "destroy"  → the VM destroyed, its runtime directory removed, "destroyed"
//   end of stream     (the runner died) → the same as "destroy", without the reply
// The keeper chooses everything about the VM itself: the image from the catalogue by the signed
// manifest's measurement, CPUs and memory from Slurm's allocation, the dataset shares from the
// configuration. The runner only says when to end it. The keeper ignores SIGTERM/SIGINT/SIGHUP
// (scancel's signals are for the job, through the runner and the channel); SIGKILL at the end
// of the step closes its libvirt connection, and libvirt then destroys the VM (autodestroy).
#pragma once

#include <functional>
#include <map>
#include <string>
#include <string_view>

#include "tresor/error.h"
#include "tresor/manifest.h"
#include "tresor/vm/domain.h"
#include "tresor/vm/job.h"

namespace tresor::runner {

/// The job's VM as this node's configuration makes it. `options` are tresor-run's (--images,
/// --gpus, --datasets, --accel, --snp, --step-bridge); `env` looks up the task's Slurm variables
/// (and TRESOR_STEP_ROSTER: a step's ranks get a NIC on the step bridge, which must exist).
struct VmPlan {
  vm::JobVm job;
  vm::DomainSpec spec;
};
[[nodiscard]] Result<VmPlan> plan_vm(const Manifest& manifest, const std::map<std::string, std::string>& options,
                                     const std::string& slurm_job, const std::function<std::string(std::string_view)>& env);

/// The keeper: starts the planned VM on `hypervisor`, hands the runner the control channel over
/// `fd`, then serves the runner's requests until "destroy" or the end of `fd`. Returns the
/// process's exit code (0, or 1 when the VM could not be started: the runner was told why).
int keep_vm(int fd, VmPlan plan, const std::string& hypervisor);

/// Tells the runner the VM cannot be started, and why (a keeper whose plan failed).
void keeper_refuse(int fd, const std::string& why);

/// The runner's side.
struct StartedVm {
  int control_fd = -1;  // the VM's control channel (owned by the caller)
  double create_ms = 0;
  std::string domain;
};
/// Waits for the keeper's answer. kUnavailable with the keeper's reason when it could not start
/// the VM, or when it went away without an answer.
[[nodiscard]] Result<StartedVm> await_vm(int keeper_fd);
/// The tail of the VM's console ("" when the keeper cannot say).
std::string keeper_console(int keeper_fd);
/// Asks for the VM's destruction and waits until it is done.
void keeper_destroy(int keeper_fd);

}  // namespace tresor::runner
