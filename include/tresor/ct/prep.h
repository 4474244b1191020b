// tresor/ct/prep.h — the preprocessing pipeline of one CT volume (docs/preprocessing.md §7), as
// `tresor prep` runs it: the CPU reference here; the CUDA pipeline (tresor/gpu/ct.h) computes the
// same outputs and is tested against this one.
//
//   HU (int16, any spacing) ─┬─ nnU-Net statistics on the original voxels (foreground HU > fg_hu)
//                            └─ resample to isotropic `spacing` mm (trilinear; labels nearest)
//                                 ├─ image = clip to the percentiles, z-score      → float32
//                                 └─ window [lo, hi] → [0, 1] → Frangi (σ in mm)   → vesselness
#pragma once

#include <optional>

#include "tresor/ct/ops.h"

namespace tresor::ct {

struct PrepOptions {
  double spacing = 0.5;                       // isotropic output voxel, mm
  double foreground_hu = -500;                // the nnU-Net statistics' foreground: HU above this
  double window_lower = -100, window_upper = 600;  // for vesselness
  std::vector<double> frangi_sigmas_mm{0.5, 1.0, 1.5};
  double frangi_alpha = 0.5, frangi_beta = 0.5, frangi_gamma = 0.5;  // γ on the [0, 1] window
  unsigned threads = 0;                       // CPU threads, 0 = all
};

struct Prepared {
  CtNormalisation stats;          // from the original voxels
  FloatVolume image;              // isotropic, z-scored (the network's input)
  FloatVolume vesselness;         // isotropic, [0, 1)
  std::optional<LabelVolume> labels;  // isotropic, nearest neighbour, when labels were given
};

/// kInvalidArgument names the option or the mismatch (labels of other dimensions, a spacing
/// outside 0.05..20 mm, an empty foreground, a window with lower >= upper, no Frangi scale).
[[nodiscard]] Result<Prepared> prepare(const HuVolume& hu, const LabelVolume* labels, const PrepOptions& options);

}  // namespace tresor::ct
