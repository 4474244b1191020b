// The pure parts of a guest image (include/tresor/vm/image.h): the newc initramfs — byte for byte
// reproducible, read back by GNU cpio (the system's, as an independent reader) and by our own
// parser, every refusal named; the module load order from modules.dep (dependencies first, each
// once; the real kernel's file too when one is installed); the vmlinux inside an XZ-compressed
// kernel (a synthetic one made with liblzma's encoder, and Debian's real kernel when installed);
// and image.json, strictly parsed.
#include "tresor/vm/image.h"

#include <lzma.h>
#include <sys/stat.h>

#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>

#include "support/test_support.h"

namespace tresor::vm {
namespace {

using testing::FailsWith;

Bytes text(std::string_view s) { return Bytes(as_bytes(s).begin(), as_bytes(s).end()); }

std::vector<CpioEntry> sample() {
  return {{"init", S_IFREG | 0755, text("#!/bin/sh\necho hi\n")},
          {"bin", S_IFDIR | 0755, {}},
          {"bin/sh", S_IFLNK | 0777, text("busybox")},
          {"bin/busybox", S_IFREG | 0755, testing::pattern_bytes(1001, 7)},
          {"etc", S_IFDIR | 0755, {}},
          {"etc/empty", S_IFREG | 0644, {}}};
}

TEST(VmImage, CpioIsReproducibleAndReadBack) {
  auto a = cpio_newc(sample());
  ASSERT_TRUE(a) << a.error().message;
  auto reversed = sample();
  std::ranges::reverse(reversed);
  auto b = cpio_newc(reversed);
  ASSERT_TRUE(b);
  EXPECT_EQ(*a, *b) << "entry order does not change the bytes";
  EXPECT_EQ(a->size() % 512, 0u);

  auto back = parse_cpio_newc(*a);
  ASSERT_TRUE(back) << back.error().message;
  ASSERT_EQ(back->size(), 6u);
  EXPECT_EQ((*back)[0].path, "bin");
  EXPECT_EQ((*back)[1].path, "bin/busybox");
  EXPECT_EQ((*back)[1].data, testing::pattern_bytes(1001, 7));
  EXPECT_EQ((*back)[2].mode, static_cast<uint32_t>(S_IFLNK | 0777));
  EXPECT_EQ((*back)[2].data, text("busybox"));

  // GNU cpio, an independent reader, extracts the same files.
  testing::TempDir dir;
  testing::write_file(dir.file("a.cpio"), *a);
  auto r = testing::run_command({"/bin/sh", "-c", "cd " + dir.path().string() + " && mkdir x && cd x && cpio -id --quiet < ../a.cpio && "
                                 "cat init && readlink bin/sh && stat -c %a bin/busybox && stat -c %s bin/busybox"});
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, "#!/bin/sh\necho hi\nbusybox\n755\n1001\n");
}

TEST(VmImage, CpioRefusesWhatIsNotAnInitramfs) {
  auto with = [](CpioEntry e) {
    auto v = sample();
    v.push_back(std::move(e));
    return cpio_newc(v);
  };
  EXPECT_TRUE(FailsWith(with({"/etc/passwd", S_IFREG | 0644, {}}), ErrorCode::kInvalidArgument));
  EXPECT_TRUE(FailsWith(with({"etc/../x", S_IFREG | 0644, {}}), ErrorCode::kInvalidArgument));
  auto missing = with({"usr/bin/x", S_IFREG | 0755, {}});
  ASSERT_FALSE(missing);
  EXPECT_NE(missing.error().message.find("its directory 'usr/bin' is not listed"), std::string::npos) << missing.error().message;
  auto dup = with({"init", S_IFREG | 0755, {}});
  ASSERT_FALSE(dup);
  EXPECT_NE(dup.error().message.find("listed twice"), std::string::npos);
  EXPECT_TRUE(FailsWith(with({"dev/null", S_IFCHR | 0666, {}}), ErrorCode::kInvalidArgument));

  auto a = *cpio_newc(sample());
  EXPECT_TRUE(FailsWith(parse_cpio_newc(ByteSpan(a).first(200)), ErrorCode::kMalformed));
  Bytes bad_magic = a;
  bad_magic[0] = std::byte{'1'};
  EXPECT_TRUE(FailsWith(parse_cpio_newc(bad_magic), ErrorCode::kMalformed));
}

TEST(VmImage, ModuleLoadOrder) {
  const std::string dep =
      "kernel/fs/9p/9p.ko: kernel/net/9p/9pnet.ko kernel/fs/netfs/netfs.ko\n"
      "kernel/net/9p/9pnet_virtio.ko: kernel/net/9p/9pnet.ko kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko\n"
      "kernel/net/9p/9pnet.ko:\n"
      "kernel/fs/netfs/netfs.ko:\n"
      "kernel/drivers/virtio/virtio_ring.ko: kernel/drivers/virtio/virtio.ko\n"
      "kernel/drivers/virtio/virtio.ko:\n"
      "kernel/drivers/virt/coco/sev-guest/sev-guest.ko:\n";
  auto order = module_load_order(dep, {"9pnet_virtio", "9p", "sev_guest"});
  ASSERT_TRUE(order) << order.error().message;
  EXPECT_EQ(*order, (std::vector<std::string>{"kernel/net/9p/9pnet.ko", "kernel/drivers/virtio/virtio.ko", "kernel/drivers/virtio/virtio_ring.ko",
                                              "kernel/net/9p/9pnet_virtio.ko", "kernel/fs/netfs/netfs.ko", "kernel/fs/9p/9p.ko",
                                              "kernel/drivers/virt/coco/sev-guest/sev-guest.ko"}));
  auto missing = module_load_order(dep, {"virtio_gpu"});
  ASSERT_FALSE(missing);
  EXPECT_EQ(missing.error().message, "the kernel has no module 'virtio_gpu' (not in modules.dep)");

  // The installed kernel's, when there is one: every module's dependencies come before it.
  for (const auto& e : std::filesystem::directory_iterator("/lib/modules", std::filesystem::directory_options::skip_permission_denied)) {
    std::ifstream in(e.path() / "modules.dep");
    if (!in) continue;
    const std::string real((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    auto o = module_load_order(real, {"virtio_pci", "virtio_console", "9pnet_virtio", "9p", "virtiofs"});
    ASSERT_TRUE(o) << e.path() << ": " << o.error().message;
    EXPECT_EQ(o->back().substr(o->back().rfind('/') + 1), "virtiofs.ko");
    EXPECT_LT(std::ranges::find(*o, std::string("kernel/drivers/virtio/virtio.ko")) - o->begin(),
              std::ranges::find(*o, std::string("kernel/drivers/virtio/virtio_pci.ko")) - o->begin());
  }
}

Bytes xz(ByteSpan data) {
  Bytes out(data.size() + 4096);
  size_t pos = 0;
  EXPECT_EQ(lzma_easy_buffer_encode(6, LZMA_CHECK_CRC32, nullptr, reinterpret_cast<const uint8_t*>(data.data()), data.size(),
                                    reinterpret_cast<uint8_t*>(out.data()), &pos, out.size()),
            LZMA_OK);
  out.resize(pos);
  return out;
}

TEST(VmImage, VmlinuxFromAnXzKernel) {
  Bytes elf = text("\x7f" "ELF");
  const Bytes body = testing::pattern_bytes(300000, 3);
  elf.insert(elf.end(), body.begin(), body.end());
  Bytes bz = testing::pattern_bytes(5000, 9);  // the setup code before the payload
  const Bytes payload = xz(elf);
  bz.insert(bz.end(), payload.begin(), payload.end());
  const Bytes trailer = testing::pattern_bytes(100, 1);  // what follows the payload in a bzImage
  bz.insert(bz.end(), trailer.begin(), trailer.end());
  auto v = extract_vmlinux(bz);
  ASSERT_TRUE(v) << v.error().message;
  EXPECT_EQ(*v, elf);

  // Not ELF inside, a damaged stream, another compression, nothing at all.
  Bytes not_elf = testing::pattern_bytes(64, 2);
  const Bytes nx = xz(not_elf);
  auto n = extract_vmlinux(nx);
  ASSERT_FALSE(n);
  EXPECT_NE(n.error().message.find("not an ELF vmlinux"), std::string::npos);
  Bytes damaged = bz;
  damaged[5000 + payload.size() / 2] ^= std::byte{0xff};
  EXPECT_TRUE(FailsWith(extract_vmlinux(damaged), ErrorCode::kMalformed));
  const Bytes gz = {std::byte{0x1f}, std::byte{0x8b}, std::byte{0x08}, std::byte{0}};
  EXPECT_TRUE(FailsWith(extract_vmlinux(gz), ErrorCode::kUnsupportedVersion));
  EXPECT_TRUE(FailsWith(extract_vmlinux(text("just text")), ErrorCode::kMalformed));
}

TEST(VmImage, ManifestJsonRoundTripAndStrictParse) {
  ImageManifest m;
  m.name = "ccta-v1";
  m.kernel_release = "6.1.0-57-amd64";
  m.cmdline = "console=ttyS0 panic=-1";
  m.kernel_sha256 = std::string(64, 'a');
  m.vmlinux_sha256 = std::string(64, 'b');
  m.initrd_sha256 = std::string(64, 'c');
  auto plain = parse_image_manifest(image_manifest_json(m));
  ASSERT_TRUE(plain) << plain.error().message;
  EXPECT_EQ(plain->cmdline, m.cmdline);
  EXPECT_FALSE(plain->measurement);
  std::array<std::byte, 48> d{};
  d[0] = std::byte{0x5a};
  m.measurement = d;
  m.firmware = "/usr/share/tresor/OVMF.amdsev.fd";
  m.firmware_sha256 = std::string(64, 'd');
  m.vcpus = 4;
  m.vcpu_type = "EPYC-Milan";
  auto snp = parse_image_manifest(image_manifest_json(m));
  ASSERT_TRUE(snp) << snp.error().message;
  EXPECT_EQ(snp->measurement, m.measurement);
  EXPECT_EQ(snp->vcpus, 4u);
  EXPECT_EQ(snp->vcpu_type, "EPYC-Milan");

  EXPECT_TRUE(FailsWith(parse_image_manifest(R"({"name": "x"})"), ErrorCode::kMalformed));
  std::string extra = image_manifest_json(m);
  extra.insert(1, "\"colour\": \"blue\", ");
  auto e = parse_image_manifest(extra);
  ASSERT_FALSE(e);
  EXPECT_NE(e.error().message.find("unknown member \"colour\""), std::string::npos);
}

}  // namespace
}  // namespace tresor::vm
