// tresor/slurm/job.h — what the SPANK plugin (spank/) decides, as pure functions it calls: the
// administrator's plugstack.conf arguments, the user's --tresor-* options, the image catalogue,
// and the signed job manifest built from them at submission (issue 5; docs/admin-guide.md,
// docs/user-guide.md). Nothing here touches Slurm, the network or the clock: the plugin passes
// the time, the files' contents and the user's identity in.
//
// Every error message says what is wrong and how to fix it, because the plugin shows it to the
// user at sbatch/srun time, before anything is queued.
#pragma once

#include <array>
#include <cstdint>
#include <ctime>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "tresor/crypto.h"
#include "tresor/encoding.h"
#include "tresor/error.h"
#include "tresor/identity.h"
#include "tresor/manifest.h"

namespace tresor::slurm {

/// The environment variable that carries the signed manifest (base64url of its canonical JSON)
/// from the submit side to the remote side, and the one that marks a process as already inside
/// a confidential job (an srun there is not wrapped again).
inline constexpr std::string_view kManifestEnv = "TRESOR_MANIFEST";
inline constexpr std::string_view kInsideEnv = "TRESOR_INSIDE_JOB";

/// plugstack.conf: `required /usr/lib/.../spank_tresor.so runner=PATH broker=URL ca=PATH
/// backends=local,libvirt images=PATH datasets=DIR agent=PATH sim=DIR gpus=FILE
/// hypervisor=URI accel=kvm|tcg snp=yes|no boot_timeout=S step_bridge=NAME`. Unknown or repeated
/// keys are errors.
struct PluginConfig {
  std::string runner = "/usr/local/bin/tresor-run";
  std::string agent = "/usr/local/libexec/tresor/tresor-agent";
  std::string datasets;    // where sealed dataset files live: DIR/<dataset id>/*.sealed
  std::string sim;         // the host-side sim secure processor (local backend): NOT confidential
  std::string gpus;        // the node's GPU table (parse_gpu_table): Slurm GPU index -> PCI address
  std::string broker_url;  // https://HOST:PORT
  std::string broker_ca;   // PEM file
  std::vector<std::string> backends{"local"};  // allowed; the first is the default
  std::string images;      // image catalogue file (JSON), "" for none
  // The libvirt backend: where VMs start, how they run, and whether they are SEV-SNP guests
  // (snp=no: plain QEMU guests for development and CI, NOT confidential).
  std::string hypervisor = "qemu:///system";
  std::string accel = "kvm";
  bool snp = true;
  // How long a VM may take from its start to its agent's first message before the runner gives
  // up on it (the guest hangs in firmware or the kernel): seconds, boot_timeout=.
  unsigned boot_timeout_s = 300;
  // The node's step network (docs/scale.md §2.2): a host bridge on which the VMs of a step's
  // ranks meet (TRESOR_STEP_ROSTER=1); "": none, and such a step is refused on this node.
  std::string step_bridge;
};
[[nodiscard]] Result<PluginConfig> parse_plugin_args(const std::vector<std::string>& args);

/// The image catalogue an administrator publishes: {"images": {"NAME": {"measurement": "<96
/// hex>", "description": "…", "kernel": "/abs", "initrd": "/abs", "cmdline": "…", "firmware":
/// "/abs", "vcpus": N}}, "default": "NAME"}. The measurement is what data owners approve; the boot files are
/// what the libvirt backend boots (the local backend needs none of them).
struct Image {
  std::string name;
  std::array<std::byte, 48> measurement{};
  std::string description;
  std::string kernel, initrd, cmdline, firmware;  // firmware: the AmdSev OVMF (SNP), optional otherwise
  unsigned vcpus = 0;  // the vCPU count the SNP measurement is for (0: not fixed; a plain VM takes the allocation's)
};
struct ImageCatalogue {
  std::map<std::string, Image> images;
  std::string default_image;  // "" when the catalogue names none
};
[[nodiscard]] Result<ImageCatalogue> parse_image_catalogue(std::string_view json);

/// The user's --tresor-* options (or TRESOR_* environment), as given.
struct JobOptions {
  std::string datasets;    // --tresor-dataset=ID[,ID...]
  std::string image;       // --tresor-image=NAME
  std::string output;      // --tresor-output=DIR
  std::vector<std::string> recipients;  // --tresor-recipient=RECIPIENT|@FILE (already read)
  std::string backend;     // --tresor-backend=local|libvirt
  bool any() const { return !datasets.empty() || !image.empty() || !output.empty() || !recipients.empty() || !backend.empty(); }
};

/// Checked options, ready for the manifest and the runner.
struct JobRequest {
  std::vector<std::string> datasets;
  Image image;
  std::string output;   // absolute path
  std::vector<Recipient> recipients;  // empty: the submitting user's own key
  std::string backend;
};

/// Validates the options against the configuration and catalogue. Errors name the option and
/// say how to fix it ("--tresor-dataset: 'a//b' … ; dataset ids look like dhz/ccta-2024").
[[nodiscard]] Result<JobRequest> check_options(const JobOptions& options, const PluginConfig& config, const ImageCatalogue& images,
                                               const std::string& cwd);

/// Parses "--tresor-recipient" values: recipient strings, and the text of @FILE arguments the
/// caller read (one recipient per line, '#' comments).
[[nodiscard]] Result<std::vector<Recipient>> parse_recipient_values(const std::vector<std::string>& values);

/// Builds and signs the job manifest: a fresh job id ("t-" and 16 hex digits: Slurm assigns its
/// own id only after submission, so the manifest carries Tresor's; the runner records both), the
/// user, datasets, image measurement, SHA-256 of the job script, recipients (the user when none
/// given), expiry `lifetime` seconds from `now`.
[[nodiscard]] Result<Manifest> build_manifest(const JobRequest& request, const Identity& user, ByteSpan script, std::time_t now,
                                              std::time_t lifetime, crypto::RandomSource& rng = crypto::system_random());

/// In the argv of sbatch or srun, the index of the first operand: the batch script (sbatch) or
/// the command (srun). Options come first; short options that take a value (-o FILE) and long
/// options written without '=' (--output FILE) consume the next word, except the long options
/// Slurm defines without a value (--wait, --exclusive, …). std::nullopt: no operand (sbatch
/// reads its script from stdin, which the plugin cannot see: the user must name a file).
/// `batch`: sbatch's options (where -W is --wait), else srun's (where -W and -r take a value).
[[nodiscard]] std::optional<size_t> find_operand(const std::vector<std::string>& argv, bool batch);

/// The node's GPU table (plugstack.conf gpus=FILE): one line per GPU, "INDEX PCI-ADDRESS" with
/// Slurm's GPU index and the device's PCI address ("0 0000:41:00.0"); '#' comments. The VM backend
/// passes the job's GPUs through by these addresses (VFIO).
[[nodiscard]] Result<std::map<unsigned, std::string>> parse_gpu_table(std::string_view text);
/// The PCI addresses of the job's GPUs: Slurm's SLURM_JOB_GPUS ("0,2"), else CUDA_VISIBLE_DEVICES,
/// looked up in the table. An index the table does not know is an error naming it; no GPUs: empty.
[[nodiscard]] Result<std::vector<std::string>> job_gpus(std::string_view slurm_job_gpus, std::string_view cuda_visible_devices,
                                                        const std::map<unsigned, std::string>& table);

/// What the manifest's script digest covers for a step's command line (srun, salloc): its
/// arguments, each followed by a NUL byte. For sbatch it covers the batch script file itself.
Bytes command_line_bytes(const std::vector<std::string>& args);

/// Whether `command` (the argv the job will run) is what `manifest` was signed for: the batch
/// script's contents (command[0] a readable file) or the command line. kAuth names both digests.
[[nodiscard]] Result<void> check_command(const Manifest& manifest, const std::vector<std::string>& command);

/// The TaskProlog of a slurm.conf (its text): the value of the TaskProlog key (case-insensitive,
/// as Slurm reads keys; '#' starts a comment), or "" when there is none.
std::string task_prolog_from_slurm_conf(std::string_view slurm_conf);

/// Applies a TaskProlog's standard output to a task's environment as slurmstepd does
/// (slurm.conf(5), TaskProlog): "export NAME=value" sets, "unset NAME" removes, "print TEXT" is
/// written to the task's standard output (returned, one line each); other lines are ignored.
std::string apply_task_prolog_output(std::string_view output, std::map<std::string, std::string>& env);

/// The value of TRESOR_MANIFEST for a signed manifest, and back.
[[nodiscard]] Result<std::string> encode_manifest_env(const Manifest& m);
[[nodiscard]] Result<Manifest> decode_manifest_env(std::string_view value);

}  // namespace tresor::slurm
