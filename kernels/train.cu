// The 3D U-Net training kernels (include/tresor/gpu/train.h; per-element arithmetic in
// kernels/train.cuh) and their launches on a stream. Every launch is checked and reported
// through CudaStatus (no exceptions or exit() across this boundary).
//
// NOT RUN on the machine these were written on (no GPU there): they compile for sm_80 and sm_90
// and are checked by reading; tests/kernels/train_gpu_test.cc compares them with the CPU
// reference where a device exists (scripts/gpu-check requires one). Everything but the CUDA
// mechanics below (tiles, shared memory, WMMA fragments, the parallel tree) is the code the
// emulation runs on every machine.
//
//  - gemm_kernel<kind>: implicit GEMM on the tensor cores. A block computes a 64×64 tile of C
//    with four warps of 32×32 (2×2 WMMA 16×16×16 bf16 fragments, fp32 accumulators). Per k-step
//    the block gathers the 64×16 A tile and the 16×64 B tile through gemm_a/gemm_b (bf16-rounded,
//    zero padding) into shared memory, then each warp runs its four mma_sync. The tile of C goes
//    through shared memory to gemm_store, so the scatter to NCDHW (and the bias) is plain code.
//    WMMA rules followed (CUDA C++ Programming Guide, "Warp Matrix Functions"): bf16 fragments
//    need sm_80; load/store pointers 256-bit aligned; ldm a multiple of 8 elements for 16-bit
//    types and of 4 for float. Not tuned: the gather recomputes index arithmetic per element and
//    the backward-data pass of a stride-2 convolution multiplies the zeros of the dilated output
//    gradient (7/8 of its K for k = 3).
//  - weight gradients: split-K into per-split partials (a function of the shape only), summed in
//    split order by gemm_splitk_kernel: no atomics, the same result on every run.
//  - reductions (bias gradient, instance-norm statistics, loss sums): one block of kReduceThreads
//    per plane or channel, strided per-thread partials, a fixed pairwise tree in shared memory,
//    double throughout; deterministic, and equal to the emulation's to the bit except where the
//    loss's exp/log (CUDA's, not glibc's) enter.
//  - the U-Net's glue (kernels/unet_gpu.cc): add_kernel (a skip connection's gradient added into
//    the encoder's) and cudaMemsetAsync for the gradient before a backward pass.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <cstdio>
#include <type_traits>
#include <utility>

#include "cuda_util.cuh"
#include "train_kernels.h"

