// Training patches (include/tresor/ct/augment.h, docs/preprocessing.md §6).
#include "tresor/ct/augment.h"

#include <algorithm>
#include <cmath>

#include "internal.h"

namespace tresor::ct {
namespace {

Result<void> check_probability(const char* name, double p) {
  if (!(p >= 0 && p <= 1)) return fail(ErrorCode::kInvalidArgument, std::string("augment: ") + name + " " + std::to_string(p) + " is not in [0, 1]");
  return {};
}
Result<void> check_range(const char* name, double lo, double hi) {
  if (!(lo <= hi) || !std::isfinite(lo) || !std::isfinite(hi)) {
    return fail(ErrorCode::kInvalidArgument, std::string("augment: ") + name + " range " + std::to_string(lo) + ".." + std::to_string(hi) + " is empty");
  }
  return {};
}

}  // namespace

Result<PatchSampler> PatchSampler::create(const Volume<float>& image, const LabelVolume& labels, const AugmentOptions& o) {
  if (labels.dims != image.dims || labels.data.size() != image.data.size() || image.data.size() != image.size()) {
    return fail(ErrorCode::kInvalidArgument, "augment: the labels do not have the image's dimensions");
  }
  if (image.size() > 0xFFFFFFFFu) return fail(ErrorCode::kInvalidArgument, "augment: the volume has more than 2^32 voxels");
  for (size_t a = 0; a < 3; ++a) {
    if (o.patch[a] == 0 || o.patch[a] > image.dims[a]) {
      return fail(ErrorCode::kInvalidArgument, "augment: a patch of " + std::to_string(o.patch[a]) + " voxels on axis " + std::to_string(a) +
                                                   " does not fit the volume's " + std::to_string(image.dims[a]));
    }
  }
  for (auto [name, p] : {std::pair{"foreground fraction", o.foreground_fraction}, {"flip probability", o.flip_probability},
                         {"intensity probability", o.intensity_probability}, {"noise probability", o.noise_probability}}) {
    if (auto r = check_probability(name, p); !r) return std::unexpected(r.error());
  }
  if (auto r = check_range("scale", o.scale_min, o.scale_max); !r) return std::unexpected(r.error());
  if (auto r = check_range("shift", o.shift_min, o.shift_max); !r) return std::unexpected(r.error());
  if (auto r = check_range("noise variance", o.noise_variance_min, o.noise_variance_max); !r) return std::unexpected(r.error());
  if (o.noise_variance_min < 0) return fail(ErrorCode::kInvalidArgument, "augment: noise variance " + std::to_string(o.noise_variance_min) + " is negative");
  PatchSampler s(image, labels, o);
  for (size_t i = 0; i < labels.data.size(); ++i) {
    if (labels.data[i] == o.foreground_label) s.foreground_.push_back(static_cast<uint32_t>(i));
  }
  return s;
}

Patch PatchSampler::sample(uint64_t seed, uint64_t index) const {
  // One SplitMix64 stream per (seed, index); the draws in a fixed order.
  detail::Rng rng{seed ^ (index * 0xD1B54A32D192ED03ull + 0x8CB92BA72F3D8DD7ull)};
  rng.next();
  const auto& d = image_->dims;
  Patch p;
  const bool want_fg = rng.uniform() < o_.foreground_fraction;
  if (want_fg && !foreground_.empty()) {
    // Centred on a foreground voxel, moved inside the volume where the edge is closer than half.
    const uint32_t v = foreground_[rng.below(foreground_.size())];
    const size_t c[3] = {v % d[0], (v / d[0]) % d[1], v / (d[0] * d[1])};
    for (size_t a = 0; a < 3; ++a) {
      const size_t half = o_.patch[a] / 2;
      p.corner[a] = std::min(c[a] > half ? c[a] - half : 0, d[a] - o_.patch[a]);
    }
    p.foreground = true;
  } else {
    p.no_foreground = want_fg;
    for (size_t a = 0; a < 3; ++a) p.corner[a] = rng.below(d[a] - o_.patch[a] + 1);
  }
  for (size_t a = 0; a < 3; ++a) p.flipped[a] = rng.uniform() < o_.flip_probability;
  if (rng.uniform() < o_.intensity_probability) {
    p.scale = rng.between(o_.scale_min, o_.scale_max);
    p.shift = rng.between(o_.shift_min, o_.shift_max);
  }
  if (rng.uniform() < o_.noise_probability) p.noise_sd = std::sqrt(rng.between(o_.noise_variance_min, o_.noise_variance_max));

  const auto& n = o_.patch;
  p.image.dims = n;
  p.image.spacing = image_->spacing;
  p.labels.dims = n;
  p.labels.spacing = image_->spacing;
  // The origin is the corner voxel's centre; a flip mirrors the data, not the frame (training
  // patches carry no geometry the model relies on).
  for (size_t a = 0; a < 3; ++a) p.image.origin[a] = image_->origin[a] + static_cast<double>(p.corner[a]) * image_->spacing[a];
  p.labels.origin = p.image.origin;
  p.image.data.resize(p.image.size());
  p.labels.data.resize(p.labels.size());
  for (size_t z = 0; z < n[2]; ++z) {
    const size_t sz = p.corner[2] + (p.flipped[2] ? n[2] - 1 - z : z);
    for (size_t y = 0; y < n[1]; ++y) {
      const size_t sy = p.corner[1] + (p.flipped[1] ? n[1] - 1 - y : y);
      for (size_t x = 0; x < n[0]; ++x) {
        const size_t sx = p.corner[0] + (p.flipped[0] ? n[0] - 1 - x : x);
        const size_t src = image_->index(sx, sy, sz), dst = p.image.index(x, y, z);
        double v = static_cast<double>(image_->data[src]) * p.scale + p.shift;
        if (p.noise_sd > 0) v += p.noise_sd * rng.normal();
        p.image.data[dst] = static_cast<float>(v);
        p.labels.data[dst] = labels_->data[src];
      }
    }
  }
  return p;
}

}  // namespace tresor::ct
