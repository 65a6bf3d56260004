#include <gtest/gtest.h>

#include "test_util.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <random>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "kv/profile.h"

namespace fs = std::filesystem;
using namespace pkv;

namespace {

double mean(const std::vector<double>& v) {
  double s = 0;
  for (double x : v) s += x;
  return s / double(v.size());
}

// Per-layer keep fractions with the given mean: a fixed shape rescaled.
std::vector<double> shaped(int L, double b) {
  std::vector<double> k(static_cast<size_t>(L));
  for (int l = 0; l < L; ++l) k[size_t(l)] = 0.3 + 0.7 * double((l * 7) % L) / double(L);
  rescale_to_mean(k, b, 0.0, 1.0);
  return k;
}

Profile calibrated_profile(int L) {
  Profile p;
  p.model = {"tiny-llava", "sha256:0123abcd", L};
  p.estimator = "window";
  p.window = 24;
  p.protected_tokens = 3;
  p.allocation = "answer";
  p.source = "calibrated";
  p.samples = 4;
  p.data = "data/calib.json";
  p.date = "2025-11-27T10:00:00Z";
  p.sample_ids = {"a", "b", "c", "d"};
  for (int i = 1; i <= 9; ++i) {
    ProfileBudget b;
    b.budget = i / 10.0;
    b.keep = shaped(L, b.budget);
    if (i % 2) {
      for (int l = 0; l < L; ++l) {
        b.keep_std.push_back(0.01 * l / L);
        b.keep_min.push_back(std::max(0.0, b.keep[size_t(l)] - 0.05));
        b.keep_max.push_back(std::min(1.0, b.keep[size_t(l)] + 0.05));
      }
    }
    p.set_budget(b);
  }
  return p;
}

void expect_equal(const Profile& a, const Profile& b) {
  EXPECT_EQ(a.model.name, b.model.name);
  EXPECT_EQ(a.model.fingerprint, b.model.fingerprint);
  EXPECT_EQ(a.model.n_layers, b.model.n_layers);
  EXPECT_EQ(a.estimator, b.estimator);
  EXPECT_EQ(a.window, b.window);
  EXPECT_EQ(a.protected_tokens, b.protected_tokens);
  EXPECT_EQ(a.allocation, b.allocation);
  EXPECT_EQ(a.source, b.source);
  EXPECT_EQ(a.samples, b.samples);
  EXPECT_EQ(a.data, b.data);
  EXPECT_EQ(a.date, b.date);
  EXPECT_EQ(a.sample_ids, b.sample_ids);
  ASSERT_EQ(a.imported.size(), b.imported.size());
  for (size_t i = 0; i < a.imported.size(); ++i) {
    EXPECT_EQ(a.imported[i].file, b.imported[i].file);
    EXPECT_EQ(a.imported[i].evicted, b.imported[i].evicted);
    EXPECT_EQ(a.imported[i].mean_evicted, b.imported[i].mean_evicted);
  }
  ASSERT_EQ(a.budgets.size(), b.budgets.size());
  for (size_t i = 0; i < a.budgets.size(); ++i) {
    EXPECT_EQ(a.budgets[i].budget, b.budgets[i].budget);
    EXPECT_EQ(a.budgets[i].keep, b.budgets[i].keep);  // bit-exact: JSON numbers round-trip
    EXPECT_EQ(a.budgets[i].keep_std, b.budgets[i].keep_std);
    EXPECT_EQ(a.budgets[i].keep_min, b.budgets[i].keep_min);
    EXPECT_EQ(a.budgets[i].keep_max, b.budgets[i].keep_max);
  }
}

void write_file(const std::string& path, const std::string& text) {
  std::ofstream f(path, std::ios::binary);
  f << text;
}

// Expects load() of `text` to fail with a message naming the file and containing every `needles`.
void expect_load_error(const std::string& text, std::initializer_list<std::string> needles) {
  const std::string path = test::temp_path("bad_profile.json");
  write_file(path, text);
  try {
    Profile::load(path);
    ADD_FAILURE() << "no error for:\n" << text.substr(0, 400);
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find(path), std::string::npos) << msg;
    for (const auto& n : needles) EXPECT_NE(msg.find(n), std::string::npos) << "'" << n << "' not in: " << msg;
  }
  fs::remove(path);
}

