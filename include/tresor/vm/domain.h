// tresor/vm/domain.h — the libvirt domain XML of a job's VM, as a pure function (issue 5, item 2;
// STYLE.md: generation of libvirt XML is pure and golden-file tested). Two shapes from one spec:
//  - SEV-SNP (libvirt ≥ 10.5, QEMU ≥ 9.1): <launchSecurity type='sev-snp' kernelHashes='yes'> with
//    the guest policy and HOST_DATA (SHA-256 of the job manifest), the AmdSev OVMF as a ROM
//    loader, and direct kernel boot so that the kernel, initrd and command line are measured;
//  - a plain QEMU guest (KVM or TCG) with the same structure and no launchSecurity, for
//    development and CI (PLATFORM.md: libvirt 9.0 here knows no sev-snp).
// Devices: VFIO hostdevs for the job's GPUs, virtiofs or 9p shares (the job directory read-write
// for sealed outputs, dataset directories read-only), a virtio-serial control channel on a
// Unix socket, and — only for a step's ranks — one virtio-net interface on a host bridge. The VM
// is destroyed on poweroff, reboot and crash: one job, one boot.
//
// References: libvirt "Domain XML format" (formatdomain: os/loader/kernel/initrd/cmdline,
// launchSecurity, hostdev, filesystem, channel); AMD SEV-SNP ABI 56860 Table 9 (GUEST_POLICY).
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "tresor/error.h"

namespace tresor::vm {

enum class Accelerator { kKvm, kTcg };
enum class ShareDriver { kVirtiofs, k9p };

struct Share {
  std::string tag;        // the mount tag the guest uses
  std::string host_path;  // absolute
  bool read_only = true;
  ShareDriver driver = ShareDriver::kVirtiofs;
};

struct DomainSpec {
  std::string name;  // libvirt domain name: [A-Za-z0-9_.-], 1..64
  unsigned vcpus = 1;
  uint64_t memory_mib = 256;
  Accelerator accelerator = Accelerator::kKvm;
  bool snp = false;
  uint64_t snp_policy = 0x30000;           // GUEST_POLICY: SMT allowed, bit 17 set, DEBUG clear
  std::array<std::byte, 32> host_data{};   // SNP: SHA-256 of the job manifest
  unsigned cbitpos = 51, reduced_phys_bits = 1;  // SNP: from the host's domain capabilities
  std::string firmware;  // OVMF: required for SNP (the AmdSev build); optional otherwise
  std::string kernel, initrd, cmdline;
  std::vector<Share> shares;
  std::vector<std::string> gpus;  // PCI addresses, "0000:41:00.0"
  std::string control_socket;     // the control channel's Unix socket on the host
  std::string console_log;        // absolute: the serial console into this file; "": a pty
  /// "": the guest has no network (the default: its only link is the control channel). Else one
  /// virtio-net interface on this host bridge, for a step whose tasks meet as ranks across VMs
  /// (docs/scale.md §2.2): the bridge is the node's step network, which the administrator
  /// makes; the host carries only the ranks' pinned-TLS ciphertext on it.
  std::string network_bridge;
};

/// A network interface name as Tresor takes one (the step bridge, plugstack.conf step_bridge=):
/// 1..15 bytes — IFNAMSIZ - 1, include/uapi/linux/if.h — of [A-Za-z0-9_.-], and not "." or "..".
[[nodiscard]] inline bool valid_interface_name(std::string_view n) {
  if (n.empty() || n.size() > 15 || n == "." || n == "..") return false;
  for (char c : n) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '.' || c == '-';
    if (!ok) return false;
  }
  return true;
}

/// The domain XML. kInvalidArgument names the field and the rule: a bad name, a relative path,
/// a malformed PCI address, SNP without firmware or under TCG, DEBUG in the SNP policy, too little
/// memory, a read-only virtiofs share (libvirt before 11.0 cannot enforce it: read-only shares
/// are 9p), a bridge name that is not 1..15 of [A-Za-z0-9_.-] (a Linux interface name). Every
/// text value is escaped.
[[nodiscard]] Result<std::string> domain_xml(const DomainSpec& spec);

/// The name of the control channel inside the guest (/dev/virtio-ports/<name>).
inline constexpr std::string_view kControlChannel = "org.tresor.control";

}  // namespace tresor::vm
