#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <numeric>
#include <random>

#include "core/threads.h"
#include "ops/ops.h"
#include "test_util.h"

using namespace pkv;

namespace {

struct OwnedLinear {
  std::vector<uint8_t> bytes;
  TensorView view;
  Linear lin;
};

OwnedLinear make_linear(int out, int in, DType dt, std::mt19937& rng, bool bias) {
  std::normal_distribution<float> nd(0.f, 0.5f);
  OwnedLinear o;
  o.bytes.resize(size_t(out) * in * dtype_size(dt));
  for (size_t i = 0; i < size_t(out) * in; ++i) {
    const float f = nd(rng);
    if (dt == DType::F32) std::memcpy(&o.bytes[i * 4], &f, 4);
    else {
      uint16_t h = dt == DType::BF16 ? f32_to_bf16(f) : f32_to_f16(f);
      std::memcpy(&o.bytes[i * 2], &h, 2);
    }
  }
  o.view.dtype = dt;
  o.view.supported = true;
  o.view.shape = {out, in};
  o.view.data = o.bytes.data();
  o.lin.w = &o.view;
  o.lin.in = in;
  o.lin.out = out;
  if (bias)
    for (int i = 0; i < out; ++i) o.lin.b.push_back(nd(rng));
  return o;
}

}  // namespace

class LinearTest : public ::testing::TestWithParam<std::tuple<DType, int>> {};

TEST_P(LinearTest, MatchesDoubleReference) {
  auto [dt, rows] = GetParam();
  std::mt19937 rng(123 + rows);
  auto L = make_linear(301, 77, dt, rng, true);
  L.lin.w = &L.view;
  std::normal_distribution<float> nd;
  std::vector<float> x(size_t(rows) * 77), y(size_t(rows) * 301, NAN), ref(y.size());
  for (auto& v : x) v = nd(rng);
  ops::linear(x.data(), rows, L.lin, y.data());
  ops::linear_reference(x.data(), rows, L.lin, ref.data());
  EXPECT_LT(test::rel_error(y.data(), ref.data(), y.size()), 1e-5);
}

INSTANTIATE_TEST_SUITE_P(DTypesAndRows, LinearTest,
                         ::testing::Combine(::testing::Values(DType::F32, DType::F16, DType::BF16),
                                            ::testing::Values(1, 2, 5, 64)));

// A short prompt's product (gemm16, what linear() takes for 17-64 rows of 16-bit weights): every
// value is the float32 FMA chain over k in order, bit for bit, whatever the tile a row falls in, the
// rows beside it or the threads; and within the arithmetic's bound of the double reference:
// |y - exact| <= gamma_n * sum_k |x_k w_k|, gamma_n = n u / (1 - n u), u = 2^-24 (n = in multiply-adds,
// each rounded once).
TEST(Gemm16, EqualsTheFmaChainBitForBitAndStaysWithinItsBound) {
  const int saved = num_threads();
  for (DType dt : {DType::F16, DType::BF16})
    for (auto [out, in] : {std::pair{301, 77}, std::pair{29, 600}, std::pair{13, 257}}) {
      SCOPED_TRACE(std::string(dtype_name(dt)) + " out " + std::to_string(out) + " in " + std::to_string(in));
      std::mt19937 rng(uint32_t(out * 7 + in));
      auto L = make_linear(out, in, dt, rng, false);
      const auto* w = static_cast<const uint16_t*>(L.view.data);
      std::normal_distribution<float> nd;
      const int max_rows = 131;
      std::vector<float> x(size_t(max_rows) * in);
      for (auto& v : x) v = nd(rng);
      std::vector<float> ref(size_t(max_rows) * out);
      ops::gemm16_reference(x.data(), max_rows, dt, w, in, out, ref.data());
      for (int rows : {1, 17, 31, 32, 33, 64, 100, 131}) {
        for (int threads : {1, 2, 3}) {
          set_num_threads(threads);
          std::vector<float> y(size_t(rows) * out, NAN);
          ops::gemm16(x.data(), rows, dt, w, in, out, y.data());
          ASSERT_EQ(0, std::memcmp(y.data(), ref.data(), y.size() * 4)) << rows << " rows, " << threads << " threads";
        }
        // Rows that start elsewhere (another tile offset) give the same values.
        std::vector<float> tail(size_t(rows - rows / 2) * out);
        ops::gemm16(x.data() + size_t(rows / 2) * in, rows - rows / 2, dt, w, in, out, tail.data());
        ASSERT_EQ(0, std::memcmp(tail.data(), ref.data() + size_t(rows / 2) * out, tail.size() * 4)) << rows;
      }
      const double u = std::ldexp(1.0, -24), gamma = in * u / (1 - in * u);
      for (int r = 0; r < max_rows; ++r)
        for (int o = 0; o < out; ++o) {
          double exact = 0, mag = 0;
          for (int k = 0; k < in; ++k) {
            const uint16_t h = w[size_t(o) * in + k];
            const double p = double(x[size_t(r) * in + k]) * (dt == DType::F16 ? f16_to_f32(h) : bf16_to_f32(h));
            exact += p, mag += std::fabs(p);
          }
          ASSERT_LE(std::fabs(ref[size_t(r) * out + o] - exact), gamma * mag) << r << ", " << o;
        }
      // linear() takes it for 17-64 rows, bias added after.
      auto Lb = make_linear(out, in, dt, rng, true);
      std::vector<float> viaLinear(size_t(40) * out), direct(viaLinear.size());
      ops::linear(x.data(), 40, Lb.lin, viaLinear.data());
      ops::gemm16(x.data(), 40, dt, static_cast<const uint16_t*>(Lb.view.data), in, out, direct.data());
      for (int r = 0; r < 40; ++r)
        for (int o = 0; o < out; ++o) direct[size_t(r) * out + o] += Lb.lin.b[size_t(o)];
      ASSERT_EQ(0, std::memcmp(viaLinear.data(), direct.data(), direct.size() * 4));
    }
  set_num_threads(saved);
}

