// The GPU AES-256-GCM (kernels/aesgcm.cuh): its CPU emulation — the kernel's own code run thread
// by thread — against FIPS 197, NIST's GCM vectors and the project's OpenSSL sealed format, bit
// for bit, on every run; the CUDA kernel against the same where a device exists (skipped with the
// reason elsewhere; scripts/gpu-check requires it).
#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "aesgcm.cuh"
#include "support/cavp.h"
#include "support/test_support.h"
#include "tresor/crypto.h"
#include "tresor/gpu.h"
#include "tresor/gpu/aesgcm.h"
#include "tresor/gpu/channel.h"
#include "tresor/identity.h"
#include "tresor/sealed.h"

namespace tresor {
namespace {

namespace ag = gpu::aesgcm;
using gpu::ChunkKey;
using gpu::ChunkRun;

Bytes random_bytes(size_t n, uint32_t seed) {
  std::mt19937 g(seed);
  Bytes b(n);
  for (auto& x : b) x = static_cast<std::byte>(g() & 0xff);
  return b;
}

std::array<std::byte, 32> key_of(ByteSpan b) {
  std::array<std::byte, 32> k{};
  std::memcpy(k.data(), b.data(), 32);
  return k;
}

// One AES-GCM encryption (empty AAD, 96-bit IV) through the kernel's phases, as the emulation
// runs them: for NIST's vectors, whose IVs are arbitrary (a chunk run builds its own nonces).
Bytes gcm_by_phases(const ChunkKey& key, ByteSpan iv, ByteSpan in, bool seal, bool* tag_ok) {
  Bytes out(seal ? in.size() + 16 : in.size() - 16);
  std::vector<uint32_t> smem(ag::kSmemWords);
  ag::ChunkArgs a{};
  a.in = reinterpret_cast<const uint8_t*>(in.data());
  a.out = reinterpret_cast<uint8_t*>(out.data());
  a.len = seal ? in.size() : in.size() - 16;
  std::memcpy(a.nonce, iv.data(), 12);
  a.seal = seal;
  for (int t = 0; t < ag::kThreads; ++t) ag::phase0_fill(smem.data(), key.data(), t);
  ag::Gf shares{};
  for (int t = 0; t < ag::kThreads; ++t) shares = ag::gf_xor(shares, ag::phase1_thread(smem.data(), key.data(), a, t));
  *tag_ok = ag::phase2_tag(smem.data(), key.data(), a, shares);
  return out;
}

TEST(GpuAesGcm, AesBlockMatchesFips197AndGhashTablesMatchTheBitwiseProduct) {
  // FIPS 197 Appendix C.3 (AES-256): key 00..1f, plaintext 00112233…eeff.
  Bytes key(32);
  for (size_t i = 0; i < 32; ++i) key[i] = static_cast<std::byte>(i);
  auto ck = ChunkKey::derive(key_of(key));
  ASSERT_TRUE(ck);
  std::vector<uint32_t> smem(ag::kSmemWords);
  for (int t = 0; t < ag::kThreads; ++t) ag::phase0_fill(smem.data(), ck->data(), t);
  const uint32_t in[4] = {0x00112233, 0x44556677, 0x8899aabb, 0xccddeeff};
  for (int lane : {0, 7, 31}) {  // every lane reads its own copy of the table
    uint32_t out[4];
    ag::aes256_block(ag::Lane{smem.data(), lane}, ck->data().rk, in, out);
    EXPECT_EQ(out[0], 0x8ea2b7cau);
    EXPECT_EQ(out[1], 0x516745bfu);
    EXPECT_EQ(out[2], 0xeafc4990u);
    EXPECT_EQ(out[3], 0x4b496089u);
  }
  // The 4-bit table product (by H^256, the table the kernel holds) equals the bitwise one.
  const ag::Gf ht = ag::gf_load(ck->data().h_pow + 16 * (ag::kThreads - 1));
  std::mt19937_64 g(7);
  for (int i = 0; i < 200; ++i) {
    const ag::Gf x{g(), g()};
    const ag::Lane lane{smem.data(), i % ag::kLanes};
    const ag::Gf a = ag::gf_mul_table(lane, x), b = ag::gf_mul(x, ht);
    ASSERT_EQ(a.hi, b.hi) << i;
    ASSERT_EQ(a.lo, b.lo) << i;
  }
  // Powers: H^(e+1) = H^e · H.
  const ag::Gf h = ag::gf_load(ck->data().h_pow);
  const ag::Gf h2 = ag::gf_load(ck->data().h_pow + 16), h257 = ag::gf_load(ck->data().h_pow + 16 * 256);
  EXPECT_EQ(ag::gf_mul(h, h).hi, h2.hi);
  const ag::Gf h256 = ag::gf_load(ck->data().h_pow + 16 * 255);
  EXPECT_EQ(ag::gf_mul(h256, h).lo, h257.lo);
}

TEST(GpuAesGcm, NistVectorsWithoutAad) {
  const auto enc = testing::load_cavp("nist/gcmEncryptExtIV256.subset.rsp", testing::CavpKind::kEncrypt);
  ASSERT_TRUE(enc.found) << "missing " << testing::testdata("nist/gcmEncryptExtIV256.subset.rsp");
  ASSERT_TRUE(enc.errors.empty());
  size_t used = 0;
  for (const auto& v : enc.vectors) {
    if (!v.field("AAD").empty()) continue;  // chunks have no associated data
    SCOPED_TRACE(v.where);
    auto ck = ChunkKey::derive(key_of(v.field("Key")));
    ASSERT_TRUE(ck);
    bool ok = false;
    const Bytes sealed = gcm_by_phases(*ck, v.field("IV"), v.field("PT"), true, &ok);
    Bytes want = v.field("CT");
    want.insert(want.end(), v.field("Tag").begin(), v.field("Tag").end());
    EXPECT_EQ(to_hex(sealed), to_hex(want));
    const Bytes opened = gcm_by_phases(*ck, v.field("IV"), want, false, &ok);
    EXPECT_TRUE(ok);
    EXPECT_EQ(to_hex(opened), to_hex(v.field("PT")));
    // A flipped tag bit does not verify.
    want.back() ^= std::byte{1};
    (void)gcm_by_phases(*ck, v.field("IV"), want, false, &ok);
    EXPECT_FALSE(ok);
    ++used;
  }
  // (The decrypt subset's vectors all carry AAD: the OpenSSL tests use them.)
  EXPECT_EQ(used, 5u) << "the encrypt subset has five vectors without AAD (PTlen 0, 104 and 128)";
}

// A sealed file made by the OpenSSL path, opened chunk by chunk by the emulated kernel; and the
// emulated kernel sealing chunks behind a real header, opened by the OpenSSL path.
struct Sealed {
  Identity alice = *Identity::generate();
  Bytes file;
  sealed::Header header;
  size_t header_len = 0;
  std::array<std::byte, 32> kp{};
};
Sealed seal_with_openssl(ByteSpan plaintext, uint32_t chunk) {
  Sealed s;
  sealed::SealOptions o;
  o.chunk_size = chunk;
  o.recipients = {s.alice.recipient()};
  s.file = *sealed::seal_buffer(plaintext, o);
  s.header = *sealed::parse_header(s.file);
  s.header_len = s.header.size();
  sealed::KeyRing ring;
  ring.identities = {&s.alice};
  auto k = sealed::unlock(s.header, ByteSpan(s.file).first(s.header_len), ring, "test");
  auto keys = sealed::derive_stream_keys(k->span(), s.header.nonce_prefix);
  std::memcpy(s.kp.data(), keys->payload_key.span().data(), 32);
  return s;
}

TEST(GpuAesGcm, EmulatedKernelOpensAndSealsTheSealedFormatBitExactly) {
  struct Case {
    size_t size;
    uint32_t chunk;
  };
  const uint32_t c = 4096;
  const std::vector<Case> cases = {{0, c},          {1, c},           {15, c},      {16, c},     {17, c},
                                   {c - 1, c},      {c, c},           {c + 1, c},   {5 * c + 7, c}, {16 * 300 + 5, 16 * 300},
                                   {70000, 16},     {100000, 65536},  {1 << 20, 1 << 20}};
  uint32_t seed = 1;
  for (const auto& k : cases) {
    SCOPED_TRACE("size " + std::to_string(k.size) + ", chunk " + std::to_string(k.chunk));
    const Bytes plain = random_bytes(k.size, seed++);
    Sealed s = seal_with_openssl(plain, k.chunk);
    auto ck = ChunkKey::derive(s.kp);
    ASSERT_TRUE(ck);
    const ChunkRun run = gpu::whole_stream(s.header);  // chunk size k.chunk, from the header
    const ByteSpan frames = ByteSpan(s.file).subspan(s.header_len);
    Bytes out(k.size);
    auto opened = gpu::open_chunks_emulated(*ck, run, frames, out);
    ASSERT_TRUE(opened) << opened.error().message;
    EXPECT_TRUE(out == plain);
    // Sealing with the kernel behind the same header reproduces OpenSSL's frames exactly.
    Bytes resealed(frames.size());
    auto sealed = gpu::seal_chunks_emulated(*ck, run, plain, resealed);
    ASSERT_TRUE(sealed) << sealed.error().message;
    EXPECT_TRUE(std::equal(resealed.begin(), resealed.end(), frames.begin(), frames.end()));
  }
  // Both ways a block moves: whole 16-aligned blocks as words, anything else byte by byte. The
  // same frames and plaintext at aligned and unaligned addresses, in and out.
  {
    const Bytes plain = random_bytes(5 * c + 7, 77);
    Sealed s = seal_with_openssl(plain, c);
    auto ck = ChunkKey::derive(s.kp);
    ASSERT_TRUE(ck);
    const ChunkRun run = gpu::whole_stream(s.header);
    const ByteSpan frames = ByteSpan(s.file).subspan(s.header_len);
    for (size_t in_at : {size_t{0}, size_t{1}}) {
      for (size_t out_at : {size_t{0}, size_t{3}}) {
        SCOPED_TRACE("input at +" + std::to_string(in_at) + ", output at +" + std::to_string(out_at));
        Bytes in_buf(frames.size() + 16), out_buf(plain.size() + 16);
        ASSERT_EQ(reinterpret_cast<uintptr_t>(in_buf.data()) % 16, 0u);
        ASSERT_EQ(reinterpret_cast<uintptr_t>(out_buf.data()) % 16, 0u);
        std::copy(frames.begin(), frames.end(), in_buf.begin() + static_cast<std::ptrdiff_t>(in_at));
        const MutableByteSpan f(in_buf.data() + in_at, frames.size()), p(out_buf.data() + out_at, plain.size());
        ASSERT_TRUE(gpu::open_chunks_emulated(*ck, run, f, p));
        EXPECT_TRUE(std::equal(p.begin(), p.end(), plain.begin(), plain.end()));
        std::fill(f.begin(), f.end(), std::byte{0});
        ASSERT_TRUE(gpu::seal_chunks_emulated(*ck, run, p, f));
        EXPECT_TRUE(std::equal(f.begin(), f.end(), frames.begin(), frames.end()));
      }
    }
  }
  // A middle run of whole chunks (random access): chunks 2..4 of 7, not final.
  const Bytes plain = random_bytes(7 * c - 100, 99);
  Sealed s = seal_with_openssl(plain, c);
  auto ck = ChunkKey::derive(s.kp);
  ChunkRun mid;
  mid.nonce_prefix = s.header.nonce_prefix;
  mid.chunk_size = c;
  mid.first_index = 2;
  Bytes out(3 * c);
  ASSERT_TRUE(gpu::open_chunks_emulated(*ck, mid, ByteSpan(s.file).subspan(s.header_len + 2 * (c + 16), 3 * (c + 16)), out));
  EXPECT_TRUE(std::equal(out.begin(), out.end(), plain.begin() + 2 * c));
  // The same frames claimed to end the stream (final flag) do not verify.
  mid.ends_with_final = true;
  EXPECT_FALSE(gpu::open_chunks_emulated(*ck, mid, ByteSpan(s.file).subspan(s.header_len + 2 * (c + 16), 3 * (c + 16)), out));
}

TEST(GpuAesGcm, TamperingFailsNamingTheChunkAndZeroesEverything) {
  const uint32_t c = 1024;
  const Bytes plain = random_bytes(6 * c + 300, 5);
  Sealed s = seal_with_openssl(plain, c);
  auto ck = ChunkKey::derive(s.kp);
  const ChunkRun run = gpu::whole_stream(s.header);  // chunk size c, from the header
  const Bytes frames(s.file.begin() + static_cast<ptrdiff_t>(s.header_len), s.file.end());
  const size_t f = c + 16;
  struct Case {
    std::string what;
    std::function<void(Bytes&)> change;
    std::string error;
  };
  const std::vector<Case> cases = {
      {"a ciphertext bit of chunk 3", [&](Bytes& b) { b[3 * f + 100] ^= std::byte{0x04}; }, "chunk 3 fails authentication (1 of 7"},
      {"a tag byte of chunk 0", [&](Bytes& b) { b[f - 1] ^= std::byte{0x80}; }, "chunk 0 fails authentication (1 of 7"},
      {"chunks 1 and 2 swapped", [&](Bytes& b) { std::swap_ranges(b.begin() + f, b.begin() + 2 * f, b.begin() + 2 * f); },
       "chunk 1 fails authentication (2 of 7"},
      {"the final chunk's last byte", [&](Bytes& b) { b.back() ^= std::byte{1}; }, "chunk 6 fails authentication (1 of 7"},
  };
  for (const auto& k : cases) {
    SCOPED_TRACE(k.what);
    Bytes bad = frames;
    k.change(bad);
    Bytes out(plain.size(), std::byte{0x55});
    auto r = gpu::open_chunks_emulated(*ck, run, bad, out);
    ASSERT_FALSE(r);
    EXPECT_EQ(r.error().code, ErrorCode::kChunkAuth);
    EXPECT_NE(r.error().message.find(k.error), std::string::npos) << r.error().message;
    EXPECT_TRUE(std::all_of(out.begin(), out.end(), [](std::byte b) { return b == std::byte{0}; })) << "nothing released";
  }
  // Truncated at a frame boundary: the new last chunk is not the final one.
  Bytes out(5 * c);
  auto cut = gpu::open_chunks_emulated(*ck, run, ByteSpan(frames).first(5 * f), out);
  ASSERT_FALSE(cut);
  EXPECT_NE(cut.error().message.find("chunk 4 fails authentication"), std::string::npos) << cut.error().message;
  // Another file's payload key.
  Sealed other = seal_with_openssl(plain, c);
  auto wrong = ChunkKey::derive(other.kp);
  Bytes out2(plain.size());
  EXPECT_FALSE(gpu::open_chunks_emulated(*wrong, run, frames, out2));
}

TEST(GpuAesGcm, BadRunsAreRefusedNamingWhatIsWrong) {
  auto ck = ChunkKey::derive(key_of(random_bytes(32, 3)));
  ChunkRun run;
  run.chunk_size = 1000;  // not a multiple of 16
  EXPECT_NE(gpu::run_shape(run, 2032).error().message.find("not a multiple of 16"), std::string::npos);
  run.chunk_size = 1024;
  EXPECT_NE(gpu::run_shape(run, 0).error().message.find("no frames"), std::string::npos);
  EXPECT_NE(gpu::run_shape(run, 1040 + 10).error().message.find("shorter than its 16-byte tag"), std::string::npos);
  EXPECT_NE(gpu::run_shape(run, 1040 + 500).error().message.find("does not end the stream"), std::string::npos);
  run.ends_with_final = true;
  EXPECT_NE(gpu::run_shape(run, 1040 + 16).error().message.find("an empty chunk"), std::string::npos);
  run.first_index = 0xffffffffu;
  EXPECT_NE(gpu::run_shape(run, 2 * 1040).error().message.find("past 2^32"), std::string::npos);
  run.first_index = 0;
  auto shape = gpu::run_shape(run, 2 * 1040 + 116);
  ASSERT_TRUE(shape);
  EXPECT_EQ(shape->chunks, 3u);
  EXPECT_EQ(shape->plaintext_bytes, 2u * 1024 + 100);
  EXPECT_EQ(*gpu::frames_size(run, 2 * 1024 + 100), 2u * 1040 + 116);
  Bytes small(10);
  auto wrong_out = gpu::open_chunks_emulated(*ck, run, Bytes(2 * 1040 + 116), small);
  ASSERT_FALSE(wrong_out);
  EXPECT_NE(wrong_out.error().message.find("the output is 10 bytes, want 2148"), std::string::npos) << wrong_out.error().message;
}

// ---- On a CUDA device ------------------------------------------------------------------------


TEST(GpuAesGcmDevice, KernelMatchesOpenSslOnRandomSizesAndFailsTamperedChunks) {
  auto devs = gpu::gpu_probe();
  TRESOR_SKIP_WITHOUT_GPU(devs);
  uint32_t seed = 100;
  for (const auto& [size, chunk] : std::vector<std::pair<size_t, uint32_t>>{{0, 4096},
                                                                            {1, 4096},
                                                                            {15, 4096},
                                                                            {16, 4096},
                                                                            {17, 4096},
                                                                            {4095, 4096},
                                                                            {4097, 4096},
                                                                            {(64u << 20) + 12345, 1u << 20},
                                                                            {size_t{1} << 30, 1u << 20}}) {
    SCOPED_TRACE("size " + std::to_string(size));
    const Bytes plain = random_bytes(size, seed++);
    Sealed s = seal_with_openssl(plain, chunk);
    auto ck = ChunkKey::derive(s.kp);
    const ChunkRun run = gpu::whole_stream(s.header);  // chunk size chunk, from the header
    const ByteSpan frames = ByteSpan(s.file).subspan(s.header_len);
    Bytes out(size);
    auto r = gpu::open_chunks_cuda(0, *ck, run, frames, out);
    ASSERT_TRUE(r) << r.error().message;
    EXPECT_TRUE(out == plain);
    Bytes resealed(frames.size());
    ASSERT_TRUE(gpu::seal_chunks_cuda(0, *ck, run, plain, resealed));
    EXPECT_TRUE(std::equal(resealed.begin(), resealed.end(), frames.begin(), frames.end()));
    if (size > 3 * chunk) {
      Bytes bad(frames.begin(), frames.end());
      bad[2 * (chunk + 16) + 5] ^= std::byte{1};
      auto t = gpu::open_chunks_cuda(0, *ck, run, bad, out);
      ASSERT_FALSE(t);
      EXPECT_NE(t.error().message.find("chunk 2 fails authentication (1 of"), std::string::npos) << t.error().message;
      EXPECT_TRUE(std::all_of(out.begin(), out.end(), [](std::byte b) { return b == std::byte{0}; }));
    }
  }
}

}  // namespace
}  // namespace tresor
