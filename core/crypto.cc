// Core crypto over OpenSSL 3 EVP. See tresor/crypto.h.
#include "tresor/crypto.h"

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/ec.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/kdf.h>
#include <openssl/obj_mac.h>
#include <openssl/param_build.h>
#include <openssl/params.h>
#include <openssl/bn.h>
#include <openssl/rand.h>

#include <array>
#include <climits>
#include <memory>
#include <cstring>
#include <string>

namespace tresor::crypto {
namespace {

const unsigned char* u8(ByteSpan b) { return reinterpret_cast<const unsigned char*>(b.data()); }
unsigned char* u8(MutableByteSpan b) { return reinterpret_cast<unsigned char*>(b.data()); }

std::unexpected<Error> ossl_fail(std::string_view what) {
  return fail(ErrorCode::kCrypto, std::string(what) + ": " + openssl_error_string());
}

// EVP lengths are int; every caller goes through this so that no size silently truncates.
Result<int> to_int(size_t n, std::string_view what) {
  if (n > static_cast<size_t>(INT_MAX)) {
    return fail(ErrorCode::kInvalidArgument,
                std::string(what) + " is " + std::to_string(n) + " bytes, over the 2 GiB limit of one call");
  }
  return static_cast<int>(n);
}

class SystemRandom final : public RandomSource {
 public:
  Result<void> fill(MutableByteSpan out) override {
    size_t done = 0;
    while (done < out.size()) {
      const size_t n = std::min<size_t>(out.size() - done, 1 << 30);
      if (RAND_priv_bytes(u8(out.subspan(done, n)), static_cast<int>(n)) != 1) {
        return ossl_fail("RAND_priv_bytes");
      }
      done += n;
    }
    return {};
  }
};

const char* hash_name(Hash h) { return h == Hash::kSha256 ? "SHA256" : "SHA384"; }
const EVP_MD* hash_md(Hash h) { return h == Hash::kSha256 ? EVP_sha256() : EVP_sha384(); }

}  // namespace

std::string openssl_error_string() {
  std::string out;
  unsigned long e = 0;
  while ((e = ERR_get_error()) != 0) {
    char buf[256];
    ERR_error_string_n(e, buf, sizeof buf);
    if (!out.empty()) out += "; ";
    out += buf;
  }
  return out.empty() ? std::string("no OpenSSL error recorded") : out;
}

RandomSource& system_random() {
  static SystemRandom r;
  return r;
}

Result<void> random_bytes(MutableByteSpan out) { return system_random().fill(out); }

bool ct_equal(ByteSpan a, ByteSpan b) {
  if (a.size() != b.size()) return false;
  if (a.empty()) return true;
  return CRYPTO_memcmp(a.data(), b.data(), a.size()) == 0;
}

size_t hash_size(Hash h) { return h == Hash::kSha256 ? kSha256Size : kSha384Size; }

Result<Bytes> digest(Hash h, ByteSpan data) {
  Bytes out(hash_size(h));
  unsigned int len = 0;
  if (EVP_Digest(data.data(), data.size(), u8(MutableByteSpan(out)), &len, hash_md(h), nullptr) != 1 ||
      len != out.size()) {
    return ossl_fail("EVP_Digest");
  }
  return out;
}

Result<std::array<std::byte, kSha256Size>> sha256(ByteSpan data) {
  auto d = digest(Hash::kSha256, data);
  if (!d) return std::unexpected(d.error());
  std::array<std::byte, kSha256Size> out;
  std::memcpy(out.data(), d->data(), out.size());
  return out;
}

Result<std::array<std::byte, kSha384Size>> sha384(ByteSpan data) {
  auto d = digest(Hash::kSha384, data);
  if (!d) return std::unexpected(d.error());
  std::array<std::byte, kSha384Size> out;
  std::memcpy(out.data(), d->data(), out.size());
  return out;
}

Result<Bytes> hmac(Hash h, ByteSpan key, ByteSpan data) {
  EVP_MAC* mac = EVP_MAC_fetch(nullptr, "HMAC", nullptr);
  if (mac == nullptr) return ossl_fail("EVP_MAC_fetch(HMAC)");
  EVP_MAC_CTX* ctx = EVP_MAC_CTX_new(mac);
  EVP_MAC_free(mac);
  if (ctx == nullptr) return ossl_fail("EVP_MAC_CTX_new");
  OSSL_PARAM params[] = {
      OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, const_cast<char*>(hash_name(h)), 0),
      OSSL_PARAM_construct_end()};
  Bytes out(hash_size(h));
  size_t len = 0;
  // EVP_MAC_init takes a NULL key as "keep the previous key", and a fresh context has none; an
  // empty key (valid for HMAC, RFC 2104) must therefore point at a byte, as in hkdf() below.
  static const unsigned char empty_key = 0;
  const bool ok = EVP_MAC_init(ctx, key.empty() ? &empty_key : u8(key), key.size(), params) == 1 &&
                  EVP_MAC_update(ctx, u8(data), data.size()) == 1 &&
                  EVP_MAC_final(ctx, u8(MutableByteSpan(out)), &len, out.size()) == 1 &&
                  len == out.size();
  EVP_MAC_CTX_free(ctx);
  if (!ok) return ossl_fail("HMAC");
  return out;
}

