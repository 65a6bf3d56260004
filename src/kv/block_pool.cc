#include "kv/block_pool.h"

#include <algorithm>
#include <numeric>
#include <cstdio>

#include "core/error.h"

namespace pkv {

namespace {
constexpr const char* kWhere = "KV block pool";

std::string mib(size_t bytes) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.1f MiB", double(bytes) / (1024.0 * 1024.0));
  return buf;
}
}  // namespace

size_t paged_block_bytes(int block_size, int kv_dim, size_t element_bytes) {
  return size_t(block_size) * (2 * size_t(kv_dim) * element_bytes + sizeof(int32_t));
}

std::string BlockPoolStats::to_string() const {
  char buf[256];
  std::snprintf(buf, sizeof buf, "KV blocks: %d of %d used (peak %d), %d free; %s of %s; %d sequences, %lld entries",
                used_blocks, total_blocks, peak_used_blocks, free_blocks, mib(used_bytes).c_str(),
                mib(total_bytes).c_str(), sequences, static_cast<long long>(entries));
  std::string out = buf;
  if (split_blocks > 0)
    out += "; " + std::to_string(split_blocks) + " blocks split into " + std::to_string(sub_blocks_used) +
           " head sub-blocks (" + std::to_string(sub_blocks_free) + " parts free)";
  return out;
}

BlockPool::BlockPool(int n_blocks, int block_size, int n_layers, size_t bytes_per_block, int max_blocks_per_table,
                     int n_kv_heads)
    : block_size_(block_size), n_layers_(n_layers), max_blocks_per_table_(max_blocks_per_table),
      n_kv_heads_(n_kv_heads), bytes_per_block_(bytes_per_block) {
  if (n_kv_heads < 1) fail(kWhere, "the number of KV heads must be >= 1, got " + std::to_string(n_kv_heads));
  if (n_blocks < 0) fail(kWhere, "the number of blocks must be >= 0, got " + std::to_string(n_blocks));
  if (block_size < 1) fail(kWhere, "the block size must be >= 1 entry, got " + std::to_string(block_size));
  if (n_layers < 1) fail(kWhere, "the number of layers must be >= 1, got " + std::to_string(n_layers));
  if (max_blocks_per_table < 0)
    fail(kWhere, "the block-table width must be >= 0 (0: no limit), got " + std::to_string(max_blocks_per_table));
  owner_.assign(size_t(n_blocks), -1);
  sub_owner_.assign(size_t(n_blocks) * size_t(n_kv_heads), -1);
  sub_used_.assign(size_t(n_blocks), 0);
  free_.reserve(size_t(n_blocks));
  for (int b = n_blocks - 1; b >= 0; --b) free_.push_back(b);  // pops 0, 1, 2, ...
}

BlockPool::SeqId BlockPool::add_sequence() {
  const SeqId id = next_id_++;
  Seq s;
  s.layers.resize(size_t(n_layers_));
  seqs_.emplace(id, std::move(s));
  return id;
}

void BlockPool::remove_sequence(SeqId s) {
  Seq& q = seq(s, "remove_sequence");
  for (Layer& L : q.layers) {
    apply_resize(s, L, 0);
    for (Layer& H : L.heads) apply_head_resize(s, H, 0);
  }
  seqs_.erase(s);
}

std::vector<BlockPool::SeqId> BlockPool::sequences() const {
  std::vector<SeqId> ids;
  for (const auto& [id, q] : seqs_) ids.push_back(id);
  std::sort(ids.begin(), ids.end());
  return ids;
}

BlockPool::Seq& BlockPool::seq(SeqId s, const char* op) {
  auto it = seqs_.find(s);
  if (it == seqs_.end()) fail(kWhere, std::string(op) + ": unknown sequence " + std::to_string(s));
  return it->second;
}

const BlockPool::Seq& BlockPool::seq(SeqId s, const char* op) const {
  auto it = seqs_.find(s);
  if (it == seqs_.end()) fail(kWhere, std::string(op) + ": unknown sequence " + std::to_string(s));
  return it->second;
}

