#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>

#include <cblas.h>
#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#include <immintrin.h>
#define PKV_AVX2 1
#endif

#include "core/dtype_rows.h"
#include "core/error.h"
#include "core/threads.h"
#include "ops/ops.h"

#include "ops/quant.h"

namespace pkv::ops {

namespace {

// OpenBLAS runs single-threaded inside our own parallel_for (one pool, no oversubscription).
void blas_single_thread() {
  static std::once_flag once;
  std::call_once(once, [] { openblas_set_num_threads(1); });
}

// y[rows, L.out] += L's bias (if any).
inline void add_bias(const Linear& L, int rows, float* y) {
  if (L.b.empty()) return;
  for (int r = 0; r < rows; ++r)
    for (int o = 0; o < L.out; ++o) y[size_t(r) * L.out + o] += L.b[size_t(o)];
}

inline float dot_f32(const float* a, const float* b, int n) {
  float s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0, s5 = 0, s6 = 0, s7 = 0;
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    s0 += a[i] * b[i];
    s1 += a[i + 1] * b[i + 1];
    s2 += a[i + 2] * b[i + 2];
    s3 += a[i + 3] * b[i + 3];
    s4 += a[i + 4] * b[i + 4];
    s5 += a[i + 5] * b[i + 5];
    s6 += a[i + 6] * b[i + 6];
    s7 += a[i + 7] * b[i + 7];
  }
  for (; i < n; ++i) s0 += a[i] * b[i];
  return ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7));
}

#ifdef PKV_AVX2
inline float hsum256(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
  return _mm_cvtss_f32(lo);
}
#endif

// The dot products of 16-bit weight rows (decode, and linear_rows' small batches) share one
// arithmetic, whatever the path: 16 float32 lanes, lane l accumulating x[i + l] w[i + l] by FMA over
// the blocks of 16 in order; then v_j = lane j + lane j + 8, s = ((v0 + v4) + (v2 + v6)) + ((v1 + v5) +
// (v3 + v7)) (hsum256's tree); then the tail in order. On AVX2 the 16 lanes are two 8-lane registers,
// on AVX-512 one register (the same operations lane by lane): so every path below gives the same
// bits, one row or several, one weight row or four.
#ifdef PKV_AVX2
#ifdef __AVX512F__
using Lanes16 = __m512;
inline Lanes16 lanes_zero() { return _mm512_setzero_ps(); }
template <DType T>
inline Lanes16 lanes_weights(const uint16_t* w) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  if constexpr (T == DType::BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  else return _mm512_cvtph_ps(h);
}
inline Lanes16 lanes_fma(const float* x, Lanes16 w, Lanes16 acc) { return _mm512_fmadd_ps(_mm512_loadu_ps(x), w, acc); }
inline float lanes_sum(Lanes16 acc) {
  const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc), 1));
  return hsum256(_mm256_add_ps(_mm512_castps512_ps256(acc), hi));
}
#else
struct Lanes16 {
  __m256 lo, hi;
};
inline Lanes16 lanes_zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
template <DType T>
inline Lanes16 lanes_weights(const uint16_t* w) {
  const __m128i h0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
  const __m128i h1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 8));
  if constexpr (T == DType::BF16)
    return {_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h0), 16)),
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h1), 16))};
  else return {_mm256_cvtph_ps(h0), _mm256_cvtph_ps(h1)};
}
inline Lanes16 lanes_fma(const float* x, Lanes16 w, Lanes16 acc) {
  return {_mm256_fmadd_ps(_mm256_loadu_ps(x), w.lo, acc.lo), _mm256_fmadd_ps(_mm256_loadu_ps(x + 8), w.hi, acc.hi)};
}
inline float lanes_sum(Lanes16 acc) { return hsum256(_mm256_add_ps(acc.lo, acc.hi)); }
#endif
#endif

template <DType T>
inline float w16_to_f32(uint16_t h) {
  if constexpr (T == DType::BF16) return bf16_to_f32(h);
  else return f16_to_f32(h);
}

template <DType T>
inline float dot16(const float* x, const uint16_t* w, int n) {
#ifdef PKV_AVX2
  Lanes16 acc = lanes_zero();
  int i = 0;
  for (; i + 16 <= n; i += 16) acc = lanes_fma(x + i, lanes_weights<T>(w + i), acc);
  float s = lanes_sum(acc);
  for (; i < n; ++i) s = std::fma(x[i], w16_to_f32<T>(w[i]), s);
  return s;
#else
  float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) s[j] += x[i + j] * w16_to_f32<T>(w[i + j]);
  for (; i < n; ++i) s[0] += x[i] * w16_to_f32<T>(w[i]);
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
#endif
}

// Four input rows against one 16-bit weight row (linear_rows: a batch reads each weight row once),
// each bit-identical to dot16 on its own.
template <DType T>
inline void dot4_16(const float* x, size_t stride, const uint16_t* w, int n, float* out) {
#ifdef PKV_AVX2
  Lanes16 acc[4] = {lanes_zero(), lanes_zero(), lanes_zero(), lanes_zero()};
  int i = 0;
  for (; i + 16 <= n; i += 16) {
    const Lanes16 wl = lanes_weights<T>(w + i);
    for (int r = 0; r < 4; ++r) acc[r] = lanes_fma(x + size_t(r) * stride + i, wl, acc[r]);
  }
  for (int r = 0; r < 4; ++r) {
    const float* xr = x + size_t(r) * stride;
    float s = lanes_sum(acc[r]);
    for (int j = i; j < n; ++j) s = std::fma(xr[j], w16_to_f32<T>(w[j]), s);
    out[r] = s;
  }
#else
  for (int r = 0; r < 4; ++r) out[r] = dot16<T>(x + size_t(r) * stride, w, n);
#endif
}

// One input row against G consecutive 16-bit weight rows (decode: G independent FMA chains in
// flight, G streams of weights), each bit-identical to dot16 on its own. The weights are read once,
// so the next blocks are prefetched kAhead bytes further on in each row. G = 8 where a chain is one
// AVX-512 register, 4 on AVX2 (two registers a chain); a 7B product at one thread, 8 rows against 4
// and against one: 22.0 against 17.2 and 8.6 GB/s (4096 -> 11008, F16, 2-core Xeon, quiet).
#if defined(PKV_AVX2) && defined(__AVX512F__)
constexpr int kGemvRows = 8;
#else
constexpr int kGemvRows = 4;
#endif

