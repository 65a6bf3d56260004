// The model on the GPU (src/model/gpu_model.h, src/engine/gpu_session.h) against the CPU model, the reference:
//   (a) prefill logits: norm-wise relative error <= 1e-2 in BF16, <= 2e-3 in F16;
//   (b) 16 greedy steps teacher-forced on the CPU's tokens: the same top-1 at every step, except
//       where the CPU's own margin is within the measured logit error (reported);
//   (c) image features (CLIP tower + projector on the GPU);
//   (d) the policies keep the same entries after the prefill (mismatches <= 1% of the entries), and
//       the pool holds exactly the entries of the session's host positions, with the CPU's values;
//   (e) step_many (one batched call) = step one session at a time; token ids = embeddings;
//   (f) out of blocks / out of memory: pkv::Error, nothing changed.
// Every measured number is printed on a line starting with "gpu_model:" (scripts/gpu_test.sh shows
// them). Runs on a GPU only (pkv_cuda_tests).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <map>
#include <memory>
#include <numeric>
#include <set>
#include <span>
#include <string>
#include <vector>

#include "core/error.h"
#include "ops/cuda/device.h"
#include "model/gpu_model.h"
#include "engine/cuda_backend.h"
#include "engine/gpu_session.h"
#include "engine/query_importance.h"
#include "engine/engine.h"
#include "eval/evaluate.h"
#include "kv/policy.h"
#include "text/tokenizer.h"
#include "vision/image.h"

