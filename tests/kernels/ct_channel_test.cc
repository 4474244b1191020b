// The CT pipeline on sealed files (include/tresor/gpu/ct.h, prepare_sealed) on every device this
// machine has: the CPU device (the reference, ct::prepare) and the emulated GPU (the kernels'
// emulation) everywhere, a CUDA device where there is one (skipped with the reason elsewhere;
// scripts/gpu-check requires it).
//
// What is checked: the outputs equal the pipeline's on the volumes the CPU reader gives for the same
// files (exactly: the same code decodes the voxels); the sealed outputs open to nifti_bytes of those
// outputs; nothing that crossed the staging buffers holds plaintext (the emulated device reports
// every buffer); every voxel type the reader takes decodes as the reader decodes it; tampered,
// compressed, mismatched and foreign files are refused naming the file, with nothing written.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <mutex>
#include <string>
#include <vector>

#include "support/forwarding_device.h"
#include "support/phantom.h"
#include "support/test_support.h"
#include "tresor/ct/prep.h"
#include "tresor/ct/volume.h"
#include "tresor/gpu.h"
#include "tresor/gpu/channel.h"
#include "tresor/gpu/ct.h"
#include "tresor/identity.h"
#include "tresor/sealed.h"

namespace tresor {
namespace {

namespace fs = std::filesystem;
using testing::TempDir;

const ct::Phantom& small_phantom() {
  static const ct::Phantom p = testing::phantom(31, {64, 60, 40}, {2.0, 2.1, 3.1});
  return p;
}

ct::PrepOptions options() {
  ct::PrepOptions o;
  o.spacing = 2.0;
  o.frangi_sigmas_mm = {2.0, 3.0};
  return o;
}

// Samples of a plaintext (32 bytes each, from its voxels) that must never cross the staging buffers.
std::vector<std::string> samples(ByteSpan plain, size_t from) {
  std::vector<std::string> out;
  for (size_t k = 1; k <= 8; ++k) {
    const size_t at = from + (plain.size() - from - 32) * k / 9;
    out.emplace_back(reinterpret_cast<const char*>(plain.data() + at), 32);
  }
  return out;
}

class CtChannel : public ::testing::Test {
 protected:
  Identity alice = *Identity::generate();  // holds the inputs
  Identity bob = *Identity::generate();    // receives the outputs
  TempDir dir;
  std::mutex staged_mutex;
  std::vector<Bytes> staged;

