#include "kv/budgeted.h"

#include <algorithm>
#include <cmath>
#include <exception>
#include <numeric>

#include "core/error.h"
#include "core/threads.h"
#include "kv/prefix_search.h"

namespace pkv {

double BudgetedPolicy::budget_fraction(int N) const {
  if (opt_.budget_tokens > 0) return std::min(1.0, double(opt_.budget_tokens) / N);
  return opt_.budget;
}

std::vector<int32_t> BudgetedPolicy::protected_indices(int N) const {
  std::vector<int32_t> p;
  if (opt_.protected_count >= 1) p.push_back(0);
  if (opt_.protected_count >= 2 && N > 1) p.push_back(N - 1);
  for (int i = 1; int(p.size()) < opt_.protected_count && i < N - 1; ++i) p.push_back(i);  // more: the first ones
  std::sort(p.begin(), p.end());
  p.erase(std::unique(p.begin(), p.end()), p.end());
  return p;
}

bool BudgetedPolicy::is_protected_position(int32_t pos) const {
  if (opt_.protected_count >= 1 && pos == 0) return true;
  if (opt_.protected_count >= 2 && pos == prompt_len_ - 1) return true;
  return opt_.protected_count > 2 && pos < opt_.protected_count - 1;
}

std::vector<int> BudgetedPolicy::layer_budgets(const std::vector<std::vector<float>>&, int N, int L) {
  const int n = std::clamp(int(std::lround(budget_fraction(N) * N)), std::min(N, opt_.protected_count), N);
  return std::vector<int>(size_t(L), n);
}

std::vector<int32_t> BudgetedPolicy::select(int, const std::vector<float>& importance, int n, int N) {
  PKV_ASSERT(int(importance.size()) == N);
  return top_entries(importance, n, protected_indices(N));
}

KeepPlan BudgetedPolicy::after_prefill(const CacheView& cache, const std::vector<std::vector<float>>& importance,
                                       int N) {
  prompt_len_ = N;
  head_kept_.clear();
  const int L = cache.n_layers();
  std::vector<int> n = layer_budgets(importance, N, L);
  PKV_ASSERT(int(n.size()) == L);
  prefill_kept_ = n;
  keep_fraction_.assign(size_t(L), 1.0);
  static const std::vector<float> none;
  KeepPlan plan;
  for (int l = 0; l < L; ++l) {
    PKV_ASSERT(cache.size(l) == N);
    keep_fraction_[size_t(l)] = double(n[size_t(l)]) / N;
    if (n[size_t(l)] >= N) continue;
    std::vector<int32_t> keep = select(l, importance.empty() ? none : importance[size_t(l)], n[size_t(l)], N);
    PKV_ASSERT_MSG(int(keep.size()) == n[size_t(l)], name() + " selected the wrong number of entries");
    on_kept(l, keep);
    plan.layers.push_back(LayerKeep{l, N, std::move(keep), merges_on_prefill()});
  }
  return plan;
}

int BudgetedPolicy::decode_victim(std::span<const int32_t> positions, int l) {
  return fixed_place_victim(positions, prefill_kept_[size_t(l)]);
}

int BudgetedPolicy::fixed_place_victim(std::span<const int32_t> positions, int prefill_kept) const {
  // METHOD.md section 4: a fixed place, fifo_offset entries before the end of the prefill-kept part:
  // the entries before it are frozen and the ones after it (the prefill tail, then the generated
  // tokens) leave in FIFO order. Protected entries and the newest entry are skipped.
  const int size = int(positions.size());
  int i = std::max(0, prefill_kept - opt_.fifo_offset);
  while (i < size - 1 && is_protected_position(positions[size_t(i)])) ++i;
  if (i >= size - 1) {  // everything from the fixed place on is protected: the oldest evictable entry
    i = 0;
    while (i < size - 1 && is_protected_position(positions[size_t(i)])) ++i;
  }
  return i;
}

int BudgetedPolicy::check_head_importance(const CacheView& cache, const std::vector<std::vector<float>>& importance,
                                          int N) const {
  const int L = cache.n_layers(), H = cache.kv_heads();
  if (H == 0) fail(name(), "needs a cache whose KV heads hold their own entries; this one keeps the same in every head");
  if (int(importance.size()) != L)
    fail(name(), "needs per-KV-head importance for " + std::to_string(L) + " layers, got " +
                     std::to_string(importance.size()));
  for (int l = 0; l < L; ++l)
    if (int(importance[size_t(l)].size()) != H * N)
      fail(name(), "layer " + std::to_string(l) + " importance has " + std::to_string(importance[size_t(l)].size()) +
                       " values, expected " + std::to_string(H) + " KV heads x " + std::to_string(N));
  return H;
}

KeepPlan BudgetedPolicy::head_plan(const CacheView& cache, int N, const std::vector<int>& layer_kept,
                                   const std::function<std::vector<std::vector<int32_t>>(int)>& select) {
  const int L = cache.n_layers(), H = cache.kv_heads();
  PKV_ASSERT(int(layer_kept.size()) == L && H > 0);
  prefill_kept_ = layer_kept;
  keep_fraction_.assign(size_t(L), 1.0);
  head_kept_.assign(size_t(L), std::vector<int>(size_t(H), N));
  // The layers' selections on the thread pool (each reads only what the policy decided before), the
  // first error rethrown here.
  std::vector<std::vector<std::vector<int32_t>>> chosen(static_cast<size_t>(L));
  std::vector<std::exception_ptr> error(static_cast<size_t>(L));
  parallel_for(size_t(L), 1, [&](size_t b, size_t e, int) {
    for (size_t l = b; l < e; ++l) {
      try {
        chosen[l] = select(int(l));
      } catch (...) {
        error[l] = std::current_exception();
      }
    }
  });
  for (const std::exception_ptr& x : error)
    if (x) std::rethrow_exception(x);
  KeepPlan plan;
  for (int l = 0; l < L; ++l) {
    PKV_ASSERT(!cache.per_head(l) && cache.size(l) == N);
    keep_fraction_[size_t(l)] = double(layer_kept[size_t(l)]) / N;
    LayerKeep k(l, cache.held(l), {});  // a shared layer: its N entries
    k.head_keep = std::move(chosen[size_t(l)]);
    if (k.head_keep.empty()) continue;
    PKV_ASSERT(int(k.head_keep.size()) == H);
    for (int h = 0; h < H; ++h) head_kept_[size_t(l)][size_t(h)] = int(k.head_keep[size_t(h)].size());
    plan.layers.push_back(std::move(k));
  }
  return plan;
}

namespace {
// The fixed place's rule on one list of positions down to `target` entries; the indices kept.
std::vector<int32_t> evict_to(std::span<const int32_t> now, int target, const std::function<int(std::span<const int32_t>)>& victim) {
  std::vector<int32_t> positions(now.begin(), now.end()), keep(now.size());
  std::iota(keep.begin(), keep.end(), 0);
  while (int(keep.size()) > target) {
    const int v = victim(positions);
    if (v >= int(keep.size()) - 1) break;  // nothing evictable
    positions.erase(positions.begin() + v);
    keep.erase(keep.begin() + v);
  }
  return keep;
}
}  // namespace

KeepPlan BudgetedPolicy::head_decode_step(const CacheView& cache, int T) const {
  KeepPlan plan;
  const int N = prompt_len_;
  auto target_of = [&](int prefill_kept, int held) {
    int t = opt_.decode_rule == DecodeRule::Proportional ? int(std::lround(double(prefill_kept) / N * T)) : prefill_kept;
    return std::max(t, std::min(held, opt_.protected_count + 1));
  };
  auto evict = [&](std::span<const int32_t> now, int prefill_kept, int target) {
    return evict_to(now, target, [&](std::span<const int32_t> p) { return fixed_place_victim(p, prefill_kept); });
  };
  for (int l = 0; l < cache.n_layers(); ++l) {
    if (!cache.per_head(l)) {  // a layer the prefill left whole: the shared rule, prefill count N
      const std::span<const int32_t> now = cache.positions(l);
      const int held = int(now.size()), target = target_of(N, held);
      if (held <= target) continue;
      std::vector<int32_t> keep = evict(now, N, target);
      if (int(keep.size()) < held) plan.layers.push_back(LayerKeep{l, held, std::move(keep), false});
      continue;
    }
    LayerKeep k(l, cache.held(l), {});
    bool changes = false;
    for (int h = 0; h < cache.kv_heads(); ++h) {
      const std::span<const int32_t> now = cache.head_positions(l, h);
      const int held = int(now.size()), kept = head_kept_[size_t(l)][size_t(h)];
      std::vector<int32_t> keep =
          held > target_of(kept, held) ? evict(now, kept, target_of(kept, held)) : std::vector<int32_t>();
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

KeepPlan BudgetedPolicy::after_decode_step(const CacheView& cache, int T, const std::vector<std::vector<float>>*) {
  KeepPlan plan;
  if (!head_kept_.empty()) return head_decode_step(cache, T);
  if (prefill_kept_.empty()) return plan;  // prefill kept everything
  for (int l = 0; l < cache.n_layers(); ++l) {
    const int held = cache.size(l);
    int target = opt_.decode_rule == DecodeRule::Proportional
                     ? int(std::lround(keep_fraction_[size_t(l)] * T))
                     : prefill_kept_[size_t(l)];
    target = std::max(target, std::min(held, opt_.protected_count + 1));
    if (held <= target) continue;
    // Evict one entry at a time, each choice seeing the layer as the ones before left it: the
    // layer's positions and, for the plan, the indices they hold in the layer as it is now.
    const std::span<const int32_t> now = cache.positions(l);
    std::vector<int32_t> positions(now.begin(), now.end()), keep(static_cast<size_t>(held));
    std::iota(keep.begin(), keep.end(), 0);
    while (int(keep.size()) > target) {
      const int v = decode_victim(positions, l);
      if (v >= int(keep.size()) - 1) break;  // nothing evictable
      positions.erase(positions.begin() + v);
      keep.erase(keep.begin() + v);
      on_evicted(l, v);
    }
    if (int(keep.size()) < held) plan.layers.push_back(LayerKeep{l, held, std::move(keep), false});
  }
  return plan;
}

ImportanceRequest estimator_request(Estimator e, int window, int N) {
  ImportanceRequest r;
  r.needed = true;
  r.from = e == Estimator::Window ? std::max(0, N - window) : e == Estimator::Answer ? N : 0;
  return r;
}

std::vector<float> estimator_scores(Estimator e, const std::vector<float>& raw, int N) {
  std::vector<float> s = raw;
  if (e == Estimator::Normalized)  // token j is seen by the N - j queries at positions j .. N-1
    for (int j = 0; j < int(s.size()); ++j) s[size_t(j)] /= float(N - j);
  return s;
}

std::vector<float> max_pool_1d(const std::vector<float>& x, int kernel) {
  const int n = int(x.size()), r = kernel / 2;
  std::vector<float> y(x.size());
  for (int i = 0; i < n; ++i) {
    float m = x[size_t(i)];
    for (int j = std::max(0, i - r); j <= std::min(n - 1, i + r); ++j) m = std::max(m, x[size_t(j)]);
    y[size_t(i)] = m;
  }
  return y;
}

}  // namespace pkv
