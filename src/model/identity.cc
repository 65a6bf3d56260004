#include "model/identity.h"

#include <cstdint>
#include <cstdio>
#include <filesystem>

namespace fs = std::filesystem;

namespace pkv {

ModelIdentity model_identity(const Model& model) {
  ModelIdentity id;
  id.name = fs::path(model.config().dir).lexically_normal().filename().string();
  if (id.name.empty()) id.name = fs::path(model.config().dir).lexically_normal().parent_path().filename().string();
  id.n_layers = model.config().text.n_layers;
  // FNV-1a over the tensor index: names, dtypes and shapes (not the values: hashing 14 GB at every
  // start would cost more than it protects).
  uint64_t h = 1469598103934665603ull;
  auto mix = [&](const std::string& s) {
    for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
    h = (h ^ 0xff) * 1099511628211ull;
  };
  mix(std::to_string(id.n_layers));
  for (auto& [name, t] : model.tensors()) {
    mix(name);
    mix(t->dtype_str);
    mix(t->shape_str());
  }
  char buf[17];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(h));
  id.fingerprint = buf;
  return id;
}

}  // namespace pkv
