// Bad checkpoint input: each case gives one clear error naming the file and what was wrong.
#include <gtest/gtest.h>

#include "test_util.h"

#include <cerrno>
#include <chrono>
#include <cstring>
#include <fcntl.h>
#include <filesystem>
#include <fstream>
#include <functional>
#include <future>
#include <sys/stat.h>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/file.h"
#include "core/npy.h"
#include "eval/checker.h"
#include "eval/dataset.h"
#include "io/config.h"
#include "io/mapped_file.h"
#include "io/safetensors.h"
#include "kv/profile.h"
#include "text/tokenizer.h"
#include "vision/image.h"

namespace fs = std::filesystem;
using namespace pkv;
using nlohmann::json;

namespace {

fs::path tmpdir(const std::string& name) {
  fs::path d = fs::path(test::temp_path("st_" + name));
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

void write_file(const fs::path& p, const std::string& bytes) {
  std::ofstream f(p, std::ios::binary);
  f.write(bytes.data(), std::streamsize(bytes.size()));
}

// A safetensors file from a header object and a data blob.
std::string safetensors_bytes(const json& header, const std::string& data) {
  std::string h = header.dump();
  uint64_t n = h.size();
  std::string out(reinterpret_cast<const char*>(&n), 8);
  return out + h + data;
}

std::string floats(std::initializer_list<float> v) {
  return std::string(reinterpret_cast<const char*>(std::data(v)), v.size() * 4);
}

// Expects open() to throw an Error whose message contains every fragment.
void expect_error(const std::string& path, std::initializer_list<std::string> fragments) {
  try {
    TensorStore::open(path);
    FAIL() << "no error for " << path;
  } catch (const Error& e) {
    for (auto& f : fragments) EXPECT_NE(std::string(e.what()).find(f), std::string::npos) << e.what();
  }
}

}  // namespace

TEST(Safetensors, ReadsValidFile) {
  auto d = tmpdir("valid");
  json h = {{"a", {{"dtype", "F32"}, {"shape", {2, 2}}, {"data_offsets", {0, 16}}}},
            {"b", {{"dtype", "BF16"}, {"shape", {2}}, {"data_offsets", {16, 20}}}},
            {"__metadata__", {{"format", "pt"}}}};
  write_file(d / "model.safetensors", safetensors_bytes(h, floats({1, 2, 3, 4}) + std::string("\x80\x3f\x00\x40", 4)));
  auto s = TensorStore::open(d.string());
  const TensorView* a = s->find("a");
  ASSERT_TRUE(a);
  EXPECT_EQ(a->shape, (std::vector<int64_t>{2, 2}));
  EXPECT_EQ(static_cast<const float*>(a->data)[3], 4.f);
  const TensorView* b = s->find("b");
  ASSERT_TRUE(b);
  EXPECT_EQ(b->dtype, DType::BF16);
  EXPECT_EQ(bf16_to_f32(static_cast<const uint16_t*>(b->data)[0]), 1.f);
  EXPECT_EQ(bf16_to_f32(static_cast<const uint16_t*>(b->data)[1]), 2.f);
}

TEST(Safetensors, MissingFile) { expect_error("/nonexistent/prefixkv/model", {"/nonexistent/prefixkv/model", "no such"}); }

TEST(Safetensors, EmptyDirectory) {
  auto d = tmpdir("empty");
  expect_error(d.string(), {d.string(), "no .safetensors"});
}

TEST(Safetensors, BinCheckpointNamesTheConversionTool) {
  auto d = tmpdir("bin");
  write_file(d / "pytorch_model.bin", "PK\x03\x04 not really");
  expect_error(d.string(), {"convert_bin_to_safetensors.py"});
}

TEST(Safetensors, TooShort) {
  auto d = tmpdir("short");
  write_file(d / "model.safetensors", "abc");
  expect_error(d.string(), {"model.safetensors", "too short"});
}

TEST(Safetensors, ZeroSize) {
  auto d = tmpdir("zero");
  write_file(d / "model.safetensors", "");
  expect_error(d.string(), {"model.safetensors", "too short"});
}

TEST(Safetensors, HeaderLengthBeyondFile) {
  auto d = tmpdir("hlen");
  uint64_t n = 1 << 20;
  write_file(d / "model.safetensors", std::string(reinterpret_cast<const char*>(&n), 8) + "{}");
  expect_error(d.string(), {"header length", "exceeds"});
}

TEST(Safetensors, GarbledHeader) {
  auto d = tmpdir("garbled");
  std::string junk = "{\"a\": [1, 2,, garbage";
  uint64_t n = junk.size();
  write_file(d / "model.safetensors", std::string(reinterpret_cast<const char*>(&n), 8) + junk);
  expect_error(d.string(), {"model.safetensors", "not valid JSON"});
}

TEST(Safetensors, TruncatedData) {
  auto d = tmpdir("trunc");
  json h = {{"a", {{"dtype", "F32"}, {"shape", {4}}, {"data_offsets", {0, 16}}}}};
  write_file(d / "model.safetensors", safetensors_bytes(h, floats({1, 2})));
  expect_error(d.string(), {"tensor 'a'", "outside the data section"});
}

TEST(Safetensors, OffsetsDisagreeWithShape) {
  auto d = tmpdir("lie_shape");
  json h = {{"a", {{"dtype", "F32"}, {"shape", {3}}, {"data_offsets", {0, 16}}}}};
  write_file(d / "model.safetensors", safetensors_bytes(h, floats({1, 2, 3, 4})));
  expect_error(d.string(), {"tensor 'a'", "holds 16 bytes", "need 12"});
}

TEST(Safetensors, DtypeLie) {
  auto d = tmpdir("lie_dtype");
  json h = {{"a", {{"dtype", "F16"}, {"shape", {4}}, {"data_offsets", {0, 16}}}}};
  write_file(d / "model.safetensors", safetensors_bytes(h, floats({1, 2, 3, 4})));
  expect_error(d.string(), {"tensor 'a'", "F16", "need 8"});
}

TEST(Safetensors, UnknownDtype) {
  auto d = tmpdir("bad_dtype");
  json h = {{"a", {{"dtype", "Q4_K"}, {"shape", {4}}, {"data_offsets", {0, 16}}}}};
  write_file(d / "model.safetensors", safetensors_bytes(h, floats({1, 2, 3, 4})));
  expect_error(d.string(), {"unknown dtype 'Q4_K'"});
}

TEST(Safetensors, ReversedOffsets) {
  auto d = tmpdir("reversed");
  json h = {{"a", {{"dtype", "F32"}, {"shape", {1}}, {"data_offsets", {8, 4}}}}};
  write_file(d / "model.safetensors", safetensors_bytes(h, floats({1, 2, 3})));
  expect_error(d.string(), {"tensor 'a'", "data_offsets"});
}

TEST(Safetensors, ShardedIndexNamesMissingShard) {
  auto d = tmpdir("shard_missing");
  json idx = {{"metadata", {{"total_size", 16}}}, {"weight_map", {{"a", "model-00001-of-00002.safetensors"}}}};
  write_file(d / "model.safetensors.index.json", idx.dump());
  expect_error(d.string(), {"model.safetensors.index.json", "model-00001-of-00002.safetensors", "missing"});
}

TEST(Safetensors, ShardedIndexListsTensorNotInShard) {
  auto d = tmpdir("shard_lie");
  json h = {{"a", {{"dtype", "F32"}, {"shape", {1}}, {"data_offsets", {0, 4}}}}};
  write_file(d / "s1.safetensors", safetensors_bytes(h, floats({1})));
  json idx = {{"weight_map", {{"a", "s1.safetensors"}, {"b", "s1.safetensors"}}}};
  write_file(d / "model.safetensors.index.json", idx.dump());
  expect_error(d.string(), {"index.json", "tensor 'b'"});
}

TEST(Safetensors, ShardedLoadsAllShards) {
  auto d = tmpdir("shard_ok");
  json h1 = {{"a", {{"dtype", "F32"}, {"shape", {1}}, {"data_offsets", {0, 4}}}}};
  json h2 = {{"b", {{"dtype", "F32"}, {"shape", {2}}, {"data_offsets", {0, 8}}}}};
  write_file(d / "s1.safetensors", safetensors_bytes(h1, floats({1})));
  write_file(d / "s2.safetensors", safetensors_bytes(h2, floats({2, 3})));
  json idx = {{"weight_map", {{"a", "s1.safetensors"}, {"b", "s2.safetensors"}}}};
  write_file(d / "model.safetensors.index.json", idx.dump());
  auto s = TensorStore::open(d.string());
  ASSERT_TRUE(s->find("b"));
  EXPECT_EQ(static_cast<const float*>(s->find("b")->data)[1], 3.f);
}

// A shard outside the checkpoint's folder is refused before anything is opened, though the file is
// there and valid: an absolute path, a path through "..", and a name in a subfolder.
TEST(Safetensors, ShardedIndexNamesAShardOutsideTheFolder) {
  const fs::path outside = tmpdir("shard_outside_target");
  json h = {{"a", {{"dtype", "F32"}, {"shape", {1}}, {"data_offsets", {0, 4}}}}};
  write_file(outside / "s1.safetensors", safetensors_bytes(h, floats({1})));
  const fs::path d = tmpdir("shard_outside");
  const std::string relative = "../" + outside.filename().string() + "/s1.safetensors";
  for (const std::string& shard : {(outside / "s1.safetensors").string(), relative, std::string("..")}) {
    SCOPED_TRACE(shard);
    write_file(d / "model.safetensors.index.json", json{{"weight_map", {{"a", shard}}}}.dump());
    expect_error(d.string(), {"model.safetensors.index.json", "'" + shard + "'", "not a plain file name"});
  }
  // The same shard beside the index loads.
  fs::copy_file(outside / "s1.safetensors", d / "s1.safetensors");
  write_file(d / "model.safetensors.index.json", json{{"weight_map", {{"a", "s1.safetensors"}}}}.dump());
  EXPECT_EQ(*static_cast<const float*>(TensorStore::open(d.string())->find("a")->data), 1.f);
}

// --no-mmap: the file read into anonymous memory holds the same bytes as the mapping, at the same
// size, read-only; an empty file stays empty; the setting is read when a file is opened.
TEST(MappedFile, ReadIntoMemoryHoldsTheMappedBytes) {
  auto d = tmpdir("readmem");
  std::string bytes(3 * 1024 * 1024 + 17, '\0');  // more than one 2 MiB huge page, not a multiple
  for (size_t i = 0; i < bytes.size(); ++i) bytes[i] = char((i * 2654435761u) >> 13);
  write_file(d / "w.bin", bytes);
  write_file(d / "empty.bin", "");
  ASSERT_FALSE(read_into_memory());
  const MappedFile mapped((d / "w.bin").string());
  set_read_into_memory(true);
  const MappedFile held((d / "w.bin").string()), empty((d / "empty.bin").string());
  set_read_into_memory(false);
  ASSERT_EQ(held.size(), bytes.size());
  EXPECT_EQ(0, std::memcmp(held.data(), mapped.data(), bytes.size()));
  EXPECT_EQ(0, std::memcmp(held.data(), bytes.data(), bytes.size()));
  EXPECT_NE(held.data(), mapped.data());
  EXPECT_EQ(empty.size(), 0u);
}

// MappedFile opened anything by name with a blocking open(): a FIFO (or a device) as a weights file
// waited for a writer forever. Now anything but a regular file is an Error naming the path, at once.
// Should open() block again, the test opens the FIFO's writing end itself to release it, and fails
// instead of hanging.
namespace {
// Runs `read` (which should refuse `fifo`) on another thread: its error message, or "" after
// ADD_FAILURE when it blocked for 10 s (then a writer is opened to release it).
std::string error_unless_it_blocks(const fs::path& fifo, const std::function<void()>& read) {
  auto opened = std::async(std::launch::async, [&]() -> std::string {
    try {
      read();
    } catch (const Error& e) {
      return e.what();
    }
    return "no error";
  });
  if (opened.wait_for(std::chrono::seconds(10)) != std::future_status::ready) {
    const int w = ::open(fifo.c_str(), O_WRONLY | O_NONBLOCK);  // succeeds while a reader waits
    opened.wait();
    if (w >= 0) ::close(w);
    ADD_FAILURE() << "reading a FIFO blocked";
    return "";
  }
  return opened.get();
}
}  // namespace

TEST(Safetensors, AFifoAsAWeightsFileIsAnErrorNotAHang) {
  const fs::path d = tmpdir("fifo");
  const fs::path fifo = d / "model.safetensors";
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0) << std::strerror(errno);
  for (const fs::path& path : {fifo, d}) {  // the file itself, and a checkpoint folder holding it
    SCOPED_TRACE(path.string());
    const std::string what = error_unless_it_blocks(fifo, [&] {
      if (path == fifo)
        MappedFile m(path.string());
      else
        TensorStore::open(path.string());
    });
    if (what.empty()) continue;
    EXPECT_NE(what.find(fifo.string()), std::string::npos) << what;
    EXPECT_NE(what.find("FIFO"), std::string::npos) << what;
  }
}

