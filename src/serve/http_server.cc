#include "serve/http_server.h"

#include <httplib.h>
#include <sys/socket.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <list>
#include <mutex>
#include <system_error>
#include <thread>
#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include "core/error.h"
#include "serve/sse.h"

using nlohmann::json;

namespace pkv::serve {

namespace {

constexpr auto kPoll = std::chrono::milliseconds(100);  // how often a waiting response checks its client

void send_json(httplib::Response& res, int status, const json& body) {
  res.status = status;
  res.set_content(dump_json(body), "application/json");
}

// A 429 or 503 always says when to try again (RFC 9110 Retry-After; the OpenAI clients honour it).
void send_error(httplib::Response& res, const ApiError& e) {
  int retry = e.retry_after();
  if (retry <= 0 && (e.status() == 429 || e.status() == 503)) retry = 1;
  if (retry > 0) res.set_header("Retry-After", std::to_string(retry));
  send_json(res, e.status(), e.body());
}

// Compares without an early exit, so the time taken does not tell how much of the key was right.
bool same_secret(const std::string& a, const std::string& b) {
  unsigned char diff = a.size() == b.size() ? 0 : 1;
  for (size_t i = 0; i < a.size(); ++i) diff |= static_cast<unsigned char>(a[i] ^ b[i % (b.empty() ? 1 : b.size())]);
  return diff == 0 && !b.empty();
}

// Connection threads that end when there is no connection left to serve, instead of httplib's pool
// of threads that live as long as the server. A thread's allocator cache (glibc's tcache: up to 7
// freed blocks of each small size, per thread) goes back to the heap only when the thread ends, and
// with a hundred long-lived threads those caches kept the idle server's resident memory creeping up
// under load (+0.4 MiB per 1000 requests, +16% over 10^4 in scripts/soak_server.py; flat with the
// caches off). At most `max` threads run at once; a connection that finds them all busy waits in
// the queue, as with the pool. When the last one ends, the freed memory is given back to the system.
class ConnectionThreads : public httplib::TaskQueue {
 public:
  explicit ConnectionThreads(size_t max) : max_(std::max<size_t>(max, 1)) {}
  ~ConnectionThreads() override { shutdown(); }

  void enqueue(std::function<void()> fn) override {
    std::function<void()> inline_job;
    {
      std::lock_guard lk(mu_);
      jobs_.push_back(std::move(fn));
      reap();
      if (running_ < max_) {
        workers_.emplace_back();
        Worker& w = workers_.back();
        try {
          w.thread = std::thread([this, &w] { work(w); });
          ++running_;
        } catch (const std::system_error&) {
          // No thread to be had now (a process or memory limit): a running one takes the connection
          // later; with none running, it is served here, on the accepting thread.
          workers_.pop_back();
          if (running_ == 0) {
            inline_job = std::move(jobs_.back());
            jobs_.pop_back();
          }
        }
      }
    }
    if (inline_job) inline_job();
  }

  void shutdown() override {
    std::list<Worker> all;
    {
      std::unique_lock lk(mu_);
      cv_.wait(lk, [&] { return running_ == 0; });  // the queued connections are served first
      all.swap(workers_);
    }
    for (Worker& w : all) w.thread.join();
  }

 private:
  struct Worker {
    std::thread thread;
    bool done = false;
  };

  void work(Worker& me) {
    bool last = false;
    std::list<Worker> ended;  // threads that ended before this one: joined here, not left mapped
    for (;;) {
      std::function<void()> fn;
      {
        std::lock_guard lk(mu_);
        if (jobs_.empty()) {
          for (auto it = workers_.begin(); it != workers_.end();) {
            auto next = std::next(it);
            if (it->done) ended.splice(ended.end(), workers_, it);
            it = next;
          }
          me.done = true;  // joined by the next thread to end, enqueue() or shutdown()
          last = --running_ == 0;
          if (last) cv_.notify_all();
          break;
        }
        fn = std::move(jobs_.front());
        jobs_.pop_front();
      }
      fn();
    }
    // Past here nothing of this object is touched (shutdown() may be joining this thread).
    for (Worker& w : ended) w.thread.join();
    ended.clear();
#if defined(__GLIBC__)
    if (last) malloc_trim(0);
#endif
  }

