#include "eval/dataset.h"

#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "core/file.h"
#include "core/error.h"
#include "engine/prompt.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace pkv {

namespace {
json read_json(const std::string& path) {
  const std::string text = read_file(path, "data file");
  try {
    return json::parse(text);
  } catch (const std::exception& e) {
    fail(path, std::string("not valid JSON: ") + e.what());
  }
}
}  // namespace

std::vector<Sample> load_conversations(const std::string& path, const std::string& image_dir) {
  const json j = read_json(path);
  if (!j.is_array()) fail(path, "expected a JSON list of conversations");
  const fs::path base = image_dir.empty() ? fs::path(path).parent_path() : fs::path(image_dir);
  std::vector<Sample> out;
  for (size_t i = 0; i < j.size(); ++i) {
    const json& e = j[i];
    const std::string where = path + ": entry " + std::to_string(i);
    if (!e.is_object()) fail(where, "is not an object");
    Sample s;
    if (e.contains("id")) s.id = e["id"].is_string() ? e["id"].get<std::string>() : e["id"].dump();
    else s.id = std::to_string(i);
    if (e.contains("image") && !e["image"].is_null()) {
      if (!e["image"].is_string()) fail(where + " ('" + s.id + "')", "'image' must be a file name");
      s.image = (base / e["image"].get<std::string>()).string();
    }
    if (!e.contains("conversations") || !e["conversations"].is_array())
      fail(where + " ('" + s.id + "')", "lacks a 'conversations' list");
    bool have_human = false, have_gpt = false;
    for (auto& turn : e["conversations"]) {
      if (!turn.is_object() || !turn.contains("from") || !turn.contains("value") || !turn["value"].is_string())
        fail(where + " ('" + s.id + "')", "a conversation turn lacks 'from' or a string 'value'");
      const std::string from = turn["from"].get<std::string>(), value = turn["value"].get<std::string>();
      if (from == "human" && !have_human) {
        std::string p = value;
        // The sample's prompt without its image marker (and the line break beside it): the
        // prompt is rendered again with the image in the template's place (engine/prompt.h).
        if (size_t at = p.find(kImageMarker); at != std::string::npos) {
          size_t len = kImageMarker.size();
          if (at + len < p.size() && p[at + len] == '\n') ++len;
          else if (at > 0 && p[at - 1] == '\n') --at, ++len;
          p.erase(at, len);
        }
        s.prompt = p;
        have_human = true;
      } else if (from == "gpt" && have_human && !have_gpt) {
        s.answer = value;
        have_gpt = true;
      }
    }
    if (!have_human) fail(where + " ('" + s.id + "')", "has no human turn");
    out.push_back(std::move(s));
  }
  return out;
}

bool is_text_set(const std::string& path) {
  const std::string text = read_file(path, "data file");
  const size_t at = text.find_first_not_of(" \t\r\n");
  return at != std::string::npos && text[at] == '{';
}

TextSet load_text_set(const std::string& path) {
  const json j = read_json(path);
  if (!j.is_object() || !j.contains("documents"))
    fail(path, "is neither a JSON list of conversations nor a text testbed (an object with 'documents', "
               "'context_tokens' and 'continuation_tokens')");
  TextSet set;
  for (auto [key, field] : {std::pair{"context_tokens", &set.context_tokens},
                            std::pair{"continuation_tokens", &set.continuation_tokens}}) {
    if (!j.contains(key) || !j[key].is_number_integer() || j[key].get<int64_t>() < 1 || j[key].get<int64_t>() > 1 << 20)
      fail(path, std::string("'") + key + "' must be a positive whole number of tokens");
    *field = j[key].get<int>();
  }
  if (!j["documents"].is_array() || j["documents"].empty()) fail(path, "'documents' must be a non-empty list");
  const json& docs = j["documents"];
  for (size_t i = 0; i < docs.size(); ++i) {
    const json& e = docs[i];
    const std::string where = path + ": document " + std::to_string(i);
    if (!e.is_object() || !e.contains("id") || !e["id"].is_string() || !e.contains("text") || !e["text"].is_string())
      fail(where, "must be an object with a string 'id' and a string 'text'");
    set.documents.push_back({e["id"].get<std::string>(), e["text"].get<std::string>()});
    if (set.documents.back().text.empty()) fail(where + " ('" + set.documents.back().id + "')", "has no text");
  }
  return set;
}

}  // namespace pkv
