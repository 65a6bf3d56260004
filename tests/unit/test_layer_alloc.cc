// Layer allocation by one cutoff, value-weighted and lookahead importance, 2-D pooling over the image
// grid (kv/cutoff.h, engine/query_importance.h).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>

#include "core/error.h"
#include "engine/backend.h"
#include "engine/query_importance.h"
#include "eval/calibrate.h"
#include "eval/dataset.h"
#include "eval/evaluate.h"
#include "kv/cutoff.h"
#include "kv/policy.h"
#include "kv/profile.h"
#include "ops/ops.h"
#include "test_util.h"

namespace pkv {
namespace {

constexpr double kEps = 1.0 / (1 << 24);  // float32's unit roundoff

// Every layer holding the prompt's positions 0 .. N-1.
class FlatView : public CacheView {
 public:
  FlatView(int layers, int n) : pos_(static_cast<size_t>(n)), layers_(layers) { std::iota(pos_.begin(), pos_.end(), 0); }
  int n_layers() const override { return layers_; }
  std::span<const int32_t> positions(int) const override { return pos_; }

 private:
  std::vector<int32_t> pos_;
  int layers_;
};

// Scores with many ties (multiples of 1/8) so that the tie rules are exercised too.
std::vector<std::vector<float>> random_scores(int L, int N, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> d(0, 40);
  std::vector<std::vector<float>> s(static_cast<size_t>(L), std::vector<float>(static_cast<size_t>(N)));
  for (int l = 0; l < L; ++l)
    for (float& x : s[size_t(l)]) x = float(d(rng)) / 8.f * float(l + 1);  // layers on different scales
  return s;
}

TEST(CutoffBudgets, ExactTotalFloorsAndOneThresholdAcrossLayers) {
  const int L = 6, N = 50;
  const auto s = random_scores(L, N, 7);
  for (int floor : {0, 3, 10})
    for (int64_t total : {int64_t(0), int64_t(L * floor), int64_t(60), int64_t(150), int64_t(299), int64_t(L * N)}) {
      const std::vector<int> base(size_t(L), floor);
      const std::vector<int> n = cutoff_budgets(s, total, base);
      const int64_t want = std::clamp<int64_t>(total, int64_t(L) * floor, int64_t(L) * N);
      EXPECT_EQ(std::accumulate(n.begin(), n.end(), int64_t(0)), want) << "floor " << floor << " total " << total;
      // Beyond each layer's floor, every kept score >= every evicted score of any layer.
      float lowest_kept = INFINITY, highest_evicted = -INFINITY;
      for (int l = 0; l < L; ++l) {
        EXPECT_GE(n[size_t(l)], floor);
        EXPECT_LE(n[size_t(l)], N);
        std::vector<float> sorted = s[size_t(l)];
        std::sort(sorted.begin(), sorted.end(), std::greater<float>());
        for (int r = floor; r < n[size_t(l)]; ++r) lowest_kept = std::min(lowest_kept, sorted[size_t(r)]);
        for (int r = n[size_t(l)]; r < N; ++r) highest_evicted = std::max(highest_evicted, sorted[size_t(r)]);
      }
      EXPECT_GE(lowest_kept, highest_evicted) << "floor " << floor << " total " << total;
    }
}

TEST(CutoffPolicy, KeepsTheBudgetTheFloorAndTheHighestScoresAcrossLayers) {
  const int L = 5, N = 80;
  const auto imp = random_scores(L, N, 11);
  for (double floor : {0.0, 0.5, 1.0}) {
    PolicyOptions o;
    o.budget = 0.2;
    o.prefix_pool = 0;  // rank by the scores as they are
    o.layer_floor = floor;
    auto policy = make_policy("cutoff", o);
    FlatView view(L, N);
    const KeepPlan plan = policy->after_prefill(view, imp, N);
    const int uniform = int(std::lround(0.2 * N)), c = o.protected_count;
    const int floor_n = std::clamp(int(std::lround(floor * uniform)), c, uniform);
    std::vector<std::vector<int32_t>> kept(static_cast<size_t>(L));
    for (int l = 0; l < L; ++l) {  // a layer the plan does not name keeps everything
      kept[size_t(l)].resize(size_t(N));
      std::iota(kept[size_t(l)].begin(), kept[size_t(l)].end(), 0);
    }
    for (const LayerKeep& k : plan.layers) kept[size_t(k.layer)] = k.keep;
    int64_t total = 0;
    float lowest_kept = INFINITY, highest_evicted = -INFINITY;
    for (int l = 0; l < L; ++l) {
      const auto& k = kept[size_t(l)];
      total += int64_t(k.size());
      EXPECT_GE(int(k.size()), floor_n) << "layer " << l;
      EXPECT_TRUE(std::binary_search(k.begin(), k.end(), 0) && std::binary_search(k.begin(), k.end(), N - 1))
          << "the protected first and last tokens, layer " << l;
      // The layer's own order: protected first, then by score (ties to the earlier entry).
      std::vector<int32_t> order(static_cast<size_t>(N));
      std::iota(order.begin(), order.end(), 0);
      auto rank_score = [&](int32_t j) {
        return j == 0 || j == N - 1 ? std::numeric_limits<float>::infinity() : imp[size_t(l)][size_t(j)];
      };
      std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return rank_score(a) > rank_score(b); });
      for (int r = 0; r < N; ++r) {
        const int32_t j = order[size_t(r)];
        const bool in = std::binary_search(k.begin(), k.end(), j);
        EXPECT_EQ(in, r < int(k.size())) << "layer " << l << " keeps a prefix of its own ranking";
        if (in && r >= floor_n) lowest_kept = std::min(lowest_kept, rank_score(j));
        if (!in) highest_evicted = std::max(highest_evicted, rank_score(j));
      }
    }
    EXPECT_EQ(total, std::llround(0.2 * N * L)) << "floor " << floor;
    EXPECT_GE(lowest_kept, highest_evicted) << "floor " << floor;
  }
}

