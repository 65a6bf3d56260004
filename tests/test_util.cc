#include "test_util.h"

#include <array>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <sys/wait.h>
#include <unistd.h>

#include <gtest/gtest.h>

namespace pkv::test {

std::string data_path(const std::string& rel) { return std::string(PKV_TEST_DATA) + "/" + rel; }
std::string shared_path(const std::string& rel) {
  // The project's references sit in ../shared beside the checkout; PREFIXKV_SHARED names them when
  // the checkout is elsewhere (.ci/run sets it for a clone made outside the workspace).
  const char* env = std::getenv("PREFIXKV_SHARED");
  return std::string(env && *env ? env : PKV_SHARED) + "/" + rel;
}

bool in_ci() {
  const char* ci = std::getenv("CI");
  return ci && std::string(ci) == "true";
}

namespace {
// Removes this process's temp paths when the test program exits.
struct TempCleanup {
  ~TempCleanup() {
    std::error_code ec;
    const std::string prefix = "pkv_" + std::to_string(::getpid()) + "_";
    for (auto& e : std::filesystem::directory_iterator(std::filesystem::temp_directory_path(), ec))
      if (e.path().filename().string().rfind(prefix, 0) == 0) std::filesystem::remove_all(e.path(), ec);
  }
} temp_cleanup;
}  // namespace

std::string temp_path(const std::string& tag) {
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  std::string test = info ? std::string(info->test_suite_name()) + "." + info->name() : "global";
  for (auto& c : test)
    if (c == '/') c = '_';
  return (std::filesystem::temp_directory_path() / ("pkv_" + std::to_string(::getpid()) + "_" + test + "_" + tag)).string();
}

double rel_error(const float* a, const float* b, size_t n) {
  double num = 0, den = 0;
  for (size_t i = 0; i < n; ++i) {
    num = std::max(num, std::fabs(double(a[i]) - double(b[i])));
    den = std::max(den, std::fabs(double(b[i])));
  }
  return den > 0 ? num / den : num;
}

double max_abs_diff(const float* a, const float* b, size_t n) {
  double m = 0;
  for (size_t i = 0; i < n; ++i) m = std::max(m, std::fabs(double(a[i]) - double(b[i])));
  return m;
}

int run_command(const std::string& cmd, std::string* output) {
  std::string full = cmd + " 2>&1";
  FILE* p = popen(full.c_str(), "r");
  if (!p) return -1;
  std::array<char, 4096> buf;
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), p)) > 0)
    if (output) output->append(buf.data(), n);
  int st = pclose(p);
  return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

Result prefixkv(const std::string& args) {
  Result r;
  r.rc = run_command(std::string(PKV_BINARY) + " " + args, &r.out);
  return r;
}

BundledModel::BundledModel()
    : model(Model::load(std::string(PKV_SOURCE_DIR) + "/models/prefixkv-llava-tiny")),
      tok(std::string(PKV_SOURCE_DIR) + "/models/prefixkv-llava-tiny/tokenizer.model") {}

BundledModel& bundled_model() {
  static BundledModel b;
  return b;
}

}  // namespace pkv::test
