// A secure-channel device (include/tresor/gpu/channel.h) that forwards every call to another one.
// Tests derive from it and override the calls they watch (what the host reads back) or break (a
// kernel launch that stops short).
#pragma once

#include <memory>
#include <string>
#include <utility>

#include "tresor/gpu/channel.h"

namespace tresor::testing {

class ForwardingDevice : public gpu::ChannelDevice {
 public:
  explicit ForwardingDevice(std::unique_ptr<gpu::ChannelDevice> inner) : d_(std::move(inner)) {}
  std::string name() const override { return d_->name(); }
  bool host_memory() const override { return d_->host_memory(); }
  Kind kind() const override { return d_->kind(); }
  int ordinal() const override { return d_->ordinal(); }
  Result<gpu::Mem> device_alloc(size_t n) override { return d_->device_alloc(n); }
  void device_free(gpu::Mem m) override { d_->device_free(m); }
  Result<gpu::Mem> staging_alloc(size_t n) override { return d_->staging_alloc(n); }
  void staging_free(gpu::Mem m) override { d_->staging_free(m); }
  Result<gpu::Mem> load_key(const gpu::ChunkKey& key) override { return d_->load_key(key); }
  int streams() const override { return d_->streams(); }
  Result<void> copy_to_device(int s, std::byte* dev, const std::byte* st, size_t n) override { return d_->copy_to_device(s, dev, st, n); }
  Result<void> copy_to_host(int s, std::byte* st, const std::byte* dev, size_t n) override { return d_->copy_to_host(s, st, dev, n); }
  Result<void> copy_on_device(int s, std::byte* dst, const std::byte* src, size_t n) override { return d_->copy_on_device(s, dst, src, n); }
  Result<void> run_chunks(int s, const std::byte* key, const gpu::ChunkRun& run, uint64_t chunks, uint64_t last_len, bool seal, const std::byte* in,
                          std::byte* out, std::byte* failed) override {
    return d_->run_chunks(s, key, run, chunks, last_len, seal, in, out, failed);
  }
  Result<void> synchronize(int s) override { return d_->synchronize(s); }
  Result<void> synchronize_all() override { return d_->synchronize_all(); }
  Result<void> read_device(MutableByteSpan to, const std::byte* dev) override { return d_->read_device(to, dev); }
  Result<void> write_device(std::byte* dev, ByteSpan from) override { return d_->write_device(dev, from); }
  Result<void> fill_device(std::byte* dev, std::byte value, size_t n) override { return d_->fill_device(dev, value, n); }

 protected:
  std::unique_ptr<gpu::ChannelDevice> d_;
};

}  // namespace tresor::testing