// Decode's products (1-2 rows of 16-bit weights: eight weight rows at a time on AVX-512, four on
// AVX2, prefetched) and linear_rows' small batches (four input rows per weight row) share one
// arithmetic: every value the same bits whichever path, grouping or thread count computes it (so a
// sequence decoded in a batch equals it decoded alone), and within the float32 bound of the exact
// product, |y - exact| <= gamma_n * sum_k |x_k w_k| (each of at most n = in sequential roundings on
// any path of the summation tree).
TEST(DecodeDots, EveryPathGivesTheSameBitsWithinTheBound) {
  const int saved = num_threads();
  for (DType dt : {DType::F16, DType::BF16})
    for (auto [out, in] : {std::pair{301, 77}, std::pair{7, 4105}, std::pair{13, 33}, std::pair{10, 16}}) {
      SCOPED_TRACE(std::string(dtype_name(dt)) + " out " + std::to_string(out) + " in " + std::to_string(in));
      std::mt19937 rng(uint32_t(out * 11 + in));
      auto L = make_linear(out, in, dt, rng, true);
      std::normal_distribution<float> nd;
      const int max_rows = 9;
      std::vector<float> x(size_t(max_rows) * in);
      for (auto& v : x) v = nd(rng);
      std::vector<float> single(size_t(max_rows) * out);
      set_num_threads(1);
      for (int r = 0; r < max_rows; ++r) ops::linear(x.data() + size_t(r) * in, 1, L.lin, single.data() + size_t(r) * out);
      for (int threads : {1, 2, 3}) {
        set_num_threads(threads);
        std::vector<float> two(size_t(2) * out, NAN);
        ops::linear(x.data(), 2, L.lin, two.data());
        ASSERT_EQ(0, std::memcmp(two.data(), single.data(), two.size() * 4)) << threads << " threads";
        for (int rows : {1, 3, 4, 5, 9}) {
          std::vector<float> y(size_t(rows) * out, NAN);
          ops::linear_rows(x.data(), rows, L.lin, y.data());
          ASSERT_EQ(0, std::memcmp(y.data(), single.data(), y.size() * 4)) << rows << " rows, " << threads << " threads";
        }
      }
      const auto* w = static_cast<const uint16_t*>(L.view.data);
      const double u = std::ldexp(1.0, -24), gamma = (in + 1) * u / (1 - (in + 1) * u);  // + 1: the bias
      for (int r = 0; r < max_rows; ++r)
        for (int o = 0; o < out; ++o) {
          double exact = L.lin.b[size_t(o)], mag = std::fabs(exact);
          for (int k = 0; k < in; ++k) {
            const uint16_t h = w[size_t(o) * in + k];
            const double p = double(x[size_t(r) * in + k]) * (dt == DType::F16 ? f16_to_f32(h) : bf16_to_f32(h));
            exact += p, mag += std::fabs(p);
          }
          ASSERT_LE(std::fabs(single[size_t(r) * out + o] - exact), gamma * mag) << r << ", " << o;
        }
    }
  set_num_threads(saved);
}