Result<SecretBuffer> hkdf(Hash h, ByteSpan ikm, ByteSpan salt, ByteSpan info, size_t length) {
  if (length == 0 || length > 255 * hash_size(h)) {
    return fail(ErrorCode::kInvalidArgument,
                "HKDF output length " + std::to_string(length) + " is outside 1.." +
                    std::to_string(255 * hash_size(h)) + " (RFC 5869 §2.3)");
  }
  EVP_KDF* kdf = EVP_KDF_fetch(nullptr, "HKDF", nullptr);
  if (kdf == nullptr) return ossl_fail("EVP_KDF_fetch(HKDF)");
  EVP_KDF_CTX* ctx = EVP_KDF_CTX_new(kdf);
  EVP_KDF_free(kdf);
  if (ctx == nullptr) return ossl_fail("EVP_KDF_CTX_new");
  // OpenSSL rejects a NULL octet-string pointer even with length 0; point empty inputs at a byte.
  static unsigned char empty = 0;
  auto octets = [](const char* name, ByteSpan b) {
    return OSSL_PARAM_construct_octet_string(
        name, b.empty() ? &empty : const_cast<unsigned char*>(u8(b)), b.size());
  };
  OSSL_PARAM params[] = {
      OSSL_PARAM_construct_utf8_string(OSSL_KDF_PARAM_DIGEST, const_cast<char*>(hash_name(h)), 0),
      octets(OSSL_KDF_PARAM_KEY, ikm), octets(OSSL_KDF_PARAM_SALT, salt),
      octets(OSSL_KDF_PARAM_INFO, info), OSSL_PARAM_construct_end()};
  SecretBuffer out(length);
  const bool ok = EVP_KDF_derive(ctx, u8(out.span()), length, params) == 1;
  EVP_KDF_CTX_free(ctx);
  if (!ok) return ossl_fail("HKDF");
  return out;
}

// ---- AES-256-GCM --------------------------------------------------------------------------------

void AesGcm::CtxDeleter::operator()(EVP_CIPHER_CTX* c) const { EVP_CIPHER_CTX_free(c); }

AesGcm::AesGcm(AesGcm&&) noexcept = default;
AesGcm& AesGcm::operator=(AesGcm&&) noexcept = default;
AesGcm::~AesGcm() = default;  // EVP_CIPHER_CTX_free cleanses the key schedule.

Result<AesGcm> AesGcm::create(ByteSpan key) {
  if (key.size() != kAes256KeySize) {
    return fail(ErrorCode::kInvalidArgument,
                "AES-256 key is " + std::to_string(key.size()) + " bytes, want 32");
  }
  AesGcm g;
  g.enc_.reset(EVP_CIPHER_CTX_new());
  g.dec_.reset(EVP_CIPHER_CTX_new());
  g.ecb_.reset(EVP_CIPHER_CTX_new());
  if (!g.enc_ || !g.dec_ || !g.ecb_) return ossl_fail("EVP_CIPHER_CTX_new");
  // Expand the key once; each message then only sets its IV.
  if (EVP_EncryptInit_ex(g.enc_.get(), EVP_aes_256_gcm(), nullptr, u8(key), nullptr) != 1 ||
      EVP_DecryptInit_ex(g.dec_.get(), EVP_aes_256_gcm(), nullptr, u8(key), nullptr) != 1 ||
      EVP_EncryptInit_ex(g.ecb_.get(), EVP_aes_256_ecb(), nullptr, u8(key), nullptr) != 1 ||
      EVP_CIPHER_CTX_set_padding(g.ecb_.get(), 0) != 1) {
    return ossl_fail("AES-256-GCM key setup");
  }
  return g;
}

