#include "tresor/identity.h"

#include <cstring>
#include <sstream>

namespace tresor {
namespace {

constexpr size_t kChecksumSize = 4;

// Checksums catch typos in copied strings; they are not a security mechanism (the keys are).
Result<std::array<std::byte, kChecksumSize>> checksum(std::string_view domain, ByteSpan body) {
  Bytes in = to_bytes(domain);
  in.insert(in.end(), body.begin(), body.end());
  auto h = crypto::sha256(in);
  secure_wipe(in);
  if (!h) return std::unexpected(h.error());
  std::array<std::byte, kChecksumSize> out;
  std::memcpy(out.data(), h->data(), kChecksumSize);
  return out;
}

constexpr std::string_view kRecipientDomain = "tresor recipient v1";
constexpr std::string_view kIdentityDomain = "tresor identity v1";

// Lines of a key file without comments and surrounding blanks.
std::vector<std::string_view> content_lines(std::string_view text) {
  std::vector<std::string_view> out;
  size_t pos = 0;
  while (pos <= text.size()) {
    size_t end = text.find('\n', pos);
    if (end == std::string_view::npos) end = text.size();
    std::string_view line = text.substr(pos, end - pos);
    while (!line.empty() && (line.back() == '\r' || line.back() == ' ' || line.back() == '\t')) line.remove_suffix(1);
    while (!line.empty() && (line.front() == ' ' || line.front() == '\t')) line.remove_prefix(1);
    if (!line.empty() && line.front() != '#') out.push_back(line);
    pos = end + 1;
  }
  return out;
}

}  // namespace

std::string Recipient::to_string() const {
  Bytes body(x25519.begin(), x25519.end());
  body.insert(body.end(), ed25519.begin(), ed25519.end());
  auto sum = checksum(kRecipientDomain, body);
  // sha256 over a small buffer only fails if OpenSSL is broken; an empty checksum then fails parse.
  if (sum) body.insert(body.end(), sum->begin(), sum->end());
  return std::string(kRecipientPrefix) + base32_encode(body);
}

Result<Recipient> Recipient::parse(std::string_view text) {
  if (!text.starts_with(kRecipientPrefix)) {
    return fail(ErrorCode::kInvalidArgument,
                "recipient '" + std::string(text.substr(0, 16)) + "' does not start with \"tresor1\"");
  }
  auto body = base32_decode(text.substr(kRecipientPrefix.size()), "recipient");
  if (!body) return std::unexpected(body.error());
  if (body->size() != 64 + kChecksumSize) {
    return fail(ErrorCode::kInvalidArgument, "recipient decodes to " + std::to_string(body->size()) +
                                                 " bytes, want 68 (is it complete?)");
  }
  auto sum = checksum(kRecipientDomain, ByteSpan(*body).first(64));
  if (!sum) return std::unexpected(sum.error());
  if (!crypto::ct_equal(*sum, ByteSpan(*body).subspan(64))) {
    return fail(ErrorCode::kInvalidArgument, "recipient checksum mismatch: the string was mistyped or cut");
  }
  Recipient r;
  std::memcpy(r.x25519.data(), body->data(), 32);
  std::memcpy(r.ed25519.data(), body->data() + 32, 32);
  // Reject keys OpenSSL will not accept, at parse time rather than at seal time.
  if (auto k = crypto::Key::from_public(crypto::KeyType::kEd25519, r.ed25519); !k) {
    return fail(ErrorCode::kInvalidArgument, "recipient signing key is invalid: " + k.error().message);
  }
  return r;
}

Result<Identity> Identity::from_secrets(ByteSpan x25519, ByteSpan ed25519_seed) {
  auto xk = crypto::Key::from_private(crypto::KeyType::kX25519, x25519);
  if (!xk) return std::unexpected(xk.error());
  auto ek = crypto::Key::from_private(crypto::KeyType::kEd25519, ed25519_seed);
  if (!ek) return std::unexpected(ek.error());
  auto xp = xk->public_raw();
  if (!xp) return std::unexpected(xp.error());
  auto ep = ek->public_raw();
  if (!ep) return std::unexpected(ep.error());
  Identity id;
  id.x25519_ = SecretBuffer::copy_of(x25519);
  id.ed25519_ = SecretBuffer::copy_of(ed25519_seed);
  std::memcpy(id.recipient_.x25519.data(), xp->data(), 32);
  std::memcpy(id.recipient_.ed25519.data(), ep->data(), 32);
  return id;
}

Result<Identity> Identity::generate(crypto::RandomSource& rng) {
  SecretBuffer secrets(64);
  TRESOR_TRY(rng.fill(secrets.span()));
  return from_secrets(secrets.span().first(32), secrets.span().subspan(32));
}

Result<Identity> Identity::parse(std::string_view file_text) {
  const auto lines = content_lines(file_text);
  if (lines.size() != 1) {
    return fail(ErrorCode::kInvalidArgument,
                "identity file must hold exactly one " + std::string(kIdentityPrefix) + " line, found " +
                    std::to_string(lines.size()) + " non-comment lines");
  }
  std::string_view line = lines[0];
  if (!line.starts_with(kIdentityPrefix)) {
    return fail(ErrorCode::kInvalidArgument,
                "identity line does not start with " + std::string(kIdentityPrefix) +
                    (line.starts_with(kRecipientPrefix) ? " (this is a public recipient, not an identity)" : ""));
  }
  auto body = base32_decode(line.substr(kIdentityPrefix.size()), "identity");
  if (!body) return std::unexpected(body.error());
  SecretBuffer secret = SecretBuffer::copy_of(*body);
  secure_wipe(*body);
  if (secret.size() != 64 + kChecksumSize) {
    return fail(ErrorCode::kInvalidArgument,
                "identity decodes to " + std::to_string(secret.size()) + " bytes, want 68");
  }
  auto sum = checksum(kIdentityDomain, secret.span().first(64));
  if (!sum) return std::unexpected(sum.error());
  if (!crypto::ct_equal(*sum, secret.span().subspan(64))) {
    return fail(ErrorCode::kInvalidArgument, "identity checksum mismatch: the file is damaged");
  }
  return from_secrets(secret.span().first(32), secret.span().subspan(32, 32));
}

std::string Identity::to_file_text() const {
  SecretBuffer body(64 + kChecksumSize);
  std::memcpy(body.data(), x25519_.data(), 32);
  std::memcpy(body.data() + 32, ed25519_.data(), 32);
  auto sum = checksum(kIdentityDomain, body.span().first(64));
  if (sum) std::memcpy(body.data() + 64, sum->data(), kChecksumSize);
  std::string key = base32_encode(body.span());
  for (auto& c : key) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  std::string out = "# Tresor identity. SECRET: whoever holds this file can open what is sealed to it.\n"
                    "# recipient: " + recipient_.to_string() + "\n" +
                    std::string(kIdentityPrefix) + key + "\n";
  secure_wipe(MutableByteSpan(reinterpret_cast<std::byte*>(key.data()), key.size()));
  return out;
}

Result<void> validate_dataset_id(std::string_view id) {
  if (id.empty() || id.size() > kMaxDatasetIdLength) {
    return fail(ErrorCode::kInvalidArgument, "dataset id '" + std::string(id) + "' must be 1.." +
                                                 std::to_string(kMaxDatasetIdLength) + " characters");
  }
  for (size_t i = 0; i < id.size(); ++i) {
    const char c = id[i];
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                    c == '.' || c == '_' || c == '-' || c == '/';
    if (!ok) {
      return fail(ErrorCode::kInvalidArgument, "dataset id '" + std::string(id) +
                                                   "' has a character outside [A-Za-z0-9._/-] at position " +
                                                   std::to_string(i));
    }
  }
  if (id.front() == '/' || id.front() == '.' || id.front() == '-' || id.back() == '/' ||
      id.find("//") != std::string_view::npos || id.find("/.") != std::string_view::npos) {
    return fail(ErrorCode::kInvalidArgument,
                "dataset id '" + std::string(id) +
                    "' must not start with '/', '.' or '-', end with '/', or have empty or dot-led segments");
  }
  return {};
}

Result<DatasetKey> DatasetKey::generate(std::string id, crypto::RandomSource& rng) {
  TRESOR_TRY(validate_dataset_id(id));
  DatasetKey k{std::move(id), SecretBuffer(kDatasetKeySize)};
  TRESOR_TRY(rng.fill(k.key.span()));
  return k;
}

Result<DatasetKey> DatasetKey::parse(std::string id, std::string_view file_text) {
  TRESOR_TRY(validate_dataset_id(id));
  const auto lines = content_lines(file_text);
  if (lines.size() != 1 || lines[0].size() != 2 * kDatasetKeySize) {
    return fail(ErrorCode::kInvalidArgument,
                "dataset key file must hold one line of 64 hex digits (a 32-byte key)");
  }
  auto raw = from_hex(lines[0], "dataset key");
  if (!raw) return std::unexpected(raw.error());
  DatasetKey k{std::move(id), SecretBuffer::copy_of(*raw)};
  secure_wipe(*raw);
  return k;
}

std::string DatasetKey::to_file_text() const {
  return "# Tresor dataset key for '" + id + "'. SECRET: hand it only to the key broker.\n" +
         to_hex(key.span()) + "\n";
}

}  // namespace tresor
