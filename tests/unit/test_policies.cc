// The KV policies on a real model (the llava_hf_mha fixture: 2 layers, 612-token prompt with 576
// image tokens): exact per-layer budgets after prefill and at every decode step, protected tokens,
// order and absolute positions, untouched K/V rows, budget 1.0 = full, and the prefix search.
#include <gtest/gtest.h>

#include <cmath>
#include <numeric>
#include <random>

#include "core/error.h"
#include "engine/engine.h"
#include "kv/prefix_search.h"
#include "test_util.h"

using namespace pkv;

namespace {

struct PolicyFixture {
  std::unique_ptr<Model> model;
  std::unique_ptr<Tokenizer> tok;
  Image img;
  PreparedPrompt prompt;
};

PolicyFixture& setup() {
  static PolicyFixture s = [] {
    PolicyFixture s;
    s.model = Model::load(test::data_path("fixtures/llava_hf_mha"));
    s.tok = std::make_unique<Tokenizer>(test::data_path("fixtures/llava_hf_mha/tokenizer.model"));
    s.img = load_image(test::data_path("images/wide.png"));
    Engine e(*s.model, *s.tok);
    PromptRequest req;
    req.text = "Describe the image in detail.";
    req.image = &s.img;
    s.prompt = e.prepare(req);
    return s;
  }();
  return s;
}

PolicyOptions options(double budget, Estimator est = Estimator::Window) {
  PolicyOptions o;
  o.budget = budget;
  o.estimator = est;
  return o;
}

// The full cache after prefill + `steps` greedy tokens, and the tokens.
struct Reference {
  std::vector<int32_t> tokens;
  KVCache cache;
};

}  // namespace

class PolicyBudget : public ::testing::TestWithParam<std::tuple<std::string, double>> {};

TEST_P(PolicyBudget, ExactBudgetsProtectedTokensOrderAndRows) {
  auto [name, b] = GetParam();
  PolicyFixture& s = setup();
  const int N = int(s.prompt.ids.size()), L = s.model->config().text.n_layers, V = s.model->config().text.vocab_size;
  PolicyOptions o = options(b);
  if (name == "prefixkv") o.keep_fractions = {std::min(1.0, b * 1.5), b * 0.5};  // a lopsided profile
  auto policy = make_policy(name, o);
  FullPolicy full;
  Session sess(*s.model, *policy), ref(*s.model, full);
  std::vector<float> logits(static_cast<size_t>(V)), ref_logits(logits.size());
  sess.prefill(s.prompt, logits.data());
  ref.prefill(s.prompt, ref_logits.data());
  // After prefill: the per-layer counts the policy reported, summing to the budget.
  const auto& kept = policy->prefill_kept();
  ASSERT_EQ(int(kept.size()), L);
  int64_t total = 0;
  for (int l = 0; l < L; ++l) {
    EXPECT_EQ(sess.cache().layer(l).size(), kept[size_t(l)]) << name << " layer " << l;
    total += kept[size_t(l)];
  }
  const bool uniform = name != "prefixkv" && name != "prefixkv-online" && name != "pyramidkv";
  if (uniform) {
    for (int l = 0; l < L; ++l) EXPECT_EQ(kept[size_t(l)], int(std::lround(b * N))) << name;
  }
  EXPECT_EQ(total, std::llround(b * N * L)) << name;
  if (name == "prefixkv") {
    EXPECT_GT(kept[0], kept[1]);  // follows the profile
  }

  // Decode 12 steps; check every step.
  int tok = int(std::max_element(logits.begin(), logits.end()) - logits.begin());
  for (int step = 0; step < 12; ++step) {
    sess.step(tok, logits.data());
    ref.step(tok, ref_logits.data());
    const int T = sess.position();
    for (int l = 0; l < L; ++l) {
      const KVLayer& layer = sess.cache().layer(l);
      const KVLayer& full_layer = ref.cache().layer(l);
      // The section-4 rule: length round(k_l * T).
      const int want = int(std::lround(double(kept[size_t(l)]) / N * T));
      EXPECT_EQ(layer.size(), std::max(want, 3)) << name << " layer " << l << " step " << step;
      // Protected: the first token and the last prompt token; the newest token is always there.
      const int32_t* p = layer.positions();
      EXPECT_EQ(p[0], 0) << name;
      EXPECT_TRUE(std::binary_search(p, p + layer.size(), N - 1)) << name << " lost the last prompt token";
      EXPECT_EQ(p[layer.size() - 1], T - 1) << name;
      EXPECT_TRUE(std::is_sorted(p, p + layer.size()) &&
                  std::adjacent_find(p, p + layer.size()) == p + layer.size()) << name;
      // Prompt rows are the full cache's rows at the same absolute positions (generated tokens' rows
      // legitimately differ past layer 0, since they were computed over a smaller cache; Elastic
      // merges rows: skip it).
      if (name == "elastic") continue;
      const int d = layer.kv_dim();
      for (int i = 0; i < layer.size(); i += 7) {
        const int32_t pos = p[i];
        if (pos >= N) break;
        ASSERT_EQ(full_layer.positions()[pos], pos);
        for (int x = 0; x < d; ++x) {
          ASSERT_EQ(layer.keys()[size_t(i) * d + x], full_layer.keys()[size_t(pos) * d + x]) << name;
          ASSERT_EQ(layer.values()[size_t(i) * d + x], full_layer.values()[size_t(pos) * d + x]) << name;
        }
      }
    }
    tok = int(std::max_element(logits.begin(), logits.end()) - logits.begin());
  }
}

