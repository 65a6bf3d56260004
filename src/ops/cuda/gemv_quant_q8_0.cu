// gemv with Q8_0 weights (gemv_quant.cuh).
#include "ops/cuda/gemv_quant.cuh"

namespace pkv::cuda::detail {
void gemv_q8_0(const GemvPlan& plan, cudaStream_t s) { gemv_run_quant<quant::blocks::Q8_0>(plan, s); }
}  // namespace pkv::cuda::detail
