// Model hyper-parameters read from a checkpoint's config.json (and preprocessor_config.json).
// Supports LlavaForConditionalGeneration (llava-hf, transformers 4 and 5 forms), the original LLaVA
// repository's LlavaLlamaForCausalLM, and LlamaForCausalLM. Missing fields take transformers'
// defaults only where a whole sub-config is absent (as the llava-hf configs rely on); a partly
// specified architecture is an error.
#pragma once
#include <array>
#include <string>
#include <vector>

namespace pkv {

enum class Layout {
  LlavaHF,        // hub llava-hf naming (language_model.model.*, vision_tower.vision_model.*)
  LlavaV5,        // transformers 5 save_pretrained (model.language_model.*, model.vision_tower.*)
  LlavaOriginal,  // liuhaotian/llava-v1.5 (model.layers.*, model.mm_projector.*, tower inside or separate)
  Llama,          // LlamaForCausalLM, text only
};
const char* layout_name(Layout l);

struct TextConfig {
  int vocab_size = 32000;
  int hidden = 4096;
  int intermediate = 11008;
  int n_layers = 32;
  int n_heads = 32;
  int n_kv_heads = 32;
  int head_dim = 128;
  int max_positions = 4096;
  float rms_eps = 1e-6f;
  float rope_theta = 10000.f;
  std::string rope_type = "default";  // default | linear | llama3
  float rope_factor = 1.f;
  float rope_low_freq_factor = 1.f, rope_high_freq_factor = 4.f;
  int rope_original_max_positions = 8192;
  bool tie_embeddings = false;
  bool attention_bias = false;
  bool mlp_bias = false;
  std::string hidden_act = "silu";
  int bos_id = 1;
  std::vector<int> eos_ids = {2};
};

struct VisionConfig {
  int image_size = 336;
  int patch = 14;
  int hidden = 1024;
  int intermediate = 4096;
  int n_layers = 24;
  int n_heads = 16;
  int channels = 3;
  float eps = 1e-5f;
  std::string act = "quick_gelu";
  int grid() const { return image_size / patch; }
  int n_patches() const { return grid() * grid(); }
};

struct ImageConfig {  // preprocessing
  std::string mode = "pad";  // pad | crop
  int crop = 336;            // output side
  int shortest_edge = 336;
  std::array<float, 3> mean = {0.48145466f, 0.4578275f, 0.40821073f};
  std::array<float, 3> std = {0.26862954f, 0.26130258f, 0.27577711f};
  float rescale = 1.f / 255.f;
  std::string source = "defaults";  // where the settings came from
};

struct ModelConfig {
  std::string dir;
  std::string architecture;
  Layout layout = Layout::Llama;
  TextConfig text;
  bool has_vision = false;
  VisionConfig vision;
  bool vision_from_tensors = false;     // original layout: tower shape inferred from its tensors
  std::string vision_tower_dir;          // separate CLIP checkpoint, if any
  std::vector<int> feature_layers = {-2};
  std::string feature_strategy = "default";  // default (drop CLS) | full
  std::string projector_act = "gelu";
  int projector_layers = 2;
  int image_token_index = 32000;  // id in input_ids for llava-hf; -200 marker for the original layout
  ImageConfig image;
  int image_tokens() const {
    return vision.n_patches() + (feature_strategy == "full" ? 1 : 0);
  }
};

// Reads DIR/config.json (+ preprocessor_config.json, generation_config.json). `vision_tower_dir`
// (may be empty) is a separate CLIP checkpoint for the original layout. Throws Error.
ModelConfig load_config(const std::string& dir, const std::string& vision_tower_dir = "");

}  // namespace pkv