void BlockPool::check_layer(int layer, const char* op) const {
  if (layer < 0 || layer >= n_layers_)
    fail(kWhere, std::string(op) + ": layer " + std::to_string(layer) + " out of range [0, " +
                     std::to_string(n_layers_) + ")");
}

void BlockPool::check_entries(SeqId s, int layer, int entries) const {
  if (entries < 0)
    fail(kWhere, "sequence " + std::to_string(s) + " layer " + std::to_string(layer) + ": entry count " +
                     std::to_string(entries) + " is negative");
  if (max_blocks_per_table_ > 0 && blocks_for(entries) > max_blocks_per_table_)
    fail(kWhere, "sequence " + std::to_string(s) + " layer " + std::to_string(layer) + ": " + std::to_string(entries) +
                     " entries need " + std::to_string(blocks_for(entries)) + " blocks, more than the block-table width " +
                     std::to_string(max_blocks_per_table_) + " (at most " +
                     std::to_string(max_blocks_per_table_ * block_size_) + " entries per layer)");
}

int BlockPool::entries(SeqId s, int layer) const {
  check_layer(layer, "entries");
  const Layer& L = seq(s, "entries").layers[size_t(layer)];
  if (L.heads.empty()) return L.entries;
  int n = 0;
  for (const Layer& H : L.heads) n += H.entries;
  return n;
}

bool BlockPool::per_head(SeqId s, int layer) const {
  check_layer(layer, "per_head");
  return !seq(s, "per_head").layers[size_t(layer)].heads.empty();
}

BlockPool::Layer& BlockPool::head_layer(SeqId s, int layer, int head, const char* op) {
  return const_cast<Layer&>(static_cast<const BlockPool*>(this)->head_layer(s, layer, head, op));
}

const BlockPool::Layer& BlockPool::head_layer(SeqId s, int layer, int head, const char* op) const {
  check_layer(layer, op);
  const Layer& L = seq(s, op).layers[size_t(layer)];
  if (L.heads.empty())
    fail(kWhere, std::string(op) + ": sequence " + std::to_string(s) + " layer " + std::to_string(layer) +
                     " keeps the same entries in every head (no head tables)");
  if (head < 0 || head >= n_kv_heads_)
    fail(kWhere, std::string(op) + ": KV head " + std::to_string(head) + " out of range [0, " + std::to_string(n_kv_heads_) + ")");
  return L.heads[size_t(head)];
}

int BlockPool::head_entries(SeqId s, int layer, int head) const { return head_layer(s, layer, head, "head_entries").entries; }

const std::vector<int32_t>& BlockPool::head_table(SeqId s, int layer, int head) const {
  return head_layer(s, layer, head, "head_table").blocks;
}

void BlockPool::split_heads(SeqId s, int layer, const std::vector<int>& entries) {
  check_layer(layer, "split_heads");
  Layer& L = seq(s, "split_heads").layers[size_t(layer)];
  const std::string where = "sequence " + std::to_string(s) + " layer " + std::to_string(layer);
  if (!L.heads.empty()) fail(kWhere, "split_heads: " + where + " has head tables already");
  if (int(entries.size()) != n_kv_heads_)
    fail(kWhere, "split_heads: " + std::to_string(entries.size()) + " entry counts for " + std::to_string(n_kv_heads_) +
                     " KV heads");
  Need need;
  for (int e : entries) {
    if (e < 0 || e > L.entries)
      fail(kWhere, "split_heads: " + where + ": a head of " + std::to_string(e) + " entries from a layer of " +
                       std::to_string(L.entries));
    need.sub_blocks += head_blocks_for(e);
  }
  if (!fits(need))
    out_of_blocks(s, (need.sub_blocks - int(sub_free_.size()) + n_kv_heads_ - 1) / n_kv_heads_,
                  "the head tables of layer " + std::to_string(layer));
  L.heads.resize(size_t(n_kv_heads_));
  for (int h = 0; h < n_kv_heads_; ++h) apply_head_resize(s, L.heads[size_t(h)], entries[size_t(h)]);
}

