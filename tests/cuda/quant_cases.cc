#include "quant_cases.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <sstream>

#include "core/dtype.h"
#include "core/error.h"
#include "ops/cuda/plan.h"
#include "ops/quant.h"

namespace pkv::cuda::test {
namespace {

constexpr double kU = 1.0 / (1 << 24);  // float32's unit roundoff

double gamma_n(int n) { return n * kU / (1 - n * kU); }
// Unit roundoff of a 16-bit storage type (0 for float32).
double unit16(DType t) { return t == DType::F16 ? 1.0 / 2048 : t == DType::BF16 ? 1.0 / 256 : 0.0; }

std::vector<float> randn(std::mt19937& rng, size_t n, float scale = 1.f) {
  std::normal_distribution<float> d(0.f, scale);
  std::vector<float> x(n);
  for (float& v : x) v = d(rng);
  return x;
}

std::string qname(uint32_t t) {
  switch (t) {
    case quant::kQ8_0: return "Q8_0";
    case quant::kQ4_0: return "Q4_0";
    case quant::kQ4_K: return "Q4_K";
    case quant::kQ6_K: return "Q6_K";
  }
  return "ggml type " + std::to_string(t);
}

// Rows of ggml blocks -> float32 [rows, cols] (the CPU's dequantiser).
std::vector<float> dequantised(uint32_t type, const std::vector<uint8_t>& q, int rows, int cols) {
  std::vector<float> w(size_t(rows) * cols);
  const size_t rb = quant::row_bytes(type, cols);
  for (int r = 0; r < rows; ++r) quant::dequantize_row(type, q.data() + size_t(r) * rb, &w[size_t(r) * cols], cols);
  return w;
}

// Product of x rows (stride xs) with w^T in double, and the sum of |x_i w_i| of each output.
void products(const std::vector<float>& x, int64_t xs, const std::vector<float>& w, int rows, int in, int out,
              std::vector<double>& y, std::vector<double>& mag) {
  y.assign(size_t(rows) * out, 0.0);
  mag.assign(y.size(), 0.0);
  for (int r = 0; r < rows; ++r)
    for (int o = 0; o < out; ++o) {
      double s = 0, m = 0;
      for (int i = 0; i < in; ++i) {
        const double t = double(x[size_t(r) * xs + i]) * double(w[size_t(o) * in + i]);
        s += t, m += std::fabs(t);
      }
      y[size_t(r) * out + o] = s, mag[size_t(r) * out + o] = m;
    }
}

// Every element within its bound; prints the worst ratio.
void expect_within(const std::vector<float>& got, const std::vector<double>& ref, const std::vector<double>& bound,
                   const std::string& what) {
  ASSERT_EQ(got.size(), ref.size());
  double worst = 0;
  size_t at = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    ASSERT_TRUE(std::isfinite(got[i])) << what << ": element " << i << " is " << got[i];
    const double r = std::fabs(double(got[i]) - ref[i]) / std::max(bound[i], 1e-30);
    if (r > worst) worst = r, at = i;
  }
  EXPECT_LE(worst, 1.0) << what << ": element " << at << " = " << got[at] << ", reference " << ref[at] << ", bound "
                        << bound[at];
}

}  // namespace

std::vector<uint8_t> random_quant_rows(uint32_t type, int rows, int cols, std::mt19937& rng) {
  std::vector<uint8_t> q(quant::row_bytes(type, cols) * size_t(rows));
  std::uniform_int_distribution<int> byte(0, 255);
  for (uint8_t& b : q) b = uint8_t(byte(rng));
  const int bb = quant::block_bytes(type);
  std::uniform_real_distribution<float> mag(1.f, 3.f);
  auto scale = [&](uint8_t* at, float unit, bool sign) {
    const float v = mag(rng) * unit * (sign && byte(rng) < 128 ? -1.f : 1.f);
    const uint16_t h = f32_to_f16(v);
    std::memcpy(at, &h, 2);
  };
  for (size_t o = 0; o < q.size(); o += size_t(bb)) {
    uint8_t* b = &q[o];
    switch (type) {
      case quant::kQ8_0: scale(b, 0.01f, true); break;
      case quant::kQ4_0: scale(b, 0.05f, true); break;
      case quant::kQ4_K: scale(b, 0.001f, false), scale(b + 2, 0.001f, false); break;
      case quant::kQ6_K: scale(b + 208, 0.0003f, false); break;
      default: fail("random_quant_rows", qname(type) + " is not a block type");
    }
  }
  return q;
}

