// The engine's KV policy hooks on a real (fixture) model: a policy can remove any entries of one
// layer after prefill and during decoding; attention then reads exactly what each layer holds.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <numeric>

#include "core/error.h"
#include "engine/engine.h"
#include "engine/prompt.h"
#include "test_util.h"

using namespace pkv;

namespace {

// Keeps everything, but through a plan naming every layer: must change nothing.
class RetainAllPolicy : public KVPolicy {
 public:
  std::string name() const override { return "retain-all"; }
  KeepPlan after_prefill(const CacheView& c, const std::vector<std::vector<float>>&, int) override { return all(c); }
  KeepPlan after_decode_step(const CacheView& c, int, const std::vector<std::vector<float>>*) override { return all(c); }
  static KeepPlan all(const CacheView& c) {
    KeepPlan plan;
    for (int l = 0; l < c.n_layers(); ++l) {
      std::vector<int32_t> keep(static_cast<size_t>(c.size(l)));
      std::iota(keep.begin(), keep.end(), 0);
      plan.layers.push_back(LayerKeep{l, c.size(l), keep, false});
    }
    return plan;
  }
};

// Layer 1 keeps the first token and the second half of the prompt after prefill, and drops its
// oldest non-first entry at every decode step; layer 0 keeps everything.
class DropInLayerOne : public KVPolicy {
 public:
  std::string name() const override { return "drop-l1"; }
  KeepPlan after_prefill(const CacheView&, const std::vector<std::vector<float>>&, int n) override {
    std::vector<int32_t> keep = {0};
    for (int i = n / 2; i < n; ++i) keep.push_back(i);
    prefill_kept = int(keep.size());
    return KeepPlan{{LayerKeep{1, n, keep, false}}};
  }
  KeepPlan after_decode_step(const CacheView& c, int, const std::vector<std::vector<float>>*) override {
    std::vector<int32_t> keep = {0};
    for (int i = 2; i < c.size(1); ++i) keep.push_back(i);
    // The positions layer 1 will hold once the plan is applied.
    positions_seen.clear();
    for (int32_t i : keep) positions_seen.push_back(c.positions(1)[size_t(i)]);
    return KeepPlan{{LayerKeep{1, c.size(1), keep, false}}};
  }
  int prefill_kept = 0;
  std::vector<int32_t> positions_seen;
};

struct Fixture {
  std::unique_ptr<Model> model = Model::load(test::data_path("fixtures/llama_text"));
  Tokenizer tok{test::data_path("fixtures/llama_text/tokenizer.model")};
};

}  // namespace

TEST(EnginePolicy, RetainEverythingIsBitIdenticalToFull) {
  Fixture f;
  Engine e(*f.model, f.tok);
  PromptRequest req;
  req.text = "The quick brown fox jumps over the lazy dog";
  req.tmpl = Template::Raw;
  PreparedPrompt p = e.prepare(req);
  SamplingOptions s;
  s.max_tokens = 12;
  s.ignore_eos = true;
  FullPolicy full;
  RetainAllPolicy same;
  GenerationResult a = e.generate(p, s, full), b = e.generate(p, s, same);
  EXPECT_EQ(a.tokens, b.tokens);
  EXPECT_EQ(a.first_logits, b.first_logits);
  EXPECT_EQ(a.kv_bytes, b.kv_bytes);
}

TEST(EnginePolicy, EvictionInOneLayerShrinksItAndChangesTheAnswer) {
  Fixture f;
  Engine e(*f.model, f.tok);
  PromptRequest req;
  req.text = "The quick brown fox jumps over the lazy dog and runs far away into the woods";
  req.tmpl = Template::Raw;
  PreparedPrompt p = e.prepare(req);
  const int T = int(p.ids.size());
  SamplingOptions s;
  s.max_tokens = 10;
  s.ignore_eos = true;
  FullPolicy full;
  DropInLayerOne drop;
  GenerationResult a = e.generate(p, s, full), b = e.generate(p, s, drop);
  // Full: every layer holds prompt + generated - 1 (the last token is never fed back).
  EXPECT_EQ(a.kv_entries_per_layer[0], T + 9);
  EXPECT_EQ(a.kv_entries_per_layer[1], T + 9);
  // Layer 0 untouched; layer 1 holds what the policy kept (each step adds one and drops one).
  EXPECT_EQ(b.kv_entries_per_layer[0], T + 9);
  EXPECT_EQ(b.kv_entries_per_layer[1], drop.prefill_kept);
  // Bytes per layer are proportional to entries held.
  EXPECT_EQ(b.kv_bytes_per_layer[1] * size_t(T + 9), b.kv_bytes_per_layer[0] * size_t(drop.prefill_kept));
  // Absolute positions survive eviction; the newest entry has its true position.
  ASSERT_FALSE(drop.positions_seen.empty());
  EXPECT_EQ(drop.positions_seen.front(), 0);
  EXPECT_EQ(drop.positions_seen.back(), T + 8);
  EXPECT_TRUE(std::is_sorted(drop.positions_seen.begin(), drop.positions_seen.end()));
  // The first token's logits come from the uncompressed prefill; later ones see the smaller cache.
  EXPECT_EQ(a.first_logits, b.first_logits);
  EXPECT_NE(a.tokens, b.tokens);
}

