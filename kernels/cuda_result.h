// The CUDA shim's statuses (cuda_shim.h) as Tresor results, for the kernels' C++23 host sources.
// nvcc never sees this header: the .cu files compile against cuda_shim.h alone.
#pragma once

#include "cuda_shim.h"
#include "tresor/error.h"

namespace tresor::gpu::detail {

/// What a GPU entry point says when this build has no CUDA.
inline constexpr const char* kNoCuda = "this build has no CUDA support (nvcc was not found, or -DTRESOR_CUDA=OFF)";

/// kUnavailable with CUDA's own error name and text when the shim's call failed.
inline Result<void> cuda(const CudaStatus& s) {
  if (s.code != 0) return fail(ErrorCode::kUnavailable, s.message);
  return {};
}

}  // namespace tresor::gpu::detail
