// The scheduler's GPU back end (prefixkv serve --device cuda): the running sequences are
// cuda::GpuSession's over one paged KV pool, a decode step is one batched GpuSession::step_many, and
// images go through the GPU's vision tower. Built with PREFIXKV_CUDA only (target pkv_serve_gpu).
#pragma once
#include <memory>

#include "model/gpu_model.h"
#include "serve/scheduler.h"

namespace pkv::serve {

struct GpuBackendOptions {
  cuda::GpuModelOptions model;
  // Device memory for the KV pool; 0: 90% of what is free after the weights.
  size_t pool_bytes = 0;
  int block_size = 16;
};

// Uploads the model and allocates the pool (pkv::Error when either does not fit).
std::shared_ptr<SequenceBackend> gpu_backend(const Model& model, const GpuBackendOptions& opt);
// The pool's bytes (what admission reserves from: SchedulerOptions::kv_pool_bytes).
size_t gpu_backend_pool_bytes(const SequenceBackend& backend);

}  // namespace pkv::serve
