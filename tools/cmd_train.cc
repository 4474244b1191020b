// tresor train: the 3D U-Net trained on `tresor prep`'s outputs, CPU reference (issue 9,
// docs/training.md §8): a TOML configuration, a progress line, a checkpoint (sealed with -r),
// metrics.json, curves.png (loss and validation Dice) and prediction.png (MIPs of a validation
// patch: image, labels, prediction); --resume continues a run exactly.
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>
#include <set>
#include <thread>

#include <nlohmann/json.hpp>
#include <toml++/toml.h>

#include "cli.h"
#include "options.h"
#include "tresor/ct/preview.h"
// TRESOR_TRAIN_GPU=0 builds the CPU trainer alone (tresor-train, for guest images: no CUDA
// libraries to carry); the tresor CLI has the GPU paths too.
#ifndef TRESOR_TRAIN_GPU
#define TRESOR_TRAIN_GPU 1
#endif
#if TRESOR_TRAIN_GPU
#include "tresor/gpu/channel.h"
#include "tresor/gpu/loader.h"
#include "tresor/gpu/nccl.h"
#include "tresor/gpu/trainer.h"
#endif
#include "tresor/train/inference.h"
#include "tresor/train/trainer.h"

namespace tresor::cli {
namespace {

namespace fs = std::filesystem;

struct TrainConfig {
  train::TrainerOptions options;
  bool full_volume = true;  // the final validation on whole volumes (sliding windows)
  std::vector<std::string> train, validation;
  std::string out;
};

Result<TrainConfig> parse_config(const std::string& path) {
  toml::table t;
  try {
    t = toml::parse_file(path);
  } catch (const toml::parse_error& e) {
    return fail(ErrorCode::kInvalidArgument, path + ": " + std::string(e.description()) + " at line " + std::to_string(e.source().begin.line));
  }
  const std::map<std::string, std::set<std::string>> keys = {
      {"model", {"levels", "base_channels", "max_channels", "deep_supervision"}},
      {"data", {"train", "validation"}},
      {"training", {"steps", "batch", "patch", "optimizer", "lr", "weight_decay", "seed", "validate_every", "validation_patches", "threads", "full_volume_validation"}},
      {"augmentation",
       {"flip_probability", "intensity_probability", "noise_probability", "rotation_probability", "rotation_max_degrees", "scaling_probability",
        "scaling_min", "scaling_max", "contrast_probability", "gamma_probability", "gamma_inverted_probability", "blur_probability",
        "blur_sigma_min", "blur_sigma_max", "lowres_probability", "lowres_scale_min", "lowres_scale_max"}},
      {"output", {"dir"}}};
  for (const auto& [k, v] : t) {
    const std::string key(k.str());
    if (!keys.contains(key) || !v.is_table()) return fail(ErrorCode::kInvalidArgument, path + ": unknown section [" + key + "]");
    for (const auto& [k2, v2] : *v.as_table()) {
      (void)v2;
      if (!keys.at(key).contains(std::string(k2.str()))) return fail(ErrorCode::kInvalidArgument, path + ": unknown key " + key + "." + std::string(k2.str()));
    }
  }
  TrainConfig c;
  auto& o = c.options;
  auto integer = [&](const char* section, const char* key, size_t& into, int64_t lo, int64_t hi) -> Result<void> {
    const auto node = t[section][key];
    if (!node) return {};
    const auto v = node.value<int64_t>();
    if (!v || *v < lo || *v > hi) {
      return fail(ErrorCode::kInvalidArgument, path + ": " + section + "." + key + " must be an integer " + std::to_string(lo) + ".." + std::to_string(hi));
    }
    into = static_cast<size_t>(*v);
    return {};
  };
  auto number = [&](const char* section, const char* key, double& into, double lo, double hi) -> Result<void> {
    const auto node = t[section][key];
    if (!node) return {};
    const auto v = node.value<double>();
    if (!v || !(*v >= lo && *v <= hi)) {
      char range[64];
      std::snprintf(range, sizeof range, "%g..%g", lo, hi);
      return fail(ErrorCode::kInvalidArgument, path + ": " + section + "." + key + " must be a number in " + range);
    }
    into = *v;
    return {};
  };
  TRESOR_TRY(integer("model", "levels", o.model.levels, 1, 6));
  TRESOR_TRY(integer("model", "base_channels", o.model.base_channels, 1, 512));
  TRESOR_TRY(integer("model", "max_channels", o.model.max_channels, 1, 1024));
  TRESOR_TRY(integer("training", "steps", o.steps, 1, 10000000));
  TRESOR_TRY(integer("training", "batch", o.batch, 1, 1024));
  TRESOR_TRY(integer("training", "patch", o.patch, 4, 512));
  TRESOR_TRY(integer("training", "validate_every", o.validate_every, 1, 10000000));
  TRESOR_TRY(integer("training", "validation_patches", o.validation_patches, 1, 4096));
  size_t seed = o.seed, threads = 0;
  TRESOR_TRY(integer("training", "seed", seed, 0, INT64_MAX));
  TRESOR_TRY(integer("training", "threads", threads, 0, 1024));
  o.seed = seed;
  o.threads = static_cast<unsigned>(threads);
  TRESOR_TRY(number("training", "lr", o.lr, 0, 10));
  TRESOR_TRY(number("training", "weight_decay", o.weight_decay, 0, 1));
  auto& a = o.augment;
  for (auto [key, into] : {std::pair{"flip_probability", &a.flip_probability}, {"intensity_probability", &a.intensity_probability},
                           {"noise_probability", &a.noise_probability}, {"rotation_probability", &a.rotation_probability},
                           {"scaling_probability", &a.scaling_probability}, {"contrast_probability", &a.contrast_probability},
                           {"gamma_probability", &a.gamma_probability}, {"gamma_inverted_probability", &a.gamma_inverted_probability},
                           {"blur_probability", &a.blur_probability}, {"lowres_probability", &a.lowres_probability}}) {
    TRESOR_TRY(number("augmentation", key, *into, 0, 1));
  }
  TRESOR_TRY(number("augmentation", "rotation_max_degrees", a.rotation_max_degrees, 0, 180));
  TRESOR_TRY(number("augmentation", "scaling_min", a.scaling_min, 0.1, 10));
  TRESOR_TRY(number("augmentation", "scaling_max", a.scaling_max, 0.1, 10));
  if (a.scaling_min > a.scaling_max) return fail(ErrorCode::kInvalidArgument, path + ": augmentation.scaling_min is above augmentation.scaling_max");
  TRESOR_TRY(number("augmentation", "blur_sigma_min", a.blur_sigma_min, 0.05, 5));
  TRESOR_TRY(number("augmentation", "blur_sigma_max", a.blur_sigma_max, 0.05, 5));
  if (a.blur_sigma_min > a.blur_sigma_max) return fail(ErrorCode::kInvalidArgument, path + ": augmentation.blur_sigma_min is above augmentation.blur_sigma_max");
  TRESOR_TRY(number("augmentation", "lowres_scale_min", a.lowres_scale_min, 0.05, 1));
  TRESOR_TRY(number("augmentation", "lowres_scale_max", a.lowres_scale_max, 0.05, 1));
  if (a.lowres_scale_min > a.lowres_scale_max) {
    return fail(ErrorCode::kInvalidArgument, path + ": augmentation.lowres_scale_min is above augmentation.lowres_scale_max");
  }
  if (const auto opt = t["training"]["optimizer"]) {
    const auto s = opt.value<std::string>();
    if (!s || (*s != "adamw" && *s != "sgd")) return fail(ErrorCode::kInvalidArgument, path + ": training.optimizer must be \"adamw\" or \"sgd\"");
    o.adamw = *s == "adamw";
  }
  if (const auto ds = t["model"]["deep_supervision"]) {
    if (!ds.is_boolean()) return fail(ErrorCode::kInvalidArgument, path + ": model.deep_supervision must be true or false");
    o.model.deep_supervision = *ds.value<bool>();
  }
  if (const auto fv = t["training"]["full_volume_validation"]) {
    if (!fv.is_boolean()) return fail(ErrorCode::kInvalidArgument, path + ": training.full_volume_validation must be true or false");
    c.full_volume = *fv.value<bool>();
  }
  o.model.in_channels = 2;
  o.model.classes = 2;
  for (auto [key, into] : {std::pair{"train", &c.train}, {"validation", &c.validation}}) {
    const auto* arr = t["data"][key].as_array();
    if (arr == nullptr || arr->empty()) return fail(ErrorCode::kInvalidArgument, path + ": data." + key + " must list at least one prepared case directory");
    for (const auto& e : *arr) {
      const auto s = e.value<std::string>();
      if (!s) return fail(ErrorCode::kInvalidArgument, path + ": data." + key + " must hold strings");
      // Relative to the configuration file's directory.
      const fs::path p(*s);
      into->push_back(p.is_absolute() ? p.string() : (fs::path(path).parent_path() / p).string());
    }
  }
  const auto dir = t["output"]["dir"].value<std::string>();
  if (!dir) return fail(ErrorCode::kInvalidArgument, path + ": output.dir is missing");
  c.out = fs::path(*dir).is_absolute() ? *dir : (fs::path(path).parent_path() / *dir).string();
  return c;
}

// A prepared case directory: image.nii, vesselness.nii, labels.nii, each possibly .sealed.
Result<ct::Prepared> load_case(const std::string& dir, const sealed::KeyRing& ring, unsigned threads, bool labels_required = true) {
  auto find = [&](const char* base) -> Result<std::string> {
    for (const char* ext : {".nii", ".nii.sealed"}) {
      const fs::path p = fs::path(dir) / (std::string(base) + ext);
      std::error_code ec;
      if (fs::is_regular_file(p, ec)) return p.string();
    }
    return fail(ErrorCode::kIo, dir + ": no " + base + ".nii (a directory that tresor prep wrote)");
  };
  ct::Prepared p;
  auto read_float = [](ByteSpan b, const std::string& n) { return ct::read_nifti_float(b, n); };
  for (auto [base, into] : {std::pair{"image", &p.image}, {"vesselness", &p.vesselness}}) {
    auto f = find(base);
    if (!f) return std::unexpected(f.error());
    auto v = with_input<ct::Volume<float>>(*f, ring, threads, read_float);
    if (!v) return std::unexpected(v.error());
    *into = std::move(*v);
  }
  if (p.image.dims != p.vesselness.dims) return fail(ErrorCode::kInvalidArgument, dir + ": image and vesselness differ in size");
  auto lf = find("labels");
  if (!lf) {
    if (labels_required) return std::unexpected(lf.error());
    return p;
  }
  auto l = with_input<ct::LabelVolume>(*lf, ring, threads, [](ByteSpan b, const std::string& n) { return ct::read_nifti_labels(b, n); });
  if (!l) return std::unexpected(l.error());
  p.labels = std::move(*l);
  if (p.image.dims != p.labels->dims) return fail(ErrorCode::kInvalidArgument, dir + ": image and labels differ in size");
  return p;
}

// Whether any of these case directories holds a sealed file where load_case looks (a plain .nii
// is taken before a .nii.sealed of the same name).
[[maybe_unused]] bool any_sealed(const std::vector<std::string>& dirs) {
  for (const auto& dir : dirs) {
    for (const char* base : {"image", "vesselness", "labels"}) {
      std::error_code ec;
      const fs::path plain = fs::path(dir) / (std::string(base) + ".nii");
      if (!fs::is_regular_file(plain, ec) && fs::is_regular_file(fs::path(dir) / (std::string(base) + ".nii.sealed"), ec)) return true;
    }
  }
  return false;
}

// The keys for sealed inputs (identities and dataset keys), kept alive with the ring that points at them.
struct Keys {
  std::vector<Identity> ids;
  std::vector<DatasetKey> dataset_keys;
  std::vector<sealed::FileKeys> file_keys;
  sealed::KeyRing ring;
};
Result<std::unique_ptr<Keys>> load_keys(const std::vector<std::string>& identities, const std::vector<std::string>& key_files, const std::vector<std::string>& datasets,
                                        const std::vector<std::string>& file_key_files) {
  auto k = std::make_unique<Keys>();
  for (const auto& p : identities) {
    auto id = load_identity(p);
    if (!id) return std::unexpected(id.error());
    k->ids.push_back(std::move(*id));
  }
  auto dk = load_dataset_keys(key_files, datasets, false);
  if (!dk) return std::unexpected(dk.error());
  k->dataset_keys = std::move(*dk);
  for (const auto& id : k->ids) k->ring.identities.push_back(&id);
  for (const auto& d : k->dataset_keys) k->ring.dataset_keys.push_back(&d);
  auto fk = load_file_keys(file_key_files);
  if (!fk) return std::unexpected(fk.error());
  k->file_keys = std::move(*fk);
  for (const auto& f : k->file_keys) k->ring.file_keys.push_back(&f);
  return k;
}

// A checkpoint file, opened in memory with the ring when it is sealed; errors name the file.
Result<train::Checkpoint> read_checkpoint(const std::string& path, const sealed::KeyRing& ring) {
  Result<train::Checkpoint> parsed = fail(ErrorCode::kInvalidArgument, "not read");
  if (path.ends_with(".sealed")) {
    auto plain = open_sealed_file(path, ring, 0);
    if (!plain) return std::unexpected(plain.error());
    parsed = train::parse_checkpoint(ByteSpan(plain->data(), plain->size()));
  } else {
    auto bytes = read_whole_file(path);
    if (!bytes) return std::unexpected(bytes.error());
    parsed = train::parse_checkpoint(*bytes);
  }
  if (!parsed) return fail(parsed.error().code, path + ": " + parsed.error().message);
  return parsed;
}

// The foreground of a case's labels as 0/1, and the prediction (argmax of two-class logits) as
// labels (coronary, or body) for NIfTI files and previews.
std::vector<uint8_t> binary_target(const ct::LabelVolume& l, uint8_t foreground) {
  std::vector<uint8_t> t(l.data.size());
  for (size_t v = 0; v < t.size(); ++v) t[v] = l.data[v] == foreground ? 1 : 0;
  return t;
}
ct::LabelVolume predicted_labels(const ct::Prepared& c, const train::Tensor& logits) {
  ct::LabelVolume pred;
  pred.dims = c.image.dims;
  pred.spacing = c.image.spacing;
  pred.origin = c.image.origin;
  const size_t m = c.image.size();
  pred.data.resize(m);
  for (size_t v = 0; v < m; ++v) pred.data[v] = logits.data[m + v] > logits.data[v] ? ct::kCoronary : ct::kBody;
  return pred;
}

// Loss (blue, scaled to its range) and validation Dice (red, 0..1) against the step, 640×320.
Result<Bytes> curves_png(const train::TrainingLog& log, size_t steps) {
  const size_t W = 640, H = 320, M = 20;
  std::vector<uint8_t> rgb(W * H * 3, 255);
  auto px = [&](long x, long y, std::array<uint8_t, 3> c) {
    if (x < 0 || y < 0 || x >= static_cast<long>(W) || y >= static_cast<long>(H)) return;
    std::copy(c.begin(), c.end(), rgb.begin() + 3 * (static_cast<long>(W) * y + x));
  };
  for (size_t x = M; x < W - M; ++x) px(static_cast<long>(x), static_cast<long>(H - M), {0, 0, 0});
  for (size_t y = M; y < H - M; ++y) px(static_cast<long>(M), static_cast<long>(y), {0, 0, 0});
  auto to_x = [&](double step) { return static_cast<long>(M + (W - 2 * M) * step / static_cast<double>(std::max<size_t>(steps, 1))); };
  auto to_y = [&](double v) { return static_cast<long>(static_cast<double>(H - M) - (H - 2 * M) * std::clamp(v, 0.0, 1.0)); };
  auto line = [&](long x0, long y0, long x1, long y1, std::array<uint8_t, 3> c) {
    const long n = std::max({std::abs(x1 - x0), std::abs(y1 - y0), 1L});
    for (long i = 0; i <= n; ++i) px(x0 + (x1 - x0) * i / n, y0 + (y1 - y0) * i / n, c);
  };
  if (!log.loss.empty()) {
    const auto [lo, hi] = std::minmax_element(log.loss.begin(), log.loss.end());
    const double span = std::max(*hi - *lo, 1e-12);
    const size_t first = steps - std::min(steps, log.loss.size());
    for (size_t i = 1; i < log.loss.size(); ++i) {
      line(to_x(static_cast<double>(first + i)), to_y((log.loss[i - 1] - *lo) / span), to_x(static_cast<double>(first + i + 1)), to_y((log.loss[i] - *lo) / span), {40, 80, 220});
    }
  }
  for (size_t i = 1; i < log.val_dice.size(); ++i) {
    line(to_x(static_cast<double>(log.val_dice[i - 1].first)), to_y(log.val_dice[i - 1].second), to_x(static_cast<double>(log.val_dice[i].first)),
         to_y(log.val_dice[i].second), {220, 30, 30});
  }
  return ct::rgb_png(W, H, rgb);
}

// The ranks a launcher (`--ranks N` without `--rank`) starts: copies of this executable with
// `--rank r`. Until wait_all() they are stopped and reaped when the launcher gives up.
class ChildRanks {
 public:
  ChildRanks() = default;
  ChildRanks(const ChildRanks&) = delete;
  ChildRanks& operator=(const ChildRanks&) = delete;
  ~ChildRanks() {
    for (const auto& [rank, pid] : pids_) ::kill(pid, SIGTERM);
    for (const auto& [rank, pid] : pids_) {
      int status = 0;
      while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
      }
    }
  }
  bool empty() const { return pids_.empty(); }
  Result<void> spawn(std::vector<std::string> args, int rank) {
    args.push_back(std::to_string(rank));
    std::vector<char*> cargs;
    for (auto& a : args) cargs.push_back(a.data());
    cargs.push_back(nullptr);
    pid_t pid = 0;
    if (const int e = ::posix_spawn(&pid, "/proc/self/exe", nullptr, nullptr, cargs.data(), environ); e != 0) {
      return fail(ErrorCode::kIo, "cannot start rank " + std::to_string(rank) + ": " + std::strerror(e));
    }
    pids_.emplace_back(rank, pid);
    return {};
  }
  /// Waits for every rank; "" when all exited 0, else which did not and how.
  std::string wait_all() {
    std::string failed;
    for (const auto& [rank, pid] : pids_) {
      int status = 0;
      while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
      }
      if (WIFEXITED(status) && WEXITSTATUS(status) == 0) continue;
      failed += (failed.empty() ? "" : "; ") + std::string("rank ") + std::to_string(rank) +
                (WIFEXITED(status) ? " exited with status " + std::to_string(WEXITSTATUS(status)) : " was killed by signal " + std::to_string(WTERMSIG(status)));
    }
    pids_.clear();
    return failed;
  }

