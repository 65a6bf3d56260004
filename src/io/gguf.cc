#include "io/gguf.h"

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>

#include "core/error.h"

namespace pkv {

namespace {

constexpr uint32_t kMagic = 0x46554747;  // "GGUF" read as a little-endian uint32
constexpr int kMaxDims = 4;              // GGML_MAX_DIMS

struct TypeInfo {
  uint32_t id;
  const char* name;
  int block_elems, block_bytes;
};
// Block sizes of ggml's storage types (ggml's block structs: scale(s) then packed values).
constexpr TypeInfo kTypes[] = {
    {0, "F32", 1, 4},       {1, "F16", 1, 2},        {2, "Q4_0", 32, 18},    {3, "Q4_1", 32, 20},
    {6, "Q5_0", 32, 22},    {7, "Q5_1", 32, 24},     {8, "Q8_0", 32, 34},    {9, "Q8_1", 32, 36},
    {10, "Q2_K", 256, 84},  {11, "Q3_K", 256, 110},  {12, "Q4_K", 256, 144}, {13, "Q5_K", 256, 176},
    {14, "Q6_K", 256, 210}, {15, "Q8_K", 256, 292},  {30, "BF16", 1, 2},
};

// Fixed-size scalar widths of the metadata types (0: not a fixed-size scalar).
size_t scalar_bytes(GgufType t) {
  switch (t) {
    case GgufType::U8: case GgufType::I8: case GgufType::Bool: return 1;
    case GgufType::U16: case GgufType::I16: return 2;
    case GgufType::U32: case GgufType::I32: case GgufType::F32: return 4;
    case GgufType::U64: case GgufType::I64: case GgufType::F64: return 8;
    default: return 0;
  }
}

bool known_value_type(uint32_t t) { return t <= 12; }

// A bounds-checked little-endian cursor over the file's bytes; every read past the end is an Error
// naming what was being read and where.
class Reader {
 public:
  Reader(const uint8_t* p, size_t n, const std::string& where) : p_(p), n_(n), where_(where) {}
  size_t pos() const { return pos_; }
  size_t left() const { return n_ - pos_; }
  const uint8_t* base() const { return p_; }
  void skip(size_t bytes) {
    need(bytes, "data");
    pos_ += bytes;
  }
  void need(size_t bytes, const std::string& what) const {
    if (bytes > left())
      fail(where_, what + " at byte " + std::to_string(pos_) + " needs " + std::to_string(bytes) + " bytes, only " +
                       std::to_string(left()) + " are left (truncated or a false length)");
  }
  template <class T>
  T get(const std::string& what) {
    need(sizeof(T), what);
    T v;
    std::memcpy(&v, p_ + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }
  std::string string(const std::string& what) {
    const uint64_t len = get<uint64_t>(what + "'s length");
    need(len, what + " (" + std::to_string(len) + " bytes)");
    std::string s(reinterpret_cast<const char*>(p_ + pos_), size_t(len));
    pos_ += size_t(len);
    return s;
  }
  [[noreturn]] void bad(const std::string& what) const { fail(where_, what); }

 private:
  const uint8_t* p_;
  size_t n_, pos_ = 0;
  const std::string& where_;
};

GgufValue read_scalar(Reader& r, GgufType t, const std::string& what) {
  GgufValue v;
  v.type = t;
  switch (t) {
    case GgufType::U8: v.u = r.get<uint8_t>(what); v.i = int64_t(v.u); break;
    case GgufType::I8: v.i = r.get<int8_t>(what); break;
    case GgufType::U16: v.u = r.get<uint16_t>(what); v.i = int64_t(v.u); break;
    case GgufType::I16: v.i = r.get<int16_t>(what); break;
    case GgufType::U32: v.u = r.get<uint32_t>(what); v.i = int64_t(v.u); break;
    case GgufType::I32: v.i = r.get<int32_t>(what); break;
    case GgufType::U64: v.u = r.get<uint64_t>(what); v.i = v.u <= uint64_t(INT64_MAX) ? int64_t(v.u) : 0; break;
    case GgufType::I64: v.i = r.get<int64_t>(what); break;
    case GgufType::F32: v.f = r.get<float>(what); break;
    case GgufType::F64: v.f = r.get<double>(what); break;
    case GgufType::Bool: {
      const uint8_t b = r.get<uint8_t>(what);
      if (b > 1) r.bad(what + " is a bool holding " + std::to_string(b) + " (must be 0 or 1)");
      v.b = b != 0;
      break;
    }
    case GgufType::String: v.s = r.string(what); break;
    default: r.bad(what + ": not a scalar type");
  }
  if (t != GgufType::U64 && t != GgufType::F32 && t != GgufType::F64 && t != GgufType::String && t != GgufType::Bool &&
      v.i >= 0)
    v.u = uint64_t(v.i);
  return v;
}

GgufValue read_value(Reader& r, uint32_t type, const std::string& what) {
  if (!known_value_type(type)) r.bad(what + " has the unknown value type " + std::to_string(type));
  const auto t = GgufType(type);
  if (t != GgufType::Array) return read_scalar(r, t, what);
  GgufValue v;
  v.type = GgufType::Array;
  const uint32_t et = r.get<uint32_t>(what + "'s element type");
  if (!known_value_type(et)) r.bad(what + " is an array of the unknown value type " + std::to_string(et));
  v.elem = GgufType(et);
  if (v.elem == GgufType::Array) r.bad(what + " is an array of arrays (not used by the models prefixkv reads)");
  const uint64_t n = r.get<uint64_t>(what + "'s element count");
  // A count beyond what the bytes left can hold is a lie, refused before anything is allocated
  // (a string takes at least its 8-byte length).
  const size_t width = scalar_bytes(v.elem), min_elem = width ? width : 8;
  if (n > r.left() / min_elem)
    r.bad(what + " claims " + std::to_string(n) + " elements of " + gguf_type_name(v.elem) + ", more than the " +
          std::to_string(r.left()) + " bytes left can hold");
  if (width) {
    const size_t bytes = size_t(n) * width;
    r.need(bytes, what);
    v.raw.assign(r.base() + r.pos(), r.base() + r.pos() + bytes);
    if (v.elem == GgufType::Bool)
      for (size_t k = 0; k < bytes; ++k)
        if (v.raw[k] > 1) r.bad(what + "[" + std::to_string(k) + "] is a bool holding " + std::to_string(v.raw[k]));
    r.skip(bytes);
  } else {
    v.strs.reserve(size_t(n));
    for (uint64_t k = 0; k < n; ++k) v.strs.push_back(r.string(what + "[" + std::to_string(k) + "]"));
  }
  return v;
}

void write_raw(std::vector<uint8_t>& out, const void* p, size_t n) {
  const auto* b = static_cast<const uint8_t*>(p);
  out.insert(out.end(), b, b + n);
}
template <class T>
void put(std::vector<uint8_t>& out, T v) {
  write_raw(out, &v, sizeof v);
}
void put_string(std::vector<uint8_t>& out, const std::string& s) {
  put<uint64_t>(out, s.size());
  write_raw(out, s.data(), s.size());
}

void write_value(std::vector<uint8_t>& out, const GgufValue& v, bool with_type) {
  if (with_type) put<uint32_t>(out, uint32_t(v.type));
  switch (v.type) {
    case GgufType::U8: put<uint8_t>(out, uint8_t(v.u)); break;
    case GgufType::I8: put<int8_t>(out, int8_t(v.i)); break;
    case GgufType::U16: put<uint16_t>(out, uint16_t(v.u)); break;
    case GgufType::I16: put<int16_t>(out, int16_t(v.i)); break;
    case GgufType::U32: put<uint32_t>(out, uint32_t(v.u)); break;
    case GgufType::I32: put<int32_t>(out, int32_t(v.i)); break;
    case GgufType::U64: put<uint64_t>(out, v.u); break;
    case GgufType::I64: put<int64_t>(out, v.i); break;
    case GgufType::F32: put<float>(out, float(v.f)); break;
    case GgufType::F64: put<double>(out, v.f); break;
    case GgufType::Bool: put<uint8_t>(out, v.b ? 1 : 0); break;
    case GgufType::String: put_string(out, v.s); break;
    case GgufType::Array:
      PKV_ASSERT_MSG(v.elem != GgufType::Array, "GGUF arrays of arrays are not written");
      put<uint32_t>(out, uint32_t(v.elem));
      put<uint64_t>(out, v.count());
      if (v.elem == GgufType::String) {
        for (const std::string& x : v.strs) put_string(out, x);
      } else {
        PKV_ASSERT(v.raw.size() == v.count() * scalar_bytes(v.elem));
        write_raw(out, v.raw.data(), v.raw.size());
      }
      break;
  }
}

uint64_t align_up(uint64_t x, uint64_t a) { return (x + a - 1) / a * a; }

// Bytes of a tensor of type `type` and shape `ne`; false (with why) when the shape does not fit.
bool storage_bytes(uint32_t type, const std::vector<int64_t>& ne, uint64_t* bytes, std::string* why) {
  const char* name;
  int be, bb;
  if (!ggml_type_info(type, &name, &be, &bb)) {
    *why = "has the unknown ggml type " + std::to_string(type);
    return false;
  }
  if (ne.empty() || int(ne.size()) > kMaxDims) {
    *why = "has " + std::to_string(ne.size()) + " dimensions (1 to " + std::to_string(kMaxDims) + ")";
    return false;
  }
  uint64_t n = 1;
  for (int64_t d : ne) {
    if (d < 1) {
      *why = "has a dimension of " + std::to_string(d);
      return false;
    }
    if (uint64_t(d) > (uint64_t(1) << 62) / n) {
      *why = "has more elements than fit in 62 bits";
      return false;
    }
    n *= uint64_t(d);
  }
  if (ne[0] % be != 0) {
    *why = "is " + std::string(name) + " (blocks of " + std::to_string(be) + ") with rows of " + std::to_string(ne[0]) +
           " elements, not a whole number of blocks";
    return false;
  }
  *bytes = n / uint64_t(be) * uint64_t(bb);
  return true;
}

}  // namespace

const char* gguf_type_name(GgufType t) {
  static const char* names[] = {"uint8", "int8",  "uint16", "int16", "uint32", "int32", "float32",
                                "bool",  "string", "array", "uint64", "int64", "float64"};
  return uint32_t(t) <= 12 ? names[uint32_t(t)] : "unknown";
}

bool ggml_type_info(uint32_t type, const char** name, int* block_elems, int* block_bytes) {
  for (const TypeInfo& t : kTypes)
    if (t.id == type) {
      if (name) *name = t.name;
      if (block_elems) *block_elems = t.block_elems;
      if (block_bytes) *block_bytes = t.block_bytes;
      return true;
    }
  return false;
}

std::string ggml_type_name(uint32_t type) {
  const char* n;
  return ggml_type_info(type, &n, nullptr, nullptr) ? n : "type " + std::to_string(type);
}

GgufValue GgufValue::of_u32(uint32_t v) { GgufValue x; x.type = GgufType::U32; x.u = v; x.i = v; return x; }
GgufValue GgufValue::of_i32(int32_t v) { GgufValue x; x.type = GgufType::I32; x.i = v; x.u = v >= 0 ? uint64_t(v) : 0; return x; }
GgufValue GgufValue::of_u64(uint64_t v) {
  GgufValue x;
  x.type = GgufType::U64;
  x.u = v;
  x.i = v <= uint64_t(INT64_MAX) ? int64_t(v) : 0;
  return x;
}
GgufValue GgufValue::of_f32(float v) { GgufValue x; x.type = GgufType::F32; x.f = v; return x; }
GgufValue GgufValue::of_bool(bool v) { GgufValue x; x.type = GgufType::Bool; x.b = v; return x; }
GgufValue GgufValue::of_string(std::string v) { GgufValue x; x.type = GgufType::String; x.s = std::move(v); return x; }
GgufValue GgufValue::of_strings(std::vector<std::string> v) {
  GgufValue x;
  x.type = GgufType::Array;
  x.elem = GgufType::String;
  x.strs = std::move(v);
  return x;
}
GgufValue GgufValue::of_f32s(const std::vector<float>& v) {
  GgufValue x;
  x.type = GgufType::Array;
  x.elem = GgufType::F32;
  x.raw.resize(v.size() * 4);
  if (!v.empty()) std::memcpy(x.raw.data(), v.data(), x.raw.size());
  return x;
}
GgufValue GgufValue::of_i32s(const std::vector<int32_t>& v) {
  GgufValue x;
  x.type = GgufType::Array;
  x.elem = GgufType::I32;
  x.raw.resize(v.size() * 4);
  if (!v.empty()) std::memcpy(x.raw.data(), v.data(), x.raw.size());
  return x;
}

size_t GgufValue::count() const {
  if (type != GgufType::Array) return 0;
  if (elem == GgufType::String) return strs.size();
  const size_t w = scalar_bytes(elem);
  return w ? raw.size() / w : 0;
}

int64_t GgufValue::integer_at(size_t k) const {
  PKV_ASSERT(type == GgufType::Array && k < count());
  const uint8_t* p = raw.data() + k * scalar_bytes(elem);
  auto ld = [&](auto v) {
    std::memcpy(&v, p, sizeof v);
    return v;
  };
  switch (elem) {
    case GgufType::U8: return ld(uint8_t{});
    case GgufType::I8: return ld(int8_t{});
    case GgufType::U16: return ld(uint16_t{});
    case GgufType::I16: return ld(int16_t{});
    case GgufType::U32: return ld(uint32_t{});
    case GgufType::I32: return ld(int32_t{});
    case GgufType::U64: return int64_t(ld(uint64_t{}));
    case GgufType::I64: return ld(int64_t{});
    case GgufType::Bool: return ld(uint8_t{});
    default: return int64_t(number_at(k));
  }
}

double GgufValue::number_at(size_t k) const {
  PKV_ASSERT(type == GgufType::Array && k < count());
  const uint8_t* p = raw.data() + k * scalar_bytes(elem);
  if (elem == GgufType::F32) {
    float v;
    std::memcpy(&v, p, 4);
    return v;
  }
  if (elem == GgufType::F64) {
    double v;
    std::memcpy(&v, p, 8);
    return v;
  }
  if (elem == GgufType::U64) {
    uint64_t v;
    std::memcpy(&v, p, 8);
    return double(v);
  }
  return double(integer_at(k));
}

int64_t GgufTensor::numel() const {
  int64_t n = 1;
  for (int64_t d : ne) n *= d;
  return n;
}

std::unique_ptr<GgufFile> GgufFile::open(const std::string& path, bool for_weights) {
  auto map = std::make_unique<MappedFile>(path, for_weights);
  std::unique_ptr<GgufFile> f = parse(map->data(), map->size(), path);
  f->map_ = std::move(map);
  return f;
}

std::unique_ptr<GgufFile> GgufFile::parse(const uint8_t* bytes, size_t size, const std::string& where) {
  auto f = std::unique_ptr<GgufFile>(new GgufFile());
  f->where_ = where;
  Reader r(bytes, size, f->where_);
  if (size < 4 || r.get<uint32_t>("the magic") != kMagic) fail(where, "not a GGUF file (it does not start with \"GGUF\")");
  f->version_ = r.get<uint32_t>("the format version");
  if (f->version_ != 2 && f->version_ != 3)
    fail(where, "GGUF version " + std::to_string(f->version_) + " is not supported (2 and 3 are)");
  const uint64_t n_tensors = r.get<uint64_t>("the tensor count");
  const uint64_t n_kv = r.get<uint64_t>("the metadata count");
  // A metadata pair takes at least 8 + 4 + 1 bytes, a tensor info at least 8 + 4 + 8 + 4 + 8.
  if (n_kv > r.left() / 13) fail(where, "claims " + std::to_string(n_kv) + " metadata pairs, more than the file can hold");
  if (n_tensors > r.left() / 32) fail(where, "claims " + std::to_string(n_tensors) + " tensors, more than the file can hold");

  for (uint64_t k = 0; k < n_kv; ++k) {
    const std::string key = r.string("metadata key " + std::to_string(k));
    if (key.empty()) r.bad("metadata key " + std::to_string(k) + " is empty");
    if (f->kv_.count(key)) r.bad("the metadata key '" + key + "' appears twice");
    const uint32_t type = r.get<uint32_t>("the type of '" + key + "'");
    f->kv_[key] = read_value(r, type, "metadata '" + key + "'");
  }
  if (auto it = f->kv_.find("general.alignment"); it != f->kv_.end()) {
    const GgufValue& a = it->second;
    if (a.type != GgufType::U32) fail(where, std::string("general.alignment must be a uint32, it is a ") + gguf_type_name(a.type));
    if (a.u == 0 || (a.u & (a.u - 1)) != 0 || a.u > (1u << 20))
      fail(where, "general.alignment " + std::to_string(a.u) + " is not a power of two up to 2^20");
    f->alignment_ = uint32_t(a.u);
  }

  for (uint64_t k = 0; k < n_tensors; ++k) {
    GgufTensor t;
    t.name = r.string("the name of tensor " + std::to_string(k));
    const std::string what = "tensor '" + t.name + "'";
    if (t.name.empty()) r.bad("tensor " + std::to_string(k) + " has an empty name");
    if (f->index_.count(t.name)) r.bad(what + " appears twice");
    const uint32_t nd = r.get<uint32_t>(what + "'s dimension count");
    if (nd < 1 || nd > uint32_t(kMaxDims))
      r.bad(what + " has " + std::to_string(nd) + " dimensions (1 to " + std::to_string(kMaxDims) + ")");
    for (uint32_t d = 0; d < nd; ++d) {
      const uint64_t v = r.get<uint64_t>(what + "'s dimension " + std::to_string(d));
      if (v > uint64_t(INT64_MAX)) r.bad(what + "'s dimension " + std::to_string(d) + " is negative as a signed count");
      t.ne.push_back(int64_t(v));
    }
    t.type = r.get<uint32_t>(what + "'s type");
    t.offset = r.get<uint64_t>(what + "'s data offset");
    std::string why;
    if (!storage_bytes(t.type, t.ne, &t.bytes, &why)) r.bad(what + " " + why);
    if (t.offset % f->alignment_ != 0)
      r.bad(what + "'s data offset " + std::to_string(t.offset) + " is not a multiple of the alignment " +
            std::to_string(f->alignment_));
    f->index_[t.name] = f->tensors_.size();
    f->tensors_.push_back(std::move(t));
  }

  // The data section: from the next multiple of the alignment to the end of the file.
  const uint64_t data_start = align_up(r.pos(), f->alignment_);
  if (data_start > size && !f->tensors_.empty())
    fail(where, "the tensor data would start at byte " + std::to_string(data_start) + ", past the end (" +
                    std::to_string(size) + " bytes)");
  const uint64_t data_size = data_start <= size ? size - data_start : 0;
  // Every tensor inside it, none overlapping another.
  std::vector<std::pair<uint64_t, const GgufTensor*>> spans;
  for (GgufTensor& t : f->tensors_) {
    if (t.offset > data_size || t.bytes > data_size - t.offset)
      fail(where, "tensor '" + t.name + "' (" + ggml_type_name(t.type) + ", " + std::to_string(t.bytes) +
                      " bytes at data offset " + std::to_string(t.offset) + ") lies beyond the end of the file's " +
                      std::to_string(data_size) + " data bytes");
    t.data = bytes + data_start + t.offset;
    spans.emplace_back(t.offset, &t);
  }
  std::sort(spans.begin(), spans.end());
  for (size_t i = 1; i < spans.size(); ++i)
    if (spans[i - 1].first + spans[i - 1].second->bytes > spans[i].first)
      fail(where, "tensors '" + spans[i - 1].second->name + "' and '" + spans[i].second->name + "' overlap");
  return f;
}

const GgufTensor* GgufFile::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

const GgufValue& GgufFile::value(const std::string& key) const {
  auto it = kv_.find(key);
  if (it == kv_.end()) fail(where_, "lacks the metadata key '" + key + "'");
  return it->second;
}

std::string GgufFile::str(const std::string& key) const {
  const GgufValue& v = value(key);
  if (v.type != GgufType::String) fail(where_, "metadata '" + key + "' is a " + gguf_type_name(v.type) + ", not a string");
  return v.s;
}

int64_t GgufFile::integer(const std::string& key) const {
  const GgufValue& v = value(key);
  if (scalar_bytes(v.type) == 0 || v.type == GgufType::F32 || v.type == GgufType::F64 || v.type == GgufType::Bool)
    fail(where_, "metadata '" + key + "' is a " + gguf_type_name(v.type) + ", not an integer");
  if (v.type == GgufType::U64 && v.u > uint64_t(INT64_MAX)) fail(where_, "metadata '" + key + "' is too large");
  return v.i;
}

double GgufFile::number(const std::string& key) const {
  const GgufValue& v = value(key);
  if (v.type == GgufType::F32 || v.type == GgufType::F64) return v.f;
  return double(integer(key));
}

std::vector<std::string> GgufFile::strings(const std::string& key) const {
  const GgufValue& v = value(key);
  if (v.type != GgufType::Array || v.elem != GgufType::String)
    fail(where_, "metadata '" + key + "' is not an array of strings");
  return v.strs;
}

std::vector<double> GgufFile::numbers(const std::string& key) const {
  const GgufValue& v = value(key);
  if (v.type != GgufType::Array || scalar_bytes(v.elem) == 0 || v.elem == GgufType::Bool)
    fail(where_, "metadata '" + key + "' is not an array of numbers");
  std::vector<double> out(v.count());
  for (size_t k = 0; k < out.size(); ++k) out[k] = v.number_at(k);
  return out;
}

GgufWriter::GgufWriter(uint32_t alignment) : alignment_(alignment) {
  if (alignment == 0 || (alignment & (alignment - 1)) != 0) fail("GGUF writer", "the alignment must be a power of two");
  if (alignment != 32) set("general.alignment", GgufValue::of_u32(alignment));
}

void GgufWriter::set(const std::string& key, GgufValue v) {
  for (auto& [k, old] : kv_)
    if (k == key) {
      old = std::move(v);
      return;
    }
  kv_.emplace_back(key, std::move(v));
}

void GgufWriter::add_tensor(const std::string& name, const std::vector<int64_t>& ne, uint32_t type,
                            std::vector<uint8_t> bytes) {
  std::string why;
  size_t need = 0;
  if (storage_bytes(type, ne, &need, &why) && bytes.size() != need)
    fail("GGUF writer", "tensor '" + name + "' needs " + std::to_string(need) + " bytes as " + ggml_type_name(type) +
                            ", got " + std::to_string(bytes.size()));
  auto held = std::make_shared<const std::vector<uint8_t>>(std::move(bytes));
  add_tensor(name, ne, type, [held](uint8_t* dst) { std::memcpy(dst, held->data(), held->size()); });
}

void GgufWriter::add_tensor(const std::string& name, const std::vector<int64_t>& ne, uint32_t type, Fill fill) {
  if (!fill) fail("GGUF writer", "tensor '" + name + "' has nothing to write");
  for (const GgufTensor& t : tensors_)
    if (t.name == name) fail("GGUF writer", "tensor '" + name + "' added twice");
  GgufTensor t;
  t.name = name;
  t.ne = ne;
  t.type = type;
  std::string why;
  if (!storage_bytes(type, ne, &t.bytes, &why)) fail("GGUF writer", "tensor '" + name + "' " + why);
  tensors_.push_back(std::move(t));
  fill_.push_back(std::move(fill));
}

std::vector<uint8_t> GgufWriter::header() const {
  std::vector<uint8_t> out;
  put<uint32_t>(out, kMagic);
  put<uint32_t>(out, 3);
  put<uint64_t>(out, tensors_.size());
  put<uint64_t>(out, kv_.size());
  for (const auto& [k, v] : kv_) {
    put_string(out, k);
    write_value(out, v, true);
  }
  uint64_t offset = 0;
  for (const GgufTensor& t : tensors_) {
    put_string(out, t.name);
    put<uint32_t>(out, uint32_t(t.ne.size()));
    for (int64_t d : t.ne) put<uint64_t>(out, uint64_t(d));
    put<uint32_t>(out, t.type);
    put<uint64_t>(out, offset);
    offset = align_up(offset + t.bytes, alignment_);
  }
  out.resize(size_t(align_up(out.size(), alignment_)), 0);
  return out;
}

std::vector<uint8_t> GgufWriter::bytes() const {
  std::vector<uint8_t> out = header();
  const size_t data_start = out.size();
  uint64_t offset = 0;
  for (size_t i = 0; i < tensors_.size(); ++i) {
    out.resize(data_start + size_t(offset + tensors_[i].bytes), 0);
    fill_[i](out.data() + data_start + offset);
    offset = align_up(offset + tensors_[i].bytes, alignment_);
  }
  return out;
}

void GgufWriter::write(const std::string& path) const {
  const std::string tmp = path + ".tmp";
  try {
    std::ofstream f(tmp, std::ios::binary);
    if (!f) fail(path, "cannot write the GGUF file");
    const std::vector<uint8_t> head = header();
    f.write(reinterpret_cast<const char*>(head.data()), std::streamsize(head.size()));
    // One tensor at a time, each followed by the padding to the next one's aligned offset.
    std::vector<uint8_t> buf;
    for (size_t i = 0; i < tensors_.size() && f; ++i) {
      const uint64_t padded = i + 1 < tensors_.size() ? align_up(tensors_[i].bytes, alignment_) : tensors_[i].bytes;
      buf.assign(size_t(padded), 0);
      fill_[i](buf.data());
      f.write(reinterpret_cast<const char*>(buf.data()), std::streamsize(buf.size()));
    }
    if (!f) fail(path, "writing the GGUF file failed (disk full?)");
  } catch (...) {  // a failed write or a tensor that could not be made: no partial file stays behind
    std::error_code ignored;
    std::filesystem::remove(tmp, ignored);
    throw;
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) fail(path, "cannot move the written GGUF file into place: " + ec.message());
}

}  // namespace pkv
