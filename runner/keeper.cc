// The VM keeper and the runner's side of it (runner/keeper.h).
#include "keeper.h"

#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <filesystem>

#include "tresor/io.h"
#include "tresor/slurm/ranks.h"
#include "tresor/slurm/job.h"
#include "tresor/vm/hypervisor.h"

namespace tresor::runner {
namespace {

namespace fs = std::filesystem;

std::string option_of(const std::map<std::string, std::string>& options, const char* name) {
  auto it = options.find(name);
  return it == options.end() ? std::string() : it->second;
}

std::string read_text(const std::string& path) {
  auto text = read_small_file(path, 16u << 20);
  return text ? std::move(*text) : std::string();
}

void send_text(int fd, const std::string& text, int attach = -1) {
  iovec iov{const_cast<char*>(text.data()), text.size()};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
  if (attach >= 0) {
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    std::memcpy(CMSG_DATA(c), &attach, sizeof(int));
  }
  while (::sendmsg(fd, &msg, MSG_NOSIGNAL) < 0 && errno == EINTR) {
  }
}

// One message; "" at the end of the stream. A descriptor that came with it goes to `*attached`.
std::string receive_text(int fd, int* attached = nullptr) {
  std::string buf(64 << 10, '\0');
  iovec iov{buf.data(), buf.size()};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
  msg.msg_control = control;
  msg.msg_controllen = sizeof control;
  ssize_t n;
  while ((n = ::recvmsg(fd, &msg, MSG_CMSG_CLOEXEC)) < 0 && errno == EINTR) {
  }
  for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
      int got = -1;
      std::memcpy(&got, CMSG_DATA(c), sizeof(int));
      if (attached != nullptr && *attached < 0) {
        *attached = got;
      } else {
        ::close(got);  // not asked for: never leaked
      }
    }
  }
  if (n <= 0) return {};
  buf.resize(static_cast<size_t>(n));
  return buf;
}

}  // namespace

Result<VmPlan> plan_vm(const Manifest& manifest, const std::map<std::string, std::string>& options, const std::string& slurm_job,
                       const std::function<std::string(std::string_view)>& env) {
  auto bad = [](const std::string& why) { return fail(ErrorCode::kInvalidArgument, why); };
  const std::string images = option_of(options, "--images");
  if (images.empty()) return bad("this node's plugstack.conf names no image catalogue (images=): there is nothing to boot");
  auto catalogue = slurm::parse_image_catalogue(read_text(images));
  if (!catalogue) return bad(images + ": " + catalogue.error().message);
  // The image is the one the user signed for: the catalogue entry with the manifest's measurement.
  const slurm::Image* image = nullptr;
  for (const auto& [name, img] : catalogue->images) {
    if (img.measurement == manifest.image_measurement) image = &img;
  }
  if (image == nullptr) {
    return bad("the job's image (measurement " + to_hex(manifest.image_measurement).substr(0, 16) + "…) is not in this node's catalogue " +
               images);
  }
  std::map<unsigned, std::string> gpu_table;
  if (const std::string gpus = option_of(options, "--gpus"); !gpus.empty()) {
    auto t = slurm::parse_gpu_table(read_text(gpus));
    if (!t) return bad(gpus + ": " + t.error().message);
    gpu_table = std::move(*t);
  }
  auto allocation = vm::allocation_from_env(env, gpu_table);
  if (!allocation) return std::unexpected(allocation.error());
  auto host_data = manifest_digest(manifest);
  if (!host_data) return std::unexpected(host_data.error());
  VmPlan plan;
  vm::JobVm& job = plan.job;
  job.slurm_job = slurm_job;
  job.slurm_step = env("SLURM_STEP_ID").empty() ? "0" : env("SLURM_STEP_ID");
  job.job_id = manifest.job_id;
  // A task of a step of several: its own VM (tasks may share a node), and, when the step's tasks
  // meet as ranks (TRESOR_STEP_ROSTER=1, docs/training.md §5.4), a network to meet on: the
  // node's step bridge (docs/scale.md §2.2). Without one the ranks could not reach each other.
  std::map<std::string, std::string> seen;
  auto ranks = slurm::ranks_from_slurm([&](const char* name) -> const char* {
    const auto it = seen.emplace(name, env(name)).first;
    return it->second.empty() ? nullptr : it->second.c_str();
  });
  if (!ranks) return bad("the step's task layout: " + ranks.error().message);
  if (*ranks) job.task = std::to_string((*ranks)->rank);
  if (env("TRESOR_STEP_ROSTER") == "1" && *ranks) {
    const std::string bridge = option_of(options, "--step-bridge");
    if (bridge.empty()) {
      return bad("the step's " + std::to_string((*ranks)->size) + " tasks meet as ranks (TRESOR_STEP_ROSTER=1), but this node has no step "
                 "network for their VMs (plugstack.conf step_bridge=, docs/admin-guide.md): they could not reach each other");
    }
    std::error_code ec;
    if (!vm::valid_interface_name(bridge) || !std::filesystem::is_directory("/sys/class/net/" + bridge + "/bridge", ec)) {
      return bad("the step bridge '" + bridge + "' (plugstack.conf step_bridge=) is not a bridge on this node (no /sys/class/net/" + bridge +
                 "/bridge)");
    }
    job.network_bridge = bridge;
  }
  job.allocation = std::move(*allocation);
  job.image = *image;
  job.host_data = *host_data;
  const std::string datasets = option_of(options, "--datasets");
  for (const auto& id : manifest.datasets) job.dataset_dirs.push_back(datasets + "/" + id);
  job.control_socket = "/run/tresor/" + slurm_job + "." + job.slurm_step + "/control.sock";  // replaced at start
  job.accelerator = option_of(options, "--accel") == "tcg" ? vm::Accelerator::kTcg : vm::Accelerator::kKvm;
  job.snp = option_of(options, "--snp") != "no";
  auto spec = vm::job_domain_spec(job);
  if (!spec) return std::unexpected(spec.error());
  plan.spec = std::move(*spec);
  return plan;
}

