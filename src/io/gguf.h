// llama.cpp's GGUF container (format version 2 and 3, little-endian): typed metadata and tensors
// in ggml's storage types, read by memory mapping and written back. The format, as ggml's
// docs/gguf.md specifies it:
//   "GGUF" | uint32 version | uint64 tensor count | uint64 metadata count
//   metadata: string key | uint32 value type | value (arrays: uint32 element type, uint64 count, elements)
//   tensor infos: string name | uint32 n_dims | uint64 ne[n_dims] (innermost first) | uint32 ggml type
//                 | uint64 offset (from the data section, a multiple of the alignment)
//   padding to the alignment (metadata "general.alignment", uint32, default 32) | the data section
// Strings are a uint64 byte count and the bytes (no terminator).
//
// Reading refuses every inconsistency with one pkv::Error naming the file and what is wrong
// (counts or lengths past the end, unknown types, nesting, a bad alignment, tensors whose shape,
// offset or size do not fit, duplicate names), before any tensor is used.
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "io/mapped_file.h"

namespace pkv {

// Metadata value types (gguf_type).
enum class GgufType : uint32_t {
  U8 = 0, I8 = 1, U16 = 2, I16 = 3, U32 = 4, I32 = 5, F32 = 6, Bool = 7, String = 8, Array = 9,
  U64 = 10, I64 = 11, F64 = 12,
};
const char* gguf_type_name(GgufType t);

// Tensor storage types (ggml_type): those prefixkv reads, and the others by number.
enum class GgmlType : uint32_t {
  F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q8_1 = 9, Q2_K = 10, Q3_K = 11,
  Q4_K = 12, Q5_K = 13, Q6_K = 14, Q8_K = 15, BF16 = 30,
};
// Name ("Q4_K"), elements per block and bytes per block of a ggml type; false for a type this
// reader does not know (its blocks cannot be measured, so a file holding it is refused).
bool ggml_type_info(uint32_t type, const char** name, int* block_elems, int* block_bytes);
std::string ggml_type_name(uint32_t type);

struct GgufValue {
  GgufType type = GgufType::U8;
  // Scalars: integers in i (and u when not negative; u64 values above 2^63 - 1 in u only), floats
  // in f, bools in b, strings in s.
  int64_t i = 0;
  uint64_t u = 0;
  double f = 0;
  bool b = false;
  std::string s;
  // Arrays (of scalars or strings; arrays of arrays are refused): the element type, and the
  // elements as stored (scalars, little-endian, in raw) or the strings.
  GgufType elem = GgufType::U8;
  std::vector<uint8_t> raw;
  std::vector<std::string> strs;
  size_t count() const;                   // elements of an array
  double number_at(size_t k) const;       // element k of a numeric array
  int64_t integer_at(size_t k) const;     // element k of an integer array

  static GgufValue of_u32(uint32_t v);
  static GgufValue of_i32(int32_t v);
  static GgufValue of_u64(uint64_t v);
  static GgufValue of_f32(float v);
  static GgufValue of_bool(bool v);
  static GgufValue of_string(std::string v);
  static GgufValue of_strings(std::vector<std::string> v);
  static GgufValue of_f32s(const std::vector<float>& v);
  static GgufValue of_i32s(const std::vector<int32_t>& v);
};

struct GgufTensor {
  std::string name;
  std::vector<int64_t> ne;  // ggml order: ne[0] the innermost (a row), as stored
  uint32_t type = 0;        // GgmlType
  uint64_t offset = 0;      // from the data section
  uint64_t bytes = 0;       // its storage
  const uint8_t* data = nullptr;  // in the mapped file (reading) or null (writing)
  int64_t numel() const;
};

class GgufFile {
 public:
  // for_weights false: only the metadata will be read (the tokenizer), so the file is mapped even
  // under --no-mmap rather than read whole into memory a second time.
  static std::unique_ptr<GgufFile> open(const std::string& path, bool for_weights = true);
  // The same checks over bytes in memory (the fuzz target; `where` names them in errors). The bytes
  // must outlive the object.
  static std::unique_ptr<GgufFile> parse(const uint8_t* bytes, size_t size, const std::string& where);

  const std::string& where() const { return where_; }
  uint32_t version() const { return version_; }
  uint32_t alignment() const { return alignment_; }
  const std::map<std::string, GgufValue>& metadata() const { return kv_; }
  const std::vector<GgufTensor>& tensors() const { return tensors_; }
  const GgufTensor* find(const std::string& name) const;  // null when absent

  // Typed metadata access: an Error naming the file and key when absent or of another type
  // (integers of any width convert where the value fits).
  bool has(const std::string& key) const { return kv_.count(key) != 0; }
  const GgufValue& value(const std::string& key) const;
  std::string str(const std::string& key) const;
  int64_t integer(const std::string& key) const;
  double number(const std::string& key) const;
  std::vector<std::string> strings(const std::string& key) const;
  std::vector<double> numbers(const std::string& key) const;

 private:
  std::string where_;
  std::unique_ptr<MappedFile> map_;
  uint32_t version_ = 0, alignment_ = 32;
  std::map<std::string, GgufValue> kv_;
  std::vector<GgufTensor> tensors_;
  std::map<std::string, size_t> index_;
};

// Writes a GGUF (version 3) file: metadata in the order added, then the tensors' infos and data in
// the order added, each at the next multiple of the alignment. Tensor bytes must be the exact
// storage of their type and shape (checked).
class GgufWriter {
 public:
  explicit GgufWriter(uint32_t alignment = 32);
  void set(const std::string& key, GgufValue v);  // replaces an earlier value of the key
  void add_tensor(const std::string& name, const std::vector<int64_t>& ne, uint32_t type, std::vector<uint8_t> bytes);
  // A tensor whose bytes are made only when the file is written: `fill` writes exactly the storage of
  // `type` and `ne` to the buffer it is given. write() then holds one tensor at a time, so a 7B model
  // exports in about the memory of its largest tensor. What `fill` reads must outlive the writer's
  // last write() or bytes().
  using Fill = std::function<void(uint8_t* dst)>;
  void add_tensor(const std::string& name, const std::vector<int64_t>& ne, uint32_t type, Fill fill);
  // Writes to `path` (through a temporary file renamed at the end: an error leaves no partial file).
  void write(const std::string& path) const;
  // The whole file as bytes (tests, the fuzz target's seeds).
  std::vector<uint8_t> bytes() const;

 private:
  std::vector<uint8_t> header() const;  // up to the first tensor's data (alignment padding included)
  uint32_t alignment_;
  std::vector<std::pair<std::string, GgufValue>> kv_;
  std::vector<GgufTensor> tensors_;
  std::vector<Fill> fill_;
};

}  // namespace pkv
