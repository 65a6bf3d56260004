#include "kv/kv_cache.h"

#include <algorithm>
#include <cstring>

#include "core/error.h"
#include "ops/kv_merge.h"

namespace pkv {

DType kv_dtype_from_name(const std::string& name) {
  DType t = DType::F32;
  if (!name.empty() && !dtype_from_option(name, t)) fail("--kv-dtype", "must be f32, f16 or bf16, got '" + name + "'");
  return t;
}

const float* KVRows::f32() const {
  PKV_ASSERT_MSG(t_ == DType::F32, std::string("a KV cache stored as ") + dtype_name(t_) +
                                       " has no float32 rows: read them through keys_f32 / values_f32");
  return f_.data();
}
float* KVRows::f32() {
  PKV_ASSERT_MSG(t_ == DType::F32, std::string("a KV cache stored as ") + dtype_name(t_) + " has no float32 rows");
  return f_.data();
}
void KVRows::reserve(size_t n) { t_ == DType::F32 ? f_.reserve(n) : h_.reserve(n); }
void KVRows::resize(size_t n) { t_ == DType::F32 ? f_.resize(n) : h_.resize(n); }
void KVRows::shrink_to_fit() { t_ == DType::F32 ? f_.shrink_to_fit() : h_.shrink_to_fit(); }
void KVRows::release() {
  std::vector<float>().swap(f_);
  std::vector<uint16_t>().swap(h_);
}

void KVRows::append(const float* src, size_t n) {
  if (t_ == DType::F32) {
    f_.insert(f_.end(), src, src + n);
    return;
  }
  const size_t at = h_.size();
  h_.resize(at + n);
  from_f32(t_, src, h_.data() + at, n);
}

void KVRows::append_stored(const KVRows& o, size_t off, size_t n) {
  PKV_ASSERT(o.t_ == t_ && off + n <= o.size());
  if (t_ == DType::F32) f_.insert(f_.end(), o.f_.begin() + ptrdiff_t(off), o.f_.begin() + ptrdiff_t(off + n));
  else h_.insert(h_.end(), o.h_.begin() + ptrdiff_t(off), o.h_.begin() + ptrdiff_t(off + n));
}

void KVRows::move(size_t dst, size_t src, size_t n) {
  if (t_ == DType::F32) std::memmove(&f_[dst], &f_[src], n * sizeof(float));
  else std::memmove(&h_[dst], &h_[src], n * sizeof(uint16_t));
}

void KVRows::read(size_t off, size_t n, float* out) const {
  PKV_ASSERT(off + n <= size());
  to_f32(t_, static_cast<const char*>(data()) + off * dtype_size(t_), out, n);
}

double KVRows::at(size_t i) const {
  switch (t_) {
    case DType::F32: return f_[i];
    case DType::F16: return f16_to_f32(h_[i]);
    case DType::BF16: return bf16_to_f32(h_[i]);
  }
  return 0;
}

void KVRows::set_rounded(size_t i, double x) {
  switch (t_) {
    case DType::F32: f_[i] = float(x); return;
    case DType::F16: h_[i] = f32_to_f16(round_to(DType::F16, x)); return;   // exact: already a half
    case DType::BF16: h_[i] = f32_to_bf16(round_to(DType::BF16, x)); return;
  }
}

KVLayer::KVLayer(int kv_dim, int n_kv_heads, DType dtype)
    : kv_dim_(kv_dim), n_kv_heads_(n_kv_heads), dtype_(dtype), k_(dtype), v_(dtype) {
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
  return k_.f32();
}
const float* KVLayer::values() const {
  PKV_ASSERT_MSG(!per_head_, "a per-head layer has no shared values");
  return v_.f32();
}
const int32_t* KVLayer::positions() const {
  PKV_ASSERT_MSG(!per_head_, "a per-head layer has no shared positions");
  return pos_.data();
}
float* KVLayer::mutable_keys() {
  PKV_ASSERT(!per_head_);
  return k_.f32();
}
float* KVLayer::mutable_values() {
  PKV_ASSERT(!per_head_);
  return v_.f32();
}
const void* KVLayer::key_data() const {
  PKV_ASSERT_MSG(!per_head_, "a per-head layer has no shared keys");
  return k_.data();
}
const void* KVLayer::value_data() const {
  PKV_ASSERT_MSG(!per_head_, "a per-head layer has no shared values");
  return v_.data();
}

namespace {
const float* rows_f32(const KVRows& r, std::vector<float>& buf) {
  if (r.dtype() == DType::F32) return r.f32();
  buf.resize(r.size());
  r.read(0, r.size(), buf.data());
  return buf.data();
}
}  // namespace

const float* KVLayer::keys_f32(std::vector<float>& buf) const {
  PKV_ASSERT_MSG(!per_head_, "a per-head layer has no shared keys");
  return rows_f32(k_, buf);
}
const float* KVLayer::values_f32(std::vector<float>& buf) const {
  PKV_ASSERT_MSG(!per_head_, "a per-head layer has no shared values");
  return rows_f32(v_, buf);
}
const float* KVLayer::head_keys_f32(int h, std::vector<float>& buf) const {
  PKV_ASSERT(per_head_);
  return rows_f32(heads_[size_t(h)].k, buf);
}
const float* KVLayer::head_values_f32(int h, std::vector<float>& buf) const {
  PKV_ASSERT(per_head_);
  return rows_f32(heads_[size_t(h)].v, buf);
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
        h.k.append(k + size_t(i) * kv_dim_ + g * hd, hd);
        h.v.append(v + size_t(i) * kv_dim_ + g * hd, hd);
      }
      h.pos.insert(h.pos.end(), positions, positions + n);
    }
    return;
  }
  for (int i = 0; i < n; ++i)
    PKV_ASSERT_MSG((pos_.empty() && i == 0) || positions[i] > (i ? positions[i - 1] : pos_.back()),
                   "KV positions must increase");
  k_.append(k, size_t(n) * kv_dim_);
  v_.append(v, size_t(n) * kv_dim_);
  pos_.insert(pos_.end(), positions, positions + n);
}

