// The training layers on the GPU (include/tresor/gpu/train.h) against their CPU reference,
// tresor/train/layers.h (Conv3d, ConvTranspose3d, InstanceNormLeakyRelu, dice_ce_loss, Sgd, AdamW).
//
// Everywhere: bf16 rounding against a table and an independent oracle; the checks (each failing
// case beside its passing twin); the kernels' CPU emulation — kernels/train.cuh's gathers, stores,
// reductions and formulas with the kernels' geometry — against the reference on odd shapes.
// Where a CUDA device exists (skipped with the reason elsewhere; scripts/gpu-check requires it):
// the device against the reference with the same tolerances, and where the arithmetic is the
// same by construction (reductions, optimizers), against the emulation to the bit.
//
// Tolerances, and why:
//  - convolutions (bf16 operands, fp32 accumulation): bf16 has 8 significant bits, so an operand
//    rounded to nearest has relative error ≤ u = 2^-8, and a product a·b of two rounded operands
//    carries ≤ 2u + u² = 2^-7 + 2^-16 of |a·b| (the product itself is exact in fp32: 8 + 8 ≤ 24
//    bits); summing K products in fp32 adds ≤ K·2^-24 of Σ|a·b| with round to nearest in any
//    order; the tensor cores may truncate and align in groups, so 4× that is allowed. Per output:
//    |got − want| ≤ (2^-7 + 2^-16 + K·2^-22)·S + 2^-22·|want|, S = Σ_k |a_k·b_k|, computed by
//    the reference itself on |weights| and |inputs| (zero bias); the 2^-22·|want| covers the float
//    roundings of the bias, the accumulated gradient and the reference's own output. Per element,
//    and tight enough that operands truncated instead of rounded fail it. Against the output's
//    scale this is about 1e-2 (checked too: max |Δ| ≤ 1e-2 · max |want|); the observed errors
//    (~2e-3 of the scale) are printed.
//  - instance norm, loss: float storage, double arithmetic in both; only the summation order
//    differs, so an output may differ by a rounding flip: 2^-22·|want| plus 1e-9 (norm forward,
//    loss) or 1e-7 (norm backward, whose dx subtracts nearly equal terms) of the output's scale.
//  - optimizers: the reference's double expressions, unfused, in its order: to the bit.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "support/test_support.h"
#include "train.cuh"
#include "tresor/gpu.h"
#include "tresor/gpu/train.h"
#include "tresor/train/trainer.h"
#include "tresor/train/layers.h"

