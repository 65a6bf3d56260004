// Paged KV kernel bodies (internal to src/ops/cuda/): row writes and reads, compaction, Elastic merge.
// Same conventions as attention_body.h (a thread context `c`, the plan's parameters); none of these
// needs a barrier.
#pragma once
#include <cstdint>

#include "ops/cuda/kernel_types.h"
#include "ops/cuda/paged_head.h"
#include "ops/cuda/plan.h"
#include "ops/kv_merge.h"

namespace pkv::cuda::detail {

// Block id of entry e of table t, or -1 (error flag set) when the table or entry is out of range.
__device__ __forceinline__ int paged_block_of(const PagedParams& p, int t, int e) {
  if (t < 0 || e < 0 || e >= p.table_stride * p.block_size) {
    if (p.error_flag) atomicOr(p.error_flag, kPagedBadEntry);
    return -1;
  }
  const int blk = p.tables[int64_t(t) * p.table_stride + e / p.block_size];
  if (blk < 0 || blk >= p.n_blocks) {
    if (p.error_flag) atomicOr(p.error_flag, kPagedBadBlock);
    return -1;
  }
  return blk;
}

// Row r of a write/read call: its K row in the pool (V is block_size * kv_dim further), and the
// index of its position in `positions`; null (error flag set) when its table or entry is bad.
template <class T>
__device__ __forceinline__ T* paged_row(const PagedParams& p, int r, int64_t* pos_index) {
  const int blk = paged_block_of(p, p.row_table[r], p.row_entry[r]);
  if (blk < 0) return nullptr;
  const int slot = p.row_entry[r] % p.block_size;
  *pos_index = int64_t(blk) * p.block_size + slot;
  return static_cast<T*>(p.pool) + (int64_t(blk) * 2 * p.block_size + slot) * p.kv_dim;
}

// Block (r, y) writes elements [y * kPagedThreads * 8, (y + 1) * kPagedThreads * 8) of row r (K and V
// converted from S to T; 8 consecutive elements per thread, all loaded before any is stored, so a
// row costs about one memory round trip), and block (r, 0) its position.
template <class T, class S, class Ctx>
__device__ void paged_write(Ctx& c, const PagedParams& p) {
  const int r = c.bx;
  int64_t pos_index = 0;
  T* k = paged_row<T>(p, r, &pos_index);
  if (!k) return;
  T* v = k + int64_t(p.block_size) * p.kv_dim;
  const S* sk = static_cast<const S*>(p.src_k) + int64_t(r) * p.src_stride;
  const S* sv = static_cast<const S*>(p.src_v) + int64_t(r) * p.src_stride;
  const int i0 = (c.by * kPagedThreads + c.tid) * 8;
  float kf[8], vf[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    const int i = i0 + e;
    kf[e] = i < p.kv_dim ? to_f(sk[i]) : 0.f;
    vf[e] = i < p.kv_dim ? to_f(sv[i]) : 0.f;
  }
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    const int i = i0 + e;
    if (i < p.kv_dim) {
      k[i] = from_f<T>(kf[e]);
      v[i] = from_f<T>(vf[e]);
    }
  }
  if (c.by == 0 && c.tid == 0) p.positions[pos_index] = p.src_pos[r];
}

// RoPE + write (paged_kv_rope_write). Block (r, y): thread t = y * kPagedThreads + tid rotates pair
// t of row r's q and k heads (head t / half, dims i and i + half) or, past them, copies v elements
// 2u and 2u + 1; thread 0 stores the position. kv_dim is even (plan_paged_rope_write checks it).
template <class T, class Ctx>
__device__ void paged_rope_write(Ctx& c, const PagedParams& p) {
  const int r = c.bx;
  const int half = p.head_dim / 2;
  const int rot = (p.n_heads + p.n_kv_heads) * half;
  const int t = c.by * kPagedThreads + c.tid;
  if (t >= rot + p.kv_dim / 2) return;
  // A row with head tables: KV head g's K and V go to the last entry of its own table.
  const bool ph = p.head_flags && p.head_flags[r];
  auto head_row = [&](int g) -> T* {
    const int row = r * p.n_kv_heads + g;
    const int64_t off = paged_head_offset(p.head_tables, p.table_stride, p.n_blocks, p.block_size, p.kv_dim,
                                          p.n_kv_heads, p.error_flag, row, p.head_lengths[row] - 1);
    return off < 0 ? nullptr : static_cast<T*>(p.pool) + off;
  };
  int64_t pos_index = 0;
  T* k = nullptr;
  if (!ph) {
    k = paged_row<T>(p, r, &pos_index);
    if (!k) return;
  }
  T* v = ph ? nullptr : k + int64_t(p.block_size) * p.kv_dim;
  const float* x = static_cast<const float*>(p.src_k) + int64_t(r) * p.src_stride;
  if (t < rot) {
    const int h = t / half, i = t % half;
    const float ang = float(p.src_pos[r]) * p.inv_freq[i];  // float32 product, as rope()
    float sn, cs;
    sincosf(ang, &sn, &cs);
    const float* xh = x + int64_t(h) * p.head_dim;
    const float a = xh[i], b = xh[i + half];
    const float y0 = a * cs - b * sn, y1 = b * cs + a * sn;
    T* dst = h < p.n_heads ? static_cast<T*>(p.q_out) + int64_t(r) * p.q_out_stride + int64_t(h) * p.head_dim
             : ph          ? head_row(h - p.n_heads)
                           : k + int64_t(h - p.n_heads) * p.head_dim;
    if (!dst) return;
    dst[i] = from_f<T>(y0);
    dst[i + half] = from_f<T>(y1);
  } else {
    const int j = 2 * (t - rot);
    const float* xv = x + int64_t(p.n_heads + p.n_kv_heads) * p.head_dim;
    T* vd = v + j;
    if (ph) {  // head_dim is even: the pair (j, j + 1) lies in one head
      T* hk = head_row(j / p.head_dim);
      if (!hk) return;
      vd = hk + int64_t(p.block_size) * p.kv_dim + j % p.head_dim;
    }
    vd[0] = from_f<T>(xv[j]);
    vd[1] = from_f<T>(xv[j + 1]);
  }
  if (t == 0 && !ph) p.positions[pos_index] = p.src_pos[r];
}

