// tresor/ct/augment_hd.h — the per-voxel arithmetic of the training patches' augmentation
// (tresor/ct/augment.h), shared by the CPU reference (core/ct/augment.cc) and the GPU data loader
// (kernels/loader.cuh), so that both produce the same bits. Plain C++ (no library types): nvcc
// compiles it as C++20 device code, g++ as host code.
//
// Why not std::log and std::cos: the Gaussian noise is Box–Muller, and libm's log and cos are not
// reproducible across implementations (glibc even picks FMA or non-FMA code at run time by the
// CPU), let alone equal to CUDA's. Here both are written with + − × ÷ and √ only — operations
// IEEE 754 rounds exactly, on the GPU as on the CPU — evaluated in a fixed order without fused
// multiply-adds (the __d*_rn intrinsics on the device; the host build targets x86-64 SSE2, which
// has no FMA to contract into). Accuracy: a few units in the last place, ample for noise.
//
// The stream: SplitMix64's state after j draws is s + j·γ (mod 2^64), so draw j of a stream is
// computable on its own: voxel k of a patch takes draws 2k + 1 and 2k + 2 after the patch's
// scalar draws (what the CPU's sequential loop takes, one normal per voxel in index order).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "tresor/rn.h"

namespace tresor::ct::augment_hd {

inline constexpr uint64_t kGamma = 0x9E3779B97F4A7C15ull;  // SplitMix64's increment (tresor/splitmix.h)

// Exactly rounded double operations, never contracted into a fused multiply-add (tresor/rn.h).
using tresor::rn::dadd;
using tresor::rn::ddiv;
using tresor::rn::dmul;
using tresor::rn::dsqrt;
using tresor::rn::dsub;
using tresor::rn::bits_double;
using tresor::rn::double_bits;

/// SplitMix64's output for the state `z` (after the increment): tresor/splitmix.h's next().
TRESOR_HD inline uint64_t splitmix_mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
/// Draw j (1-based) of the SplitMix64 stream whose state is `s`: what the j-th next() returns.
TRESOR_HD inline uint64_t splitmix_at(uint64_t s, uint64_t j) { return splitmix_mix(s + j * kGamma); }

/// ln(x) for a positive normal x: x = m·2^e with m in (√½, √2], f = m − 1 (exact),
/// s = f/(2 + f), ln m = 2·atanh(s) = 2s + 2s·z·(1/3 + z/5 + … + z⁹/21), z = s² ≤ 0.0295 (the
/// series' remainder is below 2^-60 of the result); ln 2 split so that e·ln2_hi is exact.
TRESOR_HD inline double log_positive(double x) {
  const uint64_t b = double_bits(x);
  int e = static_cast<int>((b >> 52) & 0x7FF) - 1023;
  double m = bits_double((b & 0x000FFFFFFFFFFFFFull) | 0x3FF0000000000000ull);  // [1, 2)
  if (m > 0x1.6a09e667f3bcdp+0) {
    m = dmul(m, 0.5);
    e += 1;
  }
  const double f = dsub(m, 1.0);
  const double s = ddiv(f, dadd(2.0, f));
  const double z = dmul(s, s);
  constexpr double kC[10] = {0x1.5555555555555p-2, 0x1.999999999999ap-3, 0x1.2492492492492p-3, 0x1.c71c71c71c71cp-4, 0x1.745d1745d1746p-4,
                             0x1.3b13b13b13b14p-4, 0x1.1111111111111p-4, 0x1.e1e1e1e1e1e1ep-5, 0x1.af286bca1af28p-5, 0x1.8618618618618p-5};
  double p = kC[9];
  for (int i = 8; i >= 0; --i) p = dadd(dmul(p, z), kC[i]);
  const double two_s = dmul(2.0, s);
  const double ln_m = dadd(two_s, dmul(dmul(two_s, z), p));
  constexpr double kLn2Hi = 0x1.62e42fee00000p-1, kLn2Lo = 0x1.a39ef35793c76p-33;
  const double de = static_cast<double>(e);
  return dadd(dmul(de, kLn2Hi), dadd(ln_m, dmul(de, kLn2Lo)));
}

/// cos(2π·k/2^53) for k < 2^53: k is split into the nearest quarter turn q and a remainder r with
/// |r| ≤ 2^50 (exact in integers), θ = 2π·r/2^53 in [−π/4, π/4], then cos θ or ±sin θ by q from
/// their Taylor series to θ²⁰ (remainder below 2^-60).
TRESOR_HD inline double cos_2pi_k53(uint64_t k) {
  const uint64_t q = (k + (uint64_t{1} << 50)) >> 51;  // 0..4
  const int64_t r = static_cast<int64_t>(k) - static_cast<int64_t>(q << 51);
  const double t = dmul(static_cast<double>(r), 0x1p-53);  // exact
  const double th = dmul(t, 0x1.921fb54442d18p+2);          // 2π
  const double z = dmul(th, th);
  constexpr double kS[9] = {-0x1.5555555555555p-3, 0x1.1111111111111p-7, -0x1.a01a01a01a01ap-13, 0x1.71de3a556c734p-19, -0x1.ae64567f544e4p-26,
                            0x1.6124613a86d09p-33, -0x1.ae7f3e733b81fp-41, 0x1.952c77030ad4ap-49, -0x1.2f49b46814157p-57};
  constexpr double kC[9] = {0x1.5555555555555p-5, -0x1.6c16c16c16c17p-10, 0x1.a01a01a01a01ap-16, -0x1.27e4fb7789f5cp-22, 0x1.1eed8eff8d898p-29,
                            -0x1.93974a8c07c9dp-37, 0x1.ae7f3e733b81fp-45, -0x1.6827863b97d97p-53, 0x1.e542ba4020225p-62};
  double ps = kS[8], pc = kC[8];
  for (int i = 7; i >= 0; --i) {
    ps = dadd(dmul(ps, z), kS[i]);
    pc = dadd(dmul(pc, z), kC[i]);
  }
  const double sin_th = dadd(th, dmul(dmul(th, z), ps));
  const double cos_th = dadd(dsub(1.0, dmul(z, 0.5)), dmul(dmul(z, z), pc));
  switch (q & 3) {
    case 0: return cos_th;
    case 1: return -sin_th;
    case 2: return -cos_th;
    default: return sin_th;
  }
}

/// Normal deviate k (0-based) of the noise stream whose SplitMix64 state is `state` (Box–Muller
/// with u1 = 1 − U₁ in (0, 1] and U₂, each 53-bit uniforms as tresor/splitmix.h's uniform()).
TRESOR_HD inline double noise_normal(uint64_t state, uint64_t k) {
  const uint64_t a = splitmix_at(state, 2 * k + 1) >> 11, b = splitmix_at(state, 2 * k + 2) >> 11;
  const double u1 = dsub(1.0, dmul(static_cast<double>(a), 0x1p-53));  // exact, in (0, 1]
  return dmul(dsqrt(dmul(-2.0, log_positive(u1))), cos_2pi_k53(b));
}

/// The patch's corner on one axis when centred on source coordinate c (PatchSampler's rule: half
/// the patch before c, moved inside the volume of n voxels).
TRESOR_HD inline uint64_t centred_corner(uint64_t c, uint64_t patch, uint64_t n) {
  const uint64_t half = patch / 2;
  const uint64_t lo = c > half ? c - half : 0;
  return lo < n - patch ? lo : n - patch;
}

/// sin(2π·k/2^53) = cos(2π·k/2^53 − π/2), for any signed k (taken modulo 2^53).
TRESOR_HD inline double sin_2pi_k53(int64_t k) {
  constexpr uint64_t kMask = (uint64_t{1} << 53) - 1;
  return cos_2pi_k53((static_cast<uint64_t>(k) - (uint64_t{1} << 51)) & kMask);
}
TRESOR_HD inline double cos_2pi_signed_k53(int64_t k) {
  constexpr uint64_t kMask = (uint64_t{1} << 53) - 1;
  return cos_2pi_k53(static_cast<uint64_t>(k) & kMask);
}

/// out = a·b for row-major 3×3 matrices, each entry summed left to right.
TRESOR_HD inline void mat3_product(const double* a, const double* b, double* out) {
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j) out[3 * i + j] = dadd(dadd(dmul(a[3 * i], b[j]), dmul(a[3 * i + 1], b[3 + j])), dmul(a[3 * i + 2], b[6 + j]));
}

