// NIfTI in and out (include/tresor/ct/volume.h). The header comes from libnifti (the NIfTI-1
// standard's 348-byte layout, its qform/sform rules); the bytes are written by Tresor's atomic
// output file, so that a failed write leaves nothing. Reading goes through libnifti's reader
// (NIfTI-1 and -2, .nii and .nii.gz) with every field Tresor relies on checked.
#include <algorithm>
#include <cmath>
#include <memory>
#include <cstring>

extern "C" {
#include <nifti2_io.h>
}

#include "tresor/ct/volume.h"
#include "tresor/io.h"

namespace tresor::ct {
namespace {

template <typename T>
Result<void> write_any(const std::string& path, const Volume<T>& v, int datatype) {
  if (v.data.size() != v.size() || v.size() == 0) return fail(ErrorCode::kInvalidArgument, path + ": the volume is empty or its data does not match its dimensions");
  const int64_t dims[8] = {3, static_cast<int64_t>(v.dims[0]), static_cast<int64_t>(v.dims[1]), static_cast<int64_t>(v.dims[2]), 1, 1, 1, 1};
  nifti_image* nim = nifti_make_new_nim(dims, datatype, 0);
  if (nim == nullptr) return fail(ErrorCode::kInvalidArgument, path + ": libnifti cannot describe this volume");
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
  if (converted != 0) return fail(ErrorCode::kInvalidArgument, path + ": libnifti cannot make a NIfTI-1 header for this volume");
  hdr.vox_offset = 352;  // the header, then a 4-byte extension flag of zeros
  std::memcpy(hdr.magic, "n+1\0", 4);
  auto out = AtomicOutputFile::create(path, 0644, /*overwrite=*/true);
  if (!out) return std::unexpected(out.error());
  TRESOR_TRY(out->write(ByteSpan(reinterpret_cast<const std::byte*>(&hdr), sizeof hdr)));
  const std::array<std::byte, 4> no_extension{};
  TRESOR_TRY(out->write(no_extension));
  TRESOR_TRY(out->write(ByteSpan(reinterpret_cast<const std::byte*>(v.data.data()), v.data.size() * sizeof(T))));
  return out->commit();
}

}  // namespace

Result<void> write_nifti(const std::string& path, const HuVolume& v) { return write_any(path, v, NIFTI_TYPE_INT16); }
Result<void> write_nifti(const std::string& path, const LabelVolume& v) { return write_any(path, v, NIFTI_TYPE_UINT8); }

Result<HuVolume> read_nifti_hu(const std::string& path) {
  nifti_set_debug_level(0);  // errors are reported here, once, with the file's name
  std::unique_ptr<nifti_image, void (*)(nifti_image*)> nim(nifti_image_read(path.c_str(), 1), nifti_image_free);
  if (!nim || nim->data == nullptr) return fail(ErrorCode::kMalformed, path + ": not a readable NIfTI-1 or NIfTI-2 file");
  if (nim->ndim < 3 || (nim->ndim > 3 && nim->nt * nim->nu * nim->nv * nim->nw != 1)) {
    return fail(ErrorCode::kMalformed, path + ": a " + std::to_string(nim->ndim) + "-dimensional image, not a single 3D volume");
  }
  HuVolume v;
  v.dims = {static_cast<size_t>(nim->nx), static_cast<size_t>(nim->ny), static_cast<size_t>(nim->nz)};
  v.spacing = {std::abs(nim->dx), std::abs(nim->dy), std::abs(nim->dz)};
  for (int i = 0; i < 3; ++i) {
    if (!(v.spacing[static_cast<size_t>(i)] > 0) || v.dims[static_cast<size_t>(i)] == 0) {
      return fail(ErrorCode::kMalformed, path + ": dimension " + std::to_string(i) + " has size " + std::to_string(v.dims[static_cast<size_t>(i)]) +
                                             " and spacing " + std::to_string(v.spacing[static_cast<size_t>(i)]));
    }
  }
  const double scale = nim->xyz_units == NIFTI_UNITS_METER ? 1000 : nim->xyz_units == NIFTI_UNITS_MICRON ? 0.001 : 1;
  for (auto& s : v.spacing) s *= scale;
  const nifti_dmat44& m = nim->sform_code > 0 ? nim->sto_xyz : nim->qto_xyz;
  v.origin = {-m.m[0][3] * scale, -m.m[1][3] * scale, m.m[2][3] * scale};
  const double slope = nim->scl_slope == 0 || !std::isfinite(nim->scl_slope) ? 1 : nim->scl_slope;
  const double inter = std::isfinite(nim->scl_inter) ? nim->scl_inter : 0;
  v.data.resize(v.size());
  auto put = [&](auto* src) {
    for (size_t i = 0; i < v.data.size(); ++i) {
      const double hu = static_cast<double>(src[i]) * slope + inter;
      v.data[i] = static_cast<int16_t>(std::clamp(std::lround(std::isfinite(hu) ? hu : 0.0), -32768L, 32767L));
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
      return fail(ErrorCode::kMalformed, path + ": voxel type " + std::string(nifti_datatype_string(nim->datatype)) + " is not supported");
  }
  return v;
}

}  // namespace tresor::ct
