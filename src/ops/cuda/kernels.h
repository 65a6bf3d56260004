// CUDA operators: the GPU twins of src/ops (CPU) and of the KV-cache operations of src/kv.
//
// A plain C++ API with no CUDA types (DESIGN.md principle 1), so that any code can include it:
//  - every data pointer is a DEVICE pointer unless its comment says otherwise;
//  - `stream` is a cudaStream_t passed as void* (nullptr = the default stream); every call only
//    enqueues work on it and returns (no synchronisation, no host<->device copies), except where noted;
//  - element types are pkv::DType: F32 (float), F16 (IEEE half), BF16 (bfloat16). Arithmetic is in
//    float32 throughout; 16-bit results are rounded to nearest even once, at the store;
//  - tensors are row-major; shapes are written [rows, cols]; strides are in elements;
//  - bad arguments (unsupported dtype, head_dim, sizes, missing workspace) throw pkv::Error naming the
//    operator and the argument; CUDA/cuBLAS failures throw pkv::Error with file:line (cuda_check.h).
//    Set PKV_CUDA_SYNC=1 to synchronise after every launch, so an asynchronous fault is reported by
//    the operator that caused it.
//
// Each operator's CPU twin is named in its comment; tests/cuda/test_cuda_kernels.cc checks every
// one against it.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

#include "ops/cuda/device.h"

#include "core/dtype.h"
#include "ops/ops.h"  // ops::Act

namespace pkv::cuda {

// ------------------------------------------------------------------------------------------------
// Element-wise and per-row operators. `t` is the element type of the activations (F32, F16, BF16);
// norm weights and biases are float32 (as ops::Norm holds them).

// y[rows, dim] = x * rsqrt(mean(x^2) + eps) * weight. y may alias x. Twin: ops::rms_norm.
void rms_norm(DType t, const void* x, void* y, const float* weight, int rows, int dim, float eps, void* stream);
// The same with y in another type (x_t -> y_t, rounded once): a norm that feeds a 16-bit product
// writes its input directly (no separate conversion). In place only when the types are equal.
void rms_norm_to(DType x_t, const void* x, DType y_t, void* y, const float* weight, int rows, int dim, float eps,
                 void* stream);
// y[rows, dim] = (x - mean) * rsqrt(var + eps) * weight + bias. y may alias x. Twin: ops::layer_norm.
void layer_norm(DType t, const void* x, void* y, const float* weight, const float* bias, int rows, int dim, float eps,
                void* stream);
// out[n] = a + b (the residual add). out may alias a or b.
void add(DType t, const void* a, const void* b, void* out, size_t n, void* stream);
// y[rows, cols] += bias[cols] (float32 bias).
void add_bias(DType t, void* y, const float* bias, int rows, int cols, void* stream);
// x[n] = act(x[n]) in place. Twin: ops::activate.
void activate(DType t, void* x, size_t n, ops::Act act, void* stream);
// gate[n] = silu(gate) * up. Twin: ops::swiglu.
void swiglu(DType t, void* gate, const void* up, size_t n, void* stream);

// Rotary position embedding, rotate-half form, in place. Twin: ops::Rope::apply.
//   x: rows of n_heads * head_dim elements; row r starts at x + r * row_stride (row_stride = 0 means
//      n_heads * head_dim; a larger stride rotates the q or k part of a fused qkv row);
//   pos [rows] int32 absolute positions; inv_freq [head_dim / 2] float32, as ops::Rope::inv_freq
//   (so default, linear and llama3 scaling all work). The angle is float(pos) * inv_freq in float32.
void rope(DType t, void* x, int rows, int n_heads, int head_dim, int64_t row_stride, const int32_t* pos,
          const float* inv_freq, void* stream);

// out[n, dim] (out_t) = table[ids[i], :] (table_t, [vocab, dim]). An id outside [0, vocab) gives a
// row of zeros (ids are validated on the host by the tokenizer; the kernel never reads out of bounds).
void embedding(DType table_t, const void* table, int vocab, int dim, const int32_t* ids, int n, DType out_t, void* out,
               void* stream);
// dst[n] (dst_t) = src[n] (src_t). Twin: pkv::to_f32 / f32_to_f16 / f32_to_bf16.
void convert(DType src_t, const void* src, DType dst_t, void* dst, size_t n, void* stream);
// y[rows, n] = max over the window [i - kernel/2, i + kernel/2] clipped to the row (odd kernel).
// Twin: pkv::max_pool_1d (src/kv/budgeted.h). y must not alias x.
void max_pool_1d(const float* x, float* y, int rows, int n, int kernel, void* stream);

// ------------------------------------------------------------------------------------------------
// Matrix products through cuBLAS.

// A cuBLAS handle bound to one stream (the stream that linear() and its bias kernel run on).
class Blas {
 public:
  explicit Blas(void* stream = nullptr);
  ~Blas();
  Blas(const Blas&) = delete;
  Blas& operator=(const Blas&) = delete;
  void set_stream(void* stream);
  void* stream() const { return stream_; }
  void* handle() const { return handle_; }  // a cublasHandle_t
  // A float32 scratch of at least `floats` values (grown on demand: size it before capturing a
  // CUDA graph). linear() uses it for a 16-bit y with a bias.
  float* f32_workspace(size_t floats);
  // The dequantised copy of one block-quantised matrix (linear() with w_quant and many rows), at
  // least `bytes` (grown on demand, like f32_workspace: size it for the largest matrix first).
  void* weight_workspace(size_t bytes);
  // The skinny products' partial sums (at least `bytes`) and their completion counters (zero
  // between launches): grown on demand, like f32_workspace; an error when it would have to grow
  // while the stream is being captured.
  struct SkinnyWorkspace {
    float* partial;
    unsigned* counters;
    int n_counters;
  };
  SkinnyWorkspace skinny_workspace(size_t bytes);

