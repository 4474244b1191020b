// CT preprocessing operations, CPU references (include/tresor/ct/ops.h, docs/preprocessing.md §4).
#include "tresor/ct/ops.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "internal.h"
#include "tresor/thread_pool.h"

namespace tresor::ct {
namespace {

template <typename Out, typename In>
Result<Volume<Out>> grid_like(const Volume<In>& v, const std::array<double, 3>& spacing) {
  if (v.data.size() != v.size()) return fail(ErrorCode::kInvalidArgument, "resample: an empty volume");
  auto dims = resample_grid(v.dims, v.spacing, spacing);
  if (!dims) return std::unexpected(dims.error());
  Volume<Out> out;
  out.dims = *dims;
  out.spacing = spacing;
  out.origin = v.origin;
  out.data.resize(out.size());
  return out;
}

// Mirror an index into 0..n-1 the way SciPy's "reflect" mode does (the edge sample repeated).
long reflect(long i, long n) {
  if (n == 1) return 0;
  const long period = 2 * n;
  i %= period;
  if (i < 0) i += period;
  return i < n ? i : period - 1 - i;
}

std::vector<double> gaussian_kernel(double sigma, double truncate) {
  const long r = static_cast<long>(truncate * sigma + 0.5);
  std::vector<double> k(static_cast<size_t>(2 * r + 1));
  double sum = 0;
  for (long i = -r; i <= r; ++i) sum += k[static_cast<size_t>(i + r)] = std::exp(-0.5 * (static_cast<double>(i) / sigma) * (static_cast<double>(i) / sigma));
  for (auto& x : k) x /= sum;
  return k;
}

template <typename T>
void convolve_axis(const T* src, T* dst, const std::array<size_t, 3>& d, size_t axis, const std::vector<double>& k, ThreadPool& pool) {
  const long r = static_cast<long>(k.size() / 2);
  const size_t len = d[axis];
  // Source position of every tap position −r .. len−1+r along the axis, mirrored.
  std::vector<size_t> at(len + 2 * static_cast<size_t>(r));
  for (size_t i = 0; i < at.size(); ++i) at[i] = static_cast<size_t>(reflect(static_cast<long>(i) - r, static_cast<long>(len)));
  const size_t nx = d[0], ny = d[1];
  pool.parallel_for(d[2], [&](size_t z) {
    std::vector<double> acc(nx), padded(axis == 0 ? at.size() : 0);
    for (size_t y = 0; y < ny; ++y) {
      std::fill(acc.begin(), acc.end(), 0.0);
      if (axis == 0) {
        // Along x: mirror the row into a padded copy, then accumulate tap by tap (vectorises over x).
        const T* row = src + nx * (y + ny * z);
        for (size_t i = 0; i < at.size(); ++i) padded[i] = static_cast<double>(row[at[i]]);
        for (size_t t = 0; t < k.size(); ++t) {
          const double w = k[t];
          const double* p = padded.data() + t;
          for (size_t x = 0; x < nx; ++x) acc[x] += w * p[x];
        }
      } else {
        // Along y or z: whole rows of x, each tap a row from a mirrored y or z.
        const size_t pos = axis == 1 ? y : z;
        for (size_t t = 0; t < k.size(); ++t) {
          const size_t s = at[pos + t];
          const T* row = axis == 1 ? src + nx * (s + ny * z) : src + nx * (y + ny * s);
          const double w = k[t];
          for (size_t x = 0; x < nx; ++x) acc[x] += w * static_cast<double>(row[x]);
        }
      }
      T* out = dst + nx * (y + ny * z);
      for (size_t x = 0; x < nx; ++x) out[x] = static_cast<T>(acc[x]);
    }
  });
}

}  // namespace

Result<std::array<size_t, 3>> resample_grid(const std::array<size_t, 3>& dims, const std::array<double, 3>& spacing,
                                            const std::array<double, 3>& new_spacing) {
  if (dims[0] * dims[1] * dims[2] == 0) return fail(ErrorCode::kInvalidArgument, "resample: an empty volume");
  std::array<size_t, 3> out{};
  double voxels = 1;
  for (size_t a = 0; a < 3; ++a) {
    if (!(new_spacing[a] >= 0.05 && new_spacing[a] <= 20)) {
      return fail(ErrorCode::kInvalidArgument, "resample: spacing " + std::to_string(new_spacing[a]) + " mm on axis " + std::to_string(a) + " is not 0.05..20");
    }
    if (!(spacing[a] > 0 && spacing[a] <= 1e4)) {
      return fail(ErrorCode::kInvalidArgument, "resample: the volume's spacing " + std::to_string(spacing[a]) + " mm on axis " + std::to_string(a) + " is not positive");
    }
    // Centres at 0, s', 2s', … up to the last old centre.
    const double n = std::floor(static_cast<double>(dims[a] - 1) * spacing[a] / new_spacing[a] + 1e-9) + 1;
    voxels *= n;
    if (voxels > 2147483648.0) return fail(ErrorCode::kInvalidArgument, "resample: the output would have more than 2^31 voxels");
    out[a] = static_cast<size_t>(n);
  }
  return out;
}

template <typename T>
void detail::gaussian_voxels(std::vector<T>& v, const std::array<size_t, 3>& d, const std::array<double, 3>& sigma_voxels, double truncate, ThreadPool& pool) {
  std::vector<T> tmp;
  for (size_t axis = 0; axis < 3; ++axis) {
    if (!(sigma_voxels[axis] > 0)) continue;
    if (tmp.size() != v.size()) tmp.resize(v.size());
    convolve_axis(v.data(), tmp.data(), d, axis, gaussian_kernel(sigma_voxels[axis], truncate), pool);
    v.swap(tmp);
  }
}
template void detail::gaussian_voxels(std::vector<float>&, const std::array<size_t, 3>&, const std::array<double, 3>&, double, ThreadPool&);
template void detail::gaussian_voxels(std::vector<double>&, const std::array<size_t, 3>&, const std::array<double, 3>&, double, ThreadPool&);

void gaussian_in_place(std::vector<float>& v, const std::array<size_t, 3>& d, const std::array<double, 3>& spacing,
                       const std::array<double, 3>& sigma_mm, double truncate) {
  ThreadPool pool(0);
  detail::gaussian_voxels(v, d, {sigma_mm[0] / spacing[0], sigma_mm[1] / spacing[1], sigma_mm[2] / spacing[2]}, truncate, pool);
}

Result<FloatVolume> gaussian(const FloatVolume& v, std::array<double, 3> sigma_mm, double truncate) {
  for (double s : sigma_mm) {
    if (!(s >= 0)) return fail(ErrorCode::kInvalidArgument, "gaussian: sigma " + std::to_string(s) + " mm is negative");
  }
  FloatVolume out = v;
  gaussian_in_place(out.data, out.dims, out.spacing, sigma_mm, truncate);
  return out;
}

namespace {

// fn(i) for every voxel index, in blocks of 1 Mi voxels over all cores.
template <typename F>
void for_each_block(size_t n, unsigned threads, F&& fn) {
  constexpr size_t kBlock = size_t{1} << 20;
  ThreadPool pool(threads);
  pool.parallel_for((n + kBlock - 1) / kBlock, [&](size_t b) {
    const size_t end = std::min(n, (b + 1) * kBlock);
    for (size_t i = b * kBlock; i < end; ++i) fn(i);
  });
}

template <typename T>
FloatVolume like(const Volume<T>& v) {
  FloatVolume out;
  out.dims = v.dims;
  out.spacing = v.spacing;
  out.origin = v.origin;
  out.data.resize(v.data.size());
  return out;
}

template <typename T>
Result<FloatVolume> window_any(const Volume<T>& v, double lower, double upper, unsigned threads) {
  if (!(lower < upper)) return fail(ErrorCode::kInvalidArgument, "window: lower " + std::to_string(lower) + " is not below upper " + std::to_string(upper));
  FloatVolume out = like(v);
  const double scale = 1.0 / (upper - lower);
  for_each_block(v.data.size(), threads, [&](size_t i) { out.data[i] = static_cast<float>((std::clamp<double>(v.data[i], lower, upper) - lower) * scale); });
  return out;
}

template <typename T>
FloatVolume normalise_any(const Volume<T>& v, const CtNormalisation& n, unsigned threads) {
  FloatVolume out = like(v);
  const double sd = std::max(n.sd, 1e-8);
  for_each_block(v.data.size(), threads, [&](size_t i) { out.data[i] = static_cast<float>((std::clamp<double>(v.data[i], n.lower, n.upper) - n.mean) / sd); });
  return out;
}

}  // namespace

Result<FloatVolume> window(const HuVolume& v, double lower, double upper, unsigned threads) { return window_any(v, lower, upper, threads); }
Result<FloatVolume> window(const FloatVolume& v, double lower, double upper, unsigned threads) { return window_any(v, lower, upper, threads); }
FloatVolume normalise(const HuVolume& v, const CtNormalisation& n, unsigned threads) { return normalise_any(v, n, threads); }
FloatVolume normalise(const FloatVolume& v, const CtNormalisation& n, unsigned threads) { return normalise_any(v, n, threads); }

Result<CtNormalisation> ct_normalisation(const HuVolume& v, const LabelVolume& foreground) {
  if (v.dims != foreground.dims || v.data.size() != foreground.data.size()) {
    return fail(ErrorCode::kInvalidArgument, "ct normalisation: the foreground mask does not have the volume's dimensions");
  }
  // HU are int16: a histogram of the 65536 values gives the exact order statistics in one pass
  // (no sort), and exact integer sums for the mean and variance.
  std::vector<uint64_t> count(65536, 0);
  for (size_t i = 0; i < v.data.size(); ++i) {
    if (foreground.data[i] != 0) ++count[static_cast<size_t>(v.data[i] + 32768)];
  }
  return ct_normalisation_from_histogram(count);
}

Result<CtNormalisation> ct_normalisation_from_histogram(std::span<const uint64_t> count) {
  if (count.size() != 65536) return fail(ErrorCode::kInvalidArgument, "ct normalisation: a histogram of " + std::to_string(count.size()) + " bins, not 65536");
  uint64_t n = 0;
  int64_t sum = 0;
  unsigned __int128 sq = 0;
  for (size_t b = 0; b < count.size(); ++b) {
    if (count[b] == 0) continue;
    const int64_t h = static_cast<int64_t>(b) - 32768;
    n += count[b];
    sum += h * static_cast<int64_t>(count[b]);
    sq += static_cast<unsigned __int128>(h * h) * count[b];
  }
  if (n == 0) return fail(ErrorCode::kInvalidArgument, "ct normalisation: the foreground is empty");
  // The k-th smallest foreground value (0-based).
  auto kth = [&](uint64_t k) {
    uint64_t seen = 0;
    for (size_t b = 0; b < count.size(); ++b) {
      seen += count[b];
      if (seen > k) return static_cast<double>(static_cast<int>(b) - 32768);
    }
    return 0.0;  // not reached: k < n
  };
  // NumPy's default percentile: linear interpolation between the order statistics around
  // p/100·(n−1).
  auto percentile = [&](double p) {
    const double at = p / 100 * static_cast<double>(n - 1);
    const auto lo = static_cast<uint64_t>(std::floor(at));
    const uint64_t hi = std::min(lo + 1, n - 1);
    const double a = kth(lo), b = kth(hi);
    return a + (at - static_cast<double>(lo)) * (b - a);
  };
  CtNormalisation out;
  out.lower = percentile(0.5);
  out.upper = percentile(99.5);
  out.mean = static_cast<double>(sum) / static_cast<double>(n);
  // Population variance (n·Σx² − (Σx)²) / n², exact in 128-bit integers before the division.
  const auto nn = static_cast<unsigned __int128>(n);
  const auto s2 = static_cast<unsigned __int128>(static_cast<__int128>(sum) * sum);
  out.sd = std::sqrt(static_cast<double>(nn * sq - s2) / (static_cast<double>(n) * static_cast<double>(n)));
  return out;
}

Result<FloatVolume> resample_linear(const HuVolume& v, std::array<double, 3> spacing, unsigned threads) {
  auto out = grid_like<float>(v, spacing);
  if (!out) return std::unexpected(out.error());
  const auto& d = v.dims;
  const auto& od = out->dims;
  ThreadPool pool(threads);
  pool.parallel_for(od[2], [&](size_t z) {
    // Source coordinate along each axis, its lower neighbour and weight (edges clamped).
    auto coord = [&](size_t j, size_t a, size_t& i0, size_t& i1, double& w) {
      const double x = static_cast<double>(j) * spacing[a] / v.spacing[a];
      const double f = std::floor(x);
      i0 = std::min(static_cast<size_t>(f), d[a] - 1);
      i1 = std::min(i0 + 1, d[a] - 1);
      w = x - f;
    };
    size_t z0, z1;
    double wz;
    coord(z, 2, z0, z1, wz);
    for (size_t y = 0; y < od[1]; ++y) {
      size_t y0, y1;
      double wy;
      coord(y, 1, y0, y1, wy);
      for (size_t x = 0; x < od[0]; ++x) {
        size_t x0, x1;
        double wx;
        coord(x, 0, x0, x1, wx);
        auto at = [&](size_t xx, size_t yy, size_t zz) { return static_cast<double>(v.at(xx, yy, zz)); };
        const double c00 = at(x0, y0, z0) * (1 - wx) + at(x1, y0, z0) * wx, c10 = at(x0, y1, z0) * (1 - wx) + at(x1, y1, z0) * wx;
        const double c01 = at(x0, y0, z1) * (1 - wx) + at(x1, y0, z1) * wx, c11 = at(x0, y1, z1) * (1 - wx) + at(x1, y1, z1) * wx;
        const double c0 = c00 * (1 - wy) + c10 * wy, c1 = c01 * (1 - wy) + c11 * wy;
        out->at(x, y, z) = static_cast<float>(c0 * (1 - wz) + c1 * wz);
      }
    }
  });
  return out;
}

Result<LabelVolume> resample_nearest(const LabelVolume& v, std::array<double, 3> spacing, unsigned threads) {
  auto out = grid_like<uint8_t>(v, spacing);
  if (!out) return std::unexpected(out.error());
  const auto& d = v.dims;
  const auto& od = out->dims;
  auto nearest = [&](size_t j, size_t a) {
    // floor(x + 0.5), as SciPy's order-0 interpolation.
    return std::min(static_cast<size_t>(std::floor(static_cast<double>(j) * spacing[a] / v.spacing[a] + 0.5)), d[a] - 1);
  };
  ThreadPool pool(threads);
  pool.parallel_for(od[2], [&](size_t z) {
    const size_t sz = nearest(z, 2);
    for (size_t y = 0; y < od[1]; ++y) {
      const size_t sy = nearest(y, 1);
      for (size_t x = 0; x < od[0]; ++x) out->at(x, y, z) = v.at(nearest(x, 0), sy, sz);
    }
  });
  return out;
}

Result<double> roc_auc(const std::vector<float>& score, const LabelVolume& labels, uint8_t positive) {
  if (score.size() != labels.data.size()) {
    return fail(ErrorCode::kInvalidArgument, "roc auc: " + std::to_string(score.size()) + " scores for " + std::to_string(labels.data.size()) + " voxels");
  }
  std::vector<uint32_t> order(score.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = static_cast<uint32_t>(i);
  std::sort(order.begin(), order.end(), [&](uint32_t a, uint32_t b) { return score[a] < score[b]; });
  // Sum of the positives' ranks (1-based, tied runs sharing their mean rank).
  double rank_sum = 0;
  size_t pos = 0;
  for (size_t i = 0; i < order.size();) {
    size_t j = i;
    size_t run_pos = 0;
    while (j < order.size() && score[order[j]] == score[order[i]]) run_pos += labels.data[order[j++]] == positive ? 1u : 0u;
    rank_sum += static_cast<double>(run_pos) * (static_cast<double>(i + 1) + static_cast<double>(j)) / 2;
    pos += run_pos;
    i = j;
  }
  const size_t neg = score.size() - pos;
  if (pos == 0 || neg == 0) {
    return fail(ErrorCode::kInvalidArgument, pos == 0 ? "roc auc: no voxel has label " + std::to_string(positive) : "roc auc: every voxel has label " + std::to_string(positive));
  }
  const double p = static_cast<double>(pos), n = static_cast<double>(neg);
  return (rank_sum - p * (p + 1) / 2) / (p * n);
}

}  // namespace tresor::ct
