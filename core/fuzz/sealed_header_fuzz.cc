// libFuzzer target for the sealed-header parser (STYLE.md rule 17): anything parse_header accepts
// must serialize back to exactly the bytes it consumed, and parse again to the same Header.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "tresor/sealed.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const tresor::ByteSpan in(reinterpret_cast<const std::byte*>(data), size);
  auto len = tresor::sealed::header_length(in.first(std::min(size, tresor::sealed::kFixedHeaderSize)));
  auto h = tresor::sealed::parse_header(in);
  if (!h) return 0;
  if (!len || *len != h->size()) std::abort();  // the declared length is the parsed length
  const tresor::Bytes out = tresor::sealed::serialize_header(*h);
  if (out.size() != h->size() || std::memcmp(out.data(), data, out.size()) != 0) std::abort();
  auto again = tresor::sealed::parse_header(out);
  if (!again || !(*again == *h)) std::abort();
  return 0;
}
