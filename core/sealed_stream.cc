// Sealed format v1: the chunked STREAM payload (docs/formats.md §5) — streaming writer and reader,
// random access, and the diagnosis of failed chunks.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <functional>
#include <mutex>
#include <optional>
#include <string>

#include "tresor/sealed.h"
#include "chunk_pipeline.h"
#include "tresor/thread_pool.h"

namespace tresor::sealed {
namespace {

size_t frame_size(uint32_t chunk_size) { return size_t{chunk_size} + kTagSize; }

// One AES-GCM context per worker slot: contexts are not thread-safe.
Result<std::vector<crypto::AesGcm>> make_ciphers(ByteSpan key, unsigned n) {
  std::vector<crypto::AesGcm> v;
  v.reserve(n);
  for (unsigned i = 0; i < n; ++i) {
    auto g = crypto::AesGcm::create(key);
    if (!g) return std::unexpected(g.error());
    v.push_back(std::move(*g));
  }
  return v;
}

// Shape of a sealed stream of known total size (docs/formats.md §5).
struct Shape {
  uint64_t chunks = 0;
  size_t last_frame = 0;
  uint64_t plaintext = 0;
};

// `final_at(i)` tells whether whole frame i authenticates as the final chunk. It settles a body
// that ends 1..15 bytes past a whole frame: a truncated tag, or bytes appended after a full
// final chunk (the streaming reader calls the latter trailing data; so must every reader).
Result<Shape> shape_of(uint64_t body, uint32_t chunk_size, const std::string& name,
                       const std::function<bool(uint64_t)>& final_at) {
  const uint64_t fs = frame_size(chunk_size);
  if (body == 0) return fail(ErrorCode::kTruncated, name + ": the stream ends right after its header, with no chunks");
  const uint64_t rem = body % fs;
  if (rem > 0 && rem < kTagSize) {
    const uint64_t whole = body / fs;
    if (whole > 0 && final_at(whole - 1)) {
      return fail(ErrorCode::kTrailingData, name + ": chunk " + std::to_string(whole - 1) +
                                                " is the stream's final chunk, but " + std::to_string(rem) +
                                                " more bytes follow it: bytes were appended");
    }
    return fail(ErrorCode::kTruncated, name + ": the last chunk has " + std::to_string(rem) +
                                           " bytes, less than its 16-byte tag: the stream is truncated");
  }
  Shape s;
  s.chunks = body / fs + (rem > 0 ? 1 : 0);
  if (s.chunks > kMaxChunks) return fail(ErrorCode::kMalformed, name + ": more than 2^32 chunks");
  s.last_frame = static_cast<size_t>(rem > 0 ? rem : fs);
  s.plaintext = (s.chunks - 1) * chunk_size + (s.last_frame - kTagSize);
  return s;
}

// Explains why a chunk failed its tag check (docs/formats.md §6). GCM's tag for ciphertext C under
// nonce N is GHASH(C) xor E(J0(N)), and only the second term depends on the nonce; so one pass
// recovers GHASH(C) and every other (index, last) pair costs one AES block. This tells apart a
// chunk that belongs to this stream at another position (reordered), a final chunk followed by
// data (extension), a non-final chunk at the end (truncation), and anything else (altered, or
// from another stream). No plaintext is released.
// True when `frame` is a valid final chunk at `index`. Wipes the trial plaintext.
bool authenticates_as_final(crypto::AesGcm& aes, const Header& h, ByteSpan frame, uint64_t index) {
  if (frame.size() < kTagSize || index >= kMaxChunks) return false;
  SecretBuffer scratch(frame.size() - kTagSize);
  return aes.open(chunk_nonce(h.nonce_prefix, index, true), {}, frame, scratch.span()).has_value();
}

Error diagnose_chunk(crypto::AesGcm& aes, const Header& h, ByteSpan frame, uint64_t position, bool tried_last,
                     bool more_follows, uint64_t max_index, const std::string& name, uint64_t frame_offset) {
  const std::string where = name + ": chunk " + std::to_string(position) + " (bytes " + std::to_string(frame_offset) +
                            ".." + std::to_string(frame_offset + frame.size()) + ")";
  if (frame.size() < kTagSize) {
    return {ErrorCode::kTruncated, where + " has " + std::to_string(frame.size()) +
                                       " bytes, less than its 16-byte tag: the stream is truncated"};
  }
  const ByteSpan ct = frame.first(frame.size() - kTagSize);
  const ByteSpan tag = frame.subspan(frame.size() - kTagSize);
  const std::string auth_msg = where + " failed authentication: it was altered, or comes from another stream";

  auto j0 = [&](uint64_t index, bool last) {
    std::array<std::byte, 16> b{};
    const auto n = chunk_nonce(h.nonce_prefix, index, last);
    std::memcpy(b.data(), n.data(), n.size());
    b[15] = std::byte{1};  // J0 = IV ‖ 0^31 ‖ 1 for 96-bit IVs (NIST SP 800-38D §7.1 step 2)
    return b;
  };
  auto t0 = aes.tag_of_ciphertext(chunk_nonce(h.nonce_prefix, position, tried_last), ct);
  auto e0 = j0(position, tried_last);
  if (!t0 || !aes.encrypt_blocks(e0)) return {ErrorCode::kChunkAuth, auth_msg};
  std::array<std::byte, 16> ghash;
  for (size_t i = 0; i < 16; ++i) ghash[i] = (*t0)[i] ^ e0[i];

  // Candidates: every (index, last) with index within kWindow of the position (and at most
  // max_index): about 2^18 AES blocks at most, so a hostile file cannot make diagnosis slow.
  constexpr uint64_t kWindow = 65536;
  const uint64_t first = position > kWindow ? position - kWindow : 0;
  const uint64_t limit = std::min<uint64_t>({max_index, position + kWindow, kMaxChunks - 1});
  constexpr uint64_t kBatch = 4096;
  for (uint64_t start = first; start <= limit; start += kBatch) {
    const uint64_t count = std::min<uint64_t>(kBatch, limit - start + 1);
    Bytes blocks(2 * count * 16);
    for (uint64_t k = 0; k < count; ++k) {
      for (int last = 0; last < 2; ++last) {
        auto b = j0(start + k, last != 0);
        std::memcpy(blocks.data() + (2 * k + static_cast<uint64_t>(last)) * 16, b.data(), 16);
      }
    }
    if (!aes.encrypt_blocks(blocks)) return {ErrorCode::kChunkAuth, auth_msg};
    for (uint64_t k = 0; k < count; ++k) {
      for (int last = 0; last < 2; ++last) {
        const std::byte* e = blocks.data() + (2 * k + static_cast<uint64_t>(last)) * 16;
        std::array<std::byte, 16> cand;
        for (size_t i = 0; i < 16; ++i) cand[i] = ghash[i] ^ e[i];
        if (!crypto::ct_equal(cand, tag)) continue;
        const uint64_t index = start + k;
        const bool is_last = last != 0;
        if (index == position && is_last == tried_last) continue;  // cannot happen; be safe
        if (index == position && is_last && more_follows) {
          return {ErrorCode::kTrailingData,
                  where + " is the stream's final chunk, but more data follows it: bytes were appended"};
        }
        if (index == position && !is_last && !more_follows) {
          return {ErrorCode::kTruncated, where + " is not the final chunk, but the stream ends after it: truncated"};
        }
        return {ErrorCode::kChunkReordered, where + " is chunk " + std::to_string(index) +
                                                (is_last ? " (final)" : "") +
                                                " of this stream: chunks were reordered or duplicated"};
      }
    }
  }
  return {ErrorCode::kChunkAuth, auth_msg};
}

}  // namespace

// ---- writer -------------------------------------------------------------------------------------

// Slots of chunk_size + 16 bytes, sealed in place by the pipeline's workers while the caller
// fills the next ones; written to the sink in order. One slot and no workers with one thread;
// 2 × threads slots with more, so that memory stays within threads × 2 × chunk.
struct SealWriter::Impl {
  ByteSink* sink = nullptr;
  Header header;
  uint32_t chunk_size = 0;
  size_t slots = 1;
  std::vector<SecretBuffer> buf;  // plaintext, then ciphertext ‖ tag, in place
  std::vector<size_t> len;        // plaintext bytes in each slot
  std::vector<uint64_t> index;    // chunk index of each slot
  std::vector<char> last;
  size_t cur = 0;      // the slot being filled
  size_t filled = 0;   // bytes in it
  uint64_t submitted = 0;
  uint64_t written = 0;
  uint64_t total = 0;
  bool finished = false;
  bool failed = false;
  std::unique_ptr<detail::ChunkPipeline> pipeline;  // declared last: joined before the buffers go

