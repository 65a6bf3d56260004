// PrefixKV with an offline profile (METHOD.md section 3-4): layer l keeps round(k_l N) entries, the
// counts adjusted so that all layers together keep exactly round(b N L).
#include <cmath>

#include "core/error.h"
#include "kv/prefix_policy.h"
#include "kv/prefix_search.h"

namespace pkv {
namespace {

class PrefixKVPolicy : public PrefixPolicy {
 public:
  explicit PrefixKVPolicy(const PolicyOptions& o) : PrefixPolicy(o) {
    if (o.keep_fractions.empty()) fail("--kv-policy prefixkv", "needs a profile (per-layer keep fractions)");
  }
  std::string name() const override { return "prefixkv"; }

 protected:
  std::vector<int> layer_budgets(const std::vector<std::vector<float>>& imp, int N, int L) override {
    scores(imp, N);
    if (int(opt_.keep_fractions.size()) != L)
      fail("profile", "has " + std::to_string(opt_.keep_fractions.size()) + " layers but the model has " +
                          std::to_string(L));
    const double b = budget_fraction(N);
    // A profile is made for one budget; for a token budget the request's own b differs: scale it.
    std::vector<double> k = opt_.keep_fractions;
    double mean = 0;
    for (double x : k) mean += x / L;
    if (mean > 0)
      for (double& x : k) x *= b / mean;
    return counts_from_fractions(k, N, std::llround(b * N * L), std::min(N, opt_.protected_count));
  }
};

}  // namespace

std::unique_ptr<KVPolicy> make_prefixkv_policy(const PolicyOptions& o) { return std::make_unique<PrefixKVPolicy>(o); }

}  // namespace pkv
