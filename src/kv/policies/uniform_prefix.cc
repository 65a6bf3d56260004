// Uniform prefix: PrefixKV's selection with the same budget in every layer; isolates what the
// adaptive layer budgets add. Also holds the selection the prefix policies share.
#include "kv/cutoff.h"
#include "kv/prefix_policy.h"
#include "kv/prefix_search.h"

namespace pkv {

const std::vector<std::vector<float>>& PrefixPolicy::scores(const std::vector<std::vector<float>>& imp, int N) {
  if (scores_.size() != imp.size() || (!imp.empty() && scores_[0].size() != imp[0].size())) {
    scores_.clear();
    for (auto& l : imp) scores_.push_back(estimator_scores(opt_.estimator, l, N));
  }
  return scores_;
}

std::vector<float> PrefixPolicy::ranking(int layer) const {
  return pool_scores(scores_.at(size_t(layer)), opt_.prefix_pool, opt_.grid_pool, opt_.image_offset, opt_.image_tokens);
}

std::vector<int32_t> PrefixPolicy::select(int layer, const std::vector<float>& importance, int n, int N) {
  (void)importance;
  return top_entries(ranking(layer), n, protected_indices(N));
}

namespace {

class UniformPrefixPolicy : public PrefixPolicy {
 public:
  using PrefixPolicy::PrefixPolicy;
  std::string name() const override { return "uniform-prefix"; }

 protected:
  std::vector<int> layer_budgets(const std::vector<std::vector<float>>& imp, int N, int L) override {
    scores(imp, N);
    return BudgetedPolicy::layer_budgets(imp, N, L);
  }
};

}  // namespace

std::unique_ptr<KVPolicy> make_uniform_prefix_policy(const PolicyOptions& o) {
  return std::make_unique<UniformPrefixPolicy>(o);
}

}  // namespace pkv
