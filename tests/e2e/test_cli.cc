// The prefixkv program end to end: answers, --json, --dump-tensors, and one clear error (exit 1,
// message naming what was wrong) for each kind of bad input.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "core/npy.h"
#include "test_util.h"

namespace fs = std::filesystem;
using nlohmann::json;
using namespace pkv;

namespace {

using test::prefixkv;
using test::Result;

std::string fixture(const std::string& name) { return test::data_path("fixtures/" + name); }

const json& manifest_case(const std::string& name) {
  static json m = [] {
    std::ifstream f(test::data_path("ref/manifest.json"));
    return json::parse(f);
  }();
  for (auto& c : m["cases"])
    if (c["name"] == name) return c;
  static json none;
  return none;
}

// Copies a fixture folder so a test can damage it.
fs::path copy_fixture(const std::string& name, const std::string& tag) {
  fs::path d = fs::path(test::temp_path("cli_" + tag));
  fs::remove_all(d);
  fs::copy(fixture(name), d, fs::copy_options::recursive);
  return d;
}

void expect_error(const Result& r, std::initializer_list<std::string> fragments) {
  EXPECT_EQ(r.rc, 1) << r.out;
  EXPECT_NE(r.out.find("error:"), std::string::npos) << r.out;
  for (auto& f : fragments) EXPECT_NE(r.out.find(f), std::string::npos) << "missing '" << f << "' in: " << r.out;
}

}  // namespace

TEST(Cli, GreedyJsonEqualsTransformersWithOwnPreprocessing) {
  // Our own decoding + resampling + tokenisation + model: the 32 greedy tokens transformers gave.
  const json& c = manifest_case("hf_mha_wide_crop");
  ASSERT_FALSE(c.is_null());
  Result r = prefixkv("run --model " + fixture("llava_hf_mha") + " --image " + test::data_path("images/wide.png") +
                      " --prompt 'Describe the image in detail.' --max-tokens 32 --ignore-eos --json");
  ASSERT_EQ(r.rc, 0) << r.out;
  json j = json::parse(r.out);
  EXPECT_EQ(j["tokens"], c["greedy_tokens"]);
  EXPECT_EQ(j["prompt_tokens"], c["seq_len"]);
  EXPECT_EQ(j["image_tokens"], 576);
  EXPECT_EQ(j["stop_reason"], "length");
  EXPECT_EQ(j["kv"]["entries_per_layer"].size(), 2u);
  for (auto& e : j["kv"]["entries_per_layer"]) EXPECT_EQ(e.get<int>(), c["seq_len"].get<int>() + 31);
  // KV bytes: entries x 2 (K and V) x kv_dim x 4 bytes per layer.
  EXPECT_EQ(j["kv"]["bytes_per_layer"][0].get<size_t>(), size_t(c["seq_len"].get<int>() + 31) * 2 * 64 * 4);
}

// --no-mmap reads the weights into memory: the same greedy tokens as the mapped files.
TEST(Cli, NoMmapGivesTheSameTokens) {
  const std::string cmd = "run --model " + fixture("llava_hf_mha") + " --image " + test::data_path("images/wide.png") +
                          " --prompt 'Describe the image in detail.' --max-tokens 12 --ignore-eos --json";
  Result mapped = prefixkv(cmd), held = prefixkv(cmd + " --no-mmap");
  ASSERT_EQ(mapped.rc, 0) << mapped.out;
  ASSERT_EQ(held.rc, 0) << held.out;
  EXPECT_EQ(json::parse(held.out)["tokens"], json::parse(mapped.out)["tokens"]);
}

TEST(Cli, OriginalLayoutWithSeparateVisionTower) {
  const json& c = manifest_case("orig_wide_pad");
  ASSERT_FALSE(c.is_null());
  Result r = prefixkv("run --model " + fixture("llava_orig_nocip") + " --vision-tower " + fixture("clip_separate") +
                      " --image " + test::data_path("images/wide.png") +
                      " --prompt 'Describe the image in detail.' --max-tokens 32 --ignore-eos --json");
  ASSERT_EQ(r.rc, 0) << r.out;
  EXPECT_EQ(json::parse(r.out)["tokens"], c["greedy_tokens"]);
}

