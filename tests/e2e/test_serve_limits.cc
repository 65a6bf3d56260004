// What bounds a request's cost before the work starts (docs/SERVER.md, "Limits"): JSON depth and
// value count before parsing, messages and content parts, the image's size and a JPEG's scans read
// from the header before decoding (PNG, baseline and progressive JPEG, a frame header after
// megabytes of other segments), and the Retry-After of a full queue; the scheduler's drain. Each
// test asserts the refusal and its message, never a timing (scripts/soak_server.py costs times them).
#include <gtest/gtest.h>
#include <jpeglib.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <thread>

#include "core/error.h"
#include "engine/backend.h"
#include "engine/engine.h"
#include "kv/policy.h"
#include "serve/api.h"
#include "serve/base64.h"
#include "serve/scheduler.h"
#include "serve/service.h"
#include "test_util.h"

using nlohmann::json;
using namespace pkv;
using namespace pkv::serve;

namespace {

// The refusal parsing gives (status, code, message); status 0 when it parses.
struct Refusal {
  int status = 0;
  std::string code, message;
};
Refusal parse_refusal(const std::string& body, const ParseOptions& opt = {}) {
  try {
    parse_chat_request(body, opt);
  } catch (const ApiError& e) {
    return {e.status(), e.code(), e.what()};
  }
  return {};
}

bool has(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

// An in-memory JPEG of a gradient, baseline or progressive (libjpeg's simple progression).
std::vector<uint8_t> make_jpeg(int width, int height, int components, bool progressive) {
  jpeg_compress_struct c{};
  jpeg_error_mgr err{};
  c.err = jpeg_std_error(&err);
  jpeg_create_compress(&c);
  unsigned char* out = nullptr;
  unsigned long size = 0;
  jpeg_mem_dest(&c, &out, &size);
  c.image_width = JDIMENSION(width);
  c.image_height = JDIMENSION(height);
  c.input_components = components;
  c.in_color_space = components == 3 ? JCS_RGB : JCS_GRAYSCALE;
  jpeg_set_defaults(&c);
  jpeg_set_quality(&c, 90, TRUE);
  if (progressive) jpeg_simple_progression(&c);
  jpeg_start_compress(&c, TRUE);
  std::vector<uint8_t> row(size_t(width) * components);
  while (c.next_scanline < c.image_height) {
    for (int x = 0; x < width * components; ++x) row[size_t(x)] = uint8_t((x * 7 + int(c.next_scanline) * 3) & 0xFF);
    JSAMPROW r = row.data();
    jpeg_write_scanlines(&c, &r, 1);
  }
  jpeg_finish_compress(&c);
  std::vector<uint8_t> bytes(out, out + size);
  jpeg_destroy_compress(&c);
  std::free(out);
  return bytes;
}

// The offsets of a JPEG's SOS markers (the scans), found by walking its segments.
std::vector<size_t> scan_offsets(const std::vector<uint8_t>& j) {
  std::vector<size_t> at;
  for (size_t i = 0; i + 1 < j.size(); ++i)
    if (j[i] == 0xFF && j[i + 1] == 0xDA) at.push_back(i);
  return at;
}

// COM segments of `bytes` bytes in all, put right after SOI: the frame header comes that late.
std::vector<uint8_t> with_comments_first(const std::vector<uint8_t>& jpg, size_t bytes) {
  std::vector<uint8_t> out(jpg.begin(), jpg.begin() + 2);
  while (bytes > 0) {
    const size_t n = std::min<size_t>(bytes, 65533);
    out.insert(out.end(), {0xFF, 0xFE, uint8_t((n + 2) >> 8), uint8_t((n + 2) & 0xFF)});
    out.insert(out.end(), n, uint8_t('c'));
    bytes -= n;
  }
  out.insert(out.end(), jpg.begin() + 2, jpg.end());
  return out;
}

// A PNG signature and IHDR that claim width x height (no pixel data follows).
std::vector<uint8_t> png_header(uint32_t width, uint32_t height) {
  std::vector<uint8_t> b = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1A, '\n', 0, 0, 0, 13, 'I', 'H', 'D', 'R'};
  for (uint32_t v : {width, height})
    for (int s = 24; s >= 0; s -= 8) b.push_back(uint8_t(v >> s));
  b.insert(b.end(), {8, 2, 0, 0, 0, 0, 0, 0, 0});  // depth, RGB, methods, a CRC nobody reads first
  return b;
}

std::string image_body(const std::vector<uint8_t>& bytes, const std::string& mime) {
  return json{{"messages",
               {{{"role", "user"},
                 {"content",
                  {{{"type", "image_url"},
                    {"image_url", {{"url", "data:" + mime + ";base64," + base64_encode(bytes.data(), bytes.size())}}}},
                   {{"type", "text"}, {"text", "What is this?"}}}}}}},
              {"max_tokens", 2}}
      .dump();
}


PolicyFactory simple_factory() {
  return [](const std::string& name, std::optional<double> budget) {
    PolicyOptions o;
    o.budget = budget.value_or(0.2);
    return make_policy(name, o);
  };
}

// The CPU back end, except that the first step of `fail_at` sequences or more throws what the GPU's
// fixed KV pool throws when it runs out (src/kv/block_pool.cc), before changing anything, as
// GpuSession::step_many does.
class PoolRunsOut : public Backend {
 public:
  PoolRunsOut(const Model& m, size_t fail_at) : cpu_(make_cpu_backend(m)), fail_at_(fail_at) {}
  std::string name() const override { return "cpu"; }
  std::string description() const override { return "cpu whose KV pool runs out once"; }
  const Model& model() const override { return cpu_->model(); }
  std::vector<float> encode_image(const float* pixels, Observer* obs) override {
    return cpu_->encode_image(pixels, obs);
  }
  std::unique_ptr<Sequence> prefill(const PreparedPrompt& p, KVPolicy& policy, float* logits, Observer* obs) override {
    return cpu_->prefill(p, policy, logits, obs);
  }
  void step_many(const std::vector<Sequence*>& seqs, const int32_t* tokens, float* logits) override {
    if (seqs.size() >= fail_at_ && !failed_) {
      failed_ = true;
      fail("KV block pool", "out of KV blocks: sequence 3 needs 12 more blocks for a decode step but only 0 of 64 are free");
    }
    cpu_->step_many(seqs, tokens, logits);
  }
  std::unique_ptr<SharedPrefill> prefill_shared(const PreparedPrompt& p, const std::vector<int>& from) override {
    return cpu_->prefill_shared(p, from);
  }
  std::unique_ptr<Sequence> adopt(const SharedPrefill& shared, KVPolicy& policy) override {
    return cpu_->adopt(shared, policy);
  }
  size_t kv_entry_bytes() const override { return cpu_->kv_entry_bytes(); }

