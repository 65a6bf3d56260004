// Launching a planned kernel (internal to src/ops/cuda/): grid and shared memory from a detail::Launch,
// the >48 KiB shared-memory opt-in, and the launch check.
#pragma once
#include <string>

#include "core/error.h"
#include "ops/cuda/cuda_check.h"
#include "ops/cuda/plan.h"

namespace pkv::cuda::detail {

inline void prepare_smem(const void* kernel, size_t smem, const char* name) {
  if (smem <= 48 * 1024) return;
  int dev = 0, optin = 0;
  PKV_CUDA_CHECK(cudaGetDevice(&dev));
  PKV_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  if (size_t(optin) < smem)
    fail(std::string("cuda::") + name, "needs " + std::to_string(smem) + " bytes of shared memory per block, the device allows " +
                                           std::to_string(optin));
  PKV_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
}

template <class P>
void launch(void (*kernel)(P), const Launch& l, const P& params, cudaStream_t stream, const char* name) {
  if (l.empty()) return;
  prepare_smem(reinterpret_cast<const void*>(kernel), l.smem, name);
  kernel<<<dim3(l.grid[0], l.grid[1], l.grid[2]), dim3(unsigned(l.threads)), l.smem, stream>>>(params);
  PKV_CUDA_LAUNCH_CHECK(stream, name);
}

}  // namespace pkv::cuda::detail
