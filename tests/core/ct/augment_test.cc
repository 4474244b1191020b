// Training patches (include/tresor/ct/augment.h): reproducible from (seed, index), biased to the
// foreground as asked, flips and intensity changes exactly as recorded, noise of the drawn size,
// the spatial transform (rotation, scaling) against exact rotations and a textbook trilinear
// interpolation, and every bad option named.
#include <gtest/gtest.h>

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <iterator>
#include <sstream>
#include <limits>
#include <numbers>
#include <utility>
#include <vector>

#include "tresor/ct/augment.h"
#include "tresor/ct/augment_hd.h"
#include "tresor/ct/ops.h"
#include "tresor/splitmix.h"
#include "support/test_support.h"

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
  o.rotation_probability = 0;
  o.scaling_probability = 0;
  o.contrast_probability = 0;
  o.gamma_probability = o.gamma_inverted_probability = 0;
  o.blur_probability = o.lowres_probability = 0;
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
  o.rotation_max_degrees = 200;
  EXPECT_NE(message(o, s.labels).find("rotation of 200.000000 degrees is not in 0..180"), std::string::npos);
  o.rotation_max_degrees = 30;
  o.rotation_probability = -0.1;
  EXPECT_NE(message(o, s.labels).find("rotation probability -0.1"), std::string::npos);
  o.rotation_probability = 0.2;
  o.scaling_min = 0;
  EXPECT_NE(message(o, s.labels).find("scaling factor 0.000000 is not positive"), std::string::npos);
  o.scaling_min = 1.5;
  EXPECT_NE(message(o, s.labels).find("scaling range 1.5"), std::string::npos);
  o.scaling_min = 0.7;
  o.scaling_max = 1e300;  // would overflow the source positions
  EXPECT_NE(message(o, s.labels).find("is above 10"), std::string::npos);
  o.scaling_max = 1.4;
  o.contrast_min = 1.3;
  EXPECT_NE(message(o, s.labels).find("contrast range 1.3"), std::string::npos);
  o.contrast_min = 0.75;
  o.contrast_probability = 2;
  EXPECT_NE(message(o, s.labels).find("contrast probability 2"), std::string::npos);
  o.contrast_probability = 0.15;
  o.gamma_min = 0;
  EXPECT_NE(message(o, s.labels).find("gamma range 0.000000..1.500000 is not within (0, 10]"), std::string::npos);
  o.gamma_min = 0.7;
  o.gamma_inverted_probability = 1.1;
  EXPECT_NE(message(o, s.labels).find("inverted gamma probability 1.1"), std::string::npos);
  o.gamma_inverted_probability = 0.1;
  o.blur_sigma_min = 0;
  EXPECT_NE(message(o, s.labels).find("blur sigma range 0.000000..1.000000 voxels is not within (0, 5]"), std::string::npos);
  o.blur_sigma_min = 0.5;
  o.blur_sigma_max = 6;
  EXPECT_NE(message(o, s.labels).find("blur sigma range 0.500000..6.000000 voxels"), std::string::npos);
  o.blur_sigma_max = 0.4;
  EXPECT_NE(message(o, s.labels).find("blur sigma range 0.5"), std::string::npos);
  o.blur_sigma_max = 1;
  o.blur_probability = -1;
  EXPECT_NE(message(o, s.labels).find("blur probability -1"), std::string::npos);
  o.blur_probability = 0.1;
  o.lowres_scale_max = 1.5;
  EXPECT_NE(message(o, s.labels).find("low-resolution scale range 0.500000..1.500000 is not within (0, 1]"), std::string::npos);
  o.lowres_scale_max = 1;
  o.lowres_scale_min = 0;
  EXPECT_NE(message(o, s.labels).find("low-resolution scale range 0.000000..1.000000"), std::string::npos);
  o.lowres_scale_min = 0.5;
  o.lowres_probability = 3;
  EXPECT_NE(message(o, s.labels).find("low-resolution probability 3"), std::string::npos);
  o.lowres_probability = 0.125;
  LabelVolume small = s.labels;
  small.dims[0] = 95;
  EXPECT_NE(message(o, small).find("labels do not have the image's dimensions"), std::string::npos);
  EXPECT_TRUE(PatchSampler::create(s.image, s.labels, o));
}

}  // namespace
}  // namespace tresor::ct

