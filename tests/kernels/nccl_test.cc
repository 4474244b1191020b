// NCCL collectives (include/tresor/gpu/nccl.h): the unique-id bootstrap over the CPU collectives
// and the watch over NCCL's non-blocking calls (await_nccl, on a fake clock) run everywhere;
// without a GPU connect_nccl says why; on a GPU (scripts/gpu-check) one rank's all-reduce and
// broadcast over device memory.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <random>
#include <thread>
#include <vector>

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

// await_nccl on a fake clock: pauses advance its time, nothing sleeps.
struct FakeWaiting {
  double t = 1000;
  std::vector<long> pauses_us;
  NcclWaiting waiting() {
    return {[this] { return t; },
            [this](std::chrono::microseconds d) {
              pauses_us.push_back(static_cast<long>(d.count()));
              t += static_cast<double>(d.count()) * 1e-6;
            }};
  }
};
using State = NcclProgress::State;

// Running, running, done: no give-up, the pauses double from 20 µs.
TEST(NcclWatch, ReturnsWhenTheOperationFinishes) {
  FakeWaiting w;
  int looks = 0, gave_up = 0;
  auto r = await_nccl([&]() -> Result<NcclProgress> { return NcclProgress{++looks < 3 ? State::kRunning : State::kDone, ""}; }, 10, "joining", 1,
                      [&] { ++gave_up; }, w.waiting());
  ASSERT_TRUE(r) << r.error().message;
  EXPECT_EQ(looks, 3);
  EXPECT_EQ(gave_up, 0);
  EXPECT_EQ(w.pauses_us, (std::vector<long>{20, 40}));
}

// A rank that never joins: after the timeout the communicator is aborted once and the error says
// what did not finish, where and after how long; the pauses stay at most 5 ms.
TEST(NcclWatch, GivesUpAfterTheTimeout) {
  FakeWaiting w;
  int gave_up = 0;
  auto r = await_nccl([]() -> Result<NcclProgress> { return NcclProgress{State::kRunning, ""}; }, 2, "joining the other ranks", 3, [&] { ++gave_up; },
                      w.waiting());
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, ErrorCode::kUnavailable);
  EXPECT_EQ(r.error().message, "nccl: joining the other ranks did not finish within 2 s on rank 3 (another rank stopped or hangs); the communicator was aborted");
  EXPECT_EQ(gave_up, 1);
  EXPECT_GT(w.t, 1002.0);
  EXPECT_LT(w.t, 1002.006);
  EXPECT_EQ(*std::max_element(w.pauses_us.begin(), w.pauses_us.end()), 5000);
}

// NCCL reports an error (a peer gone), or the look itself fails: aborted once, both texts kept.
TEST(NcclWatch, AFailureAbortsAndSaysWhy) {
  FakeWaiting w;
  int gave_up = 0, looks = 0;
  auto failed = await_nccl(
      [&]() -> Result<NcclProgress> {
        return ++looks < 2 ? NcclProgress{State::kRunning, ""} : NcclProgress{State::kFailed, "remote process exited or there was a network error"};
      },
      600, "a collective", 0, [&] { ++gave_up; }, w.waiting());
  ASSERT_FALSE(failed);
  EXPECT_EQ(failed.error().message, "nccl: a collective failed on rank 0: remote process exited or there was a network error; the communicator was aborted");
  EXPECT_EQ(gave_up, 1);
  auto broken = await_nccl([]() -> Result<NcclProgress> { return fail(ErrorCode::kUnavailable, "nccl: ncclCommGetAsyncError: invalid argument"); }, 600,
                           "a collective", 2, [&] { ++gave_up; }, w.waiting());
  ASSERT_FALSE(broken);
  EXPECT_NE(broken.error().message.find("on rank 2: nccl: ncclCommGetAsyncError: invalid argument"), std::string::npos) << broken.error().message;
  EXPECT_EQ(gave_up, 2);
}

// The real clock: a short timeout ends a look that never finishes, in about that time.
TEST(NcclWatch, TheRealClockTimesOut) {
  const auto start = std::chrono::steady_clock::now();
  auto r = await_nccl([]() -> Result<NcclProgress> { return NcclProgress{State::kRunning, ""}; }, 0.05, "a collective", 0, [] {});
  ASSERT_FALSE(r);
  EXPECT_GE(std::chrono::steady_clock::now() - start, std::chrono::milliseconds(50));
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