std::string QuantGemvCase::str() const {
  std::ostringstream o;
  o << "quant gemv " << qname(quant) << " x " << dtype_name(dtype) << " " << rows << "x" << in << "x" << out
    << (x_pad ? " x_pad" : "") << (y_pad ? " y_pad" : "") << (accumulate ? " accumulate" : "") << (swiglu ? " swiglu" : "");
  return o.str();
}

void check_quant_gemv(Backend& be, const QuantGemvCase& c) {
  SCOPED_TRACE(c.str());
  std::mt19937 rng(c.seed);
  const int64_t xs = c.in + c.x_pad, ys = c.out + c.y_pad;
  const DType y_t = c.swiglu ? c.dtype : DType::F32;  // what plan_gemv allows for quantised w
  const std::vector<uint8_t> wq = random_quant_rows(c.quant, c.out, c.in, rng);
  const std::vector<uint8_t> uq = c.swiglu ? random_quant_rows(c.quant, c.out, c.in, rng) : std::vector<uint8_t>{};
  // x of variance 1/in keeps the products O(1): with unit-variance x a 4128-wide SwiGLU product of
  // Q8_0 rows passed F16's largest value (65504) on the GPU, an overflow of the test's making.
  std::vector<float> x = randn(rng, size_t(c.rows) * xs, float(1.0 / std::sqrt(double(c.in))));
  round_to(c.dtype, x);
  std::vector<float> y0 = randn(rng, size_t(c.rows) * ys);
  if (y_t != DType::F32) round_to(y_t, y0);

  std::vector<double> g, gm, u, um;
  products(x, xs, dequantised(c.quant, wq, c.out, c.in), c.rows, c.in, c.out, g, gm);
  if (c.swiglu) products(x, xs, dequantised(c.quant, uq, c.out, c.in), c.rows, c.in, c.out, u, um);
  std::vector<double> ref(y0.begin(), y0.end()), bound(y0.size(), 0.0);
  const double gam = gamma_n(c.in + 2), u16 = unit16(y_t);
  for (int r = 0; r < c.rows; ++r)
    for (int o = 0; o < c.out; ++o) {
      const size_t i = size_t(r) * c.out + o, yi = size_t(r) * ys + o;
      double v, e;
      if (c.swiglu) {
        const double sg = g[i] / (1 + std::exp(-g[i])), eg = gam * gm[i], eu = gam * um[i];
        v = sg * u[i];
        // |silu'| <= 1.1; silu and the product in float32 add a few roundings.
        e = 1.1 * eg * (std::fabs(u[i]) + eu) + std::fabs(sg) * eu + 8 * kU * std::fabs(v);
      } else {
        v = g[i];
        e = gam * gm[i];
      }
      if (c.accumulate) v += double(y0[yi]), e += kU * (std::fabs(v) + e);
      ref[yi] = v;
      bound[yi] = e + u16 * (std::fabs(v) + e) + 1e-30;
    }

  GemvArgs a;
  a.x = put_as(be, c.dtype, x), a.x_stride = xs;
  a.w = be.put(wq), a.w_quant = c.quant, a.w_dtype = c.dtype;
  if (c.swiglu) a.w_up = be.put(uq);
  a.rows = c.rows, a.in = c.in, a.out = c.out;
  a.y = put_as(be, y_t, y0), a.y_stride = ys, a.y_dtype = y_t, a.accumulate = c.accumulate;
  ASSERT_TRUE(gemv_fits(a)) << detail::gemv_misfit(a);
  be.gemv(a);
  const std::vector<float> got = get_as(be, y_t, a.y, y0.size());
  expect_within(got, ref, bound, "quantised gemv");  // padding columns: ref = y0, bound 1e-30
}

