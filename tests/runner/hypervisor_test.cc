// The VM backend's libvirt calls against libvirt's own test driver (test:///default): a job's VM
// starts as a transient domain, its end is seen through lifecycle events, a deadline destroys it,
// dropping the handle destroys it, and libvirt's refusals come back with libvirt's reason.
#include "tresor/vm/hypervisor.h"

#include <libvirt/libvirt.h>

#include <gtest/gtest.h>

#include <chrono>
#include <thread>

#include "support/test_support.h"
#include "tresor/vm/domain.h"

namespace tresor::vm {
namespace {

using tresor::testing::FailsWith;

std::string xml(const std::string& name) {
  DomainSpec s;
  s.name = name;
  s.accelerator = Accelerator::kTcg;
  s.kernel = "/var/lib/tresor/images/dev/vmlinux";
  s.initrd = "/var/lib/tresor/images/dev/initrd.cpio";
  s.cmdline = "console=ttyS0";
  s.control_socket = "/tmp/tresor-hv-test.sock";
  return *domain_xml(s);
}

TEST(Hypervisor, AVmRunsUntilItsDeadlineAndIsThenDestroyed) {
  auto hv = Hypervisor::connect("test:///default", /*autodestroy=*/false);
  ASSERT_TRUE(hv) << hv.error().message;
  auto dom = hv->start(xml("tresor-deadline"));
  ASSERT_TRUE(dom) << dom.error().message;
  EXPECT_TRUE(dom->active());
  EXPECT_TRUE(*hv->exists("tresor-deadline"));
  const auto start = std::chrono::steady_clock::now();
  auto ending = dom->wait(std::chrono::milliseconds(200));
  ASSERT_TRUE(ending) << ending.error().message;
  EXPECT_EQ(*ending, Ending::kDeadline);
  EXPECT_GE(std::chrono::steady_clock::now() - start, std::chrono::milliseconds(200));
  EXPECT_FALSE(dom->active());
  EXPECT_FALSE(*hv->exists("tresor-deadline")) << "a transient domain is gone once destroyed";
}

TEST(Hypervisor, TheEndOfAVmIsSeenThroughLifecycleEvents) {
  auto hv = Hypervisor::connect("test:///default", /*autodestroy=*/false);
  ASSERT_TRUE(hv);
  auto dom = hv->start(xml("tresor-events"));
  ASSERT_TRUE(dom) << dom.error().message;
  // The guest powers off (here: destroyed from elsewhere on the connection).
  std::thread stopper([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    ASSERT_TRUE(dom->destroy());
  });
  const auto start = std::chrono::steady_clock::now();
  auto ending = dom->wait(std::chrono::seconds(30));
  stopper.join();
  ASSERT_TRUE(ending);
  EXPECT_EQ(*ending, Ending::kStopped);
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(30)) << "not by the deadline";
}

TEST(Hypervisor, DroppingTheHandleDestroysTheVm) {
  auto hv = Hypervisor::connect("test:///default", /*autodestroy=*/false);
  ASSERT_TRUE(hv);
  {
    auto dom = hv->start(xml("tresor-scoped"));
    ASSERT_TRUE(dom);
    EXPECT_TRUE(*hv->exists("tresor-scoped"));
  }  // every exit path: the runner's error returns, exceptions
  EXPECT_FALSE(*hv->exists("tresor-scoped"));
}

TEST(Hypervisor, RefusalsCarryLibvirtsReason) {
  auto hv = Hypervisor::connect("test:///default", /*autodestroy=*/false);
  ASSERT_TRUE(hv);
  auto bad = hv->start("<domain type='qemu'><name>x</name></domain>");
  ASSERT_TRUE(FailsWith(bad, ErrorCode::kInvalidArgument));
  EXPECT_NE(bad.error().message.find("libvirt refused the VM: "), std::string::npos);
  auto dup1 = hv->start(xml("tresor-dup"));
  ASSERT_TRUE(dup1);
  auto dup2 = hv->start(xml("tresor-dup"));
  ASSERT_FALSE(dup2) << "two VMs of one name";
  EXPECT_TRUE(FailsWith(Hypervisor::connect("nosuchdriver:///x"), ErrorCode::kUnavailable));
  // The test driver has no auto-destroy: asking for it is refused, not silently dropped.
  auto strict = Hypervisor::connect("test:///default");
  ASSERT_TRUE(strict);
  auto refused = strict->start(xml("tresor-autodestroy"));
  ASSERT_FALSE(refused);
  EXPECT_NE(refused.error().message.find("unsupported flags"), std::string::npos) << refused.error().message;
}

}  // namespace
}  // namespace tresor::vm
