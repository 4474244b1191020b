// The coronary CT angiography phantom (include/tresor/ct/volume.h, docs/preprocessing.md §1).
//
// Anatomy, in the volume's frame (mm; x to the patient's left, y posterior, z superior), scaled
// down with the field of view: a chest ellipse with subcutaneous fat, two lungs, spine and
// sternum, a descending aorta, a heart (an ellipsoid with a myocardial wall of 10 mm around a
// contrast-filled blood pool), epicardial fat, the ascending aorta, and the coronary tree on the
// epicardial surface: LAD, LCx and RCA with a diagonal, an obtuse marginal and the posterior
// descending branch, lumen radius tapering from 2.5 to 0.7 mm, with stenoses. HU values are
// typical CCTA ones (contrast 400, myocardium 110, fat −90, lung −850, bone 400–700); then a
// Gaussian blur for partial volume and Gaussian noise. Every random choice comes from a
// SplitMix64 stream of the seed, the noise from one stream per slice, so the result does not
// depend on the thread count.
#include <algorithm>
#include <cmath>
#include <numbers>

#include "internal.h"
#include "tresor/ct/ops.h"
#include "tresor/ct/volume.h"
#include "tresor/thread_pool.h"

namespace tresor::ct {
namespace {

using P3 = std::array<double, 3>;

using detail::Rng;

double sq(double v) { return v * v; }

// The fixed shapes and their parameters, drawn once from the seed.
struct Anatomy {
  P3 c{};          // centre of the field of view
  double s = 1;    // scale
  double body_a = 0, body_b = 0;
  P3 heart{}, heart_axes{};
  double wall = 10;
  P3 lung_axes{};
  double lung_dx = 0;
  P3 spine{}, desc_aorta{};
  double spine_r = 0, desc_r = 0;
  P3 asc_aorta{};
  double asc_r = 0;
};

struct Tissue {
  uint8_t label;
  double hu;
};

Tissue classify(const Anatomy& a, const P3& p) {
  const double dx = p[0] - a.c[0], dy = p[1] - a.c[1];
  const double body = sq(dx / a.body_a) + sq(dy / a.body_b);
  if (body > 1) return {kBody, -1000};  // air
  // Heart: an ellipsoid; inside its wall the blood pool.
  const P3& h = a.heart;
  const P3& ax = a.heart_axes;
  const double e = sq((p[0] - h[0]) / ax[0]) + sq((p[1] - h[1]) / ax[1]) + sq((p[2] - h[2]) / ax[2]);
  if (e <= 1) {
    const double ei = sq((p[0] - h[0]) / (ax[0] - a.wall)) + sq((p[1] - h[1]) / (ax[1] - a.wall)) + sq((p[2] - h[2]) / (ax[2] - a.wall));
    return ei <= 1 ? Tissue{kBloodPool, 400} : Tissue{kMyocardium, 110};
  }
  // Ascending aorta: from the heart's upper part to the top.
  if (p[2] > a.asc_aorta[2] && sq(p[0] - a.asc_aorta[0]) + sq(p[1] - a.asc_aorta[1]) <= sq(a.asc_r)) return {kAorta, 400};
  if (sq(p[0] - a.desc_aorta[0]) + sq(p[1] - a.desc_aorta[1]) <= sq(a.desc_r)) return {kAorta, 400};
  if (sq(p[0] - a.spine[0]) + sq(p[1] - a.spine[1]) <= sq(a.spine_r)) return {kBone, 700};
  // Sternum: a bar in front of the heart.
  if (std::abs(dx) < 12 * a.s && std::abs(p[1] - (a.c[1] - 0.86 * a.body_b)) < 5 * a.s) return {kBone, 450};
  // Epicardial fat: a 6 mm layer outside the heart.
  const double eo = sq((p[0] - h[0]) / (ax[0] + 6)) + sq((p[1] - h[1]) / (ax[1] + 6)) + sq((p[2] - h[2]) / (ax[2] + 6));
  if (eo <= 1) return {kFat, -90};
  for (double side : {-1.0, 1.0}) {
    const double l = sq((p[0] - (a.c[0] + side * a.lung_dx)) / a.lung_axes[0]) + sq((p[1] - (a.c[1] + 0.1 * a.body_b)) / a.lung_axes[1]) +
                     sq((p[2] - a.c[2]) / a.lung_axes[2]);
    if (l <= 1) return {kLung, -850};
  }
  // Subcutaneous fat: the body's outer 8 mm.
  const double inner = sq(dx / (a.body_a - 8 * a.s)) + sq(dy / (a.body_b - 8 * a.s));
  if (inner > 1) return {kFat, -100};
  return {kBody, 40};
}

// A point on the heart's surface pushed out by `out` mm: azimuth θ in the x–y plane from the
// patient's left (θ = −90° is anterior), elevation φ from the equator (+90° is the base).
P3 on_heart(const Anatomy& a, double theta_deg, double phi_deg, double out) {
  const double t = theta_deg * std::numbers::pi / 180, f = phi_deg * std::numbers::pi / 180;
  return {a.heart[0] + (a.heart_axes[0] + out) * std::cos(f) * std::cos(t), a.heart[1] + (a.heart_axes[1] + out) * std::cos(f) * std::sin(t),
          a.heart[2] + (a.heart_axes[2] + out) * std::sin(f)};
}

// A vessel along a path of (θ, φ) waypoints, tapering from r0 to r1, sampled every ≤ 0.2 mm.
Centerline vessel(const Anatomy& a, std::string name, const std::vector<std::pair<double, double>>& way, double r0, double r1) {
  Centerline c;
  c.name = std::move(name);
  std::vector<P3> pts;
  for (size_t k = 0; k + 1 < way.size(); ++k) {
    const int steps = 400;
    for (int i = 0; i < steps; ++i) {
      const double u = static_cast<double>(i) / steps;
      pts.push_back(on_heart(a, way[k].first + u * (way[k + 1].first - way[k].first), way[k].second + u * (way[k + 1].second - way[k].second), 3.5));
    }
  }
  pts.push_back(on_heart(a, way.back().first, way.back().second, 3.5));
  std::vector<double> arc(pts.size(), 0);
  for (size_t i = 1; i < pts.size(); ++i) {
    arc[i] = arc[i - 1] + std::sqrt(sq(pts[i][0] - pts[i - 1][0]) + sq(pts[i][1] - pts[i - 1][1]) + sq(pts[i][2] - pts[i - 1][2]));
  }
  const double len = arc.back();
  // Resample at 0.2 mm.
  const size_t n = static_cast<size_t>(len / 0.2) + 1;
  size_t j = 0;
  for (size_t i = 0; i <= n; ++i) {
    const double s = std::min(len, static_cast<double>(i) * len / static_cast<double>(n));
    while (j + 1 < arc.size() && arc[j + 1] < s) ++j;
    const size_t k = std::min(j + 1, arc.size() - 1);
    const double w = arc[k] > arc[j] ? (s - arc[j]) / (arc[k] - arc[j]) : 0;
    c.points.push_back({pts[j][0] + w * (pts[k][0] - pts[j][0]), pts[j][1] + w * (pts[k][1] - pts[j][1]), pts[j][2] + w * (pts[k][2] - pts[j][2])});
    const double r = r0 + (r1 - r0) * s / len;
    c.healthy_radius.push_back(r);
    c.radius.push_back(r);
  }
  return c;
}

}  // namespace

Result<Phantom> make_phantom(const PhantomOptions& o) {
  for (size_t i = 0; i < 3; ++i) {
    if (o.dims[i] < 16 || o.dims[i] > 1024) {
      return fail(ErrorCode::kInvalidArgument, "phantom: dimension " + std::to_string(i) + " is " + std::to_string(o.dims[i]) + " voxels, not 16..1024");
    }
    if (!(o.spacing[i] >= 0.1 && o.spacing[i] <= 5)) {
      return fail(ErrorCode::kInvalidArgument, "phantom: spacing " + std::to_string(i) + " is " + std::to_string(o.spacing[i]) + " mm, not 0.1..5");
    }
  }
  const P3 fov{static_cast<double>(o.dims[0]) * o.spacing[0], static_cast<double>(o.dims[1]) * o.spacing[1],
               static_cast<double>(o.dims[2]) * o.spacing[2]};
  if (std::min(fov[0], fov[1]) < 120 || fov[2] < 80) {
    return fail(ErrorCode::kInvalidArgument, "phantom: a field of view of " + std::to_string(static_cast<int>(fov[0])) + "×" +
                                                 std::to_string(static_cast<int>(fov[1])) + "×" + std::to_string(static_cast<int>(fov[2])) +
                                                 " mm cannot hold the heart (at least 120×120×80)");
  }
  Rng rng{o.seed};
  Anatomy a;
  a.c = {fov[0] / 2, fov[1] / 2, fov[2] / 2};
  a.s = std::min(1.0, std::min(fov[0], fov[1]) / 300);
  a.body_a = std::min(0.47 * fov[0], 165.0);
  a.body_b = std::min(0.42 * fov[1], 120.0);
  const double sz = std::min(1.0, fov[2] / 150);
  a.heart_axes = {rng.between(52, 58) * a.s, rng.between(42, 48) * a.s, rng.between(46, 52) * std::min(a.s, sz)};
  a.wall = std::max(4.0, 10 * a.s);
  a.heart = {a.c[0] + 15 * a.s, a.c[1] - 8 * a.s, a.c[2] - 0.1 * fov[2] * 0.5};
  a.lung_axes = {0.32 * a.body_a, 0.6 * a.body_b, 0.55 * fov[2]};
  a.lung_dx = 0.58 * a.body_a;
  a.spine = {a.c[0], a.c[1] + 0.72 * a.body_b, 0};
  a.spine_r = 15 * a.s;
  a.desc_aorta = {a.c[0] + 22 * a.s, a.c[1] + 0.45 * a.body_b, 0};
  a.desc_r = 11 * a.s;
  a.asc_aorta = {a.heart[0] - 18 * a.s, a.heart[1] + 5 * a.s, a.heart[2] + 0.55 * a.heart_axes[2]};
  a.asc_r = 14 * a.s;

  Phantom ph;
  ph.hu.dims = ph.labels.dims = o.dims;
  ph.hu.spacing = ph.labels.spacing = o.spacing;
  ph.labels.data.assign(ph.labels.size(), kBody);
  std::vector<float> hu(ph.labels.size());
  ThreadPool pool(0);
  const auto& d = o.dims;
  pool.parallel_for(d[2], [&](size_t z) {
    for (size_t y = 0; y < d[1]; ++y) {
      for (size_t x = 0; x < d[0]; ++x) {
        const P3 p{(static_cast<double>(x) + 0.5) * o.spacing[0], (static_cast<double>(y) + 0.5) * o.spacing[1],
                   (static_cast<double>(z) + 0.5) * o.spacing[2]};
        const Tissue t = classify(a, p);
        const size_t i = ph.labels.index(x, y, z);
        ph.labels.data[i] = t.label;
        hu[i] = static_cast<float>(t.hu);
      }
    }
  });

  // The coronary tree (waypoints in degrees of azimuth and elevation on the heart).
  using Way = std::vector<std::pair<double, double>>;
  const Way lad = {{-75, 62}, {-65, 20}, {-55, -30}, {-20, -80}}, lcx = {{-55, 60}, {0, 50}, {55, 45}, {95, 30}},
            rca = {{-120, 62}, {-170, 48}, {-215, 40}, {-245, 30}};
  // A branch leaves its parent at the parent's waypoint path, fraction f of the way along it.
  auto from = [](const Way& w, double f) {
    const double u = f * static_cast<double>(w.size() - 1);
    const size_t k = std::min(static_cast<size_t>(u), w.size() - 2);
    const double t = u - static_cast<double>(k);
    return std::pair<double, double>{w[k].first + t * (w[k + 1].first - w[k].first), w[k].second + t * (w[k + 1].second - w[k].second)};
  };
  ph.centerlines.push_back(vessel(a, "LAD", lad, 2.5, 0.8));
  ph.centerlines.push_back(vessel(a, "LCx", lcx, 2.2, 0.9));
  ph.centerlines.push_back(vessel(a, "RCA", rca, 2.5, 1.0));
  ph.centerlines.push_back(vessel(a, "D1", {from(lad, 0.3), {-35, 5}, {-20, -35}}, 1.4, 0.7));
  ph.centerlines.push_back(vessel(a, "OM1", {from(lcx, 0.45), {35, 10}, {45, -30}}, 1.3, 0.7));
  ph.centerlines.push_back(vessel(a, "PDA", {from(rca, 1.0), {-260, 0}, {-265, -45}}, 1.5, 0.7));
  // Stenoses on the main vessels: a Gaussian narrowing 3 mm wide, keeping 30–55 % of the radius.
  for (unsigned k = 0; k < o.stenoses; ++k) {
    Centerline& c = ph.centerlines[k % 3];
    const double at = rng.between(0.2, 0.7), keep = rng.between(0.3, 0.55);
    ph.stenoses.push_back({c.name, at, keep});
    const double len = 0.2 * static_cast<double>(c.points.size() - 1);
    for (size_t i = 0; i < c.points.size(); ++i) {
      const double s = static_cast<double>(i) / static_cast<double>(c.points.size() - 1);
      c.radius[i] *= 1 - (1 - keep) * std::exp(-0.5 * sq((s - at) * len / 3.0));
    }
  }
  // Paint: epicardial fat around each vessel, then the lumen (union of spheres along the line).
  const double lumen_hu = rng.between(380, 440);
  for (int pass = 0; pass < 2; ++pass) {
    for (const Centerline& c : ph.centerlines) {
      for (size_t i = 0; i < c.points.size(); ++i) {
        const double r = pass == 0 ? c.healthy_radius[i] + 1.5 : c.radius[i];
        const P3& p = c.points[i];
        std::array<size_t, 3> lo{}, hi{};
        for (size_t ax = 0; ax < 3; ++ax) {
          lo[ax] = static_cast<size_t>(std::max(0.0, std::floor((p[ax] - r) / o.spacing[ax] - 0.5)));
          hi[ax] = static_cast<size_t>(std::clamp(std::ceil((p[ax] + r) / o.spacing[ax] - 0.5), 0.0, static_cast<double>(d[ax] - 1)));
        }
        for (size_t z = lo[2]; z <= hi[2]; ++z) {
          for (size_t y = lo[1]; y <= hi[1]; ++y) {
            for (size_t x = lo[0]; x <= hi[0]; ++x) {
              const double dd = sq((static_cast<double>(x) + 0.5) * o.spacing[0] - p[0]) + sq((static_cast<double>(y) + 0.5) * o.spacing[1] - p[1]) +
                                sq((static_cast<double>(z) + 0.5) * o.spacing[2] - p[2]);
              if (dd > r * r) continue;
              const size_t v = ph.labels.index(x, y, z);
              if (pass == 0) {
                if (ph.labels.data[v] == kBody || ph.labels.data[v] == kLung) {
                  ph.labels.data[v] = kFat;
                  hu[v] = -90;
                }
              } else if (ph.labels.data[v] != kBloodPool && ph.labels.data[v] != kAorta) {
                ph.labels.data[v] = kCoronary;
                hu[v] = static_cast<float>(lumen_hu);
              }
            }
          }
        }
      }
    }
  }
  // Partial volume, then noise (one stream per slice).
  gaussian_in_place(hu, d, o.spacing, {o.blur_mm, o.blur_mm, o.blur_mm}, 3.0);
  ph.hu.data.resize(hu.size());
  pool.parallel_for(d[2], [&](size_t z) {
    Rng noise{o.seed * 0x2545F4914F6CDD1Dull + z + 1};
    for (size_t i = z * d[0] * d[1]; i < (z + 1) * d[0] * d[1]; ++i) {
      const double v = hu[i] + (hu[i] > -990 ? o.noise_hu * noise.normal() : 0.0);
      ph.hu.data[i] = static_cast<int16_t>(std::clamp(std::lround(v), -1024L, 3071L));
    }
  });
  return ph;
}

}  // namespace tresor::ct
