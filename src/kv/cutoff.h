// Layer allocation by one cutoff across layers, 2-D pooling over the image grid, and policy names
// that carry options (issue 13 items 2 and 3; docs/RESULTS.md, "Layer allocation and ranking").
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "kv/policy.h"

namespace pkv {

// One score threshold across layers (DynamicKV arXiv 2412.14838, CriticalKV 2502.03805): layer l
// keeps base[l] entries (its floor: its highest scores), and beyond those, the entries of all
// layers compete on their score: the `total - sum(base)` highest of them are kept wherever they are.
// So n_l = base[l] + the count of layer l's entries beyond its floor that pass the one threshold,
// and every kept entry beyond a floor scores at least as high as every evicted entry of any layer.
// Ties go to the lower layer, then to the higher score rank. `total` is clamped to
// [sum(base), L * N]; base[l] to [0, N]. The scores must be finite or +inf (protected entries).
std::vector<int> cutoff_budgets(const std::vector<std::vector<float>>& scores, int64_t total, const std::vector<int>& base);

// The entries each layer keeps whatever the threshold (cutoff_budgets' base), out of N at the kept
// fraction `budget` (uniform budget u = round(budget N), at least `protected_count`): its floor
// share of u, round(layer_floor u), and with evict_cap >= 1 at least N - round(evict_cap (N - u)), so
// that no layer evicts more than evict_cap times the uniform eviction; clamped to [protected_count, u].
// The second bound only binds near the full cache: with floor f it takes over above
// budget = (cap - 1) / (cap - f) (cap 2, f 0.5: above 2/3 kept).
int cutoff_floor(int N, double budget, int protected_count, double layer_floor, double evict_cap);

// The scores a prefix policy ranks by: max-pooled over neighbours. Entries of the image (indices
// [image_offset, image_offset + image_tokens), a square grid of G x G patches in row-major order) take
// the maximum over their grid_kernel x grid_kernel neighbourhood of patches (when grid_kernel > 1 and
// image_tokens is a square); every other entry, and every entry when the image is unknown or not a
// square or grid_kernel <= 1, the maximum over seq_kernel neighbours along the sequence (max_pool_1d;
// seq_kernel <= 1: as it is).
std::vector<float> pool_scores(const std::vector<float>& s, int seq_kernel, int grid_kernel, int image_offset,
                               int image_tokens);

// A policy named with options: "NAME[:OPTION]...", e.g. "cutoff:wov:floor=0.5:grid=3:look=8". The
// options (each overrides PolicyOptions for this policy only, so one evaluation can compare
// variants): w=none|vnorm|wov|wov2 (or the bare word), floor=F (layer_floor, [0, 1]), cap=C
// (layer_evict_cap, 0 or >= 1), grid=K (grid_pool),
// look=K (lookahead), reduce=sum|mean|max, pool=K (prefix_pool), heads or alloc=head|layer (alloc: the
// prefix policies' head-level allocation, kv/prefix_policy.h), hfloor=F (head_floor, [0, 1]: adakv's
// and the head allocation's floor per head). Returns NAME; errors name `option` and the spec.
std::string policy_base_name(const std::string& spec);
void apply_policy_spec(const std::string& spec, PolicyOptions& opt, const std::string& option = "--kv-policy");

}  // namespace pkv
