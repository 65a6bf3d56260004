// A bounded load test on loopback: 64 concurrent clients, a few hundred requests of every kind
// (plain, streamed, with an image, compressed cache, and invalid ones) against one server. Every
// request is answered with the status its kind should get, nothing crashes, the KV pool and the
// resident memory come back to their idle level, and a normal request still works afterwards.
#include <gtest/gtest.h>

#include <atomic>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <thread>

#include "server_harness.h"
#include "test_util.h"

using nlohmann::json;
using namespace pkv::test;

namespace {

struct Kind {
  std::string name;
  std::string body;
  std::vector<int> allowed;  // statuses this kind may get (a valid request may also find the queue full)
};

std::vector<Kind> request_kinds() {
  const std::string image = data_uri(repo_path("data/example.png"));
  auto text = [](const std::string& t, int max_tokens) {
    return json{{"messages", {{{"role", "user"}, {"content", t}}}}, {"max_tokens", max_tokens}, {"ignore_eos", true}};
  };
  json streamed = text("Count with me.", 6);
  streamed["stream"] = true;
  json compressed = text("What is in the picture?", 6);
  compressed["kv_policy"] = "snapkv";
  compressed["kv_budget"] = 0.3;
  json with_image = {
      {"messages",
       {{{"role", "user"},
         {"content",
          {{{"type", "image_url"}, {"image_url", {{"url", image}}}}, {{"type", "text"}, {"text", "Describe."}}}}}}},
      {"max_tokens", 4}};
  json unknown_model = text("hi", 4);
  unknown_model["model"] = "nope";
  json bad_image = with_image;
  bad_image["messages"][0]["content"][0]["image_url"]["url"] = "data:image/png;base64,!!!";
  const std::vector<int> ok = {200, 503};
  return {
      {"plain", text("Hello there.", 5).dump(), ok},
      {"streamed", streamed.dump(), ok},
      {"compressed", compressed.dump(), ok},
      {"plain", text("Tell me about shapes.", 8).dump(), ok},
      {"malformed", R"({"messages": [)", {400}},
      {"wrong type", R"({"messages": [{"role": "user", "content": "hi"}], "top_p": "high"})", {400}},
      {"unknown model", unknown_model.dump(), {404}},
      {"bad base64", bad_image.dump(), {400}},
      {"too many tokens", text("hi", 4000).dump(), {400}},
      {"image", with_image.dump(), ok},
  };
}

}  // namespace

TEST(ServerLoad, SixtyFourClientsMixedRequestsEveryOneAnswered) {
  ServerProcess s("--max-running 16 --max-queue 32 --kv-memory 256");
  ASSERT_TRUE(s.started()) << s.log();
  const std::vector<Kind> kinds = request_kinds();

  // Idle level after a warm-up of each valid kind (weights paged in, buffers at their size).
  for (const Kind& k : kinds) {
    if (k.allowed.size() > 1) {
      ASSERT_EQ(http_request(s.port(), "POST", "/v1/chat/completions", k.body).status, 200) << k.name;
    }
  }
  const size_t idle_rss = s.rss_bytes();
  ASSERT_GT(idle_rss, 0u);

  const int clients = 64, per_client = 5;  // 320 requests
  std::atomic<int> next{0}, answered{0}, ok200{0}, busy503{0};
  std::mutex mu;
  std::vector<std::string> failures;
  std::vector<std::thread> threads;
  for (int c = 0; c < clients; ++c) {
    threads.emplace_back([&, c] {
      for (int i = 0; i < per_client; ++i) {
        const Kind& k = kinds[size_t(next++) % kinds.size()];
        const HttpReply r = http_request(s.port(), "POST", "/v1/chat/completions", k.body, {}, 120);
        if (r.status != 0) ++answered;
        if (r.status == 200) ++ok200;
        if (r.status == 503) ++busy503;
        bool good = std::find(k.allowed.begin(), k.allowed.end(), r.status) != k.allowed.end();
        if (good && r.status == 200 && k.name == "streamed")
          good = r.body.find("data: [DONE]") != std::string::npos;
        else if (good && r.status == 200)
          good = json::parse(r.body, nullptr, false).contains("choices");
        else if (good)
          good = json::parse(r.body, nullptr, false).contains("error");
        if (!good) {
          std::lock_guard lk(mu);
          failures.push_back("client " + std::to_string(c) + " " + k.name + ": " + std::to_string(r.status) + " " +
                             r.body.substr(0, 300) + r.error);
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(answered, clients * per_client);
  EXPECT_TRUE(failures.empty()) << failures.size() << " wrong answers, e.g. " << failures.front() << "\nserver log:\n"
                                << s.log();
  // Valid requests are answered 200, or 503 when 48 are already running or queued.
  EXPECT_GE(ok200, clients * per_client / 8) << "503: " << busy503;

  // Back to idle: nothing running or reserved, and the memory given back.
  for (int i = 0; i < 100 && s.metric("prefixkv_requests_running") != 0; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_EQ(s.metric("prefixkv_requests_running"), 0);
  EXPECT_EQ(s.metric("prefixkv_requests_queued"), 0);
  EXPECT_EQ(s.metric("prefixkv_kv_reserved_bytes"), 0);
  EXPECT_EQ(s.metric("prefixkv_kv_used_bytes"), 0);
  size_t rss = s.rss_bytes();
  for (int i = 0; i < 40 && rss > idle_rss + (48u << 20); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    rss = s.rss_bytes();
  }
  EXPECT_LE(rss, idle_rss + (48u << 20)) << "idle " << (idle_rss >> 20) << " MiB, after the load " << (rss >> 20)
                                         << " MiB";
  std::printf("[load] %d answered: %d x 200, %d x 503; RSS idle %zu MiB, after %zu MiB\n", int(answered), int(ok200),
              int(busy503), idle_rss >> 20, rss >> 20);

  const HttpReply after = http_request(s.port(), "POST", "/v1/chat/completions", kinds[0].body);
  EXPECT_EQ(after.status, 200) << after.body;
  EXPECT_EQ(s.stop(), 0) << s.log();
}
