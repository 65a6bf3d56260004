// The thread context of the kernel bodies on the GPU: CUDA's intrinsics (see attention_body.h).
#pragma once
#include <cuda_runtime.h>

#include "ops/cuda/kernel_types.h"

namespace pkv::cuda::detail {

struct DeviceCtx {
  int tid, bx, by, bz;
  unsigned char* smem;
  __device__ __forceinline__ void sync() const { __syncthreads(); }
  __device__ __forceinline__ bool sync_or(bool pred) const { return __syncthreads_or(pred) != 0; }
  __device__ __forceinline__ void warp_sync() const { __syncwarp(); }
  __device__ __forceinline__ float shfl_xor(float v, int mask) const { return __shfl_xor_sync(0xffffffffu, v, mask); }
};

__device__ __forceinline__ DeviceCtx make_ctx(unsigned char* smem) {
  return DeviceCtx{int(threadIdx.x), int(blockIdx.x), int(blockIdx.y), int(blockIdx.z), smem};
}

}  // namespace pkv::cuda::detail

// Declares the dynamic shared memory of a kernel and its context `c`, after the dependent-launch
// trigger and wait (kernel_types.h: pdl_trigger, pdl_wait): the body may read and write anything.
#define PKV_KERNEL_CTX(c)                                    \
  ::pkv::cuda::detail::pdl_trigger();                        \
  ::pkv::cuda::detail::pdl_wait();                           \
  extern __shared__ __align__(16) unsigned char pkv_smem[]; \
  ::pkv::cuda::detail::DeviceCtx c = ::pkv::cuda::detail::make_ctx(pkv_smem)
// The same without the wait: the body calls pdl_wait() itself before it touches what earlier
// kernels write (the skinny products start streaming their weights first).
#define PKV_KERNEL_CTX_EARLY(c)                              \
  ::pkv::cuda::detail::pdl_trigger();                        \
  extern __shared__ __align__(16) unsigned char pkv_smem[]; \
  ::pkv::cuda::detail::DeviceCtx c = ::pkv::cuda::detail::make_ctx(pkv_smem)
