// The submit side (sbatch and salloc: allocator context; srun: local context): check the user's
// --tresor-* options before anything is queued, sign the job manifest with the user's identity,
// and hand it to the job through its environment (docs/user-guide.md).
#include <unistd.h>

#include <cstdlib>
#include <ctime>
#include <fstream>
#include <sstream>

#include "plugin.h"
#include "tresor/io.h"

namespace tresor::spank {
namespace {

// A manifest must outlive the job's time in the queue; the broker refuses it after this.
constexpr std::time_t kManifestLifetime = 7 * 24 * 3600;

std::string env_or(const std::string& given, const char* name) {
  if (!given.empty()) return given;
  const char* v = std::getenv(name);
  return v == nullptr ? std::string() : std::string(v);
}

Result<std::string> read_text(const std::string& path, std::string_view what) {
  auto t = read_small_file(path, 16u << 20);
  if (!t) return fail(t.error().code, std::string(what) + ": " + t.error().message);
  return t;
}

std::vector<std::string> own_argv() {
  std::ifstream in("/proc/self/cmdline", std::ios::binary);
  std::vector<std::string> argv;
  std::string arg;
  while (std::getline(in, arg, '\0')) argv.push_back(arg);
  return argv;
}

// What the manifest's script digest covers: sbatch's script file as the user wrote it; for srun
// and salloc, the command line (arguments joined with NUL bytes).
Result<Bytes> job_script() {
  const auto argv = own_argv();
  const bool batch = !argv.empty() && argv[0].ends_with("sbatch");
  const auto operand = tresor::slurm::find_operand(argv, batch);
  if (batch) {
    if (!operand) {
      return fail(ErrorCode::kInvalidArgument,
                  "a confidential batch job needs its script as a file argument (sbatch OPTIONS job.sh), not on stdin or --wrap");
    }
    auto text = read_text(argv[*operand], "the batch script");
    if (!text) return std::unexpected(text.error());
    return Bytes(as_bytes(*text).begin(), as_bytes(*text).end());
  }
  return tresor::slurm::command_line_bytes(
      std::vector<std::string>(argv.begin() + static_cast<std::ptrdiff_t>(operand.value_or(argv.size())), argv.end()));
}

Result<Identity> user_identity() {
  std::string path = env_or("", "TRESOR_IDENTITY");
  if (path.empty()) {
    const char* home = std::getenv("HOME");
    path = std::string(home ? home : "") + "/.config/tresor/identity";
  }
  auto secret = read_secret_file(path);
  if (!secret) {
    return fail(secret.error().code, "no usable Tresor identity at " + path + " (" + secret.error().message +
                                         "); create one with: tresor keygen -o " + path + " (or set TRESOR_IDENTITY)");
  }
  auto id = Identity::parse(std::string_view(reinterpret_cast<const char*>(secret->data()), secret->size()));
  if (!id) return fail(id.error().code, path + ": " + id.error().message);
  return id;
}

Result<std::string> prepare(spank_t sp, spank_context_t ctx) {
  State& s = state();
  auto& o = s.options;
  o.datasets = env_or(o.datasets, "TRESOR_DATASET");
  o.image = env_or(o.image, "TRESOR_IMAGE");
  o.output = env_or(o.output, "TRESOR_OUTPUT");
  o.backend = env_or(o.backend, "TRESOR_BACKEND");
  if (s.recipient_args.empty()) {
    if (auto r = env_or("", "TRESOR_RECIPIENT"); !r.empty()) s.recipient_args.push_back(r);
  }
  o.recipients.clear();
  for (const auto& r : s.recipient_args) {
    if (r.starts_with('@')) {
      auto text = read_text(r.substr(1), "--tresor-recipient " + r);
      if (!text) return std::unexpected(text.error());
      o.recipients.push_back(*text);
    } else {
      o.recipients.push_back(r);
    }
  }
  if (!o.any()) return std::string();  // not a confidential job
  if (std::getenv(std::string(tresor::slurm::kInsideEnv).c_str()) != nullptr) {
    // From inside a confidential job: its own steps (srun) are not wrapped again; a new job
    // (sbatch, salloc) cannot be submitted from there.
    if (ctx == S_CTX_LOCAL) return std::string();
    return fail(ErrorCode::kInvalidArgument, "a confidential job cannot be submitted from inside another confidential job "
                                             "(TRESOR_INSIDE_JOB is set); submit it from a login shell");
  }

  tresor::slurm::ImageCatalogue images;
  if (!s.config.images.empty()) {
    auto text = read_text(s.config.images, "the cluster's image catalogue (plugstack.conf images=)");
    if (!text) return std::unexpected(text.error());
    auto c = tresor::slurm::parse_image_catalogue(*text);
    if (!c) return std::unexpected(c.error());
    images = std::move(*c);
  }
  char cwd[4096];
  if (::getcwd(cwd, sizeof cwd) == nullptr) return fail(ErrorCode::kIo, "cannot read the current directory");
  auto request = tresor::slurm::check_options(o, s.config, images, cwd);
  if (!request) return std::unexpected(request.error());
  auto id = user_identity();
  if (!id) return std::unexpected(id.error());
  auto script = job_script();
  if (!script) return std::unexpected(script.error());
  auto manifest = tresor::slurm::build_manifest(*request, *id, *script, std::time(nullptr), kManifestLifetime);
  if (!manifest) return std::unexpected(manifest.error());
  auto env = tresor::slurm::encode_manifest_env(*manifest);
  if (!env) return std::unexpected(env.error());
  // The job's environment carries the manifest and where its results go (sbatch and srun
  // export the submitting environment; --export=NONE would drop them: docs/user-guide.md).
  // spank_setenv works only remotely; on the submit side the process's own environment is what
  // sbatch and srun send with the job.
  (void)sp;
  // The options travel too, resolved: under salloc, each srun of the allocation is a submission
  // of its own (its own command line, its own signed manifest) with the allocation's options.
  std::string datasets, recipients;
  for (const auto& d : request->datasets) datasets += (datasets.empty() ? "" : ",") + d;
  for (const auto& r : o.recipients) recipients += (recipients.empty() ? "" : "\n") + r;
  if (::setenv(std::string(tresor::slurm::kManifestEnv).c_str(), env->c_str(), 1) != 0 ||
      ::setenv("TRESOR_OUTPUT", request->output.c_str(), 1) != 0 || ::setenv("TRESOR_BACKEND", request->backend.c_str(), 1) != 0 ||
      ::setenv("TRESOR_DATASET", datasets.c_str(), 1) != 0 || ::setenv("TRESOR_IMAGE", request->image.name.c_str(), 1) != 0 ||
      (!recipients.empty() && ::setenv("TRESOR_RECIPIENT", recipients.c_str(), 1) != 0)) {
    return fail(ErrorCode::kIo, "cannot set the job's environment");
  }
  std::string summary = "confidential job " + manifest->job_id + ": datasets";
  for (const auto& d : request->datasets) summary += " " + d;
  summary += ", image " + request->image.name + ", backend " + request->backend;
  if (request->backend == "local") summary += " (local: NO VM, NOT confidential)";
  summary += ", sealed outputs to " + request->output;
  return summary;
}

}  // namespace

int submit(spank_t sp) {
  if (!state().config_ok) return -1;
  auto r = prepare(sp, spank_context());
  if (!r) {
    slurm_error("tresor: %s", r.error().message.c_str());
    return -1;
  }
  if (!r->empty()) slurm_info("tresor: %s", r->c_str());
  return 0;
}

}  // namespace tresor::spank
