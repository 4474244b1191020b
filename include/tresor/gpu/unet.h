// tresor/gpu/unet.h — the 3D U-Net's training step on a CUDA device (issue 9): the network of
// tresor/train/unet.h (nnU-Net's PlainConvUNet, which specifies it) run over the device-pointer
// layers of tresor/gpu/train.h, with Backend::kEmulated running the same orchestration on the
// kernels' CPU emulation (host memory standing in for device memory), so that the buffer layout,
// the layer order, the skip connections and the parameter offsets are tested on every machine.
//
// Memory: the parameters as fp32 master weights (parameters()' flat layout, the CPU UNet's, so
// checkpoints are interchangeable), the bf16 copy the convolutions read (refreshed by each
// optimizer step), the flat gradient, the optimizer's state (created zeroed at its first step).
// Activations kept for backward, gradient scratch and the kernels' scratch are allocated for an
// input shape at its first forward and reused until the shape changes. Device memory is zeroed
// before it is freed (training data is patient data); the emulation's host buffers likewise.
//
// Numerics: every convolution reads bf16 operands and accumulates in fp32 (see train.h), the
// norm, loss and optimizers are the reference's expressions; so logits and gradients match the
// CPU UNet within a bf16 bound amplified through the network's depth (tests/kernels/
// unet_gpu_test.cc derives and measures it), and an optimizer step on the same gradient matches
// Sgd/AdamW's to the bit.
//
// Deep supervision (UNetConfig::deep_supervision): the CPU UNet's extra heads, in its flat layout
// (after the main head, j = 1 first), and the loss of tresor::train::deep_supervision_loss
// (nnU-Net's weights, targets downsampled nearest-exact, each output's gradient scaled by its
// weight, the weight-0 head left with zero gradients).
//
// Data parallelism: loss_statistics / backward_from_statistics split the loss where ranks sum
// its statistics (docs/training.md §5); the flat gradient is then read and replaced
// (gradients / set_gradients, through host memory) or reduced in place on the device
// (device_gradients on stream(), e.g. by NCCL).
#pragma once

#include <array>
#include <span>

#include <cstdint>
#include <memory>
#include <vector>

#include "tresor/error.h"
#include "tresor/gpu/train.h"
#include "tresor/train/layers.h"
#include "tresor/train/unet.h"

namespace tresor::gpu::train {

class GpuUNet {
 public:
  /// The network of `cpu_net` (its configuration, its current parameters) on `where`: a device
  /// (kUnavailable without CUDA or without a device of compute capability 8.0 or newer) or the
  /// emulation. kInvalidArgument for a configuration whose layout this class does not know.
  [[nodiscard]] static Result<GpuUNet> create(const tresor::train::UNet& cpu_net, Where where);

  GpuUNet(GpuUNet&&) noexcept;
  GpuUNet& operator=(GpuUNet&&) noexcept;
  ~GpuUNet();

  const tresor::train::UNetConfig& config() const;
  Where where() const;
  size_t parameter_count() const;

  /// Logits [n, classes, d, h, w] for x [n, in_channels, d, h, w] (d, h, w multiples of
  /// 2^(levels−1)), as UNet::forward; keeps the activations for loss_and_backward. A new input
  /// shape reallocates the activations. kInvalidArgument names the field as UNet::forward does.
  [[nodiscard]] Result<tresor::train::Tensor> forward(const tresor::train::Tensor& x);
  /// forward without the copy of the logits to the host: they stay on the device for
  /// loss_statistics / loss_and_backward (the training step needs nothing else). Same checks.
  [[nodiscard]] Result<void> forward_keep(const tresor::train::Tensor& x);
  /// dice_ce_loss (train.h) of the last forward's logits against `target` (n·d·h·w classes),
  /// then the backward pass: the flat gradient (parameters()' layout, overwritten) stays on the
  /// device for the next optimizer step; gradients() reads it. kInvalidArgument before any
  /// forward ("backward before forward") or for targets of the wrong size or class.
  /// With deep supervision: tresor::train::deep_supervision_loss (loss is the weighted sum;
  /// cross_entropy and dice are the full-resolution output's). loss_statistics then
  /// backward_from_statistics, nothing in between.
  [[nodiscard]] Result<LossValues> loss_and_backward(const std::vector<uint8_t>& target, double smooth = 1e-5, double dice_weight = 1.0);
  /// How many outputs the loss sees: 1, or levels − 1 with deep supervision.
  size_t outputs() const;

