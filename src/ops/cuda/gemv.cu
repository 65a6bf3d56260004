// Skinny matrix products for decoding (body in gemv_body.h; plan in plan.cc).
#include <cstdlib>
#include <string>

#include "core/error.h"
#include "ops/cuda/device_ctx.cuh"
#include "ops/cuda/gemv_body.h"
#include "ops/cuda/kernels.h"
#include "ops/cuda/launch.cuh"
#include "ops/cuda/plan.h"

namespace pkv::cuda {
namespace detail {
namespace {

template <class T, class Y, int R, bool SWIGLU>
__global__ void __launch_bounds__(kGemvThreads) gemv_kernel(GemvParams p) {
  PKV_KERNEL_CTX(c);
  gemv<T, Y, R, SWIGLU>(c, p);
}

template <class T, class Y, bool SWIGLU>
void run_rows(const GemvPlan& plan, cudaStream_t s) {
  const char* name = SWIGLU ? "gemv (SwiGLU)" : "gemv";
  switch (plan.params.rows) {
    case 1: return launch(gemv_kernel<T, Y, 1, SWIGLU>, plan.launch, plan.params, s, name);
    case 2: return launch(gemv_kernel<T, Y, 2, SWIGLU>, plan.launch, plan.params, s, name);
    case 3: return launch(gemv_kernel<T, Y, 3, SWIGLU>, plan.launch, plan.params, s, name);
    case 4: return launch(gemv_kernel<T, Y, 4, SWIGLU>, plan.launch, plan.params, s, name);
    case 5: return launch(gemv_kernel<T, Y, 5, SWIGLU>, plan.launch, plan.params, s, name);
    case 6: return launch(gemv_kernel<T, Y, 6, SWIGLU>, plan.launch, plan.params, s, name);
    case 7: return launch(gemv_kernel<T, Y, 7, SWIGLU>, plan.launch, plan.params, s, name);
    case 8: return launch(gemv_kernel<T, Y, 8, SWIGLU>, plan.launch, plan.params, s, name);
  }
  fail("cuda::gemv", "rows out of range");
}

template <class T>
void run_typed(const GemvPlan& plan, cudaStream_t s) {
  const bool f32 = plan.y_dtype == DType::F32;
  if (plan.swiglu) return f32 ? run_rows<T, float, true>(plan, s) : run_rows<T, T, true>(plan, s);
  return f32 ? run_rows<T, float, false>(plan, s) : run_rows<T, T, false>(plan, s);
}

}  // namespace
}  // namespace detail

void gemv(const GemvArgs& a, void* stream) {
  const detail::GemvPlan plan = detail::plan_gemv(a);
  const auto s = static_cast<cudaStream_t>(stream);
  if (plan.w_dtype == DType::F16) detail::run_typed<__half>(plan, s);
  else detail::run_typed<__nv_bfloat16>(plan, s);
}

}  // namespace pkv::cuda
