// tresor bench train: the training step's speed against PyTorch, measured in the same run on the
// same model and data (issue 9, docs/benchmarks.md): the whole step of the U-Net (forward, nnU-Net's
// loss, backward, SGD with Nesterov momentum) and one 3×3×3 convolution's forward and backward, on
// the CPU reference against Debian's python3-torch (float32, the same number of threads). The GPU
// trainer's figures join here when it exists. Ends with one RESULT line.
#include <sys/wait.h>

#include <algorithm>
#include <cstdio>
#include <numeric>

#include "cli.h"
#include "options.h"
#include "tresor/gpu/trainer.h"
#include "tresor/splitmix.h"
#include "tresor/thread_pool.h"
#include "tresor/train/unet.h"

namespace tresor::cli {
namespace {

// The baseline: the same U-Net in PyTorch (nnU-Net's PlainConvUNet layout, as
// tresor::train::UNet), the same loss and optimizer, timed after one warm-up step; then one
// convolution forward and backward. Prints "step_s conv_s".
constexpr const char* kTorchBaseline = R"PY(
import sys, time, torch, torch.nn as nn
levels, base, maxc, patch, batch, threads, steps, conv_c, conv_p = map(int, sys.argv[1:10])
dev = sys.argv[10] if len(sys.argv) > 10 else "cpu"
if dev == "cuda" and not torch.cuda.is_available():
    print("unavailable")
    sys.exit(0)
torch.set_num_threads(threads)
torch.manual_seed(1)
if dev == "cuda":
    torch.backends.cudnn.benchmark = True  # cuDNN picks its fastest algorithms, as nnU-Net lets it
# On the GPU: cuDNN with bf16 autocast, as nnU-Net trains (its own choice is fp16 autocast).
sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if dev == "cuda" else (lambda: torch.autocast("cpu", enabled=False))
w = lambda s: min(base << s, maxc)
def block(ci, co, stride):
    return [nn.Conv3d(ci, co, 3, stride, 1), nn.InstanceNorm3d(co, eps=1e-5, affine=True), nn.LeakyReLU(0.01)]
class UNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc, self.up, self.dec, cin = nn.ModuleList(), nn.ModuleList(), nn.ModuleList(), 2
        for s in range(levels):
            self.enc.append(nn.Sequential(*block(cin, w(s), 1 if s == 0 else 2), *block(w(s), w(s), 1)))
            cin = w(s)
        for s in range(levels - 2, -1, -1):
            self.up.append(nn.ConvTranspose3d(w(s + 1), w(s), 2, 2))
            self.dec.append(nn.Sequential(*block(2 * w(s), w(s), 1), *block(w(s), w(s), 1)))
        self.head = nn.Conv3d(w(0), 2, 1)
    def forward(self, x):
        skips = []
        for e in self.enc:
            x = e(x)
            skips.append(x)
        x = skips.pop()
        for u, d in zip(self.up, self.dec):
            x = d(torch.cat([u(x), skips.pop()], 1))
        return self.head(x)
net = UNet().to(dev)
opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.99, nesterov=True, weight_decay=3e-5)
x = torch.randn(batch, 2, patch, patch, patch, device=dev)
t = (torch.rand(batch, patch, patch, patch, device=dev) < 0.1).long()
onehot = torch.nn.functional.one_hot(t, 2).permute(0, 4, 1, 2, 3).float()
def step():
    opt.zero_grad()
    with amp():
        logits = net(x)
    logits = logits.float()
    p = torch.softmax(logits, 1)
    axes = [0, 2, 3, 4]
    dc = (2 * (p * onehot).sum(axes) + 1e-5) / (p.sum(axes) + onehot.sum(axes) + 1e-5)
    loss = torch.nn.functional.cross_entropy(logits, t) - dc[1:].mean()
    loss.backward()
    opt.step()
step()
sync()
t0 = time.perf_counter()
for _ in range(steps):
    step()
sync()
step_s = (time.perf_counter() - t0) / steps
conv = nn.Conv3d(conv_c, conv_c, 3, 1, 1).to(dev)
cx = torch.randn(batch, conv_c, conv_p, conv_p, conv_p, device=dev, requires_grad=True)
def conv_once():
    with amp():
        y = conv(cx)
    y.backward(torch.ones_like(y))
conv_once()
sync()
t0 = time.perf_counter()
for _ in range(steps):
    conv_once()
sync()
peak = torch.cuda.max_memory_allocated() / 2**20 if dev == "cuda" else 0
print(step_s, (time.perf_counter() - t0) / steps, peak)
)PY";

