// The CCTA phantom (include/tresor/ct/volume.h): deterministic in its seed; every tissue in its HU
// range; the coronary tree where its centerlines say, tapering, with its stenoses; NIfTI written
// and read back by Tresor and by nibabel (Debian's python3-nibabel, run with /usr/bin/python3, as
// an independent reader).
#include <gtest/gtest.h>

#include <cstring>
#include <sstream>

#include <algorithm>
#include <cmath>
#include <map>

#include <unistd.h>

#include "support/test_support.h"
#include "tresor/crypto.h"
#include "tresor/ct/nifti_hd.h"
#include "tresor/ct/volume.h"

namespace tresor::ct {
namespace {

using testing::TempDir;

// A small phantom (fast): 160×160×96 voxels of 1.2×1.2×1.5 mm.
PhantomOptions small(uint64_t seed) {
  PhantomOptions o;
  o.seed = seed;
  o.dims = {160, 160, 96};
  o.spacing = {1.2, 1.2, 1.5};
  return o;
}

double median_hu(const Phantom& p, Label l) {
  std::vector<int16_t> v;
  for (size_t i = 0; i < p.labels.data.size(); ++i) {
    if (p.labels.data[i] == l) v.push_back(p.hu.data[i]);
  }
  if (v.empty()) return NAN;
  std::nth_element(v.begin(), v.begin() + static_cast<ptrdiff_t>(v.size() / 2), v.end());
  return v[v.size() / 2];
}

TEST(Phantom, IsDeterministicInItsSeed) {
  auto a = make_phantom(small(7)), b = make_phantom(small(7)), c = make_phantom(small(8));
  ASSERT_TRUE(a && b && c) << (a ? "" : a.error().message);
  EXPECT_TRUE(a->hu.data == b->hu.data);
  EXPECT_TRUE(a->labels.data == b->labels.data);
  EXPECT_FALSE(a->hu.data == c->hu.data) << "another seed, another phantom";
  ASSERT_EQ(a->stenoses.size(), 3u);
  EXPECT_EQ(a->stenoses[0].at, b->stenoses[0].at);
}

TEST(Phantom, TissuesHaveTheirHuRangesAndTheCoronaryTreeIsWhereItsCenterlinesSay) {
  auto p = make_phantom(small(3));
  ASSERT_TRUE(p) << p.error().message;
  EXPECT_EQ(p->hu.dims, (std::array<size_t, 3>{160, 160, 96}));
  const std::map<Label, std::pair<double, double>> ranges = {{kBloodPool, {330, 470}}, {kMyocardium, {60, 160}}, {kAorta, {330, 470}},
                                                             {kLung, {-950, -750}},    {kBone, {350, 800}},      {kFat, {-160, -30}},
                                                             {kCoronary, {150, 470}}};
  for (const auto& [label, range] : ranges) {
    const double m = median_hu(*p, label);
    EXPECT_GE(m, range.first) << "label " << int(label);
    EXPECT_LE(m, range.second) << "label " << int(label);
  }
  // Six vessels, the three main ones from about 2.2–2.5 mm down to about 1 mm, branches to 0.7.
  ASSERT_EQ(p->centerlines.size(), 6u);
  std::map<std::string, const Centerline*> by;
  for (const auto& c : p->centerlines) by[c.name] = &c;
  for (const char* n : {"LAD", "LCx", "RCA", "D1", "OM1", "PDA"}) ASSERT_TRUE(by.contains(n)) << n;
  EXPECT_NEAR(by["LAD"]->healthy_radius.front(), 2.5, 1e-9);
  EXPECT_NEAR(by["D1"]->healthy_radius.back(), 0.7, 1e-9);
  for (const auto& c : p->centerlines) {
    EXPECT_GT(c.points.size(), 100u) << c.name;
    for (size_t i = 1; i < c.healthy_radius.size(); ++i) ASSERT_LE(c.healthy_radius[i], c.healthy_radius[i - 1] + 1e-12) << c.name;
  }
  // Every stenosis narrows its vessel to the radius it says.
  for (const auto& s : p->stenoses) {
    const Centerline& c = *by[s.vessel];
    double min_ratio = 1;
    for (size_t i = 0; i < c.radius.size(); ++i) min_ratio = std::min(min_ratio, c.radius[i] / c.healthy_radius[i]);
    EXPECT_LE(min_ratio, s.remaining + 0.02) << s.vessel;
    EXPECT_GE(s.remaining, 0.3);
  }
  // Where a vessel is wider than a voxel, its centerline runs through coronary-labelled voxels.
  size_t inside = 0, counted = 0;
  for (const auto& c : p->centerlines) {
    for (size_t i = 0; i < c.points.size(); i += 5) {
      if (c.radius[i] < 1.0) continue;
      const auto& q = c.points[i];
      const size_t x = static_cast<size_t>(q[0] / 1.2), y = static_cast<size_t>(q[1] / 1.2), z = static_cast<size_t>(q[2] / 1.5);
      ++counted;
      inside += p->labels.at(x, y, z) == kCoronary ? 1u : 0u;
    }
  }
  ASSERT_GT(counted, 50u);
  EXPECT_GE(static_cast<double>(inside) / static_cast<double>(counted), 0.95) << inside << " of " << counted;
  // The lumen is bright against its surroundings: contrast over the epicardial fat.
  EXPECT_GT(median_hu(*p, kCoronary) - median_hu(*p, kFat), 250);
}

TEST(Phantom, BadOptionsAreRefusedNamingTheField) {
  auto o = small(1);
  o.dims[1] = 8;
  auto r = make_phantom(o);
  ASSERT_FALSE(r);
  EXPECT_NE(r.error().message.find("dimension 1 is 8 voxels, not 16..1024"), std::string::npos) << r.error().message;
  o = small(1);
  o.spacing[2] = 0;
  EXPECT_NE(make_phantom(o).error().message.find("spacing 2"), std::string::npos);
  o = small(1);
  o.dims = {64, 64, 64};
  o.spacing = {1, 1, 1};
  EXPECT_NE(make_phantom(o).error().message.find("cannot hold the heart"), std::string::npos);
}

TEST(Phantom, NiftiRoundTripsThroughTresorAndNibabel) {
  auto p = make_phantom(small(11));
  ASSERT_TRUE(p);
  TempDir dir;
  const std::string hu = dir.file("ccta.nii"), labels = dir.file("labels.nii");
  p->hu.origin = {-96.0, -80.5, 12.25};
  ASSERT_TRUE(write_nifti(hu, p->hu));
  ASSERT_TRUE(write_nifti(labels, p->labels));
  auto back = read_nifti_hu(hu);
  ASSERT_TRUE(back) << back.error().message;
  EXPECT_EQ(back->dims, p->hu.dims);
  for (int i = 0; i < 3; ++i) EXPECT_NEAR(back->spacing[static_cast<size_t>(i)], p->hu.spacing[static_cast<size_t>(i)], 1e-6);
  for (int i = 0; i < 3; ++i) EXPECT_NEAR(back->origin[static_cast<size_t>(i)], p->hu.origin[static_cast<size_t>(i)], 1e-4);
  EXPECT_TRUE(back->data == p->hu.data);
  auto lab = read_nifti_hu(labels);
  ASSERT_TRUE(lab);
  EXPECT_EQ(lab->data[p->labels.index(80, 80, 48)], p->labels.at(80, 80, 48));

  // nibabel, independently: shape, zooms, the affine's translation (RAS), and voxel values.
  if (::access("/usr/bin/python3", X_OK) != 0) GTEST_SKIP() << "no /usr/bin/python3 for the nibabel oracle";
  const size_t x = 81, y = 77, z = 40;
  auto r = testing::run_command({"/usr/bin/python3", "-c",
                                 "import sys, nibabel as nb\n"
                                 "i = nb.load(sys.argv[1]); d = i.get_fdata()\n"
                                 "print(i.shape, [round(float(v), 4) for v in i.header.get_zooms()], [round(float(v), 3) for v in i.affine[:3, 3]])\n"
                                 "print(int(d[int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])]), int(d.min()), int(d.max()))\n",
                                 hu, std::to_string(x), std::to_string(y), std::to_string(z)});
  if (r.exit_code != 0 && r.err.find("No module named 'nibabel'") != std::string::npos) {
    GTEST_SKIP() << "python3-nibabel is not installed (scripts/bootstrap installs it)";
  }
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const auto [mn, mx] = std::minmax_element(p->hu.data.begin(), p->hu.data.end());
  EXPECT_NE(r.out.find("(160, 160, 96) [1.2, 1.2, 1.5] [96.0, 80.5, 12.25]"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find(std::to_string(p->hu.at(x, y, z)) + " " + std::to_string(*mn) + " " + std::to_string(*mx)), std::string::npos) << r.out;
}

// Files nibabel writes in every form the reader claims: NIfTI-2, gzip, big-endian, float with a
// slope; labels as uint8 and as float; and float volumes Tresor writes, read by nibabel.
TEST(Phantom, ReadsWhatNibabelWritesAndTheOtherWayRound) {
  if (testing::run_command({"/usr/bin/python3", "-c", "import nibabel"}).exit_code != 0) GTEST_SKIP() << "python3-nibabel is not installed";
  auto p = make_phantom(small(12));
  ASSERT_TRUE(p);
  TempDir dir;
  ASSERT_TRUE(write_nifti(dir.file("src.nii"), p->hu));
  ASSERT_TRUE(write_nifti(dir.file("lab.nii"), p->labels));
  auto r = testing::run_command({"/usr/bin/python3", "-c",
                                 "import sys, numpy as np, nibabel as nb\n"
                                 "d = sys.argv[1]; i = nb.load(d + '/src.nii'); a = np.asanyarray(i.dataobj)\n"
                                 "nb.save(nb.Nifti2Image(a, i.affine), d + '/two.nii')\n"
                                 "nb.save(nb.Nifti1Image(a, i.affine), d + '/gz.nii.gz')\n"
                                 "h = nb.Nifti1Header(endianness='>'); h.set_data_dtype('>i2')\n"
                                 "nb.save(nb.Nifti1Image(a.astype('>i2'), i.affine, h), d + '/big.nii')\n"
                                 "f = nb.Nifti1Image(((a + 1024) / 2.0).astype(np.float32), i.affine); f.header.set_slope_inter(2.0, -1024)\n"
                                 "nb.save(f, d + '/float.nii')\n"
                                 "l = np.asanyarray(nb.load(d + '/lab.nii').dataobj)\n"
                                 "nb.save(nb.Nifti1Image(l.astype(np.float32), i.affine), d + '/labf.nii')\n"
                                 "nb.save(nb.Nifti1Image((l.astype(np.float32) + 0.5), i.affine), d + '/labhalf.nii')\n",
                                 dir.path().string()});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  for (const char* f : {"two.nii", "gz.nii.gz", "big.nii", "float.nii"}) {
    auto v = read_nifti_hu(dir.file(f));
    ASSERT_TRUE(v) << f << ": " << v.error().message;
    EXPECT_EQ(v->dims, p->hu.dims) << f;
    EXPECT_NEAR(v->spacing[2], p->hu.spacing[2], 1e-6) << f;
    EXPECT_TRUE(v->data == p->hu.data) << f;
    // The header alone gives the same geometry, and its voxels decoded where they lie (what the
    // GPU path does in device memory) the same HU; a compressed file is refused by name.
    auto all = testing::read_file(dir.file(f));
    const ByteSpan head(all.data(), std::min(all.size(), kNiftiHeaderMax));
    auto l = read_nifti_layout(head, all.size(), f, false);
    if (std::string(f) == "gz.nii.gz") {
      ASSERT_FALSE(l);
      EXPECT_NE(l.error().message.find("gz.nii.gz: gzip-compressed"), std::string::npos) << l.error().message;
      continue;
    }
    ASSERT_TRUE(l) << f << ": " << l.error().message;
    EXPECT_EQ(l->dims, v->dims) << f;
    EXPECT_EQ(l->spacing, v->spacing) << f;
    EXPECT_EQ(l->origin, v->origin) << f;
    EXPECT_EQ(l->swap, std::string(f) == "big.nii") << f;
    const nifti_hd::Decode d{l->datatype, l->bytes_per_voxel, l->swap, l->slope, l->inter};
    size_t differ = 0;
    for (size_t i = 0; i < v->data.size(); ++i) {
      differ += nifti_hd::hu_value(nifti_hd::stored_value(reinterpret_cast<const unsigned char*>(all.data() + l->vox_offset), i, d), d) != v->data[i];
    }
    EXPECT_EQ(differ, 0u) << f;
    auto cut = read_nifti_layout(head, all.size() - 1, f, false);
    ASSERT_FALSE(cut) << f;
    EXPECT_NE(cut.error().message.find(std::string(f) + ": the header promises"), std::string::npos) << cut.error().message;
  }
  auto lf = read_nifti_labels(dir.file("labf.nii"));
  ASSERT_TRUE(lf) << lf.error().message;
  EXPECT_TRUE(lf->data == p->labels.data);
  auto half = read_nifti_labels(dir.file("labhalf.nii"));
  ASSERT_FALSE(half);
  EXPECT_NE(half.error().message.find("labhalf.nii: a label volume with values that are not whole numbers"), std::string::npos) << half.error().message;

  Volume<float> f;
  f.dims = p->hu.dims;
  f.spacing = p->hu.spacing;
  f.data.resize(f.size());
  for (size_t i = 0; i < f.data.size(); ++i) f.data[i] = static_cast<float>(p->hu.data[i]) / 7.0f;
  ASSERT_TRUE(write_nifti(dir.file("out.nii"), f));
  auto back = testing::run_command({"/usr/bin/python3", "-c",
                                    "import sys, numpy as np, nibabel as nb\n"
                                    "a = np.asanyarray(nb.load(sys.argv[1]).dataobj)\n"
                                    "print(a.dtype, a.shape, repr(float(a[5, 7, 9])))\n",
                                    dir.file("out.nii")});
  ASSERT_EQ(back.exit_code, 0) << back.err;
  std::ostringstream want;
  want << "float32 (" << f.dims[0] << ", " << f.dims[1] << ", " << f.dims[2] << ") ";
  EXPECT_EQ(back.out.find(want.str()), 0u) << back.out;
  EXPECT_NEAR(std::stod(back.out.substr(want.str().size())), f.at(5, 7, 9), 1e-6);
}

TEST(Phantom, VoxelsBecomeHuAndLabelsByTheDocumentedRules) {
  const nifti_hd::Decode plain{nifti_hd::kFloat64, 8, false, 1, 0};
  // Rounded half away from zero, clamped to int16, not-finite values 0 (1e300 once became
  // −32768 through lround's undefined overflow).
  const std::pair<double, int> hu[] = {{2.5, 3},         {-2.5, -3},       {2.4999999999, 2},  {-0.5, -1},     {0.4999999999999999, 0},
                                       {32767.4, 32767}, {32767.5, 32767}, {40000.7, 32767},   {1e300, 32767}, {-32768.5, -32768},
                                       {-1e300, -32768}, {NAN, 0},         {INFINITY, 0},      {-INFINITY, 0}, {-1024, -1024}};
  for (auto [x, want] : hu) EXPECT_EQ(nifti_hd::hu_value(x, plain), want) << x;
  const nifti_hd::Decode scaled{nifti_hd::kInt16, 2, false, 0.5, -1000.25};
  EXPECT_EQ(nifti_hd::hu_value(3, scaled), -999);  // 1.5 − 1000.25 = −998.75
  uint8_t out = 9;
  EXPECT_TRUE(nifti_hd::label_value(7, &out));
  EXPECT_EQ(out, 7);
  for (double bad : {-1.0, 255.5, 256.0, 0.5, static_cast<double>(NAN)}) EXPECT_FALSE(nifti_hd::label_value(bad, &out)) << bad;
  // Stored values in either byte order, every type.
  const unsigned char be[] = {0xFF, 0xFE}, le[] = {0xFE, 0xFF};
  const nifti_hd::Decode i16{nifti_hd::kInt16, 2, false, 1, 0}, i16s{nifti_hd::kInt16, 2, true, 1, 0}, u16{nifti_hd::kUint16, 2, false, 1, 0};
  EXPECT_EQ(nifti_hd::stored_value(le, 0, i16), -2);
  EXPECT_EQ(nifti_hd::stored_value(be, 0, i16s), -2);
  EXPECT_EQ(nifti_hd::stored_value(le, 0, u16), 65534);
  // Through a file: a float volume holding 1e30 and NaN.
  Volume<float> f;
  f.dims = {2, 2, 1};
  f.data = {1e30f, -1e30f, NAN, 12.5f};
  auto bytes = nifti_bytes(f);
  ASSERT_TRUE(bytes);
  auto v = read_nifti_hu(*bytes, "f.nii");
  ASSERT_TRUE(v) << v.error().message;
  EXPECT_EQ(v->data, (std::vector<int16_t>{32767, -32768, 0, 13}));
}

TEST(Phantom, ReadingRefusesWhatIsNotAVolume) {
  TempDir dir;
  const std::string junk = dir.file("junk.nii");
  testing::write_file(junk, as_bytes(std::string(400, 'x')));
  auto r = read_nifti_hu(junk);
  ASSERT_FALSE(r);
  EXPECT_NE(r.error().message.find("junk.nii: not a readable NIfTI"), std::string::npos) << r.error().message;
  EXPECT_FALSE(read_nifti_hu(dir.file("missing.nii")));
  // A header promising more voxels than the file holds; a corrupt gzip stream.
  auto p = make_phantom(small(13));
  const Bytes good = *nifti_bytes(p->hu);
  const Bytes cut(good.begin(), good.end() - 100);
  auto t = read_nifti_hu(cut, "cut.nii");
  ASSERT_FALSE(t);
  EXPECT_NE(t.error().message.find("cut.nii: the header promises"), std::string::npos) << t.error().message;
  Bytes gz = {std::byte{0x1F}, std::byte{0x8B}, std::byte{8}, std::byte{0}, std::byte{1}, std::byte{2}};
  EXPECT_NE(read_nifti_hu(gz, "bad.nii.gz").error().message.find("bad.nii.gz: the gzip stream is corrupt"), std::string::npos);
  EXPECT_TRUE(read_nifti_hu(good, "good.nii"));
  // dim[0] beyond 7 (libnifti would write past its dim array) and dimensions whose product
  // overflows: refused before the voxels are touched (both found by nifti_fuzz).
  Bytes bad_dim0 = good;
  const int16_t hundred = 100;
  std::memcpy(bad_dim0.data() + 40, &hundred, 2);
  EXPECT_NE(read_nifti_hu(bad_dim0, "d.nii").error().message.find("d.nii: dim[0] is 100, not 1..7"), std::string::npos);
  Bytes huge = good;
  const int16_t big = 30000;
  for (size_t axis = 1; axis <= 3; ++axis) std::memcpy(huge.data() + 40 + 2 * axis, &big, 2);
  EXPECT_NE(read_nifti_hu(huge, "h.nii").error().message.find("h.nii: the header promises 27000000000000 voxels"), std::string::npos)
      << read_nifti_hu(huge, "h.nii").error().message;
}

}  // namespace
}  // namespace tresor::ct
