// Attention kernel bodies (internal to src/ops/cuda/). Each body is a function of a thread context `c`
// (c.tid, c.bx/by/bz, c.smem, c.sync(), c.sync_or(), c.warp_sync(), c.shfl_xor()) and of the plan's
// parameters (plan.h). attention.cu wraps them in __global__ kernels with a context of CUDA
// intrinsics; the CPU emulation test runs the very same bodies with a context of cooperative threads.
//
// Scores are kept in the log2 domain: q is pre-scaled by scale * log2(e), probabilities are
// exp2(s - max), the saved log-sum-exp is log2-based. Every score of (query i, key j) is computed by
// the same sequential fmaf chain over the head dims in the forward and in the importance pass, so
// the probabilities the importance pass recomputes are those the forward pass normalised.
#pragma once
#include <climits>
#include <cmath>
#include <cstdint>

#include "ops/cuda/kernel_types.h"
#include "ops/cuda/paged_head.h"
#include "ops/cuda/plan.h"

namespace pkv::cuda::detail {

// N (4 or 8) consecutive 16-bit elements of shared memory (8-byte / 16-byte aligned) as floats.
template <class T, int N>
__device__ __forceinline__ void load_f(const T* src, float* out) {
  static_assert(N == 4 || N == 8, "4 or 8 elements");
  if constexpr (N == 8) {
    const uint4 w = *reinterpret_cast<const uint4*>(src);
    unpack2<T>(w.x, out[0], out[1]);
    unpack2<T>(w.y, out[2], out[3]);
    unpack2<T>(w.z, out[4], out[5]);
    unpack2<T>(w.w, out[6], out[7]);
  } else {
    const uint2 w = *reinterpret_cast<const uint2*>(src);
    unpack2<T>(w.x, out[0], out[1]);
    unpack2<T>(w.y, out[2], out[3]);
  }
}

// s[a][b] = sum over head dims of Qs[c][row a] * Ks[c][key b], for this thread's 4 rows x 8 keys.
template <int QS, int KS, class T>
__device__ __forceinline__ void prefill_tile_scores(const float* Qs, const T* Ks, int ty, int tx, int hd,
                                                    float (&s)[4][8]) {
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int b = 0; b < 8; ++b) s[a][b] = 0.f;
#pragma unroll 2
  for (int cc = 0; cc < hd; ++cc) {
    const float4 qa = *reinterpret_cast<const float4*>(Qs + cc * QS + ty * 4);
    float kv[8];
    load_f<T, 8>(Ks + cc * KS + tx * 8, kv);
    const float qv[4] = {qa.x, qa.y, qa.z, qa.w};
#pragma unroll
    for (int a = 0; a < 4; ++a)
#pragma unroll
      for (int b = 0; b < 8; ++b) s[a][b] = fmaf(qv[a], kv[b], s[a][b]);
  }
}

// Loads the query tile [q0, q0 + BQ) of head h, scaled, transposed into Qs[c][r] (zeros outside).
template <class T, int D, int QS, class Ctx>
__device__ __forceinline__ void prefill_load_q(Ctx& c, const PrefillParams& p, int q0, int h, float* Qs) {
  const T* q = static_cast<const T*>(p.q);
  for (int idx = c.tid; idx < kPrefillBQ * D; idx += kPrefillThreads) {
    const int r = idx / D, cc = idx % D, i = q0 + r;
    float x = 0.f;
    if (i < p.n_q && cc < p.head_dim) x = to_f(q[int64_t(i) * p.q_stride + int64_t(h) * p.head_dim + cc]) * p.scale_log2;
    Qs[cc * QS + r] = x;
  }
}

// Loads the key tile [k0, k0 + BK) of kv head g (keys >= kv_end as zeros), transposed into
// Ks[c][j]; with Vs != nullptr also the values into Vs[j][c]. Both in the inputs' 16-bit type.
template <class T, int D, int KS, class Ctx>
__device__ __forceinline__ void prefill_load_kv(Ctx& c, const PrefillParams& p, int k0, int kv_end, int g, T* Ks,
                                                T* Vs) {
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  const T zero = from_f<T>(0.f);
  for (int idx = c.tid; idx < kPrefillBK * D; idx += kPrefillThreads) {
    const int j = idx / D, cc = idx % D, key = k0 + j;
    T kx = zero, vx = zero;
    if (key < kv_end && cc < p.head_dim) {
      const int64_t off = int64_t(key) * p.kv_stride + int64_t(g) * p.head_dim + cc;
      kx = k[off];
      if (Vs) vx = v[off];
    }
    Ks[cc * KS + j] = kx;
    if (Vs) Vs[j * D + cc] = vx;
  }
}

