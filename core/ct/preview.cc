// Maximum-intensity-projection previews (include/tresor/ct/preview.h): libpng's simplified
// writer into memory, then Tresor's atomic output file.
#include "tresor/ct/preview.h"

#include <png.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "tresor/io.h"

namespace tresor::ct {
namespace {

// The projected image's two axes for a projection along `axis`: (fast, slow).
std::array<size_t, 2> plane_axes(size_t axis) {
  if (axis == 0) return {1, 2};
  if (axis == 1) return {0, 2};
  return {0, 1};
}

template <typename T>
std::vector<T> mip_any(const Volume<T>& v, size_t axis, T lowest) {
  const auto [u, w] = plane_axes(axis);
  std::vector<T> out(v.dims[u] * v.dims[w], lowest);
  for (size_t z = 0; z < v.dims[2]; ++z)
    for (size_t y = 0; y < v.dims[1]; ++y)
      for (size_t x = 0; x < v.dims[0]; ++x) {
        const size_t c[3] = {x, y, z};
        T& m = out[c[u] + v.dims[u] * c[w]];
        m = std::max(m, v.at(x, y, z));
      }
  return out;
}

}  // namespace

std::vector<float> mip(const Volume<float>& v, size_t axis) { return mip_any(v, axis, -std::numeric_limits<float>::infinity()); }
std::vector<uint8_t> mip(const LabelVolume& v, size_t axis) { return mip_any<uint8_t>(v, axis, 0); }

std::array<uint8_t, 3> label_colour(uint8_t label) {
  switch (label) {
    case kBody: return {0, 0, 0};
    case kBloodPool: return {110, 20, 20};
    case kMyocardium: return {150, 100, 70};
    case kAorta: return {230, 130, 20};
    case kLung: return {60, 70, 140};
    case kBone: return {235, 235, 210};
    case kFat: return {200, 180, 60};
    case kCoronary: return {255, 40, 40};
    default: return {0, 200, 200};  // labels of other datasets
  }
}

Result<Bytes> mip_png(const std::vector<PreviewPanel>& panels, size_t axis) {
  if (panels.empty()) return fail(ErrorCode::kInvalidArgument, "preview: no panels");
  if (axis > 2) return fail(ErrorCode::kInvalidArgument, "preview: axis " + std::to_string(axis) + " is not 0, 1 or 2");
  std::array<size_t, 3> dims{};
  for (size_t i = 0; i < panels.size(); ++i) {
    const auto& p = panels[i];
    if ((p.volume == nullptr) == (p.labels == nullptr)) return fail(ErrorCode::kInvalidArgument, "preview: panel " + std::to_string(i) + " needs a volume or labels");
    if (p.volume != nullptr && !(p.lower < p.upper)) {
      return fail(ErrorCode::kInvalidArgument, "preview: panel " + std::to_string(i) + " has window " + std::to_string(p.lower) + ".." + std::to_string(p.upper));
    }
    const auto& d = p.volume != nullptr ? p.volume->dims : p.labels->dims;
    if (i == 0) dims = d;
    if (d != dims || d[0] * d[1] * d[2] == 0) return fail(ErrorCode::kInvalidArgument, "preview: panel " + std::to_string(i) + " is empty or differs in size from panel 0");
  }
  const auto [u, w] = plane_axes(axis);
  const size_t pw = dims[u], ph = dims[w], width = pw * panels.size();
  if (width > 0x7FFFFFFF / 3 || ph > 0x7FFFFFFF) return fail(ErrorCode::kInvalidArgument, "preview: the image is too large");
  // Rows top to bottom: the slow axis reversed, so that superior (z) or posterior… is up for
  // coronal and sagittal views and anterior is up for axial ones (radiological habit).
  std::vector<uint8_t> rgb(width * ph * 3);
  for (size_t i = 0; i < panels.size(); ++i) {
    const auto& p = panels[i];
    auto put = [&](size_t a, size_t b, std::array<uint8_t, 3> c) {
      const size_t row = axis == 2 ? b : ph - 1 - b;
      std::copy(c.begin(), c.end(), rgb.begin() + static_cast<std::ptrdiff_t>(3 * (row * width + i * pw + a)));
    };
    if (p.volume != nullptr) {
      const auto m = mip(*p.volume, axis);
      for (size_t b = 0; b < ph; ++b)
        for (size_t a = 0; a < pw; ++a) {
          const double t = std::clamp((static_cast<double>(m[a + pw * b]) - p.lower) / (p.upper - p.lower), 0.0, 1.0);
          const auto g = static_cast<uint8_t>(std::lround(t * 255));
          put(a, b, {g, g, g});
        }
    } else {
      const auto m = mip(*p.labels, axis);
      for (size_t b = 0; b < ph; ++b)
        for (size_t a = 0; a < pw; ++a) put(a, b, label_colour(m[a + pw * b]));
    }
  }
  return rgb_png(width, ph, rgb);
}

Result<Bytes> rgb_png(size_t width, size_t height, const std::vector<uint8_t>& rgb) {
  if (width == 0 || height == 0 || width > 0x7FFFFFFF / 3 || height > 0x7FFFFFFF || rgb.size() != width * height * 3) {
    return fail(ErrorCode::kInvalidArgument, "png: " + std::to_string(width) + "×" + std::to_string(height) + " pixels and " + std::to_string(rgb.size()) + " bytes");
  }
  png_image image{};
  image.version = PNG_IMAGE_VERSION;
  image.width = static_cast<png_uint_32>(width);
  image.height = static_cast<png_uint_32>(height);
  image.format = PNG_FORMAT_RGB;
  png_alloc_size_t size = 0;
  if (png_image_write_to_memory(&image, nullptr, &size, 0, rgb.data(), 0, nullptr) == 0) {
    return fail(ErrorCode::kIo, std::string("png: libpng: ") + image.message);
  }
  Bytes png(size);
  if (png_image_write_to_memory(&image, png.data(), &size, 0, rgb.data(), 0, nullptr) == 0) {
    return fail(ErrorCode::kIo, std::string("png: libpng: ") + image.message);
  }
  png.resize(size);
  return png;
}

Result<void> write_mip_png(const std::string& path, const std::vector<PreviewPanel>& panels, size_t axis) {
  auto png = mip_png(panels, axis);
  if (!png) return std::unexpected(png.error());
  auto out = AtomicOutputFile::create(path, 0644, /*overwrite=*/true);
  if (!out) return std::unexpected(out.error());
  TRESOR_TRY(out->write(*png));
  return out->commit();
}

}  // namespace tresor::ct