Result<void> AesGcm::seal(ByteSpan nonce, ByteSpan aad, ByteSpan plaintext, MutableByteSpan out) {
  if (nonce.size() != kGcmNonceSize || out.size() != plaintext.size() + kGcmTagSize) {
    return fail(ErrorCode::kInvalidArgument, "AES-GCM seal: nonce must be 12 bytes and output " +
                                                 std::to_string(plaintext.size() + kGcmTagSize) + " bytes");
  }
  auto n = to_int(plaintext.size(), "plaintext");
  if (!n) return std::unexpected(n.error());
  auto na = to_int(aad.size(), "AAD");
  if (!na) return std::unexpected(na.error());
  EVP_CIPHER_CTX* c = enc_.get();
  int len = 0;
  if (EVP_EncryptInit_ex(c, nullptr, nullptr, nullptr, u8(nonce)) != 1) return ossl_fail("GCM IV");
  if (!aad.empty() && EVP_EncryptUpdate(c, nullptr, &len, u8(aad), *na) != 1) return ossl_fail("GCM AAD");
  if (*n > 0 && EVP_EncryptUpdate(c, u8(out), &len, u8(plaintext), *n) != 1) return ossl_fail("GCM encrypt");
  if (EVP_EncryptFinal_ex(c, u8(out) + plaintext.size(), &len) != 1) return ossl_fail("GCM final");
  if (EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_GET_TAG, static_cast<int>(kGcmTagSize),
                          u8(out) + plaintext.size()) != 1) {
    return ossl_fail("GCM get tag");
  }
  return {};
}

Result<void> AesGcm::open(ByteSpan nonce, ByteSpan aad, ByteSpan sealed, MutableByteSpan out) {
  if (nonce.size() != kGcmNonceSize || sealed.size() < kGcmTagSize ||
      out.size() != sealed.size() - kGcmTagSize) {
    return fail(ErrorCode::kInvalidArgument, "AES-GCM open: nonce must be 12 bytes, input at least 16");
  }
  const size_t ct_len = sealed.size() - kGcmTagSize;
  auto n = to_int(ct_len, "ciphertext");
  if (!n) return std::unexpected(n.error());
  auto na = to_int(aad.size(), "AAD");
  if (!na) return std::unexpected(na.error());
  EVP_CIPHER_CTX* c = dec_.get();
  int len = 0;
  unsigned char tag[kGcmTagSize];
  std::memcpy(tag, sealed.data() + ct_len, kGcmTagSize);
  if (EVP_DecryptInit_ex(c, nullptr, nullptr, nullptr, u8(nonce)) != 1) return ossl_fail("GCM IV");
  if (!aad.empty() && EVP_DecryptUpdate(c, nullptr, &len, u8(aad), *na) != 1) return ossl_fail("GCM AAD");
  if (*n > 0 && EVP_DecryptUpdate(c, u8(out), &len, u8(sealed), *n) != 1) {
    secure_wipe(out);
    return ossl_fail("GCM decrypt");
  }
  if (EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_SET_TAG, static_cast<int>(kGcmTagSize), tag) != 1) {
    secure_wipe(out);
    return ossl_fail("GCM set tag");
  }
  // EVP_DecryptFinal_ex compares the tag in constant time (CRYPTO_memcmp inside the provider).
  if (EVP_DecryptFinal_ex(c, u8(out) + ct_len, &len) != 1) {
    ERR_clear_error();
    secure_wipe(out);
    return fail(ErrorCode::kAuth, "AES-GCM tag mismatch");
  }
  return {};
}

Result<std::array<std::byte, kGcmTagSize>> AesGcm::tag_of_ciphertext(ByteSpan nonce, ByteSpan ciphertext) {
  // GCM is malleable by design: decrypting C under a nonce without the tag check yields P', and
  // encrypting P' under the same nonce reproduces C and its tag. P' is wiped and never returned.
  if (nonce.size() != kGcmNonceSize) {
    return fail(ErrorCode::kInvalidArgument, "AES-GCM tag_of_ciphertext: nonce must be 12 bytes");
  }
  SecretBuffer p(ciphertext.size());
  auto n = to_int(ciphertext.size(), "ciphertext");
  if (!n) return std::unexpected(n.error());
  int len = 0;
  if (EVP_DecryptInit_ex(dec_.get(), nullptr, nullptr, nullptr, u8(nonce)) != 1 ||
      (*n > 0 && EVP_DecryptUpdate(dec_.get(), u8(p.span()), &len, u8(ciphertext), *n) != 1)) {
    return ossl_fail("GCM keystream");
  }
  Bytes again(ciphertext.size() + kGcmTagSize);
  TRESOR_TRY(seal(nonce, {}, p.span(), again));
  std::array<std::byte, kGcmTagSize> tag;
  std::memcpy(tag.data(), again.data() + ciphertext.size(), kGcmTagSize);
  return tag;
}

Result<void> AesGcm::encrypt_blocks(MutableByteSpan blocks) {
  if (blocks.size() % 16 != 0) {
    return fail(ErrorCode::kInvalidArgument, "AES block input is not a multiple of 16 bytes");
  }
  auto n = to_int(blocks.size(), "blocks");
  if (!n) return std::unexpected(n.error());
  int len = 0;
  if (EVP_EncryptUpdate(ecb_.get(), u8(blocks), &len, u8(blocks), *n) != 1 || len != *n) {
    return ossl_fail("AES-ECB");
  }
  return {};
}

