// The U-Net's training step on the GPU layers (include/tresor/gpu/unet.h) against the CPU
// reference: tresor::train::UNet + dice_ce_loss + Sgd/AdamW (core/train, itself tested against
// PyTorch).
//
// Everywhere, on the kernels' CPU emulation (Backend::kEmulated: the device-pointer layers on host
// memory, running kernels/train.cuh's arithmetic): the orchestration — buffer layout, layer
// order, concat/split, skip gradients added into the encoder, the head, parameter and gradient
// offsets, the optimizers' state and the bf16 refresh — for two configurations, one of them an
// odd-sized single sample. Where a CUDA device exists (skipped with the reason elsewhere;
// scripts/gpu-check requires one): the same comparisons on the device, and two runs to the bit.
//
// Tolerances, and why.
//  - The orchestration is checked to the bit: GpuUNet's emulation equals the same network written
//    out in this test from the individually tested emulated layers (train.h's host-tensor entries,
//    train_gpu_test), in the CPU UNet's order, with the CPU's concat/split (composed_step). Any
//    wrong buffer, offset, order or missing skip gradient changes bits.
//  - Against the CPU UNet (float storage, double sums) the bound comes from bf16. A convolution
//    with bf16 operands (8 significant bits: relative error ≤ u = 2^-8 per rounded operand,
//    ≤ 2u + u² per product, exact in fp32) and fp32 sums is within (2^-7 + 2^-16 + K·2^-22)·Σ|a·b|
//    of the reference, ~2u = 8e-3 of the output's scale in practice (train_gpu_test observes
//    ~2e-3). Instance norm rescales every plane, so a relative error passes each block
//    unamplified and the layers' errors add along the path: L = 13 GEMMs from input to logits in
//    a 3-level net, ~√L·2u ≈ 3e-2 for independent errors, L·2u ≈ 0.1 at worst: kLogitTol = 1/16
//    (observed 1.1e-2 to 1.6e-2). The loss moves by ≤ 2/voxels per logit: within kLogitTol too
//    (observed ≤ 1.3e-3 relative).
//  - Gradients are not that well conditioned at initialisation: the norm's backward projects out
//    most of its incoming gradient (its mean and its correlation with x̂), so an error relative to
//    the incoming gradient is amplified in what is left, once per block. Measured while writing
//    this test: rounding only the CPU UNet's weights to bf16 (nothing else) moves the reference's
//    own per-array gradients by 2-30% (relative L2; encoder arrays worst). The emulation, which
//    also rounds activations and gradients, is off by 0.5% at the head, up to 56% for single
//    encoder arrays and 12-15% over the whole flat vector. Bounds: kFlatL2Tol = 1/4 over the
//    whole gradient (~1.7x the worst observed); kArrayL2Tol = 0.9 per array (1.6x; below 1, so an
//    array left at zero still fails, and another array's values or flipped signs give ≥ 1.4). The conv biases in front of a norm have gradient
//    zero in exact arithmetic (the norm removes the mean): |g| ≤ kZeroGradTol of their conv
//    weight's gradient scale (observed ≤ 4e-8).
//  - Optimizers: the GPU's step on its own gradient equals the reference Sgd/AdamW fed that
//    gradient, parameters and state to the bit, and the next step's gradient matches the CPU
//    UNet's at those same parameters within the bounds above (a stale bf16 copy would not).
//    The independent CPU trajectories are compared too, loosely: SGD (Nesterov, momentum μ) gives
//    p2 = p0 − lr·((1 + μ + μ²)·g1 + (1 + μ)·g2), so a gradient error e moves p2 by
//    ≤ lr·(2 + 2μ + μ²)·e, with e ≤ 2·max|g| (per element no better than the gradient's scale, see
//    above); AdamW normalises each element (|m̂/√v̂| ≤ R = 1.0013 for t ≤ 2, by Cauchy–Schwarz over
//    the bias-corrected moments), so a gradient that is noise on both sides — the biases above —
//    takes steps of ±lr with arbitrary signs: |Δp| ≤ 2·R·lr per step.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "support/test_support.h"
#include "tresor/gpu.h"
#include "tresor/gpu/train.h"
#include "tresor/gpu/unet.h"
#include "tresor/train/layers.h"
#include "tresor/train/trainer.h"
#include "tresor/train/unet.h"

namespace tresor {
namespace {

using gpu::train::Backend;
using gpu::train::GpuUNet;
using gpu::train::Where;
using train::Tensor;
using train::UNet;
using train::UNetConfig;

constexpr Where kEmulated{Backend::kEmulated, 0};
constexpr Where kDevice{Backend::kDevice, 0};

constexpr double kLogitTol = 1.0 / 16;     // of the logits' scale (and the loss, relative)
constexpr double kFlatL2Tol = 1.0 / 4;     // relative L2 error of the whole flat gradient
constexpr double kArrayL2Tol = 0.9;        // relative L2 error of each parameter array's
constexpr double kZeroGradTol = 1.0 / 256; // biases in front of a norm, of their weight's scale
constexpr double kLr = 0.01;
constexpr double kMomentum = 0.99;

struct NetCase {
  const char* name;
  UNetConfig config;
  std::array<size_t, 5> shape;
  uint64_t seed;
};

UNetConfig config3() {
  UNetConfig c;
  c.levels = 3;
  c.base_channels = 4;
  c.max_channels = 32;
  c.in_channels = 2;
  c.classes = 2;
  return c;
}

std::vector<NetCase> net_cases() {
  return {
      {"levels 3, base 4, 2 in, 2 classes, 2 × 16³", config3(), {2, 2, 16, 16, 16}, 11},
      {"levels 3, base 4, odd 1 × 8×16×24", config3(), {1, 2, 8, 16, 24}, 12},
  };
}

// Deep supervision: with 3 levels its one extra head has weight 0 (nnU-Net's lowest output: zero
// gradients, nothing else changes); with 4 levels two extra heads, weights (1, ½, 0)/1.5, and 3
// classes (two foreground Dice terms per output).
std::vector<NetCase> ds_cases() {
  UNetConfig d3 = config3();
  d3.deep_supervision = true;
  UNetConfig d4 = config3();
  d4.levels = 4;
  d4.classes = 3;
  d4.deep_supervision = true;
  return {
      {"deep supervision, levels 3 (its head of weight 0), 2 × 16³", d3, {2, 2, 16, 16, 16}, 21},
      {"deep supervision, levels 4, 3 classes, 2 × 16×16×24", d4, {2, 2, 16, 16, 24}, 22},
  };
}

Tensor random_input(const std::array<size_t, 5>& shape, uint64_t seed) {
  Tensor t(shape);
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (auto& v : t.data) v = nd(rng);
  return t;
}

// A target correlated with the first channel (so Dice is neither 0 nor 1), some voxels flipped;
// with 3 classes, class 2 where the second channel is high.
std::vector<uint8_t> make_target(const Tensor& x, uint64_t seed, size_t classes = 2) {
  const size_t n = x.shape[0], m = x.spatial(), c = x.shape[1];
  std::vector<uint8_t> t(n * m);
  std::mt19937_64 rng(seed);
  for (size_t b = 0; b < n; ++b)
    for (size_t i = 0; i < m; ++i) {
      t[b * m + i] = (x.data[b * c * m + i] > 0.8f) != (rng() % 10 == 0) ? 1 : 0;
      if (classes > 2 && x.data[(b * c + 1) * m + i] > 1.0f) t[b * m + i] = 2;
    }
  return t;
}

double max_abs(const std::vector<float>& v, size_t from = 0, size_t count = SIZE_MAX) {
  double m = 0;
  const size_t end = std::min(v.size(), count == SIZE_MAX ? v.size() : from + count);
  for (size_t i = from; i < end; ++i) m = std::max(m, std::fabs(static_cast<double>(v[i])));
  return m;
}

double max_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, std::fabs(static_cast<double>(a[i]) - b[i]));
  return m;
}

