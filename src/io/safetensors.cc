#include "io/safetensors.h"

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>

#include <nlohmann/json.hpp>

#include "core/file.h"
#include "core/error.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace pkv {

static size_t stored_elem_size(const std::string& t) {
  if (t == "F64" || t == "I64" || t == "U64") return 8;
  if (t == "F32" || t == "I32" || t == "U32") return 4;
  if (t == "F16" || t == "BF16" || t == "I16" || t == "U16") return 2;
  if (t == "I8" || t == "U8" || t == "BOOL" || t == "F8_E4M3" || t == "F8_E5M2") return 1;
  return 0;
}

SafetensorsFile::SafetensorsFile(const std::string& path) {
  file_ = std::make_unique<MappedFile>(path);
  const size_t size = file_->size();
  if (size < 8) fail(path, "not a safetensors file: " + std::to_string(size) + " bytes, too short for a header");
  uint64_t hlen = 0;
  std::memcpy(&hlen, file_->data(), 8);
  if (hlen == 0 || hlen > size - 8)
    fail(path, "safetensors header length " + std::to_string(hlen) + " exceeds the file size " +
                   std::to_string(size) + " (truncated or not a safetensors file)");
  json header;
  try {
    header = json::parse(file_->data() + 8, file_->data() + 8 + hlen);
  } catch (const std::exception& e) {
    fail(path, std::string("safetensors header is not valid JSON: ") + e.what());
  }
  if (!header.is_object()) fail(path, "safetensors header is not a JSON object");
  const uint8_t* base = file_->data() + 8 + hlen;
  const uint64_t data_size = size - 8 - hlen;
  for (auto& [name, info] : header.items()) {
    if (name == "__metadata__") continue;
    const std::string where = path + ": tensor '" + name + "'";
    if (!info.is_object() || !info.contains("dtype") || !info.contains("shape") || !info.contains("data_offsets"))
      fail(where, "entry lacks dtype, shape or data_offsets");
    TensorView t;
    t.name = name;
    t.file = path;
    if (!info["dtype"].is_string()) fail(where, "dtype is not a string");
    t.dtype_str = info["dtype"].get<std::string>();
    size_t esize = stored_elem_size(t.dtype_str);
    if (esize == 0) fail(where, "unknown dtype '" + t.dtype_str + "'");
    if (t.dtype_str == "F32") t.dtype = DType::F32, t.supported = true;
    if (t.dtype_str == "F16") t.dtype = DType::F16, t.supported = true;
    if (t.dtype_str == "BF16") t.dtype = DType::BF16, t.supported = true;
    if (!info["shape"].is_array()) fail(where, "shape is not an array");
    // The element count as TensorView::numel() forms it (left to right): every partial product must
    // fit in int64_t, and the whole must fit in the data section, before anything multiplies it.
    uint64_t count = 1;
    for (auto& d : info["shape"]) {
      if (!d.is_number_integer() || d.get<int64_t>() < 0) fail(where, "shape has a non-integer or negative dimension");
      const uint64_t dim = d.get<uint64_t>();
      if (dim > uint64_t(INT64_MAX) || (count != 0 && dim > uint64_t(INT64_MAX) / count))
        fail(where, "shape " + info["shape"].dump() + " has more elements than a 64-bit count holds");
      count *= dim;
      t.shape.push_back(int64_t(dim));
    }
    auto& off = info["data_offsets"];
    if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() || !off[1].is_number_unsigned())
      fail(where, "data_offsets must be two non-negative integers");
    uint64_t b = off[0].get<uint64_t>(), e = off[1].get<uint64_t>();
    if (b > e || e > data_size)
      fail(where, "data_offsets [" + std::to_string(b) + ", " + std::to_string(e) + "] lie outside the data section of " +
                      std::to_string(data_size) + " bytes (file truncated or header wrong)");
    if (count > UINT64_MAX / esize)
      fail(where, "holds " + std::to_string(e - b) + " bytes but dtype " + t.dtype_str + " and shape " + t.shape_str() +
                      " need more than 2^64");
    const uint64_t expect = count * esize;
    if (e - b != expect)
      fail(where, "holds " + std::to_string(e - b) + " bytes but dtype " + t.dtype_str + " and shape " + t.shape_str() +
                      " need " + std::to_string(expect));
    t.data = base + b;
    if (esize > 1 && (reinterpret_cast<uintptr_t>(base + b) % esize) != 0) {
      // The format does not promise alignment (writers usually pad the header so it holds):
      // keep an aligned copy of such a tensor.
      aligned_copies_.emplace_back(new uint64_t[(e - b + 7) / 8]);
      std::memcpy(aligned_copies_.back().get(), base + b, e - b);
      t.data = aligned_copies_.back().get();
    }
    tensors_.emplace(name, std::move(t));
  }
}

static std::string bin_error(const std::string& dir) {
  return "this checkpoint holds PyTorch .bin pickles, which prefixkv does not read; convert it first with: "
         "python3 tools/convert_bin_to_safetensors.py " + dir;
}

