// Launch plans of the attention and paged-KV kernels (internal to src/ops/cuda/): the argument checks,
// the kernel parameters, grid shapes, shared-memory layouts and workspace layouts, in plain C++ (no
// CUDA types). The CUDA launchers (attention.cu, paged_kv.cu) and the CPU emulation test
// (tests/cuda/emu_test.cc) both run exactly these plans, so the emulation covers them too.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "ops/cuda/kernels.h"

namespace pkv::cuda::detail {

struct Launch {
  unsigned grid[3] = {0, 0, 0};
  int threads = 0;
  size_t smem = 0;  // dynamic shared memory bytes
  bool empty() const { return grid[0] == 0 || grid[1] == 0 || grid[2] == 0; }
};

// Head dims are padded to one of three tile widths (zeros beyond head_dim): few instantiations.
inline int padded_head_dim(int hd) { return hd <= 32 ? 32 : hd <= 64 ? 64 : 128; }

// ---------------------------------------------------------------------------------------------
// Prefill attention. Thread block: 128 threads as 16 x 8 (ty, tx); a tile of 64 queries x 64 keys;
// thread (ty, tx) owns query rows ty*4 .. ty*4+3 and keys tx*8 .. tx*8+7 of the score tile, and the
// same rows x head dims tx*(D/8) .. of the output accumulator.
constexpr int kPrefillBQ = 64;
constexpr int kPrefillBK = 64;
constexpr int kPrefillThreads = 128;

// Shared memory of the forward kernel, in floats (ints share the float slots). The K and V tiles
// are kept in the inputs' 16-bit type (exact: they are 16-bit values), which halves them and lets two
// blocks share an SM; the scaled Q tile and the probabilities are float32.
template <int D>
struct PrefillForwardLayout {
  static constexpr int QS = kPrefillBQ + 4;  // row stride of Qs [D][QS] (transposed Q tile, 16-byte rows)
  static constexpr int KS = kPrefillBK + 8;  // row stride of Ks [D][KS] (transposed K tile, 16-bit, 16-byte rows)
  static constexpr int PS = kPrefillBK + 1;  // row stride of Ps [BQ][PS] (probabilities; odd: no bank conflicts)
  static constexpr size_t q = 0;
  static constexpr size_t k = q + size_t(D) * QS;
  static constexpr size_t v = k + size_t(D) * KS / 2;             // Vs [BK][D] (16-bit)
  static constexpr size_t p = v + size_t(kPrefillBK) * D / 2;     // Ps [BQ][PS]
  static constexpr size_t kpos = p + size_t(kPrefillBQ) * PS;     // int [BK]: key positions
  static constexpr size_t misc = kpos + kPrefillBK;               // int [4]: [0] = end of the visible keys
  static constexpr size_t floats = misc + 4;
  static constexpr size_t bytes = floats * 4;
};

// Shared memory of the importance kernel (one 64-key tile against every query tile).
template <int D>
struct PrefillImportanceLayout {
  static constexpr int QS = kPrefillBQ + 4;
  static constexpr int KS = kPrefillBK + 8;  // 16-bit, as in the forward kernel
  static constexpr size_t q = 0;
  static constexpr size_t k = q + size_t(D) * QS;
  static constexpr size_t red = k + size_t(D) * KS / 2;                   // [16][BK] column sums per ty
  static constexpr size_t lse = red + size_t(16) * kPrefillBK;            // [BQ] log2-sum-exp of each row
  static constexpr size_t qpos = lse + kPrefillBQ;                         // int [BQ]
  static constexpr size_t rowok = qpos + kPrefillBQ;                       // int [BQ]: row counts
  static constexpr size_t kpos = rowok + kPrefillBQ;                       // int [BK]
  static constexpr size_t floats = kpos + kPrefillBK;
  static constexpr size_t bytes = floats * 4;
};

// Shared memory of the tensor-core kernels (attention_mma.cuh), in bytes. 16-bit tiles with rows of
// D + 8 elements: 16-byte aligned rows for cp.async and ldmatrix, and the 8 rows of one ldmatrix
// matrix fall in 8 different 16-byte bank groups (no conflicts).
template <int D>
struct MmaPrefillLayout {
  static constexpr int S = D + 8;                                   // row stride, elements
  static constexpr size_t tile = size_t(kPrefillBQ) * S * 2;        // one 64-row tile, bytes
  static constexpr size_t q = 0;                                    // Q tile
  static constexpr size_t k = q + tile;                             // K tiles [2] (double-buffered)
  static constexpr size_t v = k + 2 * tile;                         // V tiles [2]
  static constexpr size_t kpos = v + 2 * tile;                      // int [2][BK]
  static constexpr size_t misc = kpos + 2 * kPrefillBK * 4;         // int [4]: [0] = end of the visible keys
  static constexpr size_t bytes = misc + 16;
};
template <int D>
struct MmaImportanceLayout {
  static constexpr size_t tile = MmaPrefillLayout<D>::tile;
  static constexpr size_t q = 0;                                    // Q tile
  static constexpr size_t k = q + tile;                             // the block's K tile
  static constexpr size_t kpos = k + tile;                          // int [BK]
  static constexpr size_t lse = kpos + kPrefillBK * 4;              // float [BQ]
  static constexpr size_t qpos = lse + kPrefillBQ * 4;              // int [BQ]
  static constexpr size_t rowok = qpos + kPrefillBQ * 4;            // int [BQ]
  static constexpr size_t red = rowok + kPrefillBQ * 4;             // float [4 warps][BK]
  static constexpr size_t bytes = red + 4 * kPrefillBK * 4;
};

struct PrefillParams {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  int64_t q_stride = 0, kv_stride = 0, out_stride = 0;
  const int32_t* q_pos = nullptr;
  const int32_t* kv_pos = nullptr;
  int n_q = 0, n_kv = 0, n_heads = 0, group = 1, head_dim = 0;
  float scale_log2 = 0.f;        // scale * log2(e): scores live in the log2 domain (exp2)
  float* lse = nullptr;          // [n_heads, n_q] log2-sum-exp per row (importance only)
  float* partial = nullptr;      // [n_heads, n_kv] importance per head (importance only)
  float* importance = nullptr;   // [n_kv] the caller's output (+=); [n_kv_heads, n_kv] per KV head
  int importance_from = 0;
  bool importance_per_kv_head = false;
  const float* importance_weight = nullptr;  // [n_heads, n_kv] or null (kernels.h)
  bool importance_max = false;   // prefill_importance_max: partial [max_groups, n_kv] holds each
  int max_groups = 0;            // group of query tiles' column maxima
  int vec = 0;                   // q, k, v rows may be read in 16-byte chunks (tensor-core kernels)
};

struct PrefillPlan {
  PrefillParams params;
  DType dtype = DType::BF16;
  int D = 0;                 // padded head dim (32, 64, 128)
  bool importance = false;
  bool tensor_cores = false;  // attention_mma.cuh's kernels, else attention_body.h's (CUDA cores)
  Launch forward, importance_pass, reduce;
};
// Checks the arguments (throws pkv::Error naming the bad one) and plans the launches.
PrefillPlan plan_attention_prefill(const PrefillAttentionArgs& a);

// Workspace of the importance pass: lse [n_heads, n_q] then partial [n_heads, n_kv] (256-aligned).
struct PrefillWorkspaceLayout {
  size_t lse = 0, partial = 0, total = 0;
};
PrefillWorkspaceLayout prefill_workspace_layout(int n_q, int n_kv, int n_heads);

// A product through cuBLAS that a plan below names (gemm.cc runs it; the tests' host stand-in,
// tests/cuda/emu_products.cc, emulates it): for each b < batch, C_b = op(A_b) op(B_b) in
// cublasGemmStridedBatchedEx's column-major terms, with X_b = X + b * stride_x (elements) and
// op(X) = X^T where trans_x. C float32 [m, n] (ldc), op(A) [m, k], op(B) [k, n]; alpha 1, beta 0.
// CUBLAS_COMPUTE_32F: ab_dtype F32 gives plain float32 multiply-adds (Blas's math mode has no TF32);
// F16 / BF16 tensor cores (16-bit products exact in float32, float32 sums).
struct StridedGemm {
  DType ab_dtype = DType::F32;
  bool trans_a = false, trans_b = false;
  int m = 0, n = 0, k = 0, batch = 0;
  const void* a = nullptr;
  int64_t lda = 0, stride_a = 0;
  const void* b = nullptr;
  int64_t ldb = 0, stride_b = 0;
  float* c = nullptr;
  int64_t ldc = 0, stride_c = 0;
};
// Runs it on blas's stream (gemm.cc).
void run_strided_gemm(Blas& blas, const StridedGemm& g);

// Value weights (kernels.h value_weights).
// vnorm (gram null): block (x, y) = (64 keys, query head y), one thread per key; the keys' values
// of y's KV head in shared memory as float32 [64][D + 1] (odd rows: a thread's row walk hits no
// bank twice).
constexpr int kValueWeightKeys = 64;
template <int D>
struct ValueWeightLayout {
  static constexpr int S = D + 1;
  static constexpr size_t bytes = size_t(kValueWeightKeys) * S * 4;
};
struct ValueWeightParams {
  const void* v = nullptr;
  int64_t kv_stride = 0;
  int n_kv = 0, group = 1, head_dim = 0;
  float* out = nullptr;
};
// wov2 (gram set), on the tensor cores: once per call, gram_split: each query head's G_h scaled by a
// power of two s_h (its largest magnitude to [2^14, 2^15)) and cut into P 16-bit parts of the values'
// dtype, s_h G_h = sum_p G_h,p up to 2^-22 (F16, P = 2) or 2^-24 (BF16, P = 3) of each element
// (each part the rounding of what the parts before left; the scale keeps F16's low part clear of
// its subnormals), stored gp[h][d][p][e] = G_h,p[d][e], and 1 / s_h. Then the keys in chunks of at
// most kValueWeightChunk; per chunk of m keys from key j0:
//  1. value_rows: vf [m, kv_dim] float32 (dense) = the chunk's 16-bit values, and vb [m][n_kv_heads][P]
//     [head_dim] = each KV head's values P times, in their own 16-bit type;
//  2. one StridedGemm over the KV heads g with 16-bit inputs (the tensor cores; float32 sums of exact
//     products): y [m, n_heads * head_dim] float32 with y[r, h hd + d] = sum_p sum_e G_h,p[d][e]
//     vb[r][g][p][e] = s_h (G_h v)[d] for the group's query heads h (A_g = gp + g group hd P hd,
//     column-major [P hd, group hd], transposed; B_g = vb + g P hd, column-major [P hd, m]);
//  3. value_weight_dots: out[h n_kv + j0 + r] = sqrt(max(0, (sum_d y[r, h hd + d] vf[r, g hd + d]) / s_h)).
// Workspace (value_weights_workspace_bytes): gp, the scales, vf, vb, then y (each 256-aligned).
constexpr int kValueWeightChunk = 2048;
constexpr int kValueRowsThreads = 128;  // value_rows: a block per row, its threads over the columns
constexpr int kValueDotThreads = 128;   // value_weight_dots: a thread per (key, query head), heads fastest
constexpr int kGramSplitThreads = 256;  // gram_split: a block per query head
// The 16-bit parts a Gram matrix is cut into for the values' type: F16 2 (11 bits each), BF16 3 (8).
constexpr int gram_parts(DType t) { return t == DType::F16 ? 2 : 3; }
constexpr int kMaxGramParts = 3;  // the workspace is sized for it, whatever the type
struct GramSplitParams {
  const float* gram = nullptr;  // [n_heads, hd, hd]
  int head_dim = 0, parts = 2;
  void* out = nullptr;          // 16-bit [n_heads, hd, parts, hd]
  float* inv_scale = nullptr;   // [n_heads]: 1 / s_h
};
struct ValueRowsParams {
  const void* v = nullptr;  // 16-bit [rows, kv_stride]
  int64_t kv_stride = 0;
  int rows = 0, cols = 0;
  float* out = nullptr;     // [rows, cols]
  void* parts_out = nullptr;  // 16-bit [rows][cols / head_dim][parts][head_dim]
  int head_dim = 0, parts = 2;
};
struct ValueDotParams {
  const float* y = nullptr;   // [rows, n_heads * head_dim]
  const float* vf = nullptr;  // [rows, n_kv_heads * head_dim]
  const float* inv_scale = nullptr;  // [n_heads]: y's scale undone (a power of two: exact)
  int rows = 0, n_heads = 0, group = 1, head_dim = 0;
  float* out = nullptr;       // out[h * out_stride + r]
  int64_t out_stride = 0;
};
struct ValueWeightChunk {
  ValueRowsParams rows;
  Launch rows_launch;
  StridedGemm gemm;
  ValueDotParams dots;
  Launch dots_launch;
};
struct ValueWeightWorkspaceLayout {
  size_t gp = 0, scale = 0, vf = 0, vb = 0, y = 0, total = 0;
};
ValueWeightWorkspaceLayout value_weight_workspace_layout(int n_kv, int n_heads, int n_kv_heads, int head_dim, bool gram);
struct ValueWeightPlan {
  DType dtype = DType::BF16;
  // vnorm: one launch.
  ValueWeightParams params;
  int D = 0;
  Launch launch;
  // wov2: the Gram matrices' parts, then the chunks, in order.
  GramSplitParams split;
  Launch split_launch;
  std::vector<ValueWeightChunk> chunks;
};
ValueWeightPlan plan_value_weights(const ValueWeightArgs& a);

// The output projection's Gram matrices (kernels.h output_gram): one StridedGemm over the query
// heads h, with A_h = B_h = w + h hd read column-major [hd, hidden] (ld n_heads hd: W_o^h transposed),
// C_h = out + h hd^2: G_h = (W_o^h)^T W_o^h.
StridedGemm plan_output_gram(const OutputGramArgs& a);

// ---------------------------------------------------------------------------------------------
// Decode attention (flash-decoding). Thread block: 128 threads; a block handles G query heads of one
// kv head (G = the largest divisor of the group size <= 8) over one split of a sequence's keys, in
// tiles of 64 keys. For the keys, D/8 threads share one key (8 head dims each, one 16-byte load).
constexpr int kDecodeThreads = 128;
constexpr int kDecodeTK = 64;           // keys per tile
constexpr int kDecodeMaxG = 8;          // query heads per block at most
constexpr int kDecodeMinChunk = 64;     // fewest keys per split
// Enough blocks to keep ~8 per SM of an H100 / H200 (132 SMs) loading: a block has only
// NL * 16 bytes per thread-row in flight, so memory parallelism comes from many blocks.
constexpr int kDecodeTargetBlocks = 1056;

constexpr int kDecodeKeysInFlight = 4;   // keys a key group loads before using them

template <int D>
struct DecodeLayout {
  static constexpr int KT = D / 8;                 // threads per key (8 dims each)
  static constexpr int NL = kDecodeThreads / KT;   // key groups per block
  // Shared memory for the final merge, G heads per block: m and l [NL][G], partial outputs
  // [NL][G][D] (floats).
  static constexpr size_t bytes(int G) { return (2 * size_t(NL) * G + size_t(NL) * G * D) * 4; }
};

struct DecodeParams {
  const void* q = nullptr;
  int64_t q_stride = 0;
  const int32_t* q_pos = nullptr;
  const void* pool = nullptr;
  const int32_t* positions = nullptr;
  int n_blocks = 0, block_size = 0, kv_dim = 0;
  const int32_t* tables = nullptr;
  int table_stride = 0;
  int* error_flag = nullptr;
  const int32_t* lengths = nullptr;
  int max_len = 0;
  int batch = 0, n_heads = 0, group = 1, G = 1, head_dim = 0;
  float scale_log2 = 0.f;
  int n_splits = 1, chunk = 0;
  float* ws_o = nullptr;       // [batch, n_heads, n_splits, head_dim] unnormalised partial outputs
  float* ws_ml = nullptr;      // [batch, n_heads, n_splits, 2] (running max, running sum) per split
  float* ws_lse = nullptr;     // [batch, n_heads] log2-sum-exp (importance only)
  float* ws_scores = nullptr;  // [batch, n_heads, max_len] scaled log2 scores (importance only)
  void* out = nullptr;
  int64_t out_stride = 0;
  float* importance = nullptr;
  int64_t importance_stride = 0;
  // Head tables (DecodeAttentionArgs::heads; null: every sequence reads its shared table).
  const int32_t* head_flags = nullptr;
  const int32_t* head_tables = nullptr;
  const int32_t* head_lengths = nullptr;
};

struct DecodeWorkspaceLayout {
  int G = 1, n_splits = 1, chunk = 0;
  size_t o = 0, ml = 0, lse = 0, scores = 0, total = 0;
};
DecodeWorkspaceLayout decode_workspace_layout(int batch, int n_heads, int n_kv_heads, int head_dim, int max_len,
                                              bool importance);

struct DecodePlan {
  DecodeParams params;
  DType dtype = DType::BF16;
  int D = 0;
  int MG = 1;  // heads per block rounded up to 1, 2, 4 or 8 (decode_split's template argument)
  bool importance = false;
  Launch split, combine, importance_pass;
};
DecodePlan plan_attention_decode(const DecodeAttentionArgs& a);

// ---------------------------------------------------------------------------------------------
// Paged KV row copies, compaction and merge.
constexpr int kPagedThreads = 128;

struct PagedParams {
  void* pool = nullptr;
  int32_t* positions = nullptr;
  int n_blocks = 0, block_size = 0, kv_dim = 0;
  const int32_t* tables = nullptr;
  int table_stride = 0;
  int* error_flag = nullptr;
  // rows (write / read)
  const int32_t* row_table = nullptr;
  const int32_t* row_entry = nullptr;
  int n_rows = 0;
  const void* src_k = nullptr;  // write: source rows; read: null
  const void* src_v = nullptr;
  int64_t src_stride = 0;
  const int32_t* src_pos = nullptr;
  void* dst_k = nullptr;  // read: destination rows
  void* dst_v = nullptr;
  int32_t* dst_pos = nullptr;
  // jobs (compact / merge)
  const int32_t* job_table = nullptr;
  const int32_t* keep = nullptr;
  const int32_t* keep_offsets = nullptr;
  const int32_t* lengths = nullptr;
  int n_jobs = 0;
  // rope + write (RopeWriteArgs; src_k = qkv, src_stride = its row stride, src_pos = pos)
  int n_heads = 0, n_kv_heads = 0, head_dim = 0;
  const float* inv_freq = nullptr;
  void* q_out = nullptr;
  int64_t q_out_stride = 0;
  const int32_t* dest = nullptr;          // compaction by moves (PagedJobs::dest)
  const int32_t* slots = nullptr;         // merge: slot maps (PagedJobs::slots)
  const int32_t* slot_offsets = nullptr;
  // Head tables: rope + write (RopeWriteArgs::heads) and head compaction (PagedHeadJobs; n_kv_heads
  // and head_dim above).
  const int32_t* head_flags = nullptr;
  const int32_t* head_tables = nullptr;
  const int32_t* head_lengths = nullptr;
  const int32_t* job_src = nullptr;
  const int32_t* job_src_head = nullptr;
  const int32_t* job_dst = nullptr;
};

struct PagedPlan {
  PagedParams params;
  DType dtype = DType::BF16;      // the pool's
  DType src_dtype = DType::BF16;  // write only
  Launch launch;
};
PagedPlan plan_paged_write(const PagedKV& kv, const PagedRows& rows, DType src_dtype, const void* k, const void* v,
                           int64_t src_stride, const int32_t* pos);
PagedPlan plan_paged_read(const PagedKV& kv, const PagedRows& rows, void* k, void* v, int32_t* pos);
PagedPlan plan_paged_rope_write(const PagedKV& kv, const PagedRows& rows, const RopeWriteArgs& a);
PagedPlan plan_paged_compact(const PagedKV& kv, const PagedJobs& jobs);
PagedPlan plan_paged_head_compact(const PagedKV& kv, const PagedHeadJobs& jobs);
PagedPlan plan_paged_merge(const PagedKV& kv, const PagedJobs& jobs);

// ---------------------------------------------------------------------------------------------
// Skinny products (gemv): 256 threads = 8 warps = 2 output groups of kGemvOutsPerWarp outputs x
// kGemvKSplit column slices (gemv_body.h); shared memory for the slices' partial sums.
constexpr int kGemvThreads = 256;
constexpr int kGemvOutsPerWarp = 2;
constexpr int kGemvKSplit = 4;

struct GemvParams {
  const void* x = nullptr;
  int64_t x_stride = 0;
  const void* w = nullptr;
  const void* w_up = nullptr;
  int rows = 0, in = 0, out = 0;
  void* y = nullptr;
  int64_t y_stride = 0;
  int accumulate = 0;
};

struct GemvPlan {
  GemvParams params;
  DType w_dtype = DType::BF16, y_dtype = DType::F32;  // w_dtype: x's type (and w's when dense)
  uint32_t w_quant = 0;                               // nonzero: w's ggml block type
  bool swiglu = false;
  Launch launch;
};
// Empty reason = it fits; else why not (the caller falls back or reports it).
std::string gemv_misfit(const GemvArgs& a);
GemvPlan plan_gemv(const GemvArgs& a);

// Skinny products on tensor cores (skinny_mma.cu; kernels.h: skinny). A block: 256 threads = 8 warps
// of 16 outputs each (128 outputs) over one slice of the columns, k_per_block wide (a multiple of 64,
// at most kSkinnyMaxK); splits = gridDim.y slices. x's slice sits in shared memory, its rows padded
// with zeros to 8 x n_tiles (row stride k_per_block + 8 elements: the fragments' loads hit distinct
// banks). The slices are chosen so that a product has about kSkinnyTargetBlocks blocks (two per SM
// of an H100 or H200); with more than one, each block writes float32 partial sums to
// partial[split][matrix][row][out] and the last of a column's blocks to finish (counters[bx]) adds
// them in split order and writes y. The plan depends on the shapes only: the same sums on every card.
constexpr int kSkinnyThreads = 256, kSkinnyOuts = 128, kSkinnyChunk = 64, kSkinnyMaxK = 1024;
constexpr int kSkinnyTargetBlocks = 264;
struct SkinnyParams {
  const void* x = nullptr;
  int64_t x_stride = 0;
  const void* w = nullptr;
  const void* w_up = nullptr;
  int rows = 0, in = 0, out = 0;
  void* y = nullptr;
  int64_t y_stride = 0;
  int accumulate = 0;
  int k_per_block = 0, splits = 1;
  float* partial = nullptr;      // splits > 1
  unsigned* counters = nullptr;  // splits > 1: gridDim.x of them, zero before and after
};
struct SkinnyPlan {
  SkinnyParams params;
  DType w_dtype = DType::BF16, y_dtype = DType::F32;
  bool swiglu = false;
  int n_tiles = 1;               // 8-row tiles of x: rows <= 8 n_tiles
  size_t partial_bytes = 0;      // 0 when splits == 1
  Launch launch;
};
// blocks_x of a product (its outputs / 128), and how its columns split: k_per_block, splits.
int skinny_split(int in, int out, int& k_per_block, int& splits);
size_t skinny_partial_bytes(int rows, int in, int out, bool swiglu);
std::string skinny_misfit(const GemvArgs& a);
SkinnyPlan plan_skinny(const GemvArgs& a);  // params.partial / counters left for the caller

// ---------------------------------------------------------------------------------------------
// Dequantised rows (dequantize_rows): one thread per 8 elements of an output row.
constexpr int kDequantThreads = 256;

struct DequantParams {
  const void* w = nullptr;
  int64_t rows = 0;
  int cols = 0;
  const int32_t* ids = nullptr;
  int n = 0;
  void* out = nullptr;
  int64_t out_stride = 0;
};

struct DequantPlan {
  DequantParams params;
  uint32_t quant = 0;
  DType out_dtype = DType::F32;
  Launch launch;
};
DequantPlan plan_dequantize(const DequantArgs& a);

}  // namespace pkv::cuda::detail
