// libFuzzer target: PNG and JPEG decoding from memory (decode_image), the server's header peek
// (image_header_size, src/serve/service.h) and, for small decoded images, LLaVA preprocessing.
//
// PNG chunks carry CRCs, which random mutations break: libpng would then reject nearly every input
// at the first chunk. So the harness first rewrites every complete chunk's CRC of a PNG input (the
// CRC check itself is left to the unit tests). Inputs whose header claims more than 2^22 pixels
// are refused before decoding, as the server refuses images over its --max-image-pixels; a decoded
// image must then have the header's size (else the server's check could be bypassed).
// Documented errors: pkv::Error.
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "core/error.h"
#include "fuzz_util.h"
#include "serve/service.h"
#include "vision/image.h"

namespace {

constexpr int64_t kMaxHeaderPixels = int64_t(1) << 22;

uint32_t crc32(const uint8_t* p, size_t n) {
  static uint32_t table[256];
  static bool ready = false;
  if (!ready) {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      table[i] = c;
    }
    ready = true;
  }
  uint32_t c = 0xFFFFFFFFu;
  for (size_t i = 0; i < n; ++i) c = table[(c ^ p[i]) & 0xFF] ^ (c >> 8);
  return c ^ 0xFFFFFFFFu;
}

void fix_png_crcs(std::vector<uint8_t>& b) {
  if (b.size() < 8 || std::memcmp(b.data(), "\x89PNG\r\n\x1a\n", 8) != 0) return;
  size_t i = 8;
  while (i + 12 <= b.size()) {
    const uint32_t len = uint32_t(b[i]) << 24 | uint32_t(b[i + 1]) << 16 | uint32_t(b[i + 2]) << 8 | b[i + 3];
    if (len > b.size() - i - 12) break;
    const uint32_t c = crc32(&b[i + 4], size_t(len) + 4);  // type and data
    uint8_t* out = &b[i + 8 + len];
    out[0] = uint8_t(c >> 24), out[1] = uint8_t(c >> 16), out[2] = uint8_t(c >> 8), out[3] = uint8_t(c);
    i += 12 + len;
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::vector<uint8_t> bytes(data, data + size);
  fix_png_crcs(bytes);
  const auto header = pkv::serve::image_header_size(bytes);
  if (header && (header->first < 0 || header->second < 0))
    pkv::fuzz::finding("image_header_size gave a negative size");
  if (header && uint64_t(header->first) * uint64_t(header->second) > uint64_t(kMaxHeaderPixels))
    return 0;  // refused before decoding

  pkv::Image img;
  if (!pkv::fuzz::expect_only<pkv::Error>([&] { img = pkv::decode_image(bytes.data(), bytes.size(), "fuzz"); }))
    return 0;
  if (img.width <= 0 || img.height <= 0 || img.rgb.size() != size_t(img.width) * size_t(img.height) * 3)
    pkv::fuzz::finding("decode_image returned an inconsistent image");
  if (!header)
    pkv::fuzz::finding("decode_image decoded a " + std::to_string(img.width) + "x" + std::to_string(img.height) +
                       " image whose size image_header_size could not read (the server's pixel limit is bypassed)");
  if (header->first != img.width || header->second != img.height)
    pkv::fuzz::finding("image_header_size says " + std::to_string(header->first) + "x" +
                       std::to_string(header->second) + ", decode_image gave " + std::to_string(img.width) + "x" +
                       std::to_string(img.height));
  // Preprocessing of small images (large ones only cost time): both LLaVA modes at a small crop.
  if (int64_t(img.width) * img.height <= (1 << 16) && img.width <= 1024 && img.height <= 1024) {
    pkv::ImageConfig cfg;
    cfg.crop = cfg.shortest_edge = 24;
    for (const char* mode : {"pad", "crop"}) {
      cfg.mode = mode;
      const std::vector<float> px = pkv::preprocess_image(img, cfg);
      if (px.size() != size_t(3) * 24 * 24) pkv::fuzz::finding(std::string("preprocess_image (") + mode + ") has the wrong size");
    }
  }
  return 0;
}
