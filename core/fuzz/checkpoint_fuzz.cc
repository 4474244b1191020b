// libFuzzer target for the training checkpoint reader (docs/training.md §7): a checkpoint is a
// file the user hands to `tresor train --resume` and `tresor predict`. Any input is refused or
// gives a checkpoint whose model builds with its parameters and whose bytes, written again, read
// back to the same checkpoint. Memory stays bounded by the input: the model's size is computed
// from the header, not built, before the parameters are read.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "tresor/train/trainer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const tresor::ByteSpan in(reinterpret_cast<const std::byte*>(data), size);
  auto c = tresor::train::parse_checkpoint(in);
  if (!c) return 0;
  auto net = tresor::train::UNet::create(c->config, 0);
  if (!net || !net->set_parameters(c->parameters)) std::abort();
  const tresor::Bytes again = tresor::train::checkpoint_bytes(*net, c->state, c->adamw, c->patch);
  auto back = tresor::train::parse_checkpoint(again);
  // Bitwise: the reader refuses non-finite values, so no NaN can make equal bytes compare unequal.
  if (!back || back->parameters.size() != c->parameters.size() ||
      std::memcmp(back->parameters.data(), c->parameters.data(), c->parameters.size() * sizeof(float)) != 0 || back->patch != c->patch || back->adamw != c->adamw || back->state.step != c->state.step ||
      back->config.deep_supervision != c->config.deep_supervision || back->config.levels != c->config.levels) {
    std::abort();
  }
  return 0;
}
