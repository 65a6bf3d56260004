#include "kv/keep_plan.h"

#include "core/error.h"

namespace pkv {

int CacheView::held(int layer) const {
  if (!per_head(layer)) return size(layer);
  int n = 0;
  for (int h = 0; h < kv_heads(); ++h) n += int(head_positions(layer, h).size());
  return n;
}

namespace {

void check_list(const std::vector<int32_t>& keep, int held, const std::string& where, const std::string& what) {
  if (keep.empty() && held > 0) fail(where, what + " keeps no entry");
  for (size_t i = 0; i < keep.size(); ++i) {
    if (keep[i] < 0 || keep[i] >= held)
      fail(where, what + " keeps index " + std::to_string(keep[i]) + " of " + std::to_string(held) + " entries");
    if (i > 0 && keep[i] <= keep[i - 1]) fail(where, what + " is not strictly increasing at " + std::to_string(i));
  }
}

}  // namespace

void check_plan(const KeepPlan& plan, const CacheView& cache, const std::string& who) {
  int previous = -1;
  for (const LayerKeep& k : plan.layers) {
    const std::string where = who + ": keep plan for layer " + std::to_string(k.layer);
    if (k.layer < 0 || k.layer >= cache.n_layers())
      fail(where, "names a layer outside [0, " + std::to_string(cache.n_layers()) + ")");
    if (k.layer <= previous) fail(where, "comes after layer " + std::to_string(previous) + " (layers must increase)");
    previous = k.layer;
    const int held = cache.held(k.layer);
    if (k.before != held)
      fail(where, "was made for " + std::to_string(k.before) + " entries, the layer holds " + std::to_string(held));
    if (k.head_keep.empty()) {
      if (cache.per_head(k.layer)) fail(where, "has one keep list for a layer whose heads hold their own entries");
      check_list(k.keep, held, where, "the keep list");
      continue;
    }
    if (cache.kv_heads() == 0)
      fail(where, "has one keep list per KV head, and this cache keeps the same entries in every head");
    if (int(k.head_keep.size()) != cache.kv_heads())
      fail(where, "has " + std::to_string(k.head_keep.size()) + " head keep lists for " + std::to_string(cache.kv_heads()) +
                      " KV heads");
    if (!k.keep.empty()) fail(where, "has both a layer keep list and head keep lists");
    for (int h = 0; h < cache.kv_heads(); ++h)
      check_list(k.head_keep[size_t(h)], int(cache.head_positions(k.layer, h).size()), where,
                 "the keep list of KV head " + std::to_string(h));
  }
}

std::span<const int32_t> PositionTable::positions(int layer) const {
  if (per_head(layer))
    fail("position table layer " + std::to_string(layer), "its heads hold their own entries: read them per head (head_positions)");
  return pos_[size_t(layer)];
}

std::span<const int32_t> PositionTable::head_positions(int layer, int head) const {
  if (!per_head(layer)) return pos_[size_t(layer)];
  return heads_[size_t(layer)][size_t(head)];
}

void PositionTable::append_all(const int32_t* positions, int n) {
  for (size_t l = 0; l < pos_.size(); ++l) {
    if (!per_head(int(l))) pos_[l].insert(pos_[l].end(), positions, positions + n);
    for (auto& h : heads_[l]) h.insert(h.end(), positions, positions + n);
  }
}

void PositionTable::apply(const KeepPlan& plan) {
  for (const LayerKeep& k : plan.layers) {
    if (!k.head_keep.empty()) {  // a head plan: each head keeps its own list (of its own entries)
      auto& heads = heads_[size_t(k.layer)];
      if (heads.empty()) heads.assign(k.head_keep.size(), pos_[size_t(k.layer)]);
      pos_[size_t(k.layer)].clear();
      PKV_ASSERT(heads.size() == k.head_keep.size());
      for (size_t h = 0; h < heads.size(); ++h) {
        std::vector<int32_t>& p = heads[h];
        const std::vector<int32_t>& keep = k.head_keep[h];
        for (size_t i = 0; i < keep.size(); ++i) p[i] = p[size_t(keep[i])];
        p.resize(keep.size());
      }
      continue;
    }
    std::vector<int32_t>& p = pos_[size_t(k.layer)];
    PKV_ASSERT(int(p.size()) == k.before);
    for (size_t i = 0; i < k.keep.size(); ++i) p[i] = p[size_t(k.keep[i])];
    p.resize(k.keep.size());
  }
}

}  // namespace pkv
