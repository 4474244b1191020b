// tresor/ct/nifti_hd.h — a NIfTI voxel as stored → HU or label, written once for the CPU reader
// (core/ct/nifti.cc) and the CUDA kernel that decodes a volume where the secure channel left it,
// in device memory (kernels/ct.cu). Plain C++ (no library types beyond <cstdint>): nvcc compiles
// it as device code, g++ as host code, and both give the same bits (the arithmetic is tresor/rn.h's
// exactly rounded double operations; the conversions are exact).
//
// The rules (docs/preprocessing.md §1):
//  - the stored value is read in the file's byte order (NIfTI-1/-2 datatypes uint8, int8, int16,
//    uint16, int32, float32, float64) and converted to double exactly;
//  - HU = stored · slope + intercept (slope 0 or not finite means 1, intercept not finite means 0:
//    libnifti's reading of scl_slope/scl_inter), a value that is not finite becomes 0, the rest is
//    clamped to −32768..32767 and rounded half away from zero;
//  - a label is the stored value, which must be a whole number 0..255.
#pragma once

#include <cstdint>

#include "tresor/rn.h"

namespace tresor::ct::nifti_hd {

// NIfTI datatype codes (nifti1.h, NIFTI_TYPE_*).
inline constexpr int32_t kUint8 = 2;
inline constexpr int32_t kInt16 = 4;
inline constexpr int32_t kInt32 = 8;
inline constexpr int32_t kFloat32 = 16;
inline constexpr int32_t kFloat64 = 64;
inline constexpr int32_t kInt8 = 256;
inline constexpr int32_t kUint16 = 512;

/// How a volume's voxels are stored, from its header: one of the datatypes above, its size in
/// bytes, whether the file's byte order is not this machine's (little-endian, host and GPU), and
/// the scaling applied to HU (1 and 0 for labels).
struct Decode {
  int32_t datatype = 0;
  uint32_t bytes = 0;
  bool swap = false;
  double slope = 1, inter = 0;
};

/// The `bytes`-byte value at p, least significant byte first unless `swap` (most significant
/// first). Byte loads: the voxels need not be aligned (vox_offset is any whole number).
TRESOR_HD inline uint64_t load_bits(const unsigned char* p, uint32_t bytes, bool swap) {
  uint64_t v = 0;
  for (uint32_t k = 0; k < bytes; ++k) {
    const uint64_t b = p[swap ? k : bytes - 1 - k];
    v = (v << 8) | b;
  }
  return v;
}

/// Voxel i's stored value as a double (exact for every supported type). Unknown types give 0; the
/// header reader refuses them before any voxel is read.
TRESOR_HD inline double stored_value(const unsigned char* voxels, uint64_t i, const Decode& d) {
  const uint64_t bits = load_bits(voxels + i * d.bytes, d.bytes, d.swap);
  switch (d.datatype) {
    case kUint8: return static_cast<double>(static_cast<uint8_t>(bits));
    case kInt8: return static_cast<double>(static_cast<int8_t>(static_cast<uint8_t>(bits)));
    case kInt16: return static_cast<double>(static_cast<int16_t>(static_cast<uint16_t>(bits)));
    case kUint16: return static_cast<double>(static_cast<uint16_t>(bits));
    case kInt32: return static_cast<double>(static_cast<int32_t>(static_cast<uint32_t>(bits)));
    case kFloat32: return static_cast<double>(tresor::rn::bits_float(static_cast<uint32_t>(bits)));
    case kFloat64: return tresor::rn::bits_double(bits);
    default: return 0;
  }
}

/// True when x is neither infinite nor NaN (x − x is 0 exactly then, NaN otherwise); no libm.
TRESOR_HD inline bool finite(double x) { return tresor::rn::dsub(x, x) == 0.0; }

/// HU from a stored value (the rules above).
TRESOR_HD inline int16_t hu_value(double stored, const Decode& d) {
  double x = tresor::rn::dadd(tresor::rn::dmul(stored, d.slope), d.inter);
  if (!finite(x)) return 0;
  x = x < -32768.0 ? -32768.0 : (32767.0 < x ? 32767.0 : x);
  // Half away from zero: the whole part (exact for |x| <= 32768), then the fraction decides.
  const auto whole = static_cast<int32_t>(x);
  const double frac = tresor::rn::dsub(x, static_cast<double>(whole));
  const int32_t r = frac >= 0.5 ? whole + 1 : (frac <= -0.5 ? whole - 1 : whole);
  return static_cast<int16_t>(r < -32768 ? -32768 : (r > 32767 ? 32767 : r));
}

/// A label from a stored value: true and *out set when it is a whole number 0..255; false (and
/// *out = 0) otherwise, NaN included.
TRESOR_HD inline bool label_value(double stored, uint8_t* out) {
  if (!(stored >= 0.0 && stored <= 255.0)) {
    *out = 0;
    return false;
  }
  const auto whole = static_cast<int32_t>(stored);
  *out = static_cast<uint8_t>(whole);
  return static_cast<double>(whole) == stored;
}

}  // namespace tresor::ct::nifti_hd
