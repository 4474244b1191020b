// The training data loader on the GPU (include/tresor/gpu/loader.h) on every device this machine
// has: a prepared phantom written as sealed (and plain) NIfTI cases goes in through the secure
// channel; what crosses the staging buffers is ciphertext only; the batches equal the CPU
// trainer's PatchSource::fill_step to the bit; tampered files, bad headers and mismatched
// volumes give nothing and are named. The CUDA cases skip without a GPU (and fail under
// TRESOR_REQUIRE_GPU=1).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "support/test_support.h"
#include "tresor/ct/augment.h"
#include "tresor/ct/prep.h"
#include "tresor/ct/volume.h"
#include "tresor/gpu/channel.h"
#include "tresor/gpu/loader.h"
#include "tresor/identity.h"
#include "tresor/sealed.h"
#include "tresor/train/trainer.h"

namespace tresor {
namespace {

namespace fs = std::filesystem;
using gpu::DeviceDataset;
using testing::TempDir;

template <typename T>
ct::Volume<T> crop(const ct::Volume<T>& v, std::array<size_t, 3> lo, std::array<size_t, 3> dims) {
  ct::Volume<T> out;
  out.dims = dims;
  out.spacing = v.spacing;
  out.data.resize(out.size());
  for (size_t z = 0; z < dims[2]; ++z)
    for (size_t y = 0; y < dims[1]; ++y)
      for (size_t x = 0; x < dims[0]; ++x) out.at(x, y, z) = v.at(x + lo[0], y + lo[1], z + lo[2]);
  return out;
}

// A case's three files as NIfTI bytes.
struct CaseBytes {
  Bytes image, vesselness, labels;
};
CaseBytes bytes_of(const ct::Volume<float>& image, const ct::Volume<float>& vesselness, const ct::LabelVolume& labels) {
  return {*ct::nifti_bytes(image), *ct::nifti_bytes(vesselness), *ct::nifti_bytes(labels)};
}

// The phantom prepared once (ct::prepare at 1.4 mm, one Frangi scale) and three cases from it:
// the whole volume, a crop (other dimensions and content), and the whole volume without
// foreground (the sampler's "no foreground" branch).
struct Data {
  CaseBytes a, b, c;
};
const Data& data() {
  static const Data d = [] {
    ct::PhantomOptions po;
    po.seed = 5;
    po.dims = {128, 128, 80};
    po.spacing = {1, 1, 1};
    auto ph = ct::make_phantom(po);
    EXPECT_TRUE(ph) << ph.error().message;
    ct::PrepOptions pr;
    pr.spacing = 1.4;
    pr.frangi_sigmas_mm = {1.4};
    pr.threads = 2;
    auto p = ct::prepare(ph->hu, &ph->labels, pr);
    EXPECT_TRUE(p) << p.error().message;
    Data out;
    out.a = bytes_of(p->image, p->vesselness, *p->labels);
    const std::array<size_t, 3> lo{5, 3, 2}, dims{p->image.dims[0] - 9, p->image.dims[1] - 4, p->image.dims[2] - 6};
    out.b = bytes_of(crop(p->image, lo, dims), crop(p->vesselness, lo, dims), crop(*p->labels, lo, dims));
    ct::LabelVolume none = *p->labels;
    for (auto& l : none.data) {
      if (l == ct::kCoronary) l = ct::kBloodPool;
    }
    out.c = bytes_of(p->image, p->vesselness, none);
    return out;
  }();
  return d;
}

// What tresor train's CPU path reads from the same bytes (the reader's rules applied).
ct::Prepared read_back(const CaseBytes& b) {
  ct::Prepared p;
  p.image = *ct::read_nifti_float(b.image, "image");
  p.vesselness = *ct::read_nifti_float(b.vesselness, "vesselness");
  p.labels = *ct::read_nifti_labels(b.labels, "labels");
  return p;
}

train::TrainerOptions options() {
  train::TrainerOptions o;
  o.patch = 24;
  o.batch = 3;
  o.seed = 11;
  return o;
}

bool contains(ByteSpan hay, ByteSpan needle) {
  const std::string_view h(reinterpret_cast<const char*>(hay.data()), hay.size());
  return h.find(std::string_view(reinterpret_cast<const char*>(needle.data()), needle.size())) != std::string_view::npos;
}

class Loader : public ::testing::Test {
 protected:
  Identity alice = *Identity::generate();
  TempDir dir;
  sealed::KeyRing ring() const {
    sealed::KeyRing r;
    r.identities = {&alice};
    return r;
  }
  Bytes seal(ByteSpan plain) const {
    sealed::SealOptions o;
    o.chunk_size = 64 << 10;
    o.recipients = {alice.recipient()};
    auto s = sealed::seal_buffer(plain, o);
    EXPECT_TRUE(s);
    return *s;
  }
  // A case directory: each file sealed (name.nii.sealed) or plain (name.nii).
  std::string write_case(const std::string& name, const CaseBytes& b, bool sealed) {
    const std::string d = dir.file(name);
    fs::create_directories(d);
    for (auto [base, bytes] : {std::pair{"image", &b.image}, {"vesselness", &b.vesselness}, {"labels", &b.labels}}) {
      if (sealed) {
        testing::write_file(d + "/" + base + ".nii.sealed", seal(*bytes));
      } else {
        testing::write_file(d + "/" + base + ".nii", *bytes);
      }
    }
    return d;
  }

