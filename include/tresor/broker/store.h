// tresor/broker/store.h — the broker's durable state in SQLite (DESIGN.md, "Broker state"):
// datasets and their versioned data keys (sealed at rest by the master key), per-dataset policy
// documents, users with their registered public identities, grants, and the hash-chained audit
// log. One file, WAL journal, synchronous=FULL: a write that returned success survives a crash
// of the process or the machine. docs/broker.md describes backup and restore.
//
// Data keys at rest: AES-256-GCM under the 32-byte master key, 12-byte random nonce, AAD
// "tresor-broker/v1/dataset-key:<dataset>:<version>", so a wrapped key moved to another row,
// dataset or version does not open. The master key never touches the database file.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "tresor/audit.h"
#include "tresor/error.h"
#include "tresor/identity.h"
#include "tresor/secret.h"

namespace tresor::broker {

inline constexpr size_t kMasterKeySize = 32;
inline constexpr size_t kDataKeySize = 32;
/// The schema this build writes (PRAGMA user_version). A newer file is refused, not guessed at.
inline constexpr int kSchemaVersion = 2;  // 2: groups (a version 1 store is migrated on open)

// Dataset ids follow the sealed format's rule (formats.md §3.2, tresor::validate_dataset_id in
// identity.h), so every id a data owner can seal under can be registered, and no other.
/// User names: [a-z_][a-z0-9_.-]* (POSIX-like login names), ≤ 64 chars.
[[nodiscard]] Result<void> validate_user_name(std::string_view name);

struct DataKey {
  uint32_t version = 0;
  SecretBuffer key;  // kDataKeySize bytes
};

struct User {
  std::string name;
  std::string identity;  // the user's recipient string (`tresor pubkey`)
  bool revoked = false;
  int64_t created = 0;
};

class Store {
 public:
  /// Opens (creating if absent) the store at `path` with the master key that seals its data keys.
  /// kInvalidArgument for a master key of the wrong size; kUnsupportedVersion for a schema newer
  /// than this build; kIo when SQLite cannot open or set up the file.
  [[nodiscard]] static Result<Store> open(const std::string& path, ByteSpan master_key);
  Store(Store&&) noexcept;
  Store& operator=(Store&&) noexcept;
  ~Store();

  // ---- datasets and keys ----
  /// kExists when the dataset is already registered.
  [[nodiscard]] Result<void> add_dataset(std::string_view id);
  [[nodiscard]] Result<std::vector<std::string>> datasets() const;
  [[nodiscard]] Result<bool> has_dataset(std::string_view id) const;
  /// Stores `key` as the dataset's next version (1 for the first) and returns that version.
  [[nodiscard]] Result<uint32_t> add_key(std::string_view dataset, ByteSpan key);
  /// The newest version's key. kNoMatchingKey when the dataset has none; kAuth when the wrapped
  /// key does not open (wrong master key, or the row was moved or altered).
  [[nodiscard]] Result<DataKey> current_key(std::string_view dataset) const;
  [[nodiscard]] Result<DataKey> key(std::string_view dataset, uint32_t version) const;
  [[nodiscard]] Result<std::vector<uint32_t>> key_versions(std::string_view dataset) const;

  // ---- policy ----
  /// Stores the dataset's policy document (JSON text, validated by the caller's policy parser).
  [[nodiscard]] Result<void> set_policy(std::string_view dataset, std::string_view policy_json);
  /// std::nullopt when the dataset has no policy (which the broker treats as deny).
  [[nodiscard]] Result<std::optional<std::string>> policy(std::string_view dataset) const;

  // ---- users and grants ----
  /// kExists when the name or the identity is taken (revoked users keep both: never reused).
  [[nodiscard]] Result<void> add_user(std::string_view name, std::string_view identity);
  [[nodiscard]] Result<void> revoke_user(std::string_view name);
  [[nodiscard]] Result<std::optional<User>> user(std::string_view name) const;
  /// The user registered with this recipient string (identities are unique), if any.
  [[nodiscard]] Result<std::optional<User>> user_by_identity(std::string_view identity) const;
  [[nodiscard]] Result<void> grant(std::string_view user, std::string_view dataset);
  [[nodiscard]] Result<void> revoke_grant(std::string_view user, std::string_view dataset);
  [[nodiscard]] Result<bool> has_grant(std::string_view user, std::string_view dataset) const;
  /// Groups of users (names follow the user-name rule), for dataset policies that admit groups.
  [[nodiscard]] Result<void> add_to_group(std::string_view group, std::string_view user);
  [[nodiscard]] Result<void> remove_from_group(std::string_view group, std::string_view user);
  [[nodiscard]] Result<std::vector<std::string>> groups_of(std::string_view user) const;

  // ---- backup ----
  /// Writes a consistent snapshot of the whole store to `dest` (which must not exist) while the
  /// store stays in use (SQLite VACUUM INTO). The snapshot needs the same master key to open its
  /// data keys; back that key up separately (docs/broker.md). kExists when `dest` exists.
  [[nodiscard]] Result<void> backup(const std::string& dest) const;

  // ---- audit ----
  /// Chains `record` after the last stored one and appends it in one transaction; returns it
  /// with seq, prev_hash and hash filled in.
  [[nodiscard]] Result<audit::Record> append_audit(audit::Record record);
  /// Appends several records in order in one transaction (one fsync: the broker's group commit).
  /// All or none are stored.
  [[nodiscard]] Result<std::vector<audit::Record>> append_audit_batch(std::vector<audit::Record> records);
  /// Every record in seq order (for `tresor admin audit show/verify`).
  [[nodiscard]] Result<std::vector<audit::Record>> audit_records() const;

 private:
  struct Impl;
  explicit Store(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace tresor::broker
