// The HTTP glue (cpp-httplib): routes, bearer authentication, body limits, streaming, and client
// disconnects. Everything else is in ChatService / Scheduler. httplib stays out of this header, so
// the program that includes it builds the same with or without the library.
#pragma once
#include <memory>
#include <string>

#include "serve/metrics.h"
#include "serve/service.h"

namespace pkv::serve {

struct HttpOptions {
  std::string host = "127.0.0.1";
  int port = 8080;      // 0: any free port (bind() says which)
  std::string api_key;  // "": no authentication
  size_t max_body_bytes = size_t(20) << 20;
  int threads = 0;  // connection threads; 0: max_running + max_queue + 16
  int keep_alive_seconds = 2;
};

class HttpServer {
 public:
  HttpServer(ChatService& service, HttpOptions opt);
  ~HttpServer();
  // Binds the listening socket and returns its port. Throws pkv::Error when it cannot.
  int bind();
  // Serves until stop(); returns once every connection thread has ended.
  void serve();
  // Refuses new connections (the listening socket is shut down) and lets the connections being
  // served go on: serve() returns once they have ended. For a drain; safe from any thread.
  void stop_accepting();
  // Stops serving: waits (at most 2 s) for the responses that are ending, then ends the rest. Safe
  // from any thread (the signal thread calls it).
  void stop();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace pkv::serve
