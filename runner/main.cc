// tresor-run — the host-side launcher the SPANK plugin execs in place of a confidential job's task
// (docs/admin-guide.md). It reads the job's signed manifest from its environment, applies what
// Slurm's own launch would have (rlimits, TMPDIR), runs the job in the backend's sandbox, relays
// signals in, and leaves with the job's status: the same exit code, or death by the same signal.
//
// Backends (TRESOR_BACKEND, chosen at submission):
//  - `local`: this file's sandbox, new mount and PID namespaces with a private tmpfs; no VM, NOT
//    confidential (it says so). In it runs tresor-agent, which attests to the broker with
//    evidence this runner's sim secure processor signs (HOST_DATA = SHA-256 of the manifest,
//    MEASUREMENT = the manifest's image), opens the inputs privately, runs the command and seals
//    its outputs.
//  - `libvirt`: the job's VM built from the allocation (include/tresor/vm/job.h): the image the
//    manifest's measurement names in the node's catalogue, the allocation's CPUs, memory and GPUs,
//    HOST_DATA, read-only dataset shares. Its keeper (runner/keeper.h) starts it with libvirt's
//    privileges; this runner, as the job's user, serves the guest's control channel
//    (include/tresor/vm/session.h) and writes the sealed outputs the guest sends.
//    `--domain-xml FILE` writes the domain XML and stops there.
//
// A step of several tasks (srun -n 4) gives each task its own output subdirectory, task-<rank>,
// so that their sealed files cannot collide.
//
//   tresor-run [--slurm-job-id N] --broker URL --ca FILE --agent PATH --datasets DIR --sim DIR
//              [--images FILE] [--gpus FILE] [--hypervisor URI] [--accel kvm|tcg] [--snp yes|no]
//              [--domain-xml FILE] [--boot-timeout SECONDS] [--task-prolog PATH] [--step-bridge NAME]
//              -- COMMAND [ARGS...]
//
// --step-bridge: the node's step network, a host bridge (docs/admin-guide.md): the VM of a task
// whose step meets as ranks (TRESOR_STEP_ROSTER=1) gets one virtio-net on it.
//
// --task-prolog: the cluster's TaskProlog (slurm.conf), which Slurm's own task launch would have
// run and which the plugin's exec bypasses: run here as the job's user with the job's
// environment; its "export", "unset" and "print" lines applied as slurmstepd applies them.
#include <fcntl.h>
#include <sched.h>
#include <sys/mount.h>
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
#include <string>
#include <vector>

#include <sys/socket.h>
#include <sys/un.h>

#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>

#include "tresor/agent/evidence.h"
#include "tresor/manifest.h"
#include "tresor/process.h"
#include "tresor/slurm/job.h"
#include "tresor/snp/sim.h"
#include "tresor/crypto.h"
#include "tresor/io.h"
#include "tresor/vm/hypervisor.h"
#include "tresor/vm/job.h"
#include "tresor/vm/session.h"
#include "keeper.h"

namespace {

// Slurm passes the submitting shell's limits as SLURM_RLIMIT_<NAME>; its own launch applies them,
// which the plugin's exec skips (PLATFORM.md). A limit above the hard limit is lowered to it.
void apply_slurm_rlimits() {
  struct Limit {
    const char* name;
    int resource;
  };
  static const Limit kLimits[] = {{"CPU", RLIMIT_CPU},   {"FSIZE", RLIMIT_FSIZE},   {"DATA", RLIMIT_DATA},   {"STACK", RLIMIT_STACK},
                                  {"CORE", RLIMIT_CORE}, {"RSS", RLIMIT_RSS},       {"NPROC", RLIMIT_NPROC}, {"NOFILE", RLIMIT_NOFILE},
                                  {"MEMLOCK", RLIMIT_MEMLOCK}, {"AS", RLIMIT_AS}};
  for (const auto& l : kLimits) {
    const std::string var = std::string("SLURM_RLIMIT_") + l.name;
    const char* v = std::getenv(var.c_str());
    if (v == nullptr || *v == '\0') continue;
    char* end = nullptr;
    errno = 0;
    const unsigned long long want = std::strtoull(v, &end, 10);
    if (errno != 0 || *end != '\0') {
      std::fprintf(stderr, "tresor-run: ignoring %s=%s (not a number)\n", var.c_str(), v);
      continue;
    }
    struct rlimit r {};
    if (getrlimit(l.resource, &r) != 0) continue;
    r.rlim_cur = want == static_cast<unsigned long long>(RLIM_INFINITY) ? r.rlim_max : std::min<rlim_t>(want, r.rlim_max);
    setrlimit(l.resource, &r);
  }
}

bool write_file(const char* path, const std::string& text) {
  const int fd = ::open(path, O_WRONLY | O_CLOEXEC);
  if (fd < 0) return false;
  const bool ok = ::write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size());
  ::close(fd);
  return ok;
}

