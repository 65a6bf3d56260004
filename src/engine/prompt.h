// Prompt building in one place: the chat templates, conversations of several turns, where the image
// goes and the end-of-sequence token between turns. `prefixkv run` (and evaluation) build a
// one-turn conversation from their prompt text, the server maps a request's messages onto the same
// turns, and both are rendered by render_prompt and tokenized by Engine::tokenize_turns, so one
// question gives the same token ids whichever way it came. The tokenizing members of Engine
// (tokenize_prompt, tokenize_turns, eos_id, answer_ids, ...) are declared in engine.h and defined
// in prompt.cc beside the rendering.
#pragma once
#include <string>
#include <string_view>
#include <vector>

namespace pkv {

enum class Template {
  LlavaV1,  // conv_vicuna_v1, the llava-hf models' template: "USER: <image>\n{prompt} ASSISTANT:"
  Raw,      // the text is the whole model input (one user turn)
};

// What stands for the image in rendered text; tokenizing turns it into the image's place (one -1).
inline constexpr std::string_view kImageMarker = "<image>";

// One part of a turn: text, or the image's place.
struct TurnPart {
  bool is_image = false;
  std::string text;  // text parts only
};

struct Turn {
  enum class Role { System, User, Assistant };
  Role role = Role::User;
  std::vector<TurnPart> parts;  // rendered in order, joined by "\n"
};

using Conversation = std::vector<Turn>;

// The conversation of a single prompt (`prefixkv run`, evaluation's samples): one user turn, the
// image first when there is one. With Template::Raw a text that already holds kImageMarker places
// the image itself, and the turn gets no image part.
Conversation single_turn(const std::string& text, bool has_image, Template t);

// The model input text of a conversation, split where an end-of-sequence token goes (after each
// assistant turn; Engine::tokenize_turns puts the token between the pieces, so it is never text a
// user could type). Parts of a turn are joined by "\n", an image part rendered as kImageMarker.
//   LlavaV1: "{system} USER: {user} ASSISTANT: {assistant}" | "USER: {user} ASSISTANT:"
//            (system turns joined by "\n" at the front, wherever they stand; a single user turn
//            gives "USER: {user} ASSISTANT:")
//   Raw:     the one user turn's text; any other conversation is refused (pkv::Error).
std::vector<std::string> render_prompt(const Conversation& c, Template t);

}  // namespace pkv
