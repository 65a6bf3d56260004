#include "serve/metrics.h"

#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <sstream>

namespace pkv::serve {

void HttpCounters::count(const std::string& route, int status) {
  std::lock_guard lk(mu_);
  ++counts_[{route, status}];
}

std::map<std::pair<std::string, int>, uint64_t> HttpCounters::snapshot() const {
  std::lock_guard lk(mu_);
  return counts_;
}

size_t resident_memory_bytes() {
  std::ifstream f("/proc/self/statm");
  size_t pages_total = 0, pages_resident = 0;
  if (!(f >> pages_total >> pages_resident)) return 0;
  return pages_resident * size_t(::sysconf(_SC_PAGESIZE));
}

namespace {

class Writer {
 public:
  void family(const char* name, const char* type, const char* help) {
    o_ << "# HELP " << name << " " << help << "\n# TYPE " << name << " " << type << "\n";
  }
  template <typename T>
  void sample(const std::string& name, T value, const std::string& labels = "") {
    o_ << name;
    if (!labels.empty()) o_ << "{" << labels << "}";
    o_ << " " << value << "\n";
  }
  std::string str() const { return o_.str(); }

 private:
  std::ostringstream o_;
};

}  // namespace

std::string prometheus_text(const SchedulerStats& s, const std::map<std::pair<std::string, int>, uint64_t>& http,
                            size_t resident_bytes) {
  Writer w;
  w.family("prefixkv_http_requests_total", "counter", "HTTP requests answered, by route and status code.");
  for (auto& [key, n] : http)
    w.sample("prefixkv_http_requests_total", n,
             "route=\"" + key.first + "\",status=\"" + std::to_string(key.second) + "\"");
  w.family("prefixkv_requests_running", "gauge", "Chat completions in the running batch.");
  w.sample("prefixkv_requests_running", s.running);
  w.family("prefixkv_requests_queued", "gauge", "Chat completions waiting for a slot or KV memory.");
  w.sample("prefixkv_requests_queued", s.queued);
  w.family("prefixkv_requests_finished_total", "counter", "Chat completions by how they ended.");
  w.sample("prefixkv_requests_finished_total", s.finished_total, "outcome=\"completed\"");
  w.sample("prefixkv_requests_finished_total", s.cancelled_total, "outcome=\"cancelled\"");
  w.sample("prefixkv_requests_finished_total", s.failed_total, "outcome=\"failed\"");
  w.family("prefixkv_prompt_tokens_total", "counter", "Prompt tokens prefilled (image tokens included).");
  w.sample("prefixkv_prompt_tokens_total", s.prompt_tokens_total);
  w.family("prefixkv_generation_tokens_total", "counter", "Tokens generated.");
  w.sample("prefixkv_generation_tokens_total", s.generated_tokens_total);
  w.family("prefixkv_prefill_passes_total", "counter",
           "Prefill passes (one prompt, or on cuda pieces of the waiting prompts in one pass).");
  w.sample("prefixkv_prefill_passes_total", s.prefill_passes_total);
  w.family("prefixkv_decode_steps_total", "counter", "Batched decode steps of the running requests.");
  w.sample("prefixkv_decode_steps_total", s.decode_steps_total);
  w.family("prefixkv_generation_tokens_per_second", "gauge", "Tokens generated per second over the last 10 seconds.");
  w.sample("prefixkv_generation_tokens_per_second", s.tokens_per_second);
  w.family("prefixkv_kv_pool_bytes", "gauge", "KV-cache memory available to requests (--kv-memory).");
  w.sample("prefixkv_kv_pool_bytes", s.kv_pool_bytes);
  w.family("prefixkv_kv_reserved_bytes", "gauge",
           "KV-cache memory reserved by admitted requests (their largest size).");
  w.sample("prefixkv_kv_reserved_bytes", s.kv_reserved_bytes);
  w.family("prefixkv_kv_used_bytes", "gauge", "KV-cache memory the running requests' caches hold now.");
  w.sample("prefixkv_kv_used_bytes", s.kv_used_bytes);
  w.family("prefixkv_kv_free_bytes", "gauge", "KV-cache memory not reserved (pool - reserved).");
  w.sample("prefixkv_kv_free_bytes", s.kv_pool_bytes > s.kv_reserved_bytes ? s.kv_pool_bytes - s.kv_reserved_bytes : 0);
  w.family("process_resident_memory_bytes", "gauge", "Resident memory of the server process.");
  w.sample("process_resident_memory_bytes", resident_bytes);
  return w.str();
}

}  // namespace pkv::serve