// ------------------------------------------------------------------ config.json
namespace {
void expect_config_error(const json& cfg, std::initializer_list<std::string> fragments) {
  auto d = tmpdir("cfg");
  write_file(d / "config.json", cfg.dump());
  try {
    load_config(d.string());
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("config.json"), std::string::npos) << e.what();
    for (auto& f : fragments) EXPECT_NE(std::string(e.what()).find(f), std::string::npos) << e.what();
  }
}
}  // namespace

TEST(Config, MissingArchitecture) { expect_config_error(json{{"hidden_size", 8}}, {"architectures"}); }

TEST(Config, UnsupportedArchitecture) {
  expect_config_error(json{{"architectures", {"GPT2LMHeadModel"}}}, {"unsupported architecture 'GPT2LMHeadModel'"});
}

TEST(Config, PartlySpecifiedSizesAreAnError) {
  expect_config_error(json{{"architectures", {"LlamaForCausalLM"}}, {"hidden_size", 64}, {"intermediate_size", 128},
                           {"num_hidden_layers", 2}},
                      {"missing required field 'num_attention_heads'"});
}

TEST(Config, WrongFieldType) {
  expect_config_error(json{{"architectures", {"LlamaForCausalLM"}}, {"hidden_size", "big"}, {"intermediate_size", 128},
                           {"num_hidden_layers", 2}, {"num_attention_heads", 4}},
                      {"hidden_size", "integer"});
}

