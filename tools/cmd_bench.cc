// tresor bench seal: sealed-format throughput against OpenSSL's own EVP AES-256-GCM, measured in
// the same run on the same chunk size, plus the peak memory of the streaming path.
#include <openssl/evp.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <thread>

#include "options.h"
#include "tresor/thread_pool.h"

namespace tresor::cli {
namespace {

// Writes into a preallocated buffer so that the benchmark does not time vector growth.
class FixedSink final : public ByteSink {
 public:
  explicit FixedSink(MutableByteSpan buf) : buf_(buf) {}
  Result<void> write(ByteSpan data) override {
    if (data.size() > buf_.size() - pos_) return fail(ErrorCode::kIo, "bench sink full");
    std::memcpy(buf_.data() + pos_, data.data(), data.size());
    pos_ += data.size();
    return {};
  }
  size_t size() const { return pos_; }

 private:
  MutableByteSpan buf_;
  size_t pos_ = 0;
};

// Produces `total` bytes by repeating a random block: constant memory, never zeros.
class PatternSource final : public ByteSource {
 public:
  PatternSource(ByteSpan block, uint64_t total) : block_(block), left_(total) {}
  Result<size_t> read(MutableByteSpan out) override {
    const size_t n = static_cast<size_t>(std::min<uint64_t>({out.size(), left_, block_.size() - pos_}));
    std::memcpy(out.data(), block_.data() + pos_, n);
    pos_ = (pos_ + n) % block_.size();
    left_ -= n;
    return n;
  }

 private:
  ByteSpan block_;
  uint64_t left_;
  size_t pos_ = 0;
};

// Seals on the fly what it is read from: lets the streaming reader be measured without storing
// the whole sealed stream. It uses one thread and buffers at most one batch of output.
class SealingSource final : public ByteSource {
 public:
  SealingSource(ByteSource& plain, const sealed::SealOptions& o) : plain_(plain), opts_(o) {}
  Result<size_t> read(MutableByteSpan out) override {
    if (!writer_) {
      auto w = sealed::SealWriter::create(opts_, buf_);
      if (!w) return std::unexpected(w.error());
      writer_.emplace(std::move(*w));
    }
    while (pos_ == buf_.bytes.size() && !finished_) {
      buf_.bytes.clear();
      pos_ = 0;
      Bytes chunk(opts_.chunk_size);
      auto n = plain_.read(chunk);
      if (!n) return std::unexpected(n.error());
      if (*n == 0) {
        TRESOR_TRY(writer_->finish());
        finished_ = true;
      } else {
        TRESOR_TRY(writer_->write(ByteSpan(chunk).first(*n)));
      }
    }
    const size_t n = std::min(out.size(), buf_.bytes.size() - pos_);
    std::memcpy(out.data(), buf_.bytes.data() + pos_, n);
    pos_ += n;
    return n;
  }

 private:
  ByteSource& plain_;
  sealed::SealOptions opts_;
  MemorySink buf_;
  std::optional<sealed::SealWriter> writer_;
  size_t pos_ = 0;
  bool finished_ = false;
};

long max_rss_kib() {
  rusage ru{};
  ::getrusage(RUSAGE_SELF, &ru);
  return ru.ru_maxrss;
}

// Runs fn in a child process and returns the growth of its peak RSS in MiB (a fresh process
// image, so the parent's buffers do not count).
double peak_growth_mib(const std::function<bool()>& fn) {
  int fds[2];
  if (::pipe(fds) != 0) return -1;
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::close(fds[0]);
    const long before = max_rss_kib();
    const bool ok = fn();
    const double growth = ok ? static_cast<double>(max_rss_kib() - before) / 1024.0 : -1;
    if (::write(fds[1], &growth, sizeof growth) != sizeof growth) _exit(1);
    _exit(0);
  }
  ::close(fds[1]);
  double growth = -1;
  if (::read(fds[0], &growth, sizeof growth) != sizeof growth) growth = -1;
  ::close(fds[0]);
  int status = 0;
  ::waitpid(pid, &status, 0);
  return growth;
}

// OpenSSL's own AES-256-GCM over the buffer in chunk-sized messages: the baseline.
double openssl_gcm_seconds(ByteSpan key, ByteSpan in, MutableByteSpan out, size_t chunk, bool encrypt) {
  EVP_CIPHER_CTX* ctx = EVP_CIPHER_CTX_new();
  auto* k = reinterpret_cast<const unsigned char*>(key.data());
  if (encrypt) {
    EVP_EncryptInit_ex(ctx, EVP_aes_256_gcm(), nullptr, k, nullptr);
  } else {
    EVP_DecryptInit_ex(ctx, EVP_aes_256_gcm(), nullptr, k, nullptr);
  }
  unsigned char iv[12] = {};
  unsigned char tag[16] = {};
  int len = 0;
  const double t0 = now_seconds();
  for (size_t off = 0, i = 0; off < in.size(); off += chunk, ++i) {
    const size_t n = std::min(chunk, in.size() - off);
    std::memcpy(iv + 4, &i, sizeof(uint64_t));
    auto* src = reinterpret_cast<const unsigned char*>(in.data()) + off;
    auto* dst = reinterpret_cast<unsigned char*>(out.data()) + off;
    if (encrypt) {
      EVP_EncryptInit_ex(ctx, nullptr, nullptr, nullptr, iv);
      EVP_EncryptUpdate(ctx, dst, &len, src, static_cast<int>(n));
      EVP_EncryptFinal_ex(ctx, dst + n, &len);
      EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, 16, tag);
    } else {
      // Decrypt-side cost without a tag to match: the same GHASH and CTR work as a real open.
      EVP_DecryptInit_ex(ctx, nullptr, nullptr, nullptr, iv);
      EVP_DecryptUpdate(ctx, dst, &len, src, static_cast<int>(n));
      EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, 16, tag);
      EVP_DecryptFinal_ex(ctx, dst + n, &len);
    }
  }
  const double secs = now_seconds() - t0;
  EVP_CIPHER_CTX_free(ctx);
  return secs;
}

}  // namespace

