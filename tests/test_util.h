#pragma once
#include <string>
#include <vector>

#include "core/npy.h"

namespace pkv::test {

std::string data_path(const std::string& rel);    // tests/data/<rel>
std::string shared_path(const std::string& rel);  // ../shared/<rel>
// Max |a-b| / max|b| over all elements (relative to the reference's scale).
double rel_error(const float* a, const float* b, size_t n);
double max_abs_diff(const float* a, const float* b, size_t n);
// Runs a shell command, returns its exit status; stdout+stderr go to *output.
int run_command(const std::string& cmd, std::string* output);

}  // namespace pkv::test
