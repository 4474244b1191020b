// The 3D U-Net training layers' per-element arithmetic (include/tresor/gpu/train.h), written once
// for the CUDA kernels (kernels/train.cu) and their CPU emulation (kernels/train_gpu.cc), which
// runs this same code element by element and is compared with the CPU reference
// (tresor/train/layers.h) on every machine. Plain C++20 (nothing beyond <cstdint>/<cstring>/
// <cmath>): nvcc compiles it as device code, g++ as host code under the project's warnings.
//
// What lives here:
//  - bf16 round-to-nearest-even on bit patterns (not cuda_bf16.h), so host and device agree bit
//    for bit and the emulation needs no CUDA headers;
//  - the implicit-GEMM index mapping of every convolution pass (gemm_a/gemm_b: the GEMM's
//    operands at (row, column) gathered from NCDHW tensors with zero padding; gemm_store: where a
//    result goes), shared by the WMMA kernel and the emulation's plain triple loop;
//  - the fixed-order reductions (per-thread strided partial sums, then a fixed pairwise tree over
//    kReduceThreads partials): the same pairs in the same order on both sides, so the instance
//    norm's statistics and the bias gradient are deterministic and equal to the emulation's bit
//    for bit (double arithmetic through dadd/dmul, which nvcc cannot fuse); the loss's sums are
//    deterministic too, but its softmax uses exp and log, whose CUDA and glibc results may differ
//    in the last place, so the device's loss matches the emulation within rounding, not bitwise;
//  - the instance norm + leaky ReLU per voxel, the loss per voxel, the optimizers per parameter,
//    with the CPU reference's expressions in its order (double, unfused).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>

#include "hd.h"
#include "tresor/rn.h"

namespace tresor::gpu::train {

// ---------------------------------------------------------------------------------------------
// Unfused double arithmetic (tresor/rn.h), so the device does not drift from the host's SSE2 code.
using tresor::rn::dadd;
using tresor::rn::ddiv;
using tresor::rn::dmul;
using tresor::rn::dsqrt;
using tresor::rn::dsub;
using tresor::rn::bits_float;
using tresor::rn::float_bits;

// ---------------------------------------------------------------------------------------------
// bf16: the upper half of an IEEE binary32 (sign, 8 exponent bits, 7 mantissa bits).


/// f rounded to the nearest bf16, ties to even, as a bit pattern. Adding 0x7fff plus the kept
/// half's lowest bit and truncating rounds the discarded 16 bits to nearest-even; a carry into
/// the exponent is the correct result (also for denormals, whose bf16 counterparts are the same
/// bit layout, and for overflow to ±inf). NaN stays NaN: quieted (bit 6 of the half set), sign and
/// the payload's top bits kept — the plain rounding could carry a NaN's payload into inf.
TRESOR_HD inline uint16_t bf16_bits(float f) {
  const uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);
  const uint32_t lsb = (u >> 16) & 1u;
  return static_cast<uint16_t>((u + 0x7fffu + lsb) >> 16);
}
/// The float a bf16 bit pattern stands for (exact: bf16 ⊂ binary32).
TRESOR_HD inline float bf16_float(uint16_t b) { return bits_float(static_cast<uint32_t>(b) << 16); }
/// f rounded to bf16 and back: the GEMMs' operands. A product of two such values is exact in
/// float (8 + 8 significant bits ≤ 24), so the only roundings of a GEMM are the operands' and
/// the fp32 accumulation's.
TRESOR_HD inline float bf16_round(float f) { return bf16_float(bf16_bits(f)); }

// ---------------------------------------------------------------------------------------------
// Implicit GEMM. Every convolution pass is C[M×N] = A[M×K]·B[K×N] with A and B gathered on the
// fly from the tensors (never materialised). Tensors are NCDHW, x fastest (tresor/train/layers.h);
// weights bf16 in the reference's layouts: Conv3d [cout][cin][k³], ConvTranspose3d [cin][cout][k³].

inline constexpr uint32_t kTileM = 64;         // a block's tile of C: 64×64, four warps of 32×32
inline constexpr uint32_t kTileN = 64;
inline constexpr uint32_t kTileK = 16;         // one WMMA k-step (16×16×16 bf16 fragments)
inline constexpr uint32_t kGemmThreads = 128;
inline constexpr uint32_t kSplitMinK = 1024;   // a split-K chunk covers at least this much of K
inline constexpr uint32_t kSplitTargetBlocks = 2048;

