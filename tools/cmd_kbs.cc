// tresor kbs: the guest side of the KBS protocol by hand (docs/protocol.md, docs/cli.md).
// get-resource runs the whole handshake with evidence from a sim secure processor, the way the
// agent runs it inside a VM with the real one, and writes the released key to a 0600 file;
// get-roster claims ranks of a step with a link key and writes the step's roster.
#include <nlohmann/json.hpp>

#include "cli.h"
#include "options.h"
#include "tresor/identity.h"
#include "tresor/kbs/client.h"
#include "tresor/roster.h"
#include "tresor/snp/sim.h"

namespace tresor::cli {
namespace {

// Evidence from the sim secure processor for a VM that runs the image the manifest names and was
// launched with the manifest's digest.
kbs::EvidenceSource sim_evidence(const Manifest& m, std::array<std::byte, 32> digest, std::shared_ptr<const snp::sim::SecureProcessor> sp) {
  return [&m, digest, sp](const std::array<std::byte, 64>& report_data) -> Result<kbs::Evidence> {
    snp::sim::ReportParams p;
    p.measurement = m.image_measurement;
    p.host_data = digest;
    p.report_data = report_data;
    auto r = sp->sign_report(p);
    if (!r) return std::unexpected(r.error());
    return kbs::Evidence{Bytes(r->begin(), r->end()), sp->vcek_pem()};
  };
}

int get_resource(int argc, char** argv) {
  po::options_description opts("Options");
  std::string url, ca, manifest_path, sim_dir, dataset, tag, out;
  unsigned timeout_ms = 10000;
  opts.add_options()
      ("url", po::value(&url)->required(), "the broker, https://HOST:PORT")
      ("ca", po::value(&ca)->required(), "PEM file with the certificate the broker's TLS chain must lead to")
      ("manifest", po::value(&manifest_path)->required(), "the signed job manifest (tresor manifest create)")
      ("sim", po::value(&sim_dir)->required(), "sim secure processor directory (tresor sim init) that signs the evidence")
      ("dataset", po::value(&dataset)->required(), "the dataset whose key to fetch")
      ("tag", po::value(&tag)->default_value("latest"), "\"latest\" or a key version number")
      ("output,o", po::value(&out)->required(), "where to write the dataset key file (mode 0600; never printed)")
      ("timeout-ms", po::value(&timeout_ms)->default_value(10000), "per-request timeout");
  po::variables_map vm;
  if (auto stop = parse_options("kbs get-resource", "--url URL --ca FILE --manifest FILE --sim DIR --dataset ID -o KEYFILE",
                                argc, argv, opts, {}, vm)) {
    return *stop;
  }
  auto m = read_manifest_file(manifest_path);
  if (!m) return report(m.error());
  auto sp = snp::sim::SecureProcessor::load(sim_dir);
  if (!sp) return report(sp.error());
  auto digest = manifest_digest(m->first);
  if (!digest) return report(digest.error());
  std::fprintf(stderr, "tresor kbs: evidence from the SIM secure processor in %s: not confidential hardware\n", sim_dir.c_str());
  const kbs::EvidenceSource evidence = sim_evidence(m->first, *digest, std::make_shared<const snp::sim::SecureProcessor>(std::move(*sp)));
  // The output is claimed before anything is asked for, so an existing file stops us before a
  // release is made (and audited) for nothing.
  auto output = Output::create(out, 0600, /*overwrite=*/false, /*binary=*/false);
  if (!output) return report(output.error());
  auto client = kbs::Client::create({.url = url, .ca_file = ca, .timeout = std::chrono::milliseconds(timeout_ms)});
  if (!client) return report(client.error());
  auto session = kbs::attest(**client, m->second, evidence);
  if (!session) return report(session.error());
  auto key = kbs::fetch_dataset_key(**client, *session, dataset, tag);
  if (!key) return report(key.error());
  DatasetKey dk{dataset, std::move(key->key)};
  if (auto w = output->sink().write(as_bytes(dk.to_file_text())); !w) return report(w.error());
  if (auto c = output->commit(); !c) return report(c.error());
  std::fprintf(stderr, "tresor kbs: key version %u of %s released to job %s; written to %s\n", key->version, dataset.c_str(),
               m->first.job_id.c_str(), out.c_str());
  return kExitOk;
}

// The agent's part in a step across machines (docs/protocol.md §13), by hand: attest with a
// link claim for this VM's ranks, then wait for the step's roster and write it.
int get_roster(int argc, char** argv) {
  po::options_description opts("Options");
  std::string url, ca, manifest_path, sim_dir, key_path, step, ranks_text, lead, out;
  int size = 0;
  unsigned timeout_ms = 10000, wait_s = 120;
  opts.add_options()
      ("url", po::value(&url)->required(), "the broker, https://HOST:PORT")
      ("ca", po::value(&ca)->required(), "PEM file with the certificate the broker's TLS chain must lead to")
      ("manifest", po::value(&manifest_path)->required(), "the signed job manifest (tresor manifest create)")
      ("sim", po::value(&sim_dir)->required(), "sim secure processor directory (tresor sim init) that signs the evidence")
      ("link-key", po::value(&key_path)->required(), "this VM's link key (tresor roster keygen); its public key is claimed")
      ("step", po::value(&step)->required(), "the step, JOB.STEP (JOB: the manifest's job id)")
      ("size", po::value(&size)->required(), "the step's ranks")
      ("ranks", po::value(&ranks_text)->required(), "this VM's ranks, comma-separated and ascending, e.g. 0,1")
      ("lead", po::value(&lead), "with rank 0: where rank 0 will listen, ADDRESS:PORT")
      ("output,o", po::value(&out)->required(), "where to write the roster (0644; never overwritten)")
      ("wait", po::value(&wait_s)->default_value(120), "seconds to wait for the other ranks' VMs to attest")
      ("timeout-ms", po::value(&timeout_ms)->default_value(10000), "per-request timeout");
  po::variables_map vm;
  if (auto stop = parse_options("kbs get-roster", "--url URL --ca FILE --manifest FILE --sim DIR --link-key KEY --step JOB.STEP --size N --ranks R[,R...] [--lead A:P] -o ROSTER",
                                argc, argv, opts, {}, vm)) {
    return *stop;
  }
  auto m = read_manifest_file(manifest_path);
  if (!m) return report(m.error());
  auto key = load_link_key(key_path);
  if (!key) return report(key.error());
  auto pub = link_public_key(*key);
  if (!pub) return report(pub.error());
  // The claim, checked as the broker will check it.
  nlohmann::json claim = {{"link-key", base64url_encode(*pub)}, {"step", step}, {"size", size}, {"ranks", nlohmann::json::array()}};
  for (size_t at = 0; at <= ranks_text.size();) {
    const size_t comma = std::min(ranks_text.find(',', at), ranks_text.size());
    const std::string one = ranks_text.substr(at, comma - at);
    if (one.empty() || one.size() > 4 || one.find_first_not_of("0123456789") != std::string::npos) return usage_error("kbs get-roster", "--ranks '" + ranks_text + "' is not a list of rank numbers such as 0,1");
    claim["ranks"].push_back(std::stoi(one));
    at = comma + 1;
  }
  if (!lead.empty()) claim["lead"] = lead;
  auto parsed = parse_link_claim(claim.dump());
  if (!parsed) return report(parsed.error());
  auto sp = snp::sim::SecureProcessor::load(sim_dir);
  if (!sp) return report(sp.error());
  auto digest = manifest_digest(m->first);
  if (!digest) return report(digest.error());
  std::fprintf(stderr, "tresor kbs: evidence from the SIM secure processor in %s: not confidential hardware\n", sim_dir.c_str());
  auto output = Output::create(out, 0644, /*overwrite=*/false, /*binary=*/false);
  if (!output) return report(output.error());
  auto client = kbs::Client::create({.url = url, .ca_file = ca, .timeout = std::chrono::milliseconds(timeout_ms)});
  if (!client) return report(client.error());
  auto session = kbs::attest(**client, m->second, sim_evidence(m->first, *digest, std::make_shared<const snp::sim::SecureProcessor>(std::move(*sp))),
                             link_claim_text(*parsed));
  if (!session) return report(session.error());
  auto roster = kbs::fetch_step_roster(**client, *session, *parsed, std::chrono::seconds(wait_s));
  if (!roster) return report(roster.error());
  if (auto w = output->sink().write(as_bytes(*roster)); !w) return report(w.error());
  if (auto c = output->commit(); !c) return report(c.error());
  std::fprintf(stderr, "tresor kbs: the roster of step %s (%d ranks) written to %s\n", step.c_str(), size, out.c_str());
  return kExitOk;
}

}  // namespace

int cmd_kbs(int argc, char** argv) {
  if (argc >= 2 && std::string_view(argv[1]) == "get-resource") return get_resource(argc - 1, argv + 1);
  if (argc >= 2 && std::string_view(argv[1]) == "get-roster") return get_roster(argc - 1, argv + 1);
  const bool help = argc >= 2 && (std::string_view(argv[1]) == "--help" || std::string_view(argv[1]) == "-h");
  std::fprintf(help ? stdout : stderr,
               "Usage: tresor kbs get-resource --url URL --ca FILE --manifest FILE --sim DIR --dataset ID [--tag T] -o KEYFILE\n"
               "       tresor kbs get-roster --url URL --ca FILE --manifest FILE --sim DIR --link-key KEY --step JOB.STEP --size N --ranks R[,R...] [--lead A:P] -o ROSTER\n");
  return help ? kExitOk : kExitUsage;
}

}  // namespace tresor::cli
