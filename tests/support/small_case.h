// A small prepared CCTA phantom shared by the training tests (data parallelism on CPUs and GPUs):
// 128 × 128 × 80 voxels at 1 mm, prepared at 1.4 mm with one Frangi scale — about a second to
// make, made once per test binary. nullptr (with the failure reported) if it fails.
#pragma once

#include <gtest/gtest.h>

#include <optional>

#include "tresor/ct/prep.h"

namespace tresor::testing {

inline const ct::Prepared* small_case() {
  static const std::optional<ct::Prepared> p = []() -> std::optional<ct::Prepared> {
    ct::PhantomOptions o;
    o.seed = 4;
    o.dims = {128, 128, 80};
    o.spacing = {1.0, 1.0, 1.0};
    auto ph = ct::make_phantom(o);
    if (!ph) {
      ADD_FAILURE() << ph.error().message;
      return std::nullopt;
    }
    ct::PrepOptions po;
    po.spacing = 1.4;
    po.frangi_sigmas_mm = {1.4};
    auto r = ct::prepare(ph->hu, &ph->labels, po);
    if (!r) {
      ADD_FAILURE() << r.error().message;
      return std::nullopt;
    }
    return std::move(*r);
  }();
  return p ? &*p : nullptr;
}

}  // namespace tresor::testing
