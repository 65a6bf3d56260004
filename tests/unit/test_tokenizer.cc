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
    // transformers (tokenizers BPE, legacy = false) adds BOS; it differs from SentencePiece on runs of
    // spaces, and encode_hf must follow it exactly.
    auto hf = c["hf_ids"].get<std::vector<int>>();
    std::vector<int> ours = {tok.bos_id()};
    auto e = tok.encode_hf(text, true);
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
  const std::string bad = test::temp_path("bad_tok.model");
  std::ofstream(bad) << "this is not a sentencepiece model";
  try {
    Tokenizer t(bad);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(bad), std::string::npos);
  }
}

TEST(Tokenizer, FixtureModelMatchesTransformers) {
  Tokenizer tok(test::data_path("tokenizer/fixture_sp.model"));
  std::ifstream f(test::data_path("tokenizer/fixture_ids.json"));
  ASSERT_TRUE(f.good());
  json j = json::parse(f);
  ASSERT_GE(j["cases"].size(), 200u);
  for (auto& c : j["cases"]) {
    const std::string text = c["text"].get<std::string>();
    EXPECT_EQ(tok.encode(text), c["sp_ids"].get<std::vector<int>>()) << text;
    std::vector<int> ours = {tok.bos_id()};
    auto e = tok.encode_hf(text, true);
    ours.insert(ours.end(), e.begin(), e.end());
    EXPECT_EQ(ours, c["hf_ids"].get<std::vector<int>>()) << text;
  }
}

TEST(Tokenizer, ChatPromptsAroundTheImageToken) {
  if (!std::filesystem::exists(kLlama2)) GTEST_SKIP() << "no ../shared/reference/llama2-tokenizer";
  Tokenizer tok(kLlama2);
  json j = load_ids();
  ASSERT_GE(j["chat_cases"].size(), 2u);
  for (auto& c : j["chat_cases"]) {
    const std::string text = c["text"].get<std::string>();
    // Chunks between <image> markers (prompts with zero, one or several images).
    std::vector<std::string> chunks;
    for (size_t start = 0;;) {
      size_t at = text.find("<image>", start);
      chunks.push_back(text.substr(start, at == std::string::npos ? std::string::npos : at - start));
      if (at == std::string::npos) break;
      start = at + 7;
    }
    // transformers: <image> is an added token (32000); the text after it gets no prefix.
    std::vector<int> hf = {1}, orig = {1};
    for (size_t i = 0; i < chunks.size(); ++i) {
      if (i > 0) hf.push_back(32000), orig.push_back(-200);
      for (int id : tok.encode_hf(chunks[i], i == 0)) hf.push_back(id);
      // The original LLaVA repository: every chunk through SentencePiece with its dummy prefix.
      if (!chunks[i].empty())
        for (int id : tok.encode(chunks[i])) orig.push_back(id);
    }
    EXPECT_EQ(hf, c["hf_ids"].get<std::vector<int>>()) << text;
    EXPECT_EQ(orig, c["llava_orig_ids"].get<std::vector<int>>()) << text;
  }
}
