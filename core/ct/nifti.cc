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

#include "tresor/ct/nifti_hd.h"
#include "tresor/ct/volume.h"
#include "tresor/rn.h"
#include "tresor/io.h"

namespace tresor::ct {
namespace {

// The 352 bytes before the voxels: header and a 4-byte extension flag of zeros.
template <typename T>
Result<Bytes> encode_header(const Volume<T>& v, int datatype) {
  if (v.size() == 0) return fail(ErrorCode::kInvalidArgument, "nifti: the volume is empty");
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
  Bytes out(352);
  std::memcpy(out.data(), &hdr, sizeof hdr);
  return out;
}

template <typename T>
Result<Bytes> encode(const Volume<T>& v, int datatype) {
  if (v.data.size() != v.size() || v.size() == 0) return fail(ErrorCode::kInvalidArgument, "nifti: the volume is empty or its data does not match its dimensions");
  auto out = encode_header(v, datatype);
  if (!out) return out;
  out->resize(352 + v.data.size() * sizeof(T));
  std::memcpy(out->data() + 352, v.data.data(), v.data.size() * sizeof(T));
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

// The header at the start of `raw` through libnifti's own conversion (NIfTI-1 or -2, either byte
// order), with the voxels it promises inside a file of `file_size` bytes. No voxel is read.
Result<NimPtr> parse_header(ByteSpan raw, uint64_t file_size, const std::string& name) {
  nifti_set_debug_level(0);  // errors are reported here, once, with the file's name
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
  if (static_cast<uint64_t>(nim->nvox) > file_size || nim->nbyper > 16) {
    return fail(ErrorCode::kMalformed, name + ": the header promises " + std::to_string(nim->nvox) + " voxels of " + std::to_string(nim->nbyper) +
                                           " bytes but the file has " + std::to_string(file_size) + " bytes");
  }
  const auto offset = static_cast<uint64_t>(nim->iname_offset);
  const auto bytes = static_cast<uint64_t>(nim->nvox) * static_cast<uint64_t>(nim->nbyper);
  if (offset > file_size || file_size - offset < bytes) {
    return fail(ErrorCode::kMalformed, name + ": the header promises " + std::to_string(bytes) + " bytes of voxels from offset " + std::to_string(offset) +
                                           " but the file has " + std::to_string(file_size));
  }
  return nim;
}

// What the header says about the volume, checked: a single 3D volume of 1..65535 voxels per axis,
// positive spacing, a supported voxel type.
Result<NiftiVoxels> layout_of(const nifti_image& nim, const std::string& name, bool labels) {
  if (nim.ndim < 3 || (nim.ndim > 3 && nim.nt * nim.nu * nim.nv * nim.nw != 1)) {
    return fail(ErrorCode::kMalformed, name + ": a " + std::to_string(nim.ndim) + "-dimensional image, not a single 3D volume");
  }
  // Each axis 1..65535 voxels, and the three together exactly the voxels the header counts
  // (libnifti multiplies int64 dims without checking for overflow).
  for (int64_t n : {nim.nx, nim.ny, nim.nz}) {
    if (n < 1 || n > 65535) return fail(ErrorCode::kMalformed, name + ": an axis of " + std::to_string(n) + " voxels (1..65535 are read)");
  }
  if (nim.nx * nim.ny * nim.nz != nim.nvox) return fail(ErrorCode::kMalformed, name + ": the dimensions do not multiply to the voxel count");
  NiftiVoxels v;
  v.dims = {static_cast<size_t>(nim.nx), static_cast<size_t>(nim.ny), static_cast<size_t>(nim.nz)};
  v.spacing = {std::abs(nim.dx), std::abs(nim.dy), std::abs(nim.dz)};
  for (size_t i = 0; i < 3; ++i) {
    if (!(v.spacing[i] > 0) || v.dims[i] == 0) {
      return fail(ErrorCode::kMalformed, name + ": dimension " + std::to_string(i) + " has size " + std::to_string(v.dims[i]) + " and spacing " + std::to_string(v.spacing[i]));
    }
  }
  const double scale = nim.xyz_units == NIFTI_UNITS_METER ? 1000 : nim.xyz_units == NIFTI_UNITS_MICRON ? 0.001 : 1;
  for (auto& s : v.spacing) s *= scale;
  const nifti_dmat44& m = nim.sform_code > 0 ? nim.sto_xyz : nim.qto_xyz;
  v.origin = {-m.m[0][3] * scale, -m.m[1][3] * scale, m.m[2][3] * scale};
  // Labels are taken as stored (no scaling); HU and float volumes are scaled.
  v.slope = labels || nim.scl_slope == 0 || !std::isfinite(nim.scl_slope) ? 1 : nim.scl_slope;
  v.inter = labels || !std::isfinite(nim.scl_inter) ? 0 : nim.scl_inter;
  switch (nim.datatype) {
    case NIFTI_TYPE_INT16:
    case NIFTI_TYPE_UINT16:
    case NIFTI_TYPE_INT32:
    case NIFTI_TYPE_UINT8:
    case NIFTI_TYPE_INT8:
    case NIFTI_TYPE_FLOAT32:
    case NIFTI_TYPE_FLOAT64:
      break;
    default:
      return fail(ErrorCode::kMalformed, name + ": voxel type " + std::string(nifti_datatype_string(nim.datatype)) + " is not supported");
  }
  v.datatype = nim.datatype;
  v.bytes_per_voxel = static_cast<uint32_t>(nim.nbyper);
  v.swap = nim.byteorder != nifti_short_order() && nim.nbyper > 1;
  v.vox_offset = static_cast<uint64_t>(nim.iname_offset);
  return v;
}

bool is_gzip(ByteSpan raw) { return raw.size() >= 2 && raw[0] == std::byte{0x1F} && raw[1] == std::byte{0x8B}; }

// A whole file in memory (inflated first when it is a .nii.gz) and its layout.
Result<NiftiVoxels> parse(ByteSpan& raw, Bytes& inflated, const std::string& name, bool labels) {
  if (is_gzip(raw)) {
    auto z = gunzip(raw, name, size_t{8} << 30);
    if (!z) return std::unexpected(z.error());
    inflated = std::move(*z);
    raw = inflated;
  }
  auto nim = parse_header(raw, raw.size(), name);
  if (!nim) return std::unexpected(nim.error());
  return layout_of(**nim, name, labels);
}

// The voxels decoded by nifti_hd's rules (the code the GPU kernel runs), one pass per voxel type
// so that the type is a constant of the loop.
template <typename Out>
Result<Volume<Out>> to_volume(ByteSpan raw, const NiftiVoxels& l, const std::string& name, bool labels) {
  Volume<Out> v;
  v.dims = l.dims;
  v.spacing = l.spacing;
  v.origin = l.origin;
  v.data.resize(v.size());
  const auto* voxels = reinterpret_cast<const unsigned char*>(raw.data() + l.vox_offset);
  bool bad = false;
  auto decode_all = [&](auto type) {
    nifti_hd::Decode d{decltype(type)::value, l.bytes_per_voxel, l.swap, l.slope, l.inter};
    for (size_t i = 0; i < v.data.size(); ++i) {
      const double stored = nifti_hd::stored_value(voxels, i, d);
      if constexpr (std::is_same_v<Out, float>) {
        const double x = rn::dadd(rn::dmul(stored, d.slope), d.inter);
        bad |= !nifti_hd::finite(x);
        v.data[i] = static_cast<float>(x);
      } else if (labels) {
        uint8_t out = 0;
        bad |= !nifti_hd::label_value(stored, &out);
        v.data[i] = static_cast<Out>(out);
      } else {
        v.data[i] = static_cast<Out>(nifti_hd::hu_value(stored, d));
      }
    }
  };
  switch (l.datatype) {
    case nifti_hd::kInt16: decode_all(std::integral_constant<int32_t, nifti_hd::kInt16>{}); break;
    case nifti_hd::kUint16: decode_all(std::integral_constant<int32_t, nifti_hd::kUint16>{}); break;
    case nifti_hd::kInt32: decode_all(std::integral_constant<int32_t, nifti_hd::kInt32>{}); break;
    case nifti_hd::kUint8: decode_all(std::integral_constant<int32_t, nifti_hd::kUint8>{}); break;
    case nifti_hd::kInt8: decode_all(std::integral_constant<int32_t, nifti_hd::kInt8>{}); break;
    case nifti_hd::kFloat32: decode_all(std::integral_constant<int32_t, nifti_hd::kFloat32>{}); break;
    case nifti_hd::kFloat64: decode_all(std::integral_constant<int32_t, nifti_hd::kFloat64>{}); break;
    default: return fail(ErrorCode::kMalformed, name + ": voxel type " + std::to_string(l.datatype) + " is not supported");
  }
  if (bad && std::is_same_v<Out, float>) return fail(ErrorCode::kMalformed, name + ": a voxel that is not a finite number");
  if (bad) return fail(ErrorCode::kMalformed, name + ": a label volume with values that are not whole numbers 0..255");
  return v;
}

template <typename Out>
Result<Volume<Out>> read_any(ByteSpan raw, const std::string& name, bool labels) {
  Bytes inflated;
  auto l = parse(raw, inflated, name, labels);
  if (!l) return std::unexpected(l.error());
  return to_volume<Out>(raw, *l, name, labels);
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

Result<Bytes> nifti_header_bytes(const HuVolume& v) { return encode_header(v, NIFTI_TYPE_INT16); }
Result<Bytes> nifti_header_bytes(const LabelVolume& v) { return encode_header(v, NIFTI_TYPE_UINT8); }
Result<Bytes> nifti_header_bytes(const Volume<float>& v) { return encode_header(v, NIFTI_TYPE_FLOAT32); }
Result<Bytes> nifti_bytes(const HuVolume& v) { return encode(v, NIFTI_TYPE_INT16); }
Result<Bytes> nifti_bytes(const LabelVolume& v) { return encode(v, NIFTI_TYPE_UINT8); }
Result<Bytes> nifti_bytes(const Volume<float>& v) { return encode(v, NIFTI_TYPE_FLOAT32); }
Result<void> write_nifti(const std::string& path, const HuVolume& v) { return write_any(path, v, NIFTI_TYPE_INT16); }
Result<void> write_nifti(const std::string& path, const LabelVolume& v) { return write_any(path, v, NIFTI_TYPE_UINT8); }
Result<void> write_nifti(const std::string& path, const Volume<float>& v) { return write_any(path, v, NIFTI_TYPE_FLOAT32); }

Result<HuVolume> read_nifti_hu(ByteSpan bytes, const std::string& name) { return read_any<int16_t>(bytes, name, false); }
Result<LabelVolume> read_nifti_labels(ByteSpan bytes, const std::string& name) { return read_any<uint8_t>(bytes, name, true); }
Result<Volume<float>> read_nifti_float(ByteSpan bytes, const std::string& name) { return read_any<float>(bytes, name, false); }
namespace {
// to_volume on a file whose layout came from its header alone: the voxels must be in the bytes given.
template <typename Out>
Result<Volume<Out>> decode_checked(ByteSpan file, const NiftiVoxels& layout, const std::string& name, bool labels) {
  if (layout.vox_offset > file.size() || file.size() - layout.vox_offset < uint64_t{layout.dims[0]} * layout.dims[1] * layout.dims[2] * layout.bytes_per_voxel) {
    return fail(ErrorCode::kInvalidArgument, name + ": the voxels the header promises are not all in the bytes given");
  }
  return to_volume<Out>(file, layout, name, labels);
}
}  // namespace
Result<HuVolume> decode_nifti_hu(ByteSpan file, const NiftiVoxels& layout, const std::string& name) { return decode_checked<int16_t>(file, layout, name, false); }
Result<LabelVolume> decode_nifti_labels(ByteSpan file, const NiftiVoxels& layout, const std::string& name) {
  return decode_checked<uint8_t>(file, layout, name, true);
}
Result<NiftiVoxels> read_nifti_layout(ByteSpan head, uint64_t file_size, const std::string& name, bool labels) {
  if (is_gzip(head)) return fail(ErrorCode::kInvalidArgument, name + ": " + std::string(kNiftiCompressed));
  auto nim = parse_header(head, file_size, name);
  if (!nim) return std::unexpected(nim.error());
  return layout_of(**nim, name, labels);
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
