// tresor/snp/measure.h — the SEV-SNP launch measurement a guest will have, computed offline from
// the firmware image, kernel, initrd, command line and vCPU layout, so that data owners approve
// an image before it runs (DESIGN.md, "Attestation and key release").
//
// References: SNP firmware ABI spec 56860 §8.17 / Table 67 (PAGE_INFO: the launch digest is
// SHA-384 over each page's PAGE_INFO, chained); AMD64 APM Vol. 2 Appendix B (VMCB state save
// area, the VMSA); edk2 OvmfPkg (the footer GUID table at the end of the image, the "ASEV" SEV
// metadata and its section types, the SEV-ES reset block); QEMU target/i386/sev.c (the kernel
// hashes table for -kernel/-initrd/-append). Pure: bytes in, digest out.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <string>

#include "tresor/encoding.h"
#include "tresor/error.h"

namespace tresor::snp {

/// CPUID(1).EAX signature for a QEMU vCPU model name ("EPYC-v4" → 0x800F12, "EPYC-Milan",
/// "EPYC-Genoa", "EPYC-Turin", …); kInvalidArgument lists the known names.
Result<uint32_t> vcpu_signature(std::string_view vcpu_type);

struct MeasureInputs {
  ByteSpan ovmf;                       // the whole firmware image (a multiple of 4 KiB)
  std::optional<ByteSpan> kernel;      // with -kernel: measured through the kernel-hashes table
  ByteSpan initrd;                     // empty when none
  std::string append;                  // kernel command line
  unsigned vcpus = 1;
  uint32_t vcpu_sig = 0x800F12;        // EPYC-v4
  uint64_t guest_features = 0x1;       // SEV_FEATURES of the VMSA (bit 0: SNP)
};

/// The 48-byte launch digest (the MEASUREMENT field of the guest's reports). Errors name what is
/// missing: an image without the OVMF footer table or SEV metadata, a kernel given to a firmware
/// without the SNP_KERNEL_HASHES section, more than one vCPU without a SEV-ES reset block.
[[nodiscard]] Result<std::array<std::byte, 48>> launch_digest(const MeasureInputs& in);

}  // namespace tresor::snp
