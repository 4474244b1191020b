// tresor/process.h — what tresor-run and tresor-agent both do as the parent of a job's process:
// pass the job's signals on to it, wait for it, and leave with its status — the same exit code,
// or death by the same signal — so that Slurm sees the job exactly as if it had run alone.
#pragma once

#include <sys/types.h>

#include <array>
#include <csignal>
#include <map>
#include <string>
#include <vector>

#include "tresor/error.h"

namespace tresor::process {

/// The signals passed on to the job: scancel sends SIGCONT and SIGTERM; `scancel -s USR1 -b`
/// reaches only the job's first process, which must pass it on.
inline constexpr std::array<int, 8> kRelayedSignals = {SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2, SIGCONT, SIGALRM};

/// The command line of a launcher (tresor-run, tresor-agent): `--OPTION VALUE` pairs, then `--`
/// and the job's command. Every option takes a value and must be one of `known`.
struct LauncherArgs {
  std::map<std::string, std::string> options;  // "--broker" -> "https://…"
  std::vector<std::string> command;            // non-empty
};
/// kInvalidArgument names the problem: an option without a value, an unknown option, no command.
[[nodiscard]] Result<LauncherArgs> parse_launcher_args(int argc, char** argv, const std::vector<std::string>& known, bool command_required = true);

/// Installs handlers that pass each relayed signal to the process set by relay_to().
void install_signal_relay();
/// Where relayed signals go from now on (0: nowhere).
void relay_to(pid_t pid);
/// Instead of relaying: each relayed signal's number is written (one byte) into a pipe, whose
/// read end is returned (-1 when no pipe could be made). For a parent whose job is not a local
/// process (a VM's, reached through its control channel).
int signal_pipe();
/// Restores the default disposition of the relayed signals (in a child, before exec).
void default_signals();
/// Waits for `pid` (through interruptions), relaying signals to it meanwhile; its wait status.
int wait_for(pid_t pid);
/// Ends this process as `wait_status` says the job ended: its exit code, or death by its signal
/// (without a core dump of ours). Never use it in PID 1 of a namespace, which cannot die by a
/// signal it raises itself.
[[noreturn]] void exit_like(int wait_status);

}  // namespace tresor::process