void BlockPool::release_shared(SeqId s, int layer) {
  check_layer(layer, "release_shared");
  Layer& L = seq(s, "release_shared").layers[size_t(layer)];
  PKV_ASSERT_MSG(!L.heads.empty(), "release_shared: sequence " + std::to_string(s) + " layer " + std::to_string(layer) +
                                       " has no head tables");
  L.slots.clear();
  apply_resize(s, L, 0);
}

void BlockPool::resize_head(SeqId s, int layer, int head, int entries) {
  Layer& H = head_layer(s, layer, head, "resize_head");
  check_entries(s, layer, entries);
  const Need need{0, std::max(0, head_blocks_for(entries) - int(H.blocks.size()))};
  if (!fits(need))
    out_of_blocks(s, (need.sub_blocks - int(sub_free_.size()) + n_kv_heads_ - 1) / n_kv_heads_,
                  "layer " + std::to_string(layer) + " head " + std::to_string(head) + " (" + std::to_string(entries) +
                      " entries)");
  apply_head_resize(s, H, entries);
}

bool BlockPool::fits(const Need& n) const {
  if (n.blocks > free_blocks()) return false;
  const int from_blocks = std::max(0, n.sub_blocks - int(sub_free_.size()));
  return from_blocks <= (free_blocks() - n.blocks) * n_kv_heads_;
}

BlockPool::Need BlockPool::blocks_to_append(SeqId s, int n) const {
  if (n < 0) fail(kWhere, "blocks_to_append: negative count " + std::to_string(n));
  Need need;
  for (int l = 0; l < n_layers_; ++l) {
    const Layer& L = seq(s, "blocks_to_append").layers[size_t(l)];
    if (L.heads.empty()) {
      need.blocks += blocks_needed(s, l, L.entries + n);
      continue;
    }
    for (const Layer& H : L.heads) {
      check_entries(s, l, H.entries + n);
      need.sub_blocks += std::max(0, head_blocks_for(H.entries + n) - int(H.blocks.size()));
    }
  }
  return need;
}

int32_t BlockPool::take_sub_block(SeqId s) {
  if (sub_free_.empty()) {  // split a free block: part 0 serves now, the others wait in sub_free_
    PKV_ASSERT(!free_.empty());
    const int32_t b = free_.back();
    free_.pop_back();
    PKV_ASSERT(owner_[size_t(b)] == -1 && sub_used_[size_t(b)] == 0);
    owner_[size_t(b)] = kSplit;
    for (int j = 0; j < n_kv_heads_; ++j) sub_free_.insert(b * n_kv_heads_ + j);
    peak_used_ = std::max(peak_used_, used_blocks());
  }
  const int32_t sb = *sub_free_.begin();
  sub_free_.erase(sub_free_.begin());
  PKV_ASSERT(sub_owner_[size_t(sb)] == -1);
  sub_owner_[size_t(sb)] = s;
  ++sub_used_[size_t(sb / n_kv_heads_)];
  return sb;
}

void BlockPool::give_sub_block(SeqId s, int32_t sb) {
  const int32_t b = sb / n_kv_heads_;
  PKV_ASSERT(sub_owner_[size_t(sb)] == s && owner_[size_t(b)] == kSplit && sub_used_[size_t(b)] > 0);
  sub_owner_[size_t(sb)] = -1;
  sub_free_.insert(sb);
  if (--sub_used_[size_t(b)] > 0) return;
  for (int j = 0; j < n_kv_heads_; ++j) sub_free_.erase(b * n_kv_heads_ + j);  // the whole block is free again
  owner_[size_t(b)] = -1;
  free_.push_back(b);
}

void BlockPool::apply_head_resize(SeqId s, Layer& H, int entries) {
  const int want = head_blocks_for(entries);
  while (int(H.blocks.size()) < want) H.blocks.push_back(take_sub_block(s));
  while (int(H.blocks.size()) > want) {  // tail sub-blocks, last first
    give_sub_block(s, H.blocks.back());
    H.blocks.pop_back();
  }
  H.version = next_version_++;
  H.entries = entries;
}

