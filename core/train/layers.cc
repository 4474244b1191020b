// The 3D U-Net's layers, CPU reference (include/tresor/train/layers.h, docs/training.md §2).
// Float storage, double accumulation; the loops are the definitions written out, parallel over
// independent outputs so that results do not depend on the thread count.
#include "tresor/train/layers.h"

#include <algorithm>
#include <cmath>

#include "tresor/thread_pool.h"

namespace tresor::train {

std::string Tensor::shape_text() const {
  return std::to_string(shape[0]) + "×" + std::to_string(shape[1]) + "×" + std::to_string(shape[2]) + "×" + std::to_string(shape[3]) + "×" +
         std::to_string(shape[4]);
}

namespace {

Result<void> check_tensor(const Tensor& t, const char* what) {
  if (t.data.size() != t.size() || t.size() == 0) return fail(ErrorCode::kInvalidArgument, std::string(what) + ": empty, or its data does not match its shape " + t.shape_text());
  return {};
}

// The checks both convolutions share: channels, kernel and stride, the sizes of weight (cin·cout·k³
// values in either layout) and bias.
Result<void> check_kernel(const char* name, size_t cin, size_t cout, size_t k, size_t stride, const std::vector<float>& weight, const std::vector<float>& bias,
                          const Tensor& x) {
  TRESOR_TRY(check_tensor(x, name));
  if (x.shape[1] != cin) return fail(ErrorCode::kInvalidArgument, std::string(name) + ": the input has " + std::to_string(x.shape[1]) + " channels, the layer takes " + std::to_string(cin));
  if (k == 0 || stride == 0) return fail(ErrorCode::kInvalidArgument, std::string(name) + ": kernel size and stride must be positive");
  if (weight.size() != cout * cin * k * k * k || bias.size() != cout) {
    return fail(ErrorCode::kInvalidArgument, std::string(name) + ": weight has " + std::to_string(weight.size()) + " values and bias " + std::to_string(bias.size()) +
                                                 ", the layer needs " + std::to_string(cout * cin * k * k * k) + " and " + std::to_string(cout));
  }
  return {};
}

// A convolution's backward inputs: the output gradient of the forward's output shape, gradient
// buffers sized like the parameters.
Result<void> check_backward(const char* name, const std::array<size_t, 5>& want, const Tensor& dy, const std::vector<float>& dweight, const std::vector<float>& weight,
                            const std::vector<float>& dbias, const std::vector<float>& bias) {
  if (dy.shape != want || dy.data.size() != dy.size()) {
    return fail(ErrorCode::kInvalidArgument, std::string(name) + " backward: the output gradient is " + dy.shape_text() + ", the output " + Tensor(want).shape_text());
  }
  if (dweight.size() != weight.size() || dbias.size() != bias.size()) return fail(ErrorCode::kInvalidArgument, std::string(name) + " backward: gradient buffers of the wrong size");
  return {};
}

// ∂L/∂b[co] = Σ dy[·, co, ·], added into dbias.
void add_bias_gradient(const Tensor& dy, std::vector<float>& dbias, ThreadPool& pool) {
  const size_t n = dy.shape[0], cout = dy.shape[1], m = dy.spatial();
  pool.parallel_for(cout, [&](size_t co) {
    double acc = 0;
    for (size_t b = 0; b < n; ++b) {
      const float* g = dy.data.data() + (b * cout + co) * m;
      for (size_t i = 0; i < m; ++i) acc += g[i];
    }
    dbias[co] += static_cast<float>(acc);
  });
}

Result<void> check_conv(const Conv3d& c, const Tensor& x) {
  TRESOR_TRY(check_kernel("conv3d", c.cin, c.cout, c.k, c.stride, c.weight, c.bias, x));
  for (size_t a = 2; a < 5; ++a) {
    if (x.shape[a] + 2 * c.pad < c.k) {
      return fail(ErrorCode::kInvalidArgument, "conv3d: a kernel of " + std::to_string(c.k) + " does not fit the padded input " + x.shape_text());
    }
  }
  return {};
}

}  // namespace

namespace {

// The outputs [lo, hi) of a row of `ow` whose tap `t` reads inside an input row of `w`:
// 0 <= o·stride − pad + t < w.
std::pair<size_t, size_t> tap_range(size_t t, size_t stride, size_t pad, size_t w, size_t ow) {
  const size_t lo = t >= pad ? 0 : (pad - t + stride - 1) / stride;
  if (w + pad <= t) return {0, 0};
  const size_t hi = std::min(ow, (w - 1 + pad - t) / stride + 1);
  return {std::min(lo, hi), hi};
}

}  // namespace

// The loops run whole rows of x innermost (one tap's contribution to a row of outputs), so that
// the compiler vectorises them; bounds are settled once per row and tap.
Result<Tensor> Conv3d::forward(const Tensor& x, unsigned threads) const {
  TRESOR_TRY(check_conv(*this, x));
  const size_t n = x.shape[0], d = x.shape[2], h = x.shape[3], w = x.shape[4];
  Tensor y({n, cout, out_size(d), out_size(h), out_size(w)});
  const size_t od = y.shape[2], oh = y.shape[3], ow = y.shape[4];
  std::vector<std::pair<size_t, size_t>> range(k);
  for (size_t t = 0; t < k; ++t) range[t] = tap_range(t, stride, pad, w, ow);
  ThreadPool pool(threads);
  pool.parallel_for(n * cout * od, [&](size_t job) {
    const size_t oz = job % od, co = (job / od) % cout, b = job / (od * cout);
    std::vector<double> acc(ow);
    for (size_t oy = 0; oy < oh; ++oy) {
      std::fill(acc.begin(), acc.end(), static_cast<double>(bias[co]));
      for (size_t ci = 0; ci < cin; ++ci) {
        const float* xin = x.data.data() + (b * cin + ci) * d * h * w;
        const float* wk = weight.data() + (co * cin + ci) * k * k * k;
        for (size_t kz = 0; kz < k; ++kz) {
          const size_t iz = oz * stride + kz;  // + pad offset below
          if (iz < pad || iz - pad >= d) continue;
          for (size_t ky = 0; ky < k; ++ky) {
            const size_t iy = oy * stride + ky;
            if (iy < pad || iy - pad >= h) continue;
            const float* row = xin + ((iz - pad) * h + (iy - pad)) * w;
            for (size_t kx = 0; kx < k; ++kx) {
              const double wv = wk[(kz * k + ky) * k + kx];
              const auto [lo, hi] = range[kx];
              for (size_t ox = lo; ox < hi; ++ox) acc[ox] += wv * static_cast<double>(row[ox * stride + kx - pad]);
            }
          }
        }
      }
      float* out = y.data.data() + ((b * cout + co) * od + oz) * oh * ow + oy * ow;
      for (size_t ox = 0; ox < ow; ++ox) out[ox] = static_cast<float>(acc[ox]);
    }
  });
  return y;
}

Result<Tensor> Conv3d::backward(const Tensor& x, const Tensor& dy, std::vector<float>& dweight, std::vector<float>& dbias, unsigned threads) const {
  TRESOR_TRY(check_conv(*this, x));
  const size_t n = x.shape[0], d = x.shape[2], h = x.shape[3], w = x.shape[4];
  const std::array<size_t, 5> want{n, cout, out_size(d), out_size(h), out_size(w)};
  TRESOR_TRY(check_backward("conv3d", want, dy, dweight, weight, dbias, bias));
  const size_t od = want[2], oh = want[3], ow = want[4];
  std::vector<std::pair<size_t, size_t>> range(k);
  for (size_t t = 0; t < k; ++t) range[t] = tap_range(t, stride, pad, w, ow);
  ThreadPool pool(threads);
  add_bias_gradient(dy, dbias, pool);
  // ∂L/∂w[co, ci, kz, ky, kx] = Σ over samples and outputs of dy · x at the tap: per row pair
  // (output row, input row), one dot product per kx.
  pool.parallel_for(cout * cin, [&](size_t job) {
    const size_t co = job / cin, ci = job % cin;
    std::vector<double> taps(k * k * k, 0.0);
    for (size_t b = 0; b < n; ++b) {
      const float* xin = x.data.data() + (b * cin + ci) * d * h * w;
      const float* g = dy.data.data() + (b * cout + co) * od * oh * ow;
      for (size_t oz = 0; oz < od; ++oz)
        for (size_t kz = 0; kz < k; ++kz) {
          const size_t iz = oz * stride + kz;
          if (iz < pad || iz - pad >= d) continue;
          for (size_t oy = 0; oy < oh; ++oy) {
            const float* grow = g + (oz * oh + oy) * ow;
            for (size_t ky = 0; ky < k; ++ky) {
              const size_t iy = oy * stride + ky;
              if (iy < pad || iy - pad >= h) continue;
              const float* xrow = xin + ((iz - pad) * h + (iy - pad)) * w;
              for (size_t kx = 0; kx < k; ++kx) {
                const auto [lo, hi] = range[kx];
                double dot = 0;
                for (size_t ox = lo; ox < hi; ++ox) dot += static_cast<double>(grow[ox]) * static_cast<double>(xrow[ox * stride + kx - pad]);
                taps[(kz * k + ky) * k + kx] += dot;
              }
            }
          }
        }
    }
    float* dw = dweight.data() + (co * cin + ci) * k * k * k;
    for (size_t t = 0; t < taps.size(); ++t) dw[t] += static_cast<float>(taps[t]);
  });
  // ∂L/∂x: every output row scatters dy · w back to the input rows its taps read; one (sample,
  // input channel) per job, accumulated in double.
  Tensor dx(x.shape);
  pool.parallel_for(n * cin, [&](size_t job) {
    const size_t b = job / cin, ci = job % cin;
    std::vector<double> acc(d * h * w, 0.0);
    for (size_t co = 0; co < cout; ++co) {
      const float* g = dy.data.data() + (b * cout + co) * od * oh * ow;
      const float* wk = weight.data() + (co * cin + ci) * k * k * k;
      for (size_t oz = 0; oz < od; ++oz)
        for (size_t kz = 0; kz < k; ++kz) {
          const size_t iz = oz * stride + kz;
          if (iz < pad || iz - pad >= d) continue;
          for (size_t oy = 0; oy < oh; ++oy) {
            const float* grow = g + (oz * oh + oy) * ow;
            for (size_t ky = 0; ky < k; ++ky) {
              const size_t iy = oy * stride + ky;
              if (iy < pad || iy - pad >= h) continue;
              double* arow = acc.data() + ((iz - pad) * h + (iy - pad)) * w;
              for (size_t kx = 0; kx < k; ++kx) {
                const double wv = wk[(kz * k + ky) * k + kx];
                const auto [lo, hi] = range[kx];
                for (size_t ox = lo; ox < hi; ++ox) arow[ox * stride + kx - pad] += wv * static_cast<double>(grow[ox]);
              }
            }
          }
        }
    }
    float* out = dx.data.data() + (b * cin + ci) * d * h * w;
    for (size_t i = 0; i < acc.size(); ++i) out[i] = static_cast<float>(acc[i]);
  });
  return dx;
}

namespace {

Result<void> check_norm(const InstanceNormLeakyRelu& l, const Tensor& x) {
  TRESOR_TRY(check_tensor(x, "instance norm input"));
  if (x.shape[1] != l.channels || l.gamma.size() != l.channels || l.beta.size() != l.channels) {
    return fail(ErrorCode::kInvalidArgument, "instance norm: the input has " + std::to_string(x.shape[1]) + " channels, the layer " + std::to_string(l.channels) +
                                                 " (γ " + std::to_string(l.gamma.size()) + ", β " + std::to_string(l.beta.size()) + ")");
  }
  if (!(l.eps > 0)) return fail(ErrorCode::kInvalidArgument, "instance norm: eps must be positive");
  return {};
}

// Mean and biased variance of one (sample, channel).
std::pair<double, double> moments(const float* v, size_t m) {
  double s = 0;
  for (size_t i = 0; i < m; ++i) s += v[i];
  const double mean = s / static_cast<double>(m);
  double q = 0;
  for (size_t i = 0; i < m; ++i) q += (v[i] - mean) * (v[i] - mean);
  return {mean, q / static_cast<double>(m)};
}

}  // namespace

Result<Tensor> InstanceNormLeakyRelu::forward(const Tensor& x, unsigned threads) const {
  TRESOR_TRY(check_norm(*this, x));
  Tensor y(x.shape);
  const size_t m = x.spatial();
  ThreadPool pool(threads);
  pool.parallel_for(x.shape[0] * channels, [&](size_t job) {
    const size_t c = job % channels;
    const float* v = x.data.data() + job * m;
    float* out = y.data.data() + job * m;
    const auto [mean, var] = moments(v, m);
    const double inv = 1.0 / std::sqrt(var + eps);
    for (size_t i = 0; i < m; ++i) {
      const double z = gamma[c] * (v[i] - mean) * inv + beta[c];
      out[i] = static_cast<float>(z > 0 ? z : slope * z);
    }
  });
  return y;
}

Result<Tensor> InstanceNormLeakyRelu::backward(const Tensor& x, const Tensor& dy, std::vector<float>& dgamma, std::vector<float>& dbeta, unsigned threads) const {
  TRESOR_TRY(check_norm(*this, x));
  if (dy.shape != x.shape || dy.data.size() != dy.size()) return fail(ErrorCode::kInvalidArgument, "instance norm backward: the output gradient is " + dy.shape_text() + ", the input " + x.shape_text());
  if (dgamma.size() != channels || dbeta.size() != channels) return fail(ErrorCode::kInvalidArgument, "instance norm backward: gradient buffers of the wrong size");
  Tensor dx(x.shape);
  const size_t m = x.spatial(), n = x.shape[0];
  std::vector<double> dg(n * channels), db(n * channels);
  ThreadPool pool(threads);
  pool.parallel_for(n * channels, [&](size_t job) {
    const size_t c = job % channels;
    const float* v = x.data.data() + job * m;
    const float* g = dy.data.data() + job * m;
    const auto [mean, var] = moments(v, m);
    const double inv = 1.0 / std::sqrt(var + eps);
    // dz = dy through the leaky ReLU; x̂ = (x − μ)/σ; dx̂ = γ·dz;
    // dx = (dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂)) / σ.
    double sum_dz_xhat = 0, sum_dz = 0;
    for (size_t i = 0; i < m; ++i) {
      const double xhat = (v[i] - mean) * inv;
      const double z = gamma[c] * xhat + beta[c];
      const double dz = g[i] * (z > 0 ? 1.0 : slope);
      sum_dz += dz;
      sum_dz_xhat += dz * xhat;
    }
    dg[job] = sum_dz_xhat;
    db[job] = sum_dz;
    const double md = gamma[c] * sum_dz / static_cast<double>(m), mdx = gamma[c] * sum_dz_xhat / static_cast<double>(m);
    float* out = dx.data.data() + job * m;
    for (size_t i = 0; i < m; ++i) {
      const double xhat = (v[i] - mean) * inv;
      const double z = gamma[c] * xhat + beta[c];
      const double dxhat = gamma[c] * g[i] * (z > 0 ? 1.0 : slope);
      out[i] = static_cast<float>((dxhat - md - xhat * mdx) * inv);
    }
  });
  for (size_t b = 0; b < n; ++b)
    for (size_t c = 0; c < channels; ++c) {
      dgamma[c] += static_cast<float>(dg[b * channels + c]);
      dbeta[c] += static_cast<float>(db[b * channels + c]);
    }
  return dx;
}

Result<LossResult> dice_ce_loss(const Tensor& logits, const std::vector<uint8_t>& target, double smooth, unsigned threads, double dice_weight,
                                const LossAllReduce& across) {
  TRESOR_TRY(check_tensor(logits, "loss logits"));
  const size_t n = logits.shape[0], classes = logits.shape[1], m = logits.spatial();
  if (classes < 2) return fail(ErrorCode::kInvalidArgument, "loss: " + std::to_string(classes) + " class(es); at least 2 (background and one foreground)");
  if (target.size() != n * m) return fail(ErrorCode::kInvalidArgument, "loss: " + std::to_string(target.size()) + " target voxels for " + std::to_string(n * m));
  for (size_t i = 0; i < target.size(); ++i) {
    if (target[i] >= classes) return fail(ErrorCode::kInvalidArgument, "loss: target voxel " + std::to_string(i) + " is class " + std::to_string(target[i]) + " of " + std::to_string(classes));
  }
  if (!(smooth >= 0)) return fail(ErrorCode::kInvalidArgument, "loss: smooth must not be negative");
  // Softmax per voxel (max subtracted), kept in double.
  std::vector<double> p(n * classes * m);
  std::vector<double> ce(n, 0.0);
  ThreadPool pool(threads);
  pool.parallel_for(n, [&](size_t b) {
    for (size_t v = 0; v < m; ++v) {
      double mx = -INFINITY;
      for (size_t c = 0; c < classes; ++c) mx = std::max(mx, static_cast<double>(logits.data[(b * classes + c) * m + v]));
      double z = 0;
      for (size_t c = 0; c < classes; ++c) z += std::exp(logits.data[(b * classes + c) * m + v] - mx);
      for (size_t c = 0; c < classes; ++c) p[(b * classes + c) * m + v] = std::exp(logits.data[(b * classes + c) * m + v] - mx) / z;
      const size_t t = target[b * m + v];
      ce[b] -= (logits.data[(b * classes + t) * m + v] - mx) - std::log(z);
    }
  });
  // The statistics: [Σ CE, voxels, Σp·g for classes 1.., Σp + Σg for classes 1..]; summed over the
  // ranks when data-parallel.
  std::vector<double> stats(2 + 2 * (classes - 1), 0.0);
  for (double e : ce) stats[0] += e;
  stats[1] = static_cast<double>(n * m);
  for (size_t c = 1; c < classes; ++c) {
    double inter = 0, total = 0;
    for (size_t b = 0; b < n; ++b)
      for (size_t v = 0; v < m; ++v) {
        const double pv = p[(b * classes + c) * m + v];
        const double g = target[b * m + v] == c ? 1.0 : 0.0;
        inter += pv * g;
        total += pv + g;
      }
    stats[2 + (c - 1)] = inter;
    stats[2 + (classes - 1) + (c - 1)] = total;
  }
  if (across) TRESOR_TRY(across(stats));
  const double voxels = stats[1];
  LossResult r;
  r.cross_entropy = stats[0] / voxels;
  // Batch soft Dice per foreground class.
  std::vector<double> inter(classes, 0.0), total(classes, 0.0);
  for (size_t c = 1; c < classes; ++c) {
    inter[c] = stats[2 + (c - 1)];
    total[c] = stats[2 + (classes - 1) + (c - 1)];
    r.dice += (2 * inter[c] + smooth) / (total[c] + smooth);
  }
  const double fg = static_cast<double>(classes - 1);
  r.dice /= fg;
  r.loss = r.cross_entropy - dice_weight * r.dice;
  // Gradient: CE gives (p − onehot)/voxels; −mean Dice gives, per probability,
  // −(1/fg)·(2g(S + s) − (2I + s))/(S + s)², carried through the softmax's Jacobian.
  r.dlogits = Tensor(logits.shape);
  pool.parallel_for(n, [&](size_t b) {
    std::vector<double> dp(classes);
    for (size_t v = 0; v < m; ++v) {
      const size_t t = target[b * m + v];
      double dot = 0;
      for (size_t c = 0; c < classes; ++c) {
        const double pv = p[(b * classes + c) * m + v];
        dp[c] = 0;
        if (c > 0) {
          const double g = t == c ? 1.0 : 0.0, S = total[c] + smooth;
          dp[c] = -dice_weight * (2 * g * S - (2 * inter[c] + smooth)) / (S * S) / fg;
        }
        dot += pv * dp[c];
      }
      for (size_t c = 0; c < classes; ++c) {
        const double pv = p[(b * classes + c) * m + v];
        const double d_ce = (pv - (t == c ? 1.0 : 0.0)) / voxels;
        r.dlogits.data[(b * classes + c) * m + v] = static_cast<float>(d_ce + pv * (dp[c] - dot));
      }
    }
  });
  return r;
}

namespace {

Result<void> check_transposed(const ConvTranspose3d& c, const Tensor& x) {
  TRESOR_TRY(check_kernel("transposed conv3d", c.cin, c.cout, c.k, c.stride, c.weight, c.bias, x));
  for (size_t a = 2; a < 5; ++a) {
    if ((x.shape[a] - 1) * c.stride + c.k <= 2 * c.pad) return fail(ErrorCode::kInvalidArgument, "transposed conv3d: padding leaves no output for " + x.shape_text());
  }
  return {};
}

}  // namespace

Result<Tensor> ConvTranspose3d::forward(const Tensor& x, unsigned threads) const {
  TRESOR_TRY(check_transposed(*this, x));
  const size_t n = x.shape[0], d = x.shape[2], h = x.shape[3], w = x.shape[4];
  Tensor y({n, cout, out_size(d), out_size(h), out_size(w)});
  const size_t od = y.shape[2], oh = y.shape[3], ow = y.shape[4];
  const long P = static_cast<long>(pad), S = static_cast<long>(stride);
  ThreadPool pool(threads);
  // Gathered per output (no write conflicts): output o receives input i through tap o + pad − i·stride.
  pool.parallel_for(n * cout * od, [&](size_t job) {
    const size_t oz = job % od, co = (job / od) % cout, b = job / (od * cout);
    for (size_t oy = 0; oy < oh; ++oy)
      for (size_t ox = 0; ox < ow; ++ox) {
        double acc = bias[co];
        for (size_t ci = 0; ci < cin; ++ci) {
          const float* xin = x.data.data() + (b * cin + ci) * d * h * w;
          const float* wk = weight.data() + (ci * cout + co) * k * k * k;
          for (size_t iz = 0; iz < d; ++iz) {
            const long kz = static_cast<long>(oz) + P - static_cast<long>(iz) * S;
            if (kz < 0 || kz >= static_cast<long>(k)) continue;
            for (size_t iy = 0; iy < h; ++iy) {
              const long ky = static_cast<long>(oy) + P - static_cast<long>(iy) * S;
              if (ky < 0 || ky >= static_cast<long>(k)) continue;
              for (size_t ix = 0; ix < w; ++ix) {
                const long kx = static_cast<long>(ox) + P - static_cast<long>(ix) * S;
                if (kx < 0 || kx >= static_cast<long>(k)) continue;
                acc += static_cast<double>(xin[(iz * h + iy) * w + ix]) *
                       static_cast<double>(wk[(static_cast<size_t>(kz) * k + static_cast<size_t>(ky)) * k + static_cast<size_t>(kx)]);
              }
            }
          }
        }
        y.data[((b * cout + co) * od + oz) * oh * ow + oy * ow + ox] = static_cast<float>(acc);
      }
  });
  return y;
}

Result<Tensor> ConvTranspose3d::backward(const Tensor& x, const Tensor& dy, std::vector<float>& dweight, std::vector<float>& dbias, unsigned threads) const {
  TRESOR_TRY(check_transposed(*this, x));
  const size_t n = x.shape[0], d = x.shape[2], h = x.shape[3], w = x.shape[4];
  const std::array<size_t, 5> want{n, cout, out_size(d), out_size(h), out_size(w)};
  TRESOR_TRY(check_backward("transposed conv3d", want, dy, dweight, weight, dbias, bias));
  const size_t od = want[2], oh = want[3], ow = want[4];
  const long P = static_cast<long>(pad), S = static_cast<long>(stride), K = static_cast<long>(k);
  // The output position input i reaches through tap t along an axis of `on` outputs, or −1.
  auto at = [&](size_t i, long t, size_t on) {
    const long o = static_cast<long>(i) * S - P + t;
    return o >= 0 && o < static_cast<long>(on) ? o : -1;
  };
  ThreadPool pool(threads);
  add_bias_gradient(dy, dbias, pool);
  // ∂w[ci, co, t] = Σ x[ci, i]·dy[co, i·s − p + t]; ∂x[ci, i] = Σ_co,t dy[co, i·s − p + t]·w[ci, co, t].
  pool.parallel_for(cin * cout, [&](size_t job) {
    const size_t ci = job / cout, co = job % cout;
    for (long kz = 0; kz < K; ++kz)
      for (long ky = 0; ky < K; ++ky)
        for (long kx = 0; kx < K; ++kx) {
          double acc = 0;
          for (size_t b = 0; b < n; ++b) {
            const float* xin = x.data.data() + (b * cin + ci) * d * h * w;
            const float* g = dy.data.data() + (b * cout + co) * od * oh * ow;
            for (size_t iz = 0; iz < d; ++iz) {
              const long oz = at(iz, kz, od);
              if (oz < 0) continue;
              for (size_t iy = 0; iy < h; ++iy) {
                const long oy = at(iy, ky, oh);
                if (oy < 0) continue;
                for (size_t ix = 0; ix < w; ++ix) {
                  const long ox = at(ix, kx, ow);
                  if (ox < 0) continue;
                  acc += static_cast<double>(xin[(iz * h + iy) * w + ix]) *
                         static_cast<double>(g[(static_cast<size_t>(oz) * oh + static_cast<size_t>(oy)) * ow + static_cast<size_t>(ox)]);
                }
              }
            }
          }
          dweight[((ci * cout + co) * k + static_cast<size_t>(kz)) * k * k + static_cast<size_t>(ky) * k + static_cast<size_t>(kx)] += static_cast<float>(acc);
        }
  });
  Tensor dx(x.shape);
  pool.parallel_for(n * cin, [&](size_t job) {
    const size_t b = job / cin, ci = job % cin;
    float* out = dx.data.data() + job * d * h * w;
    for (size_t iz = 0; iz < d; ++iz)
      for (size_t iy = 0; iy < h; ++iy)
        for (size_t ix = 0; ix < w; ++ix) {
          double acc = 0;
          for (size_t co = 0; co < cout; ++co) {
            const float* g = dy.data.data() + (b * cout + co) * od * oh * ow;
            const float* wk = weight.data() + (ci * cout + co) * k * k * k;
            for (long kz = 0; kz < K; ++kz) {
              const long oz = at(iz, kz, od);
              if (oz < 0) continue;
              for (long ky = 0; ky < K; ++ky) {
                const long oy = at(iy, ky, oh);
                if (oy < 0) continue;
                for (long kx = 0; kx < K; ++kx) {
                  const long ox = at(ix, kx, ow);
                  if (ox < 0) continue;
                  acc += static_cast<double>(g[(static_cast<size_t>(oz) * oh + static_cast<size_t>(oy)) * ow + static_cast<size_t>(ox)]) *
                         static_cast<double>(wk[(static_cast<size_t>(kz) * k + static_cast<size_t>(ky)) * k + static_cast<size_t>(kx)]);
                }
              }
            }
          }
          out[(iz * h + iy) * w + ix] = static_cast<float>(acc);
        }
  });
  return dx;
}

Result<Tensor> concat_channels(const Tensor& a, const Tensor& b) {
  TRESOR_TRY(check_tensor(a, "concat"));
  TRESOR_TRY(check_tensor(b, "concat"));
  if (a.shape[0] != b.shape[0] || a.shape[2] != b.shape[2] || a.shape[3] != b.shape[3] || a.shape[4] != b.shape[4]) {
    return fail(ErrorCode::kInvalidArgument, "concat: " + a.shape_text() + " and " + b.shape_text() + " differ outside the channels");
  }
  Tensor out({a.shape[0], a.shape[1] + b.shape[1], a.shape[2], a.shape[3], a.shape[4]});
  const size_t m = a.spatial();
  for (size_t s = 0; s < a.shape[0]; ++s) {
    std::copy_n(a.data.begin() + static_cast<std::ptrdiff_t>(s * a.shape[1] * m), a.shape[1] * m, out.data.begin() + static_cast<std::ptrdiff_t>(s * out.shape[1] * m));
    std::copy_n(b.data.begin() + static_cast<std::ptrdiff_t>(s * b.shape[1] * m), b.shape[1] * m,
                out.data.begin() + static_cast<std::ptrdiff_t>((s * out.shape[1] + a.shape[1]) * m));
  }
  return out;
}

Result<std::pair<Tensor, Tensor>> split_channels(const Tensor& d, size_t channels_a) {
  TRESOR_TRY(check_tensor(d, "split"));
  if (channels_a == 0 || channels_a >= d.shape[1]) return fail(ErrorCode::kInvalidArgument, "split: " + std::to_string(channels_a) + " of " + std::to_string(d.shape[1]) + " channels");
  Tensor a({d.shape[0], channels_a, d.shape[2], d.shape[3], d.shape[4]}), b({d.shape[0], d.shape[1] - channels_a, d.shape[2], d.shape[3], d.shape[4]});
  const size_t m = d.spatial();
  for (size_t s = 0; s < d.shape[0]; ++s) {
    std::copy_n(d.data.begin() + static_cast<std::ptrdiff_t>(s * d.shape[1] * m), a.shape[1] * m, a.data.begin() + static_cast<std::ptrdiff_t>(s * a.shape[1] * m));
    std::copy_n(d.data.begin() + static_cast<std::ptrdiff_t>((s * d.shape[1] + channels_a) * m), b.shape[1] * m, b.data.begin() + static_cast<std::ptrdiff_t>(s * b.shape[1] * m));
  }
  return std::pair{std::move(a), std::move(b)};
}

Result<void> Sgd::step(std::vector<float>& p, const std::vector<float>& g, double lr) {
  if (p.size() != g.size()) return fail(ErrorCode::kInvalidArgument, "sgd: " + std::to_string(p.size()) + " parameters, " + std::to_string(g.size()) + " gradients");
  if (velocity.empty()) velocity.assign(p.size(), 0.0f);
  if (velocity.size() != p.size()) return fail(ErrorCode::kInvalidArgument, "sgd: the momentum buffer has another size than the parameters");
  // PyTorch's SGD: the first step's buffer is the gradient itself (buf = g), later μ·buf + g;
  // with a zero-initialised buffer both are μ·0 + g.
  for (size_t i = 0; i < p.size(); ++i) {
    const double gi = static_cast<double>(g[i]) + weight_decay * p[i];
    const double v = momentum * velocity[i] + gi;
    velocity[i] = static_cast<float>(v);
    p[i] = static_cast<float>(p[i] - lr * (nesterov ? gi + momentum * v : v));
  }
  return {};
}

Result<void> AdamW::step(std::vector<float>& p, const std::vector<float>& g, double lr) {
  if (p.size() != g.size()) return fail(ErrorCode::kInvalidArgument, "adamw: " + std::to_string(p.size()) + " parameters, " + std::to_string(g.size()) + " gradients");
  if (m.empty()) m.assign(p.size(), 0.0f);
  if (v.empty()) v.assign(p.size(), 0.0f);
  if (m.size() != p.size() || v.size() != p.size()) return fail(ErrorCode::kInvalidArgument, "adamw: moment buffers of another size than the parameters");
  ++t;
  const double c1 = 1 - std::pow(beta1, static_cast<double>(t)), c2 = 1 - std::pow(beta2, static_cast<double>(t));
  for (size_t i = 0; i < p.size(); ++i) {
    double pi = p[i] * (1 - lr * weight_decay);
    const double mi = beta1 * m[i] + (1 - beta1) * g[i];
    const double vi = beta2 * v[i] + (1 - beta2) * static_cast<double>(g[i]) * g[i];
    m[i] = static_cast<float>(mi);
    v[i] = static_cast<float>(vi);
    pi -= lr * (mi / c1) / (std::sqrt(vi / c2) + eps);
    p[i] = static_cast<float>(pi);
  }
  return {};
}

double poly_lr(double lr0, uint64_t step, uint64_t steps) {
  if (steps == 0 || step >= steps) return 0;
  return lr0 * std::pow(1.0 - static_cast<double>(step) / static_cast<double>(steps), 0.9);
}

}  // namespace tresor::train
