// libFuzzer target for the VCEK/VLEK extension parser (57230 Table 8) and the extended-report
// certificate table parser: no input may crash them, and a table that parses must serialize to
// a table that parses to the same certificates.
#include <cstddef>
#include <cstdint>
#include <cstdlib>

#include "tresor/snp/certs.h"
#include "tresor/snp/verify.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const tresor::ByteSpan in(reinterpret_cast<const std::byte*>(data), size);
  (void)tresor::snp::parse_endorsement_extensions(in);
  if (auto t = tresor::snp::parse_cert_table(in)) {
    auto again = tresor::snp::parse_cert_table(tresor::snp::serialize_cert_table(*t));
    if (!again || again->certs != t->certs) std::abort();
  }
  return 0;
}