// The local sandbox: new mount and PID namespaces (and a user namespace when not root), mounts
// made private, a fresh tmpfs as the job's TMPDIR (mounted inside the namespace on an empty
// directory the runner made and removes afterwards: the host sees an empty directory, never the
// job's temporary files), then the job as PID 2 under a small init (PID 1) that relays signals
// and reaps; when it ends, the kernel kills everything left in the namespace.
[[noreturn]] void run_local(char** argv, const std::string& slurm_job) {
  // Named after the Slurm job, so that the plugin's epilog can remove it if this runner is
  // killed before it can (scancel --signal=KILL, a node problem).
  std::string tmp = "/tmp/tresor-job-" + slurm_job + "-XXXXXX";
  if (::mkdtemp(tmp.data()) == nullptr) {
    std::fprintf(stderr, "tresor-run: cannot make the job's temporary directory: %s\n", std::strerror(errno));
    std::_Exit(126);
  }
  const uid_t uid = ::geteuid();
  const gid_t gid = ::getegid();
  int flags = CLONE_NEWNS | CLONE_NEWPID;
  if (uid != 0) flags |= CLONE_NEWUSER;
  if (::unshare(flags) != 0) {
    std::fprintf(stderr, "tresor-run: cannot create the local sandbox (unshare: %s); unprivileged user namespaces may be off "
                         "(sysctl kernel.unprivileged_userns_clone)\n", std::strerror(errno));
    std::_Exit(126);
  }
  if (uid != 0) {
    // Map the job's user to itself, so files it writes keep its ownership.
    write_file("/proc/self/setgroups", "deny");
    write_file("/proc/self/uid_map", std::to_string(uid) + " " + std::to_string(uid) + " 1\n");
    write_file("/proc/self/gid_map", std::to_string(gid) + " " + std::to_string(gid) + " 1\n");
  }
  // The job's wait status comes back through this pipe: PID 1 of a namespace cannot die by a
  // signal it raises itself, so the runner, outside, is the one that leaves like the job did.
  int status_pipe[2];
  if (::pipe2(status_pipe, O_CLOEXEC) != 0) {
    std::perror("tresor-run: pipe");
    std::_Exit(126);
  }
  const pid_t init = ::fork();
  if (init < 0) {
    std::perror("tresor-run: fork");
    std::_Exit(126);
  }
  if (init > 0) {
    ::close(status_pipe[1]);
    tresor::process::install_signal_relay();
    int status = tresor::process::wait_for(init);
    int job_status = 0;
    if (::read(status_pipe[0], &job_status, sizeof job_status) == static_cast<ssize_t>(sizeof job_status)) status = job_status;
    // The runner shares the sandbox's mount namespace (unshare moved it there too): unmount the
    // job's tmpfs, which frees its memory, then remove the mount point, which the host sees.
    ::umount2(tmp.c_str(), MNT_DETACH);
    ::rmdir(tmp.c_str());
    tresor::process::exit_like(status);
  }
  ::close(status_pipe[0]);

  // PID 1 of the sandbox.
  ::prctl(PR_SET_PDEATHSIG, SIGKILL);  // the runner gone (killed) takes the sandbox with it
  if (::mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0 ||
      ::mount("tresor-tmp", tmp.c_str(), "tmpfs", MS_NOSUID | MS_NODEV, "mode=0700,size=25%") != 0) {
    std::fprintf(stderr, "tresor-run: cannot set up the sandbox's mounts: %s\n", std::strerror(errno));
    std::_Exit(126);
  }
  // /proc of the new PID namespace, so the job sees only its own processes.
  ::mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, nullptr);
  ::setenv("TMPDIR", tmp.c_str(), 1);
  ::setenv(std::string(tresor::slurm::kInsideEnv).c_str(), "1", 1);
  const pid_t job = ::fork();
  if (job < 0) std::_Exit(126);
  if (job == 0) {
    tresor::process::default_signals();
    ::execvp(argv[0], argv);
    std::fprintf(stderr, "tresor-run: cannot run %s: %s\n", argv[0], std::strerror(errno));
    std::_Exit(errno == ENOENT ? 127 : 126);
  }
  tresor::process::install_signal_relay();
  tresor::process::relay_to(job);
  // Reap everything (orphans re-parent to us), and leave with the job's own status.
  int job_status = 0;
  for (;;) {
    int status = 0;
    const pid_t p = ::waitpid(-1, &status, 0);
    if (p < 0) {
      if (errno == EINTR) continue;
      break;
    }
    if (p == job) {
      job_status = status;
      break;
    }
  }
  (void)!::write(status_pipe[1], &job_status, sizeof job_status);
  std::_Exit(WIFEXITED(job_status) ? WEXITSTATUS(job_status) : 128 + WTERMSIG(job_status));
}

