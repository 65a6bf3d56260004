// The value weights (cuda::value_weights) and the output projection's Gram matrices
// (cuda::output_gram) on the host, as the GPU runs them: the same plans (src/ops/cuda/plan.cc), their
// kernel bodies (attention_body.h) run by the block emulator (emu.h), and their cuBLAS products
// (detail::StridedGemm) computed here with cuBLAS's column-major meaning. Used by the emulator tests
// (emu_test.cc) and by the fake device (fake_device.cc), so both run the GPU's orchestration.
#pragma once
#include <cstdint>

#include "ops/cuda/kernels.h"
#include "ops/cuda/plan.h"

namespace pkv::cuda::emu {

// Element i of p (F32, F16 or BF16) as float32 (exact).
float load(DType t, const void* p, int64_t i);

// For every b < g.batch: C_b = op(A_b) op(B_b), each element a double-precision sum over k of the
// float32 values of the inputs (16-bit ones converted exactly), rounded to float32 once. Arguments
// are checked as cuBLAS checks them (leading dimensions at least the stored rows).
void strided_gemm(const detail::StridedGemm& g);

void value_weights(const ValueWeightArgs& a, uint32_t seed = 1);
void output_gram(const OutputGramArgs& a);

}  // namespace pkv::cuda::emu
