// DICOM CT series in and out (include/tresor/ct/volume.h), through GDCM: it decodes every
// transfer syntax Debian's build supports (JPEG 2000 included) and writes the pixel and image
// plane modules. Tresor checks what makes a series one volume: one series, one size, axial
// orientation, positions along the slice normal evenly spaced.
#include <gdcmAttribute.h>
#include <gdcmImageReader.h>
#include <gdcmImageWriter.h>
#include <gdcmSequenceOfFragments.h>
#include <gdcmTrace.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <istream>
#include <memory>
#include <streambuf>

#include "tresor/crypto.h"
#include "tresor/ct/nifti_hd.h"
#include "tresor/ct/volume.h"
#include "tresor/encoding.h"
#include "tresor/io.h"
#include "tresor/sealed.h"
#include "tresor/secret.h"

namespace tresor::ct {
namespace {

namespace fs = std::filesystem;

struct Slice {
  std::string file;
  std::string series;
  double position = 0;  // along the slice normal, mm
  std::array<double, 3> ipp{};
  std::array<double, 6> iop{};
  std::array<double, 2> spacing{};
  unsigned cols = 0, rows = 0;
  std::vector<int16_t> hu;
};

std::string tag_string(const gdcm::DataSet& ds, uint16_t group, uint16_t element) {
  const gdcm::Tag t(group, element);
  if (!ds.FindDataElement(t)) return {};
  const gdcm::ByteValue* bv = ds.GetDataElement(t).GetByteValue();
  if (bv == nullptr) return {};
  std::string s(bv->GetPointer(), bv->GetLength());
  while (!s.empty() && (s.back() == ' ' || s.back() == '\0')) s.pop_back();
  return s;
}

// A read-only stream over bytes in memory (an opened sealed slice), so that GDCM parses the
// plaintext where it is instead of from a copy.
class MemoryBuf final : public std::streambuf {
 public:
  MemoryBuf(const std::byte* data, size_t size) {
    char* p = const_cast<char*>(reinterpret_cast<const char*>(data));
    setg(p, p, p + size);
  }

