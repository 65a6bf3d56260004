// prefixkv bench: random weights of a named shape, batch sizes x policies x budgets, table + JSON;
// compression shrinks the KV bytes in proportion; bad options are one clear error each.
#include <gtest/gtest.h>

#include <fstream>

#include <nlohmann/json.hpp>

#include "test_util.h"

using nlohmann::json;
using namespace pkv;
using test::prefixkv;
using test::Result;

TEST(BenchCli, RecordsForEveryConfigAndCompressionShrinksTheCache) {
  const std::string out = test::temp_path("bench.json");
  Result r = prefixkv("bench --shape tiny --batch 1,3 --prompt 40 --gen 6 --policies full,snapkv,h2o --budgets 0.25 "
                      "--threads 2 --json " + out);
  ASSERT_EQ(r.rc, 0) << r.out;
  EXPECT_NE(r.out.find("| snapkv | 25% | 3 |"), std::string::npos) << r.out;
  json j = json::parse(std::ifstream(out));
  ASSERT_EQ(j["records"].size(), 6u);
  // The CPU back end measures none of a device's numbers (Backend::stats): they stay 0, no device named.
  EXPECT_FALSE(j.contains("gpu")) << j.dump();
  EXPECT_EQ(j["copy_bandwidth_bytes_per_s"].get<double>(), 0);
  EXPECT_EQ(j["importance_pass_ms"].get<double>(), 0);
  size_t full1 = 0;
  for (const json& x : j["records"]) {
    EXPECT_GT(x["decode_tokens_per_s"].get<double>(), 0);
    EXPECT_GT(x["prefill_ms"].get<double>(), 0);
    EXPECT_GT(x["kv_bytes_prefill"].get<size_t>(), 0u);
    for (const char* k : {"peak_gpu_gib", "floor_tokens_per_s", "step_gpu_ms", "step_policy_ms", "step_compact_gpu_ms",
                          "prefill_compact_ms"})
      EXPECT_EQ(x[k].get<double>(), 0) << k;
    const int B = x["batch"];
    const size_t full = x["kv_bytes_full"], end = x["kv_bytes_end"];
    // tiny: 12 layers x 2 x 4 kv heads x 32 x 4 bytes per entry, 46 entries per sequence
    EXPECT_EQ(full, size_t(B) * 46 * 12 * 2 * 4 * 32 * 4);
    if (x["policy"] == "full") {
      EXPECT_EQ(end, full);
      if (B == 1) full1 = end;
    } else {
      EXPECT_LT(end, full / 2) << x.dump();  // about 25% of the prompt's entries (+ decode growth)
    }
  }
  EXPECT_GT(full1, 0u);
}

// prefixkv on random weights: a synthetic profile (ramp_keep_fractions), so its prefill does its work
// and keeps the budget in all.
TEST(BenchCli, PrefixKVTakesASyntheticProfile) {
  const std::string out = test::temp_path("bench_prefixkv.json");
  Result r = prefixkv("bench --shape tiny --batch 1 --prompt 40 --gen 2 --policies full,prefixkv:reduce=max "
                      "--budgets 0.25 --threads 2 --json " + out);
  ASSERT_EQ(r.rc, 0) << r.out;
  json j = json::parse(std::ifstream(out));
  ASSERT_EQ(j["records"].size(), 2u);
  const json& full = j["records"][0];
  const json& pk = j["records"][1];
  EXPECT_EQ(pk["policy"], "prefixkv:reduce=max");
  // 12 layers keep round(0.25 x 40) = 10 entries each on average (the ramp's counts sum to 120).
  EXPECT_EQ(pk["kv_bytes_prefill"].get<size_t>(), size_t(120) * 2 * 4 * 32 * 4);
  EXPECT_EQ(full["kv_bytes_prefill"].get<size_t>(), size_t(40 * 12) * 2 * 4 * 32 * 4);
}

TEST(BenchCli, BadOptions) {
  struct Case {
    std::string args, needle;
  };
  for (const Case& c : std::vector<Case>{{"--shape llama-9000", "--shape"},
                                         {"--shape tiny --batch 0", "--batch"},
                                         {"--shape tiny --batch two", "--batch"},
                                         {"--shape tiny --policies prefixkv:heads", "per-head table"},
                                         {"--shape tiny --policies magic", "magic"},
                                         {"--shape tiny --budgets 1.5 --policies snapkv", "--budgets"},
                                         {"--shape tiny --prompt 2000 --gen 100", "2048"},
                                         {"--shape tiny --dtype f8", "--dtype"},
                                         {"--shape tiny --device tpu", "--device"}}) {
    Result r = prefixkv("bench " + c.args + " --gen 2 --prompt 8");
    if (c.args.find("--prompt 2000") != std::string::npos) r = prefixkv("bench " + c.args);
    EXPECT_NE(r.rc, 0) << c.args;
    EXPECT_NE(r.out.find(c.needle), std::string::npos) << c.args << ": " << r.out;
  }
}

// --device cuda: without a GPU or a CUDA build, one clear error naming CUDA; with one, it measures
// and says the device in its JSON.
TEST(BenchCli, DeviceCudaAnswersOrSaysWhyNot) {
  const std::string out = test::temp_path("bench_cuda.json");
  const Result r = prefixkv("bench --shape tiny --device cuda --batch 1 --prompt 8 --gen 2 --policies full --json " + out);
  EXPECT_EQ(r.out.find("Segmentation"), std::string::npos) << r.out;
  if (r.rc != 0) {
    EXPECT_NE(r.out.find("CUDA"), std::string::npos) << r.out;  // no device, or no CUDA back end
  } else {
    const json j = json::parse(std::ifstream(out));
    EXPECT_EQ(j["device"], "cuda") << j.dump();
    ASSERT_EQ(j["records"].size(), 1u);
    EXPECT_GT(j["records"][0]["decode_tokens_per_s"].get<double>(), 0);
  }
}
