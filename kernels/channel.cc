// The secure channel (include/tresor/gpu/channel.h): the staging pipeline shared by every device,
// and the two host-memory devices — the CPU one (OpenSSL) and the emulated GPU (the kernel's CPU
// emulation). The CUDA device is in channel_cuda.cc.
#include "tresor/gpu/channel.h"

#include <openssl/crypto.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "aesgcm.cuh"
#include "tresor/crypto.h"
#include "tresor/io.h"
#include "tresor/thread_pool.h"

namespace tresor::gpu {
namespace {

// Host memory standing in for device memory and for staging: 64-byte aligned, zeroed when freed.
Result<Mem> host_alloc(size_t n) {
  const size_t size = std::max<size_t>(64, (n + 63) / 64 * 64);
  void* p = std::aligned_alloc(64, size);
  if (p == nullptr) return fail(ErrorCode::kIo, "cannot allocate " + std::to_string(n) + " bytes");
  return Mem{static_cast<std::byte*>(p), n};
}
void host_free(Mem m) {
  if (m.p == nullptr) return;
  OPENSSL_cleanse(m.p, m.n);
  std::free(m.p);
}

// The common part of the two host-memory devices: memory, copies, one stream (work is done when
// it is queued, so synchronize has nothing to wait for).
class HostDevice : public ChannelDevice {
 public:
  bool host_memory() const override { return true; }
  Result<Mem> device_alloc(size_t n) override { return host_alloc(n); }
  void device_free(Mem m) override { host_free(m); }
  Result<Mem> staging_alloc(size_t n) override { return host_alloc(n); }
  void staging_free(Mem m) override { host_free(m); }
  int streams() const override { return 1; }
  Result<Mem> load_key(const ChunkKey& key) override {
    auto m = host_alloc(key.bytes().size());
    if (!m) return std::unexpected(m.error());
    std::memcpy(m->p, key.bytes().data(), m->n);
    return m;
  }
  Result<void> copy_to_device(int, std::byte* dev, const std::byte* staging, size_t n) override {
    if (on_staging_) on_staging_(ByteSpan(staging, n));
    std::memcpy(dev, staging, n);
    return {};
  }
  Result<void> copy_to_host(int, std::byte* staging, const std::byte* dev, size_t n) override {
    std::memcpy(staging, dev, n);
    if (on_staging_) on_staging_(ByteSpan(staging, n));
    return {};
  }
  Result<void> copy_on_device(int, std::byte* dst, const std::byte* src, size_t n) override {
    std::memcpy(dst, src, n);
    return {};
  }
  Result<void> synchronize(int) override { return {}; }
  Result<void> synchronize_all() override { return {}; }
  Result<void> read_device(MutableByteSpan to, const std::byte* dev) override {
    std::memcpy(to.data(), dev, to.size());
    return {};
  }
  Result<void> write_device(std::byte* dev, ByteSpan from) override {
    std::memcpy(dev, from.data(), from.size());
    return {};
  }
  Result<void> fill_device(std::byte* dev, std::byte value, size_t n) override {
    std::memset(dev, std::to_integer<int>(value), n);
    return {};
  }
  std::function<void(ByteSpan)> on_staging_;
};

// No GPU: chunks opened and sealed by OpenSSL (AES-NI) on a thread pool.
class CpuDevice final : public HostDevice {
 public:
  explicit CpuDevice(unsigned threads) : pool_(ThreadPool::resolve(threads)) {}
  std::string name() const override { return "cpu (OpenSSL, " + std::to_string(pool_.size()) + " threads)"; }
  Kind kind() const override { return Kind::kCpu; }
  Result<void> run_chunks(int, const std::byte* key, const ChunkRun& run, uint64_t chunks, uint64_t last_len, bool seal, const std::byte* in,
                          std::byte* out, std::byte* failed) override {
    // The AES key is the first 8 round-key words (FIPS 197 §5.2: w[0..Nk-1] = the key).
    std::array<std::byte, 32> raw{};
    const auto& kd = *reinterpret_cast<const aesgcm::KeyData*>(key);
    for (int w = 0; w < 8; ++w) aesgcm::store_be32(reinterpret_cast<uint8_t*>(raw.data()) + 4 * w, kd.rk[w]);
    const uint64_t c = run.chunk_size;
    std::lock_guard lock(pool_mutex_);  // one loop at a time on the pool; channels may share the device
    std::vector<std::string> errors(chunks);
    pool_.parallel_for(chunks, [&](size_t i) {
      auto gcm = crypto::AesGcm::create(raw);
      const bool last = i + 1 == chunks;
      const uint64_t len = last ? last_len : c;
      const auto nonce = sealed::chunk_nonce(run.nonce_prefix, uint64_t{run.first_index} + i, last && run.ends_with_final);
      Result<void> r = gcm ? Result<void>{} : std::unexpected(gcm.error());
      if (r && seal) {
        r = gcm->seal(nonce, {}, ByteSpan(in + i * c, len), MutableByteSpan(out + i * (c + 16), len + 16));
      } else if (r) {
        r = gcm->open(nonce, {}, ByteSpan(in + i * (c + 16), len + 16), MutableByteSpan(out + i * c, len));
      }
      failed[i] = std::byte{0};
      if (!r && r.error().code == ErrorCode::kAuth) {
        failed[i] = std::byte{1};  // its output already zeroed by AesGcm::open
      } else if (!r) {
        errors[i] = r.error().message;
      }
    });
    OPENSSL_cleanse(raw.data(), raw.size());
    for (const auto& e : errors) {
      if (!e.empty()) return fail(ErrorCode::kCrypto, e);
    }
    return {};
  }

