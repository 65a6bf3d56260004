// prefixkv serve over HTTP on a loopback port: each kind of bad request gets one 4xx JSON error
// naming what was wrong and the server keeps serving; authentication; local media paths; per-request
// KV policies; queue bound; admission by KV memory; client disconnects; graceful shutdown.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <thread>

#include "server_harness.h"
#include "test_util.h"

namespace fs = std::filesystem;
using nlohmann::json;
using namespace pkv::test;

namespace {

const std::string kKey = "test-key-123";
const std::vector<std::string> kAuth = {"Authorization: Bearer " + kKey};

std::string example_image() { return repo_path("data/example.png"); }

// The bundled model's shape, for the sizes the server must report.
struct ModelShape {
  int layers, entry_bytes, context;
};
const ModelShape& bundled() {
  static ModelShape m = [] {
    json c = json::parse(std::ifstream(repo_path("models/prefixkv-llava-tiny/config.json")))["text_config"];
    return ModelShape{c["num_hidden_layers"].get<int>(),
                      2 * c["num_key_value_heads"].get<int>() * c["head_dim"].get<int>() * 4,
                      c["max_position_embeddings"].get<int>()};
  }();
  return m;
}

json user_text(const std::string& text, int max_tokens = 8) {
  return {{"messages", {{{"role", "user"}, {"content", text}}}}, {"max_tokens", max_tokens}};
}

json user_image(const std::string& url, const std::string& text = "Describe the image in detail.", int max_tokens = 8) {
  return {
      {"messages",
       {{{"role", "user"},
         {"content", {{{"type", "image_url"}, {"image_url", {{"url", url}}}}, {{"type", "text"}, {"text", text}}}}}}},
      {"max_tokens", max_tokens}};
}

HttpReply chat(const ServerProcess& s, const std::string& body, const std::vector<std::string>& headers = kAuth) {
  return http_request(s.port(), "POST", "/v1/chat/completions", body, headers);
}

// One 4xx answer in OpenAI's error shape whose message holds `fragment`.
void expect_error(const HttpReply& r, int status, const std::string& fragment, const std::string& what) {
  EXPECT_EQ(r.status, status) << what << ": " << r.body;
  EXPECT_NE(r.headers.count("content-type") ? r.headers.at("content-type").find("application/json") : std::string::npos,
            std::string::npos)
      << what;
  json j = json::parse(r.body, nullptr, false);
  ASSERT_TRUE(j.is_object() && j.contains("error")) << what << ": " << r.body;
  EXPECT_TRUE(j["error"]["message"].is_string()) << what;
  EXPECT_TRUE(j["error"]["type"].is_string()) << what;
  EXPECT_TRUE(j["error"].contains("code")) << what;
  EXPECT_NE(j["error"]["message"].get<std::string>().find(fragment), std::string::npos)
      << what << ": missing '" << fragment << "' in " << r.body;
}

}  // namespace