enum class GemmKind : uint32_t {
  kConvForward,         // M = cout, N = output voxels, K = cin·k³;   C → y (+ bias)
  kConvBackwardData,    // M = cin, N = input voxels, K = cout·k³;    C → dx
  kConvBackwardWeight,  // M = cout, N = cin·k³, K = output voxels;   C → split-K partials
  kTconvForward,        // M = cout·8, N = input voxels, K = cin;     C → y (+ bias), scattered
  kTconvBackwardData,   // M = cin, N = input voxels, K = cout·8;     C → dx
  kTconvBackwardWeight, // M = cin, N = cout·8, K = input voxels;     C → split-K partials
};

/// A convolution's geometry: input n×cin×d×h×w, output n×cout×od×oh×ow. The host checks that
/// every tensor holds fewer than 2^31 elements, so 32-bit coordinates suffice; addresses are
/// formed in 64 bits anyway.
struct ConvGeom {
  uint32_t n = 0, cin = 0, cout = 0;
  uint32_t d = 0, h = 0, w = 0;
  uint32_t od = 0, oh = 0, ow = 0;
  uint32_t k = 3, stride = 1, pad = 1;  // transposed: k = stride = 2, pad = 0
};

/// The tensors a pass reads and the one it writes.
struct GemmOperands {
  const float* x = nullptr;      // the layer's input (float; rounded to bf16 as it is gathered)
  const float* dy = nullptr;     // the output's gradient (likewise)
  const uint16_t* w = nullptr;   // bf16 weights
  const float* bias = nullptr;   // forward passes
  float* out = nullptr;          // y, dx, or the split-K partials [split][M][N]
};

struct GemmDims {
  uint32_t m = 0, n = 0, k = 0;
  uint32_t splits = 1, chunk = 0;  // K is cut into `splits` chunks of `chunk` (a multiple of kTileK)
};

TRESOR_HD inline uint32_t taps(const ConvGeom& g) { return g.k * g.k * g.k; }
TRESOR_HD inline uint32_t in_voxels(const ConvGeom& g) { return g.d * g.h * g.w; }
TRESOR_HD inline uint32_t out_voxels(const ConvGeom& g) { return g.od * g.oh * g.ow; }

/// The GEMM's dimensions for a pass (host: the launch and the emulation take the same).
inline GemmDims gemm_dims(GemmKind kind, const ConvGeom& g) {
  GemmDims d;
  const uint32_t t = taps(g);
  auto set = [&d](uint32_t m, uint32_t n, uint32_t k) {
    d.m = m;
    d.n = n;
    d.k = k;
  };
  switch (kind) {
    case GemmKind::kConvForward: set(g.cout, g.n * out_voxels(g), g.cin * t); break;
    case GemmKind::kConvBackwardData: set(g.cin, g.n * in_voxels(g), g.cout * t); break;
    case GemmKind::kConvBackwardWeight: set(g.cout, g.cin * t, g.n * out_voxels(g)); break;
    case GemmKind::kTconvForward: set(g.cout * 8, g.n * in_voxels(g), g.cin); break;
    case GemmKind::kTconvBackwardData: set(g.cin, g.n * in_voxels(g), g.cout * 8); break;
    case GemmKind::kTconvBackwardWeight: set(g.cin, g.cout * 8, g.n * in_voxels(g)); break;
  }
  d.splits = 1;
  d.chunk = (d.k + kTileK - 1) / kTileK * kTileK;
  if (kind == GemmKind::kConvBackwardWeight || kind == GemmKind::kTconvBackwardWeight) {
    // Split-K for the weight gradients (K = every voxel of the batch, M·N small): enough chunks to
    // fill a device, each at least kSplitMinK long. A function of the shape alone (not of the
    // device), so the partials and their fixed-order sum are the same on every run.
    const uint64_t tiles = uint64_t{(d.m + kTileM - 1) / kTileM} * ((d.n + kTileN - 1) / kTileN);
    uint64_t splits = (kSplitTargetBlocks + tiles - 1) / tiles;
    const uint64_t most = (uint64_t{d.k} + kSplitMinK - 1) / kSplitMinK;
    if (splits > most) splits = most;
    if (splits < 1) splits = 1;
    const uint64_t per = (d.k + splits - 1) / splits;
    d.chunk = static_cast<uint32_t>((per + kTileK - 1) / kTileK * kTileK);
    d.splits = static_cast<uint32_t>((d.k + d.chunk - 1) / d.chunk);
    if (d.splits == 0) d.splits = 1;
  }
  return d;
}

