// Test cases of the attention and paged-KV kernels against their CPU twins, written once against a
// small Backend interface and run twice:
//  - pkv_cuda_tests (GPU, test_cuda_kernels.cc): the real kernels through src/ops/cuda/kernels.h;
//  - pkv_cuda_emu_tests (CPU, emu_test.cc): the same kernel bodies and launch plans run by a CPU
//    emulation of CUDA thread blocks, so that CI (no GPU) checks their logic too.
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "ops/cuda/kernels.h"

namespace pkv::cuda::test {

// "Device" memory and the operators under test.
class Backend {
 public:
  virtual ~Backend() = default;
  virtual const char* name() const = 0;
  virtual void* alloc(size_t bytes) = 0;  // owned by the backend until it is destroyed
  virtual void upload(void* dst, const void* src, size_t bytes) = 0;
  virtual void download(void* dst, const void* src, size_t bytes) = 0;
  virtual void fill(void* dst, int byte, size_t bytes) = 0;
  virtual void attention_prefill(const PrefillAttentionArgs& a) = 0;
  virtual void attention_decode(const DecodeAttentionArgs& a) = 0;
  virtual void paged_write(const PagedKV& kv, const PagedRows& rows, DType src_dtype, const void* k, const void* v,
                           int64_t src_stride, const int32_t* pos) = 0;
  virtual void paged_read(const PagedKV& kv, const PagedRows& rows, void* k, void* v, int32_t* pos) = 0;
  virtual void paged_rope_write(const PagedKV& kv, const PagedRows& rows, const RopeWriteArgs& a) = 0;
  virtual void paged_compact(const PagedKV& kv, const PagedJobs& jobs) = 0;
  virtual void paged_merge(const PagedKV& kv, const PagedJobs& jobs) = 0;
  virtual void paged_head_compact(const PagedKV& kv, const PagedHeadJobs& jobs) = 0;
  virtual void gemv(const GemvArgs& a) = 0;
  virtual void dequantize(const DequantArgs& a) = 0;
  virtual void value_weights(const ValueWeightArgs& a) = 0;
  virtual void output_gram(const OutputGramArgs& a) = 0;

