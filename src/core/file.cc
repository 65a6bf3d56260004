#include "core/file.h"

#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/error.h"

namespace pkv {

namespace {

const char* kind_of(mode_t m) {
  if (S_ISDIR(m)) return "a folder";
  if (S_ISFIFO(m)) return "a FIFO (named pipe)";
  if (S_ISSOCK(m)) return "a socket";
  if (S_ISCHR(m)) return "a character device";
  if (S_ISBLK(m)) return "a block device";
  return "not a regular file";
}

}  // namespace

// Opens without blocking (O_NONBLOCK: a FIFO would wait for a writer) and checks the descriptor's
// own type, so nothing can be swapped in between.
int open_regular_file(const std::string& path, const std::string& what, size_t* size) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
  if (fd < 0) fail(path, "cannot open the " + what + ": " + std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    fail(path, "cannot stat the " + what + ": " + std::strerror(err));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    fail(path, std::string("is ") + kind_of(st.st_mode) + ", not a regular file (expected the " + what + ")");
  }
  *size = size_t(st.st_size);
  return fd;
}

void check_regular_file(const std::string& path, const std::string& what) {
  size_t size = 0;
  ::close(open_regular_file(path, what, &size));
}

std::string read_file(const std::string& path, const std::string& what, size_t max_bytes) {
  size_t size = 0;
  const int fd = open_regular_file(path, what, &size);
  if (size > max_bytes) {
    ::close(fd);
    fail(path, "the " + what + " is " + std::to_string(size) + " bytes, more than the limit of " + std::to_string(max_bytes));
  }
  std::string out(size, '\0');
  size_t got = 0;
  while (got < size) {
    const ssize_t n = ::read(fd, out.data() + got, size - got);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const int err = errno;
      ::close(fd);
      fail(path, "reading the " + what + " failed" + (n < 0 ? std::string(": ") + std::strerror(err) : " (it shrank)"));
    }
    got += size_t(n);
  }
  ::close(fd);
  return out;
}

}  // namespace pkv
