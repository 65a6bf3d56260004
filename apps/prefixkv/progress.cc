#include "progress.h"

#include <cstdio>
#include <unistd.h>


namespace pkv::cli {

void progress(const std::string& label, size_t done, size_t total, double elapsed) {
  const int width = 30;
  const int filled = total ? int(double(done) / double(total) * width) : width;
  const double eta = done ? elapsed / double(done) * double(total - done) : 0.0;
  std::fprintf(stderr, "\r%s [%s%s] %zu/%zu  %.0fs elapsed, eta %dm%02ds   ", label.c_str(),
               std::string(size_t(filled), '#').c_str(), std::string(size_t(width - filled), '.').c_str(), done, total,
               elapsed, int(eta) / 60, int(eta) % 60);
  if (done == total) std::fprintf(stderr, "\n");
  std::fflush(stderr);
}

}  // namespace pkv::cli
