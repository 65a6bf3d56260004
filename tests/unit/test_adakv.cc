// Per-head budgets (issue 13 item 1): per-KV-head importance, the adakv policy (kv/adakv.h) and the
// CPU cache that applies its head plans.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <numeric>
#include <random>
#include <set>

#include "core/error.h"
#include "engine/backend.h"
#include "engine/engine.h"
#include "kv/adakv.h"
#include "kv/kv_cache.h"
#include "kv/policy.h"
#include "model/model.h"
#include "random_kv.h"
#include "test_util.h"

using namespace pkv;

namespace {

constexpr double kU = 1.0 / 16777216.0;  // float32's unit roundoff, 2^-24

using test::random_cache;
using test::random_vec;

// The properties of one layer's selection (kv/adakv.h): totals, the fixed entries in every head, the
// floor, and one cutoff across the heads except where the floor keeps an entry.
void check_selection(const std::vector<std::vector<int32_t>>& keep, const std::vector<float>& s, int H, int N, int B,
                     const std::vector<int32_t>& fixed, double alpha) {
  const int P = int(fixed.size()), floor_n = int(std::floor(alpha * (B - P)));
  ASSERT_EQ(int(keep.size()), H);
  int total = 0;
  const std::set<int32_t> fx(fixed.begin(), fixed.end());
  // A head's floor: its floor_n best non-fixed entries (ties to the earlier).
  std::vector<std::set<int32_t>> floor_of(static_cast<size_t>(H));
  for (int h = 0; h < H; ++h) {
    const std::vector<int32_t>& k = keep[size_t(h)];
    total += int(k.size());
    EXPECT_TRUE(std::is_sorted(k.begin(), k.end()) && std::adjacent_find(k.begin(), k.end()) == k.end()) << "head " << h;
    for (int32_t j : fixed) EXPECT_TRUE(std::binary_search(k.begin(), k.end(), j)) << "head " << h << " lost fixed " << j;
    EXPECT_GE(int(k.size()), P + floor_n) << "head " << h << " under its floor";
    std::vector<int32_t> order;
    for (int j = 0; j < N; ++j)
      if (!fx.count(j)) order.push_back(j);
    std::stable_sort(order.begin(), order.end(),
                     [&](int32_t a, int32_t b) { return s[size_t(h) * N + a] > s[size_t(h) * N + b]; });
    for (int r = 0; r < floor_n; ++r) {
      floor_of[size_t(h)].insert(order[size_t(r)]);
      EXPECT_TRUE(std::binary_search(k.begin(), k.end(), order[size_t(r)])) << "head " << h << " floor entry dropped";
    }
  }
  EXPECT_EQ(total, H * B);
  // One cutoff: the lowest score kept beyond the floors >= the highest score evicted.
  float lowest_kept = INFINITY, highest_evicted = -INFINITY;
  for (int h = 0; h < H; ++h)
    for (int j = 0; j < N; ++j) {
      if (fx.count(j)) continue;
      const float v = s[size_t(h) * N + j];
      const bool kept = std::binary_search(keep[size_t(h)].begin(), keep[size_t(h)].end(), j);
      if (kept && !floor_of[size_t(h)].count(j)) lowest_kept = std::min(lowest_kept, v);
      if (!kept) highest_evicted = std::max(highest_evicted, v);
    }
  EXPECT_GE(lowest_kept, highest_evicted);
}

}  // namespace

