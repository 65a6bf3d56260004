// Views of stored weights. The bytes live in memory-mapped checkpoint files (io/), never copied.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/dtype.h"

namespace pkv {

// One stored tensor.
struct TensorView {
  std::string name;
  std::string file;        // for error messages
  std::string dtype_str;   // as stored ("F32", "BF16", "I64", ...)
  bool supported = false;  // F32 / F16 / BF16
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  const void* data = nullptr;
  // Nonzero: the rows are ggml blocks of this type (ops/quant.h: Q8_0, Q4_0, Q4_K, Q6_K, from a GGUF
  // file), read through ops::weight_row; `dtype` is then not the storage. shape stays [out, in].
  uint32_t quant = 0;

  int64_t numel() const {
    int64_t n = 1;
    for (auto d : shape) n *= d;
    return n;
  }
  std::string shape_str() const {
    std::string s = "[";
    for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + "]";
  }
};

// A linear layer: weight in its stored dtype, bias converted to float32.
struct Linear {
  const TensorView* w = nullptr;  // [out, in]
  std::vector<float> b;           // [out] or empty
  int in = 0, out = 0;
};

struct Norm {
  std::vector<float> w;  // [dim]
  std::vector<float> b;  // [dim] (LayerNorm) or empty (RMSNorm)
};

}  // namespace pkv
