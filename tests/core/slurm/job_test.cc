// The SPANK plugin's decisions (include/tresor/slurm/job.h): plugstack.conf arguments, the image
// catalogue, the user's options with messages that say how to fix them, and the signed manifest.
#include "tresor/slurm/job.h"

#include <gtest/gtest.h>

#include "support/test_support.h"

namespace tresor::slurm {
namespace {

using tresor::testing::FailsWith;

const std::string kMeasurement(96, 'a');
const std::string kCatalogue = R"({"images": {"ccta-v1": {"measurement": ")" + kMeasurement +
                               R"(", "description": "CT preprocessing"}, "train-v2": {"measurement": ")" + std::string(96, 'b') +
                               R"("}}, "default": "ccta-v1"})";

template <typename T>
::testing::AssertionResult RefusedWith(const Result<T>& r, const std::string& want) {
  if (r) return ::testing::AssertionFailure() << "accepted, want an error naming: " << want;
  if (r.error().message.find(want) == std::string::npos) return ::testing::AssertionFailure() << r.error().message;
  return ::testing::AssertionSuccess();
}

TEST(SlurmJob, PluginArgumentsAreStrict) {
  auto c = parse_plugin_args({"runner=/opt/tresor/bin/tresor-run", "broker=https://kbs.example:8443", "ca=/etc/tresor/ca.pem",
                              "backends=libvirt,local", "images=/etc/tresor/images.json", "gpus=/etc/tresor/gpus.conf"});
  ASSERT_TRUE(c) << c.error().message;
  EXPECT_EQ(c->runner, "/opt/tresor/bin/tresor-run");
  EXPECT_EQ(c->backends, (std::vector<std::string>{"libvirt", "local"}));
  EXPECT_EQ(c->gpus, "/etc/tresor/gpus.conf");
  EXPECT_EQ(parse_plugin_args({})->backends, std::vector<std::string>{"local"});
  // The libvirt backend's settings: confidential (SNP on KVM at qemu:///system) unless told.
  EXPECT_EQ(c->hypervisor, "qemu:///system");
  EXPECT_EQ(c->accel, "kvm");
  EXPECT_TRUE(c->snp);
  EXPECT_EQ(c->boot_timeout_s, 300u);
  EXPECT_EQ(c->step_bridge, "");  // no step network unless the administrator names one
  auto dev = parse_plugin_args({"hypervisor=qemu:///session", "accel=tcg", "snp=no", "boot_timeout=45", "step_bridge=tresor-step0"});
  ASSERT_TRUE(dev) << dev.error().message;
  EXPECT_EQ(dev->hypervisor, "qemu:///session");
  EXPECT_EQ(dev->accel, "tcg");
  EXPECT_FALSE(dev->snp);
  EXPECT_EQ(dev->boot_timeout_s, 45u);
  EXPECT_EQ(dev->step_bridge, "tresor-step0");
  struct Case {
    std::vector<std::string> args;
    const char* want;
  };
  for (const auto& k : std::vector<Case>{{{"runner"}, "not KEY=VALUE"},
                                         {{"runner=relative/path"}, "absolute path"},
                                         {{"broker=http://x:1", "ca=/c"}, "https:// URL"},
                                         {{"backends=local,kvm"}, "names 'kvm'"},
                                         {{"colour=blue"}, "unknown"},
                                         {{"runner=/a", "runner=/b"}, "given twice"},
                                         {{"broker=https://x:1"}, "go together"},
                                         {{"hypervisor=qemu"}, "libvirt URI"},
                                         {{"accel=hvf"}, "kvm or tcg"},
                                         {{"snp=maybe"}, "yes or no"},
                                         {{"boot_timeout=5"}, "from 10 to 3600"},
                                         {{"boot_timeout=-20"}, "from 10 to 3600"},
                                         {{"boot_timeout=1m"}, "from 10 to 3600"},
                                         {{"step_bridge="}, "bridge's interface name"},
                                         {{"step_bridge=br0;rm"}, "not 'br0;rm'"},
                                         {{"step_bridge=tresor-step-network"}, "1..15"},
                                         {{"step_bridge=.."}, "not '..'"}}) {
    auto r = parse_plugin_args(k.args);
    ASSERT_FALSE(r);
    EXPECT_NE(r.error().message.find(k.want), std::string::npos) << r.error().message;
  }
}