// ImportanceRequest::per_kv_head: KV head g's row is the sum over the counted queries of the mean over
// g's query heads; the mean of the rows over the KV heads is the head-mean row. Both paths of
// ops::attention (fewer than 16 queries: per query; more: blocked) and a query window.
TEST(PerHeadImportance, RowsAveragedOverHeadsAreTheHeadMean) {
  std::mt19937 rng(5);
  TextConfig t;
  t.n_heads = 8, t.n_kv_heads = 4, t.head_dim = 16;
  const int N = 60, H = t.n_kv_heads, d = H * t.head_dim, qd = t.n_heads * t.head_dim;
  for (int n_q : {5, 40}) {
    for (int from : {0, n_q - 3}) {
      SCOPED_TRACE("n_q " + std::to_string(n_q) + " from " + std::to_string(from));
      KVCache a = random_cache(rng, 1, N, H, t.head_dim), b = a.clone();
      const std::vector<float> q = random_vec(rng, size_t(n_q) * qd, -3, 3), k = random_vec(rng, size_t(n_q) * d),
                               v = random_vec(rng, size_t(n_q) * d);
      std::vector<int32_t> pos(static_cast<size_t>(n_q));
      std::iota(pos.begin(), pos.end(), N);
      std::vector<float> out_a(size_t(n_q) * qd), out_b(out_a.size()), mean_imp, head_imp;
      attend_layer(t, a.layer(0), q.data(), k.data(), v.data(), n_q, pos.data(), out_a.data(), &mean_imp, from);
      attend_layer(t, b.layer(0), q.data(), k.data(), v.data(), n_q, pos.data(), out_b.data(), &head_imp, from, true);
      EXPECT_EQ(out_a, out_b) << "the importance pass changed the attention";
      const int len = N + n_q;
      ASSERT_EQ(int(mean_imp.size()), len);
      ASSERT_EQ(int(head_imp.size()), H * len);
      // Both are float32 sums of the same nonnegative probabilities, divided by 8 (the head mean:
      // m = counted queries x 8 terms) or by 2 (a group: m_g = queries x 2 terms) and then averaged
      // over 4 heads: each sum is within (terms + 1) u of its exact value, relative, so the two
      // differ by at most (m + m_g + H + 4) u of the value.
      const int counted = n_q - from, m = counted * t.n_heads, m_g = counted * (t.n_heads / H);
      const double tol = double(m + m_g + H + 4) * kU;
      double total = 0;
      for (int j = 0; j < len; ++j) {
        double mean = 0;
        for (int g = 0; g < H; ++g) {
          EXPECT_GE(head_imp[size_t(g) * len + j], 0.f);
          mean += head_imp[size_t(g) * len + j];
        }
        mean /= H;
        total += mean_imp[size_t(j)];
        EXPECT_NEAR(mean, mean_imp[size_t(j)], tol * std::max<double>(mean, mean_imp[size_t(j)]) + 1e-30) << "entry " << j;
      }
      EXPECT_NEAR(total, counted, counted * 1e-4) << "each counted query's probabilities sum to 1";
      // The heads really differ (the rows are not the mean copied).
      double spread = 0;
      for (int j = 0; j < len; ++j) spread = std::max(spread, double(std::fabs(head_imp[size_t(j)] - head_imp[size_t(len + j)])));
      EXPECT_GT(spread, 1e-3);
    }
  }
}

// The same identity through the model's prefill (Session::prefill_uncompressed on the fixture
// model: 2 layers, 4 query heads over 2 KV heads), window and all-queries requests.
TEST(PerHeadImportance, ThePrefillMeasuresOneRowPerKvHead) {
  const std::unique_ptr<Model> model = Model::load(test::data_path("fixtures/llama_text"));
  const Tokenizer tok(test::data_path("fixtures/llama_text/tokenizer.model"));
  const Engine e(*model, tok);
  PromptRequest req;
  req.text = "The quick brown fox jumps over the lazy dog and runs far away into the woods, where it sleeps.";
  req.tmpl = Template::Raw;
  const PreparedPrompt p = e.prepare(req);
  const int N = int(p.ids.size()), H = model->config().text.n_kv_heads, QH = model->config().text.n_heads;
  FullPolicy full;
  for (int from : {0, N - 8}) {
    Session a(*model, full), b(*model, full);
    const auto mean = a.prefill_uncompressed(p, nullptr, {from})[0];
    const auto head = b.prefill_uncompressed(p, nullptr, {from}, true)[0];
    ASSERT_EQ(head.size(), mean.size());
    const int counted = N - from;
    const double tol = double(counted * QH + counted * (QH / H) + H + 4) * kU;
    for (size_t l = 0; l < mean.size(); ++l) {
      ASSERT_EQ(int(head[l].size()), H * N);
      for (int j = 0; j < N; ++j) {
        double m = 0;
        for (int g = 0; g < H; ++g) m += head[l][size_t(g) * N + j];
        m /= H;
        EXPECT_NEAR(m, mean[l][size_t(j)], tol * std::max<double>(m, mean[l][size_t(j)]) + 1e-30)
            << "layer " << l << " entry " << j << " from " << from;
      }
    }
  }
}

