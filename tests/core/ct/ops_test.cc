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
#include "tresor/ct/ops.h"

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

}  // namespace
}  // namespace tresor::ct
