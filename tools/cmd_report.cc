// tresor report show | verify: SEV-SNP attestation reports from the command line
// (docs/attestation.md). Exit codes: 0 verified (and accepted by the policy when one is given),
// 5 chain or signature failure, 6 the report does not parse, 7 the policy denies.
#include <nlohmann/json.hpp>

#include <cstdio>
#include <ctime>
#include <iostream>

#include "options.h"
#include "tresor/snp/certs.h"
#include "tresor/snp/sim.h"
#include "tresor/snp/validate.h"
#include "tresor/snp/verify.h"

namespace tresor::cli {
namespace {

Result<std::time_t> parse_rfc3339(const std::string& s) {
  std::tm tm{};
  const char* end = ::strptime(s.c_str(), "%Y-%m-%dT%H:%M:%S", &tm);
  if (end == nullptr || (std::string_view(end) != "Z" && std::string_view(end) != "+00:00")) {
    return fail(ErrorCode::kInvalidArgument, "--at '" + s + "' is not an RFC 3339 UTC time like 2025-06-01T12:00:00Z");
  }
  return timegm(&tm);
}

nlohmann::ordered_json tcb_json(uint64_t raw, snp::TcbLayout layout) {
  nlohmann::ordered_json j;
  char buf[24];
  std::snprintf(buf, sizeof buf, "0x%016llx", static_cast<unsigned long long>(raw));
  j["raw"] = buf;
  auto t = snp::decode_tcb(raw, layout, "TCB");
  if (t) {
    if (layout == snp::TcbLayout::kTurin) j["fmc"] = t->fmc;
    j["bootloader"] = t->bootloader;
    j["tee"] = t->tee;
    j["snp"] = t->snp;
    j["microcode"] = t->microcode;
  } else {
    j["error"] = t.error().message;
  }
  return j;
}

nlohmann::ordered_json report_json(const snp::Report& r, snp::TcbLayout layout, bool layout_known) {
  nlohmann::ordered_json j;
  j["version"] = r.version;
  j["guest_svn"] = r.guest_svn;
  char buf[24];
  std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(r.policy));
  j["policy"] = buf;
  if (auto p = snp::decode_policy(r.policy)) {
    j["policy_decoded"] = {{"abi_major", p->abi_major}, {"abi_minor", p->abi_minor}, {"smt", p->smt},
                           {"migrate_ma", p->migrate_ma}, {"debug", p->debug}, {"single_socket", p->single_socket},
                           {"cxl_allow", p->cxl_allow}, {"mem_aes_256_xts", p->mem_aes_256_xts}, {"rapl_dis", p->rapl_dis},
                           {"ciphertext_hiding", p->ciphertext_hiding}, {"page_swap_disable", p->page_swap_disable}};
  }
  j["family_id"] = to_hex(r.family_id);
  j["image_id"] = to_hex(r.image_id);
  j["vmpl"] = r.vmpl;
  j["signature_algo"] = r.signature_algo;
  j["tcb_layout"] = layout == snp::TcbLayout::kTurin ? "turin" : "milan/genoa";
  if (!layout_known) j["tcb_layout_note"] = "version 2 report: layout assumed, the VCEK's product decides";
  j["current_tcb"] = tcb_json(r.current_tcb, layout);
  std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(r.platform_info));
  j["platform_info"] = buf;
  j["author_key_en"] = r.author_key_en;
  j["mask_chip_key"] = r.mask_chip_key;
  j["signing_key"] = r.signing_key == snp::SigningKey::kVcek ? "vcek" : r.signing_key == snp::SigningKey::kVlek ? "vlek" : "none";
  j["report_data"] = to_hex(r.report_data);
  j["measurement"] = to_hex(r.measurement);
  j["host_data"] = to_hex(r.host_data);
  j["id_key_digest"] = to_hex(r.id_key_digest);
  j["author_key_digest"] = to_hex(r.author_key_digest);
  j["report_id"] = to_hex(r.report_id);
  j["report_id_ma"] = to_hex(r.report_id_ma);
  j["reported_tcb"] = tcb_json(r.reported_tcb, layout);
  if (r.version >= 3) {
    j["cpuid"] = {{"family", r.cpuid_fam_id}, {"model", r.cpuid_mod_id}, {"stepping", r.cpuid_step}};
  }
  j["chip_id"] = to_hex(r.chip_id);
  j["committed_tcb"] = tcb_json(r.committed_tcb, layout);
  j["current_version"] = std::to_string(r.current_major) + "." + std::to_string(r.current_minor) + "." + std::to_string(r.current_build);
  j["committed_version"] =
      std::to_string(r.committed_major) + "." + std::to_string(r.committed_minor) + "." + std::to_string(r.committed_build);
  j["launch_tcb"] = tcb_json(r.launch_tcb, layout);
  if (r.version >= 5) {
    std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(r.launch_mit_vector));
    j["launch_mit_vector"] = buf;
    std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(r.current_mit_vector));
    j["current_mit_vector"] = buf;
  }
  return j;
}

