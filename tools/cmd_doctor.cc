// tresor doctor: what this host lacks to run Tresor's VMs — plain QEMU guests (development, CI)
// and SEV-SNP guests (confidential jobs). Gathers the facts; include/tresor/vm/doctor.h judges.
#include <fcntl.h>
#include <linux/kvm.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <regex>

#include "cli.h"
#include "options.h"
#include "tresor/slurm/job.h"
#include "tresor/snp/measure.h"
#include "tresor/vm/doctor.h"
#include "tresor/vm/domain.h"
#include "tresor/vm/hypervisor.h"

namespace tresor::cli {
namespace {

namespace fs = std::filesystem;

// A file's text, or "" when it cannot be read (a fact the host does not have). Firmware images
// are the largest input: 64 MiB, as tresor measure allows.
std::string slurp(const std::string& path) {
  auto text = read_small_file(path, 64u << 20);
  return text ? std::move(*text) : std::string();
}

bool kvm_usable() {
  const int fd = ::open("/dev/kvm", O_RDWR | O_CLOEXEC);
  if (fd < 0) return false;
  const int vm = ::ioctl(fd, KVM_CREATE_VM, 0);  // what QEMU does: an unusable /dev/kvm fails here
  if (vm >= 0) ::close(vm);
  ::close(fd);
  return vm >= 0;
}

}  // namespace

int cmd_doctor(int argc, char** argv) {
  po::options_description opts("Options");
  std::string ovmf, gpus, hypervisor = "qemu:///system", images, step_bridge;
  opts.add_options()
      ("ovmf", po::value(&ovmf), "the firmware SNP guests would boot (default: the catalogue's, with --images)")
      ("images", po::value(&images), "the image catalogue (plugstack.conf images=): its firmware is checked")
      ("gpus", po::value(&gpus), "the node's GPU table (plugstack.conf gpus=): each GPU must be bound to vfio-pci")
      ("hypervisor", po::value(&hypervisor)->default_value("qemu:///system"), "the libvirt URI (plugstack.conf hypervisor=)")
      ("step-bridge", po::value(&step_bridge), "the step network's bridge (plugstack.conf step_bridge=): it must be a bridge, up");
  po::variables_map vm;
  if (auto stop = parse_options("doctor", "[--ovmf F] [--images F] [--gpus F] [--hypervisor URI] [--step-bridge NAME]", argc, argv, opts, {}, vm)) return *stop;

  vm::HostFacts f;
  f.cpu_sev_snp = std::regex_search(slurp("/proc/cpuinfo"), std::regex(R"(\bsev_snp\b)"));
  if (fs::exists("/sys/module/kvm_amd/parameters/sev_snp")) {
    std::string v = slurp("/sys/module/kvm_amd/parameters/sev_snp");
    while (!v.empty() && (v.back() == '\n' || v.back() == ' ')) v.pop_back();
    f.kvm_amd_sev_snp = v;
  }
  f.dev_sev = fs::exists("/dev/sev");
  f.dev_kvm_usable = kvm_usable();
  std::smatch m;
  const Captured q = run_program({"qemu-system-x86_64", "--version"}, Stream::kCapture, Stream::kDiscard);
  const std::string qemu = WIFEXITED(q.status) && WEXITSTATUS(q.status) == 0 ? q.output : std::string();
  if (std::regex_search(qemu, m, std::regex(R"(version ([0-9]+\.[0-9]+(\.[0-9]+)?))"))) f.qemu_version = m[1];
  if (auto hv = vm::Hypervisor::connect(hypervisor, false)) {
    if (auto v = hv->libvirt_version()) f.libvirt_version = *v;
  } else {
    f.libvirt_error = hv.error().message;
  }
  if (ovmf.empty() && !images.empty()) {
    if (auto c = slurm::parse_image_catalogue(slurp(images))) {
      for (const auto& [name, img] : c->images) {
        if (!img.firmware.empty()) ovmf = img.firmware;
      }
    }
  }
  if (!ovmf.empty()) {
    f.ovmf = ovmf;
    const std::string fw = slurp(ovmf);
    if (fw.empty()) {
      f.ovmf_problem = "cannot read it";
    } else {
      const Bytes kernel(4096);  // any kernel: the question is whether the firmware can measure one
      snp::MeasureInputs in;
      in.ovmf = as_bytes(fw);
      in.kernel = ByteSpan(kernel);
      if (auto d = snp::launch_digest(in); !d) f.ovmf_problem = d.error().message;
    }
  }
  std::error_code ec;
  for (auto it = fs::directory_iterator("/sys/kernel/iommu_groups", ec); !ec && it != fs::directory_iterator(); it.increment(ec)) {
    ++f.iommu_groups;
  }
  if (!gpus.empty()) {
    auto table = slurm::parse_gpu_table(slurp(gpus));
    if (!table) return report({table.error().code, gpus + ": " + table.error().message});
    for (const auto& [index, addr] : *table) {
      const fs::path dev = fs::path("/sys/bus/pci/devices") / addr;
      std::string driver = "?";  // no such device
      if (fs::exists(dev)) {
        std::error_code e;
        const auto link = fs::read_symlink(dev / "driver", e);
        driver = e ? std::string() : link.filename().string();
      }
      f.gpu_drivers.insert_or_assign(addr, std::move(driver));
    }
  }

  if (!step_bridge.empty()) {
    // A bridge: /sys/class/net/NAME/bridge exists; up: IFF_UP (0x1) in its flags.
    f.step_bridge = step_bridge;
    const fs::path net = fs::path("/sys/class/net") / step_bridge;
    std::string flags = slurp((net / "flags").string());
    if (!vm::valid_interface_name(step_bridge) || !fs::exists(net)) {
      f.step_bridge_problem = "no such interface";
    } else if (!fs::is_directory(net / "bridge")) {
      f.step_bridge_problem = "not a bridge";
    } else if ((std::strtoul(flags.c_str(), nullptr, 16) & 0x1) == 0) {
      f.step_bridge_problem = "a bridge, down";
    }
  }

  const auto checks = vm::judge_host(f);
  size_t plain_missing = 0, snp_missing = 0, step_missing = 0;
  for (const auto& c : checks) {
    std::printf("  %s %-52s %s\n", c.ok ? "ok  " : "MISS", c.what.c_str(), c.found.c_str());
    if (!c.ok) {
      std::printf("       %s\n", c.fix.c_str());
      (c.steps_only ? step_missing : c.snp_only ? snp_missing : plain_missing)++;
    }
  }
  if (step_missing != 0) std::printf("steps whose VMs meet as ranks (TRESOR_STEP_ROSTER=1) cannot run here: the step bridge is not ready\n");
  if (plain_missing + snp_missing == 0) {
    std::printf("this host can run SEV-SNP guests (snp=yes) and plain ones\n");
    return step_missing == 0 ? kExitOk : kExitInternal;
  }
  if (plain_missing == 0) {
    std::printf("this host can run plain VMs (snp=no, NOT confidential%s) but not SEV-SNP guests: %zu thing(s) missing\n",
                f.dev_kvm_usable ? "" : "; software emulation only: accel=tcg", snp_missing);
  } else {
    std::printf("this host cannot run Tresor's VMs: %zu thing(s) missing, %zu more for SEV-SNP\n", plain_missing, snp_missing);
  }
  return kExitInternal;
}

}  // namespace tresor::cli
