// Skinny products on tensor cores (kernels.h: skinny; plan in plan.cc: plan_skinny). GPU only: the
// CPU emulator cannot run mma.sync, so tests/cuda/test_cuda_kernels.cc compares this kernel with the
// CPU twin (ops::linear_reference, ops::swiglu) on the GPU itself.
//
// y[r, o] = sum_k x[r, k] W[o, k] for 1-64 rows r: W is the mma's A operand (16 outputs x 16 columns,
// row-major as stored), x^T its B operand (16 columns x 8 rows, column-major: a row of x is a
// column of B), C the 16 x 8 float32 accumulator. Warp w of a block owns outputs o0 + 16 w + [0, 16)
// and every 8-row tile of x, over the block's slice of the columns.
//
// Loads. Lane (g, t) = (lane / 4, lane % 4) reads, per chunk of 64 columns, 16 consecutive elements
// (32 bytes) of its weight rows o + g and o + g + 8 at columns 16 t .. 16 t + 15, straight from
// global memory (evict-first; the four lanes of a row cover 128 contiguous bytes), and the same
// columns of x rows 8 j + g from shared memory. The mma's fragment wants, for each 16-column step,
// columns {2t, 2t+1, 2t+8, 2t+9} of a lane's rows; the sum over columns does not care which
// columns a step takes as long as A and B agree, so step s of a chunk takes the lane's elements
// 4s .. 4s+3 in both operands (a permutation of the chunk's columns, the same for W and x). Each
// weight element is read from memory once for all rows, and feeds NT mma's.
#include <cstdlib>
#include <cstring>
#include <string>

#include <cuda_runtime.h>

#include "core/error.h"
#include "ops/cuda/cuda_check.h"
#include "ops/cuda/kernel_types.h"
#include "ops/cuda/kernels.h"
#include "ops/cuda/launch.cuh"
#include "ops/cuda/mma.cuh"
#include "ops/cuda/plan.h"

