// The agent's guest mode (agent/guest.cc).
#pragma once

#include <string>
#include <string_view>

#include "tresor/error.h"
#include "tresor/manifest.h"

namespace tresor::agent {

/// Runs the job the host sends over the control channel on `fd`, with the job's shares under
/// `root` (/ in a VM). Returns the agent's exit code; the job's own status went to the host.
int run_guest(int fd, const std::string& root);

/// Whether a variable of the job's environment, which the host sends, may reach the job in the
/// guest: not the loader's (LD_*), nor glibc's other setuid-unsafe ones, nor PATH, ENV, BASH_ENV.
bool guest_env_allowed(std::string_view name);

inline Result<std::string> manifest_json_of(const Manifest& m) { return manifest_json(m, true); }

}  // namespace tresor::agent
