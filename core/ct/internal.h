// Pieces the CT sources share and the public headers do not show: the separable Gaussian in voxel
// units over any element type, and the seeded random stream (phantom, augmentation).
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <numbers>
#include <vector>

#include "tresor/thread_pool.h"

namespace tresor::ct::detail {

/// scipy.ndimage.gaussian_filter semantics (reflect edges, radius ⌊truncate·σ + 0.5⌋, double
/// accumulation) with σ in voxels per axis (0 leaves an axis), in place.
template <typename T>
void gaussian_voxels(std::vector<T>& v, const std::array<size_t, 3>& dims, const std::array<double, 3>& sigma_voxels, double truncate, ThreadPool& pool);

/// SplitMix64 (Steele, Lea, Flood, OOPSLA 2014): a small stream that gives the same numbers on
/// every platform, unlike std::normal_distribution, whose algorithm the standard leaves open.
struct Rng {
  uint64_t s;
  uint64_t next() {
    uint64_t z = (s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }  // [0, 1)
  double between(double a, double b) { return a + (b - a) * uniform(); }
  /// Uniform in 0..n−1 (n > 0; the bias of a 64-bit modulo is below 2^-40 for n < 2^24).
  size_t below(size_t n) { return static_cast<size_t>(next() % n); }
  double normal() {  // Box–Muller
    const double u1 = 1.0 - uniform(), u2 = uniform();
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(2 * std::numbers::pi * u2);
  }
};

}  // namespace tresor::ct::detail