 protected:
  pos_type seekoff(off_type off, std::ios_base::seekdir dir, std::ios_base::openmode which) override {
    if ((which & std::ios_base::in) == 0) return pos_type(off_type(-1));
    const off_type base = dir == std::ios_base::beg ? 0 : dir == std::ios_base::cur ? gptr() - eback() : egptr() - eback();
    const off_type to = base + off;
    if (to < 0 || to > egptr() - eback()) return pos_type(off_type(-1));
    setg(eback(), eback() + to, egptr());
    return pos_type(to);
  }
  pos_type seekpos(pos_type pos, std::ios_base::openmode which) override { return seekoff(off_type(pos), std::ios_base::beg, which); }
};

// Wipes the pixel bytes GDCM holds for one data element: a plain value, or the fragments of
// encapsulated (compressed) pixel data. GDCM hands these out const; they are heap copies owned by
// the reader, which is about to be destroyed.
void wipe_pixels(const gdcm::DataElement& de) {
  if (de.IsEmpty()) return;
  if (const gdcm::ByteValue* bv = de.GetByteValue(); bv != nullptr && bv->GetLength() > 0) {
    secure_wipe({reinterpret_cast<std::byte*>(const_cast<char*>(bv->GetPointer())), bv->GetLength()});
  }
  if (const gdcm::SequenceOfFragments* frags = de.GetSequenceOfFragments(); frags != nullptr) {
    for (unsigned i = 0; i < frags->GetNumberOfFragments(); ++i) wipe_pixels(frags->GetFragment(i));
  }
}

// Wipes every copy of a slice's pixels left behind by read_slice: GDCM's pixel data (in the
// image and in the data set, which may share one buffer) and the decoded buffer. A sealed
// slice's plaintext is in a SecretBuffer already; this covers what GDCM copied out of it.
struct PixelWiper {
  gdcm::ImageReader& reader;
  std::vector<char>& decoded;
  ~PixelWiper() {
    wipe_pixels(reader.GetImage().GetDataElement());
    const gdcm::DataSet& ds = reader.GetFile().GetDataSet();
    if (const gdcm::Tag pixel_data(0x7fe0, 0x0010); ds.FindDataElement(pixel_data)) wipe_pixels(ds.GetDataElement(pixel_data));
    if (!decoded.empty()) secure_wipe({reinterpret_cast<std::byte*>(decoded.data()), decoded.size()});
  }
};

bool is_sealed_name(const std::string& file) { return file.size() > 7 && file.compare(file.size() - 7, 7, ".sealed") == 0; }

Result<Slice> read_slice(const std::string& file, const sealed::KeyRing* keys) {
  SecretBuffer plain;
  std::unique_ptr<MemoryBuf> buf;
  std::unique_ptr<std::istream> in;
  gdcm::ImageReader r;  // after the stream it may read from, so that it goes first
  std::vector<char> raw;
  const PixelWiper wiper{r, raw};  // after the reader and the buffer, so that it runs before both go
  if (is_sealed_name(file)) {
    // A sealed slice: opened into memory (every chunk verified first), parsed from there.
    if (keys == nullptr) return fail(ErrorCode::kNoMatchingKey, file + ": sealed, and no identity or key was given to open it");
    auto bytes = read_small_file(file, size_t{1} << 30);
    if (!bytes) return std::unexpected(bytes.error());
    sealed::OpenOptions o;
    o.name = file;
    auto opened = sealed::open_buffer(as_bytes(*bytes), *keys, o);
    if (!opened) return std::unexpected(opened.error());
    plain = std::move(*opened);
    buf = std::make_unique<MemoryBuf>(plain.data(), plain.size());
    in = std::make_unique<std::istream>(buf.get());
    r.SetStream(*in);
  } else {
    r.SetFileName(file.c_str());
  }
  if (!r.Read()) return fail(ErrorCode::kMalformed, file + ": not a DICOM image GDCM can read");
  const gdcm::Image& im = r.GetImage();
  const gdcm::DataSet& ds = r.GetFile().GetDataSet();
  Slice s;
  s.file = file;
  s.series = tag_string(ds, 0x0020, 0x000e);
  if (im.GetNumberOfDimensions() != 2 || (im.GetNumberOfDimensions() == 3 && im.GetDimension(2) != 1)) {
    return fail(ErrorCode::kMalformed, file + ": a multi-frame image; only one slice per file is supported");
  }
  if (!ds.FindDataElement(gdcm::Tag(0x0020, 0x0032)) || !ds.FindDataElement(gdcm::Tag(0x0020, 0x0037))) {
    return fail(ErrorCode::kMalformed, file + ": no ImagePositionPatient or ImageOrientationPatient (0020,0032/0037): cannot place the slice");
  }
  s.cols = im.GetDimension(0);
  s.rows = im.GetDimension(1);
  for (unsigned i = 0; i < 3; ++i) s.ipp[i] = im.GetOrigin(i);
  for (unsigned i = 0; i < 6; ++i) s.iop[i] = im.GetDirectionCosines(i);
  s.spacing = {im.GetSpacing(0), im.GetSpacing(1)};
  const gdcm::PixelFormat pf = im.GetPixelFormat();
  if (pf.GetSamplesPerPixel() != 1) return fail(ErrorCode::kMalformed, file + ": not a grey-scale image");
  raw.resize(im.GetBufferLength());
  if (!im.GetBuffer(raw.data())) return fail(ErrorCode::kMalformed, file + ": its pixel data cannot be decoded");
  const size_t n = size_t{s.cols} * s.rows;
  // HU by the NIfTI reader's rule (nifti_hd.h): scaled, not finite → 0, clamped, rounded half
  // away from zero.
  nifti_hd::Decode scale;
  scale.slope = im.GetSlope();
  scale.inter = im.GetIntercept();
  s.hu.resize(n);
  auto put = [&](auto* px) {
    for (size_t i = 0; i < n; ++i) s.hu[i] = nifti_hd::hu_value(static_cast<double>(px[i]), scale);
  };
  const size_t bytes = pf.GetPixelSize();
  if (raw.size() < n * bytes) return fail(ErrorCode::kMalformed, file + ": pixel data shorter than its rows and columns");
  switch (pf.GetScalarType()) {
    case gdcm::PixelFormat::INT16: put(reinterpret_cast<const int16_t*>(raw.data())); break;
    case gdcm::PixelFormat::UINT16: put(reinterpret_cast<const uint16_t*>(raw.data())); break;
    case gdcm::PixelFormat::INT8: put(reinterpret_cast<const int8_t*>(raw.data())); break;
    case gdcm::PixelFormat::UINT8: put(reinterpret_cast<const uint8_t*>(raw.data())); break;
    case gdcm::PixelFormat::INT32: put(reinterpret_cast<const int32_t*>(raw.data())); break;
    case gdcm::PixelFormat::UINT32: put(reinterpret_cast<const uint32_t*>(raw.data())); break;
    default: return fail(ErrorCode::kMalformed, file + ": pixel format " + std::string(pf.GetScalarTypeAsString()) + " is not supported");
  }
  const std::array<double, 3> normal{s.iop[1] * s.iop[5] - s.iop[2] * s.iop[4], s.iop[2] * s.iop[3] - s.iop[0] * s.iop[5],
                                     s.iop[0] * s.iop[4] - s.iop[1] * s.iop[3]};
  s.position = s.ipp[0] * normal[0] + s.ipp[1] * normal[1] + s.ipp[2] * normal[2];
  return s;
}

std::string fmt(double v) {
  char b[32];
  std::snprintf(b, sizeof b, "%.4g", v);
  return b;
}

// A DICOM UID under 2.25 (an integer from a UUID-like 128-bit value, ITU-T X.667), here the
// first 128 bits of SHA-256 of `what`, so that the phantom's series is deterministic too.
std::string uid_of(const std::string& what) {
  auto d = crypto::sha256(as_bytes(what));
  unsigned __int128 v = 0;
  for (size_t i = 0; i < 16; ++i) v = (v << 8) | std::to_integer<unsigned>((*d)[i]);
  std::string digits;
  do {
    digits.insert(digits.begin(), static_cast<char>('0' + static_cast<int>(v % 10)));
    v /= 10;
  } while (v != 0);
  return "2.25." + digits;
}

}  // namespace

Result<HuVolume> read_dicom_series(const std::string& dir, const sealed::KeyRing* keys) {
  gdcm::Trace::WarningOff();  // GDCM's own warnings go to stderr; Tresor reports what matters itself
  std::vector<std::string> files;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    if (e.is_regular_file()) files.push_back(e.path().string());
  }
  if (ec) return fail(ErrorCode::kIo, dir + ": " + ec.message());
  std::sort(files.begin(), files.end());
  if (files.empty()) return fail(ErrorCode::kInvalidArgument, dir + ": no files");
  std::vector<Slice> slices;
  for (const auto& f : files) {
    auto s = read_slice(f, keys);
    if (!s) return std::unexpected(s.error());
    slices.push_back(std::move(*s));
  }
  const Slice& first = slices.front();
  for (const Slice& s : slices) {
    if (s.series != first.series) return fail(ErrorCode::kInvalidArgument, dir + ": more than one series (" + first.series + " and " + s.series + " in " + s.file + ")");
    if (s.cols != first.cols || s.rows != first.rows) {
      return fail(ErrorCode::kInvalidArgument, s.file + ": " + std::to_string(s.cols) + "×" + std::to_string(s.rows) + ", not " +
                                                   std::to_string(first.cols) + "×" + std::to_string(first.rows) + " like the others");
    }
    for (size_t i = 0; i < 6; ++i) {
      const double want = i == 0 || i == 4 ? 1.0 : 0.0;
      if (std::abs(s.iop[i] - want) > 1e-3) {
        return fail(ErrorCode::kInvalidArgument, s.file + ": ImageOrientationPatient is not axial (1\\0\\0\\0\\1\\0); oblique and other orientations are not supported");
      }
    }
    if (std::abs(s.spacing[0] - first.spacing[0]) > 1e-4 || std::abs(s.spacing[1] - first.spacing[1]) > 1e-4) {
      return fail(ErrorCode::kInvalidArgument, s.file + ": PixelSpacing differs from the series' first slice");
    }
  }
  std::sort(slices.begin(), slices.end(), [](const Slice& a, const Slice& b) { return a.position < b.position; });
  double dz = 1;
  if (slices.size() > 1) {
    dz = slices[1].position - slices[0].position;
    for (size_t i = 1; i < slices.size(); ++i) {
      const double gap = slices[i].position - slices[i - 1].position;
      if (gap < 1e-3) return fail(ErrorCode::kInvalidArgument, dir + ": " + slices[i - 1].file + " and " + slices[i].file + " are at the same position");
      if (std::abs(gap - dz) > std::max(0.01, 0.01 * dz)) {
        return fail(ErrorCode::kInvalidArgument, dir + ": uneven slice gaps: " + fmt(gap) + " mm between " + fs::path(slices[i - 1].file).filename().string() +
                                                     " and " + fs::path(slices[i].file).filename().string() + ", " + fmt(dz) +
                                                     " mm between the first two slices (missing slices?)");
      }
    }
  }
  HuVolume v;
  v.dims = {first.cols, first.rows, slices.size()};
  v.spacing = {first.spacing[0], first.spacing[1], dz};
  v.origin = slices.front().ipp;
  v.data.reserve(v.size());
  for (const Slice& s : slices) v.data.insert(v.data.end(), s.hu.begin(), s.hu.end());
  return v;
}

