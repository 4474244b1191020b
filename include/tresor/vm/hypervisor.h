// tresor/vm/hypervisor.h — the libvirt calls of the VM backend (issue 5, item 2): start a job's
// VM as a transient domain that libvirt destroys if the runner's connection goes away, wait for
// it to stop (lifecycle events) or for the job's deadline (then destroy it), and destroy it on
// every other exit path. Tested against libvirt's own test driver (test:///default); real guests
// use qemu:///system (issue 6).
#pragma once

#include <chrono>
#include <memory>
#include <string>

#include "tresor/error.h"

namespace tresor::vm {

enum class Ending { kStopped, kDeadline };

class Hypervisor;

/// A running domain. Destroying the object destroys the domain (if it still runs).
class Domain {
 public:
  Domain(Domain&&) noexcept;
  Domain& operator=(Domain&&) noexcept;
  ~Domain();
  const std::string& name() const;
  bool active() const;
  /// Waits until the domain stops (a lifecycle event) or `timeout` passes, in which case the
  /// domain is destroyed and kDeadline returned.
  [[nodiscard]] Result<Ending> wait(std::chrono::milliseconds timeout);
  [[nodiscard]] Result<void> destroy();

 private:
  friend class Hypervisor;
  struct Impl;
  explicit Domain(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

class Hypervisor {
 public:
  /// Connects to `uri` ("qemu:///system", "test:///default"). kUnavailable names the URI and
  /// libvirt's reason. `autodestroy`: libvirt destroys the VMs this connection started when it
  /// closes (a runner that dies takes its VM with it); libvirt's test driver does not support it,
  /// so its tests pass false.
  [[nodiscard]] static Result<Hypervisor> connect(const std::string& uri, bool autodestroy = true);
  Hypervisor(Hypervisor&&) noexcept;
  Hypervisor& operator=(Hypervisor&&) noexcept;
  ~Hypervisor();
  /// Creates and starts a transient domain from `xml` (auto-destroyed with this connection, when
  /// connected so).
  /// kInvalidArgument carries libvirt's reason for refusing the XML.
  [[nodiscard]] Result<Domain> start(const std::string& xml);
  /// The version of the libvirt daemon behind the connection ("10.5.0").
  [[nodiscard]] Result<std::string> libvirt_version() const;
  /// Whether a domain of this name exists on the connection.
  [[nodiscard]] Result<bool> exists(const std::string& name) const;

 private:
  friend class Domain;
  struct Impl;
  explicit Hypervisor(std::shared_ptr<Impl> impl);
  std::shared_ptr<Impl> impl_;
};

}  // namespace tresor::vm
