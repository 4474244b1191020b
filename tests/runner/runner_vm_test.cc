// tresor-run's libvirt backend up to the point of booting: the real binary, given a signed
// manifest and a Slurm-like environment, builds the job's VM from the allocation — the image the
// manifest's measurement names in the node's catalogue, the allocation's CPUs, memory and GPUs,
// HOST_DATA = SHA-256 of the manifest, one read-only share per dataset — and writes its domain
// XML (--domain-xml). Without it, it refuses to run anything and says why; so it does for an
// image the catalogue lacks, a malformed allocation, an unknown GPU and an unknown backend.
#include <gtest/gtest.h>

#include <ctime>

#include "support/test_support.h"
#include "tresor/identity.h"
#include "tresor/manifest.h"
#include "tresor/slurm/job.h"

namespace tresor {
namespace {

using testing::run_command;

const std::string kMeasurement(96, 'c');

struct Fixture {
  testing::TempDir dir;
  std::string manifest_env;
  Manifest manifest;
  Fixture() {
    const std::string catalogue = R"({"images": {"ccta-v1": {"measurement": ")" + kMeasurement +
                                  R"(", "kernel": "/var/lib/tresor/images/ccta-v1/vmlinuz", "initrd": "/var/lib/tresor/images/ccta-v1/initrd", )"
                                  R"("cmdline": "console=hvc0 panic=-1", "firmware": "/usr/share/tresor/OVMF.amdsev.fd"}}})";
    testing::write_file(dir.file("images.json"), as_bytes(catalogue));
    testing::write_file(dir.file("gpus.conf"), as_bytes(std::string("0 0000:41:00.0\n1 0000:81:00.0\n")));
    auto images = *slurm::parse_image_catalogue(catalogue);
    slurm::JobOptions o;
    o.datasets = "dhz/ccta-2024,dhz/labels";
    o.image = "ccta-v1";
    auto req = slurm::check_options(o, *slurm::parse_plugin_args({}), images, "/");
    EXPECT_TRUE(req) << req.error().message;
    auto alice = *Identity::generate();
    auto m = slurm::build_manifest(*req, alice, as_bytes(std::string("#!/bin/sh\ntrue\n")), std::time(nullptr), 3600);
    EXPECT_TRUE(m);
    manifest = *m;
    manifest_env = *slurm::encode_manifest_env(manifest);
  }
  std::vector<std::string> argv(const std::vector<std::string>& env, const std::vector<std::string>& extra) const {
    std::vector<std::string> a = {"/usr/bin/env", "-i", "PATH=/usr/bin:/bin", "TRESOR_MANIFEST=" + manifest_env,
                                  "TRESOR_OUTPUT=" + dir.file("out")};  // a test's own (later assignments win)
    a.insert(a.end(), env.begin(), env.end());
    a.insert(a.end(), {TRESOR_RUN_BIN, "--slurm-job-id", "42", "--broker", "https://127.0.0.1:1", "--ca", dir.file("ca.pem"), "--agent",
                       "/nonexistent/agent", "--sim", dir.file("sim"), "--datasets", "/shared/datasets", "--images",
                       dir.file("images.json"), "--gpus", dir.file("gpus.conf")});
    a.insert(a.end(), extra.begin(), extra.end());
    a.insert(a.end(), {"--", "/bin/true"});
    return a;
  }
};

TEST(RunnerVm, DomainFromTheAllocation) {
  Fixture f;
  auto r = run_command(f.argv({"TRESOR_BACKEND=libvirt", "SLURM_STEP_ID=3", "SLURM_CPUS_ON_NODE=6", "SLURM_MEM_PER_NODE=12000",
                               "SLURM_JOB_GPUS=1", "TRESOR_OUTPUT=/scratch/alice/out"},
                              {"--accel", "kvm", "--snp", "yes", "--domain-xml", "-"}));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const std::string& x = r.out;
  EXPECT_NE(x.find("<name>tresor-42.3-" + f.manifest.job_id + "</name>"), std::string::npos) << x;
  EXPECT_NE(x.find("<vcpu placement='static'>6</vcpu>"), std::string::npos) << x;
  EXPECT_NE(x.find("<memory unit='MiB'>12000</memory>"), std::string::npos) << x;
  EXPECT_NE(x.find("<launchSecurity type='sev-snp'"), std::string::npos) << x;
  EXPECT_NE(x.find("<kernel>/var/lib/tresor/images/ccta-v1/vmlinuz</kernel>"), std::string::npos) << x;
  EXPECT_NE(x.find("<cmdline>console=hvc0 panic=-1</cmdline>"), std::string::npos) << x;
  // HOST_DATA: the manifest's digest, base64.
  const auto digest = *manifest_digest(f.manifest);
  std::string b64;
  {
    auto enc = run_command({"/bin/sh", "-c", "printf '" + to_hex(digest) + "' | xxd -r -p | base64 -w0"});
    b64 = enc.out;
  }
  ASSERT_EQ(b64.size(), 44u);
  EXPECT_NE(x.find("<hostData>" + b64 + "</hostData>"), std::string::npos) << x;
  // GPU 1 of the node's table, and one read-only share per dataset; nothing writable (the
  // outputs come back over the control channel).
  EXPECT_NE(x.find("bus='0x81'"), std::string::npos) << x;
  EXPECT_EQ(x.find("bus='0x41'"), std::string::npos) << "GPU 0 is not the job's";
  EXPECT_NE(x.find("<source dir='/shared/datasets/dhz/ccta-2024'/>"), std::string::npos) << x;
  EXPECT_NE(x.find("<source dir='/shared/datasets/dhz/labels'/>"), std::string::npos) << x;
  EXPECT_EQ(x.find("<source dir='/scratch/alice/out'/>"), std::string::npos) << x;
  EXPECT_EQ(x.find("accessmode='passthrough'"), std::string::npos) << x;
  auto count = [&](std::string_view what) {
    size_t n = 0;
    for (size_t at = x.find(what); at != std::string::npos; at = x.find(what, at + 1)) ++n;
    return n;
  };
  EXPECT_EQ(count("<filesystem "), 2u) << x;
  EXPECT_EQ(count("<readonly/>"), 2u) << "every share read-only\n" << x;
  EXPECT_EQ(x.find("<source dir='/shared/datasets'/>"), std::string::npos) << "never the whole dataset tree";

  // A plain development guest: no launchSecurity, TCG.
  auto plain = run_command(f.argv({"TRESOR_BACKEND=libvirt"}, {"--accel", "tcg", "--snp", "no", "--domain-xml", "-"}));
  ASSERT_EQ(plain.exit_code, 0) << plain.err;
  EXPECT_EQ(plain.out.find("launchSecurity"), std::string::npos);
  EXPECT_NE(plain.out.find("<domain type='qemu'>"), std::string::npos) << plain.out;
  EXPECT_NE(plain.out.find("<memory unit='MiB'>2048</memory>"), std::string::npos) << "the default when the job asks for none";
}

