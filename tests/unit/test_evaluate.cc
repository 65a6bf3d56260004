// Evaluation and calibration as library modules over the backend seam (src/eval/evaluate.h,
// calibrate.h), and the backend calls they stand on (Backend::prefill_shared, adopt, generate_many),
// on the CPU back end; the testbeds (text, the no-image control) and the answer oracle.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <numeric>
#include <set>

#include "core/error.h"
#include "engine/backend.h"
#include "eval/calibrate.h"
#include "eval/evaluate.h"
#include "eval/metrics.h"
#include "kv/budgeted.h"
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
  const int L = b.model->config().text.n_layers;
  std::vector<double> first(static_cast<size_t>(L), 0.0);  // the first token's share, summed over the samples
  opt.on_scores = [&](const std::string&, const std::vector<std::vector<float>>& s) {
    EXPECT_EQ(int(s.size()), L);
    for (int l = 0; l < L && l < int(s.size()); ++l) {
      double tot = 0;
      for (float x : s[size_t(l)]) tot += x;
      first[size_t(l)] += s[size_t(l)][0] / tot;
    }
    ++seen;
  };
  const CalibrateResult r = calibrate(*backend, b.engine, b.samples, opt);
  EXPECT_EQ(seen, 2);
  EXPECT_EQ(r.profile.samples, 2);
  EXPECT_EQ(int(r.concentration.size()), L);
  ASSERT_EQ(int(r.first_token_share.size()), L);
  for (int l = 0; l < L; ++l) EXPECT_NEAR(r.first_token_share[size_t(l)], first[size_t(l)] / 2, 1e-12) << "layer " << l;
  ASSERT_EQ(r.profile.budgets.size(), 2u);
  for (const auto& pb : r.profile.budgets) {
    double mean = 0;
    for (double k : pb.keep) mean += k;
    EXPECT_NEAR(mean / double(pb.keep.size()), pb.budget, 1e-9);
  }
}

namespace {

// Teacher-forces `answer` over a sequence starting from the prefill's last logits; the summed NLL.
double teacher_forced_nll(Backend& backend, Backend::Sequence& seq, std::vector<float> logits,
                          const std::vector<int32_t>& answer) {
  double nll = 0;
  for (size_t t = 0; t < answer.size(); ++t) {
    nll += token_nll(logits.data(), int(logits.size()), answer[t]);
    if (t + 1 < answer.size()) backend.step(seq, answer[t], logits.data());
  }
  return nll;
}

// Keeps exactly the given prompt entries after the prefill (every layer), nothing evicted later.
class KeepListPolicy : public KVPolicy {
 public:
  explicit KeepListPolicy(std::vector<int32_t> keep) : keep_(std::move(keep)) {}
  std::string name() const override { return "keep-list"; }
  KeepPlan after_prefill(const CacheView& cache, const std::vector<std::vector<float>>&, int N) override {
    KeepPlan plan;
    for (int l = 0; l < cache.n_layers(); ++l) plan.layers.push_back(LayerKeep{l, N, keep_});
    return plan;
  }

 private:
  std::vector<int32_t> keep_;
};

}  // namespace

