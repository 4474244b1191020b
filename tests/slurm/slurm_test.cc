// The SPANK plugin and tresor-run on a real one-node Slurm cluster on 127.0.0.1 (munged,
// slurmctld, slurmd started by scripts/slurm-cluster; issue 5): options checked at
// submission with messages that say how to fix them, confidential steps wrapped by tresor-run in
// the local sandbox, exit codes and deaths by signal exactly as without Tresor, no re-wrapping of
// an srun inside a confidential job, and nothing left behind after scancel.
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "support/test_support.h"
#include "tresor/encoding.h"

namespace tresor {
namespace {

using tresor::testing::CommandResult;
using tresor::testing::run_command;
using tresor::testing::TempDir;

int free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a);
  socklen_t len = sizeof a;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  ::close(fd);
  return ntohs(a.sin_port);
}

std::string slurp(const std::string& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

constexpr const char* kMarker = "PLAINTEXT-MARKER-7319";

class Slurm : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { start_cluster(false); }
  // The whole setting; `vm`: the libvirt backend allowed (first), with a guest image built here.
  static void start_cluster(bool vm) {
    if (::access("/usr/sbin/slurmctld", X_OK) != 0 || ::geteuid() != 0) {
      skip_ = "needs Slurm (scripts/bootstrap installs it) and root to run its daemons";
      return;
    }
    dir_ = new TempDir();
    auto ok = [](const CommandResult& r) {
      EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
      return r;
    };
    // The data owner's side: a sim root (this machine has no SEV-SNP), a broker that trusts it,
    // a dataset sealed from a marker text with a key only the broker holds, a policy approving
    // the catalogue's image, and the user alice with a grant. bob is registered without one.
    const std::string sim = dir_->file("sim");
    ok(run_command({TRESOR_BIN, "sim", "init", sim, "--rsa-bits", "2048"}));
    const std::string broker = dir_->file("broker");
    ok(run_command({TRESOR_BROKER_BIN, "--init", broker, "--port", "0", "--sim-trust", sim}));
    broker_ = new tresor::testing::Background({TRESOR_BROKER_BIN, "--config", broker + "/broker.toml"});
    const int port = tresor::testing::port_in(broker_->first_line());
    ASSERT_GT(port, 0) << broker_->first_line();
    auto admin = [&](std::vector<std::string> args) {
      args.insert(args.begin(), {TRESOR_BIN, "admin", "--socket", broker + "/admin.sock"});
      return ok(run_command(args));
    };
    for (const char* who : {"alice", "bob"}) {
      auto id = ok(run_command({TRESOR_BIN, "keygen", "-o", dir_->file(who)}));
      admin({"user", "add", who, id.out.substr(0, id.out.find('\n'))});
    }
    const std::string input = dir_->file("input.txt");
    std::ofstream(input) << kMarker << " coronary lumen\n";
    std::filesystem::create_directories(dir_->file("datasets/dhz/ccta-2024"));
    ok(run_command({TRESOR_BIN, "seal", "--dataset", "dhz/ccta-2024", "--broker", "unix:" + broker + "/admin.sock", "-r",
                    recipient("alice"), "-o", dir_->file("datasets/dhz/ccta-2024/input.txt.sealed"), input}));
    // A second dataset whose one file has been tampered with.
    std::filesystem::create_directories(dir_->file("datasets/dhz/tampered"));
    ok(run_command({TRESOR_BIN, "seal", "--dataset", "dhz/tampered", "--broker", "unix:" + broker + "/admin.sock", "-r",
                    recipient("alice"), "-o", dir_->file("datasets/dhz/tampered/input.txt.sealed"), input}));
    {
      std::fstream f(dir_->file("datasets/dhz/tampered/input.txt.sealed"), std::ios::in | std::ios::out | std::ios::binary);
      f.seekp(-20, std::ios::end);
      f.put('\x5a');
    }
    // The CCTA preprocessing example's dataset, made by the example's own script: two small
    // phantoms sealed under a key the broker creates.
    ok(run_command({"/usr/bin/env", std::string("TRESOR_BIN=") + TRESOR_BIN, TRESOR_EXAMPLES_DIR "/ccta-preprocess/make-dataset.sh", dir_->file("datasets"),
                    broker + "/admin.sock", "2", "200x200x136", "0.6x0.6x0.6"}));
    std::ofstream(dir_->file("policy.json"))
        << R"({"attestation": {"measurements": [")" << std::string(96, 'a')
        << R"("], "min_tcb": {"bootloader": 0, "tee": 0, "snp": 0, "microcode": 0}, "allow_smt": true, "products": ["Sim"]}})";
    for (const char* ds : {"dhz/ccta-2024", "dhz/tampered", "demo/ccta-phantoms"}) {
      admin({"policy", "set", ds, dir_->file("policy.json")});
      admin({"grant", "alice", ds});
    }
    admin_socket_ = broker + "/admin.sock";
    // Jobs of other users read the CA and the data through these: the test's directory is
    // private (0700) otherwise; the broker's keys stay 0600 in its own 0700 directory.
    std::filesystem::copy_file(broker + "/tls.crt", dir_->file("ca.pem"));
    std::filesystem::permissions(dir_->file("ca.pem"), std::filesystem::perms(0644));
    std::filesystem::permissions(dir_->path(), std::filesystem::perms(0755));

    // The cluster: the plugin with the runner, agent, broker, datasets and sim root.
    const std::string images = dir_->file("images.json");
    std::string boot_files, vm_args;
    if (vm) {
      if (::access("/usr/sbin/libvirtd", X_OK) != 0 || ::access("/usr/bin/qemu-system-x86_64", X_OK) != 0 ||
          ::access("/bin/busybox", X_OK) != 0) {
        skip_ = "needs libvirtd, QEMU and busybox-static (scripts/bootstrap installs them)";
        return;
      }
      // With everything installed, an image or a daemon that fails is a failure, not a skip.
      // step-probe (one rank of a step) and tresor-train (the CPU trainer), for the step-network
      // tests.
      auto image = run_command({TRESOR_BIN, "image", "build", "-o", dir_->file("image"), "--agent", TRESOR_AGENT_BIN, "--program", TRESOR_STEP_PROBE_BIN,
                                "--program", TRESOR_TRAIN_BIN});
      auto lv = run_command({TRESOR_LIBVIRT_LOCAL, "start"});
      started_libvirt_ = true;
      if (image.exit_code != 0 || lv.exit_code != 0) {
        fail_ = "the guest image or libvirtd failed: " + image.err + lv.err;
        return;
      }
      boot_files = R"(, "kernel": ")" + dir_->file("image/vmlinux") + R"(", "initrd": ")" + dir_->file("image/initrd.cpio") +
                   R"(", "cmdline": "console=ttyS0 panic=-1 loglevel=4")";
      // The node's step network: a bridge with a DHCP server, as an administrator would make it.
      step_bridge_ = new tresor::testing::StepBridge("trtest-step1", "10.231.8", dir_->path().string());
      if (!step_bridge_->error().empty()) {
        fail_ = step_bridge_->error();
        return;
      }
      vm_args = " hypervisor=qemu:///system accel=tcg snp=no step_bridge=" + step_bridge_->name();
      // QEMU runs as libvirt's own user and reads the (ciphertext) datasets through 9p.
      run_command({"/bin/chmod", "-R", "a+rX", dir_->file("datasets")});
    }
    std::ofstream(images) << R"({"images": {"ccta-v1": {"measurement": ")" << std::string(96, 'a') << "\"" << boot_files
                          << R"(}}, "default": "ccta-v1"})";
    // The runner and agent run as the job's user: copies in the test's world-readable directory,
    // whatever the permissions of the build tree (a clone in a private temporary directory).
    std::filesystem::create_directories(dir_->file("bin"));
    for (const char* bin : {TRESOR_RUN_BIN, TRESOR_AGENT_BIN}) {
      const auto to = std::filesystem::path(dir_->file("bin")) / std::filesystem::path(bin).filename();
      std::filesystem::copy_file(bin, to);
      std::filesystem::permissions(to, std::filesystem::perms(0755));
    }
    const std::string plugstack = dir_->file("plugstack.conf");
    std::ofstream(plugstack) << "required " << TRESOR_SPANK_SO << " runner=" << dir_->file("bin/tresor-run")
                             << " agent=" << dir_->file("bin/tresor-agent")
                             << " images=" << images << (vm ? " backends=libvirt,local" : " backends=local") << vm_args << " broker=https://127.0.0.1:" << port << " ca=" << dir_->file("ca.pem")
                             << " datasets=" << dir_->file("datasets") << " sim=" << sim << "\n";
    // A TaskProlog, as sites use for modules and environment: Slurm runs it for plain tasks, the
    // runner for wrapped ones.
    const std::string prolog = dir_->file("task-prolog.sh");
    std::ofstream(prolog) << "#!/bin/sh\necho \"export TRESOR_TEST_PROLOG=ran-$SLURM_JOB_ID\"\necho \"unset TRESOR_TEST_UNSET\"\n"
                             "echo \"print prolog-says-hello\"\n";
    std::filesystem::permissions(prolog, std::filesystem::perms(0755));
    // A TaskEpilog: slurmstepd runs it itself after each task, wrapped or not (the plugin's exec
    // replaces only the task). It records the step and the task's environment it saw.
    const std::string epilog = dir_->file("task-epilog.sh");
    std::ofstream(epilog) << "#!/bin/sh\necho \"$SLURM_JOB_ID.$SLURM_STEP_ID manifest=${TRESOR_MANIFEST:+yes}\" >> " << dir_->file("task-epilog.log")
                          << "\n";
    std::filesystem::permissions(epilog, std::filesystem::perms(0755));
    ok(run_command({TRESOR_SLURM_CLUSTER, "start", dir_->file("cluster"), std::to_string(free_port()), std::to_string(free_port()),
                    plugstack, prolog, epilog}));
  }
  static void TearDownTestSuite() {
    if (dir_ != nullptr) {
      run_command({TRESOR_SLURM_CLUSTER, "stop", dir_->file("cluster")});
      // Only the VM suite's: the other Slurm tests run beside the VM tests of other suites (they
      // hold no libvirtd lock), whose daemons they must not stop.
      if (started_libvirt_) run_command({TRESOR_LIBVIRT_LOCAL, "stop"});
      delete step_bridge_;
      step_bridge_ = nullptr;
      delete broker_;
      broker_ = nullptr;
      delete dir_;
      dir_ = nullptr;
    }
  }
  void SetUp() override {
    if (!skip_.empty()) GTEST_SKIP() << skip_;
    if (!fail_.empty()) FAIL() << fail_;
  }
  static std::string recipient(const std::string& who) {
    auto r = run_command({TRESOR_BIN, "pubkey", dir_->file(who)});
    return r.out.substr(0, r.out.find('\n'));
  }
  // A Slurm command as `who` (their identity), with the cluster's configuration, from `cwd`.
  static CommandResult slurm(std::vector<std::string> args, const std::string& who = "alice") {
    args.insert(args.begin(), {"/usr/bin/env", "SLURM_CONF=" + dir_->file("cluster") + "/slurm.conf",
                               "TRESOR_IDENTITY=" + (who.starts_with("/") ? who : dir_->file(who))});
    return run_command(args);
  }
  // Opens a sealed output with alice's identity.
  static std::string open_as_alice(const std::string& sealed) {
    auto r = run_command({TRESOR_BIN, "open", "-i", dir_->file("alice"), "-o", "-", sealed});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    return r.out;
  }
  static inline TempDir* dir_ = nullptr;
  static inline tresor::testing::Background* broker_ = nullptr;
  static inline std::string skip_, fail_, admin_socket_;
  static inline bool started_libvirt_ = false;  // this process started libvirtd (the VM suite)
  static inline tresor::testing::StepBridge* step_bridge_ = nullptr;  // the VM suite's step network
};

