// tresor prep: CT volumes in, preprocessed volumes, training patches and previews out (issue 8,
// docs/preprocessing.md §7, docs/cli.md §21). Each input is a case:
//   - a NIfTI file (.nii, .nii.gz), or one sealed (…​.sealed, opened into memory only);
//   - a directory holding ccta.nii or image.nii (any of the forms above) and perhaps labels.nii,
//     or a DICOM series (in dicom/ or in the directory itself; slices may be sealed one by one,
//     slice-0001.dcm.sealed, and are then opened in memory);
//   - any other directory: a collection, each entry of which is a case.
// For each case OUT/<case>/ gets image.nii (isotropic, z-scored), vesselness.nii, labels.nii,
// preview.png, patches/ and prep.json; with -r every file is sealed to the recipients instead
// (name.sealed), so nothing is written in the clear. On a GPU (or its emulation) a case of sealed,
// uncompressed NIfTI files goes through the secure channel (gpu::ct::prepare_sealed): opened,
// decoded and prepared in device memory, its outputs sealed there with -r.
#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <optional>
#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include "cli.h"
#include "options.h"
#include "tresor/ct/augment.h"
#include "tresor/ct/prep.h"
#include "tresor/ct/preview.h"
#include "tresor/gpu/channel.h"
#include "tresor/gpu/ct.h"
#include "tresor/sealed.h"

