// /metrics in the Prometheus text format (version 0.0.4): HTTP requests by route and status, token
// counters and throughput, running and queued requests, and the KV pool (reserved, used, free).
#pragma once
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <utility>

#include "serve/scheduler.h"

namespace pkv::serve {

class HttpCounters {
 public:
  void count(const std::string& route, int status);
  std::map<std::pair<std::string, int>, uint64_t> snapshot() const;

 private:
  mutable std::mutex mu_;
  std::map<std::pair<std::string, int>, uint64_t> counts_;
};

// The process's resident memory (VmRSS), 0 where /proc is not there.
size_t resident_memory_bytes();

std::string prometheus_text(const SchedulerStats& s, const std::map<std::pair<std::string, int>, uint64_t>& http,
                            size_t resident_bytes);

}  // namespace pkv::serve
