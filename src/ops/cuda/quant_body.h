// Block-quantised weights in the kernels (internal to src/ops/cuda/): the gemv body's weight reader
// for ggml's blocks and the body of dequantize_rows(). Built by nvcc for the GPU and by the host
// compiler for the CPU emulation test, like the other bodies. The block formats' rules are the
// CPU's own (ops/quant_blocks.h).
//
// In the gemv body (gemv_body.h) lane l of a warp reads columns slice * 256 + 8 l + ... of a row, so a
// warp's load instruction covers 256 consecutive elements: 8 Q8_0 / Q4_0 blocks (272 / 144 bytes),
// or one Q4_K / Q6_K block (144 / 210 bytes), each lane the 8 elements of one piece. A block's
// scales are read by the lanes that share it in the same instruction (one transaction), its packed
// values once; every byte of the row is fetched from memory once.
#pragma once
#include <cstdint>

#include "ops/cuda/gemv_body.h"
#include "ops/cuda/kernel_types.h"
#include "ops/cuda/plan.h"
#include "ops/quant_blocks.h"

namespace pkv::cuda::detail {

template <class F>
struct QuantWeights {
  using Raw = typename F::template Raw<8>;
  __device__ static const uint8_t* block(const void* w, int64_t row, int in, int k) {
    return static_cast<const uint8_t*>(w) + (row * (in / F::kElems) + k / F::kElems) * F::kBytes;
  }
  __device__ static Raw load(const void* w, int64_t row, int in, int k) {
    return F::template load<8>(block(w, row, in, k), (k % F::kElems) / 8);
  }
  __device__ static void decode(const Raw& r, int k, float (&v)[8]) {
    F::template decode<8>(r, (k % F::kElems) / 8, v);
  }
};

// Thread i of the launch: piece i % (cols / 8) of output row i / (cols / 8).
template <class F, class Y, class Ctx>
__device__ void dequantize_rows(Ctx& c, const DequantParams& p) {
  const int per_row = p.cols / 8;
  const int64_t i = int64_t(c.bx) * kDequantThreads + c.tid;
  if (i >= int64_t(p.n) * per_row) return;
  const int r = int(i / per_row), k = int(i % per_row) * 8;
  const int64_t src = p.ids ? int64_t(p.ids[r]) : int64_t(r);
  float v[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  if (src >= 0 && src < p.rows) QuantWeights<F>::decode(QuantWeights<F>::load(p.w, src, p.cols, k), k, v);
  Y* out = static_cast<Y*>(p.out) + int64_t(r) * p.out_stride + k;
#pragma unroll
  for (int j = 0; j < 8; ++j) out[j] = from_f<Y>(v[j]);
}

}  // namespace pkv::cuda::detail
