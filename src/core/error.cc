#include "core/error.h"

#include <cstdio>
#include <cstdlib>

namespace pkv {

void fail(const std::string& where, const std::string& what) { throw Error(where + ": " + what); }

void assert_failed(const char* cond, const char* file, int line, const std::string& msg) {
  std::fprintf(stderr, "prefixkv internal error: %s:%d: assertion `%s` failed%s%s\n", file, line, cond,
               msg.empty() ? "" : ": ", msg.c_str());
  std::abort();
}

}  // namespace pkv
