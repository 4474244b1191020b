// tresor bench verify: SEV-SNP report verifications per second, with the AMD chain verified every
// time and with it cached, as a ratio to OpenSSL's own ECDSA P-384 verify rate measured in the
// same run on the same signature (the floor of the cost: one ECDSA verification per report).
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include <cstdio>
#include <ctime>

#include "options.h"
#include "tresor/snp/verify.h"

namespace tresor::cli {
namespace {

// Runs fn until `seconds` have passed (at least 3 calls); returns calls per second.
template <typename Fn>
double rate(double seconds, Fn fn) {
  int n = 0;
  const double t0 = now_seconds();
  double t = t0;
  while (n < 3 || t - t0 < seconds) {
    if (!fn()) return -1;
    ++n;
    if ((n & 15) == 0 || n < 16) t = now_seconds();
  }
  return n / (now_seconds() - t0);
}

}  // namespace

int cmd_bench_verify(int argc, char** argv) {
  po::options_description opts("Options");
  std::string report_path, vcek_path, at_text;
  double seconds = 2;
  opts.add_options()
      ("report", po::value(&report_path)->required(), "an attestation report (e.g. ../shared/testdata/snp/milan-v2-virtee/report.bin)")
      ("vcek", po::value(&vcek_path)->required(), "its VCEK (DER or PEM)")
      ("at", po::value(&at_text)->default_value("now"), "unix time to verify validity at, or 'now'")
      ("seconds", po::value(&seconds)->default_value(2), "seconds per measurement");
  po::positional_options_description pos;
  po::variables_map vm;
  if (auto stop = parse_options("bench verify", "--report F --vcek F [--at UNIX_TIME] [--seconds S]", argc, argv, opts, pos, vm)) {
    return *stop;
  }
  auto report_text = read_small_file(report_path);
  if (!report_text) return report(report_text.error());
  auto vcek_text = read_small_file(vcek_path);
  if (!vcek_text) return report(vcek_text.error());
  const Bytes report_bytes = to_bytes(*report_text);
  const Bytes vcek = to_bytes(*vcek_text);
  snp::VerifyInputs in;
  in.report = report_bytes;
  in.endorsement_cert = vcek;
  in.at = std::time(nullptr);
  if (at_text != "now") {
    if (at_text.empty() || at_text.find_first_not_of("0123456789") != std::string::npos) {
      return usage_error("bench verify", "--at wants a unix time in seconds or 'now', got '" + at_text + "'");
    }
    in.at = static_cast<std::time_t>(std::stoll(at_text));
  }
  auto first = snp::verify_report(in);
  if (!first) return report(first.error());

  // Baseline: OpenSSL verifying the same ECDSA P-384 signature over the same 0x2A0 bytes.
  auto der = snp::signature_der(first->report);
  if (!der) return report(der.error());
  auto cert = snp::parse_endorsement_extensions(vcek);  // validates the input once more
  if (!cert) return report(cert.error());
  X509* x = nullptr;
  if (!vcek.empty() && vcek.front() == std::byte{'-'}) {
    BIO* bio = BIO_new_mem_buf(vcek.data(), static_cast<int>(vcek.size()));
    x = PEM_read_bio_X509(bio, nullptr, nullptr, nullptr);
    BIO_free(bio);
  } else {
    const unsigned char* p = reinterpret_cast<const unsigned char*>(vcek.data());
    x = d2i_X509(nullptr, &p, static_cast<long>(vcek.size()));
  }
  if (x == nullptr) return usage_error("bench verify", "--vcek is neither a DER nor a PEM certificate");
  EVP_PKEY* key = X509_get0_pubkey(x);
  const double openssl = rate(seconds, [&] {
    EVP_MD_CTX* ctx = EVP_MD_CTX_new();
    const bool ok = EVP_DigestVerifyInit(ctx, nullptr, EVP_sha384(), nullptr, key) == 1 &&
                    EVP_DigestVerify(ctx, reinterpret_cast<const unsigned char*>(der->data()), der->size(),
                                     reinterpret_cast<const unsigned char*>(report_bytes.data()), snp::kSignedSize) == 1;
    EVP_MD_CTX_free(ctx);
    return ok;
  });
  const double full = rate(seconds, [&] { return snp::verify_report(in).has_value(); });
  snp::CachedVerifier cv;
  const double cached = rate(seconds, [&] { return cv.verify(in).has_value(); });
  X509_free(x);
  if (openssl <= 0 || full <= 0 || cached <= 0) {
    std::fprintf(stderr, "tresor bench verify: a verification failed during the run\n");
    return kExitInternal;
  }
  std::printf("tresor bench verify: %s, %.1f s per figure, 1 thread\n", report_path.c_str(), seconds);
  std::printf("  openssl ECDSA P-384 verify (same signature): %8.0f /s\n", openssl);
  std::printf("  tresor verify, chain cached:                  %8.0f /s  (%.2fx openssl)\n", cached, cached / openssl);
  std::printf("  tresor verify, chain verified each time:      %8.0f /s  (%.2fx openssl)\n", full, full / openssl);
  std::printf("RESULT verify openssl_ecdsa_p384_per_s=%.0f cached_per_s=%.0f cached_ratio=%.3f full_per_s=%.0f full_ratio=%.3f\n",
              openssl, cached, cached / openssl, full, full / openssl);
  return kExitOk;
}

}  // namespace tresor::cli