  /// The input and target buffers for a batch of shape x_shape [n, in_channels, d, h, w] (checked
  /// as forward checks it), in device memory (host memory on the emulation): x holds
  /// n·in_channels·d·h·w floats, target n·d·h·w classes (each < classes: not checked). Allocated
  /// as forward allocates (a new shape reallocates; earlier pointers are then invalid); valid
  /// until the next forward, device_batch of another shape, or the end of this object. Work that
  /// writes them must be queued on stream() (or finished) before forward_device.
  struct DeviceBatch {
    float* x = nullptr;
    uint8_t* target = nullptr;
  };
  [[nodiscard]] Result<DeviceBatch> device_batch(const std::array<size_t, 5>& x_shape);
  /// forward on device_batch's input, queued on stream(); the logits stay on the device (no copy
  /// to the host). kInvalidArgument without device_batch, or after forward has overwritten it.
  [[nodiscard]] Result<void> forward_device();
  /// loss_statistics with device_batch's target (nothing uploaded; deep supervision's smaller
  /// targets made from it on the device). kInvalidArgument without forward_device on the last
  /// forward.
  [[nodiscard]] Result<std::vector<double>> loss_statistics_device();
  /// The first half, for data parallelism: checks and uploads `target` (and its downsampled
  /// copies), runs the deep-supervision heads, and returns the loss statistics of every output of
  /// nonzero weight (full resolution first), concatenated, each 2·classes doubles in
  /// tresor::train::dice_ce_loss's LossAllReduce layout [Σ CE, voxels, Σp·g per foreground class,
  /// Σp + Σg per foreground class]. Errors as loss_and_backward's.
  [[nodiscard]] Result<std::vector<double>> loss_statistics(const std::vector<uint8_t>& target);
  /// The second half: the logits' gradients from `stats` — loss_statistics' vector, or the
  /// element-wise sum of every rank's (the loss of the global batch; each rank's logit gradient is
  /// its slice of it) — then the backward pass, as loss_and_backward. kInvalidArgument without a
  /// loss_statistics on the last forward, or for a vector of another length.
  [[nodiscard]] Result<LossValues> backward_from_statistics(std::span<const double> stats, double smooth = 1e-5, double dice_weight = 1.0);

  /// One optimizer step over the flat parameters with the last gradient, in one launch, refreshing
  /// the bf16 copy; the state (velocity; m, v and the step count) lives on the device. Defaults
  /// are the reference's (tresor::train::Sgd, AdamW). kInvalidArgument before any backward.
  [[nodiscard]] Result<void> sgd_step(double lr, double momentum = 0.99, double weight_decay = 3e-5, bool nesterov = true);
  [[nodiscard]] Result<void> adamw_step(double lr, double beta1 = 0.9, double beta2 = 0.999, double eps = 1e-8, double weight_decay = 0.01);

  /// The fp32 master parameters, UNet::parameters()' layout (UNet::set_parameters takes them).
  [[nodiscard]] Result<std::vector<float>> parameters() const;
  /// Replaces the parameters (and their bf16 copy); kInvalidArgument for a wrong count.
  [[nodiscard]] Result<void> set_parameters(const std::vector<float>& flat);
  /// The last loss_and_backward's flat gradient.
  [[nodiscard]] Result<std::vector<float>> gradients() const;
  /// Replaces it (the data-parallel sum over ranks, through host memory) before an optimizer
  /// step; kInvalidArgument before any backward pass or for a wrong count.
  [[nodiscard]] Result<void> set_gradients(const std::vector<float>& flat);
  /// The flat gradient in place: parameter_count() floats of device memory (host memory on the
  /// emulation), owned by this object and valid while it lives, written by the backward pass on
  /// stream(). Work queued on stream() after backward (an all-reduce) is ordered before the next
  /// optimizer step, which runs on the same stream.
  float* device_gradients();
  DeviceStream stream() const;
  /// The optimizers' state, as the reference's structs hold it (for checkpoints): velocity
  /// (empty before the first SGD step); m, v (empty before the first AdamW step) and t. The
  /// hyperparameters are left as `into` has them. The setters load such a state (sizes checked;
  /// empty vectors: start from zero).
  [[nodiscard]] Result<void> sgd_state(tresor::train::Sgd& into) const;
  [[nodiscard]] Result<void> adamw_state(tresor::train::AdamW& into) const;
  [[nodiscard]] Result<void> set_sgd_state(const tresor::train::Sgd& from);
  [[nodiscard]] Result<void> set_adamw_state(const tresor::train::AdamW& from);

 private:
  struct Impl;
  explicit GpuUNet(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace tresor::gpu::train
