// PrefixKV searched per request (METHOD.md section 5): the global prefix configuration computed on
// this request's own importance, no calibration; per layer, or per (layer, KV head) with `heads`.
#include <cmath>

#include "kv/prefix_policy.h"
#include "kv/prefix_search.h"

namespace pkv {
namespace {

class PrefixKVOnlinePolicy : public PrefixPolicy {
 public:
  using PrefixPolicy::PrefixPolicy;
  std::string name() const override { return "prefixkv-online"; }

 protected:
  std::vector<int> layer_budgets(const std::vector<std::vector<float>>& imp, int N, int L) override {
    const auto& s = scores(imp, N);
    return prefix_budgets(s, std::llround(budget_fraction(N) * N * L), std::min(N, opt_.protected_count));
  }
  // The same search over the L x H (layer, KV head) units (kv/prefix_policy.h).
  std::vector<int> head_budgets(const std::vector<std::vector<float>>& units, int N, int L, int H, int min_keep) override {
    return prefix_budgets(units, std::llround(budget_fraction(N) * N * L * H), min_keep);
  }
};

}  // namespace

std::unique_ptr<KVPolicy> make_prefixkv_online_policy(const PolicyOptions& o) {
  return std::make_unique<PrefixKVOnlinePolicy>(o);
}

}  // namespace pkv