// The answer estimator: its request starts at the prompt's length (the answer's queries), which no
// prompt prefill measures (run, serve: one error naming --kv-importance answer); evaluation adds
// the reference answer's teacher-forced importance to the shared prefill, and the prefix policies
// then keep, per layer, the protected entries plus the entries the answer attends to most.
TEST(AnswerEstimator, RanksByTheReferenceAnswersAttentionAndIsRefusedWithoutOne) {
  EXPECT_EQ(estimator_from_name("answer"), Estimator::Answer);
  EXPECT_STREQ(estimator_name(Estimator::Answer), "answer");
  EXPECT_EQ(estimator_request(Estimator::Answer, 32, 100).from, 100);
  Bundled& b = bundled();
  const auto backend = make_cpu_backend(*b.model);
  std::string why;
  const auto p = prepare_sample(b.engine, b.samples[1], "", &why);
  ASSERT_TRUE(p) << why;
  const int N = int(p->ids.size()), L = b.model->config().text.n_layers;
  const std::vector<int32_t> answer = b.engine.answer_ids(b.samples[1].answer);
  for (int pool : {0, 7}) {
    SCOPED_TRACE("pool " + std::to_string(pool));
    PolicyOptions o;
    o.budget = 0.2;
    o.estimator = Estimator::Answer;
    o.prefix_pool = pool;
    auto pol = make_policy("uniform-prefix", o);
    ASSERT_EQ(pol->prefill_importance(N).from, N);
    try {
      std::vector<float> logits(size_t(b.model->config().text.vocab_size));
      backend->prefill(*p, *pol, logits.data());
      FAIL() << "a prompt's own prefill ranked by an answer it does not have";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("--kv-importance answer"), std::string::npos) << e.what();
    }
    const auto shared = backend->prefill_shared(*p, {});
    EXPECT_THROW(backend->adopt(*shared, *pol), Error) << "the answer's importance was not added";
    const auto imp = answer_importance(*backend, b.engine, *p, answer);
    ASSERT_EQ(int(imp.size()), L);
    shared->add_importance(N, imp);
    EXPECT_THROW(shared->add_importance(N, imp), Error) << "the same window twice";
    auto pol2 = make_policy("uniform-prefix", o);
    const auto seq = backend->adopt(*shared, *pol2);
    const int n = int(std::lround(0.2 * N));
    for (int l = 0; l < L; ++l) {
      // Expected: positions 0 and N - 1 (protected), then the highest (pooled) answer attention.
      std::vector<float> s = imp[size_t(l)];
      if (pool > 1) s = max_pool_1d(s, pool);
      std::vector<int32_t> order(static_cast<size_t>(N));
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [&](int32_t x, int32_t y) { return s[size_t(x)] > s[size_t(y)]; });
      std::set<int32_t> want = {0, N - 1};
      for (int32_t i : order) {
        if (int(want.size()) >= n) break;
        want.insert(i);
      }
      const auto got = seq->entries().positions(l);
      ASSERT_EQ(std::set<int32_t>(got.begin(), got.end()), want) << "layer " << l;
    }
  }
  // Rows of another length, or no layers, are refused.
  const auto shared = backend->prefill_shared(*p, {0});
  EXPECT_THROW(shared->add_importance(N, std::vector<std::vector<float>>(size_t(L), std::vector<float>(size_t(N - 1)))),
               Error);
  EXPECT_THROW(shared->add_importance(N, {}), Error);
  EXPECT_THROW(answer_importance(*backend, b.engine, *p, {}), Error);
}

