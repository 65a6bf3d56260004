// Evaluation (METHOD.md section 7) on any back end. For every sample the full cache gives the
// reference (the teacher-forced next-token distributions of the reference answer, and a greedy
// answer); every policy x estimator x budget is then measured against it:
//   PPL      exp(mean NLL of the reference answer's tokens, EOS included), teacher-forced over the
//            compressed cache (compressed after the prefill and at every step);
//   ROUGE-L  F of the compressed greedy answer against the full cache's greedy answer;
//   accuracy the task checker's score of the compressed greedy answer (when a truth set is given);
//   KLD      mean KL(full || compressed) of the next-token distributions along the reference answer;
//   top-1    the share of those positions where both pick the same most likely token;
//   KV bytes the cache right after the prefill's compression, and at the end of the greedy answer.
// Each member keeps its per-sample statistics; with EvalOptions::bootstrap > 0 every metric gets a
// 95% percentile bootstrap interval over samples, and paired intervals of its differences from the
// full cache and from the best uniform-budget baseline at its budget (add_bootstrap, bootstrap.h).
//
// Testbeds (docs/RESULTS.md, "Testbeds"): conversations (the descriptions of data/eval/eval.json, the
// short questions of data/eval/questions.json) through evaluate(), and the text testbed (held-out
// documents of the language corpus: a context, then its continuation teacher-forced; no image, no
// greedy answer) through evaluate_text(). Beside the policies: the no-image control (every image
// entry evicted after the prefill, the text kept) and the answer estimator (an oracle: the reference
// answer's own teacher-forced attention ranks the prompt's entries).
//
// One uncompressed prefill per sample (Backend::prefill_shared) is shared by every policy
// (Backend::adopt); the policies' sequences of a sample are decoded together in batched steps
// (Backend::step_many, bit-identical to one at a time on the CPU).
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "engine/backend.h"
#include "eval/bootstrap.h"
#include "eval/checker.h"
#include "eval/dataset.h"
#include "kv/policy.h"
#include "kv/profile.h"

