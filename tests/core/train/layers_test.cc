// The training layers' CPU reference (include/tresor/train/layers.h) against PyTorch (Debian's
// python3-torch, float64, through tests/core/train/torch_oracle.py) on random shapes with odd
// sizes, and against finite differences of the reference itself; bad inputs named.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <random>
#include <type_traits>

#include <nlohmann/json.hpp>

#include "lowering.h"
#include "support/test_support.h"
#include "tresor/train/layers.h"

namespace tresor::train {
namespace {

using testing::TempDir;

std::vector<float> random_values(size_t n, uint32_t seed, float scale = 1) {
  std::mt19937 g(seed);
  std::normal_distribution<float> d(0, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = d(g);
  return v;
}
Tensor random_tensor(std::array<size_t, 5> shape, uint32_t seed, float scale = 1) {
  Tensor t(shape);
  t.data = random_values(t.size(), seed, scale);
  return t;
}

struct ConvCase {
  std::array<size_t, 5> x;
  size_t cout, k, stride, pad;
};

class Torch : public ::testing::Test {
 protected:
  void SetUp() override {
    if (testing::run_command({"/usr/bin/python3", "-c", "import torch"}).exit_code != 0) GTEST_SKIP() << "python3-torch is not installed (scripts/bootstrap installs it)";
  }
  void put(const std::string& name, const std::vector<float>& v) {
    testing::write_file(dir_.file(name + ".f32"), ByteSpan(reinterpret_cast<const std::byte*>(v.data()), v.size() * 4));
  }
  void run(const nlohmann::json& c) {
    testing::write_file(dir_.file("case.json"), as_bytes(c.dump()));
    auto r = testing::run_command({"/usr/bin/python3", TRESOR_TORCH_ORACLE, dir_.path().string()});
    ASSERT_EQ(r.exit_code, 0) << r.err;
  }
  std::vector<double> get(const std::string& name) {
    const Bytes b = testing::read_file(dir_.file(name + ".f64"));
    std::vector<double> v(b.size() / 8);
    std::memcpy(v.data(), b.data(), v.size() * 8);
    return v;
  }
  // Largest |a − b| relative to the larger of 1 and b's largest magnitude.
  template <typename A>
  static double rel_error(const std::vector<A>& a, const std::vector<double>& b) {
    EXPECT_EQ(a.size(), b.size());
    double worst = 0, mag = 1;
    for (double x : b) mag = std::max(mag, std::abs(x));
    for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) worst = std::max(worst, std::abs(static_cast<double>(a[i]) - b[i]));
    return worst / mag;
  }
  // A convolution of either kind against the oracle's `layer` on random weights, input and
  // output gradient: outputs and every gradient within kTol; one thread gives the same bytes.
  template <typename Layer>
  void check_convolution(Layer& layer, const ConvCase& c, const char* oracle_layer, uint32_t& seed);
  TempDir dir_;
};

// Float32 storage, double accumulation against float64: each output is one float rounding away
// (relative 6e-8) plus the float32 inputs' own rounding, which both sides share; 1e-5 of the
// largest magnitude bounds it with room for sums of hundreds of terms.
constexpr double kTol = 1e-5;

template <typename Layer>
void Torch::check_convolution(Layer& layer, const ConvCase& c, const char* oracle_layer, uint32_t& seed) {
  layer.cin = c.x[1];
  layer.cout = c.cout;
  layer.k = c.k;
  layer.stride = c.stride;
  layer.pad = c.pad;
  layer.weight = random_values(c.cout * c.x[1] * c.k * c.k * c.k, seed++, 0.3f);
  layer.bias = random_values(c.cout, seed++);
  const Tensor x = random_tensor(c.x, seed++);
  auto y = layer.forward(x);
  ASSERT_TRUE(y) << y.error().message;
  const Tensor dy = random_tensor(y->shape, seed++);
  std::vector<float> dw(layer.weight.size(), 0), db(layer.bias.size(), 0);
  auto dx = layer.backward(x, dy, dw, db);
  ASSERT_TRUE(dx) << dx.error().message;
  put("x", x.data);
  put("w", layer.weight);
  put("b", layer.bias);
  put("dy", dy.data);
  run({{"layer", oracle_layer}, {"x", c.x}, {"cin", c.x[1]}, {"cout", c.cout}, {"k", c.k}, {"stride", c.stride}, {"pad", c.pad}});
  const std::string what = std::string(oracle_layer) + " " + x.shape_text() + " k" + std::to_string(c.k) + " s" + std::to_string(c.stride) + " p" + std::to_string(c.pad);
  EXPECT_LT(rel_error(y->data, get("y")), kTol) << what;
  EXPECT_LT(rel_error(dx->data, get("dx")), kTol) << what;
  EXPECT_LT(rel_error(dw, get("dw")), kTol) << what;
  EXPECT_LT(rel_error(db, get("db")), kTol) << what;
  EXPECT_TRUE(layer.forward(x, 1)->data == y->data) << what << ": one thread, the same bytes";
}

TEST_F(Torch, Conv3dForwardAndBackwardMatchPyTorch) {
  const ConvCase cases[] = {
      {{2, 3, 7, 6, 5}, 4, 3, 1, 1},   // 3×3×3, stride 1 (the U-Net's convolutions)
      {{1, 2, 9, 8, 7}, 3, 3, 2, 1},   // 3×3×3, stride 2 (its downsampling), odd sizes
      {{2, 5, 4, 3, 6}, 2, 1, 1, 0},   // 1×1×1 (its segmentation heads)
      {{1, 1, 5, 5, 5}, 1, 3, 1, 0},   // no padding
  };
  uint32_t seed = 1;
  for (const ConvCase& c : cases) {
    Conv3d conv;
    check_convolution(conv, c, "conv3d", seed);
  }
}

TEST_F(Torch, InstanceNormLeakyReluMatchesPyTorch) {
  for (const std::array<size_t, 5>& shape : {std::array<size_t, 5>{2, 3, 5, 4, 7}, std::array<size_t, 5>{1, 4, 3, 3, 3}}) {
    InstanceNormLeakyRelu l;
    l.channels = shape[1];
    l.gamma = random_values(shape[1], 11, 1);
    l.beta = random_values(shape[1], 12, 1);
    // Channels at different offsets and scales, as activations are.
    Tensor x = random_tensor(shape, 13, 2);
    for (size_t i = 0; i < x.data.size(); ++i) x.data[i] += static_cast<float>((i / x.spatial()) % shape[1]) * 3.0f;
    auto y = l.forward(x);
    ASSERT_TRUE(y) << y.error().message;
    const Tensor dy = random_tensor(shape, 14);
    std::vector<float> dg(shape[1], 0), db(shape[1], 0);
    auto dx = l.backward(x, dy, dg, db);
    ASSERT_TRUE(dx) << dx.error().message;
    put("x", x.data);
    put("gamma", l.gamma);
    put("beta", l.beta);
    put("dy", dy.data);
    run({{"layer", "norm"}, {"x", shape}, {"eps", l.eps}, {"slope", l.slope}});
    EXPECT_LT(rel_error(y->data, get("y")), kTol) << x.shape_text();
    EXPECT_LT(rel_error(dx->data, get("dx")), kTol) << x.shape_text();
    EXPECT_LT(rel_error(dg, get("dgamma")), kTol) << x.shape_text();
    EXPECT_LT(rel_error(db, get("dbeta")), kTol) << x.shape_text();
  }
}

TEST_F(Torch, DiceCrossEntropyLossMatchesPyTorch) {
  for (const std::array<size_t, 5>& shape : {std::array<size_t, 5>{2, 2, 4, 5, 3}, std::array<size_t, 5>{1, 3, 3, 4, 5}}) {
    const Tensor logits = random_tensor(shape, 21, 2);
    std::vector<uint8_t> target(shape[0] * shape[2] * shape[3] * shape[4]);
    std::mt19937 g(22);
    for (auto& t : target) t = static_cast<uint8_t>(g() % shape[1]);
    auto r = dice_ce_loss(logits, target);
    ASSERT_TRUE(r) << r.error().message;
    put("logits", logits.data);
    testing::write_file(dir_.file("target.u8"), ByteSpan(reinterpret_cast<const std::byte*>(target.data()), target.size()));
    run({{"layer", "loss"}, {"x", shape}, {"smooth", 1e-5}});
    const auto want = get("loss");
    EXPECT_NEAR(r->loss, want[0], 1e-9) << logits.shape_text();
    EXPECT_NEAR(r->cross_entropy, want[1], 1e-9);
    EXPECT_NEAR(r->dice, want[2], 1e-9);
    EXPECT_LT(rel_error(r->dlogits.data, get("dlogits")), kTol) << logits.shape_text();
  }
}

TEST_F(Torch, TransposedConvolutionMatchesPyTorch) {
  const ConvCase cases[] = {
      {{2, 4, 3, 4, 5}, 3, 2, 2, 0},  // the U-Net's upsampling
      {{1, 2, 3, 3, 2}, 2, 3, 2, 1},  // overlapping taps, padding
  };
  uint32_t seed = 50;
  for (const ConvCase& c : cases) {
    ConvTranspose3d t;
    check_convolution(t, c, "tconv", seed);
  }
}

// Five steps of each optimizer from the same parameters and gradients as torch.optim's.
TEST_F(Torch, OptimizersMatchTorchOptim) {
  const size_t n = 257, steps = 5;
  const std::vector<float> p0 = random_values(n, 60), grads = random_values(n * steps, 61);
  put("p", p0);
  put("g", grads);
  for (bool nesterov : {true, false}) {
    Sgd sgd;
    sgd.nesterov = nesterov;
    std::vector<float> p = p0;
    for (size_t s = 0; s < steps; ++s) {
      const std::vector<float> g(grads.begin() + static_cast<std::ptrdiff_t>(s * n), grads.begin() + static_cast<std::ptrdiff_t>((s + 1) * n));
      ASSERT_TRUE(sgd.step(p, g, 0.01));
    }
    run({{"layer", "sgd"}, {"n", n}, {"steps", steps}, {"lr", 0.01}, {"momentum", 0.99}, {"nesterov", nesterov}, {"wd", 3e-5}});
    EXPECT_LT(rel_error(p, get("p")), kTol) << "sgd nesterov " << nesterov;
  }
  AdamW adam;
  std::vector<float> p = p0;
  for (size_t s = 0; s < steps; ++s) {
    const std::vector<float> g(grads.begin() + static_cast<std::ptrdiff_t>(s * n), grads.begin() + static_cast<std::ptrdiff_t>((s + 1) * n));
    ASSERT_TRUE(adam.step(p, g, 3e-3));
  }
  run({{"layer", "adamw"}, {"n", n}, {"steps", steps}, {"lr", 3e-3}, {"beta1", 0.9}, {"beta2", 0.999}, {"eps", 1e-8}, {"wd", 0.01}});
  EXPECT_LT(rel_error(p, get("p")), kTol) << "adamw";
  EXPECT_FALSE(adam.step(p, std::vector<float>(3), 0.1));
  // The poly schedule: lr0 at the start, 0 at the end, (1/2)^0.9 halfway.
  EXPECT_DOUBLE_EQ(poly_lr(0.01, 0, 100), 0.01);
  EXPECT_NEAR(poly_lr(0.01, 50, 100), 0.01 * std::pow(0.5, 0.9), 1e-15);
  EXPECT_EQ(poly_lr(0.01, 100, 100), 0.0);
}

TEST(TrainLayers, ConcatAndSplitAreInverses) {
  const Tensor a = random_tensor({2, 3, 2, 3, 4}, 70), b = random_tensor({2, 2, 2, 3, 4}, 71);
  auto c = concat_channels(a, b);
  ASSERT_TRUE(c);
  EXPECT_EQ(c->shape, (std::array<size_t, 5>{2, 5, 2, 3, 4}));
  // Sample 1, channel 3 is b's channel 0 of sample 1.
  EXPECT_EQ(c->data[(1 * 5 + 3) * 24 + 7], b.data[(1 * 2 + 0) * 24 + 7]);
  auto s = split_channels(*c, 3);
  ASSERT_TRUE(s);
  EXPECT_TRUE(s->first.data == a.data);
  EXPECT_TRUE(s->second.data == b.data);
  EXPECT_NE(concat_channels(a, random_tensor({2, 2, 2, 3, 5}, 72)).error().message.find("differ outside the channels"), std::string::npos);
  EXPECT_NE(split_channels(*c, 5).error().message.find("split: 5 of 5 channels"), std::string::npos);
}

// The reference's gradients against its own forward pass, by central differences in double of a
// random projection of the output (independent of PyTorch): a check that the backward formulas
// are the forward's derivative.
template <typename Forward>
double projected(Forward f, const std::vector<float>& r) {
  const Tensor y = f();
  double s = 0;
  for (size_t i = 0; i < y.data.size(); ++i) s += static_cast<double>(y.data[i]) * r[i];
  return s;
}

TEST(TrainLayers, GradientsMatchFiniteDifferences) {
  Conv3d conv;
  conv.cin = 2;
  conv.cout = 3;
  conv.stride = 2;
  conv.weight = random_values(3 * 2 * 27, 31, 0.3f);
  conv.bias = random_values(3, 32);
  Tensor x = random_tensor({1, 2, 5, 6, 5}, 33);
  const Tensor y0 = *conv.forward(x);
  const std::vector<float> r = random_values(y0.size(), 34);
  Tensor dy(y0.shape);
  dy.data = r;
  std::vector<float> dw(conv.weight.size(), 0), db(3, 0);
  const Tensor dx = *conv.backward(x, dy, dw, db);
  const float h = 1e-2f;
  for (size_t i : {size_t{0}, size_t{17}, size_t{59}, x.data.size() - 1}) {
    const float keep = x.data[i];
    x.data[i] = keep + h;
    const double up = projected([&] { return *conv.forward(x); }, r);
    x.data[i] = keep - h;
    const double down = projected([&] { return *conv.forward(x); }, r);
    x.data[i] = keep;
    EXPECT_NEAR((up - down) / (2 * h), dx.data[i], 2e-3 * (1 + std::abs(dx.data[i]))) << "dx " << i;
  }
  for (size_t i : {size_t{0}, size_t{40}, conv.weight.size() - 1}) {
    const float keep = conv.weight[i];
    conv.weight[i] = keep + h;
    const double up = projected([&] { return *conv.forward(x); }, r);
    conv.weight[i] = keep - h;
    const double down = projected([&] { return *conv.forward(x); }, r);
    conv.weight[i] = keep;
    EXPECT_NEAR((up - down) / (2 * h), dw[i], 2e-3 * (1 + std::abs(dw[i]))) << "dw " << i;
  }

  InstanceNormLeakyRelu l;
  l.channels = 2;
  l.gamma = {1.5f, -0.7f};
  l.beta = {0.2f, 0.1f};
  Tensor xn = random_tensor({2, 2, 3, 4, 3}, 35);
  const std::vector<float> rn = random_values(xn.size(), 36);
  Tensor dyn(xn.shape);
  dyn.data = rn;
  std::vector<float> dg(2, 0), dbt(2, 0);
  const Tensor dxn = *l.backward(xn, dyn, dg, dbt);
  for (size_t i : {size_t{0}, size_t{5}, size_t{40}, xn.data.size() - 1}) {
    const float keep = xn.data[i];
    xn.data[i] = keep + h;
    const double up = projected([&] { return *l.forward(xn); }, rn);
    xn.data[i] = keep - h;
    const double down = projected([&] { return *l.forward(xn); }, rn);
    xn.data[i] = keep;
    EXPECT_NEAR((up - down) / (2 * h), dxn.data[i], 5e-3 * (1 + std::abs(dxn.data[i]))) << "instance norm dx " << i;
  }

  Tensor logits = random_tensor({1, 3, 3, 3, 2}, 37);
  std::vector<uint8_t> t(18);
  for (size_t i = 0; i < t.size(); ++i) t[i] = static_cast<uint8_t>(i % 3);
  const auto base = *dice_ce_loss(logits, t);
  for (size_t i : {size_t{0}, size_t{7}, size_t{30}, logits.data.size() - 1}) {
    const float keep = logits.data[i];
    logits.data[i] = keep + h;
    const double up = dice_ce_loss(logits, t)->loss;
    logits.data[i] = keep - h;
    const double down = dice_ce_loss(logits, t)->loss;
    logits.data[i] = keep;
    EXPECT_NEAR((up - down) / (2 * h), base.dlogits.data[i], 1e-4) << "loss dlogits " << i;
  }
}

// The convolutions written out as their definitions, one output (or input) voxel at a time with
// the sum in double: the lowered products (core/train/lowering.cc) must give the same values.
struct Written {
  std::vector<double> y, dx, dw, db;
};

// Zeroed sums for a layer's output, input gradient, weight gradient and bias gradient.
template <typename Layer>
Written zero_sums(const Layer& c, const Tensor& x) {
  const size_t out = x.shape[0] * c.cout * c.out_size(x.shape[2]) * c.out_size(x.shape[3]) * c.out_size(x.shape[4]);
  return {std::vector<double>(out), std::vector<double>(x.size()), std::vector<double>(c.weight.size()), std::vector<double>(c.cout)};
}

// Both convolutions' rule: position p and tap t meet voxel p·stride + t − pad of an axis of `size`
// voxels (−1: outside).
template <typename Layer>
long meet(const Layer& c, size_t p, size_t t, size_t size) {
  const long v = static_cast<long>(p * c.stride + t) - static_cast<long>(c.pad);
  return v >= 0 && v < static_cast<long>(size) ? v : -1;
}

Written conv_written(const Conv3d& c, const Tensor& x, const Tensor& dy) {
  const size_t n = x.shape[0], d = x.shape[2], h = x.shape[3], w = x.shape[4], k = c.k;
  const size_t od = c.out_size(d), oh = c.out_size(h), ow = c.out_size(w), taps = k * k * k;
  Written r = zero_sums(c, x);
  auto at = [&](size_t o, size_t t, size_t size) { return meet(c, o, t, size); };  // output o's input voxel
  for (size_t b = 0; b < n; ++b)
    for (size_t co = 0; co < c.cout; ++co)
      for (size_t oz = 0; oz < od; ++oz)
        for (size_t oy = 0; oy < oh; ++oy)
          for (size_t ox = 0; ox < ow; ++ox) {
            const size_t o = (((b * c.cout + co) * od + oz) * oh + oy) * ow + ox;
            double acc = c.bias[co];
            r.db[co] += dy.data[o];
            for (size_t ci = 0; ci < c.cin; ++ci)
              for (size_t t = 0; t < taps; ++t) {
                const long iz = at(oz, t / (k * k), d), iy = at(oy, t / k % k, h), ix = at(ox, t % k, w);
                if (iz < 0 || iy < 0 || ix < 0) continue;
                const size_t i = (((b * c.cin + ci) * d + static_cast<size_t>(iz)) * h + static_cast<size_t>(iy)) * w + static_cast<size_t>(ix);
                const size_t wi = (co * c.cin + ci) * taps + t;
                acc += static_cast<double>(c.weight[wi]) * x.data[i];
                r.dx[i] += static_cast<double>(c.weight[wi]) * dy.data[o];
                r.dw[wi] += static_cast<double>(x.data[i]) * dy.data[o];
              }
            r.y[o] = acc;
          }
  return r;
}

Written transposed_written(const ConvTranspose3d& c, const Tensor& x, const Tensor& dy) {
  const size_t n = x.shape[0], d = x.shape[2], h = x.shape[3], w = x.shape[4], k = c.k;
  const size_t od = c.out_size(d), oh = c.out_size(h), ow = c.out_size(w), taps = k * k * k;
  Written r = zero_sums(c, x);
  auto at = [&](size_t i, size_t t, size_t size) { return meet(c, i, t, size); };  // input i's output voxel
  for (size_t b = 0; b < n; ++b)
    for (size_t co = 0; co < c.cout; ++co) {
      for (size_t v = 0; v < od * oh * ow; ++v) {
        r.y[(b * c.cout + co) * od * oh * ow + v] += c.bias[co];
        r.db[co] += dy.data[(b * c.cout + co) * od * oh * ow + v];
      }
      for (size_t ci = 0; ci < c.cin; ++ci)
        for (size_t iz = 0; iz < d; ++iz)
          for (size_t iy = 0; iy < h; ++iy)
            for (size_t ix = 0; ix < w; ++ix)
              for (size_t t = 0; t < taps; ++t) {
                const long oz = at(iz, t / (k * k), od), oy = at(iy, t / k % k, oh), ox = at(ix, t % k, ow);
                if (oz < 0 || oy < 0 || ox < 0) continue;
                const size_t i = (((b * c.cin + ci) * d + iz) * h + iy) * w + ix;
                const size_t o = (((b * c.cout + co) * od + static_cast<size_t>(oz)) * oh + static_cast<size_t>(oy)) * ow + static_cast<size_t>(ox);
                const size_t wi = (ci * c.cout + co) * taps + t;
                r.y[o] += static_cast<double>(c.weight[wi]) * x.data[i];
                r.dx[i] += static_cast<double>(c.weight[wi]) * dy.data[o];
                r.dw[wi] += static_cast<double>(x.data[i]) * dy.data[o];
              }
    }
  return r;
}

// Every float within one rounding of the double it stands for (a sum in another order may round
// the other way); with `start`, the float the layer adds it into (one more rounding).
void expect_rounded(const std::vector<float>& got, const std::vector<double>& want, const std::string& what, float start = 0) {
  ASSERT_EQ(got.size(), want.size()) << what;
  auto ulp = [](float v) { return std::abs(std::nextafter(v, INFINITY) - v); };
  size_t bad = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const float sum = static_cast<float>(want[i]), expected = start + sum;
    if (std::abs(got[i] - expected) > ulp(sum) + ulp(expected) && ++bad <= 3) ADD_FAILURE() << what << " [" << i << "]: " << got[i] << ", the definition " << expected;
  }
  EXPECT_EQ(bad, 0u) << what;
}

struct WrittenCase {
  std::array<size_t, 5> x;
  size_t cout, k, stride, pad;
};

// A layer of the case's geometry with random weights and bias (seeds `seed`, `seed` + 1).
template <typename Layer>
Layer random_layer(const WrittenCase& c, uint32_t seed) {
  Layer layer;
  layer.cin = c.x[1];
  layer.cout = c.cout;
  layer.k = c.k;
  layer.stride = c.stride;
  layer.pad = c.pad;
  layer.weight = random_values(layer.cin * layer.cout * layer.k * layer.k * layer.k, seed, 0.3f);
  layer.bias = random_values(layer.cout, seed + 1);
  return layer;
}

template <typename Layer>
void check_against_written(const WrittenCase& c, uint32_t seed, Written (*written)(const Layer&, const Tensor&, const Tensor&)) {
  Layer layer = random_layer<Layer>(c, seed);
  const Tensor x = random_tensor(c.x, seed + 2);
  auto y = layer.forward(x, 2);
  ASSERT_TRUE(y) << y.error().message;
  const Tensor dy = random_tensor(y->shape, seed + 3);
  std::vector<float> dw(layer.weight.size(), 0.5f), db(layer.bias.size(), 0.5f);  // gradients add into these
  auto dx = layer.backward(x, dy, dw, db, 2);
  ASSERT_TRUE(dx) << dx.error().message;
  const Written want = written(layer, x, dy);
  const std::string what = x.shape_text() + " → " + std::to_string(layer.cout) + " k" + std::to_string(layer.k) + " s" + std::to_string(layer.stride) + " p" + std::to_string(layer.pad);
  expect_rounded(y->data, want.y, what + " y");
  if constexpr (std::is_same_v<Layer, Conv3d>) {
    // The lowered forward sums in the definition's order (bias, then input channel and tap
    // ascending; the zero padding adds zeros): the same bits.
    size_t differ = 0;
    for (size_t i = 0; i < want.y.size(); ++i) differ += y->data[i] != static_cast<float>(want.y[i]);
    EXPECT_EQ(differ, 0u) << what << ": outputs that differ from the definition's bits";
  }
  expect_rounded(dx->data, want.dx, what + " dx");
  expect_rounded(dw, want.dw, what + " dw", 0.5f);
  expect_rounded(db, want.db, what + " db", 0.5f);
  // The same bytes on any number of threads.
  for (unsigned threads : {1u, 3u}) {
    std::vector<float> dw_t(layer.weight.size(), 0.5f), db_t(layer.bias.size(), 0.5f);
    EXPECT_TRUE(layer.forward(x, threads)->data == y->data) << what << ", " << threads << " thread(s)";
    EXPECT_TRUE(layer.backward(x, dy, dw_t, db_t, threads)->data == dx->data) << what << ", " << threads << " thread(s)";
    EXPECT_TRUE(dw_t == dw && db_t == db) << what << ", " << threads << " thread(s)";
  }
}

TEST(TrainLayers, ConvolutionsEqualTheirDefinitionsWrittenOut) {
  // Sizes that are not multiples of the product's tiles (6 rows, 8 columns), strides, no padding,
  // 1×1×1, shapes of several blocks of positions (20 channels × 27 taps: blocks of 485; a batch
  // of two; stride 2; padding 2, where a block ends one voxel into a grid row with every tap of
  // that voxel's stretch left of the source), tiny inputs whose taps fall wholly outside (outputs
  // all padding with pad 3), and grid rows longer than a block (40 × 27 rows: blocks of 256, rows of 300).
  const WrittenCase convs[] = {{{2, 3, 7, 6, 5}, 7, 3, 1, 1},    {{1, 20, 18, 17, 16}, 13, 3, 1, 1}, {{2, 20, 9, 10, 11}, 6, 3, 2, 1},
                        {{2, 20, 7, 8, 9}, 5, 3, 1, 1},   {{1, 20, 5, 5, 20}, 4, 3, 1, 2},    {{1, 13, 5, 6, 7}, 3, 1, 1, 0},
                        {{1, 2, 6, 5, 7}, 4, 3, 1, 0},    {{1, 1, 4, 4, 4}, 1, 3, 1, 1},      {{1, 2, 1, 2, 1}, 3, 3, 1, 1},
                        {{1, 2, 2, 2, 2}, 2, 3, 1, 3},    {{1, 40, 1, 2, 300}, 7, 3, 1, 1}};
  uint32_t seed = 100;
  for (const WrittenCase& c : convs) check_against_written(c, seed += 10, conv_written);
  // The U-Net's upsampling, overlapping taps with padding, several blocks (32 × 8 rows: blocks
  // of 1024 input voxels; with padding 2 and k 3, 20 × 27 rows: blocks of 485; a batch of two),
  // a kernel smaller than the stride (outputs that only the bias reaches), 1×1×1.
  const WrittenCase transposed[] = {{{2, 9, 4, 5, 3}, 5, 2, 2, 0},     {{1, 3, 4, 3, 5}, 4, 3, 2, 1}, {{1, 4, 20, 19, 11}, 32, 2, 2, 0},
                             {{2, 3, 9, 10, 11}, 20, 3, 1, 2}, {{1, 3, 4, 5, 3}, 2, 1, 2, 0}, {{1, 2, 3, 3, 3}, 1, 1, 1, 0}};
  for (const WrittenCase& c : transposed) check_against_written(c, seed += 10, transposed_written);
}

// The product's AVX2/FMA build and its baseline build (core/train/lowering.cc) give the same bits:
// the whole of both convolutions' passes, once through each.
TEST(TrainLayers, TheProductsTwoBuildsGiveTheSameBits) {
  if (!lowering::avx2_product()) GTEST_SKIP() << "no AVX2/FMA build of the product runs here (the CPU lacks AVX2 or FMA, or the compiler made one build): nothing to compare";
  struct Restore {
    ~Restore() { lowering::use_baseline_product(false); }
  } restore;
  // Every pass of a random layer of the case's geometry: output, input gradient, weight and bias
  // gradients, one after the other.
  auto passes = []<typename Layer>(const WrittenCase& c, uint32_t seed) {
    const Layer layer = random_layer<Layer>(c, seed);
    const Tensor x = random_tensor(c.x, seed + 2);
    std::vector<float> all = layer.forward(x, 2)->data;
    const Tensor dy = random_tensor(layer.forward(x, 2)->shape, seed + 3);
    std::vector<float> dw(layer.weight.size(), 0), db(layer.bias.size(), 0);
    const std::vector<float> dx = layer.backward(x, dy, dw, db, 2)->data;
    all.insert(all.end(), dx.begin(), dx.end());
    all.insert(all.end(), dw.begin(), dw.end());
    all.insert(all.end(), db.begin(), db.end());
    return all;
  };
  const WrittenCase conv{{2, 20, 9, 10, 11}, 13, 3, 1, 1}, up{{2, 9, 4, 5, 3}, 5, 2, 2, 0};
  const std::vector<float> conv_avx2 = passes.operator()<Conv3d>(conv, 501), up_avx2 = passes.operator()<ConvTranspose3d>(up, 505);
  lowering::use_baseline_product(true);
  const std::vector<float> conv_base = passes.operator()<Conv3d>(conv, 501), up_base = passes.operator()<ConvTranspose3d>(up, 505);
  ASSERT_EQ(conv_avx2.size(), conv_base.size());
  ASSERT_EQ(up_avx2.size(), up_base.size());
  EXPECT_EQ(std::memcmp(conv_avx2.data(), conv_base.data(), conv_avx2.size() * sizeof(float)), 0) << "convolution: the builds differ";
  EXPECT_EQ(std::memcmp(up_avx2.data(), up_base.data(), up_avx2.size() * sizeof(float)), 0) << "transposed convolution: the builds differ";
}

TEST(TrainLayers, BadInputsAreNamed) {
  Conv3d conv;
  conv.cin = 2;
  conv.cout = 1;
  conv.weight.assign(27, 0);
  conv.bias.assign(1, 0);
  const Tensor x3 = random_tensor({1, 3, 4, 4, 4}, 1);
  EXPECT_NE(conv.forward(x3).error().message.find("the input has 3 channels, the layer takes 2"), std::string::npos);
  const Tensor x2 = random_tensor({1, 2, 4, 4, 4}, 1);
  EXPECT_NE(conv.forward(x2).error().message.find("weight has 27 values and bias 1, the layer needs 54 and 1"), std::string::npos);
  conv.weight.assign(54, 0);
  conv.pad = 0;
  const Tensor tiny = random_tensor({1, 2, 2, 4, 4}, 1);
  EXPECT_NE(conv.forward(tiny).error().message.find("a kernel of 3 does not fit the padded input"), std::string::npos);
  conv.pad = 1;
  std::vector<float> dw(54), db(1);
  EXPECT_NE(conv.backward(x2, random_tensor({1, 1, 3, 4, 4}, 2), dw, db).error().message.find("the output gradient is 1×1×3×4×4, the output 1×1×4×4×4"),
            std::string::npos);
  InstanceNormLeakyRelu l;
  l.channels = 2;
  l.gamma = {1};
  l.beta = {0, 0};
  EXPECT_NE(l.forward(x2).error().message.find("(γ 1, β 2)"), std::string::npos);
  const Tensor logits = random_tensor({1, 2, 2, 2, 2}, 3);
  std::vector<uint8_t> t(8, 0);
  t[5] = 2;
  EXPECT_NE(dice_ce_loss(logits, t).error().message.find("target voxel 5 is class 2 of 2"), std::string::npos);
  EXPECT_NE(dice_ce_loss(logits, std::vector<uint8_t>(7, 0)).error().message.find("7 target voxels for 8"), std::string::npos);
  EXPECT_NE(dice_ce_loss(random_tensor({1, 1, 2, 2, 2}, 4), t).error().message.find("1 class(es)"), std::string::npos);
  Tensor broken = x2;
  broken.data.pop_back();
  EXPECT_FALSE(conv.forward(broken));
}

}  // namespace
}  // namespace tresor::train
