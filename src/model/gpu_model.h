// The model forward pass on a CUDA device, and the paged KV pool it reads and writes.
// Plain C++ (no CUDA types, DESIGN.md principle 1); built with PREFIXKV_CUDA only (target pkv_model_cuda).
//
// GpuModel is built from a loaded CPU pkv::Model (the numerical reference): same config, same weight
// views. Every weight is uploaded once, converted on the host to the compute dtype (BF16 or F16, the
// caller's choice); norm weights, biases, class and position embeddings and RoPE frequencies stay
// float32. Activations (src/ops/cuda/README.md, "The model on the GPU"):
//   - the residual stream is float32 on the device; every GEMM product is float32 (cuBLAS, fp32
//     accumulation), and the o / down / fc2 projections add straight into the residual (beta = 1);
//   - GEMM inputs (norm outputs, attention outputs, SwiGLU / activation outputs) are rounded once to
//     the compute dtype (convert kernel); RoPE runs on the float32 q/k, which are then rounded once;
//   - K and V go into the paged pool in the compute dtype; prefill attention reads the same rounded
//     values, decode attention reads them from the pool.
// Per-call scratch is owned by the GpuModel: one GpuModel serves one host thread at a time.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "kv/block_pool.h"
#include "kv/policy.h"
#include "ops/cuda/device.h"
#include "ops/cuda/kernels.h"
#include "model/model.h"

namespace pkv::cuda {

struct GpuModelOptions {
  DType dtype = DType::BF16;  // compute dtype: BF16 or F16
  bool vision = true;         // upload the vision tower and projector (when the model has them)
  int device = 0;
  // Decode steps as CUDA graphs (one launch per step; PKV_CUDA_GRAPHS=0 turns them off).
  bool cuda_graphs = true;
};

class GpuModel;

// An image's embeddings [rows, width = the decoder's hidden size] (float32), left in device memory
// by GpuModel::encode_image_on_device for a prefill of the same GpuModel to splice into the prompt.
struct GpuImageRows {
  DeviceBuffer data;
  int rows = 0, width = 0;
  const GpuModel* owner = nullptr;
};

// Sizing of a GpuKVPool: give n_blocks, or bytes (device bytes for K, V and positions).
struct GpuKVPoolOptions {
  int block_size = 16;  // entries per block
  int n_blocks = 0;
  size_t bytes = 0;
};

// One pool of KV blocks on the device shared by every sequence and layer (layout: kernels.h
// PagedKV; bookkeeping: BlockPool). Each (sequence, layer) has its own block table and entry count.
class GpuKVPool {
 public:
  GpuKVPool(GpuModel& model, const GpuKVPoolOptions& opt);
  ~GpuKVPool();
  GpuKVPool(const GpuKVPool&) = delete;
  GpuKVPool& operator=(const GpuKVPool&) = delete;

  // Where the prefills' time went (GpuSession::prefill adds to it): the model's pass (with the
  // importance pass when the policy asks for it), the policy on the host, the compaction on the GPU.
  struct PrefillTimes {
    int prefills = 0;
    double model_ms = 0, policy_ms = 0, compact_ms = 0;
  };
  PrefillTimes& prefill_times() { return prefill_times_; }
  // Where the batched decode steps' wall time went (GpuSession::step_many adds to it): the host's
  // preparation of the inputs (embed_ms: checks, positions; the embeddings are gathered on the
  // device), the model's step (GpuModel::decode: metadata, launch, waiting for the logits), the
  // policies on the host positions, and the compaction's host part (checks, metadata, enqueueing).
  struct StepTimes {
    int steps = 0;
    double embed_ms = 0, model_ms = 0, policy_ms = 0, compact_ms = 0;
  };
  StepTimes& step_times() { return step_times_; }

  BlockPool& blocks() { return blocks_; }
  const BlockPool& blocks() const { return blocks_; }
  DType dtype() const { return dtype_; }
  int kv_dim() const { return kv_dim_; }
  int n_layers() const { return blocks_.n_layers(); }
  size_t block_bytes() const { return blocks_.bytes_per_block(); }
  void* stream() const { return stream_; }

  // The device view with the given device block tables ([n, table_stride] int32).
  PagedKV paged(const int32_t* tables, int table_stride) const;

