// Plain declarations between the CT kernels (kernels/ct.cu, nvcc) and the C++23 host side
// (kernels/ct_gpu.cc): launch wrappers that queue one stage on a stream (a cudaStream_t as void*)
// and CUDA events for the per-stage timings. Nothing here throws or uses std::expected; each call
// is checked and returns CUDA's error name and text in a CudaStatus.
#pragma once

#include <cstddef>
#include <cstdint>

#include "ct.cuh"
#include "tresor/ct/nifti_hd.h"
#include "cuda_shim.h"

namespace tresor::gpu::ct::detail {

using tresor::gpu::detail::CudaStatus;

/// Zeroes d_hist (kHistBins counts, bin = value + 32768) and counts the n voxels of d_hu whose
/// value is >= threshold (-32768..32767; 32768 counts nothing).
CudaStatus ct_histogram_launch(void* stream, const int16_t* d_hu, uint64_t n, int threshold, uint64_t* d_hist);

/// The fused pass: every voxel of grid g resampled trilinearly from d_hu (d_lerp: g.nx taps for x,
/// then g.ny for y, then g.nz for z), z-scored into d_image and windowed into d_window.
CudaStatus ct_resample_launch(void* stream, const int16_t* d_hu, const FusedParams& p, Grid g, const LerpTap* d_lerp, float* d_image, float* d_window);

/// Labels by the nearest voxel: d_nearest holds the source index per output coordinate (x, then
/// y, then z, as d_lerp).
CudaStatus ct_labels_launch(void* stream, const uint8_t* d_in, uint64_t in_nx, uint64_t in_ny, Grid g, const uint64_t* d_nearest, uint8_t* d_out);

/// The separable Gaussian of radius `radius` (d_taps: 2·radius + 1 normalised weights) along x,
/// y, then z: d_src → d_a → d_b → d_a. The result is in d_a; d_src is left as it was.
CudaStatus ct_gaussian_launch(void* stream, const float* d_src, float* d_a, float* d_b, Grid g, const double* d_taps, int radius);

/// Frangi's response of the smoothed volume at one scale (s2 = σ² in voxels², two_alpha2 = 2α²
/// and so on) into the running maximum d_out; `first` overwrites d_out (the maximum with 0).
CudaStatus ct_frangi_launch(void* stream, const float* d_smooth, Grid g, double s2, double two_alpha2, double two_beta2, double two_gamma2,
                            bool first, float* d_out);

/// The n voxels stored at d_src as `d` says (a NIfTI file's voxels where the secure channel left
/// them) decoded into HU (d_hu) or labels (d_labels): exactly one of the two. With labels, d_bad
/// (one uint32, zeroed here) becomes non-zero when a value is not a whole number 0..255.
CudaStatus ct_decode_launch(void* stream, const unsigned char* d_src, uint64_t n, const tresor::ct::nifti_hd::Decode& d, int16_t* d_hu, uint8_t* d_labels,
                            uint32_t* d_bad);

/// CUDA events (cudaEvent_t as void*) for timing work on a stream.
CudaStatus ct_event_create(void** event);
CudaStatus ct_event_destroy(void* event);
CudaStatus ct_event_record(void* event, void* stream);
/// Milliseconds between two recorded events; waits for `to`.
CudaStatus ct_event_elapsed(void* from, void* to, float* ms);

}  // namespace tresor::gpu::ct::detail
