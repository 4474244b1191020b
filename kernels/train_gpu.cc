// The training layers on a CUDA device (include/tresor/gpu/train.h) and their CPU emulation: the
// checks (naming the field) before anything runs, device memory wiped before it is freed, one
// stream per host-tensor call. Plain C++23 over the launch wrappers (kernels/train_kernels.h) and
// the CUDA shim; without CUDA in the build every device entry returns kUnavailable after its
// checks, and the emulation still runs.
//
// The device-pointer entries run the emulation too when their DeviceStream's backend is
// kEmulated (host pointers; the U-Net step in unet_gpu.cc is tested that way everywhere).
//
// The emulation (Backend::kEmulated) runs kernels/train.cuh's functions — the GEMMs' gathers and
// stores, the reductions' per-thread partials and tree, the per-voxel and per-parameter formulas —
// element by element on the CPU, with the kernels' launch geometry (split-K chunks, reduction
// threads, loss blocks). What it does not reproduce: the tensor cores' summation order inside a
// k-step (it sums each chunk of K in index order, in float), and the CUDA mechanics (tiles, shared
// memory, fragment layouts, synchronisation).
#include "tresor/gpu/train.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "cuda_result.h"
#include "train.cuh"
#include "train_kernels.h"
#include "tresor/gpu.h"
#include "tresor/thread_pool.h"

