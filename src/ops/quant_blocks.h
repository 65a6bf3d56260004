// The decoding rules of ggml's block types (the layouts: ops/quant.h), written once for the CPU's
// dequantiser (quant.cc) and the CUDA kernels (src/ops/cuda/gemv_body.h, quant_body.h), which both
// call these functions. A block of kElems elements (32 or 256) is kElems / 8 pieces of 8
// consecutive elements; for piece p, load() gathers the bytes the piece needs (the kernels issue
// these loads for several pieces before decoding any, to keep memory busy) and decode() turns them
// into the 8 floats. The arithmetic is ggml's term for term (Q4_K's d * sc * q - dmin * m as one
// fused multiply-add, as ggml's vectorised loop computes it on FMA hardware), so the CPU, the GPU
// and ggml give the same floats bit for bit (tests/unit: Quant.MatchesGgmlBitForBit).
//
// Alignment: a block starts at a multiple of its size from a 16-byte aligned row base (GGUF data
// and device buffers are), so Q4_K blocks (144 bytes) are 16-byte aligned, the others 2-byte
// aligned. On the GPU the loads are 2- and 4-byte reads that rely on that; on the CPU they are
// memcpy's.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#define PKV_QFN __host__ __device__ __forceinline__
#else
#include "core/dtype.h"
#define PKV_QFN inline
#endif
#if defined(__CUDA_ARCH__)
#define PKV_QUNROLL _Pragma("unroll")
#else
#define PKV_QUNROLL
#endif

