// Importance beyond the prefill's own attention sum (issue 13 items 2 and 3; docs/RESULTS.md,
// "Layer allocation and ranking"), measured on the CPU from a prompt's uncompressed cache:
//  - value weighting: each query head's probability on an entry times what the entry's value can
//    contribute: ||v||_1 of its KV head, or ||W_o^h v||_1, the value through query head h's slice of
//    the output projection (CriticalKV, arXiv 2502.03805). Makes scores comparable across layers;
//  - lookahead queries: the first k greedy answer tokens decoded over the full cache, whose
//    attention to the prompt's entries is what the answer will start by reading;
//  - how the queries combine: their sum (METHOD.md section 1), mean or maximum.
// The queries' attention is recomputed here from the queries the decoder shows its observer
// ("attn_q", after RoPE) and the keys the cache holds: one plain softmax per query row and head, as
// ops::attention computes it, so no kernel needs to know about any of this.
#pragma once
#include <vector>

#include "engine/engine.h"
#include "kv/kv_cache.h"
#include "kv/policy.h"
#include "model/model.h"

namespace pkv {

// Per layer, per query head h and entry j < n of `cache` (a cache whose layers share their entries):
// ValueNorm: ||v_{g(h), j}||_1 (g(h): h's KV head); OutputNorm: ||W_o^h v_{g(h), j}||_1 with
// W_o^h = W_o[:, h hd : (h+1) hd] (BLAS products, n x hidden x head_dim per query head and layer);
// OutputNorm2: ||W_o^h v_{g(h), j}||_2 = sqrt(v^T G_h v) with the model's Gram matrices
// (Model::output_gram; n x head_dim^2 per query head and layer).
// [layers][n_heads * n], head-major. None: every weight 1.
std::vector<std::vector<float>> value_weights(const Model& model, const KVCache& cache, ValueWeight w, int n);

// The score of each of the first n entries of every layer of `cache` for each query row of the
// decode call that just appended rows at positions `pos` [T]: layer l's q [T, n_heads * head_dim]
// (after RoPE); row i sees the entries at positions <= pos[i]. out[l][i * n + j] = the mean over
// query heads h of p_h(i, j) * weight[l][h * n + j] (weight empty: 1).
void query_scores(const Model& model, const KVCache& cache, const std::vector<std::vector<float>>& q,
                  const int32_t* pos, int T, const std::vector<std::vector<float>>& weight, int n,
                  std::vector<std::vector<float>>& out);

struct QueryImportanceStats {
  int steps = 0;      // decoder calls beyond the prefill (lookahead: one per token)
  double ms = 0;      // their time, weights and scores included
  std::vector<int32_t> lookahead_tokens;
};

// The importance an extended request asks for (ImportanceRequest::extended()), per layer over the
// prompt's N = p.ids.size() entries, from the prompt's uncompressed cache `full` (N entries per
// layer), its prepared prompt (the window's rows are decoded again, teacher-forced, over the cache
// cut before them: the same queries as the prefill's) and the logits of its last position (the first
// lookahead token, greedy). The queries: lookahead > 0: the first `lookahead` greedy answer tokens,
// one decode step each (fewer when one ends the sequence); else the prompt's rows from req.from.
// Each query's score of an entry as query_scores, combined over the queries by req.reduce.
std::vector<std::vector<float>> extended_importance(const Model& model, const KVCache& full, const PreparedPrompt& p,
                                                    const float* last_logits, const ImportanceRequest& req,
                                                    QueryImportanceStats* stats = nullptr);

}  // namespace pkv
