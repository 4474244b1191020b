#include "tresor/broker/store.h"

#include <sqlite3.h>

#include <ctime>
#include <filesystem>
#include <mutex>
#include <unordered_map>

#include "tresor/crypto.h"

namespace tresor::broker {
namespace {

constexpr size_t kNonceSize = 12;
constexpr size_t kTagSize = 16;

// Schema version 1. Every table is STRICT so a value of the wrong type is an error, not a
// silent conversion. The audit table keeps each record's canonical JSON as written; seq and
// hash are copies for ordering and quick lookup, checked against the JSON on every read.
constexpr const char* kSchema = R"sql(
CREATE TABLE datasets (
  id      TEXT PRIMARY KEY,
  created INTEGER NOT NULL
) STRICT;
CREATE TABLE dataset_keys (
  dataset TEXT NOT NULL REFERENCES datasets(id),
  version INTEGER NOT NULL CHECK (version >= 1),
  wrapped BLOB NOT NULL,
  created INTEGER NOT NULL,
  PRIMARY KEY (dataset, version)
) STRICT;
CREATE TABLE policies (
  dataset TEXT PRIMARY KEY REFERENCES datasets(id),
  policy  TEXT NOT NULL,
  updated INTEGER NOT NULL
) STRICT;
CREATE TABLE users (
  name     TEXT PRIMARY KEY,
  identity TEXT NOT NULL UNIQUE,
  revoked  INTEGER NOT NULL DEFAULT 0 CHECK (revoked IN (0, 1)),
  created  INTEGER NOT NULL
) STRICT;
CREATE TABLE grants (
  user    TEXT NOT NULL REFERENCES users(name),
  dataset TEXT NOT NULL REFERENCES datasets(id),
  created INTEGER NOT NULL,
  PRIMARY KEY (user, dataset)
) STRICT;
CREATE TABLE audit (
  seq    INTEGER PRIMARY KEY CHECK (seq >= 1),
  hash   TEXT NOT NULL,
  record TEXT NOT NULL
) STRICT;
)sql";

// Schema version 2 adds groups of users (a dataset policy may admit groups). A version 1 store is
// migrated by this statement in the same transaction that sets the new version.
constexpr const char* kSchemaV2 = R"sql(
CREATE TABLE group_members (
  grp     TEXT NOT NULL,
  user    TEXT NOT NULL REFERENCES users(name),
  created INTEGER NOT NULL,
  PRIMARY KEY (grp, user)
) STRICT;
)sql";

int64_t now() { return static_cast<int64_t>(std::time(nullptr)); }

