// The one list of policies. Adding a policy: one file in policies/ and one line here.
#include <cmath>
#include <functional>
#include <map>

#include "core/error.h"
#include "kv/cutoff.h"
#include "kv/policy.h"

namespace pkv {

std::unique_ptr<KVPolicy> make_streaming_policy(const PolicyOptions&);
std::unique_ptr<KVPolicy> make_h2o_policy(const PolicyOptions&);
std::unique_ptr<KVPolicy> make_snapkv_policy(const PolicyOptions&);
std::unique_ptr<KVPolicy> make_pyramidkv_policy(const PolicyOptions&);
std::unique_ptr<KVPolicy> make_elastic_policy(const PolicyOptions&);
std::unique_ptr<KVPolicy> make_uniform_prefix_policy(const PolicyOptions&);
std::unique_ptr<KVPolicy> make_prefixkv_policy(const PolicyOptions&);
std::unique_ptr<KVPolicy> make_prefixkv_online_policy(const PolicyOptions&);
std::unique_ptr<KVPolicy> make_cutoff_policy(const PolicyOptions&);
std::unique_ptr<KVPolicy> make_adakv_policy(const PolicyOptions&);

namespace {
using Factory = std::function<std::unique_ptr<KVPolicy>(const PolicyOptions&)>;
struct Entry {
  PolicyInfo info;
  Factory make;
};
const std::vector<Entry>& registry() {
  static const std::vector<Entry> r = {
      {{"full", false, false, false, "keeps every entry (the uncompressed cache)"},
       [](const PolicyOptions&) { return std::make_unique<FullPolicy>(); }},
      {{"streaming", true, false, false, "StreamingLLM: sink tokens plus the most recent ones"}, make_streaming_policy},
      {{"h2o", true, false, false, "H2O: heavy hitters by accumulated attention plus a recent window"}, make_h2o_policy},
      {{"snapkv", true, false, false, "SnapKV: the observation window's pooled attention, uniform budgets"},
       make_snapkv_policy},
      {{"pyramidkv", true, false, false, "PyramidKV: SnapKV's ranking, budgets shrinking with depth"},
       make_pyramidkv_policy},
      {{"elastic", true, false, false, "Elastic Cache: uniform budgets, evicted entries merged into the nearest kept"},
       make_elastic_policy},
      {{"uniform-prefix", true, false, true, "PrefixKV's ranking with the same budget in every layer"},
       make_uniform_prefix_policy},
      {{"prefixkv", true, true, true, "PrefixKV with the per-layer budgets of a calibrated profile (offline)"},
       make_prefixkv_policy},
      {{"prefixkv-online", true, false, true, "PrefixKV with per-layer budgets searched on this request's attention"},
       make_prefixkv_online_policy},
      {{"cutoff", true, false, true,
        "one score threshold across layers (comparable scores: :vnorm or :wov weighting), a per-layer floor"},
       make_cutoff_policy},
      {{"adakv", true, false, false,
        "Ada-KV: SnapKV's scores per KV head, one cutoff across a layer's heads (a floor per head), "
        "uniform layer budgets"},
       make_adakv_policy},
  };
  return r;
}
std::string all_names() {
  std::string all;
  for (const Entry& e : registry()) all += (all.empty() ? "" : ", ") + e.info.name;
  return all;
}
}  // namespace

const std::vector<PolicyInfo>& policy_infos() {
  static const std::vector<PolicyInfo> infos = [] {
    std::vector<PolicyInfo> v;
    for (const Entry& e : registry()) v.push_back(e.info);
    return v;
  }();
  return infos;
}

const PolicyInfo& policy_info(const std::string& spec, const std::string& option) {
  const std::string name = policy_base_name(spec);  // "NAME[:OPTION]..." (kv/cutoff.h)
  for (const Entry& e : registry())
    if (e.info.name == name) return e.info;
  fail(option, "unknown policy '" + name + "' (available: " + all_names() + ")");
}

const std::vector<std::string>& policy_names() {
  static const std::vector<std::string> names = [] {
    std::vector<std::string> n;
    for (const Entry& e : registry()) n.push_back(e.info.name);
    return n;
  }();
  return names;
}

const char* estimator_name(Estimator e) {
  switch (e) {
    case Estimator::Paper: return "paper";
    case Estimator::Window: return "window";
    case Estimator::Normalized: return "normalized";
    case Estimator::Answer: return "answer";
  }
  return "?";
}

Estimator estimator_from_name(const std::string& s) {
  if (s == "paper") return Estimator::Paper;
  if (s == "window") return Estimator::Window;
  if (s == "normalized") return Estimator::Normalized;
  if (s == "answer") return Estimator::Answer;
  fail("--kv-importance", "unknown estimator '" + s + "' (paper, window, normalized, answer)");
}

void refuse_answer_estimator() {
  fail("--kv-importance answer",
       "ranks by the reference answer's own attention (teacher-forced), an oracle that only an evaluation holding "
       "that answer can measure (prefixkv eval --estimators answer; calibration: --allocate-from answer); a prompt "
       "alone has no answer");
}

void check_prompt_importance(const ImportanceRequest& r, int prompt_len, bool extended_ok) {
  if (r.extended() && !extended_ok)
    fail("--kv-policy", std::string("value weights (") + value_weight_name(r.weight) + "), lookahead (" +
                            std::to_string(r.lookahead) + ") and query reduces (" + query_reduce_name(r.reduce) +
                            ") are measured by the CPU engine only (--device cpu)");
  if (r.needed && r.from >= prompt_len && r.lookahead == 0) refuse_answer_estimator();
}

void refuse_gpu_wov() {
  fail("--kv-value-weight wov", "the L1 norm ||W_o^h v||_1 is measured by the CPU engine only (a hidden-wide product "
                                "per query head and entry); on the GPU use wov2, the L2 norm, which ranks alike "
                                "(docs/RESULTS.md), or vnorm");
}

void check_gpu_prompt_importance(const ImportanceRequest& r, int prompt_len) {
  if (r.needed && r.lookahead > 0)
    fail("--kv-lookahead (look= in a policy's name)",
         "lookahead queries (the first greedy answer tokens decoded over the full cache) are measured by the CPU "
         "engine only (--device cpu); the GPU measures value weights (vnorm, wov2) and query reduces over the "
         "prompt's own queries");
  if (r.needed && r.weight == ValueWeight::OutputNorm) refuse_gpu_wov();
  check_prompt_importance(r, prompt_len, true);
}

void refuse_per_head(const std::string& policy, const std::string& backend) {
  fail("--kv-policy " + policy, "keeps different entries in each KV head, and the " + backend +
                                    " back end does not hold per-head entries yet (its cache keeps the same entries "
                                    "in every head): run it on the CPU (--device cpu)");
}

std::unique_ptr<KVPolicy> make_policy(const std::string& name, const PolicyOptions& opt) {
  if (!(opt.budget > 0 && opt.budget <= 1) || std::isnan(opt.budget))
    fail("--kv-budget", "must be in (0, 1], got " + std::to_string(opt.budget));
  if (opt.budget_tokens < 0) fail("--kv-budget-tokens", "must be positive");
  if (opt.window < 1) fail("--kv-window", "must be at least 1");
  if (opt.protected_count < 0) fail("--kv-protected", "must not be negative");
  if (!(opt.head_floor >= 0 && opt.head_floor <= 1))
    fail("--kv-head-floor", "must be in [0, 1], got " + std::to_string(opt.head_floor));
  const std::string base = policy_base_name(name);  // "NAME[:OPTION]..." (kv/cutoff.h)
  PolicyOptions o = opt;
  apply_policy_spec(name, o);
  if (!(o.layer_floor >= 0 && o.layer_floor <= 1))
    fail("--kv-layer-floor", "must be in [0, 1], got " + std::to_string(o.layer_floor));
  if (o.grid_pool < 0) fail("--kv-grid-pool", "must not be negative");
  if (o.lookahead < 0) fail("--kv-lookahead", "must not be negative");
  if (o.alloc == PolicyOptions::Alloc::Head) {  // the prefix policies' head-level allocation (kv/prefix_policy.h)
    const std::string where = "--kv-policy " + name;
    if (base != "uniform-prefix" && base != "prefixkv" && base != "prefixkv-online")
      fail(where, "'heads' (alloc=head) is the head-level allocation of the prefix policies: uniform-prefix, "
                  "prefixkv, prefixkv-online (adakv allocates per head already)");
    if (o.value_weight != ValueWeight::None || o.lookahead > 0 || o.query_reduce != QueryReduce::Sum)
      fail(where, "'heads' ranks by each KV head's own attention summed over the prompt's queries; value weights, "
                  "lookahead and query reduces other than sum are measured per layer only");
    if (base == "prefixkv" && o.head_keep_fractions.empty() && !o.keep_fractions.empty())
      fail(where, "needs a profile with a per-head table (budgets[].head_keep: prefixkv calibrate --heads); this "
                  "one has per-layer fractions only");
    if (o.estimator == Estimator::Answer)
      fail(where, "'heads' measures each KV head's importance on the prompt's own queries; the answer estimator is "
                  "measured per layer only");
  }
  for (const Entry& e : registry())
    if (e.info.name == base) return e.make(o);
  fail("--kv-policy", "unknown policy '" + base + "' (available: " + all_names() + ")");
}

}  // namespace pkv