namespace tresor::gpu::train::detail {
namespace {

using tresor::gpu::detail::status;
using tresor::gpu::detail::blocks_for;

constexpr uint32_t kLdA = kTileK + 8;  // bf16 per shared row of A (a multiple of 8; the pad spreads banks)
constexpr uint32_t kLdB = kTileN + 8;  // bf16 per shared row of B
constexpr uint32_t kLdC = kTileN + 4;  // floats per shared row of C (a multiple of 4)
static_assert(kTileM == 64 && kTileN == 64 && kTileK == 16 && kGemmThreads == 128, "gemm_kernel's warp layout assumes 4 warps of 32×32");
// Fragment offsets stay 32-byte aligned: rows of A at multiples of 16·kLdA·2 bytes, columns of B
// and C at multiples of 16 elements, rows of C at multiples of 16·kLdC·4 bytes.
static_assert((16 * kLdA * 2) % 32 == 0 && (16 * 2) % 32 == 0 && (16 * kLdC * 4) % 32 == 0 && (16 * 4) % 32 == 0, "WMMA pointers must be 256-bit aligned");

__device__ inline __nv_bfloat16 to_bf16(float v) {
  __nv_bfloat16_raw r;
  r.x = bf16_bits(v);  // v already holds a bf16 value: exact
  return __nv_bfloat16(r);
}

template <GemmKind K>
__global__ void __launch_bounds__(kGemmThreads) gemm_kernel(ConvGeom g, GemmDims dm, GemmOperands op) {
  using namespace nvcuda;
  __shared__ __align__(32) __nv_bfloat16 sa[kTileM * kLdA];
  __shared__ __align__(32) __nv_bfloat16 sb[kTileK * kLdB];
  __shared__ __align__(32) float sc[kTileM * kLdC];
  const uint32_t row0 = blockIdx.y * kTileM, col0 = blockIdx.x * kTileN, split = blockIdx.z;
  const uint32_t k0 = split * dm.chunk, k1 = min(dm.k, k0 + dm.chunk);
  const uint32_t warp = threadIdx.x / 32, wm = warp / 2, wn = warp % 2;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

  for (uint32_t kt = k0; kt < k1; kt += kTileK) {
    for (uint32_t e = threadIdx.x; e < kTileM * kTileK; e += kGemmThreads) {
      const uint32_t r = e / kTileK, c = e % kTileK, gr = row0 + r, gc = kt + c;
      sa[r * kLdA + c] = to_bf16(gr < dm.m && gc < k1 ? gemm_a<K>(g, op, gr, gc) : 0.0f);
    }
    for (uint32_t e = threadIdx.x; e < kTileK * kTileN; e += kGemmThreads) {
      const uint32_t r = e / kTileN, c = e % kTileN, gr = kt + r, gc = col0 + c;
      sb[r * kLdB + c] = to_bf16(gr < k1 && gc < dm.n ? gemm_b<K>(g, op, gr, gc) : 0.0f);
    }
    __syncthreads();
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa[2];
    wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> fb[2];
    for (uint32_t i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], sa + (wm * 32 + i * 16) * kLdA, kLdA);
    for (uint32_t j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], sb + wn * 32 + j * 16, kLdB);
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    __syncthreads();  // the tiles are consumed before the next k-step overwrites them
  }
  for (uint32_t i = 0; i < 2; ++i)
    for (uint32_t j = 0; j < 2; ++j) wmma::store_matrix_sync(sc + (wm * 32 + i * 16) * kLdC + wn * 32 + j * 16, acc[i][j], kLdC, wmma::mem_row_major);
  __syncthreads();
  for (uint32_t e = threadIdx.x; e < kTileM * kTileN; e += kGemmThreads) {
    const uint32_t r = e / kTileN, c = e % kTileN, gr = row0 + r, gc = col0 + c;
    if (gr < dm.m && gc < dm.n) gemm_store<K>(g, dm, op, gr, gc, split, sc[r * kLdC + c]);
  }
}

__global__ void __launch_bounds__(256) gemm_splitk_kernel(const float* __restrict__ d_partials, uint32_t splits, uint64_t mn, float* __restrict__ d_dweight) {
  for (uint64_t i = uint64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < mn; i += uint64_t{gridDim.x} * blockDim.x) splitk_accumulate(d_partials, splits, mn, i, d_dweight);
}

// The fixed tree over the block's kReduceThreads values (blockDim.x == kReduceThreads); every
// thread gets the sum. The same pairs as reduce_tree (train.cuh), level by level.
__device__ double block_tree(double* s, double v) {
  const uint32_t t = threadIdx.x;
  s[t] = v;
  __syncthreads();
  for (uint32_t stride = kReduceThreads / 2; stride > 0; stride /= 2) {
    if (t < stride) s[t] = dadd(s[t], s[t + stride]);
    __syncthreads();
  }
  const double r = s[0];
  __syncthreads();  // s may be reused at once
  return r;
}

__global__ void __launch_bounds__(kReduceThreads) bias_grad_kernel(const float* __restrict__ d_dy, uint32_t n, uint32_t channels, uint32_t m, float* __restrict__ d_dbias) {
  __shared__ double s[kReduceThreads];
  const uint32_t c = blockIdx.x;
  const double sum = block_tree(s, channel_thread_sum(d_dy, n, channels, c, m, threadIdx.x));
  if (threadIdx.x == 0) d_dbias[c] += static_cast<float>(sum);
}

