// Element-wise and per-row operators: norms, residual add, bias, activations, RoPE, embedding,
// dtype conversion, max-pooling. Twins in src/ops/cpu_ops.cc (see kernels.h).
#include <string>

#include "core/error.h"
#include "ops/cuda/cuda_check.h"
#include "ops/cuda/kernel_types.h"
#include "ops/cuda/kernels.h"
#include "ops/cuda/launch.cuh"

namespace pkv::cuda {
namespace {

using detail::from_f;
using detail::pdl_trigger;
using detail::pdl_wait;
using detail::to_f;

constexpr int kThreads = 256;

// Calls f(T{}) with T the storage type of t.
template <class F>
void dispatch(DType t, F&& f) {
  switch (t) {
    case DType::F32: return f(float{});
    case DType::F16: return f(__half{});
    case DType::BF16: return f(__nv_bfloat16{});
  }
  fail("cuda", "unknown dtype");
}

unsigned blocks_for(size_t n, int threads = kThreads) {
  const size_t b = (n + size_t(threads) - 1) / size_t(threads);
  return unsigned(b < 65536 * 16 ? b : 65536 * 16);  // grid-stride loops cover the rest
}

void check_rows(const char* op, int rows, int dim) {
  if (rows < 0 || dim < 1) fail(std::string("cuda::") + op, "rows must be >= 0 and dim >= 1, got " + std::to_string(rows) + " x " + std::to_string(dim));
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o >= 1; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, <= 1024); every thread gets the result.
__device__ float block_sum(float v, float* sh) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, n_warps = blockDim.x / 32;
  v = warp_sum(v);
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  v = threadIdx.x < n_warps ? sh[lane] : 0.f;
  if (warp == 0) v = warp_sum(v);
  if (threadIdx.x == 0) sh[32] = v;
  __syncthreads();
  const float r = sh[32];
  __syncthreads();  // sh is reused by the next call
  return r;
}

template <class T, class TO>
__global__ void __launch_bounds__(kThreads) rms_norm_kernel(const T* x, TO* y, const float* w, int dim, float eps) {
  pdl_trigger();
  pdl_wait();
  __shared__ float sh[33];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * dim;
  TO* yr = y + row * dim;
  float ss = 0.f;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) {
    const float v = to_f(xr[i]);
    ss += v * v;
  }
  ss = block_sum(ss, sh);
  const float inv = 1.f / sqrtf(ss / float(dim) + eps);
  for (int i = threadIdx.x; i < dim; i += blockDim.x) yr[i] = from_f<TO>(w[i] * (to_f(xr[i]) * inv));
}

// One row per block with the row held in registers: every element is loaded once, all loads of a
// thread are issued together (PER per thread), so a row costs about one memory round trip.
template <class T, class TO, int PER>
__global__ void __launch_bounds__(kThreads) rms_norm_regs_kernel(const T* x, TO* y, const float* w, int dim, float eps) {
  __shared__ float sh[33];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * dim;
  TO* yr = y + row * dim;
  float v[PER], wv[PER];
  float ss = 0.f;
  pdl_trigger();
#pragma unroll
  for (int k = 0; k < PER; ++k) {  // the weights first (no kernel writes them), before the wait
    const int i = threadIdx.x + k * kThreads;
    wv[k] = i < dim ? w[i] : 0.f;
  }
  pdl_wait();
#pragma unroll
  for (int k = 0; k < PER; ++k) {
    const int i = threadIdx.x + k * kThreads;
    v[k] = i < dim ? to_f(xr[i]) : 0.f;
  }
#pragma unroll
  for (int k = 0; k < PER; ++k) ss += v[k] * v[k];
  ss = block_sum(ss, sh);
  const float inv = 1.f / sqrtf(ss / float(dim) + eps);
#pragma unroll
  for (int k = 0; k < PER; ++k) {
    const int i = threadIdx.x + k * kThreads;
    if (i < dim) yr[i] = from_f<TO>(wv[k] * (v[k] * inv));
  }
}

