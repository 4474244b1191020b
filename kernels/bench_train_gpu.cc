// The GPU figures of `tresor bench train` (include/tresor/gpu/trainer.h): cuBLAS's bf16 GEMM as
// the matrix peak of this device, Tresor's convolution kernels, GpuUNet's step. Timed on the host
// clock around device-wide synchronisation, after warm-up runs.
//
// NOT RUN on the machine this was written on (no GPU there); scripts/gpu-check runs it.
#include <chrono>
#include <cstring>

#include "tresor/gpu.h"
#include "tresor/gpu/trainer.h"
#include "tresor/gpu/unet.h"
#include "tresor/splitmix.h"

#ifdef TRESOR_HAVE_CUDA
#include <cublas_v2.h>
#include <cuda_runtime_api.h>
#endif

namespace tresor::gpu::train {

#ifdef TRESOR_HAVE_CUDA
namespace {

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

Result<void> cuda(cudaError_t e, const char* what) {
  if (e != cudaSuccess) return fail(ErrorCode::kUnavailable, std::string("bench train: ") + what + ": " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")");
  return {};
}

// Device buffers freed (zeroed first, as all Tresor device memory) when the set goes.
class Buffers {
 public:
  ~Buffers() {
    for (auto [p, n] : held_) {
      (void)cudaMemset(p, 0, n);
      (void)cudaFree(p);
    }
  }
  template <typename T>
  Result<T*> alloc(size_t count, unsigned char fill) {
    void* p = nullptr;
    TRESOR_TRY(cuda(cudaMalloc(&p, count * sizeof(T)), "cudaMalloc"));
    held_.emplace_back(p, count * sizeof(T));
    TRESOR_TRY(cuda(cudaMemset(p, fill, count * sizeof(T)), "cudaMemset"));
    return static_cast<T*>(p);
  }

 private:
  std::vector<std::pair<void*, size_t>> held_;
};

Result<double> gemm_tflops(size_t n, int reps) {
  Buffers b;
  // 0x3c3c is about 0.0115 in bf16; the products stay finite.
  auto A = b.alloc<uint16_t>(n * n, 0x3c), B = b.alloc<uint16_t>(n * n, 0x3c);
  auto C = b.alloc<float>(n * n, 0);
  if (!A || !B || !C) return fail(ErrorCode::kUnavailable, "bench train: no device memory for the GEMM");
  cublasHandle_t h = nullptr;
  if (cublasCreate(&h) != CUBLAS_STATUS_SUCCESS) return fail(ErrorCode::kUnavailable, "bench train: cublasCreate failed");
  const float alpha = 1, beta = 0;
  const int ni = static_cast<int>(n);
  auto run = [&]() {
    return cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, ni, ni, ni, &alpha, *A, CUDA_R_16BF, ni, *B, CUDA_R_16BF, ni, &beta, *C, CUDA_R_32F, ni, CUBLAS_COMPUTE_32F,
                        CUBLAS_GEMM_DEFAULT);
  };
  cublasStatus_t st = run();
  st = st == CUBLAS_STATUS_SUCCESS ? run() : st;
  Result<void> synced = cuda(cudaDeviceSynchronize(), "GEMM warm-up");
  const double t0 = now();
  for (int i = 0; i < reps && st == CUBLAS_STATUS_SUCCESS; ++i) st = run();
  if (synced) synced = cuda(cudaDeviceSynchronize(), "GEMM");
  const double t = now() - t0;
  cublasDestroy(h);
  if (st != CUBLAS_STATUS_SUCCESS) return fail(ErrorCode::kUnavailable, "bench train: cublasGemmEx failed with status " + std::to_string(static_cast<int>(st)));
  if (!synced) return std::unexpected(synced.error());
  return 2.0 * static_cast<double>(n) * static_cast<double>(n) * static_cast<double>(n) * reps / t / 1e12;
}

}  // namespace

