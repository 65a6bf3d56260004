// libFuzzer target: a checkpoint's config.json (with preprocessor_config.json,
// generation_config.json and a separate vision tower's config.json), as load_config reads them.
// load_config takes a directory path only, so the files are written to /dev/shm per input. The
// input is split at NUL bytes: config.json [\0 preprocessor_config.json [\0 generation_config.json
// [\0 tower/config.json]]]; a file whose part is missing does not exist (a fourth part makes the
// tower folder the vision_tower_dir argument). Documented errors: pkv::Error.
#include <cstdint>
#include <filesystem>
#include <string>

#include "core/error.h"
#include "fuzz_util.h"
#include "io/config.h"

namespace {

std::string g_dir, g_tower;

void put(const std::string& path, const std::vector<std::string_view>& parts, size_t i) {
  std::error_code ec;
  if (i < parts.size()) pkv::fuzz::write_file(path, parts[i]);
  else std::filesystem::remove(path, ec);
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  g_dir = pkv::fuzz::temp_dir("config") + "/model";
  g_tower = pkv::fuzz::temp_dir("config") + "/tower";
  std::filesystem::create_directories(g_dir);
  std::filesystem::create_directories(g_tower);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto parts = pkv::fuzz::split_nul(data, size, 4);
  put(g_dir + "/config.json", parts, 0);
  put(g_dir + "/preprocessor_config.json", parts, 1);
  put(g_dir + "/generation_config.json", parts, 2);
  put(g_tower + "/config.json", parts, 3);
  pkv::fuzz::expect_only<pkv::Error>([&] {
    const pkv::ModelConfig c = pkv::load_config(g_dir, parts.size() > 3 ? g_tower : "");
    // What the model loader derives from an accepted config.
    volatile int64_t sink = 0;
    sink = sink + c.image_tokens() + c.text.head_dim + c.vision.grid();
    sink = sink + int64_t(std::string(pkv::layout_name(c.layout)).size());
    if (c.text.n_layers <= 0 || c.text.n_heads <= 0 || c.text.hidden <= 0 || c.text.n_kv_heads <= 0)
      pkv::fuzz::finding("load_config accepted a non-positive text size");
    if (c.text.n_heads % c.text.n_kv_heads != 0) pkv::fuzz::finding("load_config accepted n_heads % n_kv_heads != 0");
    if (c.has_vision && (c.vision.patch <= 0 || c.vision.image_size <= 0 || c.vision.n_heads <= 0))
      pkv::fuzz::finding("load_config accepted a non-positive vision size");
  });
  return 0;
}