Result<Bytes> aes256gcm_seal(ByteSpan key, ByteSpan nonce, ByteSpan aad, ByteSpan plaintext) {
  auto g = AesGcm::create(key);
  if (!g) return std::unexpected(g.error());
  Bytes out(plaintext.size() + kGcmTagSize);
  TRESOR_TRY(g->seal(nonce, aad, plaintext, out));
  return out;
}

Result<SecretBuffer> aes256gcm_open(ByteSpan key, ByteSpan nonce, ByteSpan aad, ByteSpan sealed) {
  if (sealed.size() < kGcmTagSize) {
    return fail(ErrorCode::kInvalidArgument, "AES-GCM input is " + std::to_string(sealed.size()) +
                                                 " bytes, shorter than its 16-byte tag");
  }
  auto g = AesGcm::create(key);
  if (!g) return std::unexpected(g.error());
  SecretBuffer out(sealed.size() - kGcmTagSize);
  TRESOR_TRY(g->open(nonce, aad, sealed, out.span()));
  return out;
}

// ---- asymmetric keys ------------------------------------------------------------------------------

namespace {

struct CurveInfo {
  const char* group;  // OpenSSL group name
  int nid;
  size_t scalar;      // private scalar / coordinate length
  const char* md;     // ECDSA hash
};

CurveInfo curve_info(KeyType t) {
  if (t == KeyType::kP256) return {"prime256v1", NID_X9_62_prime256v1, 32, "SHA256"};
  return {"secp384r1", NID_secp384r1, 48, "SHA384"};
}

bool is_ec(KeyType t) { return t == KeyType::kP256 || t == KeyType::kP384; }
int raw_nid(KeyType t) { return t == KeyType::kX25519 ? EVP_PKEY_X25519 : EVP_PKEY_ED25519; }

Result<EVP_PKEY*> ec_from_data(KeyType t, const unsigned char* pub, size_t pub_len, const BIGNUM* priv) {
  const CurveInfo ci = curve_info(t);
  OSSL_PARAM_BLD* bld = OSSL_PARAM_BLD_new();
  if (bld == nullptr) return ossl_fail("OSSL_PARAM_BLD_new");
  bool ok = OSSL_PARAM_BLD_push_utf8_string(bld, OSSL_PKEY_PARAM_GROUP_NAME, ci.group, 0) == 1 &&
            OSSL_PARAM_BLD_push_octet_string(bld, OSSL_PKEY_PARAM_PUB_KEY, pub, pub_len) == 1;
  if (ok && priv != nullptr) ok = OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_PRIV_KEY, priv) == 1;
  OSSL_PARAM* params = ok ? OSSL_PARAM_BLD_to_param(bld) : nullptr;
  OSSL_PARAM_BLD_free(bld);
  if (params == nullptr) return ossl_fail("EC params");
  EVP_PKEY_CTX* ctx = EVP_PKEY_CTX_new_from_name(nullptr, "EC", nullptr);
  EVP_PKEY* pkey = nullptr;
  ok = ctx != nullptr && EVP_PKEY_fromdata_init(ctx) == 1 &&
       EVP_PKEY_fromdata(ctx, &pkey, priv ? EVP_PKEY_KEYPAIR : EVP_PKEY_PUBLIC_KEY, params) == 1;
  EVP_PKEY_CTX_free(ctx);
  OSSL_PARAM_free(params);
  if (!ok) return ossl_fail("EVP_PKEY_fromdata");
  return pkey;
}

}  // namespace

std::string_view key_type_name(KeyType t) {
  switch (t) {
    case KeyType::kX25519: return "X25519";
    case KeyType::kEd25519: return "Ed25519";
    case KeyType::kP256: return "P-256";
    case KeyType::kP384: return "P-384";
    case KeyType::kRsa: return "RSA";
  }
  return "unknown";
}

void Key::PkeyDeleter::operator()(EVP_PKEY* p) const { EVP_PKEY_free(p); }
Key::Key(KeyType t, EVP_PKEY* p, bool priv) : type_(t), pkey_(p), has_private_(priv) {}
Key::Key(Key&&) noexcept = default;
Key& Key::operator=(Key&&) noexcept = default;
Key::~Key() = default;

Result<Key> Key::generate(KeyType type) {
  if (type == KeyType::kRsa) return fail(ErrorCode::kInvalidArgument, "RSA keys are made by kbs::generate_rsa");
  EVP_PKEY* p = nullptr;
  if (is_ec(type)) {
    p = EVP_EC_gen(curve_info(type).group);
  } else {
    EVP_PKEY_CTX* ctx = EVP_PKEY_CTX_new_id(raw_nid(type), nullptr);
    if (ctx != nullptr && EVP_PKEY_keygen_init(ctx) == 1) EVP_PKEY_keygen(ctx, &p);
    EVP_PKEY_CTX_free(ctx);
  }
  if (p == nullptr) return ossl_fail(std::string("generate ") + std::string(key_type_name(type)));
  return Key(type, p, true);
}

