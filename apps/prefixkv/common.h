// Pieces shared by the subcommands.
#pragma once
#include <string>

namespace pkv::cli {

// The bundled default model: $PREFIXKV_MODEL, else models/prefixkv-llava-tiny next to the build folder.
std::string default_model_dir();
// The repository root as seen from the executable (build/prefixkv -> ..).
std::string repo_dir();

}  // namespace pkv::cli