template <class T>
__global__ void __launch_bounds__(kThreads) layer_norm_kernel(const T* x, T* y, const float* w, const float* b, int dim,
                                                              float eps) {
  __shared__ float sh[33];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * dim;
  T* yr = y + row * dim;
  float s = 0.f;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) s += to_f(xr[i]);
  const float mean = block_sum(s, sh) / float(dim);
  float var = 0.f;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) {
    const float d = to_f(xr[i]) - mean;
    var += d * d;
  }
  var = block_sum(var, sh) / float(dim);
  const float inv = 1.f / sqrtf(var + eps);
  for (int i = threadIdx.x; i < dim; i += blockDim.x) yr[i] = from_f<T>((to_f(xr[i]) - mean) * inv * w[i] + b[i]);
}

template <class T>
__global__ void add_kernel(const T* a, const T* b, T* out, size_t n) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    out[i] = from_f<T>(to_f(a[i]) + to_f(b[i]));
}

template <class T>
__global__ void add_bias_kernel(T* y, const float* bias, size_t n, int cols) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    y[i] = from_f<T>(to_f(y[i]) + bias[i % size_t(cols)]);
}

__device__ __forceinline__ float act_fn(float x, ops::Act a) {
  switch (a) {
    case ops::Act::Gelu: return 0.5f * x * (1.f + erff(x * 0.70710678118654752f));
    case ops::Act::GeluTanh: return 0.5f * x * (1.f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
    case ops::Act::QuickGelu: return x / (1.f + expf(-1.702f * x));
    case ops::Act::Silu: return x / (1.f + expf(-x));
    case ops::Act::Relu: return x > 0.f ? x : 0.f;
  }
  return x;
}

template <class T>
__global__ void activate_kernel(T* x, size_t n, ops::Act a) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    x[i] = from_f<T>(act_fn(to_f(x[i]), a));
}

template <class T>
__global__ void swiglu_kernel(T* gate, const T* up, size_t n) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    const float g = to_f(gate[i]);
    gate[i] = from_f<T>(g / (1.f + expf(-g)) * to_f(up[i]));
  }
}

// One thread per (row, head, i < head_dim / 2) rotation pair.
template <class T>
__global__ void rope_kernel(T* x, int rows, int n_heads, int head_dim, int64_t row_stride, const int32_t* pos,
                            const float* inv_freq) {
  const int half = head_dim / 2;
  const size_t n = size_t(rows) * n_heads * half;
  for (size_t t = blockIdx.x * size_t(blockDim.x) + threadIdx.x; t < n; t += size_t(gridDim.x) * blockDim.x) {
    const int i = int(t % half);
    const size_t rh = t / half;
    const int h = int(rh % n_heads);
    const int64_t r = int64_t(rh / n_heads);
    const float ang = float(pos[r]) * inv_freq[i];  // float32 product, as the CPU twin
    float s, c;
    sincosf(ang, &s, &c);
    T* v = x + r * row_stride + int64_t(h) * head_dim;
    const float a = to_f(v[i]), b = to_f(v[i + half]);
    v[i] = from_f<T>(a * c - b * s);
    v[i + half] = from_f<T>(b * c + a * s);
  }
}

template <class Tin, class Tout>
__global__ void embedding_kernel(const Tin* table, int vocab, int dim, const int32_t* ids, Tout* out) {
  const int64_t r = blockIdx.x;
  const int id = ids[r];
  const bool ok = id >= 0 && id < vocab;
  const Tin* src = table + int64_t(ok ? id : 0) * dim;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) out[r * dim + i] = from_f<Tout>(ok ? to_f(src[i]) : 0.f);
}

template <class Tin, class Tout>
__global__ void convert_kernel(const Tin* src, Tout* dst, size_t n) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    dst[i] = from_f<Tout>(to_f(src[i]));
}

