// PrefixKV with an offline profile (METHOD.md section 3-4): layer l keeps round(k_l N) entries, the
// counts adjusted so that all layers together keep exactly round(b N L). With a profile's per-head
// table (or `heads`), the same per (layer, KV head): round(k_lh N), all together round(b N L H).
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
  bool default_head_alloc() const override { return !opt_.head_keep_fractions.empty(); }
  std::vector<int> layer_budgets(const std::vector<std::vector<float>>& imp, int N, int L) override {
    scores(imp, N);
    if (int(opt_.keep_fractions.size()) != L)
      fail("profile", "has " + std::to_string(opt_.keep_fractions.size()) + " layers but the model has " +
                          std::to_string(L));
    return counts(opt_.keep_fractions, N, std::min(N, opt_.protected_count));
  }
  // The profile's per-head table: unit l * H + h keeps round(k_lh N), adjusted to the exact total.
  std::vector<int> head_budgets(const std::vector<std::vector<float>>&, int N, int L, int H, int min_keep) override {
    const auto& t = opt_.head_keep_fractions;
    if (int(t.size()) != L || int(t[0].size()) != H)
      fail("profile", "has a per-head table of " + std::to_string(t.size()) + " layers x " +
                          std::to_string(t.empty() ? 0 : t[0].size()) + " KV heads, but the model has " +
                          std::to_string(L) + " x " + std::to_string(H));
    std::vector<double> k;
    for (const auto& l : t) k.insert(k.end(), l.begin(), l.end());
    return counts(k, N, min_keep);
  }

 private:
  // Counts from a profile's fractions (one per unit) summing to round(b N units) exactly. A profile
  // is made for one budget; for a token budget the request's own b differs: scale it.
  std::vector<int> counts(std::vector<double> k, int N, int min_keep) const {
    const double b = budget_fraction(N);
    double mean = 0;
    for (double x : k) mean += x / double(k.size());
    if (mean > 0)
      for (double& x : k) x *= b / mean;
    return counts_from_fractions(k, N, std::llround(b * N * double(k.size())), min_keep);
  }
};

}  // namespace

std::unique_ptr<KVPolicy> make_prefixkv_policy(const PolicyOptions& o) { return std::make_unique<PrefixKVPolicy>(o); }

}  // namespace pkv