TEST(CutoffFloor, TheEvictionCapRaisesTheFloorNearTheFullCacheOnly) {
  // N 100, 2 protected: uniform u = round(b N); floor = max(round(f u), N - round(cap (N - u))), in [2, u].
  EXPECT_EQ(cutoff_floor(100, 0.2, 2, 0.5, 2), 10);  // 10 against -60: the share of u
  EXPECT_EQ(cutoff_floor(100, 0.5, 2, 0.5, 2), 25);  // 25 against 0
  EXPECT_EQ(cutoff_floor(100, 0.7, 2, 0.5, 2), 40);  // 35 against 40: the cap binds above 2/3 kept
  EXPECT_EQ(cutoff_floor(100, 0.8, 2, 0.5, 2), 60);
  EXPECT_EQ(cutoff_floor(100, 0.9, 2, 0.5, 2), 80);
  EXPECT_EQ(cutoff_floor(100, 0.9, 2, 0.5, 1.5), 85);
  EXPECT_EQ(cutoff_floor(100, 0.9, 2, 0.5, 0), 45);  // off
  EXPECT_EQ(cutoff_floor(100, 0.9, 2, 0.0, 1), 90);  // cap 1: uniform
  EXPECT_EQ(cutoff_floor(100, 0.1, 2, 0.0, 0), 2);   // the protected entries
  EXPECT_EQ(cutoff_floor(100, 0.9, 2, 1.0, 3), 90);  // never above u

  // Three layers of ten entries whose scores order the layers (layer 2 above layer 1 above layer 0), at
  // 80% kept (24 entries): the threshold alone would fill layers 2 and 1 and leave layer 0 its floor
  // of 4; evicting at most twice the uniform 2 entries, layer 0 keeps 6 (cap 1.5: 7).
  const int L = 3, N = 10;
  std::vector<std::vector<float>> imp(static_cast<size_t>(L), std::vector<float>(static_cast<size_t>(N)));
  for (int l = 0; l < L; ++l)
    for (int j = 0; j < N; ++j) imp[size_t(l)][size_t(j)] = float(10 * (l + 1)) + float((j * 7) % N) / 16.f;
  auto budgets = [&](const std::string& spec) {
    PolicyOptions o;
    o.budget = 0.8;
    o.prefix_pool = 0;
    auto policy = make_policy(spec, o);
    FlatView view(L, N);
    const KeepPlan plan = policy->after_prefill(view, imp, N);
    std::vector<int> n(static_cast<size_t>(L), N);
    for (const LayerKeep& k : plan.layers) n[size_t(k.layer)] = int(k.keep.size());
    return n;
  };
  EXPECT_EQ(budgets("cutoff:floor=0.5"), (std::vector<int>{4, 10, 10}));
  EXPECT_EQ(budgets("cutoff:floor=0.5:cap=2"), (std::vector<int>{6, 8, 10}));
  EXPECT_EQ(budgets("cutoff:floor=0.5:cap=1.5"), (std::vector<int>{7, 7, 10}));
  EXPECT_EQ(budgets("cutoff:cap=1"), (std::vector<int>{8, 8, 8}));
  EXPECT_THROW(budgets("cutoff:cap=0.5"), Error);
  EXPECT_THROW(budgets("cutoff:cap=x"), Error);
}

