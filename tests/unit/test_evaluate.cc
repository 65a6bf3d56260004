// Evaluation and calibration as library modules over the backend seam (src/eval/evaluate.h,
// calibrate.h), and the backend calls they stand on (Backend::prefill_shared, adopt, generate_many),
// on the CPU back end.
#include <gtest/gtest.h>

#include <cmath>
#include <numeric>
#include <set>

#include "core/error.h"
#include "engine/backend.h"
#include "eval/calibrate.h"
#include "eval/evaluate.h"
#include "eval/metrics.h"
#include "test_util.h"

using namespace pkv;

namespace {

struct Bundled {
  std::unique_ptr<Model> model = Model::load(std::string(PKV_SOURCE_DIR) + "/models/prefixkv-llava-tiny");
  Tokenizer tok{std::string(PKV_SOURCE_DIR) + "/models/prefixkv-llava-tiny/tokenizer.model"};
  Engine engine{*model, tok};
  std::vector<Sample> samples = load_conversations(std::string(PKV_SOURCE_DIR) + "/data/eval/eval.json");
};

Bundled& bundled() {
  static Bundled b;
  return b;
}

PreparedPrompt text_prompt(const Engine& engine, const std::string& text) {
  PromptRequest req;
  req.text = text;
  req.tmpl = Template::LlavaV1;
  return engine.prepare(req);
}

std::unique_ptr<KVPolicy> policy(const std::string& name, double budget) {
  PolicyOptions o;
  o.budget = budget;
  o.window = 4;
  return make_policy(name, o);
}

int argmax(const std::vector<float>& x) { return int(std::max_element(x.begin(), x.end()) - x.begin()); }

}  // namespace

// A sequence adopted from a shared prefill is the sequence prefill() makes: same logits, same kept
// positions, and bit-identical steps afterwards (the CPU is deterministic).
TEST(BackendSharedPrefill, AdoptedSequencesEqualTheirOwnPrefill) {
  Bundled& b = bundled();
  const auto backend = make_cpu_backend(*b.model);
  const PreparedPrompt p = text_prompt(b.engine, "Tell me about the red circle and the blue square in the picture, please.");
  const int N = int(p.ids.size());
  const std::vector<std::string> names = {"snapkv", "h2o", "elastic", "streaming", "uniform-prefix", "prefixkv-online"};
  std::set<int> windows;
  for (const auto& n : names)
    if (auto r = policy(n, 0.3)->prefill_importance(N); r.needed) windows.insert(r.from);
  ASSERT_GE(windows.size(), 2u) << "the policies ask for two windows (all queries, the last ones)";
  const auto shared = backend->prefill_shared(p, std::vector<int>(windows.begin(), windows.end()));
  ASSERT_EQ(shared->importance.size(), windows.size());
  for (const auto& n : names) {
    SCOPED_TRACE(n);
    auto pa = policy(n, 0.3), pb = policy(n, 0.3);
    std::vector<float> la(shared->logits.size()), lb = shared->logits;
    auto a = backend->prefill(p, *pa, la.data());
    auto c = backend->adopt(*shared, *pb);
    ASSERT_EQ(la, shared->logits);
    for (int step = 0; step < 5; ++step) {
      ASSERT_EQ(a->entries_per_layer(), c->entries_per_layer());
      for (int l = 0; l < a->entries().n_layers(); ++l)
        ASSERT_TRUE(std::equal(a->entries().positions(l).begin(), a->entries().positions(l).end(),
                               c->entries().positions(l).begin()));
      const int32_t t = argmax(la);
      backend->step(*a, t, la.data());
      backend->step(*c, t, lb.data());
      ASSERT_EQ(la, lb) << "step " << step;
    }
  }
  // A window that was not measured is an error naming it, not an empty importance.
  try {
    shared->importance_for(N - 1);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("from query " + std::to_string(N - 1)), std::string::npos) << e.what();
  }
}