namespace tresor {
namespace {

using gpu::train::Backend;
using gpu::train::Where;
using train::Tensor;

constexpr Where kEmulated{Backend::kEmulated, 0};
constexpr Where kDevice{Backend::kDevice, 0};

// ------------------------------------------------------------------------------------------------
// bf16

uint32_t bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

struct Bf16Case {
  const char* name;
  uint32_t in;
  uint16_t want;
};

TEST(TrainBf16, KnownValues) {
  const Bf16Case cases[] = {
      {"1.0", 0x3f800000u, 0x3f80},
      {"-1.0", 0xbf800000u, 0xbf80},
      {"1/3 rounds up (0x3eaaaaab: discarded 0xaaab > half)", 0x3eaaaaabu, 0x3eab},
      {"0.1 rounds up (0x3dcccccd)", 0x3dcccccdu, 0x3dcd},
      {"just below a tie rounds down", 0x3f807fffu, 0x3f80},
      {"tie to even, even kept (0x3f80|8000)", 0x3f808000u, 0x3f80},
      {"tie to even, odd rounds up (0x3f81|8000)", 0x3f818000u, 0x3f82},
      {"negative tie to even", 0xbf818000u, 0xbf82},
      {"just above a tie rounds up", 0x3f808001u, 0x3f81},
      {"+0", 0x00000000u, 0x0000},
      {"-0", 0x80000000u, 0x8000},
      {"smallest denormal rounds to 0", 0x00000001u, 0x0000},
      {"denormal tie to even (0)", 0x00008000u, 0x0000},
      {"denormal tie to even (odd rounds up)", 0x00018000u, 0x0002},
      {"denormal rounds up", 0x0000c000u, 0x0001},
      {"largest denormal rounds to the smallest normal", 0x007fffffu, 0x0080},
      {"negative denormal", 0x8000c000u, 0x8001},
      {"largest float rounds to inf", 0x7f7fffffu, 0x7f80},
      {"largest bf16 stays", 0x7f7f0000u, 0x7f7f},
      {"below the overflow tie stays finite", 0x7f7f7fffu, 0x7f7f},
      {"+inf", 0x7f800000u, 0x7f80},
      {"-inf", 0xff800000u, 0xff80},
      {"quiet NaN", 0x7fc00000u, 0x7fc0},
      {"negative quiet NaN", 0xffc00000u, 0xffc0},
      {"signalling NaN is quieted, not rounded to inf", 0x7f800001u, 0x7fc0},
      {"NaN whose payload would carry into inf", 0x7f80ffffu, 0x7fc0},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    EXPECT_EQ(gpu::train::bf16_bits(from_bits(c.in)), c.want);
  }
  // A bf16 value converts back exactly and is its own rounding.
  EXPECT_EQ(gpu::train::bf16_float(0x3eab), from_bits(0x3eab0000u));
  EXPECT_EQ(gpu::train::bf16_round(from_bits(0x3eab0000u)), from_bits(0x3eab0000u));
}

// An independent oracle for finite values: the two bf16 neighbours by truncation, the nearer in
// exact (double) arithmetic, ties to the even one.
uint16_t bf16_oracle(float f) {
  const uint32_t u = bits(f);
  const uint16_t lo = static_cast<uint16_t>(u >> 16);
  if ((u & 0xffffu) == 0) return lo;
  const uint16_t hi = static_cast<uint16_t>(lo + 1);  // away from zero in magnitude (sign-magnitude)
  const double x = f, a = from_bits(uint32_t{lo} << 16), b = from_bits(uint32_t{hi} << 16);
  const double da = std::fabs(x - a), db = std::fabs(b - x);
  if (da < db) return lo;
  if (db < da) return hi;
  return (lo & 1u) == 0 ? lo : hi;
}

TEST(TrainBf16, MatchesAnIndependentOracleOnRandomBitPatterns) {
  std::mt19937 rng(3);
  size_t checked = 0;
  for (int i = 0; i < 1'000'000; ++i) {
    const auto u = static_cast<uint32_t>(rng());
    const float f = from_bits(u);
    if (!std::isfinite(f) || (u & 0x7fffffffu) >= 0x7f7f8000u) continue;  // the oracle's neighbour would be inf or NaN
    ++checked;
    const uint16_t got = gpu::train::bf16_bits(f), want = bf16_oracle(f);
    if (got != want) {
      ADD_FAILURE() << std::hex << "0x" << u << ": got 0x" << got << ", want 0x" << want;
      break;
    }
  }
  EXPECT_GT(checked, 900'000u);
}

// ------------------------------------------------------------------------------------------------
// Random data, never zeros.

std::vector<float> random_values(size_t n, uint64_t seed, float scale) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> d(-1.0f, 1.0f);
  std::vector<float> v(n);
  for (auto& x : v) {
    x = d(rng) * scale;
    if (x == 0) x = scale * 0.5f;
  }
  return v;
}
Tensor random_tensor(std::array<size_t, 5> shape, uint64_t seed, float scale = 1.0f) {
  Tensor t(shape);
  t.data = random_values(t.size(), seed, scale);
  return t;
}
std::vector<float> absolute(std::vector<float> v) {
  for (auto& x : v) x = std::fabs(x);
  return v;
}
Tensor absolute(Tensor t) {
  t.data = absolute(std::move(t.data));
  return t;
}

double max_abs(const std::vector<float>& v) {
  double m = 0;
  for (float x : v) m = std::max(m, std::fabs(static_cast<double>(x)));
  return m;
}

// Compares got with want against a per-element bound; returns the worst |Δ| relative to the
// output's scale (max |want|), also checked against `scale_rel`.
double expect_within(const std::vector<float>& got, const std::vector<float>& want, const std::function<double(size_t)>& bound, double scale_rel,
                     const std::string& what) {
  SCOPED_TRACE(what);
  EXPECT_EQ(got.size(), want.size());
  if (got.size() != want.size()) return INFINITY;
  const double scale = max_abs(want);
  double worst = 0;
  size_t over = 0, first = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double e = std::fabs(static_cast<double>(got[i]) - static_cast<double>(want[i]));
    if (!(e <= bound(i))) {
      if (over++ == 0) first = i;
    }
    worst = std::max(worst, e);
  }
  EXPECT_EQ(over, 0u) << "element " << first << ": got " << got[first] << ", want " << want[first] << ", bound " << bound(first);
  EXPECT_LE(worst, scale_rel * scale) << "worst |Δ| " << worst << " against the scale " << scale;
  return scale > 0 ? worst / scale : worst;
}

// The bf16 GEMM bound of the header comment: S from the reference on absolute values.
std::function<double(size_t)> gemm_bound(const std::vector<float>& s, const std::vector<float>& want, size_t k) {
  const double rel = std::ldexp(1.0, -7) + std::ldexp(1.0, -16) + static_cast<double>(k) * std::ldexp(1.0, -22);
  return [&s, &want, rel](size_t i) { return rel * static_cast<double>(s[i]) + std::ldexp(std::fabs(static_cast<double>(want[i])), -22); };
}

// ------------------------------------------------------------------------------------------------
// Convolutions

struct ConvCase {
  std::string name;
  bool transposed;
  size_t n, cin, cout, k, stride;
  std::array<size_t, 3> dims;  // d, h, w
};

std::vector<ConvCase> conv_cases() {
  return {
      {"k3 s1 3→5 on 5×7×9", false, 1, 3, 5, 3, 1, {5, 7, 9}},
      {"k3 s2 5→3 on odd 5×7×9, two samples", false, 2, 5, 3, 3, 2, {5, 7, 9}},
      {"k1 s1 5→3 on 7×5×3", false, 1, 5, 3, 1, 1, {7, 5, 3}},
      {"k1 s2 3→5 on odd 5×7×9, two samples", false, 2, 3, 5, 1, 2, {5, 7, 9}},
      {"k3 s1 16→20 on 6×6×6 (M, K across several tiles)", false, 1, 16, 20, 3, 1, {6, 6, 6}},
      {"k3 s2 2→3 on 15×16×17 (split-K weight gradient)", false, 1, 2, 3, 3, 2, {15, 16, 17}},
      {"k3 s1 2→3 on 15×16×17 (split-K, unequal last chunk)", false, 1, 2, 3, 3, 1, {15, 16, 17}},
      {"k3 s1 1→1 on 1×1×1", false, 1, 1, 1, 3, 1, {1, 1, 1}},
      {"k3 s2 24→32 on 6×7×8, two samples (U-Net-like widths)", false, 2, 24, 32, 3, 2, {6, 7, 8}},
      {"k3 s1 32→24 on 6×7×8", false, 1, 32, 24, 3, 1, {6, 7, 8}},
      {"transposed 3→5 on 3×4×5", true, 1, 3, 5, 2, 2, {3, 4, 5}},
      {"transposed 5→3 on odd 5×7×9, two samples", true, 2, 5, 3, 2, 2, {5, 7, 9}},
      {"transposed 20→3 on 2×3×3", true, 1, 20, 3, 2, 2, {2, 3, 3}},
  };
}

struct ConvResult {
  Tensor y, dx;
  std::vector<float> dweight, dbias;
};

template <typename Layer>
Layer make_layer(const ConvCase& c, uint64_t seed) {
  Layer l;
  l.cin = c.cin;
  l.cout = c.cout;
  l.k = c.k;
  l.stride = c.stride;
  l.pad = c.transposed ? 0 : c.k / 2;
  l.weight = random_values(c.cin * c.cout * c.k * c.k * c.k, seed, 0.5f);
  l.bias = random_values(c.cout, seed + 1, 0.2f);
  return l;
}

// forward, then backward with dweight/dbias starting from `init` (the layers accumulate).
template <typename Layer>
ConvResult run_conv_reference(const Layer& l, const Tensor& x, const Tensor& dy, const std::vector<float>& init_w, const std::vector<float>& init_b) {
  ConvResult r;
  auto y = l.forward(x, 2);
  EXPECT_TRUE(y) << y.error().message;
  r.y = std::move(*y);
  r.dweight = init_w;
  r.dbias = init_b;
  auto dx = l.backward(x, dy, r.dweight, r.dbias, 2);
  EXPECT_TRUE(dx) << dx.error().message;
  r.dx = std::move(*dx);
  return r;
}

ConvResult run_conv_gpu(const ConvCase& c, const train::Conv3d& conv, const train::ConvTranspose3d& tconv, const Tensor& x, const Tensor& dy,
                        const std::vector<float>& init_w, const std::vector<float>& init_b, Where where) {
  ConvResult r;
  r.dweight = init_w;
  r.dbias = init_b;
  auto y = c.transposed ? gpu::train::conv_transpose3d_forward(tconv, x, where) : gpu::train::conv3d_forward(conv, x, where);
  EXPECT_TRUE(y) << y.error().message;
  if (y) r.y = std::move(*y);
  auto dx = c.transposed ? gpu::train::conv_transpose3d_backward(tconv, x, dy, r.dweight, r.dbias, where)
                         : gpu::train::conv3d_backward(conv, x, dy, r.dweight, r.dbias, where);
  EXPECT_TRUE(dx) << dx.error().message;
  if (dx) r.dx = std::move(*dx);
  return r;
}

// Checks one backend against the reference on every case; returns the results per case.
std::vector<ConvResult> check_convolutions(Where where, const std::string& label) {
  std::vector<ConvResult> out;
  uint64_t seed = 100;
  for (const auto& c : conv_cases()) {
    SCOPED_TRACE(label + ", " + c.name);
    seed += 10;
    const auto conv = make_layer<train::Conv3d>(c, seed);
    const auto tconv = make_layer<train::ConvTranspose3d>(c, seed);
    const Tensor x = random_tensor({c.n, c.cin, c.dims[0], c.dims[1], c.dims[2]}, seed + 2);
    std::array<size_t, 5> ys{};
    {
      auto s = c.transposed ? gpu::train::conv_shape(tconv, x.shape) : gpu::train::conv_shape(conv, x.shape);
      EXPECT_TRUE(s) << s.error().message;
      if (!s) return out;
      const size_t od = c.transposed ? 2 * s->d : (s->d + 2 * s->pad - s->k) / s->stride + 1;
      const size_t oh = c.transposed ? 2 * s->h : (s->h + 2 * s->pad - s->k) / s->stride + 1;
      const size_t ow = c.transposed ? 2 * s->w : (s->w + 2 * s->pad - s->k) / s->stride + 1;
      ys = {c.n, c.cout, od, oh, ow};
    }
    const Tensor dy = random_tensor(ys, seed + 3);
    const auto init_w = random_values(conv.weight.size(), seed + 4, 0.1f), init_b = random_values(c.cout, seed + 5, 0.1f);
    const ConvResult want = c.transposed ? run_conv_reference(tconv, x, dy, init_w, init_b) : run_conv_reference(conv, x, dy, init_w, init_b);
    // S = Σ|a·b| per output: the reference on |w|, |x|, |dy|, zero bias and zero initial gradients.
    auto abs_conv = conv;
    auto abs_tconv = tconv;
    abs_conv.weight = abs_tconv.weight = absolute(conv.weight);
    abs_conv.bias.assign(c.cout, 0.0f);
    abs_tconv.bias.assign(c.cout, 0.0f);
    const std::vector<float> zeros_w(conv.weight.size(), 0.0f), zeros_b(c.cout, 0.0f);
    const ConvResult s = c.transposed ? run_conv_reference(abs_tconv, absolute(x), absolute(dy), zeros_w, zeros_b)
                                      : run_conv_reference(abs_conv, absolute(x), absolute(dy), zeros_w, zeros_b);
    const ConvResult got = run_conv_gpu(c, conv, tconv, x, dy, init_w, init_b, where);
    if (got.y.data.empty() || got.dx.data.empty()) return out;
    const size_t taps = c.k * c.k * c.k, voxels_out = want.y.size() / c.cout;
    const size_t k_fwd = c.transposed ? c.cin : c.cin * taps, k_data = c.transposed ? c.cout * 8 : c.cout * taps;
    const size_t k_weight = c.transposed ? x.size() / c.cin : voxels_out;
    const double ey = expect_within(got.y.data, want.y.data, gemm_bound(s.y.data, want.y.data, k_fwd), 1e-2, "y");
    const double edx = expect_within(got.dx.data, want.dx.data, gemm_bound(s.dx.data, want.dx.data, k_data), 1e-2, "dx");
    const double edw = expect_within(got.dweight, want.dweight, gemm_bound(s.dweight, want.dweight, k_weight), 1e-2, "dweight");
    // The bias gradient is a double sum of float dy (no bf16): float roundings only.
    const double edb = expect_within(
        got.dbias, want.dbias, [&](size_t i) { return std::ldexp(std::fabs(static_cast<double>(want.dbias[i])), -22) + 1e-12 * static_cast<double>(s.dbias[i]); },
        1e-6, "dbias");
    std::printf("  %-12s %-58s |Δ|/scale  y %.1e  dx %.1e  dw %.1e  db %.1e\n", label.c_str(), c.name.c_str(), ey, edx, edw, edb);
    out.push_back(got);
  }
  return out;
}

TEST(TrainGpuEmulation, ConvolutionsMatchTheReference) { check_convolutions(kEmulated, "emulation"); }

TEST(TrainGpuEmulation, SplitKIsExercised) {
  // The split-K cases above do cut K: the weight gradient of 15×16×17 outputs (k3 s1) in 4 chunks.
  gpu::train::ConvGeom g;
  g.n = 1;
  g.cin = 2;
  g.cout = 3;
  g.d = g.od = 15;
  g.h = g.oh = 16;
  g.w = g.ow = 17;
  const auto dm = gpu::train::gemm_dims(gpu::train::GemmKind::kConvBackwardWeight, g);
  EXPECT_EQ(dm.k, 15u * 16 * 17);
  EXPECT_EQ(dm.splits, 4u);
  EXPECT_EQ(dm.chunk % gpu::train::kTileK, 0u);
  EXPECT_LT(uint64_t{dm.chunk} * (dm.splits - 1), dm.k);
  EXPECT_GE(uint64_t{dm.chunk} * dm.splits, dm.k);
  // Forward passes never split.
  EXPECT_EQ(gpu::train::gemm_dims(gpu::train::GemmKind::kConvForward, g).splits, 1u);
}

// The index mapping, one pass at a time, on a case small enough to write out: a 1×1×1-channel
// k3 s2 convolution of a 3×3×3 ramp with the centre tap only picks every other voxel.
TEST(TrainGpuEmulation, GatherPicksTheStridedVoxelsAndPadsWithZero) {
  gpu::train::ConvGeom g;
  g.n = g.cin = g.cout = 1;
  g.d = g.h = g.w = 3;
  g.od = g.oh = g.ow = 2;
  g.k = 3;
  g.stride = 2;
  g.pad = 1;
  std::vector<float> x(27);
  for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(i + 1);
  const gpu::train::Voxel o{0, 1, 1, 1};  // output (1, 1, 1) reads input 2·1 − 1 + tap
  EXPECT_EQ(gpu::train::conv_gather_x(g, x.data(), 0, o, 13), x[(2 * 3 + 2) * 3 + 2]);  // centre tap → input (2, 2, 2)
  EXPECT_EQ(gpu::train::conv_gather_x(g, x.data(), 0, o, 26), 0.0f);                    // tap (2, 2, 2) → input (3, 3, 3): padding
  const gpu::train::Voxel o0{0, 0, 0, 0};
  EXPECT_EQ(gpu::train::conv_gather_x(g, x.data(), 0, o0, 0), 0.0f);      // input (−1, −1, −1): padding
  EXPECT_EQ(gpu::train::conv_gather_x(g, x.data(), 0, o0, 13), x[0]);     // input (0, 0, 0)
  // Backward data: input 1 is read by no output through the centre tap (1 + 1 − 1 is odd), by
  // output 0 through tap 2 and output 1 through tap 0.
  EXPECT_EQ(gpu::train::conv_source(1, 1, 2, 1, 2), -1);
  EXPECT_EQ(gpu::train::conv_source(1, 2, 2, 1, 2), 0);
  EXPECT_EQ(gpu::train::conv_source(1, 0, 2, 1, 2), 1);
  EXPECT_EQ(gpu::train::conv_source(2, 0, 2, 1, 2), -1);  // output 1.5
  EXPECT_EQ(gpu::train::conv_source(4, 1, 2, 1, 2), -1);  // output 2 is beyond the 2 outputs
}

// ------------------------------------------------------------------------------------------------
// Instance norm + leaky ReLU

struct NormCase {
  std::string name;
  std::array<size_t, 5> shape;
};
std::vector<NormCase> norm_cases() {
  return {{"1×3×5×7×9 (315 voxels: not a multiple of the 256 threads)", {1, 3, 5, 7, 9}},
          {"2×5×3×4×5", {2, 5, 3, 4, 5}},
          {"2×3×1×1×7 (fewer voxels than threads)", {2, 3, 1, 1, 7}},
          {"1×2×9×9×9 (729 voxels)", {1, 2, 9, 9, 9}}};
}

train::InstanceNormLeakyRelu make_norm(size_t channels, uint64_t seed) {
  train::InstanceNormLeakyRelu l;
  l.channels = channels;
  l.gamma = random_values(channels, seed, 1.5f);
  l.beta = random_values(channels, seed + 1, 0.5f);
  return l;
}

struct NormResult {
  Tensor y, dx;
  std::vector<float> dgamma, dbeta;
};

NormResult check_norm_case(const NormCase& c, uint64_t seed, Where where, const std::string& label) {
  SCOPED_TRACE(label + ", " + c.name);
  const auto l = make_norm(c.shape[1], seed);
  Tensor x = random_tensor(c.shape, seed + 2, 3.0f);
  for (auto& v : x.data) v += 1.0f;  // a mean away from 0
  const Tensor dy = random_tensor(c.shape, seed + 3);
  const auto g0 = random_values(c.shape[1], seed + 4, 0.1f), b0 = random_values(c.shape[1], seed + 5, 0.1f);
  auto want_y = l.forward(x, 2);
  EXPECT_TRUE(want_y) << want_y.error().message;
  std::vector<float> want_dg = g0, want_db = b0;
  auto want_dx = l.backward(x, dy, want_dg, want_db, 2);
  EXPECT_TRUE(want_dx) << want_dx.error().message;
  NormResult got;
  got.dgamma = g0;
  got.dbeta = b0;
  auto y = gpu::train::norm_lrelu_forward(l, x, where);
  auto dx = gpu::train::norm_lrelu_backward(l, x, dy, got.dgamma, got.dbeta, where);
  EXPECT_TRUE(y) << y.error().message;
  EXPECT_TRUE(dx) << dx.error().message;
  if (!y || !dx || !want_y || !want_dx) return got;
  got.y = std::move(*y);
  got.dx = std::move(*dx);
  auto rounding = [](const std::vector<float>& want, double rel_scale) {
    const double scale = max_abs(want);
    return [&want, scale, rel_scale](size_t i) { return std::ldexp(std::fabs(static_cast<double>(want[i])), -22) + rel_scale * scale; };
  };
  expect_within(got.y.data, want_y->data, rounding(want_y->data, 1e-9), 1e-6, "y");
  expect_within(got.dx.data, want_dx->data, rounding(want_dx->data, 1e-7), 1e-6, "dx");
  expect_within(got.dgamma, want_dg, rounding(want_dg, 1e-7), 1e-6, "dgamma");
  expect_within(got.dbeta, want_db, rounding(want_db, 1e-7), 1e-6, "dbeta");
  return got;
}

TEST(TrainGpuEmulation, InstanceNormMatchesTheReference) {
  uint64_t seed = 500;
  for (const auto& c : norm_cases()) check_norm_case(c, seed += 10, kEmulated, "emulation");
}

// ------------------------------------------------------------------------------------------------
// Loss

struct LossCase {
  std::string name;
  std::array<size_t, 5> shape;
  float logit_scale;
  double dice_weight;
};
std::vector<LossCase> loss_cases() {
  return {{"2×3 classes on 5×7×9", {2, 3, 5, 7, 9}, 3.0f, 1.0},
          {"1×2 classes on 4×4×4", {1, 2, 4, 4, 4}, 2.0f, 1.0},
          {"2×5 classes on 3×5×7, dice_weight 0.5", {2, 5, 3, 5, 7}, 2.0f, 0.5},
          {"1×4 classes on 5×5×5, cross-entropy alone", {1, 4, 5, 5, 5}, 2.0f, 0.0},
          {"1×16 classes on 3×3×3 (the most the kernels take)", {1, 16, 3, 3, 3}, 2.0f, 1.0},
          {"2×3 classes, logits up to ±60 (the maximum subtracted)", {2, 3, 3, 4, 5}, 60.0f, 1.0},
          {"3×3 classes on 11×11×11 (several loss blocks)", {3, 3, 11, 11, 11}, 2.0f, 1.0}};
}

std::vector<uint8_t> random_target(size_t n, size_t classes, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<uint8_t> t(n);
  for (auto& v : t) v = static_cast<uint8_t>(rng() % classes);
  return t;
}

train::LossResult check_loss_case(const LossCase& c, uint64_t seed, Where where, const std::string& label) {
  SCOPED_TRACE(label + ", " + c.name);
  const Tensor logits = random_tensor(c.shape, seed, c.logit_scale);
  const auto target = random_target(c.shape[0] * logits.spatial(), c.shape[1], seed + 1);
  auto want = train::dice_ce_loss(logits, target, 1e-5, 2, c.dice_weight);
  auto got = gpu::train::dice_ce_loss(logits, target, 1e-5, c.dice_weight, where);
  EXPECT_TRUE(want) << want.error().message;
  EXPECT_TRUE(got) << got.error().message;
  if (!want || !got) return {};
  EXPECT_NEAR(got->cross_entropy, want->cross_entropy, 1e-12 * std::fabs(want->cross_entropy) + 1e-15);
  EXPECT_NEAR(got->dice, want->dice, 1e-12 * std::fabs(want->dice) + 1e-15);
  EXPECT_NEAR(got->loss, want->loss, 1e-12 * (std::fabs(want->cross_entropy) + std::fabs(want->dice)) + 1e-15);
  const double scale = max_abs(want->dlogits.data);
  expect_within(
      got->dlogits.data, want->dlogits.data, [&](size_t i) { return std::ldexp(std::fabs(static_cast<double>(want->dlogits.data[i])), -22) + 1e-9 * scale; }, 1e-6,
      "dlogits");
  return std::move(*got);
}

TEST(TrainGpuEmulation, DiceCrossEntropyMatchesTheReference) {
  uint64_t seed = 900;
  for (const auto& c : loss_cases()) check_loss_case(c, seed += 10, kEmulated, "emulation");
}

// The loss in two halves (statistics, then the gradient from them), the data-parallel form:
// (1) on one batch with scale 1 the fused entry's bits exactly (values and gradient); with scale
// ¼ (a power of two) exactly ¼ of them; (2) the statistics in dice_ce_loss's LossAllReduce layout,
// within double rounding of the CPU reference's `across` vector; (3) the batch split in two
// "ranks" whose statistics are summed: the concatenated gradients are the CPU reference's over
// the whole batch (within check_loss_case's bound) and the values equal its.
TEST(TrainGpuEmulation, DiceCrossEntropyInTwoHalvesForDataParallelism) {
  const gpu::train::DeviceStream emu{0, nullptr, Backend::kEmulated};
  uint64_t seed = 1900;
  for (const auto& c : loss_cases()) {
    SCOPED_TRACE(c.name);
    seed += 10;
    const Tensor logits = random_tensor(c.shape, seed, c.logit_scale);
    const size_t n = c.shape[0], classes = c.shape[1], m = logits.spatial();
    const auto target = random_target(n * m, classes, seed + 1);
    const gpu::train::LossShape shape{n, classes, m};
    std::vector<std::byte> scratch(*gpu::train::dice_ce_loss_scratch(shape));
    Tensor fused(logits.shape), split(logits.shape), quarter(logits.shape);
    auto fv = gpu::train::dice_ce_loss_device(emu, shape, logits.data.data(), target.data(), 1e-5, c.dice_weight, fused.data.data(), scratch.data(), scratch.size());
    ASSERT_TRUE(fv) << fv.error().message;
    auto stats = gpu::train::dice_ce_loss_stats_device(emu, shape, logits.data.data(), target.data(), scratch.data(), scratch.size());
    ASSERT_TRUE(stats) << stats.error().message;
    auto sv = gpu::train::dice_ce_loss_grad_device(emu, shape, logits.data.data(), target.data(), *stats, 1e-5, c.dice_weight, 1.0, split.data.data(), scratch.data(),
                                                   scratch.size());
    ASSERT_TRUE(sv) << sv.error().message;
    EXPECT_EQ(sv->loss, fv->loss);
    EXPECT_EQ(sv->cross_entropy, fv->cross_entropy);
    EXPECT_EQ(sv->dice, fv->dice);
    EXPECT_TRUE(split.data == fused.data) << "two halves differ from the fused pass";
    ASSERT_TRUE(gpu::train::dice_ce_loss_grad_device(emu, shape, logits.data.data(), target.data(), *stats, 1e-5, c.dice_weight, 0.25, quarter.data.data(),
                                                     scratch.data(), scratch.size()));
    // Exact unless ¼ of the value is subnormal (the scale is applied in double before rounding to
    // float, so there the two round once instead of twice: within one subnormal step).
    bool exact_quarter = true;
    for (size_t i = 0; i < fused.data.size(); ++i) {
      const float want_q = fused.data[i] * 0.25f;
      exact_quarter = exact_quarter && (std::fabs(fused.data[i]) >= 4 * std::numeric_limits<float>::min()
                                            ? quarter.data[i] == want_q
                                            : std::fabs(quarter.data[i] - want_q) <= std::numeric_limits<float>::denorm_min());
    }
    EXPECT_TRUE(exact_quarter) << "scale ¼";

    std::vector<double> want_stats;
    auto capture = [&](std::span<double> v) -> Result<void> {
      want_stats.assign(v.begin(), v.end());
      return {};
    };
    auto want = train::dice_ce_loss(logits, target, 1e-5, 1, c.dice_weight, capture);
    ASSERT_TRUE(want) << want.error().message;
    ASSERT_EQ(stats->size(), want_stats.size());
    for (size_t i = 0; i < want_stats.size(); ++i) EXPECT_NEAR((*stats)[i], want_stats[i], 1e-12 * std::fabs(want_stats[i]) + 1e-12) << "statistic " << i;

    if (n < 2) continue;
    // Two "ranks": samples [0, n/2) and [n/2, n).
    const size_t cut = n / 2, per = classes * m;
    std::vector<double> sum(2 * classes, 0.0);
    std::vector<std::vector<double>> own(2);
    for (size_t r = 0; r < 2; ++r) {
      const size_t lo = r == 0 ? 0 : cut, cnt = r == 0 ? cut : n - cut;
      const gpu::train::LossShape part{cnt, classes, m};
      auto st = gpu::train::dice_ce_loss_stats_device(emu, part, logits.data.data() + lo * per, target.data() + lo * m, scratch.data(), scratch.size());
      ASSERT_TRUE(st) << st.error().message;
      for (size_t i = 0; i < sum.size(); ++i) sum[i] += (*st)[i];
    }
    Tensor joined(logits.shape);
    for (size_t r = 0; r < 2; ++r) {
      const size_t lo = r == 0 ? 0 : cut, cnt = r == 0 ? cut : n - cut;
      const gpu::train::LossShape part{cnt, classes, m};
      auto v = gpu::train::dice_ce_loss_grad_device(emu, part, logits.data.data() + lo * per, target.data() + lo * m, sum, 1e-5, c.dice_weight, 1.0,
                                                    joined.data.data() + lo * per, scratch.data(), scratch.size());
      ASSERT_TRUE(v) << v.error().message;
      EXPECT_NEAR(v->loss, want->loss, 1e-12 * (std::fabs(want->cross_entropy) + std::fabs(want->dice)) + 1e-15) << "rank " << r;
    }
    const double scale = max_abs(want->dlogits.data);
    expect_within(
        joined.data, want->dlogits.data, [&](size_t i) { return std::ldexp(std::fabs(static_cast<double>(want->dlogits.data[i])), -22) + 1e-9 * scale; }, 1e-6,
        "two ranks' dlogits");
  }
}

// ------------------------------------------------------------------------------------------------
// Optimizers: to the bit.

struct OptResult {
  std::vector<float> params, a, b;  // SGD: velocity; AdamW: m, v
  std::vector<uint16_t> bf16;
};

OptResult run_sgd(bool nesterov, Where where, bool reference) {
  train::Sgd opt;
  opt.nesterov = nesterov;
  std::vector<float> p = random_values(1000, 11, 1.0f);
  std::vector<uint16_t> bf;
  for (int step = 0; step < 3; ++step) {
    const auto g = random_values(p.size(), 20 + static_cast<uint64_t>(step), 0.3f);
    const double lr = 0.01 * (1.0 - step / 3.0);
    if (reference) {
      auto r = opt.step(p, g, lr);
      EXPECT_TRUE(r) << r.error().message;
    } else {
      auto r = gpu::train::sgd_step(opt, p, g, lr, &bf, where);
      EXPECT_TRUE(r) << r.error().message;
    }
  }
  return {p, opt.velocity, {}, bf};
}

OptResult run_adamw(Where where, bool reference) {
  train::AdamW opt;
  std::vector<float> p = random_values(1001, 12, 1.0f);
  std::vector<uint16_t> bf;
  for (int step = 0; step < 3; ++step) {
    const auto g = random_values(p.size(), 30 + static_cast<uint64_t>(step), 0.3f);
    if (reference) {
      auto r = opt.step(p, g, 1e-3);
      EXPECT_TRUE(r) << r.error().message;
    } else {
      auto r = gpu::train::adamw_step(opt, p, g, 1e-3, &bf, where);
      EXPECT_TRUE(r) << r.error().message;
    }
  }
  EXPECT_EQ(opt.t, 3u);
  return {p, opt.m, opt.v, bf};
}

void expect_bits(const std::vector<float>& got, const std::vector<float>& want, const char* what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  size_t differ = 0;
  for (size_t i = 0; i < got.size(); ++i) differ += bits(got[i]) != bits(want[i]) ? 1u : 0u;
  EXPECT_EQ(differ, 0u) << what << ": values differing from the reference's bits";
}

void check_optimizers(Where where) {
  for (bool nesterov : {true, false}) {
    SCOPED_TRACE(nesterov ? "sgd nesterov" : "sgd");
    const OptResult want = run_sgd(nesterov, where, true), got = run_sgd(nesterov, where, false);
    expect_bits(got.params, want.params, "params");
    expect_bits(got.a, want.a, "velocity");
    ASSERT_EQ(got.bf16.size(), want.params.size());
    for (size_t i = 0; i < got.bf16.size(); ++i) ASSERT_EQ(got.bf16[i], gpu::train::bf16_bits(want.params[i])) << i;
  }
  SCOPED_TRACE("adamw");
  const OptResult want = run_adamw(where, true), got = run_adamw(where, false);
  expect_bits(got.params, want.params, "params");
  expect_bits(got.a, want.a, "m");
  expect_bits(got.b, want.b, "v");
  ASSERT_EQ(got.bf16.size(), want.params.size());
  for (size_t i = 0; i < got.bf16.size(); ++i) ASSERT_EQ(got.bf16[i], gpu::train::bf16_bits(want.params[i])) << i;
}

TEST(TrainGpuEmulation, OptimizersMatchTheReferenceToTheBit) { check_optimizers(kEmulated); }

// ------------------------------------------------------------------------------------------------
// The checks: every failing case names its field, beside a passing twin (the base case).

using testing::CheckCase;

template <typename T>
Result<void> drop(Result<T> r) {
  if (!r) return std::unexpected(r.error());
  return {};
}

std::vector<CheckCase> check_cases() {
  const ConvCase base{"", false, 1, 3, 5, 3, 1, {5, 7, 9}};
  const ConvCase tbase{"", true, 1, 3, 5, 2, 2, {3, 4, 5}};
  auto conv = [base](std::function<void(train::Conv3d&, Tensor&, Tensor&)> mutate) {
    return [base, mutate]() -> Result<void> {
      auto l = make_layer<train::Conv3d>(base, 1);
      Tensor x = random_tensor({1, 3, 5, 7, 9}, 2), dy = random_tensor({1, 5, 5, 7, 9}, 3);
      mutate(l, x, dy);
      std::vector<float> dw(l.weight.size()), db(l.bias.size());
      auto y = gpu::train::conv3d_forward(l, x, kEmulated);
      if (!y) return std::unexpected(y.error());
      return drop(gpu::train::conv3d_backward(l, x, dy, dw, db, kEmulated));
    };
  };
  auto tconv = [tbase](std::function<void(train::ConvTranspose3d&)> mutate) {
    return [tbase, mutate]() -> Result<void> {
      auto l = make_layer<train::ConvTranspose3d>(tbase, 1);
      mutate(l);
      return drop(gpu::train::conv_transpose3d_forward(l, random_tensor({1, 3, 3, 4, 5}, 2), kEmulated));
    };
  };
  auto norm = [](std::function<void(train::InstanceNormLeakyRelu&, Tensor&)> mutate) {
    return [mutate]() -> Result<void> {
      auto l = make_norm(3, 1);
      Tensor x = random_tensor({1, 3, 2, 3, 4}, 2);
      mutate(l, x);
      return drop(gpu::train::norm_lrelu_forward(l, x, kEmulated));
    };
  };
  auto loss = [](size_t classes, size_t target_size, uint8_t bad) {
    return [=]() -> Result<void> {
      const Tensor logits = random_tensor({1, classes, 2, 2, 2}, 5);
      auto t = random_target(target_size, std::max<size_t>(classes, 1), 6);
      if (bad != 0 && !t.empty()) t[3] = bad;
      return drop(gpu::train::dice_ce_loss(logits, t, 1e-5, 1.0, kEmulated));
    };
  };
  // The two-pass loss on 3 classes × 8 voxels with its statistics or scale mutated.
  auto split_loss = [](std::function<void(std::vector<double>&, double&)> mutate) {
    return [=]() -> Result<void> {
      const Tensor logits = random_tensor({1, 3, 2, 2, 2}, 5);
      const auto t = random_target(8, 3, 6);
      const gpu::train::DeviceStream emu{0, nullptr, Backend::kEmulated};
      const gpu::train::LossShape shape{1, 3, 8};
      std::vector<std::byte> scratch(*gpu::train::dice_ce_loss_scratch(shape));
      auto st = gpu::train::dice_ce_loss_stats_device(emu, shape, logits.data.data(), t.data(), scratch.data(), scratch.size());
      if (!st) return std::unexpected(st.error());
      double scale = 0.5;
      mutate(*st, scale);
      Tensor d(logits.shape);
      return drop(gpu::train::dice_ce_loss_grad_device(emu, shape, logits.data.data(), t.data(), *st, 1e-5, 1.0, scale, d.data.data(), scratch.data(), scratch.size()));
    };
  };
  auto device_shape = [](gpu::train::ConvShape s) {
    return [s]() -> Result<void> {
      auto r = gpu::train::conv_backward_weight_scratch(s);
      return drop(r);
    };
  };
  gpu::train::ConvShape ds{1, 3, 5, 5, 7, 9, 3, 1, 1, false};
  return {
      {"conv3d: base case", conv([](auto&, auto&, auto&) {}), ""},
      {"conv3d: k = 5", conv([](auto& l, auto&, auto&) { l.k = 5; l.pad = 2; l.weight.resize(3 * 5 * 125); }), "k = 5"},
      {"conv3d: pad 0 with k 3", conv([](auto& l, auto&, auto&) { l.pad = 0; }), "pad = 0"},
      {"conv3d: stride 3", conv([](auto& l, auto&, auto&) { l.stride = 3; }), "stride = 3"},
      {"conv3d: channels", conv([](auto&, auto& x, auto&) { x = random_tensor({1, 4, 5, 7, 9}, 2); }), "cin = 3"},
      {"conv3d: weight size", conv([](auto& l, auto&, auto&) { l.weight.pop_back(); }), "weight has"},
      {"conv3d: bias size", conv([](auto& l, auto&, auto&) { l.bias.push_back(0.5f); }), "bias has"},
      {"conv3d: x data", conv([](auto&, auto& x, auto&) { x.data.pop_back(); }), "x has"},
      {"conv3d: dy shape", conv([](auto&, auto&, auto& dy) { dy = random_tensor({1, 5, 5, 7, 8}, 3); }), "dy is"},
      {"transposed: base case", tconv([](auto&) {}), ""},
      {"transposed: k = 3", tconv([](auto& l) { l.k = 3; l.weight.resize(3 * 5 * 27); }), "k = 3"},
      {"transposed: stride 1", tconv([](auto& l) { l.stride = 1; }), "stride = 1"},
      {"transposed: pad 1", tconv([](auto& l) { l.pad = 1; }), "pad = 1"},
      {"norm: base case", norm([](auto&, auto&) {}), ""},
      {"norm: gamma size", norm([](auto& l, auto&) { l.gamma.pop_back(); }), "gamma has"},
      {"norm: beta size", norm([](auto& l, auto&) { l.beta.push_back(1.0f); }), "beta has"},
      {"norm: channels", norm([](auto&, auto& x) { x = random_tensor({1, 2, 2, 3, 4}, 2); }), "channels"},
      {"norm: eps", norm([](auto& l, auto&) { l.eps = 0; }), "eps"},
      {"loss: base case", loss(3, 8, 0), ""},
      {"loss: 17 classes", loss(17, 8, 0), "classes = 17"},
      {"loss: 1 class", loss(1, 8, 0), "classes = 1"},
      {"loss: target size", loss(3, 7, 0), "target has"},
      {"loss: target class", loss(3, 8, 3), "target voxel 3 is class 3"},
      {"loss halves: base case", split_loss([](auto&, auto&) {}), ""},
      {"loss halves: statistics length", split_loss([](auto& st, auto&) { st.pop_back(); }), "5 statistics for 3 classes, want 6"},
      {"loss halves: fewer voxels than the batch", split_loss([](auto& st, auto&) { st[1] = 7; }), "the voxel count) is 7"},
      {"loss halves: fractional voxel count", split_loss([](auto& st, auto&) { st[1] = 8.5; }), "the voxel count) is 8.5"},
      {"loss halves: scale", split_loss([](auto&, auto& scale) { scale = INFINITY; }), "scale = inf"},
      {"sgd: base case", [] { train::Sgd o; std::vector<float> p(4, 1.0f); return gpu::train::sgd_step(o, p, std::vector<float>(4, 0.5f), 0.1, nullptr, kEmulated); }, ""},
      {"sgd: grads size", [] { train::Sgd o; std::vector<float> p(4, 1.0f); return gpu::train::sgd_step(o, p, std::vector<float>(3, 0.5f), 0.1, nullptr, kEmulated); },
       "3 grads"},
      {"sgd: velocity size",
       [] {
         train::Sgd o;
         o.velocity.assign(5, 0.0f);
         std::vector<float> p(4, 1.0f);
         return gpu::train::sgd_step(o, p, std::vector<float>(4, 0.5f), 0.1, nullptr, kEmulated);
       },
       "velocity has 5"},
      {"adamw: m size",
       [] {
         train::AdamW o;
         o.m.assign(2, 0.0f);
         std::vector<float> p(4, 1.0f);
         return gpu::train::adamw_step(o, p, std::vector<float>(4, 0.5f), 0.1, nullptr, kEmulated);
       },
       "m has 2"},
      {"device shape: base case", device_shape(ds), ""},
      {"device shape: n = 0", device_shape([ds] { auto s = ds; s.n = 0; return s; }()), "n = 0"},
      {"device shape: w = 0", device_shape([ds] { auto s = ds; s.w = 0; return s; }()), "w = 0"},
      {"device shape: too large", device_shape([ds] { auto s = ds; s.d = s.h = s.w = 1024; s.cin = 8; return s; }()), "fewer than 2^31"},
      {"device shape: transposed k", device_shape([ds] { auto s = ds; s.transposed = true; return s; }()), "transposed conv3d: k = 3"},
  };
}

TEST(TrainGpuChecks, FailingCasesNameTheField) { testing::expect_checks(check_cases()); }

// Deep supervision's targets made on the device equal the CPU reference's downsample_target, voxel
// for voxel (the emulation runs the kernel's index mapping); bad levels and shapes named.
TEST(TrainGpuEmulation, DownsampledTargetsEqualTheReference) {
  const gpu::train::DeviceStream emu{0, nullptr, Backend::kEmulated};
  std::vector<uint8_t> t(2 * 8 * 12 * 16);
  for (size_t i = 0; i < t.size(); ++i) t[i] = static_cast<uint8_t>((i * 7 + i / 13) % 5);
  for (size_t j : {1u, 2u}) {
    const auto want = train::downsample_target(t, {2, 8, 12, 16}, j);
    std::vector<uint8_t> got(want.size(), 0xEE);
    ASSERT_TRUE(gpu::train::downsample_target_device(emu, 2, 8, 12, 16, j, t.data(), got.data()));
    EXPECT_EQ(got, want) << "level " << j;
  }
  std::vector<uint8_t> out(t.size());
  EXPECT_NE(gpu::train::downsample_target_device(emu, 2, 8, 12, 16, 0, t.data(), out.data()).error().message.find("level j = 0"), std::string::npos);
  EXPECT_NE(gpu::train::downsample_target_device(emu, 2, 8, 12, 16, 3, t.data(), out.data()).error().message.find("8×12×16 is not a multiple of 8"),
            std::string::npos);
}

// Without a device, the device entries say so after their checks.
TEST(TrainGpuChecks, DeviceEntriesWithoutADeviceAreUnavailable) {
  if (gpu::gpu_probe()) GTEST_SKIP() << "a CUDA device is present: the device tests below run instead";
  const ConvCase base{"", false, 1, 3, 5, 3, 1, {5, 7, 9}};
  const auto l = make_layer<train::Conv3d>(base, 1);
  auto y = gpu::train::conv3d_forward(l, random_tensor({1, 3, 5, 7, 9}, 2), kDevice);
  ASSERT_FALSE(y);
  EXPECT_EQ(y.error().code, ErrorCode::kUnavailable) << y.error().message;
  gpu::train::ConvShape s{1, 3, 5, 5, 7, 9, 3, 1, 1, false};
  auto r = gpu::train::conv_forward_device({}, s, nullptr, nullptr, nullptr, nullptr);
  ASSERT_FALSE(r);
  // Without CUDA in the build the shape is valid and the answer is kUnavailable; with CUDA but no
  // device, the null pointers are refused first.
  EXPECT_TRUE(r.error().code == ErrorCode::kUnavailable || r.error().code == ErrorCode::kInvalidArgument) << r.error().message;
  EXPECT_FALSE(gpu::train::available(0));
}

// ------------------------------------------------------------------------------------------------
// The device (skipped, saying why, without one; scripts/gpu-check sets TRESOR_REQUIRE_GPU=1).

TEST(TrainGpuDevice, ConvolutionsMatchTheReferenceAndAreDeterministic) {
  auto devs = gpu::gpu_probe();
  TRESOR_SKIP_WITHOUT_GPU(devs);
  const auto first = check_convolutions(kDevice, "device");
  const auto second = check_convolutions(kDevice, "repeat");
  const auto emulated = check_convolutions(kEmulated, "emulation");
  ASSERT_EQ(first.size(), second.size());
  ASSERT_EQ(first.size(), emulated.size());
  for (size_t i = 0; i < first.size(); ++i) {
    SCOPED_TRACE(conv_cases()[i].name);
    // No atomics: the same bits on every run, weight gradients included.
    EXPECT_TRUE(first[i].y.data == second[i].y.data);
    EXPECT_TRUE(first[i].dx.data == second[i].dx.data);
    EXPECT_TRUE(first[i].dweight == second[i].dweight);
    EXPECT_TRUE(first[i].dbias == second[i].dbias);
    // The bias gradient is the fixed tree over the same partials: the emulation's bits.
    EXPECT_TRUE(first[i].dbias == emulated[i].dbias);
  }
}

TEST(TrainGpuDevice, InstanceNormMatchesTheReferenceAndTheEmulationToTheBit) {
  auto devs = gpu::gpu_probe();
  TRESOR_SKIP_WITHOUT_GPU(devs);
  uint64_t seed = 500;
  for (const auto& c : norm_cases()) {
    seed += 10;
    const NormResult got = check_norm_case(c, seed, kDevice, "device");
    const NormResult emu = check_norm_case(c, seed, kEmulated, "emulation");
    SCOPED_TRACE(c.name);
    // The same tree over the same per-thread partials, the same unfused double expressions.
    EXPECT_TRUE(got.y.data == emu.y.data);
    EXPECT_TRUE(got.dx.data == emu.dx.data);
    EXPECT_TRUE(got.dgamma == emu.dgamma);
    EXPECT_TRUE(got.dbeta == emu.dbeta);
  }
}

TEST(TrainGpuDevice, DiceCrossEntropyMatchesTheReference) {
  auto devs = gpu::gpu_probe();
  TRESOR_SKIP_WITHOUT_GPU(devs);
  uint64_t seed = 900;
  for (const auto& c : loss_cases()) {
    seed += 10;
    const auto a = check_loss_case(c, seed, kDevice, "device");
    const auto b = check_loss_case(c, seed, kDevice, "device again");
    EXPECT_EQ(a.loss, b.loss) << c.name;  // deterministic sums
    EXPECT_TRUE(a.dlogits.data == b.dlogits.data) << c.name;
  }
}

TEST(TrainGpuDevice, OptimizersMatchTheReferenceToTheBit) {
  auto devs = gpu::gpu_probe();
  TRESOR_SKIP_WITHOUT_GPU(devs);
  check_optimizers(kDevice);
}

}  // namespace
}  // namespace tresor
