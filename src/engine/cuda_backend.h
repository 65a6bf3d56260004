// The GPU back end (built with PREFIXKV_CUDA, target pkv_engine_cuda): the model uploaded once
// (cuda::GpuModel), one paged KV pool shared by every sequence and layer (cuda::GpuKVPool), and its
// sequences are cuda::GpuSession's; a batched step is one GpuSession::step_many. Plain C++: no CUDA
// type here. Reached by name through make_backend (engine/make_backend.h).
#pragma once
#include <cstddef>
#include <memory>

#include "core/dtype.h"
#include "engine/backend.h"

namespace pkv::cuda {

struct CudaBackendOptions {
  DType dtype = DType::BF16;  // compute type: BF16 or F16
  bool vision = true;         // upload the vision tower and projector (when the model has them)
  // The KV pool: kv_pool_entries > 0 sizes it for ONE sequence of that many entries in every layer
  // (prefixkv run); else kv_pool_bytes of device memory (0: 90% of what is free after the weights).
  int kv_pool_entries = 0;
  size_t kv_pool_bytes = 0;
  int block_size = 16;
};

// Uploads the model and allocates the pool (pkv::Error when either does not fit, or no GPU).
std::unique_ptr<Backend> make_cuda_backend(const Model& model, const CudaBackendOptions& opt);

}  // namespace pkv::cuda