// The end of the keys the query tile [q0, q0 + BQ) can see: keys past the last position any of its
// queries can see are skipped (kv_pos ascending); every key without positions.
__host__ __device__ inline int prefill_visible_end(const PrefillParams& p, int q0) {
  if (p.q_pos == nullptr) return p.n_kv;
  int mx = INT_MIN;
  for (int r = 0; r < kPrefillBQ && q0 + r < p.n_q; ++r) mx = p.q_pos[q0 + r] > mx ? p.q_pos[q0 + r] : mx;
  int lo = 0, hi = p.n_kv;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (p.kv_pos[mid] <= mx) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

// Forward pass. Block (bx, by) = (query tile, head).
template <class T, int D, class Ctx>
__device__ void prefill_forward(Ctx& c, const PrefillParams& p) {
  using L = PrefillForwardLayout<D>;
  constexpr int BK = kPrefillBK, DT = D / 8;
  float* smem = reinterpret_cast<float*>(c.smem);
  float* Qs = smem + L::q;
  T* Ks = reinterpret_cast<T*>(smem + L::k);
  T* Vs = reinterpret_cast<T*>(smem + L::v);
  float* Ps = smem + L::p;
  int* kpos = reinterpret_cast<int*>(smem + L::kpos);
  int* misc = reinterpret_cast<int*>(smem + L::misc);

  const int tid = c.tid, ty = tid / 8, tx = tid % 8;
  const int q0 = c.bx * kPrefillBQ, h = c.by, g = h / p.group;
  const bool causal = p.q_pos != nullptr;

  prefill_load_q<T, D, L::QS>(c, p, q0, h, Qs);
  if (tid == 0) misc[0] = prefill_visible_end(p, q0);
  bool row_ok[4];
  int qp[4];
#pragma unroll
  for (int a = 0; a < 4; ++a) {
    const int i = q0 + ty * 4 + a;
    row_ok[a] = i < p.n_q;
    qp[a] = causal && row_ok[a] ? p.q_pos[i] : INT_MAX;
  }
  c.sync();
  const int kv_end = misc[0];

  float o[4][DT], m[4], l[4];
#pragma unroll
  for (int a = 0; a < 4; ++a) {
    m[a] = -INFINITY;
    l[a] = 0.f;
#pragma unroll
    for (int d = 0; d < DT; ++d) o[a][d] = 0.f;
  }

  for (int k0 = 0; k0 < kv_end; k0 += BK) {
    prefill_load_kv<T, D, L::KS>(c, p, k0, kv_end, g, Ks, Vs);
    for (int j = tid; j < BK; j += kPrefillThreads) kpos[j] = causal && k0 + j < kv_end ? p.kv_pos[k0 + j] : 0;
    c.sync();

    float s[4][8];
    prefill_tile_scores<L::QS, L::KS>(Qs, Ks, ty, tx, p.head_dim, s);

    // Online softmax over this tile, per row; a row's 8 threads (tx) are adjacent lanes of a warp.
#pragma unroll
    for (int a = 0; a < 4; ++a) {
      float mt = -INFINITY;
#pragma unroll
      for (int b = 0; b < 8; ++b) {
        const int j = tx * 8 + b;
        const bool ok = row_ok[a] && k0 + j < kv_end && (!causal || kpos[j] <= qp[a]);
        s[a][b] = ok ? s[a][b] : -INFINITY;
        mt = fmaxf(mt, s[a][b]);
      }
      mt = fmaxf(mt, c.shfl_xor(mt, 1));
      mt = fmaxf(mt, c.shfl_xor(mt, 2));
      mt = fmaxf(mt, c.shfl_xor(mt, 4));
      const float m_new = fmaxf(m[a], mt);
      const float alpha = m_new == -INFINITY ? 1.f : exp2f(m[a] - m_new);
      float sum = 0.f;
#pragma unroll
      for (int b = 0; b < 8; ++b) {
        const float pv = s[a][b] == -INFINITY ? 0.f : exp2f(s[a][b] - m_new);
        Ps[(ty * 4 + a) * L::PS + tx * 8 + b] = pv;
        sum += pv;
      }
      sum += c.shfl_xor(sum, 1);
      sum += c.shfl_xor(sum, 2);
      sum += c.shfl_xor(sum, 4);
      l[a] = l[a] * alpha + sum;
      m[a] = m_new;
#pragma unroll
      for (int d = 0; d < DT; ++d) o[a][d] *= alpha;
    }
    c.sync();

    // O[rows, my dims] += P[rows, keys] * V[keys, my dims]
    const int kn = kv_end - k0 < BK ? kv_end - k0 : BK;
    for (int j = 0; j < kn; ++j) {
      float pj[4];
#pragma unroll
      for (int a = 0; a < 4; ++a) pj[a] = Ps[(ty * 4 + a) * L::PS + j];
      const T* vr = Vs + j * D + tx * DT;
      constexpr int VN = DT % 8 == 0 ? 8 : 4;
#pragma unroll
      for (int d4 = 0; d4 < DT; d4 += VN) {
        float vv[VN];
        load_f<T, VN>(vr + d4, vv);
#pragma unroll
        for (int e = 0; e < VN; ++e)
#pragma unroll
          for (int a = 0; a < 4; ++a) o[a][d4 + e] = fmaf(pj[a], vv[e], o[a][d4 + e]);
      }
    }
    c.sync();  // Ks, Vs, Ps are reloaded next
  }

  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int a = 0; a < 4; ++a) {
    const int i = q0 + ty * 4 + a;
    if (!row_ok[a]) continue;
    const float inv = l[a] > 0.f ? 1.f / l[a] : 0.f;
#pragma unroll
    for (int d = 0; d < DT; ++d) {
      const int col = tx * DT + d;
      if (col < p.head_dim) out[int64_t(i) * p.out_stride + int64_t(h) * p.head_dim + col] = from_f<T>(o[a][d] * inv);
    }
    if (p.lse && tx == 0) p.lse[int64_t(h) * p.n_q + i] = l[a] > 0.f ? m[a] + log2f(l[a]) : -INFINITY;
  }
}