 private:
  std::vector<std::pair<int, pid_t>> pids_;
};

}  // namespace

int cmd_train(int argc, char** argv) {
  po::options_description opts("Options");
  std::string config_path, resume;
  std::vector<std::string> identities, key_files, datasets, recipients, file_key_files;
  opts.add_options()
      ("config,c", po::value(&config_path)->required(), "the run's TOML configuration (docs/training.md §8)")
      ("resume", po::value(&resume), "continue from this checkpoint (checkpoint.tck, or .sealed with -i)")
      ("stop-after", po::value<size_t>(), "stop once this many steps are done (the schedule still spans training.steps)")
      ("identity,i", po::value(&identities)->composing(), "identity for sealed inputs and checkpoints; repeatable")
      ("dataset-key-file", po::value(&key_files)->composing(), "dataset key file for sealed inputs; repeatable")
      ("dataset", po::value(&datasets)->composing(), "dataset ID of the matching --dataset-key-file")
      ("file-keys", po::value(&file_key_files)->composing(), "file keys for sealed inputs (inside a job: $TRESOR_FILE_KEYS); repeatable")
      ("recipient,r", po::value(&recipients)->composing(), "seal every output to this recipient (or @FILE); repeatable")
      ("ranks", po::value<int>(), "data-parallel ranks on this machine; without --rank, this process starts the others (default: SLURM_NTASKS in a Slurm step, else 1)")
      ("rank", po::value<int>(), "run as this one rank of --ranks (default: SLURM_PROCID)")
      ("rendezvous", po::value<std::string>(), "a directory private to the job where the ranks meet (default: output.dir)")
      ("device", po::value<std::string>()->default_value("cpu"), "where the step runs: cpu (the reference), cuda:N or cuda (the GPU trainer; cuda: the rank's GPU on its node), emulated (the GPU trainer on its CPU emulation; slow)")
      ("roster", po::value<std::string>(), "ranks across machines: the step roster (docs/training.md §5.3); every link is TLS pinned to its rank's key")
      ("link-key", po::value<std::string>(), "this rank's link key (with --roster; `tresor roster keygen`)")
      ("join-timeout", po::value<int>()->default_value(120), "seconds the ranks wait for each other to appear")
      ("run-id", po::value<std::string>(), "tells runs sharing the rendezvous directory apart (default: SLURM_JOB_ID.SLURM_STEP_ID, or \"local\")");
  po::variables_map vm;
  if (auto stop = parse_options("train", "--config FILE [--resume CHECKPOINT] [-i IDENTITY] [-r RECIPIENT] [--ranks N --rank R]", argc, argv, opts, {}, vm)) return *stop;
  auto cfg = parse_config(config_path);
  if (!cfg) return report(cfg.error());
  if (vm.count("stop-after")) cfg->options.stop_after = vm["stop-after"].as<size_t>();
  // Data parallelism (docs/training.md §5): the ranks from the flags, or from Slurm's step.
  train::Rendezvous rv;
  rv.directory = vm.count("rendezvous") ? vm["rendezvous"].as<std::string>() : cfg->out;
  int ranks_per_node = 1;
  [[maybe_unused]] int local_rank = 0;  // picks the GPU
  ChildRanks children;
  // Across machines (docs/training.md §5.3): a step roster and this rank's link key.
  if (vm.count("roster") != vm.count("link-key")) return report(Error{ErrorCode::kInvalidArgument, "train: --roster and --link-key go together"});
  auto take_roster = [&](const std::string& roster_path, const std::string& key_path) -> Result<void> {
    auto text = read_small_file(roster_path);
    if (!text) return std::unexpected(text.error());
    auto roster = train::parse_roster(*text);
    if (!roster) return fail(roster.error().code, "train: " + roster_path + ": " + roster.error().message);
    auto key = load_link_key(key_path);
    if (!key) return fail(key.error().code, "train: " + key.error().message);
    rv.roster = std::make_shared<const train::Roster>(std::move(*roster));
    rv.link_key = std::make_shared<const crypto::Key>(std::move(*key));
    rv.run_id = rv.roster->step;  // Slurm's JOB.STEP or --run-id must agree (checked when the ranks meet)
    return {};
  };
  if (vm.count("roster")) {
    if (auto t = take_roster(vm["roster"].as<std::string>(), vm["link-key"].as<std::string>()); !t) return report(t.error());
    if (vm.count("ranks") && !vm.count("rank")) return report(Error{ErrorCode::kInvalidArgument, "train: with --roster every rank is started on its own machine (--ranks N needs --rank R)"});
  }
  if (vm.count("ranks") || vm.count("rank")) {
    if (!vm.count("ranks")) return report(Error{ErrorCode::kInvalidArgument, "train: --rank needs --ranks"});
    rv.size = vm["ranks"].as<int>();
    if (rv.size < 1 || rv.size > 256) return report(Error{ErrorCode::kInvalidArgument, "train: --ranks must be 1..256"});
    ranks_per_node = rv.size;
    if (vm.count("rank")) {
      rv.rank = vm["rank"].as<int>();
      local_rank = rv.rank;
    } else if (rv.size > 1) {
      // The launcher: this process is rank 0 and starts ranks 1 … N−1 as copies of itself.
      rv.run_id = vm.count("run-id") ? vm["run-id"].as<std::string>() : "launch-" + std::to_string(::getpid());
      std::vector<std::string> base = {"tresor"};
      for (int i = 0; i < argc; ++i) base.emplace_back(argv[i]);
      base.insert(base.end(), {"--run-id", rv.run_id, "--rank"});
      for (int r = 1; r < rv.size; ++r) {
        auto child = children.spawn(base, r);
        if (!child) return report(Error{child.error().code, "train: " + child.error().message});
      }
    }
  } else {
    auto slurm = train::ranks_from_slurm([](const char* name) { return std::getenv(name); });
    if (!slurm) return report(Error{slurm.error().code, "train: " + slurm.error().message});
    // In a confidential step whose agent claimed this task's rank (TRESOR_STEP_ROSTER=1, §5.4):
    // the broker's roster of the step and the link key drawn in private memory. The roster's step
    // is the run id (the manifest's job id and the step: Slurm's job id is not in the claim).
    bool roster_from_agent = false;
    if (*slurm && !rv.roster) {
      const char* roster_env = std::getenv("TRESOR_ROSTER");
      const char* key_env = std::getenv("TRESOR_LINK_KEY");
      if ((roster_env != nullptr) != (key_env != nullptr)) {
        return report(Error{ErrorCode::kInvalidArgument, std::string("train: ") + (roster_env ? "TRESOR_ROSTER is set without TRESOR_LINK_KEY" : "TRESOR_LINK_KEY is set without TRESOR_ROSTER") +
                                                             " (the agent sets both, with TRESOR_STEP_ROSTER=1)"});
      }
      if (roster_env != nullptr) {
        if (auto t = take_roster(roster_env, key_env); !t) return report(t.error());
        roster_from_agent = true;
      }
    }
    if (*slurm) {
      if ((*slurm)->nodes > 1 && !rv.roster) {
        return report(Error{ErrorCode::kInvalidArgument, "train: the step spans " + std::to_string((*slurm)->nodes) +
                                                             " nodes; without --roster and --link-key (or, in a confidential step, TRESOR_STEP_ROSTER=1) the ranks meet on one machine only (docs/training.md §5.3)"});
      }
      rv.size = (*slurm)->size;
      rv.rank = (*slurm)->rank;
      if (!roster_from_agent) rv.run_id = (*slurm)->run_id;
      local_rank = (*slurm)->local_rank;
      ranks_per_node = (rv.size + (*slurm)->nodes - 1) / (*slurm)->nodes;  // the ranks sharing this machine's cores
    }
  }
  // Where the step runs (docs/training.md §12): "cuda" alone is the GPU of this rank's index on
  // its node (SLURM_LOCALID, or --rank), one GPU per rank.
  const std::string device = vm["device"].as<std::string>();
#if TRESOR_TRAIN_GPU
  std::optional<gpu::train::Where> gpu_where;
  if (device == "emulated") {
    gpu_where = gpu::train::Where{gpu::train::Backend::kEmulated, 0};
  } else if (device == "cuda" || (device.starts_with("cuda:") && device.size() > 5 && device.size() < 9 && device.find_first_not_of("0123456789", 5) == std::string::npos)) {
    gpu_where = gpu::train::Where{gpu::train::Backend::kDevice, device == "cuda" ? local_rank : std::stoi(device.substr(5))};
    auto ok = gpu::train::available(gpu_where->device);
    const std::string named = "train: --device " + device + (device == "cuda" ? " (cuda:" + std::to_string(gpu_where->device) + ")" : "");
    if (!ok) return report(Error{ok.error().code, named + ": " + ok.error().message});
    if (!*ok) return report(Error{ErrorCode::kUnavailable, named + ": no such CUDA device, or one older than compute capability 8.0"});
  } else if (device != "cpu") {
    return usage_error("train", "--device must be cpu, cuda, cuda:N or emulated, not '" + device + "'");
  }
#else
  if (device != "cpu") {
    return usage_error("train", "--device " + device + ": this trainer (tresor-train, for guest images) is built without the GPU paths; --device must be cpu");
  }
#endif
  if (vm.count("run-id") && children.empty()) rv.run_id = vm["run-id"].as<std::string>();
  const int join_s = vm["join-timeout"].as<int>();
  if (join_s < 1 || join_s > 86400) return report(Error{ErrorCode::kInvalidArgument, "train: --join-timeout must be 1..86400 seconds"});
  rv.join_timeout_ms = join_s * 1000;
  // Ranks share the machine's cores unless the configuration says otherwise.
  if (cfg->options.threads == 0 && ranks_per_node > 1) cfg->options.threads = std::max(1u, std::thread::hardware_concurrency() / static_cast<unsigned>(ranks_per_node));
  auto keys = load_keys(identities, key_files, datasets, file_key_files);
  if (!keys) return report(keys.error());
  const sealed::KeyRing& ring = (*keys)->ring;
  sealed::SealOptions seal;
  if (!recipients.empty()) {
    auto r = parse_recipients(recipients);
    if (!r) return report(r.error());
    seal.recipients = std::move(*r);
  }
  // Sealed training cases for the GPU trainer go through the secure channel into device memory
  // (DeviceDataset, docs/training.md §13): their plaintext never exists on the host; the batches
  // are the host path's to the bit (deep supervision's smaller targets are made on the device
  // too). The validation cases are opened on the host as before (validation patches, the
  // whole-volume validation).
#if TRESOR_TRAIN_GPU
  std::unique_ptr<gpu::ChannelDevice> channel_device;
  std::optional<gpu::DeviceDataset> dataset;
  if (gpu_where && any_sealed(cfg->train)) {
    if (gpu_where->backend == gpu::train::Backend::kEmulated) {
      channel_device = gpu::emulated_device();
    } else {
      auto d = gpu::cuda_device(gpu_where->device);
      if (!d) return report(Error{d.error().code, "train: the secure channel to cuda:" + std::to_string(gpu_where->device) + ": " + d.error().message});
      channel_device = std::move(*d);
    }
    auto ds = gpu::DeviceDataset::load(*channel_device, cfg->train, ring, cfg->options);
    if (!ds) return report(ds.error());
    dataset.emplace(std::move(*ds));
  }
#else
  const bool dataset = false;
#endif
  std::vector<ct::Prepared> train_cases, val_cases;
  for (auto [list, into] : {std::pair{&cfg->train, &train_cases}, {&cfg->validation, &val_cases}}) {
    if (into == &train_cases && dataset) continue;
    for (const auto& dir : *list) {
      auto c = load_case(dir, ring, cfg->options.threads);
      if (!c) return report(c.error());
      into->push_back(std::move(*c));
    }
  }
  std::vector<const ct::Prepared*> tr, va;
  for (const auto& c : train_cases) tr.push_back(&c);
  for (const auto& c : val_cases) va.push_back(&c);

  auto net = train::UNet::create(cfg->options.model, cfg->options.seed);
  if (!net) return report(net.error());
  train::TrainState state;
  if (!resume.empty()) {
    auto parsed = read_checkpoint(resume, ring);
    if (!parsed) return report(parsed.error());
    const auto& m = cfg->options.model;
    if (parsed->config.levels != m.levels || parsed->config.base_channels != m.base_channels || parsed->config.max_channels != m.max_channels ||
        parsed->config.deep_supervision != m.deep_supervision || parsed->adamw != cfg->options.adamw) {
      return report(Error{ErrorCode::kInvalidArgument, resume + ": the checkpoint's model or optimizer differs from the configuration's"});
    }
    if (auto r = net->set_parameters(parsed->parameters); !r) return report(r.error());
    state = parsed->state;
  }
  std::error_code ec;
  fs::create_directories(cfg->out, ec);
  if (ec) return report(Error{ErrorCode::kIo, "cannot create " + cfg->out + ": " + ec.message()});
  std::unique_ptr<train::Collective> comm;
  if (rv.size > 1 || rv.rank != 0) {
    auto c = train::connect_tcp(rv);
    if (!c) return report(Error{c.error().code, "train: " + c.error().message});
    comm = std::move(*c);
    cfg->options.collective = comm.get();
  }
  // Ranks on GPUs sum their gradients with NCCL in device memory, bootstrapped through the TCP
  // collective (docs/training.md §5); the TCP collective still carries the loss statistics.
#if TRESOR_TRAIN_GPU
  std::unique_ptr<gpu::DeviceCollective> nccl;
  if (comm && gpu_where && gpu_where->backend == gpu::train::Backend::kDevice) {
    auto n = gpu::connect_nccl(*comm, gpu_where->device);
    if (!n) return report(Error{n.error().code, "train: rank " + std::to_string(rv.rank) + ": " + n.error().message});
    nccl = std::move(*n);
  }
#endif
  const bool lead = rv.rank == 0;
  const bool tty = ::isatty(2) != 0;
  const double start = now_seconds();
  const uint64_t first_step = state.step;
  double last_dice = -1;
  const train::TrainProgress progress = [&](size_t step, double loss, double dice) {
    if (dice >= 0) last_dice = dice;
    const double rate = static_cast<double>(step - first_step) / std::max(now_seconds() - start, 1e-9);
    if (lead && (tty || dice >= 0)) {
      std::fprintf(stderr, "%strain: step %zu/%zu, %.2f it/s, loss %.4f, validation Dice %s%s", tty ? "\r" : "", step, cfg->options.steps, rate, loss,
                   last_dice >= 0 ? std::to_string(last_dice).substr(0, 5).c_str() : "-", tty ? "\x1b[K" : "\n");
    }
  };
#if TRESOR_TRAIN_GPU
  auto log = gpu_where ? gpu::train::train_unet_gpu(*net, tr, va, cfg->options, *gpu_where, progress, &state, nccl.get(), dataset ? &*dataset : nullptr)
                       : train::train_unet(*net, tr, va, cfg->options, progress, &state);
#else
  auto log = train::train_unet(*net, tr, va, cfg->options, progress, &state);
#endif
  if (tty && lead) std::fputc('\n', stderr);
  if (!log) return report(Error{log.error().code, rv.size > 1 ? "train: rank " + std::to_string(rv.rank) + ": " + log.error().message : log.error().message});
  if (!lead) return kExitOk;  // rank 0 writes the outputs; every rank holds the same weights
  const fs::path out(cfg->out);
  auto ck = write_output((out / "checkpoint.tck").string(), train::checkpoint_bytes(*net, state, cfg->options.adamw, cfg->options.patch), seal);
  if (!ck) return report(ck.error());
  nlohmann::json metrics = {{"steps_done", state.step}, {"steps", cfg->options.steps}, {"parameters", net->parameter_count()}, {"ranks", rv.size}, {"device", device}, {"loss", log->loss},
                            {"validation_dice", nlohmann::json::array()}, {"seconds", now_seconds() - start}};
  for (const auto& [s, d] : log->val_dice) metrics["validation_dice"].push_back({s, d});
  auto curves = curves_png(*log, cfg->options.steps);
  if (!curves) return report(curves.error());
  if (auto r = write_output((out / "curves.png").string(), *curves, seal); !r) return report(r.error());
  // The trained network on whole validation volumes (sliding windows with Gaussian weighting,
  // docs/training.md §10): the Dice per case; prediction.png shows the first case's MIPs of the
  // image, the labels and the prediction (coronary red). Without full_volume_validation, the
  // first validation patch instead.
  ct::Volume<float> img;
  ct::LabelVolume truth, pred;
  nlohmann::json volume_dice = nlohmann::json::array();
  if (cfg->full_volume) {
    train::SlidingWindowOptions so;
    so.tile = cfg->options.patch;
    so.batch = cfg->options.batch;
    so.threads = cfg->options.threads;
    for (size_t i = 0; i < val_cases.size(); ++i) {
      const ct::Prepared& c = val_cases[i];
      auto logits = train::sliding_window_logits(*net, train::case_input(c, cfg->options.vesselness_scale), so);
      if (!logits) return report(logits.error());
      const size_t m = c.image.size();
      const std::vector<uint8_t> target = binary_target(*c.labels, cfg->options.foreground_label);
      const double dice = train::dice_of_prediction(*logits, target);
      volume_dice.push_back({{"case", cfg->validation[i]}, {"dice", dice}});
      std::fprintf(stderr, "train: whole-volume validation Dice %.3f on %s\n", dice, cfg->validation[i].c_str());
      if (i == 0) {
        img = c.image;
        truth = *c.labels;
        for (size_t v = 0; v < m; ++v) truth.data[v] = target[v] != 0 ? ct::kCoronary : ct::kBody;
        pred = predicted_labels(c, *logits);
      }
    }
  } else {
    auto vb = train::validation_batch(va, cfg->options);
    if (!vb) return report(vb.error());
    auto logits = net->forward(vb->first, cfg->options.threads);
    if (!logits) return report(logits.error());
    const size_t P = cfg->options.patch, m = P * P * P;
    img.dims = truth.dims = pred.dims = {P, P, P};
    img.data.assign(vb->first.data.begin(), vb->first.data.begin() + static_cast<std::ptrdiff_t>(m));
    truth.data.resize(m);
    pred.data.resize(m);
    for (size_t i = 0; i < m; ++i) {
      truth.data[i] = vb->second[i] != 0 ? ct::kCoronary : ct::kBody;
      pred.data[i] = logits->data[m + i] > logits->data[i] ? ct::kCoronary : ct::kBody;
    }
  }
  metrics["validation_dice_volume"] = volume_dice;
  if (auto r = write_output((out / "metrics.json").string(), as_bytes(metrics.dump(1) + "\n"), seal); !r) return report(r.error());
  auto png = ct::mip_png({{&img, -1.0, 3.0, nullptr}, {nullptr, 0, 1, &truth}, {nullptr, 0, 1, &pred}}, 2);
  if (!png) return report(png.error());
  if (auto r = write_output((out / "prediction.png").string(), *png, seal); !r) return report(r.error());
  std::printf("train: %llu steps in %.1f s%s, validation Dice %.3f -> %.3f; %s, metrics.json, curves.png, prediction.png in %s%s\n",
              static_cast<unsigned long long>(state.step - first_step), now_seconds() - start, rv.size > 1 ? (" on " + std::to_string(rv.size) + " ranks").c_str() : "",
              log->val_dice.front().second, log->val_dice.back().second, fs::path(*ck).filename().c_str(), cfg->out.c_str(), seal.recipients.empty() ? "" : " (sealed)");
  if (auto failed = children.wait_all(); !failed.empty()) return report(Error{ErrorCode::kIo, "train: " + failed});
  return kExitOk;
}

