// Image decoding (PNG via libpng, JPEG via libjpeg) into 8-bit RGB, and LLaVA preprocessing.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "io/config.h"

namespace pkv {

struct Image {
  int width = 0, height = 0;
  std::vector<uint8_t> rgb;  // [height, width, 3]
};

// Decodes a PNG or JPEG file (format by content, not by name). Grayscale and palette images become
// RGB; an alpha channel is dropped (as PIL's convert("RGB") does). Throws Error naming the file.
Image load_image(const std::string& path);
// Same, from bytes in memory; `what` names the source in errors.
Image decode_image(const uint8_t* data, size_t size, const std::string& what);

// Resamples with PIL's bicubic filter (a = -0.5, widened support when shrinking, 8-bit fixed-point
// accumulation, horizontal pass first), which is what the LLaVA / CLIP processors use.
Image resize_bicubic(const Image& in, int out_w, int out_h);

// LLaVA's expand2square: pad to a square canvas of `background`, the image centred.
Image pad_to_square(const Image& in, const uint8_t background[3]);

// Full preprocessing to pixel values [3, crop, crop] (float32, normalised):
//   pad:  expand2square with the mean colour, resize to the crop size;
//   crop: resize the shortest edge to `shortest_edge`, centre-crop to `crop`.
std::vector<float> preprocess_image(const Image& img, const ImageConfig& cfg);

}  // namespace pkv