 private:
  void* handle_ = nullptr;
  void* stream_ = nullptr;
  DeviceBuffer ws_;
  DeviceBuffer wq_;  // weight_workspace
  DeviceBuffer cublas_ws_;  // cuBLAS's own workspace, set once, so that captured GEMMs allocate nothing
  DeviceBuffer skinny_ws_, skinny_counters_;
};

// y[rows, out] = x[rows, in] * W^T + bias (or += with accumulate): ops::linear's twin.
//   W [out, in] row-major (the checkpoint layout) in w_dtype;
//   x in the same dtype as W (convert f32 activations first); y in y_dtype:
//     W, x F16  -> y F16 or F32;   W, x BF16 -> y BF16 or F32;   W, x F32 -> y F32 (no TF32).
//   The product accumulates in float32 (CUBLAS_COMPUTE_32F). accumulate = true adds into y
//   (beta = 1: fuses the residual add when y is the float32 residual stream). bias: float32 [out]
//   or nullptr; with a 16-bit y the product goes to a float32 scratch first so that product +
//   bias is rounded once (cuBLAS rounds the product to the output type before adding beta * y,
//   measured on the H100), and accumulate with a bias needs a float32 y. Row strides: x_stride >= in, y_stride >= out (0 = dense).
//   w_quant (nonzero: a ggml block type of ops/quant.h, Q8_0, Q4_0, Q4_K or Q6_K): W's rows are
//   ggml blocks as a GGUF file stores them (in a multiple of the block) and w_dtype is x's type (F16
//   or BF16); y F32 or w_dtype. Up to kGemvMaxRows rows without a bias: gemv() reads the blocks;
//   otherwise W is dequantised into blas.weight_workspace (one matrix, w_dtype) and multiplied there.
struct LinearArgs {
  const void* x = nullptr;
  int64_t x_stride = 0;
  const void* w = nullptr;
  uint32_t w_quant = 0;
  DType w_dtype = DType::BF16;
  int rows = 0, in = 0, out = 0;
  const float* bias = nullptr;
  void* y = nullptr;
  int64_t y_stride = 0;
  DType y_dtype = DType::F32;
  bool accumulate = false;
};
void linear(Blas& blas, const LinearArgs& a);

// Skinny products for decoding (a few rows): each weight row is read once for all rows, with 16-byte
// loads and float32 accumulation; two outputs per 4 warps, each warp a quarter of the columns
// (gemv_body.h). Twin: ops::linear (and ops::swiglu).
//   w [out, in] 16-bit (w_dtype F16 or BF16); x [rows, x_stride] in w_dtype; 1 <= rows <= kGemvMaxRows;
//   in, x_stride multiples of 8; w, x 16-byte aligned (gemv_fits() says whether all of this holds);
//   y [rows, y_stride] F32 (accumulate: y +=) or w_dtype;
//   w_up (optional, [out, in] like w): y = silu(x w^T) * (x w_up^T), the SwiGLU MLP's first half.
// linear() takes this path by itself for rows <= kGemvAutoRows without a bias (PKV_GEMV=0: never);
// from 5 rows on, cuBLAS's tensor-core kernels win (the CUDA cores' FMAs bound this one: 13B at
// batch 8 decoded 384 tok/s with gemv, 644 with cuBLAS, on the H200).
// Block-quantised w (w_quant, as in LinearArgs; w_up of the same type): the kernel reads each block
// once and dequantises it in registers (ops/quant_blocks.h's decoders, the CPU's); in a multiple of
// the block (32 or 256), w 16-byte aligned, x in w_dtype; y F32 without w_up, w_dtype with it.
// linear() takes it for rows <= kGemvMaxRows (a dequantised copy plus cuBLAS would read and write
// more bytes than the blocks hold up to there).
constexpr int kGemvMaxRows = 8;
constexpr int kGemvAutoRows = 4;
struct GemvArgs {
  const void* x = nullptr;
  int64_t x_stride = 0;  // 0: in
  const void* w = nullptr;
  const void* w_up = nullptr;
  uint32_t w_quant = 0;
  DType w_dtype = DType::BF16;
  int rows = 0, in = 0, out = 0;
  void* y = nullptr;
  int64_t y_stride = 0;  // 0: out
  DType y_dtype = DType::F32;
  bool accumulate = false;
};
bool gemv_fits(const GemvArgs& a);
// The most rows for which linear() takes gemv() with this weight storage (0: dense).
inline int gemv_auto_rows(uint32_t w_quant) { return w_quant ? kGemvMaxRows : kGemvAutoRows; }
// False when the environment sets PKV_GEMV=0 (to compare with cuBLAS).
bool gemv_enabled();
void gemv(const GemvArgs& a, void* stream);

// Skinny products on tensor cores (the decode step of a batch): GemvArgs' contract (y = x W^T, or
// the SwiGLU pair with w_up, y F32 with accumulate or w_dtype) for up to kSkinnyMaxRows rows of dense
// 16-bit weights, on sm_80 and later; in a multiple of 64, x_stride a multiple of 8, w, w_up and x
// 16-byte aligned (skinny_fits() says whether all of this holds). Each weight row is read from memory
// once for all rows (mma.sync m16n8k16, float32 accumulators); long inputs are split over several
// blocks whose float32 partial sums the last block to finish adds in a fixed order (deterministic).
// linear() and the GPU model's SwiGLU take it for kGemvAutoRows < rows <= kSkinnyMaxRows without a
// bias only where PKV_SKINNY=1 (measured on an H100 it matched cuBLAS at 8 rows and lost from 16
// rows on: docs/PERF.md; cuBLAS stays the default). Its partial sums live in blas.skinny_workspace: size it
// with skinny_workspace_bytes(rows, in, out, swiglu) for the largest product before capturing a CUDA
// graph (0 where the product's columns need no split, or it does not fit).
constexpr int kSkinnyMaxRows = 64;
bool skinny_fits(const GemvArgs& a);
bool skinny_enabled();  // true only with PKV_SKINNY=1 on sm_80 and later
size_t skinny_workspace_bytes(int rows, int in, int out, bool swiglu);
void skinny(const GemvArgs& a, Blas& blas);

// Rows of a block-quantised matrix dequantised (twin: quant::dequantize_row, bit for bit): out row i
// [cols] (out_dtype F32, F16 or BF16, rounded once; row stride out_stride, 0 = cols) = row ids[i] of
// w [rows, cols] (ggml blocks of type quant), or row i when ids is null (then n <= rows). An id outside
// [0, rows) gives a row of zeros, as embedding() does. The embedding of a quantised table, and the
// scratch copy of linear(); cols a multiple of the block, w 16-byte aligned.
struct DequantArgs {
  uint32_t quant = 0;
  const void* w = nullptr;
  int64_t rows = 0;
  int cols = 0;
  const int32_t* ids = nullptr;
  int n = 0;
  DType out_dtype = DType::F32;
  void* out = nullptr;
  int64_t out_stride = 0;
};
void dequantize_rows(const DequantArgs& a, void* stream);
// Why rows of `cols` elements stored as ggml type `type` cannot be read by these kernels ("" when
// they can: Q8_0, Q4_0, Q4_K, Q6_K in whole blocks).
std::string quant_misfit(uint32_t type, int cols);

// ------------------------------------------------------------------------------------------------
// Prefill attention: flash-style (tiles of 64 queries x 64 keys, online softmax in float32; the
// [n_q, n_kv] matrix is never formed), GQA, head_dim 1..128 (any, e.g. 32, 64, 80, 96, 128).
// Twin: ops::attention (same argument meanings).
//   q [n_q, *] rows with stride q_stride (0: n_heads * head_dim); head h at columns [h*hd, (h+1)*hd);
//   k, v [n_kv, *] rows with stride kv_stride (0: n_kv_heads * head_dim); kv head g = h / (n_heads /
//     n_kv_heads);
//   q_pos [n_q], kv_pos [n_kv]: when both are given, query i sees key j iff kv_pos[j] <= q_pos[i]
//     (kv_pos strictly increasing); when both are null, every query sees every key (vision tower);
//   out [n_q, *] with stride out_stride (0: n_heads * head_dim); a query that sees no key gets 0;
//   importance (optional, float32 [n_kv]): += for each key j, the sum over queries i >=
//     importance_from of the mean over heads of the softmax probability (METHOD.md section 1).
//     Computed by a second pass that recomputes the scores tile by tile from the per-row
//     log-sum-exp saved by the first; per-head partial sums are reduced in a fixed order, so the
//     result is deterministic. Needs `workspace` of attention_prefill_workspace_bytes() bytes.
//   kernel: TensorCores takes the tensor-core kernels (attention_mma.cuh: mma.sync on 16-bit Q, K,
//     V; float32 scores, softmax and accumulation; the probabilities rounded to 16 bits before they
//     multiply V, as flash attention does), compute capability 8.0 and later; CudaCores the float32
//     CUDA-core kernels (attention_body.h; probabilities kept in float32). Auto: TensorCores on
//     compute capability 8.0 and later unless the environment sets PKV_PREFILL_MMA=0.
enum class PrefillKernel { Auto, TensorCores, CudaCores };
struct PrefillAttentionArgs {
  PrefillKernel kernel = PrefillKernel::Auto;
  DType dtype = DType::BF16;  // of q, k, v and out: F16 or BF16
  const void* q = nullptr;
  int n_q = 0;
  int64_t q_stride = 0;
  const int32_t* q_pos = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  int n_kv = 0;
  int64_t kv_stride = 0;
  const int32_t* kv_pos = nullptr;
  int n_heads = 0, n_kv_heads = 0, head_dim = 0;
  float scale = 1.f;
  void* out = nullptr;
  int64_t out_stride = 0;
  float* importance = nullptr;
  int importance_from = 0;
  // importance [n_kv_heads, n_kv] instead: KV head g's row += the sum over queries of the mean over
  // g's query heads only (twin: ops::AttentionArgs::importance_per_kv_head).
  bool importance_per_kv_head = false;
  // The extended importance (engine/query_importance.h; twin: ops::AttentionArgs' fields of the same
  // names, through ops::attention_rows), not with importance_per_kv_head:
  //   importance_weight (device float32 [n_heads, n_kv], or null): head h's probability on key j is
  //     multiplied by importance_weight[h * n_kv + j] before the mean over heads (value_weights()
  //     makes them). With the sum this costs one multiply per (head, key) in the reduce kernel.
  //   importance_max: importance[j] = max(importance[j], the largest over the counted queries of
  //     the (weighted) head mean) instead of += the sum. Its own pass (attention_body.h,
  //     prefill_importance_max: each block's queries over all heads; a second kernel takes the
  //     largest of the blocks' maxima, in a fixed order) on the CUDA cores whichever kernel ran the
  //     forward pass. A mean over the queries is the sum divided by their count (the caller's, who
  //     alone knows it over the pieces of a chunked prompt).
  const float* importance_weight = nullptr;
  bool importance_max = false;
  void* workspace = nullptr;  // device, >= attention_prefill_workspace_bytes (only with importance)
  size_t workspace_bytes = 0;
};
size_t attention_prefill_workspace_bytes(int n_q, int n_kv, int n_heads);
void attention_prefill(const PrefillAttentionArgs& a, void* stream);

// Value weights of the extended importance (twin: ops::value_weights, which the CPU engine's
// engine/query_importance.cc uses): for each query head h and key j < n_kv of v [n_kv, *] (row
// stride kv_stride, 0: n_kv_heads * head_dim; KV head g = h / (n_heads / n_kv_heads)), in dtype
// (F16, BF16), out[h * n_kv + j] (float32 [n_heads, n_kv]) = ||v_{g,j}||_1 when gram is null, else
// sqrt(max(0, v^T G_h v)) with gram (device float32 [n_heads, head_dim, head_dim], G_h row-major:
// output_gram() of the layer): ||W_o^h v||_2. head_dim <= 128. Runs on blas's stream.
//   vnorm: one thread per (key, query head).
//   wov2: each G_h scaled by a power of two and cut into P 16-bit parts of the values' type (F16: 2,
//     BF16: 3; plan.h), then per chunk of keys y = G_h v for every query head as one strided batched
//     product of 16-bit inputs through cuBLAS (the tensor cores: exact products summed in float32,
//     P x n_kv x n_heads x head_dim^2 multiply-adds per call), then each (key, head)'s dot of y with
//     v, summed in float32, the scale undone. Needs `workspace` of value_weights_workspace_bytes()
//     bytes (at most kValueWeightChunk keys' worth). Error (u = 2^-24, n = head_dim, M = |v|'|G||v|,
//     S = sum |v|): |computed v'Gv - v'Gv| <= ((1 + 2^-9) gamma'_{P n} + gamma_n + eps)(1 + gamma_n) M
//     + tau S^2, with gamma'_{P n} from 2^-23 per addition (tensor cores may truncate), eps = 2^-22
//     (F16) or 2^-24 (BF16) from the parts, tau = 2^-25 / s_h (F16's low part where subnormal); then
//     the square root's and the store's rounding; ops::value_weights is within gamma_n M of it.
struct ValueWeightArgs {
  DType dtype = DType::BF16;
  const void* v = nullptr;
  int n_kv = 0;
  int64_t kv_stride = 0;
  int n_heads = 0, n_kv_heads = 0, head_dim = 0;
  const float* gram = nullptr;
  float* out = nullptr;
  void* workspace = nullptr;  // device, >= value_weights_workspace_bytes (wov2 only)
  size_t workspace_bytes = 0;
};
size_t value_weights_workspace_bytes(int n_kv, int n_heads, int n_kv_heads, int head_dim, bool gram);
void value_weights(Blas& blas, const ValueWeightArgs& a);

// The output projection's Gram matrices of one layer (twin: ops::output_gram, which
// Model::output_gram calls for the CPU engine): out[h] (float32 [n_heads, head_dim, head_dim]) =
// G_h = (W_o^h)^T W_o^h, with W_o^h = w[:, h hd : (h+1) hd] ([hidden, head_dim]) of w [hidden,
// n_heads * head_dim] (the checkpoint's o_proj layout) in w_dtype F16 or BF16 (a quantised W_o:
// dequantize_rows() first). One strided batched product through cuBLAS over the heads (float32
// accumulation of the exact 16-bit products: hidden x n_heads x head_dim^2 multiply-adds), on
// blas's stream. Error: |computed G_de - G_de| <= gamma'_hidden sum_i |w_id| |w_ie| with gamma'
// from 2^-23 per addition (tensor cores may truncate instead of round when they add).
struct OutputGramArgs {
  DType w_dtype = DType::BF16;
  const void* w = nullptr;
  int hidden = 0, n_heads = 0, head_dim = 0;
  float* out = nullptr;
};
void output_gram(Blas& blas, const OutputGramArgs& a);

// ------------------------------------------------------------------------------------------------
// The paged KV cache on the device (host bookkeeping: kv/block_pool.h).
//
// One pool of n_blocks blocks. Block b holds block_size entries of one layer of one sequence:
//   K of slot s:  pool + (b * 2 * block_size + s) * kv_dim              (kv_dim = n_kv_heads * head_dim)
//   V of slot s:  pool + (b * 2 * block_size + block_size + s) * kv_dim
//   position:     positions[b * block_size + s]   (int32, the entry's absolute position)
// in `dtype` (F16 or BF16). Keys are stored after RoPE, as the CPU cache (kv/kv_cache.h) stores them.
// A block table is a row of int32 block ids: entry e of that table lives in block table[e / block_size],
// slot e % block_size. Tables are rows of a [n_tables, table_stride] int32 array.
// error_flag (optional device int, zero it first): kernels OR in kPagedBadBlock when a table holds
// a block id outside [0, n_blocks) and kPagedBadEntry when an entry index lies outside
// [0, table_stride * block_size) or a table index is negative; the offending access is skipped
// (never an out-of-bounds access). Decode attention also ignores keys beyond max_len.
struct PagedKV {
  DType dtype = DType::BF16;
  void* pool = nullptr;           // 16-byte aligned (cudaMalloc is)
  int32_t* positions = nullptr;   // [n_blocks * block_size]
  int n_blocks = 0;
  int block_size = 0;
  int kv_dim = 0;
  const int32_t* tables = nullptr;  // [n_tables, table_stride]
  int table_stride = 0;
  int* error_flag = nullptr;
};
constexpr int kPagedBadBlock = 1;
constexpr int kPagedBadEntry = 2;
// Device bytes of the pool and of the positions for n_blocks blocks.
size_t paged_pool_bytes(const PagedKV& kv);
size_t paged_positions_bytes(const PagedKV& kv);

// Head tables (per-KV-head budgets; host bookkeeping BlockPool::split_heads): a (sequence, layer)
// whose KV heads hold their own entries has one table per KV head (rows of the same [n, table_stride]
// kind of array) of SUB-BLOCKS: a block split into n_kv_heads parts of block_size entries of one
// head. Sub-block sb is part j = sb % n_kv_heads of block b = sb / n_kv_heads; its entry i has
//   K at pool + b * 2 * block_size * kv_dim + (j * block_size + i) * head_dim,  V block_size * kv_dim further,
// and no device position (the host keeps a head entry's position). Entry e of a head table lives in
// sub-block table[e / block_size], entry e % block_size of it.
// Decode attention and the decode step's RoPE write read them per row (sequence) b:
struct PagedHeads {
  const int32_t* per_head = nullptr;  // [batch] nonzero: b's layer has head tables (null: none has)
  const int32_t* tables = nullptr;    // [batch * n_kv_heads, table_stride]: head g of b is row b * n_kv_heads + g
  const int32_t* lengths = nullptr;   // [batch * n_kv_heads] entries of each head table
};

// Rows addressed in a paged cache: row r is entry row_entry[r] of table row_table[r].
struct PagedRows {
  const int32_t* row_table = nullptr;  // [n_rows]
  const int32_t* row_entry = nullptr;  // [n_rows]
  int n_rows = 0;
};
// Stores rows: K, V [n_rows, *] (row stride src_stride elements, 0 = kv_dim) in src_dtype (F32, F16,
// BF16; converted to the pool's dtype) and their positions [n_rows]. The append of the prefill
// (one table, entries 0..N-1) and of a decode step (one row per sequence) are both this call.
void paged_kv_write(const PagedKV& kv, const PagedRows& rows, DType src_dtype, const void* k, const void* v,
                    int64_t src_stride, const int32_t* pos, void* stream);
// A decode step's attention input in one pass (instead of rope, paged_kv_write and convert): the
// float32 rows qkv [n_rows, *] (row stride qkv_stride) hold the q heads, then the k heads, then v
// (the fused projection's layout, kv_dim = n_kv_heads * head_dim). RoPE (rotate-half, angle
// float(pos) * inv_freq as rope()) on the q and k heads; the rotated q, rounded to the pool's type,
// goes to q_out [n_rows, q_out_stride]; the rotated K, V and the positions are written into the pool
// at the rows' entries. Each value is rounded once, as rope() in float32 then the write would.
struct RopeWriteArgs {
  const float* qkv = nullptr;
  int64_t qkv_stride = 0;
  int n_heads = 0, n_kv_heads = 0, head_dim = 0;
  const int32_t* pos = nullptr;       // [n_rows]
  const float* inv_freq = nullptr;    // [head_dim / 2]
  void* q_out = nullptr;              // the pool's dtype
  int64_t q_out_stride = 0;
  // Optional head tables (decode rows: row r is sequence r): where heads.per_head[r], KV head g's K
  // and V go to the LAST entry (heads.lengths[r * n_kv_heads + g] - 1) of its head table, no
  // position is written, and row_table / row_entry of r are not read.
  PagedHeads heads;
};
void paged_kv_rope_write(const PagedKV& kv, const PagedRows& rows, const RopeWriteArgs& a, void* stream);
// The reverse: k, v [n_rows, kv_dim] in the pool's dtype, pos [n_rows] (any may be null).
void paged_kv_read(const PagedKV& kv, const PagedRows& rows, void* k, void* v, int32_t* pos, void* stream);

// Decode attention: one query token per sequence, over each sequence's own entries of this layer in
// the paged pool, batched over sequences of different lengths; flash-decoding (the keys of a long
// sequence are split over several thread blocks, whose partial softmax results are combined).
// Twin: ops::attention with n_q = 1 over the sequence's entries.
//   q [batch, *] row stride q_stride (0: n_heads * head_dim), in kv.dtype;
//   kv.tables row b = sequence b's block table for this layer; lengths [batch] entries per sequence;
//   max_len >= every lengths[b] (the host knows it: it sizes the work split and the workspace);
//   q_pos [batch] (optional): key j is seen iff its position <= q_pos[b];
//   head_dim a multiple of 8, <= 128 (16-byte loads); kv.kv_dim = n_kv_heads * head_dim;
//   out [batch, *] row stride out_stride (0: n_heads * head_dim), in kv.dtype;
//   importance (optional, H2O): float32 [batch, importance_stride], += for each key j < lengths[b]
//     the mean over heads of its probability for this query (entry indices of the layer);
//   heads (optional): sequence b with heads.per_head[b] reads KV head g's own head table (row b *
//     n_kv_heads + g, heads.lengths[b * n_kv_heads + g] entries, every one visible: q_pos is not
//     applied to it); the query heads of g's group share it. max_len >= those lengths too. With
//     importance, such a sequence's row is left undefined (one row cannot hold each head's own
//     entries: ask for none there; the other sequences' rows are as above).
struct DecodeAttentionArgs {
  const void* q = nullptr;
  int batch = 0;
  int64_t q_stride = 0;
  const int32_t* q_pos = nullptr;
  PagedKV kv;
  const int32_t* lengths = nullptr;
  int max_len = 0;
  int n_heads = 0, n_kv_heads = 0, head_dim = 0;
  float scale = 1.f;
  void* out = nullptr;
  int64_t out_stride = 0;
  float* importance = nullptr;
  int64_t importance_stride = 0;
  void* workspace = nullptr;  // device, >= attention_decode_workspace_bytes (always needed)
  size_t workspace_bytes = 0;
  PagedHeads heads;
};
size_t attention_decode_workspace_bytes(int batch, int n_heads, int n_kv_heads, int head_dim, int max_len,
                                        bool importance);
void attention_decode(const DecodeAttentionArgs& a, void* stream);

// Jobs on whole (sequence, layer) tables: job j works on table job_table[j] with the entry indices
// keep[keep_offsets[j] .. keep_offsets[j+1]).
struct PagedJobs {
  const int32_t* job_table = nullptr;     // [n_jobs]
  const int32_t* keep = nullptr;          // all jobs' lists, concatenated
  const int32_t* keep_offsets = nullptr;  // [n_jobs + 1]
  const int32_t* lengths = nullptr;       // [n_jobs] entries before the operation (merge only)
  int n_jobs = 0;
  // Compaction only (optional, parallel to keep): the jobs are independent moves, entry dest[i] <-
  // entry keep[i]; no entry is both a source and a destination, so their order does not matter.
  // The host plans them with plan_slot_moves (block_pool.h): an eviction moves the few entries from
  // the table's end into the freed slots rather than shifting every later entry.
  const int32_t* dest = nullptr;
  // Merge only (optional): job j's logical entry i sits at slot slots[slot_offsets[j] + i], or at
  // slot i when slot_offsets[j] < 0 (the table's slot map, BlockPool::slot_map).
  const int32_t* slots = nullptr;
  const int32_t* slot_offsets = nullptr;  // [n_jobs]
};
// Compaction. Without dest: entry m of each table becomes its entry keep[m] (K, V and position;
// keep strictly increasing), in order: the kept entries move to the front (twin: KVLayer::retain).
// With dest: the moves above. Afterwards the host shrinks the table (BlockPool::resize), returning
// the tail blocks; work queued later on the same stream may reuse them at once.
void paged_kv_compact(const PagedKV& kv, const PagedJobs& jobs, void* stream);
// Elastic Cache merge (run before the compaction): keep lists the kept LOGICAL entries (strictly
// increasing); every logical entry i < lengths[j] is assigned to its nearest kept entry by index
// (ties to the earlier one), and each kept entry's K and V become the mean over its group
// (positions unchanged), read and written through the slot maps. The groups: ops/kv_merge.h.
// Twin: KVLayer::apply of a plan with merge (src/kv/kv_cache.cc).
void paged_kv_merge(const PagedKV& kv, const PagedJobs& jobs, void* stream);

// Head-table compaction (per-head keep plans). Job j fills entries 0, 1, .. of head table dst[j]
// (rows of kv.tables, head layout) with the entries keep[keep_offsets[j] ..] in order of:
//   - src_head[j] < 0: head table src[j]; src[j] == dst[j] (in place) needs keep strictly
//     increasing (entry m <- entry keep[m], a forward copy as paged_kv_compact's);
//   - src_head[j] = g >= 0: KV head g's columns of the SLOTS keep[..] of the shared table src[j]
//     (the split of a shared layer into head tables; dst[j] holds other blocks than src[j]).
// No positions move (head tables have none on the device). Twin: KVLayer::apply of a head plan.
struct PagedHeadJobs {
  const int32_t* src = nullptr;           // [n_jobs] source table rows
  const int32_t* src_head = nullptr;      // [n_jobs]
  const int32_t* dst = nullptr;           // [n_jobs] destination head table rows
  const int32_t* keep = nullptr;          // all jobs' lists, concatenated
  const int32_t* keep_offsets = nullptr;  // [n_jobs + 1]
  int n_jobs = 0;
  int n_kv_heads = 1;                     // kv.kv_dim = n_kv_heads * head_dim, head_dim even
};
void paged_kv_head_compact(const PagedKV& kv, const PagedHeadJobs& jobs, void* stream);

}  // namespace pkv::cuda
