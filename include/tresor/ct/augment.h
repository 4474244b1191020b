// tresor/ct/augment.h — training patches (docs/preprocessing.md §6): foreground-biased random
// crops, flips, intensity scale and shift, Gaussian noise, after nnU-Net's defaults (Isensee et
// al., Nature Methods 18, 2021: one third of the patches centred on foreground, mirroring on
// every axis, multiplicative brightness 0.75–1.25, Gaussian noise of variance up to 0.1). Seeded:
// patch i of seed s is the same on every machine and thread count.
#pragma once

#include <array>
#include <cstdint>

#include "tresor/ct/augment_hd.h"
#include "tresor/ct/volume.h"

namespace tresor::ct {

struct AugmentOptions {
  std::array<size_t, 3> patch{96, 96, 96};     // voxels; at most the volume's size on every axis
  double foreground_fraction = 1.0 / 3;        // patches centred on a voxel of foreground_label
  uint8_t foreground_label = kCoronary;
  double flip_probability = 0.5;               // each axis independently
  double intensity_probability = 0.15;         // then scale and shift drawn uniformly:
  double scale_min = 0.75, scale_max = 1.25;
  double shift_min = -0.1, shift_max = 0.1;    // in image units (z-scored intensities)
  double noise_probability = 0.1;              // then the variance drawn uniformly:
  double noise_variance_min = 0, noise_variance_max = 0.1;
  // The spatial transform (nnU-Net v2's SpatialTransform: p_rotation 0.2, ±30° about each axis for
  // 3D patches, p_scaling 0.2, one factor 0.7–1.4 for all axes, no elastic deformation): the patch
  // is sampled from the volume rotated and scaled about its centre, the image trilinearly, the
  // labels by the largest interpolated weight (tresor/ct/augment_hd.h). Drawn from a stream of
  // their own, so that switching them off leaves every other draw as it was.
  double rotation_probability = 0.2;           // then three angles drawn uniformly in ±max:
  double rotation_max_degrees = 30;            // 0..180
  double scaling_probability = 0.2;            // then one factor drawn uniformly:
  double scaling_min = 0.7, scaling_max = 1.4; // in (0, 10]; above 1 takes in more of the volume
  // nnU-Net v2's ContrastTransform (p 0.15, factor 0.75–1.25, preserve_range): after the intensity
  // change and the noise, x' = (x − mean)·factor + mean over the patch, clipped to the patch's min
  // and max. Drawn from the spatial transform's stream, after its draws.
  double contrast_probability = 0.15;
  double contrast_min = 0.75, contrast_max = 1.25;
  // nnU-Net v2's two GammaTransforms (retain_stats; p 0.1 on the inverted image, then p 0.3),
  // γ drawn as batchgeneratorsv2's BGContrast((0.7, 1.5)): half the time uniform in [min, 1),
  // otherwise in [1, max] (uniform in [min, max] for a range on one side of 1). Drawn after the
  // contrast, from the same stream.
  double gamma_inverted_probability = 0.1;
  double gamma_probability = 0.3;
  double gamma_min = 0.7, gamma_max = 1.5;     // in (0, 10]
  // nnU-Net v2's GaussianBlurTransform (p 0.2 per sample, then p_per_channel 0.5: 0.1 for the one
  // image channel; σ drawn uniformly for each axis on its own) and SimulateLowResolutionTransform
  // (p 0.25, then p_per_channel 0.5: 0.125; one factor for all axes), applied in nnU-Net's order:
  // blur after the noise, the low resolution after the contrast (tresor/ct/augment_hd.h). Drawn
  // after the gammas, from the same stream.
  double blur_probability = 0.1;
  double blur_sigma_min = 0.5, blur_sigma_max = 1.0;     // in (0, 5] voxels
  double lowres_probability = 0.125;
  double lowres_scale_min = 0.5, lowres_scale_max = 1.0; // in (0, 1]
};

struct Patch {
  Volume<float> image;
  LabelVolume labels;
  // What was drawn, so that a patch can be explained and checked.
  std::array<size_t, 3> corner{};              // in the source volume, before flipping
  std::array<bool, 3> flipped{};
  bool foreground = false;                     // centred on foreground (false also when it was
                                               // asked for but the volume has none: see no_foreground)
  bool no_foreground = false;                  // foreground was drawn but the volume has none
  double scale = 1, shift = 0, noise_sd = 0;
  // The spatial transform: when `spatial`, patch voxel p (flips undone) shows the volume at
  // corner + (patch − 1)/2 + affineᵀ·(p − (patch − 1)/2) (augment_hd::spatial_source).
  bool spatial = false;
  std::array<double, 3> rotation_degrees{};   // about x, y, z (0 when not rotated)
  double scaling = 1;
  std::array<double, 9> affine{1, 0, 0, 0, 1, 0, 0, 0, 1};
  double contrast = 1;                         // the contrast factor (1: unchanged)
  double gamma_inverted = 1, gamma = 1;        // the gamma changes' γ (1: not applied)
  std::array<double, 3> blur_sigma{};          // the blur's σ per axis in voxels (0: not blurred)
  double lowres_scale = 1;                     // the simulated low resolution's factor (1: not applied)
};

/// What PatchSampler::sample draws for one patch before it reads a voxel, in the draws' order:
/// whether to centre on foreground, then either the draw that picks the foreground voxel or a
/// random corner, the flips, the intensity change, the noise's size; then the stream's state, from
/// which voxel k's noise is augment_hd::noise_normal(noise_state, k) (tresor/ct/augment_hd.h).
/// The GPU data loader draws on the host and reads the voxels on the device.
struct PatchDraw {
  bool want_foreground = false;
  /// want_foreground with a volume that has foreground: the voxel is foreground list
  /// [foreground_draw % count] (in index order), the patch centred on it (augment_hd::centred_corner).
  bool from_foreground = false;
  uint64_t foreground_draw = 0;
  std::array<size_t, 3> corner{};  // otherwise: the random corner
  std::array<bool, 3> flipped{};
  double scale = 1, shift = 0, noise_sd = 0;
  uint64_t noise_state = 0;
  /// The spatial transform, from its own stream (independent of the draws above): whether it
  /// applies, its angles (signed turns in units of 2^-53, exactly what the matrix is made from)
  /// and factor, and the matrix (augment_hd::rotation_scaling).
  bool spatial = false;
  std::array<int64_t, 3> turns{};
  double scaling = 1;
  std::array<double, 9> affine{1, 0, 0, 0, 1, 0, 0, 0, 1};
  double contrast = 1;  // then the contrast factor (augment_hd::contrast_patch), 1 when not drawn
  double gamma_inverted = 1, gamma = 1;  // then the gamma changes' γ (augment_hd::gamma_patch), 1 when not drawn
  std::array<double, 3> blur_sigma{};    // then the blur's σ per axis (augment_hd::blur_voxel), 0 when not drawn
  double lowres_scale = 1;               // then the low resolution's factor (augment_hd::lowres_up_voxel), 1 when not drawn
  /// What augment_hd::finish_patch does with this draw.
  [[nodiscard]] augment_hd::PatchFinish finish() const {
    augment_hd::PatchFinish f;
    for (size_t a = 0; a < 3; ++a) f.blur_sigma[a] = blur_sigma[a];
    f.contrast = contrast;
    f.lowres_scale = lowres_scale;
    for (unsigned k = 0; k < 3; ++k) f.flipped |= flipped[k] ? 1u << k : 0u;
    f.gamma_inverted = gamma_inverted;
    f.gamma = gamma;
    return f;
  }
};

/// Draws patches from one volume and its labels. The foreground voxels are listed once, here.
class PatchSampler {
 public:
  /// The checks of create() that need only the options and the volume's dimensions.
  [[nodiscard]] static Result<void> check(const AugmentOptions& options, const std::array<size_t, 3>& dims);
  /// The draws of patch `index` of stream `seed` from a volume of `dims` (options as checked by
  /// check()), with or without foreground: exactly what sample() draws.
  [[nodiscard]] static PatchDraw draw(const AugmentOptions& options, const std::array<size_t, 3>& dims, bool have_foreground, uint64_t seed,
                                      uint64_t index);

