// NCCL collectives over GPU memory (include/tresor/gpu/nccl.h). Compiled with NCCL where the
// build found it (TRESOR_HAVE_NCCL); the bootstrap exchange is plain C++ and runs everywhere.
#include "tresor/gpu/nccl.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#ifdef TRESOR_HAVE_NCCL
#include <cuda_runtime_api.h>
#include <nccl.h>
#endif

namespace tresor::gpu {

Result<void> share_unique_id(tresor::train::Collective& bootstrap, std::array<std::byte, 128>& id) {
  std::vector<float> v(id.size());
  if (bootstrap.rank() == 0) {
    for (size_t i = 0; i < id.size(); ++i) v[i] = static_cast<float>(std::to_integer<unsigned>(id[i]));
  }
  TRESOR_TRY(bootstrap.broadcast(v, 0));
  for (size_t i = 0; i < id.size(); ++i) {
    if (!(v[i] >= 0 && v[i] <= 255) || v[i] != static_cast<float>(static_cast<unsigned>(v[i]))) {
      return fail(ErrorCode::kInvalidArgument, "nccl: the unique id arrived damaged at byte " + std::to_string(i));
    }
    id[i] = static_cast<std::byte>(static_cast<unsigned>(v[i]));
  }
  return {};
}

NcclWaiting NcclWaiting::real() {
  return {[] { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); },
          [](std::chrono::microseconds d) { std::this_thread::sleep_for(d); }};
}

Result<void> await_nccl(const std::function<Result<NcclProgress>()>& poll, double timeout_s, const std::string& what, int rank,
                        const std::function<void()>& give_up, const NcclWaiting& waiting) {
  const std::string on_rank = " on rank " + std::to_string(rank);
  const double deadline = waiting.now() + timeout_s;
  for (auto pause = std::chrono::microseconds(20);; pause = std::min(pause * 2, std::chrono::microseconds(5000))) {
    auto p = poll();
    if (!p) {
      give_up();
      return fail(ErrorCode::kUnavailable, "nccl: " + what + " failed" + on_rank + ": " + p.error().message + "; the communicator was aborted");
    }
    if (p->state == NcclProgress::State::kDone) return {};
    if (p->state == NcclProgress::State::kFailed) {
      give_up();
      return fail(ErrorCode::kUnavailable, "nccl: " + what + " failed" + on_rank + ": " + p->error + "; the communicator was aborted");
    }
    if (waiting.now() > deadline) {
      give_up();
      char limit[32];
      std::snprintf(limit, sizeof limit, "%g", timeout_s);
      return fail(ErrorCode::kUnavailable, "nccl: " + what + " did not finish within " + limit + " s" + on_rank +
                                               " (another rank stopped or hangs); the communicator was aborted");
    }
    waiting.pause(pause);
  }
}

#ifdef TRESOR_HAVE_NCCL

// Non-blocking communicators (ncclConfig_t::blocking = 0) came with NCCL 2.14.
#if NCCL_VERSION_CODE < NCCL_VERSION(2, 14, 0)
#error "Tresor needs NCCL 2.14 or newer (non-blocking communicators)"
#endif

bool nccl_built() { return true; }

namespace {

Result<void> nccl(ncclResult_t r, const char* what) {
  if (r != ncclSuccess) return fail(ErrorCode::kUnavailable, std::string("nccl: ") + what + ": " + ncclGetErrorString(r));
  return {};
}
// A call on a non-blocking communicator: ncclInProgress means it was accepted and is still being
// carried out; the next look at ncclCommGetAsyncError (await_nccl) tells how it ended. NCCL's
// rule: no further call on the communicator until that look says ncclSuccess.
Result<void> nccl_started(ncclResult_t r, const char* what) { return r == ncclInProgress ? Result<void>{} : nccl(r, what); }
// ncclCommGetAsyncError as one look for await_nccl.
Result<NcclProgress> async_progress(ncclComm_t comm) {
  ncclResult_t a = ncclSuccess;
  TRESOR_TRY(nccl(ncclCommGetAsyncError(comm, &a), "ncclCommGetAsyncError"));
  if (a == ncclInProgress) return NcclProgress{NcclProgress::State::kRunning, ""};
  if (a == ncclSuccess) return NcclProgress{NcclProgress::State::kDone, ""};
  return NcclProgress{NcclProgress::State::kFailed, std::string(ncclGetErrorString(a)) + " (another rank stopped, or the network between the ranks failed)"};
}
Result<void> cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess) return fail(ErrorCode::kUnavailable, std::string("nccl: ") + what + ": " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")");
  return {};
}

