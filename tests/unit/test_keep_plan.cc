// Keep plans (src/kv/keep_plan.h): policies decide, caches act. A plan no cache can apply is one
// clear error and changes nothing; the merge follows the nearest-kept rule (checked against a brute
// force search); the GPU session's host positions (PositionTable) follow every policy's plans
// exactly as the CPU cache does.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <numeric>
#include <random>

#include "core/error.h"
#include "kv/kv_cache.h"
#include "kv/policy.h"

using namespace pkv;

namespace {

std::vector<float> random_vec(std::mt19937& rng, size_t n) {
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  std::vector<float> x(n);
  for (float& f : x) f = u(rng);
  return x;
}

KVCache random_cache(std::mt19937& rng, int layers, int n, int d) {
  KVCache c(layers, d);
  std::vector<int32_t> pos(static_cast<size_t>(n));
  std::iota(pos.begin(), pos.end(), 0);
  for (int l = 0; l < layers; ++l) {
    const std::vector<float> k = random_vec(rng, size_t(n) * d), v = random_vec(rng, size_t(n) * d);
    c.layer(l).append(k.data(), v.data(), pos.data(), n);
  }
  return c;
}

void expect_error(const KVCache& cache, const KeepPlan& plan, const std::string& fragment) {
  KVCache copy = cache.clone();
  try {
    copy.apply(plan, "test-policy");
    ADD_FAILURE() << "plan accepted; expected an error with '" << fragment << "'";
  } catch (const Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("test-policy"), std::string::npos) << m;
    EXPECT_NE(m.find(fragment), std::string::npos) << m;
  }
  for (int l = 0; l < cache.n_layers(); ++l) {
    ASSERT_EQ(copy.layer(l).size(), cache.layer(l).size()) << "a refused plan changed layer " << l;
    EXPECT_TRUE(std::equal(copy.layer(l).keys(), copy.layer(l).keys() + size_t(cache.layer(l).size()) * cache.layer(l).kv_dim(),
                           cache.layer(l).keys()));
  }
}

}  // namespace

TEST(KeepPlan, RefusesWhatNoCacheCanApply) {
  std::mt19937 rng(3);
  const KVCache cache = random_cache(rng, 3, 10, 4);
  expect_error(cache, KeepPlan{{LayerKeep{3, 10, {0, 1}, false}}}, "outside");
  expect_error(cache, KeepPlan{{LayerKeep{-1, 10, {0, 1}, false}}}, "outside");
  expect_error(cache, KeepPlan{{LayerKeep{1, 10, {0}, false}, LayerKeep{1, 10, {1}, false}}}, "must increase");
  expect_error(cache, KeepPlan{{LayerKeep{2, 10, {0}, false}, LayerKeep{0, 10, {1}, false}}}, "must increase");
  expect_error(cache, KeepPlan{{LayerKeep{0, 9, {0, 1}, false}}}, "holds 10");
  expect_error(cache, KeepPlan{{LayerKeep{0, 10, {}, false}}}, "keeps no entry");
  expect_error(cache, KeepPlan{{LayerKeep{0, 10, {0, 10}, false}}}, "index 10");
  expect_error(cache, KeepPlan{{LayerKeep{0, 10, {-1, 3}, false}}}, "index -1");
  expect_error(cache, KeepPlan{{LayerKeep{0, 10, {2, 2}, false}}}, "strictly increasing");
  expect_error(cache, KeepPlan{{LayerKeep{0, 10, {5, 3}, false}}}, "strictly increasing");
  LayerKeep per_head(0, 10, {0, 1});
  per_head.head_keep = {{0, 1}, {2, 3}};
  expect_error(cache, KeepPlan{{per_head}}, "per KV head");
  // A bad layer anywhere in the plan: nothing is applied, not even the good layers before it.
  expect_error(cache, KeepPlan{{LayerKeep{0, 10, {0, 1}, false}, LayerKeep{1, 10, {4, 3}, false}}}, "layer 1");
}

