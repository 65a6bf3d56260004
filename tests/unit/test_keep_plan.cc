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
#include "model/model.h"

using namespace pkv;

namespace {

std::vector<float> random_vec(std::mt19937& rng, size_t n) {
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  std::vector<float> x(n);
  for (float& f : x) f = u(rng);
  return x;
}

KVCache random_cache(std::mt19937& rng, int layers, int n, int d, int kv_heads = 1) {
  KVCache c(layers, d, kv_heads);
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
    const KVLayer &a = copy.layer(l), &b = cache.layer(l);
    ASSERT_EQ(a.per_head(), b.per_head()) << "a refused plan changed layer " << l;
    if (b.per_head()) {
      for (int h = 0; h < b.n_kv_heads(); ++h) {
        ASSERT_EQ(a.size(h), b.size(h)) << "a refused plan changed layer " << l << " head " << h;
        EXPECT_TRUE(std::equal(a.head_keys(h), a.head_keys(h) + size_t(b.size(h)) * b.head_dim(), b.head_keys(h)));
      }
      continue;
    }
    ASSERT_EQ(a.size(), b.size()) << "a refused plan changed layer " << l;
    EXPECT_TRUE(std::equal(a.keys(), a.keys() + size_t(b.size()) * b.kv_dim(), b.keys()));
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
  LayerKeep per_head(0, 10, {});
  per_head.head_keep = {{0, 1}, {2, 3}};
  expect_error(cache, KeepPlan{{per_head}}, "2 head keep lists for 1 KV heads");
  // A cache without per-head entries (the GPU session's host positions) refuses head lists.
  PositionTable table(3);
  std::vector<int32_t> pos(10);
  std::iota(pos.begin(), pos.end(), 0);
  table.append_all(pos.data(), 10);
  per_head.head_keep = {{0, 1}};
  EXPECT_THROW(check_plan(KeepPlan{{per_head}}, table, "test-policy"), Error);
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
  const int L = 3, N = 57, d = 6, H = 2;  // two KV heads: per-head plans (adakv) too
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
      KVCache cache = random_cache(rng, L, N, d, H);
      PositionTable table(L, H);
      std::vector<int32_t> pos(static_cast<size_t>(N));
      std::iota(pos.begin(), pos.end(), 0);
      table.append_all(pos.data(), N);
      std::vector<std::vector<float>> importance;
      const size_t rows = on_cache->prefill_importance(N).per_kv_head ? size_t(H) : 1;
      for (int l = 0; l < L; ++l) importance.push_back(random_vec(rng, rows * size_t(N)));

      auto same = [&](const KeepPlan& a, const KeepPlan& b, const std::string& when) {
        ASSERT_EQ(a.layers.size(), b.layers.size()) << when;
        for (size_t i = 0; i < a.layers.size(); ++i) {
          EXPECT_EQ(a.layers[i].layer, b.layers[i].layer) << when;
          EXPECT_EQ(a.layers[i].keep, b.layers[i].keep) << when;
          EXPECT_EQ(a.layers[i].head_keep, b.layers[i].head_keep) << when;
          EXPECT_EQ(a.layers[i].merge, b.layers[i].merge) << when;
        }
        for (int l = 0; l < L; ++l) {
          ASSERT_EQ(cache.per_head(l), table.per_head(l)) << when << " layer " << l;
          for (int h = 0; h < H; ++h) {
            const auto p = cache.head_positions(l, h), q = table.head_positions(l, h);
            EXPECT_TRUE(std::equal(p.begin(), p.end(), q.begin(), q.end())) << when << " layer " << l << " head " << h;
          }
          if (cache.per_head(l)) {
            EXPECT_THROW(table.positions(l), Error) << "no single list of positions in a per-head layer";
            continue;
          }
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
        for (int l = 0; l < L; ++l) step_imp.push_back(random_vec(rng, size_t(cache.held(l))));
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

// Per-head plans (LayerKeep::head_keep): each KV head keeps its own entries, in order, with their own
// keys, values and positions; the memory of the others is released; new entries go to every head;
// a per-head layer takes only per-head plans; bad head lists are refused and change nothing.
TEST(KeepPlan, PerHeadPlansKeepEachHeadsOwnEntries) {
  std::mt19937 rng(21);
  const int L = 3, N = 300, H = 4, hd = 3, d = H * hd;
  KVCache cache = random_cache(rng, L, N, d, H);
  const KVCache before = cache.clone();
  const size_t cap_before = cache.layer(1).capacity_bytes();
  // Layer 1 per head (budgets 5%, 10%, 20%, 40% of the entries), layer 2 shared.
  std::vector<std::vector<int32_t>> lists(H);
  for (int h = 0; h < H; ++h) {
    std::vector<int32_t> all(N);
    std::iota(all.begin(), all.end(), 0);
    std::shuffle(all.begin(), all.end(), rng);
    lists[size_t(h)].assign(all.begin(), all.begin() + (N * (5 << h)) / 100);
    std::sort(lists[size_t(h)].begin(), lists[size_t(h)].end());
  }
  LayerKeep lk(1, N, {});
  lk.head_keep = lists;
  cache.apply(KeepPlan{{lk, LayerKeep{2, N, {0, 7, 299}}}}, "test-policy");

  const KVLayer& l1 = cache.layer(1);
  ASSERT_TRUE(l1.per_head());
  EXPECT_FALSE(cache.layer(0).per_head());
  EXPECT_FALSE(cache.layer(2).per_head());
  size_t entries = 0;
  for (int h = 0; h < H; ++h) {
    const auto& keep = lists[size_t(h)];
    ASSERT_EQ(l1.size(h), int(keep.size())) << "head " << h;
    entries += keep.size();
    for (size_t i = 0; i < keep.size(); ++i) {
      EXPECT_EQ(l1.head_positions(h)[i], keep[i]);
      for (int x = 0; x < hd; ++x) {
        EXPECT_EQ(l1.head_keys(h)[i * hd + size_t(x)], before.layer(1).keys()[size_t(keep[i]) * d + size_t(h * hd + x)]);
        EXPECT_EQ(l1.head_values(h)[i * hd + size_t(x)], before.layer(1).values()[size_t(keep[i]) * d + size_t(h * hd + x)]);
      }
    }
    EXPECT_EQ(cache.bytes_per_head()[1][size_t(h)], keep.size() * 2 * hd * sizeof(float));
  }
  EXPECT_EQ(l1.bytes(), entries * 2 * hd * sizeof(float));
  EXPECT_EQ(cache.bytes_per_layer()[1], l1.bytes());
  EXPECT_EQ(cache.held(1), int(entries));
  // The storage follows: the heads together hold ~19% of the entries, and no more than that is kept.
  EXPECT_LT(l1.capacity_bytes(), cap_before / 2) << "the evicted entries' memory was not released";
  EXPECT_THROW(cache.positions(1), Error);  // no single list of positions in a per-head layer

  // Decoding appends to every head.
  const std::vector<float> k = random_vec(rng, 2 * d), v = random_vec(rng, 2 * d);
  const int32_t next[2] = {300, 301};
  cache.layer(1).append(k.data(), v.data(), next, 2);
  for (int h = 0; h < H; ++h) {
    ASSERT_EQ(l1.size(h), int(lists[size_t(h)].size()) + 2);
    EXPECT_EQ(l1.head_positions(h)[l1.size(h) - 1], 301);
    EXPECT_EQ(l1.head_keys(h)[size_t(l1.size(h) - 1) * hd], k[size_t(d + h * hd)]);
  }

  // A per-head layer takes only per-head plans, made for what it holds (summed over heads).
  expect_error(cache, KeepPlan{{LayerKeep{1, cache.held(1), {0}}}}, "heads hold their own entries");
  LayerKeep again(1, cache.held(1) - 1, {});
  again.head_keep = {{0}, {0}, {0}, {0}};
  expect_error(cache, KeepPlan{{again}}, "holds " + std::to_string(cache.held(1)));
  again.before = cache.held(1);
  again.head_keep = {{0}, {0}, {}, {0}};
  expect_error(cache, KeepPlan{{again}}, "KV head 2 keeps no entry");
  again.head_keep = {{0}, {0}, {0, 0}, {0}};
  expect_error(cache, KeepPlan{{again}}, "KV head 2 is not strictly increasing");
  again.head_keep = {{0}, {0}, {0}, {int32_t(l1.size(3))}};
  expect_error(cache, KeepPlan{{again}}, "KV head 3 keeps index");
  again.head_keep = {{0}, {0}, {0}};
  expect_error(cache, KeepPlan{{again}}, "3 head keep lists for 4 KV heads");
  again.head_keep = {{0}, {0}, {0}, {0}};
  again.keep = {0};
  expect_error(cache, KeepPlan{{again}}, "both a layer keep list and head keep lists");
  again.keep.clear();
  cache.apply(KeepPlan{{again}}, "test-policy");
  for (int h = 0; h < H; ++h) EXPECT_EQ(l1.head_positions(h)[0], lists[size_t(h)][0]);
}

// Merging per head: each head's kept entries absorb that head's nearest others (the rule of the
// shared merge, per head), checked against the shared merge of the same list on a one-head copy.
TEST(KeepPlan, PerHeadMergeIsTheSharedMergeOfEachHead) {
  std::mt19937 rng(5);
  const int N = 40, H = 3, hd = 2, d = H * hd;
  KVCache cache = random_cache(rng, 1, N, d, H);
  LayerKeep lk(0, N, {}, true);
  lk.head_keep = {{3, 9, 30}, {0, 39}, {1, 2, 3, 20, 21}};
  std::vector<KVCache> single;
  for (int h = 0; h < H; ++h) {  // head h alone as a one-head cache, merged with the shared rule
    KVCache one(1, hd, 1);
    std::vector<float> k(size_t(N) * hd), v(size_t(N) * hd);
    for (int i = 0; i < N; ++i)
      for (int x = 0; x < hd; ++x)
        k[size_t(i * hd + x)] = cache.layer(0).keys()[size_t(i * d + h * hd + x)],
        v[size_t(i * hd + x)] = cache.layer(0).values()[size_t(i * d + h * hd + x)];
    std::vector<int32_t> pos(N);
    std::iota(pos.begin(), pos.end(), 0);
    one.layer(0).append(k.data(), v.data(), pos.data(), N);
    one.apply(KeepPlan{{LayerKeep{0, N, lk.head_keep[size_t(h)], true}}}, "elastic");
    single.push_back(std::move(one));
  }
  cache.apply(KeepPlan{{lk}}, "elastic");
  for (int h = 0; h < H; ++h) {
    const KVLayer& ref = single[size_t(h)].layer(0);
    ASSERT_EQ(cache.layer(0).size(h), ref.size());
    for (size_t i = 0; i < size_t(ref.size()) * hd; ++i) {
      EXPECT_EQ(cache.layer(0).head_keys(h)[i], ref.keys()[i]);
      EXPECT_EQ(cache.layer(0).head_values(h)[i], ref.values()[i]);
    }
  }
}

// Attention over a per-head layer: query head q of KV head g = q / group attends over exactly the
// entries g holds (plus the new token), against a brute-force softmax in double; and a per-head plan
// that keeps the same entries in every head gives bit for bit the shared layer's attention (the same
// dot products in the same order, only the rows' addresses differ).
TEST(KeepPlan, AttentionReadsEachHeadsOwnEntries) {
  std::mt19937 rng(9);
  TextConfig t;
  t.n_heads = 8, t.n_kv_heads = 4, t.head_dim = 16;
  const int N = 50, H = t.n_kv_heads, hd = t.head_dim, d = H * hd, qd = t.n_heads * hd, group = t.n_heads / H;
  for (int n_q : {1, 20}) {  // one decode step; a chunk of queries (the blocked path)
    SCOPED_TRACE("n_q " + std::to_string(n_q));
    KVCache per = random_cache(rng, 1, N, d, H), shared = per.clone(), same = per.clone();
    const KVCache orig = per.clone();
    LayerKeep lk(0, N, {});
    std::vector<int32_t> common;
    for (int i = 0; i < N; i += 3) common.push_back(i);
    for (int h = 0; h < H; ++h) {
      std::vector<int32_t> keep;
      for (int i = 0; i < N; ++i)
        if (rng() % unsigned(h + 2) == 0) keep.push_back(i);
      if (keep.empty()) keep.push_back(0);
      lk.head_keep.push_back(keep);
    }
    per.apply(KeepPlan{{lk}}, "test");
    LayerKeep all_same(0, N, {});
    all_same.head_keep.assign(size_t(H), common);
    same.apply(KeepPlan{{all_same}}, "test");
    shared.apply(KeepPlan{{LayerKeep{0, N, common}}}, "test");

    const std::vector<float> q = random_vec(rng, size_t(n_q) * qd), k = random_vec(rng, size_t(n_q) * d),
                             v = random_vec(rng, size_t(n_q) * d);
    std::vector<int32_t> pos(static_cast<size_t>(n_q));
    std::iota(pos.begin(), pos.end(), N);
    std::vector<float> out(size_t(n_q) * qd), out_same(out.size()), out_shared(out.size());
    attend_layer(t, per.layer(0), q.data(), k.data(), v.data(), n_q, pos.data(), out.data(), nullptr, 0);
    attend_layer(t, same.layer(0), q.data(), k.data(), v.data(), n_q, pos.data(), out_same.data(), nullptr, 0);
    attend_layer(t, shared.layer(0), q.data(), k.data(), v.data(), n_q, pos.data(), out_shared.data(), nullptr, 0);
    EXPECT_EQ(out_same, out_shared);

    const double scale = 1.0 / std::sqrt(double(hd));
    double worst = 0;
    for (int i = 0; i < n_q; ++i)
      for (int qh = 0; qh < t.n_heads; ++qh) {
        const int g = qh / group;
        // Entries seen: head g's kept ones, then the new tokens up to query i.
        std::vector<const float*> ks, vs;
        for (int32_t e : lk.head_keep[size_t(g)])
          ks.push_back(&orig.layer(0).keys()[size_t(e) * d + size_t(g * hd)]),
              vs.push_back(&orig.layer(0).values()[size_t(e) * d + size_t(g * hd)]);
        for (int j = 0; j <= i; ++j) ks.push_back(&k[size_t(j) * d + size_t(g * hd)]), vs.push_back(&v[size_t(j) * d + size_t(g * hd)]);
        std::vector<double> s(ks.size());
        double mx = -1e300, sum = 0;
        for (size_t j = 0; j < ks.size(); ++j) {
          double dot = 0;
          for (int x = 0; x < hd; ++x) dot += double(q[size_t(i) * qd + size_t(qh * hd + x)]) * ks[j][x];
          s[j] = dot * scale;
          mx = std::max(mx, s[j]);
        }
        for (double& x : s) sum += x = std::exp(x - mx);
        for (int x = 0; x < hd; ++x) {
          double o = 0;
          for (size_t j = 0; j < ks.size(); ++j) o += s[j] / sum * vs[j][x];
          worst = std::max(worst, std::fabs(o - out[size_t(i) * qd + size_t(qh * hd + x)]));
        }
      }
    // float32 dot products of 16 terms and sums of at most 70: |error| well under 1e-5 for values
    // in [-1, 1].
    EXPECT_LT(worst, 1e-5);
  }
}