/// The spatial transform's 3×3 matrix (row-major) for rotations about the x, y and z axes of
/// turns[a]·2^-53 of a full turn each and a scaling factor: M = Rz·Ry·Rx·(scaling·I), the
/// composition of batchgeneratorsv2's create_affine_matrix_3d (nnU-Net v2's SpatialTransform).
/// batchgeneratorsv2 multiplies its sampling grid's row vectors by M (grid @ M), so patch offset d
/// (from the patch's centre, in voxels; x, y, z as grid_sample orders them) samples the source at
/// centre + Mᵀ·d (spatial_source); a scaling above 1 takes in a larger region and shows structures
/// smaller ("larger numbers = smaller objects", as batchgeneratorsv2 says). Computed with exactly
/// rounded operations in a fixed order: the same bits on every machine.
TRESOR_HD inline void rotation_scaling(const int64_t turns[3], double scaling, double m[9]) {
  const double cx = cos_2pi_signed_k53(turns[0]), sx = sin_2pi_k53(turns[0]);
  const double cy = cos_2pi_signed_k53(turns[1]), sy = sin_2pi_k53(turns[1]);
  const double cz = cos_2pi_signed_k53(turns[2]), sz = sin_2pi_k53(turns[2]);
  const double rx[9] = {1, 0, 0, 0, cx, -sx, 0, sx, cx};
  const double ry[9] = {cy, 0, sy, 0, 1, 0, -sy, 0, cy};
  const double rz[9] = {cz, -sz, 0, sz, cz, 0, 0, 0, 1};
  double zy[9], zyx[9];
  mat3_product(rz, ry, zy);
  mat3_product(zy, rx, zyx);
  for (int i = 0; i < 9; ++i) m[i] = dmul(zyx[i], scaling);
}

