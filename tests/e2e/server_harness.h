// For the server tests: starts `prefixkv serve` on a free loopback port and stops it, and a small
// blocking HTTP/1.1 client over plain sockets (so a test can also send what no library would:
// broken requests, and connections dropped halfway).
#pragma once
#include <sys/types.h>

#include <map>
#include <string>
#include <vector>

namespace pkv::test {

struct HttpReply {
  int status = 0;                              // 0: no complete response (connection refused, reset, or timed out)
  std::map<std::string, std::string> headers;  // names in lower case
  std::string body;                            // chunked transfer decoded
  std::string error;                           // why status is 0
};

// One request on a new connection (Connection: close); waits for the whole response.
HttpReply http_request(int port, const std::string& method, const std::string& path, const std::string& body = "",
                       const std::vector<std::string>& headers = {}, double timeout_s = 120);
// Opens a connection and sends a POST; the caller reads what it wants and closes the socket.
int http_open_post(int port, const std::string& path, const std::string& body,
                   const std::vector<std::string>& headers = {});
// Reads from a socket until `needle` has arrived (true) or the connection ends / times out.
bool read_until(int fd, const std::string& needle, std::string* got, double timeout_s = 60);

// "data:image/png;base64,..." of a file.
std::string data_uri(const std::string& path, const std::string& mime = "image/png");
std::string repo_path(const std::string& rel);  // the repository's own files (models/, data/)

class ServerProcess {
 public:
  // Runs `prefixkv serve --port 0 ARGS` (ARGS as a shell would split them), waits until it prints
  // the port it listens on and answers /health. Fails the test (fatal) when it does not.
  explicit ServerProcess(const std::string& args);
  ~ServerProcess();  // stop(), then SIGKILL if it would not end
  ServerProcess(const ServerProcess&) = delete;
  ServerProcess& operator=(const ServerProcess&) = delete;

  bool started() const { return port_ > 0; }
  int port() const { return port_; }
  pid_t pid() const { return pid_; }
  // SIGTERM, then waits (at most timeout_s); the exit status, or -1 when it had to be killed.
  int stop(double timeout_s = 20);
  std::string log() const;
  size_t rss_bytes() const;  // VmRSS from /proc/PID/status
  // One sample of the Prometheus text, e.g. metric("prefixkv_requests_running"); -1 if absent.
  double metric(const std::string& name_and_labels) const;
  std::vector<std::string> metric_headers;  // e.g. the Authorization header when --api-key is on

 private:
  pid_t pid_ = -1;
  int port_ = 0;
  std::string log_path_;
};

}  // namespace pkv::test
