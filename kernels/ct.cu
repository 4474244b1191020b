// The CT preprocessing kernels (include/tresor/gpu/ct.h; per-voxel arithmetic in kernels/ct.cuh)
// and their launches on a stream. Every launch is checked and reported through CudaStatus (no
// exceptions or exit() across this boundary).
//
// Stages and why they look as they do:
//  - histogram: the nnU-Net statistics need exact order statistics of the foreground's int16
//    values; a 65536-bin histogram gives them without sorting. Each block counts into a
//    shared-memory window of kHistSharedBins bins starting at the threshold (where CT's
//    foreground lives: −499..7692 HU for the default threshold), values above it go straight to
//    the global bins; 16-byte loads when the input is aligned.
//  - resample: one thread per output voxel, the host's per-axis coordinate tables, both outputs
//    (z-scored image and [0, 1] window) from one trilinear sample: one pass over memory.
//  - Gaussian: x through a shared-memory tile of the row (taps in shared memory too), y and z
//    with coalesced rows straight from global memory; double accumulation, float storage.
//  - Frangi: one thread per voxel, the Hessian and its eigenvalues in double, the running max.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>

#include "cuda_util.cuh"
#include "ct_kernels.h"

namespace tresor::gpu::ct::detail {
namespace {

using tresor::gpu::detail::status;
using tresor::gpu::detail::blocks_for;

__host__ __device__ uint32_t voxels(const Grid& g) { return g.nx * g.ny * g.nz; }  // <= 2^31: the host checks

__global__ void __launch_bounds__(kThreads) ct_histogram_kernel(const int16_t* __restrict__ d_hu, uint64_t n, int threshold,
                                                                 unsigned long long* __restrict__ d_hist) {
  __shared__ uint32_t bins[kHistSharedBins];
  for (int i = static_cast<int>(threadIdx.x); i < kHistSharedBins; i += static_cast<int>(blockDim.x)) bins[i] = 0;
  __syncthreads();
  auto count = [&](int v) {
    const int b = v - threshold;
    if (b < 0) return;
    if (b < kHistSharedBins) {
      atomicAdd(&bins[b], 1u);
    } else {
      atomicAdd(&d_hist[v + kHistOffset], 1ull);
    }
  };
  const uint64_t stride = uint64_t{gridDim.x} * blockDim.x;
  const uint64_t first = uint64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if ((reinterpret_cast<uintptr_t>(d_hu) & 15u) == 0) {
    const uint64_t n8 = n / 8;
    const uint4* v8 = reinterpret_cast<const uint4*>(d_hu);
    for (uint64_t i = first; i < n8; i += stride) {
      const uint4 q = __ldg(v8 + i);
      const uint32_t w[4] = {q.x, q.y, q.z, q.w};
      for (int k = 0; k < 4; ++k) {
        count(static_cast<int16_t>(static_cast<uint16_t>(w[k] & 0xffffu)));
        count(static_cast<int16_t>(static_cast<uint16_t>(w[k] >> 16)));
      }
    }
    for (uint64_t i = n8 * 8 + first; i < n; i += stride) count(d_hu[i]);
  } else {
    for (uint64_t i = first; i < n; i += stride) count(d_hu[i]);
  }
  __syncthreads();
  for (int i = static_cast<int>(threadIdx.x); i < kHistSharedBins; i += static_cast<int>(blockDim.x)) {
    const uint32_t c = bins[i];
    if (c != 0) atomicAdd(&d_hist[threshold + i + kHistOffset], static_cast<unsigned long long>(c));
  }
}

__global__ void __launch_bounds__(kThreads) ct_resample_kernel(const int16_t* __restrict__ d_hu, FusedParams p, Grid g,
                                                                const LerpTap* __restrict__ d_lerp, float* __restrict__ d_image,
                                                                float* __restrict__ d_window) {
  const uint32_t n = voxels(g);
  for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    const uint32_t row = i / g.nx, x = i - row * g.nx, z = row / g.ny, y = row - z * g.ny;
    const float iso = lerp_voxel(d_hu, p.in_nx, p.in_ny, d_lerp[x], d_lerp[g.nx + y], d_lerp[g.nx + g.ny + z]);
    d_image[i] = z_score(iso, p);
    d_window[i] = window_value(iso, p);
  }
}

__global__ void __launch_bounds__(kThreads) ct_labels_kernel(const uint8_t* __restrict__ d_in, uint64_t in_nx, uint64_t in_ny, Grid g,
                                                              const uint64_t* __restrict__ d_nearest, uint8_t* __restrict__ d_out) {
  const uint32_t n = voxels(g);
  for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    const uint32_t row = i / g.nx, x = i - row * g.nx, z = row / g.ny, y = row - z * g.ny;
    d_out[i] = d_in[d_nearest[x] + in_nx * (d_nearest[g.nx + y] + in_ny * d_nearest[g.nx + g.ny + z])];
  }
}