// generate_many decodes each sequence exactly as generate() alone (batched steps are bit-identical
// on the CPU); sequences stop at different lengths.
TEST(BackendGenerateMany, EqualsGeneratingEachAlone) {
  Bundled& b = bundled();
  const auto backend = make_cpu_backend(*b.model);
  const PreparedPrompt p = text_prompt(b.engine, "Describe a picture with three shapes.");
  SamplingOptions s;
  s.max_tokens = 20;
  const std::vector<std::string> names = {"full", "snapkv", "streaming", "h2o"};
  const auto shared = backend->prefill_shared(p, {0, std::max(0, int(p.ids.size()) - 4)});
  std::vector<std::unique_ptr<KVPolicy>> pols;
  std::vector<std::unique_ptr<Backend::Sequence>> seqs;
  std::vector<Backend::Sequence*> ptrs;
  std::vector<float> logits;
  for (const auto& n : names) {
    pols.push_back(policy(n, 0.2));
    seqs.push_back(backend->adopt(*shared, *pols.back()));
    ptrs.push_back(seqs.back().get());
    logits.insert(logits.end(), shared->logits.begin(), shared->logits.end());
  }
  size_t watched = 0;
  const auto many = generate_many(*backend, b.tok, ptrs, std::vector<int>(names.size(), int(p.ids.size())), logits, s,
                                  [&](size_t, const float*) { ++watched; });
  size_t tokens = 0;
  for (size_t i = 0; i < names.size(); ++i) {
    SCOPED_TRACE(names[i]);
    auto pol = policy(names[i], 0.2);
    const GenerationResult one = generate(*backend, b.tok, p, s, *pol);
    EXPECT_EQ(many[i].tokens, one.tokens);
    EXPECT_EQ(many[i].text, one.text);
    EXPECT_EQ(many[i].stop_reason, one.stop_reason);
    EXPECT_EQ(many[i].kv_entries_per_layer, one.kv_entries_per_layer);
    EXPECT_EQ(many[i].kv_bytes, one.kv_bytes);
    tokens += one.tokens.size();
  }
  EXPECT_EQ(watched, tokens) << "one row of logits seen per token chosen";
}

// The evaluation's numbers do not depend on how the work is split (threads over samples, policies
// per batch), and the full cache's PPL is the teacher-forced NLL computed here directly.
TEST(Evaluate, SplittingTheWorkChangesNothingAndThePplIsTheTeacherForcedNll) {
  Bundled& b = bundled();
  const auto backend = make_cpu_backend(*b.model);
  EvalOptions opt;
  opt.configs = eval_configs({"full", "snapkv", "streaming", "uniform-prefix"}, {0.3}, {"window", "normalized"}, nullptr);
  ASSERT_EQ(opt.configs.size(), 4u);  // not full (the reference); uniform-prefix with both estimators
  opt.max_tokens = 8;
  opt.limit = 2;
  opt.jobs = 1;
  opt.batch = 1;
  int answers = 0;
  opt.on_answer = [&](const std::string&, const std::string&, const std::vector<int32_t>& t, const std::vector<float>& m) {
    EXPECT_EQ(t.size(), m.size());
    for (float g : m) EXPECT_GE(g, 0.f);
    ++answers;
  };
  const EvalReport one = evaluate(*backend, b.engine, b.samples, nullptr, opt);
  EXPECT_EQ(answers, 2 * 5);
  opt.on_answer = nullptr;
  opt.jobs = 2;
  opt.batch = 3;
  const EvalReport split = evaluate(*backend, b.engine, b.samples, nullptr, opt);
  ASSERT_EQ(one.samples, 2);
  ASSERT_EQ(split.samples, 2);
  EXPECT_EQ(one.full.ppl, split.full.ppl);
  EXPECT_EQ(one.answer_tokens, split.answer_tokens);
  ASSERT_EQ(one.records.size(), opt.configs.size());
  for (size_t i = 0; i < one.records.size(); ++i) {
    SCOPED_TRACE(one.records[i].first.key());
    const EvalScores &x = one.records[i].second, &y = split.records[i].second;
    EXPECT_EQ(x.ppl, y.ppl);
    EXPECT_EQ(x.kld, y.kld);
    EXPECT_EQ(x.top1, y.top1);
    EXPECT_EQ(x.rouge_l, y.rouge_l);
    EXPECT_EQ(x.kv_bytes, y.kv_bytes);
    EXPECT_EQ(x.kv_bytes_end, y.kv_bytes_end);
    EXPECT_GT(x.kld, 0.0);
    EXPECT_LT(x.kv_bytes, one.full.kv_bytes);
  }
  // The full cache's PPL, directly: prefill, then the reference answer teacher-forced.
  double nll = 0;
  int64_t n = 0;
  for (size_t i = 0; i < 2; ++i) {
    std::string why;
    const auto p = prepare_sample(b.engine, b.samples[i], "", &why);
    ASSERT_TRUE(p) << why;
    const std::vector<int32_t> a = b.engine.answer_ids(b.samples[i].answer);
    FullPolicy full;
    Session s(*b.model, full);
    std::vector<float> logits(size_t(b.model->config().text.vocab_size));
    s.prefill(*p, logits.data());
    for (size_t t = 0; t < a.size(); ++t) {
      nll += token_nll(logits.data(), int(logits.size()), a[t]);
      if (t + 1 < a.size()) s.step(a[t], logits.data());
    }
    n += int64_t(a.size());
  }
  EXPECT_EQ(one.answer_tokens, n);
  EXPECT_DOUBLE_EQ(one.full.ppl, std::exp(nll / double(n)));
}