int keep_vm(int fd, VmPlan plan, const std::string& hypervisor) {
  // scancel's signals are for the job: the runner passes them in and asks for the VM's end.
  for (int s : {SIGTERM, SIGINT, SIGHUP, SIGPIPE, SIGQUIT, SIGUSR1, SIGUSR2}) std::signal(s, SIG_IGN);
  using Clock = std::chrono::steady_clock;
  const auto t0 = Clock::now();
  // The runtime directory holds the control socket and the console log, private to the keeper;
  // named after the Slurm job so that the plugin's epilog removes it should the keeper be killed.
  std::string rt = "/tmp/tresor-job-" + plan.job.slurm_job + "-vm-XXXXXX";
  if (::mkdtemp(rt.data()) == nullptr) {
    send_text(fd, std::string("error cannot make the VM's runtime directory: ") + std::strerror(errno));
    return 1;
  }
  auto remove_rt = [&] {
    std::error_code ec;
    fs::remove_all(rt, ec);
  };
  auto refuse = [&](const std::string& why) {
    send_text(fd, "error " + why);
    remove_rt();
    return 1;
  };
  plan.spec.control_socket = rt + "/control.sock";
  plan.spec.console_log = rt + "/console.log";
  auto xml = vm::domain_xml(plan.spec);
  if (!xml) return refuse(xml.error().message);
  auto hv = vm::Hypervisor::connect(hypervisor.empty() ? "qemu:///system" : hypervisor, true);
  if (!hv) return refuse(hv.error().message);
  auto domain = hv->start(*xml);
  if (!domain) return refuse(domain.error().message);
  const double create_ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
  const int cfd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::snprintf(addr.sun_path, sizeof addr.sun_path, "%s", plan.spec.control_socket.c_str());
  if (::connect(cfd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    const std::string why = std::strerror(errno);
    ::close(cfd);
    (void)domain->destroy();
    return refuse("cannot connect to the VM's control channel " + plan.spec.control_socket + ": " + why);
  }
  char head[64];
  std::snprintf(head, sizeof head, "ok %.1f ", create_ms);
  send_text(fd, head + plan.spec.name, cfd);
  ::close(cfd);  // the runner has it now
  for (;;) {
    const std::string request = receive_text(fd);
    if (request == "console") {
      std::string console = read_text(plan.spec.console_log);
      if (console.size() > 8192) console.erase(0, console.size() - 8192);
      send_text(fd, console);
      continue;
    }
    // "destroy", the end of the stream (the runner is gone), or anything else: the VM ends.
    (void)domain->destroy();
    remove_rt();
    if (request == "destroy") send_text(fd, "destroyed");
    return 0;
  }
}

void keeper_refuse(int fd, const std::string& why) { send_text(fd, "error " + why); }

Result<StartedVm> await_vm(int keeper_fd) {
  StartedVm vm;
  const std::string answer = receive_text(keeper_fd, &vm.control_fd);
  if (answer.starts_with("ok ") && vm.control_fd >= 0) {
    const size_t space = answer.find(' ', 3);
    vm.create_ms = std::atof(answer.substr(3, space - 3).c_str());
    vm.domain = space == std::string::npos ? std::string() : answer.substr(space + 1);
    return vm;
  }
  if (vm.control_fd >= 0) ::close(vm.control_fd);
  if (answer.starts_with("error ")) return fail(ErrorCode::kUnavailable, answer.substr(6));
  return fail(ErrorCode::kUnavailable, answer.empty() ? "the VM keeper ended without starting the VM (see slurmd's log)"
                                                      : "the VM keeper answered '" + answer.substr(0, 80) + "'");
}

std::string keeper_console(int keeper_fd) {
  send_text(keeper_fd, "console");
  return receive_text(keeper_fd);
}

void keeper_destroy(int keeper_fd) {
  send_text(keeper_fd, "destroy");
  (void)receive_text(keeper_fd);  // "destroyed", or the end of the stream
}

}  // namespace tresor::runner
