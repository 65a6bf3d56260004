// One sequence decoding on the GPU: the twin of pkv::Session (src/engine/engine.h) over a shared
// paged GpuKVPool. Plain C++ (no CUDA types); built with PREFIXKV_CUDA only (target pkv_cuda_model).
//
// The session applies its KVPolicy exactly where the CPU Session does (after the prefill, after
// every decode step), to a host KVMirror of its entries (positions and markers, kv/kv_mirror.h),
// and carries the policy's decision over to the device: Elastic's merge (paged_kv_merge), the
// compaction (paged_kv_compact) and the shrinking of the block tables (BlockPool::resize).
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "model/gpu_model.h"
#include "kv/kv_mirror.h"
#include "engine/engine.h"
#include "kv/policy.h"

namespace pkv::cuda {

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
  void prefill(const PreparedPrompt& p, float* logits);
  // Feeds one token at the next position; writes the logits for the position after it, then lets
  // the policy evict. Out of blocks: throws Error and nothing changes.
  void step(int32_t token, float* logits);
  // One token for each of several sessions of the same model and pool in ONE batched decode call
  // (the sessions may have different lengths, positions and policies); logits [n, vocab], row i for
  // sessions[i]. Equivalent to step() on each in turn; all or nothing when out of blocks.
  static void step_many(const std::vector<GpuSession*>& sessions, const int32_t* tokens, float* logits);

  int position() const { return pos_; }
  BlockPool::SeqId sequence() const { return seq_; }
  const KVPolicy& policy() const { return policy_; }
  // The entries each layer holds (positions; the K/V rows are markers, not keys).
  const KVCache& mirror() const { return mirror_.cache(); }
  std::vector<int> entries_per_layer() const;
  // Device bytes of the blocks this session holds.
  size_t kv_bytes() const;

 private:
  // Runs `policy_call` on the mirror and applies what it did to the device (collected into jobs).
  template <class F>
  void run_policy(F&& policy_call, std::vector<GpuKVPool::Job>& jobs);
  void check_mirror() const;

  GpuModel& model_;
  GpuKVPool& pool_;
  KVPolicy& policy_;
  KVMirror mirror_;
  BlockPool::SeqId seq_;
  int pos_ = 0;
};

// Prefill + decode of one prompt on the GPU, the twin of Engine::generate: the same sampling, stop
// conditions and streaming (Decoding), in a session of `pool`. Fills the result's KV fields from
// the pool blocks the session holds at the end (device bytes of 16-bit entries).
GenerationResult generate_on_gpu(GpuModel& model, GpuKVPool& pool, const Tokenizer& tok, const PreparedPrompt& p,
                                 const SamplingOptions& s, KVPolicy& policy,
                                 const std::function<void(const std::string&)>& on_text = {});

// KV pool options that hold one sequence of `entries` entries in every layer (blocks of 16).
GpuKVPoolOptions pool_for_one_sequence(const GpuModel& model, int entries);

}  // namespace pkv::cuda
