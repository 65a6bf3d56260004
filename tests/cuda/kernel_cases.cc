#include "kernel_cases.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <sstream>

#include "kv/block_pool.h"
#include "kv/kv_cache.h"
#include "kv/policy.h"
#include "ops/cuda/plan.h"
#include "ops/ops.h"
#include "core/error.h"

namespace pkv::cuda::test {

double tolerance(DType t) { return t == DType::F16 ? 2e-3 : t == DType::BF16 ? 1e-2 : 1e-5; }

void round_to(DType t, std::vector<float>& x) {
  if (t == DType::F32) return;
  for (float& v : x) v = t == DType::F16 ? f16_to_f32(f32_to_f16(v)) : bf16_to_f32(f32_to_bf16(v));
}

std::vector<uint16_t> to_16bit(DType t, const std::vector<float>& x) {
  std::vector<uint16_t> r(x.size());
  for (size_t i = 0; i < x.size(); ++i) r[i] = t == DType::F16 ? f32_to_f16(x[i]) : f32_to_bf16(x[i]);
  return r;
}

std::vector<float> from_16bit(DType t, const std::vector<uint16_t>& x) {
  std::vector<float> r(x.size());
  to_f32(t, x.data(), r.data(), x.size());
  return r;
}

void* put_as(Backend& be, DType t, const std::vector<float>& x) {
  if (t == DType::F32) return be.put(x);
  return be.put(to_16bit(t, x));
}

std::vector<float> get_as(Backend& be, DType t, const void* p, size_t n) {
  if (t == DType::F32) return be.get(static_cast<const float*>(p), n);
  return from_16bit(t, be.get(static_cast<const uint16_t*>(p), n));
}

void expect_close(const std::vector<float>& got, const std::vector<float>& ref, double tol, const std::string& what) {
  ASSERT_EQ(got.size(), ref.size()) << what;
  double max_ref = 0, max_diff = 0;
  for (float r : ref) max_ref = std::max(max_ref, double(std::fabs(r)));
  size_t nan = 0, bad = 0, worst = 0;
  double worst_ratio = 0;
  const double floor = 0.01 * max_ref;
  for (size_t i = 0; i < got.size(); ++i) {
    if (!std::isfinite(got[i])) {
      ++nan;
      continue;
    }
    const double d = std::fabs(double(got[i]) - double(ref[i]));
    max_diff = std::max(max_diff, d);
    const double allowed = tol * std::max(double(std::fabs(ref[i])), floor);
    const double ratio = allowed > 0 ? d / allowed : (d > 0 ? 1e30 : 0);
    if (ratio > 1) ++bad;
    if (ratio > worst_ratio) worst_ratio = ratio, worst = i;
  }
  const double rel = max_ref > 0 ? max_diff / max_ref : max_diff;
  EXPECT_EQ(nan, 0u) << what << ": " << nan << " non-finite values (unwritten output?)";
  EXPECT_LE(rel, tol) << what << ": norm-wise relative error " << rel << " (max |ref| " << max_ref << ")";
  EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << got.size() << " elements outside tolerance; worst [" << worst
                     << "] got " << got[worst] << " want " << ref[worst];
}

namespace {

std::vector<float> randn(std::mt19937& rng, size_t n, float scale = 1.f) {
  std::normal_distribution<float> d(0.f, scale);
  std::vector<float> x(n);
  for (float& v : x) v = d(rng);
  return x;
}

std::vector<int32_t> increasing_positions(std::mt19937& rng, int n, bool gaps, int start = 0) {
  std::vector<int32_t> p(static_cast<size_t>(n));
  int cur = start;
  for (int i = 0; i < n; ++i) {
    p[size_t(i)] = cur;
    cur += gaps ? 1 + int(rng() % 3) : 1;
  }
  return p;
}

const char* dname(DType t) { return dtype_name(t); }

}  // namespace

std::string PrefillCase::str() const {
  std::ostringstream s;
  s << dname(dtype) << " n_q=" << n_q << " n_kv=" << n_kv << " heads=" << n_heads << "/" << n_kv_heads
    << " hd=" << head_dim << (causal ? " causal" : " full") << (importance ? " importance_from=" : " no-importance")
    << (importance ? std::to_string(importance_from) : "") << (fused_qkv ? " fused" : "") << (position_gaps ? " gaps" : "")
    << (per_kv_head ? " per-kv-head" : "") << (weighted ? " weighted" : "") << (max ? " max" : "") << " seed=" << seed;
  return s.str();
}

void check_prefill(Backend& be, const PrefillCase& c, PrefillKernel kernel) {
  SCOPED_TRACE(c.str());
  std::mt19937 rng(c.seed);
  const int hd = c.head_dim, qd = c.n_heads * hd, kvd = c.n_kv_heads * hd;
  std::vector<float> q = randn(rng, size_t(c.n_q) * qd, 1.5f), k = randn(rng, size_t(c.n_kv) * kvd),
                     v = randn(rng, size_t(c.n_kv) * kvd);
  round_to(c.dtype, q), round_to(c.dtype, k), round_to(c.dtype, v);
  const std::vector<int32_t> kv_pos = increasing_positions(rng, c.n_kv, c.position_gaps, 3);
  std::vector<int32_t> q_pos(static_cast<size_t>(c.n_q));
  for (int i = 0; i < c.n_q; ++i) q_pos[size_t(i)] = kv_pos[size_t(c.n_kv - c.n_q + i)];
  const float scale = 1.f / std::sqrt(float(hd));

  // CPU twin.
  const size_t imp_n = size_t(c.n_kv) * (c.per_kv_head ? size_t(c.n_kv_heads) : 1);
  std::vector<float> out_ref(size_t(c.n_q) * qd), imp_ref = randn(rng, imp_n, 0.1f);
  const std::vector<float> imp_init = imp_ref;
  ops::AttentionArgs ra;
  ra.q = q.data(), ra.n_q = c.n_q, ra.k = k.data(), ra.v = v.data(), ra.n_kv = c.n_kv, ra.kv_stride = kvd;
  if (c.causal) ra.q_pos = q_pos.data(), ra.kv_pos = kv_pos.data();
  ra.n_heads = c.n_heads, ra.n_kv_heads = c.n_kv_heads, ra.head_dim = hd, ra.scale = scale, ra.out = out_ref.data();
  if (c.importance) ra.importance = imp_ref.data(), ra.importance_from = c.importance_from;
  ra.importance_per_kv_head = c.per_kv_head;
  std::vector<float> weight;  // [n_heads, n_kv], positive
  if (c.weighted) {
    std::uniform_real_distribution<float> w(0.1f, 3.f);
    for (int i = 0; i < c.n_heads * c.n_kv; ++i) weight.push_back(w(rng));
    ra.importance_weight = weight.data();
  }
  ra.importance_max = c.max;
  ops::attention(ra);
  // The same attention over |v|: sum_j p_ij |v_j|, the scale of each output's rounding error.
  std::vector<float> v_abs(v.size()), out_abs(out_ref.size());
  for (size_t i = 0; i < v.size(); ++i) v_abs[i] = std::fabs(v[i]);
  ops::AttentionArgs rb = ra;
  rb.v = v_abs.data(), rb.out = out_abs.data(), rb.importance = nullptr;
  ops::attention(rb);

  // Device.
  PrefillAttentionArgs a;
  a.kernel = kernel;
  a.dtype = c.dtype;
  const size_t es = dtype_size(c.dtype);
  if (c.fused_qkv) {
    EXPECT_EQ(c.n_q, c.n_kv);
    const int row = qd + 2 * kvd;
    std::vector<float> fused(size_t(c.n_q) * row);
    for (int i = 0; i < c.n_q; ++i) {
      std::copy_n(&q[size_t(i) * qd], qd, &fused[size_t(i) * row]);
      std::copy_n(&k[size_t(i) * kvd], kvd, &fused[size_t(i) * row + qd]);
      std::copy_n(&v[size_t(i) * kvd], kvd, &fused[size_t(i) * row + qd + kvd]);
    }
    char* base = static_cast<char*>(put_as(be, c.dtype, fused));
    a.q = base, a.k = base + size_t(qd) * es, a.v = base + size_t(qd + kvd) * es;
    a.q_stride = a.kv_stride = row;
  } else {
    a.q = put_as(be, c.dtype, q), a.k = put_as(be, c.dtype, k), a.v = put_as(be, c.dtype, v);
  }
  a.n_q = c.n_q, a.n_kv = c.n_kv;
  if (c.causal) a.q_pos = be.put(q_pos), a.kv_pos = be.put(kv_pos);
  a.n_heads = c.n_heads, a.n_kv_heads = c.n_kv_heads, a.head_dim = hd, a.scale = scale;
  a.out = be.alloc(size_t(c.n_q) * qd * es);
  be.fill(a.out, 0xff, size_t(c.n_q) * qd * es);  // NaN: every element must be written
  if (c.importance) {
    a.importance = be.put(imp_init);
    a.importance_from = c.importance_from;
    a.importance_per_kv_head = c.per_kv_head;
    a.workspace_bytes = attention_prefill_workspace_bytes(c.n_q, c.n_kv, c.n_heads);
    a.workspace = be.alloc(a.workspace_bytes);
    if (c.weighted) a.importance_weight = be.put(weight);
    a.importance_max = c.max;
  }
  be.attention_prefill(a);

  // Output bound. The kernels may round each probability to the 16-bit type before multiplying by V
  // (the tensor-core kernels do, as flash attention does): a relative error of at most u (the type's
  // unit roundoff: 2^-9 bf16, 2^-12 f16) per term, so at most u * sum_j p_ij |v_j| in all; the
  // output is rounded once more (u |out|); float32 scores and sums add about (n_kv + head_dim) *
  // 2^-24 of sum_j p_ij |v_j|. Twice u on each rounding leaves room for the max-shift's rounding.
  {
    const std::vector<float> got = get_as(be, c.dtype, a.out, size_t(c.n_q) * qd);
    const double u = c.dtype == DType::BF16 ? std::ldexp(1.0, -9) : std::ldexp(1.0, -12);
    const double f32 = double(c.n_kv + hd) * std::ldexp(1.0, -24);
    size_t bad = 0, worst = 0;
    double worst_ratio = 0;
    for (size_t i = 0; i < got.size(); ++i) {
      const double bound = 2 * u * (out_abs[i] + std::fabs(out_ref[i])) + f32 * out_abs[i] + 1e-30;
      const double err = std::isfinite(got[i]) ? std::fabs(double(got[i]) - out_ref[i]) : INFINITY;
      if (err > bound) ++bad;
      if (err / bound > worst_ratio) worst_ratio = err / bound, worst = i;
    }
    EXPECT_EQ(bad, 0u) << "prefill output: " << bad << " of " << got.size() << " elements beyond the rounding bound; worst ["
                       << worst << "] got " << got[worst] << " want " << out_ref[worst] << " (" << worst_ratio
                       << "x the bound)";
  }
  if (c.importance) {
    std::vector<float> imp = be.get(a.importance, imp_n);
    if (c.max) {  // max(initial, the largest weighted head mean): the values themselves
      expect_close(imp, imp_ref, tolerance(c.dtype), "prefill importance (max)");
      return;
    }
    // Compare what was added (the initial values cancel), with the float32 tolerance scaled to the
    // sum's size: both sides add float32 probabilities of the same rounded inputs.
    std::vector<float> add(imp.size()), add_ref(imp.size());
    for (size_t j = 0; j < imp.size(); ++j) add[j] = imp[j] - imp_init[j], add_ref[j] = imp_ref[j] - imp_init[j];
    expect_close(add, add_ref, tolerance(c.dtype), "prefill importance");
  }
}

std::vector<PrefillCase> extended_prefill_cases(bool full) {
  std::vector<PrefillCase> cases;
  uint32_t seed = 700;
  for (DType t : {DType::F16, DType::BF16})
    for (int mode = 0; mode < 3; ++mode) {  // weighted sum, weighted max, max of the plain head mean
      auto add = [&](PrefillCase c) {
        c.dtype = t;
        c.seed = seed++;
        c.weighted = mode != 2;
        c.max = mode != 0;
        cases.push_back(c);
      };
      //    n_q  n_kv heads kv  hd  causal imp  from fused gaps
      add({t, 70, 70, 4, 2, 32, true, true, 0, false, false});    // GQA, every query
      add({t, 70, 70, 4, 2, 32, true, true, 38, false, true});    // a window of 32, position gaps
      add({t, 20, 150, 4, 1, 48, true, true, 5, false, false});   // a chunk after 130 cached keys, one KV head
      add({t, 40, 40, 4, 2, 24, true, true, 8, true, false});     // the GQA fixtures' decoder, fused qkv
      add({t, 130, 130, 2, 2, 64, true, true, 1, false, false});  // MHA, three query tiles
      if (full) {
        add({t, 590, 590, 8, 4, 64, true, true, 558, true, false});  // the bundled model's shape, its window
        add({t, 300, 300, 32, 32, 128, true, true, 268, false, false});  // a LLaVA-7B layer, its window
        add({t, 200, 200, 8, 2, 128, true, true, 0, false, false});      // every query, 4 tiles x 8 heads
      }
    }
  return cases;
}

namespace {

constexpr double kU = 1.0 / 16777216.0;  // 2^-24: float32's unit roundoff
double gamma_n(int n, double u = kU) { return n * u / (1 - n * u); }

// Every |got[i] - ref[i]| <= bound[i], nothing non-finite; prints the worst element when not.
void expect_within(const std::vector<float>& got, const std::vector<float>& ref, const std::vector<double>& bound,
                   const std::string& what) {
  ASSERT_EQ(got.size(), ref.size()) << what;
  size_t bad = 0, worst = 0;
  double worst_ratio = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double d = std::fabs(double(got[i]) - double(ref[i]));
    const bool ok = std::isfinite(got[i]) && d <= bound[i];
    const double ratio = !std::isfinite(got[i]) ? HUGE_VAL : d == 0 ? 0 : bound[i] > 0 ? d / bound[i] : HUGE_VAL;
    bad += ok ? 0 : 1;
    if (ratio > worst_ratio) worst_ratio = ratio, worst = i;
  }
  std::printf("%s: the worst element's error is %.3g of its bound\n", what.c_str(), worst_ratio);
  EXPECT_EQ(bad, 0u) << what << ": " << bad << " of " << got.size() << " elements outside their bound; worst [" << worst
                     << "] got " << got[worst] << " want " << ref[worst] << " bound " << bound[worst];
}

}  // namespace