// In evaluate(): a config ranked by the answer estimator is the oracle above, teacher-forced (its
// PPL is the NLL computed here), and the no-image control keeps exactly the text's entries.
TEST(Evaluate, AnswerOracleAndNoImageControlAreTheSequencesTheySayTheyAre) {
  Bundled& b = bundled();
  const auto backend = make_cpu_backend(*b.model);
  EvalOptions opt;
  opt.configs = eval_configs({"uniform-prefix"}, {0.2}, {"answer"}, nullptr);
  ASSERT_EQ(opt.configs.size(), 1u);
  opt.base.prefix_pool = 7;
  opt.no_image_control = true;
  opt.max_tokens = 4;
  opt.limit = 1;
  std::vector<std::string> configs;
  opt.on_answer = [&](const std::string&, const std::string& c, const std::vector<int32_t>&, const std::vector<float>&) {
    configs.push_back(c);
  };
  const std::vector<Sample> one(b.samples.begin() + 1, b.samples.begin() + 2);
  const EvalReport rep = evaluate(*backend, b.engine, one, nullptr, opt);
  EXPECT_EQ(configs, (std::vector<std::string>{"full", opt.configs[0].key(), "no-image"}));
  EXPECT_EQ(rep.testbed, "conversations") << "no truth set";
  ASSERT_TRUE(rep.no_image);
  std::string why;
  const auto p = prepare_sample(b.engine, one[0], "", &why);
  ASSERT_TRUE(p) << why;
  const int N = int(p->ids.size()), I = p->image_tokens;
  ASSERT_GT(I, 0);
  const std::vector<int32_t> answer = b.engine.answer_ids(one[0].answer);
  const auto shared = backend->prefill_shared(*p, {});
  shared->add_importance(N, answer_importance(*backend, b.engine, *p, answer));
  {
    PolicyOptions o = opt.base;
    o.budget = 0.2;
    o.estimator = Estimator::Answer;
    auto pol = make_policy("uniform-prefix", o);
    auto seq = backend->adopt(*shared, *pol);
    const double nll = teacher_forced_nll(*backend, *seq, shared->logits, answer);
    EXPECT_DOUBLE_EQ(rep.records[0].second.ppl, std::exp(nll / double(answer.size())));
  }
  std::vector<int32_t> text;
  for (int32_t i = 0; i < N; ++i)
    if (i < p->image_offset || i >= p->image_offset + I) text.push_back(i);
  KeepListPolicy keep(text);
  auto seq = backend->adopt(*shared, keep);
  EXPECT_DOUBLE_EQ(rep.no_image->kv_bytes, double(seq->kv_bytes()));
  EXPECT_DOUBLE_EQ(rep.no_image->kv_bytes, rep.full.kv_bytes * double(N - I) / N);
  const double nll = teacher_forced_nll(*backend, *seq, shared->logits, answer);
  EXPECT_DOUBLE_EQ(rep.no_image->ppl, std::exp(nll / double(answer.size())));
  EXPECT_GT(rep.no_image->ppl, rep.full.ppl) << "the description needs the image";
  // The text testbed has no image to evict.
  TextSet set;
  set.context_tokens = 8;
  set.continuation_tokens = 4;
  set.documents = {{"d", "Some words to read here and there, for a while, and then more words after them."}};
  EXPECT_THROW(evaluate_text(*backend, b.engine, set, opt), Error);
}