namespace tresor::cli {

namespace {

namespace fs = std::filesystem;

struct Case {
  std::string name;
  std::string image;   // a NIfTI file (maybe sealed) or a DICOM directory
  bool dicom = false;
  std::string labels;  // empty: none
};

bool is_nifti_name(const std::string& n) {
  for (const char* ext : {".nii", ".nii.gz", ".nii.sealed", ".nii.gz.sealed"}) {
    const std::string e(ext);
    if (n.size() > e.size() && n.compare(n.size() - e.size(), e.size(), e) == 0) return true;
  }
  return false;
}
std::string stem(std::string n) {
  for (const char* ext : {".sealed", ".gz", ".nii"}) {
    const std::string e(ext);
    if (n.size() > e.size() && n.compare(n.size() - e.size(), e.size(), e) == 0) n.resize(n.size() - e.size());
  }
  return n;
}
std::optional<std::string> first_existing(const fs::path& dir, const char* base) {
  for (const char* ext : {".nii", ".nii.gz", ".nii.sealed", ".nii.gz.sealed"}) {
    const fs::path p = dir / (std::string(base) + ext);
    std::error_code ec;
    if (fs::is_regular_file(p, ec)) return p.string();
  }
  return std::nullopt;
}
bool holds_dicom(const fs::path& dir) {
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string name = e.path().filename().string();
    if (e.is_regular_file() && (e.path().extension() == ".dcm" || name.ends_with(".dcm.sealed"))) return true;
  }
  return false;
}

// The cases an input names, in a stable order (sorted directory entries).
Result<void> collect(const fs::path& in, std::vector<Case>& out, int depth = 0) {
  std::error_code ec;
  if (fs::is_regular_file(in, ec)) {
    if (!is_nifti_name(in.filename().string())) {
      return fail(ErrorCode::kInvalidArgument, in.string() + ": not a NIfTI file (.nii, .nii.gz, optionally .sealed) or a case directory");
    }
    out.push_back({stem(in.filename().string()), in.string(), false, {}});
    return {};
  }
  if (!fs::is_directory(in, ec)) return fail(ErrorCode::kIo, in.string() + ": no such file or directory");
  const std::string name = fs::absolute(in).lexically_normal().filename().string().empty() ? fs::absolute(in).lexically_normal().parent_path().filename().string()
                                                                                            : fs::absolute(in).lexically_normal().filename().string();
  const auto labels = first_existing(in, "labels");
  if (auto img = first_existing(in, "ccta") ? first_existing(in, "ccta") : first_existing(in, "image")) {
    out.push_back({name, *img, false, labels.value_or("")});
    return {};
  }
  if (fs::is_directory(in / "dicom", ec) && holds_dicom(in / "dicom")) {
    out.push_back({name, (in / "dicom").string(), true, labels.value_or("")});
    return {};
  }
  if (holds_dicom(in)) {
    out.push_back({name, in.string(), true, labels.value_or("")});
    return {};
  }
  if (depth > 0) return {};  // a subdirectory that is not a case: ignored inside a collection
  std::vector<fs::path> entries;
  for (const auto& e : fs::directory_iterator(in, ec)) entries.push_back(e.path());
  if (ec) return fail(ErrorCode::kIo, in.string() + ": " + ec.message());
  std::sort(entries.begin(), entries.end());
  const size_t before = out.size();
  for (const auto& e : entries) {
    if (fs::is_directory(e, ec) || is_nifti_name(e.filename().string())) TRESOR_TRY(collect(e, out, depth + 1));
  }
  if (out.size() == before) return fail(ErrorCode::kInvalidArgument, in.string() + ": holds no case (no ccta.nii, image.nii, DICOM series or NIfTI files)");
  return {};
}

struct Context {
  sealed::KeyRing ring;
  sealed::SealOptions seal;  // recipients empty: write in the clear
  unsigned threads = 0;
};

template <typename V>
Result<void> emit_nifti(const fs::path& path, const V& v, const Context& c) {
  auto b = ct::nifti_bytes(v);
  if (!b) return std::unexpected(b.error());
  auto r = write_output(path.string(), *b, c.seal);
  if (!r) return std::unexpected(r.error());
  return {};
}

// The comma-separated numbers of an option ("0.5,1,1.5").
Result<std::vector<double>> numbers(const std::string& text, const char* what) {
  std::vector<double> out;
  size_t at = 0;
  while (at <= text.size()) {
    const size_t comma = std::min(text.find(',', at), text.size());
    const std::string part = text.substr(at, comma - at);
    try {
      size_t used = 0;
      out.push_back(std::stod(part, &used));
      if (used != part.size()) throw std::invalid_argument(part);
    } catch (const std::exception&) {
      return fail(ErrorCode::kInvalidArgument, std::string(what) + " wants numbers separated by commas, not '" + text + "'");
    }
    at = comma + 1;
  }
  return out;
}

enum class Device { kCpu, kGpu, kEmulated };

struct Job {
  ct::PrepOptions prep;
  Device device = Device::kCpu;
  int gpu = 0;
  std::unique_ptr<gpu::ChannelDevice> channel;  // the GPU (or its emulation) behind the secure channel
  std::string no_channel;                       // why a GPU run has no channel (then every case is read on the host)
  size_t patches = 0;
  ct::AugmentOptions augment;
  uint64_t seed = 1;
  bool preview = true;
};

// Why a case on a GPU device cannot take the secure channel (its files would be opened on the host
// and copied in), or nothing when it can: sealed, uncompressed NIfTI files only.
std::optional<std::string> no_channel_because(const Case& k) {
  if (k.dicom) return "a DICOM series is read on the host";
  for (const auto& f : {k.image, k.labels}) {
    if (f.empty()) continue;
    if (f.ends_with(".nii.gz.sealed")) return fs::path(f).filename().string() + " is compressed";
    if (!f.ends_with(".nii.sealed")) return fs::path(f).filename().string() + " is not sealed";
  }
  return std::nullopt;
}

// One case: read, prepare, write. Returns the summary for prep.json and the console.
Result<nlohmann::json> run_case(const Case& k, const fs::path& out_dir, const Job& job, const Context& c) {
  const double t0 = now_seconds();
  std::error_code ec;
  gpu::ct::PrepTimings timings;
  std::optional<ct::Prepared> p;
  ct::NiftiVoxels input;  // the input's geometry
  nlohmann::json transfer;
  auto no_channel = job.channel ? no_channel_because(k) : job.no_channel.empty() ? std::nullopt : std::optional<std::string>(job.no_channel);
  double t_read = 0, t_prep = 0;
  bool via_channel = false;
  if (job.channel && !no_channel) {
    // Sealed files into device memory through the secure channel: no plaintext on the way in; the
    // outputs sealed on the device when they are to be sealed; host copies only for what needs them.
    fs::create_directories(out_dir, ec);
    if (ec) return fail(ErrorCode::kIo, "cannot create " + out_dir.string() + ": " + ec.message());
    gpu::ct::SealedPrepOutputs out;
    if (!c.seal.recipients.empty()) {
      out.dir = out_dir.string();
      out.seal = c.seal;
    }
    out.to_host = c.seal.recipients.empty() || job.preview || job.patches > 0 || !k.labels.empty();
    auto r = gpu::ct::prepare_sealed(*job.channel, {k.image, k.labels}, c.ring, job.prep, out);
    if (!r && r.error().message.find(tresor::ct::kNiftiCompressed) != std::string::npos) {
      // A .nii.gz sealed under a .nii name: only the host can inflate it (nothing was written).
      no_channel = "a file is gzip-compressed inside its seal";
    } else if (!r) {
      return fail(r.error().code, k.name + ": " + r.error().message);
    } else {
      via_channel = true;
      t_read = t0;  // reading is part of the device's work
      t_prep = now_seconds();
      p = std::move(r->prepared);
      input = r->input;
      timings = r->timings;
      transfer = {{"input", "secure channel: sealed frames into device memory, decrypted there"},
                  {"outputs", out.dir.empty() ? "host" : "sealed on the device"},
                  {"host_copies", out.to_host},
                  {"staged_bytes", r->staged_bytes}};
    }
  }
  if (!via_channel) {
    Result<ct::HuVolume> hu = k.dicom ? ct::read_dicom_series(k.image, &c.ring)
                                      : with_input<ct::HuVolume>(k.image, c.ring, c.threads, [](ByteSpan b, const std::string& n) { return ct::read_nifti_hu(b, n); });
    if (!hu) return std::unexpected(hu.error());
    std::optional<ct::LabelVolume> labels;
    if (!k.labels.empty()) {
      auto l = with_input<ct::LabelVolume>(k.labels, c.ring, c.threads, [](ByteSpan b, const std::string& n) { return ct::read_nifti_labels(b, n); });
      if (!l) return std::unexpected(l.error());
      labels = std::move(*l);
    }
    t_read = now_seconds();
    const ct::LabelVolume* lp = labels ? &*labels : nullptr;
    auto q = job.device == Device::kGpu        ? gpu::ct::prepare(*hu, lp, job.prep, &timings, job.gpu)
             : job.device == Device::kEmulated ? gpu::ct::prepare_emulated(*hu, lp, job.prep)
                                               : ct::prepare(*hu, lp, job.prep);
    if (!q) return fail(q.error().code, k.name + ": " + q.error().message);
    t_prep = now_seconds();
    p = std::move(*q);
    input.dims = hu->dims;
    input.spacing = hu->spacing;
    input.origin = hu->origin;
    transfer = {{"input", job.device == Device::kCpu ? "host" : "opened on the host, copied to the device"}, {"outputs", "host"}};
    if (no_channel) transfer["why_not_the_secure_channel"] = *no_channel;
  }

  fs::create_directories(out_dir, ec);
  if (ec) return fail(ErrorCode::kIo, "cannot create " + out_dir.string() + ": " + ec.message());
  if (transfer["outputs"] == "host") {
    TRESOR_TRY(emit_nifti(out_dir / "image.nii", p->image, c));
    TRESOR_TRY(emit_nifti(out_dir / "vesselness.nii", p->vesselness, c));
    if (p->labels) TRESOR_TRY(emit_nifti(out_dir / "labels.nii", *p->labels, c));
  }
  if (job.preview) {
    // Vesselness scaled to half its maximum, so that thin vessels show too.
    const float vmax = *std::max_element(p->vesselness.data.begin(), p->vesselness.data.end());
    std::vector<ct::PreviewPanel> panels = {{&p->image, -1.0, 3.0, nullptr}, {&p->vesselness, 0.0, std::max(0.5 * vmax, 1e-6), nullptr}};
    if (p->labels) panels.push_back({nullptr, 0, 1, &*p->labels});
    auto png = ct::mip_png(panels, 2);
    if (!png) return std::unexpected(png.error());
    auto r = write_output((out_dir / "preview.png").string(), *png, c.seal);
    if (!r) return std::unexpected(r.error());
  }
  nlohmann::json j = {{"case", k.name},
                      {"source", k.image},
                      {"labels_source", k.labels},
                      {"input", {{"dims", input.dims}, {"spacing_mm", input.spacing}, {"origin_mm", input.origin}}},
                      {"output", {{"dims", p->image.dims}, {"spacing_mm", p->image.spacing}}},
                      {"normalisation", {{"foreground_hu_above", job.prep.foreground_hu}, {"clip_lower", p->stats.lower}, {"clip_upper", p->stats.upper},
                                         {"mean", p->stats.mean}, {"sd", p->stats.sd}}},
                      {"vesselness", {{"window_hu", {job.prep.window_lower, job.prep.window_upper}}, {"sigmas_mm", job.prep.frangi_sigmas_mm},
                                      {"alpha", job.prep.frangi_alpha}, {"beta", job.prep.frangi_beta}, {"gamma", job.prep.frangi_gamma}}},
                      {"device", job.device == Device::kGpu ? "cuda:" + std::to_string(job.gpu) : job.device == Device::kEmulated ? "emulated" : "cpu"},
                      {"transfer", transfer}};
  if (job.device == Device::kGpu) {
    j["gpu_ms"] = {{"upload", timings.upload_ms}, {"statistics", timings.normalise_ms}, {"resample_normalise_window", timings.resample_ms},
                   {"frangi", timings.frangi_ms}, {"total", timings.total_ms}, {"download", timings.download_ms},
                   {"peak_device_bytes", timings.peak_device_bytes}, {"device_used_bytes", timings.device_used_bytes > 0 ? nlohmann::json(timings.device_used_bytes) : nlohmann::json(nullptr)}};
  }
  if (p->labels) {
    auto auc = ct::roc_auc(p->vesselness.data, *p->labels, ct::kCoronary);
    j["coronary_vesselness_roc_auc"] = auc ? nlohmann::json(*auc) : nlohmann::json(nullptr);
  }
  if (job.patches > 0) {
    if (!p->labels) return fail(ErrorCode::kInvalidArgument, k.name + ": --patches needs labels (labels.nii beside the volume)");
    auto sampler = ct::PatchSampler::create(p->image, *p->labels, job.augment);
    if (!sampler) return fail(sampler.error().code, k.name + ": " + sampler.error().message);
    fs::create_directories(out_dir / "patches", ec);
    if (ec) return fail(ErrorCode::kIo, "cannot create " + (out_dir / "patches").string() + ": " + ec.message());
    nlohmann::json list = nlohmann::json::array();
    for (size_t i = 0; i < job.patches; ++i) {
      const ct::Patch patch = sampler->sample(job.seed, i);
      char base[32];
      std::snprintf(base, sizeof base, "patch-%04zu", i);
      TRESOR_TRY(emit_nifti(out_dir / "patches" / (std::string(base) + "-image.nii"), patch.image, c));
      TRESOR_TRY(emit_nifti(out_dir / "patches" / (std::string(base) + "-labels.nii"), patch.labels, c));
      list.push_back({{"name", base},
                      {"corner", patch.corner},
                      {"flipped", patch.flipped},
                      {"foreground", patch.foreground},
                      {"foreground_missing", patch.no_foreground},
                      {"scale", patch.scale},
                      {"shift", patch.shift},
                      {"noise_sd", patch.noise_sd},
                      {"spatial", patch.spatial},
                      {"rotation_degrees", patch.rotation_degrees},
                      {"scaling", patch.scaling},
                      {"affine", patch.affine},
                      {"contrast", patch.contrast},
                      {"gamma_inverted", patch.gamma_inverted},
                      {"gamma", patch.gamma},
                      {"blur_sigma", patch.blur_sigma},
                      {"lowres_scale", patch.lowres_scale}});
    }
    j["patches"] = {{"seed", job.seed}, {"size", job.augment.patch}, {"list", list}};
  }
  const double t_end = now_seconds();
  j["seconds"] = {{"read", t_read - t0}, {"prepare", t_prep - t_read}, {"write", t_end - t_prep}, {"total", t_end - t0}};
  const std::string text = j.dump(1) + "\n";
  auto r = write_output((out_dir / "prep.json").string(), as_bytes(text), c.seal);
  if (!r) return std::unexpected(r.error());
  return j;
}

// A case's outputs appear together or not at all. run_case writes them into a hidden staging
// directory of this process beside the case's; when every output is written, the staging
// directory takes the case directory's place in one step (renameat2 RENAME_EXCHANGE, or where
// the file system lacks it — NFS, for one — two renames with a moment between them in which the
// case has no directory), and the previous outputs are removed. A case directory that tresor prep
// did not write (it holds files but no prep.json) is refused before any work, so no one's files
// are replaced. Staging directories of processes that no longer exist (a killed run) are removed.
const std::string kStaging = ".tresor-partial-";

Result<void> remove_dead_staging(const fs::path& out, const std::string& name) {
  std::error_code ec;
  const std::string prefix = "." + name + kStaging;
  for (const auto& e : fs::directory_iterator(out, ec)) {
    const std::string f = e.path().filename().string();
    if (!f.starts_with(prefix)) continue;
    const std::string pid_text = f.substr(prefix.size());
    char* endp = nullptr;
    const long pid = std::strtol(pid_text.c_str(), &endp, 10);
    if (pid_text.empty() || *endp != '\0' || pid <= 0) continue;
    if (::kill(static_cast<pid_t>(pid), 0) == 0 || errno != ESRCH) continue;  // alive, or not ours to judge
    std::error_code rm;
    fs::remove_all(e.path(), rm);
    if (rm) return fail(ErrorCode::kIo, "cannot remove " + e.path().string() + " (left by a run that stopped): " + rm.message());
  }
  return {};
}

Result<void> check_replaceable(const fs::path& final_dir) {
  std::error_code ec;
  const auto st = fs::symlink_status(final_dir, ec);
  if (ec || st.type() == fs::file_type::not_found) return {};
  if (st.type() != fs::file_type::directory) return fail(ErrorCode::kIo, final_dir.string() + " exists and is not a directory");
  if (fs::is_empty(final_dir, ec) || fs::exists(final_dir / "prep.json", ec) || fs::exists(final_dir / "prep.json.sealed", ec)) return {};
  return fail(ErrorCode::kIo, final_dir.string() + " holds files but no prep.json (tresor prep did not write it); remove it or choose another output directory");
}

Result<void> put_in_place(const fs::path& staging, const fs::path& final_dir) {
  std::error_code ec;
  if (!fs::exists(fs::symlink_status(final_dir, ec))) {
    fs::rename(staging, final_dir, ec);
    if (!ec) return {};
  }
  if (::renameat2(AT_FDCWD, staging.c_str(), AT_FDCWD, final_dir.c_str(), RENAME_EXCHANGE) == 0) {
    fs::remove_all(staging, ec);  // now the previous outputs
    if (ec) return fail(ErrorCode::kIo, "cannot remove the previous outputs in " + staging.string() + ": " + ec.message());
    return {};
  }
  if (errno != EINVAL && errno != ENOSYS && errno != ENOTSUP) {
    return fail(ErrorCode::kIo, "cannot put " + staging.string() + " in place of " + final_dir.string() + ": " + std::strerror(errno));
  }
  const fs::path old = staging.string() + "-previous";
  fs::rename(final_dir, old, ec);
  if (ec) return fail(ErrorCode::kIo, "cannot move " + final_dir.string() + " aside: " + ec.message());
  fs::rename(staging, final_dir, ec);
  if (ec) {
    std::error_code back;
    fs::rename(old, final_dir, back);
    return fail(ErrorCode::kIo, "cannot rename " + staging.string() + " to " + final_dir.string() + ": " + ec.message());
  }
  fs::remove_all(old, ec);
  if (ec) return fail(ErrorCode::kIo, "cannot remove the previous outputs in " + old.string() + ": " + ec.message());
  return {};
}

Result<nlohmann::json> run_case_whole(const Case& k, const fs::path& out, const Job& job, const Context& c) {
  const fs::path final_dir = out / k.name, staging = out / ("." + k.name + kStaging + std::to_string(::getpid()));
  TRESOR_TRY(check_replaceable(final_dir));
  std::error_code ec;
  fs::create_directories(out, ec);
  if (ec) return fail(ErrorCode::kIo, "cannot create " + out.string() + ": " + ec.message());
  TRESOR_TRY(remove_dead_staging(out, k.name));
  fs::remove_all(staging, ec);
  auto r = run_case(k, staging, job, c);
  if (r) {
    if (auto m = put_in_place(staging, final_dir); !m) r = std::unexpected(m.error());
  }
  fs::remove_all(staging, ec);
  return r;
}

}  // namespace

