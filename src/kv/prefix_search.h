// The global prefix configuration of PrefixKV (METHOD.md section 2).
#pragma once
#include <cstdint>
#include <vector>

namespace pkv {

// Per layer, the smallest prefix of its importance-sorted tokens that holds a share p of its
// importance mass, for the one retention level p at which the prefixes of all layers together hold
// exactly `total` entries. Each layer keeps between `min_keep` and N (= importance[l].size()).
//
// METHOD.md describes a binary search over p with a capped number of iterations followed by an
// exact fix of the remaining difference (largest remainders). This computes the limit of that search
// directly: layer l grows from n to n + 1 tokens when p passes C_l[n - 1] (the mass of its n most
// important tokens), so sorting these thresholds over all layers and taking the first
// total - L * min_keep of them is the p-sweep itself. Exact, O(N L log(N L)), and monotone in
// `total` by construction. Ties go to the lower layer index.
// `total` is clamped to [L * min_keep, L * N].
std::vector<int> prefix_budgets(const std::vector<std::vector<float>>& importance, int64_t total, int min_keep);

// Per-layer counts from keep fractions: round(k_l * N) adjusted by largest remainders so that the
// counts sum to exactly `total`, each within [min_keep, N].
std::vector<int> counts_from_fractions(const std::vector<double>& keep, int N, int64_t total, int min_keep);

// Indices (ascending) of the `n` entries to keep: the protected ones plus the highest-scoring others
// (ties to the earlier entry; a NaN score ranks below every number). A selection, not a sort: O(N) on
// average.
std::vector<int32_t> top_entries(const std::vector<float>& score, int n, const std::vector<int32_t>& protected_idx);

// The order of scores in every selection (top_entries, adakv's, the cutoff's): highest first, a NaN
// after every number. 1: x ranks before y; -1: after; 0: a tie (left to the caller's index order).
inline int score_order(float x, float y) {
  if (x > y) return 1;
  if (x < y) return -1;
  const bool xn = x != x, yn = y != y;
  return xn == yn ? 0 : xn ? -1 : 1;
}
// Whether entry a ranks before entry b by score, ties to the earlier index: a strict total order.
inline bool ranks_before(const float* score, int32_t a, int32_t b) {
  const int o = score_order(score[a], score[b]);
  return o != 0 ? o > 0 : a < b;
}

}  // namespace pkv
