// Keep plans: what a KV policy decides (src/kv/policy.h), applied by every cache alike: the CPU
// cache (KVCache::apply) and the paged GPU pool (GpuKVPool::compact). Policies decide, caches act.
#pragma once
#include <cstdint>
#include <span>
#include <string>
#include <utility>
#include <vector>

namespace pkv {

// One layer of one sequence: the entries to keep, as indices into the layer as it was when the plan
// was made (strictly increasing, at least one), and whether the kept entries absorb the others: with
// `merge`, every entry belongs to its nearest kept entry (ops/kv_merge.h: the rule, in one place)
// and each kept entry's key and value become the mean over its group (Elastic Cache).
struct LayerKeep {
  LayerKeep() = default;
  LayerKeep(int layer_, int before_, std::vector<int32_t> keep_, bool merge_ = false)
      : layer(layer_), before(before_), keep(std::move(keep_)), merge(merge_) {}

  int layer = 0;
  int before = 0;              // entries the layer held when the plan was made (checked on apply);
                               // a per-head layer: summed over its heads
  std::vector<int32_t> keep;   // [kept] indices into the layer, strictly increasing
  bool merge = false;
  // One keep list per KV head ([kv_heads][kept_h], each strictly increasing, indices into that
  // head's entries) instead of `keep`: per-head budgets. The layer becomes per-head (kv_cache.h).
  std::vector<std::vector<int32_t>> head_keep;
};

// A sequence's plan: the layers that change, in increasing layer order (layers not named keep every
// entry).
struct KeepPlan {
  std::vector<LayerKeep> layers;
  bool empty() const { return layers.empty(); }
};

// What a policy may read of a sequence's cache when it decides: per layer, the absolute positions of
// the entries held, in order (strictly increasing). A cache that can hold per-head entries says how
// many KV heads it has (kv_heads() > 0); a layer made per-head by a head plan has no single list of
// positions (positions() throws), only one per head.
class CacheView {
 public:
  virtual ~CacheView() = default;
  virtual int n_layers() const = 0;
  virtual std::span<const int32_t> positions(int layer) const = 0;
  int size(int layer) const { return int(positions(layer).size()); }
  virtual int kv_heads() const { return 0; }  // 0: this cache keeps the same entries in every head
  virtual bool per_head(int layer) const { return false; }
  virtual std::span<const int32_t> head_positions(int layer, int head) const { return positions(layer); }
  // Entries the layer holds, summed over heads for a per-head layer (what LayerKeep::before counts).
  int held(int layer) const;
};

// Checks a plan against the cache it is for: layers in range and increasing, `before` equal to what
// the layer holds, keep lists strictly increasing within the layer (or the head) and not empty where
// it holds entries; head lists only for a cache with per-head entries, one per KV head, and a
// per-head layer only with head lists. Throws Error naming `who` (the policy) and the layer: a plan
// no cache can apply is a bug.
void check_plan(const KeepPlan& plan, const CacheView& cache, const std::string& who);

// Entry positions per layer without keys and values: what the GPU session keeps on the host to let
// its policy decide (the pool holds the rows). With kv_heads > 0 a head plan makes a layer per-head,
// as it does in the CPU cache (one list of positions per KV head from then on).
class PositionTable : public CacheView {
 public:
  explicit PositionTable(int n_layers, int kv_heads = 0)
      : pos_(static_cast<size_t>(n_layers)), heads_(static_cast<size_t>(n_layers)), kv_heads_(kv_heads) {}
  int n_layers() const override { return int(pos_.size()); }
  std::span<const int32_t> positions(int layer) const override;  // throws for a per-head layer
  int kv_heads() const override { return kv_heads_; }
  bool per_head(int layer) const override { return !heads_[size_t(layer)].empty(); }
  std::span<const int32_t> head_positions(int layer, int head) const override;
  // Appends n positions to every layer (every head of a per-head layer).
  void append_all(const int32_t* positions, int n);
  // Keeps the planned entries of each named layer (the plan must pass check_plan).
  void apply(const KeepPlan& plan);

 private:
  std::vector<std::vector<int32_t>> pos_;                 // [layers][entries]: shared layers
  std::vector<std::vector<std::vector<int32_t>>> heads_;  // [layers][kv heads][entries]: per-head layers
  int kv_heads_ = 0;
};

}  // namespace pkv
