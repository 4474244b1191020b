// tresor/vm/image.h — the pure parts of a guest image (issue 6, item 1; docs/images.md): the
// uncompressed kernel inside a bzImage, a byte-reproducible initramfs (cpio "newc"), the module
// load order from modules.dep, and the image manifest that data owners approve. No I/O here: the
// `tresor image build` command reads the inputs and writes the image directory.
//
// Reproducibility: the same inputs give the same bytes. The archive's entries are sorted by path,
// with modification time 0, owner 0:0, inode numbers by position and fixed modes; nothing reads
// a clock, a user name or the build host's umask.
//
// References: Linux Documentation/driver-api/early-userspace/buffer-format.rst (the newc cpio
// format of initramfs); Documentation/arch/x86/boot.rst (bzImage: setup sectors, then the
// compressed payload; the kernel decompresses itself); the .xz container format (tukaani.org,
// "The .xz File Format" 1.0.4 §2.1.1: stream header magic FD 37 7A 58 5A 00).
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "tresor/encoding.h"
#include "tresor/error.h"

namespace tresor::vm {

/// The ELF vmlinux inside a bzImage compressed with XZ (Debian's CONFIG_KERNEL_XZ): the first XZ
/// stream after the setup code, decoded. QEMU boots it directly (PVH entry), which under TCG takes
/// a third of the time of letting the kernel decompress itself. kMalformed when there is no XZ
/// stream or the result is not ELF; kUnsupportedVersion names another compression (gzip, zstd).
[[nodiscard]] Result<Bytes> extract_vmlinux(ByteSpan bzimage);

struct CpioEntry {
  std::string path;         // relative, no leading '/': "init", "usr/lib/x.so"
  uint32_t mode = 0;        // type and permission bits: S_IFDIR|0755, S_IFREG|0755, S_IFLNK|0777
  Bytes data;               // file contents, or the link target of a symlink
};

/// A newc archive of `entries` (sorted by path here; every parent directory must be listed),
/// ending with the TRAILER!!! entry and padded to 512 bytes. kInvalidArgument names an absolute
/// or ".." path, a duplicate, a missing parent, or a type other than directory, file or symlink.
[[nodiscard]] Result<Bytes> cpio_newc(std::vector<CpioEntry> entries);
/// Reads a newc archive (tests, `tresor image show`). kMalformed names the entry and field.
[[nodiscard]] Result<std::vector<CpioEntry>> parse_cpio_newc(ByteSpan archive);

/// Module files to load, in order, for the modules `wanted` (names as modprobe takes them:
/// "virtio_pci", "9pnet_virtio"; '-' and '_' are the same), from the text of modules.dep:
/// dependencies before their users, each once. kInvalidArgument names a module the kernel
/// does not have.
[[nodiscard]] Result<std::vector<std::string>> module_load_order(std::string_view modules_dep, const std::vector<std::string>& wanted);

/// What `tresor image build` writes as image.json: the digests of every boot file, the
/// command line, and — when built for SEV-SNP with an AmdSev OVMF — the launch measurement data
/// owners approve. Digests are SHA-256, hex.
struct ImageManifest {
  std::string name;
  std::string kernel_release;  // "6.1.0-57-amd64"
  std::string cmdline;
  std::string kernel_sha256, vmlinux_sha256, initrd_sha256;
  // SNP: the firmware and vCPU layout the measurement is for (empty/0 when built without).
  std::string firmware, firmware_sha256, vcpu_type;
  unsigned vcpus = 0;
  std::optional<std::array<std::byte, 48>> measurement;
};
[[nodiscard]] std::string image_manifest_json(const ImageManifest& m);
[[nodiscard]] Result<ImageManifest> parse_image_manifest(std::string_view json);

}  // namespace tresor::vm
