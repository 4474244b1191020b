// tresor image build|show: guest images for the libvirt backend (docs/images.md). `build` makes
// an image directory from Debian's kernel and busybox and this build's tresor-agent:
//   vmlinuz      the kernel as packaged (bzImage: OVMF and SEV-SNP boots)
//   vmlinux      the same kernel uncompressed (ELF: fast direct boots under TCG)
//   initrd.cpio  /init (guest/init.sh), busybox, the virtio modules, tresor-agent and its libraries,
//                and the jobs' programs (--program) with theirs
//   image.json   digests of all three, the command line and, with --ovmf, the SNP launch
//                measurement for that firmware and vCPU layout
// The image is written under a temporary name and renamed when complete: a failed build leaves
// nothing behind. The same inputs give byte-identical files (include/tresor/vm/image.h).
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <set>
#include <sstream>

#include "guest_init.h"
#include "options.h"
#include "tresor/crypto.h"
#include "tresor/snp/measure.h"
#include "tresor/vm/image.h"

namespace tresor::cli {
namespace {

namespace fs = std::filesystem;

// Modules the guest loads (dependencies are added from modules.dep): the virtio transport, the
// control channel's virtio-serial, 9p for the (read-only) dataset shares, virtio-net for a step's
// network (its NIC exists only when the runner adds one), and the SEV-SNP guest driver.
const std::vector<std::string> kModules = {"virtio_pci", "virtio_console", "9pnet_virtio", "9p", "virtio_net", "sev-guest"};

// Kernels, vmlinux images, modules, libraries, firmware: whole files, read in one go.
constexpr size_t kMaxInput = 1u << 30;
Result<Bytes> read_all(const std::string& path) {
  auto text = read_small_file(path, kMaxInput);
  if (!text) return std::unexpected(text.error());
  return to_bytes(*text);
}

Result<void> write_all(const fs::path& path, ByteSpan data) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(data.size()));
  if (!out.flush()) return fail(ErrorCode::kIo, "cannot write " + path.string());
  return {};
}

std::string sha256_hex(ByteSpan b) { return to_hex(*crypto::sha256(b)); }

// The shared libraries a dynamic executable needs, as the system's loader resolves them (ldd):
// absolute paths, the loader included.
Result<std::vector<std::string>> shared_libraries(const std::string& exe) {
  // "not a dynamic executable" comes on stderr: both streams are read.
  const Captured ldd = run_program({"ldd", exe}, Stream::kCapture, Stream::kCapture);
  const std::string& text = ldd.output;
  if (!WIFEXITED(ldd.status) || WEXITSTATUS(ldd.status) != 0) {
    if (text.find("not a dynamic executable") != std::string::npos) return std::vector<std::string>{};  // static: none
    return fail(ErrorCode::kIo, "ldd " + exe + " failed: " + text);
  }
  std::vector<std::string> libs;
  std::istringstream lines(text);
  for (std::string line; std::getline(lines, line);) {
    if (line.find("not found") != std::string::npos) return fail(ErrorCode::kIo, exe + ": a library is missing: " + line);
    const size_t arrow = line.find("=> ");
    const size_t start = arrow != std::string::npos ? arrow + 3 : line.find_first_not_of(" \t");
    if (start == std::string::npos || line[start] != '/') continue;  // linux-vdso has no file
    libs.push_back(line.substr(start, line.find(' ', start) - start));
  }
  return libs;
}

// Adds `path` (absolute, in the guest) and its parent directories to the archive.
void add_file(std::vector<vm::CpioEntry>& entries, std::set<std::string>& dirs, const std::string& path, uint32_t mode, Bytes data) {
  std::string rel = path.substr(1);
  for (size_t slash = rel.find('/'); slash != std::string::npos; slash = rel.find('/', slash + 1)) {
    const std::string dir = rel.substr(0, slash);
    if (dirs.insert(dir).second) entries.push_back({dir, S_IFDIR | 0755, {}});
  }
  entries.push_back({rel, mode, std::move(data)});
}

