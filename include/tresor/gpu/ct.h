// tresor/gpu/ct.h — the CT preprocessing pipeline on a CUDA device (kernels/ct.cu): the same
// outputs as the CPU reference tresor::ct::prepare (tresor/ct/prep.h), which specifies it.
//
//   HU (int16) ─┬─ 65536-bin histogram of the foreground → exact percentiles, mean, sd (host)
//               └─ one pass: trilinear resample → z-scored image and [0, 1] window (labels nearest)
//                    window → per scale: Gaussian (x, y, z) → Hessian, eigenvalues, Frangi → max
//
// What differs from the reference, and by how much (tests/kernels/ct_gpu_test.cc checks it):
//  - stats: the reference's to the bit (the same order statistics; the same exact integer sums,
//    taken per histogram bin);
//  - image: the reference's to the bit (the same coordinates from the host, the same double
//    products and sums without fused multiply-adds, rounded to float once);
//  - vesselness: the Gaussian accumulates in double but stores float between its passes (the
//    reference stores double), and the device may fuse multiply-adds in the Hessian; the response
//    is continuous in the smoothed values: nearly every voxel moves by <= 1e-7, a few where the
//    response is itself ~1e-5 (ratios of near-zero eigenvalues) by up to ~1.4e-5 (tested to 1e-4);
//  - labels: the same nearest voxel, exactly.
//
// Device memory holds patient data: every buffer is zeroed before it is freed.
#pragma once

#include <array>
#include <initializer_list>
#include <string>
#include <vector>
#include <cstddef>
#include <cstdint>

#include "tresor/ct/prep.h"
#include "tresor/ct/volume.h"
#include "tresor/error.h"
#include "tresor/gpu/channel.h"
#include "tresor/sealed.h"

namespace tresor::gpu::ct {

/// Milliseconds per stage, from CUDA events on the pipeline's stream. total_ms spans the device
/// stages (normalise + resample + frangi, with the statistics' small host step between them) and
/// excludes the volume's upload and the outputs' download, reported apart (prepare only;
/// prepare_device leaves them 0), and the setup (allocation, coordinate tables, taps: host clock).
struct PrepTimings {
  double upload_ms = 0;     // HU (and labels) host → device
  double normalise_ms = 0;  // the nnU-Net statistics: histogram, its download, percentiles/mean/sd
  double resample_ms = 0;   // the fused pass writing image and window, and the labels
  double window_ms = 0;     // always 0: the window is written by the resample pass (resample_ms)
  double frangi_ms = 0;     // every scale's Gaussian and Frangi kernels
  double total_ms = 0;
  double download_ms = 0;   // image, vesselness (and labels) device → host
  double setup_ms = 0;
  size_t peak_device_bytes = 0;  // device memory this call allocated, at its peak (inputs included
                                 // for prepare, the caller's excluded for prepare_device)
  size_t device_used_bytes = 0;  // what the device gave up for this call at its peak, measured: cudaMemGetInfo's
                                 // free memory before the first allocation minus its lowest value after one
                                 // (allocation granularity included; device-wide, so another process allocating
                                 // on the GPU at the same time counts too); prepare and prepare_device, else 0
};

/// Device memory on one CUDA device, owned: zeroed, then freed, when destroyed or reset. Move-only;
/// empty when default-constructed.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(DeviceBuffer&& o) noexcept;
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer();
  /// `bytes` of device memory on `device` (uninitialised). kUnavailable with CUDA's reason.
  [[nodiscard]] static Result<DeviceBuffer> allocate(int device, size_t bytes);
  void reset();
  /// reset() for many buffers: zeroed and freed with two device-wide synchronisations in all
  /// (reset() takes two for each). Empty buffers are skipped; all others must be on one device.
  static void reset_all(std::initializer_list<DeviceBuffer*> buffers);
  [[nodiscard]] void* get() const { return p_; }
  template <typename T>
  [[nodiscard]] T* as() const {
    return static_cast<T*>(p_);
  }
  [[nodiscard]] size_t size() const { return n_; }
  [[nodiscard]] int device() const { return device_; }

 private:
  void* p_ = nullptr;
  size_t n_ = 0;
  int device_ = 0;
};

/// The pipeline's outputs in device memory (x-fastest, dims of the isotropic grid, voxel
/// `spacing` mm, origin that of the input).
struct DevicePrepared {
  tresor::ct::CtNormalisation stats;
  std::array<size_t, 3> dims{0, 0, 0};
  double spacing = 0;
  DeviceBuffer image;       // float, z-scored
  DeviceBuffer vesselness;  // float, [0, 1)
  DeviceBuffer labels;      // uint8, nearest voxel; empty when no labels were given
};

/// True when `device` can run the pipeline (a CUDA device of compute capability 8.0 or newer);
/// false when this build has CUDA but no such device index or an older device. kUnavailable
/// when this build has no CUDA ("this build has no CUDA …") or the driver reports no usable
/// device ("no CUDA device: <reason>").
[[nodiscard]] Result<bool> available(int device = 0);

