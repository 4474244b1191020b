// tresor-agent — runs a confidential job inside its sandbox or VM (include/tresor/agent/agent.h,
// docs/admin-guide.md): attest, receive keys, open inputs privately, run the command, seal its
// outputs, leave with its status.
//
//   tresor-agent --broker URL --ca FILE --data-root DIR --output DIR (--evidence-fd N | --evidence SOURCE) [--private DIR] -- COMMAND [ARGS...]
//
// Evidence: --evidence-fd N, the sim channel the host side holds the other end of (the local
// backend, sim VMs); or --evidence configfs-tsm|sev-guest|auto, the guest's own AMD-SP in an SNP
// VM (include/tresor/agent/guest_evidence.h).
#include <fcntl.h>
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
#include "guest.h"
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
  // Guest mode (agent/guest.cc): tresor-agent --guest PORT | --guest-fd N [--guest-root DIR].
  if (argc >= 3 && (std::string_view(argv[1]) == "--guest" || std::string_view(argv[1]) == "--guest-fd")) {
    const bool by_fd = std::string_view(argv[1]) == "--guest-fd";
    const int fd = by_fd ? std::atoi(argv[2]) : ::open(argv[2], O_RDWR | O_CLOEXEC);
    if (fd < 0 || ::fcntl(fd, F_GETFD) < 0) {
      std::fprintf(stderr, "tresor-agent: cannot open the control channel %s: %s\n", argv[2], std::strerror(errno));
      return 2;
    }
    if (by_fd) ::fcntl(fd, F_SETFD, FD_CLOEXEC);
    std::string root = "/";
    if (argc == 5 && std::string_view(argv[3]) == "--guest-root") {
      root = argv[4];
    } else if (argc != 3) {
      return usage("guest mode takes --guest PORT or --guest-fd N, and optionally --guest-root DIR");
    }
    struct rlimit no_core {};
    ::setrlimit(RLIMIT_CORE, &no_core);
    ::prctl(PR_SET_DUMPABLE, 0);
    ::umask(077);
    std::signal(SIGPIPE, SIG_IGN);
    return tresor::agent::run_guest(fd, root);
  }
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
  auto sealed_inputs = tresor::agent::sealed_inputs_from(std::getenv("TRESOR_INPUTS"));
  if (!sealed_inputs) {
    std::fprintf(stderr, "tresor-agent: %s; nothing was run\n", sealed_inputs.error().message.c_str());
    return 1;
  }
  o.sealed_inputs = *sealed_inputs;
  const int evidence_fd = args->options.contains("--evidence-fd") ? std::atoi(option("--evidence-fd").c_str()) : -1;
  const std::string evidence_source = option("--evidence");
  if (o.broker_url.empty() || o.broker_ca.empty() || o.output_dir.empty()) return usage("--broker, --ca and --output are required");
  if ((evidence_fd < 0) == evidence_source.empty()) return usage("give exactly one of --evidence-fd N and --evidence SOURCE");
  std::unique_ptr<tresor::agent::EvidenceProvider> evidence;
  if (evidence_fd >= 0) {
    ::fcntl(evidence_fd, F_SETFD, FD_CLOEXEC);  // the job never inherits the evidence channel
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
  // TRESOR_STEP_ROSTER=1: this task claims its rank of the step (docs/training.md §5.4). A
  // sandbox (evidence from its runner) shares the node's loopback with the step's other tasks.
  auto link = tresor::agent::step_link_from([](const char* name) { return std::getenv(name); }, *manifest, evidence_fd >= 0 ? "127.0.0.1" : "");
  if (!link) {
    std::fprintf(stderr, "tresor-agent: %s; nothing was run\n", link.error().message.c_str());
    return 1;
  }
  o.step_link = std::move(*link);
  // No core dumps: a crashed job's or agent's memory holds plaintext, and a core file would land
  // in the job's (shared) working directory.
  struct rlimit no_core {};
  ::setrlimit(RLIMIT_CORE, &no_core);
  ::prctl(PR_SET_DUMPABLE, 0);

  // TRESOR_TIMING=1: one line of phase durations at the end (tresor bench launch reads it).
  const bool timing = std::getenv("TRESOR_TIMING") != nullptr;
  tresor::process::install_signal_relay();
  const int status = tresor::agent::run_job(o, *manifest, *manifest_json, *evidence, timing, std::cerr, [&](pid_t job) {
    if (evidence_fd >= 0) ::close(evidence_fd);  // nothing more is asked of the host
    tresor::process::relay_to(job);
  });
  tresor::process::exit_like(status);
}
