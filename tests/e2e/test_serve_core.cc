// The server's parts that need no sockets (src/serve): base64, request parsing and validation, the
// chat template, KV reservations, and the scheduler and service on the bundled model: batched
// answers equal Engine::generate, streaming pieces add up to the answer, cancellation and the
// queue bound release what they hold, and the reservation bounds what the cache really holds.
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <thread>

#include "engine/engine.h"
#include "kv/policy.h"
#include "serve/api.h"
#include "serve/base64.h"
#include "serve/metrics.h"
#include "serve/scheduler.h"
#include "serve/service.h"
#include "serve/sse.h"
#include "test_util.h"

using nlohmann::json;
using namespace pkv;
using namespace pkv::serve;

namespace {

std::string repo(const std::string& rel) { return std::string(PKV_TEST_DATA) + "/../../" + rel; }

std::vector<uint8_t> file_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::vector<uint8_t>((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

std::string png_uri() {
  auto b = file_bytes(repo("data/example.png"));
  return "data:image/png;base64," + base64_encode(b.data(), b.size());
}

// The 400 that parsing gives, or "" when it parses.
std::string parse_error(const std::string& body, const ParseOptions& opt = {}) {
  try {
    parse_chat_request(body, opt);
  } catch (const ApiError& e) {
    EXPECT_EQ(e.status(), 400) << body;
    return e.what();
  }
  return "";
}


PolicyFactory simple_factory() {
  return [](const std::string& name, std::optional<double> budget) {
    PolicyOptions o;
    o.budget = budget.value_or(0.2);
    return make_policy(name, o);
  };
}

// Reads a job's events to the end: the streamed text and the final event.
Event drain(Job& job, std::string* streamed) {
  for (;;) {
    std::optional<Event> e = job.next_event(std::chrono::seconds(60));
    if (!e) return Event{Event::Kind::Error, {}, {}, ApiError(0, "timed out")};
    if (e->kind == Event::Kind::Text)
      *streamed += e->text;
    else
      return std::move(*e);
  }
}

}  // namespace

TEST(ServeBase64, RoundTripsAndRejectsGarbage) {
  for (std::string s : {"", "a", "ab", "abc", "abcd", "hello world!\xff\x01"}) {
    const std::string enc = base64_encode(reinterpret_cast<const uint8_t*>(s.data()), s.size());
    auto dec = base64_decode(enc);
    ASSERT_TRUE(dec) << enc;
    EXPECT_EQ(std::string(dec->begin(), dec->end()), s);
  }
  EXPECT_EQ(base64_encode(reinterpret_cast<const uint8_t*>("Man"), 3), "TWFu");
  EXPECT_TRUE(base64_decode("TWE"));         // padding is optional
  EXPECT_TRUE(base64_decode("TW\nFu\r\n"));  // line breaks are skipped
  EXPECT_FALSE(base64_decode("TWFu!"));      // not in the alphabet
  EXPECT_FALSE(base64_decode("TW=Fu"));      // data after padding
  EXPECT_FALSE(base64_decode("TWFuT"));      // a lone final digit
  EXPECT_FALSE(base64_decode("TQ==="));      // too much padding
}

TEST(ServeApi, ParsesTheOpenAIShapeAndTheExtensions) {
  json body = {{"model", "m"},
               {"messages",
                {{{"role", "system"}, {"content", "Be brief."}},
                 {{"role", "user"},
                  {"content",
                   {{{"type", "image_url"}, {"image_url", {{"url", png_uri()}, {"detail", "auto"}}}},
                    {{"type", "text"}, {"text", "What is this?"}}}}}}},
               {"max_tokens", 12},
               {"temperature", 0.7},
               {"top_p", 0.9},
               {"seed", 42},
               {"stop", {"\n", "END"}},
               {"stream", true},
               {"stream_options", {{"include_usage", true}}},
               {"kv_policy", "snapkv"},
               {"kv_budget", 0.3},
               {"user", "ignored"},
               {"frequency_penalty", 0}};
  ChatRequest r = parse_chat_request(body.dump(), {});
  EXPECT_EQ(r.model, "m");
  ASSERT_EQ(r.messages.size(), 2u);
  EXPECT_EQ(r.messages[0].role, Role::System);
  ASSERT_TRUE(r.image);
  EXPECT_EQ(r.image->bytes, file_bytes(repo("data/example.png")));
  EXPECT_EQ(r.image->where, "messages[1].content[0].image_url.url");
  EXPECT_EQ(r.sampling.max_tokens, 12);
  EXPECT_FLOAT_EQ(r.sampling.temperature, 0.7f);
  EXPECT_EQ(r.sampling.seed, 42u);
  EXPECT_EQ(r.sampling.stop, (std::vector<std::string>{"\n", "END"}));
  EXPECT_TRUE(r.stream && r.include_usage);
  EXPECT_EQ(r.kv_policy, "snapkv");
  EXPECT_EQ(r.kv_budget, 0.3);
  // Nulls count as not given (the clients send them), max_tokens 0 means "the server's default".
  ChatRequest d =
      parse_chat_request(R"({"messages":[{"role":"user","content":"hi"}],"max_tokens":null,"stop":null})", {});
  EXPECT_EQ(d.sampling.max_tokens, 0);
  EXPECT_TRUE(d.sampling.stop.empty());
  EXPECT_FALSE(d.image);
}

TEST(ServeApi, EachBadFieldIsNamed) {
  const std::string hi = R"("messages":[{"role":"user","content":"hi"}])";
  EXPECT_NE(parse_error("{"), "");
  EXPECT_NE(parse_error(R"({"messages":[]})").find("messages: must hold at least one message"), std::string::npos);
  EXPECT_NE(parse_error(R"({"messages":[{"content":"hi"}]})").find("messages[0].role: is required"), std::string::npos);
  EXPECT_NE(
      parse_error(R"({"messages":[{"role":"user","content":[{"type":"audio"}]}]})").find("messages[0].content[0].type"),
      std::string::npos);
  EXPECT_NE(parse_error(R"({"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":7}}]}]})")
                .find("messages[0].content[0].image_url.url: expected a string, got number"),
            std::string::npos);
  EXPECT_NE(
      parse_error(
          R"({"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"data:image/png;base64,*"}}]}]})")
          .find("messages[0].content[0].image_url.url: not valid base64"),
      std::string::npos);
  EXPECT_NE(
      parse_error(
          R"({"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"data:image/png,abc"}}]}]})")
          .find("only base64 data: URIs"),
      std::string::npos);
  EXPECT_NE(parse_error(R"({"messages":[{"role":"user","content":"look: <image>"}]})").find("image marker"),
            std::string::npos);
  EXPECT_NE(parse_error("{" + hi + R"(,"max_tokens":0})").find("max_tokens: must be at least 1"), std::string::npos);
  EXPECT_NE(parse_error("{" + hi + R"(,"max_tokens":1.5})").find("max_tokens: expected an integer"), std::string::npos);
  EXPECT_NE(parse_error("{" + hi + R"(,"temperature":3})").find("temperature"), std::string::npos);
  EXPECT_NE(parse_error("{" + hi + R"(,"top_p":0})").find("top_p"), std::string::npos);
  EXPECT_NE(parse_error("{" + hi + R"(,"stop":[1]})").find("stop[0]: expected a string"), std::string::npos);
  EXPECT_NE(parse_error("{" + hi + R"(,"stop":["a","b","c","d","e"]})").find("at most 4"), std::string::npos);
  EXPECT_NE(parse_error("{" + hi + R"(,"kv_budget":0})").find("kv_budget"), std::string::npos);
  EXPECT_NE(parse_error("{" + hi + R"(,"kv_policy":"lru"})").find("unknown policy 'lru'"), std::string::npos);
  EXPECT_NE(parse_error("{" + hi + R"(,"tools":[{"type":"function"}]})").find("tools"), std::string::npos);
  EXPECT_NE(parse_error("{" + hi + R"(,"presence_penalty":0.5})").find("not supported"), std::string::npos);
  EXPECT_NE(parse_error(R"({"messages":[{"role":"tool","content":"x"}]})").find("not supported"), std::string::npos);
  // Local paths: refused without a media folder.
  EXPECT_NE(
      parse_error(R"({"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"/etc/hosts"}}]}]})")
          .find("--media-dir"),
      std::string::npos);
  ApiError e(404, "nope", "model_not_found", "model");
  EXPECT_EQ(
      e.body(),
      json::parse(
          R"({"error":{"message":"nope","type":"invalid_request_error","param":"model","code":"model_not_found"}})"));
}