 private:
  std::unique_ptr<Backend> cpu_;
  size_t fail_at_;
  bool failed_ = false;
};

}  // namespace

TEST(ServeLimits, JsonNestingIsBoundedBeforeParsing) {
  // 100000 '[' (a 100 kB body): refused by the pre-scan at the 65th level, naming the limit.
  Refusal r = parse_refusal(std::string(100000, '['));
  EXPECT_EQ(r.status, 400);
  EXPECT_EQ(r.code, "json_too_deep");
  EXPECT_TRUE(has(r.message, "more than 64 levels deep")) << r.message;
  EXPECT_TRUE(has(r.message, "byte 64")) << r.message;
  // Objects count as levels too; 64 levels are fine (then the schema says what is wrong).
  std::string objects;
  for (int i = 0; i < 65; ++i) objects += "{\"a\":";
  EXPECT_EQ(parse_refusal(objects + "1" + std::string(65, '}')).code, "json_too_deep");
  const std::string ok64 = std::string(64, '[') + std::string(64, ']');
  EXPECT_EQ(parse_refusal(ok64).code, "invalid_type");  // parsed: an array, not an object
  // Brackets inside strings (escaped quotes included) are text, not levels.
  const std::string hi = R"("messages":[{"role":"user","content":"hi"}])";
  const std::string in_string = "{" + hi + R"(,"user":"\"[[[)" + std::string(1000, '[') + "\"}";
  EXPECT_EQ(parse_refusal(in_string).status, 0) << parse_refusal(in_string).message;
  // A smaller limit where the server sets one.
  ParseOptions tight;
  tight.max_json_depth = 4;
  EXPECT_EQ(parse_refusal("{" + hi + "}", tight).status, 0);
  EXPECT_TRUE(has(parse_refusal("{" + hi + R"(,"metadata":{"a":{"b":[[1]]}}})", tight).message, "more than 4 levels"));
}

