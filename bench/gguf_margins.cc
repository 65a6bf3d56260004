// Where prefixkv and llama.cpp part on the same GGUF file, is it a near-tie? prefixkv is fed the
// prompt ids and the tokens llama.cpp chose (teacher forcing) and prints, for every step, its own
// greedy choice, the gap between its two best logits, and how far llama.cpp's token lies below its
// best (0 where they agree). bench/gguf_llamacpp.sh reads it at the first step where they differ.
// A benchmark helper, not a test: it asserts nothing.
//   pkv_bench_gguf_margins MODEL.gguf PROMPT_IDS TOKENS   (ids comma-separated, BOS first in PROMPT_IDS)
// Output: one JSON object {"steps": [{"pos", "forced", "top1", "top1_top2", "top1_forced"}]}.
#include <algorithm>
#include <cstdio>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "engine/engine.h"
#include "kv/policy.h"
#include "model/gguf_load.h"
#include "model/model.h"

namespace {

std::vector<int32_t> ids(const std::string& s) {
  std::vector<int32_t> out;
  std::stringstream ss(s);
  std::string t;
  while (std::getline(ss, t, ','))
    if (!t.empty()) out.push_back(int32_t(std::stoi(t)));
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: %s MODEL.gguf PROMPT_IDS TOKENS\n", argv[0]);
    return 2;
  }
  try {
    const auto model = pkv::Model::load(argv[1]);
    const auto tok = pkv::gguf_tokenizer(argv[1]);
    const pkv::Engine engine(*model, *tok);
    pkv::PromptRequest req;
    req.marked_ids = ids(argv[2]);
    const std::vector<int32_t> forced = ids(argv[3]);
    const pkv::PreparedPrompt p = engine.prepare(req);
    pkv::FullPolicy policy;
    pkv::Session s(*model, policy);
    std::vector<float> logits(size_t(model->config().text.vocab_size));
    s.prefill(p, logits.data());
    nlohmann::json steps = nlohmann::json::array();
    for (size_t i = 0; i < forced.size(); ++i) {
      std::vector<int> order(logits.size());
      for (size_t k = 0; k < order.size(); ++k) order[k] = int(k);
      std::partial_sort(order.begin(), order.begin() + 2, order.end(), [&](int a, int b) { return logits[size_t(a)] > logits[size_t(b)]; });
      steps.push_back({{"pos", i},
                       {"forced", forced[i]},
                       {"top1", order[0]},
                       {"top1_top2", logits[size_t(order[0])] - logits[size_t(order[1])]},
                       {"top1_forced", logits[size_t(order[0])] - logits[size_t(forced[i])]}});
      if (i + 1 < forced.size()) s.step(forced[i], logits.data());
    }
    std::printf("%s\n", nlohmann::json{{"steps", steps}}.dump().c_str());
  } catch (const pkv::Error& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
  return 0;
}
