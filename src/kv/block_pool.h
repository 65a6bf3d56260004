// The paged KV block pool: host-side bookkeeping of one pool of fixed-size blocks shared by all
// sequences and all layers (pure C++; the device memory it describes is laid out as in kernels.h,
// PagedKV).
//
// A block holds `block_size` consecutive entries of ONE layer of ONE sequence. Each (sequence,
// layer) has its own block table (block ids in entry order) and entry count, so a layer that keeps
// 20% of its entries holds about 20% of the blocks, and blocks freed by compaction serve any other
// sequence or layer at once: all blocks are the same size, so the pool never fragments.
//
// Entries of a table need not sit in their logical order: each (sequence, layer) also has a slot
// map, logical entry i -> the slot (entry index in the table's blocks) that holds it. Attention does
// not depend on the order (keys carry their rotary positions, and the position of each entry is
// stored beside it), so an eviction in the middle of a long table moves the few entries from its end
// into the freed slots instead of shifting everything after it (plan_slot_moves).
//
// Per-head layers (per-KV-head budgets, kv/kv_cache.h): a keep plan with one list per KV head gives
// a (sequence, layer) one table per KV head instead (split_heads). A head table is a list of
// SUB-BLOCKS: a block split into n_kv_heads parts, part j holding block_size entries of one head
// (kernels.h, PagedHeads); sub-block id = block * n_kv_heads + part. So a head table rounds up to
// block_size entries, as a shared table does, and a head keeping 20% of the entries holds about 20%
// of its share of the layer's bytes. A block is split when a head table needs a part and no split
// block has a free one (the lowest free part id is taken first); it returns to the free blocks when
// its last part is freed. Head tables keep their entries in logical order (no slot map); a decode
// step appends to every head.
//
// Errors (out of blocks, unknown sequence, bad layer or count) throw pkv::Error and change nothing.
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <set>
#include <span>
#include <unordered_map>
#include <string>
#include <vector>

namespace pkv {

// Bytes of one block: K and V of block_size entries of kv_dim elements, plus the int32 position of
// each entry.
size_t paged_block_bytes(int block_size, int kv_dim, size_t element_bytes);

struct BlockPoolStats {
  int total_blocks = 0;
  int used_blocks = 0;
  int free_blocks = 0;
  int peak_used_blocks = 0;
  int sequences = 0;
  int64_t entries = 0;  // entries held over all sequences and layers
  int split_blocks = 0;     // of the used blocks, those split into head tables' sub-blocks
  int sub_blocks_used = 0;  // sub-blocks of head tables
  int sub_blocks_free = 0;  // free parts of split blocks (held until their block is wholly free)
  size_t bytes_per_block = 0;
  size_t used_bytes = 0;
  size_t free_bytes = 0;
  size_t total_bytes = 0;
  std::string to_string() const;  // one line for logs
};

// A slot map is stored short: entries [0, map.size()) are at map[i], every later entry i at slot i
// (new entries are appended at the end of the table, where they also sit logically). The stored
// part is a permutation of [0, map.size()).
inline int32_t slot_of(std::span<const int32_t> map, int32_t i) { return size_t(i) < map.size() ? map[size_t(i)] : i; }

// Compaction of one table by moves: the table holds n entries (slot map `map`) and keeps the logical
// entries keep (strictly increasing, < n; keep[m] = m for m < first, the caller's identity prefix).
// The kept entries that sit at slots >= keep.size() move into the slots < keep.size() that removed
// entries free (each such slot receives one entry, each moving entry leaves a slot that is cut off
// with the table's tail): entry dst[i] <- entry src[i], appended to src/dst, all independent of each
// other. `map` becomes, in place, the kept entries' slot map (trailing identity trimmed). O(n - first)
// plus one compare per entry of the prefix: a decode step's eviction near the end of a long table
// costs the tail, not the table.
void plan_slot_moves(std::vector<int32_t>& map, int n, std::span<const int32_t> keep, int first,
                     std::vector<int32_t>& src, std::vector<int32_t>& dst);

class BlockPool {
 public:
  using SeqId = int32_t;

