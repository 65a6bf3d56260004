// Tokenizer cost against the prompt's length: the time of Tokenizer::encode_hf (transformers' LLaMA
// BPE, the rule of llava-hf checkpoints) and Tokenizer::encode (SentencePiece, the original LLaVA
// repository's rule) on texts of n words, as a table and as JSON. A benchmark, not a test: it
// asserts nothing. Usage: pkv_bench_tokenizer [tokenizer.model] [words,...] [--json FILE]
#include <chrono>
#include <cstdio>
#include <functional>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "text/tokenizer.h"

namespace {

// n words drawn from a fixed list of English words and numbers, separated by single spaces with an
// occasional double space and newline (the runs that make encode_hf differ from SentencePiece).
std::string make_text(int words, uint32_t seed) {
  static const char* kWords[] = {"the",  "red",    "square", "is",    "left", "of",     "a",     "blue",
                                 "circle", "there", "are",   "three", "small", "objects", "in",  "image",
                                 "describe", "green", "triangle", "empty", "cell", "background", "42", "1999"};
  std::mt19937 rng(seed);
  std::uniform_int_distribution<size_t> pick(0, sizeof kWords / sizeof kWords[0] - 1);
  std::string s;
  for (int i = 0; i < words; ++i) {
    if (i) s += rng() % 17 == 0 ? "  " : rng() % 23 == 0 ? "\n" : " ";
    s += kWords[pick(rng)];
  }
  return s;
}

double seconds_of(const std::function<void()>& f) {
  const auto t0 = std::chrono::steady_clock::now();
  f();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

int main(int argc, char** argv) {
  std::string model = "models/prefixkv-llava-tiny/tokenizer.model", json_out;
  std::vector<int> sizes = {2500, 5000, 10000, 20000, 100000, 1000000};
  std::vector<std::string> positional;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--json" && i + 1 < argc) json_out = argv[++i];
    else positional.push_back(a);
  }
  try {
    if (!positional.empty()) model = positional[0];
    if (positional.size() > 1) {
      sizes.clear();
      std::stringstream ss(positional[1]);
      for (std::string x; std::getline(ss, x, ',');) sizes.push_back(std::stoi(x));
    }
    pkv::Tokenizer tok(model);
    nlohmann::json records = nlohmann::json::array();
    std::printf("| words | bytes | encode_hf tokens | encode_hf s | encode (SentencePiece) s |\n|---|---|---|---|---|\n");
    for (int words : sizes) {
      const std::string text = make_text(words, 1);
      std::vector<int> hf, sp;
      const double t_hf = seconds_of([&] { hf = tok.encode_hf(text, true); });
      const double t_sp = seconds_of([&] { sp = tok.encode(text); });
      std::printf("| %d | %zu | %zu | %.4f | %.4f |\n", words, text.size(), hf.size(), t_hf, t_sp);
      records.push_back({{"words", words}, {"bytes", text.size()}, {"tokens_hf", hf.size()}, {"encode_hf_s", t_hf},
                         {"tokens_sp", sp.size()}, {"encode_sp_s", t_sp}});
    }
    if (!json_out.empty()) std::ofstream(json_out) << nlohmann::json{{"model", model}, {"records", records}}.dump(1) << "\n";
  } catch (const std::exception& e) {
    std::fprintf(stderr, "pkv_bench_tokenizer: %s\n", e.what());
    return 1;
  }
  return 0;
}
