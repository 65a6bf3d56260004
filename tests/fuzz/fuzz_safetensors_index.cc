// libFuzzer target: a sharded checkpoint's model.safetensors.index.json, as TensorStore::open reads
// it from a directory. The input is the index; the folder holds two small valid shards
// (model-00001-of-00002.safetensors with tensors "a" and "b", model-00002-of-00002.safetensors with
// "c") that the index may name. The reader takes a directory path only, so the index is written to
// a file in /dev/shm per input. Documented errors: pkv::Error.
#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "fuzz_util.h"
#include "io/safetensors.h"

namespace {

std::string g_dir;

std::string shard(const nlohmann::json& header, size_t data_bytes) {
  const std::string h = header.dump();
  const uint64_t n = h.size();
  std::string out(reinterpret_cast<const char*>(&n), 8);
  return out + h + std::string(data_bytes, '\x01');
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  using nlohmann::json;
  g_dir = pkv::fuzz::temp_dir("safetensors-index");
  pkv::fuzz::write_file(g_dir + "/model-00001-of-00002.safetensors",
                        shard({{"a", {{"dtype", "F32"}, {"shape", {2}}, {"data_offsets", {0, 8}}}},
                               {"b", {{"dtype", "BF16"}, {"shape", {2, 2}}, {"data_offsets", {8, 16}}}},
                               {"__metadata__", {{"format", "pt"}}}},
                              16));
  pkv::fuzz::write_file(g_dir + "/model-00002-of-00002.safetensors",
                        shard({{"c", {{"dtype", "F16"}, {"shape", {3}}, {"data_offsets", {0, 6}}}}}, 6));
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  pkv::fuzz::write_file(g_dir + "/model.safetensors.index.json", data, size);
  pkv::fuzz::expect_only<pkv::Error>([&] {
    auto store = pkv::TensorStore::open(g_dir);
    for (const auto& [name, t] : store->all())
      if (!t || t->name != name) pkv::fuzz::finding("tensor '" + name + "' is indexed wrongly");
  });
  return 0;
}