/// The source position of a patch voxel under the spatial transform m (rotation_scaling's): p[a] is
/// the voxel's position in the patch on axis a after the flips are undone (0..n[a]−1), corner[a]
/// the corner of the untransformed patch; the patch rotates and scales about its centre
/// c = corner + (n − 1)/2: s = c + mᵀ·(p − (n − 1)/2), each sum left to right.
TRESOR_HD inline void spatial_source(const double m[9], const uint64_t corner[3], const uint64_t n[3], const uint64_t p[3], double s[3]) {
  double d[3], c[3];
  for (int a = 0; a < 3; ++a) {
    const double h = dmul(static_cast<double>(n[a] - 1), 0.5);  // exact
    c[a] = dadd(static_cast<double>(corner[a]), h);             // exact below 2^52
    d[a] = dsub(static_cast<double>(p[a]), h);                  // exact
  }
  for (int a = 0; a < 3; ++a) s[a] = dadd(c[a], dadd(dadd(dmul(m[a], d[0]), dmul(m[3 + a], d[1])), dmul(m[6 + a], d[2])));
}

/// ⌊x⌋ for |x| < 2^62, exact (conversion truncates toward zero; one step down for negatives).
TRESOR_HD inline int64_t floor_int(double x) {
  int64_t t = static_cast<int64_t>(x);
  if (static_cast<double>(t) > x) t -= 1;
  return t;
}

/// The eight voxels around a source position and their trilinear weights, in a fixed order (x
/// fastest); a voxel outside the volume has index −1. The weights are products of (1 − f) and f per
/// axis, f the position's fraction past the lower voxel.
struct Neighbours {
  int64_t index[8];
  double weight[8];
};
TRESOR_HD inline Neighbours neighbours(const uint64_t n[3], const double s[3]) {
  int64_t lo[3];
  double w[3][2];
  for (int a = 0; a < 3; ++a) {
    // Far outside the volume: any position beyond one voxel past the edge reads nothing (NaN too:
    // written so that it takes the first branch).
    const double lim = static_cast<double>(n[a]) + 1;
    const double x = !(s[a] >= -2.0) ? -2.0 : (s[a] > lim ? lim : s[a]);
    lo[a] = floor_int(x);
    // Exact for x ≥ 0; rounded (the same on both sides) for x in (−1, 0), where only the weight of
    // the voxel inside matters.
    const double f = dsub(x, static_cast<double>(lo[a]));
    w[a][0] = dsub(1.0, f);
    w[a][1] = f;
  }
  Neighbours nb{};
  int k = 0;
  for (int dz = 0; dz < 2; ++dz)
    for (int dy = 0; dy < 2; ++dy)
      for (int dx = 0; dx < 2; ++dx, ++k) {
        const int64_t x = lo[0] + dx, y = lo[1] + dy, z = lo[2] + dz;
        const bool inside = x >= 0 && y >= 0 && z >= 0 && static_cast<uint64_t>(x) < n[0] && static_cast<uint64_t>(y) < n[1] && static_cast<uint64_t>(z) < n[2];
        nb.index[k] = inside ? static_cast<int64_t>(static_cast<uint64_t>(x) + n[0] * (static_cast<uint64_t>(y) + n[1] * static_cast<uint64_t>(z))) : -1;
        nb.weight[k] = dmul(dmul(w[2][dz], w[1][dy]), w[0][dx]);
      }
  return nb;
}