TEST(ServerHttp, BadRequestsGetOneJsonErrorEachAndTheServerKeepsServing) {
  const fs::path media = fs::path(temp_path("media"));
  fs::create_directories(media);
  fs::copy_file(example_image(), media / "ok.png", fs::copy_options::overwrite_existing);
  std::ofstream(media / "../outside.png", std::ios::binary) << std::ifstream(example_image(), std::ios::binary).rdbuf();
  ServerProcess s("--api-key " + kKey + " --media-dir " + media.string() + " --max-body-mb 1");
  ASSERT_TRUE(s.started()) << s.log();

  const std::string png = data_uri(example_image());
  struct Case {
    std::string what, body;
    int status;
    std::string fragment;
  };
  json wrong_model = user_text("hi");
  wrong_model["model"] = "gpt-4o";
  json two_images = user_image(png);
  two_images["messages"][0]["content"].push_back({{"type", "image_url"}, {"image_url", {{"url", png}}}});
  json bad_policy = user_text("hi");
  bad_policy["kv_policy"] = "magic";
  json bad_budget = user_text("hi");
  bad_budget["kv_budget"] = 1.5;
  json last_assistant = {
      {"messages", {{{"role", "user"}, {"content", "hi"}}, {{"role", "assistant"}, {"content", "yo"}}}}};
  json n2 = user_text("hi");
  n2["n"] = 2;
  std::string long_prompt;
  for (int i = 0; i < bundled().context + 50; ++i) long_prompt += "word ";
  const std::string context = std::to_string(bundled().context) + " tokens";
  const std::vector<Case> cases = {
      {"malformed JSON", R"({"messages": [{"role": "user", "content": "hi"})", 400, "not valid JSON"},
      {"not an object", R"([1, 2, 3])", 400, "must be a JSON object"},
      {"messages missing", R"({"max_tokens": 3})", 400, "messages: is required"},
      {"messages of the wrong type", R"({"messages": "hello"})", 400, "messages: expected an array, got string"},
      {"content of the wrong type", R"({"messages": [{"role": "user", "content": 42}]})", 400,
       "messages[0].content: expected a string or an array of parts"},
      {"max_tokens of the wrong type", R"({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "8"})", 400,
       "max_tokens: expected an integer, got string"},
      {"temperature of the wrong type", R"({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"})",
       400, "temperature: expected a number"},
      {"stream of the wrong type", R"({"messages": [{"role": "user", "content": "hi"}], "stream": "yes"})", 400,
       "stream: expected a boolean"},
      {"unknown role", R"({"messages": [{"role": "wizard", "content": "hi"}]})", 400, "messages[0].role"},
      {"unknown model", wrong_model.dump(), 404, "gpt-4o"},
      {"bad base64", user_image("data:image/png;base64,@@not*base64@@").dump(), 400,
       "messages[0].content[0].image_url.url: not valid base64"},
      {"data that is not an image", user_image("data:image/png;base64,aGVsbG8gd29ybGQ=").dump(), 400,
       "not a PNG or JPEG image"},
      {"truncated image", user_image(png.substr(0, 400)).dump(), 400, "messages[0].content[0].image_url.url"},
      {"a path outside the media folder", user_image("../outside.png").dump(), 400, "outside the media folder"},
      {"an absolute path outside the media folder", user_image("/etc/passwd").dump(), 400, "outside the media folder"},
      {"a missing media file", user_image("nope.png").dump(), 400, "no image file"},
      {"a remote URL", user_image("https://example.com/cat.png").dump(), 400, "not fetched"},
      {"two images", two_images.dump(), 400, "only one image per request"},
      {"too many tokens (max_tokens)", user_text("hi", bundled().context).dump(), 400, "context of " + context},
      {"too many tokens (prompt)", user_text(long_prompt).dump(), 400, "the model's context is " + context},
      {"unknown policy", bad_policy.dump(), 400, "kv_policy: unknown policy 'magic'"},
      {"budget out of range", bad_budget.dump(), 400, "kv_budget: must be in (0, 1]"},
      {"last message not the user's", last_assistant.dump(), 400, "the last message must be the user's"},
      {"n = 2", n2.dump(), 400, "only n = 1"},
      {"oversized body", user_text(std::string(2 << 20, 'a')).dump(), 413, "larger than the server's limit of 1 MiB"},
      // A data URI is part of the body: its base64 counts against the same limit.
      {"an image over the body limit", user_image("data:image/png;base64," + std::string(3 << 19, 'A')).dump(), 413,
       "larger than the server's limit of 1 MiB"},
  };
  for (const Case& c : cases) expect_error(chat(s, c.body), c.status, c.fragment, c.what);

  expect_error(chat(s, user_text("hi").dump(), {"Authorization: Bearer wrong"}), 401, "incorrect API key", "wrong key");
  expect_error(chat(s, user_text("hi").dump(), {}), 401, "no API key", "no key");
  expect_error(http_request(s.port(), "GET", "/v1/models"), 401, "no API key", "models without a key");
  expect_error(http_request(s.port(), "GET", "/v1/nothing", "", kAuth), 404, "no such endpoint", "unknown endpoint");
  expect_error(http_request(s.port(), "GET", "/v1/models/other", "", kAuth), 404, "other", "unknown model id");
  EXPECT_EQ(http_request(s.port(), "GET", "/health").status, 200);  // open without a key

  // Still serving: a valid request, a local path inside the media folder, the model list.
  HttpReply ok = chat(s, user_image("ok.png").dump());
  ASSERT_EQ(ok.status, 200) << ok.body;
  json j = json::parse(ok.body);
  EXPECT_EQ(j["object"], "chat.completion");
  EXPECT_GT(j["usage"]["prompt_tokens"].get<int>(), 576);  // the image's tokens and the template's
  EXPECT_EQ(j["usage"]["completion_tokens"].get<int>(), 8);
  HttpReply models = http_request(s.port(), "GET", "/v1/models", "", kAuth);
  ASSERT_EQ(models.status, 200);
  EXPECT_EQ(json::parse(models.body)["data"][0]["id"], "prefixkv-llava-tiny");
  s.metric_headers = kAuth;
  EXPECT_EQ(s.metric("prefixkv_http_requests_total{route=\"/v1/chat/completions\",status=\"400\"}"), 23);
  EXPECT_EQ(s.stop(), 0) << s.log();
  fs::remove(media / "../outside.png");
}