template <DType T>
inline void dot_rows_16(const float* x, const uint16_t* w, size_t ld, int n, float* out) {
  constexpr int G = kGemvRows;
#ifdef PKV_AVX2
  constexpr int kAhead = 1024;
  Lanes16 acc[G];
  for (int r = 0; r < G; ++r) acc[r] = lanes_zero();
  int i = 0;
  for (; i + 32 <= n; i += 32) {
    for (int r = 0; r < G; ++r) __builtin_prefetch(reinterpret_cast<const char*>(w + size_t(r) * ld + i) + kAhead, 0, 3);
    for (int r = 0; r < G; ++r) acc[r] = lanes_fma(x + i, lanes_weights<T>(w + size_t(r) * ld + i), acc[r]);
    for (int r = 0; r < G; ++r) acc[r] = lanes_fma(x + i + 16, lanes_weights<T>(w + size_t(r) * ld + i + 16), acc[r]);
  }
  for (; i + 16 <= n; i += 16)
    for (int r = 0; r < G; ++r) acc[r] = lanes_fma(x + i, lanes_weights<T>(w + size_t(r) * ld + i), acc[r]);
  for (int r = 0; r < G; ++r) {
    const uint16_t* wr = w + size_t(r) * ld;
    float s = lanes_sum(acc[r]);
    for (int j = i; j < n; ++j) s = std::fma(x[j], w16_to_f32<T>(wr[j]), s);
    out[r] = s;
  }
#else
  for (int r = 0; r < G; ++r) out[r] = dot16<T>(x, w + size_t(r) * ld, n);
#endif
}

// y[o] = x . W[o] for o in [b, e): decode's matrix-vector product over 16-bit weights, kGemvRows
// weight rows at a time.
template <DType T>
void gemv16(const float* x, const uint16_t* w, int in, size_t b, size_t e, float* y) {
  size_t o = b;
  for (; o + kGemvRows <= e; o += kGemvRows) dot_rows_16<T>(x, w + o * size_t(in), size_t(in), in, y + o);
  for (; o < e; ++o) y[o] = dot16<T>(x, w + o * size_t(in), in);
}

// n 16-bit values of a KV row (F16 or BF16) as float32 (exact); attention converts one short row
// (one head's) at a time, inline.
inline void kv_row_f32(DType t, const uint16_t* src, float* dst, int n) {
  if (t == DType::F16) f16_row_to_f32(src, dst, size_t(n));
  else bf16_row_to_f32(src, dst, size_t(n));
}

}  // namespace

const char* blas_corename() { return openblas_get_corename(); }

const char* blas_coretype_override() {
  if (std::getenv("OPENBLAS_CORETYPE")) return nullptr;
  const std::string core = openblas_get_corename();
  const bool generic = core == "Prescott" || core == "prescott" || core == "Core2" || core == "core2" ||
                       core == "Nehalem" || core == "nehalem" || core == "Katmai" || core == "Banias";
  if (!generic) return nullptr;
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq"))
    return "SkylakeX";
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return "Haswell";
  if (__builtin_cpu_supports("avx")) return "Sandybridge";
  return nullptr;
}

size_t weight_row_bytes(const TensorView& W, int64_t n) {
  return W.quant ? quant::row_bytes(W.quant, n) : size_t(n) * dtype_size(W.dtype);
}

void weight_row(const TensorView& W, int64_t row, int64_t n, float* out) {
  const uint8_t* p = static_cast<const uint8_t*>(W.data) + size_t(row) * weight_row_bytes(W, n);
  if (W.quant) quant::dequantize_row(W.quant, p, out, n);
  else to_f32(W.dtype, p, out, size_t(n));
}

namespace {

// Decode-sized products with block-quantised weights: each weight row dequantised (block by block,
// into a row-sized buffer; no full-precision copy of the matrix), then one float dot product per
// input row. linear() (1-2 rows) and linear_rows() both take it, so batched steps equal single ones
// bit for bit; larger products go through linear()'s blocked BLAS path, which dequantises a block of
// rows at a time.
void linear_quant_dots(const float* x, int rows, const Linear& L, float* y) {
  const int in = L.in, out = L.out;
  const TensorView& W = *L.w;
  parallel_for(size_t(out), 16, [&](size_t b, size_t e, int) {
    static thread_local std::vector<float> wrow;
    wrow.resize(size_t(in));
    for (size_t o = b; o < e; ++o) {
      weight_row(W, int64_t(o), in, wrow.data());
      for (int r = 0; r < rows; ++r) y[size_t(r) * out + o] = dot_f32(x + size_t(r) * in, wrow.data(), in);
    }
  });
  add_bias(L, rows, y);
}

}  // namespace

// The most rows linear() multiplies by 16-bit dot products, and the most by gemm16 rather than BLAS
// over converted blocks. gemm16 against the dots and BLAS (pkv_bench_cpu_linear --threads 2 --rows
// 17,32,64,128, 7B shapes, 2-core Xeon with AVX-512, another build running): 4096 x 4096 F16 at 32
// rows 4.9 ms against 11.5 (dots) and 9.6 (BLAS); at 64 rows 9.3 against 14.0 (BLAS); at 128 BLAS
// is ahead (23.7 against 26.7), and on the down projection (11008 -> 4096) from 64 rows in F16.
constexpr int kDotRows = 16;
constexpr int kGemm16Rows = 64;

void linear(const float* x, int rows, const Linear& L, float* y) {
  blas_single_thread();
  const int in = L.in, out = L.out;
  const TensorView& W = *L.w;
  if (W.quant && rows <= 2) return linear_quant_dots(x, rows, L, y);
  // A few rows of 16-bit weights (a short prompt, a small batch): the dot products read each weight
  // row once for four rows. Converting blocks of W for BLAS instead took 3-4x as long at 4 rows of a
  // 7B product and 1.3-1.4x at 12 (pkv_bench_cpu_linear, 2 threads of a 2-core Xeon: 4096 x 4096,
  // 4 rows 6.0 ms against 1.5 ms; 4096 -> 11008, 12 rows 20.9 against 14.5 ms); at 16 rows the two
  // drew level on the square product and the dots stayed ahead on the MLP's (23.6 against 17.6 ms).
  if (rows > 2 && rows <= kDotRows && W.dtype != DType::F32 && !W.quant) return linear_rows(x, rows, L, y);
  if (rows > kDotRows && rows <= kGemm16Rows && W.dtype != DType::F32 && !W.quant) {
    gemm16(x, rows, W.dtype, static_cast<const uint16_t*>(W.data), in, out, y);
    add_bias(L, rows, y);
    return;
  }
  if (rows <= 2 && W.dtype != DType::F32 && !W.quant) {
    // Decode: a matrix-vector product reading 16-bit weights directly.
    const uint16_t* w16 = static_cast<const uint16_t*>(W.data);
    parallel_for(size_t(out), 16, [&](size_t b, size_t e, int) {
      for (int r = 0; r < rows; ++r) {
        if (W.dtype == DType::BF16) gemv16<DType::BF16>(x + size_t(r) * in, w16, in, b, e, y + size_t(r) * out);
        else gemv16<DType::F16>(x + size_t(r) * in, w16, in, b, e, y + size_t(r) * out);
      }
    });
    add_bias(L, rows, y);
    return;
  }
  linear_blas(x, rows, L, y);
}

