#include "model/gguf_export.h"

#include <filesystem>

#include "core/error.h"
#include "io/gguf.h"
#include "ops/quant.h"

namespace pkv {

namespace {

// One stored row of a weight as float32.
void row_f32(const TensorView& t, int64_t row, int64_t n, float* out) {
  const auto* base = static_cast<const uint8_t*>(t.data);
  switch (t.dtype) {
    case DType::F32:
      quant::dequantize_row(quant::kF32, base + size_t(row * n) * 4, out, n);
      return;
    case DType::F16:
      quant::dequantize_row(quant::kF16, base + size_t(row * n) * 2, out, n);
      return;
    case DType::BF16:
      quant::dequantize_row(quant::kBF16, base + size_t(row * n) * 2, out, n);
      return;
    default:
      fail(t.file, "tensor " + t.name + " is stored as " + t.dtype_str + ", which the GGUF export does not read");
  }
}

// A [rows, n] weight as a GGUF tensor of `type`; `row_order[r]` is the stored row written as row r
// (empty: the same order).
std::vector<uint8_t> matrix_bytes(const TensorView& t, uint32_t type, const std::vector<int64_t>& row_order = {}) {
  if (t.shape.size() != 2) fail(t.file, "tensor " + t.name + " " + t.shape_str() + " is not a matrix");
  const int64_t rows = t.shape[0], n = t.shape[1];
  if (n % quant::block_elems(type) != 0)
    fail(t.file, "tensor " + t.name + " has rows of " + std::to_string(n) + " values, not whole blocks of " +
                     std::to_string(quant::block_elems(type)) + " (choose another --type)");
  const size_t rb = quant::row_bytes(type, n);
  std::vector<uint8_t> out(size_t(rows) * rb);
  std::vector<float> r(static_cast<size_t>(n));
  for (int64_t i = 0; i < rows; ++i) {
    row_f32(t, row_order.empty() ? i : row_order[size_t(i)], n, r.data());
    quant::quantize_row(type, r.data(), out.data() + size_t(i) * rb, n);
  }
  return out;
}

std::vector<uint8_t> vector_f32(const std::vector<float>& v) {
  std::vector<uint8_t> out(v.size() * 4);
  quant::quantize_row(quant::kF32, v.data(), out.data(), int64_t(v.size()));
  return out;
}

// ggml's LLaMA RoPE rotates interleaved pairs (0, 1), (2, 3), ...; transformers' rotates (i, i + d/2).
// The q / k projection's output rows are reordered within each head so the two agree.
std::vector<int64_t> rope_row_order(int n_heads, int head_dim) {
  std::vector<int64_t> order;
  const int half = head_dim / 2;
  for (int h = 0; h < n_heads; ++h)
    for (int i = 0; i < half; ++i)
      for (int j = 0; j < 2; ++j) order.push_back(int64_t(h) * head_dim + j * half + i);
  return order;
}

}  // namespace

uint32_t gguf_export_type(const std::string& name, const std::string& option) {
  if (name == "f32") return quant::kF32;
  if (name == "f16") return quant::kF16;
  if (name == "q8_0") return quant::kQ8_0;
  if (name == "q4_0") return quant::kQ4_0;
  fail(option, "must be f32, f16, q8_0 or q4_0, got '" + name + "'");
}

void export_text_gguf(const Model& model, const Tokenizer& tok, const std::string& path, const GgufExportOptions& opt) {
  const ModelConfig& cfg = model.config();
  const TextConfig& t = cfg.text;
  const LlamaWeights& w = model.weights().lm;
  const char* where = "GGUF export";
  if (opt.type != quant::kF32 && opt.type != quant::kF16 && opt.type != quant::kQ8_0 && opt.type != quant::kQ4_0)
    fail(where, "the type must be F32, F16, Q8_0 or Q4_0, got ggml type " + std::to_string(opt.type));
  if (t.attention_bias || t.mlp_bias) fail(where, "the model has biases, which llama.cpp's LLaMA layout does not hold");
  if (t.rope_type != "default") fail(where, "RoPE scaling '" + t.rope_type + "' is not exported");
  if (t.hidden_act != "silu") fail(where, "the activation '" + t.hidden_act + "' is not LLaMA's silu");
  if (tok.vocab_size() != t.vocab_size)
    fail(where, "the tokenizer has " + std::to_string(tok.vocab_size()) + " pieces, the model " +
                    std::to_string(t.vocab_size) + " embeddings: llama.cpp needs them equal");
  if (t.head_dim % 2 != 0) fail(where, "an odd head size");

  GgufWriter g;
  const std::string name = !opt.name.empty() ? opt.name : std::filesystem::path(cfg.dir).filename().string();
  g.set("general.architecture", GgufValue::of_string("llama"));
  g.set("general.name", GgufValue::of_string(name.empty() ? "prefixkv" : name));
  // llama_ftype: ALL_F32 0, MOSTLY_F16 1, MOSTLY_Q4_0 2, MOSTLY_Q8_0 7.
  const uint32_t ftype = opt.type == quant::kF32 ? 0 : opt.type == quant::kF16 ? 1 : opt.type == quant::kQ4_0 ? 2 : 7;
  g.set("general.file_type", GgufValue::of_u32(ftype));
  g.set("general.quantization_version", GgufValue::of_u32(2));
  g.set("llama.context_length", GgufValue::of_u32(uint32_t(t.max_positions)));
  g.set("llama.embedding_length", GgufValue::of_u32(uint32_t(t.hidden)));
  g.set("llama.block_count", GgufValue::of_u32(uint32_t(t.n_layers)));
  g.set("llama.feed_forward_length", GgufValue::of_u32(uint32_t(t.intermediate)));
  g.set("llama.rope.dimension_count", GgufValue::of_u32(uint32_t(t.head_dim)));
  g.set("llama.attention.head_count", GgufValue::of_u32(uint32_t(t.n_heads)));
  g.set("llama.attention.head_count_kv", GgufValue::of_u32(uint32_t(t.n_kv_heads)));
  g.set("llama.attention.layer_norm_rms_epsilon", GgufValue::of_f32(t.rms_eps));
  g.set("llama.rope.freq_base", GgufValue::of_f32(t.rope_theta));
  if (t.head_dim * t.n_heads != t.hidden) g.set("llama.attention.key_length", GgufValue::of_u32(uint32_t(t.head_dim)));
  if (t.head_dim * t.n_heads != t.hidden) g.set("llama.attention.value_length", GgufValue::of_u32(uint32_t(t.head_dim)));

  std::vector<std::string> pieces;
  std::vector<float> scores;
  std::vector<int32_t> types;
  for (int i = 0; i < tok.vocab_size(); ++i) {
    pieces.push_back(tok.id_to_piece(i));
    scores.push_back(tok.score(i));
    types.push_back(tok.gguf_token_type(i));
  }
  g.set("tokenizer.ggml.model", GgufValue::of_string("llama"));
  g.set("tokenizer.ggml.tokens", GgufValue::of_strings(std::move(pieces)));
  g.set("tokenizer.ggml.scores", GgufValue::of_f32s(scores));
  g.set("tokenizer.ggml.token_type", GgufValue::of_i32s(types));
  g.set("tokenizer.ggml.bos_token_id", GgufValue::of_u32(uint32_t(tok.bos_id())));
  g.set("tokenizer.ggml.eos_token_id", GgufValue::of_u32(uint32_t(t.eos_ids.empty() ? tok.eos_id() : t.eos_ids[0])));
  g.set("tokenizer.ggml.unknown_token_id", GgufValue::of_u32(uint32_t(tok.piece_to_id("<unk>") >= 0 ? tok.piece_to_id("<unk>") : 0)));
  g.set("tokenizer.ggml.add_bos_token", GgufValue::of_bool(true));
  g.set("tokenizer.ggml.add_eos_token", GgufValue::of_bool(false));

  auto mat = [&](const std::string& n, const Linear& l, const std::vector<int64_t>& order = {}) {
    PKV_ASSERT(l.w);
    g.add_tensor(n, {l.w->shape[1], l.w->shape[0]}, opt.type, matrix_bytes(*l.w, opt.type, order));
  };
  auto vec = [&](const std::string& n, const std::vector<float>& v) {
    g.add_tensor(n, {int64_t(v.size())}, quant::kF32, vector_f32(v));
  };
  PKV_ASSERT(w.embed);
  g.add_tensor("token_embd.weight", {w.embed->shape[1], w.embed->shape[0]}, opt.type, matrix_bytes(*w.embed, opt.type));
  const std::vector<int64_t> q_order = rope_row_order(t.n_heads, t.head_dim), k_order = rope_row_order(t.n_kv_heads, t.head_dim);
  for (int l = 0; l < t.n_layers; ++l) {
    const LlamaLayer& L = w.layers[size_t(l)];
    const std::string p = "blk." + std::to_string(l) + ".";
    vec(p + "attn_norm.weight", L.attn_norm.w);
    mat(p + "attn_q.weight", L.q, q_order);
    mat(p + "attn_k.weight", L.k, k_order);
    mat(p + "attn_v.weight", L.v);
    mat(p + "attn_output.weight", L.o);
    vec(p + "ffn_norm.weight", L.mlp_norm.w);
    mat(p + "ffn_gate.weight", L.gate);
    mat(p + "ffn_up.weight", L.up);
    mat(p + "ffn_down.weight", L.down);
  }
  vec("output_norm.weight", w.norm.w);
  mat("output.weight", w.head);
  g.write(path);
}

}  // namespace pkv