TEST(Cli, StreamsTextAndStopsAtStopString) {
  Result full = prefixkv("run --model " + fixture("llama_text") + " --template raw --prompt 'The quick brown fox' "
                         "--max-tokens 24 --ignore-eos --json");
  ASSERT_EQ(full.rc, 0) << full.out;
  const std::string text = json::parse(full.out)["text"];
  ASSERT_GE(text.size(), 6u);
  const std::string stop = text.substr(3, 2);
  Result r = prefixkv("run --model " + fixture("llama_text") + " --template raw --prompt 'The quick brown fox' "
                      "--max-tokens 24 --ignore-eos --json --stop '" + stop + "'");
  ASSERT_EQ(r.rc, 0) << r.out;
  json j = json::parse(r.out);
  EXPECT_EQ(j["stop_reason"], "stop");
  EXPECT_EQ(j["text"], text.substr(0, text.find(stop)));
  // Plain mode streams the same text to stdout.
  Result plain = prefixkv("run --model " + fixture("llama_text") + " --template raw --prompt 'The quick brown fox' "
                          "--max-tokens 24 --ignore-eos 2>/dev/null");
  EXPECT_EQ(plain.out.substr(0, text.size()), text);
}

TEST(Cli, SamplingIsReproducibleWithSeed) {
  const std::string base = "run --model " + fixture("llama_text") +
                           " --template raw --prompt 'The quick brown fox' --max-tokens 16 --ignore-eos --json "
                           "--temperature 1.5 --top-k 50 --top-p 0.95";
  Result a = prefixkv(base + " --seed 7"), b = prefixkv(base + " --seed 7"), c = prefixkv(base + " --seed 8");
  ASSERT_EQ(a.rc, 0) << a.out;
  EXPECT_EQ(json::parse(a.out)["tokens"], json::parse(b.out)["tokens"]);
  EXPECT_NE(json::parse(a.out)["tokens"], json::parse(c.out)["tokens"]);
}

TEST(Cli, DumpTensors) {
  fs::path d = fs::path(test::temp_path("dump"));
  fs::remove_all(d);
  Result r = prefixkv("run --model " + fixture("llava_hf_mha") + " --image " + test::data_path("images/wide.png") +
                      " --max-tokens 2 --json --dump-tensors " + d.string());
  ASSERT_EQ(r.rc, 0) << r.out;
  for (auto n : {"pixel_values", "vision_features", "projector_output", "hidden_final", "logits"})
    EXPECT_TRUE(fs::exists(d / (std::string(n) + ".npy"))) << n;
  NpyArray px = read_npy((d / "pixel_values.npy").string());
  EXPECT_EQ(px.shape, (std::vector<int64_t>{3, 336, 336}));
  NpyArray ref = read_npy(test::data_path("ref/hf_mha_wide_crop/pixel_values.npy"));
  EXPECT_LE(test::max_abs_diff(px.data.data(), ref.data.data(), ref.data.size()), 2e-2);
  NpyArray vf = read_npy((d / "vision_features.npy").string());
  EXPECT_EQ(vf.shape, (std::vector<int64_t>{576, 32}));
}

TEST(Cli, HelpForEachCommand) {
  Result r = prefixkv("run --help");
  EXPECT_EQ(r.rc, 0);
  EXPECT_NE(r.out.find("--max-tokens"), std::string::npos);
  Result top = prefixkv("--help");
  EXPECT_EQ(top.rc, 0);
  EXPECT_NE(top.out.find("run"), std::string::npos);
}

// ----------------------------------------------------------------------------------- bad input
TEST(CliErrors, UnknownOptionAndBadValues) {
  expect_error(prefixkv("run --model " + fixture("llama_text") + " --frobnicate 3"), {"--frobnicate", "unknown option"});
  expect_error(prefixkv("run --model " + fixture("llama_text") + " --prompt hi --max-tokens lots"), {"--max-tokens", "integer"});
  expect_error(prefixkv("run --model " + fixture("llama_text") + " --prompt hi --top-p 1.5"), {"--top-p"});
  expect_error(prefixkv("run --model " + fixture("llama_text") + " --prompt hi --image-mode stretch"), {"--image-mode"});
  expect_error(prefixkv("run --model " + fixture("llama_text") + " --prompt hi --kv-policy magic"), {"--kv-policy", "magic"});
}

