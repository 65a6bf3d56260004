/* Writes tests/data/ref/ggml_quants.bin: rows quantised and dequantised by ggml itself, the
 * reference that tests/unit/test_gguf.cc holds src/ops/quant.cc to (bit for bit).
 *
 * Built against ggml's public API (ggml.h: ggml_quantize_chunk, ggml_get_type_traits), never part of
 * the prefixkv build. Made with ggml v0.21.0-2 (commit d99724f2), built as
 *   cmake -S ggml -B ggml-build -DGGML_NATIVE=OFF -DBUILD_SHARED_LIBS=OFF && cmake --build ggml-build --target ggml-base
 *   cc -O2 -I ggml/include tools/ggml_quant_reference.c ggml-build/src/libggml-base.a -lm -lpthread -lstdc++ -fopenmp -o ref
 *   ./ref tests/data/ref/ggml_quants.bin
 *
 * File: for each type, little-endian: uint32 ggml type, uint32 n (elements of the row), float32
 * input[n], uint32 quantised byte count, the quantised bytes, float32 dequantised[n].
 * The input is n = 1024 values from a fixed generator, in blocks of different character: normal
 * values of several magnitudes, a block of zeros, a constant block, one with a single large negative
 * value, tiny values near the half-precision range's bottom. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "ggml.h"

static uint64_t state = 0x9E3779B97F4A7C15ull;
static double uniform(void) {
  state ^= state << 13;
  state ^= state >> 7;
  state ^= state << 17;
  return (double)(state >> 11) / 9007199254740992.0;
}
static double normal(void) {
  const double u = uniform() + 1e-12, v = uniform();
  return sqrt(-2.0 * log(u)) * cos(6.283185307179586 * v);
}

int main(int argc, char** argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: %s OUT\n", argv[0]);
    return 2;
  }
  enum { N = 1024 };
  static float x[N], y[N];
  for (int i = 0; i < N; ++i) {
    const int block = i / 32;
    double v = normal();
    switch (block % 8) {
      case 0: v *= 0.02; break;
      case 1: v *= 1.0; break;
      case 2: v = 0.0; break;
      case 3: v = 0.75; break;
      case 4: v *= 0.01; if (i % 32 == 5) v = -3.0; break;
      case 5: v *= 1e-6; break;
      case 6: v *= 30.0; break;
      default: v = uniform() - 0.5; break;
    }
    x[i] = (float)v;
  }
  FILE* f = fopen(argv[1], "wb");
  if (!f) return 1;
  const enum ggml_type types[] = {GGML_TYPE_Q8_0, GGML_TYPE_Q4_0, GGML_TYPE_Q4_K, GGML_TYPE_Q6_K};
  for (size_t t = 0; t < sizeof types / sizeof types[0]; ++t) {
    const enum ggml_type type = types[t];
    const size_t bytes = ggml_row_size(type, N);
    uint8_t* q = malloc(bytes);
    ggml_quantize_chunk(type, x, q, 0, 1, N, NULL);
    ggml_get_type_traits(type)->to_float(q, y, N);
    const uint32_t head[2] = {(uint32_t)type, N}, nb = (uint32_t)bytes;
    fwrite(head, 4, 2, f);
    fwrite(x, 4, N, f);
    fwrite(&nb, 4, 1, f);
    fwrite(q, 1, bytes, f);
    fwrite(y, 4, N, f);
    free(q);
  }
  fclose(f);
  return 0;
}
