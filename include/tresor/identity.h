// tresor/identity.h — user identities, their public recipient strings, and dataset keys.
//
// A user identity is two secrets: an X25519 key that sealed files are wrapped to, and an Ed25519
// key that signs the user's grants and job manifests. Its public half is the recipient string
// "tresor1…" (docs/formats.md §9–§11). A dataset key is a 32-byte symmetric key named by a
// dataset id; the key broker holds it and releases it only to attested jobs.
#pragma once

#include <array>
#include <string>
#include <string_view>

#include "tresor/crypto.h"
#include "tresor/encoding.h"
#include "tresor/error.h"
#include "tresor/secret.h"

namespace tresor {

inline constexpr std::string_view kRecipientPrefix = "tresor1";
inline constexpr std::string_view kIdentityPrefix = "TRESOR-SECRET-KEY-1";
inline constexpr size_t kDatasetKeySize = 32;
inline constexpr size_t kMaxDatasetIdLength = 128;

/// Recipient is the public half of an identity: what others seal to and verify signatures with.
struct Recipient {
  std::array<std::byte, 32> x25519{};
  std::array<std::byte, 32> ed25519{};

  /// "tresor1" + base32(x25519 ‖ ed25519 ‖ 4-byte checksum).
  std::string to_string() const;
  /// Parses a recipient string; the error says whether the prefix, the encoding, the length or
  /// the checksum (a typo) is wrong.
  static Result<Recipient> parse(std::string_view text);

  bool operator==(const Recipient&) const = default;
};

/// Identity owns a user's two private keys. Not copyable; the key bytes wipe themselves.
class Identity {
 public:
  /// Creates a new identity from `rng` (the CSPRNG unless a test injects a deterministic source).
  static Result<Identity> generate(crypto::RandomSource& rng = crypto::system_random());
  /// Parses the text of an identity file: '#' comment lines, blank lines, and exactly one
  /// TRESOR-SECRET-KEY-1… line. Pure: the caller reads the file and checks its permissions.
  static Result<Identity> parse(std::string_view file_text);
  /// The identity file text (comment with the recipient, then the secret key line).
  std::string to_file_text() const;

  const Recipient& recipient() const { return recipient_; }
  ByteSpan x25519_secret() const { return x25519_.span(); }
  ByteSpan ed25519_seed() const { return ed25519_.span(); }

 private:
  static Result<Identity> from_secrets(ByteSpan x25519, ByteSpan ed25519_seed);
  SecretBuffer x25519_;
  SecretBuffer ed25519_;
  Recipient recipient_;
};

/// Checks a dataset id: 1..128 characters of [A-Za-z0-9._/-], not starting with '/', '.' or '-',
/// no empty segment and no segment starting with '.' ("dhz/ccta-2024").
Result<void> validate_dataset_id(std::string_view id);

/// DatasetKey is a 32-byte symmetric key with the id of the dataset it protects.
struct DatasetKey {
  std::string id;
  SecretBuffer key;

  /// Creates a fresh random key for dataset `id`.
  static Result<DatasetKey> generate(std::string id, crypto::RandomSource& rng = crypto::system_random());
  /// Parses a dataset key file: '#' comments and one line of 64 hex digits.
  static Result<DatasetKey> parse(std::string id, std::string_view file_text);
  /// The key file text (a comment naming the dataset, then the hex key).
  std::string to_file_text() const;
};

}  // namespace tresor
