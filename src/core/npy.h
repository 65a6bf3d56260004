// Minimal .npy (format 1.0) reader and writer for float32 / int32 / int64 arrays, C order.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace pkv {

void write_npy(const std::string& path, const float* data, const std::vector<int64_t>& shape);
void write_npy_i32(const std::string& path, const int32_t* data, const std::vector<int64_t>& shape);

struct NpyArray {
  std::vector<int64_t> shape;
  std::vector<float> data;  // converted to float32 (from <f4, <f8, <i4, <i8)
  int64_t numel() const;
};

// Throws pkv::Error naming the file on any malformed input.
NpyArray read_npy(const std::string& path);

}  // namespace pkv
