// Sealed format v1: random access to the chunks and byte ranges of a seekable source.
#include <algorithm>
#include <cstring>
#include <functional>
#include <mutex>
#include <optional>
#include <string>

#include "sealed_internal.h"
#include "tresor/thread_pool.h"

namespace tresor::sealed {

using detail::authenticates_as_final;
using detail::diagnose_chunk;
using detail::frame_size;
using detail::Opened;
using detail::shape_of;

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

Result<UnlockedHeader> read_header(const RandomAccessSource& source, const KeyRing& keys, const std::string& name) {
  auto size = source.size();
  if (!size) return std::unexpected(size.error());
  Bytes fixed(static_cast<size_t>(std::min<uint64_t>(*size, kFixedHeaderSize)));
  TRESOR_TRY(source.read_at(0, fixed));
  if (fixed.empty()) return fail(ErrorCode::kTruncated, name + ": empty input, not a sealed file");
  auto len = header_length(fixed);
  if (!len) return fail(len.error().code, name + ": " + len.error().message);
  if (*size < *len) {
    return fail(ErrorCode::kTruncated, name + ": sealed header truncated at byte " + std::to_string(*size) + " of " + std::to_string(*len));
  }
  Bytes bytes(*len);
  TRESOR_TRY(source.read_at(0, bytes));
  auto h = parse_header(bytes);
  if (!h) return fail(h.error().code, name + ": " + h.error().message);
  auto file_key = unlock(*h, bytes, keys, name);
  if (!file_key) return std::unexpected(file_key.error());
  return UnlockedHeader{std::move(*h), std::move(bytes), std::move(*file_key)};
}

Result<RandomAccessReader> RandomAccessReader::open(const RandomAccessSource& source, const KeyRing& keys,
                                                    const OpenOptions& options) {
  const std::string& name = options.name;
  auto size = source.size();
  if (!size) return std::unexpected(size.error());
  auto unlocked = read_header(source, keys, name);
  if (!unlocked) return std::unexpected(unlocked.error());
  auto sk = derive_stream_keys(unlocked->file_key.span(), unlocked->header.nonce_prefix);
  if (!sk) return std::unexpected(sk.error());
  Opened opened{std::move(unlocked->header), std::move(unlocked->bytes), std::move(sk->payload_key)};
  const uint64_t hlen = opened.header_bytes.size();

  auto impl = std::make_unique<Impl>();
  impl->src = &source;
  impl->name = name;
  auto shape = shape_of(*size - hlen, opened.header.chunk_size, name, [&](uint64_t i) {
    Bytes frame(frame_size(opened.header.chunk_size));
    auto aes = crypto::AesGcm::create(opened.payload_key.span());
    return aes && source.read_at(hlen + i * frame.size(), frame) &&
           authenticates_as_final(*aes, opened.header, frame, i);
  });
  if (!shape) return std::unexpected(shape.error());
  impl->chunks = shape->chunks;
  impl->last_frame = shape->last_frame;
  impl->plaintext = shape->plaintext;
  impl->payload_key = std::move(opened.payload_key);
  impl->opened = std::move(opened);
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

}  // namespace tresor::sealed
