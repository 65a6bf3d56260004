// gemv with Q4_0 weights (gemv_quant.cuh).
#include "ops/cuda/gemv_quant.cuh"

namespace pkv::cuda::detail {
void gemv_q4_0(const GemvPlan& plan, cudaStream_t s) { gemv_run_quant<quant::blocks::Q4_0>(plan, s); }
}  // namespace pkv::cuda::detail