// A configuration file's or the console log's text; "" when it cannot be read (the parsers that
// follow say what is missing).
std::string read_text(const std::string& path) {
  auto text = tresor::read_small_file(path, 16u << 20);
  return text ? std::move(*text) : std::string();
}

std::string env_or(const char* name, const char* fallback) {
  const char* v = std::getenv(name);
  return v != nullptr ? v : fallback;
}

// The libvirt backend: the job's VM, from the allocation and the node's configuration, started
// by its keeper (runner/keeper.h): the plugin's root one (TRESOR_VM_FD), or one this runner forks
// when it may use libvirt itself. Returns the exit status for main.
int run_libvirt(const tresor::Manifest& manifest, const std::map<std::string, std::string>& options, const std::string& slurm_job,
                const std::string& output, const std::vector<std::string>& command, int evidence_fd) {
  auto option = [&](const char* name) { return options.contains(name) ? options.at(name) : std::string(); };
  auto fail = [](const std::string& why) {
    std::fprintf(stderr, "tresor-run: libvirt backend: %s\n", why.c_str());
    return 2;
  };
  auto plan = tresor::runner::plan_vm(manifest, options, slurm_job, [](std::string_view k) { return env_or(std::string(k).c_str(), ""); });
  if (!plan) return fail(plan.error().message);
  if (const std::string to = option("--domain-xml"); !to.empty()) {
    auto xml = tresor::vm::domain_xml(plan->spec);
    if (!xml) return fail(xml.error().message);
    if (to == "-") {
      std::cout << *xml << std::flush;
    } else {
      std::ofstream out(to);
      out << *xml;
      if (!out.flush()) return fail("cannot write " + to);
    }
    return 0;
  }
  // The guest's sealed outputs are written here, by this process, as the job's user.
  const int output_fd = ::open(output.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (output_fd < 0) return fail("cannot open the output directory " + output + ": " + std::strerror(errno));
  // From here on scancel's signals are kept for the guest (they reach the job, or stop it from
  // starting) instead of ending the runner before it has cleaned up.
  const int signal_fd = tresor::process::signal_pipe();
  int keeper_fd = -1;
  pid_t own_keeper = -1;
  if (const char* v = std::getenv("TRESOR_VM_FD"); v != nullptr) {
    keeper_fd = std::atoi(v);
    if (keeper_fd < 3 || ::fcntl(keeper_fd, F_SETFD, FD_CLOEXEC) != 0) return fail(std::string("TRESOR_VM_FD=") + v + " is not an open descriptor");
    ::unsetenv("TRESOR_VM_FD");
  } else {
    int pair[2];
    if (::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, pair) != 0) return fail(std::string("socketpair: ") + std::strerror(errno));
    own_keeper = ::fork();
    if (own_keeper < 0) return fail(std::string("fork: ") + std::strerror(errno));
    if (own_keeper == 0) {
      ::close(pair[0]);
      std::_Exit(tresor::runner::keep_vm(pair[1], std::move(*plan), option("--hypervisor")));
    }
    ::close(pair[1]);
    keeper_fd = pair[0];
  }
  const auto& spec = plan->spec;
  const bool snp = plan->job.snp;
  std::fprintf(stderr, "tresor-run: job %s (Slurm job %s), backend libvirt: VM %s, %u vCPUs, %llu MiB, %zu GPUs, %s%s; started by %s\n",
               manifest.job_id.c_str(), slurm_job.c_str(), spec.name.c_str(), spec.vcpus, static_cast<unsigned long long>(spec.memory_mib),
               spec.gpus.size(), snp ? "SEV-SNP" : "NOT confidential (snp=no: a plain VM, its host can read its memory)",
               spec.accelerator == tresor::vm::Accelerator::kTcg ? ", software emulation (TCG)" : "",
               own_keeper < 0 ? "the node's VM keeper" : "this runner (it may use libvirt itself)");
  // TRESOR_TIMING: one line of the VM's phases at the end (tresor bench launch --backend libvirt).
  using Clock = std::chrono::steady_clock;
  auto ms = [](Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double, std::milli>(b - a).count(); };
  auto reap_keeper = [&] {
    if (own_keeper > 0) tresor::process::wait_for(own_keeper);
  };
  auto vm = tresor::runner::await_vm(keeper_fd);
  const auto t_started = Clock::now();
  if (!vm) {
    ::close(keeper_fd);
    reap_keeper();
    return fail(vm.error().message);
  }
  tresor::vm::HostSession session;
  session.start.manifest_env = env_or(std::string(tresor::slurm::kManifestEnv).c_str(), "");
  session.start.command = command;
  // A batch script lives on the host: the guest gets its text (the agent checks it against the
  // manifest's digest, as it would the file).
  if (std::ifstream in(command[0], std::ios::binary); in) {
    std::ostringstream text;
    text << in.rdbuf();
    auto d = tresor::crypto::sha256(tresor::as_bytes(text.str()));
    if (d && *d == manifest.script_sha256) session.start.script = text.str();
  }
  for (char** e = environ; *e != nullptr; ++e) {
    const std::string kv = *e;
    const size_t eq = kv.find('=');
    if (eq == std::string::npos) continue;
    const std::string k = kv.substr(0, eq);
    if (k == tresor::slurm::kManifestEnv || k == "TRESOR_EVIDENCE_FD") continue;
    session.start.env[k] = kv.substr(eq + 1);
  }
  session.start.broker_url = option("--broker");
  session.start.broker_ca_pem = read_text(option("--ca"));
  session.start.datasets = manifest.datasets;
  session.start.evidence = snp ? "auto" : "channel";
  if (!snp) {
    session.evidence = [evidence_fd](const std::array<std::byte, 64>& rd) { return tresor::agent::ChannelEvidence(evidence_fd).evidence(rd); };
  }
  {
    const std::string hp = option("--broker").substr(std::string_view("https://").size());
    const size_t colon = hp.rfind(':');
    session.broker_host = hp.substr(0, colon);
    session.broker_port = static_cast<uint16_t>(std::atoi(hp.substr(colon + 1).c_str()));
  }
  session.signal_fd = signal_fd;
  session.output_dir_fd = output_fd;
  session.first_frame_timeout = std::chrono::seconds(option("--boot-timeout").empty() ? 300 : std::atoi(option("--boot-timeout").c_str()));
  Clock::time_point t_first = t_started;
  session.on_first_frame = [&] { t_first = Clock::now(); };
  auto status = tresor::vm::serve_guest(vm->control_fd, session);
  ::close(vm->control_fd);
  ::close(output_fd);
  const auto t_reported = Clock::now();
  const std::string console = status ? std::string() : tresor::runner::keeper_console(keeper_fd);
  // Once the guest has reported, it has nothing left to do: the VM is destroyed now rather than
  // waiting for its power-off.
  tresor::runner::keeper_destroy(keeper_fd);
  ::close(keeper_fd);
  reap_keeper();
  if (std::getenv("TRESOR_TIMING") != nullptr) {
    std::fprintf(stderr, "tresor-run: timing domain_create_ms=%.1f boot_to_agent_ms=%.1f agent_ms=%.1f teardown_ms=%.1f\n",
                 vm->create_ms, ms(t_started, t_first), ms(t_first, t_reported), ms(t_reported, Clock::now()));
  }
  if (!status) {
    std::fprintf(stderr, "tresor-run: libvirt backend: %s\n", status.error().message.c_str());
    if (!console.empty()) std::fprintf(stderr, "tresor-run: the VM's console said:\n%s\n", console.c_str());
    return 1;
  }
  tresor::process::exit_like(*status);
}


