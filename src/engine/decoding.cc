#include "engine/decoding.h"

#include <algorithm>

#include "core/error.h"

namespace pkv {

namespace {

// Length of the longest prefix of `s` that is complete UTF-8 (a trailing partial sequence, which
// byte-fallback tokens produce mid-character, is held back).
size_t complete_utf8_prefix(const std::string& s) {
  size_t n = s.size(), i = n;
  int back = 0;
  while (i > 0 && back < 4) {
    const unsigned char c = static_cast<unsigned char>(s[i - 1]);
    if ((c & 0xC0) != 0x80) {
      int need = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 1;
      return (n - (i - 1)) >= size_t(need) ? n : i - 1;
    }
    --i;
    ++back;
  }
  return n;
}

}  // namespace

Decoding::Decoding(const ModelConfig& cfg, const Tokenizer& tok, SamplingOptions s, int prompt_len)
    : cfg_(cfg), tok_(tok), s_(std::move(s)), prompt_len_(prompt_len), rng_(s_.seed) {
  for (auto& st : s_.stop) max_stop_ = std::max(max_stop_, st.size());
}

std::string Decoding::next(const float* logits) {
  PKV_ASSERT(!done_);
  const int T = prompt_len_;
  if (step_ >= s_.max_tokens) {
    done_ = true;
    stop_reason_ = "length";
    return {};
  }
  if (T + step_ >= cfg_.text.max_positions) {
    done_ = true;
    stop_reason_ = "context";
    return {};
  }
  const int tok = sample_token(logits, cfg_.text.vocab_size, s_, rng_);
  const bool is_eos = std::find(cfg_.text.eos_ids.begin(), cfg_.text.eos_ids.end(), tok) != cfg_.text.eos_ids.end();
  if (is_eos && !s_.ignore_eos) {
    done_ = true;
    stop_reason_ = "eos";
    return {};
  }
  tokens_.push_back(tok);
  std::string text = tok_.decode(std::vector<int>(tokens_.begin(), tokens_.end()));
  bool stopped = false;
  for (auto& st : s_.stop) {
    size_t at = text.find(st, emitted_.size() > st.size() ? emitted_.size() - st.size() : 0);
    if (!st.empty() && at != std::string::npos) {
      text.resize(at);
      stopped = true;
    }
  }
  // Hand out what is complete and cannot be the start of a stop string.
  std::string piece;
  size_t ready = complete_utf8_prefix(text);
  if (!stopped && max_stop_ > 1) ready = ready > max_stop_ - 1 ? std::min(ready, text.size() - (max_stop_ - 1)) : 0;
  if (ready > emitted_.size() && text.compare(0, emitted_.size(), emitted_) == 0) {
    piece = text.substr(emitted_.size(), ready - emitted_.size());
    emitted_ = text.substr(0, ready);
  }
  text_ = std::move(text);
  const int step = step_++;
  if (stopped) {
    done_ = true;
    stop_reason_ = "stop";
  } else if (step + 1 >= s_.max_tokens || T + step + 1 >= cfg_.text.max_positions) {
    done_ = true;
    stop_reason_ = step + 1 >= s_.max_tokens ? "length" : "context";
  }
  return piece;
}

std::string Decoding::finish() {
  if (text_.size() > emitted_.size() && text_.compare(0, emitted_.size(), emitted_) == 0) {
    std::string rest = text_.substr(emitted_.size());
    emitted_ = text_;
    return rest;
  }
  return {};
}

}  // namespace pkv
