// A job's VM from its Slurm allocation (include/tresor/vm/job.h).
#include "tresor/vm/job.h"

#include <charconv>

namespace tresor::vm {
namespace {

Result<uint64_t> number(std::string_view var, std::string_view text) {
  uint64_t v = 0;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), v);
  if (ec != std::errc() || end == text.data() || end != text.data() + text.size()) {
    return fail(ErrorCode::kInvalidArgument, std::string(var) + "='" + std::string(text) + "' is not a number");
  }
  return v;
}

}  // namespace

Result<Allocation> allocation_from_env(const std::function<std::string(std::string_view)>& env,
                                       const std::map<unsigned, std::string>& gpu_table) {
  Allocation a;
  if (const std::string v = env("SLURM_CPUS_ON_NODE"); !v.empty()) {
    auto n = number("SLURM_CPUS_ON_NODE", v);
    if (!n) return std::unexpected(n.error());
    a.cpus = static_cast<unsigned>(*n);
  } else if (const std::string per_node = env("SLURM_JOB_CPUS_PER_NODE"); !per_node.empty()) {
    // "4(x2),2": this node's count is the first (Slurm lists the job's nodes in order, and the
    // task's own node is where SLURM_CPUS_ON_NODE would have said it).
    const std::string first = per_node.substr(0, per_node.find_first_of("(,"));
    auto n = number("SLURM_JOB_CPUS_PER_NODE", first);
    if (!n) return std::unexpected(n.error());
    a.cpus = static_cast<unsigned>(*n);
  }
  if (a.cpus == 0) return fail(ErrorCode::kInvalidArgument, "the allocation has 0 CPUs");
  if (const std::string v = env("SLURM_MEM_PER_NODE"); !v.empty()) {
    auto n = number("SLURM_MEM_PER_NODE", v);
    if (!n) return std::unexpected(n.error());
    a.memory_mib = *n;
  } else if (const std::string per_cpu = env("SLURM_MEM_PER_CPU"); !per_cpu.empty()) {
    auto n = number("SLURM_MEM_PER_CPU", per_cpu);
    if (!n) return std::unexpected(n.error());
    a.memory_mib = *n * a.cpus;
  }
  auto gpus = slurm::job_gpus(env("SLURM_JOB_GPUS"), env("CUDA_VISIBLE_DEVICES"), gpu_table);
  if (!gpus) return std::unexpected(gpus.error());
  a.gpus = std::move(*gpus);
  return a;
}

Result<DomainSpec> job_domain_spec(const JobVm& job) {
  const slurm::Image& img = job.image;
  const std::string where = "image '" + img.name + "'";
  if (img.kernel.empty() || img.initrd.empty()) {
    return fail(ErrorCode::kInvalidArgument, where + " has no kernel and initrd in the catalogue: the libvirt backend boots them "
                                                     "directly (docs/admin-guide.md, image catalogue)");
  }
  if (job.snp && img.firmware.empty()) {
    return fail(ErrorCode::kInvalidArgument, where + " names no firmware: an SEV-SNP guest boots through the AmdSev OVMF, "
                                                     "whose measurement is part of the image's");
  }
  DomainSpec s;
  s.name = "tresor-" + job.slurm_job + "." + job.slurm_step + (job.task.empty() ? "" : "." + job.task) + "-" + job.job_id;
  s.vcpus = job.allocation.cpus;
  // An SNP measurement holds for one vCPU count: the VM gets exactly the image's, which the
  // allocation must cover (the data owner approved that layout, not the job's).
  if (job.snp && img.vcpus != 0) {
    if (job.allocation.cpus < img.vcpus) {
      return fail(ErrorCode::kInvalidArgument, where + " is measured for " + std::to_string(img.vcpus) + " vCPUs, but the job has " +
                                                   std::to_string(job.allocation.cpus) + " CPUs here: ask for at least " +
                                                   std::to_string(img.vcpus) + " (--cpus-per-task or -c)");
    }
    s.vcpus = img.vcpus;
  }
  s.memory_mib = job.allocation.memory_mib != 0 ? job.allocation.memory_mib : job.default_memory_mib;
  s.accelerator = job.accelerator;
  s.snp = job.snp;
  s.host_data = job.host_data;
  s.firmware = img.firmware;
  s.kernel = img.kernel;
  s.initrd = img.initrd;
  s.cmdline = img.cmdline;  // measured: exactly the approved image's
  s.gpus = job.allocation.gpus;
  s.control_socket = job.control_socket;
  s.network_bridge = job.network_bridge;
  for (size_t i = 0; i < job.dataset_dirs.size(); ++i) {
    // Read-only, enforced by QEMU: 9p (libvirt before 11.0 cannot make virtiofs read-only).
    s.shares.push_back(Share{std::string(kDataTagPrefix) + std::to_string(i), job.dataset_dirs[i], true, ShareDriver::k9p});
  }
  // The same checks domain_xml makes (name, paths, PCI addresses, SNP under TCG, memory): the
  // spec is refused here, before anything starts, with the same messages.
  if (auto x = domain_xml(s); !x) return std::unexpected(x.error());
  return s;
}

}  // namespace tresor::vm
