// MIP previews (include/tresor/ct/preview.h): the projection against a direct maximum, the PNG
// read back with libpng, colours and windows where they belong, bad panels named.
#include <gtest/gtest.h>
#include <png.h>

#include <unistd.h>

#include <cmath>

#include "support/test_support.h"
#include "tresor/ct/ops.h"
#include "tresor/ct/preview.h"

namespace tresor::ct {
namespace {

struct Rgb {
  png_uint_32 width = 0, height = 0;
  std::vector<uint8_t> px;
  std::array<uint8_t, 3> at(size_t x, size_t y) const { return {px[3 * (y * width + x)], px[3 * (y * width + x) + 1], px[3 * (y * width + x) + 2]}; }
};

Rgb read_png(const std::string& path) {
  png_image image{};
  image.version = PNG_IMAGE_VERSION;
  EXPECT_NE(png_image_begin_read_from_file(&image, path.c_str()), 0) << image.message;
  image.format = PNG_FORMAT_RGB;
  Rgb r;
  r.width = image.width;
  r.height = image.height;
  r.px.resize(PNG_IMAGE_SIZE(image));
  EXPECT_NE(png_image_finish_read(&image, nullptr, r.px.data(), 0, nullptr), 0) << image.message;
  return r;
}

TEST(Preview, MipIsTheMaximumAlongTheAxis) {
  FloatVolume v;
  v.dims = {5, 4, 3};
  v.data.resize(v.size());
  for (size_t i = 0; i < v.data.size(); ++i) v.data[i] = static_cast<float>((i * 37) % 23);
  for (size_t axis = 0; axis < 3; ++axis) {
    const auto m = mip(v, axis);
    const size_t u = axis == 0 ? 1 : 0, w = axis == 2 ? 1 : 2;
    ASSERT_EQ(m.size(), v.dims[u] * v.dims[w]);
    for (size_t b = 0; b < v.dims[w]; ++b)
      for (size_t a = 0; a < v.dims[u]; ++a) {
        float want = -1;
        for (size_t k = 0; k < v.dims[axis]; ++k) {
          size_t c[3];
          c[axis] = k;
          c[u] = a;
          c[w] = b;
          want = std::max(want, v.at(c[0], c[1], c[2]));
        }
        ASSERT_EQ(m[a + v.dims[u] * b], want) << "axis " << axis;
      }
  }
}

TEST(Preview, PanelsSideBySideWithWindowsAndLabelColours) {
  PhantomOptions o;
  o.seed = 4;
  o.dims = {96, 80, 64};
  o.spacing = {1.3, 1.5, 1.6};
  auto p = make_phantom(o);
  ASSERT_TRUE(p);
  FloatVolume hu;
  hu.dims = p->hu.dims;
  hu.data.assign(p->hu.data.begin(), p->hu.data.end());
  testing::TempDir dir;
  const std::string path = dir.file("preview.png");
  ASSERT_TRUE(write_mip_png(path, {{&hu, -200, 800, nullptr}, {nullptr, 0, 1, &p->labels}}, 2));
  const Rgb png = read_png(path);
  ASSERT_EQ(png.width, 2u * 96);
  ASSERT_EQ(png.height, 80u);
  const auto m = mip(hu, 2);
  const auto l = mip(p->labels, 2);
  size_t red = 0;
  for (size_t y = 0; y < 80; ++y)
    for (size_t x = 0; x < 96; ++x) {
      const double t = std::clamp((m[x + 96 * y] + 200.0) / 1000.0, 0.0, 1.0);
      ASSERT_EQ(png.at(x, y)[0], static_cast<uint8_t>(std::lround(t * 255))) << x << "," << y;
      ASSERT_EQ(png.at(96 + x, y), label_colour(l[x + 96 * y]));
      red += l[x + 96 * y] == kCoronary ? 1u : 0u;
    }
  EXPECT_GT(red, 50u) << "the coronaries show in the axial label MIP";
  // Coronal: the slow axis (z) is flipped so that superior is up.
  ASSERT_TRUE(write_mip_png(path, {{nullptr, 0, 1, &p->labels}}, 1));
  const Rgb coronal = read_png(path);
  ASSERT_EQ(coronal.width, 96u);
  ASSERT_EQ(coronal.height, 64u);
  const auto lc = mip(p->labels, 1);
  for (size_t x = 0; x < 96; ++x) ASSERT_EQ(coronal.at(x, 0), label_colour(lc[x + 96 * 63]));
}

TEST(Preview, BadPanelsAreNamedAndNothingIsWritten) {
  FloatVolume a, b;
  a.dims = {4, 4, 4};
  a.data.assign(64, 1);
  b.dims = {4, 4, 5};
  b.data.assign(80, 1);
  testing::TempDir dir;
  const std::string path = dir.file("p.png");
  EXPECT_NE(write_mip_png(path, {}, 2).error().message.find("no panels"), std::string::npos);
  EXPECT_NE(write_mip_png(path, {{&a, 1, 1, nullptr}}, 2).error().message.find("panel 0 has window"), std::string::npos);
  EXPECT_NE(write_mip_png(path, {{&a, 0, 1, nullptr}, {&b, 0, 1, nullptr}}, 2).error().message.find("panel 1"), std::string::npos);
  EXPECT_NE(write_mip_png(path, {{nullptr, 0, 1, nullptr}}, 2).error().message.find("needs a volume or labels"), std::string::npos);
  EXPECT_NE(write_mip_png(path, {{&a, 0, 1, nullptr}}, 3).error().message.find("axis 3"), std::string::npos);
  EXPECT_NE(::access(path.c_str(), F_OK), 0);
  EXPECT_FALSE(write_mip_png(dir.file("no/such/dir/p.png"), {{&a, 0, 1, nullptr}}, 2));
}

}  // namespace
}  // namespace tresor::ct
