// StreamingLLM (Xiao et al. 2023): the first `sinks` tokens plus the most recent ones; during
// decoding the oldest non-sink entry leaves.
#include <algorithm>

#include "kv/budgeted.h"

namespace pkv {
namespace {

class StreamingPolicy : public BudgetedPolicy {
 public:
  using BudgetedPolicy::BudgetedPolicy;
  std::string name() const override { return "streaming"; }

 protected:
  std::vector<int32_t> select(int, const std::vector<float>&, int n, int N) override {
    const int s = std::min({opt_.sinks, n, N});
    std::vector<int32_t> keep;
    for (int i = 0; i < s; ++i) keep.push_back(i);
    for (int i = N - (n - s); i < N; ++i) keep.push_back(i);
    return keep;
  }
  int decode_victim(std::span<const int32_t> positions, int) override {
    return std::min(opt_.sinks, int(positions.size()) - 1);
  }
};

}  // namespace

std::unique_ptr<KVPolicy> make_streaming_policy(const PolicyOptions& o) { return std::make_unique<StreamingPolicy>(o); }

}  // namespace pkv