 private:
  ThreadPool pool_;
  std::mutex pool_mutex_;
};

// The kernel's CPU emulation behind the device interface: the tests' GPU.
class EmulatedDevice final : public HostDevice {
 public:
  explicit EmulatedDevice(std::function<void(ByteSpan)> on_staging) { on_staging_ = std::move(on_staging); }
  std::string name() const override { return "emulated GPU (the kernel on the CPU)"; }
  Kind kind() const override { return Kind::kEmulated; }
  Result<void> run_chunks(int, const std::byte* key, const ChunkRun& run, uint64_t chunks, uint64_t last_len, bool seal, const std::byte* in,
                          std::byte* out, std::byte* failed) override {
    run_chunks_emulated(*reinterpret_cast<const aesgcm::KeyData*>(key), run, chunks, last_len, seal, in, out, failed);
    return {};
  }
};

// Everything the channel allocates for one transfer, released on every path.
struct Scope {
  explicit Scope(ChannelDevice& d) : dev(d) {}
  Scope(const Scope&) = delete;
  Scope& operator=(const Scope&) = delete;
  ChannelDevice& dev;
  std::vector<Mem> device, staging;
  ~Scope() {
    for (int s = 0; s < dev.streams(); ++s) (void)dev.synchronize(s);
    for (Mem m : device) dev.device_free(m);
    for (Mem m : staging) dev.staging_free(m);
  }
  Result<Mem> dev_mem(size_t n) {
    auto m = dev.device_alloc(n);
    if (m) device.push_back(*m);
    return m;
  }
  Result<Mem> stage(size_t n) {
    auto m = dev.staging_alloc(n);
    if (m) staging.push_back(*m);
    return m;
  }
  // `depth` staging slots of `bytes` pinned host memory, each with device scratch of the same size.
  Result<void> slots(unsigned depth, size_t bytes, std::vector<Mem>& staged, std::vector<Mem>& scratch) {
    staged.assign(depth, Mem{});
    scratch.assign(depth, Mem{});
    for (unsigned s = 0; s < depth; ++s) {
      auto st = stage(bytes);
      if (!st) return std::unexpected(st.error());
      auto sc = dev_mem(bytes);
      if (!sc) return std::unexpected(sc.error());
      staged[s] = *st;
      scratch[s] = *sc;
    }
    return {};
  }
};

Error named(const std::string& path, const Error& e) { return Error{e.code, path + ": " + e.message}; }

}  // namespace

std::unique_ptr<ChannelDevice> cpu_device(unsigned threads) { return std::make_unique<CpuDevice>(threads); }
std::unique_ptr<ChannelDevice> emulated_device(std::function<void(ByteSpan)> on_staging) {
  return std::make_unique<EmulatedDevice>(std::move(on_staging));
}

ChunkRun whole_stream(const sealed::Header& header) {
  ChunkRun run;
  run.nonce_prefix = header.nonce_prefix;
  run.chunk_size = header.chunk_size;
  run.first_index = 0;
  run.ends_with_final = true;
  return run;
}

DeviceBuffer::DeviceBuffer(DeviceBuffer&& o) noexcept
    : device_(std::exchange(o.device_, nullptr)), mem_(std::exchange(o.mem_, {})), offset_(o.offset_), size_(std::exchange(o.size_, 0)) {}
DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& o) noexcept {
  if (this != &o) {
    if (device_ != nullptr) device_->device_free(mem_);
    device_ = std::exchange(o.device_, nullptr);
    mem_ = std::exchange(o.mem_, {});
    offset_ = o.offset_;
    size_ = std::exchange(o.size_, 0);
  }
  return *this;
}
DeviceBuffer::~DeviceBuffer() {
  if (device_ != nullptr) device_->device_free(mem_);
}
Result<Bytes> DeviceBuffer::to_host() const {
  Bytes out(size_);
  if (size_ > 0) TRESOR_TRY(device_->read_device(out, data()));
  return out;
}

