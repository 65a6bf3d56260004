// Choosing a device by name: the one place that knows which back ends this build has.
#pragma once
#include <cstddef>
#include <memory>
#include <string>

#include "engine/backend.h"

namespace pkv {

struct BackendOptions {
  std::string device = "cpu";  // cpu | cuda
  std::string gpu_dtype;       // cuda: bf16 | f16; "" = the checkpoint's 16-bit type, else bf16
  bool vision = true;          // cuda: upload the vision tower and projector
  int kv_pool_entries = 0;     // cuda: a pool for one sequence of this many entries per layer, or
  size_t kv_pool_bytes = 0;    // cuda: this many bytes (0: 90% of the free device memory)
  int block_size = 16;         // cuda: entries per KV block
  std::string kv_dtype;        // cpu: the KV cache's storage type, f32 (default, also "") | f16 | bf16
};

// Whether this build has the CUDA back end (the device may still be missing at run time).
bool have_cuda_backend();
// Checks a device name, GPU type and CPU cache type before anything is loaded: an unknown device,
// cuda in a build without the CUDA back end, a bad gpu_dtype or one without cuda, a bad kv_dtype
// (kv_dtype_from_name) or one other than f32 with cuda (the GPU's cache is in the --gpu-dtype
// type) is an Error naming the option.
void check_device_options(const std::string& device, const std::string& gpu_dtype, const std::string& kv_dtype = "");
// The back end of opt.device. Errors (naming --device / --gpu-dtype): an unknown device, cuda in a
// build without the CUDA back end, a bad gpu_dtype; no GPU or not enough memory: Error.
std::unique_ptr<Backend> make_backend(const Model& model, const BackendOptions& opt);
// The GPU compute type for a model: gpu_dtype when given, else the checkpoint's 16-bit type (no
// extra rounding), else BF16 (float32 checkpoints).
DType gpu_compute_dtype(const std::string& gpu_dtype, const Model& model);

}  // namespace pkv
