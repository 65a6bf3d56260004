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

// The ggml type of a name: f32, f16, q8_0, q4_0 (Error naming `option` otherwise).
uint32_t gguf_export_type(const std::string& name, const std::string& option);

}  // namespace pkv
