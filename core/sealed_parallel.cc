// Sealed format v1: the parallel path — every worker seals or opens its own contiguous run of
// chunks, buffer to buffer or between a seekable source and a random-access sink.
#include <algorithm>
#include <cstring>
#include <functional>
#include <optional>
#include <string>

#include "sealed_internal.h"
#include "tresor/thread_pool.h"

namespace tresor::sealed {

using detail::authenticates_as_final;
using detail::diagnose_chunk;
using detail::finish_open;
using detail::frame_size;
using detail::make_ciphers;
using detail::shape_of;
using detail::header_size;

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
  const uint64_t chunks = plaintext_size == 0 ? 1 : (plaintext_size + options.chunk_size - 1) / options.chunk_size;
  if (chunks > kMaxChunks) return fail(ErrorCode::kInvalidArgument, "stream exceeds 2^32 chunks; use a larger chunk size");
  return header_size(options) + plaintext_size + chunks * kTagSize;
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