// The text testbed: the document's first tokens (BOS first) as the prompt, the next ones
// teacher-forced; the full cache's PPL is the NLL computed here, the compressed configs hold fewer
// entries and diverge; too short a document is skipped with the reason.
TEST(EvaluateText, ContextThenContinuationTeacherForced) {
  Bundled& b = bundled();
  const auto backend = make_cpu_backend(*b.model);
  const TextSet bundled_set = load_text_set(std::string(PKV_SOURCE_DIR) + "/data/text/heldout.json");
  EXPECT_EQ(bundled_set.context_tokens + bundled_set.continuation_tokens, 512) << "the trained length";
  EXPECT_GE(bundled_set.documents.size(), 100u);
  TextSet set;
  set.context_tokens = 48;
  set.continuation_tokens = 12;
  set.documents = {bundled_set.documents[0], {"short", "Too short."}, bundled_set.documents[1]};
  EvalOptions opt;
  opt.configs = eval_configs({"streaming", "uniform-prefix"}, {0.25}, {"window", "answer"}, nullptr);
  ASSERT_EQ(opt.configs.size(), 3u);
  opt.jobs = 2;
  const EvalReport rep = evaluate_text(*backend, b.engine, set, opt);
  EXPECT_EQ(rep.testbed, "text");
  EXPECT_FALSE(rep.greedy);
  EXPECT_EQ(rep.samples, 2);
  ASSERT_EQ(rep.skipped.size(), 1u);
  EXPECT_EQ(rep.skipped[0].first, "short");
  EXPECT_NE(rep.skipped[0].second.find("fewer than context 48"), std::string::npos) << rep.skipped[0].second;
  EXPECT_EQ(rep.answer_tokens, 2 * 12);
  double nll = 0;
  const size_t entry = backend->kv_entry_bytes() * size_t(b.model->config().text.n_layers);
  for (size_t d : {size_t(0), size_t(2)}) {
    PromptRequest req;
    req.text = set.documents[d].text;
    req.tmpl = Template::Raw;
    const PreparedPrompt whole = b.engine.prepare(req);
    ASSERT_EQ(whole.ids[0], b.model->config().text.bos_id);
    PreparedPrompt p;
    p.ids.assign(whole.ids.begin(), whole.ids.begin() + 48);
    PromptRequest marked;  // (a designated initialiser leaves g++ -Wextra naming every other field)
    marked.marked_ids = p.ids;
    const auto emb = b.engine.prepare(marked);
    p.embeddings = emb.embeddings;
    FullPolicy full;
    std::vector<float> logits(size_t(b.model->config().text.vocab_size));
    auto seq = backend->prefill(p, full, logits.data());
    nll += teacher_forced_nll(*backend, *seq, logits, std::vector<int32_t>(whole.ids.begin() + 48, whole.ids.begin() + 60));
  }
  EXPECT_DOUBLE_EQ(rep.full.ppl, std::exp(nll / 24));
  EXPECT_DOUBLE_EQ(rep.full.kv_bytes, double(48 * entry));
  EXPECT_DOUBLE_EQ(rep.full.kv_bytes_end, double((48 + 11) * entry)) << "after the continuation's 11 fed tokens";
  for (const auto& [c, s] : rep.records) {
    SCOPED_TRACE(c.key());
    EXPECT_EQ(s.samples, 2);
    EXPECT_DOUBLE_EQ(s.kv_bytes, double(12 * entry)) << "a quarter of 48 in every layer";
    EXPECT_LT(s.kv_bytes_end, rep.full.kv_bytes_end);
    EXPECT_GT(s.kld, 0.0);
    EXPECT_FALSE(s.accuracy);
  }
  set.context_tokens = 2000;
  EXPECT_THROW(evaluate_text(*backend, b.engine, set, opt), Error) << "past the model's positions";
}

TEST(TextSet, LoadsAndRefusesMalformedFiles) {
  const std::string path = test::temp_path("text.json");
  auto write = [&](const std::string& s) { std::ofstream(path) << s; };
  write(R"({"context_tokens": 8, "continuation_tokens": 4, "documents": [{"id": "a", "text": "x y"}]})");
  EXPECT_TRUE(is_text_set(path));
  const TextSet t = load_text_set(path);
  EXPECT_EQ(t.context_tokens, 8);
  EXPECT_EQ(t.continuation_tokens, 4);
  ASSERT_EQ(t.documents.size(), 1u);
  EXPECT_EQ(t.documents[0].text, "x y");
  auto bad = [&](const std::string& s, const std::string& frag) {
    write(s);
    try {
      load_text_set(path);
      ADD_FAILURE() << "no error for " << s;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(frag), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
    }
  };
  bad(R"([1, 2])", "neither a JSON list of conversations nor a text testbed");
  bad(R"({"context_tokens": 8})", "neither");
  bad(R"({"context_tokens": 0, "continuation_tokens": 4, "documents": [{"id": "a", "text": "x"}]})", "'context_tokens'");
  bad(R"({"context_tokens": 8, "continuation_tokens": "4", "documents": [{"id": "a", "text": "x"}]})", "'continuation_tokens'");
  bad(R"({"context_tokens": 8, "continuation_tokens": 4, "documents": []})", "'documents' must be a non-empty list");
  bad(R"({"context_tokens": 8, "continuation_tokens": 4, "documents": [{"id": "a"}]})", "document 0");
  bad(R"({"context_tokens": 8, "continuation_tokens": 4, "documents": [{"id": "a", "text": ""}]})", "has no text");
  bad(R"({"context_tokens": 8, )", "not valid JSON");
  write("  [ ]");
  EXPECT_FALSE(is_text_set(path));
}
