// KV-cache eviction policies (METHOD.md): small objects that see importance and the cache's shape
// and return a keep plan (kv/keep_plan.h): per layer, the entries to keep and whether they absorb
// the others. They never touch keys or values: every cache applies the same plan (the CPU cache,
// KVCache::apply; the paged GPU pool, GpuKVPool::compact). One file per policy in src/kv/policies/,
// listed once in policy_registry.cc.
//
// What a policy object may keep between calls: one object serves one sequence, from its prefill to
// its end, and may keep what it derived from the calls it saw (the prompt length, the layer budgets
// it chose, per-entry scores aligned with the entries its plans kept). It may count on every plan it
// returned having been applied before its next call, so per-entry state stays aligned by replaying
// its own plans. It keeps no pointer or reference into a cache, and it reads the cache only through
// the CacheView it is handed.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "kv/keep_plan.h"

namespace pkv {

// How per-token importance is measured during the prefill (METHOD.md section 1).
enum class Estimator {
  Paper,       // sum over all prefill queries of the head-mean attention
  Window,      // the same over the last `window` prompt queries only
  Normalized,  // paper divided by the number of queries that could see the token
  Answer,      // analysis only, an oracle: the same sum over the queries of the reference answer that
               // follows the prompt, teacher-forced over the full cache (the attention the answer
               // really pays each prompt entry). Only an evaluation that holds the answer measures it.
};
const char* estimator_name(Estimator e);
Estimator estimator_from_name(const std::string& s);  // throws Error naming --kv-importance

// What an entry's attention is weighted by before scores are compared (BEYOND.md item 2): none (the
// attention itself), the L1 norm of its value (per KV head), or the L1 (wov) or L2 (wov2) norm of what
// it adds to the layer's output through each query head's slice of W_o (CriticalKV, arXiv 2502.03805).
enum class ValueWeight { None, ValueNorm, OutputNorm, OutputNorm2 };
const char* value_weight_name(ValueWeight w);
ValueWeight value_weight_from_name(const std::string& s, const std::string& option);  // none | vnorm | wov | wov2
// How the attention of several queries over an entry combines: the sum (METHOD.md section 1), the
// mean or the largest.
enum class QueryReduce { Sum, Mean, Max };
const char* query_reduce_name(QueryReduce r);
QueryReduce query_reduce_from_name(const std::string& s, const std::string& option);  // sum | mean | max

// How a layer's length follows decoding (METHOD.md section 4).
enum class DecodeRule {
  Proportional,  // keep length = round(k_l * T), T = prompt + generated so far (the reference rule)
  FixedCap,      // keep the prefill length n_l fixed
};

struct PolicyOptions {
  double budget = 1.0;      // kept fraction b in (0, 1]
  int budget_tokens = 0;    // > 0: entries per layer on average instead (b = tokens / N per request)
  Estimator estimator = Estimator::Window;
  int window = 32;          // window estimator and SnapKV's observation window
  int protected_count = 2;  // the first token and the last prompt token are never evicted
  int sinks = 4;            // StreamingLLM's sink tokens
  int pool_kernel = 7;      // SnapKV's max-pooling kernel
  int prefix_pool = 7;      // prefix policies: max-pool the scores along the sequence before ranking
                            // (kernel; 0 or 1 = off, METHOD.md's plain ranking). The layer budgets
                            // still come from the raw scores. 7: measured best (docs/RESULTS.md).
  DecodeRule decode_rule = DecodeRule::Proportional;
  int fifo_offset = 25;     // section 4: evict this many entries before the end of the prefill-kept part
  double pyramid_beta = 20;  // PyramidKV: the last layer keeps avg / beta
  double head_floor = 0.2;  // adakv: each KV head keeps at least this share of its even share of the
                            // layer's selected entries (Ada-KV's alpha; 0.2: the authors' LongBench
                            // script, FFY0/AdaKV experiments/LongBench/pred.py --floor_alpha); the prefix
                            // policies' head allocation: of the uniform count per head (hfloor=F)
  std::vector<double> keep_fractions;  // prefixkv: per-layer k_l from the profile for this budget
  // Head-level allocation of the prefix policies (uniform-prefix, prefixkv, prefixkv-online): the
  // search over (layer, KV head) units instead of layers (kv/prefix_policy.h). Default: per layer,
  // except prefixkv with a profile whose budgets hold a per-head table (head_keep_fractions).
  // Policy name keys `heads`, alloc=layer|head; the per-head floor is head_floor (hfloor=F).
  enum class Alloc { Default, Layer, Head };
  Alloc alloc = Alloc::Default;
  std::vector<std::vector<double>> head_keep_fractions;  // prefixkv: [layers][kv heads] k_lh from the profile
  // Layer allocation and ranking beyond PrefixKV (src/kv/cutoff.h; issue 13 items 2 and 3):
  ValueWeight value_weight = ValueWeight::None;  // prefix policies: attention weighted by the value
  double layer_floor = 0.0;  // cutoff: each layer keeps at least this fraction of the uniform budget
  double layer_evict_cap = 0.0;  // cutoff, >= 1: each layer evicts at most this multiple of the uniform
                                 // eviction (a floor that rises towards the full cache); 0 = off
  int grid_pool = 0;         // prefix policies: max-pool image entries over a K x K patch neighbourhood
                             // (text entries keep prefix_pool along the sequence); 0 or 1 = off
  int lookahead = 0;         // > 0: rank by the attention of the first `lookahead` greedy answer tokens
                             // decoded over the full cache (instead of the estimator's queries)
  QueryReduce query_reduce = QueryReduce::Sum;  // how the queries' attention over an entry combines
  // The request's image entries (prompt indices [image_offset, image_offset + image_tokens)), set per
  // request by whoever prepared the prompt; -1: none known (grid pooling then pools along the sequence).
  int image_offset = -1;
  int image_tokens = 0;
};

// What the prefill must measure for a policy.
struct ImportanceRequest {
  bool needed = false;
  int from = 0;  // first prompt query that counts; the prompt's length: the queries of the reference
                 // answer after the prompt (Estimator::Answer), which no prefill of the prompt has
  // One row per KV head instead of the head mean: layer l's importance then holds kv_heads * len
  // values, head-major: imp[l][h * len + j] = sum over the counted queries of the MEAN over KV head
  // h's query heads (its GQA group) of their attention on entry j. The mean over KV heads of these
  // rows is the head-mean row above (sum over queries of the mean over all query heads), up to
  // float32 rounding. Only caches whose heads hold their own entries take the plans made from it
  // (the CPU's, and the GPU's paged pool with head tables).
  bool per_kv_head = false;
  // Beyond the prefill's own sum (src/engine/query_importance.h measures these on the CPU from the
  // uncompressed cache; the GPU measures all but lookahead and wov inside its prefill attention,
  // check_gpu_prompt_importance): the value weighting, lookahead queries (the first
  // `lookahead` greedy answer tokens over the full cache instead of the prompt's queries), and how
  // the queries' attention combines.
  ValueWeight weight = ValueWeight::None;
  int lookahead = 0;
  QueryReduce reduce = QueryReduce::Sum;
  bool extended() const { return needed && (weight != ValueWeight::None || lookahead > 0 || reduce != QueryReduce::Sum); }
  bool operator==(const ImportanceRequest&) const = default;
};
// The one error for the answer estimator where no reference answer exists (run, serve, bench,
// calibrate's prompt allocation, a prompt's own prefill), naming --kv-importance.
[[noreturn]] void refuse_answer_estimator();
// Refuses a request that the prompt's own prefill cannot measure (the answer estimator's): the back
// ends' prefills call it (evaluation adds the answer's importance itself,
// Backend::SharedPrefill::add_importance). Extended requests (value weights, lookahead, a reduce
// other than the sum) only where `extended_ok` (the CPU engine): elsewhere an error naming the option.
void check_prompt_importance(const ImportanceRequest& r, int prompt_len, bool extended_ok = false);
// The GPU back end's prefill check: the extended requests it measures (value weights vnorm and wov2,
// the sum, mean or maximum over the prompt's queries), else an error naming the option: lookahead
// (look= / --kv-lookahead) and the L1 weight wov (refuse_gpu_wov) are the CPU engine's only.
void check_gpu_prompt_importance(const ImportanceRequest& r, int prompt_len);
[[noreturn]] void refuse_gpu_wov();

// The one refusal of a back end whose caches keep the same entries in every KV head for a policy
// that makes per-head plans or asks for per-head importance (Backend::add_head_importance's default).
[[noreturn]] void refuse_per_head(const std::string& policy, const std::string& backend);

class KVPolicy {
 public:
  virtual ~KVPolicy() = default;
  virtual std::string name() const = 0;
  // Whether its plans keep different entries in different KV heads (LayerKeep::head_keep) and its
  // importance is per KV head: it needs a cache whose heads hold their own entries.
  virtual bool per_head() const { return false; }
  virtual ImportanceRequest prefill_importance(int prompt_len) const { (void)prompt_len; return {}; }
  virtual bool needs_decode_importance() const { return false; }
  // After the prefill of `prompt_len` tokens: what each layer keeps. importance[l] covers layer l's
  // entries (empty if not requested).
  virtual KeepPlan after_prefill(const CacheView& cache, const std::vector<std::vector<float>>& importance,
                                 int prompt_len) {
    (void)cache, (void)importance, (void)prompt_len;
    return {};
  }
  // After each decode step; `total_tokens` = prompt + generated tokens held so far (the new token
  // included, and held by every layer of `cache`). step_importance (when requested) is the new
  // query's attention over each layer's entries.
  virtual KeepPlan after_decode_step(const CacheView& cache, int total_tokens,
                                     const std::vector<std::vector<float>>* step_importance) {
    (void)cache, (void)total_tokens, (void)step_importance;
    return {};
  }
  // Entries each layer kept after the prefill (empty for full).
  const std::vector<int>& prefill_kept() const { return prefill_kept_; }

 protected:
  std::vector<int> prefill_kept_;
};

// Keeps everything: the uncompressed cache.
class FullPolicy : public KVPolicy {
 public:
  std::string name() const override { return "full"; }
};

// What a policy is, as the commands need to know it (one entry per policy in policy_registry.cc).
struct PolicyInfo {
  std::string name;
  bool compresses = true;        // false: keeps every entry (full)
  bool needs_profile = false;    // needs per-layer keep fractions from a calibrated profile (prefixkv)
  bool uses_estimator = false;   // ranks by PolicyOptions::estimator (--kv-importance applies)
  std::string help;              // one line for --help
};
// All policies, in the order of METHOD.md.
const std::vector<PolicyInfo>& policy_infos();
// The entry of `name`; throws Error naming `option` and listing the policies when there is none.
const PolicyInfo& policy_info(const std::string& name, const std::string& option = "--kv-policy");
// All policy names, in the order of METHOD.md.
const std::vector<std::string>& policy_names();
// Makes a policy by name; throws Error naming --kv-policy for an unknown name or bad options.
std::unique_ptr<KVPolicy> make_policy(const std::string& name, const PolicyOptions& opt);

}  // namespace pkv
