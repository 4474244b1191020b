// The sealed stream payload (docs/formats.md §5–§6): round trips over awkward sizes, equality of
// the streaming and parallel paths, random access, and the tamper suite — every attack must be
// detected with its own error naming the file and the chunk, releasing no plaintext.
#include <gtest/gtest.h>

#include <cstring>
#include <atomic>
#include <functional>
#include <random>

#include "support/test_support.h"
#include "tresor/sealed.h"

namespace tresor {
namespace {

using testing::DeterministicRandom;
using testing::FailsWith;
using testing::pattern_bytes;

struct Keys {
  Identity id = *Identity::generate();
  DatasetKey dk = *DatasetKey::generate("lab/ct");
  sealed::KeyRing ring() const {
    sealed::KeyRing r;
    r.identities.push_back(&id);
    return r;
  }
};

sealed::SealOptions options(const Keys& k, uint32_t chunk, unsigned threads, crypto::RandomSource* rng = nullptr) {
  sealed::SealOptions o;
  o.chunk_size = chunk;
  o.threads = threads;
  o.recipients.push_back(k.id.recipient());
  o.rng = rng;
  return o;
}

Bytes seal_streaming(ByteSpan plain, const sealed::SealOptions& o, size_t write_piece) {
  MemorySink sink;
  auto w = sealed::SealWriter::create(o, sink);
  EXPECT_TRUE(w) << w.error().message;
  for (size_t off = 0; off < plain.size(); off += write_piece) {
    EXPECT_TRUE(w->write(plain.subspan(off, std::min(write_piece, plain.size() - off))));
  }
  EXPECT_TRUE(w->finish());
  EXPECT_EQ(w->plaintext_bytes(), plain.size());
  return sink.bytes;
}

Result<Bytes> open_streaming(ByteSpan sealed_bytes, const sealed::KeyRing& ring, unsigned threads,
                             size_t max_read = SIZE_MAX, const std::string& name = "test.sealed") {
  MemorySource src(sealed_bytes, max_read);
  MemorySink sink;
  sealed::OpenOptions oo;
  oo.threads = threads;
  oo.name = name;
  auto n = sealed::open_stream(src, sink, ring, oo);
  if (!n) return std::unexpected(n.error());
  return std::move(sink.bytes);
}

Result<Bytes> open_random_access(ByteSpan sealed_bytes, const sealed::KeyRing& ring, unsigned threads,
                                 const std::string& name = "test.sealed") {
  MemorySource src(sealed_bytes);
  sealed::OpenOptions oo;
  oo.threads = threads;
  oo.name = name;
  auto ra = sealed::RandomAccessReader::open(src, ring, oo);
  if (!ra) return std::unexpected(ra.error());
  Bytes out(ra->plaintext_size(), std::byte{0xAA});
  auto r = ra->read_range(0, out);
  if (!r) {
    // No plaintext of a failing stream: the output must have been wiped.
    for (std::byte b : out) EXPECT_EQ(b, std::byte{0});
    return std::unexpected(r.error());
  }
  return out;
}

Result<Bytes> open_parallel_path(ByteSpan sealed_bytes, const sealed::KeyRing& ring, unsigned threads,
                                 const std::string& name = "test.sealed") {
  sealed::OpenOptions oo;
  oo.threads = threads;
  oo.name = name;
  Bytes out(sealed_bytes.size(), std::byte{0xAA});
  auto n = sealed::open_parallel(sealed_bytes, out, ring, oo);
  if (!n) {
    for (std::byte b : out) {
      if (b == std::byte{0xAA}) break;  // untouched tail beyond the plaintext
      EXPECT_EQ(b, std::byte{0}) << "open_parallel released plaintext of a failing stream";
    }
    return std::unexpected(n.error());
  }
  out.resize(*n);
  return out;
}

// A random-access sink over a vector (the resize happens once, before the concurrent writes).
class BufferSink final : public RandomAccessSink {
 public:
  Result<void> resize(uint64_t size) const override {
    bytes.resize(static_cast<size_t>(size), std::byte{0xAA});
    return {};
  }
  Result<void> write_at(uint64_t offset, ByteSpan data) const override {
    if (offset + data.size() > bytes.size()) return fail(ErrorCode::kIo, "write past the end of the sink");
    if (!data.empty()) std::memcpy(bytes.data() + offset, data.data(), data.size());
    return {};
  }
  mutable Bytes bytes;
};

Result<Bytes> open_file_path(ByteSpan sealed_bytes, const sealed::KeyRing& ring, unsigned threads,
                             const std::string& name = "test.sealed") {
  MemorySource src(sealed_bytes);
  BufferSink sink;
  sealed::OpenOptions oo;
  oo.threads = threads;
  oo.name = name;
  auto n = sealed::open_parallel(src, sink, ring, oo);
  if (!n) {
    EXPECT_TRUE(sink.bytes.empty()) << "the sink of a failing stream was not truncated";
    return std::unexpected(n.error());
  }
  EXPECT_EQ(*n, sink.bytes.size());
  return std::move(sink.bytes);
}

Bytes seal_file_path(ByteSpan plain, const sealed::SealOptions& o) {
  MemorySource src(plain);
  BufferSink sink;
  auto n = sealed::seal_parallel(src, sink, o);
  EXPECT_TRUE(n) << n.error().message;
  EXPECT_EQ(n.value_or(0), sink.bytes.size());
  return std::move(sink.bytes);
}

// ---- round trips ----------------------------------------------------------------------------

struct SizeCase {
  uint32_t chunk;
  size_t size;
};

class SealedRoundTrip : public ::testing::TestWithParam<SizeCase> {};

TEST_P(SealedRoundTrip, AllPathsAgree) {
  const auto [chunk, size] = GetParam();
  Keys k;
  const Bytes plain = pattern_bytes(size, static_cast<uint32_t>(size * 31 + chunk));
  for (unsigned threads : {1u, 3u}) {
    SCOPED_TRACE("threads " + std::to_string(threads));
    auto s = sealed::seal_buffer(plain, options(k, chunk, threads));
    ASSERT_TRUE(s) << s.error().message;
    // Size follows from the format: header + ceil(size/chunk) frames (one for the empty stream).
    const size_t chunks = size == 0 ? 1 : (size + chunk - 1) / chunk;
    auto h = sealed::parse_header(*s);
    ASSERT_TRUE(h);
    EXPECT_EQ(s->size(), h->size() + size + chunks * sealed::kTagSize);

    auto a = open_streaming(*s, k.ring(), threads);
    ASSERT_TRUE(a) << a.error().message;
    EXPECT_EQ(*a, plain);
    auto b = open_streaming(*s, k.ring(), 1, 7);  // short reads from the source
    ASSERT_TRUE(b) << b.error().message;
    EXPECT_EQ(*b, plain);
    auto c = open_random_access(*s, k.ring(), threads);
    ASSERT_TRUE(c) << c.error().message;
    EXPECT_EQ(*c, plain);
    auto d = open_parallel_path(*s, k.ring(), threads);
    ASSERT_TRUE(d) << d.error().message;
    EXPECT_EQ(*d, plain);
    auto e = open_file_path(*s, k.ring(), threads);
    ASSERT_TRUE(e) << e.error().message;
    EXPECT_EQ(*e, plain);
    // The streaming writer and the file path write the same layout, and it opens.
    EXPECT_EQ(seal_streaming(plain, options(k, chunk, threads), 1000).size(), s->size());
    const Bytes f = seal_file_path(plain, options(k, chunk, threads));
    ASSERT_EQ(f.size(), s->size());
    EXPECT_EQ(*open_streaming(f, k.ring(), 1), plain);

    // Pull-style read() in odd pieces.
    MemorySource src(*s);
    auto reader = sealed::SealReader::open(src, k.ring(), {});
    ASSERT_TRUE(reader);
    Bytes got;
    std::byte piece[37];
    for (;;) {
      auto n = reader->read(piece);
      ASSERT_TRUE(n) << n.error().message;
      if (*n == 0) break;
      got.insert(got.end(), piece, piece + *n);
    }
    EXPECT_EQ(got, plain);
  }
}

INSTANTIATE_TEST_SUITE_P(Sizes, SealedRoundTrip,
                         ::testing::Values(SizeCase{16, 0}, SizeCase{16, 1}, SizeCase{64, 63}, SizeCase{64, 64},
                                           SizeCase{64, 65}, SizeCase{64, 64 * 10}, SizeCase{64, 64 * 10 + 7},
                                           SizeCase{4096, 4095}, SizeCase{4096, 4096}, SizeCase{4096, 4097},
                                           SizeCase{4096, 4096 * 37 + 123}, SizeCase{1u << 20, 3 * (1u << 20) + 5}),
                         [](const auto& param_info) {
                           return "chunk" + std::to_string(param_info.param.chunk) + "_size" +
                                  std::to_string(param_info.param.size);
                         });

TEST(SealedStream, StreamingAndParallelProduceIdenticalBytes) {
  Keys k;
  const Bytes plain = pattern_bytes(64 * 1000 + 17, 7);
  std::vector<Bytes> outs;
  for (unsigned threads : {1u, 2u, 4u, 7u}) {
    for (size_t piece : {size_t{1000}, size_t{64}, plain.size()}) {
      DeterministicRandom rng("same randomness");
      outs.push_back(seal_streaming(plain, options(k, 64, threads, &rng), piece));
    }
    DeterministicRandom r1("same randomness"), r2("same randomness");
    outs.push_back(*sealed::seal_buffer(plain, options(k, 64, threads, &r1)));
    outs.push_back(seal_file_path(plain, options(k, 64, threads, &r2)));
  }
  for (const auto& o : outs) EXPECT_EQ(o, outs.front());
  // And a different seed gives a different file (fresh file key and nonce prefix).
  DeterministicRandom other("other randomness");
  EXPECT_NE(seal_streaming(plain, options(k, 64, 1, &other), 1000), outs.front());
}

TEST(SealedStream, RandomAccessChunksAndRanges) {
  Keys k;
  const uint32_t cs = 256;
  const Bytes plain = pattern_bytes(cs * 50 + 100, 11);
  auto s = sealed::seal_buffer(plain, options(k, cs, 2));
  ASSERT_TRUE(s);
  MemorySource src(*s);
  sealed::OpenOptions oo;
  oo.threads = 3;
  auto ra = sealed::RandomAccessReader::open(src, k.ring(), oo);
  ASSERT_TRUE(ra) << ra.error().message;
  EXPECT_EQ(ra->chunk_count(), 51u);
  EXPECT_EQ(ra->plaintext_size(), plain.size());
  EXPECT_EQ(ra->chunk_plaintext_size(50), 100u);
  EXPECT_EQ(ra->chunk_offset(3), ra->header().size() + 3 * (cs + 16));

  Bytes chunk(cs);
  for (uint64_t i : {uint64_t{0}, uint64_t{17}, uint64_t{50}}) {
    auto n = ra->read_chunk(i, chunk);
    ASSERT_TRUE(n) << n.error().message;
    EXPECT_TRUE(std::equal(chunk.begin(), chunk.begin() + static_cast<long>(*n), plain.begin() + static_cast<long>(i * cs)));
  }
  EXPECT_EQ(ra->read_chunk(51, chunk).error().code, ErrorCode::kInvalidArgument);
  Bytes small(10);
  EXPECT_EQ(ra->read_chunk(0, small).error().code, ErrorCode::kInvalidArgument);

  std::mt19937 gen(5);
  for (int t = 0; t < 50; ++t) {
    const uint64_t off = gen() % plain.size();
    const size_t len = gen() % (plain.size() - off) + 1;
    Bytes out(len);
    ASSERT_TRUE(ra->read_range(off, out));
    EXPECT_TRUE(std::equal(out.begin(), out.end(), plain.begin() + static_cast<long>(off)));
  }
  Bytes past(2);
  EXPECT_EQ(ra->read_range(plain.size() - 1, past).error().code, ErrorCode::kInvalidArgument);
  EXPECT_TRUE(ra->verify_all());
}

TEST(SealedStream, DatasetKeyAndSeveralRecipients) {
  Keys k, other;
  const Bytes plain = pattern_bytes(5000, 3);
  sealed::SealOptions o = options(k, 1024, 1);
  o.recipients.push_back(other.id.recipient());
  o.datasets.push_back(&k.dk);
  auto s = sealed::seal_buffer(plain, o);
  ASSERT_TRUE(s);
  EXPECT_EQ(*open_streaming(*s, other.ring(), 1), plain);
  sealed::KeyRing by_key;
  by_key.dataset_keys.push_back(&k.dk);
  EXPECT_EQ(*open_streaming(*s, by_key, 2), plain);
}

TEST(SealedStream, ParallelPathChecksBufferSizes) {
  Keys k;
  const Bytes plain = pattern_bytes(1000, 4);
  const auto o = options(k, 64, 2);
  auto need = sealed::sealed_size(plain.size(), o);
  ASSERT_TRUE(need);
  Bytes small(*need - 1);
  auto r = sealed::seal_parallel(plain, small, o);
  ASSERT_FALSE(r);
  EXPECT_NE(r.error().message.find(std::to_string(*need)), std::string::npos) << r.error().message;
  Bytes out(*need);
  ASSERT_EQ(*sealed::seal_parallel(plain, out, o), *need);
  Bytes tiny(999);
  auto q = sealed::open_parallel(out, tiny, k.ring(), {});
  ASSERT_FALSE(q);
  EXPECT_NE(q.error().message.find("1000"), std::string::npos) << q.error().message;
  Bytes exact(1000);
  ASSERT_EQ(*sealed::open_parallel(out, exact, k.ring(), {}), 1000u);
  EXPECT_EQ(exact, plain);
}

TEST(SealedStream, ParallelPathReportsProgress) {
  Keys k;
  const Bytes plain = pattern_bytes(64 * 1000, 8);
  std::atomic<uint64_t> last{0};
  std::atomic<int> calls{0};
  sealed::SealOptions o = options(k, 64, 4);
  o.progress = [&](uint64_t done) {
    last = done;
    ++calls;
  };
  const Bytes f = seal_file_path(plain, o);
  EXPECT_GT(calls.load(), 10);
  EXPECT_GE(last.load(), plain.size() * 9 / 10);
  EXPECT_LE(last.load(), plain.size() + 4 * 64);
  EXPECT_EQ(*open_streaming(f, k.ring(), 1), plain);
}

TEST(SealedStream, WriterRejectsUseAfterFinish) {
  Keys k;
  MemorySink sink;
  auto w = sealed::SealWriter::create(options(k, 64, 1), sink);
  ASSERT_TRUE(w);
  ASSERT_TRUE(w->write(as_bytes("abc")));
  ASSERT_TRUE(w->finish());
  EXPECT_FALSE(w->write(as_bytes("more")));
  EXPECT_FALSE(w->finish());
}

// ---- tamper suite ---------------------------------------------------------------------------

// A 7-chunk stream (6 full chunks of 64 bytes and a final chunk of 10 bytes), and a 4-chunk
// stream whose final chunk is full.
struct Tamper {
  Keys k;
  uint32_t cs = 64;
  Bytes plain = pattern_bytes(64 * 6 + 10, 99);
  Bytes plain_exact = pattern_bytes(64 * 4, 98);
  Bytes sealed_bytes;
  Bytes sealed_exact;
  size_t hlen = 0;
  size_t frame = 64 + 16;

