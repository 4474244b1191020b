// AES-256-GCM for sealed-format chunks (docs/formats.md §5), written once for both the CUDA
// kernel (kernels/aesgcm.cu) and its CPU emulation (kernels/aesgcm_ref.cc), which runs exactly
// this code thread by thread and is checked against OpenSSL on every test run. Plain C++20, no
// library beyond <cstdint>: nvcc compiles it as device code, g++ as host code.
//
// The algorithm (NIST SP 800-38D; AES: FIPS 197):
//  - AES-256 with the 32-bit "T-table" formulation (FIPS 197 §5.1 folded into one table Te0 and
//    its byte rotations), the final round's S-box read out of Te0. The key schedule (§5.2) is
//    expanded once per file key on the host.
//  - Counter mode: chunk nonce N (12 bytes, formats.md §5.1), J0 = N ‖ be32(1), the keystream of
//    16-byte block i is AES(N ‖ be32(i + 2)) (inc32, SP 800-38D §6.2, §7.1).
//  - GHASH (SP 800-38D §6.4) over the ciphertext with empty AAD: S = Σ_{i<m} C_i·H^{m−i+1} ⊕
//    L·H, L = be64(0) ‖ be64(8·|C|), tag = S ⊕ AES(J0). The m blocks are dealt round-robin to
//    the kThreads threads of one CUDA block (thread t takes t, t+T, t+2T, …: coalesced 16-byte
//    loads). Each thread runs Horner with H^T, z = Σ_r C_{i_r}·(H^T)^{n−1−r}, then multiplies
//    by H^{m+1−i_last} (a power from the per-key table, exponent 2..T+1); the per-thread
//    values are XORed together (a tree reduction) and L·H added once.
//
// Shared memory is laid out against bank conflicts: every table whose index depends on secret
// data (the AES state; the GHASH accumulator) is replicated once per bank, so lane l of a warp
// always reads bank l whatever the index — no conflicts, hence no timing that depends on the
// index (the classic cache-timing leak of T-table AES, which on a GPU would be bank-conflict
// timing). GHASH uses 4-bit tables (Shoup's method) so that the replicated tables stay small.
// The CPU emulation uses the same layout and indexing, so it tests that too. It is a test
// reference, not constant time on a CPU: the CPU path for real data is OpenSSL.
#pragma once

#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "hd.h"