int BlockPool::sub_blocks_held(SeqId s) const {
  int n = 0;
  for (const Layer& L : seq(s, "sub_blocks_held").layers)
    for (const Layer& H : L.heads) n += int(H.blocks.size());
  return n;
}

size_t BlockPool::bytes_held(SeqId s) const {
  return size_t(blocks_held(s)) * bytes_per_block_ + size_t(sub_blocks_held(s)) * sub_block_bytes();
}

std::vector<std::vector<size_t>> BlockPool::bytes_per_head(SeqId s) const {
  std::vector<std::vector<size_t>> out(size_t(n_layers_), std::vector<size_t>(size_t(n_kv_heads_), 0));
  const Seq& q = seq(s, "bytes_per_head");
  for (int l = 0; l < n_layers_; ++l) {
    const Layer& L = q.layers[size_t(l)];
    for (int h = 0; h < n_kv_heads_; ++h)
      out[size_t(l)][size_t(h)] = L.heads.empty() ? L.blocks.size() * bytes_per_block_ / size_t(n_kv_heads_)
                                                  : L.heads[size_t(h)].blocks.size() * sub_block_bytes();
  }
  return out;
}

const std::vector<int32_t>& BlockPool::table(SeqId s, int layer) const {
  check_layer(layer, "table");
  return seq(s, "table").layers[size_t(layer)].blocks;
}

const std::vector<int32_t>& BlockPool::slot_map(SeqId s, int layer) const {
  check_layer(layer, "slot_map");
  return seq(s, "slot_map").layers[size_t(layer)].slots;
}

// True when map is a permutation of [0, map.size()).
static bool is_permutation_prefix(const std::vector<int32_t>& map) {
  std::vector<char> seen(map.size(), 0);
  for (int32_t v : map) {
    if (v < 0 || size_t(v) >= map.size() || seen[size_t(v)]) return false;
    seen[size_t(v)] = 1;
  }
  return true;
}

void BlockPool::set_slot_map(SeqId s, int layer, std::vector<int32_t> map) {
  check_layer(layer, "set_slot_map");
  Layer& L = seq(s, "set_slot_map").layers[size_t(layer)];
  PKV_ASSERT_MSG(map.size() <= size_t(L.entries) && is_permutation_prefix(map),
                 "sequence " + std::to_string(s) + " layer " + std::to_string(layer) + ": a slot map of " +
                     std::to_string(map.size()) + " entries that is not a permutation of its own range, or longer than the " +
                     std::to_string(L.entries) + " entries held");
  L.slots = std::move(map);
}

std::vector<int32_t>& BlockPool::mutable_slot_map(SeqId s, int layer) {
  check_layer(layer, "mutable_slot_map");
  return seq(s, "mutable_slot_map").layers[size_t(layer)].slots;
}

