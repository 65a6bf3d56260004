// The per-sequence, per-layer KV cache (DESIGN.md principle 4).
//
// Each layer holds its own entries: keys (after RoPE) and values, and the absolute position of each
// entry. Layers may hold different numbers of entries; attention in layer l reads exactly the
// entries that layer l holds. Eviction policies decide which entries of a layer to keep and the
// cache applies the decision with retain(), which compacts the storage and frees the memory.
//
// Storage type (--kv-dtype, engine/make_backend.h): float32 by default, or F16 / BF16, which take
// half the memory. Keys and values are rounded to the type once, when they are written (append, and
// a merge's mean from its double sums); attention converts the stored rows back to float32 as it
// reads them (ops::AttentionArgs::kv_dtype), so it computes exactly what it would over a float32
// cache holding the rounded values.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <span>
#include <vector>

#include "core/dtype.h"
#include "kv/keep_plan.h"

namespace pkv {

// The storage types a KV cache takes by name (--kv-dtype): "f32" (also ""), "f16", "bf16". The one
// rule for every command and the Python module; anything else is an Error naming --kv-dtype.
// Its label in reports is dtype_option_name (core/dtype.h).
DType kv_dtype_from_name(const std::string& name);

// A layer starts with every KV head holding the same entries (one row of all heads' keys per entry:
// keys(), values(), positions()). A plan with one keep list per KV head (LayerKeep::head_keep) turns it
// into a per-head layer: each head then holds its own entries (head_keys(h) [size(h), head_dim],
// head_values(h), head_positions(h)) and attention in that head reads exactly those. New entries
// (decoding) go to every head. A per-head layer stays per-head (its plans must be per head).
// Rows of keys or of values in a layer's storage type: float32, or 16-bit words (F16, BF16).
class KVRows {
 public:
  explicit KVRows(DType t = DType::F32) : t_(t) {}
  DType dtype() const { return t_; }
  size_t size() const { return t_ == DType::F32 ? f_.size() : h_.size(); }  // elements
  const void* data() const { return t_ == DType::F32 ? static_cast<const void*>(f_.data()) : h_.data(); }
  const float* f32() const;  // float32 storage only (asserted)
  float* f32();
  void reserve(size_t n);
  void resize(size_t n);
  void shrink_to_fit();
  void release();  // frees the storage (clear() would keep the capacity)
  size_t capacity_bytes() const { return f_.capacity() * 4 + h_.capacity() * 2; }
  void append(const float* src, size_t n);                 // rounded to the type (from_f32)
  void append_stored(const KVRows& o, size_t off, size_t n);  // o's elements as stored (same type)
  void move(size_t dst, size_t src, size_t n);             // n elements within, as memmove
  void read(size_t off, size_t n, float* out) const;       // as float32 (exact)
  double at(size_t i) const;
  void set_rounded(size_t i, double x);                    // one rounding (round_to)

 private:
  DType t_;
  std::vector<float> f_;
  std::vector<uint16_t> h_;
};

class KVLayer {
 public:
  explicit KVLayer(int kv_dim, int n_kv_heads = 1, DType dtype = DType::F32);

  bool per_head() const { return per_head_; }
  int n_kv_heads() const { return n_kv_heads_; }
  int head_dim() const { return kv_dim_ / n_kv_heads_; }
  int kv_dim() const { return kv_dim_; }
  // Shared layers: the entries every head holds. Per-head layers: the most any head holds.
  int size() const;
  int size(int head) const { return per_head_ ? int(heads_[size_t(head)].pos.size()) : int(pos_.size()); }
  int total_entries() const;  // summed over heads (shared layers: size() * n_kv_heads)
  DType dtype() const { return dtype_; }  // the storage type of keys and values

  // Shared float32 layers only (asserted).
  const float* keys() const;    // [size, kv_dim]
  const float* values() const;  // [size, kv_dim]
  const int32_t* positions() const;  // [size], strictly increasing
  float* mutable_keys();
  float* mutable_values();
  // Per-head layers only (asserted): head h's own entries (head_keys, head_values: float32 layers).
  const float* head_keys(int h) const { return heads_[size_t(h)].k.f32(); }      // [size(h), head_dim]
  const float* head_values(int h) const { return heads_[size_t(h)].v.f32(); }    // [size(h), head_dim]
  const int32_t* head_positions(int h) const { return heads_[size_t(h)].pos.data(); }
  // Any storage type: the rows as stored (float32 or 16-bit words; shared: [size, kv_dim], per
  // head: [size(h), head_dim]).
  const void* key_data() const;
  const void* value_data() const;
  const void* head_key_data(int h) const { return heads_[size_t(h)].k.data(); }
  const void* head_value_data(int h) const { return heads_[size_t(h)].v.data(); }
  // Any storage type, as float32: the rows themselves (float32 layers) or converted into buf.
  const float* keys_f32(std::vector<float>& buf) const;
  const float* values_f32(std::vector<float>& buf) const;
  const float* head_keys_f32(int h, std::vector<float>& buf) const;
  const float* head_values_f32(int h, std::vector<float>& buf) const;

  void reserve(int entries);
  // Appends n entries to every head; k, v: [n, kv_dim]; positions must be larger than every held
  // position.
  void append(const float* k, const float* v, const int32_t* positions, int n);
  // Keeps the entries at the given indices (strictly increasing, within [0, size)), in order,
  // and releases the storage of the others. Shared layers only.
  void retain(std::span<const int32_t> keep);
  // Applies a policy's plan for this layer: with plan.merge, each kept entry's key and value first
  // become the mean over its nearest-kept group (ops/kv_merge.h; sums in double, the mean rounded
  // once to the storage type), per head for a per-head plan; then the retain. The plan must have
  // passed check_plan.
  void apply(const LayerKeep& plan);
  void clear();

  size_t bytes() const;  // bytes of the entries held: total_entries * 2 * head_dim * dtype_size(dtype)
  std::vector<size_t> bytes_per_head() const;
  size_t capacity_bytes() const;

 private:
  struct Head {
    KVRows k, v;  // [entries, head_dim]
    std::vector<int32_t> pos;
  };
  void split_heads();  // shared -> per-head, every head keeping every entry
  int kv_dim_, n_kv_heads_;
  DType dtype_;
  bool per_head_ = false;
  KVRows k_, v_;  // shared: [size, kv_dim]
  std::vector<int32_t> pos_;
  std::vector<Head> heads_;   // per-head: [n_kv_heads]
};

class KVCache : public CacheView {
 public:
  KVCache(int n_layers, int kv_dim, int n_kv_heads = 1, DType dtype = DType::F32);
  DType dtype() const { return dtype_; }
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
  DType dtype_;
  std::vector<KVLayer> layers_;
};

}  // namespace pkv
