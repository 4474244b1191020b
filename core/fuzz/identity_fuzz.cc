// libFuzzer target for the text parsers of keys (recipient strings, identity files, dataset key
// files): whatever they accept must print back to text that parses to the same key.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "tresor/identity.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  if (auto r = tresor::Recipient::parse(text)) {
    auto again = tresor::Recipient::parse(r->to_string());
    if (!again || !(*again == *r)) std::abort();
  }
  if (auto id = tresor::Identity::parse(text)) {
    auto again = tresor::Identity::parse(id->to_file_text());
    if (!again || !(again->recipient() == id->recipient())) std::abort();
  }
  if (auto k = tresor::DatasetKey::parse("fuzz/key", text)) {
    auto again = tresor::DatasetKey::parse("fuzz/key", k->to_file_text());
    if (!again || !tresor::crypto::ct_equal(again->key.span(), k->key.span())) std::abort();
  }
  return 0;
}
