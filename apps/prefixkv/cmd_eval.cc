// prefixkv eval: METHOD.md section 7. For every sample, the full cache gives the reference (teacher-
// forced next-token distributions of the reference answer, and a greedy answer); every policy x
// estimator x budget is then measured against it:
//   PPL      exp(mean NLL of the reference answer tokens, EOS included), teacher-forced over the
//            compressed cache (compression after the prefill and at every step);
//   ROUGE-L  F of the compressed greedy answer against the full-cache greedy answer;
//   accuracy the task checker's score of the compressed greedy answer (when --truth is given);
//   KLD      mean KL(full || compressed) of the next-token distributions along the reference answer;
//   KV bytes cache bytes right after the prefill's compression, and at the end of the answer.
#include <atomic>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <mutex>
#include <sstream>
#include <thread>

#include <nlohmann/json.hpp>

#include "args.h"
#include "common.h"
#include "core/error.h"
#include "core/threads.h"
#include "eval/checker.h"
#include "eval/dataset.h"
#include "eval/metrics.h"
#include "eval/svg.h"
#include "kv/profile.h"
#include "kv_options.h"
#include "sample_prompt.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace pkv::cli {

namespace {

const std::vector<OptionSpec> kEvalOptions = with_options({
    {"model", "DIR", "checkpoint directory (default: the bundled model)"},
    {"vision-tower", "DIR", "separate CLIP checkpoint (original LLaVA layout)"},
    {"data", "FILE", "evaluation data in LLaVA conversation JSON (e.g. data/eval/eval.json, detail_1k)"},
    {"image-dir", "DIR", "folder the data's image names are relative to (default: the data file's folder)"},
    {"truth", "FILE", "ground truth for the task checker (default: truth.json next to the data, if present)"},
    {"policies", "LIST", "comma-separated policies (default: all but full)"},
    {"budgets", "LIST", "comma-separated kept fractions (default 0.1,...,0.9)"},
    {"estimators", "LIST", "importance estimators for the prefix policies (default: window)"},
    {"limit", "N", "evaluate the first N usable samples"},
    {"max-tokens", "N", "greedy answer length limit (default 1024)"},
    {"image-mode", "MODE", "pad or crop (default: the model's)"},
    {"jobs", "N", "samples evaluated in parallel, one thread each (default: all cores)"},
    {"out", "FILE", "results JSON"},
    {"plot", "FILE", "PPL and ROUGE-L against budget per policy, as SVG"},
}, kv_option_specs({"kv-window", "kv-protected", "kv-prefix-pool", "kv-decode", "kv-profile"}));


struct Config {
  std::string policy, estimator;  // estimator "" for policies that have their own
  double budget;
  std::string key() const { return policy + (estimator.empty() ? "" : "/" + estimator) + "@" + std::to_string(budget); }
};

struct Totals {  // summed over samples
  double nll = 0, kld = 0, rouge = 0, acc = 0, kv0 = 0, kv1 = 0, top1 = 0;
  int64_t tokens = 0;
  int samples = 0, acc_n = 0;
};

// Keeps everything and records the raw prefill importance from query `from` on.
class Recorder : public KVPolicy {
 public:
  explicit Recorder(int from) : from_(from) {}
  std::string name() const override { return "recorder"; }
  ImportanceRequest prefill_importance(int) const override { return {true, from_}; }
  KeepPlan after_prefill(const CacheView&, const std::vector<std::vector<float>>& imp, int) override {
    importance = imp;
    return {};
  }
  std::vector<std::vector<float>> importance;

 private:
  int from_;
};

bool uses_estimator(const std::string& p) { return policy_info(p, "--policies").uses_estimator; }

}  // namespace

