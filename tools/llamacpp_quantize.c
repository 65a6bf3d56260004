/* A GGUF file written by llama.cpp itself: its quantiser (llama_model_quantize, what its
 * llama-quantize tool calls) turns a GGUF language model into another type, here from our F16
 * export (bench/gguf_llamacpp.sh). llama.cpp is not built: libllama is loaded with dlopen from the
 * prebuilt binaries of the npm package node-llama-cpp 3.21.1 (llama.cpp release v0.4.0, its
 * llama/binariesGithubRelease.json). The prototypes and the parameter struct below are written
 * from that release's include/llama.h (llama_model_quantize_params, enum llama_ftype,
 * llama_model_quantize, llama_model_quantize_default_params, llama_backend_init); only the fields
 * this tool sets matter, but the struct must have the release's layout since it is passed by value
 * and by pointer.
 *
 *   cc -O2 tools/llamacpp_quantize.c -ldl -o /tmp/llamacpp_quantize
 *   /tmp/llamacpp_quantize BINS/libllama.v0.4.0.so IN.gguf OUT.gguf q8_0|q4_k_m|q6_k|q4_0
 * BINS: node_modules/@node-llama-cpp/linux-x64/bins/linux-x64. Exit status 0 when the file was
 * written. Never part of the prefixkv build. */
#include <dlfcn.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

/* enum llama_ftype (values of the release's llama.h). */
enum { FTYPE_Q4_0 = 2, FTYPE_Q8_0 = 7, FTYPE_Q4_K_M = 15, FTYPE_Q6_K = 18 };

/* struct llama_model_quantize_params, field for field (enums are int-sized). */
struct quantize_params {
  int32_t nthread;
  int ftype;
  int output_tensor_type;
  int token_embedding_type;
  bool allow_requantize;
  bool quantize_output_tensor;
  bool only_copy;
  bool pure;
  bool keep_split;
  bool dry_run;
  const void* imatrix;
  const void* kv_overrides;
  const void* tt_overrides;
  const int32_t* prune_layers;
  size_t max_buf_size;
};

typedef struct quantize_params (*default_params_fn)(void);
typedef uint32_t (*quantize_fn)(const char*, const char*, const struct quantize_params*);
typedef void (*backend_init_fn)(void);

int main(int argc, char** argv) {
  if (argc != 5) {
    fprintf(stderr, "usage: %s LIBLLAMA.so IN.gguf OUT.gguf q8_0|q4_k_m|q6_k|q4_0\n", argv[0]);
    return 2;
  }
  int ftype = -1;
  if (!strcmp(argv[4], "q8_0")) ftype = FTYPE_Q8_0;
  if (!strcmp(argv[4], "q4_k_m")) ftype = FTYPE_Q4_K_M;
  if (!strcmp(argv[4], "q6_k")) ftype = FTYPE_Q6_K;
  if (!strcmp(argv[4], "q4_0")) ftype = FTYPE_Q4_0;
  if (ftype < 0) {
    fprintf(stderr, "unknown type '%s' (q8_0, q4_k_m, q6_k, q4_0)\n", argv[4]);
    return 2;
  }
  void* lib = dlopen(argv[1], RTLD_NOW | RTLD_GLOBAL);
  if (!lib) {
    fprintf(stderr, "cannot load %s: %s\n", argv[1], dlerror());
    return 1;
  }
  default_params_fn defaults = (default_params_fn)dlsym(lib, "llama_model_quantize_default_params");
  quantize_fn quantize = (quantize_fn)dlsym(lib, "llama_model_quantize");
  backend_init_fn init = (backend_init_fn)dlsym(lib, "llama_backend_init");
  if (!defaults || !quantize || !init) {
    fprintf(stderr, "%s lacks llama_model_quantize, llama_model_quantize_default_params or llama_backend_init\n", argv[1]);
    return 1;
  }
  init();
  struct quantize_params p = defaults();
  p.nthread = 2;
  p.ftype = ftype;
  const uint32_t rc = quantize(argv[2], argv[3], &p);
  if (rc != 0) {
    fprintf(stderr, "llama_model_quantize failed (%u)\n", rc);
    return 1;
  }
  printf("llama.cpp quantised %s to %s as %s\n", argv[2], argv[3], argv[4]);
  return 0;
}
