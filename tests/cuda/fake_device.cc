// A host stand-in for the CUDA back end's public API (src/ops/cuda/device.h, kernels.h), so that the
// code written against it (src/model/gpu_model.cc, src/engine/gpu_session.cc) and its tests
// (tests/cuda/test_gpu_model.cc) run without a GPU: pkv_cuda_model_emu_tests.
//
// "Device" memory is host memory, counted against a limit (PKV_FAKE_DEVICE_MIB, default 2048) so
// out-of-memory paths run too. The operators keep the GPU operators' contracts: the same argument
// checks (the launch plans of src/ops/cuda/plan.cc where there is one), the same storage types and one
// rounding at the store. The arithmetic is the CPU twins' (src/ops) for the element-wise operators,
// the products and the attention; the paged-KV operators run the REAL kernel bodies
// (src/ops/cuda/paged_body.h) through the block emulator (emu.h), so do the value weights of wov2 and
// the Gram matrices (their plans, bodies and cuBLAS products: emu_products.h), and decode attention reads the pool
// exactly as documented in kernels.h (tables, slots, positions, lengths, the error flag). What this
// checks is the orchestration: shapes, strides, offsets, block tables, rows, lengths, workspaces.
#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "core/error.h"
#include "ops/cuda/device.h"
#include "ops/cuda/kernels.h"
#include "emu.h"  // before the bodies: atomicOr
#include "emu_products.h"
#include "ops/cuda/paged_body.h"
#include "ops/cuda/plan.h"
#include "ops/ops.h"
#include "ops/quant.h"

