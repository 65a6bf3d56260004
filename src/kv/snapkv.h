// SnapKV's selection, shared by the snapkv and pyramidkv policies.
#pragma once
#include "kv/budgeted.h"

namespace pkv {

class SnapKVPolicy : public BudgetedPolicy {
 public:
  using BudgetedPolicy::BudgetedPolicy;
  std::string name() const override { return "snapkv"; }
  ImportanceRequest prefill_importance(int prompt_len) const override;

 protected:
  std::vector<int32_t> select(int layer, const std::vector<float>& importance, int n, int N) override;
};

}  // namespace pkv
