// The machinery every compressing policy shares: per-layer prefill budgets from the kept fraction,
// the protected tokens, the selection made into a keep plan, and the decode-time rule of METHOD.md
// section 4. A policy overrides only what makes it different.
#pragma once
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "kv/policy.h"

namespace pkv {

class BudgetedPolicy : public KVPolicy {
 public:
  explicit BudgetedPolicy(const PolicyOptions& opt) : opt_(opt) {}

  KeepPlan after_prefill(const CacheView& cache, const std::vector<std::vector<float>>& importance,
                         int prompt_len) override;
  KeepPlan after_decode_step(const CacheView& cache, int total_tokens,
                             const std::vector<std::vector<float>>* step_importance) override;

  const PolicyOptions& options() const { return opt_; }
  // Entries each KV head kept after the prefill ([layers][kv heads]; a layer left whole: N each;
  // empty for a policy whose plans keep the same entries in every head).
  const std::vector<std::vector<int>>& prefill_kept_per_head() const { return head_kept_; }
  // The kept fraction for this request (a token budget becomes tokens / N).
  double budget_fraction(int prompt_len) const;

 protected:
  // Per-layer entry counts after the prefill (default: uniform round(b * N), at least protected).
  virtual std::vector<int> layer_budgets(const std::vector<std::vector<float>>& importance, int N, int L);
  // Entries of layer l to keep (ascending indices into the layer), exactly n of them, including the
  // protected ones. Default: the highest `scores(l)`.
  virtual std::vector<int32_t> select(int layer, const std::vector<float>& importance, int n, int N);
  // Whether the prefill's kept entries absorb the evicted ones (Elastic: the plan's merge flag).
  virtual bool merges_on_prefill() const { return false; }
  // Called with the kept indices of layer l's prefill plan (per-entry state follows them here).
  virtual void on_kept(int l, const std::vector<int32_t>& keep) { (void)l, (void)keep; }
  // Index of the entry to evict from layer l during decoding, given the positions it holds now
  // (default: the fixed place).
  virtual int decode_victim(std::span<const int32_t> positions, int l);
  // The fixed place's victim among `positions` for a list that kept `prefill_kept` entries after the
  // prefill (a layer's, or one KV head's: adakv).
  int fixed_place_victim(std::span<const int32_t> positions, int prefill_kept) const;
  // Keeps per-policy per-entry state aligned with the layer after evicting index `i`.
  virtual void on_evicted(int l, int i) { (void)l, (void)i; }

  // Per-head plans (adakv; the prefix policies' head allocation). The KV heads of `cache` after
  // checking that its heads hold their own entries and that importance[l] has kv_heads * N values
  // (ImportanceRequest::per_kv_head); else one error naming the policy.
  int check_head_importance(const CacheView& cache, const std::vector<std::vector<float>>& importance, int N) const;
  // The prefill plan from per-head keep lists: layer l's heads keep select(l) ([kv heads] lists of
  // ascending indices), or the layer stays shared when select(l) is empty. select runs for several
  // layers at once on the thread pool (core/threads.h): it must only read. Records prefill_kept_
  // (layer_kept, each layer's count per head on average), keep_fraction_ and head_kept_.
  KeepPlan head_plan(const CacheView& cache, int N, const std::vector<int>& layer_kept,
                     const std::function<std::vector<std::vector<int32_t>>(int layer)>& select);
  // The decode-time rule per head (kv/adakv.h): each KV head is what a layer is to the shared rule.
  KeepPlan head_decode_step(const CacheView& cache, int total_tokens) const;
  // Entries each KV head kept after the prefill ([layers][kv heads]; a layer left whole: N each);
  // empty when the prefill made no per-head plan.
  std::vector<std::vector<int>> head_kept_;

  // The prompt's protected entries (indices = positions right after the prefill).
  std::vector<int32_t> protected_indices(int N) const;
  bool is_protected_position(int32_t pos) const;

  PolicyOptions opt_;
  int prompt_len_ = 0;
  std::vector<double> keep_fraction_;  // k_l = n_l / N
};

// The importance request of an estimator (METHOD.md section 1; the answer estimator's starts at the
// prompt's length: the reference answer's queries) and its scores from the raw sums.
ImportanceRequest estimator_request(Estimator e, int window, int prompt_len);
std::vector<float> estimator_scores(Estimator e, const std::vector<float>& raw, int prompt_len);

// Max-pools `x` along the sequence with an odd kernel (same length, edges padded with -inf).
std::vector<float> max_pool_1d(const std::vector<float>& x, int kernel);

}  // namespace pkv
