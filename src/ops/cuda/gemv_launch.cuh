// Launching the gemv kernels (internal to src/ops/cuda/): one kernel per weight reader, element type,
// output type, row count and SwiGLU flag (gemv_body.h). gemv.cu instantiates the dense ones,
// gemv_quant_*.cu the block-quantised ones (one file per format: they compile in parallel).
#pragma once
#include "core/error.h"
#include "ops/cuda/device_ctx.cuh"
#include "ops/cuda/gemv_body.h"
#include "ops/cuda/launch.cuh"
#include "ops/cuda/plan.h"

namespace pkv::cuda::detail {

template <class T, class Y, int R, bool SWIGLU, class W>
__global__ void __launch_bounds__(kGemvThreads) gemv_kernel(GemvParams p) {
  PKV_KERNEL_CTX_EARLY(c);  // gemv() waits after its first weight loads
  gemv<T, Y, R, SWIGLU, W>(c, p);
}

template <class T, class Y, bool SWIGLU, class W>
void gemv_run_rows(const GemvPlan& plan, cudaStream_t s) {
  const char* name = SWIGLU ? "gemv (SwiGLU)" : "gemv";
  switch (plan.params.rows) {
    case 1: return launch(gemv_kernel<T, Y, 1, SWIGLU, W>, plan.launch, plan.params, s, name);
    case 2: return launch(gemv_kernel<T, Y, 2, SWIGLU, W>, plan.launch, plan.params, s, name);
    case 3: return launch(gemv_kernel<T, Y, 3, SWIGLU, W>, plan.launch, plan.params, s, name);
    case 4: return launch(gemv_kernel<T, Y, 4, SWIGLU, W>, plan.launch, plan.params, s, name);
    case 5: return launch(gemv_kernel<T, Y, 5, SWIGLU, W>, plan.launch, plan.params, s, name);
    case 6: return launch(gemv_kernel<T, Y, 6, SWIGLU, W>, plan.launch, plan.params, s, name);
    case 7: return launch(gemv_kernel<T, Y, 7, SWIGLU, W>, plan.launch, plan.params, s, name);
    case 8: return launch(gemv_kernel<T, Y, 8, SWIGLU, W>, plan.launch, plan.params, s, name);
  }
  fail("cuda::gemv", "rows out of range");
}

// Entry points of gemv_quant_*.cu: the block-quantised products of one format (y F32 without w_up,
// x's type with it: plan_gemv allows only these).
void gemv_q8_0(const GemvPlan& plan, cudaStream_t s);
void gemv_q4_0(const GemvPlan& plan, cudaStream_t s);
void gemv_q4_k(const GemvPlan& plan, cudaStream_t s);
void gemv_q6_k(const GemvPlan& plan, cudaStream_t s);

}  // namespace pkv::cuda::detail
