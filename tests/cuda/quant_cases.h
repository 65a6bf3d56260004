// Test cases of the block-quantised kernels (gemv on ggml blocks, dequantize_rows, linear() with
// quantised weights) against the CPU's dequantiser (ops/quant.h), written against kernel_cases.h's
// Backend and run by pkv_cuda_emu_tests (emulated bodies, in ctest) and pkv_cuda_tests (the GPU).
#pragma once
#include <cstdint>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "kernel_cases.h"

namespace pkv::cuda::test {

// `rows` rows of `cols` elements of ggml type `type` (Q8_0, Q4_0, Q4_K, Q6_K): random packed values
// and scales, with every block's half-precision scales set to random normal numbers of a few
// hundredths (so that the values are finite and of the size of trained weights).
std::vector<uint8_t> random_quant_rows(uint32_t type, int rows, int cols, std::mt19937& rng);

// gemv on quantised w against double-precision products with the CPU's dequantised rows. The bound
// is float32 summation's, per output: |y - ref| <= gamma_in * sum_i |x_i w_i| (gamma_n = n u / (1 -
// n u), u = 2^-24), plus the final rounding of y (and, for SwiGLU, the gate's and up's errors
// carried through silu(g) * u); every row, every type, shapes with tails.
struct QuantGemvCase {
  uint32_t quant = 0;
  DType dtype = DType::BF16;  // x's
  int rows = 1, in = 0, out = 0;
  int x_pad = 0, y_pad = 0;
  bool accumulate = false, swiglu = false;
  uint32_t seed = 1;
  std::string str() const;
};
void check_quant_gemv(Backend& be, const QuantGemvCase& c);
std::vector<QuantGemvCase> quant_gemv_cases(bool full);
// Shapes and types gemv_fits refuses for quantised w, with the reason.
void check_quant_gemv_refusals(Backend& be);

// dequantize_rows against quant::dequantize_row rounded once to out_dtype: equal bit for bit; with
// ids (some out of range: rows of zeros) and without, out rows strided.
void check_dequantize(Backend& be, uint32_t quant, DType out_dtype, int rows, int cols, bool ids, uint32_t seed);
// check_dequantize for every format and output type, with and without ids (`rows` rows; K types
// k_cols wide, the others 96).
void check_dequantize_all(Backend& be, int rows, int k_cols, uint32_t seed);

// linear() with quantised w (GPU only: cuBLAS) for `rows` rows: gemv up to kGemvMaxRows rows, a
// dequantised 16-bit copy of w and cuBLAS beyond; against the dequantised matrix in double. Beyond
// kGemvMaxRows the copy rounds w to x's type: the bound adds that rounding, 2^-p |x| |w| per term
// (p = 11 for F16, 8 for BF16), to float32 summation's.
void check_quant_linear(Backend& be, const std::function<void(const LinearArgs&)>& linear, uint32_t quant,
                        DType dtype, int rows, int in, int out, bool accumulate, uint32_t seed);

}  // namespace pkv::cuda::test