  template <class T>
  T* put(const std::vector<T>& v) {
    T* p = static_cast<T*>(alloc(v.size() * sizeof(T) + 16));
    upload(p, v.data(), v.size() * sizeof(T));
    return p;
  }
  template <class T>
  std::vector<T> get(const T* p, size_t n) {
    std::vector<T> v(n);
    download(v.data(), p, n * sizeof(T));
    return v;
  }
};

// Tolerance of the issue: relative error <= 2e-3 in fp16, <= 1e-2 in bf16 (1e-5 for float32 paths).
double tolerance(DType t);

// Rounds every value to the nearest value of type t (F16 / BF16), in place.
void round_to(DType t, std::vector<float>& x);
// Host conversions between float and 16-bit storage.
std::vector<uint16_t> to_16bit(DType t, const std::vector<float>& x);
std::vector<float> from_16bit(DType t, const std::vector<uint16_t>& x);
// Uploads x as type t (F32, F16, BF16); returns the device pointer.
void* put_as(Backend& be, DType t, const std::vector<float>& x);
// Downloads n elements of type t as float.
std::vector<float> get_as(Backend& be, DType t, const void* p, size_t n);

// Expects max|got - ref| / max|ref| <= tol, every element within tol * max(|ref|, 0.01 max|ref|),
// and no NaN; prints the worst element when not.
void expect_close(const std::vector<float>& got, const std::vector<float>& ref, double tol, const std::string& what);

struct PrefillCase {
  DType dtype = DType::BF16;
  int n_q = 0, n_kv = 0;  // n_kv > n_q: the queries are the last n_q tokens (a prefill chunk)
  int n_heads = 0, n_kv_heads = 0, head_dim = 0;
  bool causal = true;
  bool importance = true;
  int importance_from = 0;
  bool fused_qkv = false;  // q, k, v as column blocks of one [n, *] buffer (strided rows); n_q == n_kv
  bool position_gaps = false;
  uint32_t seed = 1;
  bool per_kv_head = false;  // importance [n_kv_heads, n_kv] (PrefillAttentionArgs::importance_per_kv_head)
  // The extended importance (PrefillAttentionArgs::importance_weight, importance_max): random
  // positive weights per (head, key), and the maximum over the counted queries instead of the sum.
  bool weighted = false, max = false;
  std::string str() const;
};
// The output is checked element by element against a bound from the arithmetic (see the .cc); the
// importance against the float32 tolerance. `kernel` is passed to attention_prefill.
void check_prefill(Backend& be, const PrefillCase& c, PrefillKernel kernel = PrefillKernel::Auto);
// A chunked prefill's attention (GpuModel::prefill_parts' pieces): the queries of each piece
// [s, s + C) over the keys [0, s + C), importance from `importance_from` on added piece by piece
// on the host, against one call over the whole prompt of n tokens: every output row bit for bit
// (a row's scores and its online softmax over the same key tiles do not depend on which query tile
// holds it), the importance within the float32 bound of summing the same probabilities in another
// order (derived in the .cc).
void check_prefill_chunks(Backend& be, DType dtype, int n, int chunk, int importance_from, PrefillKernel kernel,
                          uint32_t seed = 7);

struct DecodeCase {
  DType dtype = DType::BF16;
  std::vector<int> lengths;  // entries per sequence
  int n_heads = 0, n_kv_heads = 0, head_dim = 0;
  int block_size = 16;
  bool importance = true;
  bool mask_some = false;  // some q_pos below the newest entries' positions
  DType src_dtype = DType::F32;  // of the rows written into the pool
  uint32_t seed = 1;
  std::string str() const;
};
void check_decode(Backend& be, const DecodeCase& c);

// The case lists. `full`: every case the GPU runs (pkv_cuda_tests); otherwise a smaller set sized for
// the CPU emulator in CI. Each list covers both 16-bit types.
std::vector<PrefillCase> prefill_cases(bool full);
std::vector<DecodeCase> decode_cases(bool full);
// The extended importance's cases: weighted sum and maximum (weighted or not), GQA and MHA, queries
// counted from several offsets (0, inside the first tile, a window, a chunk after cached keys).
std::vector<PrefillCase> extended_prefill_cases(bool full);
// value_weights (vnorm: gram null; wov2: random symmetric PSD Gram matrices) against
// ops::value_weights on the same 16-bit values, strided rows, GQA; every weight within its bound
// from the float32 arithmetic of both (derived in the .cc: the product's and the dot's sums, the
// square root).
void check_value_weights(Backend& be, DType dtype, int n_kv, int n_heads, int n_kv_heads, int head_dim, bool gram,
                         uint32_t seed);
// The value weights' cases, both 16-bit types, vnorm and wov2: GQA and MHA, head dims off the tile
// and not a multiple of 4, ragged key tiles; `full` adds the bundled model's and a LLaVA-7B layer's
// shapes and more keys than one of wov2's chunks.
void check_value_weights_all(Backend& be, bool full);
// output_gram of random 16-bit W_o [hidden, n_heads * head_dim] against ops::output_gram (the CPU
// engine's Model::output_gram), every element within its bound from the arithmetic (the .cc).
void check_output_gram(Backend& be, DType dtype, int hidden, int n_heads, int head_dim, uint32_t seed);
// Both 16-bit types; the bundled model's shape, head dims off the tile; `full` adds a LLaVA-7B layer.
void check_output_gram_all(Backend& be, bool full);

// Compaction of several tables in one call vs KVLayer::retain; then the block pool shrinks.
void check_compact(Backend& be, DType dtype, int block_size, int kv_dim, uint32_t seed);
// RoPE + KV write + q conversion in one pass vs ops::Rope and rounding (and the rows around it
// untouched), a decode step's rows appended to tables of different lengths.
void check_rope_write(Backend& be, DType dtype, int block_size, int n_heads, int n_kv_heads, int head_dim, uint32_t seed);
// Elastic merge + compaction vs the elastic policy's after_prefill on a KVCache.
void check_merge(Backend& be, DType dtype, int block_size, int kv_dim, int n_layers, int N, double budget,
                 uint32_t seed);
// Inconsistent block tables set the error flag and never fault.
void check_paged_errors(Backend& be);
// Head tables (per-KV-head budgets; kernels.h PagedHeads): shared tables (one with a random slot
// map) split by paged_kv_head_compact into head tables keeping random lists per head, then
// compacted in place, each step bit for bit against KVLayer::apply of the same head plans, the
// BlockPool's blocks exactly the head tables' (the rest freed); a decode step's RoPE write into
// the head tables against the same write into a shared table (the columns of each head); decode
// attention over a batch mixing head-table and shared sequences against ops::attention over each
// head's own entries.
void check_head_tables(Backend& be, DType dtype, int block_size, int n_heads, int n_kv_heads, int head_dim,
                       uint32_t seed);

// Skinny products (gemv) vs ops::linear_reference (and ops::swiglu): rows 1..8, widths with a tail
// past the last full 256-column stripe, an out that is not a multiple of a block's 16 outputs,
// strided x and y, accumulate, float32 and 16-bit y, the SwiGLU pair; then the refusals.
struct GemvCase {
  DType dtype = DType::BF16;
  DType y_dtype = DType::F32;
  int rows = 1, in = 0, out = 0;
  int x_pad = 0, y_pad = 0;  // extra row stride
  bool accumulate = false, swiglu = false;
  uint32_t seed = 1;
  std::string str() const;
};
// `run` (when set) computes the product instead of be.gemv: the tensor-core skinny products, which
// only a GPU runs, are held to the same reference and bound.
void check_gemv(Backend& be, const GemvCase& c, const std::function<void(const GemvArgs&)>& run = {});
std::vector<GemvCase> gemv_cases(bool full);
// Skinny products (kernels.h: skinny): 1-64 rows, inputs of one to 172 column chunks, outputs with a
// ragged last block of 128, products whose columns split over 1 to 86 blocks, the same variations.
std::vector<GemvCase> skinny_cases();
void check_gemv_refusals(Backend& be);

}  // namespace pkv::cuda::test