void linear_blas(const float* x, int rows, const Linear& L, float* y) {
  blas_single_thread();
  const int in = L.in, out = L.out;
  const TensorView& W = *L.w;
  {
    // Blocks of output features: each thread converts its block of W (when 16-bit) into scratch and
    // multiplies it with all rows of x through BLAS.
    const int block = std::max(16, std::min(256, (out + num_threads() - 1) / num_threads()));
    const int n_blocks = (out + block - 1) / block;
    parallel_for(size_t(n_blocks), 1, [&](size_t b, size_t e, int) {
      // Declared here, in the code the workers run: a thread_local declared in the function itself is
      // never constructed on a worker thread (no thread passes its declaration), so the workers
      // used an object whose lifetime had not begun and never freed its buffer (found by LeakSanitizer).
      static thread_local std::vector<float> scratch;
      for (size_t blk = b; blk < e; ++blk) {
        const int o0 = int(blk) * block, nb = std::min(block, out - o0);
        const float* wb;
        if (W.dtype == DType::F32 && !W.quant) {
          wb = static_cast<const float*>(W.data) + size_t(o0) * in;
        } else if (W.quant) {  // block-quantised rows, one at a time
          scratch.resize(size_t(nb) * in);
          for (int i = 0; i < nb; ++i) weight_row(W, o0 + i, in, scratch.data() + size_t(i) * in);
          wb = scratch.data();
        } else {
          scratch.resize(size_t(nb) * in);
          to_f32(W.dtype, static_cast<const uint8_t*>(W.data) + size_t(o0) * in * 2, scratch.data(), scratch.size());
          wb = scratch.data();
        }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, nb, in, 1.f, x, in, wb, in, 0.f, y + o0, out);
      }
    });
  }
  add_bias(L, rows, y);
}

void linear_rows(const float* x, int rows, const Linear& L, float* y) {
  const int in = L.in, out = L.out;
  const TensorView& W = *L.w;
  if (W.quant) {
    blas_single_thread();
    return linear_quant_dots(x, rows, L, y);  // the decode path's dots, as linear() for one row
  }
  if (W.dtype == DType::F32 || rows <= 1) {
    for (int r = 0; r < rows; ++r) linear(x + size_t(r) * in, 1, L, y + size_t(r) * out);
    return;
  }
  blas_single_thread();
  // The same dot product per (row, feature) as linear()'s decode path, four rows at a time against
  // each weight row (dot4_16), so the weights are read from memory once for the whole batch.
  const uint16_t* w16 = static_cast<const uint16_t*>(W.data);
  parallel_for(size_t(out), 16, [&](size_t b, size_t e, int) {
    float four[4];
    for (size_t o = b; o < e; ++o) {
      const uint16_t* wo = w16 + o * size_t(in);
      int r = 0;
      for (; r + 4 <= rows; r += 4) {
        if (W.dtype == DType::BF16) dot4_16<DType::BF16>(x + size_t(r) * in, size_t(in), wo, in, four);
        else dot4_16<DType::F16>(x + size_t(r) * in, size_t(in), wo, in, four);
        for (int k = 0; k < 4; ++k) y[size_t(r + k) * out + o] = four[k];
      }
      for (; r < rows; ++r)
        y[size_t(r) * out + o] =
            W.dtype == DType::BF16 ? dot16<DType::BF16>(x + size_t(r) * in, wo, in) : dot16<DType::F16>(x + size_t(r) * in, wo, in);
    }
  });
  add_bias(L, rows, y);
}

void linear_reference(const float* x, int rows, const Linear& L, float* y) {
  std::vector<float> wrow(size_t(L.in));
  for (int o = 0; o < L.out; ++o) {
    weight_row(*L.w, o, L.in, wrow.data());
    for (int r = 0; r < rows; ++r) {
      double s = L.b.empty() ? 0.0 : L.b[size_t(o)];
      for (int i = 0; i < L.in; ++i) s += double(x[size_t(r) * L.in + i]) * wrow[size_t(i)];
      y[size_t(r) * L.out + o] = float(s);
    }
  }
}

void rms_norm(const float* x, int rows, int dim, const Norm& n, float eps, float* y) {
  for (int r = 0; r < rows; ++r) {
    const float* xr = x + size_t(r) * dim;
    float* yr = y + size_t(r) * dim;
    float ss = 0;
    for (int i = 0; i < dim; ++i) ss += xr[i] * xr[i];
    const float inv = 1.f / std::sqrt(ss / float(dim) + eps);
    for (int i = 0; i < dim; ++i) yr[i] = n.w[size_t(i)] * (xr[i] * inv);
  }
}

void layer_norm(const float* x, int rows, int dim, const Norm& n, float eps, float* y) {
  for (int r = 0; r < rows; ++r) {
    const float* xr = x + size_t(r) * dim;
    float* yr = y + size_t(r) * dim;
    float mean = 0;
    for (int i = 0; i < dim; ++i) mean += xr[i];
    mean /= float(dim);
    float var = 0;
    for (int i = 0; i < dim; ++i) var += (xr[i] - mean) * (xr[i] - mean);
    var /= float(dim);
    const float inv = 1.f / std::sqrt(var + eps);
    for (int i = 0; i < dim; ++i) yr[i] = (xr[i] - mean) * inv * n.w[size_t(i)] + n.b[size_t(i)];
  }
}

Act act_from_name(const char* name) {
  const std::string s(name);
  if (s == "gelu") return Act::Gelu;
  if (s == "gelu_pytorch_tanh") return Act::GeluTanh;
  if (s == "quick_gelu") return Act::QuickGelu;
  if (s == "silu") return Act::Silu;
  if (s == "relu") return Act::Relu;
  PKV_ASSERT_MSG(false, "unknown activation " + s);
  return Act::Gelu;
}

