// llama.cpp's LLaVA-1.5 vision file (mmproj) written by `prefixkv export --mmproj` and read by
// `--mmproj` beside a GGUF language model (src/model/gguf_export.h, gguf_load.h): the layout clip.cpp
// reads, the same image features and answers as the checkpoint, and one clear error for every file
// or model the pair cannot hold.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "engine/engine.h"
#include "io/gguf.h"
#include "model/gguf_export.h"
#include "model/gguf_load.h"
#include "model/model.h"
#include "ops/quant.h"
#include "test_util.h"
#include "vision/image.h"

using namespace pkv;
namespace fs = std::filesystem;

namespace {

const std::string kBundled = std::string(PKV_SOURCE_DIR) + "/models/prefixkv-llava-tiny";

// The bundled model's text GGUF and mmproj of `type`, written once per test program.
struct Exported {
  std::string text, mmproj;
};
const Exported& exported(uint32_t type) {
  static std::map<uint32_t, Exported> files;
  auto it = files.find(type);
  if (it != files.end()) return it->second;
  test::BundledModel& b = test::bundled_model();
  const std::string tag = type == quant::kF32 ? "f32" : "f16";
  Exported e{test::temp_path("text-" + tag + ".gguf"), test::temp_path("mmproj-" + tag + ".gguf")};
  GgufExportOptions opt;
  opt.type = type;
  export_text_gguf(*b.model, b.tok, e.text, opt);
  export_mmproj_gguf(*b.model, e.mmproj, type);
  return files[type] = e;
}

// The file at `src` written again with metadata changed (`meta`) and tensors changed (`tensors`, on
// the list of (name, ne, type, bytes)).
struct TensorCopy {
  std::string name;
  std::vector<int64_t> ne;
  uint32_t type;
  std::vector<uint8_t> bytes;
};
std::string rewrite(const std::string& src, const std::string& tag,
                    const std::function<void(std::map<std::string, GgufValue>&)>& meta,
                    const std::function<void(std::vector<TensorCopy>&)>& tensors = {}) {
  const auto f = GgufFile::open(src);
  std::map<std::string, GgufValue> kv = f->metadata();
  meta(kv);
  std::vector<TensorCopy> ts;
  for (const GgufTensor& t : f->tensors()) ts.push_back({t.name, t.ne, t.type, std::vector<uint8_t>(t.data, t.data + t.bytes)});
  if (tensors) tensors(ts);
  GgufWriter w;
  for (auto& [k, v] : kv) w.set(k, v);
  for (TensorCopy& t : ts) w.add_tensor(t.name, t.ne, t.type, std::move(t.bytes));
  const std::string path = test::temp_path(tag + ".gguf");
  w.write(path);
  return path;
}

void expect_error(const std::function<void()>& f, const std::vector<std::string>& fragments) {
  try {
    f();
    ADD_FAILURE() << "no error; expected one with '" << fragments[0] << "'";
  } catch (const Error& e) {
    for (const std::string& s : fragments) EXPECT_NE(std::string(e.what()).find(s), std::string::npos) << e.what();
  }
}

class Capture : public Observer {
 public:
  bool wants(const std::string& name) const override { return name == "vision_features"; }
  void on_tensor(const std::string&, int, const float* data, const std::vector<int64_t>& shape) override {
    size_t n = 1;
    for (int64_t d : shape) n *= size_t(d);
    features.assign(data, data + n);
  }
  std::vector<float> features;
};

}  // namespace