// The rows of query tile [q0, q0 + BQ) that count for head h's importance, in shared memory (this
// thread's share: rows tid, tid + kPrefillThreads, ...): their saved log-sum-exp, position (INT_MAX
// without positions) and whether they count (from importance_from on, saw some key). True when one
// of this thread's rows counts and can see the key tile starting at first_key_pos.
__host__ __device__ inline bool prefill_importance_rows(const PrefillParams& p, int q0, int h, int first_key_pos, int tid,
                                                        float* lse_s, int* qpos_s, int* rowok_s) {
  const bool causal = p.q_pos != nullptr;
  bool any = false;
  for (int r = tid; r < kPrefillBQ; r += kPrefillThreads) {
    const int i = q0 + r;
    bool ok = i >= p.importance_from && i < p.n_q;
    const float lse = ok ? p.lse[int64_t(h) * p.n_q + i] : -INFINITY;
    ok = ok && lse != -INFINITY;  // a row that saw no key contributes nothing
    const int qpos = ok && causal ? p.q_pos[i] : INT_MAX;
    lse_s[r] = lse;
    qpos_s[r] = qpos;
    rowok_s[r] = ok ? 1 : 0;
    any = any || (ok && (!causal || qpos >= first_key_pos));
  }
  return any;
}

// The importance passes' views of their shared memory (PrefillImportanceLayout), with the positions
// of the block's key tile [k0, k0 + BK) loaded into kpos (read after the next barrier) and the tile's
// smallest position.
template <class T, int D>
struct ImportanceSmem {
  using L = PrefillImportanceLayout<D>;
  float *Qs, *red, *lse_s;
  T* Ks;
  int *qpos_s, *rowok_s, *kpos;
  int first_key_pos;
  template <class Ctx>
  __device__ ImportanceSmem(Ctx& c, const PrefillParams& p, int k0) {
    float* smem = reinterpret_cast<float*>(c.smem);
    Qs = smem + L::q, red = smem + L::red, lse_s = smem + L::lse;
    Ks = reinterpret_cast<T*>(smem + L::k);
    qpos_s = reinterpret_cast<int*>(smem + L::qpos), rowok_s = reinterpret_cast<int*>(smem + L::rowok);
    kpos = reinterpret_cast<int*>(smem + L::kpos);
    const bool causal = p.q_pos != nullptr;
    for (int j = c.tid; j < kPrefillBK; j += kPrefillThreads) kpos[j] = causal && k0 + j < p.n_kv ? p.kv_pos[k0 + j] : 0;
    first_key_pos = causal ? p.kv_pos[k0] : 0;
  }
  // f(a, b, probability) for each of this thread's 4 rows x 8 keys (scores s, log2 domain) where the
  // row counts (rowok_s, lse_s, qpos_s of the current query tile) and sees the key.
  template <class F>
  __device__ __forceinline__ void probabilities(const float (&s)[4][8], int ty, int tx, int k0, int n_kv, bool causal,
                                                F f) const {
#pragma unroll
    for (int a = 0; a < 4; ++a) {
      const int r = ty * 4 + a;
      if (!rowok_s[r]) continue;
      const float lse = lse_s[r];
      const int qpos = qpos_s[r];
#pragma unroll
      for (int b = 0; b < 8; ++b) {
        const int j = tx * 8 + b;
        if (k0 + j < n_kv && (!causal || kpos[j] <= qpos)) f(a, b, exp2f(s[a][b] - lse));
      }
    }
  }
  // The 16 row groups' values of each key (this thread's col[8]: keys tx*8 ..) combined in a fixed
  // order by op (from `init`); out(key, value) for each key of the tile below n_kv.
  template <class Ctx, class Op, class Out>
  __device__ void columns(Ctx& c, const float (&col)[8], int k0, int n_kv, float init, Op op, Out out) {
    const int ty = c.tid / 8, tx = c.tid % 8;
    c.sync();
#pragma unroll
    for (int b = 0; b < 8; ++b) red[ty * kPrefillBK + tx * 8 + b] = col[b];
    c.sync();
    for (int j = c.tid; j < kPrefillBK; j += kPrefillThreads) {
      if (k0 + j >= n_kv) continue;
      float v = init;
      for (int t = 0; t < 16; ++t) v = op(v, red[t * kPrefillBK + j]);
      out(k0 + j, v);
    }
  }
};

