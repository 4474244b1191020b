// What a host lacks for Tresor's VMs (include/tresor/vm/doctor.h): an SNP-ready host passes
// every check; a host like this one (a guest itself: QEMU 7.2, libvirt 9.0, no SNP) can run plain
// VMs only, and every missing piece is named with its fix; versions compare numerically.
#include "tresor/vm/doctor.h"

#include <gtest/gtest.h>

namespace tresor::vm {
namespace {

HostFacts snp_host() {
  HostFacts f;
  f.cpu_sev_snp = true;
  f.kvm_amd_sev_snp = "Y";
  f.dev_sev = true;
  f.dev_kvm_usable = true;
  f.qemu_version = "9.2.0";
  f.libvirt_version = "10.10.0";
  f.ovmf = "/usr/share/tresor/OVMF.amdsev.fd";
  f.iommu_groups = 64;
  f.gpu_drivers = {{"0000:41:00.0", "vfio-pci"}};
  return f;
}

TEST(VmDoctor, AnSnpReadyHostPassesEveryCheck) {
  for (const auto& c : judge_host(snp_host())) EXPECT_TRUE(c.ok) << c.what << ": " << c.found;
}

TEST(VmDoctor, EachMissingPieceIsNamedWithItsFix) {
  HostFacts f = snp_host();
  f.cpu_sev_snp = false;
  f.kvm_amd_sev_snp.reset();
  f.dev_sev = false;
  f.qemu_version = "7.2.22";
  f.libvirt_version = "9.0.0";
  f.ovmf_problem = "firmware image has no SEV metadata sections: not an SNP OVMF";
  f.iommu_groups = 0;
  f.gpu_drivers = {{"0000:41:00.0", "nvidia"}, {"0000:81:00.0", "?"}};
  size_t plain = 0, snp = 0;
  std::string failed;
  for (const auto& c : judge_host(f)) {
    if (c.ok) continue;
    (c.snp_only ? snp : plain)++;
    failed += c.what + " [" + c.found + "] -> " + c.fix + "\n";
  }
  EXPECT_EQ(plain, 0u) << "plain VMs still run:\n" << failed;
  EXPECT_EQ(snp, 9u) << failed;
  for (const char* want : {"kvm_amd not loaded", "QEMU ≥ 9.1", "7.2.22", "libvirt ≥ 10.5", "not an SNP OVMF", "0 IOMMU groups",
                           "driver nvidia", "driverctl set-override 0000:41:00.0 vfio-pci", "no such PCI device"}) {
    EXPECT_NE(failed.find(want), std::string::npos) << want << " in:\n" << failed;
  }
  // A step bridge that is not one is named, and counts against steps across VMs only.
  HostFacts steps = snp_host();
  steps.step_bridge = "tresor-step";
  size_t step_checks = 0;
  for (const auto& c : judge_host(steps)) {
    if (c.steps_only) {
      ++step_checks;
      EXPECT_TRUE(c.ok) << c.found;
    }
  }
  EXPECT_EQ(step_checks, 1u);
  steps.step_bridge_problem = "not a bridge";
  for (const auto& c : judge_host(steps)) {
    if (c.ok) continue;
    EXPECT_TRUE(c.steps_only) << c.what;
    EXPECT_FALSE(c.snp_only) << c.what;
    EXPECT_EQ(c.what, "step bridge tresor-step (a bridge, up)");
    EXPECT_EQ(c.found, "not a bridge");
    EXPECT_NE(c.fix.find("admin-guide.md §9.2"), std::string::npos) << c.fix;
  }
  // Without QEMU or libvirtd nothing runs at all.
  HostFacts bare;
  bare.libvirt_error = "cannot connect to libvirt at qemu:///system: no socket";
  size_t bare_plain = 0;
  for (const auto& c : judge_host(bare)) bare_plain += (!c.ok && !c.snp_only) ? 1 : 0;
  EXPECT_EQ(bare_plain, 2u);
}

TEST(VmDoctor, VersionsCompareNumerically) {
  EXPECT_TRUE(version_at_least("9.1", "9.1"));
  EXPECT_TRUE(version_at_least("9.1.0", "9.1"));
  EXPECT_TRUE(version_at_least("10.0.0", "9.1"));
  EXPECT_TRUE(version_at_least("10.10.0", "10.5"));
  EXPECT_FALSE(version_at_least("10.4.99", "10.5"));
  EXPECT_FALSE(version_at_least("9.0.9", "9.1"));
  EXPECT_FALSE(version_at_least("7.2.22", "9.1"));
  EXPECT_FALSE(version_at_least("9.x", "9.1"));
  EXPECT_FALSE(version_at_least("", "9.1"));
}

}  // namespace
}  // namespace tresor::vm
