// `tresor image build|show` with Debian's real kernel, modules and busybox and this build's agent
// (the packages scripts/bootstrap installs): the files and their digests, byte-identical
// rebuilds, the refusals (an existing directory, a file that is not a kernel, a firmware that is
// not an AmdSev OVMF) leaving nothing behind, `show` catching a file changed after the build —
// and the image booting under QEMU (TCG) to its /init, which finds no control channel and powers
// the VM off.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <map>
#include <set>
#include <sstream>
#include <fstream>

#include "support/test_support.h"
#include "tresor/crypto.h"
#include "tresor/vm/image.h"

namespace tresor {
namespace {

namespace fs = std::filesystem;
using testing::run_command;
using testing::run_tresor;

bool have_kernel() {
  for (const auto& e : fs::directory_iterator("/boot", fs::directory_options::skip_permission_denied)) {
    if (e.path().filename().string().starts_with("vmlinuz-")) return true;
  }
  return false;
}

class ImageCli : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!have_kernel() || !fs::exists("/bin/busybox")) {
      GTEST_SKIP() << "no /boot/vmlinuz-* or /bin/busybox here: scripts/bootstrap installs linux-image-amd64 and busybox-static";
    }
  }
  testing::TempDir dir;
  std::vector<std::string> build_args(const std::string& out) const {
    return {"image", "build", "-o", dir.file(out), "--name", "ccta-test", "--agent", TRESOR_AGENT_BIN};
  }
};