// Importance pass. Block (bx, by) = (key tile, head): recomputes the scores of its 64 keys against
// every query tile that counts (rows i >= importance_from that can see some key of the tile), turns
// them into probabilities with the saved log-sum-exp, and writes the per-head column sums to
// partial[h, keys]. No atomics: deterministic.
template <class T, int D, class Ctx>
__device__ void prefill_importance(Ctx& c, const PrefillParams& p) {
  using L = PrefillImportanceLayout<D>;
  constexpr int BQ = kPrefillBQ, BK = kPrefillBK;
  const int tid = c.tid, ty = tid / 8, tx = tid % 8;
  const int k0 = c.bx * BK, h = c.by, g = h / p.group;
  const bool causal = p.q_pos != nullptr;
  ImportanceSmem<T, D> sm(c, p, k0);

  prefill_load_kv<T, D, L::KS>(c, p, k0, p.n_kv, g, sm.Ks, nullptr);

  float col[8];
#pragma unroll
  for (int b = 0; b < 8; ++b) col[b] = 0.f;

  for (int q0 = (p.importance_from / BQ) * BQ; q0 < p.n_q; q0 += BQ) {
    c.sync();  // the previous tile's Qs, lse_s, qpos_s are no longer read
    const bool any = prefill_importance_rows(p, q0, h, sm.first_key_pos, tid, sm.lse_s, sm.qpos_s, sm.rowok_s);
    prefill_load_q<T, D, L::QS>(c, p, q0, h, sm.Qs);
    if (!c.sync_or(any)) continue;  // (also the barrier after the loads)

    float s[4][8];
    prefill_tile_scores<L::QS, L::KS>(sm.Qs, sm.Ks, ty, tx, p.head_dim, s);
    sm.probabilities(s, ty, tx, k0, p.n_kv, causal, [&](int, int b, float pr) { col[b] += pr; });
  }

  // Column sums over the 16 row groups, in a fixed order.
  sm.columns(c, col, k0, p.n_kv, 0.f, [](float a, float b) { return a + b; },
             [&](int key, float v) { p.partial[int64_t(h) * p.n_kv + key] = v; });
}

// importance[j] += sum over heads of partial[h, j] / n_heads. One thread per key (block of 256).
template <class Ctx>
__device__ void prefill_importance_reduce(Ctx& c, const PrefillParams& p) {
  const int j = c.bx * 256 + c.tid;
  if (j >= p.n_kv) return;
  float sum = 0.f;
  if (p.importance_per_kv_head) {  // KV head by's row: the mean over its group's query heads
    const int g = c.by;
    for (int h = g * p.group; h < (g + 1) * p.group; ++h) sum += p.partial[int64_t(h) * p.n_kv + j];
    p.importance[int64_t(g) * p.n_kv + j] += sum / float(p.group);
    return;
  }
  if (p.importance_weight) {  // the extended importance: each head's sum times its value weight
    for (int h = 0; h < p.n_heads; ++h)
      sum = fmaf(p.partial[int64_t(h) * p.n_kv + j], p.importance_weight[int64_t(h) * p.n_kv + j], sum);
  } else {
    for (int h = 0; h < p.n_heads; ++h) sum += p.partial[int64_t(h) * p.n_kv + j];
  }
  p.importance[j] += sum / float(p.n_heads);
}

