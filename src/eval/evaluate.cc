#include "eval/evaluate.h"

#include <filesystem>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <map>
#include <mutex>
#include <numeric>
#include <set>
#include <sstream>
#include <thread>

#include "core/error.h"
#include "eval/metrics.h"

namespace pkv {

std::optional<PreparedPrompt> prepare_sample(const Engine& engine, const Sample& s, const std::string& image_mode,
                                             std::string* why, Backend* backend) {
  Image img;
  PromptRequest req;
  req.text = s.prompt;
  req.tmpl = Template::LlavaV1;
  req.image_mode = image_mode;
  if (!s.image.empty()) {
    try {
      img = load_image(s.image);
    } catch (const Error& e) {
      if (why) *why = e.what();
      return std::nullopt;
    }
    req.image = &img;
    if (backend) backend->use_for_images(req);
  }
  return engine.prepare(req);
}

std::string EvalConfig::key() const {
  return policy + (estimator.empty() ? "" : "/" + estimator) + "@" + std::to_string(budget);
}

std::vector<EvalConfig> eval_configs(const std::vector<std::string>& policies, const std::vector<double>& budgets,
                                     const std::vector<std::string>& estimators, const Profile* profile) {
  std::vector<EvalConfig> configs;
  for (const std::string& p : policies) {
    const PolicyInfo& info = policy_info(p, "--policies");
    if (!info.compresses) continue;  // the full cache is the reference, not a policy to evaluate
    if (info.needs_profile && !profile) fail("--policies " + p, "needs a profile");
    for (double b : budgets) {
      if (!info.uses_estimator) {
        configs.push_back({p, "", b});
        continue;
      }
      for (const std::string& e : estimators) {
        estimator_from_name(e);
        if (info.needs_profile && e != profile->estimator) continue;  // a profile fixes its estimator
        configs.push_back({p, e, b});
      }
    }
  }
  return configs;
}

namespace {

// What one sample adds to one record.
// Adds b to a elementwise (a takes b's shape when empty).
void add_into(std::vector<double>& a, const std::vector<double>& b) {
  if (a.empty()) a.assign(b.size(), 0.0);
  PKV_ASSERT(a.size() == b.size());
  for (size_t i = 0; i < b.size(); ++i) a[i] += b[i];
}
void add_into(std::vector<std::vector<double>>& a, const std::vector<std::vector<double>>& b) {
  if (a.empty()) a.resize(b.size());
  PKV_ASSERT(a.size() == b.size());
  for (size_t i = 0; i < b.size(); ++i) add_into(a[i], b[i]);
}
std::vector<double> scaled(const std::vector<double>& v, double f) {
  std::vector<double> r = v;
  for (double& x : r) x *= f;
  return r;
}
std::vector<std::vector<double>> scaled(const std::vector<std::vector<double>>& v, double f) {
  std::vector<std::vector<double>> r;
  for (const auto& x : v) r.push_back(scaled(x, f));
  return r;
}

// What one sample adds to one member (`stat`), and the KV sums of many samples.
struct Sums {
  SampleStats stat;  // one sample's (run() fills it; totals leave it alone)
  double kv0 = 0, kv1 = 0;
  // The cache right after the prefill's compression: per layer, per KV head (EvalScores).
  std::vector<double> kv_entries_layer, kv_bytes_layer;
  std::vector<std::vector<double>> kv_entries_head, kv_bytes_head;
  int samples = 0;
  void add(const Sums& o) {
    kv0 += o.kv0, kv1 += o.kv1;
    samples += o.samples;
    add_into(kv_entries_layer, o.kv_entries_layer);
    add_into(kv_bytes_layer, o.kv_bytes_layer);
    add_into(kv_entries_head, o.kv_entries_head);
    add_into(kv_bytes_head, o.kv_bytes_head);
  }
  void take_kv_shape(const Backend::Sequence& s) {
    kv0 = double(s.kv_bytes());
    kv_entries_layer.clear(), kv_bytes_layer.clear(), kv_entries_head.clear(), kv_bytes_head.clear();
    for (size_t b : s.kv_bytes_per_layer()) kv_bytes_layer.push_back(double(b));
    for (const auto& l : s.entries_per_head()) kv_entries_head.emplace_back(l.begin(), l.end());
    if (kv_entries_head.empty())
      for (int e : s.entries_per_layer()) kv_entries_layer.push_back(e);
    for (const auto& l : kv_entries_head)  // the exact mean over the heads
      kv_entries_layer.push_back(std::accumulate(l.begin(), l.end(), 0.0) / double(l.size()));
    for (const auto& l : s.kv_bytes_per_head()) {
      kv_bytes_head.emplace_back();
      for (size_t b : l) kv_bytes_head.back().push_back(double(b));
    }
  }
  // The scores of these totals; the quality metrics from the samples' own statistics (in order).
  EvalScores scores(std::vector<SampleStats> per_sample) const {
    EvalScores s;
    s.samples = samples;
    if (!samples) return s;
    s.ppl = metric_value(per_sample, Metric::Ppl);
    s.kld = metric_value(per_sample, Metric::Kld);
    s.top1 = metric_value(per_sample, Metric::Top1);
    s.rouge_l = metric_value(per_sample, Metric::RougeL);
    const double acc = metric_value(per_sample, Metric::Accuracy);
    if (!std::isnan(acc)) s.accuracy = acc;
    s.kv_bytes = kv0 / samples;
    s.kv_bytes_end = kv1 / samples;
    s.kv_entries_per_layer = scaled(kv_entries_layer, 1.0 / samples);
    s.kv_bytes_per_layer = scaled(kv_bytes_layer, 1.0 / samples);
    s.kv_entries_per_head = scaled(kv_entries_head, 1.0 / samples);
    s.kv_bytes_per_head = scaled(kv_bytes_head, 1.0 / samples);
    s.per_sample = std::move(per_sample);
    return s;
  }
};

float top_two_gap(const float* logits, int V) {
  float a = -INFINITY, b = -INFINITY;
  for (int i = 0; i < V; ++i) {
    if (logits[i] > a) b = a, a = logits[i];
    else if (logits[i] > b) b = logits[i];
  }
  return a - b;
}

// The no-image control: after the prefill every layer drops the image's entries and keeps the
// text's; nothing is evicted while decoding.
class NoImagePolicy : public KVPolicy {
 public:
  NoImagePolicy(int first, int count) : first_(first), count_(count) {}
  std::string name() const override { return "no-image"; }
  KeepPlan after_prefill(const CacheView& cache, const std::vector<std::vector<float>>&, int N) override {
    KeepPlan plan;
    if (first_ < 0 || count_ <= 0) return plan;  // no image: the full cache
    std::vector<int32_t> keep;
    for (int32_t i = 0; i < N; ++i)
      if (i < first_ || i >= first_ + count_) keep.push_back(i);
    if (keep.empty()) fail("--no-image-control", "the prompt holds nothing but the image");
    prefill_kept_.assign(size_t(cache.n_layers()), int(keep.size()));
    for (int l = 0; l < cache.n_layers(); ++l) plan.layers.push_back(LayerKeep{l, N, keep});
    return plan;
  }

