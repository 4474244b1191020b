// The CT pipeline on sealed files (include/tresor/gpu/ct.h, prepare_sealed): the secure channel
// brings each file into device memory, its NIfTI header alone comes back, the voxels are decoded
// where they lie (tresor/ct/nifti_hd.h), the pipeline runs there and its outputs are sealed there.
// Plain C++23 over the channel's device interface and the launch wrappers (kernels/ct_kernels.h);
// without CUDA in the build only the host devices can exist.
#include <algorithm>
#include <array>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "ct_plan.h"
#include "tresor/ct/nifti_hd.h"
#include "tresor/gpu/ct.h"
#include "tresor/secret.h"

#ifdef TRESOR_HAVE_CUDA
#include "ct_kernels.h"
#include "cuda_result.h"
#endif

namespace tresor::gpu::ct {
namespace {

using tresor::gpu::detail::cuda;

namespace fs = std::filesystem;
namespace hd = tresor::ct::nifti_hd;
using tresor::ct::NiftiVoxels;

double ms_since(std::chrono::steady_clock::time_point t) { return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t).count(); }

// A sealed file in device memory with its layout (from the header, the only bytes read back).
struct Opened {
  gpu::DeviceBuffer file;
  NiftiVoxels layout;
  const unsigned char* voxels() const { return reinterpret_cast<const unsigned char*>(file.data() + layout.vox_offset); }
  uint64_t count() const { return uint64_t{layout.dims[0]} * layout.dims[1] * layout.dims[2]; }
  hd::Decode decode() const { return {layout.datatype, layout.bytes_per_voxel, layout.swap, layout.slope, layout.inter}; }
};

Result<Opened> open_sealed(ChannelDevice& device, SecureChannel& channel, const std::string& path, const sealed::KeyRing& keys, bool labels, uint64_t& staged) {
  auto file = channel.upload(path, keys);
  if (!file) return std::unexpected(file.error());
  staged += channel.last().staged_bytes;
  // The header alone: its first 4 bytes say which (sizeof_hdr: 348 for NIfTI-1, 540 for NIfTI-2,
  // in either byte order), then exactly that many — never the extension or voxels after it.
  std::array<std::byte, 4> size_field{};
  const size_t probe = std::min(file->size(), size_field.size());
  if (probe > 0) TRESOR_TRY(device.read_device(MutableByteSpan(size_field.data(), probe), file->data()));
  uint32_t sizeof_hdr = 0;
  std::memcpy(&sizeof_hdr, size_field.data(), 4);
  const bool nifti2 = sizeof_hdr == 540 || __builtin_bswap32(sizeof_hdr) == 540;
  SecretBuffer head(std::min(file->size(), nifti2 ? tresor::ct::kNiftiHeaderMax : size_t{348}));
  if (head.size() > 0) TRESOR_TRY(device.read_device(head.span(), file->data()));
  auto layout = tresor::ct::read_nifti_layout(head.span(), file->size(), path, labels);
  if (!layout) return std::unexpected(layout.error());
  return Opened{std::move(*file), *layout};
}

template <typename T>
tresor::ct::Volume<T> shape_of(const std::array<size_t, 3>& dims, const std::array<double, 3>& spacing, const std::array<double, 3>& origin) {
  tresor::ct::Volume<T> v;
  v.dims = dims;
  v.spacing = spacing;
  v.origin = origin;
  return v;
}

// The sealed outputs: each volume's NIfTI header and voxels laid out in device memory as the file
// (header written from the host: geometry only), sealed there by the channel.
struct OutputWriter {
  ChannelDevice& device;
  SecureChannel& channel;
  const SealedPrepOutputs& out;
  SealedPrepared& result;