  // Removes entries of whole (sequence, layer) tables: entry m becomes entry keep[m]; jobs with
  // merge first get Elastic's nearest-kept mean (paged_kv_merge). Then each table shrinks to
  // keep.size() entries (BlockPool::resize) and its tail blocks are free at once. Enqueued on the
  // stream (no synchronisation).
  //
  // A job with head_keep (one list per KV head, each strictly increasing, indices into that head's
  // entries: LayerKeep::head_keep) keeps exactly each head's list, in order, in head tables of its
  // own (kernels.h, PagedHeads): a shared layer is split (BlockPool::split_heads, then
  // paged_kv_head_compact copies each head's kept columns and the shared table is released), a
  // per-head layer compacts each head table in place and shrinks it. When the pool cannot hold the
  // new head tables beside the shared ones all at once, the splits run in groups, each group's
  // shared blocks released before the next; out of blocks even so: Error before anything changes.
  // Head jobs synchronise with the stream before they reuse their metadata buffer. No merge.
  struct Job {
    BlockPool::SeqId seq = 0;
    int layer = 0;
    std::vector<int32_t> keep;  // strictly increasing, < the table's entries
    bool merge = false;
    std::vector<std::vector<int32_t>> head_keep = {};
  };
  void compact(std::vector<Job> jobs);
  // GPU time of all compactions so far (CUDA events; reading the last one waits for it).
  double compaction_gpu_ms();

  // Makes the empty sequence `to` a copy of `from`: every layer's entries (K, V, positions) in
  // blocks of its own, and the same slot maps. Out of blocks: Error, nothing changed. Enqueued on
  // the stream (device-to-device copies, one per run of consecutive blocks).
  void copy_sequence(BlockPool::SeqId from, BlockPool::SeqId to);

  // Synchronises and throws Error when a paged kernel flagged an inconsistent block table since
  // the pool was made (a bug in the bookkeeping, never bad input). `after` names the call.
  void check_error_flag(const std::string& after);

  // Host [rows] of one (sequence, layer): K and V as float (converted from the pool's dtype) and the
  // positions, for tests and debugging (synchronises).
  void read_layer(BlockPool::SeqId seq, int layer, std::vector<float>* k, std::vector<float>* v,
                  std::vector<int32_t>* pos);
  // The same for one KV head of a per-head layer: k, v [entries, head_dim] (no positions: the host
  // keeps them).
  void read_head(BlockPool::SeqId seq, int layer, int head, std::vector<float>* k, std::vector<float>* v);