TEST(GridPool, AHotPatchSpreadsToItsGridNeighboursNotAcrossARowBreak) {
  // 3 text tokens, a 5 x 5 image, 4 text tokens.
  const int before = 3, G = 5, after = 4, N = before + G * G + after;
  auto at = [&](int y, int x) { return size_t(before + y * G + x); };
  std::vector<float> s(static_cast<size_t>(N), 0.f);
  s[at(2, 2)] = 5.f;  // an inner patch
  s[at(1, 4)] = 3.f;  // the last patch of row 1: its sequence neighbour is (2, 0)
  s[size_t(N - 2)] = 2.f;  // a text token
  const std::vector<float> p = pool_scores(s, 3, 3, before, G * G);
  for (int y = 0; y < G; ++y)
    for (int x = 0; x < G; ++x) {
      float want = 0.f;
      if (std::abs(y - 1) <= 1 && std::abs(x - 4) <= 1) want = 3.f;
      if (std::abs(y - 2) <= 1 && std::abs(x - 2) <= 1) want = 5.f;  // its 8 neighbours and itself
      EXPECT_EQ(p[at(y, x)], want) << "patch (" << y << ", " << x << ")";
    }
  EXPECT_EQ(p[at(2, 0)], 0.f) << "the sequence neighbour across the row break";
  // Text keeps 1-D pooling along the sequence.
  EXPECT_EQ(p[size_t(N - 3)], 2.f);
  EXPECT_EQ(p[size_t(N - 1)], 2.f);
  EXPECT_EQ(p[size_t(N - 4)], 0.f);
  // Without a known image (or a square grid) everything pools along the sequence.
  const std::vector<float> q = pool_scores(s, 3, 3, -1, 0);
  EXPECT_EQ(q[at(2, 0)], 3.f);
  EXPECT_EQ(pool_scores(s, 3, 3, before, G * G - 1), q);
}

// The cache of a short text prompt through the bundled model, its embeddings and the last logits.
struct TextPrefill {
  PreparedPrompt p;
  KVCache cache;
  std::vector<float> logits;
};
TextPrefill text_prefill(const Model& m, const Tokenizer& tok, const std::string& text) {
  TextPrefill t{{}, m.make_cache(), std::vector<float>(size_t(m.config().text.vocab_size))};
  for (int id : tok.encode(text)) t.p.ids.push_back(id);
  const int N = int(t.p.ids.size()), D = m.config().text.hidden;
  t.p.embeddings.resize(size_t(N) * D);
  m.embed(t.p.ids.data(), N, t.p.embeddings.data());
  std::vector<int32_t> pos(static_cast<size_t>(N));
  std::iota(pos.begin(), pos.end(), 0);
  DecoderCall call;
  call.logits_rows = {N - 1};
  call.logits_out = t.logits.data();
  m.decode(t.p.embeddings.data(), N, pos.data(), t.cache, call);
  return t;
}