// Runs the TaskProlog and applies its output to this process's environment (which the job
// inherits). A TaskProlog that fails stops the task: its environment would be incomplete.
bool run_task_prolog(const std::string& path) {
  int out[2];
  if (::pipe2(out, O_CLOEXEC) != 0) return false;
  const pid_t pid = ::fork();
  if (pid < 0) return false;
  if (pid == 0) {
    ::dup2(out[1], STDOUT_FILENO);
    tresor::process::default_signals();
    ::execl(path.c_str(), path.c_str(), static_cast<char*>(nullptr));
    std::fprintf(stderr, "tresor-run: cannot run the TaskProlog %s: %s\n", path.c_str(), std::strerror(errno));
    std::_Exit(127);
  }
  ::close(out[1]);
  std::string text;
  char buf[4096];
  for (ssize_t n; (n = ::read(out[0], buf, sizeof buf)) != 0;) {
    if (n < 0) {
      if (errno == EINTR) continue;
      break;
    }
    text.append(buf, static_cast<size_t>(n));
  }
  ::close(out[0]);
  const int status = tresor::process::wait_for(pid);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    std::fprintf(stderr, "tresor-run: the TaskProlog %s failed (%s %d): the task was not started\n", path.c_str(),
                 WIFEXITED(status) ? "exit" : "signal", WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status));
    return false;
  }
  std::map<std::string, std::string> env;
  for (char** e = environ; *e != nullptr; ++e) {
    const std::string kv = *e;
    const size_t eq = kv.find('=');
    if (eq != std::string::npos) env[kv.substr(0, eq)] = kv.substr(eq + 1);
  }
  const std::string printed = tresor::slurm::apply_task_prolog_output(text, env);
  ::clearenv();
  for (const auto& [k, v] : env) ::setenv(k.c_str(), v.c_str(), 1);
  std::fputs(printed.c_str(), stdout);
  std::fflush(stdout);
  return true;
}

