#include "engine/engine.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <numeric>

#include "core/error.h"
#include "engine/backend.h"
#include "engine/query_importance.h"
#include "engine/decoding.h"

namespace pkv {

namespace {

double ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

uint64_t splitmix64(uint64_t& s) {
  uint64_t z = (s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

}  // namespace

PreparedPrompt Engine::prepare(const PromptRequest& req, Observer* obs) const {
  const ModelConfig& cfg = model_.config();
  const bool has_image = req.image != nullptr;
  const std::vector<int32_t> marked = prompt_ids(req);

  PreparedPrompt p;
  std::vector<float> image_emb;
  if (has_image) {
    ImageConfig ic = cfg.image;
    if (!req.image_mode.empty()) ic.mode = req.image_mode;
    auto t0 = std::chrono::steady_clock::now();
    p.pixels = preprocess_image(*req.image, ic);
    if (req.encode_image_on_device) {
      p.device_image = req.encode_image_on_device(p.pixels.data());
      if (!p.device_image) fail("image encoder", "returned no image");
    } else {
      image_emb = req.encode_image ? req.encode_image(p.pixels.data()) : model_.encode_image(p.pixels.data(), obs);
    }
    if (!p.device_image && image_emb.size() != size_t(cfg.image_tokens()) * size_t(cfg.text.hidden))
      fail("image encoder", "returned " + std::to_string(image_emb.size()) + " values, expected " +
                                std::to_string(cfg.image_tokens()) + " x " + std::to_string(cfg.text.hidden));
    p.vision_ms = ms_since(t0);
    p.image_tokens = cfg.image_tokens();
  }
  const int D = cfg.text.hidden;
  const int32_t image_id = cfg.layout == Layout::LlavaOriginal ? -200 : cfg.image_token_index;
  for (int32_t id : marked) {
    if (id == -1) {
      p.image_offset = int(p.ids.size());
      p.ids.insert(p.ids.end(), size_t(p.image_tokens), image_id);
    } else {
      p.ids.push_back(id);
    }
  }
  const int T = int(p.ids.size());
  if (T > cfg.text.max_positions)
    fail("prompt", "is " + std::to_string(T) + " tokens long" + (has_image ? " (with " + std::to_string(p.image_tokens) + " image tokens)" : "") +
                       ", more than the model's context of " + std::to_string(cfg.text.max_positions) + " tokens");
  if (p.device_image) return p;  // the device builds the rows from the ids and its image
  p.embeddings.resize(size_t(T) * D);
  for (int i = 0; i < T; ++i) {
    if (has_image && i >= p.image_offset && i < p.image_offset + p.image_tokens) {
      std::copy_n(&image_emb[size_t(i - p.image_offset) * D], D, &p.embeddings[size_t(i) * D]);
    } else {
      model_.embed(&p.ids[size_t(i)], 1, &p.embeddings[size_t(i) * D]);
    }
  }
  return p;
}

int sample_token(const float* logits, int vocab, const SamplingOptions& s, uint64_t& rng) {
  if (s.temperature <= 0.f) return int(std::max_element(logits, logits + vocab) - logits);
  std::vector<int> idx(static_cast<size_t>(vocab));
  std::iota(idx.begin(), idx.end(), 0);
  int keep = vocab;
  if (s.top_k > 0 && s.top_k < vocab) {
    std::partial_sort(idx.begin(), idx.begin() + s.top_k, idx.end(), [&](int a, int b) { return logits[a] > logits[b]; });
    keep = s.top_k;
  } else {
    std::sort(idx.begin(), idx.end(), [&](int a, int b) { return logits[a] > logits[b]; });
  }
  std::vector<double> prob(static_cast<size_t>(keep));
  const double mx = logits[idx[0]];
  double sum = 0;
  for (int i = 0; i < keep; ++i) sum += prob[size_t(i)] = std::exp((logits[idx[size_t(i)]] - mx) / s.temperature);
  if (s.top_p < 1.f) {
    double cum = 0;
    int n = 0;
    while (n < keep) {
      cum += prob[size_t(n)] / sum;
      ++n;
      if (cum >= s.top_p) break;
    }
    keep = std::max(1, n);
    sum = 0;
    for (int i = 0; i < keep; ++i) sum += prob[size_t(i)];
  }
  const double u = double(splitmix64(rng) >> 11) * (1.0 / 9007199254740992.0) * sum;
  double acc = 0;
  for (int i = 0; i < keep; ++i) {
    acc += prob[size_t(i)];
    if (u < acc) return idx[size_t(i)];
  }
  return idx[size_t(keep - 1)];
}

Session::Session(const Model& model, KVPolicy& policy, DType kv_dtype)
    : model_(model), policy_(policy), cache_(model.make_cache(kv_dtype)), x_(size_t(model.config().text.hidden)) {}

void Session::run_prompt(const PreparedPrompt& p, float* logits, Observer* obs, std::vector<std::vector<float>>* importance,
                         int importance_from, bool importance_per_kv_head) {
  const int T = int(p.ids.size());
  if (T == 0) fail("prompt", "is empty");
  PKV_ASSERT(pos_ == 0);
  if (p.embeddings.size() != size_t(T) * size_t(model_.config().text.hidden))
    fail("prompt", p.device_image ? "its image was encoded on another device (the GPU): prepare it for the CPU back end"
                                  : "holds " + std::to_string(p.embeddings.size()) + " embedding values for " +
                                        std::to_string(T) + " tokens");
  cache_.reserve(T + 64);
  std::vector<int32_t> pos(static_cast<size_t>(T));
  std::iota(pos.begin(), pos.end(), 0);
  DecoderCall call;
  call.observer = obs;
  if (logits) {
    call.logits_rows = {T - 1};
    call.logits_out = logits;
  }
  call.importance = importance;
  call.importance_from = importance_from;
  call.importance_per_kv_head = importance_per_kv_head;
  model_.decode(p.embeddings.data(), T, pos.data(), cache_, call);
  pos_ = T;
}

void Session::prefill(const PreparedPrompt& p, float* logits, Observer* obs) {
  const int T = int(p.ids.size());
  std::vector<std::vector<float>> importance;
  const ImportanceRequest req = policy_.prefill_importance(T);
  check_prompt_importance(req, T, true);
  if (req.extended()) {  // value weights, lookahead, reduces: measured from the uncompressed cache
    std::vector<float> own(logits ? 0 : size_t(model_.config().text.vocab_size));
    float* last = logits ? logits : own.data();
    run_prompt(p, last, obs, nullptr, 0);
    importance = extended_importance(model_, cache_, p, last, req);
  } else {
    run_prompt(p, logits, obs, req.needed ? &importance : nullptr, req.from, req.per_kv_head);
  }
  cache_.apply(policy_.after_prefill(cache_, importance, T), policy_.name());
}

std::vector<std::vector<std::vector<float>>> Session::prefill_uncompressed(const PreparedPrompt& p, float* logits,
                                                                           const std::vector<int>& importance_from,
                                                                           bool per_kv_head) {
  const int T = int(p.ids.size());
  for (int f : importance_from)
    if (f < 0 || f >= std::max(T, 1)) fail("prefill", "importance from query " + std::to_string(f) + " of a " + std::to_string(T) + "-token prompt");
  std::vector<std::vector<std::vector<float>>> imp(importance_from.size());
  run_prompt(p, logits, nullptr, imp.empty() ? nullptr : &imp[0], imp.empty() ? 0 : importance_from[0], per_kv_head);
  // Each further window: the same prompt again over a scratch cache (the attention pass measures
  // one window at a time).
  for (size_t i = 1; i < importance_from.size(); ++i) {
    Session scratch(model_, policy_, cache_.dtype());
    scratch.run_prompt(p, nullptr, nullptr, &imp[i], importance_from[i], per_kv_head);
  }
  return imp;
}

void Session::adopt_prefill(const KVCache& full, const std::vector<std::vector<float>>& importance, int N) {
  PKV_ASSERT(pos_ == 0);
  cache_ = full.clone();
  pos_ = N;
  cache_.apply(policy_.after_prefill(cache_, importance, N), policy_.name());
}

void Session::step(int32_t token, float* logits, Observer* obs) {
  const int32_t position = pos_;
  model_.embed(&token, 1, x_.data());
  std::vector<std::vector<float>> importance;
  DecoderCall call;
  call.observer = obs;
  call.logits_rows = {0};
  call.logits_out = logits;
  if (policy_.needs_decode_importance()) call.importance = &importance;
  model_.decode(x_.data(), 1, &position, cache_, call);
  ++pos_;
  cache_.apply(policy_.after_decode_step(cache_, pos_, call.importance ? &importance : nullptr), policy_.name());
}

void Session::step_many(const std::vector<Session*>& sessions, const int32_t* tokens, float* logits) {
  if (sessions.empty()) return;
  if (sessions.size() == 1) return sessions[0]->step(tokens[0], logits);
  const Model& model = sessions[0]->model_;
  const int B = int(sessions.size()), D = model.config().text.hidden;
  std::vector<float> x(size_t(B) * size_t(D));
  std::vector<int32_t> pos(static_cast<size_t>(B));
  std::vector<KVCache*> caches(static_cast<size_t>(B));
  std::vector<std::vector<std::vector<float>>> imp(static_cast<size_t>(B));
  std::vector<std::vector<std::vector<float>>*> imp_ptr(static_cast<size_t>(B), nullptr);
  for (int b = 0; b < B; ++b) {
    Session& s = *sessions[size_t(b)];
    PKV_ASSERT(&s.model_ == &model);
    model.embed(&tokens[b], 1, &x[size_t(b) * size_t(D)]);
    pos[size_t(b)] = s.pos_;
    caches[size_t(b)] = &s.cache_;
    if (s.policy_.needs_decode_importance()) imp_ptr[size_t(b)] = &imp[size_t(b)];
  }
  model.decode_batch(x.data(), B, pos.data(), caches, imp_ptr, logits);
  for (int b = 0; b < B; ++b) {
    Session& s = *sessions[size_t(b)];
    ++s.pos_;
    s.cache_.apply(s.policy_.after_decode_step(s.cache_, s.pos_, imp_ptr[size_t(b)]), s.policy_.name());
  }
}

GenerationResult Engine::generate(const PreparedPrompt& p, const SamplingOptions& s, KVPolicy& policy,
                                  const std::function<void(const std::string&)>& on_text, Observer* obs) const {
  const std::unique_ptr<Backend> cpu = make_cpu_backend(model_);
  return pkv::generate(*cpu, tok_, p, s, policy, on_text, obs);
}

}  // namespace pkv
