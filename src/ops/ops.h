// CPU operators. Activations are float32, row-major; weights are read in their stored dtype.
// Shapes in comments: [rows, cols].
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/tensor.h"

namespace pkv::ops {

// OpenBLAS picks its kernels from the CPU model at load time and falls back to its slowest generic
// ones (e.g. "Prescott") on CPUs it does not recognise, such as some virtual machines: 5x slower
// matrix products. Returns the OPENBLAS_CORETYPE that matches this CPU's instruction set when the
// detected core is such a fallback, else nullptr. The program must then restart with it set.
const char* blas_coretype_override();
const char* blas_corename();

// y[rows, L.out] = x[rows, L.in] * W^T + b. 16-bit weights are converted block by block into
// per-thread scratch (never a full float32 copy of the model).
void linear(const float* x, int rows, const Linear& L, float* y);
// linear()'s path for many rows (and float32 or block-quantised weights): blocks of W converted to
// float32 per thread and multiplied through BLAS. Named for the benchmarks that compare the paths.
void linear_blas(const float* x, int rows, const Linear& L, float* y);
// Row `row` ([n] values) of a stored weight as float32, whatever its storage (F32, F16, BF16 or ggml
// blocks), and the bytes one row takes.
void weight_row(const TensorView& W, int64_t row, int64_t n, float* out);
size_t weight_row_bytes(const TensorView& W, int64_t n);

// Batched decoding: y[rows, L.out] with every row computed exactly as linear(x_r, 1, L, y_r) would
// (bit for bit), but with 16-bit weights read once for all rows: a row of W is dotted with every x
// row while it is in cache. Float32 weights fall back to one linear() call per row.
void linear_rows(const float* x, int rows, const Linear& L, float* y);

// A short prompt's product with 16-bit weights (F16 or BF16, W [out, in] row-major): y[rows, out] =
// x W^T, register-tiled over outputs and rows (src/ops/cpu_gemm16.cc). Each y[r][o] is the float32
// fused multiply-add chain over k = 0 .. in-1 in order: gemm16_reference's value bit for bit, whatever
// the rows beside it, the ISA or the threads. linear() takes it for 17-64 rows (src/ops/cpu_ops.cc).
void gemm16(const float* x, int rows, DType wt, const uint16_t* W, int in, int out, float* y);
void gemm16_reference(const float* x, int rows, DType wt, const uint16_t* W, int in, int out, float* y);

// Reference implementation of linear: plain loops in double. For tests.
void linear_reference(const float* x, int rows, const Linear& L, float* y);

// x[rows, dim] -> y (may alias x).
void rms_norm(const float* x, int rows, int dim, const Norm& n, float eps, float* y);
void layer_norm(const float* x, int rows, int dim, const Norm& n, float eps, float* y);

enum class Act { Gelu, GeluTanh, QuickGelu, Silu, Relu };
Act act_from_name(const char* name);  // asserts on unknown (config validated earlier)
void activate(float* x, size_t n, Act a);
// gate[i] = silu(gate[i]) * up[i]
void swiglu(float* gate, const float* up, size_t n);

// Rotary position embedding (rotate-half form used by LLaMA in transformers) applied in place to
// x[rows, n_heads * head_dim] with the given absolute positions.
struct Rope {
  std::vector<float> inv_freq;  // [head_dim / 2]
  int head_dim = 0;
  // rope_type: default | linear | llama3 (with its factors).
  static Rope make(int head_dim, float theta, const std::string& rope_type, float factor, float low_freq_factor,
                   float high_freq_factor, int original_max_positions);
  void apply(float* x, int rows, int n_heads, const int32_t* pos) const;
};

// Softmax attention of queries over a set of keys/values. Fewer than 16 queries (decode) stream the
// entries in fixed blocks, each row read once for all query heads of its KV head, the blocks' partial
// softmaxes combined in order: the result does not depend on the number of threads. More queries take
// BLAS per head and block of queries.
//   q      [n_q, n_heads * head_dim]
//   k, v   [n_kv, kv_stride] rows; head g uses columns [g * head_dim, (g+1) * head_dim)
//   q_pos, kv_pos: absolute positions; when both are given, query i sees key j iff kv_pos[j] <= q_pos[i]
//   out    [n_q, n_heads * head_dim]
//   importance (optional) [n_kv]: += for each key j, sum over queries of the mean over heads of the
//     attention probability (METHOD.md section 1), accumulated in float32. With
//     importance_per_kv_head: [n_kv_heads, n_kv], KV head g's row += the sum over queries of the mean
//     over g's query heads (its group) only (policy.h, ImportanceRequest::per_kv_head).
struct AttentionArgs {
  const float* q = nullptr;
  int n_q = 0;
  int q_stride = 0;    // between query rows (0: n_heads * head_dim)
  int out_stride = 0;  // between output rows (0: n_heads * head_dim)
  const int32_t* q_pos = nullptr;
  const float* k = nullptr;
  const float* v = nullptr;
  int n_kv = 0;
  int kv_stride = 0;
  const int32_t* kv_pos = nullptr;
  int n_heads = 0, n_kv_heads = 0, head_dim = 0;
  float scale = 1.f;
  float* out = nullptr;
  float* importance = nullptr;
  int importance_from = 0;  // only queries i >= importance_from contribute (window estimators)
  bool importance_per_kv_head = false;
  // A 16-bit KV cache (kv/kv_cache.h, --kv-dtype): with kv_dtype F16 or BF16 the rows are k16 and v16
  // (the same layout and kv_stride, in elements) and k, v are not read. Each row is converted to
  // float32 as it is read (F16C / AVX-512 where the compiler target has them) and then takes the
  // float32 arithmetic, so the result is bit for bit that of k, v holding the same values in float32.
  DType kv_dtype = DType::F32;
  const uint16_t* k16 = nullptr;
  const uint16_t* v16 = nullptr;
  // Extended importance (engine/query_importance.h; the twin of cuda::PrefillAttentionArgs' fields
  // of the same names): importance_weight [n_heads, n_kv] float32 multiplies each head's probability
  // on entry j by importance_weight[h * n_kv + j] before the mean over heads; importance_max combines
  // the counted queries by their maximum (importance[j] = max(importance[j], max over the queries))
  // instead of adding their sum. Either one measures the importance by attention_rows (double
  // precision); only with a float32 k and without importance_per_kv_head.
  const float* importance_weight = nullptr;
  bool importance_max = false;
};
void attention(const AttentionArgs& a);

// The extended importance's per-query scores: for each query row i in [from, n_q) and entry
// j < n_out (<= n_kv), rows[(i - from) * n_out + j] = the mean over query heads h of
// p_h(i, j) * weight[h * n_out + j] (weight null: 1), where p_h(i, .) is the softmax of a.scale
// times query i's dot products with the keys it sees (a's causal rule), in double precision and
// each head's term rounded to float32 as it is added. Reads q, k (float32), the positions, the
// shapes and the scale of `a`, nothing else.
void attention_rows(const AttentionArgs& a, const float* weight, int n_out, int from, float* rows);

// The value weights of one layer (engine/query_importance.h; twin of cuda::value_weights): for
// each query head h and entry j < n of v [n, kv_stride] (KV head g = h / (n_heads / n_kv_heads) at
// columns [g head_dim, (g+1) head_dim)), out[h * n + j] = ||v_{g,j}||_1 when gram is null, else
// ||W_o^h v_{g,j}||_2 = sqrt(v^T G_h v) with gram [n_heads, head_dim, head_dim] the symmetric G_h
// (Model::output_gram). Double-precision sums; the products G_h v through BLAS.
void value_weights(const float* v, int n, int kv_stride, int n_heads, int n_kv_heads, int head_dim,
                   const float* gram, float* out);

// The output projection's Gram matrices of one layer (Model::output_gram; twin of
// cuda::output_gram): out[h] ([n_heads, head_dim, head_dim], row-major) = G_h = (W_o^h)^T W_o^h, with
// W_o^h = W[:, h head_dim : (h+1) head_dim] of W [hidden, n_heads * head_dim] in any storage
// (weight_row), as float32 products through BLAS of the weights as float32.
void output_gram(const TensorView& W, int n_heads, int head_dim, float* out);

}  // namespace pkv::ops
