// The paged KV block pool (src/kv/block_pool.h): pure bookkeeping, tested in every build.
#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <random>
#include <set>

#include "core/error.h"
#include "kv/block_pool.h"

namespace pkv {
namespace {

std::set<int32_t> all_blocks(const BlockPool& p, BlockPool::SeqId s) {
  std::set<int32_t> b;
  for (int l = 0; l < p.n_layers(); ++l)
    for (int32_t x : p.table(s, l)) b.insert(x);
  return b;
}

TEST(BlockPool, AllocateFreeReuse) {
  const size_t bpb = paged_block_bytes(16, 64, 2);
  EXPECT_EQ(bpb, size_t(16) * (2 * 64 * 2 + 4));
  BlockPool pool(10, 16, 2, bpb);
  EXPECT_EQ(pool.free_blocks(), 10);
  EXPECT_EQ(pool.blocks_for(0), 0);
  EXPECT_EQ(pool.blocks_for(1), 1);
  EXPECT_EQ(pool.blocks_for(16), 1);
  EXPECT_EQ(pool.blocks_for(17), 2);

  const auto a = pool.add_sequence();
  EXPECT_EQ(pool.blocks_needed(a, 0, 33), 3);
  pool.resize(a, 0, 33);  // 3 blocks
  pool.resize(a, 1, 16);  // 1 block
  EXPECT_EQ(pool.entries(a, 0), 33);
  EXPECT_EQ(pool.table(a, 0).size(), 3u);
  EXPECT_EQ(pool.table(a, 1).size(), 1u);
  EXPECT_EQ(pool.used_blocks(), 4);
  EXPECT_EQ(pool.used_bytes(), 4 * bpb);
  pool.check_invariants();

  // Growing within the last block takes nothing.
  const auto v0 = pool.table_version(a, 1);
  pool.resize(a, 1, 16);
  EXPECT_EQ(pool.table_version(a, 1), v0);
  pool.resize(a, 0, 48);
  EXPECT_EQ(pool.used_blocks(), 4);

  const auto held = all_blocks(pool, a);
  pool.remove_sequence(a);
  EXPECT_EQ(pool.free_blocks(), 10);
  EXPECT_FALSE(pool.has_sequence(a));
  pool.check_invariants();

  // The freed blocks come back first.
  const auto b = pool.add_sequence();
  pool.resize(b, 0, 4 * 16);
  EXPECT_EQ(all_blocks(pool, b), held);
  pool.check_invariants();
  const auto st = pool.stats();
  EXPECT_EQ(st.used_blocks, 4);
  EXPECT_EQ(st.free_blocks, 6);
  EXPECT_EQ(st.sequences, 1);
  EXPECT_EQ(st.entries, 64);
  EXPECT_EQ(st.total_bytes, 10 * bpb);
  EXPECT_FALSE(st.to_string().empty());
}

TEST(BlockPool, ExhaustionIsAClearErrorAndChangesNothing) {
  BlockPool pool(8, 4, 3, 1024);
  const auto a = pool.add_sequence();
  pool.resize_all(a, {8, 8, 8});  // 6 blocks
  const auto b = pool.add_sequence();
  EXPECT_FALSE(pool.can_admit(pool.blocks_needed(b, {4, 4, 4})));  // 3 > 2 free
  EXPECT_TRUE(pool.can_admit(2));
  const auto tables_before = std::vector<std::vector<int32_t>>{pool.table(a, 0), pool.table(a, 1), pool.table(a, 2)};
  try {
    pool.resize_all(b, {4, 4, 4});
    FAIL() << "expected pkv::Error";
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("out of KV blocks"), std::string::npos) << m;
    EXPECT_NE(m.find("needs 3 more blocks"), std::string::npos) << m;
    EXPECT_NE(m.find("only 2 of 8 are free"), std::string::npos) << m;
  }
  // All or nothing: b got no block, a is untouched.
  EXPECT_EQ(pool.blocks_held(b), 0);
  EXPECT_EQ(pool.free_blocks(), 2);
  for (int l = 0; l < 3; ++l) EXPECT_EQ(pool.table(a, l), tables_before[size_t(l)]);
  pool.check_invariants();

  EXPECT_THROW(pool.resize(b, 0, 100), Error);
  EXPECT_THROW(pool.append_all(a, 8), Error);  // 6 more blocks needed, 2 free
  EXPECT_EQ(pool.entries(a, 0), 8);
  pool.check_invariants();