TEST(ServeLimits, JsonValuesMessagesAndContentPartsAreBounded) {
  const std::string hi = R"("messages":[{"role":"user","content":"hi"}])";
  // 200000 numbers in an ignored field: refused before parsing.
  std::string many = "{" + hi + R"(,"metadata":[0)";
  for (int i = 0; i < 200000; ++i) many += ",0";
  many += "]}";
  Refusal r = parse_refusal(many);
  EXPECT_EQ(r.status, 400);
  EXPECT_EQ(r.code, "json_too_large");
  EXPECT_TRUE(has(r.message, "more than 100000 JSON values")) << r.message;

  // Messages: 2049 are refused by count (each is a valid message).
  json msgs = json::array();
  for (int i = 0; i < 2049; ++i) msgs.push_back({{"role", i % 2 ? "assistant" : "user"}, {"content", "x"}});
  r = parse_refusal(json{{"messages", msgs}}.dump());
  EXPECT_EQ(r.code, "too_many_messages");
  EXPECT_TRUE(has(r.message, "messages: holds 2049 messages, more than the server's limit of 2048")) << r.message;
  msgs.erase(msgs.begin());  // 2048, the last a user's
  EXPECT_EQ(parse_refusal(json{{"messages", msgs}}.dump()).status, 0);

  // Content parts over all messages.
  json parts = json::array();
  for (int i = 0; i < 1500; ++i) parts.push_back({{"type", "text"}, {"text", "a"}});
  json two = {{"messages", {{{"role", "user"}, {"content", parts}}, {{"role", "user"}, {"content", parts}}}}};
  r = parse_refusal(two.dump());
  EXPECT_EQ(r.code, "too_many_content_parts");
  EXPECT_TRUE(has(r.message, "messages[1].content: the messages up to this one hold 3000 content parts, more than "
                             "the server's limit of 2048"))
      << r.message;
  ParseOptions tight;
  tight.max_messages = 2;
  tight.max_content_parts = 3;
  EXPECT_EQ(parse_refusal(R"({"messages":[{"role":"user","content":"a"},{"role":"user","content":"b"}]})", tight).status,
            0);
  EXPECT_EQ(parse_refusal(R"({"messages":[{"role":"user","content":["a","b"]},{"role":"user","content":[1,2]}]})", tight)
                .code,
            "too_many_content_parts");
}

TEST(ServeLimits, ImageHeadersOfPngAndBaselineAndProgressiveJpeg) {
  const std::vector<uint8_t> base = make_jpeg(40, 24, 3, false), prog = make_jpeg(40, 24, 3, true),
                             gray = make_jpeg(33, 17, 1, true);
  auto hb = read_image_header(base), hp = read_image_header(prog), hg = read_image_header(gray);
  ASSERT_TRUE(hb && hp && hg);
  EXPECT_TRUE(hb->jpeg && !hb->progressive);
  EXPECT_EQ(hb->scans, 1);
  EXPECT_EQ(std::make_pair(hb->width, hb->height), std::make_pair(int64_t(40), int64_t(24)));
  EXPECT_TRUE(hp->progressive);
  EXPECT_EQ(hp->scans, int(scan_offsets(prog).size()));  // libjpeg's simple progression: 10 for colour
  EXPECT_EQ(hp->scans, 10);
  EXPECT_EQ(hg->scans, 6);  // and 6 for grey
  EXPECT_EQ(std::make_pair(hg->width, hg->height), std::make_pair(int64_t(33), int64_t(17)));
  // The decoder agrees on both.
  for (const auto* j : {&base, &prog}) {
    Image img = decode_image(j->data(), j->size(), "test.jpg");
    EXPECT_EQ(img.width, 40);
    EXPECT_EQ(img.height, 24);
  }
  // A frame header after 3 MB of comments is still found, and libjpeg decodes the file.
  const std::vector<uint8_t> late = with_comments_first(prog, 3u << 20);
  auto hl = read_image_header(late);
  ASSERT_TRUE(hl);
  EXPECT_EQ(std::make_pair(hl->width, hl->height), std::make_pair(int64_t(40), int64_t(24)));
  EXPECT_EQ(hl->scans, 10);
  EXPECT_EQ(decode_image(late.data(), late.size(), "late.jpg").width, 40);
  // PNG: the IHDR.
  auto png = read_image_header(png_header(123, 45));
  ASSERT_TRUE(png);
  EXPECT_FALSE(png->jpeg);
  EXPECT_EQ(std::make_pair(png->width, png->height), std::make_pair(int64_t(123), int64_t(45)));
}