__global__ void __launch_bounds__(kReduceThreads) norm_forward_kernel(const float* __restrict__ d_x, uint32_t channels, uint32_t m, const float* __restrict__ d_gamma,
                                                                      const float* __restrict__ d_beta, NormConsts k, float* __restrict__ d_y) {
  __shared__ double s[kReduceThreads];
  const uint32_t p = blockIdx.x, c = p % channels, t = threadIdx.x;
  const float* v = d_x + uint64_t{p} * m;
  const double mean = ddiv(block_tree(s, plane_thread_sum(v, m, t)), static_cast<double>(m));
  const double inv = norm_inv_std(block_tree(s, plane_thread_sq(v, m, t, mean)), m, k.eps);
  float* y = d_y + uint64_t{p} * m;
  for (uint32_t i = t; i < m; i += kReduceThreads) y[i] = norm_lrelu_forward(v[i], mean, inv, d_gamma[c], d_beta[c], k.slope);
}

__global__ void __launch_bounds__(kReduceThreads) norm_backward_kernel(const float* __restrict__ d_x, const float* __restrict__ d_dy, uint32_t planes, uint32_t channels,
                                                                       uint32_t m, const float* __restrict__ d_gamma, const float* __restrict__ d_beta, NormConsts k,
                                                                       float* __restrict__ d_dx, double* __restrict__ d_plane_sums) {
  __shared__ double s[kReduceThreads];
  const uint32_t p = blockIdx.x, c = p % channels, t = threadIdx.x;
  const float* v = d_x + uint64_t{p} * m;
  const float* g = d_dy + uint64_t{p} * m;
  const double mean = ddiv(block_tree(s, plane_thread_sum(v, m, t)), static_cast<double>(m));
  const double inv = norm_inv_std(block_tree(s, plane_thread_sq(v, m, t, mean)), m, k.eps);
  double a = 0, b = 0;
  plane_thread_grads(v, g, m, t, mean, inv, d_gamma[c], d_beta[c], k.slope, &a, &b);
  const double sum_dz = block_tree(s, a), sum_dz_xhat = block_tree(s, b);
  const double gamma = static_cast<double>(d_gamma[c]);
  const double md = ddiv(dmul(gamma, sum_dz), static_cast<double>(m)), mdx = ddiv(dmul(gamma, sum_dz_xhat), static_cast<double>(m));
  float* dx = d_dx + uint64_t{p} * m;
  for (uint32_t i = t; i < m; i += kReduceThreads) dx[i] = norm_lrelu_backward(v[i], g[i], mean, inv, d_gamma[c], d_beta[c], k.slope, md, mdx);
  if (t == 0) {
    d_plane_sums[p] = sum_dz_xhat;
    d_plane_sums[planes + p] = sum_dz;
  }
}

// γ's and β's gradients per channel: the planes' sums added in sample order, as the reference.
__global__ void norm_params_kernel(const double* __restrict__ d_plane_sums, uint32_t planes, uint32_t channels, float* __restrict__ d_dgamma, float* __restrict__ d_dbeta) {
  const uint32_t c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= channels) return;
  for (uint32_t p = c; p < planes; p += channels) {
    d_dgamma[c] += static_cast<float>(d_plane_sums[p]);
    d_dbeta[c] += static_cast<float>(d_plane_sums[planes + p]);
  }
}

// The loss kernels are instantiated for each class count (train.cuh: constant trip counts keep the
// per-class arrays in registers); the launches pick the instantiation.
template <uint32_t C>
__global__ void __launch_bounds__(kReduceThreads) loss_partials_kernel(const float* __restrict__ d_logits, const uint8_t* __restrict__ d_target, LossGeom g,
                                                                       double* __restrict__ d_partials) {
  __shared__ double s[kReduceThreads];
  double acc[kMaxLossQuantities];
  loss_thread_partials(d_logits, d_target, g, FixedClasses<C>{}, uint64_t{blockIdx.x} * kReduceThreads + threadIdx.x,
                       uint64_t{gridDim.x} * kReduceThreads, acc);
  constexpr uint32_t nq = 2 * C - 1;
#pragma unroll
  for (uint32_t q = 0; q < nq; ++q) {
    const double r = block_tree(s, acc[q]);
    if (threadIdx.x == 0) d_partials[uint64_t{blockIdx.x} * nq + q] = r;
  }
}

