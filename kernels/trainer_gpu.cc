// The training loop with the step on the GPU (include/tresor/gpu/trainer.h): train_unet's loop
// (core/train/trainer.cc) around GpuUNet.
#include "tresor/gpu/trainer.h"

#include "tresor/gpu/unet.h"

namespace tresor::gpu::train {

namespace tt = tresor::train;

Result<tt::TrainingLog> train_unet_gpu(tt::UNet& net, const std::vector<const tresor::ct::Prepared*>& train,
                                       const std::vector<const tresor::ct::Prepared*>& validation, const tt::TrainerOptions& o, Where where,
                                       const tt::TrainProgress& progress, tt::TrainState* state) {
  const tt::UNetConfig& mc = net.config();
  if (mc.in_channels != 2 || mc.classes != 2) return fail(ErrorCode::kInvalidArgument, "train: the model must take 2 channels (image, vesselness) and give 2 classes");
  if (train.empty() || validation.empty()) return fail(ErrorCode::kInvalidArgument, "train: no training or no validation case");
  const size_t f = size_t{1} << (mc.levels - 1);
  if (o.patch == 0 || o.patch % f != 0) return fail(ErrorCode::kInvalidArgument, "train: a patch of " + std::to_string(o.patch) + " is not a multiple of " + std::to_string(f));
  if (o.batch == 0 || o.steps == 0) return fail(ErrorCode::kInvalidArgument, "train: batch and steps must be positive");
  if (o.collective != nullptr) return fail(ErrorCode::kInvalidArgument, "train: data-parallel training on GPUs is not wired yet (NCCL is built; the GPU loop runs one rank)");
  auto source = tt::PatchSource::create(train, o);
  if (!source) return std::unexpected(source.error());
  auto vb = tt::validation_batch(validation, o);
  if (!vb) return std::unexpected(vb.error());
  auto g = GpuUNet::create(net, where);
  if (!g) return std::unexpected(g.error());

  tt::TrainState local;
  tt::TrainState& st = state != nullptr ? *state : local;
  st.adam.weight_decay = o.weight_decay;
  st.sgd.weight_decay = o.weight_decay;
  // A resumed run continues with its optimizer state.
  if (o.adamw) {
    TRESOR_TRY(g->set_adamw_state(st.adam));
  } else {
    TRESOR_TRY(g->set_sgd_state(st.sgd));
  }
  auto validate = [&]() -> Result<double> {
    auto logits = g->forward(vb->first);
    if (!logits) return std::unexpected(logits.error());
    return tt::dice_of_prediction(*logits, vb->second);
  };
  tt::TrainingLog log;
  auto d0 = validate();
  if (!d0) return std::unexpected(d0.error());
  log.val_dice.push_back({st.step, *d0});
  const size_t P = o.patch;
  tt::Tensor x({o.batch, 2, P, P, P});
  std::vector<uint8_t> y(o.batch * P * P * P);
  const size_t end = o.stop_after == 0 ? o.steps : std::min(o.stop_after, o.steps);
  for (size_t step = st.step; step < end; ++step) {
    source->fill_step(step, 0, o.batch, x, y);
    auto logits = g->forward(x);
    if (!logits) return std::unexpected(logits.error());
    auto loss = g->loss_and_backward(y);
    if (!loss) return std::unexpected(loss.error());
    const double lr = tt::poly_lr(o.lr, step, o.steps);
    if (o.adamw) {
      TRESOR_TRY(g->adamw_step(lr, st.adam.beta1, st.adam.beta2, st.adam.eps, st.adam.weight_decay));
    } else {
      TRESOR_TRY(g->sgd_step(lr, st.sgd.momentum, st.sgd.weight_decay, st.sgd.nesterov));
    }
    st.step = step + 1;
    log.loss.push_back(loss->loss);
    double dice = -1;
    if ((step + 1) % o.validate_every == 0 || step + 1 == end) {
      auto d = validate();
      if (!d) return std::unexpected(d.error());
      dice = *d;
      log.val_dice.push_back({step + 1, dice});
    }
    if (progress) progress(step + 1, loss->loss, dice);
  }
  auto params = g->parameters();
  if (!params) return std::unexpected(params.error());
  TRESOR_TRY(net.set_parameters(*params));
  if (o.adamw) {
    TRESOR_TRY(g->adamw_state(st.adam));
  } else {
    TRESOR_TRY(g->sgd_state(st.sgd));
  }
  return log;
}

}  // namespace tresor::gpu::train
