// Host-side helpers every .cu file shares (nvcc only): a CUDA error as a CudaStatus naming what
// failed, and the grid of a grid-stride loop.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>

#include "cuda_shim.h"

namespace tresor::gpu::detail {

/// "what: cudaErrorX (text)" when e is an error; code 0 otherwise.
inline CudaStatus status(const char* what, cudaError_t e) {
  CudaStatus s;
  s.code = static_cast<int>(e);
  if (e != cudaSuccess) std::snprintf(s.message, sizeof s.message, "%s: %s (%s)", what, cudaGetErrorName(e), cudaGetErrorString(e));
  return s;
}

/// Blocks for a grid-stride loop over n items of `threads` per block (at most 2^20 blocks, so the
/// stride stays far below 2^32).
inline unsigned blocks_for(uint64_t n, unsigned threads) {
  return static_cast<unsigned>(std::max<uint64_t>(1, std::min<uint64_t>((n + threads - 1) / threads, uint64_t{1} << 20)));
}

}  // namespace tresor::gpu::detail