TEST(SlurmJob, ImageCatalogue) {
  auto c = parse_image_catalogue(kCatalogue);
  ASSERT_TRUE(c) << c.error().message;
  EXPECT_EQ(c->default_image, "ccta-v1");
  EXPECT_EQ(to_hex(c->images.at("ccta-v1").measurement), kMeasurement);
  EXPECT_FALSE(parse_image_catalogue(R"({"images": {"x": {"measurement": "abcd"}}})"));
  EXPECT_FALSE(parse_image_catalogue(R"({"images": {}, "default": "nope"})"));
  EXPECT_FALSE(parse_image_catalogue(R"({"images": {"x": {"measurement": ")" + kMeasurement + R"(", "extra": 1}}})"));
  EXPECT_FALSE(parse_image_catalogue("not json"));

  // The boot files the libvirt backend needs, absolute paths; the command line as written.
  auto vm = parse_image_catalogue(R"({"images": {"ccta-v1": {"measurement": ")" + kMeasurement +
                                  R"(", "kernel": "/img/vmlinuz", "initrd": "/img/initrd", "cmdline": "console=hvc0 quiet", "firmware": "/fw/OVMF.fd", "vcpus": 4}}})");
  ASSERT_TRUE(vm) << vm.error().message;
  const Image& img = vm->images.at("ccta-v1");
  EXPECT_EQ(img.kernel, "/img/vmlinuz");
  EXPECT_EQ(img.initrd, "/img/initrd");
  EXPECT_EQ(img.cmdline, "console=hvc0 quiet");
  EXPECT_EQ(img.firmware, "/fw/OVMF.fd");
  EXPECT_EQ(img.vcpus, 4u);
  EXPECT_TRUE(RefusedWith(parse_image_catalogue(R"({"images": {"x": {"measurement": ")" + kMeasurement + R"(", "vcpus": 0}}})"),
                          "vcpus of 'x' must be a number from 1 to 512"));
  EXPECT_TRUE(parse_image_catalogue(kCatalogue)->images.at("ccta-v1").kernel.empty());
  EXPECT_TRUE(RefusedWith(parse_image_catalogue(R"({"images": {"x": {"measurement": ")" + kMeasurement + R"(", "kernel": "vmlinuz"}}})"),
                      "kernel of 'x' must be an absolute path"));
  EXPECT_TRUE(RefusedWith(parse_image_catalogue(R"({"images": {"x": {"measurement": ")" + kMeasurement + R"(", "cmdline": 3}}})"),
                      "cmdline of 'x' must be a string"));
}

TEST(SlurmJob, OptionsAreCheckedWithMessagesThatSayHowToFixThem) {
  auto config = *parse_plugin_args({"backends=local"});
  auto images = *parse_image_catalogue(kCatalogue);
  auto alice = *Identity::generate();
  JobOptions o;
  o.datasets = "dhz/ccta-2024,dhz/ccta-2025,dhz/ccta-2024";
  auto r = check_options(o, config, images, "/home/alice/run");
  ASSERT_TRUE(r) << r.error().message;
  EXPECT_EQ(r->datasets, (std::vector<std::string>{"dhz/ccta-2024", "dhz/ccta-2025"}));
  EXPECT_EQ(r->image.name, "ccta-v1") << "the catalogue's default";
  EXPECT_EQ(r->backend, "local");
  EXPECT_EQ(r->output, "/home/alice/run/tresor-output");
  o.output = "out/../results";
  EXPECT_EQ(check_options(o, config, images, "/home/alice/run")->output, "/home/alice/run/results");
  o.recipients = {"# team\n" + alice.recipient().to_string() + "\n"};
  EXPECT_EQ(check_options(o, config, images, "/")->recipients, std::vector<Recipient>{alice.recipient()});

  JobOptions none;
  EXPECT_TRUE(RefusedWith(check_options(none, config, images, "/"), "--tresor-dataset is required"));
  JobOptions bad_id = o;
  bad_id.datasets = "dhz//x";
  EXPECT_TRUE(RefusedWith(check_options(bad_id, config, images, "/"), "dataset ids look like dhz/ccta-2024"));
  JobOptions bad_image = o;
  bad_image.image = "mystery";
  EXPECT_TRUE(RefusedWith(check_options(bad_image, config, images, "/"), "not in this cluster's image catalogue (ccta-v1, train-v2)"));
  JobOptions bad_backend = o;
  bad_backend.backend = "libvirt";
  EXPECT_TRUE(RefusedWith(check_options(bad_backend, config, images, "/"), "not allowed on this cluster (allowed: local)"));
  JobOptions bad_recipient = o;
  bad_recipient.recipients = {"tresor1notarecipient"};
  EXPECT_TRUE(RefusedWith(check_options(bad_recipient, config, images, "/"), "--tresor-recipient"));
  EXPECT_TRUE(RefusedWith(check_options(o, config, ImageCatalogue{}, "/"), "--tresor-image is required"));
}

