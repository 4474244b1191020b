// Training patches (include/tresor/ct/augment.h, docs/preprocessing.md §6).
#include "tresor/ct/augment.h"

#include <algorithm>
#include <cmath>

#include "internal.h"
#include "tresor/ct/augment_hd.h"

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

// Visits the patch's voxels in index order: plain(dst, src) with the source voxel's index for a
// plain crop, spatial(dst, neighbours) with the source position's eight voxels under the spatial
// transform.
template <typename Plain, typename Spatial>
void for_each_voxel(const Patch& p, const std::array<size_t, 3>& dims, const std::array<size_t, 3>& n, Plain plain, Spatial spatial) {
  const uint64_t corner[3] = {p.corner[0], p.corner[1], p.corner[2]};
  const uint64_t pn[3] = {n[0], n[1], n[2]}, vn[3] = {dims[0], dims[1], dims[2]};
  size_t dst = 0;
  for (size_t z = 0; z < n[2]; ++z)
    for (size_t y = 0; y < n[1]; ++y)
      for (size_t x = 0; x < n[0]; ++x, ++dst) {
        const uint64_t q[3] = {p.flipped[0] ? n[0] - 1 - x : x, p.flipped[1] ? n[1] - 1 - y : y, p.flipped[2] ? n[2] - 1 - z : z};
        if (!p.spatial) {
          plain(dst, (corner[0] + q[0]) + dims[0] * ((corner[1] + q[1]) + dims[1] * (corner[2] + q[2])));
        } else {
          double s[3];
          augment_hd::spatial_source(p.affine.data(), corner, pn, q, s);
          spatial(dst, augment_hd::neighbours(vn, s));
        }
      }
}

}  // namespace

