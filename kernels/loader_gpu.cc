// The training data loader on the GPU (include/tresor/gpu/loader.h): the host side (files found,
// uploaded through the secure channel, headers checked, draws made with ct::PatchSampler::draw)
// and the kernels' CPU emulation (kernels/loader.cuh run voxel by voxel) for the host devices.
// Plain C++23 over the launch wrappers (kernels/loader_kernels.h); without CUDA in the build a
// device that is not host memory cannot exist, and the CUDA branches are compiled out.
#include "tresor/gpu/loader.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <utility>

#include "loader.cuh"
#include "tresor/io.h"

#include "cuda_result.h"
#ifdef TRESOR_HAVE_CUDA
#include "loader_kernels.h"
#endif

namespace tresor::gpu {
namespace {

using tresor::gpu::detail::cuda;

namespace fs = std::filesystem;
using loader::FlipChoice;
using loader::FillParams;
using loader::PatchParams;
using loader::SlotParams;
using loader::VolumeView;

template <typename T>
T field(ByteSpan h, size_t offset) {
  T v;
  std::memcpy(&v, h.data() + offset, sizeof v);
  return v;
}

const char* type_name(int datatype) { return datatype == kNiftiFloat32 ? "float32" : datatype == kNiftiUint8 ? "uint8" : "another type"; }

// `<dir>/<base>.nii` or `<base>.nii.sealed` (as tresor train's load_case looks for them); a
// compressed one is named, since the device cannot inflate it.
struct Found {
  std::string path;
  bool sealed = false;
};
Result<Found> find_file(const std::string& dir, const char* base) {
  std::error_code ec;
  for (const auto& [ext, sealed] : {std::pair{".nii", false}, {".nii.sealed", true}}) {
    const fs::path p = fs::path(dir) / (std::string(base) + ext);
    if (fs::is_regular_file(p, ec)) return Found{p.string(), sealed};
  }
  for (const char* ext : {".nii.gz", ".nii.gz.sealed"}) {
    const fs::path p = fs::path(dir) / (std::string(base) + ext);
    if (fs::is_regular_file(p, ec)) {
      return fail(ErrorCode::kInvalidArgument, p.string() + ": gzip-compressed; the GPU loader reads uncompressed .nii (as tresor prep writes it)");
    }
  }
  return fail(ErrorCode::kIo, dir + ": no " + base + ".nii or " + base + ".nii.sealed (a directory that tresor prep wrote)");
}

// A plain file into device memory: its bytes are plaintext on the host already.
Result<DeviceBuffer> upload_plain(ChannelDevice& device, const std::string& path) {
  auto in = FdFile::open_read(path);
  if (!in) return std::unexpected(in.error());
  auto size = in->size();
  if (!size) return std::unexpected(size.error());
  Bytes bytes(static_cast<size_t>(*size));
  if (!bytes.empty()) TRESOR_TRY(in->read_at(0, bytes));
  auto mem = device.device_alloc(std::max<size_t>(bytes.size(), 1));
  if (!mem) return std::unexpected(mem.error());
  DeviceBuffer buf(&device, *mem, 0, bytes.size());
  if (!bytes.empty()) TRESOR_TRY(device.write_device(mem->p, bytes));
  return buf;
}

// A device buffer of n zeroed bytes.
Result<DeviceBuffer> zeroed(ChannelDevice& device, size_t n) {
  auto mem = device.device_alloc(std::max<size_t>(n, 1));
  if (!mem) return std::unexpected(mem.error());
  DeviceBuffer buf(&device, *mem, 0, n);
  TRESOR_TRY(device.fill_device(mem->p, std::byte{0}, mem->n));
  return buf;
}

PatchParams params_of(const tresor::ct::PatchDraw& d) {
  PatchParams p;
  for (size_t a = 0; a < 3; ++a) {
    p.corner[a] = d.corner[a];
    p.flipped[a] = d.flipped[a] ? 1 : 0;
  }
  p.scale = d.scale;
  p.shift = d.shift;
  p.noise_sd = d.noise_sd;
  p.noise_state = d.noise_state;
  p.spatial = d.spatial ? 1 : 0;
  for (size_t k = 0; k < 9; ++k) p.affine[k] = d.affine[k];
  return p;
}

}  // namespace

Result<NiftiLayout> parse_nifti_header(ByteSpan h, uint64_t file_size, int want_datatype, const std::string& name) {
  auto bad = [&](const std::string& what) { return fail(ErrorCode::kMalformed, name + ": " + what); };
  if (h.size() < 348 || file_size < 348) return bad("the file has " + std::to_string(file_size) + " bytes, fewer than a NIfTI-1 header's 348");
  const int32_t sizeof_hdr = field<int32_t>(h, 0);
  const auto swapped = static_cast<int32_t>(__builtin_bswap32(static_cast<uint32_t>(sizeof_hdr)));
  if (sizeof_hdr == 540 || swapped == 540) return bad("sizeof_hdr is 540 (NIfTI-2); the GPU loader reads NIfTI-1, as tresor prep writes it");
  if (swapped == 348) return bad("sizeof_hdr is byte-swapped (big-endian); the GPU loader reads this machine's byte order only");
  if (sizeof_hdr != 348) return bad("sizeof_hdr is " + std::to_string(sizeof_hdr) + ", not 348 (not a NIfTI-1 header)");
  if (std::memcmp(h.data() + 344, "n+1\0", 4) != 0) {
    if (std::memcmp(h.data() + 344, "ni1\0", 4) == 0) return bad("magic is \"ni1\" (a .hdr/.img pair); the GPU loader reads single-file .nii");
    return bad("magic is not \"n+1\"");
  }
  const auto dim0 = field<int16_t>(h, 40);
  if (dim0 < 3 || dim0 > 7) return bad("dim[0] is " + std::to_string(dim0) + ", not 3..7");
  NiftiLayout l;
  for (int i = 1; i <= dim0; ++i) {
    const auto d = field<int16_t>(h, 40 + 2 * static_cast<size_t>(i));
    if (i <= 3) {
      if (d < 1) return bad("dim[" + std::to_string(i) + "] is " + std::to_string(d) + ", not 1..32767");
      l.dims[static_cast<size_t>(i - 1)] = static_cast<size_t>(d);
    } else if (d != 1) {
      return bad("dim[" + std::to_string(i) + "] is " + std::to_string(d) + ": not a single 3D volume");
    }
  }
  l.datatype = field<int16_t>(h, 70);
  if (l.datatype != want_datatype) {
    return bad("datatype is " + std::to_string(l.datatype) + ", want " + std::to_string(want_datatype) + " (" + type_name(want_datatype) + ")");
  }
  const int bytes_per = want_datatype == kNiftiFloat32 ? 4 : 1;
  const auto bitpix = field<int16_t>(h, 72);
  if (bitpix != 8 * bytes_per) return bad("bitpix is " + std::to_string(bitpix) + ", want " + std::to_string(8 * bytes_per) + " for " + type_name(want_datatype));
  const auto vox_offset = field<float>(h, 108);
  if (!(vox_offset >= 352 && vox_offset < 1e15f) || vox_offset != std::floor(vox_offset) || std::fmod(vox_offset, 4.0f) != 0) {
    return bad("vox_offset is " + std::to_string(vox_offset) + ", not a whole multiple of 4 from 352");
  }
  l.vox_offset = static_cast<uint64_t>(vox_offset);
  const uint64_t voxel_bytes = uint64_t{l.dims[0]} * l.dims[1] * l.dims[2] * static_cast<uint64_t>(bytes_per);
  if (l.vox_offset > file_size || file_size - l.vox_offset < voxel_bytes) {
    return bad("vox_offset " + std::to_string(l.vox_offset) + " and " + std::to_string(voxel_bytes) + " bytes of voxels pass the end of the file (" +
               std::to_string(file_size) + " bytes)");
  }
  // ct::read_nifti_float's rule (libnifti reads a non-finite slope or intercept as 0).
  const double slope = field<float>(h, 112), inter = field<float>(h, 116);
  l.slope = slope == 0 || !std::isfinite(slope) ? 1 : slope;
  l.inter = std::isfinite(inter) ? inter : 0;
  return l;
}

struct DeviceDataset::Case {
  std::string dir;
  std::array<size_t, 3> dims{};
  DeviceBuffer image, vesselness, labels;
  DeviceBuffer foreground;  // dims-product indices, then the count
  VolumeView view;
};

DeviceDataset::DeviceDataset(DeviceDataset&&) noexcept = default;
DeviceDataset& DeviceDataset::operator=(DeviceDataset&&) noexcept = default;
DeviceDataset::~DeviceDataset() = default;

const std::array<size_t, 3>& DeviceDataset::dims(size_t c) const { return cases_.at(c)->dims; }

Result<DeviceDataset> DeviceDataset::load(ChannelDevice& device, const std::vector<std::string>& case_dirs, const sealed::KeyRing& keys,
                                          const tresor::train::TrainerOptions& o, ChannelOptions channel_options) {
  if (case_dirs.empty()) return fail(ErrorCode::kInvalidArgument, "loader: no training case");
#ifndef TRESOR_HAVE_CUDA
  if (!device.host_memory()) return fail(ErrorCode::kUnavailable, "loader: this build has no CUDA support for device " + device.name());
#endif
  DeviceDataset ds;
  ds.device_ = &device;
  ds.options_ = o;
  ds.options_.collective = nullptr;
  // train::PatchSource's sampler options.
  ds.augment_ = tresor::train::sampler_options(o, true);
  SecureChannel channel(device, channel_options);

  for (const auto& dir : case_dirs) {
    auto c = std::make_unique<Case>();
    c->dir = dir;
    auto in_case = [&](const Error& e) { return fail(e.code, "loader: case " + dir + ": " + e.message); };
    NiftiLayout layouts[3];
    DeviceBuffer* into[3] = {&c->image, &c->vesselness, &c->labels};
    const char* bases[3] = {"image", "vesselness", "labels"};
    for (size_t k = 0; k < 3; ++k) {
      auto f = find_file(dir, bases[k]);
      if (!f) return in_case(f.error());
      auto buf = f->sealed ? channel.upload(f->path, keys) : upload_plain(device, f->path);
      if (!buf) return in_case(buf.error());
      // Only the header comes back: geometry, no voxel.
      Bytes header(std::min(buf->size(), kNiftiHeaderBytes));
      if (!header.empty()) {
        if (auto r = device.read_device(header, buf->data()); !r) return in_case(r.error());
      }
      auto l = parse_nifti_header(header, buf->size(), k == 2 ? kNiftiUint8 : kNiftiFloat32, f->path);
      if (!l) return in_case(l.error());
      layouts[k] = *l;
      *into[k] = std::move(*buf);
    }
    for (size_t k = 1; k < 3; ++k) {
      if (layouts[k].dims != layouts[0].dims) {
        auto str = [](const std::array<size_t, 3>& d) { return std::to_string(d[0]) + "×" + std::to_string(d[1]) + "×" + std::to_string(d[2]); };
        return fail(ErrorCode::kInvalidArgument, "loader: case " + dir + ": " + bases[k] + " is " + str(layouts[k].dims) + " voxels but image is " +
                                                     str(layouts[0].dims));
      }
    }
    c->dims = layouts[0].dims;
    if (auto r = tresor::ct::PatchSampler::check(ds.augment_, c->dims); !r) return in_case(r.error());
    const uint64_t n = uint64_t{c->dims[0]} * c->dims[1] * c->dims[2];
    // The foreground list holds 32-bit voxel indices.
    if (n >= (uint64_t{1} << 32)) return in_case(Error{ErrorCode::kInvalidArgument, std::to_string(n) + " voxels: the loader takes fewer than 2^32 per volume"});

    VolumeView& v = c->view;
    v.image = reinterpret_cast<const float*>(c->image.data() + layouts[0].vox_offset);
    v.vesselness = reinterpret_cast<const float*>(c->vesselness.data() + layouts[1].vox_offset);
    v.labels = reinterpret_cast<const uint8_t*>(c->labels.data() + layouts[2].vox_offset);
    v.image_slope = layouts[0].slope;
    v.image_inter = layouts[0].inter;
    v.vessel_slope = layouts[1].slope;
    v.vessel_inter = layouts[1].inter;
    v.nx = c->dims[0];
    v.ny = c->dims[1];
    v.nz = c->dims[2];

    // The foreground list: n indices at most, then its length, all in device memory.
    auto fg = zeroed(device, static_cast<size_t>(n + 1) * sizeof(uint32_t));
    if (!fg) return in_case(fg.error());
    c->foreground = std::move(*fg);
    auto* list = reinterpret_cast<uint32_t*>(c->foreground.data());
    v.foreground = list;
    v.foreground_count = list + n;

    bool not_finite[2] = {false, false};
    if (device.host_memory()) {
      // The kernels' thread ranges in order: each writes its indices after the ones before it.
      uint32_t offset = 0;
      for (uint64_t begin = 0; begin < n; begin += loader::kCompactPerThread) {
        const uint64_t end = std::min<uint64_t>(begin + loader::kCompactPerThread, n);
        loader::write_range(v.labels, begin, end, o.foreground_label, list, offset);
        offset += loader::count_range(v.labels, begin, end, o.foreground_label);
      }
      list[n] = offset;
      for (uint64_t i = 0; i < n; ++i) {
        not_finite[0] = not_finite[0] || !loader::finite_voxel(v.image, i, v.image_slope, v.image_inter);
        not_finite[1] = not_finite[1] || !loader::finite_voxel(v.vesselness, i, v.vessel_slope, v.vessel_inter);
      }
    } else {
#ifdef TRESOR_HAVE_CUDA
      namespace ld = loader::detail;
      const uint64_t blocks = ld::loader_compact_blocks(n);
      auto scratch = zeroed(device, static_cast<size_t>(2 * blocks + 2) * sizeof(uint32_t));
      if (!scratch) return in_case(scratch.error());
      auto* s = reinterpret_cast<uint32_t*>(scratch->data());
      auto run = [&]() -> Result<void> {
        TRESOR_TRY(cuda(ld::loader_select_device(v.labels)));
        TRESOR_TRY(cuda(ld::loader_compact_launch(nullptr, v.labels, n, o.foreground_label, s, s + blocks, list, list + n)));
        TRESOR_TRY(cuda(ld::loader_finite_launch(nullptr, v.image, n, v.image_slope, v.image_inter, s + 2 * blocks)));
        TRESOR_TRY(cuda(ld::loader_finite_launch(nullptr, v.vesselness, n, v.vessel_slope, v.vessel_inter, s + 2 * blocks + 1)));
        return cuda(ld::loader_stream_sync(nullptr));
      };
      if (auto r = run(); !r) return in_case(r.error());
      uint32_t flags[2] = {0, 0};
      if (auto r = device.read_device(MutableByteSpan(reinterpret_cast<std::byte*>(flags), sizeof flags), reinterpret_cast<const std::byte*>(s + 2 * blocks));
          !r) {
        return in_case(r.error());
      }
      not_finite[0] = flags[0] != 0;
      not_finite[1] = flags[1] != 0;
#endif
    }
    for (size_t k = 0; k < 2; ++k) {
      if (not_finite[k]) return fail(ErrorCode::kMalformed, "loader: case " + dir + ": " + bases[k] + ": a voxel that is not a finite number");
    }
    ds.cases_.push_back(std::move(c));
  }
  const uint64_t P = o.patch;
  auto scratch = zeroed(device, static_cast<size_t>(o.batch * P * P * P) * sizeof(float));
  if (!scratch) return fail(scratch.error().code, "loader: working buffers: " + scratch.error().message);
  ds.scratch_ = std::move(*scratch);
  return ds;
}

Result<void> DeviceDataset::fill_step(size_t step, size_t lo, size_t hi, float* d_x, uint8_t* d_y, void* stream) const {
  if (lo > hi || hi > options_.batch) {
    return fail(ErrorCode::kInvalidArgument, "loader: slots " + std::to_string(lo) + ".." + std::to_string(hi) + " are not within a batch of " +
                                                 std::to_string(options_.batch));
  }
  if (lo == hi) return {};
  if (d_x == nullptr || d_y == nullptr) return fail(ErrorCode::kInvalidArgument, "loader: a null output buffer");
  const uint64_t P = options_.patch, m = P * P * P;
  FillParams f;
  f.patch = P;
  f.vesselness_scale = static_cast<float>(options_.vesselness_scale);
  f.foreground_label = options_.foreground_label;
#ifdef TRESOR_HAVE_CUDA
  if (!device_->host_memory()) TRESOR_TRY(cuda(loader::detail::loader_select_device(d_x)));
#else
  (void)stream;
#endif
  for (size_t b = lo; b < hi; ++b) {
    // PatchSource::fill_step's case and patch index for this slot.
    const uint64_t g = uint64_t{step} * options_.batch + b;
    const Case& c = *cases_[static_cast<size_t>(g % cases_.size())];
    const tresor::ct::PatchDraw with_fg = tresor::ct::PatchSampler::draw(augment_, c.dims, true, options_.seed, g);
    const tresor::ct::PatchDraw without = tresor::ct::PatchSampler::draw(augment_, c.dims, false, options_.seed, g);
    SlotParams s;
    s.want_foreground = with_fg.want_foreground ? 1 : 0;
    s.foreground_draw = with_fg.foreground_draw;
    s.from_foreground = params_of(with_fg);
    s.random = params_of(without);
    const size_t slot = b - lo;
    float* image = d_x + (slot * 2 + 0) * m;
    float* vesselness = d_x + (slot * 2 + 1) * m;
    uint8_t* target = d_y + slot * m;
    // The blur, contrast, low resolution and gammas come from the spatial transform's stream,
    // which the foreground choice does not touch: both outcomes draw the same values, and only the
    // host needs them.
    tresor::ct::augment_hd::PatchFinish finish = without.finish();
    // The flips depend on the outcome (they are drawn after the foreground choice's draws); the
    // device resolves them as it resolves the outcome.
    FlipChoice flips;
    flips.foreground_count = c.view.foreground_count;
    flips.want_foreground = s.want_foreground;
    flips.from_foreground = loader::flip_bits(s.from_foreground);
    flips.random = loader::flip_bits(s.random);
    float* scratch = reinterpret_cast<float*>(scratch_.data()) + b * m;
    if (device_->host_memory()) {
      uint64_t corner[3];
      const PatchParams& p = loader::resolve_patch(c.view, s, P, corner);
      for (uint64_t i = 0; i < m; ++i) loader::fill_voxel(c.view, p, corner, f, i, image, vesselness, target);
      const uint64_t n[3] = {P, P, P};
      finish.flipped = loader::resolve_flips(flips);
      if (finish.any()) tresor::ct::augment_hd::finish_patch(image, n, finish, scratch);
    } else {
#ifdef TRESOR_HAVE_CUDA
      TRESOR_TRY(cuda(loader::detail::loader_fill_launch(stream, c.view, s, f, image, vesselness, target)));
      if (finish.any()) TRESOR_TRY(cuda(loader::detail::loader_finish_launch(stream, image, scratch, P, finish, flips)));
#endif
    }
  }
  return {};
}

Result<std::vector<uint32_t>> DeviceDataset::foreground_to_host(size_t c) const {
  const Case& k = *cases_.at(c);
  const size_t n = k.dims[0] * k.dims[1] * k.dims[2];
  uint32_t count = 0;
  TRESOR_TRY(device_->read_device(MutableByteSpan(reinterpret_cast<std::byte*>(&count), sizeof count), k.foreground.data() + n * sizeof(uint32_t)));
  std::vector<uint32_t> out(count);
  if (count > 0) TRESOR_TRY(device_->read_device(MutableByteSpan(reinterpret_cast<std::byte*>(out.data()), count * sizeof(uint32_t)), k.foreground.data()));
  return out;
}

}  // namespace tresor::gpu
