#include "kv/keep_plan.h"

#include "core/error.h"

namespace pkv {

void check_plan(const KeepPlan& plan, const CacheView& cache, const std::string& who) {
  int previous = -1;
  for (const LayerKeep& k : plan.layers) {
    const std::string where = who + ": keep plan for layer " + std::to_string(k.layer);
    if (k.layer < 0 || k.layer >= cache.n_layers())
      fail(where, "names a layer outside [0, " + std::to_string(cache.n_layers()) + ")");
    if (k.layer <= previous) fail(where, "comes after layer " + std::to_string(previous) + " (layers must increase)");
    previous = k.layer;
    const int held = cache.size(k.layer);
    if (k.before != held)
      fail(where, "was made for " + std::to_string(k.before) + " entries, the layer holds " + std::to_string(held));
    if (!k.head_keep.empty())
      fail(where, "has one keep list per KV head, and this cache keeps the same entries in every head");
    if (k.keep.empty() && held > 0) fail(where, "keeps no entry");
    for (size_t i = 0; i < k.keep.size(); ++i) {
      if (k.keep[i] < 0 || k.keep[i] >= held)
        fail(where, "keeps index " + std::to_string(k.keep[i]) + " of a layer of " + std::to_string(held) + " entries");
      if (i > 0 && k.keep[i] <= k.keep[i - 1])
        fail(where, "keep list is not strictly increasing at " + std::to_string(i));
    }
  }
}

void PositionTable::append_all(const int32_t* positions, int n) {
  for (auto& p : pos_) p.insert(p.end(), positions, positions + n);
}

void PositionTable::apply(const KeepPlan& plan) {
  for (const LayerKeep& k : plan.layers) {
    std::vector<int32_t>& p = pos_[size_t(k.layer)];
    PKV_ASSERT(int(p.size()) == k.before);
    for (size_t i = 0; i < k.keep.size(); ++i) p[i] = p[size_t(k.keep[i])];
    p.resize(k.keep.size());
  }
}

}  // namespace pkv
