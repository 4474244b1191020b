// Signal relay and exit-status passing for a job's parent process (include/tresor/process.h).
#include "tresor/process.h"

#include <fcntl.h>
#include <sys/resource.h>
#include <unistd.h>
#include <sys/wait.h>

#include <cerrno>
#include <cstdlib>

namespace tresor::process {
namespace {

volatile sig_atomic_t g_target = 0;
volatile sig_atomic_t g_pipe = -1;

void relay(int sig) {
  if (g_target > 0) ::kill(g_target, sig);
}

void to_pipe(int sig) {
  const int saved = errno;
  const unsigned char b = static_cast<unsigned char>(sig);
  if (g_pipe >= 0) (void)!::write(g_pipe, &b, 1);
  errno = saved;
}

}  // namespace

Result<LauncherArgs> parse_launcher_args(int argc, char** argv, const std::vector<std::string>& known, bool command_required) {
  LauncherArgs out;
  int i = 1;
  for (; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--") {
      ++i;
      break;
    }
    if (i + 1 >= argc) return fail(ErrorCode::kInvalidArgument, "option " + a + " needs a value");
    bool ok = false;
    for (const auto& k : known) ok = ok || k == a;
    if (!ok) return fail(ErrorCode::kInvalidArgument, "unknown option " + a);
    out.options[a] = argv[++i];
  }
  for (; i < argc; ++i) out.command.emplace_back(argv[i]);
  if (out.command.empty() && command_required) return fail(ErrorCode::kInvalidArgument, "no command after --");
  return out;
}

void install_signal_relay() {
  struct sigaction sa {};
  sa.sa_handler = relay;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  for (int s : kRelayedSignals) sigaction(s, &sa, nullptr);
}

void relay_to(pid_t pid) { g_target = pid; }

int signal_pipe() {
  int p[2];
  if (::pipe2(p, O_CLOEXEC | O_NONBLOCK) != 0) return -1;
  g_pipe = p[1];
  struct sigaction sa {};
  sa.sa_handler = to_pipe;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;
  for (int s : kRelayedSignals) sigaction(s, &sa, nullptr);
  return p[0];
}

void default_signals() {
  for (int s : kRelayedSignals) std::signal(s, SIG_DFL);
}

int wait_for(pid_t pid) {
  relay_to(pid);
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0) {
    if (errno != EINTR) {
      status = 1 << 8;  // exit code 1: the child is not ours to wait for
      break;
    }
  }
  relay_to(0);
  return status;
}

void exit_like(int status) {
  if (WIFSIGNALED(status)) {
    const int sig = WTERMSIG(status);
    std::signal(sig, SIG_DFL);
    struct rlimit no_core {};
    setrlimit(RLIMIT_CORE, &no_core);  // the job's core dump (if any) is the job's; not ours
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, sig);
    sigprocmask(SIG_UNBLOCK, &set, nullptr);
    ::raise(sig);
  }
  std::_Exit(WIFEXITED(status) ? WEXITSTATUS(status) : 1);
}

}  // namespace tresor::process