// The flat layout written out again from the configuration (UNet::parameters()' documented
// order), with each array's scale for the gradient comparison: its own largest reference value,
// or for a conv bias in front of an instance norm, its conv weight's.
struct ArrayInfo {
  std::string name;
  size_t offset, size;
  size_t scale_of;  // index of the array whose reference gradient gives the scale
};

std::vector<ArrayInfo> layout(const UNetConfig& c) {
  std::vector<ArrayInfo> a;
  size_t at = 0;
  auto add = [&](std::string name, size_t size, bool bias_before_norm) {
    const size_t self = a.size();
    a.push_back({std::move(name), at, size, bias_before_norm ? self - 1 : self});
    at += size;
  };
  auto width = [&](size_t s) { return std::min(c.base_channels << s, c.max_channels); };
  auto block = [&](const std::string& where, size_t cin, size_t cout) {
    add(where + " conv weight", cout * cin * 27, false);
    add(where + " conv bias", cout, true);
    add(where + " gamma", cout, false);
    add(where + " beta", cout, false);
  };
  size_t in = c.in_channels;
  for (size_t s = 0; s < c.levels; ++s) {
    block("encoder " + std::to_string(s) + " block 0", in, width(s));
    block("encoder " + std::to_string(s) + " block 1", width(s), width(s));
    in = width(s);
  }
  for (size_t s = c.levels - 1; s-- > 0;) {
    add("decoder " + std::to_string(s) + " up weight", width(s + 1) * width(s) * 8, false);
    add("decoder " + std::to_string(s) + " up bias", width(s), false);
    block("decoder " + std::to_string(s) + " block 0", 2 * width(s), width(s));
    block("decoder " + std::to_string(s) + " block 1", width(s), width(s));
  }
  add("head weight", c.classes * width(0), false);
  add("head bias", c.classes, false);
  if (c.deep_supervision) {
    for (size_t j = 1; j + 1 < c.levels; ++j) {
      add("deep supervision head " + std::to_string(j) + " weight", c.classes * width(j), false);
      add("deep supervision head " + std::to_string(j) + " bias", c.classes, false);
    }
  }
  return a;
}

// Against the CPU UNet: per parameter array, the relative L2 error ‖got − want‖/‖want‖ ≤
// kArrayL2Tol; over the whole flat gradient ≤ kFlatL2Tol; the conv biases in front of a norm
// (zero in exact arithmetic) within kZeroGradTol of their conv weight's gradient scale.
struct GradCheck {
  double worst_array = 0, flat = 0, worst_zero = 0;
  std::string where;
};
GradCheck check_gradient(const std::vector<ArrayInfo>& arrays, const std::vector<float>& got, const std::vector<float>& want, const std::string& what) {
  GradCheck r;
  EXPECT_EQ(got.size(), want.size()) << what;
  if (got.size() != want.size()) return r;
  double num_all = 0, den_all = 0;
  for (const auto& a : arrays) {
    double num = 0, den = 0;
    for (size_t i = a.offset; i < a.offset + a.size; ++i) {
      const double d = static_cast<double>(got[i]) - want[i];
      num += d * d;
      den += static_cast<double>(want[i]) * want[i];
    }
    num_all += num;
    den_all += den;
    if (a.scale_of != static_cast<size_t>(&a - arrays.data())) {
      const ArrayInfo& w = arrays[a.scale_of];
      const double scale = max_abs(want, w.offset, w.size);
      const double rel = max_abs(got, a.offset, a.size) / scale;
      r.worst_zero = std::max(r.worst_zero, rel);
      EXPECT_LE(rel, kZeroGradTol) << what << ": " << a.name << " (zero in exact arithmetic), against " << w.name << "'s scale " << scale;
      continue;
    }
    const double rel = std::sqrt(num / std::max(den, 1e-300));
    if (rel > r.worst_array) {
      r.worst_array = rel;
      r.where = a.name;
    }
    EXPECT_LE(rel, kArrayL2Tol) << what << ": " << a.name;
  }
  r.flat = std::sqrt(num_all / std::max(den_all, 1e-300));
  EXPECT_LE(r.flat, kFlatL2Tol) << what << ": the whole gradient";
  return r;
}

void report(const std::string& line) { std::printf("  %s\n", line.c_str()); }

struct Step {
  Tensor logits;
  double loss = 0, cross_entropy = 0, dice = 0;
  std::vector<float> grads;
};

// The CPU reference: UNet + dice_ce_loss, or with deep supervision forward_outputs +
// deep_supervision_loss + backward_outputs_into.
Step cpu_step(UNet& net, const Tensor& x, const std::vector<uint8_t>& target) {
  Step s;
  if (net.config().deep_supervision) {
    auto outs = net.forward_outputs(x);
    EXPECT_TRUE(outs) << outs.error().message;
    if (!outs) return s;
    auto loss = train::deep_supervision_loss(*outs, target);
    EXPECT_TRUE(loss) << loss.error().message;
    if (!loss) return s;
    s.logits = std::move(outs->front());
    s.loss = loss->loss;
    s.cross_entropy = loss->cross_entropy;
    s.dice = loss->dice;
    s.grads.assign(net.parameter_count(), 0.0f);
    auto g = net.backward_outputs_into(loss->dlogits, s.grads);
    EXPECT_TRUE(g) << g.error().message;
    return s;
  }
  auto logits = net.forward(x);
  EXPECT_TRUE(logits) << logits.error().message;
  if (!logits) return s;
  s.logits = std::move(*logits);
  auto loss = train::dice_ce_loss(s.logits, target);
  EXPECT_TRUE(loss) << loss.error().message;
  if (!loss) return s;
  s.loss = loss->loss;
  s.cross_entropy = loss->cross_entropy;
  s.dice = loss->dice;
  auto g = net.backward(loss->dlogits);
  EXPECT_TRUE(g) << g.error().message;
  if (g) s.grads = std::move(*g);
  return s;
}