int usage(const char* why) {
  std::fprintf(stderr,
               "tresor-run: %s\nUsage: tresor-run [--slurm-job-id N] --broker URL --ca FILE --agent PATH --datasets DIR --sim DIR "
               "-- COMMAND [ARGS...]\n",
               why);
  return 2;
}

}  // namespace

// tresor-run --vm-keeper FD [options] --: the VM keeper, as the plugin starts it (root, the
// node's configuration in its options, the task's Slurm variables and manifest in a filtered
// environment). It answers the runner on FD (runner/keeper.h).
int vm_keeper_main(int argc, char** argv) {
  const int fd = std::atoi(argv[2]);
  if (fd < 3 || ::fcntl(fd, F_SETFD, FD_CLOEXEC) != 0) return usage("--vm-keeper needs the descriptor the runner holds the other end of");
  auto args = tresor::process::parse_launcher_args(argc - 2, argv + 2, {"--slurm-job-id", "--images", "--gpus", "--datasets", "--hypervisor",
                                                                          "--accel", "--snp", "--step-bridge"}, false);
  auto refuse = [&](const std::string& why) {
    tresor::runner::keeper_refuse(fd, why);
    return 1;
  };
  if (!args) return refuse(args.error().message);
  const char* manifest_env = std::getenv(std::string(tresor::slurm::kManifestEnv).c_str());
  auto manifest = tresor::slurm::decode_manifest_env(manifest_env != nullptr ? manifest_env : "");
  if (!manifest) return refuse("the job's manifest is unreadable: " + manifest.error().message);
  const std::string slurm_job = args->options.contains("--slurm-job-id") ? args->options.at("--slurm-job-id") : "0";
  if (slurm_job.empty() || slurm_job.find_first_not_of("0123456789") != std::string::npos) return refuse("--slurm-job-id must be a number");
  auto plan = tresor::runner::plan_vm(*manifest, args->options, slurm_job, [](std::string_view k) { return env_or(std::string(k).c_str(), ""); });
  if (!plan) return refuse(plan.error().message);
  return tresor::runner::keep_vm(fd, std::move(*plan), args->options.contains("--hypervisor") ? args->options.at("--hypervisor") : "");
}

