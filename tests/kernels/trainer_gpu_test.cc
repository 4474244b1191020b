// The GPU training loop (include/tresor/gpu/trainer.h) with data parallelism and deep supervision,
// on the kernels' CPU emulation (Backend::kEmulated) everywhere; on a CUDA device where there is
// one (skipped with the reason elsewhere; scripts/gpu-check sets TRESOR_REQUIRE_GPU=1).
//
// What is compared, and why the tolerance. Two ranks (threads; shared memory, and TCP on
// 127.0.0.1 as between processes) each train on half of every global batch of 4 patches; one rank
// trains on the whole batch. The per-sample work is the same arithmetic in both (convolutions and
// norms act per sample; the loss's gradient is formed from the global statistics on both sides);
// what differs is the order of the batch reductions: the loss statistics (double, per-block
// partials over 2 instead of 4 samples, then the ranks' sum), the weight gradients' split-K fp32
// partials and the bias/γ/β sums over the samples (then the ranks' float sum). So the step-1
// gradients agree to float rounding of their sums (~1e-7 relative). From step 2 on, the weights
// differ by that much, and a weight or activation lying within that distance of a bf16 rounding
// boundary could round the other way (one operand moved by 2^-8 relative); SGD moves weights by
// lr·(1 + μ + …) times the gradient difference. Measured after 3 steps (printed): largest weight
// difference 4.2e-9 of the largest weight with one output, 1.4e-8 with deep supervision (the CPU
// trainer's test: 1.5e-8), losses equal to 9 digits, validation Dice equal. Asserted as the CPU
// trainer's test: 1e-6 of the largest weight (~70× the worst measured; a missing or doubled
// rank's gradient, or statistics left unsummed, move weights by ~lr·|g| ≈ 1e-4..1e-2); losses 1e-5
// relative; validation Dice 1e-6. Every rank holds the same weights to the bit (the same summed
// gradient and the same step). AdamW is not used for the comparison: it
// turns the noise of gradients that are zero in theory (a conv bias before instance norm) into
// steps of ±lr (tests/core/train/data_parallel_test.cc).
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <memory>
#include <optional>
#include <span>
#include <thread>

#include "support/small_case.h"
#include "support/test_support.h"
#include "tresor/ct/prep.h"
#include "tresor/ct/volume.h"
#include "tresor/identity.h"
#include "tresor/sealed.h"
#include "tresor/gpu.h"
#include "tresor/gpu/channel.h"
#include "tresor/gpu/loader.h"
#include "tresor/gpu/nccl.h"
#include "tresor/gpu/trainer.h"
#include "tresor/gpu/unet.h"
#include "tresor/train/collective.h"
#include "tresor/train/trainer.h"

namespace tresor {
namespace {

using gpu::train::Backend;
using gpu::train::Where;
using train::Collective;
using train::TrainerOptions;
using train::TrainingLog;
using train::UNet;

constexpr Where kEmulated{Backend::kEmulated, 0};
constexpr Where kDevice{Backend::kDevice, 0};
constexpr double kWeightTol = 1e-6;  // of the largest weight (see above)
constexpr double kLossTol = 1e-5;    // relative

using testing::small_case;

TrainerOptions dp_options(bool deep) { return testing::data_parallel_options(deep); }

// A DeviceCollective over host memory (what "device memory" is on the emulation), summing through
// a CPU collective: the GPU loop's in-place gradient path, exercised without NCCL.
class HostMemoryCollective final : public gpu::DeviceCollective {
 public:
  explicit HostMemoryCollective(Collective& c) : c_(c) {}
  int rank() const override { return c_.rank(); }
  int size() const override { return c_.size(); }
  int device() const override { return 0; }
  bool host_memory() const override { return !pretend_device; }
  Result<void> all_reduce_sum(float* d_data, size_t count, void*) override {
    ++reduced;
    return c_.all_reduce_sum(std::span<float>(d_data, count));
  }
  Result<void> broadcast(float* d_data, size_t count, int root, void*) override { return c_.broadcast(std::span<float>(d_data, count), root); }
  // The host's reduction is done when all_reduce_sum returns; `fail_wait` stands for NCCL finding
  // a peer gone while the loop waits.
  Result<void> wait(void*) override {
    ++waited;
    if (fail_wait) return fail(ErrorCode::kUnavailable, "nccl: a collective failed on rank 0: remote process exited or there was a network error");
    return {};
  }
  int reduced = 0, waited = 0;
  bool fail_wait = false;
  bool pretend_device = false;  // claims device memory, as NCCL does