Step gpu_step(GpuUNet& net, const Tensor& x, const std::vector<uint8_t>& target) {
  Step s;
  auto logits = net.forward(x);
  EXPECT_TRUE(logits) << logits.error().message;
  if (!logits) return s;
  s.logits = std::move(*logits);
  auto loss = net.loss_and_backward(target);
  EXPECT_TRUE(loss) << loss.error().message;
  if (!loss) return s;
  s.loss = loss->loss;
  s.cross_entropy = loss->cross_entropy;
  s.dice = loss->dice;
  auto g = net.gradients();
  EXPECT_TRUE(g) << g.error().message;
  if (g) s.grads = std::move(*g);
  return s;
}

// The same network written out again from the individually tested emulated layers (the
// host-tensor entries of tresor/gpu/train.h with kEmulated), in the CPU UNet's order, with the
// CPU's concat_channels/split_channels and a float add for the skip gradient: the same
// arithmetic in the same order, so GpuUNet's emulation must give these bits exactly.
Step composed_step(const UNetConfig& c, const std::vector<float>& p, const Tensor& x, const std::vector<uint8_t>& target) {
  Step out;
  const auto arrays = layout(c);
  size_t next = 0;
  std::vector<size_t> offsets;  // of the arrays as each layer takes them
  auto take = [&]() {
    const ArrayInfo& a = arrays[next++];
    offsets.push_back(a.offset);
    return std::vector<float>(p.begin() + static_cast<std::ptrdiff_t>(a.offset), p.begin() + static_cast<std::ptrdiff_t>(a.offset + a.size));
  };
  struct Block {
    train::Conv3d conv;
    train::InstanceNormLeakyRelu norm;
    size_t at = 0;  // index of its first array
    Tensor in, pre;
  };
  struct Stage {
    train::ConvTranspose3d up;
    size_t up_at = 0;
    Tensor up_in;
    Block blocks[2];
    Tensor out;
  };
  auto width = [&](size_t s) { return std::min(c.base_channels << s, c.max_channels); };
  auto block = [&](size_t cin, size_t cout, size_t stride) {
    Block b;
    b.at = next;
    b.conv.cin = cin;
    b.conv.cout = cout;
    b.conv.stride = stride;
    b.conv.weight = take();
    b.conv.bias = take();
    b.norm.channels = cout;
    b.norm.gamma = take();
    b.norm.beta = take();
    return b;
  };
  std::vector<Stage> enc, dec;
  size_t in = c.in_channels;
  for (size_t s = 0; s < c.levels; ++s) {
    Stage st;
    st.blocks[0] = block(in, width(s), s == 0 ? 1 : 2);
    st.blocks[1] = block(width(s), width(s), 1);
    enc.push_back(std::move(st));
    in = width(s);
  }
  for (size_t s = c.levels - 1; s-- > 0;) {
    Stage st;
    st.up_at = next;
    st.up.cin = width(s + 1);
    st.up.cout = width(s);
    st.up.weight = take();
    st.up.bias = take();
    st.blocks[0] = block(2 * width(s), width(s), 1);
    st.blocks[1] = block(width(s), width(s), 1);
    dec.push_back(std::move(st));
  }
  train::Conv3d head;
  const size_t head_at = next;
  head.cin = width(0);
  head.cout = c.classes;
  head.k = 1;
  head.pad = 0;
  head.weight = take();
  head.bias = take();
  std::vector<train::Conv3d> ds_heads;  // [j − 1]
  std::vector<size_t> ds_at;
  if (c.deep_supervision) {
    for (size_t j = 1; j + 1 < c.levels; ++j) {
      train::Conv3d h;
      ds_at.push_back(next);
      h.cin = width(j);
      h.cout = c.classes;
      h.k = 1;
      h.pad = 0;
      h.weight = take();
      h.bias = take();
      ds_heads.push_back(std::move(h));
    }
  }

  auto fwd = [](Block& b, const Tensor& t) {
    b.in = t;
    b.pre = *gpu::train::conv3d_forward(b.conv, t, kEmulated);
    return *gpu::train::norm_lrelu_forward(b.norm, b.pre, kEmulated);
  };
  Tensor cur = x;
  for (auto& st : enc) {
    for (auto& b : st.blocks) cur = fwd(b, cur);
    st.out = cur;
  }
  for (size_t i = 0; i < dec.size(); ++i) {
    dec[i].up_in = cur;
    const Tensor up = *gpu::train::conv_transpose3d_forward(dec[i].up, cur, kEmulated);
    cur = *train::concat_channels(up, enc[enc.size() - 2 - i].out);
    for (auto& b : dec[i].blocks) cur = fwd(b, cur);
    dec[i].out = cur;
  }
  const Tensor head_in = cur;
  out.logits = *gpu::train::conv3d_forward(head, head_in, kEmulated);
  auto loss = gpu::train::dice_ce_loss(out.logits, target, 1e-5, 1.0, kEmulated);
  out.loss = loss->loss;
  out.cross_entropy = loss->cross_entropy;
  out.dice = loss->dice;
  // Deep supervision: every output of nonzero weight through the two-pass loss (the emulated
  // device-pointer entries on host memory), its gradient scaled by its weight; the main output's
  // loss and gradient likewise (scale 1 on one output gives the fused entry's bits, checked above
  // for the plain nets).
  const std::vector<double> w = train::deep_supervision_weights(1 + ds_heads.size());
  std::vector<Tensor> ds_dlogits(ds_heads.size());
  if (!ds_heads.empty()) {
    const gpu::train::DeviceStream emu{0, nullptr, Backend::kEmulated};
    out.loss = 0;
    for (size_t j = 0; j < w.size(); ++j) {
      if (w[j] == 0) continue;
      const Tensor logits_j = j == 0 ? out.logits : *gpu::train::conv3d_forward(ds_heads[j - 1], dec[dec.size() - 1 - j].out, kEmulated);
      const auto t = j == 0 ? target : train::downsample_target(target, {x.shape[0], x.shape[2], x.shape[3], x.shape[4]}, j);
      const gpu::train::LossShape ls{logits_j.shape[0], logits_j.shape[1], logits_j.spatial()};
      std::vector<std::byte> scratch(*gpu::train::dice_ce_loss_scratch(ls));
      auto stats = gpu::train::dice_ce_loss_stats_device(emu, ls, logits_j.data.data(), t.data(), scratch.data(), scratch.size());
      Tensor dl(logits_j.shape);
      auto v = gpu::train::dice_ce_loss_grad_device(emu, ls, logits_j.data.data(), t.data(), *stats, 1e-5, 1.0, w[j], dl.data.data(), scratch.data(), scratch.size());
      out.loss += w[j] * v->loss;
      if (j == 0) {
        loss->dlogits = std::move(dl);
      } else {
        ds_dlogits[j - 1] = std::move(dl);
      }
    }
  }

  out.grads.assign(p.size(), 0.0f);
  auto put = [&](size_t array, const std::vector<float>& g) { std::copy(g.begin(), g.end(), out.grads.begin() + static_cast<std::ptrdiff_t>(arrays[array].offset)); };
  auto back = [&](Block& b, const Tensor& dy) {
    std::vector<float> dw(b.conv.weight.size()), db(b.conv.bias.size()), dg(b.norm.gamma.size()), dbe(b.norm.beta.size());
    const Tensor dpre = *gpu::train::norm_lrelu_backward(b.norm, b.pre, dy, dg, dbe, kEmulated);
    Tensor dx = *gpu::train::conv3d_backward(b.conv, b.in, dpre, dw, db, kEmulated);
    put(b.at, dw);
    put(b.at + 1, db);
    put(b.at + 2, dg);
    put(b.at + 3, dbe);
    return dx;
  };
  std::vector<float> hw(head.weight.size()), hb(head.bias.size());
  Tensor d = *gpu::train::conv3d_backward(head, head_in, loss->dlogits, hw, hb, kEmulated);
  put(head_at, hw);
  put(head_at + 1, hb);
  std::vector<Tensor> skip(enc.size());
  for (size_t i = dec.size(); i-- > 0;) {
    const size_t j = dec.size() - 1 - i;  // the stage's level
    if (j >= 1 && j <= ds_heads.size() && w[j] != 0) {
      std::vector<float> dw(ds_heads[j - 1].weight.size()), db(ds_heads[j - 1].bias.size());
      const Tensor dx = *gpu::train::conv3d_backward(ds_heads[j - 1], dec[i].out, ds_dlogits[j - 1], dw, db, kEmulated);
      for (size_t e = 0; e < d.data.size(); ++e) d.data[e] += dx.data[e];
      put(ds_at[j - 1], dw);
      put(ds_at[j - 1] + 1, db);
    }
    for (size_t k = 2; k-- > 0;) d = back(dec[i].blocks[k], d);
    auto parts = *train::split_channels(d, dec[i].up.cout);
    skip[enc.size() - 2 - i] = std::move(parts.second);
    std::vector<float> uw(dec[i].up.weight.size()), ub(dec[i].up.bias.size());
    d = *gpu::train::conv_transpose3d_backward(dec[i].up, dec[i].up_in, parts.first, uw, ub, kEmulated);
    put(dec[i].up_at, uw);
    put(dec[i].up_at + 1, ub);
  }
  for (size_t s = enc.size(); s-- > 0;) {
    if (!skip[s].data.empty())
      for (size_t i = 0; i < d.data.size(); ++i) d.data[i] += skip[s].data[i];
    for (size_t k = 2; k-- > 0;) d = back(enc[s].blocks[k], d);
  }
  return out;
}