TEST(ServerHttp, KvPolicyPerRequestUsageAndMultiTurn) {
  ServerProcess s("--kv-memory 64");
  ASSERT_TRUE(s.started()) << s.log();
  json full = user_image(data_uri(example_image()), "Describe the image in detail.", 16);
  full["ignore_eos"] = true;
  json compressed = full;
  compressed["kv_policy"] = "streaming";
  compressed["kv_budget"] = 0.2;
  HttpReply a = chat(s, full.dump()), b = chat(s, compressed.dump());
  ASSERT_EQ(a.status, 200) << a.body;
  ASSERT_EQ(b.status, 200) << b.body;
  json ja = json::parse(a.body), jb = json::parse(b.body);
  EXPECT_EQ(ja["prefixkv"]["kv_policy"], "full");
  EXPECT_EQ(jb["prefixkv"]["kv_policy"], "streaming");
  EXPECT_EQ(ja["usage"]["kv_bytes"], ja["usage"]["kv_bytes_full"]);
  EXPECT_EQ(ja["usage"]["kv_bytes_full"], jb["usage"]["kv_bytes_full"]);
  // Every layer holds the prompt and the 15 generated tokens fed back, and about a fifth of it.
  const int prompt = ja["usage"]["prompt_tokens"].get<int>();
  EXPECT_EQ(ja["usage"]["kv_bytes"].get<size_t>(), size_t(bundled().layers) * (prompt + 15) * bundled().entry_bytes);
  EXPECT_LT(jb["usage"]["kv_bytes"].get<double>(), 0.25 * ja["usage"]["kv_bytes"].get<double>());

  // A conversation: system text, a finished turn, then the question.
  json conv = {{"messages",
                {{{"role", "system"}, {"content", "You describe pictures."}},
                 {{"role", "user"}, {"content", "Hello"}},
                 {{"role", "assistant"}, {"content", "Hi."}},
                 {{"role", "user"}, {"content", "Say something."}}}},
               {"max_tokens", 4},
               {"stop", {"zzz"}}};
  HttpReply c = chat(s, conv.dump());
  ASSERT_EQ(c.status, 200) << c.body;
  EXPECT_GT(json::parse(c.body)["usage"]["prompt_tokens"].get<int>(), 10);
  EXPECT_EQ(s.stop(), 0) << s.log();
}

TEST(ServerHttp, QueueBoundAdmissionByKvMemoryAndDisconnects) {
  // A full-cache request of ~10 prompt tokens + 1000 reserves its layers x 1010 entries: the pool
  // holds one and a third (one runs at a time); at a 20% budget about a fifth of that (several fit).
  const double full_bytes = double(bundled().layers) * 1010 * bundled().entry_bytes;
  const int pool_mb = int(std::ceil(1.35 * full_bytes / (1 << 20)));
  ServerProcess s("--kv-memory " + std::to_string(pool_mb) + " --max-running 8 --max-queue 3");
  ASSERT_TRUE(s.started()) << s.log();
  auto long_request = [](const std::string& policy) {
    json j = user_text("Tell me a long story.", 1000);
    j["ignore_eos"] = true;
    j["stream"] = true;
    if (!policy.empty()) {
      j["kv_policy"] = policy;
      j["kv_budget"] = 0.2;
    }
    return j.dump();
  };
  // The value that met the condition (not a second read: the gauges move while requests arrive).
  auto wait_for = [&](const std::string& metric, double value) {
    double v = s.metric(metric);
    for (int i = 0; i < 200 && v != value; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(25));
      v = s.metric(metric);
    }
    return v;
  };
  // Both gauges at once: while the three requests arrive (slowly on a loaded machine), "2 queued"
  // can also be seen before the first is admitted.
  auto wait_state = [&](double running, double queued) {
    for (int i = 0; i < 400; ++i) {
      if (s.metric("prefixkv_requests_running") == running && s.metric("prefixkv_requests_queued") == queued) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(25));
    }
    return false;
  };

  // Full cache: the first runs, the next ones wait for memory.
  std::vector<int> fds;
  for (int i = 0; i < 3; ++i) fds.push_back(http_open_post(s.port(), "/v1/chat/completions", long_request("")));
  EXPECT_TRUE(wait_state(1, 2)) << "running " << s.metric("prefixkv_requests_running") << ", queued "
                                << s.metric("prefixkv_requests_queued");
  EXPECT_GT(s.metric("prefixkv_kv_reserved_bytes"), full_bytes * 0.99);
  for (int i = 0; i < 200 && s.metric("prefixkv_kv_used_bytes") <= 0; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(25));
  EXPECT_GT(s.metric("prefixkv_kv_used_bytes"), 0);
  EXPECT_EQ(s.metric("prefixkv_requests_queued"), 2);  // still waiting: the pool is the limit, not --max-running
  // One more fits in the queue; the one after gets 503 with a JSON error.
  fds.push_back(http_open_post(s.port(), "/v1/chat/completions", long_request("")));
  EXPECT_EQ(wait_for("prefixkv_requests_queued", 3), 3);
  HttpReply busy = chat(s, user_text("hi").dump(), {});
  expect_error(busy, 503, "busy", "queue full");
  EXPECT_EQ(busy.headers["retry-after"], "1") << "a full queue says when to try again";
  // A request that could never fit the pool is refused at once.
  expect_error(chat(s, user_text("hi", 2 * 1010).dump(), {}), 400, "--kv-memory", "larger than the pool");

  // Clients that hang up free their slots (running and queued).
  for (int fd : fds) ::close(fd);
  EXPECT_EQ(wait_for("prefixkv_requests_running", 0), 0);
  EXPECT_EQ(wait_for("prefixkv_requests_queued", 0), 0);
  EXPECT_EQ(s.metric("prefixkv_kv_reserved_bytes"), 0);
  EXPECT_EQ(s.metric("prefixkv_requests_finished_total{outcome=\"cancelled\"}"), 4);

  // At a 20% budget three run at once in the same pool.
  fds.clear();
  for (int i = 0; i < 3; ++i)
    fds.push_back(http_open_post(s.port(), "/v1/chat/completions", long_request("streaming")));
  EXPECT_EQ(wait_for("prefixkv_requests_running", 3), 3);
  EXPECT_EQ(s.metric("prefixkv_requests_queued"), 0);
  for (int fd : fds) ::close(fd);
  EXPECT_EQ(wait_for("prefixkv_requests_running", 0), 0);

  // A non-streamed request whose client hangs up is dropped too.
  json quiet = json::parse(long_request(""));
  quiet.erase("stream");
  int fd = http_open_post(s.port(), "/v1/chat/completions", quiet.dump());
  EXPECT_EQ(wait_for("prefixkv_requests_running", 1), 1);
  ::close(fd);
  EXPECT_EQ(wait_for("prefixkv_requests_running", 0), 0);
  EXPECT_EQ(s.metric("prefixkv_requests_finished_total{outcome=\"cancelled\"}"), 8);

  EXPECT_EQ(s.stop(), 0) << s.log();
}

