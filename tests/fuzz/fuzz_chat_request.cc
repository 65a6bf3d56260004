// libFuzzer target: a POST /v1/chat/completions body, through parse_chat_request (JSON, the
// OpenAI fields, data: URIs in base64, local image paths under --media-dir). Documented errors:
// serve::ApiError. Invariants checked on accepted requests:
//  - a local image path can only read a file inside the media folder: the folder holds
//    "a.png" (bytes "inside"); next to it, outside, lie "secret.png" and "media-x/b.png" (bytes
//    "OUTSIDE"): reading those bytes through any path is a finding;
//  - base64: decode(encode(image bytes)) gives the bytes back;
//  - the conversation renders in the LLaVA v1 template.
#include <cstdint>
#include <filesystem>
#include <string>

#include "fuzz_util.h"
#include "serve/api.h"
#include "serve/base64.h"

namespace {

pkv::serve::ParseOptions g_opt;

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  const std::string dir = pkv::fuzz::temp_dir("chat");
  std::filesystem::create_directories(dir + "/media/sub");
  std::filesystem::create_directories(dir + "/media-x");
  pkv::fuzz::write_file(dir + "/media/a.png", "inside");
  pkv::fuzz::write_file(dir + "/media/sub/c.png", "inside");
  pkv::fuzz::write_file(dir + "/secret.png", "OUTSIDE");
  pkv::fuzz::write_file(dir + "/media-x/b.png", "OUTSIDE");
  std::error_code ec;
  std::filesystem::create_symlink(dir + "/secret.png", dir + "/media/link.png", ec);  // points outside
  g_opt.media_dir = dir + "/media";
  g_opt.max_image_file_bytes = 1 << 20;
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string body(reinterpret_cast<const char*>(data), size);
  pkv::serve::ChatRequest req;
  if (!pkv::fuzz::expect_only<pkv::serve::ApiError>([&] { req = pkv::serve::parse_chat_request(body, g_opt); }))
    return 0;
  if (req.messages.empty() || req.messages.back().role != pkv::serve::Role::User)
    pkv::fuzz::finding("an accepted request does not end with a user message");
  if (req.image) {
    const auto& b = req.image->bytes;
    if (b.empty()) pkv::fuzz::finding("an accepted request has an empty image");
    if (std::string(b.begin(), b.end()) == "OUTSIDE")
      pkv::fuzz::finding("an image path read a file outside the media folder: " + req.image->where);
    const std::string enc = pkv::serve::base64_encode(b.data(), b.size());
    const auto dec = pkv::serve::base64_decode(enc);
    if (!dec || *dec != b) pkv::fuzz::finding("base64_decode(base64_encode(bytes)) != bytes");
  }
  if (req.sampling.max_tokens < 0 || req.sampling.top_k < 0) pkv::fuzz::finding("negative max_tokens or top_k accepted");
  const auto pieces = pkv::serve::render_llava_v1(req.messages);
  if (pieces.empty() || pieces.back().size() < 10) pkv::fuzz::finding("render_llava_v1 gave no final turn");
  return 0;
}
