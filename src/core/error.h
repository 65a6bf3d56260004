// Two error channels (DESIGN.md principle 7):
//  - pkv::Error: bad input (a file, a field, an option). Thrown by library code, caught and printed
//    at the CLI / server edge. The message names where the problem is and what was wrong.
//  - PKV_ASSERT: a bug in prefixkv itself. Aborts with file and line.
#pragma once
#include <stdexcept>
#include <string>

namespace pkv {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Throws Error("<where>: <what>"). `where` is a file, a field, an option or a request part.
[[noreturn]] void fail(const std::string& where, const std::string& what);

[[noreturn]] void assert_failed(const char* cond, const char* file, int line, const std::string& msg);

}  // namespace pkv

#define PKV_ASSERT(cond)                                               \
  do {                                                                 \
    if (!(cond)) ::pkv::assert_failed(#cond, __FILE__, __LINE__, ""); \
  } while (0)
#define PKV_ASSERT_MSG(cond, msg)                                         \
  do {                                                                    \
    if (!(cond)) ::pkv::assert_failed(#cond, __FILE__, __LINE__, (msg)); \
  } while (0)
