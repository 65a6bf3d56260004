// H2O (Zhang et al. 2023): per layer, attention accumulated over the prefill and every decode query;
// keep the heaviest hitters plus a recent window, half of the budget each.
#include <algorithm>
#include <numeric>

#include "kv/budgeted.h"
#include "kv/prefix_search.h"

namespace pkv {
namespace {

class H2OPolicy : public BudgetedPolicy {
 public:
  using BudgetedPolicy::BudgetedPolicy;
  std::string name() const override { return "h2o"; }
  ImportanceRequest prefill_importance(int N) const override { return estimator_request(Estimator::Paper, 0, N); }
  bool needs_decode_importance() const override { return true; }

  KeepPlan after_prefill(const CacheView& cache, const std::vector<std::vector<float>>& imp, int N) override {
    score_ = imp;  // aligned with every layer's entries; follows the plan in on_kept / on_evicted
    score_.resize(size_t(cache.n_layers()), std::vector<float>(size_t(N), 0.f));
    return BudgetedPolicy::after_prefill(cache, imp, N);
  }

  KeepPlan after_decode_step(const CacheView& cache, int T, const std::vector<std::vector<float>>* step) override {
    // Accumulate the new query's attention (over every entry, the new one included) first.
    for (int l = 0; l < cache.n_layers(); ++l) {
      auto& acc = score_[size_t(l)];
      acc.push_back(0.f);
      if (step && l < int(step->size()) && (*step)[size_t(l)].size() == acc.size())
        for (size_t j = 0; j < acc.size(); ++j) acc[j] += (*step)[size_t(l)][j];
    }
    return BudgetedPolicy::after_decode_step(cache, T, step);
  }

 protected:
  std::vector<int32_t> select(int l, const std::vector<float>& imp, int n, int N) override {
    const int recent = n / 2;
    std::vector<float> s = imp;
    for (int i = N - recent; i < N; ++i) s[size_t(i)] = 1e30f;  // the recent half is always kept
    (void)l;
    return top_entries(s, n, protected_indices(N));
  }
  void on_kept(int l, const std::vector<int32_t>& keep) override {
    std::vector<float> kept;
    for (int32_t i : keep) kept.push_back(score_[size_t(l)][size_t(i)]);
    score_[size_t(l)] = std::move(kept);
  }
  int decode_victim(std::span<const int32_t> positions, int l) override {
    // The lightest entry outside the recent window (half of the layer's prefill budget).
    const int size = int(positions.size()), recent = std::max(1, prefill_kept_[size_t(l)] / 2);
    int best = -1;
    for (int i = 0; i < size - recent; ++i) {
      if (is_protected_position(positions[size_t(i)])) continue;
      if (best < 0 || score_[size_t(l)][size_t(i)] < score_[size_t(l)][size_t(best)]) best = i;
    }
    return best >= 0 ? best : BudgetedPolicy::decode_victim(positions, l);
  }
  void on_evicted(int l, int i) override { score_[size_t(l)].erase(score_[size_t(l)].begin() + i); }

 private:
  std::vector<std::vector<float>> score_;  // per layer, aligned with the layer's entries
};

}  // namespace

std::unique_ptr<KVPolicy> make_h2o_policy(const PolicyOptions& o) { return std::make_unique<H2OPolicy>(o); }

}  // namespace pkv
