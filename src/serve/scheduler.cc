#include "serve/scheduler.h"

#include <climits>
#include <cmath>
#include <cstdio>
#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include "core/error.h"
#include "engine/decoding.h"

namespace pkv::serve {

using Clock = std::chrono::steady_clock;

namespace {

double ms_between(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

constexpr auto kRateWindow = std::chrono::seconds(10);

// A fixed KV pool (the GPU's, src/kv/block_pool.cc) that ran out: pkv::Error with the pool's own
// words. The reservations are meant to make it impossible; if one undercounts, the request that ran
// into it is told to retry instead of being failed as a bad request (prefill) or taking every
// running request down with it (step).
bool out_of_kv_blocks(const std::exception& e) {
  return dynamic_cast<const pkv::Error*>(&e) && std::string(e.what()).find("out of KV blocks") != std::string::npos;
}

ApiError kv_pool_ran_out(int running) {
  return ApiError(503,
                  "the KV pool ran out with " + std::to_string(running) +
                      " requests running; this one was stopped so that the others could go on; retry later",
                  "server_overloaded")
      .with_retry_after(1);
}

}  // namespace

KvReservation kv_reservation(const TextConfig& t, int prompt_tokens, int max_tokens, double keep_fraction,
                             int protected_count, size_t entry_bytes, int block) {
  const size_t entry = entry_bytes ? entry_bytes : size_t(2) * size_t(t.n_kv_heads) * size_t(t.head_dim) * sizeof(float);
  const size_t L = size_t(t.n_layers);
  const size_t total = size_t(prompt_tokens) + size_t(max_tokens);
  const size_t round = size_t(std::max(block, 1));
  size_t entries = L * ((total + round - 1) / round * round);
  if (keep_fraction < 1) {
    // Per layer round(k_l x T) with the k_l averaging keep_fraction, at least protected + 1; each
    // layer's last allocation unit may be partly empty.
    const size_t kept = size_t(std::ceil(keep_fraction * double(L * total))) + L * size_t(protected_count + 2) + L * (round - 1);
    entries = std::min(entries, kept);
  }
  KvReservation r;
  r.final_bytes = entries * entry;
  // Session::prefill reserves the prompt plus 64 entries in every layer before compressing (the GPU
  // session the prompt's blocks).
  r.prefill_bytes = L * ((size_t(prompt_tokens) + 64 + round - 1) / round * round) * entry;
  return r;
}

std::optional<Event> Job::next_event(std::chrono::milliseconds timeout) {
  std::unique_lock lk(mu_);
  if (!cv_.wait_for(lk, timeout, [&] { return !events_.empty(); })) return std::nullopt;
  Event e = std::move(events_.front());
  events_.pop_front();
  return e;
}

void Job::push(Event e) {
  {
    std::lock_guard lk(mu_);
    events_.push_back(std::move(e));
  }
  cv_.notify_all();
}

struct Scheduler::Running {
  std::shared_ptr<Job> job;
  std::unique_ptr<Backend::Sequence> session;
  std::unique_ptr<Decoding> decoding;
  std::vector<float> logits;  // [vocab]: the next position's
  Clock::time_point admitted, decode_start;
  double queue_ms = 0, prefill_ms = 0;
  int prompt_len = 0;
  bool prefilling = false;  // chunked prefill: its prompt is not all run yet (no decoding, no steps)
  bool remove = false;
};

Scheduler::Scheduler(const Model& model, const Tokenizer& tok, SchedulerOptions opt)
    : model_(model), tok_(tok), engine_(model, tok), opt_(opt) {
  if (!opt_.backend) opt_.backend = make_cpu_backend(model);
  counters_.kv_pool_bytes = opt_.kv_pool_bytes;
}

Scheduler::~Scheduler() { shutdown(); }

void Scheduler::start() {
  std::lock_guard lk(mu_);
  if (!thread_.joinable() && !stopping_) thread_ = std::thread([this] { run(); });
}

void Scheduler::submit(std::shared_ptr<Job> job) {
  if (job->kv.peak() > opt_.kv_pool_bytes)
    throw ApiError(400,
                   "the request needs " + std::to_string((job->kv.peak() + (1 << 20) - 1) >> 20) +
                       " MiB of KV cache (prompt of " + std::to_string(job->prompt_tokens) + " tokens + max_tokens " +
                       std::to_string(job->sampling.max_tokens) + "), more than the server's whole pool of " +
                       std::to_string(opt_.kv_pool_bytes >> 20) + " MiB (--kv-memory); lower max_tokens or kv_budget",
                   "kv_memory_exceeded");
  {
    std::lock_guard lk(mu_);
    if (stopping_ || draining_) throw ApiError(503, "the server is shutting down", "server_shutting_down");
    if (int(queue_.size()) >= opt_.max_queue)
      throw ApiError(503,
                     "the server is busy: " + std::to_string(running_count_) + " requests running and " +
                         std::to_string(queue_.size()) + " queued (--max-queue); retry later",
                     "server_overloaded")
          .with_retry_after(std::max(opt_.retry_after_seconds, 1));
    job->submitted_ = Clock::now();
    queue_.push_back(std::move(job));
  }
  cv_.notify_all();
}

bool Scheduler::drain(std::chrono::milliseconds timeout) {
  std::unique_lock lk(mu_);
  draining_ = true;
  // running_count_ counts a job from its admission (taken off the queue) to the end of the
  // iteration that finished it; the thread notifies cv_ when it goes idle.
  cv_.wait_for(lk, timeout, [&] { return stopping_ || (queue_.empty() && running_count_ == 0); });
  return queue_.empty() && running_count_ == 0;
}

void Scheduler::shutdown() {
  {
    std::lock_guard lk(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable() && thread_.get_id() != std::this_thread::get_id()) thread_.join();
  // Jobs submitted after the thread ended (or with no thread) still get their answer.
  std::lock_guard lk(mu_);
  for (auto& j : queue_)
    j->push(Event{Event::Kind::Error, {}, {}, ApiError(503, "the server is shutting down", "server_shutting_down")});
  queue_.clear();
}

SchedulerStats Scheduler::stats() const {
  std::lock_guard lk(mu_);
  SchedulerStats s = counters_;
  s.running = running_count_;
  s.queued = int(queue_.size());
  s.kv_reserved_bytes = reserved_;
  s.kv_used_bytes = kv_used_;
  const auto now = Clock::now();
  int tokens = 0;
  for (auto& [t, n] : recent_tokens_)
    if (now - t <= kRateWindow) tokens += n;
  s.tokens_per_second = tokens / std::chrono::duration<double>(kRateWindow).count();
  return s;
}

void Scheduler::release(const Running& r) {
  std::lock_guard lk(mu_);
  // A prompt still prefilling holds its whole reservation (the prefill's transient included).
  reserved_ -= r.prefilling ? r.job->kv.peak() : r.job->kv.final_bytes;
}

void Scheduler::run() {
  std::vector<Running> running;
  bool worked = false;
  for (;;) {
    std::vector<std::shared_ptr<Job>> admitted;
    const bool chunked = opt_.backend->chunked_prefill();
    {
      std::unique_lock lk(mu_);
      // Queued jobs whose client went away leave without ever running.
      for (auto it = queue_.begin(); it != queue_.end();) {
        if ((*it)->cancelled()) {
          it = queue_.erase(it);
          ++counters_.cancelled_total;
        } else {
          ++it;
        }
      }
      running_count_ = int(running.size());
      if (stopping_) break;
      if (running.empty() && queue_.empty()) {
        kv_used_ = 0;
        cv_.notify_all();  // drain() waits for this
#if defined(__GLIBC__)
        // Hand the freed caches back to the system when the server goes idle: glibc keeps freed
        // memory of its per-thread arenas otherwise, and the resident size would stay at its peak.
        if (worked) {
          lk.unlock();
          malloc_trim(0);
          lk.lock();
        }
#endif
        worked = false;
        cv_.wait(lk, [&] { return stopping_ || !queue_.empty(); });
        continue;
      }
      // Without chunked prefill, one admission per iteration: a prefill stalls every running
      // sequence for its duration, so new requests join one at a time between decode steps. With
      // it, every request that fits joins at once: the prefill passes bound each iteration's
      // prompt tokens (prefill_chunk), and the prompts waiting share a pass (a batched prefill).
      // The reservation covers the prefill's transient; the part beyond the final size is given
      // back once the policy has compressed. With nothing running the pool is empty, and submit()
      // refused what can never fit.
      while (!queue_.empty() && int(running.size() + admitted.size()) < opt_.max_running &&
             ((running.empty() && admitted.empty()) || reserved_ + queue_.front()->kv.peak() <= opt_.kv_pool_bytes)) {
        admitted.push_back(std::move(queue_.front()));
        queue_.pop_front();
        reserved_ += admitted.back()->kv.peak();
        running_count_ = int(running.size() + admitted.size());
        if (!chunked) break;
      }
    }
    worked = true;
    for (const std::shared_ptr<Job>& next : admitted)
      if (admit(next, running) && !chunked) {  // prefilled whole: a pass of its own
        {
          std::lock_guard lk(mu_);
          reserved_ -= next->kv.peak() - next->kv.final_bytes;
          counters_.prompt_tokens_total += uint64_t(next->prompt_tokens);
          ++counters_.prefill_passes_total;
        }
        if (opt_.trace) opt_.trace(SchedulerTrace{SchedulerTrace::Kind::Prefill, {next.get()}, {running.back().prompt_len}});
      }
    try {
      if (chunked) prefill_pass(running);
      advance(running);
    } catch (const std::exception& e) {
      fail_all(running, ApiError(500, std::string("generation failed: ") + e.what(), "internal_error"));
    }
  }
  fail_all(running, ApiError(503, "the server is shutting down", "server_shutting_down"));
  std::lock_guard lk(mu_);
  for (auto& j : queue_)
    j->push(Event{Event::Kind::Error, {}, {}, ApiError(503, "the server is shutting down", "server_shutting_down")});
  queue_.clear();
  running_count_ = 0;
}

bool Scheduler::admit(const std::shared_ptr<Job>& job, std::vector<Running>& running) {
  const auto t0 = Clock::now();
  Running r;
  r.job = job;
  r.admitted = t0;
  r.queue_ms = ms_between(job->submitted_, t0);
  try {
    if (job->cancelled()) throw ApiError(499, "cancelled");
    if (job->prompt.image) opt_.backend->use_for_images(job->prompt);
    PreparedPrompt p = engine_.prepare(job->prompt);
    // The pixels and the decoded image are not needed past the vision tower.
    job->image = Image{};
    r.logits.resize(size_t(model_.config().text.vocab_size));
    r.prompt_len = int(p.ids.size());
    if (opt_.backend->chunked_prefill()) {  // prefill_pass() runs it
      r.session = opt_.backend->begin_prefill(p, *job->policy);
      r.prefilling = true;
      running.push_back(std::move(r));
      return true;
    }
    r.session = opt_.backend->prefill(p, *job->policy, r.logits.data());
    r.decoding = std::make_unique<Decoding>(model_.config(), tok_, job->sampling, int(p.ids.size()));
  } catch (const std::exception& e) {
    {
      std::lock_guard lk(mu_);
      reserved_ -= job->kv.peak();
      if (job->cancelled())
        ++counters_.cancelled_total;
      else
        ++counters_.failed_total;
    }
    if (!job->cancelled()) {
      std::fprintf(stderr, "[prefixkv serve] a request failed before decoding: %s\n", e.what());
      const auto* api = dynamic_cast<const ApiError*>(&e);
      job->push(Event{Event::Kind::Error,
                      {},
                      {},
                      api                    ? *api
                      : out_of_kv_blocks(e) ? kv_pool_ran_out(int(running.size()))
                                             : ApiError(dynamic_cast<const pkv::Error*>(&e) ? 400 : 500, e.what(),
                                                        "prefill_failed")});
    }
    return false;
  }
  r.decode_start = Clock::now();
  r.prefill_ms = ms_between(t0, r.decode_start);
  running.push_back(std::move(r));
  return true;
}

void Scheduler::prefill_failed(Running& r, const std::exception& e, int running_count) {
  r.remove = true;
  {
    std::lock_guard lk(mu_);
    if (r.job->cancelled())
      ++counters_.cancelled_total;
    else
      ++counters_.failed_total;
  }
  if (r.job->cancelled()) return;
  std::fprintf(stderr, "[prefixkv serve] a request failed before decoding: %s\n", e.what());
  const auto* api = dynamic_cast<const ApiError*>(&e);
  r.job->push(Event{Event::Kind::Error,
                    {},
                    {},
                    api                    ? *api
                    : out_of_kv_blocks(e) ? kv_pool_ran_out(running_count)
                                           : ApiError(dynamic_cast<const pkv::Error*>(&e) ? 400 : 500, e.what(),
                                                      "prefill_failed")});
}

void Scheduler::prefill_pass(std::vector<Running>& running) {
  // The prompts waiting, oldest first, take the pass's tokens: a long one a piece of prefill_chunk
  // (or what the ones before it left), short ones whole and together.
  const int budget0 = opt_.prefill_chunk > 0 ? opt_.prefill_chunk : INT_MAX;
  int budget = budget0;
  std::vector<Running*> fed;
  std::vector<Backend::Sequence*> seqs;
  std::vector<int> tokens;
  for (Running& r : running) {
    if (!r.prefilling || r.remove) continue;
    if (r.job->cancelled()) {
      r.remove = true;
      std::lock_guard lk(mu_);
      ++counters_.cancelled_total;
      continue;
    }
    if (budget <= 0) continue;
    const int n = std::min(r.prompt_len - r.session->position(), budget);
    budget -= n;
    fed.push_back(&r);
    seqs.push_back(r.session.get());
    tokens.push_back(n);
  }
  if (fed.empty()) return;
  const size_t V = size_t(model_.config().text.vocab_size);
  std::vector<float> logits(fed.size() * V);
  auto finish = [&](size_t i, bool ended) {
    if (!ended) return;
    Running& r = *fed[i];
    std::copy_n(&logits[i * V], V, r.logits.data());
    r.decoding = std::make_unique<Decoding>(model_.config(), tok_, r.job->sampling, r.prompt_len);
    r.prefilling = false;
    r.decode_start = Clock::now();
    r.prefill_ms = ms_between(r.admitted, r.decode_start);
    std::lock_guard lk(mu_);
    reserved_ -= r.job->kv.peak() - r.job->kv.final_bytes;
    counters_.prompt_tokens_total += uint64_t(r.job->prompt_tokens);
  };
  try {
    const std::vector<bool> ended = opt_.backend->prefill_pieces(seqs, tokens, logits.data());
    for (size_t i = 0; i < fed.size(); ++i) finish(i, ended[i]);
  } catch (const std::exception& e) {
    // Nothing changed (the back end checks before it runs): each prompt alone, so that only the
    // one that cannot run fails.
    if (fed.size() == 1) {
      prefill_failed(*fed[0], e, int(running.size()));
    } else {
      for (size_t i = 0; i < fed.size(); ++i) {
        try {
          finish(i, opt_.backend->prefill_pieces({seqs[i]}, {tokens[i]}, &logits[i * V])[0]);
        } catch (const std::exception& e1) {
          prefill_failed(*fed[i], e1, int(running.size()));
        }
      }
    }
  }
  {
    std::lock_guard lk(mu_);
    ++counters_.prefill_passes_total;
  }
  if (opt_.trace) {
    SchedulerTrace t;
    t.kind = SchedulerTrace::Kind::Prefill;
    for (size_t i = 0; i < fed.size(); ++i) t.jobs.push_back(fed[i]->job.get()), t.tokens.push_back(tokens[i]);
    opt_.trace(t);
  }
}

void Scheduler::advance(std::vector<Running>& running) {
  std::vector<Backend::Sequence*> batch;
  std::vector<int32_t> tokens;
  std::vector<Running*> fed;
  int generated = 0;
  for (auto& r : running) {
    if (r.remove) continue;
    if (r.job->cancelled()) {
      r.remove = true;
      std::lock_guard lk(mu_);
      ++counters_.cancelled_total;
      continue;
    }
    if (r.prefilling) continue;  // chunked prefill: its prompt is not all run yet
    const size_t before = r.decoding->tokens().size();
    std::string piece = r.decoding->next(r.logits.data());
    generated += int(r.decoding->tokens().size() - before);
    if (!piece.empty()) r.job->push(Event{Event::Kind::Text, std::move(piece), {}, std::nullopt});
    if (!r.decoding->done()) {
      batch.push_back(r.session.get());
      tokens.push_back(r.decoding->last_token());
      fed.push_back(&r);
      continue;
    }
    std::string rest = r.decoding->finish();
    if (!rest.empty()) r.job->push(Event{Event::Kind::Text, std::move(rest), {}, std::nullopt});
    Completion c;
    c.text = r.decoding->text();
    c.stop_reason = r.decoding->stop_reason();
    c.prompt_tokens = r.job->prompt_tokens;
    c.completion_tokens = int(r.decoding->tokens().size());
    c.kv_bytes = r.session->kv_bytes();
    c.kv_bytes_full =
        size_t(model_.config().text.n_layers) * size_t(r.session->position()) * opt_.backend->kv_entry_bytes();
    c.kv_entries_per_layer = r.session->entries_per_layer();
    c.queue_ms = r.queue_ms;
    c.prefill_ms = r.prefill_ms;
    c.decode_ms = ms_between(r.decode_start, Clock::now());
    r.job->push(Event{Event::Kind::Done, {}, std::move(c), std::nullopt});
    r.remove = true;
    std::lock_guard lk(mu_);
    ++counters_.finished_total;
  }
  while (!batch.empty()) {
    const size_t V = size_t(model_.config().text.vocab_size);
    std::vector<float> logits(batch.size() * V);
    try {
      opt_.backend->step_many(batch, tokens.data(), logits.data());
    } catch (const std::exception& e) {
      // A backend throws out of KV blocks before it changes anything (Backend::step_many's GPU
      // implementation, GpuSession::step_many): the newest request gives its blocks back and the
      // others take the step again. Anything else still fails the batch (run() catches it).
      if (!out_of_kv_blocks(e)) throw;
      Running* newest = fed.back();
      std::fprintf(stderr, "[prefixkv serve] %s; stopping the newest of %zu running requests\n", e.what(), batch.size());
      newest->job->push(Event{Event::Kind::Error, {}, {}, kv_pool_ran_out(int(batch.size()))});
      newest->remove = true;
      {
        std::lock_guard lk(mu_);
        ++counters_.failed_total;
      }
      batch.pop_back();
      tokens.pop_back();
      fed.pop_back();
      continue;
    }
    for (size_t i = 0; i < fed.size(); ++i) std::copy_n(&logits[i * V], V, fed[i]->logits.data());
    {
      std::lock_guard lk(mu_);
      ++counters_.decode_steps_total;
    }
    if (opt_.trace) {
      SchedulerTrace t;
      t.kind = SchedulerTrace::Kind::Step;
      for (Running* r : fed) t.jobs.push_back(r->job.get());
      opt_.trace(t);
    }
    break;
  }
  size_t used = 0;
  for (auto& r : running) {
    if (r.remove)
      release(r);
    else
      used += r.session->kv_bytes();
  }
  std::erase_if(running, [](const Running& r) { return r.remove; });
  kv_used_ = used;
  std::lock_guard lk(mu_);
  running_count_ = int(running.size());
  counters_.generated_tokens_total += uint64_t(generated);
  const auto now = Clock::now();
  if (generated) recent_tokens_.emplace_back(now, generated);
  while (!recent_tokens_.empty() && now - recent_tokens_.front().first > kRateWindow) recent_tokens_.pop_front();
}

void Scheduler::fail_all(std::vector<Running>& running, const ApiError& e) {
  for (auto& r : running) {
    r.job->push(Event{Event::Kind::Error, {}, {}, e});
    release(r);
    std::lock_guard lk(mu_);
    ++counters_.failed_total;
  }
  running.clear();
  kv_used_ = 0;
}

}  // namespace pkv::serve