namespace pkv::cuda {

namespace {

size_t limit_bytes() {
  static const size_t lim = [] {
    const char* v = std::getenv("PKV_FAKE_DEVICE_MIB");
    const long mib = v && *v ? std::atol(v) : 2048;
    return size_t(mib > 0 ? mib : 2048) << 20;
  }();
  return lim;
}
size_t g_used = 0;

std::string gib(size_t bytes) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.2f GiB", double(bytes) / (1024.0 * 1024.0 * 1024.0));
  return buf;
}

float ld(DType t, const void* p, size_t i) { return emu::load(t, p, int64_t(i)); }
void st(DType t, void* p, size_t i, float v) {
  switch (t) {
    case DType::F32: static_cast<float*>(p)[i] = v; return;
    case DType::F16: static_cast<uint16_t*>(p)[i] = f32_to_f16(v); return;
    case DType::BF16: static_cast<uint16_t*>(p)[i] = f32_to_bf16(v); return;
  }
}

float act_fn(float x, ops::Act a) {
  switch (a) {
    case ops::Act::Gelu: return 0.5f * x * (1.f + std::erf(x * 0.70710678118654752f));
    case ops::Act::GeluTanh: return 0.5f * x * (1.f + std::tanh(0.7978845608028654f * (x + 0.044715f * x * x * x)));
    case ops::Act::QuickGelu: return x / (1.f + std::exp(-1.702f * x));
    case ops::Act::Silu: return x / (1.f + std::exp(-x));
    case ops::Act::Relu: return x > 0.f ? x : 0.f;
  }
  return x;
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// device.h

int device_count() { return 1; }
void set_device(int index) {
  if (index != 0) fail("fake device", "device " + std::to_string(index) + " does not exist (one fake device)");
}
std::string device_summary() { return "fake device (host memory, CPU twins; " + gib(limit_bytes()) + ")"; }
size_t device_free_bytes() { return limit_bytes() - g_used; }
size_t device_total_bytes() { return limit_bytes(); }
void device_synchronize() {}
double measure_copy_bandwidth(size_t) { return 0; }
void stream_synchronize(void*) {}

DeviceBuffer::DeviceBuffer(size_t bytes, const std::string& what) : what_(what) {
  if (bytes == 0) return;
  if (bytes > limit_bytes() - g_used)
    fail("device memory", "out of device memory: cannot allocate " + std::to_string(bytes) + " bytes (" + gib(bytes) +
                              ") for " + what + " (free " + gib(limit_bytes() - g_used) + " of " + gib(limit_bytes()) + ")");
  const size_t n = (bytes + 255) / 256 * 256;
  void* p = std::aligned_alloc(256, n);
  if (!p) fail("fake device", "host allocation failed");
  if (n <= (size_t(64) << 20)) std::memset(p, 0xA5, n);  // garbage, as fresh device memory (big ones untouched)
  ptr_ = p;
  bytes_ = bytes;
  g_used += bytes;
}
DeviceBuffer::~DeviceBuffer() { reset(); }
DeviceBuffer::DeviceBuffer(DeviceBuffer&& o) noexcept
    : ptr_(std::exchange(o.ptr_, nullptr)), bytes_(std::exchange(o.bytes_, 0)), what_(std::move(o.what_)) {}
DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& o) noexcept {
  if (this != &o) {
    reset();
    ptr_ = std::exchange(o.ptr_, nullptr);
    bytes_ = std::exchange(o.bytes_, 0);
    what_ = std::move(o.what_);
  }
  return *this;
}
void DeviceBuffer::upload(const void* host, size_t n, size_t offset) {
  if (n == 0) return;
  if (offset > bytes_ || n > bytes_ - offset) fail("device memory", "upload overruns " + what_);
  std::memcpy(static_cast<char*>(ptr_) + offset, host, n);
}
void DeviceBuffer::download(void* host, size_t n, size_t offset) const {
  if (n == 0) return;
  if (offset > bytes_ || n > bytes_ - offset) fail("device memory", "download overruns " + what_);
  std::memcpy(host, static_cast<const char*>(ptr_) + offset, n);
}
void DeviceBuffer::fill_bytes(int value) {
  if (bytes_) std::memset(ptr_, value, bytes_);
}
void DeviceBuffer::reset() {
  if (ptr_) {
    std::free(ptr_);
    g_used -= bytes_;
  }
  ptr_ = nullptr;
  bytes_ = 0;
}

Stream::Stream() { s_ = nullptr; }
Stream::~Stream() = default;
Stream::Stream(Stream&& o) noexcept : s_(std::exchange(o.s_, nullptr)) {}
Stream& Stream::operator=(Stream&& o) noexcept {
  s_ = std::exchange(o.s_, nullptr);
  return *this;
}
void Stream::synchronize() const {}

// Graphs: capture keeps the enqueue function (nothing runs), launch runs it. As on the GPU, the
// values it was given are those of the capture; device memory is read at each replay.
StreamGraph::~StreamGraph() = default;
void StreamGraph::capture(void*, const std::function<void()>& enqueue) {
  replay_ = enqueue;
  exec_ = this;
  ++captures_;
  if (instantiations_ == 0) ++instantiations_;
}
void StreamGraph::launch(void*) {
  if (!exec_) fail("cuda::StreamGraph", "launch before any capture");
  replay_();
}
bool stream_capturing(void*) { return false; }
PinnedBuffer::~PinnedBuffer() { std::free(ptr_); }
void* PinnedBuffer::need(size_t bytes) {
  if (bytes <= bytes_ && ptr_) return ptr_;
  std::free(ptr_);
  bytes_ = std::max<size_t>(bytes, 64);
  ptr_ = std::malloc(bytes_);
  if (!ptr_) fail("fake device", "out of host memory");
  return ptr_;
}
StreamTimer::StreamTimer() = default;
StreamTimer::~StreamTimer() = default;
void StreamTimer::start(void*) {}
void StreamTimer::stop(void*) {}
double StreamTimer::elapsed_ms() const { return 0; }

void copy_to_device(void* dst, const void* src, size_t bytes, void*) {
  if (bytes) std::memcpy(dst, src, bytes);
}
void copy_to_host(void* dst, const void* src, size_t bytes, void*) {
  if (bytes) std::memcpy(dst, src, bytes);
}
void copy_on_device(void* dst, const void* src, size_t bytes, void*) {
  if (bytes) std::memmove(dst, src, bytes);
}
void copy_2d_on_device(void* dst, size_t dst_pitch, const void* src, size_t src_pitch, size_t width, size_t rows,
                       void*) {
  for (size_t r = 0; r < rows; ++r)
    std::memmove(static_cast<char*>(dst) + r * dst_pitch, static_cast<const char*>(src) + r * src_pitch, width);
}
void memset_device(void* dst, int value, size_t bytes, void*) {
  if (bytes) std::memset(dst, value, bytes);
}

// ------------------------------------------------------------------------------------------------
// Element-wise operators (the formulas of elementwise.cu).

void rms_norm(DType t, const void* x, void* y, const float* w, int rows, int dim, float eps, void* s) {
  rms_norm_to(t, x, t, y, w, rows, dim, eps, s);
}

void rms_norm_to(DType t, const void* x, DType yt, void* y, const float* w, int rows, int dim, float eps, void*) {
  if (rows < 0 || dim < 1) fail("cuda::rms_norm", "bad rows/dim");
  for (int r = 0; r < rows; ++r) {
    float ss = 0.f;
    for (int i = 0; i < dim; ++i) {
      const float v = ld(t, x, size_t(r) * dim + i);
      ss += v * v;
    }
    const float inv = 1.f / std::sqrt(ss / float(dim) + eps);
    for (int i = 0; i < dim; ++i) st(yt, y, size_t(r) * dim + i, w[i] * (ld(t, x, size_t(r) * dim + i) * inv));
  }
}

void layer_norm(DType t, const void* x, void* y, const float* w, const float* b, int rows, int dim, float eps, void*) {
  if (rows < 0 || dim < 1) fail("cuda::layer_norm", "bad rows/dim");
  for (int r = 0; r < rows; ++r) {
    float s = 0.f;
    for (int i = 0; i < dim; ++i) s += ld(t, x, size_t(r) * dim + i);
    const float mean = s / float(dim);
    float var = 0.f;
    for (int i = 0; i < dim; ++i) {
      const float d = ld(t, x, size_t(r) * dim + i) - mean;
      var += d * d;
    }
    const float inv = 1.f / std::sqrt(var / float(dim) + eps);
    for (int i = 0; i < dim; ++i)
      st(t, y, size_t(r) * dim + i, (ld(t, x, size_t(r) * dim + i) - mean) * inv * w[i] + b[i]);
  }
}

void add(DType t, const void* a, const void* b, void* out, size_t n, void*) {
  for (size_t i = 0; i < n; ++i) st(t, out, i, ld(t, a, i) + ld(t, b, i));
}
void add_bias(DType t, void* y, const float* bias, int rows, int cols, void*) {
  if (rows < 0 || cols < 1) fail("cuda::add_bias", "bad rows/cols");
  for (size_t i = 0; i < size_t(rows) * cols; ++i) st(t, y, i, ld(t, y, i) + bias[i % size_t(cols)]);
}
void activate(DType t, void* x, size_t n, ops::Act act, void*) {
  for (size_t i = 0; i < n; ++i) st(t, x, i, act_fn(ld(t, x, i), act));
}
void swiglu(DType t, void* gate, const void* up, size_t n, void*) {
  for (size_t i = 0; i < n; ++i) {
    const float g = ld(t, gate, i);
    st(t, gate, i, g / (1.f + std::exp(-g)) * ld(t, up, i));
  }
}

void rope(DType t, void* x, int rows, int n_heads, int head_dim, int64_t row_stride, const int32_t* pos,
          const float* inv_freq, void*) {
  if (head_dim < 2 || head_dim % 2 != 0) fail("cuda::rope", "head_dim must be even and >= 2");
  if (rows < 0 || n_heads < 1) fail("cuda::rope", "rows must be >= 0 and n_heads >= 1");
  const int64_t stride = row_stride ? row_stride : int64_t(n_heads) * head_dim;
  if (stride < int64_t(n_heads) * head_dim) fail("cuda::rope", "row_stride is smaller than n_heads * head_dim");
  const int half = head_dim / 2;
  for (int r = 0; r < rows; ++r)
    for (int h = 0; h < n_heads; ++h)
      for (int i = 0; i < half; ++i) {
        const float ang = float(pos[r]) * inv_freq[i];
        const float c = std::cos(ang), s = std::sin(ang);
        const size_t o = size_t(r) * size_t(stride) + size_t(h) * head_dim;
        const float a = ld(t, x, o + i), b = ld(t, x, o + i + half);
        st(t, x, o + i, a * c - b * s);
        st(t, x, o + i + half, b * c + a * s);
      }
}

void embedding(DType table_t, const void* table, int vocab, int dim, const int32_t* ids, int n, DType out_t, void* out,
               void*) {
  if (vocab < 1 || dim < 1 || n < 0) fail("cuda::embedding", "needs vocab >= 1, dim >= 1, n >= 0");
  for (int r = 0; r < n; ++r) {
    const bool ok = ids[r] >= 0 && ids[r] < vocab;
    for (int i = 0; i < dim; ++i)
      st(out_t, out, size_t(r) * dim + i, ok ? ld(table_t, table, size_t(ids[r]) * dim + i) : 0.f);
  }
}

void convert(DType src_t, const void* src, DType dst_t, void* dst, size_t n, void*) {
  for (size_t i = 0; i < n; ++i) st(dst_t, dst, i, ld(src_t, src, i));
}

void max_pool_1d(const float* x, float* y, int rows, int n, int kernel, void*) {
  if (kernel < 1 || kernel % 2 == 0) fail("cuda::max_pool_1d", "kernel must be odd and >= 1");
  const int r = kernel / 2;
  for (int row = 0; row < rows; ++row)
    for (int i = 0; i < n; ++i) {
      float m = x[size_t(row) * n + i];
      for (int j = std::max(0, i - r); j <= std::min(n - 1, i + r); ++j) m = std::max(m, x[size_t(row) * n + j]);
      y[size_t(row) * n + i] = m;
    }
}

// ------------------------------------------------------------------------------------------------
// Products (gemm.cc's contract; the CPU twin's arithmetic).

Blas::Blas(void* stream) : stream_(stream) {}
Blas::~Blas() = default;
void Blas::set_stream(void* stream) { stream_ = stream; }
float* Blas::f32_workspace(size_t floats) {
  if (ws_.bytes() < floats * sizeof(float)) ws_ = DeviceBuffer(floats * sizeof(float), "cuBLAS float32 scratch");
  return ws_.as<float>();
}
void* Blas::weight_workspace(size_t bytes) {
  if (wq_.bytes() < bytes) {
    wq_.reset();
    wq_ = DeviceBuffer(bytes, "dequantised weight scratch (one matrix)");
  }
  return wq_.data();
}

// Quantised rows: the plan's checks, then the CPU's dequantiser (the GPU's decoders are the same).
void dequantize_rows(const DequantArgs& a, void*) {
  const detail::DequantPlan plan = detail::plan_dequantize(a);
  const detail::DequantParams& p = plan.params;
  const size_t row_bytes = quant::row_bytes(a.quant, a.cols);
  std::vector<float> row(size_t(a.cols));
  for (int r = 0; r < p.n; ++r) {
    const int64_t src = p.ids ? p.ids[r] : r;
    if (src >= 0 && src < p.rows) quant::dequantize_row(a.quant, static_cast<const uint8_t*>(p.w) + size_t(src) * row_bytes, row.data(), a.cols);
    else std::fill(row.begin(), row.end(), 0.f);
    for (int i = 0; i < a.cols; ++i) st(a.out_dtype, p.out, size_t(r) * size_t(p.out_stride) + i, row[size_t(i)]);
  }
}

void linear(Blas& blas, const LinearArgs& a) {
  const char* op = "cuda::linear";
  if (a.rows < 0 || a.in < 1 || a.out < 1) fail(op, "needs rows >= 0, in >= 1, out >= 1");
  const bool ok_types = (a.w_dtype == DType::F32 && a.y_dtype == DType::F32) ||
                        (a.w_dtype != DType::F32 && (a.y_dtype == a.w_dtype || a.y_dtype == DType::F32));
  if (!ok_types) fail(op, "unsupported types");
  const int64_t x_stride = a.x_stride ? a.x_stride : a.in, y_stride = a.y_stride ? a.y_stride : a.out;
  if (x_stride < a.in || y_stride < a.out) fail(op, "a row stride is smaller than the row");
  if (a.rows == 0) return;
  if (!a.x || !a.w || !a.y) fail(op, "x, w and y must be set");
  if (a.bias && y_stride != a.out) fail(op, "a bias needs dense y rows (y_stride == out)");
  if (a.bias && a.accumulate && a.y_dtype != DType::F32) fail(op, "accumulate with a bias needs a float32 y");
  std::vector<float> xf(size_t(a.rows) * a.in), prod(size_t(a.rows) * a.out);
  for (int r = 0; r < a.rows; ++r)
    for (int i = 0; i < a.in; ++i) xf[size_t(r) * a.in + i] = ld(a.w_dtype, a.x, size_t(r) * size_t(x_stride) + i);
  if (a.w_quant) {
    const std::string why = quant_misfit(a.w_quant, a.in);
    if (!why.empty()) fail(op, why);
  }
  TensorView tv;
  tv.name = "fake linear weight";
  tv.dtype = a.w_dtype;
  tv.quant = a.w_quant;  // ops::linear dequantises block-quantised rows
  tv.supported = true;
  tv.shape = {a.out, a.in};
  tv.data = a.w;
  Linear L;
  L.w = &tv;
  L.in = a.in;
  L.out = a.out;
  // Row by row in effect (each row's dot products are the same whatever the row count): a row's
  // result must not depend on which other rows share the call, as on the GPU a prompt prefilled
  // alone and in a batched pass is compared token for token (GpuServe, GpuPrefill); ops::linear
  // itself takes dot products for up to 16 rows and BLAS beyond.
  ops::linear_rows(xf.data(), a.rows, L, prod.data());
  for (int r = 0; r < a.rows; ++r)
    for (int o = 0; o < a.out; ++o) {
      const size_t yi = size_t(r) * size_t(y_stride) + o;
      float v = prod[size_t(r) * a.out + o];
      if (a.accumulate) v += ld(a.y_dtype, a.y, yi);
      if (a.bias) v += a.bias[o];
      st(a.y_dtype, a.y, yi, v);
    }
  (void)blas;
}

bool gemv_enabled() { return true; }

namespace {
// gemv's and skinny's contract (GemvArgs) in double: the twin's arithmetic up to summation order.
void products_in_double(const GemvArgs& a) {
  struct {
    const void *x, *w, *w_up;
    void* y;
    int rows, in, out, accumulate;
    int64_t x_stride, y_stride;
  } p{a.x, a.w, a.w_up, a.y, a.rows, a.in, a.out, a.accumulate ? 1 : 0, a.x_stride ? a.x_stride : a.in,
      a.y_stride ? a.y_stride : a.out};
  // Weight rows as float (block-quantised ones through the CPU's dequantiser).
  std::vector<float> wrow(size_t(p.in)), urow(size_t(p.in));
  auto weight_row = [&](const void* w, int o, std::vector<float>& dst) {
    if (a.w_quant) {
      const size_t rb = quant::row_bytes(a.w_quant, p.in);
      quant::dequantize_row(a.w_quant, static_cast<const uint8_t*>(w) + size_t(o) * rb, dst.data(), p.in);
    } else {
      for (int i = 0; i < p.in; ++i) dst[size_t(i)] = ld(a.w_dtype, w, size_t(o) * size_t(p.in) + i);
    }
  };
  for (int r = 0; r < p.rows; ++r)
    for (int o = 0; o < p.out; ++o) {
      double g = 0, u = 0;
      weight_row(p.w, o, wrow);
      if (p.w_up) weight_row(p.w_up, o, urow);
      for (int i = 0; i < p.in; ++i) {
        const double xv = ld(a.w_dtype, p.x, size_t(r) * size_t(p.x_stride) + i);
        g += xv * wrow[size_t(i)];
        if (p.w_up) u += xv * urow[size_t(i)];
      }
      float v = p.w_up ? float(g / (1.0 + std::exp(-g)) * u) : float(g);
      const size_t yi = size_t(r) * size_t(p.y_stride) + o;
      if (p.accumulate) v += ld(a.y_dtype, p.y, yi);
      st(a.y_dtype, p.y, yi, v);
    }
}
}  // namespace

// The plans' checks, then the products in double.
void gemv(const GemvArgs& a, void*) {
  (void)detail::plan_gemv(a);
  products_in_double(a);
}

// On here (on a GPU only with PKV_SKINNY=1): the model's skinny path keeps its orchestration tested.
bool skinny_enabled() { return true; }

Blas::SkinnyWorkspace Blas::skinny_workspace(size_t bytes) {
  constexpr int kCounters = 4096;
  if (skinny_ws_.bytes() < bytes) {
    skinny_ws_.reset();
    skinny_ws_ = DeviceBuffer(bytes, "skinny products' partial sums");
  }
  if (skinny_counters_.empty()) skinny_counters_ = DeviceBuffer(kCounters * sizeof(unsigned), "skinny products' counters");
  return {skinny_ws_.as<float>(), skinny_counters_.as<unsigned>(), kCounters};
}

void skinny(const GemvArgs& a, Blas& blas) {
  const detail::SkinnyPlan plan = detail::plan_skinny(a);
  if (plan.partial_bytes) (void)blas.skinny_workspace(plan.partial_bytes);  // what the GPU would allocate
  products_in_double(a);
}

// ------------------------------------------------------------------------------------------------
// Attention: the plans' argument checks, then ops::attention (the CPU twin) on float copies.

void attention_prefill(const PrefillAttentionArgs& a, void*) {
  const detail::PrefillPlan plan = detail::plan_attention_prefill(a);
  if (a.n_q == 0) return;
  const detail::PrefillParams& p = plan.params;
  const int hd = a.head_dim, qd = a.n_heads * hd, kvd = a.n_kv_heads * hd;
  std::vector<float> q(size_t(a.n_q) * qd), k(size_t(a.n_kv) * kvd), v(k.size()), out(q.size());
  for (int i = 0; i < a.n_q; ++i)
    for (int c = 0; c < qd; ++c) q[size_t(i) * qd + c] = ld(a.dtype, a.q, size_t(i) * size_t(p.q_stride) + c);
  for (int j = 0; j < a.n_kv; ++j)
    for (int c = 0; c < kvd; ++c) {
      k[size_t(j) * kvd + c] = ld(a.dtype, a.k, size_t(j) * size_t(p.kv_stride) + c);
      v[size_t(j) * kvd + c] = ld(a.dtype, a.v, size_t(j) * size_t(p.kv_stride) + c);
    }
  ops::AttentionArgs o;
  o.q = q.data(), o.n_q = a.n_q, o.q_pos = a.q_pos;
  o.k = k.data(), o.v = v.data(), o.n_kv = a.n_kv, o.kv_stride = kvd, o.kv_pos = a.kv_pos;
  o.n_heads = a.n_heads, o.n_kv_heads = a.n_kv_heads, o.head_dim = hd, o.scale = a.scale;
  o.out = out.data();
  if (plan.importance) o.importance = a.importance, o.importance_from = a.importance_from;
  o.importance_per_kv_head = a.importance_per_kv_head;
  o.importance_weight = a.importance_weight, o.importance_max = a.importance_max;
  ops::attention(o);
  for (int i = 0; i < a.n_q; ++i)
    for (int c = 0; c < qd; ++c) st(a.dtype, a.out, size_t(i) * size_t(p.out_stride) + c, out[size_t(i) * qd + c]);
}

// vnorm: the CPU twin. wov2: the GPU's plan (values to float32, the strided batched product over KV
// heads, the dots), its bodies emulated and its product computed on the host (emu_products.h).
void value_weights(Blas&, const ValueWeightArgs& a) {
  const detail::ValueWeightPlan plan = detail::plan_value_weights(a);  // checks, workspace included
  if (a.n_kv == 0) return;
  if (a.gram) return emu::value_weights(a);
  const int kvd = a.n_kv_heads * a.head_dim;
  std::vector<float> v(size_t(a.n_kv) * kvd);
  for (int j = 0; j < a.n_kv; ++j)
    for (int c = 0; c < kvd; ++c) v[size_t(j) * kvd + c] = ld(a.dtype, a.v, size_t(j) * size_t(plan.params.kv_stride) + c);
  ops::value_weights(v.data(), a.n_kv, kvd, a.n_heads, a.n_kv_heads, a.head_dim, nullptr, a.out);
}

void output_gram(Blas&, const OutputGramArgs& a) { emu::output_gram(a); }

void attention_decode(const DecodeAttentionArgs& a, void*) {
  const detail::DecodePlan plan = detail::plan_attention_decode(a);  // checks, workspace included
  if (a.batch == 0) return;
  const detail::DecodeParams& p = plan.params;
  const PagedKV& kv = a.kv;
  const int hd = a.head_dim, qd = a.n_heads * hd, kvd = kv.kv_dim;
  for (int b = 0; b < a.batch; ++b) {
    if (a.heads.per_head && a.heads.per_head[b]) {
      // Head tables: each KV head over its own entries (kernels.h, PagedHeads), its group's query heads.
      const int H = a.n_kv_heads, group = a.n_heads / H, bs = kv.block_size;
      for (int g = 0; g < H; ++g) {
        const int row = b * H + g;
        int len = a.heads.lengths[row];
        const int cap = kv.table_stride * bs;
        if (len > cap || len > a.max_len || len < 0) {
          if (kv.error_flag) *kv.error_flag |= kPagedBadEntry;
          len = std::clamp(len, 0, std::min(cap, a.max_len));
        }
        std::vector<float> q(size_t(group) * hd), k(size_t(len) * hd), v(k.size()), out(q.size(), 0.f);
        std::vector<int32_t> pos(static_cast<size_t>(len), 0);
        for (int c = 0; c < group * hd; ++c) q[size_t(c)] = ld(kv.dtype, a.q, size_t(b) * size_t(p.q_stride) + size_t(g) * group * hd + c);
        for (int e = 0; e < len; ++e) {
          const int sb = a.heads.tables[int64_t(row) * kv.table_stride + e / bs];
          if (sb < 0 || sb >= kv.n_blocks * H) {
            if (kv.error_flag) *kv.error_flag |= kPagedBadBlock;
            pos[size_t(e)] = INT_MAX;
            continue;
          }
          const size_t koff = size_t(sb / H) * 2 * bs * kvd + (size_t(sb % H) * bs + size_t(e % bs)) * hd;
          for (int c = 0; c < hd; ++c) {
            k[size_t(e) * hd + c] = ld(kv.dtype, kv.pool, koff + c);
            v[size_t(e) * hd + c] = ld(kv.dtype, kv.pool, koff + size_t(kv.block_size) * kvd + c);
          }
        }
        int32_t qpos = INT_MAX - 1;
        ops::AttentionArgs o;
        o.q = q.data(), o.n_q = 1, o.q_pos = &qpos;
        o.k = k.data(), o.v = v.data(), o.n_kv = len, o.kv_stride = hd, o.kv_pos = pos.data();
        o.n_heads = group, o.n_kv_heads = 1, o.head_dim = hd, o.scale = a.scale;
        o.out = out.data();
        if (len > 0) ops::attention(o);
        for (int c = 0; c < group * hd; ++c)
          st(kv.dtype, a.out, size_t(b) * size_t(p.out_stride) + size_t(g) * group * hd + c, out[size_t(c)]);
      }
      continue;
    }
    int len = a.lengths[b];
    const int cap = kv.table_stride * kv.block_size;
    if (len > cap || len > a.max_len || len < 0) {
      if (kv.error_flag) *kv.error_flag |= kPagedBadEntry;
      len = std::clamp(len, 0, std::min(cap, a.max_len));
    }
    std::vector<float> q(static_cast<size_t>(qd)), k(size_t(len) * kvd), v(k.size()), out(static_cast<size_t>(qd), 0.f),
        imp(static_cast<size_t>(len), 0.f);
    std::vector<int32_t> pos(static_cast<size_t>(len));
    for (int c = 0; c < qd; ++c) q[size_t(c)] = ld(kv.dtype, a.q, size_t(b) * size_t(p.q_stride) + c);
    for (int e = 0; e < len; ++e) {
      const int blk = kv.tables[int64_t(b) * kv.table_stride + e / kv.block_size];
      if (blk < 0 || blk >= kv.n_blocks) {
        if (kv.error_flag) *kv.error_flag |= kPagedBadBlock;
        pos[size_t(e)] = INT_MAX;  // masked, as the kernel skips it
        continue;
      }
      const int slot = e % kv.block_size;
      const size_t koff = (size_t(blk) * 2 * kv.block_size + slot) * kvd, voff = koff + size_t(kv.block_size) * kvd;
      for (int c = 0; c < kvd; ++c) {
        k[size_t(e) * kvd + c] = ld(kv.dtype, kv.pool, koff + c);
        v[size_t(e) * kvd + c] = ld(kv.dtype, kv.pool, voff + c);
      }
      pos[size_t(e)] = kv.positions[size_t(blk) * kv.block_size + slot];
    }
    int32_t qpos = a.q_pos ? a.q_pos[b] : INT_MAX - 1;
    ops::AttentionArgs o;
    o.q = q.data(), o.n_q = 1, o.q_pos = &qpos;
    o.k = k.data(), o.v = v.data(), o.n_kv = len, o.kv_stride = kvd, o.kv_pos = pos.data();
    o.n_heads = a.n_heads, o.n_kv_heads = a.n_kv_heads, o.head_dim = hd, o.scale = a.scale;
    o.out = out.data();
    if (a.importance) o.importance = imp.data();
    if (len > 0) ops::attention(o);
    for (int c = 0; c < qd; ++c) st(kv.dtype, a.out, size_t(b) * size_t(p.out_stride) + c, out[size_t(c)]);
    if (a.importance)
      for (int e = 0; e < len; ++e) a.importance[int64_t(b) * a.importance_stride + e] += imp[size_t(e)];
  }
}

// ------------------------------------------------------------------------------------------------
// The paged KV operators: the real kernel bodies, emulated.

void paged_kv_write(const PagedKV& kv, const PagedRows& rows, DType src_dtype, const void* k, const void* v,
                    int64_t src_stride, const int32_t* pos, void*) {
  const detail::PagedPlan plan = detail::plan_paged_write(kv, rows, src_dtype, k, v, src_stride, pos);
  if (plan.launch.empty()) return;
  const detail::PagedParams& p = plan.params;
  auto run = [&](auto tag) {
    using T = decltype(tag);
    switch (plan.src_dtype) {
      case DType::F32: return emu::run(plan.launch, [&](emu::Ctx& c) { detail::paged_write<T, float>(c, p); });
      case DType::F16: return emu::run(plan.launch, [&](emu::Ctx& c) { detail::paged_write<T, __half>(c, p); });
      case DType::BF16: return emu::run(plan.launch, [&](emu::Ctx& c) { detail::paged_write<T, __nv_bfloat16>(c, p); });
    }
  };
  if (plan.dtype == DType::F16) run(__half{});
  else run(__nv_bfloat16{});
}

void paged_kv_read(const PagedKV& kv, const PagedRows& rows, void* k, void* v, int32_t* pos, void*) {
  const detail::PagedPlan plan = detail::plan_paged_read(kv, rows, k, v, pos);
  if (plan.launch.empty()) return;
  if (plan.dtype == DType::F16) emu::run(plan.launch, [&](emu::Ctx& c) { detail::paged_read<__half>(c, plan.params); });
  else emu::run(plan.launch, [&](emu::Ctx& c) { detail::paged_read<__nv_bfloat16>(c, plan.params); });
}

void paged_kv_rope_write(const PagedKV& kv, const PagedRows& rows, const RopeWriteArgs& a, void*) {
  const detail::PagedPlan plan = detail::plan_paged_rope_write(kv, rows, a);
  if (plan.launch.empty()) return;
  if (plan.dtype == DType::F16) emu::run(plan.launch, [&](emu::Ctx& c) { detail::paged_rope_write<__half>(c, plan.params); });
  else emu::run(plan.launch, [&](emu::Ctx& c) { detail::paged_rope_write<__nv_bfloat16>(c, plan.params); });
}

void paged_kv_compact(const PagedKV& kv, const PagedJobs& jobs, void*) {
  const detail::PagedPlan plan = detail::plan_paged_compact(kv, jobs);
  if (plan.launch.empty()) return;
  emu::run(plan.launch, [&](emu::Ctx& c) { detail::paged_compact(c, plan.params); });
}

void paged_kv_head_compact(const PagedKV& kv, const PagedHeadJobs& jobs, void*) {
  const detail::PagedPlan plan = detail::plan_paged_head_compact(kv, jobs);
  if (plan.launch.empty()) return;
  emu::run(plan.launch, [&](emu::Ctx& c) { detail::paged_head_compact(c, plan.params); });
}

void paged_kv_merge(const PagedKV& kv, const PagedJobs& jobs, void*) {
  const detail::PagedPlan plan = detail::plan_paged_merge(kv, jobs);
  if (plan.launch.empty()) return;
  if (plan.dtype == DType::F16) emu::run(plan.launch, [&](emu::Ctx& c) { detail::paged_merge<__half>(c, plan.params); });
  else emu::run(plan.launch, [&](emu::Ctx& c) { detail::paged_merge<__nv_bfloat16>(c, plan.params); });
}

}  // namespace pkv::cuda
