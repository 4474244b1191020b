// tresor/gpu/loader.h — the training data loader on the GPU (issue 9): prepared cases (what
// `tresor prep` writes: image.nii, vesselness.nii, labels.nii, each usually .sealed) uploaded
// through the secure channel (tresor/gpu/channel.h), so that their plaintext exists only in
// device memory, and training batches assembled there — foreground-biased crops, flips,
// intensity change and noise — bit-identical to the CPU trainer's train::PatchSource::fill_step.
//
// What reaches the host, and why it is safe to: each file's NIfTI header (its first 352 bytes:
// dimensions, voxel type, spacing, transforms, scaling — geometry, no voxel), read back to check
// it; one flag per float volume saying whether a voxel is not finite (the CPU reader refuses such
// files too). Nothing else: the foreground list and its length stay in device memory, and the
// patch draws (made on the host with ct::PatchSampler::draw, the CPU sampler's own code) are
// sent for both outcomes of the foreground test, so the host never learns where, or whether, a
// case has foreground. In an SEV-SNP guest, device-to-host copies pass through shared memory;
// this is why the list is small and fixed.
//
// Devices (the channel's): cuda_device(i) runs the kernels (kernels/loader.cu); cpu_device() and
// emulated_device() run the kernels' per-voxel code (kernels/loader.cuh) on the host, over "device
// memory" that is host memory.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "tresor/ct/augment.h"
#include "tresor/error.h"
#include "tresor/gpu/channel.h"
#include "tresor/sealed.h"
#include "tresor/train/trainer.h"

namespace tresor::gpu {

/// The NIfTI-1 fields the loader uses (NIfTI-1.1, nifti1.h: sizeof_hdr at byte 0, dim at 40,
/// datatype at 70, bitpix at 72, vox_offset at 108, scl_slope at 112, scl_inter at 116, magic at
/// 344).
struct NiftiLayout {
  std::array<size_t, 3> dims{0, 0, 0};
  int datatype = 0;         // NIFTI_TYPE_*: 2 uint8, 16 float32
  uint64_t vox_offset = 0;  // where the voxels start in the file
  double slope = 1, inter = 0;  // as the CPU reader applies them to float volumes
};
inline constexpr size_t kNiftiHeaderBytes = 352;  // the 348-byte header and the 4-byte extension flag
inline constexpr int kNiftiUint8 = 2;              // nifti1.h NIFTI_TYPE_UINT8
inline constexpr int kNiftiFloat32 = 16;           // nifti1.h NIFTI_TYPE_FLOAT32

/// Checks a NIfTI-1 header on its own (the first kNiftiHeaderBytes of a file of `file_size`
/// bytes) for the loader: native byte order, magic "n+1", a single 3D volume of 1..65535 voxels
/// per axis, the voxel type `want_datatype` with its bitpix, no extensions it would have to skip
/// (vox_offset a multiple of 4, at least 352, whole) and the voxels inside the file. kMalformed
/// names `name` and the field with its value. The loader accepts only what `tresor prep` writes
/// (float32 volumes, uint8 labels); a byte-swapped or NIfTI-2 file is refused by name.
[[nodiscard]] Result<NiftiLayout> parse_nifti_header(ByteSpan header, uint64_t file_size, int want_datatype, const std::string& name);

/// Prepared training cases in device memory and the batches drawn from them.
///
/// Lifetime: owns its device memory (wiped when freed); `device` must outlive it. fill_step keeps
/// no state between calls (each slot's draws travel as kernel arguments) but uses one working
/// buffer per batch slot (the blur's and the low resolution's): several threads may call it at
/// once, each on its own stream and outputs, for disjoint slots; calls for the same slots must not
/// overlap.
class DeviceDataset {
 public:
  /// Uploads each case directory's image, vesselness and labels (`<base>.nii.sealed`, opened with
  /// `keys`, or a plain `<base>.nii`, copied as it is — plaintext already on the host: tests and
  /// the CPU path) through a SecureChannel on `device`, checks the headers, refuses a volume with
  /// a voxel that is not finite, and builds each case's foreground list (labels ==
  /// options.foreground_label, in index order) on the device. The batches follow `options` as
  /// train::PatchSource does (patch, batch, seed, foreground_label, foreground_fraction,
  /// vesselness_scale; nnU-Net's other augmentation defaults). On any failure nothing is returned
  /// and all device memory used is wiped; the error names the case directory and the file (a
  /// tampered file: the chunk), or the mismatch (volumes of other dimensions, a patch that does
  /// not fit). Device memory: the three files as they are, plus 4 bytes per voxel for the
  /// foreground list (sized for the worst case, because its length is not known on the host), plus
  /// 4·batch·P³ bytes of working buffers.
  [[nodiscard]] static Result<DeviceDataset> load(ChannelDevice& device, const std::vector<std::string>& case_dirs, const sealed::KeyRing& keys,
                                                  const tresor::train::TrainerOptions& options, ChannelOptions channel = {});

  /// Slots [lo, hi) of step `step`'s global batch of options.batch patches: d_x [hi − lo, 2, P, P, P]
  /// (channel 0 the augmented image, channel 1 the vesselness × vesselness_scale) and d_y
  /// [(hi − lo)·P³] (1 where the label is the foreground label), in the device's memory — bit-
  /// identical to train::PatchSource::fill_step with the same options and cases.
  /// On the CUDA device the work is queued on `stream` (a cudaStream_t; nullptr = the default
  /// stream) and the call returns once it is queued: d_x and d_y are written when the stream gets
  /// there. On the host devices (`stream` ignored) they are host memory, written on return.
  /// kInvalidArgument: lo > hi, hi > options.batch, null outputs.
  [[nodiscard]] Result<void> fill_step(size_t step, size_t lo, size_t hi, float* d_x, uint8_t* d_y, void* stream = nullptr) const;

  [[nodiscard]] size_t cases() const { return cases_.size(); }
  [[nodiscard]] const std::array<size_t, 3>& dims(size_t c) const;
  [[nodiscard]] size_t patch() const { return options_.patch; }
  [[nodiscard]] ChannelDevice& device() const { return *device_; }

  /// Case c's foreground list copied to the host. For tests only: it moves label-derived data to
  /// the host, which the loader itself never does.
  [[nodiscard]] Result<std::vector<uint32_t>> foreground_to_host(size_t c) const;

  DeviceDataset(DeviceDataset&&) noexcept;
  DeviceDataset& operator=(DeviceDataset&&) noexcept;
  ~DeviceDataset();

 private:
  struct Case;
  DeviceDataset() = default;
  ChannelDevice* device_ = nullptr;
  tresor::train::TrainerOptions options_;
  tresor::ct::AugmentOptions augment_;
  std::vector<std::unique_ptr<Case>> cases_;
  DeviceBuffer scratch_;  // batch × P³ floats: each slot's working copy for the blur and the low resolution
};

}  // namespace tresor::gpu