void activate(float* x, size_t n, Act a) {
  switch (a) {
    case Act::Gelu:
      for (size_t i = 0; i < n; ++i) x[i] = 0.5f * x[i] * (1.f + std::erf(x[i] * 0.70710678118654752f));
      break;
    case Act::GeluTanh:
      for (size_t i = 0; i < n; ++i) {
        const float v = x[i];
        x[i] = 0.5f * v * (1.f + std::tanh(0.7978845608028654f * (v + 0.044715f * v * v * v)));
      }
      break;
    case Act::QuickGelu:
      for (size_t i = 0; i < n; ++i) x[i] = x[i] / (1.f + std::exp(-1.702f * x[i]));
      break;
    case Act::Silu:
      for (size_t i = 0; i < n; ++i) x[i] = x[i] / (1.f + std::exp(-x[i]));
      break;
    case Act::Relu:
      for (size_t i = 0; i < n; ++i) x[i] = std::max(0.f, x[i]);
      break;
  }
}

void swiglu(float* gate, const float* up, size_t n) {
  for (size_t i = 0; i < n; ++i) gate[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
}

Rope Rope::make(int head_dim, float theta, const std::string& rope_type, float factor, float low_freq_factor,
                float high_freq_factor, int original_max_positions) {
  Rope r;
  r.head_dim = head_dim;
  const int half = head_dim / 2;
  r.inv_freq.resize(size_t(half));
  for (int i = 0; i < half; ++i) {
    // As transformers computes it: float32 exponent, float32 power.
    const float expo = float(2 * i) / float(head_dim);
    r.inv_freq[size_t(i)] = 1.0f / std::pow(theta, expo);
  }
  if (rope_type == "linear") {
    for (auto& f : r.inv_freq) f /= factor;
  } else if (rope_type == "llama3") {
    const double low_wl = original_max_positions / low_freq_factor;
    const double high_wl = original_max_positions / high_freq_factor;
    for (auto& f : r.inv_freq) {
      const double wl = 2 * M_PI / f;
      if (wl > low_wl) {
        f = float(f / factor);
      } else if (wl >= high_wl) {
        const double smooth = (original_max_positions / wl - low_freq_factor) /
                              (high_freq_factor - low_freq_factor);
        f = float((1 - smooth) * f / factor + smooth * f);
      }
    }
  }
  return r;
}

void Rope::apply(float* x, int rows, int n_heads, const int32_t* pos) const {
  const int half = head_dim / 2;
  std::vector<float> c(static_cast<size_t>(half)), s(static_cast<size_t>(half));
  for (int r = 0; r < rows; ++r) {
    for (int i = 0; i < half; ++i) {
      const float ang = float(pos[r]) * inv_freq[size_t(i)];  // float32 product, as in transformers
      c[size_t(i)] = std::cos(ang);
      s[size_t(i)] = std::sin(ang);
    }
    for (int h = 0; h < n_heads; ++h) {
      float* v = x + (size_t(r) * n_heads + h) * head_dim;
      for (int i = 0; i < half; ++i) {
        const float a = v[i], b = v[i + half];
        v[i] = a * c[size_t(i)] - b * s[size_t(i)];
        v[i + half] = b * c[size_t(i)] + a * s[size_t(i)];
      }
    }
  }
}

namespace {

// Many queries (prefill, vision tower): per head and block of queries, scores and outputs through
// BLAS. Never holds more than one [block, n_kv] score tile per thread.
void attention_blocked(const AttentionArgs& a) {
  blas_single_thread();
  const int group = a.n_heads / a.n_kv_heads;
  const int qs = a.q_stride ? a.q_stride : a.n_heads * a.head_dim;
  const int os = a.out_stride ? a.out_stride : a.n_heads * a.head_dim;
  const bool causal = a.q_pos && a.kv_pos;
  constexpr int kBlock = 64;
  const int n_blocks = (a.n_q + kBlock - 1) / kBlock;
  const size_t items = size_t(a.n_heads) * n_blocks;
  std::vector<std::vector<float>> imp_parts;
  if (a.importance) imp_parts.assign(size_t(num_threads()), std::vector<float>());
  const size_t imp_len = size_t(a.n_kv) * (a.importance_per_kv_head ? size_t(a.n_kv_heads) : 1);
  const float imp_div = float(a.importance_per_kv_head ? group : a.n_heads);
  parallel_for(items, 1, [&](size_t b, size_t e, int tid) {
    std::vector<float> p(size_t(kBlock) * a.n_kv);
    std::vector<float> kpanel, vpanel;
    int panel_g = -1;
    float* imp_all = nullptr;
    if (a.importance) {
      imp_parts[size_t(tid)].assign(imp_len, 0.f);
      imp_all = imp_parts[size_t(tid)].data();
    }
    for (size_t it = b; it < e; ++it) {
      const int h = int(it / size_t(n_blocks)), blk = int(it % size_t(n_blocks));
      const int g = h / group, i0 = blk * kBlock, rows = std::min(kBlock, a.n_q - i0);
      float* imp = imp_all && a.importance_per_kv_head ? imp_all + size_t(g) * a.n_kv : imp_all;
      const float* qb = a.q + size_t(i0) * qs + size_t(h) * a.head_dim;
      const float* kb = nullptr;
      const float* vb = nullptr;
      int kv_ld = a.kv_stride;
      if (a.kv_dtype == DType::F32) {
        kb = a.k + size_t(g) * a.head_dim;
        vb = a.v + size_t(g) * a.head_dim;
      } else {
        // A 16-bit cache: KV head g's rows converted once into this thread's panels [n_kv, head_dim]
        // (items run head by head, so a thread converts each KV head about once).
        if (panel_g != g) {
          kpanel.resize(size_t(a.n_kv) * a.head_dim);
          vpanel.resize(kpanel.size());
          for (int j = 0; j < a.n_kv; ++j) {
            const size_t off = size_t(j) * a.kv_stride + size_t(g) * a.head_dim;
            kv_row_f32(a.kv_dtype, a.k16 + off, kpanel.data() + size_t(j) * a.head_dim, a.head_dim);
            kv_row_f32(a.kv_dtype, a.v16 + off, vpanel.data() + size_t(j) * a.head_dim, a.head_dim);
          }
          panel_g = g;
        }
        kb = kpanel.data();
        vb = vpanel.data();
        kv_ld = a.head_dim;
      }
      // Keys beyond the last query's position are never seen by this block.
      int n_kv = a.n_kv;
      if (causal) {
        const int32_t last = a.q_pos[i0 + rows - 1];
        n_kv = int(std::upper_bound(a.kv_pos, a.kv_pos + a.n_kv, last) - a.kv_pos);
      }
      if (n_kv == 0) {
        for (int r = 0; r < rows; ++r) std::fill_n(a.out + size_t(i0 + r) * os + size_t(h) * a.head_dim, a.head_dim, 0.f);
        continue;
      }
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, n_kv, a.head_dim, a.scale, qb, qs, kb, kv_ld, 0.f,
                  p.data(), n_kv);
      for (int r = 0; r < rows; ++r) {
        float* pr = p.data() + size_t(r) * n_kv;
        int seen = n_kv;
        if (causal) seen = int(std::upper_bound(a.kv_pos, a.kv_pos + n_kv, a.q_pos[i0 + r]) - a.kv_pos);
        float mx = -INFINITY;
        for (int j = 0; j < seen; ++j) mx = std::max(mx, pr[j]);
        float sum = 0;
        for (int j = 0; j < seen; ++j) sum += pr[j] = std::exp(pr[j] - mx);
        const float inv = seen > 0 ? 1.f / sum : 0.f;
        for (int j = 0; j < seen; ++j) pr[j] *= inv;
        for (int j = seen; j < n_kv; ++j) pr[j] = 0.f;
        if (imp && i0 + r >= a.importance_from)
          for (int j = 0; j < seen; ++j) imp[j] += pr[j] / imp_div;
      }
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, a.head_dim, n_kv, 1.f, p.data(), n_kv, vb, kv_ld,
                  0.f, a.out + size_t(i0) * os + size_t(h) * a.head_dim, os);
    }
  });
  if (a.importance)
    for (auto& part : imp_parts)
      for (size_t j = 0; j < part.size(); ++j) a.importance[j] += part[j];
}

}  // namespace

