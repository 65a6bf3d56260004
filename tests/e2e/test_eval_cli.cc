// calibrate and eval end to end on a fixture model with the bundled data sets' format.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>

#include <nlohmann/json.hpp>

#include "kv/profile.h"
#include "test_util.h"

namespace fs = std::filesystem;
using nlohmann::json;
using namespace pkv;

namespace {
using test::prefixkv;
using test::Result;

const std::string kModel = test::data_path("fixtures/llava_hf_mha");
std::string repo(const std::string& rel) { return std::string(PKV_TEST_DATA) + "/../../" + rel; }

// A small data set: two real scenes, one with a missing image, in the detail_1k format.
std::string write_data(const std::string& tag) {
  fs::path d = test::temp_path(tag);
  fs::create_directories(d);
  json src = json::parse(std::ifstream(repo("data/calib/calib.json")));
  json out = json::array();
  for (int i = 0; i < 2; ++i) {
    json e = src[size_t(i)];
    e["image"] = fs::absolute(repo("data/calib/" + e["image"].get<std::string>())).string();
    out.push_back(e);
  }
  json missing = src[2];
  missing["image"] = "/nonexistent/picture.png";
  out.insert(out.begin() + 1, missing);
  std::ofstream(d / "data.json") << out.dump();
  return (d / "data.json").string();
}
}  // namespace

TEST(CalibrateCli, WritesAValidProfileAndSkipsBrokenSamples) {
  const std::string data = write_data("calib");
  const std::string out = test::temp_path("profile.json");
  Result r = prefixkv("calibrate --model " + kModel + " --data " + data + " --out " + out + " --budgets 0.2,0.5 --plot " +
                      test::temp_path("p.svg"));
  ASSERT_EQ(r.rc, 0) << r.out;
  EXPECT_NE(r.out.find("skipping sample"), std::string::npos) << r.out;
  Profile p = Profile::load(out);
  EXPECT_EQ(p.samples, 2);
  EXPECT_EQ(p.n_layers(), 2);
  ASSERT_EQ(p.budgets.size(), 2u);
  for (auto& b : p.budgets) EXPECT_NEAR((b.keep[0] + b.keep[1]) / 2, b.budget, 1e-9);
  EXPECT_TRUE(fs::exists(test::temp_path("p.svg")));
  // The profile drives the prefixkv policy through run.
  Result run = prefixkv("run --model " + kModel + " --image " + test::data_path("images/wide.png") +
                        " --max-tokens 2 --json --kv-policy prefixkv --kv-budget 0.5 --kv-profile " + out);
  ASSERT_EQ(run.rc, 0) << run.out;
  json j = json::parse(run.out);
  const int N = j["prompt_tokens"];
  EXPECT_EQ(j["kv"]["prefill_kept_per_layer"][0].get<int>() + j["kv"]["prefill_kept_per_layer"][1].get<int>(),
            int(std::lround(0.5 * N * 2)));
}

// --allocate-from answer: the layer budgets from the attention the reference answers pay (teacher
// forced); recorded in the profile, and not the prompt-allocated fractions.
TEST(CalibrateCli, AllocateFromTheAnswers) {
  const std::string data = write_data("calib_answer");
  const std::string a = test::temp_path("profile_answer.json"), p = test::temp_path("profile_prompt.json");
  Result ra = prefixkv("calibrate --model " + kModel + " --data " + data + " --out " + a +
                       " --budgets 0.2,0.5 --allocate-from answer");
  ASSERT_EQ(ra.rc, 0) << ra.out;
  EXPECT_NE(ra.out.find("reference-answer"), std::string::npos) << ra.out;
  Result rp = prefixkv("calibrate --model " + kModel + " --data " + data + " --out " + p + " --budgets 0.2,0.5");
  ASSERT_EQ(rp.rc, 0) << rp.out;
  const Profile pa = Profile::load(a), pp = Profile::load(p);
  EXPECT_EQ(pa.allocation, "answer");
  EXPECT_EQ(pp.allocation, "prompt");
  EXPECT_EQ(pa.samples, 2);
  ASSERT_EQ(pa.budgets.size(), 2u);
  for (auto& b : pa.budgets) EXPECT_NEAR((b.keep[0] + b.keep[1]) / 2, b.budget, 1e-9);
  EXPECT_NE(pa.budgets[0].keep, pp.budgets[0].keep);
  Result bad = prefixkv("calibrate --model " + kModel + " --data " + data + " --out " + a + " --allocate-from oracle");
  EXPECT_NE(bad.rc, 0);
  EXPECT_NE(bad.out.find("--allocate-from"), std::string::npos) << bad.out;
}

