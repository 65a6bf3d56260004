#include "vision/image.h"

#include <algorithm>
#include <cmath>
#include <csetjmp>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>

#include <jpeglib.h>
#include <jerror.h>
#include <png.h>

#include "core/file.h"
#include "core/error.h"

namespace pkv {

namespace {

constexpr int64_t kMaxPixels = int64_t(1) << 28;  // 268 megapixels

// libpng and libjpeg report errors by longjmp. A longjmp that skips a C++ object with a destructor
// is undefined behaviour ([csetjmp.syn]), so every call into either library happens inside a small
// function below whose frame holds only trivially destructible locals and which sets its own jump
// target; buffers are owned by the caller, outside those frames, and the library state is released
// by a guard object in the caller whatever happened.

// ---------------------------------------------------------------- PNG
struct PngReader {
  const uint8_t* data;
  size_t size, off;
};

void png_read_mem(png_structp png, png_bytep out, png_size_t n) {
  auto* r = static_cast<PngReader*>(png_get_io_ptr(png));
  if (n > r->size - r->off) png_error(png, "truncated PNG data");
  std::memcpy(out, r->data + r->off, n);
  r->off += n;
}

struct PngErr {
  char msg[256] = {0};
};
void png_err_fn(png_structp png, png_const_charp msg) {
  auto* e = static_cast<PngErr*>(png_get_error_ptr(png));
  std::snprintf(e->msg, sizeof e->msg, "%s", msg);
  png_longjmp(png, 1);
}
void png_warn_fn(png_structp, png_const_charp) {}

struct PngState {
  png_structp png = nullptr;
  png_infop info = nullptr;
  PngErr err;
  PngReader reader{nullptr, 0, 0};
  png_uint_32 width = 0, height = 0;
  size_t row_bytes = 0;  // after the conversion to 8-bit RGB
};

// Reads the header and sets up the conversion to 8-bit RGB. False on a libpng error (in st.err).
bool png_read_header_c(PngState& st) {
  if (setjmp(png_jmpbuf(st.png))) return false;
  png_set_read_fn(st.png, &st.reader, png_read_mem);
  png_read_info(st.png, st.info);
  st.width = png_get_image_width(st.png, st.info);
  st.height = png_get_image_height(st.png, st.info);
  if (st.width == 0 || st.height == 0 || int64_t(st.width) * st.height > kMaxPixels) return true;  // caller refuses
  const int color = png_get_color_type(st.png, st.info), depth = png_get_bit_depth(st.png, st.info);
  if (color == PNG_COLOR_TYPE_PALETTE) png_set_palette_to_rgb(st.png);
  if (color == PNG_COLOR_TYPE_GRAY && depth < 8) png_set_expand_gray_1_2_4_to_8(st.png);
  if (depth == 16) png_set_strip_16(st.png);
  if (color == PNG_COLOR_TYPE_GRAY || color == PNG_COLOR_TYPE_GRAY_ALPHA) png_set_gray_to_rgb(st.png);
  png_set_strip_alpha(st.png);  // also drops tRNS-derived alpha (never added: no png_set_tRNS_to_alpha)
  png_set_interlace_handling(st.png);
  png_read_update_info(st.png, st.info);
  st.row_bytes = png_get_rowbytes(st.png, st.info);
  return true;
}

// Decodes every row into rows[y] (caller-owned, height pointers of row_bytes each).
bool png_read_rows_c(PngState& st, png_bytep* rows) {
  if (setjmp(png_jmpbuf(st.png))) return false;
  png_read_image(st.png, rows);
  png_read_end(st.png, nullptr);
  return true;
}

Image decode_png(const uint8_t* data, size_t size, const std::string& what) {
  PngState st;
  st.reader = PngReader{data, size, 0};
  st.png = png_create_read_struct(PNG_LIBPNG_VER_STRING, &st.err, png_err_fn, png_warn_fn);
  if (!st.png) fail(what, "out of memory decoding PNG");
  struct Release {
    PngState& st;
    ~Release() { png_destroy_read_struct(&st.png, st.info ? &st.info : nullptr, nullptr); }
  } release{st};
  st.info = png_create_info_struct(st.png);
  if (!st.info) fail(what, "out of memory decoding PNG");
  if (!png_read_header_c(st)) fail(what, std::string("invalid or truncated PNG: ") + st.err.msg);
  if (st.width == 0 || st.height == 0 || int64_t(st.width) * st.height > kMaxPixels)
    fail(what, "PNG has an unsupported size " + std::to_string(st.width) + "x" + std::to_string(st.height));
  if (st.row_bytes != size_t(st.width) * 3) fail(what, "PNG colour format could not be converted to 8-bit RGB");
  Image img;
  img.width = int(st.width);
  img.height = int(st.height);
  img.rgb.resize(size_t(st.width) * st.height * 3);
  std::vector<png_bytep> rows(st.height);
  for (png_uint_32 y = 0; y < st.height; ++y) rows[y] = img.rgb.data() + size_t(y) * st.width * 3;
  if (!png_read_rows_c(st, rows.data())) fail(what, std::string("invalid or truncated PNG: ") + st.err.msg);
  return img;
}

// ---------------------------------------------------------------- JPEG
struct JpegErr {
  jpeg_error_mgr mgr;
  jmp_buf jmp;
  char msg[JMSG_LENGTH_MAX];
};
void jpeg_err_exit(j_common_ptr cinfo) {
  auto* e = reinterpret_cast<JpegErr*>(cinfo->err);
  (*cinfo->err->format_message)(cinfo, e->msg);
  longjmp(e->jmp, 1);
}
void jpeg_no_output(j_common_ptr) {}
// Warnings are ignored as PIL ignores them (corrupt data it can skip), except a file that ends
// before its image does: libjpeg would fill the rest with grey, PIL refuses it as truncated.
void jpeg_on_message(j_common_ptr cinfo, int level) {
  if (level == -1 && cinfo->err->msg_code == JWRN_JPEG_EOF) jpeg_err_exit(cinfo);
}

struct JpegState {
  jpeg_decompress_struct cinfo{};  // zeroed: jpeg_destroy_decompress is a no-op before creation
  JpegErr err{};
  bool created = false;
};

// Creates the decompressor, reads the header, chooses the output colour space and starts
// decompression unless the size is refused (width/height 0 or too many pixels: the caller checks).
bool jpeg_start_c(JpegState& st, const uint8_t* data, size_t size) {
  st.cinfo.err = jpeg_std_error(&st.err.mgr);
  st.err.mgr.error_exit = jpeg_err_exit;
  st.err.mgr.output_message = jpeg_no_output;
  st.err.mgr.emit_message = jpeg_on_message;
  if (setjmp(st.err.jmp)) return false;
  jpeg_create_decompress(&st.cinfo);
  st.created = true;
  jpeg_mem_src(&st.cinfo, data, static_cast<unsigned long>(size));
  jpeg_read_header(&st.cinfo, TRUE);
  if (st.cinfo.image_width == 0 || st.cinfo.image_height == 0 ||
      int64_t(st.cinfo.image_width) * st.cinfo.image_height > kMaxPixels)
    return true;
  const bool cmyk = st.cinfo.jpeg_color_space == JCS_CMYK || st.cinfo.jpeg_color_space == JCS_YCCK;
  st.cinfo.out_color_space = cmyk ? JCS_CMYK : JCS_RGB;
  jpeg_start_decompress(&st.cinfo);
  return true;
}

// Decodes the rows into out (output_height rows of output_width * output_components bytes).
bool jpeg_read_rows_c(JpegState& st, uint8_t* out) {
  if (setjmp(st.err.jmp)) return false;
  const size_t stride = size_t(st.cinfo.output_width) * size_t(st.cinfo.output_components);
  while (st.cinfo.output_scanline < st.cinfo.output_height) {
    JSAMPROW row = out + size_t(st.cinfo.output_scanline) * stride;
    jpeg_read_scanlines(&st.cinfo, &row, 1);
  }
  jpeg_finish_decompress(&st.cinfo);
  return true;
}

Image decode_jpeg(const uint8_t* data, size_t size, const std::string& what) {
  JpegState st;
  struct Release {
    JpegState& st;
    ~Release() {
      if (st.created) jpeg_destroy_decompress(&st.cinfo);
    }
  } release{st};
  if (!jpeg_start_c(st, data, size)) fail(what, std::string("invalid or truncated JPEG: ") + st.err.msg);
  if (st.cinfo.image_width == 0 || st.cinfo.image_height == 0 ||
      int64_t(st.cinfo.image_width) * st.cinfo.image_height > kMaxPixels)
    fail(what, "JPEG has an unsupported size " + std::to_string(st.cinfo.image_width) + "x" +
                   std::to_string(st.cinfo.image_height));
  const int comps = st.cinfo.output_components;
  if (comps != 3 && comps != 4) fail(what, "JPEG colour format could not be converted to 8-bit RGB");
  Image img;
  img.width = int(st.cinfo.output_width);
  img.height = int(st.cinfo.output_height);
  std::vector<uint8_t> decoded(size_t(img.width) * img.height * size_t(comps));  // [height, width, comps]
  if (!jpeg_read_rows_c(st, decoded.data())) fail(what, std::string("invalid or truncated JPEG: ") + st.err.msg);
  if (comps == 3) {
    img.rgb = std::move(decoded);
    return img;
  }
  // Adobe CMYK JPEGs store inverted values; PIL's conversion: channel = c * k / 255.
  img.rgb.resize(size_t(img.width) * img.height * 3);
  for (size_t p = 0; p < size_t(img.width) * img.height; ++p)
    for (int c = 0; c < 3; ++c) img.rgb[p * 3 + c] = uint8_t((int(decoded[p * 4 + c]) * int(decoded[p * 4 + 3]) + 127) / 255);
  return img;
}

// ---------------------------------------------------------------- resampling (PIL's algorithm)
constexpr int kPrecisionBits = 32 - 8 - 2;

double bicubic(double x) {
  const double a = -0.5;
  x = std::fabs(x);
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}

struct Coeffs {
  int ksize = 0;
  std::vector<int> xmin, xcount;
  std::vector<int32_t> k;  // [out, ksize] fixed point
};

Coeffs make_coeffs(int in_size, int out_size) {
  const double scale = double(in_size) / out_size;
  const double filterscale = std::max(scale, 1.0);
  const double support = 2.0 * filterscale;
  Coeffs c;
  c.ksize = int(std::ceil(support)) * 2 + 1;
  c.xmin.resize(size_t(out_size));
  c.xcount.resize(size_t(out_size));
  c.k.assign(size_t(out_size) * c.ksize, 0);
  std::vector<double> w(size_t(c.ksize));
  for (int xx = 0; xx < out_size; ++xx) {
    const double center = (xx + 0.5) * scale;
    const double ss = 1.0 / filterscale;
    int xmin = int(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    int xmax = int(center + support + 0.5);
    if (xmax > in_size) xmax = in_size;
    xmax -= xmin;
    double ww = 0;
    for (int x = 0; x < xmax; ++x) {
      w[size_t(x)] = bicubic((x + xmin - center + 0.5) * ss);
      ww += w[size_t(x)];
    }
    for (int x = 0; x < xmax; ++x) {
      const double v = ww != 0.0 ? w[size_t(x)] / ww : w[size_t(x)];
      c.k[size_t(xx) * c.ksize + x] =
          v < 0 ? int32_t(v * (1 << kPrecisionBits) - 0.5) : int32_t(v * (1 << kPrecisionBits) + 0.5);
    }
    c.xmin[size_t(xx)] = xmin;
    c.xcount[size_t(xx)] = xmax;
  }
  return c;
}

inline uint8_t clip8(int32_t v) {
  v >>= kPrecisionBits;
  return uint8_t(v < 0 ? 0 : (v > 255 ? 255 : v));
}

Image resample_h(const Image& in, int out_w) {
  Coeffs c = make_coeffs(in.width, out_w);
  Image out;
  out.width = out_w;
  out.height = in.height;
  out.rgb.resize(size_t(out_w) * in.height * 3);
  for (int y = 0; y < in.height; ++y)
    for (int xx = 0; xx < out_w; ++xx) {
      const int32_t* k = &c.k[size_t(xx) * c.ksize];
      int32_t s[3] = {1 << (kPrecisionBits - 1), 1 << (kPrecisionBits - 1), 1 << (kPrecisionBits - 1)};
      for (int x = 0; x < c.xcount[size_t(xx)]; ++x) {
        const uint8_t* p = &in.rgb[(size_t(y) * in.width + c.xmin[size_t(xx)] + x) * 3];
        for (int ch = 0; ch < 3; ++ch) s[ch] += int32_t(p[ch]) * k[x];
      }
      uint8_t* o = &out.rgb[(size_t(y) * out_w + xx) * 3];
      for (int ch = 0; ch < 3; ++ch) o[ch] = clip8(s[ch]);
    }
  return out;
}

Image resample_v(const Image& in, int out_h) {
  Coeffs c = make_coeffs(in.height, out_h);
  Image out;
  out.width = in.width;
  out.height = out_h;
  out.rgb.resize(size_t(in.width) * out_h * 3);
  for (int yy = 0; yy < out_h; ++yy) {
    const int32_t* k = &c.k[size_t(yy) * c.ksize];
    for (int x = 0; x < in.width; ++x) {
      int32_t s[3] = {1 << (kPrecisionBits - 1), 1 << (kPrecisionBits - 1), 1 << (kPrecisionBits - 1)};
      for (int y = 0; y < c.xcount[size_t(yy)]; ++y) {
        const uint8_t* p = &in.rgb[(size_t(c.xmin[size_t(yy)] + y) * in.width + x) * 3];
        for (int ch = 0; ch < 3; ++ch) s[ch] += int32_t(p[ch]) * k[y];
      }
      uint8_t* o = &out.rgb[(size_t(yy) * in.width + x) * 3];
      for (int ch = 0; ch < 3; ++ch) o[ch] = clip8(s[ch]);
    }
  }
  return out;
}

}  // namespace

Image decode_image(const uint8_t* data, size_t size, const std::string& what) {
  if (size == 0) fail(what, "image is empty (0 bytes)");
  if (size >= 8 && std::memcmp(data, "\x89PNG\r\n\x1a\n", 8) == 0) return decode_png(data, size, what);
  if (size >= 3 && data[0] == 0xFF && data[1] == 0xD8 && data[2] == 0xFF) return decode_jpeg(data, size, what);
  fail(what, "not a PNG or JPEG image (unrecognised file signature)");
}

Image load_image(const std::string& path) {
  const std::string bytes = read_file(path, "image file");
  return decode_image(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), path);
}

Image resize_bicubic(const Image& in, int out_w, int out_h) {
  PKV_ASSERT(out_w > 0 && out_h > 0);
  Image cur = in;
  if (out_w != cur.width) cur = resample_h(cur, out_w);
  if (out_h != cur.height) cur = resample_v(cur, out_h);
  return cur;
}

Image pad_to_square(const Image& in, const uint8_t background[3]) {
  if (in.width == in.height) return in;
  const int side = std::max(in.width, in.height);
  Image out;
  out.width = out.height = side;
  out.rgb.resize(size_t(side) * side * 3);
  for (size_t i = 0; i < size_t(side) * side; ++i) std::memcpy(&out.rgb[i * 3], background, 3);
  const int ox = (side - in.width) / 2, oy = (side - in.height) / 2;
  for (int y = 0; y < in.height; ++y)
    std::memcpy(&out.rgb[(size_t(y + oy) * side + ox) * 3], &in.rgb[size_t(y) * in.width * 3], size_t(in.width) * 3);
  return out;
}

std::vector<float> preprocess_image(const Image& src, const ImageConfig& cfg) {
  Image img = src;
  if (cfg.mode == "pad") {
    uint8_t bg[3];
    for (int c = 0; c < 3; ++c) bg[c] = uint8_t(int(cfg.mean[size_t(c)] * 255));
    img = pad_to_square(img, bg);
  }
  // Resize the shortest edge (a square image becomes shortest_edge x shortest_edge).
  const int se = cfg.shortest_edge;
  int w, h;
  if (img.width <= img.height) {
    w = se;
    h = int(double(se) * img.height / img.width);
  } else {
    h = se;
    w = int(double(se) * img.width / img.height);
  }
  if (w != img.width || h != img.height) img = resize_bicubic(img, w, h);
  // Centre crop (pads with zeros if the image is smaller, as transformers does).
  const int C = cfg.crop;
  const int top = (img.height - C) / 2, left = (img.width - C) / 2;
  std::vector<float> out(size_t(3) * C * C);
  for (int c = 0; c < 3; ++c) {
    const float m = cfg.mean[size_t(c)], s = cfg.std[size_t(c)];
    for (int y = 0; y < C; ++y)
      for (int x = 0; x < C; ++x) {
        const int sy = y + top, sx = x + left;
        float v = 0.f;
        if (sy >= 0 && sy < img.height && sx >= 0 && sx < img.width)
          v = float(double(img.rgb[(size_t(sy) * img.width + sx) * 3 + c]) * cfg.rescale);
        out[(size_t(c) * C + y) * C + x] = (v - m) / s;
      }
  }
  return out;
}

}  // namespace pkv
