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
    // Per layer, the entries each KV head holds (a per-head layer: their mean over the heads, rounded).
    std::vector<int> entries_per_layer() const;
    // [layers][kv heads]: entries and bytes of each KV head; empty where the cache cannot hold
    // per-head entries (CacheView::kv_heads() == 0).
    std::vector<std::vector<int>> entries_per_head() const;
    virtual std::vector<std::vector<size_t>> kv_bytes_per_head() const { return {}; }
  };

  // A prompt's uncompressed prefill held so that several policies can each start from it
  // (evaluation and calibration measure many policies, or only the importance, on one prompt): the
  // logits of its last position and, for each requested first query `from`, the raw prefill
  // importance over the queries from there on (importance_for(from)[l][j]: layer l's key j, the
  // ImportanceRequest{true, from} a policy would get). Made by prefill_shared, used by adopt; it
  // holds the prompt's whole cache on the device until destroyed.
  class SharedPrefill {
   public:
    virtual ~SharedPrefill() = default;
    int prompt_len = 0;
    std::vector<float> logits;  // [vocab]
    const std::vector<std::vector<float>>& importance_for(int from) const;
    // The importance a policy asks for (none when it asks for none). Error when the prefill did not
    // measure that window.
    const std::vector<std::vector<float>>& importance_for(const KVPolicy& policy) const;
    std::vector<int> from;                                     // the windows measured
    std::vector<std::vector<std::vector<float>>> importance;   // [from.size()][layers][prompt_len]
    // Sizes the fields for a prompt before a backend fills logits and importance.
    void begin(const PreparedPrompt& p, int vocab, const std::vector<int>& windows);
    // Adds importance measured by another pass for a window this prefill did not measure (the answer
    // estimator's, from == prompt_len: evaluation's teacher-forced reference answer): every layer's
    // row over the prompt's prompt_len keys. Error for a window already held or rows of another length.
    void add_importance(int from, std::vector<std::vector<float>> imp);
    // Per-KV-head importance (ImportanceRequest::per_kv_head; [layers][kv_heads * prompt_len]) for
    // the windows in head_from, added by Backend::add_head_importance.
    std::vector<int> head_from;
    std::vector<std::vector<std::vector<float>>> head_importance;
    const std::vector<std::vector<float>>& head_importance_for(int from) const;
    // Extended importance (ImportanceRequest::extended(): value weights, lookahead, reduces;
    // [layers][prompt_len]) for the requests in extended_req, added by Backend::add_extended_importance.
    std::vector<ImportanceRequest> extended_req;
    std::vector<std::vector<std::vector<float>>> extended_importance;
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

  // Batched prefill: several prompts, each into a new sequence under its own policy (as prefill()
  // makes it), in one pass where the device can (the GPU: one forward over the rows of all of them,
  // cuda::GpuSession::prefill_many). logits [n, vocab], row i for prompts[i]. Out of KV memory:
  // Error, nothing held. The default runs prefill() on each.
  virtual std::vector<std::unique_ptr<Sequence>> prefill_many(const std::vector<const PreparedPrompt*>& prompts,
                                                              const std::vector<KVPolicy*>& policies, float* logits);
  // Chunked prefill, where chunked_prefill() says the back end has it (the GPU). begin_prefill makes
  // a sequence holding the prompt with none of it run; prefill_pieces runs up to max_tokens[i] more
  // tokens of seqs[i]'s prompt (<= 0: the rest) for all of them in one pass, and returns for each
  // whether its prompt ended: such a sequence has row i of logits [n, vocab] written and its policy's
  // plan applied, exactly as after prefill(); the importance its policy asks for is gathered over
  // the pieces. A sequence mid-prompt takes no step. Out of KV memory: Error, nothing changed.
  // The defaults refuse (Error).
  virtual bool chunked_prefill() const { return false; }
  virtual std::unique_ptr<Sequence> begin_prefill(const PreparedPrompt& p, KVPolicy& policy);
  virtual std::vector<bool> prefill_pieces(const std::vector<Sequence*>& seqs, const std::vector<int>& max_tokens,
                                           float* logits);

  // Runs the prompt once, uncompressed, measuring the importance over the queries from each of
  // `importance_from` (each distinct, in [0, prompt length); may be empty). Out of KV memory: Error.
  virtual std::unique_ptr<SharedPrefill> prefill_shared(const PreparedPrompt& p, const std::vector<int>& importance_from) = 0;
  // A new sequence under `policy` that starts from a shared prefill of this backend: its cache a
  // copy of the prompt's, then the policy's plan applied (with the importance it asks for): the
  // same sequence prefill(p, policy) makes, without running the prompt again.
  virtual std::unique_ptr<Sequence> adopt(const SharedPrefill& shared, KVPolicy& policy) = 0;
  // Adds to a shared prefill of this backend the per-KV-head importance over the prompt's queries
  // from `from` (one more pass of the prompt), for `policy` (named in errors). Backends whose caches
  // keep the same entries in every head refuse (refuse_per_head): the default.
  virtual void add_head_importance(SharedPrefill& shared, const PreparedPrompt& p, int from, const std::string& policy);
  // Adds to a shared prefill of this backend the extended importance `req` asks for
  // (engine/query_importance.h: measured from the prompt's uncompressed cache; nothing if held
  // already). Only the CPU measures it; the default refuses, naming `policy`.
  virtual void add_extended_importance(SharedPrefill& shared, const PreparedPrompt& p, const ImportanceRequest& req,
                                       const std::string& policy);

  // Whether several host threads may use this backend at once (each with its own sequences).
  virtual bool thread_safe() const { return false; }

  // KV memory accounting, for admission: bytes of one entry of one layer (K, V and what the device
  // stores beside them), entries per allocation unit of a layer, and the fixed pool's size (0: the
  // host's memory, no fixed pool).
  virtual size_t kv_entry_bytes() const = 0;
  virtual int kv_block() const { return 1; }
  virtual size_t kv_pool_bytes() const { return 0; }

  // Statistics for benchmarks (prefixkv bench), so that they measure any device through this seam.
  // Counters run from the last reset_stats() (or the backend's making); memory is as it is now. A
  // field a backend does not measure stays 0: the CPU measures none of the breakdowns and has no
  // device memory or pool.
  struct Stats {
    // Prefills: how many, and where their wall time went: the model's pass (with the importance
    // pass when the policy asks for it), the policy on the host, the compaction.
    int prefills = 0;
    double prefill_model_ms = 0, prefill_policy_ms = 0, prefill_compact_ms = 0;
    // Batched decode steps: how many, and their wall time's parts: the input embeddings, the
    // model's step (launch and waiting for the logits), the policies, the compaction's host part.
    int steps = 0;
    double step_embed_ms = 0, step_model_ms = 0, step_policy_ms = 0, step_compact_ms = 0;
    // Of the model's steps: the device time of its work, and the host's work before the launch.
    double step_device_ms = 0, step_prep_ms = 0;
    int graph_captures = 0;        // steps recorded as a graph (the others replayed one)
    double compact_device_ms = 0;  // device time of every compaction, the prefills' and the steps'
    // The KV pool: its size, what sequences hold now and the most they held at once.
    size_t pool_total_bytes = 0, pool_used_bytes = 0, pool_peak_bytes = 0;
    // The device's memory (total and free now); the bytes of the weights it computes with.
    size_t device_total_bytes = 0, device_free_bytes = 0, weight_bytes = 0;
  };
  virtual Stats stats() const { return {}; }
  virtual void reset_stats() {}
  // What a benchmark says once about the device: a one-line summary ("" for the CPU) and the
  // switches its speed depends on, each with a key for reports ("cuda_graphs"), what it does, and
  // what turned it off.
  struct DeviceSwitch {
    std::string key, what;
    bool on = false;
    std::string off_by;
  };
  struct DeviceInfo {
    std::string summary;
    std::vector<DeviceSwitch> switches;
  };
  virtual DeviceInfo device_info() const { return {}; }
  // The device memory's bandwidth from timed device-to-device copies (bytes read + written per
  // second); 0 where it is not measured (the CPU).
  virtual double measure_copy_bandwidth() { return 0; }

  // Fills a prompt request's image encoder with this backend's vision tower (obs sees its tensors
  // where the backend supports it).
  // The GPU's leaves the image's embeddings on the device (PromptRequest::encode_image_on_device).
  virtual void use_for_images(PromptRequest& req, Observer* obs = nullptr);
};

