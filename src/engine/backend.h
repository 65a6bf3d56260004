// The backend seam: one interface for running a model's sequences on a device, the CPU reference
// (make_cpu_backend) or the GPU (engine/cuda_backend.h), so that generation, the server, evaluation
// and the benchmarks are written once. A backend owns the device copy of the model (none on the
// CPU: the Model itself) and the KV memory its sequences share; its sequences are the per-request
// state (KV cache, position, policy). Nothing here names a CUDA type: a CPU-only build builds it all.
//
// Choosing a device by name happens in one place, make_backend (engine/make_backend.h).
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "engine/engine.h"
#include "kv/keep_plan.h"
#include "kv/policy.h"
#include "model/model.h"

namespace pkv {

class Backend {
 public:
  // One sequence's state on the device: made by prefill(), fed by step()/step_many(), released
  // (its KV memory returned) when destroyed. Its policy must outlive it.
  class Sequence {
   public:
    virtual ~Sequence() = default;
    virtual int position() const = 0;                       // tokens held: prompt + generated
    virtual const CacheView& entries() const = 0;           // the positions each layer holds
    virtual size_t kv_bytes() const = 0;                    // what its cache takes on the device now
    virtual std::vector<size_t> kv_bytes_per_layer() const = 0;
    virtual const KVPolicy& policy() const = 0;
    std::vector<int> entries_per_layer() const;
  };

  virtual ~Backend() = default;
  virtual std::string name() const = 0;         // "cpu" or "cuda"
  virtual std::string description() const = 0;  // for reports: "cpu", "cuda bf16 (NVIDIA H100 ...)"
  virtual const Model& model() const = 0;

  // The image embeddings [image_tokens, hidden] of preprocessed pixels [3, S, S].
  virtual std::vector<float> encode_image(const float* pixels, Observer* obs = nullptr) = 0;
  // Runs the prompt into a new sequence under `policy`: the logits of its last position (from the
  // uncompressed prefill), then the policy's plan applied. Out of KV memory: Error, nothing held.
  virtual std::unique_ptr<Sequence> prefill(const PreparedPrompt& p, KVPolicy& policy, float* logits,
                                            Observer* obs = nullptr) = 0;
  // One token for each of several sequences of this backend in one batched pass; logits
  // [n, vocab], row i for seqs[i]. The same as step() on each in turn (bit for bit on the CPU).
  virtual void step_many(const std::vector<Sequence*>& seqs, const int32_t* tokens, float* logits) = 0;
  // One token for one sequence; an observer sees its named tensors where the backend supports it.
  virtual void step(Sequence& seq, int32_t token, float* logits, Observer* obs = nullptr);

  // KV memory accounting, for admission: bytes of one entry of one layer (K, V and what the device
  // stores beside them), entries per allocation unit of a layer, and the fixed pool's size (0: the
  // host's memory, no fixed pool).
  virtual size_t kv_entry_bytes() const = 0;
  virtual int kv_block() const { return 1; }
  virtual size_t kv_pool_bytes() const { return 0; }

  // Fills a prompt request's image encoder with this backend's vision tower (obs sees its tensors
  // where the backend supports it).
  void use_for_images(PromptRequest& req, Observer* obs = nullptr);
};

// The CPU reference: Sessions over the model (float32 caches).
std::unique_ptr<Backend> make_cpu_backend(const Model& model);

// Prefill + decode of one prompt on any backend: sampling, stop conditions and streaming
// (Decoding), the result's KV fields from the sequence at the end.
GenerationResult generate(Backend& backend, const Tokenizer& tok, const PreparedPrompt& p, const SamplingOptions& s,
                          KVPolicy& policy, const std::function<void(const std::string&)>& on_text = {},
                          Observer* obs = nullptr);

}  // namespace pkv
