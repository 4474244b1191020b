// tresor/ct/ops.h — CT preprocessing operations, CPU references (issue 8, docs/preprocessing.md
// §4): intensity windowing and nnU-Net's CT normalisation, resampling to isotropic spacing on the
// physical grid. Multi-threaded over slices; each is checked against NumPy/SciPy in the tests.
#pragma once

#include "tresor/ct/volume.h"

namespace tresor::ct {

using FloatVolume = Volume<float>;

/// A fixed window: HU clipped to [lower, upper] and mapped linearly onto [0, 1].
/// kInvalidArgument unless lower < upper.
[[nodiscard]] Result<FloatVolume> window(const HuVolume& v, double lower, double upper);

/// nnU-Net's CT scheme (Isensee et al. 2021, "CTNormalization"): clip to the 0.5th and 99.5th
/// percentiles of the foreground's intensities, then subtract the foreground's mean and divide by
/// its standard deviation (all three taken before clipping, population statistics).
struct CtNormalisation {
  double lower = 0, upper = 0, mean = 0, sd = 1;
};
/// The statistics of the voxels where `foreground` is non-zero (percentiles interpolated
/// linearly between order statistics, as NumPy's default). kInvalidArgument when the volumes do
/// not match or the foreground is empty.
[[nodiscard]] Result<CtNormalisation> ct_normalisation(const HuVolume& v, const LabelVolume& foreground);
[[nodiscard]] FloatVolume normalise(const HuVolume& v, const CtNormalisation& n);

/// A separable 3D Gaussian of standard deviation `sigma_mm` per axis (in mm; 0 leaves an axis),
/// as scipy.ndimage.gaussian_filter: kernel radius ⌊truncate·σ + 0.5⌋ voxels, weights
/// exp(−x²/2σ²) normalised, edges mirrored ("reflect": … c b a | a b c …), double accumulation.
/// kInvalidArgument for a negative sigma.
[[nodiscard]] Result<FloatVolume> gaussian(const FloatVolume& v, std::array<double, 3> sigma_mm, double truncate = 4.0);
/// The same in place on a bare float array of `dims` and `spacing` (what the phantom blurs).
void gaussian_in_place(std::vector<float>& data, const std::array<size_t, 3>& dims, const std::array<double, 3>& spacing,
                       const std::array<double, 3>& sigma_mm, double truncate = 4.0);

/// Resampling on the physical grid: the new voxel centres start at the old first centre and step
/// by `spacing` mm up to the old last centre (so the spacing is exact, unlike a zoom that aligns
/// corner voxels). Intensities trilinearly (edges clamped), labels by the nearest voxel.
/// kInvalidArgument for a spacing outside 0.05..20 mm or more than 2^31 output voxels.
[[nodiscard]] Result<FloatVolume> resample_linear(const HuVolume& v, std::array<double, 3> spacing);
[[nodiscard]] Result<LabelVolume> resample_nearest(const LabelVolume& v, std::array<double, 3> spacing);

}  // namespace tresor::ct
