#include "serve/api.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>

#include "kv/policy.h"
#include "serve/base64.h"

namespace fs = std::filesystem;
using nlohmann::json;

namespace pkv::serve {

ApiError::ApiError(int status, const std::string& message, std::string code, std::string param)
    : std::runtime_error(message), status_(status), code_(std::move(code)), param_(std::move(param)) {}

std::string ApiError::type() const {
  if (status_ == 401) return "authentication_error";
  if (status_ == 429) return "rate_limit_error";
  if (status_ >= 500) return "server_error";
  return "invalid_request_error";
}

json ApiError::body() const {
  json e = {{"message", what()}, {"type", type()}, {"param", nullptr}, {"code", nullptr}};
  if (!param_.empty()) e["param"] = param_;
  if (!code_.empty()) e["code"] = code_;
  return json{{"error", e}};
}

namespace {

[[noreturn]] void bad(const std::string& where, const std::string& what, const std::string& code = "invalid_value") {
  // The param is the top-level field, as OpenAI reports it (messages, max_tokens, ...).
  std::string param = where.substr(0, where.find_first_of(".["));
  throw ApiError(400, where + ": " + what, code, param);
}

[[noreturn]] void wrong_type(const std::string& where, const char* expected, const json& got) {
  bad(where, std::string("expected ") + expected + ", got " + got.type_name(), "invalid_type");
}

const std::string& get_string(const json& v, const std::string& where) {
  if (!v.is_string()) wrong_type(where, "a string", v);
  return v.get_ref<const std::string&>();
}

int64_t get_integer(const json& v, const std::string& where) {
  if (v.is_number_integer()) return v.get<int64_t>();
  // 16.0 is an integer as far as JSON is concerned (some clients write every number that way).
  if (v.is_number_float()) {
    const double d = v.get<double>();
    if (std::isfinite(d) && d == std::floor(d) && std::fabs(d) < 9.0e15) return int64_t(d);
    bad(where, "expected an integer, got " + v.dump(), "invalid_type");
  }
  wrong_type(where, "an integer", v);
}

double get_number(const json& v, const std::string& where) {
  if (!v.is_number()) wrong_type(where, "a number", v);
  return v.get<double>();
}

bool get_bool(const json& v, const std::string& where) {
  if (!v.is_boolean()) wrong_type(where, "a boolean", v);
  return v.get<bool>();
}

// A field that is absent or null counts as not given (the OpenAI clients send null for unset).
const json* field(const json& obj, const char* name) {
  auto it = obj.find(name);
  if (it == obj.end() || it->is_null()) return nullptr;
  return &*it;
}

std::vector<uint8_t> read_media_file(const std::string& url, const std::string& where, const ParseOptions& opt) {
  if (opt.media_dir.empty())
    bad(where,
        "local image paths are not allowed (start the server with --media-dir to allow a folder); send the "
        "image as a data: URI (base64)");
  std::string path = url.rfind("file://", 0) == 0 ? url.substr(7) : url;
  if (path.empty()) bad(where, "empty image path");
  std::error_code ec;
  fs::path root = fs::weakly_canonical(fs::absolute(opt.media_dir), ec).lexically_normal();
  if (root.filename().empty()) root = root.parent_path();  // "/media/" -> "/media"
  fs::path p = fs::path(path).is_absolute() ? fs::path(path) : root / path;
  // Resolve symbolic links and "..": what is checked is where the file really is.
  p = fs::weakly_canonical(p, ec);
  if (ec) bad(where, "cannot resolve the image path '" + path + "'");
  auto [r, q] = std::mismatch(root.begin(), root.end(), p.begin(), p.end());
  if (r != root.end() || q == p.end())
    bad(where, "the image path '" + path + "' is outside the media folder (--media-dir)");
  if (!fs::is_regular_file(p, ec)) bad(where, "no image file at '" + path + "' in the media folder");
  const auto size = fs::file_size(p, ec);
  if (ec) bad(where, "cannot read the image file '" + path + "'");
  if (size > opt.max_image_file_bytes)
    bad(where, "the image file is " + std::to_string(size) + " bytes, more than the limit of " +
                   std::to_string(opt.max_image_file_bytes));
  std::ifstream f(p, std::ios::binary);
  std::vector<uint8_t> bytes(size);
  if (!f || !f.read(reinterpret_cast<char*>(bytes.data()), std::streamsize(size)))
    bad(where, "cannot read the image file '" + path + "'");
  return bytes;
}

ImageInput parse_image_url(const json& part, const std::string& where, const ParseOptions& opt) {
  const json* iu = field(part, "image_url");
  if (!iu) bad(where + ".image_url", "is required for a part of type image_url");
  std::string url_where = where + ".image_url";
  const std::string* url;
  if (iu->is_string()) {  // the older shape some clients send
    url = &iu->get_ref<const std::string&>();
  } else if (iu->is_object()) {
    url_where += ".url";
    const json* u = field(*iu, "url");
    if (!u) bad(url_where, "is required");
    url = &get_string(*u, url_where);
    if (const json* d = field(*iu, "detail")) get_string(*d, where + ".image_url.detail");
  } else {
    wrong_type(url_where, "an object with a url", *iu);
  }
  ImageInput img;
  img.where = url_where;
  if (url->rfind("data:", 0) == 0) {
    const size_t comma = url->find(',');
    if (comma == std::string::npos) bad(url_where, "a data: URI needs a comma before the data");
    const std::string meta = url->substr(5, comma - 5);
    if (meta.size() < 7 || meta.compare(meta.size() - 7, 7, ";base64") != 0)
      bad(url_where, "only base64 data: URIs are accepted (data:image/png;base64,...)");
    auto bytes = base64_decode(std::string_view(*url).substr(comma + 1));
    if (!bytes) bad(url_where, "not valid base64");
    if (bytes->empty()) bad(url_where, "the image data is empty");
    img.bytes = std::move(*bytes);
  } else if (url->rfind("http://", 0) == 0 || url->rfind("https://", 0) == 0) {
    bad(url_where,
        "remote image URLs are not fetched (the server makes no outside connections); send the image as a "
        "data: URI (base64)");
  } else {
    img.bytes = read_media_file(*url, url_where, opt);
  }
  return img;
}

void parse_message(const json& m, const std::string& where, ChatRequest& req, const ParseOptions& opt) {
  if (!m.is_object()) wrong_type(where, "an object", m);
  const json* role_v = field(m, "role");
  if (!role_v) bad(where + ".role", "is required");
  const std::string& role = get_string(*role_v, where + ".role");
  ChatMessage msg;
  if (role == "system" || role == "developer")
    msg.role = Role::System;
  else if (role == "user")
    msg.role = Role::User;
  else if (role == "assistant")
    msg.role = Role::Assistant;
  else if (role == "tool" || role == "function")
    bad(where + ".role", "'" + role + "' messages are not supported (no tool calls)");
  else
    bad(where + ".role", "must be system, developer, user or assistant, got '" + role + "'");
  if (msg.role == Role::Assistant && field(m, "tool_calls")) bad(where + ".tool_calls", "tool calls are not supported");

  const json* content = field(m, "content");
  if (!content) {
    if (msg.role != Role::Assistant) bad(where + ".content", "is required");
  } else if (content->is_string()) {
    msg.parts.push_back({false, content->get<std::string>()});
  } else if (content->is_array()) {
    for (size_t i = 0; i < content->size(); ++i) {
      const json& part = (*content)[i];
      const std::string pw = where + ".content[" + std::to_string(i) + "]";
      if (!part.is_object()) wrong_type(pw, "an object", part);
      const json* type_v = field(part, "type");
      if (!type_v) bad(pw + ".type", "is required");
      const std::string& type = get_string(*type_v, pw + ".type");
      if (type == "text") {
        const json* t = field(part, "text");
        if (!t) bad(pw + ".text", "is required");
        msg.parts.push_back({false, get_string(*t, pw + ".text")});
      } else if (type == "image_url") {
        if (msg.role != Role::User) bad(pw, "only user messages can hold images");
        if (req.image)
          bad(pw, "only one image per request (the engine takes one image per prompt; the first is at " +
                      req.image->where + ")");
        req.image = parse_image_url(part, pw, opt);
        msg.parts.push_back({true, {}});
      } else {
        bad(pw + ".type", "must be text or image_url, got '" + type + "'");
      }
    }
  } else {
    wrong_type(where + ".content", "a string or an array of parts", *content);
  }
  for (size_t i = 0; i < msg.parts.size(); ++i)
    if (!msg.parts[i].is_image && msg.parts[i].text.find(kImageMarker) != std::string::npos)
      bad(where + ".content", "the text contains '" + std::string(kImageMarker) +
                                  "', the model's image marker; send the image as an image_url part");
  req.messages.push_back(std::move(msg));
}

}  // namespace

void check_json_shape(const std::string& body, const ParseOptions& opt) {
  // One pass, no allocation: outside strings, '[' and '{' open a level, and every container, ',' and
  // ':' counts one value (keys included; an empty container counts one too many, which is fine for
  // a bound). Inside a string only the closing quote matters, and a backslash escapes what follows.
  size_t depth = 0, values = 1;
  bool in_string = false;
  const size_t n = body.size();
  const size_t max_depth = size_t(std::max(opt.max_json_depth, 1));
  for (size_t i = 0; i < n; ++i) {
    const char c = body[i];
    if (in_string) {
      if (c == '\\')
        ++i;
      else if (c == '"')
        in_string = false;
      continue;
    }
    switch (c) {
      case '"':
        in_string = true;
        break;
      case '[':
      case '{':
        if (++depth > max_depth)
          throw ApiError(400,
                         "the request body nests arrays and objects more than " + std::to_string(max_depth) +
                             " levels deep (the server's limit; byte " + std::to_string(i) + ")",
                         "json_too_deep");
        [[fallthrough]];
      case ',':
      case ':':
        if (++values > opt.max_json_values)
          throw ApiError(400,
                         "the request body holds more than " + std::to_string(opt.max_json_values) +
                             " JSON values and keys (the server's limit; byte " + std::to_string(i) + ")",
                         "json_too_large");
        break;
      case ']':
      case '}':
        if (depth > 0) --depth;
        break;
      default:
        break;
    }
  }
}

ChatRequest parse_chat_request(const std::string& body, const ParseOptions& opt) {
  // Bounded before the parser runs: its tree costs memory by depth and by the number of values, far
  // more than the body's bytes (nlohmann's parser is iterative, so depth does not overflow the stack).
  check_json_shape(body, opt);
  json j;
  try {
    j = json::parse(body);
  } catch (const json::exception& e) {
    // nlohmann's message starts with "[json.exception.parse_error.101] parse error at line 1, ...".
    // Not only parse_error: a number too large for a double ("1e400") is an out_of_range (406).
    std::string what = e.what();
    if (auto at = what.find("] "); at != std::string::npos) what = what.substr(at + 2);
    throw ApiError(400, "the request body is not valid JSON: " + what, "invalid_json");
  }
  if (!j.is_object())
    throw ApiError(400, "the request body must be a JSON object, got " + std::string(j.type_name()), "invalid_type");
  ChatRequest req;
  if (const json* m = field(j, "model")) req.model = get_string(*m, "model");

  const json* msgs = field(j, "messages");
  if (!msgs) bad("messages", "is required", "missing_required_parameter");
  if (!msgs->is_array()) wrong_type("messages", "an array", *msgs);
  if (msgs->empty()) bad("messages", "must hold at least one message");
  if (msgs->size() > opt.max_messages)
    bad("messages",
        "holds " + std::to_string(msgs->size()) + " messages, more than the server's limit of " +
            std::to_string(opt.max_messages),
        "too_many_messages");
  size_t parts = 0;
  for (size_t i = 0; i < msgs->size(); ++i) {
    const json& m = (*msgs)[i];
    const json* c = m.is_object() ? field(m, "content") : nullptr;
    parts += c && c->is_array() ? c->size() : 1;
    if (parts > opt.max_content_parts)
      bad("messages[" + std::to_string(i) + "].content",
          "the messages up to this one hold " + std::to_string(parts) +
              " content parts, more than the server's limit of " + std::to_string(opt.max_content_parts) +
              " for a request",
          "too_many_content_parts");
  }
  for (size_t i = 0; i < msgs->size(); ++i) parse_message((*msgs)[i], "messages[" + std::to_string(i) + "]", req, opt);
  if (req.messages.back().role != Role::User)
    bad("messages[" + std::to_string(msgs->size() - 1) + "].role",
        "the last message must be the user's (the model answers it)");

  SamplingOptions& s = req.sampling;
  s.max_tokens = 0;
  for (const char* name : {"max_tokens", "max_completion_tokens"}) {
    if (const json* v = field(j, name)) {
      const int64_t n = get_integer(*v, name);
      if (n < 1) bad(name, "must be at least 1, got " + std::to_string(n));
      s.max_tokens = int(std::min<int64_t>(n, 1 << 30));
    }
  }
  if (const json* v = field(j, "temperature")) {
    s.temperature = float(get_number(*v, "temperature"));
    if (!(s.temperature >= 0 && s.temperature <= 2)) bad("temperature", "must be between 0 and 2");
  }
  if (const json* v = field(j, "top_p")) {
    s.top_p = float(get_number(*v, "top_p"));
    if (!(s.top_p > 0 && s.top_p <= 1)) bad("top_p", "must be in (0, 1]");
  }
  if (const json* v = field(j, "top_k")) {
    const int64_t k = get_integer(*v, "top_k");
    if (k < 0) bad("top_k", "must not be negative");
    s.top_k = int(std::min<int64_t>(k, 1 << 30));
  }
  if (const json* v = field(j, "seed")) s.seed = uint64_t(get_integer(*v, "seed"));
  if (const json* v = field(j, "stop")) {
    if (v->is_string()) {
      s.stop.push_back(v->get<std::string>());
    } else if (v->is_array()) {
      if (v->size() > 4) bad("stop", "at most 4 stop sequences");
      for (size_t i = 0; i < v->size(); ++i) s.stop.push_back(get_string((*v)[i], "stop[" + std::to_string(i) + "]"));
    } else {
      wrong_type("stop", "a string or an array of strings", *v);
    }
    s.stop.erase(std::remove(s.stop.begin(), s.stop.end(), std::string()), s.stop.end());
  }
  if (const json* v = field(j, "ignore_eos")) s.ignore_eos = get_bool(*v, "ignore_eos");
  if (const json* v = field(j, "n"))
    if (get_integer(*v, "n") != 1) bad("n", "only n = 1 is supported");
  if (const json* v = field(j, "stream")) req.stream = get_bool(*v, "stream");
  if (const json* v = field(j, "stream_options")) {
    if (!v->is_object()) wrong_type("stream_options", "an object", *v);
    if (const json* u = field(*v, "include_usage")) req.include_usage = get_bool(*u, "stream_options.include_usage");
  }
  for (const char* name : {"frequency_penalty", "presence_penalty"})
    if (const json* v = field(j, name))
      if (get_number(*v, name) != 0) bad(name, "is not supported (only 0)");
  if (const json* v = field(j, "logprobs"))
    if (get_bool(*v, "logprobs")) bad("logprobs", "is not supported");
  if (field(j, "top_logprobs")) bad("top_logprobs", "is not supported");
  if (field(j, "logit_bias")) bad("logit_bias", "is not supported");
  for (const char* name : {"tools", "functions"})
    if (const json* v = field(j, name); v && !(v->is_array() && v->empty())) bad(name, "tool calls are not supported");
  if (const json* v = field(j, "response_format")) {
    if (!v->is_object()) wrong_type("response_format", "an object", *v);
    const json* t = field(*v, "type");
    if (!t || get_string(*t, "response_format.type") != "text")
      bad("response_format", "only {\"type\": \"text\"} is supported");
  }

  if (const json* v = field(j, "kv_policy")) {
    const std::string& name = get_string(*v, "kv_policy");
    const auto& names = policy_names();
    if (std::find(names.begin(), names.end(), name) == names.end()) {
      std::string list;
      for (auto& n : names) list += (list.empty() ? "" : ", ") + n;
      bad("kv_policy", "unknown policy '" + name + "' (one of " + list + ")");
    }
    req.kv_policy = name;
  }
  if (const json* v = field(j, "kv_budget")) {
    const double b = get_number(*v, "kv_budget");
    if (!(b > 0 && b <= 1)) bad("kv_budget", "must be in (0, 1], got " + v->dump());
    req.kv_budget = b;
  }
  return req;
}

Conversation to_conversation(const std::vector<ChatMessage>& messages) {
  Conversation c;
  c.reserve(messages.size());
  for (const ChatMessage& m : messages) {
    Turn t;
    t.role = m.role == Role::System ? Turn::Role::System : m.role == Role::User ? Turn::Role::User : Turn::Role::Assistant;
    t.parts.reserve(m.parts.size());
    for (const ContentPart& p : m.parts) t.parts.push_back({p.is_image, p.text});
    c.push_back(std::move(t));
  }
  return c;
}

std::vector<std::string> render_llava_v1(const std::vector<ChatMessage>& messages) {
  return render_prompt(to_conversation(messages), Template::LlavaV1);
}

std::string finish_reason(const std::string& stop_reason) {
  return stop_reason == "length" || stop_reason == "context" ? "length" : "stop";
}

}  // namespace pkv::serve
