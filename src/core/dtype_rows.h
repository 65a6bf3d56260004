// Vectorised conversion of 16-bit rows (F16, BF16) to float32, inline for the hot loops that convert
// a short row at a time (CPU attention over a 16-bit KV cache) and for core/dtype's to_f32: AVX-512
// sixteen at a time, F16C / AVX2 eight, then a scalar loop, as the compiler target allows. Exact
// for every input, whichever path runs.
#pragma once
#include <cstddef>
#include <cstdint>
#if defined(__F16C__) || defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "core/dtype.h"

namespace pkv {

inline void f16_row_to_f32(const uint16_t* src, float* dst, size_t n) {
  size_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(dst + i, _mm512_maskz_cvtph_ps(0xffff, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
#endif
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
#endif
  for (; i < n; ++i) dst[i] = f16_to_f32(src[i]);
}

inline void bf16_row_to_f32(const uint16_t* src, float* dst, size_t n) {
  size_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_si512(dst + i, _mm512_maskz_slli_epi32(0xffff, _mm512_maskz_cvtepu16_epi32(0xffff, _mm256_loadu_si256(
                                                       reinterpret_cast<const __m256i*>(src + i))), 16));
#endif
#if defined(__AVX2__)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                        _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))), 16));
#endif
  for (; i < n; ++i) dst[i] = bf16_to_f32(src[i]);
}

}  // namespace pkv