Result<void> PatchSampler::check(const AugmentOptions& o, const std::array<size_t, 3>& dims) {
  if (dims[0] * dims[1] * dims[2] > 0xFFFFFFFFu) return fail(ErrorCode::kInvalidArgument, "augment: the volume has more than 2^32 voxels");
  for (size_t a = 0; a < 3; ++a) {
    if (o.patch[a] == 0 || o.patch[a] > dims[a]) {
      return fail(ErrorCode::kInvalidArgument, "augment: a patch of " + std::to_string(o.patch[a]) + " voxels on axis " + std::to_string(a) +
                                                   " does not fit the volume's " + std::to_string(dims[a]));
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
  for (auto [name, p] : {std::pair{"rotation probability", o.rotation_probability}, {"scaling probability", o.scaling_probability}}) {
    if (auto r = check_probability(name, p); !r) return std::unexpected(r.error());
  }
  if (!(o.rotation_max_degrees >= 0 && o.rotation_max_degrees <= 180)) {
    return fail(ErrorCode::kInvalidArgument, "augment: rotation of " + std::to_string(o.rotation_max_degrees) + " degrees is not in 0..180");
  }
  if (auto r = check_range("scaling", o.scaling_min, o.scaling_max); !r) return std::unexpected(r.error());
  if (!(o.scaling_min > 0)) return fail(ErrorCode::kInvalidArgument, "augment: scaling factor " + std::to_string(o.scaling_min) + " is not positive");
  if (o.scaling_max > 10) return fail(ErrorCode::kInvalidArgument, "augment: scaling factor " + std::to_string(o.scaling_max) + " is above 10");
  if (auto r = check_probability("contrast probability", o.contrast_probability); !r) return std::unexpected(r.error());
  if (auto r = check_range("contrast", o.contrast_min, o.contrast_max); !r) return std::unexpected(r.error());
  if (!(o.contrast_min >= 0)) return fail(ErrorCode::kInvalidArgument, "augment: contrast factor " + std::to_string(o.contrast_min) + " is negative");
  for (auto [name, p] : {std::pair{"gamma probability", o.gamma_probability}, {"inverted gamma probability", o.gamma_inverted_probability}}) {
    if (auto r = check_probability(name, p); !r) return std::unexpected(r.error());
  }
  if (auto r = check_range("gamma", o.gamma_min, o.gamma_max); !r) return std::unexpected(r.error());
  if (!(o.gamma_min > 0) || o.gamma_max > 10) {
    return fail(ErrorCode::kInvalidArgument, "augment: gamma range " + std::to_string(o.gamma_min) + ".." + std::to_string(o.gamma_max) + " is not within (0, 10]");
  }
  for (auto [name, p] : {std::pair{"blur probability", o.blur_probability}, {"low-resolution probability", o.lowres_probability}}) {
    if (auto r = check_probability(name, p); !r) return std::unexpected(r.error());
  }
  if (auto r = check_range("blur sigma", o.blur_sigma_min, o.blur_sigma_max); !r) return std::unexpected(r.error());
  if (!(o.blur_sigma_min > 0) || o.blur_sigma_max > 5) {
    return fail(ErrorCode::kInvalidArgument, "augment: blur sigma range " + std::to_string(o.blur_sigma_min) + ".." + std::to_string(o.blur_sigma_max) +
                                                 " voxels is not within (0, 5]");
  }
  if (auto r = check_range("low-resolution scale", o.lowres_scale_min, o.lowres_scale_max); !r) return std::unexpected(r.error());
  if (!(o.lowres_scale_min > 0) || o.lowres_scale_max > 1) {
    return fail(ErrorCode::kInvalidArgument, "augment: low-resolution scale range " + std::to_string(o.lowres_scale_min) + ".." +
                                                 std::to_string(o.lowres_scale_max) + " is not within (0, 1]");
  }
  return {};
}

Result<PatchSampler> PatchSampler::create(const Volume<float>& image, const LabelVolume& labels, const AugmentOptions& o) {
  if (labels.dims != image.dims || labels.data.size() != image.data.size() || image.data.size() != image.size()) {
    return fail(ErrorCode::kInvalidArgument, "augment: the labels do not have the image's dimensions");
  }
  TRESOR_TRY(check(o, image.dims));
  PatchSampler s(image, labels, o);
  for (size_t i = 0; i < labels.data.size(); ++i) {
    if (labels.data[i] == o.foreground_label) s.foreground_.push_back(static_cast<uint32_t>(i));
  }
  return s;
}

PatchDraw PatchSampler::draw(const AugmentOptions& o, const std::array<size_t, 3>& d, bool have_foreground, uint64_t seed, uint64_t index) {
  // One SplitMix64 stream per (seed, index); the draws in a fixed order.
  detail::Rng rng{seed ^ (index * 0xD1B54A32D192ED03ull + 0x8CB92BA72F3D8DD7ull)};
  rng.next();
  PatchDraw p;
  p.want_foreground = rng.uniform() < o.foreground_fraction;
  if (p.want_foreground && have_foreground) {
    p.from_foreground = true;
    p.foreground_draw = rng.next();  // SplitMix64::below(n) is next() % n
  } else {
    for (size_t a = 0; a < 3; ++a) p.corner[a] = rng.below(d[a] - o.patch[a] + 1);
  }
  for (size_t a = 0; a < 3; ++a) p.flipped[a] = rng.uniform() < o.flip_probability;
  if (rng.uniform() < o.intensity_probability) {
    p.scale = rng.between(o.scale_min, o.scale_max);
    p.shift = rng.between(o.shift_min, o.shift_max);
  }
  if (rng.uniform() < o.noise_probability) p.noise_sd = std::sqrt(rng.between(o.noise_variance_min, o.noise_variance_max));
  p.noise_state = rng.s;

  // The spatial transform's own stream, in batchgeneratorsv2's order: rotate?, scale?, the three
  // angles, the factor. An angle is a whole number of 2^-53 turns, uniform in ±max.
  detail::Rng srng{seed ^ (index * 0x9E6C63D0676A9A99ull + 0x3C6EF372FE94F82Bull)};
  srng.next();
  const bool rotate = srng.uniform() < o.rotation_probability;
  const bool scale = srng.uniform() < o.scaling_probability;
  if (rotate) {
    const auto k = static_cast<uint64_t>(std::floor(o.rotation_max_degrees / 360 * 0x1p53));  // ≤ 2^52
    for (size_t a = 0; a < 3; ++a) p.turns[a] = static_cast<int64_t>(srng.next() % (2 * k + 1)) - static_cast<int64_t>(k);
  }
  if (scale) p.scaling = srng.between(o.scaling_min, o.scaling_max);
  p.spatial = rotate || scale;
  if (p.spatial) augment_hd::rotation_scaling(p.turns.data(), p.scaling, p.affine.data());
  if (srng.uniform() < o.contrast_probability) p.contrast = srng.between(o.contrast_min, o.contrast_max);
  // batchgeneratorsv2's BGContrast sampling of γ for a range around 1 (half the draws in
  // [lo, 1), half in [1, hi]); a range on one side of 1 is drawn uniformly.
  auto bg_draw = [&](double lo, double hi) {
    if (!(lo < 1 && hi > 1)) return srng.between(lo, hi);
    if (srng.uniform() < 0.5) return srng.between(lo, 1);
    return srng.between(1, hi);
  };
  if (srng.uniform() < o.gamma_inverted_probability) p.gamma_inverted = bg_draw(o.gamma_min, o.gamma_max);
  if (srng.uniform() < o.gamma_probability) p.gamma = bg_draw(o.gamma_min, o.gamma_max);
  if (srng.uniform() < o.blur_probability) {
    for (size_t a = 0; a < 3; ++a) p.blur_sigma[a] = srng.between(o.blur_sigma_min, o.blur_sigma_max);
  }
  // batchgeneratorsv2 keeps the factor in a float32 tensor: rounded to float, as it rounds n·scale.
  if (srng.uniform() < o.lowres_probability) p.lowres_scale = static_cast<double>(static_cast<float>(srng.between(o.lowres_scale_min, o.lowres_scale_max)));
  return p;
}

Patch PatchSampler::sample(uint64_t seed, uint64_t index) const {
  const auto& d = image_->dims;
  const PatchDraw dr = draw(o_, d, !foreground_.empty(), seed, index);
  Patch p;
  if (dr.from_foreground) {
    // Centred on a foreground voxel, moved inside the volume where the edge is closer than half.
    const uint32_t v = foreground_[static_cast<size_t>(dr.foreground_draw % foreground_.size())];
    const size_t c[3] = {v % d[0], (v / d[0]) % d[1], v / (d[0] * d[1])};
    for (size_t a = 0; a < 3; ++a) p.corner[a] = static_cast<size_t>(augment_hd::centred_corner(c[a], o_.patch[a], d[a]));
    p.foreground = true;
  } else {
    p.no_foreground = dr.want_foreground;
    p.corner = dr.corner;
  }
  p.flipped = dr.flipped;
  p.scale = dr.scale;
  p.shift = dr.shift;
  p.noise_sd = dr.noise_sd;
  p.spatial = dr.spatial;
  p.scaling = dr.scaling;
  p.affine = dr.affine;
  for (size_t a = 0; a < 3; ++a) p.rotation_degrees[a] = static_cast<double>(dr.turns[a]) * 0x1p-53 * 360;
  p.contrast = dr.contrast;
  p.gamma_inverted = dr.gamma_inverted;
  p.gamma = dr.gamma;
  p.blur_sigma = dr.blur_sigma;
  p.lowres_scale = dr.lowres_scale;

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
  // Voxel k (in the patch's index order) takes the stream's normals at k: the draws a sequential
  // loop would take, addressed directly so that the GPU loader computes the same (augment_hd.h).
  const float* image = image_->data.data();
  const uint8_t* labels = labels_->data.data();
  auto image_at = [image](uint64_t i) { return static_cast<double>(image[i]); };
  auto label_at = [labels](uint64_t i) { return labels[i]; };
  for_each_voxel(
      p, d, n,
      [&](size_t dst, size_t src) {
        p.image.data[dst] = augment_hd::augment_voxel(image[src], p.scale, p.shift, p.noise_sd, dr.noise_state, dst);
        p.labels.data[dst] = labels[src];
      },
      [&](size_t dst, const augment_hd::Neighbours& nb) {
        const auto v = static_cast<float>(augment_hd::trilinear(image_at, nb));
        p.image.data[dst] = augment_hd::augment_voxel(v, p.scale, p.shift, p.noise_sd, dr.noise_state, dst);
        p.labels.data[dst] = augment_hd::label_at(label_at, nb);
      });
  if (const augment_hd::PatchFinish f = dr.finish(); f.any()) {
    const uint64_t pn[3] = {n[0], n[1], n[2]};
    std::vector<float> scratch(f.needs_scratch() ? p.image.data.size() : 0);
    augment_hd::finish_patch(p.image.data.data(), pn, f, scratch.data());
  }
  return p;
}

Result<std::vector<float>> PatchSampler::channel(const Patch& patch, const Volume<float>& other) const {
  if (other.dims != image_->dims || other.data.size() != image_->data.size()) {
    return fail(ErrorCode::kInvalidArgument, "augment: the channel does not have the image's dimensions");
  }
  if (patch.image.dims != o_.patch) return fail(ErrorCode::kInvalidArgument, "augment: the patch is not one of this sampler's");
  std::vector<float> out(patch.image.size());
  const float* v = other.data.data();
  auto at = [v](uint64_t i) { return static_cast<double>(v[i]); };
  for_each_voxel(
      patch, image_->dims, o_.patch, [&](size_t dst, size_t src) { out[dst] = v[src]; },
      [&](size_t dst, const augment_hd::Neighbours& nb) { out[dst] = static_cast<float>(augment_hd::trilinear(at, nb)); });
  return out;
}

}  // namespace tresor::ct
