#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <iterator>

#include "core/error.h"
#include "test_util.h"
#include "vision/image.h"

namespace fs = std::filesystem;
using namespace pkv;

namespace {
std::string read_bytes(const std::string& p) {
  std::ifstream f(p, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}
void expect_image_error(const std::string& bytes, const std::string& fragment) {
  const std::string p = test::temp_path("bad_image.bin");
  std::ofstream(p, std::ios::binary) << bytes;
  try {
    load_image(p);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(p), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
  }
}
}  // namespace

TEST(Image, DecodesPngJpegGrayAndAlpha) {
  Image w = load_image(test::data_path("images/wide.png"));
  EXPECT_EQ(w.width, 400);
  EXPECT_EQ(w.height, 300);
  EXPECT_EQ(w.rgb.size(), size_t(400 * 300 * 3));
  Image t = load_image(test::data_path("images/tall.jpg"));
  EXPECT_EQ(t.width, 240);
  EXPECT_EQ(t.height, 360);
  Image g = load_image(test::data_path("images/gray.png"));
  EXPECT_EQ(g.width, 200);
  for (size_t i = 0; i < g.rgb.size(); i += 3) {  // grey replicated into R, G, B
    ASSERT_EQ(g.rgb[i], g.rgb[i + 1]);
    ASSERT_EQ(g.rgb[i], g.rgb[i + 2]);
  }
  Image a = load_image(test::data_path("images/rgba.png"));
  EXPECT_EQ(a.width, 180);
  EXPECT_EQ(a.height, 240);
}

TEST(Image, ZeroSizeFile) { expect_image_error("", "empty"); }
TEST(Image, NotAnImage) { expect_image_error("hello, this is text and not a picture", "not a PNG or JPEG"); }
TEST(Image, Unreadable) {
  try {
    load_image("/nonexistent/dir/photo.jpg");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("/nonexistent/dir/photo.jpg"), std::string::npos);
  }
}
TEST(Image, TruncatedPng) {
  std::string b = read_bytes(test::data_path("images/wide.png"));
  expect_image_error(b.substr(0, b.size() / 2), "PNG");
}
TEST(Image, TruncatedJpegHeader) {
  std::string b = read_bytes(test::data_path("images/tall.jpg"));
  expect_image_error(b.substr(0, 40), "JPEG");
}
// A JPEG cut in its scan data is refused as PIL refuses it (libjpeg alone would fill the missing
// rows with grey), and a JPEG with corrupt scan bytes is an error or an image, never a crash; under
// the sanitizer build (make test-sanitize) these also show that no error path leaks or jumps past
// a live C++ object.
TEST(Image, TruncatedJpegScan) {
  const std::string b = read_bytes(test::data_path("images/tall.jpg"));
  for (double cut : {0.3, 0.6, 0.9}) expect_image_error(b.substr(0, size_t(double(b.size()) * cut)), "Premature end");
}
TEST(Image, CorruptJpegScanIsAnErrorOrAnImage) {
  const std::string b = read_bytes(test::data_path("images/tall.jpg"));
  int errors = 0, images = 0;
  for (size_t start = 300; start + 64 < b.size(); start += 997) {
    std::string c = b;
    for (size_t i = start; i < start + 64; ++i) c[i] = char(c[i] * 31 + 7);
    try {
      const Image img = decode_image(reinterpret_cast<const uint8_t*>(c.data()), c.size(), "corrupt.jpg");
      EXPECT_EQ(img.rgb.size(), size_t(img.width) * img.height * 3);
      ++images;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("corrupt.jpg"), std::string::npos) << e.what();
      ++errors;
    }
  }
  EXPECT_GT(errors + images, 5);
}
TEST(Image, CorruptPngChunk) {
  std::string b = read_bytes(test::data_path("images/wide.png"));
  for (size_t i = 40; i < 200 && i < b.size(); ++i) b[i] = char(~b[i]);
  expect_image_error(b, "PNG");
}

TEST(Preprocess, PadToSquareCentresWithBackground) {
  Image img;
  img.width = 4;
  img.height = 2;
  img.rgb.assign(4 * 2 * 3, 200);
  const uint8_t bg[3] = {1, 2, 3};
  Image sq = pad_to_square(img, bg);
  ASSERT_EQ(sq.width, 4);
  ASSERT_EQ(sq.height, 4);
  EXPECT_EQ(sq.rgb[0], 1);                  // row 0: background
  EXPECT_EQ(sq.rgb[(1 * 4) * 3], 200);      // row 1: image
  EXPECT_EQ(sq.rgb[(2 * 4) * 3], 200);      // row 2: image
  EXPECT_EQ(sq.rgb[(3 * 4) * 3 + 2], 3);    // row 3: background
}

TEST(Preprocess, ResizeOfConstantImageIsConstant) {
  Image img;
  img.width = 37;
  img.height = 23;
  img.rgb.assign(size_t(37 * 23 * 3), 77);
  Image r = resize_bicubic(img, 16, 50);
  for (uint8_t v : r.rgb) ASSERT_EQ(v, 77);
}

TEST(Preprocess, OutputShapeAndNormalisation) {
  Image img;
  img.width = 50;
  img.height = 30;
  img.rgb.assign(size_t(50 * 30 * 3), 255);
  ImageConfig c;
  c.crop = c.shortest_edge = 28;
  c.mode = "crop";
  std::vector<float> px = preprocess_image(img, c);
  ASSERT_EQ(px.size(), size_t(3 * 28 * 28));
  EXPECT_NEAR(px[0], (1.f - c.mean[0]) / c.std[0], 1e-5);
  EXPECT_NEAR(px[2 * 28 * 28], (1.f - c.mean[2]) / c.std[2], 1e-5);
}
