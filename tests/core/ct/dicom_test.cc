// DICOM CT series (include/tresor/ct/volume.h) on real files — pydicom's CT_small.dcm and its
// 16×16×5 CT5N series (Debian's python3-pydicom), with pydicom itself as the oracle for HU and
// geometry — the uneven-gap series CT2 refused, mixed series refused, and the phantom written as a
// series and read back exactly.
#include <gtest/gtest.h>

#include <unistd.h>

#include <filesystem>

#include "support/phantom.h"
#include "support/test_support.h"
#include "tresor/ct/volume.h"
#include "tresor/identity.h"
#include "tresor/sealed.h"

namespace tresor::ct {
namespace {

namespace fs = std::filesystem;
using testing::TempDir;

const std::string kPydicom = "/usr/lib/python3/dist-packages/pydicom/data/test_files";

// HU statistics and geometry of a series as pydicom computes them (sorted by position).
std::string pydicom_summary(const std::string& dir) {
  auto r = testing::run_command(
      {"/usr/bin/python3", "-c",
       "import sys, os, pydicom, numpy as np\n"
       "ds = [pydicom.dcmread(os.path.join(sys.argv[1], f)) for f in sorted(os.listdir(sys.argv[1]))]\n"
       "ds.sort(key=lambda d: float(d.ImagePositionPatient[2]))\n"
       "v = np.stack([d.pixel_array.astype(np.float64) * float(getattr(d, 'RescaleSlope', 1)) + float(getattr(d, 'RescaleIntercept', 0)) for d in ds])\n"
       "print(v.shape[2], v.shape[1], v.shape[0], int(v.min()), int(v.max()), int(round(v.sum())), '%.4f' % float(ds[0].PixelSpacing[1]),\n"
       "      '%.4f' % float(ds[0].ImagePositionPatient[2]))\n",
       dir});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  return r.out;
}

std::string summary(const HuVolume& v) {
  long long sum = 0;
  for (int16_t h : v.data) sum += h;
  const auto [mn, mx] = std::minmax_element(v.data.begin(), v.data.end());
  char b[200];
  std::snprintf(b, sizeof b, "%zu %zu %zu %d %d %lld %.4f %.4f\n", v.dims[0], v.dims[1], v.dims[2], *mn, *mx, sum, v.spacing[0], v.origin[2]);
  return b;
}

class Dicom : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!fs::exists(kPydicom + "/CT_small.dcm")) GTEST_SKIP() << "python3-pydicom's test files are not installed (scripts/bootstrap installs them)";
  }
};

TEST_F(Dicom, ReadsRealSeriesAsPydicomDoes) {
  TempDir dir;
  fs::create_directories(dir.file("one"));
  fs::copy_file(kPydicom + "/CT_small.dcm", dir.file("one/CT_small.dcm"));
  auto small = read_dicom_series(dir.file("one"));
  ASSERT_TRUE(small) << small.error().message;
  EXPECT_EQ(small->dims, (std::array<size_t, 3>{128, 128, 1}));
  EXPECT_NEAR(small->spacing[0], 0.661468, 1e-5);
  EXPECT_EQ(summary(*small), pydicom_summary(dir.file("one")));

  const std::string ct5n = kPydicom + "/dicomdirtests/98892001/CT5N";
  auto five = read_dicom_series(ct5n);
  ASSERT_TRUE(five) << five.error().message;
  EXPECT_EQ(five->dims, (std::array<size_t, 3>{16, 16, 5}));
  EXPECT_EQ(summary(*five), pydicom_summary(ct5n));
  EXPECT_GT(five->spacing[2], 0);
}

