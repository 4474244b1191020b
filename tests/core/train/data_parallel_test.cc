// Data parallelism on CPUs (include/tresor/train/collective.h, docs/training.md §5): the TCP
// backend between ranks over real loopback sockets (its sums equal the shared-memory backend's bit
// for bit, its failures are named), the overlapped bucketed gradient all-reduce, Slurm's rank
// variables, and whole training runs on 2 ranks against 1 rank on the same global batch (the
// loss's batch Dice included).
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <map>
#include <random>
#include <thread>

#include "support/small_case.h"
#include "support/test_support.h"
#include "tresor/train/collective.h"
#include "tresor/train/trainer.h"

namespace tresor::train {
namespace {

// Runs fn(rank, collective) with every rank on its own thread, connected over TCP on 127.0.0.1.
template <typename F>
void on_tcp_ranks(int ranks, const std::string& dir, F&& fn, const std::string& run_id = "t") {
  std::vector<std::jthread> threads;
  for (int r = 0; r < ranks; ++r) {
    threads.emplace_back([&, r] {
      Rendezvous rv;
      rv.rank = r;
      rv.size = ranks;
      rv.directory = dir;
      rv.run_id = run_id;
      rv.join_timeout_ms = 20'000;
      rv.io_timeout_ms = 20'000;
      auto c = connect_tcp(rv);
      ASSERT_TRUE(c) << c.error().message;
      fn(r, **c);
    });
  }
}

TEST(TcpCollective, SumsInRankOrderLikeTheSharedMemoryBackend) {
  testing::TempDir dir;
  const int ranks = 3;
  const size_t n = 100'003;  // several socket buffers, not a multiple of anything
  std::vector<std::vector<float>> out(ranks);
  std::vector<std::vector<double>> out_d(ranks);
  std::vector<std::vector<float>> bcast(ranks);
  on_tcp_ranks(ranks, dir.path().string(), [&](int r, Collective& c) {
    EXPECT_EQ(c.rank(), r);
    EXPECT_EQ(c.size(), ranks);
    for (uint32_t call = 0; call < 3; ++call) {
      std::vector<float> v = testing::normal_floats(n, 10 * call + static_cast<uint32_t>(r));
      ASSERT_TRUE(c.all_reduce_sum(v));
      if (call == 2) out[static_cast<size_t>(r)] = v;
    }
    std::vector<double> d = {1e16 * (r + 1), 1.0, static_cast<double>(r)};
    ASSERT_TRUE(c.all_reduce_sum(std::span<double>(d)));
    out_d[static_cast<size_t>(r)] = d;
    std::vector<float> b(7, static_cast<float>(r));
    ASSERT_TRUE(c.broadcast(b, 2));
    bcast[static_cast<size_t>(r)] = b;
  });
  // The reference: the sum in rank order, rounded to float after every addition.
  std::vector<float> want(n, 0.0f);
  for (int r = 0; r < ranks; ++r) {
    const auto v = testing::normal_floats(n, 20 + static_cast<uint32_t>(r));
    for (size_t i = 0; i < n; ++i) want[i] += v[i];
  }
  for (int r = 0; r < ranks; ++r) {
    EXPECT_TRUE(out[static_cast<size_t>(r)] == want) << "rank " << r;
    EXPECT_EQ(out_d[static_cast<size_t>(r)], (std::vector<double>{6e16, 3.0, 3.0}));
    EXPECT_EQ(bcast[static_cast<size_t>(r)], std::vector<float>(7, 2.0f));
  }
  // The rendezvous file is gone once everyone joined.
  EXPECT_FALSE(std::filesystem::exists(dir.file("tresor-dp-t.json")));
}

TEST(TcpCollective, MismatchesFailOnEveryRankAndTheGroupGoesOn) {
  testing::TempDir dir;
  std::vector<std::string> errors(2);
  std::vector<float> after(2);
  on_tcp_ranks(2, dir.path().string(), [&](int r, Collective& c) {
    std::vector<float> odd(r == 1 ? 4 : 5, 1.0f);
    auto e = c.all_reduce_sum(odd);
    errors[static_cast<size_t>(r)] = e ? "" : e.error().message;
    std::vector<double> typed(5, 1.0);  // rank 0 floats, rank 1 doubles
    std::vector<float> typed_f(5, 1.0f);
    auto t = r == 0 ? c.all_reduce_sum(typed_f) : c.all_reduce_sum(std::span<double>(typed));
    EXPECT_FALSE(t);
    std::vector<float> v{static_cast<float>(r + 1)};
    EXPECT_TRUE(c.all_reduce_sum(v));
    after[static_cast<size_t>(r)] = v[0];
    EXPECT_FALSE(c.broadcast(v, 2));
  });
  for (const auto& e : errors) EXPECT_NE(e.find("buffers of different lengths or types"), std::string::npos) << e;
  EXPECT_EQ(after, (std::vector<float>{3.0f, 3.0f}));
}

TEST(TcpCollective, APeerThatExitsIsNamedAndNothingHangs) {
  testing::TempDir dir;
  std::string error;
  on_tcp_ranks(2, dir.path().string(), [&](int r, Collective& c) {
    if (r == 1) return;  // leaves: its connection closes when the collective is destroyed
    std::vector<float> v(10, 1.0f);
    auto e = c.all_reduce_sum(v);
    ASSERT_FALSE(e);
    error = e.error().message;
  });
  EXPECT_NE(error.find("rank 1 closed its connection"), std::string::npos) << error;
}

TEST(TcpCollective, JoiningFailuresNameWhatIsMissing) {
  testing::TempDir dir;
  Rendezvous rv;
  rv.size = 3;
  rv.directory = dir.path().string();
  rv.join_timeout_ms = 300;
  auto lonely = connect_tcp(rv);  // rank 0 alone: ranks 1 and 2 never come
  ASSERT_FALSE(lonely);
  EXPECT_NE(lonely.error().message.find("rank(s) 1, 2 of 3 did not join"), std::string::npos) << lonely.error().message;
  EXPECT_FALSE(std::filesystem::exists(dir.file("tresor-dp-local.json"))) << "rank 0 removes its file when it gives up";
  rv.rank = 1;
  auto orphan = connect_tcp(rv);  // no rank 0
  ASSERT_FALSE(orphan);
  EXPECT_NE(orphan.error().message.find("found no rank 0 through"), std::string::npos) << orphan.error().message;
  // A stale file from an earlier run (nobody listens at its port) is waited out, then named.
  testing::write_file(dir.file("tresor-dp-local.json"), as_bytes(R"({"port": 9, "token": ")" + std::string(64, 'a') + R"(", "size": 3})"), 0600);
  auto stale = connect_tcp(rv);
  ASSERT_FALSE(stale);
  EXPECT_NE(stale.error().message.find("127.0.0.1:9 refused the connection"), std::string::npos) << stale.error().message;
  // A file for another group size is an error at once.
  testing::write_file(dir.file("tresor-dp-local.json"), as_bytes(R"({"port": 9, "token": "00", "size": 4})"), 0600);
  auto other = connect_tcp(rv);
  ASSERT_FALSE(other);
  EXPECT_NE(other.error().message.find("is for 4 ranks, this rank expects 3"), std::string::npos) << other.error().message;
  // Bad arguments.
  rv.run_id = "../x";
  EXPECT_NE(connect_tcp(rv).error().message.find("run id"), std::string::npos);
  rv.run_id = "ok";
  rv.directory = dir.file("missing");
  EXPECT_NE(connect_tcp(rv).error().message.find("does not exist"), std::string::npos);
  rv.directory = dir.path().string();
  rv.rank = 3;
  EXPECT_NE(connect_tcp(rv).error().message.find("rank 3 is not in a group of 3"), std::string::npos);
}

TEST(TcpCollective, ARankWithTheWrongTokenIsRefused) {
  testing::TempDir dir;
  // Rank 0 of a group of 2 waits; an impostor reads nothing but guesses a token and is refused;
  // rank 0 then times out naming the refusal.
  std::string error;
  std::jthread zero([&] {
    Rendezvous rv;
    rv.size = 2;
    rv.directory = dir.path().string();
    rv.join_timeout_ms = 1500;
    auto c = connect_tcp(rv);
    error = c ? "" : c.error().message;
  });
  const auto file = dir.file("tresor-dp-local.json");
  for (int i = 0; i < 200 && !std::filesystem::exists(file); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  ASSERT_TRUE(std::filesystem::exists(file));
  EXPECT_EQ(std::filesystem::status(file).permissions() & std::filesystem::perms::all, std::filesystem::perms::owner_read | std::filesystem::perms::owner_write);
  const Bytes text = testing::read_file(file);

  std::string s(reinterpret_cast<const char*>(text.data()), text.size());
  const auto tok = s.find("\"token\":\"") + 9;
  s[tok] = s[tok] == '0' ? '1' : '0';  // one hex digit off
  testing::TempDir other;
  testing::write_file(other.file("tresor-dp-local.json"), as_bytes(s), 0600);
  Rendezvous rv;
  rv.rank = 1;
  rv.size = 2;
  rv.directory = other.path().string();
  rv.join_timeout_ms = 500;
  auto impostor = connect_tcp(rv);
  ASSERT_FALSE(impostor);
  EXPECT_NE(impostor.error().message.find("refused rank 1"), std::string::npos) << impostor.error().message;
  zero.join();
  EXPECT_NE(error.find("refused: a connection with a wrong token"), std::string::npos) << error;
}

TEST(OverlappedAllReduce, ReducesEveryBucketAndStartsBeforeTheEnd) {
  auto group = SharedMemoryGroup::create(2);
  ASSERT_TRUE(group);
  std::vector<std::unique_ptr<Collective>> members;
  for (int r = 0; r < 2; ++r) members.push_back(std::move(*(*group)->member(r)));
  std::vector<std::vector<float>> grads(2);
  std::vector<size_t> early(2), buckets(2);
  {
    std::vector<std::jthread> threads;
    for (int r = 0; r < 2; ++r) {
      threads.emplace_back([&, r] {
        std::vector<float>& g = grads[static_cast<size_t>(r)];
        g = testing::normal_floats(1000, static_cast<uint32_t>(r));
        OverlappedAllReduce red(*members[static_cast<size_t>(r)], g, 64);
        // Arrays reported from the end backwards, as a backward pass does, some overlapping.
        for (size_t end = 1000; end > 0;) {
          const size_t n = std::min<size_t>(end, 37);
          red.ready(end - n, n);
          red.ready(end - n, 1);  // twice: counts once
          end -= n;
        }
        red.ready(5000, 10);  // out of range: ignored
        ASSERT_TRUE(red.finish());
        early[static_cast<size_t>(r)] = red.buckets_queued_early();
        buckets[static_cast<size_t>(r)] = red.buckets();
      });
    }
  }
  const auto a = testing::normal_floats(1000, 0), b = testing::normal_floats(1000, 1);
  for (size_t i = 0; i < 1000; ++i) ASSERT_EQ(grads[0][i], a[i] + b[i]) << i;
  EXPECT_EQ(grads[0], grads[1]);
  EXPECT_EQ(buckets[0], 16u);
  EXPECT_EQ(early[0], 16u) << "every bucket was queued during the pass";
  // A bucket never reported is still reduced by finish().
  std::vector<float> g2(2, 1.0f), g3(2, 2.0f);
  std::jthread t([&] {
    OverlappedAllReduce red(*members[1], g3, 1);
    ASSERT_TRUE(red.finish());
    EXPECT_EQ(red.buckets_queued_early(), 0u);
  });
  OverlappedAllReduce red(*members[0], g2, 1);
  red.ready(0, 1);
  ASSERT_TRUE(red.finish());
  t.join();
  EXPECT_EQ(g2, (std::vector<float>{3.0f, 3.0f}));
}

TEST(SlurmRanks, ReadFromTheStepsEnvironment) {
  auto env = [](std::map<std::string, std::string> m) {
    return [m](const char* name) -> const char* {
      auto it = m.find(name);
      return it == m.end() ? nullptr : it->second.c_str();
    };
  };
  auto none = ranks_from_slurm(env({}));
  ASSERT_TRUE(none);
  EXPECT_FALSE(*none) << "outside Slurm: one rank";
  auto single = ranks_from_slurm(env({{"SLURM_NTASKS", "1"}, {"SLURM_PROCID", "0"}}));
  ASSERT_TRUE(single);
  EXPECT_FALSE(*single);
  auto two = ranks_from_slurm(env({{"SLURM_NTASKS", "4"}, {"SLURM_PROCID", "3"}, {"SLURM_LOCALID", "1"}, {"SLURM_NNODES", "2"}, {"SLURM_JOB_ID", "77"}, {"SLURM_STEP_ID", "12"}}));
  ASSERT_TRUE(two) << two.error().message;
  ASSERT_TRUE(*two);
  EXPECT_EQ((*two)->rank, 3);
  EXPECT_EQ((*two)->size, 4);
  EXPECT_EQ((*two)->local_rank, 1);
  EXPECT_EQ((*two)->nodes, 2);
  EXPECT_EQ((*two)->run_id, "77.12");
  // The batch script of `sbatch -n 2`: SLURM_NTASKS=2 and SLURM_PROCID=0, as Slurm 22.05 sets
  // them there, but no SLURM_STEP_ID: one task (its srun steps are the ranks).
  for (const char* batch_step : {static_cast<const char*>(nullptr), "", "4294967294", "4294967293"}) {
    std::map<std::string, std::string> m = {{"SLURM_NTASKS", "2"}, {"SLURM_PROCID", "0"}, {"SLURM_NPROCS", "2"}, {"SLURM_JOB_ID", "5"}};
    if (batch_step != nullptr) m["SLURM_STEP_ID"] = batch_step;
    auto batch = ranks_from_slurm(env(m));
    ASSERT_TRUE(batch) << batch.error().message;
    EXPECT_FALSE(*batch) << "the batch script (or salloc's interactive step) is one task (SLURM_STEP_ID " << (batch_step ? batch_step : "unset") << ")";
  }
  const std::map<std::string, std::string> base = {{"SLURM_NTASKS", "2"}, {"SLURM_PROCID", "1"}, {"SLURM_LOCALID", "1"}, {"SLURM_NNODES", "1"}, {"SLURM_JOB_ID", "5"},
                                                   {"SLURM_STEP_ID", "0"}};
  auto with = [&](const std::string& k, const char* v) {
    auto m = base;
    if (v == nullptr) {
      m.erase(k);
    } else {
      m[k] = v;
    }
    auto r = ranks_from_slurm(env(m));
    return r ? std::string("ok") : r.error().message;
  };
  EXPECT_EQ(with("SLURM_STEP_ID", nullptr), "ok");
  EXPECT_NE(with("SLURM_STEP_ID", "0x1").find("SLURM_STEP_ID=0x1 is not a number"), std::string::npos);
  EXPECT_NE(with("SLURM_PROCID", nullptr).find("SLURM_PROCID is not set"), std::string::npos);
  EXPECT_NE(with("SLURM_PROCID", "2").find("SLURM_PROCID=2 is not below SLURM_NTASKS=2"), std::string::npos);
  EXPECT_NE(with("SLURM_PROCID", "1x").find("SLURM_PROCID=1x is not an integer"), std::string::npos);
  EXPECT_NE(with("SLURM_NTASKS", "0").find("SLURM_NTASKS=0"), std::string::npos);
  EXPECT_NE(with("SLURM_JOB_ID", "5;rm").find("SLURM_JOB_ID=5;rm is not a number"), std::string::npos);
  EXPECT_NE(with("SLURM_LOCALID", nullptr).find("SLURM_LOCALID is not set"), std::string::npos);
}

using testing::small_case;

TrainerOptions dp_options() {
  TrainerOptions o = testing::data_parallel_options(false);
  o.bucket_elements = 500;  // several buckets, reduced while the backward pass runs
  return o;
}

void expect_close(const std::vector<float>& a, const std::vector<float>& b, const char* what) {
  ASSERT_EQ(a.size(), b.size());
  double worst = 0, mag = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    worst = std::max(worst, static_cast<double>(std::abs(a[i] - b[i])));
    mag = std::max(mag, static_cast<double>(std::abs(a[i])));
  }
  std::printf("%s: largest weight difference %.3g (largest weight %.3g)\n", what, worst, mag);
  // Float sums of per-rank gradient slices against one sum over the batch: rounding only.
  EXPECT_LT(worst, 1e-6 * mag) << what;
}

// Three SGD steps with nnU-Net's loss (batch Dice included) over a global batch of 4: one rank,
// and two ranks (threads, shared memory; processes' transport, TCP) with 2 patches each.
TEST(DataParallelTraining, TwoRanksTrainTheSameWeightsAsOne) {
  const ct::Prepared* cp = small_case();
  ASSERT_NE(cp, nullptr);
  const ct::Prepared& c = *cp;
  for (bool deep : {false, true}) {
    SCOPED_TRACE(deep ? "deep supervision" : "one output");
    TrainerOptions o = dp_options();
    if (deep) o.model = {3, 4, 16, 2, 2, true};  // every output's loss statistics summed over the ranks
    auto single = UNet::create(o.model, 7);
    ASSERT_TRUE(single);
    auto one = train_unet(*single, {&c}, {&c}, o);
    ASSERT_TRUE(one) << one.error().message;

    for (const char* backend : {"shared memory", "tcp"}) {
      std::vector<std::vector<float>> weights(2);
      std::vector<TrainingLog> logs(2);
      auto run = [&](int r, Collective& comm) {
        auto net = UNet::create(o.model, r == 0 ? 7 : 1234);  // rank 1 starts elsewhere: rank 0's weights are broadcast
        ASSERT_TRUE(net);
        TrainerOptions ro = o;
        ro.collective = &comm;
        auto log = train_unet(*net, {&c}, {&c}, ro);
        ASSERT_TRUE(log) << log.error().message;
        logs[static_cast<size_t>(r)] = *log;
        weights[static_cast<size_t>(r)] = net->parameters();
      };
      if (std::string(backend) == "tcp") {
        testing::TempDir dir;
        on_tcp_ranks(2, dir.path().string(), run);
      } else {
        auto group = SharedMemoryGroup::create(2);
        ASSERT_TRUE(group);
        std::vector<std::unique_ptr<Collective>> members;
        for (int r = 0; r < 2; ++r) members.push_back(std::move(*(*group)->member(r)));
        std::vector<std::jthread> threads;
        for (int r = 0; r < 2; ++r) threads.emplace_back([&, r] { run(r, *members[static_cast<size_t>(r)]); });
      }
      EXPECT_TRUE(weights[0] == weights[1]) << backend << ": every rank holds the same weights";
      expect_close(single->parameters(), weights[0], backend);
      ASSERT_EQ(logs[0].loss.size(), one->loss.size());
      for (size_t i = 0; i < one->loss.size(); ++i) EXPECT_NEAR(logs[0].loss[i], one->loss[i], 1e-5 * std::abs(one->loss[i])) << backend << " step " << i;
      EXPECT_EQ(logs[0].loss, logs[1].loss) << "every rank reports the global loss";
      ASSERT_EQ(logs[0].val_dice.size(), one->val_dice.size());
      for (size_t i = 0; i < one->val_dice.size(); ++i) EXPECT_NEAR(logs[0].val_dice[i].second, one->val_dice[i].second, 1e-6) << backend;
    }
    // The weights moved: the comparison is not of untouched initial weights.
    auto fresh = UNet::create(o.model, 7);
    EXPECT_FALSE(fresh->parameters() == single->parameters());
  }
}

TEST(DataParallelTraining, ABatchTooSmallForTheRanksIsRefused) {
  const ct::Prepared* cp = small_case();
  ASSERT_NE(cp, nullptr);
  const ct::Prepared& c = *cp;
  auto group = SharedMemoryGroup::create(2);
  auto m0 = (*group)->member(0);
  TrainerOptions o = dp_options();
  o.batch = 1;
  o.collective = m0->get();
  auto net = UNet::create(o.model, 7);
  auto r = train_unet(*net, {&c}, {&c}, o);
  ASSERT_FALSE(r);
  EXPECT_NE(r.error().message.find("a global batch of 1 cannot be shared by 2 ranks"), std::string::npos) << r.error().message;
  o.batch = 2;
  o.validation_patches = 1;
  r = train_unet(*net, {&c}, {&c}, o);
  ASSERT_FALSE(r);
  EXPECT_NE(r.error().message.find("1 validation patches cannot be shared by 2 ranks"), std::string::npos) << r.error().message;
}

}  // namespace
}  // namespace tresor::train