TEST_F(Slurm, AJobWithoutTresorOptionsRunsAsUsual) {
  auto r = slurm({"/usr/bin/srun", "sh", "-c", "echo plain; echo inside=${TRESOR_INSIDE_JOB:-no}"});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("inside=no"), std::string::npos) << r.out;
  EXPECT_EQ(r.err.find("tresor-run"), std::string::npos) << r.err;
}

TEST_F(Slurm, BadOptionsAreRefusedAtSubmissionWithHowToFixThem) {
  struct Case {
    std::vector<std::string> options;
    std::string identity;
    const char* want;
  };
  const std::vector<Case> cases = {
      {{"--tresor-dataset=dhz//x"}, "", "dataset ids look like dhz/ccta-2024"},
      {{"--tresor-dataset=dhz/a", "--tresor-image=mystery"}, "", "not in this cluster's image catalogue (ccta-v1)"},
      {{"--tresor-dataset=dhz/a", "--tresor-backend=libvirt"}, "", "not allowed on this cluster (allowed: local)"},
      {{"--tresor-image=ccta-v1"}, "", "--tresor-dataset is required"},
      {{"--tresor-dataset=dhz/a"}, "/nonexistent/identity", "create one with: tresor keygen -o /nonexistent/identity"},
  };
  for (const auto& k : cases) {
    SCOPED_TRACE(k.want);
    std::vector<std::string> args = {"/usr/bin/srun"};
    args.insert(args.end(), k.options.begin(), k.options.end());
    args.insert(args.end(), {"sh", "-c", "echo SHOULD-NOT-RUN"});
    auto r = slurm(args, k.identity.empty() ? "alice" : k.identity);
    EXPECT_NE(r.exit_code, 0);
    EXPECT_NE(r.err.find(k.want), std::string::npos) << r.err;
    EXPECT_EQ(r.out.find("SHOULD-NOT-RUN"), std::string::npos) << "nothing ran";
  }
}

std::string sandbox_dirs() { return run_command({"/bin/sh", "-c", "ls -d /tmp/tresor-job-* 2>/dev/null"}).out; }

