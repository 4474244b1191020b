// The CT preprocessing pipeline's per-voxel arithmetic (include/tresor/gpu/ct.h), written once for
// the CUDA kernels (kernels/ct.cu) and their CPU emulation (kernels/ct_plan.cc), which runs this
// same code voxel by voxel and is compared with the CPU reference (tresor::ct::prepare) on every
// machine. Plain C++ (no library types beyond <cstdint>): nvcc compiles it as device code, g++ as
// host code under the project's warnings.
//
// What the host computes once per call (kernels/ct_plan.cc) and these functions only read: the
// per-axis source coordinates of the output grid (the CPU reference's rule, evaluated by the same
// expressions in double on the host, so both sides agree to the bit), the Gaussian taps (double),
// the statistics (from the histogram), the window's scale.
#pragma once

#include <cstddef>
#include <cstdint>

#include "hd.h"
#include "tresor/rn.h"
#include "tresor/ct/hessian.h"

namespace tresor::gpu::ct {

inline constexpr int kHistBins = 65536;        // one per int16 value; bin = value + 32768
inline constexpr int kHistOffset = 32768;
inline constexpr int kHistSharedBins = 8192;   // per-block shared-memory window of the histogram
inline constexpr int kGaussTile = 128;         // outputs per block along x in the tiled x pass
inline constexpr int kThreads = 256;           // threads per block of the 1D kernels

/// One output coordinate along one axis: its two source voxels and the weight of the second
/// (resample_linear's rule: x = j·s'/s, i0 = min(⌊x⌋, n−1), i1 = min(i0+1, n−1), w = x − ⌊x⌋).
struct LerpTap {
  uint64_t i0 = 0, i1 = 0;
  double w = 0;
};

/// The output grid; at most 2^31 voxels (the CPU reference refuses more), so 32-bit indices.
struct Grid {
  uint32_t nx = 0, ny = 0, nz = 0;
};

/// The constants of the fused resample → z-score / window pass.
struct FusedParams {
  uint64_t in_nx = 0, in_ny = 0;             // the source's row and slice strides are nx, nx·ny
  double lower = 0, upper = 0, mean = 0, sd = 1;  // sd already max(sd, 1e-8)
  double win_lower = 0, win_upper = 1, win_scale = 1;  // win_scale = 1 / (upper − lower)
};

// Double arithmetic rounded exactly as the host's SSE2 code (tresor/rn.h).
using tresor::rn::dadd;
using tresor::rn::dmul;
using tresor::rn::dsub;
// std::clamp's expression (v < lo ? lo : hi < v ? hi : v).
TRESOR_HD inline double clamp_d(double v, double lo, double hi) { return v < lo ? lo : (hi < v ? hi : v); }

/// The trilinear sample at the output voxel whose per-axis taps are tx, ty, tz, exactly as
/// resample_linear computes it (the same products and sums in the same order, in double), rounded
/// to float as the reference stores it.
TRESOR_HD inline float lerp_voxel(const int16_t* hu, uint64_t nx, uint64_t ny, const LerpTap& tx, const LerpTap& ty, const LerpTap& tz) {
  const uint64_t s0 = nx * (ty.i0 + ny * tz.i0), s1 = nx * (ty.i1 + ny * tz.i0);
  const uint64_t s2 = nx * (ty.i0 + ny * tz.i1), s3 = nx * (ty.i1 + ny * tz.i1);
  const double ux = dsub(1.0, tx.w), uy = dsub(1.0, ty.w), uz = dsub(1.0, tz.w);
  const double c00 = dadd(dmul(static_cast<double>(hu[tx.i0 + s0]), ux), dmul(static_cast<double>(hu[tx.i1 + s0]), tx.w));
  const double c10 = dadd(dmul(static_cast<double>(hu[tx.i0 + s1]), ux), dmul(static_cast<double>(hu[tx.i1 + s1]), tx.w));
  const double c01 = dadd(dmul(static_cast<double>(hu[tx.i0 + s2]), ux), dmul(static_cast<double>(hu[tx.i1 + s2]), tx.w));
  const double c11 = dadd(dmul(static_cast<double>(hu[tx.i0 + s3]), ux), dmul(static_cast<double>(hu[tx.i1 + s3]), tx.w));
  const double c0 = dadd(dmul(c00, uy), dmul(c10, ty.w)), c1 = dadd(dmul(c01, uy), dmul(c11, ty.w));
  return static_cast<float>(dadd(dmul(c0, uz), dmul(c1, tz.w)));
}

/// normalise(): clip to the percentiles, subtract the mean, divide by the standard deviation.
TRESOR_HD inline float z_score(float iso, const FusedParams& p) {
  return static_cast<float>(dsub(clamp_d(static_cast<double>(iso), p.lower, p.upper), p.mean) / p.sd);
}
/// window(): clip to [lower, upper], map onto [0, 1].
TRESOR_HD inline float window_value(float iso, const FusedParams& p) {
  return static_cast<float>(dmul(dsub(clamp_d(static_cast<double>(iso), p.win_lower, p.win_upper), p.win_lower), p.win_scale));
}

/// SciPy's "reflect" mirror of index i into 0..n−1 (… c b a | a b c …), any distance out.
TRESOR_HD inline int64_t reflect_index(int64_t i, int64_t n) {
  if (n == 1) return 0;
  const int64_t period = 2 * n;
  i %= period;
  if (i < 0) i += period;
  return i < n ? i : period - 1 - i;
}

/// One output of the separable Gaussian along an axis: Σ_t taps[t]·src[base + at(c − r + t)·stride]
/// with mirrored positions, accumulated in double in tap order (as the reference), stored as float.
/// dmul/dadd: nvcc would contract the product and the sum into one fused multiply-add, which the
/// reference (built with -ffp-contract=off) never does; with them the device gives its bits.
TRESOR_HD inline float convolve_at(const float* src, uint64_t base, uint64_t stride, int64_t c, int64_t n, const double* taps, int r) {
  double acc = 0;
  const int taps_n = 2 * r + 1;
  if (c >= r && c + r < n) {
    const float* p = src + base + static_cast<uint64_t>(c - r) * stride;
    for (int t = 0; t < taps_n; ++t) acc = dadd(acc, dmul(taps[t], static_cast<double>(p[static_cast<uint64_t>(t) * stride])));
  } else {
    for (int t = 0; t < taps_n; ++t) {
      acc = dadd(acc, dmul(taps[t], static_cast<double>(src[base + static_cast<uint64_t>(reflect_index(c - r + t, n)) * stride])));
    }
  }
  return static_cast<float>(acc);
}

/// np.gradient's stencil at index i of n along an axis (edge_order 1): (f[i+hi] − f[i+lo])·w.
struct Stencil {
  int64_t lo, hi;
  double w;
};
TRESOR_HD inline Stencil stencil_at(int64_t i, int64_t n) {
  if (i == 0) return Stencil{0, 1, 1.0};
  if (i == n - 1) return Stencil{-1, 0, 1.0};
  return Stencil{-1, 1, 0.5};
}

/// The six Hessian elements xx xy xz yy yz zz of the smoothed volume g at (x, y, z), by the
/// reference's rules (core/ct/frangi.cc): inside (2 ≤ coordinate ≤ n−3 on every axis) the wide
/// stencils /4; elsewhere np.gradient of np.gradient with one-sided differences on each edge.
TRESOR_HD inline void hessian_at(const float* g, const Grid& d, uint32_t x, uint32_t y, uint32_t z, double h[6]) {
  const int64_t sx = 1, sy = d.nx, sz = static_cast<int64_t>(d.nx) * d.ny;
  const int64_t p = x + sy * y + sz * z;
  if (z >= 2 && z + 2 < d.nz && y >= 2 && y + 2 < d.ny && x >= 2 && x + 2 < d.nx) {
    const float* f = g + p;
    auto v = [f](int64_t o) { return static_cast<double>(f[o]); };
    const double c2 = 2 * v(0);
    h[0] = (v(2 * sx) - c2 + v(-2 * sx)) * 0.25;
    h[3] = (v(2 * sy) - c2 + v(-2 * sy)) * 0.25;
    h[5] = (v(2 * sz) - c2 + v(-2 * sz)) * 0.25;
    h[1] = (v(sx + sy) - v(sx - sy) - v(-sx + sy) + v(-sx - sy)) * 0.25;
    h[2] = (v(sx + sz) - v(sx - sz) - v(-sx + sz) + v(-sx - sz)) * 0.25;
    h[4] = (v(sy + sz) - v(sy - sz) - v(-sy + sz) + v(-sy - sz)) * 0.25;
    return;
  }
  const int64_t c[3] = {x, y, z};
  const int64_t n[3] = {d.nx, d.ny, d.nz};
  const int64_t s[3] = {sx, sy, sz};
  // The first derivative along axis a at linear position q, whose coordinate along b is c[b] + db.
  auto first = [&](int64_t q, int a, int b, int64_t db) {
    const int64_t ca = a == b ? c[a] + db : c[a];
    const Stencil sa = stencil_at(ca, n[a]);
    return sa.w * (static_cast<double>(g[q + sa.hi * s[a]]) - static_cast<double>(g[q + sa.lo * s[a]]));
  };
  // Edge voxels only (a thin shell): no need to unroll this for the registers.
  int k = 0;
  for (int a = 0; a < 3; ++a) {
    for (int b = a; b < 3; ++b) {
      const Stencil sb = stencil_at(c[b], n[b]);
      h[k++] = sb.w * (first(p + sb.hi * s[b], a, b, sb.hi) - first(p + sb.lo * s[b], a, b, sb.lo));
    }
  }
}

/// Frangi's response at one scale from the Hessian (scaled by σ² here), in double through
/// tresor/ct/hessian.h, as the reference; two_alpha2 = 2α², and so on. Like the reference, 0
/// without the eigenvalues where the trace is positive: a bright ridge needs λ2, λ3 <= 0 and
/// |λ1| <= |λ2|, hence tr <= λ3 <= 0 (about half the voxels, in spatially coherent regions, so
/// whole warps skip the double-precision eigenvalues).
TRESOR_HD inline float frangi_at(const double h[6], double s2, double two_alpha2, double two_beta2, double two_gamma2) {
  if (h[0] + h[3] + h[5] > 0) return 0.0f;
  double l[3];
  tresor::ct::hessian::sym3_eigenvalues_abs_sorted(h[0] * s2, h[1] * s2, h[2] * s2, h[3] * s2, h[4] * s2, h[5] * s2, l);
  return static_cast<float>(tresor::ct::hessian::frangi_response(l, two_alpha2, two_beta2, two_gamma2));
}

/// The running maximum over scales as the reference keeps it (std::max(dst, r); the first scale
/// starts from 0).
TRESOR_HD inline float running_max(float dst, float r) { return dst < r ? r : dst; }

}  // namespace tresor::gpu::ct
