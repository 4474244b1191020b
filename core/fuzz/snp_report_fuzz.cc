// libFuzzer target for the SEV-SNP report parser: anything parse_report accepts must serialize
// back to exactly the input bytes (reserved fields are all checked, so nothing is dropped), and
// its signature conversion must not crash.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "tresor/snp/report.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const tresor::ByteSpan in(reinterpret_cast<const std::byte*>(data), size);
  auto r = tresor::snp::parse_report(in);
  if (!r) return 0;
  const auto out = tresor::snp::serialize_report(*r);
  if (size != out.size() || std::memcmp(out.data(), data, size) != 0) std::abort();
  (void)tresor::snp::signature_der(*r);
  (void)tresor::snp::layout_from_cpuid(*r);
  return 0;
}