int cmd_bench(int argc, char** argv) {
  if (argc >= 2 && std::string_view(argv[1]) == "verify") return cmd_bench_verify(argc - 1, argv + 1);
  if (argc >= 2 && std::string_view(argv[1]) == "broker") return cmd_bench_broker(argc - 1, argv + 1);
  if (argc >= 2 && std::string_view(argv[1]) == "launch") return cmd_bench_launch(argc - 1, argv + 1);
  if (argc >= 2 && std::string_view(argv[1]) == "gpu") return cmd_bench_gpu(argc - 1, argv + 1);
  if (argc >= 2 && std::string_view(argv[1]) == "prep") return cmd_bench_prep(argc - 1, argv + 1);
  if (argc >= 2 && std::string_view(argv[1]) == "train") return cmd_bench_train(argc - 1, argv + 1);
  if (argc >= 2 && std::string_view(argv[1]) == "collective") return cmd_bench_collective(argc - 1, argv + 1);
  po::options_description opts("Options");
  std::string what, size_text = "1GiB", chunk_text = "1MiB";
  unsigned max_threads = 0, reps = 3;
  std::string thread_list;
  opts.add_options()
      ("what", po::value(&what)->required(), "benchmark to run: seal (or 'tresor bench verify|broker|launch|gpu|prep|train|collective --help')")
      ("size", po::value(&size_text)->default_value("1GiB"), "bytes to process per measurement")
      ("chunk-size", po::value(&chunk_text)->default_value("1MiB"), "chunk size")
      ("threads-max", po::value(&max_threads)->default_value(0), "measure 1..N threads (0 = all cores)")
      ("threads", po::value(&thread_list), "measure exactly these thread counts, e.g. 1,2,4,8,16 (overrides --threads-max)")
      ("reps", po::value(&reps)->default_value(3), "repetitions per figure (best is kept)");
  po::positional_options_description pos;
  pos.add("what", 1);
  po::variables_map vm;
  if (auto stop = parse_options("bench", "seal [--size 1GiB] [--chunk-size 1MiB] [--threads-max N]", argc, argv, opts,
                                pos, vm)) {
    return *stop;
  }
  if (what != "seal") return usage_error("bench", "unknown benchmark '" + what + "' (available: seal, verify, broker, launch, gpu, prep, train)");
  auto size = parse_size(size_text, "--size");
  if (!size) return report(size.error());
  auto chunk = parse_size(chunk_text, "--chunk-size");
  if (!chunk) return report(chunk.error());
  std::vector<unsigned> counts;
  if (!thread_list.empty()) {
    size_t at = 0;
    while (at <= thread_list.size()) {
      size_t end = thread_list.find(',', at);
      if (end == std::string::npos) end = thread_list.size();
      const std::string item = thread_list.substr(at, end - at);
      if (item.empty() || item.find_first_not_of("0123456789") != std::string::npos || std::stoul(item) == 0 ||
          std::stoul(item) > 1024) {
        return usage_error("bench", "--threads wants a comma-separated list of counts 1..1024, got '" + thread_list + "'");
      }
      counts.push_back(static_cast<unsigned>(std::stoul(item)));
      at = end + 1;
    }
  } else {
    for (unsigned t = 1; t <= ThreadPool::resolve(max_threads); ++t) counts.push_back(t);
  }
  const unsigned tmax = *std::max_element(counts.begin(), counts.end());
  if (reps == 0) return usage_error("bench", "--reps must be at least 1");

  auto id = Identity::generate();
  if (!id) return report(id.error());
  sealed::SealOptions so;
  so.recipients.push_back(id->recipient());
  so.chunk_size = static_cast<uint32_t>(*chunk);
  if (auto ok = sealed::check_seal_options(so); !ok) return usage_error("bench", ok.error().message);
  sealed::KeyRing ring;
  ring.identities.push_back(&*id);

  std::string counts_text;
  for (unsigned c : counts) counts_text += (counts_text.empty() ? "" : ",") + std::to_string(c);
  std::printf("tresor bench seal: %s in %s chunks, threads %s, best of %u\n", format_size(*size).c_str(),
              format_size(*chunk).c_str(), counts_text.c_str(), reps);

  // Streaming memory first, in fresh children, before this process holds the big buffers.
  Bytes block(1 << 20);
  if (auto r = crypto::random_bytes(block); !r) return report(r.error());
  const double seal_peak = peak_growth_mib([&] {
    PatternSource src(block, *size);
    NullSink sink;
    sealed::SealOptions o = so;
    o.threads = tmax;
    return sealed::seal_stream(src, sink, o).has_value();
  });
  const double open_peak = peak_growth_mib([&] {
    PatternSource plain(block, *size);
    sealed::SealOptions o = so;
    o.threads = 1;
    SealingSource src(plain, o);
    NullSink sink;
    sealed::OpenOptions oo;
    oo.threads = tmax;
    return sealed::open_stream(src, sink, ring, oo).has_value();
  });
  const double bound_mib = tmax * 2.0 * static_cast<double>(*chunk) / (1 << 20) + 16;

  Bytes plain(*size);
  if (auto r = crypto::random_bytes(plain); !r) return report(r.error());
  std::array<std::byte, 32> key;
  if (auto r = crypto::random_bytes(key); !r) return report(r.error());
  auto sealed_len = sealed::sealed_size(*size, so);
  if (!sealed_len) return report(sealed_len.error());
  Bytes sealed_buf(*sealed_len);
  Bytes opened(*size);
  Bytes scratch(*size + (*size / *chunk + 1) * 16);
  // Touch every page once so that no measurement pays for first-touch page faults.
  std::fill(opened.begin(), opened.end(), std::byte{1});
  std::fill(scratch.begin(), scratch.end(), std::byte{1});
  std::fill(sealed_buf.begin(), sealed_buf.end(), std::byte{1});
  const double gb = static_cast<double>(*size) / 1e9;

  // OpenSSL with t threads, each on its own contiguous slice of whole chunks.
  auto openssl_gbps = [&](unsigned t, bool encrypt) {
    const size_t chunks = (*size + *chunk - 1) / *chunk;
    const size_t per = (chunks + t - 1) / t * *chunk;
    double best = 1e30;
    for (unsigned r = 0; r < reps; ++r) {
      std::vector<std::thread> ts;
      const double t0 = now_seconds();
      for (unsigned k = 0; k < t; ++k) {
        const size_t off = std::min<size_t>(*size, k * per);
        const size_t len = std::min<size_t>(*size - off, per);
        ts.emplace_back([&, off, len] {
          if (encrypt) {
            openssl_gcm_seconds(key, ByteSpan(plain).subspan(off, len), MutableByteSpan(scratch).subspan(off), *chunk, true);
          } else {
            openssl_gcm_seconds(key, ByteSpan(scratch).subspan(off, len), MutableByteSpan(opened).subspan(off), *chunk, false);
          }
        });
      }
      for (auto& th : ts) th.join();
      best = std::min(best, now_seconds() - t0);
    }
    return gb / best;
  };

  std::string result = "RESULT bench_seal size_mib=" + std::to_string(*size >> 20) +
                       " chunk_kib=" + std::to_string(*chunk >> 10) + " threads_max=" + std::to_string(tmax);
  char kv[200];
  double worst_parallel_ratio = 1e9;
  double par_seal1 = 0, par_open1 = 0, ossl_seal1 = 0, ossl_open1 = 0;
  std::printf("  %-34s %9s %9s %8s %9s %9s %8s\n", "path (threads)", "seal GB/s", "openssl", "ratio", "open GB/s",
              "openssl", "ratio");
  for (unsigned t : counts) {
    const double os = openssl_gbps(t, true), oo_ = openssl_gbps(t, false);
    double bps = 1e30, bpo = 1e30, bss = 1e30, bso = 1e30;
    for (unsigned r = 0; r < reps; ++r) {
      sealed::SealOptions o = so;
      o.threads = t;
      sealed::OpenOptions oo;
      oo.threads = t;
      // Parallel path: straight from buffer to buffer.
      double t0 = now_seconds();
      auto ps = sealed::seal_parallel(plain, sealed_buf, o);
      bps = std::min(bps, now_seconds() - t0);
      if (!ps) return report(ps.error());
      t0 = now_seconds();
      auto po = sealed::open_parallel(sealed_buf, opened, ring, oo);
      bpo = std::min(bpo, now_seconds() - t0);
      if (!po) return report(po.error());
      if (opened != plain) {
        std::fprintf(stderr, "tresor bench: opened data differs from the input\n");
        return kExitInternal;
      }
      // Streaming path: through ByteSource/ByteSink with bounded memory (one copy in, one out).
      MemorySource src(plain);
      FixedSink sink(sealed_buf);
      t0 = now_seconds();
      auto ss = sealed::seal_stream(src, sink, o);
      bss = std::min(bss, now_seconds() - t0);
      if (!ss) return report(ss.error());
      MemorySource in(ByteSpan(sealed_buf).first(sink.size()));
      FixedSink out(opened);
      t0 = now_seconds();
      auto so2 = sealed::open_stream(in, out, ring, oo);
      bso = std::min(bso, now_seconds() - t0);
      if (!so2) return report(so2.error());
    }
    const double ps = gb / bps, po = gb / bpo, ss = gb / bss, sop = gb / bso;
    if (t == counts.front()) {
      par_seal1 = ps;
      par_open1 = po;
      ossl_seal1 = os;
      ossl_open1 = oo_;
    }
    worst_parallel_ratio = std::min({worst_parallel_ratio, ps / os, po / oo_});
    std::printf("  %-31s %2u %9.2f %9.2f %7.2fx %9.2f %9.2f %7.2fx\n", "parallel (buffer to buffer)", t, ps, os, ps / os,
                po, oo_, po / oo_);
    std::printf("  %-31s %2u %9.2f %9.2f %7.2fx %9.2f %9.2f %7.2fx\n", "streaming (source to sink)", t, ss, os, ss / os,
                sop, oo_, sop / oo_);
    std::snprintf(kv, sizeof kv,
                  " openssl_seal_t%u_gbps=%.3f openssl_open_t%u_gbps=%.3f parallel_seal_t%u_ratio=%.3f"
                  " parallel_open_t%u_ratio=%.3f stream_seal_t%u_ratio=%.3f stream_open_t%u_ratio=%.3f",
                  t, os, t, oo_, t, ps / os, t, po / oo_, t, ss / os, t, sop / oo_);
    result += kv;
    if (t != counts.front()) {
      std::snprintf(kv, sizeof kv,
                    " parallel_seal_t%u_scaling=%.2f parallel_open_t%u_scaling=%.2f openssl_t%u_scaling=%.2f", t,
                    ps / par_seal1, t, po / par_open1, t, 0.5 * (os / ossl_seal1 + oo_ / ossl_open1));
      result += kv;
    }
  }
  std::printf("  ratio = Tresor / OpenSSL EVP aes-256-gcm with the same threads and chunk size; scaling = vs %u thread(s)\n",
              counts.front());
  std::printf("  streaming peak memory with %u threads: seal %.1f MiB, open %.1f MiB (bound %.1f MiB = threads x 2 x chunk + 16 MiB;"
              " the open figure includes a one-thread sealer feeding it)\n",
              tmax, seal_peak, open_peak, bound_mib);
  std::snprintf(kv, sizeof kv, " worst_parallel_ratio=%.3f stream_seal_peak_mib=%.1f stream_open_peak_mib=%.1f stream_bound_mib=%.1f",
                worst_parallel_ratio, seal_peak, open_peak, bound_mib);
  result += kv;
  std::printf("%s\n", result.c_str());
  return kExitOk;
}

}  // namespace tresor::cli