  sealed::KeyRing ring(const Identity& id) const {
    sealed::KeyRing r;
    r.identities = {&id};
    return r;
  }
  std::string seal_file(const std::string& name, ByteSpan plain, uint32_t chunk = 64 * 1024) {
    sealed::SealOptions o;
    o.chunk_size = chunk;
    o.recipients = {alice.recipient()};
    auto s = sealed::seal_buffer(plain, o);
    EXPECT_TRUE(s) << s.error().message;
    const std::string path = dir.file(name);
    testing::write_file(path, *s);
    return path;
  }
  gpu::ct::SealedPrepOutputs outputs(const std::string& sub, bool to_host = true) {
    gpu::ct::SealedPrepOutputs out;
    out.dir = dir.file(sub);
    fs::create_directories(out.dir);
    out.seal.recipients = {bob.recipient()};
    out.to_host = to_host;
    return out;
  }
  Bytes open_output(const std::string& path) {
    auto s = testing::read_file(path);
    auto plain = sealed::open_buffer(s, ring(bob), {});
    EXPECT_TRUE(plain) << path << ": " << plain.error().message;
    return plain ? Bytes(plain->data(), plain->data() + plain->size()) : Bytes{};
  }
  std::unique_ptr<gpu::ChannelDevice> emulated() {
    return gpu::emulated_device([this](ByteSpan b) {
      std::lock_guard lock(staged_mutex);
      staged.emplace_back(b.begin(), b.end());
    });
  }
  bool staged_contains(const std::vector<std::string>& needles) {
    for (const auto& b : staged) {
      const std::string_view v(reinterpret_cast<const char*>(b.data()), b.size());
      for (const auto& n : needles) {
        if (v.find(n) != std::string_view::npos) return true;
      }
    }
    return false;
  }
  void expect_pipeline_outputs(gpu::ChannelDevice& device);
  void expect_other_types_decoded(gpu::ChannelDevice& device);
  size_t files_in(const std::string& sub) {
    size_t n = 0;
    std::error_code ec;
    for (const auto& e : fs::directory_iterator(dir.file(sub), ec)) n += e.is_regular_file() ? 1u : 0u;
    return n;
  }
};

void expect_same(const ct::Prepared& got, const ct::Prepared& want, const std::string& what) {
  EXPECT_EQ(got.stats.lower, want.stats.lower) << what;
  EXPECT_EQ(got.stats.upper, want.stats.upper) << what;
  EXPECT_EQ(got.stats.mean, want.stats.mean) << what;
  EXPECT_EQ(got.stats.sd, want.stats.sd) << what;
  EXPECT_EQ(got.image.dims, want.image.dims) << what;
  EXPECT_EQ(got.image.origin, want.image.origin) << what;
  EXPECT_TRUE(got.image.data == want.image.data) << what;
  EXPECT_TRUE(got.vesselness.data == want.vesselness.data) << what;
  ASSERT_EQ(got.labels.has_value(), want.labels.has_value()) << what;
  if (got.labels) {
    EXPECT_EQ(got.labels->origin, want.labels->origin) << what;
    EXPECT_TRUE(got.labels->data == want.labels->data) << what;
  }
}

// On `device`: the outputs of the pipeline that device runs, on the volumes the CPU reader gives
// for the same files, and sealed files that open to them.
void CtChannel::expect_pipeline_outputs(gpu::ChannelDevice& device) {
  const auto& p = small_phantom();
  const Bytes hu_file = *ct::nifti_bytes(p.hu), label_file = *ct::nifti_bytes(p.labels);
  const gpu::ct::SealedCase in{seal_file("ccta.nii.sealed", hu_file), seal_file("labels.nii.sealed", label_file)};
  const ct::PrepOptions o = options();
  // What the CPU reader gives for these files (NIfTI keeps spacing as float32: 2.1 mm is not the
  // phantom's double 2.1).
  auto hu = ct::read_nifti_hu(hu_file, "ccta.nii");
  auto labels = ct::read_nifti_labels(label_file, "labels.nii");
  ASSERT_TRUE(hu && labels);
  const auto kind = device.kind();
  auto want = kind == gpu::ChannelDevice::Kind::kCpu        ? ct::prepare(*hu, &*labels, o)
              : kind == gpu::ChannelDevice::Kind::kEmulated ? gpu::ct::prepare_emulated(*hu, &*labels, o)
                                                            : gpu::ct::prepare(*hu, &*labels, o, nullptr, device.ordinal());
  ASSERT_TRUE(want) << want.error().message;
  auto out = outputs("out-" + std::to_string(static_cast<int>(kind)));
  auto r = gpu::ct::prepare_sealed(device, in, ring(alice), o, out);
  ASSERT_TRUE(r) << r.error().message;
  expect_same(r->prepared, *want, device.name());
  EXPECT_EQ(r->input.dims, p.hu.dims);
  EXPECT_EQ(r->input.datatype, 4);  // NIFTI_TYPE_INT16
  // The sealed outputs open, for their recipient only, to the NIfTI files of those outputs.
  ASSERT_EQ(r->written.size(), 3u);
  EXPECT_EQ(r->written[0], (fs::path(out.dir) / "image.nii.sealed").string());
  EXPECT_EQ(open_output(r->written[0]), *ct::nifti_bytes(r->prepared.image));
  EXPECT_EQ(open_output(r->written[1]), *ct::nifti_bytes(r->prepared.vesselness));
  EXPECT_EQ(open_output(r->written[2]), *ct::nifti_bytes(*r->prepared.labels));
  EXPECT_FALSE(sealed::open_buffer(testing::read_file(r->written[0]), ring(alice), {})) << "sealed to bob only";
}

TEST_F(CtChannel, CpuDeviceGivesTheReferencesOutputs) { expect_pipeline_outputs(*gpu::cpu_device(2)); }
TEST_F(CtChannel, EmulatedDeviceGivesTheEmulationsOutputs) { expect_pipeline_outputs(*emulated()); }
TEST_F(CtChannel, CudaDeviceGivesTheDevicePipelinesOutputs) {
  auto devs = gpu::gpu_probe();
  TRESOR_SKIP_WITHOUT_GPU(devs);
  auto c = gpu::cuda_device(0);
  ASSERT_TRUE(c) << c.error().message;
  expect_pipeline_outputs(**c);
  expect_other_types_decoded(**c);
}

TEST_F(CtChannel, OnlyCiphertextCrossesTheStagingBuffers) {
  const auto& p = small_phantom();
  const Bytes hu_file = *ct::nifti_bytes(p.hu), label_file = *ct::nifti_bytes(p.labels);
  const gpu::ct::SealedCase in{seal_file("ccta.nii.sealed", hu_file, 16 * 1024), seal_file("labels.nii.sealed", label_file, 16 * 1024)};
  auto dev = emulated();
  auto r = gpu::ct::prepare_sealed(*dev, in, ring(alice), options(), outputs("out"));
  ASSERT_TRUE(r) << r.error().message;
  size_t total = 0;
  for (const auto& b : staged) total += b.size();
  EXPECT_EQ(total, r->staged_bytes);
  EXPECT_GT(total, hu_file.size() + label_file.size());  // inputs in, outputs out
  std::vector<std::string> plain = samples(hu_file, 352);
  for (const auto& s : samples(*ct::nifti_bytes(r->prepared.image), 352)) plain.push_back(s);
  for (const auto& s : samples(*ct::nifti_bytes(r->prepared.vesselness), 352)) plain.push_back(s);
  EXPECT_FALSE(staged_contains(plain));
  // The check can fail: the plaintext itself, staged, is found.
  staged.push_back(hu_file);
  EXPECT_TRUE(staged_contains(plain));
}

// A device that forwards to another and records every device-to-host read (what the host gets
// back besides the staging buffers).
class RecordingDevice final : public testing::ForwardingDevice {
 public:
  using ForwardingDevice::ForwardingDevice;
  std::vector<Bytes> reads;
  Result<void> read_device(MutableByteSpan to, const std::byte* dev) override {
    auto r = d_->read_device(to, dev);
    reads.emplace_back(to.begin(), to.end());
    return r;
  }
};

// Without host copies, what the host reads back from device memory is the header's size field,
// the NIfTI-1 header itself (348 bytes: no extension, no voxel) and the channel's per-chunk
// verdicts — never a voxel.
TEST_F(CtChannel, OnlyTheHeaderComesBackFromDeviceMemory) {
  const auto& p = small_phantom();
  const Bytes hu_file = *ct::nifti_bytes(p.hu);
  RecordingDevice dev(emulated());
  auto r = gpu::ct::prepare_sealed(dev, {seal_file("ccta.nii.sealed", hu_file, 16 * 1024), ""}, ring(alice), options(), outputs("out", false));
  ASSERT_TRUE(r) << r.error().message;
  // Exactly: the channel's verdicts (one zero byte per chunk of the file), the 4-byte size field,
  // the 348-byte header.
  const size_t chunks = (hu_file.size() + 16 * 1024 - 1) / (16 * 1024);
  ASSERT_EQ(dev.reads.size(), 3u);
  EXPECT_EQ(dev.reads[0], Bytes(chunks, std::byte{0})) << "the verdicts";
  EXPECT_EQ(dev.reads[1], Bytes(hu_file.begin(), hu_file.begin() + 4));
  EXPECT_EQ(dev.reads[2], Bytes(hu_file.begin(), hu_file.begin() + 348));
}

TEST_F(CtChannel, WithoutHostCopiesTheSameFilesAndNoVoxelsOnTheHost) {
  const auto& p = small_phantom();
  const gpu::ct::SealedCase in{seal_file("ccta.nii.sealed", *ct::nifti_bytes(p.hu)), ""};
  auto dev = emulated();
  auto with = gpu::ct::prepare_sealed(*dev, in, ring(alice), options(), outputs("with"));
  auto without = gpu::ct::prepare_sealed(*dev, in, ring(alice), options(), outputs("without", false));
  ASSERT_TRUE(with && without);
  EXPECT_TRUE(without->prepared.image.data.empty());
  EXPECT_TRUE(without->prepared.vesselness.data.empty());
  EXPECT_EQ(without->prepared.image.dims, with->prepared.image.dims);
  EXPECT_FALSE(without->prepared.labels);
  ASSERT_EQ(without->written.size(), 2u);
  for (size_t k = 0; k < 2; ++k) EXPECT_EQ(open_output(without->written[k]), open_output(with->written[k])) << k;
  // No output directory: nothing written, the host copies only.
  gpu::ct::SealedPrepOutputs host_only;
  auto none = gpu::ct::prepare_sealed(*dev, in, ring(alice), options(), host_only);
  ASSERT_TRUE(none);
  EXPECT_TRUE(none->written.empty());
  EXPECT_TRUE(none->prepared.image.data == with->prepared.image.data);
}

// HU stored as float32 (HU + 1024) / 2 + 0.3 with scl_slope 2, scl_inter −1024 (HU + 0.6 after
// scaling: the rounding matters), labels as float32: other voxel types than tresor prep writes.
struct OtherTypes {
  Bytes image, labels;
};
OtherTypes other_types() {
  const auto& p = small_phantom();
  ct::Volume<float> f;
  f.dims = p.hu.dims;
  f.spacing = p.hu.spacing;
  f.origin = p.hu.origin;
  for (int16_t v : p.hu.data) f.data.push_back((static_cast<float>(v) + 1024.0f) / 2.0f + 0.3f);
  OtherTypes t{*ct::nifti_bytes(f), {}};
  const float slope = 2, inter = -1024;
  std::memcpy(t.image.data() + 112, &slope, 4);
  std::memcpy(t.image.data() + 116, &inter, 4);
  ct::Volume<float> lf;
  lf.dims = p.labels.dims;
  lf.spacing = p.labels.spacing;
  for (uint8_t v : p.labels.data) lf.data.push_back(v);
  t.labels = *ct::nifti_bytes(lf);
  return t;
}

// The other types decoded in device memory as the CPU reader decodes them; a label of 0.5 refused
// with the reader's message.
void CtChannel::expect_other_types_decoded(gpu::ChannelDevice& device) {
  const OtherTypes t = other_types();
  auto hu = ct::read_nifti_hu(t.image, "scaled.nii");
  auto labels = ct::read_nifti_labels(t.labels, "labels.nii");
  ASSERT_TRUE(hu && labels);
  EXPECT_NE(hu->data, small_phantom().hu.data);  // the + 0.3 moved every voxel
  const auto kind = device.kind();
  auto want = kind == gpu::ChannelDevice::Kind::kCpu        ? ct::prepare(*hu, &*labels, options())
              : kind == gpu::ChannelDevice::Kind::kEmulated ? gpu::ct::prepare_emulated(*hu, &*labels, options())
                                                            : gpu::ct::prepare(*hu, &*labels, options(), nullptr, device.ordinal());
  ASSERT_TRUE(want) << want.error().message;
  const gpu::ct::SealedCase in{seal_file("scaled.nii.sealed", t.image), seal_file("labelsf.nii.sealed", t.labels)};
  auto r = gpu::ct::prepare_sealed(device, in, ring(alice), options(), {});
  ASSERT_TRUE(r) << r.error().message;
  EXPECT_EQ(r->input.datatype, 16);  // NIFTI_TYPE_FLOAT32
  EXPECT_EQ(r->input.slope, 2);
  expect_same(r->prepared, *want, device.name() + ", scaled float32");
  ct::Volume<float> half;
  half.dims = small_phantom().labels.dims;
  half.spacing = small_phantom().labels.spacing;
  half.data.assign(half.size(), 0.5f);
  auto bad = gpu::ct::prepare_sealed(device, {in.image, seal_file("half.nii.sealed", *ct::nifti_bytes(half))}, ring(alice), options(), {});
  ASSERT_TRUE(testing::FailsWith(bad, ErrorCode::kMalformed));
  EXPECT_NE(bad.error().message.find("half.nii.sealed: a label volume with values that are not whole numbers 0..255"), std::string::npos)
      << bad.error().message;
}

TEST_F(CtChannel, DecodesOtherVoxelTypesAsTheReader) {
  expect_other_types_decoded(*gpu::cpu_device(1));
  expect_other_types_decoded(*emulated());
}

TEST_F(CtChannel, RefusesNamingTheFileAndWritesNothing) {
  const auto& p = small_phantom();
  const Bytes hu_file = *ct::nifti_bytes(p.hu), label_file = *ct::nifti_bytes(p.labels);
  const std::string image = seal_file("ccta.nii.sealed", hu_file, 16 * 1024);
  const std::string labels = seal_file("labels.nii.sealed", label_file, 16 * 1024);
  auto dev = emulated();
  auto expect_refused = [&](const gpu::ct::SealedCase& in, ErrorCode code, const std::string& text, const sealed::KeyRing& keys,
                            const ct::PrepOptions& o) {
    SCOPED_TRACE(text);
    auto r = gpu::ct::prepare_sealed(*dev, in, keys, o, outputs("refused"));
    ASSERT_TRUE(testing::FailsWith(r, code)) << (r ? "accepted" : r.error().message);
    EXPECT_NE(r.error().message.find(text), std::string::npos) << r.error().message;
    EXPECT_EQ(files_in("refused"), 0u);
  };
  // The passing twin.
  ASSERT_TRUE(gpu::ct::prepare_sealed(*dev, {image, labels}, ring(alice), options(), {}));

  // A chunk of the image altered (the channel's verdict names the file and the chunk).
  Bytes tampered = testing::read_file(image);
  tampered[tampered.size() / 2] ^= std::byte{1};
  testing::write_file(dir.file("tampered.nii.sealed"), tampered);
  expect_refused({dir.file("tampered.nii.sealed"), labels}, ErrorCode::kChunkAuth, "tampered.nii.sealed: chunk ", ring(alice), options());
  // Sealed to someone else.
  expect_refused({image, labels}, ErrorCode::kNoMatchingKey, "ccta.nii.sealed", ring(bob), options());
  // A compressed file: its voxels are not at a fixed place.
  Bytes gz = hu_file;
  gz[0] = std::byte{0x1F};
  gz[1] = std::byte{0x8B};
  expect_refused({seal_file("gz.nii.sealed", gz), labels}, ErrorCode::kInvalidArgument, "gz.nii.sealed: gzip-compressed", ring(alice), options());
  // Not NIfTI at all.
  expect_refused({seal_file("text.nii.sealed", as_bytes(std::string(600, 'x'))), ""}, ErrorCode::kMalformed, "text.nii.sealed: not a readable NIfTI",
                 ring(alice), options());
  // Labels of other dimensions: prepare's message.
  ct::LabelVolume other = p.labels;
  other.dims[2] -= 1;
  other.data.resize(other.size());
  expect_refused({image, seal_file("other.nii.sealed", *ct::nifti_bytes(other))}, ErrorCode::kInvalidArgument, "prep: the labels are 64×60×39",
                 ring(alice), options());
  // The options before any file is read: a missing file is not reached.
  ct::PrepOptions no_scales = options();
  no_scales.frangi_sigmas_mm.clear();
  expect_refused({dir.file("missing.nii.sealed"), ""}, ErrorCode::kInvalidArgument, "prep: no Frangi scale", ring(alice), no_scales);
  // The pipeline's own refusal after decoding (no voxel above the threshold), as prepare gives it.
  ct::PrepOptions high = options();
  high.foreground_hu = 32767;
  expect_refused({image, ""}, ErrorCode::kInvalidArgument, ct::prepare(p.hu, nullptr, high).error().message, ring(alice), high);
}

}  // namespace
}  // namespace tresor