class Attention : public ::testing::TestWithParam<int> {};

// n_q = 5 takes the per-query path, n_q = 40 the blocked BLAS path.
TEST_P(Attention, MatchesExplicitSoftmaxWithCausalPositionsAndGqa) {
  std::mt19937 rng(7);
  std::normal_distribution<float> nd;
  const int n_q = GetParam(), n_kv = n_q + 4, H = 4, G = 2, hd = 8;
  std::vector<float> q(size_t(n_q) * H * hd), k(size_t(n_kv) * G * hd), v(k.size()), out(q.size());
  for (auto* vec : {&q, &k, &v})
    for (auto& x : *vec) x = nd(rng);
  // Non-contiguous absolute positions (as after eviction); queries at the end.
  // The last n_q keys are the queries themselves; the first 4 keys are older, with gaps.
  std::vector<int32_t> kv_pos = {0, 1, 4, 5}, q_pos;
  for (int i = 0; i < n_q; ++i) kv_pos.push_back(7 + 2 * i), q_pos.push_back(7 + 2 * i);
  std::vector<float> imp(size_t(n_kv), 0.f);
  ops::AttentionArgs a;
  a.q = q.data();
  a.n_q = n_q;
  a.q_pos = q_pos.data();
  a.k = k.data();
  a.v = v.data();
  a.n_kv = n_kv;
  a.kv_stride = G * hd;
  a.kv_pos = kv_pos.data();
  a.n_heads = H;
  a.n_kv_heads = G;
  a.head_dim = hd;
  a.scale = 0.3f;
  a.out = out.data();
  a.importance = imp.data();
  ops::attention(a);
  std::vector<double> imp_ref(size_t(n_kv), 0.0);
  for (int i = 0; i < n_q; ++i)
    for (int h = 0; h < H; ++h) {
      const int g = h / (H / G);
      std::vector<double> p(size_t(n_kv), 0.0);
      double mx = -1e30, sum = 0;
      for (int j = 0; j < n_kv; ++j) {
        if (kv_pos[size_t(j)] > q_pos[size_t(i)]) continue;
        double s = 0;
        for (int d = 0; d < hd; ++d) s += double(q[size_t((i * H + h) * hd + d)]) * k[size_t((j * G + g) * hd + d)];
        p[size_t(j)] = s * 0.3;
        mx = std::max(mx, p[size_t(j)]);
      }
      for (int j = 0; j < n_kv; ++j) {
        p[size_t(j)] = kv_pos[size_t(j)] > q_pos[size_t(i)] ? 0.0 : std::exp(p[size_t(j)] - mx);
        sum += p[size_t(j)];
      }
      for (int d = 0; d < hd; ++d) {
        double o = 0;
        for (int j = 0; j < n_kv; ++j) o += p[size_t(j)] / sum * v[size_t((j * G + g) * hd + d)];
        EXPECT_NEAR(out[size_t((i * H + h) * hd + d)], o, 1e-5);
      }
      for (int j = 0; j < n_kv; ++j) imp_ref[size_t(j)] += p[size_t(j)] / sum / H;
    }
  for (int j = 0; j < n_kv; ++j) EXPECT_NEAR(imp[size_t(j)], imp_ref[size_t(j)], 1e-4);
  // Importance sums to one per query (each query's heads average to a distribution).
  double total = 0;
  for (float x : imp) total += x;
  EXPECT_NEAR(total, double(n_q), 1e-3);
}

