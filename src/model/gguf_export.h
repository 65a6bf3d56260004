// A checkpoint's language model as llama.cpp's GGUF (architecture "llama"): what `prefixkv export
// --gguf` writes, for llama.cpp and the tools built on it to load. The layout follows what
// llama.cpp's own converter (convert_hf_to_gguf.py) writes for a LLaMA model:
//   metadata: general.architecture = llama, general.name, general.file_type, llama.context_length,
//     .embedding_length, .block_count, .feed_forward_length, .rope.dimension_count,
//     .attention.head_count, .attention.head_count_kv, .attention.layer_norm_rms_epsilon,
//     .rope.freq_base; tokenizer.ggml.model = llama with the SentencePiece pieces, scores and token
//     types, the BOS / EOS / unknown ids, add_bos_token = true
//   tensors (ggml order [in, out], the same bytes as PyTorch's [out, in] rows): token_embd,
//     blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm, ffn_gate, ffn_up, ffn_down},
//     output_norm, output; norms in F32, matrices in the chosen type
//   attn_q / attn_k rows permuted within each head from transformers' rotate-half order to the
//     interleaved pairs ggml's LLaMA RoPE expects: row (h, 2 i + j) = transformers' row (h, j d/2 + i).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "model/model.h"
#include "text/tokenizer.h"

namespace pkv {

struct GgufExportOptions {
  uint32_t type = 1;  // ggml type of the matrices: 0 F32, 1 F16 (default), 8 Q8_0, 2 Q4_0
  std::string name;   // general.name ("" = the model folder's name)
};

// Writes the file (through a temporary file: an error leaves none). Error: a model the format
// cannot hold as llama.cpp reads it (biases, a RoPE scaling other than none, a vocabulary that is
// not the tokenizer's), a type other than the four, rows that are not whole blocks of it.
void export_text_gguf(const Model& model, const Tokenizer& tok, const std::string& path, const GgufExportOptions& opt);

// A LLaVA model's vision tower and projector as llama.cpp's mmproj file for LLaVA-1.5, the layout of
// llama.cpp's legacy converter (tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py, the path
// llama.cpp has for LLaVA-1.5) as clip.cpp reads it (tools/mtmd/clip.cpp, clip-impl.h; release
// v0.4.0, the one node-llama-cpp 3.21.1 bundles; docs/FORMATS.md):
//   metadata: general.architecture = clip, clip.has_vision_encoder = clip.has_llava_projector = true,
//     clip.has_text_encoder = false, clip.projector_type = mlp, clip.vision.{image_size, patch_size,
//     embedding_length, feed_forward_length, projection_dim, attention.head_count,
//     attention.layer_norm_epsilon, block_count, feature_layer, image_mean, image_std},
//     clip.use_gelu (and clip.use_silu): the tower's activation, quick_gelu when neither is set
//   tensors: v.class_embd, v.patch_embd.weight, v.position_embd.weight, v.pre_ln.{weight,bias},
//     v.blk.N.{attn_q, attn_k, attn_v, attn_out, ln1, ln2, ffn_down (fc1), ffn_up (fc2)}.{weight,bias},
//     mm.0 and mm.2 .{weight,bias}; matrices, the patch kernel and the position embedding in `type`
//     (F16 or F32), the rest F32
//   feature layers as hidden-state indices (0 = the embeddings; LLaVA-1.5's -2 of 24 layers is 23),
//     block_count = the deepest, the layers past it not written (as the legacy converter drops them)
// Refused, because llama.cpp would misread it: no vision tower, the "full" feature strategy (clip.cpp
// always drops the class token), feature layers out of ascending order, a projector other than
// linear-GELU-linear, a tower activation other than quick_gelu / gelu / silu.
void export_mmproj_gguf(const Model& model, const std::string& path, uint32_t type, const std::string& name = "");
// The feature layers an mmproj file stores for the model (Error for a model it cannot hold, above).
std::vector<int> mmproj_feature_layers(const ModelConfig& cfg);

// The ggml type of a name: f32, f16, q8_0, q4_0 (Error naming `option` otherwise).
uint32_t gguf_export_type(const std::string& name, const std::string& option);

}  // namespace pkv
