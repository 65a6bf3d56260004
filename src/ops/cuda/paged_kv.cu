// Paged KV cache: row writes and reads, compaction, Elastic merge (bodies in paged_body.h).
#include "ops/cuda/device_ctx.cuh"
#include "ops/cuda/kernels.h"
#include "ops/cuda/launch.cuh"
#include "ops/cuda/paged_body.h"
#include "ops/cuda/plan.h"

namespace pkv::cuda {
namespace detail {
namespace {

template <class T, class S>
__global__ void __launch_bounds__(kPagedThreads) paged_write_kernel(PagedParams p) {
  PKV_KERNEL_CTX(c);
  paged_write<T, S>(c, p);
}

template <class T>
__global__ void __launch_bounds__(kPagedThreads) paged_rope_write_kernel(PagedParams p) {
  PKV_KERNEL_CTX(c);
  paged_rope_write<T>(c, p);
}

template <class T>
__global__ void __launch_bounds__(kPagedThreads) paged_read_kernel(PagedParams p) {
  PKV_KERNEL_CTX(c);
  paged_read<T>(c, p);
}

__global__ void __launch_bounds__(kPagedThreads) paged_compact_kernel(PagedParams p) {
  PKV_KERNEL_CTX(c);
  paged_compact(c, p);
}

__global__ void __launch_bounds__(kPagedThreads) paged_head_compact_kernel(PagedParams p) {
  PKV_KERNEL_CTX(c);
  paged_head_compact(c, p);
}

template <class T>
__global__ void __launch_bounds__(kPagedThreads) paged_merge_kernel(PagedParams p) {
  PKV_KERNEL_CTX(c);
  paged_merge<T>(c, p);
}

template <class T>
void run_write(const PagedPlan& plan, cudaStream_t s) {
  const char* name = "paged_kv_write";
  switch (plan.src_dtype) {
    case DType::F32: return launch(paged_write_kernel<T, float>, plan.launch, plan.params, s, name);
    case DType::F16: return launch(paged_write_kernel<T, __half>, plan.launch, plan.params, s, name);
    case DType::BF16: return launch(paged_write_kernel<T, __nv_bfloat16>, plan.launch, plan.params, s, name);
  }
}

}  // namespace
}  // namespace detail

void paged_kv_write(const PagedKV& kv, const PagedRows& rows, DType src_dtype, const void* k, const void* v,
                    int64_t src_stride, const int32_t* pos, void* stream) {
  const detail::PagedPlan plan = detail::plan_paged_write(kv, rows, src_dtype, k, v, src_stride, pos);
  if (plan.launch.empty()) return;
  const auto s = static_cast<cudaStream_t>(stream);
  if (plan.dtype == DType::F16) detail::run_write<__half>(plan, s);
  else detail::run_write<__nv_bfloat16>(plan, s);
}

void paged_kv_rope_write(const PagedKV& kv, const PagedRows& rows, const RopeWriteArgs& a, void* stream) {
  const detail::PagedPlan plan = detail::plan_paged_rope_write(kv, rows, a);
  if (plan.launch.empty()) return;
  const auto s = static_cast<cudaStream_t>(stream);
  const char* name = "paged_kv_rope_write";
  if (plan.dtype == DType::F16) detail::launch(detail::paged_rope_write_kernel<__half>, plan.launch, plan.params, s, name);
  else detail::launch(detail::paged_rope_write_kernel<__nv_bfloat16>, plan.launch, plan.params, s, name);
}

void paged_kv_read(const PagedKV& kv, const PagedRows& rows, void* k, void* v, int32_t* pos, void* stream) {
  const detail::PagedPlan plan = detail::plan_paged_read(kv, rows, k, v, pos);
  if (plan.launch.empty()) return;
  const auto s = static_cast<cudaStream_t>(stream);
  if (plan.dtype == DType::F16) detail::launch(detail::paged_read_kernel<__half>, plan.launch, plan.params, s, "paged_kv_read");
  else detail::launch(detail::paged_read_kernel<__nv_bfloat16>, plan.launch, plan.params, s, "paged_kv_read");
}

void paged_kv_compact(const PagedKV& kv, const PagedJobs& jobs, void* stream) {
  const detail::PagedPlan plan = detail::plan_paged_compact(kv, jobs);
  detail::launch(detail::paged_compact_kernel, plan.launch, plan.params, static_cast<cudaStream_t>(stream), "paged_kv_compact");
}

void paged_kv_head_compact(const PagedKV& kv, const PagedHeadJobs& jobs, void* stream) {
  const detail::PagedPlan plan = detail::plan_paged_head_compact(kv, jobs);
  detail::launch(detail::paged_head_compact_kernel, plan.launch, plan.params, static_cast<cudaStream_t>(stream),
                 "paged_kv_head_compact");
}

void paged_kv_merge(const PagedKV& kv, const PagedJobs& jobs, void* stream) {
  const detail::PagedPlan plan = detail::plan_paged_merge(kv, jobs);
  const auto s = static_cast<cudaStream_t>(stream);
  if (plan.dtype == DType::F16) detail::launch(detail::paged_merge_kernel<__half>, plan.launch, plan.params, s, "paged_kv_merge");
  else detail::launch(detail::paged_merge_kernel<__nv_bfloat16>, plan.launch, plan.params, s, "paged_kv_merge");
}

}  // namespace pkv::cuda