 private:
  Collective& c_;
};

template <typename F>
void on_tcp_ranks(int ranks, const std::string& dir, F&& fn) {
  std::vector<std::jthread> threads;
  for (int r = 0; r < ranks; ++r) {
    threads.emplace_back([&, r] {
      train::Rendezvous rv;
      rv.rank = r;
      rv.size = ranks;
      rv.directory = dir;
      rv.run_id = "gpu";
      rv.join_timeout_ms = 20'000;
      rv.io_timeout_ms = 60'000;
      auto c = train::connect_tcp(rv);
      ASSERT_TRUE(c) << c.error().message;
      fn(r, **c);
    });
  }
}

template <typename F>
void on_shared_ranks(int ranks, F&& fn) {
  auto group = train::SharedMemoryGroup::create(ranks);
  ASSERT_TRUE(group);
  std::vector<std::unique_ptr<Collective>> members;
  for (int r = 0; r < ranks; ++r) members.push_back(std::move(*(*group)->member(r)));
  std::vector<std::jthread> threads;
  for (int r = 0; r < ranks; ++r) threads.emplace_back([&, r] { fn(r, *members[static_cast<size_t>(r)]); });
}

struct TrainedRun {
  std::vector<float> weights;
  TrainingLog log;
};

double weight_gap(const std::vector<float>& a, const std::vector<float>& b, double* largest) {
  double worst = 0, mag = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    worst = std::max(worst, static_cast<double>(std::abs(a[i] - b[i])));
    mag = std::max(mag, static_cast<double>(std::abs(a[i])));
  }
  *largest = mag;
  return worst;
}

// Two ranks over `backend` against `one` (a single rank on the global batch).
void check_two_ranks(const TrainerOptions& o, Where where, const TrainedRun& one, const std::string& backend) {
  SCOPED_TRACE(backend);
  const ct::Prepared& c = *small_case();
  std::vector<TrainedRun> runs(2);
  std::vector<int> device_reductions(2, -1);
  auto run = [&](int r, Collective& comm) {
    auto net = UNet::create(o.model, r == 0 ? 7 : 1234);  // rank 1 starts elsewhere: rank 0's weights are broadcast
    ASSERT_TRUE(net);
    TrainerOptions ro = o;
    ro.collective = &comm;
    std::unique_ptr<HostMemoryCollective> dc;
    if (backend.find("in place") != std::string::npos) dc = std::make_unique<HostMemoryCollective>(comm);
    auto log = gpu::train::train_unet_gpu(*net, {&c}, {&c}, ro, where, {}, nullptr, dc.get());
    ASSERT_TRUE(log) << log.error().message;
    runs[static_cast<size_t>(r)] = {net->parameters(), *log};
    if (dc) device_reductions[static_cast<size_t>(r)] = dc->reduced;
  };
  if (backend.find("tcp") != std::string::npos) {
    testing::TempDir dir;
    on_tcp_ranks(2, dir.path().string(), run);
  } else {
    on_shared_ranks(2, run);
  }
  if (backend.find("in place") != std::string::npos) {
    EXPECT_EQ(device_reductions, (std::vector<int>{3, 3})) << "one in-place gradient all-reduce per step";
  }
  EXPECT_TRUE(runs[0].weights == runs[1].weights) << "every rank holds the same weights";
  double largest = 0;
  const double gap = weight_gap(one.weights, runs[0].weights, &largest);
  std::printf("  %s: 2 ranks against 1, largest weight difference %.3g (%.2g of the largest weight %.3g)\n", backend.c_str(), gap, gap / largest, largest);
  EXPECT_LE(gap, kWeightTol * largest);
  ASSERT_EQ(runs[0].log.loss.size(), one.log.loss.size());
  for (size_t i = 0; i < one.log.loss.size(); ++i) {
    EXPECT_NEAR(runs[0].log.loss[i], one.log.loss[i], kLossTol * std::abs(one.log.loss[i])) << "step " << i;
    std::printf("    step %zu loss %.9f (1 rank %.9f)\n", i + 1, runs[0].log.loss[i], one.log.loss[i]);
  }
  EXPECT_EQ(runs[0].log.loss, runs[1].log.loss) << "every rank reports the global loss";
  ASSERT_EQ(runs[0].log.val_dice.size(), one.log.val_dice.size());
  for (size_t i = 0; i < one.log.val_dice.size(); ++i) {
    EXPECT_NEAR(runs[0].log.val_dice[i].second, one.log.val_dice[i].second, 1e-6);
  }
  EXPECT_EQ(runs[0].log.val_dice, runs[1].log.val_dice);
}

TrainedRun single_rank(const TrainerOptions& o, Where where) {
  TrainedRun one;
  auto net = UNet::create(o.model, 7);
  EXPECT_TRUE(net);
  if (!net) return one;
  auto log = gpu::train::train_unet_gpu(*net, {small_case()}, {small_case()}, o, where);
  EXPECT_TRUE(log) << log.error().message;
  if (!log) return one;
  one = {net->parameters(), *log};
  // The weights moved: the comparison is not of untouched initial weights.
  auto fresh = UNet::create(o.model, 7);
  EXPECT_FALSE(fresh->parameters() == one.weights);
  return one;
}

// The loop validates in batches of its training batch (the last one padded), so that the
// network's buffers keep one shape; the Dice must be the one of a single forward over every
// validation patch: 5 patches in batches of 2 (2 + 2 + 1 padded with a zero sample).
TEST(GpuTrainerEmulation, ValidationInTrainingBatchesGivesTheWholeSetsDice) {
  TrainerOptions o = dp_options(false);
  o.batch = 2;
  o.validation_patches = 5;
  o.steps = 1;
  o.validate_every = 1;
  auto net = UNet::create(o.model, 7);
  ASSERT_TRUE(net);
  auto log = gpu::train::train_unet_gpu(*net, {small_case()}, {small_case()}, o, kEmulated);
  ASSERT_TRUE(log) << log.error().message;
  ASSERT_EQ(log->val_dice.size(), 2u);
  auto at_start = UNet::create(o.model, 7);
  ASSERT_TRUE(at_start);
  auto g = gpu::train::GpuUNet::create(*at_start, kEmulated);
  ASSERT_TRUE(g);
  auto vb = train::validation_batch({small_case()}, o);
  ASSERT_TRUE(vb) << vb.error().message;
  ASSERT_EQ(vb->first.shape[0], 5u);
  auto logits = g->forward(vb->first);
  ASSERT_TRUE(logits) << logits.error().message;
  const double whole = train::dice_of_prediction(*logits, vb->second);
  std::printf("  validation Dice at the start: %.9f (one forward of all 5 patches: %.9f)\n", log->val_dice[0].second, whole);
  EXPECT_EQ(log->val_dice[0].second, whole);
  EXPECT_GT(whole, 0.0) << "a Dice of 0 would not show a lost or doubled patch";
  // Counting the padded sample, or dropping the last patch, would give another value.
  auto four = train::validation_batch({small_case()}, [&] {
    TrainerOptions f = o;
    f.validation_patches = 4;
    return f;
  }());
  ASSERT_TRUE(four);
  auto l4 = g->forward(four->first);
  ASSERT_TRUE(l4);
  EXPECT_NE(train::dice_of_prediction(*l4, four->second), whole);
}

TEST(GpuDataParallelEmulation, TwoRanksTrainTheSameWeightsAsOne) {
  ASSERT_NE(small_case(), nullptr);
  const auto t0 = std::chrono::steady_clock::now();
  for (bool deep : {false, true}) {
    SCOPED_TRACE(deep ? "deep supervision" : "one output");
    std::printf("%s\n", deep ? "deep supervision (levels 3)" : "one output (levels 2)");
    const TrainerOptions o = dp_options(deep);
    const TrainedRun one = single_rank(o, kEmulated);
    check_two_ranks(o, kEmulated, one, "shared memory");
    check_two_ranks(o, kEmulated, one, deep ? "shared memory, gradient in place" : "tcp");
  }
  std::printf("(%.1f s)\n", std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
}

TEST(GpuDataParallelEmulation, RefusalsNameTheReason) {
  const ct::Prepared* cp = small_case();
  ASSERT_NE(cp, nullptr);
  auto group = train::SharedMemoryGroup::create(2);
  ASSERT_TRUE(group);
  auto m0 = (*group)->member(0);
  ASSERT_TRUE(m0);
  TrainerOptions o = dp_options(false);
  auto net = UNet::create(o.model, 7);
  ASSERT_TRUE(net);
  auto expect_refused = [&](const TrainerOptions& opts, gpu::DeviceCollective* dc, const std::string& want) {
    auto r = gpu::train::train_unet_gpu(*net, {cp}, {cp}, opts, kEmulated, {}, nullptr, dc);
    ASSERT_FALSE(r) << want;
    EXPECT_EQ(r.error().code, ErrorCode::kInvalidArgument);
    EXPECT_NE(r.error().message.find(want), std::string::npos) << r.error().message;
  };
  o.collective = m0->get();
  o.batch = 1;
  expect_refused(o, nullptr, "a global batch of 1 cannot be shared by 2 ranks");
  o.batch = 2;
  o.validation_patches = 1;
  expect_refused(o, nullptr, "1 validation patches cannot be shared by 2 ranks");
  // A device collective needs the CPU one, of the same ranks.
  o = dp_options(false);
  HostMemoryCollective dc(**m0);
  expect_refused(o, &dc, "a device collective needs options.collective too");
  auto solo = train::SharedMemoryGroup::create(1);
  ASSERT_TRUE(solo);
  auto s0 = (*solo)->member(0);
  ASSERT_TRUE(s0);
  o.collective = s0->get();
  expect_refused(o, &dc, "the device collective is rank 0 of 2, the CPU collective rank 0 of 1");
  // A collective on device memory (NCCL) handed to the emulation's host buffers.
  HostMemoryCollective nccl_like(**s0);
  nccl_like.pretend_device = true;
  expect_refused(o, &nccl_like, "the device collective (NCCL) needs CUDA device memory, but training runs on the emulation");
  // The passing twin: one rank with both collectives trains (its all-reduces are identities) and
  // gives the same bits as no collective at all.
  o.steps = 1;
  o.validate_every = 1;
  HostMemoryCollective solo_dc(**s0);
  auto a = UNet::create(o.model, 7);
  auto b = UNet::create(o.model, 7);
  auto ra = gpu::train::train_unet_gpu(*a, {cp}, {cp}, o, kEmulated, {}, nullptr, &solo_dc);
  ASSERT_TRUE(ra) << ra.error().message;
  EXPECT_EQ(solo_dc.reduced, 1);
  EXPECT_EQ(solo_dc.waited, 1) << "each all-reduce is waited for with the collective's watch";
  // The failing twin: the collective reports a dead peer while the step waits; training stops
  // with its error instead of hanging or going on.
  HostMemoryCollective dying(**s0);
  dying.fail_wait = true;
  auto c = UNet::create(o.model, 7);
  auto rc = gpu::train::train_unet_gpu(*c, {cp}, {cp}, o, kEmulated, {}, nullptr, &dying);
  ASSERT_TRUE(testing::FailsWith(rc, ErrorCode::kUnavailable));
  EXPECT_NE(rc.error().message.find("remote process exited"), std::string::npos) << rc.error().message;
  o.collective = nullptr;
  auto rb = gpu::train::train_unet_gpu(*b, {cp}, {cp}, o, kEmulated);
  ASSERT_TRUE(rb) << rb.error().message;
  EXPECT_TRUE(a->parameters() == b->parameters());
  EXPECT_EQ(ra->loss, rb->loss);
}

// ------------------------------------------------------------------------------------------------
// Batches from the GPU data loader (DeviceDataset): small_case() written as a sealed prepared case
// (image, vesselness, labels .nii.sealed to a test identity), loaded through the secure channel on
// `device`, trained on `where` for 3 steps; the same run with the host's batches (PatchSource) on
// the case as the CPU reader reads those files gives the same weights, losses and validation Dice
// to the bit. Validation every step, 3 patches against a batch of 4: the network's buffers are
// reallocated between the steps, and the loader writes into the new ones.
struct SealedCase {
  Identity id = *Identity::generate();
  testing::TempDir dir;
  std::string path;
  ct::Prepared read_back;  // what the CPU reader makes of the files
  sealed::KeyRing ring() const {
    sealed::KeyRing r;
    r.identities = {&id};
    return r;
  }
};
std::unique_ptr<SealedCase> sealed_case() {
  auto sc = std::make_unique<SealedCase>();
  const ct::Prepared& c = *small_case();
  sc->path = sc->dir.file("case");
  std::filesystem::create_directories(sc->path);
  sealed::SealOptions so;
  so.chunk_size = 64 << 10;
  so.recipients = {sc->id.recipient()};
  auto image = ct::nifti_bytes(c.image), vesselness = ct::nifti_bytes(c.vesselness), labels = ct::nifti_bytes(*c.labels);
  EXPECT_TRUE(image && vesselness && labels);
  if (!image || !vesselness || !labels) return nullptr;
  for (auto [base, bytes] : {std::pair{"image", &*image}, {"vesselness", &*vesselness}, {"labels", &*labels}}) {
    auto s = sealed::seal_buffer(*bytes, so);
    EXPECT_TRUE(s);
    if (!s) return nullptr;
    testing::write_file(sc->path + "/" + base + ".nii.sealed", *s);
  }
  sc->read_back.image = *ct::read_nifti_float(*image, "image");
  sc->read_back.vesselness = *ct::read_nifti_float(*vesselness, "vesselness");
  sc->read_back.labels = *ct::read_nifti_labels(*labels, "labels");
  return sc;
}

TrainerOptions dataset_options() {
  TrainerOptions o = dp_options(false);
  o.validate_every = 1;
  return o;
}

void expect_dataset_run_equals_host_run(Where where, gpu::ChannelDevice& device) {
  auto sc = sealed_case();
  ASSERT_NE(sc, nullptr);
  const TrainerOptions o = dataset_options();
  const auto t0 = std::chrono::steady_clock::now();
  auto ds = gpu::DeviceDataset::load(device, {sc->path}, sc->ring(), o);
  ASSERT_TRUE(ds) << ds.error().message;
  const ct::Prepared* val = &sc->read_back;
  double with_s = 0;
  // With one output, and with deep supervision (its smaller targets made on the device from the
  // loader's target): the same bits as the host-fed run.
  TrainerOptions deep = dp_options(true);
  deep.validate_every = 1;
  for (const TrainerOptions* to : std::initializer_list<const TrainerOptions*>{&o, &deep}) {
    SCOPED_TRACE(to == &deep ? "deep supervision" : "one output");
    auto a = UNet::create(to->model, 7);
    auto ra = gpu::train::train_unet_gpu(*a, {}, {val}, *to, where, {}, nullptr, nullptr, &*ds);
    ASSERT_TRUE(ra) << ra.error().message;
    if (to == &o) with_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    auto b = UNet::create(to->model, 7);
    auto rb = gpu::train::train_unet_gpu(*b, {val}, {val}, *to, where);
    ASSERT_TRUE(rb) << rb.error().message;
    EXPECT_FALSE(UNet::create(to->model, 7)->parameters() == a->parameters()) << "the weights moved";
    EXPECT_TRUE(a->parameters() == b->parameters()) << "the same weights to the bit";
    EXPECT_EQ(ra->loss, rb->loss);
    EXPECT_EQ(ra->val_dice, rb->val_dice);
    ASSERT_EQ(ra->loss.size(), to->steps);
    for (size_t i = 0; i < ra->loss.size(); ++i) std::printf("  step %zu loss %.9f (host batches %.9f)\n", i + 1, ra->loss[i], rb->loss[i]);
  }
  std::printf("  with the device dataset: %.1f s (load and train)\n", with_s);
}

TEST(GpuDeviceDatasetEmulation, BatchesFromTheLoaderTrainTheSameBitsAsPatchSource) {
  ASSERT_NE(small_case(), nullptr);
  auto dev = gpu::emulated_device();
  expect_dataset_run_equals_host_run(kEmulated, *dev);
}

TEST(GpuDeviceDatasetEmulation, RefusalsNameTheReason) {
  ASSERT_NE(small_case(), nullptr);
  auto sc = sealed_case();
  ASSERT_NE(sc, nullptr);
  auto dev = gpu::cpu_device(1);
  TrainerOptions o = dataset_options();
  auto ds = gpu::DeviceDataset::load(*dev, {sc->path}, sc->ring(), o);
  ASSERT_TRUE(ds) << ds.error().message;
  const ct::Prepared* val = &sc->read_back;
  auto expect_refused = [&](const TrainerOptions& to, Where where, const std::string& words) {
    auto net = UNet::create(to.model, 7);
    ASSERT_TRUE(net);
    auto r = gpu::train::train_unet_gpu(*net, {}, {val}, to, where, {}, nullptr, nullptr, &*ds);
    ASSERT_FALSE(r);
    EXPECT_EQ(r.error().code, ErrorCode::kInvalidArgument);
    EXPECT_NE(r.error().message.find(words), std::string::npos) << r.error().message;
  };
  TrainerOptions other = o;
  other.patch = 32;
  expect_refused(other, kEmulated, "loaded for patches of 16");
  expect_refused(o, kDevice, "training on cuda:0");  // a host-memory device's data, a CUDA network
  auto none = UNet::create(o.model, 7);
  auto r = gpu::train::train_unet_gpu(*none, {}, {val}, o, kEmulated);
  ASSERT_FALSE(r) << "no dataset and no training case";
}

// ------------------------------------------------------------------------------------------------
// The device (skipped, saying why, without one).

// Two ranks as threads sharing one device (two GpuUNets, two streams; the gradient summed through
// host memory) against one rank; the tolerance as on the emulation (the device's tensor-core
// summation order differs from the emulation's, not between the ranks).
TEST(GpuDataParallelDevice, TwoRanksTrainTheSameWeightsAsOne) {
  auto devs = gpu::gpu_probe();
  TRESOR_SKIP_WITHOUT_GPU(devs);
  ASSERT_NE(small_case(), nullptr);
  for (bool deep : {false, true}) {
    SCOPED_TRACE(deep ? "deep supervision" : "one output");
    const TrainerOptions o = dp_options(deep);
    const TrainedRun one = single_rank(o, kDevice);
    check_two_ranks(o, kDevice, one, "shared memory, device");
  }
}

// NCCL in the loop: one rank (NCCL cannot put two ranks on one GPU) with the gradient reduced in
// place by NCCL gives the bits of the loop without a collective (a sum over one rank is a copy).
TEST(GpuDataParallelDevice, OneNcclRankEqualsNoCollective) {
  auto devs = gpu::gpu_probe();
  TRESOR_SKIP_WITHOUT_GPU(devs);
  if (!gpu::nccl_built()) GTEST_SKIP() << "this build has no NCCL";
  ASSERT_NE(small_case(), nullptr);
  auto solo = train::SharedMemoryGroup::create(1);
  ASSERT_TRUE(solo);
  auto s0 = (*solo)->member(0);
  ASSERT_TRUE(s0);
  auto nccl = gpu::connect_nccl(**s0, 0);
  ASSERT_TRUE(nccl) << nccl.error().message;
  TrainerOptions o = dp_options(true);
  o.collective = s0->get();
  auto a = UNet::create(o.model, 7);
  auto ra = gpu::train::train_unet_gpu(*a, {small_case()}, {small_case()}, o, kDevice, {}, nullptr, nccl->get());
  ASSERT_TRUE(ra) << ra.error().message;
  o.collective = nullptr;
  auto b = UNet::create(o.model, 7);
  auto rb = gpu::train::train_unet_gpu(*b, {small_case()}, {small_case()}, o, kDevice);
  ASSERT_TRUE(rb) << rb.error().message;
  EXPECT_TRUE(a->parameters() == b->parameters());
  EXPECT_EQ(ra->loss, rb->loss);
}

// The loader's batches on the GPU (cuda_device(0), the loader's kernels) against the host's.
TEST(GpuDeviceDatasetDevice, BatchesFromTheLoaderTrainTheSameBitsAsPatchSource) {
  auto devs = gpu::gpu_probe();
  TRESOR_SKIP_WITHOUT_GPU(devs);
  ASSERT_NE(small_case(), nullptr);
  auto dev = gpu::cuda_device(0);
  ASSERT_TRUE(dev) << dev.error().message;
  expect_dataset_run_equals_host_run(kDevice, **dev);
}

}  // namespace
}  // namespace tresor
