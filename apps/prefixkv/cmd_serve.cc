// prefixkv serve: an OpenAI-compatible HTTP server (chat completions with images, streaming,
// continuous batching, per-request KV policies). docs/SERVER.md describes the API.
#include <poll.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <thread>
#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include "args.h"
#include "common.h"
#include "core/error.h"
#include "core/threads.h"
#include "engine/make_backend.h"
#include "kv_options.h"

#ifdef PKV_HAVE_HTTPLIB
#include "serve/http_server.h"
#include "serve/scheduler.h"
#include "serve/service.h"
#endif

namespace fs = std::filesystem;

namespace pkv::cli {

namespace {

const std::vector<OptionSpec> kServeOptions = with_options(
    {
        {"model", "DIR", "checkpoint directory (default: the bundled model, models/prefixkv-llava-tiny)"},
        no_mmap_option(),
        {"vision-tower", "DIR", "separate CLIP checkpoint (original LLaVA layout without the tower inside)"},
        {"mmproj", "FILE", "llama.cpp's LLaVA vision file (GGUF) beside a GGUF language model (--model FILE.gguf)"},
        {"model-id", "NAME", "the model's name in the API (default: the model folder's name)"},
        {"host", "ADDR", "address to listen on (default 127.0.0.1: this machine only)"},
        {"port", "N", "port to listen on (default 8080; 0: any free port, printed at start)"},
        {"api-key", "KEY",
         "require 'Authorization: Bearer KEY' on every endpoint but /health (default: $PREFIXKV_API_KEY, else none)"},
        {"media-dir", "DIR", "allow image_url paths to local files inside DIR (default: none, data: URIs only)"},
        {"kv-memory", "MB", "KV-cache pool that admission reserves from, in MiB (default 512; cuda: 90% of the free GPU memory)"},
        {"device", "NAME", "cpu (default) or cuda: the requests' sequences, vision tower and decoder on the GPU"},
        {"gpu-dtype", "TYPE", "cuda: bf16 or f16 (default: the checkpoint's 16-bit type, else bf16)"},
        {"max-running", "N", "requests decoded together at most (default 16)"},
        {"max-queue", "N", "requests waiting at most; more get 503 (default 64)"},
        {"prefill-chunk", "N",
         "cuda: prompt tokens prefilled per scheduler pass, over the prompts waiting, between decode steps (default "
         "512; 0: whole prompts)"},
        {"max-body-mb", "MB", "largest request body in MiB; larger get 413 (default 20)"},
        {"max-image-pixels", "N", "largest image, width x height (default 16777216)"},
        {"default-max-tokens", "N", "max_tokens of a request that gives none (default 256, capped by the context)"},
        {"http-threads", "N", "connection threads (default: max-running + max-queue + 16)"},
        {"shutdown-grace", "SECONDS",
         "on SIGTERM, how long the requests in flight may take to finish (default 30; a second signal stops at once)"},
        {"threads", "N", "compute threads (default: all cores)"},
    },
    kv_option_specs({"kv-policy", "kv-budget", "kv-budget-tokens", "kv-importance", "kv-window", "kv-protected",
                     "kv-prefix-pool", "kv-decode", "kv-profile", "kv-dtype"}));

#ifdef PKV_HAVE_HTTPLIB
int g_stop_pipe[2] = {-1, -1};

void on_stop_signal(int sig) {
  const char c = char(sig);
  const ssize_t n = ::write(g_stop_pipe[1], &c, 1);  // async-signal-safe; the thread does the rest
  (void)n;
}

int positive(const Args& args, const std::string& name, int def, int max) {
  const int v = args.integer(name, def);
  if (v < 1 || v > max) fail("--" + name, "must be between 1 and " + std::to_string(max));
  return v;
}
#endif

}  // namespace

int cmd_serve(int argc, char** argv) {
  Args args("serve", kServeOptions, argc, argv, 2);
  if (args.help()) {
    std::cout << Args::usage(
        "serve",
        "Serves the model over HTTP with OpenAI's chat-completions API (docs/SERVER.md): images, "
        "streaming,\ncontinuous batching, and KV-cache policies per request (--kv-* options: the default "
        "policy). SIGTERM\nor Ctrl-C stops it.",
        kServeOptions);
    return 0;
  }
#ifndef PKV_HAVE_HTTPLIB
  fail("serve",
       "this prefixkv was built without cpp-httplib, so it has no server; install libcpp-httplib-dev "
       "(scripts/setup.sh does) and build again");
#else
  using namespace pkv::serve;
  // SIGTERM and SIGINT reach a handler that only writes to a pipe; a thread reading the pipe does
  // the shutdown (masks cannot route them: OpenBLAS's threads exist before this function runs).
  if (::pipe(g_stop_pipe) != 0) fail("serve", "cannot create a pipe");
  struct sigaction sa = {};
  sa.sa_handler = on_stop_signal;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGTERM, &sa, nullptr);
  sigaction(SIGINT, &sa, nullptr);
  std::signal(SIGPIPE, SIG_IGN);  // a client that hangs up must not end the server
#if defined(__GLIBC__)
  // A fixed threshold (which also stops glibc from raising it as large blocks are freed) keeps the
  // KV caches in their own mappings, given back to the system when a request ends.
  mallopt(M_MMAP_THRESHOLD, 256 * 1024);
  // glibc gives each of the first 8 x cores threads that allocate an arena of its own, and memory
  // freed into one arena serves only the threads of that arena: after 6000 requests from 64 clients
  // the idle server held 46.3 MiB against 44.8 after its first request (16 arenas' fragments, flat
  // from round to round); with two arenas besides the main one, 44.5 against 44.3
  // (scripts/soak_server.py). The connection threads allocate little and briefly.
  mallopt(M_ARENA_MAX, 2);
#endif