// Expects import_official(files) to fail naming `file` and containing `needle`.
void expect_import_error(const std::vector<std::string>& files, int layers, const std::string& file,
                         const std::string& needle) {
  try {
    import_official(files, layers);
    ADD_FAILURE() << "no error; expected one about " << file;
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find(file), std::string::npos) << msg;
    EXPECT_NE(msg.find(needle), std::string::npos) << "'" << needle << "' not in: " << msg;
  }
}

std::string official_dir() { return test::shared_path("reference/official-profiles"); }

}  // namespace

// ---- round trip ----

TEST(Profile, CalibratedWriteReadRoundTripKeepsEveryField) {
  const Profile p = calibrated_profile(12);
  const std::string path = test::temp_path("profile.json");
  p.save(path);
  const Profile q = Profile::load(path);
  expect_equal(p, q);
  EXPECT_EQ(q.path, path);
  // The written text is stable: saving what was read gives the same bytes.
  EXPECT_EQ(p.to_json(), q.to_json());
  EXPECT_FALSE(fs::exists(path + ".tmp"));
  fs::remove(path);
}

TEST(Profile, ImportedWriteReadRoundTripKeepsEveryField) {
  PKV_NEED_PATH(official_dir());
  std::vector<std::string> files;
  for (int i = 0; i <= 9; ++i) files.push_back(official_dir() + "/prefixkv_llava-v1.5-7b_0." + std::to_string(i) + ".json");
  const Profile p = import_official(files, 32);
  const std::string path = test::temp_path("imported.json");
  p.save(path);
  expect_equal(p, Profile::load(path));
  fs::remove(path);
}

TEST(Profile, FileLayoutIsTheDocumentedOne) {
  const Profile p = calibrated_profile(4);
  const auto j = nlohmann::json::parse(p.to_json());
  EXPECT_EQ(j["format"], "prefixkv-profile");
  EXPECT_EQ(j["version"], 1);
  EXPECT_EQ(j["model"]["name"], "tiny-llava");
  EXPECT_EQ(j["model"]["n_layers"], 4);
  EXPECT_EQ(j["importance"]["estimator"], "window");
  EXPECT_EQ(j["importance"]["window"], 24);
  EXPECT_EQ(j["importance"]["allocation"], "answer");
  EXPECT_EQ(j["protected_tokens"], 3);
  EXPECT_EQ(j["source"]["kind"], "calibrated");
  EXPECT_EQ(j["source"]["samples"], 4);
  EXPECT_EQ(j["budgets"].size(), 9u);
  EXPECT_EQ(j["budgets"][0]["keep"].size(), 4u);
  EXPECT_TRUE(j["budgets"][0].contains("keep_std"));
  EXPECT_FALSE(j["budgets"][1].contains("keep_std"));
  EXPECT_FALSE(p.table().empty());
}

// ---- the authors' files ----

TEST(Profile, ImportOfficialReproducesEveryFileExactly) {
  PKV_NEED_PATH(official_dir());
  for (const auto& [model, layers] : std::vector<std::pair<std::string, int>>{{"llava-v1.5-7b", 32}, {"llava-v1.5-13b", 40}}) {
    std::vector<std::string> files;
    for (int i = 9; i >= 0; --i) files.push_back(official_dir() + "/prefixkv_" + model + "_0." + std::to_string(i) + ".json");
    const Profile p = import_official(files, 0);
    EXPECT_EQ(p.model.name, model);
    EXPECT_EQ(p.model.fingerprint, "");
    EXPECT_EQ(p.n_layers(), layers);
    EXPECT_EQ(p.source, "imported");
    EXPECT_EQ(p.estimator, "paper");
    ASSERT_EQ(p.budgets.size(), 10u);
    ASSERT_EQ(p.imported.size(), 10u);
    for (int i = 0; i <= 9; ++i) {
      const double r = i / 10.0;
      const std::string name = "prefixkv_" + model + "_0." + std::to_string(i) + ".json";
      std::ifstream f(official_dir() + "/" + name);
      const auto arr = nlohmann::json::parse(f);
      ASSERT_EQ(int(arr.size()), layers) << name;
      // budgets ascending: r = 0.9 is budgets[0], r = 0.0 (budget 1.0) is budgets[9]
      const ProfileBudget& b = p.budgets[size_t(9 - i)];
      EXPECT_DOUBLE_EQ(b.budget, 1.0 - r) << name;
      ASSERT_EQ(p.find(1.0 - r), &b) << name;
      ASSERT_EQ(int(b.keep.size()), layers);
      double sum = 0;
      for (int l = 0; l < layers; ++l) {
        const double e = arr[size_t(l)].get<double>();
        EXPECT_EQ(b.keep[size_t(l)], 1.0 - e) << name << " layer " << l;
        sum += e;
      }
      const ImportedFile& imp = p.imported[size_t(9 - i)];
      EXPECT_EQ(imp.file, name);
      EXPECT_DOUBLE_EQ(imp.evicted, r);
      EXPECT_DOUBLE_EQ(imp.mean_evicted, sum / layers);
      EXPECT_LE(imp.mean_evicted, r + 1e-12);  // the authors truncate: mean a little below r
      EXPECT_GT(imp.mean_evicted, r - 0.01);
    }
    EXPECT_EQ(p.budgets.back().keep, std::vector<double>(size_t(layers), 1.0));
    // Layer 0 keeps the most in every file (reference/PAPER-NUMBERS.md).
    for (const auto& b : p.budgets)
      EXPECT_EQ(*std::max_element(b.keep.begin(), b.keep.end()), b.keep[0]) << model << " budget " << b.budget;
    // Applied at a stored budget the truncation is removed: mean exact, values within 1%.
    const auto k = p.keep_fractions(0.5);
    EXPECT_NEAR(mean(k), 0.5, 1e-12);
    for (int l = 0; l < layers; ++l) EXPECT_NEAR(k[size_t(l)], p.find(0.5)->keep[size_t(l)], 0.01);
  }
}

