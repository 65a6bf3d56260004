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

inline float dot_bf16(const float* a, const uint16_t* b, int n) {
#ifdef PKV_AVX2
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int i = 0;
  for (; i + 16 <= n; i += 16) {
    __m256i w0 = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + i))), 16);
    __m256i w1 = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + i + 8))), 16);
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_castsi256_ps(w0), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_castsi256_ps(w1), acc1);
  }
  float s = hsum256(_mm256_add_ps(acc0, acc1));
  for (; i < n; ++i) s += a[i] * bf16_to_f32(b[i]);
  return s;
#else
  float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) s[j] += a[i + j] * bf16_to_f32(b[i + j]);
  for (; i < n; ++i) s[0] += a[i] * bf16_to_f32(b[i]);
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
#endif
}

inline float dot_f16(const float* a, const uint16_t* b, int n) {
#ifdef PKV_AVX2
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int i = 0;
  for (; i + 16 <= n; i += 16) {
    __m256 w0 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + i)));
    __m256 w1 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + i + 8)));
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), w0, acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), w1, acc1);
  }
  float s = hsum256(_mm256_add_ps(acc0, acc1));
  for (; i < n; ++i) s += a[i] * f16_to_f32(b[i]);
  return s;
#else
  float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) s[j] += a[i + j] * f16_to_f32(b[i + j]);
  for (; i < n; ++i) s[0] += a[i] * f16_to_f32(b[i]);
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
#endif
}

// Four dot products against one 16-bit weight row, each bit-identical to dot_bf16 / dot_f16 on its
// own (the same two accumulators per row, the same order, the same tail): the weights are converted
// once per 16 elements and used for all four rows, so a batch reads each weight row once.
inline void dot4_16(DType t, const float* x, size_t stride, const uint16_t* w, int n, float* out) {
#ifdef PKV_AVX2
  __m256 acc[4][2];
  for (auto& r : acc) r[0] = r[1] = _mm256_setzero_ps();
  int i = 0;
  for (; i + 16 <= n; i += 16) {
    __m256 w0, w1;
    if (t == DType::BF16) {
      w0 = _mm256_castsi256_ps(
          _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + i))), 16));
      w1 = _mm256_castsi256_ps(
          _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + i + 8))), 16));
    } else {
      w0 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + i)));
      w1 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + i + 8)));
    }
    for (int r = 0; r < 4; ++r) {
      const float* xr = x + size_t(r) * stride;
      acc[r][0] = _mm256_fmadd_ps(_mm256_loadu_ps(xr + i), w0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(_mm256_loadu_ps(xr + i + 8), w1, acc[r][1]);
    }
  }
  for (int r = 0; r < 4; ++r) {
    const float* xr = x + size_t(r) * stride;
    float s = hsum256(_mm256_add_ps(acc[r][0], acc[r][1]));
    for (int j = i; j < n; ++j) s += xr[j] * (t == DType::BF16 ? bf16_to_f32(w[j]) : f16_to_f32(w[j]));
    out[r] = s;
  }
#else
  for (int r = 0; r < 4; ++r)
    out[r] = t == DType::BF16 ? dot_bf16(x + size_t(r) * stride, w, n) : dot_f16(x + size_t(r) * stride, w, n);
#endif
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
  if (!L.b.empty())
    for (int r = 0; r < rows; ++r)
      for (int o = 0; o < out; ++o) y[size_t(r) * out + o] += L.b[size_t(o)];
}

}  // namespace

