// A 16-bit KV cache for the CPU engine (--kv-dtype f16|bf16, kv/kv_cache.h): keys and values are
// rounded once when written, attention over them is bit for bit attention over a float32 cache that
// holds the same rounded values, compaction keeps the right entries and a merge rounds its mean
// once, the bytes halve, the bundled model's logits move by what the rounding explains, and a bad
// value of the option is one clear error.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "engine/backend.h"
#include "kv/kv_cache.h"
#include "kv/policy.h"
#include "model/model.h"
#include "ops/ops.h"
#include "test_util.h"
#include "vision/image.h"

using namespace pkv;
using json = nlohmann::json;

namespace {

std::vector<float> random_vec(std::mt19937& rng, size_t n, float scale = 1.f) {
  std::uniform_real_distribution<float> u(-scale, scale);
  std::vector<float> x(n);
  for (float& f : x) f = u(rng);
  return x;
}

// The values of type t nearest to x, as float32 (what the cache stores).
std::vector<float> rounded(DType t, const std::vector<float>& x) {
  std::vector<uint16_t> h(x.size());
  from_f32(t, x.data(), h.data(), x.size());
  std::vector<float> r(x.size());
  to_f32(t, h.data(), r.data(), r.size());
  return r;
}

bool same_bits(const float* a, const float* b, size_t n) { return std::memcmp(a, b, n * sizeof(float)) == 0; }

const DType kTypes[] = {DType::F16, DType::BF16};

}  // namespace

// The vectorised conversions (F16C / AVX2 / AVX-512 where the build has them) give what the scalar
// ones give, element by element: ties, subnormals, overflow, infinities and ordinary values; a NaN
// stays a NaN. Lengths that leave a tail for the scalar loop.
TEST(KvDtype, VectorConversionsMatchTheScalarOnes) {
  std::mt19937 rng(11);
  std::vector<float> x = random_vec(rng, 1000, 4.f);
  const float special[] = {0.f, -0.f, 1.f, -1.f, 65504.f, 65519.f, 65520.f, 1e6f, -1e6f, 6.1e-5f, 5.96e-8f, 2.98e-8f,
                           2.97e-8f, 1e-30f, 1.00048828125f /* f16 tie */, 1.001953125f, 1.0039062f /* bf16 tie */,
                           INFINITY, -INFINITY, 3.0e38f, 1.17549435e-38f};
  x.insert(x.end(), std::begin(special), std::end(special));
  for (int i = 0; i < 200; ++i) {  // random bit patterns over every exponent
    uint32_t u = uint32_t(rng());
    float f;
    std::memcpy(&f, &u, 4);
    if (!std::isnan(f)) x.push_back(f);
  }
  x.push_back(NAN);
  for (DType t : kTypes) {
    for (size_t n : {x.size(), size_t(7), size_t(23)}) {
      std::vector<uint16_t> h(n);
      from_f32(t, x.data(), h.data(), n);
      std::vector<float> back(n);
      to_f32(t, h.data(), back.data(), n);
      for (size_t i = 0; i < n; ++i) {
        if (std::isnan(x[i])) {
          EXPECT_TRUE(std::isnan(back[i])) << dtype_name(t);
          continue;
        }
        const uint16_t want = t == DType::F16 ? f32_to_f16(x[i]) : f32_to_bf16(x[i]);
        ASSERT_EQ(h[i], want) << dtype_name(t) << " of " << x[i];
        ASSERT_EQ(back[i], t == DType::F16 ? f16_to_f32(want) : bf16_to_f32(want)) << dtype_name(t);
      }
    }
  }
}

