// Sealed format v1: the streaming writer and reader (docs/formats.md §5), with bounded memory
// through byte sources and sinks.
#include <algorithm>
#include <cstring>
#include <optional>
#include <string>

#include "chunk_pipeline.h"
#include "sealed_internal.h"
#include "tresor/thread_pool.h"

namespace tresor::sealed {

using detail::diagnose_chunk;
using detail::frame_size;
using detail::make_ciphers;
using detail::Opened;
using detail::read_header_stream;

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

}  // namespace tresor::sealed