// Continuous batching: Session::step_many (one batched decoder pass) gives bit for bit the logits
// and caches of stepping each session alone, for sequences of different lengths and policies
// (one that needs decode-time importance), on fp32, fp16 and bf16 checkpoints.
TEST(EngineBatch, StepManyIsBitIdenticalToSeparateSteps) {
  for (const char* fx : {"llama_text", "llava_orig_sharded", "llava_v5_native"}) {
    SCOPED_TRACE(fx);
    auto model = Model::load(test::data_path(std::string("fixtures/") + fx));
    Tokenizer tok(test::data_path(std::string("fixtures/") + fx + "/tokenizer.model"));
    Engine engine(*model, tok);
    const int V = model->config().text.vocab_size;
    // five sequences: the batched products run four rows at a time plus a remainder
    const std::vector<std::string> texts = {"The quick brown fox", "Once upon a time, in a land far away, there lived",
                                            "A short story about a cat and a dog", "Hello", "One two three four five six"};
    const std::vector<std::string> names = {"full", "snapkv", "h2o", "streaming", "uniform-prefix"};
    PolicyOptions po;
    po.budget = 0.5;
    po.window = 2;
    std::vector<std::unique_ptr<KVPolicy>> pol_a, pol_b;
    std::vector<std::unique_ptr<Session>> a, b;
    std::vector<float> la(texts.size() * size_t(V)), lb(texts.size() * size_t(V));
    for (size_t i = 0; i < texts.size(); ++i) {
      PromptRequest req;
      req.text = texts[i];
      req.tmpl = Template::Raw;
      const PreparedPrompt p = engine.prepare(req);
      pol_a.push_back(make_policy(names[i], po));
      pol_b.push_back(make_policy(names[i], po));
      a.push_back(std::make_unique<Session>(*model, *pol_a.back()));
      b.push_back(std::make_unique<Session>(*model, *pol_b.back()));
      a.back()->prefill(p, &la[i * size_t(V)]);
      b.back()->prefill(p, &lb[i * size_t(V)]);
    }
    std::vector<Session*> batch;
    for (auto& s : a) batch.push_back(s.get());
    for (int step = 0; step < 6; ++step) {
      std::vector<int32_t> tokens;
      for (size_t i = 0; i < texts.size(); ++i) {
        const float* l = &lb[i * size_t(V)];
        tokens.push_back(int32_t(std::max_element(l, l + V) - l));
      }
      Session::step_many(batch, tokens.data(), la.data());
      for (size_t i = 0; i < texts.size(); ++i) b[i]->step(tokens[i], &lb[i * size_t(V)]);
      ASSERT_EQ(0, std::memcmp(la.data(), lb.data(), la.size() * sizeof(float))) << "step " << step;
      for (size_t i = 0; i < texts.size(); ++i)
        for (int l = 0; l < model->config().text.n_layers; ++l) {
          const KVLayer &x = a[i]->cache().layer(l), &y = b[i]->cache().layer(l);
          ASSERT_EQ(x.size(), y.size());
          ASSERT_TRUE(std::equal(x.positions(), x.positions() + x.size(), y.positions()));
          ASSERT_EQ(0, std::memcmp(x.keys(), y.keys(), sizeof(float) * size_t(x.size()) * size_t(x.kv_dim())));
        }
    }
    EXPECT_LT(a[1]->cache().layer(0).size(), a[1]->position()) << "snapkv evicted";
    EXPECT_LT(a[2]->cache().layer(0).size(), a[2]->position()) << "h2o evicted";
    EXPECT_EQ(a[0]->cache().layer(0).size(), a[0]->position()) << "full kept everything";
  }
}

// The templates (engine/prompt.h) give the texts docs/FORMATS.md and the references spell out; a
// conversation splits after each assistant turn, where the end-of-sequence token goes.
TEST(Prompt, TemplatesRenderTheDocumentedText) {
  EXPECT_EQ(Engine::apply_template("hi", Template::LlavaV1, true), "USER: <image>\nhi ASSISTANT:");
  EXPECT_EQ(Engine::apply_template("hi", Template::LlavaV1, false), "USER: hi ASSISTANT:");
  EXPECT_EQ(Engine::apply_template("", Template::LlavaV1, true), "USER: <image>\n ASSISTANT:");
  EXPECT_EQ(Engine::apply_template("hi", Template::Raw, true), "<image>\nhi");
  EXPECT_EQ(Engine::apply_template("a <image> b", Template::Raw, true), "a <image> b");
  EXPECT_EQ(Engine::apply_template("a <image> b", Template::Raw, false), "a <image> b");
  EXPECT_EQ(Engine::apply_template("hi", Template::Raw, false), "hi");
  // LLaVA v1 always puts the image first; a second marker in the text is refused when tokenizing.
  EXPECT_EQ(Engine::apply_template("a <image> b", Template::LlavaV1, true), "USER: <image>\na <image> b ASSISTANT:");

  const Conversation conv = {{Turn::Role::User, {{false, "a"}, {true, {}}}},
                             {Turn::Role::Assistant, {{false, "b"}}},
                             {Turn::Role::System, {{false, "s"}}},
                             {Turn::Role::User, {{false, "c"}}}};
  EXPECT_EQ(render_prompt(conv, Template::LlavaV1),
            (std::vector<std::string>{"s USER: a\n<image> ASSISTANT: b", "USER: c ASSISTANT:"}));
  EXPECT_THROW(render_prompt(conv, Template::Raw), Error);
}
