#include "server_harness.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <cstring>
#include <fstream>
#include <regex>
#include <sstream>
#include <thread>

#include "serve/base64.h"
#include "test_util.h"

namespace pkv::test {

namespace {

using Clock = std::chrono::steady_clock;

int connect_loopback(int port, double timeout_s) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  timeval tv{};
  tv.tv_sec = time_t(timeout_s);
  tv.tv_usec = suseconds_t((timeout_s - double(tv.tv_sec)) * 1e6);
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(uint16_t(port));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

bool send_all(int fd, const std::string& s) {
  size_t off = 0;
  while (off < s.size()) {
    const ssize_t n = ::send(fd, s.data() + off, s.size() - off, MSG_NOSIGNAL);
    if (n <= 0) return false;
    off += size_t(n);
  }
  return true;
}

std::string request_text(const std::string& method, const std::string& path, const std::string& body,
                         const std::vector<std::string>& headers) {
  std::string r = method + " " + path + " HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n";
  bool has_type = false;
  for (auto& h : headers) {
    r += h + "\r\n";
    if (strncasecmp(h.c_str(), "content-type:", 13) == 0) has_type = true;
  }
  if (!body.empty() || method == "POST") {
    if (!has_type) r += "Content-Type: application/json\r\n";
    r += "Content-Length: " + std::to_string(body.size()) + "\r\n";
  }
  return r + "\r\n" + body;
}

std::string lower(std::string s) {
  for (auto& c : s) c = char(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

// Decodes a chunked body; false when it is incomplete.
bool unchunk(const std::string& in, std::string* out) {
  size_t i = 0;
  for (;;) {
    const size_t eol = in.find("\r\n", i);
    if (eol == std::string::npos) return false;
    const size_t n = std::stoul(in.substr(i, eol - i), nullptr, 16);
    i = eol + 2;
    if (n == 0) return true;
    if (i + n + 2 > in.size()) return false;
    out->append(in, i, n);
    i += n + 2;
  }
}

}  // namespace

std::string repo_path(const std::string& rel) { return std::string(PKV_SOURCE_DIR) + "/" + rel; }

std::string data_uri(const std::string& path, const std::string& mime) {
  std::ifstream f(path, std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  return "data:" + mime + ";base64," +
         serve::base64_encode(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size());
}

HttpReply http_request(int port, const std::string& method, const std::string& path, const std::string& body,
                       const std::vector<std::string>& headers, double timeout_s) {
  HttpReply r;
  const int fd = connect_loopback(port, timeout_s);
  if (fd < 0) {
    r.error = std::string("cannot connect: ") + std::strerror(errno);
    return r;
  }
  // A server may answer before it has read everything (or stop reading): read the reply anyway.
  if (!send_all(fd, request_text(method, path, body, headers)))
    r.error = std::string("send: ") + std::strerror(errno) + "; ";
  std::string raw;
  char buf[65536];
  const auto deadline = Clock::now() + std::chrono::duration<double>(timeout_s);
  for (;;) {
    const ssize_t n = ::recv(fd, buf, sizeof buf, 0);
    if (n > 0) {
      raw.append(buf, size_t(n));
    } else if (n == 0 || (errno != EINTR && errno != EAGAIN) || Clock::now() > deadline) {
      if (n < 0) r.error += std::string("recv: ") + std::strerror(errno) + "; ";
      break;
    }
  }
  ::close(fd);
  r.error += "got " + std::to_string(raw.size()) + " bytes: " + raw.substr(0, 200);
  const size_t head_end = raw.find("\r\n\r\n");
  if (head_end == std::string::npos || raw.compare(0, 9, "HTTP/1.1 ") != 0) return r;
  std::istringstream head(raw.substr(0, head_end));
  std::string line;
  std::getline(head, line);
  const int status = std::atoi(line.c_str() + 9);
  while (std::getline(head, line)) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    const size_t colon = line.find(':');
    if (colon == std::string::npos) continue;
    size_t v = colon + 1;
    while (v < line.size() && line[v] == ' ') ++v;
    r.headers[lower(line.substr(0, colon))] = line.substr(v);
  }
  const std::string payload = raw.substr(head_end + 4);
  if (lower(r.headers["transfer-encoding"]) == "chunked") {
    if (!unchunk(payload, &r.body)) return HttpReply{0, {}, {}, r.error + " (chunked body incomplete)"};
  } else {
    if (r.headers.count("content-length") && payload.size() < std::stoul(r.headers["content-length"]))
      return HttpReply{0, {}, {}, r.error + " (body shorter than its Content-Length)"};
    r.body = payload;
  }
  r.status = status;
  r.error.clear();
  return r;
}

int http_open_post(int port, const std::string& path, const std::string& body,
                   const std::vector<std::string>& headers) {
  const int fd = connect_loopback(port, 60);
  if (fd < 0) return -1;
  if (!send_all(fd, request_text("POST", path, body, headers))) {
    ::close(fd);
    return -1;
  }
  return fd;
}

bool read_until(int fd, const std::string& needle, std::string* got, double timeout_s) {
  const auto deadline = Clock::now() + std::chrono::duration<double>(timeout_s);
  char buf[4096];
  while (got->find(needle) == std::string::npos) {
    if (Clock::now() > deadline) return false;
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, 100) <= 0) continue;
    const ssize_t n = ::recv(fd, buf, sizeof buf, 0);
    if (n <= 0) return got->find(needle) != std::string::npos;
    got->append(buf, size_t(n));
  }
  return true;
}

ServerProcess::ServerProcess(const std::string& args) {
  log_path_ = temp_path("server_" + std::to_string(reinterpret_cast<uintptr_t>(this)) + ".log");
  const std::string cmd = "exec " + std::string(PKV_BINARY) + " serve --port 0 " + args;
  const int log_fd = ::open(log_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (log_fd < 0) {
    ADD_FAILURE() << "cannot create " << log_path_;
    return;
  }
  pid_ = ::fork();
  if (pid_ == 0) {  // only async-signal-safe calls until exec
    ::dup2(log_fd, 1);
    ::dup2(log_fd, 2);
    ::execl("/bin/sh", "sh", "-c", cmd.c_str(), static_cast<char*>(nullptr));
    ::_exit(127);
  }
  ::close(log_fd);
  if (pid_ < 0) {
    ADD_FAILURE() << "fork failed";
    return;
  }
  const std::regex listening(R"(listening on http://127\.0\.0\.1:(\d+))");
  const auto deadline = Clock::now() + std::chrono::seconds(60);
  while (Clock::now() < deadline) {
    std::smatch m;
    const std::string text = log();
    if (std::regex_search(text, m, listening)) {
      const int port = std::stoi(m[1]);
      if (http_request(port, "GET", "/health", "", {}, 10).status == 200) {
        port_ = port;
        return;
      }
    }
    int st = 0;
    if (::waitpid(pid_, &st, WNOHANG) == pid_) {
      pid_ = -1;
      ADD_FAILURE() << "prefixkv serve ended at start:\n" << text;
      return;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  ADD_FAILURE() << "prefixkv serve did not start within 60 s:\n" << log();
}

ServerProcess::~ServerProcess() {
  if (pid_ > 0) stop();
}

int ServerProcess::stop(double timeout_s) {
  if (pid_ <= 0) return -1;
  ::kill(pid_, SIGTERM);
  const auto deadline = Clock::now() + std::chrono::duration<double>(timeout_s);
  int st = 0;
  for (;;) {
    if (::waitpid(pid_, &st, WNOHANG) == pid_) break;
    if (Clock::now() > deadline) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, &st, 0);
      pid_ = -1;
      return -1;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  pid_ = -1;
  return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

std::string ServerProcess::log() const {
  std::ifstream f(log_path_);
  return std::string((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

size_t ServerProcess::rss_bytes() const {
  std::ifstream f("/proc/" + std::to_string(pid_) + "/status");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("VmRSS:", 0) == 0) return size_t(std::stoull(line.substr(6))) * 1024;  // "VmRSS:   1234 kB"
  return 0;
}

double ServerProcess::metric(const std::string& name) const {
  const HttpReply r = http_request(port_, "GET", "/metrics", "", metric_headers, 30);
  std::istringstream in(r.body);
  std::string line;
  while (std::getline(in, line))
    if (line.rfind(name + " ", 0) == 0) return std::stod(line.substr(name.size() + 1));
  return -1;
}

}  // namespace pkv::test
