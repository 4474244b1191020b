// NIfTI in and out (include/tresor/ct/volume.h). The header comes from libnifti (the NIfTI-1
// standard's 348-byte layout, its qform/sform rules); the bytes are written by Tresor's atomic
// output file, so that a failed write leaves nothing. Reading works on bytes in memory (a sealed
// volume is opened into memory, never into a file): gzip inflated by zlib, the header converted
// by libnifti (NIfTI-1 and -2, either byte order), the voxels bounds-checked and byte-swapped here.
#include <algorithm>
#include <cmath>
#include <memory>
#include <type_traits>
#include <cstdlib>
#include <cstring>

#include <zlib.h>

extern "C" {
#include <nifti2_io.h>
}

#include "tresor/ct/volume.h"
#include "tresor/io.h"

namespace tresor::ct {
namespace {

template <typename T>
Result<Bytes> encode(const Volume<T>& v, int datatype) {
  if (v.data.size() != v.size() || v.size() == 0) return fail(ErrorCode::kInvalidArgument, "nifti: the volume is empty or its data does not match its dimensions");
  const int64_t dims[8] = {3, static_cast<int64_t>(v.dims[0]), static_cast<int64_t>(v.dims[1]), static_cast<int64_t>(v.dims[2]), 1, 1, 1, 1};
  nifti_image* nim = nifti_make_new_nim(dims, datatype, 0);
  if (nim == nullptr) return fail(ErrorCode::kInvalidArgument, "nifti: libnifti cannot describe this volume");
  nim->dx = v.spacing[0];
  nim->dy = v.spacing[1];
  nim->dz = v.spacing[2];
  nim->pixdim[1] = v.spacing[0];
  nim->pixdim[2] = v.spacing[1];
  nim->pixdim[3] = v.spacing[2];
  nim->xyz_units = NIFTI_UNITS_MM;
  nim->scl_slope = 1;
  nim->scl_inter = 0;
  // Voxel (i, j, k) at origin + spacing · (i, j, k) in LPS; NIfTI's world frame is RAS, so x and y
  // flip sign.
  nim->qform_code = NIFTI_XFORM_SCANNER_ANAT;
  nim->sform_code = NIFTI_XFORM_SCANNER_ANAT;
  nim->quatern_b = 0;
  nim->quatern_c = 0;
  nim->quatern_d = 1;  // 180° about z: x → −x, y → −y
  nim->qfac = 1;
  nim->qoffset_x = static_cast<float>(-v.origin[0]);
  nim->qoffset_y = static_cast<float>(-v.origin[1]);
  nim->qoffset_z = static_cast<float>(v.origin[2]);
  nim->qto_xyz = nifti_quatern_to_dmat44(nim->quatern_b, nim->quatern_c, nim->quatern_d, nim->qoffset_x, nim->qoffset_y, nim->qoffset_z,
                                         nim->dx, nim->dy, nim->dz, nim->qfac);
  nim->sto_xyz = nim->qto_xyz;
  nim->nifti_type = NIFTI_FTYPE_NIFTI1_1;
  nifti_1_header hdr{};
  const int converted = nifti_convert_nim2n1hdr(nim, &hdr);
  nifti_image_free(nim);
  if (converted != 0) return fail(ErrorCode::kInvalidArgument, "nifti: libnifti cannot make a NIfTI-1 header for this volume");
  hdr.vox_offset = 352;  // the header, then a 4-byte extension flag of zeros
  std::memcpy(hdr.magic, "n+1\0", 4);
  Bytes out(352 + v.data.size() * sizeof(T));
  std::memcpy(out.data(), &hdr, sizeof hdr);
  std::memcpy(out.data() + 352, v.data.data(), v.data.size() * sizeof(T));
  return out;
}

template <typename T>
Result<void> write_any(const std::string& path, const Volume<T>& v, int datatype) {
  auto bytes = encode(v, datatype);
  if (!bytes) return fail(bytes.error().code, path + ": " + bytes.error().message);
  auto out = AtomicOutputFile::create(path, 0644, /*overwrite=*/true);
  if (!out) return std::unexpected(out.error());
  TRESOR_TRY(out->write(*bytes));
  return out->commit();
}

// gzip (a .nii.gz) inflated in memory, at most `limit` bytes.
Result<Bytes> gunzip(ByteSpan in, const std::string& name, size_t limit) {
  z_stream z{};
  if (inflateInit2(&z, 16 + MAX_WBITS) != Z_OK) return fail(ErrorCode::kMalformed, name + ": zlib cannot start");
  Bytes out(std::max<size_t>(in.size() * 4, 1 << 20));
  z.next_in = reinterpret_cast<Bytef*>(const_cast<std::byte*>(in.data()));
  z.avail_in = static_cast<uInt>(std::min<size_t>(in.size(), 0xFFFFFFFFu));
  int rc = Z_OK;
  while (rc == Z_OK) {
    if (z.total_out == out.size()) {
      if (out.size() >= limit) {
        inflateEnd(&z);
        return fail(ErrorCode::kMalformed, name + ": inflates to more than " + std::to_string(limit >> 20) + " MiB");
      }
      out.resize(std::min(out.size() * 2, limit));
    }
    z.next_out = reinterpret_cast<Bytef*>(out.data() + z.total_out);
    z.avail_out = static_cast<uInt>(std::min<size_t>(out.size() - z.total_out, 0xFFFFFFFFu));
    rc = inflate(&z, Z_NO_FLUSH);
  }
  const size_t n = z.total_out;
  inflateEnd(&z);
  if (rc != Z_STREAM_END) return fail(ErrorCode::kMalformed, name + ": the gzip stream is corrupt or truncated");
  out.resize(n);
  return out;
}

using NimPtr = std::unique_ptr<nifti_image, void (*)(nifti_image*)>;

// The header through libnifti's own conversion (NIfTI-1 or -2, either byte order), the voxels
// from the bytes after vox_offset, swapped to this machine's order.
Result<NimPtr> parse(ByteSpan raw, const std::string& name) {
  nifti_set_debug_level(0);  // errors are reported here, once, with the file's name
  Bytes inflated;
  if (raw.size() >= 2 && raw[0] == std::byte{0x1F} && raw[1] == std::byte{0x8B}) {
    auto z = gunzip(raw, name, size_t{8} << 30);
    if (!z) return std::unexpected(z.error());
    inflated = std::move(*z);
    raw = inflated;
  }
  NimPtr nim(nullptr, nifti_image_free);
  int32_t sizeof_hdr = 0;
  if (raw.size() >= 4) std::memcpy(&sizeof_hdr, raw.data(), 4);
  const int32_t swapped = static_cast<int32_t>(__builtin_bswap32(static_cast<uint32_t>(sizeof_hdr)));
  // libnifti's conversion trusts dim[0] and writes dim[2..dim[0]] into its 8-element array on
  // the stack (found by nifti_fuzz): dim[0], in the header's byte order, must be 1..7 before
  // libnifti sees the header. Everything else the conversion yields is checked below.
  const bool swap = sizeof_hdr != 348 && sizeof_hdr != 540;
  if ((sizeof_hdr == 348 || swapped == 348) && raw.size() >= sizeof(nifti_1_header)) {
    nifti_1_header h;
    std::memcpy(&h, raw.data(), sizeof h);
    const int16_t dim0 = swap ? static_cast<int16_t>(__builtin_bswap16(static_cast<uint16_t>(h.dim[0]))) : h.dim[0];
    if (dim0 < 1 || dim0 > 7) return fail(ErrorCode::kMalformed, name + ": dim[0] is " + std::to_string(dim0) + ", not 1..7");
    if (std::memcmp(h.magic, "n+1", 4) == 0) nim.reset(nifti_convert_n1hdr2nim(h, name.c_str()));
  } else if ((sizeof_hdr == 540 || swapped == 540) && raw.size() >= sizeof(nifti_2_header)) {
    nifti_2_header h;
    std::memcpy(&h, raw.data(), sizeof h);
    const int64_t dim0 = swap ? static_cast<int64_t>(__builtin_bswap64(static_cast<uint64_t>(h.dim[0]))) : h.dim[0];
    if (dim0 < 1 || dim0 > 7) return fail(ErrorCode::kMalformed, name + ": dim[0] is " + std::to_string(dim0) + ", not 1..7");
    if (std::memcmp(h.magic, "n+2", 3) == 0) nim.reset(nifti_convert_n2hdr2nim(h, name.c_str()));
  }
  if (!nim) return fail(ErrorCode::kMalformed, name + ": not a readable NIfTI-1 or NIfTI-2 file (single-file .nii or .nii.gz)");
  if (nim->nbyper <= 0 || nim->nvox <= 0 || nim->iname_offset < 0) return fail(ErrorCode::kMalformed, name + ": the header describes no voxels");
  if (static_cast<uint64_t>(nim->nvox) > raw.size() || nim->nbyper > 16) {
    return fail(ErrorCode::kMalformed, name + ": the header promises " + std::to_string(nim->nvox) + " voxels of " + std::to_string(nim->nbyper) +
                                           " bytes but the file has " + std::to_string(raw.size()) + " bytes");
  }
  const auto offset = static_cast<size_t>(nim->iname_offset);
  const auto bytes = static_cast<size_t>(nim->nvox) * static_cast<size_t>(nim->nbyper);
  if (offset > raw.size() || raw.size() - offset < bytes) {
    return fail(ErrorCode::kMalformed, name + ": the header promises " + std::to_string(bytes) + " bytes of voxels from offset " + std::to_string(offset) +
                                           " but the file has " + std::to_string(raw.size()));
  }
  nim->data = std::malloc(bytes);
  if (nim->data == nullptr) return fail(ErrorCode::kIo, name + ": out of memory for the voxels");
  std::memcpy(nim->data, raw.data() + offset, bytes);
  if (nim->byteorder != nifti_short_order() && nim->swapsize > 1) nifti_swap_Nbytes(static_cast<int64_t>(nim->nvox), nim->swapsize, nim->data);
  return nim;
}

template <typename Out>
Result<Volume<Out>> to_volume(const NimPtr& nim, const std::string& name, bool labels) {
  constexpr bool kFloat = std::is_same_v<Out, float>;
  if (nim->ndim < 3 || (nim->ndim > 3 && nim->nt * nim->nu * nim->nv * nim->nw != 1)) {
    return fail(ErrorCode::kMalformed, name + ": a " + std::to_string(nim->ndim) + "-dimensional image, not a single 3D volume");
  }
  // Each axis 1..65535 voxels, and the three together exactly the voxels the header counts
  // (libnifti multiplies int64 dims without checking for overflow).
  for (int64_t n : {nim->nx, nim->ny, nim->nz}) {
    if (n < 1 || n > 65535) return fail(ErrorCode::kMalformed, name + ": an axis of " + std::to_string(n) + " voxels (1..65535 are read)");
  }
  if (nim->nx * nim->ny * nim->nz != nim->nvox) return fail(ErrorCode::kMalformed, name + ": the dimensions do not multiply to the voxel count");
  Volume<Out> v;
  v.dims = {static_cast<size_t>(nim->nx), static_cast<size_t>(nim->ny), static_cast<size_t>(nim->nz)};
  v.spacing = {std::abs(nim->dx), std::abs(nim->dy), std::abs(nim->dz)};
  for (size_t i = 0; i < 3; ++i) {
    if (!(v.spacing[i] > 0) || v.dims[i] == 0) {
      return fail(ErrorCode::kMalformed, name + ": dimension " + std::to_string(i) + " has size " + std::to_string(v.dims[i]) + " and spacing " + std::to_string(v.spacing[i]));
    }
  }
  const double scale = nim->xyz_units == NIFTI_UNITS_METER ? 1000 : nim->xyz_units == NIFTI_UNITS_MICRON ? 0.001 : 1;
  for (auto& s : v.spacing) s *= scale;
  const nifti_dmat44& m = nim->sform_code > 0 ? nim->sto_xyz : nim->qto_xyz;
  v.origin = {-m.m[0][3] * scale, -m.m[1][3] * scale, m.m[2][3] * scale};
  // Labels are taken as stored (no scaling) and must be whole numbers 0..255; HU are scaled,
  // rounded and clamped to int16.
  const double slope = labels || nim->scl_slope == 0 || !std::isfinite(nim->scl_slope) ? 1 : nim->scl_slope;
  const double inter = labels || !std::isfinite(nim->scl_inter) ? 0 : nim->scl_inter;
  v.data.resize(v.size());
  bool bad_label = false;
  auto put = [&](auto* src) {
    for (size_t i = 0; i < v.data.size(); ++i) {
      const double x = static_cast<double>(src[i]) * slope + inter;
      if constexpr (kFloat) {
        bad_label |= !std::isfinite(x);
        v.data[i] = static_cast<Out>(x);
      } else if (labels) {
        bad_label |= !(x >= 0 && x <= 255 && x == std::floor(x));
        v.data[i] = static_cast<Out>(std::isfinite(x) ? std::clamp(x, 0.0, 255.0) : 0.0);
      } else {
        v.data[i] = static_cast<Out>(std::clamp(std::lround(std::isfinite(x) ? x : 0.0), -32768L, 32767L));
      }
    }
  };
  switch (nim->datatype) {
    case NIFTI_TYPE_INT16: put(static_cast<const int16_t*>(nim->data)); break;
    case NIFTI_TYPE_UINT16: put(static_cast<const uint16_t*>(nim->data)); break;
    case NIFTI_TYPE_INT32: put(static_cast<const int32_t*>(nim->data)); break;
    case NIFTI_TYPE_UINT8: put(static_cast<const uint8_t*>(nim->data)); break;
    case NIFTI_TYPE_INT8: put(static_cast<const int8_t*>(nim->data)); break;
    case NIFTI_TYPE_FLOAT32: put(static_cast<const float*>(nim->data)); break;
    case NIFTI_TYPE_FLOAT64: put(static_cast<const double*>(nim->data)); break;
    default:
      return fail(ErrorCode::kMalformed, name + ": voxel type " + std::string(nifti_datatype_string(nim->datatype)) + " is not supported");
  }
  if (bad_label && kFloat) return fail(ErrorCode::kMalformed, name + ": a voxel that is not a finite number");
  if (bad_label) return fail(ErrorCode::kMalformed, name + ": a label volume with values that are not whole numbers 0..255");
  return v;
}

Result<Bytes> read_whole(const std::string& path) {
  auto in = FdFile::open_read(path);
  if (!in) return std::unexpected(in.error());
  Bytes all;
  if (auto size = in->size()) all.reserve(static_cast<size_t>(*size));
  std::array<std::byte, 1 << 16> buf;
  for (;;) {
    auto n = in->read(buf);
    if (!n) return std::unexpected(n.error());
    if (*n == 0) break;
    all.insert(all.end(), buf.begin(), buf.begin() + static_cast<std::ptrdiff_t>(*n));
  }
  return all;
}

}  // namespace

Result<Bytes> nifti_bytes(const HuVolume& v) { return encode(v, NIFTI_TYPE_INT16); }
Result<Bytes> nifti_bytes(const LabelVolume& v) { return encode(v, NIFTI_TYPE_UINT8); }
Result<Bytes> nifti_bytes(const Volume<float>& v) { return encode(v, NIFTI_TYPE_FLOAT32); }
Result<void> write_nifti(const std::string& path, const HuVolume& v) { return write_any(path, v, NIFTI_TYPE_INT16); }
Result<void> write_nifti(const std::string& path, const LabelVolume& v) { return write_any(path, v, NIFTI_TYPE_UINT8); }
Result<void> write_nifti(const std::string& path, const Volume<float>& v) { return write_any(path, v, NIFTI_TYPE_FLOAT32); }

Result<HuVolume> read_nifti_hu(ByteSpan bytes, const std::string& name) {
  auto nim = parse(bytes, name);
  if (!nim) return std::unexpected(nim.error());
  return to_volume<int16_t>(*nim, name, false);
}
Result<LabelVolume> read_nifti_labels(ByteSpan bytes, const std::string& name) {
  auto nim = parse(bytes, name);
  if (!nim) return std::unexpected(nim.error());
  return to_volume<uint8_t>(*nim, name, true);
}
Result<Volume<float>> read_nifti_float(ByteSpan bytes, const std::string& name) {
  auto nim = parse(bytes, name);
  if (!nim) return std::unexpected(nim.error());
  return to_volume<float>(*nim, name, false);
}
Result<HuVolume> read_nifti_hu(const std::string& path) {
  auto b = read_whole(path);
  if (!b) return std::unexpected(b.error());
  return read_nifti_hu(*b, path);
}
Result<LabelVolume> read_nifti_labels(const std::string& path) {
  auto b = read_whole(path);
  if (!b) return std::unexpected(b.error());
  return read_nifti_labels(*b, path);
}

}  // namespace tresor::ct
