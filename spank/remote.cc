// The remote side (slurmstepd, task_init, as the job's user): replace the task with tresor-run,
// which runs the job in its sandbox or VM (docs/admin-guide.md). The job's own argv and
// environment go to the runner; Slurm's pre-launch steps that this exec skips (rlimits, TMPDIR)
// are the runner's to apply (PLATFORM.md).
#include <dirent.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/mount.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <csignal>
#include <fcntl.h>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "plugin.h"
#include "tresor/agent/evidence.h"
#include "tresor/slurm/job.h"
#include "tresor/snp/sim.h"

namespace tresor::spank {
namespace {

// The batch step's id (slurm/slurm.h SLURM_BATCH_SCRIPT; spank.h alone does not define it).
constexpr uint32_t kBatchStep = 0xfffffffb;

// A whole (small) file, or "" when it cannot be read.
std::string read_whole(const char* path) {
  std::string text;
  if (std::FILE* f = std::fopen(path, "re")) {
    char buf[4096];
    for (size_t n; (n = std::fread(buf, 1, sizeof buf, f)) > 0;) text.append(buf, n);
    std::fclose(f);
  }
  return text;
}

std::string env_value(char** env, std::string_view name) {
  for (char** e = env; e != nullptr && *e != nullptr; ++e) {
    std::string_view kv(*e);
    if (kv.size() > name.size() && kv.starts_with(name) && kv[name.size()] == '=') return std::string(kv.substr(name.size() + 1));
  }
  return {};
}

}  // namespace

int exec_runner(spank_t sp) {
  char** env = nullptr;
  if (spank_get_item(sp, S_JOB_ENV, &env) != ESPANK_SUCCESS) {
    slurm_error("tresor: cannot read the job's environment");
    return -1;
  }
  // A step started from inside a confidential job (its srun) is not wrapped again. It runs on the
  // host, outside the sandbox: it sees no decrypted input, and it must not inherit the sandbox's
  // TMPDIR (on the host that is an empty directory on the node's disk).
  if (!env_value(env, tresor::slurm::kInsideEnv).empty()) {
    uint32_t step = 0;
    spank_get_item(sp, S_JOB_STEPID, &step);
    if (step == kBatchStep) {
      slurm_error("tresor: TRESOR_INSIDE_JOB is set in a batch job's own environment: refusing to run it unwrapped");
      return -1;
    }
    spank_unsetenv(sp, "TMPDIR");
    std::fprintf(stderr, "tresor: this step runs outside the job's sandbox (NOT confidential): it cannot see $TRESOR_DATA\n");
    return 0;
  }
  const std::string manifest = env_value(env, tresor::slurm::kManifestEnv);
  if (manifest.empty()) {
    if (state().options.any()) {
      slurm_error("tresor: this job asked for Tresor but carries no signed manifest: submit it from a node where the "
                  "tresor plugin is configured (plugstack.conf), without --export=NONE");
      return -1;
    }
    return 0;  // not a confidential job
  }
  if (!state().config_ok) return -1;

  int argc = 0;
  char** argv = nullptr;
  uint32_t job_id = 0;
  if (spank_get_item(sp, S_JOB_ARGV, &argc, &argv) != ESPANK_SUCCESS || argc < 1) {
    slurm_error("tresor: cannot read the job's command");
    return -1;
  }
  spank_get_item(sp, S_JOB_ID, &job_id);
  const auto& c = state().config;
  std::vector<std::string> args = {c.runner, "--slurm-job-id", std::to_string(job_id)};
  if (!c.broker_url.empty()) args.insert(args.end(), {"--broker", c.broker_url, "--ca", c.broker_ca});
  args.insert(args.end(), {"--agent", c.agent});
  if (!c.datasets.empty()) args.insert(args.end(), {"--datasets", c.datasets});
  if (!c.images.empty()) args.insert(args.end(), {"--images", c.images});
  if (!c.gpus.empty()) args.insert(args.end(), {"--gpus", c.gpus});
  if (!c.step_bridge.empty()) args.insert(args.end(), {"--step-bridge", c.step_bridge});
  args.insert(args.end(), {"--hypervisor", c.hypervisor, "--accel", c.accel, "--snp", c.snp ? "yes" : "no", "--boot-timeout",
                           std::to_string(c.boot_timeout_s)});
  // Slurm's task launch runs the TaskProlog, which this exec bypasses: the runner runs it.
  const char* conf = std::getenv("SLURM_CONF");
  if (auto prolog = tresor::slurm::task_prolog_from_slurm_conf(read_whole(conf != nullptr ? conf : "/etc/slurm/slurm.conf")); !prolog.empty()) {
    args.insert(args.end(), {"--task-prolog", prolog});
  }
  // Evidence comes from the root server task_init_privileged started (TRESOR_EVIDENCE_FD in the
  // environment), never from a key the job's user could read.
  args.push_back("--");
  for (int i = 0; i < argc; ++i) args.emplace_back(argv[i]);
  std::vector<char*> cargv;
  for (auto& a : args) cargv.push_back(a.data());
  cargv.push_back(nullptr);
  ::execve(c.runner.c_str(), cargv.data(), env);
  slurm_error("tresor: cannot start the runner %s: %s (plugstack.conf runner=)", c.runner.c_str(), std::strerror(errno));
  return -1;
}

int cleanup_after_job(spank_t sp) {
  uint32_t job_id = 0;
  if (spank_get_item(sp, S_JOB_ID, &job_id) != ESPANK_SUCCESS || job_id == 0) return 0;
  const std::string prefix = "tresor-job-" + std::to_string(job_id) + "-";
  DIR* d = ::opendir("/tmp");
  if (d == nullptr) return 0;
  while (dirent* e = ::readdir(d)) {
    const std::string name = e->d_name;
    if (!name.starts_with(prefix)) continue;
    const std::string path = "/tmp/" + name;
    ::umount2(path.c_str(), MNT_DETACH | UMOUNT_NOFOLLOW);  // normally not mounted here: the tmpfs lived in the sandbox
    // A VM's runtime directory (tresor-job-<id>-vm-*) holds only its console log and control
    // socket; anything else in it, as in a sandbox's, is left for the administrator.
    if (name.find("-vm-") != std::string::npos) {
      ::unlink((path + "/console.log").c_str());
      ::unlink((path + "/control.sock").c_str());
    }
    if (::rmdir(path.c_str()) == 0) {
      slurm_info("tresor: job %u: removed %s left by a runner that did not finish", job_id, path.c_str());
    } else {
      slurm_error("tresor: job %u: cannot remove %s: %s", job_id, path.c_str(), std::strerror(errno));
    }
  }
  ::closedir(d);
  return 0;
}

int start_vm_keeper(spank_t sp) {
  char** env = nullptr;
  if (spank_get_item(sp, S_JOB_ENV, &env) != ESPANK_SUCCESS) return 0;
  const std::string manifest_env = env_value(env, tresor::slurm::kManifestEnv);
  if (manifest_env.empty() || !env_value(env, tresor::slurm::kInsideEnv).empty()) return 0;  // not a confidential task
  if (env_value(env, "TRESOR_BACKEND") != "libvirt") return 0;
  if (!state().config_ok) return -1;
  const auto& c = state().config;
  if (std::find(c.backends.begin(), c.backends.end(), "libvirt") == c.backends.end()) {
    slurm_error("tresor: this node does not allow the libvirt backend (plugstack.conf backends=)");
    return -1;
  }
  uint32_t job_id = 0;
  spank_get_item(sp, S_JOB_ID, &job_id);
  std::vector<std::string> args = {c.runner, "--vm-keeper", "3", "--slurm-job-id", std::to_string(job_id), "--images", c.images,
                                   "--datasets", c.datasets, "--hypervisor", c.hypervisor, "--accel", c.accel, "--snp", c.snp ? "yes" : "no"};
  if (!c.gpus.empty()) args.insert(args.end(), {"--gpus", c.gpus});
  if (!c.step_bridge.empty()) args.insert(args.end(), {"--step-bridge", c.step_bridge});
  args.push_back("--");
  // The keeper is root: of the user's environment it sees only what describes the allocation.
  std::vector<std::string> kenv = {"PATH=/usr/sbin:/usr/bin:/sbin:/bin"};
  // The step's task layout and TRESOR_STEP_ROSTER decide the domain's name and its step network.
  for (const char* name : {"TRESOR_MANIFEST", "TRESOR_TIMING", "TRESOR_STEP_ROSTER", "SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_NTASKS",
                           "SLURM_NNODES", "SLURM_CPUS_ON_NODE", "SLURM_JOB_CPUS_PER_NODE",
                           "SLURM_MEM_PER_NODE", "SLURM_MEM_PER_CPU", "SLURM_JOB_GPUS", "CUDA_VISIBLE_DEVICES"}) {
    for (char** e = env; e != nullptr && *e != nullptr; ++e) {
      if (std::string_view(*e).starts_with(std::string(name) + "=")) kenv.emplace_back(*e);
    }
  }
  // The task's own ids are not in the job's environment yet at task_init_privileged (slurmstepd
  // sets them for the exec that follows): they come from spank items.
  uint32_t global_task = 0;
  int local_task = 0;
  if (spank_get_item(sp, S_TASK_GLOBAL_ID, &global_task) == ESPANK_SUCCESS) kenv.push_back("SLURM_PROCID=" + std::to_string(global_task));
  if (spank_get_item(sp, S_TASK_ID, &local_task) == ESPANK_SUCCESS) kenv.push_back("SLURM_LOCALID=" + std::to_string(local_task));
  int pair[2];
  if (::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, pair) != 0) {
    slurm_error("tresor: socketpair: %s", std::strerror(errno));
    return -1;
  }
  const pid_t keeper = ::fork();
  if (keeper < 0) {
    slurm_error("tresor: fork: %s", std::strerror(errno));
    return -1;
  }
  if (keeper == 0) {
    if (pair[1] == 3) {
      ::fcntl(3, F_SETFD, 0);
    } else {
      ::dup2(pair[1], 3);  // the copy is not close-on-exec
    }
    ::closefrom(4);
    std::vector<char*> cargv, cenv;
    for (auto& a : args) cargv.push_back(a.data());
    for (auto& e : kenv) cenv.push_back(e.data());
    cargv.push_back(nullptr);
    cenv.push_back(nullptr);
    ::execve(c.runner.c_str(), cargv.data(), cenv.data());
    ::_exit(127);  // the runner hears the end of the socket: "the VM keeper ended without starting the VM"
  }
  ::close(pair[1]);
  ::fcntl(pair[0], F_SETFD, 0);  // the task's end survives the exec into tresor-run
  if (spank_setenv(sp, "TRESOR_VM_FD", std::to_string(pair[0]).c_str(), 1) != ESPANK_SUCCESS) {
    slurm_error("tresor: cannot pass the VM keeper's socket to the task");
    return -1;
  }
  return 0;
}

