// Server-sent events as the OpenAI streaming API uses them: one "data: <json>" event per chunk, a
// blank line after each, and "data: [DONE]" at the end.
#pragma once
#include <string>

namespace pkv::serve {

inline std::string sse_event(const std::string& data) { return "data: " + data + "\n\n"; }
inline const std::string& sse_done() {
  static const std::string done = "data: [DONE]\n\n";
  return done;
}

}  // namespace pkv::serve