TEST_F(Dicom, RefusesUnevenGapsMixedSeriesAndNonImages) {
  auto uneven = read_dicom_series(kPydicom + "/dicomdirtests/77654033/CT2");
  ASSERT_FALSE(uneven);
  EXPECT_NE(uneven.error().message.find("uneven slice gaps"), std::string::npos) << uneven.error().message;

  TempDir dir;
  fs::create_directories(dir.file("mixed"));
  for (const auto& e : fs::directory_iterator(kPydicom + "/dicomdirtests/98892001/CT5N")) fs::copy_file(e.path(), dir.file("mixed/") + e.path().filename().string());
  fs::copy_file(kPydicom + "/CT_small.dcm", dir.file("mixed/CT_small.dcm"));
  auto mixed = read_dicom_series(dir.file("mixed"));
  ASSERT_FALSE(mixed);
  EXPECT_NE(mixed.error().message.find("more than one series"), std::string::npos) << mixed.error().message;

  fs::create_directories(dir.file("junk"));
  testing::write_file(dir.file("junk/notes.txt"), as_bytes(std::string("not an image")));
  auto junk = read_dicom_series(dir.file("junk"));
  ASSERT_FALSE(junk);
  EXPECT_NE(junk.error().message.find("notes.txt: not a DICOM image"), std::string::npos) << junk.error().message;
  fs::create_directories(dir.file("empty"));
  EXPECT_NE(read_dicom_series(dir.file("empty")).error().message.find("no files"), std::string::npos);
}

TEST_F(Dicom, ThePhantomAsASeriesReadsBackExactlyAndPydicomAgrees) {
  auto p = testing::phantom(4, {128, 128, 64}, {1.5, 1.5, 2.0});
  ASSERT_FALSE(p.hu.data.empty());
  p.hu.origin = {-96, -96, -40};
  TempDir dir;
  ASSERT_TRUE(write_dicom_series(dir.file("series"), p.hu, "Tresor CCTA phantom seed 4"));
  size_t files = 0;
  for (const auto& e : fs::directory_iterator(dir.file("series"))) files += e.path().extension() == ".dcm" ? 1u : 0u;
  EXPECT_EQ(files, 64u);
  auto back = read_dicom_series(dir.file("series"));
  ASSERT_TRUE(back) << back.error().message;
  EXPECT_EQ(back->dims, p.hu.dims);
  EXPECT_NEAR(back->spacing[2], 2.0, 1e-6);
  EXPECT_NEAR(back->origin[2], -40, 1e-6);
  EXPECT_TRUE(back->data == p.hu.data);
  EXPECT_EQ(summary(*back), pydicom_summary(dir.file("series")));
  // Same volume, same description: the same files (deterministic UIDs).
  ASSERT_TRUE(write_dicom_series(dir.file("again"), p.hu, "Tresor CCTA phantom seed 4"));
  EXPECT_TRUE(testing::read_file(dir.file("series/slice-0007.dcm")) == testing::read_file(dir.file("again/slice-0007.dcm")));
  // A missing slice is found.
  fs::remove(dir.file("series/slice-0030.dcm"));
  auto gap = read_dicom_series(dir.file("series"));
  ASSERT_FALSE(gap);
  EXPECT_NE(gap.error().message.find("uneven slice gaps: 4 mm between slice-0029.dcm and slice-0031.dcm"), std::string::npos)
      << gap.error().message;
}

