// tresor/gpu/train.h — the 3D U-Net's training layers on a CUDA device (kernels/train.cu, issue 9):
// the same definitions as the CPU reference tresor/train/layers.h, which specifies them.
//
//  - convolutions (Conv3d k = 3 pad 1 or k = 1 pad 0, stride 1 or 2; ConvTranspose3d k = stride
//    = 2 pad 0): forward, backward data, backward weight + bias, as implicit GEMMs on the tensor
//    cores (WMMA bf16 16×16×16, fp32 accumulation): operands rounded to bf16 (weights from the
//    optimizer's bf16 copy; activations and gradients float, rounded as they are read);
//  - instance norm fused with leaky ReLU, forward and backward (float storage, double statistics);
//  - softmax + cross-entropy + batch soft Dice in one pass (value and the logits' gradient), or in
//    two (the statistics, then the gradient from statistics summed over data-parallel ranks);
//  - SGD (Nesterov) and AdamW over the whole flat parameter vector in one launch, fp32 master
//    weights, writing the bf16 copy the convolutions read.
//
// Deterministic: no atomics. Weight gradients are split-K partials (the split a function of the
// shape only) summed in split order; the bias gradient, the norm's statistics and the loss's sums
// are per-thread strided partials reduced by a fixed pairwise tree in double. So two runs on the
// same device give the same bits; the bias gradient and the whole instance norm (forward and
// backward) equal the CPU emulation's to the bit (the loss's sums go through the device's exp and
// log, within an ulp of the host's).
//
// How far from the reference (tests/kernels/train_gpu_test.cc checks it, emulation and device):
//  - convolutions: per output |Δ| ≤ (2^-7 + 2^-16 + K·2^-22)·Σ_k |a_k·b_k| (bf16 keeps 8
//    significant bits: relative error ≤ 2^-8 per rounded operand, so ≤ 2^-7 + 2^-16 per product,
//    which fp32 holds exactly; fp32 sums of K terms: ≤ K·2^-24 of Σ|terms| with round to nearest,
//    4× that allowed for the tensor cores' truncation); in practice about 2e-3 of the output's
//    scale;
//  - norm, loss: the reference's double expressions in another summation order: a few float ulps;
//  - optimizers: the reference's double expressions unfused: the same floats to the bit.
//
// Every entry that needs a device returns kUnavailable without one (no CUDA in this build, no
// device, compute capability below 8.0); the argument checks come first and name the field.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "tresor/error.h"
#include "tresor/train/layers.h"

