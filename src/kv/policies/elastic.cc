// Elastic Cache (Liu et al. 2024): per-layer importance as in METHOD.md section 1 (the paper's
// estimator), a uniform budget, and every evicted entry merged into its nearest kept entry (by
// position; ties to the earlier one): the kept key and value become the mean over the group.
#include <algorithm>
#include <cstring>

#include "kv/budgeted.h"

namespace pkv {
namespace {

class ElasticPolicy : public BudgetedPolicy {
 public:
  using BudgetedPolicy::BudgetedPolicy;
  std::string name() const override { return "elastic"; }
  ImportanceRequest prefill_importance(int N) const override { return estimator_request(Estimator::Paper, 0, N); }

 protected:
  void before_retain(KVLayer& layer, int, const std::vector<int32_t>& keep) override {
    const int d = layer.kv_dim(), N = layer.size();
    std::vector<double> ksum(keep.size() * size_t(d)), vsum(ksum.size());
    std::vector<int> count(keep.size(), 0);
    size_t g = 0;  // nearest kept entry for entry i (keep is ascending)
    for (int i = 0; i < N; ++i) {
      while (g + 1 < keep.size() && std::abs(keep[g + 1] - i) < std::abs(keep[g] - i)) ++g;
      const float* k = layer.keys() + size_t(i) * d;
      const float* v = layer.values() + size_t(i) * d;
      for (int x = 0; x < d; ++x) ksum[g * d + x] += k[x], vsum[g * d + x] += v[x];
      ++count[g];
    }
    for (size_t m = 0; m < keep.size(); ++m) {
      float* k = layer.mutable_keys() + size_t(keep[m]) * d;
      float* v = layer.mutable_values() + size_t(keep[m]) * d;
      for (int x = 0; x < d; ++x) k[x] = float(ksum[m * d + x] / count[m]), v[x] = float(vsum[m * d + x] / count[m]);
    }
  }
};

}  // namespace

std::unique_ptr<KVPolicy> make_elastic_policy(const PolicyOptions& o) { return std::make_unique<ElasticPolicy>(o); }

}  // namespace pkv