void check_value_weights(Backend& be, DType dt, int n_kv, int H, int Hkv, int hd, bool gram, uint32_t seed) {
  SCOPED_TRACE(std::string(dname(dt)) + " n_kv=" + std::to_string(n_kv) + " heads=" + std::to_string(H) + "/" +
               std::to_string(Hkv) + " hd=" + std::to_string(hd) + (gram ? " wov2" : " vnorm"));
  std::mt19937 rng(seed);
  const int kvd = Hkv * hd, stride = kvd + 6, group = H / Hkv;  // strided rows (a fused qkv row's v part, say)
  std::vector<float> v = randn(rng, size_t(n_kv) * stride);
  round_to(dt, v);
  std::vector<float> g;  // G_h = W^T W, W [2 hd, hd] random: symmetric positive semi-definite
  if (gram) {
    g.assign(size_t(H) * hd * hd, 0.f);
    for (int h = 0; h < H; ++h) {
      const std::vector<float> w = randn(rng, size_t(2) * hd * hd, 0.3f);
      for (int a = 0; a < hd; ++a)
        for (int b = 0; b < hd; ++b) {
          double s = 0;
          for (int r = 0; r < 2 * hd; ++r) s += double(w[size_t(r) * hd + a]) * w[size_t(r) * hd + b];
          g[(size_t(h) * hd + a) * hd + b] = float(s);
        }
    }
  }
  std::vector<float> ref(size_t(H) * n_kv);
  ops::value_weights(v.data(), n_kv, stride, H, Hkv, hd, gram ? g.data() : nullptr, ref.data());
  ValueWeightArgs a;
  a.dtype = dt, a.v = put_as(be, dt, v), a.n_kv = n_kv, a.kv_stride = stride;
  a.n_heads = H, a.n_kv_heads = Hkv, a.head_dim = hd;
  if (gram) a.gram = be.put(g);
  a.out = static_cast<float*>(be.alloc(ref.size() * sizeof(float)));
  be.fill(a.out, 0xff, ref.size() * sizeof(float));  // NaN: every weight must be written
  a.workspace_bytes = value_weights_workspace_bytes(n_kv, H, Hkv, hd, gram);
  if (a.workspace_bytes) {
    a.workspace = be.alloc(a.workspace_bytes);
    be.fill(a.workspace, 0xff, a.workspace_bytes);  // NaN: what the product reads must have been written
  }
  be.value_weights(a);
  const std::vector<float> got = be.get(a.out, ref.size());
  // The bound of each weight from the arithmetic (u = 2^-24, n = head_dim, gamma_n = n u / (1 - n u)).
  // vnorm: both sum n magnitudes (the kernel in float32: gamma_n relative; the twin in double, then one
  // rounding), so |got - ref| <= (gamma_n + 2u) ref.
  // wov2: with M = |v|'|G||v| and S = sum_d |v_d|: the kernel multiplies by G' = sum_p G_p / s_h, the
  // 16-bit parts of s_h G_h (plan.h), |G' - G| <= eps |G| + tau elementwise (eps = 2^-22 for F16's two
  // 11-bit parts, 2^-24 for BF16's three 8-bit ones; tau = 2^-25 / s_h where F16's low part is
  // subnormal); y = G' v sums P n exact 16-bit products in float32 on the tensor cores (gamma'_{P n}
  // with 2^-23 per addition: they may truncate), sum_p |G_p| <= (1 + 2^-9) s_h |G'|; the dot over d
  // adds gamma_n sum_d |v_d y_d|. So the kernel's q is within
  // ((1 + 2^-9) gamma'_{P n} + gamma_n + eps)(1 + gamma_n) M + tau S^2 of the exact v'Gv, the twin's
  // within gamma_n M + n 2^-53 M (its product in float32, its dot in double); clamping at 0 keeps the
  // difference Q within their sum Delta, and |sqrt a - sqrt b| <= min(sqrt |a - b|, |a - b| / (sqrt a
  // + sqrt b)); then both square roots are rounded to float32 (u each), and sqrt a + sqrt b >=
  // (got + ref)(1 - 2u).
  std::vector<double> bound(ref.size());
  const double gn = gamma_n(hd);
  const int P = detail::gram_parts(dt);
  const double eps = dt == DType::F16 ? 0x1p-22 : 0x1p-24, pn = double(P) * hd * 0x1p-23, gk = pn / (1 - pn);
  for (int h = 0; h < H; ++h)
    for (int j = 0; j < n_kv; ++j) {
      const size_t i = size_t(h) * n_kv + j;
      const float* x = v.data() + size_t(j) * stride + size_t(h / group) * hd;
      if (!gram) {
        bound[i] = (gn + 2 * kU) * std::fabs(ref[i]);
        continue;
      }
      const float* G = g.data() + size_t(h) * hd * hd;
      double M = 0, S = 0, gmax = 0;
      for (int d = 0; d < hd; ++d) {
        double t = 0;
        for (int e = 0; e < hd; ++e) {
          t += std::fabs(double(G[size_t(d) * hd + e]) * x[e]);
          gmax = std::max(gmax, std::fabs(double(G[size_t(d) * hd + e])));
        }
        M += std::fabs(double(x[d])) * t;
        S += std::fabs(double(x[d]));
      }
      int ex = 0;
      if (gmax > 0) std::frexp(gmax, &ex);
      const double tau = dt == DType::F16 ? std::ldexp(0x1p-25, ex - 15) : 0.0;
      const double delta = ((1 + 0x1p-9) * gk + gn + eps) * (1 + gn) * M + gn * M + hd * 0x1p-52 * M + tau * S * S;
      const double sum = (double(std::fabs(got[i])) + std::fabs(ref[i])) * (1 - 2 * kU);
      bound[i] = std::min(std::sqrt(delta), sum > 0 ? delta / sum : std::sqrt(delta)) +
                 kU * (std::fabs(double(got[i])) + std::fabs(double(ref[i])));
    }
  expect_within(got, ref, bound, gram ? "value weights (wov2)" : "value weights (vnorm)");
}

void check_value_weights_all(Backend& be, bool full) {
  struct Shape {
    int n_kv, heads, kv_heads, hd;
  };
  std::vector<Shape> shapes = {{150, 4, 2, 32},   // GQA, a tile and a ragged one
                               {64, 8, 4, 64},    // the bundled model's heads
                               {70, 2, 2, 24},    // MHA, head_dim off the tile
                               {33, 2, 1, 128},   // one KV head, head_dim 128
                               {21, 6, 2, 30},    // head_dim not a multiple of 4 (the dots' scalar loads)
                               {2 * detail::kValueWeightChunk + 37, 2, 1, 16}};  // wov2 in three chunks of keys
  if (full)  // the bundled model, a LLaVA-7B layer, many keys
    shapes.insert(shapes.end(), {{590, 8, 4, 64}, {672, 32, 32, 128}, {2 * detail::kValueWeightChunk + 100, 8, 2, 64}});
  uint32_t seed = 800;
  for (DType t : {DType::F16, DType::BF16})
    for (bool gram : {false, true})
      for (const Shape& x : shapes) check_value_weights(be, t, x.n_kv, x.heads, x.kv_heads, x.hd, gram, seed++);
}

void check_output_gram(Backend& be, DType dt, int hidden, int H, int hd, uint32_t seed) {
  SCOPED_TRACE(std::string(dname(dt)) + " hidden=" + std::to_string(hidden) + " heads=" + std::to_string(H) +
               " hd=" + std::to_string(hd));
  std::mt19937 rng(seed);
  const int qd = H * hd;
  std::vector<float> w = randn(rng, size_t(hidden) * qd, 0.05f);
  round_to(dt, w);
  const std::vector<uint16_t> w16 = to_16bit(dt, w);
  TensorView view;  // W_o [hidden, qd] as a checkpoint stores it
  view.name = "o_proj";
  view.dtype_str = dt == DType::F16 ? "F16" : "BF16";
  view.supported = true;
  view.dtype = dt;
  view.shape = {hidden, qd};
  view.data = w16.data();
  std::vector<float> ref(size_t(H) * hd * hd);
  ops::output_gram(view, H, hd, ref.data());
  OutputGramArgs a;
  a.w_dtype = dt, a.w = be.put(w16), a.hidden = hidden, a.n_heads = H, a.head_dim = hd;
  a.out = static_cast<float*>(be.alloc(ref.size() * sizeof(float)));
  be.fill(a.out, 0xff, ref.size() * sizeof(float));
  be.output_gram(a);
  const std::vector<float> got = be.get(a.out, ref.size());
  // The bound of each element from the arithmetic, with S = sum_i |w_id| |w_ie|: the products of
  // 16-bit values are exact in float32; the GPU's sum of the `hidden` products loses at most 2^-22 of
  // the magnitudes summed so far per addition (tensor cores align a block's products to the largest and
  // may truncate: 2^-23 per addend of a block, over blocks of 4 or more), so it is within
  // hidden 2^-22 / (1 - hidden 2^-22) S of the exact G; the twin (float32 BLAS, any order) within
  // gamma_hidden S.
  std::vector<double> S(ref.size(), 0.0);  // row by row of W: contiguous in e
  for (int i = 0; i < hidden; ++i)
    for (int h = 0; h < H; ++h) {
      const float* x = w.data() + size_t(i) * qd + size_t(h) * hd;
      double* Sh = S.data() + size_t(h) * hd * hd;
      for (int d = 0; d < hd; ++d)
        for (int e = 0; e < hd; ++e) Sh[size_t(d) * hd + e] += std::fabs(double(x[d]) * x[e]);
    }
  const double gpu = gamma_n(hidden, 0x1p-22), cpu = gamma_n(hidden);
  std::vector<double> bound(ref.size());
  for (size_t i = 0; i < bound.size(); ++i) bound[i] = (gpu + cpu) * S[i];
  expect_within(got, ref, bound, "output Gram matrices");
}

