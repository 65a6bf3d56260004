// Shared helpers of the libFuzzer targets (tests/fuzz/README.md). A target catches the exception
// types its parser documents and nothing else: any other exception is reported here and aborts, so
// libFuzzer records the input as a finding, as it does for a crash, a leak or undefined behaviour.
#pragma once
#include <cxxabi.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>
#include <typeinfo>
#include <vector>

namespace pkv::fuzz {

[[noreturn]] inline void finding(const std::string& what) {
  std::fprintf(stderr, "\n==pkv-fuzz== FINDING: %s\n", what.c_str());
  std::fflush(stderr);
  std::abort();
}

inline std::string demangle(const char* name) {
  int status = 0;
  char* d = abi::__cxa_demangle(name, nullptr, nullptr, &status);
  std::string out = status == 0 && d ? d : name;
  std::free(d);
  return out;
}

// Runs f(); an exception of type Documented is the parser's documented answer to bad input and is
// swallowed; anything else is a finding. Returns true when f() returned normally.
template <class Documented, class F>
bool expect_only(F&& f) {
  try {
    f();
    return true;
  } catch (const Documented&) {
    return false;
  } catch (const std::exception& e) {
    finding("unexpected exception type " + demangle(typeid(e).name()) + ": " + e.what());
  } catch (...) {
    finding("unexpected exception that is not a std::exception");
  }
}

// A folder private to this process (in /dev/shm when it exists: no disk writes per run), removed
// when the process exits normally.
inline const std::string& temp_dir(const std::string& tag) {
  static std::string dir;
  if (!dir.empty()) return dir;
  std::filesystem::path base = std::filesystem::is_directory("/dev/shm") ? std::filesystem::path("/dev/shm")
                                                                           : std::filesystem::temp_directory_path();
  dir = (base / ("pkv-fuzz-" + tag + "-" + std::to_string(::getpid()))).string();
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  std::atexit([] {
    std::error_code ec;
    std::filesystem::remove_all(dir, ec);
  });
  return dir;
}

inline void write_file(const std::string& path, const void* data, size_t size) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(static_cast<const char*>(data), std::streamsize(size));
  if (!f) finding("the harness could not write " + path);
}
inline void write_file(const std::string& path, std::string_view s) { write_file(path, s.data(), s.size()); }

// Splits the input at NUL bytes (which no JSON text holds): one fuzz input, several files.
inline std::vector<std::string_view> split_nul(const uint8_t* data, size_t size, size_t max_parts) {
  std::vector<std::string_view> parts;
  std::string_view s(reinterpret_cast<const char*>(data), size);
  while (parts.size() + 1 < max_parts) {
    const size_t at = s.find('\0');
    if (at == std::string_view::npos) break;
    parts.push_back(s.substr(0, at));
    s = s.substr(at + 1);
  }
  parts.push_back(s);
  return parts;
}

}  // namespace pkv::fuzz