// Runs the baseline; its stdout.
Result<std::string> run_torch(const std::string& python, const std::vector<size_t>& numbers, const std::string& device) {
  std::vector<std::string> args = {python, "-c", kTorchBaseline};
  for (size_t v : numbers) args.push_back(std::to_string(v));
  args.push_back(device);
  auto r = run_program(args, Stream::kCapture, Stream::kInherit);
  if (!(r.status >= 0 && WIFEXITED(r.status) && WEXITSTATUS(r.status) == 0)) return fail(ErrorCode::kUnavailable, "PyTorch exited with an error");
  return r.output;
}

}  // namespace

int cmd_bench_train(int argc, char** argv) {
  po::options_description opts("Options");
  size_t levels = 4, base = 8, maxc = 320, patch = 32, batch = 2, steps = 3, conv_c = 16, conv_p = 32;
  unsigned threads = 0;
  bool no_torch = false;
  opts.add_options()
      ("levels", po::value(&levels)->default_value(4), "U-Net encoder stages")
      ("base-channels", po::value(&base)->default_value(8), "channels of the first stage")
      ("max-channels", po::value(&maxc)->default_value(320), "channel cap")
      ("patch", po::value(&patch)->default_value(32), "patch side in voxels (a multiple of 2^(levels-1))")
      ("batch", po::value(&batch)->default_value(2), "patches per step")
      ("steps", po::value(&steps)->default_value(3), "timed steps (after one warm-up step)")
      ("conv-channels", po::value(&conv_c)->default_value(16), "the single convolution's channels in and out")
      ("conv-size", po::value(&conv_p)->default_value(32), "the single convolution's input side")
      ("threads,j", po::value(&threads)->default_value(0), "threads, for both (0: all cores)")
      ("device", po::value<std::string>()->default_value("auto"), "auto (the GPU figures too when a GPU is usable), cpu, or cuda:N")
      ("gpu-patch", po::value<size_t>()->default_value(128), "the GPU step's patch side (nnU-Net's 3D full-resolution scale)")
      ("gpu-base-channels", po::value<size_t>()->default_value(32), "the GPU step's base channels")
      ("python", po::value<std::string>()->default_value("/usr/bin/python3"), "the Python with PyTorch (with CUDA for the GPU baseline)")
      ("no-torch", po::bool_switch(&no_torch), "skip PyTorch (then no ratio)");
  po::variables_map vm;
  if (auto stop = parse_options("bench train", "[--patch 32] [--batch 2] [--base-channels 8] [-j N] [--no-torch]", argc, argv, opts, {}, vm)) return *stop;
  if (steps == 0 || steps > 1000) return usage_error("bench train", "--steps must be 1..1000");
  if (batch == 0 || batch > 64 || conv_c == 0 || conv_c > 512 || conv_p == 0 || conv_p > 256) return usage_error("bench train", "--batch, --conv-channels or --conv-size out of range");
  threads = ThreadPool::resolve(threads);
  const train::UNetConfig cfg{levels, base, maxc, 2, 2};
  auto net = train::UNet::create(cfg, 1);
  if (!net) return report(net.error());
  const size_t f = size_t{1} << (levels - 1);
  if (patch == 0 || patch % f != 0 || patch > 256) return usage_error("bench train", "--patch " + std::to_string(patch) + " is not a multiple of " + std::to_string(f) + " up to 256");

  // The same kind of data as the baseline: normal inputs, 10 % foreground.
  SplitMix64 rng{7};
  train::Tensor x({batch, 2, patch, patch, patch});
  for (auto& v : x.data) v = static_cast<float>(rng.normal());
  std::vector<uint8_t> target(batch * patch * patch * patch);
  for (auto& t : target) t = rng.uniform() < 0.1 ? 1 : 0;
  std::vector<float> params = net->parameters(), grads(params.size());
  train::Sgd sgd;
  auto step = [&]() -> Result<double> {
    auto logits = net->forward(x, threads);
    if (!logits) return std::unexpected(logits.error());
    auto loss = train::dice_ce_loss(*logits, target, 1e-5, threads);
    if (!loss) return std::unexpected(loss.error());
    TRESOR_TRY(net->backward_into(loss->dlogits, grads, threads));
    TRESOR_TRY(sgd.step(params, grads, 0.01));
    TRESOR_TRY(net->set_parameters(params));
    return loss->loss;
  };
  std::printf("U-Net %zu levels, %zu base channels, %zu parameters; batch %zu of %zu^3 patches; %u threads\n", levels, base, net->parameter_count(), batch, patch,
              threads);
  std::fflush(stdout);
  if (auto w = step(); !w) return report(w.error());  // warm-up
  const double t0 = now_seconds();
  for (size_t i = 0; i < steps; ++i) {
    if (auto r = step(); !r) return report(r.error());
  }
  const double step_s = (now_seconds() - t0) / static_cast<double>(steps);

  // One 3×3×3 convolution, forward and backward (data and weight): 3 × 2·N·C²·27·voxels FLOPs.
  train::Conv3d conv;
  conv.cin = conv.cout = conv_c;
  conv.weight.resize(conv_c * conv_c * 27);
  conv.bias.assign(conv_c, 0.0f);
  for (auto& v : conv.weight) v = static_cast<float>(rng.normal() * 0.1);
  train::Tensor cx({batch, conv_c, conv_p, conv_p, conv_p});
  for (auto& v : cx.data) v = static_cast<float>(rng.normal());
  train::Tensor cdy({batch, conv_c, conv_p, conv_p, conv_p}, 1.0f);
  std::vector<float> dw(conv.weight.size()), db(conv_c);
  auto conv_once = [&]() -> Result<void> {
    auto y = conv.forward(cx, threads);
    if (!y) return std::unexpected(y.error());
    auto dx = conv.backward(cx, cdy, dw, db, threads);
    if (!dx) return std::unexpected(dx.error());
    return {};
  };
  if (auto r = conv_once(); !r) return report(r.error());
  const double c0 = now_seconds();
  for (size_t i = 0; i < steps; ++i) {
    if (auto r = conv_once(); !r) return report(r.error());
  }
  const double conv_s = (now_seconds() - c0) / static_cast<double>(steps);
  const double conv_flops = 3.0 * 2.0 * static_cast<double>(batch * conv_c * conv_c * 27) * static_cast<double>(conv_p * conv_p * conv_p);
  std::printf("Tresor CPU: %.3f s per step, conv3d %zu->%zu on %zu^3 forward+backward %.3f s (%.1f GFLOP/s)\n", step_s, conv_c, conv_c, conv_p, conv_s,
              conv_flops / conv_s / 1e9);

  double torch_step = 0, torch_conv = 0;
  if (!no_torch) {
    std::printf("PyTorch (CPU, float32, %s) on the same model …\n", vm["python"].as<std::string>().c_str());
    std::fflush(stdout);
    double unused = 0;
    auto r = run_torch(vm["python"].as<std::string>(), {levels, base, maxc, patch, batch, static_cast<size_t>(threads), steps, conv_c, conv_p}, "cpu");
    if (!r || std::sscanf(r->c_str(), "%lf %lf %lf", &torch_step, &torch_conv, &unused) != 3) {
      return report(Error{ErrorCode::kUnavailable, "PyTorch did not run (install python3-torch, or pass --no-torch): '" + (r ? *r : r.error().message) + "'"});
    }
    std::printf("PyTorch CPU: %.3f s per step, conv3d %.3f s (%.1f GFLOP/s): Tresor's step is %.2fx PyTorch's speed, its conv3d %.2fx\n", torch_step, torch_conv,
                conv_flops / torch_conv / 1e9, torch_step / step_s, torch_conv / conv_s);
  }
  // The GPU figures: the bf16 matrix peak, Tresor's convolution, GpuUNet's step on the GPU-sized
  // model, and PyTorch with cuDNN and bf16 autocast on the same model where it has CUDA.
  const std::string device = vm["device"].as<std::string>();
  int gpu_index = -1;
  if (device == "auto") {
    auto ok = gpu::train::available(0);
    if (ok && *ok) gpu_index = 0;
    if (!ok || !*ok) std::printf("GPU: none usable here (%s): no GPU figures\n", ok ? "no device of compute capability 8.0 or newer" : ok.error().message.c_str());
  } else if (device.starts_with("cuda:") && device.size() > 5 && device.size() < 9 && device.find_first_not_of("0123456789", 5) == std::string::npos) {
    gpu_index = std::stoi(device.substr(5));
  } else if (device != "cpu") {
    return usage_error("bench train", "--device must be auto, cpu or cuda:N, not '" + device + "'");
  }
  std::string gpu_fields, gpu_name = "none";
  if (gpu_index >= 0) {
    const size_t gp = vm["gpu-patch"].as<size_t>(), gb = vm["gpu-base-channels"].as<size_t>();
    if (gp == 0 || gp % f != 0 || gp > 512 || gb == 0 || gb > 512) return usage_error("bench train", "--gpu-patch must be a multiple of " + std::to_string(f) + " up to 512");
    const train::UNetConfig gcfg{levels, gb, maxc, 2, 2};
    std::printf("GPU %d: U-Net %zu levels, %zu base channels, batch %zu of %zu^3 …\n", gpu_index, levels, gb, batch, gp);
    std::fflush(stdout);
    auto g = gpu::train::bench_train_device(gpu_index, gcfg, batch, gp, 64, 64, steps);
    if (!g) return report(g.error());
    std::printf("%s: bf16 GEMM %.1f TFLOP/s; conv3d 64->64 on 64^3 forward+backward %.2f ms (%.1f TFLOP/s, %.2f of the GEMM); step %.1f ms (loss %.4f -> %.4f)\n",
                g->device_name.c_str(), g->gemm_bf16_tflops, g->conv_s * 1e3, g->conv_tflops, g->conv_tflops / g->gemm_bf16_tflops, g->step_s * 1e3, g->first_loss,
                g->last_loss);
    gpu_name = g->device_name;
    for (auto& ch : gpu_name)
      if (ch == ' ' || ch == '=') ch = '_';  // one RESULT token
    char buf[512];
    std::snprintf(buf, sizeof buf, " gpu_patch=%zu gpu_base_channels=%zu gemm_bf16_tflops=%.1f conv_gpu_tflops=%.2f conv_peak_ratio=%.3f gpu_step_s=%.4f", gp, gb,
                  g->gemm_bf16_tflops, g->conv_tflops, g->conv_tflops / g->gemm_bf16_tflops, g->step_s);
    gpu_fields = buf;
    if (!no_torch) {
      auto r = run_torch(vm["python"].as<std::string>(), {levels, gb, maxc, gp, batch, static_cast<size_t>(threads), steps, 64, 64}, "cuda");
      double ts = 0, tc = 0, peak = 0;
      if (r && r->starts_with("unavailable")) {
        std::printf("PyTorch: no CUDA in this PyTorch (Debian's python3-torch is CPU-only; --python names another): no cuDNN baseline\n");
        gpu_fields += " torch_gpu=unavailable";
      } else if (r && std::sscanf(r->c_str(), "%lf %lf %lf", &ts, &tc, &peak) == 3) {
        std::printf("PyTorch cuDNN bf16 autocast: step %.1f ms, conv3d %.2f ms, peak %.0f MiB: Tresor's step %.2fx, conv %.2fx\n", ts * 1e3, tc * 1e3, peak,
                    ts / g->step_s, tc / g->conv_s);
        std::snprintf(buf, sizeof buf, " torch_gpu_step_s=%.4f gpu_step_ratio=%.3f torch_gpu_conv_s=%.5f gpu_conv_ratio=%.3f torch_gpu_peak_mib=%.0f", ts, ts / g->step_s, tc,
                      tc / g->conv_s, peak);
        gpu_fields += buf;
      } else {
        return report(Error{ErrorCode::kUnavailable, "PyTorch on CUDA failed: '" + (r ? *r : r.error().message) + "'"});
      }
    }
  }
  std::printf("RESULT bench_train device=cpu gpu=%s levels=%zu base_channels=%zu patch=%zu batch=%zu threads=%u params=%zu step_s=%.4f conv_gflops=%.2f", gpu_name.c_str(),
              levels, base, patch, batch, threads, net->parameter_count(), step_s, conv_flops / conv_s / 1e9);
  if (!no_torch) {
    std::printf(" torch_step_s=%.4f step_ratio=%.3f torch_conv_gflops=%.2f conv_ratio=%.3f", torch_step, torch_step / step_s, conv_flops / torch_conv / 1e9,
                torch_conv / conv_s);
  }
  std::printf("%s\n", gpu_fields.c_str());
  return kExitOk;
}

}  // namespace tresor::cli
