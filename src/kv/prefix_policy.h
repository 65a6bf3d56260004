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
    return estimator_request(opt_.estimator, opt_.window, N);
  }

 protected:
  std::vector<int32_t> select(int layer, const std::vector<float>& importance, int n, int N) override;
  // Scores of every layer under the estimator (cached for layer_budgets and select).
  const std::vector<std::vector<float>>& scores(const std::vector<std::vector<float>>& importance, int N);

 private:
  std::vector<std::vector<float>> scores_;
};

}  // namespace pkv