void plan_slot_moves(std::vector<int32_t>& map, int n, std::span<const int32_t> keep, int first,
                     std::vector<int32_t>& src, std::vector<int32_t>& dst) {
  const int k = int(keep.size());
  PKV_ASSERT(k <= n && map.size() <= size_t(n) && first >= 0 && first <= k);
  std::vector<int32_t> holes, movers;
  // Kept entries of the identity prefix stay where the map has them, which may be a slot >= k
  // (moved there by no one, but a table can shrink below them): one tight scan of the part the map
  // stores (beyond it entry m sits at slot m < first <= k).
  const int explicit_prefix = std::min(first, int(map.size()));
  for (int m = 0; m < explicit_prefix; ++m)
    if (map[size_t(m)] >= k) movers.push_back(m);
  if (map.size() < size_t(k)) {  // the identity part that the new map will cover explicitly
    const int32_t from = int32_t(map.size());
    map.resize(size_t(k));
    std::iota(map.begin() + from, map.end(), from);
  }
  // In place, m increasing: the new entry m reads the old map at keep[m] >= m and at removed entries
  // e > keep[m - 1] >= m - 1, none of which has been written yet.
  const std::span<const int32_t> old(map);
  int32_t prev = first - 1;
  for (int m = first; m < k; ++m) {
    const int32_t e = keep[size_t(m)];
    for (int32_t r = prev + 1; r < e; ++r) {  // removed entries
      const int32_t slot = slot_of(old, r);
      if (slot < k) holes.push_back(slot);
    }
    const int32_t slot = slot_of(old, e);
    map[size_t(m)] = slot;
    if (slot >= k) movers.push_back(m);
    prev = e;
  }
  for (int32_t r = prev + 1; r < n; ++r) {  // removed after the last kept entry
    const int32_t slot = slot_of(old, r);
    if (slot < k) holes.push_back(slot);
  }
  PKV_ASSERT(holes.size() == movers.size());
  for (size_t i = 0; i < movers.size(); ++i) {
    int32_t& slot = map[size_t(movers[i])];
    src.push_back(slot);
    dst.push_back(holes[i]);
    slot = holes[i];
  }
  size_t len = size_t(k);
  while (len > 0 && map[len - 1] == int32_t(len - 1)) --len;
  map.resize(len);
}

uint64_t BlockPool::table_version(SeqId s, int layer) const {
  check_layer(layer, "table_version");
  return seq(s, "table_version").layers[size_t(layer)].version;
}

int BlockPool::blocks_held(SeqId s) const {
  int n = 0;
  for (const Layer& L : seq(s, "blocks_held").layers) n += int(L.blocks.size());
  return n;
}

int BlockPool::blocks_needed(SeqId s, int layer, int entries) const {
  check_layer(layer, "blocks_needed");
  check_entries(s, layer, entries);
  const Layer& L = seq(s, "blocks_needed").layers[size_t(layer)];
  if (!L.heads.empty())
    fail(kWhere, "blocks_needed: sequence " + std::to_string(s) + " layer " + std::to_string(layer) +
                     " has head tables (blocks_to_append, resize_head)");
  return std::max(0, blocks_for(entries) - int(L.blocks.size()));
}

int BlockPool::blocks_needed(SeqId s, const std::vector<int>& entries_per_layer) const {
  if (int(entries_per_layer.size()) != n_layers_)
    fail(kWhere, "blocks_needed: " + std::to_string(entries_per_layer.size()) + " entry counts for " +
                     std::to_string(n_layers_) + " layers");
  int n = 0;
  for (int l = 0; l < n_layers_; ++l) n += blocks_needed(s, l, entries_per_layer[size_t(l)]);
  return n;
}

void BlockPool::out_of_blocks(SeqId s, int needed, const std::string& what) const {
  fail(kWhere, "out of KV blocks: sequence " + std::to_string(s) + " needs " + std::to_string(needed) +
                   " more blocks for " + what + " but only " + std::to_string(free_blocks()) + " of " +
                   std::to_string(n_blocks()) + " are free (" + std::to_string(block_size_) + " entries, " +
                   mib(bytes_per_block_) + " per block; " + mib(free_bytes()) + " free)");
}

void BlockPool::apply_resize(SeqId s, Layer& L, int entries) {
  const int want = blocks_for(entries);
  const int have = int(L.blocks.size());
  if (want > have) {
    PKV_ASSERT(want - have <= free_blocks());
    for (int i = have; i < want; ++i) {
      const int32_t b = free_.back();
      free_.pop_back();
      PKV_ASSERT(owner_[size_t(b)] == -1);
      owner_[size_t(b)] = s;
      L.blocks.push_back(b);
    }
    peak_used_ = std::max(peak_used_, used_blocks());
  } else if (want < have) {
    for (int i = have - 1; i >= want; --i) {  // tail blocks, last first
      const int32_t b = L.blocks[size_t(i)];
      PKV_ASSERT(owner_[size_t(b)] == s);
      owner_[size_t(b)] = -1;
      free_.push_back(b);
    }
    L.blocks.resize(size_t(want));
  }
  if (want != have || entries != L.entries) L.version = next_version_++;
  if (entries == 0) L.slots.clear();
  PKV_ASSERT_MSG(L.slots.size() <= size_t(entries), "sequence " + std::to_string(s) + ": a slot map of " +
                                                        std::to_string(L.slots.size()) + " entries for a table of " +
                                                        std::to_string(entries));
  L.entries = entries;
}