namespace {

// ---- Decode attention (fewer than 16 queries) ----
//
// Work items are (query, chunk of KV heads, block of kDecodeBlock entries). An item streams its
// block's key rows once, each row's segment of KV head g dotted with all of g's query heads while it
// is loaded, then takes a softmax local to the block (its max m_b and sum l_b per head) and streams
// the value rows once, adding exp(s_j - m_b) * v_j into a partial output per head. The partials of
// the blocks are then combined per (query, head) in block order: M = max_b m_b, L = sum_b l_b e^(m_b - M),
// out = sum_b e^(m_b - M) acc_b / L. The blocks are fixed by the entry count alone and each value is
// computed by one thread in one order, so the result does not depend on the number of threads; the
// chunks of heads (chosen from the thread count, to have work for every thread when the cache is
// short) change which rows an item reads, never the arithmetic of a head.
//
// A 16-bit cache's row segment is converted to float32 (exact) into a buffer and then takes the same
// arithmetic as a float32 row: the result is bit for bit that over a float32 cache of the same values.
constexpr int kDecodeBlock = 64;

#if defined(__AVX512F__) && defined(PKV_AVX2)
#define PKV_DECODE_AVX512 1
#endif

// GCC 12 reports its own _mm512_reduce_add_ps (an undefined-value cast inside) as maybe uninitialized.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
// s[r] = sum_d q[r * hd + d] * k[d] for r < N: each piece of k is loaded once for the N query heads.
template <int N>
inline void dots_n(const float* q, int hd, const float* k, float* s) {
#if defined(PKV_DECODE_AVX512)
  __m512 a0[N], a1[N];
  for (int r = 0; r < N; ++r) a0[r] = a1[r] = _mm512_setzero_ps();
  int d = 0;
  for (; d + 32 <= hd; d += 32) {
    const __m512 k0 = _mm512_loadu_ps(k + d), k1 = _mm512_loadu_ps(k + d + 16);
    for (int r = 0; r < N; ++r) {
      a0[r] = _mm512_fmadd_ps(_mm512_loadu_ps(q + size_t(r) * hd + d), k0, a0[r]);
      a1[r] = _mm512_fmadd_ps(_mm512_loadu_ps(q + size_t(r) * hd + d + 16), k1, a1[r]);
    }
  }
  if (d + 16 <= hd) {
    const __m512 k0 = _mm512_loadu_ps(k + d);
    for (int r = 0; r < N; ++r) a0[r] = _mm512_fmadd_ps(_mm512_loadu_ps(q + size_t(r) * hd + d), k0, a0[r]);
    d += 16;
  }
  for (int r = 0; r < N; ++r) {
    float t = _mm512_reduce_add_ps(_mm512_add_ps(a0[r], a1[r]));
    for (int j = d; j < hd; ++j) t += q[size_t(r) * hd + j] * k[j];
    s[r] = t;
  }
#elif defined(PKV_AVX2)
  __m256 a0[N], a1[N];
  for (int r = 0; r < N; ++r) a0[r] = a1[r] = _mm256_setzero_ps();
  int d = 0;
  for (; d + 16 <= hd; d += 16) {
    const __m256 k0 = _mm256_loadu_ps(k + d), k1 = _mm256_loadu_ps(k + d + 8);
    for (int r = 0; r < N; ++r) {
      a0[r] = _mm256_fmadd_ps(_mm256_loadu_ps(q + size_t(r) * hd + d), k0, a0[r]);
      a1[r] = _mm256_fmadd_ps(_mm256_loadu_ps(q + size_t(r) * hd + d + 8), k1, a1[r]);
    }
  }
  if (d + 8 <= hd) {
    const __m256 k0 = _mm256_loadu_ps(k + d);
    for (int r = 0; r < N; ++r) a0[r] = _mm256_fmadd_ps(_mm256_loadu_ps(q + size_t(r) * hd + d), k0, a0[r]);
    d += 8;
  }
  for (int r = 0; r < N; ++r) {
    float t = hsum256(_mm256_add_ps(a0[r], a1[r]));
    for (int j = d; j < hd; ++j) t += q[size_t(r) * hd + j] * k[j];
    s[r] = t;
  }
#else
  for (int r = 0; r < N; ++r) s[r] = dot_f32(q + size_t(r) * hd, k, hd);
#endif
}
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

// acc[r * hd + d] += w[r] * v[d] for r < N: each piece of v is loaded once for the N heads.
template <int N>
inline void axpys_n(float* acc, int hd, const float* w, const float* v) {
  int d = 0;
#if defined(PKV_DECODE_AVX512)
  __m512 wv[N];
  for (int r = 0; r < N; ++r) wv[r] = _mm512_set1_ps(w[r]);
  for (; d + 16 <= hd; d += 16) {
    const __m512 x = _mm512_loadu_ps(v + d);
    for (int r = 0; r < N; ++r) {
      float* o = acc + size_t(r) * hd + d;
      _mm512_storeu_ps(o, _mm512_fmadd_ps(wv[r], x, _mm512_loadu_ps(o)));
    }
  }
#elif defined(PKV_AVX2)
  __m256 wv[N];
  for (int r = 0; r < N; ++r) wv[r] = _mm256_set1_ps(w[r]);
  for (; d + 8 <= hd; d += 8) {
    const __m256 x = _mm256_loadu_ps(v + d);
    for (int r = 0; r < N; ++r) {
      float* o = acc + size_t(r) * hd + d;
      _mm256_storeu_ps(o, _mm256_fmadd_ps(wv[r], x, _mm256_loadu_ps(o)));
    }
  }
#endif
  for (; d < hd; ++d)
    for (int r = 0; r < N; ++r) acc[size_t(r) * hd + d] += w[r] * v[d];
}

// The n (any count) heads of a group against one row, four at a time.
inline void group_dots(const float* q, int n, int hd, const float* k, float* s) {
  int r = 0;
  for (; r + 4 <= n; r += 4) dots_n<4>(q + size_t(r) * hd, hd, k, s + r);
  switch (n - r) {
    case 3: dots_n<3>(q + size_t(r) * hd, hd, k, s + r); break;
    case 2: dots_n<2>(q + size_t(r) * hd, hd, k, s + r); break;
    case 1: dots_n<1>(q + size_t(r) * hd, hd, k, s + r); break;
    default: break;
  }
}

inline void group_axpys(float* acc, int n, int hd, const float* w, const float* v) {
  int r = 0;
  for (; r + 4 <= n; r += 4) axpys_n<4>(acc + size_t(r) * hd, hd, w + r, v);
  switch (n - r) {
    case 3: axpys_n<3>(acc + size_t(r) * hd, hd, w + r, v); break;
    case 2: axpys_n<2>(acc + size_t(r) * hd, hd, w + r, v); break;
    case 1: axpys_n<1>(acc + size_t(r) * hd, hd, w + r, v); break;
    default: break;
  }
}

struct DecodePlan {
  int group, hd, qs, os, n_blocks, heads_per_chunk, n_chunks;
  bool causal;
  // Partials, [n_q][n_blocks][n_heads] (acc: x head_dim): the block's max score, sum of exponentials
  // and output sum.
  float *m, *l, *acc;
  // With importance: every (query, head, entry)'s scaled score, [n_q][n_heads][n_kv]; null without.
  float* scores;
  float *M, *inv_L;  // per (query, head) after combining
};

// One item: query i, KV heads [g0, g1), entries [j0, j0 + jn).
void decode_item(const AttentionArgs& a, const DecodePlan& P, size_t it, std::vector<float>& buf) {
  const int G = P.group, hd = P.hd;
  const int i = int(it / (size_t(P.n_chunks) * P.n_blocks));
  const int c = int(it / size_t(P.n_blocks) % size_t(P.n_chunks)), b = int(it % size_t(P.n_blocks));
  const int g0 = c * P.heads_per_chunk, g1 = std::min(a.n_kv_heads, g0 + P.heads_per_chunk);
  const int j0 = b * kDecodeBlock, jn = std::min(kDecodeBlock, a.n_kv - j0);
  const int h0 = g0 * G, nh = (g1 - g0) * G;
  // buf: scores [nh][kDecodeBlock] (unless kept for importance), exponentials [nh][kDecodeBlock],
  // a converted row segment [hd], the weights of one row [G].
  buf.resize(size_t(nh) * kDecodeBlock * 2 + size_t(hd) + size_t(G));
  float* local = buf.data();
  float* ex = local + size_t(nh) * kDecodeBlock;
  float* row = ex + size_t(nh) * kDecodeBlock;
  float* w = row + hd;
  auto score_row = [&](int hl) -> float* {  // head h0 + hl's scores for the block (index j - j0)
    return P.scores ? P.scores + (size_t(i) * a.n_heads + size_t(h0 + hl)) * a.n_kv + j0 : local + size_t(hl) * kDecodeBlock;
  };
  auto visible = [&](int j) { return !P.causal || a.kv_pos[j] <= a.q_pos[i]; };
  // A row segment as float32; first the software prefetch of the bytes kPrefetch further on (the
  // next segments when the chunk is whole rows, as it is for long caches): the dot products and
  // updates leave the hardware's prefetchers behind (pkv_bench_cpu_attention, 7B layer at 2800
  // entries: 16-bit 25-35% faster, float32 10-15%). A prefetch never faults, past the end included.
  constexpr size_t kPrefetch = 4096;
  const size_t seg_bytes = size_t(hd) * (a.kv_dtype == DType::F32 ? 4 : 2);
  auto segment = [&](const float* f32, const uint16_t* b16, int j, int g) -> const float* {
    const size_t off = size_t(j) * a.kv_stride + size_t(g) * hd;
    const char* p = a.kv_dtype == DType::F32 ? reinterpret_cast<const char*>(f32 + off) : reinterpret_cast<const char*>(b16 + off);
    for (size_t o = 0; o < seg_bytes; o += 64) __builtin_prefetch(p + kPrefetch + o, 0, 3);
    if (a.kv_dtype == DType::F32) return f32 + off;
    kv_row_f32(a.kv_dtype, b16 + off, row, hd);
    return row;
  };
  const float* qi = a.q + size_t(i) * P.qs;
  // Keys: every row of the block once, all heads of the chunk.
  for (int jj = 0; jj < jn; ++jj) {
    const int j = j0 + jj;
    if (!visible(j)) {
      for (int hl = 0; hl < nh; ++hl) score_row(hl)[jj] = -INFINITY;
      continue;
    }
    for (int g = g0; g < g1; ++g) {
      group_dots(qi + size_t(g) * G * hd, G, hd, segment(a.k, a.k16, j, g), w);
      for (int r = 0; r < G; ++r) score_row((g - g0) * G + r)[jj] = w[r] * a.scale;
    }
  }
  // The block's softmax, per head.
  const size_t pb = (size_t(i) * P.n_blocks + size_t(b)) * a.n_heads;  // partials of (i, b)
  for (int hl = 0; hl < nh; ++hl) {
    const float* s = score_row(hl);
    float mx = -INFINITY;
    for (int jj = 0; jj < jn; ++jj) mx = std::max(mx, s[jj]);
    float sum = 0;
    float* e = ex + size_t(hl) * kDecodeBlock;
    for (int jj = 0; jj < jn; ++jj) {
      e[jj] = s[jj] == -INFINITY ? 0.f : std::exp(s[jj] - mx);
      sum += e[jj];
    }
    P.m[pb + size_t(h0 + hl)] = mx;
    P.l[pb + size_t(h0 + hl)] = sum;
    std::fill_n(P.acc + (pb + size_t(h0 + hl)) * hd, hd, 0.f);
  }
  // Values: every row of the block once, added into all heads of the chunk.
  for (int jj = 0; jj < jn; ++jj) {
    const int j = j0 + jj;
    if (!visible(j)) continue;
    for (int g = g0; g < g1; ++g) {
      for (int r = 0; r < G; ++r) w[r] = ex[size_t((g - g0) * G + r) * kDecodeBlock + jj];
      group_axpys(P.acc + (pb + size_t(g) * G) * hd, G, hd, w, segment(a.v, a.v16, j, g));
    }
  }
}

void attention_decode(const AttentionArgs& a) {
  const int nthreads = num_threads();
  DecodePlan P;
  P.group = a.n_heads / a.n_kv_heads;
  P.hd = a.head_dim;
  P.qs = a.q_stride ? a.q_stride : a.n_heads * a.head_dim;
  P.os = a.out_stride ? a.out_stride : a.n_heads * a.head_dim;
  P.causal = a.q_pos && a.kv_pos;
  P.n_blocks = (a.n_kv + kDecodeBlock - 1) / kDecodeBlock;
  // All KV heads in one chunk (whole rows, read in order) unless that leaves fewer than 8 items a
  // thread (a short cache: the threads' shares would differ by a large part of an item).
  const int want = (8 * nthreads + a.n_q * P.n_blocks - 1) / (a.n_q * P.n_blocks);
  P.n_chunks = std::max(1, std::min(a.n_kv_heads, want));
  P.heads_per_chunk = (a.n_kv_heads + P.n_chunks - 1) / P.n_chunks;
  P.n_chunks = (a.n_kv_heads + P.heads_per_chunk - 1) / P.heads_per_chunk;
  const size_t nqh = size_t(a.n_q) * a.n_heads, parts = nqh * P.n_blocks;
  // Reused between calls (this thread's; the workers are given pointers).
  static thread_local std::vector<float> scratch;
  const size_t n_scores = a.importance ? nqh * a.n_kv : 0;
  scratch.resize(parts * (2 + size_t(a.head_dim)) + n_scores + 2 * nqh);
  P.m = scratch.data();
  P.l = P.m + parts;
  P.acc = P.l + parts;
  P.scores = a.importance ? P.acc + parts * a.head_dim : nullptr;
  P.M = P.acc + parts * a.head_dim + n_scores;
  P.inv_L = P.M + nqh;
  const size_t items = size_t(a.n_q) * P.n_chunks * P.n_blocks;
  parallel_for(items, 1, [&](size_t b, size_t e, int) {
    std::vector<float> buf;
    for (size_t it = b; it < e; ++it) decode_item(a, P, it, buf);
  });
  // Combine the blocks per (query, head), in block order; on this thread when that is little work
  // (the bundled model's layer at 700 entries: 8 heads x 11 blocks x 32), where waking the workers
  // again would cost more.
  const int hd = a.head_dim;
  auto combine = [&](size_t b, size_t e, int) {
    for (size_t x = b; x < e; ++x) {
      const int i = int(x / size_t(a.n_heads)), h = int(x % size_t(a.n_heads));
      float* o = a.out + size_t(i) * P.os + size_t(h) * hd;
      auto part = [&](int blk) { return (size_t(i) * P.n_blocks + size_t(blk)) * a.n_heads + size_t(h); };
      float mx = -INFINITY;
      for (int blk = 0; blk < P.n_blocks; ++blk) mx = std::max(mx, P.m[part(blk)]);
      std::fill(o, o + hd, 0.f);
      P.M[x] = mx;
      P.inv_L[x] = 0.f;
      if (mx == -INFINITY) continue;  // no visible entry: zeros, as the blocked path gives
      float L = 0;
      for (int blk = 0; blk < P.n_blocks; ++blk) {
        const float m = P.m[part(blk)];
        if (m == -INFINITY) continue;
        const float cb = std::exp(m - mx);
        L += cb * P.l[part(blk)];
        const float* acc = P.acc + part(blk) * hd;
        for (int d = 0; d < hd; ++d) o[d] += cb * acc[d];
      }
      const float inv = 1.f / L;
      for (int d = 0; d < hd; ++d) o[d] *= inv;
      P.inv_L[x] = inv;
    }
  };
  if (parts * hd < (size_t(1) << 16)) combine(0, nqh, 0);
  else parallel_for(nqh, 4, combine);
  if (!a.importance) return;
  // Importance: per entry, the probabilities of the counted queries and the heads (all, or those of
  // the entry's KV head) summed in that order, then added to the caller's value; one thread per entry.
  const float imp_div = float(a.importance_per_kv_head ? P.group : a.n_heads);
  const int rows = a.importance_per_kv_head ? a.n_kv_heads : 1, heads_per_row = a.n_heads / rows;
  parallel_for(size_t(a.n_kv), 64, [&](size_t b, size_t e, int) {
    for (int row = 0; row < rows; ++row)
      for (size_t j = b; j < e; ++j) {
        float t = 0;
        for (int i = std::max(0, a.importance_from); i < a.n_q; ++i)
          for (int h = row * heads_per_row; h < (row + 1) * heads_per_row; ++h) {
            const size_t x = size_t(i) * a.n_heads + size_t(h);
            const float s = P.scores[x * a.n_kv + j];
            if (s == -INFINITY || P.M[x] == -INFINITY) continue;
            t += std::exp(s - P.M[x]) * P.inv_L[x] / imp_div;
          }
        a.importance[size_t(row) * a.n_kv + j] += t;
      }
  });
}

}  // namespace