/// Coordinates of a voxel index over an (n, dz, dy, dx) grid.
struct Voxel {
  uint32_t b, z, y, x;
};
TRESOR_HD inline Voxel voxel_of(uint32_t v, uint32_t dz, uint32_t dy, uint32_t dx) {
  Voxel r;
  r.x = v % dx;
  v /= dx;
  r.y = v % dy;
  v /= dy;
  r.z = v % dz;
  r.b = v / dz;
  return r;
}
TRESOR_HD inline uint64_t nc_offset(uint32_t b, uint32_t channels, uint32_t c, uint64_t spatial) { return (uint64_t{b} * channels + c) * spatial; }

/// The input voxel a convolution's output voxel o reads through tap t, zero outside (padding):
/// i = o·stride − pad + t per axis; the value rounded to bf16.
TRESOR_HD inline float conv_gather_x(const ConvGeom& g, const float* x, uint32_t ci, const Voxel& o, uint32_t tap) {
  const uint32_t kx = tap % g.k, ky = (tap / g.k) % g.k, kz = tap / (g.k * g.k);
  const int64_t iz = int64_t{o.z} * g.stride + kz - g.pad, iy = int64_t{o.y} * g.stride + ky - g.pad, ix = int64_t{o.x} * g.stride + kx - g.pad;
  if (iz < 0 || iy < 0 || ix < 0 || iz >= g.d || iy >= g.h || ix >= g.w) return 0.0f;
  const uint64_t at = nc_offset(o.b, g.cin, ci, in_voxels(g)) + (static_cast<uint64_t>(iz) * g.h + static_cast<uint64_t>(iy)) * g.w + static_cast<uint64_t>(ix);
  return bf16_round(x[at]);
}

/// The output coordinate that reads input coordinate i through tap t along an axis of `on`
/// outputs (o·stride − pad + t = i), or −1 when none does.
TRESOR_HD inline int64_t conv_source(uint32_t i, uint32_t t, uint32_t stride, uint32_t pad, uint32_t on) {
  const int64_t num = int64_t{i} + pad - t;
  if (num < 0 || num % stride != 0) return -1;
  const int64_t o = num / stride;
  return o < on ? o : -1;
}

/// The output gradient an input voxel i receives through tap t of output channel co (backward
/// data's B operand), zero where no output reads i through t.
TRESOR_HD inline float conv_gather_dy(const ConvGeom& g, const float* dy, uint32_t co, const Voxel& i, uint32_t tap) {
  const uint32_t kx = tap % g.k, ky = (tap / g.k) % g.k, kz = tap / (g.k * g.k);
  const int64_t oz = conv_source(i.z, kz, g.stride, g.pad, g.od), oy = conv_source(i.y, ky, g.stride, g.pad, g.oh),
                ox = conv_source(i.x, kx, g.stride, g.pad, g.ow);
  if (oz < 0 || oy < 0 || ox < 0) return 0.0f;
  const uint64_t at = nc_offset(i.b, g.cout, co, out_voxels(g)) + (static_cast<uint64_t>(oz) * g.oh + static_cast<uint64_t>(oy)) * g.ow + static_cast<uint64_t>(ox);
  return bf16_round(dy[at]);
}

/// The transposed convolution (k = stride = 2, pad 0): input voxel i feeds output 2i + tap.
TRESOR_HD inline uint64_t tconv_out_offset(const ConvGeom& g, uint32_t co, const Voxel& i, uint32_t tap) {
  const uint32_t tx = tap & 1u, ty = (tap >> 1) & 1u, tz = tap >> 2;
  return nc_offset(i.b, g.cout, co, out_voxels(g)) + (uint64_t{2 * i.z + tz} * g.oh + (2 * i.y + ty)) * g.ow + (2 * i.x + tx);
}

