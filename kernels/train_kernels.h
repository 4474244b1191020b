// Plain declarations between the training kernels (kernels/train.cu, nvcc) and the C++23 host
// side (kernels/train_gpu.cc): launch wrappers that queue one pass on a stream (a cudaStream_t as
// void*; nullptr = the legacy default stream). Nothing here throws or uses std::expected; every
// launch is checked (cudaGetLastError after it) and returns CUDA's error name and text.
#pragma once

#include <cstddef>
#include <cstdint>

#include "cuda_shim.h"
#include "train.cuh"

namespace tresor::gpu::train::detail {

using tresor::gpu::detail::CudaStatus;

/// One implicit-GEMM pass (gemm_dims(kind, g)) on the tensor cores: bf16 operands gathered by
/// gemm_a/gemm_b, fp32 accumulation, results through gemm_store. For the weight-gradient kinds
/// op.out receives dims.splits·M·N partials; gemm_splitk_launch then adds them into the gradient.
CudaStatus gemm_launch(void* stream, GemmKind kind, const ConvGeom& g, const GemmDims& dims, const GemmOperands& op);

/// dweight[i] += Σ_s partials[s·mn + i] for i < mn, in split order.
CudaStatus gemm_splitk_launch(void* stream, const float* d_partials, uint32_t splits, uint64_t mn, float* d_dweight);

/// The bias gradient: d_dbias[c] += Σ over samples and voxels of d_dy (n × channels × m), one
/// block per channel, double by the fixed tree.
CudaStatus bias_grad_launch(void* stream, const float* d_dy, uint32_t n, uint32_t channels, uint32_t m, float* d_dbias);

/// Instance norm + leaky ReLU forward: one block per (sample, channel) plane of m voxels.
CudaStatus norm_forward_launch(void* stream, const float* d_x, uint32_t planes, uint32_t channels, uint32_t m, const float* d_gamma, const float* d_beta,
                               NormConsts k, float* d_y);
/// Backward: d_dx, and per plane Σdz·x̂ and Σdz into d_plane_sums (2·planes doubles: γ's, then β's
/// part), then added per channel over the samples in sample order into d_dgamma, d_dbeta.
CudaStatus norm_backward_launch(void* stream, const float* d_x, const float* d_dy, uint32_t planes, uint32_t channels, uint32_t m, const float* d_gamma,
                                const float* d_beta, NormConsts k, float* d_dx, double* d_plane_sums, float* d_dgamma, float* d_dbeta);

/// The loss: per-block partials (loss_blocks(g) × loss_quantities(g) doubles in d_partials), their
/// sums in block order (d_totals, loss_quantities(g) doubles), then the logits' gradient.
CudaStatus loss_launch(void* stream, const float* d_logits, const uint8_t* d_target, const LossGeom& g, LossConsts k, double* d_partials, double* d_totals,
                       float* d_dlogits);
/// The same in two halves (data parallelism sums the totals over the ranks in between): the
/// partials and their totals; the gradient from totals (loss_quantities(g) doubles, device memory).
CudaStatus loss_stats_launch(void* stream, const float* d_logits, const uint8_t* d_target, const LossGeom& g, double* d_partials, double* d_totals);
CudaStatus loss_grad_launch(void* stream, const float* d_logits, const uint8_t* d_target, const LossGeom& g, LossConsts k, const double* d_totals, float* d_dlogits);

/// One optimizer step over `count` parameters in one launch; d_bf16 (nullable) receives the
/// updated parameters rounded to bf16.
CudaStatus sgd_launch(void* stream, uint64_t count, float* d_params, const float* d_grads, float* d_velocity, uint16_t* d_bf16, SgdConsts k);
CudaStatus adamw_launch(void* stream, uint64_t count, float* d_params, const float* d_grads, float* d_m, float* d_v, uint16_t* d_bf16, AdamWConsts k);

/// d_y[i] += d_x[i] for i < count: a skip connection's gradient added into the encoder's (one
/// float addition per element, as the reference's add).
CudaStatus add_launch(void* stream, uint64_t count, const float* d_x, float* d_y);
/// Deep supervision's targets: d_out (n·(d/f)·(h/f)·(w/f)) from d_in (n·d·h·w) by
/// downsample_source.
CudaStatus downsample_launch(void* stream, uint64_t n, uint64_t d, uint64_t h, uint64_t w, uint64_t f, const uint8_t* d_in, uint8_t* d_out);
/// Zeroes `bytes` at d_p on the stream (cudaMemsetAsync): a gradient before the backward pass
/// accumulates into it.
CudaStatus zero_launch(void* stream, void* d_p, uint64_t bytes);

}  // namespace tresor::gpu::train::detail