SecureChannel::SecureChannel(ChannelDevice& device, ChannelOptions options) : device_(device), options_(options) {
  options_.batch_chunks = std::max(1u, options_.batch_chunks);
  options_.depth = std::clamp(options_.depth, 1u, 8u);
}

uint64_t SecureChannel::batch_for(uint64_t chunk_size) const {
  const uint64_t fit = options_.max_slot_bytes / (chunk_size + 16);  // whole frames in a slot
  return std::max<uint64_t>(1, std::min<uint64_t>(options_.batch_chunks, fit));
}

Result<DeviceBuffer> SecureChannel::upload(const std::string& path, const sealed::KeyRing& keys, uint64_t offset,
                                           std::optional<uint64_t> length) {
  stats_ = {};
  auto file = FdFile::open_read(path);
  if (!file) return std::unexpected(file.error());
  auto size = file->size();
  if (!size) return std::unexpected(size.error());
  // The header: parsed, unlocked with the caller's keys and authenticated (formats.md §4) before
  // any chunk is touched.
  auto unlocked = sealed::read_header(*file, keys, path);
  if (!unlocked) return std::unexpected(unlocked.error());
  const sealed::Header* header = &unlocked->header;
  const uint64_t header_size = unlocked->bytes.size();
  auto key = ChunkKey::for_stream(unlocked->file_key.span(), header->nonce_prefix);
  if (!key) return std::unexpected(key.error());

  const ChunkRun whole = whole_stream(*header);
  auto shape = run_shape(whole, *size - header_size);
  if (!shape) return std::unexpected(named(path, shape.error()));
  const uint64_t n = length.value_or(shape->plaintext_bytes - std::min(offset, shape->plaintext_bytes));
  if (offset > shape->plaintext_bytes || n > shape->plaintext_bytes - offset) {
    return fail(ErrorCode::kInvalidArgument, path + ": bytes " + std::to_string(offset) + ".." + std::to_string(offset + n) +
                                                 " are beyond its " + std::to_string(shape->plaintext_bytes) + " bytes of plaintext");
  }
  const uint64_t c = whole.chunk_size;
  // The chunks the range touches (an empty range: none, but the header was still checked). An
  // empty stream's single chunk is always checked: a file cut to its header and any 16 bytes has
  // the shape of an empty stream, and only the final chunk's tag tells (formats.md §5.3).
  const bool empty_stream = shape->plaintext_bytes == 0;
  const uint64_t first = n == 0 ? 0 : offset / c;
  const uint64_t end = empty_stream ? 1 : n == 0 ? 0 : (offset + n - 1) / c + 1;
  const uint64_t chunks = end - first;
  auto plain_of = [&](uint64_t i) { return i + 1 == shape->chunks ? shape->plaintext_bytes - i * c : c; };
  const uint64_t dest_bytes = chunks == 0 ? 0 : (chunks - 1) * c + plain_of(end - 1);

  Scope scope(device_);
  auto dest = device_.device_alloc(dest_bytes);
  if (!dest) return std::unexpected(dest.error());
  DeviceBuffer result(&device_, *dest, offset - first * c, n);  // frees (and wipes) on every failure below
  if (chunks == 0) return result;
  auto failed = scope.dev_mem(chunks);
  if (!failed) return std::unexpected(failed.error());
  // Every verdict starts as a failure: a chunk the kernel never reached (a launch that covered
  // fewer chunks, a block that ended early) is reported, not taken for a verified one.
  TRESOR_TRY(device_.fill_device(failed->p, std::byte{1}, chunks));
  auto d_key = device_.load_key(*key);
  if (!d_key) return std::unexpected(d_key.error());
  scope.device.push_back(*d_key);

  const uint64_t batch = batch_for(c);
  const size_t slot_bytes = static_cast<size_t>(std::min<uint64_t>(batch, chunks) * (c + 16));
  const unsigned depth = static_cast<unsigned>(std::min<uint64_t>(options_.depth, (chunks + batch - 1) / batch));
  std::vector<Mem> staging, scratch;
  TRESOR_TRY(scope.slots(depth, slot_bytes, staging, scratch));
  std::vector<bool> busy(depth, false);
  const uint64_t frames_at = header_size;
  for (uint64_t b = first, k = 0; b < end; b += batch, ++k) {
    const unsigned slot = static_cast<unsigned>(k % depth);
    const int stream = static_cast<int>(slot % static_cast<unsigned>(device_.streams()));
    if (busy[slot]) TRESOR_TRY(device_.synchronize(stream));  // its previous copy and kernel are done
    const uint64_t e = std::min(b + batch, end);
    const uint64_t last_len = plain_of(e - 1);
    const uint64_t bytes = (e - b - 1) * (c + 16) + last_len + 16;
    // Ciphertext only: the frames as they are in the file.
    TRESOR_TRY(file->read_at(frames_at + b * (c + 16), MutableByteSpan(staging[slot].p, bytes)));
    TRESOR_TRY(device_.copy_to_device(stream, scratch[slot].p, staging[slot].p, bytes));
    ChunkRun run = whole;
    run.first_index = static_cast<uint32_t>(b);
    run.ends_with_final = e == shape->chunks;
    TRESOR_TRY(device_.run_chunks(stream, d_key->p, run, e - b, last_len, false, scratch[slot].p, dest->p + (b - first) * c, failed->p + (b - first)));
    busy[slot] = true;
    stats_.batches++;
    stats_.staged_bytes += bytes;
    stats_.max_in_flight = std::max<unsigned>(stats_.max_in_flight, static_cast<unsigned>(std::count(busy.begin(), busy.end(), true)));
  }
  for (int s = 0; s < device_.streams(); ++s) TRESOR_TRY(device_.synchronize(s));
  stats_.chunks = chunks;
  std::vector<std::byte> verdicts(chunks);
  TRESOR_TRY(device_.read_device(verdicts, failed->p));
  const auto passed = [](std::byte v) { return v == std::byte{0}; };  // anything else: failed or never verified
  const auto bad = std::find_if_not(verdicts.begin(), verdicts.end(), passed);
  if (bad != verdicts.end()) {
    const uint64_t count = static_cast<uint64_t>(std::count_if(verdicts.begin(), verdicts.end(), [&](std::byte v) { return !passed(v); }));
    return fail(ErrorCode::kChunkAuth, path + ": chunk " + std::to_string(first + static_cast<uint64_t>(bad - verdicts.begin())) +
                                           " fails authentication (" + std::to_string(count) + " of the " + std::to_string(chunks) +
                                           " chunks read): altered, truncated, or from another stream or position; nothing was released");
  }
  return result;
}