namespace {

// Keeps rows keep[i] of k, v ([*, d]) and pos, in order; gives memory back when they shrank a lot.
void retain_rows(KVRows& k, KVRows& v, std::vector<int32_t>& pos, size_t d, std::span<const int32_t> keep) {
  for (size_t i = 0; i < keep.size(); ++i) {
    PKV_ASSERT(keep[i] >= 0 && size_t(keep[i]) < pos.size());
    PKV_ASSERT(i == 0 || keep[i] > keep[i - 1]);
    const size_t src = size_t(keep[i]);
    if (src != i) {
      k.move(i * d, src * d, d);
      v.move(i * d, src * d, d);
      pos[i] = pos[src];
    }
  }
  const size_t n = keep.size();
  const size_t old_cap = k.capacity_bytes();
  k.resize(n * d);
  v.resize(n * d);
  pos.resize(n);
  // Give memory back when the storage shrank a lot (the point of eviction).
  if (n * d * dtype_size(k.dtype()) * 2 < old_cap) {
    k.shrink_to_fit();
    v.shrink_to_fit();
    pos.shrink_to_fit();
  }
}

// The merge rule of ops/kv_merge.h on rows [*, d] at column offset `col` of rows `stride` wide: each
// kept row becomes the mean of its group (the stored values summed in double, the mean rounded once
// to the storage type).
void merge_rows(KVRows& k, KVRows& v, size_t stride, size_t col, size_t d, const std::vector<int32_t>& keep, int size) {
  std::vector<double> ksum(d), vsum(d);
  const int n_keep = int(keep.size());
  for (int m = 0; m < n_keep; ++m) {
    const int lo = ops::merge_group_lo(keep.data(), m);
    const int hi = ops::merge_group_hi(keep.data(), m, n_keep, size);
    std::fill(ksum.begin(), ksum.end(), 0.0);
    std::fill(vsum.begin(), vsum.end(), 0.0);
    for (int i = lo; i <= hi; ++i)
      for (size_t x = 0; x < d; ++x)
        ksum[x] += k.at(size_t(i) * stride + col + x), vsum[x] += v.at(size_t(i) * stride + col + x);
    const double count = hi - lo + 1;
    const size_t row = size_t(keep[size_t(m)]) * stride + col;
    for (size_t x = 0; x < d; ++x) k.set_rounded(row + x, ksum[x] / count), v.set_rounded(row + x, vsum[x] / count);
  }
}

}  // namespace