  /// kInvalidArgument names what is wrong: labels of other dimensions, a patch larger than the
  /// volume on an axis or empty, a probability or fraction outside [0, 1], a range with min > max,
  /// a negative variance, a rotation outside 0..180 degrees, a scaling factor or γ that is not positive or above 10,
  /// a blur σ not in (0, 5], a low-resolution factor not in (0, 1].
  [[nodiscard]] static Result<PatchSampler> create(const Volume<float>& image, const LabelVolume& labels, const AugmentOptions& options);

  /// Patch `index` of the stream `seed`: independent of any other call. The noise's normals come
  /// from tresor/ct/augment_hd.h (no libm), which the GPU data loader runs too.
  [[nodiscard]] Patch sample(uint64_t seed, uint64_t index) const;
  size_t foreground_voxels() const { return foreground_.size(); }

  /// Another channel of the same volume (`other`: the sampler's dimensions, e.g. the vesselness)
  /// at the voxels of `patch` (sampled from this sampler): the same crop, flips and spatial
  /// transform, no intensity change or noise. An `other` of different dimensions is kInvalidArgument.
  [[nodiscard]] Result<std::vector<float>> channel(const Patch& patch, const Volume<float>& other) const;

 private:
  PatchSampler(const Volume<float>& image, const LabelVolume& labels, const AugmentOptions& options)
      : image_(&image), labels_(&labels), o_(options) {}
  const Volume<float>* image_;
  const LabelVolume* labels_;
  AugmentOptions o_;
  std::vector<uint32_t> foreground_;
};

}  // namespace tresor::ct