// Along x: block (row, tile) loads the tile's kGaussTile + 2r source samples (mirrored at the
// ends) into shared memory once, then each thread sums its 2r + 1 taps from there.
__global__ void __launch_bounds__(kGaussTile) ct_gauss_x_kernel(const float* __restrict__ src, float* __restrict__ dst, Grid g,
                                                                 const double* __restrict__ d_taps, int r) {
  extern __shared__ double smem[];  // taps (2r + 1 doubles), then the tile (kGaussTile + 2r floats)
  const int taps_n = 2 * r + 1;
  double* taps = smem;
  float* tile = reinterpret_cast<float*>(smem + taps_n);
  for (int t = static_cast<int>(threadIdx.x); t < taps_n; t += static_cast<int>(blockDim.x)) taps[t] = d_taps[t];
  const uint64_t rows = uint64_t{g.ny} * g.nz;
  const int64_t nx = g.nx;
  const int64_t x0 = int64_t{blockIdx.y} * kGaussTile;
  const int tid = static_cast<int>(threadIdx.x);
  for (uint64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const float* in = src + row * static_cast<uint64_t>(nx);
    __syncthreads();  // the previous row's tile is consumed
    for (int i = tid; i < kGaussTile + 2 * r; i += static_cast<int>(blockDim.x)) {
      const int64_t gx = x0 - r + i;
      tile[i] = in[gx >= 0 && gx < nx ? gx : reflect_index(gx, nx)];
    }
    __syncthreads();
    const int64_t x = x0 + tid;
    if (x < nx) {
      double acc = 0;
      for (int t = 0; t < taps_n; ++t) acc = dadd(acc, dmul(taps[t], static_cast<double>(tile[tid + t])));  // as convolve_at
      dst[row * static_cast<uint64_t>(nx) + static_cast<uint64_t>(x)] = static_cast<float>(acc);
    }
  }
}

// Along y (axis 1) or z (axis 2): a warp reads whole rows of x at each tap, coalesced.
__global__ void __launch_bounds__(kThreads) ct_gauss_yz_kernel(const float* __restrict__ src, float* __restrict__ dst, Grid g, int axis,
                                                                const double* __restrict__ d_taps, int r) {
  extern __shared__ double taps[];
  for (int t = static_cast<int>(threadIdx.x); t < 2 * r + 1; t += static_cast<int>(blockDim.x)) taps[t] = d_taps[t];
  __syncthreads();
  const uint32_t n = voxels(g), plane = g.nx * g.ny;
  for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    uint32_t c, stride, len;
    if (axis == 1) {
      const uint32_t row = i / g.nx;
      c = row % g.ny;
      stride = g.nx;
      len = g.ny;
    } else {
      c = i / plane;
      stride = plane;
      len = g.nz;
    }
    dst[i] = convolve_at(src, i - c * stride, stride, c, len, taps, r);
  }
}

__global__ void __launch_bounds__(kThreads) ct_frangi_kernel(const float* __restrict__ d_smooth, Grid g, double s2, double ta, double tb,
                                                              double tg, int first, float* __restrict__ d_out) {
  const uint32_t n = voxels(g);
  for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    const uint32_t row = i / g.nx, x = i - row * g.nx, z = row / g.ny, y = row - z * g.ny;
    double h[6];
    hessian_at(d_smooth, g, x, y, z, h);
    const float r = frangi_at(h, s2, ta, tb, tg);
    d_out[i] = running_max(first != 0 ? 0.0f : d_out[i], r);
  }
}