int main(int argc, char** argv) {
  if (argc >= 3 && std::string_view(argv[1]) == "--vm-keeper") return vm_keeper_main(argc, argv);
  for (int k = 1; k < argc && std::string_view(argv[k]) != "--"; ++k) {
    if (std::string_view(argv[k]) == "--help" || std::string_view(argv[k]) == "-h") {
      usage("runs a confidential job's task (started by the tresor SPANK plugin)");
      return 0;
    }
  }
  auto args = tresor::process::parse_launcher_args(argc, argv, {"--slurm-job-id", "--broker", "--ca", "--agent", "--datasets", "--sim", "--images",
                                                                "--gpus", "--hypervisor", "--accel", "--snp", "--domain-xml", "--boot-timeout",
                                                                "--task-prolog", "--step-bridge"});
  if (!args) return usage(args.error().message.c_str());
  auto option = [&](const char* name) { return args->options.contains(name) ? args->options.at(name) : std::string(); };
  const std::string slurm_job = args->options.contains("--slurm-job-id") ? option("--slurm-job-id") : "0";
  if (slurm_job.empty() || slurm_job.find_first_not_of("0123456789") != std::string::npos) return usage("--slurm-job-id must be a number");
  const std::string broker = option("--broker"), ca = option("--ca"), agent = option("--agent"), datasets = option("--datasets"),
                    sim = option("--sim");
  // Evidence: the channel the plugin's root evidence server holds the other end of
  // (TRESOR_EVIDENCE_FD), or, run by hand, a sim directory this user may read (--sim).
  const char* evidence_fd_env = std::getenv("TRESOR_EVIDENCE_FD");
  if (broker.empty() || agent.empty() || (sim.empty() && evidence_fd_env == nullptr)) {
    std::fprintf(stderr, "tresor-run: this cluster's plugstack.conf must name broker=, ca=, agent= and (for the local backend) "
                         "sim=: a confidential job cannot run without a key broker and evidence\n");
    return 2;
  }

  const char* manifest_env = std::getenv(std::string(tresor::slurm::kManifestEnv).c_str());
  if (manifest_env == nullptr) return usage("no TRESOR_MANIFEST in the environment: start jobs through the tresor SPANK plugin");
  auto manifest = tresor::slurm::decode_manifest_env(manifest_env);
  if (!manifest) {
    std::fprintf(stderr, "tresor-run: the job's manifest is unreadable: %s\n", manifest.error().message.c_str());
    return 2;
  }
  const std::string backend = env_or("TRESOR_BACKEND", "local");
  if (backend != "local" && backend != "libvirt") {
    std::fprintf(stderr, "tresor-run: TRESOR_BACKEND='%s' is not a backend (local, libvirt)\n", backend.c_str());
    return 2;
  }
  std::string output = env_or("TRESOR_OUTPUT", "tresor-output");
  // Several tasks in one step each seal into their own subdirectory (task-<rank>).
  const std::string ntasks = env_or("SLURM_STEP_NUM_TASKS", "1"), rank = env_or("SLURM_PROCID", "0");
  if (ntasks != "1" && !ntasks.empty()) output += "/task-" + rank;
  if (const std::string prolog = option("--task-prolog"); !prolog.empty() && !run_task_prolog(prolog)) return 1;
  if (backend == "libvirt" && !option("--domain-xml").empty()) return run_libvirt(*manifest, args->options, slurm_job, output, args->command, -1);
  std::error_code ec;
  std::filesystem::create_directories(output, ec);
  if (ec) {
    std::fprintf(stderr, "tresor-run: cannot create the output directory %s: %s\n", output.c_str(), ec.message().c_str());
    return 2;
  }
  if (backend == "local") {
    std::fprintf(stderr,
                 "tresor-run: job %s (Slurm job %s), backend local: NO VM — this job is NOT confidential (the local backend is for "
                 "laptops and CI)\n",
                 manifest->job_id.c_str(), slurm_job.c_str());
  }

  int agent_fd = -1;
  if (evidence_fd_env != nullptr) {
    agent_fd = std::atoi(evidence_fd_env);
    if (agent_fd < 3 || ::fcntl(agent_fd, F_GETFD) < 0) {
      std::fprintf(stderr, "tresor-run: TRESOR_EVIDENCE_FD=%s is not an open descriptor\n", evidence_fd_env);
      return 2;
    }
    ::unsetenv("TRESOR_EVIDENCE_FD");
  } else {
    // The host side of the evidence channel: the sim secure processor signs for the launch
    // values this runner chose, as the AMD-SP does for a VM's.
    auto sp = tresor::snp::sim::SecureProcessor::load(sim);
    if (!sp) {
      std::fprintf(stderr, "tresor-run: the sim secure processor in %s: %s\n", sim.c_str(), sp.error().message.c_str());
      return 2;
    }
    auto host_data = tresor::manifest_digest(*manifest);
    if (!host_data) return 2;
    int channel[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM, 0, channel) != 0) {
      std::perror("tresor-run: socketpair");
      return 2;
    }
    // A separate process serves the channel: the runner stays single-threaded, as unshare() with
    // a user namespace requires. It ends when every holder of the agent's end has closed it.
    const pid_t server = ::fork();
    if (server < 0) {
      std::perror("tresor-run: fork");
      return 2;
    }
    if (server == 0) {
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);
      ::close(channel[1]);
      auto served = tresor::agent::serve_sim_evidence(channel[0], *sp, manifest->image_measurement, *host_data);
      if (!served) std::fprintf(stderr, "tresor-run: evidence channel: %s\n", served.error().message.c_str());
      std::_Exit(served ? 0 : 1);
    }
    ::close(channel[0]);
    agent_fd = channel[1];
  }

  if (backend == "libvirt") return run_libvirt(*manifest, args->options, slurm_job, output, args->command, agent_fd);

  std::vector<std::string> launch = {agent, "--broker", broker, "--ca", ca, "--data-root", datasets.empty() ? "/nonexistent" : datasets,
                                   "--output", std::filesystem::absolute(output).string(), "--evidence-fd", std::to_string(agent_fd), "--"};
  for (const auto& c : args->command) launch.push_back(c);
  static std::vector<char*> cargs;
  for (auto& a : launch) cargs.push_back(a.data());
  cargs.push_back(nullptr);
  apply_slurm_rlimits();
  std::signal(SIGPIPE, SIG_DFL);
  run_local(cargs.data(), slurm_job);
}