  Tamper() {
    sealed_bytes = *sealed::seal_buffer(plain, options(k, cs, 1));
    sealed_exact = *sealed::seal_buffer(plain_exact, options(k, cs, 1));
    hlen = sealed::parse_header(sealed_bytes)->size();
  }
  size_t frame_off(size_t i) const { return hlen + i * frame; }
  Bytes frame_bytes(const Bytes& s, size_t i) const {
    const size_t end = std::min(frame_off(i) + frame, s.size());
    return Bytes(s.begin() + static_cast<long>(frame_off(i)), s.begin() + static_cast<long>(end));
  }
};

struct TamperCase {
  std::string name;
  std::function<Bytes(const Tamper&)> make;
  ErrorCode want;
  std::string want_text;  // must appear in the message (e.g. the chunk index)
};

// Every tampered stream must fail in both readers (streaming with 1 and 4 threads, random
// access) with the expected code, naming the file; the twin (untouched) stream must open.
void expect_rejected(const Tamper& t, const TamperCase& c) {
  SCOPED_TRACE(c.name);
  const Bytes bad = c.make(t);
  ASSERT_NE(bad, t.sealed_bytes);
  for (unsigned threads : {1u, 4u}) {
    auto a = open_streaming(bad, t.k.ring(), threads, SIZE_MAX, "victim.sealed");
    ASSERT_FALSE(a) << "streaming reader accepted: " << c.name;
    EXPECT_EQ(a.error().code, c.want) << error_code_name(a.error().code) << ": " << a.error().message;
    EXPECT_NE(a.error().message.find("victim.sealed"), std::string::npos) << a.error().message;
    EXPECT_NE(a.error().message.find(c.want_text), std::string::npos)
        << "'" << a.error().message << "' lacks '" << c.want_text << "'";
  }
  auto b = open_random_access(bad, t.k.ring(), 2, "victim.sealed");
  ASSERT_FALSE(b) << "random-access reader accepted: " << c.name;
  EXPECT_EQ(b.error().code, c.want) << error_code_name(b.error().code) << ": " << b.error().message;
  EXPECT_NE(b.error().message.find(c.want_text), std::string::npos) << b.error().message;
  for (unsigned threads : {1u, 3u}) {
    auto f = open_file_path(bad, t.k.ring(), threads, "victim.sealed");
    ASSERT_FALSE(f) << "file path accepted: " << c.name;
    EXPECT_EQ(f.error().code, c.want) << error_code_name(f.error().code) << ": " << f.error().message;
    EXPECT_NE(f.error().message.find(c.want_text), std::string::npos) << f.error().message;
    auto p = open_parallel_path(bad, t.k.ring(), threads, "victim.sealed");
    ASSERT_FALSE(p) << "parallel path accepted: " << c.name;
    EXPECT_EQ(p.error().code, c.want) << error_code_name(p.error().code) << ": " << p.error().message;
    EXPECT_NE(p.error().message.find(c.want_text), std::string::npos) << p.error().message;
  }
}

TEST(SealedTamper, UntouchedStreamsOpen) {
  Tamper t;
  EXPECT_EQ(*open_streaming(t.sealed_bytes, t.k.ring(), 1), t.plain);
  EXPECT_EQ(*open_random_access(t.sealed_bytes, t.k.ring(), 2), t.plain);
  EXPECT_EQ(*open_streaming(t.sealed_exact, t.k.ring(), 4), t.plain_exact);
}

TEST(SealedTamper, EveryAttackIsDetectedWithItsOwnError) {
  Tamper t;
  auto flip = [](size_t off) {
    return [off](const Tamper& tt) {
      Bytes b = tt.sealed_bytes;
      b[off] ^= std::byte{0x01};
      return b;
    };
  };
  const std::vector<TamperCase> cases = {
      {"truncated at a chunk boundary",
       [](const Tamper& tt) { return Bytes(tt.sealed_bytes.begin(), tt.sealed_bytes.begin() + static_cast<long>(tt.frame_off(6))); },
       ErrorCode::kTruncated, "chunk 5"},
      {"truncated after the header",
       [](const Tamper& tt) { return Bytes(tt.sealed_bytes.begin(), tt.sealed_bytes.begin() + static_cast<long>(tt.hlen)); },
       ErrorCode::kTruncated, "no chunks"},
      {"truncated inside the final tag",
       [](const Tamper& tt) { return Bytes(tt.sealed_bytes.begin(), tt.sealed_bytes.begin() + static_cast<long>(tt.frame_off(6) + 9)); },
       ErrorCode::kTruncated, "16-byte tag"},
      {"truncated inside a full chunk",
       [](const Tamper& tt) { return Bytes(tt.sealed_bytes.begin(), tt.sealed_bytes.begin() + static_cast<long>(tt.frame_off(3) + 50)); },
       ErrorCode::kChunkAuth, "chunk 3"},
      {"header truncated",
       [](const Tamper& tt) { return Bytes(tt.sealed_bytes.begin(), tt.sealed_bytes.begin() + 60); },
       ErrorCode::kTruncated, "header"},
      {"bytes appended after a full final chunk",
       [](const Tamper& tt) {
         Bytes b = tt.sealed_exact;
         const Bytes extra = tt.frame_bytes(tt.sealed_exact, 1);
         b.insert(b.end(), extra.begin(), extra.end());
         return b;
       },
       ErrorCode::kTrailingData, "chunk 3"},
      {"a few bytes appended after a full final chunk",
       [](const Tamper& tt) {
         Bytes b = tt.sealed_exact;
         const Bytes extra = pattern_bytes(5, 6);
         b.insert(b.end(), extra.begin(), extra.end());
         return b;
       },
       ErrorCode::kTrailingData, "chunk 3"},
      {"final chunk duplicated",
       [](const Tamper& tt) {
         Bytes b = tt.sealed_exact;
         const Bytes last = tt.frame_bytes(tt.sealed_exact, 3);
         b.insert(b.end(), last.begin(), last.end());
         return b;
       },
       ErrorCode::kTrailingData, "final chunk"},
      {"chunks 1 and 2 swapped",
       [](const Tamper& tt) {
         Bytes b = tt.sealed_bytes;
         const Bytes c1 = tt.frame_bytes(b, 1), c2 = tt.frame_bytes(b, 2);
         std::copy(c2.begin(), c2.end(), b.begin() + static_cast<long>(tt.frame_off(1)));
         std::copy(c1.begin(), c1.end(), b.begin() + static_cast<long>(tt.frame_off(2)));
         return b;
       },
       ErrorCode::kChunkReordered, "chunk 1 (bytes"},
      {"chunk 1 duplicated in place of chunk 4",
       [](const Tamper& tt) {
         Bytes b = tt.sealed_bytes;
         const Bytes c1 = tt.frame_bytes(b, 1);
         std::copy(c1.begin(), c1.end(), b.begin() + static_cast<long>(tt.frame_off(4)));
         return b;
       },
       ErrorCode::kChunkReordered, "is chunk 1 of this stream"},
      {"final chunk moved earlier",
       [](const Tamper& tt) {
         Bytes b = tt.sealed_exact;
         const Bytes c3 = tt.frame_bytes(b, 3), c2 = tt.frame_bytes(b, 2);
         std::copy(c3.begin(), c3.end(), b.begin() + static_cast<long>(tt.frame_off(2)));
         std::copy(c2.begin(), c2.end(), b.begin() + static_cast<long>(tt.frame_off(3)));
         return b;
       },
       ErrorCode::kChunkReordered, "is chunk 3 (final)"},
      {"chunk from another file sealed to the same recipient",
       [](const Tamper& tt) {
         const Bytes other = *sealed::seal_buffer(tt.plain, options(tt.k, tt.cs, 1));
         Bytes b = tt.sealed_bytes;
         const Bytes c2 = tt.frame_bytes(other, 2);
         std::copy(c2.begin(), c2.end(), b.begin() + static_cast<long>(tt.frame_off(2)));
         return b;
       },
       ErrorCode::kChunkAuth, "chunk 2"},
      {"header of another file sealed to the same recipient",
       [](const Tamper& tt) {
         // The other file's header is the same size; its file key and nonce prefix differ, so
         // the header authenticates but no chunk of this file does.
         const Bytes other = *sealed::seal_buffer(tt.plain, options(tt.k, tt.cs, 1));
         Bytes b = tt.sealed_bytes;
         std::copy(other.begin(), other.begin() + static_cast<long>(tt.hlen), b.begin());
         return b;
       },
       ErrorCode::kChunkAuth, "chunk 0"},
      {"bytes appended after a short final chunk",
       [](const Tamper& tt) {
         Bytes b = tt.sealed_bytes;
         const Bytes extra = pattern_bytes(20, 5);
         b.insert(b.end(), extra.begin(), extra.end());
         return b;
       },
       ErrorCode::kChunkAuth, "chunk 6"},
      {"flipped ciphertext bit in chunk 3", flip(t.frame_off(3) + 5), ErrorCode::kChunkAuth, "chunk 3"},
      {"flipped tag bit in chunk 0", flip(t.frame_off(0) + 64 + 3), ErrorCode::kChunkAuth, "chunk 0"},
      {"flipped bit in the final chunk", flip(t.frame_off(6) + 2), ErrorCode::kChunkAuth, "chunk 6"},
      {"flipped nonce-prefix bit", flip(21), ErrorCode::kHeaderAuth, "header MAC"},
      {"flipped chunk-size bit", flip(17), ErrorCode::kHeaderAuth, "header MAC"},
      {"flipped header MAC bit", flip(t.hlen - 1), ErrorCode::kHeaderAuth, "header MAC"},
      {"flipped wrapped-key bit", flip(28 + 4 + 40), ErrorCode::kNoMatchingKey, "no stanza"},
      {"flipped magic bit", flip(3), ErrorCode::kNotSealed, "magic"},
      {"version changed to 2",
       [](const Tamper& tt) {
         Bytes b = tt.sealed_bytes;
         b[8] = std::byte{2};
         return b;
       },
       ErrorCode::kUnsupportedVersion, "version 2"},
  };
  for (const auto& c : cases) expect_rejected(t, c);
}

// A chunk from another stream that shares the file key but not the nonce prefix (what a reused
// key would look like) is still rejected: the payload key depends on the prefix.
class ScriptedRandom final : public crypto::RandomSource {
 public:
  explicit ScriptedRandom(Bytes first) : first_(std::move(first)) {}
  Result<void> fill(MutableByteSpan out) override {
    if (!used_) {
      used_ = true;
      if (out.size() == first_.size()) {
        std::memcpy(out.data(), first_.data(), out.size());
        return {};
      }
    }
    return crypto::random_bytes(out);
  }