Result<Key> Key::from_private(KeyType type, ByteSpan raw) {
  if (type == KeyType::kRsa) return fail(ErrorCode::kInvalidArgument, "RSA keys have no raw encoding here; use a JWK");
  if (!is_ec(type)) {
    if (raw.size() != 32) {
      return fail(ErrorCode::kInvalidArgument, std::string(key_type_name(type)) + " private key is " +
                                                   std::to_string(raw.size()) + " bytes, want 32");
    }
    EVP_PKEY* p = EVP_PKEY_new_raw_private_key(raw_nid(type), nullptr, u8(raw), raw.size());
    if (p == nullptr) return ossl_fail("EVP_PKEY_new_raw_private_key");
    return Key(type, p, true);
  }
  const CurveInfo ci = curve_info(type);
  if (raw.size() != ci.scalar) {
    return fail(ErrorCode::kInvalidArgument, std::string(key_type_name(type)) + " private key is " +
                                                 std::to_string(raw.size()) + " bytes, want " +
                                                 std::to_string(ci.scalar));
  }
  BIGNUM* d = BN_bin2bn(u8(raw), static_cast<int>(raw.size()), nullptr);
  EC_GROUP* group = EC_GROUP_new_by_curve_name(ci.nid);
  EC_POINT* q = group ? EC_POINT_new(group) : nullptr;
  unsigned char pub[1 + 2 * 48];
  size_t pub_len = 0;
  bool ok = d != nullptr && q != nullptr && !BN_is_zero(d) &&
            BN_cmp(d, EC_GROUP_get0_order(group)) < 0 &&
            EC_POINT_mul(group, q, d, nullptr, nullptr, nullptr) == 1;
  if (ok) pub_len = EC_POINT_point2oct(group, q, POINT_CONVERSION_UNCOMPRESSED, pub, sizeof pub, nullptr);
  ok = ok && pub_len == 1 + 2 * ci.scalar;
  Result<EVP_PKEY*> p = ok ? ec_from_data(type, pub, pub_len, d)
                           : fail(ErrorCode::kInvalidArgument,
                                  std::string(key_type_name(type)) + " private scalar is zero or not below the group order");
  EC_POINT_free(q);
  EC_GROUP_free(group);
  BN_clear_free(d);
  OPENSSL_cleanse(pub, sizeof pub);
  if (!p) return std::unexpected(p.error());
  return Key(type, *p, true);
}