// The selection on hand-made scores: three heads, one with every high score, one with none.
TEST(AdaKV, OneCutoffAcrossHeadsWithAFloorPerHead) {
  const int H = 3, N = 10, B = 5;
  // head 0: high scores; head 1: middling; head 2: the lowest of all.
  const std::vector<float> s = {
      9, 8, 7, 6, 5, 4.5f, 4.4f, 4.3f, 4.2f, 4.1f,  //
      3, 0.5f, 2.9f, 0.4f, 2.8f, 0.3f, 0.2f, 0.1f, 0.05f, 0.01f,  //
      0.9f, 0.8f, 0.7f, 0.6f, 0.55f, 0.54f, 0.53f, 0.52f, 0.51f, 0.5f};
  const std::vector<int32_t> fixed = {0, 9};  // the protected first and last entries
  // Without a floor: 9 slots by one cutoff: head 0's 1..8 (scores 8 .. 4.2) and head 1's 3 (index 0 is
  // fixed: 2.9 at 2); head 2 only its fixed entries.
  {
    const auto keep = adakv_select(s, H, N, B, fixed, 0.0);
    EXPECT_EQ(keep[0], (std::vector<int32_t>{0, 1, 2, 3, 4, 5, 6, 7, 8, 9}));
    EXPECT_EQ(keep[1], (std::vector<int32_t>{0, 2, 9}));
    EXPECT_EQ(keep[2], (std::vector<int32_t>{0, 9}));
    check_selection(keep, s, H, N, B, fixed, 0.0);
  }
  // alpha 0.4: floor(0.4 * 3) = 1 selected entry per head first (head 2 keeps its 0.8 at 1), then
  // the cutoff over the 6 slots left.
  {
    const auto keep = adakv_select(s, H, N, B, fixed, 0.4);
    EXPECT_EQ(keep[2], (std::vector<int32_t>{0, 1, 9}));
    EXPECT_EQ(keep[1], (std::vector<int32_t>{0, 2, 9}));
    EXPECT_EQ(keep[0], (std::vector<int32_t>{0, 1, 2, 3, 4, 5, 6, 7, 9}));
    check_selection(keep, s, H, N, B, fixed, 0.4);
  }
  // alpha 1: the uniform split (every head its own top B - 2).
  {
    const auto keep = adakv_select(s, H, N, B, fixed, 1.0);
    for (int h = 0; h < H; ++h) EXPECT_EQ(int(keep[size_t(h)].size()), B);
    EXPECT_EQ(keep[0], (std::vector<int32_t>{0, 1, 2, 3, 9}));
    EXPECT_EQ(keep[1], (std::vector<int32_t>{0, 1, 2, 4, 9}));
    EXPECT_EQ(keep[2], (std::vector<int32_t>{0, 1, 2, 3, 9}));
    check_selection(keep, s, H, N, B, fixed, 1.0);
  }
  // Random scores, shapes and floors: the properties hold everywhere.
  std::mt19937 rng(11);
  for (int trial = 0; trial < 60; ++trial) {
    const int h = 1 + int(rng() % 6), n = 8 + int(rng() % 40), b = 3 + int(rng() % unsigned(n - 2));
    const double alpha = (rng() % 5) * 0.25;
    std::vector<float> sc = random_vec(rng, size_t(h) * n, 0, 1);
    for (int g = 0; g < h; ++g)  // heads of different scales, and ties
      for (int j = 0; j < n; ++j) sc[size_t(g) * n + j] = std::round(sc[size_t(g) * n + j] * 20) / float(1 + g * g);
    std::vector<int32_t> fx = {0, int32_t(n - 1)};
    if (b >= 5) fx = {0, int32_t(n - 3), int32_t(n - 2), int32_t(n - 1)};
    SCOPED_TRACE("trial " + std::to_string(trial));
    check_selection(adakv_select(sc, h, n, b, fx, alpha), sc, h, n, b, fx, alpha);
  }
}

