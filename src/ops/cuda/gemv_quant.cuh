// The block-quantised gemv kernels of one format (internal to src/ops/cuda/; included by
// gemv_quant_*.cu, one file per format).
#pragma once
#include "ops/cuda/gemv_launch.cuh"
#include "ops/cuda/quant_body.h"

namespace pkv::cuda::detail {

template <class F>
void gemv_run_quant(const GemvPlan& plan, cudaStream_t s) {
  using W = QuantWeights<F>;
  if (plan.w_dtype == DType::F16) {
    if (plan.swiglu) return gemv_run_rows<__half, __half, true, W>(plan, s);
    return gemv_run_rows<__half, float, false, W>(plan, s);
  }
  if (plan.swiglu) return gemv_run_rows<__nv_bfloat16, __nv_bfloat16, true, W>(plan, s);
  return gemv_run_rows<__nv_bfloat16, float, false, W>(plan, s);
}

}  // namespace pkv::cuda::detail
