// tresor/train/unet.h — the 3D U-Net (issue 9, docs/training.md §4), nnU-Net's PlainConvUNet:
// encoder stages of two [3×3×3 conv → instance norm → leaky ReLU] blocks (the first conv of every
// stage but the first with stride 2), channels base·2^s capped at max_channels; decoder stages of
// a 2×2×2 transposed conv, concatenation (upsampled, skip), two blocks; a 1×1×1 head to the class
// logits. CPU reference: forward keeps what backward needs.
#pragma once

#include <cstdint>
#include <functional>
#include <span>
#include <vector>

#include "tresor/train/layers.h"

namespace tresor::train {

struct UNetConfig {
  size_t levels = 4;          // encoder stages (levels − 1 downsamplings)
  size_t base_channels = 32;
  size_t max_channels = 320;
  size_t in_channels = 1;
  size_t classes = 2;
  /// nnU-Net's deep supervision: 1×1×1 heads also on the decoder stages below the top one, giving
  /// logits at 1/2, 1/4, … of the input's resolution (docs/training.md §4). Needs levels ≥ 3.
  bool deep_supervision = false;
};

class UNet {
 public:
  /// Weights by He (Kaiming) normal initialisation with slope 0.01 as nnU-Net's InitWeights_He,
  /// biases 0, γ 1, β 0; deterministic in `seed`. kInvalidArgument for levels < 1, zero channels
  /// or fewer than 2 classes.
  [[nodiscard]] static Result<UNet> create(const UNetConfig& config, uint64_t seed);

  const UNetConfig& config() const { return config_; }
  size_t parameter_count() const;
  /// The parameter count of a model of `config`, without building it (a checkpoint's claim is
  /// checked before anything is allocated): kInvalidArgument as create, or beyond 2^40.
  [[nodiscard]] static Result<size_t> count_parameters(const UNetConfig& config);
  /// All parameters as one vector, in a fixed order: encoder stages (per block: conv weight,
  /// conv bias, γ, β), decoder stages from the deepest (transposed conv weight and bias, then its
  /// blocks), the head. set_parameters takes the same layout.
  std::vector<float> parameters() const;
  [[nodiscard]] Result<void> set_parameters(const std::vector<float>& flat);

  /// Logits [n, classes, d, h, w] for x [n, in_channels, d, h, w]; d, h, w must be multiples of
  /// 2^(levels−1). Keeps the activations for backward.
  [[nodiscard]] Result<Tensor> forward(const Tensor& x, unsigned threads = 0);
  /// Every output: [0] the logits at full resolution, then with deep supervision the logits at
  /// 1/2^j of it for j = 1 … levels − 2 (from the decoder stage at that resolution).
  [[nodiscard]] Result<std::vector<Tensor>> forward_outputs(const Tensor& x, unsigned threads = 0);
  /// How many outputs forward_outputs gives: 1, or levels − 1 with deep supervision.
  size_t outputs() const { return 1 + ds_heads_.size(); }
  /// The parameters' gradient (parameters()'s layout) for the logits' gradient of the last forward.
  [[nodiscard]] Result<std::vector<float>> backward(const Tensor& dlogits, unsigned threads = 0);
  /// The same into `grads` (parameter_count() values, overwritten); `ready(offset, count)` is
  /// called, on this thread, as soon as each parameter array's gradient is final — in reverse
  /// layer order, the head's first — so that data-parallel training can reduce those gradients
  /// while the rest of the backward pass runs (the order is the same on every rank).
  using GradientReady = std::function<void(size_t offset, size_t count)>;
  [[nodiscard]] Result<void> backward_into(const Tensor& dlogits, std::span<float> grads, unsigned threads = 0, const GradientReady& ready = {});
  /// The same from the gradients of every output of forward_outputs (outputs() tensors; with
  /// only the first, the deep-supervision heads get zero gradients).
  [[nodiscard]] Result<void> backward_outputs_into(std::span<const Tensor> dlogits, std::span<float> grads, unsigned threads = 0, const GradientReady& ready = {});

 private:
  struct Block {
    Conv3d conv;
    InstanceNormLeakyRelu norm;
    Tensor in, pre;  // the conv's input and output (the norm's input)
  };
  struct Stage {
    ConvTranspose3d up;  // decoder stages only
    Tensor up_in;
    size_t skip_channels = 0;
    Block blocks[2];
    Tensor out;
  };
  template <typename F>
  void each_parameter_array(F&& f);
  /// Where each parameter array starts in the flat layout, keyed by its address.
  size_t offset_of(const std::vector<float>& array);
  UNetConfig config_;
  std::vector<Stage> encoder_, decoder_;  // decoder_[0] is the deepest
  Conv3d head_;
  Tensor head_in_;
  std::vector<Conv3d> ds_heads_;  // [j − 1]: the head of the output at 1/2^j
};

}  // namespace tresor::train
