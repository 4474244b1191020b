// The pinned AMD root certificates (core/snp/amd_roots.cc). Private to core/.
#pragma once

#include <array>

#include "tresor/snp/verify.h"

namespace tresor::snp::detail {

struct PinnedCert {
  const char* pem;
  const char* sha256_hex;  // of the DER encoding
};

struct PinnedRoots {
  Product product;
  PinnedCert ark;
  PinnedCert ask;
  PinnedCert asvk;
};

const std::array<PinnedRoots, 3>& pinned_root_table();

}  // namespace tresor::snp::detail
