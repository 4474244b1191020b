// libFuzzer target for the NIfTI reader on bytes (a sealed volume opens into memory and is parsed
// there): any input is either refused or gives a volume whose data matches its dimensions and
// whose NIfTI bytes read back to the same volume.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "tresor/ct/volume.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const tresor::ByteSpan in(reinterpret_cast<const std::byte*>(data), size);
  // Bounded work: a header may promise a huge volume; the reader refuses it unless the bytes are
  // there, so memory stays within the input's size (and 8 GiB of gzip output, which a 4 KiB input
  // cannot reach at zlib's ratio limit of about 1032:1).
  if (auto v = tresor::ct::read_nifti_hu(in, "fuzz.nii")) {
    if (v->data.size() != v->size()) std::abort();
    auto bytes = tresor::ct::nifti_bytes(*v);
    if (bytes) {
      auto again = tresor::ct::read_nifti_hu(*bytes, "again.nii");
      if (!again || again->data != v->data || again->dims != v->dims) std::abort();
    }
  }
  if (auto l = tresor::ct::read_nifti_labels(in, "fuzz.nii")) {
    if (l->data.size() != l->size()) std::abort();
  }
  return 0;
}