__global__ void loss_totals_kernel(const double* __restrict__ d_partials, uint32_t blocks, uint32_t nq, double* __restrict__ d_totals) {
  const uint32_t q = threadIdx.x;
  if (q >= nq) return;
  double s = 0;
  for (uint32_t b = 0; b < blocks; ++b) s = dadd(s, d_partials[uint64_t{b} * nq + q]);
  d_totals[q] = s;
}

template <uint32_t C>
__global__ void __launch_bounds__(256) loss_grad_kernel(const float* __restrict__ d_logits, const uint8_t* __restrict__ d_target, LossGeom g,
                                                        const double* __restrict__ d_totals, LossConsts k, float* __restrict__ d_dlogits) {
  const uint64_t voxels = uint64_t{g.n} * g.m;
  for (uint64_t v = uint64_t{blockIdx.x} * blockDim.x + threadIdx.x; v < voxels; v += uint64_t{gridDim.x} * blockDim.x) {
    loss_grad_voxel(d_logits, d_target, g, FixedClasses<C>{}, v, d_totals, k, d_dlogits);
  }
}

__global__ void __launch_bounds__(256) add_kernel(uint64_t count, const float* __restrict__ d_x, float* __restrict__ d_y) {
  for (uint64_t i = uint64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < count; i += uint64_t{gridDim.x} * blockDim.x) d_y[i] += d_x[i];
}

__global__ void __launch_bounds__(256) downsample_kernel(uint64_t count, uint64_t d, uint64_t h, uint64_t w, uint64_t f, const uint8_t* __restrict__ d_in,
                                                         uint8_t* __restrict__ d_out) {
  for (uint64_t i = uint64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < count; i += uint64_t{gridDim.x} * blockDim.x) d_out[i] = d_in[downsample_source(i, d, h, w, f)];
}

__global__ void __launch_bounds__(256) sgd_kernel(uint64_t count, float* __restrict__ d_params, const float* __restrict__ d_grads, float* __restrict__ d_velocity,
                                                  uint16_t* __restrict__ d_bf16, SgdConsts k) {
  for (uint64_t i = uint64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < count; i += uint64_t{gridDim.x} * blockDim.x) {
    float p = d_params[i], v = d_velocity[i];
    const uint16_t b = sgd_update(&p, d_grads[i], &v, k);
    d_params[i] = p;
    d_velocity[i] = v;
    if (d_bf16 != nullptr) d_bf16[i] = b;
  }
}

__global__ void __launch_bounds__(256) adamw_kernel(uint64_t count, float* __restrict__ d_params, const float* __restrict__ d_grads, float* __restrict__ d_m,
                                                    float* __restrict__ d_v, uint16_t* __restrict__ d_bf16, AdamWConsts k) {
  for (uint64_t i = uint64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < count; i += uint64_t{gridDim.x} * blockDim.x) {
    float p = d_params[i], m = d_m[i], v = d_v[i];
    const uint16_t b = adamw_update(&p, d_grads[i], &m, &v, k);
    d_params[i] = p;
    d_m[i] = m;
    d_v[i] = v;
    if (d_bf16 != nullptr) d_bf16[i] = b;
  }
}

template <GemmKind K>
CudaStatus gemm_run(cudaStream_t s, const ConvGeom& g, const GemmDims& dm, const GemmOperands& op) {
  const dim3 grid((dm.n + kTileN - 1) / kTileN, (dm.m + kTileM - 1) / kTileM, dm.splits);
  if (grid.y > 65535 || grid.z > 65535) return status("gemm_launch: more than 65535 row tiles or splits", cudaErrorInvalidValue);
  gemm_kernel<K><<<grid, kGemmThreads, 0, s>>>(g, dm, op);
  return status("gemm_kernel launch (or an earlier kernel's fault)", cudaGetLastError());
}

}  // namespace