Result<void> SecureChannel::download(const std::byte* data, size_t size, const std::string& path, const sealed::SealOptions& options, bool overwrite) {
  stats_ = {};
  TRESOR_TRY(sealed::check_seal_options(options));
  auto hdr = sealed::make_header(options);
  if (!hdr) return std::unexpected(hdr.error());
  auto key = ChunkKey::for_stream(hdr->file_key.span(), hdr->header.nonce_prefix);
  if (!key) return std::unexpected(key.error());
  const ChunkRun whole = whole_stream(hdr->header);
  auto frames = frames_size(whole, size);
  if (!frames) return std::unexpected(frames.error());
  auto shape = run_shape(whole, *frames);
  if (!shape) return std::unexpected(shape.error());
  auto out = AtomicOutputFile::create(path, 0644, overwrite);
  if (!out) return std::unexpected(out.error());
  TRESOR_TRY(device_.synchronize_all());  // the data is complete before the channel's streams read it
  TRESOR_TRY(out->write_at(0, hdr->bytes));

  const uint64_t c = whole.chunk_size, chunks = shape->chunks, batch = batch_for(c);
  auto plain_of = [&](uint64_t i) { return i + 1 == chunks ? shape->plaintext_bytes - i * c : c; };
  Scope scope(device_);
  auto failed = scope.dev_mem(chunks);
  if (!failed) return std::unexpected(failed.error());
  auto d_key = device_.load_key(*key);
  if (!d_key) return std::unexpected(d_key.error());
  scope.device.push_back(*d_key);
  const size_t slot_bytes = static_cast<size_t>(std::min(batch, chunks) * (c + 16));
  const unsigned depth = static_cast<unsigned>(std::min<uint64_t>(options_.depth, (chunks + batch - 1) / batch));
  struct Pending {
    uint64_t file_offset = 0, bytes = 0;
    bool busy = false;
  };
  std::vector<Mem> staging, scratch;
  std::vector<Pending> pending(depth);
  TRESOR_TRY(scope.slots(depth, slot_bytes, staging, scratch));
  // A slot's frames reach the file once its stream has finished them.
  auto drain = [&](unsigned slot) -> Result<void> {
    if (!pending[slot].busy) return {};
    TRESOR_TRY(device_.synchronize(static_cast<int>(slot % static_cast<unsigned>(device_.streams()))));
    TRESOR_TRY(out->write_at(pending[slot].file_offset, ByteSpan(staging[slot].p, pending[slot].bytes)));
    pending[slot].busy = false;
    return {};
  };
  for (uint64_t b = 0, k = 0; b < chunks; b += batch, ++k) {
    const unsigned slot = static_cast<unsigned>(k % depth);
    const int stream = static_cast<int>(slot % static_cast<unsigned>(device_.streams()));
    TRESOR_TRY(drain(slot));
    const uint64_t e = std::min(b + batch, chunks);
    const uint64_t last_len = plain_of(e - 1);
    const uint64_t bytes = (e - b - 1) * (c + 16) + last_len + 16;
    ChunkRun run = whole;
    run.first_index = static_cast<uint32_t>(b);
    run.ends_with_final = e == chunks;
    TRESOR_TRY(device_.run_chunks(stream, d_key->p, run, e - b, last_len, true, data + b * c, scratch[slot].p, failed->p + b));
    TRESOR_TRY(device_.copy_to_host(stream, staging[slot].p, scratch[slot].p, bytes));
    pending[slot] = Pending{hdr->bytes.size() + b * (c + 16), bytes, true};
    stats_.batches++;
    stats_.staged_bytes += bytes;
    unsigned in_flight = 0;
    for (const auto& p : pending) in_flight += p.busy ? 1 : 0;
    stats_.max_in_flight = std::max(stats_.max_in_flight, in_flight);
  }
  for (unsigned s = 0; s < depth; ++s) TRESOR_TRY(drain(s));
  stats_.chunks = chunks;
  return out->commit();
}

}  // namespace tresor::gpu
