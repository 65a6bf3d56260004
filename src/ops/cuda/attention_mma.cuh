// Prefill attention on tensor cores (internal to src/ops/cuda/; GPU only: warp-level mma.sync,
// ldmatrix and cp.async, sm_80 and later, Hopper included). Same contract and parameters as the
// CUDA-core bodies of attention_body.h (kernels.h: attention_prefill); the CPU emulator cannot run
// these, so the GPU tests compare them with the CPU twin (ops::attention) directly.
//
// Forward: block (bx, by) = (64-query tile, head), 4 warps of 16 query rows each. The Q tile sits
// in registers as mma A fragments for the whole block; K and V tiles of 64 keys stream through
// shared memory, double-buffered with cp.async (the next tile loads while this one is computed).
// S = Q K^T (16-bit inputs, float32 accumulators), scaled into the log2 domain after the product
// (s * scale * log2 e), masked by position, online softmax in float32 (a row's maximum and sum over
// the 4 lanes that hold it), then P (rounded to the 16-bit input type, as flash attention does) times
// V accumulates O in float32. The row's log2-sum-exp is saved for the importance pass.
//
// Importance: block (bx, by) = (64-key tile, head); the K tile stays in shared memory while the
// query tiles from importance_from stream through; scores are recomputed by exactly the same mma
// sequence as the forward pass (same fragments, same order over the head dims: the same float32
// values), turned into probabilities with the saved log-sum-exp, and summed per key column in a fixed
// order (lanes, then warps): deterministic, no atomics.
#pragma once
#include <climits>
#include <cmath>
#include <cstdint>

#include "ops/cuda/attention_body.h"  // prefill_visible_end, prefill_importance_rows
#include "ops/cuda/kernel_types.h"
#include "ops/cuda/mma.cuh"  // mma16816, ldmatrix, cp.async
#include "ops/cuda/plan.h"

