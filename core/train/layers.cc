// The 3D U-Net's layers, CPU reference (include/tresor/train/layers.h, docs/training.md §2).
// Float storage, double accumulation, sums in orders the shapes alone fix, so that results do not
// depend on the thread count. The convolutions are matrix products (lowering.h); the other layers'
// loops are their definitions written out, parallel over independent outputs.
#include "tresor/train/layers.h"

#include <algorithm>
#include <cmath>

#include "lowering.h"
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

// The lowering of a convolution (im2col rows (input channel, tap), one column per output voxel)
// and of a transposed one (rows (output channel, tap), one column per input voxel): in both,
// position o and tap t meet voxel o·stride − pad + t of the tensor the columns read or write.
lowering::Geometry conv_geometry(const Conv3d& c, const Tensor& x) {
  return {c.cin, {x.shape[2], x.shape[3], x.shape[4]}, {c.out_size(x.shape[2]), c.out_size(x.shape[3]), c.out_size(x.shape[4])}, c.k, c.stride, c.pad};
}

lowering::Geometry transposed_geometry(const ConvTranspose3d& c, const Tensor& x) {
  return {c.cout, {c.out_size(x.shape[2]), c.out_size(x.shape[3]), c.out_size(x.shape[4])}, {x.shape[2], x.shape[3], x.shape[4]}, c.k, c.stride, c.pad};
}

// The blocks of a sample's positions, in order: [p0, p1).
template <typename Fn>
void for_each_block(size_t positions, size_t block, Fn&& fn) {
  for (size_t p0 = 0; p0 < positions; p0 += block) fn(p0, std::min(positions, p0 + block));
}

void store(const double* from, size_t count, float* to) {
  for (size_t i = 0; i < count; ++i) to[i] = static_cast<float>(from[i]);
}

// A weight gradient summed in double, added into the caller's.
void add_gradient(const std::vector<double>& sum, std::vector<float>& dst) {
  for (size_t i = 0; i < sum.size(); ++i) dst[i] += static_cast<float>(sum[i]);
}

// A weight [a][b] as [b][a].
std::vector<float> transposed(const std::vector<float>& w, size_t a, size_t b) {
  std::vector<float> t(w.size());
  for (size_t i = 0; i < a; ++i)
    for (size_t j = 0; j < b; ++j) t[j * a + i] = w[i * b + j];
  return t;
}

}  // namespace

// y[co][o] = b[co] + Σ over (ci, tap) ascending of w · x: the weights [cout] × [cin·k³] times the
// column matrix, one block of output voxels at a time.
Result<Tensor> Conv3d::forward(const Tensor& x, unsigned threads) const {
  TRESOR_TRY(check_conv(*this, x));
  const lowering::Geometry g = conv_geometry(*this, x);
  const size_t n = x.shape[0], rows = g.rows(), positions = g.positions(), block = lowering::block_positions(rows, positions);
  Tensor y({n, cout, g.grid[0], g.grid[1], g.grid[2]});
  ThreadPool pool(threads);
  std::vector<float> col(lowering::packed_size(rows, block));
  std::vector<double> acc(cout * block);
  for (size_t b = 0; b < n; ++b) {
    const float* xb = x.data.data() + b * cin * x.spatial();
    for_each_block(positions, block, [&](size_t p0, size_t p1) {
      const size_t np = p1 - p0;
      lowering::im2col(g, xb, p0, p1, lowering::SharedIndex::kRows, col.data(), pool);
      for (size_t co = 0; co < cout; ++co) std::fill_n(acc.data() + co * np, np, static_cast<double>(bias[co]));
      lowering::gemm(cout, np, rows, weight.data(), rows, col.data(), acc.data(), np, pool);
      for (size_t co = 0; co < cout; ++co) store(acc.data() + co * np, np, y.data.data() + (b * cout + co) * positions + p0);
    });
  }
  return y;
}

