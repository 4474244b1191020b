// SEV-SNP launch measurement (see tresor/snp/measure.h for the references).
#include "tresor/snp/measure.h"

#include <cstring>
#include <map>
#include <vector>

#include "tresor/crypto.h"

namespace tresor::snp {
namespace {

constexpr size_t kPage = 4096;
constexpr uint64_t kFourGiB = 0x100000000ull;
// 56860 Table 67: PAGE_TYPE values in PAGE_INFO.
constexpr uint8_t kPageNormal = 1, kPageVmsa = 2, kPageZero = 3, kPageSecrets = 5, kPageCpuid = 6;
// The VMSA page is measured at GPA 2^52 - 4096 (the RMP records (u64)-1, page-aligned, bits
// above 51 clear).
constexpr uint64_t kVmsaGpa = 0xFFFFFFFFF000ull;

// GUIDs as they are stored (the first three fields little-endian), from their text form.
std::array<std::byte, 16> guid(std::string_view text) {
  std::string hex;
  for (char c : text) {
    if (c != '-') hex += c;
  }
  auto b = from_hex(hex);
  std::array<std::byte, 16> g{};
  std::memcpy(g.data(), b->data(), 16);
  std::swap(g[0], g[3]);
  std::swap(g[1], g[2]);
  std::swap(g[4], g[5]);
  std::swap(g[6], g[7]);
  return g;
}

// edk2 OvmfPkg/ResetVector: the table that ends 32 bytes before the end of the image.
const auto kFooterGuid = guid("96b582de-1fb2-45f7-baea-a366c55a082d");
const auto kSevHashTableRvGuid = guid("7255371f-3a3b-4b04-927b-1da6efa8d454");
const auto kSevEsResetBlockGuid = guid("00f771de-1a7e-4fcb-890e-68c77e2fb44e");
const auto kSevMetadataGuid = guid("dc886566-984a-4798-a75e-5585a7bf67cc");
// QEMU target/i386/sev.c: the kernel hashes table and its entries.
const auto kHashTableGuid = guid("9438d606-4f22-4cc9-b479-a793d411fd21");
const auto kKernelEntryGuid = guid("4de79437-abd2-427f-b835-d5b172d2045b");
const auto kInitrdEntryGuid = guid("44baf731-3a2f-4bd7-9af1-41e29169781d");
const auto kCmdlineEntryGuid = guid("97d02dd8-bd20-4c94-aa78-e7714d36ab2a");

// OvmfPkg SEV metadata section types.
enum SectionType : uint32_t { kSecMem = 1, kSecrets = 2, kCpuid = 3, kSvsmCaa = 4, kKernelHashes = 0x10 };

struct Section {
  uint32_t gpa, size, type;
};

struct Firmware {
  std::map<std::array<std::byte, 16>, Bytes> table;
  std::vector<Section> sections;
};

uint32_t le32(const std::byte* p) { return load_le32(p); }

Result<Firmware> parse_firmware(ByteSpan img) {
  constexpr size_t kEntryHeader = 18;  // u16 size ‖ 16-byte GUID, at the END of each entry
  Firmware fw;
  if (img.size() < kPage || img.size() % kPage != 0) {
    return fail(ErrorCode::kInvalidArgument, "firmware image is " + std::to_string(img.size()) +
                                                 " bytes; it must be a non-empty multiple of 4 KiB");
  }
  const size_t footer = img.size() - 32 - kEntryHeader;
  if (std::memcmp(img.data() + footer + 2, kFooterGuid.data(), 16) != 0) {
    return fail(ErrorCode::kInvalidArgument, "firmware image has no OVMF footer GUID table: not an SEV-capable OVMF build");
  }
  const size_t table_size = load_le16(img.data() + footer);
  if (table_size < kEntryHeader || table_size - kEntryHeader > footer) {
    return fail(ErrorCode::kInvalidArgument, "firmware footer table size " + std::to_string(table_size) + " is invalid");
  }
  ByteSpan rest = img.subspan(footer - (table_size - kEntryHeader), table_size - kEntryHeader);
  while (rest.size() >= kEntryHeader) {
    const std::byte* h = rest.data() + rest.size() - kEntryHeader;
    const size_t size = load_le16(h);
    if (size < kEntryHeader || size > rest.size()) {
      return fail(ErrorCode::kInvalidArgument, "firmware footer table entry of size " + std::to_string(size) + " is invalid");
    }
    std::array<std::byte, 16> g;
    std::memcpy(g.data(), h + 2, 16);
    const ByteSpan data = rest.subspan(rest.size() - size, size - kEntryHeader);
    fw.table[g] = Bytes(data.begin(), data.end());
    rest = rest.first(rest.size() - size);
  }
  if (auto it = fw.table.find(kSevMetadataGuid); it != fw.table.end() && it->second.size() >= 4) {
    const size_t from_end = le32(it->second.data());
    if (from_end > img.size() || from_end < 16) return fail(ErrorCode::kInvalidArgument, "SEV metadata offset is outside the image");
    const std::byte* m = img.data() + img.size() - from_end;
    if (std::memcmp(m, "ASEV", 4) != 0 || le32(m + 8) != 1) {
      return fail(ErrorCode::kInvalidArgument, "SEV metadata lacks the \"ASEV\" signature or is not version 1");
    }
    const uint32_t n = le32(m + 12);
    if (16 + size_t{n} * 12 > from_end) return fail(ErrorCode::kInvalidArgument, "SEV metadata runs past the image");
    for (uint32_t i = 0; i < n; ++i) {
      const std::byte* d = m + 16 + i * 12;
      fw.sections.push_back({le32(d), le32(d + 4), le32(d + 8)});
    }
  }
  if (fw.sections.empty()) return fail(ErrorCode::kInvalidArgument, "firmware image has no SEV metadata sections: not an SNP OVMF");
  return fw;
}

class LaunchDigest {
 public:
  // 56860 Table 67: PAGE_INFO = DIGEST_CUR ‖ CONTENTS ‖ LENGTH (0x70) ‖ PAGE_TYPE ‖ IMI_PAGE ‖
  // VMPL3/2/1_PERMS ‖ reserved ‖ GPA; the new digest is SHA-384(PAGE_INFO).
  Result<void> update(uint8_t type, uint64_t gpa, ByteSpan contents48) {
    std::array<std::byte, 0x70> info{};
    std::memcpy(info.data(), ld_.data(), 48);
    std::memcpy(info.data() + 48, contents48.data(), 48);
    store_le16(info.data() + 96, 0x70);
    info[98] = std::byte{type};
    store_le32(info.data() + 104, static_cast<uint32_t>(gpa));
    store_le32(info.data() + 108, static_cast<uint32_t>(gpa >> 32));
    auto d = crypto::sha384(info);
    if (!d) return std::unexpected(d.error());
    ld_ = *d;
    return {};
  }
  Result<void> normal_pages(uint64_t gpa, ByteSpan data) {
    for (size_t off = 0; off < data.size(); off += kPage) {
      auto h = crypto::sha384(data.subspan(off, kPage));
      if (!h) return std::unexpected(h.error());
      TRESOR_TRY(update(kPageNormal, gpa + off, *h));
    }
    return {};
  }
  Result<void> typed_pages(uint8_t type, uint64_t gpa, uint64_t size) {
    static const std::array<std::byte, 48> kZero{};
    for (uint64_t off = 0; off < size; off += kPage) TRESOR_TRY(update(type, gpa + off, kZero));
    return {};
  }
  const std::array<std::byte, 48>& value() const { return ld_; }

