#pragma once
#include <string>
#include <vector>

#include "core/npy.h"

namespace pkv::test {

std::string data_path(const std::string& rel);
// A path under the system temp folder unique to this process (ctest runs tests in parallel
// processes) and to the current test: <tmp>/pkv_<pid>_<test>_<tag>.
std::string temp_path(const std::string& tag);    // tests/data/<rel>
std::string shared_path(const std::string& rel);  // ../shared/<rel>
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

}  // namespace pkv::test
