// Decode attention (ops::attention with fewer than 16 queries: blocks of entries, each read once for
// all query heads of its KV head, combined per head in block order) against a double-precision
// reference, within a bound derived from float32 rounding; for float32 and 16-bit caches, shared and
// per-head layers, several GQA ratios and lengths that are not multiples of the block; and the same
// bits whatever the number of threads.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>

#include "core/dtype.h"
#include "core/threads.h"
#include "kv/kv_cache.h"
#include "kv/policy.h"
#include "model/model.h"
#include "ops/ops.h"

using namespace pkv;

namespace {

constexpr double kEps = 0x1p-24;  // float32 unit roundoff

std::vector<float> random_vec(std::mt19937& rng, size_t n, float scale) {
  std::uniform_real_distribution<float> u(-scale, scale);
  std::vector<float> x(n);
  for (float& f : x) f = u(rng);
  return x;
}

// The values of type t nearest to x, as float32 (what a cache of type t holds).
std::vector<float> rounded(DType t, std::vector<float> x) {
  if (t == DType::F32) return x;
  std::vector<uint16_t> h(x.size());
  from_f32(t, x.data(), h.data(), x.size());
  to_f32(t, h.data(), x.data(), x.size());
  return x;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// One query head over n rows (key j at k + j * ks, value at v + j * ks, head_dim hd), in double.
// The bound on |computed - exact| per output element: a score is a dot product of hd terms and a
// product by the scale, so |error| <= E = (hd + 2) u scale sum_d |q_d k_jd| (u: float32's unit
// roundoff); that moves every probability by a factor within exp(+-2E). The exponentials, the sums
// of at most n terms (within a block, then over the blocks) and the products add at most
// 2 (n + 16) u relative to the sum of the terms' magnitudes. The bound is twice the sum of both
// times sum_j p_j |v_jd| (the second-order terms).
struct Ref {
  std::vector<double> out, bound, p;  // out, bound [hd]; p [n], the probabilities
  double rel = 0;                     // the bound on a probability's relative error
};

Ref reference(const float* q, const float* k, const float* v, size_t ks, int n, const std::vector<bool>& vis, int hd,
              float scale) {
  Ref r;
  std::vector<double> s(static_cast<size_t>(n), 0.0);
  double mx = -INFINITY, E = 0;
  for (int j = 0; j < n; ++j) {
    if (!vis[size_t(j)]) continue;
    double d = 0, mag = 0;
    for (int x = 0; x < hd; ++x) {
      d += double(q[x]) * k[size_t(j) * ks + size_t(x)];
      mag += std::fabs(double(q[x]) * k[size_t(j) * ks + size_t(x)]);
    }
    s[size_t(j)] = d * scale;
    E = std::max(E, (hd + 2) * kEps * scale * mag);
    mx = std::max(mx, s[size_t(j)]);
  }
  r.p.assign(static_cast<size_t>(n), 0.0);
  double sum = 0;
  for (int j = 0; j < n; ++j)
    if (vis[size_t(j)]) sum += r.p[size_t(j)] = std::exp(s[size_t(j)] - mx);
  for (double& p : r.p) p = sum > 0 ? p / sum : 0.0;
  r.rel = std::expm1(2 * E) + 2 * (n + 16) * kEps;
  r.out.assign(static_cast<size_t>(hd), 0.0);
  r.bound.assign(static_cast<size_t>(hd), 0.0);
  for (int x = 0; x < hd; ++x) {
    double o = 0, mag = 0;
    for (int j = 0; j < n; ++j) {
      o += r.p[size_t(j)] * v[size_t(j) * ks + size_t(x)];
      mag += r.p[size_t(j)] * std::fabs(double(v[size_t(j) * ks + size_t(x)]));
    }
    r.out[size_t(x)] = o;
    r.bound[size_t(x)] = 2 * r.rel * mag;
  }
  return r;
}

const DType kTypes[] = {DType::F32, DType::F16, DType::BF16};

// Runs fn with 1, 2 and 3 threads and restores the count.
template <class Fn>
void for_thread_counts(Fn fn) {
  const int before = num_threads();
  for (int t : {1, 2, 3}) {
    set_num_threads(t);
    fn(t);
  }
  set_num_threads(before);
}

}  // namespace

// A shared layer, called as attend_layer calls it: outputs and importance (shared and per KV head,
// counted from a query on, added to what the caller holds) within the bound of the exact values;
// 16-bit caches against the exact attention over their stored values; 1, 2 and 3 threads give the
// same bits.
TEST(DecodeAttention, SharedLayerMatchesDoubleReferenceAndIgnoresThreadCount) {
  std::mt19937 rng(14);
  struct Case {
    int H, Hkv, hd;
  };
  const Case cases[] = {{4, 4, 40}, {8, 4, 32}, {8, 2, 40}, {12, 2, 16}, {8, 1, 24}, {6, 6, 128}};
  int checked = 0;
  for (const Case& c : cases)
    for (DType t : kTypes)
      for (int n_kv : {1, 63, 65, 200})
        for (int n_q : {1, 3})
          for (bool per_kv_head : {false, true}) {
            const int G = c.H / c.Hkv, hd = c.hd, kvd = c.Hkv * hd;
            const std::vector<float> q = random_vec(rng, size_t(n_q) * c.H * hd, 2.f);
            const std::vector<float> k = rounded(t, random_vec(rng, size_t(n_kv) * kvd, 2.f));
            const std::vector<float> v = rounded(t, random_vec(rng, size_t(n_kv) * kvd, 1.f));
            std::vector<uint16_t> k16(k.size()), v16(v.size());
            if (t != DType::F32) {
              from_f32(t, k.data(), k16.data(), k.size());
              from_f32(t, v.data(), v16.data(), v.size());
            }
            // Positions with gaps; the queries are the last n_q entries, so the earlier queries do
            // not see the later ones.
            std::vector<int32_t> kv_pos(static_cast<size_t>(n_kv)), q_pos(static_cast<size_t>(n_q));
            for (int j = 0; j < n_kv; ++j) kv_pos[size_t(j)] = 3 * j + (j % 5 == 0);
            for (int i = 0; i < n_q; ++i) q_pos[size_t(i)] = kv_pos[size_t(std::max(0, n_kv - n_q + i))];
            const int from = n_q > 1 ? 1 : 0;
            const size_t imp_len = size_t(n_kv) * (per_kv_head ? c.Hkv : 1);
            const std::vector<float> imp0 = random_vec(rng, imp_len, 0.5f);
            ops::AttentionArgs a;
            a.q = q.data();
            a.n_q = n_q;
            a.q_pos = q_pos.data();
            a.n_kv = n_kv;
            a.kv_stride = kvd;
            a.kv_pos = kv_pos.data();
            a.n_heads = c.H;
            a.n_kv_heads = c.Hkv;
            a.head_dim = hd;
            a.scale = 1.f / std::sqrt(float(hd));
            a.importance_from = from;
            a.importance_per_kv_head = per_kv_head;
            a.kv_dtype = t;
            if (t == DType::F32) {
              a.k = k.data();
              a.v = v.data();
            } else {
              a.k16 = k16.data();
              a.v16 = v16.data();
            }
            std::vector<float> out1, imp1;
            for_thread_counts([&](int threads) {
              std::vector<float> out(q.size(), NAN), imp = imp0;
              a.out = out.data();
              a.importance = imp.data();
              ops::attention(a);
              if (threads == 1) {
                out1 = out;
                imp1 = imp;
              } else {
                EXPECT_TRUE(same_bits(out, out1)) << threads << " threads";
                EXPECT_TRUE(same_bits(imp, imp1)) << threads << " threads";
              }
            });
            // The reference.
            const double div = per_kv_head ? G : c.H;
            std::vector<double> imp_ref(imp_len), imp_mag(imp_len, 0.0), imp_rel(imp_len, 0.0);
            for (size_t x = 0; x < imp_len; ++x) imp_ref[x] = imp0[x];
            for (int i = 0; i < n_q; ++i) {
              std::vector<bool> vis(static_cast<size_t>(n_kv));
              for (int j = 0; j < n_kv; ++j) vis[size_t(j)] = kv_pos[size_t(j)] <= q_pos[size_t(i)];
              for (int h = 0; h < c.H; ++h) {
                const int g = h / G;
                const Ref r = reference(&q[(size_t(i) * c.H + h) * hd], &k[size_t(g) * hd], &v[size_t(g) * hd],
                                        size_t(kvd), n_kv, vis, hd, a.scale);
                for (int x = 0; x < hd; ++x) {
                  const float got = out1[(size_t(i) * c.H + h) * hd + size_t(x)];
                  ASSERT_LE(std::fabs(got - r.out[size_t(x)]), r.bound[size_t(x)])
                      << dtype_name(t) << " heads " << c.H << "/" << c.Hkv << " hd " << hd << " n_kv " << n_kv
                      << " n_q " << n_q << " query " << i << " head " << h << " dim " << x;
                  ++checked;
                }
                if (i < from) continue;
                const size_t row = per_kv_head ? size_t(g) * n_kv : 0;
                for (int j = 0; j < n_kv; ++j) {
                  imp_ref[row + size_t(j)] += r.p[size_t(j)] / div;
                  imp_mag[row + size_t(j)] += r.p[size_t(j)] / div;
                  imp_rel[row + size_t(j)] = std::max(imp_rel[row + size_t(j)], r.rel);
                }
              }
            }
            // Each entry's shares are summed in float32 (n_q * H terms), then added to the caller's.
            for (size_t x = 0; x < imp_len; ++x) {
              const double bound =
                  2 * imp_mag[x] * (imp_rel[x] + (n_q * c.H + 4) * kEps) + 2 * kEps * std::fabs(imp_ref[x]);
              ASSERT_LE(std::fabs(imp1[x] - imp_ref[x]), bound) << dtype_name(t) << " importance " << x;
            }
          }
  EXPECT_GT(checked, 10000);
}

// Per-head layers (each KV head its own entries, after a per-head plan), through attend_layer, the
// decoder's step: each query head against the exact attention over its KV head's stored entries,
// the same bits for 1, 2 and 3 threads.
TEST(DecodeAttention, PerHeadLayerMatchesDoubleReferenceAndIgnoresThreadCount) {
  std::mt19937 rng(41);
  for (const auto& [H, Hkv] : {std::pair{4, 4}, std::pair{8, 2}, std::pair{6, 1}})
    for (DType t : kTypes) {
      TextConfig tc;
      tc.n_heads = H;
      tc.n_kv_heads = Hkv;
      tc.head_dim = 40;
      const int hd = tc.head_dim, kvd = Hkv * hd, qd = H * hd, G = H / Hkv, N = 230;
      KVLayer layer(kvd, Hkv, t);
      layer.reserve(N + 1);
      {
        const std::vector<float> k = random_vec(rng, size_t(N) * kvd, 2.f), v = random_vec(rng, size_t(N) * kvd, 1.f);
        std::vector<int32_t> pos(static_cast<size_t>(N));
        std::iota(pos.begin(), pos.end(), 0);
        layer.append(k.data(), v.data(), pos.data(), N);
      }
      // KV head h keeps every (h + 1)-th entry from h on, and the last 70 for the last head: lengths
      // 230, 115, 77, ... and 70, none a multiple of the block.
      LayerKeep plan;
      plan.layer = 0;
      plan.before = N;
      plan.head_keep.resize(size_t(Hkv));
      for (int h = 0; h < Hkv; ++h) {
        if (h == Hkv - 1 && Hkv > 1) {
          for (int j = N - 70; j < N; ++j) plan.head_keep[size_t(h)].push_back(j);
        } else {
          for (int j = h; j < N; j += h + 1) plan.head_keep[size_t(h)].push_back(j);
        }
      }
      layer.apply(plan);
      ASSERT_TRUE(layer.per_head());
      const std::vector<float> q = random_vec(rng, size_t(qd), 2.f), k = random_vec(rng, size_t(kvd), 2.f),
                               v = random_vec(rng, size_t(kvd), 1.f);
      const int32_t pos = N;
      std::vector<float> out1;
      KVLayer after = layer;
      for_thread_counts([&](int threads) {
        KVLayer l = layer;  // attend_layer appends the step's entry
        std::vector<float> out(size_t(qd), NAN);
        attend_layer(tc, l, q.data(), k.data(), v.data(), 1, &pos, out.data(), nullptr, 0);
        if (threads == 1) {
          out1 = out;
          after = l;
        } else {
          EXPECT_TRUE(same_bits(out, out1)) << threads << " threads";
        }
      });
      for (int g = 0; g < Hkv; ++g) {
        std::vector<float> kb, vb;
        const int n = after.size(g);
        const float* kh = after.head_keys_f32(g, kb);
        const float* vh = after.head_values_f32(g, vb);
        const std::vector<bool> vis(static_cast<size_t>(n), true);
        for (int r = 0; r < G; ++r) {
          const int h = g * G + r;
          const Ref ref = reference(&q[size_t(h) * hd], kh, vh, size_t(hd), n, vis, hd, 1.f / std::sqrt(float(hd)));
          for (int x = 0; x < hd; ++x)
            ASSERT_LE(std::fabs(out1[size_t(h) * hd + size_t(x)] - ref.out[size_t(x)]), ref.bound[size_t(x)])
                << dtype_name(t) << " heads " << H << "/" << Hkv << " head " << h << " entries " << n << " dim " << x;
        }
      }
    }
}
