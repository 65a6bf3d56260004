// A loaded model: LLaMA decoder, and for LLaVA the CLIP vision tower and projector.
// Weights are immutable and shared; per-sequence state lives in a KVCache passed to each call.
#pragma once
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "io/config.h"
#include "kv/kv_cache.h"
#include "model/observer.h"
#include "model/weights.h"
#include "ops/ops.h"

namespace pkv {

struct LoadOptions {
  std::string vision_tower_dir;  // separate CLIP checkpoint (original LLaVA layout)
  std::string mmproj;            // llama.cpp's vision file beside a GGUF language model
};

// Per-call options of the decoder forward pass.
struct DecoderCall {
  Observer* observer = nullptr;
  // Rows of x (0-based within this call) whose logits are wanted; logits_out is [rows.size(), vocab].
  std::vector<int> logits_rows;
  float* logits_out = nullptr;
  // Optional per-layer importance accumulation over the keys each layer holds after this call's
  // append (see ops::AttentionArgs::importance). importance->at(l) is resized to the layer's size.
  std::vector<std::vector<float>>* importance = nullptr;
  int importance_from = 0;  // first row of this call whose attention counts (0: all)
  // Shows the observer each layer's queries after RoPE ("attn_q", [T, n_heads * head_dim]; only when
  // asked: the GPU has no such tensor), for engine/query_importance.h.
  bool show_queries = false;
  // One row per KV head ([kv_heads * size], head-major; policy.h, ImportanceRequest::per_kv_head).
  bool importance_per_kv_head = false;
};

// One decoder layer's attention over its KV cache (the decoder's step, exposed for tests): appends
// k, v of n_q new tokens at `pos` [n_q] to the layer, then attends q [n_q, n_heads * head_dim] over
// everything it holds into out [n_q, n_heads * head_dim] (causal by position), each KV head over its
// own entries in a per-head layer; with `imp` (shared layers only), it is resized to the layer and
// receives the importance of queries >= imp_from (METHOD.md section 1); with imp_per_kv_head, one
// row per KV head ([n_kv_heads * size], head-major).
void attend_layer(const TextConfig& t, KVLayer& kv, const float* q, const float* k, const float* v, int n_q,
                  const int32_t* pos, float* out, std::vector<float>* imp, int imp_from, bool imp_per_kv_head = false);

class Model {
 public:
  static std::unique_ptr<Model> load(const std::string& dir, const LoadOptions& opt = {});
  // A LLaMA decoder of the given shape (cfg.text; text only, LlamaForCausalLM naming) with random
  // weights in `dtype`, held in memory: for benchmarks of any size without a download. Matrices
  // uniform with the standard deviation 0.02 of LLaMA's initialisation, norms 1; deterministic in
  // `seed`.
  static std::unique_ptr<Model> random(ModelConfig cfg, DType dtype, uint64_t seed);
  // A LLaMA language model from llama.cpp's GGUF, with the vision tower and projector of an mmproj
  // file when one is given (model/gguf_load.h; load() takes a .gguf path too).
  static std::unique_ptr<Model> load_gguf(const std::string& path, const std::string& mmproj = "");

  const ModelConfig& config() const { return cfg_; }
  const Weights& weights() const { return lw_->w; }
  bool has_vision() const { return cfg_.has_vision; }
  size_t weight_bytes() const;
  // Every stored tensor (name -> view), the separate vision tower's included.
  const std::map<std::string, const TensorView*>& tensors() const { return lw_->store->all(); }

  // pixels [3, S, S] -> image embeddings [image_tokens, text_hidden] (vision tower + projector).
  std::vector<float> encode_image(const float* pixels, Observer* obs = nullptr) const;

  // Token embeddings: out [n, hidden].
  void embed(const int32_t* ids, int n, float* out) const;

  // Runs the decoder on x [T, hidden] (the new tokens at absolute positions pos [T]), appending
  // their keys and values to `cache`, layer by layer, and attending over what each layer holds.
  void decode(const float* x, int T, const int32_t* pos, KVCache& cache, const DecoderCall& call) const;

  // Batched decoding: one new token for each of B sequences (x [B, hidden] at positions pos [B]),
  // sequence b appending to and attending over *caches[b]; logits_out [B, vocab]. Bit-identical to B
  // separate decode() calls with T = 1 (ops::linear_rows); importance (optional, one entry per
  // sequence, null where not wanted) as DecoderCall::importance.
  void decode_batch(const float* x, int B, const int32_t* pos, const std::vector<KVCache*>& caches,
                    const std::vector<std::vector<std::vector<float>>*>& importance, float* logits_out) const;

  // Layer `layer`'s Gram matrices of the output projection per query head: G_h = (W_o^h)^T W_o^h, with
  // W_o^h = W_o[:, h hd : (h+1) hd] ([hidden, head_dim]) the slice query head h's attention output
  // goes through, so ||W_o^h v||_2^2 = v^T G_h v for any v [head_dim] (engine/query_importance.h).
  // [n_heads * head_dim * head_dim]: head-major, each G_h row-major; float32 products (BLAS) of the
  // weights as float32, whatever their storage. Computed for all layers on the first call (thread-safe),
  // then kept with the model: n_layers * n_heads * head_dim^2 floats.
  const std::vector<float>& output_gram(int layer) const;

  // An empty cache for this model, keys and values stored as `kv_dtype` (kv/kv_cache.h).
  KVCache make_cache(DType kv_dtype = DType::F32) const {
    return KVCache(cfg_.text.n_layers, cfg_.text.n_kv_heads * cfg_.text.head_dim, cfg_.text.n_kv_heads, kv_dtype);
  }

 private:
  ModelConfig cfg_;
  std::unique_ptr<LoadedWeights> lw_;
  ops::Rope rope_;
  mutable std::once_flag gram_once_;
  mutable std::vector<std::vector<float>> gram_;  // output_gram: [layers][n_heads * head_dim^2]
};

}  // namespace pkv
