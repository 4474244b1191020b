// Training patches (include/tresor/ct/augment.h): reproducible from (seed, index), biased to the
// foreground as asked, flips and intensity changes exactly as recorded, noise of the drawn size,
// the spatial transform (rotation, scaling) against exact rotations and a textbook trilinear
// interpolation, and every bad option named.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numbers>
#include <utility>
#include <vector>

#include "tresor/ct/augment.h"
#include "tresor/ct/augment_hd.h"
#include "tresor/ct/ops.h"
#include "tresor/splitmix.h"

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

// batchgeneratorsv2's GammaTransform with retain_stats, computed here in long double with libm.
std::vector<float> gamma_reference(const std::vector<float>& x, double gamma, bool invert) {
  const size_t n = x.size();
  std::vector<long double> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = invert ? -x[i] : x[i];
  auto mean_sd = [&](const std::vector<long double>& a) {
    long double m = 0, q = 0;
    for (long double e : a) m += e;
    m /= static_cast<long double>(a.size());
    for (long double e : a) q += (e - m) * (e - m);
    return std::pair{m, std::sqrt(q / static_cast<long double>(a.size() - 1))};
  };
  const auto [mean, sd] = mean_sd(v);
  const long double lo = *std::min_element(v.begin(), v.end()), range = *std::max_element(v.begin(), v.end()) - lo;
  for (auto& e : v) e = std::pow((e - lo) / std::max(range, 1e-7L), static_cast<long double>(gamma)) * range + lo;
  const auto [mean_y, sd_y] = mean_sd(v);
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
      auto stats = [](const std::vector<float>& x) {
        double m = 0, q = 0;
        for (float e : x) m += e;
        m /= static_cast<double>(x.size());
        for (float e : x) q += (e - m) * (e - m);
        return std::pair{m, std::sqrt(q / static_cast<double>(x.size() - 1))};
      };
      const auto [ma, sa] = stats(pa.image.data);
      const auto [mb, sb] = stats(pb.image.data);
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

}  // namespace
}  // namespace tresor::ct
