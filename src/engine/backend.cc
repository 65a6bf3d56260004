#include "engine/backend.h"

#include <chrono>
#include <cmath>

#include "core/error.h"
#include "engine/decoding.h"
#include "engine/query_importance.h"

namespace pkv {

std::vector<int> Backend::Sequence::entries_per_layer() const {
  const CacheView& c = entries();
  std::vector<int> e;
  for (int l = 0; l < c.n_layers(); ++l)
    e.push_back(c.per_head(l) ? int(std::lround(double(c.held(l)) / c.kv_heads())) : c.size(l));
  return e;
}

std::vector<std::vector<int>> Backend::Sequence::entries_per_head() const {
  const CacheView& c = entries();
  std::vector<std::vector<int>> e;
  if (c.kv_heads() == 0) return e;
  for (int l = 0; l < c.n_layers(); ++l) {
    e.emplace_back();
    for (int h = 0; h < c.kv_heads(); ++h) e.back().push_back(int(c.head_positions(l, h).size()));
  }
  return e;
}

const std::vector<std::vector<float>>& Backend::SharedPrefill::importance_for(int f) const {
  for (size_t i = 0; i < from.size(); ++i)
    if (from[i] == f) return importance[i];
  fail("shared prefill", "the importance from query " + std::to_string(f) + " was not measured (measured from: " +
                             [&] {
                               std::string m;
                               for (int x : from) m += (m.empty() ? "" : ", ") + std::to_string(x);
                               return m.empty() ? std::string("none") : m;
                             }() + ")");
}

void Backend::SharedPrefill::begin(const PreparedPrompt& p, int vocab, const std::vector<int>& windows) {
  prompt_len = int(p.ids.size());
  logits.assign(size_t(vocab), 0.f);
  from = windows;
}

void Backend::SharedPrefill::add_importance(int f, std::vector<std::vector<float>> imp) {
  for (int x : from)
    if (x == f) fail("shared prefill", "already holds the importance from query " + std::to_string(f));
  if (imp.empty() || (!importance.empty() && imp.size() != importance[0].size()))
    fail("shared prefill", "importance for " + std::to_string(imp.size()) + " layers, the prefill's has " +
                               std::to_string(importance.empty() ? 0 : importance[0].size()));
  for (size_t l = 0; l < imp.size(); ++l)
    if (int(imp[l].size()) != prompt_len)
      fail("shared prefill", "importance of layer " + std::to_string(l) + " has " + std::to_string(imp[l].size()) +
                                 " values for a " + std::to_string(prompt_len) + "-token prompt");
  from.push_back(f);
  importance.push_back(std::move(imp));
}

const std::vector<std::vector<float>>& Backend::SharedPrefill::head_importance_for(int f) const {
  for (size_t i = 0; i < head_from.size(); ++i)
    if (head_from[i] == f) return head_importance[i];
  fail("shared prefill", "the per-KV-head importance from query " + std::to_string(f) + " was not measured");
}

const std::vector<std::vector<float>>& Backend::SharedPrefill::importance_for(const KVPolicy& policy) const {
  static const std::vector<std::vector<float>> none;
  const ImportanceRequest req = policy.prefill_importance(prompt_len);
  if (!req.needed) return none;
  if (req.extended()) {
    for (size_t i = 0; i < extended_req.size(); ++i)
      if (extended_req[i] == req) return extended_importance[i];
    fail("shared prefill", "the extended importance " + policy.name() + " asks for was not measured");
  }
  return req.per_kv_head ? head_importance_for(req.from) : importance_for(req.from);
}

void Backend::add_head_importance(SharedPrefill&, const PreparedPrompt&, int, const std::string& policy) {
  refuse_per_head(policy, name());
}

void Backend::add_extended_importance(SharedPrefill&, const PreparedPrompt&, const ImportanceRequest& req,
                                      const std::string& policy) {
  check_prompt_importance(req, 1 << 30, false);  // the refusal naming the option
  (void)policy;
}

void Backend::step(Sequence& seq, int32_t token, float* logits, Observer* obs) {
  if (obs) fail("--dump-tensors", "the " + name() + " back end does not show its tensors to an observer (use the CPU)");
  step_many({&seq}, &token, logits);
}

std::vector<std::unique_ptr<Backend::Sequence>> Backend::prefill_many(const std::vector<const PreparedPrompt*>& prompts,
                                                                      const std::vector<KVPolicy*>& policies, float* logits) {
  if (prompts.size() != policies.size())
    fail("prefill_many", std::to_string(prompts.size()) + " prompts for " + std::to_string(policies.size()) + " policies");
  const size_t V = size_t(model().config().text.vocab_size);
  std::vector<std::unique_ptr<Sequence>> seqs;
  for (size_t i = 0; i < prompts.size(); ++i)
    seqs.push_back(prefill(*prompts[i], *policies[i], logits ? logits + i * V : nullptr));
  return seqs;
}

std::unique_ptr<Backend::Sequence> Backend::begin_prefill(const PreparedPrompt&, KVPolicy&) {
  fail("chunked prefill", "the " + name() + " back end runs each prompt whole (prefill)");
}

std::vector<bool> Backend::prefill_pieces(const std::vector<Sequence*>&, const std::vector<int>&, float*) {
  fail("chunked prefill", "the " + name() + " back end runs each prompt whole (prefill)");
}

void Backend::use_for_images(PromptRequest& req, Observer* obs) {
  req.encode_image = [this, obs](const float* pixels) { return encode_image(pixels, obs); };
}

namespace {

class CpuBackend : public Backend {
 public:
  CpuBackend(const Model& model, DType kv_dtype) : model_(model), kv_dtype_(kv_dtype) {}

