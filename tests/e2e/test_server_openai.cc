// The official OpenAI client (the `openai` npm package, pinned by tests/e2e/openai/package-lock.json,
// run with node) talks to prefixkv serve: the model list, a plain and a streamed chat with an image
// whose greedy answers equal `prefixkv run` for the same request, and the client's own error types.
#include <gtest/gtest.h>

#include <filesystem>
#include <nlohmann/json.hpp>

#include "server_harness.h"
#include "test_util.h"

namespace fs = std::filesystem;
using nlohmann::json;
using namespace pkv::test;

TEST(ServerOpenAIClient, PlainAndStreamedChatWithImageEqualPrefixkvRun) {
  std::string out;
  PKV_SKIP_UNLESS(run_command("command -v node && command -v npm", &out) == 0,
                  "node or npm is not installed (scripts/setup.sh test installs them): the OpenAI client test cannot run");
  // The client is installed into the build folder (never the source tree), once: npm ci again only
  // when the lock file changed. flock keeps parallel test processes from installing at once.
  const fs::path dir = fs::path(PKV_BUILD_DIR) / "node_openai";
  fs::create_directories(dir);
  const std::string src = repo_path("tests/e2e/openai");
  const std::string install = "cd '" + dir.string() + "' && flock .install.lock sh -c '" + "cp " + src +
                              "/package.json " + src + "/package-lock.json " + src + "/chat.mjs . && " +
                              "(cmp -s package-lock.json node_modules/.installed-lock || " +
                              "(npm ci --no-audit --no-fund && cp package-lock.json node_modules/.installed-lock))'";
  ASSERT_EQ(run_command(install, &out), 0) << "installing the openai package failed:\n" << out;

  const int max_tokens = 48;
  const std::string image = repo_path("data/example.png");
  Result run = prefixkv("run --image " + image + " --prompt 'Describe the image in detail.' --max-tokens " +
                        std::to_string(max_tokens) + " --json");
  ASSERT_EQ(run.rc, 0) << run.out;
  const json expected = json::parse(run.out);

  ServerProcess s("--api-key sk-test");
  ASSERT_TRUE(s.started()) << s.log();
  out.clear();
  const int rc = run_command("node '" + (dir / "chat.mjs").string() + "' http://127.0.0.1:" + std::to_string(s.port()) +
                                 "/v1 sk-test '" + image + "' " + std::to_string(max_tokens),
                             &out);
  ASSERT_EQ(rc, 0) << out << "\nserver log:\n" << s.log();
  const json j = json::parse(out.substr(out.rfind("\n{") == std::string::npos ? 0 : out.rfind("\n{") + 1));

  EXPECT_EQ(j["models"], json::array({"prefixkv-llava-tiny"}));
  EXPECT_EQ(j["plain"]["text"], expected["text"]);
  EXPECT_EQ(j["plain"]["finish_reason"], "length");
  EXPECT_EQ(j["plain"]["usage"]["prompt_tokens"], expected["prompt_tokens"]);
  EXPECT_EQ(j["plain"]["usage"]["completion_tokens"].get<size_t>(), expected["tokens"].size());
  EXPECT_EQ(j["plain"]["usage"]["kv_bytes"], expected["kv"]["bytes"]);
  EXPECT_EQ(j["stream"]["text"], expected["text"]);
  EXPECT_GT(j["stream"]["chunks"].get<int>(), 10);  // streamed piece by piece, not in one go
  EXPECT_EQ(j["stream"]["finish_reason"], "length");
  EXPECT_EQ(j["stream"]["usage"]["completion_tokens"].get<size_t>(), expected["tokens"].size());
  EXPECT_EQ(j["errors"]["model"]["status"], 404) << j["errors"];
  EXPECT_EQ(j["errors"]["key"]["status"], 401) << j["errors"];
  EXPECT_EQ(j["errors"]["budget"]["status"], 400) << j["errors"];
  EXPECT_EQ(s.stop(), 0) << s.log();
}
