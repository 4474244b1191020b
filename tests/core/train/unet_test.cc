// The 3D U-Net's whole training step (forward, nnU-Net's loss, backward, SGD) against the same
// network in PyTorch (float64, tests/core/train/torch_oracle.py), from the same parameters; the
// model's shapes, initialisation and refusals.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>

#include <nlohmann/json.hpp>

#include "support/test_support.h"
#include "tresor/train/trainer.h"
#include "tresor/train/unet.h"

namespace tresor::train {
namespace {

TEST(UNet, WholeTrainingStepMatchesPyTorch) {
  if (testing::run_command({"/usr/bin/python3", "-c", "import torch"}).exit_code != 0) GTEST_SKIP() << "python3-torch is not installed (scripts/bootstrap installs it)";
  // The third with deep supervision: heads at 1/2 and 1/4 (the last of weight 0), targets
  // downsampled nearest-exact, nnU-Net's weighted sum — against the same in PyTorch.
  for (const UNetConfig& c : {UNetConfig{3, 4, 320, 1, 2}, UNetConfig{2, 3, 5, 2, 3}, UNetConfig{4, 3, 12, 2, 3, true}}) {
    auto net = UNet::create(c, 7);
    ASSERT_TRUE(net) << net.error().message;
    const size_t f = size_t{1} << (c.levels - 1);
    Tensor x({2, c.in_channels, 2 * f, 3 * f, f * 2});
    std::mt19937 g(3);
    std::normal_distribution<float> nd(0, 1);
    for (auto& v : x.data) v = nd(g);
    std::vector<uint8_t> target(2 * x.spatial());
    for (size_t i = 0; i < target.size(); ++i) target[i] = static_cast<uint8_t>((i / 3 + i % 5) % c.classes);
    const std::vector<float> params = net->parameters();
    Result<Tensor> logits = fail(ErrorCode::kInvalidArgument, "not run");
    double loss_value = 0;
    Result<std::vector<float>> grads = fail(ErrorCode::kInvalidArgument, "not run");
    if (c.deep_supervision) {
      auto outs = net->forward_outputs(x);
      ASSERT_TRUE(outs) << outs.error().message;
      ASSERT_EQ(outs->size(), c.levels - 1);
      EXPECT_EQ((*outs)[2].shape, (std::array<size_t, 5>{2, c.classes, x.shape[2] / 4, x.shape[3] / 4, x.shape[4] / 4}));
      auto ml = deep_supervision_loss(*outs, target);
      ASSERT_TRUE(ml) << ml.error().message;
      loss_value = ml->loss;
      std::vector<float> flat(net->parameter_count());
      ASSERT_TRUE(net->backward_outputs_into(ml->dlogits, flat));
      grads = flat;
      logits = (*outs)[0];
    } else {
      logits = net->forward(x);
      ASSERT_TRUE(logits) << logits.error().message;
      auto loss = dice_ce_loss(*logits, target);
      ASSERT_TRUE(loss);
      loss_value = loss->loss;
      grads = net->backward(loss->dlogits);
    }
    ASSERT_TRUE(grads) << grads.error().message;
    ASSERT_EQ(grads->size(), params.size());
    std::vector<float> after = params;
    Sgd sgd;
    ASSERT_TRUE(sgd.step(after, *grads, 0.01));

    testing::TempDir dir;
    auto put = [&](const std::string& name, const std::vector<float>& v) {
      testing::write_file(dir.file(name + ".f32"), ByteSpan(reinterpret_cast<const std::byte*>(v.data()), v.size() * 4));
    };
    put("params", params);
    put("x", x.data);
    testing::write_file(dir.file("target.u8"), ByteSpan(reinterpret_cast<const std::byte*>(target.data()), target.size()));
    const nlohmann::json spec = {{"layer", "unet_step"}, {"levels", c.levels}, {"base", c.base_channels}, {"max", c.max_channels}, {"in", c.in_channels},
                                 {"classes", c.classes}, {"count", params.size()}, {"x", x.shape}, {"lr", 0.01}, {"ds", c.deep_supervision}};
    testing::write_file(dir.file("case.json"), as_bytes(spec.dump()));
    auto r = testing::run_command({"/usr/bin/python3", TRESOR_TORCH_ORACLE, dir.path().string()});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    auto get = [&](const std::string& name) {
      const Bytes b = testing::read_file(dir.file(name + ".f64"));
      std::vector<double> v(b.size() / 8);
      std::memcpy(v.data(), b.data(), v.size() * 8);
      return v;
    };
    auto rel = [](const std::vector<float>& a, const std::vector<double>& b) {
      double worst = 0, mag = 1e-30;
      for (double v : b) mag = std::max(mag, std::abs(v));
      for (size_t i = 0; i < a.size() && i < b.size(); ++i) worst = std::max(worst, std::abs(a[i] - b[i]));
      return worst / mag;
    };
    const std::string what = std::to_string(c.levels) + " levels, base " + std::to_string(c.base_channels) + ", " + std::to_string(params.size()) + " parameters" +
                             (c.deep_supervision ? ", deep supervision" : "");
    const auto want_logits = get("logits"), want_grads = get("grads"), want_after = get("after");
    ASSERT_EQ(want_grads.size(), params.size()) << what;
    EXPECT_LT(rel(logits->data, want_logits), 1e-5) << what;
    EXPECT_NEAR(loss_value, get("loss")[0], 1e-6) << what;
    // Gradients pass through every layer in float32 storage (measured about 1e-7 of the largest):
    // 1e-5 leaves room for larger networks' longer sums.
    EXPECT_LT(rel(*grads, want_grads), 1e-5) << what;
    EXPECT_LT(rel(after, want_after), 1e-6) << what;
    std::printf("%s: logits %.2g, gradients %.2g, parameters after the step %.2g (relative to the largest)\n", what.c_str(), rel(logits->data, want_logits),
                rel(*grads, want_grads), rel(after, want_after));
  }
}

TEST(UNet, ShapesInitialisationAndRefusals) {
  auto net = UNet::create({3, 4, 8, 1, 2}, 1);
  ASSERT_TRUE(net);
  // Channels 4, 8, 8 (capped): parameter count by hand.
  auto block = [](size_t ci, size_t co) { return co * ci * 27 + co + 2 * co; };
  const size_t want = block(1, 4) + block(4, 4) + block(4, 8) + block(8, 8) + block(8, 8) + block(8, 8) +  // encoder
                      (8 * 8 * 8 + 8) + block(16, 8) + block(8, 8) +                                     // decoder at 8 channels
                      (8 * 4 * 8 + 4) + block(8, 4) + block(4, 4) +                                     // decoder at 4
                      (2 * 4 + 2);                                                                      // head
  EXPECT_EQ(net->parameter_count(), want);
  // He initialisation: the first conv's weights have sd sqrt(2 / 27).
  const auto p = net->parameters();
  double sq = 0;
  for (size_t i = 0; i < 4 * 27; ++i) sq += p[i] * p[i];
  EXPECT_NEAR(std::sqrt(sq / (4 * 27)), std::sqrt(2.0 / 27), 0.08);
  EXPECT_TRUE(UNet::create({3, 4, 8, 1, 2}, 1)->parameters() == p) << "deterministic in the seed";
  EXPECT_FALSE(UNet::create({3, 4, 8, 1, 2}, 2)->parameters() == p);
  Tensor x({1, 1, 8, 8, 6});
  EXPECT_NE(net->forward(x).error().message.find("is not a multiple of 4"), std::string::npos);
  Tensor x2({1, 2, 8, 8, 8});
  EXPECT_NE(net->forward(x2).error().message.find("the input has 2 channels, the model takes 1"), std::string::npos);
  EXPECT_NE(net->backward(Tensor({1, 2, 8, 8, 8})).error().message.find("backward before forward"), std::string::npos);
  EXPECT_NE(net->set_parameters({1, 2, 3}).error().message.find("3 parameters given"), std::string::npos);
  EXPECT_NE(UNet::create({0, 4, 8, 1, 2}, 1).error().message.find("0 levels"), std::string::npos);
  EXPECT_NE(UNet::create({2, 4, 8, 1, 1}, 1).error().message.find("1 class(es)"), std::string::npos);
  Tensor ok({1, 1, 8, 8, 8});
  auto y = net->forward(ok);
  ASSERT_TRUE(y);
  EXPECT_EQ(y->shape, (std::array<size_t, 5>{1, 2, 8, 8, 8}));
}

// Deep supervision's pieces: nnU-Net's weights, nearest-exact downsampling, the heads' layout
// (appended after the main head, the shared weights unchanged), refusals, and a checkpoint that
// keeps the flag (format version 2; version 1 files still read).
TEST(UNet, DeepSupervisionPiecesAndCheckpoints) {
  EXPECT_EQ(deep_supervision_weights(1), std::vector<double>{1.0});
  const auto w = deep_supervision_weights(4);  // 1, 1/2, 1/4, 0 → /1.75
  ASSERT_EQ(w.size(), 4u);
  EXPECT_DOUBLE_EQ(w[0], 1 / 1.75);
  EXPECT_DOUBLE_EQ(w[1], 0.5 / 1.75);
  EXPECT_DOUBLE_EQ(w[2], 0.25 / 1.75);
  EXPECT_EQ(w[3], 0.0);
  std::vector<uint8_t> t(1 * 4 * 4 * 8);
  for (size_t i = 0; i < t.size(); ++i) t[i] = static_cast<uint8_t>(i);
  // 1/2: voxel (z, y, x) takes (2z + 1, 2y + 1, 2x + 1).
  const auto half = downsample_target(t, {1, 4, 4, 8}, 1);
  ASSERT_EQ(half.size(), 2u * 2 * 4);
  EXPECT_EQ(half[0], t[(1 * 4 + 1) * 8 + 1]);
  EXPECT_EQ(half[(1 * 2 + 1) * 4 + 3], t[(3 * 4 + 3) * 8 + 7]);
  const auto quarter = downsample_target(t, {1, 4, 4, 8}, 2);  // (4z + 2, 4y + 2, 4x + 2)
  EXPECT_EQ(quarter, (std::vector<uint8_t>{t[(2 * 4 + 2) * 8 + 2], t[(2 * 4 + 2) * 8 + 6]}));

  auto plain = UNet::create({4, 4, 16, 2, 2}, 9);
  auto ds = UNet::create({4, 4, 16, 2, 2, true}, 9);
  ASSERT_TRUE(plain && ds);
  EXPECT_EQ(plain->outputs(), 1u);
  EXPECT_EQ(ds->outputs(), 3u);
  // Two extra heads (8→2 and 16→2 channels, with biases) after every shared weight, which are equal.
  EXPECT_EQ(ds->parameter_count(), plain->parameter_count() + (8 * 2 + 2) + (16 * 2 + 2));
  const auto pp = plain->parameters(), dp = ds->parameters();
  EXPECT_TRUE(std::equal(pp.begin(), pp.end(), dp.begin()));
  EXPECT_NE(UNet::create({2, 4, 16, 2, 2, true}, 9).error().message.find("deep supervision needs at least 3 levels"), std::string::npos);
  Tensor x({1, 2, 8, 8, 8});
  ASSERT_TRUE(ds->forward(x));
  std::vector<float> g(ds->parameter_count());
  Tensor d({1, 2, 8, 8, 8});
  const std::vector<Tensor> two = {d, d};
  EXPECT_NE(ds->backward_outputs_into(two, g).error().message.find("2 output gradients for 3 outputs"), std::string::npos);

  TrainState st;
  st.step = 5;
  const Bytes ck = checkpoint_bytes(*ds, st, true, 32);
  auto back = parse_checkpoint(ck);
  ASSERT_TRUE(back) << back.error().message;
  EXPECT_TRUE(back->config.deep_supervision);
  EXPECT_EQ(back->patch, 32u);
  EXPECT_EQ(back->parameters, dp);
  Bytes flags = ck;
  flags[40] = std::byte{3};  // the flags field: bit 1 is unknown
  EXPECT_NE(parse_checkpoint(flags).error().message.find("unknown flags 3"), std::string::npos);
  // The count is computed without building the model, for every shape of configuration.
  for (const UNetConfig& c : {UNetConfig{1, 1, 1, 1, 2}, UNetConfig{3, 4, 320, 1, 2}, UNetConfig{5, 6, 20, 2, 3, true}, UNetConfig{4, 4, 16, 2, 2, true}}) {
    auto built = UNet::create(c, 1);
    ASSERT_TRUE(built);
    auto counted = UNet::count_parameters(c);
    ASSERT_TRUE(counted) << counted.error().message;
    EXPECT_EQ(*counted, built->parameter_count());
  }
  EXPECT_NE(UNet::count_parameters({8, size_t{1} << 31, size_t{1} << 32, 1, 2}).error().message.find("more than 2^40 parameters"), std::string::npos);
  // A checkpoint claiming a huge model is refused before anything is allocated for it.
  Bytes huge = ck;
  huge[24] = std::byte{0xFF};  // base channels' top byte
  huge[27] = std::byte{0x7F};
  huge[28] = std::byte{0xFF};  // max channels
  huge[31] = std::byte{0xFF};
  EXPECT_NE(parse_checkpoint(huge).error().message.find("model configuration is invalid: unet: more than 2^40 parameters"), std::string::npos)
      << parse_checkpoint(huge).error().message;
  Bytes nan = ck;
  const size_t first_param = 68;
  nan[first_param + 4 * 3 + 3] = std::byte{0x7F};  // parameter 3 becomes a NaN (exponent all ones)
  nan[first_param + 4 * 3 + 2] = std::byte{0xC0};
  EXPECT_NE(parse_checkpoint(nan).error().message.find("parameter 3 is not finite"), std::string::npos) << parse_checkpoint(nan).error().message;
  // Version 1 (no flags field) from a model without deep supervision.
  Bytes v1 = checkpoint_bytes(*plain, st, true);
  v1[8] = std::byte{1};
  v1.erase(v1.begin() + 40, v1.begin() + 48);  // no flags, no patch
  auto old = parse_checkpoint(v1);
  ASSERT_TRUE(old) << old.error().message;
  EXPECT_FALSE(old->config.deep_supervision);
  EXPECT_EQ(old->patch, 0u);
  EXPECT_EQ(old->parameters, pp);
}

}  // namespace
}  // namespace tresor::train
