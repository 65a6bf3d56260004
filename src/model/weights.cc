#include "model/weights.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <set>

#include "core/error.h"

namespace fs = std::filesystem;

namespace pkv {
namespace {

// ---------------------------------------------------------------------------------------------
// The name table. Each row: a component's tensor-name prefix in one naming scheme, and the tensor
// whose presence identifies it. Rows are tried in order; the first whose probe exists is used.
//   llava-hf (hub)          language_model.model.*        vision_tower.vision_model.*   multi_modal_projector.linear_N
//   transformers 5 save     model.language_model.*        model.vision_tower.*          model.multi_modal_projector.linear_N
//   original LLaVA          model.*                       model.vision_tower.vision_tower.vision_model.*  model.mm_projector.{0,2}
//   LlamaForCausalLM        model.*
//   CLIPVisionModel (separate tower)                       vision_model.*
// ---------------------------------------------------------------------------------------------
struct PrefixRow {
  const char* prefix;
  const char* scheme;
};

const PrefixRow kLanguagePrefixes[] = {
    {"language_model.model.", "llava-hf"},
    {"model.language_model.", "transformers5"},
    {"language_model.", "transformers5"},
    {"model.", "original-or-llama"},
};
const char* const kLanguageProbe = "embed_tokens.weight";

const PrefixRow kHeadPrefixes[] = {
    {"language_model.lm_head.", "llava-hf"},
    {"lm_head.", "transformers5-or-original"},
};

const PrefixRow kVisionPrefixes[] = {
    {"vision_tower.vision_model.", "llava-hf"},
    {"model.vision_tower.vision_model.", "transformers5"},
    {"vision_tower.", "transformers5"},
    {"model.vision_tower.", "transformers5"},
    {"model.vision_tower.vision_tower.vision_model.", "original"},
    {"vision_model.", "clip"},
};
const char* const kVisionProbe = "embeddings.patch_embedding.weight";

struct ProjectorRow {
  const char* prefix;
  int first_index;  // linear_1, linear_2 ... (1) or Sequential indices 0, 2, 4 ... (0)
  int step;
};
const ProjectorRow kProjectorRows[] = {
    {"multi_modal_projector.linear_", 1, 1},
    {"model.multi_modal_projector.linear_", 1, 1},
    {"model.mm_projector.", 0, 2},
};

const char* find_prefix(const TensorStore& s, const PrefixRow* rows, size_t n, const char* probe, const char** scheme) {
  for (size_t i = 0; i < n; ++i) {
    if (s.has(std::string(rows[i].prefix) + probe)) {
      if (scheme) *scheme = rows[i].scheme;
      return rows[i].prefix;
    }
  }
  return nullptr;
}

class Resolver {
 public:
  Resolver(const TensorStore& s, std::string what) : s_(s), what_(std::move(what)) {}

  const TensorView& get(const std::string& name, std::vector<int64_t> shape, const std::string& why) const {
    const TensorView* t = s_.find(name);
    if (!t) fail(s_.source(), "missing tensor '" + name + "' (" + what_ + ")");
    if (!t->supported)
      fail(t->file, "tensor '" + name + "' has dtype " + t->dtype_str + "; weights must be F32, F16 or BF16");
    if (t->shape != shape) {
      TensorView tmp;
      tmp.shape = shape;
      fail(t->file, "tensor '" + name + "' has shape " + t->shape_str() + " but " + why + " implies " + tmp.shape_str());
    }
    return *t;
  }
  const TensorView* maybe(const std::string& name) const { return s_.find(name); }

  std::vector<float> vec(const std::string& name, int64_t n, const std::string& why) const {
    const TensorView& t = get(name, {n}, why);
    std::vector<float> out(static_cast<size_t>(n));
    to_f32(t.dtype, t.data, out.data(), size_t(n));
    return out;
  }
  std::vector<float> mat_f32(const std::string& name, std::vector<int64_t> shape, const std::string& why) const {
    const TensorView& t = get(name, shape, why);
    std::vector<float> out(size_t(t.numel()));
    to_f32(t.dtype, t.data, out.data(), out.size());
    return out;
  }
  Linear linear(const std::string& base, int out, int in, bool bias, const std::string& why) const {
    Linear l;
    l.w = &get(base + ".weight", {out, in}, why);
    l.in = in;
    l.out = out;
    if (bias) l.b = vec(base + ".bias", out, why);
    return l;
  }
  Norm layer_norm(const std::string& base, int dim, const std::string& why) const {
    return Norm{vec(base + ".weight", dim, why), vec(base + ".bias", dim, why)};
  }
  Norm rms_norm(const std::string& base, int dim, const std::string& why) const {
    return Norm{vec(base + ".weight", dim, why), {}};
  }
  const TensorStore& store() const { return s_; }

