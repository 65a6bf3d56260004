#include "sample_prompt.h"

#include <cstdio>
#include <unistd.h>

#include "core/error.h"

namespace pkv::cli {

std::optional<PreparedPrompt> prepare_sample(const Engine& engine, const Sample& s, const std::string& image_mode,
                                             std::string* why) {
  Image img;
  PromptRequest req;
  req.text = s.prompt;
  req.tmpl = Template::LlavaV1;
  req.image_mode = image_mode;
  if (!s.image.empty()) {
    try {
      img = load_image(s.image);
    } catch (const Error& e) {
      if (why) *why = e.what();
      return std::nullopt;
    }
    req.image = &img;
  }
  return engine.prepare(req);
}

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
