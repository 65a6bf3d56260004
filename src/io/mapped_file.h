// A whole file, read-only, that weights point into: by default a memory mapping of the file (fast to
// open, shared with the page cache); with set_read_into_memory(true) (--no-mmap) the file is read
// once into anonymous memory (huge pages where the kernel gives them) and its page-cache copy
// dropped. The mapping's pages can be evicted by the kernel whenever it likes and read again from
// disk; on a machine that reclaims cold file pages early (a VM under DAMON reclaim, little memory)
// decoding then reads weights from disk. Anonymous memory stays (there is no swap to push it to on
// such machines) at the cost of a slower open.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

namespace pkv {

// Process-wide, read when a file is opened (the commands' --no-mmap, the Python module's mmap=False).
void set_read_into_memory(bool on);
bool read_into_memory();

class MappedFile {
 public:
  // Throws Error naming the file. for_weights false: always mapped (a reader of a few header bytes).
  explicit MappedFile(const std::string& path, bool for_weights = true);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
  size_t mapped_ = 0;  // bytes of the mapping (the file's size, or rounded up for anonymous memory)
};

}  // namespace pkv
