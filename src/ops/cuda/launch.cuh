// Launching a planned kernel (internal to src/ops/cuda/): grid and shared memory from a detail::Launch,
// the >48 KiB shared-memory opt-in, and the launch check.
#pragma once
#include <string>
#include <utility>

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

// Whether kernels are launched as programmatic dependents of the kernel before them (sm_90 and
// later; PKV_PDL=0: never): the next kernel's blocks start while this one finishes, and wait in
// pdl_wait() (kernel_types.h) for what it wrote. Every kernel of src/ops/cuda waits before it
// touches memory an earlier kernel writes, so the attribute is safe on all of them.
bool pdl_enabled();

// kernel<<<grid, block, smem, stream>>>(args...), as a programmatic dependent where pdl_enabled().
template <class... KArgs, class... Args>
void launch_kernel(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, const char* name,
                   Args&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid, cfg.blockDim = block, cfg.dynamicSmemBytes = smem, cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  if (pdl_enabled()) {
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr, cfg.numAttrs = 1;
  }
  PKV_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...));
  PKV_CUDA_LAUNCH_CHECK(stream, name);
}

template <class P>
void launch(void (*kernel)(P), const Launch& l, const P& params, cudaStream_t stream, const char* name) {
  if (l.empty()) return;
  prepare_smem(reinterpret_cast<const void*>(kernel), l.smem, name);
  launch_kernel(kernel, dim3(l.grid[0], l.grid[1], l.grid[2]), dim3(unsigned(l.threads)), l.smem, stream, name, params);
}

}  // namespace pkv::cuda::detail