namespace pkv::cuda {
namespace {

std::string repo(const std::string& rel) { return std::string(PKV_SOURCE_DIR) + "/" + rel; }

double norm_rel(const float* got, const float* ref, size_t n) {
  double num = 0, den = 0;
  for (size_t i = 0; i < n; ++i) {
    const double d = double(got[i]) - double(ref[i]);
    num += d * d;
    den += double(ref[i]) * double(ref[i]);
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}
double norm_rel(const std::vector<float>& got, const std::vector<float>& ref) {
  EXPECT_EQ(got.size(), ref.size());
  return norm_rel(got.data(), ref.data(), std::min(got.size(), ref.size()));
}
double max_abs(const float* a, const float* b, size_t n) {
  double m = 0;
  for (size_t i = 0; i < n; ++i) m = std::max(m, std::fabs(double(a[i]) - double(b[i])));
  return m;
}
bool all_finite(const std::vector<float>& x) {
  return std::all_of(x.begin(), x.end(), [](float v) { return std::isfinite(v); });
}
int argmax(const float* x, int n) { return int(std::max_element(x, x + n) - x); }

double logit_tol(DType t) { return t == DType::F16 ? 2e-3 : 1e-2; }
double vision_tol(DType t) { return t == DType::F16 ? 4e-3 : 2e-2; }
const DType kDtypes[] = {DType::BF16, DType::F16};

// ---------------------------------------------------------------------------------------------
// Models, prompts and CPU references, loaded once per program.

struct ModelCase {
  const char* name;
  const char* dir;
  const char* tower;  // separate CLIP checkpoint or null
  const char* image;  // or null: text only
  const char* mode;   // "" = the model's default
  const char* prompt;
  // The bundled model is trained; the fixtures hold random weights (some stored in float32, so BF16
  // rounds the weights too) whose logits carry no dominant signal: their relative errors are
  // larger (measured with tests/cuda/fake_device.cc, which rounds where the GPU does: up to 1.5e-2
  // in BF16 after the prefill) and are held to a looser bound, `slack` x the tolerance.
  double slack = 2.5;
};

const ModelCase kTiny = {"tiny", "models/prefixkv-llava-tiny", nullptr, "data/example.png", "",
                         "Describe the image in detail.", 1.0};
const ModelCase kCases[] = {
    kTiny,
    {"hf_mha", "tests/data/fixtures/llava_hf_mha", nullptr, "tests/data/images/wide.png", "pad",
     "Describe the image in detail."},
    {"v5_gqa", "tests/data/fixtures/llava_v5_gqa", nullptr, "tests/data/images/tall.jpg", "pad",
     "Describe the image in detail."},
    {"orig_sharded", "tests/data/fixtures/llava_orig_sharded", nullptr, "tests/data/images/wide.png", "pad",
     "Describe the image in detail."},
    {"orig_nocip", "tests/data/fixtures/llava_orig_nocip", "tests/data/fixtures/clip_separate",
     "tests/data/images/gray.png", "pad", "Is this image in color?"},
    {"llama_text", "tests/data/fixtures/llama_text", nullptr, nullptr, "", "What is a cat?"},
};
constexpr int kSteps = 16;

struct Loaded {
  const ModelCase* c = nullptr;
  std::unique_ptr<Model> model;
  std::unique_ptr<Tokenizer> tok;
  std::unique_ptr<Engine> engine;
  PreparedPrompt prompt;
  // CPU reference, full cache: logits after the prefill and after each of kSteps greedy steps, and
  // the greedy tokens fed.
  std::vector<std::vector<float>> cpu_logits;
  std::vector<int32_t> cpu_tokens;
  std::map<DType, std::unique_ptr<GpuModel>> gpu;

  int V() const { return model->config().text.vocab_size; }
  int L() const { return model->config().text.n_layers; }
  int T() const { return int(prompt.ids.size()); }
  GpuModel& on(DType t) {
    auto& g = gpu[t];
    if (!g) {
      GpuModelOptions o;
      o.dtype = t;
      g = std::make_unique<GpuModel>(*model, o);
    }
    return *g;
  }
  PreparedPrompt prepare(const std::string& text, bool with_image) const {
    PromptRequest req;
    req.text = text;
    req.tmpl = Template::LlavaV1;
    Image img;
    if (with_image && c->image) {
      img = load_image(repo(c->image));
      req.image = &img;
      req.image_mode = c->mode;
    }
    return engine->prepare(req);
  }
};

// Loads a case once per program. A load that fails (a missing image, say) throws in every test
// that asks for the case and caches nothing: no test goes on with a half-loaded case (it used to
// read the CPU's tokens of an empty prompt and crash the program).
Loaded& load(const ModelCase& c) {
  static std::map<std::string, std::unique_ptr<Loaded>> cache;
  if (auto it = cache.find(c.name); it != cache.end()) return *it->second;
  auto loaded = std::make_unique<Loaded>();
  Loaded& l = *loaded;
  l.c = &c;
  LoadOptions lo;
  if (c.tower) lo.vision_tower_dir = repo(c.tower);
  l.model = Model::load(repo(c.dir), lo);
  l.tok = std::make_unique<Tokenizer>(repo(std::string(c.dir) + "/tokenizer.model"));
  l.engine = std::make_unique<Engine>(*l.model, *l.tok);
  l.prompt = l.prepare(c.prompt, true);

  FullPolicy full;
  Session s(*l.model, full);
  std::vector<float> logits(static_cast<size_t>(l.V()));
  s.prefill(l.prompt, logits.data());
  l.cpu_logits.push_back(logits);
  for (int i = 0; i < kSteps; ++i) {
    const int32_t t = argmax(logits.data(), l.V());
    l.cpu_tokens.push_back(t);
    s.step(t, logits.data());
    l.cpu_logits.push_back(logits);
  }
  return *(cache[c.name] = std::move(loaded));
}

// A pool for n_seqs sequences of up to `entries` entries per layer.
GpuKVPoolOptions pool_for(const Loaded& l, int entries, int n_seqs, int block_size = 16) {
  GpuKVPoolOptions o;
  o.block_size = block_size;
  o.n_blocks = n_seqs * l.L() * ((entries + block_size - 1) / block_size) + 4;
  return o;
}

std::unique_ptr<KVPolicy> policy(const std::string& name, double budget) {
  PolicyOptions o;
  o.budget = budget;
  return make_policy(name, o);
}

// ---------------------------------------------------------------------------------------------
// (a) prefill logits and (b) teacher-forced greedy decoding.

TEST(GpuModel, PrefillLogitsAndGreedyStepsMatchTheCpu) {
  for (const ModelCase& c : kCases)
    for (DType dt : kDtypes) {
      SCOPED_TRACE(std::string(c.name) + " " + dtype_name(dt));
      Loaded& l = load(c);
      GpuModel& gm = l.on(dt);
      GpuKVPool pool(gm, pool_for(l, l.T() + kSteps + 1, 1));
      FullPolicy full;
      GpuSession s(gm, pool, full);
      const int V = l.V();
      std::vector<float> logits(static_cast<size_t>(V));
      s.prefill(l.prompt, logits.data());
      ASSERT_TRUE(all_finite(logits));
      const double e0 = norm_rel(logits, l.cpu_logits[0]), bound = c.slack * logit_tol(dt);
      std::printf("gpu_model: (a) %-12s %-4s T=%4d prefill logits norm-rel error %.3g (bound %.1e), top-1 %s\n", c.name,
                  dtype_name(dt), l.T(), e0, bound,
                  argmax(logits.data(), V) == argmax(l.cpu_logits[0].data(), V) ? "same" : "DIFFERENT");
      EXPECT_LE(e0, bound) << "prefill logits";

      int differ = 0, unexplained = 0;
      double worst = e0;
      for (int i = 0; i <= kSteps; ++i) {
        const std::vector<float>& ref = l.cpu_logits[size_t(i)];
        const int cpu_top = argmax(ref.data(), V), gpu_top = argmax(logits.data(), V);
        worst = std::max(worst, norm_rel(logits, ref));
        if (cpu_top != gpu_top) {
          ++differ;
          const double margin = ref[size_t(cpu_top)] - ref[size_t(gpu_top)];
          const double noise = max_abs(logits.data(), ref.data(), size_t(V));
          const bool explained = margin <= 2 * noise;
          unexplained += explained ? 0 : 1;
          std::printf("gpu_model: (b) %-12s %-4s step %2d: top-1 CPU %d GPU %d, CPU margin %.4g, max |logit diff| %.4g%s\n",
                      c.name, dtype_name(dt), i, cpu_top, gpu_top, margin, noise, explained ? " (near-tie)" : "");
        }
        if (i == kSteps) break;
        s.step(l.cpu_tokens[size_t(i)], logits.data());
        ASSERT_TRUE(all_finite(logits)) << "step " << i;
      }
      std::printf("gpu_model: (b) %-12s %-4s %d greedy steps: %d top-1 differences (%d beyond the noise), worst norm-rel "
                  "logit error %.3g (bound %.1e)\n",
                  c.name, dtype_name(dt), kSteps, differ, unexplained, worst, 2 * bound);
      EXPECT_EQ(unexplained, 0) << "top-1 differs from the CPU's where the CPU's margin is larger than the logit error";
      EXPECT_LE(worst, 2 * bound) << "decode-step logits (errors of the cached K/V add up over the steps)";
      EXPECT_EQ(s.position(), l.T() + kSteps);
    }
}

// ---------------------------------------------------------------------------------------------
// (c) the vision tower and projector.

TEST(GpuModel, ImageFeaturesMatchTheCpu) {
  for (const ModelCase& c : kCases) {
    if (!c.image) continue;
    Loaded& l = load(c);
    ASSERT_FALSE(l.prompt.pixels.empty());
    const std::vector<float> ref = l.model->encode_image(l.prompt.pixels.data());
    for (DType dt : kDtypes) {
      SCOPED_TRACE(std::string(c.name) + " " + dtype_name(dt));
      const std::vector<float> got = l.on(dt).encode_image(l.prompt.pixels.data());
      ASSERT_EQ(got.size(), ref.size());
      ASSERT_TRUE(all_finite(got));
      const double e = norm_rel(got, ref);
      std::printf("gpu_model: (c) %-12s %-4s image embeddings [%d, %d] norm-rel error %.3g (tol %.0e)\n", c.name,
                  dtype_name(dt), l.model->config().image_tokens(), l.model->config().text.hidden, e, vision_tol(dt));
      EXPECT_LE(e, vision_tol(dt));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// (d) the policies on both back ends.

std::vector<std::set<int32_t>> kept_sets(const CacheView& c) {
  std::vector<std::set<int32_t>> s;
  for (int l = 0; l < c.n_layers(); ++l) s.emplace_back(c.positions(l).begin(), c.positions(l).end());
  return s;
}

// How the entries two caches keep differ: per layer the larger of the two one-sided differences,
// summed; entries the first keeps; per-layer counts' differences summed; layers kept identically.
struct KeptDiff {
  int mismatch = 0, kept = 0, count_diff = 0, layers_equal = 0;
};
KeptDiff kept_diff(const CacheView& cpu, const CacheView& gpu) {
  const auto a = kept_sets(cpu), b = kept_sets(gpu);
  KeptDiff d;
  for (size_t i = 0; i < a.size(); ++i) {
    int only_cpu = 0, only_gpu = 0;
    for (int32_t x : a[i]) only_cpu += b[i].count(x) ? 0 : 1;
    for (int32_t x : b[i]) only_gpu += a[i].count(x) ? 0 : 1;
    d.mismatch += std::max(only_cpu, only_gpu);
    d.kept += int(a[i].size());
    d.count_diff += std::abs(int(a[i].size()) - int(b[i].size()));
    d.layers_equal += a[i] == b[i] ? 1 : 0;
  }
  return d;
}

// The pool holds, in every layer, exactly the session's host positions, in order.
void expect_pool_matches_positions(GpuKVPool& pool, const GpuSession& s, const std::string& what) {
  for (int l = 0; l < pool.n_layers(); ++l) {
    std::vector<int32_t> pos;
    pool.read_layer(s.sequence(), l, nullptr, nullptr, &pos);
    const std::span<const int32_t> m = s.positions().positions(l);
    const std::vector<int32_t> want(m.begin(), m.end());
    if (pos == want) continue;
    std::string detail;
    const std::vector<int32_t>& map = pool.blocks().slot_map(s.sequence(), l);
    for (size_t i = 0; i < std::min(pos.size(), want.size()); ++i)
      if (pos[i] != want[i]) {
        detail += " [" + std::to_string(i) + "]: pool " + std::to_string(pos[i]) + ", host " + std::to_string(want[i]) +
                  " (slot " + std::to_string(slot_of(map, int32_t(i))) + ");";
        if (detail.size() > 300) break;
      }
    ADD_FAILURE() << what << " layer " << l << ": the pool holds " << pos.size() << " entries, the host positions " << want.size()
                  << "; slot map of " << map.size() << ";" << detail;
  }
}

TEST(GpuModel, PoliciesKeepTheSameEntries) {
  const ModelCase* cases[] = {&kTiny, &kCases[1]};
  for (const ModelCase* c : cases)
    for (DType dt : kDtypes)
      for (const char* name : {"snapkv", "prefixkv-online", "uniform-prefix"}) {
        SCOPED_TRACE(std::string(c->name) + " " + dtype_name(dt) + " " + name);
        Loaded& l = load(*c);
        auto cpu_policy = policy(name, 0.2);
        Session cpu(*l.model, *cpu_policy);
        std::vector<float> logits(static_cast<size_t>(l.V()));
        cpu.prefill(l.prompt, logits.data());

        GpuModel& gm = l.on(dt);
        GpuKVPool pool(gm, pool_for(l, l.T() + 1, 1));
        auto gpu_policy = policy(name, 0.2);
        GpuSession gs(gm, pool, *gpu_policy);
        gs.prefill(l.prompt, logits.data());
        expect_pool_matches_positions(pool, gs, "after prefill");

        const auto [mismatch, kept, count_diff, layers_equal] = kept_diff(cpu.cache(), gs.positions());
        (void)layers_equal;
        const int entries = l.T() * l.L();
        std::printf("gpu_model: (d) %-12s %-4s %-16s kept %d of %d entries; %d differ from the CPU's (%.2f%% of the "
                    "entries), per-layer counts differ by %d in all\n",
                    c->name, dtype_name(dt), name, kept, entries, mismatch, 100.0 * mismatch / entries, count_diff);
        EXPECT_LE(mismatch, std::max(1, entries / 100)) << "kept entries differ from the CPU's";
        EXPECT_EQ(gs.entries_per_layer().size(), size_t(l.L()));
      }
}

// The extended importance on the GPU (value weights and query reduces inside the prefill's
// attention, kernels.h) against the CPU engine's (engine/query_importance.h, from its float32 cache):
//   (i) the importance of each request, layer by layer, within a 16-bit prefill's error;
//   (ii) the cutoff policy at 20% and 80% kept keeps the CPU's entries (as (d): mismatches <= 1% of
//        the entries, where two entries' scores lie within that error of each other), and 8 greedy
//        steps teacher-forced on the CPU's tokens give the CPU's top-1 beyond the logit noise;
//   (iii) lookahead and wov (the L1 weight) are refused naming the option, nothing held.
TEST(GpuModel, CutoffKeepsTheCpusEntries) {
  Loaded& l = load(kTiny);
  const int T = l.T(), V = l.V(), steps = 8;
  FullPolicy full;
  Session ref(*l.model, full);
  std::vector<float> lr(static_cast<size_t>(V));
  ref.prefill(l.prompt, lr.data());
  for (DType dt : kDtypes) {
    SCOPED_TRACE(dtype_name(dt));
    GpuModel& gm = l.on(dt);
    GpuKVPool pool(gm, pool_for(l, T + steps + 1, 2));
    // (i) The weights, the reduces, the window's queries and every query.
    struct Req {
      ValueWeight w;
      QueryReduce r;
      int from;
    };
    const Req reqs[] = {{ValueWeight::OutputNorm2, QueryReduce::Sum, T - 32}, {ValueWeight::ValueNorm, QueryReduce::Mean, T - 32},
                        {ValueWeight::OutputNorm2, QueryReduce::Max, T - 32}, {ValueWeight::None, QueryReduce::Max, T - 32},
                        {ValueWeight::OutputNorm2, QueryReduce::Sum, 0},      {ValueWeight::ValueNorm, QueryReduce::Max, 0}};
    for (const Req& q : reqs) {
      ImportanceRequest req;
      req.needed = true, req.from = q.from, req.weight = q.w, req.reduce = q.r;
      const std::string what = std::string(value_weight_name(q.w)) + " " + query_reduce_name(q.r) + " from " + std::to_string(q.from);
      SCOPED_TRACE(what);
      const std::vector<std::vector<float>> want = extended_importance(*l.model, ref.cache(), l.prompt, lr.data(), req);
      GpuSession scratch(gm, pool, full);
      const std::vector<std::vector<float>> got = scratch.measure_importance(l.prompt, req);
      ASSERT_EQ(got.size(), want.size());
      double worst = 0;
      for (size_t i = 0; i < got.size(); ++i) worst = std::max(worst, norm_rel(got[i], want[i]));
      std::printf("gpu_model: (k) tiny %-4s importance %-22s worst layer norm-rel error %.3g (bound %.1e)\n", dtype_name(dt),
                  what.c_str(), worst, 2 * logit_tol(dt));
      EXPECT_LE(worst, 2 * logit_tol(dt)) << "the GPU's extended importance against the CPU engine's";
    }
    // (ii) The policy that is about to be the default, and the plain value norm.
    for (const char* name : {"cutoff:wov2:floor=0.5:cap=1.5", "cutoff:vnorm"})
      for (double budget : {0.2, 0.8}) {
        SCOPED_TRACE(std::string(name) + " " + std::to_string(budget));
        auto cpu_policy = policy(name, budget), gpu_policy = policy(name, budget);
        Session cpu(*l.model, *cpu_policy);
        std::vector<float> lc(static_cast<size_t>(V)), lg(lc.size());
        cpu.prefill(l.prompt, lc.data());
        GpuSession gs(gm, pool, *gpu_policy);
        gs.prefill(l.prompt, lg.data());
        expect_pool_matches_positions(pool, gs, "after prefill");
        const auto [mismatch, kept, count_diff, layers_equal] = kept_diff(cpu.cache(), gs.positions());
        const int entries = T * l.L();
        std::printf("gpu_model: (k) tiny %-4s %-30s %.0f%%: kept %d of %d entries; %d differ from the CPU's, per-layer "
                    "counts differ by %d in all, %d of %d layers identical\n",
                    dtype_name(dt), name, 100 * budget, kept, entries, mismatch, count_diff, layers_equal, l.L());
        EXPECT_LE(mismatch, std::max(1, entries / 100)) << "kept entries differ from the CPU's";
        EXPECT_LE(count_diff, std::max(1, entries / 100)) << "layer budgets differ from the CPU's";
#ifdef PKV_FAKE_DEVICE
        // Over the fake device (the CPU twins' arithmetic on 16-bit K/V) F16 keeps exactly the CPU's
        // entries in every layer (measured); a GPU's own rounding may part at a near-tie.
        if (dt == DType::F16) {
          EXPECT_EQ(layers_equal, l.L()) << "every layer keeps exactly the CPU's entries";
        }
#endif
        int unexplained = 0;
        for (int i = 0; i < steps; ++i) {
          const int ct = argmax(lc.data(), V), gt = argmax(lg.data(), V);
          if (ct != gt) {
            const double margin = lc[size_t(ct)] - lc[size_t(gt)], noise = max_abs(lg.data(), lc.data(), size_t(V));
            std::printf("gpu_model: (k) %s step %d: top-1 CPU %d GPU %d, CPU margin %.4g, max |logit diff| %.4g\n", name,
                        i, ct, gt, margin, noise);
            unexplained += margin <= 2 * noise ? 0 : 1;
          }
          cpu.step(l.cpu_tokens[size_t(i)], lc.data());
          gs.step(l.cpu_tokens[size_t(i)], lg.data());
          ASSERT_TRUE(all_finite(lg)) << "step " << i;
        }
        EXPECT_EQ(unexplained, 0) << "top-1 differs from the CPU's where the CPU's margin is larger than the logit error";
      }
    // (iii) What the GPU does not measure: one error naming the option, no blocks held.
    EXPECT_EQ(pool.blocks().used_blocks(), 0);
    for (const auto& [name, says] : {std::pair<const char*, const char*>{"cutoff:wov2:floor=0.5:look=8:reduce=max", "look="},
                                     {"cutoff:wov:floor=0.5", "wov2"}}) {
      auto p = policy(name, 0.2);
      GpuSession gs(gm, pool, *p);
      std::vector<float> lg(static_cast<size_t>(V));
      try {
        gs.prefill(l.prompt, lg.data());
        ADD_FAILURE() << name << ": accepted";
      } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find(says), std::string::npos) << e.what();
      }
      try {
        gs.begin_prefill(l.prompt);
        ADD_FAILURE() << name << ": accepted by begin_prefill";
      } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find(says), std::string::npos) << e.what();
      }
      EXPECT_EQ(pool.blocks().used_blocks(), 0) << name;
      EXPECT_FALSE(gs.prefilling());
    }
  }
}

// Every policy through the prefill and 8 decode steps on the tiny model: the pool holds exactly the
// host positions' entries, and where a layer keeps the same entries as the CPU its K and V are the CPU's
// (Elastic's merged means included).
TEST(GpuModel, PoolHoldsThePolicysEntriesWithTheCpuValues) {
  Loaded& l = load(kTiny);
  const DType dt = DType::BF16;
  GpuModel& gm = l.on(dt);
  const int kvd = l.model->config().text.n_kv_heads * l.model->config().text.head_dim;
  for (const std::string& name : policy_names()) {
    if (name == "prefixkv") continue;  // needs a profile; its selection is prefixkv-online's
    if (policy(name, 0.3)->per_head()) continue;  // per-head layers: PerHeadPoliciesKeepTheCpusEntriesPerHead
    SCOPED_TRACE(name);
    auto cpu_policy = policy(name, 0.3);
    auto gpu_policy = policy(name, 0.3);
    Session cpu(*l.model, *cpu_policy);
    GpuKVPool pool(gm, pool_for(l, l.T() + 9, 1));
    GpuSession gs(gm, pool, *gpu_policy);
    std::vector<float> lc(static_cast<size_t>(l.V())), lg(lc.size());
    cpu.prefill(l.prompt, lc.data());
    gs.prefill(l.prompt, lg.data());
    for (int i = 0; i < 8; ++i) {
      cpu.step(l.cpu_tokens[size_t(i)], lc.data());
      gs.step(l.cpu_tokens[size_t(i)], lg.data());
    }
    expect_pool_matches_positions(pool, gs, "after 8 steps");
    double worst = 0;
    int same_layers = 0;
    for (int layer = 0; layer < l.L(); ++layer) {
      const KVLayer& c = cpu.cache().layer(layer);
      const std::span<const int32_t> m = gs.positions().positions(layer);
      if (c.size() != int(m.size()) || !std::equal(c.positions(), c.positions() + c.size(), m.begin())) continue;
      ++same_layers;
      std::vector<float> k, v;
      pool.read_layer(gs.sequence(), layer, &k, &v, nullptr);
      ASSERT_EQ(k.size(), size_t(c.size()) * kvd);
      worst = std::max({worst, norm_rel(k.data(), c.keys(), k.size()), norm_rel(v.data(), c.values(), v.size())});
    }
    std::printf("gpu_model: (d) tiny BF16 %-16s after prefill + 8 steps: %d of %d layers keep the CPU's entries, their "
                "K/V norm-rel error %.3g; %zu KV bytes on the device\n",
                name.c_str(), same_layers, l.L(), worst, gs.kv_bytes());
    EXPECT_LE(worst, 3 * logit_tol(dt)) << "K/V of the kept entries";
    EXPECT_EQ(lg.size(), lc.size());
  }
}

// ---------------------------------------------------------------------------------------------
// (e) batching.

TEST(GpuModel, BatchedStepsEqualOneAtATime) {
  Loaded& l = load(kTiny);
  for (DType dt : kDtypes) {
    SCOPED_TRACE(dtype_name(dt));
    GpuModel& gm = l.on(dt);
    struct Seq {
      PreparedPrompt prompt;
      std::string policy;
      double budget;
    };
    std::vector<Seq> seqs = {
        {l.prompt, "snapkv", 0.2},
        {l.prepare("What is a cat?", false), "full", 1.0},
        {l.prepare("Name three shapes and three colors, then count to ten slowly.", false), "h2o", 0.5},
    };
    int longest = 0;
    for (const Seq& q : seqs) longest = std::max(longest, int(q.prompt.ids.size()));
    constexpr int steps = 12;
    GpuKVPool pool(gm, pool_for(l, longest + steps + 1, 6));
    std::vector<std::unique_ptr<KVPolicy>> policies;
    std::vector<std::unique_ptr<GpuSession>> batched, single;
    const int V = l.V(), B = int(seqs.size());
    std::vector<float> lb(size_t(B) * V), ls(size_t(B) * V);
    for (int i = 0; i < B; ++i) {
      policies.push_back(policy(seqs[size_t(i)].policy, seqs[size_t(i)].budget));
      batched.push_back(std::make_unique<GpuSession>(gm, pool, *policies.back()));
      policies.push_back(policy(seqs[size_t(i)].policy, seqs[size_t(i)].budget));
      single.push_back(std::make_unique<GpuSession>(gm, pool, *policies.back()));
      batched.back()->prefill(seqs[size_t(i)].prompt, &lb[size_t(i) * V]);
      single.back()->prefill(seqs[size_t(i)].prompt, &ls[size_t(i) * V]);
    }
    EXPECT_LE(norm_rel(lb, ls), 1e-6) << "the same prefill twice";
    std::vector<GpuSession*> bptr;
    for (auto& s : batched) bptr.push_back(s.get());
    // Not bit-identical: cuBLAS picks its kernels by the number of rows and the decode attention
    // splits the keys by the batch size, so sums run in other orders; a changed rounding of one
    // 16-bit value then feeds the cached K/V of later steps. The bound follows from test (b): both
    // runs are 16-bit evaluations of the same float32 computation, and (b) holds a 16-bit decode
    // within 2 logit_tol of the float32 CPU's, so by the triangle inequality the two runs differ by
    // at most 4 logit_tol. A batching fault (a wrong row, block table or length) moves the logits by
    // order 1. (Seen with the fake device: BF16 up to 4.5e-3 after 12 steps, F16 6e-4 to 1.1e-3
    // depending on the CPU's BLAS kernels; the same greedy tokens.)
    const double tol = 4 * logit_tol(dt);
    double worst = 0;
    int token_diffs = 0;
    for (int step = 0; step < steps; ++step) {
      std::vector<int32_t> tokens(static_cast<size_t>(B));
      for (int i = 0; i < B; ++i) {
        tokens[size_t(i)] = argmax(&lb[size_t(i) * V], V);
        if (argmax(&ls[size_t(i) * V], V) != tokens[size_t(i)]) ++token_diffs;
      }
      GpuSession::step_many(bptr, tokens.data(), lb.data());
      for (int i = 0; i < B; ++i) single[size_t(i)]->step(tokens[size_t(i)], &ls[size_t(i) * V]);
      for (int i = 0; i < B; ++i) {
        const double e = norm_rel(&lb[size_t(i) * V], &ls[size_t(i) * V], size_t(V));
        worst = std::max(worst, e);
        EXPECT_LE(e, tol) << "sequence " << i << " (" << seqs[size_t(i)].policy << ") step " << step;
      }
    }
    for (int i = 0; i < B; ++i) {
      if (argmax(&lb[size_t(i) * V], V) != argmax(&ls[size_t(i) * V], V)) ++token_diffs;
      EXPECT_EQ(batched[size_t(i)]->position(), single[size_t(i)]->position());
      for (int layer = 0; layer < l.L(); ++layer) {
        const std::span<const int32_t> a = batched[size_t(i)]->positions().positions(layer);
        const std::span<const int32_t> b = single[size_t(i)]->positions().positions(layer);
        EXPECT_TRUE(std::equal(a.begin(), a.end(), b.begin(), b.end()))
            << "sequence " << i << " layer " << layer << ": batched and single keep different entries";
      }
      expect_pool_matches_positions(pool, *batched[size_t(i)], "batched sequence " + std::to_string(i));
    }
    std::printf("gpu_model: (e) tiny %-4s 3 sequences (T = %zu, %zu, %zu; snapkv 0.2, full, h2o 0.5), %d steps: "
                "batched vs one at a time worst norm-rel logit difference %.3g (bound %.0e), %d greedy-token differences\n",
                dtype_name(dt), seqs[0].prompt.ids.size(), seqs[1].prompt.ids.size(), seqs[2].prompt.ids.size(), steps,
                worst, tol, token_diffs);
    EXPECT_EQ(token_diffs, 0);
    pool.blocks().check_invariants();
  }
}

// Decode steps as CUDA graphs (captured once, replayed while the length buckets and buffers stay
// the same) give exactly the logits and the kept entries of plain launches, also across a bucket
// boundary (a 250-token prompt grows past 256 entries) and with decode importance (h2o).
TEST(GpuModel, GraphStepsEqualPlainLaunches) {
  Loaded& l = load(kTiny);
  const int hidden = l.model->config().text.hidden;
  std::string words;
  for (int i = 0; i < 120; ++i) words += "red circle blue square ";
  PreparedPrompt text = l.prepare(words, false);
  ASSERT_GT(text.ids.size(), 250u);
  text.ids.resize(250);
  text.embeddings.resize(size_t(250) * hidden);
  const PreparedPrompt question = l.prepare("Name three shapes and three colors, then count to ten slowly.", false);
  for (DType dt : kDtypes) {
    SCOPED_TRACE(dtype_name(dt));
    GpuModelOptions plain_opt;
    plain_opt.dtype = dt;
    plain_opt.cuda_graphs = false;
    GpuModel& graphed = l.on(dt);
    GpuModel plain(*l.model, plain_opt);
    if (!graphed.uses_graphs()) GTEST_SKIP() << "graphs are off (PKV_CUDA_GRAPHS=0 or PKV_GPU_CHECK)";
    ASSERT_FALSE(plain.uses_graphs());
    constexpr int steps = 20;
    const int V = l.V();
    struct Side {
      std::unique_ptr<GpuKVPool> pool;
      std::vector<std::unique_ptr<KVPolicy>> policies;
      std::vector<std::unique_ptr<GpuSession>> sessions;
      std::vector<GpuSession*> ptrs;
      std::vector<float> logits;
    };
    auto make = [&](GpuModel& gm) {
      Side s;
      s.pool = std::make_unique<GpuKVPool>(gm, pool_for(l, l.T() + steps + 1, 3));
      s.logits.resize(size_t(2) * V);
      const PreparedPrompt* prompts[] = {&text, &question};
      const char* names[] = {"full", "h2o"};
      for (int i = 0; i < 2; ++i) {
        s.policies.push_back(policy(names[i], i == 0 ? 1.0 : 0.5));
        s.sessions.push_back(std::make_unique<GpuSession>(gm, *s.pool, *s.policies.back()));
        s.ptrs.push_back(s.sessions.back().get());
        s.sessions.back()->prefill(*prompts[i], &s.logits[size_t(i) * V]);
      }
      return s;
    };
    Side g = make(graphed), p = make(plain);
    const int captures_before = graphed.graph_captures();
    double worst = 0;
    for (int step = 0; step < steps; ++step) {
      std::vector<int32_t> tokens = {argmax(&g.logits[0], V), argmax(&g.logits[size_t(V)], V)};
      GpuSession::step_many(g.ptrs, tokens.data(), g.logits.data());
      GpuSession::step_many(p.ptrs, tokens.data(), p.logits.data());
      worst = std::max(worst, max_abs(g.logits.data(), p.logits.data(), g.logits.size()));
    }
    const int captures = graphed.graph_captures() - captures_before;
    std::printf("gpu_model: (e) tiny %-4s %d graph steps (T = 250 full, %zu h2o 0.5): %d captures, max |logit "
                "difference| vs plain launches %.3g\n",
                dtype_name(dt), steps, question.ids.size(), captures, worst);
    EXPECT_EQ(worst, 0.0);
    // One capture at the start and one when the first sequence passes 256 entries; the rest replay.
    EXPECT_GE(captures, 2);
    EXPECT_LE(captures, 3);
    for (int i = 0; i < 2; ++i)
      for (int layer = 0; layer < l.L(); ++layer) {
        const std::span<const int32_t> a = g.sessions[size_t(i)]->positions().positions(layer);
        const std::span<const int32_t> b = p.sessions[size_t(i)]->positions().positions(layer);
        EXPECT_TRUE(std::equal(a.begin(), a.end(), b.begin(), b.end()))
            << "sequence " << i << " layer " << layer;
      }

    // A second pool (the first still alive, so at other addresses) whose batch has the same shape
    // as the last captured step (B = 2, both buckets 512): every launch argument but the pool is the
    // same, and the graph must still be captured again, not replayed into the first pool.
    const PreparedPrompt first_text = text;
    text = l.prepare(words, false);  // make() prefills `text`
    text.ids.resize(300);
    text.embeddings.resize(size_t(300) * hidden);
    Side g2 = make(graphed), p2 = make(plain);
    text = first_text;
    const int captures_before2 = graphed.graph_captures();
    double worst2 = 0;
    for (int step = 0; step < 3; ++step) {
      std::vector<int32_t> tokens = {argmax(&g2.logits[0], V), argmax(&g2.logits[size_t(V)], V)};
      GpuSession::step_many(g2.ptrs, tokens.data(), g2.logits.data());
      GpuSession::step_many(p2.ptrs, tokens.data(), p2.logits.data());
      worst2 = std::max(worst2, max_abs(g2.logits.data(), p2.logits.data(), g2.logits.size()));
    }
    std::printf("gpu_model: (e) tiny %-4s a second pool, same step shape: %d captures, max |logit difference| vs "
                "plain launches %.3g\n",
                dtype_name(dt), graphed.graph_captures() - captures_before2, worst2);
    EXPECT_EQ(worst2, 0.0) << "graph steps on a second pool";
    EXPECT_GE(graphed.graph_captures() - captures_before2, 1);
  }
}

// prefixkv run --device cuda's path: the CUDA back end (engine/cuda_backend.h) takes the image
// through the GPU's vision tower, and generate() over it (the CPU engine's Decoding) gives the CPU
// engine's answer, token for token (the bundled model's greedy description; F16 keeps its logits
// within 2e-3 of the CPU's).
TEST(GpuModel, GenerateOnTheCudaBackendEqualsTheCpuEngine) {
  Loaded& l = load(kTiny);
  SamplingOptions s;
  s.max_tokens = 48;
  FullPolicy cpu_policy;
  const GenerationResult cpu = l.engine->generate(l.prompt, s, cpu_policy);
  CudaBackendOptions bo;
  bo.dtype = DType::F16;
  bo.kv_pool_entries = l.T() + s.max_tokens + 1;
  const std::unique_ptr<Backend> backend = make_cuda_backend(*l.model, bo);
  EXPECT_EQ(backend->name(), "cuda");
  PromptRequest req;
  req.text = kTiny.prompt;
  req.tmpl = Template::LlavaV1;
  const Image img = load_image(repo(kTiny.image));
  req.image = &img;
  backend->use_for_images(req);
  const PreparedPrompt p = l.engine->prepare(req);
  ASSERT_EQ(p.ids, l.prompt.ids);
  const size_t pool_bytes = backend->kv_pool_bytes();
  EXPECT_GT(pool_bytes, 0u);
  for (const char* name : {"full", "snapkv"}) {
    SCOPED_TRACE(name);
    std::unique_ptr<KVPolicy> pol = policy(name, 0.5);
    std::string streamed;
    const GenerationResult g = generate(*backend, *l.tok, p, s, *pol, [&](const std::string& t) { streamed += t; });
    EXPECT_EQ(streamed, g.text);
    EXPECT_EQ(g.prompt_tokens, int(p.ids.size()));
    ASSERT_EQ(int(g.kv_entries_per_layer.size()), l.L());
    if (std::string(name) == "full") {
      EXPECT_EQ(g.tokens, cpu.tokens) << "GPU: " << g.text << "\nCPU: " << cpu.text;
      EXPECT_EQ(g.stop_reason, cpu.stop_reason);
      for (int n : g.kv_entries_per_layer) EXPECT_EQ(n, g.prompt_tokens + int(g.tokens.size()) - 1);
      std::printf("gpu_model: (g) tiny F16  run --device cuda path: %zu tokens, identical to the CPU engine: %s\n",
                  g.tokens.size(), g.tokens == cpu.tokens ? "yes" : "no");
    } else {
      for (int n : g.kv_entries_per_layer) EXPECT_LT(n, g.prompt_tokens);  // compressed
      EXPECT_FALSE(g.text.empty());
    }
    // The blocks each layer held at the end, from its entry count: whole blocks of block_size
    // entries of kv_entry_bytes each; the sequence's bytes are their sum.
    ASSERT_EQ(g.kv_bytes_per_layer.size(), g.kv_entries_per_layer.size());
    size_t sum = 0;
    for (size_t i = 0; i < g.kv_bytes_per_layer.size(); ++i) {
      const size_t blocks = size_t((g.kv_entries_per_layer[i] + bo.block_size - 1) / bo.block_size);
      EXPECT_EQ(g.kv_bytes_per_layer[i], blocks * size_t(bo.block_size) * backend->kv_entry_bytes()) << "layer " << i;
      sum += g.kv_bytes_per_layer[i];
    }
    EXPECT_EQ(g.kv_bytes, sum);
  }
  // The finished sequences gave their blocks back: a sequence of the pool's whole size still fits.
  FullPolicy full;
  std::vector<float> logits(static_cast<size_t>(l.V()));
  EXPECT_NO_THROW(backend->prefill(p, full, logits.data()));
}

// Backend::prefill_shared + adopt (evaluation's one prefill for many policies) must give the
// sequence prefill(p, policy) gives: the same kernels over the same inputs (no atomics in the
// importance pass), so the logits, the kept positions and every later step are bit-identical.
TEST(GpuModel, AdoptedPrefillsEqualTheirOwnPrefill) {
  Loaded& l = load(kTiny);
  CudaBackendOptions bo;
  bo.dtype = DType::F16;
  const int steps = 4;
  bo.kv_pool_bytes = size_t(256) << 20;  // 13 sequences of the prompt and a few steps
  const std::unique_ptr<Backend> backend = make_cuda_backend(*l.model, bo);
  const int N = l.T();
  const std::vector<std::string> names = {"snapkv", "h2o", "elastic", "streaming", "prefixkv-online"};
  std::set<int> windows;
  for (const std::string& n : names) {
    const ImportanceRequest r = policy(n, 0.3)->prefill_importance(N);
    if (r.needed) windows.insert(r.from);
  }
  const auto shared = backend->prefill_shared(l.prompt, std::vector<int>(windows.begin(), windows.end()));
  EXPECT_EQ(shared->prompt_len, N);
  for (const std::string& n : names) {
    SCOPED_TRACE(n);
    auto pa = policy(n, 0.3), pb = policy(n, 0.3);
    std::vector<float> la(static_cast<size_t>(l.V())), lb = shared->logits;
    auto a = backend->prefill(l.prompt, *pa, la.data());
    auto b = backend->adopt(*shared, *pb);
    EXPECT_EQ(la, shared->logits);
    for (int step = 0; step <= steps; ++step) {
      ASSERT_EQ(a->entries_per_layer(), b->entries_per_layer()) << "step " << step;
      for (int layer = 0; layer < l.L(); ++layer)
        ASSERT_TRUE(std::equal(a->entries().positions(layer).begin(), a->entries().positions(layer).end(),
                               b->entries().positions(layer).begin()))
            << "layer " << layer << " step " << step;
      EXPECT_EQ(a->kv_bytes(), b->kv_bytes());
      if (step == steps) break;
      const int32_t t = argmax(la.data(), l.V());
      backend->step(*a, t, la.data());
      backend->step(*b, t, lb.data());
      ASSERT_EQ(la, lb) << "step " << step;
    }
    if (n != "streaming") {
      EXPECT_LT(a->entries_per_layer()[0], N) << "compressed";
    }
  }
}

// The per-head policies (adakv; the prefix policies' head allocation, prefixkv-online:heads and
// uniform-prefix:heads) on the GPU, given the CPU's per-KV-head importance (so both decide on
// the same numbers: GpuSession::adopt_prefill): every layer and KV head keeps exactly the CPU's
// entries, in order; each head table holds, bit for bit, the uncompressed GPU cache's K and V of
// those entries (head h's columns); the session holds exactly the sub-blocks the CPU's per-head
// counts need (ceil(n / block_size) per head, each a block's bytes / n_kv_heads), and the pool's
// blocks in use are the split blocks those fill, the uncompressed cache's blocks released;
// then greedy steps teacher-forced on the CPU's tokens: the same top-1 wherever the CPU's margin
// exceeds the logit error (as (b)), every head one entry longer per step, still the CPU's entries.
TEST(GpuModel, PerHeadPoliciesKeepTheCpusEntriesPerHead) {
  Loaded& l = load(kTiny);
  const int H = l.model->config().text.n_kv_heads, hd = l.model->config().text.head_dim, kvd = H * hd;
  const int T = l.T(), V = l.V(), steps = 8;
  for (const std::string name : {"adakv", "prefixkv-online:heads", "uniform-prefix:heads:hfloor=0"})
    for (DType dt : kDtypes)
      for (double budget : {0.3, 0.1}) {
        SCOPED_TRACE(name + " " + dtype_name(dt) + " budget " + std::to_string(budget));
        auto cpu_policy = policy(name, budget), gpu_policy = policy(name, budget);
        ASSERT_TRUE(cpu_policy->per_head());
        Session cpu(*l.model, *cpu_policy);
        std::vector<float> lc(static_cast<size_t>(V)), lg(lc.size());
        cpu.prefill(l.prompt, lc.data());
        const ImportanceRequest req = cpu_policy->prefill_importance(T);
        ASSERT_TRUE(req.per_kv_head);
        FullPolicy full;
        Session scratch(*l.model, full);
        const std::vector<std::vector<float>> imp = scratch.prefill_uncompressed(l.prompt, nullptr, {req.from}, true)[0];

        GpuModel& gm = l.on(dt);
        // Room for the uncompressed prompt, its copy, and a layer's head tables beside its shared table.
        GpuKVPool pool(gm, pool_for(l, T + steps + 1, 3));
        auto full_s = std::make_unique<GpuSession>(gm, pool, full);
        full_s->prefill_uncompressed(l.prompt, lg.data(), {});
        GpuSession gs(gm, pool, *gpu_policy);
        gs.adopt_prefill(*full_s, imp);
        const BlockPool& bp = pool.blocks();
        int held = 0, subs = 0;  // blocks of shared layers, sub-blocks of head tables
        for (int layer = 0; layer < l.L(); ++layer) {
          const KVLayer& c = cpu.cache().layer(layer);
          ASSERT_EQ(bp.per_head(gs.sequence(), layer), c.per_head()) << "layer " << layer;
          if (!c.per_head()) {  // a layer the plan left whole
            held += bp.blocks_for(c.size());
            continue;
          }
          std::vector<float> fk, fv;  // the uncompressed cache: entry i holds position i
          pool.read_layer(full_s->sequence(), layer, &fk, &fv, nullptr);
          for (int h = 0; h < H; ++h) {
            const std::span<const int32_t> g = gs.positions().head_positions(layer, h);
            ASSERT_EQ(std::vector<int32_t>(g.begin(), g.end()),
                      std::vector<int32_t>(c.head_positions(h), c.head_positions(h) + c.size(h)))
                << "layer " << layer << " head " << h;
            ASSERT_EQ(bp.head_entries(gs.sequence(), layer, h), c.size(h));
            subs += (c.size(h) + bp.block_size() - 1) / bp.block_size();
            std::vector<float> k, v, wk, wv;
            pool.read_head(gs.sequence(), layer, h, &k, &v);
            for (int32_t pos : g) {
              wk.insert(wk.end(), fk.begin() + long(size_t(pos) * kvd + size_t(h) * hd), fk.begin() + long(size_t(pos) * kvd + size_t(h + 1) * hd));
              wv.insert(wv.end(), fv.begin() + long(size_t(pos) * kvd + size_t(h) * hd), fv.begin() + long(size_t(pos) * kvd + size_t(h + 1) * hd));
            }
            EXPECT_EQ(k, wk) << "K of layer " << layer << " head " << h;
            EXPECT_EQ(v, wv) << "V of layer " << layer << " head " << h;
          }
        }
        EXPECT_EQ(bp.blocks_held(gs.sequence()), held);
        EXPECT_EQ(bp.sub_blocks_held(gs.sequence()), subs) << "the sub-blocks of the CPU's per-head counts";
        EXPECT_EQ(gs.kv_bytes(), size_t(held) * pool.block_bytes() + size_t(subs) * bp.sub_block_bytes());
        full_s.reset();  // the uncompressed cache goes back to the pool
        // Taken in order (the lowest free part first) with none freed since, one sequence's sub-blocks
        // fill their blocks: ceil(subs / n_kv_heads) split blocks.
        const BlockPoolStats st = bp.stats();
        EXPECT_EQ(st.sub_blocks_used, subs);
        EXPECT_EQ(bp.used_blocks(), held + st.split_blocks);
        EXPECT_EQ(st.split_blocks, (subs + H - 1) / H) << "sub-blocks of one sequence fill their blocks in order";
        // Bytes per layer and head: each head table's own blocks.
        const std::vector<std::vector<size_t>> bytes = gs.kv_bytes_per_head();
        size_t sum = 0;
        for (int layer = 0; layer < l.L(); ++layer)
          for (int h = 0; h < H; ++h) {
            const KVLayer& c = cpu.cache().layer(layer);
            EXPECT_EQ(bytes[size_t(layer)][size_t(h)], c.per_head() ? size_t(bp.head_blocks_for(c.size(h))) * bp.sub_block_bytes()
                                                                    : size_t(bp.blocks_for(c.size())) * pool.block_bytes() / H);
            sum += bytes[size_t(layer)][size_t(h)];
          }
        EXPECT_EQ(sum, gs.kv_bytes());
        std::printf("gpu_model: (h) tiny %-4s %s %.1f: every layer and head keeps the CPU's entries; %d blocks + %d "
                    "head sub-blocks (%zu bytes) held after the compaction, %d blocks for the uncompressed prompt\n",
                    dtype_name(dt), name.c_str(), budget, held, subs, gs.kv_bytes(), l.L() * ((T + 15) / 16));

        // Greedy steps teacher-forced on the CPU's tokens.
        int unexplained = 0;
        for (int i = 0; i < steps; ++i) {
          cpu.step(l.cpu_tokens[size_t(i)], lc.data());
          gs.step(l.cpu_tokens[size_t(i)], lg.data());
          ASSERT_TRUE(all_finite(lg)) << "step " << i;
          const int ct = argmax(lc.data(), V), gt = argmax(lg.data(), V);
          if (ct != gt) {
            const double margin = lc[size_t(ct)] - lc[size_t(gt)], noise = max_abs(lg.data(), lc.data(), size_t(V));
            std::printf("gpu_model: (h) %s step %d: top-1 CPU %d GPU %d, CPU margin %.4g, max |logit diff| %.4g\n",
                        name.c_str(), i, ct, gt, margin, noise);
            unexplained += margin <= 2 * noise ? 0 : 1;
          }
        }
        EXPECT_EQ(unexplained, 0) << "top-1 differs from the CPU's where the CPU's margin is larger than the logit error";
        for (int layer = 0; layer < l.L(); ++layer)
          for (int h = 0; h < H; ++h) {
            const KVLayer& c = cpu.cache().layer(layer);
            if (!c.per_head()) continue;
            const std::span<const int32_t> g = gs.positions().head_positions(layer, h);
            EXPECT_EQ(std::vector<int32_t>(g.begin(), g.end()),
                      std::vector<int32_t>(c.head_positions(h), c.head_positions(h) + c.size(h)))
                << "after the steps: layer " << layer << " head " << h;
            EXPECT_EQ(bp.head_entries(gs.sequence(), layer, h), c.size(h));
          }
        pool.blocks().check_invariants();
        if (name != "adakv") continue;  // the head tables' refusals: once

        // What head tables do not support: one error each, nothing changed.
        const int used = bp.used_blocks();
        auto refused = [&](const std::function<void()>& f, const std::string& says, const std::string& what) {
          try {
            f();
            ADD_FAILURE() << what << ": accepted";
          } catch (const Error& e) {
            EXPECT_NE(std::string(e.what()).find(says), std::string::npos) << what << ": " << e.what();
          }
          EXPECT_EQ(bp.used_blocks(), used) << what;
        };
        std::vector<std::vector<std::vector<float>>> step_imp;
        const int32_t token = l.cpu_tokens[0], position = gs.position();
        GpuDecodeBatch batch;
        batch.seqs = {gs.sequence()}, batch.tokens = &token, batch.positions = &position, batch.importance = &step_imp;
        refused([&] { gm.decode(pool, batch); }, "decode-time importance (H2O)", "decode importance");
        GpuPrefillPart part;
        part.seq = gs.sequence(), part.past = gs.position(), part.n = 1, part.pos = &position, part.ids = &token;
        refused([&] { gm.prefill_parts(pool, {part}); }, "keeps its entries per KV head", "a prefill piece");
        refused([&] { pool.read_layer(gs.sequence(), 0, nullptr, nullptr, nullptr); }, "read_head", "read_layer");
        FullPolicy other;
        GpuSession copy(gm, pool, other);
        refused([&] { pool.copy_sequence(gs.sequence(), copy.sequence()); }, "per KV head", "copy_sequence");
        EXPECT_EQ(gs.position(), T + steps);

        // A decode-time-importance policy (H2O) batched with the per-head session: one step for both.
        auto h2o_policy = policy("h2o", budget);
        GpuSession h2o(gm, pool, *h2o_policy);
        h2o.prefill(l.prompt, lg.data());
        std::vector<float> both(size_t(2) * V);
        const int32_t two[2] = {l.cpu_tokens[0], l.cpu_tokens[0]};
        GpuSession::step_many({&gs, &h2o}, two, both.data());
        EXPECT_TRUE(all_finite(both));
        EXPECT_EQ(gs.position(), T + steps + 1);
      }
}

// adakv through the cuda back end with the GPU's own per-KV-head importance (the prefill's, and
// a shared prefill's add_head_importance): per-head entries and bytes are reported, the importance
// is the CPU's within the prefill bound, and evaluation runs (with prefixkv-online:heads too).
TEST(GpuModel, PerHeadPoliciesRunOnTheCudaBackend) {
  Loaded& l = load(kTiny);
  CudaBackendOptions bo;
  bo.dtype = DType::F16;
  bo.kv_pool_bytes = size_t(64) << 20;
  const std::unique_ptr<Backend> backend = make_cuda_backend(*l.model, bo);
  const int H = l.model->config().text.n_kv_heads, T = l.T();
  auto ada = policy("adakv", 0.3);
  std::vector<float> logits(static_cast<size_t>(l.V()));
  auto seq = backend->prefill(l.prompt, *ada, logits.data());
  const std::vector<std::vector<int>> per_head = seq->entries_per_head();
  ASSERT_EQ(per_head.size(), size_t(l.L()));
  const std::vector<std::vector<size_t>> bytes = seq->kv_bytes_per_head();
  ASSERT_EQ(bytes.size(), size_t(l.L()));
  size_t sum = 0;
  for (int layer = 0; layer < l.L(); ++layer) {
    ASSERT_EQ(per_head[size_t(layer)].size(), size_t(H));
    for (int h = 0; h < H; ++h) {
      EXPECT_LT(per_head[size_t(layer)][size_t(h)], T) << "compressed";
      sum += bytes[size_t(layer)][size_t(h)];
    }
  }
  EXPECT_EQ(sum, seq->kv_bytes());
  backend->step(*seq, argmax(logits.data(), l.V()), logits.data());
  EXPECT_TRUE(all_finite(logits));

  // The per-KV-head importance against the CPU's: relative to the row's largest value, within the
  // prefill logits' bound (F16: the probabilities come from the same 16-bit scores).
  const ImportanceRequest req = ada->prefill_importance(T);
  const auto shared = backend->prefill_shared(l.prompt, {});
  backend->add_head_importance(*shared, l.prompt, req.from, "adakv");
  FullPolicy full;
  Session scratch(*l.model, full);
  const auto cpu_imp = scratch.prefill_uncompressed(l.prompt, nullptr, {req.from}, true)[0];
  const auto& gpu_imp = shared->head_importance_for(req.from);
  ASSERT_EQ(gpu_imp.size(), cpu_imp.size());
  double worst = 0;
  for (size_t layer = 0; layer < cpu_imp.size(); ++layer) {
    ASSERT_EQ(gpu_imp[layer].size(), size_t(H) * T);
    worst = std::max(worst, norm_rel(gpu_imp[layer], cpu_imp[layer]));
  }
  std::printf("gpu_model: (h) tiny F16 per-KV-head importance norm-rel error %.3g (bound %.1e)\n", worst, logit_tol(DType::F16));
  EXPECT_LE(worst, logit_tol(DType::F16)) << "per-KV-head importance";
  auto adopted = backend->adopt(*shared, *ada);
  EXPECT_EQ(adopted->entries_per_head().size(), size_t(l.L()));

  // The prefix policies' head form on the GPU's own per-KV-head importance: exactly round(b N L H)
  // entries over the layers' heads, their bytes summing to the sequence's.
  auto heads = policy("prefixkv-online:heads", 0.3);
  auto hs = backend->prefill(l.prompt, *heads, logits.data());
  long kept = 0;
  size_t head_bytes = 0;
  for (const auto& layer : hs->entries_per_head())
    for (int n : layer) kept += n;
  for (const auto& layer : hs->kv_bytes_per_head())
    for (size_t b : layer) head_bytes += b;
  EXPECT_EQ(kept, std::lround(0.3 * T * l.L() * H));
  EXPECT_EQ(head_bytes, hs->kv_bytes());

  EvalOptions opt;
  opt.configs = {{"adakv", "", 0.5}, {"prefixkv-online:heads", "", 0.5}};
  opt.max_tokens = 4;
  opt.limit = 1;
  const std::vector<Sample> samples = load_conversations(repo("data/eval/eval.json"));
  EXPECT_NO_THROW(evaluate(*backend, *l.engine, samples, nullptr, opt));

  // `prefixkv run`'s pool, sized for one sequence (CudaBackendOptions::kv_pool_entries), holds a
  // per-head plan that keeps nearly everything (each layer split beside its shared table, the head
  // tables' rounding) and its decode steps.
  for (double budget : {0.9, 0.3}) {
    CudaBackendOptions one;
    one.dtype = DType::F16;
    const int steps = 4;
    one.kv_pool_entries = T + steps + 1;
    const std::unique_ptr<Backend> run = make_cuda_backend(*l.model, one);
    auto pol = policy("adakv", budget);
    auto s1 = run->prefill(l.prompt, *pol, logits.data());
    for (int i = 0; i < steps; ++i) EXPECT_NO_THROW(run->step(*s1, l.cpu_tokens[size_t(i)], logits.data())) << budget;
    EXPECT_EQ(s1->position(), T + steps);
  }
}

// Evaluation on the cuda back end against the CPU's on two of the bundled evaluation samples: the
// same samples and records, and the PPL of the full cache and of a policy whose choice does not
// depend on the attention (streaming) within 1% (issue 12's bound for the GPU grid: the GPU keeps
// its cache in 16 bits, the CPU in float32).
TEST(GpuModel, EvaluationOnTheCudaBackendMatchesTheCpu) {
  Loaded& l = load(kTiny);
  const std::vector<Sample> samples = load_conversations(repo("data/eval/eval.json"));
  EvalOptions opt;
  opt.configs = {{"streaming", "", 0.5}, {"snapkv", "", 0.5}};
  opt.max_tokens = 24;
  opt.limit = 2;
  opt.batch = 2;
  const std::unique_ptr<Backend> cpu = make_cpu_backend(*l.model);
  CudaBackendOptions bo;
  bo.dtype = DType::F16;
  bo.kv_pool_bytes = size_t(256) << 20;
  const std::unique_ptr<Backend> gpu = make_cuda_backend(*l.model, bo);
  const EvalReport rc = evaluate(*cpu, *l.engine, samples, nullptr, opt);
  const EvalReport rg = evaluate(*gpu, *l.engine, samples, nullptr, opt);
  ASSERT_EQ(rc.samples, 2);
  ASSERT_EQ(rg.samples, rc.samples);
  EXPECT_EQ(rg.answer_tokens, rc.answer_tokens);
  ASSERT_EQ(rg.records.size(), rc.records.size());
  EXPECT_NEAR(rg.full.ppl / rc.full.ppl, 1.0, 0.01);
  EXPECT_NEAR(rg.records[0].second.ppl / rc.records[0].second.ppl, 1.0, 0.01);
  for (size_t i = 0; i < rc.records.size(); ++i) {
    EXPECT_EQ(rg.records[i].first.key(), rc.records[i].first.key());
    EXPECT_EQ(rg.records[i].second.samples, 2);
    EXPECT_TRUE(std::isfinite(rg.records[i].second.kld) && rg.records[i].second.kld > 0);
  }
  std::printf("gpu_model: eval on 2 samples: full PPL cpu %.5f gpu %.5f; streaming@0.5 %.5f / %.5f; snapkv@0.5 %.5f / %.5f\n",
              rc.full.ppl, rg.full.ppl, rc.records[0].second.ppl, rg.records[0].second.ppl, rc.records[1].second.ppl,
              rg.records[1].second.ppl);
}

// The testbeds on the cuda back end against the CPU's (docs/RESULTS.md, "Testbeds"; the logic is
// above the seam): the no-image control keeps the text's entries whatever the attention, so its PPL
// is within the 1% above, as streaming's; the answer oracle's importance comes from the device's own
// prefill of prompt + answer (a record that diverges from the full cache); the text testbed's full
// cache and streaming within 1% too. A prompt's own prefill refuses the answer estimator.
TEST(GpuModel, TestbedsOnTheCudaBackendMatchTheCpu) {
  Loaded& l = load(kTiny);
  const std::vector<Sample> samples = load_conversations(repo("data/eval/eval.json"));
  EvalOptions opt;
  opt.configs = {{"uniform-prefix", "answer", 0.5}, {"streaming", "", 0.5}};
  opt.no_image_control = true;
  opt.max_tokens = 8;
  opt.limit = 1;
  opt.batch = 3;
  const std::unique_ptr<Backend> cpu = make_cpu_backend(*l.model);
  CudaBackendOptions bo;
  bo.dtype = DType::F16;
  bo.kv_pool_bytes = size_t(256) << 20;
  const std::unique_ptr<Backend> gpu = make_cuda_backend(*l.model, bo);
  const EvalReport rc = evaluate(*cpu, *l.engine, samples, nullptr, opt);
  const EvalReport rg = evaluate(*gpu, *l.engine, samples, nullptr, opt);
  ASSERT_TRUE(rc.no_image && rg.no_image);
  EXPECT_NEAR(rg.no_image->ppl / rc.no_image->ppl, 1.0, 0.01);
  EXPECT_GT(rg.no_image->ppl, rg.full.ppl) << "the description needs the image";
  ASSERT_EQ(rg.records.size(), 2u);
  EXPECT_NEAR(rg.records[1].second.ppl / rc.records[1].second.ppl, 1.0, 0.01);
  EXPECT_TRUE(std::isfinite(rg.records[0].second.kld) && rg.records[0].second.kld > 0);
  EXPECT_LT(rg.records[0].second.kv_bytes, rg.full.kv_bytes);
  TextSet text = load_text_set(repo("data/text/heldout.json"));
  text.documents.resize(2);
  text.context_tokens = 64;
  text.continuation_tokens = 16;
  opt.no_image_control = false;
  opt.limit = 0;
  const EvalReport tc = evaluate_text(*cpu, *l.engine, text, opt);
  const EvalReport tg = evaluate_text(*gpu, *l.engine, text, opt);
  EXPECT_EQ(tg.testbed, "text");
  ASSERT_EQ(tg.samples, 2);
  EXPECT_EQ(tg.answer_tokens, 32);
  EXPECT_NEAR(tg.full.ppl / tc.full.ppl, 1.0, 0.01);
  EXPECT_NEAR(tg.records[1].second.ppl / tc.records[1].second.ppl, 1.0, 0.01);
  PolicyOptions po;
  po.estimator = Estimator::Answer;
  po.budget = 0.5;
  auto oracle = make_policy("uniform-prefix", po);
  std::vector<float> logits(static_cast<size_t>(l.V()));
  try {
    gpu->prefill(l.prompt, *oracle, logits.data());
    ADD_FAILURE() << "the GPU's prefill ranked by an answer it does not have";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("--kv-importance answer"), std::string::npos) << e.what();
  }
  std::printf("gpu_model: testbeds: no-image PPL cpu %.5f gpu %.5f; text full PPL %.5f / %.5f\n", rc.no_image->ppl,
              rg.no_image->ppl, tc.full.ppl, tg.full.ppl);
}

// The observer hook on the GPU (prefixkv run --device cuda --dump-tensors): the same named tensors
// as the CPU's forward pass, in the same order and shapes, through the image, the prefill and two
// decode steps; their values within the bounds of the tests above (the image's tensors within the
// image embeddings' tolerance (c), the decoder's within the greedy steps' (b): 2 logit_tol).
TEST(GpuModel, ObserversSeeTheCpusTensors) {
  struct Collect : Observer {
    struct Event {
      std::string name;
      int layer;
      std::vector<int64_t> shape;
      std::vector<float> data;
    };
    std::vector<Event> events;
    void on_tensor(const std::string& name, int layer, const float* data, const std::vector<int64_t>& shape) override {
      size_t n = 1;
      for (int64_t d : shape) n *= size_t(d);
      events.push_back({name, layer, shape, std::vector<float>(data, data + n)});
    }
  };
  Loaded& l = load(kTiny);
  const Image img = load_image(repo(kTiny.image));
  SamplingOptions so;
  so.max_tokens = 3;  // the prefill and two steps
  auto run = [&](Backend& backend, Collect& obs) {
    PromptRequest req;
    req.text = kTiny.prompt;
    req.tmpl = Template::LlavaV1;
    req.image = &img;
    backend.use_for_images(req, &obs);
    const PreparedPrompt p = l.engine->prepare(req, &obs);
    FullPolicy full;
    return generate(backend, *l.tok, p, so, full, {}, &obs);
  };
  const std::unique_ptr<Backend> cpu = make_cpu_backend(*l.model);
  CudaBackendOptions bo;
  bo.dtype = DType::F16;
  bo.kv_pool_entries = l.T() + so.max_tokens + 1;
  const std::unique_ptr<Backend> gpu = make_cuda_backend(*l.model, bo);
  Collect oc, og;
  const GenerationResult rc = run(*cpu, oc), rg = run(*gpu, og);
  EXPECT_EQ(rg.tokens, rc.tokens);
  ASSERT_EQ(og.events.size(), oc.events.size());
  std::map<std::string, double> worst;
  for (size_t i = 0; i < oc.events.size(); ++i) {
    const auto &c = oc.events[i], &g = og.events[i];
    ASSERT_EQ(g.name, c.name) << "event " << i;
    ASSERT_EQ(g.layer, c.layer) << c.name;
    ASSERT_EQ(g.shape, c.shape) << c.name << " layer " << c.layer;
    const bool vision = c.name == "pixel_values" || c.name.rfind("vision", 0) == 0 || c.name == "projector_output";
    const double e = norm_rel(g.data, c.data), bound = vision ? vision_tol(DType::F16) : 2 * logit_tol(DType::F16);
    EXPECT_LE(e, bound) << c.name << " layer " << c.layer;
    if (c.name == "pixel_values") {
      EXPECT_EQ(g.data, c.data) << "the same host preprocessing";
    }
    worst[c.name] = std::max(worst[c.name], e);
  }
  for (const char* name : {"pixel_values", "vision_layer_out", "vision_features", "projector_output", "layer_out",
                           "hidden_final", "logits"})
    EXPECT_TRUE(worst.count(name)) << name << " was never shown";
  for (auto& [name, e] : worst) std::printf("gpu_model: (h) tiny F16 observed %-17s worst norm-rel error %.3g\n", name.c_str(), e);
}

// The GPU path keeps the image on the device: the cuda back end's image encoder leaves the
// projector's output there and the prefill builds every input row on the device (text rows from
// the embedding table by id). In BF16 over the tiny model's BF16 table that input is exactly the
// host path's (the table's rows widened to float32, the same projector output), so the prefill's
// logits are bit-identical; a CPU sequence refuses such a prompt, and a bad id is an error.
TEST(GpuModel, ImagesStayOnTheDeviceUntilThePrefill) {
  Loaded& l = load(kTiny);
  CudaBackendOptions bo;
  bo.dtype = DType::BF16;
  bo.kv_pool_entries = l.T() + 2;
  const std::unique_ptr<Backend> backend = make_cuda_backend(*l.model, bo);
  const Image img = load_image(repo(kTiny.image));
  PromptRequest req;
  req.text = kTiny.prompt;
  req.tmpl = Template::LlavaV1;
  req.image = &img;
  backend->use_for_images(req);
  ASSERT_TRUE(bool(req.encode_image_on_device));
  const PreparedPrompt on_device = l.engine->prepare(req);
  ASSERT_TRUE(on_device.device_image);
  EXPECT_TRUE(on_device.embeddings.empty()) << "no host embeddings";
  EXPECT_EQ(on_device.ids, l.prompt.ids);
  // The host path: the GPU's image embeddings downloaded, the text rows embedded on the host.
  PromptRequest host_req = req;
  host_req.encode_image_on_device = nullptr;
  cuda::GpuModel& gm = l.on(DType::BF16);
  host_req.encode_image = [&](const float* px) { return gm.encode_image(px); };
  const PreparedPrompt on_host = l.engine->prepare(host_req);
  ASSERT_FALSE(on_host.device_image);
  FullPolicy f1, f2;
  std::vector<float> a(static_cast<size_t>(l.V())), b(a.size());
  { auto s = backend->prefill(on_device, f1, a.data()); }
  {
    GpuKVPool pool(gm, pool_for(l, l.T(), 1));
    GpuSession s(gm, pool, f2);
    s.prefill(on_host, b.data());
  }
  EXPECT_EQ(a, b);
  // The CPU cannot take it.
  const std::unique_ptr<Backend> cpu = make_cpu_backend(*l.model);
  FullPolicy f3;
  try {
    cpu->prefill(on_device, f3, a.data());
    ADD_FAILURE() << "the CPU took a prompt whose image is on the GPU";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("encoded on another device"), std::string::npos) << e.what();
  }
  // A text id outside the vocabulary is refused before anything runs.
  PreparedPrompt bad = on_device;
  bad.ids[0] = l.V();
  FullPolicy f4;
  EXPECT_THROW(backend->prefill(bad, f4, a.data()), Error);
  FullPolicy f5;
  EXPECT_NO_THROW(backend->prefill(on_device, f5, a.data())) << "the failed prefill held no blocks";
}

