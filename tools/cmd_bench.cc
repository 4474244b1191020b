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
  po::options_description opts("Options");
  std::string what, size_text = "1GiB", chunk_text = "1MiB";
  unsigned max_threads = 0, reps = 3;
  opts.add_options()
      ("what", po::value(&what)->required(), "benchmark to run: seal")
      ("size", po::value(&size_text)->default_value("1GiB"), "bytes to process per measurement")
      ("chunk-size", po::value(&chunk_text)->default_value("1MiB"), "chunk size")
      ("threads-max", po::value(&max_threads)->default_value(0), "measure 1..N threads (0 = all cores)")
      ("reps", po::value(&reps)->default_value(3), "repetitions per figure (best is kept)");
  po::positional_options_description pos;
  pos.add("what", 1);
  po::variables_map vm;
  if (auto stop = parse_options("bench", "seal [--size 1GiB] [--chunk-size 1MiB] [--threads-max N]", argc, argv, opts,
                                pos, vm)) {
    return *stop;
  }
  if (what != "seal") return usage_error("bench", "unknown benchmark '" + what + "' (available: seal)");
  auto size = parse_size(size_text, "--size");
  if (!size) return report(size.error());
  auto chunk = parse_size(chunk_text, "--chunk-size");
  if (!chunk) return report(chunk.error());
  const unsigned tmax = ThreadPool::resolve(max_threads);
  if (reps == 0) return usage_error("bench", "--reps must be at least 1");

  auto id = Identity::generate();
  if (!id) return report(id.error());
  sealed::SealOptions so;
  so.recipients.push_back(id->recipient());
  so.chunk_size = static_cast<uint32_t>(*chunk);
  if (auto ok = sealed::check_seal_options(so); !ok) return usage_error("bench", ok.error().message);
  sealed::KeyRing ring;
  ring.identities.push_back(&*id);

  std::printf("tresor bench seal: %s in %s chunks, threads 1..%u, best of %u\n", format_size(*size).c_str(),
              format_size(*chunk).c_str(), tmax, reps);

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
  Bytes scratch(*size + *size / *chunk * 16 + 64);
  std::array<std::byte, 32> key;
  if (auto r = crypto::random_bytes(key); !r) return report(r.error());

  Bytes opened(*size);
  const double gb = static_cast<double>(*size) / 1e9;
  double base_seal = 1e30, base_open = 1e30;
  for (unsigned r = 0; r < reps; ++r) {
    base_seal = std::min(base_seal, openssl_gcm_seconds(key, plain, scratch, *chunk, true));
    base_open = std::min(base_open, openssl_gcm_seconds(key, ByteSpan(scratch).first(*size), opened, *chunk, false));
  }
  const double base_seal_gbps = gb / base_seal, base_open_gbps = gb / base_open;
  std::printf("  openssl EVP aes-256-gcm, 1 thread:  seal %.2f GB/s  open %.2f GB/s\n", base_seal_gbps, base_open_gbps);

  Bytes sealed_buf(sealed::kMaxHeaderSize + *size + (*size / *chunk + 1) * sealed::kTagSize);
  std::string result = "RESULT bench_seal size_mib=" + std::to_string(*size >> 20) +
                       " chunk_kib=" + std::to_string(*chunk >> 10);
  char kv[128];
  std::snprintf(kv, sizeof kv, " openssl_seal_gbps=%.3f openssl_open_gbps=%.3f", base_seal_gbps, base_open_gbps);
  result += kv;
  double seal1 = 0, open1 = 0;
  double worst_ratio = 1e9;
  for (unsigned t = 1; t <= tmax; ++t) {
    double best_seal = 1e30, best_open = 1e30;
    size_t sealed_len = 0;
    for (unsigned r = 0; r < reps; ++r) {
      sealed::SealOptions o = so;
      o.threads = t;
      MemorySource src(plain);
      FixedSink sink(sealed_buf);
      double t0 = now_seconds();
      auto s = sealed::seal_stream(src, sink, o);
      best_seal = std::min(best_seal, now_seconds() - t0);
      if (!s) return report(s.error());
      sealed_len = sink.size();

      sealed::OpenOptions oo;
      oo.threads = t;
      MemorySource in(ByteSpan(sealed_buf).first(sealed_len));
      FixedSink out(opened);
      t0 = now_seconds();
      auto o2 = sealed::open_stream(in, out, ring, oo);
      best_open = std::min(best_open, now_seconds() - t0);
      if (!o2) return report(o2.error());
    }
    if (opened != plain) {
      std::fprintf(stderr, "tresor bench: opened data differs from the input\n");
      return kExitInternal;
    }
    const double sg = gb / best_seal, og = gb / best_open;
    if (t == 1) {
      seal1 = sg;
      open1 = og;
    }
    const double sr = sg / t / base_seal_gbps, orr = og / t / base_open_gbps;
    worst_ratio = std::min({worst_ratio, sr, orr});
    std::printf("  tresor sealed v1, %u thread(s):     seal %.2f GB/s (%.2fx openssl/thread, scaling %.2f)  "
                "open %.2f GB/s (%.2fx openssl/thread, scaling %.2f)\n",
                t, sg, sr, sg / seal1, og, orr, og / open1);
    std::snprintf(kv, sizeof kv, " seal_t%u_gbps=%.3f seal_t%u_ratio=%.3f open_t%u_gbps=%.3f open_t%u_ratio=%.3f", t, sg,
                  t, sr, t, og, t, orr);
    result += kv;
    if (t > 1) {
      std::snprintf(kv, sizeof kv, " seal_t%u_scaling=%.2f open_t%u_scaling=%.2f", t, sg / seal1, t, og / open1);
      result += kv;
    }
  }
  std::printf("  streaming peak memory with %u threads: seal %.1f MiB, open %.1f MiB (bound %.1f MiB = threads x 2 x chunk + 16 MiB;"
              " the open figure includes a one-thread sealer feeding it)\n",
              tmax, seal_peak, open_peak, bound_mib);
  std::snprintf(kv, sizeof kv, " stream_seal_peak_mib=%.1f stream_open_peak_mib=%.1f stream_bound_mib=%.1f", seal_peak,
                open_peak, bound_mib);
  result += kv;
  std::printf("%s\n", result.c_str());
  return kExitOk;
}

}  // namespace tresor::cli
