#include "kv/kv_mirror.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"

namespace pkv {

std::vector<int32_t> kept_indices(std::span<const int32_t> before, std::span<const int32_t> after) {
  std::vector<int32_t> keep;
  keep.reserve(after.size());
  size_t i = 0;
  for (size_t m = 0; m < after.size(); ++m) {
    while (i < before.size() && before[i] != after[m]) ++i;
    if (i == before.size())
      fail("KV policy", "kept position " + std::to_string(after[m]) +
                            " that the layer did not hold before (or out of order): a policy may only remove entries");
    keep.push_back(int32_t(i++));
  }
  return keep;
}

std::vector<IndexRange> nearest_groups(std::span<const int32_t> keep, int n) {
  std::vector<IndexRange> g(keep.size());
  const int k = int(keep.size());
  for (int m = 0; m < k; ++m) {
    PKV_ASSERT(keep[size_t(m)] >= 0 && keep[size_t(m)] < n && (m == 0 || keep[size_t(m)] > keep[size_t(m - 1)]));
    // Entry i goes to kept m iff it is nearer to keep[m] than to keep[m-1] (ties: the earlier) and
    // not nearer to keep[m+1]: the same bounds as paged_merge in paged_body.h.
    g[size_t(m)].lo = m == 0 ? 0 : (keep[size_t(m - 1)] + keep[size_t(m)]) / 2 + 1;
    g[size_t(m)].hi = m == k - 1 ? n - 1 : (keep[size_t(m)] + keep[size_t(m + 1)]) / 2;
  }
  return g;
}

KVMirror::KVMirror(int n_layers)
    : cache_(n_layers, 1), shadow_(size_t(n_layers)), marked_(size_t(n_layers), 0), stamped_edits_(size_t(n_layers), 0) {}

void KVMirror::append_all(const int32_t* pos, int n) {
  const std::vector<float> zeros(static_cast<size_t>(n), 0.f);
  for (int l = 0; l < cache_.n_layers(); ++l) {
    cache_.layer(l).append(zeros.data(), zeros.data(), pos, n);
    shadow_[size_t(l)].insert(shadow_[size_t(l)].end(), pos, pos + n);
  }
}

void KVMirror::before_policy() {
  for (int l = 0; l < cache_.n_layers(); ++l) {
    KVLayer& L = cache_.layer(l);
    PKV_ASSERT_MSG(L.size() < (1 << 24), "more entries than float markers can number exactly");
    PKV_ASSERT_MSG(int(shadow_[size_t(l)].size()) == L.size(), "KVMirror: the layer changed outside a policy call");
    int& from = marked_[size_t(l)];
    if (from < L.size()) {  // stamp the entries whose markers are not their index yet
      float* k = L.mutable_keys();
      float* v = L.mutable_values();
      for (int i = from; i < L.size(); ++i) k[i] = float(i), v[i] = float(i % 2);
      from = L.size();
    }
    stamped_edits_[size_t(l)] = L.edits();
  }
  armed_ = true;
}

std::vector<LayerEdit> KVMirror::after_policy(const std::string& who) {
  PKV_ASSERT_MSG(armed_, "KVMirror::after_policy without before_policy");
  armed_ = false;
  std::vector<LayerEdit> edits;
  for (int l = 0; l < cache_.n_layers(); ++l) {
    const KVLayer& L = cache_.layer(l);
    if (L.edits() == stamped_edits_[size_t(l)]) continue;  // untouched
    std::vector<int32_t>& before = shadow_[size_t(l)];
    LayerEdit e;
    e.layer = l;
    e.before = int(before.size());
    try {
      e.keep = kept_indices(before, std::span<const int32_t>(L.positions(), size_t(L.size())));
    } catch (const Error& err) {
      fail("KV policy " + who, "layer " + std::to_string(l) + ": " + err.what());
    }
    const float* k = L.keys();
    const float* v = L.values();
    bool rewritten = false;
    for (size_t m = 0; m < e.keep.size(); ++m)
      if (k[m] != float(e.keep[m]) || v[m] != float(e.keep[m] % 2)) rewritten = true;
    if (rewritten) {
      // Only the nearest-kept merge is reproducible on the device: check every kept row against it.
      const std::vector<IndexRange> g = nearest_groups(e.keep, e.before);
      for (size_t m = 0; m < e.keep.size(); ++m) {
        const int lo = g[m].lo, hi = g[m].hi, cnt = hi - lo + 1;
        int odd = 0;
        for (int i = lo; i <= hi; ++i) odd += i % 2;
        const float want_k = float((double(lo) + double(hi)) / 2.0);
        const double want_v = double(odd) / cnt;
        if (k[m] != want_k || std::fabs(double(v[m]) - want_v) > 1e-6)
          fail("KV policy " + who,
               "layer " + std::to_string(l) + ": changed the keys/values of kept entry " + std::to_string(e.keep[m]) +
                   " otherwise than by the mean over its nearest-kept group (entries " + std::to_string(lo) + ".." +
                   std::to_string(hi) + "); the GPU cache can only reproduce that merge (paged_kv_merge)");
      }
      e.merge = true;
    }
    // The device now holds `keep`: entries before the first moved (or merged) one keep their markers.
    int first = e.merge ? 0 : int(e.keep.size());
    for (size_t m = 0; m < e.keep.size() && first == int(e.keep.size()); ++m)
      if (e.keep[m] != int32_t(m)) first = int(m);
    marked_[size_t(l)] = std::min(marked_[size_t(l)], first);
    before.assign(L.positions(), L.positions() + L.size());
    if (e.merge || int(e.keep.size()) < e.before) edits.push_back(std::move(e));
  }
  return edits;
}

}  // namespace pkv