INSTANTIATE_TEST_SUITE_P(AllPolicies, PolicyBudget,
                         ::testing::Combine(::testing::Values("streaming", "h2o", "snapkv", "pyramidkv", "elastic",
                                                              "uniform-prefix", "prefixkv", "prefixkv-online"),
                                            ::testing::Values(0.1, 0.5)),
                         [](const auto& i) {
                           std::string n = std::get<0>(i.param) + "_" + std::to_string(int(std::get<1>(i.param) * 100));
                           for (auto& c : n)
                             if (!isalnum(static_cast<unsigned char>(c))) c = '_';
                           return n;
                         });

TEST(Policies, BudgetOneEqualsFullBitForBit) {
  PolicyFixture& s = setup();
  Engine e(*s.model, *s.tok);
  SamplingOptions so;
  so.max_tokens = 16;
  so.ignore_eos = true;
  FullPolicy full;
  GenerationResult ref = e.generate(s.prompt, so, full);
  for (const std::string name : {"prefixkv", "prefixkv-online", "uniform-prefix", "streaming", "h2o", "snapkv"}) {
    PolicyOptions o = options(1.0);
    o.keep_fractions = {1.0, 1.0};
    auto p = make_policy(name, o);
    GenerationResult r = e.generate(s.prompt, so, *p);
    EXPECT_EQ(r.tokens, ref.tokens) << name;
    EXPECT_EQ(r.kv_bytes, ref.kv_bytes) << name;
  }
}

TEST(Policies, CompressionShrinksBytesInProportion) {
  PolicyFixture& s = setup();
  Engine e(*s.model, *s.tok);
  SamplingOptions so;
  so.max_tokens = 1;
  FullPolicy full;
  auto p = make_policy("uniform-prefix", options(0.2));
  GenerationResult a = e.generate(s.prompt, so, full), b = e.generate(s.prompt, so, *p);
  const int N = int(s.prompt.ids.size());
  EXPECT_EQ(b.kv_bytes * size_t(N), a.kv_bytes * size_t(std::lround(0.2 * N)));
}

TEST(Policies, UnknownNameAndBadBudget) {
  EXPECT_THROW(make_policy("magic", options(0.5)), Error);
  EXPECT_THROW(make_policy("h2o", options(0.0)), Error);
  EXPECT_THROW(make_policy("h2o", options(1.5)), Error);
  EXPECT_THROW(make_policy("prefixkv", options(0.5)), Error);  // no profile
  try {
    make_policy("magic", options(0.5));
  } catch (const Error& err) {
    EXPECT_NE(std::string(err.what()).find("prefixkv-online"), std::string::npos) << "lists the policies";
  }
}

