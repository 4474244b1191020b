// The agent's guest mode (agent/guest.cc).
#pragma once

#include <string>

#include "tresor/error.h"
#include "tresor/manifest.h"

namespace tresor::agent {

/// Runs the job the host sends over the control channel on `fd`, with the job's shares under
/// `root` (/ in a VM). Returns the agent's exit code; the job's own status went to the host.
int run_guest(int fd, const std::string& root);

inline Result<std::string> manifest_json_of(const Manifest& m) { return manifest_json(m, true); }

}  // namespace tresor::agent