namespace {

struct BnCtxDeleter {
  void operator()(BN_CTX* c) const { BN_CTX_free(c); }
};

// An Ed25519 public key must decode to a point of the curve (RFC 8032 §5.1.3) that is not of
// small order. OpenSSL imports any 32 bytes and its verification accepts a fixed signature
// under a small-order key for every message, so a small-order key would let anyone "prove" it.
Result<void> check_ed25519_point(ByteSpan raw) {
  const auto is = [&](std::string_view hex_le) {  // y (the sign bit of x cleared) equals this
    for (size_t i = 0; i < 32; ++i) {
      const auto byte = static_cast<unsigned>(std::stoul(std::string(hex_le.substr(2 * i, 2)), nullptr, 16));
      const auto have = static_cast<unsigned>(raw[i]) & (i == 31 ? 0x7Fu : 0xFFu);
      if (have != byte) return false;
    }
    return true;
  };
  // The y of the eight points of order 1, 2, 4 and 8: 1, p - 1, 0, and the two of order 8.
  for (const std::string_view y : {"0100000000000000000000000000000000000000000000000000000000000000",
                                   "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
                                   "0000000000000000000000000000000000000000000000000000000000000000",
                                   "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
                                   "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05"}) {
    if (is(y)) return fail(ErrorCode::kInvalidArgument, "Ed25519 public key is a point of small order (anyone could sign for it)");
  }
  std::array<unsigned char, 32> le{};
  std::memcpy(le.data(), raw.data(), 32);
  const bool x_sign = (le[31] & 0x80) != 0;
  le[31] &= 0x7F;
  std::unique_ptr<BN_CTX, BnCtxDeleter> ctx(BN_CTX_new());
  if (!ctx) return ossl_fail("BN_CTX_new");
  BN_CTX_start(ctx.get());
  struct End {
    BN_CTX* c;
    ~End() { BN_CTX_end(c); }
  } end{ctx.get()};
  BIGNUM* p = BN_CTX_get(ctx.get());
  BIGNUM* d = BN_CTX_get(ctx.get());
  BIGNUM* y = BN_CTX_get(ctx.get());
  BIGNUM* u = BN_CTX_get(ctx.get());
  BIGNUM* v = BN_CTX_get(ctx.get());
  BIGNUM* e = BN_CTX_get(ctx.get());
  if (e == nullptr) return ossl_fail("BN_CTX_get");
  // p = 2^255 - 19 and d = -121665/121666 mod p (RFC 8032 §5.1).
  if (BN_hex2bn(&p, "7fffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffed") == 0 ||
      BN_hex2bn(&d, "52036cee2b6ffe738cc740797779e89800700a4d4141d8ab75eb4dca135978a3") == 0 || BN_lebin2bn(le.data(), 32, y) == nullptr) {
    return ossl_fail("BN");
  }
  if (BN_cmp(y, p) >= 0) return fail(ErrorCode::kInvalidArgument, "Ed25519 public key is not canonical (y >= 2^255 - 19)");
  // x^2 = (y^2 - 1) / (d y^2 + 1): a solution exists when u = y^2 - 1 is 0 or u/v a square mod p
  // (Euler's criterion: (u/v)^((p-1)/2) = 1).
  if (BN_mod_sqr(u, y, p, ctx.get()) != 1 || BN_mod_mul(v, d, u, p, ctx.get()) != 1 || BN_add_word(v, 1) != 1 || BN_mod(v, v, p, ctx.get()) != 1 ||
      BN_sub_word(u, 1) != 1) {
    return ossl_fail("BN");
  }
  if (BN_is_zero(u)) {
    if (x_sign) return fail(ErrorCode::kInvalidArgument, "Ed25519 public key is not canonical (x = 0 with its sign bit set)");
    return {};
  }
  if (BN_mod_inverse(v, v, p, ctx.get()) == nullptr || BN_mod_mul(u, u, v, p, ctx.get()) != 1 || BN_copy(e, p) == nullptr || BN_sub_word(e, 1) != 1 ||
      BN_rshift1(e, e) != 1 || BN_mod_exp(v, u, e, p, ctx.get()) != 1) {
    return ossl_fail("BN");
  }
  if (!BN_is_one(v)) return fail(ErrorCode::kInvalidArgument, "Ed25519 public key is not a point of the curve");
  return {};
}

}  // namespace

Result<Key> Key::from_public(KeyType type, ByteSpan raw) {
  if (type == KeyType::kRsa) return fail(ErrorCode::kInvalidArgument, "RSA keys have no raw encoding here; use a JWK");
  if (!is_ec(type)) {
    if (raw.size() != 32) {
      return fail(ErrorCode::kInvalidArgument, std::string(key_type_name(type)) + " public key is " +
                                                   std::to_string(raw.size()) + " bytes, want 32");
    }
    if (type == KeyType::kEd25519) TRESOR_TRY(check_ed25519_point(raw));
    EVP_PKEY* p = EVP_PKEY_new_raw_public_key(raw_nid(type), nullptr, u8(raw), raw.size());
    if (p == nullptr) return ossl_fail("EVP_PKEY_new_raw_public_key");
    return Key(type, p, false);
  }
  const CurveInfo ci = curve_info(type);
  if (raw.size() != 1 + 2 * ci.scalar || raw[0] != std::byte{0x04}) {
    return fail(ErrorCode::kInvalidArgument,
                std::string(key_type_name(type)) + " public key must be an uncompressed point of " +
                    std::to_string(1 + 2 * ci.scalar) + " bytes starting 04, got " +
                    std::to_string(raw.size()) + " bytes");
  }
  auto p = ec_from_data(type, u8(raw), raw.size(), nullptr);
  if (!p) {
    return fail(ErrorCode::kInvalidArgument,
                std::string(key_type_name(type)) + " public key is not a point on the curve");
  }
  // EVP_PKEY_fromdata does not always check the point; do it explicitly. The quick check is
  // partial public-key validation (NIST SP 800-56A rev. 3 §5.6.2.3.4: not the point at infinity,
  // coordinates in the field, on the curve). P-256 and P-384 have cofactor 1, so every point on
  // the curve has prime order n and full validation's extra n·Q = O test (a scalar
  // multiplication, the bulk of the cost) cannot fail for a point that passed these.
  EVP_PKEY_CTX* ctx = EVP_PKEY_CTX_new_from_pkey(nullptr, *p, nullptr);
  const bool on_curve = ctx != nullptr && EVP_PKEY_public_check_quick(ctx) == 1;
  EVP_PKEY_CTX_free(ctx);
  if (!on_curve) {
    EVP_PKEY_free(*p);
    ERR_clear_error();
    return fail(ErrorCode::kInvalidArgument,
                std::string(key_type_name(type)) + " public key is not a point on the curve");
  }
  return Key(type, *p, false);
}