 private:
  int first_, count_;
};

// One unit of evaluation: a prepared prompt, the reference continuation teacher-forced after it,
// and (conversations) the sample its greedy answer is scored against.
struct Item {
  PreparedPrompt prompt;
  std::vector<int32_t> answer;
  const Sample* sample = nullptr;
};

class Evaluator {
 public:
  Evaluator(Backend& backend, const Engine& engine, const TruthSet* truth, const EvalOptions& opt, bool greedy,
            std::mutex& report_mu)
      : backend_(backend), engine_(engine), truth_(truth), opt_(opt), greedy_(greedy), report_mu_(report_mu),
        V_(backend.model().config().text.vocab_size) {}

  // The number of members of a sample: the full cache, the configs, the no-image control if asked.
  size_t members() const { return opt_.configs.size() + 1 + (opt_.no_image_control ? 1 : 0); }

  // The sums of one item: [0] the full cache, [1 + c] config c, [1 + C] the no-image control.
  std::vector<Sums> run(const std::string& id, const Item& item) {
    const PreparedPrompt& p = item.prompt;
    const std::vector<int32_t>& answer = item.answer;
    const int A = int(answer.size()), N = int(p.ids.size());
    const size_t M = members();
    // Every policy's importance window, measured once by the shared prefill; the answer
    // estimator's (the reference answer's queries, from N) by one prefill of prompt + answer.
    std::set<int> windows;
    std::map<int, std::string> head_windows;  // per-KV-head importance: window -> a policy asking for it
    bool answer_window = false;
    std::vector<std::pair<ImportanceRequest, std::string>> extended;  // measured after the prefill
    for (const EvalConfig& c : opt_.configs) {
      const ImportanceRequest req = make(c)->prefill_importance(N);
      if (!req.needed) continue;
      if (req.extended()) {
        extended.emplace_back(req, c.policy);
        continue;
      }
      if (req.per_kv_head) head_windows.emplace(req.from, c.policy);
      else if (req.from >= N) answer_window = true;
      else windows.insert(req.from);
    }
    const std::unique_ptr<Backend::SharedPrefill> shared =
        backend_.prefill_shared(p, std::vector<int>(windows.begin(), windows.end()));
    if (answer_window) shared->add_importance(N, answer_importance(backend_, engine_, p, answer));
    for (const auto& [req, policy] : extended) backend_.add_extended_importance(*shared, p, req, policy);
    for (const auto& [from, policy] : head_windows) backend_.add_head_importance(*shared, p, from, policy);
    std::vector<Sums> sums(M);
    std::vector<float> ref_logits(size_t(A) * V_);  // the full cache's, along the answer
    std::vector<std::string> texts(M);
    const size_t batch = size_t(std::max(1, opt_.batch));
    // Member m of a group: the full cache (index 0, in the first group only), config m - 1, or the
    // no-image control (the last).
    for (size_t first = 0; first < M; first += batch) {
      std::vector<size_t> group;
      for (size_t m = first; m < std::min(M, first + batch); ++m) group.push_back(m);
      teacher_force(*shared, p, group, answer, ref_logits, sums);
      if (greedy_) greedy(id, *shared, p, group, texts, sums);
    }
    for (size_t m = 0; m < M; ++m) {
      SampleStats& st = sums[m].stat;
      st.tokens = A;
      sums[m].samples = 1;
      if (!greedy_) continue;
      st.rouge_l = m > 0 ? rouge_l_f(texts[0], texts[m]) : 1.0;  // the full cache's answer is its own reference
      if (item.sample) st.scored = score(*item.sample, texts[m], &st.accuracy);
    }
    return sums;
  }