  // `max_blocks_per_table` (0: no limit) is the width of the device block tables: a (sequence,
  // layer) can never hold more blocks than that.
  // n_kv_heads: the heads a per-head layer splits into (the entries of a head table's block).
  BlockPool(int n_blocks, int block_size, int n_layers, size_t bytes_per_block, int max_blocks_per_table = 0,
            int n_kv_heads = 1);

  int n_blocks() const { return int(owner_.size()); }
  int block_size() const { return block_size_; }
  int n_layers() const { return n_layers_; }
  int max_blocks_per_table() const { return max_blocks_per_table_; }
  size_t bytes_per_block() const { return bytes_per_block_; }
  int blocks_for(int entries) const { return (entries + block_size_ - 1) / block_size_; }
  int n_kv_heads() const { return n_kv_heads_; }
  // Sub-blocks a head table of `entries` entries holds, and the bytes of one (a block's / n_kv_heads).
  int head_blocks_for(int entries) const { return blocks_for(entries); }
  size_t sub_block_bytes() const { return bytes_per_block_ / size_t(n_kv_heads_); }

  // Sequences. A new sequence holds no blocks; removing one returns all its blocks.
  SeqId add_sequence();
  void remove_sequence(SeqId s);
  bool has_sequence(SeqId s) const { return seqs_.count(s) != 0; }
  std::vector<SeqId> sequences() const;

  // Entries of (s, layer); a per-head layer: summed over its heads (LayerKeep::before counts so).
  int entries(SeqId s, int layer) const;
  // Block ids of (s, layer) in entry order: entry e lives in block table[e / block_size], slot
  // e % block_size.
  const std::vector<int32_t>& table(SeqId s, int layer) const;
  // Logical entry -> slot (short form, see slot_of); empty = every entry at its own index.
  const std::vector<int32_t>& slot_map(SeqId s, int layer) const;
  // Replaces the map (a permutation of [0, map.size()), map.size() <= entries: asserted).
  void set_slot_map(SeqId s, int layer, std::vector<int32_t> map);
  // The map itself, for an in-place update (plan_slot_moves); check_invariants validates it.
  std::vector<int32_t>& mutable_slot_map(SeqId s, int layer);
  // Changes whenever table(s, layer) changes (to upload only the tables that changed).
  uint64_t table_version(SeqId s, int layer) const;
  // The blocks of s's shared tables, the sub-blocks of its head tables, and the bytes of both.
  int blocks_held(SeqId s) const;
  int sub_blocks_held(SeqId s) const;
  size_t bytes_held(SeqId s) const;

  // Per-head layers. per_head: the layer has head tables (split_heads, for the rest of the
  // sequence's life).
  bool per_head(SeqId s, int layer) const;
  int head_entries(SeqId s, int layer, int head) const;
  // Sub-block ids of head `head`'s table: entry e lives in sub-block table[e / block_size].
  const std::vector<int32_t>& head_table(SeqId s, int layer, int head) const;
  // Gives the shared layer (s, layer) one table per KV head, head h holding entries[h] entries
  // (new sub-blocks, all or nothing). The shared table stays, for the caller to copy from (the
  // device's paged_kv_head_compact), until release_shared() returns its blocks.
  void split_heads(SeqId s, int layer, const std::vector<int>& entries);
  void release_shared(SeqId s, int layer);
  // Sets one head's entry count: shrinking (after compaction) returns tail sub-blocks, growing takes
  // sub-blocks (throws, changing nothing, when too few are free).
  void resize_head(SeqId s, int layer, int head, int entries);
  // What a change takes from the pool: whole blocks (shared tables) and sub-blocks (head tables).
  struct Need {
    int blocks = 0, sub_blocks = 0;
    Need& operator+=(const Need& o) { blocks += o.blocks, sub_blocks += o.sub_blocks; return *this; }
  };
  // Whether the pool can give it now: the blocks from the free ones, the sub-blocks from the free
  // parts of split blocks and then from the free blocks left.
  bool fits(const Need& n) const;
  // Sub-blocks to be had now: the free parts of split blocks and n_kv_heads per free block.
  int sub_blocks_available() const { return int(sub_free_.size()) + free_blocks() * n_kv_heads_; }
  // What append_all(s, n) would take from the pool.
  Need blocks_to_append(SeqId s, int n) const;
  // Bytes (s, layer) holds, per KV head ([layers][n_kv_heads]): a head table's sub-blocks; a
  // shared layer's blocks divided evenly over its heads.
  std::vector<std::vector<size_t>> bytes_per_head(SeqId s) const;