// The file holds what clip.cpp (llama.cpp release v0.4.0) reads for LLaVA-1.5: its keys, LLaVA's
// -2 feature layer as hidden state 5 of the 6-layer tower with the 6th layer left out, fc1 under
// the legacy name ffn_down, matrices F16 and the rest F32, every value the checkpoint's.
TEST(GgufMmproj, TheVisionFileInLlamaCppsLayout) {
  test::BundledModel& b = test::bundled_model();
  const ModelConfig& cfg = b.model->config();
  const VisionConfig& v = cfg.vision;
  const auto f = GgufFile::open(exported(quant::kF16).mmproj);
  EXPECT_EQ(f->str("general.architecture"), "clip");
  EXPECT_EQ(f->str("clip.projector_type"), "mlp");
  EXPECT_TRUE(f->value("clip.has_vision_encoder").b);
  EXPECT_TRUE(f->value("clip.has_llava_projector").b);
  EXPECT_FALSE(f->value("clip.has_text_encoder").b);
  EXPECT_FALSE(f->value("clip.use_gelu").b) << "quick_gelu: neither use_gelu nor use_silu";
  EXPECT_FALSE(f->has("clip.use_silu"));
  EXPECT_EQ(f->integer("clip.vision.image_size"), 336);
  EXPECT_EQ(f->integer("clip.vision.patch_size"), 14);
  EXPECT_EQ(f->integer("clip.vision.embedding_length"), v.hidden);
  EXPECT_EQ(f->integer("clip.vision.feed_forward_length"), v.intermediate);
  EXPECT_EQ(f->integer("clip.vision.attention.head_count"), v.n_heads);
  EXPECT_EQ(v.n_layers, 6);
  EXPECT_EQ(f->integer("clip.vision.block_count"), 5);
  EXPECT_EQ(f->numbers("clip.vision.feature_layer"), std::vector<double>{5});
  EXPECT_EQ(f->value("clip.vision.feature_layer").elem, GgufType::I32) << "clip.cpp's get_arr_int wants INT32";
  EXPECT_EQ(f->numbers("clip.vision.image_mean")[1], double(cfg.image.mean[1]));
  EXPECT_EQ(f->tensors().size(), size_t(4 + 3 + 2 + 5 * 16));
  EXPECT_FALSE(f->find("v.blk.5.attn_q.weight")) << "the layer past the feature layer is not written";
  EXPECT_FALSE(f->find("v.post_ln.weight"));

  const GgufTensor* fc1 = f->find("v.blk.2.ffn_down.weight");
  ASSERT_TRUE(fc1);
  EXPECT_EQ(fc1->ne, (std::vector<int64_t>{v.hidden, v.intermediate})) << "ffn_down holds fc1 (legacy name)";
  EXPECT_EQ(fc1->type, quant::kF16);
  EXPECT_EQ(f->find("v.blk.2.ffn_down.bias")->type, quant::kF32);
  EXPECT_EQ(f->find("v.patch_embd.weight")->ne, (std::vector<int64_t>{14, 14, 3, v.hidden}));
  EXPECT_EQ(f->find("v.position_embd.weight")->ne, (std::vector<int64_t>{v.hidden, v.n_patches() + 1}));
  EXPECT_EQ(f->find("mm.0.weight")->ne, (std::vector<int64_t>{v.hidden, cfg.text.hidden}));
  EXPECT_EQ(f->find("mm.2.weight")->ne, (std::vector<int64_t>{cfg.text.hidden, cfg.text.hidden}));

  // Every stored value is the checkpoint's rounded to F16. Its bf16 weights (8 significant bits)
  // are exact in F16 (11) except below F16's normal range (2^-14), where F16's step is 2^-24: those
  // move by at most 2^-25, and only those (counted).
  size_t moved = 0;
  auto same_rows = [&](const std::string& name, const TensorView& w) {
    const GgufTensor* g = f->find(name);
    ASSERT_TRUE(g) << name;
    const int64_t n = g->ne[0], rows = g->numel() / n;
    ASSERT_EQ(rows * n, w.numel()) << name;
    ASSERT_EQ(w.dtype, DType::BF16);
    std::vector<float> a(static_cast<size_t>(n)), c(static_cast<size_t>(n)), c16(static_cast<size_t>(n));
    std::vector<uint8_t> h(size_t(n) * 2);
    for (int64_t r = 0; r < rows; ++r) {
      quant::dequantize_row(g->type, g->data + size_t(r) * quant::row_bytes(g->type, n), a.data(), n);
      quant::dequantize_row(quant::kBF16, static_cast<const uint8_t*>(w.data) + size_t(r * n) * 2, c.data(), n);
      quant::quantize_row(quant::kF16, c.data(), h.data(), n);
      quant::dequantize_row(quant::kF16, h.data(), c16.data(), n);
      ASSERT_EQ(a, c16) << name << " row " << r;
      for (int64_t i = 0; i < n; ++i)
        if (a[size_t(i)] != c[size_t(i)]) {
          ++moved;
          ASSERT_LT(std::fabs(c[size_t(i)]), std::ldexp(1.f, -14)) << name;
          ASSERT_LE(std::fabs(a[size_t(i)] - c[size_t(i)]), std::ldexp(1.f, -25)) << name;
        }
    }
  };
  const ClipWeights& cw = b.model->weights().vision;
  same_rows("v.patch_embd.weight", *cw.patch.w);
  for (int l : {0, 4}) {
    const std::string p = "v.blk." + std::to_string(l) + ".";
    same_rows(p + "attn_q.weight", *cw.layers[size_t(l)].q.w);
    same_rows(p + "attn_out.weight", *cw.layers[size_t(l)].o.w);
    same_rows(p + "ffn_down.weight", *cw.layers[size_t(l)].fc1.w);
    same_rows(p + "ffn_up.weight", *cw.layers[size_t(l)].fc2.w);
  }
  same_rows("mm.0.weight", *b.model->weights().projector.layers[0].w);
  same_rows("mm.2.weight", *b.model->weights().projector.layers[1].w);
  EXPECT_GT(moved, 0u) << "some weights are below F16's normal range (the next test's tolerance is about them)";
  std::printf("F16 mmproj: %zu of the compared weights moved by F16's subnormal rounding\n", moved);
}