namespace pkv {

// Loads the sample's image and prepares its LLaVA v1 prompt, the image encoded by `backend` (the
// CPU's tower when null). nullopt (with `why`) when the image is missing or broken: evaluation and
// calibration report and skip such samples.
std::optional<PreparedPrompt> prepare_sample(const Engine& engine, const Sample& s, const std::string& image_mode,
                                             std::string* why, Backend* backend = nullptr);

// The answer estimator's importance: the prompt and the reference answer (`answer`: its ids, as
// teacher-forced) in one uncompressed prefill; per layer, the attention the answer's queries pay
// each of the prompt's keys ([layers][prompt tokens]). Calibration's answer allocation uses it too.
std::vector<std::vector<float>> answer_importance(Backend& backend, const Engine& engine, const PreparedPrompt& p,
                                                  const std::vector<int32_t>& answer);

struct EvalConfig {
  std::string policy;
  std::string estimator;  // "" for a policy without an importance estimator
  double budget = 1.0;
  std::string key() const;  // "policy[/estimator]@budget"
};

// Every policy (other than those that compress nothing) x budget, and x estimator for those that
// use one (a profile's policies only with the profile's estimator).
std::vector<EvalConfig> eval_configs(const std::vector<std::string>& policies, const std::vector<double>& budgets,
                                     const std::vector<std::string>& estimators, const Profile* profile);

struct EvalOptions {
  std::vector<EvalConfig> configs;
  PolicyOptions base;                // window, protected tokens, pool, decode rule
  const Profile* profile = nullptr;  // the keep fractions of the policies that need one
  int max_tokens = 1024;             // greedy answer length limit
  std::string image_mode;            // "" = the model's
  size_t limit = 0;                  // the first `limit` usable samples (0: all)
  int jobs = 1;                      // samples at once, one host thread each (thread-safe back ends)
  int batch = 32;                    // policies whose sequences are decoded together
  bool no_image_control = false;     // also measure the no-image control (EvalReport::no_image)
  int bootstrap = 1000;              // resamples of the bootstrap over samples (0: no intervals)
  uint64_t bootstrap_seed = 20261207;  // fixed: a rerun gives the same intervals
  // The callbacks are called one at a time (from the worker threads when jobs > 1).
  // Optional: each greedy answer's tokens and, per token, the gap between the two largest logits it
  // was chosen from (to trace answers that differ between devices to near-ties).
  std::function<void(const std::string& sample, const std::string& config, const std::vector<int32_t>& tokens,
                     const std::vector<float>& margins)>
      on_answer;
  std::function<void(size_t done, size_t total)> on_progress;
  std::function<void(const std::string& sample, const std::string& why)> on_skip;
};

// One member's paired bootstrap comparison with another, on one metric (EvalScores::vs_full, vs_best).
struct Comparison {
  std::string against;  // "full", or the best baseline's policy[/estimator]
  double diff = 0;      // point estimates: this member's minus the other's
  Interval ci;          // the 95% percentile interval of the difference, both on the same resamples
  std::string verdict;  // better | worse | tied (bootstrap.h's verdict())
  // vs_best only: whether that baseline's own difference from the full cache lies outside its
  // interval, where issue 13 asks for "better" and not only "not worse"; meets_goal: "not worse",
  // and "better" where asked (for a config that is no baseline itself).
  bool against_off_full = false, meets_goal = false;
};

struct EvalScores {
  double ppl = 0, rouge_l = 0, kld = 0, top1 = 0;  // rouge_l 0 where no greedy answer is made (text)
  std::optional<double> accuracy;
  double kv_bytes = 0, kv_bytes_end = 0;  // means over the samples
  // Right after the prefill's compression, means over the samples: per layer the entries each KV
  // head holds (a per-head layer: their mean over the heads) and the bytes; per layer and KV head
  // ([layers][kv heads]) the entries and bytes, empty where the back end keeps the same entries in
  // every head (the GPU).
  std::vector<double> kv_entries_per_layer, kv_bytes_per_layer;
  std::vector<std::vector<double>> kv_entries_per_head, kv_bytes_per_head;
  int samples = 0;
  // Per sample, in the order of EvalReport::sample_ids: the point estimates above are
  // metric_value(per_sample, m) (bootstrap.h).
  std::vector<SampleStats> per_sample;
  // With the bootstrap (EvalReport::bootstrap > 0), keyed by metric_key(): the 95% intervals; the
  // paired differences against the full cache and (configs) against the best uniform-budget
  // baseline at the same budget (empty where that budget has no baseline).
  std::map<std::string, Interval> ci;
  std::map<std::string, Comparison> vs_full, vs_best;
};

struct EvalReport {
  std::string device;   // Backend::description()
  std::string testbed;  // descriptions | questions | conversations (mixed, or no truth) | text
  bool greedy = true;   // whether greedy answers were made (ROUGE-L, accuracy): not on the text testbed
  int samples = 0;
  int64_t answer_tokens = 0;
  std::vector<std::pair<std::string, std::string>> skipped;  // sample id, why
  EvalScores full;                                            // the reference itself (ppl, accuracy, KV)
  std::optional<EvalScores> no_image;                         // the no-image control, when asked for
  std::vector<std::pair<EvalConfig, EvalScores>> records;     // in the order of the configs
  double seconds = 0;
  std::vector<std::string> sample_ids;  // the measured samples, in the data's order
  int bootstrap = 0;                    // resamples behind the intervals (0: none)
  uint64_t bootstrap_seed = 0;
};

// Whether a config is a uniform-budget baseline of issue 13's rule: streaming, h2o, snapkv,
// pyramidkv, elastic, adakv or uniform-prefix under its plain name (no ":option" variant), with an
// estimator other than the answer oracle. (pyramidkv's layer budgets are fixed by depth rather than
// equal; it counts as a baseline as in docs/RESULTS.md: nothing in its budgets adapts to the request.)
bool is_uniform_baseline(const EvalConfig& c);

// The metrics a report measures: PPL, ROUGE-L and accuracy (greedy answers; accuracy where the truth
// set scores a sample), KLD, top-1.
std::vector<Metric> report_metrics(const EvalReport& r);

// Fills every member's intervals and comparisons from the per-sample statistics: `resamples`
// resamples of the samples (0: clears them), drawn from `seed`. evaluate() calls it with
// EvalOptions::bootstrap and bootstrap_seed.
void add_bootstrap(EvalReport& r, int resamples, uint64_t seed);

EvalReport evaluate(Backend& backend, const Engine& engine, const std::vector<Sample>& samples, const TruthSet* truth,
                    const EvalOptions& opt);

// The text testbed: per document its first context_tokens tokens (BOS first, tokenised as the
// engine tokenises raw text) are the prompt, and the next continuation_tokens (no EOS) the reference
// teacher-forced over each config's cache (compressed after the prefill and at every step): PPL, KLD
// and top-1 against the full cache, KV bytes after the prefill and after the continuation. No greedy
// answers (EvalOptions::max_tokens unused); a document too short, or holding the image marker, is
// skipped; the no-image control is refused (there is no image).
EvalReport evaluate_text(Backend& backend, const Engine& engine, const TextSet& set, const EvalOptions& opt);

// The report as the results JSON of `prefixkv eval` (docs/FORMATS.md) without its "settings", and
// as the paper-style table: rows policy[/estimator], columns budgets, cells PPL / ROUGE-L /
// accuracy / KLD (PPL / top-1 / KLD on the text testbed); the no-image control on its own line.
nlohmann::json report_json(const EvalReport& r);
std::string report_table(const EvalReport& r, const std::vector<double>& budgets);

// The results JSON's "settings" (docs/FORMATS.md): what was asked for, as `prefixkv eval` and the
// Python module write it. `text`: the text testbed's set, null for conversations.
nlohmann::json eval_settings_json(const std::vector<std::string>& policies, const std::vector<double>& budgets,
                                  const std::vector<std::string>& estimators, const EvalOptions& opt,
                                  const std::string& decode_rule, const std::string& truth_path, const TextSet* text);
// The truth file of a conversations file when none is given: truth.json beside it, else "".
std::string default_truth_path(const std::string& data);

}  // namespace pkv