// One step's logits, loss and gradient against the CPU UNet's; the figures as text.
std::string compare_step(const NetCase& c, const Step& want, const Step& got, const std::string& what) {
  EXPECT_EQ(got.logits.shape, want.logits.shape) << what;
  if (got.logits.shape != want.logits.shape) return "";
  const double dl = max_diff(got.logits.data, want.logits.data) / max_abs(want.logits.data);
  EXPECT_LE(dl, kLogitTol) << what << ": logits";
  const double dloss = std::fabs(got.loss - want.loss) / std::max(std::fabs(want.loss), 1e-3);
  EXPECT_LE(dloss, kLogitTol) << what << ": loss " << got.loss << ", want " << want.loss;
  EXPECT_NEAR(got.cross_entropy, want.cross_entropy, kLogitTol * std::fabs(want.cross_entropy)) << what;
  EXPECT_NEAR(got.dice, want.dice, kLogitTol * std::max(std::fabs(want.dice), 1e-3)) << what;
  const GradCheck g = check_gradient(layout(c.config), got.grads, want.grads, what + ": gradient");
  char buf[300];
  std::snprintf(buf, sizeof buf, "logits |Δ|/scale %.1e  loss %.1e  gradient L2 %.1e whole, %.2f worst array (%s), zero-in-theory biases %.0e", dl, dloss, g.flat,
                g.worst_array, g.where.c_str(), g.worst_zero);
  return buf;
}

// ------------------------------------------------------------------------------------------------
// The comparisons, for a backend.

std::vector<float> check_forward_backward(const NetCase& c, Where where, const std::string& label) {
  SCOPED_TRACE(c.name);
  auto cpu = UNet::create(c.config, c.seed);
  EXPECT_TRUE(cpu);
  if (!cpu) return {};
  auto gnet = GpuUNet::create(*cpu, where);
  EXPECT_TRUE(gnet) << gnet.error().message;
  if (!gnet) return {};
  EXPECT_EQ(gnet->parameter_count(), cpu->parameter_count());
  const Tensor x = random_input(c.shape, c.seed + 1);
  const auto target = make_target(x, c.seed + 2, c.config.classes);
  const Step want = cpu_step(*cpu, x, target);
  const Step got = gpu_step(*gnet, x, target);
  report(label + "  " + c.name + "  " + compare_step(c, want, got, label));
  if (where.backend == Backend::kEmulated) {
    // The orchestration, to the bit: the emulated layers composed by hand.
    const Step composed = composed_step(c.config, cpu->parameters(), x, target);
    EXPECT_TRUE(got.logits.data == composed.logits.data) << label << ": logits differ from the composed layers by " << max_diff(got.logits.data, composed.logits.data);
    EXPECT_EQ(got.loss, composed.loss) << label;
    EXPECT_TRUE(got.grads == composed.grads) << label << ": gradient differs from the composed layers' by " << max_diff(got.grads, composed.grads);
  }
  // The same shape again reuses the buffers and gives the same bits (no state left behind).
  const Step again = gpu_step(*gnet, x, target);
  EXPECT_TRUE(again.logits.data == got.logits.data) << label;
  EXPECT_TRUE(again.grads == got.grads) << label;
  EXPECT_EQ(again.loss, got.loss) << label;
  return got.grads;
}

