// The U-Net's training step on a device (include/tresor/gpu/unet.h): the CPU UNet's network
// (core/train/unet.cc, the specification) orchestrated over the device-pointer layers of
// tresor/gpu/train.h. Every call goes through a DeviceStream whose backend is the device or the
// emulation, so this file runs unchanged on both: on the emulation "device memory" is host memory.
//
// Buffers per input shape (n, d, h, w), level l at d/2^l × h/2^l × w/2^l with C_l channels:
//   encoder stage l: pre[k], out[k] (block k's conv output and norm output; out[1] is the skip);
//   decoder stage for level l: up (the transposed conv's output), cat (up, skip), pre[k], out[k];
//   encoder stage l < levels − 1: skip_grad (the concat gradient's skip half, added into the
//   encoder's gradient when the backward pass reaches it);
//   gradient scratch g_cur, g_mid, g_pre (a block's output, middle, pre-norm gradient), g_up,
//   g_cat, each as large as the largest level needs; the kernels' scratch (split-K partials, the
//   norm's per-plane sums, the loss's partials) sized for the largest layer;
//   with deep supervision, per output j ≥ 1 of nonzero weight: its logits, their gradient and the
//   target downsampled to level j (made on the host by tresor::train::downsample_target, the
//   reference's, and uploaded: a few bytes per voxel once per step).
//
// The loss runs in two halves (loss_statistics, backward_from_statistics) so that data-parallel
// ranks can sum the statistics in between; loss_and_backward is both with nothing in between, the
// same bits as the fused kernel (the totals travel to the host and back unchanged).
#include "tresor/gpu/unet.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include <string.h>  // explicit_bzero

#include "cuda_result.h"
#include "train.cuh"
#include "tresor/train/trainer.h"

namespace tresor::gpu::train {

using tresor::train::Tensor;
using tresor::train::UNetConfig;

namespace {

using tresor::gpu::detail::cuda;
using tresor::gpu::detail::kNoCuda;

// Buffers on the device (zeroed before they are freed) or, emulated, on the host (likewise).
class Memory {
 public:
  Memory() = default;
  Memory(const Memory&) = delete;
  Memory& operator=(const Memory&) = delete;
  ~Memory() { release(); }
  /// Where later allocations go; only while nothing is allocated.
  void bind(DeviceStream st) { st_ = st; }

  template <typename T>
  Result<T*> alloc(size_t count) {
    const size_t bytes = std::max<size_t>(count * sizeof(T), 1);
    if (st_.backend == Backend::kEmulated) {
      // Filled with 0xFF (NaN as floats), as a device's fresh memory holds garbage rather than
      // zeros: a buffer read before it is written shows up in the emulated tests.
      auto* p = new std::byte[bytes];
      std::memset(p, 0xFF, bytes);
      buffers_.emplace_back(p, bytes);
      return reinterpret_cast<T*>(p);
    }
#ifdef TRESOR_HAVE_CUDA
    void* p = nullptr;
    TRESOR_TRY(cuda(gpu::detail::cuda_set_device(st_.device)));
    TRESOR_TRY(cuda(gpu::detail::cuda_alloc(&p, bytes)));
    buffers_.emplace_back(p, bytes);
    return static_cast<T*>(p);
#else
    return fail(ErrorCode::kUnavailable, kNoCuda);
#endif
  }

  void release() {
    if (buffers_.empty()) return;
#ifdef TRESOR_HAVE_CUDA
    if (st_.backend == Backend::kDevice) (void)gpu::detail::cuda_set_device(st_.device);
#endif
    if (st_.backend == Backend::kEmulated) {
      for (auto [p, n] : buffers_) {
        explicit_bzero(p, n);
        delete[] static_cast<std::byte*>(p);
      }
    } else {
#ifdef TRESOR_HAVE_CUDA
      // All wiped, then all freed, after one device-wide synchronisation (a network holds dozens
      // of buffers and reallocates them whenever the batch shape changes).
      (void)gpu::detail::cuda_free_wiped_all(buffers_.data(), buffers_.size());
#endif
    }
    buffers_.clear();
  }

