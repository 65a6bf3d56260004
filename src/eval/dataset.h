// LLaVA conversation data (the format of LLaVA-Description's detail_1k and of data/*/*.json):
//   [{"id": ..., "image": "<file>", "conversations": [{"from": "human", "value": "<image>\n..."},
//                                                     {"from": "gpt", "value": "..."}]}, ...]
#pragma once
#include <string>
#include <vector>

namespace pkv {

struct Sample {
  std::string id;
  std::string image;   // resolved path ("" for text-only samples)
  std::string prompt;  // the first human turn without the <image> marker
  std::string answer;  // the first gpt turn ("" if none)
};

// Reads the file; image names are resolved against `image_dir` (default: the file's folder).
// A malformed file or entry is one Error naming the file and the entry; missing images are not
// checked here (evaluation reports and skips them).
std::vector<Sample> load_conversations(const std::string& path, const std::string& image_dir = "");

}  // namespace pkv