int cmd_eval(int argc, char** argv) {
  Args args("eval", kEvalOptions, argc, argv, 2);
  if (args.help()) {
    std::cout << Args::usage("eval", "Measures KV-cache policies against the full cache (METHOD.md section 7).",
                             kEvalOptions);
    return 0;
  }
  const std::string data = args.str("data", "");
  if (data.empty()) fail("--data", "is required");
  const std::string out = args.str("out", "");
  if (out.empty()) fail("--out", "is required (results JSON)");
  std::vector<std::string> policies = args.has("policies") ? split_list(args.str("policies")) : policy_names();
  // The full cache is the reference every record is measured against, not a policy to evaluate.
  policies.erase(std::remove_if(policies.begin(), policies.end(),
                                [](const std::string& p) { return !policy_info(p, "--policies").compresses; }),
                 policies.end());
  const std::vector<double> budgets = parse_budgets(args.str("budgets", "0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9"), "--budgets");
  std::vector<std::string> estimators = split_list(args.str("estimators", "window"));
  for (auto& e : estimators) estimator_from_name(e);
  const PolicyOptions base = policy_options_from_args(args);
  const std::string rule = args.str("kv-decode", "proportional");
  const int limit = args.integer("limit", 0);
  const int max_tokens = args.integer("max-tokens", 1024);
  if (max_tokens < 1) fail("--max-tokens", "must be at least 1");

  std::vector<Sample> samples = load_conversations(data, args.str("image-dir", ""));
  std::string truth_path = args.str("truth", "");
  if (truth_path.empty() && fs::exists(fs::path(data).parent_path() / "truth.json"))
    truth_path = (fs::path(data).parent_path() / "truth.json").string();
  std::optional<TruthSet> truth;
  if (!truth_path.empty()) truth = TruthSet::load(truth_path);

  LoadedModel lm = load_model(args);
  const std::string& model_dir = lm.dir;
  const Model* model = lm.model.get();
  Engine engine(*model, *lm.tok);
  const int V = model->config().text.vocab_size;

  std::vector<Config> configs;
  std::optional<Profile> profile;
  for (auto& p : policies) {
    if (policy_info(p).needs_profile) {
      std::string path = args.str("kv-profile", (fs::path(model_dir) / "prefixkv_profile.json").string());
      if (!fs::exists(path)) fail("--policies " + p, "needs a profile: none at " + path + " (--kv-profile)");
      profile = Profile::load(path);
      profile->check_compatible(model_identity(*model));
    }
    for (double b : budgets) {
      if (uses_estimator(p)) {
        for (auto& e : estimators) {
          if (policy_info(p).needs_profile && e != profile->estimator) continue;  // a profile fixes its estimator
          configs.push_back({p, e, b});
        }
      } else {
        configs.push_back({p, "", b});
      }
    }
  }
  if (configs.empty()) fail("--policies", "nothing to evaluate");

  int jobs = args.integer("jobs", std::max(1, int(std::thread::hardware_concurrency())));
  if (jobs < 1) fail("--jobs", "must be at least 1");
  if (jobs > 1) set_num_threads(1);  // parallel over samples; each one single-threaded

  const size_t n_target = limit > 0 ? std::min(samples.size(), size_t(limit)) : samples.size();
  std::mutex mu;
  std::map<std::string, Totals> totals;
  Totals full_totals;
  std::vector<json> skipped;
  std::atomic<size_t> next{0};
  std::atomic<size_t> done{0};
  size_t used_samples = 0;
  auto t0 = std::chrono::steady_clock::now();

  auto make = [&](const Config& c) {
    PolicyOptions o = base;
    o.budget = c.budget;
    if (!c.estimator.empty()) o.estimator = estimator_from_name(c.estimator);
    if (policy_info(c.policy).needs_profile) o.keep_fractions = profile->keep_fractions(c.budget);
    return make_policy(c.policy, o);
  };

  auto worker = [&]() {
    std::vector<float> logits(static_cast<size_t>(V));
    for (;;) {
      size_t i;
      {
        std::lock_guard<std::mutex> lk(mu);
        if (used_samples >= n_target) return;
        i = next++;
        if (i >= samples.size()) return;
      }
      const Sample& s = samples[i];
      std::string why;
      std::optional<PreparedPrompt> p;
      try {
        p = prepare_sample(engine, s, args.str("image-mode", ""), &why);
      } catch (const Error& e) {
        why = e.what();
      }
      if (!p) {
        std::lock_guard<std::mutex> lk(mu);
        skipped.push_back({{"id", s.id}, {"reason", why}});
        std::fprintf(stderr, "\nprefixkv eval: skipping sample '%s': %s\n", s.id.c_str(), why.c_str());
        continue;
      }
      {
        std::lock_guard<std::mutex> lk(mu);
        if (used_samples >= n_target) return;
        ++used_samples;
      }
      const std::vector<int32_t> answer = engine.answer_ids(s.answer);
      const int A = int(answer.size());
      // Reference: the full cache. One prefill records the importance over all queries and keeps the
      // cache; a second records it over the last `window` queries. Every policy then adopts that
      // prefill instead of running its own (same numbers, a fraction of the time).
      const int N = int(p->ids.size());
      const int win_from = std::max(0, N - base.window);
      Recorder rec_all(0), rec_win(win_from);
      Session ref_sess(*model, rec_all);
      std::vector<float> logits0(static_cast<size_t>(V));
      ref_sess.prefill(*p, logits0.data());
      {
        Session w(*model, rec_win);
        w.prefill(*p, logits.data());
      }
      const KVCache& full_cache = ref_sess.cache();
      auto importance_for = [&](const KVPolicy& pol) -> const std::vector<std::vector<float>>& {
        static const std::vector<std::vector<float>> none;
        const ImportanceRequest req = pol.prefill_importance(N);
        if (!req.needed) return none;
        PKV_ASSERT_MSG(req.from == 0 || req.from == win_from, "eval shares prefills for two query windows only");
        return req.from == 0 ? rec_all.importance : rec_win.importance;
      };
      FullPolicy full;
      std::vector<float> ref_logits(size_t(A) * V);
      double full_nll = 0;
      const size_t full_kv0 = full_cache.bytes();
      {
        Session sess(*model, full);
        sess.adopt_prefill(full_cache, {}, N);
        logits = logits0;
        for (int t = 0; t < A; ++t) {
          std::copy(logits.begin(), logits.end(), ref_logits.begin() + size_t(t) * V);
          full_nll += token_nll(logits.data(), V, answer[size_t(t)]);
          if (t + 1 < A) sess.step(answer[size_t(t)], logits.data());
        }
      }
      SamplingOptions so;
      so.max_tokens = max_tokens;
      GenerationResult ref;
      {
        Session sess(*model, full);
        sess.adopt_prefill(full_cache, {}, N);
        ref = engine.generate_from(sess, logits0, N, so);
      }
      auto score = [&](const std::string& text, double* acc) -> bool {
        if (!truth) return false;
        if (auto q = truth->find_question(s.id)) {
          *acc = score_answer(q->question->question, text, *q->scene) ? 1.0 : 0.0;
          return true;
        }
        if (const SceneTruth* st = truth->find(s.id)) {
          *acc = score_description(text, *st);
          return true;
        }
        return false;
      };
      {
        std::lock_guard<std::mutex> lk(mu);
        full_totals.nll += full_nll;
        full_totals.tokens += A;
        full_totals.samples += 1;
        full_totals.kv0 += double(full_kv0);
        full_totals.kv1 += double(ref.kv_bytes);
        double acc;
        if (score(ref.text, &acc)) full_totals.acc += acc, full_totals.acc_n += 1;
      }
      for (const Config& c : configs) {
        auto policy = make(c);
        double nll = 0, kld = 0, top1 = 0;
        size_t kv0 = 0;
        {
          Session sess(*model, *policy);
          sess.adopt_prefill(full_cache, importance_for(*policy), N);
          logits = logits0;
          kv0 = sess.cache().bytes();
          for (int t = 0; t < A; ++t) {
            const float* rl = ref_logits.data() + size_t(t) * V;
            nll += token_nll(logits.data(), V, answer[size_t(t)]);
            kld += kl_divergence(rl, logits.data(), V);
            top1 += top1_agree(rl, logits.data(), V) ? 1 : 0;
            if (t + 1 < A) sess.step(answer[size_t(t)], logits.data());
          }
        }
        auto gpolicy = make(c);
        GenerationResult g;
        {
          Session sess(*model, *gpolicy);
          sess.adopt_prefill(full_cache, importance_for(*gpolicy), N);
          g = engine.generate_from(sess, logits0, N, so);
        }
        const double rouge = rouge_l_f(ref.text, g.text);
        double acc = 0;
        const bool has_acc = score(g.text, &acc);
        std::lock_guard<std::mutex> lk(mu);
        Totals& T = totals[c.key()];
        T.nll += nll;
        T.kld += kld;
        T.top1 += top1;
        T.tokens += A;
        T.rouge += rouge;
        T.kv0 += double(kv0);
        T.kv1 += double(g.kv_bytes);
        T.samples += 1;
        if (has_acc) T.acc += acc, T.acc_n += 1;
      }
      progress("eval", ++done, n_target,
               std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
  };
  std::vector<std::thread> threads;
  for (int j = 0; j < jobs; ++j) threads.emplace_back(worker);
  for (auto& t : threads) t.join();
  if (full_totals.samples == 0) fail(data, "no usable sample (every image was missing or broken)");

  // Results.
  json res;
  res["model"] = model_dir;
  res["data"] = data;
  res["samples"] = full_totals.samples;
  res["skipped"] = skipped;
  res["answer_tokens"] = full_totals.tokens;
  res["full"] = {{"ppl", std::exp(full_totals.nll / double(full_totals.tokens))},
                 {"accuracy", full_totals.acc_n ? json(full_totals.acc / full_totals.acc_n) : json(nullptr)},
                 {"kv_bytes", full_totals.kv0 / full_totals.samples},
                 {"kv_bytes_end", full_totals.kv1 / full_totals.samples}};
  json records = json::array();
  for (const Config& c : configs) {
    const Totals& T = totals[c.key()];
    if (!T.samples) continue;
    records.push_back({{"policy", c.policy},
                       {"estimator", c.estimator.empty() ? json(nullptr) : json(c.estimator)},
                       {"budget", c.budget},
                       {"ppl", std::exp(T.nll / double(T.tokens))},
                       {"rouge_l", T.rouge / T.samples},
                       {"accuracy", T.acc_n ? json(T.acc / T.acc_n) : json(nullptr)},
                       {"kld", T.kld / double(T.tokens)},
                       {"top1_agreement", T.top1 / double(T.tokens)},
                       {"kv_bytes", T.kv0 / T.samples},
                       {"kv_bytes_end", T.kv1 / T.samples},
                       {"samples", T.samples}});
  }
  res["records"] = records;
  res["settings"] = {{"policies", policies}, {"budgets", budgets}, {"estimators", estimators},
                     {"window", base.window}, {"protected", base.protected_count}, {"prefix_pool", base.prefix_pool},
                     {"decode_rule", rule},
                     {"max_tokens", max_tokens}, {"truth", truth_path}};
  {
    const std::string tmp = out + ".tmp";
    std::ofstream f(tmp);
    if (!f) fail(out, "cannot write the results");
    f << res.dump(1) << "\n";
    f.close();
    fs::rename(tmp, out);
  }

  // The paper-style table: rows policy[/estimator], columns budgets; cells PPL / ROUGE-L / acc / KLD.
  std::map<std::string, std::map<double, const json*>> rows;
  std::vector<std::string> row_order;
  for (auto& r : res["records"]) {
    std::string name = r["policy"].get<std::string>() + (r["estimator"].is_null() ? "" : "/" + r["estimator"].get<std::string>());
    if (!rows.count(name)) row_order.push_back(name);
    rows[name][r["budget"].get<double>()] = &r;
  }
  std::ostringstream t;
  t << "\nsamples " << full_totals.samples << " (skipped " << skipped.size() << "); full cache: PPL "
    << res["full"]["ppl"].get<double>();
  if (!res["full"]["accuracy"].is_null()) t << ", accuracy " << res["full"]["accuracy"].get<double>();
  t << "\ncells: PPL / ROUGE-L / accuracy / KLD\n\n| policy |";
  for (double b : budgets) t << " " << int(std::lround(b * 100)) << "% |";
  t << "\n|---|";
  for (size_t i = 0; i < budgets.size(); ++i) t << "---|";
  t << "\n";
  char cell[96];
  for (auto& name : row_order) {
    t << "| " << name << " |";
    for (double b : budgets) {
      const json* r = rows[name][b];
      if (!r) {
        t << " |";
        continue;
      }
      std::snprintf(cell, sizeof cell, " %.3g / %.2f / %s / %.3f |", (*r)["ppl"].get<double>(), (*r)["rouge_l"].get<double>(),
                    (*r)["accuracy"].is_null() ? "-" : std::to_string(int(std::lround((*r)["accuracy"].get<double>() * 100))).append("%").c_str(),
                    (*r)["kld"].get<double>());
      t << cell;
    }
    t << "\n";
  }
  std::cout << t.str() << "\nwrote " << out << "\n";

  if (args.has("plot")) {
    PlotSpec ppl{"PPL of the reference answers", "kept fraction", "PPL", true, {}};
    PlotSpec rl{"ROUGE-L vs full-cache answer", "kept fraction", "ROUGE-L F", false, {}};
    for (auto& name : row_order) {
      Series a{name, {}, {}}, b{name, {}, {}};
      for (double bud : budgets)
        if (const json* r = rows[name][bud]) {
          a.x.push_back(bud), a.y.push_back((*r)["ppl"].get<double>());
          b.x.push_back(bud), b.y.push_back((*r)["rouge_l"].get<double>());
        }
      ppl.series.push_back(a);
      rl.series.push_back(b);
    }
    write_svg(args.str("plot"), {ppl, rl}, 520, 380);
    std::cout << "wrote " << args.str("plot") << "\n";
  }
  return 0;
}

}  // namespace pkv::cli