void attention_rows(const AttentionArgs& a, const float* weight, int n_out, int from, float* rows) {
  const int H = a.n_heads, hd = a.head_dim, group = H / a.n_kv_heads;
  const int qs = a.q_stride ? a.q_stride : H * hd, kvs = a.kv_stride ? a.kv_stride : a.n_kv_heads * hd;
  const bool causal = a.q_pos && a.kv_pos;
  PKV_ASSERT(a.kv_dtype == DType::F32 && a.k && n_out <= a.n_kv && from >= 0);
  if (from >= a.n_q) return;
  std::fill_n(rows, size_t(a.n_q - from) * n_out, 0.f);
  std::vector<double> p(static_cast<size_t>(a.n_kv));
  for (int i = from; i < a.n_q; ++i)
    for (int h = 0; h < H; ++h) {
      const float* qv = a.q + size_t(i) * qs + size_t(h) * hd;
      double mx = -INFINITY;
      int seen = 0;
      for (int j = 0; j < a.n_kv; ++j) {
        if (causal && a.kv_pos[j] > a.q_pos[i]) break;  // positions increase
        double s = 0;
        for (int d = 0; d < hd; ++d) s += double(qv[d]) * a.k[size_t(j) * kvs + size_t(h / group) * hd + d];
        p[size_t(j)] = s * a.scale;
        mx = std::max(mx, p[size_t(j)]);
        seen = j + 1;
      }
      double sum = 0;
      for (int j = 0; j < seen; ++j) sum += p[size_t(j)] = std::exp(p[size_t(j)] - mx);
      float* o = rows + size_t(i - from) * n_out;
      for (int j = 0; j < std::min(seen, n_out); ++j) {
        const double wt = weight ? double(weight[size_t(h) * n_out + j]) : 1.0;
        o[j] += float(p[size_t(j)] / sum * wt / H);
      }
    }
}