void BlockPool::resize(SeqId s, int layer, int entries) {
  check_layer(layer, "resize");
  check_entries(s, layer, entries);
  Layer& L = seq(s, "resize").layers[size_t(layer)];
  if (!L.heads.empty())
    fail(kWhere, "resize: sequence " + std::to_string(s) + " layer " + std::to_string(layer) +
                     " has head tables (resize_head)");
  const int need = std::max(0, blocks_for(entries) - int(L.blocks.size()));
  if (need > free_blocks())
    out_of_blocks(s, need, "layer " + std::to_string(layer) + " (" + std::to_string(entries) + " entries)");
  apply_resize(s, L, entries);
}

void BlockPool::resize_all(SeqId s, const std::vector<int>& entries_per_layer) {
  const int need = blocks_needed(s, entries_per_layer);  // validates everything first
  Seq& q = seq(s, "resize_all");
  int freed = 0;  // by the layers that shrink in this same call
  for (int l = 0; l < n_layers_; ++l)
    freed += std::max(0, int(q.layers[size_t(l)].blocks.size()) - blocks_for(entries_per_layer[size_t(l)]));
  if (need > free_blocks() + freed) out_of_blocks(s, need - freed, "all layers");
  // Shrink first so that a layer's freed blocks are visible in the counts; growth cannot fail now.
  for (int l = 0; l < n_layers_; ++l)
    if (entries_per_layer[size_t(l)] < q.layers[size_t(l)].entries) apply_resize(s, q.layers[size_t(l)], entries_per_layer[size_t(l)]);
  for (int l = 0; l < n_layers_; ++l) apply_resize(s, q.layers[size_t(l)], entries_per_layer[size_t(l)]);
}

void BlockPool::append_all(SeqId s, int n) {
  if (n < 0) fail(kWhere, "append_all: negative count " + std::to_string(n));
  Seq& q = seq(s, "append_all");
  const Need need = blocks_to_append(s, n);  // validates every count first
  if (!fits(need))
    out_of_blocks(s, need.blocks + std::max(0, need.sub_blocks - int(sub_free_.size()) + n_kv_heads_ - 1) / n_kv_heads_,
                  std::to_string(n) + " new entries in every layer");
  for (Layer& L : q.layers) {  // shared tables first: the sub-blocks then come from what is left
    if (L.heads.empty()) apply_resize(s, L, L.entries + n);
  }
  for (Layer& L : q.layers)
    for (Layer& H : L.heads) apply_head_resize(s, H, H.entries + n);
}

BlockPoolStats BlockPool::stats() const {
  BlockPoolStats st;
  st.total_blocks = n_blocks();
  st.used_blocks = used_blocks();
  st.free_blocks = free_blocks();
  st.peak_used_blocks = peak_used_;
  st.sequences = int(seqs_.size());
  for (const auto& [id, q] : seqs_)
    for (const Layer& L : q.layers) {
      if (L.heads.empty()) st.entries += L.entries;
      for (const Layer& H : L.heads) st.entries += H.entries;
    }
  for (int b = 0; b < n_blocks(); ++b) st.split_blocks += owner_[size_t(b)] == kSplit ? 1 : 0;
  st.sub_blocks_free = int(sub_free_.size());
  st.sub_blocks_used = st.split_blocks * n_kv_heads_ - st.sub_blocks_free;
  st.bytes_per_block = bytes_per_block_;
  st.used_bytes = used_bytes();
  st.free_bytes = free_bytes();
  st.total_bytes = size_t(n_blocks()) * bytes_per_block_;
  return st;
}