Result<Bytes> Key::public_raw() const {
  if (type_ == KeyType::kRsa) return fail(ErrorCode::kInvalidArgument, "RSA keys have no raw encoding here; use a JWK");
  if (!is_ec(type_)) {
    Bytes out(32);
    size_t len = out.size();
    if (EVP_PKEY_get_raw_public_key(pkey_.get(), u8(MutableByteSpan(out)), &len) != 1 || len != 32) {
      return ossl_fail("EVP_PKEY_get_raw_public_key");
    }
    return out;
  }
  Bytes out(1 + 2 * curve_info(type_).scalar);
  size_t len = 0;
  if (EVP_PKEY_get_octet_string_param(pkey_.get(), OSSL_PKEY_PARAM_PUB_KEY, u8(MutableByteSpan(out)),
                                      out.size(), &len) != 1 ||
      len != out.size()) {
    return ossl_fail("EC public key");
  }
  return out;
}

Result<SecretBuffer> Key::private_raw() const {
  if (!has_private_) return fail(ErrorCode::kInvalidArgument, "key has no private half");
  if (type_ == KeyType::kRsa) return fail(ErrorCode::kInvalidArgument, "RSA keys have no raw encoding here; use a JWK");
  if (!is_ec(type_)) {
    SecretBuffer out(32);
    size_t len = out.size();
    if (EVP_PKEY_get_raw_private_key(pkey_.get(), u8(out.span()), &len) != 1 || len != 32) {
      return ossl_fail("EVP_PKEY_get_raw_private_key");
    }
    return out;
  }
  BIGNUM* d = nullptr;
  if (EVP_PKEY_get_bn_param(pkey_.get(), OSSL_PKEY_PARAM_PRIV_KEY, &d) != 1) return ossl_fail("EC private key");
  const size_t n = curve_info(type_).scalar;
  SecretBuffer out(n);
  const int w = BN_bn2binpad(d, u8(out.span()), static_cast<int>(n));
  BN_clear_free(d);
  if (w != static_cast<int>(n)) return ossl_fail("BN_bn2binpad");
  return out;
}

Result<SecretBuffer> derive_shared(const Key& own_private, const Key& peer_public) {
  if (own_private.type() != peer_public.type() || own_private.type() == KeyType::kEd25519 ||
      own_private.type() == KeyType::kRsa) {
    return fail(ErrorCode::kInvalidArgument,
                std::string("key agreement needs two X25519, P-256 or P-384 keys, got ") +
                    std::string(key_type_name(own_private.type())) + " and " +
                    std::string(key_type_name(peer_public.type())));
  }
  if (!own_private.has_private()) return fail(ErrorCode::kInvalidArgument, "key agreement needs a private key");
  EVP_PKEY_CTX* ctx = EVP_PKEY_CTX_new_from_pkey(nullptr, own_private.get(), nullptr);
  size_t len = 0;
  bool ok = ctx != nullptr && EVP_PKEY_derive_init(ctx) == 1 &&
            EVP_PKEY_derive_set_peer_ex(ctx, peer_public.get(), 1) == 1 &&
            EVP_PKEY_derive(ctx, nullptr, &len) == 1;
  SecretBuffer out(ok ? len : 0);
  const bool prepared = ok;
  ok = ok && EVP_PKEY_derive(ctx, u8(out.span()), &len) == 1 && len == out.size();
  EVP_PKEY_CTX_free(ctx);
  if (!ok && prepared && own_private.type() == KeyType::kX25519) {
    // OpenSSL 3's X25519 itself refuses an all-zero result (ossl_x25519 returns 0, "failed during
    // derivation"); with both keys already accepted above, that is the only way this step fails.
    ERR_clear_error();
    return fail(ErrorCode::kInvalidArgument, "X25519 peer key is a low-order point (all-zero shared secret)");
  }
  if (!ok) return ossl_fail("key agreement");
  if (own_private.type() == KeyType::kX25519) {
    // RFC 7748 §6.1: an all-zero output means the peer sent a small-order point.
    std::array<std::byte, 32> zero{};
    if (ct_equal(out.span(), zero)) {
      return fail(ErrorCode::kInvalidArgument, "X25519 peer key is a low-order point (all-zero shared secret)");
    }
  }
  return out;
}

Result<Bytes> ecdsa_der_to_raw(ByteSpan der, size_t scalar_size) {
  const unsigned char* p = u8(der);
  ECDSA_SIG* sig = d2i_ECDSA_SIG(nullptr, &p, static_cast<long>(der.size()));
  if (sig == nullptr || p != u8(der) + der.size()) {
    ECDSA_SIG_free(sig);
    ERR_clear_error();
    return fail(ErrorCode::kInvalidArgument, "ECDSA signature is not valid DER");
  }
  Bytes out(2 * scalar_size);
  const bool ok =
      BN_bn2binpad(ECDSA_SIG_get0_r(sig), u8(MutableByteSpan(out)), static_cast<int>(scalar_size)) ==
          static_cast<int>(scalar_size) &&
      BN_bn2binpad(ECDSA_SIG_get0_s(sig), u8(MutableByteSpan(out)) + scalar_size,
                   static_cast<int>(scalar_size)) == static_cast<int>(scalar_size);
  ECDSA_SIG_free(sig);
  if (!ok) return fail(ErrorCode::kInvalidArgument, "ECDSA r or s is longer than the curve order");
  return out;
}

