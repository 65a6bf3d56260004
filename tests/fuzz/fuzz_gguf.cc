// libFuzzer target: llama.cpp's GGUF container (src/io/gguf.h), through the in-memory entry point
// GgufFile::parse. An accepted file's tensors must lie inside the input, not overlap, and the
// metadata accessors and the dequantisation of every tensor whose type prefixkv reads must work or
// fail only with pkv::Error; writing the file back (GgufWriter) must parse to the same content.
// Documented errors: pkv::Error.
#include <cstdint>
#include <string>
#include <vector>

#include "core/error.h"
#include "fuzz_util.h"
#include "io/gguf.h"
#include "ops/quant.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::unique_ptr<pkv::GgufFile> f;
  if (!pkv::fuzz::expect_only<pkv::Error>([&] { f = pkv::GgufFile::parse(data, size, "fuzz"); })) return 0;

  pkv::GgufWriter w(f->alignment());
  for (const auto& entry : f->metadata()) {
    const std::string& key = entry.first;  // (clang 14 cannot capture a structured binding)
    pkv::fuzz::expect_only<pkv::Error>([&] { (void)f->str(key); });
    pkv::fuzz::expect_only<pkv::Error>([&] { (void)f->integer(key); });
    pkv::fuzz::expect_only<pkv::Error>([&] { (void)f->number(key); });
    pkv::fuzz::expect_only<pkv::Error>([&] { (void)f->numbers(key); });
    pkv::fuzz::expect_only<pkv::Error>([&] { (void)f->strings(key); });
    w.set(key, entry.second);
  }
  for (const pkv::GgufTensor& t : f->tensors()) {
    if (t.data < data || t.data + t.bytes > data + size) pkv::fuzz::finding("tensor '" + t.name + "' lies outside the input");
    if (f->find(t.name) != &t) pkv::fuzz::finding("find() does not return tensor '" + t.name + "'");
    if (pkv::quant::supported(t.type) && t.numel() <= (int64_t(1) << 16)) {
      std::vector<float> out(size_t(t.numel()));
      pkv::fuzz::expect_only<pkv::Error>([&] { pkv::quant::dequantize_row(t.type, t.data, out.data(), t.numel()); });
    }
    if (t.bytes <= (uint64_t(1) << 20)) w.add_tensor(t.name, t.ne, t.type, std::vector<uint8_t>(t.data, t.data + t.bytes));
  }
  const std::vector<uint8_t> again = w.bytes();
  std::unique_ptr<pkv::GgufFile> g;
  if (!pkv::fuzz::expect_only<pkv::Error>([&] { g = pkv::GgufFile::parse(again.data(), again.size(), "fuzz-rewrite"); }))
    pkv::fuzz::finding("a file written back from an accepted one does not parse");
  if (g->metadata().size() != f->metadata().size()) pkv::fuzz::finding("writing back changed the metadata count");
  for (const pkv::GgufTensor& t : g->tensors()) {
    const pkv::GgufTensor* o = f->find(t.name);
    if (!o || o->ne != t.ne || o->type != t.type || o->bytes != t.bytes ||
        !std::equal(t.data, t.data + t.bytes, o->data))
      pkv::fuzz::finding("writing back changed tensor '" + t.name + "'");
  }
  return 0;
}