void BlockPool::check_invariants() const {
  std::vector<int> seen(owner_.size(), 0), sub_seen(sub_owner_.size(), 0);
  for (int32_t b : free_) {
    PKV_ASSERT_MSG(b >= 0 && b < n_blocks(), "free block id " + std::to_string(b) + " out of range");
    PKV_ASSERT_MSG(owner_[size_t(b)] == -1, "free block " + std::to_string(b) + " has an owner");
    ++seen[size_t(b)];
  }
  for (const auto& [id, q] : seqs_) {
    PKV_ASSERT(int(q.layers.size()) == n_layers_);
    for (const Layer& L : q.layers) {
      PKV_ASSERT_MSG(int(L.blocks.size()) == blocks_for(L.entries),
                     "sequence " + std::to_string(id) + ": table of " + std::to_string(L.blocks.size()) +
                         " blocks for " + std::to_string(L.entries) + " entries");
      for (int32_t b : L.blocks) {
        PKV_ASSERT_MSG(b >= 0 && b < n_blocks(), "block id " + std::to_string(b) + " out of range");
        PKV_ASSERT_MSG(owner_[size_t(b)] == id, "block " + std::to_string(b) + " in the table of sequence " +
                                                    std::to_string(id) + " is owned by " + std::to_string(owner_[size_t(b)]));
        ++seen[size_t(b)];
      }
      PKV_ASSERT_MSG(L.slots.size() <= size_t(L.entries) && is_permutation_prefix(L.slots),
                     "sequence " + std::to_string(id) + ": a bad slot map");
      PKV_ASSERT(L.heads.empty() || int(L.heads.size()) == n_kv_heads_);
      for (const Layer& H : L.heads) {
        PKV_ASSERT_MSG(int(H.blocks.size()) == head_blocks_for(H.entries) && H.slots.empty(),
                       "sequence " + std::to_string(id) + ": head table of " + std::to_string(H.blocks.size()) +
                           " sub-blocks for " + std::to_string(H.entries) + " entries");
        for (int32_t sb : H.blocks) {
          PKV_ASSERT_MSG(sb >= 0 && size_t(sb) < sub_owner_.size() && sub_owner_[size_t(sb)] == id &&
                             owner_[size_t(sb / n_kv_heads_)] == kSplit,
                         "sub-block " + std::to_string(sb) + " in a head table of sequence " + std::to_string(id));
          ++sub_seen[size_t(sb)];
        }
      }
    }
  }
  // Split blocks: each part either free (in sub_free_) or in exactly one head table; at least one in use.
  for (int32_t sb : sub_free_) {
    PKV_ASSERT_MSG(owner_[size_t(sb / n_kv_heads_)] == kSplit && sub_owner_[size_t(sb)] == -1,
                   "free sub-block " + std::to_string(sb) + " of a block that is not split, or owned");
    ++sub_seen[size_t(sb)];
  }
  for (size_t b = 0; b < seen.size(); ++b) {
    if (owner_[b] != kSplit) continue;
    int used = 0;
    for (int j = 0; j < n_kv_heads_; ++j) {
      const size_t sb = b * size_t(n_kv_heads_) + size_t(j);
      PKV_ASSERT_MSG(sub_seen[sb] == 1, "sub-block " + std::to_string(sb) + " is referenced " + std::to_string(sub_seen[sb]) + " times");
      used += sub_owner_[sb] >= 0 ? 1 : 0;
    }
    PKV_ASSERT_MSG(used == sub_used_[b] && used > 0, "split block " + std::to_string(b) + ": " + std::to_string(used) +
                                                         " parts in use, counted " + std::to_string(sub_used_[b]));
    ++seen[b];
  }
  for (size_t b = 0; b < seen.size(); ++b)
    PKV_ASSERT_MSG(seen[b] == 1, "block " + std::to_string(b) + " is referenced " + std::to_string(seen[b]) + " times");
}

}  // namespace pkv