void check_output_gram_all(Backend& be, bool full) {
  struct Shape {
    int hidden, heads, hd;
  };
  std::vector<Shape> shapes = {{256, 8, 32},   // the bundled model's decoder
                               {96, 2, 24},    // head_dim off the tile
                               {300, 3, 40}};  // nothing a power of two
  if (full) shapes.insert(shapes.end(), {{4096, 32, 128}});  // a LLaVA-7B layer
  uint32_t seed = 900;
  for (DType t : {DType::F16, DType::BF16})
    for (const Shape& x : shapes) check_output_gram(be, t, x.hidden, x.heads, x.hd, seed++);
}

void check_prefill_chunks(Backend& be, DType dt, int n, int chunk, int importance_from, PrefillKernel kernel,
                          uint32_t seed) {
  SCOPED_TRACE(std::string(dname(dt)) + " n=" + std::to_string(n) + " chunk=" + std::to_string(chunk) +
               " importance_from=" + std::to_string(importance_from));
  std::mt19937 rng(seed);
  constexpr int H = 4, Hkv = 2, hd = 32;
  const int qd = H * hd, kvd = Hkv * hd;
  std::vector<float> q = randn(rng, size_t(n) * qd, 1.5f), k = randn(rng, size_t(n) * kvd), v = randn(rng, size_t(n) * kvd);
  round_to(dt, q), round_to(dt, k), round_to(dt, v);
  std::vector<int32_t> pos(static_cast<size_t>(n));
  std::iota(pos.begin(), pos.end(), 0);
  const size_t es = dtype_size(dt);
  char* qb = static_cast<char*>(put_as(be, dt, q));
  const void* kb = put_as(be, dt, k);
  const void* vb = put_as(be, dt, v);
  const int32_t* pb = be.put(pos);
  auto run = [&](int s, int e, std::vector<float>& imp_host, std::vector<uint16_t>& out_host) {
    PrefillAttentionArgs a;
    a.kernel = kernel, a.dtype = dt;
    a.q = qb + size_t(s) * qd * es, a.n_q = e - s, a.q_pos = pb + s;
    a.k = kb, a.v = vb, a.n_kv = e, a.kv_pos = pb;
    a.n_heads = H, a.n_kv_heads = Hkv, a.head_dim = hd, a.scale = 1.f / std::sqrt(float(hd));
    a.out = be.alloc(size_t(e - s) * qd * es);
    if (importance_from < e) {
      a.importance = be.put(std::vector<float>(size_t(e), 0.f));
      a.importance_from = std::max(0, importance_from - s);
      a.workspace_bytes = attention_prefill_workspace_bytes(a.n_q, a.n_kv, H);
      a.workspace = be.alloc(a.workspace_bytes);
    }
    be.attention_prefill(a);
    const std::vector<uint16_t> o = be.get(static_cast<const uint16_t*>(a.out), size_t(e - s) * qd);
    std::copy(o.begin(), o.end(), out_host.begin() + long(size_t(s) * qd));
    if (a.importance) {
      const std::vector<float> add = be.get(a.importance, size_t(e));
      for (int j = 0; j < e; ++j) imp_host[size_t(j)] += add[size_t(j)];  // as prefill_parts adds pieces
    }
  };
  std::vector<uint16_t> out_whole(size_t(n) * qd), out_chunks(out_whole.size());  // 16-bit bits
  std::vector<float> imp_whole(size_t(n), 0.f), imp_chunks(size_t(n), 0.f);
  run(0, n, imp_whole, out_whole);
  for (int s = 0; s < n; s += chunk) run(s, std::min(n, s + chunk), imp_chunks, out_chunks);
  size_t differ = 0;
  for (size_t i = 0; i < out_whole.size(); ++i) differ += out_whole[i] != out_chunks[i];
  EXPECT_EQ(differ, 0u) << "output elements differ between the whole prompt and its pieces";
  // Importance: both sides add the same float32 probabilities (the same scores and log-sum-exp per
  // row), m = (counted queries) x H terms per key, all >= 0, in two different orders (the kernel's
  // tile and head sums; in pieces, each piece's sums then the host's additions), each side with a
  // division by H per piece. A float32 sum of m non-negative terms in any order is within
  // gamma_m = m u / (1 - m u) of the exact sum (u = 2^-24), each division adds u: so the two differ by
  // at most (2 gamma_m + (pieces + 1) u) times the exact sum, i.e. a slightly larger multiple of either.
  const double u = std::ldexp(1.0, -24);
  const int pieces = (n + chunk - 1) / chunk;
  const double m = double(n - importance_from) * H + pieces;
  const double rel = 2 * m * u / (1 - m * u) + (pieces + 1) * u;
  int bad = 0;
  double worst = 0;
  for (int j = 0; j < n; ++j) {
    const double bound = rel * double(imp_whole[size_t(j)]) * (1 + 2 * rel) + 1e-30;
    const double err = std::fabs(double(imp_chunks[size_t(j)]) - imp_whole[size_t(j)]);
    worst = std::max(worst, err / bound);
    if (!(err <= bound)) ++bad;
  }
  EXPECT_EQ(bad, 0) << "importance beyond the summation bound (" << rel << " relative); worst " << worst << "x the bound";
  double total = 0;
  for (float x : imp_whole) total += x;
  EXPECT_NEAR(total, double(n - importance_from), 1e-3 * n) << "each counted query's head-mean probabilities sum to 1";
}

std::string DecodeCase::str() const {
  std::ostringstream s;
  s << dname(dtype) << " lengths=[";
  for (size_t i = 0; i < lengths.size(); ++i) s << (i ? "," : "") << lengths[i];
  s << "] heads=" << n_heads << "/" << n_kv_heads << " hd=" << head_dim << " block=" << block_size
    << (importance ? " importance" : "") << (mask_some ? " masked" : "") << " src=" << dname(src_dtype) << " seed=" << seed;
  return s.str();
}

void check_decode(Backend& be, const DecodeCase& c) {
  SCOPED_TRACE(c.str());
  std::mt19937 rng(c.seed);
  const int B = int(c.lengths.size()), hd = c.head_dim, qd = c.n_heads * hd, kvd = c.n_kv_heads * hd;
  const int max_len = *std::max_element(c.lengths.begin(), c.lengths.end());

  // Blocks: handed out one block per sequence in turn, so tables interleave in the pool.
  int total_blocks = 3;
  for (int n : c.lengths) total_blocks += (n + c.block_size - 1) / c.block_size;
  BlockPool pool(total_blocks, c.block_size, 1, paged_block_bytes(c.block_size, kvd, dtype_size(c.dtype)));
  std::vector<BlockPool::SeqId> seq(static_cast<size_t>(B));
  for (int b = 0; b < B; ++b) seq[size_t(b)] = pool.add_sequence();
  for (bool grew = true; grew;) {
    grew = false;
    for (int b = 0; b < B; ++b) {
      const int have = pool.entries(seq[size_t(b)], 0), want = c.lengths[size_t(b)];
      if (have < want) {
        pool.resize(seq[size_t(b)], 0, std::min(want, (have / c.block_size + 1) * c.block_size));
        grew = true;
      }
    }
  }
  pool.check_invariants();
  const int stride = (max_len + c.block_size - 1) / c.block_size + 1;
  std::vector<int32_t> tables(size_t(B) * stride, -1);  // -1 past the end: any read there would be flagged
  for (int b = 0; b < B; ++b) {
    const auto& t = pool.table(seq[size_t(b)], 0);
    std::copy(t.begin(), t.end(), &tables[size_t(b) * stride]);
  }

  // Entries, queries, reference.
  std::vector<std::vector<float>> K(static_cast<size_t>(B)), V(static_cast<size_t>(B));
  std::vector<std::vector<int32_t>> P(static_cast<size_t>(B));
  std::vector<float> q = randn(rng, size_t(B) * qd, 1.5f);
  round_to(c.dtype, q);
  std::vector<int32_t> q_pos(static_cast<size_t>(B));
  std::vector<float> out_ref(size_t(B) * qd), imp_init = randn(rng, size_t(B) * max_len, 0.1f), imp_ref = imp_init;
  const float scale = 1.f / std::sqrt(float(hd));
  std::vector<int32_t> row_table, row_entry, all_pos;
  std::vector<float> all_k, all_v;
  for (int b = 0; b < B; ++b) {
    const int n = c.lengths[size_t(b)];
    K[size_t(b)] = randn(rng, size_t(n) * kvd), V[size_t(b)] = randn(rng, size_t(n) * kvd);
    round_to(c.dtype, K[size_t(b)]), round_to(c.dtype, V[size_t(b)]);
    P[size_t(b)] = increasing_positions(rng, n, true);
    q_pos[size_t(b)] = n ? P[size_t(b)].back() + 1 : 0;
    if (c.mask_some && n > 2 && b % 2 == 1) q_pos[size_t(b)] = P[size_t(b)][size_t(n * 2 / 3)];
    ops::AttentionArgs ra;
    ra.q = &q[size_t(b) * qd], ra.n_q = 1, ra.q_pos = &q_pos[size_t(b)];
    ra.k = K[size_t(b)].data(), ra.v = V[size_t(b)].data(), ra.n_kv = n, ra.kv_stride = kvd, ra.kv_pos = P[size_t(b)].data();
    ra.n_heads = c.n_heads, ra.n_kv_heads = c.n_kv_heads, ra.head_dim = hd, ra.scale = scale;
    ra.out = &out_ref[size_t(b) * qd];
    if (c.importance) ra.importance = &imp_ref[size_t(b) * max_len];
    if (n > 0) ops::attention(ra);
    for (int e = 0; e < n; ++e) row_table.push_back(b), row_entry.push_back(e), all_pos.push_back(P[size_t(b)][size_t(e)]);
    all_k.insert(all_k.end(), K[size_t(b)].begin(), K[size_t(b)].end());
    all_v.insert(all_v.end(), V[size_t(b)].begin(), V[size_t(b)].end());
  }

  // The pool on the device, filled through paged_kv_write; read back exactly.
  PagedKV kv;
  kv.dtype = c.dtype, kv.n_blocks = total_blocks, kv.block_size = c.block_size, kv.kv_dim = kvd;
  kv.pool = be.alloc(paged_pool_bytes(kv));
  be.fill(kv.pool, 0xff, paged_pool_bytes(kv));
  kv.positions = static_cast<int32_t*>(be.alloc(paged_positions_bytes(kv)));
  kv.tables = be.put(tables), kv.table_stride = stride;
  kv.error_flag = be.put(std::vector<int>{0});
  const int total = int(row_table.size());
  PagedRows rows{be.put(row_table), be.put(row_entry), total};
  be.paged_write(kv, rows, c.src_dtype, put_as(be, c.src_dtype, all_k), put_as(be, c.src_dtype, all_v), 0, be.put(all_pos));
  {
    const size_t es = dtype_size(c.dtype);
    void* rk = be.alloc(size_t(total) * kvd * es + 16);
    void* rv = be.alloc(size_t(total) * kvd * es + 16);
    auto* rp = static_cast<int32_t*>(be.alloc(size_t(total) * 4 + 16));
    be.paged_read(kv, rows, rk, rv, rp);
    EXPECT_EQ(get_as(be, c.dtype, rk, size_t(total) * kvd), all_k) << "paged_kv_write/read K";
    EXPECT_EQ(get_as(be, c.dtype, rv, size_t(total) * kvd), all_v) << "paged_kv_write/read V";
    EXPECT_EQ(be.get(rp, size_t(total)), all_pos) << "paged_kv_write/read positions";
  }

  DecodeAttentionArgs a;
  a.q = put_as(be, c.dtype, q), a.batch = B, a.q_pos = be.put(q_pos), a.kv = kv;
  a.lengths = be.put(c.lengths), a.max_len = max_len;
  a.n_heads = c.n_heads, a.n_kv_heads = c.n_kv_heads, a.head_dim = hd, a.scale = scale;
  const size_t out_bytes = size_t(B) * qd * dtype_size(c.dtype);
  a.out = be.alloc(out_bytes);
  be.fill(a.out, 0xff, out_bytes);
  if (c.importance) a.importance = be.put(imp_init), a.importance_stride = max_len;
  a.workspace_bytes = attention_decode_workspace_bytes(B, c.n_heads, c.n_kv_heads, hd, max_len, c.importance);
  a.workspace = be.alloc(a.workspace_bytes);
  be.fill(a.workspace, 0xff, a.workspace_bytes);  // the kernels must not read what they did not write
  be.attention_decode(a);

  expect_close(get_as(be, c.dtype, a.out, size_t(B) * qd), out_ref, tolerance(c.dtype), "decode output");
  if (c.importance) {
    std::vector<float> imp = be.get(a.importance, size_t(B) * max_len), add(imp.size()), add_ref(imp.size());
    for (size_t j = 0; j < imp.size(); ++j) add[j] = imp[j] - imp_init[j], add_ref[j] = imp_ref[j] - imp_init[j];
    expect_close(add, add_ref, tolerance(c.dtype), "decode importance");
  }
  EXPECT_EQ(be.get(kv.error_flag, 1)[0], 0) << "the kernels met an inconsistent block table";
}