  if (args.has("threads")) set_num_threads(positive(args, "threads", 1, 1024));
  HttpOptions http;
  http.host = args.str("host", "127.0.0.1");
  http.port = args.integer("port", 8080);
  if (http.port < 0 || http.port > 65535) fail("--port", "must be between 0 and 65535");
  http.api_key = args.str("api-key", std::getenv("PREFIXKV_API_KEY") ? std::getenv("PREFIXKV_API_KEY") : "");
  http.max_body_bytes = size_t(positive(args, "max-body-mb", 20, 4096)) << 20;
  if (args.has("http-threads")) http.threads = positive(args, "http-threads", 1, 4096);
  const double grace_s = args.number("shutdown-grace", 30);
  if (!(grace_s >= 0 && grace_s <= 86400)) fail("--shutdown-grace", "must be between 0 and 86400 seconds");
  const DeviceChoice dev = parse_device(args);
  SchedulerOptions so;
  so.kv_pool_bytes = size_t(positive(args, "kv-memory", 512, 1 << 20)) << 20;
  so.max_running = positive(args, "max-running", 16, 4096);
  so.max_queue = positive(args, "max-queue", 64, 1 << 20);
  so.prefill_chunk = args.integer("prefill-chunk", 512);
  if (so.prefill_chunk < 0) fail("--prefill-chunk", "must not be negative (0: whole prompts)");
  ServiceOptions svc;
  svc.default_max_tokens = positive(args, "default-max-tokens", 256, 1 << 30);
  svc.max_image_pixels = positive(args, "max-image-pixels", 1 << 24, 1 << 28);
  svc.parse.max_image_file_bytes = http.max_body_bytes;
  if (args.has("media-dir")) {
    svc.parse.media_dir = args.str("media-dir");
    if (!fs::is_directory(svc.parse.media_dir)) fail("--media-dir " + svc.parse.media_dir, "is not a folder");
  }
  svc.default_policy = args.str("kv-policy", "full");
  const PolicyOptions base = policy_options_from_args(args);
  svc.default_budget = base.budget;
  svc.default_budget_tokens = base.budget_tokens;
  svc.protected_count = base.protected_count;

  LoadedModel lm = load_model(args);
  const Model& model = *lm.model;
  svc.model_id = args.str("model-id", fs::path(lm.dir).lexically_normal().filename().string());
  if (svc.model_id.empty()) svc.model_id = fs::path(lm.dir).lexically_normal().parent_path().filename().string();
  PolicyFactory factory = [&args, &model, base](const std::string& name, std::optional<double> budget) {
    PolicyOptions o = base;
    if (budget) {
      o.budget = *budget;
      o.budget_tokens = 0;
    }
    return make_policy_for_model(name, o, args, model);
  };
  factory(svc.default_policy, std::nullopt);  // a bad default (e.g. prefixkv without a profile) fails now