// The most rows linear() multiplies by 16-bit dot products rather than BLAS over converted blocks.
constexpr int kDotRows = 16;

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
  if (rows <= 2 && W.dtype != DType::F32 && !W.quant) {
    // Decode: a matrix-vector product reading 16-bit weights directly.
    const uint16_t* w16 = static_cast<const uint16_t*>(W.data);
    parallel_for(size_t(out), 16, [&](size_t b, size_t e, int) {
      for (int r = 0; r < rows; ++r)
        for (size_t o = b; o < e; ++o)
          y[size_t(r) * out + o] = W.dtype == DType::BF16 ? dot_bf16(x + size_t(r) * in, w16 + o * size_t(in), in)
                                                          : dot_f16(x + size_t(r) * in, w16 + o * size_t(in), in);
    });
  } else {
    // Blocks of output features: each thread converts its block of W (when 16-bit) into scratch and
    // multiplies it with all rows of x through BLAS.
    const int block = std::max(16, std::min(256, (out + num_threads() - 1) / num_threads()));
    const int n_blocks = (out + block - 1) / block;
    parallel_for(size_t(n_blocks), 1, [&](size_t b, size_t e, int) {
      // Declared here, in the code the workers run: a thread_local declared in linear() itself is
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
  if (!L.b.empty())
    for (int r = 0; r < rows; ++r)
      for (int o = 0; o < out; ++o) y[size_t(r) * out + o] += L.b[size_t(o)];
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
        dot4_16(W.dtype, x + size_t(r) * in, size_t(in), wo, in, four);
        for (int k = 0; k < 4; ++k) y[size_t(r + k) * out + o] = four[k];
      }
      for (; r < rows; ++r)
        y[size_t(r) * out + o] =
            W.dtype == DType::BF16 ? dot_bf16(x + size_t(r) * in, wo, in) : dot_f16(x + size_t(r) * in, wo, in);
    }
  });
  if (!L.b.empty())
    for (int r = 0; r < rows; ++r)
      for (int o = 0; o < out; ++o) y[size_t(r) * out + o] += L.b[size_t(o)];
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

// The few-query path over a 16-bit cache (AttentionArgs::kv_dtype): items [b, e) of attention()'s
// (query, head) items, importance into imp_all (this thread's part, or null). Consecutive items of
// one query whose heads share a KV head (a group) run together, and each tile of kTile rows of
// that KV head is converted to float32 once for all of them. Every item still computes what
// attention() computes for it over float32 rows, in the same order: its scores, its softmax, its
// output summed over the entries in order, and each entry's importance gets the items' shares in
// item order. So the result is bit for bit attention() over a float32 cache of the same values.
void attend_items_16(const AttentionArgs& a, size_t b, size_t e, float* imp_all) {
  constexpr int kTile = 32;
  const int group = a.n_heads / a.n_kv_heads, hd = a.head_dim;
  const int qs = a.q_stride ? a.q_stride : a.n_heads * hd;
  const int os = a.out_stride ? a.out_stride : a.n_heads * hd;
  const bool causal = a.q_pos && a.kv_pos;
  const float imp_div = float(a.importance_per_kv_head ? group : a.n_heads);
  std::vector<float> p(size_t(group) * a.n_kv), tile(size_t(kTile) * hd);
  std::vector<float> mx(static_cast<size_t>(group)), inv(static_cast<size_t>(group));
  for (size_t it = b; it < e;) {
    const int i = int(it / size_t(a.n_heads)), h0 = int(it % size_t(a.n_heads)), g = h0 / group;
    int n = 1;  // the run: items it .. it + n - 1, one query, heads of KV head g
    while (it + size_t(n) < e && h0 + n < (g + 1) * group) ++n;
    float* imp = imp_all && a.importance_per_kv_head ? imp_all + size_t(g) * a.n_kv : imp_all;
    const bool count = imp && i >= a.importance_from;
    // Scores, a tile of keys at a time.
    std::fill(mx.begin(), mx.end(), -INFINITY);
    for (int j0 = 0; j0 < a.n_kv; j0 += kTile) {
      const int jn = std::min(kTile, a.n_kv - j0);
      for (int j = 0; j < jn; ++j)
        kv_row_f32(a.kv_dtype, a.k16 + size_t(j0 + j) * a.kv_stride + size_t(g) * hd, tile.data() + size_t(j) * hd, hd);
      for (int r = 0; r < n; ++r) {
        const float* qv = a.q + size_t(i) * qs + size_t(h0 + r) * hd;
        float* pr = p.data() + size_t(r) * a.n_kv;
        for (int j = j0; j < j0 + jn; ++j) {
          if (causal && a.kv_pos[j] > a.q_pos[i]) {
            pr[j] = -INFINITY;
            continue;
          }
          const float sc = dot_f32(qv, tile.data() + size_t(j - j0) * hd, hd) * a.scale;
          pr[j] = sc;
          mx[size_t(r)] = std::max(mx[size_t(r)], sc);
        }
      }
    }
    for (int r = 0; r < n; ++r) {
      float* pr = p.data() + size_t(r) * a.n_kv;
      float sum = 0;
      for (int j = 0; j < a.n_kv; ++j) {
        const float ev = pr[j] == -INFINITY ? 0.f : std::exp(pr[j] - mx[size_t(r)]);
        pr[j] = ev;
        sum += ev;
      }
      inv[size_t(r)] = 1.f / sum;
      float* o = a.out + size_t(i) * os + size_t(h0 + r) * hd;
      std::fill(o, o + hd, 0.f);
    }
    // Outputs, a tile of values at a time.
    for (int j0 = 0; j0 < a.n_kv; j0 += kTile) {
      const int jn = std::min(kTile, a.n_kv - j0);
      for (int j = 0; j < jn; ++j)
        kv_row_f32(a.kv_dtype, a.v16 + size_t(j0 + j) * a.kv_stride + size_t(g) * hd, tile.data() + size_t(j) * hd, hd);
      for (int j = j0; j < j0 + jn; ++j)
        for (int r = 0; r < n; ++r) {
          const float w = p[size_t(r) * a.n_kv + size_t(j)] * inv[size_t(r)];
          if (w == 0.f) continue;
          const float* vv = tile.data() + size_t(j - j0) * hd;
          float* o = a.out + size_t(i) * os + size_t(h0 + r) * hd;
          for (int d = 0; d < hd; ++d) o[d] += w * vv[d];
          if (count) imp[j] += w / imp_div;
        }
    }
    it += size_t(n);
  }
}

}  // namespace