  // dataset's batches for `steps` steps (in pieces: [0, 1) and [1, batch)) equal PatchSource's.
  void expect_batches_equal(const DeviceDataset& ds, const std::vector<const CaseBytes*>& cases, size_t steps, bool device_memory) {
    const auto o = options();
    std::vector<ct::Prepared> prepared;
    for (const auto* c : cases) prepared.push_back(read_back(*c));
    std::vector<const ct::Prepared*> ptrs;
    for (const auto& p : prepared) ptrs.push_back(&p);
    auto source = train::PatchSource::create(ptrs, o);
    ASSERT_TRUE(source) << source.error().message;
    const size_t P = o.patch, m = P * P * P;
    gpu::ChannelDevice& dev = ds.device();
    auto xmem = dev.device_alloc(o.batch * 2 * m * sizeof(float));
    auto ymem = dev.device_alloc(o.batch * m);
    ASSERT_TRUE(xmem && ymem);
    gpu::DeviceBuffer xbuf(&dev, *xmem, 0, xmem->n), ybuf(&dev, *ymem, 0, ymem->n);
    for (size_t step = 0; step < steps; ++step) {
      for (auto [lo, hi] : {std::pair<size_t, size_t>{0, 1}, {1, o.batch}}) {
        train::Tensor want_x({hi - lo, 2, P, P, P});
        std::vector<uint8_t> want_y((hi - lo) * m);
        source->fill_step(step, lo, hi, want_x, want_y);
        auto* d_x = reinterpret_cast<float*>(xbuf.data());
        auto* d_y = reinterpret_cast<uint8_t*>(ybuf.data());
        auto r = ds.fill_step(step, lo, hi, d_x, d_y);
        ASSERT_TRUE(r) << r.error().message;
        std::vector<float> got_x(want_x.data.size());
        std::vector<uint8_t> got_y(want_y.size());
        if (device_memory) {
          ASSERT_TRUE(dev.synchronize_all());
          ASSERT_TRUE(dev.read_device(MutableByteSpan(reinterpret_cast<std::byte*>(got_x.data()), got_x.size() * sizeof(float)), xbuf.data()));
          ASSERT_TRUE(dev.read_device(MutableByteSpan(reinterpret_cast<std::byte*>(got_y.data()), got_y.size()), ybuf.data()));
        } else {
          std::memcpy(got_x.data(), d_x, got_x.size() * sizeof(float));
          std::memcpy(got_y.data(), d_y, got_y.size());
        }
        size_t first_bad = got_x.size();
        for (size_t i = 0; i < got_x.size() && first_bad == got_x.size(); ++i) {
          if (std::memcmp(&got_x[i], &want_x.data[i], sizeof(float)) != 0) first_bad = i;
        }
        ASSERT_EQ(first_bad, got_x.size()) << "step " << step << " slots " << lo << ".." << hi << ": x[" << first_bad << "] is "
                                           << got_x[first_bad] << ", want " << want_x.data[first_bad];
        ASSERT_EQ(got_y, want_y) << "step " << step << " slots " << lo << ".." << hi;
      }
    }
  }
};

// The patches the comparison covers (12 steps of 3 over the cases a, b, c) exercise every branch:
// foreground-centred, the no-foreground fallback (case c), random corners, flips, intensity,
// noise, rotation, scaling, blur, contrast, low resolution and both gammas (the draws are the CPU
// sampler's).
TEST_F(Loader, TheComparedStepsCoverEveryAugmentation) {
  const auto o = options();
  const ct::AugmentOptions a = train::sampler_options(o, true);
  const std::array<std::array<size_t, 3>, 3> dims{read_back(data().a).image.dims, read_back(data().b).image.dims, read_back(data().c).image.dims};
  size_t fg = 0, fallback = 0, random = 0, flips = 0, intensity = 0, noise = 0, rotated = 0, scaled = 0, contrasted = 0, gamma = 0, gamma_inverted = 0;
  size_t blurred = 0, lowres = 0;
  for (uint64_t g = 0; g < 12 * o.batch; ++g) {
    const auto d = ct::PatchSampler::draw(a, dims[g % 3], g % 3 != 2, o.seed, g);
    fg += d.from_foreground ? 1u : 0u;
    fallback += d.want_foreground && g % 3 == 2 ? 1u : 0u;
    random += d.want_foreground ? 0u : 1u;
    flips += d.flipped[0] || d.flipped[1] || d.flipped[2] ? 1u : 0u;
    intensity += d.scale != 1 ? 1u : 0u;
    noise += d.noise_sd > 0 ? 1u : 0u;
    rotated += d.turns != std::array<int64_t, 3>{} ? 1u : 0u;
    scaled += d.scaling != 1 ? 1u : 0u;
    contrasted += d.contrast != 1 ? 1u : 0u;
    gamma += d.gamma != 1 ? 1u : 0u;
    gamma_inverted += d.gamma_inverted != 1 ? 1u : 0u;
    blurred += d.blur_sigma[0] > 0 ? 1u : 0u;
    lowres += d.lowres_scale != 1 ? 1u : 0u;
  }
  EXPECT_GT(blurred, 0u);
  EXPECT_GT(lowres, 0u);
  EXPECT_GT(gamma, 0u);
  EXPECT_GT(gamma_inverted, 0u);
  EXPECT_GT(contrasted, 0u);
  EXPECT_GT(rotated, 0u);
  EXPECT_GT(scaled, 0u);
  EXPECT_GT(fg, 0u);
  EXPECT_GT(fallback, 0u);
  EXPECT_GT(random, 0u);
  EXPECT_GT(flips, 0u);
  EXPECT_GT(intensity, 0u);
  EXPECT_GT(noise, 0u) << "no patch with noise among the compared ones: choose another seed";
}

// (a) Everything that crossed the staging buffers is ciphertext: every staged buffer is a run of a
// sealed file's bytes, and neither the NIfTI header's magic nor voxel bytes appear there.
TEST_F(Loader, TheStagingBuffersHoldCiphertextOnly) {
  std::vector<Bytes> staged;
  auto dev = gpu::emulated_device([&](ByteSpan b) { staged.emplace_back(b.begin(), b.end()); });
  const std::string a = write_case("sealed-a", data().a, true), c = write_case("sealed-c", data().c, true);
  auto ds = DeviceDataset::load(*dev, {a, c}, ring(), options(), {.batch_chunks = 4, .depth = 3});
  ASSERT_TRUE(ds) << ds.error().message;
  ASSERT_FALSE(staged.empty());
  std::vector<Bytes> files;
  for (const auto& d : {a, c})
    for (const char* f : {"/image.nii.sealed", "/vesselness.nii.sealed", "/labels.nii.sealed"}) files.push_back(testing::read_file(d + f));
  // The header's last bytes: the magic "n+1\0" and the zero extension flag.
  const Bytes magic = [] {
    Bytes m(8, std::byte{0});
    std::memcpy(m.data(), "n+1", 3);
    return m;
  }();
  const Bytes& img = data().a.image;
  const size_t mid = 352 + (img.size() - 352) / 2 / 4 * 4;
  const Bytes voxels(img.begin() + static_cast<std::ptrdiff_t>(mid), img.begin() + static_cast<std::ptrdiff_t>(mid + 32));
  ASSERT_TRUE(contains(img, magic));  // the patterns are in the plaintext…
  size_t total = 0;
  for (const auto& s : staged) {
    total += s.size();
    EXPECT_FALSE(contains(s, magic)) << "the NIfTI magic crossed the staging buffers";  // …and not in the open
    EXPECT_FALSE(contains(s, voxels)) << "voxel bytes crossed the staging buffers";
    bool in_a_file = false;
    for (const auto& f : files) in_a_file = in_a_file || contains(f, s);
    EXPECT_TRUE(in_a_file) << "a staged buffer of " << s.size() << " bytes is not a run of a sealed file";
  }
  size_t sealed_bytes = 0;
  for (const auto& f : files) sealed_bytes += f.size();
  EXPECT_GT(total, sealed_bytes * 9 / 10);  // the frames, not a sample of them
  EXPECT_LE(total, sealed_bytes);
}

// (b) Batches equal PatchSource::fill_step's to the bit, on the emulated GPU and the CPU device;
// the foreground list equals the CPU sampler's (index order).
TEST_F(Loader, BatchesAreBitIdenticalToTheCpuTrainers) {
  const std::vector<const CaseBytes*> cases{&data().a, &data().b, &data().c};
  const std::vector<std::string> dirs{write_case("sealed-a", data().a, true), write_case("plain-b", data().b, false),
                                      write_case("sealed-c", data().c, true)};
  std::vector<std::unique_ptr<gpu::ChannelDevice>> devices;
  devices.push_back(gpu::emulated_device());
  devices.push_back(gpu::cpu_device(2));
  for (auto& dev : devices) {
    SCOPED_TRACE(dev->name());
    auto ds = DeviceDataset::load(*dev, dirs, ring(), options());
    ASSERT_TRUE(ds) << ds.error().message;
    ASSERT_EQ(ds->cases(), 3u);
    EXPECT_EQ(ds->dims(1), read_back(data().b).image.dims);
    for (size_t c = 0; c < 3; ++c) {
      const auto labels = read_back(*cases[c]).labels->data;
      std::vector<uint32_t> want;
      for (size_t i = 0; i < labels.size(); ++i) {
        if (labels[i] == ct::kCoronary) want.push_back(static_cast<uint32_t>(i));
      }
      auto got = ds->foreground_to_host(c);
      ASSERT_TRUE(got);
      EXPECT_EQ(*got, want) << "case " << c;
      if (c < 2) {
        EXPECT_FALSE(want.empty());
      } else {
        EXPECT_TRUE(want.empty());
      }
    }
    expect_batches_equal(*ds, cases, 12, false);
    // Slots out of the batch, and null outputs, are refused.
    float x = 0;
    uint8_t y = 0;
    EXPECT_FALSE(ds->fill_step(0, 2, 1, &x, &y));
    EXPECT_FALSE(ds->fill_step(0, 0, 4, &x, &y));
    EXPECT_FALSE(ds->fill_step(0, 0, 1, nullptr, &y));
    EXPECT_TRUE(ds->fill_step(0, 1, 1, nullptr, nullptr));  // no slot: nothing to write
  }
}

// (c) A tampered sealed file: nothing is returned, and the error names the file and the chunk.
TEST_F(Loader, ATamperedFileIsNamedWithItsChunk) {
  auto dev = gpu::emulated_device();
  const std::string d = write_case("tampered", data().a, true);
  Bytes file = testing::read_file(d + "/vesselness.nii.sealed");
  file[file.size() / 2] ^= std::byte{0x01};
  testing::write_file(d + "/vesselness.nii.sealed", file);
  auto ds = DeviceDataset::load(*dev, {d}, ring(), options());
  ASSERT_FALSE(ds);
  EXPECT_NE(ds.error().message.find("vesselness.nii.sealed: chunk "), std::string::npos) << ds.error().message;
  EXPECT_NE(ds.error().message.find("fails authentication"), std::string::npos) << ds.error().message;
  EXPECT_NE(ds.error().message.find("loader: case " + d), std::string::npos) << ds.error().message;

  // Another identity opens nothing.
  Identity mallory = *Identity::generate();
  sealed::KeyRing other;
  other.identities = {&mallory};
  auto foreign = DeviceDataset::load(*dev, {write_case("good", data().a, true)}, other, options());
  ASSERT_FALSE(foreign);
  EXPECT_NE(foreign.error().message.find("image.nii.sealed"), std::string::npos) << foreign.error().message;
}

// (d) Bad headers and mismatched volumes are named; the unchanged case (the passing twin) loads.
TEST_F(Loader, BadHeadersAndMismatchedVolumesAreNamed) {
  auto dev = gpu::emulated_device();
  auto poke16 = [](Bytes& b, size_t at, int16_t v) { std::memcpy(b.data() + at, &v, 2); };
  auto poke32 = [](Bytes& b, size_t at, int32_t v) { std::memcpy(b.data() + at, &v, 4); };
  auto pokef = [](Bytes& b, size_t at, float v) { std::memcpy(b.data() + at, &v, 4); };
  struct Case {
    std::string name;
    std::function<void(CaseBytes&, train::TrainerOptions&)> change;
    std::string want_error;  // empty: loads
  };
  const std::vector<Case> table{
      {"unchanged", [](CaseBytes&, train::TrainerOptions&) {}, ""},
      {"int16 image", [&](CaseBytes& b, train::TrainerOptions&) { poke16(b.image, 70, 4); }, "image.nii: datatype is 4, want 16 (float32)"},
      {"float labels", [&](CaseBytes& b, train::TrainerOptions&) { b.labels = data().a.image; }, "labels.nii: datatype is 16, want 2 (uint8)"},
      {"bitpix", [&](CaseBytes& b, train::TrainerOptions&) { poke16(b.image, 72, 16); }, "image.nii: bitpix is 16, want 32"},
      {"NIfTI-2", [&](CaseBytes& b, train::TrainerOptions&) { poke32(b.vesselness, 0, 540); }, "vesselness.nii: sizeof_hdr is 540 (NIfTI-2)"},
      {"big-endian", [&](CaseBytes& b, train::TrainerOptions&) { poke32(b.image, 0, static_cast<int32_t>(__builtin_bswap32(348))); },
       "image.nii: sizeof_hdr is byte-swapped"},
      {"sizeof_hdr", [&](CaseBytes& b, train::TrainerOptions&) { poke32(b.image, 0, 349); }, "image.nii: sizeof_hdr is 349, not 348"},
      {"magic", [&](CaseBytes& b, train::TrainerOptions&) { std::memcpy(b.labels.data() + 344, "n+2", 3); }, "labels.nii: magic is not \"n+1\""},
      {"dim[0]", [&](CaseBytes& b, train::TrainerOptions&) { poke16(b.image, 40, 2); }, "image.nii: dim[0] is 2, not 3..7"},
      {"a 4D volume",
       [&](CaseBytes& b, train::TrainerOptions&) {
         poke16(b.image, 40, 4);
         poke16(b.image, 48, 2);
       },
       "image.nii: dim[4] is 2: not a single 3D volume"},
      {"vox_offset past the end", [&](CaseBytes& b, train::TrainerOptions&) { pokef(b.image, 108, 1e9f); }, "image.nii: vox_offset 1000000000 and"},
      {"vox_offset odd", [&](CaseBytes& b, train::TrainerOptions&) { pokef(b.image, 108, 354); }, "image.nii: vox_offset is 354.000000, not a whole multiple"},
      {"truncated voxels", [&](CaseBytes& b, train::TrainerOptions&) { b.labels.resize(b.labels.size() - 1); }, "pass the end of the file"},
      {"shorter than a header", [&](CaseBytes& b, train::TrainerOptions&) { b.image.resize(100); }, "image.nii: the file has 100 bytes, fewer than"},
      {"labels of other dimensions", [&](CaseBytes& b, train::TrainerOptions&) { b.labels = data().b.labels; }, "labels is 82×87×51 voxels but image is 91×91×57"},
      {"vesselness of other dimensions", [&](CaseBytes& b, train::TrainerOptions&) { b.vesselness = data().b.vesselness; }, "vesselness is 82×87×51 voxels"},
      {"a voxel that is NaN",
       [&](CaseBytes& b, train::TrainerOptions&) { pokef(b.vesselness, 352 + 4 * 1000, std::numeric_limits<float>::quiet_NaN()); },
       "vesselness: a voxel that is not a finite number"},
      {"a patch too large", [](CaseBytes&, train::TrainerOptions& o) { o.patch = 64; }, "augment: a patch of 64 voxels on axis 2 does not fit the volume's 57"},
  };
  for (const auto& tc : table) {
    SCOPED_TRACE(tc.name);
    CaseBytes b = data().a;
    auto o = options();
    tc.change(b, o);
    const std::string d = write_case("bad-" + std::to_string(&tc - table.data()), b, false);
    auto ds = DeviceDataset::load(*dev, {d}, ring(), o);
    if (tc.want_error.empty()) {
      EXPECT_TRUE(ds) << ds.error().message;
    } else {
      ASSERT_FALSE(ds);
      EXPECT_NE(ds.error().message.find(tc.want_error), std::string::npos) << ds.error().message;
      EXPECT_NE(ds.error().message.find("loader: case " + d), std::string::npos) << ds.error().message;
    }
  }
  // Files that are missing or compressed.
  const std::string d = write_case("no-vesselness", data().a, false);
  fs::remove(d + "/vesselness.nii");
  auto missing = DeviceDataset::load(*dev, {d}, ring(), options());
  ASSERT_FALSE(missing);
  EXPECT_NE(missing.error().message.find("no vesselness.nii or vesselness.nii.sealed"), std::string::npos) << missing.error().message;
  testing::write_file(d + "/vesselness.nii.gz", data().a.vesselness);
  auto gz = DeviceDataset::load(*dev, {d}, ring(), options());
  ASSERT_FALSE(gz);
  EXPECT_NE(gz.error().message.find("vesselness.nii.gz: gzip-compressed"), std::string::npos) << gz.error().message;
  EXPECT_FALSE(DeviceDataset::load(*dev, {}, ring(), options()));
}

// The CUDA device: the same batches, the same foreground lists, the same refusal of a tampered
// file (skips without a GPU; scripts/gpu-check requires it).
TEST_F(Loader, CudaBatchesAreBitIdenticalToTheCpuTrainers) {
  auto dev = gpu::cuda_device(0);
  TRESOR_SKIP_WITHOUT_GPU(dev);
  const std::vector<const CaseBytes*> cases{&data().a, &data().b, &data().c};
  const std::vector<std::string> dirs{write_case("sealed-a", data().a, true), write_case("plain-b", data().b, false),
                                      write_case("sealed-c", data().c, true)};
  auto ds = DeviceDataset::load(**dev, dirs, ring(), options());
  ASSERT_TRUE(ds) << ds.error().message;
  for (size_t c = 0; c < 3; ++c) {
    const auto labels = read_back(*cases[c]).labels->data;
    std::vector<uint32_t> want;
    for (size_t i = 0; i < labels.size(); ++i) {
      if (labels[i] == ct::kCoronary) want.push_back(static_cast<uint32_t>(i));
    }
    auto got = ds->foreground_to_host(c);
    ASSERT_TRUE(got) << got.error().message;
    EXPECT_EQ(*got, want) << "case " << c;
  }
  expect_batches_equal(*ds, cases, 12, true);

  const std::string d = write_case("tampered", data().a, true);
  Bytes file = testing::read_file(d + "/labels.nii.sealed");
  file[file.size() / 2] ^= std::byte{0x01};
  testing::write_file(d + "/labels.nii.sealed", file);
  auto bad = DeviceDataset::load(**dev, {d}, ring(), options());
  ASSERT_FALSE(bad);
  EXPECT_NE(bad.error().message.find("labels.nii.sealed: chunk "), std::string::npos) << bad.error().message;
}

}  // namespace
}  // namespace tresor
