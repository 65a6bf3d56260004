// prefixkv serve --device cuda: the scheduler with its GPU back end (src/engine/cuda_backend.h). The
// bundled model's requests, batched on the GPU, give the CPU engine's answers (greedy, F16), the
// KV reservations hold the pool's blocks, and a request larger than the whole pool is refused.
// Runs on the GPU (pkv_cuda_tests) and on the fake device (pkv_cuda_model_emu_tests).
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <mutex>
#include <cstdio>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "engine/cuda_backend.h"
#include "engine/engine.h"
#include "kv/policy.h"
#include "serve/api.h"
#include "serve/scheduler.h"
#include "text/tokenizer.h"
#include "vision/image.h"

namespace pkv::serve {
namespace {

std::string repo(const std::string& rel) { return std::string(PKV_SOURCE_DIR) + "/" + rel; }

serve::Event drain(Job& job, std::string* streamed) {
  for (;;) {
    std::optional<Event> e = job.next_event(std::chrono::seconds(300));
    if (!e) return Event{Event::Kind::Error, {}, {}, ApiError(0, "timed out")};
    if (e->kind == Event::Kind::Text)
      *streamed += e->text;
    else
      return std::move(*e);
  }
}

TEST(GpuServe, BatchedAnswersEqualTheCpuEngineAndReservationsHold) {
  const std::unique_ptr<Model> model = Model::load(repo("models/prefixkv-llava-tiny"));
  const Tokenizer tok(repo("models/prefixkv-llava-tiny/tokenizer.model"));
  Engine engine(*model, tok);
  cuda::CudaBackendOptions go;
  go.dtype = DType::F16;
  go.kv_pool_bytes = size_t(64) << 20;
  std::shared_ptr<Backend> backend = cuda::make_cuda_backend(*model, go);
  ASSERT_EQ(backend->name(), "cuda");
  const TextConfig& t = model->config().text;
  EXPECT_EQ(backend->kv_entry_bytes(), size_t(2) * t.n_kv_heads * t.head_dim * 2 + 4);  // 16-bit K, V; int32 position
  SchedulerOptions so;
  so.backend = backend;
  so.kv_pool_bytes = backend->kv_pool_bytes();
  EXPECT_GT(so.kv_pool_bytes, 0u);
  Scheduler sched(*model, tok, so);
  sched.start();

  struct Case {
    std::string prompt;
    std::string policy;
    bool image;
  };
  const std::vector<Case> cases = {{"Describe the image in detail.", "full", true},
                                   {"What is in the top left corner?", "snapkv", true},
                                   {"Hello there", "full", false}};
  Image image = load_image(repo("data/example.png"));
  std::vector<std::shared_ptr<Job>> jobs;
  std::vector<GenerationResult> expected;
  for (const Case& c : cases) {
    auto job = std::make_shared<Job>();
    if (c.image) job->image = image;
    job->prompt.text = c.prompt;
    job->prompt.image = c.image ? &job->image : nullptr;
    job->sampling.max_tokens = 24;
    PolicyOptions po;
    po.budget = 0.5;
    job->policy = make_policy(c.policy, po);
    const PreparedPrompt p = engine.prepare(job->prompt);
    job->prompt_tokens = int(p.ids.size());
    job->kv = kv_reservation(t, job->prompt_tokens, job->sampling.max_tokens, c.policy == "full" ? 1.0 : 0.5, 2,
                             backend->kv_entry_bytes(), backend->kv_block());
    auto ref_policy = make_policy(c.policy, po);
    expected.push_back(engine.generate(p, job->sampling, *ref_policy));
    jobs.push_back(job);
  }
  for (auto& j : jobs) sched.submit(j);
  for (size_t i = 0; i < jobs.size(); ++i) {
    std::string streamed;
    Event e = drain(*jobs[i], &streamed);
    ASSERT_EQ(e.kind, Event::Kind::Done) << (e.error ? e.error->what() : "");
    EXPECT_EQ(streamed, e.completion.text);
    EXPECT_FALSE(e.completion.text.empty());
    EXPECT_LE(e.completion.kv_bytes, jobs[i]->kv.final_bytes) << cases[i].policy;
    if (cases[i].policy == "full") {  // the CPU's greedy answer (F16 logits stay within 2e-3)
      EXPECT_EQ(e.completion.text, expected[i].text) << cases[i].prompt;
      EXPECT_EQ(e.completion.completion_tokens, int(expected[i].tokens.size()));
    } else {
      for (int n : e.completion.kv_entries_per_layer) EXPECT_LT(n, e.completion.prompt_tokens) << "compressed";
    }
    std::printf("gpu_serve: request %zu (%s, %s): %d tokens, KV %zu of %zu bytes reserved; same as the CPU: %s\n", i,
                cases[i].policy.c_str(), cases[i].image ? "image" : "text", e.completion.completion_tokens,
                e.completion.kv_bytes, jobs[i]->kv.final_bytes, e.completion.text == expected[i].text ? "yes" : "no");
  }
  for (int i = 0; i < 200 && sched.stats().running > 0; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  const SchedulerStats st = sched.stats();
  EXPECT_EQ(st.finished_total, jobs.size());
  EXPECT_EQ(st.kv_reserved_bytes, 0u);

  // Larger than the whole pool: refused at submit, the scheduler keeps serving.
  auto big = std::make_shared<Job>();
  big->prompt.text = "Hello";
  big->sampling.max_tokens = 100000;
  big->policy = make_policy("full", PolicyOptions{});
  big->prompt_tokens = 8;
  big->kv = kv_reservation(t, 8, 100000, 1.0, 2, backend->kv_entry_bytes(), backend->kv_block());
  try {
    sched.submit(big);
    FAIL() << "a request larger than the pool was accepted";
  } catch (const ApiError& e) {
    EXPECT_EQ(e.status(), 400) << e.what();
  }
  sched.shutdown();
}

// Chunked prefill in the scheduler (SchedulerOptions::prefill_chunk; Backend::prefill_pieces): a
// request decoding when a long prompt (the image's 590 tokens) arrives takes decode steps between
// the long prompt's pieces (seen through SchedulerOptions::trace), and every request's answer is
// its answer alone (generate() on the same back end: one whole prefill, then steps one at a time).
// Greedy tokens, so equal text: the pieces change the logits only by float32 summation orders
// (test_gpu_prefill.cc bounds them); a changed token would need a near-tie.
TEST(GpuServe, ChunkedPrefillInterleavesWithTheRunningRequestsSteps) {
  const std::unique_ptr<Model> model = Model::load(repo("models/prefixkv-llava-tiny"));
  const Tokenizer tok(repo("models/prefixkv-llava-tiny/tokenizer.model"));
  Engine engine(*model, tok);
  cuda::CudaBackendOptions go;
  go.dtype = DType::F16;
  go.kv_pool_bytes = size_t(64) << 20;
  std::shared_ptr<Backend> backend = cuda::make_cuda_backend(*model, go);
  ASSERT_TRUE(backend->chunked_prefill());
  const TextConfig& t = model->config().text;
  constexpr int kChunk = 128;
  std::mutex mu;
  std::vector<SchedulerTrace> trace;
  SchedulerOptions so;
  so.backend = backend;
  so.kv_pool_bytes = backend->kv_pool_bytes();
  so.prefill_chunk = kChunk;
  so.trace = [&](const SchedulerTrace& e) {
    std::lock_guard lk(mu);
    trace.push_back(e);
  };
  Scheduler sched(*model, tok, so);
  sched.start();

  Image image = load_image(repo("data/example.png"));
  auto make_job = [&](const std::string& text, bool with_image, const std::string& policy, int max_tokens) {
    auto job = std::make_shared<Job>();
    if (with_image) job->image = image;
    job->prompt.text = text;
    job->prompt.image = with_image ? &job->image : nullptr;
    job->sampling.max_tokens = max_tokens;
    job->sampling.ignore_eos = true;  // the running request must still run when the long prompt comes
    PolicyOptions po;
    po.budget = 0.5;
    job->policy = make_policy(policy, po);
    job->prompt_tokens = int(engine.prepare(job->prompt).ids.size());
    job->kv = kv_reservation(t, job->prompt_tokens, max_tokens, policy == "full" ? 1.0 : 0.5, 2,
                             backend->kv_entry_bytes(), backend->kv_block());
    return job;
  };
  auto running = make_job("Hello there", false, "full", 48);
  auto long_prompt = make_job("Describe the image in detail.", true, "snapkv", 12);
  sched.submit(running);
  std::string streamed_a, streamed_b;
  {
    std::optional<Event> first = running->next_event(std::chrono::seconds(300));  // decoding now
    ASSERT_TRUE(first && first->kind == Event::Kind::Text);
    streamed_a = first->text;
  }
  sched.submit(long_prompt);
  Event ea = drain(*running, &streamed_a), eb = drain(*long_prompt, &streamed_b);
  ASSERT_EQ(ea.kind, Event::Kind::Done) << (ea.error ? ea.error->what() : "");
  ASSERT_EQ(eb.kind, Event::Kind::Done) << (eb.error ? eb.error->what() : "");
  sched.shutdown();

  // The long prompt went in pieces of kChunk, each followed by a step of the running request.
  const int T = long_prompt->prompt_tokens;
  ASSERT_GT(T, 4 * kChunk);
  std::vector<size_t> pieces;  // trace indices of the long prompt's passes
  int prefilled = 0;
  for (size_t i = 0; i < trace.size(); ++i)
    if (trace[i].kind == SchedulerTrace::Kind::Prefill)
      for (size_t j = 0; j < trace[i].jobs.size(); ++j)
        if (trace[i].jobs[j] == long_prompt.get()) {
          pieces.push_back(i);
          prefilled += trace[i].tokens[j];
          EXPECT_LE(trace[i].tokens[j], kChunk);
        }
  EXPECT_EQ(prefilled, T);
  EXPECT_EQ(int(pieces.size()), (T + kChunk - 1) / kChunk);
  int interleaved = 0;
  for (size_t k = 0; k + 1 < pieces.size(); ++k) {
    bool stepped = false;
    for (size_t i = pieces[k] + 1; i < pieces[k + 1]; ++i)
      stepped = stepped || (trace[i].kind == SchedulerTrace::Kind::Step &&
                            std::find(trace[i].jobs.begin(), trace[i].jobs.end(), running.get()) != trace[i].jobs.end());
    interleaved += stepped;
    EXPECT_TRUE(stepped) << "no decode step of the running request between pieces " << k << " and " << k + 1;
  }
  const SchedulerStats st = sched.stats();
  EXPECT_GE(st.prefill_passes_total, pieces.size());
  EXPECT_EQ(st.kv_reserved_bytes, 0u);

  // Each answer alone.
  for (auto* job : {running.get(), long_prompt.get()}) {
    const bool img = job == long_prompt.get();
    PromptRequest req = job->prompt;
    Image again;
    if (img) {
      again = image;
      req.image = &again;
      backend->use_for_images(req);
    }
    const PreparedPrompt p = engine.prepare(req);
    auto policy = make_policy(img ? "snapkv" : "full", [] {
      PolicyOptions po;
      po.budget = 0.5;
      return po;
    }());
    const GenerationResult alone = generate(*backend, tok, p, job->sampling, *policy);
    EXPECT_EQ((img ? eb : ea).completion.text, alone.text) << (img ? "the long prompt" : "the running request");
  }
  EXPECT_EQ(streamed_a, ea.completion.text);
  EXPECT_EQ(streamed_b, eb.completion.text);
  std::printf("gpu_serve: chunked prefill: a %d-token prompt in %zu pieces of <= %d, %d of the %zu gaps between them "
              "with a decode step of the running request; both answers equal their answers alone\n",
              T, pieces.size(), kChunk, interleaved, pieces.size() - 1);
}

// Requests waiting together are prefilled together: one pass (Backend::prefill_pieces, a batched
// prefill) runs the three prompts, each under its own policy, and each answer is its answer alone.
TEST(GpuServe, WaitingPromptsArePrefilledInOnePass) {
  const std::unique_ptr<Model> model = Model::load(repo("models/prefixkv-llava-tiny"));
  const Tokenizer tok(repo("models/prefixkv-llava-tiny/tokenizer.model"));
  Engine engine(*model, tok);
  cuda::CudaBackendOptions go;
  go.dtype = DType::BF16;
  go.kv_pool_bytes = size_t(32) << 20;
  std::shared_ptr<Backend> backend = cuda::make_cuda_backend(*model, go);
  std::vector<SchedulerTrace> trace;  // written by the scheduler thread, read after shutdown
  SchedulerOptions so;
  so.backend = backend;
  so.kv_pool_bytes = backend->kv_pool_bytes();
  so.trace = [&](const SchedulerTrace& e) { trace.push_back(e); };
  Scheduler sched(*model, tok, so);
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"What is a cat?", "full"},
      {"Name three shapes and three colors, then count to ten slowly.", "h2o"},
      {"Hello there", "prefixkv-online"}};
  PolicyOptions po;
  po.budget = 0.5;
  std::vector<std::shared_ptr<Job>> jobs;
  for (const auto& [text, policy] : cases) {
    auto job = std::make_shared<Job>();
    job->prompt.text = text;
    job->sampling.max_tokens = 12;
    job->policy = make_policy(policy, po);
    job->prompt_tokens = int(engine.prepare(job->prompt).ids.size());
    job->kv = kv_reservation(model->config().text, job->prompt_tokens, 12, policy == "full" ? 1.0 : 0.5, 2,
                             backend->kv_entry_bytes(), backend->kv_block());
    sched.submit(job);  // before the thread starts: all three wait together
    jobs.push_back(job);
  }
  sched.start();
  std::vector<Event> done;
  for (auto& j : jobs) {
    std::string streamed;
    done.push_back(drain(*j, &streamed));
    ASSERT_EQ(done.back().kind, Event::Kind::Done) << (done.back().error ? done.back().error->what() : "");
  }
  sched.shutdown();
  ASSERT_FALSE(trace.empty());
  EXPECT_EQ(trace[0].kind, SchedulerTrace::Kind::Prefill);
  EXPECT_EQ(trace[0].jobs.size(), jobs.size()) << "the first pass prefills every waiting prompt";
  for (size_t i = 0; i < jobs.size(); ++i) {
    const PreparedPrompt p = engine.prepare(jobs[i]->prompt);
    auto policy = make_policy(cases[i].second, po);
    EXPECT_EQ(done[i].completion.text, generate(*backend, tok, p, jobs[i]->sampling, *policy).text) << cases[i].second;
  }
}

// A prefill pass that runs out of KV blocks changes nothing; the scheduler retries each prompt
// alone, so only the one that cannot fit fails (503, retry later) and the other is answered. The
// scheduler is told of a larger pool than the device holds, so that both are admitted.
TEST(GpuServe, APassThatRunsOutOfBlocksFailsOnlyThePromptThatDoesNotFit) {
  const std::unique_ptr<Model> model = Model::load(repo("models/prefixkv-llava-tiny"));
  const Tokenizer tok(repo("models/prefixkv-llava-tiny/tokenizer.model"));
  Engine engine(*model, tok);
  cuda::CudaBackendOptions go;
  go.dtype = DType::F16;
  go.kv_pool_bytes = size_t(5) << 20;  // one 590-token prompt (about 3.8 MB in blocks), not two
  std::shared_ptr<Backend> backend = cuda::make_cuda_backend(*model, go);
  SchedulerOptions so;
  so.backend = backend;
  so.kv_pool_bytes = size_t(64) << 20;
  so.prefill_chunk = 0;  // both whole, in one pass
  Scheduler sched(*model, tok, so);
  Image image = load_image(repo("data/example.png"));
  std::vector<std::shared_ptr<Job>> jobs;
  for (int i = 0; i < 2; ++i) {
    auto job = std::make_shared<Job>();
    job->image = image;
    job->prompt.text = "Describe the image in detail.";
    job->prompt.image = &job->image;
    job->sampling.max_tokens = 4;
    job->policy = make_policy("full", PolicyOptions{});  // (a compressing policy would free room for the other)
    job->prompt_tokens = 590;
    job->kv = kv_reservation(model->config().text, 590, 4, 1.0, 2, backend->kv_entry_bytes(), backend->kv_block());
    sched.submit(job);
    jobs.push_back(job);
  }
  sched.start();
  std::string s0, s1;
  const Event e0 = drain(*jobs[0], &s0), e1 = drain(*jobs[1], &s1);
  sched.shutdown();
  EXPECT_EQ(e0.kind, Event::Kind::Done) << (e0.error ? e0.error->what() : "");
  ASSERT_EQ(e1.kind, Event::Kind::Error);
  ASSERT_TRUE(e1.error.has_value());
  EXPECT_EQ(e1.error->status(), 503) << e1.error->what();
  EXPECT_NE(std::string(e1.error->what()).find("KV pool ran out"), std::string::npos) << e1.error->what();
  const SchedulerStats st = sched.stats();
  EXPECT_EQ(st.finished_total, 1u);
  EXPECT_EQ(st.failed_total, 1u);
  EXPECT_EQ(st.kv_reserved_bytes, 0u);
}

}  // namespace
}  // namespace pkv::serve
