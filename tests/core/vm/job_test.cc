// A job's VM from its Slurm allocation (include/tresor/vm/job.h): CPUs, memory and GPUs from the
// task's environment in each of the forms Slurm uses, and the domain spec — boot files and the
// measured command line exactly the image's, HOST_DATA, one share per dataset — with every
// refusal named.
#include "tresor/vm/job.h"

#include <gtest/gtest.h>

#include <map>

#include "support/test_support.h"

namespace tresor::vm {
namespace {

using Env = std::map<std::string, std::string, std::less<>>;
auto lookup(const Env& env) {
  return [&env](std::string_view k) {
    auto it = env.find(k);
    return it == env.end() ? std::string() : it->second;
  };
}
const std::map<unsigned, std::string> kGpus = {{0, "0000:41:00.0"}, {1, "0000:81:00.0"}, {2, "0000:c1:00.0"}};

TEST(VmJob, AllocationFromSlurmEnvironment) {
  Env env = {{"SLURM_CPUS_ON_NODE", "8"}, {"SLURM_MEM_PER_NODE", "32000"}, {"SLURM_JOB_GPUS", "0,2"}};
  auto a = allocation_from_env(lookup(env), kGpus);
  ASSERT_TRUE(a) << a.error().message;
  EXPECT_EQ(a->cpus, 8u);
  EXPECT_EQ(a->memory_mib, 32000u);
  EXPECT_EQ(a->gpus, (std::vector<std::string>{"0000:41:00.0", "0000:c1:00.0"}));

  // --mem-per-cpu, and the CPU count from SLURM_JOB_CPUS_PER_NODE's first node.
  Env per_cpu = {{"SLURM_JOB_CPUS_PER_NODE", "4(x2),2"}, {"SLURM_MEM_PER_CPU", "1000"}, {"CUDA_VISIBLE_DEVICES", "1"}};
  a = allocation_from_env(lookup(per_cpu), kGpus);
  ASSERT_TRUE(a) << a.error().message;
  EXPECT_EQ(a->cpus, 4u);
  EXPECT_EQ(a->memory_mib, 4000u);
  EXPECT_EQ(a->gpus, (std::vector<std::string>{"0000:81:00.0"}));

  // Nothing asked: one CPU, no memory (the backend's default), no GPUs.
  a = allocation_from_env(lookup(Env{}), kGpus);
  ASSERT_TRUE(a);
  EXPECT_EQ(a->cpus, 1u);
  EXPECT_EQ(a->memory_mib, 0u);
  EXPECT_TRUE(a->gpus.empty());

  auto bad = allocation_from_env(lookup(Env{{"SLURM_MEM_PER_NODE", "lots"}}), kGpus);
  ASSERT_FALSE(bad);
  EXPECT_EQ(bad.error().message, "SLURM_MEM_PER_NODE='lots' is not a number");
  EXPECT_FALSE(allocation_from_env(lookup(Env{{"SLURM_MEM_PER_NODE", "12G"}}), kGpus)) << "a unit suffix is not MiB";
  auto zero = allocation_from_env(lookup(Env{{"SLURM_CPUS_ON_NODE", "0"}}), kGpus);
  ASSERT_FALSE(zero);
  auto unknown_gpu = allocation_from_env(lookup(Env{{"SLURM_JOB_GPUS", "7"}}), kGpus);
  ASSERT_FALSE(unknown_gpu);
  EXPECT_NE(unknown_gpu.error().message.find('7'), std::string::npos) << unknown_gpu.error().message;
}

JobVm sample(bool snp) {
  JobVm j;
  j.slurm_job = "42";
  j.slurm_step = "0";
  j.job_id = "t-0123456789abcdef";
  j.allocation = {.cpus = 4, .memory_mib = 0, .gpus = {"0000:41:00.0"}};
  j.image.name = "ccta-v1";
  j.image.kernel = "/var/lib/tresor/images/ccta-v1/bzImage";
  j.image.initrd = "/var/lib/tresor/images/ccta-v1/initrd.cpio";
  j.image.cmdline = "console=hvc0 panic=-1";
  j.image.firmware = "/usr/share/tresor/OVMF.amdsev.fd";
  for (size_t i = 0; i < j.host_data.size(); ++i) j.host_data[i] = std::byte(0xa0 + i);
  j.dataset_dirs = {"/shared/datasets/dhz/ccta-2024", "/shared/datasets/dhz/labels"};
  j.control_socket = "/run/tresor/42.0/control.sock";
  j.snp = snp;
  j.accelerator = snp ? Accelerator::kKvm : Accelerator::kTcg;
  return j;
}

TEST(VmJob, DomainSpecFromTheJob) {
  auto s = job_domain_spec(sample(true));
  ASSERT_TRUE(s) << s.error().message;
  EXPECT_EQ(s->name, "tresor-42.0-t-0123456789abcdef");
  EXPECT_EQ(s->vcpus, 4u);
  EXPECT_EQ(s->memory_mib, 2048u);  // the job asked for none
  EXPECT_TRUE(s->snp);
  EXPECT_EQ(s->cmdline, "console=hvc0 panic=-1");  // measured: nothing of the job appended
  EXPECT_EQ(s->host_data, sample(true).host_data);
  EXPECT_EQ(s->gpus, (std::vector<std::string>{"0000:41:00.0"}));
  // One read-only share per dataset and nothing writable: outputs come back over the channel.
  ASSERT_EQ(s->shares.size(), 2u);
  EXPECT_EQ(s->shares[0].tag, "tresor-data-0");
  EXPECT_EQ(s->shares[1].tag, "tresor-data-1");
  EXPECT_EQ(s->shares[1].host_path, "/shared/datasets/dhz/labels");
  for (const auto& sh : s->shares) EXPECT_TRUE(sh.read_only) << sh.tag;
  auto xml = domain_xml(*s);
  ASSERT_TRUE(xml);
  // HOST_DATA is the manifest digest, base64 in the launchSecurity element.
  EXPECT_NE(xml->find("<hostData>oKGio6SlpqeoqaqrrK2ur7CxsrO0tba3uLm6u7y9vr8=</hostData>"), std::string::npos) << *xml;

  auto plain = sample(false);
  plain.allocation.memory_mib = 6000;
  plain.image.firmware.clear();  // a plain guest needs no OVMF
  auto p = job_domain_spec(plain);
  ASSERT_TRUE(p) << p.error().message;
  EXPECT_EQ(p->memory_mib, 6000u);
  EXPECT_FALSE(p->snp);
  EXPECT_TRUE(p->network_bridge.empty());

  // A task of a step of several, meeting its peers on the node's step bridge: its own domain
  // name (tasks may share a node) and the bridge's NIC; a bad bridge name is refused by name.
  auto rank = sample(true);
  rank.task = "3";
  rank.network_bridge = "tresor-step0";
  auto r = job_domain_spec(rank);
  ASSERT_TRUE(r) << r.error().message;
  EXPECT_EQ(r->name, "tresor-42.0.3-t-0123456789abcdef");
  auto rx = domain_xml(*r);
  ASSERT_TRUE(rx);
  EXPECT_NE(rx->find("<source bridge='tresor-step0'/>"), std::string::npos) << *rx;
  rank.network_bridge = "no such bridge";
  auto bad = job_domain_spec(rank);
  ASSERT_FALSE(bad);
  EXPECT_NE(bad.error().message.find("network bridge 'no such bridge'"), std::string::npos) << bad.error().message;
}

TEST(VmJob, RefusalsNameWhatIsMissing) {
  auto no_kernel = sample(true);
  no_kernel.image.kernel.clear();
  auto k = job_domain_spec(no_kernel);
  ASSERT_FALSE(k);
  EXPECT_NE(k.error().message.find("image 'ccta-v1' has no kernel and initrd in the catalogue"), std::string::npos);
  auto no_fw = sample(true);
  no_fw.image.firmware.clear();
  auto f = job_domain_spec(no_fw);
  ASSERT_FALSE(f);
  EXPECT_NE(f.error().message.find("names no firmware"), std::string::npos);
  auto tcg_snp = sample(true);
  tcg_snp.accelerator = Accelerator::kTcg;  // SNP needs KVM: domain_xml's rule, applied here
  EXPECT_FALSE(job_domain_spec(tcg_snp));
  // An SNP image measured for 2 vCPUs: the VM gets 2 whatever the allocation (4), and an
  // allocation of 1 CPU cannot run it.
  auto measured = sample(true);
  measured.image.vcpus = 2;
  auto two = job_domain_spec(measured);
  ASSERT_TRUE(two) << two.error().message;
  EXPECT_EQ(two->vcpus, 2u);
  measured.allocation.cpus = 1;
  auto one = job_domain_spec(measured);
  ASSERT_FALSE(one);
  EXPECT_NE(one.error().message.find("is measured for 2 vCPUs, but the job has 1 CPUs here"), std::string::npos) << one.error().message;
  auto plain_measured = sample(false);
  plain_measured.image.vcpus = 2;  // a plain VM takes the allocation's
  plain_measured.image.firmware.clear();
  EXPECT_EQ(job_domain_spec(plain_measured)->vcpus, 4u);
  auto small = sample(false);
  small.allocation.memory_mib = 100;
  auto m = job_domain_spec(small);
  ASSERT_FALSE(m);
  EXPECT_NE(m.error().message.find("at least 256 MiB"), std::string::npos);
  auto relative = sample(false);
  relative.dataset_dirs = {"datasets/dhz/ccta-2024"};
  EXPECT_FALSE(job_domain_spec(relative));
}

}  // namespace
}  // namespace tresor::vm
