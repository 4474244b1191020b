// tresor/gpu.h — what CUDA devices this process can use, and a device self-test.
//
// GPU tests call gpu_probe() first and skip with its message when no device is usable, so the
// suite runs everywhere and says plainly what it did not check.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "tresor/encoding.h"
#include "tresor/error.h"

namespace tresor::gpu {

struct Device {
  int index = 0;
  std::string name;
  int cc_major = 0;
  int cc_minor = 0;
  uint64_t memory_bytes = 0;
};

/// True when this build contains CUDA code (nvcc was found at configure time).
bool built_with_cuda();

/// Lists usable CUDA devices. kUnavailable (with the reason: no CUDA in this build, no driver,
/// no device) when there are none.
[[nodiscard]] Result<std::vector<Device>> gpu_probe();

/// CPU reference of the self-test kernel: out[i] = mix(seed, i) (a 32-bit integer hash).
void selftest_fill_ref(uint32_t seed, std::span<uint32_t> out);
/// Runs the self-test kernel on device `device` and copies the result to `out`.
[[nodiscard]] Result<void> selftest_fill_launch(int device, uint32_t seed, std::span<uint32_t> out);

}  // namespace tresor::gpu
