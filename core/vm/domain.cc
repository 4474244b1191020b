// The libvirt domain XML of a job's VM (include/tresor/vm/domain.h).
#include "tresor/vm/domain.h"

#include <cstdio>

#include "tresor/encoding.h"

namespace tresor::vm {
namespace {

std::unexpected<Error> bad(const std::string& m) { return fail(ErrorCode::kInvalidArgument, "VM spec: " + m); }

std::string esc(std::string_view s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '\'': out += "&apos;"; break;
      case '"': out += "&quot;"; break;
      default: out += c;
    }
  }
  return out;
}

bool plain_text(std::string_view s) {
  for (char c : s) {
    if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) return false;
  }
  return true;
}

Result<void> absolute_path(std::string_view what, const std::string& p, bool required) {
  if (p.empty()) {
    if (required) return bad(std::string(what) + " is required");
    return {};
  }
  if (p[0] != '/' || !plain_text(p)) return bad(std::string(what) + " '" + p + "' must be an absolute path without control characters");
  return {};
}

bool valid_name(std::string_view n) {
  if (n.empty() || n.size() > 64) return false;
  for (char c : n) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' || c == '.' || c == '-';
    if (!ok) return false;
  }
  return true;
}

// "DDDD:BB:SS.F" (domain, bus, slot, function in hex; slot ≤ 0x1f, function ≤ 7).
struct Pci {
  unsigned domain, bus, slot, function;
};
Result<Pci> parse_pci(const std::string& a) {
  Pci p{};
  char tail = 0;
  if (a.size() != 12 || std::sscanf(a.c_str(), "%4x:%2x:%2x.%1x%c", &p.domain, &p.bus, &p.slot, &p.function, &tail) != 4 ||
      p.slot > 0x1f || p.function > 7 || a[4] != ':' || a[7] != ':' || a[10] != '.') {
    return bad("GPU PCI address '" + a + "' is not DDDD:BB:SS.F");
  }
  return p;
}

std::string hex(uint64_t v, int width) {
  char b[32];
  std::snprintf(b, sizeof b, "0x%0*llx", width, static_cast<unsigned long long>(v));
  return b;
}

}  // namespace