TEST(GpuModel, TokenIdsAndEmbeddingsGiveTheSameStep) {
  Loaded& l = load(kTiny);
  for (DType dt : kDtypes) {
    SCOPED_TRACE(dtype_name(dt));
    GpuModel& gm = l.on(dt);
    GpuKVPool pool(gm, pool_for(l, l.T() + 2, 2));
    const BlockPool::SeqId a = pool.blocks().add_sequence(), b = pool.blocks().add_sequence();
    std::vector<int32_t> pos(static_cast<size_t>(l.T()));
    std::iota(pos.begin(), pos.end(), 0);
    gm.prefill(pool, a, l.prompt.embeddings.data(), l.T(), pos.data(), nullptr);
    gm.prefill(pool, b, l.prompt.embeddings.data(), l.T(), pos.data(), nullptr);
    const int32_t token = l.cpu_tokens[0], position = l.T();
    std::vector<float> x(static_cast<size_t>(l.model->config().text.hidden));
    l.model->embed(&token, 1, x.data());
    std::vector<float> la(static_cast<size_t>(l.V())), lb(la.size());
    GpuDecodeBatch ba;
    ba.seqs = {a}, ba.tokens = &token, ba.positions = &position, ba.logits = la.data();
    gm.decode(pool, ba);
    GpuDecodeBatch bb;
    bb.seqs = {b}, bb.embeddings = x.data(), bb.positions = &position, bb.logits = lb.data();
    gm.decode(pool, bb);
    const double e = norm_rel(la, lb);
    std::printf("gpu_model: (e) tiny %-4s token ids (device gather) vs host embeddings: norm-rel logit difference %.3g\n",
                dtype_name(dt), e);
    // The tiny model stores BF16: exact in BF16; F16 rounds the table once more than the host path.
    EXPECT_LE(e, dt == DType::BF16 ? 1e-6 : logit_tol(dt));
    GpuDecodeBatch bad = ba;
    const int32_t outside = l.V();
    bad.tokens = &outside;
    EXPECT_THROW(gm.decode(pool, bad), Error);
    bad.seqs = {a, a};
    EXPECT_THROW(gm.decode(pool, bad), Error);
    EXPECT_EQ(pool.blocks().entries(a, 0), l.T() + 1) << "rejected steps change nothing";
  }
}

