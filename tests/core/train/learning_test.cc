// The CPU trainer learns (issue 9's criterion, label `slow`): a tiny U-Net trained on patches of
// one prepared CCTA phantom raises the validation Dice of the coronary lumen on another phantom
// from about 0 to at least 0.5. Two prepared phantoms and a few hundred steps: about a minute on
// 2 cores.
#include <gtest/gtest.h>

#include <cstdio>

#include "tresor/train/trainer.h"

namespace tresor::train {
namespace {

ct::Prepared prepared(uint64_t seed) {
  ct::PhantomOptions o;
  o.seed = seed;
  o.dims = {240, 240, 136};
  o.spacing = {0.5, 0.5, 0.6};
  auto ph = ct::make_phantom(o);
  EXPECT_TRUE(ph);
  ct::PrepOptions po;
  po.spacing = 1.0;
  po.frangi_sigmas_mm = {1.0, 2.0};
  auto p = ct::prepare(ph->hu, &ph->labels, po);
  EXPECT_TRUE(p) << p.error().message;
  return std::move(*p);
}

TEST(TrainLearning, ValidationDiceRisesFromAboutZeroToAtLeastHalf) {
  const ct::Prepared a = prepared(1), b = prepared(2);
  auto net = UNet::create({3, 4, 32, 2, 2}, 3);
  ASSERT_TRUE(net);
  TrainerOptions o;
  o.steps = 300;  // the Dice jumps past 0.8 between steps 150 and 200 here; 300 leaves a margin
  auto log = train_unet(*net, {&a}, {&b}, o, [](size_t step, double loss, double dice) {
    if (dice >= 0) std::printf("step %zu: loss %.3f, validation Dice %.3f\n", step, loss, dice);
  });
  ASSERT_TRUE(log) << log.error().message;
  ASSERT_GE(log->val_dice.size(), 2u);
  const double first = log->val_dice.front().second, last = log->val_dice.back().second;
  RecordProperty("dice_before", std::to_string(first));
  RecordProperty("dice_after", std::to_string(last));
  EXPECT_LT(first, 0.2) << "an untrained network does not segment the coronaries";
  EXPECT_GE(last, 0.5);
}

// Stopping after 6 steps, writing a checkpoint, reading it into a fresh model and resuming to 12
// gives exactly the weights of 12 uninterrupted steps (patch draws and schedule follow the step),
// for both optimizers.
TEST(TrainLearning, ACheckpointedRunResumesExactly) {
  const ct::Prepared a = prepared(3);
  for (bool adamw : {true, false}) {
    TrainerOptions o;
    o.steps = 12;
    o.validate_every = 100;
    o.validation_patches = 1;
    o.adamw = adamw;
    auto straight = UNet::create(o.model, 5);
    ASSERT_TRUE(train_unet(*straight, {&a}, {&a}, o));

    auto first = UNet::create(o.model, 5);
    TrainState st;
    TrainerOptions half = o;
    half.stop_after = 6;
    ASSERT_TRUE(train_unet(*first, {&a}, {&a}, half, {}, &st));
    EXPECT_EQ(st.step, 6u);
    const Bytes ck = checkpoint_bytes(*first, st, adamw);
    auto parsed = parse_checkpoint(ck);
    ASSERT_TRUE(parsed) << parsed.error().message;
    EXPECT_EQ(parsed->state.step, 6u);
    EXPECT_EQ(parsed->adamw, adamw);
    auto resumed = UNet::create(parsed->config, 999);  // other initial weights: the checkpoint's replace them
    ASSERT_TRUE(resumed->set_parameters(parsed->parameters));
    TrainState rs = parsed->state;
    ASSERT_TRUE(train_unet(*resumed, {&a}, {&a}, o, {}, &rs));
    EXPECT_EQ(rs.step, 12u);
    EXPECT_TRUE(resumed->parameters() == straight->parameters()) << (adamw ? "AdamW" : "SGD");
    // Damage is named: magic, truncation, trailing bytes, version.
    Bytes bad = ck;
    bad[0] = std::byte{'X'};
    EXPECT_NE(parse_checkpoint(bad).error().message.find("magic"), std::string::npos);
    EXPECT_NE(parse_checkpoint(ByteSpan(ck.data(), ck.size() - 4)).error().message.find("truncated"), std::string::npos);
    Bytes longer = ck;
    longer.push_back(std::byte{0});
    EXPECT_NE(parse_checkpoint(longer).error().message.find("1 bytes after the end"), std::string::npos);
    Bytes v3 = ck;
    v3[8] = std::byte{3};
    EXPECT_NE(parse_checkpoint(v3).error().message.find("version 3, this build reads 1 and 2"), std::string::npos);
  }
}

TEST(TrainLearning, BadSetupsAreNamed) {
  auto net = UNet::create({3, 4, 32, 2, 2}, 3);
  ct::Prepared none;
  TrainerOptions o;
  EXPECT_NE(train_unet(*net, {}, {}, o).error().message.find("no training or no validation case"), std::string::npos);
  EXPECT_NE(train_unet(*net, {&none}, {&none}, o).error().message.find("case 0 has no labels"), std::string::npos);
  o.patch = 22;
  EXPECT_NE(train_unet(*net, {&none}, {&none}, o).error().message.find("a patch of 22 is not a multiple of 4"), std::string::npos);
  auto one = UNet::create({3, 4, 32, 1, 2}, 3);
  EXPECT_NE(train_unet(*one, {&none}, {&none}, {}).error().message.find("must take 2 channels"), std::string::npos);
  // dice_of_prediction: perfect, disjoint, and empty-on-both.
  Tensor logits({1, 2, 1, 1, 4});
  logits.data = {0, 0, 1, 1, /*class 1:*/ 1, 1, 0, 0};
  EXPECT_DOUBLE_EQ(dice_of_prediction(logits, {1, 1, 0, 0}), 1.0);
  EXPECT_DOUBLE_EQ(dice_of_prediction(logits, {0, 0, 1, 1}), 0.0);
  logits.data = {1, 1, 1, 1, 0, 0, 0, 0};
  EXPECT_DOUBLE_EQ(dice_of_prediction(logits, {0, 0, 0, 0}), 1.0);
}

}  // namespace
}  // namespace tresor::train