void attention(const AttentionArgs& a) {
  PKV_ASSERT(a.n_heads % a.n_kv_heads == 0);
  PKV_ASSERT(a.kv_dtype == DType::F32 ? a.k && a.v : a.k16 && a.v16);
  if (a.n_q >= 16) return attention_blocked(a);
  const int group = a.n_heads / a.n_kv_heads;
  const int qs = a.q_stride ? a.q_stride : a.n_heads * a.head_dim;
  const int os = a.out_stride ? a.out_stride : a.n_heads * a.head_dim;
  const size_t items = size_t(a.n_q) * a.n_heads;
  const bool causal = a.q_pos && a.kv_pos;
  const int nthreads = num_threads();
  std::vector<std::vector<float>> imp_parts;
  if (a.importance) imp_parts.assign(size_t(nthreads), std::vector<float>());
  const size_t imp_len = size_t(a.n_kv) * (a.importance_per_kv_head ? size_t(a.n_kv_heads) : 1);
  const float imp_div = float(a.importance_per_kv_head ? group : a.n_heads);
  parallel_for(items, 4, [&](size_t b, size_t e, int tid) {
    float* imp_all = nullptr;
    if (a.importance) {
      imp_parts[size_t(tid)].assign(imp_len, 0.f);
      imp_all = imp_parts[size_t(tid)].data();
    }
    if (a.kv_dtype != DType::F32) return attend_items_16(a, b, e, imp_all);
    std::vector<float> p(size_t(a.n_kv));
    for (size_t it = b; it < e; ++it) {
      const int i = int(it / size_t(a.n_heads)), h = int(it % size_t(a.n_heads));
      const int g = h / group;
      float* imp = imp_all && a.importance_per_kv_head ? imp_all + size_t(g) * a.n_kv : imp_all;
      const float* qv = a.q + size_t(i) * qs + size_t(h) * a.head_dim;
      float* o = a.out + size_t(i) * os + size_t(h) * a.head_dim;
      float mx = -INFINITY;
      for (int j = 0; j < a.n_kv; ++j) {
        if (causal && a.kv_pos[j] > a.q_pos[i]) {
          p[size_t(j)] = -INFINITY;
          continue;
        }
        const float sc = dot_f32(qv, a.k + size_t(j) * a.kv_stride + size_t(g) * a.head_dim, a.head_dim) * a.scale;
        p[size_t(j)] = sc;
        mx = std::max(mx, sc);
      }
      float sum = 0;
      for (int j = 0; j < a.n_kv; ++j) {
        const float ev = p[size_t(j)] == -INFINITY ? 0.f : std::exp(p[size_t(j)] - mx);
        p[size_t(j)] = ev;
        sum += ev;
      }
      const float inv = 1.f / sum;
      std::fill(o, o + a.head_dim, 0.f);
      for (int j = 0; j < a.n_kv; ++j) {
        const float w = p[size_t(j)] * inv;
        if (w == 0.f) continue;
        const float* vv = a.v + size_t(j) * a.kv_stride + size_t(g) * a.head_dim;
        for (int d = 0; d < a.head_dim; ++d) o[d] += w * vv[d];
        if (imp && i >= a.importance_from) imp[j] += w / imp_div;
      }
    }
  });
  if (a.importance)
    for (auto& part : imp_parts)
      for (size_t j = 0; j < part.size(); ++j) a.importance[j] += part[j];
}

}  // namespace pkv::ops