/// A[row][col] of the pass, as a float holding a bf16 value.
template <GemmKind K>
TRESOR_HD inline float gemm_a(const ConvGeom& g, const GemmOperands& op, uint32_t row, uint32_t col) {
  if constexpr (K == GemmKind::kConvForward) {
    return bf16_float(op.w[uint64_t{row} * (g.cin * taps(g)) + col]);  // w[co][ci·k³ + tap]
  } else if constexpr (K == GemmKind::kConvBackwardData) {
    const uint32_t t = taps(g), co = col / t, tap = col % t;  // w[co][ci = row][tap]
    return bf16_float(op.w[(uint64_t{co} * g.cin + row) * t + tap]);
  } else if constexpr (K == GemmKind::kConvBackwardWeight) {
    const Voxel o = voxel_of(col, g.od, g.oh, g.ow);  // dy[b][co = row][o]
    return bf16_round(op.dy[nc_offset(o.b, g.cout, row, out_voxels(g)) + (uint64_t{o.z} * g.oh + o.y) * g.ow + o.x]);
  } else if constexpr (K == GemmKind::kTconvForward) {
    const uint32_t co = row / 8, tap = row % 8;  // w[ci = col][co][tap]
    return bf16_float(op.w[(uint64_t{col} * g.cout + co) * 8 + tap]);
  } else if constexpr (K == GemmKind::kTconvBackwardData) {
    const uint32_t co = col / 8, tap = col % 8;  // w[ci = row][co][tap]
    return bf16_float(op.w[(uint64_t{row} * g.cout + co) * 8 + tap]);
  } else {  // kTconvBackwardWeight: x[b][ci = row][i]
    const Voxel i = voxel_of(col, g.d, g.h, g.w);
    return bf16_round(op.x[nc_offset(i.b, g.cin, row, in_voxels(g)) + (uint64_t{i.z} * g.h + i.y) * g.w + i.x]);
  }
}

/// B[row][col] of the pass, as a float holding a bf16 value (0 for padding).
template <GemmKind K>
TRESOR_HD inline float gemm_b(const ConvGeom& g, const GemmOperands& op, uint32_t row, uint32_t col) {
  if constexpr (K == GemmKind::kConvForward) {
    const uint32_t t = taps(g);  // im2col: x at output voxel col through (ci, tap) = row
    return conv_gather_x(g, op.x, row / t, voxel_of(col, g.od, g.oh, g.ow), row % t);
  } else if constexpr (K == GemmKind::kConvBackwardData) {
    const uint32_t t = taps(g);  // dy reaching input voxel col through (co, tap) = row
    return conv_gather_dy(g, op.dy, row / t, voxel_of(col, g.d, g.h, g.w), row % t);
  } else if constexpr (K == GemmKind::kConvBackwardWeight) {
    const uint32_t t = taps(g);  // x at output voxel row through (ci, tap) = col
    return conv_gather_x(g, op.x, col / t, voxel_of(row, g.od, g.oh, g.ow), col % t);
  } else if constexpr (K == GemmKind::kTconvForward) {
    const Voxel i = voxel_of(col, g.d, g.h, g.w);  // x[b][ci = row][i]
    return bf16_round(op.x[nc_offset(i.b, g.cin, row, in_voxels(g)) + (uint64_t{i.z} * g.h + i.y) * g.w + i.x]);
  } else if constexpr (K == GemmKind::kTconvBackwardData) {
    return bf16_round(op.dy[tconv_out_offset(g, row / 8, voxel_of(col, g.d, g.h, g.w), row % 8)]);
  } else {  // kTconvBackwardWeight: dy[b][co][2i + tap], (co, tap) = col, i = row
    return bf16_round(op.dy[tconv_out_offset(g, col / 8, voxel_of(row, g.d, g.h, g.w), col % 8)]);
  }
}

