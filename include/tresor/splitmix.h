// tresor/splitmix.h — a small seeded random stream for reproducible data (phantoms, augmentation,
// initial weights), never for secrets (those come from the CSPRNG in tresor/crypto.h).
// SplitMix64 (Steele, Lea, Flood, OOPSLA 2014) gives the same numbers on every platform, unlike
// std::normal_distribution, whose algorithm the standard leaves open.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <numbers>

namespace tresor {

struct SplitMix64 {
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

}  // namespace tresor
