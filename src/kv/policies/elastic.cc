// Elastic Cache (Liu et al. 2024): per-layer importance as in METHOD.md section 1 (the paper's
// estimator), a uniform budget, and every evicted entry merged into its nearest kept entry (by
// index; ties to the earlier one): the kept key and value become the mean over the group. The
// policy only asks for the merge (the plan's flag); the caches carry it out by the one rule of
// ops/kv_merge.h.

#include "kv/budgeted.h"

namespace pkv {
namespace {

class ElasticPolicy : public BudgetedPolicy {
 public:
  using BudgetedPolicy::BudgetedPolicy;
  std::string name() const override { return "elastic"; }
  ImportanceRequest prefill_importance(int N) const override { return estimator_request(Estimator::Paper, 0, N); }

 protected:
  bool merges_on_prefill() const override { return true; }
};

}  // namespace

std::unique_ptr<KVPolicy> make_elastic_policy(const PolicyOptions& o) { return std::make_unique<ElasticPolicy>(o); }

}  // namespace pkv
