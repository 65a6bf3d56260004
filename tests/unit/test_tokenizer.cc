// The real LLaMA-2 tokenizer (../shared/reference/llama2-tokenizer) against the ids that
// sentencepiece and transformers gave on the GPU machine (tests/data/tokenizer/llama2_ids.json).
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "test_util.h"
#include "core/error.h"
#include "text/tokenizer.h"

using namespace pkv;
using nlohmann::json;

namespace {
json load_ids() {
  std::ifstream f(test::data_path("tokenizer/llama2_ids.json"));
  EXPECT_TRUE(f.good()) << "tests/data/tokenizer/llama2_ids.json missing";
  return f ? json::parse(f) : json::object();
}
const std::string kLlama2 = test::shared_path("reference/llama2-tokenizer/tokenizer.model");
}  // namespace

TEST(Tokenizer, Llama2MatchesSentencepieceAndTransformers) {
  if (!std::filesystem::exists(kLlama2)) GTEST_SKIP() << "no ../shared/reference/llama2-tokenizer";
  Tokenizer tok(kLlama2);
  EXPECT_EQ(tok.vocab_size(), 32000);
  EXPECT_EQ(tok.bos_id(), 1);
  EXPECT_EQ(tok.eos_id(), 2);
  json j = load_ids();
  ASSERT_GE(j["cases"].size(), 200u);
  int n = 0;
  for (auto& c : j["cases"]) {
    const std::string text = c["text"].get<std::string>();
    const auto sp_ids = c["sp_ids"].get<std::vector<int>>();
    EXPECT_EQ(tok.encode(text), sp_ids) << "text: " << text;
    // transformers adds BOS; the engine's prompt tokenisation = BOS + encode(text).
    auto hf = c["hf_ids"].get<std::vector<int>>();
    std::vector<int> ours = {tok.bos_id()};
    auto e = tok.encode(text);
    ours.insert(ours.end(), e.begin(), e.end());
    EXPECT_EQ(ours, hf) << "text: " << text;
    // Decoding gives the text back (LLaMA's tokenizer is lossless up to the dummy prefix space).
    if (!text.empty() && text[0] != ' ') EXPECT_EQ(tok.decode(sp_ids), text);
    ++n;
  }
  EXPECT_GE(n, 200);
}

TEST(Tokenizer, MissingOrBrokenModelFile) {
  EXPECT_THROW(Tokenizer("/nonexistent/tokenizer.model"), Error);
  const std::string bad = (std::filesystem::temp_directory_path() / "pkv_bad_tok.model").string();
  std::ofstream(bad) << "this is not a sentencepiece model";
  try {
    Tokenizer t(bad);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(bad), std::string::npos);
  }
}
