// The broker's SQLite store: persistence, data keys sealed by the master key, users, grants,
// policy, the audit chain, refusal of bad input without side effects, and crash safety under
// kill -9 (issue 4, item 8).
#include "tresor/broker/store.h"

#include <signal.h>
#include <sqlite3.h>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include "support/test_support.h"

namespace tresor::broker {
namespace {

using tresor::testing::FailsWith;
using tresor::testing::TempDir;

Bytes master_key(uint32_t seed = 1) { return tresor::testing::pattern_bytes(kMasterKeySize, seed); }
Bytes data_key(uint32_t seed) { return tresor::testing::pattern_bytes(kDataKeySize, 1000 + seed); }

Store open_store(const std::string& path, uint32_t seed = 1) {
  auto s = Store::open(path, master_key(seed));
  if (!s) ADD_FAILURE() << s.error().message;
  return std::move(*s);
}

// Raw SQL against the store file, as an attacker with write access to the disk would do.
void raw_sql(const std::string& path, const std::string& sql) {
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open(path.c_str(), &db), SQLITE_OK);
  char* err = nullptr;
  const int rc = sqlite3_exec(db, sql.c_str(), nullptr, nullptr, &err);
  EXPECT_EQ(rc, SQLITE_OK) << (err ? err : "") << " in " << sql;
  sqlite3_free(err);
  sqlite3_close(db);
}

int raw_sql_count(const std::string& path, const std::string& table);

std::string raw_scalar(const std::string& path, const std::string& sql) {
  sqlite3* db = nullptr;
  EXPECT_EQ(sqlite3_open(path.c_str(), &db), SQLITE_OK);
  sqlite3_stmt* st = nullptr;
  std::string out;
  if (sqlite3_prepare_v2(db, sql.c_str(), -1, &st, nullptr) == SQLITE_OK && sqlite3_step(st) == SQLITE_ROW) {
    const auto* p = sqlite3_column_text(st, 0);
    out = p ? reinterpret_cast<const char*>(p) : "";
  }
  sqlite3_finalize(st);
  sqlite3_close(db);
  return out;
}

int raw_sql_count(const std::string& path, const std::string& table) {
  return std::stoi(raw_scalar(path, "SELECT count(*) FROM " + table));
}

audit::Record decision(std::string user, std::string result, std::string reason) {
  audit::Record r;
  r.time = 1764500000;
  r.user = std::move(user);
  r.dataset = "dhz/ccta-2024";
  r.result = std::move(result);
  r.reason = std::move(reason);
  return r;
}

TEST(BrokerStoreTest, DatasetKeysPersistAcrossReopenAndRotate) {
  TempDir dir;
  const auto path = dir.file("broker.db");
  {
    Store s = open_store(path);
    ASSERT_TRUE(s.add_dataset("dhz/ccta-2024"));
    auto v1 = s.add_key("dhz/ccta-2024", data_key(1));
    ASSERT_TRUE(v1) << v1.error().message;
    EXPECT_EQ(*v1, 1u);
    auto v2 = s.add_key("dhz/ccta-2024", data_key(2));  // rotation
    ASSERT_TRUE(v2);
    EXPECT_EQ(*v2, 2u);
  }
  Store s = open_store(path);
  auto cur = s.current_key("dhz/ccta-2024");
  ASSERT_TRUE(cur) << cur.error().message;
  EXPECT_EQ(cur->version, 2u);
  EXPECT_EQ(Bytes(cur->key.span().begin(), cur->key.span().end()), data_key(2));
  auto old = s.key("dhz/ccta-2024", 1);
  ASSERT_TRUE(old);
  EXPECT_EQ(Bytes(old->key.span().begin(), old->key.span().end()), data_key(1));
  EXPECT_EQ(s.key_versions("dhz/ccta-2024").value(), (std::vector<uint32_t>{1, 2}));
  EXPECT_EQ(s.datasets().value(), std::vector<std::string>{"dhz/ccta-2024"});
  EXPECT_TRUE(s.has_dataset("dhz/ccta-2024").value());
  EXPECT_FALSE(s.has_dataset("dhz/ccta-2025").value());
  EXPECT_TRUE(FailsWith(s.key("dhz/ccta-2024", 3), ErrorCode::kNoMatchingKey));
}

TEST(BrokerStoreTest, FileIsWalWithSchemaVersionAndNoPlaintextKeys) {
  TempDir dir;
  const auto path = dir.file("broker.db");
  {
    Store s = open_store(path);
    ASSERT_TRUE(s.add_dataset("dhz/ccta-2024"));
    ASSERT_TRUE(s.add_key("dhz/ccta-2024", data_key(7)));
  }
  EXPECT_EQ(raw_scalar(path, "PRAGMA journal_mode"), "wal");
  EXPECT_EQ(raw_scalar(path, "PRAGMA user_version"), "2");
  // The stored blob is nonce ‖ ciphertext ‖ tag and does not contain the key.
  EXPECT_EQ(raw_scalar(path, "SELECT length(wrapped) FROM dataset_keys"), "60");
  const Bytes file = tresor::testing::read_file(path);
  const Bytes key = data_key(7);
  EXPECT_EQ(std::search(file.begin(), file.end(), key.begin(), key.end()), file.end());
}

TEST(BrokerStoreTest, WrongMasterKeyOrMovedRowDoesNotOpen) {
  TempDir dir;
  const auto path = dir.file("broker.db");
  {
    Store s = open_store(path);
    ASSERT_TRUE(s.add_dataset("dhz/ccta-2024"));
    ASSERT_TRUE(s.add_dataset("dhz/mri-2025"));
    ASSERT_TRUE(s.add_key("dhz/ccta-2024", data_key(1)));
    ASSERT_TRUE(s.add_key("dhz/mri-2025", data_key(2)));
  }
  {
    Store wrong = open_store(path, /*seed=*/2);
    auto k = wrong.current_key("dhz/ccta-2024");
    ASSERT_TRUE(FailsWith(k, ErrorCode::kAuth));
    EXPECT_NE(k.error().message.find("dhz/ccta-2024 version 1"), std::string::npos) << k.error().message;
  }
  // Someone with disk access copies one dataset's wrapped key over another's: the AAD binds
  // each wrapped key to its dataset and version, so it no longer opens.
  raw_sql(path,
          "UPDATE dataset_keys SET wrapped = (SELECT wrapped FROM dataset_keys WHERE dataset = 'dhz/ccta-2024') "
          "WHERE dataset = 'dhz/mri-2025'");
  Store s = open_store(path);
  EXPECT_TRUE(FailsWith(s.current_key("dhz/mri-2025"), ErrorCode::kAuth));
  EXPECT_TRUE(s.current_key("dhz/ccta-2024"));
}

TEST(BrokerStoreTest, RefusesBadInputWithoutWritingAnything) {
  TempDir dir;
  const auto path = dir.file("broker.db");
  EXPECT_TRUE(FailsWith(Store::open(path, Bytes(16)), ErrorCode::kInvalidArgument));
  Store s = open_store(path);
  // The sealed format's dataset id rule (formats.md §3.2), the one rule everywhere.
  for (std::string_view bad : {"", "/x", "dhz/", "dhz//x", "dhz/.hidden", "-dhz/x", "dhz/cc ta",
                               "dhz/ccta'; DROP TABLE datasets; --"}) {
    auto r = s.add_dataset(bad);
    ASSERT_TRUE(FailsWith(r, ErrorCode::kInvalidArgument)) << bad;
    EXPECT_NE(r.error().message.find("dataset id '"), std::string::npos);
  }
  EXPECT_TRUE(FailsWith(s.add_dataset(std::string(60, 'a') + "/" + std::string(68, 'b')), ErrorCode::kInvalidArgument));
  EXPECT_TRUE(s.add_dataset(std::string(60, 'a') + "/" + std::string(67, 'b')));  // 128: the limit
  ASSERT_TRUE(raw_sql_count(path, "datasets") == 1);
  raw_sql(path, "DELETE FROM datasets");
  EXPECT_TRUE(s.datasets().value().empty());

  ASSERT_TRUE(s.add_dataset("dhz/ccta-2024"));
  auto dup = s.add_dataset("dhz/ccta-2024");
  ASSERT_TRUE(FailsWith(dup, ErrorCode::kExists));
  EXPECT_NE(dup.error().message.find("already registered"), std::string::npos);

  auto unknown = s.add_key("dhz/unknown", data_key(1));
  ASSERT_TRUE(FailsWith(unknown, ErrorCode::kInvalidArgument));
  EXPECT_NE(unknown.error().message.find("unknown dataset 'dhz/unknown'"), std::string::npos);
  EXPECT_TRUE(FailsWith(s.add_key("dhz/ccta-2024", Bytes(31)), ErrorCode::kInvalidArgument));
  EXPECT_TRUE(FailsWith(s.current_key("dhz/ccta-2024"), ErrorCode::kNoMatchingKey));
  EXPECT_TRUE(s.key_versions("dhz/ccta-2024").value().empty());
  EXPECT_EQ(raw_scalar(path, "SELECT count(*) FROM dataset_keys"), "0");
}

TEST(BrokerStoreTest, RefusesNewerSchema) {
  TempDir dir;
  const auto path = dir.file("broker.db");
  { Store s = open_store(path); }
  raw_sql(path, "PRAGMA user_version = 3");
  auto s = Store::open(path, master_key());
  ASSERT_TRUE(FailsWith(s, ErrorCode::kUnsupportedVersion));
  EXPECT_NE(s.error().message.find("schema version 3"), std::string::npos);
}

TEST(BrokerStoreTest, AVersionOneStoreIsMigratedAndKeepsItsData) {
  TempDir dir;
  const auto path = dir.file("broker.db");
  {
    Store s = open_store(path);
    ASSERT_TRUE(s.add_user("alice", "tresor1alice"));
    ASSERT_TRUE(s.add_dataset("dhz/ccta-2024"));
  }
  // Make it a version 1 store, as the first release wrote them.
  raw_sql(path, "DROP TABLE group_members; PRAGMA user_version = 1;");
  Store s = open_store(path);
  EXPECT_EQ(raw_scalar(path, "PRAGMA user_version"), "2");
  EXPECT_TRUE(s.has_dataset("dhz/ccta-2024").value());
  ASSERT_TRUE(s.add_to_group("cardiology", "alice"));
  ASSERT_TRUE(s.add_to_group("cardiology", "alice")) << "adding twice is harmless";
  EXPECT_EQ(s.groups_of("alice").value(), std::vector<std::string>{"cardiology"});
  EXPECT_TRUE(FailsWith(s.add_to_group("cardiology", "bob"), ErrorCode::kInvalidArgument));
  EXPECT_TRUE(FailsWith(s.add_to_group("Bad Group", "alice"), ErrorCode::kInvalidArgument));
  ASSERT_TRUE(s.remove_from_group("cardiology", "alice"));
  EXPECT_TRUE(FailsWith(s.remove_from_group("cardiology", "alice"), ErrorCode::kInvalidArgument));
  EXPECT_TRUE(s.groups_of("alice").value().empty());
}

TEST(BrokerStoreTest, UnreadableLocationIsAnIoError) {
  TempDir dir;
  EXPECT_TRUE(FailsWith(Store::open(dir.file("missing/dir/broker.db"), master_key()), ErrorCode::kIo));
}

TEST(BrokerStoreTest, UsersGrantsAndPolicy) {
  TempDir dir;
  Store s = open_store(dir.file("broker.db"));
  ASSERT_TRUE(s.add_dataset("dhz/ccta-2024"));
  ASSERT_TRUE(s.add_user("alice", "tresor1qexample"));
  EXPECT_TRUE(FailsWith(s.add_user("alice", "tresor1qother"), ErrorCode::kExists));
  EXPECT_TRUE(FailsWith(s.add_user("Alice", "x"), ErrorCode::kInvalidArgument));
  EXPECT_TRUE(FailsWith(s.add_user("bob", ""), ErrorCode::kInvalidArgument));
  EXPECT_FALSE(s.user("bob").value().has_value());

  EXPECT_FALSE(s.has_grant("alice", "dhz/ccta-2024").value());
  ASSERT_TRUE(s.grant("alice", "dhz/ccta-2024"));
  ASSERT_TRUE(s.grant("alice", "dhz/ccta-2024"));  // idempotent
  EXPECT_TRUE(s.has_grant("alice", "dhz/ccta-2024").value());
  auto g = s.grant("bob", "dhz/ccta-2024");
  ASSERT_TRUE(FailsWith(g, ErrorCode::kInvalidArgument));
  EXPECT_NE(g.error().message.find("unknown user 'bob'"), std::string::npos);
  EXPECT_TRUE(FailsWith(s.grant("alice", "dhz/other"), ErrorCode::kInvalidArgument));
  ASSERT_TRUE(s.revoke_grant("alice", "dhz/ccta-2024"));
  EXPECT_FALSE(s.has_grant("alice", "dhz/ccta-2024").value());
  EXPECT_TRUE(FailsWith(s.revoke_grant("alice", "dhz/ccta-2024"), ErrorCode::kInvalidArgument));

  ASSERT_TRUE(s.revoke_user("alice"));
  auto alice = s.user("alice").value();
  ASSERT_TRUE(alice.has_value());
  EXPECT_TRUE(alice->revoked);
  EXPECT_EQ(alice->identity, "tresor1qexample");
  EXPECT_TRUE(FailsWith(s.add_user("alice", "tresor1qnew"), ErrorCode::kExists));  // never reused

  EXPECT_FALSE(s.policy("dhz/ccta-2024").value().has_value());  // absent ⇒ the broker denies
  ASSERT_TRUE(s.set_policy("dhz/ccta-2024", R"({"v":1})"));
  ASSERT_TRUE(s.set_policy("dhz/ccta-2024", R"({"v":2})"));
  EXPECT_EQ(s.policy("dhz/ccta-2024").value(), std::optional<std::string>(R"({"v":2})"));
  EXPECT_TRUE(FailsWith(s.set_policy("dhz/none", "{}"), ErrorCode::kInvalidArgument));
}

TEST(BrokerStoreTest, AuditChainsAcrossReopenAndTamperingIsFound) {
  TempDir dir;
  const auto path = dir.file("broker.db");
  {
    Store s = open_store(path);
    for (int i = 0; i < 3; ++i) ASSERT_TRUE(s.append_audit(decision("alice", "released", "all checks passed")));
  }
  {
    Store s = open_store(path);
    auto r = s.append_audit(decision("bob", "denied", "measurement not allowed"));
    ASSERT_TRUE(r);
    EXPECT_EQ(r->seq, 4u);
    auto all = s.audit_records();
    ASSERT_TRUE(all);
    ASSERT_EQ(all->size(), 4u);
    EXPECT_TRUE(audit::verify_chain(*all));
  }
  // An edit inside the stored JSON, with the columns left alone.
  raw_sql(path, "UPDATE audit SET record = replace(record, 'denied', 'released') WHERE seq = 4");
  {
    Store s = open_store(path);
    auto all = s.audit_records();
    ASSERT_TRUE(all);
    auto v = audit::verify_chain(*all);
    ASSERT_TRUE(FailsWith(v, ErrorCode::kAuth));
    EXPECT_NE(v.error().message.find("audit record 4 was edited"), std::string::npos) << v.error().message;
  }
  raw_sql(path, "UPDATE audit SET record = replace(record, 'released', 'denied') WHERE seq = 4");
  raw_sql(path, "DELETE FROM audit WHERE seq = 2");
  {
    Store s = open_store(path);
    auto v = audit::verify_chain(s.audit_records().value());
    ASSERT_TRUE(FailsWith(v, ErrorCode::kAuth));
    EXPECT_NE(v.error().message.find("deleted or reordered"), std::string::npos) << v.error().message;
  }
  // A row whose hash column disagrees with its record is refused on read.
  raw_sql(path, "UPDATE audit SET hash = 'ff' WHERE seq = 3");
  Store s = open_store(path);
  EXPECT_TRUE(FailsWith(s.audit_records(), ErrorCode::kAuth));
}

TEST(BrokerStoreTest, BackupIsAConsistentSnapshotThatNeedsTheMasterKey) {
  TempDir dir;
  const auto path = dir.file("broker.db");
  const auto copy = dir.file("backup.db");
  Store s = open_store(path);
  ASSERT_TRUE(s.add_dataset("dhz/ccta-2024"));
  ASSERT_TRUE(s.add_key("dhz/ccta-2024", data_key(1)));
  ASSERT_TRUE(s.append_audit(decision("alice", "admin", "created")));
  ASSERT_TRUE(s.backup(copy));
  ASSERT_TRUE(s.add_key("dhz/ccta-2024", data_key(2)));  // after the snapshot: not in it
  auto again = s.backup(copy);
  ASSERT_TRUE(FailsWith(again, ErrorCode::kExists));
  EXPECT_NE(again.error().message.find("refusing to overwrite"), std::string::npos);

  Store restored = open_store(copy);
  EXPECT_EQ(restored.key_versions("dhz/ccta-2024").value(), std::vector<uint32_t>{1});
  auto k = restored.current_key("dhz/ccta-2024");
  ASSERT_TRUE(k);
  EXPECT_EQ(Bytes(k->key.span().begin(), k->key.span().end()), data_key(1));
  EXPECT_TRUE(audit::verify_chain(restored.audit_records().value()));
  EXPECT_EQ(raw_scalar(copy, "PRAGMA journal_mode"), "wal");
  Store wrong = open_store(copy, /*seed=*/9);
  EXPECT_TRUE(FailsWith(wrong.current_key("dhz/ccta-2024"), ErrorCode::kAuth));
}

// kill -9 in the middle of a burst of writes: every write the child reported as committed is
// there after a restart, every key opens and the audit chain verifies.
TEST(BrokerStoreCrashTest, KillDuringWriteBurstLosesNothingCommitted) {
  TempDir dir;
  const auto path = dir.file("broker.db");
  {
    Store s = open_store(path);
    ASSERT_TRUE(s.add_dataset("dhz/ccta-2024"));
  }
  int fds[2];
  ASSERT_EQ(pipe(fds), 0);
  const pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    close(fds[0]);
    auto s = Store::open(path, master_key());
    if (!s) _exit(2);
    for (uint32_t i = 1;; ++i) {
      if (!s->add_key("dhz/ccta-2024", data_key(i))) _exit(3);
      audit::Record r = decision("alice", "admin", "rotate " + std::to_string(i));
      if (!s->append_audit(std::move(r))) _exit(4);
      if (write(fds[1], &i, sizeof i) != static_cast<ssize_t>(sizeof i)) _exit(5);
    }
  }
  close(fds[1]);
  uint32_t acknowledged = 0;
  uint32_t i = 0;
  while (acknowledged < 150 && read(fds[0], &i, sizeof i) == static_cast<ssize_t>(sizeof i)) acknowledged = i;
  ASSERT_EQ(kill(child, SIGKILL), 0);
  int status = 0;
  ASSERT_EQ(waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFSIGNALED(status)) << "the writer stopped on its own (exit " << WEXITSTATUS(status) << ")";
  while (read(fds[0], &i, sizeof i) == static_cast<ssize_t>(sizeof i)) acknowledged = i;
  close(fds[0]);
  ASSERT_GE(acknowledged, 150u);

  Store s = open_store(path);
  auto versions = s.key_versions("dhz/ccta-2024").value();
  ASSERT_GE(versions.size(), acknowledged);
  for (uint32_t v = 1; v <= acknowledged; ++v) {
    auto k = s.key("dhz/ccta-2024", v);
    ASSERT_TRUE(k) << "version " << v << ": " << k.error().message;
    ASSERT_EQ(Bytes(k->key.span().begin(), k->key.span().end()), data_key(v)) << "version " << v;
  }
  auto records = s.audit_records();
  ASSERT_TRUE(records);
  ASSERT_GE(records->size(), acknowledged);
  EXPECT_TRUE(audit::verify_chain(*records));
  // The store stays writable after the crash, and the chain continues.
  auto next = s.append_audit(decision("alice", "admin", "after restart"));
  ASSERT_TRUE(next);
  EXPECT_EQ(next->seq, records->size() + 1);
}

}  // namespace
}  // namespace tresor::broker
