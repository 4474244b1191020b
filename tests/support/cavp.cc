// A reader for NIST CAVP GCMVS response files (tests/support/cavp.h).
#include "support/cavp.h"

#include <charconv>
#include <fstream>
#include <sstream>

#include "support/test_support.h"

namespace tresor::testing {
namespace {

std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t' || s.back() == '\r')) s.remove_suffix(1);
  return s;
}

// Checks one vector against its section: every field present, every length as the section says.
void check_vector(const CavpVector& v, CavpKind kind, std::vector<std::string>& errors) {
  const std::vector<std::string> required = {"Key", "IV", "AAD", "CT", "Tag"};
  for (const auto& name : required) {
    if (!v.has(name)) errors.push_back(v.where + ": missing " + name);
  }
  if (kind == CavpKind::kEncrypt && (!v.has("PT") || v.fail)) {
    errors.push_back(v.where + ": an encrypt vector needs PT and no FAIL");
  }
  if (kind == CavpKind::kDecrypt && v.has("PT") == v.fail) {
    errors.push_back(v.where + ": a decrypt vector needs exactly one of PT and FAIL");
  }
  const std::vector<std::pair<std::string, std::string>> lengths = {
      {"Keylen", "Key"}, {"IVlen", "IV"}, {"PTlen", "CT"}, {"AADlen", "AAD"}, {"Taglen", "Tag"}};
  for (const auto& [param, name] : lengths) {
    const auto it = v.section.find(param);
    if (it == v.section.end()) {
      errors.push_back(v.where + ": section has no [" + param + "]");
      continue;
    }
    size_t bits = 0;
    const auto [end, ec] = std::from_chars(it->second.data(), it->second.data() + it->second.size(), bits);
    if (ec != std::errc() || end != it->second.data() + it->second.size()) {
      errors.push_back(v.where + ": [" + param + " = " + it->second + "] is not a number");
      continue;
    }
    if (v.field(name).size() * 8 != bits) {
      errors.push_back(v.where + ": " + name + " is " + std::to_string(v.field(name).size() * 8) +
                       " bits, section says " + param + " = " + it->second);
    }
  }
  if (v.has("PT") && v.field("PT").size() != v.field("CT").size()) {
    errors.push_back(v.where + ": PT and CT lengths differ");
  }
}

}  // namespace

CavpFile parse_cavp(std::string_view text, const std::string& name, CavpKind kind) {
  CavpFile f;
  f.found = true;
  std::map<std::string, std::string> section;
  size_t pos = 0;
  size_t line_no = 0;
  while (pos < text.size()) {
    size_t end = text.find('\n', pos);
    if (end == std::string_view::npos) end = text.size();
    std::string_view line = trim(text.substr(pos, end - pos));
    pos = end + 1;
    ++line_no;
    const std::string where = name + ":" + std::to_string(line_no);
    if (line.empty() || line.front() == '#') continue;
    if (line.front() == '[') {
      // One or more "[Name = value]" groups on the line.
      while (!line.empty()) {
        const size_t close = line.find(']');
        const size_t eq = line.find('=');
        if (line.front() != '[' || close == std::string_view::npos || eq == std::string_view::npos || eq > close) {
          f.errors.push_back(where + ": malformed section line");
          break;
        }
        section[std::string(trim(line.substr(1, eq - 1)))] = std::string(trim(line.substr(eq + 1, close - eq - 1)));
        line = trim(line.substr(close + 1));
      }
      continue;
    }
    if (line == "FAIL") {
      if (f.vectors.empty() || f.vectors.back().fail) {
        f.errors.push_back(where + ": FAIL outside a vector");
      } else {
        f.vectors.back().fail = true;
      }
      continue;
    }
    const size_t eq = line.find('=');
    if (eq == std::string_view::npos) {
      f.errors.push_back(where + ": unrecognised line '" + std::string(line) + "'");
      continue;
    }
    const std::string key(trim(line.substr(0, eq)));
    const std::string_view value = trim(line.substr(eq + 1));
    if (key == "Count") {
      CavpVector v;
      v.where = where;
      v.count = std::string(value);
      v.section = section;
      f.vectors.push_back(std::move(v));
      continue;
    }
    if (f.vectors.empty()) {
      f.errors.push_back(where + ": " + key + " before the first Count");
      continue;
    }
    if (key != "Key" && key != "IV" && key != "PT" && key != "AAD" && key != "CT" && key != "Tag") {
      f.errors.push_back(where + ": unknown field " + key);
      continue;
    }
    if (f.vectors.back().has(key)) {
      f.errors.push_back(where + ": " + key + " given twice");
      continue;
    }
    auto bytes = from_hex(value, key);
    if (!bytes) {
      f.errors.push_back(where + ": " + bytes.error().message);
      continue;
    }
    f.vectors.back().fields[key] = std::move(*bytes);
  }
  for (const auto& v : f.vectors) check_vector(v, kind, f.errors);
  return f;
}

CavpFile load_cavp(const std::string& relative, CavpKind kind) {
  std::ifstream in(testing::testdata(relative), std::ios::binary);
  if (!in) return CavpFile{};  // found == false
  std::ostringstream text;
  text << in.rdbuf();
  return parse_cavp(text.str(), relative, kind);
}

}  // namespace tresor::testing