// --kv-layer-cap C: no layer of the cutoff evicts more than C times the uniform eviction, as the policy
// name's cap=C. C = 1 leaves every layer the uniform budget; the threshold alone gives this fixture's two
// layers different budgets at 80% kept, so an ignored option would show.
TEST(Cli, LayerCapOptionEqualsThePolicyNamesCap) {
  const std::string base = "run --model " + fixture("llama_text") +
                           " --prompt 'the quick brown fox jumps over the lazy dog and then the cat sat on the mat while "
                           "the bird sang' --max-tokens 4 --kv-budget 0.8 --json --kv-policy ";
  auto entries = [&](const std::string& args) {
    Result r = prefixkv(base + args);
    EXPECT_EQ(r.rc, 0) << r.out;
    return r.rc == 0 ? json::parse(r.out)["kv"]["entries_per_layer"] : json();
  };
  const json free = entries("cutoff:wov2"), named = entries("cutoff:wov2:cap=1"), flag = entries("cutoff:wov2 --kv-layer-cap 1");
  ASSERT_EQ(free.size(), 2u);
  EXPECT_NE(free[0], free[1]) << "the threshold alone should give the layers different budgets here";
  EXPECT_EQ(named[0], named[1]) << "cap 1: every layer keeps the uniform budget";
  EXPECT_EQ(flag, named);
  expect_error(prefixkv(base + "cutoff --kv-layer-cap 0.5"), {"--kv-layer-cap", "0.5"});
}

// --device and its options. Without a GPU (CI), --device cuda is one clear error whichever way
// prefixkv was built; with one, it answers.
TEST(CliErrors, DeviceOptions) {
  const std::string m = "run --model " + fixture("llama_text") + " --prompt hi --max-tokens 3";
  expect_error(prefixkv(m + " --device tpu"), {"--device", "tpu"});
  expect_error(prefixkv(m + " --gpu-dtype f16"), {"--gpu-dtype", "--device cuda"});
  expect_error(prefixkv(m + " --device cuda --gpu-dtype f8"), {"--gpu-dtype", "f8"});
  // The GPU shows its tensors to --dump-tensors as the CPU does (tests/cuda compares the values).
  const std::string dump_dir = testing::TempDir() + "/pkv_dump_cuda";
  const Result dump = prefixkv(m + " --device cuda --dump-tensors " + dump_dir);
  if (dump.rc != 0) {
    EXPECT_NE(dump.out.find("CUDA"), std::string::npos) << dump.out;
  } else {
    EXPECT_TRUE(std::filesystem::exists(dump_dir + "/logits.npy")) << dump.out;
    EXPECT_TRUE(std::filesystem::exists(dump_dir + "/hidden_final.npy")) << dump.out;
  }
  const Result r = prefixkv(m + " --device cuda --json");
  if (r.rc != 0) {
    EXPECT_NE(r.out.find("CUDA"), std::string::npos) << r.out;  // no device, or no CUDA back end
    EXPECT_EQ(r.out.find("Segmentation"), std::string::npos);
  } else {
    EXPECT_NE(r.out.find("\"device\": \"cuda"), std::string::npos) << r.out;
  }
}

TEST(CliErrors, ServeDeviceOptions) {
  const Result r = prefixkv("serve --device tpu --port 0");
  PKV_SKIP_UNLESS(r.out.find("cpp-httplib") == std::string::npos, "prefixkv was built without its server");
  expect_error(r, {"--device", "tpu"});
  expect_error(prefixkv("serve --gpu-dtype f16 --port 0"), {"--gpu-dtype", "--device cuda"});
  expect_error(prefixkv("serve --device cuda --gpu-dtype f8 --port 0"), {"--gpu-dtype", "f8"});
}

TEST(CliErrors, MissingModelDirectory) {
  expect_error(prefixkv("run --model /nonexistent/model --prompt hi"), {"/nonexistent/model"});
}