TEST(Profile, ImportOfficialBadInputNamesTheFile) {
  const std::string dir = test::temp_path("official");
  fs::create_directories(dir);
  auto put = [&](const std::string& name, const std::string& text) {
    write_file(dir + "/" + name, text);
    return dir + "/" + name;
  };
  const std::string arr4 = "[0.1, 0.2, 0.3, 0.4]";
  const std::string ok = put("prefixkv_m_0.5.json", arr4);
  const std::string obj = put("prefixkv_m_0.4.json", "{\"ratios\": [0.1]}");
  expect_import_error({ok, obj}, 0, obj, "not a JSON array");
  const std::string notjson = put("prefixkv_m_0.3.json", "[0.1, 0.2,");
  expect_import_error({notjson}, 0, notjson, "not valid JSON");
  const std::string range = put("prefixkv_m_0.2.json", "[0.1, 1.5, 0.3, 0.4]");
  expect_import_error({range}, 0, range, "outside [0, 1]");
  const std::string neg = put("prefixkv_m_0.25.json", "[0.1, -0.01, 0.3, 0.4]");
  expect_import_error({neg}, 0, neg, "[1]");
  const std::string str = put("prefixkv_m_0.35.json", "[0.1, \"x\", 0.3, 0.4]");
  expect_import_error({str}, 0, str, "not a number");
  expect_import_error({ok}, 32, ok, "has 4 layers, the model has 32");
  const std::string five = put("prefixkv_m_0.6.json", "[0.1, 0.2, 0.3, 0.4, 0.5]");
  expect_import_error({ok, five}, 0, five, "different models");
  const std::string other = put("prefixkv_other_0.6.json", arr4);
  expect_import_error({ok, other}, 0, other, "different models");
  const std::string noname = put("ratios_0.5.json", arr4);
  expect_import_error({noname}, 0, noname, "prefixkv_<model>_<r>.json");
  const std::string badr = put("prefixkv_m_half.json", arr4);
  expect_import_error({badr}, 0, badr, "'half'");
  const std::string r1 = put("prefixkv_m_1.0.json", arr4);
  expect_import_error({r1}, 0, r1, "0 <= r < 1");
  const std::string dup = put("prefixkv_m_0.50.json", arr4);
  expect_import_error({ok, dup}, 0, dup, "given twice");
  const std::string empty = put("prefixkv_m_0.7.json", "[]");
  expect_import_error({empty}, 0, empty, "empty");
  expect_import_error({dir + "/prefixkv_m_0.8.json"}, 0, "prefixkv_m_0.8.json", "cannot open");
  EXPECT_THROW(import_official({}, 0), Error);
  fs::remove_all(dir);
}

// ---- keep fractions: interpolation and rescaling ----

TEST(Profile, KeepFractionsAtStoredBudgetAreTheStoredOnes) {
  const Profile p = calibrated_profile(12);
  for (const auto& b : p.budgets) {
    const auto k = p.keep_fractions(b.budget);
    for (size_t l = 0; l < k.size(); ++l) EXPECT_NEAR(k[l], b.keep[l], 1e-9);
    EXPECT_NEAR(mean(k), b.budget, 1e-12);
  }
}

