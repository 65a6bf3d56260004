// Skinny matrix products for decoding (internal to src/ops/cuda/): kernels.h's gemv(). Same conventions
// as attention_body.h (a thread context `c`, the plan's parameters), built by nvcc for the GPU and
// by the host compiler for the CPU emulation test.
//
// A block's 8 warps are 2 output groups x kGemvKSplit column slices: warp w computes outputs
// o = (b * 2 + w / kGemvKSplit) * kGemvOutsPerWarp + {0, 1} over the columns of slice
// s = w % kGemvKSplit: lane l reads the 8 columns s * 256 + l * 8 + 256 * kGemvKSplit * k. Each
// weight row is read once whatever the row count (one 16-byte evict-first load per 8 columns,
// issued for several k before any is used); x rows come from L1/L2. Per-lane float32 partial sums
// are added across the warp by butterfly shuffles, then across the slices through shared memory
// (fixed order: deterministic). Splitting the columns gives a 4096-wide product 1024 blocks, so
// enough loads are in flight to approach the memory bandwidth.
#pragma once
#include <cmath>
#include <cstdint>

#include "ops/cuda/kernel_types.h"
#include "ops/cuda/plan.h"

namespace pkv::cuda::detail {

__host__ __device__ __forceinline__ float gemv_silu(float g) { return g / (1.f + expf(-g)); }

// How the kernel reads weights: load(w, row, in, k) fetches what columns k .. k + 7 of a row need
// (issued for several k before any is used), decode() turns it into 8 floats. Dense 16-bit rows:
// one 16-byte evict-first load. Block-quantised rows: quant_body.h.
template <class T>
struct DenseWeights {
  using Raw = uint4;
  __device__ static Raw load(const void* w, int64_t row, int in, int k) {
    return load16_stream(static_cast<const T*>(w) + row * in + k);
  }
  __device__ static void decode(const Raw& r, int, float (&v)[8]) { unpack8<T>(r, v); }
};

template <class T, class Y, int R, bool SWIGLU, class W = DenseWeights<T>, class Ctx>
__device__ void gemv(Ctx& c, const GemvParams& p) {
  constexpr int G = kGemvOutsPerWarp, KS = kGemvKSplit, U = 4;
  constexpr int N = SWIGLU ? 2 : 1;  // weight matrices (gate, up)
  constexpr int GROUPS = kGemvThreads / 32 / KS;
  const int warp = c.tid / 32, lane = c.tid % 32;
  const int group = warp / KS, slice = warp % KS;
  const int o0 = (c.bx * GROUPS + group) * G;
  const void* wm[N];
  wm[0] = p.w;
  if (SWIGLU) wm[N - 1] = p.w_up;
  const T* x = static_cast<const T*>(p.x);
  float acc[N][G][R];
#pragma unroll
  for (int n = 0; n < N; ++n)
#pragma unroll
    for (int g = 0; g < G; ++g)
#pragma unroll
      for (int r = 0; r < R; ++r) acc[n][g][r] = 0.f;

  constexpr int STEP = 256 * KS;  // columns between a lane's consecutive loads
  bool waited = false;  // for the earlier kernels (pdl_wait): after the first weight loads are issued
  for (int k0 = slice * 256 + lane * 8; k0 < p.in; k0 += STEP * U) {
    typename W::Raw raw[U][N][G];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int k = k0 + u * STEP;
#pragma unroll
      for (int n = 0; n < N; ++n)
#pragma unroll
        for (int g = 0; g < G; ++g) {
          raw[u][n][g] = typename W::Raw{};
          if (k < p.in && o0 + g < p.out) raw[u][n][g] = W::load(wm[n], int64_t(o0 + g), p.in, k);
        }
    }
    if (!waited) {
      pdl_wait();
      waited = true;
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int k = k0 + u * STEP;
      if (k >= p.in) break;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        float xv[8];
        load8(x + int64_t(r) * p.x_stride + k, xv);
#pragma unroll
        for (int n = 0; n < N; ++n)
#pragma unroll
          for (int g = 0; g < G; ++g) {
            float wv[8];
            W::decode(raw[u][n][g], k, wv);
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[n][g][r] += wv[j] * xv[j];
          }
      }
    }
  }

  if (!waited) pdl_wait();  // a lane without columns still writes y below
  // Warp sums (every lane takes part), then the slices' sums through shared memory.
  float* part = reinterpret_cast<float*>(c.smem);  // [warps][N][G][R]
#pragma unroll
  for (int n = 0; n < N; ++n)
#pragma unroll
    for (int g = 0; g < G; ++g)
#pragma unroll
      for (int r = 0; r < R; ++r) {
        float v = acc[n][g][r];
        v += c.shfl_xor(v, 16);
        v += c.shfl_xor(v, 8);
        v += c.shfl_xor(v, 4);
        v += c.shfl_xor(v, 2);
        v += c.shfl_xor(v, 1);
        if (lane == 0) part[((warp * N + n) * G + g) * R + r] = v;
      }
  c.sync();
  // Thread t < GROUPS * G * R writes output (group, g) of row r.
  const int t = c.tid;
  if (t >= GROUPS * G * R) return;
  const int r = t % R, g = (t / R) % G, grp = t / (R * G);
  const int o = (c.bx * GROUPS + grp) * G + g;
  if (o >= p.out) return;
  float s[N];
#pragma unroll
  for (int n = 0; n < N; ++n) {
    s[n] = 0.f;
    for (int sl = 0; sl < KS; ++sl) s[n] += part[(((grp * KS + sl) * N + n) * G + g) * R + r];
  }
  const float v = SWIGLU ? gemv_silu(s[0]) * s[N - 1] : s[0];
  Y* y = static_cast<Y*>(p.y) + int64_t(r) * p.y_stride + o;
  *y = p.accumulate ? from_f<Y>(to_f(*y) + v) : from_f<Y>(v);
}

}  // namespace pkv::cuda::detail