TEST(CalibrateCli, ImportOfficialProfiles) {
  const std::string dir = test::shared_path("reference/official-profiles");
  PKV_NEED_PATH(dir);
  const std::string out = test::temp_path("official.json");
  std::string files;
  for (int r = 0; r <= 9; ++r) files += " " + dir + "/prefixkv_llava-v1.5-7b_0." + std::to_string(r) + ".json";
  Result res = prefixkv("calibrate --import-official" + files + " --out " + out);
  ASSERT_EQ(res.rc, 0) << res.out;
  Profile p = Profile::load(out);
  EXPECT_EQ(p.n_layers(), 32);
  json e = json::parse(std::ifstream(dir + "/prefixkv_llava-v1.5-7b_0.8.json"));
  const ProfileBudget* b = p.find(0.2);
  ASSERT_TRUE(b);
  for (int l = 0; l < 32; ++l) EXPECT_DOUBLE_EQ(b->keep[size_t(l)], 1.0 - e[size_t(l)].get<double>());
  // A 32-layer profile on a 2-layer model is refused with both identities named.
  Result bad = prefixkv("run --model " + kModel + " --prompt hi --kv-policy prefixkv --kv-profile " + out);
  EXPECT_EQ(bad.rc, 1);
  EXPECT_NE(bad.out.find("layer"), std::string::npos) << bad.out;
}

TEST(EvalCli, RecordsForEveryConfigAndSkippedSamples) {
  const std::string data = write_data("eval");
  const std::string out = test::temp_path("results.json");
  Result r = prefixkv("eval --model " + kModel + " --data " + data + " --truth " + repo("data/calib/truth.json") +
                      " --policies streaming,uniform-prefix,prefixkv-online --estimators window,normalized "
                      "--budgets 0.2,1.0 --max-tokens 8 --out " + out + " --plot " + test::temp_path("r.svg"));
  ASSERT_EQ(r.rc, 0) << r.out;
  json j = json::parse(std::ifstream(out));
  EXPECT_EQ(j["samples"], 2);
  ASSERT_EQ(j["skipped"].size(), 1u);
  EXPECT_NE(j["skipped"][0]["reason"].get<std::string>().find("/nonexistent/picture.png"), std::string::npos);
  // streaming x 2 budgets + 2 prefix policies x 2 estimators x 2 budgets.
  EXPECT_EQ(j["records"].size(), 10u);
  for (auto& rec : j["records"]) {
    for (auto k : {"policy", "budget", "ppl", "rouge_l", "accuracy", "kld", "kv_bytes", "samples"})
      EXPECT_TRUE(rec.contains(k)) << k;
    if (rec["budget"] == 1.0) {
      // Budget 1.0 is the full cache: same PPL, no divergence, identical answers.
      EXPECT_NEAR(rec["ppl"].get<double>(), j["full"]["ppl"].get<double>(), 1e-9);
      EXPECT_NEAR(rec["kld"].get<double>(), 0.0, 1e-12);
      EXPECT_DOUBLE_EQ(rec["rouge_l"].get<double>(), 1.0);
      EXPECT_DOUBLE_EQ(rec["kv_bytes"].get<double>(), j["full"]["kv_bytes"].get<double>());
      EXPECT_DOUBLE_EQ(rec["kv_bytes_end"].get<double>(), j["full"]["kv_bytes_end"].get<double>());
    } else {
      EXPECT_GT(rec["kld"].get<double>(), 0.0);
      EXPECT_LT(rec["kv_bytes"].get<double>(), 0.3 * j["full"]["kv_bytes"].get<double>());
    }
  }
  EXPECT_NE(r.out.find("| policy |"), std::string::npos) << "prints the table";
}

TEST(EvalCli, BadInput) {
  const std::string data = write_data("evalbad");
  auto err = [&](const std::string& a, const std::string& frag) {
    Result r = prefixkv(a);
    EXPECT_EQ(r.rc, 1) << a << "\n" << r.out;
    EXPECT_NE(r.out.find(frag), std::string::npos) << r.out;
  };
  err("eval --model " + kModel + " --data " + data + " --out /tmp/x.json --budgets 0,0.5", "--budgets");
  err("eval --model " + kModel + " --data " + data + " --out /tmp/x.json --budgets 1.5", "--budgets");
  err("eval --model " + kModel + " --data " + data + " --out /tmp/x.json --policies nope", "nope");
  err("eval --model " + kModel + " --data " + data + " --out /tmp/x.json --estimators fancy", "fancy");
  const std::string bad = test::temp_path("bad.json");
  std::ofstream(bad) << "{\"not\": \"a list\"}";
  err("eval --model " + kModel + " --data " + bad + " --out /tmp/x.json", bad);
  std::ofstream(test::temp_path("broken_profile.json")) << "{\"format\": \"prefixkv-profile\", \"version\": 1";
  err("run --model " + kModel + " --prompt hi --kv-policy prefixkv --kv-profile " + test::temp_path("broken_profile.json"),
      "broken_profile.json");
}

