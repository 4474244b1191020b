// The VM backend's libvirt calls (include/tresor/vm/hypervisor.h).
#include "tresor/vm/hypervisor.h"

#include <libvirt/libvirt.h>
#include <libvirt/virterror.h>

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>

namespace tresor::vm {
namespace {

std::string last_error() {
  const char* m = virGetLastErrorMessage();
  return m ? m : "unknown libvirt error";
}

// libvirt's default event loop, run on one thread for the whole process.
void ensure_event_loop() {
  static std::once_flag once;
  std::call_once(once, [] {
    virEventRegisterDefaultImpl();
    std::thread([] {
      for (;;) virEventRunDefaultImpl();
    }).detach();
  });
}

}  // namespace

struct Hypervisor::Impl {
  virConnectPtr conn = nullptr;
  bool autodestroy = true;
  ~Impl() {
    if (conn) virConnectClose(conn);
  }
};

struct Domain::Impl {
  std::shared_ptr<Hypervisor::Impl> hv;
  virDomainPtr dom = nullptr;
  std::string name;
  int callback = -1;
  std::mutex mu;
  std::condition_variable cv;
  bool stopped = false;

  static void on_lifecycle(virConnectPtr, virDomainPtr, int event, int, void* opaque) {
    auto* self = static_cast<Impl*>(opaque);
    if (event == VIR_DOMAIN_EVENT_STOPPED || event == VIR_DOMAIN_EVENT_UNDEFINED) {
      std::lock_guard lock(self->mu);
      self->stopped = true;
      self->cv.notify_all();
    }
  }
  ~Impl() {
    if (callback >= 0) virConnectDomainEventDeregisterAny(hv->conn, callback);
    if (dom) {
      if (virDomainIsActive(dom) == 1) virDomainDestroy(dom);
      virDomainFree(dom);
    }
  }
};

Result<Hypervisor> Hypervisor::connect(const std::string& uri, bool autodestroy) {
  ensure_event_loop();
  // libvirt prints every error on stderr by default; ours say it once, with context.
  virSetErrorFunc(nullptr, [](void*, virErrorPtr) {});
  auto impl = std::make_shared<Impl>();
  impl->autodestroy = autodestroy;
  impl->conn = virConnectOpen(uri.c_str());
  if (impl->conn == nullptr) return fail(ErrorCode::kUnavailable, "cannot connect to libvirt at " + uri + ": " + last_error());
  return Hypervisor(std::move(impl));
}

Hypervisor::Hypervisor(std::shared_ptr<Impl> impl) : impl_(std::move(impl)) {}
Hypervisor::Hypervisor(Hypervisor&&) noexcept = default;
Hypervisor& Hypervisor::operator=(Hypervisor&&) noexcept = default;
Hypervisor::~Hypervisor() = default;

Result<Domain> Hypervisor::start(const std::string& xml) {
  auto d = std::make_unique<Domain::Impl>();
  d->hv = impl_;
  d->dom = virDomainCreateXML(impl_->conn, xml.c_str(), impl_->autodestroy ? VIR_DOMAIN_START_AUTODESTROY : 0);
  if (d->dom == nullptr) return fail(ErrorCode::kInvalidArgument, "libvirt refused the VM: " + last_error());
  const char* n = virDomainGetName(d->dom);
  d->name = n ? n : "";
  d->callback = virConnectDomainEventRegisterAny(impl_->conn, d->dom, VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                                                 VIR_DOMAIN_EVENT_CALLBACK(Domain::Impl::on_lifecycle), d.get(), nullptr);
  if (d->callback < 0) return fail(ErrorCode::kUnavailable, "cannot watch the VM's lifecycle: " + last_error());
  return Domain(std::move(d));
}

Result<bool> Hypervisor::exists(const std::string& name) const {
  virDomainPtr d = virDomainLookupByName(impl_->conn, name.c_str());
  if (d == nullptr) return false;
  virDomainFree(d);
  return true;
}

Domain::Domain(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Domain::Domain(Domain&&) noexcept = default;
Domain& Domain::operator=(Domain&&) noexcept = default;
Domain::~Domain() = default;

const std::string& Domain::name() const { return impl_->name; }
bool Domain::active() const { return virDomainIsActive(impl_->dom) == 1; }

Result<Ending> Domain::wait(std::chrono::milliseconds timeout) {
  std::unique_lock lock(impl_->mu);
  const bool stopped = impl_->cv.wait_for(lock, timeout, [&] { return impl_->stopped || virDomainIsActive(impl_->dom) != 1; });
  lock.unlock();
  if (stopped) return Ending::kStopped;
  TRESOR_TRY(destroy());
  return Ending::kDeadline;
}

Result<void> Domain::destroy() {
  if (virDomainIsActive(impl_->dom) != 1) return {};
  if (virDomainDestroy(impl_->dom) != 0) return fail(ErrorCode::kIo, "cannot destroy VM " + impl_->name + ": " + last_error());
  return {};
}

Result<std::string> Hypervisor::libvirt_version() const {
  unsigned long v = 0;
  if (virConnectGetLibVersion(impl_->conn, &v) != 0) return fail(ErrorCode::kUnavailable, "libvirt version: " + last_error());
  return std::to_string(v / 1000000) + "." + std::to_string(v / 1000 % 1000) + "." + std::to_string(v % 1000);
}

}  // namespace tresor::vm