TEST(PrefixSearch, ExactTotalAndMonotoneInBudget) {
  std::mt19937 rng(5);
  std::exponential_distribution<float> ex(1.f);
  for (int trial = 0; trial < 20; ++trial) {
    const int L = 1 + int(rng() % 12), N = 3 + int(rng() % 200), c = int(rng() % 3);
    std::vector<std::vector<float>> imp(static_cast<size_t>(L), std::vector<float>(static_cast<size_t>(N)));
    for (auto& l : imp)
      for (auto& x : l) x = std::pow(ex(rng), 1.f + float(rng() % 4));  // layers of varied concentration
    std::vector<int> prev(static_cast<size_t>(L), 0);
    for (int64_t total = int64_t(L) * std::max(c, 1); total <= int64_t(L) * N; total += 1 + total / 7) {
      std::vector<int> n = prefix_budgets(imp, total, c);
      EXPECT_EQ(std::accumulate(n.begin(), n.end(), int64_t(0)), total);
      for (int l = 0; l < L; ++l) {
        EXPECT_GE(n[size_t(l)], std::max(c, 1));
        EXPECT_LE(n[size_t(l)], N);
        EXPECT_GE(n[size_t(l)], prev[size_t(l)]) << "not monotone";
      }
      prev = n;
    }
  }
}

TEST(PrefixSearch, ConcentratedLayersGetLess) {
  // Layer 0: all mass on one token; layer 1: uniform. At any budget layer 1 keeps more.
  std::vector<std::vector<float>> imp = {std::vector<float>(100, 0.f), std::vector<float>(100, 1.f)};
  imp[0][37] = 5.f;
  for (int64_t total : {20, 60, 100, 150}) {
    auto n = prefix_budgets(imp, total, 2);
    EXPECT_LT(n[0], n[1]) << total;
    EXPECT_EQ(n[0] + n[1], total);
  }
}

TEST(PrefixSearch, MatchesBruteForceRetentionLevel) {
  // With distinct thresholds, the result is n_l(p) for some p (METHOD.md section 2 step 2).
  std::mt19937 rng(9);
  std::uniform_real_distribution<float> u(0.f, 1.f);
  std::vector<std::vector<float>> imp(4, std::vector<float>(50));
  for (auto& l : imp)
    for (auto& x : l) x = std::pow(u(rng), 3.f);
  auto n = prefix_budgets(imp, 83, 1);
  // Find p: the largest threshold consumed; every layer's count must be n_l(p) or one above.
  auto count_at = [&](const std::vector<float>& l, double p) {
    std::vector<double> s(l.begin(), l.end());
    std::sort(s.begin(), s.end(), std::greater<double>());
    double sum = std::accumulate(s.begin(), s.end(), 0.0), cum = 0;
    for (size_t i = 0; i < s.size(); ++i) {
      cum += s[i];
      if (cum / sum >= p) return int(i) + 1;
    }
    return int(s.size());
  };
  double lo = 0, hi = 1;
  for (int it = 0; it < 100; ++it) {
    double mid = (lo + hi) / 2, tot = 0;
    for (auto& l : imp) tot += count_at(l, mid);
    (tot <= 83 ? lo : hi) = mid;
  }
  for (int l = 0; l < 4; ++l) EXPECT_NEAR(n[size_t(l)], count_at(imp[size_t(l)], lo), 1) << l;
}

TEST(PrefixSearch, CountsFromFractionsExact) {
  auto n = counts_from_fractions({0.9, 0.05, 0.31, 0.5}, 100, 176, 2);
  EXPECT_EQ(std::accumulate(n.begin(), n.end(), 0), 176);
  EXPECT_EQ(n[0], 90);
  EXPECT_EQ(n[1], 5);
}

