// The CT pipeline on a CUDA device (include/tresor/gpu/ct.h): the reference's checks before the
// device is touched, device memory held by DeviceBuffer (zeroed before it is freed), one stream
// per call with CUDA events between the stages, the statistics computed on the host from the
// device's histogram. Plain C++23 over the launch wrappers (kernels/ct_kernels.h) and the CUDA
// shim (kernels/cuda_shim.h); without CUDA in the build every entry says so (kUnavailable).
#include "tresor/gpu/ct.h"

#include <algorithm>
#include <chrono>
#include <string>
#include <utility>
#include <vector>

#include "ct_kernels.h"
#include "ct_plan.h"
#include "cuda_result.h"
#include "tresor/gpu.h"

namespace tresor::gpu::ct {

using tresor::ct::PrepOptions;

namespace {

using tresor::gpu::detail::cuda;
using tresor::gpu::detail::kNoCuda;

}  // namespace

DeviceBuffer::DeviceBuffer(DeviceBuffer&& o) noexcept
    : p_(std::exchange(o.p_, nullptr)), n_(std::exchange(o.n_, 0)), device_(o.device_) {}
DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& o) noexcept {
  if (this != &o) {
    reset();
    p_ = std::exchange(o.p_, nullptr);
    n_ = std::exchange(o.n_, 0);
    device_ = o.device_;
  }
  return *this;
}
DeviceBuffer::~DeviceBuffer() { reset(); }

#ifdef TRESOR_HAVE_CUDA
Result<DeviceBuffer> DeviceBuffer::allocate(int device, size_t bytes) {
  gpu::detail::CurrentDevice current;
  TRESOR_TRY(cuda(current.select(device)));
  DeviceBuffer b;
  TRESOR_TRY(cuda(gpu::detail::cuda_alloc(&b.p_, bytes)));
  b.n_ = bytes;
  b.device_ = device;
  return b;
}
void DeviceBuffer::reset() {
  if (p_ == nullptr) return;
  // Nothing to report to from a destructor; cuda_free_wiped attempts the wipe and the free even
  // after an earlier failure.
  gpu::detail::CurrentDevice current;
  (void)current.select(device_);
  (void)gpu::detail::cuda_free_wiped(p_, n_);
  p_ = nullptr;
  n_ = 0;
}
void DeviceBuffer::reset_all(std::initializer_list<DeviceBuffer*> buffers) {
  std::vector<std::pair<void*, size_t>> taken;
  taken.reserve(buffers.size());  // before any buffer gives up its pointer: nothing below allocates
  int device = -1;
  for (DeviceBuffer* b : buffers) {
    if (b->p_ == nullptr) continue;
    if (device < 0) device = b->device_;
    if (b->device_ != device) {
      b->reset();  // not the contract; still wiped and freed, alone
      continue;
    }
    taken.emplace_back(std::exchange(b->p_, nullptr), std::exchange(b->n_, 0));
  }
  if (taken.empty()) return;
  gpu::detail::CurrentDevice current;
  (void)current.select(device);
  (void)gpu::detail::cuda_free_wiped_all(taken.data(), taken.size());
}
#else
Result<DeviceBuffer> DeviceBuffer::allocate(int, size_t) { return fail(ErrorCode::kUnavailable, kNoCuda); }
void DeviceBuffer::reset() {
  p_ = nullptr;
  n_ = 0;
}
void DeviceBuffer::reset_all(std::initializer_list<DeviceBuffer*> buffers) {
  for (DeviceBuffer* b : buffers) b->reset();
}
#endif