 private:
  BlockPool blocks_;
  PrefillTimes prefill_times_;
  StepTimes step_times_;
  StreamTimer compact_timer_;  // its stop event also tells when the last call's metadata copy is done
  bool compact_timed_ = false;
  void compact_heads(std::vector<Job> jobs);
  PinnedBuffer staging_pinned_;  // the metadata on its way to the device (asynchronous copy)
  PinnedBuffer head_pinned_;     // compact_heads' metadata (waits for the stream before reuse)
  double compact_gpu_ms_ = 0;
  DType dtype_;
  int kv_dim_;
  void* stream_;
  DeviceBuffer pool_, positions_, flag_, meta_, head_meta_;
  std::vector<int32_t> staging_;  // host side of meta_ (kept until the next call: async copy)
};

// One decode step for a batch of sequences: one new token each.
struct GpuDecodeBatch {
  std::vector<BlockPool::SeqId> seqs;  // B distinct sequences of the pool, each with >= 0 entries
  const float* embeddings = nullptr;   // host [B, hidden] input embeddings, or
  const int32_t* tokens = nullptr;     // host [B] token ids, gathered from the device embedding table
  const int32_t* positions = nullptr;  // host [B] absolute position of each new token
  float* logits = nullptr;             // host [B, vocab] (may be null)
  // Optional decode-time importance (H2O): (*importance)[b][l] = sequence b's new query's head-mean
  // attention probability over layer l's entries (after the append), for the b with
  // want_importance[b] (every b when want_importance is empty); other rows are left empty.
  std::vector<std::vector<std::vector<float>>>* importance = nullptr;
  std::vector<bool> want_importance;
  // Optional: host work to do while the step runs on the GPU (called once the step and the copy of
  // its logits are enqueued, before waiting for them): GpuSession::step_many runs the policies and
  // enqueues the compaction there, which the step's own results do not feed unless a policy needs
  // decode-time importance (then it must be empty). If it throws, the step is still waited for.
  std::function<void()> while_running;
  // Optional: shown the step's named tensors (layer_out [B, hidden] per layer, hidden_final, logits
  // [B, vocab]) as Model::decode shows them; an observed step runs as plain launches, not a graph.
  Observer* observer = nullptr;
};

// One sequence's rows in a prefill call (GpuModel::prefill_parts): rows [past, past + n) of its
// prompt, appended after the `past` entries every layer of the sequence holds (an earlier piece of
// the same prompt, never compacted since: its entries sit in logical order).
struct GpuPrefillPart {
  BlockPool::SeqId seq = 0;
  int past = 0;
  int n = 0;
  const int32_t* pos = nullptr;  // host [n] absolute positions, strictly increasing
  // The input rows: host embeddings [n, hidden], or token ids [n] read from the device's embedding
  // table, except the rows that an image covers: row i is image row i - image_row0 when that lies
  // in [0, image->rows) (image_row0 may be negative: a piece that starts inside the image).
  const float* x = nullptr;
  const int32_t* ids = nullptr;
  const GpuImageRows* image = nullptr;
  int image_row0 = 0;
  float* logits = nullptr;  // host [vocab]: the logits of the part's last row (may be null)
  // Optional: (*importance)[l][j] += for each key j < past + n, the sum over this part's queries
  // i >= importance_from (an index into the part's rows) of their head-mean attention probability
  // (METHOD.md section 1). Its rows must hold >= past + n values. Over several pieces of one
  // prompt this adds each piece's queries to the same sums: the unchunked importance up to the
  // order of float32 additions.
  std::vector<std::vector<float>>* importance = nullptr;
  int importance_from = 0;
  // > 0: per-KV-head importance (ImportanceRequest::per_kv_head): KV head g's sums (the mean over
  // its group's query heads) at [g * importance_head_stride, + past + n) of each row.
  int importance_head_stride = 0;
  // The extended importance (ImportanceRequest::weight, reduce; not per KV head): each query head
  // h's probability on entry j times the value weight of j (ValueNorm: ||v||_1 of h's KV head;
  // OutputNorm2: ||W_o^h v||_2 through the Gram matrices of W_o, made on the device on first use) before the head
  // mean, and with importance_max the part's queries combined by their maximum:
  // (*importance)[l][j] = max(itself, the part's largest). The weights are computed per part and
  // layer from the same 16-bit values the attention reads (entries [0, past + n)). OutputNorm (the
  // L1 norm of W_o^h v) is refused: a hidden-wide product per head and entry (kernels.h).
  ValueWeight importance_weight = ValueWeight::None;
  bool importance_max = false;
};

class GpuModel {
 public:
  // Uploads the weights. Throws Error: no device, unsupported dtype or shapes, a weight outside the
  // F16 range, or out of device memory (naming the tensor).
  explicit GpuModel(const Model& model, const GpuModelOptions& opt = {});
  ~GpuModel();
  GpuModel(const GpuModel&) = delete;
  GpuModel& operator=(const GpuModel&) = delete;

  const Model& cpu() const;
  const ModelConfig& config() const;
  DType dtype() const;
  bool has_vision() const;
  size_t weight_bytes() const;  // device bytes of the uploaded weights
  // Of those, the bytes of quantised tensors kept as the GGUF file's ggml blocks (the products
  // dequantise them as they read them); their dequantised scratch (one matrix, for products of more
  // than kGemvMaxRows rows) is apart. weights_summary: for logs, with quantised weights only (else
  // ""): "weights X MiB (Y MiB as Q4_K/Q6_K blocks; dequantisation scratch Z MiB)".
  size_t quantised_bytes() const;
  std::string weights_summary() const;
  void* stream() const;         // the cudaStream_t every call runs on
  bool uses_graphs() const;     // decode steps run as CUDA graphs (GpuModelOptions::cuda_graphs)
  int graph_captures() const;   // decode steps captured so far (the rest were replays)
  // GPU time of the decode steps' work (embedding to logits, CUDA events), to compare with their
  // wall time: the rest is the host's (metadata, policies, the copies and synchronisation).
  struct DecodeTimes {
    int steps = 0;
    double gpu_ms = 0;   // the step's kernels (CUDA events around the graph)
    double host_ms = 0;  // decode()'s host work before the launch (checks, blocks, metadata)
  };
  DecodeTimes decode_times() const;
  void reset_decode_times();

