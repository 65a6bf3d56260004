/* Our mmproj file read by llama.cpp's own GGUF reader, checked against what clip.cpp asks of a
 * LLaVA-1.5 ('mlp') file. node-llama-cpp 3.21.1's prebuilt binaries ship no libmtmd (clip.cpp is
 * not in them), so the image cannot be encoded by llama.cpp; what they do ship is ggml's GGUF
 * reader (libggml-base). This tool loads it with dlopen, parses the file with gguf_init_from_file,
 * and checks every key clip.cpp's load_hparams reads for this projector with the type its getter
 * demands (get_u32 -> UINT32, get_f32 -> FLOAT32, get_arr_int -> ARRAY of INT32, ...), and every
 * tensor its load_tensors and LLaVA graph use, with the shapes they need (tools/mtmd/clip.cpp,
 * clip-impl.h and models/llava.cpp of llama.cpp release v0.4.0). The prototypes are written from
 * that release's ggml/include/gguf.h.
 *
 *   cc -O2 tools/llamacpp_mmproj_check.c -ldl -o /tmp/llamacpp_mmproj_check
 *   /tmp/llamacpp_mmproj_check BINS/libggml-base.so mmproj.gguf
 * BINS: node_modules/@node-llama-cpp/linux-x64/bins/linux-x64. Prints each check; exit status 0
 * when all pass. Never part of the prefixkv build. */
#include <dlfcn.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

enum { T_UINT32 = 4, T_INT32 = 5, T_FLOAT32 = 6, T_BOOL = 7, T_STRING = 8, T_ARRAY = 9 };
struct gguf_init_params {
  bool no_alloc;
  void** ctx;
};
static void* (*init_from_file)(const char*, struct gguf_init_params);
static int64_t (*find_key)(const void*, const char*);
static int (*kv_type)(const void*, int64_t);
static int (*arr_type)(const void*, int64_t);
static size_t (*arr_n)(const void*, int64_t);
static const void* (*arr_data)(const void*, int64_t);
static uint32_t (*val_u32)(const void*, int64_t);
static bool (*val_bool)(const void*, int64_t);
static const char* (*val_str)(const void*, int64_t);
static int64_t (*find_tensor)(const void*, const char*);
static const int64_t* (*tensor_ne)(const void*, int64_t);
static int (*tensor_type)(const void*, int64_t);

static int failures = 0;
static void check(bool ok, const char* what, const char* detail) {
  printf("%s %s%s%s\n", ok ? "ok  " : "FAIL", what, detail[0] ? ": " : "", detail);
  if (!ok) ++failures;
}

/* Key `k` present with type `t` (for arrays, element type `et`), or absent when optional. */
static int64_t key(const void* g, const char* k, int t, int et, bool required) {
  const int64_t id = find_key(g, k);
  char d[128] = "";
  if (id < 0) {
    check(!required, k, required ? "missing" : "absent (optional)");
    return -1;
  }
  bool ok = kv_type(g, id) == t && (t != T_ARRAY || arr_type(g, id) == et);
  snprintf(d, sizeof d, "type %d%s", kv_type(g, id), t == T_ARRAY ? " (array)" : "");
  check(ok, k, d);
  return ok ? id : -1;
}

/* Tensor `name` present with ne[0], ne[1] (0: any). */
static void tensor(const void* g, const char* name, int64_t ne0, int64_t ne1) {
  const int64_t id = find_tensor(g, name);
  char d[128] = "missing";
  if (id >= 0) {
    const int64_t* ne = tensor_ne(g, id);
    snprintf(d, sizeof d, "ggml type %d, ne [%lld, %lld, %lld, %lld]", tensor_type(g, id), (long long)ne[0],
             (long long)ne[1], (long long)ne[2], (long long)ne[3]);
    check((!ne0 || ne[0] == ne0) && (!ne1 || ne[1] == ne1), name, d);
  } else {
    check(false, name, d);
  }
}

int main(int argc, char** argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: %s LIBGGML-BASE.so MMPROJ.gguf\n", argv[0]);
    return 2;
  }
  void* lib = dlopen(argv[1], RTLD_NOW | RTLD_GLOBAL);
  if (!lib) {
    fprintf(stderr, "cannot load %s: %s\n", argv[1], dlerror());
    return 1;
  }