#ifdef TRESOR_HAVE_CUDA
namespace {

using namespace detail;

Result<void> require_device(int device) {
  auto devs = gpu_probe();
  if (!devs) return std::unexpected(devs.error());  // "no usable CUDA device: …"
  if (device < 0 || static_cast<size_t>(device) >= devs->size()) {
    return fail(ErrorCode::kUnavailable, "no CUDA device: there is no device " + std::to_string(device) + " (" + std::to_string(devs->size()) + " found)");
  }
  const Device& d = (*devs)[static_cast<size_t>(device)];
  if (d.cc_major < 8) {
    return fail(ErrorCode::kUnavailable, "no CUDA device: device " + std::to_string(device) + " (" + d.name + ") has compute capability " +
                                             std::to_string(d.cc_major) + "." + std::to_string(d.cc_minor) + "; the CT kernels need 8.0 or newer");
  }
  return {};
}

// One call's stream and its timing events (see PrepTimings).
enum Mark { kUploadStart, kUploadEnd, kStart, kStats, kResampled, kFrangi, kDownloadStart, kDownloadEnd, kMarks };

class Stream {
 public:
  explicit Stream(int device) : device_(device) {}
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  ~Stream() {
    (void)gpu::detail::cuda_set_device(device_);
    if (stream_ != nullptr) (void)gpu::detail::cuda_stream_sync(stream_);
    for (void* e : events_) (void)ct_event_destroy(e);
    if (stream_ != nullptr) (void)gpu::detail::cuda_stream_destroy(stream_);
  }
  Result<void> init() {
    TRESOR_TRY(cuda(gpu::detail::cuda_set_device(device_)));
    TRESOR_TRY(cuda(gpu::detail::cuda_stream_create(&stream_)));
    for (int i = 0; i < kMarks; ++i) {
      void* e = nullptr;
      TRESOR_TRY(cuda(ct_event_create(&e)));
      events_.push_back(e);
    }
    return {};
  }
  void* get() const { return stream_; }
  Result<void> mark(Mark m) { return cuda(ct_event_record(events_[static_cast<size_t>(m)], stream_)); }
  Result<double> ms(Mark from, Mark to) {
    float elapsed = 0;
    TRESOR_TRY(cuda(ct_event_elapsed(events_[static_cast<size_t>(from)], events_[static_cast<size_t>(to)], &elapsed)));
    return static_cast<double>(elapsed);
  }
  Result<void> sync() { return cuda(gpu::detail::cuda_stream_sync(stream_)); }
  Result<void> copy(void* dst, const void* src, size_t n, int kind) { return cuda(gpu::detail::cuda_copy_async(stream_, dst, src, n, kind)); }

 private:
  int device_;
  void* stream_ = nullptr;
  std::vector<void*> events_;
};

// Allocations of one call (nothing is freed before the end): their sum for peak_device_bytes, and
// the device's free memory before the first and after each, for device_used_bytes. Used with the
// call's device current.
class Allocator {
 public:
  explicit Allocator(int device) : device_(device) {}
  Result<void> start() {
    TRESOR_TRY(cuda(gpu::detail::cuda_free_memory(&free_before_)));
    lowest_free_ = free_before_;
    return {};
  }
  Result<DeviceBuffer> operator()(size_t n) {
    auto b = DeviceBuffer::allocate(device_, n);
    if (!b) return b;
    bytes_ += n;
    if (auto r = sample(); !r) return std::unexpected(r.error());
    return b;
  }
  // After each allocation, and once more after the work: memory the device takes while running
  // (modules loaded lazily, the local-memory reserve) counts too.
  Result<void> sample() {
    size_t free = 0;
    TRESOR_TRY(cuda(gpu::detail::cuda_free_memory(&free)));
    lowest_free_ = std::min(lowest_free_, free);
    return {};
  }
  size_t bytes() const { return bytes_; }
  size_t used() const { return free_before_ - lowest_free_; }

 private:
  int device_;
  size_t bytes_ = 0, free_before_ = 0, lowest_free_ = 0;
};

// The pipeline on device-resident input, on `st` (prepare_device's body; prepare adds the copies).
// `alloc` has counted the call's allocations so far (prepare's input).
Result<DevicePrepared> run(const int16_t* d_hu, const uint8_t* d_labels, Plan& plan, const PrepOptions& o, Allocator& alloc, Stream& st, PrepTimings& t) {
  const auto setup_start = std::chrono::steady_clock::now();
  const Grid g = plan.grid;
  const size_t n = size_t{g.nx} * g.ny * g.nz;
  const size_t n_in = plan.in_dims[0] * plan.in_dims[1] * plan.in_dims[2];
  DeviceBuffer hist, lerp, taps, image, window, smooth, scratch, ves, nearest, labels;
  const bool with_labels = d_labels != nullptr;
  for (auto [buffer, bytes] : {std::pair{&hist, sizeof(uint64_t) * kHistBins}, {&lerp, sizeof(LerpTap) * plan.lerp.size()},
                               {&taps, sizeof(double) * plan.taps.size()}, {&image, sizeof(float) * n}, {&window, sizeof(float) * n},
                               {&smooth, sizeof(float) * n}, {&scratch, sizeof(float) * n}, {&ves, sizeof(float) * n},
                               {&nearest, with_labels ? sizeof(uint64_t) * plan.nearest.size() : 0}, {&labels, with_labels ? n : 0}}) {
    if (bytes == 0) continue;
    auto b = alloc(bytes);
    if (!b) return std::unexpected(b.error());
    *buffer = std::move(*b);
  }
  if (with_labels) TRESOR_TRY(st.copy(nearest.get(), plan.nearest.data(), nearest.size(), gpu::detail::kHostToDevice));
  TRESOR_TRY(st.copy(lerp.get(), plan.lerp.data(), lerp.size(), gpu::detail::kHostToDevice));
  TRESOR_TRY(st.copy(taps.get(), plan.taps.data(), taps.size(), gpu::detail::kHostToDevice));
  TRESOR_TRY(st.sync());
  t.setup_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - setup_start).count();