  template <typename T>
  Result<void> write(const char* name, const tresor::ct::Volume<T>& shape, const std::byte* voxels, bool voxels_on_device) {
    auto header = tresor::ct::nifti_header_bytes(shape);
    if (!header) return std::unexpected(header.error());
    const size_t bytes = shape.size() * sizeof(T), total = header->size() + bytes;
    auto mem = device.device_alloc(total);
    if (!mem) return std::unexpected(mem.error());
    gpu::DeviceBuffer file(&device, *mem, 0, total);  // wiped and freed on every path
    TRESOR_TRY(device.write_device(mem->p, *header));
    if (voxels_on_device) {
      TRESOR_TRY(device.copy_on_device(0, mem->p + header->size(), voxels, bytes));
      TRESOR_TRY(device.synchronize(0));
    } else {
      TRESOR_TRY(device.write_device(mem->p + header->size(), ByteSpan(voxels, bytes)));
    }
    const std::string path = (fs::path(out.dir) / (std::string(name) + ".sealed")).string();
    TRESOR_TRY(channel.download(file.data(), total, path, out.seal, out.overwrite));
    result.staged_bytes += channel.last().staged_bytes;
    result.written.push_back(path);
    return {};
  }
};

// The host devices: "device memory" is host memory, so the decoded volumes are ordinary volumes.
Result<void> run_on_host(ChannelDevice& device, SecureChannel& channel, const SealedCase& in, Opened& image, std::optional<Opened>& labels,
                         const tresor::ct::PrepOptions& o, const SealedPrepOutputs& out, SealedPrepared& r) {
  auto t = std::chrono::steady_clock::now();
  // "Device memory" is host memory here: the CPU reader's own decoding, with its errors.
  auto hu = tresor::ct::decode_nifti_hu(ByteSpan(image.file.data(), image.file.size()), image.layout, in.image);
  if (!hu) return std::unexpected(hu.error());
  image.file = {};
  std::optional<tresor::ct::LabelVolume> lab;
  if (labels) {
    auto l = tresor::ct::decode_nifti_labels(ByteSpan(labels->file.data(), labels->file.size()), labels->layout, in.labels);
    labels->file = {};
    if (!l) return std::unexpected(l.error());
    lab = std::move(*l);
  }
  r.timings.upload_ms += ms_since(t);
  const tresor::ct::LabelVolume* lp = lab ? &*lab : nullptr;
  auto p = device.kind() == ChannelDevice::Kind::kCpu ? tresor::ct::prepare(*hu, lp, o) : prepare_emulated(*hu, lp, o);
  if (!p) return std::unexpected(p.error());
  r.prepared = std::move(*p);

  t = std::chrono::steady_clock::now();
  if (!out.dir.empty()) {
    OutputWriter w{device, channel, out, r};
    auto bytes_of = [](const auto& v) { return reinterpret_cast<const std::byte*>(v.data.data()); };
    TRESOR_TRY(w.write("image.nii", r.prepared.image, bytes_of(r.prepared.image), false));
    TRESOR_TRY(w.write("vesselness.nii", r.prepared.vesselness, bytes_of(r.prepared.vesselness), false));
    if (r.prepared.labels) TRESOR_TRY(w.write("labels.nii", *r.prepared.labels, bytes_of(*r.prepared.labels), false));
  }
  if (!out.to_host) {
    for (auto* v : {&r.prepared.image, &r.prepared.vesselness}) std::vector<float>().swap(v->data);
    if (r.prepared.labels) std::vector<uint8_t>().swap(r.prepared.labels->data);
  }
  r.timings.download_ms += ms_since(t);
  return {};
}

#ifdef TRESOR_HAVE_CUDA
Error bad_labels(const std::string& path) {
  return Error{ErrorCode::kMalformed, path + ": a label volume with values that are not whole numbers 0..255"};  // read_nifti_labels's
}

// A CUDA device: decoding, the pipeline and the sealing in device memory.
Result<void> run_on_cuda(ChannelDevice& device, SecureChannel& channel, const SealedCase& in, Opened& image, std::optional<Opened>& labels,
                         const tresor::ct::PrepOptions& o, const SealedPrepOutputs& out, SealedPrepared& r) {
  const int ordinal = device.ordinal();
  // The decode kernels go to the current device's default stream: it must be the channel's (the
  // calling thread may have another current), and the caller's comes back on return.
  gpu::detail::CurrentDevice current;
  TRESOR_TRY(cuda(current.select(ordinal)));
  auto t = std::chrono::steady_clock::now();
  const uint64_t n = image.count();
  auto d_hu = DeviceBuffer::allocate(ordinal, sizeof(int16_t) * n);
  if (!d_hu) return std::unexpected(d_hu.error());
  DeviceBuffer d_labels, d_flag;
  TRESOR_TRY(cuda(detail::ct_decode_launch(nullptr, image.voxels(), n, image.decode(), d_hu->as<int16_t>(), nullptr, nullptr)));
  if (labels) {
    auto b = DeviceBuffer::allocate(ordinal, labels->count());
    if (!b) return std::unexpected(b.error());
    d_labels = std::move(*b);
    auto f = DeviceBuffer::allocate(ordinal, sizeof(uint32_t));
    if (!f) return std::unexpected(f.error());
    d_flag = std::move(*f);
    TRESOR_TRY(cuda(detail::ct_decode_launch(nullptr, labels->voxels(), labels->count(), labels->decode(), nullptr, d_labels.as<uint8_t>(),
                                             d_flag.as<uint32_t>())));
  }
  TRESOR_TRY(cuda(gpu::detail::cuda_device_sync()));
  const size_t file_bytes = image.file.size() + (labels ? labels->file.size() : 0);
  image.file = {};
  if (labels) {
    labels->file = {};
    uint32_t flag = 0;  // one bit about the labels, as the CPU reader's refusal
    TRESOR_TRY(device.read_device(MutableByteSpan(reinterpret_cast<std::byte*>(&flag), sizeof flag), d_flag.as<std::byte>()));
    if (flag != 0) return std::unexpected(bad_labels(in.labels));
  }
  r.timings.upload_ms += ms_since(t);

  PrepTimings pt;
  auto dp = prepare_device(d_hu->as<int16_t>(), image.layout.dims, image.layout.spacing, labels ? d_labels.as<uint8_t>() : nullptr, o, &pt, ordinal);
  if (!dp) return std::unexpected(dp.error());
  const double upload = r.timings.upload_ms;
  r.timings = pt;
  r.timings.upload_ms = upload;
  const size_t decoded = d_hu->size() + d_labels.size() + d_flag.size();
  r.timings.peak_device_bytes = std::max(file_bytes + decoded, decoded + pt.peak_device_bytes);
  r.timings.device_used_bytes = 0;  // prepare_device's measure leaves out the decoded input and the file before it
  DeviceBuffer::reset_all({&*d_hu, &d_labels, &d_flag});

  t = std::chrono::steady_clock::now();
  const double s = o.spacing;
  auto image_shape = shape_of<float>(dp->dims, {s, s, s}, image.layout.origin);
  auto label_shape = shape_of<uint8_t>(dp->dims, {s, s, s}, labels ? labels->layout.origin : image.layout.origin);
  if (!out.dir.empty()) {
    OutputWriter w{device, channel, out, r};
    TRESOR_TRY(w.write("image.nii", image_shape, dp->image.as<std::byte>(), true));
    TRESOR_TRY(w.write("vesselness.nii", image_shape, dp->vesselness.as<std::byte>(), true));
    if (labels) TRESOR_TRY(w.write("labels.nii", label_shape, dp->labels.as<std::byte>(), true));
  }
  r.prepared.stats = dp->stats;
  r.prepared.image = image_shape;
  r.prepared.vesselness = image_shape;
  if (labels) r.prepared.labels = label_shape;
  if (out.to_host) {
    const size_t m = image_shape.size();
    r.prepared.image.data.resize(m);
    r.prepared.vesselness.data.resize(m);
    TRESOR_TRY(device.read_device(MutableByteSpan(reinterpret_cast<std::byte*>(r.prepared.image.data.data()), m * sizeof(float)), dp->image.as<std::byte>()));
    TRESOR_TRY(device.read_device(MutableByteSpan(reinterpret_cast<std::byte*>(r.prepared.vesselness.data.data()), m * sizeof(float)),
                                  dp->vesselness.as<std::byte>()));
    if (labels) {
      r.prepared.labels->data.resize(m);
      TRESOR_TRY(device.read_device(MutableByteSpan(reinterpret_cast<std::byte*>(r.prepared.labels->data.data()), m), dp->labels.as<std::byte>()));
    }
  }
  r.timings.download_ms = ms_since(t);
  return {};
}
#endif

}  // namespace