Result<GpuTrainFigures> bench_train_device(int device, const tresor::train::UNetConfig& model, size_t batch, size_t patch, size_t C, size_t S, size_t steps) {
  auto devs = gpu_probe();
  if (!devs) return std::unexpected(devs.error());
  if (device < 0 || static_cast<size_t>(device) >= devs->size()) return fail(ErrorCode::kUnavailable, "bench train: no CUDA device " + std::to_string(device));
  TRESOR_TRY(cuda(cudaSetDevice(device), "cudaSetDevice"));
  GpuTrainFigures f;
  f.device_name = (*devs)[static_cast<size_t>(device)].name;
  auto peak = gemm_tflops(8192, 20);
  if (!peak) return std::unexpected(peak.error());
  f.gemm_bf16_tflops = *peak;

  // One convolution, forward and backward, through the device-pointer layers.
  {
    tresor::train::Conv3d layer;
    layer.cin = layer.cout = C;
    auto shape = conv_shape(layer, {batch, C, S, S, S});
    if (!shape) return std::unexpected(shape.error());
    const size_t vox = batch * C * S * S * S;
    Buffers b;
    auto x = b.alloc<float>(vox, 0x3c), y = b.alloc<float>(vox, 0), dy = b.alloc<float>(vox, 0x3c), dx = b.alloc<float>(vox, 0);
    auto w = b.alloc<uint16_t>(C * C * 27, 0x3c);
    auto bias = b.alloc<float>(C, 0), dw = b.alloc<float>(C * C * 27, 0), db = b.alloc<float>(C, 0);
    auto scratch_bytes = conv_backward_weight_scratch(*shape);
    if (!scratch_bytes) return std::unexpected(scratch_bytes.error());
    auto scratch = b.alloc<unsigned char>(std::max<size_t>(*scratch_bytes, 1), 0);
    if (!x || !y || !dy || !dx || !w || !bias || !dw || !db || !scratch) return fail(ErrorCode::kUnavailable, "bench train: no device memory for the convolution");
    const DeviceStream s{device, nullptr, Backend::kDevice};
    auto once = [&]() -> Result<void> {
      TRESOR_TRY(conv_forward_device(s, *shape, *x, *w, *bias, *y));
      TRESOR_TRY(conv_backward_data_device(s, *shape, *dy, *w, *dx));
      return conv_backward_weight_device(s, *shape, *x, *dy, *dw, *db, *scratch, *scratch_bytes);
    };
    TRESOR_TRY(once());
    TRESOR_TRY(cuda(cudaDeviceSynchronize(), "convolution warm-up"));
    const double t0 = now();
    for (size_t i = 0; i < steps; ++i) TRESOR_TRY(once());
    TRESOR_TRY(cuda(cudaDeviceSynchronize(), "convolution"));
    f.conv_s = (now() - t0) / static_cast<double>(steps);
    f.conv_tflops = 3.0 * 2.0 * static_cast<double>(batch * C * C * 27) * static_cast<double>(S * S * S) / f.conv_s / 1e12;
  }

  // GpuUNet's whole step on random inputs with 10 % foreground.
  auto net = tresor::train::UNet::create(model, 1);
  if (!net) return std::unexpected(net.error());
  auto g = GpuUNet::create(*net, Where{Backend::kDevice, device});
  if (!g) return std::unexpected(g.error());
  tresor::train::Tensor in({batch, model.in_channels, patch, patch, patch});
  SplitMix64 rng{7};
  for (auto& v : in.data) v = static_cast<float>(rng.normal());
  std::vector<uint8_t> target(batch * patch * patch * patch);
  for (auto& t : target) t = rng.uniform() < 0.1 ? 1 : 0;
  auto step = [&]() -> Result<double> {
    auto logits = g->forward(in);
    if (!logits) return std::unexpected(logits.error());
    auto loss = g->loss_and_backward(target);
    if (!loss) return std::unexpected(loss.error());
    TRESOR_TRY(g->adamw_step(1e-3));
    return loss->loss;
  };
  auto first = step();
  if (!first) return std::unexpected(first.error());
  f.first_loss = *first;
  TRESOR_TRY(cuda(cudaDeviceSynchronize(), "step warm-up"));
  const double t0 = now();
  for (size_t i = 0; i < steps; ++i) {
    auto l = step();
    if (!l) return std::unexpected(l.error());
    f.last_loss = *l;
  }
  TRESOR_TRY(cuda(cudaDeviceSynchronize(), "step"));
  f.step_s = (now() - t0) / static_cast<double>(steps);
  return f;
}

#else

Result<GpuTrainFigures> bench_train_device(int, const tresor::train::UNetConfig&, size_t, size_t, size_t, size_t, size_t) {
  return fail(ErrorCode::kUnavailable, "bench train: this build has no CUDA");
}

#endif

}  // namespace tresor::gpu::train
