// ggml's block storage types, row by row on the CPU: what a GGUF file's weights are stored as
// (io/gguf.h). A row of n elements (n a multiple of the type's block) is n / block blocks, each
// its scale(s) then its packed values:
//   Q8_0: blocks of 32: the scale d (IEEE half), then 32 int8 q;        x = q * d
//   Q4_0: blocks of 32: the scale d (IEEE half), then 16 bytes: byte j holds element j in its low
//         nibble and element j + 16 in its high nibble, each 0..15;     x = (nibble - 8) * d
//   Q4_K: blocks of 256 in 8 sub-blocks of 32: d and dmin (halves), 12 bytes of 6-bit sub-block
//         scales sc and mins m (sub-blocks 0-3: the low 6 bits of bytes 0-3 and 4-7; 4-7: the low
//         and high nibbles of bytes 8-11 and the top 2 bits of bytes 0-3 and 4-7), then 128 bytes
//         of nibbles, 32 bytes per pair of sub-blocks (the first's low, the second's high nibbles);
//         x = (d * sc) * nibble - (dmin * m)
//   Q6_K: blocks of 256: 128 bytes of low nibbles, 64 bytes of 2-bit high parts, 16 int8 scales (one
//         per 16 elements), d (half); each half of 128: element l, l + 32, l + 64, l + 96 (l < 32)
//         take the low nibbles of ql[l], ql[l + 32] and the high nibbles of ql[l], ql[l + 32], with
//         the 2-bit pairs 0, 2, 4, 6 of qh[l] above them; x = (d * scale) * (q - 32)
// F32, F16 and BF16 are elements as stored. Quantising picks the scale as ggml's reference
// quantiser does (Q8_0: d = max|x| / 127 and q = round(x / d); Q4_0: d = m / -8 with m the element
// of largest magnitude, its sign kept, and nibble = min(15, trunc(x / d + 8.5))), the division
// done with the float d before d is rounded to half, so that the bytes are the same as ggml's.
#pragma once
#include <cstddef>
#include <cstdint>

namespace pkv::quant {

// ggml type ids (io/gguf.h GgmlType) of the types handled here.
constexpr uint32_t kF32 = 0, kF16 = 1, kQ4_0 = 2, kQ8_0 = 8, kQ4_K = 12, kQ6_K = 14, kBF16 = 30;

// Whether a type is handled here, its elements per block and bytes per block.
bool supported(uint32_t type);
int block_elems(uint32_t type);
int block_bytes(uint32_t type);
size_t row_bytes(uint32_t type, int64_t n);  // n must be a multiple of the block

// Row of n elements stored as `type` -> float32. Error when n is not a whole number of blocks.
void dequantize_row(uint32_t type, const void* src, float* dst, int64_t n);
// float32 -> row of n elements stored as `type` (dst holds row_bytes(type, n) bytes): F32, F16,
// BF16, Q8_0 and Q4_0 (the K types are read only).
void quantize_row(uint32_t type, const float* src, void* dst, int64_t n);

}  // namespace pkv::quant