// Attention over a 16-bit cache equals, bit for bit, attention over a float32 cache holding the same
// rounded values: the outputs and the importance, for the few-query path (decode) and the blocked
// one (prefill, n_q >= 16), causal by position, grouped (8 / 2) and one-to-one (4 / 4) query heads,
// per-KV-head importance.
TEST(KvDtype, AttentionEqualsFloat32CacheOfTheRoundedValues) {
  std::mt19937 rng(5);
  const int hd = 40, N = 70;  // head_dim 40: vector loops and a tail
  for (const auto& [H, Hkv] : {std::pair{8, 2}, std::pair{4, 4}})
  for (DType t : kTypes)
    for (int n_q : {1, 3, 40})
      for (bool per_head_imp : {false, true}) {
        const int kvd = Hkv * hd;
        const std::vector<float> q = random_vec(rng, size_t(n_q) * H * hd, 2.f);
        const std::vector<float> k = random_vec(rng, size_t(N) * kvd, 2.f), v = random_vec(rng, size_t(N) * kvd);
        std::vector<uint16_t> k16(k.size()), v16(v.size());
        from_f32(t, k.data(), k16.data(), k.size());
        from_f32(t, v.data(), v16.data(), v.size());
        const std::vector<float> kr = rounded(t, k), vr = rounded(t, v);
        ASSERT_NE(kr, k) << "the rounding did nothing: the test would prove nothing";
        std::vector<int32_t> kv_pos(static_cast<size_t>(N)), q_pos(static_cast<size_t>(n_q));
        std::iota(kv_pos.begin(), kv_pos.end(), 0);
        for (int i = 0; i < n_q; ++i) q_pos[size_t(i)] = N - n_q + i;
        const size_t imp_len = size_t(N) * (per_head_imp ? Hkv : 1);
        std::vector<float> out_ref(q.size()), out16(q.size()), imp_ref(imp_len, 0.f), imp16(imp_len, 0.f);
        ops::AttentionArgs a;
        a.q = q.data();
        a.n_q = n_q;
        a.q_pos = q_pos.data();
        a.k = kr.data();
        a.v = vr.data();
        a.n_kv = N;
        a.kv_stride = kvd;
        a.kv_pos = kv_pos.data();
        a.n_heads = H;
        a.n_kv_heads = Hkv;
        a.head_dim = hd;
        a.scale = 1.f / std::sqrt(float(hd));
        a.out = out_ref.data();
        a.importance = imp_ref.data();
        a.importance_from = n_q / 2;
        a.importance_per_kv_head = per_head_imp;
        ops::attention(a);
        ops::AttentionArgs b = a;
        b.k = b.v = nullptr;
        b.kv_dtype = t;
        b.k16 = k16.data();
        b.v16 = v16.data();
        b.out = out16.data();
        b.importance = imp16.data();
        ops::attention(b);
        EXPECT_TRUE(same_bits(out16.data(), out_ref.data(), out_ref.size()))
            << dtype_name(t) << " heads " << H << "/" << Hkv << " n_q " << n_q << ": max diff " << test::max_abs_diff(out16.data(), out_ref.data(), out_ref.size());
        EXPECT_TRUE(same_bits(imp16.data(), imp_ref.data(), imp_len)) << dtype_name(t) << " n_q " << n_q;
      }
}