  // Joins the threads that have ended (each is past its last use of the lock, so this is quick).
  void reap() {
    for (auto it = workers_.begin(); it != workers_.end();) {
      if (it->done) {
        it->thread.join();
        it = workers_.erase(it);
      } else {
        ++it;
      }
    }
  }

  const size_t max_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> jobs_;
  std::list<Worker> workers_;
  size_t running_ = 0;
};

std::string route_label(const std::string& path) {
  for (const char* r : {"/v1/chat/completions", "/v1/models", "/health", "/metrics"})
    if (path == r) return r;
  if (path.rfind("/v1/models/", 0) == 0) return "/v1/models/{id}";
  return "other";
}

}  // namespace

struct HttpServer::Impl {
  ChatService& service;
  HttpOptions opt;
  httplib::Server svr;
  HttpCounters counters;
  std::atomic<int> active_streams{0};
  std::atomic<bool> accept_stopped{false};
  int listen_fd = -1;

  Impl(ChatService& s, HttpOptions o) : service(s), opt(std::move(o)) {}

  // Bearer authentication; /health stays open (load balancers and the tests' readiness check).
  bool authorized(const httplib::Request& req, httplib::Response& res) {
    if (opt.api_key.empty()) return true;
    const std::string h = req.get_header_value("Authorization");
    const std::string prefix = "Bearer ";
    if (h.rfind(prefix, 0) == 0 && same_secret(h.substr(prefix.size()), opt.api_key)) return true;
    send_error(res, ApiError(401,
                             h.empty() ? "no API key given: send the header 'Authorization: Bearer KEY'"
                                       : "incorrect API key provided",
                             "invalid_api_key"));
    return false;
  }