// A series whose slices are sealed one by one (slice-NNNN.dcm.sealed, as a data owner seals a
// directory): opened in memory with the keys, every chunk verified first, the same volume as the
// plain files; without keys, with someone else's, or with a tampered slice: refused naming it.
TEST_F(Dicom, SealedSlicesAreOpenedInMemory) {
  auto p = testing::phantom(6, {96, 96, 48}, {1.5, 1.5, 2.5});
  ASSERT_FALSE(p.hu.data.empty());
  TempDir dir;
  ASSERT_TRUE(write_dicom_series(dir.file("plain"), p.hu, "Tresor CCTA phantom seed 6"));
  const Identity owner = *Identity::generate(), other = *Identity::generate();
  fs::create_directories(dir.file("sealed"));
  for (const auto& e : fs::directory_iterator(dir.file("plain"))) {
    sealed::SealOptions so;
    so.recipients = {owner.recipient()};
    so.chunk_size = 4096;
    auto s = sealed::seal_buffer(testing::read_file(e.path().string()), so);
    ASSERT_TRUE(s);
    testing::write_file(dir.file("sealed/" + e.path().filename().string() + ".sealed"), *s);
  }
  sealed::KeyRing ring;
  ring.identities = {&owner};
  auto back = read_dicom_series(dir.file("sealed"), &ring);
  ASSERT_TRUE(back) << back.error().message;
  auto plain = read_dicom_series(dir.file("plain"));
  ASSERT_TRUE(plain);
  EXPECT_EQ(back->dims, plain->dims);
  EXPECT_EQ(back->spacing, plain->spacing);
  EXPECT_EQ(back->origin, plain->origin);
  EXPECT_TRUE(back->data == plain->data);
  EXPECT_TRUE(back->data == p.hu.data);

  auto no_keys = read_dicom_series(dir.file("sealed"));
  ASSERT_TRUE(testing::FailsWith(no_keys, ErrorCode::kNoMatchingKey));
  EXPECT_NE(no_keys.error().message.find("slice-0000.dcm.sealed: sealed, and no identity or key was given"), std::string::npos) << no_keys.error().message;
  sealed::KeyRing wrong;
  wrong.identities = {&other};
  auto foreign = read_dicom_series(dir.file("sealed"), &wrong);
  ASSERT_TRUE(testing::FailsWith(foreign, ErrorCode::kNoMatchingKey));
  EXPECT_NE(foreign.error().message.find("slice-0000.dcm.sealed"), std::string::npos) << foreign.error().message;
  Bytes t = testing::read_file(dir.file("sealed/slice-0011.dcm.sealed"));
  t[t.size() - 100] ^= std::byte{4};
  testing::write_file(dir.file("sealed/slice-0011.dcm.sealed"), t);
  auto tampered = read_dicom_series(dir.file("sealed"), &ring);
  ASSERT_FALSE(tampered);
  EXPECT_NE(tampered.error().message.find("slice-0011.dcm.sealed"), std::string::npos) << tampered.error().message;
  EXPECT_EQ(tampered.error().code, ErrorCode::kChunkAuth) << tampered.error().message;
}

// Encapsulated (compressed) pixel data, read through GDCM's codecs and, sealed, from memory: the
// RLE, JPEG-LS and JPEG 2000 lossless copies of pydicom's MR_small give the uncompressed file's
// voxels (read_slice wipes GDCM's fragments and decoded buffer on the way out; under ASan this
// also checks that wipe stays inside them).
TEST_F(Dicom, CompressedTransferSyntaxesGiveTheUncompressedVoxels) {
  TempDir dir;
  auto one = [&](const std::string& name) {
    fs::create_directories(dir.file(name));
    fs::copy_file(kPydicom + "/" + name + ".dcm", dir.file(name + "/" + name + ".dcm"));
    return read_dicom_series(dir.file(name));
  };
  auto plain = one("MR_small");
  ASSERT_TRUE(plain) << plain.error().message;
  EXPECT_EQ(plain->dims, (std::array<size_t, 3>{64, 64, 1}));
  EXPECT_GT(*std::max_element(plain->data.begin(), plain->data.end()), 0);
  for (const char* name : {"MR_small_RLE", "MR_small_jpeg_ls_lossless", "MR_small_jp2klossless"}) {
    auto c = one(name);
    ASSERT_TRUE(c) << name << ": " << c.error().message;
    EXPECT_EQ(c->dims, plain->dims) << name;
    EXPECT_TRUE(c->data == plain->data) << name;
  }
  const Identity owner = *Identity::generate();
  sealed::SealOptions so;
  so.recipients = {owner.recipient()};
  so.chunk_size = 4096;
  auto s = sealed::seal_buffer(testing::read_file(kPydicom + "/MR_small_RLE.dcm"), so);
  ASSERT_TRUE(s);
  fs::create_directories(dir.file("sealed"));
  testing::write_file(dir.file("sealed/MR_small_RLE.dcm.sealed"), *s);
  sealed::KeyRing ring;
  ring.identities = {&owner};
  auto back = read_dicom_series(dir.file("sealed"), &ring);
  ASSERT_TRUE(back) << back.error().message;
  EXPECT_TRUE(back->data == plain->data);
}

}  // namespace
}  // namespace tresor::ct
