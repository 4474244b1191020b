// tresor/gpu/trainer.h — train_unet (tresor/train/trainer.h) with the training step on a GPU
// (GpuUNet, tresor/gpu/unet.h): the same patches (PatchSource), schedule, optimizers, validation
// and state, so checkpoints move freely between the CPU and the GPU trainer. On
// Backend::kEmulated the step runs the kernels' CPU emulation (slow; what tests use here).
//
// Not yet: data parallelism on GPUs (NCCL is built, tresor/gpu/nccl.h, but not wired into this
// loop) and deep supervision (GpuUNet refuses it).
#pragma once

#include <vector>

#include "tresor/gpu/train.h"
#include "tresor/train/trainer.h"

namespace tresor::gpu::train {

/// As tresor::train::train_unet, the step on `where`. At the end (and with `state`) the CPU
/// network `net` holds the trained parameters and `state` the optimizer's. kInvalidArgument as
/// train_unet, and for options.collective (not supported on the GPU yet) or deep supervision;
/// kUnavailable without a usable device.
[[nodiscard]] Result<tresor::train::TrainingLog> train_unet_gpu(tresor::train::UNet& net, const std::vector<const tresor::ct::Prepared*>& train,
                                                                const std::vector<const tresor::ct::Prepared*>& validation,
                                                                const tresor::train::TrainerOptions& options, Where where,
                                                                const tresor::train::TrainProgress& progress = {}, tresor::train::TrainState* state = nullptr);

}  // namespace tresor::gpu::train