// Through the cache: a 16-bit layer rounds what it is given, and attend_layer (the decoder's step)
// over it equals attend_layer over a float32 layer given the rounded values, before and after a
// per-head plan splits the layer.
TEST(KvDtype, LayerRoundsOnAppendAndAttendsAsFloat32) {
  std::mt19937 rng(8);
  TextConfig tc;
  tc.n_heads = 4;
  tc.n_kv_heads = 2;
  tc.head_dim = 16;
  const int kvd = tc.n_kv_heads * tc.head_dim, qd = tc.n_heads * tc.head_dim, N = 30;
  for (DType t : kTypes) {
    KVLayer wide(kvd, tc.n_kv_heads), narrow(kvd, tc.n_kv_heads, t);
    EXPECT_EQ(narrow.dtype(), t);
    auto step = [&](int n_q, int first_pos) {
      const std::vector<float> q = random_vec(rng, size_t(n_q) * qd), k = random_vec(rng, size_t(n_q) * kvd),
                               v = random_vec(rng, size_t(n_q) * kvd);
      std::vector<int32_t> pos(static_cast<size_t>(n_q));
      std::iota(pos.begin(), pos.end(), first_pos);
      std::vector<float> o_wide(q.size()), o_narrow(q.size());
      attend_layer(tc, wide, q.data(), rounded(t, k).data(), rounded(t, v).data(), n_q, pos.data(), o_wide.data(),
                   nullptr, 0);
      attend_layer(tc, narrow, q.data(), k.data(), v.data(), n_q, pos.data(), o_narrow.data(), nullptr, 0);
      EXPECT_TRUE(same_bits(o_narrow.data(), o_wide.data(), o_wide.size())) << dtype_name(t);
    };
    step(N, 0);  // a prompt (blocked path)
    step(1, N);  // a decode step
    // Stored values: the float32 layer's, converted.
    std::vector<float> buf;
    const float* kn = narrow.keys_f32(buf);
    EXPECT_TRUE(same_bits(kn, wide.keys(), size_t(narrow.size()) * kvd));
    // Per-head: head 0 keeps the even entries, head 1 the last ten.
    LayerKeep plan;
    plan.layer = 0;
    plan.before = narrow.size();
    plan.head_keep.resize(2);
    for (int i = 0; i < narrow.size(); i += 2) plan.head_keep[0].push_back(i);
    for (int i = narrow.size() - 10; i < narrow.size(); ++i) plan.head_keep[1].push_back(i);
    wide.apply(plan);
    narrow.apply(plan);
    ASSERT_TRUE(narrow.per_head());
    for (int h = 0; h < 2; ++h) {
      std::vector<float> hb;
      EXPECT_TRUE(same_bits(narrow.head_keys_f32(h, hb), wide.head_keys(h), size_t(narrow.size(h)) * tc.head_dim));
      EXPECT_TRUE(same_bits(narrow.head_values_f32(h, hb), wide.head_values(h), size_t(narrow.size(h)) * tc.head_dim));
    }
    step(1, N + 1);  // decode over per-head layers
  }
}

// A 16-bit cache takes half the bytes of a float32 one: the layers, the heads, the capacity, shared
// and per head, before and after a compaction.
TEST(KvDtype, BytesHalve) {
  std::mt19937 rng(2);
  const int layers = 3, Hkv = 2, hd = 8, kvd = Hkv * hd, N = 64;
  KVCache wide(layers, kvd, Hkv), narrow(layers, kvd, Hkv, DType::F16), brain(layers, kvd, Hkv, DType::BF16);
  std::vector<int32_t> pos(static_cast<size_t>(N));
  std::iota(pos.begin(), pos.end(), 0);
  for (int l = 0; l < layers; ++l) {
    const std::vector<float> k = random_vec(rng, size_t(N) * kvd), v = random_vec(rng, size_t(N) * kvd);
    for (KVCache* c : {&wide, &narrow, &brain}) {
      c->layer(l).reserve(N);
      c->layer(l).append(k.data(), v.data(), pos.data(), N);
    }
  }
  auto check = [&](const char* when) {
    for (const KVCache* c : {&narrow, &brain}) {
      EXPECT_EQ(c->bytes() * 2, wide.bytes()) << when;
      for (int l = 0; l < layers; ++l) {
        EXPECT_EQ(c->bytes_per_layer()[size_t(l)] * 2, wide.bytes_per_layer()[size_t(l)]) << when;
        EXPECT_EQ(c->layer(l).capacity_bytes() * 2, wide.layer(l).capacity_bytes()) << when;
        for (int h = 0; h < Hkv; ++h)
          EXPECT_EQ(c->bytes_per_head()[size_t(l)][size_t(h)],
                    size_t(c->layer(l).size(h)) * 2 * hd * 2) << when;
      }
    }
  };
  EXPECT_EQ(wide.bytes(), size_t(layers) * N * kvd * 2 * 4);
  check("full");
  KeepPlan plan;
  std::vector<int32_t> keep;
  for (int i = 0; i < N; i += 4) keep.push_back(i);
  plan.layers.push_back(LayerKeep{0, N, keep});  // shared, shrinks the storage
  LayerKeep ph;
  ph.layer = 1;
  ph.before = N;
  ph.head_keep = {keep, {0, 1, 2}};  // per head
  plan.layers.push_back(ph);
  for (KVCache* c : {&wide, &narrow, &brain}) c->apply(plan, "test");
  check("compacted");
  EXPECT_LT(narrow.layer(0).capacity_bytes(), size_t(N) * kvd * 2 * 2 / 2) << "the evicted memory was not released";
}

