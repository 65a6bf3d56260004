// PrefixKV's selection (METHOD.md sections 1-4): per layer, the protected tokens plus a prefix of the
// tokens sorted by importance (from the chosen estimator), in their original order. The three prefix
// policies differ only in how many entries each layer keeps.
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
    return r;
  }

 protected:
  std::vector<int32_t> select(int layer, const std::vector<float>& importance, int n, int N) override;
  // The scores layer l ranks by: its estimator scores max-pooled along the sequence (prefix_pool)
  // and, for image entries, over the patch grid (grid_pool; kv/cutoff.h, pool_scores).
  std::vector<float> ranking(int layer) const;
  // Scores of every layer under the estimator (cached for layer_budgets and select).
  const std::vector<std::vector<float>>& scores(const std::vector<std::vector<float>>& importance, int N);

 private:
  std::vector<std::vector<float>> scores_;
};

}  // namespace pkv
