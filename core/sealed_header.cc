// Sealed format v1: header parsing, serialization, key derivation and stanza (un)wrapping.
// Normative spec: docs/formats.md. Section numbers below refer to it.
#include <cstdlib>
#include <cstring>
#include <string>

#include "sealed_internal.h"
#include "tresor/sealed.h"

namespace tresor::sealed {
namespace {

// §4: HKDF-SHA-256 info strings. Distinct labels keep every derived key single-purpose.
constexpr std::string_view kInfoPayload = "tresor/v1/payload";
constexpr std::string_view kInfoHeaderMac = "tresor/v1/header-mac";
constexpr std::string_view kInfoX25519 = "tresor/v1/x25519";
constexpr std::string_view kInfoDatasetPrefix = "tresor/v1/dataset:";
// §3: wrap keys are single-use (fresh ephemeral key or fresh salt), so a zero nonce is safe.
constexpr std::array<std::byte, crypto::kGcmNonceSize> kZeroNonce{};

constexpr size_t kStanzaHeadSize = 4;           // type u8, flags u8, body length u16
constexpr size_t kX25519BodySize = 32 + kWrappedKeySize;  // 80

std::unexpected<Error> malformed(size_t offset, const std::string& what) {
  return fail(ErrorCode::kMalformed, "sealed header byte " + std::to_string(offset) + ": " + what);
}

Result<SecretBuffer> x25519_wrap_key(ByteSpan shared, ByteSpan ephemeral_pub, ByteSpan recipient_pub) {
  Bytes salt(ephemeral_pub.begin(), ephemeral_pub.end());
  salt.insert(salt.end(), recipient_pub.begin(), recipient_pub.end());
  return crypto::hkdf(crypto::Hash::kSha256, shared, salt, as_bytes(kInfoX25519), 32);
}

Result<SecretBuffer> dataset_wrap_key(ByteSpan key, std::string_view dataset_id, ByteSpan salt) {
  std::string info(kInfoDatasetPrefix);
  info += dataset_id;
  return crypto::hkdf(crypto::Hash::kSha256, key, salt, as_bytes(info), 32);
}

Result<Bytes> compute_mac(ByteSpan mac_key, ByteSpan header_bytes) {
  if (header_bytes.size() < kHeaderMacSize) return fail(ErrorCode::kMalformed, "header shorter than its MAC");
  return crypto::hmac(crypto::Hash::kSha256, mac_key, header_bytes.first(header_bytes.size() - kHeaderMacSize));
}

}  // namespace

size_t Header::size() const {
  size_t n = kFixedHeaderSize + kHeaderMacSize;
  for (const auto& s : stanzas) {
    n += kStanzaHeadSize;
    if (std::holds_alternative<X25519Stanza>(s)) n += kX25519BodySize;
    if (const auto* d = std::get_if<DatasetStanza>(&s)) n += 1 + d->dataset_id.size() + kDatasetSaltSize + kWrappedKeySize;
    if (const auto* u = std::get_if<UnknownStanza>(&s)) n += u->body.size();
  }
  return n;
}

Result<size_t> header_length(ByteSpan prefix) {
  if (prefix.size() < kMagic.size() || std::memcmp(prefix.data(), kMagic.data(), kMagic.size()) != 0) {
    return fail(ErrorCode::kNotSealed, "not a Tresor sealed file (magic bytes missing)");
  }
  if (prefix.size() < kFixedHeaderSize) {
    return fail(ErrorCode::kTruncated, "sealed header truncated: " + std::to_string(prefix.size()) +
                                           " bytes, the fixed part alone is " + std::to_string(kFixedHeaderSize));
  }
  const auto version = std::to_integer<uint8_t>(prefix[8]);
  if (version != kVersion) {
    return fail(ErrorCode::kUnsupportedVersion,
                "sealed format version " + std::to_string(version) + " is not supported (this build reads version " +
                    std::to_string(kVersion) + "; a newer tresor may read it)");
  }
  const auto flags = std::to_integer<uint8_t>(prefix[9]);
  if (flags != 0) return malformed(9, "flags are " + std::to_string(flags) + ", want 0 in version 1");
  const uint16_t count = load_le16(prefix.data() + 10);
  const uint32_t len = load_le32(prefix.data() + 12);
  if (count == 0 || count > kMaxStanzas) {
    return malformed(10, "stanza count " + std::to_string(count) + " is outside 1.." + std::to_string(kMaxStanzas));
  }
  if (len < kFixedHeaderSize + count * kStanzaHeadSize + kHeaderMacSize || len > kMaxHeaderSize) {
    return malformed(12, "header length " + std::to_string(len) + " is outside " +
                             std::to_string(kFixedHeaderSize + count * kStanzaHeadSize + kHeaderMacSize) + ".." +
                             std::to_string(kMaxHeaderSize));
  }
  return len;
}

Result<Header> parse_header(ByteSpan bytes) {
  auto len = header_length(bytes);
  if (!len) return std::unexpected(len.error());
  if (bytes.size() < *len) {
    return fail(ErrorCode::kTruncated, "sealed header truncated: " + std::to_string(bytes.size()) +
                                           " bytes, header length is " + std::to_string(*len));
  }
  Header h;
  h.version = std::to_integer<uint8_t>(bytes[8]);
  const uint16_t count = load_le16(bytes.data() + 10);
  h.chunk_size = load_le32(bytes.data() + 16);
  if (h.chunk_size < kMinChunkSize || h.chunk_size > kMaxChunkSize || h.chunk_size % 16 != 0) {
    return malformed(16, "chunk size " + std::to_string(h.chunk_size) + " must be a multiple of 16 in " +
                             std::to_string(kMinChunkSize) + ".." + std::to_string(kMaxChunkSize));
  }
  std::memcpy(h.nonce_prefix.data(), bytes.data() + 20, kNoncePrefixSize);
  if (bytes[27] != std::byte{0}) return malformed(27, "reserved byte is not 0");

  const size_t end = *len - kHeaderMacSize;
  size_t off = kFixedHeaderSize;
  for (uint16_t i = 0; i < count; ++i) {
    if (end - off < kStanzaHeadSize) return malformed(off, "stanza " + std::to_string(i) + " runs past the header");
    const auto type = std::to_integer<uint8_t>(bytes[off]);
    const auto sflags = std::to_integer<uint8_t>(bytes[off + 1]);
    const uint16_t body_len = load_le16(bytes.data() + off + 2);
    if (sflags != 0) return malformed(off + 1, "stanza " + std::to_string(i) + " flags are not 0");
    const size_t body_off = off + kStanzaHeadSize;
    if (end - body_off < body_len) {
      return malformed(off + 2, "stanza " + std::to_string(i) + " body of " + std::to_string(body_len) +
                                    " bytes runs past the header");
    }
    ByteSpan body = bytes.subspan(body_off, body_len);
    if (type == static_cast<uint8_t>(StanzaType::kX25519)) {
      if (body_len != kX25519BodySize) {
        return malformed(off + 2, "X25519 stanza body is " + std::to_string(body_len) + " bytes, want 80");
      }
      X25519Stanza s;
      std::memcpy(s.ephemeral.data(), body.data(), 32);
      std::memcpy(s.wrapped.data(), body.data() + 32, kWrappedKeySize);
      h.stanzas.emplace_back(s);
    } else if (type == static_cast<uint8_t>(StanzaType::kDatasetKey)) {
      const size_t id_len = body.empty() ? 0 : std::to_integer<size_t>(body[0]);
      if (body_len != 1 + id_len + kDatasetSaltSize + kWrappedKeySize) {
        return malformed(off + 2, "dataset stanza body is " + std::to_string(body_len) + " bytes, want " +
                                      std::to_string(1 + id_len + kDatasetSaltSize + kWrappedKeySize));
      }
      DatasetStanza s;
      s.dataset_id = to_string(body.subspan(1, id_len));
      if (auto ok = validate_dataset_id(s.dataset_id); !ok) return malformed(body_off + 1, ok.error().message);
      std::memcpy(s.salt.data(), body.data() + 1 + id_len, kDatasetSaltSize);
      std::memcpy(s.wrapped.data(), body.data() + 1 + id_len + kDatasetSaltSize, kWrappedKeySize);
      h.stanzas.emplace_back(std::move(s));
    } else {
      h.stanzas.emplace_back(UnknownStanza{type, Bytes(body.begin(), body.end())});
    }
    off = body_off + body_len;
  }
  if (off != end) {
    return malformed(off, std::to_string(end - off) + " unexplained bytes between the last stanza and the MAC");
  }
  std::memcpy(h.mac.data(), bytes.data() + end, kHeaderMacSize);
  return h;
}

Bytes serialize_header(const Header& h) {
  Bytes out(h.size());
  std::byte* p = out.data();
  std::memcpy(p, kMagic.data(), kMagic.size());
  p[8] = std::byte{h.version};
  p[9] = std::byte{0};
  store_le16(p + 10, static_cast<uint16_t>(h.stanzas.size()));
  store_le32(p + 12, static_cast<uint32_t>(out.size()));
  store_le32(p + 16, h.chunk_size);
  std::memcpy(p + 20, h.nonce_prefix.data(), kNoncePrefixSize);
  p[27] = std::byte{0};
  size_t off = kFixedHeaderSize;
  auto put_head = [&](uint8_t type, size_t body_len) {
    p[off] = std::byte{type};
    p[off + 1] = std::byte{0};
    store_le16(p + off + 2, static_cast<uint16_t>(body_len));
    off += kStanzaHeadSize;
  };
  auto put = [&](ByteSpan b) {
    if (!b.empty()) std::memcpy(p + off, b.data(), b.size());
    off += b.size();
  };
  for (const auto& s : h.stanzas) {
    if (const auto* x = std::get_if<X25519Stanza>(&s)) {
      put_head(static_cast<uint8_t>(StanzaType::kX25519), kX25519BodySize);
      put(x->ephemeral);
      put(x->wrapped);
    } else if (const auto* d = std::get_if<DatasetStanza>(&s)) {
      put_head(static_cast<uint8_t>(StanzaType::kDatasetKey),
               1 + d->dataset_id.size() + kDatasetSaltSize + kWrappedKeySize);
      p[off++] = std::byte(static_cast<uint8_t>(d->dataset_id.size()));
      put(as_bytes(d->dataset_id));
      put(d->salt);
      put(d->wrapped);
    } else {
      const auto& u = std::get<UnknownStanza>(s);
      put_head(u.type, u.body.size());
      put(u.body);
    }
  }
  put(h.mac);
  return out;
}

Result<StreamKeys> derive_stream_keys(ByteSpan file_key, ByteSpan nonce_prefix) {
  auto payload = crypto::hkdf(crypto::Hash::kSha256, file_key, nonce_prefix, as_bytes(kInfoPayload), 32);
  if (!payload) return std::unexpected(payload.error());
  auto mac = crypto::hkdf(crypto::Hash::kSha256, file_key, nonce_prefix, as_bytes(kInfoHeaderMac), 32);
  if (!mac) return std::unexpected(mac.error());
  return StreamKeys{std::move(*payload), std::move(*mac)};
}

std::array<std::byte, crypto::kGcmNonceSize> chunk_nonce(const std::array<std::byte, kNoncePrefixSize>& prefix,
                                                         uint64_t index, bool last) {
  // Callers keep index < 2^32 (writers refuse longer streams, readers reject them): a wrapped
  // counter would repeat chunk 0's nonce.
  if (index >= kMaxChunks) std::abort();
  std::array<std::byte, crypto::kGcmNonceSize> n;
  std::memcpy(n.data(), prefix.data(), kNoncePrefixSize);
  store_be32(n.data() + kNoncePrefixSize, static_cast<uint32_t>(index));
  n[11] = last ? std::byte{1} : std::byte{0};
  return n;
}

size_t detail::header_size(const SealOptions& o) {
  size_t n = kFixedHeaderSize + kHeaderMacSize + o.recipients.size() * (kStanzaHeadSize + kX25519BodySize);
  for (const auto* d : o.datasets) n += kStanzaHeadSize + 1 + d->id.size() + kDatasetSaltSize + kWrappedKeySize;
  return n;
}

Result<void> check_seal_options(const SealOptions& o) {
  if (o.chunk_size < kMinChunkSize || o.chunk_size > kMaxChunkSize || o.chunk_size % 16 != 0) {
    return fail(ErrorCode::kInvalidArgument, "chunk size " + std::to_string(o.chunk_size) +
                                                 " must be a multiple of 16 between " + std::to_string(kMinChunkSize) +
                                                 " and " + std::to_string(kMaxChunkSize) + " bytes");
  }
  if (o.recipients.empty() && o.datasets.empty()) {
    return fail(ErrorCode::kInvalidArgument, "nothing to seal to: give at least one recipient or dataset key");
  }
  if (o.recipients.size() + o.datasets.size() > kMaxStanzas) {
    return fail(ErrorCode::kInvalidArgument, "at most " + std::to_string(kMaxStanzas) + " recipients and dataset keys");
  }
  for (const auto* d : o.datasets) {
    if (d == nullptr || d->key.size() != kDatasetKeySize) {
      return fail(ErrorCode::kInvalidArgument, "dataset key must be 32 bytes");
    }
    TRESOR_TRY(validate_dataset_id(d->id));
  }
  if (const size_t size = detail::header_size(o); size > kMaxHeaderSize) {
    return fail(ErrorCode::kInvalidArgument, "the header for " + std::to_string(o.recipients.size()) +
                                                 " recipients and " + std::to_string(o.datasets.size()) +
                                                 " dataset keys would be " + std::to_string(size) +
                                                 " bytes, over the " + std::to_string(kMaxHeaderSize) + "-byte limit");
  }
  return {};
}

Result<NewHeader> make_header(const SealOptions& o) {
  TRESOR_TRY(check_seal_options(o));
  crypto::RandomSource& rng = o.rng ? *o.rng : crypto::system_random();
  NewHeader nh;
  nh.file_key = SecretBuffer(kFileKeySize);
  TRESOR_TRY(rng.fill(nh.file_key.span()));
  Header& h = nh.header;
  h.chunk_size = o.chunk_size;
  TRESOR_TRY(rng.fill(h.nonce_prefix));

  for (const Recipient& r : o.recipients) {
    SecretBuffer eph_secret(32);
    TRESOR_TRY(rng.fill(eph_secret.span()));
    auto eph = crypto::Key::from_private(crypto::KeyType::kX25519, eph_secret.span());
    if (!eph) return std::unexpected(eph.error());
    auto eph_pub = eph->public_raw();
    if (!eph_pub) return std::unexpected(eph_pub.error());
    auto peer = crypto::Key::from_public(crypto::KeyType::kX25519, r.x25519);
    if (!peer) return std::unexpected(peer.error());
    auto shared = crypto::derive_shared(*eph, *peer);
    if (!shared) return fail(ErrorCode::kInvalidArgument, "recipient " + r.to_string() + ": " + shared.error().message);
    auto wrap = x25519_wrap_key(shared->span(), *eph_pub, r.x25519);
    if (!wrap) return std::unexpected(wrap.error());
    auto wrapped = crypto::aes256gcm_seal(wrap->span(), kZeroNonce, {}, nh.file_key.span());
    if (!wrapped) return std::unexpected(wrapped.error());
    X25519Stanza s;
    std::memcpy(s.ephemeral.data(), eph_pub->data(), 32);
    std::memcpy(s.wrapped.data(), wrapped->data(), kWrappedKeySize);
    h.stanzas.emplace_back(s);
  }
  for (const DatasetKey* d : o.datasets) {
    DatasetStanza s;
    s.dataset_id = d->id;
    TRESOR_TRY(rng.fill(s.salt));
    auto wrap = dataset_wrap_key(d->key.span(), d->id, s.salt);
    if (!wrap) return std::unexpected(wrap.error());
    auto wrapped = crypto::aes256gcm_seal(wrap->span(), kZeroNonce, {}, nh.file_key.span());
    if (!wrapped) return std::unexpected(wrapped.error());
    std::memcpy(s.wrapped.data(), wrapped->data(), kWrappedKeySize);
    h.stanzas.emplace_back(std::move(s));
  }

  nh.bytes = serialize_header(h);
  auto keys = derive_stream_keys(nh.file_key.span(), h.nonce_prefix);
  if (!keys) return std::unexpected(keys.error());
  auto mac = compute_mac(keys->mac_key.span(), nh.bytes);
  if (!mac) return std::unexpected(mac.error());
  std::memcpy(h.mac.data(), mac->data(), kHeaderMacSize);
  std::memcpy(nh.bytes.data() + nh.bytes.size() - kHeaderMacSize, mac->data(), kHeaderMacSize);
  return nh;
}

Result<SecretBuffer> unlock(const Header& h, ByteSpan header_bytes, const KeyRing& keys, const std::string& name) {
  std::optional<SecretBuffer> file_key;
  size_t n_x25519 = 0;
  std::string datasets;
  for (const auto& s : h.stanzas) {
    if (file_key) break;
    if (const auto* x = std::get_if<X25519Stanza>(&s)) {
      ++n_x25519;
      auto eph = crypto::Key::from_public(crypto::KeyType::kX25519, x->ephemeral);
      if (!eph) continue;
      for (const Identity* id : keys.identities) {
        auto own = crypto::Key::from_private(crypto::KeyType::kX25519, id->x25519_secret());
        if (!own) return std::unexpected(own.error());
        auto shared = crypto::derive_shared(*own, *eph);
        if (!shared) continue;  // low-order ephemeral: this stanza opens for nobody
        auto wrap = x25519_wrap_key(shared->span(), x->ephemeral, id->recipient().x25519);
        if (!wrap) return std::unexpected(wrap.error());
        auto fk = crypto::aes256gcm_open(wrap->span(), kZeroNonce, {}, x->wrapped);
        if (fk) {
          file_key = std::move(*fk);
          break;
        }
        if (fk.error().code != ErrorCode::kAuth) return std::unexpected(fk.error());
      }
    } else if (const auto* d = std::get_if<DatasetStanza>(&s)) {
      datasets += (datasets.empty() ? "" : ", ") + d->dataset_id;
      for (const DatasetKey* k : keys.dataset_keys) {
        if (!k->id.empty() && k->id != d->dataset_id) continue;
        auto wrap = dataset_wrap_key(k->key.span(), d->dataset_id, d->salt);
        if (!wrap) return std::unexpected(wrap.error());
        auto fk = crypto::aes256gcm_open(wrap->span(), kZeroNonce, {}, d->wrapped);
        if (fk) {
          file_key = std::move(*fk);
          break;
        }
        if (fk.error().code != ErrorCode::kAuth) return std::unexpected(fk.error());
      }
    }
  }
  // A file key handed out for this very file (FileKeys): found by the header's MAC, and used only
  // once the MAC below verifies with it.
  size_t n_file_keys = 0;
  for (const FileKeys* fks : keys.file_keys) {
    n_file_keys += fks->size();
    if (file_key) continue;
    if (const SecretBuffer* fk = fks->find(h.mac)) file_key = fk->clone();
  }
  if (!file_key) {
    std::string sealed_to = std::to_string(n_x25519) + " user recipient(s)";
    if (!datasets.empty()) sealed_to += " and dataset(s) " + datasets;
    std::string given = std::to_string(keys.identities.size()) + " identity(ies) and " + std::to_string(keys.dataset_keys.size()) + " dataset key(s)";
    if (!keys.file_keys.empty()) given += " and " + std::to_string(n_file_keys) + " file key(s), none for this file,";
    return fail(ErrorCode::kNoMatchingKey, name + ": no stanza opens with the " + given + " given; the file is sealed to " + sealed_to +
                                               " (wrong identity or key, or an altered header)");
  }
  auto sk = derive_stream_keys(file_key->span(), h.nonce_prefix);
  if (!sk) return std::unexpected(sk.error());
  auto mac = compute_mac(sk->mac_key.span(), header_bytes);
  if (!mac) return std::unexpected(mac.error());
  if (!crypto::ct_equal(*mac, h.mac)) {
    return fail(ErrorCode::kHeaderAuth, name + ": header MAC does not verify: the header was altered");
  }
  return std::move(*file_key);
}

}  // namespace tresor::sealed