/// The pipeline on HU already in device memory of `device` (where the GPU secure channel,
/// tresor/gpu/channel.h, leaves decrypted data): `d_hu` holds dims[0]·dims[1]·dims[2] int16
/// voxels, x fastest, spacing in mm; `d_labels` (nullable) the same number of uint8 labels. The
/// inputs are only read; work already queued on the device is waited for first, so they may come
/// from any stream. The outputs are complete when this returns.
///
/// Errors as the reference's (kInvalidArgument naming the option, from the same checks with the
/// same messages) before the device is touched, except the empty foreground, which is known only
/// after the histogram (so it is reported after the option checks rather than before them);
/// kUnavailable without a usable device or when a CUDA call fails (CUDA's error name and text).
[[nodiscard]] Result<DevicePrepared> prepare_device(const int16_t* d_hu, const std::array<size_t, 3>& dims, const std::array<double, 3>& spacing,
                                                    const uint8_t* d_labels, const tresor::ct::PrepOptions& options, PrepTimings* timings = nullptr,
                                                    int device = 0);

/// tresor::ct::prepare on `device`: uploads the volume (and labels), runs prepare_device and
/// downloads the outputs. The same outputs within the tolerances above; the same errors in the
/// same order (labels of other dimensions, no Frangi scale, empty foreground, then resample,
/// window and Frangi options), all before the device is touched; then kUnavailable as above.
/// options.threads is not used.
[[nodiscard]] Result<tresor::ct::Prepared> prepare(const tresor::ct::HuVolume& hu, const tresor::ct::LabelVolume* labels,
                                                   const tresor::ct::PrepOptions& options, PrepTimings* timings = nullptr, int device = 0);

/// The kernels' per-voxel code (kernels/ct.cuh) run on the CPU, with everything the device path
/// computes on the host (coordinate tables, taps, statistics from the histogram) and float storage
/// between the Gaussian's passes: what the tests compare with the reference on every machine, so
/// that all but the CUDA mechanics (launch geometry, tiling, atomics) is checked without a GPU.
/// Slow; options.threads threads (0 = all cores).
[[nodiscard]] Result<tresor::ct::Prepared> prepare_emulated(const tresor::ct::HuVolume& hu, const tresor::ct::LabelVolume* labels,
                                                            const tresor::ct::PrepOptions& options);

/// A case whose volumes are sealed, uncompressed NIfTI files (`<name>.nii.sealed`, HU of any type
/// read_nifti_hu reads; labels as read_nifti_labels reads them).
struct SealedCase {
  std::string image;
  std::string labels;  // empty: none
};

/// What prepare_sealed does with its outputs.
struct SealedPrepOutputs {
  /// When not empty: image.nii, vesselness.nii (and labels.nii) sealed to `seal` from device
  /// memory into `<dir>/<name>.sealed` by the device (on a GPU, the AES-GCM kernel: only sealed
  /// frames cross to the host), replacing files of those names when `overwrite`.
  std::string dir;
  sealed::SealOptions seal;
  bool overwrite = true;
  /// Copy the outputs to host memory (previews, patches, ROC AUC need them). When false the
  /// returned volumes carry their geometry and no data: on a GPU the voxels never reach the host.
  bool to_host = true;
};

struct SealedPrepared {
  tresor::ct::Prepared prepared;           // data empty unless to_host
  tresor::ct::NiftiVoxels input;           // the image's header: dims, spacing, origin, voxel type
  PrepTimings timings;                     // upload_ms: channel and decoding (host clock);
                                           // download_ms: sealing the outputs and the host copies
  std::vector<std::string> written;        // the sealed outputs, in the order above
  uint64_t staged_bytes = 0;               // what crossed the staging buffers, in and out
};

/// tresor::ct::prepare on sealed files, without their plaintext on the host: each file goes through
/// the secure channel (tresor/gpu/channel.h) into `device`'s memory, only its NIfTI header comes
/// back (geometry and voxel type, no voxel: read_nifti_layout's checks), the voxels are decoded
/// into HU and labels where they lie (tresor/ct/nifti_hd.h, the CPU reader's own code), the
/// pipeline runs there (prepare_device), and the outputs are sealed there.
///
/// Devices: on cuda_device(i) the kernels (what reaches the host: the headers, the histogram from
/// which the statistics are computed — as prepare_device — and, with labels, one flag saying
/// whether every label is a whole number 0..255); on the host devices "device memory" is host
/// memory: emulated_device() runs the kernels' emulation (prepare_emulated), cpu_device() the CPU
/// reference (ct::prepare) — the same flow, checked on every machine.
///
/// The outputs equal prepare's (CPU device), prepare_emulated's (emulated) or gpu::ct::prepare's
/// (CUDA) on the volumes read_nifti_hu/read_nifti_labels give for the opened files, and the sealed
/// files open to nifti_bytes of those outputs. Errors name the file: a tampered chunk (the
/// channel's), a compressed file or a header read_nifti_layout refuses, labels of other dimensions
/// or values (the CPU reader's messages), then prepare's; nothing is written on any of them, and
/// device memory is wiped.
[[nodiscard]] Result<SealedPrepared> prepare_sealed(ChannelDevice& device, const SealedCase& in, const sealed::KeyRing& keys,
                                                    const tresor::ct::PrepOptions& options, const SealedPrepOutputs& out, ChannelOptions channel = {});

}  // namespace tresor::gpu::ct