TEST(ServeApi, ConversationsRenderInTheLlavaV1Template) {
  ChatMessage user{Role::User, {{true, ""}, {false, "Describe the image in detail."}}};
  EXPECT_EQ(render_llava_v1({user}),
            std::vector<std::string>{Engine::apply_template("Describe the image in detail.", Template::LlavaV1, true)});
  ChatMessage text_only{Role::User, {{false, "hi"}}};
  EXPECT_EQ(render_llava_v1({text_only}),
            std::vector<std::string>{Engine::apply_template("hi", Template::LlavaV1, false)});
  std::vector<ChatMessage> conv = {{Role::System, {{false, "Be kind."}}},
                                   {Role::User, {{false, "Hello"}}},
                                   {Role::Assistant, {{false, "Hi there."}}},
                                   {Role::User, {{false, "What now?"}, {true, ""}}}};
  EXPECT_EQ(render_llava_v1(conv), (std::vector<std::string>{"Be kind. USER: Hello ASSISTANT: Hi there.",
                                                             "USER: What now?\n<image> ASSISTANT:"}));
  EXPECT_EQ(finish_reason("eos"), "stop");
  EXPECT_EQ(finish_reason("stop"), "stop");
  EXPECT_EQ(finish_reason("context"), "length");
}

// Prompt building has one home (engine/prompt.h): a single user message sent to the server gives
// the very token ids `prefixkv run` prefills for the same text (Engine::prompt_ids, what its
// prepare() uses), with and without an image, on both checkpoint layouts (transformers' BPE rule
// and the original repository's chunk-by-chunk SentencePiece); a conversation puts the system text
// in front and one EOS after the assistant's turn, the image at its part's place.
TEST(ServeService, ASingleTurnRequestTokenizesAsPrefixkvRun) {
  for (const std::string& dir : {repo("models/prefixkv-llava-tiny"), test::data_path("fixtures/llava_orig_sharded")}) {
    SCOPED_TRACE(dir);
    auto model = Model::load(dir);
    Tokenizer tok(dir + "/tokenizer.model");
    const ModelConfig& cfg = model->config();
    ASSERT_TRUE(cfg.has_vision);
    Scheduler sched(*model, tok, {});  // not started: submitted jobs wait in the queue
    ServiceOptions opt;
    opt.model_id = "m";
    ChatService svc(*model, tok, sched, opt, simple_factory());
    Engine engine(*model, tok);
    const Image img = load_image(repo("data/example.png"));
    const std::string text = "What is in  the picture?";  // two spaces: the tokenizer rules differ there
    const json image_part = {{"type", "image_url"}, {"image_url", {{"url", png_uri()}}}};
    const json text_part = {{"type", "text"}, {"text", text}};

    PromptRequest run;  // what `prefixkv run --prompt TEXT [--image ...]` builds
    run.text = text;
    run.tmpl = Template::LlavaV1;
    run.image = &img;
    const std::vector<int32_t> run_image = engine.prompt_ids(run);
    run.image = nullptr;
    const std::vector<int32_t> run_text = engine.prompt_ids(run);
    EXPECT_EQ(std::count(run_image.begin(), run_image.end(), -1), 1);
    EXPECT_EQ(std::count(run_text.begin(), run_text.end(), -1), 0);

    json with_image = {{"messages", {{{"role", "user"}, {"content", {image_part, text_part}}}}}, {"max_tokens", 1}};
    Submitted a = svc.submit(with_image.dump());
    EXPECT_EQ(a.job->prompt.marked_ids, run_image);
    EXPECT_EQ(a.job->prompt_tokens, int(run_image.size()) + cfg.image_tokens() - 1);
    json text_only = {{"messages", {{{"role", "user"}, {"content", text}}}}, {"max_tokens", 1}};
    Submitted b = svc.submit(text_only.dump());
    EXPECT_EQ(b.job->prompt.marked_ids, run_text);

    // A conversation, spelled out token by token: BOS, the first piece as a prompt's start, EOS,
    // then the rest as a continuation, the image one -1 where its part stands.
    json conv = {{"messages",
                  {{{"role", "system"}, {"content", "Be kind."}},
                   {{"role", "user"}, {"content", "Hello"}},
                   {{"role", "assistant"}, {"content", "Hi there."}},
                   {{"role", "user"}, {"content", {text_part, image_part}}}}},
                 {"max_tokens", 1}};
    Submitted c = svc.submit(conv.dump());
    const bool original = cfg.layout == Layout::LlavaOriginal;
    auto encode = [&](const std::string& t, bool starts) { return original ? tok.encode(t) : tok.encode_hf(t, starts); };
    std::vector<int32_t> want = {int32_t(cfg.text.bos_id)};
    for (int id : encode("Be kind. USER: Hello ASSISTANT: Hi there.", true)) want.push_back(id);
    want.push_back(engine.eos_id());
    for (int id : encode("USER: " + text + "\n", false)) want.push_back(id);
    want.push_back(-1);
    for (int id : encode(" ASSISTANT:", false)) want.push_back(id);
    EXPECT_EQ(c.job->prompt.marked_ids, want);
  }
}