// ∂L/∂w = Σ over samples and output voxels of dy · x at the tap: dy times the column matrix's
// transpose, accumulated in double over every block in order. ∂L/∂x: wᵀ times dy gives each
// (input channel, tap)'s term per output voxel; col2im adds them into the input voxels they read.
Result<Tensor> Conv3d::backward(const Tensor& x, const Tensor& dy, std::vector<float>& dweight, std::vector<float>& dbias, unsigned threads) const {
  TRESOR_TRY(check_conv(*this, x));
  const lowering::Geometry g = conv_geometry(*this, x);
  const size_t n = x.shape[0], rows = g.rows(), positions = g.positions(), block = lowering::block_positions(rows, positions);
  TRESOR_TRY(check_backward("conv3d", {n, cout, g.grid[0], g.grid[1], g.grid[2]}, dy, dweight, weight, dbias, bias));
  ThreadPool pool(threads);
  add_bias_gradient(dy, dbias, pool);
  const std::vector<float> wt = transposed(weight, cout, rows);
  std::vector<float> col(lowering::packed_size(block, rows)), dyp(lowering::packed_size(cout, block));
  std::vector<double> dw(cout * rows, 0.0), dcol(rows * block), dxs(cin * x.spatial());
  Tensor dx(x.shape);
  for (size_t b = 0; b < n; ++b) {
    const float* xb = x.data.data() + b * cin * x.spatial();
    const float* gb = dy.data.data() + b * cout * positions;
    std::fill(dxs.begin(), dxs.end(), 0.0);
    for_each_block(positions, block, [&](size_t p0, size_t p1) {
      const size_t np = p1 - p0;
      lowering::im2col(g, xb, p0, p1, lowering::SharedIndex::kPositions, col.data(), pool);
      lowering::gemm(cout, rows, np, gb + p0, positions, col.data(), dw.data(), rows, pool);
      lowering::pack(gb + p0, positions, cout, np, dyp.data(), pool);
      lowering::gemm(rows, np, cout, wt.data(), cout, dyp.data(), dcol.data(), np, pool, false);
      lowering::col2im(g, dcol.data(), p0, p1, dxs.data(), pool);
    });
    store(dxs.data(), dxs.size(), dx.data.data() + b * cin * x.spatial());
  }
  add_gradient(dw, dweight);
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

// y[co][o] = b[co] + Σ of w[ci][co][t] · x[ci][i] over the (i, t) with i·stride − pad + t = o:
// wᵀ ([cout·k³] × [cin]) times a block of input voxels gives each (output channel, tap)'s term,
// which col2im adds into the output voxel it reaches (taps in order, then input voxels).
Result<Tensor> ConvTranspose3d::forward(const Tensor& x, unsigned threads) const {
  TRESOR_TRY(check_transposed(*this, x));
  const lowering::Geometry g = transposed_geometry(*this, x);
  const size_t n = x.shape[0], rows = g.rows(), positions = g.positions(), block = lowering::block_positions(rows, positions), out = g.src_voxels();
  Tensor y({n, cout, g.src[0], g.src[1], g.src[2]});
  ThreadPool pool(threads);
  const std::vector<float> wt = transposed(weight, cin, rows);
  std::vector<float> xp(lowering::packed_size(cin, block));
  std::vector<double> ycol(rows * block), acc(cout * out);
  for (size_t b = 0; b < n; ++b) {
    const float* xb = x.data.data() + b * cin * positions;
    for (size_t co = 0; co < cout; ++co) std::fill_n(acc.data() + co * out, out, static_cast<double>(bias[co]));
    for_each_block(positions, block, [&](size_t p0, size_t p1) {
      const size_t np = p1 - p0;
      lowering::pack(xb + p0, positions, cin, np, xp.data(), pool);
      lowering::gemm(rows, np, cin, wt.data(), cin, xp.data(), ycol.data(), np, pool, false);
      lowering::col2im(g, ycol.data(), p0, p1, acc.data(), pool);
    });
    store(acc.data(), acc.size(), y.data.data() + b * cout * out);
  }
  return y;
}

// ∂L/∂x[ci][i] = Σ over (co, t) of w[ci][co][t] · dy[co][i·stride − pad + t]: the weights
// ([cin] × [cout·k³]) times dy's column matrix, whose positions are the input voxels. ∂L/∂w:
// x times that column matrix's transpose, accumulated in double over every block in order.
Result<Tensor> ConvTranspose3d::backward(const Tensor& x, const Tensor& dy, std::vector<float>& dweight, std::vector<float>& dbias, unsigned threads) const {
  TRESOR_TRY(check_transposed(*this, x));
  const lowering::Geometry g = transposed_geometry(*this, x);
  const size_t n = x.shape[0], rows = g.rows(), positions = g.positions(), block = lowering::block_positions(rows, positions), out = g.src_voxels();
  TRESOR_TRY(check_backward("transposed conv3d", {n, cout, g.src[0], g.src[1], g.src[2]}, dy, dweight, weight, dbias, bias));
  ThreadPool pool(threads);
  add_bias_gradient(dy, dbias, pool);
  std::vector<float> col(lowering::packed_size(rows, block)), colt(lowering::packed_size(block, rows));
  std::vector<double> dw(cin * rows, 0.0), acc(cin * block);
  Tensor dx(x.shape);
  for (size_t b = 0; b < n; ++b) {
    const float* xb = x.data.data() + b * cin * positions;
    const float* gb = dy.data.data() + b * cout * out;
    for_each_block(positions, block, [&](size_t p0, size_t p1) {
      const size_t np = p1 - p0;
      lowering::im2col(g, gb, p0, p1, lowering::SharedIndex::kRows, col.data(), pool);
      lowering::gemm(cin, np, rows, weight.data(), rows, col.data(), acc.data(), np, pool, false);
      for (size_t ci = 0; ci < cin; ++ci) store(acc.data() + ci * np, np, dx.data.data() + (b * cin + ci) * positions + p0);
      lowering::im2col(g, gb, p0, p1, lowering::SharedIndex::kPositions, colt.data(), pool);
      lowering::gemm(cin, rows, np, xb + p0, positions, colt.data(), dw.data(), rows, pool);
    });
  }
  add_gradient(dw, dweight);
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