TEST(Config, KvHeadsMustDivideHeads) {
  expect_config_error(json{{"architectures", {"LlamaForCausalLM"}}, {"hidden_size", 64}, {"intermediate_size", 128},
                           {"num_hidden_layers", 2}, {"num_attention_heads", 4}, {"num_key_value_heads", 3}},
                      {"num_key_value_heads"});
}

TEST(Config, UnknownRopeType) {
  expect_config_error(json{{"architectures", {"LlamaForCausalLM"}}, {"rope_scaling", {{"rope_type", "yarn"}, {"factor", 2}}}},
                      {"rope type 'yarn'"});
}

TEST(Config, LlavaHfDefaultsMatchLlava7b) {
  auto d = tmpdir("cfg_llava");
  // The real llava-hf/llava-1.5-7b-hf config.json leaves most sizes to the defaults.
  json cfg = {{"architectures", {"LlavaForConditionalGeneration"}},
              {"image_token_index", 32000},
              {"projector_hidden_act", "gelu"},
              {"text_config", {{"model_type", "llama"}, {"max_position_embeddings", 4096}, {"rms_norm_eps", 1e-5},
                               {"vocab_size", 32064}}},
              {"vision_config", {{"hidden_size", 1024}, {"image_size", 336}, {"intermediate_size", 4096},
                                 {"num_attention_heads", 16}, {"num_hidden_layers", 24}, {"patch_size", 14}}},
              {"vision_feature_layer", -2},
              {"vision_feature_select_strategy", "default"}};
  write_file(d / "config.json", cfg.dump());
  ModelConfig c = load_config(d.string());
  EXPECT_EQ(c.text.hidden, 4096);
  EXPECT_EQ(c.text.n_layers, 32);
  EXPECT_EQ(c.text.n_kv_heads, 32);
  EXPECT_EQ(c.text.head_dim, 128);
  EXPECT_EQ(c.text.vocab_size, 32064);
  EXPECT_EQ(c.image_tokens(), 576);
  EXPECT_EQ(c.image.mode, "crop");
}