Result<SealedPrepared> prepare_sealed(ChannelDevice& device, const SealedCase& in, const sealed::KeyRing& keys, const tresor::ct::PrepOptions& o,
                                      const SealedPrepOutputs& out, ChannelOptions channel_options) {
  // The options first, as prepare checks them (the geometry's checks follow the header).
  TRESOR_TRY(detail::check_scales(o));
#ifndef TRESOR_HAVE_CUDA
  if (!device.host_memory()) return fail(ErrorCode::kUnavailable, "prep: this build has no CUDA support for device " + device.name());
#endif
  SecureChannel channel(device, channel_options);
  SealedPrepared r;
  const auto t = std::chrono::steady_clock::now();
  auto image = open_sealed(device, channel, in.image, keys, false, r.staged_bytes);
  if (!image) return std::unexpected(image.error());
  std::optional<Opened> labels;
  if (!in.labels.empty()) {
    auto l = open_sealed(device, channel, in.labels, keys, true, r.staged_bytes);
    if (!l) return std::unexpected(l.error());
    labels = std::move(*l);
    // prepare's check and message, on the headers' dimensions.
    const auto hu_shape = shape_of<int16_t>(image->layout.dims, {}, {});
    const auto label_shape = shape_of<uint8_t>(labels->layout.dims, {}, {});
    TRESOR_TRY(detail::check_labels(hu_shape, &label_shape));
  }
  r.input = image->layout;
  r.timings.upload_ms = ms_since(t);
  if (device.host_memory()) {
    TRESOR_TRY(run_on_host(device, channel, in, *image, labels, o, out, r));
  } else {
#ifdef TRESOR_HAVE_CUDA
    TRESOR_TRY(run_on_cuda(device, channel, in, *image, labels, o, out, r));
#endif
  }
  return r;
}

}  // namespace tresor::gpu::ct
