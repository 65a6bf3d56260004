// SnapKV (Li et al. 2024): per layer, the attention of the last `window` prompt queries summed over
// heads, max-pooled along the sequence (kernel 7); keep the top tokens plus the observation window.
// PyramidKV reuses the selection with budgets that shrink with depth (pyramidkv.cc).
#include <algorithm>

#include "kv/budgeted.h"
#include "kv/prefix_search.h"
#include "kv/snapkv.h"

namespace pkv {

ImportanceRequest SnapKVPolicy::prefill_importance(int N) const {
  return estimator_request(Estimator::Window, opt_.window, N);
}

std::vector<int32_t> SnapKVPolicy::select(int, const std::vector<float>& imp, int n, int N) {
  const int w = std::min(opt_.window, N);
  std::vector<float> s = max_pool_1d(imp, opt_.pool_kernel);
  if (n >= w) {
    for (int i = N - w; i < N; ++i) s[size_t(i)] = 1e30f;  // the observation window is kept
  }
  return top_entries(s, n, protected_indices(N));
}

std::unique_ptr<KVPolicy> make_snapkv_policy(const PolicyOptions& o) { return std::make_unique<SnapKVPolicy>(o); }

}  // namespace pkv
