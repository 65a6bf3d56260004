// Evaluation data. LLaVA conversation data (the format of LLaVA-Description's detail_1k and of data/*/*.json):
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

// A text testbed (data/text/heldout.json, tools/make_text_heldout.py): documents of a language
// corpus, each the beginning of a document, long enough for a context and its continuation:
//   {"testbed": "text", "context_tokens": 512, "continuation_tokens": 128,
//    "documents": [{"id": "...", "text": "..."}, ...], ...}   (other keys describe the source)
struct TextDocument {
  std::string id;
  std::string text;
};
struct TextSet {
  int context_tokens = 0;       // the prompt: the document's first tokens (BOS first)
  int continuation_tokens = 0;  // the tokens after it, teacher-forced
  std::vector<TextDocument> documents;
};
// Whether a data file is a text testbed (a JSON object) rather than conversations (a JSON list).
bool is_text_set(const std::string& path);
// Reads the file; a malformed file or entry is one Error naming the file and the entry.
TextSet load_text_set(const std::string& path);

}  // namespace pkv