void print_text(const nlohmann::ordered_json& j, const std::string& indent = "") {
  for (const auto& [k, v] : j.items()) {
    if (v.is_object()) {
      std::cout << indent << k << ":\n";
      print_text(v, indent + "  ");
    } else {
      std::cout << indent << k << ": " << (v.is_string() ? v.get<std::string>() : v.dump()) << "\n";
    }
  }
}

Result<Bytes> read_input(const std::string& path, size_t max = 1 << 20) {
  auto text = read_small_file(path, max);
  if (!text) return std::unexpected(text.error());
  return to_bytes(*text);
}

int report_cache(int argc, char** argv) {
  po::options_description opts("Options");
  std::string dir, vcek;
  opts.add_options()("cert-dir", po::value(&dir)->required(), "the offline VCEK cache")(
      "vcek", po::value(&vcek)->required(), "a VCEK (DER) to add, e.g. one fetched from AMD's KDS on another machine");
  po::positional_options_description pos;
  po::variables_map vm;
  if (auto stop = parse_options("report cache", "--cert-dir D --vcek F", argc, argv, opts, pos, vm)) return *stop;
  auto der = read_input(vcek);
  if (!der) return report(der.error());
  if (!der->empty() && der->front() == std::byte{'-'}) {
    return usage_error("report cache", vcek + " is PEM; the cache holds DER (convert: openssl x509 -in F -outform der -out F.der)");
  }
  auto ext = snp::parse_endorsement_extensions(*der);
  if (!ext) return report({ext.error().code, vcek + ": " + ext.error().message});
  auto product = snp::product_from_name(ext->product_name);
  if (!product || *product == snp::Product::kSim) {
    return report({ErrorCode::kInvalidArgument, vcek + ": productName '" + ext->product_name + "' is not an AMD product"});
  }
  if (ext->hw_id.empty()) return report({ErrorCode::kInvalidArgument, vcek + " has no hwID: a VLEK is not cached by chip"});
  snp::Tcb tcb = ext->tcb;
  if (*product != snp::Product::kTurin) tcb.fmc = 0;
  snp::DirectoryCache cache(dir);
  if (auto r = cache.put(*product, ext->hw_id, tcb, *der); !r) return report(r.error());
  std::fprintf(stderr, "tresor: cached as %s\n", cache.path_for(*product, ext->hw_id, tcb).c_str());
  return kExitOk;
}

int report_show(int argc, char** argv) {
  po::options_description opts("Options");
  std::string in;
  opts.add_options()("json", "print JSON")("report", po::value(&in)->required(), "attestation report file (0x4A0 bytes)");
  po::positional_options_description pos;
  pos.add("report", 1);
  po::variables_map vm;
  if (auto stop = parse_options("report show", "REPORT [--json]", argc, argv, opts, pos, vm)) return *stop;
  auto bytes = read_input(in);
  if (!bytes) return report(bytes.error());
  auto r = snp::parse_report(*bytes);
  if (!r) return report({r.error().code, in + ": " + r.error().message});
  auto layout = snp::layout_from_cpuid(*r);
  const auto j = report_json(*r, layout.value_or(snp::TcbLayout::kMilanGenoa), layout.has_value());
  if (vm.count("json")) {
    std::cout << j.dump(2) << "\n";
  } else {
    print_text(j);
  }
  return kExitOk;
}

