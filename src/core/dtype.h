// Element types of stored tensors and conversion to float32.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>

namespace pkv {

enum class DType : uint8_t { F32, F16, BF16 };

size_t dtype_size(DType t);
const char* dtype_name(DType t);  // "F32", "F16", "BF16" (as the file formats spell them)
// The lowercase names the command-line options take (--kv-dtype, --gpu-dtype, --dtype): "f32", "f16",
// "bf16". dtype_from_option: the type of such a name; false for any other name (the caller's error
// names its option and the names it accepts).
const char* dtype_option_name(DType t);
bool dtype_from_option(const std::string& name, DType& t);

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round-to-nearest-even float32 -> bfloat16 (NaN stays NaN).
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

// IEEE half -> float through a 64k-entry table built once (exact for every input).
extern const float* const kF16Table;
inline float f16_to_f32(uint16_t h) { return kF16Table[h]; }
uint16_t f32_to_f16(float f);

// Converts n elements of type t starting at src into dst (float32). Exact for every input; the
// 16-bit types eight (F16C, AVX2) or sixteen (AVX-512) at a time where the compiler target has them.
void to_f32(DType t, const void* src, float* dst, size_t n);
// Rounds n float32 values into type t at dst: round to nearest even, as f32_to_f16 / f32_to_bf16 do
// one at a time (bit for bit for every value but NaN, which stays a NaN), vectorised as to_f32;
// F32 copies.
void from_f32(DType t, const float* src, void* dst, size_t n);
// Rounds a double to the nearest value of type t (to nearest even) in one rounding, returned as
// float32: through float32 rounded to odd, which then rounds to 16 bits as the double itself would
// (24 >= 11 + 2 bits; Boldo and Melquiond); double -> float -> 16 bits by nearest would round twice.
float round_to(DType t, double x);

}  // namespace pkv
