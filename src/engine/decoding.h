// The per-sequence bookkeeping of a decode loop, apart from the model: sampling, the stop conditions
// (EOS, stop strings, max_tokens, the context) and incremental detokenisation that only hands out
// text that is final. Engine::generate_from drives one; the server's scheduler drives one per
// request in its batch, so both stop and stream in exactly the same way.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "engine/engine.h"

namespace pkv {

class Decoding {
 public:
  // `prompt_len`: tokens the model has seen before the first generated one (positions used).
  Decoding(const ModelConfig& cfg, const Tokenizer& tok, SamplingOptions s, int prompt_len);

  // Takes the logits of the next position: samples a token, checks every stop condition and returns
  // the text that became final (complete UTF-8, and no longer able to be the start of a stop
  // string; often empty). Afterwards either done() (stop_reason() says why), or last_token() must be
  // fed to the model and next() called with the logits that come back.
  std::string next(const float* logits);
  bool done() const { return done_; }
  int32_t last_token() const { return tokens_.back(); }
  // Once done(): the text still held back (a partial UTF-8 sequence or a possible stop-string
  // start that never completed), empty when everything was handed out.
  std::string finish();

  const std::vector<int32_t>& tokens() const { return tokens_; }
  const std::string& text() const { return text_; }                // the answer so far, cut at a stop string
  const std::string& stop_reason() const { return stop_reason_; }  // eos | stop | length | context

 private:
  const ModelConfig& cfg_;
  const Tokenizer& tok_;
  SamplingOptions s_;
  int prompt_len_;
  uint64_t rng_;
  size_t max_stop_ = 0;
  int step_ = 0;
  bool done_ = false;
  std::vector<int32_t> tokens_;
  std::string text_;
  std::string emitted_;  // text already handed out
  std::string stop_reason_ = "length";
};

// Runs `d` to the end from the logits of the prompt's last position: samples, streams the final
// text through on_text, and calls step(token, logits) to feed each token and get the next logits.
// pkv::generate (any back end, engine/backend.h) and Engine::generate_from share it.
template <class Step>
void decode_to_end(Decoding& d, std::vector<float>& logits, Step&& step,
                   const std::function<void(const std::string&)>& on_text) {
  for (;;) {
    const std::string piece = d.next(logits.data());
    if (!piece.empty() && on_text) on_text(piece);
    if (d.done()) break;
    step(d.last_token(), logits.data());
  }
  const std::string rest = d.finish();
  if (!rest.empty() && on_text) on_text(rest);
}

}  // namespace pkv
