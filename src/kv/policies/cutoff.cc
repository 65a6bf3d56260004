// cutoff: layer budgets from one score threshold across layers (kv/cutoff.h, cutoff_budgets) on the
// prefix policies' ranking scores (the estimator's attention, optionally weighted by the value's
// contribution, pooled along the sequence and over the image grid), each layer keeping at least
// layer_floor of the uniform budget (and evicting at most layer_evict_cap times the uniform eviction);
// within a layer the highest of the same scores. Where PrefixKV
// equalises the share of each layer's own importance it keeps, this keeps the most score in total,
// which only means something when scores compare across layers (issue 13 item 2).
#include <algorithm>
#include <cmath>
#include <limits>

#include "kv/cutoff.h"
#include "kv/prefix_policy.h"
#include "kv/prefix_search.h"

namespace pkv {
namespace {

class CutoffPolicy : public PrefixPolicy {
 public:
  using PrefixPolicy::PrefixPolicy;
  std::string name() const override { return "cutoff"; }

 protected:
  std::vector<int> layer_budgets(const std::vector<std::vector<float>>& imp, int N, int L) override {
    scores(imp, N);
    const double b = budget_fraction(N);
    const int floor = cutoff_floor(N, b, opt_.protected_count, opt_.layer_floor, opt_.layer_evict_cap);
    ranked_.assign(size_t(L), {});
    const std::vector<int32_t> prot = protected_indices(N);
    for (int l = 0; l < L; ++l) {
      ranked_[size_t(l)] = ranking(l);
      for (int32_t p : prot) ranked_[size_t(l)][size_t(p)] = std::numeric_limits<float>::infinity();
    }
    return cutoff_budgets(ranked_, std::llround(b * N * L), std::vector<int>(size_t(L), floor));
  }
  std::vector<int32_t> select(int layer, const std::vector<float>&, int n, int N) override {
    return top_entries(ranked_.at(size_t(layer)), n, protected_indices(N));
  }

 private:
  std::vector<std::vector<float>> ranked_;  // [layers][N]: the ranking scores, protected entries +inf
};

}  // namespace

std::unique_ptr<KVPolicy> make_cutoff_policy(const PolicyOptions& o) { return std::make_unique<CutoffPolicy>(o); }

}  // namespace pkv