  // Blocks that resizing would take from the pool (0 when it shrinks or stays). Shared layers only.
  int blocks_needed(SeqId s, int layer, int entries) const;
  int blocks_needed(SeqId s, const std::vector<int>& entries_per_layer) const;
  // Admission: are `blocks` blocks free now?
  bool can_admit(int blocks) const { return blocks <= free_blocks(); }

  // Sets the entry count of (s, layer). Growing takes blocks from the pool (throws, changing
  // nothing, when too few are free); shrinking (after compaction) returns the tail blocks. The slot
  // map must already fit the new count (set_slot_map first); shrinking to 0 clears it.
  void resize(SeqId s, int layer, int entries);
  // Every layer at once, all or nothing (shared layers only).
  void resize_all(SeqId s, const std::vector<int>& entries_per_layer);
  // One decode step: n more entries in every layer (every head of a per-head layer), all or nothing.
  void append_all(SeqId s, int n = 1);

  int free_blocks() const { return int(free_.size()); }
  int used_blocks() const { return n_blocks() - free_blocks(); }
  size_t used_bytes() const { return size_t(used_blocks()) * bytes_per_block_; }
  size_t free_bytes() const { return size_t(free_blocks()) * bytes_per_block_; }
  BlockPoolStats stats() const;
  // Starts a new high-water mark of used blocks (stats().peak_used_blocks) from the blocks used now.
  void reset_peak() { peak_used_ = used_blocks(); }

  // Every block is either free or owned by exactly one table, and tables match their entry counts.
  // A bug here is ours: asserts (aborts) with what is inconsistent.
  void check_invariants() const;

 private:
  struct Layer {
    int entries = 0;
    std::vector<int32_t> blocks;
    std::vector<int32_t> slots;  // slot map (short form)
    uint64_t version = 0;
    std::vector<Layer> heads;  // per-head layers: one table per KV head (no slot maps)
  };
  struct Seq {
    std::vector<Layer> layers;
  };
  Seq& seq(SeqId s, const char* op);
  const Seq& seq(SeqId s, const char* op) const;
  void check_layer(int layer, const char* op) const;
  void check_entries(SeqId s, int layer, int entries) const;
  void out_of_blocks(SeqId s, int needed, const std::string& what) const;
  void apply_resize(SeqId s, Layer& L, int entries);
  void apply_head_resize(SeqId s, Layer& H, int entries);  // in sub-blocks
  int32_t take_sub_block(SeqId s);
  void give_sub_block(SeqId s, int32_t sb);
  Layer& head_layer(SeqId s, int layer, int head, const char* op);
  const Layer& head_layer(SeqId s, int layer, int head, const char* op) const;

  int block_size_, n_layers_, max_blocks_per_table_, n_kv_heads_;
  size_t bytes_per_block_;
  std::vector<int32_t> free_;   // stack of free block ids
  std::vector<SeqId> owner_;    // owner sequence of each block, -1 = free, kSplit = parts of head tables
  static constexpr SeqId kSplit = -2;
  std::vector<SeqId> sub_owner_;  // [n_blocks * n_kv_heads] owner of each part of a split block, -1 = free
  std::vector<int> sub_used_;     // [n_blocks] parts of each split block in use (0 for other blocks)
  std::set<int32_t> sub_free_;    // free parts of split blocks, lowest first
  std::unordered_map<SeqId, Seq> seqs_;  // looked up several times per (sequence, layer) and step
  SeqId next_id_ = 0;
  uint64_t next_version_ = 1;
  int peak_used_ = 0;
};

}  // namespace pkv
