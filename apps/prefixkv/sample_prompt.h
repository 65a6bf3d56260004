// Turning a data sample into a prepared prompt (shared by calibrate and eval).
#pragma once
#include <optional>
#include <string>

#include "engine/engine.h"
#include "eval/dataset.h"

namespace pkv::cli {

// Loads the sample's image and prepares the LLaVA v1 prompt. Returns nullopt (with `why`) when the
// image is missing or broken: evaluation reports and skips such samples.
std::optional<PreparedPrompt> prepare_sample(const Engine& engine, const Sample& s, const std::string& image_mode,
                                             std::string* why);

// A progress line on stderr: "label  [#####.....] 12/100  eta 3m05s".
void progress(const std::string& label, size_t done, size_t total, double elapsed_s);

}  // namespace pkv::cli