__global__ void max_pool_kernel(const float* x, float* y, int rows, int n, int kernel) {
  const size_t total = size_t(rows) * n;
  const int r = kernel / 2;
  for (size_t t = blockIdx.x * size_t(blockDim.x) + threadIdx.x; t < total; t += size_t(gridDim.x) * blockDim.x) {
    const int i = int(t % n);
    const float* xr = x + (t - i);
    const int lo = i - r > 0 ? i - r : 0, hi = i + r < n - 1 ? i + r : n - 1;
    float m = xr[i];
    for (int j = lo; j <= hi; ++j) m = fmaxf(m, xr[j]);
    y[t] = m;
  }
}

cudaStream_t st(void* s) { return static_cast<cudaStream_t>(s); }

}  // namespace

void rms_norm(DType t, const void* x, void* y, const float* weight, int rows, int dim, float eps, void* stream) {
  rms_norm_to(t, x, t, y, weight, rows, dim, eps, stream);
}

void rms_norm_to(DType x_t, const void* x, DType y_t, void* y, const float* weight, int rows, int dim, float eps,
                 void* stream) {
  check_rows("rms_norm", rows, dim);
  if (rows == 0) return;
  if (x_t != y_t && x != nullptr && x == y) fail("cuda::rms_norm", "in place needs the same input and output type");
  dispatch(x_t, [&](auto tag) {
    using T = decltype(tag);
    dispatch(y_t, [&](auto out_tag) {
      using TO = decltype(out_tag);
      const T* xs = static_cast<const T*>(x);
      TO* ys = static_cast<TO*>(y);
      const unsigned g = unsigned(rows);
      auto go = [&](auto kernel) {
        detail::launch_kernel(kernel, dim3(g), dim3(kThreads), 0, st(stream), "rms_norm", xs, ys, weight, dim, eps);
      };
      if (dim <= 4 * kThreads) go(rms_norm_regs_kernel<T, TO, 4>);
      else if (dim <= 8 * kThreads) go(rms_norm_regs_kernel<T, TO, 8>);
      else if (dim <= 16 * kThreads) go(rms_norm_regs_kernel<T, TO, 16>);
      else if (dim <= 32 * kThreads) go(rms_norm_regs_kernel<T, TO, 32>);
      else go(rms_norm_kernel<T, TO>);
    });
  });
}

void layer_norm(DType t, const void* x, void* y, const float* weight, const float* bias, int rows, int dim, float eps,
                void* stream) {
  check_rows("layer_norm", rows, dim);
  if (rows == 0) return;
  dispatch(t, [&](auto tag) {
    using T = decltype(tag);
    layer_norm_kernel<T><<<unsigned(rows), kThreads, 0, st(stream)>>>(static_cast<const T*>(x), static_cast<T*>(y), weight, bias,
                                                                      dim, eps);
    PKV_CUDA_LAUNCH_CHECK(st(stream), "layer_norm");
  });
}

void add(DType t, const void* a, const void* b, void* out, size_t n, void* stream) {
  if (n == 0) return;
  dispatch(t, [&](auto tag) {
    using T = decltype(tag);
    add_kernel<T><<<blocks_for(n), kThreads, 0, st(stream)>>>(static_cast<const T*>(a), static_cast<const T*>(b),
                                                               static_cast<T*>(out), n);
    PKV_CUDA_LAUNCH_CHECK(st(stream), "add");
  });
}

void add_bias(DType t, void* y, const float* bias, int rows, int cols, void* stream) {
  check_rows("add_bias", rows, cols);
  const size_t n = size_t(rows) * cols;
  if (n == 0) return;
  dispatch(t, [&](auto tag) {
    using T = decltype(tag);
    add_bias_kernel<T><<<blocks_for(n), kThreads, 0, st(stream)>>>(static_cast<T*>(y), bias, n, cols);
    PKV_CUDA_LAUNCH_CHECK(st(stream), "add_bias");
  });
}