int start_evidence_server(spank_t sp) {
  char** env = nullptr;
  if (spank_get_item(sp, S_JOB_ENV, &env) != ESPANK_SUCCESS) return 0;
  const std::string manifest_env = env_value(env, tresor::slurm::kManifestEnv);
  if (manifest_env.empty() || !env_value(env, tresor::slurm::kInsideEnv).empty()) return 0;  // not a confidential task
  const auto& c = state().config;
  if (!state().config_ok) return -1;
  if (c.sim.empty()) return 0;  // no sim: the backend brings its own evidence (a VM's secure processor)
  auto manifest = tresor::slurm::decode_manifest_env(manifest_env);
  if (!manifest) {
    slurm_error("tresor: the job's manifest is unreadable: %s", manifest.error().message.c_str());
    return -1;
  }
  auto host_data = tresor::manifest_digest(*manifest);
  auto sp_key = tresor::snp::sim::SecureProcessor::load(c.sim);
  if (!host_data || !sp_key) {
    slurm_error("tresor: cannot start the evidence server: %s",
                (!host_data ? host_data.error().message : sp_key.error().message).c_str());
    return -1;
  }
  int fds[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0) {
    slurm_error("tresor: socketpair: %s", std::strerror(errno));
    return -1;
  }
  const pid_t server = ::fork();
  if (server < 0) {
    slurm_error("tresor: fork: %s", std::strerror(errno));
    return -1;
  }
  if (server == 0) {
    // Root, holding the sim key; dies with the task (whose process becomes tresor-run).
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    ::close(fds[1]);
    auto served = tresor::agent::serve_sim_evidence(fds[0], *sp_key, manifest->image_measurement, *host_data);
    ::_exit(served ? 0 : 1);
  }
  ::close(fds[0]);
  // The task's end survives the exec into tresor-run (and on into the sandbox's agent).
  ::fcntl(fds[1], F_SETFD, 0);
  if (spank_setenv(sp, "TRESOR_EVIDENCE_FD", std::to_string(fds[1]).c_str(), 1) != ESPANK_SUCCESS) {
    slurm_error("tresor: cannot pass the evidence channel to the task");
    return -1;
  }
  return 0;
}

}  // namespace tresor::spank