// The checkpoint and its text.gguf + mmproj.gguf pair, F32 and F16, on data/example.png.
// F32: the files hold the checkpoint's values, and the vision tower and projector give its features
// and embeddings bit for bit (the same products over the same values).
// F16: the weights below F16's normal range move by at most 2^-25 (test above), nothing else does:
// the features equal bit for bit those of an F32 file holding the F16-rounded values (so F16
// rounding is the whole difference), and differ from the checkpoint's by at most 1e-5 of their
// largest magnitude (first order: a weight row of n values with standard deviation ~0.02 moves by
// at most 2^-25 sqrt(n) in norm, a relative 2^-25 / 0.02 = 1.5e-6 per product; six products deep
// (five blocks and the projector, LayerNorm rescaling between them): below 1e-5).
// The greedy answer is the same; the first logits agree within 1e-5 of their largest magnitude
// (float32 summation order: the text products over F32 rows are a different BLAS call than over
// converted bf16 blocks; about n u = 768 * 2^-24 = 5e-5 per product in the worst case, 1e-7 measured).
TEST(GgufMmproj, TheSameFeaturesAndAnswerAsTheCheckpoint) {
  test::BundledModel& b = test::bundled_model();
  const Image img = load_image(std::string(PKV_SOURCE_DIR) + "/data/example.png");
  PromptRequest req;
  req.text = "Describe the image in detail.";
  req.image = &img;
  SamplingOptions s;
  s.max_tokens = 24;
  const Engine ref(*b.model, b.tok);
  const PreparedPrompt pr = ref.prepare(req);
  FullPolicy fr;
  const GenerationResult ar = ref.generate(pr, s, fr);
  Capture cr;
  b.model->encode_image(pr.pixels.data(), &cr);
  std::map<uint32_t, std::vector<float>> features;
  for (uint32_t type : {quant::kF32, quant::kF16}) {
    SCOPED_TRACE(type == quant::kF16 ? "F16" : "F32");
    const auto m = Model::load_gguf(exported(type).text, exported(type).mmproj);
    const auto tok = gguf_tokenizer(exported(type).text);
    ASSERT_TRUE(m->has_vision());
    EXPECT_EQ(m->config().image.mode, "pad");
    EXPECT_EQ(m->config().image_tokens(), b.model->config().image_tokens());
    const Engine e(*m, *tok);
    const PreparedPrompt p = e.prepare(req);
    EXPECT_EQ(p.pixels, pr.pixels) << "a square image: pad and crop agree";
    EXPECT_EQ(p.ids, pr.ids) << "the image positions hold <image>'s id, as llava-hf's";
    Capture c;
    m->encode_image(p.pixels.data(), &c);
    ASSERT_EQ(c.features.size(), cr.features.size());
    features[type] = c.features;
    const double feat = test::rel_error(c.features.data(), cr.features.data(), c.features.size());
    const double emb = test::rel_error(p.embeddings.data(), pr.embeddings.data(), p.embeddings.size());
    if (type == quant::kF32) {
      EXPECT_EQ(c.features, cr.features) << "vision features";
      EXPECT_EQ(p.embeddings, pr.embeddings) << "projector output and text rows";
    } else {
      EXPECT_LE(feat, 1e-5);
      EXPECT_LE(emb, 1e-5);
    }
    FullPolicy f;
    const GenerationResult a = e.generate(p, s, f);
    EXPECT_EQ(a.tokens, ar.tokens);
    const double logits = test::rel_error(a.first_logits.data(), ar.first_logits.data(), a.first_logits.size());
    EXPECT_LE(logits, 1e-5);
    std::printf("%s: features %.3g, embeddings %.3g, first logits %.3g of their largest magnitude from the checkpoint's\n",
                type == quant::kF16 ? "F16" : "F32", feat, emb, logits);
  }
  // The F32 file with every value the F16 file rounds rounded the same way gives the F16 file's
  // features exactly.
  const auto f16 = GgufFile::open(exported(quant::kF16).mmproj);
  const std::string rounded = rewrite(exported(quant::kF32).mmproj, "rounded", [](std::map<std::string, GgufValue>&) {},
                                      [&](std::vector<TensorCopy>& ts) {
                                        for (TensorCopy& t : ts) {
                                          if (f16->find(t.name)->type != quant::kF16) continue;
                                          const int64_t n = int64_t(t.bytes.size() / 4);
                                          std::vector<float> x(static_cast<size_t>(n));
                                          std::vector<uint8_t> h(size_t(n) * 2);
                                          std::memcpy(x.data(), t.bytes.data(), t.bytes.size());
                                          quant::quantize_row(quant::kF16, x.data(), h.data(), n);
                                          quant::dequantize_row(quant::kF16, h.data(), x.data(), n);
                                          std::memcpy(t.bytes.data(), x.data(), t.bytes.size());
                                        }
                                      });
  const auto mr = Model::load_gguf(exported(quant::kF32).text, rounded);
  Capture c;
  mr->encode_image(pr.pixels.data(), &c);
  EXPECT_EQ(c.features, features[quant::kF16]) << "F16 rounding is the whole difference";
  EXPECT_NE(c.features, features[quant::kF32]) << "and it is a difference (else the check above proves nothing)";

  // And through the command line.
  const test::Result r1 = test::prefixkv("run --image " + std::string(PKV_SOURCE_DIR) + "/data/example.png --max-tokens 12 --json");
  const test::Result r2 = test::prefixkv("run --model " + exported(quant::kF16).text + " --mmproj " + exported(quant::kF16).mmproj +
                                         " --image " + std::string(PKV_SOURCE_DIR) + "/data/example.png --max-tokens 12 --json");
  ASSERT_EQ(r1.rc, 0) << r1.out;
  ASSERT_EQ(r2.rc, 0) << r2.out;
  EXPECT_EQ(nlohmann::json::parse(r1.out)["tokens"], nlohmann::json::parse(r2.out)["tokens"]);
}

