#include "common.h"

#include "io/mapped_file.h"

#include "engine/make_backend.h"

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <sstream>
#include <unistd.h>

#include "core/error.h"
#include "io/mapped_file.h"

namespace fs = std::filesystem;

namespace pkv::cli {

std::string repo_dir() {
  char buf[4096];
  ssize_t n = ::readlink("/proc/self/exe", buf, sizeof buf - 1);
  if (n <= 0) return ".";
  buf[n] = 0;
  return fs::path(buf).parent_path().parent_path().string();
}

std::string default_model_dir() {
  if (const char* env = std::getenv("PREFIXKV_MODEL")) return env;
  return (fs::path(repo_dir()) / "models" / "prefixkv-llava-tiny").string();
}

OptionSpec no_mmap_option() {
  return {"no-mmap", "",
          "read the weights into memory (huge pages where possible) instead of mapping the files: a slower start, but "
          "decoding never waits for weights the kernel evicted from its page cache"};
}

void apply_no_mmap(const Args& args) { set_read_into_memory(args.has("no-mmap")); }

LoadedModel load_model(const Args& args, bool mmproj_input) {
  apply_no_mmap(args);
  const std::string dir = args.str("model", default_model_dir());
  if (!args.has("model") && !fs::exists(dir))
    fail("--model", "no model given and the bundled model is missing at " + dir);
  LoadOptions lo;
  lo.vision_tower_dir = args.str("vision-tower", "");
  if (mmproj_input) lo.mmproj = args.str("mmproj", "");
  return pkv::load_model(dir, lo);
}

std::vector<std::string> split_list(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string t;
  while (std::getline(ss, t, ','))
    if (!t.empty()) out.push_back(t);
  return out;
}

std::vector<double> parse_budgets(const std::string& s, const std::string& option) {
  std::vector<double> out;
  size_t start = 0;
  for (;;) {
    size_t comma = s.find(',', start);
    std::string tok = s.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
    try {
      size_t used = 0;
      double b = std::stod(tok, &used);
      if (used != tok.size() || !(b > 0 && b <= 1)) throw std::invalid_argument(tok);
      out.push_back(b);
    } catch (const std::exception&) {
      fail(option, "'" + tok + "' is not a budget in (0, 1]");
    }
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

DeviceChoice parse_device(const Args& args) {
  DeviceChoice d;
  d.device = args.str("device", "cpu");
  d.gpu_dtype = args.str("gpu-dtype", "");
  d.kv_dtype = args.str("kv-dtype", "");
  check_device_options(d.device, d.gpu_dtype, d.kv_dtype);
  d.cuda = d.device == "cuda";
  return d;
}

}  // namespace pkv::cli
