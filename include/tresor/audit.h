// tresor/audit.h — the broker's append-only, hash-chained audit record of every decision
// (DESIGN.md, "Broker state"). Each record carries the hash of the one before it; the record's
// own hash is SHA-256 of its canonical JSON (RFC 8785) without the "hash" member. Editing,
// reordering, inserting or deleting a record breaks the chain at a place verify_chain names.
// Pure: persistence (SQLite) lives in the broker.
#pragma once

#include <cstdint>
#include <span>
#include <string>

#include "tresor/error.h"

namespace tresor::audit {

/// The hash a chain starts from: 64 zeros.
inline constexpr std::string_view kGenesis = "0000000000000000000000000000000000000000000000000000000000000000";

struct Record {
  uint64_t seq = 0;            // 1, 2, 3, … without gaps
  int64_t time = 0;            // unix seconds
  std::string user;            // recipient string, or "" when unknown
  std::string dataset;         // dataset id, or ""
  std::string evidence_digest; // SHA-256 (hex) of the evidence judged, or ""
  std::string measurement;     // launch measurement (hex), or ""
  std::string result;          // "released", "denied", "admin", …
  std::string reason;          // why (denials name the failed checks)
  bool sim = false;            // decided on sim evidence (DESIGN.md: marked in the audit log)
  std::string prev_hash;       // hex SHA-256 of the previous record (kGenesis for the first)
  std::string hash;            // hex SHA-256 of this record without "hash"

  bool operator==(const Record&) const = default;
};

/// `text` with every byte outside printable ASCII (and newline) and every backslash written as
/// \xNN, so that it is valid UTF-8 and unambiguous.
std::string printable(std::string_view text);
/// Fills in seq, prev_hash and hash of `next` (its text fields made printable() first) so that it follows `previous` (nullptr: the first).
[[nodiscard]] Result<Record> chain(const Record* previous, Record next);
/// The hash a record should have.
[[nodiscard]] Result<std::string> record_hash(const Record& r);
/// Checks a whole chain in order. kAuth names the first record that breaks it and how: edited
/// (its hash does not match its content), deleted or reordered (seq gap, or prev_hash not the
/// previous record's hash).
[[nodiscard]] Result<void> verify_chain(std::span<const Record> records);

/// The canonical JSON of a record (with its hash), and back (strict), for storage and export.
[[nodiscard]] Result<std::string> to_json(const Record& r);
[[nodiscard]] Result<Record> from_json(std::string_view text);

}  // namespace tresor::audit