std::vector<PrefillCase> prefill_cases(bool full) {
  std::vector<PrefillCase> cases;
  uint32_t seed = 100;
  for (DType t : {DType::F16, DType::BF16}) {
    auto add = [&](PrefillCase c) {
      c.dtype = t;
      c.seed = seed++;
      cases.push_back(c);
    };
    if (full) {
      //        n_q  n_kv heads kv  hd  causal imp  from fused gaps
      add({t, 1, 1, 8, 8, 64, true, true, 0, false, false});
      add({t, 17, 17, 32, 8, 128, true, true, 0, false, false});
      add({t, 100, 100, 32, 8, 80, true, true, 84, false, false});  // window importance (last 16 queries)
      add({t, 200, 200, 8, 8, 96, true, true, 0, false, true});
      add({t, 130, 130, 4, 1, 64, true, true, 100, false, false});  // one kv head
      add({t, 64, 64, 12, 4, 128, true, true, 0, false, false});    // exactly one tile
      add({t, 65, 65, 8, 2, 32, true, true, 63, false, false});     // one past a tile
      add({t, 40, 300, 16, 4, 128, true, true, 10, false, true});   // a chunk after 260 cached tokens
      add({t, 150, 150, 8, 4, 64, true, true, 0, true, false});     // fused qkv rows
      add({t, 77, 77, 6, 3, 48, true, true, 0, false, false});      // head_dim 48
      add({t, 50, 50, 4, 4, 64, true, true, 50, false, false});     // no query counts: importance unchanged
      add({t, 577, 577, 16, 16, 64, false, false, 0, false, false}); // the vision tower: no mask
      add({t, 700, 700, 32, 32, 128, true, true, 0, false, false});  // a LLaVA-7B layer
      add({t, 40, 40, 4, 2, 24, true, true, 8, true, false});        // the GQA fixtures' decoder (head_dim 24)
      add({t, 50, 50, 4, 4, 16, true, true, 0, true, false});        // head_dim 16 (fixtures' decoders)
      add({t, 37, 37, 4, 4, 12, false, false, 0, true, false});      // head_dim 12 (a fixture's vision tower)
      PrefillCase per_kv{t, 100, 100, 8, 4, 64, true, true, 84, false, false};  // adakv's window, per KV head
      per_kv.per_kv_head = true;
      add(per_kv);
      per_kv = {t, 300, 300, 32, 32, 128, true, true, 268, false, false};  // LLaVA-7B (MHA), per KV head
      per_kv.per_kv_head = true;
      add(per_kv);
    } else {
      add({t, 1, 1, 2, 2, 64, true, true, 0, false, false});
      add({t, 17, 17, 4, 2, 128, true, true, 0, false, false});
      add({t, 70, 70, 2, 1, 80, true, true, 54, false, true});   // window importance, one kv head
      add({t, 65, 65, 2, 2, 32, true, true, 0, true, false});    // fused qkv, one past a tile
      add({t, 20, 150, 2, 1, 48, true, true, 5, false, true});   // a chunk after 130 cached tokens
      add({t, 40, 40, 2, 2, 64, false, false, 0, false, false});  // no mask
      add({t, 30, 30, 2, 2, 32, true, true, 30, false, false});   // no query counts
      add({t, 40, 40, 4, 2, 24, true, true, 8, true, false});     // head_dim 24 (GQA fixtures), fused qkv
      add({t, 37, 37, 4, 4, 12, false, false, 0, true, false});   // head_dim 12 (a fixture's vision tower)
      PrefillCase per_kv{t, 70, 70, 4, 2, 32, true, true, 54, false, false};  // adakv's window, per KV head (GQA)
      per_kv.per_kv_head = true;
      add(per_kv);
    }
  }
  return cases;
}

std::vector<DecodeCase> decode_cases(bool full) {
  std::vector<DecodeCase> cases;
  uint32_t seed = 200;
  for (DType t : {DType::F16, DType::BF16}) {
    auto add = [&](std::vector<int> lengths, int heads, int kv_heads, int hd, int bs, bool importance, bool mask,
                   bool src16) {
      DecodeCase c;
      c.dtype = t, c.lengths = std::move(lengths), c.n_heads = heads, c.n_kv_heads = kv_heads, c.head_dim = hd;
      c.block_size = bs, c.importance = importance, c.mask_some = mask, c.src_dtype = src16 ? t : DType::F32;
      c.seed = seed++;
      cases.push_back(c);
    };
    if (full) {
      add({1, 15, 16, 17, 33, 100}, 32, 8, 128, 16, true, false, false);
      add({1000}, 8, 8, 64, 32, true, false, false);                  // split over many blocks
      add({3000, 5, 700}, 32, 32, 128, 16, true, false, true);         // LLaVA-7B shapes
      add({31, 32, 33, 64, 65}, 12, 1, 80, 32, true, true, false);     // 6 heads a block
      add(std::vector<int>(16, 200), 8, 4, 32, 16, false, false, true);  // the bundled model's shapes, batch 16
      add({7, 300, 8}, 4, 2, 96, 7, true, false, false);              // odd block size
      add({513, 64}, 16, 1, 64, 16, true, true, false);               // two head chunks of 8
      add({1, 40, 17}, 4, 2, 24, 16, true, false, false);             // head_dim 24 (GQA fixtures)
      add({5, 33}, 4, 4, 16, 16, true, false, false);                 // head_dim 16 (fixtures)
    } else {
      add({1, 15, 16, 17, 33}, 8, 2, 128, 16, true, false, false);
      add({600}, 2, 2, 64, 32, true, false, true);  // 3 splits
      add({31, 65}, 6, 1, 80, 7, true, true, false);  // 6 heads a block
      add({300, 64}, 16, 1, 32, 16, true, true, false);  // two head chunks
      add({1, 40, 17}, 4, 2, 24, 16, true, false, false);  // head_dim 24 (GQA fixtures)
      add({5, 33}, 4, 4, 16, 16, true, false, false);      // head_dim 16 (fixtures)
    }
  }
  return cases;
}

namespace {

// A pool of tables (one per job) holding random rounded entries, and its host copy.
struct PagedFixture {
  PagedKV kv;
  std::unique_ptr<BlockPool> pool;
  std::vector<BlockPool::SeqId> seqs;
  int stride = 0;
  std::vector<std::vector<float>> K, V;
  std::vector<std::vector<int32_t>> P;
  std::vector<int32_t> tables;

  PagedFixture(Backend& be, DType dt, int block_size, int kv_dim, const std::vector<int>& lengths, std::mt19937& rng,
               bool prefill_positions) {
    const int J = int(lengths.size());
    int blocks = 2;
    int max_len = 1;
    for (int n : lengths) blocks += (n + block_size - 1) / block_size, max_len = std::max(max_len, n);
    pool = std::make_unique<BlockPool>(blocks, block_size, 1, paged_block_bytes(block_size, kv_dim, dtype_size(dt)));
    for (int j = 0; j < J; ++j) seqs.push_back(pool->add_sequence());
    for (int j = J - 1; j >= 0; --j) pool->resize(seqs[size_t(j)], 0, lengths[size_t(j)]);  // later jobs get lower ids
    stride = (max_len + block_size - 1) / block_size + 1;
    tables.assign(size_t(J) * stride, -1);
    for (int j = 0; j < J; ++j) {
      const auto& t = pool->table(seqs[size_t(j)], 0);
      std::copy(t.begin(), t.end(), &tables[size_t(j) * stride]);
    }
    kv.dtype = dt, kv.n_blocks = blocks, kv.block_size = block_size, kv.kv_dim = kv_dim;
    kv.pool = be.alloc(paged_pool_bytes(kv));
    kv.positions = static_cast<int32_t*>(be.alloc(paged_positions_bytes(kv)));
    kv.tables = be.put(tables), kv.table_stride = stride;
    kv.error_flag = be.put(std::vector<int>{0});
    std::vector<int32_t> rt, re, ap;
    std::vector<float> ak, av;
    for (int j = 0; j < J; ++j) {
      const int n = lengths[size_t(j)];
      K.push_back(randn(rng, size_t(n) * kv_dim)), V.push_back(randn(rng, size_t(n) * kv_dim));
      round_to(dt, K.back()), round_to(dt, V.back());
      P.push_back(increasing_positions(rng, n, !prefill_positions));
      for (int e = 0; e < n; ++e) rt.push_back(j), re.push_back(e), ap.push_back(P.back()[size_t(e)]);
      ak.insert(ak.end(), K.back().begin(), K.back().end());
      av.insert(av.end(), V.back().begin(), V.back().end());
    }
    be.paged_write(kv, PagedRows{be.put(rt), be.put(re), int(rt.size())}, dt, put_as(be, dt, ak), put_as(be, dt, av), 0,
                   be.put(ap));
  }

