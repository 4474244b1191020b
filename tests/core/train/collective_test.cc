// The CPU collective backend (include/tresor/train/collective.h) and data parallelism on it: sums
// in rank order, identical on every rank; a data-parallel training step over two ranks gives the
// weights one rank gets from the whole batch.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <thread>

#include "support/test_support.h"
#include "tresor/train/collective.h"
#include "tresor/train/unet.h"

namespace tresor::train {
namespace {

// Runs fn(rank, collective) on `ranks` threads.
template <typename F>
void on_ranks(int ranks, F&& fn) {
  auto group = SharedMemoryGroup::create(ranks);
  ASSERT_TRUE(group);
  std::vector<std::unique_ptr<Collective>> members;
  for (int r = 0; r < ranks; ++r) {
    auto m = (*group)->member(r);
    ASSERT_TRUE(m) << m.error().message;
    members.push_back(std::move(*m));
  }
  std::vector<std::jthread> threads;
  for (int r = 0; r < ranks; ++r) threads.emplace_back([&, r] { fn(r, *members[static_cast<size_t>(r)]); });
}

TEST(Collective, AllReduceSumsInRankOrderOnEveryRank) {
  const int ranks = 4;
  const size_t n = 1001;  // not a multiple of the ranks: uneven slices
  std::vector<std::vector<float>> out(ranks);
  on_ranks(ranks, [&](int r, Collective& c) {
    EXPECT_EQ(c.rank(), r);
    EXPECT_EQ(c.size(), ranks);
    for (uint32_t call = 0; call < 3; ++call) {  // buffers reused across calls
      std::vector<float> v = testing::normal_floats(n, 100 * call + static_cast<uint32_t>(r));
      ASSERT_TRUE(c.all_reduce_sum(v));
      if (call == 2) out[static_cast<size_t>(r)] = v;
    }
  });
  std::vector<float> want(n, 0.0f);
  for (int r = 0; r < ranks; ++r) {
    const auto v = testing::normal_floats(n, 200 + static_cast<uint32_t>(r));
    for (size_t i = 0; i < n; ++i) want[i] += v[i];
  }
  for (int r = 0; r < ranks; ++r) EXPECT_TRUE(out[static_cast<size_t>(r)] == want) << "rank " << r;
}

TEST(Collective, BroadcastAndMismatchesAreReportedOnEveryRank) {
  std::vector<std::vector<float>> got(3);
  std::vector<std::string> errors(3);
  on_ranks(3, [&](int r, Collective& c) {
    std::vector<float> v(5, static_cast<float>(r));
    ASSERT_TRUE(c.broadcast(v, 2));
    got[static_cast<size_t>(r)] = v;
    std::vector<float> odd(r == 1 ? 4 : 5, 1.0f);
    auto e = c.all_reduce_sum(odd);
    errors[static_cast<size_t>(r)] = e ? "" : e.error().message;
  });
  for (const auto& v : got) EXPECT_EQ(v, std::vector<float>(5, 2.0f));
  for (const auto& e : errors) EXPECT_NE(e.find("buffers of different lengths"), std::string::npos) << e;
  auto g = SharedMemoryGroup::create(2);
  ASSERT_TRUE(g);
  EXPECT_TRUE((*g)->member(0));
  EXPECT_NE((*g)->member(0).error().message.find("rank 0 is already taken"), std::string::npos);
  EXPECT_NE((*g)->member(2).error().message.find("rank 2 is not in a group of 2"), std::string::npos);
  EXPECT_FALSE(SharedMemoryGroup::create(0));
}

// One SGD step on a global batch of 4 samples: on one rank, and on two ranks with 2 samples each
// whose gradients are summed and halved. Cross-entropy alone, whose batch gradient is the mean of
// the halves' (batch Dice couples the samples: nnU-Net's data parallelism also takes Dice per
// rank).
TEST(Collective, DataParallelStepEqualsTheSingleRankStep) {
  const UNetConfig cfg{2, 3, 8, 1, 2};
  Tensor batch({4, 1, 8, 8, 6});
  batch.data = testing::normal_floats(batch.size(), 5);
  std::vector<uint8_t> target(batch.shape[0] * batch.spatial());
  for (size_t i = 0; i < target.size(); ++i) target[i] = static_cast<uint8_t>((i * 7 / 5) % 2);
  auto slice = [&](size_t first, size_t count) {
    Tensor t({count, 1, 8, 8, 6});
    std::copy_n(batch.data.begin() + static_cast<std::ptrdiff_t>(first * batch.spatial()), t.size(), t.data.begin());
    std::vector<uint8_t> y(target.begin() + static_cast<std::ptrdiff_t>(first * batch.spatial()),
                           target.begin() + static_cast<std::ptrdiff_t>((first + count) * batch.spatial()));
    return std::pair{t, y};
  };
  auto step = [&](UNet& net, const Tensor& x, const std::vector<uint8_t>& y, Collective* c) {
    auto logits = net.forward(x, 1);
    EXPECT_TRUE(logits);
    auto loss = dice_ce_loss(*logits, y, 1e-5, 1, 0.0);
    auto grads = net.backward(loss->dlogits, 1);
    EXPECT_TRUE(grads);
    if (c != nullptr) {
      EXPECT_TRUE(c->all_reduce_sum(*grads));
      for (auto& g : *grads) g /= static_cast<float>(c->size());
    }
    std::vector<float> p = net.parameters();
    Sgd sgd;
    EXPECT_TRUE(sgd.step(p, *grads, 0.01));
    return p;
  };
  auto single = UNet::create(cfg, 11);
  ASSERT_TRUE(single);
  const std::vector<float> one = step(*single, batch, target, nullptr);

  std::vector<std::vector<float>> per_rank(2);
  on_ranks(2, [&](int r, Collective& c) {
    auto net = UNet::create(cfg, 11);
    ASSERT_TRUE(net);
    auto [x, y] = slice(static_cast<size_t>(r) * 2, 2);
    per_rank[static_cast<size_t>(r)] = step(*net, x, y, &c);
  });
  EXPECT_TRUE(per_rank[0] == per_rank[1]) << "every rank holds the same weights";
  double worst = 0, mag = 0;
  for (size_t i = 0; i < one.size(); ++i) {
    worst = std::max(worst, static_cast<double>(std::abs(one[i] - per_rank[0][i])));
    mag = std::max(mag, static_cast<double>(std::abs(one[i])));
  }
  std::printf("data-parallel step against the single-rank step: largest difference %.2g (largest weight %.2g)\n", worst, mag);
  EXPECT_LT(worst, 1e-6 * mag);
  // And the step did something: the weights moved.
  auto fresh = UNet::create(cfg, 11);
  EXPECT_FALSE(fresh->parameters() == one);
}

}  // namespace
}  // namespace tresor::train
