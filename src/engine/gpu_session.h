// One sequence decoding on the GPU: the twin of pkv::Session (src/engine/engine.h) over a shared
// paged GpuKVPool. Plain C++ (no CUDA types); built with PREFIXKV_CUDA only (target pkv_engine_cuda).
//
// The session asks its KVPolicy exactly where the CPU Session does (after the prefill, after every
// decode step), showing it the positions each layer holds (a host PositionTable), and the pool
// applies the policy's keep plan on the device: Elastic's merge (paged_kv_merge), the compaction
// (paged_kv_compact) and the shrinking of the block tables (BlockPool::resize). A plan with one
// keep list per KV head (adakv) gives the layer head tables (GpuKVPool::compact, kernels.h
// PagedHeads), as it makes a CPU cache's layer per-head; its per-KV-head importance is measured by
// the prefill (GpuPrefillPart::importance_head_stride).
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "model/gpu_model.h"
#include "kv/keep_plan.h"
#include "engine/engine.h"
#include "kv/policy.h"

namespace pkv::cuda {

// A prompt's image left on the GPU by the cuda back end's encoder (PreparedPrompt::device_image).
struct GpuDeviceImage : DeviceImage {
  GpuImageRows rows;
};

class GpuSession {
 public:
  // Admits a new (empty) sequence into `pool`; it holds no blocks until the prefill. The model,
  // pool and policy must outlive the session; the session returns its blocks when destroyed.
  GpuSession(GpuModel& model, GpuKVPool& pool, KVPolicy& policy);
  ~GpuSession();
  GpuSession(const GpuSession&) = delete;
  GpuSession& operator=(const GpuSession&) = delete;

  // Runs the prompt (p.embeddings [T, hidden]); writes the logits of its last position (from the
  // uncompressed prefill; may be null), then lets the policy compress the cache. Out of blocks:
  // throws Error (sequence, blocks needed and free) and the session stays empty.
  void prefill(const PreparedPrompt& p, float* logits, Observer* obs = nullptr);
  // Runs the prompt without consulting the policy (nothing compressed; logits may be null) and
  // returns the raw importance over the queries from each of importance_from (distinct, in
  // [0, T)); each window after the first is measured by a second pass over a scratch sequence of
  // the pool. Backend::prefill_shared on the GPU.
  std::vector<std::vector<std::vector<float>>> prefill_uncompressed(const PreparedPrompt& p, float* logits,
                                                                    const std::vector<int>& importance_from,
                                                                    bool per_kv_head = false);
  // Starts from another session's uncompressed prefill (same model and pool): a copy of its blocks,
  // then this session's policy compresses it with `importance` (what it asks for, from the same
  // prompt), exactly as after prefill().
  void adopt_prefill(const GpuSession& full, const std::vector<std::vector<float>>& importance);
  // Runs the prompt here (nothing held yet) without consulting the policy (nothing compressed) and
  // returns the importance `req` asks for, extended requests included (check_gpu_prompt_importance):
  // Backend::add_extended_importance on the GPU, one more prefill over scratch blocks per request.
  std::vector<std::vector<float>> measure_importance(const PreparedPrompt& p, const ImportanceRequest& req);
  // Feeds one token at the next position; writes the logits for the position after it, then lets
  // the policy evict. Out of blocks: throws Error and nothing changes.
  void step(int32_t token, float* logits, Observer* obs = nullptr);
  // One token for each of several sessions of the same model and pool in ONE batched decode call
  // (the sessions may have different lengths, positions and policies); logits [n, vocab], row i for
  // sessions[i]. Equivalent to step() on each in turn; all or nothing when out of blocks.
  // obs (optional) sees the step's named tensors (GpuDecodeBatch::observer).
  static void step_many(const std::vector<GpuSession*>& sessions, const int32_t* tokens, float* logits,
                        Observer* obs = nullptr);

