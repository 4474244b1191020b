// SEV-SNP attestation report parsing and serialization. Every offset and rule cites AMD's SNP
// firmware ABI specification (56860): Table 23 (ATTESTATION_REPORT), Table 9 (GUEST_POLICY),
// Table 3 (TCB_VERSION), Table 24 / Chapter 10 (signature format).
#include "tresor/snp/report.h"

#include <cstdio>
#include <cstring>

#include "tresor/crypto.h"

namespace tresor::snp {
namespace {

uint32_t le32(ByteSpan b, size_t off) { return load_le32(b.data() + off); }
uint64_t le64(ByteSpan b, size_t off) { return uint64_t{le32(b, off)} | (uint64_t{le32(b, off + 4)} << 32); }
void put32(std::byte* p, size_t off, uint32_t v) { store_le32(p + off, v); }
void put64(std::byte* p, size_t off, uint64_t v) {
  store_le32(p + off, static_cast<uint32_t>(v));
  store_le32(p + off + 4, static_cast<uint32_t>(v >> 32));
}

std::string hex_offset(size_t off) {
  char buf[24];
  std::snprintf(buf, sizeof buf, "0x%03zX", off);
  return buf;
}

std::string hex64(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

std::unexpected<Error> malformed(size_t off, const std::string& field, const std::string& what) {
  return fail(ErrorCode::kMalformed, "SNP report " + field + " (offset " + hex_offset(off) + "): " + what);
}

// Reserved byte ranges must be zero (Table 23, "Reserved" rows).
Result<void> mbz(ByteSpan b, size_t lo, size_t hi, const std::string& field) {
  for (size_t i = lo; i < hi; ++i) {
    if (b[i] != std::byte{0}) {
      return malformed(i, field, "reserved byte is " + to_hex(b.subspan(i, 1)) + ", must be zero");
    }
  }
  return {};
}

template <size_t N>
void take(std::array<std::byte, N>& dst, ByteSpan b, size_t off) {
  std::memcpy(dst.data(), b.data() + off, N);
}
template <size_t N>
void give(std::byte* p, size_t off, const std::array<std::byte, N>& src) {
  std::memcpy(p + off, src.data(), N);
}

}  // namespace

Result<Tcb> decode_tcb(uint64_t raw, TcbLayout layout, std::string_view field) {
  Tcb t;
  uint64_t reserved = 0;
  if (layout == TcbLayout::kMilanGenoa) {
    // Table 3: BOOT_LOADER [7:0], TEE [15:8], reserved [47:16], SNP [55:48], MICROCODE [63:56].
    t.bootloader = static_cast<uint8_t>(raw);
    t.tee = static_cast<uint8_t>(raw >> 8);
    t.snp = static_cast<uint8_t>(raw >> 48);
    t.microcode = static_cast<uint8_t>(raw >> 56);
    reserved = raw & 0x0000FFFFFFFF0000ull;
  } else {
    // Table 3 (Turin): FMC [7:0], BOOT_LOADER [15:8], TEE [23:16], SNP [31:24], reserved [55:32],
    // MICROCODE [63:56].
    t.fmc = static_cast<uint8_t>(raw);
    t.bootloader = static_cast<uint8_t>(raw >> 8);
    t.tee = static_cast<uint8_t>(raw >> 16);
    t.snp = static_cast<uint8_t>(raw >> 24);
    t.microcode = static_cast<uint8_t>(raw >> 56);
    reserved = raw & 0x00FFFFFF00000000ull;
  }
  if (reserved != 0) {
    return fail(ErrorCode::kMalformed, "SNP " + std::string(field) + " " + hex64(raw) +
                                           " has reserved bits set for the " +
                                           (layout == TcbLayout::kTurin ? "Turin" : "Milan/Genoa") + " layout");
  }
  return t;
}

uint64_t encode_tcb(const Tcb& t, TcbLayout layout) {
  if (layout == TcbLayout::kMilanGenoa) {
    return uint64_t{t.bootloader} | (uint64_t{t.tee} << 8) | (uint64_t{t.snp} << 48) | (uint64_t{t.microcode} << 56);
  }
  return uint64_t{t.fmc} | (uint64_t{t.bootloader} << 8) | (uint64_t{t.tee} << 16) | (uint64_t{t.snp} << 24) |
         (uint64_t{t.microcode} << 56);
}

std::string tcb_string(const Tcb& t, TcbLayout layout) {
  std::string s;
  if (layout == TcbLayout::kTurin) s = "fmc=" + std::to_string(t.fmc) + " ";
  return s + "bl=" + std::to_string(t.bootloader) + " tee=" + std::to_string(t.tee) + " snp=" + std::to_string(t.snp) +
         " ucode=" + std::to_string(t.microcode);
}

Result<GuestPolicy> decode_policy(uint64_t raw) {
  // Table 9: bit 17 is reserved and must be one; bits 63:26 are reserved and must be zero.
  if ((raw & (1ull << 17)) == 0) {
    return fail(ErrorCode::kMalformed, "SNP report POLICY " + hex64(raw) + ": reserved bit 17 must be one");
  }
  if ((raw >> 26) != 0) {
    return fail(ErrorCode::kMalformed, "SNP report POLICY " + hex64(raw) + ": reserved bits 63:26 must be zero");
  }
  GuestPolicy p;
  p.abi_minor = static_cast<uint8_t>(raw);
  p.abi_major = static_cast<uint8_t>(raw >> 8);
  p.smt = (raw >> 16) & 1;
  p.migrate_ma = (raw >> 18) & 1;
  p.debug = (raw >> 19) & 1;
  p.single_socket = (raw >> 20) & 1;
  p.cxl_allow = (raw >> 21) & 1;
  p.mem_aes_256_xts = (raw >> 22) & 1;
  p.rapl_dis = (raw >> 23) & 1;
  p.ciphertext_hiding = (raw >> 24) & 1;
  p.page_swap_disable = (raw >> 25) & 1;
  return p;
}

uint64_t encode_policy(const GuestPolicy& p) {
  auto bit = [](bool b, int n) { return b ? (1ull << n) : 0ull; };
  return uint64_t{p.abi_minor} | (uint64_t{p.abi_major} << 8) | bit(p.smt, 16) | (1ull << 17) | bit(p.migrate_ma, 18) |
         bit(p.debug, 19) | bit(p.single_socket, 20) | bit(p.cxl_allow, 21) | bit(p.mem_aes_256_xts, 22) |
         bit(p.rapl_dis, 23) | bit(p.ciphertext_hiding, 24) | bit(p.page_swap_disable, 25);
}

Result<Report> parse_report(ByteSpan b) {
  if (b.size() != kReportSize) {
    return fail(ErrorCode::kMalformed, "SNP report is " + std::to_string(b.size()) + " bytes, want " +
                                           std::to_string(kReportSize) + " (0x4A0)");
  }
  Report r;
  r.version = le32(b, 0x000);
  if (r.version != 2 && r.version != 3 && r.version != 5) {
    return fail(ErrorCode::kUnsupportedVersion,
                "SNP report VERSION (offset 0x000) is " + std::to_string(r.version) + "; this build reads 2, 3 and 5");
  }
  r.guest_svn = le32(b, 0x004);
  r.policy = le64(b, 0x008);
  if (auto p = decode_policy(r.policy); !p) return std::unexpected(p.error());
  take(r.family_id, b, 0x010);
  take(r.image_id, b, 0x020);
  r.vmpl = le32(b, 0x030);
  r.signature_algo = le32(b, 0x034);
  if (r.signature_algo != kSigAlgoEcdsaP384Sha384) {
    return malformed(0x034, "SIGNATURE_ALGO", std::to_string(r.signature_algo) + " is not 1 (ECDSA P-384 with SHA-384)");
  }
  r.current_tcb = le64(b, 0x038);
  r.platform_info = le64(b, 0x040);
  // PLATFORM_INFO: bits 0–7 are defined by current firmware (SMT_EN, TSME_EN, ECC_EN, RAPL_DIS,
  // CIPHERTEXT_HIDING_EN, ALIAS_CHECK_COMPLETE, …); bits 63:8 are reserved.
  if ((r.platform_info >> 8) != 0) {
    return malformed(0x040, "PLATFORM_INFO", hex64(r.platform_info) + " has reserved bits 63:8 set");
  }
  const uint32_t key_info = le32(b, 0x048);
  r.author_key_en = key_info & 1;
  r.mask_chip_key = (key_info >> 1) & 1;
  const uint32_t signing_key = (key_info >> 2) & 7;
  if (signing_key >= 2 && signing_key <= 6) {
    return malformed(0x048, "SIGNING_KEY", std::to_string(signing_key) + " is reserved (0 VCEK, 1 VLEK, 7 none)");
  }
  r.signing_key = static_cast<SigningKey>(signing_key);
  if ((key_info >> 5) != 0) return malformed(0x048, "key information", "reserved bits 31:5 are set");
  TRESOR_TRY(mbz(b, 0x04C, 0x050, "reserved"));
  take(r.report_data, b, 0x050);
  take(r.measurement, b, 0x090);
  take(r.host_data, b, 0x0C0);
  take(r.id_key_digest, b, 0x0E0);
  take(r.author_key_digest, b, 0x110);
  take(r.report_id, b, 0x140);
  take(r.report_id_ma, b, 0x160);
  r.reported_tcb = le64(b, 0x180);
  if (r.version >= 3) {
    r.cpuid_fam_id = std::to_integer<uint8_t>(b[0x188]);
    r.cpuid_mod_id = std::to_integer<uint8_t>(b[0x189]);
    r.cpuid_step = std::to_integer<uint8_t>(b[0x18A]);
  } else {
    TRESOR_TRY(mbz(b, 0x188, 0x18B, "CPUID fields (reserved in version 2)"));
  }
  TRESOR_TRY(mbz(b, 0x18B, 0x1A0, "reserved"));
  take(r.chip_id, b, 0x1A0);
  r.committed_tcb = le64(b, 0x1E0);
  r.current_build = std::to_integer<uint8_t>(b[0x1E8]);
  r.current_minor = std::to_integer<uint8_t>(b[0x1E9]);
  r.current_major = std::to_integer<uint8_t>(b[0x1EA]);
  TRESOR_TRY(mbz(b, 0x1EB, 0x1EC, "reserved"));
  r.committed_build = std::to_integer<uint8_t>(b[0x1EC]);
  r.committed_minor = std::to_integer<uint8_t>(b[0x1ED]);
  r.committed_major = std::to_integer<uint8_t>(b[0x1EE]);
  TRESOR_TRY(mbz(b, 0x1EF, 0x1F0, "reserved"));
  r.launch_tcb = le64(b, 0x1F0);
  if (r.version >= 5) {
    r.launch_mit_vector = le64(b, 0x1F8);
    r.current_mit_vector = le64(b, 0x200);
  } else {
    TRESOR_TRY(mbz(b, 0x1F8, 0x208, "mitigation vectors (reserved before version 5)"));
  }
  TRESOR_TRY(mbz(b, 0x208, kSignatureOffset, "reserved"));
  take(r.signature_r, b, 0x2A0);
  take(r.signature_s, b, 0x2E8);
  // Table 24: R and S are followed by reserved bytes up to the end of the 512-byte field.
  TRESOR_TRY(mbz(b, 0x330, kReportSize, "SIGNATURE reserved"));
  return r;
}

std::array<std::byte, kReportSize> serialize_report(const Report& r) {
  std::array<std::byte, kReportSize> out{};
  std::byte* p = out.data();
  put32(p, 0x000, r.version);
  put32(p, 0x004, r.guest_svn);
  put64(p, 0x008, r.policy);
  give(p, 0x010, r.family_id);
  give(p, 0x020, r.image_id);
  put32(p, 0x030, r.vmpl);
  put32(p, 0x034, r.signature_algo);
  put64(p, 0x038, r.current_tcb);
  put64(p, 0x040, r.platform_info);
  put32(p, 0x048, (r.author_key_en ? 1u : 0u) | (r.mask_chip_key ? 2u : 0u) |
                      (static_cast<uint32_t>(r.signing_key) << 2));
  give(p, 0x050, r.report_data);
  give(p, 0x090, r.measurement);
  give(p, 0x0C0, r.host_data);
  give(p, 0x0E0, r.id_key_digest);
  give(p, 0x110, r.author_key_digest);
  give(p, 0x140, r.report_id);
  give(p, 0x160, r.report_id_ma);
  put64(p, 0x180, r.reported_tcb);
  if (r.version >= 3) {
    p[0x188] = std::byte{r.cpuid_fam_id};
    p[0x189] = std::byte{r.cpuid_mod_id};
    p[0x18A] = std::byte{r.cpuid_step};
  }
  give(p, 0x1A0, r.chip_id);
  put64(p, 0x1E0, r.committed_tcb);
  p[0x1E8] = std::byte{r.current_build};
  p[0x1E9] = std::byte{r.current_minor};
  p[0x1EA] = std::byte{r.current_major};
  p[0x1EC] = std::byte{r.committed_build};
  p[0x1ED] = std::byte{r.committed_minor};
  p[0x1EE] = std::byte{r.committed_major};
  put64(p, 0x1F0, r.launch_tcb);
  if (r.version >= 5) {
    put64(p, 0x1F8, r.launch_mit_vector);
    put64(p, 0x200, r.current_mit_vector);
  }
  give(p, 0x2A0, r.signature_r);
  give(p, 0x2E8, r.signature_s);
  return out;
}

Result<TcbLayout> layout_from_cpuid(const Report& r) {
  if (r.version < 3) {
    return fail(ErrorCode::kUnavailable,
                "a version 2 SNP report carries no CPUID fields; the product must come from the VCEK or chain");
  }
  // CPUID_FAM_ID is the extended family + base family: 0x19 (Zen 3/4: Milan, Genoa), 0x1A (Zen 5: Turin).
  if (r.cpuid_fam_id == 0x19) return TcbLayout::kMilanGenoa;
  if (r.cpuid_fam_id == 0x1A) return TcbLayout::kTurin;
  return fail(ErrorCode::kMalformed, "SNP report CPUID_FAM_ID (offset 0x188) is 0x" +
                                         to_hex(ByteSpan(reinterpret_cast<const std::byte*>(&r.cpuid_fam_id), 1)) +
                                         ", not a known SEV-SNP family (0x19, 0x1A)");
}

Result<Bytes> signature_der(const Report& r) {
  // Table 24: R and S are 72-byte little-endian integers; P-384 values fit in 48 bytes.
  Bytes raw(96);
  auto convert = [&](const std::array<std::byte, kEcdsaComponentSize>& le, size_t at, const char* name) -> Result<void> {
    for (size_t i = 48; i < kEcdsaComponentSize; ++i) {
      if (le[i] != std::byte{0}) {
        return malformed(name[0] == 'R' ? 0x2A0 + i : 0x2E8 + i, std::string("SIGNATURE ") + name,
                         "is longer than 48 bytes, not a P-384 value");
      }
    }
    for (size_t i = 0; i < 48; ++i) raw[at + i] = le[47 - i];
    return {};
  };
  TRESOR_TRY(convert(r.signature_r, 0, "R"));
  TRESOR_TRY(convert(r.signature_s, 48, "S"));
  return crypto::ecdsa_raw_to_der(raw);
}

}  // namespace tresor::snp