/// Writes C[row][col] (the fp32 accumulation of one split; `split` 0 except for weight gradients).
template <GemmKind K>
TRESOR_HD inline void gemm_store(const ConvGeom& g, const GemmDims& dm, const GemmOperands& op, uint32_t row, uint32_t col, uint32_t split, float acc) {
  if constexpr (K == GemmKind::kConvForward) {
    const Voxel o = voxel_of(col, g.od, g.oh, g.ow);
    op.out[nc_offset(o.b, g.cout, row, out_voxels(g)) + (uint64_t{o.z} * g.oh + o.y) * g.ow + o.x] = acc + op.bias[row];
  } else if constexpr (K == GemmKind::kConvBackwardData || K == GemmKind::kTconvBackwardData) {
    const Voxel i = voxel_of(col, g.d, g.h, g.w);
    op.out[nc_offset(i.b, g.cin, row, in_voxels(g)) + (uint64_t{i.z} * g.h + i.y) * g.w + i.x] = acc;
  } else if constexpr (K == GemmKind::kTconvForward) {
    op.out[tconv_out_offset(g, row / 8, voxel_of(col, g.d, g.h, g.w), row % 8)] = acc + op.bias[row / 8];
  } else {  // weight gradients: partials[split][row][col]
    op.out[(uint64_t{split} * dm.m + row) * dm.n + col] = acc;
  }
}

/// The split-K partials of element i summed in split order, added into the gradient (which the
/// reference accumulates over calls): dweight[i] += Σ_s partial[s][i].
TRESOR_HD inline void splitk_accumulate(const float* partials, uint32_t splits, uint64_t mn, uint64_t i, float* dweight) {
  float s = 0.0f;
  for (uint32_t k = 0; k < splits; ++k) s += partials[uint64_t{k} * mn + i];
  dweight[i] += s;
}

// ---------------------------------------------------------------------------------------------
// Fixed-order reductions: thread t of kReduceThreads sums elements t, t + kReduceThreads, … in
// order (double); then a pairwise tree: at each level s = 128, 64, …, 1, partial[t] +=
// partial[t + s] for t < s. The device runs each level in parallel (pairs are disjoint), the
// emulation runs reduce_tree; the same additions of the same values.

inline constexpr uint32_t kReduceThreads = 256;

/// The tree over kReduceThreads partials; the sum ends in s[0].
inline void reduce_tree(double* s) {
  for (uint32_t stride = kReduceThreads / 2; stride > 0; stride /= 2)
    for (uint32_t t = 0; t < stride; ++t) s[t] = dadd(s[t], s[t + stride]);
}

/// Thread t's partial of Σ v[i] over one plane of m values.
TRESOR_HD inline double plane_thread_sum(const float* v, uint32_t m, uint32_t t) {
  double s = 0;
  for (uint32_t i = t; i < m; i += kReduceThreads) s = dadd(s, static_cast<double>(v[i]));
  return s;
}
/// Thread t's partial of the bias gradient of channel c: Σ over samples b, voxels i of dy.
TRESOR_HD inline double channel_thread_sum(const float* dy, uint32_t n, uint32_t channels, uint32_t c, uint32_t m, uint32_t t) {
  double s = 0;
  for (uint32_t b = 0; b < n; ++b) s = dadd(s, plane_thread_sum(dy + nc_offset(b, channels, c, m), m, t));
  return s;
}

// ---------------------------------------------------------------------------------------------
// Instance norm + leaky ReLU (InstanceNormLeakyRelu in core/train/layers.cc): per (sample,
// channel) plane, the mean and biased variance in double (two passes, as the reference), then per
// voxel the reference's expressions.

struct NormConsts {
  double eps = 1e-5, slope = 0.01;
};

/// Thread t's partial of Σ (v − mean)².
TRESOR_HD inline double plane_thread_sq(const float* v, uint32_t m, uint32_t t, double mean) {
  double q = 0;
  for (uint32_t i = t; i < m; i += kReduceThreads) {
    const double dv = dsub(static_cast<double>(v[i]), mean);
    q = dadd(q, dmul(dv, dv));
  }
  return q;
}
/// 1/√(var + eps) from the sums: mean = s/m, var = q/m.
TRESOR_HD inline double norm_inv_std(double q, uint32_t m, double eps) { return ddiv(1.0, dsqrt(dadd(ddiv(q, static_cast<double>(m)), eps))); }

