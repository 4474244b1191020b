// Sliding-window inference, CPU reference (include/tresor/train/inference.h, docs/training.md §10).
// The rules follow nnU-Net v2's compute_steps_for_sliding_window and compute_gaussian (Isensee et
// al. 2021; nnunetv2/inference/sliding_window_prediction.py).
#include "tresor/train/inference.h"

#include <algorithm>
#include <cmath>

namespace tresor::train {

std::vector<size_t> sliding_window_starts(size_t image, size_t tile, double step) {
  if (image <= tile || tile == 0) return {0};
  const double target = static_cast<double>(tile) * step;
  const size_t n = static_cast<size_t>(std::ceil(static_cast<double>(image - tile) / target)) + 1;
  const double actual = static_cast<double>(image - tile) / static_cast<double>(n - 1);
  std::vector<size_t> out(n);
  // NumPy's round: halves to even, as nnU-Net's int(np.round(…)).
  for (size_t i = 0; i < n; ++i) out[i] = static_cast<size_t>(std::nearbyint(actual * static_cast<double>(i)));
  return out;
}

std::vector<float> gaussian_importance(size_t tile, double sigma_scale, double peak) {
  // An impulse filtered separably with zero outside: the product of three 1D kernels evaluated at
  // the offsets from the centre. scipy's kernel: radius ⌊4σ + 0.5⌋, exp(−x²/2σ²) normalised.
  const double sigma = sigma_scale * static_cast<double>(tile);
  const long radius = static_cast<long>(4.0 * sigma + 0.5);
  std::vector<double> k(static_cast<size_t>(2 * radius + 1));
  double sum = 0;
  for (long i = -radius; i <= radius; ++i) {
    k[static_cast<size_t>(i + radius)] = sigma > 0 ? std::exp(-0.5 * static_cast<double>(i * i) / (sigma * sigma)) : (i == 0 ? 1.0 : 0.0);
    sum += k[static_cast<size_t>(i + radius)];
  }
  for (auto& v : k) v /= sum;
  const long c = static_cast<long>(tile / 2);
  std::vector<double> axis(tile);
  for (size_t i = 0; i < tile; ++i) {
    const long off = static_cast<long>(i) - c;
    axis[i] = std::abs(off) <= radius ? k[static_cast<size_t>(off + radius)] : 0.0;
  }
  std::vector<double> g(tile * tile * tile);
  double mx = 0;
  for (size_t z = 0; z < tile; ++z)
    for (size_t y = 0; y < tile; ++y)
      for (size_t x = 0; x < tile; ++x) {
        const double v = axis[z] * axis[y] * axis[x];
        g[(z * tile + y) * tile + x] = v;
        mx = std::max(mx, v);
      }
  std::vector<float> out(g.size());
  float smallest = 0;
  for (size_t i = 0; i < g.size(); ++i) {
    out[i] = static_cast<float>(g[i] / mx * peak);
    if (out[i] > 0 && (smallest == 0 || out[i] < smallest)) smallest = out[i];
  }
  for (auto& v : out)
    if (v == 0) v = smallest;
  return out;
}

Result<Tensor> sliding_window_logits(UNet& net, const Tensor& volume, const SlidingWindowOptions& o) {
  const size_t f = size_t{1} << (net.config().levels - 1);
  if (o.tile == 0 || o.tile % f != 0) return fail(ErrorCode::kInvalidArgument, "inference: a tile of " + std::to_string(o.tile) + " is not a multiple of " + std::to_string(f));
  if (!(o.step > 0 && o.step <= 1)) return fail(ErrorCode::kInvalidArgument, "inference: the step must be in (0, 1] of a tile");
  if (o.batch == 0) return fail(ErrorCode::kInvalidArgument, "inference: the batch must be positive");
  if (volume.shape[0] != 1 || volume.shape[1] != net.config().in_channels || volume.data.size() != volume.size() || volume.size() == 0) {
    return fail(ErrorCode::kInvalidArgument, "inference: the volume is " + volume.shape_text() + ", the model takes 1×" + std::to_string(net.config().in_channels) + "×D×H×W");
  }
  const size_t C = volume.shape[1], K = net.config().classes, T = o.tile;
  const size_t D = volume.shape[2], H = volume.shape[3], W = volume.shape[4];
  const auto zs = sliding_window_starts(D, T, o.step), ys = sliding_window_starts(H, T, o.step), xs = sliding_window_starts(W, T, o.step);
  const std::vector<float> gauss = gaussian_importance(T, o.sigma_scale);
  std::vector<std::array<size_t, 3>> tiles;
  for (size_t z : zs)
    for (size_t y : ys)
      for (size_t x : xs) tiles.push_back({z, y, x});
  std::vector<double> acc(K * D * H * W, 0.0), weight(D * H * W, 0.0);
  const size_t m = T * T * T;
  for (size_t first = 0; first < tiles.size(); first += o.batch) {
    const size_t n = std::min(o.batch, tiles.size() - first);
    Tensor x({n, C, T, T, T});  // zero outside the volume: padding
    for (size_t b = 0; b < n; ++b) {
      const auto [z0, y0, x0] = tiles[first + b];
      for (size_t c = 0; c < C; ++c)
        for (size_t z = 0; z < T && z0 + z < D; ++z)
          for (size_t y = 0; y < T && y0 + y < H; ++y) {
            const size_t cols = std::min(T, W - x0);
            const float* src = volume.data.data() + ((c * D + z0 + z) * H + y0 + y) * W + x0;
            std::copy_n(src, cols, x.data.data() + ((b * C + c) * T + z) * T * T + y * T);
          }
    }
    auto logits = net.forward(x, o.threads);
    if (!logits) return std::unexpected(logits.error());
    if (o.mirror) {
      // nnU-Net's order: the tile, then the flips along D, H, W, (D, H), (D, W), (H, W), (D, H, W)
      // (itertools.combinations of the axes by size), summed in float, then divided by 8.
      for (unsigned axes : {4u, 2u, 1u, 6u, 5u, 3u, 7u}) {
        auto flipped = net.forward(flip_spatial(x, axes), o.threads);
        if (!flipped) return std::unexpected(flipped.error());
        const Tensor back = flip_spatial(*flipped, axes);
        for (size_t i = 0; i < logits->data.size(); ++i) logits->data[i] += back.data[i];
      }
      for (float& v : logits->data) v /= 8.0f;
    }
    for (size_t b = 0; b < n; ++b) {
      const auto [z0, y0, x0] = tiles[first + b];
      for (size_t z = 0; z < T && z0 + z < D; ++z)
        for (size_t y = 0; y < T && y0 + y < H; ++y)
          for (size_t xx = 0; xx < T && x0 + xx < W; ++xx) {
            const size_t t = (z * T + y) * T + xx, v = ((z0 + z) * H + y0 + y) * W + x0 + xx;
            const float g = gauss[t];
            for (size_t k = 0; k < K; ++k) acc[k * D * H * W + v] += static_cast<double>(g) * logits->data[(b * K + k) * m + t];
            weight[v] += g;
          }
    }
  }
  Tensor out({1, K, D, H, W});
  for (size_t k = 0; k < K; ++k)
    for (size_t v = 0; v < D * H * W; ++v) out.data[k * D * H * W + v] = static_cast<float>(acc[k * D * H * W + v] / weight[v]);
  return out;
}

Tensor flip_spatial(const Tensor& t, unsigned axes) {
  Tensor out(t.shape);
  const size_t D = t.shape[2], H = t.shape[3], W = t.shape[4];
  for (size_t nc = 0; nc < t.shape[0] * t.shape[1]; ++nc)
    for (size_t z = 0; z < D; ++z)
      for (size_t y = 0; y < H; ++y) {
        const size_t sz = (axes & 4u) != 0 ? D - 1 - z : z, sy = (axes & 2u) != 0 ? H - 1 - y : y;
        const float* src = t.data.data() + ((nc * D + sz) * H + sy) * W;
        float* dst = out.data.data() + ((nc * D + z) * H + y) * W;
        if ((axes & 1u) != 0) {
          std::reverse_copy(src, src + W, dst);
        } else {
          std::copy_n(src, W, dst);
        }
      }
  return out;
}

Tensor case_input(const ct::Prepared& c, double vesselness_scale) {
  const auto& d = c.image.dims;
  Tensor t({1, 2, d[2], d[1], d[0]});
  const size_t m = c.image.size();
  std::copy(c.image.data.begin(), c.image.data.end(), t.data.begin());
  for (size_t i = 0; i < m; ++i) t.data[m + i] = c.vesselness.data[i] * static_cast<float>(vesselness_scale);
  return t;
}

}  // namespace tresor::train
