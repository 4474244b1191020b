// Multi-scale Frangi vesselness, CPU reference (include/tresor/ct/ops.h, docs/preprocessing.md §5).
//
// scikit-image 0.19's frangi() step by step (skimage/filters/ridges.py and feature/corner.py):
// per scale σ (voxels), the volume smoothed by gaussian_filter(σ, mode reflect, truncate 4);
// the Hessian as np.gradient of np.gradient (central differences inside, one-sided first-order
// differences on the first and last voxel of each axis, so the second derivative inside is the
// wide stencil (f[i+2] − 2f[i] + f[i−2])/4); each element times σ²; eigenvalues sorted by |λ|;
// Frangi's response (hessian.h); zero where λ2 or λ3 > 0 (bright ridges); the maximum over
// scales. Everything in double, like scikit-image on a float64 volume.
#include <algorithm>

#include "internal.h"
#include "tresor/ct/hessian.h"
#include "tresor/ct/ops.h"

namespace tresor::ct {
namespace {

// np.gradient's stencil at index i of n along an axis (edge_order 1): (f[i+hi] − f[i+lo])·w.
struct Stencil {
  long lo, hi;
  double w;
};
Stencil stencil(size_t i, size_t n) {
  if (i == 0) return {0, 1, 1.0};
  if (i == n - 1) return {-1, 0, 1.0};
  return {-1, 1, 0.5};
}

class Hessian {
 public:
  Hessian(const std::vector<double>& g, const std::array<size_t, 3>& d) : g_(g), d_(d), s_{1, static_cast<long>(d[0]), static_cast<long>(d[0] * d[1])} {}

  // The six elements xx xy xz yy yz zz at (x, y, z), by np.gradient's rules on every edge.
  void at(size_t x, size_t y, size_t z, double h[6]) const {
    const size_t c[3] = {x, y, z};
    const long p = static_cast<long>(x + d_[0] * (y + d_[1] * z));
    size_t k = 0;
    for (size_t a = 0; a < 3; ++a) {
      for (size_t b = a; b < 3; ++b) {
        const Stencil sb = stencil(c[b], d_[b]);
        h[k++] = sb.w * (first(p + sb.hi * s_[b], c, a, b, sb.hi) - first(p + sb.lo * s_[b], c, a, b, sb.lo));
      }
    }
  }

  // Inside (2 ≤ coordinate ≤ n−3 on every axis) the stencils are fixed.
  void inside(size_t p, double h[6]) const {
    const double* f = g_.data() + p;
    const long sx = s_[0], sy = s_[1], sz = s_[2];
    const double c2 = 2 * f[0];
    h[0] = (f[2 * sx] - c2 + f[-2 * sx]) * 0.25;
    h[3] = (f[2 * sy] - c2 + f[-2 * sy]) * 0.25;
    h[5] = (f[2 * sz] - c2 + f[-2 * sz]) * 0.25;
    h[1] = (f[sx + sy] - f[sx - sy] - f[-sx + sy] + f[-sx - sy]) * 0.25;
    h[2] = (f[sx + sz] - f[sx - sz] - f[-sx + sz] + f[-sx - sz]) * 0.25;
    h[4] = (f[sy + sz] - f[sy - sz] - f[-sy + sz] + f[-sy - sz]) * 0.25;
  }

 private:
  // The first derivative along axis a at linear position q, whose coordinate along b is c[b] + db.
  double first(long q, const size_t c[3], size_t a, size_t b, long db) const {
    const size_t ca = a == b ? static_cast<size_t>(static_cast<long>(c[a]) + db) : c[a];
    const Stencil sa = stencil(ca, d_[a]);
    return sa.w * (g_[static_cast<size_t>(q + sa.hi * s_[a])] - g_[static_cast<size_t>(q + sa.lo * s_[a])]);
  }

  const std::vector<double>& g_;
  std::array<size_t, 3> d_;
  long s_[3];
};

}  // namespace

Result<FloatVolume> frangi(const FloatVolume& v, const FrangiOptions& o, unsigned threads) {
  if (v.data.size() != v.size()) return fail(ErrorCode::kInvalidArgument, "frangi: the volume's data does not match its dimensions");
  for (size_t a = 0; a < 3; ++a) {
    if (v.dims[a] < 2) return fail(ErrorCode::kInvalidArgument, "frangi: axis " + std::to_string(a) + " has " + std::to_string(v.dims[a]) + " voxels; at least 2 are needed");
  }
  if (o.sigmas.empty()) return fail(ErrorCode::kInvalidArgument, "frangi: no scales");
  for (double s : o.sigmas) {
    if (!(s > 0 && s <= 64)) return fail(ErrorCode::kInvalidArgument, "frangi: scale " + std::to_string(s) + " voxels is not in (0, 64]");
  }
  for (auto [name, x] : {std::pair{"alpha", o.alpha}, {"beta", o.beta}, {"gamma", o.gamma}}) {
    if (!(x > 0 && std::isfinite(x))) return fail(ErrorCode::kInvalidArgument, std::string("frangi: ") + name + " " + std::to_string(x) + " is not positive");
  }
  ThreadPool pool(threads);
  const auto& d = v.dims;
  FloatVolume out;
  out.dims = d;
  out.spacing = v.spacing;
  out.origin = v.origin;
  out.data.assign(v.size(), 0.0f);
  const double ta = 2 * o.alpha * o.alpha, tb = 2 * o.beta * o.beta, tg = 2 * o.gamma * o.gamma;
  std::vector<double> g(v.size());
  for (double sigma : o.sigmas) {
    const double sign = o.bright ? 1.0 : -1.0;
    for (size_t i = 0; i < g.size(); ++i) g[i] = sign * static_cast<double>(v.data[i]);
    detail::gaussian_voxels(g, d, {sigma, sigma, sigma}, o.truncate, pool);
    const Hessian hess(g, d);
    const double s2 = sigma * sigma;
    pool.parallel_for(d[2], [&](size_t z) {
      const bool zin = z >= 2 && z + 2 < d[2];
      for (size_t y = 0; y < d[1]; ++y) {
        const bool yzin = zin && y >= 2 && y + 2 < d[1];
        const size_t row = d[0] * (y + d[1] * z);
        for (size_t x = 0; x < d[0]; ++x) {
          double h[6];
          if (yzin && x >= 2 && x + 2 < d[0]) {
            hess.inside(row + x, h);
          } else {
            hess.at(x, y, z, h);
          }
          // A bright ridge needs λ2, λ3 <= 0 with |λ1| <= |λ2| <= |λ3|, so tr = λ1 + λ2 + λ3 <=
          // |λ1| − |λ2| − |λ3| <= 0: a positive trace gives 0 without the eigenvalues (about half
          // of all voxels; bright/dark is folded into the sign of g already).
          if (h[0] + h[3] + h[5] > 0) continue;
          double l[3];
          hessian::sym3_eigenvalues_abs_sorted(h[0] * s2, h[1] * s2, h[2] * s2, h[3] * s2, h[4] * s2, h[5] * s2, l);
          const float r = static_cast<float>(hessian::frangi_response(l, ta, tb, tg));
          float& dst = out.data[row + x];
          dst = std::max(dst, r);
        }
      }
    });
  }
  return out;
}

}  // namespace tresor::ct
