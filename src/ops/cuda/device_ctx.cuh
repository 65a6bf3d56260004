// The thread context of the kernel bodies on the GPU: CUDA's intrinsics (see attention_body.h).
#pragma once
#include <cuda_runtime.h>

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

// Declares the dynamic shared memory of a kernel and its context `c`.
#define PKV_KERNEL_CTX(c)                                    \
  extern __shared__ __align__(16) unsigned char pkv_smem[]; \
  ::pkv::cuda::detail::DeviceCtx c = ::pkv::cuda::detail::make_ctx(pkv_smem)
