// PyramidKV (Cai et al. 2024): SnapKV's selection with per-layer budgets that decrease linearly with
// depth, the same total: the last layer keeps avg / beta, the first 2 avg - avg / beta (clamped to
// [protected, N], the total then fixed exactly).
#include <algorithm>
#include <cmath>

#include "kv/prefix_search.h"
#include "kv/snapkv.h"

namespace pkv {
namespace {

class PyramidKVPolicy : public SnapKVPolicy {
 public:
  using SnapKVPolicy::SnapKVPolicy;
  std::string name() const override { return "pyramidkv"; }

 protected:
  std::vector<int> layer_budgets(const std::vector<std::vector<float>>&, int N, int L) override {
    const double avg = budget_fraction(N) * N;
    const double lo = avg / opt_.pyramid_beta, hi = 2 * avg - lo;
    std::vector<double> keep(static_cast<size_t>(L));
    for (int l = 0; l < L; ++l) keep[size_t(l)] = (L == 1 ? avg : hi - (hi - lo) * l / (L - 1)) / N;
    return counts_from_fractions(keep, N, std::llround(avg * L), std::min(N, opt_.protected_count));
  }
};

}  // namespace

std::unique_ptr<KVPolicy> make_pyramidkv_policy(const PolicyOptions& o) { return std::make_unique<PyramidKVPolicy>(o); }

}  // namespace pkv