// SIGTERM drains: new connections are refused at once, the requests in flight (running and queued)
// go on to their whole answers, then the server exits 0. A second signal ends what is left with an
// error event.
TEST(ServerHttp, SigtermFinishesTheRequestsInFlightAndRefusesNewOnes) {
  auto stream = [](int max_tokens) {
    json j = user_text("Tell me a long story.", max_tokens);
    j["ignore_eos"] = true;
    j["stream"] = true;
    return j.dump();
  };
  {
    ServerProcess s("--max-running 1");
    ASSERT_TRUE(s.started()) << s.log();
    const int port = s.port();
    const int running = http_open_post(port, "/v1/chat/completions", stream(300));
    std::string got_running, got_queued;
    ASSERT_TRUE(read_until(running, "\"finish_reason\":null", &got_running));
    const int queued = http_open_post(port, "/v1/chat/completions", stream(20));
    for (int i = 0; i < 400 && s.metric("prefixkv_requests_queued") != 1; ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    ::kill(s.pid(), SIGTERM);
    // Refused from the moment the signal is handled (the answers in flight take longer than that).
    HttpReply late;
    for (int i = 0; i < 200; ++i) {
      late = http_request(port, "GET", "/health", "", {}, 5);
      if (late.status == 0) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    EXPECT_EQ(late.status, 0) << "a new connection was served while the server drained";
    EXPECT_TRUE(read_until(running, "data: [DONE]", &got_running, 60)) << got_running;
    EXPECT_TRUE(read_until(queued, "data: [DONE]", &got_queued, 60)) << got_queued;
    EXPECT_EQ(got_running.find("server_shutting_down"), std::string::npos);
    EXPECT_NE(got_running.find("\"finish_reason\":\"length\""), std::string::npos);
    ::close(running);
    ::close(queued);
    EXPECT_EQ(s.stop(), 0) << s.log();
    EXPECT_NE(s.log().find("no new requests; finishing 1 running and 1 queued"), std::string::npos) << s.log();
  }
  {
    ServerProcess s("");
    ASSERT_TRUE(s.started()) << s.log();
    const int fd = http_open_post(s.port(), "/v1/chat/completions", stream(1500));
    std::string got;
    ASSERT_TRUE(read_until(fd, "\"finish_reason\":null", &got));
    ::kill(s.pid(), SIGTERM);
    // The second signal once the first has been handled (two sent at once may arrive as one).
    for (int i = 0; i < 200 && http_request(s.port(), "GET", "/health", "", {}, 5).status != 0; ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    ::kill(s.pid(), SIGTERM);
    EXPECT_TRUE(read_until(fd, "server_shutting_down", &got, 20)) << got;
    ::close(fd);
    EXPECT_EQ(s.stop(), 0) << s.log();
    EXPECT_NE(s.log().find("second signal: ending the requests left (1 running"), std::string::npos) << s.log();
  }
}
