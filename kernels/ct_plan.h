// What the CT pipeline computes on the host around its kernels (kernels/ct_plan.cc), shared by the
// CUDA path (kernels/ct_gpu.cc) and the CPU emulation: the reference's checks, the coordinate
// tables and Gaussian taps, the statistics from the histogram. Private to tresor_gpu_ct.
#pragma once

#include <array>
#include <cstdint>
#include <span>
#include <vector>

#include "ct.cuh"
#include "tresor/ct/prep.h"
#include "tresor/error.h"

namespace tresor::gpu::ct::detail {

/// The reference's checks, in its order (core/ct/prep.cc, ops.cc, frangi.cc), with its messages.
/// Labels of other dimensions than the volume.
[[nodiscard]] Result<void> check_labels(const tresor::ct::HuVolume& hu, const tresor::ct::LabelVolume* labels);
/// An empty list of Frangi scales.
[[nodiscard]] Result<void> check_scales(const tresor::ct::PrepOptions& o);
/// No voxel above the foreground threshold (also an empty volume).
[[nodiscard]] Result<void> empty_foreground(const tresor::ct::PrepOptions& o);
/// Then resampling (the output spacing, an empty volume, more than 2^31 output voxels), the window
/// and Frangi's options on the output grid; returns the output grid's dimensions. Also refuses a
/// volume spacing that is not positive and finite, which the reference does not check.
[[nodiscard]] Result<std::array<size_t, 3>> check_grid(const std::array<size_t, 3>& dims, size_t data_size, const std::array<double, 3>& spacing,
                                                       const tresor::ct::PrepOptions& o);

/// Every check of prepare(), in the reference's order (labels, scales, the foreground, then
/// check_grid); the output grid's dimensions.
[[nodiscard]] Result<std::array<size_t, 3>> check_prepare(const tresor::ct::HuVolume& hu, const tresor::ct::LabelVolume* labels,
                                                          const tresor::ct::PrepOptions& o);
/// prepare_device's: the same, less what needs the voxels (the foreground is checked after the
/// histogram), plus a null input.
[[nodiscard]] Result<std::array<size_t, 3>> check_prepare_device(const int16_t* d_hu, const std::array<size_t, 3>& dims,
                                                                 const std::array<double, 3>& spacing, const tresor::ct::PrepOptions& o);

/// The smallest int16 value above `foreground_hu` (v > foreground_hu ⇔ v >= it); 32768 when none.
[[nodiscard]] int foreground_threshold(double foreground_hu);

/// One Frangi scale: σ in voxels and the Gaussian's taps (at taps[offset], 2·radius + 1 of them).
struct Scale {
  double sigma = 0;
  int radius = 0;
  size_t offset = 0;
};

struct Plan {
  std::array<size_t, 3> in_dims{};
  Grid grid;
  std::vector<LerpTap> lerp;      // grid.nx + grid.ny + grid.nz: x, then y, then z
  std::vector<uint64_t> nearest;  // the same layout
  std::vector<double> taps;       // every scale's, one after the other
  std::vector<Scale> scales;
  int threshold = 32768;
  FusedParams fused;              // window and strides; set_stats fills the statistics
  double two_alpha2 = 0, two_beta2 = 0, two_gamma2 = 0;
};
/// The plan for a volume that passed check_grid (out_dims from it).
[[nodiscard]] Plan make_plan(const std::array<size_t, 3>& dims, const std::array<double, 3>& spacing, const std::array<size_t, 3>& out_dims,
                             const tresor::ct::PrepOptions& o);
void set_stats(FusedParams& p, const tresor::ct::CtNormalisation& n);

/// The nnU-Net statistics from a histogram of the foreground (kHistBins counts, bin = value +
/// 32768), equal to ct_normalisation's on the same voxels: percentiles interpolated between the
/// same order statistics, mean from the exact sum; the empty-foreground error otherwise.
[[nodiscard]] Result<tresor::ct::CtNormalisation> stats_from_histogram(std::span<const uint64_t> hist, const tresor::ct::PrepOptions& o);

}  // namespace tresor::gpu::ct::detail