// NIfTI voxels as stored (any supported type, either byte order, any alignment) → HU or labels,
// by tresor/ct/nifti_hd.h: the CPU reader's own per-voxel code. A bad label raises *d_bad.
__global__ void __launch_bounds__(kThreads) ct_decode_kernel(const unsigned char* __restrict__ d_src, uint64_t n, tresor::ct::nifti_hd::Decode d,
                                                              int16_t* __restrict__ d_hu, uint8_t* __restrict__ d_labels, uint32_t* __restrict__ d_bad) {
  bool bad = false;
  for (uint64_t i = uint64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < n; i += uint64_t{gridDim.x} * blockDim.x) {
    const double stored = tresor::ct::nifti_hd::stored_value(d_src, i, d);
    if (d_hu != nullptr) {
      d_hu[i] = tresor::ct::nifti_hd::hu_value(stored, d);
    } else {
      uint8_t v = 0;
      bad = !tresor::ct::nifti_hd::label_value(stored, &v) || bad;
      d_labels[i] = v;
    }
  }
  if (bad) atomicOr(d_bad, 1u);
}

}  // namespace

CudaStatus ct_histogram_launch(void* stream, const int16_t* d_hu, uint64_t n, int threshold, uint64_t* d_hist) {
  (void)cudaGetLastError();  // an earlier, unrelated failure must not be reported as this launch's
  const auto s = static_cast<cudaStream_t>(stream);
  cudaError_t e = cudaMemsetAsync(d_hist, 0, sizeof(uint64_t) * kHistBins, s);
  if (e != cudaSuccess) return status("cudaMemsetAsync (histogram)", e);
  if (n == 0 || threshold > 32767) return {};
  int device = 0, sms = 0;
  e = cudaGetDevice(&device);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (e != cudaSuccess) return status("cudaDeviceGetAttribute (multiprocessors)", e);
  // Enough blocks to fill the device, few enough that flushing their shared bins stays cheap, and
  // never more than 2^31 voxels per block (its shared counts are 32-bit).
  uint64_t blocks = std::min<uint64_t>((n + kThreads * 16 - 1) / (kThreads * 16), uint64_t(8) * static_cast<uint64_t>(std::max(sms, 1)));
  blocks = std::max<uint64_t>({blocks, 1, (n >> 31) + 1});
  ct_histogram_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, s>>>(d_hu, n, threshold, reinterpret_cast<unsigned long long*>(d_hist));
  return status("ct_histogram_kernel launch (or an earlier kernel's fault)", cudaGetLastError());
}

CudaStatus ct_resample_launch(void* stream, const int16_t* d_hu, const FusedParams& p, Grid g, const LerpTap* d_lerp, float* d_image, float* d_window) {
  (void)cudaGetLastError();
  ct_resample_kernel<<<blocks_for(voxels(g), kThreads), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(d_hu, p, g, d_lerp, d_image, d_window);
  return status("ct_resample_kernel launch (or an earlier kernel's fault)", cudaGetLastError());
}

CudaStatus ct_labels_launch(void* stream, const uint8_t* d_in, uint64_t in_nx, uint64_t in_ny, Grid g, const uint64_t* d_nearest, uint8_t* d_out) {
  (void)cudaGetLastError();
  ct_labels_kernel<<<blocks_for(voxels(g), kThreads), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(d_in, in_nx, in_ny, g, d_nearest, d_out);
  return status("ct_labels_kernel launch (or an earlier kernel's fault)", cudaGetLastError());
}