// tresor predict: a trained checkpoint applied to whole prepared cases by sliding windows
// (docs/training.md §10): per case prediction.nii (labels: coronary, or body) and prediction.png
// (MIPs of the image, the labels when the case has them, the prediction), sealed with -r; the
// Dice against the case's labels when it has them, in predict.json.
int cmd_predict(int argc, char** argv) {
  po::options_description opts("Options");
  std::string checkpoint, out_dir;
  std::vector<std::string> cases, identities, key_files, datasets, recipients, file_key_files;
  size_t tile = 0, batch = 2;
  unsigned threads = 0;
  double step = 0.5, vesselness_scale = 5;
  opts.add_options()
      ("checkpoint,c", po::value(&checkpoint)->required(), "the trained checkpoint (checkpoint.tck, or .sealed with -i)")
      ("output,o", po::value(&out_dir)->required(), "output directory (one subdirectory per case)")
      ("case", po::value(&cases)->composing(), "a directory tresor prep wrote; repeatable (or positional)")
      ("tile", po::value(&tile)->default_value(0), "sliding-window tile (0: the checkpoint's training patch)")
      ("step", po::value(&step)->default_value(0.5), "tile step, as a fraction of the tile")
      ("batch", po::value(&batch)->default_value(2), "tiles per forward pass")
      ("mirror", "nnU-Net's test-time mirroring: each tile also predicted flipped along every axis combination (8x the work)")
      ("threads,j", po::value(&threads)->default_value(0), "threads (0: all cores)")
      ("identity,i", po::value(&identities)->composing(), "identity for sealed inputs and checkpoints; repeatable")
      ("dataset-key-file", po::value(&key_files)->composing(), "dataset key file for sealed inputs; repeatable")
      ("dataset", po::value(&datasets)->composing(), "dataset ID of the matching --dataset-key-file")
      ("file-keys", po::value(&file_key_files)->composing(), "file keys for sealed inputs (inside a job: $TRESOR_FILE_KEYS); repeatable")
      ("recipient,r", po::value(&recipients)->composing(), "seal every output to this recipient (or @FILE); repeatable");
  po::positional_options_description pos;
  pos.add("case", -1);
  po::variables_map vm;
  if (auto stop = parse_options("predict", "--checkpoint CK -o DIR CASE_DIR... [-i IDENTITY] [-r RECIPIENT]", argc, argv, opts, pos, vm)) return *stop;
  if (cases.empty()) return usage_error("predict", "no case directory given");
  auto keys = load_keys(identities, key_files, datasets, file_key_files);
  if (!keys) return report(keys.error());
  sealed::SealOptions seal;
  if (!recipients.empty()) {
    auto r = parse_recipients(recipients);
    if (!r) return report(r.error());
    seal.recipients = std::move(*r);
  }
  auto ck = read_checkpoint(checkpoint, (*keys)->ring);
  if (!ck) return report(ck.error());
  if (ck->config.in_channels != 2 || ck->config.classes != 2) return report(Error{ErrorCode::kInvalidArgument, checkpoint + ": not a coronary model (2 channels in, 2 classes)"});
  auto net = train::UNet::create(ck->config, 0);
  if (!net) return report(net.error());
  if (auto r = net->set_parameters(ck->parameters); !r) return report(r.error());
  train::SlidingWindowOptions so;
  so.tile = tile != 0 ? tile : ck->patch;
  if (so.tile == 0) return usage_error("predict", checkpoint + " does not record its training patch (format version 1): pass --tile");
  so.step = step;
  so.batch = batch;
  so.threads = threads;
  so.mirror = vm.count("mirror") > 0;
  std::error_code ec;
  fs::create_directories(out_dir, ec);
  if (ec) return report(Error{ErrorCode::kIo, "cannot create " + out_dir + ": " + ec.message()});
  nlohmann::json summary = {{"checkpoint", checkpoint}, {"tile", so.tile}, {"step", so.step}, {"mirror", so.mirror}, {"cases", nlohmann::json::array()}};
  std::set<std::string> names;
  for (const auto& dir : cases) {
    const std::string name = fs::path(dir).filename().empty() ? fs::path(dir).parent_path().filename().string() : fs::path(dir).filename().string();
    if (!names.insert(name).second) return usage_error("predict", "two cases are named " + name + ": their outputs would collide");
    auto c = load_case(dir, (*keys)->ring, threads, false);
    if (!c) return report(c.error());
    const double t0 = now_seconds();
    auto logits = train::sliding_window_logits(*net, train::case_input(*c, vesselness_scale), so);
    if (!logits) return report(Error{logits.error().code, dir + ": " + logits.error().message});
    const ct::LabelVolume pred = predicted_labels(*c, *logits);
    const fs::path o = fs::path(out_dir) / name;
    fs::create_directories(o, ec);
    if (ec) return report(Error{ErrorCode::kIo, "cannot create " + o.string() + ": " + ec.message()});
    auto nii = ct::nifti_bytes(pred);
    if (!nii) return report(nii.error());
    if (auto r = write_output((o / "prediction.nii").string(), *nii, seal); !r) return report(r.error());
    nlohmann::json entry = {{"case", dir}, {"seconds", now_seconds() - t0}, {"foreground_voxels", std::count(pred.data.begin(), pred.data.end(), ct::kCoronary)}};
    std::vector<ct::PreviewPanel> panels = {{&c->image, -1.0, 3.0, nullptr}};
    ct::LabelVolume truth;
    if (c->labels) {
      const auto target = binary_target(*c->labels, ct::kCoronary);
      const double dice = train::dice_of_prediction(*logits, target);
      entry["dice"] = dice;
      truth = *c->labels;
      for (size_t v = 0; v < truth.data.size(); ++v) truth.data[v] = target[v] != 0 ? ct::kCoronary : ct::kBody;
      panels.push_back({nullptr, 0, 1, &truth});
      std::fprintf(stderr, "predict: %s: Dice %.3f against its labels (%.1f s)\n", name.c_str(), dice, now_seconds() - t0);
    } else {
      std::fprintf(stderr, "predict: %s (%.1f s)\n", name.c_str(), now_seconds() - t0);
    }
    panels.push_back({nullptr, 0, 1, &pred});
    auto png = ct::mip_png(panels, 2);
    if (!png) return report(png.error());
    if (auto r = write_output((o / "prediction.png").string(), *png, seal); !r) return report(r.error());
    summary["cases"].push_back(entry);
  }
  if (auto r = write_output((fs::path(out_dir) / "predict.json").string(), as_bytes(summary.dump(1) + "\n"), seal); !r) return report(r.error());
  std::printf("predict: %zu case(s) in %s%s\n", cases.size(), out_dir.c_str(), seal.recipients.empty() ? "" : " (sealed)");
  return kExitOk;
}

}  // namespace tresor::cli
