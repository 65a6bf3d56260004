#include "model/clip.h"

#include <cstring>

#include "core/error.h"

namespace pkv::clip {

std::vector<float> unfold_patches(const VisionConfig& v, const float* pixels) {
  const int S = v.image_size, P = v.patch, G = v.grid();
  const size_t row = size_t(3) * P * P;
  std::vector<float> rows(size_t(G) * G * row);
  for (int gy = 0; gy < G; ++gy)
    for (int gx = 0; gx < G; ++gx) {
      float* dst = &rows[(size_t(gy) * G + gx) * row];
      for (int c = 0; c < 3; ++c)
        for (int ky = 0; ky < P; ++ky)
          std::memcpy(dst + (size_t(c) * P + ky) * P, pixels + (size_t(c) * S + gy * P + ky) * S + gx * P,
                      sizeof(float) * P);
    }
  return rows;
}

std::vector<int> feature_hidden_states(const ModelConfig& cfg) {
  std::vector<int> idx;
  for (int l : cfg.feature_layers) idx.push_back(l < 0 ? cfg.vision.n_layers + 1 + l : l);
  return idx;
}

Features join_features(const ModelConfig& cfg, const std::vector<std::vector<float>>& selected, int tokens, int d) {
  const int skip = cfg.feature_strategy == "default" ? 1 : 0;
  Features f;
  f.rows = tokens - skip;
  f.width = d * int(selected.size());
  f.data.resize(size_t(f.rows) * f.width);
  for (size_t k = 0; k < selected.size(); ++k) {
    PKV_ASSERT_MSG(selected[k].size() == size_t(tokens) * d, "a selected hidden state has the wrong size");
    for (int t = 0; t < f.rows; ++t)
      std::memcpy(&f.data[size_t(t) * f.width + k * d], &selected[k][size_t(t + skip) * d], sizeof(float) * d);
  }
  return f;
}

}  // namespace pkv::clip
