// The host side of the GPU AES-256-GCM (include/tresor/gpu/aesgcm.h): the per-key data the
// kernel needs, the run geometry, the CPU emulation of the kernel (kernels/aesgcm.cuh, every
// thread of every CUDA block in turn), and the wrappers around the CUDA launch.
#include "tresor/gpu/aesgcm.h"

#include <openssl/crypto.h>

#include <cstring>
#include <string>
#include <vector>

#include "aesgcm.cuh"
#include "cuda_result.h"
#include "tresor/crypto.h"
#include "tresor/sealed.h"

namespace tresor::gpu {
namespace {

using tresor::gpu::detail::cuda;
using tresor::gpu::detail::kNoCuda;

using aesgcm::Gf;
using aesgcm::KeyData;

// GF(2^8) arithmetic of AES (FIPS 197 §4.2), for the S-box and the T-table.
uint8_t xtime(uint8_t b) { return static_cast<uint8_t>((b << 1) ^ ((b & 0x80) != 0 ? 0x1b : 0)); }
uint8_t gmul(uint8_t a, uint8_t b) {
  uint8_t r = 0;
  for (; b != 0; b >>= 1, a = xtime(a)) {
    if ((b & 1) != 0) r ^= a;
  }
  return r;
}
// S-box (FIPS 197 §5.1.1): the multiplicative inverse, then the affine transformation.
uint8_t sbox(uint8_t x) {
  uint8_t inv = 0;
  if (x != 0) {
    inv = 1;
    for (int i = 0; i < 254; ++i) inv = gmul(inv, x);  // x^254 = x^-1
  }
  auto rotl = [](uint8_t v, int n) { return static_cast<uint8_t>((v << n) | (v >> (8 - n))); };
  return static_cast<uint8_t>(inv ^ rotl(inv, 1) ^ rotl(inv, 2) ^ rotl(inv, 3) ^ rotl(inv, 4) ^ 0x63);
}

struct Tables {
  uint8_t s[256];
  uint32_t te0[256];  // (2·S, S, S, 3·S), big-endian: MixColumns' first column times S[x]
  Tables() {
    for (int x = 0; x < 256; ++x) {
      s[x] = sbox(static_cast<uint8_t>(x));
      const uint8_t s2 = xtime(s[x]);
      te0[x] = uint32_t{s2} << 24 | uint32_t{s[x]} << 16 | uint32_t{s[x]} << 8 | uint32_t{static_cast<uint8_t>(s2 ^ s[x])};
    }
  }
};
const Tables& tables() {
  static const Tables t;
  return t;
}

// AES-256 key expansion (FIPS 197 §5.2, Nk = 8, Nr = 14).
void expand_key(std::span<const std::byte, 32> key, uint32_t rk[aesgcm::kRoundKeyWords]) {
  const auto& t = tables();
  // The key schedule runs on the host with real keys: SubWord reads every S-box entry and keeps
  // the wanted one by mask, so no memory access depends on the key.
  auto sub_byte = [&](uint32_t x) {
    uint32_t r = 0;
    for (uint32_t i = 0; i < 256; ++i) {
      const uint32_t mask = 0u - (((i ^ x) - 1u) >> 31);  // all ones when i == x (x < 256), else 0
      r |= t.s[i] & mask;
    }
    return r;
  };
  auto sub_word = [&](uint32_t w) {
    return sub_byte(w >> 24) << 24 | sub_byte((w >> 16) & 0xff) << 16 | sub_byte((w >> 8) & 0xff) << 8 | sub_byte(w & 0xff);
  };
  for (int i = 0; i < 8; ++i) rk[i] = aesgcm::load_be32(reinterpret_cast<const uint8_t*>(key.data()) + 4 * i);
  uint8_t rcon = 1;
  for (int i = 8; i < aesgcm::kRoundKeyWords; ++i) {
    uint32_t temp = rk[i - 1];
    if (i % 8 == 0) {
      temp = sub_word((temp << 8) | (temp >> 24)) ^ (uint32_t{rcon} << 24);
      rcon = xtime(rcon);
    } else if (i % 8 == 4) {
      temp = sub_word(temp);
    }
    rk[i] = rk[i - 8] ^ temp;
  }
}

// Shared memory of one emulated CUDA block.
struct Block {
  std::vector<uint32_t> smem = std::vector<uint32_t>(aesgcm::kSmemWords);
  ~Block() { OPENSSL_cleanse(smem.data(), smem.size() * sizeof(uint32_t)); }
};

Error malformed(const std::string& m) { return Error{ErrorCode::kMalformed, "chunk run: " + m}; }

Error auth_failed(const ChunkRun& run, uint64_t first_failed, uint64_t failed, uint64_t chunks) {
  return Error{ErrorCode::kChunkAuth, "chunk " + std::to_string(run.first_index + first_failed) + " fails authentication (" + std::to_string(failed) +
                                          " of " + std::to_string(chunks) +
                                          " chunks of the run failed): altered, or from another stream or position; nothing was released"};
}

// The run's shape from the input: frames when opening, plaintext when sealing.
Result<RunShape> shape_of(const ChunkRun& run, uint64_t in_bytes, bool seal) {
  if (!seal) return run_shape(run, in_bytes);
  auto f = frames_size(run, in_bytes);
  if (!f) return std::unexpected(f.error());
  return run_shape(run, *f);
}

Result<void> check_output(const RunShape& shape, uint64_t out_bytes, bool seal) {
  const uint64_t want = seal ? shape.chunks * 16 + shape.plaintext_bytes : shape.plaintext_bytes;
  if (out_bytes != want) {
    return fail(ErrorCode::kInvalidArgument, "chunk run: the output is " + std::to_string(out_bytes) + " bytes, want " + std::to_string(want));
  }
  return {};
}

Result<void> emulate(const ChunkKey& key, const ChunkRun& run, ByteSpan in, MutableByteSpan out, bool seal) {
  auto shape = shape_of(run, in.size(), seal);
  if (!shape) return std::unexpected(shape.error());
  TRESOR_TRY(check_output(*shape, out.size(), seal));
  std::vector<std::byte> failed(shape->chunks);
  run_chunks_emulated(key.data(), run, shape->chunks, shape->plaintext_bytes - (shape->chunks - 1) * run.chunk_size, seal, in.data(),
                      out.data(), failed.data());
  uint64_t n_failed = 0, first_failed = 0;
  for (uint64_t i = 0; i < failed.size(); ++i) {
    if (failed[i] != std::byte{0} && n_failed++ == 0) first_failed = i;
  }
  if (n_failed > 0) {
    OPENSSL_cleanse(out.data(), out.size());
    return std::unexpected(auth_failed(run, first_failed, n_failed, shape->chunks));
  }
  return {};
}

}  // namespace

void ChunkKey::Wipe::operator()(aesgcm::KeyData* p) const {
  OPENSSL_cleanse(p, sizeof *p);
  delete p;
}
ChunkKey::ChunkKey(ChunkKey&&) noexcept = default;
ChunkKey& ChunkKey::operator=(ChunkKey&&) noexcept = default;
ChunkKey::~ChunkKey() = default;

ByteSpan ChunkKey::bytes() const { return ByteSpan(reinterpret_cast<const std::byte*>(data_.get()), sizeof(KeyData)); }

Result<ChunkKey> ChunkKey::derive(std::span<const std::byte, 32> payload_key) {
  std::unique_ptr<KeyData, Wipe> kd(new KeyData{});
  expand_key(payload_key, kd->rk);
  std::memcpy(kd->te0, tables().te0, sizeof kd->te0);
  for (unsigned b = 0; b < 16; ++b) kd->r4[b] = aesgcm::reduce4(b);
  // H = AES(K, 0^128) with OpenSSL's constant-time AES (the T-table code indexes memory by
  // secret bytes; fine on the GPU's bank-replicated tables, not on a CPU's caches).
  std::array<std::byte, 16> hb{};
  {
    auto aes = crypto::AesGcm::create(payload_key);
    if (!aes) return std::unexpected(aes.error());
    if (auto e = aes->encrypt_blocks(hb); !e) return std::unexpected(e.error());
  }
  Gf h = aesgcm::gf_load(reinterpret_cast<const uint8_t*>(hb.data()));
  OPENSSL_cleanse(hb.data(), hb.size());
  Gf p = h;
  for (int e = 1; e <= aesgcm::kThreads + 1; ++e) {
    aesgcm::gf_store(kd->h_pow + 16 * (e - 1), p);
    p = aesgcm::gf_mul(p, h);
  }
  aesgcm::Table4 t4{};
  aesgcm::table4_build(aesgcm::gf_load(kd->h_pow + 16 * (aesgcm::kThreads - 1)), t4);  // H^T
  for (int b = 0; b < 16; ++b) aesgcm::gf_store(kd->m4_ht + 16 * b, t4.m[b]);
  OPENSSL_cleanse(&t4, sizeof t4);
  OPENSSL_cleanse(&h, sizeof h);
  OPENSSL_cleanse(&p, sizeof p);
  return ChunkKey(std::move(kd));
}

Result<ChunkKey> ChunkKey::for_stream(ByteSpan file_key, const std::array<std::byte, 7>& nonce_prefix) {
  auto keys = sealed::derive_stream_keys(file_key, nonce_prefix);
  if (!keys) return std::unexpected(keys.error());
  std::array<std::byte, 32> kp{};
  std::memcpy(kp.data(), keys->payload_key.span().data(), kp.size());
  auto key = derive(kp);
  OPENSSL_cleanse(kp.data(), kp.size());
  return key;
}

Result<RunShape> run_shape(const ChunkRun& run, uint64_t frames_bytes) {
  if (run.chunk_size < 16 || run.chunk_size > (64u << 20) || run.chunk_size % 16 != 0) {
    return std::unexpected(malformed("chunk size " + std::to_string(run.chunk_size) + " is not a multiple of 16 in 16..67108864"));
  }
  if (frames_bytes == 0) return std::unexpected(malformed("no frames"));
  const uint64_t frame = uint64_t{run.chunk_size} + 16;
  RunShape s;
  s.chunks = (frames_bytes + frame - 1) / frame;
  const uint64_t last = frames_bytes - (s.chunks - 1) * frame;
  if (last < 16) return std::unexpected(malformed("the last frame is " + std::to_string(last) + " bytes, shorter than its 16-byte tag"));
  if (last < frame && !run.ends_with_final) {
    return std::unexpected(malformed("a short last frame (" + std::to_string(last) + " bytes) in a run that does not end the stream"));
  }
  if (last == 16 && !(run.ends_with_final && run.first_index == 0 && s.chunks == 1)) {
    return std::unexpected(malformed("an empty chunk that is not the whole of an empty stream"));
  }
  if (uint64_t{run.first_index} + s.chunks - 1 > 0xffffffffull) return std::unexpected(malformed("chunk indices past 2^32"));
  s.plaintext_bytes = (s.chunks - 1) * run.chunk_size + (last - 16);
  return s;
}

Result<uint64_t> frames_size(const ChunkRun& run, uint64_t plaintext_bytes) {
  if (run.chunk_size < 16 || run.chunk_size > (64u << 20) || run.chunk_size % 16 != 0) {
    return std::unexpected(malformed("chunk size " + std::to_string(run.chunk_size) + " is not a multiple of 16 in 16..67108864"));
  }
  const uint64_t chunks = plaintext_bytes == 0 ? 1 : (plaintext_bytes + run.chunk_size - 1) / run.chunk_size;
  const uint64_t size = plaintext_bytes + 16 * chunks;
  auto shape = run_shape(run, size);  // the same rules (a non-final run must be whole chunks)
  if (!shape) return std::unexpected(shape.error());
  return size;
}

void run_chunks_emulated(const KeyData& kd, const ChunkRun& run, uint64_t chunks, uint64_t last_len, bool seal, const std::byte* in,
                         std::byte* out, std::byte* failed) {
  Block block;
  const uint64_t c = run.chunk_size;
  for (uint64_t i = 0; i < chunks; ++i) {
    // The kernel's mapping of blockIdx.x = i (kernels/aesgcm.cu).
    const bool last = i + 1 == chunks;
    aesgcm::ChunkArgs a{};
    a.in = reinterpret_cast<const uint8_t*>(in) + i * (seal ? c : c + 16);
    a.out = reinterpret_cast<uint8_t*>(out) + i * (seal ? c + 16 : c);
    a.len = last ? last_len : c;
    std::memcpy(a.nonce, run.nonce_prefix.data(), 7);
    aesgcm::store_be32(a.nonce + 7, static_cast<uint32_t>(run.first_index + i));
    a.nonce[11] = last && run.ends_with_final ? 1 : 0;
    a.seal = seal;
    for (int tid = 0; tid < aesgcm::kThreads; ++tid) aesgcm::phase0_fill(block.smem.data(), kd, tid);
    Gf shares{};
    for (int tid = 0; tid < aesgcm::kThreads; ++tid) shares = aesgcm::gf_xor(shares, aesgcm::phase1_thread(block.smem.data(), kd, a, tid));
    const bool ok = aesgcm::phase2_tag(block.smem.data(), kd, a, shares);
    failed[i] = ok ? std::byte{0} : std::byte{1};
    if (!ok) {
      for (int tid = 0; tid < aesgcm::kThreads; ++tid) aesgcm::phase3_zero(a, tid);
    }
    for (int tid = 0; tid < aesgcm::kThreads; ++tid) aesgcm::phase4_wipe(block.smem.data(), tid);
  }
}

Result<void> open_chunks_emulated(const ChunkKey& key, const ChunkRun& run, ByteSpan frames, MutableByteSpan out) {
  return emulate(key, run, frames, out, false);
}
Result<void> seal_chunks_emulated(const ChunkKey& key, const ChunkRun& run, ByteSpan plaintext, MutableByteSpan frames) {
  return emulate(key, run, plaintext, frames, true);
}

#ifdef TRESOR_HAVE_CUDA
namespace {
// Device memory that is wiped and freed on every path.
struct DevMem {
  void* p = nullptr;
  size_t n = 0;
  ~DevMem() { (void)detail::cuda_free_wiped(p, n); }
};

Result<void> run_cuda(int device, const ChunkKey& key, const ChunkRun& run, ByteSpan in, MutableByteSpan out, bool seal) {
  auto shape = shape_of(run, in.size(), seal);
  if (!shape) return std::unexpected(shape.error());
  TRESOR_TRY(check_output(*shape, out.size(), seal));
  detail::CurrentDevice current;  // before the buffers: they are freed on this device
  TRESOR_TRY(cuda(current.select(device)));
  DevMem kd{nullptr, key.bytes().size()}, d_in{nullptr, in.size()}, d_out{nullptr, out.size()}, d_failed{nullptr, shape->chunks};
  for (DevMem* m : {&kd, &d_in, &d_out, &d_failed}) TRESOR_TRY(cuda(detail::cuda_alloc(&m->p, m->n)));
  TRESOR_TRY(cuda(detail::cuda_fill(d_failed.p, 1, d_failed.n)));  // a chunk never verified counts as failed
  TRESOR_TRY(cuda(detail::cuda_copy(kd.p, key.bytes().data(), kd.n, detail::kHostToDevice)));
  TRESOR_TRY(cuda(detail::cuda_copy(d_in.p, in.data(), in.size(), detail::kHostToDevice)));
  detail::AesGcmRun r;
  std::memcpy(r.prefix, run.nonce_prefix.data(), 7);
  r.final_flag = run.ends_with_final ? 1 : 0;
  r.chunk_size = run.chunk_size;
  r.first_index = run.first_index;
  r.chunks = shape->chunks;
  r.last_len = shape->plaintext_bytes - (shape->chunks - 1) * run.chunk_size;
  r.seal = seal ? 1 : 0;
  TRESOR_TRY(cuda(detail::aesgcm_enqueue(nullptr, kd.p, r, static_cast<const uint8_t*>(d_in.p), static_cast<uint8_t*>(d_out.p),
                                         static_cast<uint8_t*>(d_failed.p))));
  TRESOR_TRY(cuda(detail::cuda_stream_sync(nullptr)));
  std::vector<uint8_t> failed(shape->chunks, 0);
  TRESOR_TRY(cuda(detail::cuda_copy(failed.data(), d_failed.p, failed.size(), detail::kDeviceToHost)));
  uint64_t n_failed = 0, first_failed = 0;
  for (uint64_t i = 0; i < failed.size(); ++i) {
    if (failed[i] != 0 && n_failed++ == 0) first_failed = i;
  }
  if (n_failed > 0) {
    OPENSSL_cleanse(out.data(), out.size());
    return std::unexpected(auth_failed(run, first_failed, n_failed, shape->chunks));
  }
  return cuda(detail::cuda_copy(out.data(), d_out.p, out.size(), detail::kDeviceToHost));
}
}  // namespace

Result<void> open_chunks_cuda(int device, const ChunkKey& key, const ChunkRun& run, ByteSpan frames, MutableByteSpan out) {
  return run_cuda(device, key, run, frames, out, false);
}
Result<void> seal_chunks_cuda(int device, const ChunkKey& key, const ChunkRun& run, ByteSpan plaintext, MutableByteSpan frames) {
  return run_cuda(device, key, run, plaintext, frames, true);
}
#else
Result<void> open_chunks_cuda(int, const ChunkKey&, const ChunkRun&, ByteSpan, MutableByteSpan) {
  return fail(ErrorCode::kUnavailable, kNoCuda);
}
Result<void> seal_chunks_cuda(int, const ChunkKey&, const ChunkRun&, ByteSpan, MutableByteSpan) {
  return fail(ErrorCode::kUnavailable, kNoCuda);
}
#endif

}  // namespace tresor::gpu