INSTANTIATE_TEST_SUITE_P(QueryCounts, Attention, ::testing::Values(5, 40, 130));

// The blockwise importance equals the column sums of the explicit attention matrix, restricted to the
// queries from `importance_from` on (the window estimator), on both code paths.
TEST_P(Attention, ImportanceFromQueryWindowMatchesExplicitMatrix) {
  std::mt19937 rng(11);
  std::normal_distribution<float> nd;
  const int n = GetParam(), H = 2, hd = 4, from = n - 3;
  std::vector<float> q(size_t(n) * H * hd), k(q.size()), v(q.size()), out(q.size());
  for (auto* vec : {&q, &k, &v})
    for (auto& x : *vec) x = nd(rng);
  std::vector<int32_t> pos(static_cast<size_t>(n));
  std::iota(pos.begin(), pos.end(), 0);
  std::vector<float> imp(static_cast<size_t>(n), 0.f);
  ops::AttentionArgs a;
  a.q = q.data(); a.n_q = n; a.q_pos = pos.data(); a.k = k.data(); a.v = v.data(); a.n_kv = n;
  a.kv_stride = H * hd; a.kv_pos = pos.data(); a.n_heads = a.n_kv_heads = H; a.head_dim = hd; a.scale = 0.5f;
  a.out = out.data(); a.importance = imp.data(); a.importance_from = from;
  ops::attention(a);
  for (int j = 0; j < n; ++j) {
    double want = 0;
    for (int i = from; i < n; ++i)
      for (int h = 0; h < H; ++h) {
        double mx = -1e30, sum = 0;
        std::vector<double> sc(static_cast<size_t>(i + 1));
        for (int t = 0; t <= i; ++t) {
          double d = 0;
          for (int x = 0; x < hd; ++x) d += double(q[size_t((i * H + h) * hd + x)]) * k[size_t((t * H + h) * hd + x)];
          sc[size_t(t)] = d * 0.5;
          mx = std::max(mx, sc[size_t(t)]);
        }
        for (auto& s : sc) sum += std::exp(s - mx);
        if (j <= i) want += std::exp(sc[size_t(j)] - mx) / sum / H;
      }
    EXPECT_NEAR(imp[size_t(j)], want, 1e-5) << "key " << j;
  }
}

TEST(Rope, RotatesPairsByPositionTimesFrequency) {
  ops::Rope r = ops::Rope::make(4, 10000.f, "default", 1.f, 1.f, 4.f, 8192);
  ASSERT_EQ(r.inv_freq.size(), 2u);
  EXPECT_FLOAT_EQ(r.inv_freq[0], 1.f);
  EXPECT_NEAR(r.inv_freq[1], 0.01f, 1e-7);
  std::vector<float> x = {1, 2, 3, 4};
  int32_t pos = 3;
  r.apply(x.data(), 1, 1, &pos);
  EXPECT_NEAR(x[0], 1 * std::cos(3.f) - 3 * std::sin(3.f), 1e-5);
  EXPECT_NEAR(x[2], 3 * std::cos(3.f) + 1 * std::sin(3.f), 1e-5);
  EXPECT_NEAR(x[1], 2 * std::cos(0.03f) - 4 * std::sin(0.03f), 1e-5);
  EXPECT_NEAR(x[3], 4 * std::cos(0.03f) + 2 * std::sin(0.03f), 1e-5);
}

TEST(Norms, RmsAndLayerNorm) {
  Norm n{{1.f, 2.f, 0.5f, 1.f}, {0.f, 1.f, 0.f, -1.f}};
  std::vector<float> x = {1, 2, 3, 4}, y(4);
  ops::rms_norm(x.data(), 1, 4, n, 0.f, y.data());
  const float rms = std::sqrt((1 + 4 + 9 + 16) / 4.f);
  EXPECT_NEAR(y[1], 2 * 2 / rms, 1e-6);
  ops::layer_norm(x.data(), 1, 4, n, 0.f, y.data());
  const float sd = std::sqrt(1.25f);
  EXPECT_NEAR(y[0], (1 - 2.5f) / sd * 1 + 0, 1e-5);
  EXPECT_NEAR(y[3], (4 - 2.5f) / sd * 1 - 1, 1e-5);
}