TEST_F(Slurm, AConfidentialStepReadsItsDecryptedInputAndItsOutputIsSealedToTheUser) {
  const std::string out = dir_->file("step-out");
  const std::string sandboxes_before = sandbox_dirs();
  auto r = slurm({"/usr/bin/srun", "--tresor-dataset=dhz/ccta-2024", "--tresor-output=" + out, "sh", "-c",
                  "echo inside=$TRESOR_INSIDE_JOB pid=$$; grep -q \" $TMPDIR tmpfs\" /proc/self/mounts && echo private-tmp; "
                  "tr a-z A-Z < $TRESOR_DATA/dhz/ccta-2024/input.txt > $TRESOR_OUTPUT_DIR/result.txt"});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_NE(r.err.find("NOT confidential"), std::string::npos) << "the local backend says so: " << r.err;
  EXPECT_NE(r.err.find("key of dataset dhz/ccta-2024 released"), std::string::npos) << r.err;
  EXPECT_NE(r.out.find("inside=1 pid="), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("private-tmp"), std::string::npos) << "TMPDIR is a private tmpfs: " << r.out;
  EXPECT_EQ(open_as_alice(out + "/result.txt.sealed"), "PLAINTEXT-MARKER-7319 CORONARY LUMEN\n");
  // No plaintext anywhere the host or other users can see: not in the job directory, not in any
  // file under the test's directories (the sealed inputs, the broker, the cluster's spool), not
  // in a leftover sandbox directory.
  auto scan = run_command({"/usr/bin/grep", "-rl", "--binary-files=text", "-e", kMarker, "-e", "CORONARY", dir_->path().string()});
  std::string hits;
  std::istringstream lines(scan.out);
  for (std::string line; std::getline(lines, line);) {
    if (line != dir_->file("input.txt")) hits += line + "\n";  // the data owner's own plaintext
  }
  EXPECT_EQ(hits, "") << "plaintext found in:\n" << hits;
  EXPECT_EQ(sandbox_dirs(), sandboxes_before) << "no sandbox directory left";
}

TEST_F(Slurm, EachTaskOfAStepSealsIntoItsOwnDirectory) {
  const std::string out = dir_->file("tasks-out");
  auto r = slurm({"/usr/bin/srun", "-n", "2", "--tresor-dataset=dhz/ccta-2024", "--tresor-output=" + out, "sh", "-c",
                  "head -c 9 $TRESOR_DATA/dhz/ccta-2024/input.txt > $TRESOR_OUTPUT_DIR/rank.txt; echo $SLURM_PROCID >> $TRESOR_OUTPUT_DIR/rank.txt"});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_EQ(open_as_alice(out + "/task-0/rank.txt.sealed"), "PLAINTEXT0\n");
  EXPECT_EQ(open_as_alice(out + "/task-1/rank.txt.sealed"), "PLAINTEXT1\n");
}

TEST_F(Slurm, UnderSallocEachStepIsSignedForItsOwnCommand) {
  const std::string out = dir_->file("salloc-out");
  // salloc's own command runs unwrapped on the submitting host; the srun inside it is a
  // confidential step with the allocation's options and a manifest signed for its command line.
  auto r = slurm({"/usr/bin/salloc", "--tresor-dataset=dhz/ccta-2024", "--tresor-output=" + out, "/usr/bin/srun", "sh", "-c",
                  "echo step-inside=$TRESOR_INSIDE_JOB; tr a-z A-Z < $TRESOR_DATA/dhz/ccta-2024/input.txt > $TRESOR_OUTPUT_DIR/result.txt"});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_NE(r.out.find("step-inside=1"), std::string::npos) << r.out << r.err;
  EXPECT_EQ(open_as_alice(out + "/result.txt.sealed"), "PLAINTEXT-MARKER-7319 CORONARY LUMEN\n");
}

TEST_F(Slurm, TheTaskEpilogRunsAfterAWrappedTaskAsAfterAPlainOne) {
  for (const bool wrapped : {false, true}) {
    std::vector<std::string> argv = {"/usr/bin/srun"};
    if (wrapped) argv.push_back("--tresor-dataset=dhz/ccta-2024");
    argv.insert(argv.end(), {"sh", "-c", "echo job=$SLURM_JOB_ID.$SLURM_STEP_ID"});
    auto r = slurm(argv);
    ASSERT_EQ(r.exit_code, 0) << r.err;
    const size_t at = r.out.find("job=");
    ASSERT_NE(at, std::string::npos) << r.out;
    const std::string step = r.out.substr(at + 4, r.out.find('\n', at) - at - 4);
    // slurmstepd runs the epilog after the task has ended: wait for its line.
    std::string log;
    for (int i = 0; i < 50 && log.find(step + " ") == std::string::npos; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
      log = slurp(dir_->file("task-epilog.log"));
    }
    EXPECT_NE(log.find(step + " manifest=" + (wrapped ? "yes" : "") + "\n"), std::string::npos) << step << "\n" << log;
  }
}

TEST_F(Slurm, TheTaskPrologShapesAWrappedTaskAsAPlainOne) {
  const std::string script = "echo prolog=$TRESOR_TEST_PROLOG unset=${TRESOR_TEST_UNSET:-gone}";
  auto plain = slurm({"/usr/bin/env", "TRESOR_TEST_UNSET=still-here", "/usr/bin/srun", "sh", "-c", script});
  auto wrapped = slurm({"/usr/bin/env", "TRESOR_TEST_UNSET=still-here", "/usr/bin/srun", "--tresor-dataset=dhz/ccta-2024", "sh", "-c", script});
  ASSERT_EQ(plain.exit_code, 0) << plain.err;
  ASSERT_EQ(wrapped.exit_code, 0) << wrapped.err;
  for (const auto* r : {&plain, &wrapped}) {
    EXPECT_NE(r->out.find("prolog=ran-"), std::string::npos) << r->out;
    EXPECT_NE(r->out.find("unset=gone"), std::string::npos) << r->out;
    EXPECT_NE(r->out.find("prolog-says-hello"), std::string::npos) << r->out;
  }
}

TEST_F(Slurm, AUserWithoutAGrantGetsAClearFailureAndTheBrokerRecordsTheDenial) {
  const std::string out = dir_->file("bob-out");
  auto r = slurm({"/usr/bin/srun", "--tresor-dataset=dhz/ccta-2024", "--tresor-output=" + out, "sh", "-c", "echo SHOULD-NOT-RUN"},
                 "bob");
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("the key of dataset 'dhz/ccta-2024' was not released"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("ask the data owner for a grant"), std::string::npos) << r.err;
  EXPECT_EQ(r.out.find("SHOULD-NOT-RUN"), std::string::npos);
  auto audit = run_command({TRESOR_BIN, "admin", "--socket", admin_socket_, "audit", "show"});
  EXPECT_NE(audit.out.find("holds no grant"), std::string::npos) << audit.out;
}