  void chat(const httplib::Request& req, httplib::Response& res, const httplib::ContentReader& reader) {
    // Read the body before anything else, so that an error answer never leaves unread bytes that
    // the connection would take for the next request.
    std::string body;
    bool too_large = false;
    const bool read = reader([&](const char* data, size_t n) {
      if (body.size() + n > opt.max_body_bytes) {
        too_large = true;
        return false;
      }
      body.append(data, n);
      return true;
    });
    if (too_large || res.status == 413) {
      res.set_header("Connection", "close");  // what was not read must not pass for the next request
      return send_error(res, ApiError(413,
                                      "the request body is larger than the server's limit of " +
                                          std::to_string(opt.max_body_bytes >> 20) + " MiB (--max-body-mb)",
                                      "request_too_large"));
    }
    if (!read) return send_error(res, ApiError(400, "the request body could not be read", "invalid_body"));
    if (!authorized(req, res)) return;
    Submitted sub;
    try {
      sub = service.submit(body);
    } catch (const ApiError& e) {
      return send_error(res, e);
    }
    auto st = std::make_shared<Submitted>(std::move(sub));
    ++active_streams;
    // Both kinds of answer go out as chunked responses: the provider runs while the request is
    // queued and generated, and a write or a liveness check that fails (the client went away)
    // cancels the job and frees its slot. The releaser runs however the response ends.
    auto release = [this, st](bool) {
      st->job->cancel();
      --active_streams;
    };
    if (st->stream) {
      res.set_header("Cache-Control", "no-cache");
      auto sent_role = std::make_shared<bool>(false);
      res.set_chunked_content_provider(
          "text/event-stream",
          [this, st, sent_role](size_t, httplib::DataSink& sink) {
            auto write = [&](const std::string& s) {
              if (sink.write(s.data(), s.size())) return true;
              st->job->cancel();
              return false;
            };
            if (!*sent_role) {
              *sent_role = true;
              return write(sse_event(dump_json(service.chunk_body(*st, {{"role", "assistant"}, {"content", ""}}, ""))));
            }
            std::optional<Event> ev = st->job->next_event(kPoll);
            if (!ev) {
              if (sink.is_writable()) return true;
              st->job->cancel();
              return false;
            }
            switch (ev->kind) {
              case Event::Kind::Text:
                return write(sse_event(dump_json(service.chunk_body(*st, {{"content", ev->text}}, ""))));
              case Event::Kind::Done: {
                const Completion& c = ev->completion;
                bool ok =
                    write(sse_event(dump_json(service.chunk_body(*st, json::object(), finish_reason(c.stop_reason)))));
                if (ok && st->include_usage) ok = write(sse_event(dump_json(service.usage_chunk_body(*st, c))));
                if (ok) ok = write(sse_done());
                if (ok) sink.done();
                return ok;
              }
              case Event::Kind::Error:
                // The status line went out long ago: OpenAI's streams report late errors as an event.
                if (write(sse_event(dump_json(ev->error->body())))) sink.done();
                return true;
            }
            return false;
          },
          release);
    } else {
      res.set_chunked_content_provider(
          "application/json",
          [this, st](size_t, httplib::DataSink& sink) {
            std::optional<Event> ev = st->job->next_event(kPoll);
            // Text pieces are not sent (the whole text comes with Done), so nothing written would
            // fail when the client goes: look at the connection at each one instead.
            if (!ev || ev->kind == Event::Kind::Text) {
              if (sink.is_writable()) return true;
              st->job->cancel();
              return false;
            }
            if (ev->kind == Event::Kind::Error) return false;  // after the 200: end the connection early
            const std::string out = dump_json(service.completion_body(*st, ev->completion));
            if (!sink.write(out.data(), out.size())) return false;
            sink.done();
            return true;
          },
          release);
    }
  }