// The policy's plan on hand-made per-head importance: per layer H * B entries, window and protected
// tokens in every head, the selection of the pooled scores; the CPU cache then holds exactly those
// entries per head (keys, values, positions, bytes), and its attention over them equals a reference
// computed independently by masking the original layer.
TEST(AdaKV, TheCpuCacheHoldsThePlanAndAttendsOverItOnly) {
  std::mt19937 rng(21);
  TextConfig t;
  t.n_heads = 8, t.n_kv_heads = 4, t.head_dim = 16;
  const int L = 2, N = 80, H = t.n_kv_heads, hd = t.head_dim, d = H * hd, qd = t.n_heads * hd;
  const int group = t.n_heads / H;
  PolicyOptions o;
  o.budget = 0.3;
  o.window = 8;
  const int B = int(std::lround(0.3 * N));
  KVCache cache = random_cache(rng, L, N, H, hd);
  const KVCache orig = cache.clone();
  std::vector<std::vector<float>> imp;
  for (int l = 0; l < L; ++l) {
    std::vector<float> x = random_vec(rng, size_t(H) * N, 0, 1);
    for (int j = 0; j < N; ++j) x[size_t(j)] *= 4;  // head 0 attends more sharply: it should win entries
    imp.push_back(x);
  }
  AdaKVPolicy policy(o);
  EXPECT_TRUE(policy.per_head());
  const ImportanceRequest r = policy.prefill_importance(N);
  EXPECT_TRUE(r.needed && r.per_kv_head);
  EXPECT_EQ(r.from, N - o.window);
  const KeepPlan plan = policy.after_prefill(cache, imp, N);
  check_plan(plan, cache, "adakv");
  ASSERT_EQ(int(plan.layers.size()), L);
  std::vector<int32_t> fixed = {0};
  for (int j = N - o.window; j < N; ++j) fixed.push_back(j);
  for (const LayerKeep& k : plan.layers) {
    ASSERT_EQ(int(k.head_keep.size()), H);
    EXPECT_TRUE(k.keep.empty());
    EXPECT_EQ(k.before, N) << "a shared layer holds N entries (CacheView::held)";
    std::vector<float> pooled;
    for (int h = 0; h < H; ++h) {
      const std::vector<float> row(imp[size_t(k.layer)].begin() + h * N, imp[size_t(k.layer)].begin() + (h + 1) * N);
      const std::vector<float> p = max_pool_1d(row, o.pool_kernel);
      pooled.insert(pooled.end(), p.begin(), p.end());
    }
    check_selection(k.head_keep, pooled, H, N, B, fixed, o.head_floor);
    EXPECT_GT(k.head_keep[0].size(), k.head_keep[1].size()) << "the sharper head gets more";
    for (int h = 0; h < H; ++h)
      EXPECT_EQ(policy.prefill_kept_per_head()[size_t(k.layer)][size_t(h)], int(k.head_keep[size_t(h)].size()));
  }
  EXPECT_EQ(policy.prefill_kept(), std::vector<int>(size_t(L), B));

  cache.apply(plan, "adakv");
  for (const LayerKeep& k : plan.layers) {
    const KVLayer& lay = cache.layer(k.layer);
    ASSERT_TRUE(lay.per_head());
    EXPECT_EQ(lay.total_entries(), H * B);
    EXPECT_EQ(lay.bytes(), size_t(H * B) * 2 * hd * sizeof(float));
    for (int h = 0; h < H; ++h) {
      const std::vector<int32_t>& keep = k.head_keep[size_t(h)];
      ASSERT_EQ(lay.size(h), int(keep.size()));
      EXPECT_EQ(lay.bytes_per_head()[size_t(h)], keep.size() * 2 * hd * sizeof(float));
      for (size_t i = 0; i < keep.size(); ++i) {
        EXPECT_EQ(lay.head_positions(h)[i], keep[i]);
        const float* ko = orig.layer(k.layer).keys() + size_t(keep[i]) * d + size_t(h) * hd;
        const float* vo = orig.layer(k.layer).values() + size_t(keep[i]) * d + size_t(h) * hd;
        EXPECT_TRUE(std::equal(ko, ko + hd, lay.head_keys(h) + i * hd));
        EXPECT_TRUE(std::equal(vo, vo + hd, lay.head_values(h) + i * hd));
      }
    }
    EXPECT_LE(lay.capacity_bytes(), size_t(H * N) * 2 * hd * sizeof(float) / 2) << "the evicted memory was released";
  }

  // Attention of new queries (one step, and a chunk on the blocked path) over the compressed layer
  // against a masked softmax over the original layer, in double.
  for (int n_q : {1, 17}) {
    SCOPED_TRACE("n_q " + std::to_string(n_q));
    KVCache c = cache.clone();
    const std::vector<float> q = random_vec(rng, size_t(n_q) * qd, -2, 2), k = random_vec(rng, size_t(n_q) * d),
                             v = random_vec(rng, size_t(n_q) * d);
    std::vector<int32_t> pos(static_cast<size_t>(n_q));
    std::iota(pos.begin(), pos.end(), N);
    std::vector<float> out(size_t(n_q) * qd);
    attend_layer(t, c.layer(1), q.data(), k.data(), v.data(), n_q, pos.data(), out.data(), nullptr, 0);
    const LayerKeep& lk = plan.layers[1];
    const KVLayer& full = orig.layer(1);
    double worst = 0;
    for (int i = 0; i < n_q; ++i)
      for (int qh = 0; qh < t.n_heads; ++qh) {
        const int g = qh / group;
        std::vector<char> mask(static_cast<size_t>(N), 0);
        for (int32_t e : lk.head_keep[size_t(g)]) mask[size_t(e)] = 1;
        std::vector<double> s;
        std::vector<const float*> vs;
        for (int j = 0; j < N + i + 1; ++j) {
          if (j < N && !mask[size_t(j)]) continue;
          const float* kr = j < N ? full.keys() + size_t(j) * d + size_t(g) * hd : &k[size_t(j - N) * d + size_t(g) * hd];
          vs.push_back(j < N ? full.values() + size_t(j) * d + size_t(g) * hd : &v[size_t(j - N) * d + size_t(g) * hd]);
          double dot = 0;
          for (int x = 0; x < hd; ++x) dot += double(q[size_t(i) * qd + size_t(qh) * hd + x]) * kr[x];
          s.push_back(dot / std::sqrt(double(hd)));
        }
        const double mx = *std::max_element(s.begin(), s.end());
        double sum = 0;
        for (double& x : s) sum += x = std::exp(x - mx);
        for (int x = 0; x < hd; ++x) {
          double o2 = 0;
          for (size_t j = 0; j < s.size(); ++j) o2 += s[j] / sum * vs[j][x];
          worst = std::max(worst, std::fabs(o2 - out[size_t(i) * qd + size_t(qh) * hd + x]));
        }
      }
    // float32: dot products of 16 terms (|q k| <= 32, error ~16 u * 32), exp and a normalised sum of
    // at most N + 17 probability-weighted values in [-1, 1] (error ~(N + 17) u): well under 1e-5.
    EXPECT_LT(worst, 1e-5);
  }
}

