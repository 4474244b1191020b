// tresor bench gpu: the GPU data path (issue 7, docs/gpu-channel.md), each figure against a
// baseline measured in the same run:
//  (a) the AES-GCM kernel opening device-resident frames, against a device-to-device copy of the
//      same bytes;
//  (b) a sealed file in the page cache to plaintext in device memory (SecureChannel::upload),
//      against a plain pinned host-to-device copy of the plaintext;
//  (c) the CC-mode-like path: the CPU opens the file with all cores (OpenSSL) into pinned memory,
//      then copies the plaintext to the device — (b)'s speed-up over it.
// Without a GPU it says so and measures the same paths on the CPU device (OpenSSL into host
// memory), which are then not GPU figures.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <filesystem>
#include <functional>
#include <stdlib.h>

#include "cli.h"
#include "options.h"
#include "tresor/crypto.h"
#include "tresor/gpu/channel.h"
#include "tresor/identity.h"
#include "tresor/io.h"
#include "tresor/sealed.h"
#include "tresor/thread_pool.h"

namespace tresor::cli {
namespace {

// Best wall time of `reps` runs of `fn`, in seconds; the error of the first failing run.
Result<double> best_of(unsigned reps, const std::function<Result<void>()>& fn) {
  double best = 1e300;
  for (unsigned r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    TRESOR_TRY(fn());
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return best;
}

}  // namespace

int cmd_bench_gpu(int argc, char** argv) {
  po::options_description opts("Options");
  std::string size_text = "1GiB", chunk_text = "1MiB", device_name = "auto";
  unsigned reps = 3, batch = 64, depth = 3;
  opts.add_options()
      ("size", po::value(&size_text)->default_value("1GiB"), "plaintext bytes per measurement")
      ("chunk-size", po::value(&chunk_text)->default_value("1MiB"), "chunk size of the sealed file")
      ("device", po::value(&device_name)->default_value("auto"), "auto (CUDA device 0, else the CPU), cuda:N, cpu or emulated")
      ("batch", po::value(&batch)->default_value(64), "chunks per staging slot")
      ("depth", po::value(&depth)->default_value(3), "staging slots")
      ("reps", po::value(&reps)->default_value(3), "repetitions per figure (best is kept)");
  po::variables_map vm;
  if (auto stop = parse_options("bench gpu", "[--size 1GiB] [--chunk-size 1MiB] [--device auto|cuda:N|cpu|emulated]", argc, argv, opts, {},
                                vm)) {
    return *stop;
  }
  auto size = parse_size(size_text, "--size");
  if (!size) return report(size.error());
  auto chunk = parse_size(chunk_text, "--chunk-size");
  if (!chunk) return report(chunk.error());
  if (reps == 0) return usage_error("bench gpu", "--reps must be at least 1");

  std::unique_ptr<gpu::ChannelDevice> device;
  std::string no_gpu;
  if (device_name == "auto" || device_name.starts_with("cuda:")) {
    const int index = device_name == "auto" ? 0 : std::atoi(device_name.c_str() + 5);
    auto c = gpu::cuda_device(index);
    if (c) {
      device = std::move(*c);
    } else if (device_name != "auto") {
      return report(c.error());
    } else {
      no_gpu = c.error().message;
      device = gpu::cpu_device(0);
    }
  } else if (device_name == "cpu") {
    device = gpu::cpu_device(0);
  } else if (device_name == "emulated") {
    device = gpu::emulated_device();
  } else {
    return usage_error("bench gpu", "--device must be auto, cuda:N, cpu or emulated, not '" + device_name + "'");
  }
  const bool on_gpu = !device->host_memory();

  auto id = Identity::generate();
  if (!id) return report(id.error());
  sealed::SealOptions so;
  so.recipients.push_back(id->recipient());
  so.chunk_size = static_cast<uint32_t>(*chunk);
  so.threads = 0;
  if (auto ok = sealed::check_seal_options(so); !ok) return usage_error("bench gpu", ok.error().message);
  sealed::KeyRing ring;
  ring.identities.push_back(&*id);

  std::printf("tresor bench gpu: %s in %s chunks on %s, best of %u\n", format_size(*size).c_str(), format_size(*chunk).c_str(),
              device->name().c_str(), reps);
  if (!no_gpu.empty()) std::printf("  no GPU (%s): the figures below are the CPU device's, NOT GPU figures\n", no_gpu.c_str());

  // The sealed file, in the page cache.
  Bytes plain(*size);
  if (auto r = crypto::random_bytes(plain); !r) return report(r.error());
  auto sealed_len = sealed::sealed_size(*size, so);
  if (!sealed_len) return report(sealed_len.error());
  Bytes file(*sealed_len);
  if (auto r = sealed::seal_parallel(plain, file, so); !r) return report(r.error());
  std::string tmp = (std::filesystem::temp_directory_path() / "tresor-bench-gpu-XXXXXX").string();
  if (::mkdtemp(tmp.data()) == nullptr) return report(Error{ErrorCode::kIo, "cannot make a temporary directory " + tmp});
  const std::string path = tmp + "/bench.sealed";
  {
    std::ofstream out(path, std::ios::binary);
    out.write(reinterpret_cast<const char*>(file.data()), static_cast<std::streamsize>(file.size()));
    if (!out.flush()) return report(Error{ErrorCode::kIo, "cannot write " + path});
  }
  auto header = sealed::parse_header(file);
  if (!header) return report(header.error());
  const size_t header_len = header->size();
  const double gb = static_cast<double>(*size) / 1e9;
  int rc = kExitOk;
  auto result = [&]() -> Result<void> {
    // (a) The kernel on device-resident frames, against a device-to-device copy.
    const size_t frames_bytes = file.size() - header_len;
    auto d_frames = device->device_alloc(frames_bytes);
    if (!d_frames) return std::unexpected(d_frames.error());
    auto d_out = device->device_alloc(*size);
    auto d_failed = device->device_alloc(frames_bytes / (*chunk + 16) + 1);
    if (!d_out || !d_failed) {
      device->device_free(*d_frames);
      return std::unexpected(!d_out ? d_out.error() : d_failed.error());
    }
    struct Free {
      gpu::ChannelDevice& d;
      std::vector<gpu::Mem> m;
      ~Free() {
        for (auto x : m) d.device_free(x);
      }
    } freer{*device, {*d_frames, *d_out, *d_failed}};
    TRESOR_TRY(device->write_device(d_frames->p, ByteSpan(file).subspan(header_len)));
    auto unlock = sealed::unlock(*header, ByteSpan(file).first(header_len), ring, path);
    if (!unlock) return std::unexpected(unlock.error());
    auto ck = gpu::ChunkKey::for_stream(unlock->span(), header->nonce_prefix);
    if (!ck) return std::unexpected(ck.error());
    const gpu::ChunkRun run = gpu::whole_stream(*header);
    auto shape = gpu::run_shape(run, frames_bytes);
    if (!shape) return std::unexpected(shape.error());
    auto d_key = device->load_key(*ck);
    if (!d_key) return std::unexpected(d_key.error());
    freer.m.push_back(*d_key);
    const uint64_t last_len = shape->plaintext_bytes - (shape->chunks - 1) * *chunk;
    auto kernel_s = best_of(reps, [&]() -> Result<void> {
      TRESOR_TRY(device->run_chunks(0, d_key->p, run, shape->chunks, last_len, false, d_frames->p, d_out->p, d_failed->p));
      return device->synchronize(0);
    });
    if (!kernel_s) return std::unexpected(kernel_s.error());
    auto d2d_s = best_of(reps, [&]() -> Result<void> {
      TRESOR_TRY(device->copy_on_device(0, d_out->p, d_frames->p, *size));
      return device->synchronize(0);
    });
    if (!d2d_s) return std::unexpected(d2d_s.error());

    // (b) File to device memory through the channel, against a pinned copy of the plaintext.
    gpu::SecureChannel ch(*device, gpu::ChannelOptions{.batch_chunks = batch, .depth = depth});
    auto upload_s = best_of(reps, [&]() -> Result<void> {
      auto buf = ch.upload(path, ring);
      if (!buf) return std::unexpected(buf.error());
      return {};
    });
    if (!upload_s) return std::unexpected(upload_s.error());
    auto pinned = device->staging_alloc(*size);
    if (!pinned) return std::unexpected(pinned.error());
    std::copy(plain.begin(), plain.end(), pinned->p);
    auto h2d_s = best_of(reps, [&]() -> Result<void> {
      TRESOR_TRY(device->copy_to_device(0, d_out->p, pinned->p, *size));
      return device->synchronize(0);
    });
    // (c) The CC-mode-like path: CPU decrypt with every core into pinned memory, then copy.
    auto cpu_path_s = best_of(reps, [&]() -> Result<void> {
      auto in = FdFile::open_read(path);
      if (!in) return std::unexpected(in.error());
      Bytes sealed_bytes(file.size());
      TRESOR_TRY(in->read_at(0, sealed_bytes));
      sealed::OpenOptions oo;
      oo.threads = 0;
      auto n = sealed::open_parallel(sealed_bytes, MutableByteSpan(pinned->p, *size), ring, oo);
      if (!n) return std::unexpected(n.error());
      TRESOR_TRY(device->copy_to_device(0, d_out->p, pinned->p, *size));
      return device->synchronize(0);
    });
    device->staging_free(*pinned);
    if (!h2d_s || !cpu_path_s) return std::unexpected(!h2d_s ? h2d_s.error() : cpu_path_s.error());

    const double kernel = gb / *kernel_s, d2d = gb / *d2d_s, upload = gb / *upload_s, h2d = gb / *h2d_s, cpu_path = gb / *cpu_path_s;
    std::printf("                                                     GB/s   baseline GB/s   ratio\n");
    std::printf("  (a) AES-GCM open, device-resident frames      %9.2f   %9.2f (%s)   %5.3fx\n", kernel, d2d,
                on_gpu ? "device-to-device copy" : "memcpy", kernel / d2d);
    std::printf("  (b) sealed file -> plaintext in device memory %9.2f   %9.2f (pinned %s)   %5.3fx\n", upload, h2d,
                on_gpu ? "host-to-device" : "memcpy", upload / h2d);
    std::printf("  (c) CPU open (all cores) + copy, CC-mode-like %9.2f   (b) is %.2fx of it\n", cpu_path, upload / cpu_path);
    std::printf("  channel: batch %u chunks, %u slots, %u in flight at most\n", batch, depth, ch.last().max_in_flight);
    std::printf("RESULT gpu_channel device=%s gpu=%s size_mib=%.0f chunk_kib=%.0f kernel_gbps=%.2f d2d_gbps=%.2f kernel_ratio=%.3f "
                "upload_gbps=%.2f pinned_h2d_gbps=%.2f upload_ratio=%.3f cpu_path_gbps=%.2f speedup_vs_cpu_path=%.2f cpu_threads=%u\n",
                on_gpu ? "cuda" : (device_name == "emulated" ? "emulated" : "cpu"), on_gpu ? "yes" : "none",
                static_cast<double>(*size) / (1 << 20), static_cast<double>(*chunk) / 1024, kernel, d2d, kernel / d2d, upload, h2d,
                upload / h2d, cpu_path, upload / cpu_path, ThreadPool::resolve(0));
    return {};
  }();
  if (!result) rc = report(result.error());
  std::error_code ec;
  std::filesystem::remove_all(tmp, ec);
  return rc;
}

}  // namespace tresor::cli