// Retain keeps the stored words of the kept entries; a merge's mean, summed in double from the
// stored values, is rounded once to the storage type. The case below is built so that rounding
// twice (the double mean to float32, then to 16 bits) lands on a tie and gives the other value:
// the test fails for a merge that rounds through float32.
TEST(KvDtype, RetainKeepsTheEntriesAndMergeRoundsOnce) {
  for (DType t : kTypes) {
    // Three entries, one kept (the middle one): its group is all three. Mean 1 + tie + e, with
    // tie = half the type's spacing at 1 and 0 < e below float32's half spacing at 1 (2^-24).
    const double tie = t == DType::F16 ? std::ldexp(1.0, -11) : std::ldexp(1.0, -8);
    const double third = t == DType::F16 ? std::ldexp(1.0, -24) : std::ldexp(3.0, -30);  // 3e, a value of type t
    const float col[3] = {3.f, float(3 * tie), float(third)};
    const double mean = (double(col[0]) + col[1] + col[2]) / 3;
    ASSERT_EQ(rounded(t, {col[0], col[1], col[2]}), std::vector<float>(col, col + 3)) << "inputs exact in the type";
    const float once = round_to(t, mean), twice = rounded(t, {float(mean)})[0];
    ASSERT_EQ(double(once), 1.0 + 2 * tie) << "the single rounding goes up (mean above the tie)";
    ASSERT_EQ(twice, 1.f) << "the case must separate the two roundings";
    KVCache c(1, 1, 1, t);
    const int32_t pos[3] = {0, 1, 2};
    const float vals[3] = {col[0], col[1], col[2]};
    c.layer(0).append(vals, vals, pos, 3);
    KeepPlan plan;
    LayerKeep lk{0, 3, {1}};
    lk.merge = true;
    plan.layers.push_back(lk);
    c.apply(plan, "test");
    std::vector<float> buf;
    ASSERT_EQ(c.layer(0).size(), 1);
    EXPECT_EQ(c.layer(0).keys_f32(buf)[0], once) << dtype_name(t);
    EXPECT_EQ(c.layer(0).values_f32(buf)[0], once) << dtype_name(t);
  }
  // Random layers: retain and merge (shared and per head) against a reference from the stored
  // values: sums in double, round_to once.
  std::mt19937 rng(21);
  const int Hkv = 2, hd = 6, kvd = Hkv * hd, N = 40;
  for (DType t : kTypes)
    for (bool merge : {false, true})
      for (bool per_head : {false, true}) {
        KVCache c(1, kvd, Hkv, t);
        const std::vector<float> k = random_vec(rng, size_t(N) * kvd), v = random_vec(rng, size_t(N) * kvd);
        std::vector<int32_t> pos(static_cast<size_t>(N));
        std::iota(pos.begin(), pos.end(), 0);
        c.layer(0).append(k.data(), v.data(), pos.data(), N);
        const std::vector<float> kr = rounded(t, k), vr = rounded(t, v);
        std::vector<std::vector<int32_t>> keeps = {{0, 5, 6, 17, 30, 39}, {2, 3, 20, 21, 22}};
        LayerKeep lk;
        lk.layer = 0;
        lk.merge = merge;
        if (per_head) {
          lk.before = N;
          lk.head_keep = keeps;
        } else {
          lk.before = N;
          lk.keep = keeps[0];
        }
        KeepPlan plan;
        plan.layers.push_back(lk);
        c.apply(plan, "test");
        const KVLayer& L = c.layer(0);
        for (int g = 0; g < Hkv; ++g) {
          const std::vector<int32_t>& keep = per_head ? keeps[size_t(g)] : keeps[0];
          std::vector<float> kb, vb;
          const float* ks = per_head ? L.head_keys_f32(g, kb) : L.keys_f32(kb) + g * hd;
          const float* vs = per_head ? L.head_values_f32(g, vb) : L.values_f32(vb) + g * hd;
          const int stride = per_head ? hd : kvd;
          ASSERT_EQ(per_head ? L.size(g) : L.size(), int(keep.size()));
          for (size_t m = 0; m < keep.size(); ++m) {
            EXPECT_EQ(per_head ? L.head_positions(g)[m] : L.positions()[m], keep[m]);
            // The group of kept entry m: nearest kept entry by index, ties to the earlier one.
            int lo = int(keep[m]), hi = int(keep[m]);
            if (merge) {
              lo = m == 0 ? 0 : (keep[m - 1] + keep[m]) / 2 + 1;
              hi = m + 1 == keep.size() ? N - 1 : (keep[m] + keep[m + 1]) / 2;
            }
            for (int x = 0; x < hd; ++x) {
              double ksum = 0, vsum = 0;
              for (int i = lo; i <= hi; ++i) ksum += kr[size_t(i) * kvd + g * hd + x], vsum += vr[size_t(i) * kvd + g * hd + x];
              const double cnt = hi - lo + 1;
              ASSERT_EQ(ks[m * stride + size_t(x)], round_to(t, ksum / cnt)) << dtype_name(t) << " merge " << merge;
              ASSERT_EQ(vs[m * stride + size_t(x)], round_to(t, vsum / cnt)) << dtype_name(t) << " merge " << merge;
            }
          }
        }
      }
}

