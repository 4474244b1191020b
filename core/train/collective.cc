// The shared-memory CPU collective backend (include/tresor/train/collective.h): ranks are
// threads; a call deposits each rank's buffer, every rank sums its own slice over all ranks in
// rank order into a shared result, and every rank copies the result back. Four barrier phases per
// call.
#include "tresor/train/collective.h"

#include <barrier>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>
#include <vector>

namespace tresor::train {
namespace {

// A rank's deposited buffer: its address, length and element type.
struct Deposit {
  void* data = nullptr;
  size_t size = 0;
  int type = 0;  // 0 float, 1 double
};

template <typename T>
constexpr int type_id() {
  return std::is_same_v<T, float> ? 0 : 1;
}

class Group final : public SharedMemoryGroup, public std::enable_shared_from_this<Group> {
 public:
  explicit Group(int n) : n_(n), sync_(n), deposits_(static_cast<size_t>(n)), claimed_(static_cast<size_t>(n), false) {}
  Result<std::unique_ptr<Collective>> member(int rank) override;
  int n_;
  std::barrier<> sync_;
  std::vector<Deposit> deposits_;
  std::vector<double> result_;  // holds floats' sums too (each rounded to float as it is added)
  std::mutex mu_;
  std::vector<bool> claimed_;
};

class Member final : public Collective {
 public:
  Member(std::shared_ptr<Group> g, int rank) : g_(std::move(g)), rank_(rank) {}
  int rank() const override { return rank_; }
  int size() const override { return g_->n_; }
  Result<void> all_reduce_sum(std::span<float> data) override { return reduce(data); }
  Result<void> all_reduce_sum(std::span<double> data) override { return reduce(data); }

  Result<void> broadcast(std::span<float> data, int root) override {
    Group& g = *g_;
    if (root < 0 || root >= g.n_) return fail(ErrorCode::kInvalidArgument, "broadcast: root " + std::to_string(root) + " is not a rank");
    g.deposits_[static_cast<size_t>(rank_)] = {data.data(), data.size(), 0};
    g.sync_.arrive_and_wait();
    const Deposit& from = g.deposits_[static_cast<size_t>(root)];
    const bool same = from.size == data.size();
    if (same && rank_ != root) std::copy_n(static_cast<const float*>(from.data), data.size(), data.begin());
    g.sync_.arrive_and_wait();
    if (!same) return fail(ErrorCode::kInvalidArgument, "broadcast: this rank's buffer differs in length from the root's");
    return {};
  }

 private:
  template <typename T>
  Result<void> reduce(std::span<T> data) {
    Group& g = *g_;
    g.deposits_[static_cast<size_t>(rank_)] = {data.data(), data.size(), type_id<T>()};
    g.sync_.arrive_and_wait();  // 1: every buffer deposited
    const size_t n = g.deposits_[0].size;
    bool same = true;
    for (const auto& d : g.deposits_) same = same && d.size == n && d.type == type_id<T>();
    if (rank_ == 0 && same) g.result_.assign(n, 0.0);
    g.sync_.arrive_and_wait();  // 2: the result buffer exists (or every rank knows the calls differ)
    if (!same) {
      g.sync_.arrive_and_wait();
      g.sync_.arrive_and_wait();
      return fail(ErrorCode::kInvalidArgument, "all-reduce: the ranks passed buffers of different lengths or types");
    }
    const size_t ranks = static_cast<size_t>(g.n_), r = static_cast<size_t>(rank_);
    const size_t lo = n * r / ranks, hi = n * (r + 1) / ranks;
    for (size_t i = lo; i < hi; ++i) {
      T acc = 0;  // in T: a float sum rounds after every addition, as the TCP backend's does
      for (size_t k = 0; k < ranks; ++k) acc += static_cast<const T*>(g.deposits_[k].data)[i];
      g.result_[i] = acc;
    }
    g.sync_.arrive_and_wait();  // 3: every slice summed
    for (size_t i = 0; i < n; ++i) data[i] = static_cast<T>(g.result_[i]);
    g.sync_.arrive_and_wait();  // 4: every rank has copied before the next call reuses the buffers
    return {};
  }

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

struct OverlappedAllReduce::State {
  std::mutex mu;
  std::condition_variable cv;
  std::deque<size_t> queue;  // bucket indices, in the order they completed
  size_t in_flight = 0;
  bool stop = false;
  std::optional<Error> error;
  std::jthread worker;
};

OverlappedAllReduce::OverlappedAllReduce(Collective& c, std::span<float> grads, size_t bucket_elements)
    : c_(c), grads_(grads), bucket_(std::max<size_t>(bucket_elements, 1)), done_(grads.size(), false), state_(std::make_unique<State>()) {
  for (size_t at = 0; at < grads.size(); at += bucket_) pending_.push_back(std::min(bucket_, grads.size() - at));
  state_->worker = std::jthread([this] {
    State& s = *state_;
    for (;;) {
      size_t b = 0;
      {
        std::unique_lock lock(s.mu);
        s.cv.wait(lock, [&] { return s.stop || !s.queue.empty(); });
        if (s.queue.empty()) return;
        b = s.queue.front();
        s.queue.pop_front();
        ++s.in_flight;
      }
      // After a failure the remaining buckets are not reduced: the collective is already broken.
      const bool failed = [&] {
        std::lock_guard lock(s.mu);
        return s.error.has_value();
      }();
      Result<void> r{};
      if (!failed) r = c_.all_reduce_sum(grads_.subspan(b * bucket_, std::min(bucket_, grads_.size() - b * bucket_)));
      std::lock_guard lock(s.mu);
      if (!r && !s.error) s.error = r.error();
      --s.in_flight;
      s.cv.notify_all();
    }
  });
}

OverlappedAllReduce::~OverlappedAllReduce() {
  {
    std::lock_guard lock(state_->mu);
    state_->stop = true;
    state_->queue.clear();  // without finish() (a failed backward pass) nothing more is reduced
  }
  state_->cv.notify_all();
}

void OverlappedAllReduce::ready(size_t offset, size_t count) {
  const size_t end = std::min(grads_.size(), offset + std::min(count, grads_.size()));
  std::vector<size_t> completed;
  for (size_t i = std::min(offset, grads_.size()); i < end; ++i) {
    if (done_[i]) continue;
    done_[i] = true;
    if (--pending_[i / bucket_] == 0) completed.push_back(i / bucket_);
  }
  if (completed.empty()) return;
  {
    std::lock_guard lock(state_->mu);
    for (size_t b : completed) state_->queue.push_back(b);
  }
  early_ += completed.size();
  state_->cv.notify_all();
}

Result<void> OverlappedAllReduce::finish() {
  State& s = *state_;
  std::unique_lock lock(s.mu);
  for (size_t b = 0; b < pending_.size(); ++b) {
    if (pending_[b] != 0) {
      pending_[b] = 0;
      s.queue.push_back(b);
    }
  }
  s.cv.notify_all();
  s.cv.wait(lock, [&] { return s.queue.empty() && s.in_flight == 0; });
  if (s.error) return std::unexpected(*s.error);
  return {};
}

}  // namespace tresor::train
