// tresor bench collective: the CPU collective's all-reduce of one gradient bucket between ranks
// over TLS links pinned to a step roster (training across machines, docs/training.md §5.3), as a
// ratio to the same all-reduce over plain TCP measured in the same run. Ranks are threads of this
// process on 127.0.0.1, so the figure is the cost of the encryption and framing, not of a network.

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <thread>

#include "options.h"
#include "tresor/train/collective.h"

namespace tresor::cli {
namespace {

// Seconds per all-reduce of `elements` floats on every rank (rank 0's clock, after one warm-up).
Result<double> time_all_reduce(std::vector<train::Rendezvous> ranks, size_t elements, int reps) {
  std::vector<Error> errors;
  std::mutex mu;
  double seconds = 0;
  {
    std::vector<std::jthread> threads;
    for (auto& rv : ranks) {
      threads.emplace_back([&, rv] {
        auto c = train::connect_tcp(rv);
        std::vector<float> v(elements, 1.0f);
        auto record = [&](const Error& e) {
          std::lock_guard lock(mu);
          errors.push_back(e);
        };
        if (!c) return record(c.error());
        if (auto r = (*c)->all_reduce_sum(v); !r) return record(r.error());
        const double t0 = now_seconds();
        for (int i = 0; i < reps; ++i) {
          if (auto r = (*c)->all_reduce_sum(v); !r) return record(r.error());
        }
        if (rv.rank == 0) seconds = (now_seconds() - t0) / reps;
      });
    }
  }
  if (!errors.empty()) return std::unexpected(errors.front());
  return seconds;
}

}  // namespace

int cmd_bench_collective(int argc, char** argv) {
  po::options_description opts("Options");
  int ranks = 2, reps = 10;
  double mib = 25;
  opts.add_options()
      ("ranks", po::value(&ranks)->default_value(2), "ranks (threads of this process), 2..8")
      ("mib", po::value(&mib)->default_value(25), "MiB per all-reduce (the trainer's gradient bucket is 25 MiB)")
      ("reps", po::value(&reps)->default_value(10), "all-reduces timed per transport");
  po::positional_options_description pos;
  po::variables_map vm;
  if (auto stop = parse_options("bench collective", "[--ranks 2] [--mib 25] [--reps 10]", argc, argv, opts, pos, vm)) return *stop;
  if (ranks < 2 || ranks > 8) return usage_error("bench collective", "--ranks must be 2..8");
  if (!(mib > 0 && mib <= 1024)) return usage_error("bench collective", "--mib must be in (0, 1024]");
  if (reps < 1 || reps > 10000) return usage_error("bench collective", "--reps must be 1..10000");
  const size_t elements = static_cast<size_t>(mib * 1024 * 1024 / sizeof(float));

  // Plain TCP: the rendezvous file in a private temporary directory.
  std::string tmpl = (std::filesystem::temp_directory_path() / "tresor-bench-XXXXXX").string();
  if (::mkdtemp(tmpl.data()) == nullptr) return report(Error{ErrorCode::kIo, "bench collective: mkdtemp failed"});
  std::vector<train::Rendezvous> plain(static_cast<size_t>(ranks));
  for (int r = 0; r < ranks; ++r) {
    plain[static_cast<size_t>(r)].rank = r;
    plain[static_cast<size_t>(r)].size = ranks;
    plain[static_cast<size_t>(r)].directory = tmpl;
  }
  auto plain_s = time_all_reduce(plain, elements, reps);
  std::error_code ec;
  std::filesystem::remove_all(tmpl, ec);
  if (!plain_s) return report(plain_s.error());

  // TLS: fresh link keys and a roster on a free port.
  std::vector<std::shared_ptr<const crypto::Key>> keys;
  std::vector<std::array<std::byte, 32>> pubs;
  for (int r = 0; r < ranks; ++r) {
    auto k = crypto::Key::generate(crypto::KeyType::kEd25519);
    if (!k) return report(k.error());
    auto pub = link_public_key(*k);
    if (!pub) return report(pub.error());
    pubs.push_back(*pub);
    keys.push_back(std::make_shared<const crypto::Key>(std::move(*k)));
  }
  auto port = unused_loopback_port();
  if (!port) return report(port.error());
  auto roster = train::parse_roster(train::roster_text("bench.0", "127.0.0.1:" + std::to_string(*port), pubs));
  if (!roster) return report(roster.error());
  const auto shared = std::make_shared<const train::Roster>(std::move(*roster));
  std::vector<train::Rendezvous> tls(static_cast<size_t>(ranks));
  for (int r = 0; r < ranks; ++r) {
    auto& rv = tls[static_cast<size_t>(r)];
    rv.rank = r;
    rv.size = ranks;
    rv.run_id = shared->step;
    rv.roster = shared;
    rv.link_key = keys[static_cast<size_t>(r)];
  }
  auto tls_s = time_all_reduce(tls, elements, reps);
  if (!tls_s) return report(tls_s.error());

  const double bytes = static_cast<double>(elements * sizeof(float));
  const double plain_gbps = bytes / *plain_s / 1e9, tls_gbps = bytes / *tls_s / 1e9;
  std::printf("all-reduce of %.1f MiB on %d ranks (threads, 127.0.0.1), %d times each:\n", mib, ranks, reps);
  std::printf("  plain TCP          %8.2f ms  %6.2f GB/s\n", *plain_s * 1e3, plain_gbps);
  std::printf("  TLS, pinned keys   %8.2f ms  %6.2f GB/s  (%.2fx plain)\n", *tls_s * 1e3, tls_gbps, tls_gbps / plain_gbps);
  std::printf("RESULT bench_collective ranks=%d mib=%.1f reps=%d cores=%u plain_ms=%.2f tls_ms=%.2f plain_gbps=%.3f tls_gbps=%.3f tls_ratio=%.3f\n", ranks, mib, reps,
              std::thread::hardware_concurrency(), *plain_s * 1e3, *tls_s * 1e3, plain_gbps, tls_gbps, tls_gbps / plain_gbps);
  return kExitOk;
}

}  // namespace tresor::cli