int build(int argc, char** argv) {
  po::options_description opts("Options");
  std::string out, name, kernel, modules, agent, busybox = "/bin/busybox", cmdline = "console=ttyS0 panic=-1 loglevel=4", ovmf,
                                                   vcpu_type = "EPYC-v4";
  unsigned vcpus = 1;
  std::vector<std::string> programs;
  opts.add_options()
      ("out,o", po::value(&out)->required(), "the image directory to create (must not exist)")
      ("name", po::value(&name), "the image's name (default: the directory's name)")
      ("kernel", po::value(&kernel), "the kernel (bzImage; default: the newest /boot/vmlinuz-*)")
      ("modules", po::value(&modules), "its modules directory (default: /lib/modules/RELEASE)")
      ("agent", po::value(&agent), "tresor-agent (default: the one next to this tresor)")
      ("busybox", po::value(&busybox)->default_value("/bin/busybox"), "a static busybox (Debian's busybox-static)")
      ("program", po::value(&programs), "an executable for the jobs, as /usr/bin/NAME with its shared libraries (repeatable; measured with the rest)")
      ("cmdline", po::value(&cmdline)->default_value("console=ttyS0 panic=-1 loglevel=4"), "the kernel command line (measured)")
      ("ovmf", po::value(&ovmf), "an AmdSev OVMF build: also compute the SEV-SNP launch measurement")
      ("vcpus", po::value(&vcpus)->default_value(1), "vCPUs the measurement is for (SNP guests must start with exactly these)")
      ("vcpu-type", po::value(&vcpu_type)->default_value("EPYC-v4"), "QEMU vCPU model the measurement is for");
  po::positional_options_description pos;
  po::variables_map vm;
  if (auto stop = parse_options("image build", "-o DIR [--kernel F] [--modules D] [--agent F] [--busybox F] [--program F]... [--cmdline S] [--ovmf F --vcpus N]",
                                argc, argv, opts, pos, vm)) {
    return *stop;
  }
  if (fs::exists(out)) return usage_error("image build", out + " exists: give a new directory (images are never changed in place)");
  if (kernel.empty()) {
    std::vector<std::string> found;
    for (const auto& e : fs::directory_iterator("/boot", fs::directory_options::skip_permission_denied)) {
      if (e.path().filename().string().starts_with("vmlinuz-")) found.push_back(e.path().string());
    }
    if (found.empty()) return usage_error("image build", "no /boot/vmlinuz-*: install linux-image-amd64 or give --kernel");
    std::ranges::sort(found);
    kernel = found.back();
  }
  const std::string kfile = fs::path(kernel).filename().string();
  const std::string release = kfile.starts_with("vmlinuz-") ? kfile.substr(8) : "";
  if (modules.empty()) {
    if (release.empty()) return usage_error("image build", "cannot tell the kernel's release from '" + kfile + "': give --modules");
    modules = "/lib/modules/" + release;
  }
  if (agent.empty()) agent = (fs::read_symlink("/proc/self/exe").parent_path() / "tresor-agent").string();
  if (name.empty()) name = fs::path(out).filename().string();

  auto fail_with = [](const Error& e) { return report(e); };
  std::cerr << "tresor: image " << name << ": kernel " << kernel << ", modules " << modules << ", agent " << agent << "\n";
  auto kernel_bytes = read_all(kernel);
  if (!kernel_bytes) return fail_with(kernel_bytes.error());
  auto vmlinux = vm::extract_vmlinux(*kernel_bytes);
  if (!vmlinux) return fail_with({vmlinux.error().code, kernel + ": " + vmlinux.error().message});

  // The initramfs.
  std::vector<vm::CpioEntry> entries;
  std::set<std::string> dirs;
  add_file(entries, dirs, "/init", S_IFREG | 0755, Bytes(as_bytes(kGuestInit).begin(), as_bytes(kGuestInit).end()));
  auto bb = read_all(busybox);
  if (!bb) return fail_with(bb.error());
  if (auto libs = shared_libraries(busybox); !libs || !libs->empty()) {
    return usage_error("image build", busybox + " is not a static busybox (install busybox-static, or give --busybox)");
  }
  add_file(entries, dirs, "/bin/busybox", S_IFREG | 0755, std::move(*bb));
  auto deps = read_small_file(modules + "/modules.dep", 8u << 20);
  if (!deps) return fail_with(deps.error());
  auto order = vm::module_load_order(*deps, kModules);
  if (!order) return fail_with({order.error().code, modules + ": " + order.error().message});
  std::string order_file;
  for (const auto& m : *order) {
    auto ko = read_all(modules + "/" + m);
    if (!ko) return fail_with(ko.error());
    add_file(entries, dirs, "/lib/modules/" + m, S_IFREG | 0644, std::move(*ko));
    order_file += m + "\n";
  }
  add_file(entries, dirs, "/etc/tresor/modules", S_IFREG | 0644, Bytes(as_bytes(order_file).begin(), as_bytes(order_file).end()));
  auto agent_bytes = read_all(agent);
  if (!agent_bytes) return fail_with(agent_bytes.error());
  add_file(entries, dirs, "/usr/libexec/tresor/tresor-agent", S_IFREG | 0755, std::move(*agent_bytes));
  // The agent's shared libraries, then each program's (under their own paths, each file once).
  std::set<std::string> libs_added;
  auto add_libraries = [&](const std::string& exe) -> Result<void> {
    auto libs = shared_libraries(exe);
    if (!libs) return std::unexpected(libs.error());
    for (const auto& lib : *libs) {
      if (!libs_added.insert(lib).second) continue;
      auto b = read_all(lib);
      if (!b) return std::unexpected(b.error());
      add_file(entries, dirs, lib, S_IFREG | 0755, std::move(*b));
    }
    return {};
  };
  if (auto l = add_libraries(agent); !l) return fail_with(l.error());
  std::set<std::string> program_names;
  for (const auto& program : programs) {
    const std::string base = fs::path(program).filename().string();
    if (base.empty() || !program_names.insert(base).second) {
      return usage_error("image build", "--program " + program + ": another program is already /usr/bin/" + base);
    }
    auto bytes = read_all(program);
    if (!bytes) return fail_with(bytes.error());
    add_file(entries, dirs, "/usr/bin/" + base, S_IFREG | 0755, std::move(*bytes));
    if (auto l = add_libraries(program); !l) return fail_with(l.error());
  }
  for (const char* d : {"proc", "sys", "dev", "tmp", "run", "mnt"}) {
    if (dirs.insert(d).second) entries.push_back({d, S_IFDIR | 0755, {}});
  }
  const size_t files = entries.size();
  auto initrd = vm::cpio_newc(std::move(entries));
  if (!initrd) return fail_with(initrd.error());

  vm::ImageManifest m;
  m.name = name;
  m.kernel_release = release;
  m.cmdline = cmdline;
  m.kernel_sha256 = sha256_hex(*kernel_bytes);
  m.vmlinux_sha256 = sha256_hex(*vmlinux);
  m.initrd_sha256 = sha256_hex(*initrd);
  if (!ovmf.empty()) {
    auto fw = read_all(ovmf);
    if (!fw) return fail_with(fw.error());
    auto sig = snp::vcpu_signature(vcpu_type);
    if (!sig) return usage_error("image build", sig.error().message);
    snp::MeasureInputs in;
    in.ovmf = *fw;
    in.kernel = ByteSpan(*kernel_bytes);
    in.initrd = *initrd;
    in.append = cmdline;
    in.vcpus = vcpus;
    in.vcpu_sig = *sig;
    auto d = snp::launch_digest(in);
    if (!d) return fail_with({d.error().code, ovmf + ": " + d.error().message});
    m.measurement = *d;
    m.firmware = fs::absolute(ovmf).string();
    m.firmware_sha256 = sha256_hex(*fw);
    m.vcpus = vcpus;
    m.vcpu_type = vcpu_type;
  }

  // Written under a temporary name, renamed when complete.
  const fs::path final_dir = fs::absolute(out);
  const fs::path tmp = final_dir.parent_path() / ("." + final_dir.filename().string() + ".partial");
  std::error_code ec;
  fs::remove_all(tmp, ec);
  fs::create_directories(tmp, ec);
  if (ec) return fail_with({ErrorCode::kIo, "cannot create " + tmp.string() + ": " + ec.message()});
  const std::string json = vm::image_manifest_json(m);
  for (const auto& [file, data] : std::vector<std::pair<const char*, ByteSpan>>{
           {"vmlinuz", *kernel_bytes}, {"vmlinux", *vmlinux}, {"initrd.cpio", *initrd}, {"image.json", as_bytes(json)}}) {
    if (auto w = write_all(tmp / file, data); !w) {
      fs::remove_all(tmp, ec);
      return fail_with(w.error());
    }
  }
  fs::rename(tmp, final_dir, ec);
  if (ec) {
    fs::remove_all(tmp, ec);
    return fail_with({ErrorCode::kIo, "cannot rename the image into " + final_dir.string()});
  }
  std::cerr << "tresor: image " << name << " written to " << final_dir.string() << ": initrd " << files << " entries, "
            << initrd->size() / 1024 << " KiB; vmlinux " << vmlinux->size() / (1024 * 1024) << " MiB"
            << (m.measurement ? "; SEV-SNP measurement for " + std::to_string(vcpus) + " x " + vcpu_type : "; no SNP measurement (no --ovmf)")
            << "\n";
  std::cout << json;
  return kExitOk;
}

