// The policies' selections are selections (nth_element), not sorts: each must give exactly what a
// full stable sort by score gives (ties to the earlier entry, the lower head, the lower layer), on
// scores full of ties, and a NaN score must rank below every number rather than break the order.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <tuple>

#include "kv/adakv.h"
#include "kv/cutoff.h"
#include "kv/prefix_search.h"

namespace pkv {
namespace {

// Scores with many ties (a few distinct levels), optionally some NaN.
std::vector<float> tied_scores(int n, int levels, std::mt19937& rng, double nan_share = 0) {
  std::uniform_int_distribution<int> lv(0, levels - 1);
  std::uniform_real_distribution<double> u(0, 1);
  std::vector<float> s(static_cast<size_t>(n));
  for (float& x : s) x = u(rng) < nan_share ? std::numeric_limits<float>::quiet_NaN() : float(lv(rng)) * 0.25f;
  return s;
}

// The definition: the protected entries, then the others in a stable sort by score (NaN last).
std::vector<int32_t> top_entries_by_sort(const std::vector<float>& s, int n, const std::vector<int32_t>& prot) {
  const int N = int(s.size());
  n = std::clamp(n, 0, N);
  std::vector<char> keep(size_t(N), 0);
  int kept = 0;
  for (int32_t p : prot)
    if (p >= 0 && p < N && !keep[size_t(p)] && kept < n) keep[size_t(p)] = 1, ++kept;
  auto key = [&](int32_t i) { return std::isnan(s[size_t(i)]) ? -std::numeric_limits<double>::infinity() : double(s[size_t(i)]); };
  std::vector<int32_t> order(static_cast<size_t>(N));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
    if (std::isnan(s[size_t(a)]) != std::isnan(s[size_t(b)])) return std::isnan(s[size_t(b)]);
    return key(a) > key(b);
  });
  for (int32_t i : order) {
    if (kept >= n) break;
    if (!keep[size_t(i)]) keep[size_t(i)] = 1, ++kept;
  }
  std::vector<int32_t> out;
  for (int i = 0; i < N; ++i)
    if (keep[size_t(i)]) out.push_back(i);
  return out;
}

TEST(Selection, TopEntriesEqualsTheStableSort) {
  std::mt19937 rng(3);
  for (int trial = 0; trial < 300; ++trial) {
    const int N = 1 + int(rng() % 300);
    const std::vector<float> s = tied_scores(N, 1 + int(rng() % 6), rng, trial % 3 == 0 ? 0.1 : 0.0);
    const int n = int(rng() % (N + 3)) - 1;
    std::vector<int32_t> prot = {0, N - 1};
    if (trial % 4 == 0) prot.push_back(int32_t(rng() % N));
    const std::vector<int32_t> got = top_entries(s, n, prot);
    ASSERT_EQ(got, top_entries_by_sort(s, n, prot)) << "trial " << trial << " N " << N << " n " << n;
    ASSERT_EQ(int(got.size()), std::clamp(n, 0, N));
  }
}

TEST(Selection, ANanScoreRanksBelowEveryNumber) {
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  const std::vector<float> s = {nan, 1.f, nan, -inf, 0.f, nan};
  EXPECT_EQ(top_entries(s, 3, {}), (std::vector<int32_t>{1, 3, 4}));
  EXPECT_EQ(top_entries(s, 4, {}), (std::vector<int32_t>{0, 1, 3, 4}));  // then the earliest NaN
  EXPECT_EQ(score_order(nan, -inf), -1);
  EXPECT_EQ(score_order(-inf, nan), 1);
  EXPECT_EQ(score_order(nan, nan), 0);
  EXPECT_EQ(score_order(2.f, 2.f), 0);
}

// adakv_select as a full sort: per head its floor best in stable score order, then one cutoff over
// the rest of every head by (score, head, entry).
std::vector<std::vector<int32_t>> adakv_by_sort(const std::vector<float>& scores, int H, int N, int B,
                                                const std::vector<int32_t>& fixed, double alpha) {
  const int S = B - int(fixed.size()), floor_n = int(std::floor(alpha * S));
  std::vector<char> is_fixed(size_t(N), 0);
  for (int32_t j : fixed) is_fixed[size_t(j)] = 1;
  std::vector<std::vector<char>> kept(size_t(H), std::vector<char>(size_t(N), 0));
  std::vector<std::tuple<double, int, int>> rest;  // (-score, head, entry): ascending = best first
  for (int h = 0; h < H; ++h) {
    const float* s = scores.data() + size_t(h) * N;
    std::vector<int32_t> o;
    for (int j = 0; j < N; ++j)
      if (!is_fixed[size_t(j)]) o.push_back(j);
    std::stable_sort(o.begin(), o.end(), [&](int32_t a, int32_t b) { return s[a] > s[b]; });
    for (int r = 0; r < int(o.size()); ++r) {
      if (r < floor_n) kept[size_t(h)][size_t(o[size_t(r)])] = 1;
      else rest.emplace_back(-double(s[o[size_t(r)]]), h, o[size_t(r)]);
    }
  }
  std::sort(rest.begin(), rest.end());
  for (size_t i = 0; i < size_t(H) * size_t(S - floor_n); ++i)
    kept[size_t(std::get<1>(rest[i]))][size_t(std::get<2>(rest[i]))] = 1;
  std::vector<std::vector<int32_t>> keep(static_cast<size_t>(H));
  for (int h = 0; h < H; ++h)
    for (int j = 0; j < N; ++j)
      if (is_fixed[size_t(j)] || kept[size_t(h)][size_t(j)]) keep[size_t(h)].push_back(j);
  return keep;
}