/// Trilinear interpolation of a volume at a source position, zero outside the volume (as
/// batchgeneratorsv2 samples images: grid_sample, bilinear, zero padding). `at(i)` gives voxel i's
/// value; the sum runs in Neighbours' order.
template <typename At>
TRESOR_HD inline double trilinear(const At& at, const Neighbours& nb) {
  double v = 0;
  for (int k = 0; k < 8; ++k) {
    if (nb.index[k] >= 0) v = dadd(v, dmul(nb.weight[k], at(static_cast<uint64_t>(nb.index[k]))));
  }
  return v;
}

/// The label at a source position: each label's trilinear weight among the eight voxels inside the
/// volume (summed in Neighbours' order), the largest wins, a tie goes to the smaller label; where
/// no voxel inside the volume has weight, 0 (background). Outside the volume no label has weight.
/// This follows batchgeneratorsv2's segmentation sampling as nnU-Net v2 configures it (each label's
/// indicator interpolated with zero padding, the largest taken).
template <typename At>
TRESOR_HD inline uint8_t label_at(const At& at, const Neighbours& nb) {
  // No array indexed at run time (on a GPU such arrays go to local memory, device memory that no
  // wipe reaches): the eight labels packed in one word, the voxels inside in a bit mask, the loops
  // unrolled on the device. Each label's weight is summed over the eight voxels in Neighbours'
  // order, once for every voxel holding it (the same sum each time).
  uint64_t labels = 0;
  unsigned inside = 0;
  TRESOR_UNROLL
  for (int k = 0; k < 8; ++k) {
    if (nb.index[k] >= 0 && nb.weight[k] > 0) {
      inside |= 1u << k;
      labels |= static_cast<uint64_t>(static_cast<uint8_t>(at(static_cast<uint64_t>(nb.index[k])))) << (8 * k);
    }
  }
  uint8_t best = 0;  // background where no voxel inside the volume has weight
  double best_weight = 0;
  TRESOR_UNROLL
  for (int k = 0; k < 8; ++k) {
    if ((inside >> k & 1u) == 0) continue;
    const auto l = static_cast<uint8_t>(labels >> (8 * k));
    double w = 0;
    TRESOR_UNROLL
    for (int j = 0; j < 8; ++j) {
      if ((inside >> j & 1u) != 0 && static_cast<uint8_t>(labels >> (8 * j)) == l) w = dadd(w, nb.weight[j]);
    }
    if (w > best_weight || (w == best_weight && l < best)) {
      best = l;
      best_weight = w;
    }
  }
  return best;
}

/// The contrast change (nnU-Net's ContrastTransform with preserve_range: x' = (x − mean)·factor +
/// mean, clipped to the patch's min and max before the change) needs the patch's mean, min and max.
/// They are reduced in one fixed order on every device: thread t of 256 sums voxels t, t + 256,
/// t + 512, … in that order in double (so that a warp's loads are coalesced on the GPU), then a
/// tree halves the partials (i with i + 128, then i with i + 64, …). The CUDA kernel runs this with
/// one block per patch; contrast_patch runs the same steps one after another.
inline constexpr unsigned kContrastThreads = 256;
struct PatchStats {
  double sum, sumsq;  // Σx and Σx² (the gamma change's retained statistics)
  float lo, hi;
};
/// Thread t's share, of the voxels times `sign` (±1: the gamma change's inversion; exact).
TRESOR_HD inline PatchStats contrast_partial(const float* x, uint64_t m, unsigned t, float sign = 1) {
  PatchStats s{0.0, 0.0, 0x1.fffffep127f, -0x1.fffffep127f};
  for (uint64_t i = t; i < m; i += kContrastThreads) {
    const float v = sign * x[i];
    const double d = static_cast<double>(v);
    s.sum = dadd(s.sum, d);
    s.sumsq = dadd(s.sumsq, dmul(d, d));
    s.lo = v < s.lo ? v : s.lo;
    s.hi = v > s.hi ? v : s.hi;
  }
  return s;
}
TRESOR_HD inline PatchStats combine_stats(const PatchStats& a, const PatchStats& b) {
  return PatchStats{dadd(a.sum, b.sum), dadd(a.sumsq, b.sumsq), b.lo < a.lo ? b.lo : a.lo, b.hi > a.hi ? b.hi : a.hi};
}
/// One voxel after the change, from the reduced statistics of a patch of m voxels.
TRESOR_HD inline float contrast_voxel(float x, const PatchStats& total, uint64_t m, double factor) {
  const double mean = ddiv(total.sum, static_cast<double>(m));
  const double v = dadd(dmul(dsub(static_cast<double>(x), mean), factor), mean);
  const double lo = static_cast<double>(total.lo), hi = static_cast<double>(total.hi);
  return static_cast<float>(v < lo ? lo : (v > hi ? hi : v));
}
/// The reduction of a patch (times `sign`) in host memory, in the kernel's order.
inline PatchStats reduce_patch(const float* x, uint64_t m, float sign = 1) {
  PatchStats part[kContrastThreads];
  for (unsigned t = 0; t < kContrastThreads; ++t) part[t] = contrast_partial(x, m, t, sign);
  for (unsigned stride = kContrastThreads / 2; stride > 0; stride /= 2) {
    for (unsigned t = 0; t < stride; ++t) part[t] = combine_stats(part[t], part[t + stride]);
  }
  return part[0];
}
/// The whole contrast change on a patch in host memory, in the kernel's order.
inline void contrast_patch(float* x, uint64_t m, double factor) {
  if (m == 0) return;
  const PatchStats total = reduce_patch(x, m);
  for (uint64_t i = 0; i < m; ++i) x[i] = contrast_voxel(x[i], total, m, factor);
}

