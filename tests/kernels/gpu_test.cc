// GPU checks: the CPU reference of the self-test kernel is tested on every machine; the kernel
// itself is compared to it where a CUDA device exists, and skipped with the reason elsewhere.
#include <gtest/gtest.h>

#include <cstdlib>
#include <vector>

#include "support/test_support.h"
#include "tresor/gpu.h"

namespace tresor {
namespace {


TEST(GpuSelftestRef, MatchesIndependentlyComputedValues) {
  // Values computed with a separate Python implementation of the same 32-bit mix.
  std::vector<uint32_t> v(3);
  gpu::selftest_fill_ref(0, v);
  EXPECT_EQ(v[1], 0x01fce552u);
  EXPECT_EQ(v[2], 0x04f8d29eu);
  std::vector<uint32_t> w(12346);
  gpu::selftest_fill_ref(0xdeadbeefu, w);
  EXPECT_EQ(w[12345], 0x9fa6427cu);
  std::vector<uint32_t> other(12346);
  gpu::selftest_fill_ref(0xdeadbeeeu, other);
  EXPECT_NE(other[12345], w[12345]);
}

TEST(GpuProbe, ReportsDevicesOrAClearReason) {
  auto devs = gpu::gpu_probe();
  if (!devs) {
    EXPECT_EQ(devs.error().code, ErrorCode::kUnavailable);
    EXPECT_FALSE(devs.error().message.empty());
  }
  TRESOR_SKIP_WITHOUT_GPU(devs);
  ASSERT_FALSE(devs->empty());
  for (const auto& d : *devs) {
    EXPECT_FALSE(d.name.empty());
    EXPECT_GE(d.cc_major, 8) << d.name << ": Tresor's kernels are built for sm_80 and sm_90";
    EXPECT_GT(d.memory_bytes, 0u);
  }
}

TEST(GpuSelftest, KernelMatchesReferenceBitForBit) {
  auto devs = gpu::gpu_probe();
  TRESOR_SKIP_WITHOUT_GPU(devs);
  for (size_t n : {size_t{0}, size_t{1}, size_t{255}, size_t{256}, size_t{257}, size_t{(1u << 20) + 3},
                   size_t{(64u << 20) + 7}}) {
    SCOPED_TRACE(n);
    std::vector<uint32_t> got(n, 0xAAAAAAAAu), want(n);
    ASSERT_TRUE(gpu::selftest_fill_launch(0, 0x5eed1234u, got));
    gpu::selftest_fill_ref(0x5eed1234u, want);
    EXPECT_EQ(got, want);
  }
}

}  // namespace
}  // namespace tresor