CudaStatus ct_gaussian_launch(void* stream, const float* d_src, float* d_a, float* d_b, Grid g, const double* d_taps, int radius) {
  (void)cudaGetLastError();
  const auto s = static_cast<cudaStream_t>(stream);
  const unsigned tiles = (g.nx + kGaussTile - 1) / kGaussTile;
  if (tiles > 65535) return status("ct_gaussian_launch: more than 65535·128 voxels along x", cudaErrorInvalidValue);
  const uint64_t rows = uint64_t{g.ny} * g.nz;
  const dim3 xgrid(static_cast<unsigned>(std::min<uint64_t>(rows, 65536)), tiles);
  const size_t taps_bytes = sizeof(double) * static_cast<size_t>(2 * radius + 1);
  const size_t x_bytes = taps_bytes + sizeof(float) * static_cast<size_t>(kGaussTile + 2 * radius);
  ct_gauss_x_kernel<<<xgrid, kGaussTile, x_bytes, s>>>(d_src, d_a, g, d_taps, radius);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return status("ct_gauss_x_kernel launch (or an earlier kernel's fault)", e);
  const unsigned blocks = blocks_for(voxels(g), kThreads);
  ct_gauss_yz_kernel<<<blocks, kThreads, taps_bytes, s>>>(d_a, d_b, g, 1, d_taps, radius);
  e = cudaGetLastError();
  if (e != cudaSuccess) return status("ct_gauss_yz_kernel launch (y)", e);
  ct_gauss_yz_kernel<<<blocks, kThreads, taps_bytes, s>>>(d_b, d_a, g, 2, d_taps, radius);
  return status("ct_gauss_yz_kernel launch (z)", cudaGetLastError());
}

CudaStatus ct_frangi_launch(void* stream, const float* d_smooth, Grid g, double s2, double two_alpha2, double two_beta2, double two_gamma2,
                            bool first, float* d_out) {
  (void)cudaGetLastError();
  ct_frangi_kernel<<<blocks_for(voxels(g), kThreads), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(d_smooth, g, s2, two_alpha2, two_beta2,
                                                                                                         two_gamma2, first ? 1 : 0, d_out);
  return status("ct_frangi_kernel launch (or an earlier kernel's fault)", cudaGetLastError());
}

CudaStatus ct_decode_launch(void* stream, const unsigned char* d_src, uint64_t n, const tresor::ct::nifti_hd::Decode& d, int16_t* d_hu, uint8_t* d_labels,
                            uint32_t* d_bad) {
  (void)cudaGetLastError();
  const auto s = static_cast<cudaStream_t>(stream);
  if (d_bad != nullptr) {
    const cudaError_t e = cudaMemsetAsync(d_bad, 0, sizeof(uint32_t), s);
    if (e != cudaSuccess) return status("cudaMemsetAsync (decode flag)", e);
  }
  if ((d_hu == nullptr) == (d_labels == nullptr) || (d_labels != nullptr && d_bad == nullptr)) {
    return status("ct_decode_launch: exactly one of HU and labels, and a flag with labels", cudaErrorInvalidValue);
  }
  ct_decode_kernel<<<blocks_for(n, kThreads), kThreads, 0, s>>>(d_src, n, d, d_hu, d_labels, d_bad);
  return status("ct_decode_kernel launch (or an earlier kernel's fault)", cudaGetLastError());
}

CudaStatus ct_event_create(void** event) {
  cudaEvent_t e = nullptr;
  const cudaError_t r = cudaEventCreate(&e);
  *event = e;
  return status("cudaEventCreate", r);
}
CudaStatus ct_event_destroy(void* event) {
  return event == nullptr ? CudaStatus{} : status("cudaEventDestroy", cudaEventDestroy(static_cast<cudaEvent_t>(event)));
}
CudaStatus ct_event_record(void* event, void* stream) {
  return status("cudaEventRecord", cudaEventRecord(static_cast<cudaEvent_t>(event), static_cast<cudaStream_t>(stream)));
}
CudaStatus ct_event_elapsed(void* from, void* to, float* ms) {
  cudaError_t e = cudaEventSynchronize(static_cast<cudaEvent_t>(to));
  if (e == cudaSuccess) e = cudaEventElapsedTime(ms, static_cast<cudaEvent_t>(from), static_cast<cudaEvent_t>(to));
  return status("cudaEventElapsedTime", e);
}

}  // namespace tresor::gpu::ct::detail