// ---------------------------------------------------------------------------------------------
// (f) errors.

TEST(GpuModel, OutOfBlocksIsAnErrorAndChangesNothing) {
  Loaded& l = load(kTiny);
  GpuModel& gm = l.on(DType::BF16);
  const PreparedPrompt pa = l.prepare("What is a cat?", false);
  const PreparedPrompt pb = l.prepare("Name three shapes.", false);
  const int Ta = int(pa.ids.size()), Tb = int(pb.ids.size());
  const int bs = std::max(Ta, Tb) + 2;  // each prefill takes one block per layer
  GpuKVPoolOptions o;
  o.block_size = bs;
  o.n_blocks = 2 * l.L();
  GpuKVPool pool(gm, o);
  FullPolicy fa, fb, fc;
  std::vector<float> logits(size_t(2) * l.V());
  auto sa = std::make_unique<GpuSession>(gm, pool, fa);
  GpuSession sb(gm, pool, fb);
  sa->prefill(pa, logits.data());
  sb.prefill(pb, logits.data());
  EXPECT_EQ(pool.blocks().free_blocks(), 0);

  // Admission of a third prompt: a clear error naming the sequence and the block counts.
  {
    GpuSession sc(gm, pool, fc);
    try {
      sc.prefill(l.prompt, logits.data());
      FAIL() << "a prefill without free blocks succeeded";
    } catch (const Error& e) {
      const std::string m = e.what();
      std::printf("gpu_model: (f) prefill out of blocks: %s\n", m.c_str());
      EXPECT_NE(m.find("out of KV blocks"), std::string::npos) << m;
      EXPECT_NE(m.find("sequence " + std::to_string(sc.sequence())), std::string::npos) << m;
      EXPECT_NE(m.find("free"), std::string::npos) << m;
    }
    EXPECT_EQ(sc.position(), 0);
    EXPECT_EQ(pool.blocks().blocks_held(sc.sequence()), 0);
  }

  // Decode until sb needs a second block per layer: the step that would take it fails, batched or
  // not, and changes nothing; once sa is gone it succeeds.
  int k = 0;
  while (sb.position() + 1 <= bs) {  // steps that still fit in the first block
    sb.step(l.cpu_tokens[size_t(k % kSteps)], logits.data());
    ++k;
  }
  const int pos_a = sa->position(), pos_b = sb.position();
  const std::vector<int> ea = sa->entries_per_layer(), eb = sb.entries_per_layer();
  const int32_t tokens[2] = {l.cpu_tokens[0], l.cpu_tokens[1]};
  try {
    GpuSession::step_many({sa.get(), &sb}, tokens, logits.data());
    FAIL() << "a decode step without free blocks succeeded";
  } catch (const Error& e) {
    std::printf("gpu_model: (f) decode out of blocks: %s\n", e.what());
    EXPECT_NE(std::string(e.what()).find("sequence " + std::to_string(sb.sequence())), std::string::npos) << e.what();
  }
  EXPECT_THROW(sb.step(tokens[0], logits.data()), Error);
  EXPECT_EQ(sa->position(), pos_a);
  EXPECT_EQ(sb.position(), pos_b);
  EXPECT_EQ(sa->entries_per_layer(), ea);
  EXPECT_EQ(sb.entries_per_layer(), eb);
  pool.blocks().check_invariants();
  sa.reset();
  sb.step(tokens[0], logits.data());
  EXPECT_EQ(sb.position(), pos_b + 1);
  EXPECT_TRUE(all_finite(std::vector<float>(logits.begin(), logits.begin() + l.V())));
}

