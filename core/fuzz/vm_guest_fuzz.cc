// libFuzzer target for what a job's VM reads that the host or an image supplies
// (include/tresor/vm/control.h, image.h): the control channel's start message and its other
// payloads — the guest parses them from an untrusted host — and the initramfs and image.json
// readers. Nothing may crash; whatever parses must round-trip.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "tresor/vm/control.h"
#include "tresor/vm/image.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const tresor::ByteSpan in(reinterpret_cast<const std::byte*>(data), size);
  namespace control = tresor::vm::control;
  if (auto s = control::decode_start(in)) {
    auto again = control::decode_start(control::encode_start(*s));
    if (!again || again->command != s->command || again->env != s->env || again->script != s->script) std::abort();
  }
  if (auto e = control::decode_evidence(in)) {
    const tresor::Bytes back = control::encode_evidence(*e);
    if (back.size() != size) std::abort();
  }
  if (auto x = control::decode_exit(in)) {
    auto again = control::decode_exit(control::encode_exit(*x));
    if (!again || *again != *x) std::abort();
  }
  (void)control::decode_connection(in);
  if (auto entries = tresor::vm::parse_cpio_newc(in)) (void)tresor::vm::cpio_newc(*entries);
  (void)tresor::vm::parse_image_manifest(std::string(reinterpret_cast<const char*>(data), size));
  (void)tresor::vm::module_load_order(std::string(reinterpret_cast<const char*>(data), size), {"virtio_pci"});
  return 0;
}