TEST(Config, Transformers5RopeParameters) {
  auto d = tmpdir("cfg_v5");
  json cfg = {{"architectures", {"LlamaForCausalLM"}}, {"hidden_size", 64}, {"intermediate_size", 128},
              {"num_hidden_layers", 2}, {"num_attention_heads", 4}, {"head_dim", 32},
              {"rope_parameters", {{"rope_type", "default"}, {"rope_theta", 500000.0}}}};
  write_file(d / "config.json", cfg.dump());
  ModelConfig c = load_config(d.string());
  EXPECT_EQ(c.text.rope_theta, 500000.f);
  EXPECT_EQ(c.text.head_dim, 32);
}

TEST(Config, OriginalLlavaLayout) {
  auto d = tmpdir("cfg_orig");
  json cfg = {{"architectures", {"LlavaLlamaForCausalLM"}}, {"hidden_size", 64}, {"intermediate_size", 128},
              {"num_hidden_layers", 2}, {"num_attention_heads", 4}, {"mm_vision_tower", "openai/clip-vit-large-patch14-336"},
              {"mm_projector_type", "mlp2x_gelu"}, {"mm_vision_select_layer", -2}, {"mm_hidden_size", 1024},
              {"image_aspect_ratio", "pad"}};
  write_file(d / "config.json", cfg.dump());
  ModelConfig c = load_config(d.string());
  EXPECT_EQ(c.layout, Layout::LlavaOriginal);
  EXPECT_EQ(c.projector_layers, 2);
  EXPECT_EQ(c.image.mode, "pad");
  EXPECT_EQ(c.image_token_index, -200);
}

