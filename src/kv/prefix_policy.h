// PrefixKV's selection (METHOD.md sections 1-4): per layer, the protected tokens plus a prefix of the
// tokens sorted by importance (from the chosen estimator), in their original order. The three prefix
// policies differ only in how many entries each layer keeps.
//
// Head-level allocation (PolicyOptions::alloc, the policy name's `heads` or alloc=head): the unit of
// allocation is a (layer, KV head) instead of a layer. Each KV head ranks the prompt's entries by its
// own importance (ImportanceRequest::per_kv_head: the sum over the estimator's queries of the mean
// over its GQA group's query heads; estimator_scores as a layer's), keeps the protected entries plus
// the highest of its own ranking scores (pooled as a layer's), and the counts come from the same
// rules on units instead of layers: prefixkv-online searches one retention level p over all L x H
// units (prefix_budgets: the shortest prefix of each head's own sorted mass reaching p, the total
// round(b N L H) exactly, ties to the lower unit l H + h), uniform-prefix keeps round(b N) per head
// on average in every layer and searches p within each layer's heads, prefixkv follows a profile's
// per-head table (Profile::head_keep_fractions). Every unit keeps at least the protected count and
// floor(head_floor * B) entries (B = round(b N), the uniform count per head; head_floor is adakv's
// floor, hfloor=F in the name; 0 gives the plain search). The memory is the layer form's: H * B
// entries per layer on average. The head form needs a cache whose heads hold their own entries (the
// CPU cache, the GPU's paged pool with head tables) and the plain sum over the prompt's queries: value
// weights, lookahead, other query reduces and the answer estimator are refused (make_policy).
#pragma once
#include "kv/budgeted.h"

namespace pkv {

class PrefixPolicy : public BudgetedPolicy {
 public:
  using BudgetedPolicy::BudgetedPolicy;
  ImportanceRequest prefill_importance(int N) const override {
    ImportanceRequest r = estimator_request(opt_.estimator, opt_.window, N);
    r.weight = opt_.value_weight;  // the extended importance (engine/query_importance.h)
    r.lookahead = opt_.lookahead;
    r.reduce = opt_.query_reduce;
    r.per_kv_head = head_alloc();
    return r;
  }
  bool per_head() const override { return head_alloc(); }
  KeepPlan after_prefill(const CacheView& cache, const std::vector<std::vector<float>>& importance,
                         int prompt_len) override;

 protected:
  std::vector<int32_t> select(int layer, const std::vector<float>& importance, int n, int N) override;
  // The scores layer l ranks by: its estimator scores max-pooled along the sequence (prefix_pool)
  // and, for image entries, over the patch grid (grid_pool; kv/cutoff.h, pool_scores).
  std::vector<float> ranking(int layer) const { return ranking_of(scores_.at(size_t(layer))); }
  std::vector<float> ranking_of(const std::vector<float>& scores) const;
  // Scores of every layer under the estimator (cached for layer_budgets and select).
  const std::vector<std::vector<float>>& scores(const std::vector<std::vector<float>>& importance, int N);

  // Whether this policy allocates per (layer, KV head).
  bool head_alloc() const {
    return opt_.alloc == PolicyOptions::Alloc::Head || (opt_.alloc == PolicyOptions::Alloc::Default && default_head_alloc());
  }
  virtual bool default_head_alloc() const { return false; }
  // Head allocation: the entries of each unit (layer l, KV head h) = index l * H + h, from the units'
  // estimator scores ([L * H][N]); each at least `min_keep`.
  virtual std::vector<int> head_budgets(const std::vector<std::vector<float>>& units, int N, int L, int H,
                                        int min_keep);

 private:
  std::vector<std::vector<float>> scores_;
};

}  // namespace pkv