class Nccl final : public DeviceCollective {
 public:
  Nccl(ncclComm_t comm, int rank, int size, int device, double timeout_s)
      : comm_(comm), rank_(rank), size_(size), device_(device), timeout_s_(timeout_s) {}
  ~Nccl() override {
    (void)cudaSetDevice(device_);
    if (aborted_) return;  // an aborted communicator is already freed
    // The non-blocking teardown: finalize (completes what is queued), watch it end, destroy. A
    // peer that is gone makes the finalize fail or hang: then abort, bounded by the timeout.
    const ncclResult_t f = ncclCommFinalize(comm_);
    if (f != ncclSuccess && f != ncclInProgress) {
      abort();
      return;
    }
    if (!await_nccl([this] { return async_progress(comm_); }, timeout_s_, "the communicator's teardown", rank_, [this] { abort(); })) return;
    (void)ncclCommDestroy(comm_);
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  int device() const override { return device_; }
  bool host_memory() const override { return false; }
  Result<void> all_reduce_sum(float* d, size_t count, void* stream) override {
    TRESOR_TRY(usable());
    TRESOR_TRY(cuda(cudaSetDevice(device_), "cudaSetDevice"));
    TRESOR_TRY(settle());
    return aborting(nccl_started(ncclAllReduce(d, d, count, ncclFloat32, ncclSum, comm_, static_cast<cudaStream_t>(stream)), "ncclAllReduce"));
  }
  Result<void> broadcast(float* d, size_t count, int root, void* stream) override {
    if (root < 0 || root >= size_) return fail(ErrorCode::kInvalidArgument, "nccl: broadcast root " + std::to_string(root) + " is not a rank");
    TRESOR_TRY(usable());
    TRESOR_TRY(cuda(cudaSetDevice(device_), "cudaSetDevice"));
    TRESOR_TRY(settle());
    return aborting(nccl_started(ncclBroadcast(d, d, count, ncclFloat32, root, comm_, static_cast<cudaStream_t>(stream)), "ncclBroadcast"));
  }
  Result<void> wait(void* stream) override {
    TRESOR_TRY(usable());
    TRESOR_TRY(aborting(cuda(cudaSetDevice(device_), "cudaSetDevice")));
    const auto s = static_cast<cudaStream_t>(stream);
    // Done when NCCL has finished setting the work up (non-blocking: it may still be queueing it)
    // and the stream has run it.
    return await_nccl(
        [&]() -> Result<NcclProgress> {
          auto a = async_progress(comm_);
          if (!a || a->state != NcclProgress::State::kDone) return a;
          const cudaError_t q = cudaStreamQuery(s);
          if (q == cudaSuccess) return NcclProgress{NcclProgress::State::kDone, ""};
          if (q == cudaErrorNotReady) return NcclProgress{NcclProgress::State::kRunning, ""};
          return NcclProgress{NcclProgress::State::kFailed, std::string("the collective's stream: ") + cudaGetErrorName(q) + " (" + cudaGetErrorString(q) + ")"};
        },
        timeout_s_, "a collective", rank_, [this] { abort(); });
  }

 private:
  // NCCL's way out of a hung collective: frees the communicator and makes its kernels return.
  void abort() {
    if (aborted_) return;
    (void)ncclCommAbort(comm_);
    comm_ = nullptr;
    aborted_ = true;
  }
  Result<void> usable() const {
    if (aborted_) return fail(ErrorCode::kUnavailable, "nccl: the communicator was aborted after an earlier failure");
    return {};
  }
  // Every failure aborts: destroying a communicator whose peer is gone could hang.
  Result<void> aborting(Result<void> r) {
    if (!r) abort();
    return r;
  }
  // The previous call may still be in progress (non-blocking): NCCL takes no new call until it
  // has ended.
  Result<void> settle() { return await_nccl([this] { return async_progress(comm_); }, timeout_s_, "the previous NCCL call", rank_, [this] { abort(); }); }
  ncclComm_t comm_;
  int rank_, size_, device_;
  double timeout_s_;
  bool aborted_ = false;
};

}  // namespace

