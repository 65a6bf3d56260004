#include "kv/prefix_search.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <tuple>

#include "core/error.h"

namespace pkv {

std::vector<int> prefix_budgets(const std::vector<std::vector<float>>& importance, int64_t total, int min_keep) {
  const int L = int(importance.size());
  PKV_ASSERT(L > 0);
  const int N = int(importance[0].size());
  PKV_ASSERT(N > 0);
  min_keep = std::clamp(min_keep, 1, N);
  total = std::clamp<int64_t>(total, int64_t(L) * min_keep, int64_t(L) * N);
  // Events: (threshold p at which layer l grows from n to n + 1, layer).
  std::vector<std::tuple<double, int>> events;
  events.reserve(size_t(L) * size_t(N - min_keep));
  for (int l = 0; l < L; ++l) {
    PKV_ASSERT(int(importance[size_t(l)].size()) == N);
    std::vector<double> s(importance[size_t(l)].begin(), importance[size_t(l)].end());
    std::sort(s.begin(), s.end(), std::greater<double>());
    double sum = 0;
    for (double x : s) sum += std::max(0.0, x);
    double cum = 0;
    for (int n = 1; n < N; ++n) {
      cum += std::max(0.0, s[size_t(n - 1)]);
      if (n >= min_keep) events.emplace_back(sum > 0 ? cum / sum : double(n) / N, l);
    }
  }
  // The first `extra` events in (threshold, layer) order: a selection, not a sort (events that tie
  // in both are one layer's, so which of them is taken does not change the counts).
  std::vector<int> n(size_t(L), min_keep);
  const int64_t extra = total - int64_t(L) * min_keep;
  if (extra < int64_t(events.size())) std::nth_element(events.begin(), events.begin() + extra, events.end());
  for (int64_t e = 0; e < extra; ++e) ++n[size_t(std::get<1>(events[size_t(e)]))];
  return n;
}

std::vector<int> counts_from_fractions(const std::vector<double>& keep, int N, int64_t total, int min_keep) {
  const int L = int(keep.size());
  min_keep = std::clamp(min_keep, 1, N);
  total = std::clamp<int64_t>(total, int64_t(L) * min_keep, int64_t(L) * N);
  std::vector<int> n(static_cast<size_t>(L));
  std::vector<double> want(static_cast<size_t>(L));
  int64_t sum = 0;
  for (int l = 0; l < L; ++l) {
    want[size_t(l)] = keep[size_t(l)] * N;
    n[size_t(l)] = std::clamp(int(std::floor(want[size_t(l)])), min_keep, N);
    sum += n[size_t(l)];
  }
  // Largest remainders first when adding, smallest first when removing.
  std::vector<int> order(static_cast<size_t>(L));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
    return want[size_t(a)] - n[size_t(a)] > want[size_t(b)] - n[size_t(b)];
  });
  while (sum < total) {
    bool moved = false;
    for (int l : order)
      if (sum < total && n[size_t(l)] < N) ++n[size_t(l)], ++sum, moved = true;
    PKV_ASSERT(moved);
  }
  while (sum > total) {
    bool moved = false;
    for (auto it = order.rbegin(); it != order.rend(); ++it)
      if (sum > total && n[size_t(*it)] > min_keep) --n[size_t(*it)], --sum, moved = true;
    PKV_ASSERT(moved);
  }
  return n;
}

std::vector<int32_t> top_entries(const std::vector<float>& score, int n, const std::vector<int32_t>& protected_idx) {
  const int N = int(score.size());
  n = std::clamp(n, 0, N);
  std::vector<char> keep(size_t(N), 0);
  int kept = 0;
  for (int32_t p : protected_idx)
    if (p >= 0 && p < N && !keep[size_t(p)] && kept < n) keep[size_t(p)] = 1, ++kept;
  const size_t need = size_t(n - kept);
  if (need > 0) {
    std::vector<int32_t> cand;
    cand.reserve(size_t(N - kept));
    for (int32_t i = 0; i < N; ++i)
      if (!keep[size_t(i)]) cand.push_back(i);
    const float* s = score.data();
    if (need < cand.size())
      std::nth_element(cand.begin(), cand.begin() + ptrdiff_t(need), cand.end(),
                       [s](int32_t a, int32_t b) { return ranks_before(s, a, b); });
    for (size_t i = 0; i < need; ++i) keep[size_t(cand[i])] = 1;
  }
  std::vector<int32_t> out;
  out.reserve(size_t(n));
  for (int i = 0; i < N; ++i)
    if (keep[size_t(i)]) out.push_back(i);
  return out;
}

}  // namespace pkv
