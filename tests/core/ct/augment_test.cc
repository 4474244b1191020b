// Training patches (include/tresor/ct/augment.h): reproducible from (seed, index), biased to the
// foreground as asked, flips and intensity changes exactly as recorded, noise of the drawn size,
// and every bad option named.
#include <gtest/gtest.h>

#include <cmath>

#include "tresor/ct/augment.h"
#include "tresor/ct/ops.h"

namespace tresor::ct {
namespace {

struct Source {
  FloatVolume image;
  LabelVolume labels;
};

Source source() {
  PhantomOptions o;
  o.seed = 8;
  o.dims = {96, 96, 64};
  o.spacing = {1.3, 1.3, 1.5};
  auto p = make_phantom(o);
  Source s;
  s.image = normalise(p->hu, CtNormalisation{-1000, 1000, 0, 500});
  s.labels = p->labels;
  return s;
}

AugmentOptions plain(std::array<size_t, 3> patch) {
  AugmentOptions o;
  o.patch = patch;
  o.flip_probability = 0;
  o.intensity_probability = 0;
  o.noise_probability = 0;
  return o;
}

// The source voxel a patch voxel came from, by the recorded corner and flips.
size_t source_index(const Source& s, const Patch& p, size_t x, size_t y, size_t z) {
  const auto& n = p.image.dims;
  const size_t sx = p.corner[0] + (p.flipped[0] ? n[0] - 1 - x : x);
  const size_t sy = p.corner[1] + (p.flipped[1] ? n[1] - 1 - y : y);
  const size_t sz = p.corner[2] + (p.flipped[2] ? n[2] - 1 - z : z);
  return s.image.index(sx, sy, sz);
}

TEST(Augment, TheSameSeedAndIndexGiveTheSameBytes) {
  const Source s = source();
  AugmentOptions o;
  o.patch = {32, 32, 24};
  o.intensity_probability = 0.5;
  o.noise_probability = 0.5;
  auto sampler = PatchSampler::create(s.image, s.labels, o);
  ASSERT_TRUE(sampler) << sampler.error().message;
  EXPECT_GT(sampler->foreground_voxels(), 0u);
  for (uint64_t i = 0; i < 8; ++i) {
    const Patch a = sampler->sample(42, i), b = sampler->sample(42, i);
    EXPECT_TRUE(a.image.data == b.image.data);
    EXPECT_TRUE(a.labels.data == b.labels.data);
    EXPECT_EQ(a.corner, b.corner);
  }
  // Another index or another seed: another patch.
  EXPECT_FALSE(sampler->sample(42, 0).image.data == sampler->sample(42, 1).image.data);
  EXPECT_FALSE(sampler->sample(42, 0).image.data == sampler->sample(43, 0).image.data);
}

TEST(Augment, ForegroundPatchesContainTheLabelAndTheFractionHolds) {
  const Source s = source();
  AugmentOptions o = plain({24, 24, 16});
  o.foreground_fraction = 1;
  auto all = PatchSampler::create(s.image, s.labels, o);
  ASSERT_TRUE(all);
  for (uint64_t i = 0; i < 50; ++i) {
    const Patch p = all->sample(1, i);
    ASSERT_TRUE(p.foreground);
    EXPECT_NE(std::find(p.labels.data.begin(), p.labels.data.end(), kCoronary), p.labels.data.end()) << "patch " << i;
  }
  // Drawn at random, few patches this small hit the thin coronaries; the fraction asked for is met
  // within a binomial margin (n = 400, p = 0.33: sd 0.024, so ±0.08 is over 3 sd).
  o.foreground_fraction = 0;
  auto none = PatchSampler::create(s.image, s.labels, o);
  size_t hits = 0;
  for (uint64_t i = 0; i < 400; ++i) hits += none->sample(1, i).foreground ? 1u : 0u;
  EXPECT_EQ(hits, 0u);
  o.foreground_fraction = 1.0 / 3;
  auto third = PatchSampler::create(s.image, s.labels, o);
  hits = 0;
  for (uint64_t i = 0; i < 400; ++i) hits += third->sample(1, i).foreground ? 1u : 0u;
  EXPECT_NEAR(static_cast<double>(hits) / 400, 1.0 / 3, 0.08);
  // A volume without the label: the draw is recorded as unmet, not hidden.
  LabelVolume empty = s.labels;
  std::fill(empty.data.begin(), empty.data.end(), 0);
  o.foreground_fraction = 1;
  auto unmet = PatchSampler::create(s.image, empty, o);
  ASSERT_TRUE(unmet);
  const Patch p = unmet->sample(1, 0);
  EXPECT_FALSE(p.foreground);
  EXPECT_TRUE(p.no_foreground);
}

TEST(Augment, FlipsAndIntensityAreExactlyWhatWasRecorded) {
  const Source s = source();
  AugmentOptions o = plain({20, 18, 16});
  o.flip_probability = 0.5;
  o.intensity_probability = 1;
  auto sampler = PatchSampler::create(s.image, s.labels, o);
  std::array<size_t, 3> flips{};
  for (uint64_t i = 0; i < 40; ++i) {
    const Patch p = sampler->sample(9, i);
    EXPECT_GE(p.scale, 0.75);
    EXPECT_LE(p.scale, 1.25);
    EXPECT_GE(p.shift, -0.1);
    EXPECT_LE(p.shift, 0.1);
    for (size_t a = 0; a < 3; ++a) flips[a] += p.flipped[a] ? 1u : 0u;
    for (size_t z = 0; z < 16; ++z)
      for (size_t y = 0; y < 18; ++y)
        for (size_t x = 0; x < 20; ++x) {
          const size_t src = source_index(s, p, x, y, z), dst = p.image.index(x, y, z);
          ASSERT_EQ(p.labels.data[dst], s.labels.data[src]);
          ASSERT_EQ(p.image.data[dst], static_cast<float>(static_cast<double>(s.image.data[src]) * p.scale + p.shift));
        }
  }
  for (size_t a = 0; a < 3; ++a) {
    EXPECT_GT(flips[a], 5u) << "axis " << a;  // 40 draws at p = 0.5: 5..35 is far beyond 4 sd
    EXPECT_LT(flips[a], 35u) << "axis " << a;
  }
}

TEST(Augment, NoiseHasTheDrawnStandardDeviation) {
  const Source s = source();
  AugmentOptions o = plain({40, 40, 32});
  o.noise_probability = 1;
  o.noise_variance_min = o.noise_variance_max = 0.04;  // sd 0.2
  auto sampler = PatchSampler::create(s.image, s.labels, o);
  const Patch p = sampler->sample(3, 0);
  ASSERT_DOUBLE_EQ(p.noise_sd, 0.2);
  double sum = 0, sq = 0;
  for (size_t z = 0; z < 32; ++z)
    for (size_t y = 0; y < 40; ++y)
      for (size_t x = 0; x < 40; ++x) {
        const double e = p.image.at(x, y, z) - s.image.data[source_index(s, p, x, y, z)];
        sum += e;
        sq += e * e;
      }
  const double n = 40.0 * 40 * 32, mean = sum / n, sd = std::sqrt(sq / n - mean * mean);
  EXPECT_NEAR(mean, 0, 0.01);
  EXPECT_NEAR(sd, 0.2, 0.005);
}

TEST(Augment, BadOptionsAreNamed) {
  const Source s = source();
  auto message = [&](AugmentOptions o, const LabelVolume& l) { return PatchSampler::create(s.image, l, o).error().message; };
  AugmentOptions o;
  o.patch = {128, 32, 32};
  EXPECT_NE(message(o, s.labels).find("a patch of 128 voxels on axis 0 does not fit the volume's 96"), std::string::npos);
  o.patch = {32, 0, 32};
  EXPECT_NE(message(o, s.labels).find("a patch of 0 voxels on axis 1"), std::string::npos);
  o = {};
  o.patch = {32, 32, 32};
  o.flip_probability = 1.5;
  EXPECT_NE(message(o, s.labels).find("flip probability 1.5"), std::string::npos);
  o.flip_probability = 0.5;
  o.scale_min = 2;
  EXPECT_NE(message(o, s.labels).find("scale range 2.0"), std::string::npos);
  o.scale_min = 0.75;
  o.noise_variance_min = -1;
  EXPECT_NE(message(o, s.labels).find("noise variance -1"), std::string::npos);
  o.noise_variance_min = 0;
  LabelVolume small = s.labels;
  small.dims[0] = 95;
  EXPECT_NE(message(o, small).find("labels do not have the image's dimensions"), std::string::npos);
  EXPECT_TRUE(PatchSampler::create(s.image, s.labels, o));
}

}  // namespace
}  // namespace tresor::ct