TEST(Profile, KeepFractionsInterpolateBetweenNeighbours) {
  Profile p;
  p.model = {"m", "", 4};
  p.samples = 1;
  auto entry = [](double b, std::vector<double> keep) {
    ProfileBudget e;
    e.budget = b;
    e.keep = std::move(keep);
    return e;
  };
  p.set_budget(entry(0.4, {0.1, 0.3, 0.5, 0.7}));
  p.set_budget(entry(0.2, {0.05, 0.15, 0.25, 0.35}));
  p.validate("test");
  ASSERT_EQ(p.budgets[0].budget, 0.2);  // set_budget keeps them sorted
  // Midway: the average of the neighbours (its mean already equals the budget).
  auto k = p.keep_fractions(0.3);
  const std::vector<double> mid = {0.075, 0.225, 0.375, 0.525};
  for (size_t l = 0; l < 4; ++l) EXPECT_NEAR(k[l], mid[l], 1e-12);
  // Above the largest budget: towards the implicit budget 1.0 (all ones).
  k = p.keep_fractions(0.7);
  const std::vector<double> up = {0.55, 0.65, 0.75, 0.85};  // t = 0.5 between 0.4 and 1.0
  for (size_t l = 0; l < 4; ++l) EXPECT_NEAR(k[l], up[l], 1e-12);
  EXPECT_EQ(p.keep_fractions(1.0), std::vector<double>(4, 1.0));
  // Below the smallest: the smallest budget's shape, scaled.
  k = p.keep_fractions(0.1);
  for (size_t l = 0; l < 4; ++l) EXPECT_NEAR(k[l], p.budgets[0].keep[l] / 2, 1e-12);
  // With a floor: values below it are raised, the others scaled down, mean still exact.
  k = p.keep_fractions(0.1, 0.06);
  EXPECT_NEAR(mean(k), 0.1, 1e-12);
  for (double v : k) EXPECT_GE(v, 0.06);
  EXPECT_EQ(k[0], 0.06);
  EXPECT_NEAR(k[2] / k[1], 5.0 / 3.0, 1e-9);  // unclamped ones keep their proportions
  // Every budget in between: exact mean, bounds hold, monotone per layer.
  std::vector<double> prev(4, 0.0);
  for (int i = 1; i <= 100; ++i) {
    const double b = i / 100.0;
    k = p.keep_fractions(b, 0.01);
    EXPECT_NEAR(mean(k), b, 1e-12) << b;
    for (size_t l = 0; l < 4; ++l) {
      EXPECT_GE(k[l], 0.01);
      EXPECT_LE(k[l], 1.0);
      EXPECT_GE(k[l], prev[l] - 1e-12) << "budget " << b << " layer " << l;
    }
    prev = k;
  }
  EXPECT_THROW(p.keep_fractions(0.0), Error);
  EXPECT_THROW(p.keep_fractions(1.5), Error);
  EXPECT_THROW(p.keep_fractions(0.2, 0.3), Error);
}

TEST(Profile, RescaleToMeanIsExactAndBounded) {
  std::mt19937 rng(7);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  for (int trial = 0; trial < 500; ++trial) {
    const size_t n = 1 + rng() % 60;
    std::vector<double> x(n);
    for (auto& v : x) v = (rng() % 10 == 0) ? 0.0 : u(rng) * (trial % 3 == 0 ? 3.0 : 1.0);
    const double lo = (trial % 4 == 0) ? 0.0 : 0.05 * u(rng);
    const double hi = (trial % 5 == 0) ? 0.8 + 0.2 * u(rng) : 1.0;
    const double target = lo + (hi - lo) * u(rng);
    std::vector<double> k = x;
    rescale_to_mean(k, target, lo, hi);
    ASSERT_EQ(k.size(), n);
    EXPECT_NEAR(mean(k), target, 1e-12) << "trial " << trial;
    for (double v : k) {
      EXPECT_GE(v, lo);
      EXPECT_LE(v, hi);
    }
    // Unclamped values are one common scale of their inputs.
    double s = -1;
    for (size_t i = 0; i < n; ++i)
      if (x[i] > 0 && k[i] > lo + 1e-9 && k[i] < hi - 1e-9) {
        if (s < 0) s = k[i] / x[i];
        EXPECT_NEAR(k[i] / x[i], s, 1e-9 * std::max(1.0, s)) << "trial " << trial;
      }
  }
}

