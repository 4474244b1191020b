// tresor/train/layers.h — the 3D U-Net's layers, CPU reference (issue 9, docs/training.md): each
// with forward and backward, multi-threaded, float storage and double accumulation. These are the
// definitions the CUDA kernels are tested against; they are themselves tested against PyTorch
// (Debian's python3-torch, float64) and finite differences.
//
// Tensors are NCDHW (batch, channels, depth z, height y, width x), x fastest, as PyTorch's.
#pragma once

#include <array>
#include <cstddef>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "tresor/error.h"

namespace tresor::train {

struct Tensor {
  std::array<size_t, 5> shape{0, 0, 0, 0, 0};  // n, c, d, h, w
  std::vector<float> data;

  Tensor() = default;
  explicit Tensor(std::array<size_t, 5> s, float fill = 0) : shape(s), data(s[0] * s[1] * s[2] * s[3] * s[4], fill) {}
  size_t size() const { return shape[0] * shape[1] * shape[2] * shape[3] * shape[4]; }
  size_t spatial() const { return shape[2] * shape[3] * shape[4]; }
  std::string shape_text() const;
};

/// A 3D convolution with a cubic kernel: weight [cout, cin, k, k, k], bias [cout]; zero padding
/// `pad` on every side, `stride` on every axis (PyTorch's Conv3d with those arguments).
struct Conv3d {
  size_t cin = 0, cout = 0, k = 3, stride = 1, pad = 1;
  std::vector<float> weight, bias;

  /// The output's spatial size for an input of `n` voxels along an axis: ⌊(n + 2·pad − k)/stride⌋ + 1.
  size_t out_size(size_t n) const { return (n + 2 * pad - k) / stride + 1; }
  /// kInvalidArgument names the mismatch: channels, a kernel larger than the padded input, sizes
  /// of weight or bias.
  [[nodiscard]] Result<Tensor> forward(const Tensor& x, unsigned threads = 0) const;
  /// From the output's gradient `dy`: the input's gradient, and the weight's and bias's
  /// gradients added into `dweight`, `dbias` (sized like weight and bias; accumulate over calls).
  [[nodiscard]] Result<Tensor> backward(const Tensor& x, const Tensor& dy, std::vector<float>& dweight, std::vector<float>& dbias, unsigned threads = 0) const;
};

/// A transposed 3D convolution (the U-Net's upsampling; nnU-Net uses k = stride = 2): weight
/// [cin, cout, k, k, k] (PyTorch's ConvTranspose3d layout), bias [cout]; input voxel i feeds
/// outputs i·stride − pad + tap; output size (n − 1)·stride − 2·pad + k.
struct ConvTranspose3d {
  size_t cin = 0, cout = 0, k = 2, stride = 2, pad = 0;
  std::vector<float> weight, bias;

  size_t out_size(size_t n) const { return (n - 1) * stride + k - 2 * pad; }
  [[nodiscard]] Result<Tensor> forward(const Tensor& x, unsigned threads = 0) const;
  [[nodiscard]] Result<Tensor> backward(const Tensor& x, const Tensor& dy, std::vector<float>& dweight, std::vector<float>& dbias, unsigned threads = 0) const;
};

/// Channel concatenation (the U-Net's skip connections) and its backward, the split.
[[nodiscard]] Result<Tensor> concat_channels(const Tensor& a, const Tensor& b);
[[nodiscard]] Result<std::pair<Tensor, Tensor>> split_channels(const Tensor& d, size_t channels_a);

/// Instance normalisation over each (sample, channel) with affine γ, β, then leaky ReLU:
/// y = lrelu(γ·(x − μ)/√(σ² + eps) + β), σ² the biased variance (PyTorch's InstanceNorm3d with
/// affine=True followed by LeakyReLU, nnU-Net's eps 1e-5 and slope 0.01).
struct InstanceNormLeakyRelu {
  size_t channels = 0;
  double eps = 1e-5, slope = 0.01;
  std::vector<float> gamma, beta;

  [[nodiscard]] Result<Tensor> forward(const Tensor& x, unsigned threads = 0) const;
  [[nodiscard]] Result<Tensor> backward(const Tensor& x, const Tensor& dy, std::vector<float>& dgamma, std::vector<float>& dbeta, unsigned threads = 0) const;
};

/// nnU-Net's training loss on logits [n, classes, d, h, w] and integer targets [n, 1, d, h, w]:
/// cross-entropy (mean over voxels) plus soft Dice loss: softmax p; per foreground class c ≥ 1,
/// over the whole batch, dice_c = (2·Σ p·g + smooth) / (Σ p + Σ g + smooth), smooth 1e-5; loss =
/// CE − mean_c dice_c (nnU-Net's DC_and_CE_loss with batch Dice and no background). Returns the
/// loss and the logits' gradient.
struct LossResult {
  double loss = 0, cross_entropy = 0, dice = 0;  // dice: the mean soft Dice of the classes
  Tensor dlogits;
};
/// `dice_weight` scales the Dice term (0: cross-entropy alone).
///
/// Data parallelism: the loss is defined over the global batch, split across ranks. `across`, when
/// given, sums a vector of statistics over the ranks in place (every rank calls it once, with the
/// same length): the cross-entropy's sum and voxel count, and per foreground class Σp·g and
/// Σp + Σg. Each rank then returns the global loss and its own slice of the global batch's
/// gradient, so the sum of the ranks' parameter gradients is the single-rank gradient of the whole
/// batch (nnU-Net gathers the batch Dice's terms across ranks in the same way).
using LossAllReduce = std::function<Result<void>(std::span<double>)>;
[[nodiscard]] Result<LossResult> dice_ce_loss(const Tensor& logits, const std::vector<uint8_t>& target, double smooth = 1e-5, unsigned threads = 0,
                                              double dice_weight = 1.0, const LossAllReduce& across = {});

/// The optimizers, over one flat parameter vector and its gradient (PyTorch's definitions):
///  SGD (nnU-Net: lr 0.01, momentum 0.99, Nesterov, weight decay 3e-5):
///    g += wd·p; v = μ·v + g; p −= lr·(g + μ·v) with Nesterov, lr·v without;
///  AdamW: p −= lr·wd·p; m = β1·m + (1−β1)·g; v = β2·v + (1−β2)·g²;
///    p −= lr·(m/(1−β1^t)) / (√(v/(1−β2^t)) + eps).
/// One call is one step over all parameters (the CUDA version is one launch).
struct Sgd {
  double momentum = 0.99, weight_decay = 3e-5;
  bool nesterov = true;
  std::vector<float> velocity;
  [[nodiscard]] Result<void> step(std::vector<float>& params, const std::vector<float>& grads, double lr);
};
struct AdamW {
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.01;
  std::vector<float> m, v;
  uint64_t t = 0;
  [[nodiscard]] Result<void> step(std::vector<float>& params, const std::vector<float>& grads, double lr);
};
/// nnU-Net's poly schedule: lr0·(1 − step/steps)^0.9.
[[nodiscard]] double poly_lr(double lr0, uint64_t step, uint64_t steps);

}  // namespace tresor::train