// Which entries the prefix selection keeps, without and with max-pooling the scores (SnapKV's
// smoothing, --kv-prefix-pool): one spike at token 50 keeps only token 50 unpooled, and its
// neighbourhood pooled.
TEST(Policies, PrefixPoolingKeepsTheSpikesNeighbourhood) {
  const int N = 200, D = 4;
  std::vector<float> kv(size_t(N) * D, 0.f);
  std::vector<int32_t> pos(static_cast<size_t>(N));
  std::iota(pos.begin(), pos.end(), 0);
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> u(0.f, 0.01f);
  std::vector<float> imp(static_cast<size_t>(N));
  for (float& v : imp) v = u(rng);
  imp[50] = 10.f;
  for (int pool : {0, 7}) {
    SCOPED_TRACE("pool " + std::to_string(pool));
    KVCache cache(1, D);
    cache.layer(0).append(kv.data(), kv.data(), pos.data(), N);
    PolicyOptions o = options(7.0 / N);  // 7 entries: the 2 protected + 5 chosen
    o.prefix_pool = pool;
    auto p = make_policy("uniform-prefix", o);
    cache.apply(p->after_prefill(cache, {imp}, N), p->name());
    const KVLayer& l = cache.layer(0);
    ASSERT_EQ(l.size(), 7);
    std::vector<int32_t> kept(l.positions(), l.positions() + l.size());
    EXPECT_EQ(kept.front(), 0);
    EXPECT_EQ(kept.back(), N - 1);
    EXPECT_NE(std::find(kept.begin(), kept.end(), 50), kept.end());
    // the others: unpooled, the 4 next-largest random scores; pooled, tokens within 3 of the spike
    std::vector<int32_t> chosen(kept.begin() + 1, kept.end() - 1);
    std::vector<int> order(static_cast<size_t>(N));
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin() + 1, order.end() - 1, [&](int a, int b) { return imp[size_t(a)] > imp[size_t(b)]; });
    for (int32_t c : chosen) {
      if (pool) {
        EXPECT_LE(std::abs(c - 50), 3) << c;
      } else {
        const auto rank = std::find(order.begin() + 1, order.end() - 1, c) - order.begin();
        EXPECT_LE(rank, 5) << "token " << c << " is not among the 5 top scores";
      }
    }
  }
}

// The registry's traits say what each policy does: a policy that compresses keeps fewer entries
// than the prompt at budget 0.2; one that uses the estimator asks the prefill for other queries
// under the window and the paper estimators; one that needs a profile refuses to be made without
// keep fractions. An unknown name is one error naming the option.
TEST(PolicyRegistry, TraitsMatchWhatThePoliciesDo) {
  const int N = 100, L = 2;
  ASSERT_EQ(policy_infos().size(), policy_names().size());
  for (const PolicyInfo& info : policy_infos()) {
    SCOPED_TRACE(info.name);
    PolicyOptions o;
    o.budget = 0.2;
    if (info.needs_profile) {
      EXPECT_THROW(make_policy(info.name, o), Error) << "made without a profile's keep fractions";
      o.keep_fractions = {0.3, 0.1};
    }
    auto p = make_policy(info.name, o);
    EXPECT_EQ(p->name(), info.name);
    EXPECT_FALSE(info.help.empty());
    KVCache cache(L, 4);
    std::vector<float> kv(size_t(N) * 4, 0.5f);
    std::vector<int32_t> pos(static_cast<size_t>(N));
    std::iota(pos.begin(), pos.end(), 0);
    std::vector<std::vector<float>> imp;
    for (int l = 0; l < L; ++l) {
      cache.layer(l).append(kv.data(), kv.data(), pos.data(), N);
      std::vector<float> x(static_cast<size_t>(N));
      for (int i = 0; i < N; ++i) x[size_t(i)] = float((i * 37 + l) % 101);
      imp.push_back(x);
    }
    cache.apply(p->after_prefill(cache, imp, N), info.name);
    EXPECT_EQ(cache.layer(0).size() < N, info.compresses);
    PolicyOptions w = o, pa = o;
    w.estimator = Estimator::Window;
    pa.estimator = Estimator::Paper;
    const ImportanceRequest rw = make_policy(info.name, w)->prefill_importance(N);
    const ImportanceRequest rp = make_policy(info.name, pa)->prefill_importance(N);
    EXPECT_EQ(rw.needed != rp.needed || rw.from != rp.from, info.uses_estimator);
  }
  try {
    policy_info("magic", "--policies");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("--policies"), std::string::npos);
    EXPECT_NE(std::string(e.what()).find("prefixkv-online"), std::string::npos);
  }
}