 private:
  Bytes first_;
  bool used_ = false;
};

TEST(SealedTamper, ChunkFromStreamWithSameFileKeyIsRejected) {
  Tamper t;
  const Bytes file_key = pattern_bytes(32, 1234);
  ScriptedRandom r1(file_key), r2(file_key);
  const Bytes a = *sealed::seal_buffer(t.plain, options(t.k, t.cs, 1, &r1));
  const Bytes b = *sealed::seal_buffer(t.plain, options(t.k, t.cs, 1, &r2));
  Bytes mixed = a;
  const Bytes c2 = t.frame_bytes(b, 2);
  std::copy(c2.begin(), c2.end(), mixed.begin() + static_cast<long>(t.frame_off(2)));
  auto r = open_streaming(mixed, t.k.ring(), 1, SIZE_MAX, "mixed.sealed");
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, ErrorCode::kChunkAuth);
  EXPECT_NE(r.error().message.find("another stream"), std::string::npos);
  EXPECT_EQ(*open_streaming(a, t.k.ring(), 1), t.plain);  // twin
}

TEST(SealedTamper, DiagnosisLooksOnlyNearTheFailingPosition) {
  // 70000 chunks of 16 bytes: a chunk moved by 1000 positions is recognised as reordered; one
  // moved by 69000 (past the 65536-chunk window) is reported as failing authentication, so that
  // a hostile file cannot make diagnosis search 2^32 indices.
  Keys k;
  const Bytes plain = pattern_bytes(16 * 70000, 12);
  const Bytes s = *sealed::seal_buffer(plain, options(k, 16, 1));
  const size_t hlen = sealed::parse_header(s)->size();
  auto moved = [&](size_t from, size_t to) {
    Bytes b = s;
    std::copy(s.begin() + static_cast<long>(hlen + from * 32), s.begin() + static_cast<long>(hlen + from * 32 + 32),
              b.begin() + static_cast<long>(hlen + to * 32));
    return b;
  };
  auto near = open_parallel_path(moved(68000, 69000), k.ring(), 2);
  ASSERT_FALSE(near);
  EXPECT_EQ(near.error().code, ErrorCode::kChunkReordered) << near.error().message;
  auto far = open_parallel_path(moved(0, 69000), k.ring(), 2);
  ASSERT_FALSE(far);
  EXPECT_EQ(far.error().code, ErrorCode::kChunkAuth) << far.error().message;
}

TEST(SealedStream, TooManyStanzasForTheHeaderAreRefusedBeforeSealing) {
  std::vector<DatasetKey> keys;
  for (int i = 0; i < 340; ++i) {
    std::string id = "d";
    id += std::to_string(i);
    id += '/';
    id.append(120, 'x');
    keys.push_back(*DatasetKey::generate(id));
  }
  sealed::SealOptions o;
  for (const auto& d : keys) o.datasets.push_back(&d);
  auto r = sealed::check_seal_options(o);
  ASSERT_FALSE(r);
  EXPECT_NE(r.error().message.find("65536-byte limit"), std::string::npos) << r.error().message;
  EXPECT_FALSE(sealed::seal_buffer(as_bytes("x"), o));
  o.datasets.resize(300);
  EXPECT_TRUE(sealed::check_seal_options(o));
  auto ok = sealed::seal_buffer(as_bytes("x"), o);
  ASSERT_TRUE(ok) << ok.error().message;
  sealed::KeyRing ring;
  ring.dataset_keys.push_back(&keys[299]);
  EXPECT_EQ(to_string(sealed::open_buffer(*ok, ring, {})->span()), "x");
}

// A source that fails after `good` bytes.
class FailingSource final : public ByteSource {
 public:
  explicit FailingSource(size_t good) : left_(good) {}
  Result<size_t> read(MutableByteSpan out) override {
    if (left_ == 0) return fail(ErrorCode::kIo, "disk on fire");
    const size_t n = std::min(left_, out.size());
    std::fill_n(out.begin(), n, std::byte{7});
    left_ -= n;
    return n;
  }

