// tresor/vm/job.h — a confidential job's VM, from what Slurm allocated to the task (issue 5,
// item 2: "CPUs and memory from the allocation, GPUs … mapped to PCI addresses by config,
// HOST_DATA = SHA-256 of the manifest, shares"). Pure: the environment comes in as a lookup.
//
// What travels where. The kernel command line is part of the measured launch (kernelHashes):
// it stays exactly the approved image's, so nothing about the job is appended to it. The job is
// bound to the VM by HOST_DATA (the manifest's digest, which the AMD-SP puts in every report);
// everything else the guest learns over the control channel. The shares are one read-only share
// per dataset the manifest names (ciphertext), never the whole dataset tree. Nothing on the host
// is shared writable: the sealed outputs come back over the control channel (vm/control.h).
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "tresor/error.h"
#include "tresor/slurm/job.h"
#include "tresor/vm/domain.h"

namespace tresor::vm {

struct Allocation {
  unsigned cpus = 1;
  uint64_t memory_mib = 0;        // 0: the job asked for no memory (the backend's default applies)
  std::vector<std::string> gpus;  // PCI addresses
};

/// From the task's Slurm environment: CPUs = SLURM_CPUS_ON_NODE, else the first count of
/// SLURM_JOB_CPUS_PER_NODE ("4(x2),2" → 4), else 1; memory = SLURM_MEM_PER_NODE (MiB), else
/// SLURM_MEM_PER_CPU × CPUs, else 0; GPUs = slurm::job_gpus(SLURM_JOB_GPUS, CUDA_VISIBLE_DEVICES,
/// table). A value that is not a number is an error naming the variable.
[[nodiscard]] Result<Allocation> allocation_from_env(const std::function<std::string(std::string_view)>& env,
                                                     const std::map<unsigned, std::string>& gpu_table);

/// Share tags the guest mounts (tresor-data-0, -1, … in the manifest's dataset order).
inline constexpr std::string_view kDataTagPrefix = "tresor-data-";

struct JobVm {
  std::string slurm_job = "0", slurm_step = "0";  // Slurm's ids, for the domain name
  std::string task;                               // SLURM_PROCID in a step of several tasks, else ""
  std::string network_bridge;                     // "": no network; a step's ranks: the node's step bridge
  std::string job_id;                             // the manifest's ("t-…")
  Allocation allocation;
  slurm::Image image;                             // kernel, initrd, cmdline (and firmware for SNP)
  std::array<std::byte, 32> host_data{};          // SHA-256 of the manifest
  std::vector<std::string> dataset_dirs;          // absolute, one per manifest dataset
  std::string control_socket;                     // absolute
  Accelerator accelerator = Accelerator::kKvm;
  bool snp = true;
  uint64_t default_memory_mib = 2048;             // when the job asked for none
};

/// The domain spec: name "tresor-<job>.<step>-<manifest job id>" ("tresor-<job>.<step>.<task>-…"
/// for a task of a step of several, which may share a node), the allocation's vCPUs, memory
/// and GPUs, the image's boot files and command line unchanged, HOST_DATA, the shares, the
/// control socket, and the step bridge's virtio-net when one is named. kInvalidArgument names
/// what the image or allocation lacks ("image 'ccta-v1'
/// has no kernel in the catalogue: …").
[[nodiscard]] Result<DomainSpec> job_domain_spec(const JobVm& job);

}  // namespace tresor::vm
