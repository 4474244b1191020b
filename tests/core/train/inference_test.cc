// Sliding-window inference (include/tresor/train/inference.h): nnU-Net's tile starts, the Gaussian
// importance map against scipy.ndimage.gaussian_filter (Debian's python3-scipy), and the weighted
// average against tiles predicted one by one — one tile, two overlapping tiles, a volume smaller
// than a tile (padded) — plus bad arguments named.
#include <gtest/gtest.h>

#include <cmath>
#include <sstream>

#include "support/test_support.h"
#include "tresor/splitmix.h"
#include "tresor/train/inference.h"

namespace tresor::train {
namespace {

TEST(SlidingWindow, TileStartsFollowNnUNet) {
  // image 100, tile 24, step ½: ⌈76/12⌉ + 1 = 8 starts, 76/7 apart, rounded.
  EXPECT_EQ(sliding_window_starts(100, 24, 0.5), (std::vector<size_t>{0, 11, 22, 33, 43, 54, 65, 76}));
  EXPECT_EQ(sliding_window_starts(36, 24, 0.5), (std::vector<size_t>{0, 12}));
  EXPECT_EQ(sliding_window_starts(37, 24, 0.5), (std::vector<size_t>{0, 6, 13}));  // 13/2 = 6.5 rounds to even (np.round)
  EXPECT_EQ(sliding_window_starts(24, 24, 0.5), (std::vector<size_t>{0}));
  EXPECT_EQ(sliding_window_starts(10, 24, 0.5), (std::vector<size_t>{0}));
  EXPECT_EQ(sliding_window_starts(48, 24, 1.0), (std::vector<size_t>{0, 24}));
}

TEST(SlidingWindow, TheGaussianMapIsScipysFilteredImpulse) {
  for (size_t tile : {16u, 24u, 13u}) {
    const std::vector<float> g = gaussian_importance(tile);
    std::ostringstream code;
    code << "import numpy as np\nfrom scipy.ndimage import gaussian_filter\nt = " << tile
         << "\na = np.zeros((t, t, t))\na[t // 2, t // 2, t // 2] = 1\ng = gaussian_filter(a, t / 8, 0, mode='constant', cval=0)\n"
            "g = g / g.max() * 10\ng[g == 0] = g[g != 0].min()\nprint(' '.join(repr(float(v)) for v in g.ravel()))\n";
    const auto r = testing::run_command({"/usr/bin/python3", "-c", code.str()});
    ASSERT_EQ(r.exit_code, 0) << r.err;
    std::istringstream in(r.out);
    double worst = 0;
    size_t n = 0;
    for (double want = 0; in >> want; ++n) {
      ASSERT_LT(n, g.size());
      worst = std::max(worst, std::abs(g[n] - want) / want);
    }
    EXPECT_EQ(n, g.size());
    EXPECT_LT(worst, 1e-6) << "tile " << tile;
    EXPECT_FLOAT_EQ(*std::max_element(g.begin(), g.end()), 10.0f);
  }
}

struct Fixture {
  UNet net;
  Tensor volume;
};

Fixture make(std::array<size_t, 3> dhw) {
  auto net = UNet::create({2, 2, 8, 2, 2}, 5);
  EXPECT_TRUE(net);
  Tensor v({1, 2, dhw[0], dhw[1], dhw[2]});
  SplitMix64 rng{9};
  for (auto& x : v.data) x = static_cast<float>(rng.normal());
  return {std::move(*net), std::move(v)};
}

// The tile of `v` at (z0, y0, x0), zero outside.
Tensor tile_at(const Tensor& v, size_t T, size_t z0, size_t y0, size_t x0) {
  Tensor t({1, v.shape[1], T, T, T});
  const size_t D = v.shape[2], H = v.shape[3], W = v.shape[4];
  for (size_t c = 0; c < v.shape[1]; ++c)
    for (size_t z = 0; z < T; ++z)
      for (size_t y = 0; y < T; ++y)
        for (size_t x = 0; x < T; ++x)
          if (z0 + z < D && y0 + y < H && x0 + x < W) t.data[((c * T + z) * T + y) * T + x] = v.data[((c * D + z0 + z) * H + y0 + y) * W + x0 + x];
  return t;
}

TEST(SlidingWindow, OneTileIsTheNetworksOutput) {
  auto f = make({16, 16, 16});
  SlidingWindowOptions o;
  o.tile = 16;
  auto got = sliding_window_logits(f.net, f.volume, o);
  ASSERT_TRUE(got) << got.error().message;
  auto want = f.net.forward(f.volume);
  ASSERT_TRUE(want);
  ASSERT_EQ(got->shape, want->shape);
  for (size_t i = 0; i < want->data.size(); ++i) ASSERT_NEAR(got->data[i], want->data[i], 1e-6 * (1 + std::abs(want->data[i]))) << i;
}

// nnU-Net's test-time mirroring: one tile's logits are the mean of the network's output on the tile
// and, flipped back, on its seven flips; the prediction then commutes with flipping the volume
// (which it does not without mirroring).
TEST(SlidingWindow, MirroringAveragesTheEightFlips) {
  auto f = make({16, 16, 16});
  // flip_spatial: twice is the identity; along W it reverses each row.
  const Tensor w = flip_spatial(f.volume, 1);
  EXPECT_EQ(w.data[0], f.volume.data[15]);
  EXPECT_TRUE(flip_spatial(flip_spatial(f.volume, 7), 7).data == f.volume.data);
  SlidingWindowOptions o;
  o.tile = 16;
  o.mirror = true;
  auto got = sliding_window_logits(f.net, f.volume, o);
  ASSERT_TRUE(got) << got.error().message;
  std::vector<double> want(got->data.size(), 0.0);
  for (unsigned axes = 0; axes < 8; ++axes) {
    auto y = f.net.forward(flip_spatial(f.volume, axes));
    ASSERT_TRUE(y);
    const Tensor back = flip_spatial(*y, axes);
    for (size_t i = 0; i < want.size(); ++i) want[i] += back.data[i] / 8.0;
  }
  double worst = 0;
  for (size_t i = 0; i < want.size(); ++i) worst = std::max(worst, std::abs(got->data[i] - want[i]));
  EXPECT_LT(worst, 1e-5);
  // Equivariance: the mirrored prediction of the volume flipped along H is the flipped prediction.
  auto mirrored_flip = sliding_window_logits(f.net, flip_spatial(f.volume, 2), o);
  ASSERT_TRUE(mirrored_flip);
  const Tensor expect = flip_spatial(*got, 2);
  double gap = 0;
  for (size_t i = 0; i < expect.data.size(); ++i) gap = std::max(gap, static_cast<double>(std::abs(mirrored_flip->data[i] - expect.data[i])));
  EXPECT_LT(gap, 1e-5);
  o.mirror = false;
  auto plain = sliding_window_logits(f.net, f.volume, o);
  auto plain_flip = sliding_window_logits(f.net, flip_spatial(f.volume, 2), o);
  ASSERT_TRUE(plain && plain_flip);
  const Tensor plain_expect = flip_spatial(*plain, 2);
  double plain_gap = 0;
  for (size_t i = 0; i < plain_expect.data.size(); ++i) plain_gap = std::max(plain_gap, static_cast<double>(std::abs(plain_flip->data[i] - plain_expect.data[i])));
  EXPECT_GT(plain_gap, 1e-3) << "without mirroring the network is not flip-equivariant";
}

TEST(SlidingWindow, OverlappingTilesAreGaussianWeightedAverages) {
  // D = 24 with tiles of 16: starts 0 and 8 along z; H, W one tile each.
  auto f = make({24, 16, 16});
  SlidingWindowOptions o;
  o.tile = 16;
  o.batch = 1;
  auto got = sliding_window_logits(f.net, f.volume, o);
  ASSERT_TRUE(got) << got.error().message;
  auto a = f.net.forward(tile_at(f.volume, 16, 0, 0, 0));
  auto b = f.net.forward(tile_at(f.volume, 16, 8, 0, 0));
  ASSERT_TRUE(a && b);
  const auto g = gaussian_importance(16);
  double worst = 0;
  for (size_t k = 0; k < 2; ++k)
    for (size_t z = 0; z < 24; ++z)
      for (size_t yx = 0; yx < 256; ++yx) {
        double num = 0, den = 0;
        if (z < 16) {
          num += static_cast<double>(g[z * 256 + yx]) * a->data[(k * 16 + z) * 256 + yx];
          den += g[z * 256 + yx];
        }
        if (z >= 8) {
          num += static_cast<double>(g[(z - 8) * 256 + yx]) * b->data[(k * 16 + z - 8) * 256 + yx];
          den += g[(z - 8) * 256 + yx];
        }
        worst = std::max(worst, std::abs(got->data[(k * 24 + z) * 256 + yx] - num / den));
      }
  EXPECT_LT(worst, 1e-5);
  // And the overlap matters: in the middle the result is neither tile's own prediction.
  EXPECT_NE(got->data[12 * 256 + 8 * 16 + 8], a->data[12 * 256 + 8 * 16 + 8]);
}

TEST(SlidingWindow, AVolumeSmallerThanATileIsPaddedAndCroppedBack) {
  auto f = make({10, 12, 7});
  SlidingWindowOptions o;
  o.tile = 16;
  auto got = sliding_window_logits(f.net, f.volume, o);
  ASSERT_TRUE(got) << got.error().message;
  EXPECT_EQ(got->shape, (std::array<size_t, 5>{1, 2, 10, 12, 7}));
  auto padded = f.net.forward(tile_at(f.volume, 16, 0, 0, 0));
  ASSERT_TRUE(padded);
  for (size_t k = 0; k < 2; ++k)
    for (size_t z = 0; z < 10; ++z)
      for (size_t y = 0; y < 12; ++y)
        for (size_t x = 0; x < 7; ++x) {
          ASSERT_NEAR(got->data[((k * 10 + z) * 12 + y) * 7 + x], padded->data[((k * 16 + z) * 16 + y) * 16 + x], 1e-5);
        }
}

TEST(SlidingWindow, BadArgumentsAreNamed) {
  auto f = make({16, 16, 16});
  SlidingWindowOptions o;
  o.tile = 9;
  EXPECT_NE(sliding_window_logits(f.net, f.volume, o).error().message.find("a tile of 9 is not a multiple of 2"), std::string::npos);
  o.tile = 16;
  o.step = 0;
  EXPECT_NE(sliding_window_logits(f.net, f.volume, o).error().message.find("step must be in (0, 1]"), std::string::npos);
  o.step = 0.5;
  Tensor one_channel({1, 1, 16, 16, 16});
  EXPECT_NE(sliding_window_logits(f.net, one_channel, o).error().message.find("the model takes 1×2×D×H×W"), std::string::npos);
}

}  // namespace
}  // namespace tresor::train