int report_verify(int argc, char** argv) {
  po::options_description opts("Options");
  std::string in, vcek, chain, policy, at, crl, trust_sim, cert_dir;
  opts.add_options()
      ("vcek", po::value(&vcek), "the VCEK or VLEK certificate (DER or PEM)")
      ("cert-dir", po::value(&cert_dir), "find the VCEK in this offline cache (see 'tresor report cache') instead of --vcek")
      ("chain", po::value(&chain), "optional ASK/ASVK + ARK PEM (KDS cert_chain); must be AMD's pinned certificates")
      ("crl", po::value(&crl), "optional CRL of the product's ARK (DER or PEM)")
      ("policy", po::value(&policy), "attestation policy (JSON, docs/attestation.md); without it the claims are verified but not judged")
      ("at", po::value(&at), "verify certificate validity at this RFC 3339 UTC time (default: now)")
      ("trust-sim", po::value(&trust_sim), "also trust the sim root in this directory (TESTING ONLY: not hardware)")
      ("json", "print the verified claims as JSON")
      ("report", po::value(&in)->required(), "attestation report file (0x4A0 bytes)");
  po::positional_options_description pos;
  pos.add("report", 1);
  po::variables_map vm;
  if (auto stop = parse_options("report verify", "REPORT --vcek F [--chain F] [--crl F] [--policy F] [--at TIME]", argc,
                                argv, opts, pos, vm)) {
    return *stop;
  }
  if (vcek.empty() == cert_dir.empty()) return usage_error("report verify", "give exactly one of --vcek F and --cert-dir D");
  auto report_bytes = read_input(in);
  if (!report_bytes) return report(report_bytes.error());
  Result<Bytes> cert = fail(ErrorCode::kUnavailable, "");
  if (!vcek.empty()) {
    cert = read_input(vcek);
  } else {
    // The cache is keyed by product, CHIP_ID and REPORTED_TCB; a v2 report does not say its
    // product, so every product's TCB reading is tried (the chain decides afterwards).
    auto parsed = snp::parse_report(*report_bytes);
    if (!parsed) return report({parsed.error().code, in + ": " + parsed.error().message});
    snp::DirectoryCache cache(cert_dir);
    std::string misses;
    for (auto p : {snp::Product::kMilan, snp::Product::kGenoa, snp::Product::kTurin}) {
      auto tcb = snp::decode_tcb(parsed->reported_tcb, snp::tcb_layout(p), "REPORTED_TCB");
      if (!tcb) continue;
      const size_t id_len = p == snp::Product::kTurin ? 8 : 64;
      cert = cache.endorsement_cert(p, ByteSpan(parsed->chip_id).first(id_len), *tcb, false);
      if (cert) break;
      misses += "\n  " + cert.error().message;
    }
    if (!cert) cert = fail(ErrorCode::kIo, "no VCEK for this report in " + cert_dir + ":" + misses);
  }
  if (!cert) return report(cert.error());
  snp::VerifyInputs vi;
  vi.report = *report_bytes;
  vi.endorsement_cert = *cert;
  vi.at = std::time(nullptr);
  if (!at.empty()) {
    auto t = parse_rfc3339(at);
    if (!t) return report(t.error());
    vi.at = *t;
  }
  if (!chain.empty()) {
    auto c = read_small_file(chain);
    if (!c) return report(c.error());
    vi.chain_pem = *c;
  }
  if (!crl.empty()) {
    auto c = read_input(crl, 16 << 20);
    if (!c) return report(c.error());
    vi.crl = *c;
  }
  snp::SimTrust sim_trust;
  if (!trust_sim.empty()) {
    auto t = snp::sim::load_trust(trust_sim);
    if (!t) return report(t.error());
    sim_trust = *t;
    vi.sim_trust = &sim_trust;
  }
  auto v = snp::verify_report(vi);
  if (!v) return report({v.error().code, in + ": " + v.error().message});
  if (v->sim) {
    std::fprintf(stderr, "tresor: WARNING: %s is signed by the SIM secure processor in %s: a test root, not AMD hardware; "
                         "it proves nothing about confidentiality\n", in.c_str(), trust_sim.c_str());
  }
  if (vm.count("json")) {
    auto j = report_json(v->report, v->layout, true);
    j["product"] = std::string(snp::product_name(v->product));
    j["endorsement"] = {{"kind", v->vlek ? "vlek" : "vcek"}, {"product_name", v->endorsement.product_name}};
    std::cout << j.dump(2) << "\n";
  }
  std::fprintf(stderr, "tresor: %s: signature and %s %s chain verified (%s, reported TCB %s)\n", in.c_str(),
               v->sim ? "TEST" : "AMD", std::string(snp::product_name(v->product)).c_str(), v->vlek ? "VLEK" : "VCEK",
               snp::tcb_string(v->reported_tcb, v->layout).c_str());
  if (policy.empty()) {
    std::fprintf(stderr, "tresor: no --policy given: the claims are authentic but were not judged\n");
    return kExitOk;
  }
  auto ptext = read_small_file(policy);
  if (!ptext) return report({ErrorCode::kPolicy, ptext.error().message + " (an absent policy denies)"});
  auto p = snp::parse_policy(*ptext);
  if (!p) return report({ErrorCode::kPolicy, policy + ": " + p.error().message + " (a malformed policy denies)"});
  if (auto ok = snp::validate(*v, &*p); !ok) return report(ok.error());
  std::fprintf(stderr, "tresor: %s: accepted by policy %s\n", in.c_str(), policy.c_str());
  return kExitOk;
}

}  // namespace

int cmd_report(int argc, char** argv) {
  if (argc < 2 || std::string_view(argv[1]) == "--help" || std::string_view(argv[1]) == "-h") {
    std::printf("Usage: tresor report show REPORT [--json]\n"
                "       tresor report verify REPORT (--vcek F | --cert-dir D) [--chain F] [--crl F] [--policy F] [--at TIME] [--trust-sim DIR] [--json]\n"
                "       tresor report cache --cert-dir D --vcek F\n\n"
                "Exit codes: 0 ok, 2 usage, 3 I/O, 5 chain or signature failure, 6 report does not parse, 7 policy denies.\n");
    return argc < 2 ? kExitUsage : kExitOk;
  }
  const std::string sub = argv[1];
  if (sub == "show") return report_show(argc - 1, argv + 1);
  if (sub == "verify") return report_verify(argc - 1, argv + 1);
  if (sub == "cache") return report_cache(argc - 1, argv + 1);
  return usage_error("report", "unknown subcommand '" + sub + "' (show, verify, cache)");
}

}  // namespace tresor::cli
