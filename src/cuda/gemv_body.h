// Skinny matrix products for decoding (internal to src/cuda/): kernels.h's gemv(). Same conventions
// as attention_body.h (a thread context `c`, the plan's parameters), built by nvcc for the GPU and
// by the host compiler for the CPU emulation test.
//
// Warp w of block b owns outputs o = (b * 8 + w) * 2 + {0, 1}. Lane l walks the columns l * 8 +
// 256 * k: one 16-byte load of each owned weight row, then the same 8 columns of every x row, so a
// weight element is read once from memory whatever the row count. Per-lane float32 partial sums
// are added across the warp by butterfly shuffles (all 32 lanes take part, also those whose
// outputs are past `out`, which load nothing).
#pragma once
#include <cmath>
#include <cstdint>

#include "cuda/kernel_types.h"
#include "cuda/plan.h"

namespace pkv::cuda::detail {

__host__ __device__ __forceinline__ float gemv_silu(float g) { return g / (1.f + expf(-g)); }

template <class T, class Y, int R, bool SWIGLU, class Ctx>
__device__ void gemv(Ctx& c, const GemvParams& p) {
  constexpr int G = kGemvOutsPerWarp;
  constexpr int N = SWIGLU ? 2 : 1;  // weight matrices (gate, up)
  const int warp = c.tid / 32, lane = c.tid % 32;
  const int o0 = (c.bx * (kGemvThreads / 32) + warp) * G;
  const T* wm[N];
  wm[0] = static_cast<const T*>(p.w);
  if (SWIGLU) wm[N - 1] = static_cast<const T*>(p.w_up);
  const T* x = static_cast<const T*>(p.x);
  float acc[N][G][R];
#pragma unroll
  for (int n = 0; n < N; ++n)
#pragma unroll
    for (int g = 0; g < G; ++g)
#pragma unroll
      for (int r = 0; r < R; ++r) acc[n][g][r] = 0.f;

#pragma unroll 4
  for (int k = lane * 8; k < p.in; k += 256) {
    float wv[N][G][8];
#pragma unroll
    for (int n = 0; n < N; ++n)
#pragma unroll
      for (int g = 0; g < G; ++g) {
        uint4 raw{0u, 0u, 0u, 0u};
        if (o0 + g < p.out) raw = load16_stream(wm[n] + int64_t(o0 + g) * p.in + k);
        unpack8<T>(raw, wv[n][g]);
      }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float xv[8];
      load8(x + int64_t(r) * p.x_stride + k, xv);
#pragma unroll
      for (int n = 0; n < N; ++n)
#pragma unroll
        for (int g = 0; g < G; ++g)
#pragma unroll
          for (int j = 0; j < 8; ++j) acc[n][g][r] += wv[n][g][j] * xv[j];
    }
  }

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
        acc[n][g][r] = v;
      }
  if (lane != 0) return;
#pragma unroll
  for (int g = 0; g < G; ++g) {
    const int o = o0 + g;
    if (o >= p.out) break;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const float v = SWIGLU ? gemv_silu(acc[0][g][r]) * acc[N - 1][g][r] : acc[0][g][r];
      Y* y = static_cast<Y*>(p.y) + int64_t(r) * p.y_stride + o;
      *y = p.accumulate ? from_f<Y>(to_f(*y) + v) : from_f<Y>(v);
    }
  }
}

}  // namespace pkv::cuda::detail
