// tresor manifest: create and sign a job manifest, or show and verify one (docs/manifest.md).
#include <ctime>

#include "cli.h"
#include "options.h"
#include "tresor/crypto.h"
#include "tresor/encoding.h"
#include "tresor/io.h"
#include "tresor/manifest.h"

namespace tresor::cli {
namespace {

Result<Manifest> load_manifest(const std::string& path) {
  auto text = read_small_file(path);
  if (!text) return std::unexpected(text.error());
  std::string_view t = *text;
  while (!t.empty() && (t.back() == '\n' || t.back() == '\r')) t.remove_suffix(1);
  auto m = parse_manifest(t);
  if (!m) return fail(m.error().code, path + ": " + m.error().message);
  return m;
}

int manifest_create(int argc, char** argv) {
  po::options_description opts("Options");
  std::string identity, job_id, image, script, out;
  std::vector<std::string> datasets, recipients;
  int64_t expires_in = 24 * 3600;
  opts.add_options()
      ("identity,i", po::value(&identity)->required(), "the user's identity file (signs the manifest)")
      ("job-id", po::value(&job_id)->required(), "the scheduler's job id")
      ("dataset", po::value(&datasets)->composing()->required(), "a dataset the job may receive the key of; repeatable")
      ("image-measurement", po::value(&image)->required(), "the SNP launch measurement of the job's image (96 hex digits)")
      ("script", po::value(&script)->required(), "the job script (its SHA-256 goes into the manifest)")
      ("recipient,r", po::value(&recipients)->composing(), "seal outputs to this recipient, or @FILE (default: the signer)")
      ("expires-in", po::value(&expires_in)->default_value(24 * 3600), "seconds until the manifest expires")
      ("output,o", po::value(&out)->required(), "where to write the signed manifest (canonical JSON)");
  po::variables_map vm;
  if (auto stop = parse_options("manifest create", "-i IDENTITY --job-id ID --dataset ID [...] --image-measurement HEX --script FILE -o OUT",
                                argc, argv, opts, {}, vm)) {
    return *stop;
  }
  auto id = load_identity(identity);
  if (!id) return report(id.error());
  Manifest m;
  m.job_id = job_id;
  m.user = id->recipient();
  m.datasets = datasets;
  auto meas = from_hex(image, "--image-measurement");
  if (!meas) return report(meas.error());
  if (meas->size() != m.image_measurement.size()) return usage_error("manifest create", "--image-measurement must be 96 hex digits (48 bytes)");
  std::copy(meas->begin(), meas->end(), m.image_measurement.begin());
  auto script_text = read_small_file(script, 64u << 20);
  if (!script_text) return report(script_text.error());
  auto digest = crypto::sha256(as_bytes(*script_text));
  if (!digest) return report(digest.error());
  m.script_sha256 = *digest;
  if (recipients.empty()) {
    m.output_recipients = {id->recipient()};
  } else {
    auto r = parse_recipients(recipients);
    if (!r) return report(r.error());
    m.output_recipients = std::move(*r);
  }
  if (expires_in <= 0) return usage_error("manifest create", "--expires-in must be positive");
  m.expires_at = static_cast<int64_t>(std::time(nullptr)) + expires_in;
  if (auto s = sign_manifest(m, *id); !s) return report(s.error());
  auto text = manifest_json(m, true);
  if (!text) return report(text.error());
  auto output = Output::create(out, 0644, /*overwrite=*/false, /*binary=*/false);
  if (!output) return report(output.error());
  if (auto w = output->sink().write(as_bytes(*text + "\n")); !w) return report(w.error());
  if (auto c = output->commit(); !c) return report(c.error());
  auto hd = manifest_digest(m);
  std::fprintf(stderr, "manifest for job %s signed; HOST_DATA = %s\n", m.job_id.c_str(), to_hex(*hd).c_str());
  return kExitOk;
}

int manifest_show(int argc, char** argv) {
  po::options_description opts("Options");
  std::string in;
  opts.add_options()("input", po::value(&in)->required(), "manifest file");
  po::positional_options_description pos;
  pos.add("input", 1);
  po::variables_map vm;
  if (auto stop = parse_options("manifest show", "FILE", argc, argv, opts, pos, vm)) return *stop;
  auto m = load_manifest(in);
  if (!m) return report(m.error());
  auto hd = manifest_digest(*m);
  if (!hd) return report(hd.error());
  std::printf("job_id:            %s\nuser:              %s\n", m->job_id.c_str(), m->user.to_string().c_str());
  for (const auto& d : m->datasets) std::printf("dataset:           %s\n", d.c_str());
  std::printf("image_measurement: %s\nscript_sha256:     %s\nexpires_at:        %lld\nHOST_DATA:         %s\n",
              to_hex(m->image_measurement).c_str(), to_hex(m->script_sha256).c_str(), static_cast<long long>(m->expires_at),
              to_hex(*hd).c_str());
  if (auto v = verify_manifest(*m, std::time(nullptr)); !v) return report(v.error());
  std::printf("signature:         valid, not expired\n");
  return kExitOk;
}

}  // namespace

int cmd_manifest(int argc, char** argv) {
  if (argc >= 2 && std::string_view(argv[1]) == "create") return manifest_create(argc - 1, argv + 1);
  if (argc >= 2 && std::string_view(argv[1]) == "show") return manifest_show(argc - 1, argv + 1);
  std::fprintf(argc >= 2 && (std::string_view(argv[1]) == "--help" || std::string_view(argv[1]) == "-h") ? stdout : stderr,
               "Usage: tresor manifest create -i IDENTITY --job-id ID --dataset ID [...] --image-measurement HEX --script FILE -o OUT\n"
               "       tresor manifest show FILE\n");
  return argc >= 2 && (std::string_view(argv[1]) == "--help" || std::string_view(argv[1]) == "-h") ? kExitOk : kExitUsage;
}

/// Shared with `tresor kbs`: reads a manifest file and returns its canonical signed JSON.
Result<std::pair<Manifest, std::string>> read_manifest_file(const std::string& path) {
  auto m = load_manifest(path);
  if (!m) return std::unexpected(m.error());
  auto text = manifest_json(*m, true);
  if (!text) return std::unexpected(text.error());
  return std::pair<Manifest, std::string>{std::move(*m), std::move(*text)};
}

}  // namespace tresor::cli