  // The statistics: the histogram on the device, the order statistics and moments on the host.
  TRESOR_TRY(st.mark(kStart));
  TRESOR_TRY(cuda(ct_histogram_launch(st.get(), d_hu, n_in, plan.threshold, hist.as<uint64_t>())));
  std::vector<uint64_t> h_hist(kHistBins);
  TRESOR_TRY(st.copy(h_hist.data(), hist.get(), hist.size(), gpu::detail::kDeviceToHost));
  TRESOR_TRY(st.sync());
  auto stats = stats_from_histogram(h_hist, o);
  if (!stats) return std::unexpected(stats.error());
  set_stats(plan.fused, *stats);
  TRESOR_TRY(st.mark(kStats));

  TRESOR_TRY(cuda(ct_resample_launch(st.get(), d_hu, plan.fused, g, lerp.as<LerpTap>(), image.as<float>(), window.as<float>())));
  if (with_labels) {
    TRESOR_TRY(cuda(ct_labels_launch(st.get(), d_labels, plan.in_dims[0], plan.in_dims[1], g, nearest.as<uint64_t>(), labels.as<uint8_t>())));
  }
  TRESOR_TRY(st.mark(kResampled));

  for (size_t k = 0; k < plan.scales.size(); ++k) {
    const Scale& s = plan.scales[k];
    TRESOR_TRY(cuda(ct_gaussian_launch(st.get(), window.as<float>(), smooth.as<float>(), scratch.as<float>(), g, taps.as<double>() + s.offset, s.radius)));
    TRESOR_TRY(cuda(ct_frangi_launch(st.get(), smooth.as<float>(), g, s.sigma * s.sigma, plan.two_alpha2, plan.two_beta2, plan.two_gamma2, k == 0,
                                     ves.as<float>())));
  }
  TRESOR_TRY(st.mark(kFrangi));
  TRESOR_TRY(st.sync());  // the first failure of any queued kernel surfaces here
  TRESOR_TRY(alloc.sample());

  auto normalise = st.ms(kStart, kStats), resample = st.ms(kStats, kResampled), frangi = st.ms(kResampled, kFrangi), total = st.ms(kStart, kFrangi);
  for (const auto* r : {&normalise, &resample, &frangi, &total}) {
    if (!*r) return std::unexpected(r->error());
  }
  t.normalise_ms = *normalise;
  t.resample_ms = *resample;
  t.window_ms = 0;
  t.frangi_ms = *frangi;
  t.total_ms = *total;
  t.peak_device_bytes = alloc.bytes();
  t.device_used_bytes = alloc.used();

  DevicePrepared p;
  p.stats = *stats;
  p.dims = {g.nx, g.ny, g.nz};
  p.spacing = o.spacing;
  p.image = std::move(image);
  p.vesselness = std::move(ves);
  p.labels = std::move(labels);
  DeviceBuffer::reset_all({&hist, &lerp, &taps, &window, &smooth, &scratch, &nearest});  // zeroed and freed together
  return p;
}

}  // namespace

Result<bool> available(int device) {
  auto devs = gpu_probe();
  if (!devs) return std::unexpected(devs.error());  // "no usable CUDA device: …"
  if (device < 0 || static_cast<size_t>(device) >= devs->size()) return false;
  return (*devs)[static_cast<size_t>(device)].cc_major >= 8;
}

Result<DevicePrepared> prepare_device(const int16_t* d_hu, const std::array<size_t, 3>& dims, const std::array<double, 3>& spacing,
                                      const uint8_t* d_labels, const PrepOptions& o, PrepTimings* timings, int device) {
  auto od = check_prepare_device(d_hu, dims, spacing, o);
  if (!od) return std::unexpected(od.error());
  TRESOR_TRY(require_device(device));
  // The caller's current device back on return: declared before everything that sets it.
  gpu::detail::CurrentDevice current;
  TRESOR_TRY(cuda(current.select(device)));
  Plan plan = make_plan(dims, spacing, *od, o);
  Stream st(device);
  TRESOR_TRY(st.init());
  TRESOR_TRY(cuda(gpu::detail::cuda_device_sync()));  // the input may come from any stream
  Allocator alloc(device);
  TRESOR_TRY(alloc.start());
  PrepTimings t;
  auto r = run(d_hu, d_labels, plan, o, alloc, st, t);
  if (r && timings != nullptr) *timings = t;
  return r;
}

