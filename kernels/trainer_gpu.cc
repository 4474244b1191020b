// The training loop with the step on the GPU (include/tresor/gpu/trainer.h): train_unet's loop
// (core/train/trainer.cc) around GpuUNet, with its deep supervision and data parallelism.
//
// Data parallelism, as the CPU trainer's (docs/training.md §5): rank 0's parameters are broadcast
// first; rank r trains on slots [B·r/R, B·(r+1)/R) of each global batch (PatchSource::fill_step:
// the patches one rank would draw); the loss statistics of every output are summed over the ranks
// (one all-reduce of doubles through the CPU collective) before the gradient is formed, so that
// each rank's logit gradient is its slice of the global batch's; the flat gradient is then summed
// over the ranks — on the device by the DeviceCollective (NCCL) when one is given, otherwise
// through host memory by the CPU collective — and every rank takes the same optimizer step.
// Validation patches are dealt round-robin and their Dice counts summed.
//
// With a DeviceDataset, slots [lo, hi) of each step's batch are written by the loader straight
// into GpuUNet's input and target buffers (device_batch), queued on the network's stream, and the
// step runs on them (forward_device, loss_statistics_device); the rest of the step is unchanged.
#include "tresor/gpu/trainer.h"

#include <algorithm>
#include <array>
#include <optional>
#include <span>

#include "tresor/gpu/unet.h"