// Two steps of `Opt` (Sgd or AdamW): (1) the GPU's step on its own gradient equals the reference
// optimizer fed that gradient, parameters and state to the bit; (2) each step's GPU gradient
// matches the CPU UNet's at the same parameters within the bounds above (a stale bf16 copy would
// not); (3) the independent CPU trajectory stays within `trajectory_bound`·lr of the GPU's.
template <typename Opt>
void check_optimizer(const NetCase& c, Where where, const std::string& label, const std::string& name, Opt fed, double trajectory_steps_bound) {
  SCOPED_TRACE(c.name + std::string(" ") + name);
  auto cpu = UNet::create(c.config, c.seed);
  ASSERT_TRUE(cpu);
  auto probe = UNet::create(c.config, c.seed);  // the CPU net at the GPU's parameters
  ASSERT_TRUE(probe);
  auto gnet = GpuUNet::create(*cpu, where);
  ASSERT_TRUE(gnet) << gnet.error().message;
  Opt own = fed;  // the independent CPU trajectory
  std::vector<float> fed_params = cpu->parameters();
  for (int step = 0; step < 2; ++step) {
    const Tensor x = random_input(c.shape, c.seed + 30 + static_cast<uint64_t>(step));
    const auto target = make_target(x, c.seed + 40 + static_cast<uint64_t>(step), c.config.classes);
    const Step got = gpu_step(*gnet, x, target);
    ASSERT_TRUE(probe->set_parameters(fed_params));
    const Step at_same = cpu_step(*probe, x, target);
    report(label + "  " + c.name + "  " + name + " step " + std::to_string(step + 1) + "  " + compare_step(c, at_same, got, label + " " + name + " step " + std::to_string(step + 1)));
    const Step mine = cpu_step(*cpu, x, target);
    auto p = cpu->parameters();
    ASSERT_TRUE(own.step(p, mine.grads, kLr));
    ASSERT_TRUE(cpu->set_parameters(p));
    ASSERT_TRUE(fed.step(fed_params, got.grads, kLr));
    if constexpr (std::is_same_v<Opt, train::Sgd>) {
      ASSERT_TRUE(gnet->sgd_step(kLr, fed.momentum, fed.weight_decay, fed.nesterov));
    } else {
      ASSERT_TRUE(gnet->adamw_step(kLr, fed.beta1, fed.beta2, fed.eps, fed.weight_decay));
    }
    auto params = gnet->parameters();
    ASSERT_TRUE(params);
    EXPECT_TRUE(*params == fed_params) << label << ": " << name << " on the same gradient differs from the reference's, max |Δ| " << max_diff(*params, fed_params);
  }
  Opt state;
  if constexpr (std::is_same_v<Opt, train::Sgd>) {
    ASSERT_TRUE(gnet->sgd_state(state));
    EXPECT_TRUE(state.velocity == fed.velocity) << label;
  } else {
    ASSERT_TRUE(gnet->adamw_state(state));
    EXPECT_EQ(state.t, 2u);
    EXPECT_TRUE(state.m == fed.m) << label;
    EXPECT_TRUE(state.v == fed.v) << label;
  }
  auto got = gnet->parameters();
  ASSERT_TRUE(got);
  const auto want = cpu->parameters();
  const double bound = trajectory_steps_bound * kLr + 1e-5;  // + float roundings of p
  size_t apart = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double d = std::fabs(static_cast<double>((*got)[i]) - want[i]);
    if (d > bound && apart < 5) ADD_FAILURE() << label << ": parameter " << i << " is " << (*got)[i] << ", want " << want[i] << " (bound " << bound << ")";
    if (d > kLr / 2) ++apart;
  }
  char buf[220];
  std::snprintf(buf, sizeof buf, "independent %s runs: max |Δp| %.1e (bound %.1e, params up to %.2f), %zu of %zu parameters more than lr/2 apart", name.c_str(),
                max_diff(*got, want), bound, max_abs(want), apart, want.size());
  report(label + "  " + c.name + "  " + buf);
}

// SGD's trajectories: a gradient error of e moves p2 by ≤ lr·(2 + 2μ + μ²)·e, and e ≤ the
// gradient's own scale (kArrayL2Tol < 1; per element not better than that, see above), which is
// at most max |g| over the whole gradient: bound (2 + 2μ + μ²)·max|g|·lr.
void check_sgd(const NetCase& c, Where where, const std::string& label) {
  auto cpu = UNet::create(c.config, c.seed);
  ASSERT_TRUE(cpu);
  const Tensor x = random_input(c.shape, c.seed + 30);
  const Step s = cpu_step(*cpu, x, make_target(x, c.seed + 40, c.config.classes));
  train::Sgd sgd;  // nnU-Net's: momentum 0.99, Nesterov, weight decay 3e-5
  check_optimizer(c, where, label, "SGD", sgd, (2 + 2 * kMomentum + kMomentum * kMomentum) * 2 * max_abs(s.grads));
}

// AdamW's: at most 2·R·lr apart per step (R ≤ 1.0013 for t ≤ 2).
void check_adamw(const NetCase& c, Where where, const std::string& label) {
  train::AdamW adamw;
  adamw.weight_decay = 1e-4;  // the trainer's
  check_optimizer(c, where, label, "AdamW", adamw, 2 * 2 * 1.0013);
}

// ------------------------------------------------------------------------------------------------
// The emulation, on every machine.

TEST(UNetGpuEmulation, ForwardLossAndGradientMatchTheCpuUNet) {
  for (const auto& c : net_cases()) check_forward_backward(c, kEmulated, "emulation");
}

// Deep supervision: the extra heads' outputs, nnU-Net's weighted loss over downsampled targets and
// the heads' input gradients added into the decoder — to the bit against the emulated layers
// composed by hand, within the bf16 bounds against the CPU UNet + deep_supervision_loss; the
// weight-0 head's gradient exactly zero, the others' not.
TEST(UNetGpuEmulation, DeepSupervisionMatchesTheCpuUNet) {
  for (const auto& c : ds_cases()) {
    const auto g = check_forward_backward(c, kEmulated, "emulation");
    const auto arrays = layout(c.config);
    const std::vector<double> w = train::deep_supervision_weights(c.config.levels - 1);
    for (size_t j = 1; j + 1 < c.config.levels; ++j) {
      const ArrayInfo& head_w = arrays[arrays.size() - 2 * (c.config.levels - 1 - j)];
      const double m = max_abs(g, head_w.offset, head_w.size + c.config.classes);
      if (w[j] == 0) {
        EXPECT_EQ(m, 0.0) << c.name << ": " << head_w.name << " has weight 0";
      } else {
        EXPECT_GT(m, 0.0) << c.name << ": " << head_w.name;
      }
    }
    check_sgd(c, kEmulated, "emulation");
  }
}

TEST(UNetGpuEmulation, TwoSgdStepsMatchTheCpuTrajectory) {
  for (const auto& c : net_cases()) check_sgd(c, kEmulated, "emulation");
}

TEST(UNetGpuEmulation, TwoAdamWStepsMatchTheReferenceOnTheSameGradients) {
  for (const auto& c : net_cases()) check_adamw(c, kEmulated, "emulation");
}

