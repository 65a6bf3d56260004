// Regression tests for what the fuzz targets (tests/fuzz, docs/RELIABILITY.md) found: each input
// below once escaped its parser as undefined behaviour or as an exception other than the one the
// parser documents (pkv::Error, serve::ApiError).
#include <gtest/gtest.h>

#include "test_util.h"

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/config.h"
#include "io/safetensors.h"
#include "text/tokenizer.h"
#include "kv/policy.h"
#include "model/model.h"
#include "serve/api.h"
#include "serve/base64.h"
#include "serve/scheduler.h"
#include "serve/service.h"
#include "vision/image.h"

namespace fs = std::filesystem;
using namespace pkv;
using nlohmann::json;

namespace {

fs::path fresh_dir(const std::string& tag) {
  fs::path d = test::temp_path(tag);
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

void write(const fs::path& p, const std::string& bytes) {
  std::ofstream f(p, std::ios::binary);
  f.write(bytes.data(), std::streamsize(bytes.size()));
}

std::string safetensors(const json& header) {
  const std::string h = header.dump();
  const uint64_t n = h.size();
  return std::string(reinterpret_cast<const char*>(&n), 8) + h;
}

// Runs f, which must throw E (and nothing else) with every fragment in its message.
template <class E, class F>
void expect_throws(F&& f, std::initializer_list<std::string> fragments) {
  try {
    f();
    ADD_FAILURE() << "no exception";
  } catch (const E& e) {
    for (const auto& s : fragments) EXPECT_NE(std::string(e.what()).find(s), std::string::npos) << e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "wrong exception type " << typeid(e).name() << ": " << e.what();
  }
}

json tiny_llava() {  // a valid config (LlavaForConditionalGeneration, small sizes)
  return {{"architectures", {"LlavaForConditionalGeneration"}},
          {"text_config", {{"hidden_size", 32}, {"intermediate_size", 64}, {"num_hidden_layers", 2},
                           {"num_attention_heads", 4}, {"vocab_size", 100}}},
          {"vision_config", {{"hidden_size", 16}, {"intermediate_size", 32}, {"num_hidden_layers", 2},
                             {"num_attention_heads", 2}, {"image_size", 28}, {"patch_size", 14}}}};
}

ModelConfig config_with(const std::string& tag, const json& config, const json& preprocessor = nullptr) {
  const fs::path d = fresh_dir(tag);
  write(d / "config.json", config.dump());
  if (!preprocessor.is_null()) write(d / "preprocessor_config.json", preprocessor.dump());
  return load_config(d.string());
}

}  // namespace

// Shapes whose element count overflows int64_t: TensorView::numel() multiplied past INT64_MAX
// (undefined behaviour), and a count that wrapped to 0 matched empty data_offsets, so the tensor was
// accepted with a shape of 2^64 elements and no bytes.
TEST(FuzzRegressions, SafetensorsShapeOverflowIsAnError) {
  const fs::path d = fresh_dir("st_overflow");
  const json shapes[] = {{4294967296LL, 4294967296LL}, {4611686018427387904LL, 4}, {4611686018427387904LL, 4, 0}};
  for (const json& shape : shapes) {
    write(d / "model.safetensors", safetensors({{"a", {{"dtype", "F32"}, {"shape", shape}, {"data_offsets", {0, 0}}}}}));
    expect_throws<Error>([&] { TensorStore::open((d / "model.safetensors").string()); },
                         {"tensor 'a'", "more elements than a 64-bit count holds"});
  }
  // The count fits, but count * 8 bytes wraps around 2^64 to 0.
  write(d / "model.safetensors",
        safetensors({{"a", {{"dtype", "F64"}, {"shape", {2305843009213693952LL}}, {"data_offsets", {0, 0}}}}}));
  expect_throws<Error>([&] { TensorStore::open((d / "model.safetensors").string()); }, {"tensor 'a'", "2^64"});
  // A zero dimension first: the count is 0 from there on, as numel() computes it; still valid.
  write(d / "model.safetensors",
        safetensors({{"a", {{"dtype", "F32"}, {"shape", {0, 4611686018427387904LL}}, {"data_offsets", {0, 0}}}}}));
  EXPECT_EQ(TensorStore::open((d / "model.safetensors").string())->find("a")->numel(), 0);
}

// std::filesystem threw filesystem_error (ENAMETOOLONG) through TensorStore::open for a shard
// name longer than the system's limit.
TEST(FuzzRegressions, SafetensorsIndexShardNameTooLongIsAnError) {
  const fs::path d = fresh_dir("st_longname");
  const std::string name(5000, 'x');
  write(d / "model.safetensors.index.json", json{{"weight_map", {{"a", name}}}}.dump());
  expect_throws<Error>([&] { TensorStore::open(d.string()); }, {"model.safetensors.index.json", "cannot look up"});
}

// nlohmann::json::type_error escaped from a preprocessor_config.json with non-numbers, a double
// converted to int (undefined behaviour), std::out_of_range from std::stoi, and integers wrapped
// into ints.
TEST(FuzzRegressions, ConfigFieldsOfTheWrongTypeOrRangeAreErrors) {
  expect_throws<Error>([&] { config_with("mean", tiny_llava(), {{"image_mean", {"a", 1, 2}}}); }, {"image_mean"});
  expect_throws<Error>([&] { config_with("std", tiny_llava(), {{"image_std", {1, nullptr, 2}}}); }, {"image_std"});
  expect_throws<Error>([&] { config_with("crop", tiny_llava(), {{"crop_size", {{"height", 1e300}}}}); },
                       {"crop_size.height", "positive integer"});
  expect_throws<Error>([&] { config_with("crop0", tiny_llava(), {{"crop_size", 0}}); }, {"crop_size"});
  expect_throws<Error>([&] { config_with("size", tiny_llava(), {{"size", {{"shortest_edge", "336"}}}}); },
                       {"size.shortest_edge"});
  expect_throws<Error>([&] { config_with("pre_array", tiny_llava(), json::array()); }, {"not a JSON object"});

  json big = tiny_llava();
  big["text_config"]["hidden_size"] = 4294967296LL + 32;  // wrapped to 32 before
  expect_throws<Error>([&] { config_with("wrap", big); }, {"hidden_size", "out of range"});
  json eos = tiny_llava();
  eos["text_config"]["eos_token_id"] = {2, 18446744073709551615ULL};
  expect_throws<Error>([&] { config_with("eos", eos); }, {"eos_token_id"});
  json hd = tiny_llava();
  hd["text_config"]["head_dim"] = 0;
  expect_throws<Error>([&] { config_with("head_dim", hd); }, {"head_dim must be positive"});
  json grid = tiny_llava();
  grid["vision_config"]["image_size"] = 1 << 30;
  grid["vision_config"]["patch_size"] = 1;
  expect_throws<Error>([&] { config_with("grid", grid); }, {"patches a side"});

  json orig = {{"architectures", {"LlavaLlamaForCausalLM"}}, {"hidden_size", 32}, {"intermediate_size", 64},
               {"num_hidden_layers", 2}, {"num_attention_heads", 4}, {"mm_projector_type", "mlp99999999999x_gelu"}};
  expect_throws<Error>([&] { config_with("proj", orig); }, {"unsupported mm_projector_type"});
  orig["mm_projector_type"] = "mlp3x_gelu";
  EXPECT_EQ(config_with("proj3", orig).projector_layers, 3);
}

// A number that overflows a double is nlohmann's out_of_range (406), not a parse_error: it left
// parse_chat_request as a non-ApiError (the HTTP layer answered 500 instead of 400).
TEST(FuzzRegressions, ChatBodyWithAnOverflowingNumberIsA400) {
  for (const char* body : {"1e400", "{\"messages\": [], \"max_tokens\": -1e999}"}) {
    try {
      serve::parse_chat_request(body, {});
      ADD_FAILURE() << "accepted " << body;
    } catch (const serve::ApiError& e) {
      EXPECT_EQ(e.status(), 400);
      EXPECT_EQ(e.code(), "invalid_json");
      EXPECT_NE(std::string(e.what()).find("number overflow"), std::string::npos) << e.what();
    } catch (const std::exception& e) {
      ADD_FAILURE() << "wrong exception type " << typeid(e).name() << ": " << e.what();
    }
  }
}

// libjpeg skips stray bytes before a marker (and 0xFF fill, and 0xFF 0x00); image_header_size
// stopped at the first stray byte and returned nothing, so the server decoded such a JPEG without
// its --max-image-pixels check: a few hundred bytes could claim 2^28 pixels.
TEST(FuzzRegressions, JpegHeaderSizeSkipsWhatLibjpegSkips) {
  std::ifstream f(test::data_path("images/tall.jpg"), std::ios::binary);
  std::vector<uint8_t> jpg((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  ASSERT_GT(jpg.size(), 100u);
  const auto plain = serve::image_header_size(jpg);
  ASSERT_TRUE(plain);
  // After the first segment (FF E0 + length): stray bytes, a stuffed zero, fill bytes.
  ASSERT_EQ(jpg[2], 0xFF);
  const size_t after_app0 = 4 + (size_t(jpg[4]) << 8 | jpg[5]);
  std::vector<uint8_t> odd(jpg.begin(), jpg.begin() + long(after_app0));
  for (uint8_t c : {0x12, 0x00, 0x34, 0xFF, 0x00, 0x56, 0xFF, 0xFF}) odd.push_back(c);
  odd.insert(odd.end(), jpg.begin() + long(after_app0), jpg.end());
  const auto got = serve::image_header_size(odd);
  ASSERT_TRUE(got);
  EXPECT_EQ(*got, *plain);
  const Image img = decode_image(odd.data(), odd.size(), "odd.jpg");  // libjpeg reads it (with a warning)
  EXPECT_EQ(img.width, got->first);
  EXPECT_EQ(img.height, got->second);
  // A header that claims 16384 x 16384 behind stray bytes is measured (the server refuses it).
  std::vector<uint8_t> bomb = {0xFF, 0xD8, 0x00, 0x00, 0xFF, 0xC0, 0x00, 0x11, 0x08, 0x40, 0x00, 0x40, 0x00, 0x03};
  EXPECT_EQ(serve::image_header_size(bomb), std::make_pair(int64_t(16384), int64_t(16384)));
  // Markers without a length and short segments do not derail the scan.
  std::vector<uint8_t> rst = {0xFF, 0xD8, 0xFF, 0xD0, 0xFF, 0xFE, 0x00, 0x00, 0xFF, 0xC2, 0x00, 0x11, 0x08, 0x00, 0x09, 0x00, 0x0C};
  EXPECT_EQ(serve::image_header_size(rst), std::make_pair(int64_t(12), int64_t(9)));
  EXPECT_FALSE(serve::image_header_size({0xFF, 0xD8, 0x00, 0xFF, 0xDA, 0x00, 0x02}));
  EXPECT_FALSE(serve::image_header_size({0xFF, 0xD8, 0xFF, 0xC0, 0x00, 0x11, 0x08, 0x40}));  // cut short
}

// The server's pixel check multiplied the header's sides as int64_t: a PNG claiming 0xFFFFFFFF x
// 0xFFFFFFFF overflowed (undefined behaviour; the product wrapped below the limit and the image went
// on to the decoder instead of being refused as too large).
TEST(FuzzRegressions, ServerPixelCheckOfAHugePngHeaderDoesNotOverflow) {
  const std::string dir = std::string(PKV_SOURCE_DIR) + "/models/prefixkv-llava-tiny";
  auto model = Model::load(dir);
  Tokenizer tok(dir + "/tokenizer.model");
  serve::Scheduler sched(*model, tok, {});
  serve::ServiceOptions opt;
  opt.max_image_pixels = int64_t(1) << 24;
  serve::ChatService svc(*model, tok, sched, opt, [](const std::string& name, std::optional<double> budget) {
    PolicyOptions o;
    o.budget = budget.value_or(0.2);
    return make_policy(name, o);
  });
  for (uint32_t side : {0xFFFFFFFFu, 0x80000000u, 0x10000u}) {
    std::vector<uint8_t> png = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1A, '\n', 0, 0, 0, 13, 'I', 'H', 'D', 'R'};
    for (int k = 0; k < 2; ++k)
      for (int shift : {24, 16, 8, 0}) png.push_back(uint8_t(side >> shift));
    png.insert(png.end(), {8, 2, 0, 0, 0, 0, 0, 0, 0});  // depth, colour type, methods; CRC (not checked here)
    const json body = {{"messages", {{{"role", "user"}, {"content", {{{"type", "image_url"},
        {"image_url", {{"url", "data:image/png;base64," + serve::base64_encode(png.data(), png.size())}}}}}}}}}};
    try {
      svc.submit(body.dump());
      ADD_FAILURE() << "accepted a " << side << " x " << side << " PNG";
    } catch (const serve::ApiError& e) {
      EXPECT_EQ(e.code(), "image_too_large") << side << ": " << e.what();
    }
  }
}