  // Bad requests are errors too, not crashes.
  EXPECT_THROW(pool.resize(a, 3, 1), Error);
  EXPECT_THROW(pool.resize(a, -1, 1), Error);
  EXPECT_THROW(pool.resize(a, 0, -1), Error);
  EXPECT_THROW(pool.resize(12345, 0, 1), Error);
  EXPECT_THROW(pool.resize_all(a, {1, 2}), Error);
  EXPECT_THROW(BlockPool(4, 0, 1, 1), Error);
  EXPECT_THROW(BlockPool(4, 16, 0, 1), Error);
  pool.check_invariants();

  // A decode step that needs a block in every layer (3) with 2 free fails cleanly.
  EXPECT_THROW(pool.append_all(b, 4), Error);
  EXPECT_EQ(pool.blocks_held(b), 0);
  pool.check_invariants();
}

TEST(BlockPool, DecodeAppendAllOrNothing) {
  BlockPool pool(7, 4, 3, 1024);
  const auto a = pool.add_sequence();
  pool.resize_all(a, {3, 4, 4});  // 3 blocks, 4 free
  pool.append_all(a);             // layer 0 fills its block; layers 1, 2 take one each
  EXPECT_EQ(pool.used_blocks(), 5);
  EXPECT_EQ(pool.entries(a, 0), 4);
  EXPECT_THROW(pool.append_all(a, 4), Error);  // 3 more blocks needed, 2 free
  EXPECT_EQ(pool.entries(a, 0), 4);
  EXPECT_EQ(pool.entries(a, 2), 5);
  EXPECT_EQ(pool.used_blocks(), 5);
  pool.check_invariants();
}

TEST(BlockPool, CompactionReturnsTailBlocksToOthers) {
  BlockPool pool(20, 8, 2, 4096);
  const auto a = pool.add_sequence();
  pool.resize_all(a, {80, 80});  // 10 + 10 blocks: the pool is full
  EXPECT_EQ(pool.free_blocks(), 0);
  const auto b = pool.add_sequence();
  EXPECT_THROW(pool.resize(b, 0, 1), Error);

  // Keep 20% in layer 0 and 50% in layer 1 (compaction moved the kept entries to the front).
  const auto head0 = std::vector<int32_t>(pool.table(a, 0).begin(), pool.table(a, 0).begin() + 2);
  const auto tail0 = std::vector<int32_t>(pool.table(a, 0).begin() + 2, pool.table(a, 0).end());
  pool.resize_all(a, {16, 40});
  EXPECT_EQ(pool.table(a, 0), head0);  // the front blocks stay where they are
  EXPECT_EQ(pool.table(a, 1).size(), 5u);
  EXPECT_EQ(pool.free_blocks(), 13);
  EXPECT_EQ(pool.blocks_held(a), 7);
  pool.check_invariants();

  // Another sequence takes every freed block: no fragmentation with fixed-size blocks.
  pool.resize_all(b, {64, 40});  // 8 + 5 blocks
  EXPECT_EQ(pool.free_blocks(), 0);
  const auto bb = all_blocks(pool, b);
  for (int32_t x : tail0) EXPECT_TRUE(bb.count(x)) << "freed tail block " << x << " not reused";
  pool.check_invariants();
  const auto st = pool.stats();
  EXPECT_EQ(st.peak_used_blocks, 20);
  EXPECT_EQ(st.used_blocks, 20);
}

// Per-head layers: head tables of sub-blocks (a block split into n_kv_heads parts of block_size
// entries of one head), the shared table released after the split, appends to every head, bytes per
// layer and head, a block back in the pool when its last part is freed, errors change nothing.
TEST(BlockPool, HeadTablesSplitAppendShrinkAndRelease) {
  const int bs = 4, H = 2;  // a sub-block: 4 entries of one head, half a block's bytes
  BlockPool pool(30, bs, 2, 1000, 0, H);
  EXPECT_EQ(pool.head_blocks_for(4), 1);
  EXPECT_EQ(pool.head_blocks_for(5), 2);
  EXPECT_EQ(pool.sub_block_bytes(), 500u);
  const auto a = pool.add_sequence();
  pool.resize_all(a, {40, 40});  // 10 + 10 blocks, 10 free
  EXPECT_FALSE(pool.per_head(a, 0));
  EXPECT_THROW(pool.head_table(a, 0, 0), Error);
  // Head 0 keeps 9 entries (3 sub-blocks), head 1 keeps 3 (1): 4 sub-blocks = 2 split blocks.
  EXPECT_THROW(pool.split_heads(a, 0, {9}), Error);       // one count per head
  EXPECT_THROW(pool.split_heads(a, 0, {41, 3}), Error);   // more than the layer holds
  pool.split_heads(a, 0, {9, 3});
  EXPECT_TRUE(pool.per_head(a, 0));
  EXPECT_EQ(pool.used_blocks(), 22);  // the shared table is still held (the copy reads it)
  EXPECT_EQ(pool.head_table(a, 0, 0).size(), 3u);
  EXPECT_EQ(pool.head_table(a, 0, 1).size(), 1u);
  // Sub-block ids are block * H + part: the lowest free part first, a block split when none is free.
  const std::set<int32_t> parts(pool.head_table(a, 0, 0).begin(), pool.head_table(a, 0, 0).end());
  EXPECT_EQ(parts.size(), 3u);
  EXPECT_EQ(pool.entries(a, 0), 12);  // summed over the heads
  pool.release_shared(a, 0);
  EXPECT_TRUE(pool.table(a, 0).empty());
  EXPECT_EQ(pool.used_blocks(), 12);  // 10 of layer 1, 2 split
  EXPECT_EQ(pool.blocks_held(a), 10);
  EXPECT_EQ(pool.sub_blocks_held(a), 4);
  EXPECT_EQ(pool.bytes_held(a), 10 * 1000u + 4 * 500u);
  BlockPoolStats st = pool.stats();
  EXPECT_EQ(st.entries, 12 + 40);
  EXPECT_EQ(st.split_blocks, 2);
  EXPECT_EQ(st.sub_blocks_used, 4);
  EXPECT_EQ(st.sub_blocks_free, 0);
  pool.check_invariants();
  EXPECT_THROW(pool.resize(a, 0, 5), Error);         // a per-head layer is resized per head
  EXPECT_THROW(pool.split_heads(a, 0, {1, 1}), Error);

  // A decode step: every head of layer 0 and layer 1 get one entry. Head 0 (9 -> 10) and head 1
  // (3 -> 4) fit their sub-blocks; layer 1 (40 -> 41) takes a block.
  BlockPool::Need n = pool.blocks_to_append(a, 1);
  EXPECT_EQ(n.blocks, 1);
  EXPECT_EQ(n.sub_blocks, 0);
  pool.append_all(a, 1);
  EXPECT_EQ(pool.head_entries(a, 0, 0), 10);
  EXPECT_EQ(pool.head_entries(a, 0, 1), 4);
  EXPECT_EQ(pool.entries(a, 1), 41);
  EXPECT_EQ(pool.used_blocks(), 13);
  // 3 more: head 0 13 (+1 sub-block), head 1 7 (+1), layer 1 44 (11 blocks, +0).
  n = pool.blocks_to_append(a, 3);
  EXPECT_EQ(n.blocks, 0);
  EXPECT_EQ(n.sub_blocks, 2);
  pool.append_all(a, 3);
  EXPECT_EQ(pool.used_blocks(), 14);  // the 2 sub-blocks split one more block
  // Bytes per layer and head: head tables their own sub-blocks; a shared layer split evenly.
  const auto bh = pool.bytes_per_head(a);
  ASSERT_EQ(bh.size(), 2u);
  EXPECT_EQ(bh[0], (std::vector<size_t>{2000, 1000}));
  EXPECT_EQ(bh[1], (std::vector<size_t>{5500, 5500}));

  // Shrink head 0 to 4 entries: 3 sub-blocks go back; blocks whose last part is freed return to
  // the free blocks, the others keep their free parts for the next head table.
  pool.resize_head(a, 0, 0, 4);
  EXPECT_EQ(pool.head_table(a, 0, 0).size(), 1u);
  st = pool.stats();
  EXPECT_EQ(st.sub_blocks_used, 3);
  EXPECT_EQ(pool.used_blocks(), 11 + st.split_blocks);
  EXPECT_EQ(st.split_blocks * H, st.sub_blocks_used + st.sub_blocks_free);
  EXPECT_THROW(pool.resize_head(a, 0, 2, 1), Error);  // no head 2
  // Out of blocks: 30 - 11 - split blocks are free; head 1 asking for all of them and one more
  // sub-block than they and the free parts hold fails and changes nothing.
  const int avail = pool.sub_blocks_available();
  EXPECT_EQ(avail, (30 - 11 - st.split_blocks) * H + st.sub_blocks_free);
  const int have = int(pool.head_table(a, 0, 1).size());
  EXPECT_THROW(pool.resize_head(a, 0, 1, (have + avail + 1) * bs), Error);
  EXPECT_EQ(pool.head_entries(a, 0, 1), 7);
  EXPECT_EQ(pool.sub_blocks_available(), avail);
  pool.resize_head(a, 0, 1, (have + avail) * bs);  // exactly everything: fits
  EXPECT_EQ(pool.free_blocks(), 0);
  EXPECT_EQ(pool.sub_blocks_available(), 0);
  pool.check_invariants();
  pool.remove_sequence(a);
  EXPECT_EQ(pool.used_blocks(), 0);
  EXPECT_EQ(pool.stats().split_blocks, 0);
  pool.check_invariants();
}

TEST(BlockPool, HeadSubBlocksServeOtherSequencesAndShareBlocks) {
  BlockPool pool(6, 4, 1, 1, 0, 2);
  const auto a = pool.add_sequence(), b = pool.add_sequence();
  pool.resize(a, 0, 20);  // blocks 0..4; block 5 free = 2 sub-blocks
  EXPECT_THROW(pool.split_heads(a, 0, {9, 1}), Error);  // 3 + 1 sub-blocks
  EXPECT_FALSE(pool.per_head(a, 0));
  EXPECT_EQ(pool.used_blocks(), 5);
  pool.split_heads(a, 0, {4, 0});  // one sub-block: block 5 split, part 10 taken, 11 free
  EXPECT_EQ(pool.head_table(a, 0, 0), std::vector<int32_t>{10});
  pool.release_shared(a, 0);
  EXPECT_EQ(pool.used_blocks(), 1);
  // Appending takes a sub-block for each head that crosses a boundary (4 -> 5, 0 -> 1).
  EXPECT_EQ(pool.blocks_to_append(a, 1).sub_blocks, 2);
  // Another sequence's head table takes the free part of a's split block first, then splits a block.
  pool.resize(b, 0, 8);
  pool.split_heads(b, 0, {1, 1});
  pool.release_shared(b, 0);
  EXPECT_EQ(pool.head_table(b, 0, 0), std::vector<int32_t>{11});
  BlockPoolStats st = pool.stats();
  EXPECT_EQ(st.split_blocks, 2);
  EXPECT_EQ(st.sub_blocks_used, 3);
  EXPECT_EQ(st.sub_blocks_free, 1);
  pool.check_invariants();
  pool.remove_sequence(a);  // block 5 still holds b's part 11: it stays split
  st = pool.stats();
  EXPECT_EQ(st.split_blocks, 2);
  EXPECT_EQ(st.sub_blocks_used, 2);
  EXPECT_EQ(pool.sub_blocks_held(b), 2);
  pool.check_invariants();
  pool.remove_sequence(b);
  EXPECT_EQ(pool.used_blocks(), 0);
  EXPECT_EQ(pool.stats().split_blocks, 0);
  pool.check_invariants();
}

TEST(BlockPool, TableWidthLimit) {
  BlockPool pool(100, 16, 1, 1, /*max_blocks_per_table=*/4);
  const auto a = pool.add_sequence();
  pool.resize(a, 0, 64);
  try {
    pool.resize(a, 0, 65);
    FAIL() << "expected pkv::Error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("block-table width 4"), std::string::npos) << e.what();
  }
  EXPECT_EQ(pool.entries(a, 0), 64);
}

TEST(BlockPool, RandomChurnKeepsInvariants) {
  std::mt19937 rng(7);
  BlockPool pool(64, 16, 4, 1);
  std::vector<BlockPool::SeqId> live;
  for (int step = 0; step < 2000; ++step) {
    const int op = int(rng() % 4);
    if (op == 0 || live.empty()) {
      live.push_back(pool.add_sequence());
    } else if (op == 1 && live.size() > 1) {
      const size_t i = rng() % live.size();
      pool.remove_sequence(live[i]);
      live.erase(live.begin() + long(i));
    } else {
      const auto s = live[rng() % live.size()];
      std::vector<int> e(4);
      for (int& x : e) x = int(rng() % 200);
      const int before_free = pool.free_blocks();
      const int need = pool.blocks_needed(s, e);
      try {
        pool.resize_all(s, e);
      } catch (const Error&) {
        EXPECT_EQ(pool.free_blocks(), before_free);  // nothing changed
        EXPECT_GT(need, 0);
      }
    }
    if (step % 50 == 0) pool.check_invariants();
  }
  pool.check_invariants();
  for (auto s : live) pool.remove_sequence(s);
  EXPECT_EQ(pool.free_blocks(), 64);
}


// Head tables under random churn beside shared tables: splits (then the shared table released),
// head resizes, appends and removals over several sequences. Every call either succeeds or throws
// and changes nothing; fits() predicts which; the memory counted per sequence (blocks and
// sub-blocks) sums to what the pool has in use, and every block comes back in the end.
TEST(BlockPool, RandomHeadChurnKeepsInvariants) {
  std::mt19937 rng(11);
  const int H = 4, L = 3, N = 48, bs = 8;
  BlockPool pool(N, bs, L, 4 * 100, 0, H);
  std::vector<BlockPool::SeqId> live;
  std::vector<int> done(6, 0), refused(6, 0);  // per operation
  auto snapshot = [&] {
    const BlockPoolStats st = pool.stats();
    return std::vector<int64_t>{st.used_blocks, st.split_blocks, st.sub_blocks_used, st.sub_blocks_free, st.entries};
  };
  for (int step = 0; step < 3000; ++step) {
    const int op = int(rng() % 6);
    if (op == 0 || live.empty()) {
      live.push_back(pool.add_sequence());
      continue;
    }
    const size_t i = rng() % live.size();
    const auto s = live[i];
    const int l = int(rng() % L);
    const std::vector<int64_t> before = snapshot();
    bool ok = true;
    if (op == 1 && live.size() > 2) {
      pool.remove_sequence(s);
      live.erase(live.begin() + long(i));
      continue;
    } else if (op == 2 && !pool.per_head(s, l)) {
      try {
        if (pool.entries(s, l) == 0) pool.resize(s, l, 1 + int(rng() % 60));
        std::vector<int> e(static_cast<size_t>(H));
        for (int& x : e) x = int(rng() % (pool.entries(s, l) + 1));
        pool.split_heads(s, l, e);
        pool.release_shared(s, l);
      } catch (const Error&) {
        ok = false;
      }
    } else if (op == 3 && pool.per_head(s, l)) {
      const int h = int(rng() % H), want = int(rng() % 70);
      BlockPool::Need need{0, std::max(0, pool.head_blocks_for(want) - int(pool.head_table(s, l, h).size()))};
      const bool fits = pool.fits(need);
      try {
        pool.resize_head(s, l, h, want);
      } catch (const Error&) {
        ok = false;
      }
      EXPECT_EQ(ok, fits) << "step " << step;
    } else {
      const int n = 1 + int(rng() % 9);
      const bool fits = pool.fits(pool.blocks_to_append(s, n));
      try {
        pool.append_all(s, n);
      } catch (const Error&) {
        ok = false;
      }
      EXPECT_EQ(ok, fits) << "step " << step;
    }
    ++(ok ? done : refused)[size_t(op)];
    if (!ok && op != 2) {  // a failed split may follow a resize of an empty layer; the rest change nothing
      EXPECT_EQ(snapshot(), before) << "step " << step;
    }
    if (step % 25 == 0) {
      pool.check_invariants();
      const BlockPoolStats st = pool.stats();
      size_t held = 0;
      int blocks = 0, subs = 0;
      for (auto q : live) held += pool.bytes_held(q), blocks += pool.blocks_held(q), subs += pool.sub_blocks_held(q);
      EXPECT_EQ(subs, st.sub_blocks_used);
      EXPECT_EQ(blocks + st.split_blocks, st.used_blocks);
      EXPECT_EQ(held, size_t(blocks) * pool.bytes_per_block() + size_t(subs) * pool.sub_block_bytes());
      EXPECT_EQ(st.split_blocks * H, st.sub_blocks_used + st.sub_blocks_free);
    }
  }
  pool.check_invariants();
  // Both outcomes of each kind of call happened (the pool was run full).
  for (int op : {2, 3}) {
    EXPECT_GT(done[size_t(op)], 20) << "op " << op;
    EXPECT_GT(refused[size_t(op)], 0) << "op " << op;
  }
  EXPECT_GT(done[4] + done[5], 20);
  EXPECT_GT(refused[4] + refused[5], 0);
  for (auto s : live) pool.remove_sequence(s);
  EXPECT_EQ(pool.free_blocks(), N);
  EXPECT_EQ(pool.stats().split_blocks, 0);
}


// A decode step's eviction in the middle of a long table moves one entry (the last) into the hole,
// not the whole tail; the new map sends every kept logical entry to the slot holding it.
TEST(SlotMoves, OneEvictionMovesOneEntry) {
  const int n = 200;
  std::vector<int32_t> keep;
  for (int i = 0; i < n; ++i)
    if (i != 120) keep.push_back(i);
  std::vector<int32_t> map, src, dst;
  plan_slot_moves(map, n, keep, 120, src, dst);
  ASSERT_EQ(src.size(), 1u);
  EXPECT_EQ(src[0], n - 1);
  EXPECT_EQ(dst[0], 120);
  // logical 0..119 stay, 120..197 are the old 121..198 (unmoved slots), 198 (old 199) sits in 120
  ASSERT_EQ(map.size(), size_t(n - 1));
  EXPECT_EQ(slot_of(map, 119), 119);
  EXPECT_EQ(slot_of(map, 120), 121);
  EXPECT_EQ(slot_of(map, 197), 198);
  EXPECT_EQ(slot_of(map, 198), 120);
  // Evicting the last entry, or nothing, moves nothing and keeps the identity (an empty map).
  std::vector<int32_t> all_but_last(static_cast<size_t>(n - 1));
  std::iota(all_but_last.begin(), all_but_last.end(), 0);
  std::vector<int32_t> map2, src2, dst2;
  plan_slot_moves(map2, n, all_but_last, n - 1, src2, dst2);
  EXPECT_TRUE(src2.empty());
  EXPECT_TRUE(map2.empty());
}

// Random maps and keep lists: simulate the slots and check that the moves land every kept entry
// where the new map says, that only slots below the new length are written, and that no slot is
// both read and written.
TEST(SlotMoves, RandomMapsAndKeepsAreConsistent) {
  std::mt19937 rng(7);
  for (int trial = 0; trial < 300; ++trial) {
    const int n = 1 + int(rng() % 60);
    std::vector<int32_t> map;
    const int mapped = int(rng() % (n + 1));
    map.resize(size_t(mapped));
    std::iota(map.begin(), map.end(), 0);
    std::shuffle(map.begin(), map.end(), rng);
    std::vector<int32_t> slot_holds(static_cast<size_t>(n));  // which logical entry each slot holds
    for (int i = 0; i < n; ++i) slot_holds[size_t(slot_of(map, i))] = i;
    std::vector<int32_t> keep;
    for (int i = 0; i < n; ++i)
      if (rng() % 3 != 0) keep.push_back(i);
    int first = 0;  // the identity prefix, as GpuKVPool::compact passes it (or less: any prefix of it)
    while (first < int(keep.size()) && keep[size_t(first)] == first) ++first;
    if (trial % 2) first = int(rng() % uint32_t(first + 1));
    std::vector<int32_t> new_map = map, src{-7}, dst{-7};  // appended to
    plan_slot_moves(new_map, n, keep, first, src, dst);
    ASSERT_EQ(src.front(), -7);
    ASSERT_EQ(src.size(), dst.size());
    src.erase(src.begin()), dst.erase(dst.begin());
    const int k = int(keep.size());
    std::set<int32_t> srcs(src.begin(), src.end()), dsts(dst.begin(), dst.end());
    ASSERT_EQ(srcs.size(), src.size());
    ASSERT_EQ(dsts.size(), dst.size());
    std::vector<int32_t> after = slot_holds;
    for (size_t i = 0; i < src.size(); ++i) {
      ASSERT_GE(src[i], k);
      ASSERT_LT(dst[i], k);
      ASSERT_EQ(srcs.count(dst[i]), 0u);
      after[size_t(dst[i])] = slot_holds[size_t(src[i])];
    }
    ASSERT_LE(new_map.size(), size_t(k));
    if (!new_map.empty()) {
      EXPECT_NE(new_map.back(), int32_t(new_map.size() - 1)) << "trailing identity not trimmed";
    }
    for (int m = 0; m < k; ++m) EXPECT_EQ(after[size_t(slot_of(new_map, m))], keep[size_t(m)]) << "trial " << trial;
    // The pool accepts the map once the table has the new length.
    BlockPool pool(64, 4, 1, 1);
    const BlockPool::SeqId s = pool.add_sequence();
    pool.resize(s, 0, n);
    pool.set_slot_map(s, 0, map);
    pool.set_slot_map(s, 0, new_map);
    pool.resize(s, 0, k);
    pool.check_invariants();
    EXPECT_EQ(pool.slot_map(s, 0), new_map);
  }
}

}  // namespace
}  // namespace pkv
