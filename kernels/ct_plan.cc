// The CT pipeline's host side that needs no device (kernels/ct_plan.h): the reference's checks,
// the per-axis coordinate tables and Gaussian taps (the reference's expressions, so both sides
// sample the same points with the same weights), the statistics from the histogram, and the CPU
// emulation of the kernels (prepare_emulated), which runs kernels/ct.cuh voxel by voxel.
#include "ct_plan.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "tresor/gpu/ct.h"
#include "tresor/thread_pool.h"

namespace tresor::gpu::ct {
namespace detail {

using tresor::ct::CtNormalisation;
using tresor::ct::PrepOptions;

Result<void> check_labels(const tresor::ct::HuVolume& hu, const tresor::ct::LabelVolume* labels) {
  if (labels != nullptr && (labels->dims != hu.dims || labels->data.size() != hu.data.size())) {
    return fail(ErrorCode::kInvalidArgument, "prep: the labels are " + std::to_string(labels->dims[0]) + "×" + std::to_string(labels->dims[1]) + "×" +
                                                 std::to_string(labels->dims[2]) + ", the volume " + std::to_string(hu.dims[0]) + "×" +
                                                 std::to_string(hu.dims[1]) + "×" + std::to_string(hu.dims[2]));
  }
  return {};
}

Result<void> check_scales(const PrepOptions& o) {
  if (o.frangi_sigmas_mm.empty()) return fail(ErrorCode::kInvalidArgument, "prep: no Frangi scale");
  return {};
}

Result<void> empty_foreground(const PrepOptions& o) {
  return fail(ErrorCode::kInvalidArgument, "prep: no voxel above the foreground threshold " + std::to_string(o.foreground_hu) + " HU");
}

Result<std::array<size_t, 3>> check_grid(const std::array<size_t, 3>& dims, size_t data_size, const std::array<double, 3>& spacing,
                                         const PrepOptions& o) {
  // resample_linear's checks and grid, from the reference itself.
  if (data_size != dims[0] * dims[1] * dims[2]) return fail(ErrorCode::kInvalidArgument, "resample: an empty volume");
  auto grid = tresor::ct::resample_grid(dims, spacing, {o.spacing, o.spacing, o.spacing});
  if (!grid) return std::unexpected(grid.error());
  const std::array<size_t, 3> out = *grid;
  if (!(o.window_lower < o.window_upper)) {
    return fail(ErrorCode::kInvalidArgument, "window: lower " + std::to_string(o.window_lower) + " is not below upper " + std::to_string(o.window_upper));
  }
  // frangi(): axes, scales in voxels, α β γ.
  for (size_t a = 0; a < 3; ++a) {
    if (out[a] < 2) return fail(ErrorCode::kInvalidArgument, "frangi: axis " + std::to_string(a) + " has " + std::to_string(out[a]) + " voxels; at least 2 are needed");
  }
  for (double mm : o.frangi_sigmas_mm) {
    const double s = mm / o.spacing;
    if (!(s > 0 && s <= 64)) return fail(ErrorCode::kInvalidArgument, "frangi: scale " + std::to_string(s) + " voxels is not in (0, 64]");
  }
  for (auto [name, x] : {std::pair{"alpha", o.frangi_alpha}, {"beta", o.frangi_beta}, {"gamma", o.frangi_gamma}}) {
    if (!(x > 0 && std::isfinite(x))) return fail(ErrorCode::kInvalidArgument, std::string("frangi: ") + name + " " + std::to_string(x) + " is not positive");
  }
  return out;
}

Result<std::array<size_t, 3>> check_prepare(const tresor::ct::HuVolume& hu, const tresor::ct::LabelVolume* labels, const PrepOptions& o) {
  TRESOR_TRY(check_labels(hu, labels));
  TRESOR_TRY(check_scales(o));
  // The reference's foreground mask, HU > foreground_hu, compared in double as there.
  if (std::none_of(hu.data.begin(), hu.data.end(), [&](int16_t v) { return v > o.foreground_hu; })) return std::unexpected(empty_foreground(o).error());
  return check_grid(hu.dims, hu.data.size(), hu.spacing, o);
}

Result<std::array<size_t, 3>> check_prepare_device(const int16_t* d_hu, const std::array<size_t, 3>& dims, const std::array<double, 3>& spacing,
                                                   const PrepOptions& o) {
  if (d_hu == nullptr) return fail(ErrorCode::kInvalidArgument, "prep: no HU volume (d_hu is null)");
  TRESOR_TRY(check_scales(o));
  const size_t n = dims[0] * dims[1] * dims[2];
  // As the reference: an empty volume, or a threshold no int16 value exceeds, has no foreground.
  if (n == 0 || foreground_threshold(o.foreground_hu) > 32767) return std::unexpected(empty_foreground(o).error());
  return check_grid(dims, n, spacing, o);
}

int foreground_threshold(double foreground_hu) {
  if (!(foreground_hu < 32767.0)) return 32768;  // NaN too: nothing compares above it
  if (foreground_hu < -32768.0) return -32768;
  return static_cast<int>(std::floor(foreground_hu)) + 1;
}

Plan make_plan(const std::array<size_t, 3>& dims, const std::array<double, 3>& spacing, const std::array<size_t, 3>& out_dims, const PrepOptions& o) {
  Plan p;
  p.in_dims = dims;
  p.grid = Grid{static_cast<uint32_t>(out_dims[0]), static_cast<uint32_t>(out_dims[1]), static_cast<uint32_t>(out_dims[2])};
  for (size_t a = 0; a < 3; ++a) {
    for (size_t j = 0; j < out_dims[a]; ++j) {
      // resample_linear's coord() and resample_nearest's nearest(), expression for expression.
      const double x = static_cast<double>(j) * o.spacing / spacing[a];
      const double f = std::floor(x);
      LerpTap t;
      t.i0 = std::min(static_cast<size_t>(f), dims[a] - 1);
      t.i1 = std::min(t.i0 + 1, uint64_t{dims[a] - 1});
      t.w = x - f;
      p.lerp.push_back(t);
      p.nearest.push_back(std::min(static_cast<size_t>(std::floor(static_cast<double>(j) * o.spacing / spacing[a] + 0.5)), dims[a] - 1));
    }
  }
  constexpr double kTruncate = 4.0;  // FrangiOptions' default, which prepare() keeps
  for (double mm : o.frangi_sigmas_mm) {
    Scale s;
    s.sigma = mm / o.spacing;
    // gaussian_kernel(): radius ⌊truncate·σ + 0.5⌋, exp weights summed in order, then normalised.
    const long r = static_cast<long>(kTruncate * s.sigma + 0.5);
    s.radius = static_cast<int>(r);
    s.offset = p.taps.size();
    std::vector<double> k(static_cast<size_t>(2 * r + 1));
    double sum = 0;
    for (long i = -r; i <= r; ++i) sum += k[static_cast<size_t>(i + r)] = std::exp(-0.5 * (static_cast<double>(i) / s.sigma) * (static_cast<double>(i) / s.sigma));
    for (auto& x : k) x /= sum;
    p.taps.insert(p.taps.end(), k.begin(), k.end());
    p.scales.push_back(s);
  }
  p.threshold = foreground_threshold(o.foreground_hu);
  p.fused.in_nx = dims[0];
  p.fused.in_ny = dims[1];
  p.fused.win_lower = o.window_lower;
  p.fused.win_upper = o.window_upper;
  p.fused.win_scale = 1.0 / (o.window_upper - o.window_lower);
  p.two_alpha2 = 2 * o.frangi_alpha * o.frangi_alpha;
  p.two_beta2 = 2 * o.frangi_beta * o.frangi_beta;
  p.two_gamma2 = 2 * o.frangi_gamma * o.frangi_gamma;
  return p;
}

void set_stats(FusedParams& p, const CtNormalisation& n) {
  p.lower = n.lower;
  p.upper = n.upper;
  p.mean = n.mean;
  p.sd = std::max(n.sd, 1e-8);
}

Result<CtNormalisation> stats_from_histogram(std::span<const uint64_t> hist, const PrepOptions& o) {
  // The reference's own computation on the device's histogram (bin = HU + kHistOffset).
  static_assert(kHistOffset == 32768);
  auto s = tresor::ct::ct_normalisation_from_histogram(hist);
  if (!s) return std::unexpected(empty_foreground(o).error());
  return s;
}

}  // namespace detail

namespace {

template <typename T>
tresor::ct::Volume<T> volume_of(const std::array<size_t, 3>& dims, double spacing, const std::array<double, 3>& origin, std::vector<T> data) {
  tresor::ct::Volume<T> v;
  v.dims = dims;
  v.spacing = {spacing, spacing, spacing};
  v.origin = origin;
  v.data = std::move(data);
  return v;
}

}  // namespace

Result<tresor::ct::Prepared> prepare_emulated(const tresor::ct::HuVolume& hu, const tresor::ct::LabelVolume* labels, const tresor::ct::PrepOptions& o) {
  using namespace detail;
  auto od = check_prepare(hu, labels, o);
  if (!od) return std::unexpected(od.error());
  Plan plan = make_plan(hu.dims, hu.spacing, *od, o);

  // The histogram kernel's counts.
  std::vector<uint64_t> hist(kHistBins);
  for (int16_t v : hu.data) {
    if (v >= plan.threshold) ++hist[static_cast<size_t>(v + kHistOffset)];
  }
  auto stats = stats_from_histogram(hist, o);
  if (!stats) return std::unexpected(stats.error());
  set_stats(plan.fused, *stats);

  const Grid g = plan.grid;
  const size_t nx = g.nx, ny = g.ny, nz = g.nz, n = nx * ny * nz;
  ThreadPool pool(o.threads);
  // One slice per task, the voxels of a kernel's grid-stride loop.
  auto each = [&](auto&& fn) {
    pool.parallel_for(nz, [&](size_t z) {
      for (size_t y = 0; y < ny; ++y) {
        for (size_t x = 0; x < nx; ++x) fn(x, y, z, x + nx * (y + ny * z));
      }
    });
  };
  std::vector<float> image(n), window(n);
  const LerpTap* lerp = plan.lerp.data();
  each([&](size_t x, size_t y, size_t z, size_t i) {
    const float iso = lerp_voxel(hu.data.data(), plan.fused.in_nx, plan.fused.in_ny, lerp[x], lerp[nx + y], lerp[nx + ny + z]);
    image[i] = z_score(iso, plan.fused);
    window[i] = window_value(iso, plan.fused);
  });

  std::vector<float> ves(n), a(n), b(n);
  for (size_t k = 0; k < plan.scales.size(); ++k) {
    const Scale& s = plan.scales[k];
    const double* taps = plan.taps.data() + s.offset;
    const auto lx = static_cast<int64_t>(nx), ly = static_cast<int64_t>(ny), lz = static_cast<int64_t>(nz);
    each([&](size_t x, size_t, size_t, size_t i) { a[i] = convolve_at(window.data(), i - x, 1, static_cast<int64_t>(x), lx, taps, s.radius); });
    each([&](size_t, size_t y, size_t, size_t i) { b[i] = convolve_at(a.data(), i - y * nx, nx, static_cast<int64_t>(y), ly, taps, s.radius); });
    each([&](size_t, size_t, size_t z, size_t i) { a[i] = convolve_at(b.data(), i - z * nx * ny, nx * ny, static_cast<int64_t>(z), lz, taps, s.radius); });
    const double s2 = s.sigma * s.sigma;
    each([&](size_t x, size_t y, size_t z, size_t i) {
      double h[6];
      hessian_at(a.data(), g, static_cast<uint32_t>(x), static_cast<uint32_t>(y), static_cast<uint32_t>(z), h);
      ves[i] = running_max(k == 0 ? 0.0f : ves[i], frangi_at(h, s2, plan.two_alpha2, plan.two_beta2, plan.two_gamma2));
    });
  }

  tresor::ct::Prepared p;
  p.stats = *stats;
  p.image = volume_of(*od, o.spacing, hu.origin, std::move(image));
  p.vesselness = volume_of(*od, o.spacing, hu.origin, std::move(ves));
  if (labels != nullptr) {
    std::vector<uint8_t> out(n);
    const uint64_t* near = plan.nearest.data();
    const size_t inx = hu.dims[0], iny = hu.dims[1];
    each([&](size_t x, size_t y, size_t z, size_t i) { out[i] = labels->data[near[x] + inx * (near[nx + y] + iny * near[nx + ny + z])]; });
    p.labels = volume_of(*od, o.spacing, labels->origin, std::move(out));
  }
  return p;
}

}  // namespace tresor::gpu::ct
