#include "io/mapped_file.h"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/error.h"
#include "core/file.h"

namespace pkv {

namespace {
std::atomic<bool> g_read_into_memory{false};
}  // namespace

void set_read_into_memory(bool on) { g_read_into_memory = on; }
bool read_into_memory() { return g_read_into_memory; }

MappedFile::MappedFile(const std::string& path, bool for_weights) : path_(path) {
  // Opened without blocking and refused unless a regular file (core/file.h): a FIFO would wait
  // for a writer forever.
  const int fd = open_regular_file(path, "weights file", &size_);
  if (size_ > 0 && !(for_weights && g_read_into_memory)) {
    void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      const int err = errno;
      ::close(fd);
      fail(path, std::string("mmap failed: ") + std::strerror(err));
    }
    data_ = static_cast<const uint8_t*>(p);
    mapped_ = size_;
  } else if (size_ > 0) {
    constexpr size_t kHuge = size_t(2) << 20;
    mapped_ = (size_ + kHuge - 1) / kHuge * kHuge;
    void* p = ::mmap(nullptr, mapped_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
      const int err = errno;
      ::close(fd);
      fail(path, "cannot hold the file in memory (" + std::to_string(size_ >> 20) + " MiB): " + std::strerror(err));
    }
    ::madvise(p, mapped_, MADV_HUGEPAGE);  // a hint: fewer TLB misses when the kernel allows it
    auto* dst = static_cast<uint8_t*>(p);
    size_t done = 0;
    while (done < size_) {
      const ssize_t n = ::read(fd, dst + done, std::min(size_ - done, size_t(64) << 20));
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        const int err = n < 0 ? errno : 0;
        ::munmap(p, mapped_);
        ::close(fd);
        fail(path, "reading the file failed at byte " + std::to_string(done) + " of " + std::to_string(size_) + ": " +
                       (err ? std::strerror(err) : "it ended early (was it truncated while being read?)"));
      }
      done += size_t(n);
    }
    ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);  // the copy in memory is the one used
    ::mprotect(p, mapped_, PROT_READ);
    data_ = dst;
  }
  ::close(fd);
}

MappedFile::~MappedFile() {
  if (data_) ::munmap(const_cast<uint8_t*>(data_), mapped_);
}

}  // namespace pkv
