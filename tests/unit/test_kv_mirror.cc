// The host side of the GPU session's policy handling (src/kv/kv_mirror.h): every policy run on a
// marker-only mirror yields edits that, applied to a full cache (merge as paged_kv_merge does it,
// then retain as paged_kv_compact does it), give exactly what the policy does to the full cache
// itself, after the prefill and over decode steps.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>

#include "core/error.h"
#include "kv/kv_mirror.h"
#include "kv/policy.h"

using namespace pkv;

namespace {

// The device's operations on a host cache: Elastic's merge over nearest_groups (sums in double,
// like the elastic policy; the kernel sums in float32 over 16-bit values), then retain.
void apply_edit(KVLayer& L, const LayerEdit& e) {
  ASSERT_EQ(L.size(), e.before);
  if (e.merge) {
    const int d = L.kv_dim();
    const std::vector<IndexRange> g = nearest_groups(e.keep, e.before);
    std::vector<float> k(size_t(e.keep.size()) * d), v(k.size());
    for (size_t m = 0; m < e.keep.size(); ++m)
      for (int x = 0; x < d; ++x) {
        double sk = 0, sv = 0;
        for (int i = g[m].lo; i <= g[m].hi; ++i) sk += L.keys()[size_t(i) * d + x], sv += L.values()[size_t(i) * d + x];
        const int cnt = g[m].hi - g[m].lo + 1;
        k[m * d + x] = float(sk / cnt), v[m * d + x] = float(sv / cnt);
      }
    for (size_t m = 0; m < e.keep.size(); ++m)
      for (int x = 0; x < d; ++x) {
        L.mutable_keys()[size_t(e.keep[m]) * d + x] = k[m * d + x];
        L.mutable_values()[size_t(e.keep[m]) * d + x] = v[m * d + x];
      }
  }
  L.retain(e.keep);
}

void expect_same(const KVCache& got, const KVCache& want, const std::string& what) {
  ASSERT_EQ(got.n_layers(), want.n_layers());
  for (int l = 0; l < got.n_layers(); ++l) {
    const KVLayer &a = got.layer(l), &b = want.layer(l);
    ASSERT_EQ(a.size(), b.size()) << what << " layer " << l;
    EXPECT_TRUE(std::equal(a.positions(), a.positions() + a.size(), b.positions())) << what << " layer " << l << " positions";
    const size_t n = size_t(a.size()) * a.kv_dim();
    for (size_t i = 0; i < n; ++i) {
      ASSERT_NEAR(a.keys()[i], b.keys()[i], 1e-6) << what << " layer " << l << " K element " << i;
      ASSERT_NEAR(a.values()[i], b.values()[i], 1e-6) << what << " layer " << l << " V element " << i;
    }
  }
}

std::vector<float> random_vec(std::mt19937& rng, size_t n) {
  std::uniform_real_distribution<float> u(0.f, 1.f);
  std::vector<float> x(n);
  for (float& f : x) f = u(rng);
  return x;
}

}  // namespace

TEST(KVMirror, KeptIndices) {
  const std::vector<int32_t> before = {0, 1, 2, 5, 9};
  EXPECT_EQ(kept_indices(before, std::vector<int32_t>{1, 5}), (std::vector<int32_t>{1, 3}));
  EXPECT_EQ(kept_indices(before, std::vector<int32_t>{}), (std::vector<int32_t>{}));
  EXPECT_EQ(kept_indices(before, before), (std::vector<int32_t>{0, 1, 2, 3, 4}));
  EXPECT_THROW(kept_indices(before, std::vector<int32_t>{5, 1}), Error);  // out of order
  EXPECT_THROW(kept_indices(before, std::vector<int32_t>{3}), Error);     // never held
  EXPECT_THROW(kept_indices(before, std::vector<int32_t>{0, 1, 2, 5, 9, 10}), Error);
}

TEST(KVMirror, NearestGroupsFollowTheElasticRule) {
  std::mt19937 rng(3);
  for (int trial = 0; trial < 300; ++trial) {
    const int n = 1 + int(rng() % 60);
    std::vector<int32_t> keep;
    for (int i = 0; i < n; ++i)
      if (rng() % 3 == 0) keep.push_back(i);
    if (keep.empty()) keep.push_back(int32_t(rng() % n));
    const std::vector<IndexRange> g = nearest_groups(keep, n);
    // The elastic policy's loop (src/kv/policies/elastic.cc).
    size_t grp = 0;
    for (int i = 0; i < n; ++i) {
      while (grp + 1 < keep.size() && std::abs(keep[grp + 1] - i) < std::abs(keep[grp] - i)) ++grp;
      ASSERT_GE(i, g[grp].lo) << "n=" << n << " i=" << i;
      ASSERT_LE(i, g[grp].hi) << "n=" << n << " i=" << i;
    }
    for (size_t m = 0; m < keep.size(); ++m) {
      EXPECT_LE(g[m].lo, keep[m]);
      EXPECT_GE(g[m].hi, keep[m]);
    }
  }
}

