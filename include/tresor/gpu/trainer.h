// tresor/gpu/trainer.h — train_unet (tresor/train/trainer.h) with the training step on a GPU
// (GpuUNet, tresor/gpu/unet.h): the same patches (PatchSource), schedule, optimizers, validation
// and state, so checkpoints move freely between the CPU and the GPU trainer. On
// Backend::kEmulated the step runs the kernels' CPU emulation (slow; what tests use here).
//
// Deep supervision (UNetConfig::deep_supervision) and data parallelism (TrainerOptions::collective)
// as the CPU trainer's (docs/training.md §4, §5): rank 0's parameters broadcast, contiguous shares
// of each global batch, the loss statistics summed over the ranks before the gradient is formed,
// the flat gradient summed, validation Dice counts summed. The gradient's sum goes through host
// memory and the CPU collective, or, given a DeviceCollective (NCCL, tresor/gpu/nccl.h), in place
// on the device. The weights then match a single-rank run's up to the order of floating-point
// additions (tests/kernels/trainer_gpu_test.cc measures it on the emulation; the NCCL path has
// not run on a GPU yet).
//
// Batches from the GPU data loader (DeviceDataset, tresor/gpu/loader.h): given one, each step's
// batch is assembled in the network's own input and target buffers on its stream
// (GpuUNet::device_batch), so the training patches never pass through host memory; the loader's
// batches are PatchSource's to the bit, so the run's weights and losses are those of the run
// without it (tests/kernels/trainer_gpu_test.cc, on the emulation). Validation stays on the host.
#pragma once

#include <string>
#include <vector>

// Before the headers that open tresor::gpu::train: loader.h names tresor::train as train::.
#include "tresor/gpu/loader.h"
#include "tresor/gpu/nccl.h"
#include "tresor/gpu/train.h"
#include "tresor/train/trainer.h"

namespace tresor::gpu::train {

/// As tresor::train::train_unet, the step on `where`. At the end (and with `state`) the CPU
/// network `net` holds the trained parameters and `state` the optimizer's. kInvalidArgument as
/// train_unet (a global batch or validation set smaller than the ranks included); kUnavailable
/// without a usable device.
///
/// `device_collective` (nullable; every rank passes one or none): the gradient all-reduce on the
/// device, queued on the network's stream. It needs options.collective as well (the same ranks:
/// the statistics, the broadcast and the validation counts travel there), the same rank and size,
/// and, on a device, the same device (kInvalidArgument otherwise). On Backend::kEmulated its
/// pointers are host memory (a test double over a CPU collective can stand in for NCCL).
///
/// `dataset` (nullable): the training cases in device memory, loaded with these `options` (its
/// batches follow the options it was loaded with: patch, batch, seed, foreground and vesselness
/// settings must be these), in place of `train`, which is then not read (pass it empty). Its
/// channel device must be `where`'s: cuda_device(where.device) on Backend::kDevice, a host-memory
/// device (emulated_device(), cpu_device()) on Backend::kEmulated. kInvalidArgument for another
/// device or patch size.
[[nodiscard]] Result<tresor::train::TrainingLog> train_unet_gpu(tresor::train::UNet& net, const std::vector<const tresor::ct::Prepared*>& train,
                                                                const std::vector<const tresor::ct::Prepared*>& validation,
                                                                const tresor::train::TrainerOptions& options, Where where,
                                                                const tresor::train::TrainProgress& progress = {}, tresor::train::TrainState* state = nullptr,
                                                                DeviceCollective* device_collective = nullptr, const DeviceDataset* dataset = nullptr);

/// What `tresor bench train` measures on a GPU (docs/benchmarks.md), in one run: the bf16 matrix
/// peak (cuBLAS GEMM, n = 8192, bf16 inputs, fp32 accumulation), one 3×3×3 convolution's forward
/// and backward (data and weight) through Tresor's kernels, and GpuUNet's whole step (forward,
/// loss and backward, AdamW) on random data. kUnavailable without CUDA or a usable device.
struct GpuTrainFigures {
  std::string device_name;
  double gemm_bf16_tflops = 0;
  double conv_s = 0, conv_tflops = 0;
  double step_s = 0, first_loss = 0, last_loss = 0;
};
[[nodiscard]] Result<GpuTrainFigures> bench_train_device(int device, const tresor::train::UNetConfig& model, size_t batch, size_t patch, size_t conv_channels,
                                                         size_t conv_size, size_t steps);

}  // namespace tresor::gpu::train
