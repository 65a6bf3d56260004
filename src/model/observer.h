// One observer hook sees every named intermediate tensor (DESIGN.md principle 5): debugging dumps,
// parity tests and calibration statistics all use it, with no second forward pass.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace pkv {

class Observer {
 public:
  virtual ~Observer() = default;
  // Whether on_tensor wants this name (lets the model skip work for unwanted tensors).
  virtual bool wants(const std::string& name) const { (void)name; return true; }
  // layer = -1 for tensors not tied to a layer. data is float32, row-major with the given shape.
  virtual void on_tensor(const std::string& name, int layer, const float* data, const std::vector<int64_t>& shape) = 0;
};

}  // namespace pkv
