// What a host lacks to run Tresor's VMs (include/tresor/vm/doctor.h).
#include "tresor/vm/doctor.h"

#include <cstdlib>
#include <sstream>

namespace tresor::vm {
namespace {

std::vector<long> parts(const std::string& v) {
  std::vector<long> out;
  std::stringstream ss(v);
  for (std::string p; std::getline(ss, p, '.');) {
    if (p.empty() || p.find_first_not_of("0123456789") != std::string::npos) return {};
    out.push_back(std::strtol(p.c_str(), nullptr, 10));
  }
  return out;
}

}  // namespace

bool version_at_least(const std::string& have, const std::string& want) {
  auto h = parts(have), w = parts(want);
  if (h.empty() || w.empty()) return false;
  h.resize(std::max(h.size(), w.size()), 0);
  w.resize(h.size(), 0);
  return h >= w;
}

std::vector<Check> judge_host(const HostFacts& f) {
  std::vector<Check> c;
  c.push_back({"QEMU (qemu-system-x86_64)", f.qemu_version.has_value(), f.qemu_version.value_or("not installed"),
               "apt install qemu-system-x86", false});
  c.push_back({"libvirtd reachable on qemu:///system", f.libvirt_version.has_value(),
               f.libvirt_version ? "libvirt " + *f.libvirt_version : f.libvirt_error,
               "apt install libvirt-daemon-system; start libvirtd and virtlogd (scripts/libvirt-local start without systemd)", false});
  c.push_back({"KVM (/dev/kvm creates a VM)", f.dev_kvm_usable, f.dev_kvm_usable ? "yes (a nested host may still fail to run one)" : "no",
               "enable virtualisation in the firmware and load kvm_amd (without it only accel=tcg runs, slowly, and never SNP)", true});
  c.push_back({"CPU supports SEV-SNP", f.cpu_sev_snp, f.cpu_sev_snp ? "sev_snp in /proc/cpuinfo" : "no sev_snp flag",
               "an AMD EPYC 7003 (Milan) or later, with SEV-SNP enabled in the firmware (BIOS: SNP, SMEE, IOMMU)", true});
  const bool kvm_snp = f.kvm_amd_sev_snp && (*f.kvm_amd_sev_snp == "Y" || *f.kvm_amd_sev_snp == "1");
  c.push_back({"kernel with SEV-SNP host support (kvm_amd sev_snp)", kvm_snp,
               f.kvm_amd_sev_snp ? "kvm_amd sev_snp=" + *f.kvm_amd_sev_snp : "kvm_amd not loaded",
               "a host kernel with SNP support (Linux ≥ 6.11, or AMD's SNP host kernel) and kvm_amd loaded with sev_snp=1", true});
  c.push_back({"the AMD secure processor's driver (/dev/sev)", f.dev_sev, f.dev_sev ? "present" : "absent",
               "load the ccp driver; SNP must be initialised by the firmware", true});
  c.push_back({"QEMU ≥ 9.1 (sev-snp-guest)", f.qemu_version && version_at_least(*f.qemu_version, "9.1"), f.qemu_version.value_or("none"),
               "QEMU 9.1 or later", true});
  c.push_back({"libvirt ≥ 10.5 (launchSecurity sev-snp)", f.libvirt_version && version_at_least(*f.libvirt_version, "10.5"),
               f.libvirt_version.value_or("none"), "libvirt 10.5 or later", true});
  c.push_back({"AmdSev OVMF (SEV metadata, kernel hashes)", f.ovmf && f.ovmf_problem.empty(),
               f.ovmf ? *f.ovmf + (f.ovmf_problem.empty() ? "" : ": " + f.ovmf_problem) : "none given (--ovmf) or in the catalogue",
               "build OVMF's AmdSev package (OvmfPkg/AmdSev/AmdSevX64.dsc) and name it in the catalogue's firmware", true});
  c.push_back({"IOMMU on", f.iommu_groups > 0, std::to_string(f.iommu_groups) + " IOMMU groups",
               "enable the IOMMU in the firmware and on the kernel command line (amd_iommu=on iommu=pt)", true});
  for (const auto& [addr, driver] : f.gpu_drivers) {
    c.push_back({"GPU " + addr + " bound to vfio-pci", driver == "vfio-pci",
                 driver == "?" ? "no such PCI device" : driver.empty() ? "no driver" : "driver " + driver,
                 "bind it to vfio-pci (driverctl set-override " + addr + " vfio-pci), or fix the gpus= table", true});
  }
  if (f.step_bridge) {
    c.push_back({"step bridge " + *f.step_bridge + " (a bridge, up)", f.step_bridge_problem.empty(),
                 f.step_bridge_problem.empty() ? "a bridge, up" : f.step_bridge_problem,
                 "make the bridge, bring it up and connect it to the other nodes' with a DHCP server on it (docs/admin-guide.md §9.2)", false,
                 true});
  }
  return c;
}

}  // namespace tresor::vm