TEST(ServeLimits, ImagesAreRefusedByTheirHeaderBeforeDecoding) {
  test::BundledModel& b = test::bundled_model();
  Scheduler sched(*b.model, b.tok, {});  // not started: nothing here is queued
  ServiceOptions opt;
  opt.model_id = "tiny";
  ChatService svc(*b.model, b.tok, sched, opt, simple_factory());
  auto refusal = [&](const std::vector<uint8_t>& bytes, const std::string& mime) {
    try {
      svc.submit(image_body(bytes, mime));
    } catch (const ApiError& e) {
      return Refusal{e.status(), e.code(), e.what()};
    }
    return Refusal{};
  };
  // Huge sides in a PNG header and in a JPEG frame header that comes after 1 MB of comments.
  Refusal r = refusal(png_header(100000, 100000), "image/png");
  EXPECT_EQ(r.code, "image_too_large");
  EXPECT_TRUE(has(r.message, "100000x100000 pixels, more than the 16777216 the server accepts")) << r.message;
  std::vector<uint8_t> sof = {0xFF, 0xD8, 0xFF, 0xC2, 0x00, 0x0B, 0x08, 0x4E, 0x20, 0x4E, 0x20, 0x01, 0x01, 0x11, 0x00};
  r = refusal(with_comments_first(sof, 1u << 20), "image/jpeg");  // 20000 x 20000, progressive
  EXPECT_EQ(r.code, "image_too_large");
  EXPECT_TRUE(has(r.message, "20000x20000 pixels")) << r.message;
  // A progressive JPEG whose last scan is repeated: 10 scans pass, 70 are refused.
  const std::vector<uint8_t> prog = make_jpeg(40, 24, 3, true);
  const std::vector<size_t> at = scan_offsets(prog);
  ASSERT_EQ(at.size(), 10u);
  const std::vector<uint8_t> last(prog.begin() + long(at.back()), prog.end() - 2);  // up to EOI
  std::vector<uint8_t> many(prog.begin(), prog.end() - 2);
  for (int i = 0; i < 60; ++i) many.insert(many.end(), last.begin(), last.end());
  many.insert(many.end(), {0xFF, 0xD9});
  r = refusal(many, "image/jpeg");
  EXPECT_EQ(r.code, "invalid_image");
  EXPECT_TRUE(has(r.message, "the JPEG has 70 scans, more than the 64 the server decodes")) << r.message;
  // PNG and JPEG data that end before the size: refused without decoding; other data by the decoder.
  std::vector<uint8_t> cut_png = png_header(10, 10);
  cut_png.resize(20);
  r = refusal(cut_png, "image/png");
  EXPECT_EQ(r.code, "invalid_image");
  EXPECT_TRUE(has(r.message, "the PNG data ends before its size is given")) << r.message;
  r = refusal(std::vector<uint8_t>(prog.begin(), prog.begin() + 20), "image/jpeg");
  EXPECT_TRUE(has(r.message, "the JPEG data ends before its size is given")) << r.message;
  r = refusal({'G', 'I', 'F', '8', '9', 'a', 1, 0, 1, 0}, "image/gif");
  EXPECT_EQ(r.code, "invalid_image");
  EXPECT_TRUE(has(r.message, "not a PNG or JPEG")) << r.message;
  sched.shutdown();
}

