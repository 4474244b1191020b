// The GPU data loader's per-voxel arithmetic (include/tresor/gpu/loader.h), written once for the
// CUDA kernels (kernels/loader.cu) and their CPU emulation (kernels/loader_gpu.cc), which runs
// this same code voxel by voxel and is compared with the CPU trainer's PatchSource::fill_step on
// every machine. Plain C++ (no library types beyond <cstdint>): nvcc compiles it as device code,
// g++ as host code under the project's warnings.
//
// What the host computes per patch and these functions only read: the patch's draws
// (ct::PatchSampler::draw, the CPU sampler's own code) for both outcomes of the foreground test —
// the host never learns whether a case has foreground, nor where (the foreground list and its
// count stay in device memory), so it sends both and the device picks.
#pragma once

#include <cstddef>
#include <cstdint>

#include "hd.h"
#include "tresor/ct/augment_hd.h"

namespace tresor::gpu::loader {

inline constexpr unsigned kThreads = 256;         // threads per block, every loader kernel
inline constexpr unsigned kCompactPerThread = 16;  // consecutive voxels per thread in the compaction
inline constexpr uint64_t kCompactTile = uint64_t{kThreads} * kCompactPerThread;  // voxels per block

/// One case's volumes in device memory: the float voxels of the image and the vesselness (as
/// stored in the NIfTI file, with its scl_slope/scl_inter as the CPU reader applies them: slope 0
/// or not finite → 1, inter not finite → 0), the uint8 labels, the foreground list (voxel indices
/// in increasing order) and its length.
struct VolumeView {
  const float* image = nullptr;
  const float* vesselness = nullptr;
  const uint8_t* labels = nullptr;
  double image_slope = 1, image_inter = 0, vessel_slope = 1, vessel_inter = 0;
  uint64_t nx = 0, ny = 0, nz = 0;
  const uint32_t* foreground = nullptr;
  const uint32_t* foreground_count = nullptr;
};

/// One outcome of a patch's draws (ct::PatchDraw without the foreground choice).
struct PatchParams {
  uint64_t corner[3] = {0, 0, 0};  // unused for the foreground outcome: the device computes it
  uint32_t flipped[3] = {0, 0, 0};
  double scale = 1, shift = 0, noise_sd = 0;
  uint64_t noise_state = 0;
  uint32_t spatial = 0;  // the spatial transform applies: affine as ct::PatchDraw's
  double affine[9] = {1, 0, 0, 0, 1, 0, 0, 0, 1};
};

/// A batch slot: the foreground outcome (used when want_foreground and the case has foreground:
/// centred on foreground[foreground_draw % count]) and the random one (otherwise).
struct SlotParams {
  uint32_t want_foreground = 0;
  uint64_t foreground_draw = 0;
  PatchParams from_foreground, random;
};

/// What every slot of a step shares: the cubic patch side, the vesselness channel's factor (as
/// float, as the trainer multiplies), the foreground label.
struct FillParams {
  uint64_t patch = 0;
  float vesselness_scale = 1;
  uint8_t foreground_label = 0;
};

// Float product rounded once (no contraction into a later add; tresor/rn.h).
using tresor::rn::fmul;

/// A float voxel as ct::read_nifti_float gives it: float(double(stored) · slope + inter).
TRESOR_HD inline float stored_float(const float* p, uint64_t i, double slope, double inter) {
  return static_cast<float>(tresor::rn::dadd(tresor::rn::dmul(static_cast<double>(p[i]), slope), inter));
}

/// The outcome slot `s` takes on this case, and its corner.
TRESOR_HD inline const PatchParams& resolve_patch(const VolumeView& v, const SlotParams& s, uint64_t patch, uint64_t corner[3]) {
  const uint32_t count = *v.foreground_count;
  if (s.want_foreground != 0 && count > 0) {
    const uint64_t vox = v.foreground[s.foreground_draw % count];
    const uint64_t c[3] = {vox % v.nx, (vox / v.nx) % v.ny, vox / (v.nx * v.ny)};
    const uint64_t n[3] = {v.nx, v.ny, v.nz};
    for (int a = 0; a < 3; ++a) corner[a] = tresor::ct::augment_hd::centred_corner(c[a], patch, n[a]);
    return s.from_foreground;
  }
  for (int a = 0; a < 3; ++a) corner[a] = s.random.corner[a];
  return s.random;
}

/// The mirroring of a slot's patch (bit a: axis a), which depends on the outcome the device picks:
/// the low resolution undoes it (augment_hd::lowres_down_voxel), so its kernels resolve it as
/// resolve_patch resolves the outcome.
struct FlipChoice {
  const uint32_t* foreground_count = nullptr;
  uint32_t want_foreground = 0;
  uint32_t from_foreground = 0, random = 0;
};
TRESOR_HD inline uint32_t flip_bits(const PatchParams& p) {
  return (p.flipped[0] != 0 ? 1u : 0u) | (p.flipped[1] != 0 ? 2u : 0u) | (p.flipped[2] != 0 ? 4u : 0u);
}
TRESOR_HD inline uint32_t resolve_flips(const FlipChoice& f) {
  return f.want_foreground != 0 && *f.foreground_count > 0 ? f.from_foreground : f.random;
}

/// A volume's float voxels as the CPU reader scales them, and its labels, for augment_hd's
/// trilinear and label_at.
struct StoredAt {
  const float* p;
  double slope, inter;
  TRESOR_HD double operator()(uint64_t i) const { return static_cast<double>(stored_float(p, i, slope, inter)); }
};
struct LabelAt {
  const uint8_t* p;
  TRESOR_HD uint8_t operator()(uint64_t i) const { return p[i]; }
};

/// Patch voxel i (x fastest, P = f.patch): channel 0 the augmented image at the flipped source
/// voxel (or, under the spatial transform, interpolated at its source position), channel 1 the
/// vesselness there × the scale, the target 1 where the label is the foreground label — exactly
/// the CPU trainer's fill() (ct::PatchSampler::sample and channel).
TRESOR_HD inline void fill_voxel(const VolumeView& v, const PatchParams& p, const uint64_t corner[3], const FillParams& f, uint64_t i, float* image,
                                 float* vesselness, uint8_t* target) {
  namespace hd = tresor::ct::augment_hd;
  const uint64_t P = f.patch;
  const uint64_t x = i % P, y = (i / P) % P, z = i / (P * P);
  const uint64_t q[3] = {p.flipped[0] != 0 ? P - 1 - x : x, p.flipped[1] != 0 ? P - 1 - y : y, p.flipped[2] != 0 ? P - 1 - z : z};
  float img = 0, ves = 0;
  bool fg = false;
  if (p.spatial == 0) {
    const uint64_t src = (corner[0] + q[0]) + v.nx * ((corner[1] + q[1]) + v.ny * (corner[2] + q[2]));
    img = stored_float(v.image, src, v.image_slope, v.image_inter);
    ves = stored_float(v.vesselness, src, v.vessel_slope, v.vessel_inter);
    fg = v.labels[src] == f.foreground_label;
  } else {
    const uint64_t pn[3] = {P, P, P}, vn[3] = {v.nx, v.ny, v.nz};
    double s[3];
    hd::spatial_source(p.affine, corner, pn, q, s);
    const hd::Neighbours nb = hd::neighbours(vn, s);
    img = static_cast<float>(hd::trilinear(StoredAt{v.image, v.image_slope, v.image_inter}, nb));
    ves = static_cast<float>(hd::trilinear(StoredAt{v.vesselness, v.vessel_slope, v.vessel_inter}, nb));
    fg = hd::label_at(LabelAt{v.labels}, nb) == f.foreground_label;
  }
  image[i] = hd::augment_voxel(img, p.scale, p.shift, p.noise_sd, p.noise_state, i);
  vesselness[i] = fmul(ves, f.vesselness_scale);
  target[i] = fg ? 1 : 0;
}

/// The compaction's thread work: voxels [begin, end) of the labels counted, then written (in
/// order, from out[offset]).
TRESOR_HD inline uint32_t count_range(const uint8_t* labels, uint64_t begin, uint64_t end, uint8_t label) {
  uint32_t c = 0;
  for (uint64_t i = begin; i < end; ++i) c += labels[i] == label ? 1u : 0u;
  return c;
}
TRESOR_HD inline void write_range(const uint8_t* labels, uint64_t begin, uint64_t end, uint8_t label, uint32_t* out, uint32_t offset) {
  for (uint64_t i = begin; i < end; ++i) {
    if (labels[i] == label) out[offset++] = static_cast<uint32_t>(i);
  }
}

/// Whether a float voxel, as the CPU reader scales it, is finite (the reader refuses files with
/// any that is not). Written without isfinite so that host and device test the same bits.
TRESOR_HD inline bool finite_voxel(const float* p, uint64_t i, double slope, double inter) {
  const double x = tresor::rn::dadd(tresor::rn::dmul(static_cast<double>(p[i]), slope), inter);
  return ((tresor::rn::double_bits(x) >> 52) & 0x7FF) != 0x7FF;
}

}  // namespace tresor::gpu::loader