 private:
  size_t left_;
};

TEST(SealedStream, WriterCannotFinishAfterItsSourceFailed) {
  Keys k;
  MemorySink sink;
  auto w = sealed::SealWriter::create(options(k, 64, 2), sink);
  ASSERT_TRUE(w);
  FailingSource src(1000);
  EXPECT_TRUE(FailsWith(w->write_from(src), ErrorCode::kIo));
  EXPECT_FALSE(w->finish()) << "a stream whose source failed was sealed as complete";
}

TEST(SealedTamper, WrongIdentityOrKeyIsReported) {
  Tamper t;
  Keys stranger;
  auto r = open_streaming(t.sealed_bytes, stranger.ring(), 1, SIZE_MAX, "mine.sealed");
  ASSERT_FALSE(r);
  EXPECT_EQ(r.error().code, ErrorCode::kNoMatchingKey);
  EXPECT_NE(r.error().message.find("mine.sealed"), std::string::npos);
  sealed::KeyRing wrong_key;
  wrong_key.dataset_keys.push_back(&stranger.dk);
  EXPECT_EQ(open_random_access(t.sealed_bytes, wrong_key, 1).error().code, ErrorCode::kNoMatchingKey);
}

TEST(SealedTamper, EmptyAndForeignInputs) {
  Keys k;
  EXPECT_EQ(open_streaming({}, k.ring(), 1).error().code, ErrorCode::kTruncated);
  EXPECT_EQ(open_random_access({}, k.ring(), 1).error().code, ErrorCode::kTruncated);
  const Bytes text = to_bytes("%PDF-1.7 this is not a sealed file at all, just some text");
  EXPECT_EQ(open_streaming(text, k.ring(), 1).error().code, ErrorCode::kNotSealed);
}

TEST(SealedTamper, StreamingReaderReleasesOnlyAuthenticatedChunks) {
  Tamper t;
  Bytes bad = t.sealed_bytes;
  bad[t.frame_off(4) + 1] ^= std::byte{0x80};
  MemorySource src(bad);
  auto reader = sealed::SealReader::open(src, t.k.ring(), {});
  ASSERT_TRUE(reader);
  Bytes got;
  std::byte piece[64];
  Result<size_t> n;
  while ((n = reader->read(piece)) && *n > 0) got.insert(got.end(), piece, piece + *n);
  ASSERT_FALSE(n);
  EXPECT_EQ(n.error().code, ErrorCode::kChunkAuth);
  // Exactly the four chunks before the altered one were released, and they are authentic.
  ASSERT_EQ(got.size(), 4u * 64);
  EXPECT_TRUE(std::equal(got.begin(), got.end(), t.plain.begin()));
  EXPECT_FALSE(reader->read(piece));  // stays failed
}

}  // namespace
}  // namespace tresor