// The extended importance's maximum over queries (kernels.h, importance_max). Block (bx, by) = (key
// tile, group by of query tiles: by, by + max_groups, ...): for each query tile, every head's
// probabilities (recomputed from the saved log-sum-exp, as prefill_importance does) times the
// head's value weight are summed per (query, key) in head order; the tile's largest over its counted
// rows joins the key's maximum. partial[by, keys] = the group's maxima / n_heads (the head mean).
template <class T, int D, class Ctx>
__device__ void prefill_importance_max(Ctx& c, const PrefillParams& p) {
  using L = PrefillImportanceLayout<D>;
  constexpr int BQ = kPrefillBQ, BK = kPrefillBK;
  const int tid = c.tid, ty = tid / 8, tx = tid % 8;
  const int k0 = c.bx * BK;
  const bool causal = p.q_pos != nullptr;
  ImportanceSmem<T, D> sm(c, p, k0);

  float mx[8];
#pragma unroll
  for (int b = 0; b < 8; ++b) mx[b] = 0.f;
  int loaded_g = -1;
  for (int q0 = (p.importance_from / BQ + c.by) * BQ; q0 < p.n_q; q0 += p.max_groups * BQ) {
    float acc[4][8];
#pragma unroll
    for (int a = 0; a < 4; ++a)
#pragma unroll
      for (int b = 0; b < 8; ++b) acc[a][b] = 0.f;
    for (int h = 0; h < p.n_heads; ++h) {
      const int g = h / p.group;
      c.sync();  // the previous head's Qs, Ks, lse_s, qpos_s are no longer read
      if (g != loaded_g) {
        prefill_load_kv<T, D, L::KS>(c, p, k0, p.n_kv, g, sm.Ks, nullptr);
        loaded_g = g;
      }
      const bool any = prefill_importance_rows(p, q0, h, sm.first_key_pos, tid, sm.lse_s, sm.qpos_s, sm.rowok_s);
      prefill_load_q<T, D, L::QS>(c, p, q0, h, sm.Qs);
      if (!c.sync_or(any)) continue;  // (also the barrier after the loads)

      float s[4][8], w[8];
#pragma unroll
      for (int b = 0; b < 8; ++b) {
        const int key = k0 + tx * 8 + b;
        w[b] = p.importance_weight && key < p.n_kv ? p.importance_weight[int64_t(h) * p.n_kv + key] : 1.f;
      }
      prefill_tile_scores<L::QS, L::KS>(sm.Qs, sm.Ks, ty, tx, p.head_dim, s);
      sm.probabilities(s, ty, tx, k0, p.n_kv, causal, [&](int a, int b, float pr) { acc[a][b] = fmaf(w[b], pr, acc[a][b]); });
    }
#pragma unroll
    for (int a = 0; a < 4; ++a)
#pragma unroll
      for (int b = 0; b < 8; ++b) mx[b] = fmaxf(mx[b], acc[a][b]);
  }

  // Column maxima over the 16 row groups.
  sm.columns(c, mx, k0, p.n_kv, 0.f, [](float a, float b) { return fmaxf(a, b); },
             [&](int key, float v) { p.partial[int64_t(c.by) * p.n_kv + key] = v / float(p.n_heads); });
}

// importance[j] = max(importance[j], the groups' maxima). One thread per key (block of 256).
template <class Ctx>
__device__ void prefill_importance_max_reduce(Ctx& c, const PrefillParams& p) {
  const int j = c.bx * 256 + c.tid;
  if (j >= p.n_kv) return;
  float m = p.importance[j];
  for (int t = 0; t < p.max_groups; ++t) m = fmaxf(m, p.partial[int64_t(t) * p.n_kv + j]);
  p.importance[j] = m;
}

// Value weights (kernels.h value_weights), vnorm. Block (bx, by) = (64 keys, query head); thread
// tid: key bx * 64 + tid. The keys' values of by's KV head go to shared memory as float32, then each
// thread sums its key's absolute values.
template <class T, int D, class Ctx>
__device__ void value_weights(Ctx& c, const ValueWeightParams& p) {
  using L = ValueWeightLayout<D>;
  float* vs = reinterpret_cast<float*>(c.smem);
  const int j0 = c.bx * kValueWeightKeys, h = c.by, g = h / p.group, hd = p.head_dim;
  const T* v = static_cast<const T*>(p.v);
  for (int idx = c.tid; idx < kValueWeightKeys * D; idx += kValueWeightKeys) {
    const int r = idx / D, d = idx % D, j = j0 + r;
    vs[r * L::S + d] = j < p.n_kv && d < hd ? to_f(v[int64_t(j) * p.kv_stride + int64_t(g) * hd + d]) : 0.f;
  }
  c.sync();
  const int j = j0 + c.tid;
  if (j >= p.n_kv) return;
  const float* x = vs + c.tid * L::S;
  float s = 0.f;
  for (int d = 0; d < hd; ++d) s += fabsf(x[d]);
  p.out[int64_t(h) * p.n_kv + j] = s;
}

template <class T, class Ctx>
__device__ void gram_split(Ctx& c, const GramSplitParams& p) {
  // wov2's Gram matrices cut into 16-bit parts (plan.h). Block h: its largest |G_h| (each thread's
  // share, then thread 0 over the block's, in a fixed order), the power of two s_h that brings it to
  // [2^14, 2^15) (F16's largest finite is 65504), then every element's parts: each the rounding of
  // what the parts before left (the differences are exact in float32).
  const int hd = p.head_dim, P = p.parts, n = hd * hd;
  const float* G = p.gram + int64_t(c.bx) * n;
  float* red = reinterpret_cast<float*>(c.smem);  // [kGramSplitThreads + 1]
  float m = 0.f;
  for (int i = c.tid; i < n; i += kGramSplitThreads) m = fmaxf(m, fabsf(G[i]));
  red[c.tid] = m;
  c.sync();
  if (c.tid == 0) {
    float mx = 0.f;
    for (int t = 0; t < kGramSplitThreads; ++t) mx = fmaxf(mx, red[t]);
    int e = 0;
    if (mx > 0.f && mx <= 3.4e38f) frexpf(mx, &e);  // mx = f 2^e, f in [0.5, 1)
    e = e < -100 ? -100 : e > 100 ? 100 : e;
    red[kGramSplitThreads] = ldexpf(1.f, 15 - e);
    p.inv_scale[c.bx] = ldexpf(1.f, e - 15);
  }
  c.sync();
  const float s = red[kGramSplitThreads];
  T* out = static_cast<T*>(p.out) + int64_t(c.bx) * n * P;
  for (int i = c.tid; i < n; i += kGramSplitThreads) {
    const int d = i / hd, e = i % hd;
    float x = G[i] * s;
    for (int q = 0; q < P; ++q) {
      const T part = from_f<T>(x);
      out[(int64_t(d) * P + q) * hd + e] = part;
      x -= to_f(part);
    }
  }
}