// The bundled model with an image, greedy: the logits of the prefill and of four teacher-forced
// steps with a 16-bit cache against the float32 cache's. The bound comes from the rounding: each
// stored value moves by at most u |x| (u = 2^-11 for f16, 2^-8 for bf16), and to first order the
// logits move in proportion to u. So f16's change is about bf16's times 2^-3, measured here on the
// same prompt and tokens; allowed: bf16's / 2 (a factor 4 for the chance of individual roundings).
// A cache that stored something else (truncated, or bf16 for f16) breaks it; an f16 cache that
// stored float32 breaks the > 0. The f16 cache keeps the greedy token wherever the float32 top two
// are further apart than twice its change, and its sequence reports half the KV bytes.
TEST(KvDtype, BundledModelF16CacheStaysWithinTheRoundingBound) {
  test::BundledModel& b = test::bundled_model();
  const Model& m = *b.model;
  Engine e(m, b.tok);
  const Image img = load_image(test::data_path("images/square.png"));
  PromptRequest req;
  req.text = "What is shown in this image? Describe it.";
  req.image = &img;
  const PreparedPrompt p = e.prepare(req);
  const int V = m.config().text.vocab_size, steps = 4;
  struct Run {
    std::vector<std::vector<float>> logits;  // [steps + 1][V]
    size_t bytes = 0;
    std::vector<std::vector<size_t>> per_head;
  };
  std::vector<int32_t> forced;  // the float32 run's greedy tokens, fed to every run
  auto run = [&](DType t) {
    const std::unique_ptr<Backend> be = make_cpu_backend(m, t);
    EXPECT_EQ(be->kv_entry_bytes(), size_t(2) * m.config().text.n_kv_heads * m.config().text.head_dim * dtype_size(t));
    FullPolicy full;
    Run r;
    r.logits.assign(size_t(steps + 1), std::vector<float>(size_t(V)));
    std::unique_ptr<Backend::Sequence> seq = be->prefill(p, full, r.logits[0].data());
    for (int s = 0; s < steps; ++s) {
      const std::vector<float>& last = r.logits[size_t(s)];
      if (int(forced.size()) == s) forced.push_back(int32_t(std::max_element(last.begin(), last.end()) - last.begin()));
      be->step(*seq, forced[size_t(s)], r.logits[size_t(s) + 1].data());
    }
    r.bytes = seq->kv_bytes();
    r.per_head = seq->kv_bytes_per_head();
    return r;
  };
  const Run wide = run(DType::F32), half = run(DType::F16), brain = run(DType::BF16);
  EXPECT_EQ(half.bytes * 2, wide.bytes);
  EXPECT_EQ(brain.bytes * 2, wide.bytes);
  for (size_t l = 0; l < wide.per_head.size(); ++l)
    for (size_t h = 0; h < wide.per_head[l].size(); ++h) EXPECT_EQ(half.per_head[l][h] * 2, wide.per_head[l][h]);
  for (int s = 0; s <= steps; ++s) {
    const float* w = wide.logits[size_t(s)].data();
    const double d16 = test::max_abs_diff(half.logits[size_t(s)].data(), w, size_t(V));
    const double dbf = test::max_abs_diff(brain.logits[size_t(s)].data(), w, size_t(V));
    EXPECT_GT(d16, 0.0) << "step " << s << ": the f16 cache changed nothing (not rounded?)";
    EXPECT_LE(d16, dbf / 2) << "step " << s << ": f16 moved the logits by " << d16 << ", bf16 by " << dbf;
    std::vector<float> sorted(w, w + V);
    std::partial_sort(sorted.begin(), sorted.begin() + 2, sorted.end(), std::greater<float>());
    if (sorted[0] - sorted[1] > 2 * d16) {
      const float* hl = half.logits[size_t(s)].data();
      EXPECT_EQ(std::max_element(hl, hl + V) - hl, std::max_element(w, w + V) - w) << "step " << s;
    }
  }
}

