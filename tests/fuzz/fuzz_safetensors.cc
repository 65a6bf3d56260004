// libFuzzer target: one .safetensors file (8-byte header length, JSON header, data section) as
// TensorStore::open reads it. The reader takes paths only (it memory-maps the file), so each input
// is written to a file in /dev/shm first. Documented errors: pkv::Error.
#include <cstdint>
#include <cstring>
#include <string>

#include "core/error.h"
#include "fuzz_util.h"
#include "io/safetensors.h"

namespace {

size_t stored_size(const std::string& t) {
  if (t == "F64" || t == "I64" || t == "U64") return 8;
  if (t == "F32" || t == "I32" || t == "U32") return 4;
  if (t == "F16" || t == "BF16" || t == "I16" || t == "U16") return 2;
  return 1;
}

std::string g_path;

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  g_path = pkv::fuzz::temp_dir("safetensors") + "/model.safetensors";
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  pkv::fuzz::write_file(g_path, data, size);
  pkv::fuzz::expect_only<pkv::Error>([&] {
    auto store = pkv::TensorStore::open(g_path);
    uint64_t hlen = 0;
    std::memcpy(&hlen, data, 8);  // open() succeeded: the file has a header
    const uint64_t data_section = size - 8 - hlen;
    uint64_t total = 0;
    for (const auto& [name, t] : store->all()) {
      if (t->name != name) pkv::fuzz::finding("tensor '" + name + "' is indexed under another name");
      // Every tensor lies inside the data section, and reading all of it is in bounds.
      uint64_t n = 1;
      for (int64_t d : t->shape) {
        if (d < 0) pkv::fuzz::finding("tensor '" + name + "' has a negative dimension");
        if (d != 0 && n > data_section / uint64_t(d)) pkv::fuzz::finding("tensor '" + name + "' is larger than the file");
        n *= uint64_t(d);
      }
      const uint64_t bytes = n * stored_size(t->dtype_str);
      if (bytes > data_section) pkv::fuzz::finding("tensor '" + name + "' is larger than the data section");
      if (int64_t(n) != t->numel()) pkv::fuzz::finding("tensor '" + name + "': numel() disagrees with its shape");
      const auto* p = static_cast<const volatile uint8_t*>(t->data);
      uint8_t acc = 0;
      for (uint64_t i = 0; i < bytes; ++i) acc ^= p[i];
      total += acc;
    }
    (void)total;
  });
  return 0;
}
