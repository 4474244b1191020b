// tresor/vm/doctor.h — what a host lacks to run Tresor's VMs (issue 6, item 3): SEV-SNP guests
// (the confidential path) and plain QEMU guests (development and CI). The facts are gathered by
// `tresor doctor` (tools/cmd_doctor.cc); judging them is pure, so every verdict is tested with
// made-up hosts as well as run on this one.
//
// Requirements and where they come from: AMD's SEV-SNP host support in Linux (kvm_amd's sev_snp
// parameter, /dev/sev from the ccp driver; AMD 56860 for the firmware), QEMU ≥ 9.1 (sev-snp-guest
// object), libvirt ≥ 10.5 (launchSecurity type='sev-snp'), an AmdSev OVMF build (SEV metadata and
// the kernel-hashes table: docs/attestation.md §9), an IOMMU with the job GPUs bound to vfio-pci.
#pragma once

#include <map>
#include <optional>
#include <string>
#include <vector>

namespace tresor::vm {

struct HostFacts {
  bool cpu_sev_snp = false;                 // /proc/cpuinfo flags: sev_snp
  std::optional<std::string> kvm_amd_sev_snp;  // /sys/module/kvm_amd/parameters/sev_snp ("Y"/"N"), absent: no kvm_amd
  bool dev_sev = false;                     // /dev/sev (the host's AMD-SP driver)
  bool dev_kvm_usable = false;              // /dev/kvm opens and creates a VM (running one is not tried)
  std::optional<std::string> qemu_version;  // "7.2.22", absent: no qemu-system-x86_64
  std::optional<std::string> libvirt_version;  // the daemon's, "9.0.0"; absent: none reachable
  std::string libvirt_error;                // why not, when absent
  std::optional<std::string> ovmf;          // the firmware checked, when one was given or found
  std::string ovmf_problem;                 // "" when it is an AmdSev build with kernel hashes
  unsigned iommu_groups = 0;                // entries in /sys/kernel/iommu_groups
  std::map<std::string, std::string> gpu_drivers;  // PCI address → bound driver ("" none, "?" no such device)
  std::optional<std::string> step_bridge;   // the step network's bridge (plugstack.conf step_bridge=), when given
  std::string step_bridge_problem;          // "" when it is a bridge and up; else what it is
};

struct Check {
  std::string what;   // "QEMU ≥ 9.1"
  bool ok = false;
  std::string found;  // what the host has
  std::string fix;    // what to do when not ok
  bool snp_only = true;  // needed for SEV-SNP only (plain guests run without it)
  bool steps_only = false;  // needed only by steps whose VMs meet as ranks (docs/training.md §5.5)
};

/// Every check, in a fixed order. Never stops at the first failure.
[[nodiscard]] std::vector<Check> judge_host(const HostFacts& facts);

/// "a.b.c" ≥ "x.y"? Missing parts count as 0; a malformed version is never enough.
[[nodiscard]] bool version_at_least(const std::string& have, const std::string& want);

}  // namespace tresor::vm