// Failed prefills (an empty prompt, a prompt the pool has no blocks for) leave the model and the
// pool as they were: a later sequence on the same pool gives exactly the logits it gives on a
// fresh pool, and every block comes back when the sessions end.
TEST(GpuModel, FailedPrefillsLeaveTheModelAndPoolUsable) {
  Loaded& l = load(kTiny);
  GpuModel& gm = l.on(DType::F16);
  constexpr int steps = 4;
  const GpuKVPoolOptions o = pool_for(l, l.T() + steps + 1, 1);
  const int V = l.V();
  auto run = [&](GpuKVPool& pool) {
    FullPolicy full;
    GpuSession s(gm, pool, full);
    std::vector<float> logits(static_cast<size_t>(V) * (steps + 1));
    s.prefill(l.prompt, logits.data());
    for (int i = 0; i < steps; ++i) s.step(l.cpu_tokens[size_t(i)], &logits[size_t(i + 1) * V]);
    return logits;
  };
  GpuKVPool fresh(gm, o);
  const std::vector<float> expected = run(fresh);

  GpuKVPool pool(gm, o);
  std::vector<float> logits(static_cast<size_t>(V));
  {
    FullPolicy full;
    GpuSession empty(gm, pool, full);
    EXPECT_THROW(empty.prefill(PreparedPrompt{}, logits.data()), Error);
    EXPECT_EQ(empty.position(), 0);
  }
  {
    // Twice the prompt: more blocks than the pool has.
    PreparedPrompt twice = l.prompt;
    const int D = l.model->config().text.hidden;
    twice.ids.insert(twice.ids.end(), l.prompt.ids.begin(), l.prompt.ids.end());
    twice.embeddings.insert(twice.embeddings.end(), l.prompt.embeddings.begin(), l.prompt.embeddings.end());
    ASSERT_EQ(twice.embeddings.size(), twice.ids.size() * size_t(D));
    FullPolicy full;
    GpuSession too_long(gm, pool, full);
    try {
      too_long.prefill(twice, logits.data());
      ADD_FAILURE() << "a prefill larger than the pool succeeded";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("out of KV blocks"), std::string::npos) << e.what();
    }
    EXPECT_EQ(pool.blocks().free_blocks(), pool.blocks().n_blocks());
  }
  pool.blocks().check_invariants();
  const std::vector<float> got = run(pool);
  EXPECT_EQ(got, expected) << "a sequence after failed prefills differs from one on a fresh pool";
  EXPECT_EQ(pool.blocks().free_blocks(), pool.blocks().n_blocks());
  pool.blocks().check_invariants();
}