// Decode steps: new tokens go to every head; under the proportional rule each head keeps
// round(k_h * T) (its own prefill fraction), under the cap rule its prefill count; the protected
// entries and the newest stay, the plans pass check_plan (KVCache::apply checks them).
TEST(AdaKV, DecodeStepsFollowEachHeadsOwnBudget) {
  for (DecodeRule rule : {DecodeRule::Proportional, DecodeRule::FixedCap}) {
    SCOPED_TRACE(rule == DecodeRule::Proportional ? "proportional" : "cap");
    std::mt19937 rng(31);
    const int L = 3, N = 90, H = 4, hd = 8, d = H * hd;
    PolicyOptions o;
    o.budget = 0.25;
    o.window = 8;
    o.fifo_offset = 5;
    o.decode_rule = rule;
    KVCache cache = random_cache(rng, L, N, H, hd);
    std::vector<std::vector<float>> imp;
    for (int l = 0; l < L; ++l) {
      std::vector<float> x = random_vec(rng, size_t(H) * N, 0, 1);
      for (int j = 0; j < N; ++j) x[size_t(l % H) * N + j] *= 5;
      imp.push_back(x);
    }
    AdaKVPolicy policy(o);
    cache.apply(policy.after_prefill(cache, imp, N), "adakv");
    const auto kept = policy.prefill_kept_per_head();
    // The frozen part of each head: its entries before the fixed place.
    std::vector<std::vector<std::vector<int32_t>>> frozen(static_cast<size_t>(L));
    for (int l = 0; l < L; ++l)
      for (int h = 0; h < H; ++h) {
        const int f = std::max(0, kept[size_t(l)][size_t(h)] - o.fifo_offset);
        frozen[size_t(l)].emplace_back(cache.layer(l).head_positions(h), cache.layer(l).head_positions(h) + f);
      }
    for (int step = 0; step < 60; ++step) {
      const int32_t p = N + step;
      for (int l = 0; l < L; ++l) {
        const std::vector<float> k = random_vec(rng, size_t(d)), v = random_vec(rng, size_t(d));
        cache.layer(l).append(k.data(), v.data(), &p, 1);
      }
      const int T = p + 1;
      cache.apply(policy.after_decode_step(cache, T, nullptr), "adakv");
      for (int l = 0; l < L; ++l) {
        int total = 0;
        double expected_total = 0;
        for (int h = 0; h < H; ++h) {
          const int n_h = kept[size_t(l)][size_t(h)];
          const int want = rule == DecodeRule::Proportional ? int(std::lround(double(n_h) / N * T)) : n_h;
          const std::span<const int32_t> pos = cache.head_positions(l, h);
          EXPECT_EQ(int(pos.size()), want) << "layer " << l << " head " << h << " step " << step;
          EXPECT_EQ(pos.front(), 0);
          EXPECT_TRUE(std::binary_search(pos.begin(), pos.end(), N - 1)) << "the last prompt token is protected";
          EXPECT_EQ(pos.back(), p) << "the newest entry stays";
          const auto& fz = frozen[size_t(l)][size_t(h)];
          EXPECT_TRUE(std::equal(fz.begin(), fz.end(), pos.begin())) << "the frozen part changed";
          total += int(pos.size());
          expected_total += double(n_h) / N * T;
        }
        if (rule == DecodeRule::Proportional) {
          EXPECT_LE(std::fabs(total - expected_total), H / 2.0) << "the layer's total follows k_l * H * T";
        }
      }
    }
  }
}

