#include "model/model.h"

#include "model/gguf_load.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>

#include "core/error.h"
#include "core/threads.h"
#include "model/clip.h"

namespace pkv {

std::unique_ptr<Model> Model::load(const std::string& dir, const LoadOptions& opt) {
  if (is_gguf_path(dir)) {
    if (!opt.vision_tower_dir.empty())
      fail("--vision-tower", "is not read with a GGUF model (its vision tower comes from --mmproj FILE.gguf)");
    return load_gguf(dir, opt.mmproj);
  }
  if (!opt.mmproj.empty())
    fail("--mmproj", "is read beside a GGUF language model (--model FILE.gguf), not with the checkpoint " + dir);
  auto m = std::unique_ptr<Model>(new Model());
  m->cfg_ = load_config(dir, opt.vision_tower_dir);
  m->lw_ = load_weights(m->cfg_);
  const TextConfig& t = m->cfg_.text;
  m->rope_ = ops::Rope::make(t.head_dim, t.rope_theta, t.rope_type, t.rope_factor, t.rope_low_freq_factor,
                             t.rope_high_freq_factor, t.rope_original_max_positions);
  return m;
}

std::unique_ptr<Model> Model::random(ModelConfig cfg, DType dtype, uint64_t seed) {
  const TextConfig& t = cfg.text;
  if (t.hidden < 1 || t.n_layers < 1 || t.n_heads < 1 || t.n_kv_heads < 1 || t.n_heads % t.n_kv_heads ||
      t.head_dim < 2 || t.head_dim % 2 || t.intermediate < 1 || t.vocab_size < 2)
    fail("random model", "invalid shape (hidden " + std::to_string(t.hidden) + ", layers " + std::to_string(t.n_layers) +
                             ", heads " + std::to_string(t.n_heads) + "/" + std::to_string(t.n_kv_heads) + ")");
  cfg.layout = Layout::Llama;
  cfg.architecture = "LlamaForCausalLM";
  cfg.has_vision = false;
  std::vector<OwnedTensor> ts;
  auto add = [&](const std::string& name, std::vector<int64_t> shape, bool ones) {
    OwnedTensor o;
    o.name = name;
    o.dtype = dtype;
    o.shape = std::move(shape);
    size_t n = 1;
    for (int64_t d : o.shape) n *= size_t(d);
    o.data.resize(n * dtype_size(dtype));
    const uint64_t tseed = seed ^ (std::hash<std::string>{}(name) * 0x9E3779B97F4A7C15ull);
    const float a = 0.02f * std::sqrt(3.f);  // uniform [-a, a] has standard deviation 0.02
    parallel_for(n, 1 << 16, [&](size_t b, size_t e, int) {
      uint64_t s = tseed + b * 0xD1B54A32D192ED03ull;
      for (size_t i = b; i < e; ++i) {
        s ^= s << 13, s ^= s >> 7, s ^= s << 17;  // xorshift64
        const float v = ones ? 1.f : a * (float(s >> 40) * (2.f / 16777216.f) - 1.f);
        if (dtype == DType::F32) {
          std::memcpy(&o.data[i * 4], &v, 4);
        } else {
          const uint16_t h = dtype == DType::BF16 ? f32_to_bf16(v) : f32_to_f16(v);
          std::memcpy(&o.data[i * 2], &h, 2);
        }
      }
    });
    ts.push_back(std::move(o));
  };
  const int64_t D = t.hidden, qd = int64_t(t.n_heads) * t.head_dim, kvd = int64_t(t.n_kv_heads) * t.head_dim;
  add("model.embed_tokens.weight", {t.vocab_size, D}, false);
  for (int l = 0; l < t.n_layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    add(p + "input_layernorm.weight", {D}, true);
    add(p + "post_attention_layernorm.weight", {D}, true);
    add(p + "self_attn.q_proj.weight", {qd, D}, false);
    add(p + "self_attn.k_proj.weight", {kvd, D}, false);
    add(p + "self_attn.v_proj.weight", {kvd, D}, false);
    add(p + "self_attn.o_proj.weight", {D, qd}, false);
    add(p + "mlp.gate_proj.weight", {t.intermediate, D}, false);
    add(p + "mlp.up_proj.weight", {t.intermediate, D}, false);
    add(p + "mlp.down_proj.weight", {D, t.intermediate}, false);
  }
  add("model.norm.weight", {D}, true);
  if (!t.tie_embeddings) add("lm_head.weight", {t.vocab_size, D}, false);
  auto m = std::unique_ptr<Model>(new Model());
  m->cfg_ = cfg;
  m->lw_ = load_weights(m->cfg_, TensorStore::from_memory("random weights (" + std::string(dtype_name(dtype)) + ")",
                                                          std::move(ts)));
  m->rope_ = ops::Rope::make(t.head_dim, t.rope_theta, t.rope_type, t.rope_factor, t.rope_low_freq_factor,
                             t.rope_high_freq_factor, t.rope_original_max_positions);
  return m;
}

const std::vector<float>& Model::output_gram(int layer) const {
  const TextConfig& t = cfg_.text;
  PKV_ASSERT(layer >= 0 && layer < t.n_layers);
  std::call_once(gram_once_, [&] {
    std::vector<std::vector<float>> grams(static_cast<size_t>(t.n_layers));
    for (int l = 0; l < t.n_layers; ++l) {
      grams[size_t(l)].resize(size_t(t.n_heads) * t.head_dim * t.head_dim);
      ops::output_gram(*weights().lm.layers[size_t(l)].o.w, t.n_heads, t.head_dim, grams[size_t(l)].data());
    }
    gram_ = std::move(grams);
  });
  return gram_[size_t(layer)];
}

size_t Model::weight_bytes() const {
  size_t s = 0;
  for (auto& [n, t] : lw_->store->all())
    s += !t->supported ? 0 : t->quant ? size_t(t->shape[0]) * ops::weight_row_bytes(*t, t->shape[1]) : size_t(t->numel()) * dtype_size(t->dtype);
  if (lw_->vision_store)
    for (auto& [n, t] : lw_->vision_store->all()) s += size_t(t->numel()) * (t->supported ? dtype_size(t->dtype) : 0);
  return s;
}

static void emit(Observer* obs, const char* name, int layer, const float* data, std::vector<int64_t> shape) {
  if (obs && obs->wants(name)) obs->on_tensor(name, layer, data, shape);
}

// The parts of a decoder layer that act on each row alone, shared by decode() and decode_batch();
// `lin` is ops::linear (a prompt: BLAS) or ops::linear_rows (a batch of single tokens).
using LinearFn = void (*)(const float*, int, const Linear&, float*);

// h = attn_norm(x); q, k, v = projections of h with RoPE at `pos`.
static void qkv_rows(const TextConfig& t, const ops::Rope& rope, const LlamaLayer& L, LinearFn lin, const float* x,
                     int rows, const int32_t* pos, float* h, float* q, float* k, float* v) {
  ops::rms_norm(x, rows, t.hidden, L.attn_norm, t.rms_eps, h);
  lin(h, rows, L.q, q);
  lin(h, rows, L.k, k);
  lin(h, rows, L.v, v);
  rope.apply(q, rows, t.n_heads, pos);
  rope.apply(k, rows, t.n_kv_heads, pos);
}

// x += o(att); x += down(silu(gate(norm(x))) * up(norm(x))).
static void finish_rows(const TextConfig& t, const LlamaLayer& L, LinearFn lin, float* x, int rows, const float* att,
                        float* h, float* gate, float* up) {
  const size_t n = size_t(rows) * size_t(t.hidden);
  lin(att, rows, L.o, h);
  for (size_t i = 0; i < n; ++i) x[i] += h[i];
  ops::rms_norm(x, rows, t.hidden, L.mlp_norm, t.rms_eps, h);
  lin(h, rows, L.gate, gate);
  lin(h, rows, L.up, up);
  ops::swiglu(gate, up, size_t(rows) * size_t(t.intermediate));
  lin(gate, rows, L.down, h);
  for (size_t i = 0; i < n; ++i) x[i] += h[i];
}

// The rows attention reads: float32, or a 16-bit cache's words (ops::AttentionArgs::kv_dtype).
static void set_kv_rows(ops::AttentionArgs& a, DType t, const void* k, const void* v) {
  a.kv_dtype = t;
  if (t == DType::F32) {
    a.k = static_cast<const float*>(k);
    a.v = static_cast<const float*>(v);
  } else {
    a.k16 = static_cast<const uint16_t*>(k);
    a.v16 = static_cast<const uint16_t*>(v);
  }
}

void attend_layer(const TextConfig& t, KVLayer& kv, const float* q, const float* k, const float* v, int n_q,
                  const int32_t* pos, float* out, std::vector<float>* imp, int imp_from, bool imp_per_kv_head) {
  kv.append(k, v, pos, n_q);
  if (kv.per_head()) {
    // Each KV head over its own entries: the query heads of its group, with their rows' strides.
    if (imp) fail("attention", "the importance of a layer whose heads hold their own entries is not measured");
    const int group = t.n_heads / t.n_kv_heads, qd = t.n_heads * t.head_dim;
    for (int g = 0; g < t.n_kv_heads; ++g) {
      ops::AttentionArgs a;
      a.q = q + size_t(g) * group * t.head_dim;
      a.q_stride = qd;
      a.n_q = n_q;
      a.q_pos = pos;
      set_kv_rows(a, kv.dtype(), kv.head_key_data(g), kv.head_value_data(g));
      a.n_kv = kv.size(g);
      a.kv_stride = t.head_dim;
      a.kv_pos = kv.head_positions(g);
      a.n_heads = group;
      a.n_kv_heads = 1;
      a.head_dim = t.head_dim;
      a.scale = 1.f / std::sqrt(float(t.head_dim));
      a.out = out + size_t(g) * group * t.head_dim;
      a.out_stride = qd;
      ops::attention(a);
    }
    return;
  }
  ops::AttentionArgs a;
  a.q = q;
  a.n_q = n_q;
  a.q_pos = pos;
  set_kv_rows(a, kv.dtype(), kv.key_data(), kv.value_data());
  a.n_kv = kv.size();
  a.kv_stride = t.n_kv_heads * t.head_dim;
  a.kv_pos = kv.positions();
  a.n_heads = t.n_heads;
  a.n_kv_heads = t.n_kv_heads;
  a.head_dim = t.head_dim;
  a.scale = 1.f / std::sqrt(float(t.head_dim));
  a.out = out;
  if (imp) {
    imp->assign(size_t(kv.size()) * (imp_per_kv_head ? size_t(t.n_kv_heads) : 1), 0.f);
    a.importance = imp->data();
    a.importance_from = imp_from;
    a.importance_per_kv_head = imp_per_kv_head;
  }
  ops::attention(a);
}

std::vector<float> Model::encode_image(const float* pixels, Observer* obs) const {
  PKV_ASSERT(cfg_.has_vision);
  const VisionConfig& v = cfg_.vision;
  const ClipWeights& w = lw_->w.vision;
  const int S = v.image_size, G = v.grid(), D = v.hidden, N = v.n_patches() + 1;
  emit(obs, "pixel_values", -1, pixels, {3, S, S});

  // Patch embedding: the patches as rows (clip::unfold_patches), then a matmul.
  const std::vector<float> cols = clip::unfold_patches(v, pixels);
  std::vector<float> x(size_t(N) * D);
  ops::linear(cols.data(), G * G, w.patch, x.data() + D);
  std::copy(w.class_emb.begin(), w.class_emb.end(), x.begin());
  for (size_t i = 0; i < x.size(); ++i) x[i] += w.pos_emb[i];
  ops::layer_norm(x.data(), N, D, w.pre_norm, v.eps, x.data());

  const ops::Act act = ops::act_from_name(v.act.c_str());
  const int H = v.n_heads, hd = D / H;
  std::vector<float> h(size_t(N) * D), q(h.size()), k(h.size()), vv(h.size()), att(h.size()), mlp(size_t(N) * v.intermediate);
  // hidden_states[0] is the embedding output; hidden_states[i + 1] the output of layer i.
  const std::vector<int> wanted = clip::feature_hidden_states(cfg_);
  std::vector<std::vector<float>> selected(wanted.size());
  auto keep_if_selected = [&](int idx) {
    for (size_t s = 0; s < wanted.size(); ++s)
      if (wanted[s] == idx) selected[s] = x;
  };
  keep_if_selected(0);
  for (size_t li = 0; li < w.layers.size(); ++li) {
    const ClipLayer& L = w.layers[li];
    ops::layer_norm(x.data(), N, D, L.ln1, v.eps, h.data());
    ops::linear(h.data(), N, L.q, q.data());
    ops::linear(h.data(), N, L.k, k.data());
    ops::linear(h.data(), N, L.v, vv.data());
    ops::AttentionArgs a;
    a.q = q.data();
    a.n_q = N;
    a.k = k.data();
    a.v = vv.data();
    a.n_kv = N;
    a.kv_stride = D;
    a.n_heads = a.n_kv_heads = H;
    a.head_dim = hd;
    a.scale = 1.f / std::sqrt(float(hd));
    a.out = att.data();
    ops::attention(a);
    ops::linear(att.data(), N, L.o, h.data());
    for (size_t i = 0; i < x.size(); ++i) x[i] += h[i];
    ops::layer_norm(x.data(), N, D, L.ln2, v.eps, h.data());
    ops::linear(h.data(), N, L.fc1, mlp.data());
    ops::activate(mlp.data(), mlp.size(), act);
    ops::linear(mlp.data(), N, L.fc2, h.data());
    for (size_t i = 0; i < x.size(); ++i) x[i] += h[i];
    emit(obs, "vision_layer_out", int(li), x.data(), {N, D});
    keep_if_selected(int(li) + 1);
  }

  // Feature selection: the selected layers side by side, CLS dropped for "default".
  clip::Features joined = clip::join_features(cfg_, selected, N, D);
  const int T = joined.rows, F = joined.width;
  std::vector<float> feats = std::move(joined.data);
  emit(obs, "vision_features", -1, feats.data(), {T, F});

  // Projector: linear (act linear)*.
  const ops::Act pact = ops::act_from_name(cfg_.projector_act.c_str());
  std::vector<float> cur = std::move(feats);
  const auto& P_layers = lw_->w.projector.layers;
  for (size_t i = 0; i < P_layers.size(); ++i) {
    std::vector<float> next(size_t(T) * P_layers[i].out);
    ops::linear(cur.data(), T, P_layers[i], next.data());
    if (i + 1 < P_layers.size()) ops::activate(next.data(), next.size(), pact);
    cur = std::move(next);
  }
  emit(obs, "projector_output", -1, cur.data(), {T, cfg_.text.hidden});
  return cur;
}

void Model::embed(const int32_t* ids, int n, float* out) const {
  const TextConfig& t = cfg_.text;
  const TensorView& E = *lw_->w.lm.embed;
  for (int i = 0; i < n; ++i) {
    if (ids[i] < 0 || ids[i] >= t.vocab_size)
      fail("prompt", "token id " + std::to_string(ids[i]) + " is outside the vocabulary of " + std::to_string(t.vocab_size));
    ops::weight_row(E, ids[i], t.hidden, out + size_t(i) * t.hidden);
  }
}

void Model::decode(const float* x_in, int T, const int32_t* pos, KVCache& cache, const DecoderCall& call) const {
  const TextConfig& t = cfg_.text;
  const LlamaWeights& w = lw_->w.lm;
  const int D = t.hidden, qd = t.n_heads * t.head_dim, kvd = t.n_kv_heads * t.head_dim;
  std::vector<float> x(x_in, x_in + size_t(T) * D);
  std::vector<float> h(size_t(T) * D), q(size_t(T) * qd), k(size_t(T) * kvd), v(size_t(T) * kvd), att(size_t(T) * qd);
  std::vector<float> gate(size_t(T) * t.intermediate), up(size_t(T) * t.intermediate);
  Observer* obs = call.observer;
  if (call.importance) call.importance->resize(size_t(t.n_layers));
  for (int l = 0; l < t.n_layers; ++l) {
    const LlamaLayer& L = w.layers[size_t(l)];
    qkv_rows(t, rope_, L, ops::linear, x.data(), T, pos, h.data(), q.data(), k.data(), v.data());
    if (call.show_queries) emit(obs, "attn_q", l, q.data(), {T, qd});  // after RoPE
    attend_layer(t, cache.layer(l), q.data(), k.data(), v.data(), T, pos, att.data(),
                 call.importance ? &(*call.importance)[size_t(l)] : nullptr, call.importance_from,
                 call.importance_per_kv_head);
    finish_rows(t, L, ops::linear, x.data(), T, att.data(), h.data(), gate.data(), up.data());
    emit(obs, "layer_out", l, x.data(), {T, D});
  }
  ops::rms_norm(x.data(), T, D, w.norm, t.rms_eps, x.data());
  emit(obs, "hidden_final", -1, x.data(), {T, D});
  if (!call.logits_rows.empty()) {
    PKV_ASSERT(call.logits_out);
    const int R = int(call.logits_rows.size());
    std::vector<float> rows(size_t(R) * D);
    for (int r = 0; r < R; ++r) {
      PKV_ASSERT(call.logits_rows[size_t(r)] >= 0 && call.logits_rows[size_t(r)] < T);
      std::memcpy(&rows[size_t(r) * D], &x[size_t(call.logits_rows[size_t(r)]) * D], sizeof(float) * D);
    }
    ops::linear(rows.data(), R, w.head, call.logits_out);
    emit(obs, "logits", -1, call.logits_out, {R, t.vocab_size});
  }
}

void Model::decode_batch(const float* x_in, int B, const int32_t* pos, const std::vector<KVCache*>& caches,
                         const std::vector<std::vector<std::vector<float>>*>& importance, float* logits_out) const {
  PKV_ASSERT(int(caches.size()) == B && (importance.empty() || int(importance.size()) == B));
  const TextConfig& t = cfg_.text;
  const LlamaWeights& w = lw_->w.lm;
  const int D = t.hidden, qd = t.n_heads * t.head_dim, kvd = t.n_kv_heads * t.head_dim;
  std::vector<float> x(x_in, x_in + size_t(B) * D);
  std::vector<float> h(size_t(B) * D), q(size_t(B) * qd), k(size_t(B) * kvd), v(size_t(B) * kvd), att(size_t(B) * qd);
  std::vector<float> gate(size_t(B) * t.intermediate), up(size_t(B) * t.intermediate);
  for (int b = 0; b < B; ++b)
    if (!importance.empty() && importance[size_t(b)]) importance[size_t(b)]->resize(size_t(t.n_layers));
  for (int l = 0; l < t.n_layers; ++l) {
    const LlamaLayer& L = w.layers[size_t(l)];
    qkv_rows(t, rope_, L, ops::linear_rows, x.data(), B, pos, h.data(), q.data(), k.data(), v.data());
    for (int b = 0; b < B; ++b)  // attention: each sequence over its own cache
      attend_layer(t, caches[size_t(b)]->layer(l), &q[size_t(b) * qd], &k[size_t(b) * kvd], &v[size_t(b) * kvd], 1,
                   &pos[b], &att[size_t(b) * qd],
                   !importance.empty() && importance[size_t(b)] ? &(*importance[size_t(b)])[size_t(l)] : nullptr, 0);
    finish_rows(t, L, ops::linear_rows, x.data(), B, att.data(), h.data(), gate.data(), up.data());
  }
  ops::rms_norm(x.data(), B, D, w.norm, t.rms_eps, x.data());
  ops::linear_rows(x.data(), B, w.head, logits_out);
}

}  // namespace pkv
