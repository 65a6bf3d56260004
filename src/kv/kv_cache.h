// The per-sequence, per-layer KV cache (DESIGN.md principle 4).
//
// Each layer holds its own entries: keys (after RoPE) and values, and the absolute position of each
// entry. Layers may hold different numbers of entries; attention in layer l reads exactly the
// entries that layer l holds. Eviction policies decide which entries of a layer to keep and the
// cache applies the decision with retain(), which compacts the storage and frees the memory.
#pragma once
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

namespace pkv {

class KVLayer {
 public:
  KVLayer(int kv_dim) : kv_dim_(kv_dim) {}

  int size() const { return int(pos_.size()); }
  int kv_dim() const { return kv_dim_; }
  const float* keys() const { return k_.data(); }    // [size, kv_dim]
  const float* values() const { return v_.data(); }  // [size, kv_dim]
  const int32_t* positions() const { return pos_.data(); }  // [size], strictly increasing
  float* mutable_keys() {
    ++edits_;
    return k_.data();
  }
  float* mutable_values() {
    ++edits_;
    return v_.data();
  }
  // Counts the calls that may have changed the layer (append, retain, clear, mutable_keys/values):
  // unchanged means untouched (the GPU mirror skips such layers; src/kv/kv_mirror.h).
  uint64_t edits() const { return edits_; }

  void reserve(int entries);
  // Appends n entries; k, v: [n, kv_dim]; positions must be larger than every held position.
  void append(const float* k, const float* v, const int32_t* positions, int n);
  // Keeps the entries at the given indices (strictly increasing, within [0, size)), in order,
  // and releases the storage of the others.
  void retain(std::span<const int32_t> keep);
  void clear();

  size_t bytes() const;     // bytes of the entries held: size * 2 * kv_dim * sizeof(float)
  size_t capacity_bytes() const;

 private:
  int kv_dim_;
  std::vector<float> k_, v_;
  std::vector<int32_t> pos_;
  uint64_t edits_ = 0;
};

class KVCache {
 public:
  KVCache(int n_layers, int kv_dim);
  int n_layers() const { return int(layers_.size()); }
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
