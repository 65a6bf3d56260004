// ggml's block storage types, row by row on the CPU: what a GGUF file's weights are stored as
// (io/gguf.h). A row of n elements (n a multiple of the type's block) is n / block blocks, each
// its scale(s) then its packed values:
//   Q8_0: blocks of 32: the scale d (IEEE half), then 32 int8 q;        x = q * d
//   Q4_0: blocks of 32: the scale d (IEEE half), then 16 bytes: byte j holds element j in its low
//         nibble and element j + 16 in its high nibble, each 0..15;     x = (nibble - 8) * d
// F32, F16 and BF16 are elements as stored. Quantising picks the scale as ggml's reference
// quantiser does (Q8_0: d = max|x| / 127 and q = round(x / d); Q4_0: d = m / -8 with m the element
// of largest magnitude, its sign kept, and nibble = min(15, trunc(x / d + 8.5))), the division
// done with the float d before d is rounded to half, so that the bytes are the same as ggml's.
#pragma once
#include <cstddef>
#include <cstdint>

namespace pkv::quant {

// ggml type ids (io/gguf.h GgmlType) of the types handled here.
constexpr uint32_t kF32 = 0, kF16 = 1, kQ4_0 = 2, kQ8_0 = 8, kBF16 = 30;

// Whether a type is handled here, its elements per block and bytes per block.
bool supported(uint32_t type);
int block_elems(uint32_t type);
int block_bytes(uint32_t type);
size_t row_bytes(uint32_t type, int64_t n);  // n must be a multiple of the block

// Row of n elements stored as `type` -> float32. Error when n is not a whole number of blocks.
void dequantize_row(uint32_t type, const void* src, float* dst, int64_t n);
// float32 -> row of n elements stored as `type` (dst holds row_bytes(type, n) bytes).
void quantize_row(uint32_t type, const float* src, void* dst, int64_t n);

}  // namespace pkv::quant