  BackendOptions bo;
  bo.device = dev.device;
  bo.gpu_dtype = dev.gpu_dtype;
  bo.kv_dtype = dev.kv_dtype;
  bo.kv_pool_bytes = args.has("kv-memory") ? so.kv_pool_bytes : 0;  // cuda, 0: 90% of what is free after the weights
  so.backend = make_backend(model, bo);
  if (so.backend->kv_pool_bytes() > 0) so.kv_pool_bytes = so.backend->kv_pool_bytes();  // the device's fixed pool
  Scheduler scheduler(model, *lm.tok, so);
  ChatService service(model, *lm.tok, scheduler, svc, factory);
  HttpServer server(service, http);
  const int port = server.bind();
  scheduler.start();

  // The first SIGTERM or SIGINT drains: no new connection is accepted (and a request that still
  // arrives on an open one gets 503), the queued and running requests go on to their end, for at most
  // --shutdown-grace seconds; then (or at a second signal) what is left ends with a 503 error.
  std::atomic<bool> stopping{false}, served{false};
  std::thread signals([&] {
    auto read_signal = [] {
      char sig = 0;
      while (::read(g_stop_pipe[0], &sig, 1) < 0 && errno == EINTR) {
      }
      return sig;
    };
    const char sig = read_signal();
    if (stopping.exchange(true)) return;  // woken by the main thread: the server has already ended
    const char* name = sig == SIGINT ? "SIGINT" : "SIGTERM";
    const SchedulerStats st = scheduler.stats();
    std::fprintf(stderr,
                 "[prefixkv serve] %s: no new requests; finishing %d running and %d queued (at most %g s; another "
                 "signal stops now)\n",
                 name, st.running, st.queued, grace_s);
    server.stop_accepting();
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(grace_s);
    bool drained = false, again = false;
    for (;;) {
      if (scheduler.drain(std::chrono::milliseconds(50))) {
        drained = true;
        break;
      }
      if (std::chrono::steady_clock::now() >= deadline) break;
      pollfd p{g_stop_pipe[0], POLLIN, 0};
      if (::poll(&p, 1, 0) > 0) {
        again = read_signal() != 0;  // 0: the main thread (serve() ended)
        break;
      }
    }
    if (!drained)
      std::fprintf(stderr, "[prefixkv serve] %s: ending the requests left (%d running, %d queued)\n",
                   again ? "second signal" : "grace period over", scheduler.stats().running, scheduler.stats().queued);
    scheduler.shutdown();
    server.stop();
    // Connections that never end (a client sending a byte every few seconds) would keep serve() from
    // returning: past 10 s more the process ends without them.
    for (int i = 0; i < 200 && !served; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(50));
    if (!served) {
      std::fprintf(stderr, "[prefixkv serve] connections still open 10 s after the requests ended; exiting\n");
      std::fflush(stderr);
      std::_Exit(0);
    }
  });

  std::printf("prefixkv serve: model %s (%s) on %s | KV pool %zu MiB, default policy %s | %d running, %d queued at most%s\n",
              svc.model_id.c_str(), lm.dir.c_str(), scheduler.backend().name().c_str(), so.kv_pool_bytes >> 20,
              svc.default_policy.c_str(), so.max_running, so.max_queue, http.api_key.empty() ? "" : " | API key required");
  if (http.api_key.empty() && http.host != "127.0.0.1" && http.host != "localhost" && http.host != "::1")
    std::printf("prefixkv serve: warning: listening beyond this machine without --api-key\n");
  std::printf("listening on http://%s:%d\n", http.host.c_str(), port);
  std::fflush(stdout);
  server.serve();
  served = true;

  if (!stopping.exchange(true)) {  // wake the signal thread
    const char none = 0;
    if (::write(g_stop_pipe[1], &none, 1) < 0) std::perror("prefixkv serve: waking the signal thread");
  }
  signals.join();
  scheduler.shutdown();
  std::fprintf(stderr, "[prefixkv serve] stopped\n");
  return 0;
#endif
}

}  // namespace pkv::cli
