// The OpenAI chat-completions schema as prefixkv serves it: request parsing and validation into a
// typed struct, the error shape, and the response / stream-chunk bodies. No sockets here: the HTTP
// glue (http_server.cc) and the tests call these directly.
#pragma once
#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "engine/engine.h"

namespace pkv::serve {

// An error for the client, in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
class ApiError : public std::runtime_error {
 public:
  ApiError(int status, const std::string& message, std::string code = {}, std::string param = {});
  int status() const { return status_; }
  // Seconds a client should wait before trying again (the Retry-After header of a 429 or 503); 0: none.
  int retry_after() const { return retry_after_; }
  ApiError& with_retry_after(int seconds) {
    retry_after_ = seconds;
    return *this;
  }
  const std::string& code() const { return code_; }
  const std::string& param() const { return param_; }
  // OpenAI's error types: invalid_request_error (400, 404, 413), authentication_error (401),
  // rate_limit_error (429), server_error (5xx).
  std::string type() const;
  nlohmann::json body() const;

 private:
  int status_;
  int retry_after_ = 0;
  std::string code_, param_;
};

enum class Role { System, User, Assistant };

struct ContentPart {
  bool is_image = false;
  std::string text;  // text parts only
};

struct ChatMessage {
  Role role = Role::User;
  std::vector<ContentPart> parts;
};

// An image as the request gave it, still encoded (PNG or JPEG bytes).
struct ImageInput {
  std::vector<uint8_t> bytes;
  std::string where;  // the JSON path, for errors: messages[1].content[0].image_url.url
};

// Limits that bound what a request body can cost before it is parsed or looked at further: the
// body's size is the HTTP layer's (--max-body-mb); these bound what the size alone does not.
struct ParseOptions {
  std::string media_dir;  // local image paths are allowed only inside it; "" = none allowed
  size_t max_image_file_bytes = 64u << 20;
  // JSON arrays and objects nested deeper than this are refused before parsing: each level costs the
  // parser a heap-allocated container (10 MB of '[' took 750 MB), and the request's shape needs 5.
  int max_json_depth = 64;
  // JSON values (containers, strings, numbers, literals) at most, counted before parsing: each costs
  // the parsed tree 16 bytes and more (a string or container its own allocation).
  size_t max_json_values = 100000;
  size_t max_messages = 2048;       // messages[] entries (OpenAI's limit too)
  size_t max_content_parts = 2048;  // content parts over all messages (a string content is one)
};

// The linear pre-scan behind the first two limits: walks the body once, outside strings counting
// bracket depth and values, and throws ApiError 400 (json_too_deep, json_too_large) naming the
// limit. It does not validate the JSON (the parser does); a body that is not JSON may pass.
void check_json_shape(const std::string& body, const ParseOptions& opt);

// A validated chat-completions request. What needs the model (the prompt's length, the policy, the
// image's pixels) is checked later, by ChatService.
struct ChatRequest {
  std::string model;  // "" when not given
  std::vector<ChatMessage> messages;
  std::optional<ImageInput> image;  // the engine takes one image per prompt
  SamplingOptions sampling;         // max_tokens is 0 when the request did not give it
  bool stream = false;
  bool include_usage = false;  // stream_options.include_usage
  // Extensions: this request's KV-cache policy and kept fraction (default: the server's).
  std::optional<std::string> kv_policy;
  std::optional<double> kv_budget;
};

// Parses and validates a POST /v1/chat/completions body. Throws ApiError (400) naming the field and
// what was wrong, e.g. "messages[1].content[0].image_url.url: not valid base64".
ChatRequest parse_chat_request(const std::string& body, const ParseOptions& opt);

// The request's messages as the engine's conversation (engine/prompt.h): roles mapped, each
// message's parts kept in order (an image part stands where the image goes).
Conversation to_conversation(const std::vector<ChatMessage>& messages);

// The conversation in LLaVA v1's template: render_prompt(to_conversation(messages),
// Template::LlavaV1), the pieces split where an end-of-sequence token goes (engine/prompt.h says
// how). A single user message with an image part then a text part renders exactly as
// `prefixkv run` renders its prompt.
std::vector<std::string> render_llava_v1(const std::vector<ChatMessage>& messages);

// finish_reason from the engine's stop reason: eos, stop -> "stop"; length, context -> "length".
std::string finish_reason(const std::string& stop_reason);

}  // namespace pkv::serve
