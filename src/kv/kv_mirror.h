// Running the CPU KV policies (src/kv, unchanged) on the paged GPU cache (pure C++, built always).
//
// A policy works on a pkv::KVCache through KVLayer::retain, and Elastic also rewrites the K/V rows
// of the kept entries (the mean over each kept entry's group) before retaining. The GPU session
// keeps, per sequence, a KVMirror: a KVCache whose layers hold the same entries (same positions) as
// the paged GPU layers, with K/V rows of ONE float each that are not the model's keys but markers:
//   before every policy call, entry i's K := i and V := i % 2.
// After the call the mirror tells exactly what the policy did to each layer:
//   - which entries it kept: the positions left are a subsequence of those before (kept_indices);
//   - whether it merged: a kept entry whose group of absorbed entries is a contiguous index range
//     [lo, hi] of two or more entries ends with K = (lo + hi) / 2 and V = the mean of the parities,
//     strictly between 0 and 1; a kept entry left alone keeps K = its index and V in {0, 1}. The
//     markers are checked against the nearest-kept groups that paged_kv_merge uses (nearest_groups),
//     so "merge" is recognised from what the policy did, not from its name, and any other rewrite
//     of the rows is refused with an Error instead of being silently ignored.
// The LayerEdits are then applied on the device (paged_kv_merge, paged_kv_compact, BlockPool::resize).
#pragma once
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "kv/kv_cache.h"

namespace pkv {

// What a policy did to one layer of one sequence.
struct LayerEdit {
  int layer = 0;
  int before = 0;               // entries before the policy call
  std::vector<int32_t> keep;    // kept entry indices (into the layer before), strictly increasing
  bool merge = false;           // kept entries' K/V become their nearest-kept group's mean (Elastic)
};

// The indices in `before` of the positions `after` (both strictly increasing). Throws Error when
// `after` is not a subsequence of `before` (a policy may only remove entries).
std::vector<int32_t> kept_indices(std::span<const int32_t> before, std::span<const int32_t> after);

// Each kept entry's group: entry i < n belongs to its nearest kept entry by index, ties to the
// earlier one (the elastic policy's rule and paged_kv_merge's). keep must be strictly increasing
// and non-empty when n > 0.
struct IndexRange {
  int32_t lo = 0, hi = -1;  // inclusive
};
std::vector<IndexRange> nearest_groups(std::span<const int32_t> keep, int n);

// A sequence's entries per layer (positions), and the markers described above.
class KVMirror {
 public:
  explicit KVMirror(int n_layers);

  KVCache& cache() { return cache_; }
  const KVCache& cache() const { return cache_; }
  int n_layers() const { return cache_.n_layers(); }

  // Appends n entries with positions pos[n] to every layer.
  void append_all(const int32_t* pos, int n);

  // Call right before the policy: stamps the markers and remembers the positions.
  void before_policy();
  // Call right after: the layers the policy changed (in layer order). `who` names the policy in
  // errors. Throws Error when the policy did something the paged cache cannot reproduce.
  std::vector<LayerEdit> after_policy(const std::string& who);

 private:
  // Per layer, kept up to date incrementally so that a decode step costs O(changed entries), not
  // O(entries held): the positions as the device holds them, how many leading entries carry valid
  // markers, and the layer's edit count right after stamping (unchanged after the policy = the
  // policy left the layer alone).
  KVCache cache_;
  std::vector<std::vector<int32_t>> shadow_;
  std::vector<int> marked_;
  std::vector<uint64_t> stamped_edits_;
  bool armed_ = false;
};

}  // namespace pkv
