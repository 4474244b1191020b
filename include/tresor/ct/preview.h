// tresor/ct/preview.h — maximum-intensity-projection previews (docs/preprocessing.md §8): what an
// engineer looks at to see that a volume, its vesselness and its labels line up.
#pragma once

#include <string>
#include <vector>

#include "tresor/ct/volume.h"
#include "tresor/encoding.h"

namespace tresor::ct {

/// The maximum along `axis` (0 = x, 1 = y, 2 = z): an image of the other two axes, the lower-
/// numbered one fastest (axis 2 gives x fastest, y rows).
[[nodiscard]] std::vector<float> mip(const Volume<float>& v, size_t axis);
[[nodiscard]] std::vector<uint8_t> mip(const LabelVolume& v, size_t axis);

struct PreviewPanel {
  const Volume<float>* volume = nullptr;  // gray: lower → black, upper → white
  double lower = 0, upper = 1;
  const LabelVolume* labels = nullptr;    // or labels: one colour per label (docs §8)
};

/// The PNG's bytes (what write_mip_png writes; `tresor prep` seals them).
[[nodiscard]] Result<Bytes> mip_png(const std::vector<PreviewPanel>& panels, size_t axis);
/// An 8-bit RGB PNG of the panels' MIPs along `axis` side by side (all panels must have one
/// size), written atomically (named only when complete). kInvalidArgument names an empty panel
/// list, a panel with neither or both sources, a window with lower >= upper, panels of different
/// sizes; kIo names the file.
[[nodiscard]] Result<void> write_mip_png(const std::string& path, const std::vector<PreviewPanel>& panels, size_t axis);

/// An 8-bit RGB image (rows top to bottom, 3 bytes per pixel) as PNG bytes.
[[nodiscard]] Result<Bytes> rgb_png(size_t width, size_t height, const std::vector<uint8_t>& rgb);

/// The colour of a label in previews (kCoronary red, blood pool dark red, aorta orange, …).
[[nodiscard]] std::array<uint8_t, 3> label_colour(uint8_t label);

}  // namespace tresor::ct