TEST(ServeApi, ImageHeaderSizes) {
  auto png = image_header_size(file_bytes(repo("data/example.png")));
  Image decoded = load_image(repo("data/example.png"));
  ASSERT_TRUE(png);
  EXPECT_EQ(*png, std::make_pair(int64_t(decoded.width), int64_t(decoded.height)));
  auto jpg = image_header_size(file_bytes(test::data_path("images/tall.jpg")));
  Image tall = load_image(test::data_path("images/tall.jpg"));
  ASSERT_TRUE(jpg);
  EXPECT_EQ(*jpg, std::make_pair(int64_t(tall.width), int64_t(tall.height)));
  EXPECT_FALSE(image_header_size({'h', 'e', 'l', 'l', 'o'}));
}

TEST(ServeKv, ReservationCoversTheFullAndTheCompressedCache) {
  TextConfig t;
  t.n_layers = 12;
  t.n_kv_heads = 4;
  t.head_dim = 32;
  const KvReservation full = kv_reservation(t, 590, 100, 1.0, 2);
  EXPECT_EQ(full.final_bytes, size_t(12) * 690 * 1024);
  EXPECT_EQ(full.prefill_bytes, size_t(12) * 654 * 1024);
  const KvReservation small = kv_reservation(t, 590, 100, 0.2, 2);
  EXPECT_LT(small.final_bytes, full.final_bytes / 4);
  EXPECT_EQ(small.prefill_bytes, full.prefill_bytes);
  EXPECT_EQ(small.peak(), small.prefill_bytes);
}