TEST(RunnerVm, RefusalsSayWhy) {
  Fixture f;
  // Without --domain-xml the runner boots the VM. On libvirt's test driver the domain cannot
  // come up for real: the runner says what failed, leaves nothing behind and runs nothing.
  ASSERT_EQ(run_command({TRESOR_BIN, "sim", "init", f.dir.file("sim"), "--rsa-bits", "2048"}).exit_code, 0);
  auto boot = run_command(f.argv({"TRESOR_BACKEND=libvirt", "TRESOR_OUTPUT=" + f.dir.file("out")},
                                 {"--accel", "tcg", "--snp", "no", "--hypervisor", "test:///default"}));
  EXPECT_EQ(boot.exit_code, 2) << boot.err;
  EXPECT_NE(boot.err.find("tresor-run: libvirt backend: "), std::string::npos) << boot.err;
  EXPECT_NE(boot.err.find("backend libvirt: VM tresor-42.0-"), std::string::npos) << boot.err;
  EXPECT_EQ(run_command({"/bin/sh", "-c", "ls -d /tmp/tresor-job-42-vm-* 2>/dev/null"}).out, "") << "no runtime directory left";
  // An image the catalogue does not have.
  testing::write_file(f.dir.file("images.json"),
                      as_bytes(R"({"images": {"other": {"measurement": ")" + std::string(96, 'd') + R"(", "kernel": "/k", "initrd": "/i"}}})"));
  auto missing = run_command(f.argv({"TRESOR_BACKEND=libvirt"}, {"--domain-xml", "-"}));
  EXPECT_EQ(missing.exit_code, 2);
  EXPECT_NE(missing.err.find("the job's image (measurement cccccccccccccccc…) is not in this node's catalogue"), std::string::npos)
      << missing.err;
  // A malformed allocation, an unknown GPU, an unknown backend.
  testing::write_file(f.dir.file("images.json"),
                      as_bytes(R"({"images": {"ccta-v1": {"measurement": ")" + kMeasurement + R"(", "kernel": "/k", "initrd": "/i"}}})"));
  auto mem = run_command(f.argv({"TRESOR_BACKEND=libvirt", "SLURM_MEM_PER_NODE=12G"}, {"--snp", "no", "--domain-xml", "-"}));
  EXPECT_EQ(mem.exit_code, 2);
  EXPECT_NE(mem.err.find("SLURM_MEM_PER_NODE='12G' is not a number"), std::string::npos) << mem.err;
  auto gpu = run_command(f.argv({"TRESOR_BACKEND=libvirt", "SLURM_JOB_GPUS=5"}, {"--snp", "no", "--domain-xml", "-"}));
  EXPECT_EQ(gpu.exit_code, 2);
  EXPECT_NE(gpu.err.find('5'), std::string::npos) << gpu.err;
  auto snp_no_fw = run_command(f.argv({"TRESOR_BACKEND=libvirt"}, {"--snp", "yes", "--domain-xml", "-"}));
  EXPECT_EQ(snp_no_fw.exit_code, 2);
  EXPECT_NE(snp_no_fw.err.find("names no firmware"), std::string::npos) << snp_no_fw.err;
  auto backend = run_command(f.argv({"TRESOR_BACKEND=docker"}, {}));
  EXPECT_EQ(backend.exit_code, 2);
  EXPECT_NE(backend.err.find("TRESOR_BACKEND='docker' is not a backend"), std::string::npos) << backend.err;
}

}  // namespace
}  // namespace tresor