  // Entries [0, n) of table j: K, V (as float) and positions.
  void read(Backend& be, int j, int n, std::vector<float>& k, std::vector<float>& v, std::vector<int32_t>& p) const {
    std::vector<int32_t> rt(static_cast<size_t>(n), j), re(static_cast<size_t>(n));
    std::iota(re.begin(), re.end(), 0);
    const size_t es = dtype_size(kv.dtype);
    void* dk = be.alloc(size_t(n) * kv.kv_dim * es + 16);
    void* dv = be.alloc(size_t(n) * kv.kv_dim * es + 16);
    auto* dp = static_cast<int32_t*>(be.alloc(size_t(n) * 4 + 16));
    be.paged_read(kv, PagedRows{be.put(rt), be.put(re), n}, dk, dv, dp);
    k = get_as(be, kv.dtype, dk, size_t(n) * kv.kv_dim);
    v = get_as(be, kv.dtype, dv, size_t(n) * kv.kv_dim);
    p = be.get(dp, size_t(n));
  }
};

std::vector<int32_t> random_keep(std::mt19937& rng, int n, int kind) {
  std::vector<int32_t> keep;
  if (kind == 0) {  // everything
    keep.resize(size_t(n));
    std::iota(keep.begin(), keep.end(), 0);
  } else if (kind == 1) {  // the last only
    keep.push_back(n - 1);
  } else if (kind == 2) {  // first and last
    keep.push_back(0);
    if (n > 1) keep.push_back(n - 1);
  } else if (kind == 4) {  // one eviction near the end (a decode step's)
    for (int i = 0; i < n; ++i)
      if (i != n - 3) keep.push_back(i);
  } else {  // a random ~30%, always the first
    for (int i = 0; i < n; ++i)
      if (i == 0 || rng() % 10 < 3) keep.push_back(i);
  }
  return keep;
}

}  // namespace

void check_compact(Backend& be, DType dt, int block_size, int kv_dim, uint32_t seed) {
  SCOPED_TRACE(std::string(dname(dt)) + " block=" + std::to_string(block_size) + " kv_dim=" + std::to_string(kv_dim) +
               " seed=" + std::to_string(seed));
  std::mt19937 rng(seed);
  const std::vector<int> lengths = {5 * block_size + 3, 1, block_size, 2 * block_size + 1, 97, 64};
  PagedFixture f(be, dt, block_size, kv_dim, lengths, rng, false);
  const int J = int(lengths.size());
  std::vector<std::vector<int32_t>> keeps;
  std::vector<int32_t> job_table, keep_all, offsets{0};
  for (int j = 0; j < J; ++j) {
    keeps.push_back(random_keep(rng, lengths[size_t(j)], j == 5 ? 4 : j % 4 == 3 || j >= 4 ? 3 : j % 4));
    job_table.push_back(j);
    keep_all.insert(keep_all.end(), keeps.back().begin(), keeps.back().end());
    offsets.push_back(int32_t(keep_all.size()));
  }
  // Even seeds: ordered compaction (entry m <- keep[m]). Odd seeds: the moves GpuKVPool sends
  // (plan_slot_moves), starting from a random slot map on every other table: logical entry i is the
  // entry written at slot map[i], and the result is read back through the new map.
  const bool moves = seed % 2 == 1;
  std::vector<std::vector<int32_t>> maps(static_cast<size_t>(J)), new_maps(static_cast<size_t>(J));
  if (!moves) {
    be.paged_compact(f.kv, PagedJobs{be.put(job_table), be.put(keep_all), be.put(offsets), nullptr, J});
  } else {
    std::vector<int32_t> move_jobs, src, dst, move_offsets{0};
    for (int j = 0; j < J; ++j) {
      if (j % 2 == 1) {
        maps[size_t(j)].resize(size_t(lengths[size_t(j)]));
        std::iota(maps[size_t(j)].begin(), maps[size_t(j)].end(), 0);
        std::shuffle(maps[size_t(j)].begin(), maps[size_t(j)].end(), rng);
      }
      new_maps[size_t(j)] = maps[size_t(j)];
      const size_t before = src.size();
      plan_slot_moves(new_maps[size_t(j)], lengths[size_t(j)], keeps[size_t(j)], 0, src, dst);
      if (src.size() == before) continue;
      move_jobs.push_back(j);
      move_offsets.push_back(int32_t(src.size()));
    }
    if (!move_jobs.empty()) {
      PagedJobs pj{be.put(job_table), be.put(src), be.put(move_offsets), nullptr, int(move_jobs.size())};
      pj.job_table = be.put(move_jobs);
      pj.dest = be.put(dst);
      be.paged_compact(f.kv, pj);
    }
  }

  const int used_before = f.pool->used_blocks();
  int freed = 0;
  for (int j = 0; j < J; ++j) {
    const int n0 = lengths[size_t(j)];
    // The CPU twin: KVLayer::retain on the entries in logical order (with a random map the
    // positions are not increasing along it, so the twin's rows are gathered here).
    std::vector<float> rk, rv;
    std::vector<int32_t> rp;
    if (maps[size_t(j)].empty()) {
      KVLayer ref(kv_dim);
      ref.append(f.K[size_t(j)].data(), f.V[size_t(j)].data(), f.P[size_t(j)].data(), n0);
      ref.retain(keeps[size_t(j)]);
      rk.assign(ref.keys(), ref.keys() + size_t(ref.size()) * kv_dim);
      rv.assign(ref.values(), ref.values() + size_t(ref.size()) * kv_dim);
      rp.assign(ref.positions(), ref.positions() + ref.size());
    } else {
      for (int32_t i : keeps[size_t(j)]) {
        const size_t e = size_t(slot_of(maps[size_t(j)], i));
        rk.insert(rk.end(), &f.K[size_t(j)][e * kv_dim], &f.K[size_t(j)][(e + 1) * kv_dim]);
        rv.insert(rv.end(), &f.V[size_t(j)][e * kv_dim], &f.V[size_t(j)][(e + 1) * kv_dim]);
        rp.push_back(f.P[size_t(j)][e]);
      }
    }
    const int n = int(rp.size());
    std::vector<float> k0, v0, k(size_t(n) * kv_dim), v(size_t(n) * kv_dim);
    std::vector<int32_t> p0, p(static_cast<size_t>(n));
    f.read(be, j, n, k0, v0, p0);  // slot order
    for (int m = 0; m < n; ++m) {
      const size_t e = size_t(slot_of(new_maps[size_t(j)], m));
      ASSERT_LT(e, size_t(n)) << "job " << j << ": the new slot map leaves the table";
      std::copy_n(&k0[e * kv_dim], kv_dim, &k[size_t(m) * kv_dim]);
      std::copy_n(&v0[e * kv_dim], kv_dim, &v[size_t(m) * kv_dim]);
      p[size_t(m)] = p0[e];
    }
    EXPECT_EQ(k, rk) << "job " << j << " K";
    EXPECT_EQ(v, rv) << "job " << j << " V";
    EXPECT_EQ(p, rp) << "job " << j << " positions";
    freed += f.pool->blocks_for(lengths[size_t(j)]) - f.pool->blocks_for(n);
    f.pool->resize(f.seqs[size_t(j)], 0, n);  // the tail blocks go back to the pool
  }
  EXPECT_EQ(f.pool->used_blocks(), used_before - freed);
  f.pool->check_invariants();
  EXPECT_EQ(be.get(f.kv.error_flag, 1)[0], 0);
}

void check_rope_write(Backend& be, DType dt, int block_size, int H, int Hkv, int hd, uint32_t seed) {
  SCOPED_TRACE(std::string(dname(dt)) + " block=" + std::to_string(block_size) + " heads=" + std::to_string(H) + "/" +
               std::to_string(Hkv) + " head_dim=" + std::to_string(hd) + " seed=" + std::to_string(seed));
  std::mt19937 rng(seed);
  const int kv_dim = Hkv * hd;
  // Tables of different lengths; each gets one new row at its end (a decode step), written over
  // the entry the fixture put there (so a wrong slot shows up as the fixture's values).
  const std::vector<int> lengths = {3 * block_size + 2, 1, block_size, 2 * block_size};
  PagedFixture f(be, dt, block_size, kv_dim, lengths, rng, false);
  const int R = int(lengths.size());
  const int64_t stride = int64_t(H + 2 * Hkv) * hd + 6, q_stride = int64_t(H) * hd + 2;
  const std::vector<float> qkv = randn(rng, size_t(R) * size_t(stride));
  std::vector<int32_t> pos(static_cast<size_t>(R)), rt(static_cast<size_t>(R)), re(static_cast<size_t>(R));
  for (int r = 0; r < R; ++r) {
    pos[size_t(r)] = int32_t(5000 + rng() % 3000);
    rt[size_t(r)] = r;
    re[size_t(r)] = lengths[size_t(r)] - 1;
  }
  const ops::Rope rope = ops::Rope::make(hd, 10000.f, "default", 1.f, 1.f, 4.f, 8192);
  const size_t es = dtype_size(dt);
  void* q_out = be.alloc(size_t(R) * size_t(q_stride) * es);
  be.fill(q_out, 0, size_t(R) * size_t(q_stride) * es);
  RopeWriteArgs a;
  a.qkv = be.put(qkv), a.qkv_stride = stride, a.n_heads = H, a.n_kv_heads = Hkv, a.head_dim = hd;
  a.pos = be.put(pos), a.inv_freq = be.put(rope.inv_freq), a.q_out = q_out, a.q_out_stride = q_stride;
  be.paged_rope_write(f.kv, PagedRows{be.put(rt), be.put(re), R}, a);

  const std::vector<float> got_q = get_as(be, dt, q_out, size_t(R) * size_t(q_stride));
  for (int r = 0; r < R; ++r) {
    // CPU twin: ops::Rope on the float32 q and k heads, then every value rounded once.
    std::vector<float> q(qkv.begin() + long(r * stride), qkv.begin() + long(r * stride + H * hd));
    std::vector<float> k(qkv.begin() + long(r * stride + H * hd), qkv.begin() + long(r * stride + (H + Hkv) * hd));
    std::vector<float> v(qkv.begin() + long(r * stride + (H + Hkv) * hd), qkv.begin() + long(r * stride + (H + 2 * Hkv) * hd));
    rope.apply(q.data(), 1, H, &pos[size_t(r)]);
    rope.apply(k.data(), 1, Hkv, &pos[size_t(r)]);
    round_to(dt, q), round_to(dt, k), round_to(dt, v);
    const std::vector<float> gq(got_q.begin() + long(r * q_stride), got_q.begin() + long(r * q_stride + H * hd));
    expect_close(gq, q, tolerance(dt), "q of row " + std::to_string(r));
    EXPECT_EQ(got_q[size_t(r * q_stride + H * hd)], 0.f) << "q_out written past n_heads * head_dim";
    const int n = lengths[size_t(r)];
    std::vector<float> gk, gv;
    std::vector<int32_t> gp;
    f.read(be, r, n, gk, gv, gp);
    expect_close(std::vector<float>(gk.begin() + long(size_t(n - 1) * kv_dim), gk.end()), k, tolerance(dt),
                 "K of row " + std::to_string(r));
    EXPECT_EQ(std::vector<float>(gv.begin() + long(size_t(n - 1) * kv_dim), gv.end()), v) << "V of row " << r;
    EXPECT_EQ(gp[size_t(n - 1)], pos[size_t(r)]) << "position of row " << r;
    // The entries before it are the fixture's.
    EXPECT_EQ(std::vector<float>(gk.begin(), gk.begin() + long(size_t(n - 1) * kv_dim)),
              std::vector<float>(f.K[size_t(r)].begin(), f.K[size_t(r)].begin() + long(size_t(n - 1) * kv_dim)));
  }
  EXPECT_EQ(be.get(f.kv.error_flag, 1)[0], 0);
}

