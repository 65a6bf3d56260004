// The steps of the CLIP vision tower that are the same on every device (Model::encode_image on the
// CPU, GpuModel::encode_image on the GPU): cutting the image into patch rows, which hidden states
// are the features, and joining them. One home for each rule.
#pragma once
#include <vector>

#include "io/config.h"

namespace pkv::clip {

// The patches of pixels [3, image_size, image_size] as rows [grid^2, 3 * patch^2], patch (gy, gx) at
// row gy * grid + gx, flattened as [c, ky, kx]: the patch-embedding convolution's weight order.
std::vector<float> unfold_patches(const VisionConfig& v, const float* pixels);

// The config's feature layers as hidden-state indices (0 = the embeddings, i = the output of layer
// i; a negative layer counts from the end, -1 = the last layer's output), in the config's order.
std::vector<int> feature_hidden_states(const ModelConfig& cfg);

// The selected hidden states ([tokens, d] each, in feature_hidden_states' order) side by side, the
// class token dropped for the "default" strategy: [rows, width] = [tokens - skip, d * n].
struct Features {
  std::vector<float> data;
  int rows = 0, width = 0;
};
Features join_features(const ModelConfig& cfg, const std::vector<std::vector<float>>& selected, int tokens, int d);

}  // namespace pkv::clip