  // Hands slot `cur` to the pipeline as the next chunk, then makes the next slot free.
  Result<void> submit_current(bool is_last) {
    // A non-final chunk must leave room for the final one that is still to come.
    if (submitted + (is_last ? 1 : 2) > kMaxChunks) {
      return fail(ErrorCode::kInvalidArgument, "stream exceeds 2^32 chunks; use a larger chunk size");
    }
    len[cur] = filled;
    index[cur] = submitted;
    last[cur] = is_last ? 1 : 0;
    pipeline->submit(cur);
    ++submitted;
    cur = (cur + 1) % slots;
    filled = 0;
    if (submitted - written == slots) TRESOR_TRY(write_oldest());
    return {};
  }

  Result<void> write_oldest() {
    const size_t s = static_cast<size_t>(written % slots);
    TRESOR_TRY(pipeline->wait(s));
    TRESOR_TRY(sink->write(buf[s].span().first(len[s] + kTagSize)));
    ++written;
    return {};
  }

  Result<void> finish_stream() {
    TRESOR_TRY(submit_current(true));
    while (written < submitted) TRESOR_TRY(write_oldest());
    return {};
  }
};

SealWriter::SealWriter(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
SealWriter::SealWriter(SealWriter&&) noexcept = default;
SealWriter& SealWriter::operator=(SealWriter&&) noexcept = default;
SealWriter::~SealWriter() = default;

Result<SealWriter> SealWriter::create(const SealOptions& options, ByteSink& sink) {
  auto nh = make_header(options);
  if (!nh) return std::unexpected(nh.error());
  auto impl = std::make_unique<Impl>();
  Impl& w = *impl;
  w.sink = &sink;
  w.header = nh->header;
  w.chunk_size = options.chunk_size;
  const unsigned threads = ThreadPool::resolve(options.threads);
  const unsigned workers = threads == 1 ? 0 : threads;
  w.slots = threads == 1 ? 1 : 2 * size_t{threads};
  for (size_t k = 0; k < w.slots; ++k) w.buf.emplace_back(frame_size(options.chunk_size));
  w.len.assign(w.slots, 0);
  w.index.assign(w.slots, 0);
  w.last.assign(w.slots, 0);
  auto keys = derive_stream_keys(nh->file_key.span(), nh->header.nonce_prefix);
  if (!keys) return std::unexpected(keys.error());
  auto ciphers = make_ciphers(keys->payload_key.span(), workers + 1);
  if (!ciphers) return std::unexpected(ciphers.error());
  w.pipeline = std::make_unique<detail::ChunkPipeline>(
      std::move(*ciphers), workers, w.slots, [&w](size_t s, crypto::AesGcm& c) -> Result<void> {
        const MutableByteSpan b = w.buf[s].span();
        return c.seal(chunk_nonce(w.header.nonce_prefix, w.index[s], w.last[s] != 0), {}, b.first(w.len[s]),
                      b.first(w.len[s] + kTagSize));
      });
  TRESOR_TRY(sink.write(nh->bytes));
  return SealWriter(std::move(impl));
}

Result<void> SealWriter::write(ByteSpan data) {
  Impl& s = *impl_;
  if (s.finished || s.failed) return fail(ErrorCode::kInvalidArgument, "write after finish() or a failed write");
  while (!data.empty()) {
    // A full slot is sealed only once more data arrives: it might be the final chunk.
    if (s.filled == s.chunk_size) {
      if (auto r = s.submit_current(false); !r) {
        s.failed = true;
        return r;
      }
    }
    const size_t n = std::min<size_t>(s.chunk_size - s.filled, data.size());
    std::memcpy(s.buf[s.cur].data() + s.filled, data.data(), n);
    s.filled += n;
    s.total += n;
    data = data.subspan(n);
  }
  return {};
}

Result<void> SealWriter::write_from(ByteSource& source) {
  Impl& s = *impl_;
  if (s.finished || s.failed) return fail(ErrorCode::kInvalidArgument, "write after finish() or a failed write");
  for (;;) {
    if (s.filled == s.chunk_size) {
      // Learn whether more data follows before sealing a full slot as non-final.
      std::byte next;
      auto n = source.read(MutableByteSpan(&next, 1));
      if (!n) {
        s.failed = true;  // a stream whose source failed must not be finished as if complete
        return std::unexpected(n.error());
      }
      if (*n == 0) return {};
      if (auto r = s.submit_current(false); !r) {
        s.failed = true;
        return r;
      }
      s.buf[s.cur].data()[0] = next;
      s.filled = 1;
      s.total += 1;
    }
    auto n = source.read(s.buf[s.cur].span().subspan(s.filled, s.chunk_size - s.filled));
    if (!n) {
      s.failed = true;
      return std::unexpected(n.error());
    }
    if (*n == 0) return {};
    s.filled += *n;
    s.total += *n;
  }
}

Result<void> SealWriter::finish() {
  Impl& s = *impl_;
  if (s.finished || s.failed) return fail(ErrorCode::kInvalidArgument, "finish() after finish() or a failed write");
  auto r = s.finish_stream();
  s.failed = !r;
  s.finished = r.has_value();
  return r;
}

uint64_t SealWriter::plaintext_bytes() const { return impl_->total; }
const Header& SealWriter::header() const { return impl_->header; }

// ---- reading the header -------------------------------------------------------------------------

namespace {

struct Opened {
  Header header;
  Bytes header_bytes;
  SecretBuffer payload_key;
};

Result<Opened> finish_open(Bytes header_bytes, const KeyRing& keys, const std::string& name) {
  auto h = parse_header(header_bytes);
  if (!h) return fail(h.error().code, name + ": " + h.error().message);
  auto file_key = unlock(*h, header_bytes, keys, name);
  if (!file_key) return std::unexpected(file_key.error());
  auto sk = derive_stream_keys(file_key->span(), h->nonce_prefix);
  if (!sk) return std::unexpected(sk.error());
  return Opened{std::move(*h), std::move(header_bytes), std::move(sk->payload_key)};
}

Result<Opened> read_header_stream(ByteSource& src, const KeyRing& keys, const std::string& name) {
  Bytes fixed(kFixedHeaderSize);
  auto n = read_full(src, fixed);
  if (!n) return std::unexpected(n.error());
  fixed.resize(*n);
  if (*n == 0) return fail(ErrorCode::kTruncated, name + ": empty input, not a sealed file");
  auto len = header_length(fixed);
  if (!len) return fail(len.error().code, name + ": " + len.error().message);
  Bytes all(*len);
  std::memcpy(all.data(), fixed.data(), fixed.size());
  auto m = read_full(src, MutableByteSpan(all).subspan(fixed.size()));
  if (!m) return std::unexpected(m.error());
  if (fixed.size() + *m < *len) {
    return fail(ErrorCode::kTruncated, name + ": sealed header truncated at byte " + std::to_string(fixed.size() + *m) +
                                           " of " + std::to_string(*len));
  }
  return finish_open(std::move(all), keys, name);
}

}  // namespace

// ---- streaming reader ---------------------------------------------------------------------------

// The caller's thread reads frames into slots and submits them; workers open them; next()
// hands out each chunk's plaintext in order, after its tag verified. Ciphertext and plaintext
// have separate buffers so that a failing chunk can still be diagnosed. One slot and no workers
// with one thread; `threads` slots with more (threads × 2 × chunk of memory).
struct SealReader::Impl {
  ByteSource* src = nullptr;
  std::string name;
  Opened opened;
  uint32_t chunk_size = 0;
  size_t slots = 1;
  std::vector<Bytes> frame;           // ciphertext ‖ tag
  std::vector<SecretBuffer> plain;
  std::vector<size_t> flen;
  std::vector<uint64_t> index;
  std::vector<char> last;
  std::vector<uint64_t> offset;       // of the frame in the source, for messages
  std::optional<std::byte> stash;     // one byte read ahead to learn whether the stream continues
  bool eof = false;
  bool final_read = false;
  bool failed = false;
  uint64_t read_count = 0;  // frames read and submitted
  uint64_t returned = 0;    // chunks handed out
  uint64_t consumed = 0;    // source bytes taken by frames
  uint64_t total = 0;
  ByteSpan ready;           // plaintext handed out by read()
  size_t ready_pos = 0;
  std::unique_ptr<detail::ChunkPipeline> pipeline;  // declared last: joined before the buffers go

  Result<size_t> fill(MutableByteSpan out) {
    size_t n = 0;
    if (stash && !out.empty()) {
      out[0] = *stash;
      stash.reset();
      n = 1;
    }
    while (n < out.size() && !eof) {
      auto r = src->read(out.subspan(n));
      if (!r) return std::unexpected(r.error());
      if (*r == 0) {
        eof = true;
        break;
      }
      n += *r;
    }
    return n;
  }

  Result<bool> at_end() {
    if (stash) return false;
    if (eof) return true;
    std::byte b;
    auto n = fill(MutableByteSpan(&b, 1));
    if (!n) return std::unexpected(n.error());
    if (*n == 0) return true;
    stash = b;
    return false;
  }

  Result<void> read_one() {
    const size_t s = static_cast<size_t>(read_count % slots);
    const size_t fs = frame_size(chunk_size);
    auto n = fill(frame[s]);
    if (!n) return std::unexpected(n.error());
    if (*n == 0) {
      // Only before the first chunk: after each frame the look-ahead byte says whether more follow.
      return fail(ErrorCode::kTruncated, name + ": the stream ends right after its header, with no chunks");
    }
    bool is_last = *n < fs;
    if (!is_last) {
      auto end = at_end();
      if (!end) return std::unexpected(end.error());
      is_last = *end;
    }
    if (read_count >= kMaxChunks) {
      return fail(ErrorCode::kMalformed, name + ": the stream has more than 2^32 chunks, the most version 1 allows");
    }
    flen[s] = *n;
    index[s] = read_count;
    last[s] = is_last ? 1 : 0;
    offset[s] = opened.header_bytes.size() + consumed;
    consumed += *n;
    pipeline->submit(s);
    ++read_count;
    final_read = is_last;
    return {};
  }

  Result<ByteSpan> next_chunk() {
    // The slot handed out by the previous call is free again: keep every slot busy.
    while (!final_read && read_count < returned + slots) TRESOR_TRY(read_one());
    if (returned == read_count) return ByteSpan{};  // the final chunk has been handed out
    const size_t s = static_cast<size_t>(returned % slots);
    if (auto r = pipeline->wait(s); !r) {
      pipeline->drain();
      if (r.error().code != ErrorCode::kAuth) return std::unexpected(r.error());
      const bool is_last = last[s] != 0;
      return std::unexpected(diagnose_chunk(pipeline->caller_cipher(), opened.header, ByteSpan(frame[s]).first(flen[s]),
                                            index[s], is_last, !is_last, index[s] + 65536, name, offset[s]));
    }
    if (last[s] && flen[s] == kTagSize && index[s] > 0) {
      pipeline->drain();
      secure_wipe(plain[s].span());
      return fail(ErrorCode::kMalformed, name + ": chunk " + std::to_string(index[s]) +
                                             " is an empty final chunk, which version 1 writers never produce");
    }
    ++returned;
    total += flen[s] - kTagSize;
    return plain[s].span().first(flen[s] - kTagSize);
  }
};

SealReader::SealReader(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
SealReader::SealReader(SealReader&&) noexcept = default;
SealReader& SealReader::operator=(SealReader&&) noexcept = default;
SealReader::~SealReader() = default;

Result<SealReader> SealReader::open(ByteSource& source, const KeyRing& keys, const OpenOptions& options) {
  auto opened = read_header_stream(source, keys, options.name);
  if (!opened) return std::unexpected(opened.error());
  auto impl = std::make_unique<Impl>();
  Impl& r = *impl;
  r.src = &source;
  r.name = options.name;
  r.chunk_size = opened->header.chunk_size;
  const unsigned threads = ThreadPool::resolve(options.threads);
  const unsigned workers = threads == 1 ? 0 : threads;
  r.slots = threads;
  for (size_t k = 0; k < r.slots; ++k) {
    r.frame.emplace_back(frame_size(r.chunk_size));
    r.plain.emplace_back(r.chunk_size);
  }
  r.flen.assign(r.slots, 0);
  r.index.assign(r.slots, 0);
  r.last.assign(r.slots, 0);
  r.offset.assign(r.slots, 0);
  auto ciphers = make_ciphers(opened->payload_key.span(), workers + 1);
  if (!ciphers) return std::unexpected(ciphers.error());
  r.opened = std::move(*opened);
  r.pipeline = std::make_unique<detail::ChunkPipeline>(
      std::move(*ciphers), workers, r.slots, [&r](size_t s, crypto::AesGcm& c) -> Result<void> {
        if (r.flen[s] < kTagSize) return fail(ErrorCode::kAuth, "frame shorter than its tag");
        return c.open(chunk_nonce(r.opened.header.nonce_prefix, r.index[s], r.last[s] != 0), {},
                      ByteSpan(r.frame[s]).first(r.flen[s]), r.plain[s].span().first(r.flen[s] - kTagSize));
      });
  return SealReader(std::move(impl));
}

const Header& SealReader::header() const { return impl_->opened.header; }
uint64_t SealReader::plaintext_bytes() const { return impl_->total; }

Result<ByteSpan> SealReader::next() {
  Impl& s = *impl_;
  if (s.failed) return fail(ErrorCode::kInvalidArgument, s.name + ": read after a failure");
  auto r = s.next_chunk();
  if (!r) s.failed = true;
  return r;
}

Result<size_t> SealReader::read(MutableByteSpan out) {
  Impl& s = *impl_;
  while (s.ready_pos == s.ready.size()) {
    auto b = next();
    if (!b) return std::unexpected(b.error());
    s.ready = *b;
    s.ready_pos = 0;
    if (b->empty()) return 0;
  }
  const size_t n = std::min(out.size(), s.ready.size() - s.ready_pos);
  std::memcpy(out.data(), s.ready.data() + s.ready_pos, n);
  s.ready_pos += n;
  return n;
}

// ---- random access ------------------------------------------------------------------------------

struct RandomAccessReader::Impl {
  const RandomAccessSource* src = nullptr;
  std::string name;
  Opened opened;
  SecretBuffer payload_key;
  unsigned threads = 1;
  std::unique_ptr<ThreadPool> pool;
  uint64_t chunks = 0;
  uint64_t plaintext = 0;
  size_t last_frame = 0;
  mutable std::mutex pool_mu;  // ThreadPool runs one loop at a time

  uint64_t offset(uint64_t i) const { return opened.header_bytes.size() + i * frame_size(opened.header.chunk_size); }
  size_t frame_len(uint64_t i) const { return i + 1 == chunks ? last_frame : frame_size(opened.header.chunk_size); }

  // Decrypts chunk i with a context of its own (callers may run on several threads).
  Result<void> decrypt(uint64_t i, MutableByteSpan out, Bytes& frame) const {
    if (i >= chunks) {
      return fail(ErrorCode::kInvalidArgument, name + ": chunk " + std::to_string(i) + " does not exist (the stream has " +
                                                   std::to_string(chunks) + ")");
    }
    frame.resize(frame_len(i));
    TRESOR_TRY(src->read_at(offset(i), frame));
    auto aes = crypto::AesGcm::create(payload_key.span());
    if (!aes) return std::unexpected(aes.error());
    const bool last = i + 1 == chunks;
    auto r = aes->open(chunk_nonce(opened.header.nonce_prefix, i, last), {}, frame, out.first(frame.size() - kTagSize));
    if (!r) {
      if (r.error().code != ErrorCode::kAuth) return r;
      return std::unexpected(diagnose_chunk(*aes, opened.header, frame, i, last, !last, chunks, name, offset(i)));
    }
    if (last && frame.size() == kTagSize && i > 0) {
      return fail(ErrorCode::kMalformed, name + ": chunk " + std::to_string(i) +
                                             " is an empty final chunk, which version 1 writers never produce");
    }
    return {};
  }

  // Runs fn over chunk indices [first, last] in parallel, giving each task its own frame and
  // plaintext buffers; returns the error of the lowest failing index.
  Result<void> for_chunks(uint64_t first, uint64_t last,
                          const std::function<Result<void>(uint64_t, Bytes&, SecretBuffer&)>& fn) const {
    const uint64_t n = last - first + 1;
    const size_t batch = static_cast<size_t>(std::min<uint64_t>(n, uint64_t{threads} * 2));
    std::vector<Bytes> frames(batch);
    std::vector<SecretBuffer> plains;
    for (size_t k = 0; k < batch; ++k) plains.emplace_back(opened.header.chunk_size);
    std::lock_guard lock(pool_mu);
    for (uint64_t start = 0; start < n; start += batch) {
      const size_t count = static_cast<size_t>(std::min<uint64_t>(batch, n - start));
      std::vector<std::optional<Error>> errors(count);
      pool->parallel_for(count, [&](size_t k) {
        auto r = fn(first + start + k, frames[k], plains[k]);
        if (!r) errors[k] = r.error();
      });
      for (auto& e : errors) {
        if (e) return std::unexpected(*e);
      }
    }
    return {};
  }
};

RandomAccessReader::RandomAccessReader(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
RandomAccessReader::RandomAccessReader(RandomAccessReader&&) noexcept = default;
RandomAccessReader& RandomAccessReader::operator=(RandomAccessReader&&) noexcept = default;
RandomAccessReader::~RandomAccessReader() = default;

Result<RandomAccessReader> RandomAccessReader::open(const RandomAccessSource& source, const KeyRing& keys,
                                                    const OpenOptions& options) {
  const std::string& name = options.name;
  auto size = source.size();
  if (!size) return std::unexpected(size.error());
  Bytes fixed(static_cast<size_t>(std::min<uint64_t>(*size, kFixedHeaderSize)));
  TRESOR_TRY(source.read_at(0, fixed));
  if (fixed.empty()) return fail(ErrorCode::kTruncated, name + ": empty input, not a sealed file");
  auto len = header_length(fixed);
  if (!len) return fail(len.error().code, name + ": " + len.error().message);
  if (*size < *len) {
    return fail(ErrorCode::kTruncated, name + ": sealed header truncated at byte " + std::to_string(*size) + " of " +
                                           std::to_string(*len));
  }
  Bytes header_bytes(*len);
  TRESOR_TRY(source.read_at(0, header_bytes));
  auto opened = finish_open(std::move(header_bytes), keys, name);
  if (!opened) return std::unexpected(opened.error());

  auto impl = std::make_unique<Impl>();
  impl->src = &source;
  impl->name = name;
  const uint64_t hlen = *len;
  auto shape = shape_of(*size - hlen, opened->header.chunk_size, name, [&](uint64_t i) {
    Bytes frame(frame_size(opened->header.chunk_size));
    auto aes = crypto::AesGcm::create(opened->payload_key.span());
    return aes && source.read_at(hlen + i * frame.size(), frame) &&
           authenticates_as_final(*aes, opened->header, frame, i);
  });
  if (!shape) return std::unexpected(shape.error());
  impl->chunks = shape->chunks;
  impl->last_frame = shape->last_frame;
  impl->plaintext = shape->plaintext;
  impl->payload_key = std::move(opened->payload_key);
  impl->opened = std::move(*opened);
  impl->threads = ThreadPool::resolve(options.threads);
  impl->pool = std::make_unique<ThreadPool>(impl->threads);
  return RandomAccessReader(std::move(impl));
}

const Header& RandomAccessReader::header() const { return impl_->opened.header; }
uint64_t RandomAccessReader::chunk_count() const { return impl_->chunks; }
uint64_t RandomAccessReader::plaintext_size() const { return impl_->plaintext; }
uint64_t RandomAccessReader::chunk_offset(uint64_t i) const { return impl_->offset(i); }
size_t RandomAccessReader::chunk_plaintext_size(uint64_t i) const {
  return i < impl_->chunks ? impl_->frame_len(i) - kTagSize : 0;
}

Result<size_t> RandomAccessReader::read_chunk(uint64_t i, MutableByteSpan out) const {
  const size_t want = chunk_plaintext_size(i);
  if (i < impl_->chunks && out.size() < want) {
    return fail(ErrorCode::kInvalidArgument, "output buffer of " + std::to_string(out.size()) + " bytes is smaller than chunk " +
                                                 std::to_string(i) + " (" + std::to_string(want) + " bytes)");
  }
  Bytes frame;
  TRESOR_TRY(impl_->decrypt(i, out, frame));
  return want;
}

Result<void> RandomAccessReader::read_range(uint64_t offset, MutableByteSpan out) const {
  if (out.empty()) return {};
  if (offset > impl_->plaintext || out.size() > impl_->plaintext - offset) {
    return fail(ErrorCode::kInvalidArgument, impl_->name + ": range " + std::to_string(offset) + "+" +
                                                 std::to_string(out.size()) + " is past the plaintext size " +
                                                 std::to_string(impl_->plaintext));
  }
  const uint64_t cs = impl_->opened.header.chunk_size;
  const uint64_t first = offset / cs;
  const uint64_t last = (offset + out.size() - 1) / cs;
  auto r = impl_->for_chunks(first, last, [&](uint64_t i, Bytes& frame, SecretBuffer& plain) -> Result<void> {
    TRESOR_TRY(impl_->decrypt(i, plain.span(), frame));
    const uint64_t chunk_start = i * cs;
    const uint64_t from = std::max(offset, chunk_start);
    const uint64_t to = std::min<uint64_t>(offset + out.size(), chunk_start + (frame.size() - kTagSize));
    std::memcpy(out.data() + (from - offset), plain.data() + (from - chunk_start), to - from);
    return {};
  });
  if (!r) secure_wipe(out);
  return r;
}

Result<void> RandomAccessReader::verify_all() const {
  return impl_->for_chunks(0, impl_->chunks - 1, [&](uint64_t i, Bytes& frame, SecretBuffer& plain) -> Result<void> {
    auto r = impl_->decrypt(i, plain.span(), frame);
    secure_wipe(plain.span());
    return r;
  });
}

// ---- conveniences -------------------------------------------------------------------------------

Result<uint64_t> seal_stream(ByteSource& in, ByteSink& out, const SealOptions& options) {
  auto w = SealWriter::create(options, out);
  if (!w) return std::unexpected(w.error());
  TRESOR_TRY(w->write_from(in));
  TRESOR_TRY(w->finish());
  return w->plaintext_bytes();
}

Result<uint64_t> open_stream(ByteSource& in, ByteSink& out, const KeyRing& keys, const OpenOptions& options) {
  auto r = SealReader::open(in, keys, options);
  if (!r) return std::unexpected(r.error());
  for (;;) {
    auto b = r->next();
    if (!b) return std::unexpected(b.error());
    if (b->empty()) break;
    TRESOR_TRY(out.write(*b));
  }
  return r->plaintext_bytes();
}

namespace {

// Splits [0, n) into `parts` contiguous runs and runs fn(run, begin, end) on the pool.
void for_runs(ThreadPool& pool, uint64_t n, unsigned parts, const std::function<void(unsigned, uint64_t, uint64_t)>& fn) {
  const uint64_t per = (n + parts - 1) / parts;
  pool.parallel_for(parts, [&](size_t k) {
    const uint64_t begin = std::min<uint64_t>(n, k * per);
    const uint64_t end = std::min<uint64_t>(n, begin + per);
    if (begin < end) fn(static_cast<unsigned>(k), begin, end);
  });
}

}  // namespace

Result<uint64_t> sealed_size(uint64_t plaintext_size, const SealOptions& options) {
  TRESOR_TRY(check_seal_options(options));
  Header h;
  for (size_t i = 0; i < options.recipients.size(); ++i) h.stanzas.emplace_back(X25519Stanza{});
  for (const auto* d : options.datasets) h.stanzas.emplace_back(DatasetStanza{d->id, {}, {}});
  const uint64_t chunks = plaintext_size == 0 ? 1 : (plaintext_size + options.chunk_size - 1) / options.chunk_size;
  if (chunks > kMaxChunks) return fail(ErrorCode::kInvalidArgument, "stream exceeds 2^32 chunks; use a larger chunk size");
  return h.size() + plaintext_size + chunks * kTagSize;
}

namespace {

// Where the parallel paths take their input and put their output, at byte offsets. The buffer
// versions hand out spans of the caller's memory (no copy, no scratch); the file versions
// pread/pwrite through per-worker scratch buffers.
struct ChunkIo {
  bool needs_scratch = false;
  std::function<Result<void>(uint64_t total)> prepare;  // the output's final size, once known
  std::function<Result<ByteSpan>(uint64_t offset, size_t len, MutableByteSpan scratch)> read;
  std::function<MutableByteSpan(uint64_t offset, size_t len, MutableByteSpan scratch)> target;
  std::function<Result<void>(uint64_t offset, ByteSpan written)> commit;
  std::function<void()> discard;  // after a failure: remove every output byte
};

// Per-worker scratch, allocated only when the I/O needs it. The plaintext half wipes itself.
struct Scratch {
  SecretBuffer plain;
  Bytes frame;
};

std::vector<Scratch> make_scratch(const ChunkIo& io, unsigned parts, uint32_t chunk_size) {
  std::vector<Scratch> v(parts);
  if (io.needs_scratch) {
    for (auto& s : v) {
      s.plain = SecretBuffer(chunk_size);
      s.frame.resize(frame_size(chunk_size));
    }
  }
  return v;
}

// Reports progress from worker 0 only: its run is as long as any other.
void note_progress(const std::function<void(uint64_t)>& progress, unsigned worker, uint64_t done_in_run,
                   unsigned parts) {
  if (progress && worker == 0) progress(done_in_run * parts);
}

Result<uint64_t> seal_with(uint64_t plaintext_size, ChunkIo& io, const SealOptions& options) {
  auto total = sealed_size(plaintext_size, options);
  if (!total) return std::unexpected(total.error());
  TRESOR_TRY(io.prepare(*total));
  auto nh = make_header(options);
  if (!nh) return std::unexpected(nh.error());
  {
    Bytes hs(io.needs_scratch ? nh->bytes.size() : 0);
    MutableByteSpan dst = io.target(0, nh->bytes.size(), hs);
    std::memcpy(dst.data(), nh->bytes.data(), nh->bytes.size());
    TRESOR_TRY(io.commit(0, dst));
  }
  auto keys = derive_stream_keys(nh->file_key.span(), nh->header.nonce_prefix);
  if (!keys) return std::unexpected(keys.error());
  const uint32_t cs = options.chunk_size;
  const uint64_t chunks = plaintext_size == 0 ? 1 : (plaintext_size + cs - 1) / cs;
  const unsigned parts = static_cast<unsigned>(std::min<uint64_t>(ThreadPool::resolve(options.threads), chunks));
  auto ciphers = make_ciphers(keys->payload_key.span(), parts);
  if (!ciphers) return std::unexpected(ciphers.error());
  auto scratch = make_scratch(io, parts, cs);
  ThreadPool pool(parts);
  std::vector<std::optional<Error>> errors(parts);
  const uint64_t hlen = nh->bytes.size();
  for_runs(pool, chunks, parts, [&](unsigned k, uint64_t begin, uint64_t end) {
    for (uint64_t i = begin; i < end; ++i) {
      const size_t len = static_cast<size_t>(std::min<uint64_t>(cs, plaintext_size - i * cs));
      const uint64_t at = hlen + i * frame_size(cs);
      auto in = io.read(i * cs, len, scratch[k].plain.span());
      if (!in) {
        errors[k] = in.error();
        return;
      }
      MutableByteSpan dst = io.target(at, len + kTagSize, scratch[k].frame);
      auto r = (*ciphers)[k].seal(chunk_nonce(nh->header.nonce_prefix, i, i + 1 == chunks), {}, *in, dst);
      if (r) r = io.commit(at, dst);
      if (!r) {
        errors[k] = r.error();
        return;
      }
      note_progress(options.progress, k, (i - begin + 1) * cs, parts);
    }
  });
  for (auto& e : errors) {
    if (e) return std::unexpected(*e);
  }
  return *total;
}

Result<uint64_t> open_with(uint64_t sealed_size_bytes, ChunkIo& io, const KeyRing& keys, const OpenOptions& options) {
  const std::string& name = options.name;
  if (sealed_size_bytes == 0) return fail(ErrorCode::kTruncated, name + ": empty input, not a sealed file");
  Bytes fixed(static_cast<size_t>(std::min<uint64_t>(sealed_size_bytes, kFixedHeaderSize)));
  auto fixed_in = io.read(0, fixed.size(), fixed);
  if (!fixed_in) return std::unexpected(fixed_in.error());
  auto len = header_length(*fixed_in);
  if (!len) return fail(len.error().code, name + ": " + len.error().message);
  if (sealed_size_bytes < *len) {
    return fail(ErrorCode::kTruncated, name + ": sealed header truncated at byte " + std::to_string(sealed_size_bytes) +
                                           " of " + std::to_string(*len));
  }
  Bytes header_bytes(*len);
  auto header_in = io.read(0, *len, header_bytes);
  if (!header_in) return std::unexpected(header_in.error());
  auto opened = finish_open(Bytes(header_in->begin(), header_in->end()), keys, name);
  if (!opened) return std::unexpected(opened.error());
  const Header& h = opened->header;
  auto shape = shape_of(sealed_size_bytes - *len, h.chunk_size, name, [&](uint64_t i) {
    Bytes frame(frame_size(h.chunk_size));
    auto aes = crypto::AesGcm::create(opened->payload_key.span());
    auto in = io.read(*len + i * frame.size(), frame.size(), frame);
    return aes && in && authenticates_as_final(*aes, h, *in, i);
  });
  if (!shape) return std::unexpected(shape.error());
  TRESOR_TRY(io.prepare(shape->plaintext));
  const unsigned parts = static_cast<unsigned>(std::min<uint64_t>(ThreadPool::resolve(options.threads), shape->chunks));
  auto ciphers = make_ciphers(opened->payload_key.span(), parts);
  if (!ciphers) return std::unexpected(ciphers.error());
  auto scratch = make_scratch(io, parts, h.chunk_size);
  ThreadPool pool(parts);
  const uint32_t cs = h.chunk_size;
  auto frame_at = [&](uint64_t i) { return *len + i * frame_size(cs); };
  auto frame_len = [&](uint64_t i) { return i + 1 == shape->chunks ? shape->last_frame : frame_size(cs); };
  // Lowest failing chunk per run; an authentication failure has no Error of its own here.
  std::vector<uint64_t> first_bad(parts, UINT64_MAX);
  std::vector<std::optional<Error>> errors(parts);
  for_runs(pool, shape->chunks, parts, [&](unsigned k, uint64_t begin, uint64_t end) {
    for (uint64_t i = begin; i < end; ++i) {
      auto in = io.read(frame_at(i), frame_len(i), scratch[k].frame);
      Result<void> r;
      MutableByteSpan dst;
      if (!in) {
        r = std::unexpected(in.error());
      } else {
        dst = io.target(i * cs, frame_len(i) - kTagSize, scratch[k].plain.span());
        r = (*ciphers)[k].open(chunk_nonce(h.nonce_prefix, i, i + 1 == shape->chunks), {}, *in, dst);
        if (r) r = io.commit(i * cs, dst);
      }
      if (!r) {
        first_bad[k] = i;
        if (r.error().code != ErrorCode::kAuth) errors[k] = r.error();
        return;
      }
      note_progress(options.progress, k, (i - begin + 1) * frame_size(cs), parts);
    }
  });
  const auto worst = std::min_element(first_bad.begin(), first_bad.end());
  if (*worst != UINT64_MAX) {
    io.discard();
    const auto k = static_cast<size_t>(worst - first_bad.begin());
    if (errors[k]) return std::unexpected(*errors[k]);
    const uint64_t i = *worst;
    const bool last = i + 1 == shape->chunks;
    Bytes frame(frame_len(i));
    auto in = io.read(frame_at(i), frame.size(), frame);
    if (!in) return std::unexpected(in.error());
    return std::unexpected(diagnose_chunk((*ciphers)[0], h, *in, i, last, !last, shape->chunks, name, frame_at(i)));
  }
  if (shape->chunks > 1 && shape->last_frame == kTagSize) {
    io.discard();
    return fail(ErrorCode::kMalformed, name + ": chunk " + std::to_string(shape->chunks - 1) +
                                           " is an empty final chunk, which version 1 writers never produce");
  }
  return shape->plaintext;
}

ChunkIo buffer_io(ByteSpan in, MutableByteSpan out, const std::string& what) {
  ChunkIo io;
  io.prepare = [out, what](uint64_t total) -> Result<void> {
    if (out.size() < total) {
      return fail(ErrorCode::kInvalidArgument, what + "output buffer is " + std::to_string(out.size()) +
                                                   " bytes, it needs " + std::to_string(total));
    }
    return {};
  };
  io.read = [in](uint64_t offset, size_t len, MutableByteSpan) -> Result<ByteSpan> {
    return in.subspan(static_cast<size_t>(offset), len);
  };
  io.target = [out](uint64_t offset, size_t len, MutableByteSpan) { return out.subspan(static_cast<size_t>(offset), len); };
  io.commit = [](uint64_t, ByteSpan) -> Result<void> { return {}; };
  io.discard = [out] { secure_wipe(out); };
  return io;
}

ChunkIo file_io(const RandomAccessSource& in, const RandomAccessSink& out) {
  ChunkIo io;
  io.needs_scratch = true;
  io.prepare = [&out](uint64_t total) { return out.resize(total); };
  io.read = [&in](uint64_t offset, size_t len, MutableByteSpan scratch) -> Result<ByteSpan> {
    TRESOR_TRY(in.read_at(offset, scratch.first(len)));
    return ByteSpan(scratch.first(len));
  };
  io.target = [](uint64_t, size_t len, MutableByteSpan scratch) { return scratch.first(len); };
  io.commit = [&out](uint64_t offset, ByteSpan written) { return out.write_at(offset, written); };
  io.discard = [&out] { (void)out.resize(0); };
  return io;
}

}  // namespace

Result<size_t> seal_parallel(ByteSpan plaintext, MutableByteSpan out, const SealOptions& options) {
  ChunkIo io = buffer_io(plaintext, out, "sealing: ");
  auto n = seal_with(plaintext.size(), io, options);
  if (!n) return std::unexpected(n.error());
  return static_cast<size_t>(*n);
}

Result<size_t> open_parallel(ByteSpan sealed_bytes, MutableByteSpan out, const KeyRing& keys, const OpenOptions& options) {
  ChunkIo io = buffer_io(sealed_bytes, out, options.name + ": ");
  auto n = open_with(sealed_bytes.size(), io, keys, options);
  if (!n) return std::unexpected(n.error());
  return static_cast<size_t>(*n);
}

Result<uint64_t> seal_parallel(const RandomAccessSource& in, const RandomAccessSink& out, const SealOptions& options) {
  auto size = in.size();
  if (!size) return std::unexpected(size.error());
  ChunkIo io = file_io(in, out);
  return seal_with(*size, io, options);
}

Result<uint64_t> open_parallel(const RandomAccessSource& in, const RandomAccessSink& out, const KeyRing& keys,
                               const OpenOptions& options) {
  auto size = in.size();
  if (!size) return std::unexpected(size.error());
  ChunkIo io = file_io(in, out);
  return open_with(*size, io, keys, options);
}

Result<Bytes> seal_buffer(ByteSpan plaintext, const SealOptions& options) {
  auto total = sealed_size(plaintext.size(), options);
  if (!total) return std::unexpected(total.error());
  Bytes out(static_cast<size_t>(*total));
  auto n = seal_parallel(plaintext, out, options);
  if (!n) return std::unexpected(n.error());
  return out;
}

Result<SecretBuffer> open_buffer(ByteSpan sealed_bytes, const KeyRing& keys, const OpenOptions& options) {
  // The plaintext is never larger than the sealed bytes; size the buffer from the header later.
  SecretBuffer out(sealed_bytes.size());
  auto n = open_parallel(sealed_bytes, out.span(), keys, options);
  if (!n) return std::unexpected(n.error());
  SecretBuffer exact = SecretBuffer::copy_of(out.span().first(*n));
  return exact;
}

}  // namespace tresor::sealed
