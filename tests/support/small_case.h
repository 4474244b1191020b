// A small prepared CCTA phantom shared by the training tests (data parallelism on CPUs and GPUs):
// 128 × 128 × 80 voxels at 1 mm, prepared at 1.4 mm with one Frangi scale — about a second to
// make, made once per test binary. nullptr (with the failure reported) if it fails. And the
// training options the data-parallel tests share.
#pragma once

#include <gtest/gtest.h>

#include <optional>

#include "tresor/ct/prep.h"
#include "tresor/train/trainer.h"

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

/// Three SGD steps on small_case() with a global batch of 4 patches of 16³: the data-parallel
/// equivalence tests' run (CPU and GPU). `deep`: a 3-level network with deep supervision, else a
/// 2-level one. SGD (nnU-Net's optimizer): AdamW would turn the rounding noise of gradients that
/// are exactly zero in theory (a conv's bias before instance norm) into steps of ±lr, hiding the
/// comparison.
inline train::TrainerOptions data_parallel_options(bool deep) {
  train::TrainerOptions o;
  o.model = deep ? train::UNetConfig{3, 4, 16, 2, 2, true} : train::UNetConfig{2, 4, 16, 2, 2};
  o.patch = 16;
  o.batch = 4;
  o.steps = 3;
  o.validate_every = 3;
  o.validation_patches = 3;  // uneven over 2 ranks
  o.threads = 1;
  o.adamw = false;
  return o;
}

}  // namespace tresor::testing