TEST(UNetGpuEmulation, TheFlatLayoutIsTheCpuUNets) {
  const NetCase c = net_cases()[1];
  auto cpu = UNet::create(c.config, c.seed);
  ASSERT_TRUE(cpu);
  EXPECT_EQ(layout(c.config).back().offset + layout(c.config).back().size, cpu->parameter_count());
  auto gnet = GpuUNet::create(*cpu, kEmulated);
  ASSERT_TRUE(gnet);
  auto p0 = gnet->parameters();
  ASSERT_TRUE(p0);
  EXPECT_TRUE(*p0 == cpu->parameters());  // copied as they are
  // A step changes them; the CPU net takes them back exactly, and a new GpuUNet from it too.
  const Tensor x = random_input(c.shape, 77);
  ASSERT_TRUE(gnet->forward(x));
  ASSERT_TRUE(gnet->loss_and_backward(make_target(x, 78)));
  ASSERT_TRUE(gnet->sgd_step(kLr));
  auto p1 = gnet->parameters();
  ASSERT_TRUE(p1);
  EXPECT_FALSE(*p1 == *p0);
  auto other = UNet::create(c.config, 999);
  ASSERT_TRUE(other);
  ASSERT_TRUE(other->set_parameters(*p1));
  EXPECT_TRUE(other->parameters() == *p1);
  auto again = GpuUNet::create(*other, kEmulated);
  ASSERT_TRUE(again);
  auto p2 = again->parameters();
  ASSERT_TRUE(p2);
  EXPECT_TRUE(*p2 == *p1);
  // set_parameters round-trips and the bf16 copy follows: the same logits as a net created from them.
  ASSERT_TRUE(gnet->set_parameters(*p0));
  auto restored = gnet->parameters();
  ASSERT_TRUE(restored);
  EXPECT_TRUE(*restored == *p0);
  auto fresh = GpuUNet::create(*cpu, kEmulated);
  ASSERT_TRUE(fresh);
  auto a = gnet->forward(x), b = fresh->forward(x);
  ASSERT_TRUE(a && b);
  EXPECT_TRUE(a->data == b->data);
  // The optimizer state loads and reads back.
  train::Sgd s;
  s.velocity.assign(cpu->parameter_count(), 0.25f);
  ASSERT_TRUE(gnet->set_sgd_state(s));
  train::Sgd back;
  ASSERT_TRUE(gnet->sgd_state(back));
  EXPECT_TRUE(back.velocity == s.velocity);
}

// A shape change reallocates; going back gives the first shape's results again.
TEST(UNetGpuEmulation, ShapesChangeBetweenCalls) {
  const auto cases = net_cases();
  auto cpu = UNet::create(cases[0].config, 5);
  ASSERT_TRUE(cpu);
  auto gnet = GpuUNet::create(*cpu, kEmulated);
  ASSERT_TRUE(gnet);
  const Tensor a = random_input(cases[1].shape, 1), b = random_input({1, 2, 4, 8, 4}, 2);
  auto ya = gnet->forward(a);
  ASSERT_TRUE(ya);
  auto yb = gnet->forward(b);
  ASSERT_TRUE(yb);
  EXPECT_EQ(yb->shape, (std::array<size_t, 5>{1, 2, 4, 8, 4}));
  ASSERT_TRUE(gnet->loss_and_backward(std::vector<uint8_t>(b.spatial(), 1)));
  auto ya2 = gnet->forward(a);
  ASSERT_TRUE(ya2);
  EXPECT_TRUE(ya2->data == ya->data);
}

// The training step's forward (forward_keep: the logits stay on the device) gives the loss and
// gradient of forward's step bit for bit, with and without deep supervision, and after a forward
// of another shape in between (the buffers are reallocated).
TEST(UNetGpuEmulation, ForwardKeepGivesForwardsLossAndGradient) {
  for (bool deep : {false, true}) {
    SCOPED_TRACE(deep ? "deep supervision" : "one output");
    const UNetConfig c = deep ? ds_cases().back().config : config3();  // 4 levels, two weighted extra heads
    ASSERT_EQ(c.deep_supervision, deep);
    auto cpu = UNet::create(c, 11);
    ASSERT_TRUE(cpu);
    const std::array<size_t, 5> shape{2, c.in_channels, 8, 8, 8};
    const Tensor x = random_input(shape, 3);
    std::vector<uint8_t> y(2 * x.spatial());
    for (size_t i = 0; i < y.size(); ++i) y[i] = static_cast<uint8_t>((i * 7 + i / 13) % c.classes);
    auto a = GpuUNet::create(*cpu, kEmulated), b = GpuUNet::create(*cpu, kEmulated);
    ASSERT_TRUE(a && b);
    ASSERT_TRUE(a->forward(x));
    auto la = a->loss_and_backward(y);
    ASSERT_TRUE(la) << la.error().message;
    ASSERT_TRUE(b->forward(random_input({1, c.in_channels, 8, 8, 16}, 9)));  // another shape first
    auto kept = b->forward_keep(x);
    ASSERT_TRUE(kept) << kept.error().message;
    auto lb = b->loss_and_backward(y);
    ASSERT_TRUE(lb) << lb.error().message;
    EXPECT_EQ(la->loss, lb->loss);
    auto ga = a->gradients(), gb = b->gradients();
    ASSERT_TRUE(ga && gb);
    EXPECT_TRUE(*ga == *gb);
    // A wrong seed for the input would change them: the comparison can fail.
    ASSERT_TRUE(b->forward_keep(random_input(shape, 4)));
    auto lc = b->loss_and_backward(y);
    ASSERT_TRUE(lc);
    EXPECT_NE(lc->loss, la->loss);
  }
}