TEST(Selection, AdaKVEqualsTheSort) {
  std::mt19937 rng(5);
  for (int trial = 0; trial < 200; ++trial) {
    const int H = 1 + int(rng() % 5), N = 4 + int(rng() % 120);
    const std::vector<float> s = tied_scores(H * N, 1 + int(rng() % 5), rng);
    std::vector<int32_t> fixed = {0, N - 1};
    const int B = int(fixed.size()) + int(rng() % (N - 1));
    const double alpha = (rng() % 5) / 4.0;
    ASSERT_EQ(adakv_select(s, H, N, B, fixed, alpha), adakv_by_sort(s, H, N, B, fixed, alpha))
        << "trial " << trial << " H " << H << " N " << N << " B " << B << " alpha " << alpha;
  }
}

TEST(Selection, CutoffCountsEqualTheSort) {
  std::mt19937 rng(9);
  for (int trial = 0; trial < 200; ++trial) {
    const int L = 1 + int(rng() % 6), N = 2 + int(rng() % 100);
    std::vector<std::vector<float>> scores;
    std::vector<int> base;
    for (int l = 0; l < L; ++l) {
      scores.push_back(tied_scores(N, 1 + int(rng() % 4), rng));
      base.push_back(int(rng() % (N + 1)));
    }
    const int64_t total = int64_t(rng() % (uint64_t(L) * N + 1));
    // The definition: every layer's scores beyond its floor in one list, sorted by (score desc, layer,
    // rank), the first total - floors counted.
    std::vector<std::tuple<double, int, int>> cand;
    int64_t floors = 0;
    std::vector<int> want(base);
    for (int l = 0; l < L; ++l) {
      std::vector<float> s = scores[size_t(l)];
      std::sort(s.begin(), s.end(), std::greater<float>());
      floors += want[size_t(l)];
      for (int r = want[size_t(l)]; r < N; ++r) cand.emplace_back(-double(s[size_t(r)]), l, r);
    }
    std::sort(cand.begin(), cand.end());
    const int64_t take = std::clamp<int64_t>(total, floors, int64_t(L) * N) - floors;
    for (int64_t i = 0; i < take; ++i) ++want[size_t(std::get<1>(cand[size_t(i)]))];
    ASSERT_EQ(cutoff_budgets(scores, total, base), want) << "trial " << trial;
  }
}

TEST(Selection, PrefixBudgetsEqualTheSortedThresholds) {
  std::mt19937 rng(11);
  for (int trial = 0; trial < 200; ++trial) {
    const int L = 1 + int(rng() % 6), N = 2 + int(rng() % 80);
    std::vector<std::vector<float>> imp;
    for (int l = 0; l < L; ++l) imp.push_back(tied_scores(N, 1 + int(rng() % 4), rng));
    const int min_keep = 1 + int(rng() % 3);
    const int64_t total = int64_t(rng() % (uint64_t(L) * N + 1));
    // The definition (prefix_search.h): the thresholds C_l[n - 1] / C_l of every layer sorted stably,
    // the first total - L min_keep of them counted.
    const int mk = std::clamp(min_keep, 1, N);
    std::vector<std::tuple<double, int>> events;
    for (int l = 0; l < L; ++l) {
      std::vector<double> s(imp[size_t(l)].begin(), imp[size_t(l)].end());
      std::sort(s.begin(), s.end(), std::greater<double>());
      double sum = 0, cum = 0;
      for (double x : s) sum += std::max(0.0, x);
      for (int n = 1; n < N; ++n) {
        cum += std::max(0.0, s[size_t(n - 1)]);
        if (n >= mk) events.emplace_back(sum > 0 ? cum / sum : double(n) / N, l);
      }
    }
    std::stable_sort(events.begin(), events.end());
    std::vector<int> want(size_t(L), mk);
    const int64_t extra = std::clamp<int64_t>(total, int64_t(L) * mk, int64_t(L) * N) - int64_t(L) * mk;
    for (int64_t e = 0; e < extra; ++e) ++want[size_t(std::get<1>(events[size_t(e)]))];
    ASSERT_EQ(prefix_budgets(imp, total, min_keep), want) << "trial " << trial;
  }
}

}  // namespace
}  // namespace pkv
