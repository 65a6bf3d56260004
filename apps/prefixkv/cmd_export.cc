// prefixkv export --gguf FILE: a checkpoint's language model as llama.cpp's GGUF (src/model/gguf_export.h).
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <iostream>

#include "args.h"
#include "common.h"
#include "core/error.h"
#include "model/gguf_export.h"
#include "ops/quant.h"

namespace pkv::cli {

namespace {
const std::vector<OptionSpec> kExportOptions = with_options({
    {"model", "DIR", "checkpoint directory (default: the bundled model)"},
    no_mmap_option(),
    {"gguf", "FILE", "write the language model (and its tokenizer) as llama.cpp's GGUF"},
    {"mmproj", "FILE", "also write the vision tower and projector as llama.cpp's LLaVA-1.5 mmproj file (F16; F32 "
                       "with --type f32)"},
    {"type", "TYPE", "f16 (default), q8_0, q4_0 or f32: the matrices' type (norms stay f32)"},
    {"name", "NAME", "general.name in the file (default: the model folder's name)"},
}, {});
}  // namespace

int cmd_export(int argc, char** argv) {
  Args args("export", kExportOptions, argc, argv, 2);
  if (args.help()) {
    std::cout << Args::usage("export",
                             "Writes a checkpoint in another format: its language model as llama.cpp's GGUF, its vision tower as "
                             "llama.cpp's mmproj file.",
                             kExportOptions);
    return 0;
  }
  const std::string out = args.str("gguf", "");
  if (out.empty()) fail("--gguf", "is required (the GGUF file to write)");
  GgufExportOptions opt;
  opt.type = gguf_export_type(args.str("type", "f16"), "--type");
  opt.name = args.str("name", "");
  const auto t0 = std::chrono::steady_clock::now();
  const std::string mmproj = args.str("mmproj", "");
  LoadedModel lm = load_model(args, false);
  if (!mmproj.empty()) mmproj_feature_layers(lm.model->config());  // a model the file cannot hold: before writing
  export_text_gguf(*lm.model, *lm.tok, out, opt);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("wrote %s (%.1f MiB, %s, %.1f s)\n", out.c_str(),
              double(std::filesystem::file_size(out)) / double(1 << 20), args.str("type", "f16").c_str(), s);
  if (!mmproj.empty()) {
    const uint32_t type = opt.type == quant::kF32 ? quant::kF32 : quant::kF16;
    export_mmproj_gguf(*lm.model, mmproj, type, opt.name);
    std::printf("wrote %s (%.1f MiB, %s)\n", mmproj.c_str(), double(std::filesystem::file_size(mmproj)) / double(1 << 20),
                type == quant::kF32 ? "f32" : "f16");
  }
  return 0;
}

}  // namespace pkv::cli
