// Rows of block-quantised matrices dequantised on the device (body in quant_body.h; plan in plan.cc).
#include <string>

#include "core/error.h"
#include "ops/cuda/device_ctx.cuh"
#include "ops/cuda/kernels.h"
#include "ops/cuda/launch.cuh"
#include "ops/cuda/quant_body.h"
#include "ops/quant.h"

namespace pkv::cuda {
namespace detail {
namespace {

template <class F, class Y>
__global__ void __launch_bounds__(kDequantThreads) dequantize_kernel(DequantParams p) {
  PKV_KERNEL_CTX(c);
  dequantize_rows<F, Y>(c, p);
}

template <class F>
void run_format(const DequantPlan& plan, cudaStream_t s) {
  switch (plan.out_dtype) {
    case DType::F32: return launch(dequantize_kernel<F, float>, plan.launch, plan.params, s, "dequantize_rows");
    case DType::F16: return launch(dequantize_kernel<F, __half>, plan.launch, plan.params, s, "dequantize_rows");
    case DType::BF16: return launch(dequantize_kernel<F, __nv_bfloat16>, plan.launch, plan.params, s, "dequantize_rows");
  }
}

}  // namespace
}  // namespace detail

void dequantize_rows(const DequantArgs& a, void* stream) {
  const detail::DequantPlan plan = detail::plan_dequantize(a);
  const auto s = static_cast<cudaStream_t>(stream);
  namespace b = quant::blocks;
  switch (plan.quant) {
    case quant::kQ8_0: return detail::run_format<b::Q8_0>(plan, s);
    case quant::kQ4_0: return detail::run_format<b::Q4_0>(plan, s);
    case quant::kQ4_K: return detail::run_format<b::Q4_K>(plan, s);
    case quant::kQ6_K: return detail::run_format<b::Q6_K>(plan, s);
  }
  fail("cuda::dequantize_rows", "ggml type " + std::to_string(plan.quant) + " has no kernel");
}

}  // namespace pkv::cuda
