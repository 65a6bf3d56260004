// Writes the image seeds of the fuzz_image target (tests/fuzz/corpus/fuzz_image/) from the
// repository's own test images: a small crop of tests/data/images/tall.jpg and gray.png, stored
// in the PNG and JPEG variants the decoder handles (colour types, bit depths, palette, interlace,
// progressive, grayscale, CMYK, restart markers, arithmetic coding). Not part of the build:
//   g++ -std=c++20 -O1 tests/fuzz/tools/make_image_seeds.cc -lpng -ljpeg -o /tmp/make_image_seeds
//   /tmp/make_image_seeds tests/data/images tests/fuzz/corpus/fuzz_image
#include <cstddef>
#include <cstdio>

#include <jpeglib.h>
#include <png.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

namespace {

struct Rgb {
  int w = 0, h = 0;
  std::vector<unsigned char> px;  // RGB
};

[[noreturn]] void die(const std::string& m) {
  std::fprintf(stderr, "make_image_seeds: %s\n", m.c_str());
  std::exit(1);
}

Rgb read_jpeg_scaled(const std::string& path) {
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) die("cannot open " + path);
  jpeg_decompress_struct c;
  jpeg_error_mgr e;
  c.err = jpeg_std_error(&e);
  jpeg_create_decompress(&c);
  jpeg_stdio_src(&c, f);
  jpeg_read_header(&c, TRUE);
  c.scale_num = 1;
  c.scale_denom = 8;
  c.out_color_space = JCS_RGB;
  jpeg_start_decompress(&c);
  Rgb img;
  img.w = int(c.output_width);
  img.h = int(c.output_height);
  img.px.resize(size_t(img.w) * img.h * 3);
  while (c.output_scanline < c.output_height) {
    JSAMPROW row = &img.px[size_t(c.output_scanline) * img.w * 3];
    jpeg_read_scanlines(&c, &row, 1);
  }
  jpeg_finish_decompress(&c);
  jpeg_destroy_decompress(&c);
  std::fclose(f);
  return img;
}

Rgb crop(const Rgb& in, int x0, int y0, int w, int h) {
  Rgb out;
  out.w = w, out.h = h;
  out.px.resize(size_t(w) * h * 3);
  for (int y = 0; y < h; ++y)
    for (int x = 0; x < w; ++x)
      for (int ch = 0; ch < 3; ++ch)
        out.px[(size_t(y) * w + x) * 3 + ch] = in.px[(size_t(y0 + y) * in.w + x0 + x) * 3 + ch];
  return out;
}

// Regular libpng write API: any colour type / depth / interlace, rows given ready-made.
void write_png(const std::string& path, int w, int h, int color, int depth, bool interlace,
               const std::vector<std::vector<unsigned char>>& rows, const std::vector<png_color>& palette = {},
               bool trns = false) {
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) die("cannot write " + path);
  png_structp p = png_create_write_struct(PNG_LIBPNG_VER_STRING, nullptr, nullptr, nullptr);
  png_infop info = png_create_info_struct(p);
  png_init_io(p, f);
  png_set_compression_level(p, 9);
  png_set_IHDR(p, info, png_uint_32(w), png_uint_32(h), depth, color,
               interlace ? PNG_INTERLACE_ADAM7 : PNG_INTERLACE_NONE, PNG_COMPRESSION_TYPE_DEFAULT,
               PNG_FILTER_TYPE_DEFAULT);
  if (!palette.empty()) png_set_PLTE(p, info, palette.data(), int(palette.size()));
  if (trns) {
    png_byte alpha[2] = {0, 128};
    png_set_tRNS(p, info, alpha, 2, nullptr);
  }
  png_write_info(p, info);
  std::vector<png_bytep> ptrs;
  for (auto& r : rows) ptrs.push_back(const_cast<png_bytep>(r.data()));
  png_write_image(p, ptrs.data());
  png_write_end(p, nullptr);
  png_destroy_write_struct(&p, &info);
  std::fclose(f);
}

enum class JpegKind { Baseline, Progressive, Gray, Cmyk, Restart, Arith, Subsampled };