namespace tresor::gpu::train {

namespace tt = tresor::train;

namespace {

// Samples `pick` of x [n, c, ...] and their targets (m voxels each), in that order.
void take_samples(const tt::Tensor& x, const std::vector<uint8_t>& y, const std::vector<size_t>& pick, tt::Tensor& out_x, std::vector<uint8_t>& out_y) {
  const size_t per = x.size() / x.shape[0], m = y.size() / x.shape[0];
  out_x = tt::Tensor({pick.size(), x.shape[1], x.shape[2], x.shape[3], x.shape[4]});
  out_y.assign(pick.size() * m, 0);
  for (size_t k = 0; k < pick.size(); ++k) {
    std::copy_n(x.data.begin() + static_cast<std::ptrdiff_t>(pick[k] * per), per, out_x.data.begin() + static_cast<std::ptrdiff_t>(k * per));
    std::copy_n(y.begin() + static_cast<std::ptrdiff_t>(pick[k] * m), m, out_y.begin() + static_cast<std::ptrdiff_t>(k * m));
  }
}

}  // namespace

Result<tt::TrainingLog> train_unet_gpu(tt::UNet& net, const std::vector<const tresor::ct::Prepared*>& train,
                                       const std::vector<const tresor::ct::Prepared*>& validation, const tt::TrainerOptions& o, Where where,
                                       const tt::TrainProgress& progress, tt::TrainState* state, DeviceCollective* device_collective,
                                       const DeviceDataset* dataset) {
  const tt::UNetConfig& mc = net.config();
  if (mc.in_channels != 2 || mc.classes != 2) return fail(ErrorCode::kInvalidArgument, "train: the model must take 2 channels (image, vesselness) and give 2 classes");
  if ((dataset == nullptr ? train.empty() : dataset->cases() == 0) || validation.empty()) return fail(ErrorCode::kInvalidArgument, "train: no training or no validation case");
  const size_t f = size_t{1} << (mc.levels - 1);
  if (o.patch == 0 || o.patch % f != 0) return fail(ErrorCode::kInvalidArgument, "train: a patch of " + std::to_string(o.patch) + " is not a multiple of " + std::to_string(f));
  if (o.batch == 0 || o.steps == 0) return fail(ErrorCode::kInvalidArgument, "train: batch and steps must be positive");
  tt::Collective* const comm = o.collective;
  const size_t ranks = comm != nullptr ? static_cast<size_t>(comm->size()) : 1, rank = comm != nullptr ? static_cast<size_t>(comm->rank()) : 0;
  if (o.batch < ranks) return fail(ErrorCode::kInvalidArgument, "train: a global batch of " + std::to_string(o.batch) + " cannot be shared by " + std::to_string(ranks) + " ranks");
  if (o.validation_patches < ranks) {
    return fail(ErrorCode::kInvalidArgument, "train: " + std::to_string(o.validation_patches) + " validation patches cannot be shared by " + std::to_string(ranks) + " ranks");
  }
  if (device_collective != nullptr) {
    // The loss statistics (doubles), the broadcast and the validation counts go through the CPU
    // collective NCCL was bootstrapped from; only the gradient goes through the device's.
    if (comm == nullptr) return fail(ErrorCode::kInvalidArgument, "train: a device collective needs options.collective too (the ranks' CPU collective)");
    if (device_collective->rank() != comm->rank() || device_collective->size() != comm->size()) {
      return fail(ErrorCode::kInvalidArgument, "train: the device collective is rank " + std::to_string(device_collective->rank()) + " of " +
                                                   std::to_string(device_collective->size()) + ", the CPU collective rank " + std::to_string(comm->rank()) + " of " +
                                                   std::to_string(comm->size()));
    }
    if (device_collective->host_memory() != (where.backend == Backend::kEmulated)) {
      return fail(ErrorCode::kInvalidArgument, device_collective->host_memory()
                                                   ? "train: the device collective sums host memory, but training runs on a CUDA device"
                                                   : "train: the device collective (NCCL) needs CUDA device memory, but training runs on the emulation (host memory)");
    }
    if (where.backend == Backend::kDevice && device_collective->device() != where.device) {
      return fail(ErrorCode::kInvalidArgument, "train: the device collective is on device " + std::to_string(device_collective->device()) + ", training on device " +
                                                   std::to_string(where.device));
    }
  }
  if (dataset != nullptr) {
    if (dataset->patch() != o.patch) {
      return fail(ErrorCode::kInvalidArgument, "train: the device dataset was loaded for patches of " + std::to_string(dataset->patch()) + ", training uses " +
                                                   std::to_string(o.patch));
    }
    const ChannelDevice& dev = dataset->device();
    const bool same = where.backend == Backend::kEmulated ? dev.host_memory()
                                                           : !dev.host_memory() && dev.name().starts_with("cuda:" + std::to_string(where.device) + " ");
    if (!same) {
      return fail(ErrorCode::kInvalidArgument, "train: the device dataset is on " + dev.name() + ", training on " +
                                                   (where.backend == Backend::kEmulated ? std::string("the emulation") : "cuda:" + std::to_string(where.device)));
    }
  }
  std::optional<tt::PatchSource> source;
  if (dataset == nullptr) {
    auto s = tt::PatchSource::create(train, o);
    if (!s) return std::unexpected(s.error());
    source.emplace(std::move(*s));
  }
  auto vb = tt::validation_batch(validation, o);
  if (!vb) return std::unexpected(vb.error());
  // This rank's validation patches: r, r + R, … of the whole set (the patches the CPU trainer's
  // rank r builds).
  tt::Tensor vx;
  std::vector<uint8_t> vy;
  {
    std::vector<size_t> mine;
    for (size_t i = rank; i < o.validation_patches; i += ranks) mine.push_back(i);
    take_samples(vb->first, vb->second, mine, vx, vy);
  }
  if (comm != nullptr) {
    std::vector<float> params = net.parameters();
    TRESOR_TRY(comm->broadcast(params, 0));
    TRESOR_TRY(net.set_parameters(params));
  }
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
  const size_t P = o.patch;
  const size_t lo = o.batch * rank / ranks, hi = o.batch * (rank + 1) / ranks;
  // Validation in batches of this rank's training batch, the last one padded with zeros: the
  // network's buffers keep the training shape (another shape would wipe, free and reallocate every
  // activation twice per validation). A sample's logits do not depend on the others in its batch
  // (convolutions per column, instance norm per sample), and the counts are whole numbers, so the
  // Dice is the one of a single batch of all the patches.
  auto validate = [&]() -> Result<double> {
    std::array<double, 3> c{0, 0, 0};
    const size_t count = vx.shape[0], per = count == 0 ? 0 : vx.size() / count, m = count == 0 ? 0 : vy.size() / count;
    tt::Tensor bx({hi - lo, vx.shape[1], vx.shape[2], vx.shape[3], vx.shape[4]});
    for (size_t k0 = 0; k0 < count; k0 += hi - lo) {
      const size_t k = std::min(hi - lo, count - k0);
      std::fill(bx.data.begin(), bx.data.end(), 0.0f);
      std::copy_n(vx.data.begin() + static_cast<std::ptrdiff_t>(k0 * per), k * per, bx.data.begin());
      auto logits = g->forward(bx);
      if (!logits) return std::unexpected(logits.error());
      tt::Tensor lk({k, logits->shape[1], logits->shape[2], logits->shape[3], logits->shape[4]});
      std::copy_n(logits->data.begin(), lk.size(), lk.data.begin());
      const std::vector<uint8_t> yk(vy.begin() + static_cast<std::ptrdiff_t>(k0 * m), vy.begin() + static_cast<std::ptrdiff_t>((k0 + k) * m));
      const std::array<double, 3> ck = tt::dice_counts(lk, yk);
      for (size_t i = 0; i < 3; ++i) c[i] += ck[i];
    }
    if (comm != nullptr) TRESOR_TRY(comm->all_reduce_sum(std::span<double>(c)));
    return tt::dice_from_counts(c);
  };
  tt::TrainingLog log;
  auto d0 = validate();
  if (!d0) return std::unexpected(d0.error());
  log.val_dice.push_back({st.step, *d0});
  tt::Tensor x;
  std::vector<uint8_t> y;
  if (dataset == nullptr) {
    x = tt::Tensor({hi - lo, 2, P, P, P});
    y.assign((hi - lo) * P * P * P, 0);
  }
  const size_t end = o.stop_after == 0 ? o.steps : std::min(o.stop_after, o.steps);
  for (size_t step = st.step; step < end; ++step) {
    Result<std::vector<double>> stats;
    if (dataset != nullptr) {
      // Into the network's buffers, on its stream (device_batch's pointers: valid for this shape).
      auto b = g->device_batch({hi - lo, 2, P, P, P});
      if (!b) return std::unexpected(b.error());
      TRESOR_TRY(dataset->fill_step(step, lo, hi, b->x, b->target, g->stream().stream));
      TRESOR_TRY(g->forward_device());
      stats = g->loss_statistics_device();
    } else {
      source->fill_step(step, lo, hi, x, y);
      TRESOR_TRY(g->forward_keep(x));  // the loss needs the logits on the device only
      stats = g->loss_statistics(y);
    }
    if (!stats) return std::unexpected(stats.error());
    if (comm != nullptr) TRESOR_TRY(comm->all_reduce_sum(std::span<double>(*stats)));
    auto loss = g->backward_from_statistics(*stats);
    if (!loss) return std::unexpected(loss.error());
    if (device_collective != nullptr) {
      // In place on the device, queued on the network's stream before the optimizer step; waited
      // for with the collective's watch for a rank that died (a plain synchronisation would hang).
      TRESOR_TRY(device_collective->all_reduce_sum(g->device_gradients(), g->parameter_count(), g->stream().stream));
      TRESOR_TRY(device_collective->wait(g->stream().stream));
    } else if (comm != nullptr) {
      auto grads = g->gradients();
      if (!grads) return std::unexpected(grads.error());
      TRESOR_TRY(comm->all_reduce_sum(std::span<float>(*grads)));
      TRESOR_TRY(g->set_gradients(*grads));
    }
    const double lr = tt::poly_lr(o.lr, step, o.steps);
    if (o.adamw) {
      TRESOR_TRY(g->adamw_step(lr, st.adam.beta1, st.adam.beta2, st.adam.eps, st.adam.weight_decay));
    } else {
      TRESOR_TRY(g->sgd_step(lr, st.sgd.momentum, st.sgd.weight_decay, st.sgd.nesterov));
    }
    TRESOR_TRY(tt::record_step(step, end, loss->loss, o, st, log, validate, progress));
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
