// NCCL collectives (include/tresor/gpu/nccl.h): the unique-id bootstrap over the CPU collectives
// runs everywhere; without a GPU connect_nccl says why; on a GPU (scripts/gpu-check) one rank's
// all-reduce and broadcast over device memory.
#include <gtest/gtest.h>

#include <random>
#include <thread>

#include "cuda_shim.h"
#include "support/test_support.h"
#include "tresor/gpu.h"
#include "tresor/gpu/nccl.h"

namespace tresor::gpu {
namespace {

TEST(Nccl, TheUniqueIdReachesEveryRankExactly) {
  auto group = train::SharedMemoryGroup::create(3);
  ASSERT_TRUE(group);
  std::vector<std::unique_ptr<train::Collective>> members;
  for (int r = 0; r < 3; ++r) members.push_back(std::move(*(*group)->member(r)));
  std::array<std::byte, 128> sent{};
  std::mt19937 g(5);
  for (auto& b : sent) b = static_cast<std::byte>(g() & 0xFF);
  sent[0] = std::byte{0};
  sent[1] = std::byte{0xFF};
  std::vector<std::array<std::byte, 128>> got(3);
  {
    std::vector<std::jthread> threads;
    for (int r = 0; r < 3; ++r) {
      threads.emplace_back([&, r] {
        auto& id = got[static_cast<size_t>(r)];
        if (r == 0) {
          id = sent;
        } else {
          id.fill(std::byte{0xAA});  // whatever the others held is replaced
        }
        ASSERT_TRUE(share_unique_id(*members[static_cast<size_t>(r)], id));
      });
    }
  }
  for (const auto& id : got) EXPECT_EQ(id, sent);
}

TEST(Nccl, WithoutAGpuConnectingSaysWhy) {
  if (gpu_probe()) GTEST_SKIP() << "a CUDA device is present: NcclDevice runs instead";
  auto group = train::SharedMemoryGroup::create(1);
  ASSERT_TRUE(group);
  auto one = (*group)->member(0);
  ASSERT_TRUE(one);
  auto c = connect_nccl(**one, 0);
  ASSERT_FALSE(c);
  EXPECT_EQ(c.error().code, ErrorCode::kUnavailable);
  EXPECT_NE(c.error().message.find(nccl_built() ? "nccl: no CUDA device" : "this build has no NCCL"), std::string::npos) << c.error().message;
}

// Ranks that cannot start NCCL stop together after the id exchange (ncclCommInitRank would
// otherwise wait for them forever): two ranks, no GPU, both return, both say why.
TEST(Nccl, RanksThatCannotStartAllStopTogether) {
  if (gpu_probe()) GTEST_SKIP() << "a CUDA device is present";
  auto group = train::SharedMemoryGroup::create(2);
  ASSERT_TRUE(group);
  std::vector<std::unique_ptr<train::Collective>> members;
  for (int r = 0; r < 2; ++r) members.push_back(std::move(*(*group)->member(r)));
  std::vector<std::string> errors(2);
  {
    std::vector<std::jthread> threads;
    for (int r = 0; r < 2; ++r) {
      threads.emplace_back([&, r] {
        auto c = connect_nccl(*members[static_cast<size_t>(r)], r);
        errors[static_cast<size_t>(r)] = c ? "" : c.error().message;
      });
    }
  }
  for (const auto& e : errors) EXPECT_NE(e.find("nccl: "), std::string::npos) << e;
}

// One rank (NCCL refuses two ranks on one GPU): the sum over one rank is the buffer itself, a
// broadcast from rank 0 keeps it, a root outside the group is refused, and the calls go through
// NCCL's kernels on the device.
TEST(NcclDevice, OneRankAllReducesAndBroadcastsDeviceMemory) {
  auto devs = gpu_probe();
  TRESOR_SKIP_WITHOUT_GPU(devs);
#ifndef TRESOR_HAVE_CUDA
  FAIL() << "a GPU is usable but this build has no CUDA";
#else
  ASSERT_TRUE(nccl_built()) << "a GPU machine without NCCL in the build";
  auto group = train::SharedMemoryGroup::create(1);
  auto one = (*group)->member(0);
  auto c = connect_nccl(**one, 0);
  ASSERT_TRUE(c) << c.error().message;
  EXPECT_EQ((*c)->size(), 1);
  std::vector<float> host(1 << 20);
  for (size_t i = 0; i < host.size(); ++i) host[i] = static_cast<float>(i % 977) * 0.25f;
  void* d = nullptr;
  ASSERT_EQ(detail::cuda_alloc(&d, host.size() * 4).code, 0);
  ASSERT_EQ(detail::cuda_copy(d, host.data(), host.size() * 4, detail::kHostToDevice).code, 0);
  ASSERT_TRUE((*c)->all_reduce_sum(static_cast<float*>(d), host.size(), nullptr));
  ASSERT_TRUE((*c)->broadcast(static_cast<float*>(d), host.size(), 0, nullptr));
  EXPECT_FALSE((*c)->broadcast(static_cast<float*>(d), host.size(), 1, nullptr));
  ASSERT_EQ(detail::cuda_device_sync().code, 0);
  std::vector<float> back(host.size());
  ASSERT_EQ(detail::cuda_copy(back.data(), d, back.size() * 4, detail::kDeviceToHost).code, 0);
  EXPECT_EQ(back, host);
  (void)detail::cuda_free_wiped(d, host.size() * 4);
#endif
}

}  // namespace
}  // namespace tresor::gpu
