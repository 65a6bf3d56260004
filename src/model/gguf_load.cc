#include "model/gguf_load.h"

#include <algorithm>
#include <cmath>
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
  if (arch == "clip")
    fail(f.where(), "is llama.cpp's vision (mmproj) file: give it with --mmproj, the language model with --model");
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

// Tensor `gname` of the file as a view named `name` (ggml [in, out] -> [out, in]); quantised
// matrices only where `quantised_ok`.
TensorView gguf_view(const GgufFile& f, const std::string& gname, const std::string& name, bool quantised_ok) {
  const GgufTensor* g = f.find(gname);
  if (!g) fail(f.where(), "lacks the tensor '" + gname + "'");
  TensorView v;
  v.name = name;
  v.file = f.where();
  v.dtype_str = ggml_type_name(g->type);
  v.dtype = view_dtype(g->type, &v.supported);
  if (!v.supported && quantised_ok && quant::supported(g->type)) {
    v.supported = true;
    v.quant = g->type;  // rows of ggml blocks, dequantised inside the products
  }
  if (!v.supported)
    fail(f.where(), "tensor '" + gname + "' is " + v.dtype_str +
                        (quantised_ok ? ": prefixkv reads F32, F16, BF16, Q8_0, Q4_0, Q4_K and Q6_K GGUF weights"
                                      : ": prefixkv reads the tensors of an mmproj file as F32, F16 or BF16"));
  if (g->ne.size() == 1 && v.quant)
    fail(f.where(), "tensor '" + gname + "' (a vector) is " + v.dtype_str + "; norms must be F32, F16 or BF16");
  v.shape.assign(g->ne.rbegin(), g->ne.rend());
  v.data = g->data;
  return v;
}

}  // namespace

