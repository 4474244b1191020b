// tresor/snp/verify.h — verification of an SEV-SNP report: the AMD certificate chain, the
// endorsement key (VCEK or VLEK) and the report signature. Returns claims; it decides nothing
// about whether those claims are acceptable (that is the policy, validate.h).
//
// References: AMD SEV-SNP firmware ABI specification (56860) Table 23 and Chapter 10 (report
// signature: ECDSA P-384 with SHA-384 over bytes 0x000–0x29F); AMD "Versioned Chip Endorsement
// Key (VCEK) Certificate and KDS Interface Specification" (57230), Table 8 (VCEK/VLEK X.509
// extensions) and §2 (chain: ARK self-signed, ASK/ASVK signed by ARK, VCEK/VLEK signed by
// ASK/ASVK; RSA-PSS with SHA-384 for the AMD certificates).
#pragma once

#include <ctime>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "tresor/encoding.h"
#include "tresor/error.h"
#include "tresor/snp/report.h"

namespace tresor::snp {

/// kSim is the software secure processor of the `sim` platform (snp/sim.h): never pinned, trusted
/// only through an explicit SimTrust entry.
enum class Product { kMilan, kGenoa, kTurin, kSim };
std::string_view product_name(Product p);
/// Product of a VCEK/VLEK productName extension ("Milan-B0", "Genoa", "Turin-C1").
Result<Product> product_from_name(std::string_view product_name);
TcbLayout tcb_layout(Product p);

/// The AMD-specific X.509 extensions of a VCEK or VLEK (57230 Table 8; OID arc
/// 1.3.6.1.4.1.3704.1).
struct EndorsementExtensions {
  uint32_t struct_version = 0;     // .1
  std::string product_name;        // .2  (IA5String, e.g. "Milan-B0")
  Tcb tcb;                         // .3.1 blSPL, .3.2 teeSPL, .3.3 snpSPL, .3.8 ucodeSPL, .3.9 fmcSPL
  bool has_fmc = false;            // .3.9 present (Turin)
  std::array<uint8_t, 4> spl_4_7{};  // .3.4 – .3.7 (reserved SPLs, must be zero)
  Bytes hw_id;                     // .4  (OCTET STRING; VCEK only: 64 bytes, Turin 8)
  std::string csp_id;              // .5  (IA5String; VLEK only)
};

/// Parses the AMD extensions of a DER certificate. kMalformed names the missing or bad one.
[[nodiscard]] Result<EndorsementExtensions> parse_endorsement_extensions(ByteSpan der);

/// The pinned AMD certificates of one product, PEM, with their SHA-256 DER fingerprints.
struct PinnedRootInfo {
  Product product;
  std::string ark_pem, ask_pem, asvk_pem;
  std::string ark_sha256, ask_sha256, asvk_sha256;
};
std::vector<PinnedRootInfo> pinned_roots();
/// Checks every pinned root set: fingerprints, ARK self-signature, ASK and ASVK signed by the
/// ARK (RSASSA-PSS). A failure means the library itself is damaged.
[[nodiscard]] Result<void> check_pinned_roots();

/// The explicit trust entry for a sim root (snp/sim.h, `tresor sim init`): its ARK and ASK, PEM.
struct SimTrust {
  std::string ark_pem;
  std::string ask_pem;
};

struct VerifyInputs {
  ByteSpan report;                   // 0x4A0 bytes
  ByteSpan endorsement_cert;         // the VCEK or VLEK, DER or PEM
  /// Optional ASK/ASVK and ARK as PEM (KDS cert_chain format). Each must be byte-identical to
  /// the pinned AMD certificate of the product: they add nothing but a check.
  std::optional<std::string> chain_pem;
  /// Optional CRL of the product's ARK (DER or PEM): it must be signed by the ARK, current at
  /// `at` (issued before it, next update not past), and must not list the ASK/ASVK.
  std::optional<Bytes> crl;
  /// The time at which every certificate must be valid (injectable; never read from the clock
  /// here).
  std::time_t at = 0;
  /// Only with this set can a report from the sim secure processor (product "Sim") verify.
  const SimTrust* sim_trust = nullptr;
};

/// What a verified report says, with the facts the chain added.
struct VerifiedReport {
  Report report;
  Product product;
  TcbLayout layout;
  Tcb reported_tcb;
  bool vlek = false;
  EndorsementExtensions endorsement;
  /// True when the chain is a sim root trusted through SimTrust: not confidential hardware.
  /// Callers must say so loudly.
  bool sim = false;
};

/// Verifies, in order: the report parses; the endorsement certificate parses, names a known
/// product, and is of the kind the report's SIGNING_KEY says (VCEK/VLEK); the pinned ARK is
/// self-signed (RSA-PSS/SHA-384), the pinned ASK (or ASVK) is signed by the ARK, the
/// endorsement certificate is issued and signed by the ASK (or ASVK); all three are valid at
/// `at`; optional chain and CRL checks; hwID equals CHIP_ID (VCEK); the certificate's TCB
/// equals REPORTED_TCB; and the report signature verifies with the endorsement key. Errors:
/// kMalformed / kUnsupportedVersion for parsing, kAuth for any chain, binding or signature
/// failure — each naming the check and both values.
[[nodiscard]] Result<VerifiedReport> verify_report(const VerifyInputs& in);

struct VerifiedKey;

/// CachedVerifier is verify_report with memory: once an endorsement certificate's chain has
/// verified (with a given chain and CRL), later reports signed by it skip the chain's RSA
/// signatures and only pay parsing, the binding checks and one ECDSA verification. Validity is
/// still checked at each call's time. Holds at most 4096 chains (then starts over). Thread-safe.
class CachedVerifier {
 public:
  CachedVerifier();
  ~CachedVerifier();
  CachedVerifier(const CachedVerifier&) = delete;
  CachedVerifier& operator=(const CachedVerifier&) = delete;
  [[nodiscard]] Result<VerifiedReport> verify(const VerifyInputs& in);
  size_t cached_chains() const;

 private:
  mutable std::mutex mu_;
  std::map<std::string, std::shared_ptr<const VerifiedKey>> cache_;
};

}  // namespace tresor::snp
