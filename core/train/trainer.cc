// Training the U-Net on preprocessed CT, CPU reference (include/tresor/train/trainer.h,
// docs/training.md §6).
#include "tresor/train/trainer.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>

namespace tresor::train {
namespace {

struct CaseSampler {
  const ct::Prepared* p;
  std::unique_ptr<ct::PatchSampler> sampler;
};

// Patch `index` of a case into batch slot `slot`: channel 0 the augmented image patch, channel 1
// the vesselness at the same voxels (crop, flips and spatial transform as drawn), target 1 where
// the label is the foreground label.
void fill(const CaseSampler& c, uint64_t seed, uint64_t index, size_t slot, const TrainerOptions& o, Tensor& x, std::vector<uint8_t>& y) {
  const size_t m = o.patch * o.patch * o.patch;
  const ct::Patch patch = c.sampler->sample(seed, index);
  // make_samplers checked that the vesselness has the image's dimensions: this cannot fail.
  const std::vector<float> vesselness = c.sampler->channel(patch, c.p->vesselness).value();
  for (size_t i = 0; i < m; ++i) {
    x.data[(slot * 2 + 0) * m + i] = patch.image.data[i];
    x.data[(slot * 2 + 1) * m + i] = vesselness[i] * static_cast<float>(o.vesselness_scale);
    y[slot * m + i] = patch.labels.data[i] == o.foreground_label ? 1 : 0;
  }
}

Result<std::vector<CaseSampler>> make_samplers(const std::vector<const ct::Prepared*>& cases, bool augment, const TrainerOptions& o) {
  std::vector<CaseSampler> out;
  for (size_t i = 0; i < cases.size(); ++i) {
    if (!cases[i]->labels) return fail(ErrorCode::kInvalidArgument, "train: case " + std::to_string(i) + " has no labels");
    if (cases[i]->vesselness.dims != cases[i]->image.dims || cases[i]->vesselness.data.size() != cases[i]->image.data.size()) {
      return fail(ErrorCode::kInvalidArgument, "train: case " + std::to_string(i) + ": the vesselness does not have the image's dimensions");
    }
    const ct::AugmentOptions a = sampler_options(o, augment);
    auto s = ct::PatchSampler::create(cases[i]->image, *cases[i]->labels, a);
    if (!s) return fail(s.error().code, "train: case " + std::to_string(i) + ": " + s.error().message);
    out.push_back({cases[i], std::make_unique<ct::PatchSampler>(std::move(*s))});
  }
  return out;
}

// The validation set: fixed patches centred on foreground, round-robin over the cases; with
// ranks, rank r takes patches r, r + R, … .
void build_validation(const std::vector<CaseSampler>& va, const TrainerOptions& o, Tensor& vx, std::vector<uint8_t>& vy, size_t rank = 0, size_t ranks = 1) {
  const size_t P = o.patch;
  const size_t mine = o.validation_patches / ranks + (rank < o.validation_patches % ranks ? 1 : 0);
  vx = Tensor({mine, 2, P, P, P});
  vy.assign(mine * P * P * P, 0);
  for (size_t k = 0; k < mine; ++k) {
    const size_t i = rank + k * ranks;
    fill(va[i % va.size()], o.seed ^ 0x5A5A5A5Aull, i, k, o, vx, vy);
  }
}

}  // namespace

ct::AugmentOptions sampler_options(const TrainerOptions& o, bool augment) {
  ct::AugmentOptions a = o.augment;
  a.patch = {o.patch, o.patch, o.patch};
  a.foreground_label = o.foreground_label;
  a.foreground_fraction = augment ? o.foreground_fraction : 1.0;
  if (!augment) {
    a.flip_probability = a.intensity_probability = a.noise_probability = a.rotation_probability = a.scaling_probability = a.contrast_probability = 0;
    a.gamma_probability = a.gamma_inverted_probability = a.blur_probability = a.lowres_probability = 0;
  }
  return a;
}

struct PatchSource::Impl {
  std::vector<CaseSampler> cases;
  TrainerOptions options;
};

Result<PatchSource> PatchSource::create(const std::vector<const ct::Prepared*>& cases, const TrainerOptions& o) {
  if (cases.empty()) return fail(ErrorCode::kInvalidArgument, "train: no training case");
  auto s = make_samplers(cases, true, o);
  if (!s) return std::unexpected(s.error());
  auto impl = std::make_shared<Impl>();
  impl->cases = std::move(*s);
  impl->options = o;
  impl->options.collective = nullptr;
  PatchSource p;
  p.impl_ = std::move(impl);
  return p;
}

void PatchSource::fill_step(size_t step, size_t lo, size_t hi, Tensor& x, std::vector<uint8_t>& y) const {
  const TrainerOptions& o = impl_->options;
  for (size_t b = lo; b < hi; ++b) fill(impl_->cases[(step * o.batch + b) % impl_->cases.size()], o.seed, step * o.batch + b, b - lo, o, x, y);
}

Result<std::pair<Tensor, std::vector<uint8_t>>> validation_batch(const std::vector<const ct::Prepared*>& cases, const TrainerOptions& o) {
  if (cases.empty() || o.validation_patches == 0) return fail(ErrorCode::kInvalidArgument, "train: no validation case or patch");
  auto va = make_samplers(cases, false, o);
  if (!va) return std::unexpected(va.error());
  std::pair<Tensor, std::vector<uint8_t>> out;
  build_validation(*va, o, out.first, out.second);
  return out;
}

std::array<double, 3> dice_counts(const Tensor& logits, const std::vector<uint8_t>& target) {
  const size_t m = logits.spatial();
  std::array<double, 3> c{0, 0, 0};
  for (size_t n = 0; n < logits.shape[0]; ++n)
    for (size_t i = 0; i < m; ++i) {
      const bool p = logits.data[(n * logits.shape[1] + 1) * m + i] > logits.data[(n * logits.shape[1] + 0) * m + i];
      const bool g = target[n * m + i] != 0;
      c[0] += p && g ? 1 : 0;
      c[1] += p ? 1 : 0;
      c[2] += g ? 1 : 0;
    }
  return c;
}

double dice_from_counts(const std::array<double, 3>& c) { return c[1] + c[2] == 0 ? 1.0 : 2 * c[0] / (c[1] + c[2]); }

double dice_of_prediction(const Tensor& logits, const std::vector<uint8_t>& target) { return dice_from_counts(dice_counts(logits, target)); }

std::vector<double> deep_supervision_weights(size_t outputs) {
  if (outputs <= 1) return {1.0};
  std::vector<double> w(outputs);
  for (size_t j = 0; j < outputs; ++j) w[j] = std::ldexp(1.0, -static_cast<int>(j));
  w.back() = 0;
  double sum = 0;
  for (double v : w) sum += v;
  for (double& v : w) v /= sum;
  return w;
}

std::vector<uint8_t> downsample_target(const std::vector<uint8_t>& target, std::array<size_t, 4> s, size_t j) {
  const size_t f = size_t{1} << j, half = f / 2;  // ⌊(i + ½)·f⌋ = i·f + f/2 for f ≥ 2
  const size_t d = s[1] / f, h = s[2] / f, w = s[3] / f;
  std::vector<uint8_t> out(s[0] * d * h * w);
  for (size_t n = 0; n < s[0]; ++n)
    for (size_t z = 0; z < d; ++z)
      for (size_t y = 0; y < h; ++y)
        for (size_t x = 0; x < w; ++x) {
          out[((n * d + z) * h + y) * w + x] = target[((n * s[1] + z * f + half) * s[2] + y * f + half) * s[3] + x * f + half];
        }
  return out;
}

Result<MultiLoss> deep_supervision_loss(const std::vector<Tensor>& outputs, const std::vector<uint8_t>& target, unsigned threads, const LossAllReduce& across) {
  if (outputs.empty()) return fail(ErrorCode::kInvalidArgument, "loss: no outputs");
  const std::vector<double> w = deep_supervision_weights(outputs.size());
  const auto& s = outputs[0].shape;
  MultiLoss r;
  for (size_t j = 0; j < outputs.size(); ++j) {
    const size_t f = size_t{1} << j;
    if (outputs[j].shape[2] * f != s[2] || outputs[j].shape[3] * f != s[3] || outputs[j].shape[4] * f != s[4]) {
      return fail(ErrorCode::kInvalidArgument, "loss: output " + std::to_string(j) + " is " + outputs[j].shape_text() + ", not 1/" + std::to_string(f) + " of " +
                                                   outputs[0].shape_text());
    }
    if (w[j] == 0) {
      r.dlogits.emplace_back(outputs[j].shape);
      continue;
    }
    auto l = dice_ce_loss(outputs[j], j == 0 ? target : downsample_target(target, {s[0], s[2], s[3], s[4]}, j), 1e-5, threads, 1.0, across);
    if (!l) return std::unexpected(l.error());
    r.loss += w[j] * l->loss;
    if (j == 0) {
      r.cross_entropy = l->cross_entropy;
      r.dice = l->dice;
    }
    for (auto& g : l->dlogits.data) g = static_cast<float>(g * w[j]);
    r.dlogits.push_back(std::move(l->dlogits));
  }
  return r;
}

Result<TrainingLog> train_unet(UNet& net, const std::vector<const ct::Prepared*>& train, const std::vector<const ct::Prepared*>& validation,
                               const TrainerOptions& o, const TrainProgress& progress, TrainState* state) {
  const UNetConfig& mc = net.config();
  if (mc.in_channels != 2 || mc.classes != 2) return fail(ErrorCode::kInvalidArgument, "train: the model must take 2 channels (image, vesselness) and give 2 classes");
  if (train.empty() || validation.empty()) return fail(ErrorCode::kInvalidArgument, "train: no training or no validation case");
  const size_t f = size_t{1} << (mc.levels - 1);
  if (o.patch == 0 || o.patch % f != 0) return fail(ErrorCode::kInvalidArgument, "train: a patch of " + std::to_string(o.patch) + " is not a multiple of " + std::to_string(f));
  if (o.batch == 0 || o.steps == 0) return fail(ErrorCode::kInvalidArgument, "train: batch and steps must be positive");
  Collective* const comm = o.collective;
  const size_t ranks = comm != nullptr ? static_cast<size_t>(comm->size()) : 1, rank = comm != nullptr ? static_cast<size_t>(comm->rank()) : 0;
  if (o.batch < ranks) return fail(ErrorCode::kInvalidArgument, "train: a global batch of " + std::to_string(o.batch) + " cannot be shared by " + std::to_string(ranks) + " ranks");
  if (o.validation_patches < ranks) {
    return fail(ErrorCode::kInvalidArgument, "train: " + std::to_string(o.validation_patches) + " validation patches cannot be shared by " + std::to_string(ranks) + " ranks");
  }
  auto tr = PatchSource::create(train, o);
  if (!tr) return std::unexpected(tr.error());
  auto va = make_samplers(validation, false, o);
  if (!va) return std::unexpected(va.error());

  const size_t P = o.patch, m = P * P * P;
  std::vector<float> params = net.parameters();
  if (comm != nullptr) {
    TRESOR_TRY(comm->broadcast(params, 0));
    TRESOR_TRY(net.set_parameters(params));
  }
  Tensor vx;
  std::vector<uint8_t> vy;
  build_validation(*va, o, vx, vy, rank, ranks);
  auto validate = [&]() -> Result<double> {
    auto logits = net.forward(vx, o.threads);
    if (!logits) return std::unexpected(logits.error());
    std::array<double, 3> c = dice_counts(*logits, vy);
    if (comm != nullptr) TRESOR_TRY(comm->all_reduce_sum(std::span<double>(c)));
    return dice_from_counts(c);
  };
  TrainingLog log;
  auto d0 = validate();
  if (!d0) return std::unexpected(d0.error());
  TrainState local;
  TrainState& st = state != nullptr ? *state : local;
  log.val_dice.push_back({st.step, *d0});
  Sgd& sgd = st.sgd;
  AdamW& adam = st.adam;
  adam.weight_decay = o.weight_decay;
  sgd.weight_decay = o.weight_decay;
  // This rank's share of the global batch: slots [lo, hi).
  const size_t lo = o.batch * rank / ranks, hi = o.batch * (rank + 1) / ranks;
  Tensor x({hi - lo, 2, P, P, P});
  std::vector<uint8_t> y((hi - lo) * m);
  std::vector<float> grads(params.size());
  LossAllReduce across;
  if (comm != nullptr) across = [comm](std::span<double> stats) { return comm->all_reduce_sum(stats); };
  const size_t end = o.stop_after == 0 ? o.steps : std::min(o.stop_after, o.steps);
  for (size_t step = st.step; step < end; ++step) {
    tr->fill_step(step, lo, hi, x, y);
    auto outs = net.forward_outputs(x, o.threads);
    if (!outs) return std::unexpected(outs.error());
    auto loss = deep_supervision_loss(*outs, y, o.threads, across);
    if (!loss) return std::unexpected(loss.error());
    if (comm != nullptr) {
      OverlappedAllReduce reducer(*comm, grads, o.bucket_elements);
      TRESOR_TRY(net.backward_outputs_into(loss->dlogits, grads, o.threads, [&](size_t at, size_t n) { reducer.ready(at, n); }));
      TRESOR_TRY(reducer.finish());
    } else {
      TRESOR_TRY(net.backward_outputs_into(loss->dlogits, grads, o.threads));
    }
    const double lr = poly_lr(o.lr, step, o.steps);
    auto stepped = o.adamw ? adam.step(params, grads, lr) : sgd.step(params, grads, lr);
    if (!stepped) return std::unexpected(stepped.error());
    TRESOR_TRY(net.set_parameters(params));
    TRESOR_TRY(record_step(step, end, loss->loss, o, st, log, validate, progress));
  }
  return log;
}

Result<void> record_step(size_t step, size_t end, double loss, const TrainerOptions& o, TrainState& st, TrainingLog& log,
                         const std::function<Result<double>()>& validate, const TrainProgress& progress) {
  st.step = step + 1;
  log.loss.push_back(loss);
  double dice = -1;
  if ((step + 1) % o.validate_every == 0 || step + 1 == end) {
    auto d = validate();
    if (!d) return std::unexpected(d.error());
    dice = *d;
    log.val_dice.push_back({step + 1, dice});
  }
  if (progress) progress(step + 1, loss, dice);
  return {};
}

namespace {

// Little-endian fields (docs/training.md §7).
void put_u32(Bytes& b, uint32_t v) {
  for (int i = 0; i < 4; ++i) b.push_back(static_cast<std::byte>(v >> (8 * i)));
}
void put_u64(Bytes& b, uint64_t v) {
  for (int i = 0; i < 8; ++i) b.push_back(static_cast<std::byte>(v >> (8 * i)));
}
void put_floats(Bytes& b, const std::vector<float>& v, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    uint32_t u = 0;
    const float f = i < v.size() ? v[i] : 0.0f;
    std::memcpy(&u, &f, 4);
    put_u32(b, u);
  }
}
constexpr char kMagic[8] = {'T', 'R', 'E', 'S', 'O', 'R', 'C', 'K'};

}  // namespace