std::vector<QuantGemvCase> quant_gemv_cases(bool full) {
  std::vector<QuantGemvCase> cs;
  uint32_t seed = 1700;
  for (uint32_t q : {quant::kQ8_0, quant::kQ4_0, quant::kQ4_K, quant::kQ6_K}) {
    const bool k = q == quant::kQ4_K || q == quant::kQ6_K;
    // Widths: one block, a stripe of 256 and a tail past the last full 1024 of a warp's slices,
    // several stripes; outs not a multiple of a thread block's 4 outputs.
    std::vector<int> ins = k ? std::vector<int>{256, 1280} : std::vector<int>{32, 288, 1056};
    if (full) ins.push_back(k ? 4352 : 4128);
    const std::vector<int> outs = full ? std::vector<int>{1, 7, 130} : std::vector<int>{1, 7};
    for (DType t : {DType::F16, DType::BF16})
      for (int rows = 1; rows <= kGemvMaxRows; rows += full ? 1 : 3)
        for (int in : ins)
          for (int out : outs) {
            QuantGemvCase c;
            c.quant = q, c.dtype = t, c.rows = rows, c.in = in, c.out = out, c.seed = seed++;
            const int kind = int(c.seed % 4);  // vary the rest across the grid
            c.swiglu = kind == 3 || (kind == 0 && rows % 2 == 0);
            c.accumulate = kind == 2;
            c.x_pad = kind == 1 ? 8 : 0;
            c.y_pad = kind == 2 ? 3 : 0;
            cs.push_back(c);
          }
  }
  return cs;
}

void check_quant_gemv_refusals(Backend& be) {
  std::mt19937 rng(5);
  const std::vector<float> z(8 * 512, 0.f);
  GemvArgs ok;
  ok.x = put_as(be, DType::BF16, z), ok.w = be.put(random_quant_rows(quant::kQ4_K, 4, 512, rng));
  ok.w_quant = quant::kQ4_K, ok.w_dtype = DType::BF16;
  ok.rows = 2, ok.in = 512, ok.out = 4;
  ok.y = be.alloc(8 * 512 * 4);
  EXPECT_TRUE(gemv_fits(ok)) << detail::gemv_misfit(ok);
  auto refused = [&](GemvArgs a, const char* what, const char* says) {
    EXPECT_FALSE(gemv_fits(a)) << what;
    try {
      be.gemv(a);
      ADD_FAILURE() << what << ": no error";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(says), std::string::npos) << what << ": " << e.what();
    }
  };
  GemvArgs a = ok;
  a.in = 384;  // 1.5 blocks of 256
  refused(a, "a row that is not whole blocks", "not whole blocks of 256");
  a = ok, a.w_quant = 3;  // Q4_1
  refused(a, "a block type without kernel", "not a block type the GPU reads");
  a = ok, a.y_dtype = DType::BF16;
  refused(a, "a 16-bit y without w_up", "y must be F32 without w_up");
  a = ok, a.w_up = a.w;
  refused(a, "an F32 y with w_up", "y must be F32 without w_up");
  a = ok, a.rows = kGemvMaxRows + 1;
  refused(a, "too many rows", "rows must be 1..");
}

