// Prefill and decode attention: kernels (bodies in attention_body.h) and their launchers.
#include <cstdlib>
#include <cstring>

#include "ops/cuda/attention_body.h"
#include "ops/cuda/attention_mma.cuh"
#include "ops/cuda/device_ctx.cuh"
#include "ops/cuda/kernels.h"
#include "ops/cuda/launch.cuh"
#include "ops/cuda/plan.h"

namespace pkv::cuda {
namespace detail {
namespace {

template <class T, int D>
__global__ void __launch_bounds__(kPrefillThreads) prefill_forward_kernel(PrefillParams p) {
  PKV_KERNEL_CTX(c);
  prefill_forward<T, D>(c, p);
}

template <class T, int D>
__global__ void __launch_bounds__(kPrefillThreads) prefill_importance_kernel(PrefillParams p) {
  PKV_KERNEL_CTX(c);
  prefill_importance<T, D>(c, p);
}

template <class T, int D>
__global__ void __launch_bounds__(kPrefillThreads) prefill_mma_forward_kernel(PrefillParams p) {
  pdl_trigger();
  pdl_wait();
  prefill_mma_forward<T, D>(p);
}

template <class T, int D>
__global__ void __launch_bounds__(kPrefillThreads) prefill_mma_importance_kernel(PrefillParams p) {
  pdl_trigger();
  pdl_wait();
  prefill_mma_importance<T, D>(p);
}

__global__ void __launch_bounds__(256) prefill_importance_reduce_kernel(PrefillParams p) {
  PKV_KERNEL_CTX(c);
  prefill_importance_reduce(c, p);
}

template <class T, int D>
__global__ void __launch_bounds__(kPrefillThreads) prefill_importance_max_kernel(PrefillParams p) {
  PKV_KERNEL_CTX(c);
  prefill_importance_max<T, D>(c, p);
}

__global__ void __launch_bounds__(256) prefill_importance_max_reduce_kernel(PrefillParams p) {
  PKV_KERNEL_CTX(c);
  prefill_importance_max_reduce(c, p);
}

template <class T, int D>
__global__ void __launch_bounds__(kValueWeightKeys) value_weights_kernel(ValueWeightParams p) {
  PKV_KERNEL_CTX(c);
  value_weights<T, D>(c, p);
}

template <class T>
__global__ void __launch_bounds__(kGramSplitThreads) gram_split_kernel(GramSplitParams p) {
  PKV_KERNEL_CTX(c);
  gram_split<T>(c, p);
}

template <class T>
__global__ void __launch_bounds__(kValueRowsThreads) value_rows_kernel(ValueRowsParams p) {
  PKV_KERNEL_CTX(c);
  value_rows<T>(c, p);
}

__global__ void __launch_bounds__(kValueDotThreads) value_weight_dots_kernel(ValueDotParams p) {
  PKV_KERNEL_CTX(c);
  value_weight_dots(c, p);
}

// The maximum over queries (importance_max) after either forward pass: its own kernels.
template <class T, int D>
void run_importance_max(const PrefillPlan& plan, cudaStream_t s) {
  launch(prefill_importance_max_kernel<T, D>, plan.importance_pass, plan.params, s, "attention_prefill (importance max)");
  launch(prefill_importance_max_reduce_kernel, plan.reduce, plan.params, s, "attention_prefill (importance max reduce)");
}

template <class T, int D, int MG>
__global__ void __launch_bounds__(kDecodeThreads) decode_split_kernel(DecodeParams p) {
  PKV_KERNEL_CTX(c);
  decode_split<T, D, MG>(c, p);
}

template <class T>
__global__ void __launch_bounds__(128) decode_combine_kernel(DecodeParams p) {
  PKV_KERNEL_CTX(c);
  decode_combine<T>(c, p);
}

__global__ void __launch_bounds__(128) decode_importance_kernel(DecodeParams p) {
  PKV_KERNEL_CTX(c);
  decode_importance(c, p);
}

template <class T, int D>
void run_prefill(const PrefillPlan& plan, cudaStream_t s) {
  // Blocks of ~86 KB (D = 128): the whole L1 as shared memory lets two share an SM (the tiles live in
  // shared memory; the kernels barely use the L1 cache otherwise).
  static const bool carveout = [] {
    for (const void* f : {reinterpret_cast<const void*>(prefill_forward_kernel<T, D>),
                          reinterpret_cast<const void*>(prefill_importance_kernel<T, D>),
                          reinterpret_cast<const void*>(prefill_mma_forward_kernel<T, D>),
                          reinterpret_cast<const void*>(prefill_mma_importance_kernel<T, D>)})
      PKV_CUDA_CHECK(cudaFuncSetAttribute(f, cudaFuncAttributePreferredSharedMemoryCarveout,
                                          int(cudaSharedmemCarveoutMaxShared)));
    return true;
  }();
  (void)carveout;
  if (plan.tensor_cores) {
    launch(prefill_mma_forward_kernel<T, D>, plan.forward, plan.params, s, "attention_prefill (tensor-core forward)");
    if (!plan.importance) return;
    if (plan.params.importance_max) return run_importance_max<T, D>(plan, s);
    launch(prefill_mma_importance_kernel<T, D>, plan.importance_pass, plan.params, s,
           "attention_prefill (tensor-core importance)");
    launch(prefill_importance_reduce_kernel, plan.reduce, plan.params, s, "attention_prefill (importance reduce)");
    return;
  }
  launch(prefill_forward_kernel<T, D>, plan.forward, plan.params, s, "attention_prefill (forward)");
  if (!plan.importance) return;
  if (plan.params.importance_max) return run_importance_max<T, D>(plan, s);
  launch(prefill_importance_kernel<T, D>, plan.importance_pass, plan.params, s, "attention_prefill (importance)");
  launch(prefill_importance_reduce_kernel, plan.reduce, plan.params, s, "attention_prefill (importance reduce)");
}

template <class T>
void run_prefill_typed(const PrefillPlan& plan, cudaStream_t s) {
  switch (plan.D) {
    case 32: return run_prefill<T, 32>(plan, s);
    case 64: return run_prefill<T, 64>(plan, s);
    default: return run_prefill<T, 128>(plan, s);
  }
}

template <class T, int D>
void run_decode(const DecodePlan& plan, cudaStream_t s) {
  const char* name = "attention_decode (split)";
  switch (plan.MG) {
    case 1: launch(decode_split_kernel<T, D, 1>, plan.split, plan.params, s, name); break;
    case 2: launch(decode_split_kernel<T, D, 2>, plan.split, plan.params, s, name); break;
    case 4: launch(decode_split_kernel<T, D, 4>, plan.split, plan.params, s, name); break;
    default: launch(decode_split_kernel<T, D, 8>, plan.split, plan.params, s, name); break;
  }
  launch(decode_combine_kernel<T>, plan.combine, plan.params, s, "attention_decode (combine)");
  if (plan.importance) launch(decode_importance_kernel, plan.importance_pass, plan.params, s, "attention_decode (importance)");
}

template <class T>
void run_decode_typed(const DecodePlan& plan, cudaStream_t s) {
  switch (plan.D) {
    case 32: return run_decode<T, 32>(plan, s);
    case 64: return run_decode<T, 64>(plan, s);
    default: return run_decode<T, 128>(plan, s);
  }
}

}  // namespace
}  // namespace detail

namespace {
// What Auto means on this process's device: the tensor-core kernels from compute capability 8.0 on,
// unless the environment sets PKV_PREFILL_MMA=0.
PrefillKernel default_prefill_kernel() {
  static const PrefillKernel k = [] {
    const char* env = std::getenv("PKV_PREFILL_MMA");
    if (env && std::strcmp(env, "0") == 0) return PrefillKernel::CudaCores;
    int dev = 0, major = 0;
    PKV_CUDA_CHECK(cudaGetDevice(&dev));
    PKV_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
    return major >= 8 ? PrefillKernel::TensorCores : PrefillKernel::CudaCores;
  }();
  return k;
}
}  // namespace

void attention_prefill(const PrefillAttentionArgs& args, void* stream) {
  PrefillAttentionArgs a = args;
  if (a.kernel == PrefillKernel::Auto) a.kernel = default_prefill_kernel();
  const detail::PrefillPlan plan = detail::plan_attention_prefill(a);
  if (plan.forward.empty()) return;
  const auto s = static_cast<cudaStream_t>(stream);
  if (plan.dtype == DType::F16) detail::run_prefill_typed<__half>(plan, s);
  else detail::run_prefill_typed<__nv_bfloat16>(plan, s);
}

void value_weights(Blas& blas, const ValueWeightArgs& a) {
  const detail::ValueWeightPlan plan = detail::plan_value_weights(a);
  const auto s = static_cast<cudaStream_t>(blas.stream());
  auto run = [&](auto t) {
    using T = decltype(t);
    if (!a.gram) {
      switch (plan.D) {
        case 32: return detail::launch(detail::value_weights_kernel<T, 32>, plan.launch, plan.params, s, "value_weights");
        case 64: return detail::launch(detail::value_weights_kernel<T, 64>, plan.launch, plan.params, s, "value_weights");
        default: return detail::launch(detail::value_weights_kernel<T, 128>, plan.launch, plan.params, s, "value_weights");
      }
    }
    detail::launch(detail::gram_split_kernel<T>, plan.split_launch, plan.split, s, "value_weights (Gram parts)");
    for (const detail::ValueWeightChunk& c : plan.chunks) {
      detail::launch(detail::value_rows_kernel<T>, c.rows_launch, c.rows, s, "value_weights (value rows)");
      detail::run_strided_gemm(blas, c.gemm);
      detail::launch(detail::value_weight_dots_kernel, c.dots_launch, c.dots, s, "value_weights (dots)");
    }
  };
  if (plan.dtype == DType::F16) run(__half{});
  else run(__nv_bfloat16{});
}

void attention_decode(const DecodeAttentionArgs& a, void* stream) {
  const detail::DecodePlan plan = detail::plan_attention_decode(a);
  if (plan.split.empty()) return;
  const auto s = static_cast<cudaStream_t>(stream);
  if (plan.dtype == DType::F16) detail::run_decode_typed<__half>(plan, s);
  else detail::run_decode_typed<__nv_bfloat16>(plan, s);
}

}  // namespace pkv::cuda