 private:
  DeviceStream st_;
  std::vector<std::pair<void*, size_t>> buffers_;
};

Result<void> upload(DeviceStream st, void* d, const void* h, size_t bytes) {
  if (bytes == 0) return {};
  if (st.backend == Backend::kEmulated) {
    std::memcpy(d, h, bytes);
    return {};
  }
#ifdef TRESOR_HAVE_CUDA
  TRESOR_TRY(cuda(gpu::detail::cuda_set_device(st.device)));
  // From pageable memory cudaMemcpyAsync "might be synchronous" (CUDA Runtime API, API
  // synchronization behavior): nothing promises h has been read when it returns, and callers
  // pass vectors that go at their return. So the copy is waited for.
  TRESOR_TRY(cuda(gpu::detail::cuda_copy_async(st.stream, d, h, bytes, gpu::detail::kHostToDevice)));
  return cuda(gpu::detail::cuda_stream_sync(st.stream));
#else
  return fail(ErrorCode::kUnavailable, kNoCuda);
#endif
}

// Waits for the stream: the first failure of any queued kernel surfaces here.
Result<void> download(DeviceStream st, void* h, const void* d, size_t bytes) {
  if (st.backend == Backend::kEmulated) {
    if (bytes != 0) std::memcpy(h, d, bytes);
    return {};
  }
#ifdef TRESOR_HAVE_CUDA
  TRESOR_TRY(cuda(gpu::detail::cuda_set_device(st.device)));
  if (bytes != 0) TRESOR_TRY(cuda(gpu::detail::cuda_copy_async(st.stream, h, d, bytes, gpu::detail::kDeviceToHost)));
  return cuda(gpu::detail::cuda_stream_sync(st.stream));
#else
  return fail(ErrorCode::kUnavailable, kNoCuda);
#endif
}

// A layer's parameters: offsets into the flat vector (UNet::each_parameter_array's order).
struct ConvParams {
  size_t cin = 0, cout = 0, k = 3, stride = 1;
  bool transposed = false;
  size_t w = 0, b = 0;
};
struct BlockParams {
  ConvParams conv;
  size_t channels = 0, gamma = 0, beta = 0;
};
struct StageParams {
  ConvParams up;  // decoder stages only
  BlockParams blocks[2];
  size_t channels = 0;
};

// A level's spatial extent.
struct Dims {
  size_t d = 0, h = 0, w = 0;
  size_t voxels() const { return d * h * w; }
};

}  // namespace

struct GpuUNet::Impl {
  UNetConfig config;
  Where where;
  DeviceStream st;
  std::vector<StageParams> enc, dec;  // dec[0] is the deepest, as the CPU UNet's decoder_
  ConvParams head;
  std::vector<ConvParams> ds_heads;  // [j − 1]: the head of the output at 1/2^j (deep supervision)
  std::vector<double> ds_weights;    // per output: deep_supervision_weights (one output: {1})
  size_t count = 0;
  double eps = 1e-5, slope = 0.01;  // InstanceNormLeakyRelu's, as the CPU UNet builds them

  Memory params_mem, shape_mem;
  float* d_params = nullptr;
  uint16_t* d_bf16 = nullptr;
  float* d_grads = nullptr;
  float* d_velocity = nullptr;  // SGD
  float* d_m = nullptr;         // AdamW
  float* d_v = nullptr;
  uint64_t adam_t = 0;
  bool have_grads = false;

  // Per input shape.
  struct Acts {
    float* pre[2] = {nullptr, nullptr};
    float* out[2] = {nullptr, nullptr};
    float* up = nullptr;
    float* cat = nullptr;
    float* skip_grad = nullptr;
  };
  std::array<size_t, 5> shape{0, 0, 0, 0, 0};
  size_t n = 0;
  std::vector<Dims> dims;  // per level
  std::vector<Acts> enc_a, dec_a;
  float* x = nullptr;
  float* logits = nullptr;
  float* dlogits = nullptr;
  uint8_t* target = nullptr;
  struct Output {  // deep supervision's output j ≥ 1 (those of weight 0 stay null)
    float* logits = nullptr;
    float* dlogits = nullptr;
    uint8_t* target = nullptr;
  };
  std::vector<Output> ds_out;  // [j − 1]
  float *g_cur = nullptr, *g_mid = nullptr, *g_pre = nullptr, *g_up = nullptr, *g_cat = nullptr;
  void* w_scratch = nullptr;
  void* n_scratch = nullptr;
  void* l_scratch = nullptr;
  size_t w_scratch_bytes = 0, n_scratch_bytes = 0, l_scratch_bytes = 0;
  bool allocated = false;     // the per-shape buffers exist for `shape`
  bool have_forward = false;  // they hold a complete forward pass
  bool have_stats = false;    // loss_statistics ran on that forward pass
  bool device_input = false;  // x and target were handed out by device_batch (forward overwrites x)

  ~Impl() {
    shape_mem.release();
    params_mem.release();
#ifdef TRESOR_HAVE_CUDA
    if (st.backend == Backend::kDevice && st.stream != nullptr) {
      (void)gpu::detail::cuda_set_device(st.device);
      (void)gpu::detail::cuda_stream_destroy(st.stream);
    }
#endif
  }

  ConvShape conv_shape_of(const ConvParams& p, const Dims& in) const {
    return ConvShape{n, p.cin, p.cout, in.d, in.h, in.w, p.k, p.stride, p.transposed ? 0 : p.k / 2, p.transposed};
  }
  NormShape norm_shape_of(size_t channels, const Dims& at) const { return NormShape{n, channels, at.voxels(), eps, slope}; }
  // The input extent of encoder stage s's first block.
  const Dims& enc_in_dims(size_t s) const { return dims[s == 0 ? 0 : s - 1]; }