// A login-name-like token: [a-z0-9_][a-z0-9._-]*.
bool valid_name(std::string_view s) {
  if (s.empty()) return false;
  auto lower_digit = [](char c) { return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9'); };
  if (!(lower_digit(s[0]) || s[0] == '_')) return false;
  for (char c : s) {
    if (!(lower_digit(c) || c == '.' || c == '_' || c == '-')) return false;
  }
  return true;
}

std::string aad_for(std::string_view dataset, uint32_t version) {
  return "tresor-broker/v1/dataset-key:" + std::string(dataset) + ":" + std::to_string(version);
}

// ---- thin RAII over the SQLite C API ----

struct DbCloser {
  void operator()(sqlite3* db) const { sqlite3_close_v2(db); }
};
using Db = std::unique_ptr<sqlite3, DbCloser>;

// Prepared statements kept for reuse, keyed by the address of their SQL text (each call site's
// literal): preparing costs more than running most of the broker's queries. Used under the
// store's mutex only.
class StmtCache {
 public:
  explicit StmtCache(sqlite3* db) : db_(db) {}
  ~StmtCache() {
    for (auto& [sql, stmt] : free_) sqlite3_finalize(stmt);
  }
  StmtCache(const StmtCache&) = delete;
  StmtCache& operator=(const StmtCache&) = delete;
  sqlite3* db() const { return db_; }
  sqlite3_stmt* take(const char* sql, int* rc) {
    if (auto it = free_.find(sql); it != free_.end()) {
      sqlite3_stmt* stmt = it->second;
      free_.erase(it);
      *rc = SQLITE_OK;
      return stmt;
    }
    sqlite3_stmt* stmt = nullptr;
    *rc = sqlite3_prepare_v3(db_, sql, -1, SQLITE_PREPARE_PERSISTENT, &stmt, nullptr);
    return stmt;
  }
  void give_back(const char* sql, sqlite3_stmt* stmt) {
    sqlite3_reset(stmt);
    sqlite3_clear_bindings(stmt);
    if (!free_.emplace(sql, stmt).second) sqlite3_finalize(stmt);
  }

 private:
  sqlite3* db_;
  std::unordered_map<const char*, sqlite3_stmt*> free_;
};

class Stmt {
 public:
  Stmt(sqlite3* db, const char* sql) : db_(db) {
    rc_ = sqlite3_prepare_v2(db, sql, -1, &stmt_, nullptr);
  }
  Stmt(StmtCache& cache, const char* sql) : db_(cache.db()), cache_(&cache), sql_(sql) {
    stmt_ = cache.take(sql, &rc_);
  }
  ~Stmt() {
    if (cache_ != nullptr && rc_ == SQLITE_OK && stmt_ != nullptr) cache_->give_back(sql_, stmt_);
    else sqlite3_finalize(stmt_);
  }
  Stmt(const Stmt&) = delete;
  Stmt& operator=(const Stmt&) = delete;

  Result<void> ok(std::string_view what) const {
    if (rc_ != SQLITE_OK) return fail(ErrorCode::kIo, std::string(what) + ": " + sqlite3_errmsg(db_));
    return {};
  }
  Stmt& bind(int i, std::string_view text) {
    if (rc_ == SQLITE_OK) rc_ = sqlite3_bind_text(stmt_, i, text.data(), static_cast<int>(text.size()), SQLITE_TRANSIENT);
    return *this;
  }
  Stmt& bind(int i, int64_t v) {
    if (rc_ == SQLITE_OK) rc_ = sqlite3_bind_int64(stmt_, i, v);
    return *this;
  }
  Stmt& bind_blob(int i, ByteSpan b) {
    if (rc_ == SQLITE_OK) rc_ = sqlite3_bind_blob(stmt_, i, b.data(), static_cast<int>(b.size()), SQLITE_TRANSIENT);
    return *this;
  }
  /// Makes the statement ready to run again with new bindings.
  void reset() {
    if (rc_ == SQLITE_OK) {
      sqlite3_reset(stmt_);
      sqlite3_clear_bindings(stmt_);
    }
  }
  /// One step: true when a row is available, false when done.
  Result<bool> step(std::string_view what) {
    if (auto r = ok(what); !r) return std::unexpected(r.error());
    const int rc = sqlite3_step(stmt_);
    if (rc == SQLITE_ROW) return true;
    if (rc == SQLITE_DONE) return false;
    const ErrorCode code = (rc & 0xff) == SQLITE_CONSTRAINT ? ErrorCode::kExists : ErrorCode::kIo;
    return fail(code, std::string(what) + ": " + sqlite3_errmsg(db_));
  }
  /// Steps through every row, calling `on_row()` (which returns Result<void>) for each.
  template <typename F>
  Result<void> each_row(std::string_view what, F&& on_row) {
    for (;;) {
      auto row = step(what);
      if (!row) return std::unexpected(row.error());
      if (!*row) return {};
      if (auto r = on_row(); !r) return r;
    }
  }
  Result<void> run(std::string_view what) {
    auto r = step(what);
    if (!r) return std::unexpected(r.error());
    return {};
  }
  int64_t int_at(int col) const { return sqlite3_column_int64(stmt_, col); }
  std::string text_at(int col) const {
    const auto* p = reinterpret_cast<const char*>(sqlite3_column_text(stmt_, col));
    return p ? std::string(p, static_cast<size_t>(sqlite3_column_bytes(stmt_, col))) : std::string();
  }
  Bytes blob_at(int col) const {
    const auto* p = static_cast<const std::byte*>(sqlite3_column_blob(stmt_, col));
    const auto n = static_cast<size_t>(sqlite3_column_bytes(stmt_, col));
    return p ? Bytes(p, p + n) : Bytes();
  }

 private:
  sqlite3* db_;
  StmtCache* cache_ = nullptr;
  const char* sql_ = nullptr;
  sqlite3_stmt* stmt_ = nullptr;
  int rc_;
};

Result<void> exec(sqlite3* db, const char* sql, std::string_view what) {
  char* err = nullptr;
  if (sqlite3_exec(db, sql, nullptr, nullptr, &err) != SQLITE_OK) {
    std::string msg = std::string(what) + ": " + (err ? err : sqlite3_errmsg(db));
    sqlite3_free(err);
    return fail(ErrorCode::kIo, msg);
  }
  return {};
}

// A write transaction: BEGIN IMMEDIATE takes the write lock at once (no upgrade deadlocks);
// rolled back unless commit() succeeded.
class Transaction {
 public:
  explicit Transaction(sqlite3* db, StmtCache* cache = nullptr) : db_(db), cache_(cache) {}
  Result<void> begin() {
    if (auto r = run("BEGIN IMMEDIATE", "begin transaction"); !r) return r;
    open_ = true;
    return {};
  }
  Result<void> commit() {
    if (auto r = run("COMMIT", "commit"); !r) return r;
    open_ = false;
    return {};
  }
  ~Transaction() {
    if (open_) sqlite3_exec(db_, "ROLLBACK", nullptr, nullptr, nullptr);
  }

 private:
  Result<void> run(const char* sql, std::string_view what) {
    if (cache_ == nullptr) return exec(db_, sql, what);
    Stmt s(*cache_, sql);
    return s.run(what);
  }
  sqlite3* db_;
  StmtCache* cache_;
  bool open_ = false;
};

}  // namespace