// wov2's first step per chunk (plan.h): block r = key r: its values as float32 (vf, for the dots) and,
// per KV head, P copies in their own type (vb, the product's B).
template <class T, class Ctx>
__device__ void value_rows(Ctx& c, const ValueRowsParams& p) {
  const T* src = static_cast<const T*>(p.v) + int64_t(c.bx) * p.kv_stride;
  float* dst = p.out + int64_t(c.bx) * p.cols;
  T* parts = static_cast<T*>(p.parts_out) + int64_t(c.bx) * p.cols * p.parts;
  for (int col = c.tid; col < p.cols; col += kValueRowsThreads) {
    const T x = src[col];
    dst[col] = to_f(x);
    const int g = col / p.head_dim, e = col % p.head_dim;
    for (int q = 0; q < p.parts; ++q) parts[(int64_t(g) * p.parts + q) * p.head_dim + e] = x;
  }
}

// wov2's last step (plan.h): thread i of the grid is (key r, query head h) = (i / n_heads, i %
// n_heads): out[h * out_stride + r] = sqrt(max(0, (y_h . v_g) / s_h)) over the key's rows of y and
// vf, one float32 multiply-add chain in order of d (16-byte loads when head_dim is a multiple of 4:
// the rows then start 16-byte aligned, as the workspace does), the scale undone by a power of two
// (exact). The threads of a warp read neighbouring heads of one key (the same v_g for a group: one
// broadcast load).
template <class Ctx>
__device__ void value_weight_dots(Ctx& c, const ValueDotParams& p) {
  const int64_t i = int64_t(c.bx) * kValueDotThreads + c.tid;
  if (i >= int64_t(p.rows) * p.n_heads) return;
  const int r = int(i / p.n_heads), h = int(i % p.n_heads), hd = p.head_dim;
  const float* y = p.y + (int64_t(r) * p.n_heads + h) * hd;
  const float* v = p.vf + (int64_t(r) * (p.n_heads / p.group) + h / p.group) * hd;
  float s = 0.f;
  if (hd % 4 == 0) {
    for (int d = 0; d < hd; d += 4) {
      const float4 a = *reinterpret_cast<const float4*>(y + d), b = *reinterpret_cast<const float4*>(v + d);
      s = fmaf(a.x, b.x, s);
      s = fmaf(a.y, b.y, s);
      s = fmaf(a.z, b.z, s);
      s = fmaf(a.w, b.w, s);
    }
  } else {
    for (int d = 0; d < hd; ++d) s = fmaf(y[d], v[d], s);
  }
  if (p.inv_scale) s *= p.inv_scale[h];
  p.out[int64_t(h) * p.out_stride + r] = sqrtf(fmaxf(s, 0.f));
}

// ---------------------------------------------------------------------------------------------
// Decode attention over the paged cache. Block (bx, by, bz) = (split, head chunk, sequence).

// Entry e of sequence b: element offset of its K row (the V row is block_size * kv_dim further),
// or -1 (with the error flag set) when the table is inconsistent.
__device__ __forceinline__ int64_t decode_entry_offset(const DecodeParams& p, int b, int e, int* slot_index) {
  const int blk = p.tables[int64_t(b) * p.table_stride + e / p.block_size];
  if (blk < 0 || blk >= p.n_blocks) {
    if (p.error_flag) atomicOr(p.error_flag, kPagedBadBlock);
    return -1;
  }
  const int slot = e % p.block_size;
  *slot_index = blk * p.block_size + slot;
  return (int64_t(blk) * 2 * p.block_size + slot) * p.kv_dim;
}

// The number of keys sequence b has (clamped to what the table and max_len can hold).
__device__ __forceinline__ int decode_length(const DecodeParams& p, int b) {
  int len = p.lengths[b];
  const int cap = p.table_stride * p.block_size;
  if (len > cap || len > p.max_len || len < 0) {
    if (p.error_flag) atomicOr(p.error_flag, kPagedBadEntry);
    len = len < 0 ? 0 : len;
    len = len > cap ? cap : len;
    len = len > p.max_len ? p.max_len : len;
  }
  return len;
}