namespace pkv::cuda {
namespace detail {
namespace {

__device__ __forceinline__ float skinny_silu(float g) { return g / (1.f + expf(-g)); }

__device__ __forceinline__ uint32_t word_of(const uint4 (&v)[2], int i) {
  const uint4& u = v[i / 4];
  switch (i % 4) {
    case 0: return u.x;
    case 1: return u.y;
    case 2: return u.z;
    default: return u.w;
  }
}

template <class T, class Y>
__device__ __forceinline__ void store_out(const SkinnyParams& p, int r, int o, float v) {
  Y* y = static_cast<Y*>(p.y) + int64_t(r) * p.y_stride + o;
  if constexpr (std::is_same<Y, float>::value) *y = p.accumulate ? *y + v : v;
  else *y = from_f<T>(v);
}

template <class T, class Y, int NT, bool SWIGLU>
__global__ void __launch_bounds__(kSkinnyThreads, 1) skinny_kernel(SkinnyParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  constexpr int N = SWIGLU ? 2 : 1;  // weight matrices (gate, up)
  constexpr int U = SWIGLU ? 2 : 4;  // chunks whose weights are in flight at once
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* xs = reinterpret_cast<T*>(smem_raw);
  const int xstride = p.k_per_block + 8;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int k0 = blockIdx.y * p.k_per_block;
  const int kn = min(p.k_per_block, p.in - k0);  // a multiple of 64
  const int chunks = kn / kSkinnyChunk;
  pdl_trigger();
  // x's slice into shared memory (rows past `rows` are zeros: their products are never stored),
  // after the earlier kernels are done (pdl_wait): called once the first weights are on their way.
  auto load_x = [&] {
    pdl_wait();
    const int vecs = kn / 8;
    const T* x = static_cast<const T*>(p.x);
    for (int i = threadIdx.x; i < 8 * NT * vecs; i += kSkinnyThreads) {
      const int r = i / vecs, v = i % vecs;
      T* dst = xs + r * xstride + v * 8;
      if (r < p.rows) cp_async16(dst, x + int64_t(r) * p.x_stride + k0 + v * 8);
      else *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
    }
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
  };

  const int o0 = blockIdx.x * kSkinnyOuts + warp * 16;
  // Rows past `out` read the last row (in bounds); their sums are never stored.
  const int64_t ra = min(o0 + g, p.out - 1), rb = min(o0 + g + 8, p.out - 1);
  const T* wm[N];
  wm[0] = static_cast<const T*>(p.w);
  if (SWIGLU) wm[N - 1] = static_cast<const T*>(p.w_up);

  float acc[N][NT][4];
#pragma unroll
  for (int n = 0; n < N; ++n)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[n][j][e] = 0.f;

  bool x_ready = false;
  for (int c0 = 0; c0 < chunks; c0 += U) {
    uint4 wa[U][N][2], wb[U][N][2];  // rows o+g and o+g+8, 16 elements each
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int col = k0 + (c0 + u) * kSkinnyChunk + 16 * t;
#pragma unroll
      for (int n = 0; n < N; ++n) {
        if (c0 + u < chunks) {
          wa[u][n][0] = load16_stream(wm[n] + ra * p.in + col);
          wa[u][n][1] = load16_stream(wm[n] + ra * p.in + col + 8);
          wb[u][n][0] = load16_stream(wm[n] + rb * p.in + col);
          wb[u][n][1] = load16_stream(wm[n] + rb * p.in + col + 8);
        } else {
          wa[u][n][0] = wa[u][n][1] = wb[u][n][0] = wb[u][n][1] = make_uint4(0, 0, 0, 0);
        }
      }
    }
    if (!x_ready) {  // the first weights are on their way; now x
      load_x();
      x_ready = true;
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (c0 + u >= chunks) break;
      const T* xc = xs + (c0 + u) * kSkinnyChunk + 16 * t;
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        uint4 xv[2];
        xv[0] = *reinterpret_cast<const uint4*>(xc + (8 * j + g) * xstride);
        xv[1] = *reinterpret_cast<const uint4*>(xc + (8 * j + g) * xstride + 8);
#pragma unroll
        for (int s = 0; s < 4; ++s) {
          const uint32_t b0 = word_of(xv, 2 * s), b1 = word_of(xv, 2 * s + 1);
#pragma unroll
          for (int n = 0; n < N; ++n) {
            const uint32_t a[4] = {word_of(wa[u][n], 2 * s), word_of(wb[u][n], 2 * s), word_of(wa[u][n], 2 * s + 1),
                                   word_of(wb[u][n], 2 * s + 1)};
            mma16816<T>(acc[n][j], a, b0, b1);
          }
        }
      }
    }
  }
  if (!x_ready) load_x();  // no chunk (cannot happen: plans give every block at least one)

  // acc[n][j][e]: output o0 + g + 8 (e / 2), row 8 j + 2 t + e % 2.
  if (p.splits == 1) {
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int o = o0 + g + 8 * (e / 2), r = 8 * j + 2 * t + e % 2;
        if (o >= p.out || r >= p.rows) continue;
        float v = acc[0][j][e];
        if constexpr (SWIGLU) v = skinny_silu(v) * acc[N - 1][j][e];
        store_out<T, Y>(p, r, o, v);
      }
    return;
  }
  // Partial sums of this slice, then the last block of this column of blocks adds them all.
  const int64_t plane = int64_t(p.rows) * p.out;
#pragma unroll
  for (int n = 0; n < N; ++n)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int o = o0 + g + 8 * (e / 2), r = 8 * j + 2 * t + e % 2;
        if (o < p.out && r < p.rows) p.partial[(int64_t(blockIdx.y) * N + n) * plane + int64_t(r) * p.out + o] = acc[n][j][e];
      }
  __threadfence();
  __syncthreads();
  __shared__ int last;
  if (threadIdx.x == 0) last = atomicAdd(&p.counters[blockIdx.x], 1u) == unsigned(p.splits - 1);
  __syncthreads();
  if (!last) return;
  __threadfence();
  const int ob = blockIdx.x * kSkinnyOuts;
  const int width = min(kSkinnyOuts, p.out - ob);
  for (int i = threadIdx.x; i < p.rows * kSkinnyOuts; i += kSkinnyThreads) {
    const int r = i / kSkinnyOuts, oo = i % kSkinnyOuts;
    if (oo >= width) continue;
    const int64_t at = int64_t(r) * p.out + ob + oo;
    float v[N];
#pragma unroll
    for (int n = 0; n < N; ++n) {
      float s = 0.f;
      for (int sp = 0; sp < p.splits; ++sp) s += __ldcg(p.partial + (int64_t(sp) * N + n) * plane + at);
      v[n] = s;
    }
    float out = v[0];
    if constexpr (SWIGLU) out = skinny_silu(v[0]) * v[N - 1];
    store_out<T, Y>(p, r, ob + oo, out);
  }
  if (threadIdx.x == 0) p.counters[blockIdx.x] = 0;  // ready for the next launch
