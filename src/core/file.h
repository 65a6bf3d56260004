// Reading a whole file that must be a regular file. A FIFO, socket or device given where a file is
// expected (a config, a tokenizer, an image, a data file) would otherwise block the program or
// read without end; here it is one clear error naming the path.
#pragma once
#include <cstddef>
#include <string>

namespace pkv {

// The file's bytes. Error naming the path: missing or unreadable, not a regular file, or larger than
// max_bytes (`what` says what the file is for: "config", "image file", ...).
std::string read_file(const std::string& path, const std::string& what = "file", size_t max_bytes = size_t(1) << 31);
// The same checks without reading (for libraries that open the path themselves).
void check_regular_file(const std::string& path, const std::string& what = "file");
// Opens a regular file for reading with those checks; returns the descriptor (the caller closes it)
// and its size.
int open_regular_file(const std::string& path, const std::string& what, size_t* size);

}  // namespace pkv