namespace pkv::quant::blocks {

PKV_QFN float half_to_f32(uint16_t h) {
#if defined(__CUDACC__)
  __half_raw r;
  r.x = h;
  return __half2float(__half(r));
#else
  return f16_to_f32(h);
#endif
}

// A T (uint16_t or uint32_t) at p, aligned to its size.
template <class T>
PKV_QFN T ld(const uint8_t* p) {
#if defined(__CUDA_ARCH__)
  return __ldg(reinterpret_cast<const T*>(p));
#else
  T v;
  std::memcpy(&v, p, sizeof v);
  return v;
#endif
}
PKV_QFN uint16_t ld_u16(const uint8_t* p) { return ld<uint16_t>(p); }
PKV_QFN uint32_t ld_u32(const uint8_t* p) { return ld<uint32_t>(p); }

// N bytes (N a multiple of 4) at a 2-byte aligned address. On the GPU: read into registers (4-byte
// reads when the address is 4-byte aligned, else 2-byte ones). On the CPU: the address, read by the
// decoder (its loops then vectorise over the bytes in memory).
// A value-initialised Bytes reads as zeros.
#if !defined(__CUDA_ARCH__)
inline constexpr uint8_t kZeroBytes[32] = {};
#endif
template <int N>
struct Bytes {
#if defined(__CUDA_ARCH__)
  uint32_t w[N / 4] = {};
  PKV_QFN uint32_t operator[](int j) const { return (w[j >> 2] >> (8 * (j & 3))) & 0xffu; }
#else
  const uint8_t* b = kZeroBytes;
  PKV_QFN uint32_t operator[](int j) const { return b[j]; }
#endif
};
template <int N>
PKV_QFN Bytes<N> ld_bytes(const uint8_t* p) {
  Bytes<N> r;
#if defined(__CUDA_ARCH__)
  if ((reinterpret_cast<uintptr_t>(p) & 3) == 0) {
    PKV_QUNROLL
    for (int i = 0; i < N / 4; ++i) r.w[i] = ld_u32(p + 4 * i);
  } else {
    PKV_QUNROLL
    for (int i = 0; i < N / 4; ++i) r.w[i] = uint32_t(ld_u16(p + 4 * i)) | (uint32_t(ld_u16(p + 4 * i + 2)) << 16);
  }
#else
  r.b = p;
#endif
  return r;
}

// Byte j of little-endian words.
template <int W>
PKV_QFN uint32_t byte_of(const uint32_t (&w)[W], int j) {
  return (w[j >> 2] >> (8 * (j & 3))) & 0xffu;
}

// Q8_0: [d: half][q: 32 x int8]; x = q * d.
struct Q8_0 {
  static constexpr int kElems = 32, kBytes = 34, kMaxPiece = 32;
  template <int N>
  struct Raw {
    Bytes<N> q;
    uint16_t d;
  };
  template <int N>
  PKV_QFN static Raw<N> load(const uint8_t* b, int p) {
    return {ld_bytes<N>(b + 2 + N * p), ld_u16(b)};
  }
  template <int N>
  PKV_QFN static void decode(const Raw<N>& r, int, float* v) {
    const float d = half_to_f32(r.d);
    PKV_QUNROLL
    for (int j = 0; j < N; ++j) v[j] = float(int8_t(uint8_t(r.q[j]))) * d;
  }
};

// Q4_0: [d: half][16 bytes: byte j = element j (low nibble), element j + 16 (high)];
// x = (nibble - 8) * d. Elements 0-15 are the low nibbles of bytes 0-15, 16-31 the high ones.
struct Q4_0 {
  static constexpr int kElems = 32, kBytes = 18, kMaxPiece = 16;
  template <int N>
  struct Raw {
    Bytes<N> q;
    uint16_t d;
  };
  template <int N>
  PKV_QFN static Raw<N> load(const uint8_t* b, int p) {
    return {ld_bytes<N>(b + 2 + (N * p) % 16), ld_u16(b)};
  }
  template <int N>
  PKV_QFN static void decode(const Raw<N>& r, int p, float* v) {
    const float d = half_to_f32(r.d);
    const int shift = 4 * ((N * p) >> 4);
    PKV_QUNROLL
    for (int j = 0; j < N; ++j) v[j] = float(int((r.q[j] >> shift) & 15u) - 8) * d;
  }
};

// Q4_K: [d, dmin: half][12 bytes of 6-bit scales and mins][128 bytes of nibbles]; sub-block j (32
// elements) takes the low (j even) or high nibbles of bytes 32 (j / 2) ..; x = (d * sc_j) * nibble -
// dmin * m_j.
struct Q4_K {
  static constexpr int kElems = 256, kBytes = 144, kMaxPiece = 32;
  template <int N>
  struct Raw {
    uint32_t dm;     // d | dmin << 16
    uint32_t sc[3];  // the 12 scale bytes
    Bytes<N> q;
  };
  template <int N>
  PKV_QFN static Raw<N> load(const uint8_t* b, int p) {
    const int e = N * p, j = e / 32;
    return {ld_u32(b), {ld_u32(b + 4), ld_u32(b + 8), ld_u32(b + 12)}, ld_bytes<N>(b + 16 + 32 * (j >> 1) + e % 32)};
  }
  template <int N>
  PKV_QFN static void decode(const Raw<N>& r, int p, float* v) {
    const int j = N * p / 32;
    int scale, min;
    if (j < 4) {
      scale = int(byte_of(r.sc, j) & 63u), min = int(byte_of(r.sc, j + 4) & 63u);
    } else {
      scale = int((byte_of(r.sc, j + 4) & 0x0Fu) | ((byte_of(r.sc, j - 4) >> 6) << 4));
      min = int((byte_of(r.sc, j + 4) >> 4) | ((byte_of(r.sc, j) >> 6) << 4));
    }
    const float ds = half_to_f32(uint16_t(r.dm & 0xffffu)) * float(scale);
    const float dm = half_to_f32(uint16_t(r.dm >> 16)) * float(min);
    const int shift = 4 * (j & 1);
    PKV_QUNROLL
    for (int l = 0; l < N; ++l) v[l] = fmaf(ds, float(int((r.q[l] >> shift) & 15u)), -dm);  // via int: the CPU loop vectorises
  }
};

// Q6_K: [ql: 128 bytes][qh: 64 bytes][16 int8 scales][d: half]. Half h (128 elements); in it,
// quarter qd = elements 32 qd + l (l < 32): the low (qd 0, 1) or high (qd 2, 3) nibble of
// ql[64 h + l + 32 (qd & 1)], bits 2 qd of qh[32 h + l] above it, scale sc[8 h + l / 16 + 2 qd];
// x = (d * sc) * (q - 32).
struct Q6_K {
  static constexpr int kElems = 256, kBytes = 210, kMaxPiece = 16;
  template <int N>
  struct Raw {
    Bytes<N> ql, qh;
    uint16_t d, sc;  // sc: the 2-byte word holding the piece's scale
  };
  PKV_QFN static int scale_index(int e) { return 192 + 8 * (e >> 7) + (e & 31) / 16 + 2 * ((e >> 5) & 3); }
  template <int N>
  PKV_QFN static Raw<N> load(const uint8_t* b, int p) {
    const int e = N * p, h = e >> 7, qd = (e >> 5) & 3, l0 = e & 31;
    return {ld_bytes<N>(b + 64 * h + 32 * (qd & 1) + l0), ld_bytes<N>(b + 128 + 32 * h + l0), ld_u16(b + 208),
            ld_u16(b + (scale_index(e) & ~1))};
  }
  template <int N>
  PKV_QFN static void decode(const Raw<N>& r, int p, float* v) {
    const int e = N * p, qd = (e >> 5) & 3;
    const int8_t s = int8_t(uint8_t((r.sc >> (8 * (scale_index(e) & 1))) & 0xffu));
    const float ds = half_to_f32(r.d) * float(s);
    const int shift = 4 * (qd >> 1);
    PKV_QUNROLL
    for (int l = 0; l < N; ++l) {
      const int q = int(((r.ql[l] >> shift) & 15u) | (((r.qh[l] >> (2 * qd)) & 3u) << 4)) - 32;
      v[l] = ds * float(q);
    }
  }
};

// n / F::kElems blocks at src -> n floats, in pieces of N elements.
template <class F, int N = F::kMaxPiece>
inline void dequantize_blocks(const uint8_t* src, float* dst, int64_t n) {
  for (int64_t b = 0; b < n / F::kElems; ++b, src += F::kBytes, dst += F::kElems)
    for (int p = 0; p < F::kElems / N; ++p) F::template decode<N>(F::template load<N>(src, p), p, dst + N * p);
}

}  // namespace pkv::quant::blocks
