// The secure channel's CUDA device (include/tresor/gpu/channel.h): device memory, pinned staging,
// one CUDA stream per staging slot, the AES-GCM kernel queued on them. Plain C++23 over the
// CUDA shim (kernels/cuda_shim.h); without CUDA in the build, cuda_device() says so.
#include "tresor/gpu/channel.h"

#include <string>
#include <vector>

#include "cuda_result.h"
#include "tresor/gpu.h"

namespace tresor::gpu {

#ifdef TRESOR_HAVE_CUDA
namespace {

using tresor::gpu::detail::cuda;
using tresor::gpu::detail::kNoCuda;

class CudaDevice final : public ChannelDevice {
 public:
  static constexpr int kStreams = 4;
  CudaDevice(int index, std::string name) : index_(index), name_(std::move(name)) {}
  ~CudaDevice() override {
    detail::CurrentDevice current;
    (void)select(current);
    for (void* s : streams_) (void)detail::cuda_stream_destroy(s);
  }
  Result<void> init() {
    detail::CurrentDevice current;
    TRESOR_TRY(select(current));
    for (int i = 0; i < kStreams; ++i) {
      void* s = nullptr;
      TRESOR_TRY(cuda(detail::cuda_stream_create(&s)));
      streams_.push_back(s);
    }
    return {};
  }
  std::string name() const override { return "cuda:" + std::to_string(index_) + " " + name_; }
  // The current device is per host thread and others may change it (the self-test, other
  // devices): every call selects this one first, and gives the caller's back when it returns.
  Result<void> select(detail::CurrentDevice& current) const { return cuda(current.select(index_)); }
  bool host_memory() const override { return false; }
  Kind kind() const override { return Kind::kCuda; }
  int ordinal() const override { return index_; }
  Result<Mem> device_alloc(size_t n) override {
    detail::CurrentDevice current;
    TRESOR_TRY(select(current));
    void* p = nullptr;
    TRESOR_TRY(cuda(detail::cuda_alloc(&p, n)));
    return Mem{static_cast<std::byte*>(p), n};
  }
  void device_free(Mem m) override {
    detail::CurrentDevice current;
    (void)select(current);
    (void)detail::cuda_free_wiped(m.p, m.n);
  }
  Result<Mem> staging_alloc(size_t n) override {
    detail::CurrentDevice current;
    TRESOR_TRY(select(current));
    void* p = nullptr;
    TRESOR_TRY(cuda(detail::cuda_host_alloc(&p, n)));
    return Mem{static_cast<std::byte*>(p), n};
  }
  void staging_free(Mem m) override {
    detail::CurrentDevice current;
    (void)select(current);
    (void)detail::cuda_host_free(m.p);
  }
  Result<Mem> load_key(const ChunkKey& key) override {
    detail::CurrentDevice current;
    TRESOR_TRY(select(current));
    auto m = device_alloc(key.bytes().size());
    if (!m) return std::unexpected(m.error());
    if (auto c = cuda(detail::cuda_copy(m->p, key.bytes().data(), m->n, detail::kHostToDevice)); !c) {
      device_free(*m);
      return std::unexpected(c.error());
    }
    return m;
  }
  int streams() const override { return static_cast<int>(streams_.size()); }
  Result<void> copy_to_device(int s, std::byte* dev, const std::byte* staging, size_t n) override {
    detail::CurrentDevice current;
    TRESOR_TRY(select(current));
    return cuda(detail::cuda_copy_async(streams_[static_cast<size_t>(s)], dev, staging, n, detail::kHostToDevice));
  }
  Result<void> copy_to_host(int s, std::byte* staging, const std::byte* dev, size_t n) override {
    detail::CurrentDevice current;
    TRESOR_TRY(select(current));
    return cuda(detail::cuda_copy_async(streams_[static_cast<size_t>(s)], staging, dev, n, detail::kDeviceToHost));
  }
  Result<void> copy_on_device(int s, std::byte* dst, const std::byte* src, size_t n) override {
    detail::CurrentDevice current;
    TRESOR_TRY(select(current));
    return cuda(detail::cuda_copy_async(streams_[static_cast<size_t>(s)], dst, src, n, detail::kDeviceToDevice));
  }
  Result<void> run_chunks(int s, const std::byte* key, const ChunkRun& run, uint64_t chunks, uint64_t last_len, bool seal, const std::byte* in,
                          std::byte* out, std::byte* failed) override {
    detail::CurrentDevice current;
    TRESOR_TRY(select(current));
    detail::AesGcmRun r;
    std::copy(run.nonce_prefix.begin(), run.nonce_prefix.end(), reinterpret_cast<std::byte*>(r.prefix));
    r.final_flag = run.ends_with_final ? 1 : 0;
    r.chunk_size = run.chunk_size;
    r.first_index = run.first_index;
    r.chunks = chunks;
    r.last_len = last_len;
    r.seal = seal ? 1 : 0;
    return cuda(detail::aesgcm_enqueue(streams_[static_cast<size_t>(s)], key, r, reinterpret_cast<const uint8_t*>(in),
                                       reinterpret_cast<uint8_t*>(out), reinterpret_cast<uint8_t*>(failed)));
  }
  Result<void> synchronize(int s) override {
    detail::CurrentDevice current;
    TRESOR_TRY(select(current));
    return cuda(detail::cuda_stream_sync(streams_[static_cast<size_t>(s)]));
  }
  Result<void> synchronize_all() override {
    detail::CurrentDevice current;
    TRESOR_TRY(select(current));
    return cuda(detail::cuda_device_sync());
  }
  Result<void> read_device(MutableByteSpan to, const std::byte* dev) override {
    detail::CurrentDevice current;
    TRESOR_TRY(select(current));
    return cuda(detail::cuda_copy(to.data(), dev, to.size(), detail::kDeviceToHost));
  }
  Result<void> write_device(std::byte* dev, ByteSpan from) override {
    detail::CurrentDevice current;
    TRESOR_TRY(select(current));
    return cuda(detail::cuda_copy(dev, from.data(), from.size(), detail::kHostToDevice));
  }
  Result<void> fill_device(std::byte* dev, std::byte value, size_t n) override {
    detail::CurrentDevice current;
    TRESOR_TRY(select(current));
    return cuda(detail::cuda_fill(dev, std::to_integer<int>(value), n));
  }

 private:
  int index_;
  std::string name_;
  std::vector<void*> streams_;
};

}  // namespace

Result<std::unique_ptr<ChannelDevice>> cuda_device(int index) {
  auto devs = gpu_probe();
  if (!devs) return std::unexpected(devs.error());
  if (index < 0 || static_cast<size_t>(index) >= devs->size()) {
    return fail(ErrorCode::kUnavailable, "no CUDA device " + std::to_string(index) + " (" + std::to_string(devs->size()) + " found)");
  }
  auto d = std::make_unique<CudaDevice>(index, (*devs)[static_cast<size_t>(index)].name);
  TRESOR_TRY(d->init());
  return std::unique_ptr<ChannelDevice>(std::move(d));
}
#else
Result<std::unique_ptr<ChannelDevice>> cuda_device(int) {
  return fail(ErrorCode::kUnavailable, kNoCuda);
}
#endif

}  // namespace tresor::gpu