// The testbeds through the command: the no-image control and the answer oracle on conversations,
// the text testbed (a JSON object of documents), each named in the JSON and the table; the answer
// estimator refused where no reference answer exists; options of the other kind of data refused.
TEST(EvalCli, TestbedsTheNoImageControlAndTheAnswerOracle) {
  const std::string data = write_data("eval_testbeds");
  const std::string out = test::temp_path("testbeds.json");
  Result r = prefixkv("eval --model " + kModel + " --data " + data + " --truth " + repo("data/calib/truth.json") +
                      " --policies uniform-prefix --estimators answer,window --budgets 0.5 --max-tokens 4 "
                      "--no-image-control --out " + out);
  ASSERT_EQ(r.rc, 0) << r.out;
  json j = json::parse(std::ifstream(out));
  EXPECT_EQ(j["testbed"], "descriptions");
  EXPECT_EQ(j["settings"]["no_image_control"], true);
  ASSERT_TRUE(j.contains("no_image"));
  EXPECT_EQ(j["no_image"]["samples"], 2);
  EXPECT_LT(j["no_image"]["kv_bytes"].get<double>(), 0.1 * j["full"]["kv_bytes"].get<double>()) << "the image is most";
  ASSERT_EQ(j["records"].size(), 2u);
  EXPECT_EQ(j["records"][0]["estimator"], "answer");
  EXPECT_NE(r.out.find("testbed descriptions"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("no-image control (every image entry evicted"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("| uniform-prefix/answer |"), std::string::npos) << r.out;

  // A text testbed of two held-out windows, cut to a short context for the fixture.
  json src = json::parse(std::ifstream(repo("data/text/heldout.json")));
  json text = {{"context_tokens", 16}, {"continuation_tokens", 6},
               {"documents", {src["documents"][0], src["documents"][1]}}};
  const std::string tdata = test::temp_path("text.json"), tout = test::temp_path("text_results.json");
  std::ofstream(tdata) << text.dump();
  Result t = prefixkv("eval --model " + kModel + " --data " + tdata + " --policies snapkv,uniform-prefix "
                      "--estimators window,answer --budgets 0.5 --text-context 12 --out " + tout + " --plot " +
                      test::temp_path("text.svg"));
  ASSERT_EQ(t.rc, 0) << t.out;
  json tj = json::parse(std::ifstream(tout));
  EXPECT_EQ(tj["testbed"], "text");
  EXPECT_EQ(tj["samples"], 2);
  EXPECT_EQ(tj["answer_tokens"], 12);
  EXPECT_EQ(tj["settings"]["text"]["context_tokens"], 12);
  EXPECT_EQ(tj["settings"]["text"]["continuation_tokens"], 6);
  ASSERT_EQ(tj["records"].size(), 3u);
  for (auto& rec : tj["records"]) {
    EXPECT_TRUE(rec["rouge_l"].is_null()) << "no greedy answers on text";
    EXPECT_GT(rec["kld"].get<double>(), 0.0);
  }
  EXPECT_NE(t.out.find("cells: PPL / top-1 / KLD"), std::string::npos) << t.out;

  auto err = [&](const std::string& a, const std::string& frag) {
    Result e = prefixkv(a);
    EXPECT_EQ(e.rc, 1) << a << "\n" << e.out;
    EXPECT_NE(e.out.find(frag), std::string::npos) << e.out;
  };
  err("eval --model " + kModel + " --data " + tdata + " --out /tmp/x.json --no-image-control", "--no-image-control");
  err("eval --model " + kModel + " --data " + tdata + " --out /tmp/x.json --truth " + repo("data/calib/truth.json"),
      "--truth");
  err("eval --model " + kModel + " --data " + data + " --out /tmp/x.json --text-context 8", "--text-context");
  err("run --model " + kModel + " --prompt hi --kv-policy uniform-prefix --kv-importance answer", "--kv-importance answer");
  err("calibrate --model " + kModel + " --data " + data + " --out /tmp/x.json --kv-importance answer",
      "--kv-importance answer");
}

// --bootstrap on the bundled model: intervals of every metric, paired comparisons against the full
// cache and the best uniform-budget baseline, the per-sample table they come from (PPL recomputed
// from it equals the point estimate exactly), the same numbers on a rerun, none with --bootstrap 0.
TEST(EvalCli, BootstrapIntervalsAndVerdicts) {
  const std::string out = test::temp_path("boot.json"), again = test::temp_path("boot_again.json"),
                    off = test::temp_path("boot_off.json");
  const std::string args = "eval --model " + repo("models/prefixkv-llava-tiny") + " --data " + repo("data/eval/eval.json") +
                           " --limit 3 --max-tokens 8 --budgets 0.2 --jobs 2"
                           " --policies snapkv,uniform-prefix,cutoff:wov2:floor=0.5 --bootstrap 200 --out ";
  Result r = prefixkv(args + out);
  ASSERT_EQ(r.rc, 0) << r.out;
  const json j = json::parse(std::ifstream(out));
  EXPECT_EQ(j["bootstrap"]["resamples"], 200);
  EXPECT_EQ(j["settings"]["bootstrap"], 200);
  ASSERT_EQ(j["per_sample"]["ids"].size(), 3u);
  ASSERT_EQ(j["per_sample"]["tokens"].size(), 3u);
  EXPECT_TRUE(j["full"]["ci"].contains("ppl"));
  EXPECT_TRUE(j["full"]["ci"].contains("accuracy"));
  ASSERT_EQ(j["records"].size(), 3u);
  std::map<std::string, json> recs;
  for (const json& rec : j["records"]) recs[rec["policy"]] = rec;
  const std::string best = recs["snapkv"]["ppl"].get<double>() <= recs["uniform-prefix"]["ppl"].get<double>()
                               ? "snapkv" : "uniform-prefix/window";
  for (auto& [name, rec] : recs) {
    SCOPED_TRACE(name);
    for (auto k : {"ppl", "rouge_l", "accuracy", "kld", "top1_agreement"}) {
      ASSERT_TRUE(rec["ci"].contains(k)) << k;
      EXPECT_LE(rec["ci"][k][0].get<double>(), rec["ci"][k][1].get<double>()) << k;
      ASSERT_TRUE(rec["vs_full"].contains(k)) << k;
      ASSERT_TRUE(rec["vs_best_baseline"].contains(k)) << k;
      const std::string v = rec["vs_best_baseline"][k]["verdict"];
      EXPECT_TRUE(v == "better" || v == "worse" || v == "tied") << v;
    }
    EXPECT_EQ(rec["vs_best_baseline"]["ppl"]["against"], best);
    EXPECT_EQ(rec["vs_best_baseline"]["ppl"].contains("meets_goal"), name == "cutoff:wov2:floor=0.5");
    // The PPL from the per-sample table, summed in order: the point estimate, to the bit.
    double nll = 0;
    int64_t tokens = 0;
    for (size_t i = 0; i < 3; ++i)
      nll += rec["per_sample"]["nll"][i].get<double>(), tokens += j["per_sample"]["tokens"][i].get<int64_t>();
    EXPECT_EQ(std::exp(nll / double(tokens)), rec["ppl"].get<double>());
    EXPECT_EQ(tokens, j["answer_tokens"].get<int64_t>());
  }
  // The best baseline against itself.
  const json& self = recs[best == "snapkv" ? "snapkv" : "uniform-prefix"]["vs_best_baseline"]["ppl"];
  EXPECT_EQ(self["diff"].get<double>(), 0.0);
  EXPECT_EQ(self["ci"], json::array({0.0, 0.0}));
  EXPECT_EQ(self["verdict"], "tied");
  EXPECT_NE(r.out.find(" ["), std::string::npos) << "the table shows intervals\n" << r.out;
  EXPECT_NE(r.out.find("issue 13"), std::string::npos) << "and the verdicts\n" << r.out;
  // A rerun gives the same intervals; --bootstrap 0 none, but the per-sample table.
  ASSERT_EQ(prefixkv(args + again).rc, 0);
  const json k = json::parse(std::ifstream(again));
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_EQ(j["records"][i]["ci"], k["records"][i]["ci"]);
    EXPECT_EQ(j["records"][i]["vs_best_baseline"], k["records"][i]["vs_best_baseline"]);
  }
  Result r0 = prefixkv("eval --model " + repo("models/prefixkv-llava-tiny") + " --data " + repo("data/eval/eval.json") +
                       " --limit 2 --max-tokens 4 --budgets 0.2 --policies snapkv --bootstrap 0 --out " + off);
  ASSERT_EQ(r0.rc, 0) << r0.out;
  const json o = json::parse(std::ifstream(off));
  EXPECT_FALSE(o.contains("bootstrap"));
  EXPECT_FALSE(o["records"][0].contains("ci"));
  EXPECT_FALSE(o["records"][0].contains("vs_best_baseline"));
  EXPECT_EQ(o["records"][0]["per_sample"]["nll"].size(), 2u);
  Result bad = prefixkv("eval --model " + repo("models/prefixkv-llava-tiny") + " --data " + repo("data/eval/eval.json") +
                        " --bootstrap -1 --out " + off);
  EXPECT_EQ(bad.rc, 1);
  EXPECT_NE(bad.out.find("--bootstrap"), std::string::npos) << bad.out;
}
