// prefixkv: LLaVA-1.5 inference with layer-adaptive KV-cache compression.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>
#include <unistd.h>

#include "common.h"
#include "core/error.h"
#include "ops/ops.h"

namespace pkv::cli {
int cmd_run(int argc, char** argv);
int cmd_calibrate(int argc, char** argv);
int cmd_eval(int argc, char** argv);
int cmd_serve(int argc, char** argv);
int cmd_bench(int argc, char** argv);
int cmd_export(int argc, char** argv);
}


static const char* kUsage =
    "usage: prefixkv <command> [options]\n"
    "\n"
    "LLaVA-1.5 inference with layer-adaptive KV-cache compression (PrefixKV).\n"
    "\n"
    "commands:\n"
    "  run        generate an answer for a prompt and an optional image\n"
    "  calibrate  estimate PrefixKV's per-layer KV budgets from calibration samples\n"
    "  eval       measure KV policies against the full cache (PPL, ROUGE-L, accuracy, KLD, KV bytes)\n"
    "  serve      an OpenAI-compatible HTTP server (chat completions with images, streaming, batching)\n"
    "  bench      speed and memory of prefill and batched decoding, any model shape (random weights)\n"
    "  export     write a checkpoint's language model as llama.cpp's GGUF (F16, Q8_0, Q4_0)\n"
    "\n"
    "Run 'prefixkv <command> --help' for the options of a command.\n";

int main(int argc, char** argv) {
  // OpenBLAS chose its kernels when it was loaded; if it fell back to generic ones on a CPU it does
  // not know, restart once with the right core type (ops::blas_coretype_override explains).
  if (const char* core = pkv::ops::blas_coretype_override()) {
    ::setenv("OPENBLAS_CORETYPE", core, 1);
    ::execv("/proc/self/exe", argv);  // returns only on failure: then go on with the slow kernels
  }
  if (argc < 2 || !std::strcmp(argv[1], "--help") || !std::strcmp(argv[1], "-h") || !std::strcmp(argv[1], "help")) {
    std::fputs(kUsage, argc < 2 ? stderr : stdout);
    return argc < 2 ? 2 : 0;
  }
  const std::string cmd = argv[1];
  try {
    if (cmd == "run") return pkv::cli::cmd_run(argc, argv);
    if (cmd == "calibrate") return pkv::cli::cmd_calibrate(argc, argv);
    if (cmd == "eval") return pkv::cli::cmd_eval(argc, argv);
    if (cmd == "serve") return pkv::cli::cmd_serve(argc, argv);
    if (cmd == "bench") return pkv::cli::cmd_bench(argc, argv);
    if (cmd == "export") return pkv::cli::cmd_export(argc, argv);
    std::fprintf(stderr, "prefixkv: unknown command '%s'\n\n%s", cmd.c_str(), kUsage);
    return 2;
  } catch (const pkv::Error& e) {
    std::fprintf(stderr, "prefixkv %s: error: %s\n", cmd.c_str(), e.what());
    return 1;
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "prefixkv %s: error: out of memory\n", cmd.c_str());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "prefixkv %s: error: %s\n", cmd.c_str(), e.what());
    return 1;
  }
}
