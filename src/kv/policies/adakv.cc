// Ada-KV: SnapKV's scores per KV head, one cutoff across a layer's heads with a floor per head
// (kv/adakv.h says the rules and where they come from).
#include "kv/adakv.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "core/error.h"

namespace pkv {

std::vector<std::vector<int32_t>> adakv_select(const std::vector<float>& scores, int H, int N, int B,
                                               const std::vector<int32_t>& fixed, double alpha) {
  const int P = int(fixed.size());
  PKV_ASSERT(int(scores.size()) == H * N && P <= B && B <= N && alpha >= 0 && alpha <= 1);
  std::vector<char> is_fixed(size_t(N), 0);
  for (int32_t j : fixed) is_fixed[size_t(j)] = 1;
  const int S = B - P;                          // selectable slots per head
  const int floor_n = int(std::floor(alpha * S));  // each head's own best first
  // Per head, the other entries by score, highest first (ties: the earlier entry).
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
    std::stable_sort(o.begin(), o.end(), [&](int32_t a, int32_t b) { return s[a] > s[b]; });
    for (int r = 0; r < int(o.size()); ++r) {
      if (r < floor_n) kept[size_t(h)][size_t(o[size_t(r)])] = 1;
      else rest.push_back({s[o[size_t(r)]], h, o[size_t(r)]});
    }
  }
  // One cutoff across the heads for the remaining H * (S - floor) slots.
  const size_t R = size_t(H) * size_t(S - floor_n);
  PKV_ASSERT(R <= rest.size());
  auto better = [](const Cand& a, const Cand& b) {
    if (a.score != b.score) return a.score > b.score;
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
  const int L = cache.n_layers(), H = cache.kv_heads();
  if (H == 0) fail(name(), "needs a cache whose KV heads hold their own entries; this one keeps the same in every head");
  if (int(importance.size()) != L)
    fail(name(), "needs per-KV-head importance for " + std::to_string(L) + " layers, got " +
                     std::to_string(importance.size()));
  // The layer-allocation hook sees the head mean (the array a shared-entry policy ranks by).
  std::vector<std::vector<float>> mean(size_t(L), std::vector<float>(size_t(N), 0.f));
  for (int l = 0; l < L; ++l) {
    if (int(importance[size_t(l)].size()) != H * N)
      fail(name(), "layer " + std::to_string(l) + " importance has " + std::to_string(importance[size_t(l)].size()) +
                       " values, expected " + std::to_string(H) + " KV heads x " + std::to_string(N));
    for (int h = 0; h < H; ++h)
      for (int j = 0; j < N; ++j) mean[size_t(l)][size_t(j)] += importance[size_t(l)][size_t(h) * N + j] / float(H);
  }
  const std::vector<int> n = layer_budgets(mean, N, L);
  PKV_ASSERT(int(n.size()) == L);
  prefill_kept_ = n;
  keep_fraction_.assign(size_t(L), 1.0);
  head_kept_.assign(size_t(L), std::vector<int>(size_t(H), N));
  const std::vector<int32_t> prot = protected_indices(N);
  const int w = std::min(opt_.window, N);
  KeepPlan plan;
  for (int l = 0; l < L; ++l) {
    PKV_ASSERT(!cache.per_head(l) && cache.size(l) == N);
    const int B = n[size_t(l)];
    keep_fraction_[size_t(l)] = double(B) / N;
    if (B >= N) continue;
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
    LayerKeep k(l, cache.held(l), {});  // a shared layer: its N entries
    k.head_keep = adakv_select(pooled, H, N, B, fixed, opt_.head_floor);
    for (int h = 0; h < H; ++h) head_kept_[size_t(l)][size_t(h)] = int(k.head_keep[size_t(h)].size());
    plan.layers.push_back(std::move(k));
  }
  return plan;
}

std::vector<int32_t> AdaKVPolicy::evict_to(std::span<const int32_t> now, int prefill_kept, int target) const {
  std::vector<int32_t> positions(now.begin(), now.end()), keep(now.size());
  std::iota(keep.begin(), keep.end(), 0);
  while (int(keep.size()) > target) {
    const int v = fixed_place_victim(positions, prefill_kept);
    if (v >= int(keep.size()) - 1) break;  // nothing evictable
    positions.erase(positions.begin() + v);
    keep.erase(keep.begin() + v);
  }
  return keep;
}

KeepPlan AdaKVPolicy::after_decode_step(const CacheView& cache, int T, const std::vector<std::vector<float>>*) {
  KeepPlan plan;
  if (head_kept_.empty()) return plan;
  const int N = prompt_len_;
  auto target_of = [&](int prefill_kept, int held) {
    int t = opt_.decode_rule == DecodeRule::Proportional ? int(std::lround(double(prefill_kept) / N * T)) : prefill_kept;
    return std::max(t, std::min(held, opt_.protected_count + 1));
  };
  for (int l = 0; l < cache.n_layers(); ++l) {
    if (!cache.per_head(l)) {  // a layer the prefill left whole: the shared rule, prefill count N
      const std::span<const int32_t> now = cache.positions(l);
      const int held = int(now.size()), target = target_of(N, held);
      if (held <= target) continue;
      std::vector<int32_t> keep = evict_to(now, N, target);
      if (int(keep.size()) < held) plan.layers.push_back(LayerKeep{l, held, std::move(keep), false});
      continue;
    }
    LayerKeep k(l, cache.held(l), {});
    bool changes = false;
    for (int h = 0; h < cache.kv_heads(); ++h) {
      const std::span<const int32_t> now = cache.head_positions(l, h);
      const int held = int(now.size()), kept = head_kept_[size_t(l)][size_t(h)];
      std::vector<int32_t> keep = held > target_of(kept, held) ? evict_to(now, kept, target_of(kept, held))
                                                               : std::vector<int32_t>();
      if (keep.empty() || int(keep.size()) == held) {
        keep.resize(size_t(held));
        std::iota(keep.begin(), keep.end(), 0);
      } else {
        changes = true;
      }
      k.head_keep.push_back(std::move(keep));
    }
    if (changes) plan.layers.push_back(std::move(k));
  }
  return plan;
}

std::unique_ptr<KVPolicy> make_adakv_policy(const PolicyOptions& o) { return std::make_unique<AdaKVPolicy>(o); }

}  // namespace pkv