// Layer l's W_o [hidden, n_heads * head_dim] as stored, row by row, in float32.
std::vector<float> output_projection(const Model& m, int l) {
  const int D = m.config().text.hidden, qd = m.config().text.n_heads * m.config().text.head_dim;
  std::vector<float> Wo(size_t(D) * qd);
  for (int e = 0; e < D; ++e) ops::weight_row(*m.weights().lm.layers[size_t(l)].o.w, e, qd, &Wo[size_t(e) * qd]);
  return Wo;
}

TEST(ValueWeights, EqualAnIndependentReferenceOnTheBundledModel) {
  test::BundledModel& b = test::bundled_model();
  const Model& m = *b.model;
  const TextConfig& t = m.config().text;
  const TextPrefill tp = text_prefill(m, b.tok, "USER: What colour is the star in the top left corner? ASSISTANT:");
  const int n = int(tp.p.ids.size()), H = t.n_heads, hd = t.head_dim, group = H / t.n_kv_heads;
  const int kvd = t.n_kv_heads * hd, qd = H * hd, D = t.hidden;
  const auto vnorm = value_weights(m, tp.cache, ValueWeight::ValueNorm, n);
  const auto wov = value_weights(m, tp.cache, ValueWeight::OutputNorm, n);
  const auto none = value_weights(m, tp.cache, ValueWeight::None, n);
  ASSERT_EQ(int(wov.size()), t.n_layers);
  std::vector<float> row(static_cast<size_t>(qd));
  for (int l = 0; l < t.n_layers; ++l) {
    const float* V = tp.cache.layer(l).values();
    const std::vector<float> Wo = output_projection(m, l);
    for (int h = 0; h < H; ++h)
      for (int j = 0; j < n; ++j) {
        const float* v = V + size_t(j) * kvd + size_t(h / group) * hd;
        double l1 = 0, out = 0, bound = 0;
        for (int d = 0; d < hd; ++d) l1 += std::fabs(double(v[d]));
        for (int e = 0; e < D; ++e) {
          double y = 0, mag = 0;
          for (int d = 0; d < hd; ++d) {
            const double term = double(Wo[size_t(e) * qd + size_t(h) * hd + d]) * v[d];
            y += term;
            mag += std::fabs(term);
          }
          out += std::fabs(y);
          bound += mag;
        }
        // The engine sums each output's hd products in float32: each off by at most
        // hd eps / (1 - hd eps) of the sum of their magnitudes; the L1 norm then adds those up, and
        // the result is rounded to float once.
        const double tol_wov = bound * hd * kEps / (1 - hd * kEps) + out * kEps;
        const size_t i = size_t(h) * n + j;
        EXPECT_NEAR(vnorm[size_t(l)][i], l1, l1 * kEps) << "layer " << l << " head " << h << " entry " << j;
        EXPECT_NEAR(wov[size_t(l)][i], out, tol_wov) << "layer " << l << " head " << h << " entry " << j;
        EXPECT_EQ(none[size_t(l)][i], 1.f);
      }
  }
}