void check_merge(Backend& be, DType dt, int block_size, int kv_dim, int n_layers, int N, double budget, uint32_t seed) {
  SCOPED_TRACE(std::string(dname(dt)) + " block=" + std::to_string(block_size) + " kv_dim=" + std::to_string(kv_dim) +
               " N=" + std::to_string(N) + " budget=" + std::to_string(budget) + " seed=" + std::to_string(seed));
  std::mt19937 rng(seed);
  // One table per layer of one sequence; positions 0..N-1 as after a prefill.
  PagedFixture f(be, dt, block_size, kv_dim, std::vector<int>(size_t(n_layers), N), rng, true);

  // CPU twin: the elastic policy's plan applied to a KVCache holding the same (rounded) entries.
  KVCache cache(n_layers, kv_dim);
  std::vector<std::vector<float>> importance;
  for (int l = 0; l < n_layers; ++l) {
    cache.layer(l).append(f.K[size_t(l)].data(), f.V[size_t(l)].data(), f.P[size_t(l)].data(), N);
    std::vector<float> imp(static_cast<size_t>(N));
    for (float& x : imp) x = std::uniform_real_distribution<float>(0.f, 1.f)(rng);
    importance.push_back(imp);
  }
  PolicyOptions opt;
  opt.budget = budget;
  auto policy = make_policy("elastic", opt);
  const KeepPlan plan = policy->after_prefill(cache, importance, N);
  for (const LayerKeep& k : plan.layers) EXPECT_TRUE(k.merge) << "elastic's prefill plan merges";
  cache.apply(plan, policy->name());

  std::vector<int32_t> job_table, keep_all, offsets{0}, lengths;
  for (int l = 0; l < n_layers; ++l) {
    const KVLayer& L = cache.layer(l);
    job_table.push_back(l);
    lengths.push_back(N);
    keep_all.insert(keep_all.end(), L.positions(), L.positions() + L.size());  // position == index after a prefill
    offsets.push_back(int32_t(keep_all.size()));
  }
  const PagedJobs jobs{be.put(job_table), be.put(keep_all), be.put(offsets), be.put(lengths), n_layers};
  be.paged_merge(f.kv, jobs);
  be.paged_compact(f.kv, jobs);
  for (int l = 0; l < n_layers; ++l) {
    const KVLayer& L = cache.layer(l);
    std::vector<float> k, v;
    std::vector<int32_t> p;
    f.read(be, l, L.size(), k, v, p);
    expect_close(k, std::vector<float>(L.keys(), L.keys() + size_t(L.size()) * kv_dim), tolerance(dt),
                 "merged K of layer " + std::to_string(l));
    expect_close(v, std::vector<float>(L.values(), L.values() + size_t(L.size()) * kv_dim), tolerance(dt),
                 "merged V of layer " + std::to_string(l));
    EXPECT_EQ(p, std::vector<int32_t>(L.positions(), L.positions() + L.size())) << "layer " << l << " positions";
  }
  EXPECT_EQ(be.get(f.kv.error_flag, 1)[0], 0);
}

void check_paged_errors(Backend& be) {
  // Two sequences of 20 entries (block 8: 3 blocks each); sequence 1's table names a block that does
  // not exist. Decode must flag it, skip those keys, and fault nowhere.
  const int bs = 8, hd = 32, n = 20;
  std::mt19937 rng(5);
  PagedKV kv;
  kv.dtype = DType::BF16, kv.n_blocks = 6, kv.block_size = bs, kv.kv_dim = hd;
  kv.pool = be.alloc(paged_pool_bytes(kv));
  kv.positions = static_cast<int32_t*>(be.alloc(paged_positions_bytes(kv)));
  const std::vector<int32_t> tables = {0, 1, 2, 3, 4, 1000};
  kv.tables = be.put(tables), kv.table_stride = 3;
  kv.error_flag = be.put(std::vector<int>{0});
  std::vector<int32_t> rt, re, pos;
  for (int b = 0; b < 2; ++b)
    for (int e = 0; e < n; ++e) rt.push_back(b), re.push_back(e), pos.push_back(e);
  std::vector<float> k = randn(rng, rt.size() * hd), v = randn(rng, rt.size() * hd);
  be.paged_write(kv, PagedRows{be.put(rt), be.put(re), int(rt.size())}, DType::F32, be.put(k), be.put(v), 0, be.put(pos));
  EXPECT_EQ(be.get(kv.error_flag, 1)[0], kPagedBadBlock) << "writing through block id 1000";

  // An entry beyond the table's width.
  be.upload(kv.error_flag, std::vector<int>{0}.data(), sizeof(int));
  be.paged_write(kv, PagedRows{be.put(std::vector<int32_t>{0}), be.put(std::vector<int32_t>{24}), 1}, DType::F32,
                 be.put(k), be.put(v), 0, be.put(pos));
  EXPECT_EQ(be.get(kv.error_flag, 1)[0], kPagedBadEntry) << "entry 24 of a 3-block table";

  be.upload(kv.error_flag, std::vector<int>{0}.data(), sizeof(int));
  DecodeAttentionArgs a;
  std::vector<float> q = randn(rng, 2 * hd);
  a.q = put_as(be, DType::BF16, q), a.batch = 2, a.kv = kv, a.lengths = be.put(std::vector<int32_t>{n, n}), a.max_len = n;
  a.n_heads = 1, a.n_kv_heads = 1, a.head_dim = hd, a.scale = 0.2f;
  a.out = be.alloc(2 * hd * 2);
  a.workspace_bytes = attention_decode_workspace_bytes(2, 1, 1, hd, n, false);
  a.workspace = be.alloc(a.workspace_bytes);
  be.attention_decode(a);
  EXPECT_EQ(be.get(kv.error_flag, 1)[0], kPagedBadBlock);
  const std::vector<float> out = get_as(be, DType::BF16, a.out, 2 * hd);
  for (float x : out) EXPECT_TRUE(std::isfinite(x));
}


// ---------------------------------------------------------------------------------------------
// Skinny products.

std::string GemvCase::str() const {
  std::ostringstream o;
  o << "gemv " << dname(dtype) << " -> " << dname(y_dtype) << " " << rows << "x" << in << "x" << out
    << (x_pad ? " x_pad" : "") << (y_pad ? " y_pad" : "") << (accumulate ? " accumulate" : "") << (swiglu ? " swiglu" : "");
  return o.str();
}

void check_gemv(Backend& be, const GemvCase& c, const std::function<void(const GemvArgs&)>& run) {
  SCOPED_TRACE(c.str());
  std::mt19937 rng(c.seed);
  const int64_t xs = c.in + c.x_pad, ys = c.out + c.y_pad;
  auto rounded = [&](std::vector<float> v) {
    round_to(c.dtype, v);
    return v;
  };
  const std::vector<float> w = rounded(randn(rng, size_t(c.out) * c.in, 0.05f));
  const std::vector<float> wu = rounded(randn(rng, size_t(c.out) * c.in, 0.05f));
  const std::vector<float> x = rounded(randn(rng, size_t(c.rows) * xs));
  std::vector<float> y0 = randn(rng, size_t(c.rows) * ys);
  if (c.y_dtype != DType::F32) round_to(c.y_dtype, y0);

  // Reference: ops::linear_reference on the dense rows, then SwiGLU / accumulate, into y0's layout
  // (padding columns keep their values).
  std::vector<float> xd(size_t(c.rows) * c.in);
  for (int r = 0; r < c.rows; ++r)
    std::copy_n(&x[size_t(r) * xs], c.in, &xd[size_t(r) * c.in]);
  auto product = [&](const std::vector<float>& wf) {
    TensorView tv;
    tv.dtype = DType::F32, tv.shape = {c.out, c.in}, tv.data = wf.data(), tv.supported = true;
    Linear L;
    L.w = &tv, L.in = c.in, L.out = c.out;
    std::vector<float> y(size_t(c.rows) * c.out);
    ops::linear_reference(xd.data(), c.rows, L, y.data());
    return y;
  };
  std::vector<float> prod = product(w);
  if (c.swiglu) ops::swiglu(prod.data(), product(wu).data(), prod.size());
  std::vector<float> ref = y0;
  for (int r = 0; r < c.rows; ++r)
    for (int o = 0; o < c.out; ++o) {
      float& dst = ref[size_t(r) * ys + o];
      dst = (c.accumulate ? dst : 0.f) + prod[size_t(r) * c.out + o];
    }

  GemvArgs a;
  a.x = put_as(be, c.dtype, x), a.x_stride = xs;
  a.w = put_as(be, c.dtype, w), a.w_dtype = c.dtype;
  if (c.swiglu) a.w_up = put_as(be, c.dtype, wu);
  a.rows = c.rows, a.in = c.in, a.out = c.out;
  a.y = put_as(be, c.y_dtype, y0), a.y_stride = ys, a.y_dtype = c.y_dtype, a.accumulate = c.accumulate;
  if (run) run(a);
  else be.gemv(a);
  const std::vector<float> got = get_as(be, c.y_dtype, a.y, y0.size());
  // float32 outputs: the reference sums in double, the kernel in float32 over `in` terms.
  expect_close(got, ref, c.y_dtype == DType::F32 ? 1e-4 : tolerance(c.y_dtype), "gemv");
  for (int r = 0; r < c.rows; ++r)
    for (int64_t o = c.out; o < ys; ++o)
      ASSERT_EQ(got[size_t(r) * ys + o], y0[size_t(r) * ys + o]) << "gemv wrote past out in row " << r;
}

std::vector<GemvCase> gemv_cases(bool full) {
  std::vector<GemvCase> cs;
  uint32_t seed = 900;
  const int ins_full[] = {8, 264, 1000, 4096, 11008}, ins_small[] = {8, 264, 4104};
  const int outs_full[] = {1, 17, 300}, outs_small[] = {1, 17};
  const auto& ins = full ? std::vector<int>(std::begin(ins_full), std::end(ins_full))
                         : std::vector<int>(std::begin(ins_small), std::end(ins_small));
  const auto& outs = full ? std::vector<int>(std::begin(outs_full), std::end(outs_full))
                          : std::vector<int>(std::begin(outs_small), std::end(outs_small));
  for (DType t : {DType::F16, DType::BF16})
    for (int rows = 1; rows <= kGemvMaxRows; rows += (full ? 1 : 3))
      for (int in : ins)
        for (int out : outs) {
          GemvCase c;
          c.dtype = t, c.rows = rows, c.in = in, c.out = out, c.seed = seed++;
          const int kind = int(c.seed % 4);  // vary the rest across the grid
          c.y_dtype = kind == 1 || kind == 3 ? t : DType::F32;
          c.accumulate = kind == 2;
          c.swiglu = kind == 3 || (kind == 0 && rows % 2 == 0);
          c.x_pad = kind == 1 ? 8 : 0;
          c.y_pad = kind == 2 ? 3 : 0;
          cs.push_back(c);
        }
  return cs;
}

