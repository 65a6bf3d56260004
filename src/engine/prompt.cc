// Prompt building: the templates (render_prompt) and the Engine members that tokenize what they
// render (engine.h declares them). See prompt.h.
#include "engine/prompt.h"

#include <algorithm>

#include "core/error.h"
#include "engine/engine.h"

namespace pkv {

namespace {

std::string join_parts(const Turn& turn) {
  std::string s;
  for (size_t i = 0; i < turn.parts.size(); ++i) {
    if (i) s += '\n';
    if (turn.parts[i].is_image)
      s += kImageMarker;
    else
      s += turn.parts[i].text;
  }
  return s;
}

bool holds_marker(const std::string& text) { return text.find(kImageMarker) != std::string::npos; }

}  // namespace

Conversation single_turn(const std::string& text, bool has_image, Template t) {
  Turn user;
  if (has_image && !(t == Template::Raw && holds_marker(text))) user.parts.push_back({true, {}});
  user.parts.push_back({false, text});
  return {std::move(user)};
}

std::vector<std::string> render_prompt(const Conversation& c, Template t) {
  if (t == Template::Raw) {
    if (c.size() != 1 || c[0].role != Turn::Role::User)
      fail("prompt", "the raw template takes a single user turn, got " + std::to_string(c.size()) + " turns");
    return {join_parts(c[0])};
  }
  // LLaVA v1 (conv_vicuna_v1 / llava-hf): "{system} USER: {user} ASSISTANT: {assistant}</s>USER: ..."
  std::string system;
  for (const Turn& turn : c)
    if (turn.role == Turn::Role::System) {
      if (!system.empty()) system += '\n';
      system += join_parts(turn);
    }
  std::vector<std::string> pieces(1);
  if (!system.empty()) pieces.back() = system + " ";
  for (const Turn& turn : c) {
    if (turn.role == Turn::Role::User) {
      pieces.back().append("USER: ").append(join_parts(turn)).append(" ");
    } else if (turn.role == Turn::Role::Assistant) {
      pieces.back().append("ASSISTANT: ").append(join_parts(turn));
      pieces.emplace_back();  // the end-of-sequence token goes here
    }
  }
  pieces.back() += "ASSISTANT:";
  return pieces;
}

std::string Engine::apply_template(const std::string& text, Template t, bool has_image) {
  return render_prompt(single_turn(text, has_image, t), t)[0];
}

int64_t Engine::min_tokens(size_t text_bytes) const {
  const int64_t per_token = tok_.max_piece_bytes();
  return (int64_t(text_bytes) + per_token - 1) / per_token;
}

void Engine::check_text_fits(size_t text_bytes) const {
  const int context = model_.config().text.max_positions;
  const int64_t at_least = min_tokens(text_bytes);
  if (at_least > context)
    fail("prompt", "is " + std::to_string(text_bytes) + " bytes of text, at least " + std::to_string(at_least) +
                       " tokens, more than the model's context of " + std::to_string(context) + " tokens");
}

int Engine::append_text_ids(std::vector<int32_t>& ids, const std::string& text, bool starts_prompt,
                            bool split_images) const {
  // The original LLaVA repository encodes each chunk around <image> separately with SentencePiece,
  // each with its dummy prefix (its tokenizer_image_token); transformers' LLaMA tokenizer
  // (legacy = false) adds the prefix only at the start of the text and merges differently on runs
  // of spaces (Tokenizer::encode_hf).
  const bool every_chunk_prefixed = model_.config().layout == Layout::LlavaOriginal;
  bool first = starts_prompt;
  int images = 0;
  for (size_t start = 0;;) {
    const size_t at = split_images ? text.find(kImageMarker, start) : std::string::npos;
    const std::string chunk = text.substr(start, at == std::string::npos ? std::string::npos : at - start);
    if (!chunk.empty()) {
      std::vector<int> t = every_chunk_prefixed ? tok_.encode(chunk) : tok_.encode_hf(chunk, first);
      ids.insert(ids.end(), t.begin(), t.end());
    }
    first = false;
    if (at == std::string::npos) break;
    ids.push_back(-1);
    ++images;
    start = at + kImageMarker.size();
  }
  return images;
}

std::vector<int32_t> Engine::tokenize_prompt(const std::string& full_text, bool has_image) const {
  check_text_fits(full_text.size());
  std::vector<int32_t> ids = {int32_t(model_.config().text.bos_id)};
  const int images = append_text_ids(ids, full_text, true, has_image);
  if (has_image && images != 1) fail("prompt", "expected exactly one <image> in the prompt, found " + std::to_string(images));
  return ids;
}

std::vector<int32_t> Engine::tokenize_turns(const std::vector<std::string>& pieces, bool has_image) const {
  size_t bytes = 0;
  for (const std::string& p : pieces) bytes += p.size();
  check_text_fits(bytes);
  if (pieces.empty()) fail("prompt", "no text to tokenize");
  const bool first_has_image = has_image && holds_marker(pieces[0]);
  std::vector<int32_t> ids = tokenize_prompt(pieces[0], first_has_image);
  for (size_t i = 1; i < pieces.size(); ++i) {
    ids.push_back(eos_id());  // the "</s>" that ends an assistant turn
    // Text after a special token: transformers' non-legacy LLaMA tokenizer adds no dummy prefix;
    // the original repository's encodes every chunk with its prefix.
    append_text_ids(ids, pieces[i], false, true);
  }
  return ids;
}

std::vector<int32_t> Engine::prompt_ids(const PromptRequest& req) const {
  const ModelConfig& cfg = model_.config();
  const bool has_image = req.image != nullptr;
  if (has_image && !cfg.has_vision)
    fail("--image", "the model " + cfg.dir + " (" + cfg.architecture + ") is text-only and cannot take an image");
  if (!has_image && req.tmpl == Template::Raw && holds_marker(req.text) && cfg.has_vision)
    fail("prompt", "the prompt contains <image> but no image was given");
  if (req.marked_ids.empty()) return tokenize_turns(render_prompt(single_turn(req.text, has_image, req.tmpl), req.tmpl), has_image);
  const auto markers = std::count(req.marked_ids.begin(), req.marked_ids.end(), -1);
  if (markers != (has_image ? 1 : 0))
    fail("prompt", "has " + std::to_string(markers) + " image markers for " + (has_image ? "one image" : "no image"));
  return req.marked_ids;
}

int32_t Engine::eos_id() const {
  const ModelConfig& cfg = model_.config();
  return cfg.text.eos_ids.empty() ? tok_.eos_id() : cfg.text.eos_ids[0];
}

std::vector<int32_t> Engine::answer_ids(const std::string& answer) const {
  // The answer continues "... ASSISTANT:" after one space; both tokenizer rules start a new piece at
  // the space, so the joint tokenisation is the prompt's followed by this.
  const bool original = model_.config().layout == Layout::LlavaOriginal;
  std::vector<int> t = original ? tok_.encode_continuation(" " + answer) : tok_.encode_hf(" " + answer, false);
  std::vector<int32_t> ids(t.begin(), t.end());
  ids.push_back(eos_id());
  return ids;
}

}  // namespace pkv