  Result<void> allocate(const std::array<size_t, 5>& x_shape);
  Result<void> block_forward(const BlockParams& b, const Dims& in, const Dims& out, const float* x_in, float* pre, float* y);
  Result<void> block_backward(const BlockParams& b, const Dims& in, const Dims& out, const float* x_in, const float* pre, const float* dy, float* dx_in);
  Result<void> conv_backward(const ConvParams& p, const Dims& in, const float* x_in, const float* dy, float* dx_in);
  Result<void> run_forward();
  Result<void> run_backward();
  // The deep-supervision heads and every weighted output's loss statistics, the targets in place.
  Result<std::vector<double>> statistics();
  // The outputs the loss uses: j with a nonzero weight, in order (0 first).
  std::vector<size_t> weighted_outputs() const {
    std::vector<size_t> js;
    for (size_t j = 0; j < ds_weights.size(); ++j)
      if (ds_weights[j] != 0) js.push_back(j);
    return js;
  }
  // Decoder stage (dec index) whose output feeds output j ≥ 1: the one at level j.
  size_t dec_of_output(size_t j) const { return dec.size() - 1 - j; }
  Result<void> refresh_bf16(const std::vector<float>& flat);
};

GpuUNet::GpuUNet(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
GpuUNet::GpuUNet(GpuUNet&&) noexcept = default;
GpuUNet& GpuUNet::operator=(GpuUNet&&) noexcept = default;
GpuUNet::~GpuUNet() = default;

const UNetConfig& GpuUNet::config() const { return impl_->config; }
Where GpuUNet::where() const { return impl_->where; }
size_t GpuUNet::parameter_count() const { return impl_->count; }

Result<GpuUNet> GpuUNet::create(const tresor::train::UNet& cpu_net, Where where) {
  const UNetConfig& c = cpu_net.config();
  auto impl = std::make_unique<Impl>();
  impl->config = c;
  impl->where = where;
  // The layout, in UNet::each_parameter_array's order: encoder stages (per block: conv weight,
  // conv bias, γ, β), decoder stages from the deepest (transposed conv weight, bias, its blocks),
  // the head, then deep supervision's heads (j = 1 first).
  size_t at = 0;
  auto take = [&at](size_t size) {
    const size_t o = at;
    at += size;
    return o;
  };
  auto width = [&c](size_t s) { return std::min(c.base_channels << s, c.max_channels); };
  auto block = [&](size_t cin, size_t cout, size_t stride) {
    BlockParams b;
    b.conv = ConvParams{cin, cout, 3, stride, false, 0, 0};
    b.conv.w = take(cout * cin * 27);
    b.conv.b = take(cout);
    b.channels = cout;
    b.gamma = take(cout);
    b.beta = take(cout);
    return b;
  };
  size_t in = c.in_channels;
  for (size_t s = 0; s < c.levels; ++s) {
    StageParams st;
    st.channels = width(s);
    st.blocks[0] = block(in, width(s), s == 0 ? 1 : 2);
    st.blocks[1] = block(width(s), width(s), 1);
    impl->enc.push_back(st);
    in = width(s);
  }
  for (size_t s = c.levels - 1; s-- > 0;) {
    StageParams st;
    st.channels = width(s);
    st.up = ConvParams{width(s + 1), width(s), 2, 2, true, 0, 0};
    st.up.w = take(width(s + 1) * width(s) * 8);
    st.up.b = take(width(s));
    st.blocks[0] = block(2 * width(s), width(s), 1);
    st.blocks[1] = block(width(s), width(s), 1);
    impl->dec.push_back(st);
  }
  impl->head = ConvParams{width(0), c.classes, 1, 1, false, 0, 0};
  impl->head.w = take(c.classes * width(0));
  impl->head.b = take(c.classes);
  if (c.deep_supervision) {
    for (size_t j = 1; j + 1 < c.levels; ++j) {
      ConvParams h{width(j), c.classes, 1, 1, false, 0, 0};
      h.w = take(c.classes * width(j));
      h.b = take(c.classes);
      impl->ds_heads.push_back(h);
    }
  }
  impl->ds_weights = tresor::train::deep_supervision_weights(1 + impl->ds_heads.size());
  impl->count = at;
  const std::vector<float> flat = cpu_net.parameters();
  if (flat.size() != impl->count) {
    return fail(ErrorCode::kInvalidArgument,
                "gpu unet: the CPU net has " + std::to_string(flat.size()) + " parameters, its configuration's layout " + std::to_string(impl->count) + " (a layout this class does not know)");
  }
  const tresor::train::InstanceNormLeakyRelu norm_defaults;
  impl->eps = norm_defaults.eps;
  impl->slope = norm_defaults.slope;

  impl->st = DeviceStream{where.device, nullptr, where.backend};
  if (where.backend == Backend::kDevice) {
    auto ok = available(where.device);
    if (!ok) return std::unexpected(ok.error());
    if (!*ok) return fail(ErrorCode::kUnavailable, "no CUDA device " + std::to_string(where.device) + " of compute capability 8.0 or newer (bf16 WMMA)");
#ifdef TRESOR_HAVE_CUDA
    TRESOR_TRY(cuda(gpu::detail::cuda_set_device(where.device)));
    TRESOR_TRY(cuda(gpu::detail::cuda_stream_create(&impl->st.stream)));
#else
    return fail(ErrorCode::kUnavailable, kNoCuda);
#endif
  }
  // Memory is bound to the stream (the emulation's buffers to the host).
  impl->params_mem.bind(impl->st);
  impl->shape_mem.bind(impl->st);

  auto p = impl->params_mem.alloc<float>(impl->count);
  if (!p) return std::unexpected(p.error());
  impl->d_params = *p;
  auto b = impl->params_mem.alloc<uint16_t>(impl->count);
  if (!b) return std::unexpected(b.error());
  impl->d_bf16 = *b;
  auto g = impl->params_mem.alloc<float>(impl->count);
  if (!g) return std::unexpected(g.error());
  impl->d_grads = *g;
  TRESOR_TRY(upload(impl->st, impl->d_params, flat.data(), flat.size() * sizeof(float)));
  TRESOR_TRY(impl->refresh_bf16(flat));
  TRESOR_TRY(download(impl->st, nullptr, nullptr, 0));  // the uploads are complete
  return GpuUNet(std::move(impl));
}

Result<void> GpuUNet::Impl::refresh_bf16(const std::vector<float>& flat) {
  std::vector<uint16_t> h(flat.size());
  for (size_t i = 0; i < flat.size(); ++i) h[i] = bf16_bits(flat[i]);
  TRESOR_TRY(upload(st, d_bf16, h.data(), h.size() * sizeof(uint16_t)));
  return download(st, nullptr, nullptr, 0);  // h is gone after this function
}

Result<void> GpuUNet::Impl::allocate(const std::array<size_t, 5>& xs) {
  if (allocated && xs == shape) return {};
  TRESOR_TRY(download(st, nullptr, nullptr, 0));
  shape_mem.release();
  allocated = false;
  have_forward = false;
  have_stats = false;
  device_input = false;
  shape = xs;
  n = xs[0];
  const size_t levels = config.levels;
  dims.assign(levels, Dims{});
  for (size_t l = 0; l < levels; ++l) dims[l] = Dims{xs[2] >> l, xs[3] >> l, xs[4] >> l};
  auto fl = [this](size_t values) { return shape_mem.alloc<float>(values); };
#define TRESOR_ALLOC(var, expr)                            \
  do {                                                     \
    auto r_ = (expr);                                      \
    if (!r_) return std::unexpected(std::move(r_).error()); \
    var = *r_;                                             \
  } while (false)
  size_t act_max = 0, cat_max = 0, w_max = 0, nrm_max = 0;
  auto conv_scratch = [&](const ConvParams& p, const Dims& in) -> Result<void> {
    auto s = conv_backward_weight_scratch(conv_shape_of(p, in));
    if (!s) return std::unexpected(s.error());
    w_max = std::max(w_max, *s);
    return {};
  };
  TRESOR_ALLOC(x, fl(n * config.in_channels * dims[0].voxels()));
  enc_a.assign(levels, Acts{});
  for (size_t s = 0; s < levels; ++s) {
    const size_t sz = n * enc[s].channels * dims[s].voxels();
    act_max = std::max(act_max, sz);
    nrm_max = std::max(nrm_max, norm_lrelu_backward_scratch(norm_shape_of(enc[s].channels, dims[s])));
    for (int k = 0; k < 2; ++k) {
      TRESOR_ALLOC(enc_a[s].pre[k], fl(sz));
      TRESOR_ALLOC(enc_a[s].out[k], fl(sz));
    }
    if (s + 1 < levels) TRESOR_ALLOC(enc_a[s].skip_grad, fl(sz));
    TRESOR_TRY(conv_scratch(enc[s].blocks[0].conv, enc_in_dims(s)));
    TRESOR_TRY(conv_scratch(enc[s].blocks[1].conv, dims[s]));
  }
  dec_a.assign(dec.size(), Acts{});
  for (size_t i = 0; i < dec.size(); ++i) {
    const size_t l = levels - 2 - i;
    const size_t sz = n * dec[i].channels * dims[l].voxels();
    cat_max = std::max(cat_max, 2 * sz);
    TRESOR_ALLOC(dec_a[i].up, fl(sz));
    TRESOR_ALLOC(dec_a[i].cat, fl(2 * sz));
    for (int k = 0; k < 2; ++k) {
      TRESOR_ALLOC(dec_a[i].pre[k], fl(sz));
      TRESOR_ALLOC(dec_a[i].out[k], fl(sz));
    }
    TRESOR_TRY(conv_scratch(dec[i].up, dims[l + 1]));
    TRESOR_TRY(conv_scratch(dec[i].blocks[0].conv, dims[l]));
    TRESOR_TRY(conv_scratch(dec[i].blocks[1].conv, dims[l]));
  }
  TRESOR_TRY(conv_scratch(head, dims[0]));
  ds_out.assign(ds_heads.size(), Impl::Output{});
  for (size_t j = 1; j <= ds_heads.size(); ++j) {
    if (ds_weights[j] == 0) continue;  // neither run nor differentiated
    TRESOR_TRY(conv_scratch(ds_heads[j - 1], dims[j]));
    TRESOR_ALLOC(ds_out[j - 1].logits, fl(n * config.classes * dims[j].voxels()));
    TRESOR_ALLOC(ds_out[j - 1].dlogits, fl(n * config.classes * dims[j].voxels()));
    TRESOR_ALLOC(ds_out[j - 1].target, shape_mem.alloc<uint8_t>(n * dims[j].voxels()));
  }
  const size_t logit_count = n * config.classes * dims[0].voxels();
  TRESOR_ALLOC(logits, fl(logit_count));
  TRESOR_ALLOC(dlogits, fl(logit_count));
  TRESOR_ALLOC(target, shape_mem.alloc<uint8_t>(n * dims[0].voxels()));
  TRESOR_ALLOC(g_cur, fl(act_max));
  TRESOR_ALLOC(g_mid, fl(act_max));
  TRESOR_ALLOC(g_pre, fl(act_max));
  TRESOR_ALLOC(g_up, fl(act_max));
  TRESOR_ALLOC(g_cat, fl(std::max<size_t>(cat_max, 1)));
  size_t loss_max = 0;
  for (size_t j : weighted_outputs()) {
    auto ls = dice_ce_loss_scratch(LossShape{n, config.classes, dims[j].voxels()});
    if (!ls) return std::unexpected(ls.error());
    loss_max = std::max(loss_max, *ls);
  }
  w_scratch_bytes = w_max;
  n_scratch_bytes = nrm_max;
  l_scratch_bytes = loss_max;
  TRESOR_ALLOC(w_scratch, shape_mem.alloc<std::byte>(w_scratch_bytes));
  TRESOR_ALLOC(n_scratch, shape_mem.alloc<std::byte>(n_scratch_bytes));
  TRESOR_ALLOC(l_scratch, shape_mem.alloc<std::byte>(l_scratch_bytes));
#undef TRESOR_ALLOC
  allocated = true;
  return {};
}

Result<void> GpuUNet::Impl::block_forward(const BlockParams& b, const Dims& in, const Dims& out, const float* x_in, float* pre, float* y) {
  TRESOR_TRY(conv_forward_device(st, conv_shape_of(b.conv, in), x_in, d_bf16 + b.conv.w, d_params + b.conv.b, pre));
  return norm_lrelu_forward_device(st, norm_shape_of(b.channels, out), pre, d_params + b.gamma, d_params + b.beta, y);
}

Result<void> GpuUNet::Impl::run_forward() {
  const float* cur = x;
  for (size_t s = 0; s < enc.size(); ++s) {
    TRESOR_TRY(block_forward(enc[s].blocks[0], enc_in_dims(s), dims[s], cur, enc_a[s].pre[0], enc_a[s].out[0]));
    TRESOR_TRY(block_forward(enc[s].blocks[1], dims[s], dims[s], enc_a[s].out[0], enc_a[s].pre[1], enc_a[s].out[1]));
    cur = enc_a[s].out[1];
  }
  for (size_t i = 0; i < dec.size(); ++i) {
    const size_t l = config.levels - 2 - i;
    const size_t ch = dec[i].channels;
    Acts& a = dec_a[i];
    TRESOR_TRY(conv_forward_device(st, conv_shape_of(dec[i].up, dims[l + 1]), cur, d_bf16 + dec[i].up.w, d_params + dec[i].up.b, a.up));
    // concat (upsampled, skip), as the CPU UNet's decoder.
    TRESOR_TRY(copy_channels_device(st, ChannelCopy{n, ch, dims[l].voxels(), ch, 0, 2 * ch, 0}, a.up, a.cat));
    TRESOR_TRY(copy_channels_device(st, ChannelCopy{n, ch, dims[l].voxels(), ch, 0, 2 * ch, ch}, enc_a[l].out[1], a.cat));
    TRESOR_TRY(block_forward(dec[i].blocks[0], dims[l], dims[l], a.cat, a.pre[0], a.out[0]));
    TRESOR_TRY(block_forward(dec[i].blocks[1], dims[l], dims[l], a.out[0], a.pre[1], a.out[1]));
    cur = a.out[1];
  }
  return conv_forward_device(st, conv_shape_of(head, dims[0]), cur, d_bf16 + head.w, d_params + head.b, logits);
}

Result<void> GpuUNet::Impl::conv_backward(const ConvParams& p, const Dims& in, const float* x_in, const float* dy, float* dx_in) {
  const ConvShape cs = conv_shape_of(p, in);
  TRESOR_TRY(conv_backward_weight_device(st, cs, x_in, dy, d_grads + p.w, d_grads + p.b, w_scratch, w_scratch_bytes));
  if (dx_in == nullptr) return {};  // the network's input: its gradient is not needed
  return conv_backward_data_device(st, cs, dy, d_bf16 + p.w, dx_in);
}

// dy: the gradient of the block's output; dx_in receives its input's (nullable).
Result<void> GpuUNet::Impl::block_backward(const BlockParams& b, const Dims& in, const Dims& out, const float* x_in, const float* pre, const float* dy, float* dx_in) {
  TRESOR_TRY(norm_lrelu_backward_device(st, norm_shape_of(b.channels, out), pre, dy, d_params + b.gamma, d_params + b.beta, g_pre, d_grads + b.gamma,
                                        d_grads + b.beta, n_scratch, n_scratch_bytes));
  return conv_backward(b.conv, in, x_in, g_pre, dx_in);
}

Result<void> GpuUNet::Impl::run_backward() {
  // The layers add their parameters' gradients: start from zero (the CPU UNet overwrites).
  TRESOR_TRY(zero_device(st, d_grads, count * sizeof(float)));
  const size_t levels = config.levels;
  const float* head_in = dec.empty() ? enc_a[0].out[1] : dec_a.back().out[1];
  TRESOR_TRY(conv_backward(head, dims[0], head_in, dlogits, g_cur));
  for (size_t i = dec.size(); i-- > 0;) {
    const size_t l = levels - 2 - i;
    const size_t ch = dec[i].channels;
    const Acts& a = dec_a[i];
    // A deep-supervision head on this stage's output (level l = j) adds its input gradient here,
    // as the CPU UNet's; a head of weight 0 has zero gradients (left from the zeroing above).
    if (l >= 1 && l <= ds_heads.size() && ds_weights[l] != 0) {
      TRESOR_TRY(conv_backward(ds_heads[l - 1], dims[l], a.out[1], ds_out[l - 1].dlogits, g_mid));
      TRESOR_TRY(add_device(st, n * ch * dims[l].voxels(), g_mid, g_cur));
    }
    TRESOR_TRY(block_backward(dec[i].blocks[1], dims[l], dims[l], a.out[0], a.pre[1], g_cur, g_mid));
    TRESOR_TRY(block_backward(dec[i].blocks[0], dims[l], dims[l], a.cat, a.pre[0], g_mid, g_cat));
    // split: the upsampled half to the transposed conv, the skip half kept for the encoder.
    TRESOR_TRY(copy_channels_device(st, ChannelCopy{n, ch, dims[l].voxels(), 2 * ch, 0, ch, 0}, g_cat, g_up));
    TRESOR_TRY(copy_channels_device(st, ChannelCopy{n, ch, dims[l].voxels(), 2 * ch, ch, ch, 0}, g_cat, enc_a[l].skip_grad));
    const float* up_in = i == 0 ? enc_a[levels - 1].out[1] : dec_a[i - 1].out[1];
    TRESOR_TRY(conv_backward(dec[i].up, dims[l + 1], up_in, g_up, g_cur));
  }
  for (size_t s = enc.size(); s-- > 0;) {
    if (s + 1 < levels) TRESOR_TRY(add_device(st, n * enc[s].channels * dims[s].voxels(), enc_a[s].skip_grad, g_cur));
    TRESOR_TRY(block_backward(enc[s].blocks[1], dims[s], dims[s], enc_a[s].out[0], enc_a[s].pre[1], g_cur, g_mid));
    const float* in = s == 0 ? x : enc_a[s - 1].out[1];
    TRESOR_TRY(block_backward(enc[s].blocks[0], enc_in_dims(s), dims[s], in, enc_a[s].pre[0], g_mid, s == 0 ? nullptr : g_cur));
  }
  return {};
}

namespace {

// forward's checks of an input shape [n, in_channels, d, h, w].
Result<void> check_input_shape(const UNetConfig& c, const std::array<size_t, 5>& s, const std::string& text) {
  const size_t f = size_t{1} << (c.levels - 1);
  if (s[1] != c.in_channels) return fail(ErrorCode::kInvalidArgument, "unet: the input has " + std::to_string(s[1]) + " channels, the model takes " + std::to_string(c.in_channels));
  if (s[0] == 0) return fail(ErrorCode::kInvalidArgument, "unet: the input " + text + " has no samples");
  for (size_t a = 2; a < 5; ++a) {
    if (s[a] == 0 || s[a] % f != 0) return fail(ErrorCode::kInvalidArgument, "unet: the input " + text + " is not a multiple of " + std::to_string(f) + " on every spatial axis");
  }
  return {};
}

std::string shape_text(const std::array<size_t, 5>& s) {
  std::string t = "[";
  for (size_t a = 0; a < s.size(); ++a) {
    if (a != 0) t.append(", ");
    t.append(std::to_string(s[a]));
  }
  t.push_back(']');
  return t;
}

}  // namespace

Result<void> GpuUNet::forward_keep(const Tensor& x) {
  Impl& m = *impl_;
  TRESOR_TRY(check_input_shape(m.config, x.shape, x.shape_text()));
  if (x.data.size() != x.size()) return fail(ErrorCode::kInvalidArgument, "unet: the input has " + std::to_string(x.data.size()) + " values for its shape " + x.shape_text());
  TRESOR_TRY(m.allocate(x.shape));
  m.have_forward = false;
  m.have_stats = false;
  m.device_input = false;  // the input buffer now holds x
  TRESOR_TRY(upload(m.st, m.x, x.data.data(), x.data.size() * sizeof(float)));
  TRESOR_TRY(m.run_forward());
  m.have_forward = true;
  return {};
}

Result<Tensor> GpuUNet::forward(const Tensor& x) {
  TRESOR_TRY(forward_keep(x));
  Impl& m = *impl_;
  m.have_forward = false;  // until the logits are here (a failed copy leaves no forward to use)
  Tensor logits({x.shape[0], m.config.classes, x.shape[2], x.shape[3], x.shape[4]});
  TRESOR_TRY(download(m.st, logits.data.data(), m.logits, logits.data.size() * sizeof(float)));
  m.have_forward = true;
  return logits;
}

Result<GpuUNet::DeviceBatch> GpuUNet::device_batch(const std::array<size_t, 5>& x_shape) {
  Impl& m = *impl_;
  TRESOR_TRY(check_input_shape(m.config, x_shape, shape_text(x_shape)));
  TRESOR_TRY(m.allocate(x_shape));
  m.have_forward = false;
  m.have_stats = false;
  m.device_input = true;
  return DeviceBatch{m.x, m.target};
}

Result<void> GpuUNet::forward_device() {
  Impl& m = *impl_;
  if (!m.device_input || !m.allocated) return fail(ErrorCode::kInvalidArgument, "unet: forward_device without device_batch (or after forward replaced its input)");
  m.have_forward = false;
  m.have_stats = false;
  TRESOR_TRY(m.run_forward());
  m.have_forward = true;
  return {};
}

size_t GpuUNet::outputs() const { return 1 + impl_->ds_heads.size(); }

Result<std::vector<double>> GpuUNet::loss_statistics(const std::vector<uint8_t>& target) {
  Impl& m = *impl_;
  if (!m.have_forward) return fail(ErrorCode::kInvalidArgument, "unet: backward before forward");
  const size_t voxels = m.n * m.dims[0].voxels();
  if (target.size() != voxels) return fail(ErrorCode::kInvalidArgument, "unet: target has " + std::to_string(target.size()) + " voxels, the logits " + std::to_string(voxels));
  for (size_t i = 0; i < target.size(); ++i) {
    // The device does not check: a class out of range would read outside the softmax.
    if (target[i] >= m.config.classes) return fail(ErrorCode::kInvalidArgument, "unet: target voxel " + std::to_string(i) + " is class " + std::to_string(target[i]) + " of " + std::to_string(m.config.classes));
  }
  m.have_grads = false;
  m.have_stats = false;
  TRESOR_TRY(upload(m.st, m.target, target.data(), target.size()));
  std::vector<std::vector<uint8_t>> small;  // kept until the uploads are complete
  for (size_t j : m.weighted_outputs()) {
    if (j == 0) continue;
    small.push_back(tresor::train::downsample_target(target, {m.n, m.dims[0].d, m.dims[0].h, m.dims[0].w}, j));
    TRESOR_TRY(upload(m.st, m.ds_out[j - 1].target, small.back().data(), small.back().size()));
  }
  return m.statistics();
}

Result<std::vector<double>> GpuUNet::loss_statistics_device() {
  Impl& m = *impl_;
  if (!m.have_forward || !m.device_input) return fail(ErrorCode::kInvalidArgument, "unet: loss_statistics_device without forward_device on the last forward");
  m.have_grads = false;
  m.have_stats = false;
  // Deep supervision's smaller targets made from the one in device memory (the labels never
  // come to the host).
  for (size_t j : m.weighted_outputs()) {
    if (j == 0) continue;
    TRESOR_TRY(downsample_target_device(m.st, m.n, m.dims[0].d, m.dims[0].h, m.dims[0].w, j, m.target, m.ds_out[j - 1].target));
  }
  return m.statistics();
}

Result<std::vector<double>> GpuUNet::Impl::statistics() {
  for (size_t j : weighted_outputs()) {
    if (j == 0) continue;
    TRESOR_TRY(conv_forward_device(st, conv_shape_of(ds_heads[j - 1], dims[j]), dec_a[dec_of_output(j)].out[1], d_bf16 + ds_heads[j - 1].w, d_params + ds_heads[j - 1].b,
                                   ds_out[j - 1].logits));
  }
  std::vector<double> stats;
  for (size_t j : weighted_outputs()) {
    const float* lg = j == 0 ? logits : ds_out[j - 1].logits;
    const uint8_t* t = j == 0 ? target : ds_out[j - 1].target;
    auto s = dice_ce_loss_stats_device(st, LossShape{n, config.classes, dims[j].voxels()}, lg, t, l_scratch, l_scratch_bytes);
    if (!s) return std::unexpected(s.error());
    stats.insert(stats.end(), s->begin(), s->end());
  }
  have_stats = true;
  return stats;
}

Result<LossValues> GpuUNet::backward_from_statistics(std::span<const double> stats, double smooth, double dice_weight) {
  Impl& m = *impl_;
  if (!m.have_stats) return fail(ErrorCode::kInvalidArgument, "unet: backward before loss_statistics on the last forward");
  const std::vector<size_t> js = m.weighted_outputs();
  const size_t per = 2 * m.config.classes;
  if (stats.size() != js.size() * per) {
    return fail(ErrorCode::kInvalidArgument, "unet: " + std::to_string(stats.size()) + " loss statistics, want " + std::to_string(js.size() * per) + " (" + std::to_string(js.size()) + " outputs of " + std::to_string(per) + ")");
  }
  m.have_grads = false;
  LossValues r;
  for (size_t k = 0; k < js.size(); ++k) {
    const size_t j = js[k];
    const double w = m.ds_weights[j];
    auto v = dice_ce_loss_grad_device(m.st, LossShape{m.n, m.config.classes, m.dims[j].voxels()}, j == 0 ? m.logits : m.ds_out[j - 1].logits,
                                      j == 0 ? m.target : m.ds_out[j - 1].target, stats.subspan(k * per, per), smooth, dice_weight, w, j == 0 ? m.dlogits : m.ds_out[j - 1].dlogits,
                                      m.l_scratch, m.l_scratch_bytes);
    if (!v) return std::unexpected(v.error());
    // deep_supervision_loss's sum (w = 1 with one output: the loss unchanged).
    r.loss += w * v->loss;
    if (j == 0) {
      r.cross_entropy = v->cross_entropy;
      r.dice = v->dice;
    }
  }
  TRESOR_TRY(m.run_backward());
  TRESOR_TRY(download(m.st, nullptr, nullptr, 0));  // every failure of the pass surfaces here
  m.have_stats = false;
  m.have_grads = true;
  return r;
}

Result<LossValues> GpuUNet::loss_and_backward(const std::vector<uint8_t>& target, double smooth, double dice_weight) {
  auto stats = loss_statistics(target);
  if (!stats) return std::unexpected(stats.error());
  return backward_from_statistics(*stats, smooth, dice_weight);
}

Result<void> GpuUNet::sgd_step(double lr, double momentum, double weight_decay, bool nesterov) {
  Impl& m = *impl_;
  if (!m.have_grads) return fail(ErrorCode::kInvalidArgument, "unet: an optimizer step before any backward pass");
  if (m.d_velocity == nullptr) TRESOR_TRY(set_sgd_state({}));
  TRESOR_TRY(sgd_step_device(m.st, m.count, m.d_params, m.d_grads, m.d_velocity, m.d_bf16, lr, momentum, weight_decay, nesterov));
  return download(m.st, nullptr, nullptr, 0);
}

Result<void> GpuUNet::adamw_step(double lr, double beta1, double beta2, double eps, double weight_decay) {
  Impl& m = *impl_;
  if (!m.have_grads) return fail(ErrorCode::kInvalidArgument, "unet: an optimizer step before any backward pass");
  if (m.d_m == nullptr) TRESOR_TRY(set_adamw_state({}));
  TRESOR_TRY(adamw_step_device(m.st, m.count, m.d_params, m.d_grads, m.d_m, m.d_v, m.d_bf16, lr, beta1, beta2, eps, weight_decay, m.adam_t + 1));
  TRESOR_TRY(download(m.st, nullptr, nullptr, 0));
  ++m.adam_t;
  return {};
}

Result<std::vector<float>> GpuUNet::parameters() const {
  std::vector<float> out(impl_->count);
  TRESOR_TRY(download(impl_->st, out.data(), impl_->d_params, out.size() * sizeof(float)));
  return out;
}

Result<void> GpuUNet::set_parameters(const std::vector<float>& flat) {
  Impl& m = *impl_;
  if (flat.size() != m.count) return fail(ErrorCode::kInvalidArgument, "unet: " + std::to_string(flat.size()) + " parameters given, the model has " + std::to_string(m.count));
  TRESOR_TRY(upload(m.st, m.d_params, flat.data(), flat.size() * sizeof(float)));
  return m.refresh_bf16(flat);
}

Result<void> GpuUNet::set_gradients(const std::vector<float>& flat) {
  Impl& m = *impl_;
  if (!m.have_grads) return fail(ErrorCode::kInvalidArgument, "unet: no gradient to replace yet (loss_and_backward has not run)");
  if (flat.size() != m.count) return fail(ErrorCode::kInvalidArgument, "unet: " + std::to_string(flat.size()) + " gradient values given, the model has " + std::to_string(m.count) + " parameters");
  TRESOR_TRY(upload(m.st, m.d_grads, flat.data(), flat.size() * sizeof(float)));
  return download(m.st, nullptr, nullptr, 0);  // flat may go
}

float* GpuUNet::device_gradients() { return impl_->d_grads; }
DeviceStream GpuUNet::stream() const { return impl_->st; }

Result<std::vector<float>> GpuUNet::gradients() const {
  if (!impl_->have_grads) return fail(ErrorCode::kInvalidArgument, "unet: no gradient yet (loss_and_backward has not run)");
  std::vector<float> out(impl_->count);
  TRESOR_TRY(download(impl_->st, out.data(), impl_->d_grads, out.size() * sizeof(float)));
  return out;
}

Result<void> GpuUNet::sgd_state(tresor::train::Sgd& into) const {
  into.velocity.clear();
  if (impl_->d_velocity == nullptr) return {};
  std::vector<float> v(impl_->count);
  TRESOR_TRY(download(impl_->st, v.data(), impl_->d_velocity, v.size() * sizeof(float)));
  into.velocity = std::move(v);
  return {};
}

Result<void> GpuUNet::adamw_state(tresor::train::AdamW& into) const {
  into.m.clear();
  into.v.clear();
  into.t = impl_->adam_t;
  if (impl_->d_m == nullptr) return {};
  std::vector<float> m(impl_->count), v(impl_->count);
  TRESOR_TRY(download(impl_->st, m.data(), impl_->d_m, m.size() * sizeof(float)));
  TRESOR_TRY(download(impl_->st, v.data(), impl_->d_v, v.size() * sizeof(float)));
  into.m = std::move(m);
  into.v = std::move(v);
  return {};
}

Result<void> GpuUNet::set_sgd_state(const tresor::train::Sgd& from) {
  Impl& m = *impl_;
  if (!from.velocity.empty() && from.velocity.size() != m.count) {
    return fail(ErrorCode::kInvalidArgument, "unet: sgd velocity has " + std::to_string(from.velocity.size()) + " values, the model " + std::to_string(m.count) + " parameters");
  }
  if (m.d_velocity == nullptr) {
    auto p = m.params_mem.alloc<float>(m.count);
    if (!p) return std::unexpected(p.error());
    m.d_velocity = *p;
  }
  if (from.velocity.empty()) return zero_device(m.st, m.d_velocity, m.count * sizeof(float));
  TRESOR_TRY(upload(m.st, m.d_velocity, from.velocity.data(), m.count * sizeof(float)));
  return {};
}

Result<void> GpuUNet::set_adamw_state(const tresor::train::AdamW& from) {
  Impl& m = *impl_;
  for (const auto* v : {&from.m, &from.v}) {
    if (!v->empty() && v->size() != m.count) {
      return fail(ErrorCode::kInvalidArgument, std::string("unet: adamw ") + (v == &from.m ? "m" : "v") + " has " + std::to_string(v->size()) + " values, the model " + std::to_string(m.count) + " parameters");
    }
  }
  if (m.d_m == nullptr) {
    auto a = m.params_mem.alloc<float>(m.count);
    if (!a) return std::unexpected(a.error());
    auto b = m.params_mem.alloc<float>(m.count);
    if (!b) return std::unexpected(b.error());
    m.d_m = *a;
    m.d_v = *b;
  }
  for (auto [h, d] : {std::pair{&from.m, m.d_m}, {&from.v, m.d_v}}) {
    if (h->empty()) {
      TRESOR_TRY(zero_device(m.st, d, m.count * sizeof(float)));
    } else {
      TRESOR_TRY(upload(m.st, d, h->data(), m.count * sizeof(float)));
    }
  }
  m.adam_t = from.t;
  return {};
}

}  // namespace tresor::gpu::train
