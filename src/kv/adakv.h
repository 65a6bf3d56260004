// Ada-KV (Feng et al., "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for
// Efficient LLM Inference", arXiv 2407.11550) on SnapKV's scores: per-head budgets inside a layer.
//
// Per layer and KV head h, the score of entry j is the window attention of h's query heads on j
// (ImportanceRequest::per_kv_head: the sum over the last `window` prompt queries of the mean over
// the group's query heads), max-pooled along the sequence (pool_kernel, 7), as SnapKV scores a
// layer. The layer's budget is the uniform one, B = round(b * N) entries per head on average: H * B
// entries in the layer, the memory of uniform SnapKV at budget b. Every head keeps the fixed entries
// (the protected tokens and, when B holds them, the observation window: counted inside B, as SnapKV
// counts them); the H * (B - fixed) other slots go to the highest scores of all heads together: one
// cutoff across the heads, the allocation that minimises Ada-KV's bound on the attention output's
// L1 loss. The safeguard: each head first takes its own floor(alpha * (B - fixed)) best entries
// (alpha = PolicyOptions::head_floor), the cutoff then ranks what is left. So a head keeps at least
// floor(alpha * B) entries, and every kept entry scores at least as high as every evicted entry
// of the layer except those that the floor keeps.
//
// The authors' code (FFY0/AdaKV, AdaptiveSnapKVCluster) applies alpha differently: it takes the
// top H * B' over all heads (B' = B - window), counts c_h per head and gives head h
// round(alpha * B' + (1 - alpha) * c_h): a blend of the uniform and the adaptive count. The rule
// here is the paper's: a uniform floor of alpha * B' per head and the rest allocated adaptively by
// one cutoff, which keeps the cutoff property exact.
//
// Decoding (METHOD.md section 4, per head): a new token goes to every head; under the proportional
// rule head h of layer l keeps round(k_lh * T) entries (k_lh = its prefill count / N, T = tokens so
// far), under the cap rule its prefill count; when over, it evicts at the fixed place within its own
// entries (fifo_offset before the end of its prefill-kept part; protected entries and the newest
// never). Each head is then what a layer is to BudgetedPolicy, and the layer's total follows
// sum_h round(k_lh * T), within H / 2 of k_l * H * T.
#pragma once
#include <cstdint>
#include <vector>

#include "kv/budgeted.h"

namespace pkv {

// The selection of one layer: scores [H * N] (head-major, already pooled), per-head budget B
// (fixed.size() <= B <= N), the fixed entries (ascending, kept in every head), the floor share alpha.
// Returns per head the kept indices, ascending; sizes sum to H * B. Ties go to the lower head, then
// the earlier entry.
std::vector<std::vector<int32_t>> adakv_select(const std::vector<float>& scores, int H, int N, int B,
                                               const std::vector<int32_t>& fixed, double alpha);

class AdaKVPolicy : public BudgetedPolicy {
 public:
  using BudgetedPolicy::BudgetedPolicy;
  std::string name() const override { return "adakv"; }
  bool per_head() const override { return true; }
  ImportanceRequest prefill_importance(int prompt_len) const override;
  // importance[l]: [kv_heads * N] per KV head (ImportanceRequest::per_kv_head). Layers whose
  // budget is the whole prompt are left shared.
  KeepPlan after_prefill(const CacheView& cache, const std::vector<std::vector<float>>& importance,
                         int prompt_len) override;
};

}  // namespace pkv