// `prefixkv export --gguf T --mmproj M` writes both, and refuses a model llama.cpp would misread
// before writing anything.
TEST(GgufMmproj, ExportRefusesWhatLlamaCppWouldMisread) {
  const std::string t = test::temp_path("cli-text.gguf"), m = test::temp_path("cli-mmproj.gguf");
  const test::Result ok = test::prefixkv("export --gguf " + t + " --mmproj " + m);
  ASSERT_EQ(ok.rc, 0) << ok.out;
  EXPECT_TRUE(fs::exists(t) && fs::exists(m));

  // A text-only model has no vision tower to write.
  const test::Result text = test::prefixkv("export --model " + test::data_path("fixtures/llama_text") + " --gguf " +
                                           test::temp_path("t2.gguf") + " --mmproj " + test::temp_path("m2.gguf"));
  EXPECT_NE(text.rc, 0);
  EXPECT_NE(text.out.find("has no vision tower"), std::string::npos) << text.out;
  EXPECT_FALSE(fs::exists(test::temp_path("t2.gguf"))) << "refused before the text file is written";

  // The "full" strategy keeps the class token, which clip.cpp always drops.
  const auto gqa = Model::load(test::data_path("fixtures/llava_v5_gqa"));
  expect_error([&] { export_mmproj_gguf(*gqa, test::temp_path("m3.gguf"), quant::kF16); }, {"'full'"});

  // Feature layers out of clip.cpp's ascending order, and the embeddings alone (no layer run).
  ModelConfig cfg = test::bundled_model().model->config();
  cfg.feature_layers = {-2, -5};
  expect_error([&] { mmproj_feature_layers(cfg); }, {"ascending", "hidden state 2"});
  cfg.feature_layers = {0};
  expect_error([&] { mmproj_feature_layers(cfg); }, {"hidden state 0"});
  cfg.feature_layers = {-5, -2};
  EXPECT_EQ(mmproj_feature_layers(cfg), (std::vector<int>{2, 5}));

  // Types other than F16 / F32.
  expect_error([&] { export_mmproj_gguf(*test::bundled_model().model, test::temp_path("m5.gguf"), quant::kQ8_0); },
               {"F32 or F16"});
  // A one-layer projector (an original-layout fixture read as mm_projector_type "linear"): clip.cpp
  // would put a GELU after it.
  {
    const std::string dir = test::temp_path("linear");
    fs::remove_all(dir);
    fs::copy(test::data_path("fixtures/llava_orig_sharded"), dir);
    nlohmann::json c = nlohmann::json::parse(std::ifstream(dir + "/config.json"));
    c["mm_projector_type"] = "linear";
    std::ofstream(dir + "/config.json") << c.dump();
    const auto linear = Model::load(dir);
    ASSERT_EQ(linear->weights().projector.layers.size(), 1u);
    expect_error([&] { export_mmproj_gguf(*linear, test::temp_path("m6.gguf"), quant::kF16); }, {"1 linear layers"});
  }
  // Activations clip.cpp cannot express: a copy of a small LLaVA fixture with its config edited.
  for (const auto& [key, value, fragment] : std::vector<std::tuple<std::string, std::string, std::string>>{
           {"projector_hidden_act", "relu", "projector's activation is 'relu'"},
           {"hidden_act", "gelu_pytorch_tanh", "activation 'gelu_pytorch_tanh'"}}) {
    const std::string dir = test::temp_path("edited");
    fs::remove_all(dir);
    fs::copy(test::data_path("fixtures/llava_hf_mha"), dir);
    nlohmann::json c = nlohmann::json::parse(std::ifstream(dir + "/config.json"));
    if (key == "hidden_act") c["vision_config"][key] = value;
    else c[key] = value;
    std::ofstream(dir + "/config.json") << c.dump();
    const auto edited = Model::load(dir);
    expect_error([&] { export_mmproj_gguf(*edited, test::temp_path("m4.gguf"), quant::kF16); }, {fragment});
  }
}

