#include "model/gguf_export.h"

#include <filesystem>

#include "core/error.h"
#include "io/gguf.h"
#include "model/clip.h"
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

// A [rows, n] weight (or [rows, ...] read as [rows, n], n the product of the rest) as a GGUF tensor
// of `type`, converted row by row when the file is written (the writer holds one tensor at a time);
// `row_order[r]` is the stored row written as row r (empty: the same order). The checks run now.
GgufWriter::Fill matrix_fill(const TensorView& t, uint32_t type, std::vector<int64_t> row_order = {}) {
  if (t.shape.size() < 2) fail(t.file, "tensor " + t.name + " " + t.shape_str() + " is not a matrix");
  const int64_t rows = t.shape[0], n = t.numel() / rows;
  if (n % quant::block_elems(type) != 0)
    fail(t.file, "tensor " + t.name + " has rows of " + std::to_string(n) + " values, not whole blocks of " +
                     std::to_string(quant::block_elems(type)) + " (choose another --type)");
  return [&t, type, rows, n, order = std::move(row_order)](uint8_t* out) {
    const size_t rb = quant::row_bytes(type, n);
    std::vector<float> r(static_cast<size_t>(n));
    for (int64_t i = 0; i < rows; ++i) {
      row_f32(t, order.empty() ? i : order[size_t(i)], n, r.data());
      quant::quantize_row(type, r.data(), out + size_t(i) * rb, n);
    }
  };
}

// Floats as `type` (F32 or F16), rows of n values.
std::vector<uint8_t> floats_as(uint32_t type, const std::vector<float>& v) {
  std::vector<uint8_t> out(quant::row_bytes(type, int64_t(v.size())));
  quant::quantize_row(type, v.data(), out.data(), int64_t(v.size()));
  return out;
}

std::vector<uint8_t> vector_f32(const std::vector<float>& v) { return floats_as(quant::kF32, v); }

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
  // llava-hf pads the embedding table past the tokenizer (LLaVA-1.5: 32064 rows, 32000 pieces);
  // llama.cpp needs one piece per row: the rows past the tokenizer get placeholder pieces "[PAD<id>]"
  // of type 5 (unused: never produced by encoding), as llama.cpp's own converter writes them. A
  // tokenizer with more pieces than the table has rows cannot be written.
  if (tok.vocab_size() > t.vocab_size)
    fail(where, "the tokenizer has " + std::to_string(tok.vocab_size()) + " pieces, more than the model's " +
                    std::to_string(t.vocab_size) + " embeddings");
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
  for (int i = tok.vocab_size(); i < t.vocab_size; ++i) {
    pieces.push_back("[PAD" + std::to_string(i) + "]");
    scores.push_back(-1000.f);
    types.push_back(5);
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
    g.add_tensor(n, {l.w->shape[1], l.w->shape[0]}, opt.type, matrix_fill(*l.w, opt.type, order));
  };
  auto vec = [&](const std::string& n, const std::vector<float>& v) {
    g.add_tensor(n, {int64_t(v.size())}, quant::kF32, vector_f32(v));
  };
  PKV_ASSERT(w.embed);
  g.add_tensor("token_embd.weight", {w.embed->shape[1], w.embed->shape[0]}, opt.type, matrix_fill(*w.embed, opt.type));
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

std::vector<int> mmproj_feature_layers(const ModelConfig& cfg) {
  const char* where = "GGUF mmproj export";
  if (!cfg.has_vision) fail(where, "the model " + cfg.dir + " has no vision tower (an mmproj file holds a LLaVA model's)");
  if (cfg.feature_strategy != "default")
    fail(where, "vision_feature_select_strategy is '" + cfg.feature_strategy +
                    "': llama.cpp's LLaVA graph always drops the class token ('default'), so it would misread this model");
  std::vector<int> layers = clip::feature_hidden_states(cfg);
  for (size_t i = 0; i < layers.size(); ++i)
    if (layers[i] < 1 || layers[i] > cfg.vision.n_layers || (i > 0 && layers[i] <= layers[i - 1]))
      fail(where, "the vision feature layers must be distinct layer outputs in ascending order (llama.cpp stacks them "
                  "in layer order); this model selects hidden state " + std::to_string(layers[i]) + " of " +
                  std::to_string(cfg.vision.n_layers + 1) + " in position " + std::to_string(i));
  return layers;
}