/// e^y for y ≤ 0 (0 below −708, where the result would not be a normal double): y = k·ln 2 + r
/// with k = ⌊y/ln 2 + ½⌋ and |r| ≤ ~0.35 (ln 2 split so that k·ln2_hi is exact), e^r from its
/// Taylor series to r¹⁴/14! (remainder below 2^-60), times 2^k built from its bits.
TRESOR_HD inline double exp_nonpositive(double y) {
  if (!(y > -708.0)) return 0.0;
  if (y >= 0) return 1.0;
  constexpr double kInvLn2 = 0x1.71547652b82fep+0;
  constexpr double kLn2Hi = 0x1.62e42fee00000p-1, kLn2Lo = 0x1.a39ef35793c76p-33;
  const int64_t k = floor_int(dadd(dmul(y, kInvLn2), 0.5));
  const double kd = static_cast<double>(k);
  const double r = dsub(dsub(y, dmul(kd, kLn2Hi)), dmul(kd, kLn2Lo));
  constexpr double kInvFact[15] = {1.0, 0x1.0p+0, 0x1.0p-1, 0x1.5555555555555p-3, 0x1.5555555555555p-5, 0x1.1111111111111p-7,
                                   0x1.6c16c16c16c17p-10, 0x1.a01a01a01a01ap-13, 0x1.a01a01a01a01ap-16, 0x1.71de3a556c734p-19, 0x1.27e4fb7789f5cp-22,
                                   0x1.ae64567f544e4p-26, 0x1.1eed8eff8d898p-29, 0x1.6124613a86d09p-33, 0x1.93974a8c07c9dp-37};
  double p = kInvFact[14];
  for (int i = 13; i >= 0; --i) p = dadd(dmul(p, r), kInvFact[i]);
  return dmul(p, bits_double(static_cast<uint64_t>(k + 1023) << 52));  // k ≥ −1022: a normal power of two
}

/// v^γ for v in [0, 1] and γ > 0: 0 for v below the smallest normal double (v^γ < 2^-715 there),
/// else e^(γ·ln v), both written with + − × ÷ only (log_positive, exp_nonpositive).
TRESOR_HD inline double pow_unit(double v, double gamma) {
  if (!(v >= 0x1p-1022)) return 0.0;
  if (v >= 1) return 1.0;
  return exp_nonpositive(dmul(gamma, log_positive(v)));
}

/// The gamma change (nnU-Net v2's GammaTransform with retain_stats, batchgeneratorsv2's steps):
/// with `invert` the voxels are negated first and last; mean and standard deviation (n − 1, as
/// torch.std) of the patch are kept; y = ((x − min)/max(range, 1e-7))^γ·range + min; then
/// y' = (y − mean_y)·(sd/max(sd_y, 1e-7)) + mean. Two reductions in the contrast's order.
/// Voxel i in the first pass, from the statistics of the (signed) patch:
TRESOR_HD inline float gamma_powered(float x, float sign, const PatchStats& st, double gamma) {
  const double lo = static_cast<double>(st.lo), range = dsub(static_cast<double>(st.hi), lo);
  const double v = ddiv(dsub(static_cast<double>(sign * x), lo), range > 1e-7 ? range : 1e-7);
  return static_cast<float>(dadd(dmul(pow_unit(v, gamma), range), lo));
}
/// The mean and standard deviation (n − 1) of reduced statistics of m voxels.
TRESOR_HD inline void mean_sd(const PatchStats& st, uint64_t m, double* mean, double* sd) {
  const double n = static_cast<double>(m);
  *mean = ddiv(st.sum, n);
  const double var = m > 1 ? ddiv(dsub(st.sumsq, dmul(st.sum, *mean)), dsub(n, 1.0)) : 0.0;
  *sd = var > 0 ? dsqrt(var) : 0.0;
}
/// Voxel i in the second pass: y (the first pass's) back to the kept statistics, and the sign.
TRESOR_HD inline float gamma_restored(float y, float sign, double mean, double sd, double mean_y, double sd_y) {
  const double v = dadd(dmul(dsub(static_cast<double>(y), mean_y), ddiv(sd, sd_y > 1e-7 ? sd_y : 1e-7)), mean);
  return sign * static_cast<float>(v);
}
/// The whole gamma change on a patch in host memory, in the kernel's order.
inline void gamma_patch(float* x, uint64_t m, double gamma, bool invert) {
  if (m == 0) return;
  const float sign = invert ? -1.0f : 1.0f;
  const PatchStats before = reduce_patch(x, m, sign);
  double mean = 0, sd = 0;
  mean_sd(before, m, &mean, &sd);
  for (uint64_t i = 0; i < m; ++i) x[i] = gamma_powered(x[i], sign, before, gamma);
  const PatchStats after = reduce_patch(x, m);
  double mean_y = 0, sd_y = 0;
  mean_sd(after, m, &mean_y, &sd_y);
  for (uint64_t i = 0; i < m; ++i) x[i] = gamma_restored(x[i], sign, mean, sd, mean_y, sd_y);
}