// Files the reader refuses, each with one error naming the file and what is wrong.
TEST(GgufMmproj, ReadingRefusesOtherFilesByName) {
  const Exported& e = exported(quant::kF16);
  using KV = std::map<std::string, GgufValue>;
  using TS = std::vector<TensorCopy>;
  auto load = [&](const std::string& mmproj) { Model::load_gguf(e.text, mmproj); };
  auto refused = [&](const std::string& tag, const std::function<void(KV&)>& meta, const std::vector<std::string>& fragments,
                     const std::function<void(TS&)>& tensors = {}) {
    SCOPED_TRACE(tag);
    const std::string path = rewrite(e.mmproj, tag, meta, tensors);
    std::vector<std::string> all = fragments;
    all.push_back(path);
    expect_error([&] { load(path); }, all);
  };
  auto drop = [](const std::string& name) {
    return [name](TS& ts) { ts.erase(std::remove_if(ts.begin(), ts.end(), [&](const TensorCopy& t) { return t.name == name; }), ts.end()); };
  };
  auto add_f32 = [](const std::string& name, int64_t n) {
    return [name, n](TS& ts) { ts.push_back({name, {n}, quant::kF32, std::vector<uint8_t>(size_t(n) * 4)}); };
  };
  const auto none = [](KV&) {};

  // The two files swapped.
  expect_error([&] { Model::load_gguf(e.text, e.text); }, {e.text, "architecture 'clip'"});
  expect_error([&] { Model::load_gguf(e.mmproj); }, {e.mmproj, "--mmproj"});
  // Not a vision encoder, another projector, another generation.
  refused("novision", [](KV& kv) { kv["clip.has_vision_encoder"] = GgufValue::of_bool(false); }, {"no vision encoder"});
  refused("ldp", [](KV& kv) { kv["clip.projector_type"] = GgufValue::of_string("ldp"); }, {"clip.projector_type is 'ldp'"});
  refused("noproj", [](KV& kv) { kv.erase("clip.projector_type"); }, {"lacks clip.projector_type"});
  refused("v16", [](KV& kv) { kv["clip.vision.image_grid_pinpoints"] = GgufValue::of_i32s({336, 672, 672, 336}); },
          {"image_grid_pinpoints", "LLaVA-1.6"});
  refused("unpad", [](KV& kv) { kv["clip.vision.mm_patch_merge_type"] = GgufValue::of_string("spatial_unpad"); },
          {"'spatial_unpad'"});
  refused("minicpmv", [](KV& kv) { kv["clip.minicpmv_version"] = GgufValue::of_i32(2); }, {"MiniCPM-V"});
  refused("mlpnorm", none, {"'mm.3.weight'", "mlp_norm"}, add_f32("mm.3.weight", 256));
  refused("postln", none, {"'v.post_ln.weight'"}, add_f32("v.post_ln.weight", 192));
  refused("nocls", none, {"'v.class_embd'", "class token"}, drop("v.class_embd"));
  refused("gelusilu", [](KV& kv) { kv["clip.use_silu"] = GgufValue::of_bool(true); kv["clip.use_gelu"] = GgufValue::of_bool(true); },
          {"clip.use_gelu and clip.use_silu"});
  refused("boolkey", [](KV& kv) { kv["clip.use_gelu"] = GgufValue::of_u32(1); }, {"'clip.use_gelu'", "not a bool"});
  // Sizes that disagree with the tensors or with the text model.
  refused("ff", [](KV& kv) { kv["clip.vision.feed_forward_length"] = GgufValue::of_u32(512); },
          {"'v.blk.0.ffn_down.weight'", "[192, 768]", "[192, 512]"});
  refused("blocks", [](KV& kv) { kv["clip.vision.block_count"] = GgufValue::of_u32(6); kv["clip.vision.feature_layer"] = GgufValue::of_i32s({6}); },
          {"lacks the tensor 'v.blk.5.attn_q.weight'"});
  refused("feature", [](KV& kv) { kv["clip.vision.feature_layer"] = GgufValue::of_i32s({7}); },
          {"clip.vision.feature_layer holds 7", "0 to 5"});
  refused("mean", [](KV& kv) { kv["clip.vision.image_mean"] = GgufValue::of_f32s({0.5f}); }, {"image_mean"});
  refused("nomm2", none, {"'mm.2.weight'"}, drop("mm.2.weight"));
  refused("quant", none, {"'mm.2.weight' is Q8_0", "F32, F16 or BF16"}, [](TS& ts) {
    for (TensorCopy& t : ts)
      if (t.name == "mm.2.weight") {
        std::vector<float> x(size_t(t.ne[0] * t.ne[1]));
        quant::dequantize_row(t.type, t.bytes.data(), x.data(), int64_t(x.size()));
        t.type = quant::kQ8_0;
        t.bytes.assign(quant::row_bytes(quant::kQ8_0, int64_t(x.size())), 0);
        quant::quantize_row(quant::kQ8_0, x.data(), t.bytes.data(), int64_t(x.size()));
      }
  });
  // A projector into another width than the text model's: the bundled vision file beside a LLaMA
  // fixture's language model (hidden 64).
  const std::string small = test::temp_path("small-text.gguf");
  const auto llama = Model::load(test::data_path("fixtures/llama_text"));
  const Tokenizer ltok(test::data_path("fixtures/llama_text/tokenizer.model"));
  export_text_gguf(*llama, ltok, small, GgufExportOptions{});
  expect_error([&] { Model::load_gguf(small, e.mmproj); }, {e.mmproj, "hidden size " + std::to_string(llama->config().text.hidden)});
  // --mmproj belongs beside a GGUF language model.
  LoadOptions lo;
  lo.mmproj = e.mmproj;
  expect_error([&] { Model::load(kBundled, lo); }, {"--mmproj", "GGUF language model"});
  const test::Result r = test::prefixkv("run --mmproj " + e.mmproj + " --prompt hi --max-tokens 1");
  EXPECT_NE(r.rc, 0);
  EXPECT_NE(r.out.find("--mmproj"), std::string::npos) << r.out;
}
