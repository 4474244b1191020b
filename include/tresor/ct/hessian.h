// tresor/ct/hessian.h — the per-voxel arithmetic of Frangi's vesselness (docs/preprocessing.md §5),
// shared by the CPU reference (core/ct/frangi.cc) and the CUDA kernel (kernels/ct.cu), so both
// compute exactly the same function. Plain C++ (no library types): nvcc compiles it as C++20.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define TRESOR_CT_HD __host__ __device__
#else
#define TRESOR_CT_HD
#endif

namespace tresor::ct::hessian {

/// The eigenvalues of the symmetric matrix [[xx xy xz] [xy yy yz] [xz yz zz]], sorted by absolute
/// value ascending (scikit-image's `sorting='abs'`: |l[0]| <= |l[1]| <= |l[2]|).
///
/// Closed form (Smith, "Eigenvalues of a symmetric 3x3 matrix", CACM 4(4), 1961): with
/// q = tr/3 and B = (A − qI)/p, p = sqrt(tr((A−qI)²)/6), the eigenvalues are q + 2p·cos(φ + 2πk/3)
/// with φ = acos(det(B)/2)/3. det(B)/2 is clamped to [−1, 1] against rounding; a diagonal matrix
/// (p = 0 exactly, or off-diagonals all zero) takes its diagonal. The middle eigenvalue comes from
/// the trace, which keeps the three summing to tr(A) exactly in exact arithmetic.
template <typename R>
TRESOR_CT_HD inline void sym3_eigenvalues_abs_sorted(R xx, R xy, R xz, R yy, R yz, R zz, R l[3]) {
  using std::acos, std::cos, std::fabs, std::sqrt;
  const R off = xy * xy + xz * xz + yz * yz;
  R e0, e1, e2;
  if (off == R(0)) {
    e0 = xx;
    e1 = yy;
    e2 = zz;
  } else {
    const R q = (xx + yy + zz) / R(3);
    const R a = xx - q, b = yy - q, c = zz - q;
    const R p2 = a * a + b * b + c * c + R(2) * off;
    const R p = sqrt(p2 / R(6));
    const R inv = R(1) / p;
    const R ba = a * inv, bb = b * inv, bc = c * inv, bxy = xy * inv, bxz = xz * inv, byz = yz * inv;
    // det(B) for the symmetric B.
    R r = (ba * (bb * bc - byz * byz) - bxy * (bxy * bc - byz * bxz) + bxz * (bxy * byz - bb * bxz)) / R(2);
    r = r < R(-1) ? R(-1) : (r > R(1) ? R(1) : r);
    const R phi = acos(r) / R(3);
    const R two_pi_3 = R(2.0943951023931954923);  // 2π/3
    e0 = q + R(2) * p * cos(phi);               // the largest
    e2 = q + R(2) * p * cos(phi + two_pi_3);    // the smallest
    e1 = R(3) * q - e0 - e2;
  }
  // Sort three values by absolute value (a fixed network of three compare-swaps).
  R s0 = e0, s1 = e1, s2 = e2, t;
  if (fabs(s0) > fabs(s1)) { t = s0; s0 = s1; s1 = t; }
  if (fabs(s1) > fabs(s2)) { t = s1; s1 = s2; s2 = t; }
  if (fabs(s0) > fabs(s1)) { t = s0; s0 = s1; s1 = t; }
  l[0] = s0;
  l[1] = s1;
  l[2] = s2;
}

/// Frangi's response at one scale for eigenvalues sorted by |λ| (Frangi et al., MICCAI 1998,
/// eq. 13, with scikit-image 0.19's definitions, skimage/filters/ridges.py): Ra² = (λ2/λ3)²,
/// Rb² = λ1²/|λ2·λ3|, S² = λ1²+λ2²+λ3²; V = (1−exp(−Ra²/2α²))·exp(−Rb²/2β²)·(1−exp(−S²/2γ²));
/// a zero denominator is replaced by 1e-10 (scikit-image's _divide_nonzero). Bright ridges: V = 0
/// where λ2 > 0 or λ3 > 0. `two_alpha2` = 2α², and so on.
template <typename R>
TRESOR_CT_HD inline R frangi_response(const R l[3], R two_alpha2, R two_beta2, R two_gamma2) {
  using std::exp, std::fabs, std::sqrt;
  if (l[1] > R(0) || l[2] > R(0)) return R(0);
  const R d3 = l[2] == R(0) ? R(1e-10) : l[2];
  const R ra2 = (l[1] / d3) * (l[1] / d3);
  const R root = sqrt(fabs(l[1] * l[2]));
  const R dr = root == R(0) ? R(1e-10) : root;
  const R rb2 = (l[0] / dr) * (l[0] / dr);
  const R s2 = l[0] * l[0] + l[1] * l[1] + l[2] * l[2];
  return (R(1) - exp(-ra2 / two_alpha2)) * exp(-rb2 / two_beta2) * (R(1) - exp(-s2 / two_gamma2));
}

}  // namespace tresor::ct::hessian