void KVLayer::retain(std::span<const int32_t> keep) {
  PKV_ASSERT_MSG(!per_head_, "a per-head layer takes per-head keep lists");
  retain_rows(k_, v_, pos_, size_t(kv_dim_), keep);
}

void KVLayer::split_heads() {
  const size_t hd = size_t(head_dim()), n = pos_.size();
  heads_.assign(size_t(n_kv_heads_), Head{KVRows(dtype_), KVRows(dtype_), {}});
  for (size_t g = 0; g < heads_.size(); ++g) {
    Head& h = heads_[g];
    h.k.reserve(n * hd);
    h.v.reserve(n * hd);
    for (size_t i = 0; i < n; ++i) {
      h.k.append_stored(k_, i * size_t(kv_dim_) + g * hd, hd);
      h.v.append_stored(v_, i * size_t(kv_dim_) + g * hd, hd);
    }
    h.pos = pos_;
  }
  // Release the shared storage (assigning {} would keep the capacity).
  k_.release();
  v_.release();
  std::vector<int32_t>().swap(pos_);
  per_head_ = true;
}

void KVLayer::apply(const LayerKeep& plan) {
  PKV_ASSERT(plan.before == (per_head_ ? total_entries() : size()));  // what CacheView::held counts
  if (plan.head_keep.empty()) {
    PKV_ASSERT(!per_head_);
    if (plan.merge) merge_rows(k_, v_, size_t(kv_dim_), 0, size_t(kv_dim_), plan.keep, size());
    retain(plan.keep);
    return;
  }
  PKV_ASSERT(int(plan.head_keep.size()) == n_kv_heads_);
  if (!per_head_) split_heads();
  const size_t hd = size_t(head_dim());
  for (size_t g = 0; g < heads_.size(); ++g) {
    Head& h = heads_[g];
    if (plan.merge) merge_rows(h.k, h.v, hd, 0, hd, plan.head_keep[g], int(h.pos.size()));
    retain_rows(h.k, h.v, h.pos, hd, plan.head_keep[g]);
  }
}

void KVLayer::clear() {
  k_.resize(0);
  v_.resize(0);
  pos_.clear();
  heads_.clear();
  per_head_ = false;
}

size_t KVLayer::bytes() const { return size_t(total_entries()) * 2 * size_t(head_dim()) * dtype_size(dtype_); }

std::vector<size_t> KVLayer::bytes_per_head() const {
  std::vector<size_t> b(static_cast<size_t>(n_kv_heads_));
  for (int h = 0; h < n_kv_heads_; ++h) b[size_t(h)] = size_t(size(h)) * 2 * size_t(head_dim()) * dtype_size(dtype_);
  return b;
}

size_t KVLayer::capacity_bytes() const {
  size_t c = k_.capacity_bytes() + v_.capacity_bytes();
  for (const Head& h : heads_) c += h.k.capacity_bytes() + h.v.capacity_bytes();
  return c;
}

KVCache::KVCache(int n_layers, int kv_dim, int n_kv_heads, DType dtype) : dtype_(dtype) {
  layers_.reserve(size_t(n_layers));
  for (int i = 0; i < n_layers; ++i) layers_.emplace_back(kv_dim, n_kv_heads, dtype);
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