// Block r reads row r into dense rows (in the pool's type).
template <class T, class Ctx>
__device__ void paged_read(Ctx& c, const PagedParams& p) {
  const int r = c.bx;
  int64_t pos_index = 0;
  const T* k = paged_row<T>(p, r, &pos_index);
  if (!k) return;
  const T* v = k + int64_t(p.block_size) * p.kv_dim;
  for (int i = c.tid; i < p.kv_dim; i += kPagedThreads) {
    if (p.dst_k) static_cast<T*>(p.dst_k)[int64_t(r) * p.kv_dim + i] = k[i];
    if (p.dst_v) static_cast<T*>(p.dst_v)[int64_t(r) * p.kv_dim + i] = v[i];
  }
  if (c.tid == 0 && p.dst_pos) p.dst_pos[r] = p.positions[pos_index];
}

// Word index (32-bit words = two elements) of word w of tensor (0 = K, 1 = V) of entry e of table t,
// or -1. *slot_index: the entry's index in `positions`.
__device__ __forceinline__ int64_t paged_word(const PagedParams& p, int t, int e, int tensor, int w, int64_t* slot_index) {
  const int blk = paged_block_of(p, t, e);
  if (blk < 0) return -1;
  const int slot = e % p.block_size;
  *slot_index = int64_t(blk) * p.block_size + slot;
  return ((int64_t(blk) * 2 * p.block_size + int64_t(tensor) * p.block_size + slot) * p.kv_dim) / 2 + w;
}

// Compaction. Block (bx, by) = (job, group of 128 words); thread x handles word x of K (x < W) or
// word x - W of V of EVERY entry of its job's list, in order. Without dest: entry m <- entry keep[m];
// keep is strictly increasing, so keep[m] >= m: a step never overwrites a word that a later step
// still has to read (exactly memmove's forward copy), and no other thread touches this word column.
// With dest: entry dest[i] <- entry keep[i], independent moves. Reads are batched 8 at a time before
// the writes (ordered lists: sources keep[m..m+7] >= m + 7 >= every target of the batch, so the
// batch still reads only original values; moves: no target is a source).
template <class Ctx>
__device__ void paged_compact(Ctx& c, const PagedParams& p) {
  constexpr int U = 8;
  const int job = c.bx;
  const int W = p.kv_dim / 2;
  const int x = c.by * kPagedThreads + c.tid;
  if (x >= 2 * W) return;
  const int tensor = x / W, w = x % W;
  const bool moves_positions = x == 0;
  const int t = p.job_table[job];
  const int* keep = p.keep + p.keep_offsets[job];
  const int* dest = p.dest ? p.dest + p.keep_offsets[job] : nullptr;
  const int n_keep = p.keep_offsets[job + 1] - p.keep_offsets[job];
  uint32_t* pool = static_cast<uint32_t*>(p.pool);
  for (int m0 = 0; m0 < n_keep; m0 += U) {
    uint32_t val[U];
    int64_t dst[U], dst_slot[U];
    int32_t pos[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      dst[u] = -1;
      const int m = m0 + u;
      if (m >= n_keep) continue;
      const int src = keep[m];
      const int to = dest ? dest[m] : m;
      if (src == to) continue;  // already in place
      int64_t src_slot = 0;
      const int64_t sw = paged_word(p, t, src, tensor, w, &src_slot);
      const int64_t dw = paged_word(p, t, to, tensor, w, &dst_slot[u]);
      if (sw < 0 || dw < 0) continue;
      val[u] = pool[sw];
      if (moves_positions) pos[u] = p.positions[src_slot];
      dst[u] = dw;
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (dst[u] < 0) continue;
      pool[dst[u]] = val[u];
      if (moves_positions) p.positions[dst_slot[u]] = pos[u];
    }
  }
}