TEST(CliErrors, ImageForTextOnlyModel) {
  expect_error(prefixkv("run --model " + fixture("llama_text") + " --image " + test::data_path("images/wide.png")),
               {"text-only"});
}

TEST(CliErrors, UnreadableAndZeroSizeImage) {
  expect_error(prefixkv("run --model " + fixture("llava_hf_mha") + " --image /nonexistent/x.png"), {"/nonexistent/x.png"});
  fs::path z = fs::path(test::temp_path("zero.png"));
  std::ofstream(z).close();
  expect_error(prefixkv("run --model " + fixture("llava_hf_mha") + " --image " + z.string()), {z.string(), "empty"});
}

TEST(CliErrors, PromptLongerThanContext) {
  fs::path d = copy_fixture("llama_text", "ctx");
  json cfg = json::parse(std::ifstream(d / "config.json"));
  cfg["max_position_embeddings"] = 16;
  std::ofstream(d / "config.json") << cfg.dump();
  expect_error(prefixkv("run --model " + d.string() + " --template raw --prompt 'one two three four five six seven eight "
                        "nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen'"),
               {"prompt", "context of 16 tokens"});
}

TEST(CliErrors, ConfigMissingField) {
  fs::path d = copy_fixture("llama_text", "nofield");
  json cfg = json::parse(std::ifstream(d / "config.json"));
  cfg.erase("num_attention_heads");
  std::ofstream(d / "config.json") << cfg.dump();
  expect_error(prefixkv("run --model " + d.string() + " --prompt hi"), {"config.json", "num_attention_heads"});
}

TEST(CliErrors, TensorOfWrongShape) {
  // Claim a larger hidden size than the tensors hold.
  fs::path d = copy_fixture("llama_text", "shape");
  json cfg = json::parse(std::ifstream(d / "config.json"));
  cfg["intermediate_size"] = cfg["intermediate_size"].get<int>() * 2;
  std::ofstream(d / "config.json") << cfg.dump();
  expect_error(prefixkv("run --model " + d.string() + " --prompt hi"), {"model.safetensors", "mlp.gate_proj.weight", "has shape"});
}

TEST(CliErrors, TruncatedShard) {
  fs::path d = copy_fixture("llava_orig_sharded", "trunc");
  fs::path shard = d / "model-00002-of-00003.safetensors";
  fs::resize_file(shard, fs::file_size(shard) / 2);
  expect_error(prefixkv("run --model " + d.string() + " --prompt hi"), {"model-00002-of-00003.safetensors"});
}

TEST(CliErrors, GarbledSafetensors) {
  fs::path d = copy_fixture("llama_text", "garbled");
  std::ofstream(d / "model.safetensors", std::ios::binary) << std::string(64, '\x7f');
  expect_error(prefixkv("run --model " + d.string() + " --prompt hi"), {"model.safetensors"});
}

TEST(CliErrors, MissingTokenizer) {
  fs::path d = copy_fixture("llama_text", "notok");
  fs::remove(d / "tokenizer.model");
  expect_error(prefixkv("run --model " + d.string() + " --prompt hi"), {"tokenizer.model"});
}

TEST(CliErrors, OriginalLayoutWithoutTowerNamesTheOption) {
  expect_error(prefixkv("run --model " + fixture("llava_orig_nocip") + " --image " + test::data_path("images/wide.png")),
               {"--vision-tower"});
}

// prefixkv export --gguf: writes a file the GGUF reader accepts; bad options are one clear error.
TEST(CliExport, WritesGgufAndRefusesBadOptions) {
  const std::string out = testing::TempDir() + "/pkv_export.gguf";
  const Result r = prefixkv("export --model " + fixture("llama_text") + " --gguf " + out + " --type q8_0");
  ASSERT_EQ(r.rc, 0) << r.out;
  EXPECT_NE(r.out.find("wrote"), std::string::npos) << r.out;
  EXPECT_TRUE(std::filesystem::exists(out));
  expect_error(prefixkv("export --model " + fixture("llama_text") + " --gguf " + out + " --type q5_k"), {"--type", "q5_k"});
  expect_error(prefixkv("export --model " + fixture("llama_text")), {"--gguf"});
}