// The loader's way in (device_batch, forward_device, loss_statistics_device): a batch written
// into device_batch's buffers gives the loss statistics of the same batch through forward +
// loss_statistics, also after a forward of another shape has reallocated the buffers in between
// (device_batch's earlier pointers are then gone: it must be asked again).
TEST(UNetGpuEmulation, DeviceBatchesGiveTheHostPathsStatisticsAcrossReallocation) {
  const UNetConfig c = ds_cases().back().config;  // deep supervision: targets made on the "device"
  auto cpu = UNet::create(c, 13);
  ASSERT_TRUE(cpu);
  const std::array<size_t, 5> shape{2, c.in_channels, 8, 8, 16};
  const Tensor x = random_input(shape, 5);
  std::vector<uint8_t> y(2 * x.spatial());
  for (size_t i = 0; i < y.size(); ++i) y[i] = static_cast<uint8_t>((i / 5 + i % 3) % c.classes);
  auto host = GpuUNet::create(*cpu, kEmulated), dev = GpuUNet::create(*cpu, kEmulated);
  ASSERT_TRUE(host && dev);
  ASSERT_TRUE(host->forward(x));
  auto want = host->loss_statistics(y);
  ASSERT_TRUE(want) << want.error().message;
  auto through_batch = [&]() -> Result<std::vector<double>> {
    auto b = dev->device_batch(shape);
    if (!b) return std::unexpected(b.error());
    std::copy(x.data.begin(), x.data.end(), b->x);  // emulation: "device memory" is host memory
    std::copy(y.begin(), y.end(), b->target);
    TRESOR_TRY(dev->forward_device());
    return dev->loss_statistics_device();
  };
  auto first = through_batch();
  ASSERT_TRUE(first) << first.error().message;
  EXPECT_TRUE(*first == *want);
  ASSERT_TRUE(dev->forward(random_input({1, c.in_channels, 8, 16, 8}, 6)));  // another shape: reallocated
  EXPECT_FALSE(dev->forward_device()) << "forward replaced device_batch's input";
  auto again = through_batch();
  ASSERT_TRUE(again) << again.error().message;
  EXPECT_TRUE(*again == *want);
  // Another target gives other statistics: the comparison can fail.
  y[3] = static_cast<uint8_t>((y[3] + 1) % c.classes);
  auto other = through_batch();
  ASSERT_TRUE(other);
  EXPECT_FALSE(*other == *want);
}

// ------------------------------------------------------------------------------------------------
// Refusals: each failing case beside the passing base case.

using FailCase = testing::CheckCase;

std::vector<FailCase> fail_cases() {
  const UNetConfig c = config3();
  // A fresh net, then `act` on it.
  auto with_net = [c](std::function<Result<void>(GpuUNet&, UNet&)> act) {
    return [c, act]() -> Result<void> {
      auto cpu = UNet::create(c, 3);
      if (!cpu) return std::unexpected(cpu.error());
      auto g = GpuUNet::create(*cpu, kEmulated);
      if (!g) return std::unexpected(g.error());
      return act(*g, *cpu);
    };
  };
  auto step = [with_net](std::array<size_t, 5> shape, std::function<void(std::vector<uint8_t>&)> mutate) {
    return with_net([shape, mutate](GpuUNet& g, UNet&) -> Result<void> {
      const Tensor x = random_input(shape, 4);
      auto y = g.forward(x);
      if (!y) return std::unexpected(y.error());
      std::vector<uint8_t> t(shape[0] * x.spatial(), 0);
      t[1] = 1;
      mutate(t);
      auto l = g.loss_and_backward(t);
      if (!l) return std::unexpected(l.error());
      return g.sgd_step(kLr);
    });
  };
  const std::array<size_t, 5> ok{1, 2, 4, 8, 12};
  return {
      {"base case", step(ok, [](auto&) {}), ""},
      {"input channels", step({1, 3, 4, 8, 12}, [](auto&) {}), "the input has 3 channels, the model takes 2"},
      {"spatial size not a multiple of 4", step({1, 2, 4, 8, 10}, [](auto&) {}), "is not a multiple of 4 on every spatial axis"},
      {"empty spatial axis", step({1, 2, 0, 8, 12}, [](auto&) {}), "is not a multiple of 4"},
      {"no samples", step({0, 2, 4, 8, 12}, [](auto&) {}), "has no samples"},
      {"target size", step(ok, [](auto& t) { t.pop_back(); }), "target has 383 voxels, the logits 384"},
      {"target class", step(ok, [](auto& t) { t[5] = 2; }), "target voxel 5 is class 2 of 2"},
      {"forward_keep input channels", with_net([](GpuUNet& g, UNet&) { return g.forward_keep(random_input({1, 3, 4, 8, 12}, 4)); }),
       "the input has 3 channels, the model takes 2"},
      {"forward_keep values for the shape",
       with_net([](GpuUNet& g, UNet&) {
         Tensor x = random_input({1, 2, 4, 8, 12}, 4);
         x.data.pop_back();
         return g.forward_keep(x);
       }),
       "the input has 767 values for its shape"},
      {"backward before forward",
       with_net([](GpuUNet& g, UNet&) -> Result<void> {
         auto l = g.loss_and_backward(std::vector<uint8_t>(384, 0));
         if (!l) return std::unexpected(l.error());
         return {};
       }),
       "backward before forward"},
      {"optimizer step before backward",
       with_net([](GpuUNet& g, UNet&) -> Result<void> {
         if (auto y = g.forward(random_input({1, 2, 4, 8, 12}, 4)); !y) return std::unexpected(y.error());
         return g.adamw_step(kLr);
       }),
       "optimizer step before any backward pass"},
      {"gradients before backward",
       with_net([](GpuUNet& g, UNet&) -> Result<void> {
         auto r = g.gradients();
         if (!r) return std::unexpected(r.error());
         return {};
       }),
       "no gradient yet"},
      {"set_parameters count", with_net([](GpuUNet& g, UNet& cpu) { return g.set_parameters(std::vector<float>(cpu.parameter_count() - 1, 0.0f)); }), "parameters given"},
      {"sgd state size",
       with_net([](GpuUNet& g, UNet&) {
         train::Sgd s;
         s.velocity.assign(7, 0.0f);
         return g.set_sgd_state(s);
       }),
       "sgd velocity has 7 values"},
      {"adamw state size",
       with_net([](GpuUNet& g, UNet& cpu) {
         train::AdamW s;
         s.m.assign(cpu.parameter_count(), 0.0f);
         s.v.assign(3, 0.0f);
         return g.set_adamw_state(s);
       }),
       "adamw v has 3 values"},
      {"deep supervision runs",
       [c]() -> Result<void> {
         UNetConfig d = c;
         d.deep_supervision = true;
         auto cpu = UNet::create(d, 3);
         if (!cpu) return std::unexpected(cpu.error());
         auto g = GpuUNet::create(*cpu, kEmulated);
         if (!g) return std::unexpected(g.error());
         if (g->outputs() != 2) return fail(ErrorCode::kMalformed, "outputs() = " + std::to_string(g->outputs()));
         return {};
       },
       ""},
      {"statistics halves in order",
       with_net([](GpuUNet& g, UNet&) -> Result<void> {
         if (auto y = g.forward(random_input({1, 2, 4, 8, 12}, 4)); !y) return std::unexpected(y.error());
         auto st = g.loss_statistics(std::vector<uint8_t>(384, 1));
         if (!st) return std::unexpected(st.error());
         if (st->size() != 4 || (*st)[1] != 384) return fail(ErrorCode::kMalformed, "statistics layout");
         auto l = g.backward_from_statistics(*st);
         if (!l) return std::unexpected(l.error());
         return {};
       }),
       ""},
      {"backward from statistics before loss_statistics",
       with_net([](GpuUNet& g, UNet&) -> Result<void> {
         if (auto y = g.forward(random_input({1, 2, 4, 8, 12}, 4)); !y) return std::unexpected(y.error());
         auto l = g.backward_from_statistics(std::vector<double>(4, 1.0));
         if (!l) return std::unexpected(l.error());
         return {};
       }),
       "backward before loss_statistics on the last forward"},
      {"statistics of the wrong length",
       with_net([](GpuUNet& g, UNet&) -> Result<void> {
         if (auto y = g.forward(random_input({1, 2, 4, 8, 12}, 4)); !y) return std::unexpected(y.error());
         if (auto st = g.loss_statistics(std::vector<uint8_t>(384, 1)); !st) return std::unexpected(st.error());
         auto l = g.backward_from_statistics(std::vector<double>(5, 1.0));
         if (!l) return std::unexpected(l.error());
         return {};
       }),
       "5 loss statistics, want 4 (1 outputs of 4)"},
      {"statistics with fewer voxels than this batch",
       with_net([](GpuUNet& g, UNet&) -> Result<void> {
         if (auto y = g.forward(random_input({1, 2, 4, 8, 12}, 4)); !y) return std::unexpected(y.error());
         auto st = g.loss_statistics(std::vector<uint8_t>(384, 1));
         if (!st) return std::unexpected(st.error());
         (*st)[1] = 100;
         auto l = g.backward_from_statistics(*st);
         if (!l) return std::unexpected(l.error());
         return {};
       }),
       "statistics[1] (the voxel count) is 100"},
      {"set_gradients before backward", with_net([](GpuUNet& g, UNet& cpu) { return g.set_gradients(std::vector<float>(cpu.parameter_count(), 0.0f)); }),
       "no gradient to replace yet"},
      {"set_gradients count",
       with_net([](GpuUNet& g, UNet& cpu) -> Result<void> {
         if (auto y = g.forward(random_input({1, 2, 4, 8, 12}, 4)); !y) return std::unexpected(y.error());
         if (auto l = g.loss_and_backward(std::vector<uint8_t>(384, 1)); !l) return std::unexpected(l.error());
         return g.set_gradients(std::vector<float>(cpu.parameter_count() + 1, 0.0f));
       }),
       "gradient values given"},
      {"channel copy past the source",
       [] { return gpu::train::copy_channels_device({0, nullptr, Backend::kEmulated}, {1, 2, 8, 3, 2, 4, 0}, nullptr, nullptr); }, "src_first + channels = 4 > src_channels = 3"},
      {"channel copy past the destination",
       [] { return gpu::train::copy_channels_device({0, nullptr, Backend::kEmulated}, {1, 2, 8, 4, 0, 3, 2}, nullptr, nullptr); }, "dst_first + channels = 4 > dst_channels = 3"},
  };
}