TEST(ServeLimits, AFullQueueSaysWhenToRetryAndADrainFinishesWhatIsInFlight) {
  test::BundledModel& b = test::bundled_model();
  SchedulerOptions so;
  so.max_running = 1;
  so.max_queue = 1;
  so.retry_after_seconds = 3;
  Scheduler sched(*b.model, b.tok, so);
  sched.start();
  auto job = [&](int max_tokens) {
    auto j = std::make_shared<Job>();
    j->prompt.text = "Count.";
    j->sampling.max_tokens = max_tokens;
    j->sampling.ignore_eos = true;
    j->policy = make_policy("full", {});
    j->prompt_tokens = 10;
    j->kv = kv_reservation(b.model->config().text, 10, max_tokens, 1.0, 2);
    return j;
  };
  auto a = job(40), q = job(8);
  sched.submit(a);
  ASSERT_TRUE(a->next_event(std::chrono::seconds(30)));  // running
  sched.submit(q);
  try {
    sched.submit(job(4));
    ADD_FAILURE() << "a full queue must refuse";
  } catch (const ApiError& e) {
    EXPECT_EQ(e.status(), 503);
    EXPECT_EQ(e.code(), "server_overloaded");
    EXPECT_EQ(e.retry_after(), 3);
  }
  // The drain refuses new jobs, and the running and the queued one end with their answers.
  EXPECT_FALSE(sched.drain(std::chrono::milliseconds(0)));
  try {
    sched.submit(job(4));
    ADD_FAILURE() << "a draining scheduler must refuse";
  } catch (const ApiError& e) {
    EXPECT_EQ(e.status(), 503);
    EXPECT_EQ(e.code(), "server_shutting_down");
  }
  EXPECT_TRUE(sched.drain(std::chrono::seconds(60)));
  for (auto* j : {&a, &q}) {
    int texts = 0;
    std::optional<Event> e;
    while ((e = (*j)->next_event(std::chrono::seconds(1))) && e->kind == Event::Kind::Text) ++texts;
    ASSERT_TRUE(e);
    EXPECT_EQ(e->kind, Event::Kind::Done) << (e->error ? e->error->what() : "");
    EXPECT_EQ(e->completion.completion_tokens, (*j)->sampling.max_tokens);
  }
  EXPECT_EQ(sched.stats().failed_total, 0u);
  EXPECT_EQ(sched.stats().kv_reserved_bytes, 0u);
  sched.shutdown();
}

// A step that runs out of KV blocks (the GPU's fixed pool, if a reservation undercounted) stops only
// the newest request, with 503 server_overloaded and a Retry-After; the others go on to the answers
// they would have given alone.
TEST(ServeLimits, APoolThatRunsOutStopsTheNewestRequestOnly) {
  test::BundledModel& b = test::bundled_model();
  Engine engine(*b.model, b.tok);
  SchedulerOptions so;
  so.backend = std::make_shared<PoolRunsOut>(*b.model, 3);
  Scheduler sched(*b.model, b.tok, so);
  const std::vector<std::string> prompts = {"Tell me about shapes.", "Count to five.", "What colour is the sky?"};
  std::vector<std::shared_ptr<Job>> jobs;
  std::vector<std::string> expected;
  for (size_t i = 0; i < prompts.size(); ++i) {
    auto j = std::make_shared<Job>();
    j->prompt.text = prompts[i];
    j->sampling.max_tokens = 24 + 8 * int(i);
    j->sampling.ignore_eos = true;
    j->policy = make_policy("full", {});
    PreparedPrompt p = engine.prepare(j->prompt);
    j->prompt_tokens = int(p.ids.size());
    j->kv = kv_reservation(b.model->config().text, j->prompt_tokens, j->sampling.max_tokens, 1.0, 2);
    auto ref = make_policy("full", {});
    expected.push_back(engine.generate(p, j->sampling, *ref).text);
    jobs.push_back(j);
    sched.submit(j);  // all queued before the thread starts: they join the batch one per iteration
  }
  sched.start();
  auto end_of = [](Job& job, std::string* text) {
    for (;;) {
      std::optional<Event> e = job.next_event(std::chrono::seconds(60));
      if (!e) return Event{Event::Kind::Error, {}, {}, ApiError(0, "timed out")};
      if (e->kind != Event::Kind::Text) return std::move(*e);
      *text += e->text;
    }
  };
  for (size_t i = 0; i < 2; ++i) {
    std::string text;
    Event e = end_of(*jobs[i], &text);
    ASSERT_EQ(e.kind, Event::Kind::Done) << (e.error ? e.error->what() : "");
    EXPECT_EQ(e.completion.text, expected[i]) << prompts[i];
  }
  std::string partial;
  Event third = end_of(*jobs[2], &partial);
  ASSERT_EQ(third.kind, Event::Kind::Error);
  EXPECT_EQ(third.error->status(), 503);
  EXPECT_EQ(third.error->code(), "server_overloaded");
  EXPECT_EQ(third.error->retry_after(), 1);
  EXPECT_TRUE(has(third.error->what(), "the KV pool ran out with 3 requests running")) << third.error->what();
  for (int i = 0; i < 100 && sched.stats().running > 0; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  EXPECT_EQ(sched.stats().failed_total, 1u);
  EXPECT_EQ(sched.stats().finished_total, 2u);
  EXPECT_EQ(sched.stats().kv_reserved_bytes, 0u);
  sched.shutdown();
}
