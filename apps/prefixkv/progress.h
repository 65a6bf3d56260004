// Progress of the data commands (calibrate, eval) on stderr.
#pragma once
#include <cstddef>
#include <string>

namespace pkv::cli {

// A progress line on stderr: "label  [#####.....] 12/100  eta 3m05s".
void progress(const std::string& label, size_t done, size_t total, double elapsed_s);

}  // namespace pkv::cli