TEST(Profile, RescaleToMeanEdgeCases) {
  std::vector<double> k = {0.2, 0.4, 0.6};
  rescale_to_mean(k, 0.4, 0.0, 1.0);  // already right
  EXPECT_NEAR(k[0], 0.2, 1e-15);
  EXPECT_NEAR(k[2], 0.6, 1e-15);
  k = {0.5, 1.0, 0.0};  // zeros cannot be scaled up: raised to make up the rest
  rescale_to_mean(k, 0.9, 0.0, 1.0);
  EXPECT_NEAR(mean(k), 0.9, 1e-12);
  EXPECT_EQ(k[0], 1.0);
  EXPECT_EQ(k[1], 1.0);
  EXPECT_NEAR(k[2], 0.7, 1e-12);
  k = {0.0, 0.0};
  rescale_to_mean(k, 0.3, 0.0, 1.0);
  EXPECT_NEAR(k[0], 0.3, 1e-12);
  k = {0.9, 0.1};
  rescale_to_mean(k, 1.0, 0.0, 1.0);
  EXPECT_EQ(k, std::vector<double>({1.0, 1.0}));
  k = {0.9, 0.1};
  rescale_to_mean(k, 0.2, 0.2, 1.0);
  EXPECT_EQ(k, std::vector<double>({0.2, 0.2}));
  k = {2.0, 0.5};  // inputs above hi are fine: they are clamped
  rescale_to_mean(k, 0.5, 0.0, 1.0);
  EXPECT_NEAR(k[0], 0.8, 1e-12);
  EXPECT_NEAR(k[1], 0.2, 1e-12);
  std::vector<double> bad = {0.5, -0.1};
  EXPECT_THROW(rescale_to_mean(bad, 0.3, 0.0, 1.0), Error);
  bad = {0.5, NAN};
  EXPECT_THROW(rescale_to_mean(bad, 0.3, 0.0, 1.0), Error);
  bad = {0.5};
  EXPECT_THROW(rescale_to_mean(bad, 1.3, 0.0, 1.0), Error);
  EXPECT_THROW(rescale_to_mean(bad, 0.05, 0.1, 1.0), Error);
  bad = {};
  EXPECT_THROW(rescale_to_mean(bad, 0.5, 0.0, 1.0), Error);
}

// ---- compatibility ----

TEST(Profile, CheckCompatibleNamesBothIdentities) {
  Profile p = calibrated_profile(12);
  p.path = "prof.json";
  EXPECT_NO_THROW(p.check_compatible({"tiny-llava", "sha256:0123abcd", 12}));
  EXPECT_NO_THROW(p.check_compatible({"renamed-dir", "sha256:0123abcd", 12}));  // same checkpoint
  EXPECT_NO_THROW(p.check_compatible({"tiny-llava", "", 12}));
  auto expect_msg = [&](const ModelIdentity& m, std::initializer_list<std::string> needles) {
    try {
      p.check_compatible(m);
      ADD_FAILURE() << "no error for " << m.name;
    } catch (const Error& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find("prof.json"), std::string::npos) << msg;
      for (const auto& n : needles) EXPECT_NE(msg.find(n), std::string::npos) << "'" << n << "' not in: " << msg;
    }
  };
  expect_msg({"llava-v1.5-7b", "sha256:ffff", 32}, {"layer count", "12 layers", "32 layers", "tiny-llava", "llava-v1.5-7b"});
  expect_msg({"tiny-llava", "sha256:ffff", 12}, {"fingerprint", "sha256:0123abcd", "sha256:ffff"});
  expect_msg({"other", "", 12}, {"name", "tiny-llava", "other"});
  // An imported profile (no fingerprint) is checked on the layer count only.
  Profile q = p;
  q.model = {"llava-v1.5-7b", "", 12};
  EXPECT_NO_THROW(q.check_compatible({"llava-1.5-7b-hf", "sha256:abc", 12}));
  EXPECT_THROW(q.check_compatible({"llava-1.5-7b-hf", "sha256:abc", 40}), Error);
}

// ---- validation on load ----