  class CpuSequence : public Sequence {
   public:
    CpuSequence(const Model& model, KVPolicy& policy, DType kv_dtype) : session(model, policy, kv_dtype) {}
    int position() const override { return session.position(); }
    const CacheView& entries() const override { return session.cache(); }
    size_t kv_bytes() const override { return session.cache().bytes(); }
    std::vector<size_t> kv_bytes_per_layer() const override { return session.cache().bytes_per_layer(); }
    std::vector<std::vector<size_t>> kv_bytes_per_head() const override { return session.cache().bytes_per_head(); }
    const KVPolicy& policy() const override { return session.policy(); }
    Session session;
  };

  std::string name() const override { return "cpu"; }
  std::string description() const override {
    return kv_dtype_ == DType::F32 ? "cpu" : std::string("cpu, ") + dtype_option_name(kv_dtype_) + " KV cache";
  }
  const Model& model() const override { return model_; }
  std::vector<float> encode_image(const float* pixels, Observer* obs) override {
    return model_.encode_image(pixels, obs);
  }
  std::unique_ptr<Sequence> prefill(const PreparedPrompt& p, KVPolicy& policy, float* logits, Observer* obs) override {
    auto s = std::make_unique<CpuSequence>(model_, policy, kv_dtype_);
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
  struct CpuShared : SharedPrefill {
    CpuShared(const Model& model, DType kv_dtype) : session(model, full, kv_dtype) {}
    FullPolicy full;
    Session session;
  };
  std::unique_ptr<SharedPrefill> prefill_shared(const PreparedPrompt& p, const std::vector<int>& from) override {
    auto sh = std::make_unique<CpuShared>(model_, kv_dtype_);
    sh->begin(p, model_.config().text.vocab_size, from);
    sh->importance = sh->session.prefill_uncompressed(p, sh->logits.data(), from);
    return sh;
  }
  void add_head_importance(SharedPrefill& shared, const PreparedPrompt& p, int from, const std::string&) override {
    auto* sh = dynamic_cast<CpuShared*>(&shared);
    PKV_ASSERT_MSG(sh, "a shared prefill of another back end was given to the CPU back end");
    for (int f : shared.head_from)
      if (f == from) return;  // measured already
    Session scratch(model_, sh->full, kv_dtype_);
    shared.head_importance.push_back(std::move(scratch.prefill_uncompressed(p, nullptr, {from}, true)[0]));
    shared.head_from.push_back(from);
  }
  void add_extended_importance(SharedPrefill& shared, const PreparedPrompt& p, const ImportanceRequest& req,
                               const std::string&) override {
    auto* sh = dynamic_cast<CpuShared*>(&shared);
    PKV_ASSERT_MSG(sh, "a shared prefill of another back end was given to the CPU back end");
    for (const ImportanceRequest& r : shared.extended_req)
      if (r == req) return;  // measured already
    shared.extended_importance.push_back(
        extended_importance(model_, sh->session.cache(), p, shared.logits.data(), req));
    shared.extended_req.push_back(req);
  }
  std::unique_ptr<Sequence> adopt(const SharedPrefill& shared, KVPolicy& policy) override {
    auto* sh = dynamic_cast<const CpuShared*>(&shared);
    PKV_ASSERT_MSG(sh, "a shared prefill of another back end was given to the CPU back end");
    auto s = std::make_unique<CpuSequence>(model_, policy, kv_dtype_);
    s->session.adopt_prefill(sh->session.cache(), shared.importance_for(policy), shared.prompt_len);
    return s;
  }
  bool thread_safe() const override { return true; }  // the model is read-only; the state is the sequences'
  size_t kv_entry_bytes() const override {
    const TextConfig& t = model_.config().text;
    return size_t(2) * size_t(t.n_kv_heads) * size_t(t.head_dim) * dtype_size(kv_dtype_);
  }
  // No time breakdowns, pool or device memory on the CPU: only the weights it computes with.
  Stats stats() const override {
    Stats s;
    s.weight_bytes = model_.weight_bytes();
    return s;
  }

 private:
  static CpuSequence& as_cpu(Sequence& s) {
    auto* c = dynamic_cast<CpuSequence*>(&s);
    PKV_ASSERT_MSG(c, "a sequence of another back end was given to the CPU back end");
    return *c;
  }
  const Model& model_;
  DType kv_dtype_;
};

double ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(const Model& model, DType kv_dtype) {
  return std::make_unique<CpuBackend>(model, kv_dtype);
}

namespace {
void fill_kv(GenerationResult& r, const Backend::Sequence& seq) {
  r.kv_bytes = seq.kv_bytes();
  r.kv_bytes_per_layer = seq.kv_bytes_per_layer();
  r.kv_entries_per_layer = seq.entries_per_layer();
  r.kv_entries_per_head = seq.entries_per_head();
  r.kv_bytes_per_head = seq.kv_bytes_per_head();
}
void fill_decoding(GenerationResult& r, const Decoding& d) {
  r.tokens = d.tokens();
  r.text = d.text();
  r.stop_reason = d.stop_reason();
}
}  // namespace

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
  fill_decoding(r, d);
  fill_kv(r, *seq);
  return r;
}

std::vector<GenerationResult> generate_many(Backend& backend, const Tokenizer& tok,
                                            const std::vector<Backend::Sequence*>& seqs, const std::vector<int>& prompt_len,
                                            std::vector<float> logits, const SamplingOptions& s,
                                            const std::function<void(size_t, const float*)>& on_logits) {
  const ModelConfig& cfg = backend.model().config();
  const size_t n = seqs.size(), V = size_t(cfg.text.vocab_size);
  PKV_ASSERT(prompt_len.size() == n && logits.size() == n * V);
  if (s.max_tokens < 0) fail("--max-tokens", "must not be negative");
  std::vector<Decoding> d;
  d.reserve(n);
  for (size_t i = 0; i < n; ++i) d.emplace_back(cfg, tok, s, prompt_len[i]);
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<size_t> live(n);
  for (size_t i = 0; i < n; ++i) live[i] = i;
  std::vector<float> out;
  while (!live.empty()) {
    // Each live sequence takes the logits of its last step (row i of `logits` for sequence i).
    std::vector<Backend::Sequence*> batch;
    std::vector<int32_t> tokens;
    std::vector<size_t> next_live;
    for (size_t i : live) {
      if (on_logits) on_logits(i, &logits[i * V]);
      d[i].next(&logits[i * V]);
      if (d[i].done()) continue;
      batch.push_back(seqs[i]);
      tokens.push_back(d[i].last_token());
      next_live.push_back(i);
    }
    if (batch.empty()) break;
    out.resize(batch.size() * V);
    backend.step_many(batch, tokens.data(), out.data());
    for (size_t b = 0; b < next_live.size(); ++b)
      std::copy(out.begin() + ptrdiff_t(b * V), out.begin() + ptrdiff_t((b + 1) * V), logits.begin() + ptrdiff_t(next_live[b] * V));
    live = std::move(next_live);
  }
  const double ms = ms_since(t0);
  std::vector<GenerationResult> r(n);
  for (size_t i = 0; i < n; ++i) {
    d[i].finish();
    r[i].prompt_tokens = prompt_len[i];
    r[i].decode_ms = ms;
    fill_decoding(r[i], d[i]);
    fill_kv(r[i], *seqs[i]);
  }
  return r;
}

}  // namespace pkv
