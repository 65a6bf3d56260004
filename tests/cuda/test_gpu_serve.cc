// prefixkv serve --device cuda: the scheduler with its GPU back end (src/engine/cuda_backend.h). The
// bundled model's requests, batched on the GPU, give the CPU engine's answers (greedy, F16), the
// KV reservations hold the pool's blocks, and a request larger than the whole pool is refused.
// Runs on the GPU (pkv_cuda_tests) and on the fake device (pkv_cuda_model_emu_tests).
#include <gtest/gtest.h>

#include <chrono>
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

}  // namespace
}  // namespace pkv::serve