// Bad input: one error naming the option; the policy's traits.
TEST(AdaKV, RefusesAFloorOutsideZeroOne) {
  for (double a : {-0.1, 1.5, std::nan("")}) {
    PolicyOptions o;
    o.head_floor = a;
    try {
      make_policy("adakv", o);
      ADD_FAILURE() << "accepted head_floor " << a;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("--kv-head-floor"), std::string::npos) << e.what();
    }
  }
  EXPECT_TRUE(make_policy("adakv", PolicyOptions{})->per_head());
  EXPECT_FALSE(make_policy("snapkv", PolicyOptions{})->per_head());
  EXPECT_FALSE(policy_info("adakv").uses_estimator);
}

// On the CPU back end (fixture model): prefill + steps, and the evaluation's path (one shared
// prefill, the per-head importance added, adopt) give the same per-head entries and logits; the
// result reports entries and bytes per layer and per head.
TEST(AdaKV, CpuBackendPrefillAndAdoptionAgreeAndReportPerHeadEntries) {
  const std::unique_ptr<Model> model = Model::load(test::data_path("fixtures/llama_text"));
  const Tokenizer tok(test::data_path("fixtures/llama_text/tokenizer.model"));
  const Engine e(*model, tok);
  PromptRequest req;
  req.text = "The quick brown fox jumps over the lazy dog and runs far away into the woods, where it sleeps "
             "under an old tree until the morning sun wakes it again.";
  req.tmpl = Template::Raw;
  const PreparedPrompt p = e.prepare(req);
  const int N = int(p.ids.size()), H = model->config().text.n_kv_heads, V = model->config().text.vocab_size;
  PolicyOptions o;
  o.budget = 0.4;
  o.window = 8;
  const int B = int(std::lround(0.4 * N));
  const std::unique_ptr<Backend> cpu = make_cpu_backend(*model);
  AdaKVPolicy pa(o), pb(o);
  std::vector<float> la(static_cast<size_t>(V));
  auto a = cpu->prefill(p, pa, la.data());
  const auto shared = cpu->prefill_shared(p, {});
  cpu->add_head_importance(*shared, p, N - o.window, "adakv");
  auto b = cpu->adopt(*shared, pb);
  std::vector<float> lb = shared->logits;
  EXPECT_EQ(la, lb);
  for (int step = 0; step < 6; ++step) {
    const auto ea = a->entries_per_head(), eb = b->entries_per_head();
    ASSERT_EQ(ea, eb) << "step " << step;
    ASSERT_EQ(int(ea.size()), model->config().text.n_layers);
    for (int l = 0; l < int(ea.size()); ++l)
      for (int h = 0; h < H; ++h) {
        const auto pa_ = a->entries().head_positions(l, h), pb_ = b->entries().head_positions(l, h);
        ASSERT_TRUE(std::equal(pa_.begin(), pa_.end(), pb_.begin(), pb_.end()));
      }
    if (step == 0) {
      for (const auto& l : ea) EXPECT_EQ(std::accumulate(l.begin(), l.end(), 0), H * B);
      EXPECT_EQ(a->entries_per_layer(), std::vector<int>(ea.size(), B));
    }
    const int32_t t = int32_t(std::max_element(la.begin(), la.end()) - la.begin());
    cpu->step(*a, t, la.data());
    cpu->step(*b, t, lb.data());
    ASSERT_EQ(la, lb) << "step " << step;
  }
  // generate(): the per-head fields of the result.
  AdaKVPolicy pc(o);
  SamplingOptions s;
  s.max_tokens = 5;
  s.ignore_eos = true;
  const GenerationResult r = generate(*cpu, tok, p, s, pc);
  ASSERT_EQ(r.kv_entries_per_head.size(), size_t(model->config().text.n_layers));
  ASSERT_EQ(r.kv_bytes_per_head.size(), r.kv_entries_per_head.size());
  size_t bytes = 0;
  for (size_t l = 0; l < r.kv_entries_per_head.size(); ++l) {
    size_t layer_bytes = 0;
    for (int h = 0; h < H; ++h) {
      EXPECT_EQ(r.kv_bytes_per_head[l][size_t(h)],
                size_t(r.kv_entries_per_head[l][size_t(h)]) * 2 * size_t(model->config().text.head_dim) * sizeof(float));
      layer_bytes += r.kv_bytes_per_head[l][size_t(h)];
    }
    EXPECT_EQ(layer_bytes, r.kv_bytes_per_layer[l]);
    bytes += layer_bytes;
  }
  EXPECT_EQ(bytes, r.kv_bytes);
}
