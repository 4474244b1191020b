// Device code shared by the self-test kernel and its CPU reference: a 32-bit integer mix
// (the "lowbias32" finaliser), chosen because every output bit depends on every input bit, so
// a wrong index, a lost write or a miscompiled kernel shows up as a mismatch.
#pragma once
#include <cstdint>

#include "hd.h"

namespace tresor::gpu::detail {
TRESOR_HD inline uint32_t selftest_mix(uint32_t seed, uint32_t i) {
  uint32_t x = seed ^ (i * 0x9E3779B9u);
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}
}  // namespace tresor::gpu::detail