std::unique_ptr<TensorStore> TensorStore::open(const std::string& path) {
  auto store = std::unique_ptr<TensorStore>(new TensorStore());
  store->source_ = path;
  std::vector<std::string> files;
  std::map<std::string, std::string> expected;  // tensor -> shard file, from the index
  // std::filesystem's throwing calls would escape as std::filesystem::filesystem_error (a name too
  // long, a folder that cannot be read): each answer is checked and becomes a pkv::Error.
  std::error_code ec;
  auto exists = [&](const fs::path& p, const std::string& whose) {
    const bool yes = fs::exists(p, ec);
    if (ec) fail(whose, "cannot look up '" + p.string() + "': " + ec.message());
    return yes;
  };
  if (!exists(path, path)) fail(path, "no such file or directory");
  const bool is_file = fs::is_regular_file(path, ec);
  if (ec) fail(path, "cannot look it up: " + ec.message());
  if (is_file) {
    files.push_back(path);
  } else {
    const fs::path dir(path);
    if (exists(dir / "model.safetensors.index.json", path)) {
      const std::string ipath = (dir / "model.safetensors.index.json").string();
      json idx;
      const std::string text = read_file(ipath, "index");
      try {
        idx = json::parse(text);
      } catch (const std::exception& e) {
        fail(ipath, std::string("not valid JSON: ") + e.what());
      }
      if (!idx.contains("weight_map") || !idx["weight_map"].is_object()) fail(ipath, "lacks a weight_map object");
      std::set<std::string> shard_names;
      for (auto& [name, shard] : idx["weight_map"].items()) {
        if (!shard.is_string()) fail(ipath, "weight_map entry '" + name + "' is not a file name");
        // A shard is a plain file name in the checkpoint's folder: an absolute path or one through
        // ".." would map a file from anywhere on the disk, and an index comes with a download.
        const std::string& s = shard.get_ref<const std::string&>();
        if (s.empty() || s == "." || s == ".." || s.find('/') != std::string::npos || s.find('\0') != std::string::npos)
          fail(ipath, "weight_map entry '" + name + "' names shard '" + s +
                          "', which is not a plain file name in the checkpoint's folder");
        shard_names.insert(s);
        expected[name] = (dir / s).string();
      }
      for (auto& s : shard_names) {
        if (!exists(dir / s, ipath)) fail(ipath, "names shard '" + s + "', which is missing from " + path);
        files.push_back((dir / s).string());
      }
    } else if (exists(dir / "model.safetensors", path)) {
      files.push_back((dir / "model.safetensors").string());
    } else {
      bool has_bin = false;
      fs::directory_iterator it(dir, ec), end;
      if (ec) fail(path, "cannot list the folder: " + ec.message());
      for (; it != end; it.increment(ec)) {
        const fs::directory_entry& e = *it;
        const std::string n = e.path().filename().string();
        if (e.path().extension() == ".safetensors") files.push_back(e.path().string());
        if (e.path().extension() == ".bin" && n.rfind("pytorch_model", 0) == 0) has_bin = true;
      }
      if (ec) fail(path, "cannot list the folder: " + ec.message());
      std::sort(files.begin(), files.end());
      if (files.empty() && has_bin) fail(path, bin_error(path));
      if (files.empty()) fail(path, "no .safetensors weights found (expected model.safetensors or model.safetensors.index.json)");
    }
  }
  for (auto& f : files) {
    store->files_.push_back(std::make_unique<SafetensorsFile>(f));
    for (auto& [name, t] : store->files_.back()->tensors()) {
      if (store->index_.count(name)) fail(f, "tensor '" + name + "' also appears in " + store->index_[name]->file);
      store->index_[name] = &t;
    }
  }
  for (auto& [name, file] : expected) {
    auto it = store->index_.find(name);
    if (it == store->index_.end())
      fail(path + "/model.safetensors.index.json", "lists tensor '" + name + "' in " + file + ", which does not hold it");
  }
  return store;
}

std::unique_ptr<TensorStore> TensorStore::from_memory(const std::string& source, std::vector<OwnedTensor> tensors) {
  auto store = std::unique_ptr<TensorStore>(new TensorStore());
  store->source_ = source;
  store->owned_ = std::move(tensors);
  for (const OwnedTensor& t : store->owned_) {
    auto v = std::make_unique<TensorView>();
    v->name = t.name;
    v->file = source;
    v->dtype = t.dtype;
    v->dtype_str = t.quant ? t.quant_name : t.dtype == DType::F32 ? "F32" : t.dtype == DType::F16 ? "F16" : "BF16";
    v->supported = true;
    v->shape = t.shape;
    v->data = t.data.data();
    v->quant = t.quant;
    PKV_ASSERT(t.quant || t.data.size() == size_t(v->numel()) * dtype_size(t.dtype));
    if (store->index_.count(t.name)) fail(source, "tensor '" + t.name + "' given twice");
    store->index_[t.name] = v.get();
    store->owned_views_.push_back(std::move(v));
  }
  return store;
}

std::unique_ptr<TensorStore> TensorStore::from_views(const std::string& source, std::vector<TensorView> views,
                                                     std::vector<OwnedTensor> owned, std::shared_ptr<const void> owner) {
  std::unique_ptr<TensorStore> store = from_memory(source, std::move(owned));
  store->owner_ = std::move(owner);
  for (TensorView& v : views) {
    auto p = std::make_unique<TensorView>(std::move(v));
    if (store->index_.count(p->name)) fail(source, "tensor '" + p->name + "' given twice");
    store->index_[p->name] = p.get();
    store->owned_views_.push_back(std::move(p));
  }
  return store;
}

const TensorView* TensorStore::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : it->second;
}

}  // namespace pkv
