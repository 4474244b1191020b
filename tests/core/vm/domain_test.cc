// The VM's libvirt domain XML (include/tresor/vm/domain.h): byte-exact golden files for the SNP
// and the plain QEMU shapes, every refusal named, and the plain shape accepted by libvirt's own
// parser through its test driver (test:///default: create, read back, destroy).
#include "tresor/vm/domain.h"

#include <libvirt/libvirt.h>
#include <libvirt/virterror.h>

#include <gtest/gtest.h>

#include <fstream>
#include <sstream>

#include "support/test_support.h"

namespace tresor::vm {
namespace {

DomainSpec snp_spec() {
  DomainSpec s;
  s.name = "tresor-t-0123456789abcdef";
  s.vcpus = 4;
  s.memory_mib = 16384;
  s.accelerator = Accelerator::kKvm;
  s.snp = true;
  for (size_t i = 0; i < s.host_data.size(); ++i) s.host_data[i] = std::byte(i);
  s.firmware = "/usr/share/tresor/OVMF.amdsev.fd";
  s.kernel = "/var/lib/tresor/images/ccta-v1/bzImage";
  s.initrd = "/var/lib/tresor/images/ccta-v1/initrd.cpio";
  s.cmdline = "console=ttyS0 panic=-1 tresor.job=t-0123456789abcdef";
  s.shares = {{"job", "/scratch/alice/run1/tresor-output", false, ShareDriver::kVirtiofs},
              {"ds0", "/shared/datasets/dhz/ccta-2024", true, ShareDriver::k9p}};
  s.gpus = {"0000:41:00.0", "0000:c1:00.0"};
  s.control_socket = "/run/tresor/jobs/t-0123456789abcdef/control.sock";
  s.network_bridge = "tresor-step0";  // a step's rank: one virtio-net on the node's step bridge
  return s;
}

DomainSpec tcg_spec() {
  DomainSpec s;
  s.name = "tresor-t-fedcba9876543210";
  s.memory_mib = 256;
  s.accelerator = Accelerator::kTcg;
  s.kernel = "/var/lib/tresor/images/dev/vmlinux";
  s.initrd = "/var/lib/tresor/images/dev/initrd.cpio";
  s.cmdline = "console=ttyS0 panic=-1 <&'\">";  // escaping is part of the golden file
  s.shares = {{"job", "/tmp/job & out", false, ShareDriver::k9p}};
  s.control_socket = "/tmp/tresor-ctl.sock";
  return s;
}

std::string golden(const std::string& name) {
  std::ifstream in(tresor::testing::testdata("libvirt/" + name));
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

TEST(VmDomain, SnpShapeMatchesTheGoldenFile) {
  auto x = domain_xml(snp_spec());
  ASSERT_TRUE(x) << x.error().message;
  EXPECT_EQ(*x, golden("snp-gpu.xml"));
}

TEST(VmDomain, PlainQemuShapeMatchesTheGoldenFile) {
  auto x = domain_xml(tcg_spec());
  ASSERT_TRUE(x) << x.error().message;
  EXPECT_EQ(*x, golden("qemu-tcg.xml"));
  EXPECT_EQ(x->find("launchSecurity"), std::string::npos);
  EXPECT_EQ(x->find("<interface"), std::string::npos) << "no network unless a step's ranks need one";
}

TEST(VmDomain, BadSpecsAreRefusedByName) {
  struct Case {
    const char* want;
    std::function<void(DomainSpec&)> spoil;
  };
  const std::vector<Case> cases = {
      {"name", [](DomainSpec& s) { s.name = "bad name"; }},
      {"memory", [](DomainSpec& s) { s.memory_mib = 64; }},
      {"kernel", [](DomainSpec& s) { s.kernel = "relative/bzImage"; }},
      {"firmware is required", [](DomainSpec& s) { s.firmware.clear(); }},
      {"kvm accelerator", [](DomainSpec& s) { s.accelerator = Accelerator::kTcg; }},
      {"DEBUG", [](DomainSpec& s) { s.snp_policy |= 1ull << 19; }},
      {"bit 17", [](DomainSpec& s) { s.snp_policy = 0; }},
      {"PCI address", [](DomainSpec& s) { s.gpus = {"41:00.0"}; }},
      {"PCI address", [](DomainSpec& s) { s.gpus = {"0000:41:20.0"}; }},
      {"share tag", [](DomainSpec& s) { s.shares[0].tag = "a/b"; }},
      {"control characters", [](DomainSpec& s) { s.cmdline = "a\nb"; }},
      {"cannot make a virtiofs share read-only", [](DomainSpec& s) { s.shares[1].driver = ShareDriver::kVirtiofs; }},
      {"console log", [](DomainSpec& s) { s.console_log = "console.log"; }},
      {"network bridge 'br0 x'", [](DomainSpec& s) { s.network_bridge = "br0 x"; }},
      {"network bridge 'tresor-step-network'", [](DomainSpec& s) { s.network_bridge = "tresor-step-network"; }},  // 19 > 15
      {"network bridge 'a'b'", [](DomainSpec& s) { s.network_bridge = "a'b"; }},
  };
  for (const auto& k : cases) {
    SCOPED_TRACE(k.want);
    DomainSpec s = snp_spec();
    k.spoil(s);
    auto x = domain_xml(s);
    ASSERT_FALSE(x);
    EXPECT_NE(x.error().message.find(k.want), std::string::npos) << x.error().message;
  }
}

TEST(VmDomain, LibvirtsOwnParserAcceptsThePlainShape) {
  virConnectPtr conn = virConnectOpen("test:///default");
  ASSERT_NE(conn, nullptr);
  DomainSpec s = tcg_spec();
  s.shares.push_back({"ds0", "/srv/datasets/x", true, ShareDriver::k9p});
  s.console_log = "/tmp/tresor-console.log";  // the serial console into a file, as the runner asks
  auto x = domain_xml(s);
  ASSERT_TRUE(x);
  EXPECT_NE(x->find("<serial type='file'>\n      <source path='/tmp/tresor-console.log'/>"), std::string::npos) << *x;
  virDomainPtr dom = virDomainCreateXML(conn, x->c_str(), 0);
  ASSERT_NE(dom, nullptr) << virGetLastErrorMessage();
  char* back = virDomainGetXMLDesc(dom, 0);
  ASSERT_NE(back, nullptr);
  const std::string text(back);
  free(back);
  EXPECT_NE(text.find("<name>tresor-t-fedcba9876543210</name>"), std::string::npos);
  EXPECT_NE(text.find("name='org.tresor.control'"), std::string::npos) << text;
  EXPECT_NE(text.find("<on_reboot>destroy</on_reboot>"), std::string::npos);
  EXPECT_NE(text.find("<source dir='/srv/datasets/x'/>"), std::string::npos) << text;
  EXPECT_EQ(text.find("<interface"), std::string::npos) << text;
  EXPECT_EQ(virDomainDestroy(dom), 0);
  virDomainFree(dom);
  // A step's rank: libvirt reads the bridge interface back as written.
  s.name = "tresor-t-fedcba9876543211";
  s.network_bridge = "tresor-step0";
  x = domain_xml(s);
  ASSERT_TRUE(x);
  dom = virDomainCreateXML(conn, x->c_str(), 0);
  ASSERT_NE(dom, nullptr) << virGetLastErrorMessage();
  back = virDomainGetXMLDesc(dom, 0);
  ASSERT_NE(back, nullptr);
  const std::string with_net(back);
  free(back);
  EXPECT_NE(with_net.find("<interface type='bridge'>"), std::string::npos) << with_net;
  EXPECT_NE(with_net.find("<source bridge='tresor-step0'/>"), std::string::npos) << with_net;
  EXPECT_NE(with_net.find("<model type='virtio'/>"), std::string::npos) << with_net;
  EXPECT_EQ(virDomainDestroy(dom), 0);
  virDomainFree(dom);
  virConnectClose(conn);
}

}  // namespace
}  // namespace tresor::vm
