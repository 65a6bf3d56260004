// Matrix products through cuBLAS (y = x W^T + b), the twin of ops::linear.
#include <cstdlib>
#include <string>

#include <cuda_runtime.h>

#include "core/error.h"
#include "ops/cuda/cuda_check.h"
#include "ops/cuda/kernels.h"
#include "ops/cuda/plan.h"

namespace pkv::cuda {

namespace {

cudaDataType_t cuda_type(DType t) {
  switch (t) {
    case DType::F32: return CUDA_R_32F;
    case DType::F16: return CUDA_R_16F;
    case DType::BF16: return CUDA_R_16BF;
  }
  return CUDA_R_32F;
}

}  // namespace

bool gemv_enabled() {
  static const bool on = [] {
    const char* v = std::getenv("PKV_GEMV");
    return !(v && std::string(v) == "0");
  }();
  return on;
}

Blas::Blas(void* stream) : stream_(stream) {
  cublasHandle_t h = nullptr;
  PKV_CUBLAS_CHECK(cublasCreate(&h));
  cublasStatus_t st = cublasSetStream(h, static_cast<cudaStream_t>(stream));
  if (st != CUBLAS_STATUS_SUCCESS) {
    cublasDestroy(h);
    cublas_failed(st, "cublasSetStream(h, stream)", __FILE__, __LINE__);
  }
  // By default cuBLAS may sum split-K partial products in the 16-bit output type; with K in the
  // thousands that costs 1e-2 relative error on small outputs (seen on the H100). Keep them in fp32.
  st = cublasSetMathMode(h, CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION);
  if (st != CUBLAS_STATUS_SUCCESS) {
    cublasDestroy(h);
    cublas_failed(st, "cublasSetMathMode(h, CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION)", __FILE__, __LINE__);
  }
  // A workspace of our own (32 MiB, what cuBLAS's documentation suggests for Hopper): products
  // captured into a CUDA graph then never allocate.
  try {
    cublas_ws_ = DeviceBuffer(size_t(32) << 20, "cuBLAS workspace");
  } catch (...) {
    cublasDestroy(h);
    throw;
  }
  st = cublasSetWorkspace(h, cublas_ws_.data(), cublas_ws_.bytes());
  if (st != CUBLAS_STATUS_SUCCESS) {
    cublasDestroy(h);
    cublas_failed(st, "cublasSetWorkspace(h, ws, 32 MiB)", __FILE__, __LINE__);
  }
  handle_ = h;
}

Blas::~Blas() {
  if (handle_) cublasDestroy(static_cast<cublasHandle_t>(handle_));
}

void Blas::set_stream(void* stream) {
  PKV_CUBLAS_CHECK(cublasSetStream(static_cast<cublasHandle_t>(handle_), static_cast<cudaStream_t>(stream)));
  stream_ = stream;
}

float* Blas::f32_workspace(size_t floats) {
  if (ws_.bytes() < floats * sizeof(float)) {
    if (!ws_.empty()) PKV_CUDA_CHECK(cudaStreamSynchronize(static_cast<cudaStream_t>(stream_)));
    ws_ = DeviceBuffer(floats * sizeof(float), "cuBLAS float32 scratch");
  }
  return ws_.as<float>();
}

Blas::SkinnyWorkspace Blas::skinny_workspace(size_t bytes) {
  constexpr int kCounters = 4096;  // blocks of 128 outputs: products up to 524288 wide
  if (skinny_ws_.bytes() < bytes || skinny_counters_.empty()) {
    cudaStreamCaptureStatus st = cudaStreamCaptureStatusNone;
    PKV_CUDA_CHECK(cudaStreamIsCapturing(static_cast<cudaStream_t>(stream_), &st));
    if (st != cudaStreamCaptureStatusNone)
      fail("cuda::skinny", "its workspace must grow to " + std::to_string(bytes) +
                               " bytes while a CUDA graph is being captured (size it first: skinny_workspace_bytes)");
    if (!skinny_ws_.empty() || !skinny_counters_.empty())
      PKV_CUDA_CHECK(cudaStreamSynchronize(static_cast<cudaStream_t>(stream_)));
    if (skinny_ws_.bytes() < bytes) {
      skinny_ws_.reset();
      skinny_ws_ = DeviceBuffer(bytes, "skinny products' partial sums");
    }
    if (skinny_counters_.empty()) {
      skinny_counters_ = DeviceBuffer(kCounters * sizeof(unsigned), "skinny products' counters");
      PKV_CUDA_CHECK(cudaMemsetAsync(skinny_counters_.data(), 0, kCounters * sizeof(unsigned),
                                     static_cast<cudaStream_t>(stream_)));
    }
  }
  return {skinny_ws_.as<float>(), skinny_counters_.as<unsigned>(), kCounters};
}

void* Blas::weight_workspace(size_t bytes) {
  if (wq_.bytes() < bytes) {
    if (!wq_.empty()) PKV_CUDA_CHECK(cudaStreamSynchronize(static_cast<cudaStream_t>(stream_)));
    wq_.reset();
    wq_ = DeviceBuffer(bytes, "dequantised weight scratch (one matrix)");
  }
  return wq_.data();
}

// A block-quantised W: a few rows read the blocks (gemv); more rows multiply a dequantised copy of
// this one matrix (blas.weight_workspace) through cuBLAS.
static void linear_quant(Blas& blas, const LinearArgs& a) {
  if (a.w_dtype != DType::F16 && a.w_dtype != DType::BF16)
    fail("cuda::linear", std::string("with quantised weights x must be F16 or BF16, got ") + dtype_name(a.w_dtype));
  if (!a.bias && a.rows <= gemv_auto_rows(a.w_quant) && gemv_enabled()) {
    GemvArgs g;
    g.x = a.x, g.x_stride = a.x_stride, g.w = a.w, g.w_quant = a.w_quant, g.w_dtype = a.w_dtype;
    g.rows = a.rows, g.in = a.in, g.out = a.out;
    g.y = a.y, g.y_stride = a.y_stride, g.y_dtype = a.y_dtype, g.accumulate = a.accumulate;
    if (gemv_fits(g)) return gemv(g, blas.stream());
  }
  DequantArgs d;
  d.quant = a.w_quant, d.w = a.w, d.rows = a.out, d.cols = a.in, d.n = a.out, d.out_dtype = a.w_dtype;
  d.out = blas.weight_workspace(size_t(a.out) * size_t(a.in) * dtype_size(a.w_dtype));
  dequantize_rows(d, blas.stream());
  LinearArgs dense = a;
  dense.w = d.out, dense.w_quant = 0;
  linear(blas, dense);
}

void linear(Blas& blas, const LinearArgs& a) {
  const char* op = "cuda::linear";
  if (a.rows < 0 || a.in < 1 || a.out < 1)
    fail(op, "needs rows >= 0, in >= 1, out >= 1; got " + std::to_string(a.rows) + ", " + std::to_string(a.in) + ", " +
                 std::to_string(a.out));
  const bool ok_types = (a.w_dtype == DType::F32 && a.y_dtype == DType::F32) ||
                        (a.w_dtype != DType::F32 && (a.y_dtype == a.w_dtype || a.y_dtype == DType::F32));
  if (!ok_types)
    fail(op, std::string("unsupported types: W and x ") + dtype_name(a.w_dtype) + ", y " + dtype_name(a.y_dtype) +
                 " (W, x F16 -> y F16/F32; BF16 -> BF16/F32; F32 -> F32)");
  const int64_t x_stride = a.x_stride ? a.x_stride : a.in, y_stride = a.y_stride ? a.y_stride : a.out;
  if (x_stride < a.in || y_stride < a.out) fail(op, "a row stride is smaller than the row");
  if (a.rows == 0) return;
  if (!a.x || !a.w || !a.y) fail(op, "x, w and y must be set");
  if (a.w_quant) return linear_quant(blas, a);
  if (!a.bias && a.rows <= kSkinnyMaxRows) {
    GemvArgs g;
    g.x = a.x, g.x_stride = x_stride, g.w = a.w, g.w_dtype = a.w_dtype;
    g.rows = a.rows, g.in = a.in, g.out = a.out;
    g.y = a.y, g.y_stride = y_stride, g.y_dtype = a.y_dtype, g.accumulate = a.accumulate;
    if (a.rows <= kGemvAutoRows && gemv_enabled() && gemv_fits(g)) return gemv(g, blas.stream());
    if (a.rows > kGemvAutoRows && skinny_enabled() && skinny_fits(g)) return skinny(g, blas);
  }

  const auto h = static_cast<cublasHandle_t>(blas.handle());
  auto gemm = [&](void* y, DType yt, int64_t ldy, float beta) {
    // Row-major y[rows, out] is column-major y^T[out, rows] = W[out, in] (column-major W^T,
    // transposed) times x^T[in, rows] (column-major x).
    const float alpha = 1.f;
    PKV_CUBLAS_CHECK(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, a.out, a.rows, a.in, &alpha, a.w, cuda_type(a.w_dtype),
                                  a.in, a.x, cuda_type(a.w_dtype), int(x_stride), &beta, y, cuda_type(yt), int(ldy),
                                  CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  };
  if (!a.bias) {
    gemm(a.y, a.y_dtype, y_stride, a.accumulate ? 1.f : 0.f);
    return;
  }
  if (y_stride != a.out) fail(op, "a bias needs dense y rows (y_stride == out)");
  if (a.y_dtype == DType::F32) {
    gemm(a.y, DType::F32, y_stride, a.accumulate ? 1.f : 0.f);
    add_bias(DType::F32, a.y, a.bias, a.rows, a.out, blas.stream());
    return;
  }
  // 16-bit y: product and bias in float32, one rounding at the end. (cuBLAS rounds the product to
  // the output type before adding beta * y, so neither "bias into y, then beta = 1" nor "product,
  // then + bias" rounds once; with outputs that cancel against the bias that cost 1e-2 relative
  // error in tests/cuda on the H100.)
  if (a.accumulate)
    fail(op, std::string("accumulate with a bias needs a float32 y (a ") + dtype_name(a.y_dtype) +
                 " y would be rounded twice)");
  const size_t n = size_t(a.rows) * size_t(a.out);
  float* ws = blas.f32_workspace(n);
  gemm(ws, DType::F32, a.out, 0.f);
  add_bias(DType::F32, ws, a.bias, a.rows, a.out, blas.stream());
  convert(DType::F32, ws, a.y_dtype, a.y, n, blas.stream());
}

namespace detail {

void run_strided_gemm(Blas& blas, const StridedGemm& g) {
  if (g.m < 1 || g.n < 1 || g.k < 1 || g.batch < 1) return;
  const int64_t most = 0x7fffffff;
  if (g.lda > most || g.ldb > most || g.ldc > most)
    fail("cuda::strided_gemm", "a leading dimension exceeds cuBLAS's int range");
  const auto h = static_cast<cublasHandle_t>(blas.handle());
  const float alpha = 1.f, beta = 0.f;
  // Float32 accumulation. With float32 inputs that is plain float32 multiply-adds: the handle's math
  // mode (Blas: the default, no CUBLAS_TF32_TENSOR_OP_MATH) never rounds them to TF32, so the error
  // bound of kernels.h (value_weights) is float32's.
  const cublasComputeType_t compute = CUBLAS_COMPUTE_32F;
  PKV_CUBLAS_CHECK(cublasGemmStridedBatchedEx(
      h, g.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, g.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, g.m, g.n, g.k, &alpha, g.a,
      cuda_type(g.ab_dtype), int(g.lda), g.stride_a, g.b, cuda_type(g.ab_dtype), int(g.ldb), g.stride_b, &beta, g.c,
      CUDA_R_32F, int(g.ldc), g.stride_c, g.batch, compute, CUBLAS_GEMM_DEFAULT));
}

}  // namespace detail

void output_gram(Blas& blas, const OutputGramArgs& a) { detail::run_strided_gemm(blas, detail::plan_output_gram(a)); }

}  // namespace pkv::cuda
