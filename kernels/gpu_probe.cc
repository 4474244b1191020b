#include "tresor/gpu.h"

#include "cuda_result.h"
#include "selftest.cuh"

namespace tresor::gpu {

void selftest_fill_ref(uint32_t seed, std::span<uint32_t> out) {
  for (size_t i = 0; i < out.size(); ++i) out[i] = detail::selftest_mix(seed, static_cast<uint32_t>(i));
}

#ifdef TRESOR_HAVE_CUDA
bool built_with_cuda() { return true; }

Result<std::vector<Device>> gpu_probe() {
  int count = 0;
  if (auto s = detail::cuda_device_count(&count); s.code != 0) {
    return fail(ErrorCode::kUnavailable, std::string("no usable CUDA device: ") + s.message);
  }
  if (count == 0) return fail(ErrorCode::kUnavailable, "the CUDA driver reports no devices");
  std::vector<Device> out;
  for (int i = 0; i < count; ++i) {
    Device d;
    d.index = i;
    char name[256] = {};
    TRESOR_TRY(detail::cuda(detail::cuda_device_properties(i, name, sizeof name, &d.cc_major, &d.cc_minor, &d.memory_bytes)));
    d.name = name;
    out.push_back(std::move(d));
  }
  return out;
}

Result<void> selftest_fill_launch(int device, uint32_t seed, std::span<uint32_t> out) {
  return detail::cuda(detail::selftest_fill(device, seed, out.data(), out.size()));
}
#else
bool built_with_cuda() { return false; }
Result<std::vector<Device>> gpu_probe() {
  return fail(ErrorCode::kUnavailable, detail::kNoCuda);
}
Result<void> selftest_fill_launch(int, uint32_t, std::span<uint32_t>) {
  return fail(ErrorCode::kUnavailable, detail::kNoCuda);
}
#endif

}  // namespace tresor::gpu