// Every other file the engine reads (configs, the tokenizer model, images, profiles, evaluation data
// and truth, .npy arrays) refuses a FIFO the same way: an error naming it, never a wait for a writer.
TEST(Files, AFifoWhereAFileBelongsIsAnErrorNotAHang) {
  const fs::path d = tmpdir("fifo_files");
  const fs::path fifo = d / "input";
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0) << std::strerror(errno);
  fs::create_directories(d / "cfg");
  ASSERT_EQ(::mkfifo((d / "cfg" / "config.json").c_str(), 0600), 0) << std::strerror(errno);
  const std::vector<std::pair<std::string, std::function<void()>>> readers = {
      {"read_file", [&] { read_file(fifo.string()); }},
      {"config", [&] { load_config((d / "cfg").string()); }},
      {"tokenizer", [&] { Tokenizer t(fifo.string()); }},
      {"image", [&] { load_image(fifo.string()); }},
      {"profile", [&] { Profile::load(fifo.string()); }},
      {"data", [&] { load_conversations(fifo.string()); }},
      {"truth", [&] { TruthSet::load(fifo.string()); }},
      {"npy", [&] { read_npy(fifo.string()); }},
  };
  for (const auto& [name, read] : readers) {
    SCOPED_TRACE(name);
    const std::string what = error_unless_it_blocks(fifo, read);
    if (what.empty()) continue;
    EXPECT_NE(what.find("FIFO"), std::string::npos) << what;
  }
}