std::vector<GemvCase> skinny_cases() {
  std::vector<GemvCase> cs;
  uint32_t seed = 1700;
  // (in, out): one chunk of 64 columns and one split; 9 splits; 64 splits of one chunk over 2 blocks
  // of outputs; 86 splits of 2 chunks (a 7B MLP's down product's width); 8 splits over 8 blocks of
  // outputs; one split of 2 chunks over 266 blocks, the last ragged.
  const std::pair<int, int> shapes[] = {{64, 17}, {576, 300}, {4096, 129}, {11008, 260}, {1024, 1024}, {128, 34000}};
  for (DType t : {DType::F16, DType::BF16})
    for (int rows : {5, 9, 16, 17, 40, 64})
      for (const auto& [in, out] : shapes) {
        if (in * int64_t(out) * rows > int64_t(300) << 20) continue;  // the double reference's time
        GemvCase c;
        c.dtype = t, c.rows = rows, c.in = in, c.out = out, c.seed = seed++;
        const int kind = int(c.seed % 4);
        c.y_dtype = kind == 1 || kind == 3 ? t : DType::F32;
        c.accumulate = kind == 2;
        c.swiglu = kind == 3 || (kind == 0 && rows % 2 == 0);
        c.x_pad = kind == 1 ? 8 : 0;
        c.y_pad = kind == 2 ? 3 : 0;
        cs.push_back(c);
      }
  return cs;
}

void check_gemv_refusals(Backend& be) {
  const std::vector<float> z(64 * 16, 0.f);
  GemvArgs ok;
  ok.x = put_as(be, DType::F16, z), ok.w = put_as(be, DType::F16, z), ok.w_dtype = DType::F16;
  ok.rows = 2, ok.in = 16, ok.out = 16;
  ok.y = be.alloc(64 * 16 * 4);
  EXPECT_TRUE(gemv_fits(ok));
  auto refused = [&](GemvArgs a, const char* what) {
    EXPECT_FALSE(gemv_fits(a)) << what;
    EXPECT_THROW(be.gemv(a), Error) << what;
  };
  GemvArgs a = ok;
  a.rows = kGemvMaxRows + 1;
  refused(a, "too many rows");
  a = ok, a.rows = 0;
  refused(a, "no rows");
  a = ok, a.in = 12;
  refused(a, "in not a multiple of 8");
  a = ok, a.x_stride = 20;
  refused(a, "x_stride not a multiple of 8");
  a = ok, a.x = static_cast<const char*>(ok.x) + 2;
  refused(a, "misaligned x");
  a = ok, a.w_dtype = DType::F32;
  refused(a, "float32 weights");
  a = ok, a.y_dtype = DType::BF16;
  refused(a, "y of another 16-bit type");
  a = ok, a.y_dtype = DType::F16, a.accumulate = true;
  refused(a, "accumulate into a 16-bit y");
  a = ok, a.y = nullptr;
  refused(a, "no y");
}

