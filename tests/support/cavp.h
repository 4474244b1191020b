// tests/support/cavp.h — a reader for NIST CAVP GCMVS response files (tests/testdata/nist),
// shared by the OpenSSL AES-GCM tests and the GPU AES-GCM tests.
//
// The files are line based: '#' comments, "[Name = value]" section parameters that apply to the
// vectors after them, "Count = n" opening a vector, "Field = hex" lines (an empty value is an
// empty byte string), and in decrypt files a bare "FAIL" where the tag must not verify.
#pragma once

#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "tresor/encoding.h"

namespace tresor::testing {

struct CavpVector {
  std::string where;                           // "file:line" of the Count line
  std::string count;
  std::map<std::string, std::string> section;  // Keylen, IVlen, PTlen, AADlen, Taglen
  std::map<std::string, Bytes> fields;         // Key, IV, PT, AAD, CT, Tag
  bool fail = false;

  bool has(const std::string& name) const { return fields.contains(name); }
  const Bytes& field(const std::string& name) const {
    static const Bytes kEmpty;
    const auto it = fields.find(name);
    return it == fields.end() ? kEmpty : it->second;
  }
};

struct CavpFile {
  bool found = false;
  std::vector<CavpVector> vectors;
  std::vector<std::string> errors;  // every malformed line or inconsistent vector
};

enum class CavpKind { kEncrypt, kDecrypt };

/// Parses `text` (named `name` in errors); every vector checked against its section.
CavpFile parse_cavp(std::string_view text, const std::string& name, CavpKind kind);
/// The file tests/testdata/<relative>; found == false when it is missing.
CavpFile load_cavp(const std::string& relative, CavpKind kind);

}  // namespace tresor::testing
