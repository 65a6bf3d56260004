#include "engine/backend.h"

#include <chrono>

#include "core/error.h"
#include "engine/decoding.h"

namespace pkv {

std::vector<int> Backend::Sequence::entries_per_layer() const {
  std::vector<int> e;
  for (int l = 0; l < entries().n_layers(); ++l) e.push_back(entries().size(l));
  return e;
}

void Backend::step(Sequence& seq, int32_t token, float* logits, Observer* obs) {
  if (obs) fail("--dump-tensors", "the " + name() + " back end does not show its tensors to an observer (use the CPU)");
  step_many({&seq}, &token, logits);
}

void Backend::use_for_images(PromptRequest& req, Observer* obs) {
  req.encode_image = [this, obs](const float* pixels) { return encode_image(pixels, obs); };
}

namespace {

class CpuBackend : public Backend {
 public:
  explicit CpuBackend(const Model& model) : model_(model) {}

  class CpuSequence : public Sequence {
   public:
    CpuSequence(const Model& model, KVPolicy& policy) : session(model, policy) {}
    int position() const override { return session.position(); }
    const CacheView& entries() const override { return session.cache(); }
    size_t kv_bytes() const override { return session.cache().bytes(); }
    std::vector<size_t> kv_bytes_per_layer() const override { return session.cache().bytes_per_layer(); }
    const KVPolicy& policy() const override { return session.policy(); }
    Session session;
  };

  std::string name() const override { return "cpu"; }
  std::string description() const override { return "cpu"; }
  const Model& model() const override { return model_; }
  std::vector<float> encode_image(const float* pixels, Observer* obs) override {
    return model_.encode_image(pixels, obs);
  }
  std::unique_ptr<Sequence> prefill(const PreparedPrompt& p, KVPolicy& policy, float* logits, Observer* obs) override {
    auto s = std::make_unique<CpuSequence>(model_, policy);
    s->session.prefill(p, logits, obs);
    return s;
  }
  void step_many(const std::vector<Sequence*>& seqs, const int32_t* tokens, float* logits) override {
    std::vector<Session*> sessions;
    for (Sequence* s : seqs) sessions.push_back(&as_cpu(*s).session);
    Session::step_many(sessions, tokens, logits);
  }
  void step(Sequence& seq, int32_t token, float* logits, Observer* obs) override {
    as_cpu(seq).session.step(token, logits, obs);
  }
  size_t kv_entry_bytes() const override {
    const TextConfig& t = model_.config().text;
    return size_t(2) * size_t(t.n_kv_heads) * size_t(t.head_dim) * sizeof(float);
  }

 private:
  static CpuSequence& as_cpu(Sequence& s) {
    auto* c = dynamic_cast<CpuSequence*>(&s);
    PKV_ASSERT_MSG(c, "a sequence of another back end was given to the CPU back end");
    return *c;
  }
  const Model& model_;
};

double ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(const Model& model) { return std::make_unique<CpuBackend>(model); }

GenerationResult generate(Backend& backend, const Tokenizer& tok, const PreparedPrompt& p, const SamplingOptions& s,
                          KVPolicy& policy, const std::function<void(const std::string&)>& on_text, Observer* obs) {
  const ModelConfig& cfg = backend.model().config();
  const int T = int(p.ids.size()), V = cfg.text.vocab_size;
  if (T == 0) fail("prompt", "is empty");
  if (s.max_tokens < 0) fail("--max-tokens", "must not be negative");
  std::vector<float> logits(static_cast<size_t>(V));
  GenerationResult r;
  const auto t0 = std::chrono::steady_clock::now();
  std::unique_ptr<Backend::Sequence> seq = backend.prefill(p, policy, logits.data(), obs);
  r.prefill_ms = ms_since(t0);
  r.prompt_tokens = T;
  r.first_logits = logits;
  Decoding d(cfg, tok, s, T);
  const auto t1 = std::chrono::steady_clock::now();
  decode_to_end(d, logits, [&](int32_t token, float* out) { backend.step(*seq, token, out, obs); }, on_text);
  r.decode_ms = ms_since(t1);
  r.tokens = d.tokens();
  r.text = d.text();
  r.stop_reason = d.stop_reason();
  r.kv_bytes = seq->kv_bytes();
  r.kv_bytes_per_layer = seq->kv_bytes_per_layer();
  r.kv_entries_per_layer = seq->entries_per_layer();
  return r;
}

}  // namespace pkv