template <class T, int D, int MG, class Ctx>
__device__ void decode_split(Ctx& c, const DecodeParams& p) {
  // Flash-decoding without block barriers in the key loop: the block's 128 threads form NL key
  // groups of KT = D / 8 lanes (a group holds one key's D dims, 8 per lane, and stays inside one
  // warp). Group kg takes keys start + kg, + NL, ...; for each it computes the G heads' scores
  // (reduced over its KT lanes by shuffles, so every lane of the group has them), then updates its
  // own online softmax (m, l) and output rows. U keys are loaded (table, position, K and V rows)
  // before any is used, so a group keeps U * 32 bytes per lane in flight. At the end the NL groups'
  // partial results are merged through shared memory into this split's (O, m, l).
  // MG: the register arrays' head count (>= p.G; the plan picks the smallest of 1, 2, 4, 8, so that
  // MHA blocks hold 8 floats of query and output per lane, not 64, and many blocks fit on an SM).
  using L = DecodeLayout<D>;
  constexpr int KT = L::KT, NL = L::NL, U = kDecodeKeysInFlight;
  const int tid = c.tid, kg = tid / KT, dp = tid % KT, d0 = dp * 8;
  const int split = c.bx, h0 = c.by * p.G, b = c.bz;
  const int G = p.G, hd = p.head_dim, g = h0 / p.group;
  // Head tables (kernels.h, PagedHeads): KV head g's own table row, length and layout, every entry
  // visible; the query heads of the block (one group) share it.
  const int n_kv = p.n_heads / p.group;
  const bool ph = p.head_flags && p.head_flags[b];
  const int hrow = b * n_kv + g;
  int len = 0;
  if (ph) {
    len = p.head_lengths[hrow];
    const int cap = p.table_stride * p.block_size;
    if (len > cap || len > p.max_len || len < 0) {
      if (p.error_flag) atomicOr(p.error_flag, kPagedBadEntry);
      len = len < 0 ? 0 : len > cap ? cap : len;
      len = len > p.max_len ? p.max_len : len;
    }
  } else {
    len = decode_length(p, b);
  }
  const int64_t col = ph ? 0 : int64_t(g) * hd;  // the head's columns in a row of the table's layout
  const int start = split * p.chunk;
  const int end = start + p.chunk < len ? start + p.chunk : len;
  const int qpos = p.q_pos ? p.q_pos[b] : INT_MAX;
  const T* q = static_cast<const T*>(p.q);
  const T* pool = static_cast<const T*>(p.pool);
  const bool dims_ok = d0 < hd;

  float qv[MG][8], acc[MG][8], m[MG], l[MG];
#pragma unroll
  for (int hh = 0; hh < MG; ++hh) {
    m[hh] = -INFINITY;
    l[hh] = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      acc[hh][e] = 0.f;
      qv[hh][e] = 0.f;
      if (hh < G && d0 + e < hd) qv[hh][e] = to_f(q[int64_t(b) * p.q_stride + int64_t(h0 + hh) * hd + d0 + e]) * p.scale_log2;
    }
  }

  // The same iteration count for every group (the score shuffles need the whole warp): keys past
  // `end` are masked, never skipped.
  const int n_iter = end > start ? (end - start + NL * U - 1) / (NL * U) : 0;
  for (int it = 0; it < n_iter; ++it) {
    const int base = start + it * NL * U + kg;
    int64_t off[U];
    uint4 kr[U], vr[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = base + u * NL;
      off[u] = -1;
      if (j < end && ph) {
        off[u] = paged_head_offset(p.head_tables, p.table_stride, p.n_blocks, p.block_size, p.kv_dim, n_kv, p.error_flag,
                                   hrow, j);
      } else if (j < end) {
        int si = 0;
        off[u] = decode_entry_offset(p, b, j, &si);
        if (off[u] >= 0 && p.positions[si] > qpos) off[u] = -1;  // not visible to this query
      }
      kr[u] = vr[u] = uint4{0u, 0u, 0u, 0u};
      if (off[u] >= 0 && dims_ok) {
        const T* row = pool + off[u] + col + d0;
        kr[u] = *reinterpret_cast<const uint4*>(row);
        vr[u] = *reinterpret_cast<const uint4*>(row + int64_t(p.block_size) * p.kv_dim);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = base + u * NL;
      float kf[8], vf[8];
      unpack8<T>(kr[u], kf);
      unpack8<T>(vr[u], vf);
#pragma unroll
      for (int hh = 0; hh < MG; ++hh) {
        if (hh >= G) break;  // G is uniform over the block
        float s = 0.f;
#pragma unroll
        for (int e = 0; e < 8; ++e) s = fmaf(qv[hh][e], kf[e], s);
#pragma unroll
        for (int o = KT / 2; o >= 1; o /= 2) s += c.shfl_xor(s, o);
        if (off[u] < 0) s = -INFINITY;  // masked, invisible or past the end (off = -1)
        if (p.ws_scores && dp == 0 && j < end) p.ws_scores[(int64_t(b) * p.n_heads + h0 + hh) * p.max_len + j] = s;
        // No branch around the update (every lane stays on the same path to the next shuffle).
        const bool live = s != -INFINITY;
        const float m_new = live ? fmaxf(m[hh], s) : m[hh];
        const float alpha = live ? exp2f(m[hh] - m_new) : 1.f;  // m[hh] = -inf: 0 (acc, l are 0 anyway)
        const float pw = live ? exp2f(s - m_new) : 0.f;
        l[hh] = l[hh] * alpha + pw;
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[hh][e] = fmaf(pw, vf[e], acc[hh][e] * alpha);
        m[hh] = m_new;
      }
    }
  }

  // Merge the NL groups: O = sum_g acc_g 2^(m_g - M), l = sum_g l_g 2^(m_g - M), M = max_g m_g.
  float* red_m = reinterpret_cast<float*>(c.smem);  // [NL][G] (DecodeLayout)
  float* red_l = red_m + NL * G;                     // [NL][G]
  float* red_o = red_l + NL * G;                     // [NL][G][D]
  if (dp == 0)
    for (int hh = 0; hh < G; ++hh) {
      red_m[kg * G + hh] = m[hh];
      red_l[kg * G + hh] = l[hh];
    }
#pragma unroll
  for (int hh = 0; hh < MG; ++hh) {
    if (hh >= G) break;
#pragma unroll
    for (int e = 0; e < 8; ++e) red_o[(kg * G + hh) * D + d0 + e] = acc[hh][e];
  }
  c.sync();
  for (int idx = tid; idx < G * hd; idx += kDecodeThreads) {
    const int hh = idx / hd, d = idx % hd;
    float M = -INFINITY;
    for (int t = 0; t < NL; ++t) M = fmaxf(M, red_m[t * G + hh]);
    float o = 0.f, lsum = 0.f;
    if (M != -INFINITY)
      for (int t = 0; t < NL; ++t) {
        const float w = exp2f(red_m[t * G + hh] - M);
        o += red_o[(t * G + hh) * D + d] * w;
        lsum += red_l[t * G + hh] * w;
      }
    p.ws_o[((int64_t(b) * p.n_heads + h0 + hh) * p.n_splits + split) * hd + d] = o;
    if (d == 0) {
      float* ml = p.ws_ml + ((int64_t(b) * p.n_heads + h0 + hh) * p.n_splits + split) * 2;
      ml[0] = M;
      ml[1] = lsum;
    }
  }
}

