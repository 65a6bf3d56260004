// Pieces shared by the subcommands.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "args.h"
#include "engine/model_files.h"

namespace pkv::cli {

// The bundled default model: $PREFIXKV_MODEL, else models/prefixkv-llava-tiny next to the build folder.
std::string default_model_dir();
// The repository root as seen from the executable (build/prefixkv -> ..).
std::string repo_dir();

// --no-mmap (run, eval, calibrate, serve, export, bench): read the weight files into memory instead of
// mapping them (io/mapped_file.h says when that is faster). apply_no_mmap sets it from the arguments
// (load_model does; a command that loads otherwise calls it first). A function, not a global: the
// commands' option tables are globals of other files, initialised in an order C++ does not fix.
OptionSpec no_mmap_option();
void apply_no_mmap(const Args& args);

// --model (default: the bundled model), --vision-tower and (where `mmproj_input`) --mmproj: the model
// and its tokenizer (engine/model_files.h).
LoadedModel load_model(const Args& args, bool mmproj_input = true);

// The non-empty items of a comma-separated list.
std::vector<std::string> split_list(const std::string& s);

// A comma-separated list of budgets in (0, 1], sorted and without duplicates; errors name `option`.
std::vector<double> parse_budgets(const std::string& list, const std::string& option);

// --device cpu|cuda, --gpu-dtype bf16|f16 and --kv-dtype f32|f16|bf16 (run, eval, calibrate, serve),
// checked before anything is loaded (the rules: engine/make_backend.h's check_device_options).
struct DeviceChoice {
  std::string device = "cpu";
  bool cuda = false;
  std::string gpu_dtype;  // "" = the default (the checkpoint's 16-bit type, else bf16)
  std::string kv_dtype;   // "" = f32: the CPU cache's storage type (kv/kv_cache.h)
};
DeviceChoice parse_device(const Args& args);

}  // namespace pkv::cli