namespace tresor::gpu::train {

using tresor::train::Tensor;

namespace {

using tresor::gpu::detail::cuda;
using tresor::gpu::detail::kNoCuda;

constexpr uint64_t kMaxElements = uint64_t{1} << 31;  // 32-bit coordinates in the kernels

Result<void> check_tensor(const char* layer, const char* name, const Tensor& t) {
  if (t.size() == 0) return fail(ErrorCode::kInvalidArgument, std::string(layer) + ": " + name + " is empty (" + t.shape_text() + ")");
  if (t.data.size() != t.size()) {
    return fail(ErrorCode::kInvalidArgument, std::string(layer) + ": " + name + " has " + std::to_string(t.data.size()) + " values for its shape " + t.shape_text());
  }
  if (t.size() >= kMaxElements) return fail(ErrorCode::kInvalidArgument, std::string(layer) + ": " + name + " has " + std::to_string(t.size()) + " elements; the GPU kernels take fewer than 2^31");
  return {};
}

const char* layer_name(const ConvShape& s) { return s.transposed ? "transposed conv3d" : "conv3d"; }

size_t conv_out(const ConvShape& s, size_t n) { return s.transposed ? (n - 1) * s.stride + s.k - 2 * s.pad : (n + 2 * s.pad - s.k) / s.stride + 1; }

// Every check of a convolution's shape, naming the field; the kernels' geometry.
Result<ConvGeom> geometry(const ConvShape& s) {
  const std::string name = layer_name(s);
  for (auto [field, v] : {std::pair{"n", s.n}, {"cin", s.cin}, {"cout", s.cout}, {"d", s.d}, {"h", s.h}, {"w", s.w}}) {
    if (v == 0) return fail(ErrorCode::kInvalidArgument, name + ": " + field + " = 0");
  }
  if (s.transposed) {
    if (s.k != 2) return fail(ErrorCode::kInvalidArgument, name + ": k = " + std::to_string(s.k) + "; the GPU kernels take k = 2");
    if (s.stride != 2) return fail(ErrorCode::kInvalidArgument, name + ": stride = " + std::to_string(s.stride) + "; the GPU kernels take stride = 2");
    if (s.pad != 0) return fail(ErrorCode::kInvalidArgument, name + ": pad = " + std::to_string(s.pad) + "; the GPU kernels take pad = 0");
  } else {
    if (s.k != 1 && s.k != 3) return fail(ErrorCode::kInvalidArgument, name + ": k = " + std::to_string(s.k) + "; the GPU kernels take k = 3 (pad 1) or k = 1 (pad 0)");
    if (s.pad != s.k / 2) return fail(ErrorCode::kInvalidArgument, name + ": pad = " + std::to_string(s.pad) + " with k = " + std::to_string(s.k) + "; the GPU kernels take pad = " + std::to_string(s.k / 2));
    if (s.stride != 1 && s.stride != 2) return fail(ErrorCode::kInvalidArgument, name + ": stride = " + std::to_string(s.stride) + "; the GPU kernels take 1 or 2");
  }
  const uint64_t od = conv_out(s, s.d), oh = conv_out(s, s.h), ow = conv_out(s, s.w);
  using u128 = unsigned __int128;  // the products of size_t factors cannot overflow
  const u128 in = u128{s.n} * s.cin * s.d * s.h * s.w, out = u128{s.n} * s.cout * od * oh * ow;
  for (auto [field, v] : {std::pair{"the input", in}, {"the output", out}}) {
    if (v >= kMaxElements) {
      return fail(ErrorCode::kInvalidArgument, name + ": " + field + " has " + (v >> 64 != 0 ? std::string("over 2^64") : std::to_string(static_cast<uint64_t>(v))) + " elements; the GPU kernels take fewer than 2^31");
    }
  }
  if (u128{s.cout} * s.cin * s.k * s.k * s.k * 8 >= kMaxElements) {
    return fail(ErrorCode::kInvalidArgument, name + ": cin·cout·k³ is too large for the GPU kernels");
  }
  ConvGeom g;
  g.n = static_cast<uint32_t>(s.n);
  g.cin = static_cast<uint32_t>(s.cin);
  g.cout = static_cast<uint32_t>(s.cout);
  g.d = static_cast<uint32_t>(s.d);
  g.h = static_cast<uint32_t>(s.h);
  g.w = static_cast<uint32_t>(s.w);
  g.od = static_cast<uint32_t>(od);
  g.oh = static_cast<uint32_t>(oh);
  g.ow = static_cast<uint32_t>(ow);
  g.k = static_cast<uint32_t>(s.k);
  g.stride = static_cast<uint32_t>(s.stride);
  g.pad = static_cast<uint32_t>(s.pad);
  return g;
}

GemmKind forward_kind(const ConvShape& s) { return s.transposed ? GemmKind::kTconvForward : GemmKind::kConvForward; }
GemmKind data_kind(const ConvShape& s) { return s.transposed ? GemmKind::kTconvBackwardData : GemmKind::kConvBackwardData; }
GemmKind weight_kind(const ConvShape& s) { return s.transposed ? GemmKind::kTconvBackwardWeight : GemmKind::kConvBackwardWeight; }

size_t weight_count(const ConvShape& s) { return s.cin * s.cout * s.k * s.k * s.k; }
std::array<size_t, 5> out_shape(const ConvShape& s) { return {s.n, s.cout, conv_out(s, s.d), conv_out(s, s.h), conv_out(s, s.w)}; }

Result<NormShape> norm_shape(const tresor::train::InstanceNormLeakyRelu& l, const Tensor& x) {
  TRESOR_TRY(check_tensor("instance norm", "x", x));
  if (x.shape[1] != l.channels) return fail(ErrorCode::kInvalidArgument, "instance norm: x has " + std::to_string(x.shape[1]) + " channels, the layer " + std::to_string(l.channels));
  if (l.gamma.size() != l.channels) return fail(ErrorCode::kInvalidArgument, "instance norm: gamma has " + std::to_string(l.gamma.size()) + " values, want " + std::to_string(l.channels));
  if (l.beta.size() != l.channels) return fail(ErrorCode::kInvalidArgument, "instance norm: beta has " + std::to_string(l.beta.size()) + " values, want " + std::to_string(l.channels));
  return NormShape{x.shape[0], x.shape[1], x.spatial(), l.eps, l.slope};
}

Result<void> check_norm(const NormShape& s) {
  for (auto [field, v] : {std::pair{"n", s.n}, {"channels", s.channels}, {"spatial", s.spatial}}) {
    if (v == 0) return fail(ErrorCode::kInvalidArgument, std::string("instance norm: ") + field + " = 0");
  }
  if (static_cast<unsigned __int128>(s.n) * s.channels * s.spatial >= kMaxElements) {
    return fail(ErrorCode::kInvalidArgument, "instance norm: more than 2^31 elements for the GPU kernels");
  }
  if (!(s.eps > 0)) return fail(ErrorCode::kInvalidArgument, "instance norm: eps = " + std::to_string(s.eps) + "; it must be positive");
  return {};
}

Result<LossGeom> loss_geometry(const LossShape& s, double smooth) {
  if (s.n == 0 || s.spatial == 0) return fail(ErrorCode::kInvalidArgument, "loss: logits are empty (n = " + std::to_string(s.n) + ", spatial = " + std::to_string(s.spatial) + ")");
  if (s.classes < 2 || s.classes > kMaxClasses) {
    return fail(ErrorCode::kInvalidArgument, "loss: classes = " + std::to_string(s.classes) + "; the GPU kernels take 2 to " + std::to_string(kMaxClasses));
  }
  if (static_cast<unsigned __int128>(s.n) * s.classes * s.spatial >= kMaxElements) return fail(ErrorCode::kInvalidArgument, "loss: more than 2^31 logits for the GPU kernels");
  if (!(smooth >= 0)) return fail(ErrorCode::kInvalidArgument, "loss: smooth = " + std::to_string(smooth) + "; it must not be negative");
  LossGeom g;
  g.n = static_cast<uint32_t>(s.n);
  g.classes = static_cast<uint32_t>(s.classes);
  g.m = static_cast<uint32_t>(s.spatial);
  return g;
}

LossValues loss_values(const LossGeom& g, const std::vector<double>& totals, double smooth, double dice_weight, double voxels = 0) {
  LossValues v;
  v.cross_entropy = totals[0] / (voxels > 0 ? voxels : static_cast<double>(uint64_t{g.n} * g.m));
  for (uint32_t c = 1; c < g.classes; ++c) v.dice += (2 * totals[c] + smooth) / (totals[g.classes - 1 + c] + smooth);
  v.dice /= static_cast<double>(g.classes - 1);
  v.loss = v.cross_entropy - dice_weight * v.dice;
  return v;
}

std::vector<uint16_t> to_bf16(const std::vector<float>& v) {
  std::vector<uint16_t> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = bf16_bits(v[i]);
  return out;
}

// ------------------------------------------------------------------------------------------------
// The emulation: the kernels' per-element code, the kernels' geometry, on the CPU.

template <GemmKind K>
void gemm_emulated_kind(const ConvGeom& g, const GemmDims& dm, const GemmOperands& op) {
  ThreadPool pool(0);
  for (uint32_t split = 0; split < dm.splits; ++split) {
    const uint32_t k0 = split * dm.chunk, k1 = std::min(dm.k, k0 + dm.chunk);
    pool.parallel_for(dm.m, [&](size_t r) {
      const auto row = static_cast<uint32_t>(r);
      std::vector<float> a(k1 - k0);
      for (uint32_t k = k0; k < k1; ++k) a[k - k0] = gemm_a<K>(g, op, row, k);
      for (uint32_t col = 0; col < dm.n; ++col) {
        float acc = 0.0f;  // fp32 accumulation of exact bf16 products
        for (uint32_t k = k0; k < k1; ++k) acc += a[k - k0] * gemm_b<K>(g, op, k, col);
        gemm_store<K>(g, dm, op, row, col, split, acc);
      }
    });
  }
}

void gemm_emulated(GemmKind kind, const ConvGeom& g, const GemmDims& dm, const GemmOperands& op) {
  switch (kind) {
    case GemmKind::kConvForward: return gemm_emulated_kind<GemmKind::kConvForward>(g, dm, op);
    case GemmKind::kConvBackwardData: return gemm_emulated_kind<GemmKind::kConvBackwardData>(g, dm, op);
    case GemmKind::kConvBackwardWeight: return gemm_emulated_kind<GemmKind::kConvBackwardWeight>(g, dm, op);
    case GemmKind::kTconvForward: return gemm_emulated_kind<GemmKind::kTconvForward>(g, dm, op);
    case GemmKind::kTconvBackwardData: return gemm_emulated_kind<GemmKind::kTconvBackwardData>(g, dm, op);
    case GemmKind::kTconvBackwardWeight: return gemm_emulated_kind<GemmKind::kTconvBackwardWeight>(g, dm, op);
  }
}

// One block of the fixed-order reduction: thread t's partial from `partial(t)`, then the tree.
template <typename F>
double block_tree_emulated(F&& partial) {
  double s[kReduceThreads];
  for (uint32_t t = 0; t < kReduceThreads; ++t) s[t] = partial(t);
  reduce_tree(s);
  return s[0];
}

void bias_grad_emulated(const float* dy, uint32_t n, uint32_t channels, uint32_t m, float* dbias) {
  for (uint32_t c = 0; c < channels; ++c) {
    dbias[c] += static_cast<float>(block_tree_emulated([&](uint32_t t) { return channel_thread_sum(dy, n, channels, c, m, t); }));
  }
}

void conv_forward_emulated(const ConvShape& s, const ConvGeom& g, const float* x, const uint16_t* w, const float* bias, float* y) {
  GemmOperands op;
  op.x = x;
  op.w = w;
  op.bias = bias;
  op.out = y;
  gemm_emulated(forward_kind(s), g, gemm_dims(forward_kind(s), g), op);
}

void conv_backward_data_emulated(const ConvShape& s, const ConvGeom& g, const float* dy, const uint16_t* w, float* dx) {
  GemmOperands op;
  op.dy = dy;
  op.w = w;
  op.out = dx;
  gemm_emulated(data_kind(s), g, gemm_dims(data_kind(s), g), op);
}

// `partials` holds the split-K partials (dims.splits·M·N floats), as the device's scratch does.
void conv_backward_weight_emulated(const ConvShape& s, const ConvGeom& g, const float* x, const float* dy, float* dweight, float* dbias, float* partials) {
  GemmOperands op;
  op.x = x;
  op.dy = dy;
  op.out = partials;
  const GemmDims dm = gemm_dims(weight_kind(s), g);
  const uint64_t mn = uint64_t{dm.m} * dm.n;
  gemm_emulated(weight_kind(s), g, dm, op);
  for (uint64_t i = 0; i < mn; ++i) splitk_accumulate(partials, dm.splits, mn, i, dweight);
  bias_grad_emulated(dy, g.n, g.cout, out_voxels(g), dbias);
}

void conv_backward_emulated(const ConvShape& s, const ConvGeom& g, const float* x, const float* dy, const uint16_t* w, float* dx, float* dweight, float* dbias) {
  conv_backward_data_emulated(s, g, dy, w, dx);
  const GemmDims dm = gemm_dims(weight_kind(s), g);
  std::vector<float> partials(size_t{dm.splits} * dm.m * dm.n);
  conv_backward_weight_emulated(s, g, x, dy, dweight, dbias, partials.data());
}

// The statistics of one plane, as norm_forward_kernel computes them.
std::pair<double, double> plane_stats_emulated(const float* v, uint32_t m, double eps) {
  const double mean = ddiv(block_tree_emulated([&](uint32_t t) { return plane_thread_sum(v, m, t); }), static_cast<double>(m));
  const double inv = norm_inv_std(block_tree_emulated([&](uint32_t t) { return plane_thread_sq(v, m, t, mean); }), m, eps);
  return {mean, inv};
}

void norm_forward_emulated(const NormShape& s, const float* x, const float* gamma, const float* beta, float* y) {
  const auto m = static_cast<uint32_t>(s.spatial);
  ThreadPool pool(0);
  pool.parallel_for(s.n * s.channels, [&](size_t p) {
    const size_t c = p % s.channels;
    const float* v = x + p * m;
    const auto [mean, inv] = plane_stats_emulated(v, m, s.eps);
    for (uint32_t i = 0; i < m; ++i) y[p * m + i] = norm_lrelu_forward(v[i], mean, inv, gamma[c], beta[c], s.slope);
  });
}

void norm_backward_emulated(const NormShape& s, const float* x, const float* dy, const float* gamma, const float* beta, float* dx, float* dgamma, float* dbeta) {
  const auto m = static_cast<uint32_t>(s.spatial);
  const size_t planes = s.n * s.channels;
  std::vector<double> sums(2 * planes);
  ThreadPool pool(0);
  pool.parallel_for(planes, [&](size_t p) {
    const size_t c = p % s.channels;
    const float* v = x + p * m;
    const float* g = dy + p * m;
    const auto [mean, inv] = plane_stats_emulated(v, m, s.eps);
    double a[kReduceThreads], b[kReduceThreads];
    for (uint32_t t = 0; t < kReduceThreads; ++t) plane_thread_grads(v, g, m, t, mean, inv, gamma[c], beta[c], s.slope, &a[t], &b[t]);
    reduce_tree(a);
    reduce_tree(b);
    const double sum_dz = a[0], sum_dz_xhat = b[0], gm = static_cast<double>(gamma[c]);
    const double md = ddiv(dmul(gm, sum_dz), static_cast<double>(m)), mdx = ddiv(dmul(gm, sum_dz_xhat), static_cast<double>(m));
    for (uint32_t i = 0; i < m; ++i) dx[p * m + i] = norm_lrelu_backward(v[i], g[i], mean, inv, gamma[c], beta[c], s.slope, md, mdx);
    sums[p] = sum_dz_xhat;
    sums[planes + p] = sum_dz;
  });
  for (size_t c = 0; c < s.channels; ++c)
    for (size_t p = c; p < planes; p += s.channels) {
      dgamma[c] += static_cast<float>(sums[p]);
      dbeta[c] += static_cast<float>(sums[planes + p]);
    }
}

// The statistics pass: loss_quantities(g) totals, the kernels' partials and block order.
std::vector<double> loss_stats_emulated(const LossGeom& g, const float* logits, const uint8_t* target) {
  const uint32_t blocks = loss_blocks(g), nq = loss_quantities(g);
  std::vector<double> partials(uint64_t{blocks} * nq), totals(nq, 0.0);
  ThreadPool pool(0);
  pool.parallel_for(blocks, [&](size_t block) {
    std::vector<double> acc(uint64_t{kReduceThreads} * kMaxLossQuantities);
    for (uint32_t t = 0; t < kReduceThreads; ++t) {
      // The kernel's instantiation for this class count (check_loss has refused any other).
      (void)with_classes(g.classes, [&](auto classes) {
        loss_thread_partials(logits, target, g, classes, block * kReduceThreads + t, uint64_t{blocks} * kReduceThreads, acc.data() + uint64_t{t} * kMaxLossQuantities);
      });
    }
    for (uint32_t q = 0; q < nq; ++q) partials[block * nq + q] = block_tree_emulated([&](uint32_t t) { return acc[uint64_t{t} * kMaxLossQuantities + q]; });
  });
  for (uint32_t q = 0; q < nq; ++q)
    for (uint32_t b = 0; b < blocks; ++b) totals[q] = dadd(totals[q], partials[uint64_t{b} * nq + q]);
  return totals;
}

void loss_grad_emulated(const LossGeom& g, const float* logits, const uint8_t* target, const double* totals, const LossConsts& k, float* dlogits) {
  const uint64_t voxels = uint64_t{g.n} * g.m;
  (void)with_classes(g.classes, [&](auto classes) {  // the kernel's instantiation (check_loss has refused any other count)
    for (uint64_t v = 0; v < voxels; ++v) loss_grad_voxel(logits, target, g, classes, v, totals, k, dlogits);
  });
}

std::vector<double> loss_emulated(const LossGeom& g, const float* logits, const uint8_t* target, const LossConsts& k, float* dlogits) {
  std::vector<double> totals = loss_stats_emulated(g, logits, target);
  loss_grad_emulated(g, logits, target, totals.data(), k, dlogits);
  return totals;
}

// The kernels' totals [Σ CE, Σp·g for classes 1.., Σp + Σg for classes 1..] in dice_ce_loss's
// LossAllReduce layout (the voxel count second), and back.
std::vector<double> stats_of_totals(const LossGeom& g, const std::vector<double>& totals) {
  std::vector<double> stats(2 * size_t{g.classes});
  stats[0] = totals[0];
  stats[1] = static_cast<double>(uint64_t{g.n} * g.m);
  for (uint32_t q = 1; q < loss_quantities(g); ++q) stats[q + 1] = totals[q];
  return stats;
}
std::vector<double> totals_of_stats(const LossGeom& g, std::span<const double> stats) {
  std::vector<double> totals(loss_quantities(g));
  totals[0] = stats[0];
  for (uint32_t q = 1; q < loss_quantities(g); ++q) totals[q] = stats[q + 1];
  return totals;
}

SgdConsts sgd_consts(double lr, double momentum, double weight_decay, bool nesterov) {
  SgdConsts k;
  k.lr = lr;
  k.momentum = momentum;
  k.weight_decay = weight_decay;
  k.nesterov = nesterov ? 1 : 0;
  return k;
}

// The reference's expressions for the per-step constants (AdamW::step, core/train/layers.cc).
AdamWConsts adamw_consts(double lr, double beta1, double beta2, double eps, double weight_decay, uint64_t t) {
  AdamWConsts k;
  k.lr = lr;
  k.beta1 = beta1;
  k.beta2 = beta2;
  k.eps = eps;
  k.decay = 1 - lr * weight_decay;
  k.one_minus_b1 = 1 - beta1;
  k.one_minus_b2 = 1 - beta2;
  k.c1 = 1 - std::pow(beta1, static_cast<double>(t));
  k.c2 = 1 - std::pow(beta2, static_cast<double>(t));
  return k;
}

[[maybe_unused]] Result<void> check_pointers(const char* layer, std::initializer_list<std::pair<const char*, const void*>> ptrs) {
  for (auto [name, p] : ptrs) {
    if (p == nullptr) return fail(ErrorCode::kInvalidArgument, std::string(layer) + ": " + name + " is null");
  }
  return {};
}

// ------------------------------------------------------------------------------------------------
// The device: buffers wiped before they are freed, one stream per host-tensor call.

#ifdef TRESOR_HAVE_CUDA
Result<void> require_device(int device) {
  auto devs = gpu_probe();
  if (!devs) return std::unexpected(devs.error());
  if (device < 0 || static_cast<size_t>(device) >= devs->size()) {
    return fail(ErrorCode::kUnavailable, "no CUDA device: there is no device " + std::to_string(device) + " (" + std::to_string(devs->size()) + " found)");
  }
  const Device& d = (*devs)[static_cast<size_t>(device)];
  if (d.cc_major < 8) {
    return fail(ErrorCode::kUnavailable, "no CUDA device: device " + std::to_string(device) + " (" + d.name + ") has compute capability " +
                                             std::to_string(d.cc_major) + "." + std::to_string(d.cc_minor) + "; the training kernels need 8.0 or newer (bf16 WMMA)");
  }
  return {};
}
#endif

// A host-tensor call's device session: its stream and every buffer it allocated (zeroed, then
// freed, when it ends; training data is patient data).
class Session {
 public:
  explicit Session(int device) : device_(device) {}
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;
  ~Session() {
#ifdef TRESOR_HAVE_CUDA
    (void)gpu::detail::cuda_set_device(device_);
    if (stream_ != nullptr) (void)gpu::detail::cuda_stream_sync(stream_);
    (void)gpu::detail::cuda_free_wiped_all(buffers_.data(), buffers_.size());  // two device syncs for all
    if (stream_ != nullptr) (void)gpu::detail::cuda_stream_destroy(stream_);
#endif
  }
  Result<void> open() {
#ifdef TRESOR_HAVE_CUDA
    TRESOR_TRY(require_device(device_));
    TRESOR_TRY(cuda(gpu::detail::cuda_set_device(device_)));
    return cuda(gpu::detail::cuda_stream_create(&stream_));
#else
    return fail(ErrorCode::kUnavailable, kNoCuda);
#endif
  }
  DeviceStream where() const { return DeviceStream{device_, stream_}; }
  template <typename T>
  Result<T*> alloc(size_t n) {
#ifdef TRESOR_HAVE_CUDA
    void* p = nullptr;
    TRESOR_TRY(cuda(gpu::detail::cuda_alloc(&p, n * sizeof(T))));
    buffers_.emplace_back(p, n * sizeof(T));
    return static_cast<T*>(p);
#else
    (void)n;
    return fail(ErrorCode::kUnavailable, kNoCuda);
#endif
  }
  template <typename T>
  Result<T*> upload(const std::vector<T>& v) {
    auto p = alloc<T>(v.size());
    if (!p) return p;
#ifdef TRESOR_HAVE_CUDA
    TRESOR_TRY(cuda(gpu::detail::cuda_copy_async(stream_, *p, v.data(), v.size() * sizeof(T), gpu::detail::kHostToDevice)));
#endif
    return p;
  }
  template <typename T>
  Result<void> download(std::vector<T>& v, const T* d) {
#ifdef TRESOR_HAVE_CUDA
    TRESOR_TRY(cuda(gpu::detail::cuda_copy_async(stream_, v.data(), d, v.size() * sizeof(T), gpu::detail::kDeviceToHost)));
    return cuda(gpu::detail::cuda_stream_sync(stream_));  // the first failure of any queued kernel surfaces here
#else
    (void)v;
    (void)d;
    return fail(ErrorCode::kUnavailable, kNoCuda);
#endif
  }

