#include "ops/quant.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>

#include "core/dtype.h"
#include "core/error.h"
#include "ops/quant_blocks.h"

namespace pkv::quant {

namespace {

constexpr int kQk = 32;   // elements per block of Q8_0 and Q4_0
constexpr int kQkK = 256; // elements per block of the K types

void check(uint32_t type, int64_t n) {
  if (!supported(type)) fail("quantised row", "ggml type " + std::to_string(type) + " is not supported");
  if (n < 0 || n % block_elems(type) != 0)
    fail("quantised row", std::to_string(n) + " elements are not a whole number of blocks of " +
                              std::to_string(block_elems(type)));
}

uint16_t load_u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}
void store_u16(uint8_t* p, uint16_t v) { std::memcpy(p, &v, 2); }

}  // namespace

bool supported(uint32_t t) {
  return t == kF32 || t == kF16 || t == kBF16 || t == kQ8_0 || t == kQ4_0 || t == kQ4_K || t == kQ6_K;
}

int block_elems(uint32_t t) { return t == kQ8_0 || t == kQ4_0 ? kQk : t == kQ4_K || t == kQ6_K ? kQkK : 1; }

int block_bytes(uint32_t t) {
  switch (t) {
    case kF32: return 4;
    case kF16: case kBF16: return 2;
    case kQ8_0: return 2 + kQk;
    case kQ4_0: return 2 + kQk / 2;
    case kQ4_K: return 2 + 2 + 12 + kQkK / 2;
    case kQ6_K: return kQkK / 2 + kQkK / 4 + kQkK / 16 + 2;
    default: fail("quantised row", "ggml type " + std::to_string(t) + " is not supported");
  }
}

size_t row_bytes(uint32_t type, int64_t n) {
  check(type, n);
  return size_t(n / block_elems(type)) * size_t(block_bytes(type));
}

void dequantize_row(uint32_t type, const void* src_v, float* dst, int64_t n) {
  check(type, n);
  const auto* src = static_cast<const uint8_t*>(src_v);
  switch (type) {
    case kF32:
      std::memcpy(dst, src, size_t(n) * 4);
      return;
    case kF16:
      for (int64_t i = 0; i < n; ++i) dst[i] = f16_to_f32(load_u16(src + 2 * i));
      return;
    case kBF16:
      for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(load_u16(src + 2 * i));
      return;
    case kQ8_0: return blocks::dequantize_blocks<blocks::Q8_0>(src, dst, n);
    case kQ4_0: return blocks::dequantize_blocks<blocks::Q4_0>(src, dst, n);
    case kQ4_K: return blocks::dequantize_blocks<blocks::Q4_K>(src, dst, n);
    case kQ6_K: return blocks::dequantize_blocks<blocks::Q6_K>(src, dst, n);
  }
}

void quantize_row(uint32_t type, const float* src, void* dst_v, int64_t n) {
  check(type, n);
  if (type == kQ4_K || type == kQ6_K)
    fail("quantised row", std::string(type == kQ4_K ? "Q4_K" : "Q6_K") + " is read, not written, by prefixkv");
  if (type == kQ8_0 || type == kQ4_0)
    for (int64_t i = 0; i < n; ++i)
      if (!std::isfinite(src[i]))
        fail("quantised row", "element " + std::to_string(i) + " is " + std::to_string(src[i]) + ", not a finite number");
  auto* dst = static_cast<uint8_t*>(dst_v);
  switch (type) {
    case kF32:
      std::memcpy(dst, src, size_t(n) * 4);
      return;
    case kF16:
      for (int64_t i = 0; i < n; ++i) store_u16(dst + 2 * i, f32_to_f16(src[i]));
      return;
    case kBF16:
      for (int64_t i = 0; i < n; ++i) store_u16(dst + 2 * i, f32_to_bf16(src[i]));
      return;
    case kQ8_0:
      for (int64_t b = 0; b < n / kQk; ++b, src += kQk, dst += 2 + kQk) {
        float amax = 0;
        for (int j = 0; j < kQk; ++j) amax = std::max(amax, std::fabs(src[j]));
        const float d = amax / 127.f;
        const float id = d != 0.f ? 1.f / d : 0.f;
        store_u16(dst, f32_to_f16(d));
        auto* q = reinterpret_cast<int8_t*>(dst + 2);
        for (int j = 0; j < kQk; ++j) q[j] = int8_t(std::round(src[j] * id));
      }
      return;
    case kQ4_0:
      for (int64_t b = 0; b < n / kQk; ++b, src += kQk, dst += 2 + kQk / 2) {
        float amax = 0, m = 0;  // the element of largest magnitude, its sign kept
        for (int j = 0; j < kQk; ++j)
          if (std::fabs(src[j]) > amax) amax = std::fabs(src[j]), m = src[j];
        const float d = m / -8.f;
        const float id = d != 0.f ? 1.f / d : 0.f;
        store_u16(dst, f32_to_f16(d));
        uint8_t* q = dst + 2;
        for (int j = 0; j < kQk / 2; ++j) {
          const int lo = std::min(15, int(int8_t(src[j] * id + 8.5f)));
          const int hi = std::min(15, int(int8_t(src[j + kQk / 2] * id + 8.5f)));
          q[j] = uint8_t(lo | (hi << 4));
        }
      }
      return;
  }
}

}  // namespace pkv::quant