TEST_F(Slurm, ATamperedInputFailsTheJobBeforeItRunsAndLeavesNoOutput) {
  const std::string out = dir_->file("tampered-out");
  auto r = slurm({"/usr/bin/srun", "--tresor-dataset=dhz/tampered", "--tresor-output=" + out, "sh", "-c",
                  "echo SHOULD-NOT-RUN > $TRESOR_OUTPUT_DIR/x"});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_NE(r.err.find("input.txt.sealed cannot be opened"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("the job did not run"), std::string::npos) << r.err;
  EXPECT_EQ(run_command({"/bin/sh", "-c", "ls -A " + out}).out, "") << "no output";
}

TEST_F(Slurm, ExitCodesAndDeathsBySignalAreReportedAsWithoutTresor) {
  for (const std::string script : {"exit 3", "kill -TERM $$", "kill -KILL $$"}) {
    SCOPED_TRACE(script);
    auto plain = slurm({"/usr/bin/srun", "sh", "-c", script});
    auto wrapped = slurm({"/usr/bin/srun", "--tresor-dataset=dhz/ccta-2024", "sh", "-c", script});
    EXPECT_EQ(wrapped.exit_code, plain.exit_code) << wrapped.err << "\n-- plain --\n" << plain.err;
    EXPECT_NE(plain.exit_code, 0);
  }
}

TEST_F(Slurm, ABatchJobReadsItsInputWritesAResultAndIsWrappedOnce) {
  const std::string script = dir_->file("job.sh");
  const std::string results = dir_->file("batch-results");
  std::ofstream(script) << "#!/bin/sh\n#SBATCH --tresor-dataset=dhz/ccta-2024\n#SBATCH --tresor-output=" << results
                        << "\necho batch inside=$TRESOR_INSIDE_JOB\n"
                           "srun sh -c 'echo step inside=$TRESOR_INSIDE_JOB'\n"
                           "mkdir -p $TRESOR_OUTPUT_DIR/stats\n"
                           "wc -w < $TRESOR_DATA/dhz/ccta-2024/input.txt > $TRESOR_OUTPUT_DIR/stats/words.txt\n"
                           "exit 4\n";
  const std::string out = dir_->file("job.out");
  auto r = slurm({"/usr/bin/sbatch", "--wait", "-o", out, script});
  EXPECT_EQ(r.exit_code, 4) << "the job's exit code comes back: " << r.err << slurp(out);
  const std::string log = slurp(out);
  EXPECT_NE(log.find("batch inside=1"), std::string::npos) << log;
  EXPECT_NE(log.find("step inside=1"), std::string::npos) << log;
  size_t banners = 0;
  for (size_t p = log.find("tresor-run: job"); p != std::string::npos; p = log.find("tresor-run: job", p + 1)) ++banners;
  EXPECT_EQ(banners, 1u) << "the inner srun is not wrapped again:\n" << log;
  EXPECT_NE(log.find("this step runs outside the job's sandbox"), std::string::npos) << "and says where it runs:\n" << log;
  // A failed job's outputs are sealed too, in their subdirectory.
  EXPECT_EQ(open_as_alice(results + "/stats/words.txt.sealed"), "3\n");
}

// examples/ccta-preprocess as a user runs it: sbatch prep-job.sh on the sealed phantoms; the job
// preprocesses every case in private memory and its outputs come back sealed to the user, the
// same as `tresor prep` gives on the plaintext.
TEST_F(Slurm, TheCctaPreprocessingExampleRunsOnTheSealedPhantoms) {
  const std::string results = dir_->file("prep-results");
  const std::string out = dir_->file("prep.out");
  auto r = slurm({std::string("TRESOR_BIN=") + TRESOR_BIN, "PREP_SPACING=0.8", "PREP_PATCHES=2", "PREP_PATCH_SIZE=32x32x24", "/usr/bin/sbatch", "--wait",
                  "--tresor-output=" + results, "-o", out, TRESOR_EXAMPLES_DIR "/ccta-preprocess/prep-job.sh"});
  const std::string log = slurp(out);
  ASSERT_EQ(r.exit_code, 0) << r.err << log;
  EXPECT_NE(log.find("ccta-prep: 2 entries in demo/ccta-phantoms"), std::string::npos) << log;
  EXPECT_NE(log.find("prep: 2 cases in"), std::string::npos) << log;
  size_t files = 0;
  for (const auto& e : std::filesystem::recursive_directory_iterator(results)) {
    if (!e.is_regular_file()) continue;
    ++files;
    EXPECT_TRUE(e.path().string().ends_with(".sealed")) << "only sealed outputs: " << e.path();
  }
  EXPECT_EQ(files, 2u * (5 + 2 * 2)) << "image, vesselness, labels, preview, prep.json and two patch pairs per case";
  const auto j = nlohmann::json::parse(open_as_alice(results + "/case02/prep.json.sealed"));
  EXPECT_EQ(j["output"]["dims"], nlohmann::json({150, 150, 102}));
  EXPECT_GE(j["coronary_vesselness_roc_auc"].get<double>(), 0.8) << j.dump();
  EXPECT_EQ(open_as_alice(results + "/case01/preview.png.sealed").substr(1, 3), "PNG");
  EXPECT_NE(log.find("(inputs opened)"), std::string::npos) << log;

  // The same job with TRESOR_INPUTS=sealed on the GPU's emulation: the agent opens nothing and
  // gives the job the files' own keys; each case goes through the secure channel; the same results.
  const std::string results2 = dir_->file("prep-results-sealed");
  const std::string out2 = dir_->file("prep-sealed.out");
  auto s = slurm({std::string("TRESOR_BIN=") + TRESOR_BIN, "TRESOR_INPUTS=sealed", "PREP_DEVICE=emulated", "PREP_SPACING=0.8", "PREP_PATCHES=2",
                  "PREP_PATCH_SIZE=32x32x24", "/usr/bin/sbatch", "--wait", "--tresor-output=" + results2, "-o", out2,
                  TRESOR_EXAMPLES_DIR "/ccta-preprocess/prep-job.sh"});
  const std::string log2 = slurp(out2);
  ASSERT_EQ(s.exit_code, 0) << s.err << log2;
  EXPECT_NE(log2.find("2 entries in demo/ccta-phantoms (inputs sealed)"), std::string::npos) << log2;
  EXPECT_NE(log2.find("4 sealed input file(s) left sealed for the job"), std::string::npos) << log2;
  EXPECT_NE(log2.find("on the emulated GPU"), std::string::npos) << log2;
  const auto j2 = nlohmann::json::parse(open_as_alice(results2 + "/case02/prep.json.sealed"));
  EXPECT_EQ(j2["transfer"]["input"], "secure channel: sealed frames into device memory, decrypted there") << j2.dump();
  EXPECT_EQ(j2["normalisation"], j["normalisation"]);
  EXPECT_EQ(j2["output"], j["output"]);
  EXPECT_EQ(open_as_alice(results2 + "/case01/labels.nii.sealed"), open_as_alice(results + "/case01/labels.nii.sealed"));
  // A value other than opened or sealed: the job does not run, and says why.
  const std::string out3 = dir_->file("prep-bad.out");
  auto bad = slurm({std::string("TRESOR_BIN=") + TRESOR_BIN, "TRESOR_INPUTS=gpu", "/usr/bin/sbatch", "--wait", "--tresor-output=" + dir_->file("bad-results"),
                    "-o", out3, TRESOR_EXAMPLES_DIR "/ccta-preprocess/prep-job.sh"});
  EXPECT_NE(bad.exit_code, 0);
  const std::string log3 = slurp(out3) + bad.err;
  EXPECT_NE(log3.find("TRESOR_INPUTS is 'gpu'; it must be 'opened' (the default) or 'sealed'"), std::string::npos) << log3;
  EXPECT_EQ(log3.find("ccta-prep:"), std::string::npos) << log3;
}

// examples/coronary-unet as a user runs it: prepare and train inside the confidential job, a few
// steps on the two sealed phantoms, data-parallel on two ranks inside the job; the checkpoint and
// metrics come back sealed.
TEST_F(Slurm, TheCoronaryUnetExampleTrainsInAConfidentialJob) {
  const std::string results = dir_->file("unet-results");
  const std::string out = dir_->file("unet.out");
  auto r = slurm({std::string("TRESOR_BIN=") + TRESOR_BIN, "TRAIN_STEPS=12", "TRAIN_VALIDATE_EVERY=6", "TRAIN_RANKS=2", "/usr/bin/sbatch", "--wait", "--tresor-output=" + results, "-o",
                  out, TRESOR_EXAMPLES_DIR "/coronary-unet/train-job.sh"});
  const std::string log = slurp(out);
  ASSERT_EQ(r.exit_code, 0) << r.err << log;
  EXPECT_NE(log.find("coronary-unet: 1 training case(s), 1 validation case, 2 rank(s) on cpu"), std::string::npos) << log;
  EXPECT_NE(log.find("train: 12 steps in"), std::string::npos) << log;
  EXPECT_NE(log.find(" on 2 ranks"), std::string::npos) << log;
  for (const char* f : {"checkpoint.tck.sealed", "metrics.json.sealed", "curves.png.sealed", "prediction.png.sealed"}) {
    EXPECT_TRUE(std::filesystem::exists(results + "/" + f)) << f;
  }
  for (const auto& e : std::filesystem::recursive_directory_iterator(results)) {
    if (e.is_regular_file()) {
      EXPECT_TRUE(e.path().string().ends_with(".sealed")) << "only sealed outputs: " << e.path();
    }
  }
  const auto j = nlohmann::json::parse(open_as_alice(results + "/metrics.json.sealed"));
  EXPECT_EQ(j["steps_done"], 12);
  EXPECT_EQ(j["ranks"], 2);
  EXPECT_EQ(j["loss"].size(), 12u);
  EXPECT_EQ(open_as_alice(results + "/checkpoint.tck.sealed").substr(0, 8), "TRESORCK");

  // With TRESOR_INPUTS=sealed on the GPU trainer (its emulation here): prep takes the sealed
  // phantoms through the secure channel and seals its outputs to a key made in the job, which
  // the GPU data loader opens through the channel again.
  const std::string results2 = dir_->file("unet-results-sealed");
  const std::string out2 = dir_->file("unet-sealed.out");
  auto s = slurm({std::string("TRESOR_BIN=") + TRESOR_BIN, "TRESOR_INPUTS=sealed", "TRAIN_DEVICE=emulated", "TRAIN_STEPS=4", "TRAIN_VALIDATE_EVERY=4",
                  "/usr/bin/sbatch", "--wait", "--tresor-output=" + results2, "-o", out2, TRESOR_EXAMPLES_DIR "/coronary-unet/train-job.sh"});
  const std::string log2 = slurp(out2);
  ASSERT_EQ(s.exit_code, 0) << s.err << log2;
  EXPECT_NE(log2.find("1 validation case, 1 rank(s) on emulated (inputs sealed)"), std::string::npos) << log2;
  EXPECT_NE(log2.find("on the emulated GPU -> "), std::string::npos) << "prep on the channel: " << log2;
  EXPECT_NE(log2.find("(sealed)"), std::string::npos) << "prep sealed its outputs: " << log2;
  EXPECT_NE(log2.find("train: 4 steps in"), std::string::npos) << log2;
  const auto j2 = nlohmann::json::parse(open_as_alice(results2 + "/metrics.json.sealed"));
  EXPECT_EQ(j2["steps_done"], 4);
  EXPECT_EQ(j2["device"], "emulated") << j2.dump();
}

// examples/coronary-unet as the ranks of one step (srun -n 2: each task in its own sandbox, as
// each would be in its own VM) with TRESOR_STEP_ROSTER=1: each agent draws a link key in private
// memory and claims its task's rank in its attestation; the broker hands both the step's roster
// of attested keys; the two ranks train over TLS pinned to them, and rank 0 seals the results.
TEST_F(Slurm, TheTasksOfAStepTrainAsRanksLinkedByTheBrokersRoster) {
  const std::string results = dir_->file("unet-step");
  auto r = slurm({std::string("TRESOR_BIN=") + TRESOR_BIN, "TRESOR_STEP_ROSTER=1", "TRAIN_STEPS=6", "TRAIN_VALIDATE_EVERY=6", "/usr/bin/srun", "-n", "2",
                  "--tresor-dataset=demo/ccta-phantoms", "--tresor-output=" + results, TRESOR_EXAMPLES_DIR "/coronary-unet/train-job.sh"});
  const std::string log = r.out + r.err;
  ASSERT_EQ(r.exit_code, 0) << log;
  for (const char* rank : {"0", "1"}) {
    EXPECT_NE(log.find(std::string("tresor-agent: claimed rank ") + rank + " of step t-"), std::string::npos) << log;
    EXPECT_NE(log.find(std::string(" came from the key broker: 2 ranks, rank 0 at 127.0.0.1:")), std::string::npos) << log;
    EXPECT_NE(log.find(std::string("2 rank(s) on cpu (inputs opened), rank ") + rank + " on the roster of the step"), std::string::npos) << log;
  }
  EXPECT_NE(log.find("train: 6 steps in"), std::string::npos) << log;
  EXPECT_NE(log.find(" on 2 ranks"), std::string::npos) << log;
  // Rank 0 writes the results, sealed, into its task's directory; rank 1 writes none.
  const auto j = nlohmann::json::parse(open_as_alice(results + "/task-0/metrics.json.sealed"));
  EXPECT_EQ(j["steps_done"], 6);
  EXPECT_EQ(j["ranks"], 2);
  EXPECT_FALSE(std::filesystem::exists(results + "/task-1/metrics.json.sealed"));
  for (const auto& e : std::filesystem::recursive_directory_iterator(results)) {
    if (e.is_regular_file()) {
      EXPECT_TRUE(e.path().string().ends_with(".sealed")) << "only sealed outputs: " << e.path();
    }
  }
  // The broker released the step's roster to both attested tasks, and says so in its audit log.
  auto audit = run_command({TRESOR_BIN, "admin", "--socket", admin_socket_, "audit", "show"});
  EXPECT_NE(audit.out.find("(2 ranks) to job 't-"), std::string::npos) << audit.out.substr(audit.out.size() > 4000 ? audit.out.size() - 4000 : 0);

  // The roster and link key are the agent's to give: the host's environment cannot name them.
  auto plain = slurm({"TRESOR_ROSTER=/etc/hostname", "TRESOR_LINK_KEY=/etc/hostname", "/usr/bin/srun", "--tresor-dataset=dhz/ccta-2024",
                      "--tresor-output=" + dir_->file("no-roster"), "sh", "-c", "echo roster=${TRESOR_ROSTER:-unset} key=${TRESOR_LINK_KEY:-unset}"});
  ASSERT_EQ(plain.exit_code, 0) << plain.err;
  EXPECT_NE(plain.out.find("roster=unset key=unset"), std::string::npos) << plain.out;
  // A value other than 1 or 0: nothing runs, and the agent says why.
  auto bad = slurm({"TRESOR_STEP_ROSTER=yes", "/usr/bin/srun", "-n", "2", "--tresor-dataset=dhz/ccta-2024", "--tresor-output=" + dir_->file("bad-roster"),
                    "sh", "-c", "echo SHOULD-NOT-RUN"});
  EXPECT_NE(bad.exit_code, 0);
  EXPECT_NE(bad.err.find("TRESOR_STEP_ROSTER is 'yes'; it must be 1"), std::string::npos) << bad.err;
  EXPECT_EQ(bad.out.find("SHOULD-NOT-RUN"), std::string::npos) << bad.out;
}

TEST_F(Slurm, ScancelLeavesNoProcessesOrMountsBehind) {
  const std::string sandboxes_before = sandbox_dirs();
  const std::string script = dir_->file("long.sh");
  std::ofstream(script) << "#!/bin/sh\nsleep 3171 &\nsleep 3172\n";
  auto sub = slurm({"/usr/bin/sbatch", "--parsable", "--tresor-dataset=dhz/ccta-2024", "-o", dir_->file("long.out"), script});
  ASSERT_EQ(sub.exit_code, 0) << sub.err;
  const std::string job = sub.out.substr(0, sub.out.find_first_of(";\n"));
  bool running = false;
  for (int i = 0; i < 100 && !running; ++i) {
    running = run_command({"/usr/bin/pgrep", "-f", "sleep 3172"}).exit_code == 0;
    if (!running) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  ASSERT_TRUE(running) << slurp(dir_->file("long.out"));
  ASSERT_EQ(slurm({"/usr/bin/scancel", job}).exit_code, 0);
  bool gone = false;
  for (int i = 0; i < 100 && !gone; ++i) {
    gone = run_command({"/usr/bin/pgrep", "-f", "sleep 317[12]"}).exit_code != 0;
    if (!gone) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  EXPECT_TRUE(gone) << "the job's processes, its background one included, are gone";
  // The next test's job must not meet this one still completing (its signals once reached a step
  // that started at once after it, which then died of SIGTERM).
  bool done = false;
  for (int i = 0; i < 200 && !done; ++i) {
    done = slurm({"/usr/bin/squeue", "-h", "-j", job}).out.find_first_not_of(" \n") == std::string::npos;
    if (!done) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  EXPECT_TRUE(done) << "the cancelled job left the queue";
  EXPECT_EQ(sandbox_dirs(), sandboxes_before) << "no sandbox directory left";
  EXPECT_EQ(slurp("/proc/self/mounts").find("tresor-tmp"), std::string::npos) << "no sandbox mount is left on the host";
}

TEST_F(Slurm, AnotherUsersJobRunsInAUserNamespaceAndCannotReadTheSimKey) {
  // Submitted by root on alice's behalf, run as uid 65534 (nobody): the runner, the sandbox (now
  // with a user namespace) and the agent run without privileges; the evidence comes from the
  // plugin's root evidence server, since the sim's key is root's alone.
  const std::string out = dir_->file("nobody-out");
  std::filesystem::create_directories(out);
  std::filesystem::permissions(out, std::filesystem::perms(0777));
  auto r = slurm({"/usr/bin/srun", "--uid=65534", "--gid=65534", "--chdir=/tmp", "--tresor-dataset=dhz/ccta-2024",
                  "--tresor-output=" + out, "sh", "-c",
                  "echo uid=$(id -u); cat " + dir_->file("sim") + "/vcek.key >/dev/null 2>&1 && echo KEY-READABLE; "
                  "tr a-z A-Z < $TRESOR_DATA/dhz/ccta-2024/input.txt > $TRESOR_OUTPUT_DIR/result.txt"});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_NE(r.out.find("uid=65534"), std::string::npos) << r.out;
  EXPECT_EQ(r.out.find("KEY-READABLE"), std::string::npos) << "the job's user cannot read the sim's key";
  EXPECT_EQ(open_as_alice(out + "/result.txt.sealed"), "PLAINTEXT-MARKER-7319 CORONARY LUMEN\n");
}

TEST_F(Slurm, AJobWhoseCommandIsNotTheSignedOneDoesNotRun) {
  // A manifest alice signed for one script, paired with another command by the (untrusted) host.
  const std::string signed_script = dir_->file("signed.sh");
  std::ofstream(signed_script) << "#!/bin/sh\necho the signed script\n";
  auto created = run_command({TRESOR_BIN, "manifest", "create", "-i", dir_->file("alice"), "--job-id", "t-forged", "--dataset",
                              "dhz/ccta-2024", "--image-measurement", std::string(96, 'a'), "--script", signed_script, "-o",
                              dir_->file("forged.manifest")});
  ASSERT_EQ(created.exit_code, 0) << created.err;
  std::string text = slurp(dir_->file("forged.manifest"));
  while (!text.empty() && text.back() == '\n') text.pop_back();
  const std::string manifest = base64url_encode(as_bytes(text));
  // Run the runner directly with that manifest and another command.
  auto r = run_command({"/usr/bin/env", "TRESOR_MANIFEST=" + manifest, "TRESOR_OUTPUT=" + dir_->file("forged-out"), TRESOR_RUN_BIN,
                        "--slurm-job-id", "1", "--broker", "https://127.0.0.1:1", "--ca", "/dev/null", "--agent", TRESOR_AGENT_BIN,
                        "--sim", dir_->file("sim"), "--", "sh", "-c", "echo FORGED-RAN"});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_EQ(r.out.find("FORGED-RAN"), std::string::npos);
  EXPECT_NE(r.err.find("not the one the job's manifest was signed for"), std::string::npos) << r.err;
}

TEST_F(Slurm, AKilledRunnersLeftoversAreRemovedByTheEpilog) {
  const std::string script = dir_->file("killed.sh");
  std::ofstream(script) << "#!/bin/sh\nsleep 3173\n";
  auto sub = slurm({"/usr/bin/sbatch", "--parsable", "--tresor-dataset=dhz/ccta-2024", "-o", dir_->file("killed.out"), script});
  ASSERT_EQ(sub.exit_code, 0) << sub.err;
  const std::string job = sub.out.substr(0, sub.out.find_first_of(";\n"));
  auto leftovers = [&] { return run_command({"/bin/sh", "-c", "ls -d /tmp/tresor-job-" + job + "-* 2>/dev/null"}).out; };
  bool running = false;
  for (int i = 0; i < 100 && !running; ++i) {
    running = run_command({"/usr/bin/pgrep", "-f", "sleep 3173"}).exit_code == 0;
    if (!running) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  ASSERT_TRUE(running) << slurp(dir_->file("killed.out"));
  ASSERT_NE(leftovers(), "") << "the running job has its sandbox directory";
  // SIGKILL to the runner itself: it cannot clean up (its sandbox dies with it: PDEATHSIG).
  ASSERT_EQ(run_command({"/usr/bin/pkill", "-KILL", "-f", "tresor-run --slurm-job-id " + job + " "}).exit_code, 0);
  std::string left = leftovers();
  for (int i = 0; i < 100 && !left.empty(); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    left = leftovers();
  }
  EXPECT_EQ(left, "") << "the epilog removes the sandbox directory";
  const std::string slurmd_log = slurp(dir_->file("cluster") + "/log/slurmd.log");
  EXPECT_NE(slurmd_log.find("tresor: job " + job + ": removed /tmp/tresor-job-" + job), std::string::npos)
      << "it was the plugin's epilog that removed it:\n" << slurmd_log.substr(slurmd_log.size() > 3000 ? slurmd_log.size() - 3000 : 0);
  EXPECT_NE(run_command({"/usr/bin/pgrep", "-f", "sleep 3173"}).exit_code, 0) << "and nothing of the job runs";
}

}  // namespace
// The product path with a real VM: sbatch with --tresor-backend=libvirt (the cluster's default
// here) boots the guest image under TCG, the agent inside attests (sim) to the broker through the
// control channel, decrypts the input, runs the batch script and seals its output; the exit code
// comes back; no VM is left. Label: slow.
class SlurmVm : public Slurm {
 protected:
  static void SetUpTestSuite() { start_cluster(true); }
};

TEST_F(SlurmVm, ABatchJobRunsInsideAVmAndItsOutputIsSealed) {
  const std::string script = dir_->file("vm-job.sh");
  const std::string results = dir_->file("vm-results");
  std::ofstream(script) << "#!/bin/sh\n#SBATCH --tresor-dataset=dhz/ccta-2024\n#SBATCH --tresor-backend=libvirt\n#SBATCH --tresor-output="
                        << results << "\necho in-vm kernel=$(uname -r) inside=$TRESOR_INSIDE_JOB\n"
                                      "tr a-z A-Z < $TRESOR_DATA/dhz/ccta-2024/input.txt > $TRESOR_OUTPUT_DIR/result.txt\nexit 4\n";
  const std::string out = dir_->file("vm-job.out");
  auto r = slurm({"/usr/bin/sbatch", "--wait", "-o", out, script});
  const std::string log = slurp(out);
  EXPECT_EQ(r.exit_code, 4) << r.err << log;
  EXPECT_NE(log.find("backend libvirt: VM tresor-"), std::string::npos) << log;
  EXPECT_NE(log.find("in-vm kernel="), std::string::npos) << log;
  EXPECT_NE(log.find("inside=1"), std::string::npos) << log;
  EXPECT_NE(log.find("key of dataset dhz/ccta-2024 released"), std::string::npos) << log;
  EXPECT_EQ(open_as_alice(results + "/result.txt.sealed"), "PLAINTEXT-MARKER-7319 CORONARY LUMEN\n");
  auto list = run_command({"/usr/bin/virsh", "-c", "qemu:///system", "list", "--all", "--name"});
  EXPECT_EQ(list.out.find("tresor-"), std::string::npos) << "no VM left: " << list.out;
}

// A job of an ordinary user (uid 65534) in a VM: the user's runner cannot use libvirt itself; the
// plugin's root keeper starts the VM, the runner serves it as the user and writes the sealed
// outputs the guest sends, which are therefore the user's files (no share is writable).
TEST_F(SlurmVm, AnotherUsersJobRunsInAVmStartedByTheKeeperAndOwnsItsOutputs) {
  const std::string out = dir_->file("vm-nobody-out");
  std::filesystem::create_directories(out);
  std::filesystem::permissions(out, std::filesystem::perms(0777));
  auto r = slurm({"/usr/bin/srun", "--uid=65534", "--gid=65534", "--chdir=/tmp", "--tresor-dataset=dhz/ccta-2024", "--tresor-backend=libvirt",
                  "--tresor-output=" + out, "sh", "-c",
                  "echo in-vm kernel=$(uname -r); mkdir -p $TRESOR_OUTPUT_DIR/sub; "
                  "tr a-z A-Z < $TRESOR_DATA/dhz/ccta-2024/input.txt > $TRESOR_OUTPUT_DIR/sub/result.txt"});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_NE(r.out.find("in-vm kernel="), std::string::npos) << r.out << r.err;
  EXPECT_NE(r.err.find("started by the node's VM keeper"), std::string::npos) << r.err;
  // Which it must be: the job's user cannot start VMs itself.
  auto own = run_command({"/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/virsh", "-c", "qemu:///system",
                          "list"});
  EXPECT_NE(own.exit_code, 0) << "this test needs a user without libvirt access: " << own.out;
  const std::string sealed = out + "/sub/result.txt.sealed";
  EXPECT_EQ(open_as_alice(sealed), "PLAINTEXT-MARKER-7319 CORONARY LUMEN\n");
  for (const std::string& path : {out + "/sub", sealed}) {
    struct stat st {};
    ASSERT_EQ(::lstat(path.c_str(), &st), 0) << path;
    EXPECT_EQ(st.st_uid, 65534u) << path << " belongs to the job's user";
    EXPECT_EQ(st.st_mode & (S_ISUID | S_ISGID), 0u) << path;
  }
  auto vms = run_command({"/usr/bin/virsh", "-c", "qemu:///system", "list", "--all", "--name"}).out;
  EXPECT_EQ(vms.find("tresor-"), std::string::npos) << "no VM left: " << vms;
}

// A step of two tasks in VMs meeting as ranks (TRESOR_STEP_ROSTER=1): the plugin's keepers give
// each task's VM — named after its task — a NIC on the node's step bridge (plugstack.conf
// step_bridge=), /init takes an address by DHCP, rank 0's agent claims it as the step's lead, and
// the job's program in each VM (step-probe, the collective `tresor train` uses) links to the
// other over TLS pinned to the broker's roster. An ordinary user's job: the keepers are root.
TEST_F(SlurmVm, TheTasksOfAStepMeetInTheirVmsOverTheStepNetwork) {
  const std::string out = dir_->file("vm-step-out");
  std::filesystem::create_directories(out);
  std::filesystem::permissions(out, std::filesystem::perms(0777));
  auto r = slurm({"TRESOR_STEP_ROSTER=1", "/usr/bin/srun", "-n", "2", "--uid=65534", "--gid=65534", "--chdir=/tmp", "--tresor-dataset=dhz/ccta-2024",
                  "--tresor-backend=libvirt", "--tresor-output=" + out, "sh", "-c", "step-probe"});
  const std::string log = r.out + r.err;
  ASSERT_EQ(r.exit_code, 0) << log << step_bridge_->log();
  std::string lead;
  for (const char* rank : {"0", "1"}) {
    EXPECT_NE(log.find(std::string("VM tresor-")), std::string::npos) << log;
    EXPECT_NE(log.find(std::string("tresor-agent: claimed rank ") + rank + " of step t-"), std::string::npos) << log;
    const std::string said = std::string("step-probe rank ") + rank + " of 2: lead ";
    const size_t at = log.find(said);
    ASSERT_NE(at, std::string::npos) << log;
    const std::string line = log.substr(at, log.find('\n', at) - at);
    EXPECT_NE(line.find(" sum 3 broadcast 7"), std::string::npos) << line;
    const std::string l = line.substr(said.size(), line.find(' ', said.size()) - said.size());
    if (lead.empty()) lead = l;
    EXPECT_EQ(l, lead) << "one roster for the step";
  }
  EXPECT_TRUE(lead.starts_with("10.231.8.")) << "rank 0's address on the step network: " << lead;
  // Each task had its own VM, named after its task.
  for (const char* task : {".0-t-", ".1-t-"}) EXPECT_NE(log.find(task), std::string::npos) << log;
  auto vms = run_command({"/usr/bin/virsh", "-c", "qemu:///system", "list", "--all", "--name"}).out;
  EXPECT_EQ(vms.find("tresor-"), std::string::npos) << "no VM left: " << vms;
}

// A confidential step trains as two ranks across its two VMs: `srun -n 2` with
// TRESOR_STEP_ROSTER=1 of a job whose command is tresor-train (the CPU trainer, in the image) on
// a dataset of prepared phantoms; the ranks link over the step network, pinned to the broker's
// roster; rank 0 seals the results. The checkpoint is byte for byte the one two ranks over plain
// TCP give on this machine from the same prepared cases: the same run, across VMs.
TEST_F(SlurmVm, AStepTrainsAcrossItsVmsAsTheRanksOfOneRun) {
  auto ok = [](const CommandResult& r) {
    EXPECT_EQ(r.exit_code, 0) << r.out << r.err;
    return r.exit_code == 0;
  };
  // The data owner's side: two small phantoms, prepared here and sealed as demo/ccta-prepared.
  const std::string src = dir_->file("prepared-src");
  for (const char* i : {"1", "2"}) {
    ASSERT_TRUE(ok(run_command({TRESOR_BIN, "phantom", "-o", src + "/raw/case0" + i, "--seed", i, "--size", "100x100x64", "--spacing", "1.2x1.2x1.25",
                                "--no-dicom"})));
  }
  ASSERT_TRUE(ok(run_command({TRESOR_BIN, "prep", src + "/raw", "-o", src + "/prepared", "--spacing", "1.5", "--sigmas", "1,2", "--no-preview",
                              "--device", "cpu"})));
  auto admin = [&](std::vector<std::string> args) {
    args.insert(args.begin(), {TRESOR_BIN, "admin", "--socket", admin_socket_});
    return ok(run_command(args));
  };
  ASSERT_TRUE(admin({"dataset", "create", "demo/ccta-prepared", "-o", src + "/dataset.key"}));
  for (const char* c : {"case01", "case02"}) {
    std::filesystem::create_directories(dir_->file(std::string("datasets/demo/ccta-prepared/") + c));
    for (const char* f : {"image.nii", "vesselness.nii", "labels.nii"}) {
      ASSERT_TRUE(ok(run_command({TRESOR_BIN, "seal", "--dataset-key-file", src + "/dataset.key", "--dataset", "demo/ccta-prepared", "-o",
                                  dir_->file(std::string("datasets/demo/ccta-prepared/") + c + "/" + f + ".sealed"), src + "/prepared/" + c + "/" + f})));
    }
  }
  ASSERT_TRUE(admin({"policy", "set", "demo/ccta-prepared", dir_->file("policy.json")}));
  ASSERT_TRUE(admin({"grant", "alice", "demo/ccta-prepared"}));
  run_command({"/bin/chmod", "-R", "a+rX", dir_->file("datasets")});  // QEMU reads the ciphertext through 9p
  // One configuration for both runs; only where the cases are and where the results go differ.
  auto config = [](const std::string& data, const std::string& out) {
    return "[model]\nlevels = 3\nbase_channels = 4\nmax_channels = 32\ndeep_supervision = true\n[data]\ntrain = [\"" + data +
           "/case01\"]\nvalidation = [\"" + data + "/case02\"]\n[training]\nsteps = 3\nbatch = 2\npatch = 24\noptimizer = \"adamw\"\n"
           "lr = 0.01\nvalidate_every = 3\nthreads = 1\nfull_volume_validation = false\n[output]\ndir = \"" + out + "\"\n";
  };
  // The job, inside each VM: the configuration in private memory, then the trainer; Slurm's
  // variables and the agent's TRESOR_ROSTER and TRESOR_LINK_KEY make the task a rank.
  const std::string job = "cat > $TMPDIR/train.toml <<EOF\n" + config("$TRESOR_DATA/demo/ccta-prepared", "$TRESOR_OUTPUT_DIR") +
                          "EOF\nexec tresor-train train --config $TMPDIR/train.toml\n";
  const std::string out = dir_->file("vm-train-out");
  auto r = slurm({"TRESOR_STEP_ROSTER=1", "/usr/bin/srun", "-n", "2", "--tresor-dataset=demo/ccta-prepared", "--tresor-backend=libvirt",
                  "--tresor-output=" + out, "sh", "-c", job});
  const std::string log = r.out + r.err;
  ASSERT_EQ(r.exit_code, 0) << log << step_bridge_->log();
  EXPECT_NE(log.find("tresor-agent: claimed rank 0 of step t-"), std::string::npos) << log;
  EXPECT_NE(log.find("rank 0 at 10.231.8."), std::string::npos) << "rank 0 on the step network: " << log;
  EXPECT_NE(log.find("train: 3 steps in"), std::string::npos) << log;
  EXPECT_NE(log.find(" on 2 ranks"), std::string::npos) << log;
  const auto j = nlohmann::json::parse(open_as_alice(out + "/task-0/metrics.json.sealed"));
  EXPECT_EQ(j["steps_done"], 3);
  EXPECT_EQ(j["ranks"], 2);
  EXPECT_FALSE(std::filesystem::exists(out + "/task-1/checkpoint.tck.sealed")) << "rank 0 writes the results";

  // The same run on this machine: two ranks over TCP on loopback, the same prepared cases.
  const std::string here = dir_->file("host-train");
  std::filesystem::create_directories(here);
  std::ofstream(here + "/train.toml") << config(src + "/prepared", here + "/out");
  ASSERT_TRUE(ok(run_command({TRESOR_TRAIN_BIN, "train", "--config", here + "/train.toml", "--ranks", "2", "--rendezvous", here})));
  const std::string vm_checkpoint = open_as_alice(out + "/task-0/checkpoint.tck.sealed");
  const tresor::Bytes host_checkpoint = tresor::testing::read_file(here + "/out/checkpoint.tck");
  ASSERT_FALSE(vm_checkpoint.empty());
  EXPECT_TRUE(vm_checkpoint == std::string(reinterpret_cast<const char*>(host_checkpoint.data()), host_checkpoint.size()))
      << "the checkpoint trained across the VMs differs from this machine's (" << vm_checkpoint.size() << " and " << host_checkpoint.size() << " bytes)";
  auto vms = run_command({"/usr/bin/virsh", "-c", "qemu:///system", "list", "--all", "--name"}).out;
  EXPECT_EQ(vms.find("tresor-"), std::string::npos) << "no VM left: " << vms;
}

// scancel of a VM job while its job runs: the VM, its QEMU and its runtime directory are gone.
TEST_F(SlurmVm, ScancelLeavesNoVmBehind) {
  const std::string script = dir_->file("vm-long.sh");
  std::ofstream(script) << "#!/bin/sh\n#SBATCH --tresor-dataset=dhz/ccta-2024\n#SBATCH --tresor-backend=libvirt\necho vm-job-started\nsleep 300\n";
  const std::string out = dir_->file("vm-long.out");
  auto sub = slurm({"/usr/bin/sbatch", "--parsable", "-o", out, script});
  ASSERT_EQ(sub.exit_code, 0) << sub.err;
  const std::string job = sub.out.substr(0, sub.out.find_first_of(";\n"));
  bool started = false;
  for (int i = 0; i < 600 && !started; ++i) {
    started = slurp(out).find("vm-job-started") != std::string::npos;
    if (!started) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  ASSERT_TRUE(started) << slurp(out);
  auto vms = [] { return run_command({"/usr/bin/virsh", "-c", "qemu:///system", "list", "--all", "--name"}).out; };
  EXPECT_NE(vms().find("tresor-" + job + "."), std::string::npos) << vms();
  ASSERT_EQ(slurm({"/usr/bin/scancel", job}).exit_code, 0);
  bool gone = false;
  for (int i = 0; i < 200 && !gone; ++i) {
    gone = vms().find("tresor-" + job + ".") == std::string::npos &&
           run_command({"/bin/sh", "-c", "ls -d /tmp/tresor-job-" + job + "-vm-* 2>/dev/null"}).out.empty();
    if (!gone) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  EXPECT_TRUE(gone) << "VMs: " << vms() << slurp(out);
  EXPECT_NE(run_command({"/usr/bin/pgrep", "-f", "guest=tresor-" + job + "."}).exit_code, 0) << "no QEMU left";
}

}  // namespace tresor
