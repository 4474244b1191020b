// The preprocessing pipeline, CPU reference (include/tresor/ct/prep.h, docs/preprocessing.md §7).
#include "tresor/ct/prep.h"

namespace tresor::ct {

Result<Prepared> prepare(const HuVolume& hu, const LabelVolume* labels, const PrepOptions& o) {
  if (labels != nullptr && (labels->dims != hu.dims || labels->data.size() != hu.data.size())) {
    return fail(ErrorCode::kInvalidArgument, "prep: the labels are " + std::to_string(labels->dims[0]) + "×" + std::to_string(labels->dims[1]) + "×" +
                                                 std::to_string(labels->dims[2]) + ", the volume " + std::to_string(hu.dims[0]) + "×" +
                                                 std::to_string(hu.dims[1]) + "×" + std::to_string(hu.dims[2]));
  }
  if (o.frangi_sigmas_mm.empty()) return fail(ErrorCode::kInvalidArgument, "prep: no Frangi scale");
  LabelVolume fg;
  fg.dims = hu.dims;
  fg.data.resize(hu.data.size());
  for (size_t i = 0; i < hu.data.size(); ++i) fg.data[i] = hu.data[i] > o.foreground_hu ? 1 : 0;
  auto stats = ct_normalisation(hu, fg);
  if (!stats) return fail(ErrorCode::kInvalidArgument, "prep: no voxel above the foreground threshold " + std::to_string(o.foreground_hu) + " HU");
  auto iso = resample_linear(hu, {o.spacing, o.spacing, o.spacing}, o.threads);
  if (!iso) return std::unexpected(iso.error());
  auto win = window(*iso, o.window_lower, o.window_upper, o.threads);
  if (!win) return std::unexpected(win.error());
  FrangiOptions f;
  f.sigmas.clear();
  for (double s : o.frangi_sigmas_mm) f.sigmas.push_back(s / o.spacing);  // mm to voxels
  f.alpha = o.frangi_alpha;
  f.beta = o.frangi_beta;
  f.gamma = o.frangi_gamma;
  auto ves = frangi(*win, f, o.threads);
  if (!ves) return std::unexpected(ves.error());
  Prepared p;
  p.stats = *stats;
  p.image = normalise(*iso, *stats, o.threads);
  p.vesselness = std::move(*ves);
  if (labels != nullptr) {
    auto l = resample_nearest(*labels, {o.spacing, o.spacing, o.spacing}, o.threads);
    if (!l) return std::unexpected(l.error());
    p.labels = std::move(*l);
  }
  return p;
}

}  // namespace tresor::ct
