// NCCL collectives over GPU memory (include/tresor/gpu/nccl.h). Compiled with NCCL where the
// build found it (TRESOR_HAVE_NCCL); the bootstrap exchange is plain C++ and runs everywhere.
#include "tresor/gpu/nccl.h"

#include <algorithm>
#include <chrono>
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

#ifdef TRESOR_HAVE_NCCL

bool nccl_built() { return true; }

namespace {

Result<void> nccl(ncclResult_t r, const char* what) {
  if (r != ncclSuccess) return fail(ErrorCode::kUnavailable, std::string("nccl: ") + what + ": " + ncclGetErrorString(r));
  return {};
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
    if (!aborted_) (void)ncclCommDestroy(comm_);  // an aborted communicator is already freed
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  int device() const override { return device_; }
  bool host_memory() const override { return false; }
  Result<void> all_reduce_sum(float* d, size_t count, void* stream) override {
    TRESOR_TRY(usable());
    TRESOR_TRY(cuda(cudaSetDevice(device_), "cudaSetDevice"));
    return nccl(ncclAllReduce(d, d, count, ncclFloat32, ncclSum, comm_, static_cast<cudaStream_t>(stream)), "ncclAllReduce");
  }
  Result<void> broadcast(float* d, size_t count, int root, void* stream) override {
    if (root < 0 || root >= size_) return fail(ErrorCode::kInvalidArgument, "nccl: broadcast root " + std::to_string(root) + " is not a rank");
    TRESOR_TRY(usable());
    TRESOR_TRY(cuda(cudaSetDevice(device_), "cudaSetDevice"));
    return nccl(ncclBroadcast(d, d, count, ncclFloat32, root, comm_, static_cast<cudaStream_t>(stream)), "ncclBroadcast");
  }
  Result<void> wait(void* stream) override {
    TRESOR_TRY(usable());
    // Every failure below aborts: destroying a communicator whose peer is gone could hang too.
    auto aborting = [&](Result<void> r) {
      if (!r) abort();
      return r;
    };
    TRESOR_TRY(aborting(cuda(cudaSetDevice(device_), "cudaSetDevice")));
    const auto s = static_cast<cudaStream_t>(stream);
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s_);
    for (auto pause = std::chrono::microseconds(20);; pause = std::min(pause * 2, std::chrono::microseconds(5000))) {
      const cudaError_t q = cudaStreamQuery(s);
      if (q == cudaSuccess) return {};
      if (q != cudaErrorNotReady) return aborting(cuda(q, "the collective's stream"));
      ncclResult_t async = ncclSuccess;
      TRESOR_TRY(aborting(nccl(ncclCommGetAsyncError(comm_, &async), "ncclCommGetAsyncError")));
      if (async != ncclSuccess && async != ncclInProgress) {
        abort();
        return fail(ErrorCode::kUnavailable, std::string("nccl: a collective failed on rank ") + std::to_string(rank_) + ": " + ncclGetErrorString(async) +
                                                 " (another rank stopped, or the network between the ranks failed); the communicator was aborted");
      }
      if (std::chrono::steady_clock::now() > deadline) {
        abort();
        return fail(ErrorCode::kUnavailable, "nccl: a collective did not finish within " + std::to_string(static_cast<long>(timeout_s_)) +
                                                 " s on rank " + std::to_string(rank_) + " (another rank stopped or hangs); the communicator was aborted");
      }
      std::this_thread::sleep_for(pause);
    }
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
  // ncclCommInitRank blocks until every rank has joined: so every rank learns first whether all
  // ranks can (rank 0 got an id, each rank has its device), and all stop together if not.
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
  ncclComm_t comm = nullptr;
  TRESOR_TRY(nccl(ncclCommInitRank(&comm, bootstrap.size(), u, bootstrap.rank()), "ncclCommInitRank"));
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