// Compaction jobs that no policy can produce (a bookkeeping bug): one clear error naming the table,
// and neither the pool's tables nor its slot maps change.
TEST(GpuModel, CompactionRefusesBadJobsAndChangesNothing) {
  Loaded& l = load(kTiny);
  GpuModel& gm = l.on(DType::F16);
  GpuKVPool pool(gm, pool_for(l, l.T(), 1));
  auto full = policy("full", 1.0);
  GpuSession gs(gm, pool, *full);
  std::vector<float> logits(static_cast<size_t>(l.V()));
  gs.prefill(l.prompt, logits.data());
  const int n = l.T();
  std::vector<int32_t> pos_before;
  pool.read_layer(gs.sequence(), 0, nullptr, nullptr, &pos_before);
  auto job = [&](int layer, std::vector<int32_t> keep) { return GpuKVPool::Job{gs.sequence(), layer, std::move(keep), false}; };
  std::vector<int32_t> evict_one;  // a valid job: drop entry 3
  for (int i = 0; i < n; ++i)
    if (i != 3) evict_one.push_back(i);
  const std::vector<std::pair<std::vector<GpuKVPool::Job>, std::string>> bad = {
      {{job(0, evict_one), job(1, {0, 2, 1})}, "strictly increasing"},
      {{job(0, evict_one), job(1, {0, n})}, "strictly increasing and < " + std::to_string(n)},
      {{job(0, evict_one), job(0, evict_one)}, "appears twice"},
      {{job(0, evict_one), job(l.L(), {0})}, "layer"},
  };
  for (const auto& [jobs, want] : bad) {
    try {
      pool.compact(jobs);
      ADD_FAILURE() << "no error for: " << want;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(want), std::string::npos) << e.what();
    }
    for (int layer = 0; layer < l.L(); ++layer) {
      EXPECT_EQ(pool.blocks().entries(gs.sequence(), layer), n);
      EXPECT_TRUE(pool.blocks().slot_map(gs.sequence(), layer).empty());
    }
    std::vector<int32_t> pos;
    pool.read_layer(gs.sequence(), 0, nullptr, nullptr, &pos);
    EXPECT_EQ(pos, pos_before);
  }
  // The valid job alone: entry n - 1 moves into slot 3, and the pool reads back in logical order.
  pool.compact({job(0, evict_one)});
  std::vector<int32_t> pos;
  pool.read_layer(gs.sequence(), 0, nullptr, nullptr, &pos);
  std::vector<int32_t> want = pos_before;
  want.erase(want.begin() + 3);
  EXPECT_EQ(pos, want);
  EXPECT_EQ(pool.blocks().slot_map(gs.sequence(), 0).size(), size_t(n - 1));
  pool.blocks().check_invariants();
}