namespace tresor::gpu::aesgcm {

inline constexpr int kThreads = 256;      // threads per CUDA block: one block per chunk
inline constexpr int kLanes = 32;         // banks of shared memory, lanes of a warp
inline constexpr int kRounds = 14;        // AES-256
inline constexpr int kRoundKeyWords = 60; // 4 × (kRounds + 1)

// A GF(2^128) element in GCM's bit order, as two big-endian 64-bit halves: hi holds bytes 0..7
// (the MSB of byte 0 is the coefficient of x^0), lo bytes 8..15.
struct Gf {
  uint64_t hi = 0, lo = 0;
};

TRESOR_HD inline Gf gf_xor(Gf a, Gf b) { return Gf{a.hi ^ b.hi, a.lo ^ b.lo}; }

TRESOR_HD inline uint32_t load_be32(const uint8_t* p) {
  return (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) | (uint32_t{p[2]} << 8) | uint32_t{p[3]};
}
TRESOR_HD inline void store_be32(uint8_t* p, uint32_t v) {
  p[0] = static_cast<uint8_t>(v >> 24);
  p[1] = static_cast<uint8_t>(v >> 16);
  p[2] = static_cast<uint8_t>(v >> 8);
  p[3] = static_cast<uint8_t>(v);
}
TRESOR_HD inline Gf gf_load(const uint8_t* p) {
  return Gf{(uint64_t{load_be32(p)} << 32) | load_be32(p + 4), (uint64_t{load_be32(p + 8)} << 32) | load_be32(p + 12)};
}
TRESOR_HD inline void gf_store(uint8_t* p, Gf v) {
  store_be32(p, static_cast<uint32_t>(v.hi >> 32));
  store_be32(p + 4, static_cast<uint32_t>(v.hi));
  store_be32(p + 8, static_cast<uint32_t>(v.lo >> 32));
  store_be32(p + 12, static_cast<uint32_t>(v.lo));
}

// x·V: shift towards higher degree (right in this bit order); x^128 = x^7 + x^2 + x + 1 folds
// back as 0xE1 into the top byte (SP 800-38D §6.3, R = 11100001 ‖ 0^120). Constant time.
TRESOR_HD inline Gf gf_mulx(Gf v) {
  const uint64_t carry = 0 - (v.lo & 1);
  return Gf{(v.hi >> 1) ^ (carry & 0xE100000000000000ull), (v.lo >> 1) | (v.hi << 63)};
}

// X·Y bit by bit (SP 800-38D §6.3, Algorithm 1), constant time. For the per-key tables and the
// one product per thread that places its Horner sum.
TRESOR_HD inline Gf gf_mul(Gf x, Gf y) {
  Gf z{}, v = y;
  for (int i = 0; i < 128; ++i) {
    const uint64_t word = i < 64 ? x.hi : x.lo;
    const uint64_t bit = 0 - ((word >> (63 - (i & 63))) & 1);
    z.hi ^= v.hi & bit;
    z.lo ^= v.lo & bit;
    v = gf_mulx(v);
  }
  return z;
}

// Shoup's 4-bit tables for a fixed multiplier Y: M[b] = b·Y for the 4-bit value b placed at
// degrees 0..3 (b's bit 3 = x^0), and R[b] = the 16 bits that x^4·(b at degrees 124..127)
// folds into the top of hi. X·Y is then Horner over X's 32 nibbles from the last (highest
// degrees) to the first: Z = Z·x^4 ⊕ M[nibble].
struct Table4 {
  Gf m[16];
};
TRESOR_HD inline void table4_build(Gf y, Table4& t) {
  t.m[0] = Gf{};
  t.m[8] = y;                  // x^0
  t.m[4] = gf_mulx(t.m[8]);    // x^1
  t.m[2] = gf_mulx(t.m[4]);    // x^2
  t.m[1] = gf_mulx(t.m[2]);    // x^3
  for (int b = 2; b < 16; b <<= 1) {
    for (int j = 1; j < b; ++j) t.m[b + j] = gf_xor(t.m[b], t.m[j]);
  }
}
// R[b] for b = the low nibble of lo (degrees 124..127) shifted out by x^4.
TRESOR_HD inline uint16_t reduce4(unsigned b) {
  Gf v{0, b};
  for (int i = 0; i < 4; ++i) v = gf_mulx(v);
  return static_cast<uint16_t>(v.hi >> 48);
}

// ---- Shared-memory layout (per CUDA block; the CPU emulation allocates the same) -------------
// Word offsets into one uint32_t array. Replicated tables: entry e, word w, lane l at
// ((e·words_per_entry + w)·kLanes + l).
inline constexpr int kSmemTe0 = 0;                                  // 256 entries × 1 word × 32
inline constexpr int kSmemM4 = kSmemTe0 + 256 * kLanes;             // 16 entries × 4 words × 32: M for H^T
inline constexpr int kSmemR4 = kSmemM4 + 16 * 4 * kLanes;          // 16 entries × 1 word × 32
inline constexpr int kSmemReduce = kSmemR4 + 16 * kLanes;           // kThreads / kLanes partial sums × 4 words
inline constexpr int kSmemWords = kSmemReduce + (kThreads / kLanes) * 4 + 4;  // + the tag verdict
inline constexpr size_t kSmemBytes = kSmemWords * sizeof(uint32_t);

// The per-key data in device (or, emulated, host) memory, built once per file key on the host.
// Everything in it is secret but Te0; the channel wipes it when the key is done.
struct KeyData {
  uint32_t rk[kRoundKeyWords];  // AES-256 round keys, big-endian words (FIPS 197 §5.2)
  uint32_t te0[256];            // the T-table (not secret)
  uint8_t h_pow[(kThreads + 1) * 16];  // H^1 .. H^(T+1), H = AES(K, 0^128)
  uint8_t m4_ht[16 * 16];              // Table4 of H^T
  uint16_t r4[16];                     // reduce4(0..15) (not secret)
  uint8_t pad[32 - sizeof(uint16_t) * 16 % 32];
};

// One lane's view of the replicated tables.
struct Lane {
  const uint32_t* smem;
  int lane;
  TRESOR_HD uint32_t te(unsigned x) const { return smem[kSmemTe0 + static_cast<int>(x) * kLanes + lane]; }
  TRESOR_HD Gf m4(unsigned b) const {
    const uint32_t* e = smem + kSmemM4 + static_cast<int>(b) * 4 * kLanes + lane;
    return Gf{(uint64_t{e[0]} << 32) | e[kLanes], (uint64_t{e[2 * kLanes]} << 32) | e[3 * kLanes]};
  }
  TRESOR_HD uint16_t r4(unsigned b) const { return static_cast<uint16_t>(smem[kSmemR4 + static_cast<int>(b) * kLanes + lane]); }
};

TRESOR_HD inline uint32_t ror(uint32_t v, int n) { return (v >> n) | (v << (32 - n)); }

// One AES-256 block, in and out as four big-endian words.
TRESOR_HD inline void aes256_block(const Lane& t, const uint32_t* rk, const uint32_t in[4], uint32_t out[4]) {
  uint32_t s0 = in[0] ^ rk[0], s1 = in[1] ^ rk[1], s2 = in[2] ^ rk[2], s3 = in[3] ^ rk[3];
  for (int r = 1; r < kRounds; ++r) {
    const uint32_t* k = rk + 4 * r;
    const uint32_t t0 = t.te(s0 >> 24) ^ ror(t.te((s1 >> 16) & 0xff), 8) ^ ror(t.te((s2 >> 8) & 0xff), 16) ^ ror(t.te(s3 & 0xff), 24) ^ k[0];
    const uint32_t t1 = t.te(s1 >> 24) ^ ror(t.te((s2 >> 16) & 0xff), 8) ^ ror(t.te((s3 >> 8) & 0xff), 16) ^ ror(t.te(s0 & 0xff), 24) ^ k[1];
    const uint32_t t2 = t.te(s2 >> 24) ^ ror(t.te((s3 >> 16) & 0xff), 8) ^ ror(t.te((s0 >> 8) & 0xff), 16) ^ ror(t.te(s1 & 0xff), 24) ^ k[2];
    const uint32_t t3 = t.te(s3 >> 24) ^ ror(t.te((s0 >> 16) & 0xff), 8) ^ ror(t.te((s1 >> 8) & 0xff), 16) ^ ror(t.te(s2 & 0xff), 24) ^ k[3];
    s0 = t0;
    s1 = t1;
    s2 = t2;
    s3 = t3;
  }
  // Final round: SubBytes, ShiftRows, AddRoundKey; S[x] is byte 1 of Te0[x] = (2S, S, S, 3S).
  auto sb = [&](uint32_t x) { return (t.te(x) >> 8) & 0xff; };
  const uint32_t* k = rk + 4 * kRounds;
  out[0] = (sb(s0 >> 24) << 24 | sb((s1 >> 16) & 0xff) << 16 | sb((s2 >> 8) & 0xff) << 8 | sb(s3 & 0xff)) ^ k[0];
  out[1] = (sb(s1 >> 24) << 24 | sb((s2 >> 16) & 0xff) << 16 | sb((s3 >> 8) & 0xff) << 8 | sb(s0 & 0xff)) ^ k[1];
  out[2] = (sb(s2 >> 24) << 24 | sb((s3 >> 16) & 0xff) << 16 | sb((s0 >> 8) & 0xff) << 8 | sb(s1 & 0xff)) ^ k[2];
  out[3] = (sb(s3 >> 24) << 24 | sb((s0 >> 16) & 0xff) << 16 | sb((s1 >> 8) & 0xff) << 8 | sb(s2 & 0xff)) ^ k[3];
}

// Z·Y with Y's Table4 in the lane's replicated tables.
TRESOR_HD inline Gf gf_mul_table(const Lane& t, Gf x) {
  Gf z{};
  for (int i = 31; i >= 0; --i) {
    const uint64_t word = i < 16 ? x.hi : x.lo;
    const unsigned nib = static_cast<unsigned>(word >> (4 * (15 - (i & 15)))) & 0xf;
    // z·x^4: the nibble at degrees 124..127 falls off and folds back through R.
    const unsigned out = static_cast<unsigned>(z.lo & 0xf);
    z.lo = (z.lo >> 4) | (z.hi << 60);
    z.hi = (z.hi >> 4) ^ (uint64_t{t.r4(out)} << 48);
    z = gf_xor(z, t.m4(nib));
  }
  return z;
}

// ---- The chunk, phase by phase -----------------------------------------------------------------
// One CUDA block opens (or seals) one chunk. Phase 0 fills shared memory; phase 1 is each
// thread's share of counter mode and GHASH; phase 2 combines the shares into the tag (thread 0)
// and compares it; phase 3 zeroes the chunk's output if the tag did not verify; phase 4 wipes
// the block's secret shared memory. The kernel puts
// a barrier between phases; the emulation runs each phase for every thread in turn.

struct ChunkArgs {
  const uint8_t* in;      // the frame (open: ciphertext ‖ tag) or the plaintext (seal)
  uint8_t* out;           // the plaintext (open) or the frame (seal: ciphertext ‖ tag)
  uint64_t len;           // plaintext bytes of this chunk
  uint8_t nonce[12];      // prefix ‖ be32(index) ‖ final flag
  bool seal;
};

TRESOR_HD inline void phase0_fill(uint32_t* smem, const KeyData& kd, int tid) {
  for (int i = tid; i < 256 * kLanes; i += kThreads) smem[kSmemTe0 + i] = kd.te0[i / kLanes];
  for (int i = tid; i < 16 * 4 * kLanes; i += kThreads) {
    const int word = i / kLanes;  // entry·4 + w
    smem[kSmemM4 + i] = load_be32(kd.m4_ht + 4 * word);
  }
  for (int i = tid; i < 16 * kLanes; i += kThreads) smem[kSmemR4 + i] = kd.r4[i / kLanes];
}

// A 16-byte block in and out, held as a Gf (bytes 0..7 big-endian in hi, 8..15 in lo) so that
// it stays in registers: a byte array indexed in a loop would be placed in the thread's local
// memory, i.e. device memory outside every buffer the channel wipes, and every block of
// plaintext would pass through it. Bytes beyond n are zero. A whole, 16-aligned block (the
// channel's runs: they start at cudaMalloc'd addresses, and frames and chunks are multiples of
// 16) moves as four little-endian words — one vector access on the device, a memcpy in the
// emulation, so that the word path is tested on every machine; anything else byte by byte.
TRESOR_HD inline uint32_t bswap32(uint32_t v) { return (v >> 24) | ((v >> 8) & 0xff00u) | ((v << 8) & 0xff0000u) | (v << 24); }
static_assert(std::endian::native == std::endian::little, "the word path assumes little-endian words, as on the GPU");
TRESOR_HD inline bool whole_aligned(const uint8_t* p, uint64_t n) { return n == 16 && (reinterpret_cast<uintptr_t>(p) & 15) == 0; }
TRESOR_HD inline Gf load_block(const uint8_t* p, uint64_t n) {
  if (whole_aligned(p, n)) {
#if defined(__CUDA_ARCH__)
    const uint4 v = *reinterpret_cast<const uint4*>(p);
#else
    struct {
      uint32_t x, y, z, w;
    } v;
    std::memcpy(&v, p, 16);
#endif
    return Gf{(uint64_t{bswap32(v.x)} << 32) | bswap32(v.y), (uint64_t{bswap32(v.z)} << 32) | bswap32(v.w)};
  }
  Gf b{};
  for (uint64_t j = 0; j < n; ++j) {
    const uint64_t byte = p[j];
    if (j < 8) {
      b.hi |= byte << (56 - 8 * j);
    } else {
      b.lo |= byte << (120 - 8 * j);
    }
  }
  return b;
}
TRESOR_HD inline void store_block(uint8_t* p, Gf b, uint64_t n) {
  if (whole_aligned(p, n)) {
#if defined(__CUDA_ARCH__)
    uint4 v;
#else
    struct {
      uint32_t x, y, z, w;
    } v;
#endif
    v.x = bswap32(static_cast<uint32_t>(b.hi >> 32));
    v.y = bswap32(static_cast<uint32_t>(b.hi));
    v.z = bswap32(static_cast<uint32_t>(b.lo >> 32));
    v.w = bswap32(static_cast<uint32_t>(b.lo));
#if defined(__CUDA_ARCH__)
    *reinterpret_cast<uint4*>(p) = v;
#else
    std::memcpy(p, &v, 16);
#endif
    return;
  }
  for (uint64_t j = 0; j < n; ++j) p[j] = static_cast<uint8_t>(j < 8 ? b.hi >> (56 - 8 * j) : b.lo >> (120 - 8 * j));
}
// The first n (1..16) bytes of a block set, the rest clear.
TRESOR_HD inline Gf block_mask(uint64_t n) {
  const uint64_t all = ~uint64_t{0};
  return Gf{n >= 8 ? all : all << (64 - 8 * n), n >= 16 ? all : n <= 8 ? 0 : all << (128 - 8 * n)};
}

// Counter mode over this thread's blocks, and its GHASH share placed at its final power.
TRESOR_HD inline Gf phase1_thread(const uint32_t* smem, const KeyData& kd, const ChunkArgs& a, int tid) {
  const Lane t{smem, tid % kLanes};
  const uint64_t m = (a.len + 15) / 16;  // blocks (the last may be partial)
  uint32_t ctr[4] = {load_be32(a.nonce), load_be32(a.nonce + 4), load_be32(a.nonce + 8), 0};
  Gf z{};
  uint64_t last = 0;
  bool any = false;
  for (uint64_t i = static_cast<uint64_t>(tid); i < m; i += kThreads) {
    const uint64_t off = 16 * i;
    const uint64_t n = a.len - off < 16 ? a.len - off : 16;
    const Gf blk = load_block(a.in + off, n);
    ctr[3] = static_cast<uint32_t>(i + 2);
    uint32_t ks[4];
    aes256_block(t, kd.rk, ctr, ks);
    const Gf mask = block_mask(n);
    const Gf stream{((uint64_t{ks[0]} << 32) | ks[1]) & mask.hi, ((uint64_t{ks[2]} << 32) | ks[3]) & mask.lo};
    const Gf res = gf_xor(blk, stream);
    store_block(a.out + off, res, n);
    // GHASH runs over the ciphertext: the input when opening, the output when sealing (the
    // partial last block zero-padded: res and blk are zero beyond n).
    // Horner with Y = H^T, multiplying before adding: z = Σ_r C_{i_r}·H^{i_last − i_r}.
    z = gf_xor(gf_mul_table(t, z), a.seal ? res : blk);
    last = i;
    any = true;
  }
  if (!any) return Gf{};
  // Placed: ·H^{m+1−i_last} gives Σ_r C_{i_r}·H^{m−i_r+1}. i_last is the thread's largest index
  // below m, so m−T ≤ i_last ≤ m−1 and the exponent is 2..T+1.
  const uint64_t e = m + 1 - last;
  return gf_mul(z, gf_load(kd.h_pow + 16 * (e - 1)));
}

// The shares combined (XOR of every thread's phase-1 value) into the tag. Opening compares it
// with the stored tag in constant time (every byte, no early exit) and returns whether it
// matched; sealing writes it after the ciphertext and returns true.
TRESOR_HD inline bool phase2_tag(const uint32_t* smem, const KeyData& kd, const ChunkArgs& a, Gf shares) {
  const Lane t{smem, 0};
  const Gf h = gf_load(kd.h_pow);
  const Gf s = gf_xor(shares, gf_mul(Gf{0, 8 * a.len}, h));  // ⊕ L·H, L = be64(0) ‖ be64(8·len)
  uint32_t j0[4] = {load_be32(a.nonce), load_be32(a.nonce + 4), load_be32(a.nonce + 8), 1};
  uint32_t ej0[4];
  aes256_block(t, kd.rk, j0, ej0);
  uint8_t tag[16];
  gf_store(tag, s);
  for (int w = 0; w < 4; ++w) {
    tag[4 * w] ^= static_cast<uint8_t>(ej0[w] >> 24);
    tag[4 * w + 1] ^= static_cast<uint8_t>(ej0[w] >> 16);
    tag[4 * w + 2] ^= static_cast<uint8_t>(ej0[w] >> 8);
    tag[4 * w + 3] ^= static_cast<uint8_t>(ej0[w]);
  }
  if (a.seal) {
    for (int j = 0; j < 16; ++j) a.out[a.len + static_cast<uint64_t>(j)] = tag[j];
    return true;
  }
  uint8_t diff = 0;
  for (int j = 0; j < 16; ++j) diff = static_cast<uint8_t>(diff | (tag[j] ^ a.in[a.len + static_cast<uint64_t>(j)]));
  return diff == 0;
}

// A chunk whose tag failed: this thread's share of the output zeroed.
TRESOR_HD inline void phase3_zero(const ChunkArgs& a, int tid) {
  for (uint64_t i = static_cast<uint64_t>(tid) * 16; i < a.len; i += 16 * kThreads) {
    const uint64_t n = a.len - i < 16 ? a.len - i : 16;
    for (uint64_t j = 0; j < n; ++j) a.out[i + j] = 0;
  }
}

// The block's secret shared memory (the GHASH tables, the partial sums, the verdict) zeroed
// before the block ends; Te0 is public.
TRESOR_HD inline void phase4_wipe(uint32_t* smem, int tid) {
  for (int i = kSmemM4 + tid; i < kSmemWords; i += kThreads) smem[i] = 0;
}

}  // namespace tresor::gpu::aesgcm
