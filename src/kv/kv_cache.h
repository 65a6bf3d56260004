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

class KVLayer {
 public:
  KVLayer(int kv_dim) : kv_dim_(kv_dim) {}

  int size() const { return int(pos_.size()); }
  int kv_dim() const { return kv_dim_; }
  const float* keys() const { return k_.data(); }    // [size, kv_dim]
  const float* values() const { return v_.data(); }  // [size, kv_dim]
  const int32_t* positions() const { return pos_.data(); }  // [size], strictly increasing
  float* mutable_keys() { return k_.data(); }
  float* mutable_values() { return v_.data(); }

  void reserve(int entries);
  // Appends n entries; k, v: [n, kv_dim]; positions must be larger than every held position.
  void append(const float* k, const float* v, const int32_t* positions, int n);
  // Keeps the entries at the given indices (strictly increasing, within [0, size)), in order,
  // and releases the storage of the others.
  void retain(std::span<const int32_t> keep);
  // Applies a policy's plan for this layer: with plan.merge, each kept entry's key and value first
  // become the mean over its nearest-kept group (ops/kv_merge.h; sums in double); then retain.
  // The plan must have passed check_plan.
  void apply(const LayerKeep& plan);
  void clear();

  size_t bytes() const;     // bytes of the entries held: size * 2 * kv_dim * sizeof(float)
  size_t capacity_bytes() const;

 private:
  int kv_dim_;
  std::vector<float> k_, v_;
  std::vector<int32_t> pos_;
};

class KVCache : public CacheView {
 public:
  KVCache(int n_layers, int kv_dim);
  int n_layers() const override { return int(layers_.size()); }
  std::span<const int32_t> positions(int l) const override {
    return {layers_[size_t(l)].positions(), size_t(layers_[size_t(l)].size())};
  }
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

 private:
  KVCache(const KVCache&) = default;
  KVCache& operator=(const KVCache&) = default;
  std::vector<KVLayer> layers_;
};

}  // namespace pkv
