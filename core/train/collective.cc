// The CPU collective backend (include/tresor/train/collective.h): ranks are threads; a call
// deposits each rank's buffer, every rank sums its own slice over all ranks in rank order into a
// shared result, and every rank copies the result back. Three barrier phases per call.
#include "tresor/train/collective.h"

#include <barrier>
#include <mutex>
#include <vector>

namespace tresor::train {
namespace {

class Group final : public SharedMemoryGroup, public std::enable_shared_from_this<Group> {
 public:
  explicit Group(int n) : n_(n), sync_(n), spans_(static_cast<size_t>(n)), claimed_(static_cast<size_t>(n), false) {}
  Result<std::unique_ptr<Collective>> member(int rank) override;
  int n_;
  std::barrier<> sync_;
  std::vector<std::span<float>> spans_;
  std::vector<float> result_;
  std::mutex mu_;
  std::vector<bool> claimed_;
};

class Member final : public Collective {
 public:
  Member(std::shared_ptr<Group> g, int rank) : g_(std::move(g)), rank_(rank) {}
  int rank() const override { return rank_; }
  int size() const override { return g_->n_; }

  Result<void> all_reduce_sum(std::span<float> data) override {
    Group& g = *g_;
    g.spans_[static_cast<size_t>(rank_)] = data;
    g.sync_.arrive_and_wait();  // 1: every buffer deposited
    const size_t n = g.spans_[0].size();
    bool same = true;
    for (const auto& s : g.spans_) same = same && s.size() == n;
    if (rank_ == 0 && same) g.result_.assign(n, 0.0f);
    g.sync_.arrive_and_wait();  // 2: the result buffer exists (or every rank knows the lengths differ)
    if (!same) {
      g.sync_.arrive_and_wait();
      g.sync_.arrive_and_wait();
      return fail(ErrorCode::kInvalidArgument, "all-reduce: the ranks passed buffers of different lengths");
    }
    const size_t ranks = static_cast<size_t>(g.n_), r = static_cast<size_t>(rank_);
    const size_t lo = n * r / ranks, hi = n * (r + 1) / ranks;
    for (size_t i = lo; i < hi; ++i) {
      float acc = 0;
      for (size_t k = 0; k < ranks; ++k) acc += g.spans_[k][i];
      g.result_[i] = acc;
    }
    g.sync_.arrive_and_wait();  // 3: every slice summed
    std::copy(g.result_.begin(), g.result_.end(), data.begin());
    g.sync_.arrive_and_wait();  // 4: every rank has copied before the next call reuses the buffers
    return {};
  }

  Result<void> broadcast(std::span<float> data, int root) override {
    Group& g = *g_;
    if (root < 0 || root >= g.n_) return fail(ErrorCode::kInvalidArgument, "broadcast: root " + std::to_string(root) + " is not a rank");
    g.spans_[static_cast<size_t>(rank_)] = data;
    g.sync_.arrive_and_wait();
    const bool same = g.spans_[static_cast<size_t>(root)].size() == data.size();
    if (same && rank_ != root) std::copy(g.spans_[static_cast<size_t>(root)].begin(), g.spans_[static_cast<size_t>(root)].end(), data.begin());
    g.sync_.arrive_and_wait();
    if (!same) return fail(ErrorCode::kInvalidArgument, "broadcast: this rank's buffer differs in length from the root's");
    return {};
  }

 private:
  std::shared_ptr<Group> g_;
  int rank_;
};

Result<std::unique_ptr<Collective>> Group::member(int rank) {
  std::lock_guard lock(mu_);
  if (rank < 0 || rank >= n_) return fail(ErrorCode::kInvalidArgument, "collective: rank " + std::to_string(rank) + " is not in a group of " + std::to_string(n_));
  if (claimed_[static_cast<size_t>(rank)]) return fail(ErrorCode::kInvalidArgument, "collective: rank " + std::to_string(rank) + " is already taken");
  claimed_[static_cast<size_t>(rank)] = true;
  return std::unique_ptr<Collective>(std::make_unique<Member>(shared_from_this(), rank));
}

}  // namespace

Result<std::shared_ptr<SharedMemoryGroup>> SharedMemoryGroup::create(int size) {
  if (size < 1 || size > 1024) return fail(ErrorCode::kInvalidArgument, "collective: a group of " + std::to_string(size) + " ranks");
  return std::shared_ptr<SharedMemoryGroup>(std::make_shared<Group>(size));
}

}  // namespace tresor::train