int show(int argc, char** argv) {
  po::options_description opts("Options");
  std::string dir;
  opts.add_options()("dir", po::value(&dir)->required(), "an image directory");
  po::positional_options_description pos;
  pos.add("dir", 1);
  po::variables_map vm;
  if (auto stop = parse_options("image show", "DIR", argc, argv, opts, pos, vm)) return *stop;
  auto text = read_small_file(dir + "/image.json");
  if (!text) return report(text.error());
  auto m = vm::parse_image_manifest(*text);
  if (!m) return report({m.error().code, dir + "/image.json: " + m.error().message});
  // Every file against its digest: an image changed after it was built is reported, not shown.
  for (const auto& [file, want] : std::vector<std::pair<std::string, std::string>>{
           {"vmlinuz", m->kernel_sha256}, {"vmlinux", m->vmlinux_sha256}, {"initrd.cpio", m->initrd_sha256}}) {
    auto b = read_all(dir + "/" + file);
    if (!b) return report(b.error());
    if (const std::string got = sha256_hex(*b); got != want) {
      return report({ErrorCode::kAuth, dir + "/" + file + " has SHA-256 " + got.substr(0, 16) + "…, image.json says " + want.substr(0, 16) +
                                           "…: the image was changed after it was built"});
    }
  }
  std::cout << vm::image_manifest_json(*m);
  std::cerr << "tresor: " << dir << ": every file matches image.json\n";
  return kExitOk;
}

}  // namespace

int cmd_image(int argc, char** argv) {
  if (argc < 2 || std::string_view(argv[1]) == "--help" || std::string_view(argv[1]) == "-h") {
    std::fprintf(argc < 2 ? stderr : stdout,
                 "Usage: tresor image build -o DIR [options]   build a guest image (docs/images.md)\n"
                 "       tresor image show DIR                 check an image's files against image.json and print it\n");
    return argc < 2 ? kExitUsage : kExitOk;
  }
  const std::string_view sub = argv[1];
  if (sub == "build") return build(argc - 1, argv + 1);
  if (sub == "show") return show(argc - 1, argv + 1);
  return usage_error("image", "unknown subcommand '" + std::string(sub) + "' (build, show)");
}

}  // namespace tresor::cli
