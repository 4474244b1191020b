// tresor/snp/certs.h — where VCEK/VLEK certificates come from in practice: the certificate table
// of an extended report, an offline directory cache, and AMD's Key Distribution Service (KDS),
// whose network fetch sits behind an interface, is rate limited, and is never on a job's path
// (DESIGN.md: AMD allows about one VCEK request per 10 s per address).
//
// References: AMD VCEK/KDS interface specification 57230 §4 (KDS URLs and query parameters);
// AMD GHCB specification 56421 §4.1.8 (SNP extended guest request: the certificate table of
// GUID ‖ offset ‖ length entries ended by an all-zero entry) and its GUIDs for VCEK, VLEK, ASK, ARK.
#pragma once

#include <array>
#include <ctime>
#include <map>
#include <memory>
#include <string>

#include "tresor/encoding.h"
#include "tresor/error.h"
#include "tresor/snp/verify.h"

namespace tresor::snp {

// ---- KDS URLs (57230 §4) --------------------------------------------------------------------------

/// VCEK of a chip at a TCB: https://kdsintf.amd.com/vcek/v1/{product}/{hwid}?blSPL=…&teeSPL=…&snpSPL=…&ucodeSPL=…
/// (Turin: an 8-byte hwID and fmcSPL first). kInvalidArgument for a wrong hwID size or the sim.
Result<std::string> kds_vcek_url(Product p, ByteSpan hw_id, const Tcb& tcb);
/// ASK (or ASVK) + ARK chain: …/{vcek|vlek}/v1/{product}/cert_chain
Result<std::string> kds_chain_url(Product p, bool vlek);
/// The ARK's CRL: …/{vcek|vlek}/v1/{product}/crl
Result<std::string> kds_crl_url(Product p, bool vlek);

// ---- extended-report certificate table (56421 §4.1.8) -------------------------------------------

inline constexpr std::string_view kGuidVcek = "63da758d-e664-4564-adc5-f4b93be8accd";
inline constexpr std::string_view kGuidVlek = "a8074bc2-a25a-483e-aae6-39c045a0b8a1";
inline constexpr std::string_view kGuidAsk = "4ab7b379-bbac-4fe4-a02f-05aef327c782";
inline constexpr std::string_view kGuidArk = "c0b406a4-a803-4952-9743-3fb6014cd0ae";

/// Certificates by GUID (lower-case text form).
struct CertTable {
  std::map<std::string, Bytes> certs;
};
/// Parses the table: entries of GUID (16 bytes) ‖ offset u32 ‖ length u32 (little-endian), ended by
/// an all-zero entry; offsets point past the entries into the same buffer. The GUID bytes are in
/// RFC 4122 order, as the text reads (63da758d-… is 63 da 75 8d … on the wire): that is how AMD's
/// own guest tool (AMDESE/sev-guest, cert-table.c: uuid_parse into the entry) and Google's
/// go-sev-guest (abi/abi.go, CertTable) write and read it; GHCB 56421 does not restate the order.
[[nodiscard]] Result<CertTable> parse_cert_table(ByteSpan table);
Bytes serialize_cert_table(const CertTable& t);

// ---- sources -------------------------------------------------------------------------------------

/// CertificateSource finds the endorsement certificate (DER) for a chip at a TCB.
class CertificateSource {
 public:
  virtual ~CertificateSource() = default;
  [[nodiscard]] virtual Result<Bytes> endorsement_cert(Product p, ByteSpan hw_id, const Tcb& tcb, bool vlek) = 0;
};

/// Offline cache: DIR/{product}/{hwid hex}/{tcb: bl-tee-snp-ucode[-fmc]}.der. No network, ever.
class DirectoryCache final : public CertificateSource {
 public:
  explicit DirectoryCache(std::string dir) : dir_(std::move(dir)) {}
  Result<Bytes> endorsement_cert(Product p, ByteSpan hw_id, const Tcb& tcb, bool vlek) override;
  /// Stores a certificate (mode 0644) where endorsement_cert will find it; refuses to replace one.
  [[nodiscard]] Result<void> put(Product p, ByteSpan hw_id, const Tcb& tcb, ByteSpan der);
  std::string path_for(Product p, ByteSpan hw_id, const Tcb& tcb) const;

 private:
  std::string dir_;
};

/// Certificates delivered with the report (the extended report's table). VLEKs are only ever
/// delivered this way (they are not per-chip, so KDS cannot look them up by hwID).
class TableSource final : public CertificateSource {
 public:
  explicit TableSource(CertTable t) : table_(std::move(t)) {}
  Result<Bytes> endorsement_cert(Product p, ByteSpan hw_id, const Tcb& tcb, bool vlek) override;

 private:
  CertTable table_;
};

/// The network, behind an interface: tests and air-gapped sites supply their own.
class Fetcher {
 public:
  virtual ~Fetcher() = default;
  [[nodiscard]] virtual Result<Bytes> get(const std::string& url) = 0;
};
class Clock {
 public:
  virtual ~Clock() = default;
  virtual std::time_t now() = 0;
};

/// KDS lookups through a cache: a cached certificate is returned without any request; a miss
/// is fetched at most once per `min_interval` seconds (AMD's limit) and stored in the cache; a
/// miss inside the interval fails at once with kUnavailable saying when to retry — it never
/// sleeps, so a job is never held up by AMD's rate limit.
class KdsSource final : public CertificateSource {
 public:
  KdsSource(Fetcher& fetcher, Clock& clock, DirectoryCache& cache, std::time_t min_interval = 10)
      : fetcher_(fetcher), clock_(clock), cache_(cache), min_interval_(min_interval) {}
  Result<Bytes> endorsement_cert(Product p, ByteSpan hw_id, const Tcb& tcb, bool vlek) override;
  unsigned requests() const { return requests_; }

 private:
  Fetcher& fetcher_;
  Clock& clock_;
  DirectoryCache& cache_;
  std::time_t min_interval_;
  std::time_t last_request_ = 0;
  bool requested_ = false;
  unsigned requests_ = 0;
};

}  // namespace tresor::snp
