// libFuzzer target: the tokenizer (models/prefixkv-llava-tiny/tokenizer.model) on arbitrary bytes.
// The first byte selects options, the rest is the text: encode_hf (first section or not), encode,
// encode_continuation, decode of each result, and decode of the input read as little-endian int16
// ids (any value, in range or not). Every returned id must be in [0, vocab_size). None of these
// functions documents an error for any input, so every exception is a finding.
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "fuzz_util.h"
#include "text/tokenizer.h"

namespace {

std::unique_ptr<pkv::Tokenizer> g_tok;

struct NoException {};  // no exception type is documented

void check_ids(const std::vector<int>& ids, const char* what) {
  for (int id : ids)
    if (id < 0 || id >= g_tok->vocab_size())
      pkv::fuzz::finding(std::string(what) + " returned id " + std::to_string(id) + " outside the vocabulary");
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  g_tok = std::make_unique<pkv::Tokenizer>(std::string(PKV_SOURCE_DIR) + "/models/prefixkv-llava-tiny/tokenizer.model");
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const uint8_t flags = data[0];
  const std::string text(reinterpret_cast<const char*>(data + 1), size - 1);
  pkv::fuzz::expect_only<NoException>([&] {
    const std::vector<int> hf = g_tok->encode_hf(text, flags & 1);
    check_ids(hf, "encode_hf");
    (void)g_tok->decode(hf);
    if (flags & 2) {
      const std::vector<int> sp = g_tok->encode(text);
      check_ids(sp, "encode");
      (void)g_tok->decode(sp);
      const std::vector<int> cont = g_tok->encode_continuation(text);
      check_ids(cont, "encode_continuation");
    }
    if (flags & 4) {
      std::vector<int> ids;
      for (size_t i = 1; i + 1 < size; i += 2) ids.push_back(int(int16_t(uint16_t(data[i]) | uint16_t(data[i + 1]) << 8)));
      (void)g_tok->decode(ids);
      for (int id : ids) (void)g_tok->id_to_piece(id);
    }
    if (flags & 8) (void)g_tok->piece_to_id(text);
  });
  return 0;
}
