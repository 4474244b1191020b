// tresor/crypto.h — the cryptographic primitives of Tresor, all over OpenSSL 3 EVP.
//
// Nothing here implements a primitive by hand. Functions are pure apart from the CSPRNG: they take
// spans and return Results; on any authentication failure the output is zeroed and kAuth is
// returned (STYLE.md rule 11).
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>

#include "tresor/encoding.h"
#include "tresor/error.h"
#include "tresor/secret.h"

typedef struct evp_cipher_ctx_st EVP_CIPHER_CTX;
typedef struct evp_pkey_st EVP_PKEY;

namespace tresor::crypto {

inline constexpr size_t kAes256KeySize = 32;
inline constexpr size_t kGcmNonceSize = 12;  // 96-bit IV, NIST SP 800-38D §5.2.1.1
inline constexpr size_t kGcmTagSize = 16;    // full 128-bit tag
inline constexpr size_t kSha256Size = 32;
inline constexpr size_t kSha384Size = 48;
inline constexpr size_t kX25519KeySize = 32;
inline constexpr size_t kEd25519SeedSize = 32;
inline constexpr size_t kEd25519SignatureSize = 64;

// ---- randomness -------------------------------------------------------------------------------

/// RandomSource is where every random byte of a sealing operation comes from. Production uses
/// system_random() (OpenSSL's CSPRNG, seeded from the kernel); tests inject a deterministic source
/// to produce reproducible test vectors.
class RandomSource {
 public:
  virtual ~RandomSource() = default;
  [[nodiscard]] virtual Result<void> fill(MutableByteSpan out) = 0;
};

/// The process-wide CSPRNG (RAND_priv_bytes). Never null, never deterministic.
RandomSource& system_random();

/// Fills `out` from the CSPRNG.
[[nodiscard]] Result<void> random_bytes(MutableByteSpan out);

/// Constant-time equality (CRYPTO_memcmp). Lengths are compared first and are not secret.
bool ct_equal(ByteSpan a, ByteSpan b);

// ---- hashes, HMAC, HKDF -------------------------------------------------------------------------

enum class Hash { kSha256, kSha384 };
size_t hash_size(Hash h);

[[nodiscard]] Result<Bytes> digest(Hash h, ByteSpan data);
[[nodiscard]] Result<std::array<std::byte, kSha256Size>> sha256(ByteSpan data);
[[nodiscard]] Result<std::array<std::byte, kSha384Size>> sha384(ByteSpan data);
[[nodiscard]] Result<Bytes> hmac(Hash h, ByteSpan key, ByteSpan data);

/// HKDF (RFC 5869) extract-and-expand: `length` bytes of output keying material.
[[nodiscard]] Result<SecretBuffer> hkdf(Hash h, ByteSpan ikm, ByteSpan salt, ByteSpan info,
                                        size_t length);

// ---- AES-256-GCM ------------------------------------------------------------------------------

/// AesGcm holds one AES-256-GCM key schedule in an OpenSSL cipher context, so that many messages
/// (the chunks of a stream) are processed without re-expanding the key. An instance is not
/// thread-safe: use one per thread. The key bytes are wiped from the context on destruction.
class AesGcm {
 public:
  /// Fails with kInvalidArgument unless `key` is 32 bytes.
  static Result<AesGcm> create(ByteSpan key);

  AesGcm(AesGcm&&) noexcept;
  AesGcm& operator=(AesGcm&&) noexcept;
  ~AesGcm();

  /// Encrypts `plaintext` into `out` (plaintext.size() + 16 bytes: ciphertext ‖ tag).
  /// `out` may not overlap `plaintext` except exactly (in place).
  [[nodiscard]] Result<void> seal(ByteSpan nonce, ByteSpan aad, ByteSpan plaintext,
                                  MutableByteSpan out);
  /// Decrypts `sealed` (ciphertext ‖ tag) into `out` (sealed.size() - 16 bytes) and checks the tag.
  /// On a tag mismatch `out` is zeroed and kAuth is returned.
  [[nodiscard]] Result<void> open(ByteSpan nonce, ByteSpan aad, ByteSpan sealed,
                                  MutableByteSpan out);
  /// Computes the tag GCM would produce for ciphertext `ciphertext` under `nonce` (no AAD), without
  /// releasing plaintext. Used only to diagnose which nonce a chunk belongs to.
  [[nodiscard]] Result<std::array<std::byte, kGcmTagSize>> tag_of_ciphertext(ByteSpan nonce,
                                                                             ByteSpan ciphertext);
  /// Encrypts `blocks` (a multiple of 16 bytes) with the raw block cipher (ECB), in place.
  [[nodiscard]] Result<void> encrypt_blocks(MutableByteSpan blocks);

