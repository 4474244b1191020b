// CT preprocessing references (include/tresor/ct/ops.h) against NumPy and SciPy (Debian's
// python3-numpy and python3-scipy, run with /usr/bin/python3) on a phantom: the fixed window,
// nnU-Net's CT normalisation statistics and result, and resampling on the physical grid
// (scipy.ndimage.map_coordinates, order 1 with edges clamped, and order 0 for labels).
#include <gtest/gtest.h>

#include <unistd.h>

#include <cmath>
#include <cstring>
#include <sstream>

#include "support/test_support.h"
#include "tresor/ct/hessian.h"
#include "tresor/ct/ops.h"
#include "tresor/ct/prep.h"

namespace tresor::ct {
namespace {

using testing::TempDir;

Phantom small_phantom() {
  PhantomOptions o;
  o.seed = 21;
  o.dims = {100, 96, 56};
  o.spacing = {1.3, 1.35, 1.6};
  return *make_phantom(o);
}

template <typename T>
void dump(const std::string& path, const std::vector<T>& v) {
  testing::write_file(path, ByteSpan(reinterpret_cast<const std::byte*>(v.data()), v.size() * sizeof(T)));
}
std::vector<double> load_f64(const std::string& path) {
  const Bytes b = testing::read_file(path);
  std::vector<double> v(b.size() / sizeof(double));
  std::memcpy(v.data(), b.data(), v.size() * sizeof(double));
  return v;
}

class CtOps : public ::testing::Test {
 protected:
  void SetUp() override {
    if (::access("/usr/bin/python3", X_OK) != 0) GTEST_SKIP() << "no /usr/bin/python3 for the NumPy/SciPy oracle";
  }
  // Runs `code` with the volume as `hu` (int16, shape z,y,x) and the labels as `lab`; returns
  // stdout. The code may write float64 arrays to OUT.
  testing::CommandResult python(const Phantom& p, const std::string& code) {
    dump(dir_.file("hu.raw"), p.hu.data);
    dump(dir_.file("lab.raw"), p.labels.data);
    std::ostringstream prelude;
    prelude << "import numpy as np, scipy.ndimage as nd\n"
            << "shape = (" << p.hu.dims[2] << ", " << p.hu.dims[1] << ", " << p.hu.dims[0] << ")\n"
            << "sp = (" << p.hu.spacing[2] << ", " << p.hu.spacing[1] << ", " << p.hu.spacing[0] << ")\n"
            << "hu = np.fromfile('" << dir_.file("hu.raw") << "', dtype=np.int16).reshape(shape).astype(np.float64)\n"
            << "lab = np.fromfile('" << dir_.file("lab.raw") << "', dtype=np.uint8).reshape(shape)\n"
            << "OUT = '" << dir_.file("out.raw") << "'\n";
    auto r = testing::run_command({"/usr/bin/python3", "-c", prelude.str() + code});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    return r;
  }
  std::string out_file() { return dir_.file("out.raw"); }
  TempDir dir_;
};

TEST_F(CtOps, WindowAndNnunetNormalisationMatchNumpy) {
  const Phantom p = small_phantom();
  auto w = window(p.hu, -200, 600);
  ASSERT_TRUE(w);
  auto r = python(p, "np.clip((np.clip(hu, -200, 600) + 200) / 800, 0, 1).ravel().tofile(OUT)\n");
  const auto want = load_f64(out_file());
  ASSERT_EQ(want.size(), w->data.size());
  for (size_t i = 0; i < want.size(); ++i) ASSERT_NEAR(w->data[i], want[i], 1e-6) << i;
  EXPECT_FALSE(window(p.hu, 100, 100));

  // Foreground: the body (every label but air, here HU > −900).
  LabelVolume fg = p.labels;
  for (size_t i = 0; i < fg.data.size(); ++i) fg.data[i] = p.hu.data[i] > -900 ? 1 : 0;
  auto n = ct_normalisation(p.hu, fg);
  ASSERT_TRUE(n) << n.error().message;
  auto s = python(p,
                  "f = hu[hu > -900]\n"
                  "lo, up = np.percentile(f, 0.5), np.percentile(f, 99.5)\n"
                  "m, sd = f.mean(), f.std()\n"
                  "print('%.6f %.6f %.6f %.6f' % (lo, up, m, sd))\n"
                  "((np.clip(hu, lo, up) - m) / max(sd, 1e-8)).ravel().tofile(OUT)\n");
  double lo = 0, up = 0, m = 0, sd = 0;
  ASSERT_EQ(std::sscanf(s.out.c_str(), "%lf %lf %lf %lf", &lo, &up, &m, &sd), 4) << s.out;
  EXPECT_NEAR(n->lower, lo, 1e-6);
  EXPECT_NEAR(n->upper, up, 1e-6);
  EXPECT_NEAR(n->mean, m, 1e-6);
  EXPECT_NEAR(n->sd, sd, 1e-6);
  const FloatVolume z = normalise(p.hu, *n);
  const auto zwant = load_f64(out_file());
  for (size_t i = 0; i < zwant.size(); ++i) ASSERT_NEAR(z.data[i], zwant[i], 1e-5) << i;
  LabelVolume none = fg;
  std::fill(none.data.begin(), none.data.end(), 0);
  EXPECT_NE(ct_normalisation(p.hu, none).error().message.find("foreground is empty"), std::string::npos);
}

TEST_F(CtOps, ResamplingOnThePhysicalGridMatchesScipy) {
  const Phantom p = small_phantom();
  const std::array<double, 3> iso{0.7, 0.7, 0.7};
  auto lin = resample_linear(p.hu, iso);
  ASSERT_TRUE(lin) << lin.error().message;
  // The exact spacing: the last centre is within one new voxel of the old last centre.
  for (size_t a = 0; a < 3; ++a) {
    const double old_extent = static_cast<double>(p.hu.dims[a] - 1) * p.hu.spacing[a];
    const double new_extent = static_cast<double>(lin->dims[a] - 1) * iso[a];
    EXPECT_LE(new_extent, old_extent + 1e-9);
    EXPECT_GT(new_extent, old_extent - iso[a]);
  }
  std::ostringstream grid;
  grid << "new = (" << lin->dims[2] << ", " << lin->dims[1] << ", " << lin->dims[0] << ")\n"
       << "c = np.meshgrid(*[np.arange(n) * 0.7 / s for n, s in zip(new, sp)], indexing='ij')\n";
  python(p, grid.str() + "nd.map_coordinates(hu, c, order=1, mode='nearest').ravel().tofile(OUT)\n");
  const auto want = load_f64(out_file());
  ASSERT_EQ(want.size(), lin->data.size());
  double worst = 0;
  for (size_t i = 0; i < want.size(); ++i) worst = std::max(worst, std::abs(lin->data[i] - want[i]));
  EXPECT_LT(worst, 1e-3) << "float32 output against SciPy's float64";

  auto near = resample_nearest(p.labels, iso);
  ASSERT_TRUE(near);
  ASSERT_EQ(near->dims, lin->dims);
  python(p, grid.str() + "nd.map_coordinates(lab, c, order=0, mode='nearest').astype(np.float64).ravel().tofile(OUT)\n");
  const auto lwant = load_f64(out_file());
  size_t diff = 0;
  for (size_t i = 0; i < lwant.size(); ++i) diff += static_cast<double>(near->data[i]) != lwant[i] ? 1u : 0u;
  EXPECT_EQ(diff, 0u) << "labels differing from SciPy's nearest neighbour";
  EXPECT_FALSE(resample_linear(p.hu, {0.7, 0.01, 0.7}));
  // An input spacing that is not positive, an empty volume: named, nothing computed.
  HuVolume odd = p.hu;
  odd.spacing[1] = 0;
  EXPECT_NE(resample_linear(odd, iso).error().message.find("the volume's spacing 0.000000 mm on axis 1 is not positive"), std::string::npos);
  odd.spacing[1] = std::nan("");
  EXPECT_FALSE(resample_linear(odd, iso));
  HuVolume empty;
  EXPECT_NE(resample_linear(empty, iso).error().message.find("an empty volume"), std::string::npos);
  EXPECT_NE(resample_linear(p.hu, {0.05, 0.05, 0.05}).error().message.find("more than 2^31"), std::string::npos);
  // One thread gives the same bytes as all.
  EXPECT_TRUE(resample_linear(p.hu, iso, 1)->data == lin->data);
}

TEST_F(CtOps, GaussianMatchesScipyGaussianFilter) {
  const Phantom p = small_phantom();
  FloatVolume f;
  f.dims = p.hu.dims;
  f.spacing = p.hu.spacing;
  f.data.assign(p.hu.data.begin(), p.hu.data.end());
  // Anisotropic voxels: sigma in mm becomes a different sigma in voxels per axis; one axis left.
  auto g = gaussian(f, {1.0, 2.0, 0.0});
  ASSERT_TRUE(g);
  std::ostringstream code;
  code << "s = (0.0, 2.0 / sp[1], 1.0 / sp[2])\n"
       << "nd.gaussian_filter(hu, sigma=s, mode='reflect', truncate=4.0).ravel().tofile(OUT)\n";
  python(p, code.str());
  const auto want = load_f64(out_file());
  ASSERT_EQ(want.size(), g->data.size());
  double worst = 0;
  for (size_t i = 0; i < want.size(); ++i) worst = std::max(worst, std::abs(g->data[i] - want[i]));
  EXPECT_LT(worst, 1e-3) << "HU, float32 output against SciPy's float64";
  // The edges mirror: a constant volume stays constant; sigma 0 changes nothing.
  FloatVolume flat = f;
  std::fill(flat.data.begin(), flat.data.end(), 7.0f);
  auto gf = gaussian(flat, {3, 3, 3});
  ASSERT_TRUE(gf);
  for (float x : gf->data) ASSERT_NEAR(x, 7.0f, 1e-4);
  EXPECT_TRUE(gaussian(f, {0, 0, 0})->data == f.data);
  EXPECT_FALSE(gaussian(f, {-1, 0, 0}));
}

// Frangi against scikit-image 0.19 (Debian's python3-skimage) in float64: the same algorithm in
// double, so the only differences are rounding and the closed-form eigenvalues against LAPACK's
// eigvalsh; responses are in [0, 1) and stored as float32, so 1e-5 absolute bounds both.
TEST_F(CtOps, FrangiMatchesScikitImage) {
  if (testing::run_command({"/usr/bin/python3", "-c", "import skimage"}).exit_code != 0) GTEST_SKIP() << "python3-skimage is not installed";
  Phantom p = small_phantom();
  // A region around the heart, odd sizes, so that every edge rule of np.gradient is used.
  HuVolume crop;
  crop.dims = {61, 57, 33};
  crop.spacing = p.hu.spacing;
  crop.data.resize(crop.size());
  for (size_t z = 0; z < crop.dims[2]; ++z)
    for (size_t y = 0; y < crop.dims[1]; ++y)
      for (size_t x = 0; x < crop.dims[0]; ++x) crop.at(x, y, z) = p.hu.at(x + 20, y + 18, z + 12);
  Phantom c;
  c.hu = crop;
  c.labels.dims = crop.dims;
  c.labels.data.assign(crop.size(), 0);
  FloatVolume f;
  f.dims = crop.dims;
  f.spacing = crop.spacing;
  f.data.assign(crop.data.begin(), crop.data.end());

  struct Case {
    FrangiOptions o;
    std::string call;
  };
  FrangiOptions hu_default;  // σ 1, 2, 3; α β 0.5; γ 15; bright
  FrangiOptions dark;
  dark.sigmas = {0.8, 1.7};
  dark.gamma = 40;
  dark.alpha = 0.3;
  dark.beta = 0.9;
  dark.bright = false;
  const Case cases[] = {
      {hu_default, "frangi(hu, sigmas=[1, 2, 3], alpha=0.5, beta=0.5, gamma=15, black_ridges=False, mode='reflect')"},
      {dark, "frangi(hu, sigmas=[0.8, 1.7], alpha=0.3, beta=0.9, gamma=40, black_ridges=True, mode='reflect')"},
  };
  for (const Case& k : cases) {
    auto v = frangi(f, k.o);
    ASSERT_TRUE(v) << v.error().message;
    python(c, "from skimage.filters import frangi\n" + k.call + ".ravel().tofile(OUT)\n");
    const auto want = load_f64(out_file());
    ASSERT_EQ(want.size(), v->data.size());
    double worst = 0, peak = 0;
    size_t nonzero = 0;
    for (size_t i = 0; i < want.size(); ++i) {
      worst = std::max(worst, std::abs(v->data[i] - want[i]));
      peak = std::max(peak, want[i]);
      nonzero += want[i] > 1e-3 ? 1u : 0u;
    }
    EXPECT_LT(worst, 1e-5) << k.call;
    std::printf("%s: largest difference %.3g, peak %.3f, %zu voxels above 1e-3\n", k.call.c_str(), worst, peak, nonzero);
    EXPECT_GT(peak, 0.1) << "the case must respond somewhere: " << k.call;
    EXPECT_GT(nonzero, 100u) << k.call;
  }
  // One thread gives the same bytes as all of them.
  FrangiOptions one;
  EXPECT_TRUE(frangi(f, one, 1)->data == frangi(f, one, 0)->data);
}

TEST(CtFrangi, RefusesWhatItCannotCompute) {
  FloatVolume f;
  f.dims = {8, 1, 8};
  f.data.assign(f.size(), 0);
  EXPECT_NE(frangi(f, {}).error().message.find("axis 1 has 1 voxels"), std::string::npos);
  f.dims = {8, 8, 8};
  f.data.assign(f.size(), 0);
  FrangiOptions o;
  o.sigmas = {1, 0};
  EXPECT_NE(frangi(f, o).error().message.find("scale 0.0"), std::string::npos);
  o.sigmas = {};
  EXPECT_NE(frangi(f, o).error().message.find("no scales"), std::string::npos);
  o = {};
  o.gamma = -1;
  EXPECT_NE(frangi(f, o).error().message.find("gamma"), std::string::npos);
  f.data.pop_back();
  EXPECT_FALSE(frangi(f, {}));
  // A flat volume has no ridges anywhere.
  f.data.assign(f.size(), 5.0f);
  auto flat = frangi(f, {});
  ASSERT_TRUE(flat);
  for (float x : flat->data) ASSERT_EQ(x, 0.0f);
}

TEST(CtFrangi, EigenvaluesOfKnownMatrices) {
  double l[3];
  // diag(−3, 1, 2) rotated about z by 30°: the same eigenvalues, sorted by |λ|.
  const double c = std::cos(0.5235987755982988), s = std::sin(0.5235987755982988);
  const double xx = c * c * -3 + s * s * 1, yy = s * s * -3 + c * c * 1, xy = c * s * (-3 - 1);
  hessian::sym3_eigenvalues_abs_sorted(xx, xy, 0.0, yy, 0.0, 2.0, l);
  EXPECT_NEAR(l[0], 1, 1e-12);
  EXPECT_NEAR(l[1], 2, 1e-12);
  EXPECT_NEAR(l[2], -3, 1e-12);
  // A repeated eigenvalue (the acos argument at its limit) and a diagonal matrix.
  hessian::sym3_eigenvalues_abs_sorted(2.0, 1.0, 1.0, 2.0, 1.0, 2.0, l);  // eigenvalues 1, 1, 4
  EXPECT_NEAR(l[0], 1, 1e-9);
  EXPECT_NEAR(l[1], 1, 1e-9);
  EXPECT_NEAR(l[2], 4, 1e-9);
  hessian::sym3_eigenvalues_abs_sorted(-5.0, 0.0, 0.0, 0.5, 0.0, -1.0, l);
  EXPECT_EQ(l[0], 0.5);
  EXPECT_EQ(l[1], -1);
  EXPECT_EQ(l[2], -5);
  // A bright tube along z: λ1 ≈ 0, λ2 = λ3 < 0 gives a strong response; a plate (one large
  // negative eigenvalue) and a blob (three equal) give little; a dark tube (positive) gives 0.
  const double tube[3] = {-0.01, -10, -10}, plate[3] = {-0.01, -0.02, -10}, blob[3] = {-10, -10, -10}, dark[3] = {0.01, 10, 10};
  EXPECT_GT(hessian::frangi_response(tube, 0.5, 0.5, 50.0), 0.8);
  EXPECT_LT(hessian::frangi_response(plate, 0.5, 0.5, 50.0), 0.01);
  EXPECT_LT(hessian::frangi_response(blob, 0.5, 0.5, 50.0), 0.2);
  EXPECT_EQ(hessian::frangi_response(dark, 0.5, 0.5, 50.0), 0.0);
  // γ: a faint tube (small S) is suppressed, the same shape at full contrast is not.
  const double faint[3] = {-0.001, -1, -1};
  EXPECT_LT(hessian::frangi_response(faint, 0.5, 0.5, 50.0), 0.05);
}

TEST(CtMetrics, RocAucCountsTiesAsHalf) {
  LabelVolume lab;
  lab.dims = {6, 1, 1};
  lab.data = {0, 0, 7, 7, 0, 7};
  EXPECT_DOUBLE_EQ(*roc_auc({0.1f, 0.2f, 0.9f, 0.8f, 0.3f, 0.7f}, lab, 7), 1.0);
  EXPECT_DOUBLE_EQ(*roc_auc({0.9f, 0.8f, 0.1f, 0.2f, 0.7f, 0.3f}, lab, 7), 0.0);
  // Every score equal: every pair a tie, 0.5.
  EXPECT_DOUBLE_EQ(*roc_auc({1, 1, 1, 1, 1, 1}, lab, 7), 0.5);
  // Positives 0.5, 0.5, 0.9 against negatives 0.1, 0.5, 0.6: 1.5 + 1.5 + 3 wins over 9 pairs.
  EXPECT_DOUBLE_EQ(*roc_auc({0.1f, 0.5f, 0.5f, 0.5f, 0.6f, 0.9f}, lab, 7), 6.0 / 9);
  EXPECT_NE(roc_auc({1, 2}, lab, 7).error().message.find("2 scores for 6 voxels"), std::string::npos);
  EXPECT_NE(roc_auc({1, 2, 3, 4, 5, 6}, lab, 3).error().message.find("no voxel has label 3"), std::string::npos);
}

// On the phantom at CCTA resolution, vesselness separates the coronary lumen from every other
// voxel: ROC AUC ≥ 0.95 against the label volume (issue 8's criterion). The window keeps the
// lumen (about 400 HU) bright and the blood pool's edges from dominating: [−100, 600] HU.
TEST(CtFrangi, SeparatesTheCoronariesOnThePhantom) {
  PhantomOptions po;
  po.seed = 5;
  po.dims = {256, 256, 160};
  po.spacing = {0.5, 0.5, 0.5};
  auto p = make_phantom(po);
  ASSERT_TRUE(p) << p.error().message;
  auto w = window(p->hu, -100, 600);
  ASSERT_TRUE(w);
  FrangiOptions o;
  o.sigmas = {1, 2, 3};  // 0.5, 1 and 1.5 mm: radii 0.7 to 2.5 mm
  o.gamma = 0.5;  // the window maps contrast to about 0.7: S is of order 1, not of order 100 HU
  auto v = frangi(*w, o);
  ASSERT_TRUE(v) << v.error().message;
  auto auc = roc_auc(v->data, p->labels, kCoronary);
  ASSERT_TRUE(auc) << auc.error().message;
  RecordProperty("roc_auc", std::to_string(*auc));
  EXPECT_GE(*auc, 0.95);
  // Among the contrast-filled voxels alone (coronaries against heart chambers and aorta, all
  // about 400 HU) intensity cannot tell them apart, vesselness must: the shape, not a threshold.
  std::vector<float> bright_v, bright_i;
  LabelVolume bright_l;
  for (size_t i = 0; i < v->data.size(); ++i) {
    const uint8_t l = p->labels.data[i];
    if (l == kCoronary || l == kBloodPool || l == kAorta) {
      bright_v.push_back(v->data[i]);
      bright_i.push_back(w->data[i]);
      bright_l.data.push_back(l);
    }
  }
  auto hard = roc_auc(bright_v, bright_l, kCoronary);
  auto hard_raw = roc_auc(bright_i, bright_l, kCoronary);
  ASSERT_TRUE(hard && hard_raw);
  std::printf("ROC AUC: vesselness %.4f overall; among contrast-filled voxels vesselness %.4f, windowed intensity %.4f\n", *auc, *hard, *hard_raw);
  EXPECT_GE(*hard, 0.85);
  EXPECT_LT(*hard_raw, 0.5);  // partial volume makes the thin lumen darker than the chambers
}

// The pipeline is the composition of the tested operations, with the statistics from the
// original voxels; bad options and mismatched labels are named.
TEST(CtPrep, ComposesTheOperations) {
  const Phantom p = small_phantom();
  PrepOptions o;
  o.spacing = 0.9;
  o.frangi_sigmas_mm = {0.9, 1.8};
  auto r = prepare(p.hu, &p.labels, o);
  ASSERT_TRUE(r) << r.error().message;
  LabelVolume fg = p.labels;
  for (size_t i = 0; i < fg.data.size(); ++i) fg.data[i] = p.hu.data[i] > -500 ? 1 : 0;
  const auto stats = *ct_normalisation(p.hu, fg);
  EXPECT_EQ(r->stats.mean, stats.mean);
  EXPECT_EQ(r->stats.upper, stats.upper);
  const auto iso = *resample_linear(p.hu, {0.9, 0.9, 0.9});
  EXPECT_TRUE(r->image.data == normalise(iso, stats).data);
  FrangiOptions f;
  f.sigmas = {1, 2};
  f.gamma = 0.5;
  EXPECT_TRUE(r->vesselness.data == frangi(*window(iso, -100, 600), f)->data);
  ASSERT_TRUE(r->labels);
  EXPECT_TRUE(r->labels->data == resample_nearest(p.labels, {0.9, 0.9, 0.9})->data);
  EXPECT_EQ(r->image.dims, r->vesselness.dims);
  EXPECT_FALSE(prepare(p.hu, nullptr, o)->labels);

  LabelVolume other = p.labels;
  other.dims[2] -= 1;
  other.data.resize(other.size());
  EXPECT_NE(prepare(p.hu, &other, o).error().message.find("the labels are 100×96×55, the volume 100×96×56"), std::string::npos);
  PrepOptions bad = o;
  bad.window_lower = 700;
  EXPECT_NE(prepare(p.hu, nullptr, bad).error().message.find("window"), std::string::npos);
  bad = o;
  bad.foreground_hu = 5000;
  EXPECT_NE(prepare(p.hu, nullptr, bad).error().message.find("foreground threshold"), std::string::npos);
  bad = o;
  bad.spacing = 50;
  EXPECT_NE(prepare(p.hu, nullptr, bad).error().message.find("spacing"), std::string::npos);
  bad = o;
  bad.frangi_sigmas_mm = {};
  EXPECT_NE(prepare(p.hu, nullptr, bad).error().message.find("no Frangi scale"), std::string::npos);
}

}  // namespace
}  // namespace tresor::ct