void activate(DType t, void* x, size_t n, ops::Act act, void* stream) {
  if (n == 0) return;
  dispatch(t, [&](auto tag) {
    using T = decltype(tag);
    activate_kernel<T><<<blocks_for(n), kThreads, 0, st(stream)>>>(static_cast<T*>(x), n, act);
    PKV_CUDA_LAUNCH_CHECK(st(stream), "activate");
  });
}

void swiglu(DType t, void* gate, const void* up, size_t n, void* stream) {
  if (n == 0) return;
  dispatch(t, [&](auto tag) {
    using T = decltype(tag);
    swiglu_kernel<T><<<blocks_for(n), kThreads, 0, st(stream)>>>(static_cast<T*>(gate), static_cast<const T*>(up), n);
    PKV_CUDA_LAUNCH_CHECK(st(stream), "swiglu");
  });
}

void rope(DType t, void* x, int rows, int n_heads, int head_dim, int64_t row_stride, const int32_t* pos,
          const float* inv_freq, void* stream) {
  if (head_dim < 2 || head_dim % 2 != 0) fail("cuda::rope", "head_dim must be even and >= 2, got " + std::to_string(head_dim));
  if (rows < 0 || n_heads < 1) fail("cuda::rope", "rows must be >= 0 and n_heads >= 1");
  const int64_t stride = row_stride ? row_stride : int64_t(n_heads) * head_dim;
  if (stride < int64_t(n_heads) * head_dim) fail("cuda::rope", "row_stride is smaller than n_heads * head_dim");
  const size_t n = size_t(rows) * n_heads * (head_dim / 2);
  if (n == 0) return;
  dispatch(t, [&](auto tag) {
    using T = decltype(tag);
    rope_kernel<T><<<blocks_for(n), kThreads, 0, st(stream)>>>(static_cast<T*>(x), rows, n_heads, head_dim, stride, pos, inv_freq);
    PKV_CUDA_LAUNCH_CHECK(st(stream), "rope");
  });
}

void embedding(DType table_t, const void* table, int vocab, int dim, const int32_t* ids, int n, DType out_t, void* out,
               void* stream) {
  if (vocab < 1 || dim < 1 || n < 0) fail("cuda::embedding", "needs vocab >= 1, dim >= 1, n >= 0");
  if (n == 0) return;
  dispatch(table_t, [&](auto tin) {
    using Tin = decltype(tin);
    dispatch(out_t, [&](auto tout) {
      using Tout = decltype(tout);
      embedding_kernel<Tin, Tout><<<unsigned(n), kThreads, 0, st(stream)>>>(static_cast<const Tin*>(table), vocab, dim, ids,
                                                                           static_cast<Tout*>(out));
      PKV_CUDA_LAUNCH_CHECK(st(stream), "embedding");
    });
  });
}

void convert(DType src_t, const void* src, DType dst_t, void* dst, size_t n, void* stream) {
  if (n == 0) return;
  dispatch(src_t, [&](auto tin) {
    using Tin = decltype(tin);
    dispatch(dst_t, [&](auto tout) {
      using Tout = decltype(tout);
      convert_kernel<Tin, Tout><<<blocks_for(n), kThreads, 0, st(stream)>>>(static_cast<const Tin*>(src), static_cast<Tout*>(dst), n);
      PKV_CUDA_LAUNCH_CHECK(st(stream), "convert");
    });
  });
}

void max_pool_1d(const float* x, float* y, int rows, int n, int kernel, void* stream) {
  if (kernel < 1 || kernel % 2 == 0) fail("cuda::max_pool_1d", "kernel must be odd and >= 1, got " + std::to_string(kernel));
  if (rows < 0 || n < 0) fail("cuda::max_pool_1d", "rows and n must be >= 0");
  const size_t total = size_t(rows) * n;
  if (total == 0) return;
  max_pool_kernel<<<blocks_for(total), kThreads, 0, st(stream)>>>(x, y, rows, n, kernel);
  PKV_CUDA_LAUNCH_CHECK(st(stream), "max_pool_1d");
}

}  // namespace pkv::cuda