/// Gaussian blur (nnU-Net v2's GaussianBlurTransform, batchgeneratorsv2's blur_dimension): one
/// 1-D kernel per axis, applied along z, then y, then x (nnU-Net's arrays are (c, z, y, x) and
/// blur_dimension takes dimension 0 first), each pass rounded to float (as torch's float32
/// passes). The kernel has k taps, k the odd number nearest σ·6 + ½ (its
/// _compute_kernel_size with truncate 6: Python's round, half to even, then the odd neighbour on
/// the side of the unrounded value), at x = −(k−1)/2 … (k−1)/2, weights e^(−x²/2σ²) over their sum;
/// the patch is extended by reflection about its edge voxels (torch's "reflect" padding, repeated
/// where an axis is not longer than the kernel's half, where torch refuses). Weights in double with
/// exp_nonpositive (torch builds them in float32), sums over the taps in order.
inline constexpr unsigned kMaxBlurTaps = 31;  // σ ≤ 5
struct BlurKernel {
  unsigned taps;
  double w[kMaxBlurTaps];
};
/// round(x) with ties to even (Python's round), for 0 ≤ x < 2^52.
TRESOR_HD inline int64_t round_half_even(double x) {
  const int64_t f = floor_int(x);
  const double r = dsub(x, static_cast<double>(f));  // exact
  if (r > 0.5) return f + 1;
  if (r < 0.5) return f;
  return f % 2 == 0 ? f : f + 1;
}
TRESOR_HD inline unsigned blur_taps(double sigma) {
  const double n = dadd(dmul(sigma, 6.0), 0.5);
  const int64_t r = round_half_even(n);
  if (r % 2 == 1) return static_cast<unsigned>(r);
  return static_cast<unsigned>(dsub(n, static_cast<double>(r)) >= 0 ? r + 1 : r - 1);
}
/// The kernel for 0 < σ ≤ 5 (PatchSampler::check refuses other ranges).
TRESOR_HD inline BlurKernel blur_kernel(double sigma) {
  BlurKernel k{};
  k.taps = blur_taps(sigma);
  const double h = static_cast<double>(k.taps - 1) / 2;  // exact
  double sum = 0;
  for (unsigned j = 0; j < k.taps; ++j) {
    const double t = ddiv(dsub(static_cast<double>(j), h), sigma);
    k.w[j] = exp_nonpositive(dmul(-0.5, dmul(t, t)));
    sum = dadd(sum, k.w[j]);
  }
  for (unsigned j = 0; j < k.taps; ++j) k.w[j] = ddiv(k.w[j], sum);
  return k;
}
/// Index i (possibly outside 0..n−1) reflected about the edge voxels until it lies inside.
TRESOR_HD inline uint64_t reflect_index(int64_t i, uint64_t n) {
  if (n == 1) return 0;
  const auto period = static_cast<int64_t>(2 * (n - 1));
  int64_t r = i % period;
  if (r < 0) r += period;
  return static_cast<uint64_t>(r < static_cast<int64_t>(n) ? r : period - r);
}
/// Voxel i of one pass along `axis` over a patch of n voxels (x fastest).
TRESOR_HD inline float blur_voxel(const float* in, const uint64_t n[3], unsigned axis, const BlurKernel& k, uint64_t i) {
  // Selected, not indexed by `axis`: arrays indexed at run time go to local memory on a GPU.
  const uint64_t ca = axis == 0 ? i % n[0] : (axis == 1 ? (i / n[0]) % n[1] : i / (n[0] * n[1]));
  const uint64_t na = axis == 0 ? n[0] : (axis == 1 ? n[1] : n[2]);
  const uint64_t stride = axis == 0 ? 1 : (axis == 1 ? n[0] : n[0] * n[1]);
  const uint64_t base = i - ca * stride;
  const auto h = static_cast<int64_t>(k.taps / 2);
  double v = 0;
  for (unsigned j = 0; j < k.taps; ++j) {
    const uint64_t q = reflect_index(static_cast<int64_t>(ca) + static_cast<int64_t>(j) - h, na);
    v = dadd(v, dmul(k.w[j], static_cast<double>(in[base + q * stride])));
  }
  return static_cast<float>(v);
}

