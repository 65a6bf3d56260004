// The engine's own view of a checkpoint's weights. Large matrices stay in their stored dtype inside
// the memory-mapped files (TensorView); small vectors (norms, biases, class and position embeddings)
// are converted to float32 at load. One name table (weights.cc) maps every supported checkpoint
// naming scheme onto these structures; every shape is checked against the config at load.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "io/config.h"
#include "io/safetensors.h"

namespace pkv {

struct ClipLayer {
  Norm ln1, ln2;
  Linear q, k, v, o, fc1, fc2;
};

struct ClipWeights {
  Linear patch;                  // conv as a matrix: [hidden, 3 * patch * patch], no bias
  std::vector<float> class_emb;  // [hidden]
  std::vector<float> pos_emb;    // [n_patches + 1, hidden]
  Norm pre_norm;
  std::vector<ClipLayer> layers;  // only the layers the selected feature layer needs
};

struct LlamaLayer {
  Norm attn_norm, mlp_norm;
  Linear q, k, v, o, gate, up, down;
};

struct LlamaWeights {
  const TensorView* embed = nullptr;  // [vocab, hidden]
  std::vector<LlamaLayer> layers;
  Norm norm;
  Linear head;  // [vocab, hidden] (the embedding matrix when tied)
};

struct ProjectorWeights {
  std::vector<Linear> layers;  // activation between consecutive layers
};

struct Weights {
  std::string scheme;  // which naming scheme matched, for --json and errors
  LlamaWeights lm;
  ClipWeights vision;
  ProjectorWeights projector;
};

// Owns the tensor stores (memory mappings) and the Weights that point into them.
struct LoadedWeights {
  std::unique_ptr<TensorStore> store;
  std::unique_ptr<TensorStore> vision_store;  // separate CLIP checkpoint, if any
  Weights w;
};

// Resolves names and checks shapes. May complete `cfg` (original layout: vision tower shape from its
// tensors; v5 vs hub layout). Throws Error naming the file, the tensor and the mismatch.
std::unique_ptr<LoadedWeights> load_weights(ModelConfig& cfg);
// The same over a store the caller made (e.g. TensorStore::from_memory); `vision_store`, when given,
// holds the vision tower and the projector under the CLIP names (vision_model.*,
// multi_modal_projector.linear_N: a GGUF mmproj file).
std::unique_ptr<LoadedWeights> load_weights(ModelConfig& cfg, std::unique_ptr<TensorStore> store,
                                            std::unique_ptr<TensorStore> vision_store = nullptr);

}  // namespace pkv