Result<void> write_dicom_series(const std::string& dir, const HuVolume& v, const std::string& description) {
  gdcm::Trace::WarningOff();
  if (v.data.size() != v.size() || v.size() == 0) return fail(ErrorCode::kInvalidArgument, dir + ": the volume is empty or its data does not match its dimensions");
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) return fail(ErrorCode::kIo, "cannot create " + dir + ": " + ec.message());
  // Deterministic identifiers: the same volume and description give the same series.
  auto digest = crypto::sha256(ByteSpan(reinterpret_cast<const std::byte*>(v.data.data()), v.data.size() * 2));
  if (!digest) return std::unexpected(digest.error());
  const std::string id = description + "/" + to_hex(*digest);
  const std::string study = uid_of(id + "/study"), series = uid_of(id + "/series"), frame = uid_of(id + "/frame");
  for (size_t z = 0; z < v.dims[2]; ++z) {
    gdcm::ImageWriter w;
    gdcm::Image& im = w.GetImage();
    im.SetNumberOfDimensions(2);
    im.SetDimension(0, static_cast<unsigned>(v.dims[0]));
    im.SetDimension(1, static_cast<unsigned>(v.dims[1]));
    im.SetPhotometricInterpretation(gdcm::PhotometricInterpretation::MONOCHROME2);
    im.SetPixelFormat(gdcm::PixelFormat::INT16);
    im.SetSpacing(0, v.spacing[0]);
    im.SetSpacing(1, v.spacing[1]);
    im.SetSpacing(2, v.spacing[2]);
    // Per component: the array form keeps only as many as the image has dimensions (2).
    im.SetOrigin(0, v.origin[0]);
    im.SetOrigin(1, v.origin[1]);
    im.SetOrigin(2, v.origin[2] + static_cast<double>(z) * v.spacing[2]);
    const double cosines[6] = {1, 0, 0, 0, 1, 0};
    im.SetDirectionCosines(cosines);
    im.SetIntercept(0);
    im.SetSlope(1);
    gdcm::DataElement pixels(gdcm::Tag(0x7fe0, 0x0010));
    pixels.SetByteValue(reinterpret_cast<const char*>(v.data.data() + z * v.dims[0] * v.dims[1]),
                        static_cast<uint32_t>(v.dims[0] * v.dims[1] * sizeof(int16_t)));
    im.SetDataElement(pixels);
    gdcm::DataSet& ds = w.GetFile().GetDataSet();
    auto put = [&](uint16_t g, uint16_t e, const std::string& value, gdcm::VR vr) {
      gdcm::DataElement de(gdcm::Tag(g, e));
      de.SetVR(vr);
      std::string padded = value;
      if (padded.size() % 2 != 0) padded.push_back(vr == gdcm::VR::UI ? '\0' : ' ');
      de.SetByteValue(padded.data(), static_cast<uint32_t>(padded.size()));
      ds.Replace(de);
    };
    put(0x0008, 0x0016, "1.2.840.10008.5.1.4.1.1.2", gdcm::VR::UI);  // CT Image Storage
    put(0x0008, 0x0018, uid_of(id + "/" + std::to_string(z)), gdcm::VR::UI);
    put(0x0008, 0x0060, "CT", gdcm::VR::CS);
    // Fixed, so that GDCM does not stamp the write time (a phantom has no study date).
    put(0x0008, 0x0020, "20000101", gdcm::VR::DA);
    put(0x0008, 0x0030, "000000", gdcm::VR::TM);
    put(0x0008, 0x103e, description, gdcm::VR::LO);
    put(0x0010, 0x0010, "Tresor^Phantom", gdcm::VR::PN);
    put(0x0010, 0x0020, "TRESOR-PHANTOM", gdcm::VR::LO);
    put(0x0020, 0x000d, study, gdcm::VR::UI);
    put(0x0020, 0x000e, series, gdcm::VR::UI);
    put(0x0020, 0x0052, frame, gdcm::VR::UI);
    put(0x0020, 0x0013, std::to_string(z + 1), gdcm::VR::IS);
    put(0x0018, 0x0050, fmt(v.spacing[2]), gdcm::VR::DS);
    char name[32];
    std::snprintf(name, sizeof name, "slice-%04zu.dcm", z);
    const std::string path = (fs::path(dir) / name).string();
    const std::string temp = path + ".tmp";
    w.SetFileName(temp.c_str());
    if (!w.Write()) {
      fs::remove(temp, ec);
      return fail(ErrorCode::kIo, "cannot write " + path);
    }
    fs::rename(temp, path, ec);
    if (ec) return fail(ErrorCode::kIo, "cannot write " + path + ": " + ec.message());
  }
  return {};
}

}  // namespace tresor::ct