Result<std::string> domain_xml(const DomainSpec& s) {
  if (!valid_name(s.name)) return bad("name '" + s.name + "' must be 1..64 of [A-Za-z0-9_.-]");
  if (s.vcpus < 1 || s.vcpus > 512) return bad("vcpus must be 1..512");
  if (s.memory_mib < 256) return bad("memory must be at least 256 MiB (a guest boots from 96 MiB; the agent needs room)");
  TRESOR_TRY(absolute_path("kernel", s.kernel, true));
  TRESOR_TRY(absolute_path("initrd", s.initrd, true));
  TRESOR_TRY(absolute_path("firmware", s.firmware, s.snp));
  TRESOR_TRY(absolute_path("control socket", s.control_socket, true));
  if (!plain_text(s.cmdline)) return bad("the kernel command line has control characters");
  if (s.snp) {
    if (s.accelerator != Accelerator::kKvm) return bad("SEV-SNP needs the kvm accelerator (TCG cannot run an SNP guest)");
    if (s.snp_policy & (1ull << 19)) return bad("the SNP guest policy sets DEBUG (bit 19): never for a confidential job");
    if (!(s.snp_policy & (1ull << 17))) return bad("the SNP guest policy must set bit 17 (reserved, must be one: ABI 56860 Table 9)");
  }
  std::vector<Pci> gpus;
  for (const auto& g : s.gpus) {
    auto p = parse_pci(g);
    if (!p) return std::unexpected(p.error());
    gpus.push_back(*p);
  }
  bool virtiofs = false;
  for (const auto& sh : s.shares) {
    if (!valid_name(sh.tag)) return bad("share tag '" + sh.tag + "' must be 1..64 of [A-Za-z0-9_.-]");
    TRESOR_TRY(absolute_path("share '" + sh.tag + "'", sh.host_path, true));
    virtiofs = virtiofs || sh.driver == ShareDriver::kVirtiofs;
    if (sh.read_only && sh.driver == ShareDriver::kVirtiofs) {
      return bad("share '" + sh.tag + "': libvirt before 11.0 cannot make a virtiofs share read-only; read-only shares use 9p");
    }
  }
  if (!s.console_log.empty()) {
    TRESOR_TRY(absolute_path("console log", s.console_log, true));
  }
  if (!s.network_bridge.empty() && !valid_interface_name(s.network_bridge)) {
    return bad("network bridge '" + s.network_bridge + "' must be 1..15 of [A-Za-z0-9_.-] (a Linux interface name)");
  }

  std::string x;
  x += "<domain type='" + std::string(s.accelerator == Accelerator::kKvm ? "kvm" : "qemu") + "'>\n";
  x += "  <name>" + esc(s.name) + "</name>\n";
  x += "  <memory unit='MiB'>" + std::to_string(s.memory_mib) + "</memory>\n";
  if (virtiofs) {
    // virtiofs needs guest memory that virtiofsd can map.
    x += "  <memoryBacking>\n    <source type='memfd'/>\n    <access mode='shared'/>\n  </memoryBacking>\n";
  }
  x += "  <vcpu placement='static'>" + std::to_string(s.vcpus) + "</vcpu>\n";
  x += "  <os>\n    <type arch='x86_64' machine='q35'>hvm</type>\n";
  if (!s.firmware.empty()) x += "    <loader type='rom' readonly='yes'>" + esc(s.firmware) + "</loader>\n";
  x += "    <kernel>" + esc(s.kernel) + "</kernel>\n";
  x += "    <initrd>" + esc(s.initrd) + "</initrd>\n";
  x += "    <cmdline>" + esc(s.cmdline) + "</cmdline>\n";
  x += "  </os>\n";
  x += "  <features>\n    <acpi/>\n  </features>\n";  // without ACPI, poweroff only halts (PLATFORM.md)
  if (s.accelerator == Accelerator::kKvm) x += "  <cpu mode='host-passthrough'/>\n";
  x += "  <clock offset='utc'/>\n";
  x += "  <on_poweroff>destroy</on_poweroff>\n  <on_reboot>destroy</on_reboot>\n  <on_crash>destroy</on_crash>\n";
  if (s.snp) {
    x += "  <launchSecurity type='sev-snp' kernelHashes='yes'>\n";
    x += "    <cbitpos>" + std::to_string(s.cbitpos) + "</cbitpos>\n";
    x += "    <reducedPhysBits>" + std::to_string(s.reduced_phys_bits) + "</reducedPhysBits>\n";
    x += "    <policy>" + hex(s.snp_policy, 8) + "</policy>\n";
    x += "    <hostData>" + base64_encode(s.host_data) + "</hostData>\n";
    x += "  </launchSecurity>\n";
  }
  x += "  <devices>\n";
  if (s.console_log.empty()) {
    x += "    <console type='pty'>\n      <target type='serial' port='0'/>\n    </console>\n";
  } else {
    x += "    <serial type='file'>\n      <source path='" + esc(s.console_log) + "'/>\n      <target port='0'/>\n    </serial>\n";
  }
  x += "    <channel type='unix'>\n      <source mode='bind' path='" + esc(s.control_socket) + "'/>\n";
  x += "      <target type='virtio' name='" + std::string(kControlChannel) + "'/>\n    </channel>\n";
  for (const auto& sh : s.shares) {
    x += "    <filesystem type='mount' accessmode='" + std::string(sh.driver == ShareDriver::kVirtiofs ? "passthrough" : "mapped") + "'>\n";
    if (sh.driver == ShareDriver::kVirtiofs) x += "      <driver type='virtiofs'/>\n";
    x += "      <source dir='" + esc(sh.host_path) + "'/>\n";
    x += "      <target dir='" + esc(sh.tag) + "'/>\n";
    if (sh.read_only) x += "      <readonly/>\n";
    x += "    </filesystem>\n";
  }
  if (!s.network_bridge.empty()) {
    // libvirt makes a tap device on the bridge; the guest sees a virtio-net NIC (formatdomain,
    // "Bridge to LAN").
    x += "    <interface type='bridge'>\n      <source bridge='" + esc(s.network_bridge) + "'/>\n      <model type='virtio'/>\n    </interface>\n";
  }
  for (const auto& g : gpus) {
    x += "    <hostdev mode='subsystem' type='pci' managed='yes'>\n      <source>\n";
    x += "        <address domain='" + hex(g.domain, 4) + "' bus='" + hex(g.bus, 2) + "' slot='" + hex(g.slot, 2) + "' function='" +
         hex(g.function, 1) + "'/>\n";
    x += "      </source>\n    </hostdev>\n";
  }
  x += "    <memballoon model='none'/>\n";  // no balloon: the host must not reach into guest memory
  x += "  </devices>\n</domain>\n";
  return x;
}

}  // namespace tresor::vm
