// Plain declarations between the loader's kernels (kernels/loader.cu, nvcc) and the C++23 host
// side (kernels/loader_gpu.cc): launch wrappers that queue work on a stream (a cudaStream_t as
// void*; nullptr = the default stream) of the device that owns the memory they are given.
// Nothing here throws or uses std::expected; each call is checked and returns CUDA's error name
// and text in a CudaStatus.
#pragma once

#include <cstddef>
#include <cstdint>

#include "cuda_shim.h"
#include "loader.cuh"

namespace tresor::gpu::loader::detail {

using tresor::gpu::detail::CudaStatus;

/// Makes the device that owns `d_ptr` (device memory) current on this host thread.
CudaStatus loader_select_device(const void* d_ptr);

/// The foreground list of n labels: d_out[0..count) = the indices i with d_labels[i] == label, in
/// increasing order, *d_count = count. d_block_counts and d_block_offsets: blocks_for_compaction(n)
/// entries each (scratch). Three launches: count per block, one block's scan, write per block.
uint64_t loader_compact_blocks(uint64_t n);
CudaStatus loader_compact_launch(void* stream, const uint8_t* d_labels, uint64_t n, uint8_t label, uint32_t* d_block_counts,
                                 uint32_t* d_block_offsets, uint32_t* d_out, uint32_t* d_count);

/// *d_bad |= 1 when a voxel of d_p (n floats, scaled as the CPU reader scales them) is not finite.
CudaStatus loader_finite_launch(void* stream, const float* d_p, uint64_t n, double slope, double inter, uint32_t* d_bad);

/// One batch slot: P³ voxels of the image channel, the vesselness channel and the targets.
CudaStatus loader_fill_launch(void* stream, const VolumeView& v, const SlotParams& s, const FillParams& f, float* d_image, float* d_vesselness,
                              uint8_t* d_target);

/// augment_hd::finish_patch on one slot's image channel (P³ floats, in place; d_scratch as many):
/// the blur (a launch per axis, per voxel), the contrast (one block of augment_hd::kContrastThreads
/// threads, which reduces the patch's statistics in augment_hd's order before its pass over the
/// voxels), the low resolution (a launch down, one up), the gammas (one block, as the contrast),
/// each skipped where the draw leaves it out.
/// The low resolution takes the patch's mirroring from `flips` (f.flipped is not read).
CudaStatus loader_finish_launch(void* stream, float* d_image, float* d_scratch, uint64_t patch, const tresor::ct::augment_hd::PatchFinish& f,
                                const FlipChoice& flips);

/// Waits for `stream`.
CudaStatus loader_stream_sync(void* stream);

}  // namespace tresor::gpu::loader::detail