// The CPU reference: Sessions over the model, their caches stored as kv_dtype (float32 by default;
// F16 / BF16 take half the memory: kv/kv_cache.h, --kv-dtype).
std::unique_ptr<Backend> make_cpu_backend(const Model& model, DType kv_dtype = DType::F32);

// Decodes several sequences of one backend to the end in batched steps (Backend::step_many over
// the unfinished ones), each from the logits of its prompt's last position (logits [n, vocab]) and
// with its own Decoding (same options; prompt_len[i] positions before the first generated token).
// Each result as generate()'s after its prefill (prefill_ms and first_logits left empty). The same
// answers as decoding each alone (bit for bit on the CPU).
// on_logits (optional) sees every row of logits a sequence samples from, before it samples.
std::vector<GenerationResult> generate_many(Backend& backend, const Tokenizer& tok,
                                            const std::vector<Backend::Sequence*>& seqs, const std::vector<int>& prompt_len,
                                            std::vector<float> logits, const SamplingOptions& s,
                                            const std::function<void(size_t seq, const float* logits)>& on_logits = {});

// Prefill + decode of one prompt on any backend: sampling, stop conditions and streaming
// (Decoding), the result's KV fields from the sequence at the end.
GenerationResult generate(Backend& backend, const Tokenizer& tok, const PreparedPrompt& p, const SamplingOptions& s,
                          KVPolicy& policy, const std::function<void(const std::string&)>& on_text = {},
                          Observer* obs = nullptr);

}  // namespace pkv