 private:
  const TensorStore& s_;
  std::string what_;
};

int count_layers(const TensorStore& s, const std::string& prefix) {
  std::set<int> ids;
  for (auto& [name, t] : s.all()) {
    if (name.rfind(prefix, 0) != 0) continue;
    size_t p = prefix.size(), e = name.find('.', p);
    if (e == std::string::npos) continue;
    try {
      ids.insert(std::stoi(name.substr(p, e - p)));
    } catch (...) {
    }
  }
  return ids.empty() ? 0 : *ids.rbegin() + 1;
}

void load_language(const Resolver& r, const std::string& lm, const std::string& head_prefix, const ModelConfig& cfg,
                   LlamaWeights& w) {
  const TextConfig& t = cfg.text;
  const std::string why = "text config (hidden_size " + std::to_string(t.hidden) + ", vocab_size " +
                          std::to_string(t.vocab_size) + ")";
  w.embed = &r.get(lm + "embed_tokens.weight", {t.vocab_size, t.hidden}, why);
  const int found = count_layers(r.store(), lm + "layers.");
  if (found != t.n_layers)
    fail(r.store().source(), "holds " + std::to_string(found) + " decoder layers but config num_hidden_layers is " +
                                 std::to_string(t.n_layers));
  const int qd = t.n_heads * t.head_dim, kvd = t.n_kv_heads * t.head_dim;
  for (int i = 0; i < t.n_layers; ++i) {
    const std::string p = lm + "layers." + std::to_string(i) + ".";
    const std::string lwhy = "text config (hidden " + std::to_string(t.hidden) + ", heads " + std::to_string(t.n_heads) +
                             "x" + std::to_string(t.head_dim) + ", kv heads " + std::to_string(t.n_kv_heads) +
                             ", intermediate " + std::to_string(t.intermediate) + ")";
    LlamaLayer L;
    L.attn_norm = r.rms_norm(p + "input_layernorm", t.hidden, lwhy);
    L.mlp_norm = r.rms_norm(p + "post_attention_layernorm", t.hidden, lwhy);
    L.q = r.linear(p + "self_attn.q_proj", qd, t.hidden, t.attention_bias, lwhy);
    L.k = r.linear(p + "self_attn.k_proj", kvd, t.hidden, t.attention_bias, lwhy);
    L.v = r.linear(p + "self_attn.v_proj", kvd, t.hidden, t.attention_bias, lwhy);
    L.o = r.linear(p + "self_attn.o_proj", t.hidden, qd, t.attention_bias, lwhy);
    L.gate = r.linear(p + "mlp.gate_proj", t.intermediate, t.hidden, t.mlp_bias, lwhy);
    L.up = r.linear(p + "mlp.up_proj", t.intermediate, t.hidden, t.mlp_bias, lwhy);
    L.down = r.linear(p + "mlp.down_proj", t.hidden, t.intermediate, t.mlp_bias, lwhy);
    w.layers.push_back(std::move(L));
  }
  w.norm = r.rms_norm(lm + "norm", t.hidden, why);
  if (!head_prefix.empty() && r.maybe(head_prefix + "weight")) {
    w.head = r.linear(head_prefix.substr(0, head_prefix.size() - 1), t.vocab_size, t.hidden, false, why);
  } else if (t.tie_embeddings) {
    w.head.w = w.embed;
    w.head.in = t.hidden;
    w.head.out = t.vocab_size;
  } else {
    fail(r.store().source(), "missing the output projection (lm_head.weight) and tie_word_embeddings is false");
  }
}

// Original LLaVA with the tower inside: its config has no CLIP section, so read the shape off the
// tensors. Heads follow the CLIP ViT convention of 64-dimensional heads (ViT-B/L/H all use it).
void infer_vision_config(const TensorStore& s, const std::string& vp, ModelConfig& cfg) {
  const TensorView* pe = s.find(vp + "embeddings.patch_embedding.weight");
  const TensorView* pos = s.find(vp + "embeddings.position_embedding.weight");
  const TensorView* fc1 = s.find(vp + "encoder.layers.0.mlp.fc1.weight");
  if (!pe || !pos || !fc1 || pe->shape.size() != 4 || pos->shape.size() != 2 || fc1->shape.size() != 2)
    fail(s.source(), "the vision tower tensors are incomplete (patch/position embedding or encoder.layers.0.mlp.fc1)");
  VisionConfig& v = cfg.vision;
  v.hidden = int(pe->shape[0]);
  v.patch = int(pe->shape[2]);
  const int grid = int(std::lround(std::sqrt(double(pos->shape[0] - 1))));
  if (int64_t(grid) * grid + 1 != pos->shape[0])
    fail(pos->file, "position embedding count " + std::to_string(pos->shape[0]) + " is not a square grid plus one");
  v.image_size = grid * v.patch;
  v.n_layers = count_layers(s, vp + "encoder.layers.");
  v.intermediate = int(fc1->shape[0]);
  if (v.hidden % 64 != 0)
    fail(pe->file, "cannot infer the vision tower's head count (hidden " + std::to_string(v.hidden) +
                       " is not a multiple of 64); pass the CLIP checkpoint with --vision-tower DIR");
  v.n_heads = v.hidden / 64;
  if (cfg.image.source == "defaults") cfg.image.crop = cfg.image.shortest_edge = v.image_size;
  for (int l : cfg.feature_layers)
    if (l == 0 || std::abs(l) > v.n_layers + 1)
      fail(cfg.dir + "/config.json", "mm_vision_select_layer " + std::to_string(l) + " is out of range");
}

void load_vision(const Resolver& r, const std::string& vp, const ModelConfig& cfg, ClipWeights& w) {
  const VisionConfig& v = cfg.vision;
  const std::string why = "vision config (hidden " + std::to_string(v.hidden) + ", patch " + std::to_string(v.patch) +
                          ", image " + std::to_string(v.image_size) + ", intermediate " + std::to_string(v.intermediate) + ")";
  const TensorView& pe = r.get(vp + "embeddings.patch_embedding.weight", {v.hidden, v.channels, v.patch, v.patch}, why);
  w.patch.w = &pe;  // [hidden, 3, p, p] is row-major [hidden, 3*p*p]
  w.patch.in = v.channels * v.patch * v.patch;
  w.patch.out = v.hidden;
  w.class_emb = r.vec(vp + "embeddings.class_embedding", v.hidden, why);
  w.pos_emb = r.mat_f32(vp + "embeddings.position_embedding.weight", {v.n_patches() + 1, v.hidden}, why);
  w.pre_norm = r.layer_norm(vp + "pre_layrnorm", v.hidden, why);
  const int found = count_layers(r.store(), vp + "encoder.layers.");
  if (found != v.n_layers)
    fail(r.store().source(), "holds " + std::to_string(found) + " vision encoder layers but the vision config says " +
                                 std::to_string(v.n_layers));
  // Only the layers up to the deepest selected feature layer are ever run.
  int needed = 0;
  for (int l : cfg.feature_layers) needed = std::max(needed, l < 0 ? v.n_layers + 1 + l : l);
  for (int i = 0; i < needed; ++i) {
    const std::string p = vp + "encoder.layers." + std::to_string(i) + ".";
    ClipLayer L;
    L.ln1 = r.layer_norm(p + "layer_norm1", v.hidden, why);
    L.ln2 = r.layer_norm(p + "layer_norm2", v.hidden, why);
    L.q = r.linear(p + "self_attn.q_proj", v.hidden, v.hidden, true, why);
    L.k = r.linear(p + "self_attn.k_proj", v.hidden, v.hidden, true, why);
    L.v = r.linear(p + "self_attn.v_proj", v.hidden, v.hidden, true, why);
    L.o = r.linear(p + "self_attn.out_proj", v.hidden, v.hidden, true, why);
    L.fc1 = r.linear(p + "mlp.fc1", v.intermediate, v.hidden, true, why);
    L.fc2 = r.linear(p + "mlp.fc2", v.hidden, v.intermediate, true, why);
    w.layers.push_back(std::move(L));
  }
}

void load_projector(const Resolver& r, const ModelConfig& cfg, ProjectorWeights& w) {
  const int in = cfg.vision.hidden * int(cfg.feature_layers.size());
  const int hid = cfg.text.hidden;
  const std::string why = "vision hidden " + std::to_string(in) + " -> text hidden " + std::to_string(hid);
  for (const ProjectorRow& row : kProjectorRows) {
    std::string first = std::string(row.prefix) + std::to_string(row.first_index);
    if (!r.maybe(first + ".weight")) continue;
    int n = cfg.layout == Layout::LlavaOriginal ? cfg.projector_layers : 2;
    for (int i = 0; i < n; ++i) {
      const std::string base = std::string(row.prefix) + std::to_string(row.first_index + i * row.step);
      w.layers.push_back(r.linear(base, hid, i == 0 ? in : hid, true, why));
    }
    return;
  }
  if (cfg.layout == Layout::LlavaOriginal && cfg.projector_layers == 1 && r.maybe("model.mm_projector.weight")) {
    w.layers.push_back(r.linear("model.mm_projector", hid, in, true, why));
    return;
  }
  fail(r.store().source(), "no multimodal projector tensors found (tried multi_modal_projector.linear_1, "
                           "model.multi_modal_projector.linear_1, model.mm_projector.0)");
}

}  // namespace

std::unique_ptr<LoadedWeights> load_weights(ModelConfig& cfg) { return load_weights(cfg, TensorStore::open(cfg.dir)); }

std::unique_ptr<LoadedWeights> load_weights(ModelConfig& cfg, std::unique_ptr<TensorStore> store,
                                            std::unique_ptr<TensorStore> vision_store) {
  auto lw = std::make_unique<LoadedWeights>();
  lw->store = std::move(store);
  lw->vision_store = std::move(vision_store);
  const bool projector_with_vision = lw->vision_store != nullptr;
  const TensorStore& s = *lw->store;
  const char* scheme = nullptr;
  const char* lm = find_prefix(s, kLanguagePrefixes, std::size(kLanguagePrefixes), kLanguageProbe, &scheme);
  if (!lm) fail(cfg.dir, "no language-model embedding tensor found (tried language_model.model.embed_tokens.weight, "
                         "model.language_model.embed_tokens.weight, model.embed_tokens.weight)");
  const char* head = find_prefix(s, kHeadPrefixes, std::size(kHeadPrefixes), "weight", nullptr);
  Resolver r(s, std::string(layout_name(cfg.layout)) + " checkpoint");
  load_language(r, lm, head ? head : "", cfg, lw->w.lm);
  lw->w.scheme = scheme;
  if (cfg.layout == Layout::LlavaHF && std::string(lm) != "language_model.model.") cfg.layout = Layout::LlavaV5;

  if (cfg.has_vision) {
    const TensorStore* vs = lw->vision_store ? lw->vision_store.get() : &s;
    if (!cfg.vision_tower_dir.empty()) {
      lw->vision_store = TensorStore::open(cfg.vision_tower_dir);
      vs = lw->vision_store.get();
    }
    const char* vscheme = nullptr;
    const char* vp = find_prefix(*vs, kVisionPrefixes, std::size(kVisionPrefixes), kVisionProbe, &vscheme);
    if (!vp) {
      if (cfg.layout == Layout::LlavaOriginal)
        fail(cfg.dir, "the checkpoint holds no vision tower; pass its CLIP checkpoint with --vision-tower DIR");
      fail(vs->source(), "no vision tower tensors found (tried vision_tower.vision_model.*, model.vision_tower.*, "
                         "model.vision_tower.vision_tower.vision_model.*, vision_model.*)");
    }
    if (cfg.vision_from_tensors) infer_vision_config(*vs, vp, cfg);
    Resolver vr(*vs, "vision tower");
    load_vision(vr, vp, cfg, lw->w.vision);
    load_projector(projector_with_vision ? vr : r, cfg, lw->w.projector);
    lw->w.scheme += std::string("+vision:") + vscheme;
  }
  return lw;
}

}  // namespace pkv