TEST(Evaluate, BadOptionsAreErrorsNamingTheOption) {
  Bundled& b = bundled();
  const auto backend = make_cpu_backend(*b.model);
  EvalOptions opt;
  auto expect = [&](const std::string& frag) {
    try {
      evaluate(*backend, b.engine, b.samples, nullptr, opt);
      ADD_FAILURE() << "no error for " << frag;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(frag), std::string::npos) << e.what();
    }
  };
  expect("--policies");  // no config
  opt.configs = {{"snapkv", "", 0.5}};
  opt.batch = 0;
  expect("--batch");
  opt.batch = 4;
  opt.configs = {{"prefixkv", "window", 0.5}};
  expect("needs a profile");
  EXPECT_THROW(eval_configs({"no-such-policy"}, {0.5}, {"window"}, nullptr), Error);
}

// Calibration's answer allocation: the attention the reference answer's queries pay the prompt's
// keys, teacher-forced over the full cache, computed here with one decoder call over prompt and
// answer; the prompt allocation: the estimator's scores of the prefill's importance.
TEST(Calibrate, ScoresAreTheDecodersImportance) {
  Bundled& b = bundled();
  const auto backend = make_cpu_backend(*b.model);
  std::string why;
  const auto p = prepare_sample(b.engine, b.samples[0], "", &why);
  ASSERT_TRUE(p) << why;
  const int N = int(p->ids.size()), H = b.model->config().text.hidden;
  CalibrateOptions opt;
  opt.allocation = "answer";
  const auto got = calibration_scores(*backend, b.engine, *p, b.samples[0].answer, opt);
  {
    const std::vector<int32_t> a = b.engine.answer_ids(b.samples[0].answer);
    const int T = N + int(a.size());
    std::vector<float> x(size_t(T) * size_t(H));
    std::copy(p->embeddings.begin(), p->embeddings.end(), x.begin());
    b.model->embed(a.data(), int(a.size()), x.data() + size_t(N) * size_t(H));
    std::vector<int32_t> pos(static_cast<size_t>(T));
    std::iota(pos.begin(), pos.end(), 0);
    KVCache cache = b.model->make_cache();
    std::vector<std::vector<float>> imp;
    DecoderCall call;
    call.importance = &imp;
    call.importance_from = N;
    b.model->decode(x.data(), T, pos.data(), cache, call);
    ASSERT_EQ(got.size(), imp.size());
    for (size_t l = 0; l < imp.size(); ++l) {
      imp[l].resize(size_t(N));
      EXPECT_EQ(got[l], imp[l]) << "layer " << l;
    }
  }
  opt.allocation = "prompt";
  opt.estimator = Estimator::Window;
  opt.window = 8;
  const auto prompt = calibration_scores(*backend, b.engine, *p, "", opt);
  FullPolicy full;
  Session s(*b.model, full);
  const auto raw = s.prefill_uncompressed(*p, nullptr, {N - 8});
  ASSERT_EQ(prompt.size(), raw[0].size());
  for (size_t l = 0; l < raw[0].size(); ++l) EXPECT_EQ(prompt[l], estimator_scores(Estimator::Window, raw[0][l], N));
  opt.allocation = "neither";
  EXPECT_THROW(calibration_scores(*backend, b.engine, *p, "", opt), Error);
}

// The whole calibration: every budget's keep fractions average to the budget, one per layer.
TEST(Calibrate, ProfileFromTwoSamples) {
  Bundled& b = bundled();
  const auto backend = make_cpu_backend(*b.model);
  CalibrateOptions opt;
  opt.budgets = {0.2, 0.5};
  opt.limit = 2;
  opt.data = "eval.json";
  int seen = 0;
  opt.on_scores = [&](const std::string&, const std::vector<std::vector<float>>& s) {
    EXPECT_EQ(int(s.size()), b.model->config().text.n_layers);
    ++seen;
  };
  const CalibrateResult r = calibrate(*backend, b.engine, b.samples, opt);
  EXPECT_EQ(seen, 2);
  EXPECT_EQ(r.profile.samples, 2);
  EXPECT_EQ(int(r.concentration.size()), b.model->config().text.n_layers);
  ASSERT_EQ(r.profile.budgets.size(), 2u);
  for (const auto& pb : r.profile.budgets) {
    double mean = 0;
    for (double k : pb.keep) mean += k;
    EXPECT_NEAR(mean / double(pb.keep.size()), pb.budget, 1e-9);
  }
}
