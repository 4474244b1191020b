// tresor phantom: a synthetic coronary CT angiography volume with its ground truth (issue 8,
// docs/preprocessing.md §1): ccta.nii (HU, int16), labels.nii (uint8, the Label values),
// centerlines.json (the coronary tree, radii in mm, the stenoses) and the same HU volume as a
// DICOM CT series in dicom/, deterministic in --seed.
#include <cstdio>
#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "cli.h"
#include "options.h"
#include "tresor/ct/volume.h"

namespace tresor::cli {
namespace {

// "512x512x256" or "0.39x0.39x0.625" → three numbers.
template <typename T>
Result<std::array<T, 3>> triple(const std::string& text, const char* what) {
  std::array<T, 3> out{};
  size_t at = 0;
  for (size_t i = 0; i < 3; ++i) {
    const size_t x = text.find('x', at);
    const std::string part = text.substr(at, i < 2 ? x - at : std::string::npos);
    if ((i < 2 && x == std::string::npos) || part.empty()) break;
    try {
      size_t used = 0;
      const double v = std::stod(part, &used);
      if (used != part.size()) break;
      out[i] = static_cast<T>(v);
      if (static_cast<double>(out[i]) != v) break;  // "512.5" voxels
    } catch (const std::exception&) {
      break;
    }
    if (i == 2) return out;
    at = x + 1;
  }
  return fail(ErrorCode::kInvalidArgument, std::string(what) + " wants three numbers joined by 'x' (e.g. " +
                                               (std::string(what) == "--size" ? "512x512x256" : "0.39x0.39x0.625") + "), not '" + text + "'");
}

}  // namespace

int cmd_phantom(int argc, char** argv) {
  po::options_description opts("Options");
  std::string out, size_text = "512x512x256", spacing_text = "0.39x0.39x0.625";
  uint64_t seed = 1;
  unsigned stenoses = 3;
  double noise = 18;
  bool no_dicom = false;
  opts.add_options()
      ("out,o", po::value(&out)->required(), "directory to write (created; existing files in it are replaced)")
      ("seed", po::value(&seed)->default_value(1), "the phantom's seed (same seed, same bytes)")
      ("size", po::value(&size_text)->default_value("512x512x256"), "voxels, XxYxZ (16..1024 each)")
      ("spacing", po::value(&spacing_text)->default_value("0.39x0.39x0.625"), "voxel size in mm, XxYxZ")
      ("stenoses", po::value(&stenoses)->default_value(3), "narrowings on the main vessels")
      ("noise", po::value(&noise)->default_value(18), "Gaussian noise, HU standard deviation")
      ("no-dicom", po::bool_switch(&no_dicom), "write NIfTI only, not the DICOM series in DIR/dicom");
  po::variables_map vm;
  if (auto stop = parse_options("phantom", "-o DIR [--seed N] [--size 512x512x256] [--spacing 0.39x0.39x0.625]", argc, argv, opts, {}, vm)) {
    return *stop;
  }
  auto size = triple<size_t>(size_text, "--size");
  if (!size) return usage_error("phantom", size.error().message);
  auto spacing = triple<double>(spacing_text, "--spacing");
  if (!spacing) return usage_error("phantom", spacing.error().message);
  ct::PhantomOptions o;
  o.seed = seed;
  o.dims = *size;
  o.spacing = *spacing;
  o.stenoses = stenoses;
  o.noise_hu = noise;
  auto p = ct::make_phantom(o);
  if (!p) return report(p.error());
  std::error_code ec;
  std::filesystem::create_directories(out, ec);
  if (ec) return report(Error{ErrorCode::kIo, "cannot create " + out + ": " + ec.message()});
  if (auto r = ct::write_nifti(out + "/ccta.nii", p->hu); !r) return report(r.error());
  if (auto r = ct::write_nifti(out + "/labels.nii", p->labels); !r) return report(r.error());
  if (!no_dicom) {
    if (auto r = ct::write_dicom_series(out + "/dicom", p->hu, "Tresor CCTA phantom, seed " + std::to_string(seed)); !r) return report(r.error());
  }
  nlohmann::json j = {{"seed", seed}, {"dims", o.dims}, {"spacing_mm", o.spacing}, {"vessels", nlohmann::json::array()},
                      {"stenoses", nlohmann::json::array()}};
  for (const auto& c : p->centerlines) {
    nlohmann::json pts = nlohmann::json::array();
    for (size_t i = 0; i < c.points.size(); i += 5) pts.push_back({c.points[i][0], c.points[i][1], c.points[i][2], c.radius[i]});
    j["vessels"].push_back({{"name", c.name}, {"points_mm_xyz_radius", pts}});
  }
  for (const auto& s : p->stenoses) j["stenoses"].push_back({{"vessel", s.vessel}, {"at_fraction", s.at}, {"radius_kept", s.remaining}});
  {
    std::ofstream f(out + "/centerlines.json");
    f << j.dump(1) << "\n";
    if (!f.flush()) return report(Error{ErrorCode::kIo, "cannot write " + out + "/centerlines.json"});
  }
  size_t coronary = 0;
  for (auto l : p->labels.data) coronary += l == ct::kCoronary ? 1 : 0;
  std::printf("tresor phantom: %zux%zux%zu voxels of %.3gx%.3gx%.3g mm, seed %llu: %s/ccta.nii, labels.nii, centerlines.json%s "
              "(%zu vessels, %zu stenoses, %zu coronary voxels)\n",
              o.dims[0], o.dims[1], o.dims[2], o.spacing[0], o.spacing[1], o.spacing[2], static_cast<unsigned long long>(seed), out.c_str(),
              no_dicom ? "" : ", dicom/",
              p->centerlines.size(), p->stenoses.size(), coronary);
  return kExitOk;
}

}  // namespace tresor::cli