CudaStatus gemm_launch(void* stream, GemmKind kind, const ConvGeom& g, const GemmDims& dims, const GemmOperands& op) {
  (void)cudaGetLastError();  // an earlier, unrelated failure must not be reported as this launch's
  const auto s = static_cast<cudaStream_t>(stream);
  switch (kind) {
    case GemmKind::kConvForward: return gemm_run<GemmKind::kConvForward>(s, g, dims, op);
    case GemmKind::kConvBackwardData: return gemm_run<GemmKind::kConvBackwardData>(s, g, dims, op);
    case GemmKind::kConvBackwardWeight: return gemm_run<GemmKind::kConvBackwardWeight>(s, g, dims, op);
    case GemmKind::kTconvForward: return gemm_run<GemmKind::kTconvForward>(s, g, dims, op);
    case GemmKind::kTconvBackwardData: return gemm_run<GemmKind::kTconvBackwardData>(s, g, dims, op);
    case GemmKind::kTconvBackwardWeight: return gemm_run<GemmKind::kTconvBackwardWeight>(s, g, dims, op);
  }
  return status("gemm_launch: unknown pass", cudaErrorInvalidValue);
}

CudaStatus gemm_splitk_launch(void* stream, const float* d_partials, uint32_t splits, uint64_t mn, float* d_dweight) {
  (void)cudaGetLastError();
  gemm_splitk_kernel<<<blocks_for(mn, 256), 256, 0, static_cast<cudaStream_t>(stream)>>>(d_partials, splits, mn, d_dweight);
  return status("gemm_splitk_kernel launch (or an earlier kernel's fault)", cudaGetLastError());
}

CudaStatus bias_grad_launch(void* stream, const float* d_dy, uint32_t n, uint32_t channels, uint32_t m, float* d_dbias) {
  (void)cudaGetLastError();
  bias_grad_kernel<<<channels, kReduceThreads, 0, static_cast<cudaStream_t>(stream)>>>(d_dy, n, channels, m, d_dbias);
  return status("bias_grad_kernel launch (or an earlier kernel's fault)", cudaGetLastError());
}

CudaStatus norm_forward_launch(void* stream, const float* d_x, uint32_t planes, uint32_t channels, uint32_t m, const float* d_gamma, const float* d_beta,
                               NormConsts k, float* d_y) {
  (void)cudaGetLastError();
  norm_forward_kernel<<<planes, kReduceThreads, 0, static_cast<cudaStream_t>(stream)>>>(d_x, channels, m, d_gamma, d_beta, k, d_y);
  return status("norm_forward_kernel launch (or an earlier kernel's fault)", cudaGetLastError());
}

CudaStatus norm_backward_launch(void* stream, const float* d_x, const float* d_dy, uint32_t planes, uint32_t channels, uint32_t m, const float* d_gamma,
                                const float* d_beta, NormConsts k, float* d_dx, double* d_plane_sums, float* d_dgamma, float* d_dbeta) {
  (void)cudaGetLastError();
  const auto s = static_cast<cudaStream_t>(stream);
  norm_backward_kernel<<<planes, kReduceThreads, 0, s>>>(d_x, d_dy, planes, channels, m, d_gamma, d_beta, k, d_dx, d_plane_sums);
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return status("norm_backward_kernel launch (or an earlier kernel's fault)", e);
  norm_params_kernel<<<(channels + 127) / 128, 128, 0, s>>>(d_plane_sums, planes, channels, d_dgamma, d_dbeta);
  return status("norm_params_kernel launch", cudaGetLastError());
}

CudaStatus loss_stats_launch(void* stream, const float* d_logits, const uint8_t* d_target, const LossGeom& g, double* d_partials, double* d_totals) {
  (void)cudaGetLastError();
  const auto s = static_cast<cudaStream_t>(stream);
  const uint32_t blocks = loss_blocks(g), nq = loss_quantities(g);
  if (!with_classes(g.classes, [&](auto c) { loss_partials_kernel<decltype(c)::value><<<blocks, kReduceThreads, 0, s>>>(d_logits, d_target, g, d_partials); })) {
    return status("loss_partials_kernel: a class count the kernels are not built for", cudaErrorInvalidValue);
  }
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return status("loss_partials_kernel launch (or an earlier kernel's fault)", e);
  loss_totals_kernel<<<1, 32, 0, s>>>(d_partials, blocks, nq, d_totals);
  return status("loss_totals_kernel launch", cudaGetLastError());
}

