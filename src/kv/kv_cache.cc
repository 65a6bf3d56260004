#include "kv/kv_cache.h"

#include <algorithm>
#include <cstring>

#include "core/error.h"
#include "ops/kv_merge.h"

namespace pkv {

void KVLayer::reserve(int entries) {
  k_.reserve(size_t(entries) * kv_dim_);
  v_.reserve(size_t(entries) * kv_dim_);
  pos_.reserve(size_t(entries));
}

void KVLayer::append(const float* k, const float* v, const int32_t* positions, int n) {
  for (int i = 0; i < n; ++i)
    PKV_ASSERT_MSG((pos_.empty() && i == 0) || positions[i] > (i ? positions[i - 1] : pos_.back()),
                   "KV positions must increase");
  k_.insert(k_.end(), k, k + size_t(n) * kv_dim_);
  v_.insert(v_.end(), v, v + size_t(n) * kv_dim_);
  pos_.insert(pos_.end(), positions, positions + n);
}

void KVLayer::retain(std::span<const int32_t> keep) {
  const size_t d = size_t(kv_dim_);
  for (size_t i = 0; i < keep.size(); ++i) {
    PKV_ASSERT(keep[i] >= 0 && keep[i] < size());
    PKV_ASSERT(i == 0 || keep[i] > keep[i - 1]);
    const size_t src = size_t(keep[i]);
    if (src != i) {
      std::memmove(&k_[i * d], &k_[src * d], d * sizeof(float));
      std::memmove(&v_[i * d], &v_[src * d], d * sizeof(float));
      pos_[i] = pos_[src];
    }
  }
  const size_t n = keep.size();
  const size_t old_cap = k_.capacity();
  k_.resize(n * d);
  v_.resize(n * d);
  pos_.resize(n);
  // Give memory back when the layer shrank a lot (the point of eviction).
  if (k_.size() * 2 < old_cap) {
    k_.shrink_to_fit();
    v_.shrink_to_fit();
    pos_.shrink_to_fit();
  }
}

void KVLayer::apply(const LayerKeep& plan) {
  PKV_ASSERT(plan.before == size());
  if (plan.merge) {
    const size_t d = size_t(kv_dim_);
    const int n_keep = int(plan.keep.size());
    std::vector<double> ksum(d), vsum(d);
    for (int m = 0; m < n_keep; ++m) {
      const int lo = ops::merge_group_lo(plan.keep.data(), m);
      const int hi = ops::merge_group_hi(plan.keep.data(), m, n_keep, size());
      std::fill(ksum.begin(), ksum.end(), 0.0);
      std::fill(vsum.begin(), vsum.end(), 0.0);
      for (int i = lo; i <= hi; ++i)
        for (size_t x = 0; x < d; ++x) ksum[x] += k_[size_t(i) * d + x], vsum[x] += v_[size_t(i) * d + x];
      const double count = hi - lo + 1;
      float* k = &k_[size_t(plan.keep[size_t(m)]) * d];
      float* v = &v_[size_t(plan.keep[size_t(m)]) * d];
      for (size_t x = 0; x < d; ++x) k[x] = float(ksum[x] / count), v[x] = float(vsum[x] / count);
    }
  }
  retain(plan.keep);
}

void KVLayer::clear() {
  k_.clear();
  v_.clear();
  pos_.clear();
}

size_t KVLayer::bytes() const { return pos_.size() * 2 * size_t(kv_dim_) * sizeof(float); }
size_t KVLayer::capacity_bytes() const { return (k_.capacity() + v_.capacity()) * sizeof(float); }

KVCache::KVCache(int n_layers, int kv_dim) {
  layers_.reserve(size_t(n_layers));
  for (int i = 0; i < n_layers; ++i) layers_.emplace_back(kv_dim);
}

void KVCache::reserve(int entries) {
  for (auto& l : layers_) l.reserve(entries);
}

void KVCache::clear() {
  for (auto& l : layers_) l.clear();
}

void KVCache::apply(const KeepPlan& plan, const std::string& who) {
  check_plan(plan, *this, who);
  for (const LayerKeep& k : plan.layers) layers_[size_t(k.layer)].apply(k);
}

size_t KVCache::bytes() const {
  size_t s = 0;
  for (auto& l : layers_) s += l.bytes();
  return s;
}

std::vector<size_t> KVCache::bytes_per_layer() const {
  std::vector<size_t> b;
  for (auto& l : layers_) b.push_back(l.bytes());
  return b;
}

}  // namespace pkv
