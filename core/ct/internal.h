// Pieces the CT sources share and the public headers do not show: the separable Gaussian in voxel
// units over any element type, and the seeded random stream (phantom, augmentation).
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <numbers>
#include <vector>

#include "tresor/splitmix.h"
#include "tresor/thread_pool.h"

namespace tresor::ct::detail {

/// scipy.ndimage.gaussian_filter semantics (reflect edges, radius ⌊truncate·σ + 0.5⌋, double
/// accumulation) with σ in voxels per axis (0 leaves an axis), in place.
template <typename T>
void gaussian_voxels(std::vector<T>& v, const std::array<size_t, 3>& dims, const std::array<double, 3>& sigma_voxels, double truncate, ThreadPool& pool);

using Rng = SplitMix64;

}  // namespace tresor::ct::detail
