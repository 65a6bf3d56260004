// safetensors reading: single files and sharded checkpoints (model.safetensors.index.json).
// Tensors stay in their stored dtype inside the memory mapping.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/tensor.h"
#include "io/mapped_file.h"

namespace pkv {


class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::string& path);  // validates header; throws Error
  const std::map<std::string, TensorView>& tensors() const { return tensors_; }
  const std::string& path() const { return file_->path(); }

 private:
  std::unique_ptr<MappedFile> file_;
  std::map<std::string, TensorView> tensors_;
  std::vector<std::unique_ptr<uint64_t[]>> aligned_copies_;
};

// A tensor held in memory (TensorStore::from_memory): random weights for benchmarks.
struct OwnedTensor {
  std::string name;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  std::vector<uint8_t> data;  // numel x dtype_size bytes, or rows of ggml blocks when quant is set
  uint32_t quant = 0;         // TensorView::quant
  std::string quant_name;     // its name ("Q8_0"), for messages
};

// All tensors of a checkpoint directory (or of one .safetensors file).
class TensorStore {
 public:
  // Opens `path`: a directory with model.safetensors, model.safetensors.index.json or any *.safetensors,
  // or a single .safetensors file. Throws Error naming the file and the problem.
  static std::unique_ptr<TensorStore> open(const std::string& path);
  // Tensors that live in memory (the store owns them); `source` names them in messages.
  static std::unique_ptr<TensorStore> from_memory(const std::string& source, std::vector<OwnedTensor> tensors);
  // Views of memory the store does not own (a mapped GGUF file), kept alive by `owner`, and tensors
  // it owns; names must be distinct.
  static std::unique_ptr<TensorStore> from_views(const std::string& source, std::vector<TensorView> views,
                                                 std::vector<OwnedTensor> owned, std::shared_ptr<const void> owner);

  const TensorView* find(const std::string& name) const;
  bool has(const std::string& name) const { return find(name) != nullptr; }
  const std::map<std::string, const TensorView*>& all() const { return index_; }
  const std::string& source() const { return source_; }

 private:
  std::string source_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, const TensorView*> index_;
  std::vector<OwnedTensor> owned_;
  std::vector<std::unique_ptr<TensorView>> owned_views_;
  std::shared_ptr<const void> owner_;
};

}  // namespace pkv