TEST(UNetGpuChecks, FailingCasesNameTheField) { testing::expect_checks(fail_cases()); }

TEST(UNetGpuChecks, WithoutADeviceCreateIsUnavailable) {
  if (gpu::gpu_probe()) GTEST_SKIP() << "a CUDA device is present: the device tests below run instead";
  auto cpu = UNet::create(config3(), 1);
  ASSERT_TRUE(cpu);
  auto g = GpuUNet::create(*cpu, kDevice);
  ASSERT_FALSE(g);
  EXPECT_EQ(g.error().code, ErrorCode::kUnavailable) << g.error().message;
}

// ------------------------------------------------------------------------------------------------
// The device (skipped, saying why, without one; scripts/gpu-check sets TRESOR_REQUIRE_GPU=1).

TEST(UNetGpuDevice, ForwardLossAndGradientMatchTheCpuUNetAndAreDeterministic) {
  auto devs = gpu::gpu_probe();
  TRESOR_SKIP_WITHOUT_GPU(devs);
  for (const auto& c : net_cases()) {
    const auto first = check_forward_backward(c, kDevice, "device");
    const auto second = check_forward_backward(c, kDevice, "device again");
    EXPECT_TRUE(first == second) << c.name << ": no atomics, so the same gradient on every run";
  }
}

TEST(UNetGpuDevice, DeepSupervisionMatchesTheCpuUNetAndIsDeterministic) {
  auto devs = gpu::gpu_probe();
  TRESOR_SKIP_WITHOUT_GPU(devs);
  for (const auto& c : ds_cases()) {
    const auto first = check_forward_backward(c, kDevice, "device");
    const auto second = check_forward_backward(c, kDevice, "device again");
    EXPECT_TRUE(first == second) << c.name;
    check_sgd(c, kDevice, "device");
  }
}

TEST(UNetGpuDevice, TwoSgdStepsMatchTheCpuTrajectory) {
  auto devs = gpu::gpu_probe();
  TRESOR_SKIP_WITHOUT_GPU(devs);
  for (const auto& c : net_cases()) check_sgd(c, kDevice, "device");
}

TEST(UNetGpuDevice, TwoAdamWStepsMatchTheReferenceOnTheSameGradients) {
  auto devs = gpu::gpu_probe();
  TRESOR_SKIP_WITHOUT_GPU(devs);
  for (const auto& c : net_cases()) check_adamw(c, kDevice, "device");
}

// A training-sized step, timed (printed, not asserted): 2 × 2 × 64³ through a 4-level, base-32 net.
TEST(UNetGpuDevice, ATrainingSizedStepRuns) {
  auto devs = gpu::gpu_probe();
  TRESOR_SKIP_WITHOUT_GPU(devs);
  UNetConfig cfg;
  cfg.levels = 4;
  cfg.base_channels = 32;
  cfg.max_channels = 320;
  cfg.in_channels = 2;
  cfg.classes = 2;
  auto cpu = UNet::create(cfg, 1);
  ASSERT_TRUE(cpu);
  auto g = GpuUNet::create(*cpu, kDevice);
  ASSERT_TRUE(g) << g.error().message;
  const Tensor x = random_input({2, 2, 64, 64, 64}, 3);
  const auto target = make_target(x, 4);
  double best = 1e30, first_loss = 0, last_loss = 0;
  for (int i = 0; i < 4; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    ASSERT_TRUE(g->forward(x));
    auto l = g->loss_and_backward(target);
    ASSERT_TRUE(l) << l.error().message;
    ASSERT_TRUE(g->adamw_step(1e-3));
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (i > 0) best = std::min(best, s);
    if (i == 0) first_loss = l->loss;
    last_loss = l->loss;
    EXPECT_TRUE(std::isfinite(l->loss));
  }
  EXPECT_LT(last_loss, first_loss) << "four AdamW steps on the same batch should lower its loss";
  std::printf("  device step 4-level base-32 2×2×64³: %.1f ms (forward, loss, backward, AdamW; logits downloaded), loss %.4f -> %.4f\n", best * 1e3, first_loss,
              last_loss);
}

}  // namespace
}  // namespace tresor