void write_jpeg(const std::string& path, const Rgb& img, JpegKind kind) {
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) die("cannot write " + path);
  jpeg_compress_struct c;
  jpeg_error_mgr e;
  c.err = jpeg_std_error(&e);
  jpeg_create_compress(&c);
  jpeg_stdio_dest(&c, f);
  c.image_width = JDIMENSION(img.w);
  c.image_height = JDIMENSION(img.h);
  const bool gray = kind == JpegKind::Gray, cmyk = kind == JpegKind::Cmyk;
  c.input_components = gray ? 1 : cmyk ? 4 : 3;
  c.in_color_space = gray ? JCS_GRAYSCALE : cmyk ? JCS_CMYK : JCS_RGB;
  jpeg_set_defaults(&c);
  jpeg_set_quality(&c, 60, TRUE);
  if (kind == JpegKind::Progressive) jpeg_simple_progression(&c);
  if (kind == JpegKind::Restart) c.restart_interval = 1;
  if (kind == JpegKind::Arith) c.arith_code = TRUE;
  if (kind == JpegKind::Baseline || kind == JpegKind::Restart) {  // 4:4:4
    for (int i = 0; i < c.num_components; ++i) c.comp_info[i].h_samp_factor = c.comp_info[i].v_samp_factor = 1;
  }
  jpeg_start_compress(&c, TRUE);
  std::vector<unsigned char> row(size_t(img.w) * 4);
  while (c.next_scanline < c.image_height) {
    const unsigned char* src = &img.px[size_t(c.next_scanline) * img.w * 3];
    for (int x = 0; x < img.w; ++x) {
      const unsigned char r = src[x * 3], g = src[x * 3 + 1], b = src[x * 3 + 2];
      if (gray) {
        row[size_t(x)] = (unsigned char)((r * 77 + g * 150 + b * 29) >> 8);
      } else if (cmyk) {  // Adobe-style inverted CMYK with K = 255 (no black)
        row[size_t(x) * 4] = r, row[size_t(x) * 4 + 1] = g, row[size_t(x) * 4 + 2] = b, row[size_t(x) * 4 + 3] = 255;
      } else {
        row[size_t(x) * 3] = r, row[size_t(x) * 3 + 1] = g, row[size_t(x) * 3 + 2] = b;
      }
    }
    JSAMPROW rp = row.data();
    jpeg_write_scanlines(&c, &rp, 1);
  }
  jpeg_finish_compress(&c);
  jpeg_destroy_compress(&c);
  std::fclose(f);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) die("usage: make_image_seeds IMAGES_DIR OUT_DIR");
  const std::string in = argv[1], out = std::string(argv[2]) + "/";
  const Rgb full = read_jpeg_scaled(in + "/tall.jpg");
  const Rgb img = crop(full, full.w / 4, full.h / 3, 12, 9);
  const int w = img.w, h = img.h;

  // PNG: RGB 8-bit, RGB interlaced, RGBA, gray 8-bit, gray 1-bit, gray+alpha 16-bit, palette with tRNS.
  auto rows_of = [&](auto pixel_bytes) {
    std::vector<std::vector<unsigned char>> rows{size_t(h)};
    for (int y = 0; y < h; ++y)
      for (int x = 0; x < w; ++x) {
        const unsigned char* p = &img.px[(size_t(y) * w + x) * 3];
        pixel_bytes(rows[size_t(y)], p, x);
      }
    return rows;
  };
  auto rgb = rows_of([](auto& r, const unsigned char* p, int) { r.insert(r.end(), p, p + 3); });
  write_png(out + "rgb.png", w, h, PNG_COLOR_TYPE_RGB, 8, false, rgb);
  write_png(out + "rgb_interlaced.png", w, h, PNG_COLOR_TYPE_RGB, 8, true, rgb);
  write_png(out + "rgba.png", w, h, PNG_COLOR_TYPE_RGB_ALPHA, 8, false,
            rows_of([](auto& r, const unsigned char* p, int x) {
              r.insert(r.end(), p, p + 3);
              r.push_back((unsigned char)(x * 20));
            }));
  auto luma = [](const unsigned char* p) { return (unsigned char)((p[0] * 77 + p[1] * 150 + p[2] * 29) >> 8); };
  write_png(out + "gray.png", w, h, PNG_COLOR_TYPE_GRAY, 8, false,
            rows_of([&](auto& r, const unsigned char* p, int) { r.push_back(luma(p)); }));
  {
    std::vector<std::vector<unsigned char>> rows(size_t(h), std::vector<unsigned char>(size_t((w + 7) / 8)));
    for (int y = 0; y < h; ++y)
      for (int x = 0; x < w; ++x)
        if (luma(&img.px[(size_t(y) * w + x) * 3]) > 128) rows[size_t(y)][size_t(x / 8)] |= (unsigned char)(0x80 >> (x % 8));
    write_png(out + "gray_1bit.png", w, h, PNG_COLOR_TYPE_GRAY, 1, false, rows);
  }
  write_png(out + "gray_alpha16.png", w, h, PNG_COLOR_TYPE_GRAY_ALPHA, 16, false,
            rows_of([&](auto& r, const unsigned char* p, int x) {
              const unsigned char l = luma(p);
              r.insert(r.end(), {l, l, (unsigned char)(x * 20), 0});
            }));
  {
    std::vector<png_color> pal;
    for (int i = 0; i < 4; ++i) pal.push_back(png_color{png_byte(i * 80), png_byte(255 - i * 60), png_byte(i * 30)});
    write_png(out + "palette_trns.png", w, h, PNG_COLOR_TYPE_PALETTE, 2, false,
              rows_of([&](auto& r, const unsigned char* p, int x) {
                if (x % 4 == 0) r.push_back(0);
                r.back() |= (unsigned char)((luma(p) >> 6) << (6 - 2 * (x % 4)));
              }),
              pal, true);
  }
  // JPEG variants.
  write_jpeg(out + "baseline.jpg", img, JpegKind::Baseline);
  write_jpeg(out + "subsampled.jpg", img, JpegKind::Subsampled);
  write_jpeg(out + "progressive.jpg", img, JpegKind::Progressive);
  write_jpeg(out + "gray.jpg", img, JpegKind::Gray);
  write_jpeg(out + "cmyk.jpg", img, JpegKind::Cmyk);
  write_jpeg(out + "restart.jpg", img, JpegKind::Restart);
  write_jpeg(out + "arith.jpg", img, JpegKind::Arith);
  return 0;
}