// wov2: ||W_o^h v||_2 through the Gram matrix G_h = (W_o^h)^T W_o^h (Model::output_gram) against the
// direct norm in double. The bound, to first order in u = 2^-24 with g(n) = n u / (1 - n u): each
// G_ab sums hidden products in float32 (off by <= g(hidden) M_ab, M_ab = sum_e |W_ea| |W_eb|); y = G v
// sums head_dim products in float32 (off by <= g(head_dim) sum_b |G_ab| |v_b|); v . y is summed in
// double. So |v'Gv (engine) - ||W v||^2| <= A (g(hidden) + g(head_dim) (1 + g(hidden))) with
// A = sum_e (sum_a |W_ea| |v_a|)^2, which the square root turns into at most that over the two roots'
// sum, plus the final rounding to float.
TEST(ValueWeights, TheGramFormEqualsTheDirectL2NormWithinFloatRounding) {
  test::BundledModel& b = test::bundled_model();
  const Model& m = *b.model;
  const TextConfig& t = m.config().text;
  const TextPrefill tp = text_prefill(m, b.tok, "USER: How many circles are in the bottom row? ASSISTANT:");
  const int n = int(tp.p.ids.size()), H = t.n_heads, hd = t.head_dim, group = H / t.n_kv_heads;
  const int kvd = t.n_kv_heads * hd, qd = H * hd, D = t.hidden;
  const auto wov2 = value_weights(m, tp.cache, ValueWeight::OutputNorm2, n);
  ASSERT_EQ(int(wov2.size()), t.n_layers);
  auto g = [](int k) { return k * kEps / (1 - k * kEps); };
  double worst = 0;  // the largest error seen as a share of its bound
  for (int l = 0; l < t.n_layers; ++l) {
    ASSERT_EQ(wov2[size_t(l)].size(), size_t(H) * n);
    ASSERT_EQ(m.output_gram(l).size(), size_t(H) * hd * hd);
    const float* V = tp.cache.layer(l).values();
    const std::vector<float> Wo = output_projection(m, l);
    for (int h = 0; h < H; ++h)
      for (int j = 0; j < n; ++j) {
        const float* v = V + size_t(j) * kvd + size_t(h / group) * hd;
        double sq = 0, A = 0;
        for (int e = 0; e < D; ++e) {
          double y = 0, mag = 0;
          for (int d = 0; d < hd; ++d) {
            const double w = Wo[size_t(e) * qd + size_t(h) * hd + d];
            y += w * v[d];
            mag += std::fabs(w * v[d]);
          }
          sq += y * y;
          A += mag * mag;
        }
        const double want = std::sqrt(sq), got = wov2[size_t(l)][size_t(h) * n + j];
        const double E = A * (g(D) + g(hd) * (1 + g(D)));
        const double tol = std::min(std::sqrt(E), E / (want + std::sqrt(std::max(0.0, sq - E)))) + got * kEps;
        ASSERT_NEAR(got, want, tol) << "layer " << l << " head " << h << " entry " << j;
        worst = std::max(worst, std::fabs(got - want) / tol);
        EXPECT_GT(want, 0);
      }
  }
  // The bound is a bound, not the error: far from it, but the form is not exact either.
  EXPECT_LT(worst, 1.0);
}

