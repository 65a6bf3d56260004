// Ada-KV: SnapKV's scores per KV head, one cutoff across a layer's heads with a floor per head
// (kv/adakv.h says the rules and where they come from).
#include "kv/adakv.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "core/error.h"
#include "kv/prefix_search.h"

namespace pkv {

std::vector<std::vector<int32_t>> adakv_select(const std::vector<float>& scores, int H, int N, int B,
                                               const std::vector<int32_t>& fixed, double alpha) {
  const int P = int(fixed.size());
  PKV_ASSERT(int(scores.size()) == H * N && P <= B && B <= N && alpha >= 0 && alpha <= 1);
  std::vector<char> is_fixed(size_t(N), 0);
  for (int32_t j : fixed) is_fixed[size_t(j)] = 1;
  const int S = B - P;                          // selectable slots per head
  const int floor_n = int(std::floor(alpha * S));  // each head's own best first
  // Per head, the entries that are not fixed: its floor_n best (ties: the earlier entry), then the rest.
  std::vector<std::vector<int32_t>> order(static_cast<size_t>(H));
  std::vector<std::vector<char>> kept(size_t(H), std::vector<char>(size_t(N), 0));
  struct Cand {
    float score;
    int32_t head, j;
  };
  std::vector<Cand> rest;  // what the floors left, over all heads
  rest.reserve(size_t(H) * size_t(N - P));
  for (int h = 0; h < H; ++h) {
    const float* s = scores.data() + size_t(h) * N;
    std::vector<int32_t>& o = order[size_t(h)];
    for (int j = 0; j < N; ++j)
      if (!is_fixed[size_t(j)]) o.push_back(j);
    // The head's floor_n best (a selection: their order does not matter), the others to the pool.
    if (floor_n > 0 && floor_n < int(o.size()))
      std::nth_element(o.begin(), o.begin() + floor_n, o.end(), [s](int32_t a, int32_t b) { return ranks_before(s, a, b); });
    for (int r = 0; r < int(o.size()); ++r) {
      if (r < floor_n) kept[size_t(h)][size_t(o[size_t(r)])] = 1;
      else rest.push_back({s[o[size_t(r)]], h, o[size_t(r)]});
    }
  }
  // One cutoff across the heads for the remaining H * (S - floor) slots.
  const size_t R = size_t(H) * size_t(S - floor_n);
  PKV_ASSERT(R <= rest.size());
  auto better = [](const Cand& a, const Cand& b) {
    if (const int o = score_order(a.score, b.score)) return o > 0;
    return a.head != b.head ? a.head < b.head : a.j < b.j;
  };
  std::nth_element(rest.begin(), rest.begin() + ptrdiff_t(R), rest.end(), better);
  for (size_t i = 0; i < R; ++i) kept[size_t(rest[i].head)][size_t(rest[i].j)] = 1;
  std::vector<std::vector<int32_t>> keep(static_cast<size_t>(H));
  for (int h = 0; h < H; ++h)
    for (int j = 0; j < N; ++j)
      if (is_fixed[size_t(j)] || kept[size_t(h)][size_t(j)]) keep[size_t(h)].push_back(j);
  return keep;
}

ImportanceRequest AdaKVPolicy::prefill_importance(int N) const {
  ImportanceRequest r = estimator_request(Estimator::Window, opt_.window, N);
  r.per_kv_head = true;
  return r;
}

KeepPlan AdaKVPolicy::after_prefill(const CacheView& cache, const std::vector<std::vector<float>>& importance, int N) {
  prompt_len_ = N;
  const int L = cache.n_layers(), H = check_head_importance(cache, importance, N);
  // The layer-allocation hook sees the head mean (the array a shared-entry policy ranks by).
  std::vector<std::vector<float>> mean(size_t(L), std::vector<float>(size_t(N), 0.f));
  for (int l = 0; l < L; ++l)
    for (int h = 0; h < H; ++h)
      for (int j = 0; j < N; ++j) mean[size_t(l)][size_t(j)] += importance[size_t(l)][size_t(h) * N + j] / float(H);
  const std::vector<int> n = layer_budgets(mean, N, L);
  PKV_ASSERT(int(n.size()) == L);
  const std::vector<int32_t> prot = protected_indices(N);
  const int w = std::min(opt_.window, N);
  return head_plan(cache, N, n, [&](int l) -> std::vector<std::vector<int32_t>> {
    const int B = n[size_t(l)];
    if (B >= N) return {};
    // The fixed entries: the protected ones and, when the budget holds it too, the window (SnapKV's
    // rule: the window is kept once the budget reaches its size).
    std::vector<int32_t> fixed = prot;
    if (B >= w) {
      for (int j = N - w; j < N; ++j) fixed.push_back(j);
      std::sort(fixed.begin(), fixed.end());
      fixed.erase(std::unique(fixed.begin(), fixed.end()), fixed.end());
      if (int(fixed.size()) > B) fixed = prot;  // the window and a protected entry before it overflow B
    }
    std::vector<float> pooled(size_t(H) * N);
    for (int h = 0; h < H; ++h) {
      const std::vector<float> row(importance[size_t(l)].begin() + ptrdiff_t(h) * N,
                                   importance[size_t(l)].begin() + ptrdiff_t(h + 1) * N);
      const std::vector<float> p = max_pool_1d(row, opt_.pool_kernel);
      std::copy(p.begin(), p.end(), pooled.begin() + ptrdiff_t(h) * N);
    }
    return adakv_select(pooled, H, N, B, fixed, opt_.head_floor);
  });
}

std::unique_ptr<KVPolicy> make_adakv_policy(const PolicyOptions& o) { return std::make_unique<AdaKVPolicy>(o); }

}  // namespace pkv