TEST(GpuModel, OutOfDeviceMemoryAtLoadIsAnError) {
  Loaded& l = load(kTiny);
  const size_t weights = l.on(DType::BF16).weight_bytes();
  // Take the device's memory but about half the model's weights, then load: a clear Error.
  std::vector<DeviceBuffer> hog;
  const size_t leave = std::max<size_t>(weights / 2, size_t(4) << 20);
  for (size_t chunk = size_t(1) << 30; chunk >= (size_t(1) << 20);) {
    const size_t free = device_free_bytes();
    if (free < leave + chunk) {
      chunk /= 2;
      continue;
    }
    try {
      hog.emplace_back(chunk, "test hog");
    } catch (const Error&) {
      chunk /= 2;
    }
  }
  std::printf("gpu_model: (f) %zu MiB left free for a %zu MiB model\n", device_free_bytes() >> 20, weights >> 20);
  try {
    GpuModelOptions o;
    o.dtype = DType::F16;
    GpuModel gm(*l.model, o);
    ADD_FAILURE() << "loading succeeded with " << (device_free_bytes() >> 20) << " MiB free";
  } catch (const Error& e) {
    const std::string m = e.what();
    std::printf("gpu_model: (f) load out of memory: %s\n", m.c_str());
    // Usually a weight's allocation ("out of device memory ... for tensor '...'"); the stream or
    // cuBLAS handle made first may be the one that fails instead: still an Error, not a crash.
    const bool named = m.find("out of device memory") != std::string::npos;
    const bool runtime = m.find("cuBLAS") != std::string::npos || m.find("CUDA error") != std::string::npos;
    EXPECT_TRUE(named || runtime) << m;
    if (named) {
      EXPECT_NE(m.find(") for "), std::string::npos) << "the failed allocation names what it was for: " << m;
    }
  }
  hog.clear();
  // Nothing sticky: the device works afterwards.
  GpuModelOptions o;
  o.dtype = DType::F16;
  GpuModel again(*l.model, o);
  EXPECT_EQ(again.weight_bytes(), weights);
}

}  // namespace
}  // namespace pkv::cuda
