// KV-cache eviction policies: small objects that see importance and say which entries each layer
// keeps; the cache applies the decision (KVLayer::retain). Adding a policy is one new file.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "kv/kv_cache.h"

namespace pkv {

class KVPolicy {
 public:
  virtual ~KVPolicy() = default;
  virtual std::string name() const = 0;
  // Whether the prefill must accumulate per-layer importance (costs time; skipped otherwise).
  virtual bool needs_prefill_importance() const { return false; }
  // Called once after the prefill of `prompt_len` tokens; importance[l] is over layer l's entries
  // (empty when not requested).
  virtual void after_prefill(KVCache& cache, const std::vector<std::vector<float>>& importance, int prompt_len) {
    (void)cache, (void)importance, (void)prompt_len;
  }
  // Called after each decode step; `total_tokens` counts prompt and generated tokens so far.
  virtual void after_decode_step(KVCache& cache, int total_tokens) { (void)cache, (void)total_tokens; }
};

// Keeps everything: the uncompressed cache.
class FullPolicy : public KVPolicy {
 public:
  std::string name() const override { return "full"; }
};

}  // namespace pkv