Result<void> validate_user_name(std::string_view name) {
  if (name.size() > 64 || !valid_name(name)) {
    return fail(ErrorCode::kInvalidArgument,
                "user name '" + std::string(name.substr(0, 64)) +
                    "' is not a login name (lowercase letters, digits, '.', '_', '-', starting with a letter, digit or '_'; at most 64 characters)");
  }
  return {};
}

struct Store::Impl {
  explicit Impl(Db d) : db(std::move(d)), stmts(db.get()) {}
  Db db;
  mutable StmtCache stmts;  // destroyed before db closes
  SecretBuffer master;
  mutable std::mutex mu;  // one connection, used by one thread at a time

  Result<bool> dataset_exists(std::string_view id) const {
    Stmt s(stmts, "SELECT 1 FROM datasets WHERE id = ?1");
    s.bind(1, id);
    return s.step("look up dataset");
  }
  Result<void> require_dataset(std::string_view id) const {
    if (auto v = validate_dataset_id(id); !v) return v;
    auto e = dataset_exists(id);
    if (!e) return std::unexpected(e.error());
    if (!*e) return fail(ErrorCode::kInvalidArgument, "unknown dataset '" + std::string(id) + "'");
    return {};
  }
  Result<void> require_user(std::string_view name) const {
    if (auto v = validate_user_name(name); !v) return v;
    Stmt s(stmts, "SELECT 1 FROM users WHERE name = ?1");
    s.bind(1, name);
    auto e = s.step("look up user");
    if (!e) return std::unexpected(e.error());
    if (!*e) return fail(ErrorCode::kInvalidArgument, "unknown user '" + std::string(name) + "'");
    return {};
  }
  Result<DataKey> unwrap(std::string_view dataset, uint32_t version, const Bytes& wrapped) const {
    if (wrapped.size() != kNonceSize + kDataKeySize + kTagSize) {
      return fail(ErrorCode::kMalformed, "stored key " + std::string(dataset) + " version " +
                                             std::to_string(version) + " has the wrong size");
    }
    const std::string aad = aad_for(dataset, version);
    auto key = crypto::aes256gcm_open(master.span(), ByteSpan(wrapped).first(kNonceSize), as_bytes(aad),
                                      ByteSpan(wrapped).subspan(kNonceSize));
    if (!key) {
      if (key.error().code != ErrorCode::kAuth) return std::unexpected(key.error());
      return fail(ErrorCode::kAuth, "stored key " + std::string(dataset) + " version " + std::to_string(version) +
                                        " does not open: wrong master key, or the row was altered or moved");
    }
    return DataKey{version, std::move(*key)};
  }
};