void check_dequantize(Backend& be, uint32_t quant, DType out_dtype, int rows, int cols, bool ids, uint32_t seed) {
  SCOPED_TRACE("dequantize " + qname(quant) + " -> " + dtype_name(out_dtype) + " " + std::to_string(rows) + "x" +
               std::to_string(cols) + (ids ? " ids" : ""));
  std::mt19937 rng(seed);
  const std::vector<uint8_t> q = random_quant_rows(quant, rows, cols, rng);
  std::vector<int32_t> id;
  if (ids) id = {rows - 1, 0, -1, rows / 2, rows, rows - 1};  // -1 and rows: outside, rows of zeros
  const int n = ids ? int(id.size()) : rows;
  const int64_t stride = cols + 8;
  const std::vector<float> w = dequantised(quant, q, rows, cols);
  std::vector<float> ref(size_t(n) * stride, 7.f);  // the padding keeps its value
  for (int r = 0; r < n; ++r) {
    const int src = ids ? id[size_t(r)] : r;
    for (int i = 0; i < cols; ++i) ref[size_t(r) * stride + i] = src >= 0 && src < rows ? w[size_t(src) * cols + i] : 0.f;
  }
  if (out_dtype != DType::F32) round_to(out_dtype, ref);
  DequantArgs a;
  a.quant = quant, a.w = be.put(q), a.rows = rows, a.cols = cols, a.ids = ids ? be.put(id) : nullptr, a.n = n;
  a.out_dtype = out_dtype, a.out = put_as(be, out_dtype, std::vector<float>(ref.size(), 7.f)), a.out_stride = stride;
  be.dequantize(a);
  const std::vector<float> got = get_as(be, out_dtype, a.out, ref.size());
  for (size_t i = 0; i < ref.size(); ++i)
    ASSERT_EQ(got[i], ref[i]) << "element " << i % stride << " of row " << i / stride << ": the CPU's bits";
}

void check_dequantize_all(Backend& be, int rows, int k_cols, uint32_t seed) {
  for (uint32_t q : {quant::kQ8_0, quant::kQ4_0, quant::kQ4_K, quant::kQ6_K})
    for (DType t : {DType::F32, DType::F16, DType::BF16}) {
      const int cols = q == quant::kQ4_K || q == quant::kQ6_K ? k_cols : 96;
      check_dequantize(be, q, t, rows, cols, false, seed++);
      check_dequantize(be, q, t, rows, cols, true, seed++);
    }
}

void check_quant_linear(Backend& be, const std::function<void(const LinearArgs&)>& linear, uint32_t quant,
                        DType dtype, int rows, int in, int out, bool accumulate, uint32_t seed) {
  SCOPED_TRACE("quant linear " + qname(quant) + " x " + dtype_name(dtype) + " " + std::to_string(rows) + "x" +
               std::to_string(in) + "x" + std::to_string(out) + (accumulate ? " accumulate" : ""));
  std::mt19937 rng(seed);
  const std::vector<uint8_t> wq = random_quant_rows(quant, out, in, rng);
  std::vector<float> x = randn(rng, size_t(rows) * in);
  round_to(dtype, x);
  const std::vector<float> y0 = randn(rng, size_t(rows) * out);
  std::vector<double> g, gm;
  products(x, in, dequantised(quant, wq, out, in), rows, in, out, g, gm);
  // Beyond kGemvMaxRows the products read w rounded to x's type.
  const double per_term = gamma_n(in + 2) + (rows > kGemvMaxRows ? unit16(dtype) : 0.0);
  std::vector<double> ref(g.size()), bound(g.size());
  for (size_t i = 0; i < g.size(); ++i) {
    ref[i] = g[i] + (accumulate ? double(y0[i]) : 0.0);
    bound[i] = per_term * gm[i] + (accumulate ? kU * std::fabs(ref[i]) : 0.0) + 1e-30;
  }
  LinearArgs a;
  a.x = put_as(be, dtype, x), a.w = be.put(wq), a.w_quant = quant, a.w_dtype = dtype;
  a.rows = rows, a.in = in, a.out = out;
  a.y = put_as(be, DType::F32, y0), a.y_dtype = DType::F32, a.accumulate = accumulate;
  linear(a);
  expect_within(get_as(be, DType::F32, a.y, y0.size()), ref, bound, "quantised linear");
}

}  // namespace pkv::cuda::test
