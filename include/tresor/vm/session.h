// tresor/vm/session.h — the host's side of a job VM's control channel (include/tresor/vm/control.h,
// docs/protocol.md §control channel): hand the guest its job, answer its sim evidence requests,
// relay its key-broker connections to the broker, write its stdout and stderr where the job's
// output goes, write the sealed outputs it sends into the job's output directory, pass signals
// in, and return the job's status when the guest reports it.
#pragma once

#include <array>
#include <chrono>
#include <cstdint>
#include <functional>
#include <string>

#include "tresor/error.h"
#include "tresor/kbs/client.h"
#include "tresor/vm/control.h"

namespace tresor::vm {

struct HostSession {
  control::Start start;
  /// Signs sim evidence for the launch values the host chose; empty for an SEV-SNP guest, whose
  /// requests are then refused (it asks its own AMD-SP).
  std::function<Result<kbs::Evidence>(const std::array<std::byte, 64>&)> evidence;
  std::string broker_host = "127.0.0.1";
  uint16_t broker_port = 0;
  int out_fd = 1, err_fd = 2;
  /// The job's output directory (a directory descriptor, not owned): the guest's sealed outputs
  /// are written under it as this process's user. Each path component is opened without
  /// following symbolic links, each file is written under a temporary name and renamed into
  /// place only when complete; a file cut short is removed. -1: the guest's outputs are refused.
  int output_dir_fd = -1;
  int signal_fd = -1;  // read end of a pipe: each byte a signal number for the job
  std::function<void()> on_first_frame;  // called when the guest's first frame arrives (timing)
  /// How long to wait for the guest's first frame (its agent is up); 0: no limit. Past it,
  /// serve_guest returns kUnavailable saying so (the caller then destroys the VM).
  std::chrono::milliseconds first_frame_timeout{0};
};

/// Runs the session on the channel `fd` until the guest reports the job's status, and returns it
/// (a wait status: exit code or death by signal). kUnavailable when the channel ends first (the
/// guest crashed or was destroyed) — the job's status is then unknown and must not be invented.
/// kIo or kMalformed, after the guest's status, when one of its outputs could not be written or
/// was refused (its name, and why): the job's results are incomplete and must not pass for done.
[[nodiscard]] Result<int> serve_guest(int fd, const HostSession& session);

}  // namespace tresor::vm