 private:
  std::unique_ptr<KVPolicy> make(const EvalConfig& c, const PreparedPrompt* p = nullptr) const {
    PolicyOptions o = opt_.base;
    if (p) o.image_offset = p->image_offset, o.image_tokens = p->image_tokens;  // grid pooling
    o.budget = c.budget;
    if (!c.estimator.empty()) o.estimator = estimator_from_name(c.estimator);
    if (policy_info(c.policy).needs_profile) {
      o.keep_fractions = opt_.profile->keep_fractions(c.budget);
      o.head_keep_fractions = opt_.profile->head_keep_fractions(c.budget);
    }
    return make_policy(c.policy, o);
  }
  std::unique_ptr<KVPolicy> make_member(size_t m, const PreparedPrompt& p) const {
    if (m == 0) return std::make_unique<FullPolicy>();
    if (m <= opt_.configs.size()) return make(opt_.configs[m - 1], &p);
    return std::make_unique<NoImagePolicy>(p.image_offset, p.image_tokens);
  }
  std::string member_name(size_t m) const {
    if (m == 0) return "full";
    if (m <= opt_.configs.size()) return opt_.configs[m - 1].key();
    return "no-image";
  }

  // The members' sequences, each adopted from the shared prefill under its own policy, and the
  // prefill's logits once per member ([n, vocab]), for a batched run from there.
  struct Members {
    std::vector<std::unique_ptr<KVPolicy>> policies;
    std::vector<std::unique_ptr<Backend::Sequence>> seqs;
    std::vector<Backend::Sequence*> ptrs;
    std::vector<float> logits;
  };
  Members adopt_members(const Backend::SharedPrefill& shared, const PreparedPrompt& p, const std::vector<size_t>& group) {
    Members m;
    m.logits.resize(group.size() * V_);
    for (size_t i = 0; i < group.size(); ++i) {
      m.policies.push_back(make_member(group[i], p));
      m.seqs.push_back(backend_.adopt(shared, *m.policies.back()));
      m.ptrs.push_back(m.seqs.back().get());
      std::copy(shared.logits.begin(), shared.logits.end(), m.logits.begin() + ptrdiff_t(i * V_));
    }
    return m;
  }

  // Teacher forcing along the reference answer over each member's compressed cache. The full
  // cache's logits (member 0, first group) are the reference of the KLD and top-1 of every config.
  // Without greedy answers, the KV bytes at the end are those after the answer.
  void teacher_force(const Backend::SharedPrefill& shared, const PreparedPrompt& p, const std::vector<size_t>& group,
                     const std::vector<int32_t>& answer, std::vector<float>& ref_logits, std::vector<Sums>& sums) {
    const int A = int(answer.size());
    const size_t n = group.size();
    Members m = adopt_members(shared, p, group);
    std::vector<float>& logits = m.logits;
    for (size_t i = 0; i < n; ++i) sums[group[i]].take_kv_shape(*m.seqs[i]);
    std::vector<int32_t> tokens(n);
    for (int t = 0; t < A; ++t) {
      float* ref = ref_logits.data() + size_t(t) * V_;
      for (size_t i = 0; i < n; ++i) {
        const float* row = logits.data() + i * V_;
        SampleStats& su = sums[group[i]].stat;
        su.nll += token_nll(row, V_, answer[size_t(t)]);
        if (group[i] == 0) {
          std::copy(row, row + V_, ref);
          su.top1 += 1;  // the full cache agrees with itself (KLD 0)
        } else {
          su.kld += kl_divergence(ref, row, V_);
          su.top1 += top1_agree(ref, row, V_) ? 1 : 0;
        }
      }
      if (t + 1 < A) {
        std::fill(tokens.begin(), tokens.end(), answer[size_t(t)]);
        backend_.step_many(m.ptrs, tokens.data(), logits.data());
      }
    }
    if (!greedy_)
      for (size_t i = 0; i < n; ++i) sums[group[i]].kv1 = double(m.seqs[i]->kv_bytes());
  }

  void greedy(const std::string& id, const Backend::SharedPrefill& shared, const PreparedPrompt& p,
              const std::vector<size_t>& group, std::vector<std::string>& texts, std::vector<Sums>& sums) {
    const size_t n = group.size();
    Members m = adopt_members(shared, p, group);
    SamplingOptions so;
    so.max_tokens = opt_.max_tokens;
    std::vector<std::vector<float>> margins(n);
    std::function<void(size_t, const float*)> watch;
    if (opt_.on_answer) watch = [&](size_t i, const float* row) { margins[i].push_back(top_two_gap(row, V_)); };
    const std::vector<GenerationResult> r =
        generate_many(backend_, engine_.tokenizer(), m.ptrs, std::vector<int>(n, shared.prompt_len), std::move(m.logits), so, watch);
    for (size_t i = 0; i < n; ++i) {
      texts[group[i]] = r[i].text;
      sums[group[i]].kv1 = double(r[i].kv_bytes);
      if (opt_.on_answer) {
        std::lock_guard<std::mutex> lk(report_mu_);
        opt_.on_answer(id, member_name(group[i]), r[i].tokens, margins[i]);
      }
    }
  }

