// tresor/agent/agent.h — what runs inside the sandbox or VM (issue 5, item 3): attest to the key
// broker with the job's manifest, receive the dataset keys, open the job's sealed inputs into
// private memory, run the user's command, seal everything it wrote to the manifest's recipients
// into the shared job directory, and report the job's status. Plaintext is only ever written
// under `private_dir` (the sandbox's tmpfs, the VM's RAM), never to the shared directories.
#pragma once

#include <sys/types.h>

#include <functional>
#include <ostream>
#include <string>
#include <vector>

#include "tresor/agent/evidence.h"
#include "tresor/error.h"
#include "tresor/manifest.h"

namespace tresor::agent {

struct Options {
  std::string broker_url;   // https://HOST:PORT
  std::string broker_ca;    // PEM
  std::string data_root;    // read-only share: <data_root>/<dataset id>/<name>.sealed
  std::string output_dir;   // shared job directory: only sealed files are written there
  std::string private_dir;  // guest-private: data/<dataset id>/<name> and out/
  std::vector<std::string> command;
  /// The job reads its sealed inputs itself (`TRESOR_INPUTS=sealed` in the job's environment;
  /// docs/user-guide.md): the inputs are not opened; instead each file's own file key goes into
  /// <private_dir>/file-keys (sealed::FileKeys), so that the job can open exactly those files —
  /// with the GPU secure channel, straight into device memory. The job gets TRESOR_SEALED_DATA
  /// (data_root) and TRESOR_FILE_KEYS.
  bool sealed_inputs = false;
};

/// TRESOR_INPUTS's value: "opened" (or unset) or "sealed"; anything else is refused by name.
[[nodiscard]] Result<bool> sealed_inputs_from(const char* value);

/// Everything before the user's command runs: attest, fetch keys, open inputs. On success the
/// inputs are in <private_dir>/data (with sealed_inputs: their file keys in <private_dir>/file-keys
/// and data/ empty), and <private_dir>/out exists (empty). Errors say which dataset or file and
/// what to do; nothing is left under private_dir's data/ (or file-keys) on failure.
[[nodiscard]] Result<void> prepare(const Options& options, const Manifest& manifest, std::string_view manifest_json,
                                   EvidenceProvider& evidence, std::ostream& log);

/// After the command: seals every regular file under <private_dir>/out to the manifest's
/// recipients as <output_dir>/<relative path>.sealed. Returns how many files were sealed.
[[nodiscard]] Result<size_t> seal_outputs(const Options& options, const Manifest& manifest, std::ostream& log);

/// The whole job, as the sandbox and the VM run it: prepare() (on failure: a message on `log`,
/// nothing run, exit status 1), the command as a child in its own process group with TRESOR_DATA
/// and TRESOR_OUTPUT_DIR set (its pid handed to `on_start`, for signals), then seal_outputs()
/// whatever the command's fate. With `timing`, one line of phase durations on `log`. Returns the
/// wait status to leave with: the command's, or exit 1 when sealing failed after a success.
/// `cancelled`, when given, is asked just before the command would start: a signal number there
/// (a scancel that came while the VM booted) means the command never runs and the job ends as
/// killed by that signal.
[[nodiscard]] int run_job(const Options& options, const Manifest& manifest, std::string_view manifest_json, EvidenceProvider& evidence,
                          bool timing, std::ostream& log, const std::function<void(pid_t)>& on_start,
                          const std::function<int()>& cancelled = {});

}  // namespace tresor::agent
