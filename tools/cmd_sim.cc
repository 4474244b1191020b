// tresor sim init | report: the software secure processor of the `sim` platform (snp/sim.h).
// Its reports prove nothing about hardware; they exist so that the same verifier, policy and
// broker code can run on machines without SEV-SNP.
#include <cstdio>
#include <cstring>

#include "options.h"
#include "tresor/snp/sim.h"

namespace tresor::cli {
namespace {

template <size_t N>
Result<std::array<std::byte, N>> hex_arg(const std::string& text, const char* option) {
  std::array<std::byte, N> out{};
  if (text.empty()) return out;
  if (text.size() > 2 * N) {
    return fail(ErrorCode::kInvalidArgument, std::string(option) + " is " + std::to_string(text.size()) +
                                                 " hex digits, at most " + std::to_string(2 * N));
  }
  auto b = from_hex(text, option);
  if (!b) return std::unexpected(b.error());
  std::memcpy(out.data(), b->data(), b->size());  // shorter values are zero-padded on the right
  return out;
}

int sim_init(int argc, char** argv) {
  po::options_description opts("Options");
  std::string dir;
  int rsa_bits = 4096;
  opts.add_options()("rsa-bits", po::value(&rsa_bits)->default_value(4096), "size of the test ARK/ASK keys (AMD: 4096)")(
      "dir", po::value(&dir)->required(), "directory for the sim root (created, mode 0700)");
  po::positional_options_description pos;
  pos.add("dir", 1);
  po::variables_map vm;
  if (auto stop = parse_options("sim init", "DIR", argc, argv, opts, pos, vm)) return *stop;
  if (rsa_bits != 2048 && rsa_bits != 3072 && rsa_bits != 4096) return usage_error("sim init", "--rsa-bits must be 2048, 3072 or 4096");
  snp::sim::InitOptions o;
  o.rsa_bits = rsa_bits;
  if (auto r = snp::sim::init(dir, o); !r) return report(r.error());
  std::fprintf(stderr, "tresor: sim root written to %s (a TEST root: nothing trusts it unless told to with --trust-sim)\n", dir.c_str());
  return kExitOk;
}

int sim_report(int argc, char** argv) {
  po::options_description opts("Options");
  std::string dir, out, measurement, report_data, host_data, policy_text = "0x30000", tcb_text;
  uint32_t version = 5;
  opts.add_options()
      ("dir", po::value(&dir)->required(), "sim root made by 'tresor sim init'")
      ("output,o", po::value(&out)->required(), "where to write the 0x4A0-byte report")
      ("version", po::value(&version)->default_value(5), "report version: 2, 3 or 5")
      ("measurement", po::value(&measurement), "MEASUREMENT, up to 96 hex digits")
      ("report-data", po::value(&report_data), "REPORT_DATA, up to 128 hex digits")
      ("host-data", po::value(&host_data), "HOST_DATA, up to 64 hex digits")
      ("guest-policy", po::value(&policy_text)->default_value("0x30000"), "GUEST_POLICY, hex (0x prefix optional)")
      ("tcb", po::value(&tcb_text), "REPORTED_TCB as bl,tee,snp,ucode (default: the TCB the VCEK was made for)")
      ("force,f", "overwrite OUTPUT");
  po::positional_options_description pos;
  po::variables_map vm;
  if (auto stop = parse_options("sim report", "--dir D -o REPORT [--version 5] [--measurement HEX] [--report-data HEX] [--host-data HEX]",
                                argc, argv, opts, pos, vm)) {
    return *stop;
  }
  snp::sim::ReportParams p;
  p.version = version;
  auto m = hex_arg<48>(measurement, "--measurement");
  auto rd = hex_arg<64>(report_data, "--report-data");
  auto hd = hex_arg<32>(host_data, "--host-data");
  if (!m) return report(m.error());
  if (!rd) return report(rd.error());
  if (!hd) return report(hd.error());
  p.measurement = *m;
  p.report_data = *rd;
  p.host_data = *hd;
  {
    std::string digits = policy_text;
    if (digits.starts_with("0x") || digits.starts_with("0X")) digits = digits.substr(2);
    if (digits.empty() || digits.size() > 16 || digits.find_first_not_of("0123456789abcdefABCDEF") != std::string::npos) {
      return usage_error("sim report", "--guest-policy '" + policy_text + "' is not a hex number such as 0x30000");
    }
    p.policy = std::stoull(digits, nullptr, 16);
  }
  if (!tcb_text.empty()) {
    unsigned v[4];
    char extra = 0;
    if (std::sscanf(tcb_text.c_str(), "%u,%u,%u,%u%c", &v[0], &v[1], &v[2], &v[3], &extra) != 4 || v[0] > 255 ||
        v[1] > 255 || v[2] > 255 || v[3] > 255) {
      return usage_error("sim report", "--tcb '" + tcb_text + "' is not bl,tee,snp,ucode with values 0..255");
    }
    p.tcb = snp::Tcb{.fmc = 0, .bootloader = static_cast<uint8_t>(v[0]), .tee = static_cast<uint8_t>(v[1]),
                     .snp = static_cast<uint8_t>(v[2]), .microcode = static_cast<uint8_t>(v[3])};
  }
  auto sp = snp::sim::SecureProcessor::load(dir);
  if (!sp) return report(sp.error());
  auto r = sp->sign_report(p);
  if (!r) return report(r.error());
  auto f = AtomicOutputFile::create(out, 0644, vm.count("force") > 0);
  if (!f) return report(f.error());
  if (auto w = f->write(*r); !w) return report(w.error());
  if (auto c = f->commit(); !c) return report(c.error());
  std::fprintf(stderr, "tresor: sim report (version %u) written to %s; verify it with --vcek %s/vcek.pem --trust-sim %s\n",
               version, out.c_str(), dir.c_str(), dir.c_str());
  return kExitOk;
}

}  // namespace

int cmd_sim(int argc, char** argv) {
  if (argc < 2 || std::string_view(argv[1]) == "--help" || std::string_view(argv[1]) == "-h") {
    std::printf("Usage: tresor sim init DIR [--rsa-bits 4096]\n"
                "       tresor sim report --dir DIR -o REPORT [--version 5] [--measurement HEX] [--report-data HEX] [--host-data HEX]\n\n"
                "The sim secure processor signs SEV-SNP reports with a test root. They prove nothing about hardware.\n");
    return argc < 2 ? kExitUsage : kExitOk;
  }
  const std::string sub = argv[1];
  if (sub == "init") return sim_init(argc - 1, argv + 1);
  if (sub == "report") return sim_report(argc - 1, argv + 1);
  return usage_error("sim", "unknown subcommand '" + sub + "' (init, report)");
}

}  // namespace tresor::cli
