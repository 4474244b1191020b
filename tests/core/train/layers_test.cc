// The training layers' CPU reference (include/tresor/train/layers.h) against PyTorch (Debian's
// python3-torch, float64, through tests/core/train/torch_oracle.py) on random shapes with odd
// sizes, and against finite differences of the reference itself; bad inputs named.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <random>

#include <nlohmann/json.hpp>

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