// Combines the splits of (head bx, sequence by): out = sum_s O_s 2^(m_s - M) / sum_s l_s 2^(m_s - M).
template <class T, class Ctx>
__device__ void decode_combine(Ctx& c, const DecodeParams& p) {
  const int h = c.bx, b = c.by, d = c.tid;
  const int64_t base = (int64_t(b) * p.n_heads + h) * p.n_splits;
  float M = -INFINITY;
  for (int s = 0; s < p.n_splits; ++s) M = fmaxf(M, p.ws_ml[(base + s) * 2]);
  float Lsum = 0.f, o = 0.f;
  for (int s = 0; s < p.n_splits; ++s) {
    const float ms = p.ws_ml[(base + s) * 2];
    if (ms == -INFINITY) continue;
    const float w = exp2f(ms - M);
    Lsum += p.ws_ml[(base + s) * 2 + 1] * w;
    if (d < p.head_dim) o += p.ws_o[(base + s) * p.head_dim + d] * w;
  }
  if (d < p.head_dim)
    static_cast<T*>(p.out)[int64_t(b) * p.out_stride + int64_t(h) * p.head_dim + d] = from_f<T>(Lsum > 0.f ? o / Lsum : 0.f);
  if (d == 0 && p.ws_lse) p.ws_lse[int64_t(b) * p.n_heads + h] = Lsum > 0.f ? M + log2f(Lsum) : -INFINITY;
}

// importance[b, j] += mean over heads of 2^(score - lse). Block (bx, by) = (key chunk of 128, sequence).
template <class Ctx>
__device__ void decode_importance(Ctx& c, const DecodeParams& p) {
  const int b = c.by, j = c.bx * 128 + c.tid;
  int len = p.lengths[b];
  const int cap = p.table_stride * p.block_size;
  len = len < 0 ? 0 : len > cap ? cap : len;
  len = len > p.max_len ? p.max_len : len;
  if (j >= len) return;
  float sum = 0.f;
  for (int h = 0; h < p.n_heads; ++h) {
    const float lse = p.ws_lse[int64_t(b) * p.n_heads + h];
    const float sc = p.ws_scores[(int64_t(b) * p.n_heads + h) * p.max_len + j];
    if (lse != -INFINITY && sc != -INFINITY) sum += exp2f(sc - lse);
  }
  p.importance[int64_t(b) * p.importance_stride + j] += sum / float(p.n_heads);
}

}  // namespace pkv::cuda::detail