  // pixels [3, S, S] (host) -> image embeddings [image_tokens, text hidden] (host): CLIP tower and
  // projector on the device; the feature layers and CLS handling of Model::encode_image.
  // obs (optional) sees pixel_values, vision_layer_out per layer, vision_features and
  // projector_output, as Model::encode_image shows them.
  std::vector<float> encode_image(const float* pixels, Observer* obs = nullptr);
  // The same, the embeddings left on the device (nothing of the image comes back to the host).
  GpuImageRows encode_image_on_device(const float* pixels, Observer* obs = nullptr);

  // Prefill of one sequence whose layers are empty: x [T, hidden] host input embeddings at absolute
  // positions pos [T] (strictly increasing). Takes the blocks (every layer gets T entries; throws
  // Error naming the sequence and the block counts when the pool is short, changing nothing),
  // writes K/V, and returns the last position's logits (host [vocab], may be null) and, when
  // importance is given, (*importance)[l] = layer l's per-key importance over the queries
  // >= importance_from (host [L][T]; with importance_per_kv_head [L][n_kv_heads * T], head-major).
  // obs (optional) sees layer_out [T, hidden] per layer, hidden_final [T, hidden] and logits
  // [1, vocab], as Model::decode shows them.
  // importance_weight, importance_max: as GpuPrefillPart's.
  void prefill(GpuKVPool& kv, BlockPool::SeqId seq, const float* x, int T, const int32_t* pos, float* logits,
               std::vector<std::vector<float>>* importance = nullptr, int importance_from = 0, Observer* obs = nullptr,
               bool importance_per_kv_head = false, ValueWeight importance_weight = ValueWeight::None,
               bool importance_max = false);
  // The same prefill with its input built on the device: row i the embedding table's row of ids[i],
  // except rows [image_offset, image_offset + image->rows), which are the image's (their ids are
  // not read). image may be null (a text prompt). The ids outside the image must be in the vocabulary.
  void prefill(GpuKVPool& kv, BlockPool::SeqId seq, const int32_t* ids, const GpuImageRows* image, int image_offset,
               int T, const int32_t* pos, float* logits, std::vector<std::vector<float>>* importance = nullptr,
               int importance_from = 0, Observer* obs = nullptr, bool importance_per_kv_head = false,
               ValueWeight importance_weight = ValueWeight::None, bool importance_max = false);

  // Several sequences' prompt rows in ONE forward pass (batched prefill), each possibly a piece of a
  // longer prompt (chunked prefill): see GpuPrefillPart. Every product runs once over the
  // concatenated rows of all parts; attention runs per part (one launch of the prefill kernel per
  // part and layer: the kernel takes one sequence's query range), the part's queries over its own
  // keys: the rows of this call and, for a later piece, the `past` entries its earlier pieces wrote
  // (read back from the pool, the same 16-bit values). Blocks: every layer of every part grows to
  // past + n entries, all or nothing over the call (Error naming the sequences, nothing changed).
  // obs (optional) only with one part: as prefill().
  void prefill_parts(GpuKVPool& kv, const std::vector<GpuPrefillPart>& parts, Observer* obs = nullptr);

  // One batched decode step (see GpuDecodeBatch): appends one entry to every layer of every
  // sequence (all or nothing: throws Error naming the sequences and block counts when the pool is
  // short, changing nothing), then flash-decoding attention over each sequence's own entries.
  void decode(GpuKVPool& kv, const GpuDecodeBatch& batch);

 private:
  // Sizes *importance for a whole-prompt part and asks the part for it (prefill()).
  void want_importance(GpuPrefillPart& part, int T, std::vector<std::vector<float>>* importance, int from,
                       bool per_kv_head, ValueWeight weight, bool max) const;
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace pkv::cuda