TEST(KeepPlan, MergeAveragesEachEntrysNearestKeptGroup) {
  std::mt19937 rng(11);
  const int d = 5;
  for (int trial = 0; trial < 200; ++trial) {
    const int n = std::uniform_int_distribution<int>(1, 40)(rng);
    KVCache cache = random_cache(rng, 1, n, d);
    const KVLayer before = KVCache(cache.clone()).layer(0);
    std::vector<int32_t> keep;
    for (int i = 0; i < n; ++i)
      if (rng() % 3 == 0) keep.push_back(i);
    if (keep.empty()) keep.push_back(int32_t(rng() % unsigned(n)));
    // Oracle: each entry's nearest kept entry by brute force, ties to the earlier kept entry.
    std::vector<std::vector<double>> ksum(keep.size(), std::vector<double>(d)), vsum = ksum;
    std::vector<int> count(keep.size(), 0);
    for (int i = 0; i < n; ++i) {
      size_t best = 0;
      for (size_t m = 1; m < keep.size(); ++m)
        if (std::abs(keep[m] - i) < std::abs(keep[best] - i)) best = m;
      for (int x = 0; x < d; ++x) ksum[best][size_t(x)] += before.keys()[size_t(i) * d + x],
                                  vsum[best][size_t(x)] += before.values()[size_t(i) * d + x];
      ++count[best];
    }
    cache.apply(KeepPlan{{LayerKeep{0, n, keep, true}}}, "elastic");
    const KVLayer& after = cache.layer(0);
    ASSERT_EQ(after.size(), int(keep.size()));
    for (size_t m = 0; m < keep.size(); ++m) {
      EXPECT_EQ(after.positions()[m], keep[m]);
      for (int x = 0; x < d; ++x) {
        EXPECT_EQ(after.keys()[m * d + size_t(x)], float(ksum[m][size_t(x)] / count[m])) << "trial " << trial;
        EXPECT_EQ(after.values()[m * d + size_t(x)], float(vsum[m][size_t(x)] / count[m])) << "trial " << trial;
      }
    }
  }
}

// Every policy, after the prefill and over decode steps: the plans it returns for the CPU cache and
// for the GPU session's host positions are the same, both follow them alike, only Elastic's prefill
// plan merges, and the plans keep exactly the entries each policy's budget and rule say (the counts
// are checked by test_policies.cc; here that the two views never drift apart).
TEST(KeepPlan, PositionTableFollowsEveryPolicyAsTheCpuCacheDoes) {
  const int L = 3, N = 57, d = 6;
  for (const std::string& name : policy_names()) {
    for (double budget : {0.2, 0.5}) {
      SCOPED_TRACE(name + " budget " + std::to_string(budget));
      std::mt19937 rng(7);
      PolicyOptions opt;
      opt.budget = budget;
      opt.window = 8;
      opt.keep_fractions = {budget * 1.5, budget, budget * 0.5};
      auto on_cache = make_policy(name, opt);
      auto on_table = make_policy(name, opt);
      KVCache cache = random_cache(rng, L, N, d);
      PositionTable table(L);
      std::vector<int32_t> pos(static_cast<size_t>(N));
      std::iota(pos.begin(), pos.end(), 0);
      table.append_all(pos.data(), N);
      std::vector<std::vector<float>> importance;
      for (int l = 0; l < L; ++l) importance.push_back(random_vec(rng, size_t(N)));

      auto same = [&](const KeepPlan& a, const KeepPlan& b, const std::string& when) {
        ASSERT_EQ(a.layers.size(), b.layers.size()) << when;
        for (size_t i = 0; i < a.layers.size(); ++i) {
          EXPECT_EQ(a.layers[i].layer, b.layers[i].layer) << when;
          EXPECT_EQ(a.layers[i].keep, b.layers[i].keep) << when;
          EXPECT_EQ(a.layers[i].merge, b.layers[i].merge) << when;
        }
        for (int l = 0; l < L; ++l) {
          const auto p = cache.positions(l), q = table.positions(l);
          EXPECT_TRUE(std::equal(p.begin(), p.end(), q.begin(), q.end())) << when << " layer " << l;
        }
      };
      const KeepPlan a = on_cache->after_prefill(cache, importance, N);
      const KeepPlan b = on_table->after_prefill(table, importance, N);
      cache.apply(a, name);
      check_plan(b, table, name);
      table.apply(b);
      same(a, b, "after the prefill");
      for (const LayerKeep& k : a.layers) EXPECT_EQ(k.merge, name == "elastic") << "layer " << k.layer;
      if (name != "full") {
        EXPECT_FALSE(a.empty()) << "a compressing policy at budget " << budget << " kept everything";
      }

      for (int step = 0; step < 12; ++step) {
        const int32_t p = N + step;
        for (int l = 0; l < L; ++l) {
          const std::vector<float> k = random_vec(rng, size_t(d)), v = random_vec(rng, size_t(d));
          cache.layer(l).append(k.data(), v.data(), &p, 1);
        }
        table.append_all(&p, 1);
        std::vector<std::vector<float>> step_imp;
        for (int l = 0; l < L; ++l) step_imp.push_back(random_vec(rng, size_t(cache.layer(l).size())));
        const bool want = on_cache->needs_decode_importance();
        const KeepPlan da = on_cache->after_decode_step(cache, p + 1, want ? &step_imp : nullptr);
        const KeepPlan db = on_table->after_decode_step(table, p + 1, want ? &step_imp : nullptr);
        cache.apply(da, name);
        check_plan(db, table, name);
        table.apply(db);
        same(da, db, "after decode step " + std::to_string(step));
        for (const LayerKeep& k : da.layers) EXPECT_FALSE(k.merge) << "decode-time eviction never merges";
      }
    }
  }
}