TEST(Profile, LoadBadInputGivesOneClearErrorNamingFileAndField) {
  const Profile good = calibrated_profile(3);
  const std::string text = good.to_json();
  auto edit = [&](auto f) {
    auto j = nlohmann::json::parse(text);
    f(j);
    return j.dump();
  };
  using J = nlohmann::json;
  expect_load_error("{not json", {"not valid JSON"});
  expect_load_error("[1, 2]", {"JSON object"});
  expect_load_error(edit([](J& j) { j["format"] = "something-else"; }), {"format", "something-else"});
  expect_load_error(edit([](J& j) { j.erase("format"); }), {"format", "missing"});
  expect_load_error(edit([](J& j) { j["version"] = 2; }), {"version", "unsupported version 2"});
  expect_load_error(edit([](J& j) { j.erase("model"); }), {"model", "missing"});
  expect_load_error(edit([](J& j) { j["model"]["n_layers"] = "3"; }), {"model.n_layers", "integer"});
  expect_load_error(edit([](J& j) { j["model"]["n_layers"] = 4; }), {"budgets[0].keep", "has 3 values", "4 layers"});
  expect_load_error(edit([](J& j) { j["importance"]["estimator"] = "magic"; }), {"importance.estimator", "magic"});
  expect_load_error(edit([](J& j) { j["importance"]["window"] = 0; }), {"importance.window"});
  expect_load_error(edit([](J& j) { j["importance"]["allocation"] = "oracle"; }), {"importance.allocation", "oracle"});
  expect_load_error(edit([](J& j) { j["protected_tokens"] = -1; }), {"protected_tokens"});
  expect_load_error(edit([](J& j) { j["source"]["kind"] = "guessed"; }), {"source.kind", "guessed"});
  expect_load_error(edit([](J& j) { j["source"]["samples"] = 0; }), {"source.samples"});
  expect_load_error(edit([](J& j) { j["source"].erase("data"); }), {"source.data", "missing"});
  expect_load_error(edit([](J& j) { j["budgets"] = J::array(); }), {"budgets", "no budgets"});
  expect_load_error(edit([](J& j) { j["budgets"] = 0.5; }), {"budgets", "array"});
  expect_load_error(edit([](J& j) { j["budgets"][0]["budget"] = 0.0; }), {"budgets[0].budget", "(0, 1]"});
  expect_load_error(edit([](J& j) { j["budgets"][8]["budget"] = 1.2; }), {"budgets[8].budget", "(0, 1]"});
  expect_load_error(edit([](J& j) { j["budgets"][1]["budget"] = 0.1; }), {"budgets[1].budget", "ascending"});
  expect_load_error(edit([](J& j) { j["budgets"][2]["keep"][1] = 1.5; }), {"budgets[2].keep[1]", "outside [0, 1]"});
  expect_load_error(edit([](J& j) { j["budgets"][2]["keep"][1] = "x"; }), {"budgets[2].keep[1]", "number"});
  expect_load_error(edit([](J& j) { j["budgets"][2]["keep"].erase(0); }), {"budgets[2].keep", "has 2 values"});
  expect_load_error(edit([](J& j) { j["budgets"][2].erase("keep"); }), {"budgets[2].keep", "missing"});
  expect_load_error(edit([](J& j) { j["budgets"][0]["keep_std"] = J::array({0.1}); }), {"budgets[0].keep_std"});
  expect_load_error(edit([](J& j) { j["budgets"][3]["keep"][0] = j["budgets"][3]["keep"][0].get<double>() + 0.01; }),
                    {"budgets[3].keep", "mean over layers", "1e-6"});
  // An imported profile's means may differ from its budgets (the authors' truncation).
  const std::string path = test::temp_path("imported_ok.json");
  write_file(path, edit([](J& j) {
               j["source"] = {{"kind", "imported"},
                              {"files", J::array({{{"file", "prefixkv_m_0.9.json"}, {"evicted", 0.9}, {"mean_evicted", 0.89}}})}};
               j["budgets"][0]["keep"][0] = j["budgets"][0]["keep"][0].get<double>() + 0.01;
             }));
  EXPECT_NO_THROW(Profile::load(path));
  fs::remove(path);
  EXPECT_THROW(Profile::load(test::temp_path("does_not_exist.json")), Error);
}

namespace pkv {
namespace {
// The table's last row: how far the most kept layer is from the least kept one, per budget.
TEST(ProfileTable, SpreadIsTheMostOverTheLeastKeptLayer) {
  Profile p;
  p.model = {"m", "", 3};
  ProfileBudget a;
  a.budget = 0.2, a.keep = {0.04, 0.4, 0.16};
  ProfileBudget b;
  b.budget = 0.5, b.keep = {0.0, 0.75, 0.75};
  p.set_budget(a);
  p.set_budget(b);
  const std::string t = p.table();
  const size_t at = t.find("spread");
  ASSERT_NE(at, std::string::npos) << t;
  EXPECT_EQ(t.substr(at), "spread   10.00x      inf\n") << t;
}
}  // namespace
}  // namespace pkv