TEST(QueryScores, WeightedSoftmaxOnHandMadeArrays) {
  test::BundledModel& b = test::bundled_model();
  const Model& m = *b.model;
  const TextConfig& t = m.config().text;
  const int L = t.n_layers, H = t.n_heads, hd = t.head_dim, Hkv = t.n_kv_heads, kvd = Hkv * hd, qd = H * hd;
  const int S = 9, n = 6, T = 3;  // 9 entries, the first 6 scored; 3 query rows at positions 6, 7, 8
  std::mt19937 rng(3);
  std::normal_distribution<float> g(0.f, 1.f);
  KVCache cache(L, kvd, Hkv);
  std::vector<float> k(size_t(S) * kvd), v(size_t(S) * kvd);
  std::vector<int32_t> pos(static_cast<size_t>(S));
  std::iota(pos.begin(), pos.end(), 0);
  std::vector<std::vector<float>> q(static_cast<size_t>(L)), w(static_cast<size_t>(L));
  for (int l = 0; l < L; ++l) {
    for (float& x : k) x = g(rng);
    for (float& x : v) x = g(rng);
    cache.layer(l).append(k.data(), v.data(), pos.data(), S);
    q[size_t(l)].resize(size_t(T) * qd);
    for (float& x : q[size_t(l)]) x = g(rng);
    w[size_t(l)].resize(size_t(H) * n);
    for (float& x : w[size_t(l)]) x = std::fabs(g(rng));
  }
  const int32_t qpos[T] = {6, 7, 8};
  std::vector<std::vector<float>> out;
  query_scores(m, cache, q, qpos, T, w, n, out);
  for (int l = 0; l < L; ++l) {
    const float* K = cache.layer(l).keys();
    for (int i = 0; i < T; ++i) {
      std::vector<double> want(static_cast<size_t>(n), 0.0);
      for (int h = 0; h < H; ++h) {
        std::vector<double> s;
        for (int j = 0; j <= qpos[i]; ++j) {  // causal: entries at positions <= the query's
          double dot = 0;
          for (int d = 0; d < hd; ++d) dot += double(q[size_t(l)][size_t(i) * qd + size_t(h) * hd + d]) * K[size_t(j) * kvd + size_t(h / (H / Hkv)) * hd + d];
          s.push_back(dot / std::sqrt(double(hd)));
        }
        const double mx = *std::max_element(s.begin(), s.end());
        double z = 0;
        for (double x : s) z += std::exp(x - mx);
        for (int j = 0; j < n; ++j) want[size_t(j)] += std::exp(s[size_t(j)] - mx) / z * w[size_t(l)][size_t(h) * n + j] / H;
      }
      for (int j = 0; j < n; ++j)  // double throughout, each head's term rounded to float and summed in float
        EXPECT_NEAR(out[size_t(l)][size_t(i) * n + j], want[size_t(j)], want[size_t(j)] * (H + 2) * kEps + 1e-300)
            << "layer " << l << " row " << i << " entry " << j;
    }
  }
}

// Records the decoder's queries (for the bound of the rounding) of one call.
class QueryLog : public Observer {
 public:
  bool wants(const std::string& name) const override { return name == "attn_q"; }
  void on_tensor(const std::string&, int layer, const float* data, const std::vector<int64_t>& shape) override {
    if (int(q.size()) <= layer) q.resize(size_t(layer) + 1);
    q[size_t(layer)].assign(data, data + shape[0] * shape[1]);
  }
  std::vector<std::vector<float>> q;
};

