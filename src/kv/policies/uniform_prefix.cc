// Uniform prefix: PrefixKV's selection with the same budget in every layer; isolates what the
// adaptive layer budgets add. Also holds the selection the prefix policies share, per layer and per
// (layer, KV head) (kv/prefix_policy.h).
#include <algorithm>
#include <cmath>

#include "core/error.h"
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

std::vector<float> PrefixPolicy::ranking_of(const std::vector<float>& s) const {
  return pool_scores(s, opt_.prefix_pool, opt_.grid_pool, opt_.image_offset, opt_.image_tokens);
}

std::vector<int32_t> PrefixPolicy::select(int layer, const std::vector<float>& importance, int n, int N) {
  (void)importance;
  return top_entries(ranking(layer), n, protected_indices(N));
}

std::vector<int> PrefixPolicy::head_budgets(const std::vector<std::vector<float>>&, int, int, int, int) {
  fail(name(), "has no head-level allocation");
}

KeepPlan PrefixPolicy::after_prefill(const CacheView& cache, const std::vector<std::vector<float>>& importance, int N) {
  if (!head_alloc()) return BudgetedPolicy::after_prefill(cache, importance, N);
  prompt_len_ = N;
  const int L = cache.n_layers(), H = check_head_importance(cache, importance, N);
  std::vector<std::vector<float>> units;  // [L * H][N]: unit l * H + h, its estimator scores
  units.reserve(size_t(L) * size_t(H));
  for (int l = 0; l < L; ++l)
    for (int h = 0; h < H; ++h) {
      const auto row = importance[size_t(l)].begin() + ptrdiff_t(h) * N;
      units.push_back(estimator_scores(opt_.estimator, std::vector<float>(row, row + N), N));
    }
  const int c = std::min(N, opt_.protected_count);
  const int B = std::clamp(int(std::lround(budget_fraction(N) * N)), c, N);  // the uniform count per head
  const int min_keep = std::clamp(int(std::floor(opt_.head_floor * B)), c, N);
  const std::vector<int> n = head_budgets(units, N, L, H, min_keep);
  PKV_ASSERT(int(n.size()) == L * H);
  std::vector<int> layer_kept(static_cast<size_t>(L));  // per head on average, rounded
  for (int l = 0; l < L; ++l) {
    int64_t sum = 0;
    for (int h = 0; h < H; ++h) sum += n[size_t(l * H + h)];
    layer_kept[size_t(l)] = int(std::llround(double(sum) / H));
  }
  const std::vector<int32_t> prot = protected_indices(N);
  return head_plan(cache, N, layer_kept, [&](int l) -> std::vector<std::vector<int32_t>> {
    bool whole = true;
    for (int h = 0; h < H; ++h) whole = whole && n[size_t(l * H + h)] >= N;
    if (whole) return {};
    std::vector<std::vector<int32_t>> keep;
    for (int h = 0; h < H; ++h) {
      keep.push_back(top_entries(ranking_of(units[size_t(l * H + h)]), n[size_t(l * H + h)], prot));
      PKV_ASSERT_MSG(int(keep.back().size()) == n[size_t(l * H + h)], name() + " selected the wrong number of entries");
    }
    return keep;
  });
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
  // The uniform layer budget H B, shared by the layer's heads at one retention level of their own.
  std::vector<int> head_budgets(const std::vector<std::vector<float>>& units, int N, int L, int H, int min_keep) override {
    const int B = BudgetedPolicy::layer_budgets({}, N, 1)[0];
    std::vector<int> n;
    for (int l = 0; l < L; ++l) {
      const std::vector<int> heads = prefix_budgets({units.begin() + ptrdiff_t(l) * H, units.begin() + ptrdiff_t(l + 1) * H},
                                                    int64_t(H) * B, min_keep);
      n.insert(n.end(), heads.begin(), heads.end());
    }
    return n;
  }
};

}  // namespace

std::unique_ptr<KVPolicy> make_uniform_prefix_policy(const PolicyOptions& o) {
  return std::make_unique<UniformPrefixPolicy>(o);
}

}  // namespace pkv
