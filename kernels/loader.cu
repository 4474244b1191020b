// The GPU data loader's kernels (include/tresor/gpu/loader.h; per-voxel arithmetic in
// kernels/loader.cuh) and their launches. Every launch is checked and reported through
// CudaStatus (no exceptions or exit() across this boundary).
//
//  - compaction (the foreground list): two passes over the labels with the same tiling, so the
//    list comes out in index order without sorting or atomics: count per block (each thread 16
//    consecutive voxels), one block scans the block counts into offsets (and the total), then each
//    block scans its threads' counts and every thread writes its voxels' indices in order. The
//    count never leaves the device.
//  - fill: one thread per patch voxel of one batch slot; every thread resolves the slot's outcome
//    (the same two words of the foreground list for all: one cached load) and gathers its source
//    voxel.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>

#include "cuda_util.cuh"
#include "loader_kernels.h"

namespace tresor::gpu::loader::detail {
namespace {

using tresor::gpu::detail::status;
using tresor::gpu::detail::blocks_for;

cudaStream_t as_stream(void* s) { return static_cast<cudaStream_t>(s); }

// Exclusive prefix sum of v over the block (kThreads threads, all of which must call it); *total
// gets the block's sum.
__device__ uint32_t block_exclusive_scan(uint32_t v, uint32_t* total) {
  constexpr unsigned kWarps = kThreads / 32;
  __shared__ uint32_t warp_sums[kWarps];
  const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
  uint32_t inc = v;
  for (unsigned d = 1; d < 32; d <<= 1) {
    const uint32_t y = __shfl_up_sync(0xffffffffu, inc, d);
    if (lane >= d) inc += y;
  }
  if (lane == 31) warp_sums[warp] = inc;
  __syncthreads();
  if (warp == 0) {
    uint32_t w = lane < kWarps ? warp_sums[lane] : 0;
    for (unsigned d = 1; d < 32; d <<= 1) {
      const uint32_t y = __shfl_up_sync(0xffffffffu, w, d);
      if (lane >= d) w += y;
    }
    if (lane < kWarps) warp_sums[lane] = w;
  }
  __syncthreads();
  *total = warp_sums[kWarps - 1];
  return (warp > 0 ? warp_sums[warp - 1] : 0) + inc - v;
}

__device__ void thread_range(uint64_t n, uint64_t* begin, uint64_t* end) {
  const uint64_t b = uint64_t{blockIdx.x} * kCompactTile + uint64_t{threadIdx.x} * kCompactPerThread;
  *begin = b < n ? b : n;
  *end = b + kCompactPerThread < n ? b + kCompactPerThread : n;
}

__global__ void __launch_bounds__(kThreads) loader_count_kernel(const uint8_t* __restrict__ d_labels, uint64_t n, uint8_t label,
                                                                 uint32_t* __restrict__ d_block_counts) {
  uint64_t begin = 0, end = 0;
  thread_range(n, &begin, &end);
  uint32_t total = 0;
  (void)block_exclusive_scan(count_range(d_labels, begin, end, label), &total);
  if (threadIdx.x == 0) d_block_counts[blockIdx.x] = total;
}

// One block: the block counts' exclusive prefix sums, and the total.
__global__ void __launch_bounds__(kThreads) loader_scan_kernel(const uint32_t* __restrict__ d_counts, uint64_t blocks,
                                                                uint32_t* __restrict__ d_offsets, uint32_t* __restrict__ d_total) {
  const uint64_t per = (blocks + kThreads - 1) / kThreads;
  const uint64_t first = uint64_t{threadIdx.x} * per;
  const uint64_t begin = first < blocks ? first : blocks, end = begin + per < blocks ? begin + per : blocks;
  uint32_t sum = 0;
  for (uint64_t i = begin; i < end; ++i) sum += d_counts[i];
  uint32_t total = 0;
  uint32_t offset = block_exclusive_scan(sum, &total);
  for (uint64_t i = begin; i < end; ++i) {
    d_offsets[i] = offset;
    offset += d_counts[i];
  }
  if (threadIdx.x == 0) *d_total = total;
}

__global__ void __launch_bounds__(kThreads) loader_write_kernel(const uint8_t* __restrict__ d_labels, uint64_t n, uint8_t label,
                                                                 const uint32_t* __restrict__ d_offsets, uint32_t* __restrict__ d_out) {
  uint64_t begin = 0, end = 0;
  thread_range(n, &begin, &end);
  uint32_t total = 0;
  const uint32_t mine = block_exclusive_scan(count_range(d_labels, begin, end, label), &total);
  write_range(d_labels, begin, end, label, d_out, d_offsets[blockIdx.x] + mine);
}

__global__ void __launch_bounds__(kThreads) loader_finite_kernel(const float* __restrict__ d_p, uint64_t n, double slope, double inter,
                                                                  uint32_t* __restrict__ d_bad) {
  const uint64_t stride = uint64_t{gridDim.x} * blockDim.x;
  bool bad = false;
  for (uint64_t i = uint64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < n; i += stride) bad |= !finite_voxel(d_p, i, slope, inter);
  if (bad) atomicOr(d_bad, 1u);
}

__global__ void __launch_bounds__(kThreads) loader_fill_kernel(VolumeView v, SlotParams s, FillParams f, float* __restrict__ d_image,
                                                                float* __restrict__ d_vesselness, uint8_t* __restrict__ d_target) {
  const uint64_t m = f.patch * f.patch * f.patch;
  const uint64_t i = uint64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (i >= m) return;
  uint64_t corner[3];
  const PatchParams& p = resolve_patch(v, s, f.patch, corner);
  fill_voxel(v, p, corner, f, i, d_image, d_vesselness, d_target);
}

// One block: augment_hd::finish_patch's contrast and gammas. Each reduction is each thread's share of the statistics
// and the tree over shared memory in augment_hd's order (reduce_patch's); the voxel passes are
// per voxel.
__device__ tresor::ct::augment_hd::PatchStats block_reduce(const float* d_image, uint64_t m, float sign,
                                                           tresor::ct::augment_hd::PatchStats* part) {
  namespace hd = tresor::ct::augment_hd;
  const unsigned t = threadIdx.x;
  part[t] = hd::contrast_partial(d_image, m, t, sign);
  __syncthreads();
  for (unsigned stride = hd::kContrastThreads / 2; stride > 0; stride /= 2) {
    if (t < stride) part[t] = hd::combine_stats(part[t], part[t + stride]);
    __syncthreads();
  }
  const hd::PatchStats total = part[0];
  __syncthreads();  // part is reused by the next reduction
  return total;
}

__global__ void __launch_bounds__(tresor::ct::augment_hd::kContrastThreads)
    loader_finish_kernel(float* __restrict__ d_image, uint64_t m, double contrast, double gamma_inverted, double gamma) {
  namespace hd = tresor::ct::augment_hd;
  __shared__ hd::PatchStats part[hd::kContrastThreads];
  const unsigned t = threadIdx.x;
  if (contrast != 1) {
    const hd::PatchStats total = block_reduce(d_image, m, 1.0f, part);
    for (uint64_t i = t; i < m; i += hd::kContrastThreads) d_image[i] = hd::contrast_voxel(d_image[i], total, m, contrast);
    __syncthreads();
  }
  for (int k = 0; k < 2; ++k) {
    const double g = k == 0 ? gamma_inverted : gamma;
    if (g == 1) continue;
    const float sign = k == 0 ? -1.0f : 1.0f;
    const hd::PatchStats before = block_reduce(d_image, m, sign, part);
    double mean = 0, sd = 0;
    hd::mean_sd(before, m, &mean, &sd);
    for (uint64_t i = t; i < m; i += hd::kContrastThreads) d_image[i] = hd::gamma_powered(d_image[i], sign, before, g);
    __syncthreads();
    const hd::PatchStats after = block_reduce(d_image, m, 1.0f, part);
    double mean_y = 0, sd_y = 0;
    hd::mean_sd(after, m, &mean_y, &sd_y);
    for (uint64_t i = t; i < m; i += hd::kContrastThreads) d_image[i] = hd::gamma_restored(d_image[i], sign, mean, sd, mean_y, sd_y);
    __syncthreads();
  }
}

// The blur's pass along one axis and the low resolution's two steps, one thread per voxel of the
// output (augment_hd's per-voxel functions).
struct Extent {
  uint64_t n[3];
};
// Grid-stride loops: blocks_for caps the grid, so a thread may have several voxels.
__global__ void __launch_bounds__(kThreads) loader_blur_kernel(const float* __restrict__ in, float* __restrict__ out, Extent e, unsigned axis,
                                                                tresor::ct::augment_hd::BlurKernel k) {
  const uint64_t m = e.n[0] * e.n[1] * e.n[2];
  for (uint64_t i = uint64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < m; i += uint64_t{gridDim.x} * blockDim.x) {
    out[i] = tresor::ct::augment_hd::blur_voxel(in, e.n, axis, k, i);
  }
}
__global__ void __launch_bounds__(kThreads) loader_down_kernel(const float* __restrict__ in, float* __restrict__ out, Extent e, Extent small,
                                                                FlipChoice flips) {
  const uint64_t m = small.n[0] * small.n[1] * small.n[2];
  for (uint64_t i = uint64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < m; i += uint64_t{gridDim.x} * blockDim.x) {
    out[i] = tresor::ct::augment_hd::lowres_down_voxel(in, e.n, small.n, resolve_flips(flips), i);
  }
}
__global__ void __launch_bounds__(kThreads) loader_up_kernel(const float* __restrict__ in, float* __restrict__ out, Extent small, Extent e,
                                                              FlipChoice flips) {
  const uint64_t m = e.n[0] * e.n[1] * e.n[2];
  for (uint64_t i = uint64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < m; i += uint64_t{gridDim.x} * blockDim.x) {
    out[i] = tresor::ct::augment_hd::lowres_up_voxel(in, small.n, e.n, resolve_flips(flips), i);
  }
}

CudaStatus launched(const char* what) { return status(what, cudaGetLastError()); }

}  // namespace

CudaStatus loader_select_device(const void* d_ptr) {
  cudaPointerAttributes a{};
  if (auto e = cudaPointerGetAttributes(&a, d_ptr); e != cudaSuccess) return status("cudaPointerGetAttributes", e);
  if (a.type != cudaMemoryTypeDevice) {
    CudaStatus s;
    s.code = static_cast<int>(cudaErrorInvalidValue);
    std::snprintf(s.message, sizeof s.message, "loader: a buffer passed as device memory is not device memory");
    return s;
  }
  return status("cudaSetDevice", cudaSetDevice(a.device));
}

uint64_t loader_compact_blocks(uint64_t n) { return std::max<uint64_t>(1, (n + kCompactTile - 1) / kCompactTile); }

CudaStatus loader_compact_launch(void* stream, const uint8_t* d_labels, uint64_t n, uint8_t label, uint32_t* d_block_counts,
                                 uint32_t* d_block_offsets, uint32_t* d_out, uint32_t* d_count) {
  const uint64_t blocks = loader_compact_blocks(n);
  if (blocks > 0x7FFFFFFFull) return status("loader_compact: too many voxels", cudaErrorInvalidValue);
  (void)cudaGetLastError();  // an earlier, unrelated failure must not be reported as this launch's
  loader_count_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, as_stream(stream)>>>(d_labels, n, label, d_block_counts);
  if (auto s = launched("loader_count_kernel launch"); s.code != 0) return s;
  loader_scan_kernel<<<1, kThreads, 0, as_stream(stream)>>>(d_block_counts, blocks, d_block_offsets, d_count);
  if (auto s = launched("loader_scan_kernel launch"); s.code != 0) return s;
  loader_write_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, as_stream(stream)>>>(d_labels, n, label, d_block_offsets, d_out);
  return launched("loader_write_kernel launch");
}

CudaStatus loader_finite_launch(void* stream, const float* d_p, uint64_t n, double slope, double inter, uint32_t* d_bad) {
  (void)cudaGetLastError();
  loader_finite_kernel<<<blocks_for(n, kThreads), kThreads, 0, as_stream(stream)>>>(d_p, n, slope, inter, d_bad);
  return launched("loader_finite_kernel launch");
}

CudaStatus loader_fill_launch(void* stream, const VolumeView& v, const SlotParams& s, const FillParams& f, float* d_image, float* d_vesselness,
                              uint8_t* d_target) {
  const uint64_t m = f.patch * f.patch * f.patch;
  if (m == 0) return {};
  (void)cudaGetLastError();
  loader_fill_kernel<<<static_cast<unsigned>((m + kThreads - 1) / kThreads), kThreads, 0, as_stream(stream)>>>(v, s, f, d_image, d_vesselness, d_target);
  return launched("loader_fill_kernel launch");
}

CudaStatus loader_finish_launch(void* stream, float* d_image, float* d_scratch, uint64_t patch, const tresor::ct::augment_hd::PatchFinish& f,
                                const FlipChoice& flips) {
  namespace hd = tresor::ct::augment_hd;
  const Extent e{{patch, patch, patch}};
  const uint64_t m = patch * patch * patch;
  if (m == 0 || !f.any()) return {};
  (void)cudaGetLastError();
  const cudaStream_t st = as_stream(stream);
  const unsigned blocks = blocks_for(m, kThreads);
  if (f.blurred()) {
    // augment_hd::finish_patch's passes, alternating between the image and the working copy.
    float* from = d_image;
    float* to = d_scratch;
    for (unsigned a = 3; a-- > 0;) {  // z, y, x
      if (!(f.blur_sigma[a] > 0)) continue;
      loader_blur_kernel<<<blocks, kThreads, 0, st>>>(from, to, e, a, hd::blur_kernel(f.blur_sigma[a]));
      if (auto s = launched("loader_blur_kernel launch"); s.code != 0) return s;
      float* t = from;
      from = to;
      to = t;
    }
    if (from != d_image) {
      if (auto s = status("cudaMemcpyAsync (blur)", cudaMemcpyAsync(d_image, from, m * sizeof(float), cudaMemcpyDeviceToDevice, st)); s.code != 0) return s;
    }
  }
  if (f.contrast != 1) {
    loader_finish_kernel<<<1, hd::kContrastThreads, 0, st>>>(d_image, m, f.contrast, 1.0, 1.0);
    if (auto s = launched("loader_finish_kernel launch (contrast)"); s.code != 0) return s;
  }
  if (f.lowres_scale != 1) {
    const Extent small{{hd::lowres_size(patch, f.lowres_scale), hd::lowres_size(patch, f.lowres_scale), hd::lowres_size(patch, f.lowres_scale)}};
    const uint64_t ms = small.n[0] * small.n[1] * small.n[2];
    loader_down_kernel<<<blocks_for(ms, kThreads), kThreads, 0, st>>>(d_image, d_scratch, e, small, flips);
    if (auto s = launched("loader_down_kernel launch"); s.code != 0) return s;
    loader_up_kernel<<<blocks, kThreads, 0, st>>>(d_scratch, d_image, small, e, flips);
    if (auto s = launched("loader_up_kernel launch"); s.code != 0) return s;
  }
  if (f.gamma_inverted != 1 || f.gamma != 1) {
    loader_finish_kernel<<<1, hd::kContrastThreads, 0, st>>>(d_image, m, 1.0, f.gamma_inverted, f.gamma);
    if (auto s = launched("loader_finish_kernel launch (gamma)"); s.code != 0) return s;
  }
  return {};
}

CudaStatus loader_stream_sync(void* stream) { return status("cudaStreamSynchronize", cudaStreamSynchronize(as_stream(stream))); }

}  // namespace tresor::gpu::loader::detail