/// Simulated low resolution (nnU-Net v2's SimulateLowResolutionTransform, one factor for all
/// axes): the patch is taken to round(n·scale) voxels per axis (Python's round, at least 1, at
/// most n: a scale above 1 is refused by PatchSampler::check and changes nothing here) with
/// torch's "nearest-exact" and back to n with its "trilinear" (align_corners false), in the
/// patch's unflipped frame (nnU-Net mirrors last, and nearest-exact does not commute with a flip):
/// bit a of `flipped` set means axis a of the patch is mirrored. The source indices and weights
/// are those of Debian 12's torch 1.13 (augment_test compares them with
/// torch.nn.functional.interpolate: nearest-exact for every size pair up to 64, trilinear from
/// every size up to 24 to every larger one up to 48): nearest-exact takes ⌊float((o + ½)·s)⌋ (at
/// most in − 1) with s = in/out rounded to float; linear takes x = s·(o + ½) − ½ in double (0
/// below 0), i0 = ⌊x⌋, i1 = i0 + 1 inside the axis, λ1 = float(x − i0), λ0 = 1 − λ1 in float.
/// (Later torch releases round x to float first: weights that differ in the last bits.) The eight
/// products are summed in double, x fastest, and rounded to float (torch's float sums differ in
/// the last bits).
TRESOR_HD inline uint64_t lowres_size(uint64_t n, double scale) {
  const int64_t r = round_half_even(dmul(static_cast<double>(n), scale));
  if (r < 1) return 1;
  return static_cast<uint64_t>(r) < n ? static_cast<uint64_t>(r) : n;
}
TRESOR_HD inline double float_ratio(uint64_t in, uint64_t out) {
  // in/out rounded once to float: rounding the double quotient again gives the same float for
  // integers below 2^24 (a quotient's distance from a float midpoint is 0 or ≥ 2^-49 relative).
  return static_cast<double>(static_cast<float>(ddiv(static_cast<double>(in), static_cast<double>(out))));
}
TRESOR_HD inline uint64_t nearest_exact_index(uint64_t o, uint64_t in, uint64_t out) {
  const auto v = static_cast<float>(dmul(dadd(static_cast<double>(o), 0.5), float_ratio(in, out)));
  const auto i = static_cast<uint64_t>(v);  // v ≥ 0: truncation is the floor
  return i < in - 1 ? i : in - 1;
}
struct LinearTap {
  uint64_t i0, i1;
  double l0, l1;
};
TRESOR_HD inline LinearTap linear_tap(uint64_t o, uint64_t in, uint64_t out) {
  double x = dsub(dmul(float_ratio(in, out), dadd(static_cast<double>(o), 0.5)), 0.5);
  if (x < 0) x = 0;
  LinearTap t{};
  t.i0 = static_cast<uint64_t>(x);
  t.i1 = t.i0 + (t.i0 < in - 1 ? 1 : 0);
  const auto l1 = static_cast<float>(dsub(x, static_cast<double>(t.i0)));
  t.l1 = static_cast<double>(l1);
  t.l0 = static_cast<double>(static_cast<float>(dsub(1.0, t.l1)));  // 1 − λ1 in float
  return t;
}
/// Voxel i of the downsampled patch (small[3] voxels, in the unflipped frame) from the patch (n
/// voxels, mirrored on the axes set in `flipped`).
TRESOR_HD inline float lowres_down_voxel(const float* in, const uint64_t n[3], const uint64_t small[3], unsigned flipped, uint64_t i) {
  const uint64_t c[3] = {i % small[0], (i / small[0]) % small[1], i / (small[0] * small[1])};
  uint64_t s[3];
  for (int a = 0; a < 3; ++a) {
    s[a] = nearest_exact_index(c[a], n[a], small[a]);
    if ((flipped >> a) & 1u) s[a] = n[a] - 1 - s[a];
  }
  return in[s[0] + n[0] * (s[1] + n[1] * s[2])];
}
/// Voxel i of the patch (n voxels, mirrored on the axes set in `flipped`) taken back from the
/// downsampled one.
TRESOR_HD inline float lowres_up_voxel(const float* small_in, const uint64_t small[3], const uint64_t n[3], unsigned flipped, uint64_t i) {
  const uint64_t c[3] = {i % n[0], (i / n[0]) % n[1], i / (n[0] * n[1])};
  LinearTap t[3];
  for (int a = 0; a < 3; ++a) t[a] = linear_tap((flipped >> a) & 1u ? n[a] - 1 - c[a] : c[a], small[a], n[a]);
  double v = 0;
  for (int dz = 0; dz < 2; ++dz)
    for (int dy = 0; dy < 2; ++dy)
      for (int dx = 0; dx < 2; ++dx) {
        const uint64_t x = dx ? t[0].i1 : t[0].i0, y = dy ? t[1].i1 : t[1].i0, z = dz ? t[2].i1 : t[2].i0;
        const double w = dmul(dmul(dz ? t[2].l1 : t[2].l0, dy ? t[1].l1 : t[1].l0), dx ? t[0].l1 : t[0].l0);
        v = dadd(v, dmul(w, static_cast<double>(small_in[x + small[0] * (y + small[1] * z)])));
      }
  return static_cast<float>(v);
}

