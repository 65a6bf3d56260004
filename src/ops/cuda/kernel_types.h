// Element types inside kernels (internal to src/ops/cuda/). Includes CUDA's fp16/bf16 headers, which
// also compile as plain host C++: the kernel bodies (attention_body.h, paged_body.h) are built both
// by nvcc for the GPU and by the host compiler for the CPU emulation test (tests/cuda/emu_*).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_types.h>

#include <cstdint>

namespace pkv::cuda::detail {

__host__ __device__ __forceinline__ float to_f(float x) { return x; }
__host__ __device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__host__ __device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

template <class T>
__host__ __device__ __forceinline__ T from_f(float x);
template <>
__host__ __device__ __forceinline__ float from_f<float>(float x) {
  return x;
}
template <>
__host__ __device__ __forceinline__ __half from_f<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__host__ __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Raw 16 bits <-> 16-bit element (through CUDA's raw structs: no aliasing tricks).
__host__ __device__ __forceinline__ float bits_to_f(uint16_t bits, const __half*) {
  __half_raw r;
  r.x = bits;
  return __half2float(__half(r));
}
__host__ __device__ __forceinline__ float bits_to_f(uint16_t bits, const __nv_bfloat16*) {
  __nv_bfloat16_raw r;
  r.x = bits;
  return __bfloat162float(__nv_bfloat16(r));
}
__host__ __device__ __forceinline__ uint16_t f_to_bits(float x, const __half*) {
  const __half_raw r = __float2half_rn(x);
  return r.x;
}
__host__ __device__ __forceinline__ uint16_t f_to_bits(float x, const __nv_bfloat16*) {
  const __nv_bfloat16_raw r = __float2bfloat16_rn(x);
  return r.x;
}

// Two 16-bit elements packed in 32 bits (element 0 in the low half: little-endian memory order).
template <class T>
__host__ __device__ __forceinline__ void unpack2(uint32_t w, float& a, float& b) {
  a = bits_to_f(uint16_t(w & 0xffffu), static_cast<const T*>(nullptr));
  b = bits_to_f(uint16_t(w >> 16), static_cast<const T*>(nullptr));
}
template <class T>
__host__ __device__ __forceinline__ uint32_t pack2(float a, float b) {
  return uint32_t(f_to_bits(a, static_cast<const T*>(nullptr))) |
         (uint32_t(f_to_bits(b, static_cast<const T*>(nullptr))) << 16);
}

// Programmatic dependent launch (sm_90 and later; launch.cuh sets the launch attribute, PKV_PDL=0
// turns it off): a kernel calls pdl_trigger() first, so that the next kernel in the stream may be
// launched while this one runs, and pdl_wait() before it reads anything an earlier kernel wrote or
// writes anything an earlier kernel may still read (the wait returns once the earlier grids have
// finished and their memory is visible; it is a no-op without the attribute). Before the wait a
// kernel may only read what no kernel writes (weights). No-ops in the host build of the bodies.
__host__ __device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
__host__ __device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// Eight 16-bit elements held in 16 bytes -> float.
template <class T>
__host__ __device__ __forceinline__ void unpack8(const uint4& u, float (&out)[8]) {
  unpack2<T>(u.x, out[0], out[1]);
  unpack2<T>(u.y, out[2], out[3]);
  unpack2<T>(u.z, out[4], out[5]);
  unpack2<T>(u.w, out[6], out[7]);
}

// 16 bytes read once and not again soon (weights streamed through a product): evict-first loads
// on the GPU (__ldcs), a plain load in the host build of the bodies.
__host__ __device__ __forceinline__ uint4 load16_stream(const void* p) {
#if defined(__CUDA_ARCH__)
  return __ldcs(reinterpret_cast<const uint4*>(p));
#else
  return *reinterpret_cast<const uint4*>(p);
#endif
}

// Eight consecutive 16-bit elements (16-byte aligned) -> float, one 16-byte load.
template <class T>
__host__ __device__ __forceinline__ void load8(const T* p, float (&out)[8]) {
  unpack8<T>(*reinterpret_cast<const uint4*>(p), out);
}

}  // namespace pkv::cuda::detail