/// y = lrelu(γ·(x − μ)·inv + β).
TRESOR_HD inline float norm_lrelu_forward(float v, double mean, double inv, float gamma, float beta, double slope) {
  const double z = dadd(dmul(dmul(static_cast<double>(gamma), dsub(static_cast<double>(v), mean)), inv), static_cast<double>(beta));
  return static_cast<float>(z > 0 ? z : dmul(slope, z));
}
/// The leaky ReLU's gradient factor at x̂: z = γ·x̂ + β, 1 above 0, slope else.
TRESOR_HD inline double norm_lrelu_factor(double xhat, float gamma, float beta, double slope) {
  const double z = dadd(dmul(static_cast<double>(gamma), xhat), static_cast<double>(beta));
  return z > 0 ? 1.0 : slope;
}
/// Thread t's partials of Σ dz and Σ dz·x̂ (dz = dy through the leaky ReLU): β's and γ's gradients.
TRESOR_HD inline void plane_thread_grads(const float* v, const float* dy, uint32_t m, uint32_t t, double mean, double inv, float gamma, float beta, double slope,
                                         double* sum_dz, double* sum_dz_xhat) {
  double a = 0, b = 0;
  for (uint32_t i = t; i < m; i += kReduceThreads) {
    const double xhat = dmul(dsub(static_cast<double>(v[i]), mean), inv);
    const double dz = dmul(static_cast<double>(dy[i]), norm_lrelu_factor(xhat, gamma, beta, slope));
    a = dadd(a, dz);
    b = dadd(b, dmul(dz, xhat));
  }
  *sum_dz = a;
  *sum_dz_xhat = b;
}
/// dx = (γ·dz − md − x̂·mdx)·inv with md = γ·Σdz/m, mdx = γ·Σdz·x̂/m.
TRESOR_HD inline float norm_lrelu_backward(float v, float g, double mean, double inv, float gamma, float beta, double slope, double md, double mdx) {
  const double xhat = dmul(dsub(static_cast<double>(v), mean), inv);
  const double dxhat = dmul(dmul(static_cast<double>(gamma), static_cast<double>(g)), norm_lrelu_factor(xhat, gamma, beta, slope));
  return static_cast<float>(dmul(dsub(dsub(dxhat, md), dmul(xhat, mdx)), inv));
}

// ---------------------------------------------------------------------------------------------
// Softmax + cross-entropy + batch soft Dice (dice_ce_loss in core/train/layers.cc).
//
// Sums (the "quantities", double): q = 0 the cross-entropy's Σ −log p_target; q = c (1 ≤ c < C)
// the intersection Σ p_c·g_c; q = C − 1 + c the total Σ p_c + g_c. Per-block partials by the
// fixed tree, then summed over blocks in block order.

inline constexpr uint32_t kMaxClasses = 16;
inline constexpr uint32_t kMaxLossQuantities = 2 * kMaxClasses - 1;
inline constexpr uint32_t kLossMaxBlocks = 256;

struct LossGeom {
  uint32_t n = 0, classes = 0, m = 0;  // logits n×classes×m (m voxels per sample)
};
TRESOR_HD inline uint32_t loss_quantities(const LossGeom& g) { return 2 * g.classes - 1; }
/// Blocks of the partials pass: a function of the shape alone (deterministic).
inline uint32_t loss_blocks(const LossGeom& g) {
  const uint64_t v = uint64_t{g.n} * g.m, b = (v + kReduceThreads - 1) / kReduceThreads;
  return static_cast<uint32_t>(b < 1 ? 1 : (b > kLossMaxBlocks ? kLossMaxBlocks : b));
}

// The class count comes twice: in g, and as `classes`, either a run-time count or
// a compile-time constant (FixedClasses: one instantiation per count, which the kernels and the
// emulation both run, through with_classes), so
// that on the device every per-class loop has a constant trip count and is unrolled, and the
// per-class arrays stay in registers. Indexed at run time they would go to local memory: device
// memory that holds the voxel's probabilities and that no wipe reaches (the build refuses local
// memory in train.cu, kernels/CMakeLists.txt). The arithmetic is the same either way.

/// A class count fixed at compile time (std::integral_constant's conversion is host-only).
template <uint32_t C>
struct FixedClasses {
  static constexpr uint32_t value = C;
  TRESOR_HD constexpr operator uint32_t() const { return C; }  // NOLINT(google-explicit-constructor): stands for the count
};

namespace loss_detail {
template <typename F, uint32_t... C>
bool with_classes(uint32_t classes, F& f, std::integer_sequence<uint32_t, C...>) {
  return ((classes == C + 2 ? (f(FixedClasses<C + 2>{}), true) : false) || ...);
}
}  // namespace loss_detail
/// Host code: calls f(FixedClasses<C>{}) for C = classes, 2 ≤ C ≤ kMaxClasses, and says whether
/// it did. The kernels' launches and the emulation both dispatch through it, so the emulation
/// runs the very instantiations the device runs.
template <typename F>
bool with_classes(uint32_t classes, F&& f) {
  return loss_detail::with_classes(classes, f, std::make_integer_sequence<uint32_t, kMaxClasses - 1>{});
}