TEST(SlurmJob, ManifestIsSignedByTheUserAndTravelsInTheEnvironment) {
  auto images = *parse_image_catalogue(kCatalogue);
  auto alice = *Identity::generate();
  JobOptions o;
  o.datasets = "dhz/ccta-2024";
  auto req = *check_options(o, *parse_plugin_args({}), images, "/");
  const std::string script = "#!/bin/sh\necho hi\n";
  auto m = build_manifest(req, alice, as_bytes(script), 1'800'000'000, 3600);
  ASSERT_TRUE(m) << m.error().message;
  EXPECT_TRUE(m->job_id.starts_with("t-"));
  EXPECT_EQ(m->job_id.size(), 18u);
  EXPECT_EQ(m->output_recipients, std::vector<Recipient>{alice.recipient()}) << "the user by default";
  EXPECT_EQ(to_hex(m->image_measurement), kMeasurement);
  EXPECT_EQ(m->script_sha256, *crypto::sha256(as_bytes(script)));
  EXPECT_TRUE(verify_manifest(*m, 1'800'000'000));
  EXPECT_FALSE(verify_manifest(*m, 1'800'003'600)) << "expires";
  auto env = encode_manifest_env(*m);
  ASSERT_TRUE(env);
  EXPECT_EQ(env->find_first_not_of("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"), std::string::npos);
  EXPECT_EQ(*decode_manifest_env(*env), *m);
  EXPECT_TRUE(FailsWith(decode_manifest_env("%%%"), ErrorCode::kInvalidArgument));
  EXPECT_NE(build_manifest(req, alice, as_bytes(script), 1'800'000'000, 3600)->job_id, m->job_id) << "fresh ids";
}

}  // namespace
}  // namespace tresor::slurm

namespace tresor::slurm {
namespace {

TEST(SlurmJob, FindsTheScriptOrCommandAfterTheOptions) {
  using V = std::vector<std::string>;
  EXPECT_EQ(find_operand(V{"sbatch", "job.sh"}, true), 1u);
  EXPECT_EQ(find_operand(V{"sbatch", "-o", "out.txt", "--tresor-dataset=dhz/a", "job.sh", "arg"}, true), 4u);
  EXPECT_EQ(find_operand(V{"sbatch", "-oout.txt", "-N1", "--wait", "job.sh"}, true), 4u);
  EXPECT_EQ(find_operand(V{"sbatch", "--partition", "debug", "--exclusive", "job.sh"}, true), 4u);
  EXPECT_EQ(find_operand(V{"srun", "-vvN", "1", "--tresor-backend", "local", "true"}, false), 5u) << "-N in a cluster takes the next word";
  EXPECT_EQ(find_operand(V{"srun", "--", "-weird-command"}, false), 2u);
  EXPECT_EQ(find_operand(V{"sbatch", "--wait"}, true), std::nullopt) << "script from stdin";
  EXPECT_EQ(find_operand(V{"sbatch", "-o"}, true), std::nullopt);
  EXPECT_EQ(find_operand(V{"sbatch", "-W", "job.sh"}, true), 2u) << "sbatch -W is --wait";
  EXPECT_EQ(find_operand(V{"srun", "-W", "30", "-r", "1", "hostname"}, false), 5u) << "srun -W and -r take values";
  EXPECT_EQ(find_operand(V{"sbatch", "--nice", "--reboot", "job.sh"}, true), 3u);
}

}  // namespace
}  // namespace tresor::slurm

namespace tresor::slurm {
namespace {

TEST(SlurmJob, GpusMapFromSlurmIndicesToPciAddresses) {
  auto table = parse_gpu_table("# node gpu42\n0 0000:41:00.0\n1 0000:c1:00.0  # second\n\n");
  ASSERT_TRUE(table) << table.error().message;
  EXPECT_EQ(table->size(), 2u);
  EXPECT_EQ(*job_gpus("1,0", "", *table), (std::vector<std::string>{"0000:c1:00.0", "0000:41:00.0"}));
  EXPECT_EQ(*job_gpus("", "0", *table), std::vector<std::string>{"0000:41:00.0"}) << "CUDA_VISIBLE_DEVICES when Slurm names none";
  EXPECT_TRUE(job_gpus("", "", *table)->empty());
  auto unknown = job_gpus("2", "", *table);
  ASSERT_FALSE(unknown);
  EXPECT_NE(unknown.error().message.find("GPU 2 of this job is not in the node's GPU table"), std::string::npos);
  EXPECT_FALSE(job_gpus("0,x", "", *table));
  for (const char* bad : {"0 41:00.0\n", "x 0000:41:00.0\n", "0 0000:41:00.0\n0 0000:c1:00.0\n", "0 0000:41:00.0 extra\n", "0\n"}) {
    EXPECT_FALSE(parse_gpu_table(bad)) << bad;
  }
}

TEST(SlurmJob, TaskPrologFromSlurmConfAndItsOutput) {
  EXPECT_EQ(task_prolog_from_slurm_conf("ClusterName=c\n# TaskProlog=/commented\ntaskprolog = /etc/slurm/task-prolog.sh  # site\n"),
            "/etc/slurm/task-prolog.sh");
  EXPECT_EQ(task_prolog_from_slurm_conf("TaskProlog=/a\nTaskProlog=/b\n"), "/b") << "the last one wins";
  EXPECT_EQ(task_prolog_from_slurm_conf("TaskPlugin=task/none\nTaskEpilog=/x\n"), "");
  std::map<std::string, std::string> env = {{"KEEP", "1"}, {"DROP", "2"}};
  const std::string printed =
      apply_task_prolog_output("export MODULEPATH=/opt/m:/usr/m\nunset DROP\nprint hello from the prolog\nnoise line\nexport =bad\n", env);
  EXPECT_EQ(printed, "hello from the prolog\n");
  EXPECT_EQ(env, (std::map<std::string, std::string>{{"KEEP", "1"}, {"MODULEPATH", "/opt/m:/usr/m"}}));
}

}  // namespace
}  // namespace tresor::slurm