// Head-table compaction (PagedHeadJobs). Block (bx, by) = (job, group of 128 words); thread x
// handles word x of K (x < W = head_dim / 2) or word x - W of V of one head's entry, walking its
// job's entries in order; reads batched 8 at a time before the writes (in place, sources keep[m..]
// >= m: the same argument as paged_compact; a split writes other blocks than it reads).
template <class Ctx>
__device__ void paged_head_compact(Ctx& c, const PagedParams& p) {
  constexpr int U = 8;
  const int job = c.bx;
  const int hd = p.head_dim, W = hd / 2;
  const int x = c.by * kPagedThreads + c.tid;
  if (x >= 2 * W) return;
  const int tensor = x / W, w = x % W;
  const int src = p.job_src[job], g = p.job_src_head[job], dst = p.job_dst[job];
  const int* keep = p.keep + p.keep_offsets[job];
  const int n_keep = p.keep_offsets[job + 1] - p.keep_offsets[job];
  const int64_t tensor_off = int64_t(tensor) * p.block_size * p.kv_dim;
  uint32_t* pool = static_cast<uint32_t*>(p.pool);
  for (int m0 = 0; m0 < n_keep; m0 += U) {
    uint32_t val[U];
    int64_t to[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      to[u] = -1;
      const int m = m0 + u;
      if (m >= n_keep) continue;
      const int e = keep[m];
      if (g < 0 && src == dst && e == m) continue;  // already in place
      int64_t from = -1;
      if (g < 0) {
        from = paged_head_offset(p.tables, p.table_stride, p.n_blocks, p.block_size, p.kv_dim, p.n_kv_heads,
                                 p.error_flag, src, e);
      } else {
        const int blk = paged_block_of(p, src, e);
        if (blk >= 0) from = (int64_t(blk) * 2 * p.block_size + e % p.block_size) * p.kv_dim + int64_t(g) * hd;
      }
      const int64_t d = paged_head_offset(p.tables, p.table_stride, p.n_blocks, p.block_size, p.kv_dim,
                                          p.n_kv_heads, p.error_flag, dst, m);
      if (from < 0 || d < 0) continue;
      val[u] = pool[(from + tensor_off) / 2 + w];
      to[u] = (d + tensor_off) / 2 + w;
    }
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (to[u] >= 0) pool[to[u]] = val[u];
  }
}

// Elastic merge. Same thread layout as compaction. Kept entry m's group is the index range
// [lo, hi] of the entries nearest to keep[m] (ops/kv_merge.h, the rule the CPU cache uses too).
// Groups are disjoint and each group's mean is written to its own kept entry only, so the order of
// the work does not matter. Sums in float32, mean rounded once to the pool's type.
template <class T, class Ctx>
__device__ void paged_merge(Ctx& c, const PagedParams& p) {
  const int job = c.bx;
  const int W = p.kv_dim / 2;
  const int x = c.by * kPagedThreads + c.tid;
  if (x >= 2 * W) return;
  const int tensor = x / W, w = x % W;
  const int t = p.job_table[job];
  const int* keep = p.keep + p.keep_offsets[job];
  const int n_keep = p.keep_offsets[job + 1] - p.keep_offsets[job];
  const int N = p.lengths[job];
  const int so = p.slots ? p.slot_offsets[job] : -1;
  const int* slot = so >= 0 ? p.slots + so : nullptr;  // logical entry -> slot (null: the same)
  uint32_t* pool = static_cast<uint32_t*>(p.pool);
  for (int m = 0; m < n_keep; ++m) {
    const int lo = ops::merge_group_lo(keep, m);
    const int hi = ops::merge_group_hi(keep, m, n_keep, N);
    if (hi <= lo) continue;  // a group of one: unchanged
    float s0 = 0.f, s1 = 0.f;
    int64_t where = 0;
    for (int i = lo; i <= hi; ++i) {
      const int64_t wi = paged_word(p, t, slot ? slot[i] : i, tensor, w, &where);
      if (wi < 0) continue;
      float a, b;
      unpack2<T>(pool[wi], a, b);
      s0 += a;
      s1 += b;
    }
    const float cnt = float(hi - lo + 1);
    const int64_t wk = paged_word(p, t, slot ? slot[keep[m]] : keep[m], tensor, w, &where);
    if (wk >= 0) pool[wk] = pack2<T>(s0 / cnt, s1 / cnt);
  }
}

}  // namespace pkv::cuda::detail
