#pragma once
#include <filesystem>
#include <string>
#include <vector>

#include "core/npy.h"
#include "model/model.h"
#include "text/tokenizer.h"

namespace pkv::test {

std::string data_path(const std::string& rel);
// A path under the system temp folder unique to this process (ctest runs tests in parallel
// processes) and to the current test: <tmp>/pkv_<pid>_<test>_<tag>.
std::string temp_path(const std::string& tag);    // tests/data/<rel>
std::string shared_path(const std::string& rel);  // ../shared/<rel> ($PREFIXKV_SHARED/<rel> when set)
// Max |a-b| / max|b| over all elements (relative to the reference's scale).
double rel_error(const float* a, const float* b, size_t n);
double max_abs_diff(const float* a, const float* b, size_t n);
// Runs a shell command, returns its exit status; stdout+stderr go to *output.
int run_command(const std::string& cmd, std::string* output);

// Runs the prefixkv program with `args`; exit status and stdout + stderr.
struct Result {
  int rc;
  std::string out;
};
Result prefixkv(const std::string& args);

// The bundled model (models/prefixkv-llava-tiny) and its tokenizer, loaded once per test program.
struct BundledModel {
  std::unique_ptr<Model> model;
  Tokenizer tok;
  BundledModel();
};
BundledModel& bundled_model();

// True when the environment says CI=true: there a test must not pass by skipping.
bool in_ci();

}  // namespace pkv::test

// Skips the test when what it needs is missing (`why` says what), except under CI=true, where the
// test fails instead: a CI run tests everything or says why not.
#define PKV_SKIP_UNLESS(condition, why)                                              \
  do {                                                                               \
    if (!(condition)) {                                                              \
      if (::pkv::test::in_ci()) FAIL() << "CI=true and " << why;                     \
      else GTEST_SKIP() << why;                                                      \
    }                                                                                \
  } while (0)
// The same for a file or folder under ../shared (the project's references).
#define PKV_NEED_PATH(path) PKV_SKIP_UNLESS(std::filesystem::exists(path), (path) << " is not present")