TEST(Lookahead, EqualsTheAttentionOfItsDecodeStepsByTheModelsOwnImportance) {
  test::BundledModel& b = test::bundled_model();
  const Model& m = *b.model;
  const TextConfig& t = m.config().text;
  const TextPrefill tp = text_prefill(m, b.tok, "USER: Describe the image in detail. ASSISTANT:");
  const int N = int(tp.p.ids.size()), L = t.n_layers, V = t.vocab_size, hd = t.head_dim, H = t.n_heads;
  const int kvd = t.n_kv_heads * hd, qd = H * hd, group = H / t.n_kv_heads;
  for (QueryReduce reduce : {QueryReduce::Sum, QueryReduce::Mean, QueryReduce::Max}) {
    ImportanceRequest req;
    req.needed = true;
    req.lookahead = 5;
    req.reduce = reduce;
    QueryImportanceStats st;
    const auto got = extended_importance(m, tp.cache, tp.p, tp.logits.data(), req, &st);
    // The reference: greedy steps over a copy of the full cache, the importance accumulated by the
    // attention kernel itself (DecoderCall::importance, the mean over heads), cut to the prompt.
    KVCache c = tp.cache.clone();
    std::vector<float> logits = tp.logits, x(static_cast<size_t>(t.hidden));
    std::vector<std::vector<float>> want(static_cast<size_t>(L), std::vector<float>(static_cast<size_t>(N), 0.f));
    std::vector<std::vector<double>> tol(static_cast<size_t>(L), std::vector<double>(static_cast<size_t>(N), 0.0));
    std::vector<int32_t> tokens;
    for (int s = 0; s < req.lookahead; ++s) {
      const int32_t tok = int32_t(std::max_element(logits.begin(), logits.end()) - logits.begin());
      if (std::find(t.eos_ids.begin(), t.eos_ids.end(), tok) != t.eos_ids.end()) break;
      tokens.push_back(tok);
      m.embed(&tok, 1, x.data());
      const int32_t pos = N + s;
      std::vector<std::vector<float>> imp;
      QueryLog log;
      DecoderCall call;
      call.observer = &log;
      call.show_queries = true;
      call.importance = &imp;
      call.logits_rows = {0};
      call.logits_out = logits.data();
      m.decode(x.data(), 1, &pos, c, call);
      for (int l = 0; l < L; ++l) {
        // Both paths compute each score q.k in float32 before the softmax (the kernel) or in double
        // (query_scores): a score is off by at most hd eps / (1 - hd eps) * scale * sum |q_d k_d|,
        // which moves each probability by that much twice (its exponent and the normaliser) relative
        // to itself; the kernel's exponentials, normaliser (S terms) and head mean add (S + H + 4) eps.
        const int S = c.size(l);
        double worst = 0;
        const float* K = c.layer(l).keys();
        for (int h = 0; h < H; ++h)
          for (int j = 0; j < S; ++j) {
            double mag = 0;
            for (int d = 0; d < hd; ++d)
              mag += std::fabs(double(log.q[size_t(l)][size_t(h) * hd + d]) * K[size_t(j) * kvd + size_t(h / group) * hd + d]);
            worst = std::max(worst, mag / std::sqrt(double(hd)) * hd * kEps / (1 - hd * kEps));
          }
        const double rel = 2 * 2 * worst + (S + H + 4) * kEps;
        for (int j = 0; j < N; ++j) {
          const float a = imp[size_t(l)][size_t(j)];
          float& w = want[size_t(l)][size_t(j)];
          w = reduce == QueryReduce::Max ? std::max(w, a) : w + a;
          tol[size_t(l)][size_t(j)] = reduce == QueryReduce::Max ? std::max(tol[size_t(l)][size_t(j)], a * rel)
                                                                 : tol[size_t(l)][size_t(j)] + a * rel;
        }
      }
    }
    ASSERT_EQ(st.lookahead_tokens, tokens);
    ASSERT_FALSE(tokens.empty());
    for (int l = 0; l < L; ++l)
      for (int j = 0; j < N; ++j) {
        double w = want[size_t(l)][size_t(j)], tl = tol[size_t(l)][size_t(j)];
        if (reduce == QueryReduce::Mean) w /= double(tokens.size()), tl /= double(tokens.size());
        EXPECT_NEAR(got[size_t(l)][size_t(j)], w, tl + 2 * w * kEps * tokens.size())
            << query_reduce_name(reduce) << " layer " << l << " entry " << j;
      }
    (void)V;
    (void)qd;
  }
}