CudaStatus loss_grad_launch(void* stream, const float* d_logits, const uint8_t* d_target, const LossGeom& g, LossConsts k, const double* d_totals, float* d_dlogits) {
  (void)cudaGetLastError();
  if (!with_classes(g.classes, [&](auto c) {
        loss_grad_kernel<decltype(c)::value><<<blocks_for(uint64_t{g.n} * g.m, 256), 256, 0, static_cast<cudaStream_t>(stream)>>>(d_logits, d_target, g,
                                                                                                                               d_totals, k, d_dlogits);
      })) {
    return status("loss_grad_kernel: a class count the kernels are not built for", cudaErrorInvalidValue);
  }
  return status("loss_grad_kernel launch (or an earlier kernel's fault)", cudaGetLastError());
}

CudaStatus loss_launch(void* stream, const float* d_logits, const uint8_t* d_target, const LossGeom& g, LossConsts k, double* d_partials, double* d_totals,
                       float* d_dlogits) {
  const CudaStatus st = loss_stats_launch(stream, d_logits, d_target, g, d_partials, d_totals);
  if (st.code != 0) return st;
  return loss_grad_launch(stream, d_logits, d_target, g, k, d_totals, d_dlogits);
}

CudaStatus sgd_launch(void* stream, uint64_t count, float* d_params, const float* d_grads, float* d_velocity, uint16_t* d_bf16, SgdConsts k) {
  (void)cudaGetLastError();
  if (count == 0) return {};
  sgd_kernel<<<blocks_for(count, 256), 256, 0, static_cast<cudaStream_t>(stream)>>>(count, d_params, d_grads, d_velocity, d_bf16, k);
  return status("sgd_kernel launch (or an earlier kernel's fault)", cudaGetLastError());
}

CudaStatus adamw_launch(void* stream, uint64_t count, float* d_params, const float* d_grads, float* d_m, float* d_v, uint16_t* d_bf16, AdamWConsts k) {
  (void)cudaGetLastError();
  if (count == 0) return {};
  adamw_kernel<<<blocks_for(count, 256), 256, 0, static_cast<cudaStream_t>(stream)>>>(count, d_params, d_grads, d_m, d_v, d_bf16, k);
  return status("adamw_kernel launch (or an earlier kernel's fault)", cudaGetLastError());
}

CudaStatus add_launch(void* stream, uint64_t count, const float* d_x, float* d_y) {
  (void)cudaGetLastError();
  if (count == 0) return {};
  add_kernel<<<blocks_for(count, 256), 256, 0, static_cast<cudaStream_t>(stream)>>>(count, d_x, d_y);
  return status("add_kernel launch (or an earlier kernel's fault)", cudaGetLastError());
}

CudaStatus downsample_launch(void* stream, uint64_t n, uint64_t d, uint64_t h, uint64_t w, uint64_t f, const uint8_t* d_in, uint8_t* d_out) {
  (void)cudaGetLastError();
  const uint64_t count = n * (d / f) * (h / f) * (w / f);
  if (count == 0) return {};
  downsample_kernel<<<blocks_for(count, 256), 256, 0, static_cast<cudaStream_t>(stream)>>>(count, d, h, w, f, d_in, d_out);
  return status("downsample_kernel launch (or an earlier kernel's fault)", cudaGetLastError());
}

CudaStatus zero_launch(void* stream, void* d_p, uint64_t bytes) {
  if (bytes == 0) return {};
  return status("cudaMemsetAsync", cudaMemsetAsync(d_p, 0, bytes, static_cast<cudaStream_t>(stream)));
}

}  // namespace tresor::gpu::train::detail
