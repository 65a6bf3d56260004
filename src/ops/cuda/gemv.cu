// Skinny matrix products for decoding (body in gemv_body.h; plan in plan.cc; launches in
// gemv_launch.cuh): the dense kernels here, the block-quantised ones in gemv_quant_*.cu.
#include <string>

#include "core/error.h"
#include "ops/cuda/gemv_launch.cuh"
#include "ops/cuda/kernels.h"
#include "ops/quant.h"

namespace pkv::cuda {
namespace detail {
namespace {

template <class T>
void run_typed(const GemvPlan& plan, cudaStream_t s) {
  using W = DenseWeights<T>;
  const bool f32 = plan.y_dtype == DType::F32;
  if (plan.swiglu) return f32 ? gemv_run_rows<T, float, true, W>(plan, s) : gemv_run_rows<T, T, true, W>(plan, s);
  return f32 ? gemv_run_rows<T, float, false, W>(plan, s) : gemv_run_rows<T, T, false, W>(plan, s);
}

}  // namespace
}  // namespace detail

void gemv(const GemvArgs& a, void* stream) {
  const detail::GemvPlan plan = detail::plan_gemv(a);
  const auto s = static_cast<cudaStream_t>(stream);
  switch (plan.w_quant) {
    case 0: break;
    case quant::kQ8_0: return detail::gemv_q8_0(plan, s);
    case quant::kQ4_0: return detail::gemv_q4_0(plan, s);
    case quant::kQ4_K: return detail::gemv_q4_k(plan, s);
    case quant::kQ6_K: return detail::gemv_q6_k(plan, s);
    default: fail("cuda::gemv", "ggml type " + std::to_string(plan.w_quant) + " has no kernel");
  }
  if (plan.w_dtype == DType::F16) detail::run_typed<__half>(plan, s);
  else detail::run_typed<__nv_bfloat16>(plan, s);
}

}  // namespace pkv::cuda
