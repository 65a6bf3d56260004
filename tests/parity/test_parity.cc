// Parity with transformers: every case of tests/data/ref/manifest.json (made by tools/make_fixtures.py
// on the GPU machine with transformers) is run through the engine and compared:
//   pixel values (both modes)      max abs diff <= 2e-2 (resampling)
//   vision features, projector     relative error <= 1e-4 (fp32 compute)
//   prefill logits, every position relative error <= 1e-4
//   32 greedy tokens               identical
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <numeric>

#include <nlohmann/json.hpp>

#include "engine/engine.h"
#include "test_util.h"

namespace fs = std::filesystem;
using namespace pkv;
using nlohmann::json;

namespace {

const json& load_manifest() {
  static const json m = [] {
    std::ifstream f(test::data_path("ref/manifest.json"));
    return f ? json::parse(f) : json::object();
  }();
  return m;
}

std::vector<std::string> case_names() {
  std::vector<std::string> names;
  const json& m = load_manifest();
  if (m.contains("cases"))
    for (auto& c : m["cases"]) names.push_back(c["name"].get<std::string>());
  return names;
}

json find_case(const std::string& name) {
  for (auto& c : load_manifest()["cases"])
    if (c["name"] == name) return c;
  return {};
}

class Capture : public Observer {
 public:
  void on_tensor(const std::string& name, int layer, const float* data, const std::vector<int64_t>& shape) override {
    if (layer >= 0 || seen.count(name)) return;
    size_t n = 1;
    for (auto d : shape) n *= size_t(d);
    seen[name] = std::vector<float>(data, data + n);
  }
  std::map<std::string, std::vector<float>> seen;
};

struct Loaded {
  std::unique_ptr<Model> model;
  std::unique_ptr<Tokenizer> tok;
};

Loaded load_fixture(const json& c) {
  Loaded l;
  LoadOptions lo;
  if (c.contains("vision_tower_dir") && !c["vision_tower_dir"].is_null())
    lo.vision_tower_dir = test::data_path(c["vision_tower_dir"].get<std::string>());
  const std::string dir = test::data_path("fixtures/" + c["fixture"].get<std::string>());
  l.model = Model::load(dir, lo);
  l.tok = std::make_unique<Tokenizer>(dir + "/tokenizer.model");
  return l;
}

NpyArray ref_array(const json& c, const char* key) {
  return read_npy(test::data_path(c["files"][key].get<std::string>()));
}

bool has_file(const json& c, const char* key) {
  return c.contains("files") && c["files"].contains(key) && !c["files"][key].is_null();
}

}  // namespace

class Parity : public ::testing::TestWithParam<std::string> {};

TEST_P(Parity, MatchesTransformers) {
  const json c = find_case(GetParam());
  ASSERT_FALSE(c.is_null());
  Loaded l = load_fixture(c);
  Engine engine(*l.model, *l.tok);
  const bool has_image = c.contains("image") && !c["image"].is_null();
  Image img;
  if (has_image) img = load_image(test::data_path(c["image"].get<std::string>()));
  const std::string mode = c.value("mode", json()).is_string() ? c["mode"].get<std::string>() : "";

  // 1. Pixels from our own decoding and resampling.
  if (has_image && has_file(c, "pixel_values")) {
    NpyArray ref = ref_array(c, "pixel_values");
    ImageConfig ic = l.model->config().image;
    ic.mode = mode;
    std::vector<float> px = preprocess_image(img, ic);
    ASSERT_EQ(px.size(), size_t(ref.numel()));
    EXPECT_LE(test::max_abs_diff(px.data(), ref.data.data(), px.size()), 2e-2) << "pixel values (" << mode << ")";
  }

  // 2. Input ids from our tokenizer and template.
  PromptRequest req;
  req.text = c["prompt"].get<std::string>();
  req.tmpl = c["template"] == "raw" ? Template::Raw : Template::LlavaV1;
  req.image = has_image ? &img : nullptr;
  req.image_mode = mode;
  Capture cap;
  PreparedPrompt p = engine.prepare(req, &cap);
  std::vector<int32_t> want = c["input_ids"].get<std::vector<int32_t>>();
  EXPECT_EQ(p.ids, want) << "input ids";

  // 3. Vision tower and projector on the reference pixels (isolates resampling differences).
  if (has_image) {
    NpyArray px = ref_array(c, "pixel_values");
    Capture vc;
    std::vector<float> emb = l.model->encode_image(px.data.data(), &vc);
    if (has_file(c, "vision_features")) {
      NpyArray ref = ref_array(c, "vision_features");
      ASSERT_EQ(vc.seen["vision_features"].size(), size_t(ref.numel()));
      EXPECT_LE(test::rel_error(vc.seen["vision_features"].data(), ref.data.data(), ref.data.size()), 1e-4);
    }
    NpyArray pref = ref_array(c, "projector_output");
    ASSERT_EQ(emb.size(), size_t(pref.numel()));
    EXPECT_LE(test::rel_error(emb.data(), pref.data.data(), emb.size()), 1e-4);
    // Use the reference pixels' embeddings for the decoder checks.
    const int D = l.model->config().text.hidden;
    std::copy(emb.begin(), emb.end(), p.embeddings.begin() + size_t(p.image_offset) * D);
  }

  // 4. Prefill logits at every position.
  const int T = int(p.ids.size()), V = l.model->config().text.vocab_size;
  NpyArray lref = ref_array(c, "logits");
  ASSERT_EQ(size_t(lref.numel()), size_t(T) * V);
  KVCache cache = l.model->make_cache();
  std::vector<int32_t> pos(static_cast<size_t>(T));
  std::iota(pos.begin(), pos.end(), 0);
  std::vector<float> logits(size_t(T) * V);
  DecoderCall call;
  call.logits_rows.resize(size_t(T));
  std::iota(call.logits_rows.begin(), call.logits_rows.end(), 0);
  call.logits_out = logits.data();
  l.model->decode(p.embeddings.data(), T, pos.data(), cache, call);
  EXPECT_LE(test::rel_error(logits.data(), lref.data.data(), logits.size()), 1e-4) << "prefill logits";

  // 5. 32 greedy tokens through the engine's own decode loop.
  SamplingOptions s;
  s.max_tokens = int(c["greedy_tokens"].size());
  s.ignore_eos = true;
  FullPolicy full;
  GenerationResult r = engine.generate(p, s, full);
  EXPECT_EQ(r.tokens, c["greedy_tokens"].get<std::vector<int32_t>>()) << "greedy tokens";
}

INSTANTIATE_TEST_SUITE_P(Fixtures, Parity, ::testing::ValuesIn(case_names()),
                         [](const ::testing::TestParamInfo<std::string>& i) {
                           std::string n = i.param;
                           for (auto& ch : n)
                             if (!isalnum(static_cast<unsigned char>(ch))) ch = '_';
                           return n;
                         });
GTEST_ALLOW_UNINSTANTIATED_PARAMETERIZED_TEST(Parity);

TEST(ParityData, ManifestPresent) {
  // The fixtures are committed; their absence means a broken checkout, not a skipped test.
  EXPECT_GE(case_names().size(), 8u) << "tests/data/ref/manifest.json missing or incomplete";
}
