// The secure channel (include/tresor/gpu/channel.h) on every device this machine has: the CPU
// device (OpenSSL) and the emulated GPU (the kernel's CPU emulation) everywhere, the CUDA device
// where there is one. Files sealed by the OpenSSL path go in; what comes out of device memory is
// the plaintext, byte ranges included; what crosses the staging buffers is ciphertext only;
// tampered files give nothing and name the chunk; downloads are sealed files the OpenSSL path
// opens.
#include <gtest/gtest.h>

#include <cstdlib>
#include <fstream>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "support/forwarding_device.h"
#include "support/test_support.h"
#include "tresor/gpu.h"
#include "tresor/gpu/channel.h"
#include "tresor/identity.h"
#include "tresor/sealed.h"

namespace tresor {
namespace {

using gpu::ChannelOptions;
using gpu::SecureChannel;
using testing::TempDir;

constexpr std::string_view kMarker = "PLAINTEXT-MARKER-5521";

// Plaintext made of the marker and a counter, so that any plaintext in the open shows up.
Bytes marked_plaintext(size_t n) {
  std::string s;
  for (size_t i = 0; s.size() < n; ++i) s += std::string(kMarker) + " " + std::to_string(i) + "\n";
  s.resize(n);
  return Bytes(as_bytes(s).begin(), as_bytes(s).end());
}

bool contains_marker(ByteSpan b) {
  const std::string_view v(reinterpret_cast<const char*>(b.data()), b.size());
  return v.find(kMarker.substr(0, 12)) != std::string_view::npos;
}

class Channel : public ::testing::Test {
 protected:
  Identity alice = *Identity::generate();
  TempDir dir;
  sealed::KeyRing ring() const {
    sealed::KeyRing r;
    r.identities = {&alice};
    return r;
  }
  std::string seal_file(const std::string& name, ByteSpan plain, uint32_t chunk) {
    sealed::SealOptions o;
    o.chunk_size = chunk;
    o.recipients = {alice.recipient()};
    auto sealed = sealed::seal_buffer(plain, o);
    EXPECT_TRUE(sealed);
    const std::string path = dir.file(name);
    std::ofstream(path, std::ios::binary).write(reinterpret_cast<const char*>(sealed->data()), static_cast<std::streamsize>(sealed->size()));
    return path;
  }
  // Every device to test: the CPU one, the emulated GPU (recording its staging), and CUDA's.
  struct Dev {
    std::unique_ptr<gpu::ChannelDevice> device;
    std::vector<Bytes>* staged = nullptr;
  };
  std::mutex staged_mutex_;
  std::vector<Bytes> staged_;
  std::vector<Dev> devices(bool with_cuda = true) {
    std::vector<Dev> out;
    out.push_back({gpu::cpu_device(2), nullptr});
    out.push_back({gpu::emulated_device([this](ByteSpan b) {
                     std::lock_guard lock(staged_mutex_);  // several channels may share the device
                     staged_.emplace_back(b.begin(), b.end());
                   }),
                   &staged_});
    if (with_cuda) {
      if (auto c = gpu::cuda_device(0)) out.push_back({std::move(*c), nullptr});
    }
    return out;
  }
};

TEST_F(Channel, UploadsWholeFilesAndRangesIntoDeviceMemory) {
  const uint32_t c = 4096;
  for (size_t size : {size_t{0}, size_t{1}, size_t{c - 1}, size_t{c}, size_t{c + 1}, size_t{11 * c + 123}}) {
    const Bytes plain = marked_plaintext(size);
    const std::string path = seal_file("f-" + std::to_string(size) + ".sealed", plain, c);
    for (auto& d : devices()) {
      SCOPED_TRACE(d.device->name() + ", size " + std::to_string(size));
      SecureChannel ch(*d.device, ChannelOptions{.batch_chunks = 2, .depth = 3});
      auto buf = ch.upload(path, ring());
      ASSERT_TRUE(buf) << buf.error().message;
      EXPECT_EQ(buf->size(), size);
      EXPECT_TRUE(*buf->to_host() == plain);
      if (size > 4 * c) {
        EXPECT_EQ(ch.last().chunks, 12u);
        EXPECT_EQ(ch.last().batches, 6u);
        EXPECT_EQ(ch.last().max_in_flight, 3u) << "triple buffering";
      }
    }
  }
  // Byte ranges: inside a chunk, across chunk boundaries, up to the end, empty.
  const Bytes plain = marked_plaintext(9 * c + 77);
  const std::string path = seal_file("ranges.sealed", plain, c);
  for (auto& d : devices()) {
    SecureChannel ch(*d.device, ChannelOptions{.batch_chunks = 3, .depth = 2});
    for (const auto& [off, len] : std::vector<std::pair<uint64_t, uint64_t>>{
             {0, 10}, {100, c}, {c - 1, 2}, {3 * c + 5, 4 * c}, {9 * c, 77}, {5, plain.size() - 5}, {c, 0}}) {
      SCOPED_TRACE(d.device->name() + " range " + std::to_string(off) + "+" + std::to_string(len));
      auto buf = ch.upload(path, ring(), off, len);
      ASSERT_TRUE(buf) << buf.error().message;
      auto host = buf->to_host();
      ASSERT_TRUE(host);
      EXPECT_TRUE(std::equal(host->begin(), host->end(), plain.begin() + static_cast<ptrdiff_t>(off), plain.begin() + static_cast<ptrdiff_t>(off + len)));
      EXPECT_EQ(host->size(), len);
    }
    auto beyond = ch.upload(path, ring(), plain.size() - 10, 11);
    ASSERT_FALSE(beyond);
    EXPECT_NE(beyond.error().message.find("are beyond its " + std::to_string(plain.size()) + " bytes of plaintext"), std::string::npos)
        << beyond.error().message;
  }
}

// A slot holds at most max_slot_bytes of frames: large chunks take fewer per slot (at least one),
// both ways, and the data is the same.
TEST_F(Channel, ASlotHoldsAtMostMaxSlotBytes) {
  const uint32_t c = 4096;
  const Bytes plain = marked_plaintext(11 * c + 123);  // 12 chunks
  const std::string path = seal_file("capped.sealed", plain, c);
  for (auto& d : devices()) {
    for (const auto& [cap, batches] : std::vector<std::pair<size_t, uint64_t>>{{3 * (c + 16), 4}, {3 * (c + 16) - 1, 6}, {100, 12}, {size_t{1} << 30, 2}}) {
      SCOPED_TRACE(d.device->name() + ", at most " + std::to_string(cap) + " bytes a slot");
      SecureChannel ch(*d.device, ChannelOptions{.batch_chunks = 8, .depth = 3, .max_slot_bytes = cap});
      auto buf = ch.upload(path, ring());
      ASSERT_TRUE(buf) << buf.error().message;
      EXPECT_TRUE(*buf->to_host() == plain);
      EXPECT_EQ(ch.last().batches, batches);
      const std::string back = dir.file("back-" + std::to_string(cap) + "-" + std::to_string(reinterpret_cast<uintptr_t>(d.device.get())));
      sealed::SealOptions o;
      o.chunk_size = c;
      o.recipients = {alice.recipient()};
      auto r = ch.download(buf->data(), buf->size(), back, o);
      ASSERT_TRUE(r) << r.error().message;
      EXPECT_EQ(ch.last().batches, batches) << "the download's slots too";
      std::ifstream in(back, std::ios::binary);
      const std::string file((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
      auto opened = sealed::open_buffer(as_bytes(file), ring(), sealed::OpenOptions{});
      ASSERT_TRUE(opened) << opened.error().message;
      EXPECT_TRUE(std::equal(opened->span().begin(), opened->span().end(), plain.begin(), plain.end()));
    }
  }
}

TEST_F(Channel, TheStagingBuffersHoldCiphertextOnly) {
  const uint32_t c = 2048;
  const Bytes plain = marked_plaintext(20 * c + 5);
  ASSERT_TRUE(contains_marker(plain));
  const std::string path = seal_file("staged.sealed", plain, c);
  auto devs = devices(false);
  auto& emu = devs[1];
  SecureChannel ch(*emu.device, ChannelOptions{.batch_chunks = 4, .depth = 3});
  auto buf = ch.upload(path, ring());
  ASSERT_TRUE(buf) << buf.error().message;
  ASSERT_FALSE(emu.staged->empty());
  Bytes all;
  for (const auto& s : *emu.staged) {
    EXPECT_FALSE(contains_marker(s)) << "plaintext in a staging buffer";
    all.insert(all.end(), s.begin(), s.end());
  }
  // Exactly the file's frames crossed, nothing else.
  std::ifstream in(path, std::ios::binary);
  std::string file((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const size_t header = file.size() - all.size();
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(all.data()), all.size()), file.substr(header));
  EXPECT_EQ(ch.last().staged_bytes, all.size());
  // The way back: sealed by the kernel before it is staged.
  emu.staged->clear();
  ASSERT_TRUE(ch.download(buf->data(), buf->size(), dir.file("back.sealed"), [&] {
    sealed::SealOptions o;
    o.chunk_size = c;
    o.recipients = {alice.recipient()};
    return o;
  }()));
  ASSERT_FALSE(emu.staged->empty());
  for (const auto& s : *emu.staged) EXPECT_FALSE(contains_marker(s)) << "plaintext in a staging buffer on the way out";
}

TEST_F(Channel, DownloadsAreSealedFilesTheOpenSslPathOpens) {
  for (size_t size : {size_t{0}, size_t{17}, size_t{5 * 4096 + 3}}) {
    const Bytes plain = marked_plaintext(size);
    for (auto& d : devices()) {
      SCOPED_TRACE(d.device->name() + ", size " + std::to_string(size));
      auto mem = d.device->device_alloc(size);
      ASSERT_TRUE(mem);
      if (size > 0) {
        ASSERT_TRUE(d.device->write_device(mem->p, plain));
      }
      SecureChannel ch(*d.device, ChannelOptions{.batch_chunks = 2, .depth = 2});
      sealed::SealOptions o;
      o.chunk_size = 4096;
      o.recipients = {alice.recipient()};
      const std::string out = dir.file("out-" + std::to_string(size) + "-" + std::to_string(reinterpret_cast<uintptr_t>(d.device.get())));
      auto r = ch.download(mem->p, size, out, o);
      d.device->device_free(*mem);
      ASSERT_TRUE(r) << r.error().message;
      std::ifstream in(out, std::ios::binary);
      const std::string file((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
      EXPECT_FALSE(contains_marker(as_bytes(file)));
      sealed::OpenOptions oo;
      auto opened = sealed::open_buffer(as_bytes(file), ring(), oo);
      ASSERT_TRUE(opened) << opened.error().message;
      EXPECT_TRUE(std::equal(opened->span().begin(), opened->span().end(), plain.begin(), plain.end()));
      // An existing file is never overwritten.
      auto again = ch.download(nullptr, 0, out, o);
      ASSERT_FALSE(again);
      EXPECT_NE(again.error().message.find("already exists"), std::string::npos) << again.error().message;
    }
  }
}

TEST_F(Channel, TamperedTruncatedOrForeignFilesGiveNothingAndSayWhy) {
  const uint32_t c = 1024;
  const Bytes plain = marked_plaintext(8 * c + 9);
  const std::string path = seal_file("good.sealed", plain, c);
  std::ifstream in(path, std::ios::binary);
  const std::string file((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const size_t header = file.size() - (8 * (c + 16) + 9 + 16);
  auto write = [&](const std::string& name, const std::string& bytes) {
    std::ofstream(dir.file(name), std::ios::binary) << bytes;
    return dir.file(name);
  };
  std::string flipped = file;
  flipped[header + 3 * (c + 16) + 7] ^= 0x01;
  const std::string cut = file.substr(0, header + 6 * (c + 16));
  std::string header_changed = file;
  header_changed[16] ^= 0x10;  // the chunk size field: the MAC no longer verifies
  Identity mallory = *Identity::generate();
  for (auto& d : devices()) {
    SCOPED_TRACE(d.device->name());
    SecureChannel ch(*d.device, ChannelOptions{.batch_chunks = 2, .depth = 3});
    auto a = ch.upload(write("flipped.sealed", flipped), ring());
    ASSERT_FALSE(a);
    EXPECT_EQ(a.error().code, ErrorCode::kChunkAuth);
    EXPECT_NE(a.error().message.find("flipped.sealed: chunk 3 fails authentication (1 of the 9 chunks read)"), std::string::npos)
        << a.error().message;
    auto b = ch.upload(write("cut.sealed", cut), ring());
    ASSERT_FALSE(b);
    EXPECT_NE(b.error().message.find("chunk 5 fails authentication"), std::string::npos) << b.error().message;
    // Cut to its header and 16 bytes, it has the shape of an empty stream: only the tag of that
    // "final" chunk shows the cut.
    auto e = ch.upload(write("to-empty.sealed", file.substr(0, header + 16)), ring());
    ASSERT_FALSE(e) << "a truncated file read as an empty one";
    EXPECT_NE(e.error().message.find("chunk 0 fails authentication"), std::string::npos) << e.error().message;
    auto h = ch.upload(write("header.sealed", header_changed), ring());
    ASSERT_FALSE(h);
    EXPECT_TRUE(h.error().code == ErrorCode::kHeaderAuth || h.error().code == ErrorCode::kMalformed) << h.error().message;
    sealed::KeyRing other;
    other.identities = {&mallory};
    auto k = ch.upload(path, other);
    ASSERT_FALSE(k);
    EXPECT_EQ(k.error().code, ErrorCode::kNoMatchingKey) << k.error().message;
    auto missing = ch.upload(dir.file("no-such.sealed"), ring());
    ASSERT_FALSE(missing);
    EXPECT_NE(missing.error().message.find("no-such.sealed"), std::string::npos);
  }
}

// A device whose kernel launches stop one chunk short of a run's final chunk (as a launch with a
// wrong grid size would): that chunk is never decrypted nor verified, and the upload must say so
// instead of releasing whatever its output memory held.
class ShortLaunchDevice final : public testing::ForwardingDevice {
 public:
  using ForwardingDevice::ForwardingDevice;
  std::string name() const override { return "short launches on " + d_->name(); }
  Result<void> run_chunks(int s, const std::byte* key, const gpu::ChunkRun& run, uint64_t chunks, uint64_t last_len, bool seal, const std::byte* in,
                          std::byte* out, std::byte* failed) override {
    if (!run.ends_with_final || chunks < 2) return d_->run_chunks(s, key, run, chunks, last_len, seal, in, out, failed);
    gpu::ChunkRun shorter = run;
    shorter.ends_with_final = false;
    return d_->run_chunks(s, key, shorter, chunks - 1, run.chunk_size, seal, in, out, failed);
  }
};

TEST_F(Channel, AChunkTheKernelNeverReachedIsAFailureNotAPass) {
  const uint32_t c = 1024;
  const std::string path = seal_file("short.sealed", marked_plaintext(5 * c + 100), c);
  for (auto& d : devices()) {
    ShortLaunchDevice shorted(std::move(d.device));
    SCOPED_TRACE(shorted.name());
    SecureChannel ch(shorted, ChannelOptions{.batch_chunks = 2, .depth = 2});
    auto r = ch.upload(path, ring());
    ASSERT_FALSE(r) << "an unverified chunk was released";
    EXPECT_EQ(r.error().code, ErrorCode::kChunkAuth);
    EXPECT_NE(r.error().message.find("short.sealed: chunk 5 fails authentication (1 of the 6 chunks read)"), std::string::npos) << r.error().message;
    // A range that ends before the final chunk is not affected.
    auto head = ch.upload(path, ring(), 0, 2 * c);
    ASSERT_TRUE(head) << head.error().message;
  }
}

// Several channels at once, on threads sharing one device: each transfer has its own key on the
// device, so none sees another's data, and every result is right.
TEST_F(Channel, SeveralChannelsShareADeviceAtOnce) {
  const uint32_t c = 2048;
  constexpr int kChannels = 4;
  std::vector<Bytes> plains;
  std::vector<std::string> paths;
  for (int i = 0; i < kChannels; ++i) {
    plains.push_back(marked_plaintext(size_t{7} * c + 100 * static_cast<size_t>(i)));
    paths.push_back(seal_file("multi-" + std::to_string(i) + ".sealed", plains.back(), c));
  }
  for (auto& d : devices()) {
    SCOPED_TRACE(d.device->name());
    std::vector<std::string> errors(kChannels);
    std::vector<std::thread> threads;
    for (int i = 0; i < kChannels; ++i) {
      threads.emplace_back([&, i] {
        SecureChannel ch(*d.device, ChannelOptions{.batch_chunks = 2, .depth = 2});
        for (int round = 0; round < 3; ++round) {
          auto buf = ch.upload(paths[static_cast<size_t>(i)], ring());
          if (!buf) {
            errors[static_cast<size_t>(i)] = buf.error().message;
            return;
          }
          auto host = buf->to_host();
          if (!host || *host != plains[static_cast<size_t>(i)]) {
            errors[static_cast<size_t>(i)] = "channel " + std::to_string(i) + " read wrong data";
            return;
          }
        }
      });
    }
    for (auto& t : threads) t.join();
    for (const auto& e : errors) EXPECT_EQ(e, "");
  }
}

}  // namespace
}  // namespace tresor