Store::Store(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Store::Store(Store&&) noexcept = default;
Store& Store::operator=(Store&&) noexcept = default;
Store::~Store() = default;

Result<Store> Store::open(const std::string& path, ByteSpan master_key) {
  if (master_key.size() != kMasterKeySize) {
    return fail(ErrorCode::kInvalidArgument, "master key must be " + std::to_string(kMasterKeySize) +
                                                 " bytes, got " + std::to_string(master_key.size()));
  }
  sqlite3* raw = nullptr;
  const int rc = sqlite3_open_v2(path.c_str(), &raw, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_FULLMUTEX,
                                 nullptr);
  Db db(raw);
  if (rc != SQLITE_OK) {
    return fail(ErrorCode::kIo, "open broker store " + path + ": " + (raw ? sqlite3_errmsg(raw) : sqlite3_errstr(rc)));
  }
  sqlite3_extended_result_codes(db.get(), 1);
  sqlite3_busy_timeout(db.get(), 5000);
  // WAL + synchronous=FULL: every commit is fsynced before it returns (issue 4, DESIGN.md).
  for (const char* pragma : {"PRAGMA journal_mode=WAL", "PRAGMA synchronous=FULL", "PRAGMA foreign_keys=ON",
                             "PRAGMA secure_delete=ON"}) {
    if (auto r = exec(db.get(), pragma, std::string("broker store ") + path); !r) return std::unexpected(r.error());
  }
  {
    Stmt mode(db.get(), "PRAGMA journal_mode");
    auto row = mode.step("read journal mode");
    if (!row) return std::unexpected(row.error());
    if (!*row || mode.text_at(0) != "wal") {
      return fail(ErrorCode::kIo, "broker store " + path + " could not switch to WAL journaling");
    }
  }
  Transaction tx(db.get());
  if (auto r = tx.begin(); !r) return std::unexpected(r.error());
  Stmt uv(db.get(), "PRAGMA user_version");
  auto row = uv.step("read schema version");
  if (!row) return std::unexpected(row.error());
  const int64_t version = *row ? uv.int_at(0) : 0;
  if (version > kSchemaVersion) {
    return fail(ErrorCode::kUnsupportedVersion, "broker store " + path + " has schema version " +
                                                    std::to_string(version) + "; this build reads up to " +
                                                    std::to_string(kSchemaVersion));
  }
  if (version == 0) {
    if (auto r = exec(db.get(), kSchema, "create broker schema"); !r) return std::unexpected(r.error());
  }
  if (version < 2) {
    if (auto r = exec(db.get(), kSchemaV2, "add groups (schema version 2)"); !r) return std::unexpected(r.error());
    if (auto r = exec(db.get(), "PRAGMA user_version = 2", "set schema version"); !r) return std::unexpected(r.error());
  }
  if (auto r = tx.commit(); !r) return std::unexpected(r.error());

  auto impl = std::make_unique<Impl>(std::move(db));
  impl->master = SecretBuffer::copy_of(master_key);
  return Store(std::move(impl));
}

Result<void> Store::add_dataset(std::string_view id) {
  if (auto v = validate_dataset_id(id); !v) return v;
  std::lock_guard lock(impl_->mu);
  Stmt s(impl_->stmts, "INSERT INTO datasets(id, created) VALUES (?1, ?2)");
  s.bind(1, id).bind(2, now());
  auto r = s.run("add dataset");
  if (!r && r.error().code == ErrorCode::kExists) {
    return fail(ErrorCode::kExists, "dataset '" + std::string(id) + "' is already registered");
  }
  return r;
}

Result<bool> Store::has_dataset(std::string_view id) const {
  std::lock_guard lock(impl_->mu);
  Stmt s(impl_->stmts, "SELECT 1 FROM datasets WHERE id = ?1");
  s.bind(1, id);
  return s.step("look up dataset");
}

Result<std::vector<std::string>> Store::datasets() const {
  std::lock_guard lock(impl_->mu);
  Stmt s(impl_->stmts, "SELECT id FROM datasets ORDER BY id");
  std::vector<std::string> out;
  auto r = s.each_row("list datasets", [&]() -> Result<void> {
    out.push_back(s.text_at(0));
    return {};
  });
  if (!r) return std::unexpected(r.error());
  return out;
}

Result<uint32_t> Store::add_key(std::string_view dataset, ByteSpan key) {
  if (key.size() != kDataKeySize) {
    return fail(ErrorCode::kInvalidArgument, "a data key is " + std::to_string(kDataKeySize) + " bytes, got " +
                                                 std::to_string(key.size()));
  }
  std::lock_guard lock(impl_->mu);
  sqlite3* db = impl_->db.get();
  Transaction tx(db, &impl_->stmts);
  if (auto r = tx.begin(); !r) return std::unexpected(r.error());
  if (auto r = impl_->require_dataset(dataset); !r) return std::unexpected(r.error());
  Stmt last(impl_->stmts, "SELECT COALESCE(MAX(version), 0) FROM dataset_keys WHERE dataset = ?1");
  last.bind(1, dataset);
  auto row = last.step("read key versions");
  if (!row) return std::unexpected(row.error());
  const auto version = static_cast<uint32_t>(last.int_at(0) + 1);

  Bytes wrapped(kNonceSize);
  if (auto r = crypto::random_bytes(wrapped); !r) return std::unexpected(r.error());
  const std::string aad = aad_for(dataset, version);
  auto sealed = crypto::aes256gcm_seal(impl_->master.span(), ByteSpan(wrapped), as_bytes(aad), key);
  if (!sealed) return std::unexpected(sealed.error());
  wrapped.insert(wrapped.end(), sealed->begin(), sealed->end());

  Stmt ins(impl_->stmts, "INSERT INTO dataset_keys(dataset, version, wrapped, created) VALUES (?1, ?2, ?3, ?4)");
  ins.bind(1, dataset).bind(2, static_cast<int64_t>(version)).bind_blob(3, wrapped).bind(4, now());
  if (auto r = ins.run("store data key"); !r) return std::unexpected(r.error());
  if (auto r = tx.commit(); !r) return std::unexpected(r.error());
  return version;
}

Result<DataKey> Store::current_key(std::string_view dataset) const {
  std::lock_guard lock(impl_->mu);
  if (auto r = impl_->require_dataset(dataset); !r) return std::unexpected(r.error());
  Stmt s(impl_->stmts, "SELECT version, wrapped FROM dataset_keys WHERE dataset = ?1 ORDER BY version DESC LIMIT 1");
  s.bind(1, dataset);
  auto row = s.step("read data key");
  if (!row) return std::unexpected(row.error());
  if (!*row) return fail(ErrorCode::kNoMatchingKey, "dataset '" + std::string(dataset) + "' has no data key");
  return impl_->unwrap(dataset, static_cast<uint32_t>(s.int_at(0)), s.blob_at(1));
}

Result<DataKey> Store::key(std::string_view dataset, uint32_t version) const {
  std::lock_guard lock(impl_->mu);
  if (auto r = impl_->require_dataset(dataset); !r) return std::unexpected(r.error());
  Stmt s(impl_->stmts, "SELECT wrapped FROM dataset_keys WHERE dataset = ?1 AND version = ?2");
  s.bind(1, dataset).bind(2, static_cast<int64_t>(version));
  auto row = s.step("read data key");
  if (!row) return std::unexpected(row.error());
  if (!*row) {
    return fail(ErrorCode::kNoMatchingKey,
                "dataset '" + std::string(dataset) + "' has no key version " + std::to_string(version));
  }
  return impl_->unwrap(dataset, version, s.blob_at(0));
}

Result<std::vector<uint32_t>> Store::key_versions(std::string_view dataset) const {
  std::lock_guard lock(impl_->mu);
  if (auto r = impl_->require_dataset(dataset); !r) return std::unexpected(r.error());
  Stmt s(impl_->stmts, "SELECT version FROM dataset_keys WHERE dataset = ?1 ORDER BY version");
  s.bind(1, dataset);
  std::vector<uint32_t> out;
  auto r = s.each_row("list key versions", [&]() -> Result<void> {
    out.push_back(static_cast<uint32_t>(s.int_at(0)));
    return {};
  });
  if (!r) return std::unexpected(r.error());
  return out;
}

Result<void> Store::set_policy(std::string_view dataset, std::string_view policy_json) {
  std::lock_guard lock(impl_->mu);
  if (auto r = impl_->require_dataset(dataset); !r) return r;
  Stmt s(impl_->stmts,
         "INSERT INTO policies(dataset, policy, updated) VALUES (?1, ?2, ?3) "
         "ON CONFLICT(dataset) DO UPDATE SET policy = excluded.policy, updated = excluded.updated");
  s.bind(1, dataset).bind(2, policy_json).bind(3, now());
  return s.run("store policy");
}

Result<std::optional<std::string>> Store::policy(std::string_view dataset) const {
  std::lock_guard lock(impl_->mu);
  if (auto r = impl_->require_dataset(dataset); !r) return std::unexpected(r.error());
  Stmt s(impl_->stmts, "SELECT policy FROM policies WHERE dataset = ?1");
  s.bind(1, dataset);
  auto row = s.step("read policy");
  if (!row) return std::unexpected(row.error());
  if (!*row) return std::optional<std::string>();
  return std::optional<std::string>(s.text_at(0));
}

Result<void> Store::add_user(std::string_view name, std::string_view identity) {
  if (auto v = validate_user_name(name); !v) return v;
  if (identity.empty()) return fail(ErrorCode::kInvalidArgument, "user '" + std::string(name) + "' needs an identity");
  std::lock_guard lock(impl_->mu);
  Stmt s(impl_->stmts, "INSERT INTO users(name, identity, created) VALUES (?1, ?2, ?3)");
  s.bind(1, name).bind(2, identity).bind(3, now());
  auto r = s.run("add user");
  if (!r && r.error().code == ErrorCode::kExists) {
    return fail(ErrorCode::kExists, "user '" + std::string(name) +
                                        "' or identity already registered (names and identities of revoked users are not reused)");
  }
  return r;
}

Result<void> Store::revoke_user(std::string_view name) {
  std::lock_guard lock(impl_->mu);
  if (auto r = impl_->require_user(name); !r) return r;
  Stmt s(impl_->stmts, "UPDATE users SET revoked = 1 WHERE name = ?1");
  s.bind(1, name);
  return s.run("revoke user");
}

Result<std::optional<User>> Store::user(std::string_view name) const {
  if (auto v = validate_user_name(name); !v) return std::unexpected(v.error());
  std::lock_guard lock(impl_->mu);
  Stmt s(impl_->stmts, "SELECT identity, revoked, created FROM users WHERE name = ?1");
  s.bind(1, name);
  auto row = s.step("read user");
  if (!row) return std::unexpected(row.error());
  if (!*row) return std::optional<User>();
  return std::optional<User>(User{std::string(name), s.text_at(0), s.int_at(1) != 0, s.int_at(2)});
}

Result<std::optional<User>> Store::user_by_identity(std::string_view identity) const {
  std::lock_guard lock(impl_->mu);
  Stmt s(impl_->stmts, "SELECT name, revoked, created FROM users WHERE identity = ?1");
  s.bind(1, identity);
  auto row = s.step("read user");
  if (!row) return std::unexpected(row.error());
  if (!*row) return std::optional<User>();
  return std::optional<User>(User{s.text_at(0), std::string(identity), s.int_at(1) != 0, s.int_at(2)});
}

Result<void> Store::grant(std::string_view user, std::string_view dataset) {
  std::lock_guard lock(impl_->mu);
  if (auto r = impl_->require_user(user); !r) return r;
  if (auto r = impl_->require_dataset(dataset); !r) return r;
  Stmt s(impl_->stmts, "INSERT INTO grants(user, dataset, created) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING");
  s.bind(1, user).bind(2, dataset).bind(3, now());
  return s.run("grant");
}

Result<void> Store::revoke_grant(std::string_view user, std::string_view dataset) {
  std::lock_guard lock(impl_->mu);
  if (auto r = impl_->require_user(user); !r) return r;
  if (auto r = impl_->require_dataset(dataset); !r) return r;
  Stmt s(impl_->stmts, "DELETE FROM grants WHERE user = ?1 AND dataset = ?2");
  s.bind(1, user).bind(2, dataset);
  if (auto r = s.run("revoke grant"); !r) return r;
  if (sqlite3_changes(impl_->db.get()) == 0) {
    return fail(ErrorCode::kInvalidArgument,
                "user '" + std::string(user) + "' has no grant on dataset '" + std::string(dataset) + "'");
  }
  return {};
}

Result<void> Store::add_to_group(std::string_view group, std::string_view user) {
  if (auto v = validate_user_name(group); !v) return fail(ErrorCode::kInvalidArgument, "group: " + v.error().message);
  std::lock_guard lock(impl_->mu);
  if (auto r = impl_->require_user(user); !r) return r;
  Stmt s(impl_->stmts, "INSERT INTO group_members(grp, user, created) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING");
  s.bind(1, group).bind(2, user).bind(3, now());
  return s.run("add to group");
}

Result<void> Store::remove_from_group(std::string_view group, std::string_view user) {
  std::lock_guard lock(impl_->mu);
  Stmt s(impl_->stmts, "DELETE FROM group_members WHERE grp = ?1 AND user = ?2");
  s.bind(1, group).bind(2, user);
  if (auto r = s.run("remove from group"); !r) return r;
  if (sqlite3_changes(impl_->db.get()) == 0) {
    return fail(ErrorCode::kInvalidArgument, "user '" + std::string(user) + "' is not in group '" + std::string(group) + "'");
  }
  return {};
}

Result<std::vector<std::string>> Store::groups_of(std::string_view user) const {
  std::lock_guard lock(impl_->mu);
  Stmt s(impl_->stmts, "SELECT grp FROM group_members WHERE user = ?1 ORDER BY grp");
  s.bind(1, user);
  std::vector<std::string> out;
  auto r = s.each_row("list groups", [&]() -> Result<void> {
    out.push_back(s.text_at(0));
    return {};
  });
  if (!r) return std::unexpected(r.error());
  return out;
}

Result<bool> Store::has_grant(std::string_view user, std::string_view dataset) const {
  std::lock_guard lock(impl_->mu);
  Stmt s(impl_->stmts, "SELECT 1 FROM grants WHERE user = ?1 AND dataset = ?2");
  s.bind(1, user).bind(2, dataset);
  return s.step("read grant");
}

Result<void> Store::backup(const std::string& dest) const {
  std::error_code ec;
  if (std::filesystem::exists(dest, ec)) {
    return fail(ErrorCode::kExists, "backup destination " + dest + " exists; refusing to overwrite it");
  }
  std::lock_guard lock(impl_->mu);
  Stmt s(impl_->stmts, "VACUUM INTO ?1");
  s.bind(1, dest);
  return s.run("back up broker store to " + dest);
}

Result<audit::Record> Store::append_audit(audit::Record record) {
  std::vector<audit::Record> one;
  one.push_back(std::move(record));
  auto r = append_audit_batch(std::move(one));
  if (!r) return std::unexpected(r.error());
  return std::move(r->front());
}

Result<std::vector<audit::Record>> Store::append_audit_batch(std::vector<audit::Record> records) {
  std::lock_guard lock(impl_->mu);
  sqlite3* db = impl_->db.get();
  Transaction tx(db, &impl_->stmts);
  if (auto r = tx.begin(); !r) return std::unexpected(r.error());
  Stmt last(impl_->stmts, "SELECT record FROM audit ORDER BY seq DESC LIMIT 1");
  auto row = last.step("read last audit record");
  if (!row) return std::unexpected(row.error());
  std::optional<audit::Record> previous;
  if (*row) {
    auto prev = audit::from_json(last.text_at(0));
    if (!prev) return std::unexpected(prev.error());
    previous = std::move(*prev);
  }
  Stmt ins(impl_->stmts, "INSERT INTO audit(seq, hash, record) VALUES (?1, ?2, ?3)");
  std::vector<audit::Record> out;
  out.reserve(records.size());
  for (auto& record : records) {
    auto chained = audit::chain(previous ? &*previous : nullptr, std::move(record));
    if (!chained) return std::unexpected(chained.error());
    auto text = audit::to_json(*chained);
    if (!text) return std::unexpected(text.error());
    ins.reset();
    ins.bind(1, static_cast<int64_t>(chained->seq)).bind(2, chained->hash).bind(3, *text);
    if (auto r = ins.run("append audit record"); !r) return std::unexpected(r.error());
    previous = *chained;
    out.push_back(std::move(*chained));
  }
  if (auto r = tx.commit(); !r) return std::unexpected(r.error());  // one fsync for the whole batch
  return out;
}

Result<std::vector<audit::Record>> Store::audit_records() const {
  std::lock_guard lock(impl_->mu);
  Stmt s(impl_->stmts, "SELECT seq, hash, record FROM audit ORDER BY seq");
  std::vector<audit::Record> out;
  auto r = s.each_row("read audit log", [&]() -> Result<void> {
    auto rec = audit::from_json(s.text_at(2));
    if (!rec) {
      return fail(rec.error().code, "audit row " + std::to_string(s.int_at(0)) + ": " + rec.error().message);
    }
    if (static_cast<int64_t>(rec->seq) != s.int_at(0) || rec->hash != s.text_at(1)) {
      return fail(ErrorCode::kAuth, "audit row " + std::to_string(s.int_at(0)) +
                                        ": its seq or hash column disagrees with the record it holds");
    }
    out.push_back(std::move(*rec));
    return {};
  });
  if (!r) return std::unexpected(r.error());
  return out;
}

}  // namespace tresor::broker