void export_mmproj_gguf(const Model& model, const std::string& path, uint32_t type, const std::string& name) {
  const ModelConfig& cfg = model.config();
  const VisionConfig& v = cfg.vision;
  const char* where = "GGUF mmproj export";
  const std::vector<int> features = mmproj_feature_layers(cfg);
  if (type != quant::kF32 && type != quant::kF16) fail(where, "the mmproj type must be F32 or F16");
  if (v.act != "quick_gelu" && v.act != "gelu" && v.act != "silu")
    fail(where, "the vision tower's activation '" + v.act +
                    "' is none of the three clip.cpp chooses from its flags (quick_gelu, gelu, silu)");
  if (cfg.projector_act != "gelu")
    fail(where, "the projector's activation is '" + cfg.projector_act + "'; llama.cpp's mlp projector applies GELU");
  const Weights& w = model.weights();
  if (w.projector.layers.size() != 2)
    fail(where, "the projector has " + std::to_string(w.projector.layers.size()) +
                    " linear layers; llama.cpp's 'mlp' projector is two (mm.0, GELU, mm.2)");
  PKV_ASSERT(int(w.vision.layers.size()) == features.back());

  GgufWriter g;
  const std::string model_name = !name.empty() ? name : std::filesystem::path(cfg.dir).filename().string();
  g.set("general.architecture", GgufValue::of_string("clip"));
  g.set("general.name", GgufValue::of_string(model_name.empty() ? "prefixkv" : model_name));
  g.set("general.description", GgufValue::of_string("image encoder for LLaVA"));
  g.set("general.file_type", GgufValue::of_u32(type == quant::kF16 ? 1 : 0));
  g.set("clip.has_text_encoder", GgufValue::of_bool(false));
  g.set("clip.has_vision_encoder", GgufValue::of_bool(true));
  g.set("clip.has_llava_projector", GgufValue::of_bool(true));
  g.set("clip.projector_type", GgufValue::of_string("mlp"));
  g.set("clip.vision.image_size", GgufValue::of_u32(uint32_t(v.image_size)));
  g.set("clip.vision.patch_size", GgufValue::of_u32(uint32_t(v.patch)));
  g.set("clip.vision.embedding_length", GgufValue::of_u32(uint32_t(v.hidden)));
  g.set("clip.vision.feed_forward_length", GgufValue::of_u32(uint32_t(v.intermediate)));
  g.set("clip.vision.projection_dim", GgufValue::of_u32(uint32_t(cfg.text.hidden)));
  g.set("clip.vision.attention.head_count", GgufValue::of_u32(uint32_t(v.n_heads)));
  g.set("clip.vision.attention.layer_norm_epsilon", GgufValue::of_f32(v.eps));
  g.set("clip.vision.block_count", GgufValue::of_u32(uint32_t(features.back())));
  g.set("clip.vision.feature_layer", GgufValue::of_i32s(std::vector<int32_t>(features.begin(), features.end())));
  g.set("clip.vision.image_mean", GgufValue::of_f32s({cfg.image.mean.begin(), cfg.image.mean.end()}));
  g.set("clip.vision.image_std", GgufValue::of_f32s({cfg.image.std.begin(), cfg.image.std.end()}));
  g.set("clip.use_gelu", GgufValue::of_bool(v.act == "gelu"));
  if (v.act == "silu") g.set("clip.use_silu", GgufValue::of_bool(true));

  // As the legacy converter stores them: matrices (and the patch kernel) in `type`, the rest F32.
  auto mat = [&](const std::string& n, const Linear& l) {
    g.add_tensor(n + ".weight", {l.w->shape[1], l.w->shape[0]}, type, matrix_fill(*l.w, type));
    g.add_tensor(n + ".bias", {int64_t(l.b.size())}, quant::kF32, vector_f32(l.b));
  };
  auto norm = [&](const std::string& n, const Norm& x) {
    g.add_tensor(n + ".weight", {int64_t(x.w.size())}, quant::kF32, vector_f32(x.w));
    g.add_tensor(n + ".bias", {int64_t(x.b.size())}, quant::kF32, vector_f32(x.b));
  };
  mat("mm.0", w.projector.layers[0]);
  mat("mm.2", w.projector.layers[1]);
  const ClipWeights& c = w.vision;
  g.add_tensor("v.class_embd", {v.hidden}, quant::kF32, vector_f32(c.class_emb));
  g.add_tensor("v.patch_embd.weight", {v.patch, v.patch, v.channels, v.hidden}, type, matrix_fill(*c.patch.w, type));
  g.add_tensor("v.position_embd.weight", {v.hidden, v.n_patches() + 1}, type, floats_as(type, c.pos_emb));
  norm("v.pre_ln", c.pre_norm);
  for (size_t i = 0; i < c.layers.size(); ++i) {
    const ClipLayer& L = c.layers[i];
    const std::string p = "v.blk." + std::to_string(i) + ".";
    mat(p + "attn_q", L.q);
    mat(p + "attn_k", L.k);
    mat(p + "attn_v", L.v);
    mat(p + "attn_out", L.o);
    norm(p + "ln1", L.ln1);
    norm(p + "ln2", L.ln2);
    // The legacy converter's names, which clip.cpp recognises by shape and swaps back: fc1 as
    // ffn_down, fc2 as ffn_up (kept, so that clip.cpp's test also holds when fc1 is square).
    mat(p + "ffn_down", L.fc1);
    mat(p + "ffn_up", L.fc2);
  }
  g.write(path);
}

}  // namespace pkv
