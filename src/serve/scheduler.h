// Continuous batching: one scheduler thread owns every running sequence. Each iteration it admits
// the next queued request whose KV reservation fits the pool (and prefills it), then advances every
// running sequence by one token with one Session::step_many call, so requests join and leave the
// batch at token boundaries. Handlers talk to it through a Job: inputs before submit(), then a
// thread-safe stream of events (text pieces, then Done or Error); cancel() frees the slot at the
// next token boundary.
#pragma once
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "engine/backend.h"
#include "engine/engine.h"
#include "serve/api.h"

namespace pkv::serve {

// A request's KV memory. The cache is float32 on the CPU back end: an entry is 2 (K, V) x kv_heads x
// head_dim x 4 bytes per layer.
struct KvReservation {
  size_t final_bytes = 0;    // the cache at its largest once compressed (the end of generation)
  size_t prefill_bytes = 0;  // the whole prompt, held during the prefill before the policy compresses
  size_t peak() const { return std::max(final_bytes, prefill_bytes); }
};
// keep_fraction 1 is the full cache: every layer keeps prompt + max_tokens entries. Below 1 the
// proportional decode rule keeps about keep_fraction x (prompt + generated) entries per layer on
// average (METHOD.md section 4), plus the protected tokens and rounding.
// entry_bytes: one entry of one layer (K and V) in the back end's cache (0: float32, the CPU's);
// block: entries are held in blocks of this many per layer (the GPU pool's), so each layer rounds up.
KvReservation kv_reservation(const TextConfig& t, int prompt_tokens, int max_tokens, double keep_fraction,
                             int protected_count, size_t entry_bytes = 0, int block = 1);


struct Completion {
  std::string text;
  std::string stop_reason;  // eos | stop | length | context
  int prompt_tokens = 0, completion_tokens = 0;
  size_t kv_bytes = 0;       // what this request's cache held at the end
  size_t kv_bytes_full = 0;  // what the uncompressed cache would hold for the same tokens
  std::vector<int> kv_entries_per_layer;
  double queue_ms = 0, prefill_ms = 0, decode_ms = 0;
};

struct Event {
  enum class Kind { Text, Done, Error };
  Kind kind = Kind::Text;
  std::string text;               // Text: the next piece of the answer
  Completion completion;          // Done
  std::optional<ApiError> error;  // Error
};

class Job {
 public:
  // Inputs, set before Scheduler::submit and not touched by the handler afterwards.
  PromptRequest prompt;  // prompt.image points at `image` when there is one
  Image image;
  SamplingOptions sampling;
  std::unique_ptr<KVPolicy> policy;
  int prompt_tokens = 0;
  KvReservation kv;

  // The client went away (or the handler gave up): the scheduler drops the job at its next
  // iteration and releases its reservation.
  void cancel() { cancelled_ = true; }
  bool cancelled() const { return cancelled_; }
  // The next event, waiting at most `timeout`; nullopt when none came.
  std::optional<Event> next_event(std::chrono::milliseconds timeout);
  void push(Event e);

 private:
  friend class Scheduler;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Event> events_;
  std::atomic<bool> cancelled_{false};
  std::chrono::steady_clock::time_point submitted_;
};

// What the scheduler thread did, for tests and debugging (SchedulerOptions::trace): a prefill pass
// (the jobs whose prompts it ran, with the tokens of each) or a decode step (the jobs in the batch).
struct SchedulerTrace {
  enum class Kind { Prefill, Step };
  Kind kind = Kind::Step;
  std::vector<const Job*> jobs;
  std::vector<int> tokens;  // Prefill: the prompt tokens each job ran in this pass
};

struct SchedulerOptions {
  // Where the running sequences live (engine/backend.h: the CPU's Sessions, or GPU sessions over one
  // paged pool); used by the scheduler thread only. null: the CPU.
  std::shared_ptr<Backend> backend;
  size_t kv_pool_bytes = size_t(512) << 20;
  int max_running = 16;
  int max_queue = 64;
  int retry_after_seconds = 1;  // the Retry-After of the 503 that a full queue answers
  // Chunked prefill (back ends with Backend::chunked_prefill(): the GPU): the most prompt tokens one
  // scheduler iteration prefills, over all the prompts waiting, in one pass (Backend::prefill_pieces:
  // a long prompt goes in pieces of this size, short ones together); the running sequences take a
  // decode step between passes, so a long prompt delays each of their tokens by at most one pass.
  // 512: on a GPU a pass of 512 rows keeps the products near the tensor cores' rate (their tiles
  // are 64-256 rows wide) while costing a 7B model about half of a 1,024-token prefill (about 16 ms
  // on an H200), i.e. a few decode steps' time; each later piece re-reads the keys of the earlier
  // ones, which at 512 is a small share of its attention. 0: every waiting prompt whole in one pass.
  // Back ends without it (the CPU) prefill one whole prompt per iteration.
  int prefill_chunk = 512;
  // Optional: called on the scheduler thread after each prefill pass and each decode step.
  std::function<void(const SchedulerTrace&)> trace;
};

struct SchedulerStats {
  int running = 0, queued = 0;
  size_t kv_pool_bytes = 0, kv_reserved_bytes = 0, kv_used_bytes = 0;
  uint64_t prompt_tokens_total = 0, generated_tokens_total = 0;
  uint64_t finished_total = 0, cancelled_total = 0, failed_total = 0;
  uint64_t prefill_passes_total = 0, decode_steps_total = 0;  // a prefill pass may run several prompts' pieces
  double tokens_per_second = 0;  // generated tokens in the last 10 seconds / 10
};

class Scheduler {
 public:
  Scheduler(const Model& model, const Tokenizer& tok, SchedulerOptions opt);
  ~Scheduler();
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  void start();
  // Queues a job. Throws ApiError: 400 when its reservation is larger than the whole pool, 503 with
  // a Retry-After when the queue is full, 503 when the scheduler is draining or stopping.
  void submit(std::shared_ptr<Job> job);
  // Stops admission (submit() answers 503 server_shutting_down from now on) and lets the queued and
  // running jobs go on; true once none is left, false when `timeout` came first.
  bool drain(std::chrono::milliseconds timeout);
  // Ends every queued and running job with a 503 error and joins the thread.
  void shutdown();

  SchedulerStats stats() const;
  const SchedulerOptions& options() const { return opt_; }
  Backend& backend() const { return *opt_.backend; }

 private:
  struct Running;
  void run();
  bool admit(const std::shared_ptr<Job>& job, std::vector<Running>& running);
  // Chunked prefill: admit() takes the prompt without running it (Backend::begin_prefill);
  // prefill_pass() runs up to prefill_chunk tokens of the waiting prompts in one pass.
  void prefill_pass(std::vector<Running>& running);
  void prefill_failed(Running& r, const std::exception& e, int running_count);
  void advance(std::vector<Running>& running);
  void release(const Running& r);
  void fail_all(std::vector<Running>& running, const ApiError& e);

  const Model& model_;
  const Tokenizer& tok_;
  Engine engine_;
  SchedulerOptions opt_;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<Job>> queue_;
  bool stopping_ = false;
  bool draining_ = false;
  size_t reserved_ = 0;
  int running_count_ = 0;
  SchedulerStats counters_;
  std::deque<std::pair<std::chrono::steady_clock::time_point, int>> recent_tokens_;
  std::atomic<size_t> kv_used_{0};
  std::thread thread_;
};

}  // namespace pkv::serve