void check_head_tables(Backend& be, DType dt, int block_size, int n_heads, int n_kv_heads, int head_dim, uint32_t seed) {
  SCOPED_TRACE(std::string(dname(dt)) + " block=" + std::to_string(block_size) + " heads=" + std::to_string(n_heads) +
               "/" + std::to_string(n_kv_heads) + " hd=" + std::to_string(head_dim) + " seed=" + std::to_string(seed));
  std::mt19937 rng(seed);
  const int H = n_kv_heads, hd = head_dim, kvd = H * hd, qd = n_heads * hd;
  // Sequences 0..2 become per-head; sequence 3 stays shared (a mixed decode batch).
  const std::vector<int> lengths = {5 * block_size + 3, 2 * block_size + 1, 37, 21};
  const int S = int(lengths.size()), SH = 3;
  int blocks = 4;
  for (int n : lengths) blocks += 2 * ((n + 1 + block_size - 1) / block_size) + H;
  BlockPool pool(blocks, block_size, 1, paged_block_bytes(block_size, kvd, dtype_size(dt)), 0, H);
  std::vector<BlockPool::SeqId> seq;
  for (int s = 0; s < S; ++s) seq.push_back(pool.add_sequence());
  for (int s = S - 1; s >= 0; --s) pool.resize(seq[size_t(s)], 0, lengths[size_t(s)]);
  int max_len = 0;
  for (int n : lengths) max_len = std::max(max_len, n + 1);
  const int stride = (max_len + block_size - 1) / block_size + 1;

  PagedKV kv;
  kv.dtype = dt, kv.n_blocks = blocks, kv.block_size = block_size, kv.kv_dim = kvd;
  kv.pool = be.alloc(paged_pool_bytes(kv));
  be.fill(kv.pool, 0xff, paged_pool_bytes(kv));
  kv.positions = static_cast<int32_t*>(be.alloc(paged_positions_bytes(kv)));
  kv.error_flag = be.put(std::vector<int>{0});
  auto with_tables = [&](const std::vector<std::vector<int32_t>>& rows) {
    std::vector<int32_t> t(rows.size() * stride, -1);
    for (size_t r = 0; r < rows.size(); ++r) std::copy(rows[r].begin(), rows[r].end(), t.begin() + long(r * stride));
    PagedKV v = kv;
    v.tables = be.put(t), v.table_stride = stride;
    return v;
  };

  // Entries (rounded to the pool's type), written in logical order except sequence 1, whose
  // logical entry i sits at slot map[i] (a table compacted by moves before).
  std::vector<std::vector<float>> K, V;
  std::vector<std::vector<int32_t>> P;
  std::vector<KVLayer> twin;
  {
    std::vector<std::vector<int32_t>> rows;
    std::vector<int32_t> rt, re, ap;
    std::vector<float> ak, av;
    for (int s = 0; s < S; ++s) {
      const int n = lengths[size_t(s)];
      K.push_back(randn(rng, size_t(n) * kvd)), V.push_back(randn(rng, size_t(n) * kvd));
      round_to(dt, K.back()), round_to(dt, V.back());
      P.push_back(increasing_positions(rng, n, true));
      std::vector<int32_t> map;
      if (s == 1) {
        map.resize(size_t(n));
        std::iota(map.begin(), map.end(), 0);
        std::shuffle(map.begin(), map.end(), rng);
        pool.set_slot_map(seq[size_t(s)], 0, map);
      }
      for (int e = 0; e < n; ++e) rt.push_back(s), re.push_back(slot_of(map, e)), ap.push_back(P.back()[size_t(e)]);
      ak.insert(ak.end(), K.back().begin(), K.back().end());
      av.insert(av.end(), V.back().begin(), V.back().end());
      rows.push_back(pool.table(seq[size_t(s)], 0));
      twin.emplace_back(kvd, H);
      twin.back().append(K.back().data(), V.back().data(), P.back().data(), n);
    }
    be.paged_write(with_tables(rows), PagedRows{be.put(rt), be.put(re), int(rt.size())}, dt, put_as(be, dt, ak),
                   put_as(be, dt, av), 0, be.put(ap));
  }

  // Head table `h` of sequence s read back from the pool (head layout) against the twin's head.
  auto expect_heads = [&](const char* what) {
    const std::vector<float> all = get_as(be, dt, kv.pool, paged_pool_bytes(kv) / dtype_size(dt));
    for (int s = 0; s < SH; ++s)
      for (int h = 0; h < H; ++h) {
        const int n = pool.head_entries(seq[size_t(s)], 0, h);
        ASSERT_EQ(n, twin[size_t(s)].size(h)) << what;
        const auto& t = pool.head_table(seq[size_t(s)], 0, h);
        std::vector<float> k, v;
        for (int e = 0; e < n; ++e) {  // sub-block sb: part sb % H of block sb / H (kernels.h, PagedHeads)
          const int sb = t[size_t(e / block_size)];
          const size_t off = size_t(sb / H) * 2 * block_size * kvd + (size_t(sb % H) * block_size + size_t(e % block_size)) * hd;
          k.insert(k.end(), all.begin() + long(off), all.begin() + long(off + hd));
          v.insert(v.end(), all.begin() + long(off + size_t(block_size) * kvd), all.begin() + long(off + size_t(block_size) * kvd + hd));
        }
        const float* rk = twin[size_t(s)].head_keys(h);
        const float* rv = twin[size_t(s)].head_values(h);
        EXPECT_EQ(k, std::vector<float>(rk, rk + size_t(n) * hd)) << what << ": K of sequence " << s << " head " << h;
        EXPECT_EQ(v, std::vector<float>(rv, rv + size_t(n) * hd)) << what << ": V of sequence " << s << " head " << h;
      }
  };
  // The memory held: the shared sequence's blocks and exactly ceil(n / block_size) sub-blocks per
  // head table; the blocks in use are those plus the split blocks (whose free parts wait there).
  auto expect_blocks = [&](const char* what) {
    const int shared = pool.blocks_for(pool.entries(seq[size_t(SH)], 0));
    int subs = 0;
    for (int s = 0; s < SH; ++s)
      for (int h = 0; h < H; ++h) subs += (twin[size_t(s)].size(h) + block_size - 1) / block_size;
    const BlockPoolStats st = pool.stats();
    EXPECT_EQ(st.sub_blocks_used, subs) << what;
    EXPECT_EQ(pool.used_blocks(), shared + st.split_blocks) << what;
    EXPECT_EQ(st.split_blocks * H, st.sub_blocks_used + st.sub_blocks_free) << what;
    pool.check_invariants();
  };
  // Random head plans: per head a random subset of a random size (at least one entry; head 0 of
  // sequence 0 keeps everything, head H-1 of sequence 2 its last entry only).
  auto random_plan = [&](int s) {
    LayerKeep k;
    k.layer = 0;
    k.before = twin[size_t(s)].per_head() ? twin[size_t(s)].total_entries() : twin[size_t(s)].size();
    for (int h = 0; h < H; ++h) {
      const int n = twin[size_t(s)].size(h);
      std::vector<int32_t> keep;
      if (s == 0 && h == 0) keep = random_keep(rng, n, 0);
      else if (s == 2 && h == H - 1) keep = random_keep(rng, n, 1);
      else {
        const int want = 1 + int(rng() % unsigned(n));
        std::vector<int32_t> all(static_cast<size_t>(n));
        std::iota(all.begin(), all.end(), 0);
        std::shuffle(all.begin(), all.end(), rng);
        keep.assign(all.begin(), all.begin() + want);
        std::sort(keep.begin(), keep.end());
      }
      k.head_keep.push_back(keep);
    }
    return k;
  };

  // 1. The split: every head's kept columns of the shared table into head tables of its own.
  {
    std::vector<std::vector<int32_t>> rows;
    std::vector<int32_t> src, src_head, dst, keep, offsets{0};
    std::vector<LayerKeep> plans;
    for (int s = 0; s < SH; ++s) {
      plans.push_back(random_plan(s));
      std::vector<int> counts;
      for (const auto& k : plans.back().head_keep) counts.push_back(int(k.size()));
      pool.split_heads(seq[size_t(s)], 0, counts);
      const int src_row = int(rows.size());
      rows.push_back(pool.table(seq[size_t(s)], 0));
      const std::vector<int32_t> map = pool.slot_map(seq[size_t(s)], 0);
      for (int h = 0; h < H; ++h) {
        dst.push_back(int32_t(rows.size()));
        rows.push_back(pool.head_table(seq[size_t(s)], 0, h));
        src.push_back(src_row), src_head.push_back(h);
        for (int32_t e : plans.back().head_keep[size_t(h)]) keep.push_back(slot_of(map, e));
        offsets.push_back(int32_t(keep.size()));
      }
    }
    PagedHeadJobs j{be.put(src), be.put(src_head), be.put(dst), be.put(keep), be.put(offsets), int(dst.size()), H};
    be.paged_head_compact(with_tables(rows), j);
    for (int s = 0; s < SH; ++s) {
      pool.release_shared(seq[size_t(s)], 0);
      twin[size_t(s)].apply(plans[size_t(s)]);
    }
    expect_heads("split");
    expect_blocks("split");
  }
  // 2. In place: each head table keeps a random list of its own entries, then shrinks.
  {
    std::vector<std::vector<int32_t>> rows;
    std::vector<int32_t> src, src_head, dst, keep, offsets{0};
    std::vector<LayerKeep> plans;
    for (int s = 0; s < SH; ++s) {
      plans.push_back(random_plan(s));
      for (int h = 0; h < H; ++h) {
        src.push_back(int32_t(rows.size())), dst.push_back(int32_t(rows.size())), src_head.push_back(-1);
        rows.push_back(pool.head_table(seq[size_t(s)], 0, h));
        const auto& k = plans.back().head_keep[size_t(h)];
        keep.insert(keep.end(), k.begin(), k.end());
        offsets.push_back(int32_t(keep.size()));
      }
    }
    PagedHeadJobs j{be.put(src), be.put(src_head), be.put(dst), be.put(keep), be.put(offsets), int(dst.size()), H};
    be.paged_head_compact(with_tables(rows), j);
    for (int s = 0; s < SH; ++s) {
      for (int h = 0; h < H; ++h) pool.resize_head(seq[size_t(s)], 0, h, int(plans[size_t(s)].head_keep[size_t(h)].size()));
      twin[size_t(s)].apply(plans[size_t(s)]);
    }
    expect_heads("in-place compaction");
    expect_blocks("in-place compaction");
  }

  // 3. A decode step: one new row per sequence (the head tables grow by one entry per head), its
  // RoPE write against the same write into a scratch shared table.
  for (int s = 0; s < S; ++s) pool.append_all(seq[size_t(s)], 1);
  std::vector<int32_t> flags(static_cast<size_t>(S), 0), head_lengths(size_t(S) * H, 0), lens(static_cast<size_t>(S));
  std::vector<std::vector<int32_t>> rows;
  for (int s = 0; s < S; ++s) rows.push_back(pool.table(seq[size_t(s)], 0));  // per-head sequences: empty
  for (int s = 0; s < S; ++s)
    for (int h = 0; h < H; ++h) rows.push_back(s < SH ? pool.head_table(seq[size_t(s)], 0, h) : std::vector<int32_t>{});
  for (int s = 0; s < S; ++s) {
    lens[size_t(s)] = pool.entries(seq[size_t(s)], 0);
    if (s >= SH) continue;
    flags[size_t(s)] = 1;
    for (int h = 0; h < H; ++h) head_lengths[size_t(s) * H + h] = pool.head_entries(seq[size_t(s)], 0, h);
  }
  const PagedKV kvt = with_tables(rows);
  PagedHeads heads;
  heads.per_head = be.put(flags);
  heads.tables = kvt.tables + size_t(S) * stride;
  heads.lengths = be.put(head_lengths);
  std::vector<float> qkv = randn(rng, size_t(S) * (qd + 2 * kvd));
  std::vector<int32_t> pos(static_cast<size_t>(S)), row_entry(static_cast<size_t>(S)), row_table(static_cast<size_t>(S));
  for (int s = 0; s < S; ++s) {
    pos[size_t(s)] = P[size_t(s)].back() + 1 + s;
    row_table[size_t(s)] = s;
    row_entry[size_t(s)] = lens[size_t(s)] - 1;  // shared sequence: its new last entry
  }
  std::vector<float> inv_freq(static_cast<size_t>(hd / 2));
  for (int i = 0; i < hd / 2; ++i) inv_freq[size_t(i)] = std::pow(10000.f, -2.f * float(i) / float(hd));
  RopeWriteArgs rw;
  rw.qkv = be.put(qkv), rw.qkv_stride = qd + 2 * kvd, rw.n_heads = n_heads, rw.n_kv_heads = H, rw.head_dim = hd;
  rw.pos = be.put(pos), rw.inv_freq = be.put(inv_freq);
  const size_t es = dtype_size(dt);
  rw.q_out = be.alloc(size_t(S) * qd * es), rw.q_out_stride = qd;
  // The reference: the same rows written into a scratch shared layout (one table of S fresh blocks).
  {
    PagedKV ref;
    ref.dtype = dt, ref.n_blocks = S, ref.block_size = block_size, ref.kv_dim = kvd;
    ref.pool = be.alloc(paged_pool_bytes(ref));
    ref.positions = static_cast<int32_t*>(be.alloc(paged_positions_bytes(ref)));
    std::vector<int32_t> rt(static_cast<size_t>(S)), re(static_cast<size_t>(S), 0), ids(static_cast<size_t>(S));
    std::iota(rt.begin(), rt.end(), 0), std::iota(ids.begin(), ids.end(), 0);
    ref.tables = be.put(ids), ref.table_stride = 1;
    RopeWriteArgs rr = rw;
    rr.q_out = be.alloc(size_t(S) * qd * es);
    be.paged_rope_write(ref, PagedRows{be.put(rt), be.put(re), S}, rr);
    RopeWriteArgs hw = rw;
    hw.heads = heads;
    be.paged_rope_write(kvt, PagedRows{be.put(row_table), be.put(row_entry), S}, hw);
    EXPECT_EQ(get_as(be, dt, hw.q_out, size_t(S) * qd), get_as(be, dt, rr.q_out, size_t(S) * qd)) << "rope write: q";
    const std::vector<float> want = get_as(be, dt, ref.pool, paged_pool_bytes(ref) / es);
    for (int s = 0; s < SH; ++s) {  // the twin gets the new row too (decode appends to every head)
      std::vector<float> k(want.begin() + long(size_t(s) * 2 * block_size * kvd), want.begin() + long((size_t(s) * 2 * block_size + 1) * kvd));
      std::vector<float> v(want.begin() + long((size_t(s) * 2 + 1) * block_size * kvd),
                           want.begin() + long(((size_t(s) * 2 + 1) * block_size + 1) * kvd));
      twin[size_t(s)].append(k.data(), v.data(), &pos[size_t(s)], 1);
    }
    expect_heads("rope write into head tables");
    // The shared sequence's new row: its table, entry lens - 1, as the reference wrote it.
    const std::vector<float> all = get_as(be, dt, kv.pool, paged_pool_bytes(kv) / es);
    const int e = lens[size_t(SH)] - 1;
    const size_t off = (size_t(rows[size_t(SH)][size_t(e / block_size)]) * 2 * block_size + size_t(e % block_size)) * kvd;
    EXPECT_EQ(std::vector<float>(all.begin() + long(off), all.begin() + long(off + kvd)),
              std::vector<float>(want.begin() + long(size_t(SH) * 2 * block_size * kvd),
                                 want.begin() + long((size_t(SH) * 2 * block_size + 1) * kvd)))
        << "rope write: the shared sequence's K";
    // Twin of the shared sequence: its entries plus the new row, for the attention below.
    K[size_t(SH)].insert(K[size_t(SH)].end(), all.begin() + long(off), all.begin() + long(off + kvd));
    V[size_t(SH)].insert(V[size_t(SH)].end(), all.begin() + long(off + size_t(block_size) * kvd),
                         all.begin() + long(off + size_t(block_size) * kvd + kvd));
    P[size_t(SH)].push_back(pos[size_t(SH)]);
  }

  // 4. Decode attention over the mixed batch against ops::attention over each head's own entries.
  std::vector<float> q = randn(rng, size_t(S) * qd, 1.5f);
  round_to(dt, q);
  const float scale = 1.f / std::sqrt(float(hd));
  std::vector<float> out_ref(size_t(S) * qd, 0.f);
  const int group = n_heads / H;
  for (int s = 0; s < S; ++s) {
    for (int h = 0; h < H; ++h) {
      const bool ph = s < SH;
      const int n = ph ? twin[size_t(s)].size(h) : lens[size_t(s)];
      std::vector<float> k, v;
      std::vector<int32_t> p;
      for (int e = 0; e < n; ++e) {
        const float* kr = ph ? twin[size_t(s)].head_keys(h) + size_t(e) * hd : K[size_t(s)].data() + size_t(e) * kvd + size_t(h) * hd;
        const float* vr = ph ? twin[size_t(s)].head_values(h) + size_t(e) * hd : V[size_t(s)].data() + size_t(e) * kvd + size_t(h) * hd;
        k.insert(k.end(), kr, kr + hd), v.insert(v.end(), vr, vr + hd);
        p.push_back(ph ? twin[size_t(s)].head_positions(h)[e] : P[size_t(s)][size_t(e)]);
      }
      ops::AttentionArgs ra;
      ra.q = &q[size_t(s) * qd + size_t(h) * group * hd], ra.n_q = 1, ra.q_pos = &pos[size_t(s)];
      ra.k = k.data(), ra.v = v.data(), ra.n_kv = n, ra.kv_stride = hd, ra.kv_pos = p.data();
      ra.n_heads = group, ra.n_kv_heads = 1, ra.head_dim = hd, ra.scale = scale;
      ra.out = &out_ref[size_t(s) * qd + size_t(h) * group * hd];
      if (n > 0) ops::attention(ra);
    }
  }
  DecodeAttentionArgs a;
  a.q = put_as(be, dt, q), a.batch = S, a.q_pos = be.put(pos), a.kv = kvt;
  a.lengths = be.put(lens), a.max_len = max_len;
  a.n_heads = n_heads, a.n_kv_heads = H, a.head_dim = hd, a.scale = scale;
  a.out = be.alloc(size_t(S) * qd * es);
  a.heads = heads;
  a.workspace_bytes = attention_decode_workspace_bytes(S, n_heads, H, hd, max_len, false);
  a.workspace = be.alloc(a.workspace_bytes);
  be.fill(a.workspace, 0xff, a.workspace_bytes);
  be.attention_decode(a);
  // The bound on decode outputs (as check_decode): the output is rounded once to the pool's
  // type (relative 2^-9 for bf16, 2^-12 for fp16) over float32 sums in another order.
  expect_close(get_as(be, dt, a.out, size_t(S) * qd), out_ref, tolerance(dt), "decode over head tables");
  // With importance (an H2O sequence batched with head-table ones): the shared sequence's row against
  // ops::attention over its entries (all query heads), the outputs unchanged.
  {
    std::vector<float> imp_ref(static_cast<size_t>(max_len), 0.f), out(static_cast<size_t>(qd));
    ops::AttentionArgs ra;
    ra.q = &q[size_t(SH) * qd], ra.n_q = 1, ra.q_pos = &pos[size_t(SH)];
    ra.k = K[size_t(SH)].data(), ra.v = V[size_t(SH)].data(), ra.n_kv = lens[size_t(SH)], ra.kv_stride = kvd;
    ra.kv_pos = P[size_t(SH)].data();
    ra.n_heads = n_heads, ra.n_kv_heads = H, ra.head_dim = hd, ra.scale = scale, ra.out = out.data();
    ra.importance = imp_ref.data();
    ops::attention(ra);
    DecodeAttentionArgs with = a;
    with.importance = be.put(std::vector<float>(size_t(S) * max_len, 0.f)), with.importance_stride = max_len;
    with.workspace_bytes = attention_decode_workspace_bytes(S, n_heads, H, hd, max_len, true);
    with.workspace = be.alloc(with.workspace_bytes);
    with.out = be.alloc(size_t(S) * qd * es);
    be.attention_decode(with);
    expect_close(get_as(be, dt, with.out, size_t(S) * qd), out_ref, tolerance(dt), "decode over head tables, with importance");
    const std::vector<float> imp = be.get(with.importance, size_t(S) * max_len);
    expect_close(std::vector<float>(imp.begin() + long(size_t(SH) * max_len), imp.begin() + long(size_t(SH + 1) * max_len)),
                 imp_ref, tolerance(dt), "decode importance of the shared sequence");
  }
  EXPECT_EQ(be.get(kv.error_flag, 1)[0], 0) << "the kernels met an inconsistent block table";
}

}  // namespace pkv::cuda::test