Bytes checkpoint_bytes(const UNet& net, const TrainState& state, bool adamw, size_t patch) {
  Bytes b(reinterpret_cast<const std::byte*>(kMagic), reinterpret_cast<const std::byte*>(kMagic) + 8);
  put_u32(b, 2);
  put_u64(b, state.step);
  const UNetConfig& c = net.config();
  for (size_t v : {c.levels, c.base_channels, c.max_channels, c.in_channels, c.classes}) put_u32(b, static_cast<uint32_t>(v));
  put_u32(b, c.deep_supervision ? 1 : 0);  // flags (version 2): bit 0 deep supervision
  put_u32(b, static_cast<uint32_t>(patch));  // the training patch (version 2)
  put_u32(b, adamw ? 1 : 0);
  put_u64(b, state.adam.t);
  const std::vector<float> p = net.parameters();
  put_u64(b, p.size());
  put_floats(b, p, p.size());
  put_floats(b, adamw ? state.adam.m : state.sgd.velocity, p.size());
  put_floats(b, adamw ? state.adam.v : std::vector<float>{}, p.size());
  return b;
}

Result<Checkpoint> parse_checkpoint(ByteSpan b) {
  size_t at = 0;
  auto need = [&](size_t n, const char* what) -> Result<void> {
    if (b.size() - at < n) return fail(ErrorCode::kMalformed, std::string("checkpoint: truncated in ") + what);
    return {};
  };
  auto u32 = [&]() {
    uint32_t v = 0;
    for (int i = 0; i < 4; ++i) v |= static_cast<uint32_t>(b[at++]) << (8 * i);
    return v;
  };
  auto u64 = [&]() {
    uint64_t v = 0;
    for (int i = 0; i < 8; ++i) v |= static_cast<uint64_t>(b[at++]) << (8 * i);
    return v;
  };
  TRESOR_TRY(need(8 + 4 + 8 + 20 + 4 + 8 + 8, "the header"));
  if (std::memcmp(b.data(), kMagic, 8) != 0) return fail(ErrorCode::kMalformed, "checkpoint: not a Tresor checkpoint (magic)");
  at = 8;
  const uint32_t version = u32();
  if (version != 1 && version != 2) return fail(ErrorCode::kMalformed, "checkpoint: version " + std::to_string(version) + ", this build reads 1 and 2");
  Checkpoint c;
  c.state.step = u64();
  c.config.levels = u32();
  c.config.base_channels = u32();
  c.config.max_channels = u32();
  c.config.in_channels = u32();
  c.config.classes = u32();
  if (version >= 2) {
    TRESOR_TRY(need(4 + 4 + 4 + 8 + 8, "the header"));
    const uint32_t flags = u32();
    if ((flags & ~1u) != 0) return fail(ErrorCode::kMalformed, "checkpoint: unknown flags " + std::to_string(flags));
    c.config.deep_supervision = (flags & 1) != 0;
    c.patch = u32();
  }
  const uint32_t opt = u32();
  if (opt > 1) return fail(ErrorCode::kMalformed, "checkpoint: optimizer " + std::to_string(opt) + " is not 0 (SGD) or 1 (AdamW)");
  c.adamw = opt == 1;
  c.state.adam.t = u64();
  const uint64_t n = u64();
  // The model's size is computed, not built: a damaged or hostile header cannot make this
  // allocate more than the file's own size.
  auto expect = UNet::count_parameters(c.config);
  if (!expect) return fail(ErrorCode::kMalformed, "checkpoint: its model configuration is invalid: " + expect.error().message);
  if (n != *expect) return fail(ErrorCode::kMalformed, "checkpoint: " + std::to_string(n) + " parameters for a model of " + std::to_string(*expect));
  TRESOR_TRY(need(12 * n, "the parameters and optimizer state"));
  auto floats = [&](std::vector<float>& v) {
    v.resize(n);
    for (auto& f : v) {
      const uint32_t u = u32();
      std::memcpy(&f, &u, 4);
    }
  };
  floats(c.parameters);
  std::vector<float> s1, s2;
  floats(s1);
  floats(s2);
  // Weights or moments that are not finite would only poison training: refused, named.
  for (auto [v, what] : {std::pair{&c.parameters, "parameter"}, {&s1, "optimizer state (first) value"}, {&s2, "optimizer state (second) value"}}) {
    for (size_t i = 0; i < v->size(); ++i) {
      if (!std::isfinite((*v)[i])) return fail(ErrorCode::kMalformed, std::string("checkpoint: ") + what + " " + std::to_string(i) + " is not finite");
    }
  }
  if (at != b.size()) return fail(ErrorCode::kMalformed, "checkpoint: " + std::to_string(b.size() - at) + " bytes after the end");
  if (c.adamw) {
    c.state.adam.m = std::move(s1);
    c.state.adam.v = std::move(s2);
  } else {
    c.state.sgd.velocity = std::move(s1);
  }
  return c;
}

}  // namespace tresor::train
