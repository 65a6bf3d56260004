// gemv with Q6_K weights (gemv_quant.cuh).
#include "ops/cuda/gemv_quant.cuh"

namespace pkv::cuda::detail {
void gemv_q6_k(const GemvPlan& plan, cudaStream_t s) { gemv_run_quant<quant::blocks::Q6_K>(plan, s); }
}  // namespace pkv::cuda::detail