namespace tresor::gpu::train {

using tresor::train::Tensor;

/// Where a host-tensor entry runs: the CUDA device, or the kernels' CPU emulation (the same
/// per-element code from kernels/train.cuh run element by element with bf16-rounded operands and
/// float accumulation; slow, for tests on every machine).
enum class Backend { kDevice, kEmulated };
struct Where {
  Backend backend = Backend::kDevice;
  int device = 0;
};

/// True when `device` can run the kernels (compute capability 8.0 or newer); false when this
/// build has CUDA but no such device; kUnavailable without CUDA or without any usable device.
[[nodiscard]] Result<bool> available(int device = 0);

// ------------------------------------------------------------------------------------------------
// Host tensors in, host tensors out (device copies inside, every device buffer zeroed before it is
// freed). Same signatures and accumulation rules as the reference's members: backward adds into
// dweight/dbias (dgamma/dbeta), sized like the parameters. kInvalidArgument names the field.

[[nodiscard]] Result<Tensor> conv3d_forward(const tresor::train::Conv3d& layer, const Tensor& x, Where where = {});
[[nodiscard]] Result<Tensor> conv3d_backward(const tresor::train::Conv3d& layer, const Tensor& x, const Tensor& dy, std::vector<float>& dweight,
                                             std::vector<float>& dbias, Where where = {});
[[nodiscard]] Result<Tensor> conv_transpose3d_forward(const tresor::train::ConvTranspose3d& layer, const Tensor& x, Where where = {});
[[nodiscard]] Result<Tensor> conv_transpose3d_backward(const tresor::train::ConvTranspose3d& layer, const Tensor& x, const Tensor& dy,
                                                       std::vector<float>& dweight, std::vector<float>& dbias, Where where = {});
[[nodiscard]] Result<Tensor> norm_lrelu_forward(const tresor::train::InstanceNormLeakyRelu& layer, const Tensor& x, Where where = {});
[[nodiscard]] Result<Tensor> norm_lrelu_backward(const tresor::train::InstanceNormLeakyRelu& layer, const Tensor& x, const Tensor& dy,
                                                 std::vector<float>& dgamma, std::vector<float>& dbeta, Where where = {});
/// dice_ce_loss's definition; at most kMaxClasses (16) classes.
[[nodiscard]] Result<tresor::train::LossResult> dice_ce_loss(const Tensor& logits, const std::vector<uint8_t>& target, double smooth = 1e-5,
                                                             double dice_weight = 1.0, Where where = {});
/// One optimizer step over the flat parameters (the optimizer's state is used and updated as the
/// reference's step does, created zeroed when empty); `bf16` (nullable) receives the updated
/// parameters rounded to bf16 (round to nearest, ties to even).
[[nodiscard]] Result<void> sgd_step(tresor::train::Sgd& opt, std::vector<float>& params, const std::vector<float>& grads, double lr,
                                    std::vector<uint16_t>* bf16 = nullptr, Where where = {});
[[nodiscard]] Result<void> adamw_step(tresor::train::AdamW& opt, std::vector<float>& params, const std::vector<float>& grads, double lr,
                                      std::vector<uint16_t>* bf16 = nullptr, Where where = {});

// ------------------------------------------------------------------------------------------------
// Device memory in, device memory out: the trainer's API. Work is queued on `stream` of `device`
// (a cudaStream_t as void*; nullptr = the legacy default stream) and is complete only when the
// caller synchronises, except dice_ce_loss_device, which waits for its sums. Every pointer is
// device memory of that device, float unless said otherwise; weights are bf16 bit patterns.
// The checks come first (kInvalidArgument naming the field), then kUnavailable for CUDA failures.
//
// With `backend` = kEmulated every pointer is host memory and each call runs the kernels' CPU
// emulation (the host-tensor entries' kEmulated path) before it returns; `device` and `stream`
// are ignored. Orchestration written against this API (tresor/gpu/unet.h) is thereby tested on
// machines without a GPU.

struct DeviceStream {
  int device = 0;
  void* stream = nullptr;
  Backend backend = Backend::kDevice;
};

/// A convolution: input n×cin×d×h×w, weight as the reference's layer (Conv3d [cout][cin][k³],
/// transposed [cin][cout][k³]); output n×cout×out(d)×out(h)×out(w).
struct ConvShape {
  size_t n = 0, cin = 0, cout = 0, d = 0, h = 0, w = 0;
  size_t k = 3, stride = 1, pad = 1;
  bool transposed = false;
};
/// The shape of `layer` applied to an input of shape x (the checks as conv3d_forward's).
[[nodiscard]] Result<ConvShape> conv_shape(const tresor::train::Conv3d& layer, const std::array<size_t, 5>& x);
[[nodiscard]] Result<ConvShape> conv_shape(const tresor::train::ConvTranspose3d& layer, const std::array<size_t, 5>& x);

/// y = conv(x; w) + bias.
[[nodiscard]] Result<void> conv_forward_device(DeviceStream s, const ConvShape& shape, const float* d_x, const uint16_t* d_w, const float* d_bias, float* d_y);
/// dx = the input's gradient (overwritten).
[[nodiscard]] Result<void> conv_backward_data_device(DeviceStream s, const ConvShape& shape, const float* d_dy, const uint16_t* d_w, float* d_dx);
/// Scratch bytes conv_backward_weight_device needs for `shape` (the split-K partials).
[[nodiscard]] Result<size_t> conv_backward_weight_scratch(const ConvShape& shape);
/// dweight += ∂L/∂w (float, the weight's layout), dbias += ∂L/∂b; d_scratch of at least
/// conv_backward_weight_scratch(shape) bytes.
[[nodiscard]] Result<void> conv_backward_weight_device(DeviceStream s, const ConvShape& shape, const float* d_x, const float* d_dy, float* d_dweight,
                                                       float* d_dbias, void* d_scratch, size_t scratch_bytes);

struct NormShape {
  size_t n = 0, channels = 0, spatial = 0;
  double eps = 1e-5, slope = 0.01;
};
[[nodiscard]] Result<void> norm_lrelu_forward_device(DeviceStream s, const NormShape& shape, const float* d_x, const float* d_gamma, const float* d_beta,
                                                     float* d_y);
/// Scratch bytes for norm_lrelu_backward_device (per-plane sums).
[[nodiscard]] size_t norm_lrelu_backward_scratch(const NormShape& shape);
/// d_dx (overwritten), d_dgamma/d_dbeta += the parameters' gradients.
[[nodiscard]] Result<void> norm_lrelu_backward_device(DeviceStream s, const NormShape& shape, const float* d_x, const float* d_dy, const float* d_gamma,
                                                      const float* d_beta, float* d_dx, float* d_dgamma, float* d_dbeta, void* d_scratch,
                                                      size_t scratch_bytes);

struct LossShape {
  size_t n = 0, classes = 0, spatial = 0;
};
struct LossValues {
  double loss = 0, cross_entropy = 0, dice = 0;
};
[[nodiscard]] Result<size_t> dice_ce_loss_scratch(const LossShape& shape);
/// The loss of logits (n×classes×spatial) against uint8 targets (n×spatial, each < classes; not
/// checked on the device: a larger one reads outside the softmax), d_dlogits overwritten; waits
/// for the stream to return the values.
[[nodiscard]] Result<LossValues> dice_ce_loss_device(DeviceStream s, const LossShape& shape, const float* d_logits, const uint8_t* d_target,
                                                     double smooth, double dice_weight, float* d_dlogits, void* d_scratch, size_t scratch_bytes);

/// The same loss in two halves, for data parallelism (docs/training.md §5: the statistics are
/// summed over the ranks before the Dice and the gradient are formed). The statistics pass returns
/// dice_ce_loss's LossAllReduce layout, 2·classes doubles: [Σ CE, voxels, Σp·g per foreground
/// class, Σp + Σg per foreground class] (waits for the stream). The gradient pass takes such a
/// vector — this call's, or the sum of every rank's — and writes d_dlogits = scale · ∂loss/∂logits
/// of the loss over all the voxels it counts (scale: deep supervision's weight; 1 = the fused
/// entry's bits); it queues the work and returns the loss values the statistics define. Both use
/// d_scratch as dice_ce_loss_device does; stats[1] must be a whole number ≥ this call's n·spatial.
[[nodiscard]] Result<std::vector<double>> dice_ce_loss_stats_device(DeviceStream s, const LossShape& shape, const float* d_logits, const uint8_t* d_target,
                                                                   void* d_scratch, size_t scratch_bytes);
[[nodiscard]] Result<LossValues> dice_ce_loss_grad_device(DeviceStream s, const LossShape& shape, const float* d_logits, const uint8_t* d_target,
                                                          std::span<const double> stats, double smooth, double dice_weight, double scale, float* d_dlogits,
                                                          void* d_scratch, size_t scratch_bytes);

/// One step over `count` parameters; d_bf16 nullable.
[[nodiscard]] Result<void> sgd_step_device(DeviceStream s, size_t count, float* d_params, const float* d_grads, float* d_velocity, uint16_t* d_bf16,
                                           double lr, double momentum, double weight_decay, bool nesterov);
/// `step` is the step number t ≥ 1 after this step (the reference increments it first).
[[nodiscard]] Result<void> adamw_step_device(DeviceStream s, size_t count, float* d_params, const float* d_grads, float* d_m, float* d_v, uint16_t* d_bf16,
                                             double lr, double beta1, double beta2, double eps, double weight_decay, uint64_t step);

/// The glue between layers. copy_channels_device: for every sample b < n and channel c <
/// channels, dst[b][dst_first + c][·] = src[b][src_first + c][·] (`spatial` floats per channel;
/// src has src_channels channels per sample, dst dst_channels): the concatenation's halves and
/// the split of its gradient. One copy per sample (cudaMemcpyAsync, device to device).
struct ChannelCopy {
  size_t n = 0, channels = 0, spatial = 0;
  size_t src_channels = 0, src_first = 0;
  size_t dst_channels = 0, dst_first = 0;
};
[[nodiscard]] Result<void> copy_channels_device(DeviceStream s, const ChannelCopy& copy, const float* d_src, float* d_dst);
/// d_y[i] += d_x[i] for i < count (a skip connection's gradient added into the encoder's).
[[nodiscard]] Result<void> add_device(DeviceStream s, size_t count, const float* d_x, float* d_y);
/// Deep supervision's targets at 1/2^j of the resolution: d_out (n·(d/2^j)·(h/2^j)·(w/2^j)
/// classes) from d_in (n·d·h·w), nearest-exact exactly as tresor::train::downsample_target, so the
/// targets need not leave the device. kInvalidArgument for j = 0 or beyond 30, or d, h, w not
/// multiples of 2^j.
[[nodiscard]] Result<void> downsample_target_device(DeviceStream s, size_t n, size_t d, size_t h, size_t w, size_t j, const uint8_t* d_in, uint8_t* d_out);
/// Zeroes `bytes` bytes at d_p (a gradient before the backward pass accumulates into it).
[[nodiscard]] Result<void> zero_device(DeviceStream s, void* d_p, size_t bytes);

}  // namespace tresor::gpu::train
