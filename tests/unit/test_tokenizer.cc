// The real LLaMA-2 tokenizer (../shared/reference/llama2-tokenizer) against the ids that
// sentencepiece and transformers gave on the GPU machine (tests/data/tokenizer/llama2_ids.json).
#include <gtest/gtest.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <tuple>
#include <unordered_map>

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
  PKV_NEED_PATH(kLlama2);
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
    if (!text.empty() && text[0] != ' ') {
      EXPECT_EQ(tok.decode(sp_ids), text);
    }
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
  PKV_NEED_PATH(kLlama2);
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

namespace {

// The plain BPE of transformers' LLaMA tokenizer, written the obvious quadratic way (every pair
// rescanned after each merge): the oracle for Tokenizer::encode_hf's queue of candidate merges.
// The pieces BPE may merge into: all but the control pieces and the byte pieces.
std::unordered_map<std::string, int> mergeable_pieces(const Tokenizer& tok) {
  std::unordered_map<std::string, int> pieces;
  for (int i = 0; i < tok.vocab_size(); ++i) {
    const std::string p = tok.id_to_piece(i);
    const bool byte = p.size() == 6 && p.rfind("<0x", 0) == 0 && p.back() == '>';
    if (!byte && i != tok.bos_id() && i != tok.eos_id() && p != "<unk>") pieces.emplace(p, i);
  }
  return pieces;
}

std::vector<int> reference_encode_hf(const Tokenizer& tok, const std::unordered_map<std::string, int>& pieces,
                                     const std::string& text, bool first_section) {
  const std::string space = "\xe2\x96\x81";
  std::string s;
  for (char c : text) s += c == ' ' ? space : std::string(1, c);
  if (s.empty()) return {};
  if (first_section && s.compare(0, space.size(), space) != 0) s = space + s;
  std::vector<std::string> sym;
  for (size_t i = 0; i < s.size();) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    size_t len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 1;
    len = std::min(len, s.size() - i);
    sym.push_back(s.substr(i, len));
    i += len;
  }
  for (;;) {
    int best = -1;
    std::tuple<int, int, int> best_key;
    for (size_t i = 0; i + 1 < sym.size(); ++i) {
      auto m = pieces.find(sym[i] + sym[i + 1]), l = pieces.find(sym[i]), r = pieces.find(sym[i + 1]);
      if (m == pieces.end() || l == pieces.end() || r == pieces.end()) continue;
      std::tuple<int, int, int> key{m->second, l->second, r->second};
      if (best < 0 || key < best_key) best = int(i), best_key = key;
    }
    if (best < 0) break;
    sym[size_t(best)] += sym[size_t(best) + 1];
    sym.erase(sym.begin() + best + 1);
  }
  std::vector<int> out;
  for (const std::string& x : sym) {
    auto it = pieces.find(x);
    if (it != pieces.end()) {
      out.push_back(it->second);
      continue;
    }
    for (unsigned char b : x) {
      char name[8];
      std::snprintf(name, sizeof name, "<0x%02X>", b);
      const int id = tok.piece_to_id(name);
      out.push_back(id >= 0 ? id : tok.piece_to_id("<unk>"));
    }
  }
  return out;
}

// Random texts that exercise the merge order: runs of spaces, repeated letters (equal pairs that
// overlap), words of the vocabulary, digits, punctuation, 2-4 byte UTF-8 and broken UTF-8 bytes.
std::string random_text(std::mt19937& rng, size_t max_parts) {
  static const std::vector<std::string> parts = {
      " ", "  ", "    ", "a", "aa", "aaaa", "e", "the", " the", "ing", "tion", "Describe", " image", " cat",
      "red", " square", "\n", "\t", "0", "12", "345", ",", ".", "?", "!", "<", "image", ">", "\xc3\xa9",
      "\xe4\xb8\xad", "\xf0\x9f\x98\x80", "\xff", "\xe2\x96", "\xe2\x96\x81", "ab", "ba", "abab", "zz", "Q"};
  std::string s;
  const size_t n = std::uniform_int_distribution<size_t>(0, max_parts)(rng);
  for (size_t i = 0; i < n; ++i) s += parts[std::uniform_int_distribution<size_t>(0, parts.size() - 1)(rng)];
  return s;
}

}  // namespace

// encode_hf (a queue of candidate merges, O(n log n)) gives the ids of the quadratic reference on
// random texts, with both tokenizer models the repository has (the fixture's and the bundled
// model's), as the first section of a prompt and as a continuation.
TEST(Tokenizer, EncodeHfEqualsQuadraticReference) {
  const std::vector<std::string> models = {test::data_path("tokenizer/fixture_sp.model"),
                                           std::string(PKV_SOURCE_DIR) + "/models/prefixkv-llava-tiny/tokenizer.model"};
  std::mt19937 rng(7);
  for (const std::string& m : models) {
    SCOPED_TRACE(m);
    Tokenizer tok(m);
    const auto pieces = mergeable_pieces(tok);
    int differences = 0;
    for (int i = 0; i < 1500 && differences < 5; ++i) {
      const std::string text = random_text(rng, i < 1000 ? 12 : 80);
      const bool first = i % 2 == 0;
      const std::vector<int> ours = tok.encode_hf(text, first), ref = reference_encode_hf(tok, pieces, text, first);
      if (ours != ref) ++differences;
      EXPECT_EQ(ours, ref) << "text: '" << text << "' first section: " << first;
    }
  }
}

// A text longer than any context is refused before it is tokenized, by a bound that holds for
// every text: no token stands for more bytes than the longest piece.
TEST(Tokenizer, LongestPieceBoundsTheTokenCount) {
  Tokenizer tok(std::string(PKV_SOURCE_DIR) + "/models/prefixkv-llava-tiny/tokenizer.model");
  const int longest = tok.max_piece_bytes();
  int found = 0;
  for (int i = 0; i < tok.vocab_size(); ++i) found = std::max(found, int(tok.id_to_piece(i).size()));
  EXPECT_EQ(longest, found);
  std::mt19937 rng(11);
  for (int i = 0; i < 300; ++i) {
    const std::string text = random_text(rng, 60);
    const size_t tokens = tok.encode_hf(text, true).size();
    EXPECT_GE(tokens * size_t(longest), text.size()) << text;
  }
}
