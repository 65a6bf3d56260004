#include "core/dtype.h"
#include "core/dtype_rows.h"

#include <cmath>
#if defined(__F16C__) || defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <vector>

namespace pkv {

size_t dtype_size(DType t) { return t == DType::F32 ? 4 : 2; }

const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "F32";
    case DType::F16: return "F16";
    case DType::BF16: return "BF16";
  }
  return "?";
}

const char* dtype_option_name(DType t) {
  switch (t) {
    case DType::F32: return "f32";
    case DType::F16: return "f16";
    case DType::BF16: return "bf16";
  }
  return "?";
}

bool dtype_from_option(const std::string& name, DType& t) {
  for (DType d : {DType::F32, DType::F16, DType::BF16})
    if (name == dtype_option_name(d)) {
      t = d;
      return true;
    }
  return false;
}

static float half_bits_to_float(uint16_t h) {
  const uint32_t sign = (h >> 15) & 1u, exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  float v;
  if (exp == 0) {
    v = std::ldexp(float(mant), -24);  // subnormal (or zero)
  } else if (exp == 31) {
    v = mant ? NAN : INFINITY;
  } else {
    v = std::ldexp(float(mant | 0x400u), int(exp) - 25);
  }
  return sign ? -v : v;
}

static const float* build_f16_table() {
  static std::vector<float> table(65536);
  for (uint32_t i = 0; i < 65536; ++i) table[i] = half_bits_to_float(uint16_t(i));
  return table.data();
}

const float* const kF16Table = build_f16_table();

uint16_t f32_to_f16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t absu = u & 0x7fffffffu;
  if (absu >= 0x7f800000u) return uint16_t(sign | 0x7c00u | (absu > 0x7f800000u ? 0x200u : 0));
  if (absu >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // overflow to inf
  if (absu < 0x38800000u) {                                    // subnormal half
    float a;
    std::memcpy(&a, &absu, 4);
    return uint16_t(sign | uint32_t(std::nearbyint(a * 16777216.0f)));
  }
  uint32_t r = absu + 0xfffu + ((absu >> 13) & 1u) - 0x38000000u;
  return uint16_t(sign | (r >> 13));
}

void to_f32(DType t, const void* src, float* dst, size_t n) {
  switch (t) {
    case DType::F32:
      std::memcpy(dst, src, n * 4);
      return;
    case DType::F16:
      f16_row_to_f32(static_cast<const uint16_t*>(src), dst, n);
      return;
    case DType::BF16:
      bf16_row_to_f32(static_cast<const uint16_t*>(src), dst, n);
      return;
  }
}

namespace {

#if defined(__AVX2__)
// Eight f32_to_bf16 at once (the same integer steps: NaN keeps its top bits and turns quiet, every
// other value rounds to nearest even), packed to eight 16-bit words.
inline __m128i bf16x8(const float* src) {
  const __m256i u = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
  const __m256i abs = _mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff));
  // Signed compare is right here: abs is below 2^31.
  const __m256i nan = _mm256_cmpgt_epi32(abs, _mm256_set1_epi32(0x7f800000));
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
  const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
  const __m256i r = _mm256_blendv_epi8(rounded, quiet, nan);
  // 32 -> 16 bits: the values fit in 16 bits, so an unsigned saturating pack keeps them; packus
  // works within 128-bit lanes, hence the permute.
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
  return _mm256_castsi256_si128(packed);
}
#endif

}  // namespace

void from_f32(DType t, const float* src, void* dst, size_t n) {
  switch (t) {
    case DType::F32:
      std::memcpy(dst, src, n * 4);
      return;
    case DType::F16: {
      uint16_t* d = static_cast<uint16_t*>(dst);
      size_t i = 0;
#if defined(__AVX512F__)
      for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + i),
                            _mm512_maskz_cvtps_ph(0xffff, _mm512_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
#if defined(__F16C__)
      for (; i + 8 <= n; i += 8)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
      for (; i < n; ++i) d[i] = f32_to_f16(src[i]);
      return;
    }
    case DType::BF16: {
      uint16_t* d = static_cast<uint16_t*>(dst);
      size_t i = 0;
#if defined(__AVX2__)
      for (; i + 8 <= n; i += 8) _mm_storeu_si128(reinterpret_cast<__m128i*>(d + i), bf16x8(src + i));
#endif
      for (; i < n; ++i) d[i] = f32_to_bf16(src[i]);
      return;
    }
  }
}

float round_to(DType t, double x) {
  float f = float(x);
  if (t == DType::F32) return f;
  if (double(f) != x && std::isfinite(f)) {
    // Round to odd: of the two floats around x, the one whose last bit is 1.
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 1u) == 0) f = std::nextafter(f, double(f) < x ? INFINITY : -INFINITY);
  }
  return t == DType::F16 ? f16_to_f32(f32_to_f16(f)) : bf16_to_f32(f32_to_bf16(f));
}

}  // namespace pkv