// --kv-dtype: one rule (kv_dtype_from_name), one message naming the option, for every command;
// with --device cuda anything but f32 is refused (the GPU's cache is in --gpu-dtype). The CLI
// reports the type and half the bytes in run --json.
TEST(KvDtype, OptionIsCheckedOnceWithOneClearError) {
  EXPECT_EQ(kv_dtype_from_name(""), DType::F32);
  EXPECT_EQ(kv_dtype_from_name("f32"), DType::F32);
  EXPECT_EQ(kv_dtype_from_name("f16"), DType::F16);
  EXPECT_EQ(kv_dtype_from_name("bf16"), DType::BF16);
  for (const char* bad : {"F16", "fp16", "half", "f8", " f16"}) {
    try {
      kv_dtype_from_name(bad);
      ADD_FAILURE() << bad << " accepted";
    } catch (const Error& e) {
      EXPECT_EQ(std::string(e.what()), "--kv-dtype: must be f32, f16 or bf16, got '" + std::string(bad) + "'");
    }
  }
  {
    const test::Result r = test::prefixkv("run --prompt hi --device cuda --kv-dtype f16");
    EXPECT_NE(r.rc, 0);
    EXPECT_NE(r.out.find("--kv-dtype: applies to the CPU engine's cache"), std::string::npos) << r.out;
  }
  // Each command checks the option before it reads a file or loads a model (the paths need not exist).
  for (const char* cmd : {"run --prompt hi", "eval --data /nonexistent.json --out /nonexistent/out.json",
                          "calibrate --data /nonexistent.json --out /nonexistent/p.json", "serve --port 0",
                          "bench --shape tiny --gen 1"}) {
    const test::Result r = test::prefixkv(std::string(cmd) + " --kv-dtype f17");
    EXPECT_NE(r.rc, 0) << cmd;
    const std::string msg = "--kv-dtype: must be f32, f16 or bf16, got 'f17'";
    const size_t at = r.out.find(msg);
    EXPECT_NE(at, std::string::npos) << cmd << ": " << r.out;
    EXPECT_EQ(r.out.find(msg, at + 1), std::string::npos) << cmd << ": said twice: " << r.out;
  }
  const std::string base = "run --prompt 'Say something.' --max-tokens 3 --json";
  const test::Result a = test::prefixkv(base), h = test::prefixkv(base + " --kv-dtype f16");
  ASSERT_EQ(a.rc, 0) << a.out;
  ASSERT_EQ(h.rc, 0) << h.out;
  const json ja = json::parse(a.out), jh = json::parse(h.out);
  EXPECT_EQ(ja["kv"]["dtype"], "f32");
  EXPECT_EQ(jh["kv"]["dtype"], "f16");
  EXPECT_EQ(size_t(jh["kv"]["bytes"]) * 2, size_t(ja["kv"]["bytes"]));
}
