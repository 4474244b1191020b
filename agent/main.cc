// tresor-agent — runs a confidential job inside its sandbox or VM (include/tresor/agent/agent.h,
// docs/admin-guide.md): attest, receive keys, open inputs privately, run the command, seal its
// outputs, leave with its status.
//
//   tresor-agent --broker URL --ca FILE --data-root DIR --output DIR (--evidence-fd N | --evidence SOURCE) [--private DIR] -- COMMAND [ARGS...]
//
// Evidence: --evidence-fd N, the sim channel the host side holds the other end of (the local
// backend, sim VMs); or --evidence configfs-tsm|sev-guest|auto, the guest's own AMD-SP in an SNP
// VM (include/tresor/agent/guest_evidence.h).
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <memory>
#include <string>

#include "tresor/agent/agent.h"
#include "tresor/agent/guest_evidence.h"
#include "tresor/process.h"
#include "tresor/slurm/job.h"

namespace {

int usage(const std::string& why) {
  std::fprintf(stderr,
               "tresor-agent: %s\nUsage: tresor-agent --broker URL --ca FILE --data-root DIR --output DIR "
               "(--evidence-fd N | --evidence configfs-tsm|sev-guest|auto) [--private DIR] -- COMMAND [ARGS...]\n",
               why.c_str());
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  auto args = tresor::process::parse_launcher_args(argc, argv, {"--broker", "--ca", "--data-root", "--output", "--private", "--evidence-fd", "--evidence"});
  if (!args) return usage(args.error().message);
  auto option = [&](const char* name) { return args->options.contains(name) ? args->options.at(name) : std::string(); };
  tresor::agent::Options o;
  o.broker_url = option("--broker");
  o.broker_ca = option("--ca");
  o.data_root = option("--data-root");
  o.output_dir = option("--output");
  o.private_dir = option("--private");
  o.command = args->command;
  const int evidence_fd = args->options.contains("--evidence-fd") ? std::atoi(option("--evidence-fd").c_str()) : -1;
  const std::string evidence_source = option("--evidence");
  if (o.broker_url.empty() || o.broker_ca.empty() || o.output_dir.empty()) return usage("--broker, --ca and --output are required");
  if ((evidence_fd < 0) == evidence_source.empty()) return usage("give exactly one of --evidence-fd N and --evidence SOURCE");
  std::unique_ptr<tresor::agent::EvidenceProvider> evidence;
  if (evidence_fd >= 0) {
    evidence = std::make_unique<tresor::agent::ChannelEvidence>(evidence_fd);
  } else {
    auto provider = tresor::agent::guest_evidence_provider(evidence_source);
    if (!provider) {
      std::fprintf(stderr, "tresor-agent: %s\n", provider.error().message.c_str());
      return 1;
    }
    evidence = std::move(*provider);
  }
  if (o.private_dir.empty()) {
    const char* tmp = std::getenv("TMPDIR");
    o.private_dir = std::string(tmp ? tmp : "/tmp") + "/tresor-private";
  }
  ::umask(077);

  const char* env = std::getenv(std::string(tresor::slurm::kManifestEnv).c_str());
  if (env == nullptr) return usage("no TRESOR_MANIFEST in the environment");
  auto manifest = tresor::slurm::decode_manifest_env(env);
  if (!manifest) {
    std::fprintf(stderr, "tresor-agent: the job's manifest is unreadable: %s\n", manifest.error().message.c_str());
    return 1;
  }
  auto manifest_json = tresor::manifest_json(*manifest, true);
  if (!manifest_json) return 1;
  // The job runs only the script or command line its user signed for (the manifest travels in
  // the untrusted host's hands and could be paired with another command).
  if (auto c = tresor::slurm::check_command(*manifest, o.command); !c) {
    std::fprintf(stderr, "tresor-agent: %s; nothing was run\n", c.error().message.c_str());
    return 1;
  }
  // No core dumps: a crashed job's or agent's memory holds plaintext, and a core file would land
  // in the job's (shared) working directory.
  struct rlimit no_core {};
  ::setrlimit(RLIMIT_CORE, &no_core);
  ::prctl(PR_SET_DUMPABLE, 0);

  // TRESOR_TIMING=1: one line of phase durations at the end (tresor bench launch reads it).
  const bool timing = std::getenv("TRESOR_TIMING") != nullptr;
  using Clock = std::chrono::steady_clock;
  auto ms_since = [](Clock::time_point t) { return std::chrono::duration<double, std::milli>(Clock::now() - t).count(); };
  const auto t_prepare = Clock::now();
  if (auto r = tresor::agent::prepare(o, *manifest, *manifest_json, *evidence, std::cerr); !r) {
    std::fprintf(stderr, "tresor-agent: %s\n", r.error().message.c_str());
    return 1;
  }
  if (evidence_fd >= 0) ::close(evidence_fd);  // nothing more is asked of the host

  const double prepare_ms = ms_since(t_prepare);
  const std::string data = o.private_dir + "/data", out = o.private_dir + "/out";
  const auto t_job = Clock::now();
  const pid_t job = ::fork();
  if (job < 0) return 1;
  if (job == 0) {
    ::setenv("TRESOR_DATA", data.c_str(), 1);
    ::setenv("TRESOR_OUTPUT_DIR", out.c_str(), 1);
    ::unsetenv(std::string(tresor::slurm::kManifestEnv).c_str());
    tresor::process::default_signals();
    ::umask(022);
    std::vector<char*> cmd;
    for (auto& a : o.command) cmd.push_back(a.data());
    cmd.push_back(nullptr);
    ::execvp(cmd[0], cmd.data());
    std::fprintf(stderr, "tresor-agent: cannot run %s: %s\n", cmd[0], std::strerror(errno));
    std::_Exit(errno == ENOENT ? 127 : 126);
  }
  tresor::process::install_signal_relay();
  const int status = tresor::process::wait_for(job);
  const double job_ms = ms_since(t_job);
  // Whatever the job wrote, sealed: the results of a failed job are the user's too.
  const auto t_seal = Clock::now();
  auto sealed = tresor::agent::seal_outputs(o, *manifest, std::cerr);
  if (timing) {
    std::fprintf(stderr, "tresor-agent: timing attest_keys_inputs_ms=%.1f job_ms=%.1f seal_ms=%.1f\n", prepare_ms, job_ms, ms_since(t_seal));
  }
  if (!sealed) {
    std::fprintf(stderr, "tresor-agent: the outputs could not be sealed: %s (nothing unsealed was written)\n",
                 sealed.error().message.c_str());
    if (WIFEXITED(status) && WEXITSTATUS(status) == 0) return 1;
  }
  tresor::process::exit_like(status);
}