Result<Bytes> ecdsa_raw_to_der(ByteSpan raw) {
  if (raw.empty() || raw.size() % 2 != 0) {
    return fail(ErrorCode::kInvalidArgument, "raw ECDSA signature must be r ‖ s of equal lengths");
  }
  const int half = static_cast<int>(raw.size() / 2);
  BIGNUM* r = BN_bin2bn(u8(raw), half, nullptr);
  BIGNUM* s = BN_bin2bn(u8(raw) + half, half, nullptr);
  ECDSA_SIG* sig = ECDSA_SIG_new();
  if (r == nullptr || s == nullptr || sig == nullptr || ECDSA_SIG_set0(sig, r, s) != 1) {
    BN_free(r);
    BN_free(s);
    ECDSA_SIG_free(sig);
    return ossl_fail("ECDSA_SIG");
  }
  unsigned char* der = nullptr;
  const int len = i2d_ECDSA_SIG(sig, &der);
  ECDSA_SIG_free(sig);
  if (len <= 0) return ossl_fail("i2d_ECDSA_SIG");
  Bytes out(reinterpret_cast<std::byte*>(der), reinterpret_cast<std::byte*>(der) + len);
  OPENSSL_free(der);
  return out;
}

Result<Bytes> sign(const Key& private_key, ByteSpan message) {
  if (!private_key.has_private() || private_key.type() == KeyType::kX25519 || private_key.type() == KeyType::kRsa) {
    return fail(ErrorCode::kInvalidArgument, "signing needs an Ed25519, P-256 or P-384 private key");
  }
  const bool ec = is_ec(private_key.type());
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  size_t len = 0;
  bool ok = ctx != nullptr &&
            EVP_DigestSignInit_ex(ctx, nullptr, ec ? curve_info(private_key.type()).md : nullptr,
                                  nullptr, nullptr, private_key.get(), nullptr) == 1 &&
            EVP_DigestSign(ctx, nullptr, &len, u8(message), message.size()) == 1;
  Bytes sig(ok ? len : 0);
  ok = ok && EVP_DigestSign(ctx, u8(MutableByteSpan(sig)), &len, u8(message), message.size()) == 1;
  EVP_MD_CTX_free(ctx);
  if (!ok) return ossl_fail("sign");
  sig.resize(len);
  if (!ec) return sig;
  return ecdsa_der_to_raw(sig, curve_info(private_key.type()).scalar);
}

Result<void> verify(const Key& public_key, ByteSpan message, ByteSpan signature) {
  if (public_key.type() == KeyType::kX25519 || public_key.type() == KeyType::kRsa) {
    return fail(ErrorCode::kInvalidArgument, std::string(key_type_name(public_key.type())) + " keys cannot verify signatures here");
  }
  const bool ec = is_ec(public_key.type());
  Bytes der;
  ByteSpan sig = signature;
  if (ec) {
    const size_t want = 2 * curve_info(public_key.type()).scalar;
    if (signature.size() != want) {
      return fail(ErrorCode::kAuth, std::string(key_type_name(public_key.type())) + " signature is " +
                                        std::to_string(signature.size()) + " bytes, want " + std::to_string(want));
    }
    auto d = ecdsa_raw_to_der(signature);
    if (!d) return std::unexpected(d.error());
    der = std::move(*d);
    sig = der;
  } else if (signature.size() != kEd25519SignatureSize) {
    return fail(ErrorCode::kAuth, "Ed25519 signature is " + std::to_string(signature.size()) + " bytes, want 64");
  }
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  const bool init = ctx != nullptr &&
                    EVP_DigestVerifyInit_ex(ctx, nullptr, ec ? curve_info(public_key.type()).md : nullptr,
                                            nullptr, nullptr, public_key.get(), nullptr) == 1;
  const int rc = init ? EVP_DigestVerify(ctx, u8(sig), sig.size(), u8(message), message.size()) : -1;
  EVP_MD_CTX_free(ctx);
  if (!init) return ossl_fail("verify init");
  if (rc != 1) {
    ERR_clear_error();
    return fail(ErrorCode::kAuth, std::string(key_type_name(public_key.type())) + " signature does not verify");
  }
  return {};
}

}  // namespace tresor::crypto
