// Head-level allocation of the prefix policies (issue 13 item 1; kv/prefix_policy.h): PrefixKV's
// retention search over (layer, KV head) units, online (prefixkv-online:heads), within each layer
// (uniform-prefix:heads) and from a profile's per-head table (prefixkv; prefixkv calibrate --heads).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <set>
#include <tuple>

#include "core/error.h"
#include "engine/backend.h"
#include "engine/engine.h"
#include "eval/calibrate.h"
#include "eval/dataset.h"
#include "eval/evaluate.h"
#include "kv/budgeted.h"
#include "kv/cutoff.h"
#include "kv/kv_cache.h"
#include "kv/policy.h"
#include "kv/prefix_search.h"
#include "kv/profile.h"
#include "model/model.h"
#include "random_kv.h"
#include "test_util.h"

namespace pkv {
namespace {

using test::random_cache;
using test::random_vec;

// Per-KV-head importance [L][H * N]: head h of layer l concentrates its mass by a power of its own,
// so the heads' sorted cumulative shares differ.
std::vector<std::vector<float>> head_importance(std::mt19937& rng, int L, int H, int N) {
  std::vector<std::vector<float>> imp;
  for (int l = 0; l < L; ++l) {
    std::vector<float> x = random_vec(rng, size_t(H) * N, 0, 1);
    for (int h = 0; h < H; ++h)
      for (int j = 0; j < N; ++j) x[size_t(h) * N + j] = std::pow(x[size_t(h) * N + j], float(1 + (l * H + h) % 5));
    imp.push_back(std::move(x));
  }
  return imp;
}

// The units of the search: unit l * H + h is layer l's head h row.
std::vector<std::vector<float>> units_of(const std::vector<std::vector<float>>& imp, int H, int N) {
  std::vector<std::vector<float>> u;
  for (const auto& l : imp)
    for (int h = 0; h < H; ++h) u.emplace_back(l.begin() + ptrdiff_t(h) * N, l.begin() + ptrdiff_t(h + 1) * N);
  return u;
}

// The retention search by its definition (METHOD.md section 2), swept over p: unit u keeps
// n_u(p) = max(min_keep, 1 + #{k : C_u[k] < p}) (C_u[k]: the share of u's mass in its k + 1 largest
// entries; a unit without mass counts (k + 1) / N), never more than N. The largest candidate p (a
// share value) whose total stays <= `total`, and the rest of the total to the units whose next share
// equals that p, in unit order (the layer search's tie rule).
std::vector<int> brute_force_search(const std::vector<std::vector<float>>& units, int64_t total, int min_keep) {
  const int U = int(units.size()), N = int(units[0].size());
  std::vector<std::vector<double>> C(static_cast<size_t>(U));
  std::vector<double> candidates;
  for (int u = 0; u < U; ++u) {
    std::vector<double> s(units[size_t(u)].begin(), units[size_t(u)].end());
    std::sort(s.rbegin(), s.rend());
    double sum = 0, cum = 0;
    for (double x : s) sum += std::max(0.0, x);
    for (int k = 0; k < N; ++k) {
      cum += std::max(0.0, s[size_t(k)]);
      C[size_t(u)].push_back(sum > 0 ? cum / sum : double(k + 1) / N);
      candidates.push_back(C[size_t(u)].back());
    }
  }
  candidates.push_back(0.0);
  std::sort(candidates.begin(), candidates.end());
  auto count = [&](int u, double p) {
    int n = 1;
    for (int k = 0; k < N - 1; ++k) n += C[size_t(u)][size_t(k)] < p;
    return std::min(N, std::max(min_keep, n));
  };
  auto sum_at = [&](double p) {
    int64_t s = 0;
    for (int u = 0; u < U; ++u) s += count(u, p);
    return s;
  };
  double p = candidates[0];
  for (double c : candidates)
    if (sum_at(c) <= total) p = c;
  std::vector<int> n(static_cast<size_t>(U));
  int64_t have = 0;
  for (int u = 0; u < U; ++u) have += n[size_t(u)] = count(u, p);
  for (int u = 0; u < U && have < total; ++u)  // the units whose next share is exactly p, in order
    while (have < total && n[size_t(u)] < N && C[size_t(u)][size_t(n[size_t(u)] - 1)] == p) ++n[size_t(u)], ++have;
  return n;
}

std::string message(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "no error";
}

// The search over units equals its definition swept over p, on small random importance with ties
// (units repeated, zero entries, a unit without mass), for every total and minimum.
TEST(HeadAllocSearch, EqualsTheRetentionSweepOnSmallRandomImportance) {
  std::mt19937 rng(13);
  for (int trial = 0; trial < 30; ++trial) {
    const int L = 1 + trial % 3, H = 1 + trial % 4, N = 5 + trial % 7;
    std::vector<std::vector<float>> units = units_of(head_importance(rng, L, H, N), H, N);
    if (trial % 3 == 1) units.back() = units.front();                    // tied units
    if (trial % 4 == 2) std::fill(units.back().begin(), units.back().end(), 0.f);  // no mass
    if (trial % 5 == 3) units[0][size_t(trial % N)] = 0.f;              // a zero entry
    const int U = int(units.size());
    for (int min_keep : {1, 2, 3})
      for (int64_t total = int64_t(U) * min_keep; total <= int64_t(U) * N; ++total) {
        const std::vector<int> got = prefix_budgets(units, total, min_keep), want = brute_force_search(units, total, min_keep);
        ASSERT_EQ(got, want) << "trial " << trial << " min_keep " << min_keep << " total " << total;
        ASSERT_EQ(std::accumulate(got.begin(), got.end(), int64_t(0)), total);
      }
  }
}

// prefixkv-online:heads on a CPU cache: the plan keeps round(b N L H) entries exactly, each (layer,
// head) the count of the search over the units of each head's own scores (at least the protected
// count and the floor share of the uniform count), its protected entries plus its own highest pooled
// scores in their original order; the cache frees the rest and reports bytes per layer and head;
// decode steps follow each head's own fraction.
TEST(HeadAlloc, OnlineKeepsTheExactBudgetAndEachHeadsOwnBestEntries) {
  std::mt19937 rng(17);
  const int L = 3, H = 4, N = 70, hd = 8;
  for (double floor : {0.0, 0.5})
    for (double budget : {0.1, 0.3}) {
      SCOPED_TRACE("hfloor " + std::to_string(floor) + " budget " + std::to_string(budget));
      PolicyOptions o;
      o.budget = budget;
      o.window = 8;
      o.fifo_offset = 5;
      const std::string spec = "prefixkv-online:heads:hfloor=" + std::to_string(floor);
      const std::unique_ptr<KVPolicy> policy = make_policy(spec, o);
      EXPECT_TRUE(policy->per_head());
      const ImportanceRequest r = policy->prefill_importance(N);
      EXPECT_TRUE(r.needed && r.per_kv_head);
      EXPECT_EQ(r.from, N - o.window);
      KVCache cache = random_cache(rng, L, N, H, hd);
      const KVCache orig = cache.clone();
      const std::vector<std::vector<float>> imp = head_importance(rng, L, H, N);
      const KeepPlan plan = policy->after_prefill(cache, imp, N);
      check_plan(plan, cache, spec);
      const int B = int(std::lround(budget * N)), min_keep = std::max(2, int(std::floor(floor * B)));
      const std::vector<int> want = brute_force_search(units_of(imp, H, N), std::llround(budget * N * L * H), min_keep);
      ASSERT_EQ(int(plan.layers.size()), L);
      int64_t total = 0;
      for (const LayerKeep& k : plan.layers) {
        ASSERT_EQ(int(k.head_keep.size()), H);
        EXPECT_TRUE(k.keep.empty());
        for (int h = 0; h < H; ++h) {
          const std::vector<int32_t>& keep = k.head_keep[size_t(h)];
          const int n = want[size_t(k.layer * H + h)];
          ASSERT_EQ(int(keep.size()), n) << "layer " << k.layer << " head " << h;
          EXPECT_GE(n, min_keep);
          total += n;
          EXPECT_TRUE(std::is_sorted(keep.begin(), keep.end()) && std::adjacent_find(keep.begin(), keep.end()) == keep.end());
          EXPECT_TRUE(std::binary_search(keep.begin(), keep.end(), 0) && std::binary_search(keep.begin(), keep.end(), N - 1))
              << "the protected entries";
          // Its own ranking: the row max-pooled over 7; every kept entry other than the protected
          // ones scores at least as high as every evicted one.
          const std::vector<float> row(imp[size_t(k.layer)].begin() + h * N, imp[size_t(k.layer)].begin() + (h + 1) * N);
          const std::vector<float> s = max_pool_1d(row, o.prefix_pool);
          float lowest = INFINITY, highest = -INFINITY;
          for (int j = 1; j < N - 1; ++j) {
            if (std::binary_search(keep.begin(), keep.end(), j)) lowest = std::min(lowest, s[size_t(j)]);
            else highest = std::max(highest, s[size_t(j)]);
          }
          EXPECT_GE(lowest, highest) << "layer " << k.layer << " head " << h;
        }
      }
      EXPECT_EQ(total, std::llround(budget * N * L * H)) << "the budget, exactly";
      const auto* bp = dynamic_cast<const BudgetedPolicy*>(policy.get());
      ASSERT_NE(bp, nullptr);
      cache.apply(plan, spec);
      const std::vector<std::vector<size_t>> bytes = cache.bytes_per_head();
      size_t sum = 0;
      for (int l = 0; l < L; ++l) {
        const KVLayer& lay = cache.layer(l);
        ASSERT_TRUE(lay.per_head());
        for (int h = 0; h < H; ++h) {
          const std::vector<int32_t>& keep = plan.layers[size_t(l)].head_keep[size_t(h)];
          EXPECT_EQ(bp->prefill_kept_per_head()[size_t(l)][size_t(h)], int(keep.size()));
          EXPECT_EQ(bytes[size_t(l)][size_t(h)], keep.size() * 2 * hd * sizeof(float)) << "bytes of layer " << l << " head " << h;
          sum += bytes[size_t(l)][size_t(h)];
          ASSERT_EQ(lay.size(h), int(keep.size()));
          for (size_t i = 0; i < keep.size(); ++i) {
            EXPECT_EQ(lay.head_positions(h)[i], keep[i]);
            const float* ko = orig.layer(l).keys() + size_t(keep[i]) * H * hd + size_t(h) * hd;
            EXPECT_TRUE(std::equal(ko, ko + hd, lay.head_keys(h) + i * hd)) << "the kept keys, in order";
          }
        }
        EXPECT_LE(lay.capacity_bytes(), size_t(H * N) * 2 * hd * sizeof(float) / 2) << "the evicted memory was released";
      }
      EXPECT_EQ(sum, size_t(total) * 2 * hd * sizeof(float));
      // Decode: each head follows round(n_lh / N * T).
      for (int step = 0; step < 20; ++step) {
        const int32_t p = N + step;
        for (int l = 0; l < L; ++l) {
          const std::vector<float> k = random_vec(rng, size_t(H) * hd, -1, 1), v = random_vec(rng, size_t(H) * hd, -1, 1);
          cache.layer(l).append(k.data(), v.data(), &p, 1);
        }
        cache.apply(policy->after_decode_step(cache, p + 1, nullptr), spec);
        for (int l = 0; l < L; ++l)
          for (int h = 0; h < H; ++h) {
            const int n = bp->prefill_kept_per_head()[size_t(l)][size_t(h)];
            EXPECT_EQ(cache.layer(l).size(h), int(std::lround(double(n) / N * (p + 1)))) << "step " << step;
            EXPECT_EQ(cache.head_positions(l, h).back(), p) << "the newest entry stays";
          }
      }
    }
}

// uniform-prefix:heads: every layer keeps H round(b N) entries, shared by its heads at one retention
// level of their own (the search over that layer's heads). prefixkv with a per-head table: the
// table's counts, all together round(b N L H); alloc=layer on the same options is the layer plan.
TEST(HeadAlloc, UniformWithinLayersAndTheProfilesTable) {
  std::mt19937 rng(23);
  const int L = 3, H = 2, N = 50, hd = 4;
  const std::vector<std::vector<float>> imp = head_importance(rng, L, H, N);
  const std::vector<std::vector<float>> units = units_of(imp, H, N);
  PolicyOptions o;
  o.budget = 0.2;
  o.head_floor = 0;
  const int B = 10;
  {
    KVCache cache = random_cache(rng, L, N, H, hd);
    const KeepPlan plan = make_policy("uniform-prefix:heads", o)->after_prefill(cache, imp, N);
    check_plan(plan, cache, "uniform-prefix:heads");
    ASSERT_EQ(int(plan.layers.size()), L);
    for (const LayerKeep& k : plan.layers) {
      const std::vector<int> want = brute_force_search({units[size_t(k.layer * H)], units[size_t(k.layer * H + 1)]}, H * B, 2);
      for (int h = 0; h < H; ++h) EXPECT_EQ(int(k.head_keep[size_t(h)].size()), want[size_t(h)]) << k.layer << " " << h;
    }
  }
  // A table with one head keeping 3x the other: counts round(k_lh N) (the fractions' mean is b).
  PolicyOptions t = o;
  t.keep_fractions = std::vector<double>(size_t(L), 0.2);
  t.head_keep_fractions = std::vector<std::vector<double>>(size_t(L), {0.3, 0.1});
  const std::unique_ptr<KVPolicy> pk = make_policy("prefixkv", t);
  EXPECT_TRUE(pk->per_head()) << "a profile's per-head table is used when present";
  KVCache cache = random_cache(rng, L, N, H, hd);
  const KeepPlan plan = pk->after_prefill(cache, imp, N);
  check_plan(plan, cache, "prefixkv");
  for (const LayerKeep& k : plan.layers) {
    EXPECT_EQ(k.head_keep[0].size(), 15u);
    EXPECT_EQ(k.head_keep[1].size(), 5u);
  }
  const std::unique_ptr<KVPolicy> layers = make_policy("prefixkv:alloc=layer", t);
  EXPECT_FALSE(layers->per_head());
  EXPECT_FALSE(layers->prefill_importance(N).per_kv_head);
}

// The options in the policy name, and the refusals: one error naming the option and the spec.
TEST(HeadAlloc, OptionsAndTheirErrors) {
  PolicyOptions o;
  apply_policy_spec("prefixkv-online:heads:hfloor=0.3", o);
  EXPECT_EQ(o.alloc, PolicyOptions::Alloc::Head);
  EXPECT_EQ(o.head_floor, 0.3);
  apply_policy_spec("uniform-prefix:alloc=layer", o);
  EXPECT_EQ(o.alloc, PolicyOptions::Alloc::Layer);
  apply_policy_spec("uniform-prefix:alloc=head", o);
  EXPECT_EQ(o.alloc, PolicyOptions::Alloc::Head);
  EXPECT_TRUE(make_policy("uniform-prefix:heads", PolicyOptions{})->per_head());
  EXPECT_FALSE(make_policy("prefixkv-online", PolicyOptions{})->per_head());
  EXPECT_FALSE(make_policy("uniform-prefix:alloc=layer", PolicyOptions{})->per_head());
  EXPECT_EQ(policy_info("prefixkv-online:heads", "--policies").name, "prefixkv-online");
  auto says = [](const std::string& spec, const std::string& what, PolicyOptions opt = PolicyOptions{}) {
    const std::string m = message([&] { make_policy(spec, opt); });
    EXPECT_NE(m.find("--kv-policy " + spec), std::string::npos) << m;
    EXPECT_NE(m.find(what), std::string::npos) << m;
  };
  says("prefixkv-online:alloc=heads", "'alloc' takes layer or head");
  says("prefixkv-online:heads:hfloor=2", "'hfloor' takes a fraction");
  says("prefixkv-online:heads:hfloor=x", "'hfloor' takes a fraction");
  says("snapkv:heads", "the head-level allocation of the prefix policies");
  says("cutoff:heads", "the head-level allocation of the prefix policies");
  says("prefixkv-online:heads:wov2", "value weights, lookahead and query reduces");
  says("uniform-prefix:heads:look=4", "value weights, lookahead and query reduces");
  says("uniform-prefix:heads:reduce=max", "value weights, lookahead and query reduces");
  PolicyOptions answer;
  answer.estimator = Estimator::Answer;
  says("prefixkv-online:heads", "answer estimator", answer);
  PolicyOptions profile;
  profile.keep_fractions = {0.2, 0.2};
  says("prefixkv:heads", "per-head table", profile);
  // A cache whose heads share their entries: the policy's error.
  PolicyOptions b;
  b.budget = 0.5;
  PositionTable shared(1);  // kv_heads 0: the same entries in every head
  std::vector<int32_t> pos(10);
  std::iota(pos.begin(), pos.end(), 0);
  shared.append_all(pos.data(), 10);
  EXPECT_NE(message([&] { make_policy("prefixkv-online:heads", b)->after_prefill(shared, {std::vector<float>(10, 1.f)}, 10); })
                .find("needs a cache whose KV heads hold their own entries"),
            std::string::npos);
}

// The profile's per-head table: written and read back, interpolated to the budget's mean, old
// profiles without it load (no table), and a bad table is refused naming its field.
TEST(HeadAllocProfile, TheTableRoundTripsInterpolatesAndIsChecked) {
  Profile p;
  p.model = {"m", "", 2};
  p.samples = 1;
  p.data = "d";
  p.date = "now";
  ProfileBudget b1;
  b1.budget = 0.2, b1.keep = {0.3, 0.1};
  b1.head_keep = {{0.4, 0.2, 0.2}, {0.1, 0.1, 0.2}};
  ProfileBudget b2;
  b2.budget = 0.4, b2.keep = {0.5, 0.3};
  b2.head_keep = {{0.6, 0.5, 0.4}, {0.2, 0.3, 0.4}};
  p.set_budget(b1);
  p.set_budget(b2);
  p.validate("p");
  const Profile back = Profile::parse(p.to_json(), "round trip");
  ASSERT_TRUE(back.has_head_table());
  EXPECT_EQ(back.budgets[1].head_keep, b2.head_keep);
  // Stored, and halfway: the mean of the two tables (mean 0.3 already). The rescale to the exact
  // mean moves a value by the sum's rounding only: a few units of 2^-53 of 1.2 and 1.8.
  const auto at = back.head_keep_fractions(0.2), mid = back.head_keep_fractions(0.3);
  ASSERT_EQ(at.size(), 2u);
  for (int l = 0; l < 2; ++l)
    for (int h = 0; h < 3; ++h) {
      EXPECT_NEAR(at[size_t(l)][size_t(h)], b1.head_keep[size_t(l)][size_t(h)], 1e-15);
      EXPECT_NEAR(mid[size_t(l)][size_t(h)], 0.5 * (b1.head_keep[size_t(l)][size_t(h)] + b2.head_keep[size_t(l)][size_t(h)]), 1e-15);
    }
  Profile old = p;
  for (auto& b : old.budgets) b.head_keep.clear();
  const Profile old_back = Profile::parse(old.to_json(), "old");
  EXPECT_FALSE(old_back.has_head_table());
  EXPECT_TRUE(old_back.head_keep_fractions(0.2).empty());
  EXPECT_EQ(old.to_json().find("head_keep"), std::string::npos);
  auto refused = [&](const std::function<void(Profile&)>& edit, const std::string& field) {
    Profile q = p;
    edit(q);
    const std::string m = message([&] { Profile::parse(q.to_json(), "bad.json"); });
    EXPECT_NE(m.find(field), std::string::npos) << m;
  };
  refused([](Profile& q) { q.budgets[1].head_keep.clear(); }, "budgets[1].head_keep: every budget or none");
  refused([](Profile& q) { q.budgets[0].head_keep[1].push_back(0.2); }, "budgets[0].head_keep[1]: has 4 KV heads");
  refused([](Profile& q) { q.budgets[0].head_keep[0][0] = 0.7; }, "budgets[0].head_keep: mean over layers and heads");
  refused([](Profile& q) { q.budgets[0].head_keep.pop_back(); }, "budgets[0].head_keep: has 1 layers");
}

// prefixkv calibrate --heads on one scene of the bundled model gives that scene's online head
// counts (prefixkv-online:heads, hfloor=0); the CPU back end's prefill and the evaluation's shared
// prefill + adopt keep the same entries per head.
TEST(HeadAllocProfile, OneSceneCalibratesToTheOnlineHeadCounts) {
  test::BundledModel& bm = test::bundled_model();
  const Model& m = *bm.model;
  Engine engine(m, bm.tok);
  const auto backend = make_cpu_backend(m);
  const std::vector<Sample> samples = load_conversations(std::string(PKV_SOURCE_DIR) + "/data/eval/eval.json");
  CalibrateOptions opt;
  opt.budgets = {0.2, 0.5};
  opt.limit = 1;
  opt.protected_count = 2;
  opt.heads = true;
  const CalibrateResult r = calibrate(*backend, engine, samples, opt);
  ASSERT_TRUE(r.profile.has_head_table());
  std::string why;
  const std::optional<PreparedPrompt> p = prepare_sample(engine, samples[0], "", &why, backend.get());
  ASSERT_TRUE(p) << why;
  const int N = int(p->ids.size()), L = m.config().text.n_layers, H = m.config().text.n_kv_heads;
  for (const ProfileBudget& pb : r.profile.budgets) {
    PolicyOptions o;
    o.budget = pb.budget;
    o.image_offset = p->image_offset, o.image_tokens = p->image_tokens;
    auto online = make_policy("prefixkv-online:heads:hfloor=0", o);
    std::vector<float> logits(static_cast<size_t>(m.config().text.vocab_size));
    auto seq = backend->prefill(*p, *online, logits.data());
    const auto& kept = dynamic_cast<const BudgetedPolicy&>(*online).prefill_kept_per_head();
    ASSERT_EQ(int(pb.head_keep.size()), L);
    // k_lh = n_lh / N, then rescaled to the exact mean b: all together the counts move by at most
    // |b N L H - round(b N L H)| entries.
    const double R = double(std::llround(pb.budget * N * L * H));
    double moved = 0;
    for (int l = 0; l < L; ++l)
      for (int h = 0; h < H; ++h) moved += std::fabs(pb.head_keep[size_t(l)][size_t(h)] * N - kept[size_t(l)][size_t(h)]);
    EXPECT_LE(moved, std::fabs(pb.budget * N * L * H - R) + 1e-6) << "budget " << pb.budget;
    EXPECT_EQ(seq->entries_per_head(), kept);
    // The evaluation's path: one shared prefill, the per-head importance added, adopted.
    auto again = make_policy("prefixkv-online:heads:hfloor=0", o);
    const auto shared = backend->prefill_shared(*p, {});
    backend->add_head_importance(*shared, *p, again->prefill_importance(N).from, "prefixkv-online:heads");
    auto adopted = backend->adopt(*shared, *again);
    for (int l = 0; l < L; ++l)
      for (int h = 0; h < H; ++h) {
        const auto a = seq->entries().head_positions(l, h), b = adopted->entries().head_positions(l, h);
        ASSERT_TRUE(std::equal(a.begin(), a.end(), b.begin(), b.end())) << "layer " << l << " head " << h;
      }
    // prefixkv on the calibrated profile allocates per head from its table.
    PolicyOptions po = o;
    po.keep_fractions = r.profile.keep_fractions(pb.budget);
    po.head_keep_fractions = r.profile.head_keep_fractions(pb.budget);
    auto offline = make_policy("prefixkv", po);
    backend->prefill(*p, *offline, logits.data());
    const auto& off = dynamic_cast<const BudgetedPolicy&>(*offline).prefill_kept_per_head();
    int64_t total = 0;
    for (const auto& l : off) total += std::accumulate(l.begin(), l.end(), int64_t(0));
    EXPECT_EQ(total, std::llround(pb.budget * N * L * H));
  }
  CalibrateOptions bad = opt;
  bad.layer_rule = "cutoff";
  EXPECT_NE(message([&] { calibrate(*backend, engine, samples, bad); }).find("--heads"), std::string::npos);
}

}  // namespace
}  // namespace pkv