int cmd_prep(int argc, char** argv) {
  po::options_description opts("Options");
  std::vector<std::string> inputs, identities, key_files, datasets, recipients, file_key_files;
  std::string out, sigmas_text = "0.5,1,1.5", patch_text = "96x96x96", device = "auto";
  Job job;
  unsigned threads = 0;
  opts.add_options()
      ("out,o", po::value(&out)->required(), "output directory: one subdirectory per case")
      ("spacing", po::value(&job.prep.spacing)->default_value(0.5), "isotropic output voxel, mm")
      ("foreground-hu", po::value(&job.prep.foreground_hu)->default_value(-500), "the z-score statistics use voxels above this HU")
      ("window-lower", po::value(&job.prep.window_lower)->default_value(-100), "vesselness window, HU")
      ("window-upper", po::value(&job.prep.window_upper)->default_value(600), "vesselness window, HU")
      ("sigmas", po::value(&sigmas_text)->default_value("0.5,1,1.5"), "Frangi scales, mm, comma-separated")
      ("alpha", po::value(&job.prep.frangi_alpha)->default_value(0.5), "Frangi α (plate vs line)")
      ("beta", po::value(&job.prep.frangi_beta)->default_value(0.5), "Frangi β (blob vs line)")
      ("gamma", po::value(&job.prep.frangi_gamma)->default_value(0.5), "Frangi γ (structure), on the [0, 1] window")
      ("patches", po::value(&job.patches)->default_value(0), "training patches per case (needs labels)")
      ("patch-size", po::value(&patch_text)->default_value("96x96x96"), "patch size in voxels, XxYxZ")
      ("seed", po::value(&job.seed)->default_value(1), "the patches' seed (same seed, same patches)")
      ("no-preview", "do not write preview.png")
      ("identity,i", po::value(&identities)->composing(), "identity file for sealed inputs; repeatable")
      ("dataset-key-file", po::value(&key_files)->composing(), "dataset key file for sealed inputs; repeatable")
      ("dataset", po::value(&datasets)->composing(), "dataset ID of the matching --dataset-key-file")
      ("file-keys", po::value(&file_key_files)->composing(), "file keys for sealed inputs (inside a job: $TRESOR_FILE_KEYS); repeatable")
      ("recipient,r", po::value(&recipients)->composing(), "seal every output to this recipient (or @FILE); repeatable")
      ("device", po::value(&device)->default_value("auto"),
       "auto (cuda:0 where usable, else cpu), cpu (the CPU reference), cuda:N, or emulated (the CUDA kernels' code on the CPU; slow, for checking)")
      ("threads,j", po::value(&threads)->default_value(0), "CPU threads (0 = all cores)")
      ("input", po::value(&inputs)->composing(), "case file or directory, or a directory of cases");
  po::positional_options_description pos;
  pos.add("input", -1);
  po::variables_map vm;
  if (auto stop = parse_options("prep", "-o OUT [options] INPUT...", argc, argv, opts, pos, vm)) return *stop;
  if (inputs.empty()) return usage_error("prep", "name at least one input (a NIfTI file, a case directory or a directory of cases)");
  if (device == "cpu") {
    job.device = Device::kCpu;
  } else if (device == "emulated") {
    job.device = Device::kEmulated;
  } else if (device == "auto") {
    auto ok = gpu::ct::available(0);
    job.device = ok && *ok ? Device::kGpu : Device::kCpu;
  } else if (device.starts_with("cuda:") && device.size() > 5 && device.find_first_not_of("0123456789", 5) == std::string::npos && device.size() < 9) {
    job.device = Device::kGpu;
    job.gpu = std::stoi(device.substr(5));
    auto ok = gpu::ct::available(job.gpu);
    if (!ok) return report(ok.error());
    if (!*ok) return report(Error{ErrorCode::kUnavailable, "--device " + device + ": no such CUDA device, or one older than compute capability 8.0"});
  } else {
    return usage_error("prep", "--device must be auto, cpu, cuda:N or emulated, not '" + device + "'");
  }
  if (job.device == Device::kGpu) {
    auto ch = gpu::cuda_device(job.gpu);
    if (ch) {
      job.channel = std::move(*ch);
    } else {
      // The pipeline can still run on the GPU from host memory; each prep.json says why not.
      job.no_channel = "the secure channel could not start on cuda:" + std::to_string(job.gpu) + ": " + ch.error().message;
      std::fprintf(stderr, "tresor: prep: %s; cases are read on the host\n", job.no_channel.c_str());
    }
  } else if (job.device == Device::kEmulated) {
    job.channel = gpu::emulated_device();
  }
  auto sig = numbers(sigmas_text, "--sigmas");
  if (!sig) return usage_error("prep", sig.error().message);
  job.prep.frangi_sigmas_mm = *sig;
  job.prep.threads = threads;
  job.preview = vm.count("no-preview") == 0;
  {
    std::array<size_t, 3> ps{};
    char extra = 0;
    unsigned long a = 0, b = 0, cc = 0;
    if (std::sscanf(patch_text.c_str(), "%lux%lux%lu%c", &a, &b, &cc, &extra) != 3) {
      return usage_error("prep", "--patch-size wants three numbers joined by 'x' (e.g. 96x96x96), not '" + patch_text + "'");
    }
    ps = {a, b, cc};
    job.augment.patch = ps;
  }
  Context c;
  c.threads = threads;
  std::vector<Identity> ids;
  for (const auto& path : identities) {
    auto id = load_identity(path);
    if (!id) return report(id.error());
    ids.push_back(std::move(*id));
  }
  auto dkeys = load_dataset_keys(key_files, datasets, /*ids_required=*/false);
  if (!dkeys) return report(dkeys.error());
  for (const auto& id : ids) c.ring.identities.push_back(&id);
  for (const auto& k : *dkeys) c.ring.dataset_keys.push_back(&k);
  auto fkeys = load_file_keys(file_key_files);
  if (!fkeys) return report(fkeys.error());
  for (const auto& k : *fkeys) c.ring.file_keys.push_back(&k);
  if (!recipients.empty()) {
    auto r = parse_recipients(recipients);
    if (!r) return report(r.error());
    c.seal.recipients = std::move(*r);
    c.seal.threads = threads;
  }

  std::vector<Case> cases;
  for (const auto& in : inputs) {
    if (auto r = collect(in, cases); !r) return report(r.error());
  }
  std::sort(cases.begin(), cases.end(), [](const Case& a, const Case& b) { return a.name < b.name; });
  for (size_t i = 1; i < cases.size(); ++i) {
    if (cases[i].name == cases[i - 1].name) return report(Error{ErrorCode::kInvalidArgument, "two inputs are both case '" + cases[i].name + "': " + cases[i - 1].image + " and " + cases[i].image});
  }
  const bool tty = ::isatty(2) != 0;
  const double start = now_seconds();
  size_t failed = 0;
  int first_code = kExitOk;
  for (size_t i = 0; i < cases.size(); ++i) {
    const Case& k = cases[i];
    if (tty) std::fprintf(stderr, "\rprep: %zu/%zu %s …\x1b[K", i + 1, cases.size(), k.name.c_str());
    auto r = run_case_whole(k, fs::path(out), job, c);
    const double elapsed = now_seconds() - start;
    if (tty) std::fprintf(stderr, "\r\x1b[K");
    if (!r) {
      ++failed;
      const int code = report(Error{r.error().code, "case " + k.name + ": " + r.error().message});
      if (first_code == kExitOk) first_code = code;
      continue;
    }
    const auto& d = (*r)["output"]["dims"];
    std::printf("prep: %zu/%zu %s: %zux%zux%zu at %.3g mm, %.2f s%s (%.2f volumes/s)\n", i + 1, cases.size(), k.name.c_str(), d[0].get<size_t>(),
                d[1].get<size_t>(), d[2].get<size_t>(), job.prep.spacing, (*r)["seconds"]["total"].get<double>(),
                r->contains("coronary_vesselness_roc_auc") && (*r)["coronary_vesselness_roc_auc"].is_number()
                    ? (", vesselness AUC " + std::to_string((*r)["coronary_vesselness_roc_auc"].get<double>()).substr(0, 6)).c_str()
                    : "",
                static_cast<double>(i + 1 - failed) / elapsed);
    std::fflush(stdout);
  }
  if (failed > 0) {
    std::fprintf(stderr, "tresor: prep: %zu of %zu cases failed; the others are complete in %s\n", failed, cases.size(), out.c_str());
    return first_code;
  }
  std::printf("prep: %zu cases in %.1f s on %s -> %s%s\n", cases.size(), now_seconds() - start,
              job.device == Device::kGpu ? ("cuda:" + std::to_string(job.gpu)).c_str() : job.device == Device::kEmulated ? "the emulated GPU" : "the CPU", out.c_str(),
              c.seal.recipients.empty() ? "" : " (sealed)");
  return kExitOk;
}

}  // namespace tresor::cli