  bool score(const Sample& s, const std::string& text, double* acc) const {
    if (!truth_) return false;
    if (auto q = truth_->find_question(s.id)) {
      *acc = score_answer(q->question->question, text, *q->scene) ? 1.0 : 0.0;
      return true;
    }
    if (const SceneTruth* st = truth_->find(s.id)) {
      *acc = score_description(text, *st);
      return true;
    }
    return false;
  }

  Backend& backend_;
  const Engine& engine_;
  const TruthSet* truth_;
  const EvalOptions& opt_;
  const bool greedy_;
  std::mutex& report_mu_;  // the caller's callbacks, one at a time
  const int V_;
};

void check_options(const EvalOptions& opt) {
  if (opt.configs.empty()) fail("--policies", "nothing to evaluate");
  if (opt.jobs < 1) fail("--jobs", "must be at least 1");
  if (opt.batch < 1) fail("--batch", "must be at least 1");
  if (opt.max_tokens < 1) fail("--max-tokens", "must be at least 1");
  for (const EvalConfig& c : opt.configs)
    if (policy_info(c.policy).needs_profile && !opt.profile) fail("--policies " + c.policy, "needs a profile");
}

// The evaluation loop over `n` candidate items (made by `make_item(i, &why)`; nullopt: skipped
// with `why`), on opt.jobs host threads, until opt.limit items were measured.
EvalReport run_items(Backend& backend, const Engine& engine, size_t n, const std::vector<std::string>& ids,
                     const std::function<std::optional<Item>(size_t, std::string*)>& make_item, const TruthSet* truth,
                     const EvalOptions& opt, bool greedy) {
  const int jobs = backend.thread_safe() ? opt.jobs : 1;
  const size_t target = opt.limit > 0 ? std::min(n, opt.limit) : n;
  const auto t0 = std::chrono::steady_clock::now();

  std::mutex mu;
  const size_t M = opt.configs.size() + 1 + (opt.no_image_control ? 1 : 0);
  std::map<size_t, std::vector<Sums>> measured;  // item index -> its members' sums
  EvalReport rep;
  rep.device = backend.description();
  rep.greedy = greedy;
  size_t next = 0, used = 0, done = 0;
  std::exception_ptr error;
  auto worker = [&]() {
    Evaluator ev(backend, engine, truth, opt, greedy, mu);
    for (;;) {
      size_t i;
      {
        std::lock_guard<std::mutex> lk(mu);
        if (used >= target || next >= n || error) return;
        i = next++;
      }
      try {
        std::string why;
        std::optional<Item> item;
        try {
          item = make_item(i, &why);
        } catch (const Error& e) {
          why = e.what();
        }
        if (!item) {
          std::lock_guard<std::mutex> lk(mu);
          rep.skipped.emplace_back(ids[i], why);
          if (opt.on_skip) opt.on_skip(ids[i], why);
          continue;
        }
        {
          std::lock_guard<std::mutex> lk(mu);
          if (used >= target) return;
          ++used;
        }
        std::vector<Sums> sums = ev.run(ids[i], *item);
        std::lock_guard<std::mutex> lk(mu);
        measured.emplace(i, std::move(sums));
        ++done;
        if (opt.on_progress) opt.on_progress(done, target);
      } catch (...) {
        std::lock_guard<std::mutex> lk(mu);
        if (!error) error = std::current_exception();
        return;
      }
    }
  };
  if (jobs == 1) {
    worker();
  } else {
    std::vector<std::thread> threads;
    for (int j = 0; j < jobs; ++j) threads.emplace_back(worker);
    for (auto& t : threads) t.join();
  }
  if (error) std::rethrow_exception(error);
  // Totals in the data's order, whatever order the threads finished in: the same numbers for any
  // --jobs, and each point estimate is its metric over the per-sample table (bootstrap.h).
  std::vector<Sums> totals(M);
  std::vector<std::vector<SampleStats>> per_sample(M);
  for (const auto& [i, sums] : measured) {
    rep.sample_ids.push_back(ids[i]);
    for (size_t m = 0; m < M; ++m) totals[m].add(sums[m]), per_sample[m].push_back(sums[m].stat);
  }
  if (totals[0].samples == 0)
    fail("evaluation data", greedy ? "no usable sample (every image was missing or broken)"
                                   : "no usable document (every one was too short or unreadable)");
  rep.samples = totals[0].samples;
  for (const SampleStats& st : per_sample[0]) rep.answer_tokens += st.tokens;
  rep.full = totals[0].scores(std::move(per_sample[0]));
  const size_t C = opt.configs.size();
  for (size_t c = 0; c < C; ++c) rep.records.emplace_back(opt.configs[c], totals[c + 1].scores(std::move(per_sample[c + 1])));
  if (opt.no_image_control) rep.no_image = totals[C + 1].scores(std::move(per_sample[C + 1]));
  add_bootstrap(rep, opt.bootstrap, opt.bootstrap_seed);
  rep.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return rep;
}

// descriptions or questions when the truth set scores every sample as one kind, else conversations.
std::string conversation_testbed(const std::vector<Sample>& samples, const TruthSet* truth) {
  if (!truth || samples.empty()) return "conversations";
  size_t questions = 0, scenes = 0;
  for (const Sample& s : samples) {
    if (truth->find_question(s.id)) ++questions;
    else if (truth->find(s.id)) ++scenes;
  }
  if (questions == samples.size()) return "questions";
  if (scenes == samples.size()) return "descriptions";
  return "conversations";
}

}  // namespace

std::vector<std::vector<float>> answer_importance(Backend& backend, const Engine& engine, const PreparedPrompt& p,
                                                  const std::vector<int32_t>& answer) {
  if (answer.empty()) fail("--kv-importance answer", "the sample has no reference answer to teacher-force");
  // The prompt and the answer in one uncompressed prefill; the importance over the answer's
  // queries, cut to the prompt's keys: what the generation will read.
  const int N = int(p.ids.size());
  const int H = engine.model().config().text.hidden;
  PreparedPrompt ext = p;
  ext.ids.insert(ext.ids.end(), answer.begin(), answer.end());
  if (!p.device_image) {  // else the device builds the answer's rows from its ids
    ext.embeddings.resize(ext.ids.size() * size_t(H));
    engine.model().embed(answer.data(), int(answer.size()), ext.embeddings.data() + size_t(N) * size_t(H));
  }
  const std::unique_ptr<Backend::SharedPrefill> sh = backend.prefill_shared(ext, {N});
  std::vector<std::vector<float>> imp = sh->importance_for(N);
  for (auto& l : imp) l.resize(size_t(N));
  return imp;
}

EvalReport evaluate(Backend& backend, const Engine& engine, const std::vector<Sample>& samples, const TruthSet* truth,
                    const EvalOptions& opt) {
  check_options(opt);
  std::vector<std::string> ids;
  for (const Sample& s : samples) ids.push_back(s.id);
  auto make_item = [&](size_t i, std::string* why) -> std::optional<Item> {
    const Sample& s = samples[i];
    std::optional<PreparedPrompt> p = prepare_sample(engine, s, opt.image_mode, why, &backend);
    if (!p) return std::nullopt;
    return Item{std::move(*p), engine.answer_ids(s.answer), &s};
  };
  EvalReport rep = run_items(backend, engine, samples.size(), ids, make_item, truth, opt, true);
  rep.testbed = conversation_testbed(samples, truth);
  return rep;
}

EvalReport evaluate_text(Backend& backend, const Engine& engine, const TextSet& set, const EvalOptions& opt) {
  check_options(opt);
  if (opt.no_image_control) fail("--no-image-control", "the text testbed has no image to evict");
  if (set.context_tokens < 2 || set.continuation_tokens < 1)
    fail("text testbed", "needs a context of at least 2 tokens and a continuation of at least 1");
  const int C = set.context_tokens, K = set.continuation_tokens;
  if (C + K > engine.model().config().text.max_positions)
    fail("text testbed", "context " + std::to_string(C) + " + continuation " + std::to_string(K) +
                             " tokens exceed the model's " + std::to_string(engine.model().config().text.max_positions) +
                             " positions");
  std::vector<std::string> ids;
  for (const TextDocument& d : set.documents) ids.push_back(d.id);
  const int H = engine.model().config().text.hidden;
  auto make_item = [&](size_t i, std::string* why) -> std::optional<Item> {
    PromptRequest req;
    req.text = set.documents[i].text;
    req.tmpl = Template::Raw;
    PreparedPrompt whole = engine.prepare(req);
    if (int(whole.ids.size()) < C + K) {
      *why = "has " + std::to_string(whole.ids.size()) + " tokens, fewer than context " + std::to_string(C) +
             " + continuation " + std::to_string(K);
      return std::nullopt;
    }
    Item item;
    item.answer.assign(whole.ids.begin() + C, whole.ids.begin() + C + K);
    item.prompt.ids.assign(whole.ids.begin(), whole.ids.begin() + C);
    item.prompt.embeddings.assign(whole.embeddings.begin(), whole.embeddings.begin() + ptrdiff_t(C) * H);
    return item;
  };
  EvalReport rep = run_items(backend, engine, set.documents.size(), ids, make_item, nullptr, opt, false);
  rep.testbed = "text";
  return rep;
}

bool is_uniform_baseline(const EvalConfig& c) {
  static const std::set<std::string> baselines = {"streaming", "h2o",   "snapkv",        "pyramidkv",
                                                  "elastic",   "adakv", "uniform-prefix"};
  return baselines.count(c.policy) && c.estimator != "answer";
}

std::vector<Metric> report_metrics(const EvalReport& r) {
  std::vector<Metric> ms = {Metric::Ppl};
  if (r.greedy) {
    ms.push_back(Metric::RougeL);
    const auto scored = [](const EvalScores& s) {
      return std::any_of(s.per_sample.begin(), s.per_sample.end(), [](const SampleStats& x) { return x.scored; });
    };
    if (scored(r.full)) ms.push_back(Metric::Accuracy);
  }
  ms.push_back(Metric::Kld);
  ms.push_back(Metric::Top1);
  return ms;
}

void add_bootstrap(EvalReport& r, int resamples, uint64_t seed) {
  std::vector<EvalScores*> members = {&r.full};
  for (auto& rec : r.records) members.push_back(&rec.second);
  if (r.no_image) members.push_back(&*r.no_image);
  for (EvalScores* s : members) s->ci.clear(), s->vs_full.clear(), s->vs_best.clear();
  r.bootstrap = resamples, r.bootstrap_seed = seed;
  if (resamples <= 0 || r.full.per_sample.empty()) {
    r.bootstrap = 0;
    return;
  }
  const Resamples rs(r.full.per_sample.size(), resamples, seed);
  const std::vector<Metric> metrics = report_metrics(r);
  auto compare = [&](const EvalScores& a, const EvalScores& b, Metric m, const std::string& against) {
    Comparison c;
    c.against = against;
    c.diff = metric_value(a.per_sample, m) - metric_value(b.per_sample, m);
    c.ci = paired_interval(rs, a.per_sample, b.per_sample, m);
    c.verdict = verdict(c.ci, m);
    return c;
  };
  for (EvalScores* s : members) {
    if (s->per_sample.size() != rs.samples()) continue;  // a config measured on no sample
    for (Metric m : metrics) {
      // The full cache's KLD, top-1 and ROUGE-L are 0, 1 and 1 by definition: no interval.
      if (s == &r.full && m != Metric::Ppl && m != Metric::Accuracy) continue;
      s->ci[metric_key(m)] = bootstrap_interval(rs, s->per_sample, m);
      if (s != &r.full) s->vs_full[metric_key(m)] = compare(*s, r.full, m, "full");
    }
  }
  // Per budget and metric, the baseline config with the best point estimate (the first on ties).
  for (Metric m : metrics) {
    const double sign = higher_is_better(m) ? -1 : 1;  // lower is better after the sign
    std::map<double, const std::pair<EvalConfig, EvalScores>*> best;
    for (const auto& rec : r.records) {
      if (!is_uniform_baseline(rec.first) || rec.second.per_sample.size() != rs.samples()) continue;
      const double v = sign * metric_value(rec.second.per_sample, m);
      if (std::isnan(v)) continue;
      auto it = best.find(rec.first.budget);
      if (it == best.end() || v < sign * metric_value(it->second->second.per_sample, m)) best[rec.first.budget] = &rec;
    }
    for (auto& [c, s] : r.records) {
      auto it = best.find(c.budget);
      if (it == best.end() || s.per_sample.size() != rs.samples()) continue;
      const auto& [bc, bs] = *it->second;
      Comparison cmp = compare(s, bs, m, bc.policy + (bc.estimator.empty() ? "" : "/" + bc.estimator));
      cmp.against_off_full = std::string(bs.vs_full.at(metric_key(m)).verdict) != "tied";
      cmp.meets_goal = !is_uniform_baseline(c) && cmp.verdict != "worse" &&
                       (cmp.verdict == "better" || !cmp.against_off_full);
      s.vs_best[metric_key(m)] = cmp;
    }
  }
}

namespace {
nlohmann::json interval_json(const Interval& i) { return nlohmann::json::array({i.lo, i.hi}); }

// A member's bootstrap keys ("ci", "vs_full", "vs_best_baseline"; with the bootstrap only) and its
// per-sample table ("per_sample": the metrics' per-sample sums, in the order of the top level's
// per_sample.ids; `all`: KLD, top-1 and ROUGE-L too, which the full cache has by definition).
void add_sample_keys(nlohmann::json& j, const EvalScores& s, bool greedy, bool all, bool baseline) {
  using nlohmann::json;
  if (!s.ci.empty()) {
    json ci = json::object();
    for (const auto& [k, i] : s.ci) ci[k] = interval_json(i);
    j["ci"] = ci;
  }
  auto comparisons = [&](const std::map<std::string, Comparison>& cs, bool best) {
    json o = json::object();
    for (const auto& [k, c] : cs) {
      json e = {{"against", c.against}, {"diff", c.diff}, {"ci", interval_json(c.ci)}, {"verdict", c.verdict}};
      if (best) e["against_off_full"] = c.against_off_full;
      if (best && !baseline) e["meets_goal"] = c.meets_goal;
      o[k] = e;
    }
    return o;
  };
  if (!s.vs_full.empty()) j["vs_full"] = comparisons(s.vs_full, false);
  if (!s.vs_best.empty()) j["vs_best_baseline"] = comparisons(s.vs_best, true);
  json nll = json::array(), kld = json::array(), top1 = json::array(), rouge = json::array(), acc = json::array();
  for (const SampleStats& x : s.per_sample) {
    nll.push_back(x.nll), kld.push_back(x.kld), top1.push_back(x.top1), rouge.push_back(x.rouge_l);
    acc.push_back(x.scored ? json(x.accuracy) : json(nullptr));
  }
  json ps = {{"nll", nll}};
  if (all) ps["kld"] = kld, ps["top1"] = top1;
  if (all && greedy) ps["rouge_l"] = rouge;
  if (greedy) ps["accuracy"] = acc;
  j["per_sample"] = ps;
}

nlohmann::json scores_json(const EvalScores& s, bool greedy, bool baseline) {
  using nlohmann::json;
  json j = {{"ppl", s.ppl},
            {"rouge_l", greedy ? json(s.rouge_l) : json(nullptr)},
            {"accuracy", s.accuracy ? json(*s.accuracy) : json(nullptr)},
            {"kld", s.kld},
            {"top1_agreement", s.top1},
            {"kv_bytes", s.kv_bytes},
            {"kv_bytes_end", s.kv_bytes_end},
            {"kv_entries_per_layer", s.kv_entries_per_layer},
            {"kv_bytes_per_layer", s.kv_bytes_per_layer},
            {"kv_entries_per_head", s.kv_entries_per_head},
            {"kv_bytes_per_head", s.kv_bytes_per_head},
            {"samples", s.samples}};
  add_sample_keys(j, s, greedy, true, baseline);
  return j;
}
}  // namespace

nlohmann::json report_json(const EvalReport& r) {
  using nlohmann::json;
  json res;
  res["testbed"] = r.testbed;
  res["device"] = r.device;
  res["seconds"] = r.seconds;
  res["samples"] = r.samples;
  json skipped = json::array();
  for (auto& [id, why] : r.skipped) skipped.push_back({{"id", id}, {"reason", why}});
  res["skipped"] = skipped;
  res["answer_tokens"] = r.answer_tokens;
  json tokens = json::array();
  for (const SampleStats& x : r.full.per_sample) tokens.push_back(x.tokens);
  res["per_sample"] = {{"ids", r.sample_ids}, {"tokens", tokens}};
  if (r.bootstrap > 0)
    res["bootstrap"] = {{"resamples", r.bootstrap}, {"seed", r.bootstrap_seed}, {"level", 0.95}, {"method", "percentile"}};
  res["full"] = {{"ppl", r.full.ppl},
                 {"accuracy", r.full.accuracy ? json(*r.full.accuracy) : json(nullptr)},
                 {"kv_bytes", r.full.kv_bytes},
                 {"kv_bytes_end", r.full.kv_bytes_end}};
  add_sample_keys(res["full"], r.full, r.greedy, false, false);
  if (r.no_image) res["no_image"] = scores_json(*r.no_image, r.greedy, false);
  json records = json::array();
  for (auto& [c, s] : r.records) {
    if (!s.samples) continue;
    json rec = {{"policy", c.policy}, {"estimator", c.estimator.empty() ? json(nullptr) : json(c.estimator)},
                {"budget", c.budget}};
    rec.update(scores_json(s, r.greedy, is_uniform_baseline(c)));
    records.push_back(rec);
  }
  res["records"] = records;
  return res;
}

namespace {
std::string formatted(const char* fmt, double v) {
  char b[48];
  std::snprintf(b, sizeof b, fmt, v);
  return b;
}
// "value [lo, hi]" (`scale` multiplies all three), or the value alone without an interval.
std::string with_interval(const char* fmt, double v, const Interval* ci, double scale = 1) {
  std::string out = formatted(fmt, v * scale);
  if (ci) out += " [" + formatted(fmt, ci->lo * scale) + ", " + formatted(fmt, ci->hi * scale) + "]";
  return out;
}
const Interval* interval_of(const EvalScores& s, Metric m) {
  auto it = s.ci.find(metric_key(m));
  return it == s.ci.end() ? nullptr : &it->second;
}
}  // namespace

std::string report_table(const EvalReport& r, const std::vector<double>& budgets) {
  std::map<std::string, std::map<double, const EvalScores*>> rows;
  std::vector<std::string> order;
  for (auto& [c, s] : r.records) {
    if (!s.samples) continue;
    const std::string name = c.policy + (c.estimator.empty() ? "" : "/" + c.estimator);
    if (!rows.count(name)) order.push_back(name);
    rows[name][c.budget] = &s;
  }
  const bool ci = r.bootstrap > 0;
  // With intervals one more digit, so that differences near the full cache show.
  const char* ppl_fmt = ci ? "%.4g" : "%.3g";
  auto cell_of = [&](const EvalScores& s) {
    std::string acc = "-";
    if (s.accuracy) acc = ci ? with_interval("%.1f", *s.accuracy, interval_of(s, Metric::Accuracy), 100) + "%"
                             : std::to_string(int(std::lround(*s.accuracy * 100))) + "%";
    const std::string ppl = with_interval(ppl_fmt, s.ppl, interval_of(s, Metric::Ppl));
    const std::string kld = with_interval(ci ? "%.3g" : "%.3f", s.kld, interval_of(s, Metric::Kld));
    if (r.greedy) return ppl + " / " + with_interval("%.2f", s.rouge_l, interval_of(s, Metric::RougeL)) + " / " + acc + " / " + kld;
    return ppl + " / " + with_interval("%.2f", s.top1, interval_of(s, Metric::Top1)) + " / " + kld;
  };
  std::ostringstream t;
  t << "\ntestbed " << r.testbed << ": samples " << r.samples << " (skipped " << r.skipped.size()
    << "); full cache: PPL " << (ci ? with_interval("%.5g", r.full.ppl, interval_of(r.full, Metric::Ppl)) : formatted("%g", r.full.ppl));
  if (r.full.accuracy)
    t << ", accuracy " << (ci ? with_interval("%.4g", *r.full.accuracy, interval_of(r.full, Metric::Accuracy)) : formatted("%g", *r.full.accuracy));
  if (ci) t << "\n[lo, hi]: 95% percentile bootstrap intervals over samples (" << r.bootstrap << " resamples)";
  if (r.no_image) {
    const double kept = r.full.kv_bytes > 0 ? r.no_image->kv_bytes / r.full.kv_bytes : 0;
    t << "\nno-image control (every image entry evicted, " << int(std::lround(kept * 100))
      << "% of the prompt's entries kept): " << cell_of(*r.no_image);
  }
  t << (r.greedy ? "\ncells: PPL / ROUGE-L / accuracy / KLD\n\n| policy |" : "\ncells: PPL / top-1 / KLD\n\n| policy |");
  for (double b : budgets) t << " " << int(std::lround(b * 100)) << "% |";
  t << "\n|---|";
  for (size_t i = 0; i < budgets.size(); ++i) t << "---|";
  t << "\n";
  for (const std::string& name : order) {
    t << "| " << name << " |";
    for (double b : budgets) {
      auto it = rows[name].find(b);
      t << (it == rows[name].end() ? " |" : " " + cell_of(*it->second) + " |");
    }
    t << "\n";
  }
  // The verdicts of the configs that are no baseline against the best baseline at their budget.
  const std::vector<Metric> all = report_metrics(r);
  const bool has_acc = std::find(all.begin(), all.end(), Metric::Accuracy) != all.end();
  const std::vector<Metric> shown = {Metric::Ppl, has_acc ? Metric::Accuracy : Metric::Top1, Metric::Kld};
  std::vector<Metric> goal = {Metric::Ppl};  // issue 13: lower PPL and at least the accuracy
  if (has_acc) goal.push_back(Metric::Accuracy);
  std::ostringstream v;
  for (auto& [c, s] : r.records) {
    if (is_uniform_baseline(c) || s.vs_best.empty()) continue;
    v << "| " << c.policy << (c.estimator.empty() ? "" : "/" + c.estimator) << " | " << int(std::lround(c.budget * 100))
      << "% |";
    for (Metric m : shown) {
      auto it = s.vs_best.find(metric_key(m));
      if (it == s.vs_best.end()) {
        v << " |";
        continue;
      }
      const Comparison& cmp = it->second;
      const double scale = m == Metric::Accuracy ? 100 : 1;
      v << " " << cmp.verdict << " (" << cmp.against << ", " << with_interval("%+.3g", cmp.diff, &cmp.ci, scale) << ") |";
    }
    std::string missed;
    for (Metric m : goal) {
      auto it = s.vs_best.find(metric_key(m));
      if (it != s.vs_best.end() && !it->second.meets_goal) missed += (missed.empty() ? "" : ", ") + std::string(metric_key(m));
    }
    v << " " << (missed.empty() ? "met" : "not met: " + missed) << " |\n";
  }
  if (!v.str().empty()) {
    t << "\nagainst the best uniform-budget baseline at the same budget (per metric; difference, accuracy in points,"
         " with its paired 95% interval):\n\n| config | budget |";
    for (Metric m : shown) t << " " << metric_key(m) << " |";
    t << " issue 13: not worse, better where the baseline is off the full cache |\n|---|---|";
    for (size_t i = 0; i <= shown.size(); ++i) t << "---|";
    t << "\n" << v.str();
  }
  return t.str();
}

nlohmann::json eval_settings_json(const std::vector<std::string>& policies, const std::vector<double>& budgets,
                                  const std::vector<std::string>& estimators, const EvalOptions& opt,
                                  const std::string& decode_rule, const std::string& truth_path, const TextSet* text) {
  nlohmann::json s = {{"policies", policies},       {"budgets", budgets},
                      {"estimators", estimators},   {"window", opt.base.window},
                      {"protected", opt.base.protected_count}, {"prefix_pool", opt.base.prefix_pool},
                      {"decode_rule", decode_rule}, {"max_tokens", opt.max_tokens},
                      {"truth", truth_path}};
  if (opt.no_image_control) s["no_image_control"] = true;
  s["bootstrap"] = opt.bootstrap;
  const PolicyOptions& b = opt.base, plain{};  // kv/cutoff.h's options, where they differ from the defaults
  if (b.value_weight != plain.value_weight) s["value_weight"] = value_weight_name(b.value_weight);
  if (b.layer_floor != plain.layer_floor) s["layer_floor"] = b.layer_floor;
  if (b.layer_evict_cap != plain.layer_evict_cap) s["layer_evict_cap"] = b.layer_evict_cap;
  if (b.grid_pool != plain.grid_pool) s["grid_pool"] = b.grid_pool;
  if (b.lookahead != plain.lookahead) s["lookahead"] = b.lookahead;
  if (b.query_reduce != plain.query_reduce) s["query_reduce"] = query_reduce_name(b.query_reduce);
  if (b.head_floor != plain.head_floor) s["head_floor"] = b.head_floor;  // adakv's floor per head
  if (text) s["text"] = {{"context_tokens", text->context_tokens}, {"continuation_tokens", text->continuation_tokens}};
  return s;
}

std::string default_truth_path(const std::string& data) {
  const std::filesystem::path t = std::filesystem::path(data).parent_path() / "truth.json";
  return std::filesystem::exists(t) ? t.string() : std::string();
}

}  // namespace pkv
