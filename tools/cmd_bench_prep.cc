// tresor bench prep: CT preprocessing speed against its baselines, measured in the same run on
// the same volume (issue 8, docs/benchmarks.md): the CPU reference Frangi against scikit-image's
// frangi() (Debian's python3-skimage, float64, one process), and the whole CPU pipeline
// (ct::prepare) on a CCTA-sized phantom. Ends with one RESULT line.
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>

#include "cli.h"
#include "options.h"
#include "tresor/ct/ops.h"
#include "tresor/ct/prep.h"
#include "tresor/gpu/channel.h"
#include "tresor/gpu/ct.h"
#include "tresor/identity.h"
#include "tresor/io.h"
#include "tresor/sealed.h"
#include "tresor/thread_pool.h"

namespace tresor::cli {
namespace {

namespace fs = std::filesystem;

template <typename F>
double seconds(F&& f) {
  const double t0 = now_seconds();
  f();
  return now_seconds() - t0;
}

}  // namespace

int cmd_bench_prep(int argc, char** argv) {
  po::options_description opts("Options");
  std::string size_text = "256x256x128", pipeline_text = "512x512x256";
  unsigned threads = 2;
  bool no_skimage = false, no_pipeline = false;
  opts.add_options()
      ("size", po::value(&size_text)->default_value("256x256x128"), "the Frangi comparison's volume, voxels XxYxZ (0.5 mm phantom)")
      ("pipeline-size", po::value(&pipeline_text)->default_value("512x512x256"), "the pipeline's volume, voxels (0.39x0.39x0.625 mm phantom, coarser if too small for the heart)")
      ("threads,j", po::value(&threads)->default_value(2), "threads for the parallel runs (1 is always measured too)")
      ("no-skimage", po::bool_switch(&no_skimage), "skip scikit-image (then no ratio)")
      ("no-pipeline", po::bool_switch(&no_pipeline), "skip the whole-pipeline run");
  po::variables_map vm;
  if (auto stop = parse_options("bench prep", "[--size 256x256x128] [-j 2] [--no-skimage]", argc, argv, opts, {}, vm)) return *stop;
  std::array<size_t, 3> dims{}, pdims{};
  char extra = 0;
  unsigned long a = 0, b = 0, c = 0;
  if (std::sscanf(size_text.c_str(), "%lux%lux%lu%c", &a, &b, &c, &extra) != 3) return usage_error("bench prep", "--size wants XxYxZ, not '" + size_text + "'");
  dims = {a, b, c};
  if (std::sscanf(pipeline_text.c_str(), "%lux%lux%lu%c", &a, &b, &c, &extra) != 3) return usage_error("bench prep", "--pipeline-size wants XxYxZ, not '" + pipeline_text + "'");
  pdims = {a, b, c};
  threads = ThreadPool::resolve(threads);

  // The Frangi comparison: a phantom, windowed to [0, 1] as the pipeline does; σ 1, 2, 3
  // voxels (0.5, 1, 1.5 mm), γ 0.5.
  ct::PhantomOptions po;
  po.dims = dims;
  // 0.5 mm in-plane and 0.625 mm slices, coarser where the volume is too small for the heart.
  po.spacing = {std::max(0.5, 121.0 / static_cast<double>(dims[0])), std::max(0.5, 121.0 / static_cast<double>(dims[1])),
                std::max(0.625, 81.0 / static_cast<double>(dims[2]))};
  auto ph = ct::make_phantom(po);
  if (!ph) return report(ph.error());
  auto win = ct::window(ph->hu, -100, 600);
  if (!win) return report(win.error());
  ct::FrangiOptions fo;
  fo.gamma = 0.5;
  const double voxels = static_cast<double>(win->size());
  Result<ct::FloatVolume> ours1 = fail(ErrorCode::kInvalidArgument, "not run"), oursn = ours1;
  const double t1 = seconds([&] { ours1 = ct::frangi(*win, fo, 1); });
  const double tn = seconds([&] { oursn = ct::frangi(*win, fo, threads); });
  if (!ours1 || !oursn) return report((ours1 ? oursn : ours1).error());
  std::printf("frangi %zux%zux%zu, 3 scales: Tresor CPU %.2f s on 1 thread, %.2f s on %u (%.1f Mvoxel/s)\n", dims[0], dims[1], dims[2], t1, tn, threads,
              voxels / tn / 1e6);

  double sk = 0, max_diff = -1;
  if (!no_skimage) {
    const char* tmp = std::getenv("TMPDIR");
    const fs::path dir = fs::path(tmp != nullptr && *tmp != '\0' ? tmp : "/tmp") / ("tresor-bench-prep-" + std::to_string(::getpid()));
    std::error_code ec;
    fs::create_directories(dir, ec);
    const std::string in = (dir / "in.f64").string(), out = (dir / "out.f64").string();
    {
      std::vector<double> d(win->data.begin(), win->data.end());
      auto f = AtomicOutputFile::create(in, 0600, true);
      if (!f) return report(f.error());
      if (auto w = f->write(ByteSpan(reinterpret_cast<const std::byte*>(d.data()), d.size() * 8)); !w) return report(w.error());
      if (auto cmt = f->commit(); !cmt) return report(cmt.error());
    }
    char shape[96];
    std::snprintf(shape, sizeof shape, "(%zu, %zu, %zu)", dims[2], dims[1], dims[0]);
    const std::string code = std::string("import sys, time, numpy as np\nfrom skimage.filters import frangi\n") + "v = np.fromfile('" + in +
                             "', dtype=np.float64).reshape(" + shape + ")\n" +
                             "t = time.perf_counter()\nr = frangi(v, sigmas=[1, 2, 3], alpha=0.5, beta=0.5, gamma=0.5, black_ridges=False, mode='reflect')\n"
                             "print(time.perf_counter() - t)\nr.astype(np.float64).tofile('" + out + "')\n";
    std::printf("scikit-image frangi on the same volume (float64, /usr/bin/python3) …\n");
    std::fflush(stdout);
    auto r = run_program({"/usr/bin/python3", "-c", code}, Stream::kCapture, Stream::kInherit);  // its errors reach the terminal
    if (!(r.status >= 0 && WIFEXITED(r.status) && WEXITSTATUS(r.status) == 0)) {
      fs::remove_all(dir, ec);
      return report(Error{ErrorCode::kUnavailable, "scikit-image did not run (install python3-skimage, or pass --no-skimage)"});
    }
    try {
      sk = std::stod(r.output);
    } catch (const std::exception&) {
      fs::remove_all(dir, ec);
      return report(Error{ErrorCode::kUnavailable, "scikit-image printed no time: '" + r.output + "'"});
    }
    const Bytes want = [&] {
      auto f = FdFile::open_read(out);
      Bytes all(win->size() * 8);
      if (!f || !f->read_at(0, all)) all.clear();
      return all;
    }();
    fs::remove_all(dir, ec);
    if (want.size() != win->size() * 8) return report(Error{ErrorCode::kIo, "scikit-image's output could not be read back"});
    max_diff = 0;
    for (size_t i = 0; i < win->size(); ++i) {
      double w = 0;
      std::memcpy(&w, want.data() + 8 * i, 8);
      max_diff = std::max(max_diff, std::abs(static_cast<double>(oursn->data[i]) - w));
    }
    std::printf("scikit-image %.2f s: Tresor is %.1fx faster on %u threads (%.1fx on 1); largest difference %.2g\n", sk, sk / tn, threads, sk / t1, max_diff);
  }

  double pipeline = 0;
  std::array<size_t, 3> pout{};
  std::string gpu_result = " gpu=none";
  if (!no_pipeline) {
    ct::PhantomOptions pp;
    pp.dims = pdims;
    pp.spacing = {std::max(0.39, 121.0 / static_cast<double>(pdims[0])), std::max(0.39, 121.0 / static_cast<double>(pdims[1])),
                  std::max(0.625, 81.0 / static_cast<double>(pdims[2]))};
    auto big = ct::make_phantom(pp);
    if (!big) return report(big.error());
    ct::PrepOptions o;
    o.threads = threads;
    Result<ct::Prepared> prepared = fail(ErrorCode::kInvalidArgument, "not run");
    pipeline = seconds([&] { prepared = ct::prepare(big->hu, &big->labels, o); });
    if (!prepared) return report(prepared.error());
    pout = prepared->image.dims;
    std::fflush(stdout);
    std::printf("pipeline %zux%zux%zu -> %zux%zux%zu at 0.5 mm (statistics, resampling, z-score, window, Frangi 3 scales, labels): CPU %.2f s on %u threads\n",
                pdims[0], pdims[1], pdims[2], pout[0], pout[1], pout[2], pipeline, threads);
    // The same pipeline on the GPU, where there is one: the best of 5 runs after a warm-up, per
    // stage from CUDA events; the bytes the pipeline must move at least (int16 in, labels in and
    // out, image and vesselness out) over its time, against device-to-device copies (read + write)
    // of 1 GiB measured here.
    auto have = gpu::ct::available(0);
    if (have && *have) {
      gpu::ct::PrepTimings best, t;
      best.total_ms = 1e30;
      Result<ct::Prepared> on_gpu = fail(ErrorCode::kInvalidArgument, "not run");
      for (int rep = 0; rep < 6; ++rep) {
        on_gpu = gpu::ct::prepare(big->hu, &big->labels, o, &t, 0);
        if (!on_gpu) return report(on_gpu.error());
        if (rep > 0 && t.total_ms < best.total_ms) best = t;
      }
      double worst = 0;
      for (size_t i = 0; i < on_gpu->vesselness.data.size(); ++i) worst = std::max(worst, static_cast<double>(std::abs(on_gpu->vesselness.data[i] - prepared->vesselness.data[i])));
      auto dev = gpu::cuda_device(0);
      if (!dev) return report(dev.error());
      const size_t n = size_t{1} << 30;
      auto src = (*dev)->device_alloc(n);
      auto dst = src ? (*dev)->device_alloc(n) : src;
      if (!src || !dst) return report((src ? dst : src).error());
      double d2d = 1e30;
      for (int rep = 0; rep < 4; ++rep) {
        const double t0 = now_seconds();
        if (auto r = (*dev)->copy_on_device(0, dst->p, src->p, n); !r) return report(r.error());
        if (auto r = (*dev)->synchronize(0); !r) return report(r.error());
        if (rep > 0) d2d = std::min(d2d, now_seconds() - t0);
      }
      (*dev)->device_free(*src);
      (*dev)->device_free(*dst);

      // Sealed inputs (preprocessing.md §9): the same volume and labels sealed in the page cache,
      // through the secure channel and decoded in device memory (prepare_sealed, outputs left on
      // the device), against opening them on the CPU (all threads) and uploading the plaintext
      // (gpu::ct::prepare without its download). Best of 3 after a warm-up, wall clock.
      const Identity id = *Identity::generate();
      sealed::SealOptions so;
      so.recipients = {id.recipient()};
      so.threads = 0;
      sealed::KeyRing ring;
      ring.identities = {&id};
      char tmpl[] = "/tmp/tresor-bench-prep-XXXXXX";
      if (::mkdtemp(tmpl) == nullptr) return report(Error{ErrorCode::kIo, "cannot create a temporary directory in /tmp"});
      const fs::path tmp(tmpl);
      std::error_code ec;
      const std::string hu_path = (tmp / "ccta.nii.sealed").string(), label_path = (tmp / "labels.nii.sealed").string();
      for (const auto& [path, bytes] : {std::pair{hu_path, ct::nifti_bytes(big->hu)}, {label_path, ct::nifti_bytes(big->labels)}}) {
        auto sealed_bytes = bytes ? sealed::seal_buffer(*bytes, so) : Result<Bytes>(std::unexpected(bytes.error()));
        auto out = sealed_bytes ? AtomicOutputFile::create(path, 0600, false) : Result<AtomicOutputFile>(std::unexpected(sealed_bytes.error()));
        if (!out || !out->write(*sealed_bytes) || !out->commit()) {
          fs::remove_all(tmp, ec);
          return report(Error{ErrorCode::kIo, "cannot write the sealed phantom into " + tmp.string()});
        }
      }
      double sealed_ms = 1e30, host_ms = 1e30;
      for (int rep = 0; rep < 4; ++rep) {
        gpu::ct::SealedPrepOutputs keep_on_device;
        keep_on_device.to_host = false;
        const double s0 = now_seconds();
        auto r = gpu::ct::prepare_sealed(**dev, {hu_path, label_path}, ring, o, keep_on_device);
        const double s1 = now_seconds();
        if (!r) {
          fs::remove_all(tmp, ec);
          return report(r.error());
        }
        gpu::ct::PrepTimings ht;
        const double s2 = now_seconds();
        auto hu_plain = open_sealed_file(hu_path, ring, threads);
        auto label_plain = open_sealed_file(label_path, ring, threads);
        auto hu = hu_plain ? ct::read_nifti_hu(hu_plain->span(), hu_path) : Result<ct::HuVolume>(std::unexpected(hu_plain.error()));
        auto labels = label_plain ? ct::read_nifti_labels(label_plain->span(), label_path) : Result<ct::LabelVolume>(std::unexpected(label_plain.error()));
        auto h = hu && labels ? gpu::ct::prepare(*hu, &*labels, o, &ht, 0) : Result<ct::Prepared>(std::unexpected((hu ? labels.error() : hu.error())));
        const double s3 = now_seconds();
        if (!h) {
          fs::remove_all(tmp, ec);
          return report(h.error());
        }
        if (rep > 0) {
          sealed_ms = std::min(sealed_ms, (s1 - s0) * 1e3);
          host_ms = std::min(host_ms, (s3 - s2) * 1e3 - ht.download_ms);
        }
      }
      fs::remove_all(tmp, ec);
      std::printf("GPU, sealed inputs: through the secure channel %.2f ms; opened on the CPU (%u threads) and uploaded %.2f ms: %.2fx\n", sealed_ms,
                  threads, host_ms, host_ms / sealed_ms);
      const double in_vox = static_cast<double>(big->hu.size()), out_vox = static_cast<double>(prepared->image.size());
      const double bytes = in_vox * (2 + 1) + out_vox * (4 + 4 + 1);
      const double gbps = bytes / (best.total_ms / 1e3) / 1e9, d2d_gbps = 2.0 * static_cast<double>(n) / d2d / 1e9;
      std::printf("GPU: total %.2f ms (statistics %.2f, resample+normalise+window %.2f, Frangi %.2f), upload %.2f ms, download %.2f ms, "
                  "%.0f MiB device memory allocated (%.0f MiB of the device's free memory used, measured); %.0f GB/s effective against %.0f GB/s "
                  "device copies; %.0fx the CPU pipeline; vesselness within %.2g of the CPU's\n",
                  best.total_ms, best.normalise_ms, best.resample_ms, best.frangi_ms, best.upload_ms, best.download_ms,
                  static_cast<double>(best.peak_device_bytes) / 1048576.0, static_cast<double>(best.device_used_bytes) / 1048576.0, gbps, d2d_gbps,
                  pipeline * 1e3 / best.total_ms, worst);
      char line[512];
      std::snprintf(line, sizeof line,
                    " gpu=cuda:0 gpu_total_ms=%.3f gpu_frangi_ms=%.3f gpu_stats_ms=%.3f gpu_resample_ms=%.3f gpu_upload_ms=%.3f gpu_download_ms=%.3f "
                    "gpu_peak_mib=%.0f gpu_used_mib=%.0f gpu_effective_gbps=%.1f d2d_gbps=%.1f bandwidth_ratio=%.3f gpu_vs_cpu=%.1f gpu_max_abs_diff=%.2g "
                    "gpu_sealed_ms=%.2f gpu_host_open_ms=%.2f sealed_speedup=%.2f",
                    best.total_ms, best.frangi_ms, best.normalise_ms, best.resample_ms, best.upload_ms, best.download_ms,
                    static_cast<double>(best.peak_device_bytes) / 1048576.0, static_cast<double>(best.device_used_bytes) / 1048576.0, gbps, d2d_gbps,
                    gbps / d2d_gbps, pipeline * 1e3 / best.total_ms, worst,
                    sealed_ms, host_ms, host_ms / sealed_ms);
      gpu_result = line;
    } else {
      std::printf("GPU: none usable here (%s): no GPU figures\n", have ? "no CUDA device of compute capability 8.0 or newer" : have.error().message.c_str());
    }
  }
  std::printf("RESULT bench_prep size=%zux%zux%zu threads=%u tresor_frangi_t1_s=%.3f tresor_frangi_s=%.3f", dims[0], dims[1], dims[2], threads, t1, tn);
  if (!no_skimage) std::printf(" skimage_frangi_s=%.3f frangi_ratio=%.1f frangi_ratio_t1=%.1f max_abs_diff=%.2g", sk, sk / tn, sk / t1, max_diff);
  if (!no_pipeline) std::printf(" pipeline_size=%zux%zux%zu pipeline_cpu_s=%.3f", pdims[0], pdims[1], pdims[2], pipeline);
  std::printf("%s\n", gpu_result.c_str());
  return kExitOk;
}

}  // namespace tresor::cli
