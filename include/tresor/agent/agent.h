// tresor/agent/agent.h — what runs inside the sandbox or VM (issue 5, item 3): attest to the key
// broker with the job's manifest, receive the dataset keys, open the job's sealed inputs into
// private memory, run the user's command, seal everything it wrote to the manifest's recipients
// into the shared job directory, and report the job's status. Plaintext is only ever written
// under `private_dir` (the sandbox's tmpfs, the VM's RAM), never to the shared directories.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <functional>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

#include "tresor/agent/evidence.h"
#include "tresor/error.h"
#include "tresor/manifest.h"
#include "tresor/slurm/ranks.h"

namespace tresor::agent {

/// This task's place in a step whose ranks meet across sandboxes or VMs (docs/training.md §5.4,
/// docs/protocol.md §13): the agent draws a link key in private memory, claims the task's rank
/// with it in its attestation, waits for the broker's roster of the step and gives both to the
/// job (TRESOR_ROSTER, TRESOR_LINK_KEY), so that `tresor train` links its ranks over TLS pinned
/// to keys only attested agents of the job hold.
struct StepLink {
  std::string step;  // the claim's step: the manifest's job id, '.', SLURM_STEP_ID
  int size = 0;      // SLURM_NTASKS
  int rank = 0;      // SLURM_PROCID: one task per sandbox or VM
  std::string lead;  // with rank 0: where it will listen (ADDRESS:PORT)
  std::chrono::milliseconds wait{std::chrono::minutes(4)};  // for the other tasks to attest; within the KBS session's five minutes
};

/// From the job's environment: nullopt unless TRESOR_STEP_ROSTER=1, and for a step of one task
/// (it has no one to meet). Rank 0's address is TRESOR_STEP_LEAD; without it, `own_address` and a
/// port free on it now: "127.0.0.1" for the local backend's sandboxes (they share the node's
/// loopback: a step of one node only), a VM's address on its node's step network
/// (step_network_address), or "" (none: TRESOR_STEP_LEAD is needed). TRESOR_STEP_WAIT sets the
/// wait for the roster (1..240 s; default 240). kInvalidArgument names the variable that is
/// wrong: another value of TRESOR_STEP_ROSTER, Slurm's variables malformed, a wait out of range,
/// a step id too long for a claim, more than 1024 tasks, a malformed TRESOR_STEP_LEAD, or none
/// where it is needed.
[[nodiscard]] Result<std::optional<StepLink>> step_link_from(const slurm::GetEnv& getenv, const Manifest& manifest, const std::string& own_address);

/// A job VM's address on its step network: the IPv4 address of its one interface that is up and
/// not loopback (the NIC the runner added on the node's step bridge, addressed by the step
/// network's DHCP in /init), or "" when there is none. kInvalidArgument when there are several:
/// which one the other tasks reach is not for the agent to guess.
[[nodiscard]] Result<std::string> step_network_address();

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
  /// The step's roster (step_link_from): the claim goes into the attestation; the roster and the
  /// link key into <private_dir>/step/ (0600), named to the job by TRESOR_ROSTER and
  /// TRESOR_LINK_KEY, then a fresh attestation with the same claim for the dataset keys (the wait
  /// may have used most of the first session). Without it the job gets neither variable, whatever
  /// the host's environment said. step/ stays in private memory, also when a later step fails: it
  /// goes with the sandbox or VM.
  std::optional<StepLink> step_link;
};

/// TRESOR_INPUTS's value: "opened" (or unset) or "sealed"; anything else is refused by name.
[[nodiscard]] Result<bool> sealed_inputs_from(const char* value);

/// Everything before the user's command runs: attest (with the step link's claim), fetch the
/// step's roster, fetch keys, open inputs. On success the
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
