#include "model/gguf_load.h"

#include <cstring>

#include "core/error.h"
#include "model/model.h"
#include "ops/quant.h"

namespace pkv {

bool is_gguf_path(const std::string& path) {
  return path.size() > 5 && path.compare(path.size() - 5, 5, ".gguf") == 0;
}

ModelConfig gguf_config(const GgufFile& f) {
  const std::string arch = f.str("general.architecture");
  if (arch != "llama")
    fail(f.where(), "general.architecture is '" + arch + "'; prefixkv reads GGUF language models of architecture llama");
  ModelConfig cfg;
  cfg.dir = f.where();
  cfg.architecture = "LlamaForCausalLM";
  cfg.layout = Layout::Llama;
  cfg.has_vision = false;
  TextConfig& t = cfg.text;
  auto positive = [&](const std::string& key) {
    const int64_t v = f.integer(key);
    if (v < 1 || v > (int64_t(1) << 24)) fail(f.where(), key + " is " + std::to_string(v) + ", not a size");
    return int(v);
  };
  t.hidden = positive("llama.embedding_length");
  t.n_layers = positive("llama.block_count");
  t.intermediate = positive("llama.feed_forward_length");
  t.n_heads = positive("llama.attention.head_count");
  t.n_kv_heads = f.has("llama.attention.head_count_kv") ? positive("llama.attention.head_count_kv") : t.n_heads;
  t.head_dim = f.has("llama.attention.key_length") ? positive("llama.attention.key_length") : t.hidden / t.n_heads;
  if (f.has("llama.rope.dimension_count") && positive("llama.rope.dimension_count") != t.head_dim)
    fail(f.where(), "llama.rope.dimension_count differs from the head size (partial RoPE is not supported)");
  if (t.n_heads % t.n_kv_heads != 0 || t.head_dim % 2 != 0)
    fail(f.where(), "the head counts (" + std::to_string(t.n_heads) + " / " + std::to_string(t.n_kv_heads) +
                        ") or the head size (" + std::to_string(t.head_dim) + ") do not fit");
  t.max_positions = f.has("llama.context_length") ? positive("llama.context_length") : 4096;
  t.rms_eps = float(f.number("llama.attention.layer_norm_rms_epsilon"));
  t.rope_theta = f.has("llama.rope.freq_base") ? float(f.number("llama.rope.freq_base")) : 10000.f;
  if (f.has("llama.rope.scaling.type") && f.str("llama.rope.scaling.type") != "none")
    fail(f.where(), "RoPE scaling '" + f.str("llama.rope.scaling.type") + "' is not supported in GGUF files yet");
  t.vocab_size = int(f.value("tokenizer.ggml.tokens").count());
  if (f.has("tokenizer.ggml.bos_token_id")) t.bos_id = int(f.integer("tokenizer.ggml.bos_token_id"));
  if (f.has("tokenizer.ggml.eos_token_id")) t.eos_ids = {int(f.integer("tokenizer.ggml.eos_token_id"))};
  t.tie_embeddings = f.find("output.weight") == nullptr;
  return cfg;
}

namespace {

DType view_dtype(uint32_t type, bool* supported) {
  *supported = type == quant::kF32 || type == quant::kF16 || type == quant::kBF16;
  return type == quant::kF16 ? DType::F16 : type == quant::kBF16 ? DType::BF16 : DType::F32;
}

}  // namespace

std::unique_ptr<TensorStore> gguf_tensor_store(std::shared_ptr<const GgufFile> f, const ModelConfig& cfg) {
  const TextConfig& t = cfg.text;
  std::vector<TensorView> views;
  std::vector<OwnedTensor> owned;
  auto shape_of = [](const GgufTensor& g) {  // ggml [in, out] -> [out, in]
    std::vector<int64_t> s(g.ne.rbegin(), g.ne.rend());
    return s;
  };
  auto view = [&](const std::string& gname, const std::string& name) {
    const GgufTensor* g = f->find(gname);
    if (!g) fail(f->where(), "lacks the tensor '" + gname + "'");
    TensorView v;
    v.name = name;
    v.file = f->where();
    v.dtype_str = ggml_type_name(g->type);
    v.dtype = view_dtype(g->type, &v.supported);
    if (!v.supported && quant::supported(g->type)) {
      v.supported = true;
      v.quant = g->type;  // rows of ggml blocks, dequantised inside the products
    }
    if (!v.supported)
      fail(f->where(), "tensor '" + gname + "' is " + v.dtype_str +
                           ": prefixkv reads F32, F16, BF16, Q8_0, Q4_0, Q4_K and Q6_K GGUF weights");
    if (g->ne.size() == 1 && v.quant)
      fail(f->where(), "tensor '" + gname + "' (a vector) is " + v.dtype_str + "; norms must be F32, F16 or BF16");
    v.shape = shape_of(*g);
    v.data = g->data;
    return v;
  };
  // attn_q / attn_k: row (h, 2 i + j) of the file is transformers' row (h, j d/2 + i).
  auto unpermuted = [&](const std::string& gname, const std::string& name, int heads) {
    const TensorView v = view(gname, name);
    if (v.shape.size() != 2 || v.shape[0] != int64_t(heads) * t.head_dim)
      fail(f->where(), "tensor '" + gname + "' " + v.shape_str() + " is not " + std::to_string(heads) + " heads of " +
                           std::to_string(t.head_dim) + " rows");
    OwnedTensor o;
    o.name = name;
    o.dtype = v.dtype;
    o.shape = v.shape;
    o.quant = v.quant;
    o.quant_name = v.dtype_str;
    const size_t row = v.quant ? quant::row_bytes(v.quant, v.shape[1]) : size_t(v.shape[1]) * dtype_size(v.dtype);
    o.data.resize(size_t(v.shape[0]) * row);
    const int half = t.head_dim / 2;
    const auto* src = static_cast<const uint8_t*>(v.data);
    for (int h = 0; h < heads; ++h)
      for (int i = 0; i < half; ++i)
        for (int j = 0; j < 2; ++j)
          std::memcpy(o.data.data() + size_t(h * t.head_dim + j * half + i) * row,
                      src + size_t(h * t.head_dim + 2 * i + j) * row, row);
    owned.push_back(std::move(o));
  };
  views.push_back(view("token_embd.weight", "model.embed_tokens.weight"));
  for (int l = 0; l < t.n_layers; ++l) {
    const std::string b = "blk." + std::to_string(l) + ".", p = "model.layers." + std::to_string(l) + ".";
    views.push_back(view(b + "attn_norm.weight", p + "input_layernorm.weight"));
    unpermuted(b + "attn_q.weight", p + "self_attn.q_proj.weight", t.n_heads);
    unpermuted(b + "attn_k.weight", p + "self_attn.k_proj.weight", t.n_kv_heads);
    views.push_back(view(b + "attn_v.weight", p + "self_attn.v_proj.weight"));
    views.push_back(view(b + "attn_output.weight", p + "self_attn.o_proj.weight"));
    views.push_back(view(b + "ffn_norm.weight", p + "post_attention_layernorm.weight"));
    views.push_back(view(b + "ffn_gate.weight", p + "mlp.gate_proj.weight"));
    views.push_back(view(b + "ffn_up.weight", p + "mlp.up_proj.weight"));
    views.push_back(view(b + "ffn_down.weight", p + "mlp.down_proj.weight"));
  }
  views.push_back(view("output_norm.weight", "model.norm.weight"));
  if (f->find("output.weight")) views.push_back(view("output.weight", "lm_head.weight"));
  return TensorStore::from_views(f->where(), std::move(views), std::move(owned), f);
}

std::unique_ptr<Tokenizer> gguf_tokenizer(const std::string& path) {
  const auto f = GgufFile::open(path);
  const std::string kind = f->str("tokenizer.ggml.model");
  if (kind != "llama")
    fail(path, "tokenizer.ggml.model is '" + kind + "'; prefixkv reads LLaMA's SentencePiece vocabulary ('llama')");
  std::vector<float> scores;
  for (double x : f->numbers("tokenizer.ggml.scores")) scores.push_back(float(x));
  std::vector<int> types;
  for (double x : f->numbers("tokenizer.ggml.token_type")) types.push_back(int(x));
  return Tokenizer::from_pieces(f->strings("tokenizer.ggml.tokens"), scores, types,
                                int(f->integer("tokenizer.ggml.bos_token_id")), int(f->integer("tokenizer.ggml.eos_token_id")),
                                f->has("tokenizer.ggml.unknown_token_id") ? int(f->integer("tokenizer.ggml.unknown_token_id")) : 0,
                                path);
}

std::unique_ptr<Model> Model::load_gguf(const std::string& path) {
  std::shared_ptr<const GgufFile> f = GgufFile::open(path);
  auto m = std::unique_ptr<Model>(new Model());
  m->cfg_ = gguf_config(*f);
  m->lw_ = load_weights(m->cfg_, gguf_tensor_store(f, m->cfg_));
  const TextConfig& t = m->cfg_.text;
  m->rope_ = ops::Rope::make(t.head_dim, t.rope_theta, t.rope_type, t.rope_factor, t.rope_low_freq_factor,
                             t.rope_high_freq_factor, t.rope_original_max_positions);
  return m;
}

}  // namespace pkv