TEST_F(ImageCli, BuildsAReproducibleImageWhoseDigestsMatch) {
  auto r = run_tresor(build_args("a"));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  auto m = vm::parse_image_manifest(r.out);
  ASSERT_TRUE(m) << m.error().message << "\n" << r.out;
  EXPECT_EQ(m->name, "ccta-test");
  EXPECT_EQ(m->cmdline, "console=ttyS0 panic=-1 loglevel=4");
  for (const auto& [file, digest] : std::vector<std::pair<std::string, std::string>>{
           {"vmlinuz", m->kernel_sha256}, {"vmlinux", m->vmlinux_sha256}, {"initrd.cpio", m->initrd_sha256}}) {
    auto sum = run_command({"/usr/bin/sha256sum", dir.file("a/" + file)});
    EXPECT_EQ(sum.out.substr(0, 64), digest) << file;
  }
  // What the initramfs holds, read back: /init, busybox, the agent, its loader, the modules in order.
  auto initrd = vm::parse_cpio_newc(testing::read_file(dir.file("a/initrd.cpio")));
  ASSERT_TRUE(initrd) << initrd.error().message;
  std::set<std::string> paths;
  std::string order;
  for (const auto& e : *initrd) {
    paths.insert(e.path);
    if (e.path == "etc/tresor/modules") order.assign(reinterpret_cast<const char*>(e.data.data()), e.data.size());
  }
  for (const char* p : {"init", "bin/busybox", "usr/libexec/tresor/tresor-agent", "lib64/ld-linux-x86-64.so.2", "etc/tresor/modules"}) {
    EXPECT_TRUE(paths.contains(p)) << p;
  }
  EXPECT_LT(order.find("virtio.ko"), order.find("virtio_pci.ko")) << order;
  EXPECT_NE(order.find("9pnet_virtio.ko"), std::string::npos) << order;
  // A step's network: virtio-net after the modules it needs (modules.dep).
  EXPECT_LT(order.find("/failover.ko"), order.find("net_failover.ko")) << order;
  EXPECT_LT(order.find("net_failover.ko"), order.find("virtio_net.ko")) << order;
  EXPECT_FALSE(paths.contains("usr/bin/sh")) << "no programs unless asked for";

  // The same inputs, again: the same bytes.
  auto again = run_tresor(build_args("b"));
  ASSERT_EQ(again.exit_code, 0) << again.err;
  EXPECT_EQ(again.out, r.out);
  for (const char* f : {"vmlinux", "initrd.cpio", "image.json"}) {
    EXPECT_EQ(testing::read_file(dir.file(std::string("a/") + f)), testing::read_file(dir.file(std::string("b/") + f))) << f;
  }

  auto show = run_tresor({"image", "show", dir.file("a")});
  EXPECT_EQ(show.exit_code, 0) << show.err;
  EXPECT_EQ(show.out, r.out);
  // A file changed after the build is caught.
  {
    std::fstream f(dir.file("a/initrd.cpio"), std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(1000);
    f.put('X');
  }
  auto tampered = run_tresor({"image", "show", dir.file("a")});
  EXPECT_EQ(tampered.exit_code, 5) << tampered.err;
  EXPECT_NE(tampered.err.find("initrd.cpio has SHA-256"), std::string::npos) << tampered.err;
  EXPECT_NE(tampered.err.find("changed after it was built"), std::string::npos) << tampered.err;
}

// --program: the jobs' executables as /usr/bin/NAME with their shared libraries, measured with the
// rest (the initrd's digest changes); two programs of one name are refused.
TEST_F(ImageCli, ProgramsComeWithTheirLibraries) {
  if (!fs::exists("/usr/bin/sqlite3")) GTEST_SKIP() << "no /usr/bin/sqlite3 (scripts/bootstrap installs sqlite3)";
  auto plain = run_tresor(build_args("plain"));
  ASSERT_EQ(plain.exit_code, 0) << plain.err;
  auto args = build_args("with");
  args.insert(args.end(), {"--program", "/usr/bin/sqlite3"});
  auto with = run_tresor(args);
  ASSERT_EQ(with.exit_code, 0) << with.err;
  auto initrd = vm::parse_cpio_newc(testing::read_file(dir.file("with/initrd.cpio")));
  ASSERT_TRUE(initrd) << initrd.error().message;
  std::map<std::string, size_t> seen;
  for (const auto& e : *initrd) ++seen[e.path];
  EXPECT_EQ(seen["usr/bin/sqlite3"], 1u);
  bool libsqlite = false;
  for (const auto& [p, n] : seen) {
    EXPECT_EQ(n, 1u) << p << " is in the archive " << n << " times";
    libsqlite = libsqlite || p.find("libsqlite3.so") != std::string::npos;
  }
  EXPECT_TRUE(libsqlite) << "sqlite3's own library comes along";
  EXPECT_NE(testing::read_file(dir.file("with/initrd.cpio")), testing::read_file(dir.file("plain/initrd.cpio")));
  auto twice = build_args("twice");
  twice.insert(twice.end(), {"--program", "/usr/bin/sqlite3", "--program", "/bin/sqlite3"});
  auto t = run_tresor(twice);
  EXPECT_EQ(t.exit_code, 2) << t.err;
  EXPECT_NE(t.err.find("another program is already /usr/bin/sqlite3"), std::string::npos) << t.err;
  EXPECT_FALSE(fs::exists(dir.file("twice")));
}

TEST_F(ImageCli, RefusalsLeaveNothingBehind) {
  fs::create_directories(dir.file("exists"));
  auto exists = run_tresor(build_args("exists"));
  EXPECT_EQ(exists.exit_code, 2);
  EXPECT_NE(exists.err.find("exists: give a new directory"), std::string::npos) << exists.err;

  testing::write_file(dir.file("not-a-kernel"), as_bytes(std::string("hello")));
  auto args = build_args("k");
  args.insert(args.end(), {"--kernel", dir.file("not-a-kernel"), "--modules", "/lib/modules/none"});
  auto k = run_tresor(args);
  EXPECT_NE(k.exit_code, 0);
  EXPECT_NE(k.err.find("not-a-kernel"), std::string::npos) << k.err;

  auto fw = build_args("fw");
  fw.insert(fw.end(), {"--ovmf", "/usr/share/OVMF/OVMF_CODE_4M.fd"});
  if (fs::exists("/usr/share/OVMF/OVMF_CODE_4M.fd")) {
    auto f = run_tresor(fw);
    EXPECT_EQ(f.exit_code, 2) << f.err;
    EXPECT_NE(f.err.find("not an SNP OVMF"), std::string::npos) << "Debian's OVMF has no SEV metadata: " << f.err;
  }
  // Nothing was written: no image directories, no partial ones.
  std::vector<std::string> left;
  for (const auto& e : fs::directory_iterator(dir.path())) left.push_back(e.path().filename().string());
  std::ranges::sort(left);
  EXPECT_EQ(left, (std::vector<std::string>{"exists", "not-a-kernel"}));
}

TEST_F(ImageCli, TheImageBootsToItsInitUnderTcg) {
  if (!fs::exists("/usr/bin/qemu-system-x86_64")) GTEST_SKIP() << "no qemu-system-x86_64: scripts/bootstrap installs qemu-system-x86";
  auto r = run_tresor(build_args("boot"));
  ASSERT_EQ(r.exit_code, 0) << r.err;
  // No control channel: /init says so and powers off. -no-reboot turns a panic into an exit too;
  // the timeout bounds a hang.
  auto boot = run_command({"/usr/bin/timeout", "60", "/usr/bin/qemu-system-x86_64", "-machine", "q35", "-accel", "tcg", "-m", "256",
                           "-kernel", dir.file("boot/vmlinux"), "-initrd", dir.file("boot/initrd.cpio"), "-append",
                           "console=ttyS0 panic=-1 loglevel=4", "-nographic", "-nodefaults", "-no-reboot", "-serial", "stdio"});
  EXPECT_EQ(boot.exit_code, 0) << boot.out << boot.err;
  EXPECT_NE(boot.out.find("tresor-init: ready (kernel "), std::string::npos) << boot.out;
  EXPECT_NE(boot.out.find("tresor-init: no control channel (org.tresor.control): nothing to run"), std::string::npos) << boot.out;
  EXPECT_EQ(boot.out.find("did not load"), std::string::npos) << "every module loads: " << boot.out;
  EXPECT_NE(boot.out.find("reboot: Power down"), std::string::npos) << boot.out;
}

// tresor doctor on this machine: whatever it has, the verdict and the exit code agree, every
// missing piece comes with its fix, a GPU the table names but the host lacks is reported, and a
// malformed GPU table is an error naming it.
TEST(Doctor, TheVerdictMatchesTheChecks) {
  testing::TempDir dir;
  testing::write_file(dir.file("gpus.conf"), as_bytes(std::string("0 0000:ff:1f.7\n")));
  auto r = run_tresor({"doctor", "--gpus", dir.file("gpus.conf"), "--ovmf", "/nonexistent/OVMF.fd"});
  const bool ready = r.out.find("this host can run SEV-SNP guests") != std::string::npos;
  EXPECT_EQ(r.exit_code, ready ? 0 : 1) << r.out << r.err;
  EXPECT_NE(r.out.find("MISS GPU 0000:ff:1f.7 bound to vfio-pci"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("no such PCI device"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("/nonexistent/OVMF.fd: cannot read it"), std::string::npos) << r.out;
  // Every MISS line is followed by its fix (an indented line).
  std::istringstream lines(r.out);
  std::string line, previous;
  while (std::getline(lines, line)) {
    if (previous.starts_with("  MISS")) {
      EXPECT_TRUE(line.starts_with("       ")) << previous << "\n" << line;
    }
    previous = line;
  }
  // The step bridge (plugstack.conf step_bridge=): loopback is no bridge, a missing name is missing,
  // and a bridge that is up passes (root only: one is made here).
  for (const auto& [name, found] : std::vector<std::pair<std::string, std::string>>{{"lo", "not a bridge"}, {"trtest-nobr0", "no such interface"}}) {
    auto s = run_tresor({"doctor", "--step-bridge", name});
    EXPECT_EQ(s.exit_code, 1) << s.out << s.err;
    EXPECT_NE(s.out.find("MISS step bridge " + name + " (a bridge, up)"), std::string::npos) << s.out;
    EXPECT_NE(s.out.find(found), std::string::npos) << s.out;
    EXPECT_NE(s.out.find("steps whose VMs meet as ranks (TRESOR_STEP_ROSTER=1) cannot run here"), std::string::npos) << s.out;
  }
  if (::geteuid() == 0 && run_command({"/bin/sh", "-c", "ip link add trtest-doc0 type bridge && ip link set trtest-doc0 up"}).exit_code == 0) {
    auto s = run_tresor({"doctor", "--step-bridge", "trtest-doc0"});
    EXPECT_NE(s.out.find("ok   step bridge trtest-doc0 (a bridge, up)"), std::string::npos) << s.out;
    EXPECT_EQ(s.out.find("steps whose VMs meet as ranks"), std::string::npos) << s.out;
    run_command({"/bin/sh", "-c", "ip link del trtest-doc0"});
  }
  testing::write_file(dir.file("bad.conf"), as_bytes(std::string("zero 0000:41:00.0\n")));
  auto bad = run_tresor({"doctor", "--gpus", dir.file("bad.conf")});
  EXPECT_EQ(bad.exit_code, 2) << bad.err;
  EXPECT_NE(bad.err.find("bad.conf"), std::string::npos) << bad.err;
}

}  // namespace
}  // namespace tresor