namespace tresor::ct {
namespace {

// A volume of random values and labels 0..3 for the spatial transform's tests.
Source random_source(std::array<size_t, 3> dims, uint64_t seed) {
  Source s;
  s.image.dims = s.labels.dims = dims;
  s.image.data.resize(s.image.size());
  s.labels.data.resize(s.image.size());
  SplitMix64 r{seed};
  for (auto& v : s.image.data) v = static_cast<float>(r.uniform() * 4 - 2);
  for (auto& l : s.labels.data) l = static_cast<uint8_t>(r.below(4));
  return s;
}

// A hand-made patch record under a given matrix (what PatchSampler::sample records).
Patch transformed(std::array<size_t, 3> patch, std::array<size_t, 3> corner, const double m[9]) {
  Patch p;
  p.image.dims = patch;
  p.corner = corner;
  p.spatial = true;
  std::copy(m, m + 9, p.affine.begin());
  return p;
}

TEST(AugmentSpatial, TheMatrixOfExactTurnsIsExact) {
  namespace hd = augment_hd;
  double m[9];
  const int64_t half_z[3] = {0, 0, int64_t{1} << 52}, quarter_x[3] = {int64_t{1} << 51, 0, 0}, none[3] = {0, 0, 0};
  hd::rotation_scaling(half_z, 1, m);
  const double want_half_z[9] = {-1, 0, 0, 0, -1, 0, 0, 0, 1};
  for (int i = 0; i < 9; ++i) EXPECT_EQ(m[i], want_half_z[i]) << i;
  hd::rotation_scaling(quarter_x, 2, m);  // y → z, z → −y, then doubled
  const double want_quarter_x[9] = {2, 0, 0, 0, 0, -2, 0, 2, 0};
  for (int i = 0; i < 9; ++i) EXPECT_EQ(m[i], want_quarter_x[i]) << i;
  hd::rotation_scaling(none, 0.75, m);
  const double want_scaled[9] = {0.75, 0, 0, 0, 0.75, 0, 0, 0, 0.75};
  for (int i = 0; i < 9; ++i) EXPECT_EQ(m[i], want_scaled[i]) << i;
  // 30° about z: cos and sin within an ulp of libm's, and the matrix orthogonal.
  const int64_t z30[3] = {0, 0, static_cast<int64_t>(0x1p53 / 12)};
  hd::rotation_scaling(z30, 1, m);
  EXPECT_NEAR(m[0], std::cos(std::numbers::pi / 6), 1e-15);
  EXPECT_NEAR(m[3], std::sin(std::numbers::pi / 6), 1e-15);
  EXPECT_NEAR(m[0] * m[0] + m[3] * m[3], 1, 1e-15);
}

TEST(AugmentSpatial, ExactTurnsMoveVoxelsWithoutInterpolating) {
  const Source s = random_source({30, 30, 20}, 5);
  AugmentOptions o = plain({16, 16, 8});
  auto sampler = PatchSampler::create(s.image, s.labels, o);
  ASSERT_TRUE(sampler) << sampler.error().message;
  double m[9];
  const std::array<size_t, 3> corner{7, 9, 5};
  // A half turn about z is the x and y flips.
  const int64_t half_z[3] = {0, 0, int64_t{1} << 52};
  augment_hd::rotation_scaling(half_z, 1, m);
  Patch flipped = transformed({16, 16, 8}, corner, m);
  flipped.spatial = false;
  flipped.flipped = {true, true, false};
  const auto want = sampler->channel(flipped, s.image);
  const auto got = sampler->channel(transformed({16, 16, 8}, corner, m), s.image);
  ASSERT_TRUE(want && got);
  EXPECT_TRUE(*want == *got);
  // A quarter turn about z (Rz = [[0, −1], [1, 0]]): as batchgeneratorsv2 samples (grid @ M), patch
  // offset (dx, dy) reads the source at Mᵀ·d = (dy, −dx).
  const int64_t quarter_z[3] = {0, 0, int64_t{1} << 51};
  augment_hd::rotation_scaling(quarter_z, 1, m);
  const auto q = sampler->channel(transformed({16, 16, 8}, corner, m), s.image);
  ASSERT_TRUE(q);
  size_t k = 0;
  for (size_t z = 0; z < 8; ++z)
    for (size_t y = 0; y < 16; ++y)
      for (size_t x = 0; x < 16; ++x, ++k) {
        // centre c = corner + 7.5: source x = c_x + (y − 7.5) = corner_x + y, y = c_y − (x − 7.5) = corner_y + 15 − x.
        ASSERT_EQ((*q)[k], s.image.at(corner[0] + y, corner[1] + 15 - x, corner[2] + z)) << x << "," << y << "," << z;
      }
}

// The textbook trilinear interpolation (lerps along x, then y, then z; zero outside), written
// independently of augment_hd.
double textbook_trilinear(const FloatVolume& v, double x, double y, double z) {
  auto at = [&](long i, long j, long l) -> double {
    if (i < 0 || j < 0 || l < 0 || i >= static_cast<long>(v.dims[0]) || j >= static_cast<long>(v.dims[1]) || l >= static_cast<long>(v.dims[2])) return 0;
    return v.at(static_cast<size_t>(i), static_cast<size_t>(j), static_cast<size_t>(l));
  };
  const long i = static_cast<long>(std::floor(x)), j = static_cast<long>(std::floor(y)), l = static_cast<long>(std::floor(z));
  const double fx = x - static_cast<double>(i), fy = y - static_cast<double>(j), fz = z - static_cast<double>(l);
  auto lerp = [](double a, double b, double f) { return a + (b - a) * f; };
  double c[2];
  for (long dz = 0; dz < 2; ++dz) {
    const double c0 = lerp(at(i, j, l + dz), at(i + 1, j, l + dz), fx), c1 = lerp(at(i, j + 1, l + dz), at(i + 1, j + 1, l + dz), fx);
    c[dz] = lerp(c0, c1, fy);
  }
  return lerp(c[0], c[1], fz);
}

TEST(AugmentSpatial, RotatedAndScaledPatchesAreTrilinearAtTheirSourcePositions) {
  const Source s = random_source({24, 22, 18}, 7);
  AugmentOptions o = plain({12, 12, 12});
  o.rotation_probability = o.scaling_probability = 1;
  o.rotation_max_degrees = 45;
  o.scaling_min = 0.6;
  o.scaling_max = 1.8;  // large enough for some positions to leave the volume
  auto sampler = PatchSampler::create(s.image, s.labels, o);
  ASSERT_TRUE(sampler) << sampler.error().message;
  size_t outside = 0;
  for (uint64_t i = 0; i < 6; ++i) {
    const Patch p = sampler->sample(11, i);
    ASSERT_TRUE(p.spatial);
    EXPECT_GE(p.scaling, 0.6);
    EXPECT_LE(p.scaling, 1.8);
    for (double a : p.rotation_degrees) {
      EXPECT_LE(std::abs(a), 45.0);
    }
    EXPECT_GT(std::abs(p.rotation_degrees[0]) + std::abs(p.rotation_degrees[1]) + std::abs(p.rotation_degrees[2]), 0.0);
    // The recorded matrix is the recorded angles and factor (libm, to 1e-12).
    const double r[3] = {p.rotation_degrees[0] * std::numbers::pi / 180, p.rotation_degrees[1] * std::numbers::pi / 180, p.rotation_degrees[2] * std::numbers::pi / 180};
    const double cx = std::cos(r[0]), sx = std::sin(r[0]), cy = std::cos(r[1]), sy = std::sin(r[1]), cz = std::cos(r[2]), sz = std::sin(r[2]);
    const double want[9] = {cz * cy, cz * sy * sx - sz * cx, cz * sy * cx + sz * sx, sz * cy, sz * sy * sx + cz * cx, sz * sy * cx - cz * sx, -sy, cy * sx, cy * cx};
    for (int k = 0; k < 9; ++k) ASSERT_NEAR(p.affine[static_cast<size_t>(k)], want[k] * p.scaling, 1e-12) << k;
    size_t k = 0;
    for (size_t z = 0; z < 12; ++z)
      for (size_t y = 0; y < 12; ++y)
        for (size_t x = 0; x < 12; ++x, ++k) {
          const double d[3] = {static_cast<double>(x) - 5.5, static_cast<double>(y) - 5.5, static_cast<double>(z) - 5.5};
          double src[3];
          for (size_t a = 0; a < 3; ++a) {
            // Mᵀ·d (batchgeneratorsv2's grid @ M).
            src[a] = static_cast<double>(p.corner[a]) + 5.5 + p.affine[a] * d[0] + p.affine[3 + a] * d[1] + p.affine[6 + a] * d[2];
          }
          const bool out = src[0] <= -1 || src[1] <= -1 || src[2] <= -1 || src[0] >= 24 || src[1] >= 22 || src[2] >= 18;
          outside += out ? 1u : 0u;
          ASSERT_NEAR(p.image.data[k], textbook_trilinear(s.image, src[0], src[1], src[2]), 1e-5) << "patch " << i << " voxel " << k;
          if (out) {
            ASSERT_EQ(p.image.data[k], 0.0f);
            ASSERT_EQ(p.labels.data[k], 0);
          }
        }
  }
  EXPECT_GT(outside, 0u);  // the zero padding was exercised
}

TEST(AugmentSpatial, LabelsTakeTheLargestInterpolatedWeight) {
  namespace hd = augment_hd;
  const uint64_t n[3] = {2, 2, 2};
  auto label = [&](std::array<uint8_t, 8> l, double x, double y, double z) {
    const double s[3] = {x, y, z};
    return hd::label_at([&](uint64_t i) { return l[i]; }, hd::neighbours(n, s));
  };
  // At the centre every voxel weighs 1/8.
  EXPECT_EQ(label({1, 1, 1, 2, 2, 2, 2, 3}, 0.5, 0.5, 0.5), 2);  // 3/8, 4/8, 1/8
  EXPECT_EQ(label({2, 2, 2, 2, 1, 1, 1, 1}, 0.5, 0.5, 0.5), 1);  // a tie goes to the smaller label
  EXPECT_EQ(label({5, 5, 5, 4, 4, 4, 4, 4}, 0.5, 0.5, 0.5), 4);
  EXPECT_EQ(label({1, 2, 3, 4, 5, 6, 7, 8}, 0.9, 0.1, 0.1), 2);  // the nearest voxel dominates
  EXPECT_EQ(label({1, 2, 3, 4, 5, 6, 7, 8}, 0, 1, 1), 7);        // exactly on a voxel
  EXPECT_EQ(label({9, 9, 9, 9, 9, 9, 9, 9}, -0.25, 0, 0), 9);    // partly outside: the inside decides
  EXPECT_EQ(label({9, 9, 9, 9, 9, 9, 9, 9}, -1, 0, 0), 0);       // wholly outside: background
  EXPECT_EQ(label({9, 9, 9, 9, 9, 9, 9, 9}, 2.5, 0, 0), 0);
  EXPECT_EQ(label({9, 9, 9, 9, 9, 9, 9, 9}, -1e300, 1e300, 0), 0);
}

TEST(AugmentSpatial, NoTurnAndUnitScalingGiveThePlainCrop) {
  const Source s = source();
  AugmentOptions o = plain({24, 20, 16});
  o.flip_probability = 0.5;
  o.intensity_probability = 1;
  o.noise_probability = 1;
  AugmentOptions spatial = o;
  spatial.rotation_probability = spatial.scaling_probability = 1;
  spatial.rotation_max_degrees = 0;
  spatial.scaling_min = spatial.scaling_max = 1;
  auto a = PatchSampler::create(s.image, s.labels, o), b = PatchSampler::create(s.image, s.labels, spatial);
  ASSERT_TRUE(a && b);
  for (uint64_t i = 0; i < 6; ++i) {
    const Patch pa = a->sample(4, i), pb = b->sample(4, i);
    EXPECT_FALSE(pa.spatial);
    EXPECT_TRUE(pb.spatial);
    EXPECT_EQ(pa.corner, pb.corner);  // the other draws come from their own stream
    EXPECT_EQ(pa.flipped, pb.flipped);
    EXPECT_TRUE(pa.image.data == pb.image.data) << "patch " << i;
    EXPECT_TRUE(pa.labels.data == pb.labels.data) << "patch " << i;
  }
}

TEST(AugmentSpatial, DefaultsFollowNnUNet) {
  const AugmentOptions o;  // p 0.2 each, ±30°, 0.7..1.4
  AugmentOptions off = o;
  off.rotation_probability = off.scaling_probability = 0;
  const std::array<size_t, 3> dims{96, 96, 64};
  size_t rotated = 0, scaled = 0, spatial = 0;
  const size_t n = 2000;
  for (uint64_t i = 0; i < n; ++i) {
    const PatchDraw d = PatchSampler::draw(o, dims, true, 17, i), plain_draw = PatchSampler::draw(off, dims, true, 17, i);
    const bool r = d.turns != std::array<int64_t, 3>{}, sc = d.scaling != 1;
    rotated += r ? 1u : 0u;
    scaled += sc ? 1u : 0u;
    spatial += d.spatial ? 1u : 0u;
    EXPECT_EQ(d.spatial, r || sc);
    for (int64_t t : d.turns) EXPECT_LE(std::abs(static_cast<double>(t)) * 0x1p-53 * 360, 30.0);
    if (sc) {
      EXPECT_GE(d.scaling, 0.7);
      EXPECT_LT(d.scaling, 1.4);
    }
    // Every other draw is the one made without the spatial transform.
    ASSERT_EQ(d.want_foreground, plain_draw.want_foreground);
    ASSERT_EQ(d.foreground_draw, plain_draw.foreground_draw);
    ASSERT_EQ(d.flipped, plain_draw.flipped);
    ASSERT_EQ(d.noise_state, plain_draw.noise_state);
    ASSERT_EQ(d.scale, plain_draw.scale);
  }
  // Binomial(2000, 0.2): sd ≈ 17.9, ±5 sd; 1 − 0.8² = 0.36: sd ≈ 21.5.
  EXPECT_NEAR(static_cast<double>(rotated), 400, 90);
  EXPECT_NEAR(static_cast<double>(scaled), 400, 90);
  EXPECT_NEAR(static_cast<double>(spatial), 720, 108);
}

TEST(AugmentSpatial, AnotherChannelFollowsThePatch) {
  const Source s = source();
  AugmentOptions o;
  o.patch = {20, 20, 20};
  o.rotation_probability = o.scaling_probability = 1;
  o.intensity_probability = o.noise_probability = o.contrast_probability = o.gamma_probability = o.gamma_inverted_probability = 0;
  o.blur_probability = o.lowres_probability = 0;
  auto sampler = PatchSampler::create(s.image, s.labels, o);
  ASSERT_TRUE(sampler);
  // The image itself as the other channel: without intensity changes or noise, the patch's image.
  for (uint64_t i = 0; i < 3; ++i) {
    const Patch p = sampler->sample(2, i);
    ASSERT_TRUE(p.spatial);
    auto c = sampler->channel(p, s.image);
    ASSERT_TRUE(c);
    EXPECT_TRUE(*c == p.image.data);
  }
  FloatVolume other = s.image;
  other.dims[2] -= 1;
  other.data.resize(other.size());
  EXPECT_NE(sampler->channel(sampler->sample(2, 0), other).error().message.find("does not have the image's dimensions"), std::string::npos);
}

// nnU-Net's ContrastTransform with preserve_range, against the formula computed here in long
// double: x' = clip((x − mean)·factor + mean, min, max).
TEST(AugmentContrast, ThePatchScalesAboutItsMeanWithinItsRange) {
  const Source s = source();
  AugmentOptions o = plain({24, 20, 16});
  AugmentOptions c = o;
  c.contrast_probability = 1;
  c.contrast_min = c.contrast_max = 1.25;
  auto a = PatchSampler::create(s.image, s.labels, o), b = PatchSampler::create(s.image, s.labels, c);
  ASSERT_TRUE(a && b);
  for (uint64_t i = 0; i < 5; ++i) {
    const Patch pa = a->sample(6, i), pb = b->sample(6, i);
    EXPECT_EQ(pa.contrast, 1.0);
    ASSERT_EQ(pb.contrast, 1.25);
    long double sum = 0;
    float lo = pa.image.data[0], hi = pa.image.data[0];
    for (float v : pa.image.data) {
      sum += v;
      lo = std::min(lo, v);
      hi = std::max(hi, v);
    }
    const long double mean = sum / static_cast<long double>(pa.image.data.size());
    size_t clipped = 0;
    for (size_t k = 0; k < pa.image.data.size(); ++k) {
      const long double want = std::clamp((pa.image.data[k] - mean) * 1.25L + mean, static_cast<long double>(lo), static_cast<long double>(hi));
      ASSERT_NEAR(static_cast<double>(pb.image.data[k]), static_cast<double>(want), 1e-6) << "patch " << i << " voxel " << k;
      clipped += pb.image.data[k] == lo || pb.image.data[k] == hi ? 1u : 0u;
    }
    EXPECT_GE(clipped, 2u);  // the extremes at least
    EXPECT_TRUE(pa.labels.data == pb.labels.data);
  }
  // The reduction's order does not depend on the patch's size: sizes below and above its 256
  // threads give the formula's result too.
  for (uint64_t m : {1u, 7u, 256u, 257u, 1000u}) {
    std::vector<float> x(m), y;
    SplitMix64 r{m};
    for (auto& v : x) v = static_cast<float>(r.uniform() * 10 - 3);
    y = x;
    augment_hd::contrast_patch(y.data(), m, 0.5);
    long double sum = 0;
    for (float v : x) sum += v;
    const long double mean = sum / static_cast<long double>(m);
    for (size_t k = 0; k < m; ++k) ASSERT_NEAR(y[k], static_cast<double>((x[k] - mean) * 0.5L + mean), 1e-5) << m;
  }
  // With the defaults about 15 % of the patches change contrast, between 0.75 and 1.25.
  const AugmentOptions d;
  size_t changed = 0;
  for (uint64_t i = 0; i < 2000; ++i) {
    const PatchDraw dr = PatchSampler::draw(d, {96, 96, 64}, true, 23, i);
    if (dr.contrast != 1) {
      ++changed;
      EXPECT_GE(dr.contrast, 0.75);
      EXPECT_LT(dr.contrast, 1.25);
    }
  }
  EXPECT_NEAR(static_cast<double>(changed), 300, 80);  // Binomial(2000, 0.15): sd ≈ 16
}

// The gamma change's arithmetic: exp and pow written with + − × ÷ against libm.
TEST(AugmentGamma, ExpAndPowMatchLibm) {
  namespace hd = augment_hd;
  double worst_exp = 0, worst_pow = 0;
  for (double y = -700; y <= 0; y += 0.37) worst_exp = std::max(worst_exp, std::abs(hd::exp_nonpositive(y) - std::exp(y)) / std::exp(y));
  EXPECT_EQ(hd::exp_nonpositive(0), 1.0);
  EXPECT_EQ(hd::exp_nonpositive(-800), 0.0);
  EXPECT_EQ(hd::exp_nonpositive(std::numeric_limits<double>::quiet_NaN()), 0.0);
  SplitMix64 r{5};
  for (int i = 0; i < 20000; ++i) {
    const double v = r.uniform(), g = 0.7 + 0.8 * r.uniform();
    if (v == 0) continue;
    worst_pow = std::max(worst_pow, std::abs(hd::pow_unit(v, g) - std::pow(v, g)) / std::pow(v, g));
  }
  EXPECT_LT(worst_exp, 1e-15);
  EXPECT_LT(worst_pow, 1e-14);
  EXPECT_EQ(hd::pow_unit(0, 1.3), 0.0);
  EXPECT_EQ(hd::pow_unit(1, 0.7), 1.0);
  EXPECT_EQ(hd::pow_unit(0x1p-1030, 0.7), 0.0);  // below the smallest normal
}

// The mean and the standard deviation (n − 1, as torch.std) of a, summed in Acc.
template <typename Acc, typename T>
std::pair<Acc, Acc> mean_sd(const std::vector<T>& a) {
  Acc m = 0, q = 0;
  for (T e : a) m += e;
  m /= static_cast<Acc>(a.size());
  for (T e : a) q += (e - m) * (e - m);
  return std::pair{m, std::sqrt(q / static_cast<Acc>(a.size() - 1))};
}

// batchgeneratorsv2's GammaTransform with retain_stats, computed here in long double with libm.
std::vector<float> gamma_reference(const std::vector<float>& x, double gamma, bool invert) {
  const size_t n = x.size();
  std::vector<long double> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = invert ? -x[i] : x[i];
  const auto [mean, sd] = mean_sd<long double>(v);
  const long double lo = *std::min_element(v.begin(), v.end()), range = *std::max_element(v.begin(), v.end()) - lo;
  for (auto& e : v) e = std::pow((e - lo) / std::max(range, 1e-7L), static_cast<long double>(gamma)) * range + lo;
  const auto [mean_y, sd_y] = mean_sd<long double>(v);
  std::vector<float> out(n);
  for (size_t i = 0; i < n; ++i) {
    const long double w = (v[i] - mean_y) * (sd / std::max(sd_y, 1e-7L)) + mean;
    out[i] = static_cast<float>(invert ? -w : w);
  }
  return out;
}

TEST(AugmentGamma, PatchesFollowTheReferenceAndKeepTheirStatistics) {
  const Source s = source();
  AugmentOptions o = plain({24, 20, 16});
  auto a = PatchSampler::create(s.image, s.labels, o);
  ASSERT_TRUE(a);
  for (bool invert : {false, true}) {
    for (double g : {0.7, 1.0 / 0.9, 1.5}) {
      AugmentOptions c = o;
      (invert ? c.gamma_inverted_probability : c.gamma_probability) = 1;
      c.gamma_min = c.gamma_max = g;
      auto b = PatchSampler::create(s.image, s.labels, c);
      ASSERT_TRUE(b);
      const Patch pa = a->sample(12, 3), pb = b->sample(12, 3);
      ASSERT_EQ(invert ? pb.gamma_inverted : pb.gamma, g);
      const std::vector<float> want = gamma_reference(pa.image.data, g, invert);
      double worst = 0;
      for (size_t k = 0; k < want.size(); ++k) worst = std::max(worst, static_cast<double>(std::abs(pb.image.data[k] - want[k])));
      EXPECT_LT(worst, 2e-5) << "gamma " << g << (invert ? " inverted" : "");
      // The mean and standard deviation are kept; the values changed.
      const auto [ma, sa] = mean_sd<double>(pa.image.data);
      const auto [mb, sb] = mean_sd<double>(pb.image.data);
      EXPECT_NEAR(mb, ma, 1e-5);
      EXPECT_NEAR(sb, sa, 1e-5);
      EXPECT_FALSE(pa.image.data == pb.image.data);
    }
  }
  // A constant patch stays constant (range and sd 0: the clamps at 1e-7).
  std::vector<float> flat(300, 2.5f);
  augment_hd::gamma_patch(flat.data(), flat.size(), 1.3, false);
  for (float v : flat) ASSERT_EQ(v, 2.5f);
  // The draws: γ as BGContrast((0.7, 1.5)) samples it — half below 1 — at nnU-Net's rates.
  const AugmentOptions d;
  size_t normal = 0, inverted = 0, below = 0;
  for (uint64_t i = 0; i < 4000; ++i) {
    const PatchDraw dr = PatchSampler::draw(d, {96, 96, 64}, true, 29, i);
    for (double g : {dr.gamma, dr.gamma_inverted}) {
      if (g == 1) continue;
      EXPECT_GE(g, 0.7);
      EXPECT_LE(g, 1.5);
      below += g < 1 ? 1u : 0u;
    }
    normal += dr.gamma != 1 ? 1u : 0u;
    inverted += dr.gamma_inverted != 1 ? 1u : 0u;
  }
  EXPECT_NEAR(static_cast<double>(normal), 1200, 150);   // Binomial(4000, 0.3): sd ≈ 29
  EXPECT_NEAR(static_cast<double>(inverted), 400, 95);   // Binomial(4000, 0.1): sd ≈ 19
  EXPECT_NEAR(static_cast<double>(below), static_cast<double>(normal + inverted) / 2, 100);
}

// The blur (nnU-Net v2's GaussianBlurTransform) and the simulated low resolution (its
// SimulateLowResolutionTransform): the kernel's size and weights as batchgeneratorsv2 builds them,
// whole patches against an independent long-double computation here and against torch (Debian's
// python3-torch, with /usr/bin/python3), the draws at nnU-Net's rates without disturbing the
// others.
TEST(AugmentBlur, TheKernelIsBatchgeneratorsv2s) {
  // Python's round (half to even), then the odd neighbour on the side of the unrounded value.
  EXPECT_EQ(augment_hd::round_half_even(2.5), 2);
  EXPECT_EQ(augment_hd::round_half_even(3.5), 4);
  EXPECT_EQ(augment_hd::round_half_even(0.5), 0);
  EXPECT_EQ(augment_hd::round_half_even(2.4999), 2);
  EXPECT_EQ(augment_hd::round_half_even(2.5001), 3);
  for (auto [sigma, taps] : {std::pair{0.5, 3u}, {0.58, 3u}, {0.75, 5u}, {0.9, 5u}, {1.0, 7u}, {1.2, 7u}, {5.0, 31u}}) {
    const augment_hd::BlurKernel k = augment_hd::blur_kernel(sigma);
    ASSERT_EQ(k.taps, taps) << sigma;
    long double sum = 0;
    for (unsigned j = 0; j < taps; ++j) sum += std::exp(-0.5L * std::pow((static_cast<long double>(j) - (taps - 1) / 2.0L) / sigma, 2));
    for (unsigned j = 0; j < taps; ++j) {
      const long double want = std::exp(-0.5L * std::pow((static_cast<long double>(j) - (taps - 1) / 2.0L) / sigma, 2)) / sum;
      EXPECT_NEAR(k.w[j], static_cast<double>(want), 1e-15) << sigma << " tap " << j;
      EXPECT_EQ(k.w[j], k.w[taps - 1 - j]);
    }
  }
  // Reflection about the edge voxels, repeated where the kernel is longer than the axis.
  const uint64_t want3[] = {0, 1, 2, 1, 0, 1, 2, 1, 0, 1, 2};  // i = −4 … 6 on 3 voxels
  for (int64_t i = -4; i <= 6; ++i) EXPECT_EQ(augment_hd::reflect_index(i, 3), want3[i + 4]) << i;
  EXPECT_EQ(augment_hd::reflect_index(-5, 1), 0u);
}

// A patch blurred by augment_hd (as PatchSampler::sample and the loader do it) against the same
// passes written here in long double, reflection spelled out.
std::vector<float> blur_reference(std::vector<float> x, const std::array<size_t, 3>& n, const std::array<double, 3>& sigma) {
  for (size_t a = 3; a-- > 0;) {  // z, y, x
    const auto taps = static_cast<int64_t>(augment_hd::blur_taps(sigma[a]));
    const int64_t h = taps / 2;
    std::vector<long double> w(static_cast<size_t>(taps));
    long double sum = 0;
    for (int64_t j = 0; j < taps; ++j) sum += w[static_cast<size_t>(j)] = std::exp(-0.5L * std::pow(static_cast<long double>(j - h) / sigma[a], 2));
    std::vector<float> y(x.size());
    for (size_t z = 0; z < n[2]; ++z)
      for (size_t yy = 0; yy < n[1]; ++yy)
        for (size_t xx = 0; xx < n[0]; ++xx) {
          const size_t c[3] = {xx, yy, z};
          long double v = 0;
          for (int64_t j = 0; j < taps; ++j) {
            auto q = static_cast<int64_t>(c[a]) + j - h;
            const auto last = static_cast<int64_t>(n[a]) - 1;
            while (q < 0 || q > last) q = q < 0 ? -q : 2 * last - q;
            size_t at[3] = {xx, yy, z};
            at[a] = static_cast<size_t>(q);
            v += w[static_cast<size_t>(j)] / sum * x[at[0] + n[0] * (at[1] + n[1] * at[2])];
          }
          y[xx + n[0] * (yy + n[1] * z)] = static_cast<float>(v);
        }
    x = std::move(y);
  }
  return x;
}

std::vector<float> random_patch(size_t m, uint64_t seed) {
  SplitMix64 rng{seed};
  std::vector<float> x(m);
  for (auto& v : x) v = static_cast<float>(rng.uniform() * 4 - 2);
  return x;
}

void finish_only(std::vector<float>& x, const std::array<size_t, 3>& n, const augment_hd::PatchFinish& f) {
  const uint64_t pn[3] = {n[0], n[1], n[2]};
  std::vector<float> scratch(x.size());
  augment_hd::finish_patch(x.data(), pn, f, scratch.data());
}

TEST(AugmentBlur, PatchesMatchTheTransformWrittenOut) {
  for (auto [n, sigma] : {std::pair{std::array<size_t, 3>{20, 18, 16}, std::array<double, 3>{0.5, 0.77, 1.0}},
                          {std::array<size_t, 3>{9, 2, 5}, std::array<double, 3>{1.0, 1.0, 0.6}},  // shorter than the kernel on y
                          {std::array<size_t, 3>{12, 12, 12}, std::array<double, 3>{3.0, 0, 0.5}}}) {
    std::vector<float> x = random_patch(n[0] * n[1] * n[2], 5);
    const std::vector<float> want = blur_reference(x, n, {sigma[0] > 0 ? sigma[0] : 1e-9, sigma[1] > 0 ? sigma[1] : 1e-9, sigma[2] > 0 ? sigma[2] : 1e-9});
    augment_hd::PatchFinish f;
    for (size_t a = 0; a < 3; ++a) f.blur_sigma[a] = sigma[a];
    const std::vector<float> before = x;
    finish_only(x, n, f);
    for (size_t i = 0; i < x.size(); ++i) ASSERT_NEAR(x[i], want[i], 2e-6) << i;
    EXPECT_FALSE(x == before);
  }
}

// torch as batchgeneratorsv2 runs it: blur_dimension (reflect padding, a depthwise convolution per
// axis, float32) and SimulateLowResolutionTransform's two interpolations.
class AugmentTorch : public ::testing::Test {
 protected:
  void SetUp() override {
    if (::access("/usr/bin/python3", X_OK) != 0) GTEST_SKIP() << "no /usr/bin/python3 for the torch oracle";
    if (testing::run_command({"/usr/bin/python3", "-c", "import torch"}).exit_code != 0) GTEST_SKIP() << "python3-torch is not installed";
  }
  // Runs `code` with the patch as `x` (a float32 tensor of shape [1, 1, z, y, x]); the code writes
  // float32 arrays to OUT.
  std::vector<float> torch(const std::vector<float>& x, const std::array<size_t, 3>& n, const std::string& code) {
    {
      std::ofstream f(dir_.file("x.raw"), std::ios::binary);
      f.write(reinterpret_cast<const char*>(x.data()), static_cast<std::streamsize>(x.size() * sizeof(float)));
    }
    std::ostringstream prelude;
    prelude << "import numpy as np, torch\nfrom torch.nn.functional import pad, conv3d, interpolate\n"
            << "x = torch.from_numpy(np.fromfile('" << dir_.file("x.raw") << "', dtype=np.float32).reshape((1, 1, " << n[2] << ", " << n[1] << ", "
            << n[0] << ")))\n"
            << "OUT = '" << dir_.file("out.raw") << "'\n";
    auto r = testing::run_command({"/usr/bin/python3", "-c", prelude.str() + code});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    std::ifstream f(dir_.file("out.raw"), std::ios::binary);
    std::vector<char> bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    std::vector<float> out(bytes.size() / sizeof(float));
    std::memcpy(out.data(), bytes.data(), out.size() * sizeof(float));
    return out;
  }
  testing::TempDir dir_;
};

TEST_F(AugmentTorch, TheBlurIsBatchgeneratorsv2s) {
  const std::array<size_t, 3> n{20, 18, 16};
  const std::array<double, 3> sigma{0.5, 0.77, 1.0};
  std::vector<float> x = random_patch(n[0] * n[1] * n[2], 11);
  std::ostringstream code;
  code << "def kernel(s):\n"
          "    n = s * 6 + 0.5\n"
          "    r = round(n)\n"
          "    k = r if r % 2 == 1 else (r + 1 if n - r >= 0 else r - 1)\n"
          "    t = torch.linspace(-(k - 1) * 0.5, (k - 1) * 0.5, steps=k)\n"
          "    p = torch.exp(-0.5 * (t / s).pow(2))\n"
          "    return p / p.sum()\n"
          "y = x\n"
          "for dim, s in reversed(list(enumerate([" << sigma[0] << ", " << sigma[1] << ", " << sigma[2] << "]))):  # z, y, x\n"
          "    k = kernel(s)\n"
          "    h = k.shape[0] // 2\n"
          "    shape = [1, 1, 1, 1, 1]\n"
          "    shape[4 - dim] = k.shape[0]\n"
          "    padding = [0, 0, 0, 0, 0, 0]\n"
          "    padding[2 * dim] = padding[2 * dim + 1] = h\n"
          "    y = conv3d(pad(y, padding, mode='reflect'), k.reshape(shape))\n"
          "y.numpy().astype(np.float32).ravel().tofile(OUT)\n";
  const std::vector<float> want = torch(x, n, code.str());
  ASSERT_EQ(want.size(), x.size());
  augment_hd::PatchFinish f;
  for (size_t a = 0; a < 3; ++a) f.blur_sigma[a] = sigma[a];
  finish_only(x, n, f);
  float worst = 0;
  for (size_t i = 0; i < x.size(); ++i) worst = std::max(worst, std::abs(x[i] - want[i]));
  EXPECT_LT(worst, 2e-6f) << "float32 passes in torch, double sums rounded per pass here";
}

TEST_F(AugmentTorch, TheLowResolutionIsTorchsInterpolation) {
  for (auto [n, scale] : {std::pair{std::array<size_t, 3>{20, 18, 16}, 0.5}, {std::array<size_t, 3>{7, 5, 9}, 0.55}, {std::array<size_t, 3>{33, 3, 17}, 0.77}}) {
    std::vector<float> x = random_patch(n[0] * n[1] * n[2], 13);
    const uint64_t pn[3] = {n[0], n[1], n[2]};
    const uint64_t small[3] = {augment_hd::lowres_size(n[0], scale), augment_hd::lowres_size(n[1], scale), augment_hd::lowres_size(n[2], scale)};
    std::ostringstream code;
    code.precision(17);
    code << "s = " << scale << "\n"
         << "shape = [round(i * s) for i in (" << n[2] << ", " << n[1] << ", " << n[0] << ")]\n"
         << "d = interpolate(x, shape, mode='nearest-exact')\n"
         << "u = interpolate(d, (" << n[2] << ", " << n[1] << ", " << n[0] << "), mode='trilinear')\n"
         << "np.concatenate([np.array(shape[::-1], dtype=np.float32), d.numpy().ravel(), u.numpy().ravel()]).astype(np.float32).tofile(OUT)\n";
    const std::vector<float> got = torch(x, n, code.str());
    const uint64_t ms = small[0] * small[1] * small[2];
    ASSERT_EQ(got.size(), 3 + ms + x.size());
    for (size_t a = 0; a < 3; ++a) ASSERT_EQ(got[a], static_cast<float>(small[a])) << "axis " << a << " at scale " << scale;
    // The nearest-exact step picks exactly torch's voxels; the trilinear step agrees to float rounding.
    for (uint64_t i = 0; i < ms; ++i) ASSERT_EQ(augment_hd::lowres_down_voxel(x.data(), pn, small, 0, i), got[3 + i]) << i << " at scale " << scale;
    augment_hd::PatchFinish f;
    f.lowres_scale = scale;
    finish_only(x, n, f);
    float worst = 0;
    for (size_t i = 0; i < x.size(); ++i) worst = std::max(worst, std::abs(x[i] - got[3 + ms + i]));
    EXPECT_LT(worst, 1e-6f) << "scale " << scale;
  }
}

// The source voxels and weights, one axis at a time, exactly torch's: nearest-exact for every
// size pair up to 64 (26 → 11, 52 → 22 and others are where ⌊(o + ½)·in/out⌋ computed exactly
// picks another voxel than torch's float arithmetic), trilinear from every size up to 24 to every
// larger size up to 48 (torch's weights read off by interpolating the unit vectors).
TEST_F(AugmentTorch, EachAxisTakesTorchsVoxelsAndWeightsExactly) {
  const std::vector<float> none;
  const std::vector<float> got = torch(none, {0, 0, 0},
                                       "out = []\n"
                                       "for n in range(1, 65):\n"
                                       "    a = torch.arange(n, dtype=torch.float32).reshape(1, 1, n, 1, 1)\n"
                                       "    for o in range(1, n + 1):\n"
                                       "        out.append(interpolate(a, (o, 1, 1), mode='nearest-exact').numpy().ravel())\n"
                                       "for n in range(1, 25):\n"
                                       "    e = torch.eye(n, dtype=torch.float32).reshape(n, 1, n, 1, 1)\n"
                                       "    for o in range(n, 49):\n"
                                       "        out.append(interpolate(e, (o, 1, 1), mode='trilinear')[:, 0, :, 0, 0].numpy().T.ravel())\n"
                                       "np.concatenate(out).astype(np.float32).tofile(OUT)\n");
  size_t at = 0, rational_differs = 0;
  for (uint64_t n = 1; n <= 64; ++n) {
    for (uint64_t o = 1; o <= n; ++o) {
      for (uint64_t d = 0; d < o; ++d, ++at) {
        ASSERT_LT(at, got.size());
        ASSERT_EQ(static_cast<float>(augment_hd::nearest_exact_index(d, n, o)), got[at]) << n << " -> " << o << " at " << d;
        rational_differs += std::min((2 * d + 1) * n / (2 * o), n - 1) != augment_hd::nearest_exact_index(d, n, o) ? 1u : 0u;
      }
    }
  }
  EXPECT_GT(rational_differs, 0u) << "the pairs include the ones where exact arithmetic would differ";
  for (uint64_t n = 1; n <= 24; ++n) {
    for (uint64_t o = n; o <= 48; ++o) {
      for (uint64_t d = 0; d < o; ++d) {  // torch's column d: the weight of each of the n source voxels
        const augment_hd::LinearTap t = augment_hd::linear_tap(d, n, o);
        std::vector<float> want(n, 0.0f);
        want[t.i0] += static_cast<float>(t.l0);
        want[t.i1] += static_cast<float>(t.l1);
        for (uint64_t i = 0; i < n; ++i, ++at) {
          ASSERT_LT(at, got.size());
          ASSERT_EQ(want[i], got[at]) << n << " -> " << o << " at " << d << ", source " << i;
        }
      }
    }
  }
  EXPECT_EQ(at, got.size());
}

TEST(AugmentLowRes, SizesRoundHalfToEvenAndAMirroredPatchIsTakenInItsOwnFrame) {
  EXPECT_EQ(augment_hd::lowres_size(5, 0.5), 2u);  // 2.5: Python's round gives 2
  EXPECT_EQ(augment_hd::lowres_size(7, 0.5), 4u);  // 3.5 → 4
  EXPECT_EQ(augment_hd::lowres_size(1, 0.5), 1u);  // 0.5 → 0, kept at one voxel
  EXPECT_EQ(augment_hd::lowres_size(16, 1.0), 16u);
  // nnU-Net mirrors after the low resolution: on a patch mirrored on some axes the transform runs
  // in the unmirrored frame, i.e. it equals mirror ∘ L ∘ mirror, bit for bit, and differs from L
  // (nearest-exact picks voxels asymmetrically: a ramp moves by +½ voxel in its own frame).
  const std::array<size_t, 3> n{12, 9, 10};
  const std::vector<float> x = random_patch(n[0] * n[1] * n[2], 17);
  auto mirror = [&](std::vector<float> v, unsigned bits) {
    std::vector<float> out(v.size());
    for (size_t z = 0; z < n[2]; ++z)
      for (size_t y = 0; y < n[1]; ++y)
        for (size_t xx = 0; xx < n[0]; ++xx) {
          const size_t sx = (bits & 1u) != 0 ? n[0] - 1 - xx : xx, sy = (bits & 2u) != 0 ? n[1] - 1 - y : y, sz = (bits & 4u) != 0 ? n[2] - 1 - z : z;
          out[xx + n[0] * (y + n[1] * z)] = v[sx + n[0] * (sy + n[1] * sz)];
        }
    return out;
  };
  for (unsigned bits : {1u, 2u, 4u, 5u, 7u}) {
    augment_hd::PatchFinish f;
    f.lowres_scale = 0.6;
    f.flipped = bits;
    std::vector<float> got = x;
    finish_only(got, n, f);
    f.flipped = 0;
    std::vector<float> want = mirror(x, bits);
    finish_only(want, n, f);
    want = mirror(want, bits);
    EXPECT_TRUE(got == want) << "flips " << bits;
    std::vector<float> plain_l = x;
    finish_only(plain_l, n, f);
    EXPECT_FALSE(got == plain_l) << "flips " << bits;
  }
}

// All five at once, against the steps written out here (blur and gammas in long double, contrast
// by its formula, the low resolution by the functions compared with torch above): catches steps
// taken in another order than nnU-Net's.
TEST(AugmentBlurLowRes, TheStepsRunInNnUNetsOrder) {
  const std::array<size_t, 3> n{14, 12, 10};
  const uint64_t pn[3] = {n[0], n[1], n[2]};
  const uint64_t m = n[0] * n[1] * n[2];
  const std::vector<float> x = random_patch(m, 19);
  augment_hd::PatchFinish f;
  f.blur_sigma[0] = 0.9;
  f.blur_sigma[1] = 0.6;
  f.blur_sigma[2] = 0.75;
  f.contrast = 1.2;
  f.lowres_scale = 0.55f;
  f.flipped = 2;
  f.gamma_inverted = 0.8;
  f.gamma = 1.3;
  std::vector<float> got = x;
  finish_only(got, n, f);

  std::vector<float> want = blur_reference(x, n, {f.blur_sigma[0], f.blur_sigma[1], f.blur_sigma[2]});
  long double sum = 0;
  for (float v : want) sum += v;
  const long double mean = sum / static_cast<long double>(m);
  const float lo = *std::min_element(want.begin(), want.end()), hi = *std::max_element(want.begin(), want.end());
  for (auto& v : want) v = static_cast<float>(std::clamp((v - mean) * 1.2L + mean, static_cast<long double>(lo), static_cast<long double>(hi)));
  const uint64_t small[3] = {augment_hd::lowres_size(n[0], f.lowres_scale), augment_hd::lowres_size(n[1], f.lowres_scale), augment_hd::lowres_size(n[2], f.lowres_scale)};
  std::vector<float> down(small[0] * small[1] * small[2]);
  for (uint64_t i = 0; i < down.size(); ++i) down[i] = augment_hd::lowres_down_voxel(want.data(), pn, small, f.flipped, i);
  for (uint64_t i = 0; i < m; ++i) want[i] = augment_hd::lowres_up_voxel(down.data(), small, pn, f.flipped, i);
  want = gamma_reference(want, 0.8, true);
  want = gamma_reference(want, 1.3, false);
  float worst = 0;
  for (uint64_t i = 0; i < m; ++i) worst = std::max(worst, std::abs(got[i] - want[i]));
  EXPECT_LT(worst, 1e-4f);
}

TEST(AugmentLowRes, ALinearRampSurvivesAndDetailIsLost) {
  // Trilinear interpolation reproduces a ramp away from the edges (align_corners false clamps
  // there); a checkerboard loses its contrast.
  const std::array<size_t, 3> n{16, 16, 16};
  std::vector<float> ramp(16 * 16 * 16), board(ramp.size());
  for (size_t z = 0; z < 16; ++z)
    for (size_t y = 0; y < 16; ++y)
      for (size_t x = 0; x < 16; ++x) {
        ramp[x + 16 * (y + 16 * z)] = static_cast<float>(x) + 2.0f * static_cast<float>(y) - static_cast<float>(z);
        board[x + 16 * (y + 16 * z)] = (x + y + z) % 2 == 0 ? 1.0f : -1.0f;
      }
  augment_hd::PatchFinish f;
  f.lowres_scale = 0.5;
  std::vector<float> r = ramp, b = board;
  finish_only(r, n, f);
  finish_only(b, n, f);
  for (size_t z = 2; z < 14; ++z)
    for (size_t y = 2; y < 14; ++y)
      for (size_t x = 2; x < 14; ++x) {
        // Nearest-exact at 1/2 keeps the odd voxels: the ramp comes back shifted by half a voxel.
        const size_t i = x + 16 * (y + 16 * z);
        ASSERT_NEAR(r[i], ramp[i] + 0.5f * (1 + 2 - 1), 1e-5) << x << "," << y << "," << z;
      }
  // Every kept voxel (odd coordinates) of the board is −1: the result is constant.
  for (float v : b) ASSERT_NEAR(v, -1.0f, 1e-6f);
}

TEST(AugmentBlurLowRes, DrawsFollowNnUNetAndLeaveTheOthersAlone) {
  const AugmentOptions d;
  AugmentOptions off = d;
  off.blur_probability = off.lowres_probability = 0;
  size_t blurred = 0, lowres = 0;
  std::array<double, 3> sigma_sum{};
  for (uint64_t i = 0; i < 4000; ++i) {
    const PatchDraw a = PatchSampler::draw(d, {96, 96, 64}, true, 31, i), b = PatchSampler::draw(off, {96, 96, 64}, true, 31, i);
    if (a.blur_sigma[0] > 0) {
      ++blurred;
      for (double s : a.blur_sigma) {
        EXPECT_GE(s, 0.5);
        EXPECT_LT(s, 1.0);
      }
      for (size_t k = 0; k < 3; ++k) sigma_sum[k] += a.blur_sigma[k];
    } else {
      EXPECT_EQ(a.blur_sigma, (std::array<double, 3>{}));
    }
    if (a.lowres_scale != 1) {
      ++lowres;
      EXPECT_GE(a.lowres_scale, 0.5);
      EXPECT_LE(a.lowres_scale, 1.0);
      EXPECT_EQ(a.lowres_scale, static_cast<double>(static_cast<float>(a.lowres_scale))) << "a float32 factor, as batchgeneratorsv2 keeps it";
    }
    // Drawn last: every other draw is the one made without them.
    ASSERT_EQ(a.corner, b.corner);
    ASSERT_EQ(a.noise_state, b.noise_state);
    ASSERT_EQ(a.turns, b.turns);
    ASSERT_EQ(a.contrast, b.contrast);
    ASSERT_EQ(a.gamma, b.gamma);
    ASSERT_EQ(a.gamma_inverted, b.gamma_inverted);
  }
  EXPECT_NEAR(static_cast<double>(blurred), 400, 95);  // Binomial(4000, 0.2 × 0.5): sd ≈ 19
  EXPECT_NEAR(static_cast<double>(lowres), 500, 105);  // Binomial(4000, 0.25 × 0.5): sd ≈ 21
  // Each axis draws its own σ, uniform in [0.5, 1): mean 0.75, sd 0.144 / √400 ≈ 0.007 each.
  for (double sum : sigma_sum) EXPECT_NEAR(sum / static_cast<double>(blurred), 0.75, 0.035);

  // In whole patches: the labels stay, the image changes, and the recorded draw explains it.
  const Source s = source();
  AugmentOptions o = plain({24, 20, 16});
  AugmentOptions on = o;
  on.blur_probability = on.lowres_probability = 1;
  auto a = PatchSampler::create(s.image, s.labels, o);
  auto b = PatchSampler::create(s.image, s.labels, on);
  ASSERT_TRUE(a && b);
  for (uint64_t i = 0; i < 4; ++i) {
    const Patch pa = a->sample(3, i), pb = b->sample(3, i);
    ASSERT_GT(pb.blur_sigma[0], 0);
    ASSERT_NE(pb.lowres_scale, 1);
    EXPECT_TRUE(pa.labels.data == pb.labels.data);
    std::vector<float> want = pa.image.data;
    augment_hd::PatchFinish f;
    for (size_t k = 0; k < 3; ++k) f.blur_sigma[k] = pb.blur_sigma[k];
    f.lowres_scale = pb.lowres_scale;
    finish_only(want, pa.image.dims, f);
    EXPECT_TRUE(want == pb.image.data) << "patch " << i;
    EXPECT_FALSE(pa.image.data == pb.image.data);
  }
}

}  // namespace
}  // namespace tresor::ct