/// Softmax of voxel v (v = b·m + s) with the maximum subtracted: p[c], the maximum and log Σ.
template <typename Classes>
TRESOR_HD inline void softmax_voxel(const float* logits, const LossGeom& g, Classes classes, uint64_t v, double* p, double* mx, double* log_z) {
  const uint64_t b = v / g.m, s = v % g.m;
  using std::exp, std::fmax, std::log;
  const float* l = logits + b * classes * uint64_t{g.m} + s;
  double top = -INFINITY;
  TRESOR_UNROLL
  for (uint32_t c = 0; c < classes; ++c) top = fmax(top, static_cast<double>(l[uint64_t{c} * g.m]));
  double z = 0;
  TRESOR_UNROLL
  for (uint32_t c = 0; c < classes; ++c) {
    p[c] = exp(dsub(static_cast<double>(l[uint64_t{c} * g.m]), top));
    z = dadd(z, p[c]);
  }
  TRESOR_UNROLL
  for (uint32_t c = 0; c < classes; ++c) p[c] = ddiv(p[c], z);
  *mx = top;
  *log_z = log(z);
}

/// Thread `first`'s partials over voxels first, first + stride, …: acc[q] (loss_quantities).
template <typename Classes>
TRESOR_HD inline void loss_thread_partials(const float* logits, const uint8_t* target, const LossGeom& g, Classes classes, uint64_t first, uint64_t stride,
                                           double* acc) {
  const uint32_t nq = 2 * classes - 1;
  TRESOR_UNROLL
  for (uint32_t q = 0; q < nq; ++q) acc[q] = 0;
  double p[kMaxClasses];
  const uint64_t voxels = uint64_t{g.n} * g.m;
  for (uint64_t v = first; v < voxels; v += stride) {
    double mx = 0, log_z = 0;
    softmax_voxel(logits, g, classes, v, p, &mx, &log_z);
    const uint32_t t = target[v];
    const uint64_t b = v / g.m, s = v % g.m;
    const double lt = static_cast<double>(logits[(b * classes + t) * g.m + s]);
    acc[0] = dsub(acc[0], dsub(dsub(lt, mx), log_z));
    TRESOR_UNROLL
    for (uint32_t c = 1; c < classes; ++c) {
      const double gc = t == c ? 1.0 : 0.0;
      acc[c] = dadd(acc[c], dmul(p[c], gc));
      acc[classes - 1 + c] = dadd(acc[classes - 1 + c], dadd(p[c], gc));
    }
  }
}

/// The constants of the gradient pass (the device computes the rest from the totals in
/// loss_grad_voxel). `voxels` is the voxel count of the batch the totals were summed over: this
/// call's n·m, or the global batch's when the totals were summed over data-parallel ranks.
/// `scale` multiplies the gradient before it is rounded to float (deep supervision's weight w_j; 1
/// leaves the bits unchanged).
struct LossConsts {
  double smooth = 1e-5, dice_weight = 1.0;
  double voxels = 0, scale = 1.0;
};