Result<std::unique_ptr<DeviceCollective>> connect_nccl(tresor::train::Collective& bootstrap, int device, double timeout_s) {
  if (!(timeout_s > 0)) return fail(ErrorCode::kInvalidArgument, "nccl: the timeout must be positive, not " + std::to_string(timeout_s));
  int count = 0;
  // Every rank takes part in the id exchange and the readiness count even when its own device is
  // missing, so that the others learn it instead of waiting in the broadcast or in NCCL.
  const cudaError_t probe = cudaGetDeviceCount(&count);
  std::array<std::byte, 128> id{};
  Result<void> local{};
  if (probe != cudaSuccess) {
    local = cuda(probe, "no CUDA device");
  } else if (device < 0 || device >= count) {
    local = fail(ErrorCode::kUnavailable, "nccl: CUDA device " + std::to_string(device) + " does not exist (" + std::to_string(count) + " here)");
  }
  if (bootstrap.rank() == 0 && local) {
    ncclUniqueId u;
    local = nccl(ncclGetUniqueId(&u), "ncclGetUniqueId");
    if (local) std::memcpy(id.data(), u.internal, id.size());
  }
  TRESOR_TRY(share_unique_id(bootstrap, id));
  // Creating the communicator waits for every rank to join: so every rank learns first whether
  // all ranks can (rank 0 got an id, each rank has its device), and all stop together if not.
  std::vector<float> ready{local ? 1.0f : 0.0f};
  TRESOR_TRY(bootstrap.all_reduce_sum(std::span<float>(ready)));
  if (!local) return std::unexpected(local.error());
  if (ready[0] != static_cast<float>(bootstrap.size())) {
    return fail(ErrorCode::kUnavailable, "nccl: " + std::to_string(bootstrap.size() - static_cast<int>(ready[0])) +
                                             " other rank(s) cannot start NCCL (no usable device, or no unique id): nobody joins");
  }
  TRESOR_TRY(cuda(cudaSetDevice(device), "cudaSetDevice"));
  ncclUniqueId u;
  std::memcpy(u.internal, id.data(), id.size());
  // Non-blocking creation, watched: a rank that dies between the readiness count and joining
  // would leave the others in a blocking ncclCommInitRank until the job's time limit.
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  ncclComm_t comm = nullptr;
  const ncclResult_t init = ncclCommInitRankConfig(&comm, bootstrap.size(), u, bootstrap.rank(), &config);
  if (init != ncclSuccess && init != ncclInProgress) {
    if (comm != nullptr) (void)ncclCommAbort(comm);
    return std::unexpected(nccl(init, "ncclCommInitRankConfig").error());
  }
  TRESOR_TRY(await_nccl([&] { return async_progress(comm); }, timeout_s, "joining the other ranks (ncclCommInitRankConfig)", bootstrap.rank(),
                        [&] { (void)ncclCommAbort(comm); }));
  return std::unique_ptr<DeviceCollective>(std::make_unique<Nccl>(comm, bootstrap.rank(), bootstrap.size(), device, timeout_s));
}

#else

bool nccl_built() { return false; }

Result<std::unique_ptr<DeviceCollective>> connect_nccl(tresor::train::Collective& bootstrap, int, double) {
  (void)bootstrap;
  return fail(ErrorCode::kUnavailable, "nccl: this build has no NCCL (CUDA toolkit with NCCL not found at configure time)");
}

#endif

}  // namespace tresor::gpu