// Every policy: the mirror's edits reproduce the policy on a full cache, after the prefill and over
// 12 decode steps (with decode-time importance for H2O).
TEST(KVMirror, EditsReproduceEveryPolicy) {
  const int L = 3, N = 57, d = 6;
  for (const std::string& name : policy_names()) {
    for (double budget : {0.2, 0.5}) {
      SCOPED_TRACE(name + " budget " + std::to_string(budget));
      std::mt19937 rng(7);
      PolicyOptions opt;
      opt.budget = budget;
      opt.window = 8;
      opt.keep_fractions = {budget * 1.5, budget, budget * 0.5};
      auto on_full = make_policy(name, opt);
      auto on_mirror = make_policy(name, opt);

      KVCache full(L, d);
      KVMirror mirror(L);
      std::vector<int32_t> pos(static_cast<size_t>(N));
      for (int i = 0; i < N; ++i) pos[size_t(i)] = i;
      std::vector<std::vector<float>> importance;
      for (int l = 0; l < L; ++l) {
        const std::vector<float> k = random_vec(rng, size_t(N) * d), v = random_vec(rng, size_t(N) * d);
        full.layer(l).append(k.data(), v.data(), pos.data(), N);
        importance.push_back(random_vec(rng, size_t(N)));
      }
      mirror.append_all(pos.data(), N);
      KVCache replay = full.clone();

      on_full->after_prefill(full, importance, N);
      mirror.before_policy();
      on_mirror->after_prefill(mirror.cache(), importance, N);
      std::vector<LayerEdit> edits = mirror.after_policy(name);
      for (const LayerEdit& e : edits) apply_edit(replay.layer(e.layer), e);
      expect_same(replay, full, "after prefill");
      if (name == "elastic" && budget < 1) {
        ASSERT_FALSE(edits.empty());
        for (const LayerEdit& e : edits) EXPECT_TRUE(e.merge) << "elastic's prefill merges";
      } else {
        for (const LayerEdit& e : edits) EXPECT_FALSE(e.merge) << name << " does not merge";
      }

      for (int step = 0; step < 12; ++step) {
        const int32_t p = N + step;
        for (int l = 0; l < L; ++l) {
          const std::vector<float> k = random_vec(rng, size_t(d)), v = random_vec(rng, size_t(d));
          full.layer(l).append(k.data(), v.data(), &p, 1);
          replay.layer(l).append(k.data(), v.data(), &p, 1);
        }
        mirror.append_all(&p, 1);
        std::vector<std::vector<float>> step_imp;
        for (int l = 0; l < L; ++l) step_imp.push_back(random_vec(rng, size_t(full.layer(l).size())));
        const bool want = on_full->needs_decode_importance();
        on_full->after_decode_step(full, p + 1, want ? &step_imp : nullptr);
        mirror.before_policy();
        on_mirror->after_decode_step(mirror.cache(), p + 1, want ? &step_imp : nullptr);
        for (const LayerEdit& e : mirror.after_policy(name)) {
          EXPECT_FALSE(e.merge) << "decode-time eviction never merges";
          apply_edit(replay.layer(e.layer), e);
        }
        expect_same(replay, full, "after decode step " + std::to_string(step));
      }
    }
  }
}

namespace {

// Scales the keys of layer 0: not a merge, so not reproducible on the device.
class ScaleKeys : public KVPolicy {
 public:
  std::string name() const override { return "scale-keys"; }
  void after_prefill(KVCache& c, const std::vector<std::vector<float>>&, int) override {
    c.layer(0).mutable_keys()[0] *= 2.f;
    c.layer(0).mutable_keys()[0] += 1.f;
  }
};

// Adds an entry: a policy may only remove.
class AddEntry : public KVPolicy {
 public:
  std::string name() const override { return "add-entry"; }
  void after_prefill(KVCache& c, const std::vector<std::vector<float>>&, int n) override {
    const float z = 0.f;
    const int32_t p = n + 5;
    c.layer(1).append(&z, &z, &p, 1);
  }
};

}  // namespace

TEST(KVMirror, RefusesWhatTheDeviceCannotReproduce) {
  const int32_t pos[] = {0, 1, 2, 3};
  for (int which = 0; which < 2; ++which) {
    KVMirror m(2);
    m.append_all(pos, 4);
    ScaleKeys scale;
    AddEntry add;
    KVPolicy& p = which == 0 ? static_cast<KVPolicy&>(scale) : add;
    m.before_policy();
    p.after_prefill(m.cache(), {}, 4);
    try {
      m.after_policy(p.name());
      FAIL() << p.name() << " was accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(p.name()), std::string::npos) << e.what();
    }
  }
  // Keeping everything untouched is no edit at all.
  KVMirror m(2);
  m.append_all(pos, 4);
  m.before_policy();
  EXPECT_TRUE(m.after_policy("full").empty());
}
