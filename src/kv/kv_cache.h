// The per-sequence, per-layer KV cache (DESIGN.md principle 4).
//
// Each layer holds its own entries: keys (after RoPE) and values, and the absolute position of each
// entry. Layers may hold different numbers of entries; attention in layer l reads exactly the
// entries that layer l holds. Eviction policies decide which entries of a layer to keep and the
// cache applies the decision with retain(), which compacts the storage and frees the memory.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <span>
#include <vector>

#include "kv/keep_plan.h"

namespace pkv {

// A layer starts with every KV head holding the same entries (one row of all heads' keys per entry:
// keys(), values(), positions()). A plan with one keep list per KV head (LayerKeep::head_keep) turns it
// into a per-head layer: each head then holds its own entries (head_keys(h) [size(h), head_dim],
// head_values(h), head_positions(h)) and attention in that head reads exactly those. New entries
// (decoding) go to every head. A per-head layer stays per-head (its plans must be per head).
class KVLayer {
 public:
  explicit KVLayer(int kv_dim, int n_kv_heads = 1);

  bool per_head() const { return per_head_; }
  int n_kv_heads() const { return n_kv_heads_; }
  int head_dim() const { return kv_dim_ / n_kv_heads_; }
  int kv_dim() const { return kv_dim_; }
  // Shared layers: the entries every head holds. Per-head layers: the most any head holds.
  int size() const;
  int size(int head) const { return per_head_ ? int(heads_[size_t(head)].pos.size()) : int(pos_.size()); }
  int total_entries() const;  // summed over heads (shared layers: size() * n_kv_heads)

  // Shared layers only (asserted).
  const float* keys() const;    // [size, kv_dim]
  const float* values() const;  // [size, kv_dim]
  const int32_t* positions() const;  // [size], strictly increasing
  float* mutable_keys();
  float* mutable_values();
  // Per-head layers only (asserted): head h's own entries.
  const float* head_keys(int h) const { return heads_[size_t(h)].k.data(); }      // [size(h), head_dim]
  const float* head_values(int h) const { return heads_[size_t(h)].v.data(); }    // [size(h), head_dim]
  const int32_t* head_positions(int h) const { return heads_[size_t(h)].pos.data(); }

  void reserve(int entries);
  // Appends n entries to every head; k, v: [n, kv_dim]; positions must be larger than every held
  // position.
  void append(const float* k, const float* v, const int32_t* positions, int n);
  // Keeps the entries at the given indices (strictly increasing, within [0, size)), in order,
  // and releases the storage of the others. Shared layers only.
  void retain(std::span<const int32_t> keep);
  // Applies a policy's plan for this layer: with plan.merge, each kept entry's key and value first
  // become the mean over its nearest-kept group (ops/kv_merge.h; sums in double), per head for a
  // per-head plan; then the retain. The plan must have passed check_plan.
  void apply(const LayerKeep& plan);
  void clear();

  size_t bytes() const;  // bytes of the entries held: total_entries * 2 * head_dim * sizeof(float)
  std::vector<size_t> bytes_per_head() const;
  size_t capacity_bytes() const;

 private:
  struct Head {
    std::vector<float> k, v;  // [entries, head_dim]
    std::vector<int32_t> pos;
  };
  void split_heads();  // shared -> per-head, every head keeping every entry
  int kv_dim_, n_kv_heads_;
  bool per_head_ = false;
  std::vector<float> k_, v_;  // shared: [size, kv_dim]
  std::vector<int32_t> pos_;
  std::vector<Head> heads_;   // per-head: [n_kv_heads]
};

class KVCache : public CacheView {
 public:
  KVCache(int n_layers, int kv_dim, int n_kv_heads = 1);
  int n_layers() const override { return int(layers_.size()); }
  std::span<const int32_t> positions(int l) const override;
  int kv_heads() const override { return layers_.empty() ? 0 : layers_[0].n_kv_heads(); }
  bool per_head(int l) const override { return layers_[size_t(l)].per_head(); }
  std::span<const int32_t> head_positions(int l, int h) const override;
  // Checks a policy's plan (check_plan, naming `who`) and applies it to every layer it names.
  void apply(const KeepPlan& plan, const std::string& who);
  KVLayer& layer(int l) { return layers_[size_t(l)]; }
  const KVLayer& layer(int l) const { return layers_[size_t(l)]; }
  void reserve(int entries);
  void clear();
  // An explicit deep copy (a cache can hold hundreds of megabytes: never copied implicitly).
  KVCache clone() const { return *this; }
  KVCache(KVCache&&) = default;
  KVCache& operator=(KVCache&&) = default;
  size_t bytes() const;
  std::vector<size_t> bytes_per_layer() const;
  std::vector<std::vector<size_t>> bytes_per_head() const;  // [layers][kv heads]

 private:
  KVCache(const KVCache&) = default;
  KVCache& operator=(const KVCache&) = default;
  std::vector<KVLayer> layers_;
};

}  // namespace pkv