#else
  __trap();  // planned only for sm_80 and later (skinny_enabled checks the device)
#endif
}

template <class T, class Y, bool SWIGLU>
void run_tiles(const SkinnyPlan& plan, cudaStream_t s) {
  const char* name = SWIGLU ? "skinny (SwiGLU)" : "skinny";
  switch (plan.n_tiles) {
    case 1: return launch(skinny_kernel<T, Y, 1, SWIGLU>, plan.launch, plan.params, s, name);
    case 2: return launch(skinny_kernel<T, Y, 2, SWIGLU>, plan.launch, plan.params, s, name);
    case 3: return launch(skinny_kernel<T, Y, 3, SWIGLU>, plan.launch, plan.params, s, name);
    case 4: return launch(skinny_kernel<T, Y, 4, SWIGLU>, plan.launch, plan.params, s, name);
    case 5: return launch(skinny_kernel<T, Y, 5, SWIGLU>, plan.launch, plan.params, s, name);
    case 6: return launch(skinny_kernel<T, Y, 6, SWIGLU>, plan.launch, plan.params, s, name);
    case 7: return launch(skinny_kernel<T, Y, 7, SWIGLU>, plan.launch, plan.params, s, name);
    case 8: return launch(skinny_kernel<T, Y, 8, SWIGLU>, plan.launch, plan.params, s, name);
  }
  fail("cuda::skinny", "rows out of range");
}

template <class T>
void run_typed(const SkinnyPlan& plan, cudaStream_t s) {
  const bool f32 = plan.y_dtype == DType::F32;
  if (plan.swiglu) return f32 ? run_tiles<T, float, true>(plan, s) : run_tiles<T, T, true>(plan, s);
  return f32 ? run_tiles<T, float, false>(plan, s) : run_tiles<T, T, false>(plan, s);
}

}  // namespace
}  // namespace detail

bool skinny_enabled() {
  static const bool on = [] {
    // Off unless asked for: on an H100 it matched cuBLAS at 8 rows and fell behind it from 16 rows
    // on (48 rows: 0.56-0.73x its speed; docs/PERF.md), so linear() keeps cuBLAS by default.
    const char* env = std::getenv("PKV_SKINNY");
    if (!env || std::strcmp(env, "1") != 0) return false;
    int dev = 0, major = 0;
    if (cudaGetDevice(&dev) != cudaSuccess) return false;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) return false;
    return major >= 8;
  }();
  return on;
}

void skinny(const GemvArgs& a, Blas& blas) {
  detail::SkinnyPlan plan = detail::plan_skinny(a);
  if (plan.partial_bytes) {
    const Blas::SkinnyWorkspace ws = blas.skinny_workspace(plan.partial_bytes);
    if (ws.n_counters < int(plan.launch.grid[0]))
      fail("cuda::skinny", "the workspace has " + std::to_string(ws.n_counters) + " counters, the product needs " +
                               std::to_string(plan.launch.grid[0]));
    plan.params.partial = ws.partial, plan.params.counters = ws.counters;
  }
  const auto s = static_cast<cudaStream_t>(blas.stream());
  if (plan.w_dtype == DType::F16) detail::run_typed<__half>(plan, s);
  else detail::run_typed<__nv_bfloat16>(plan, s);
}

}  // namespace pkv::cuda