namespace pkv::cuda::detail {

// ---- tiles ------------------------------------------------------------------------------------
// Loads rows [row0, row0 + 64) of a [*, stride] 16-bit matrix, columns [col0, col0 + head_dim), into
// dst [64][MmaPrefillLayout<D>::S] (asynchronously where a whole 16-byte chunk is in range and the
// plan found the rows aligned; element by element otherwise); rows >= rows_valid and columns >=
// head_dim are zeros (a zero V row times a zero probability must stay 0: no stale NaN).
template <class T, int D>
__device__ __forceinline__ void mma_load_tile(const T* base, int64_t stride, int64_t col0, int row0, int rows_valid,
                                              int head_dim, bool vec, T* dst, int tid) {
  constexpr int S = MmaPrefillLayout<D>::S, C = D / 8;
  for (int idx = tid; idx < kPrefillBQ * C; idx += kPrefillThreads) {
    const int r = idx / C, c8 = (idx % C) * 8;
    T* d = dst + r * S + c8;
    if (r < rows_valid && c8 < head_dim) {
      const T* src = base + int64_t(row0 + r) * stride + col0 + c8;
      if (vec && c8 + 8 <= head_dim) {
        cp_async16(d, src);
      } else {
        const T zero = from_f<T>(0.f);
#pragma unroll
        for (int e = 0; e < 8; ++e) d[e] = c8 + e < head_dim ? src[e] : zero;
      }
    } else {
      *reinterpret_cast<uint4*>(d) = uint4{0u, 0u, 0u, 0u};
    }
  }
}

// The 16 x D query rows of warp `warp` as A fragments (one per 16 head dims).
template <int D, class T>
__device__ __forceinline__ void mma_q_fragments(const T* Qs, int warp, int lane, uint32_t (&qf)[D / 16][4]) {
  constexpr int S = MmaPrefillLayout<D>::S;
  const T* row = Qs + (warp * 16 + (lane % 16)) * S + (lane / 16) * 8;
#pragma unroll
  for (int kc = 0; kc < D / 16; ++kc) ldsm_x4(qf[kc], row + kc * 16);
}

// s[n][*] = the warp's 16 query rows x keys n*8 .. n*8+7 of the K tile, float32, unscaled. The one
// sequence both passes use: the same values in the forward and the importance pass.
template <int D, class T>
__device__ __forceinline__ void mma_scores(const uint32_t (&qf)[D / 16][4], const T* Ks, int lane, float (&s)[8][4]) {
  constexpr int S = MmaPrefillLayout<D>::S;
#pragma unroll
  for (int n = 0; n < 8; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) s[n][e] = 0.f;
  // Lane l addresses row (key) (l % 8) + (l / 16) * 8 of a 16-key pair, column (l / 8 % 2) * 8.
  const T* base = Ks + ((lane % 8) + (lane / 16) * 8) * S + ((lane / 8) % 2) * 8;
#pragma unroll
  for (int kc = 0; kc < D / 16; ++kc)
#pragma unroll
    for (int np = 0; np < 4; ++np) {
      uint32_t b[4];
      ldsm_x4(b, base + np * 16 * S + kc * 16);
      mma16816<T>(s[2 * np], qf[kc], b[0], b[1]);
      mma16816<T>(s[2 * np + 1], qf[kc], b[2], b[3]);
    }
}

// ---- forward ----------------------------------------------------------------------------------
template <class T, int D>
__device__ void prefill_mma_forward(const PrefillParams& p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using L = MmaPrefillLayout<D>;
  constexpr int S = L::S, BK = kPrefillBK, DN = D / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* Qs = reinterpret_cast<T*>(smem_raw + L::q);
  T* Ks = reinterpret_cast<T*>(smem_raw + L::k);
  T* Vs = reinterpret_cast<T*>(smem_raw + L::v);
  int* kpos = reinterpret_cast<int*>(smem_raw + L::kpos);
  int* misc = reinterpret_cast<int*>(smem_raw + L::misc);

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, r0 = lane / 4, cq = lane % 4;
  // The last query tiles see the most keys (causal): they start first, the short ones fill the tail.
  const int q0 = (gridDim.x - 1 - blockIdx.x) * kPrefillBQ, h = blockIdx.y, g = h / p.group;
  const bool causal = p.q_pos != nullptr, vec = p.vec != 0;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  const int64_t kcol = int64_t(g) * p.head_dim;

  mma_load_tile<T, D>(q, p.q_stride, int64_t(h) * p.head_dim, q0, p.n_q - q0, p.head_dim, vec, Qs, tid);
  if (tid == 0) misc[0] = prefill_visible_end(p, q0);
  __syncthreads();
  const int kv_end = misc[0];
  const int n_tiles = (kv_end + BK - 1) / BK;
  if (n_tiles > 0) {
    mma_load_tile<T, D>(k, p.kv_stride, kcol, 0, kv_end, p.head_dim, vec, Ks, tid);
    mma_load_tile<T, D>(v, p.kv_stride, kcol, 0, kv_end, p.head_dim, vec, Vs, tid);
    for (int j = tid; j < BK; j += kPrefillThreads) kpos[j] = causal && j < kv_end ? p.kv_pos[j] : 0;
  }
  cp_async_commit();

  // This thread's two rows (r0 and r0 + 8 of the warp's 16) and their positions.
  const int ia = q0 + warp * 16 + r0, ib = ia + 8;
  const int qpa = causal && ia < p.n_q ? p.q_pos[ia] : INT_MAX;
  const int qpb = causal && ib < p.n_q ? p.q_pos[ib] : INT_MAX;
  int qmin = qpa < qpb ? qpa : qpb;  // the warp's smallest position: tiles wholly below it need no mask
  qmin = min(qmin, __shfl_xor_sync(0xffffffffu, qmin, 1));
  qmin = min(qmin, __shfl_xor_sync(0xffffffffu, qmin, 2));
  qmin = min(qmin, __shfl_xor_sync(0xffffffffu, qmin, 4));
  qmin = min(qmin, __shfl_xor_sync(0xffffffffu, qmin, 8));
  qmin = min(qmin, __shfl_xor_sync(0xffffffffu, qmin, 16));

  float o[DN][4];
#pragma unroll
  for (int d = 0; d < DN; ++d)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[d][e] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  uint32_t qf[D / 16][4];

  for (int t = 0; t < n_tiles; ++t) {
    const int buf = t & 1, k0 = t * BK;
    if (t + 1 < n_tiles) {  // the next tile loads while this one is computed
      const int nb = buf ^ 1, n0 = k0 + BK;
      mma_load_tile<T, D>(k, p.kv_stride, kcol, n0, kv_end - n0, p.head_dim, vec, Ks + nb * BK * S, tid);
      mma_load_tile<T, D>(v, p.kv_stride, kcol, n0, kv_end - n0, p.head_dim, vec, Vs + nb * BK * S, tid);
      for (int j = tid; j < BK; j += kPrefillThreads) kpos[nb * BK + j] = causal && n0 + j < kv_end ? p.kv_pos[n0 + j] : 0;
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    if (t == 0) mma_q_fragments<D>(Qs, warp, lane, qf);

    const T* Kb = Ks + buf * BK * S;
    const T* Vb = Vs + buf * BK * S;
    const int* kp = kpos + buf * BK;
    float s[8][4];
    mma_scores<D>(qf, Kb, lane, s);

    // Scale, mask, online softmax (rows r0: elements 0, 1; rows r0 + 8: elements 2, 3).
    const bool full = k0 + BK <= kv_end && (!causal || kp[BK - 1] <= qmin);
    float mt[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int n = 0; n < 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int j = n * 8 + cq * 2 + (e & 1);
        float x = s[n][e] * p.scale_log2;
        if (!full) {
          const bool ok = k0 + j < kv_end && (!causal || kp[j] <= (e < 2 ? qpa : qpb));
          x = ok ? x : -INFINITY;
        }
        s[n][e] = x;
        mt[e >> 1] = fmaxf(mt[e >> 1], x);
      }
    float alpha[2], mu[2];
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      mt[hh] = fmaxf(mt[hh], __shfl_xor_sync(0xffffffffu, mt[hh], 1));
      mt[hh] = fmaxf(mt[hh], __shfl_xor_sync(0xffffffffu, mt[hh], 2));
      const float m_new = fmaxf(m[hh], mt[hh]);
      alpha[hh] = m_new == -INFINITY ? 1.f : exp2f(m[hh] - m_new);
      mu[hh] = m_new == -INFINITY ? 0.f : m_new;
      m[hh] = m_new;
      l[hh] *= alpha[hh];
    }
#pragma unroll
    for (int d = 0; d < DN; ++d) {
      o[d][0] *= alpha[0], o[d][1] *= alpha[0];
      o[d][2] *= alpha[1], o[d][3] *= alpha[1];
    }
#pragma unroll
    for (int n = 0; n < 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float pv = exp2f(s[n][e] - mu[e >> 1]);  // exp2(-inf) = 0 for masked keys
        s[n][e] = pv;
        l[e >> 1] += pv;
      }

    // O += P V: P's accumulator layout is the A fragment layout of the next product (two 8-key
    // tiles make one 16-key chunk); V's B fragments come transposed out of shared memory.
    const T* vbase = Vb + ((lane % 8) + ((lane / 8) % 2) * 8) * S + (lane / 16) * 8;
#pragma unroll
    for (int kc = 0; kc < BK / 16; ++kc) {
      uint32_t a[4];
      a[0] = pack2<T>(s[2 * kc][0], s[2 * kc][1]);
      a[1] = pack2<T>(s[2 * kc][2], s[2 * kc][3]);
      a[2] = pack2<T>(s[2 * kc + 1][0], s[2 * kc + 1][1]);
      a[3] = pack2<T>(s[2 * kc + 1][2], s[2 * kc + 1][3]);
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t b[4];
        ldsm_x4_trans(b, vbase + kc * 16 * S + dp * 16);
        mma16816<T>(o[2 * dp], a, b[0], b[1]);
        mma16816<T>(o[2 * dp + 1], a, b[2], b[3]);
      }
    }
    __syncthreads();  // this buffer is loaded again two tiles on
  }
  cp_async_wait<0>();  // (no tile: the empty group)

#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    l[hh] += __shfl_xor_sync(0xffffffffu, l[hh], 1);
    l[hh] += __shfl_xor_sync(0xffffffffu, l[hh], 2);
  }
  T* out = static_cast<T*>(p.out);
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int i = hh == 0 ? ia : ib;
    if (i >= p.n_q) continue;
    const float inv = l[hh] > 0.f ? 1.f / l[hh] : 0.f;
    T* orow = out + int64_t(i) * p.out_stride + int64_t(h) * p.head_dim;
