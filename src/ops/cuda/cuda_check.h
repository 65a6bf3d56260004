// Checked CUDA and cuBLAS calls (internal to src/ops/cuda/ and its tests: this header includes CUDA's).
//
// Every runtime and cuBLAS call goes through PKV_CUDA_CHECK / PKV_CUBLAS_CHECK. A failure throws
// pkv::Error("<file>:<line>: CUDA error cudaErrorX (<description>) in <call>") through pkv::fail.
// Kernel launches are followed by PKV_CUDA_LAUNCH_CHECK(stream): it catches launch errors at once
// and, when PKV_CUDA_SYNC=1 is set in the environment, synchronises the stream so that an
// asynchronous fault (illegal address, ...) is reported at the launch that caused it.
#pragma once
#include <cublas_v2.h>
#include <cuda_runtime.h>

namespace pkv::cuda {

[[noreturn]] void cuda_failed(cudaError_t err, const char* call, const char* file, int line);
[[noreturn]] void cublas_failed(cublasStatus_t st, const char* call, const char* file, int line);
// True when PKV_CUDA_SYNC is set to a non-empty value other than 0 (read once).
bool debug_sync();
void launch_check(cudaStream_t stream, const char* what, const char* file, int line);

}  // namespace pkv::cuda

#define PKV_CUDA_CHECK(call)                                                             \
  do {                                                                                   \
    const cudaError_t pkv_err_ = (call);                                                 \
    if (pkv_err_ != cudaSuccess) ::pkv::cuda::cuda_failed(pkv_err_, #call, __FILE__, __LINE__); \
  } while (0)

#define PKV_CUBLAS_CHECK(call)                                                                  \
  do {                                                                                          \
    const cublasStatus_t pkv_st_ = (call);                                                      \
    if (pkv_st_ != CUBLAS_STATUS_SUCCESS) ::pkv::cuda::cublas_failed(pkv_st_, #call, __FILE__, __LINE__); \
  } while (0)

// After every kernel launch: `what` names the kernel in the message.
#define PKV_CUDA_LAUNCH_CHECK(stream, what) ::pkv::cuda::launch_check((stream), (what), __FILE__, __LINE__)