TEST(PolicySpec, OptionsInThePolicyNameAndTheirErrors) {
  PolicyOptions o;
  apply_policy_spec("cutoff:wov:floor=0.5:grid=3:look=8:reduce=max:pool=0", o);
  EXPECT_EQ(o.value_weight, ValueWeight::OutputNorm);
  EXPECT_EQ(o.layer_floor, 0.5);
  EXPECT_EQ(o.grid_pool, 3);
  EXPECT_EQ(o.lookahead, 8);
  EXPECT_EQ(o.query_reduce, QueryReduce::Max);
  EXPECT_EQ(o.prefix_pool, 0);
  EXPECT_EQ(policy_base_name("cutoff:wov"), "cutoff");
  EXPECT_EQ(policy_info("cutoff:w=vnorm", "--policies").name, "cutoff");
  auto message = [](auto&& f) {
    try {
      f();
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(message([] { make_policy("cutoff:floor=2", PolicyOptions{}); }).find("--kv-policy cutoff:floor=2"), std::string::npos);
  EXPECT_NE(message([] { make_policy("cutoff:bogus", PolicyOptions{}); }).find("unknown option 'bogus'"), std::string::npos);
  EXPECT_NE(message([] { make_policy("cutoff:w=l2", PolicyOptions{}); }).find("unknown value weighting 'l2'"), std::string::npos);
  EXPECT_NE(message([] { make_policy("cutoff:look=-1", PolicyOptions{}); }).find("'look' takes an integer >= 0"), std::string::npos);
  // Only the CPU engine measures every extended request (the back ends without their own form: one
  // clear error); the GPU all but lookahead and wov, each refused naming its option.
  ImportanceRequest r;
  r.needed = true;
  r.weight = ValueWeight::ValueNorm;
  EXPECT_NE(message([&] { check_prompt_importance(r, 100); }).find("CPU engine only"), std::string::npos);
  EXPECT_NO_THROW(check_prompt_importance(r, 100, true));
  for (ValueWeight w : {ValueWeight::None, ValueWeight::ValueNorm, ValueWeight::OutputNorm2})
    for (QueryReduce q : {QueryReduce::Sum, QueryReduce::Mean, QueryReduce::Max}) {
      r.weight = w, r.reduce = q;
      EXPECT_NO_THROW(check_gpu_prompt_importance(r, 100));
    }
  r.lookahead = 8;
  const std::string look = message([&] { check_gpu_prompt_importance(r, 100); });
  EXPECT_NE(look.find("look="), std::string::npos) << look;
  EXPECT_NE(look.find("--kv-lookahead"), std::string::npos) << look;
  r.lookahead = 0, r.weight = ValueWeight::OutputNorm;
  EXPECT_NE(message([&] { check_gpu_prompt_importance(r, 100); }).find("use wov2"), std::string::npos);
}

// The offline form: calibrating on one scene gives that scene's online cutoff budgets, and the
// profile records the rule (and reads it back; a bad rule is refused naming the field).
TEST(CutoffProfile, OneSceneCalibratesToTheOnlineBudgets) {
  test::BundledModel& b = test::bundled_model();
  const Model& m = *b.model;
  Engine engine(m, b.tok);
  const auto backend = make_cpu_backend(m);
  const std::vector<Sample> samples = load_conversations(std::string(PKV_SOURCE_DIR) + "/data/eval/eval.json");
  const std::string rule = "cutoff:wov:floor=0.5";
  CalibrateOptions opt;
  opt.budgets = {0.2, 0.5};
  opt.limit = 1;
  opt.protected_count = 2;
  opt.layer_rule = rule;
  const CalibrateResult r = calibrate(*backend, engine, samples, opt);
  EXPECT_EQ(r.profile.layer_rule, rule);
  std::string why;
  const std::optional<PreparedPrompt> p = prepare_sample(engine, samples[0], "", &why, backend.get());
  ASSERT_TRUE(p) << why;
  const int N = int(p->ids.size());
  for (const ProfileBudget& pb : r.profile.budgets) {
    PolicyOptions o;
    o.budget = pb.budget;
    o.image_offset = p->image_offset, o.image_tokens = p->image_tokens;
    auto online = make_policy(rule, o);
    std::vector<float> logits(static_cast<size_t>(m.config().text.vocab_size));
    backend->prefill(*p, *online, logits.data());
    ASSERT_EQ(online->prefill_kept().size(), pb.keep.size());
    for (size_t l = 0; l < pb.keep.size(); ++l)  // k_l = n_l / N, rescaled to a mean already exact
      EXPECT_NEAR(pb.keep[l] * N, online->prefill_kept()[l], 1e-6) << "budget " << pb.budget << " layer " << l;
  }
  Profile back = Profile::parse(r.profile.to_json(), "round trip");
  EXPECT_EQ(back.layer_rule, rule);
  Profile bad = r.profile;
  bad.layer_rule = "cutoff:floor=7";
  try {
    bad.validate("bad.json");
    ADD_FAILURE() << "a bad layer rule was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("importance.layer_rule"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace pkv