 private:
  std::array<std::byte, 48> ld_{};
};

// QEMU's kernel hashes table: header GUID ‖ u16 length ‖ three entries (GUID ‖ u16 length ‖
// SHA-256), command line first, padded to a multiple of 16 bytes.
Result<Bytes> hashes_page(const MeasureInputs& in, size_t offset_in_page) {
  Bytes table;
  auto put_guid = [&](const std::array<std::byte, 16>& g) { table.insert(table.end(), g.begin(), g.end()); };
  auto put16 = [&](uint16_t v) {
    table.push_back(std::byte(v & 0xff));
    table.push_back(std::byte(v >> 8));
  };
  constexpr uint16_t kEntry = 16 + 2 + 32;
  constexpr uint16_t kTable = 16 + 2 + 3 * kEntry;
  put_guid(kHashTableGuid);
  put16(kTable);
  Bytes cmdline = to_bytes(in.append);
  cmdline.push_back(std::byte{0});
  const std::pair<const std::array<std::byte, 16>*, ByteSpan> entries[] = {
      {&kCmdlineEntryGuid, cmdline}, {&kInitrdEntryGuid, in.initrd}, {&kKernelEntryGuid, *in.kernel}};
  for (const auto& [g, data] : entries) {
    put_guid(*g);
    put16(kEntry);
    auto h = crypto::sha256(data);
    if (!h) return std::unexpected(h.error());
    table.insert(table.end(), h->begin(), h->end());
  }
  table.resize((table.size() + 15) & ~size_t{15}, std::byte{0});
  if (offset_in_page + table.size() > kPage) return fail(ErrorCode::kInvalidArgument, "kernel hashes table crosses its page");
  Bytes page(kPage);
  std::memcpy(page.data() + offset_in_page, table.data(), table.size());
  return page;
}

// AMD64 APM Vol. 2 Appendix B, state save area (VMSA) of a vCPU at QEMU's reset state.
Bytes vmsa_page(uint32_t eip, const MeasureInputs& in) {
  Bytes p(kPage);
  auto put16 = [&](size_t off, uint16_t v) { store_le16(p.data() + off, v); };
  auto put32 = [&](size_t off, uint32_t v) { store_le32(p.data() + off, v); };
  auto put64 = [&](size_t off, uint64_t v) {
    store_le32(p.data() + off, static_cast<uint32_t>(v));
    store_le32(p.data() + off + 4, static_cast<uint32_t>(v >> 32));
  };
  // Segment registers, 16 bytes each: selector u16, attributes u16, limit u32, base u64.
  auto seg = [&](size_t off, uint16_t sel, uint16_t attr, uint32_t limit, uint64_t base) {
    put16(off, sel);
    put16(off + 2, attr);
    put32(off + 4, limit);
    put64(off + 8, base);
  };
  seg(0x000, 0, 0x93, 0xffff, 0);                        // ES
  seg(0x010, 0xf000, 0x9b, 0xffff, eip & 0xffff0000u);   // CS
  seg(0x020, 0, 0x93, 0xffff, 0);                        // SS
  seg(0x030, 0, 0x93, 0xffff, 0);                        // DS
  seg(0x040, 0, 0x93, 0xffff, 0);                        // FS
  seg(0x050, 0, 0x93, 0xffff, 0);                        // GS
  seg(0x060, 0, 0, 0xffff, 0);                           // GDTR
  seg(0x070, 0, 0x82, 0xffff, 0);                        // LDTR
  seg(0x080, 0, 0, 0xffff, 0);                           // IDTR
  seg(0x090, 0, 0x8b, 0xffff, 0);                        // TR
  put64(0x0D0, 0x1000);                  // EFER: SVME (set by KVM)
  put64(0x148, 0x40);                    // CR4: MCE
  put64(0x158, 0x10);                    // CR0: ET
  put64(0x160, 0x400);                   // DR7
  put64(0x168, 0xffff0ff0);              // DR6
  put64(0x170, 0x2);                     // RFLAGS
  put64(0x178, eip & 0xffffu);           // RIP
  put64(0x268, 0x0007040600070406ull);   // G_PAT (APM Vol. 2 §A.3 reset value)
  put64(0x310, in.vcpu_sig);             // RDX: the CPUID signature at reset
  put64(0x3B0, in.guest_features);       // SEV_FEATURES
  put64(0x3E8, 0x1);                     // XCR0
  put32(0x408, 0x1f80);                  // MXCSR
  put16(0x410, 0x37f);                   // x87 FCW
  return p;
}

}  // namespace

Result<uint32_t> vcpu_signature(std::string_view t) {
  // CPUID Fn0000_0001_EAX (AMD 25481): family > 0xF is split into base 0xF and extended family.
  auto sig = [](uint32_t family, uint32_t model, uint32_t stepping) {
    const uint32_t fam_lo = family > 0xf ? 0xf : family;
    const uint32_t fam_hi = family > 0xf ? (family - 0xf) & 0xff : 0;
    return (fam_hi << 20) | (((model >> 4) & 0xf) << 16) | (fam_lo << 8) | ((model & 0xf) << 4) | (stepping & 0xf);
  };
  const std::pair<std::string_view, uint32_t> known[] = {
      {"EPYC", sig(23, 1, 2)},          {"EPYC-v1", sig(23, 1, 2)},        {"EPYC-v2", sig(23, 1, 2)},
      {"EPYC-IBPB", sig(23, 1, 2)},     {"EPYC-v3", sig(23, 1, 2)},        {"EPYC-v4", sig(23, 1, 2)},
      {"EPYC-Rome", sig(23, 49, 0)},    {"EPYC-Rome-v1", sig(23, 49, 0)},  {"EPYC-Rome-v2", sig(23, 49, 0)},
      {"EPYC-Rome-v3", sig(23, 49, 0)}, {"EPYC-Milan", sig(25, 1, 1)},     {"EPYC-Milan-v1", sig(25, 1, 1)},
      {"EPYC-Milan-v2", sig(25, 1, 1)}, {"EPYC-Genoa", sig(25, 17, 0)},    {"EPYC-Genoa-v1", sig(25, 17, 0)},
      {"EPYC-Turin", sig(26, 0, 0)}};
  std::string names;
  for (const auto& [name, value] : known) {
    if (name == t) return value;
    names += (names.empty() ? "" : ", ") + std::string(name);
  }
  return fail(ErrorCode::kInvalidArgument, "unknown vCPU type '" + std::string(t) + "' (known: " + names + ")");
}

Result<std::array<std::byte, 48>> launch_digest(const MeasureInputs& in) {
  auto fw = parse_firmware(in.ovmf);
  if (!fw) return std::unexpected(fw.error());
  if (in.vcpus == 0 || in.vcpus > 512) return fail(ErrorCode::kInvalidArgument, "vCPU count must be 1..512");
  LaunchDigest ld;
  // 1. The firmware image, mapped so that it ends at 4 GiB.
  TRESOR_TRY(ld.normal_pages(kFourGiB - in.ovmf.size(), in.ovmf));
  // 2. The pages the SEV metadata describes, in its order.
  bool has_hashes = false;
  for (const Section& s : fw->sections) {
    switch (s.type) {
      case kSecMem:
      case kSvsmCaa: TRESOR_TRY(ld.typed_pages(kPageZero, s.gpa, s.size)); break;
      case kSecrets: TRESOR_TRY(ld.typed_pages(kPageSecrets, s.gpa, kPage)); break;
      case kCpuid: TRESOR_TRY(ld.typed_pages(kPageCpuid, s.gpa, kPage)); break;
      case kKernelHashes:
        has_hashes = true;
        if (in.kernel) {
          auto rv = fw->table.find(kSevHashTableRvGuid);
          if (rv == fw->table.end() || rv->second.size() < 4) {
            return fail(ErrorCode::kInvalidArgument, "firmware has a kernel-hashes section but no SEV hash table GUID entry");
          }
          auto page = hashes_page(in, le32(rv->second.data()) & (kPage - 1));
          if (!page) return std::unexpected(page.error());
          if (s.size != kPage) return fail(ErrorCode::kInvalidArgument, "kernel-hashes section is not one page");
          TRESOR_TRY(ld.normal_pages(s.gpa, *page));
        } else {
          TRESOR_TRY(ld.typed_pages(kPageZero, s.gpa, s.size));
        }
        break;
      default:
        return fail(ErrorCode::kInvalidArgument, "firmware SEV metadata has an unknown section type " + std::to_string(s.type));
    }
  }
  if (in.kernel && !has_hashes) {
    return fail(ErrorCode::kInvalidArgument,
                "a kernel was given, but this firmware has no SNP_KERNEL_HASHES section: it cannot measure a "
                "kernel (use an AmdSev OVMF build)");
  }
  // 3. One VMSA per vCPU: the bootstrap processor starts at the reset vector, the others at the
  //    SEV-ES reset block's address.
  uint32_t ap_eip = 0;
  if (auto rb = fw->table.find(kSevEsResetBlockGuid); rb != fw->table.end() && rb->second.size() >= 4) {
    ap_eip = le32(rb->second.data());
  }
  if (in.vcpus > 1 && ap_eip == 0) {
    return fail(ErrorCode::kInvalidArgument, "firmware has no SEV-ES reset block: it cannot start more than one vCPU");
  }
  for (unsigned i = 0; i < in.vcpus; ++i) {
    const Bytes page = vmsa_page(i == 0 ? 0xfffffff0u : ap_eip, in);
    auto h = crypto::sha384(page);
    if (!h) return std::unexpected(h.error());
    TRESOR_TRY(ld.update(kPageVmsa, kVmsaGpa, *h));
  }
  return ld.value();
}

}  // namespace tresor::snp