  void routes() {
    svr.Get("/health", [this](const httplib::Request&, httplib::Response& res) {
      send_json(res, 200, {{"status", "ok"}, {"model", service.options().model_id}});
    });
    svr.Get("/v1/models", [this](const httplib::Request& req, httplib::Response& res) {
      if (authorized(req, res)) send_json(res, 200, service.models());
    });
    svr.Get(R"(/v1/models/(.+))", [this](const httplib::Request& req, httplib::Response& res) {
      if (!authorized(req, res)) return;
      try {
        send_json(res, 200, service.model(req.matches[1]));
      } catch (const ApiError& e) {
        send_error(res, e);
      }
    });
    svr.Get("/metrics", [this](const httplib::Request& req, httplib::Response& res) {
      if (!authorized(req, res)) return;
      res.set_content(prometheus_text(service.scheduler().stats(), counters.snapshot(), resident_memory_bytes()),
                      "text/plain; version=0.0.4; charset=utf-8");
    });
    svr.Post("/v1/chat/completions", [this](const httplib::Request& req, httplib::Response& res,
                                            const httplib::ContentReader& reader) { chat(req, res, reader); });
    svr.Get("/v1/chat/completions", [](const httplib::Request&, httplib::Response& res) {
      send_error(res, ApiError(405, "use POST for /v1/chat/completions", "method_not_allowed"));
    });

    // Errors that httplib answers itself (no route, oversized body, a malformed request) get the
    // same JSON shape as ours.
    httplib::Server::HandlerWithResponse on_error = [](const httplib::Request& req, httplib::Response& res) {
      if (!res.body.empty()) return httplib::Server::HandlerResponse::Unhandled;
      std::string message = "HTTP error " + std::to_string(res.status), code;
      if (res.status == 404) {
        message = "no such endpoint: " + req.method + " " + req.path;
        code = "not_found";
      } else if (res.status == 413) {
        message = "the request is too large";
        code = "request_too_large";
      } else if (res.status == 400) {
        message = "malformed HTTP request";
        code = "invalid_request";
      }
      send_error(res, ApiError(res.status, message, code));
      return httplib::Server::HandlerResponse::Handled;
    };
    svr.set_error_handler(on_error);
    svr.set_exception_handler([](const httplib::Request&, httplib::Response& res, std::exception_ptr ep) {
      std::string what = "unknown error";
      try {
        std::rethrow_exception(ep);
      } catch (const std::exception& e) {
        what = e.what();
      } catch (...) {
      }
      send_error(res, ApiError(500, "internal error: " + what, "internal_error"));
    });
    svr.set_logger([this](const httplib::Request& req, const httplib::Response& res) {
      counters.count(route_label(req.path), res.status);
    });
  }
};

HttpServer::HttpServer(ChatService& service, HttpOptions opt) : impl_(std::make_unique<Impl>(service, std::move(opt))) {
  Impl& m = *impl_;
  const SchedulerOptions& so = service.scheduler().options();
  // A connection holds a thread while its request waits in the scheduler's queue: enough threads
  // for a full batch, a full queue, and the requests that are answered at once (errors, metrics).
  const int threads = m.opt.threads > 0 ? m.opt.threads : so.max_running + so.max_queue + 16;
  m.svr.new_task_queue = [threads] { return new ConnectionThreads(size_t(threads)); };
  m.svr.set_payload_max_length(m.opt.max_body_bytes);
  m.svr.set_keep_alive_timeout(m.opt.keep_alive_seconds);
  m.svr.set_tcp_nodelay(true);
  // httplib's own options set SO_REUSEPORT, which lets a second server bind the same port and
  // silently share its connections: only SO_REUSEADDR here (a restart need not wait for TIME_WAIT).
  // The descriptor is kept to widen the listen backlog after bind (below).
  m.svr.set_socket_options([&m](int fd) {
    int yes = 1;
    ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof yes);
    m.listen_fd = fd;
  });
  m.routes();
}

HttpServer::~HttpServer() = default;

int HttpServer::bind() {
  Impl& m = *impl_;
  int port = m.opt.port;
  if (port == 0)
    port = m.svr.bind_to_any_port(m.opt.host);
  else if (!m.svr.bind_to_port(m.opt.host, port))
    port = -1;
  if (port <= 0)
    fail("--host " + m.opt.host + " --port " + std::to_string(m.opt.port),
         "cannot listen there (address in use, or not an address of this machine?)");
  // The library listens with a backlog of 5: a burst of clients connecting at once overflows it,
  // and the kernel then resets some of their connections. Listening again only resizes the queue.
  if (m.listen_fd >= 0) ::listen(m.listen_fd, SOMAXCONN);
  return port;
}

void HttpServer::serve() { impl_->svr.listen_after_bind(); }

void HttpServer::stop_accepting() {
  // Not httplib's stop(): from the moment its listening socket is marked closed it ends every chunked
  // response being written (no further chunk, no terminating one), which would cut the streams that
  // a drain means to finish. Shutting the socket down makes accept() fail (EINVAL), and the library
  // then leaves its accept loop, closes the socket and waits for its connection threads; connections
  // not yet accepted are reset, new ones refused.
  Impl& m = *impl_;
  if (m.listen_fd >= 0 && !m.accept_stopped.exchange(true)) ::shutdown(m.listen_fd, SHUT_RDWR);
}

void HttpServer::stop() {
  // Let the responses that are ending (the scheduler has just sent them their last event) finish
  // writing before the connections close.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(2);
  while (impl_->active_streams > 0 && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  // After stop_accepting() the library has closed the socket itself (its number may be another
  // file's by now): its stop() must not close it again.
  if (!impl_->accept_stopped) impl_->svr.stop();
}

}  // namespace pkv::serve