Result<tresor::ct::Prepared> prepare(const tresor::ct::HuVolume& hu, const tresor::ct::LabelVolume* labels, const PrepOptions& o, PrepTimings* timings,
                                     int device) {
  auto od = check_prepare(hu, labels, o);
  if (!od) return std::unexpected(od.error());
  TRESOR_TRY(require_device(device));
  // The caller's current device back on return: declared before everything that sets it.
  gpu::detail::CurrentDevice current;
  TRESOR_TRY(cuda(current.select(device)));
  Plan plan = make_plan(hu.dims, hu.spacing, *od, o);
  Stream st(device);
  TRESOR_TRY(st.init());
  Allocator alloc(device);
  TRESOR_TRY(alloc.start());
  auto d_hu = alloc(sizeof(int16_t) * hu.data.size());
  if (!d_hu) return std::unexpected(d_hu.error());
  DeviceBuffer d_labels;
  if (labels != nullptr) {
    auto b = alloc(labels->data.size());
    if (!b) return std::unexpected(b.error());
    d_labels = std::move(*b);
  }
  TRESOR_TRY(st.mark(kUploadStart));
  TRESOR_TRY(st.copy(d_hu->get(), hu.data.data(), d_hu->size(), gpu::detail::kHostToDevice));
  if (labels != nullptr) TRESOR_TRY(st.copy(d_labels.get(), labels->data.data(), d_labels.size(), gpu::detail::kHostToDevice));
  TRESOR_TRY(st.mark(kUploadEnd));
  PrepTimings t;
  auto dev = run(d_hu->as<int16_t>(), d_labels.as<uint8_t>(), plan, o, alloc, st, t);
  if (!dev) return std::unexpected(dev.error());
  auto upload = st.ms(kUploadStart, kUploadEnd);
  if (!upload) return std::unexpected(upload.error());

  const size_t n = dev->dims[0] * dev->dims[1] * dev->dims[2];
  tresor::ct::Prepared p;
  p.stats = dev->stats;
  for (auto* v : {&p.image, &p.vesselness}) {
    v->dims = dev->dims;
    v->spacing = {o.spacing, o.spacing, o.spacing};
    v->origin = hu.origin;
    v->data.resize(n);
  }
  TRESOR_TRY(st.mark(kDownloadStart));
  TRESOR_TRY(st.copy(p.image.data.data(), dev->image.get(), dev->image.size(), gpu::detail::kDeviceToHost));
  TRESOR_TRY(st.copy(p.vesselness.data.data(), dev->vesselness.get(), dev->vesselness.size(), gpu::detail::kDeviceToHost));
  if (labels != nullptr) {
    tresor::ct::LabelVolume l;
    l.dims = dev->dims;
    l.spacing = {o.spacing, o.spacing, o.spacing};
    l.origin = labels->origin;  // resample_nearest keeps the label volume's own origin
    l.data.resize(n);
    TRESOR_TRY(st.copy(l.data.data(), dev->labels.get(), dev->labels.size(), gpu::detail::kDeviceToHost));
    p.labels = std::move(l);
  }
  TRESOR_TRY(st.mark(kDownloadEnd));
  TRESOR_TRY(st.sync());
  auto download = st.ms(kDownloadStart, kDownloadEnd);
  if (!download) return std::unexpected(download.error());
  if (timings != nullptr) {
    *timings = t;  // its peak and use include the input's buffers (run counted on from them)
    timings->upload_ms = *upload;
    timings->download_ms = *download;
  }
  DeviceBuffer::reset_all({&*d_hu, &d_labels, &dev->image, &dev->vesselness, &dev->labels});
  return p;
}

#else  // no CUDA in this build: the same checks first, then kUnavailable.

Result<bool> available(int) { return fail(ErrorCode::kUnavailable, kNoCuda); }

Result<DevicePrepared> prepare_device(const int16_t* d_hu, const std::array<size_t, 3>& dims, const std::array<double, 3>& spacing, const uint8_t*,
                                      const PrepOptions& o, PrepTimings*, int) {
  auto od = detail::check_prepare_device(d_hu, dims, spacing, o);
  if (!od) return std::unexpected(od.error());
  return fail(ErrorCode::kUnavailable, kNoCuda);
}

Result<tresor::ct::Prepared> prepare(const tresor::ct::HuVolume& hu, const tresor::ct::LabelVolume* labels, const PrepOptions& o, PrepTimings*, int) {
  auto od = detail::check_prepare(hu, labels, o);
  if (!od) return std::unexpected(od.error());
  return fail(ErrorCode::kUnavailable, kNoCuda);
}

#endif

}  // namespace tresor::gpu::ct