void output_gram(const TensorView& W, int n_heads, int head_dim, float* out) {
  const int H = n_heads, hd = head_dim, qd = H * hd;
  PKV_ASSERT(W.shape.size() == 2 && W.shape[1] == qd);
  const int D = int(W.shape[0]);
  constexpr int kTile = 64;  // rows of W_o read before they are scattered into wt's columns
  std::vector<float> rows(size_t(kTile) * qd), wt(size_t(qd) * D);
  // wt [qd, D]: row i is W_o's column i, so rows h hd ... (h+1) hd - 1 are (W_o^h)^T.
  // (A row at a time would write each float 4*D bytes from the last: a tile of rows writes runs of kTile.)
  for (int e0 = 0; e0 < D; e0 += kTile) {
    const int n = std::min(kTile, D - e0);
    for (int r = 0; r < n; ++r) weight_row(W, e0 + r, qd, rows.data() + size_t(r) * qd);
    for (int i = 0; i < qd; ++i) {
      float* dst = wt.data() + size_t(i) * D + e0;
      for (int r = 0; r < n; ++r) dst[r] = rows[size_t(r) * qd + size_t(i)];
    }
  }
  TensorView view;  // one head's (W_o^h)^T [head_dim, hidden] as float32 weights
  view.name = "W_o^h^T";
  view.dtype_str = "F32";
  view.supported = true;
  view.dtype = DType::F32;
  view.shape = {hd, D};
  for (int h = 0; h < H; ++h) {
    // G_h = (W_o^h)^T ((W_o^h)^T)^T: linear() multiplies rows by the transposed weight.
    const float* a = wt.data() + size_t(h) * hd * D;
    view.data = a;
    Linear lin;
    lin.w = &view;
    lin.in = D;
    lin.out = hd;
    linear(a, hd, lin, out + size_t(h) * hd * hd);
  }
}