std::unique_ptr<TensorStore> gguf_tensor_store(std::shared_ptr<const GgufFile> f, const ModelConfig& cfg) {
  const TextConfig& t = cfg.text;
  std::vector<TensorView> views;
  std::vector<OwnedTensor> owned;
  auto view = [&](const std::string& gname, const std::string& name) { return gguf_view(*f, gname, name, true); };
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

namespace {

bool flag(const GgufFile& f, const std::string& key, bool def) {
  if (!f.has(key)) return def;
  const GgufValue& v = f.value(key);
  if (v.type != GgufType::Bool) fail(f.where(), "metadata '" + key + "' is a " + gguf_type_name(v.type) + ", not a bool");
  return v.b;
}

std::string shape_str(const std::vector<int64_t>& ne) {
  std::string s = "[";
  for (size_t i = 0; i < ne.size(); ++i) s += (i ? ", " : "") + std::to_string(ne[i]);
  return s + "]";
}

}  // namespace

void gguf_mmproj_config(const GgufFile& f, ModelConfig& cfg) {
  const std::string& w = f.where();
  const std::string arch = f.has("general.architecture") ? f.str("general.architecture") : "";
  if (arch != "clip")
    fail(w, "general.architecture is '" + arch + "'; llama.cpp's vision (mmproj) file has architecture 'clip'");
  if (!flag(f, "clip.has_vision_encoder", false))
    fail(w, "clip.has_vision_encoder is missing or false: the file holds no vision encoder");
  const std::string key = f.has("clip.projector_type") ? "clip.projector_type" : "clip.vision.projector_type";
  if (!f.has(key)) fail(w, "lacks clip.projector_type: not a LLaVA mmproj file");
  const std::string proj = f.str(key);
  if (proj != "mlp")
    fail(w, key + " is '" + proj + "'; prefixkv reads LLaVA-1.5's projector 'mlp' (linear, GELU, linear)");
  if (!flag(f, "clip.has_llava_projector", true)) fail(w, "clip.has_llava_projector is false: the file holds no projector");
  // Later LLaVA generations and other models on the same projector type.
  if (f.has("clip.vision.image_grid_pinpoints"))
    fail(w, "has clip.vision.image_grid_pinpoints, a LLaVA-1.6 (any-resolution tiles) file; prefixkv reads LLaVA-1.5's");
  if (f.has("clip.vision.mm_patch_merge_type") && f.str("clip.vision.mm_patch_merge_type") != "flat")
    fail(w, "clip.vision.mm_patch_merge_type is '" + f.str("clip.vision.mm_patch_merge_type") +
                "', a LLaVA-1.6 file; prefixkv reads LLaVA-1.5's (flat)");
  if (f.has("clip.minicpmv_version")) fail(w, "has clip.minicpmv_version, a MiniCPM-V file; prefixkv reads LLaVA-1.5's");
  const std::pair<const char*, const char*> foreign[] = {
      {"mm.3.weight", "a projector with layer norms (llama.cpp's mlp_norm)"},
      {"v.image_newline", "LLaVA-1.6's row separator"},
      {"v.post_ln.weight", "a layer norm after the selected layer"},
      {"v.patch_embd.bias", "a patch-embedding bias"},
      {"v.blk.0.attn_qkv.weight", "fused q/k/v projections"},
  };
  for (const auto& [t, what] : foreign)
    if (f.find(t)) fail(w, "holds the tensor '" + std::string(t) + "' (" + what + "), which LLaVA-1.5's CLIP tower has not");
  if (!f.find("v.class_embd"))
    fail(w, "lacks the tensor 'v.class_embd': a tower without a class token is not LLaVA-1.5's CLIP");
  const bool gelu = flag(f, "clip.use_gelu", false), silu = flag(f, "clip.use_silu", false);
  if (gelu && silu) fail(w, "sets both clip.use_gelu and clip.use_silu");

  auto positive = [&](const std::string& k) {
    const int64_t x = f.integer(k);
    if (x < 1 || x > (int64_t(1) << 24)) fail(w, k + " is " + std::to_string(x) + ", not a size");
    return int(x);
  };
  VisionConfig& v = cfg.vision;
  v.image_size = positive("clip.vision.image_size");
  v.patch = positive("clip.vision.patch_size");
  if (v.image_size % v.patch != 0)
    fail(w, "clip.vision.image_size " + std::to_string(v.image_size) + " is not a whole number of patches of " +
                std::to_string(v.patch));
  v.hidden = positive("clip.vision.embedding_length");
  v.intermediate = positive("clip.vision.feed_forward_length");
  v.n_heads = positive("clip.vision.attention.head_count");
  v.n_layers = positive("clip.vision.block_count");
  if (v.hidden % v.n_heads != 0)
    fail(w, "clip.vision.embedding_length " + std::to_string(v.hidden) + " is not a multiple of the " +
                std::to_string(v.n_heads) + " heads");
  if (f.has("clip.vision.attention.head_dim") && positive("clip.vision.attention.head_dim") != v.hidden / v.n_heads)
    fail(w, "clip.vision.attention.head_dim is not embedding_length / head_count");
  if (f.has("clip.vision.attention.head_count_kv") && positive("clip.vision.attention.head_count_kv") != v.n_heads)
    fail(w, "clip.vision.attention.head_count_kv differs from head_count (CLIP's attention has no grouped heads)");
  v.eps = float(f.number("clip.vision.attention.layer_norm_epsilon"));
  v.act = gelu ? "gelu" : silu ? "silu" : "quick_gelu";
  v.channels = 3;

  // Feature layers: hidden-state indices (0 = the embeddings); without the key, the output of the
  // last stored layer (the legacy converter drops the layers past LLaVA's selected one).
  std::vector<int> layers;
  if (f.has("clip.vision.feature_layer")) {
    for (double x : f.numbers("clip.vision.feature_layer")) {
      if (x != std::floor(x) || x < 0 || x > v.n_layers)
        fail(w, "clip.vision.feature_layer holds " + (x == std::floor(x) ? std::to_string(int64_t(x)) : std::to_string(x)) +
                    "; this tower's hidden states are 0 to " +
                    std::to_string(v.n_layers) + " (clip.vision.block_count)");
      layers.push_back(int(x));
    }
    std::sort(layers.begin(), layers.end());  // clip.cpp stacks them in layer order
    layers.erase(std::unique(layers.begin(), layers.end()), layers.end());
    if (layers.empty()) fail(w, "clip.vision.feature_layer is empty");
  } else {
    layers = {v.n_layers};
  }
  cfg.feature_layers = layers;
  cfg.feature_strategy = "default";  // clip.cpp drops the class token
  cfg.projector_act = "gelu";        // LLaVA's (exact) GELU between mm.0 and mm.2
  cfg.projector_layers = 2;

  const std::vector<double> mean = f.numbers("clip.vision.image_mean"), sd = f.numbers("clip.vision.image_std");
  if (mean.size() != 3 || sd.size() != 3) fail(w, "clip.vision.image_mean and image_std must hold 3 values each");
  for (int c = 0; c < 3; ++c) {
    if (!(sd[size_t(c)] > 0)) fail(w, "clip.vision.image_std holds " + std::to_string(sd[size_t(c)]) + ", not a positive value");
    cfg.image.mean[size_t(c)] = float(mean[size_t(c)]);
    cfg.image.std[size_t(c)] = float(sd[size_t(c)]);
  }
  cfg.image.mode = "pad";  // llama.cpp pads LLaVA-1.5's images to a square
  cfg.image.crop = cfg.image.shortest_edge = v.image_size;
  cfg.image.source = w;

  // The projector must lead from this tower to the text model's embeddings.
  const GgufTensor* m0 = f.find("mm.0.weight");
  const GgufTensor* m2 = f.find("mm.2.weight");
  if (!m0 || !m2) fail(w, std::string("lacks the tensor '") + (m0 ? "mm.2.weight" : "mm.0.weight") +
                              "' (LLaVA-1.5's projector is mm.0, GELU, mm.2)");
  const int64_t in = int64_t(v.hidden) * int64_t(layers.size()), H = cfg.text.hidden;
  if (m0->ne.size() != 2 || m0->ne[0] != in)
    fail(w, "mm.0.weight " + shape_str(m0->ne) + " does not take the tower's " + std::to_string(in) +
                " features (embedding_length x " + std::to_string(layers.size()) + " feature layers)");
  if (m0->ne[1] != H || m2->ne != std::vector<int64_t>{H, H})
    fail(w, "the projector (mm.0.weight " + shape_str(m0->ne) + ", mm.2.weight " + shape_str(m2->ne) +
                ") does not give embeddings of the text model's hidden size " + std::to_string(H) +
                " (llama.embedding_length of " + cfg.dir + ")");
  cfg.has_vision = true;
  cfg.architecture = "LlavaForConditionalGeneration";
}

std::unique_ptr<TensorStore> gguf_mmproj_store(std::shared_ptr<const GgufFile> f, const ModelConfig& cfg) {
  const VisionConfig& v = cfg.vision;
  const int64_t D = v.hidden, F = v.intermediate, H = cfg.text.hidden;
  std::vector<TensorView> views;
  // Tensor `gname` with ggml shape `ne`, stored as `name`.
  auto add = [&](const std::string& gname, std::vector<int64_t> ne, const std::string& name) {
    const GgufTensor* g = f->find(gname);
    if (g && g->ne != ne)
      fail(f->where(), "tensor '" + gname + "' is " + shape_str(g->ne) + ", not " + shape_str(ne) +
                           " as the file's clip.vision.* sizes imply");
    views.push_back(gguf_view(*f, gname, name, false));
  };
  auto linear = [&](const std::string& g, int64_t in, int64_t out, const std::string& name) {
    add(g + ".weight", {in, out}, name + ".weight");
    add(g + ".bias", {out}, name + ".bias");
  };
  auto norm = [&](const std::string& g, const std::string& name) {
    add(g + ".weight", {D}, name + ".weight");
    add(g + ".bias", {D}, name + ".bias");
  };
  const std::string e = "vision_model.embeddings.";
  add("v.patch_embd.weight", {v.patch, v.patch, 3, D}, e + "patch_embedding.weight");
  add("v.class_embd", {D}, e + "class_embedding");
  add("v.position_embd.weight", {D, int64_t(v.n_patches()) + 1}, e + "position_embedding.weight");
  norm("v.pre_ln", "vision_model.pre_layrnorm");
  for (int i = 0; i < v.n_layers; ++i) {
    const std::string b = "v.blk." + std::to_string(i) + ".", p = "vision_model.encoder.layers." + std::to_string(i) + ".";
    linear(b + "attn_q", D, D, p + "self_attn.q_proj");
    linear(b + "attn_k", D, D, p + "self_attn.k_proj");
    linear(b + "attn_v", D, D, p + "self_attn.v_proj");
    linear(b + "attn_out", D, D, p + "self_attn.out_proj");
    norm(b + "ln1", p + "layer_norm1");
    norm(b + "ln2", p + "layer_norm2");
    // fc1 / fc2 under either naming, told apart as clip.cpp does: ffn_down taking the embedding
    // (ne[0] = embedding_length) is fc1, the legacy converter's name.
    const GgufTensor* down = f->find(b + "ffn_down.weight");
    const bool legacy = down && !down->ne.empty() && down->ne[0] == D;
    linear(b + (legacy ? "ffn_down" : "ffn_up"), D, F, p + "mlp.fc1");
    linear(b + (legacy ? "ffn_up" : "ffn_down"), F, D, p + "mlp.fc2");
  }
  linear("mm.0", D * int64_t(cfg.feature_layers.size()), H, "multi_modal_projector.linear_1");
  linear("mm.2", H, H, "multi_modal_projector.linear_2");
  return TensorStore::from_views(f->where(), std::move(views), {}, f);
}

std::unique_ptr<Tokenizer> gguf_tokenizer(const std::string& path) {
  const auto f = GgufFile::open(path, false);
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

std::unique_ptr<Model> Model::load_gguf(const std::string& path, const std::string& mmproj) {
  std::shared_ptr<const GgufFile> f = GgufFile::open(path);
  auto m = std::unique_ptr<Model>(new Model());
  m->cfg_ = gguf_config(*f);
  std::unique_ptr<TensorStore> vision;
  if (!mmproj.empty()) {
    std::shared_ptr<const GgufFile> p = GgufFile::open(mmproj);
    gguf_mmproj_config(*p, m->cfg_);
    // The image's positions hold the vocabulary's <image> piece where it has one (as llava-hf's
    // input ids do), else the original LLaVA's marker.
    const std::vector<std::string> pieces = f->strings("tokenizer.ggml.tokens");
    const auto it = std::find(pieces.begin(), pieces.end(), "<image>");
    m->cfg_.image_token_index = it != pieces.end() ? int(it - pieces.begin()) : -200;
    vision = gguf_mmproj_store(p, m->cfg_);
  }
  m->lw_ = load_weights(m->cfg_, gguf_tensor_store(f, m->cfg_), std::move(vision));
  const TextConfig& t = m->cfg_.text;
  m->rope_ = ops::Rope::make(t.head_dim, t.rope_theta, t.rope_type, t.rope_factor, t.rope_low_freq_factor,
                             t.rope_high_freq_factor, t.rope_original_max_positions);
  return m;
}

}  // namespace pkv
