// The 3D U-Net, CPU reference (include/tresor/train/unet.h, docs/training.md §4).
#include "tresor/train/unet.h"

#include "tresor/splitmix.h"

#include <algorithm>
#include <cmath>
#include <numbers>

namespace tresor::train {
namespace {

// The same initial weights on every platform.
using Rng = SplitMix64;

Conv3d make_conv(size_t cin, size_t cout, size_t k, size_t stride, Rng& rng) {
  Conv3d c;
  c.cin = cin;
  c.cout = cout;
  c.k = k;
  c.stride = stride;
  c.pad = k / 2;
  // Kaiming normal, fan_in, leaky ReLU slope a = 0.01: sd = sqrt(2 / ((1 + a²)·fan_in)).
  const double sd = std::sqrt(2.0 / ((1 + 1e-4) * static_cast<double>(cin * k * k * k)));
  c.weight.resize(cout * cin * k * k * k);
  for (auto& w : c.weight) w = static_cast<float>(sd * rng.normal());
  c.bias.assign(cout, 0.0f);
  return c;
}

InstanceNormLeakyRelu make_norm(size_t channels) {
  InstanceNormLeakyRelu n;
  n.channels = channels;
  n.gamma.assign(channels, 1.0f);
  n.beta.assign(channels, 0.0f);
  return n;
}

void add_into(Tensor& acc, const Tensor& t) {
  if (acc.data.empty()) {
    acc = t;
    return;
  }
  for (size_t i = 0; i < acc.data.size(); ++i) acc.data[i] += t.data[i];
}

}  // namespace

namespace {

Result<void> check_config(const UNetConfig& c) {
  if (c.levels < 1 || c.levels > 8) return fail(ErrorCode::kInvalidArgument, "unet: " + std::to_string(c.levels) + " levels, not 1..8");
  if (c.base_channels == 0 || c.in_channels == 0 || c.max_channels < c.base_channels) {
    return fail(ErrorCode::kInvalidArgument, "unet: channels must be positive and max_channels at least base_channels");
  }
  if (c.classes < 2) return fail(ErrorCode::kInvalidArgument, "unet: " + std::to_string(c.classes) + " class(es); at least 2");
  if (c.deep_supervision && c.levels < 3) return fail(ErrorCode::kInvalidArgument, "unet: deep supervision needs at least 3 levels, not " + std::to_string(c.levels));
  return {};
}

}  // namespace

Result<size_t> UNet::count_parameters(const UNetConfig& c) {
  TRESOR_TRY(check_config(c));
  constexpr unsigned __int128 kLimit = static_cast<unsigned __int128>(1) << 40;
  // 128-bit sums of products of values below 2^64: no overflow for the fields a checkpoint holds.
  unsigned __int128 n = 0;
  auto width = [&](size_t s) -> unsigned __int128 { return std::min<unsigned __int128>(static_cast<unsigned __int128>(c.base_channels) << s, c.max_channels); };
  auto conv = [&](unsigned __int128 cin, unsigned __int128 cout, unsigned k) { n += cout * cin * k * k * k + cout; };
  auto block = [&](unsigned __int128 cin, unsigned __int128 cout) {
    conv(cin, cout, 3);
    n += 2 * cout;  // γ, β
  };
  unsigned __int128 in = c.in_channels;
  for (size_t s = 0; s < c.levels; ++s) {
    block(in, width(s));
    block(width(s), width(s));
    in = width(s);
    if (n > kLimit) break;
  }
  for (size_t s = c.levels - 1; s-- > 0 && n <= kLimit;) {
    n += width(s + 1) * width(s) * 8 + width(s);  // the transposed conv
    block(2 * width(s), width(s));
    block(width(s), width(s));
  }
  conv(width(0), c.classes, 1);
  if (c.deep_supervision) {
    for (size_t j = 1; j + 1 < c.levels; ++j) conv(width(j), c.classes, 1);
  }
  if (n > kLimit) return fail(ErrorCode::kInvalidArgument, "unet: more than 2^40 parameters");
  return static_cast<size_t>(n);
}

Result<UNet> UNet::create(const UNetConfig& c, uint64_t seed) {
  TRESOR_TRY(check_config(c));
  UNet u;
  u.config_ = c;
  Rng rng{seed};
  auto width = [&](size_t s) { return std::min(c.base_channels << s, c.max_channels); };
  size_t in = c.in_channels;
  for (size_t s = 0; s < c.levels; ++s) {
    Stage st;
    st.blocks[0].conv = make_conv(in, width(s), 3, s == 0 ? 1 : 2, rng);
    st.blocks[0].norm = make_norm(width(s));
    st.blocks[1].conv = make_conv(width(s), width(s), 3, 1, rng);
    st.blocks[1].norm = make_norm(width(s));
    u.encoder_.push_back(std::move(st));
    in = width(s);
  }
  for (size_t s = c.levels - 1; s-- > 0;) {
    Stage st;
    st.up.cin = width(s + 1);
    st.up.cout = width(s);
    const double sd = std::sqrt(2.0 / ((1 + 1e-4) * static_cast<double>(width(s) * 8)));  // PyTorch's fan_in of a transposed conv: weight.size(1)·k³
    st.up.weight.resize(width(s + 1) * width(s) * 8);
    for (auto& w : st.up.weight) w = static_cast<float>(sd * rng.normal());
    st.up.bias.assign(width(s), 0.0f);
    st.skip_channels = width(s);
    st.blocks[0].conv = make_conv(2 * width(s), width(s), 3, 1, rng);
    st.blocks[0].norm = make_norm(width(s));
    st.blocks[1].conv = make_conv(width(s), width(s), 3, 1, rng);
    st.blocks[1].norm = make_norm(width(s));
    u.decoder_.push_back(std::move(st));
  }
  u.head_ = make_conv(width(0), c.classes, 1, 1, rng);
  // Drawn after every other weight, so that a model with and without deep supervision share them.
  if (c.deep_supervision) {
    for (size_t j = 1; j + 1 < c.levels; ++j) u.ds_heads_.push_back(make_conv(width(j), c.classes, 1, 1, rng));
  }
  return u;
}

template <typename F>
void UNet::each_parameter_array(F&& f) {
  auto block = [&](Block& b) {
    f(b.conv.weight);
    f(b.conv.bias);
    f(b.norm.gamma);
    f(b.norm.beta);
  };
  for (auto& st : encoder_) {
    block(st.blocks[0]);
    block(st.blocks[1]);
  }
  for (auto& st : decoder_) {
    f(st.up.weight);
    f(st.up.bias);
    block(st.blocks[0]);
    block(st.blocks[1]);
  }
  f(head_.weight);
  f(head_.bias);
  for (auto& h : ds_heads_) {
    f(h.weight);
    f(h.bias);
  }
}

size_t UNet::parameter_count() const {
  size_t n = 0;
  const_cast<UNet*>(this)->each_parameter_array([&](std::vector<float>& a) { n += a.size(); });
  return n;
}

std::vector<float> UNet::parameters() const {
  std::vector<float> out;
  const_cast<UNet*>(this)->each_parameter_array([&](std::vector<float>& a) { out.insert(out.end(), a.begin(), a.end()); });
  return out;
}

Result<void> UNet::set_parameters(const std::vector<float>& flat) {
  if (flat.size() != parameter_count()) {
    return fail(ErrorCode::kInvalidArgument, "unet: " + std::to_string(flat.size()) + " parameters given, the model has " + std::to_string(parameter_count()));
  }
  size_t at = 0;
  each_parameter_array([&](std::vector<float>& a) {
    std::copy_n(flat.begin() + static_cast<std::ptrdiff_t>(at), a.size(), a.begin());
    at += a.size();
  });
  return {};
}

Result<Tensor> UNet::forward(const Tensor& x, unsigned threads) {
  auto all = forward_outputs(x, threads);
  if (!all) return std::unexpected(all.error());
  return std::move(all->front());
}

Result<std::vector<Tensor>> UNet::forward_outputs(const Tensor& x, unsigned threads) {
  const size_t f = size_t{1} << (config_.levels - 1);
  if (x.shape[1] != config_.in_channels) return fail(ErrorCode::kInvalidArgument, "unet: the input has " + std::to_string(x.shape[1]) + " channels, the model takes " + std::to_string(config_.in_channels));
  for (size_t a = 2; a < 5; ++a) {
    if (x.shape[a] == 0 || x.shape[a] % f != 0) {
      return fail(ErrorCode::kInvalidArgument, "unet: the input " + x.shape_text() + " is not a multiple of " + std::to_string(f) + " on every spatial axis");
    }
  }
  auto run_block = [&](Block& b, const Tensor& in) -> Result<Tensor> {
    b.in = in;
    auto pre = b.conv.forward(in, threads);
    if (!pre) return std::unexpected(pre.error());
    b.pre = std::move(*pre);
    return b.norm.forward(b.pre, threads);
  };
  Tensor cur = x;
  for (auto& st : encoder_) {
    for (auto& b : st.blocks) {
      auto y = run_block(b, cur);
      if (!y) return std::unexpected(y.error());
      cur = std::move(*y);
    }
    st.out = cur;
  }
  for (size_t i = 0; i < decoder_.size(); ++i) {
    Stage& st = decoder_[i];
    st.up_in = cur;
    auto up = st.up.forward(cur, threads);
    if (!up) return std::unexpected(up.error());
    const Stage& skip = encoder_[encoder_.size() - 2 - i];
    auto cat = concat_channels(*up, skip.out);
    if (!cat) return std::unexpected(cat.error());
    cur = std::move(*cat);
    for (auto& b : st.blocks) {
      auto y = run_block(b, cur);
      if (!y) return std::unexpected(y.error());
      cur = std::move(*y);
    }
    st.out = cur;
  }
  head_in_ = cur;
  std::vector<Tensor> out;
  auto main = head_.forward(cur, threads);
  if (!main) return std::unexpected(main.error());
  out.push_back(std::move(*main));
  // Output j (1/2^j of full resolution) comes from decoder stage levels − 2 − j.
  for (size_t j = 1; j <= ds_heads_.size(); ++j) {
    auto o = ds_heads_[j - 1].forward(decoder_[decoder_.size() - 1 - j].out, threads);
    if (!o) return std::unexpected(o.error());
    out.push_back(std::move(*o));
  }
  return out;
}

size_t UNet::offset_of(const std::vector<float>& array) {
  size_t at = 0, found = SIZE_MAX;
  each_parameter_array([&](std::vector<float>& a) {
    if (&a == &array) found = at;
    at += a.size();
  });
  return found;
}

Result<std::vector<float>> UNet::backward(const Tensor& dlogits, unsigned threads) {
  std::vector<float> out(parameter_count());
  TRESOR_TRY(backward_into(dlogits, out, threads));
  return out;
}

Result<void> UNet::backward_into(const Tensor& dlogits, std::span<float> out, unsigned threads, const GradientReady& ready) {
  return backward_outputs_into(std::span<const Tensor>(&dlogits, 1), out, threads, ready);
}

Result<void> UNet::backward_outputs_into(std::span<const Tensor> dlogits_all, std::span<float> out, unsigned threads, const GradientReady& ready) {
  if (head_in_.data.empty()) return fail(ErrorCode::kInvalidArgument, "unet: backward before forward");
  if (dlogits_all.size() != 1 && dlogits_all.size() != outputs()) {
    return fail(ErrorCode::kInvalidArgument, "unet: " + std::to_string(dlogits_all.size()) + " output gradients for " + std::to_string(outputs()) + " outputs");
  }
  const Tensor& dlogits = dlogits_all[0];
  if (out.size() != parameter_count()) {
    return fail(ErrorCode::kInvalidArgument, "unet: a gradient buffer of " + std::to_string(out.size()) + " values for " + std::to_string(parameter_count()) + " parameters");
  }
  // Each layer's gradients go to their place in the flat layout as soon as they are final.
  auto put = [&](const std::vector<float>& param, const std::vector<float>& grad) {
    const size_t at = offset_of(param);
    std::copy(grad.begin(), grad.end(), out.begin() + static_cast<std::ptrdiff_t>(at));
    if (ready) ready(at, grad.size());
  };
  auto block_back = [&](Block& bl, const Tensor& dy) -> Result<Tensor> {
    std::vector<float> w(bl.conv.weight.size(), 0), b(bl.conv.bias.size(), 0), g(bl.norm.gamma.size(), 0), be(bl.norm.beta.size(), 0);
    auto dpre = bl.norm.backward(bl.pre, dy, g, be, threads);
    if (!dpre) return std::unexpected(dpre.error());
    put(bl.norm.beta, be);
    put(bl.norm.gamma, g);
    auto dx = bl.conv.backward(bl.in, *dpre, w, b, threads);
    if (!dx) return std::unexpected(dx.error());
    put(bl.conv.bias, b);
    put(bl.conv.weight, w);
    return dx;
  };
  std::vector<float> head_w(head_.weight.size(), 0), head_b(head_.bias.size(), 0);
  auto dcur = head_.backward(head_in_, dlogits, head_w, head_b, threads);
  if (!dcur) return std::unexpected(dcur.error());
  put(head_.bias, head_b);
  put(head_.weight, head_w);
  Tensor d = std::move(*dcur);
  std::vector<Tensor> skip_grad(encoder_.size());
  for (size_t i = decoder_.size(); i-- > 0;) {
    Stage& st = decoder_[i];
    // A deep-supervision head on this stage's output adds its input gradient here.
    const size_t j = decoder_.size() - 1 - i;
    if (j >= 1 && j <= ds_heads_.size()) {
      Conv3d& h = ds_heads_[j - 1];
      std::vector<float> hw(h.weight.size(), 0), hb(h.bias.size(), 0);
      if (dlogits_all.size() > 1) {
        auto dx = h.backward(st.out, dlogits_all[j], hw, hb, threads);
        if (!dx) return std::unexpected(dx.error());
        add_into(d, *dx);
      }
      put(h.bias, hb);
      put(h.weight, hw);
    }
    for (size_t k = 2; k-- > 0;) {
      auto dx = block_back(st.blocks[k], d);
      if (!dx) return std::unexpected(dx.error());
      d = std::move(*dx);
    }
    auto parts = split_channels(d, st.up.cout);
    if (!parts) return std::unexpected(parts.error());
    add_into(skip_grad[encoder_.size() - 2 - i], parts->second);
    std::vector<float> uw(st.up.weight.size(), 0), ub(st.up.bias.size(), 0);
    auto din = st.up.backward(st.up_in, parts->first, uw, ub, threads);
    if (!din) return std::unexpected(din.error());
    put(st.up.bias, ub);
    put(st.up.weight, uw);
    d = std::move(*din);
  }
  for (size_t s = encoder_.size(); s-- > 0;) {
    if (!skip_grad[s].data.empty()) add_into(d, skip_grad[s]);
    for (size_t k = 2; k-- > 0;) {
      auto dx = block_back(encoder_[s].blocks[k], d);
      if (!dx) return std::unexpected(dx.error());
      d = std::move(*dx);
    }
  }
  return {};
}

}  // namespace tresor::train
