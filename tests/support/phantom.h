// tests/support/phantom.h — a CCTA phantom (tresor/ct/volume.h) of a seed, dimensions and spacing,
// for the CT and GPU tests. A failure is reported to GoogleTest and an empty phantom returned.
#pragma once

#include <gtest/gtest.h>

#include <array>
#include <cstdint>

#include "tresor/ct/volume.h"

namespace tresor::testing {

inline ct::Phantom phantom(uint64_t seed, std::array<size_t, 3> dims, std::array<double, 3> spacing) {
  ct::PhantomOptions o;
  o.seed = seed;
  o.dims = dims;
  o.spacing = spacing;
  auto p = ct::make_phantom(o);
  if (!p) {
    ADD_FAILURE() << "make_phantom: " << p.error().message;
    return {};
  }
  return std::move(*p);
}

}  // namespace tresor::testing
