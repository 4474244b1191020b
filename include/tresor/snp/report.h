// tresor/snp/report.h — the SEV-SNP attestation report: parse and serialize, field by field.
//
// Reference: AMD "SEV Secure Nested Paging Firmware ABI Specification" (publication 56860),
// Table 23 "ATTESTATION_REPORT Structure" (report versions 2, 3 and 5), Table 9 "GUEST_POLICY
// Structure", Table 3 "TCB_VERSION Structure" (and its Turin layout), Table 24 "Signature
// Format" / Chapter 10 "ECDSA P-384 with SHA-384". Offsets below are byte offsets into the
// 0x4A0-byte report, as in the specification.
//
// Pure code (STYLE.md rule 4): spans in, structs or errors out; no I/O, no clock, no logging.
// Parsing stops at the first error and names the field; it never interprets a report's meaning
// (that is verify.h and validate.h).
#pragma once

#include <array>
#include <cstdint>
#include <string>

#include "tresor/encoding.h"
#include "tresor/error.h"

namespace tresor::snp {

inline constexpr size_t kReportSize = 0x4A0;     // Table 23: the whole structure
inline constexpr size_t kSignedSize = 0x2A0;     // Table 23: SIGNATURE covers bytes 0x000–0x29F
inline constexpr size_t kSignatureOffset = 0x2A0;
inline constexpr size_t kEcdsaComponentSize = 72;  // Table 24: R and S, little-endian, zero-extended
inline constexpr uint32_t kSigAlgoEcdsaP384Sha384 = 1;  // Table 23 SIGNATURE_ALGO / Chapter 10

/// Which TCB_VERSION layout a report uses (Table 3): Milan and Genoa pack
/// BOOT_LOADER[7:0] TEE[15:8] SNP[55:48] MICROCODE[63:56]; Turin packs FMC[7:0] BOOT_LOADER[15:8]
/// TEE[23:16] SNP[31:24] MICROCODE[63:56].
enum class TcbLayout { kMilanGenoa, kTurin };

struct Tcb {
  uint8_t fmc = 0;  // Turin only
  uint8_t bootloader = 0;
  uint8_t tee = 0;
  uint8_t snp = 0;
  uint8_t microcode = 0;
  bool operator==(const Tcb&) const = default;
};
/// Decodes a TCB_VERSION; kMalformed when reserved bits of the layout are set.
Result<Tcb> decode_tcb(uint64_t raw, TcbLayout layout, std::string_view field);
uint64_t encode_tcb(const Tcb& tcb, TcbLayout layout);
/// "bl=3 tee=0 snp=8 ucode=115" (with "fmc=…" first for Turin).
std::string tcb_string(const Tcb& tcb, TcbLayout layout);

/// GUEST_POLICY (Table 9).
struct GuestPolicy {
  uint8_t abi_minor = 0;      // [7:0]
  uint8_t abi_major = 0;      // [15:8]
  bool smt = false;           // [16] SMT allowed
  // [17] reserved, must be one
  bool migrate_ma = false;    // [18]
  bool debug = false;         // [19]
  bool single_socket = false; // [20]
  bool cxl_allow = false;     // [21]
  bool mem_aes_256_xts = false;  // [22]
  bool rapl_dis = false;      // [23]
  bool ciphertext_hiding = false;  // [24]
  bool page_swap_disable = false;  // [25]
  // [63:26] reserved, must be zero
};
Result<GuestPolicy> decode_policy(uint64_t raw);
uint64_t encode_policy(const GuestPolicy& p);

/// SIGNING_KEY of the report's key-information field (Table 23, offset 0x48 bits 4:2).
enum class SigningKey : uint8_t { kVcek = 0, kVlek = 1, kNone = 7 };

/// The report, every field as the specification names it. Multi-byte integers are host values
/// (the report stores them little-endian); byte arrays are as stored.
struct Report {
  uint32_t version = 0;                    // 0x000
  uint32_t guest_svn = 0;                  // 0x004
  uint64_t policy = 0;                     // 0x008 GUEST_POLICY
  std::array<std::byte, 16> family_id{};   // 0x010
  std::array<std::byte, 16> image_id{};    // 0x020
  uint32_t vmpl = 0;                       // 0x030
  uint32_t signature_algo = 0;             // 0x034
  uint64_t current_tcb = 0;                // 0x038 TCB_VERSION
  uint64_t platform_info = 0;              // 0x040
  bool author_key_en = false;              // 0x048 bit 0
  bool mask_chip_key = false;              // 0x048 bit 1
  SigningKey signing_key = SigningKey::kVcek;  // 0x048 bits 4:2
  std::array<std::byte, 64> report_data{};       // 0x050
  std::array<std::byte, 48> measurement{};       // 0x090
  std::array<std::byte, 32> host_data{};         // 0x0C0
  std::array<std::byte, 48> id_key_digest{};     // 0x0E0
  std::array<std::byte, 48> author_key_digest{}; // 0x110
  std::array<std::byte, 32> report_id{};         // 0x140
  std::array<std::byte, 32> report_id_ma{};      // 0x160
  uint64_t reported_tcb = 0;                     // 0x180
  uint8_t cpuid_fam_id = 0;                      // 0x188 (version ≥ 3)
  uint8_t cpuid_mod_id = 0;                      // 0x189 (version ≥ 3)
  uint8_t cpuid_step = 0;                        // 0x18A (version ≥ 3)
  std::array<std::byte, 64> chip_id{};           // 0x1A0 (Turin: 8 bytes, the rest zero)
  uint64_t committed_tcb = 0;                    // 0x1E0
  uint8_t current_build = 0;                     // 0x1E8
  uint8_t current_minor = 0;                     // 0x1E9
  uint8_t current_major = 0;                     // 0x1EA
  uint8_t committed_build = 0;                   // 0x1EC
  uint8_t committed_minor = 0;                   // 0x1ED
  uint8_t committed_major = 0;                   // 0x1EE
  uint64_t launch_tcb = 0;                       // 0x1F0
  uint64_t launch_mit_vector = 0;                // 0x1F8 (version ≥ 5)
  uint64_t current_mit_vector = 0;               // 0x200 (version ≥ 5)
  std::array<std::byte, kEcdsaComponentSize> signature_r{};  // 0x2A0, little-endian
  std::array<std::byte, kEcdsaComponentSize> signature_s{};  // 0x2E8, little-endian

  bool operator==(const Report&) const = default;
};

/// Parses exactly kReportSize bytes. Accepts versions 2, 3 and 5; rejects any other version,
/// a reserved field or bit that is not zero (GUEST_POLICY bit 17 must be one), a reserved
/// SIGNING_KEY value, an unknown SIGNATURE_ALGO, version-specific fields set in an older
/// version, and bytes after the signature's R and S — each error naming the field and offset.
[[nodiscard]] Result<Report> parse_report(ByteSpan bytes);
/// Serializes a report byte-exactly as parse_report read it (reserved fields zero).
std::array<std::byte, kReportSize> serialize_report(const Report& r);

/// The TCB layout the report's CPUID fields imply: Turin for family 0x1A, Milan/Genoa for
/// family 0x19; for version 2 reports (no CPUID fields) kUnavailable — the caller must learn the
/// product from context (the VCEK's productName, or the chain that verifies).
Result<TcbLayout> layout_from_cpuid(const Report& r);

/// The report signature as DER (Ecdsa-Sig-Value) for OpenSSL: R and S converted from 72-byte
/// little-endian to big-endian integers. kMalformed if either exceeds 48 bytes.
[[nodiscard]] Result<Bytes> signature_der(const Report& r);

}  // namespace tresor::snp