#define SYM(var, name) if (!(*(void**)&var = dlsym(lib, name))) { fprintf(stderr, "%s lacks %s\n", argv[1], name); return 1; }
  SYM(init_from_file, "gguf_init_from_file") SYM(find_key, "gguf_find_key") SYM(kv_type, "gguf_get_kv_type")
  SYM(arr_type, "gguf_get_arr_type") SYM(arr_n, "gguf_get_arr_n") SYM(arr_data, "gguf_get_arr_data")
  SYM(val_u32, "gguf_get_val_u32") SYM(val_bool, "gguf_get_val_bool") SYM(val_str, "gguf_get_val_str")
  SYM(find_tensor, "gguf_find_tensor") SYM(tensor_ne, "gguf_get_tensor_ne") SYM(tensor_type, "gguf_get_tensor_type")
  struct gguf_init_params p = {true, NULL};
  const void* g = init_from_file(argv[2], p);
  check(g != NULL, "gguf_init_from_file", argv[2]);
  if (!g) return 1;

  const int64_t pt = key(g, "clip.projector_type", T_STRING, 0, true);
  check(pt >= 0 && !strcmp(val_str(g, pt), "mlp"), "projector 'mlp'", pt >= 0 ? val_str(g, pt) : "");
  const int64_t hv = key(g, "clip.has_vision_encoder", T_BOOL, 0, true);
  check(hv >= 0 && val_bool(g, hv), "clip.has_vision_encoder is true", "");
  uint32_t v[8] = {0};
  const char* u32[] = {"clip.vision.embedding_length", "clip.vision.attention.head_count", "clip.vision.feed_forward_length",
                       "clip.vision.block_count", "clip.vision.projection_dim", "clip.vision.image_size",
                       "clip.vision.patch_size"};
  for (int i = 0; i < 7; ++i) {
    const int64_t id = key(g, u32[i], T_UINT32, 0, true);
    if (id >= 0) v[i] = val_u32(g, id);
  }
  key(g, "clip.vision.attention.layer_norm_epsilon", T_FLOAT32, 0, true);
  const char* farr[] = {"clip.vision.image_mean", "clip.vision.image_std"};
  for (int i = 0; i < 2; ++i) {
    const int64_t id = key(g, farr[i], T_ARRAY, T_FLOAT32, true);
    check(id >= 0 && arr_n(g, id) >= 3, farr[i], "at least 3 values");
  }
  key(g, "clip.use_gelu", T_BOOL, 0, false);
  key(g, "clip.use_silu", T_BOOL, 0, false);
  const int64_t fl = key(g, "clip.vision.feature_layer", T_ARRAY, T_INT32, false);
  if (fl >= 0) {
    int32_t deepest = -1;
    for (size_t i = 0; i < arr_n(g, fl); ++i) {
      const int32_t x = ((const int32_t*)arr_data(g, fl))[i];
      if (x > deepest) deepest = x;
    }
    /* models/llava.cpp runs layers 0 .. deepest-1 and takes the input of layer `deepest`. */
    check(deepest >= 1 && (uint32_t)deepest <= v[3], "the deepest feature layer is within the stored blocks", "");
  }
  const int64_t D = v[0], F = v[2], grid = v[6] ? v[5] / v[6] : 0;
  tensor(g, "v.patch_embd.weight", v[6], v[6]);
  tensor(g, "v.position_embd.weight", D, grid * grid + 1);
  tensor(g, "v.class_embd", D, 0);
  tensor(g, "v.pre_ln.weight", D, 0);
  tensor(g, "v.pre_ln.bias", D, 0);
  char n[96];
  for (uint32_t b = 0; b < v[3]; ++b) {
    const char* sq[] = {"attn_q", "attn_k", "attn_v", "attn_out"};
    for (int i = 0; i < 4; ++i) {
      snprintf(n, sizeof n, "v.blk.%u.%s.weight", b, sq[i]);
      tensor(g, n, D, D);
      snprintf(n, sizeof n, "v.blk.%u.%s.bias", b, sq[i]);
      tensor(g, n, D, 0);
    }
    for (int i = 1; i <= 2; ++i) {
      snprintf(n, sizeof n, "v.blk.%u.ln%d.weight", b, i);
      tensor(g, n, D, 0);
      snprintf(n, sizeof n, "v.blk.%u.ln%d.bias", b, i);
      tensor(g, n, D, 0);
    }
    /* clip.cpp swaps ffn_up / ffn_down back when ffn_down takes the embedding (ne[0] = n_embd). */
    snprintf(n, sizeof n, "v.blk.%u.ffn_down.weight", b);
    tensor(g, n, D, F);
    snprintf(n, sizeof n, "v.blk.%u.ffn_up.weight", b);
    tensor(g, n, F, D);
  }
  tensor(g, "mm.0.weight", 0, 0);
  tensor(g, "mm.0.bias", 0, 0);
  tensor(g, "mm.2.weight", 0, 0);
  tensor(g, "mm.2.bias", 0, 0);
  check(find_tensor(g, "mm.3.weight") < 0, "no mm.3.weight (it would make clip.cpp read mlp_norm)", "");
  check(find_tensor(g, "v.post_ln.weight") < 0, "no v.post_ln.weight", "");
  printf("%s: %d check(s) failed\n", argv[2], failures);
  return failures ? 1 : 0;
}
