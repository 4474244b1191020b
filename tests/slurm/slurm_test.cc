// The SPANK plugin and tresor-run on a real one-node Slurm cluster on 127.0.0.1 (munged,
// slurmctld, slurmd started by tests/support/slurm-cluster; issue 5): options checked at
// submission with messages that say how to fix them, confidential steps wrapped by tresor-run in
// the local sandbox, exit codes and deaths by signal exactly as without Tresor, no re-wrapping of
// an srun inside a confidential job, and nothing left behind after scancel.
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <chrono>
#include <fstream>
#include <sstream>
#include <thread>

#include "support/test_support.h"

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

class Slurm : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (::access("/usr/sbin/slurmctld", X_OK) != 0 || ::geteuid() != 0) {
      skip_ = "needs Slurm (scripts/bootstrap installs it) and root to run its daemons";
      return;
    }
    dir_ = new TempDir();
    const std::string images = dir_->file("images.json");
    std::ofstream(images) << R"({"images": {"ccta-v1": {"measurement": ")" << std::string(96, 'a') << R"("}}, "default": "ccta-v1"})";
    const std::string plugstack = dir_->file("plugstack.conf");
    std::ofstream(plugstack) << "required " << TRESOR_SPANK_SO << " runner=" << TRESOR_RUN_BIN << " images=" << images
                             << " backends=local\n";
    auto id = run_command({TRESOR_BIN, "keygen", "-o", dir_->file("identity")});
    ASSERT_EQ(id.exit_code, 0) << id.err;
    auto started = run_command({TRESOR_SLURM_CLUSTER, "start", dir_->file("cluster"), std::to_string(free_port()),
                                std::to_string(free_port()), plugstack});
    ASSERT_EQ(started.exit_code, 0) << started.err;
  }
  static void TearDownTestSuite() {
    if (dir_ != nullptr) {
      run_command({TRESOR_SLURM_CLUSTER, "stop", dir_->file("cluster")});
      delete dir_;
      dir_ = nullptr;
    }
  }
  void SetUp() override {
    if (!skip_.empty()) GTEST_SKIP() << skip_;
  }
  // A Slurm command with the cluster's configuration and the user's identity.
  static CommandResult slurm(std::vector<std::string> args, const std::string& identity = "") {
    args.insert(args.begin(), {"/usr/bin/env", "SLURM_CONF=" + dir_->file("cluster") + "/slurm.conf",
                               "TRESOR_IDENTITY=" + (identity.empty() ? dir_->file("identity") : identity)});
    return run_command(args);
  }
  static inline TempDir* dir_ = nullptr;
  static inline std::string skip_;
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
    auto r = slurm(args, k.identity);
    EXPECT_NE(r.exit_code, 0);
    EXPECT_NE(r.err.find(k.want), std::string::npos) << r.err;
    EXPECT_EQ(r.out.find("SHOULD-NOT-RUN"), std::string::npos) << "nothing ran";
  }
}

TEST_F(Slurm, AConfidentialStepRunsInTheLocalSandbox) {
  auto r = slurm({"/usr/bin/srun", "--tresor-dataset=dhz/ccta-2024", "sh", "-c",
                  "echo inside=$TRESOR_INSIDE_JOB pid=$$; grep \" $TMPDIR tmpfs\" /proc/self/mounts && echo private-tmp"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.err.find("NOT confidential"), std::string::npos) << "the local backend says so: " << r.err;
  EXPECT_NE(r.out.find("inside=1 pid=2"), std::string::npos) << "PID 2 under the sandbox's init: " << r.out;
  EXPECT_NE(r.out.find("private-tmp"), std::string::npos) << "TMPDIR is a private tmpfs: " << r.out;
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

TEST_F(Slurm, ABatchJobIsWrappedOnceAndItsInnerStepsAreNot) {
  const std::string script = dir_->file("job.sh");
  std::ofstream(script) << "#!/bin/sh\n#SBATCH --tresor-dataset=dhz/ccta-2024\necho batch inside=$TRESOR_INSIDE_JOB\nsrun sh -c 'echo step "
                           "inside=$TRESOR_INSIDE_JOB'\nexit 4\n";
  const std::string out = dir_->file("job.out");
  auto r = slurm({"/usr/bin/sbatch", "--wait", "-o", out, script});
  EXPECT_EQ(r.exit_code, 4) << r.err << slurp(out);
  const std::string log = slurp(out);
  EXPECT_NE(log.find("batch inside=1"), std::string::npos) << log;
  EXPECT_NE(log.find("step inside=1"), std::string::npos) << log;
  size_t banners = 0;
  for (size_t p = log.find("NOT confidential"); p != std::string::npos; p = log.find("NOT confidential", p + 1)) ++banners;
  EXPECT_EQ(banners, 1u) << "the inner srun is not wrapped again:\n" << log;
}

TEST_F(Slurm, ScancelLeavesNoProcessesOrMountsBehind) {
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
  EXPECT_EQ(slurp("/proc/self/mounts").find("tresor-tmp"), std::string::npos) << "no sandbox mount is left on the host";
}

}  // namespace
}  // namespace tresor
