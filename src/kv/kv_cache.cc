#include "kv/kv_cache.h"

#include <algorithm>
#include <cstring>

#include "core/error.h"
#include "ops/kv_merge.h"

namespace pkv {

KVLayer::KVLayer(int kv_dim, int n_kv_heads) : kv_dim_(kv_dim), n_kv_heads_(n_kv_heads) {
  PKV_ASSERT(n_kv_heads >= 1 && kv_dim % n_kv_heads == 0);
}

int KVLayer::size() const {
  if (!per_head_) return int(pos_.size());
  size_t n = 0;
  for (const Head& h : heads_) n = std::max(n, h.pos.size());
  return int(n);
}

int KVLayer::total_entries() const {
  if (!per_head_) return int(pos_.size()) * n_kv_heads_;
  size_t n = 0;
  for (const Head& h : heads_) n += h.pos.size();
  return int(n);
}

const float* KVLayer::keys() const {
  PKV_ASSERT_MSG(!per_head_, "a per-head layer has no shared keys");
  return k_.data();
}
const float* KVLayer::values() const {
  PKV_ASSERT_MSG(!per_head_, "a per-head layer has no shared values");
  return v_.data();
}
const int32_t* KVLayer::positions() const {
  PKV_ASSERT_MSG(!per_head_, "a per-head layer has no shared positions");
  return pos_.data();
}
float* KVLayer::mutable_keys() {
  PKV_ASSERT(!per_head_);
  return k_.data();
}
float* KVLayer::mutable_values() {
  PKV_ASSERT(!per_head_);
  return v_.data();
}

void KVLayer::reserve(int entries) {
  if (per_head_) {
    const size_t hd = size_t(head_dim());
    for (Head& h : heads_) {
      h.k.reserve(size_t(entries) * hd);
      h.v.reserve(size_t(entries) * hd);
      h.pos.reserve(size_t(entries));
    }
    return;
  }
  k_.reserve(size_t(entries) * kv_dim_);
  v_.reserve(size_t(entries) * kv_dim_);
  pos_.reserve(size_t(entries));
}

void KVLayer::append(const float* k, const float* v, const int32_t* positions, int n) {
  if (per_head_) {
    const size_t hd = size_t(head_dim());
    for (size_t g = 0; g < heads_.size(); ++g) {
      Head& h = heads_[g];
      for (int i = 0; i < n; ++i) {
        PKV_ASSERT_MSG((h.pos.empty() && i == 0) || positions[i] > (i ? positions[i - 1] : h.pos.back()),
                       "KV positions must increase");
        const float* kr = k + size_t(i) * kv_dim_ + g * hd;
        const float* vr = v + size_t(i) * kv_dim_ + g * hd;
        h.k.insert(h.k.end(), kr, kr + hd);
        h.v.insert(h.v.end(), vr, vr + hd);
      }
      h.pos.insert(h.pos.end(), positions, positions + n);
    }
    return;
  }
  for (int i = 0; i < n; ++i)
    PKV_ASSERT_MSG((pos_.empty() && i == 0) || positions[i] > (i ? positions[i - 1] : pos_.back()),
                   "KV positions must increase");
  k_.insert(k_.end(), k, k + size_t(n) * kv_dim_);
  v_.insert(v_.end(), v, v + size_t(n) * kv_dim_);
  pos_.insert(pos_.end(), positions, positions + n);
}

namespace {

// Keeps rows keep[i] of k, v ([*, d]) and pos, in order; gives memory back when they shrank a lot.
void retain_rows(std::vector<float>& k, std::vector<float>& v, std::vector<int32_t>& pos, size_t d,
                 std::span<const int32_t> keep) {
  for (size_t i = 0; i < keep.size(); ++i) {
    PKV_ASSERT(keep[i] >= 0 && size_t(keep[i]) < pos.size());
    PKV_ASSERT(i == 0 || keep[i] > keep[i - 1]);
    const size_t src = size_t(keep[i]);
    if (src != i) {
      std::memmove(&k[i * d], &k[src * d], d * sizeof(float));
      std::memmove(&v[i * d], &v[src * d], d * sizeof(float));
      pos[i] = pos[src];
    }
  }
  const size_t n = keep.size();
  const size_t old_cap = k.capacity();
  k.resize(n * d);
  v.resize(n * d);
  pos.resize(n);
  // Give memory back when the storage shrank a lot (the point of eviction).
  if (k.size() * 2 < old_cap) {
    k.shrink_to_fit();
    v.shrink_to_fit();
    pos.shrink_to_fit();
  }
}

// The merge rule of ops/kv_merge.h on rows [*, d] at column offset `col` of rows `stride` wide: each
// kept row becomes the mean of its group (sums in double).
void merge_rows(float* k, float* v, size_t stride, size_t col, size_t d, const std::vector<int32_t>& keep, int size) {
  std::vector<double> ksum(d), vsum(d);
  const int n_keep = int(keep.size());
  for (int m = 0; m < n_keep; ++m) {
    const int lo = ops::merge_group_lo(keep.data(), m);
    const int hi = ops::merge_group_hi(keep.data(), m, n_keep, size);
    std::fill(ksum.begin(), ksum.end(), 0.0);
    std::fill(vsum.begin(), vsum.end(), 0.0);
    for (int i = lo; i <= hi; ++i)
      for (size_t x = 0; x < d; ++x)
        ksum[x] += k[size_t(i) * stride + col + x], vsum[x] += v[size_t(i) * stride + col + x];
    const double count = hi - lo + 1;
    float* kr = &k[size_t(keep[size_t(m)]) * stride + col];
    float* vr = &v[size_t(keep[size_t(m)]) * stride + col];
    for (size_t x = 0; x < d; ++x) kr[x] = float(ksum[x] / count), vr[x] = float(vsum[x] / count);
  }
}

}  // namespace

void KVLayer::retain(std::span<const int32_t> keep) {
  PKV_ASSERT_MSG(!per_head_, "a per-head layer takes per-head keep lists");
  retain_rows(k_, v_, pos_, size_t(kv_dim_), keep);
}

void KVLayer::split_heads() {
  const size_t hd = size_t(head_dim()), n = pos_.size();
  heads_.assign(size_t(n_kv_heads_), Head{});
  for (size_t g = 0; g < heads_.size(); ++g) {
    Head& h = heads_[g];
    h.k.resize(n * hd);
    h.v.resize(n * hd);
    for (size_t i = 0; i < n; ++i) {
      std::memcpy(&h.k[i * hd], &k_[i * size_t(kv_dim_) + g * hd], hd * sizeof(float));
      std::memcpy(&h.v[i * hd], &v_[i * size_t(kv_dim_) + g * hd], hd * sizeof(float));
    }
    h.pos = pos_;
  }
  // Release the shared storage (assigning {} would keep the capacity).
  std::vector<float>().swap(k_);
  std::vector<float>().swap(v_);
  std::vector<int32_t>().swap(pos_);
  per_head_ = true;
}

void KVLayer::apply(const LayerKeep& plan) {
  PKV_ASSERT(plan.before == (per_head_ ? total_entries() : size()));  // what CacheView::held counts
  if (plan.head_keep.empty()) {
    PKV_ASSERT(!per_head_);
    if (plan.merge) merge_rows(k_.data(), v_.data(), size_t(kv_dim_), 0, size_t(kv_dim_), plan.keep, size());
    retain(plan.keep);
    return;
  }
  PKV_ASSERT(int(plan.head_keep.size()) == n_kv_heads_);
  if (!per_head_) split_heads();
  const size_t hd = size_t(head_dim());
  for (size_t g = 0; g < heads_.size(); ++g) {
    Head& h = heads_[g];
    if (plan.merge) merge_rows(h.k.data(), h.v.data(), hd, 0, hd, plan.head_keep[g], int(h.pos.size()));
    retain_rows(h.k, h.v, h.pos, hd, plan.head_keep[g]);
  }
}

void KVLayer::clear() {
  k_.clear();
  v_.clear();
  pos_.clear();
  heads_.clear();
  per_head_ = false;
}

size_t KVLayer::bytes() const { return size_t(total_entries()) * 2 * size_t(head_dim()) * sizeof(float); }

std::vector<size_t> KVLayer::bytes_per_head() const {
  std::vector<size_t> b(static_cast<size_t>(n_kv_heads_));
  for (int h = 0; h < n_kv_heads_; ++h) b[size_t(h)] = size_t(size(h)) * 2 * size_t(head_dim()) * sizeof(float);
  return b;
}

size_t KVLayer::capacity_bytes() const {
  size_t c = (k_.capacity() + v_.capacity()) * sizeof(float);
  for (const Head& h : heads_) c += (h.k.capacity() + h.v.capacity()) * sizeof(float);
  return c;
}

KVCache::KVCache(int n_layers, int kv_dim, int n_kv_heads) {
  layers_.reserve(size_t(n_layers));
  for (int i = 0; i < n_layers; ++i) layers_.emplace_back(kv_dim, n_kv_heads);
}

std::span<const int32_t> KVCache::positions(int l) const {
  const KVLayer& L = layers_[size_t(l)];
  if (L.per_head())
    fail("KV cache layer " + std::to_string(l), "its heads hold their own entries: read them per head (head_positions)");
  return {L.positions(), size_t(L.size())};
}

std::span<const int32_t> KVCache::head_positions(int l, int h) const {
  const KVLayer& L = layers_[size_t(l)];
  if (!L.per_head()) return {L.positions(), size_t(L.size())};
  return {L.head_positions(h), size_t(L.size(h))};
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

std::vector<std::vector<size_t>> KVCache::bytes_per_head() const {
  std::vector<std::vector<size_t>> b;
  for (auto& l : layers_) b.push_back(l.bytes_per_head());
  return b;
}

}  // namespace pkv
