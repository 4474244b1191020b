// tresor/train/inference.h — whole-volume prediction by sliding windows with Gaussian weighting
// (issue 9, docs/training.md §10), nnU-Net's inference: tiles of the training patch size with a
// step of half a tile, each tile's logits weighted by a Gaussian centred on the tile (σ = tile/8),
// summed and divided by the summed weights. CPU reference.
#pragma once

#include <vector>

#include "tresor/ct/prep.h"
#include "tresor/train/unet.h"

namespace tresor::train {

/// nnU-Net's tile starts along one axis of `image` voxels for tiles of `tile` with a target step of
/// step·tile: n = ⌈(image − tile)/(step·tile)⌉ + 1 starts spread evenly from 0 to image − tile,
/// rounded to the nearest voxel; {0} when the tile covers the axis (image ≤ tile: padded).
[[nodiscard]] std::vector<size_t> sliding_window_starts(size_t image, size_t tile, double step);

/// The Gaussian importance map of a tile³ (x fastest): a unit impulse at ⌊tile/2⌋ filtered by a
/// Gaussian of σ = sigma_scale·tile (scipy.ndimage.gaussian_filter, mode 'constant', truncate 4),
/// scaled so that its maximum is `peak`, zeros raised to the smallest positive value (nnU-Net's
/// compute_gaussian).
[[nodiscard]] std::vector<float> gaussian_importance(size_t tile, double sigma_scale = 1.0 / 8, double peak = 10);

struct SlidingWindowOptions {
  size_t tile = 24;            // the training patch size (a multiple of 2^(levels−1))
  double step = 0.5;           // of a tile
  double sigma_scale = 1.0 / 8;
  size_t batch = 2;            // tiles per forward pass
  unsigned threads = 0;
  /// nnU-Net's test-time mirroring: each tile's logits are the mean of the network's output on the
  /// tile and, flipped back, on the tile flipped along every non-empty subset of the three spatial
  /// axes (8 forward passes per tile; nnU-Net v2's _internal_maybe_mirror_and_predict, which sums
  /// in that order and divides by 8).
  bool mirror = false;
};

/// `t` [N, C, D, H, W] flipped along the spatial axes in `axes` (bit 0: W, bit 1: H, bit 2: D).
[[nodiscard]] Tensor flip_spatial(const Tensor& t, unsigned axes);

/// The logits [1, classes, D, H, W] of a volume [1, channels, D, H, W]: every tile's forward pass
/// (mirrored when options.mirror; axes shorter than the tile are padded with zeros and cropped
/// back), Gaussian-weighted and averaged. kInvalidArgument names a bad tile, step or volume.
[[nodiscard]] Result<Tensor> sliding_window_logits(UNet& net, const Tensor& volume, const SlidingWindowOptions& options);

/// A prepared case as the network's input [1, 2, D, H, W]: the z-scored image and the vesselness
/// times `vesselness_scale` (what the trainer feeds it).
[[nodiscard]] Tensor case_input(const ct::Prepared& c, double vesselness_scale);

}  // namespace tresor::train
