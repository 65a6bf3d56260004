// Reading a LLaMA language model and its tokenizer from llama.cpp's GGUF (architecture "llama", as
// llama.cpp's converter and `prefixkv export --gguf` write it; model/gguf_export.h lists the
// layout). The weights stay in the mapped file: every matrix is a view of its bytes, except
// attn_q / attn_k, whose rows are put back from ggml's interleaved RoPE order into transformers'
// (a copy of those two per layer, in their stored type). F32, F16 and BF16 weights are read as
// such; Q8_0, Q4_0, Q4_K and Q6_K weights stay blocks that the CPU's products dequantise row by row
// (ops::weight_row; the GPU refuses them for now). With an mmproj file beside it, the CLIP vision
// tower and projector come from there (F32, F16 or BF16 tensors).
#pragma once
#include <memory>
#include <string>

#include "io/config.h"
#include "io/gguf.h"
#include "io/safetensors.h"
#include "text/tokenizer.h"

namespace pkv {

bool is_gguf_path(const std::string& path);
// The config a GGUF file describes (Error naming the file and key for a missing or bad value, or an
// architecture other than llama).
ModelConfig gguf_config(const GgufFile& f);
// The weights under transformers' LLaMA names ("model.layers.N.self_attn.q_proj.weight", ...).
std::unique_ptr<TensorStore> gguf_tensor_store(std::shared_ptr<const GgufFile> f, const ModelConfig& cfg);
// The vision part of `cfg` (whose text part gguf_config filled) from llama.cpp's mmproj file for
// LLaVA-1.5 (model/gguf_export.h lists the layout): the tower's sizes and activation, the feature
// layers, the image mean and std; Error naming the file and the key or tensor for other projector
// types and mmproj generations (LLaVA-1.6, MiniCPM-V, Yi-VL's mlp_norm, ...), a missing vision
// encoder, or a projector whose output is not the text model's hidden size.
void gguf_mmproj_config(const GgufFile& f, ModelConfig& cfg);
// Its tensors under the CLIP names weights.cc reads (vision_model.*, multi_modal_projector.linear_N),
// each checked against the sizes the metadata gives.
std::unique_ptr<TensorStore> gguf_mmproj_store(std::shared_ptr<const GgufFile> f, const ModelConfig& cfg);
// The tokenizer the file carries (tokenizer.ggml.model "llama").
std::unique_ptr<Tokenizer> gguf_tokenizer(const std::string& path);

}  // namespace pkv