  // Batched and chunked prefill. begin_prefill takes a prompt into this empty session without
  // running any of it (the prompt is copied; its image rows stay where they are);
  // prefill_pieces then runs pieces of several sessions' prompts in one forward pass. A session whose
  // prompt ends in a call writes its logits and lets its policy compress, exactly as prefill() does
  // after the whole prompt; until then it holds its rows uncompressed and takes no decode step.
  // The importance its policy asks for is gathered over the pieces (GpuPrefillPart::importance):
  // the paper's estimator adds each piece's queries over every key so far; the window's counts the
  // prompt's last `window` queries, in whichever pieces they fall.
  void begin_prefill(const PreparedPrompt& p);
  bool prefilling() const { return pending_ != nullptr; }
  int prefill_left() const;  // prompt tokens not run yet (0 when not prefilling)
  // Runs up to max_tokens[i] more tokens of sessions[i]'s prompt (<= 0: all that is left) for every
  // session in ONE GpuModel::prefill_parts call (sessions of one model and pool, each prefilling);
  // logits [n, vocab] (may be null): row i written when sessions[i]'s prompt ends in this call.
  // Returns, per session, whether its prompt ended. Out of blocks: Error, nothing changed.
  static std::vector<bool> prefill_pieces(const std::vector<GpuSession*>& sessions, const std::vector<int>& max_tokens,
                                        float* logits);
  // Several whole prompts in one pass: begin_prefill on each, then one prefill_pieces call.
  static void prefill_many(const std::vector<GpuSession*>& sessions, const std::vector<const PreparedPrompt*>& prompts,
                           float* logits);

  int position() const { return pos_; }
  BlockPool::SeqId sequence() const { return seq_; }
  const KVPolicy& policy() const { return policy_; }
  // The positions each layer holds (the pool holds their keys and values).
  const PositionTable& positions() const { return positions_; }
  std::vector<int> entries_per_layer() const;  // a per-head layer: summed over its KV heads
  // Device bytes of the blocks this session holds; per layer and KV head (BlockPool::bytes_per_head).
  size_t kv_bytes() const;
  std::vector<std::vector<size_t>> kv_bytes_per_head() const;

 private:
  // Checks the policy's plan, applies it to the host positions and adds its device work to jobs.
  void take_plan(KeepPlan plan, std::vector<GpuKVPool::Job>& jobs);
  void check_positions() const;
  // The prompt into this empty sequence (no policy involved); the importance `req` asks for into
  // *importance when that is given (a mean over the queries divided by their count here).
  void run_prompt(const PreparedPrompt& p, float* logits, std::vector<std::vector<float>>* importance,
                  const ImportanceRequest& req, Observer* obs = nullptr);
  // The policy's plan after the prefill (or an adopted one), applied on the device; returns the
  // host time the policy took (ms).
  double compress_prompt(const std::vector<std::vector<float>>& importance);

  // A prompt taken by begin_prefill: its rows, the importance its policy asked for (summed over the
  // pieces so far) and how many of its tokens have run.
  struct Pending {
    PreparedPrompt prompt;
    ImportanceRequest request;
    std::vector<std::vector<float>> importance;  // [layers][prompt tokens] when requested
    int done = 0;
  };
  // The part of the next piece of up to max_tokens tokens (<= 0: the rest).
  GpuPrefillPart next_part(int max_tokens, std::vector<int32_t>& pos);

  GpuModel& model_;
  GpuKVPool& pool_;
  std::unique_ptr<Pending> pending_;
  KVPolicy& policy_;
  PositionTable positions_;
  BlockPool::SeqId seq_;
  int pos_ = 0;
};

// KV pool options that hold one sequence of `entries` entries in every layer (blocks of 16), also
// when a per-head plan (adakv) splits its layers into head tables.
GpuKVPoolOptions pool_for_one_sequence(const GpuModel& model, int entries);

}  // namespace pkv::cuda