 private:
  AesGcm() = default;
  struct CtxDeleter {
    void operator()(EVP_CIPHER_CTX* c) const;
  };
  std::unique_ptr<EVP_CIPHER_CTX, CtxDeleter> enc_;
  std::unique_ptr<EVP_CIPHER_CTX, CtxDeleter> dec_;
  std::unique_ptr<EVP_CIPHER_CTX, CtxDeleter> ecb_;
};

/// One-shot AES-256-GCM seal: returns ciphertext ‖ tag.
[[nodiscard]] Result<Bytes> aes256gcm_seal(ByteSpan key, ByteSpan nonce, ByteSpan aad,
                                           ByteSpan plaintext);
/// One-shot AES-256-GCM open of ciphertext ‖ tag. kAuth on a tag mismatch.
[[nodiscard]] Result<SecretBuffer> aes256gcm_open(ByteSpan key, ByteSpan nonce, ByteSpan aad,
                                                  ByteSpan sealed);

// ---- asymmetric keys --------------------------------------------------------------------------

enum class KeyType {
  kX25519,   // RFC 7748 key agreement
  kEd25519,  // RFC 8032 signatures
  kP256,     // NIST P-256 (secp256r1): ECDH, ECDSA with SHA-256
  kP384,     // NIST P-384 (secp384r1): ECDH, ECDSA with SHA-384
  kRsa,      // RSA, for RSA-OAEP-256 key transport in JWE only (kbs/jose.h builds these)
};
std::string_view key_type_name(KeyType t);

/// Key is an owned OpenSSL key (private or public) of one KeyType.
/// Raw encodings: X25519/Ed25519 32-byte keys (RFC 7748/8032); P-256/P-384 private keys as
/// big-endian scalars of 32/48 bytes and public keys as uncompressed SEC1 points (0x04 ‖ X ‖ Y).
class Key {
 public:
  static Result<Key> generate(KeyType type);
  /// Imports a private key from its raw encoding; the public half is derived.
  static Result<Key> from_private(KeyType type, ByteSpan raw);
  /// Imports a public key from its raw encoding; points not on the curve are rejected.
  static Result<Key> from_public(KeyType type, ByteSpan raw);

  Key(Key&&) noexcept;
  Key& operator=(Key&&) noexcept;
  ~Key();

  KeyType type() const { return type_; }
  bool has_private() const { return has_private_; }
  Result<Bytes> public_raw() const;
  Result<SecretBuffer> private_raw() const;
  EVP_PKEY* get() const { return pkey_.get(); }
  /// Takes ownership of an OpenSSL key of type `type` (used by kbs/jose.h for RSA and JWK import).
  static Key adopt(KeyType type, EVP_PKEY* pkey, bool has_private) { return Key(type, pkey, has_private); }

 private:
  struct PkeyDeleter {
    void operator()(EVP_PKEY* p) const;
  };
  Key(KeyType t, EVP_PKEY* p, bool priv);
  KeyType type_;
  std::unique_ptr<EVP_PKEY, PkeyDeleter> pkey_;
  bool has_private_ = false;
};

/// Diffie–Hellman (X25519, or ECDH on P-256/P-384): the shared secret (x-coordinate for ECDH).
/// X25519 rejects an all-zero result (small-order peer point, RFC 7748 §6.1).
[[nodiscard]] Result<SecretBuffer> derive_shared(const Key& own_private, const Key& peer_public);

/// Signs `message`: Ed25519 (64 bytes), or ECDSA P-256/SHA-256 and P-384/SHA-384 as fixed-length
/// big-endian r ‖ s (64 / 96 bytes).
[[nodiscard]] Result<Bytes> sign(const Key& private_key, ByteSpan message);
/// Verifies a signature in the encoding sign() produces. kAuth when it does not verify.
[[nodiscard]] Result<void> verify(const Key& public_key, ByteSpan message, ByteSpan signature);

/// Converts an ECDSA signature between DER (X9.62 Ecdsa-Sig-Value) and fixed r ‖ s.
[[nodiscard]] Result<Bytes> ecdsa_der_to_raw(ByteSpan der, size_t scalar_size);
[[nodiscard]] Result<Bytes> ecdsa_raw_to_der(ByteSpan raw);

/// Drains OpenSSL's error queue into one line (for Error messages).
std::string openssl_error_string();

}  // namespace tresor::crypto