void value_weights(const float* v, int n, int kv_stride, int n_heads, int n_kv_heads, int head_dim, const float* gram,
                   float* out) {
  const int H = n_heads, hd = head_dim, group = H / n_kv_heads;
  if (n <= 0) return;
  if (!gram) {
    for (int h = 0; h < H; ++h)
      for (int j = 0; j < n; ++j) {
        const float* x = v + size_t(j) * kv_stride + size_t(h / group) * hd;
        double s = 0;
        for (int d = 0; d < hd; ++d) s += std::fabs(x[d]);
        out[size_t(h) * n + j] = float(s);
      }
    return;
  }
  // y [n, group hd] = each value of KV head g times the G_h of g's query heads (consecutive in
  // gram; G_h is symmetric, so the weight's transpose linear() takes is G_h itself).
  TensorView view;
  view.name = "value weights";
  view.dtype_str = "F32";
  view.supported = true;
  view.dtype = DType::F32;
  view.shape = {int64_t(group) * hd, hd};
  Linear lin;
  lin.w = &view;
  lin.in = hd;
  lin.out = group * hd;
  std::vector<float> vg(size_t(n) * hd), y(size_t(n) * group * hd);
  for (int g = 0; g < n_kv_heads; ++g) {
    for (int j = 0; j < n; ++j) std::copy_n(v + size_t(j) * kv_stride + size_t(g) * hd, hd, vg.data() + size_t(j) * hd);
    view.data = gram + size_t(g) * group * hd * hd;
    linear(vg.data(), n, lin, y.data());
    for (int j = 0; j < n; ++j) {
      const float* x = vg.data() + size_t(j) * hd;
      for (int k = 0; k < group; ++k) {
        const float* yk = y.data() + (size_t(j) * group + size_t(k)) * hd;
        double s = 0;
        for (int d = 0; d < hd; ++d) s += double(x[d]) * yk[d];
        out[size_t(g * group + k) * n + j] = float(std::sqrt(std::max(0.0, s)));
      }
    }
  }
}

void attention(const AttentionArgs& a) {
  PKV_ASSERT(a.n_heads % a.n_kv_heads == 0);
  if (a.importance && (a.importance_weight || a.importance_max)) {
    // The extended importance: the attention without importance, then the weighted rows.
    PKV_ASSERT_MSG(!a.importance_per_kv_head, "weighted or max importance per KV head");
    AttentionArgs b = a;
    b.importance = nullptr, b.importance_weight = nullptr, b.importance_max = false;
    attention(b);
    const int from = std::max(0, a.importance_from);
    if (from >= a.n_q || a.n_kv <= 0) return;
    std::vector<float> rows(size_t(a.n_q - from) * a.n_kv);
    attention_rows(a, a.importance_weight, a.n_kv, from, rows.data());
    for (int i = 0; i < a.n_q - from; ++i) {
      const float* r = rows.data() + size_t(i) * a.n_kv;
      for (int j = 0; j < a.n_kv; ++j) a.importance[j] = a.importance_max ? std::max(a.importance[j], r[j]) : a.importance[j] + r[j];
    }
    return;
  }
  PKV_ASSERT(a.kv_dtype == DType::F32 ? a.k && a.v : a.k16 && a.v16);
  if (a.n_q >= 16) return attention_blocked(a);
  if (a.n_q <= 0 || a.n_kv <= 0) {
    // Nothing to attend to: zeros, as the blocked path gives.
    const int os = a.out_stride ? a.out_stride : a.n_heads * a.head_dim;
    for (int i = 0; i < a.n_q; ++i) std::fill_n(a.out + size_t(i) * os, size_t(a.n_heads) * a.head_dim, 0.f);
    return;
  }
  attention_decode(a);
}

}  // namespace pkv::ops
