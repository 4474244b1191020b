// Training the U-Net on preprocessed CT, CPU reference (include/tresor/train/trainer.h,
// docs/training.md §6).
#include "tresor/train/trainer.h"

#include <memory>

namespace tresor::train {
namespace {

struct CaseSampler {
  const ct::Prepared* p;
  std::unique_ptr<ct::PatchSampler> sampler;
};

// Patches `first`… of a case into batch slots [slot, slot + count): channel 0 the augmented
// image patch, channel 1 the vesselness at the same voxels (corner and flips as drawn), target 1
// where the label is the foreground label.
void fill(const CaseSampler& c, uint64_t seed, uint64_t index, size_t slot, const TrainerOptions& o, Tensor& x, std::vector<uint8_t>& y) {
  const size_t P = o.patch, m = P * P * P;
  const ct::Patch patch = c.sampler->sample(seed, index);
  for (size_t z = 0; z < P; ++z)
    for (size_t yy = 0; yy < P; ++yy)
      for (size_t xx = 0; xx < P; ++xx) {
        const size_t i = patch.image.index(xx, yy, z);
        const size_t sx = patch.corner[0] + (patch.flipped[0] ? P - 1 - xx : xx);
        const size_t sy = patch.corner[1] + (patch.flipped[1] ? P - 1 - yy : yy);
        const size_t sz = patch.corner[2] + (patch.flipped[2] ? P - 1 - z : z);
        x.data[(slot * 2 + 0) * m + i] = patch.image.data[i];
        x.data[(slot * 2 + 1) * m + i] = c.p->vesselness.at(sx, sy, sz) * static_cast<float>(o.vesselness_scale);
        y[slot * m + i] = patch.labels.data[i] == o.foreground_label ? 1 : 0;
      }
}

}  // namespace

double dice_of_prediction(const Tensor& logits, const std::vector<uint8_t>& target) {
  const size_t m = logits.spatial();
  double inter = 0, pred = 0, truth = 0;
  for (size_t n = 0; n < logits.shape[0]; ++n)
    for (size_t i = 0; i < m; ++i) {
      const bool p = logits.data[(n * logits.shape[1] + 1) * m + i] > logits.data[(n * logits.shape[1] + 0) * m + i];
      const bool g = target[n * m + i] != 0;
      inter += p && g ? 1 : 0;
      pred += p ? 1 : 0;
      truth += g ? 1 : 0;
    }
  return pred + truth == 0 ? 1.0 : 2 * inter / (pred + truth);
}

Result<TrainingLog> train_unet(UNet& net, const std::vector<const ct::Prepared*>& train, const std::vector<const ct::Prepared*>& validation,
                               const TrainerOptions& o, const TrainProgress& progress) {
  const UNetConfig& mc = net.config();
  if (mc.in_channels != 2 || mc.classes != 2) return fail(ErrorCode::kInvalidArgument, "train: the model must take 2 channels (image, vesselness) and give 2 classes");
  if (train.empty() || validation.empty()) return fail(ErrorCode::kInvalidArgument, "train: no training or no validation case");
  const size_t f = size_t{1} << (mc.levels - 1);
  if (o.patch == 0 || o.patch % f != 0) return fail(ErrorCode::kInvalidArgument, "train: a patch of " + std::to_string(o.patch) + " is not a multiple of " + std::to_string(f));
  if (o.batch == 0 || o.steps == 0) return fail(ErrorCode::kInvalidArgument, "train: batch and steps must be positive");
  auto samplers = [&](const std::vector<const ct::Prepared*>& cases, bool augment) -> Result<std::vector<CaseSampler>> {
    std::vector<CaseSampler> out;
    for (size_t i = 0; i < cases.size(); ++i) {
      if (!cases[i]->labels) return fail(ErrorCode::kInvalidArgument, "train: case " + std::to_string(i) + " has no labels");
      ct::AugmentOptions a;
      a.patch = {o.patch, o.patch, o.patch};
      a.foreground_label = o.foreground_label;
      a.foreground_fraction = augment ? o.foreground_fraction : 1.0;
      if (!augment) a.flip_probability = a.intensity_probability = a.noise_probability = 0;
      auto s = ct::PatchSampler::create(cases[i]->image, *cases[i]->labels, a);
      if (!s) return fail(s.error().code, "train: case " + std::to_string(i) + ": " + s.error().message);
      out.push_back({cases[i], std::make_unique<ct::PatchSampler>(std::move(*s))});
    }
    return out;
  };
  auto tr = samplers(train, true);
  if (!tr) return std::unexpected(tr.error());
  auto va = samplers(validation, false);
  if (!va) return std::unexpected(va.error());

  const size_t P = o.patch, m = P * P * P;
  // The validation set: fixed patches centred on foreground, round-robin over the cases.
  Tensor vx({o.validation_patches, 2, P, P, P});
  std::vector<uint8_t> vy(o.validation_patches * m);
  for (size_t i = 0; i < o.validation_patches; ++i) fill((*va)[i % va->size()], o.seed ^ 0x5A5A5A5Aull, i, i, o, vx, vy);
  auto validate = [&]() -> Result<double> {
    auto logits = net.forward(vx, o.threads);
    if (!logits) return std::unexpected(logits.error());
    return dice_of_prediction(*logits, vy);
  };
  TrainingLog log;
  auto d0 = validate();
  if (!d0) return std::unexpected(d0.error());
  log.val_dice.push_back({0, *d0});
  std::vector<float> params = net.parameters();
  Sgd sgd;
  AdamW adam;
  adam.weight_decay = o.weight_decay;
  sgd.weight_decay = o.weight_decay;
  Tensor x({o.batch, 2, P, P, P});
  std::vector<uint8_t> y(o.batch * m);
  for (size_t step = 0; step < o.steps; ++step) {
    for (size_t b = 0; b < o.batch; ++b) fill((*tr)[(step * o.batch + b) % tr->size()], o.seed, step * o.batch + b, b, o, x, y);
    auto logits = net.forward(x, o.threads);
    if (!logits) return std::unexpected(logits.error());
    auto loss = dice_ce_loss(*logits, y, 1e-5, o.threads);
    if (!loss) return std::unexpected(loss.error());
    auto grads = net.backward(loss->dlogits, o.threads);
    if (!grads) return std::unexpected(grads.error());
    const double lr = poly_lr(o.lr, step, o.steps);
    auto stepped = o.adamw ? adam.step(params, *grads, lr) : sgd.step(params, *grads, lr);
    if (!stepped) return std::unexpected(stepped.error());
    TRESOR_TRY(net.set_parameters(params));
    log.loss.push_back(loss->loss);
    double dice = -1;
    if ((step + 1) % o.validate_every == 0 || step + 1 == o.steps) {
      auto d = validate();
      if (!d) return std::unexpected(d.error());
      dice = *d;
      log.val_dice.push_back({step + 1, dice});
    }
    if (progress) progress(step + 1, loss->loss, dice);
  }
  return log;
}

}  // namespace tresor::train