#pragma unroll
    for (int d = 0; d < DN; ++d)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = d * 8 + cq * 2 + e;
        if (col < p.head_dim) orow[col] = from_f<T>(o[d][hh * 2 + e] * inv);
      }
    if (p.lse && cq == 0) p.lse[int64_t(h) * p.n_q + i] = l[hh] > 0.f ? m[hh] + log2f(l[hh]) : -INFINITY;
  }
#else
  __trap();  // planned only for sm_80 and later (attention_prefill checks the device)
#endif
}

// ---- importance -------------------------------------------------------------------------------
template <class T, int D>
__device__ void prefill_mma_importance(const PrefillParams& p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using L = MmaImportanceLayout<D>;
  constexpr int BQ = kPrefillBQ, BK = kPrefillBK;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* Qs = reinterpret_cast<T*>(smem_raw + L::q);
  T* Ks = reinterpret_cast<T*>(smem_raw + L::k);
  int* kpos = reinterpret_cast<int*>(smem_raw + L::kpos);
  float* lse_s = reinterpret_cast<float*>(smem_raw + L::lse);
  int* qpos_s = reinterpret_cast<int*>(smem_raw + L::qpos);
  int* rowok_s = reinterpret_cast<int*>(smem_raw + L::rowok);
  float* red = reinterpret_cast<float*>(smem_raw + L::red);

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, r0 = lane / 4, cq = lane % 4;
  const int k0 = blockIdx.x * BK, h = blockIdx.y, g = h / p.group;
  const bool causal = p.q_pos != nullptr, vec = p.vec != 0;
  const T* q = static_cast<const T*>(p.q);

  mma_load_tile<T, D>(static_cast<const T*>(p.k), p.kv_stride, int64_t(g) * p.head_dim, k0, p.n_kv - k0, p.head_dim,
                      vec, Ks, tid);
  cp_async_commit();
  for (int j = tid; j < BK; j += kPrefillThreads) kpos[j] = causal && k0 + j < p.n_kv ? p.kv_pos[k0 + j] : 0;
  const int first_key_pos = causal ? p.kv_pos[k0] : 0;  // the tile's smallest position

  float col[8][2];
#pragma unroll
  for (int n = 0; n < 8; ++n) col[n][0] = col[n][1] = 0.f;

  for (int q0 = (p.importance_from / BQ) * BQ; q0 < p.n_q; q0 += BQ) {
    __syncthreads();  // the previous tile's Qs, lse_s, qpos_s are no longer read
    const bool any = prefill_importance_rows(p, q0, h, first_key_pos, tid, lse_s, qpos_s, rowok_s);
    if (!__syncthreads_or(any)) continue;
    mma_load_tile<T, D>(q, p.q_stride, int64_t(h) * p.head_dim, q0, p.n_q - q0, p.head_dim, vec, Qs, tid);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();

    uint32_t qf[D / 16][4];
    mma_q_fragments<D>(Qs, warp, lane, qf);
    float s[8][4];
    mma_scores<D>(qf, Ks, lane, s);
    const int ra = warp * 16 + r0, rb = ra + 8;
    const bool oka = rowok_s[ra] != 0, okb = rowok_s[rb] != 0;
    const float la = lse_s[ra], lb = lse_s[rb];
    const int qpa = qpos_s[ra], qpb = qpos_s[rb];
#pragma unroll
    for (int n = 0; n < 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int j = n * 8 + cq * 2 + (e & 1);
        const bool row_ok = e < 2 ? oka : okb;
        const bool ok = row_ok && k0 + j < p.n_kv && (!causal || kpos[j] <= (e < 2 ? qpa : qpb));
        if (ok) col[n][e & 1] += exp2f(s[n][e] * p.scale_log2 - (e < 2 ? la : lb));
      }
  }

  // Column sums: over the 8 lanes that share columns (fixed butterfly), then over the warps in order.
#pragma unroll
  for (int n = 0; n < 8; ++n)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      float x = col[n][e];
      x += __shfl_xor_sync(0xffffffffu, x, 4);
      x += __shfl_xor_sync(0xffffffffu, x, 8);
      x += __shfl_xor_sync(0xffffffffu, x, 16);
      col[n][e] = x;
    }
  __syncthreads();
  if (r0 == 0) {
#pragma unroll
    for (int n = 0; n < 8; ++n)
#pragma unroll
      for (int e = 0; e < 2; ++e) red[warp * BK + n * 8 + cq * 2 + e] = col[n][e];
  }
  cp_async_wait<0>();
  __syncthreads();
  for (int j = tid; j < BK; j += kPrefillThreads) {
    if (k0 + j >= p.n_kv) continue;
    p.partial[int64_t(h) * p.n_kv + k0 + j] = ((red[j] + red[BK + j]) + red[2 * BK + j]) + red[3 * BK + j];
  }
#else
  __trap();
#endif
}

}  // namespace pkv::cuda::detail
