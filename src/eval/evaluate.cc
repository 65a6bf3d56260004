#include "eval/evaluate.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <map>
#include <mutex>
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
struct Sums {
  double nll = 0, kld = 0, top1 = 0, rouge = 0, acc = 0, kv0 = 0, kv1 = 0;
  int64_t tokens = 0;
  int samples = 0, acc_n = 0;
  void add(const Sums& o) {
    nll += o.nll, kld += o.kld, top1 += o.top1, rouge += o.rouge, acc += o.acc, kv0 += o.kv0, kv1 += o.kv1;
    tokens += o.tokens, samples += o.samples, acc_n += o.acc_n;
  }
  EvalScores scores() const {
    EvalScores s;
    s.samples = samples;
    if (!samples) return s;
    s.ppl = std::exp(nll / double(tokens));
    s.kld = kld / double(tokens);
    s.top1 = top1 / double(tokens);
    s.rouge_l = rouge / samples;
    if (acc_n) s.accuracy = acc / acc_n;
    s.kv_bytes = kv0 / samples;
    s.kv_bytes_end = kv1 / samples;
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

class Evaluator {
 public:
  Evaluator(Backend& backend, const Engine& engine, const TruthSet* truth, const EvalOptions& opt, std::mutex& report_mu)
      : backend_(backend), engine_(engine), truth_(truth), opt_(opt), report_mu_(report_mu),
        V_(backend.model().config().text.vocab_size) {}

  // The sums of one sample: [0] the full cache, [1 + c] config c.
  std::vector<Sums> run(const Sample& s, const PreparedPrompt& p) {
    const std::vector<int32_t> answer = engine_.answer_ids(s.answer);
    const int A = int(answer.size()), N = int(p.ids.size());
    const size_t C = opt_.configs.size();
    // Every policy's importance window, measured once by the shared prefill.
    std::set<int> windows;
    for (const EvalConfig& c : opt_.configs) {
      const ImportanceRequest req = make(c)->prefill_importance(N);
      if (req.needed) windows.insert(req.from);
    }
    const std::unique_ptr<Backend::SharedPrefill> shared =
        backend_.prefill_shared(p, std::vector<int>(windows.begin(), windows.end()));
    std::vector<Sums> sums(C + 1);
    std::vector<float> ref_logits(size_t(A) * V_);  // the full cache's, along the answer
    std::vector<std::string> texts(C + 1);
    const size_t batch = size_t(std::max(1, opt_.batch));
    // Member m of a group: the full cache (index 0, in the first group only) or config m - 1.
    for (size_t first = 0; first < C + 1; first += batch) {
      std::vector<size_t> group;
      for (size_t m = first; m < std::min(C + 1, first + batch); ++m) group.push_back(m);
      teacher_force(*shared, group, answer, ref_logits, sums);
      greedy(s, *shared, group, texts, sums);
    }
    for (size_t m = 0; m < C + 1; ++m) {
      sums[m].tokens = A;
      sums[m].samples = 1;
      if (m > 0) sums[m].rouge = rouge_l_f(texts[0], texts[m]);
      double acc;
      if (score(s, texts[m], &acc)) sums[m].acc = acc, sums[m].acc_n = 1;
    }
    return sums;
  }

 private:
  std::unique_ptr<KVPolicy> make(const EvalConfig& c) const {
    PolicyOptions o = opt_.base;
    o.budget = c.budget;
    if (!c.estimator.empty()) o.estimator = estimator_from_name(c.estimator);
    if (policy_info(c.policy).needs_profile) o.keep_fractions = opt_.profile->keep_fractions(c.budget);
    return make_policy(c.policy, o);
  }
  std::unique_ptr<KVPolicy> make_member(size_t m) const {
    return m == 0 ? std::make_unique<FullPolicy>() : make(opt_.configs[m - 1]);
  }

  // The members' sequences, each adopted from the shared prefill under its own policy, and the
  // prefill's logits once per member ([n, vocab]), for a batched run from there.
  struct Members {
    std::vector<std::unique_ptr<KVPolicy>> policies;
    std::vector<std::unique_ptr<Backend::Sequence>> seqs;
    std::vector<Backend::Sequence*> ptrs;
    std::vector<float> logits;
  };
  Members adopt_members(const Backend::SharedPrefill& shared, const std::vector<size_t>& group) {
    Members m;
    m.logits.resize(group.size() * V_);
    for (size_t i = 0; i < group.size(); ++i) {
      m.policies.push_back(make_member(group[i]));
      m.seqs.push_back(backend_.adopt(shared, *m.policies.back()));
      m.ptrs.push_back(m.seqs.back().get());
      std::copy(shared.logits.begin(), shared.logits.end(), m.logits.begin() + ptrdiff_t(i * V_));
    }
    return m;
  }

  // Teacher forcing along the reference answer over each member's compressed cache. The full
  // cache's logits (member 0, first group) are the reference of the KLD and top-1 of every config.
  void teacher_force(const Backend::SharedPrefill& shared, const std::vector<size_t>& group,
                     const std::vector<int32_t>& answer, std::vector<float>& ref_logits, std::vector<Sums>& sums) {
    const int A = int(answer.size());
    const size_t n = group.size();
    Members m = adopt_members(shared, group);
    std::vector<float>& logits = m.logits;
    for (size_t i = 0; i < n; ++i) sums[group[i]].kv0 = double(m.seqs[i]->kv_bytes());
    std::vector<int32_t> tokens(n);
    for (int t = 0; t < A; ++t) {
      float* ref = ref_logits.data() + size_t(t) * V_;
      for (size_t i = 0; i < n; ++i) {
        const float* row = logits.data() + i * V_;
        Sums& su = sums[group[i]];
        su.nll += token_nll(row, V_, answer[size_t(t)]);
        if (group[i] == 0) {
          std::copy(row, row + V_, ref);
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
  }

  void greedy(const Sample& s, const Backend::SharedPrefill& shared, const std::vector<size_t>& group,
              std::vector<std::string>& texts, std::vector<Sums>& sums) {
    const size_t n = group.size();
    Members m = adopt_members(shared, group);
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
        opt_.on_answer(s.id, group[i] == 0 ? std::string("full") : opt_.configs[group[i] - 1].key(), r[i].tokens,
                       margins[i]);
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
  std::mutex& report_mu_;  // the caller's callbacks, one at a time
  const int V_;
};

}  // namespace

EvalReport evaluate(Backend& backend, const Engine& engine, const std::vector<Sample>& samples, const TruthSet* truth,
                    const EvalOptions& opt) {
  if (opt.configs.empty()) fail("--policies", "nothing to evaluate");
  if (opt.jobs < 1) fail("--jobs", "must be at least 1");
  if (opt.batch < 1) fail("--batch", "must be at least 1");
  if (opt.max_tokens < 1) fail("--max-tokens", "must be at least 1");
  for (const EvalConfig& c : opt.configs)
    if (policy_info(c.policy).needs_profile && !opt.profile) fail("--policies " + c.policy, "needs a profile");
  const int jobs = backend.thread_safe() ? opt.jobs : 1;
  const size_t target = opt.limit > 0 ? std::min(samples.size(), opt.limit) : samples.size();
  const auto t0 = std::chrono::steady_clock::now();

  std::mutex mu;
  std::vector<Sums> totals(opt.configs.size() + 1);
  EvalReport rep;
  rep.device = backend.description();
  size_t next = 0, used = 0, done = 0;
  std::exception_ptr error;
  auto worker = [&]() {
    Evaluator ev(backend, engine, truth, opt, mu);
    for (;;) {
      size_t i;
      {
        std::lock_guard<std::mutex> lk(mu);
        if (used >= target || next >= samples.size() || error) return;
        i = next++;
      }
      const Sample& s = samples[i];
      try {
        std::string why;
        std::optional<PreparedPrompt> p;
        try {
          p = prepare_sample(engine, s, opt.image_mode, &why, &backend);
        } catch (const Error& e) {
          why = e.what();
        }
        if (!p) {
          std::lock_guard<std::mutex> lk(mu);
          rep.skipped.emplace_back(s.id, why);
          if (opt.on_skip) opt.on_skip(s.id, why);
          continue;
        }
        {
          std::lock_guard<std::mutex> lk(mu);
          if (used >= target) return;
          ++used;
        }
        const std::vector<Sums> sums = ev.run(s, *p);
        std::lock_guard<std::mutex> lk(mu);
        for (size_t m = 0; m < sums.size(); ++m) totals[m].add(sums[m]);
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
  if (totals[0].samples == 0) fail("evaluation data", "no usable sample (every image was missing or broken)");
  rep.samples = totals[0].samples;
  rep.answer_tokens = totals[0].tokens;
  rep.full = totals[0].scores();
  for (size_t c = 0; c < opt.configs.size(); ++c) rep.records.emplace_back(opt.configs[c], totals[c + 1].scores());
  rep.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return rep;
}

nlohmann::json report_json(const EvalReport& r) {
  using nlohmann::json;
  json res;
  res["device"] = r.device;
  res["seconds"] = r.seconds;
  res["samples"] = r.samples;
  json skipped = json::array();
  for (auto& [id, why] : r.skipped) skipped.push_back({{"id", id}, {"reason", why}});
  res["skipped"] = skipped;
  res["answer_tokens"] = r.answer_tokens;
  res["full"] = {{"ppl", r.full.ppl},
                 {"accuracy", r.full.accuracy ? json(*r.full.accuracy) : json(nullptr)},
                 {"kv_bytes", r.full.kv_bytes},
                 {"kv_bytes_end", r.full.kv_bytes_end}};
  json records = json::array();
  for (auto& [c, s] : r.records) {
    if (!s.samples) continue;
    records.push_back({{"policy", c.policy},
                       {"estimator", c.estimator.empty() ? json(nullptr) : json(c.estimator)},
                       {"budget", c.budget},
                       {"ppl", s.ppl},
                       {"rouge_l", s.rouge_l},
                       {"accuracy", s.accuracy ? json(*s.accuracy) : json(nullptr)},
                       {"kld", s.kld},
                       {"top1_agreement", s.top1},
                       {"kv_bytes", s.kv_bytes},
                       {"kv_bytes_end", s.kv_bytes_end},
                       {"samples", s.samples}});
  }
  res["records"] = records;
  return res;
}

std::string report_table(const EvalReport& r, const std::vector<double>& budgets) {
  std::map<std::string, std::map<double, const EvalScores*>> rows;
  std::vector<std::string> order;
  for (auto& [c, s] : r.records) {
    if (!s.samples) continue;
    const std::string name = c.policy + (c.estimator.empty() ? "" : "/" + c.estimator);
    if (!rows.count(name)) order.push_back(name);
    rows[name][c.budget] = &s;
  }
  std::ostringstream t;
  t << "\nsamples " << r.samples << " (skipped " << r.skipped.size() << "); full cache: PPL " << r.full.ppl;
  if (r.full.accuracy) t << ", accuracy " << *r.full.accuracy;
  t << "\ncells: PPL / ROUGE-L / accuracy / KLD\n\n| policy |";
  for (double b : budgets) t << " " << int(std::lround(b * 100)) << "% |";
  t << "\n|---|";
  for (size_t i = 0; i < budgets.size(); ++i) t << "---|";
  t << "\n";
  char cell[96];
  for (const std::string& name : order) {
    t << "| " << name << " |";
    for (double b : budgets) {
      auto it = rows[name].find(b);
      if (it == rows[name].end()) {
        t << " |";
        continue;
      }
      const EvalScores& s = *it->second;
      const std::string acc = s.accuracy ? std::to_string(int(std::lround(*s.accuracy * 100))) + "%" : "-";
      std::snprintf(cell, sizeof cell, " %.3g / %.2f / %s / %.3f |", s.ppl, s.rouge_l, acc.c_str(), s.kld);
      t << cell;
    }
    t << "\n";
  }
  return t.str();
}

}  // namespace pkv