/// What happens to a patch after its per-voxel changes (augment_voxel), in nnU-Net v2's order:
/// blur (skipped where every σ is 0), contrast, low resolution, the inverted gamma, the gamma
/// (each skipped at 1).
struct PatchFinish {
  double blur_sigma[3] = {0, 0, 0};
  double contrast = 1;
  double lowres_scale = 1;
  unsigned flipped = 0;  // bit a: the patch is mirrored on axis a (the low resolution undoes it)
  double gamma_inverted = 1, gamma = 1;
  TRESOR_HD bool blurred() const { return blur_sigma[0] > 0 || blur_sigma[1] > 0 || blur_sigma[2] > 0; }
  TRESOR_HD bool any() const { return blurred() || contrast != 1 || lowres_scale != 1 || gamma_inverted != 1 || gamma != 1; }
  TRESOR_HD bool needs_scratch() const { return blurred() || lowres_scale != 1; }
};
/// The whole of it on a patch of n voxels in host memory, in the kernels' order; `scratch` holds
/// as many floats as the patch (read only by the blur and the low resolution: see needs_scratch).
inline void finish_patch(float* x, const uint64_t n[3], const PatchFinish& f, float* scratch) {
  const uint64_t m = n[0] * n[1] * n[2];
  if (m == 0) return;
  if (f.blurred()) {
    float* from = x;
    float* to = scratch;
    for (unsigned a = 3; a-- > 0;) {  // z, y, x
      if (!(f.blur_sigma[a] > 0)) continue;
      const BlurKernel k = blur_kernel(f.blur_sigma[a]);
      for (uint64_t i = 0; i < m; ++i) to[i] = blur_voxel(from, n, a, k, i);
      float* t = from;
      from = to;
      to = t;
    }
    if (from != x) std::memcpy(x, from, m * sizeof(float));
  }
  if (f.contrast != 1) contrast_patch(x, m, f.contrast);
  if (f.lowres_scale != 1) {
    const uint64_t small[3] = {lowres_size(n[0], f.lowres_scale), lowres_size(n[1], f.lowres_scale), lowres_size(n[2], f.lowres_scale)};
    const uint64_t ms = small[0] * small[1] * small[2];
    for (uint64_t i = 0; i < ms; ++i) scratch[i] = lowres_down_voxel(x, n, small, f.flipped, i);
    for (uint64_t i = 0; i < m; ++i) x[i] = lowres_up_voxel(scratch, small, n, f.flipped, i);
  }
  if (f.gamma_inverted != 1) gamma_patch(x, m, f.gamma_inverted, true);
  if (f.gamma != 1) gamma_patch(x, m, f.gamma, false);
}

/// One augmented image voxel: the source value scaled and shifted (in double), plus noise_sd times
/// the voxel's normal deviate when noise_sd > 0, rounded to float.
TRESOR_HD inline float augment_voxel(float src, double scale, double shift, double noise_sd, uint64_t noise_state, uint64_t k) {
  double v = dadd(dmul(static_cast<double>(src), scale), shift);
  if (noise_sd > 0) v = dadd(v, dmul(noise_sd, noise_normal(noise_state, k)));
  return static_cast<float>(v);
}

}  // namespace tresor::ct::augment_hd