 private:
  int device_;
  void* stream_ = nullptr;
  std::vector<std::pair<void*, size_t>> buffers_;
};

// Propagates the error of a Result<T*> or binds its value.
#define TRESOR_BIND(var, expr)                                       \
  auto var##_r_ = (expr);                                            \
  if (!var##_r_) return std::unexpected(std::move(var##_r_).error()); \
  auto var = *var##_r_

Result<void> check_conv_layer(const ConvShape& s, const std::vector<float>& weight, const std::vector<float>& bias) {
  if (weight.size() != weight_count(s)) {
    return fail(ErrorCode::kInvalidArgument, std::string(layer_name(s)) + ": weight has " + std::to_string(weight.size()) + " values, the layer needs " + std::to_string(weight_count(s)));
  }
  if (bias.size() != s.cout) return fail(ErrorCode::kInvalidArgument, std::string(layer_name(s)) + ": bias has " + std::to_string(bias.size()) + " values, the layer needs " + std::to_string(s.cout));
  return {};
}

Result<void> check_conv_backward(const ConvShape& s, const Tensor& dy, const std::vector<float>& dweight, const std::vector<float>& dbias) {
  const std::string name = std::string(layer_name(s)) + " backward";
  if (dy.shape != out_shape(s) || dy.data.size() != dy.size()) {
    return fail(ErrorCode::kInvalidArgument, name + ": dy is " + dy.shape_text() + " (" + std::to_string(dy.data.size()) + " values), the output " + Tensor(out_shape(s)).shape_text());
  }
  if (dweight.size() != weight_count(s)) return fail(ErrorCode::kInvalidArgument, name + ": dweight has " + std::to_string(dweight.size()) + " values, want " + std::to_string(weight_count(s)));
  if (dbias.size() != s.cout) return fail(ErrorCode::kInvalidArgument, name + ": dbias has " + std::to_string(dbias.size()) + " values, want " + std::to_string(s.cout));
  return {};
}

template <typename Layer>
Result<Tensor> conv_forward_host(const Layer& l, const Tensor& x, Where where) {
  auto s = conv_shape(l, x.shape);
  if (!s) return std::unexpected(s.error());
  TRESOR_TRY(check_tensor(layer_name(*s), "x", x));
  TRESOR_TRY(check_conv_layer(*s, l.weight, l.bias));
  auto g = geometry(*s);
  if (!g) return std::unexpected(g.error());
  const std::vector<uint16_t> w = to_bf16(l.weight);
  Tensor y(out_shape(*s));
  if (where.backend == Backend::kEmulated) {
    conv_forward_emulated(*s, *g, x.data.data(), w.data(), l.bias.data(), y.data.data());
    return y;
  }
  Session ses(where.device);
  TRESOR_TRY(ses.open());
  TRESOR_BIND(d_x, ses.upload(x.data));
  TRESOR_BIND(d_w, ses.upload(w));
  TRESOR_BIND(d_b, ses.upload(l.bias));
  TRESOR_BIND(d_y, ses.alloc<float>(y.size()));
  TRESOR_TRY(conv_forward_device(ses.where(), *s, d_x, d_w, d_b, d_y));
  TRESOR_TRY(ses.download(y.data, d_y));
  return y;
}

template <typename Layer>
Result<Tensor> conv_backward_host(const Layer& l, const Tensor& x, const Tensor& dy, std::vector<float>& dweight, std::vector<float>& dbias, Where where) {
  auto s = conv_shape(l, x.shape);
  if (!s) return std::unexpected(s.error());
  TRESOR_TRY(check_tensor(layer_name(*s), "x", x));
  TRESOR_TRY(check_conv_layer(*s, l.weight, l.bias));
  TRESOR_TRY(check_conv_backward(*s, dy, dweight, dbias));
  auto g = geometry(*s);
  if (!g) return std::unexpected(g.error());
  const std::vector<uint16_t> w = to_bf16(l.weight);
  Tensor dx(x.shape);
  if (where.backend == Backend::kEmulated) {
    conv_backward_emulated(*s, *g, x.data.data(), dy.data.data(), w.data(), dx.data.data(), dweight.data(), dbias.data());
    return dx;
  }
  auto scratch = conv_backward_weight_scratch(*s);
  if (!scratch) return std::unexpected(scratch.error());
  Session ses(where.device);
  TRESOR_TRY(ses.open());
  TRESOR_BIND(d_x, ses.upload(x.data));
  TRESOR_BIND(d_dy, ses.upload(dy.data));
  TRESOR_BIND(d_w, ses.upload(w));
  TRESOR_BIND(d_dw, ses.upload(dweight));
  TRESOR_BIND(d_db, ses.upload(dbias));
  TRESOR_BIND(d_dx, ses.alloc<float>(dx.size()));
  TRESOR_BIND(d_scratch, ses.alloc<std::byte>(*scratch));
  TRESOR_TRY(conv_backward_data_device(ses.where(), *s, d_dy, d_w, d_dx));
  TRESOR_TRY(conv_backward_weight_device(ses.where(), *s, d_x, d_dy, d_dw, d_db, d_scratch, *scratch));
  // The accumulated gradients change only when every download succeeded (a failure leaves them
  // as they were, like the emulation's path that cannot fail).
  std::vector<float> dw(dweight.size()), db(dbias.size());
  TRESOR_TRY(ses.download(dx.data, d_dx));
  TRESOR_TRY(ses.download(dw, d_dw));
  TRESOR_TRY(ses.download(db, d_db));
  std::copy(dw.begin(), dw.end(), dweight.begin());  // into the caller's buffers, which stay where they are
  std::copy(db.begin(), db.end(), dbias.begin());
  return dx;
}

}  // namespace

// ------------------------------------------------------------------------------------------------

Result<bool> available(int device) {
  auto devs = gpu_probe();
  if (!devs) return std::unexpected(devs.error());
  if (device < 0 || static_cast<size_t>(device) >= devs->size()) return false;
  return (*devs)[static_cast<size_t>(device)].cc_major >= 8;
}

Result<ConvShape> conv_shape(const tresor::train::Conv3d& l, const std::array<size_t, 5>& x) {
  if (x[1] != l.cin) return fail(ErrorCode::kInvalidArgument, "conv3d: x has " + std::to_string(x[1]) + " channels, the layer takes cin = " + std::to_string(l.cin));
  ConvShape s{x[0], l.cin, l.cout, x[2], x[3], x[4], l.k, l.stride, l.pad, false};
  auto g = geometry(s);
  if (!g) return std::unexpected(g.error());
  return s;
}

Result<ConvShape> conv_shape(const tresor::train::ConvTranspose3d& l, const std::array<size_t, 5>& x) {
  if (x[1] != l.cin) return fail(ErrorCode::kInvalidArgument, "transposed conv3d: x has " + std::to_string(x[1]) + " channels, the layer takes cin = " + std::to_string(l.cin));
  ConvShape s{x[0], l.cin, l.cout, x[2], x[3], x[4], l.k, l.stride, l.pad, true};
  auto g = geometry(s);
  if (!g) return std::unexpected(g.error());
  return s;
}

Result<Tensor> conv3d_forward(const tresor::train::Conv3d& l, const Tensor& x, Where where) { return conv_forward_host(l, x, where); }
Result<Tensor> conv3d_backward(const tresor::train::Conv3d& l, const Tensor& x, const Tensor& dy, std::vector<float>& dweight, std::vector<float>& dbias,
                               Where where) {
  return conv_backward_host(l, x, dy, dweight, dbias, where);
}
Result<Tensor> conv_transpose3d_forward(const tresor::train::ConvTranspose3d& l, const Tensor& x, Where where) { return conv_forward_host(l, x, where); }
Result<Tensor> conv_transpose3d_backward(const tresor::train::ConvTranspose3d& l, const Tensor& x, const Tensor& dy, std::vector<float>& dweight,
                                         std::vector<float>& dbias, Where where) {
  return conv_backward_host(l, x, dy, dweight, dbias, where);
}

Result<Tensor> norm_lrelu_forward(const tresor::train::InstanceNormLeakyRelu& l, const Tensor& x, Where where) {
  auto s = norm_shape(l, x);
  if (!s) return std::unexpected(s.error());
  TRESOR_TRY(check_norm(*s));
  Tensor y(x.shape);
  if (where.backend == Backend::kEmulated) {
    norm_forward_emulated(*s, x.data.data(), l.gamma.data(), l.beta.data(), y.data.data());
    return y;
  }
  Session ses(where.device);
  TRESOR_TRY(ses.open());
  TRESOR_BIND(d_x, ses.upload(x.data));
  TRESOR_BIND(d_g, ses.upload(l.gamma));
  TRESOR_BIND(d_b, ses.upload(l.beta));
  TRESOR_BIND(d_y, ses.alloc<float>(y.size()));
  TRESOR_TRY(norm_lrelu_forward_device(ses.where(), *s, d_x, d_g, d_b, d_y));
  TRESOR_TRY(ses.download(y.data, d_y));
  return y;
}

Result<Tensor> norm_lrelu_backward(const tresor::train::InstanceNormLeakyRelu& l, const Tensor& x, const Tensor& dy, std::vector<float>& dgamma,
                                   std::vector<float>& dbeta, Where where) {
  auto s = norm_shape(l, x);
  if (!s) return std::unexpected(s.error());
  TRESOR_TRY(check_norm(*s));
  if (dy.shape != x.shape || dy.data.size() != dy.size()) {
    return fail(ErrorCode::kInvalidArgument, "instance norm backward: dy is " + dy.shape_text() + " (" + std::to_string(dy.data.size()) + " values), x " + x.shape_text());
  }
  if (dgamma.size() != l.channels) return fail(ErrorCode::kInvalidArgument, "instance norm backward: dgamma has " + std::to_string(dgamma.size()) + " values, want " + std::to_string(l.channels));
  if (dbeta.size() != l.channels) return fail(ErrorCode::kInvalidArgument, "instance norm backward: dbeta has " + std::to_string(dbeta.size()) + " values, want " + std::to_string(l.channels));
  Tensor dx(x.shape);
  if (where.backend == Backend::kEmulated) {
    norm_backward_emulated(*s, x.data.data(), dy.data.data(), l.gamma.data(), l.beta.data(), dx.data.data(), dgamma.data(), dbeta.data());
    return dx;
  }
  const size_t scratch = norm_lrelu_backward_scratch(*s);
  Session ses(where.device);
  TRESOR_TRY(ses.open());
  TRESOR_BIND(d_x, ses.upload(x.data));
  TRESOR_BIND(d_dy, ses.upload(dy.data));
  TRESOR_BIND(d_g, ses.upload(l.gamma));
  TRESOR_BIND(d_b, ses.upload(l.beta));
  TRESOR_BIND(d_dg, ses.upload(dgamma));
  TRESOR_BIND(d_db, ses.upload(dbeta));
  TRESOR_BIND(d_dx, ses.alloc<float>(dx.size()));
  TRESOR_BIND(d_scratch, ses.alloc<std::byte>(scratch));
  TRESOR_TRY(norm_lrelu_backward_device(ses.where(), *s, d_x, d_dy, d_g, d_b, d_dx, d_dg, d_db, d_scratch, scratch));
  TRESOR_TRY(ses.download(dx.data, d_dx));
  TRESOR_TRY(ses.download(dgamma, d_dg));
  TRESOR_TRY(ses.download(dbeta, d_db));
  return dx;
}

Result<tresor::train::LossResult> dice_ce_loss(const Tensor& logits, const std::vector<uint8_t>& target, double smooth, double dice_weight, Where where) {
  TRESOR_TRY(check_tensor("loss", "logits", logits));
  const LossShape shape{logits.shape[0], logits.shape[1], logits.spatial()};
  auto g = loss_geometry(shape, smooth);
  if (!g) return std::unexpected(g.error());
  if (target.size() != shape.n * shape.spatial) {
    return fail(ErrorCode::kInvalidArgument, "loss: target has " + std::to_string(target.size()) + " voxels, the logits " + std::to_string(shape.n * shape.spatial));
  }
  for (size_t i = 0; i < target.size(); ++i) {
    if (target[i] >= shape.classes) {
      return fail(ErrorCode::kInvalidArgument, "loss: target voxel " + std::to_string(i) + " is class " + std::to_string(target[i]) + " of " + std::to_string(shape.classes));
    }
  }
  tresor::train::LossResult r;
  r.dlogits = Tensor(logits.shape);
  LossValues v;
  if (where.backend == Backend::kEmulated) {
    LossConsts k;
    k.smooth = smooth;
    k.dice_weight = dice_weight;
    k.voxels = static_cast<double>(shape.n * shape.spatial);
    v = loss_values(*g, loss_emulated(*g, logits.data.data(), target.data(), k, r.dlogits.data.data()), smooth, dice_weight);
  } else {
    auto scratch = dice_ce_loss_scratch(shape);
    if (!scratch) return std::unexpected(scratch.error());
    Session ses(where.device);
    TRESOR_TRY(ses.open());
    TRESOR_BIND(d_l, ses.upload(logits.data));
    TRESOR_BIND(d_t, ses.upload(target));
    TRESOR_BIND(d_dl, ses.alloc<float>(logits.size()));
    TRESOR_BIND(d_scratch, ses.alloc<std::byte>(*scratch));
    auto dv = dice_ce_loss_device(ses.where(), shape, d_l, d_t, smooth, dice_weight, d_dl, d_scratch, *scratch);
    if (!dv) return std::unexpected(dv.error());
    v = *dv;
    TRESOR_TRY(ses.download(r.dlogits.data, d_dl));
  }
  r.loss = v.loss;
  r.cross_entropy = v.cross_entropy;
  r.dice = v.dice;
  return r;
}

Result<void> sgd_step(tresor::train::Sgd& opt, std::vector<float>& params, const std::vector<float>& grads, double lr, std::vector<uint16_t>* bf16, Where where) {
  if (params.size() != grads.size()) return fail(ErrorCode::kInvalidArgument, "sgd: " + std::to_string(params.size()) + " params, " + std::to_string(grads.size()) + " grads");
  if (opt.velocity.empty()) opt.velocity.assign(params.size(), 0.0f);
  if (opt.velocity.size() != params.size()) {
    return fail(ErrorCode::kInvalidArgument, "sgd: velocity has " + std::to_string(opt.velocity.size()) + " values, params " + std::to_string(params.size()));
  }
  std::vector<uint16_t> out(params.size());
  if (where.backend == Backend::kEmulated) {
    const SgdConsts k = sgd_consts(lr, opt.momentum, opt.weight_decay, opt.nesterov);
    for (size_t i = 0; i < params.size(); ++i) out[i] = sgd_update(&params[i], grads[i], &opt.velocity[i], k);
  } else {
    Session ses(where.device);
    TRESOR_TRY(ses.open());
    TRESOR_BIND(d_p, ses.upload(params));
    TRESOR_BIND(d_g, ses.upload(grads));
    TRESOR_BIND(d_v, ses.upload(opt.velocity));
    TRESOR_BIND(d_b, ses.alloc<uint16_t>(params.size()));
    TRESOR_TRY(sgd_step_device(ses.where(), params.size(), d_p, d_g, d_v, d_b, lr, opt.momentum, opt.weight_decay, opt.nesterov));
    // Both downloads before anything is changed: a failure leaves the caller's state as it was.
    std::vector<float> p(params.size()), v(params.size());
    TRESOR_TRY(ses.download(p, d_p));
    TRESOR_TRY(ses.download(v, d_v));
    TRESOR_TRY(ses.download(out, d_b));
    params = std::move(p);
    opt.velocity = std::move(v);
  }
  if (bf16 != nullptr) *bf16 = std::move(out);
  return {};
}

Result<void> adamw_step(tresor::train::AdamW& opt, std::vector<float>& params, const std::vector<float>& grads, double lr, std::vector<uint16_t>* bf16, Where where) {
  if (params.size() != grads.size()) return fail(ErrorCode::kInvalidArgument, "adamw: " + std::to_string(params.size()) + " params, " + std::to_string(grads.size()) + " grads");
  if (opt.m.empty()) opt.m.assign(params.size(), 0.0f);
  if (opt.v.empty()) opt.v.assign(params.size(), 0.0f);
  if (opt.m.size() != params.size() || opt.v.size() != params.size()) {
    return fail(ErrorCode::kInvalidArgument, "adamw: m has " + std::to_string(opt.m.size()) + " and v " + std::to_string(opt.v.size()) + " values, params " + std::to_string(params.size()));
  }
  std::vector<uint16_t> out(params.size());
  const uint64_t t = opt.t + 1;
  if (where.backend == Backend::kEmulated) {
    const AdamWConsts k = adamw_consts(lr, opt.beta1, opt.beta2, opt.eps, opt.weight_decay, t);
    for (size_t i = 0; i < params.size(); ++i) out[i] = adamw_update(&params[i], grads[i], &opt.m[i], &opt.v[i], k);
  } else {
    Session ses(where.device);
    TRESOR_TRY(ses.open());
    TRESOR_BIND(d_p, ses.upload(params));
    TRESOR_BIND(d_g, ses.upload(grads));
    TRESOR_BIND(d_m, ses.upload(opt.m));
    TRESOR_BIND(d_v, ses.upload(opt.v));
    TRESOR_BIND(d_b, ses.alloc<uint16_t>(params.size()));
    TRESOR_TRY(adamw_step_device(ses.where(), params.size(), d_p, d_g, d_m, d_v, d_b, lr, opt.beta1, opt.beta2, opt.eps, opt.weight_decay, t));
    std::vector<float> p(params.size()), m(params.size()), v(params.size());
    TRESOR_TRY(ses.download(p, d_p));
    TRESOR_TRY(ses.download(m, d_m));
    TRESOR_TRY(ses.download(v, d_v));
    TRESOR_TRY(ses.download(out, d_b));
    params = std::move(p);
    opt.m = std::move(m);
    opt.v = std::move(v);
  }
  opt.t = t;
  if (bf16 != nullptr) *bf16 = std::move(out);
  return {};
}

// ------------------------------------------------------------------------------------------------
// The device-pointer entries.

Result<size_t> conv_backward_weight_scratch(const ConvShape& s) {
  auto g = geometry(s);
  if (!g) return std::unexpected(g.error());
  const GemmDims dm = gemm_dims(weight_kind(s), *g);
  return sizeof(float) * size_t{dm.splits} * dm.m * dm.n;
}

size_t norm_lrelu_backward_scratch(const NormShape& s) { return sizeof(double) * 2 * s.n * s.channels; }

Result<size_t> dice_ce_loss_scratch(const LossShape& s) {
  auto g = loss_geometry(s, 0);
  if (!g) return std::unexpected(g.error());
  return sizeof(double) * (size_t{loss_blocks(*g)} + 1) * loss_quantities(*g);
}

// Each entry: the checks, then the emulation (host pointers, run now) or the launch on the stream.
#ifdef TRESOR_HAVE_CUDA
#define TRESOR_ON_DEVICE(st, expr)                              \
  TRESOR_TRY(cuda(gpu::detail::cuda_set_device((st).device))); \
  return cuda(expr)
#else
#define TRESOR_ON_DEVICE(st, expr) return fail(ErrorCode::kUnavailable, kNoCuda)
#endif

Result<void> conv_forward_device(DeviceStream st, const ConvShape& s, const float* d_x, const uint16_t* d_w, const float* d_bias, float* d_y) {
  auto g = geometry(s);
  if (!g) return std::unexpected(g.error());
  TRESOR_TRY(check_pointers(layer_name(s), {{"d_x", d_x}, {"d_w", d_w}, {"d_bias", d_bias}, {"d_y", d_y}}));
  if (st.backend == Backend::kEmulated) {
    conv_forward_emulated(s, *g, d_x, d_w, d_bias, d_y);
    return {};
  }
  GemmOperands op;
  op.x = d_x;
  op.w = d_w;
  op.bias = d_bias;
  op.out = d_y;
  TRESOR_ON_DEVICE(st, detail::gemm_launch(st.stream, forward_kind(s), *g, gemm_dims(forward_kind(s), *g), op));
}

Result<void> conv_backward_data_device(DeviceStream st, const ConvShape& s, const float* d_dy, const uint16_t* d_w, float* d_dx) {
  auto g = geometry(s);
  if (!g) return std::unexpected(g.error());
  TRESOR_TRY(check_pointers(layer_name(s), {{"d_dy", d_dy}, {"d_w", d_w}, {"d_dx", d_dx}}));
  if (st.backend == Backend::kEmulated) {
    conv_backward_data_emulated(s, *g, d_dy, d_w, d_dx);
    return {};
  }
  GemmOperands op;
  op.dy = d_dy;
  op.w = d_w;
  op.out = d_dx;
  TRESOR_ON_DEVICE(st, detail::gemm_launch(st.stream, data_kind(s), *g, gemm_dims(data_kind(s), *g), op));
}

Result<void> conv_backward_weight_device(DeviceStream st, const ConvShape& s, const float* d_x, const float* d_dy, float* d_dweight, float* d_dbias, void* d_scratch,
                                         size_t scratch_bytes) {
  auto g = geometry(s);
  if (!g) return std::unexpected(g.error());
  TRESOR_TRY(check_pointers(layer_name(s), {{"d_x", d_x}, {"d_dy", d_dy}, {"d_dweight", d_dweight}, {"d_dbias", d_dbias}, {"d_scratch", d_scratch}}));
  const GemmDims dm = gemm_dims(weight_kind(s), *g);
  const size_t need = sizeof(float) * size_t{dm.splits} * dm.m * dm.n;
  if (scratch_bytes < need) {
    return fail(ErrorCode::kInvalidArgument, std::string(layer_name(s)) + ": scratch_bytes = " + std::to_string(scratch_bytes) + ", want at least " + std::to_string(need));
  }
  if (st.backend == Backend::kEmulated) {
    conv_backward_weight_emulated(s, *g, d_x, d_dy, d_dweight, d_dbias, static_cast<float*>(d_scratch));
    return {};
  }
#ifdef TRESOR_HAVE_CUDA
  TRESOR_TRY(cuda(gpu::detail::cuda_set_device(st.device)));
  GemmOperands op;
  op.x = d_x;
  op.dy = d_dy;
  op.out = static_cast<float*>(d_scratch);
  TRESOR_TRY(cuda(detail::gemm_launch(st.stream, weight_kind(s), *g, dm, op)));
  TRESOR_TRY(cuda(detail::gemm_splitk_launch(st.stream, op.out, dm.splits, uint64_t{dm.m} * dm.n, d_dweight)));
  return cuda(detail::bias_grad_launch(st.stream, d_dy, g->n, g->cout, out_voxels(*g), d_dbias));
#else
  return fail(ErrorCode::kUnavailable, kNoCuda);
#endif
}

Result<void> norm_lrelu_forward_device(DeviceStream st, const NormShape& s, const float* d_x, const float* d_gamma, const float* d_beta, float* d_y) {
  TRESOR_TRY(check_norm(s));
  TRESOR_TRY(check_pointers("instance norm", {{"d_x", d_x}, {"d_gamma", d_gamma}, {"d_beta", d_beta}, {"d_y", d_y}}));
  if (st.backend == Backend::kEmulated) {
    norm_forward_emulated(s, d_x, d_gamma, d_beta, d_y);
    return {};
  }
  NormConsts k;
  k.eps = s.eps;
  k.slope = s.slope;
  TRESOR_ON_DEVICE(st, detail::norm_forward_launch(st.stream, d_x, static_cast<uint32_t>(s.n * s.channels), static_cast<uint32_t>(s.channels),
                                                   static_cast<uint32_t>(s.spatial), d_gamma, d_beta, k, d_y));
}

Result<void> norm_lrelu_backward_device(DeviceStream st, const NormShape& s, const float* d_x, const float* d_dy, const float* d_gamma, const float* d_beta, float* d_dx,
                                        float* d_dgamma, float* d_dbeta, void* d_scratch, size_t scratch_bytes) {
  TRESOR_TRY(check_norm(s));
  TRESOR_TRY(check_pointers("instance norm backward", {{"d_x", d_x}, {"d_dy", d_dy}, {"d_gamma", d_gamma}, {"d_beta", d_beta}, {"d_dx", d_dx}, {"d_dgamma", d_dgamma},
                                                       {"d_dbeta", d_dbeta}, {"d_scratch", d_scratch}}));
  if (scratch_bytes < norm_lrelu_backward_scratch(s)) {
    return fail(ErrorCode::kInvalidArgument, "instance norm backward: scratch_bytes = " + std::to_string(scratch_bytes) + ", want at least " + std::to_string(norm_lrelu_backward_scratch(s)));
  }
  if (st.backend == Backend::kEmulated) {
    norm_backward_emulated(s, d_x, d_dy, d_gamma, d_beta, d_dx, d_dgamma, d_dbeta);
    return {};
  }
  NormConsts k;
  k.eps = s.eps;
  k.slope = s.slope;
  TRESOR_ON_DEVICE(st, detail::norm_backward_launch(st.stream, d_x, d_dy, static_cast<uint32_t>(s.n * s.channels), static_cast<uint32_t>(s.channels),
                                                    static_cast<uint32_t>(s.spatial), d_gamma, d_beta, k, d_dx, static_cast<double*>(d_scratch), d_dgamma, d_dbeta));
}

Result<LossValues> dice_ce_loss_device(DeviceStream st, const LossShape& s, const float* d_logits, const uint8_t* d_target, double smooth, double dice_weight,
                                       float* d_dlogits, void* d_scratch, size_t scratch_bytes) {
  auto g = loss_geometry(s, smooth);
  if (!g) return std::unexpected(g.error());
  TRESOR_TRY(check_pointers("loss", {{"d_logits", d_logits}, {"d_target", d_target}, {"d_dlogits", d_dlogits}, {"d_scratch", d_scratch}}));
  const size_t need = sizeof(double) * (size_t{loss_blocks(*g)} + 1) * loss_quantities(*g);
  if (scratch_bytes < need) return fail(ErrorCode::kInvalidArgument, "loss: scratch_bytes = " + std::to_string(scratch_bytes) + ", want at least " + std::to_string(need));
  LossConsts k;
  k.smooth = smooth;
  k.dice_weight = dice_weight;
  k.voxels = static_cast<double>(s.n * s.spatial);
  if (st.backend == Backend::kEmulated) return loss_values(*g, loss_emulated(*g, d_logits, d_target, k, d_dlogits), smooth, dice_weight);
#ifdef TRESOR_HAVE_CUDA
  TRESOR_TRY(cuda(gpu::detail::cuda_set_device(st.device)));
  auto* partials = static_cast<double*>(d_scratch);
  double* d_totals = partials + size_t{loss_blocks(*g)} * loss_quantities(*g);
  TRESOR_TRY(cuda(detail::loss_launch(st.stream, d_logits, d_target, *g, k, partials, d_totals, d_dlogits)));
  std::vector<double> totals(loss_quantities(*g));
  TRESOR_TRY(cuda(gpu::detail::cuda_copy_async(st.stream, totals.data(), d_totals, sizeof(double) * totals.size(), gpu::detail::kDeviceToHost)));
  TRESOR_TRY(cuda(gpu::detail::cuda_stream_sync(st.stream)));
  return loss_values(*g, totals, smooth, dice_weight);
#else
  return fail(ErrorCode::kUnavailable, kNoCuda);
#endif
}

Result<std::vector<double>> dice_ce_loss_stats_device(DeviceStream st, const LossShape& s, const float* d_logits, const uint8_t* d_target, void* d_scratch,
                                                      size_t scratch_bytes) {
  auto g = loss_geometry(s, 0);
  if (!g) return std::unexpected(g.error());
  TRESOR_TRY(check_pointers("loss statistics", {{"d_logits", d_logits}, {"d_target", d_target}, {"d_scratch", d_scratch}}));
  const size_t need = sizeof(double) * (size_t{loss_blocks(*g)} + 1) * loss_quantities(*g);
  if (scratch_bytes < need) return fail(ErrorCode::kInvalidArgument, "loss statistics: scratch_bytes = " + std::to_string(scratch_bytes) + ", want at least " + std::to_string(need));
  if (st.backend == Backend::kEmulated) return stats_of_totals(*g, loss_stats_emulated(*g, d_logits, d_target));
#ifdef TRESOR_HAVE_CUDA
  TRESOR_TRY(cuda(gpu::detail::cuda_set_device(st.device)));
  auto* partials = static_cast<double*>(d_scratch);
  double* d_totals = partials + size_t{loss_blocks(*g)} * loss_quantities(*g);
  TRESOR_TRY(cuda(detail::loss_stats_launch(st.stream, d_logits, d_target, *g, partials, d_totals)));
  std::vector<double> totals(loss_quantities(*g));
  TRESOR_TRY(cuda(gpu::detail::cuda_copy_async(st.stream, totals.data(), d_totals, sizeof(double) * totals.size(), gpu::detail::kDeviceToHost)));
  TRESOR_TRY(cuda(gpu::detail::cuda_stream_sync(st.stream)));
  return stats_of_totals(*g, totals);
#else
  return fail(ErrorCode::kUnavailable, kNoCuda);
#endif
}

Result<LossValues> dice_ce_loss_grad_device(DeviceStream st, const LossShape& s, const float* d_logits, const uint8_t* d_target, std::span<const double> stats,
                                            double smooth, double dice_weight, double scale, float* d_dlogits, void* d_scratch, size_t scratch_bytes) {
  auto g = loss_geometry(s, smooth);
  if (!g) return std::unexpected(g.error());
  TRESOR_TRY(check_pointers("loss gradient", {{"d_logits", d_logits}, {"d_target", d_target}, {"d_dlogits", d_dlogits}, {"d_scratch", d_scratch}}));
  if (stats.size() != 2 * s.classes) {
    return fail(ErrorCode::kInvalidArgument, "loss gradient: " + std::to_string(stats.size()) + " statistics for " + std::to_string(s.classes) + " classes, want " + std::to_string(2 * s.classes));
  }
  // The voxels summed over the ranks: at least this call's, a whole number (a corrupted vector or
  // one of another layout fails here rather than scaling the gradient).
  const double own = static_cast<double>(s.n * s.spatial);
  if (!(stats[1] >= own) || stats[1] != std::floor(stats[1])) {
    return fail(ErrorCode::kInvalidArgument, "loss gradient: statistics[1] (the voxel count) is " + std::to_string(stats[1]) + ", want a whole number ≥ this batch's " + std::to_string(s.n * s.spatial));
  }
  if (!std::isfinite(scale)) return fail(ErrorCode::kInvalidArgument, "loss gradient: scale = " + std::to_string(scale) + "; it must be finite");
  const size_t need = sizeof(double) * (size_t{loss_blocks(*g)} + 1) * loss_quantities(*g);
  if (scratch_bytes < need) return fail(ErrorCode::kInvalidArgument, "loss gradient: scratch_bytes = " + std::to_string(scratch_bytes) + ", want at least " + std::to_string(need));
  LossConsts k;
  k.smooth = smooth;
  k.dice_weight = dice_weight;
  k.voxels = stats[1];
  k.scale = scale;
  const std::vector<double> totals = totals_of_stats(*g, stats);
  const LossValues v = loss_values(*g, totals, smooth, dice_weight, stats[1]);
  if (st.backend == Backend::kEmulated) {
    loss_grad_emulated(*g, d_logits, d_target, totals.data(), k, d_dlogits);
    return v;
  }
#ifdef TRESOR_HAVE_CUDA
  TRESOR_TRY(cuda(gpu::detail::cuda_set_device(st.device)));
  double* d_totals = static_cast<double*>(d_scratch) + size_t{loss_blocks(*g)} * loss_quantities(*g);
  // From pageable memory cudaMemcpyAsync "might be synchronous" (CUDA Runtime API, API
  // synchronization behavior), no more: `totals` goes at return, so the copy is waited for.
  TRESOR_TRY(cuda(gpu::detail::cuda_copy_async(st.stream, d_totals, totals.data(), sizeof(double) * totals.size(), gpu::detail::kHostToDevice)));
  TRESOR_TRY(cuda(gpu::detail::cuda_stream_sync(st.stream)));
  TRESOR_TRY(cuda(detail::loss_grad_launch(st.stream, d_logits, d_target, *g, k, d_totals, d_dlogits)));
  return v;
#else
  return fail(ErrorCode::kUnavailable, kNoCuda);
#endif
}

Result<void> sgd_step_device(DeviceStream st, size_t count, float* d_params, const float* d_grads, float* d_velocity, uint16_t* d_bf16, double lr, double momentum,
                             double weight_decay, bool nesterov) {
  if (count > 0) TRESOR_TRY(check_pointers("sgd", {{"d_params", d_params}, {"d_grads", d_grads}, {"d_velocity", d_velocity}}));
  const SgdConsts k = sgd_consts(lr, momentum, weight_decay, nesterov);
  if (st.backend == Backend::kEmulated) {
    for (size_t i = 0; i < count; ++i) {
      const uint16_t b = sgd_update(&d_params[i], d_grads[i], &d_velocity[i], k);
      if (d_bf16 != nullptr) d_bf16[i] = b;
    }
    return {};
  }
  TRESOR_ON_DEVICE(st, detail::sgd_launch(st.stream, count, d_params, d_grads, d_velocity, d_bf16, k));
}

Result<void> adamw_step_device(DeviceStream st, size_t count, float* d_params, const float* d_grads, float* d_m, float* d_v, uint16_t* d_bf16, double lr, double beta1,
                               double beta2, double eps, double weight_decay, uint64_t step) {
  if (step == 0) return fail(ErrorCode::kInvalidArgument, "adamw: step = 0; the first step is 1");
  if (count > 0) TRESOR_TRY(check_pointers("adamw", {{"d_params", d_params}, {"d_grads", d_grads}, {"d_m", d_m}, {"d_v", d_v}}));
  const AdamWConsts k = adamw_consts(lr, beta1, beta2, eps, weight_decay, step);
  if (st.backend == Backend::kEmulated) {
    for (size_t i = 0; i < count; ++i) {
      const uint16_t b = adamw_update(&d_params[i], d_grads[i], &d_m[i], &d_v[i], k);
      if (d_bf16 != nullptr) d_bf16[i] = b;
    }
    return {};
  }
  TRESOR_ON_DEVICE(st, detail::adamw_launch(st.stream, count, d_params, d_grads, d_m, d_v, d_bf16, k));
}

Result<void> copy_channels_device(DeviceStream st, const ChannelCopy& c, const float* d_src, float* d_dst) {
  if (c.src_first + c.channels > c.src_channels) {
    return fail(ErrorCode::kInvalidArgument, "copy channels: src_first + channels = " + std::to_string(c.src_first + c.channels) + " > src_channels = " + std::to_string(c.src_channels));
  }
  if (c.dst_first + c.channels > c.dst_channels) {
    return fail(ErrorCode::kInvalidArgument, "copy channels: dst_first + channels = " + std::to_string(c.dst_first + c.channels) + " > dst_channels = " + std::to_string(c.dst_channels));
  }
  if (c.n == 0 || c.channels == 0 || c.spatial == 0) return {};
  TRESOR_TRY(check_pointers("copy channels", {{"d_src", d_src}, {"d_dst", d_dst}}));
  const size_t block = c.channels * c.spatial;
  for (size_t b = 0; b < c.n; ++b) {
    const float* from = d_src + (b * c.src_channels + c.src_first) * c.spatial;
    float* to = d_dst + (b * c.dst_channels + c.dst_first) * c.spatial;
    if (st.backend == Backend::kEmulated) {
      std::memcpy(to, from, block * sizeof(float));
      continue;
    }
#ifdef TRESOR_HAVE_CUDA
    if (b == 0) TRESOR_TRY(cuda(gpu::detail::cuda_set_device(st.device)));
    TRESOR_TRY(cuda(gpu::detail::cuda_copy_async(st.stream, to, from, block * sizeof(float), gpu::detail::kDeviceToDevice)));
#else
    return fail(ErrorCode::kUnavailable, kNoCuda);
#endif
  }
  return {};
}

Result<void> add_device(DeviceStream st, size_t count, const float* d_x, float* d_y) {
  if (count == 0) return {};
  TRESOR_TRY(check_pointers("add", {{"d_x", d_x}, {"d_y", d_y}}));
  if (st.backend == Backend::kEmulated) {
    for (size_t i = 0; i < count; ++i) d_y[i] += d_x[i];
    return {};
  }
  TRESOR_ON_DEVICE(st, detail::add_launch(st.stream, count, d_x, d_y));
}

Result<void> downsample_target_device(DeviceStream st, size_t n, size_t d, size_t h, size_t w, size_t j, const uint8_t* d_in, uint8_t* d_out) {
  if (j == 0 || j > 30) return fail(ErrorCode::kInvalidArgument, "downsample: level j = " + std::to_string(j) + ", not 1..30");
  const size_t f = size_t{1} << j;
  if (d % f != 0 || h % f != 0 || w % f != 0) {
    return fail(ErrorCode::kInvalidArgument, "downsample: " + std::to_string(d) + "×" + std::to_string(h) + "×" + std::to_string(w) + " is not a multiple of " + std::to_string(f));
  }
  const size_t count = n * (d / f) * (h / f) * (w / f);
  if (count == 0) return {};
  TRESOR_TRY(check_pointers("downsample", {{"d_in", d_in}, {"d_out", d_out}}));
  if (st.backend == Backend::kEmulated) {
    for (size_t i = 0; i < count; ++i) d_out[i] = d_in[downsample_source(i, d, h, w, f)];
    return {};
  }
  TRESOR_ON_DEVICE(st, detail::downsample_launch(st.stream, n, d, h, w, f, d_in, d_out));
}

Result<void> zero_device(DeviceStream st, void* d_p, size_t bytes) {
  if (bytes == 0) return {};
  TRESOR_TRY(check_pointers("zero", {{"d_p", d_p}}));
  if (st.backend == Backend::kEmulated) {
    std::memset(d_p, 0, bytes);
    return {};
  }
  TRESOR_ON_DEVICE(st, detail::zero_launch(st.stream, d_p, bytes));
}

#undef TRESOR_ON_DEVICE

}  // namespace tresor::gpu::train
