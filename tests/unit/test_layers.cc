// The layers of docs/ARCHITECTURE.md, checked on the source: every project header a file includes
// belongs to its own folder or to an earlier layer; nothing above the backend seam (engine and the
// layers after it) includes a header of the CUDA back end or tests PREFIXKV_HAVE_CUDA, except the
// one device switch (src/engine/make_backend.cc) and the files that ARE the CUDA back end.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <regex>
#include <string>
#include <vector>

namespace fs = std::filesystem;

namespace {

// core; io, text, vision, ops (CPU and CUDA kernels); kv; model; engine; eval; serve; apps.
const std::map<std::string, int> kLayer = {{"core", 0}, {"io", 1},    {"text", 2},   {"vision", 3},
                                           {"ops", 4},  {"kv", 5},    {"model", 6},  {"engine", 7},
                                           {"eval", 8}, {"serve", 9}, {"apps", 10}};

// The CUDA back end: headers that name it (they hold no CUDA types, but only the back end and the
// device switch may use them).
bool is_cuda_backend_header(const std::string& inc) {
  return inc.rfind("ops/cuda/", 0) == 0 || inc == "model/gpu_model.h" || inc == "engine/gpu_session.h" ||
         inc == "engine/cuda_backend.h";
}
bool is_cuda_backend_file(const std::string& rel) {
  return rel.rfind("src/ops/cuda/", 0) == 0 || rel.rfind("src/model/gpu_model.", 0) == 0 ||
         rel.rfind("src/engine/gpu_session.", 0) == 0 || rel.rfind("src/engine/cuda_backend.", 0) == 0;
}

struct Source {
  std::string rel, folder;
  std::vector<std::string> includes;
  bool tests_have_cuda = false;
};

std::vector<Source> sources() {
  const fs::path root(PKV_SOURCE_DIR);
  const std::regex inc(R"(^\s*#\s*include\s+"([^"]+)\")");
  std::vector<Source> out;
  for (const char* top : {"src", "apps"})
    for (const auto& e : fs::recursive_directory_iterator(root / top)) {
      const std::string ext = e.path().extension().string();
      if (!e.is_regular_file() || (ext != ".h" && ext != ".cc" && ext != ".cu" && ext != ".cuh")) continue;
      Source s;
      s.rel = fs::relative(e.path(), root).generic_string();
      s.folder = std::string(top) == "apps" ? "apps" : s.rel.substr(4, s.rel.find('/', 4) - 4);
      std::ifstream f(e.path());
      for (std::string line; std::getline(f, line);) {
        std::smatch m;
        if (std::regex_search(line, m, inc)) s.includes.push_back(m[1]);
        if (line.find("PREFIXKV_HAVE_CUDA") != std::string::npos) s.tests_have_cuda = true;
      }
      out.push_back(std::move(s));
    }
  return out;
}

}  // namespace

TEST(Layers, IncludesGoToTheSameOrAnEarlierLayer) {
  const std::vector<Source> all = sources();
  ASSERT_GT(all.size(), 50u) << "the source tree was not found at " << PKV_SOURCE_DIR;
  int checked = 0;
  for (const Source& s : all) {
    ASSERT_TRUE(kLayer.count(s.folder)) << s.rel << ": folder '" << s.folder << "' is not a layer of docs/ARCHITECTURE.md";
    for (const std::string& inc : s.includes) {
      const size_t slash = inc.find('/');
      if (slash == std::string::npos) continue;  // the app's own headers ("args.h")
      const std::string folder = inc.substr(0, slash);
      if (!kLayer.count(folder)) continue;  // not a project header
      ++checked;
      EXPECT_LE(kLayer.at(folder), kLayer.at(s.folder)) << s.rel << " includes " << inc << " of a later layer";
    }
  }
  EXPECT_GT(checked, 200);
}

TEST(Layers, NothingAboveTheSeamNamesTheCudaBackEnd) {
  for (const Source& s : sources()) {
    // Below the seam (ops, kv, model) the CUDA kernels may be used; above it only through it.
    if (kLayer.at(s.folder) < kLayer.at("engine")) continue;
    if (is_cuda_backend_file(s.rel)) continue;
    const bool device_switch = s.rel == "src/engine/make_backend.cc";
    for (const std::string& inc : s.includes) {
      if (is_cuda_backend_header(inc)) {
        EXPECT_TRUE(device_switch && inc == "engine/cuda_backend.h") << s.rel << " includes " << inc;
      }
    }
    EXPECT_TRUE(!s.tests_have_cuda || device_switch) << s.rel << " tests PREFIXKV_HAVE_CUDA";
  }
}
