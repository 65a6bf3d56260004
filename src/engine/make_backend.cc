// The one device switch of the project: everything above the backend seam names a device by string
// and reaches the CUDA back end only through here.
#include "engine/make_backend.h"

#include "core/error.h"
#ifdef PREFIXKV_HAVE_CUDA
#include "engine/cuda_backend.h"
#endif

namespace pkv {

bool have_cuda_backend() {
#ifdef PREFIXKV_HAVE_CUDA
  return true;
#else
  return false;
#endif
}

void check_device_options(const std::string& device, const std::string& gpu_dtype, const std::string& kv_dtype) {
  // The options' own mistakes first, then what this build lacks: the same message for the same
  // typo whichever way prefixkv was built.
  if (device != "cpu" && device != "cuda") fail("--device", "must be cpu or cuda, got '" + device + "'");
  DType g = DType::BF16;
  if (!gpu_dtype.empty() && (!dtype_from_option(gpu_dtype, g) || g == DType::F32))
    fail("--gpu-dtype", "must be bf16 or f16, got '" + gpu_dtype + "'");
  if (device != "cuda" && !gpu_dtype.empty()) fail("--gpu-dtype", "only applies with --device cuda");
  if (kv_dtype_from_name(kv_dtype) != DType::F32 && device == "cuda")
    fail("--kv-dtype", "applies to the CPU engine's cache; the GPU keeps its cache in the --gpu-dtype type");
  if (device == "cuda" && !have_cuda_backend())
    fail("--device cuda", "this prefixkv was built without the CUDA back end (-DPREFIXKV_CUDA=ON)");
}

DType gpu_compute_dtype(const std::string& gpu_dtype, const Model& model) {
  DType t;
  if (dtype_from_option(gpu_dtype, t)) return t;  // f16 or bf16 (check_device_options refuses others)
  const TensorView* embed = model.weights().lm.embed;
  return embed && embed->dtype == DType::F16 ? DType::F16 : DType::BF16;
}

std::unique_ptr<Backend> make_backend(const Model& model, const BackendOptions& opt) {
  check_device_options(opt.device, opt.gpu_dtype, opt.kv_dtype);
  if (opt.device == "cpu") return make_cpu_backend(model, kv_dtype_from_name(opt.kv_dtype));
#ifdef PREFIXKV_HAVE_CUDA
  cuda::CudaBackendOptions o;
  o.dtype = gpu_compute_dtype(opt.gpu_dtype, model);
  o.vision = opt.vision;
  o.kv_pool_entries = opt.kv_pool_entries;
  o.kv_pool_bytes = opt.kv_pool_bytes;
  o.block_size = opt.block_size;
  return cuda::make_cuda_backend(model, o);
#else
  fail("--device cuda", "this prefixkv was built without the CUDA back end (-DPREFIXKV_CUDA=ON)");
#endif
}

}  // namespace pkv
