/* llama.cpp encodes an image through an mmproj file: its multimodal library (libmtmd: clip.cpp
 * and the LLaVA graph) turns a PNG into the image embeddings the language model would read, written
 * as float32 [tokens, dim] for bench/mmproj_llamacpp.sh to compare with prefixkv's.
 * node-llama-cpp 3.21.1's prebuilt binaries ship no libmtmd; the bench script builds it from the
 * llama.cpp source that package bundles (release v0.4.0) against the package's prebuilt libggml and
 * libllama, never committed. Both are loaded here with dlopen; the prototypes and structs are
 * written from that release's tools/mtmd/mtmd.h (mtmd_context_params, mtmd_input_part,
 * mtmd_input_chunk_type and the functions below) and ggml/include/ggml-backend.h
 * (ggml_backend_load_all_from_path: the CPU back end is a library of its own).
 *
 *   cc -O2 tools/llamacpp_mmproj_encode.c -ldl -lpng -o /tmp/llamacpp_mmproj_encode
 *   /tmp/llamacpp_mmproj_encode LIBMTMD.so BINS MMPROJ.gguf IMAGE.png DIM OUT.f32
 * BINS: node_modules/@node-llama-cpp/linux-x64/bins/linux-x64 (libggml.v0.4.0.so and the CPU
 * back ends). DIM: the projector's output width. Never part of the prefixkv build. */
#include <dlfcn.h>
#include <png.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

struct mtmd_context_params {
  bool use_gpu;
  void* device;
  bool print_timings;
  int n_threads;
  const char* image_marker;
  const char* media_marker;
  int flash_attn_type; /* enum llama_flash_attn_type */
  bool warmup;
  int image_min_tokens;
  int image_max_tokens;
  void* cb_eval;
  void* cb_eval_user_data;
  int32_t batch_max_tokens;
  void* progress_callback;
  void* progress_callback_user_data;
};
struct mtmd_input_part {
  const void* text;
  const void* bitmap;
};
enum { CHUNK_IMAGE = 1 }; /* MTMD_INPUT_CHUNK_TYPE_IMAGE */

int main(int argc, char** argv) {
  if (argc != 7) {
    fprintf(stderr, "usage: %s LIBMTMD.so BINS MMPROJ.gguf IMAGE.png DIM OUT.f32\n", argv[0]);
    return 2;
  }
  char path[4096];
  snprintf(path, sizeof path, "%s/libggml.v0.4.0.so", argv[2]);
  void* ggml = dlopen(path, RTLD_NOW | RTLD_GLOBAL);
  void* mtmd = ggml ? dlopen(argv[1], RTLD_NOW | RTLD_GLOBAL) : NULL;
  if (!mtmd) {
    fprintf(stderr, "cannot load %s or %s: %s\n", path, argv[1], dlerror());
    return 1;
  }
  void (*load_backends)(const char*) = (void (*)(const char*))dlsym(ggml, "ggml_backend_load_all_from_path");
  struct mtmd_context_params (*params_default)(void) = (struct mtmd_context_params(*)(void))dlsym(mtmd, "mtmd_context_params_default");
  void* (*init)(const char*, const void*, struct mtmd_context_params) =
      (void* (*)(const char*, const void*, struct mtmd_context_params))dlsym(mtmd, "mtmd_init_from_file");
  void* (*bitmap_init)(uint32_t, uint32_t, const unsigned char*) =
      (void* (*)(uint32_t, uint32_t, const unsigned char*))dlsym(mtmd, "mtmd_bitmap_init");
  void* (*chunks_init)(void) = (void* (*)(void))dlsym(mtmd, "mtmd_input_chunks_init");
  int32_t (*tokenize)(const void*, void*, const struct mtmd_input_part* const*, size_t, bool) =
      (int32_t (*)(const void*, void*, const struct mtmd_input_part* const*, size_t, bool))dlsym(mtmd, "mtmd_tokenize_from_parts");
  size_t (*chunks_size)(const void*) = (size_t (*)(const void*))dlsym(mtmd, "mtmd_input_chunks_size");
  const void* (*chunks_get)(const void*, size_t) = (const void* (*)(const void*, size_t))dlsym(mtmd, "mtmd_input_chunks_get");
  int (*chunk_type)(const void*) = (int (*)(const void*))dlsym(mtmd, "mtmd_input_chunk_get_type");
  size_t (*chunk_tokens)(const void*) = (size_t (*)(const void*))dlsym(mtmd, "mtmd_input_chunk_get_n_tokens");
  int32_t (*encode)(void*, const void*) = (int32_t (*)(void*, const void*))dlsym(mtmd, "mtmd_encode_chunk");
  float* (*output)(void*) = (float* (*)(void*))dlsym(mtmd, "mtmd_get_output_embd");
  if (!load_backends || !params_default || !init || !bitmap_init || !chunks_init || !tokenize || !chunks_size ||
      !chunks_get || !chunk_type || !chunk_tokens || !encode || !output) {
    fprintf(stderr, "a function is missing from libggml or libmtmd\n");
    return 1;
  }

  png_image im = {0};
  im.version = PNG_IMAGE_VERSION;
  if (!png_image_begin_read_from_file(&im, argv[4])) {
    fprintf(stderr, "cannot read %s\n", argv[4]);
    return 1;
  }
  im.format = PNG_FORMAT_RGB;
  unsigned char* rgb = malloc(PNG_IMAGE_SIZE(im));
  if (!rgb || !png_image_finish_read(&im, NULL, rgb, 0, NULL)) {
    fprintf(stderr, "cannot decode %s\n", argv[4]);
    return 1;
  }

  load_backends(argv[2]);
  struct mtmd_context_params p = params_default();
  p.use_gpu = false;
  p.n_threads = 1;
  p.warmup = false;
  p.print_timings = false;
  void* ctx = init(argv[3], NULL, p); /* no text model: only the image is encoded */
  if (!ctx) {
    fprintf(stderr, "llama.cpp cannot load %s\n", argv[3]);
    return 1;
  }
  struct mtmd_input_part part = {NULL, bitmap_init(im.width, im.height, rgb)};
  const struct mtmd_input_part* parts[1] = {&part};
  void* chunks = chunks_init();
  if (tokenize(ctx, chunks, parts, 1, false) != 0) {
    fprintf(stderr, "mtmd_tokenize_from_parts failed\n");
    return 1;
  }
  const int dim = atoi(argv[5]);
  FILE* out = fopen(argv[6], "wb");
  int images = 0;
  for (size_t i = 0; out && i < chunks_size(chunks); ++i) {
    const void* c = chunks_get(chunks, i);
    if (chunk_type(c) != CHUNK_IMAGE) continue;
    const size_t n = chunk_tokens(c);
    if (encode(ctx, c) != 0) {
      fprintf(stderr, "mtmd_encode_chunk failed\n");
      return 1;
    }
    fwrite(output(ctx), sizeof(float), n * (size_t)dim, out);
    printf("llama.cpp encoded %s through %s: %zu tokens x %d\n", argv[4], argv[3], n, dim);
    ++images;
  }
  if (!out || fclose(out) != 0 || images != 1) {
    fprintf(stderr, "no image embeddings written\n");
    return 1;
  }
  return 0;
}
