// tresor kbs: the guest side of the KBS protocol by hand (docs/protocol.md, docs/cli.md).
// get-resource runs the whole handshake with evidence from a sim secure processor, the way the
// agent runs it inside a VM with the real one, and writes the released key to a 0600 file.
#include "cli.h"
#include "options.h"
#include "tresor/identity.h"
#include "tresor/kbs/client.h"
#include "tresor/snp/sim.h"

namespace tresor::cli {
namespace {

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

  // The sim VM runs the image the manifest names and was launched with the manifest's digest.
  const kbs::EvidenceSource evidence = [&](const std::array<std::byte, 64>& report_data) -> Result<kbs::Evidence> {
    snp::sim::ReportParams p;
    p.measurement = m->first.image_measurement;
    p.host_data = *digest;
    p.report_data = report_data;
    auto r = sp->sign_report(p);
    if (!r) return std::unexpected(r.error());
    return kbs::Evidence{Bytes(r->begin(), r->end()), sp->vcek_pem()};
  };
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

}  // namespace

int cmd_kbs(int argc, char** argv) {
  if (argc >= 2 && std::string_view(argv[1]) == "get-resource") return get_resource(argc - 1, argv + 1);
  const bool help = argc >= 2 && (std::string_view(argv[1]) == "--help" || std::string_view(argv[1]) == "-h");
  std::fprintf(help ? stdout : stderr,
               "Usage: tresor kbs get-resource --url URL --ca FILE --manifest FILE --sim DIR --dataset ID [--tag T] -o KEYFILE\n");
  return help ? kExitOk : kExitUsage;
}

}  // namespace tresor::cli
