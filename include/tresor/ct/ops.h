// tresor/ct/ops.h — CT preprocessing operations, CPU references (issue 8, docs/preprocessing.md
// §4): intensity windowing and nnU-Net's CT normalisation, resampling to isotropic spacing on the
// physical grid. Multi-threaded over slices; each is checked against NumPy/SciPy in the tests.
#pragma once

#include <span>

#include "tresor/ct/volume.h"

namespace tresor::ct {

using FloatVolume = Volume<float>;

/// A fixed window: HU clipped to [lower, upper] and mapped linearly onto [0, 1].
/// kInvalidArgument unless lower < upper.
/// `threads` here and below: 0 = all cores.
[[nodiscard]] Result<FloatVolume> window(const HuVolume& v, double lower, double upper, unsigned threads = 0);
[[nodiscard]] Result<FloatVolume> window(const FloatVolume& v, double lower, double upper, unsigned threads = 0);

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
/// The same statistics from a histogram of the foreground's HU (65536 bins, bin = HU + 32768),
/// exactly: what ct_normalisation computes, and what the CUDA pipeline's histogram gives.
[[nodiscard]] Result<CtNormalisation> ct_normalisation_from_histogram(std::span<const uint64_t> counts);
[[nodiscard]] FloatVolume normalise(const HuVolume& v, const CtNormalisation& n, unsigned threads = 0);
[[nodiscard]] FloatVolume normalise(const FloatVolume& v, const CtNormalisation& n, unsigned threads = 0);

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
/// kInvalidArgument for an empty volume, a volume spacing that is not positive, a spacing outside
/// 0.05..20 mm or more than 2^31 output voxels.
[[nodiscard]] Result<FloatVolume> resample_linear(const HuVolume& v, std::array<double, 3> spacing, unsigned threads = 0);
/// The output grid of resampling `dims` voxels of `spacing` mm to `new_spacing`, with the same
/// checks and messages (what the CUDA pipeline plans with).
[[nodiscard]] Result<std::array<size_t, 3>> resample_grid(const std::array<size_t, 3>& dims, const std::array<double, 3>& spacing,
                                                          const std::array<double, 3>& new_spacing);
[[nodiscard]] Result<LabelVolume> resample_nearest(const LabelVolume& v, std::array<double, 3> spacing, unsigned threads = 0);

/// Multi-scale Frangi vesselness with scikit-image 0.19's definitions (frangi(), see hessian.h
/// and docs/preprocessing.md §5). Scales in voxels, as scikit-image: resample to isotropic voxels
/// first and divide a radius in mm by the spacing. gamma is absolute (scikit-image's default 15
/// suits HU-scale input; pass a smaller one for normalised intensities).
struct FrangiOptions {
  std::vector<double> sigmas{1, 2, 3};
  double alpha = 0.5, beta = 0.5, gamma = 15;
  bool bright = true;       // bright ridges (contrast-filled lumen); false: scikit-image's black_ridges
  double truncate = 4.0;    // the Gaussian's radius in σ
};
/// The response in [0, 1) per voxel, maximum over scales. kInvalidArgument names an axis with
/// fewer than 2 voxels, a scale outside (0, 64] voxels, or a non-positive α, β or γ. `threads` 0:
/// all cores.
[[nodiscard]] Result<FloatVolume> frangi(const FloatVolume& v, const FrangiOptions& options, unsigned threads = 0);

/// The area under the ROC curve of `score` for telling voxels labelled `positive` from all the
/// others (Mann–Whitney U over all pairs, ties counted as half). kInvalidArgument when the sizes
/// differ or either class is empty.
[[nodiscard]] Result<double> roc_auc(const std::vector<float>& score, const LabelVolume& labels, uint8_t positive);

}  // namespace tresor::ct
