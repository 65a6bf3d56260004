// Products of a short prompt (tens of rows) with 16-bit weights: y[r][o] = sum_k x[r][k] W[o][k].
//
// Too many rows for the decode path's dot products (each weight row dotted with four input rows at a
// time: the inputs are re-read from L2 for every output), too few for BLAS over converted blocks (its
// packing of the converted block costs as much as the product at 32 rows). Here the register tile is
// MR outputs x NR rows: x is packed once, transposed (k-major, NR rows side by side), and for each
// block of MR outputs and chunk of KC inputs the weights are converted to float32 into a chunk that
// stays in L1; each k then loads NR/lanes vectors of x and broadcasts MR weights: 2 MR fused
// multiply-adds per k and row vector, bound by the FMA units rather than by loads.
//
// Every y[r][o] is one float32 FMA chain over k = 0, 1, ..., in-1 (each lane of a vector is one row),
// so the result does not depend on the ISA, the tile sizes, the thread count or the other rows: it
// equals gemm16_reference below bit for bit (tests/unit/test_cpu_ops.cc).
#include <algorithm>
#include <cmath>
#include <vector>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

#include "core/dtype.h"
#include "core/dtype_rows.h"
#include "core/threads.h"
#include "ops/ops.h"

namespace pkv::ops {

namespace {

constexpr int kKC = 256;  // inputs per chunk: MR x KC float32 weights (12 KiB at MR 12) stay in L1

#if defined(__AVX512F__)
struct Vec {
  using T = __m512;
  static constexpr int kLanes = 16;
  static constexpr int kMR = 12;  // 24 accumulators + 2 x vectors + 1 broadcast of 32 registers
  static T zero() { return _mm512_setzero_ps(); }
  static T load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, T v) { _mm512_storeu_ps(p, v); }
  static T bcast(const float* p) { return _mm512_set1_ps(*p); }
  static T fma(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
};
#elif defined(__AVX2__) && defined(__FMA__)
struct Vec {
  using T = __m256;
  static constexpr int kLanes = 8;
  static constexpr int kMR = 6;  // 12 accumulators + 2 + 1 of 16 registers
  static T zero() { return _mm256_setzero_ps(); }
  static T load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, T v) { _mm256_storeu_ps(p, v); }
  static T bcast(const float* p) { return _mm256_broadcast_ss(p); }
  static T fma(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
};
#else
struct Vec {  // one lane; std::fma keeps the same single rounding per step as the vector units
  using T = float;
  static constexpr int kLanes = 1;
  static constexpr int kMR = 4;
  static T zero() { return 0.f; }
  static T load(const float* p) { return *p; }
  static void store(float* p, T v) { *p = v; }
  static T bcast(const float* p) { return *p; }
  static T fma(T a, T b, T c) { return std::fma(a, b, c); }
};
#endif

constexpr int kNV = Vec::kLanes == 1 ? 8 : 2;  // vectors of rows per tile
constexpr int kNR = kNV * Vec::kLanes;         // rows per tile (32, 16 or 8)

// acc[o][v] (MR x NV vectors, kept in `tile` between chunks: [MR][NR] floats) += over k < kc of
// w[o * kc + k] * xt[k * NR + v * lanes ...].
template <int MR>
inline void micro_tile(const float* w, const float* xt, int kc, float* tile) {
  typename Vec::T acc[MR][kNV];
  for (int o = 0; o < MR; ++o)
    for (int v = 0; v < kNV; ++v) acc[o][v] = Vec::load(tile + o * kNR + v * Vec::kLanes);
  for (int k = 0; k < kc; ++k) {
    typename Vec::T a[kNV];
    for (int v = 0; v < kNV; ++v) a[v] = Vec::load(xt + size_t(k) * kNR + v * Vec::kLanes);
    for (int o = 0; o < MR; ++o) {
      const typename Vec::T b = Vec::bcast(w + size_t(o) * kc + k);
      for (int v = 0; v < kNV; ++v) acc[o][v] = Vec::fma(b, a[v], acc[o][v]);
    }
  }
  for (int o = 0; o < MR; ++o)
    for (int v = 0; v < kNV; ++v) Vec::store(tile + o * kNR + v * Vec::kLanes, acc[o][v]);
}

template <int MR>
void micro_tile_n(int mr, const float* w, const float* xt, int kc, float* tile) {
  if constexpr (MR > 1) {
    if (mr < MR) return micro_tile_n<MR - 1>(mr, w, xt, kc, tile);
  }
  micro_tile<MR>(w, xt, kc, tile);
}

}  // namespace

void gemm16(const float* x, int rows, DType wt, const uint16_t* W, int in, int out, float* y) {
  if (rows <= 0 || out <= 0) return;
  // x transposed per tile of NR rows: xt[tile][k][NR], rows past the end zero.
  const int tiles = (rows + kNR - 1) / kNR;
  std::vector<float> xt(size_t(tiles) * size_t(in) * kNR, 0.f);
  parallel_for(size_t(tiles), 1, [&](size_t b, size_t e, int) {
    for (size_t t = b; t < e; ++t) {
      float* dst = xt.data() + t * size_t(in) * kNR;
      const int r0 = int(t) * kNR, nr = std::min(kNR, rows - r0);
      for (int r = 0; r < nr; ++r) {
        const float* src = x + size_t(r0 + r) * in;
        for (int k = 0; k < in; ++k) dst[size_t(k) * kNR + r] = src[k];
      }
    }
  });
  constexpr int MR = Vec::kMR;
  const int blocks = (out + MR - 1) / MR;
  parallel_for(size_t(blocks), 4, [&](size_t b, size_t e, int) {
    static thread_local std::vector<float> wc, tile;
    wc.resize(size_t(MR) * kKC);
    tile.resize(size_t(tiles) * MR * kNR);
    for (size_t blk = b; blk < e; ++blk) {
      const int o0 = int(blk) * MR, mr = std::min(MR, out - o0);
      std::fill(tile.begin(), tile.end(), 0.f);
      for (int k0 = 0; k0 < in; k0 += kKC) {
        const int kc = std::min(kKC, in - k0);
        for (int o = 0; o < mr; ++o) {
          const uint16_t* src = W + size_t(o0 + o) * in + k0;
          if (wt == DType::F16) f16_row_to_f32(src, wc.data() + size_t(o) * kc, size_t(kc));
          else bf16_row_to_f32(src, wc.data() + size_t(o) * kc, size_t(kc));
        }
        for (int t = 0; t < tiles; ++t)
          micro_tile_n<MR>(mr, wc.data(), xt.data() + size_t(t) * in * kNR + size_t(k0) * kNR, kc,
                           tile.data() + size_t(t) * MR * kNR);
      }
      for (int t = 0; t < tiles; ++t) {
        const int r0 = t * kNR, nr = std::min(kNR, rows - r0);
        for (int o = 0; o < mr; ++o)
          for (int r = 0; r < nr; ++r) y[size_t(r0 + r) * out + o0 + o] = tile[size_t(t) * MR * kNR + o * kNR + r];
      }
    }
  });
}

void gemm16_reference(const float* x, int rows, DType wt, const uint16_t* W, int in, int out, float* y) {
  for (int r = 0; r < rows; ++r)
    for (int o = 0; o < out; ++o) {
      float s = 0.f;
      for (int k = 0; k < in; ++k) {
        const uint16_t h = W[size_t(o) * in + k];
        s = std::fma(x[size_t(r) * in + k], wt == DType::F16 ? f16_to_f32(h) : bf16_to_f32(h), s);
      }
      y[size_t(r) * out + o] = s;
    }
}

}  // namespace pkv::ops