TEST(ServeScheduler, BatchedAnswersEqualEngineGenerateAndTheReservationHolds) {
  test::BundledModel& b = test::bundled_model();
  Engine engine(*b.model, b.tok);
  SchedulerOptions so;
  Scheduler sched(*b.model, b.tok, so);
  sched.start();
  struct Case {
    std::string prompt;
    std::string policy;
    float temperature;
  };
  const std::vector<Case> cases = {{"Describe the image in detail.", "full", 0.f},
                                   {"What is in the top left corner?", "h2o", 0.f},
                                   {"Hello there", "prefixkv-online", 0.f},
                                   {"Tell me a story", "full", 0.9f}};
  Image image = load_image(repo("data/example.png"));
  std::vector<std::shared_ptr<Job>> jobs;
  std::vector<GenerationResult> expected;
  for (size_t i = 0; i < cases.size(); ++i) {
    auto job = std::make_shared<Job>();
    const bool with_image = i < 2;
    if (with_image) job->image = image;
    job->prompt.text = cases[i].prompt;
    job->prompt.image = with_image ? &job->image : nullptr;
    job->sampling.max_tokens = 24 + int(i) * 8;
    job->sampling.temperature = cases[i].temperature;
    job->sampling.seed = 7;
    job->sampling.ignore_eos = true;
    PolicyOptions po;
    po.budget = 0.2;
    job->policy = make_policy(cases[i].policy, po);
    PreparedPrompt p = engine.prepare(job->prompt);
    job->prompt_tokens = int(p.ids.size());
    job->kv = kv_reservation(b.model->config().text, job->prompt_tokens, job->sampling.max_tokens,
                             cases[i].policy == "full" ? 1.0 : 0.2, 2);
    auto ref_policy = make_policy(cases[i].policy, po);
    expected.push_back(engine.generate(p, job->sampling, *ref_policy));
    jobs.push_back(job);
  }
  for (auto& j : jobs) sched.submit(j);  // all queued at once: they join the batch one by one
  for (size_t i = 0; i < jobs.size(); ++i) {
    std::string streamed;
    Event e = drain(*jobs[i], &streamed);
    ASSERT_EQ(e.kind, Event::Kind::Done) << (e.error ? e.error->what() : "");
    EXPECT_EQ(e.completion.text, expected[i].text) << cases[i].prompt;
    EXPECT_EQ(streamed, expected[i].text);
    EXPECT_EQ(e.completion.completion_tokens, int(expected[i].tokens.size()));
    EXPECT_EQ(e.completion.kv_bytes, expected[i].kv_bytes);
    EXPECT_LE(e.completion.kv_bytes, jobs[i]->kv.final_bytes) << cases[i].policy;
  }
  // The scheduler drops a finished sequence at the end of the iteration that sent its last event.
  for (int i = 0; i < 100 && sched.stats().running > 0; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  SchedulerStats st = sched.stats();
  EXPECT_EQ(st.finished_total, jobs.size());
  EXPECT_EQ(st.running, 0);
  EXPECT_EQ(st.kv_reserved_bytes, 0u);
  EXPECT_GT(st.generated_tokens_total, 100u);
  const std::string text = prometheus_text(st, {{{"/health", 200}, 3}}, resident_memory_bytes());
  for (const char* name :
       {"prefixkv_http_requests_total{route=\"/health\",status=\"200\"} 3", "prefixkv_requests_running 0",
        "prefixkv_kv_free_bytes", "prefixkv_generation_tokens_per_second", "process_resident_memory_bytes",
        "prefixkv_decode_steps_total", "prefixkv_prefill_passes_total"})
    EXPECT_NE(text.find(name), std::string::npos) << name;
  EXPECT_GT(st.decode_steps_total, 0u);
  EXPECT_EQ(st.prefill_passes_total, jobs.size()) << "the CPU prefills each prompt whole, in a pass of its own";
}

TEST(ServeScheduler, CancelQueueBoundAndShutdownReleaseEverything) {
  test::BundledModel& b = test::bundled_model();
  SchedulerOptions so;
  so.max_running = 1;
  so.max_queue = 1;
  Scheduler sched(*b.model, b.tok, so);
  sched.start();
  auto long_job = [&] {
    auto job = std::make_shared<Job>();
    job->prompt.text = "Tell me everything.";
    job->sampling.max_tokens = 1500;
    job->sampling.ignore_eos = true;
    job->policy = make_policy("full", {});
    job->prompt_tokens = 12;
    job->kv = kv_reservation(b.model->config().text, 12, 1500, 1.0, 2);
    return job;
  };
  auto a = long_job(), q = long_job(), c = long_job();
  sched.submit(a);
  ASSERT_TRUE(a->next_event(std::chrono::seconds(30)));  // running: its first piece came
  sched.submit(q);
  try {
    sched.submit(c);
    ADD_FAILURE() << "a full queue must refuse";
  } catch (const ApiError& e) {
    EXPECT_EQ(e.status(), 503);
    EXPECT_EQ(e.code(), "server_overloaded");
  }
  auto huge = long_job();
  huge->kv.final_bytes = so.kv_pool_bytes + 1;
  EXPECT_THROW(sched.submit(huge), ApiError);
  a->cancel();
  // The queued job takes the freed slot.
  ASSERT_TRUE(q->next_event(std::chrono::seconds(30)));
  EXPECT_EQ(sched.stats().cancelled_total, 1u);
  EXPECT_EQ(sched.stats().running, 1);
  sched.shutdown();
  std::string rest;
  Event end = drain(*q, &rest);
  ASSERT_EQ(end.kind, Event::Kind::Error);
  EXPECT_EQ(end.error->status(), 503);
  EXPECT_EQ(sched.stats().kv_reserved_bytes, 0u);
  EXPECT_EQ(sched.stats().running, 0);
}

TEST(ServeService, ValidatesAgainstTheModelAndQueues) {
  test::BundledModel& b = test::bundled_model();
  Scheduler sched(*b.model, b.tok, {});
  ServiceOptions opt;
  opt.model_id = "tiny";
  opt.max_image_pixels = 100 * 100;
  ChatService svc(*b.model, b.tok, sched, opt, simple_factory());
  sched.start();
  auto status_of = [&](const json& body) {
    try {
      svc.submit(body.dump());
    } catch (const ApiError& e) {
      return std::make_pair(e.status(), std::string(e.what()));
    }
    return std::make_pair(200, std::string());
  };
  json hi = {{"messages", {{{"role", "user"}, {"content", "hi"}}}}, {"max_tokens", 3}};
  json other = hi;
  other["model"] = "gpt-4";
  EXPECT_EQ(status_of(other).first, 404);
  json image = {
      {"messages", {{{"role", "user"}, {"content", {{{"type", "image_url"}, {"image_url", {{"url", png_uri()}}}}}}}}}};
  auto big = status_of(image);
  EXPECT_EQ(big.first, 400);
  EXPECT_NE(big.second.find("--max-image-pixels"), std::string::npos) << big.second;
  json long_answer = hi;
  long_answer["max_tokens"] = 2047;
  EXPECT_NE(status_of(long_answer).second.find("context"), std::string::npos);
  // A text that cannot fit the context is refused by its size, before it is tokenized (the message
  // names bytes; a refusal after tokenizing names the token count only).
  std::string words;
  for (int i = 0; i < 200000; ++i) words += "red square ";
  json huge = {{"messages", {{{"role", "user"}, {"content", words}}}}};
  try {
    svc.submit(huge.dump());
    ADD_FAILURE() << "a 400,000-word message was accepted";
  } catch (const ApiError& e) {
    EXPECT_EQ(e.status(), 400);
    EXPECT_EQ(e.code(), "context_length_exceeded");
    EXPECT_NE(std::string(e.what()).find("bytes of text"), std::string::npos) << e.what();
  }

  // A single user turn tokenises as `prefixkv run` does; a conversation puts EOS after the
  // assistant's turn.
  Engine engine(*b.model, b.tok);
  const std::string p = Engine::apply_template("Describe the image in detail.", Template::LlavaV1, true);
  EXPECT_EQ(engine.tokenize_turns({p}, true), engine.tokenize_prompt(p, true));
  std::vector<int32_t> ids = engine.tokenize_turns({"USER: a ASSISTANT: b", "USER: <image>\nc ASSISTANT:"}, true);
  EXPECT_EQ(std::count(ids.begin(), ids.end(), b.model->config().text.eos_ids[0]), 1);
  EXPECT_EQ(std::count(ids.begin(), ids.end(), -1), 1);

  Submitted s = svc.submit(hi.dump());
  std::string streamed;
  Event e = drain(*s.job, &streamed);
  ASSERT_EQ(e.kind, Event::Kind::Done);
  json body = svc.completion_body(s, e.completion);
  EXPECT_EQ(body["model"], "tiny");
  EXPECT_EQ(body["choices"][0]["message"]["content"], e.completion.text);
  EXPECT_EQ(body["usage"]["total_tokens"], e.completion.prompt_tokens + e.completion.completion_tokens);
  EXPECT_EQ(sse_event(dump_json(svc.chunk_body(s, {{"content", "x"}}, ""))).substr(0, 6), "data: ");
  // Invalid UTF-8 in generated text does not break the JSON.
  EXPECT_NO_THROW(dump_json(json{{"t", std::string("a\xff")}}));
}
