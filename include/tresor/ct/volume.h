// tresor/ct/volume.h — 3D CT volumes and the coronary CT angiography phantom (issue 8,
// docs/preprocessing.md): HU volumes, label volumes, vessel centerlines; NIfTI-1 in and out.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "tresor/encoding.h"
#include "tresor/error.h"

namespace tresor::sealed {
struct KeyRing;
}

namespace tresor::ct {

/// A volume in x-fastest order (index = x + nx·(y + ny·z)); spacing and origin in mm, axes along
/// the patient's left (x), posterior (y) and superior (z) directions (NIfTI's RAS flipped in x and
/// y, as DICOM's LPS).
template <typename T>
struct Volume {
  std::array<size_t, 3> dims{0, 0, 0};
  std::array<double, 3> spacing{1, 1, 1};
  std::array<double, 3> origin{0, 0, 0};
  std::vector<T> data;

  size_t size() const { return dims[0] * dims[1] * dims[2]; }
  size_t index(size_t x, size_t y, size_t z) const { return x + dims[0] * (y + dims[1] * z); }
  T& at(size_t x, size_t y, size_t z) { return data[index(x, y, z)]; }
  const T& at(size_t x, size_t y, size_t z) const { return data[index(x, y, z)]; }
};
using HuVolume = Volume<int16_t>;
using LabelVolume = Volume<uint8_t>;

/// The phantom's tissue labels (the label volume's values).
enum Label : uint8_t {
  kBody = 0,        // soft tissue and air outside the body share 0; HU tells them apart
  kBloodPool = 1,   // contrast-filled heart chambers
  kMyocardium = 2,
  kAorta = 3,       // ascending and descending, contrast-filled
  kLung = 4,
  kBone = 5,        // spine and sternum
  kFat = 6,         // subcutaneous and epicardial
  kCoronary = 7,    // the contrast-filled coronary lumen
};

struct Centerline {
  std::string name;                             // "LAD", "LCx", "RCA", "D1", "OM1", "PDA"
  std::vector<std::array<double, 3>> points;    // mm, in the volume's frame
  std::vector<double> radius;                   // mm, lumen radius at each point (stenoses included)
  std::vector<double> healthy_radius;           // mm, without the stenoses
};

struct PhantomOptions {
  uint64_t seed = 1;
  std::array<size_t, 3> dims{512, 512, 256};
  std::array<double, 3> spacing{0.39, 0.39, 0.625};
  double noise_hu = 18;          // Gaussian noise, standard deviation
  double blur_mm = 0.45;         // partial-volume blur (Gaussian sigma) applied to the HU volume
  unsigned stenoses = 3;         // narrowings placed on the main vessels
};

struct Phantom {
  HuVolume hu;
  LabelVolume labels;
  std::vector<Centerline> centerlines;
  /// Each stenosis: the vessel, the fraction of its length where it sits, and the radius kept.
  struct Stenosis {
    std::string vessel;
    double at = 0;
    double remaining = 1;
  };
  std::vector<Stenosis> stenoses;
};

/// A synthetic coronary CT angiography volume with its ground truth, deterministic in `options`
/// (the same options give the same bytes). kInvalidArgument names a dimension or spacing out of
/// range (16..1024 voxels, 0.1..5 mm) or a field of view too small for the heart (< 120 mm).
[[nodiscard]] Result<Phantom> make_phantom(const PhantomOptions& options);

/// NIfTI-1 (.nii) written through libnifti's header conversion, atomically (the file is named only
/// when complete). HU as int16 with slope 1, labels as uint8, float volumes as float32; qform and
/// sform from spacing and origin, units mm. nifti_bytes: the same file's bytes.
[[nodiscard]] Result<void> write_nifti(const std::string& path, const HuVolume& v);
[[nodiscard]] Result<void> write_nifti(const std::string& path, const LabelVolume& v);
[[nodiscard]] Result<void> write_nifti(const std::string& path, const Volume<float>& v);
[[nodiscard]] Result<Bytes> nifti_bytes(const HuVolume& v);
[[nodiscard]] Result<Bytes> nifti_bytes(const LabelVolume& v);
[[nodiscard]] Result<Bytes> nifti_bytes(const Volume<float>& v);
/// nifti_bytes(v)'s first 352 bytes (the header and its 4-byte extension flag; the voxels follow
/// them), from v's dimensions, spacing and origin alone — its data is not read and may be empty:
/// what precedes voxels that lie elsewhere (in device memory, sealed there).
[[nodiscard]] Result<Bytes> nifti_header_bytes(const HuVolume& v);
[[nodiscard]] Result<Bytes> nifti_header_bytes(const LabelVolume& v);
[[nodiscard]] Result<Bytes> nifti_header_bytes(const Volume<float>& v);
inline constexpr size_t kNiftiWrittenHeader = 352;
/// Reads a single-file NIfTI-1 or -2 volume (.nii, or gzip-compressed .nii.gz) of any integer or
/// float type into HU (slope and intercept applied, rounded, clamped to int16). Errors name the
/// file (or `name`) and the field. From bytes: what a sealed volume opens into.
[[nodiscard]] Result<HuVolume> read_nifti_hu(const std::string& path);
[[nodiscard]] Result<HuVolume> read_nifti_hu(ByteSpan bytes, const std::string& name);
/// A float volume (slope and intercept applied, every voxel finite): `tresor prep`'s outputs.
[[nodiscard]] Result<Volume<float>> read_nifti_float(ByteSpan bytes, const std::string& name);
/// A label volume: values as stored (no scaling), whole numbers 0..255 or kMalformed.
[[nodiscard]] Result<LabelVolume> read_nifti_labels(const std::string& path);
[[nodiscard]] Result<LabelVolume> read_nifti_labels(ByteSpan bytes, const std::string& name);

/// Where a NIfTI file's voxels are and how to read them, from its header alone: what a reader needs
/// that does not hold the voxels itself (the GPU path decodes them in device memory, where the
/// secure channel leaves them; tresor/gpu/ct.h).
struct NiftiVoxels {
  std::array<size_t, 3> dims{0, 0, 0};
  std::array<double, 3> spacing{1, 1, 1};  // mm
  std::array<double, 3> origin{0, 0, 0};   // mm, as Volume::origin
  int32_t datatype = 0;                    // NIFTI_TYPE_* (tresor/ct/nifti_hd.h)
  uint32_t bytes_per_voxel = 0;
  bool swap = false;                       // the file's byte order is not this machine's
  double slope = 1, inter = 0;             // applied to HU; 1, 0 for labels
  uint64_t vox_offset = 0;                 // the first voxel's byte in the file
};
inline constexpr size_t kNiftiHeaderMax = 540;  // a NIfTI-2 header; NIfTI-1's is 348
/// What read_nifti_layout's refusal of a gzip-compressed file says (callers that can inflate on
/// the host instead look for it).
inline constexpr std::string_view kNiftiCompressed = "gzip-compressed; its voxels can only be read after inflating the whole file";
/// The header at the start of `head` (the file's first kNiftiHeaderMax bytes, or all of a smaller
/// file) of an uncompressed file of `file_size` bytes, under exactly read_nifti_hu's rules
/// (`labels`: read_nifti_labels's) and with its errors: the same checks of the header, the same
/// geometry, and the voxels inside the file. A gzip-compressed file is refused by name
/// (kInvalidArgument): its voxels are not at a fixed place.
[[nodiscard]] Result<NiftiVoxels> read_nifti_layout(ByteSpan head, uint64_t file_size, const std::string& name, bool labels);
/// The voxels of `file` (the whole uncompressed file `layout` was read from) as read_nifti_hu /
/// read_nifti_labels decode them, with their errors: what a reader that checked the header alone
/// does once the voxels are at hand (in host memory).
[[nodiscard]] Result<HuVolume> decode_nifti_hu(ByteSpan file, const NiftiVoxels& layout, const std::string& name);
[[nodiscard]] Result<LabelVolume> decode_nifti_labels(ByteSpan file, const NiftiVoxels& layout, const std::string& name);

/// A DICOM CT series: every file in `dir`, one slice each, sorted by position along the slice
/// normal; HU from RescaleSlope/Intercept; x/y spacing from PixelSpacing, z from the positions;
/// origin = the first slice's ImagePositionPatient. Refused, naming the files: more than one
/// series, different sizes or pixel spacings, orientations other than axial, two slices at one
/// position, uneven slice gaps (missing slices). Files named `….sealed` (each slice sealed on its
/// own, `slice-0001.dcm.sealed`) are opened in memory with `keys` (every chunk verified before
/// GDCM parses it) and never written out; without keys they are refused by name.
[[nodiscard]] Result<HuVolume> read_dicom_series(const std::string& dir, const sealed::KeyRing* keys = nullptr);
/// `v` as a CT series in `dir` (slice-0000.dcm, …; CT Image Storage, int16 HU with slope 1),
/// with UIDs derived from the volume and `description`, so that the same volume gives the same
/// files.
[[nodiscard]] Result<void> write_dicom_series(const std::string& dir, const HuVolume& v, const std::string& description);

}  // namespace tresor::ct