/// The logits' gradient at voxel v: CE's (p − onehot)/voxels plus −dice_weight·mean Dice's,
/// −(1/fg)·(2g(S + s) − (2I + s))/(S + s)² per probability, through the softmax's Jacobian; times
/// k.scale.
template <typename Classes>
TRESOR_HD inline void loss_grad_voxel(const float* logits, const uint8_t* target, const LossGeom& g, Classes classes, uint64_t v, const double* totals,
                                      const LossConsts& k, float* dlogits) {
  double p[kMaxClasses], dp[kMaxClasses];
  double mx = 0, log_z = 0;
  softmax_voxel(logits, g, classes, v, p, &mx, &log_z);
  const uint32_t t = target[v];
  const double fg = static_cast<double>(classes - 1), voxels = k.voxels;
  double dot = 0;
  TRESOR_UNROLL
  for (uint32_t c = 0; c < classes; ++c) {
    dp[c] = 0;
    if (c > 0) {
      const double gc = t == c ? 1.0 : 0.0, inter = totals[c], S = dadd(totals[classes - 1 + c], k.smooth);
      const double num = dsub(dmul(dmul(2.0, gc), S), dadd(dmul(2.0, inter), k.smooth));
      dp[c] = ddiv(ddiv(dmul(-k.dice_weight, num), dmul(S, S)), fg);
    }
    dot = dadd(dot, dmul(p[c], dp[c]));
  }
  const uint64_t b = v / g.m, s = v % g.m;
  TRESOR_UNROLL
  for (uint32_t c = 0; c < classes; ++c) {
    const double d_ce = ddiv(dsub(p[c], t == c ? 1.0 : 0.0), voxels);
    dlogits[(b * g.classes + c) * g.m + s] = static_cast<float>(dmul(k.scale, dadd(d_ce, dmul(p[c], dsub(dp[c], dot)))));
  }
}

// ---------------------------------------------------------------------------------------------
// Optimizers, one parameter at a time (Sgd::step, AdamW::step in core/train/layers.cc), the
// reference's double expressions in its order: the same float results to the bit.

struct SgdConsts {
  double lr = 0, momentum = 0.99, weight_decay = 3e-5;
  uint32_t nesterov = 1;
};
/// g += wd·p; v = μ·v + g; p −= lr·(g + μ·v) (Nesterov) or lr·v; returns p's bf16 copy.
TRESOR_HD inline uint16_t sgd_update(float* p, float g, float* v, const SgdConsts& k) {
  const double pd = static_cast<double>(*p);
  const double gi = dadd(static_cast<double>(g), dmul(k.weight_decay, pd));
  const double vi = dadd(dmul(k.momentum, static_cast<double>(*v)), gi);
  *v = static_cast<float>(vi);
  *p = static_cast<float>(dsub(pd, dmul(k.lr, k.nesterov != 0 ? dadd(gi, dmul(k.momentum, vi)) : vi)));
  return bf16_bits(*p);
}

/// The host computes decay = 1 − lr·wd, one_minus_b1/b2 and the bias corrections c1 = 1 − β1^t,
/// c2 = 1 − β2^t with the reference's expressions.
struct AdamWConsts {
  double lr = 0, beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  double decay = 1, one_minus_b1 = 0.1, one_minus_b2 = 0.001, c1 = 1, c2 = 1;
};
/// p ·= 1 − lr·wd; m = β1·m + (1−β1)·g; v = β2·v + (1−β2)·g²; p −= lr·(m/c1)/(√(v/c2) + eps).
TRESOR_HD inline uint16_t adamw_update(float* p, float g, float* m, float* v, const AdamWConsts& k) {
  const double gd = static_cast<double>(g);
  double pi = dmul(static_cast<double>(*p), k.decay);
  const double mi = dadd(dmul(k.beta1, static_cast<double>(*m)), dmul(k.one_minus_b1, gd));
  const double vi = dadd(dmul(k.beta2, static_cast<double>(*v)), dmul(dmul(k.one_minus_b2, gd), gd));
  *m = static_cast<float>(mi);
  *v = static_cast<float>(vi);
  pi = dsub(pi, ddiv(dmul(k.lr, ddiv(mi, k.c1)), dadd(dsqrt(ddiv(vi, k.c2)), k.eps)));
  *p = static_cast<float>(pi);
  return bf16_bits(*p);
}

// ---------------------------------------------------------------------------------------------
// Deep supervision's targets at 1/f of the resolution (f = 2^j), nearest-exact as
// tresor::train::downsample_target: output voxel (b, z, y, x) of an n × (d/f) × (h/f) × (w/f)
// volume takes source (b, z·f + f/2, y·f + f/2, x·f + f/2) of the n × d × h × w one.
TRESOR_HD inline uint64_t downsample_source(uint64_t i, uint64_t d, uint64_t h, uint64_t w, uint64_t f) {
  const uint64_t ow = w / f, oh = h / f, od = d / f, half = f / 2;
  const uint64_t x = i % ow, y = (i / ow) % oh, z = (i / (ow * oh)) % od, b = i / (ow * oh * od);
  return ((b * d + z * f + half) * h + y * f + half) * w + x * f + half;
}

}  // namespace tresor::gpu::train
